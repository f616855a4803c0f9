//! The per-VM monitor: the host-side supervisor of one running VM.
//!
//! Started detached by the CLI (`shuttle` re-executes itself in the monitor role), it takes
//! the VM's lock, creates its cgroup, forks the VM's init into new namespaces, and then serves
//! the VM's `monitor.sock`: running commands (handing the caller's stdio descriptors to init),
//! forwarding signals, reporting status, and stopping the VM. When init exits, for whatever
//! reason, the monitor removes the VM's cgroup and runtime files and exits, releasing the lock.
//!
//! Threads: the monitor forks exactly once (init), before it starts any thread.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    accept4, bind, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    UnixAddr,
};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use shuttle_proto::{
    Channel, ChannelError, CommandSpec, Hello, InitEvent, InitRequest, MonitorReply,
    MonitorRequest, VmStatus, PROTOCOL_VERSION,
};

use crate::cgroup::{self, Limits, VmCgroup};
use crate::config::{NetMode, VmConfig};
use crate::init::{self, InitContext};
use crate::layout::Layout;
use crate::{plan, store};

/// How long init may take to build the VM before the start is abandoned.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace period of a stop the monitor starts itself (on SIGTERM).
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("VM {0} is already running")]
    AlreadyRunning(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("{what}: {errno}")]
    Sys {
        what: String,
        errno: nix::errno::Errno,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("setting up VM {name} failed: {message}")]
    Setup { name: String, message: String },
    #[error("VM {0} did not finish setting up within {SETUP_TIMEOUT:?}")]
    SetupTimeout(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> MonitorError {
    let what = what.into();
    move |errno| MonitorError::Sys { what, errno }
}

/// Entry point of the monitor role. `ready` receives one line, `ok` or `error: ...`, once the
/// VM runs or failed to start; the CLI waits for it.
pub fn main(layout: &Layout, name: &str, ready: Option<OwnedFd>) -> i32 {
    tracing::debug!(vm = name, "monitor process started");
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_name(c"shuttle-monitor");
    let mut ready = ready.map(fs::File::from);
    match start(layout, name) {
        Ok(vm) => {
            if let Some(r) = ready.as_mut() {
                let _ = r.write_all(b"ok\n");
            }
            drop(ready);
            tracing::info!(vm = name, init_pid = vm.init_pid.as_raw(), "VM running");
            vm.serve();
            0
        }
        Err(e) => {
            tracing::error!(vm = name, error = %e, "VM failed to start");
            if let Some(r) = ready.as_mut() {
                let _ = writeln!(r, "error: {e}");
            }
            1
        }
    }
}

/// A VM whose init is up, not yet serving.
struct Started {
    layout: Layout,
    config: VmConfig,
    init_pid: Pid,
    init: Channel,
    cgroup: VmCgroup,
    listener: OwnedFd,
    api_listener: OwnedFd,
    /// The VM's seccomp user-notification descriptor.
    notify: OwnedFd,
    _lock: nix::fcntl::Flock<fs::File>,
    started_at: u64,
    journal: Arc<crate::audit_log::VmJournal>,
    /// The policy the VM's requests are decided by.
    policy: crate::vm_api::SharedPolicy,
    /// The invoke stubs the policy puts into the VM (`None` if they cannot be managed).
    stubs: Option<Arc<crate::stubs::Stubs>>,
    /// The shares the policy shows in the VM (`None` if they cannot be managed).
    shares: Option<Arc<crate::share::Shares>>,
}

fn start(layout: &Layout, name: &str) -> Result<Started, MonitorError> {
    let lock =
        store::try_lock(layout, name)?.ok_or_else(|| MonitorError::AlreadyRunning(name.into()))?;
    let config = store::load(layout, name)?;
    // Installations made before Shuttle locked its state down get repaired here.
    crate::layout::ensure_private_dir(&layout.state).map_err(|source| MonitorError::Io {
        what: "securing",
        path: layout.state.display().to_string(),
        source,
    })?;
    // Whatever a crashed monitor left behind goes first (shares into the host included).
    let run_dir = layout.runtime_vm_dir(name);
    let _ = fs::remove_dir_all(&run_dir);
    crate::share::clear_host_shares(layout, name);
    let io = |what, path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| MonitorError::Io { what, path, source }
    };
    fs::create_dir_all(layout.root_mount_point(name)).map_err(io("creating", &run_dir))?;
    fs::create_dir_all(layout.vm_api_dir(name)).map_err(io("creating", &run_dir))?;
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o700))
        .map_err(io("chmod", &run_dir))?;

    // SysV IPC groups are settled at start (see ipc_group.rs); joining one is audited before
    // it happens, like every cross-VM decision.
    let journal = crate::audit_log::VmJournal::new(layout.audit_journal(name));
    let ipc = crate::ipc_group::plan(layout, &crate::vm_api::load_active_policy(layout), &config);
    let ipc_namespace = match ipc.join {
        Some((ns, record)) => {
            if !journal.record_synced(name, &record) {
                return Err(MonitorError::Setup {
                    name: name.into(),
                    message: "the audit journal cannot be written; not joining the IPC group"
                        .into(),
                });
            }
            Some(ns)
        }
        None => None,
    };
    if let Some(group) = &ipc.group {
        fs::write(layout.ipc_group_file(name), group)
            .map_err(io("recording the IPC group in", &run_dir))?;
    }
    // Shares of this VM's previous run still held elsewhere go first (see share.rs).
    crate::share::wait_for_receivers(layout, name, Duration::from_secs(3));
    let result = launch(layout, &config, ipc_namespace);
    match result {
        Ok((init_pid, init, cgroup, notify)) => {
            // The VM's own API socket: any user inside the VM may connect (the VM, not the
            // user, is the identity), so 0666 in a 0755 directory only the monitor writes.
            let api_dir = layout.vm_api_dir(name);
            let listeners = fs::set_permissions(&api_dir, fs::Permissions::from_mode(0o755))
                .map_err(|source| MonitorError::Io {
                    what: "chmod",
                    path: api_dir.display().to_string(),
                    source,
                })
                .and_then(|()| listen_on(&layout.vm_api_socket(name), 0o666))
                .and_then(|api| Ok((listen_on(&layout.monitor_socket(name), 0o600)?, api)));
            let (listener, api_listener) = match listeners {
                Ok(l) => l,
                Err(e) => {
                    let _ = kill(init_pid, Signal::SIGKILL);
                    let _ = waitpid(init_pid, None);
                    cleanup(layout, name, Some(&cgroup));
                    return Err(e);
                }
            };
            let started_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let policy = crate::vm_api::load_active_policy(layout);
            // Stubs go in before the VM is reported running, so that no command started
            // afterwards runs the VM's own copy of a program the policy routes elsewhere.
            let stubs = match crate::stubs::Stubs::new(name, &config.tags, init_pid.as_raw()) {
                Ok(stubs) => {
                    stubs.sync(&policy);
                    Some(Arc::new(stubs))
                }
                Err(e) => {
                    tracing::error!(vm = name, error = %e, "invoke stubs cannot be managed");
                    None
                }
            };
            // Shares too: a command started afterwards finds them in place.
            let shares = match crate::share::Shares::new(
                layout,
                name,
                &config.tags,
                init_pid.as_raw(),
                Arc::clone(&journal),
            ) {
                Ok(shares) => {
                    shares.sync(&policy, true);
                    Some(Arc::new(shares))
                }
                Err(e) => {
                    tracing::error!(vm = name, error = %e, "shares cannot be managed");
                    None
                }
            };
            Ok(Started {
                policy: Arc::new(std::sync::RwLock::new(policy)),
                stubs,
                shares,
                layout: layout.clone(),
                config,
                init_pid,
                init,
                cgroup,
                listener,
                api_listener,
                notify,
                _lock: lock,
                started_at,
                journal,
            })
        }
        Err(e) => {
            cleanup(
                layout,
                name,
                VmCgroup::existing(&layout.cgroup_parent(), name).as_ref(),
            );
            Err(e)
        }
    }
}

