//! The broker process (`shuttle daemon`).

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{
    accept4, bind, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    UnixAddr,
};
use shuttle_audit::{AuditStore, Limits};
use shuttle_proto::{BrokerReply, BrokerRequest, Channel, ChannelError, Hello, PROTOCOL_VERSION};
use shuttle_vm::{client as vm_client, store, Layout};

use crate::policy_store::{self, PolicyStoreError};

/// How often monitors' journals are collected into the store.
const COLLECT_EVERY: Duration = Duration::from_millis(250);
/// The audit store keeps at most this many records (older ones are rotated out).
pub const DEFAULT_MAX_RECORDS: u64 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("a broker is already running for {0} (see its log at {1})")]
    AlreadyRunning(String, String),
    #[error("{what}: {message}")]
    Setup { what: String, message: String },
}

fn setup(what: impl Into<String>) -> impl FnOnce(String) -> DaemonError {
    let what = what.into();
    move |message| DaemonError::Setup { what, message }
}

struct Broker {
    layout: Layout,
    /// Held while the active policy changes and is handed to monitors, so that two changes
    /// (a load and a system's layer) never interleave and no monitor keeps an older whole.
    policy_lock: Mutex<()>,
    audit: Mutex<AuditStore>,
    questions: crate::questions::Questions,
}

/// Runs the broker in the foreground until SIGTERM or SIGINT. `ready` is told `ok` once the
/// socket accepts connections (for the CLI that started it in the background).
pub fn run(layout: &Layout, ready: Option<OwnedFd>) -> Result<(), DaemonError> {
    shuttle_vm::layout::ensure_private_dir(&layout.runtime)
        .map_err(|e| setup("creating the runtime directory")(e.to_string()))?;
    shuttle_vm::layout::ensure_private_dir(&layout.state)
        .map_err(|e| setup("creating the state directory")(e.to_string()))?;
    let lock_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(layout.broker_lock())
        .map_err(|e| setup("opening the broker lock")(e.to_string()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
        DaemonError::AlreadyRunning(
            layout.runtime.display().to_string(),
            layout.broker_log().display().to_string(),
        )
    })?;
    let _ = fs::write(layout.broker_pid(), std::process::id().to_string());
    let audit = AuditStore::open(
        layout.audit_db(),
        Limits {
            max_records: DEFAULT_MAX_RECORDS,
        },
    )
    .map_err(|e| {
        setup(format!(
            "opening the audit store {}",
            layout.audit_db().display()
        ))(e.to_string())
    })?;
    let listener = listen_on(&layout.broker_socket())?;
    let broker = Arc::new(Broker {
        layout: layout.clone(),
        policy_lock: Mutex::new(()),
        audit: Mutex::new(audit),
        questions: crate::questions::Questions::default(),
    });
    // Collect what monitors journaled while no broker ran, before answering anything.
    broker.collect_all();
    broker.reattach();

    let collector = Arc::clone(&broker);
    thread::spawn(move || loop {
        thread::sleep(COLLECT_EVERY);
        collector.collect_all();
    });

    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| setup("installing signal handlers")(e.to_string()))?;
    let on_signal = Arc::clone(&broker);
    thread::spawn(move || on_signal.handle_signals(signals));

    if let Some(r) = ready {
        use std::io::Write;
        let _ = fs::File::from(r).write_all(b"ok\n");
    }
    tracing::info!(socket = %layout.broker_socket().display(), "broker running");
    loop {
        let fd = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            Err(e) => return Err(setup("accept")(e.to_string())),
        };
        let Some(fd) = shuttle_sys::fdpass::own_accepted(fd) else {
            continue;
        };
        let chan = Channel::from_fd(fd);
        let root = getsockopt(&chan, sockopt::PeerCredentials)
            .map(|c| c.uid() == 0)
            .unwrap_or(false);
        if !root {
            continue;
        }
        let b = Arc::clone(&broker);
        thread::spawn(move || {
            if let Err(e) = b.serve(&chan) {
                tracing::debug!(error = %e, "client connection ended");
            }
        });
    }
}

fn listen_on(path: &PathBuf) -> Result<OwnedFd, DaemonError> {
    // We hold the broker lock: whatever socket file exists is a dead broker's.
    let _ = fs::remove_file(path);
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| setup("socket")(e.to_string()))?;
    let addr = UnixAddr::new(path)
        .map_err(|e| setup(format!("socket path {}", path.display()))(e.to_string()))?;
    bind(sock.as_raw_fd(), &addr)
        .map_err(|e| setup(format!("bind {}", path.display()))(e.to_string()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| setup(format!("chmod {}", path.display()))(e.to_string()))?;
    listen(
        &sock,
        Backlog::new(128).map_err(|e| setup("listen")(e.to_string()))?,
    )
    .map_err(|e| setup("listen")(e.to_string()))?;
    Ok(sock)
}

