//! The CLI's side of a VM: starting its monitor, and talking to it.

use std::fs;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shuttle_proto::{
    Channel, ChannelError, CommandSpec, ExitStatus, Hello, MonitorReply, MonitorRequest, VmStatus,
    PROTOCOL_VERSION,
};

use crate::layout::Layout;
use crate::store::{self, StoreError};

/// The hidden CLI subcommand that runs the monitor role.
pub const MONITOR_SUBCOMMAND: &str = "__monitor";

/// Each message carries its cause's text itself, so no variant also reports it as `source()`:
/// a chain printed with `{:#}` would say it twice.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("VM {0} is not running: start it with `shuttle vm start {0}`")]
    NotRunning(String),
    #[error("VM {0} is already running")]
    AlreadyRunning(String),
    #[error("starting VM {name} failed: {message} (monitor log: {log})")]
    StartFailed {
        name: String,
        message: String,
        log: PathBuf,
    },
    #[error("talking to the monitor of VM {name}: {cause}")]
    Channel { name: String, cause: ChannelError },
    #[error("{message}")]
    CommandFailed { message: String, exit_code: i32 },
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    #[error("the monitor of VM {name} answered unexpectedly: {reply}")]
    Protocol { name: String, reply: String },
}

fn chan_err(name: &str) -> impl FnOnce(ChannelError) -> ClientError + '_ {
    move |source| ClientError::Channel {
        name: name.to_owned(),
        cause: source,
    }
}

/// Starts the VM's monitor (which starts the VM) and waits until the VM runs.
pub fn start(layout: &Layout, name: &str, shuttle_exe: &Path) -> Result<(), ClientError> {
    store::load(layout, name)?;
    if store::is_running(layout, name) {
        return Err(ClientError::AlreadyRunning(name.into()));
    }
    let runtime = layout.runtime_vms_dir();
    fs::create_dir_all(&runtime).map_err(|source| ClientError::Io {
        what: format!("creating {}", runtime.display()),
        cause: source,
    })?;
    let log_path = layout.monitor_log(name);
    let answer = crate::detach::spawn_detached(shuttle_exe, &[MONITOR_SUBCOMMAND, name], &log_path)
        .map_err(|source| ClientError::Io {
            what: format!("starting the monitor {}", shuttle_exe.display()),
            cause: source,
        })?;
    if answer == "ok" {
        return Ok(());
    }
    let message = match answer.strip_prefix("error: ") {
        Some(m) => m.to_owned(),
        None if answer.is_empty() => "the monitor exited before the VM was up".to_owned(),
        None => answer.to_owned(),
    };
    if message.ends_with("is already running") {
        return Err(ClientError::AlreadyRunning(name.into()));
    }
    Err(ClientError::StartFailed {
        name: name.into(),
        message,
        log: log_path,
    })
}