/// Creates the cgroup, forks init into new namespaces and waits until it reports ready.
/// The running VM: its init, the channel to it, its cgroup and its seccomp notification fd.
type Launched = (Pid, Channel, VmCgroup, OwnedFd);

fn launch(
    layout: &Layout,
    config: &VmConfig,
    ipc_namespace: Option<OwnedFd>,
) -> Result<Launched, MonitorError> {
    let t0 = Instant::now();
    let cgroup = VmCgroup::create(
        &layout.cgroup_parent(),
        &config.name,
        Limits {
            memory_bytes: config.memory_bytes,
            pids: config.pids,
        },
    )?;
    // The running binary, for /run/shuttle/shuttle inside the VM (its mount point, an empty
    // file, is made in the API directory now, before the VM's root is built).
    let exe = std::env::current_exe().ok().map(|e| {
        let text = e.to_string_lossy().into_owned();
        text.strip_suffix(" (deleted)")
            .map(std::path::PathBuf::from)
            .unwrap_or(e)
    });
    let exe =
        exe.filter(|_| fs::File::create(layout.vm_api_dir(&config.name).join("shuttle")).is_ok());
    let steps = plan::build(config, layout, cgroup::host_cgroups(), exe.as_deref());
    let (ours, theirs) = Channel::pair()?;
    let (go_read, go_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe2"))?;
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWUTS;
    if ipc_namespace.is_none() {
        flags |= CloneFlags::CLONE_NEWIPC;
    }
    if config.net == NetMode::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let self_attach = cgroup.self_attach_files();
    tracing::debug!(elapsed = ?t0.elapsed(), "cgroup created");
    let forked = shuttle_sys::process::clone_into_namespaces_single_threaded(flags).map_err(|e| {
        MonitorError::Sys {
            what: "clone into new namespaces (does this kernel support mount, PID, IPC, UTS and network namespaces?)".into(),
            errno: e,
        }
    })?;
    let Some(init_pid) = forked else {
        drop(ours);
        drop(go_write);
        init::run(InitContext {
            config: config.clone(),
            plan: steps,
            channel: theirs,
            go: go_read,
            cgroup_tasks: self_attach,
            ipc_namespace,
        });
    };
    drop(theirs);
    drop(go_read);
    tracing::debug!(elapsed = ?t0.elapsed(), "init cloned");
    let fail = |e: MonitorError| {
        let _ = kill(init_pid, Signal::SIGKILL);
        let _ = waitpid(init_pid, None);
        e
    };
    let attach = Instant::now();
    if self_attach.is_none() {
        cgroup
            .add_process(init_pid.as_raw())
            .map_err(|e| fail(e.into()))?;
        tracing::debug!(elapsed = ?attach.elapsed(), "init moved into the VM's cgroup");
    }
    fs::File::from(go_write).write_all(b"g").map_err(|e| {
        fail(MonitorError::Io {
            what: "releasing init",
            path: "pipe".into(),
            source: e,
        })
    })?;
    // Wait for Ready with a deadline: poll the channel.
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(MonitorError::SetupTimeout(config.name.clone())));
        }
        let mut fds = [nix::poll::PollFd::new(
            ours.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                return Err(fail(MonitorError::Sys {
                    what: "poll".into(),
                    errno: e,
                }))
            }
        }
        match ours
            .recv_with_fds::<InitEvent>()
            .map(|(ev, mut fds)| (ev, fds.pop()))
        {
            Ok((InitEvent::Ready { listener_fd }, _)) => {
                let listener = shuttle_sys::process::pidfd_open(init_pid.as_raw())
                    .and_then(|pidfd| {
                        shuttle_sys::unotify::duplicate_from(pidfd.as_fd(), listener_fd)
                    })
                    .map_err(|errno| {
                        fail(MonitorError::Sys {
                            what: "taking the notification listener from init".into(),
                            errno,
                        })
                    })?;
                if ours.send(&InitRequest::ListenerTaken).is_err() {
                    return Err(fail(MonitorError::Setup {
                        name: config.name.clone(),
                        message: "init went away while starting".into(),
                    }));
                }
                tracing::debug!(elapsed = ?attach.elapsed(), "init ready");
                // Verify, whoever moved it: a VM outside its cgroup would escape its limits.
                if !cgroup.contains(init_pid.as_raw()) {
                    return Err(fail(MonitorError::Setup {
                        name: config.name.clone(),
                        message: format!(
                            "init is not in the VM's cgroup after set-up (it is in: {})",
                            fs::read_to_string(format!("/proc/{init_pid}/cgroup"))
                                .unwrap_or_default()
                                .lines()
                                .filter(|l| l.contains("memory")
                                    || l.contains("pids")
                                    || l.starts_with("0::"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }));
                }
                return Ok((init_pid, ours, cgroup, listener));
            }
            Ok((InitEvent::SetupFailed { message }, _)) => {
                return Err(fail(MonitorError::Setup {
                    name: config.name.clone(),
                    message,
                }))
            }
            Ok((other, _)) => {
                return Err(fail(MonitorError::Setup {
                    name: config.name.clone(),
                    message: format!("unexpected message from init: {other:?}"),
                }))
            }
            Err(ChannelError::Disconnected) => {
                return Err(fail(MonitorError::Setup {
                    name: config.name.clone(),
                    message: "the VM's init exited during set-up (see the monitor log)".into(),
                }))
            }
            Err(e) => return Err(fail(e.into())),
        }
    }
}

fn listen_on(path: &std::path::Path, mode: u32) -> Result<OwnedFd, MonitorError> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sys("socket"))?;
    let addr = UnixAddr::new(path).map_err(sys(format!(
        "socket path {} (too long? set a shorter SHUTTLE_ROOT)",
        path.display()
    )))?;
    bind(sock.as_raw_fd(), &addr).map_err(sys(format!("bind {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        MonitorError::Io {
            what: "chmod",
            path: path.display().to_string(),
            source,
        }
    })?;
    listen(&sock, Backlog::new(128).map_err(sys("listen backlog"))?).map_err(sys("listen"))?;
    Ok(sock)
}