impl Broker {
    fn handle_signals(&self, mut signals: signal_hook::iterator::Signals) {
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                match policy_store::active_source(&self.layout) {
                    Some(source) => match fs::read_to_string(&source) {
                        Ok(text) => {
                            let reply = self.load_policy(&source, &text);
                            tracing::info!(?reply, %source, "SIGHUP: policy reloaded");
                        }
                        Err(e) => {
                            tracing::error!(%source, error = %e, "SIGHUP: cannot read the policy file; the active policy stays")
                        }
                    },
                    None => tracing::warn!("SIGHUP: no policy was loaded yet; nothing to reload"),
                }
            } else {
                tracing::info!("stopping (VMs keep running, their monitors keep enforcing)");
                self.collect_all();
                let _ = fs::remove_file(self.layout.broker_socket());
                let _ = fs::remove_file(self.layout.broker_pid());
                std::process::exit(0);
            }
        }
    }

    fn serve(&self, chan: &Channel) -> Result<(), ChannelError> {
        match chan.recv::<BrokerRequest>()? {
            BrokerRequest::Hello(Hello { version }) if version == PROTOCOL_VERSION => {
                chan.send(&BrokerReply::Hello {
                    version: PROTOCOL_VERSION,
                })?
            }
            BrokerRequest::Hello(Hello { version }) => {
                let _ = chan.send(&BrokerReply::Hello {
                    version: PROTOCOL_VERSION,
                });
                return Err(ChannelError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                });
            }
            other => return Err(ChannelError::Unexpected(format!("{other:?} before hello"))),
        }
        loop {
            let reply = match chan.recv::<BrokerRequest>() {
                Ok(BrokerRequest::LoadPolicy { source, text }) => self.load_policy(&source, &text),
                Ok(BrokerRequest::SetPolicyLayer { layer, parts }) => {
                    self.change_policy(&format!("layer {layer}"), None, || {
                        policy_store::set_layer(&self.layout, &layer, &parts)
                    })
                }
                Ok(BrokerRequest::RemovePolicyLayer { layer }) => {
                    self.change_policy(&format!("layer {layer} removed"), None, || {
                        policy_store::remove_layer(&self.layout, &layer)
                    })
                }
                Ok(BrokerRequest::ReapplyPolicy { vms }) => {
                    self.change_policy("reapplied", Some(&vms), || {
                        let parts = policy_store::active_parts(&self.layout)?;
                        let policy = shuttle_vm::vm_api::parse_parts(&parts)
                            .map_err(PolicyStoreError::Invalid)?;
                        Ok((policy, parts))
                    })
                }
                Ok(BrokerRequest::CollectAudit) => BrokerReply::Collected {
                    records: self.collect_all(),
                },
                Ok(BrokerRequest::Status) => {
                    let rules = match shuttle_vm::vm_api::build_active_policy(&self.layout) {
                        Ok(p) => p.len(),
                        Err(e) => {
                            tracing::error!(error = %e, "status: the active policy cannot be built");
                            0
                        }
                    };
                    BrokerReply::Status {
                        pid: std::process::id() as i32,
                        policy_source: policy_store::active_source(&self.layout),
                        rules,
                        audit_records: self.audit.lock().map(|a| a.len().unwrap_or(0)).unwrap_or(0),
                    }
                }
                Ok(BrokerRequest::Ask(question)) => {
                    let (allow, how) = self.questions.ask(question);
                    BrokerReply::Answer { allow, how }
                }
                Ok(BrokerRequest::Pending) => BrokerReply::Pending {
                    questions: self.questions.pending(),
                },
                Ok(BrokerRequest::Answer {
                    id,
                    allow,
                    remember_ms,
                }) => {
                    match self
                        .questions
                        .answer(id, allow, remember_ms.map(Duration::from_millis))
                    {
                        Ok(()) => BrokerReply::Answered,
                        Err(e) => BrokerReply::Failed {
                            message: e.to_string(),
                        },
                    }
                }
                Ok(BrokerRequest::VmCreate(spec)) => {
                    self.lifecycle(|| crate::lifecycle::create(&self.layout, spec))
                }
                Ok(BrokerRequest::VmStart { name }) => self.lifecycle(|| {
                    // A monitor that cannot build the active policy whole runs its VM with no
                    // cross-VM rules at all (see `load_active_policy`); say why here instead
                    // of starting a VM whose interactions fail for no visible reason.
                    shuttle_vm::vm_api::build_active_policy(&self.layout).map_err(|e| {
                        format!("VM {name} not started: the active policy cannot be built: {e}")
                    })?;
                    crate::lifecycle::start(&self.layout, &name)
                }),
                Ok(BrokerRequest::VmStop { name, grace_ms }) => self.lifecycle(|| {
                    crate::lifecycle::stop(&self.layout, &name, Duration::from_millis(grace_ms))
                }),
                Ok(BrokerRequest::VmRemove { name, force }) => self.lifecycle(|| {
                    let r = crate::lifecycle::remove(&self.layout, &name, force);
                    // Its journal moved aside on removal; collect it now.
                    self.collect_all();
                    r
                }),
                Ok(BrokerRequest::Hello(_)) => BrokerReply::Failed {
                    message: "hello twice".into(),
                },
                Err(ChannelError::Disconnected) => return Ok(()),
                Err(e) => return Err(e),
            };
            chan.send(&reply)?;
        }
    }

    fn lifecycle(&self, f: impl FnOnce() -> Result<(), String>) -> BrokerReply {
        match f() {
            Ok(()) => BrokerReply::Done,
            Err(message) => BrokerReply::Failed { message },
        }
    }

    /// Validates, persists and distributes a policy. Invalid: nothing changes.
    fn load_policy(&self, source: &str, text: &str) -> BrokerReply {
        self.change_policy(source, None, || {
            policy_store::activate(&self.layout, source, text)
        })
    }

    /// Makes a change to the active policy (`change` validates and persists it, returning the
    /// whole) and hands the whole to every running monitor (or to `only` those VMs'), one
    /// change at a time. Invalid: nothing changes.
    fn change_policy(
        &self,
        what: &str,
        only: Option<&[String]>,
        change: impl FnOnce() -> Result<
            (shuttle_policy::Policy, Vec<shuttle_proto::PolicyText>),
            PolicyStoreError,
        >,
    ) -> BrokerReply {
        let _changing = self.policy_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (policy, parts) = match change() {
            Ok(p) => p,
            Err(PolicyStoreError::Invalid(errors)) => {
                return BrokerReply::PolicyRejected {
                    errors: errors.to_string(),
                }
            }
            Err(e) => {
                return BrokerReply::Failed {
                    message: e.to_string(),
                }
            }
        };
        let (mut monitors, mut unreached) = (0, Vec::new());
        for config in store::list(&self.layout)
            .unwrap_or_default()
            .into_iter()
            .flatten()
        {
            if !store::is_running(&self.layout, &config.name)
                || only.is_some_and(|o| !o.contains(&config.name))
            {
                continue;
            }
            match vm_client::set_policy(&self.layout, &config.name, &parts) {
                Ok(()) => monitors += 1,
                Err(e) => {
                    tracing::warn!(vm = %config.name, error = %e, "monitor did not take the new policy");
                    unreached.push(config.name);
                }
            }
        }
        tracing::info!(%what, rules = policy.len(), monitors, "policy changed");
        for warning in policy_store::layer_conflicts(&self.layout).unwrap_or_default() {
            tracing::warn!(%warning, "rules of two systems overlap");
        }
        BrokerReply::PolicyLoaded {
            rules: policy.len(),
            monitors,
            unreached,
        }
    }

    /// Makes every running VM's monitor enforce the active policy, in case a load happened
    /// while it could not be reached.
    fn reattach(&self) {
        // Never a partial policy: monitors keep the last one they were given instead.
        let parts = match policy_store::active_parts(&self.layout) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "re-attaching: the active policy cannot be read; monitors keep theirs");
                return;
            }
        };
        if parts.is_empty() {
            return;
        }
        for config in store::list(&self.layout)
            .unwrap_or_default()
            .into_iter()
            .flatten()
        {
            if store::is_running(&self.layout, &config.name) {
                if let Err(e) = vm_client::set_policy(&self.layout, &config.name, &parts) {
                    tracing::warn!(vm = %config.name, error = %e, "re-attaching: monitor did not take the policy");
                }
            }
        }
    }

    /// Moves every journaled decision into the store; returns how many were new.
    fn collect_all(&self) -> usize {
        let mut total = 0;
        let mut audit = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        let mut journals: Vec<(String, PathBuf)> = store::list(&self.layout)
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .map(|c| (c.name.clone(), self.layout.audit_journal(&c.name)))
            .collect();
        // Journals of removed VMs, kept until collected.
        if let Ok(entries) = fs::read_dir(self.layout.orphaned_journals_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                journals.push((format!("orphan:{name}"), e.path()));
            }
        }
        for (source, path) in journals {
            if !path.exists() {
                continue;
            }
            match audit.collect_from(path.as_path(), &source) {
                Ok(n) => total += n,
                Err(e) => {
                    tracing::error!(journal = %path.display(), error = %e, "collecting audit records failed")
                }
            }
            if source.starts_with("orphan:") {
                let _ = fs::remove_file(&path);
            }
        }
        total
    }
}
