//! The VM's init: PID 1 of the VM's PID namespace.
//!
//! It is forked by the monitor straight into the VM's new namespaces, builds the VM's root
//! from the plan, hardens itself (no_new_privs, capabilities, seccomp), and then serves the
//! monitor: it spawns the commands `shuttle run` asks for (so every process of the VM
//! descends from it and inherits its seccomp filter), reports their exit, reaps orphans and
//! forwards signals. It is single-threaded, as anything that forks must be.

use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use shuttle_proto::{Bytes, Channel, CommandSpec, ExitStatus, InitEvent, InitRequest};

use crate::config::VmConfig;
use crate::plan::Step;
use crate::{hardening, setup, users};

/// Signals init handles itself (through a signalfd); everything else keeps its default,
/// which for PID 1 means the kernel ignores it.
const HANDLED: &[Signal] = &[
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the monitor hands to the forked init.
#[derive(Debug)]
pub struct InitContext {
    pub config: VmConfig,
    pub plan: Vec<Step>,
    pub channel: Channel,
    /// The monitor writes one byte here once the init is in the VM's cgroup.
    pub go: OwnedFd,
    /// cgroup v1: the `tasks` files init writes "0" to, moving itself into the VM's cgroup.
    pub cgroup_tasks: Option<Vec<std::path::PathBuf>>,
    /// The IPC namespace of the VM's `ipc-group`, entered instead of a new one.
    pub ipc_namespace: Option<OwnedFd>,
}

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(*s);
    }
    set
}

/// Runs the VM's init in the freshly cloned child. Never returns.
pub fn run(ctx: InitContext) -> ! {
    let _ = nix::sys::prctl::set_name(c"shuttle-init");
    // If the monitor dies the VM dies with it: a VM nobody supervises is a VM nobody
    // mediates (fail closed).
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // Keep only what init needs: anything else the monitor had open (its lock, the CLI's
    // readiness pipe, its log) must not live on inside the VM.
    let mut keep = vec![ctx.channel.as_fd().as_raw_fd(), ctx.go.as_raw_fd()];
    keep.extend(ctx.ipc_namespace.as_ref().map(|ns| ns.as_raw_fd()));
    if shuttle_sys::process::close_descriptors_except(&keep).is_err() {
        shuttle_sys::process::exit_immediately(1);
    }
    // Before anything is mounted: the VM's /dev/mqueue belongs to the namespace it is in.
    if let Some(ns) = &ctx.ipc_namespace {
        if let Err(e) = shuttle_sys::unotify::enter_namespace(ns.as_fd(), libc::CLONE_NEWIPC) {
            let message = format!("joining the IPC group's namespace: {e}");
            let _ = ctx.channel.send(&InitEvent::SetupFailed { message });
            shuttle_sys::process::exit_immediately(1);
        }
    }
    // Moving a process into a cgroup-v1 memory controller takes the kernel's cgroup
    // threadgroup lock for writing, which costs a whole RCU grace period (~10 ms). On such
    // hosts init builds the VM's root while the monitor moves it; on cgroup v2 hosts it waits
    // first, because the cgroup2 mount inside the VM must be made from the VM's own cgroup
    // namespace, which only exists after the move.
    if let Some(files) = &ctx.cgroup_tasks {
        for f in files {
            if let Err(e) = std::fs::write(f, "0") {
                let message = format!("moving init into its cgroup through {}: {e}", f.display());
                let _ = ctx.channel.send(&InitEvent::SetupFailed { message });
                shuttle_sys::process::exit_immediately(1);
            }
        }
    }
    let cgroup_mount_in_plan = ctx
        .plan
        .iter()
        .any(|s| matches!(s, Step::MountCgroup2 { .. }));
    let go = ctx.go;
    let wait_for_cgroup = move || {
        let mut byte = [0u8; 1];
        matches!(std::fs::File::from(go).read(&mut byte), Ok(1))
    };
    let result = if cgroup_mount_in_plan {
        if wait_for_cgroup() {
            enter_cgroup_namespace().and_then(|()| build_root(&ctx.plan))
        } else {
            // The monitor died (or refused) before placing us in the cgroup.
            shuttle_sys::process::exit_immediately(1)
        }
    } else {
        let built = build_root(&ctx.plan);
        if !wait_for_cgroup() {
            shuttle_sys::process::exit_immediately(1)
        }
        built.and_then(|()| enter_cgroup_namespace())
    };
    let listener = match result.and_then(|()| harden(&ctx.config)) {
        // Not dumpable: a VM's root (same uid, same capabilities) can neither ptrace init nor
        // take its descriptors with pidfd_getfd, and so cannot speak for init to the monitor.
        // Programs init starts become dumpable again when they exec.
        Ok(l) => match nix::sys::prctl::set_dumpable(false) {
            Ok(()) => l,
            Err(e) => {
                let message = format!("prctl(PR_SET_DUMPABLE, 0): {e}");
                let _ = ctx.channel.send(&InitEvent::SetupFailed { message });
                shuttle_sys::process::exit_immediately(1);
            }
        },
        Err(message) => {
            let _ = ctx.channel.send(&InitEvent::SetupFailed { message });
            shuttle_sys::process::exit_immediately(1);
        }
    };
    let code = match Init::new(ctx.channel) {
        Ok(mut init) => init.serve(listener),
        Err(_) => 1,
    };
    shuttle_sys::process::exit_immediately(code)
}

