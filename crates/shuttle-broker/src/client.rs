//! The CLI's side of the broker.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use shuttle_proto::{BrokerReply, BrokerRequest, Channel, ChannelError, Hello, PROTOCOL_VERSION};
use shuttle_vm::Layout;

/// The hidden CLI argument that tells `shuttle daemon` to report readiness on a descriptor.
pub const READY_FD_FLAG: &str = "--ready-fd";

#[derive(Debug, thiserror::Error)]
pub enum BrokerClientError {
    #[error(
        "the broker is not running: start it with `shuttle daemon` (it needs to be up to {0})"
    )]
    NotRunning(&'static str),
    #[error("talking to the broker: {0}")]
    Channel(#[from] ChannelError),
    #[error("starting the broker failed: {message} (log: {log})")]
    StartFailed { message: String, log: String },
    #[error("the broker answered unexpectedly: {0}")]
    Protocol(String),
}

/// Connects to the running broker and completes the handshake. `purpose` completes the error
/// message when no broker runs ("... to load a policy").
pub fn connect(layout: &Layout, purpose: &'static str) -> Result<Channel, BrokerClientError> {
    let chan = match Channel::connect(&layout.broker_socket()) {
        Ok(c) => c,
        Err(ChannelError::Connect { .. }) => return Err(BrokerClientError::NotRunning(purpose)),
        Err(e) => return Err(e.into()),
    };
    chan.send(&BrokerRequest::Hello(Hello {
        version: PROTOCOL_VERSION,
    }))?;
    match chan.recv::<BrokerReply>()? {
        BrokerReply::Hello { version } if version == PROTOCOL_VERSION => Ok(chan),
        BrokerReply::Hello { version } => Err(ChannelError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        }
        .into()),
        other => Err(BrokerClientError::Protocol(format!("{other:?}"))),
    }
}

/// Connects to the broker, starting it in the background first when none runs.
pub fn connect_or_start(
    layout: &Layout,
    shuttle_exe: &Path,
    purpose: &'static str,
) -> Result<Channel, BrokerClientError> {
    match connect(layout, purpose) {
        Err(BrokerClientError::NotRunning(_)) => {}
        other => return other,
    }
    start(layout, shuttle_exe)?;
    connect(layout, purpose)
}

/// Starts `shuttle daemon` detached, and waits until it accepts connections.
pub fn start(layout: &Layout, shuttle_exe: &Path) -> Result<(), BrokerClientError> {
    let log = layout.broker_log();
    let failed = |message: String| BrokerClientError::StartFailed {
        message,
        log: log.display().to_string(),
    };
    fs::create_dir_all(&layout.runtime).map_err(|e| failed(e.to_string()))?;
    let line = shuttle_vm::detach::spawn_detached(shuttle_exe, &["daemon", READY_FD_FLAG], &log)
        .map_err(|e| failed(e.to_string()))?;
    if line == "ok" {
        return Ok(());
    }
    // Lost a race with another starter: fine if a broker now answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if Channel::connect(&layout.broker_socket()).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(failed(if line.is_empty() {
        "the broker exited during start".into()
    } else {
        line
    }))
}

pub fn request(chan: &Channel, req: &BrokerRequest) -> Result<BrokerReply, BrokerClientError> {
    chan.send(req)?;
    Ok(chan.recv::<BrokerReply>()?)
}