/// Removes the VM's cgroup and runtime directory (not its lock, which the process holds).
fn cleanup(layout: &Layout, name: &str, cgroup: Option<&VmCgroup>) {
    if let Some(cg) = cgroup {
        if let Err(e) = cg.remove(Duration::from_secs(5)) {
            tracing::error!(vm = name, error = %e, "could not remove the VM's cgroup");
        }
    }
    let _ = fs::remove_dir_all(layout.runtime_vm_dir(name));
    // The VM's objects shown on the host go with it (they would keep its file system busy).
    crate::share::clear_host_shares(layout, name);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmState {
    Running,
    Stopping,
    Stopped,
}

/// An event about one command from init, with a terminal's master side when it has one.
type CommandEvent = (InitEvent, Option<OwnedFd>);

struct Shared {
    name: String,
    policy: crate::vm_api::SharedPolicy,
    stubs: Option<Arc<crate::stubs::Stubs>>,
    shares: Option<Arc<crate::share::Shares>>,
    init: Channel,
    init_pid: Pid,
    /// Signals to init go through this once it may have been reaped (after which its pid
    /// could belong to another process).
    init_pidfd: Option<OwnedFd>,
    started_at: u64,
    /// The VM's intercepted calls by outcome, for Status.
    intercepted: Arc<crate::intercept::Counts>,
    next_id: AtomicU64,
    /// Per running command: where its events (and a terminal's master side) go.
    waiters: Mutex<HashMap<u64, mpsc::Sender<CommandEvent>>>,
    state: Mutex<VmState>,
    state_changed: Condvar,
    /// Clients waiting to be told the VM stopped; the process lingers until they are.
    stop_waiters: AtomicUsize,
}

impl Shared {
    fn request_stop(self: &Arc<Self>, grace: Duration) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state != VmState::Running {
            return;
        }
        *state = VmState::Stopping;
        drop(state);
        tracing::info!(vm = %self.name, ?grace, "stopping");
        if self.init.send(&InitRequest::Shutdown).is_err() {
            self.kill_init();
        }
        let me = Arc::clone(self);
        thread::spawn(move || {
            let deadline = Instant::now() + grace;
            let mut state = me.state.lock().unwrap_or_else(|e| e.into_inner());
            while *state != VmState::Stopped {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    tracing::warn!(vm = %me.name, "grace period over: SIGKILL");
                    // SIGKILL to PID 1 of a PID namespace kills every process in it.
                    me.kill_init();
                    return;
                }
                state = me
                    .state_changed
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        });
    }

    /// SIGKILL to init, which kills every process of the VM's PID namespace.
    fn kill_init(&self) {
        match &self.init_pidfd {
            Some(fd) => {
                let _ = shuttle_sys::process::pidfd_send_signal(fd.as_fd(), libc::SIGKILL);
            }
            // Without a pidfd (kernels before 5.3), by pid: a small window remains there
            // between init's reaping and the VM being marked stopped.
            None => {
                let _ = kill(self.init_pid, Signal::SIGKILL);
            }
        }
    }

    fn wait_stopped(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while *state != VmState::Stopped {
            state = self
                .state_changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The monitor holds a descriptor per file its VM's invocations show elsewhere (up to
/// `transfer::MAX_CALLER_INODES`), per API connection and per mediated target: the soft
/// limit on open files (often 1024) is raised to the hard one, at most 65536. Done once init
/// is forked, so the VM's processes keep the limit they inherit.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let wanted = hard.min(65536);
        if soft < wanted {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
                tracing::warn!(error = %e, "raising RLIMIT_NOFILE");
            }
        }
    }
}