/// The cgroup namespace is made only after the monitor moved us into the VM's cgroup, so
/// that the VM's view of cgroups is rooted at its own.
fn enter_cgroup_namespace() -> Result<(), String> {
    nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| format!("unshare(CLONE_NEWCGROUP) failed: {e}"))
}

/// Builds the VM's root from the plan, ending inside it.
fn build_root(plan: &[Step]) -> Result<(), String> {
    setup::execute(plan).map_err(|e| e.to_string())?;
    // Nothing of the host stays open in the VM: init's own stdio pointed at the monitor's log.
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("open /dev/null in the VM: {e}"))?;
    for target in 0..3 {
        shuttle_sys::process::dup_onto(null.as_fd(), target).map_err(|e| format!("dup2: {e}"))?;
    }
    Ok(())
}

/// no_new_privs, capabilities, and the seccomp filter, whose user-notification descriptor
/// (for the calls the monitor mediates, such as `connect`) is returned for the monitor.
fn harden(config: &VmConfig) -> Result<OwnedFd, String> {
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("prctl(PR_SET_NO_NEW_PRIVS): {e}"))?;
    shuttle_sys::caps::restrict_to(hardening::kept_capabilities(config.net))
        .map_err(|e| e.to_string())?;
    // init is single-threaded, so the filter (installed without TSYNC, which cannot be
    // combined with a listener) covers all of it, and every process it forks inherits it.
    hardening::seccomp_program()
        .and_then(|p| p.install(true))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "seccomp did not return a notification descriptor".to_owned())
}

struct Init {
    channel: Channel,
    signals: SignalFd,
    /// Commands started for the monitor: host of their process group → request id.
    commands: HashMap<Pid, u64>,
    shutting_down: bool,
    /// The notification listener until the monitor has duplicated it.
    listener: Option<OwnedFd>,
}

impl Init {
    fn new(channel: Channel) -> Result<Init, Errno> {
        let set = handled_set();
        set.thread_block()?;
        let signals = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        Ok(Init {
            channel,
            signals,
            commands: HashMap::new(),
            shutting_down: false,
            listener: None,
        })
    }