/// Waits until a VM that another process is starting accepts connections. Fails as soon as
/// nobody holds the VM's lock any more (that start failed).
pub fn wait_until_ready(layout: &Layout, name: &str, timeout: Duration) -> Result<(), ClientError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if Channel::connect(&layout.monitor_socket(name)).is_ok() {
            return Ok(());
        }
        if !store::is_running(layout, name) {
            return Err(ClientError::NotRunning(name.into()));
        }
        if std::time::Instant::now() > deadline {
            return Err(ClientError::StartFailed {
                name: name.into(),
                message: format!("another start did not finish within {timeout:?}"),
                log: layout.monitor_log(name),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Opens a conversation with the VM's monitor and completes the version handshake.
pub fn connect(layout: &Layout, name: &str) -> Result<Channel, ClientError> {
    let chan = match Channel::connect(&layout.monitor_socket(name)) {
        Ok(c) => c,
        Err(ChannelError::Connect { .. }) => {
            store::load(layout, name)?;
            return Err(ClientError::NotRunning(name.into()));
        }
        Err(e) => return Err(chan_err(name)(e)),
    };
    chan.send(&MonitorRequest::Hello(Hello {
        version: PROTOCOL_VERSION,
    }))
    .map_err(chan_err(name))?;
    match chan.recv::<MonitorReply>().map_err(chan_err(name))? {
        MonitorReply::Hello { version, .. } if version == PROTOCOL_VERSION => Ok(chan),
        MonitorReply::Hello { version, .. } => Err(chan_err(name)(ChannelError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        })),
        other => Err(ClientError::Protocol {
            name: name.into(),
            reply: format!("{other:?}"),
        }),
    }
}

/// A command running in a VM.
#[derive(Debug)]
pub struct RunSession {
    name: String,
    chan: Channel,
    /// Its PID inside the VM.
    pub pid: i32,
    /// The master side of the VM terminal the command runs on, when one was asked for.
    pub terminal: Option<std::os::fd::OwnedFd>,
}

impl RunSession {
    /// A handle that can deliver signals to the command from another thread.
    pub fn signaller(&self) -> Result<Signaller, ClientError> {
        Ok(Signaller {
            chan: self.chan.try_clone().map_err(chan_err(&self.name))?,
        })
    }

    /// Waits for the command to end.
    pub fn wait(self) -> Result<ExitStatus, ClientError> {
        match self
            .chan
            .recv::<MonitorReply>()
            .map_err(chan_err(&self.name))?
        {
            MonitorReply::Exited(status) => Ok(status),
            MonitorReply::Failed { message, exit_code } => {
                Err(ClientError::CommandFailed { message, exit_code })
            }
            other => Err(ClientError::Protocol {
                name: self.name,
                reply: format!("{other:?}"),
            }),
        }
    }
}

#[derive(Debug)]
pub struct Signaller {
    chan: Channel,
}

impl Signaller {
    pub fn signal(&self, signal: i32) -> Result<(), ChannelError> {
        self.chan.send(&MonitorRequest::Signal { signal })
    }
}

/// Runs `command` in the running VM `name` with the given stdin, stdout and stderr.
pub fn run(
    layout: &Layout,
    name: &str,
    command: CommandSpec,
    stdio: &[BorrowedFd<'_>],
) -> Result<RunSession, ClientError> {
    let chan = connect(layout, name)?;
    chan.send_with_fds(&MonitorRequest::Run(command), stdio)
        .map_err(chan_err(name))?;
    let (reply, mut fds) = chan
        .recv_with_fds::<MonitorReply>()
        .map_err(chan_err(name))?;
    match reply {
        MonitorReply::Started { pid } => Ok(RunSession {
            terminal: fds.pop(),
            name: name.into(),
            chan,
            pid,
        }),
        MonitorReply::Failed { message, exit_code } => {
            Err(ClientError::CommandFailed { message, exit_code })
        }
        other => Err(ClientError::Protocol {
            name: name.into(),
            reply: format!("{other:?}"),
        }),
    }
}

/// Hands the VM's monitor a new policy to enforce.
pub fn set_policy(
    layout: &Layout,
    name: &str,
    parts: &[shuttle_proto::PolicyText],
) -> Result<(), ClientError> {
    let chan = connect(layout, name)?;
    chan.send(&MonitorRequest::SetPolicy {
        parts: parts.to_vec(),
    })
    .map_err(chan_err(name))?;
    match chan.recv::<MonitorReply>().map_err(chan_err(name))? {
        MonitorReply::Done => Ok(()),
        MonitorReply::Failed { message, exit_code } => {
            Err(ClientError::CommandFailed { message, exit_code })
        }
        other => Err(ClientError::Protocol {
            name: name.into(),
            reply: format!("{other:?}"),
        }),
    }
}

pub fn status(layout: &Layout, name: &str) -> Result<VmStatus, ClientError> {
    let chan = connect(layout, name)?;
    chan.send(&MonitorRequest::Status).map_err(chan_err(name))?;
    match chan.recv::<MonitorReply>().map_err(chan_err(name))? {
        MonitorReply::Status(s) => Ok(s),
        other => Err(ClientError::Protocol {
            name: name.into(),
            reply: format!("{other:?}"),
        }),
    }
}

/// Stops the VM (SIGTERM to its processes, SIGKILL after `grace`) and waits until its
/// monitor has cleaned up and exited.
pub fn stop(layout: &Layout, name: &str, grace: Duration) -> Result<(), ClientError> {
    let chan = connect(layout, name)?;
    chan.send(&MonitorRequest::Stop {
        grace_ms: grace.as_millis() as u64,
    })
    .map_err(chan_err(name))?;
    match chan.recv::<MonitorReply>() {
        Ok(MonitorReply::Stopped) | Err(ChannelError::Disconnected) => {}
        Ok(other) => {
            return Err(ClientError::Protocol {
                name: name.into(),
                reply: format!("{other:?}"),
            })
        }
        Err(e) => return Err(chan_err(name)(e)),
    }
    // The monitor exits right after; wait for it so that the lock is free when we return.
    let _ = chan.recv::<MonitorReply>();
    for _ in 0..2000 {
        if !store::is_running(layout, name) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}