impl Started {
    fn serve(self) {
        let Started {
            layout,
            config,
            init_pid,
            init,
            cgroup,
            listener,
            api_listener,
            notify,
            _lock,
            started_at,
            journal,
            policy,
            stubs,
            shares,
        } = self;
        raise_open_file_limit();
        let api = Arc::new(crate::vm_api::ApiContext {
            layout: layout.clone(),
            vm: config.name.clone(),
            init_pid: init_pid.as_raw(),
            tags: config.tags.clone(),
            policy: Arc::clone(&policy),
            journal: Arc::clone(&journal),
            mediation: crate::intercept::MediationState::new(init_pid.as_raw()),
            stubs: stubs.clone(),
        });
        let intercept = Arc::clone(&api);
        let intercepted = Arc::clone(&api.mediation.counts);
        thread::spawn(move || crate::vm_api::serve(api_listener, api));
        thread::spawn(move || crate::intercept::serve(notify, intercept));
        let reader = match init.try_clone() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot clone init channel");
                let _ = kill(init_pid, Signal::SIGKILL);
                return;
            }
        };
        // Opened while init cannot have been reaped yet (only this thread reaps it, later).
        let init_pidfd = shuttle_sys::process::pidfd_open(init_pid.as_raw()).ok();
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            init,
            init_pid,
            init_pidfd,
            policy: Arc::clone(&policy),
            stubs,
            shares: shares.clone(),
            started_at,
            intercepted,
            next_id: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
            state: Mutex::new(VmState::Running),
            state_changed: Condvar::new(),
            stop_waiters: AtomicUsize::new(0),
        });

        // SIGTERM/SIGINT/SIGHUP to the monitor stop the VM gracefully.
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ]) {
            let s = Arc::clone(&shared);
            thread::spawn(move || {
                if signals.forever().next().is_some() {
                    s.request_stop(DEFAULT_GRACE);
                }
            });
        }

        // Shares follow their owners: applied when an owner VM starts, taken away when it
        // stops (checked every second).
        if let Some(shares) = shares {
            let policy = Arc::clone(&policy);
            thread::spawn(move || loop {
                thread::sleep(Duration::from_secs(1));
                if shares.needs_recheck() {
                    let p = Arc::clone(&policy.read().unwrap_or_else(|e| e.into_inner()));
                    shares.sync(&p, false);
                }
            });
        }

        let acceptor = Arc::clone(&shared);
        thread::spawn(move || accept_loop(listener, acceptor));

        // This thread follows init: its events, and its end.
        loop {
            match reader.recv_with_fds::<InitEvent>() {
                Ok((ev, mut fds)) => dispatch(&shared, ev, fds.pop()),
                Err(ChannelError::Disconnected) => break,
                Err(e) => tracing::warn!(error = %e, "bad message from init"),
            }
        }
        let status = waitpid(init_pid, None);
        tracing::info!(vm = %config.name, ?status, "init exited");
        // The VM's last decisions reach the disk before the monitor reports it stopped.
        journal.flush();
        shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        cleanup(&layout, &config.name, Some(&cgroup));
        {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            *state = VmState::Stopped;
            shared.state_changed.notify_all();
        }
        // Let clients that asked for the stop hear that it is done.
        let deadline = Instant::now() + Duration::from_secs(2);
        while shared.stop_waiters.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