    fn serve(&mut self, listener: OwnedFd) -> i32 {
        // The monitor takes the notification descriptor from us; init keeps its copy only
        // until the monitor says it has it, so that the monitor alone answers mediated calls.
        let sent = self.channel.send(&InitEvent::Ready {
            listener_fd: listener.as_raw_fd(),
        });
        self.listener = Some(listener);
        if sent.is_err() {
            return 1;
        }
        loop {
            let (chan_ready, sig_ready) = {
                let mut fds = [
                    PollFd::new(self.channel.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(_) => return 1,
                }
                let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            if sig_ready {
                if let Some(code) = self.handle_signals() {
                    return code;
                }
            }
            if chan_ready {
                match self.channel.recv_with_fds::<InitRequest>() {
                    Ok((req, fds)) => {
                        if let Some(code) = self.handle_request(req, fds) {
                            return code;
                        }
                    }
                    // The monitor is gone; PR_SET_PDEATHSIG will end us too, but do not wait.
                    Err(shuttle_proto::ChannelError::Disconnected) => return 1,
                    Err(_) => continue,
                }
            }
        }
    }

    fn handle_request(&mut self, req: InitRequest, fds: Vec<OwnedFd>) -> Option<i32> {
        match req {
            InitRequest::Spawn { id, command } => {
                let (event, master) = match spawn(&command, fds) {
                    Ok((pid, master)) => {
                        self.commands.insert(pid, id);
                        (
                            InitEvent::Spawned {
                                id,
                                pid: pid.as_raw(),
                            },
                            master,
                        )
                    }
                    Err(SpawnError { message, exit_code }) => (
                        InitEvent::SpawnFailed {
                            id,
                            message,
                            exit_code,
                        },
                        None,
                    ),
                };
                // With a terminal, its master side goes to the caller (through the monitor).
                let _ = match &master {
                    Some(m) => self.channel.send_with_fds(&event, &[m.as_fd()]),
                    None => self.channel.send(&event),
                };
                None
            }
            InitRequest::Signal { id, signal } => {
                let target = self
                    .commands
                    .iter()
                    .find(|(_, v)| **v == id)
                    .map(|(p, _)| *p);
                if let (Some(pid), Ok(sig)) = (target, Signal::try_from(signal)) {
                    // The command leads its own process group (setsid); its pipeline children
                    // get the signal as from a terminal.
                    if killpg(pid, sig).is_err() {
                        let _ = kill(pid, sig);
                    }
                }
                None
            }
            InitRequest::Shutdown => self.begin_shutdown(),
            InitRequest::ListenerTaken => {
                self.listener = None;
                None
            }
        }
    }

    fn begin_shutdown(&mut self) -> Option<i32> {
        self.shutting_down = true;
        // kill(-1) from PID 1 reaches every other process of the PID namespace.
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
        self.reap()
    }

    fn handle_signals(&mut self) -> Option<i32> {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            match sig {
                Signal::SIGCHLD => {}
                Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP => {
                    if let Some(code) = self.begin_shutdown() {
                        return Some(code);
                    }
                }
                other => {
                    let _ = kill(Pid::from_raw(-1), other);
                }
            }
        }
        self.reap()
    }

    /// Reaps every exited child; reports commands' exits. Returns the exit code of init when
    /// it is shutting down and nothing is left.
    fn reap(&mut self) -> Option<i32> {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return None,
                Ok(status) => {
                    let (pid, exit) = match status {
                        WaitStatus::Exited(p, c) => (p, ExitStatus::Code(c)),
                        WaitStatus::Signaled(p, s, _) => (p, ExitStatus::Signal(s as i32)),
                        _ => continue,
                    };
                    if let Some(id) = self.commands.remove(&pid) {
                        let _ = self.channel.send(&InitEvent::Exited { id, status: exit });
                    }
                }
                Err(Errno::ECHILD) => return self.shutting_down.then_some(0),
                Err(Errno::EINTR) => continue,
                Err(_) => return None,
            }
        }
    }
}

#[derive(Debug)]
struct SpawnError {
    message: String,
    exit_code: i32,
}

fn fail(message: impl Into<String>, exit_code: i32) -> SpawnError {
    SpawnError {
        message: message.into(),
        exit_code,
    }
}

fn cstring(b: &Bytes, what: &str) -> Result<CString, SpawnError> {
    CString::new(b.as_bytes()).map_err(|_| fail(format!("{what} contains a NUL byte"), 126))
}