fn dispatch(shared: &Shared, ev: InitEvent, fd: Option<OwnedFd>) {
    let (id, last) = match &ev {
        InitEvent::Spawned { id, .. } => (*id, false),
        InitEvent::SpawnFailed { id, .. } | InitEvent::Exited { id, .. } => (*id, true),
        _ => return,
    };
    let mut waiters = shared.waiters.lock().unwrap_or_else(|e| e.into_inner());
    let tx = if last {
        waiters.remove(&id)
    } else {
        waiters.get(&id).cloned()
    };
    drop(waiters);
    if let Some(tx) = tx {
        let _ = tx.send((ev, fd));
    }
}

fn accept_loop(listener: OwnedFd, shared: Arc<Shared>) {
    loop {
        let fd = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(raw) => raw,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            Err(e) => {
                tracing::error!(error = %e, "accept failed");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Some(fd) = shuttle_sys::fdpass::own_accepted(fd) else {
            continue;
        };
        let chan = Channel::from_fd(fd);
        // Only root (or the user the monitor runs as) may drive a VM.
        let allowed = getsockopt(&chan, sockopt::PeerCredentials)
            .map(|c| c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw())
            .unwrap_or(false);
        if !allowed {
            continue;
        }
        let s = Arc::clone(&shared);
        thread::spawn(move || {
            if let Err(e) = serve_client(&s, chan) {
                tracing::debug!(error = %e, "client connection ended");
            }
        });
    }
}

fn serve_client(shared: &Arc<Shared>, chan: Channel) -> Result<(), ChannelError> {
    match chan.recv::<MonitorRequest>()? {
        MonitorRequest::Hello(Hello { version }) if version == PROTOCOL_VERSION => {
            chan.send(&MonitorReply::Hello {
                version: PROTOCOL_VERSION,
                vm: shared.name.clone(),
            })?
        }
        MonitorRequest::Hello(Hello { version }) => {
            let _ = chan.send(&MonitorReply::Hello {
                version: PROTOCOL_VERSION,
                vm: shared.name.clone(),
            });
            return Err(ChannelError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        other => return Err(ChannelError::Unexpected(format!("{other:?} before hello"))),
    }
    let (req, fds) = chan.recv_with_fds::<MonitorRequest>()?;
    match req {
        MonitorRequest::Run(command) => run_command(shared, chan, command, fds),
        MonitorRequest::Status => chan.send(&MonitorReply::Status(VmStatus {
            name: shared.name.clone(),
            init_pid: shared.init_pid.as_raw(),
            monitor_pid: std::process::id() as i32,
            started_at: shared.started_at,
            running_commands: shared.waiters.lock().map(|w| w.len()).unwrap_or(0),
            intercepted: shared.intercepted.snapshot(),
        })),
        MonitorRequest::Stop { grace_ms } => {
            shared.stop_waiters.fetch_add(1, Ordering::SeqCst);
            shared.request_stop(Duration::from_millis(grace_ms));
            shared.wait_stopped();
            let r = chan.send(&MonitorReply::Stopped);
            shared.stop_waiters.fetch_sub(1, Ordering::SeqCst);
            r
        }
        MonitorRequest::SetPolicy { parts } => {
            // The broker sends only a policy it built whole. One this monitor cannot build
            // (a broker of another version, say) is refused and the last good one stays: it
            // is what the VM ran with until now, whereas a subset of the new one could be
            // wider than both. The broker reports this VM as not having taken the change.
            match crate::vm_api::parse_parts(&parts) {
                Ok(p) => {
                    let rules = p.len();
                    let source = p.source_name().to_owned();
                    let p = Arc::new(p);
                    *shared.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&p);
                    tracing::info!(vm = %shared.name, %source, rules, "policy replaced");
                    // Stubs follow before the load is reported done: a program a new rule
                    // routes elsewhere is a stub from the next exec on.
                    if let Some(stubs) = &shared.stubs {
                        stubs.sync(&p);
                    }
                    // And shares: `policy load` returns with them in place (or removed).
                    if let Some(shares) = &shared.shares {
                        shares.sync(&p, true);
                    }
                    chan.send(&MonitorReply::Done)
                }
                Err(e) => chan.send(&MonitorReply::Failed {
                    message: e.to_string(),
                    exit_code: 1,
                }),
            }
        }
        MonitorRequest::Signal { .. } | MonitorRequest::Hello(_) => {
            chan.send(&MonitorReply::Failed {
                message: "nothing to signal: run a command first".into(),
                exit_code: 2,
            })
        }
    }
}

fn run_command(
    shared: &Arc<Shared>,
    chan: Channel,
    command: CommandSpec,
    fds: Vec<OwnedFd>,
) -> Result<(), ChannelError> {
    if *shared.state.lock().unwrap_or_else(|e| e.into_inner()) != VmState::Running {
        return chan.send(&MonitorReply::Failed {
            message: format!("VM {} is stopping", shared.name),
            exit_code: 125,
        });
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    shared
        .waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, tx);
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    if let Err(e) = shared
        .init
        .send_with_fds(&InitRequest::Spawn { id, command }, &borrowed)
    {
        shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        return chan.send(&MonitorReply::Failed {
            message: format!("VM {} is not answering: {e}", shared.name),
            exit_code: 125,
        });
    }
    drop(borrowed);
    drop(fds);
    let gone = || MonitorReply::Failed {
        message: format!("VM {} stopped", shared.name),
        exit_code: 137,
    };
    match rx.recv() {
        Ok((InitEvent::Spawned { pid, .. }, master)) => match &master {
            Some(m) => chan.send_with_fds(&MonitorReply::Started { pid }, &[m.as_fd()])?,
            None => chan.send(&MonitorReply::Started { pid })?,
        },
        Ok((
            InitEvent::SpawnFailed {
                message, exit_code, ..
            },
            _,
        )) => return chan.send(&MonitorReply::Failed { message, exit_code }),
        _ => return chan.send(&gone()),
    }
    // Signals from the client, while we wait for the exit.
    let reader = chan.try_clone()?;
    let s = Arc::clone(shared);
    let forwarder = thread::spawn(move || loop {
        match reader.recv::<MonitorRequest>() {
            Ok(MonitorRequest::Signal { signal }) if (1..=64).contains(&signal) => {
                let _ = s.init.send(&InitRequest::Signal { id, signal });
            }
            Ok(_) => {}
            Err(_) => {
                // The client went away: hang up on the command, as a closing terminal would.
                // Harmless when the command already exited (init forgets finished ids).
                let _ = s.init.send(&InitRequest::Signal {
                    id,
                    signal: libc::SIGHUP,
                });
                return;
            }
        }
    });
    let reply = match rx.recv() {
        Ok((InitEvent::Exited { status, .. }, _)) => MonitorReply::Exited(status),
        _ => gone(),
    };
    let r = chan.send(&reply);
    chan.shutdown();
    let _ = forwarder.join();
    r
}