/// Everything the forked child needs, prepared before the fork so that the child only
/// makes system calls.
struct Prepared {
    argv: Vec<CString>,
    env: Vec<CString>,
    search_path: String,
    cwd: CString,
    user: Option<users::User>,
}

fn prepare_command(cmd: &CommandSpec) -> Result<Prepared, SpawnError> {
    if cmd.argv.is_empty() {
        return Err(fail("no command given", 126));
    }
    let argv = cmd
        .argv
        .iter()
        .map(|a| cstring(a, "an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let user = match &cmd.user {
        Some(spec) => {
            Some(users::resolve(spec, Path::new("/")).map_err(|e| fail(e.to_string(), 126))?)
        }
        None => None,
    };
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = cmd
        .env
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    let has = |env: &[(Vec<u8>, Vec<u8>)], k: &str| env.iter().any(|(key, _)| key == k.as_bytes());
    let home = user
        .as_ref()
        .and_then(|u| u.home.clone())
        .unwrap_or_else(|| {
            if user.as_ref().is_none_or(|u| u.uid == 0) {
                "/root".into()
            } else {
                "/".into()
            }
        });
    if !has(&env, "HOME") {
        env.push((b"HOME".to_vec(), home.into_bytes()));
    }
    let user_name = match &user {
        Some(u) => u.name.clone(),
        None => Some("root".to_owned()),
    };
    if let Some(n) = user_name {
        for k in ["USER", "LOGNAME"] {
            if !has(&env, k) {
                env.push((k.as_bytes().to_vec(), n.clone().into_bytes()));
            }
        }
    }
    if !has(&env, "PATH") {
        env.push((b"PATH".to_vec(), DEFAULT_PATH.as_bytes().to_vec()));
    }
    let search_path = env
        .iter()
        .find(|(k, _)| k == b"PATH")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| DEFAULT_PATH.to_owned());
    let env = env
        .into_iter()
        .map(|(mut k, v)| {
            k.push(b'=');
            k.extend(v);
            CString::new(k).map_err(|_| fail("an environment variable contains a NUL byte", 126))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cwd = match &cmd.cwd {
        Some(c) => cstring(c, "the working directory")?,
        None => CString::from(c"/"),
    };
    Ok(Prepared {
        argv,
        env,
        search_path,
        cwd,
        user,
    })
}

/// Forks and execs a command with the given stdio, in a session of its own.
/// Forks and execs a command in a session of its own, on the given stdio or, when asked for,
/// on a new pseudo-terminal of the VM's devpts whose master side is returned.
fn spawn(cmd: &CommandSpec, fds: Vec<OwnedFd>) -> Result<(Pid, Option<OwnedFd>), SpawnError> {
    let (fds, master) = match cmd.terminal {
        Some((rows, cols)) => {
            let pty = nix::pty::openpty(None, None)
                .map_err(|e| fail(format!("allocating a terminal: {e}"), 126))?;
            let _ = shuttle_sys::terminal::set_window_size(pty.master.as_fd(), rows, cols);
            let slave = pty.slave;
            let copies = (slave.try_clone(), slave.try_clone());
            let (Ok(out), Ok(err)) = copies else {
                return Err(fail("duplicating the terminal", 126));
            };
            (vec![slave, out, err], Some(pty.master))
        }
        None => (fds, None),
    };
    if fds.len() != 3 {
        return Err(fail(
            format!("expected 3 standard descriptors, got {}", fds.len()),
            126,
        ));
    }
    let terminal = master.is_some();
    let prepared = prepare_command(cmd)?;
    let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| fail(format!("pipe: {e}"), 126))?;
    // SAFETY (of the call below, in shuttle-sys): init is single-threaded.
    let forked = shuttle_sys_fork().map_err(|e| fail(format!("fork: {e}"), 126))?;
    match forked {
        None => {
            drop(err_read);
            drop(master);
            let err = exec_child(&prepared, &fds, terminal);
            let mut w = std::fs::File::from(err_write);
            let _ = w.write_all(err.message.as_bytes());
            shuttle_sys::process::exit_immediately(err.exit_code);
        }
        Some(child) => {
            drop(err_write);
            drop(fds);
            let mut report = String::new();
            let _ = std::fs::File::from(err_read).read_to_string(&mut report);
            if report.is_empty() {
                return Ok((child, master));
            }
            let code = match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, c)) => c,
                _ => 126,
            };
            Err(fail(report, code))
        }
    }
}

fn shuttle_sys_fork() -> Result<Option<Pid>, Errno> {
    // This crate forbids unsafe code; the fork wrapper documents its single-thread
    // requirement, which init meets by construction (it never starts a thread).
    shuttle_sys::process::fork_single_threaded()
}

/// In the forked child: set up and exec. Returns only on failure.
fn exec_child(p: &Prepared, fds: &[OwnedFd], terminal: bool) -> SpawnError {
    // init blocks the signals it reads through its signalfd; the command starts with none
    // blocked, as after a login.
    if let Err(e) = SigSet::empty().thread_set_mask() {
        return fail(format!("sigprocmask: {e}"), 126);
    }
    if let Err(e) = nix::unistd::setsid() {
        return fail(format!("setsid: {e}"), 126);
    }
    // A terminal of its own becomes the session's controlling terminal: job control, Ctrl-C
    // and Ctrl-Z work inside the VM as on a login.
    if terminal {
        if let Err(e) = shuttle_sys::terminal::make_controlling(fds[0].as_fd()) {
            return fail(format!("making the terminal controlling: {e}"), 126);
        }
    }
    for (target, fd) in fds.iter().enumerate() {
        if fd.as_raw_fd() == target as i32 {
            // Already in place; just clear close-on-exec.
            let _ = nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            );
        } else if let Err(e) = shuttle_sys::process::dup_onto(fd.as_fd(), target as i32) {
            return fail(format!("dup2: {e}"), 126);
        }
    }
    let _ = shuttle_sys::process::cloexec_descriptors_from(3);
    if let Some(u) = &p.user {
        let groups: Vec<Gid> = u.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        let r = nix::unistd::setgroups(&groups)
            .and_then(|_| nix::unistd::setgid(Gid::from_raw(u.gid)))
            .and_then(|_| nix::unistd::setuid(Uid::from_raw(u.uid)));
        if let Err(e) = r {
            return fail(
                format!("switching to uid {} gid {}: {e}", u.uid, u.gid),
                126,
            );
        }
    }
    if let Err(e) = nix::unistd::chdir(p.cwd.as_c_str()) {
        return fail(
            format!("working directory {}: {e}", p.cwd.to_string_lossy()),
            126,
        );
    }
    let errno = exec_search(p);
    let name = p.argv[0].to_string_lossy();
    match errno {
        Errno::ENOENT => fail(format!("command not found in the VM: {name}"), 127),
        Errno::EACCES => fail(format!("permission denied: {name}"), 126),
        e => fail(format!("cannot execute {name}: {e}"), 126),
    }
}

/// execve with a PATH search over the command's own PATH (execvpe would use init's).
fn exec_search(p: &Prepared) -> Errno {
    let prog = p.argv[0].as_bytes();
    let exec = |path: &CString| -> Errno {
        let r: Result<Infallible, Errno> = nix::unistd::execve(path, &p.argv, &p.env);
        r.err().unwrap_or(Errno::EINVAL)
    };
    if prog.contains(&b'/') {
        return exec(&p.argv[0]);
    }
    let mut saw_eacces = false;
    for dir in p.search_path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let mut full = dir.as_bytes().to_vec();
        full.push(b'/');
        full.extend_from_slice(prog);
        let Ok(full) = CString::new(full) else {
            continue;
        };
        match exec(&full) {
            Errno::EACCES => saw_eacces = true,
            Errno::ENOENT | Errno::ENOTDIR => {}
            other => return other,
        }
    }
    if saw_eacces {
        Errno::EACCES
    } else {
        Errno::ENOENT
    }
}
