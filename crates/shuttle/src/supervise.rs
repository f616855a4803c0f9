//! The supervisor of one system (`shuttle __supervise MANIFEST FD`, `ps` name
//! `shuttle-system`): started detached by `shuttle up`, it starts the manifest's
//! applications in dependency order, waits for each one's readiness before its dependents,
//! holds each application's run connection to its VM's monitor (so it learns of every exit
//! and can signal it), restarts failed applications with backoff as the manifest says, keeps
//! `state.json` for `shuttle ps`, and on SIGTERM (`shuttle down`) stops everything in reverse
//! order.
//!
//! Progress goes as lines to the pipe `FD` (which `up` copies to its terminal), ending with
//! `ok` once every application is ready, or `error: ...` after everything it started has been
//! stopped again: a failed `up` leaves nothing half-started.

use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use shuttle_proto::{Bytes, CommandSpec};
use shuttle_system::{AppSpec, DependencyRestart, Manifest, Probe};
use shuttle_vm::client::{self, Signaller};
use shuttle_vm::{store, Layout};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The shuttle binary as every VM sees it.
const SHUTTLE_IN_VM: &str = "/run/shuttle/shuttle";
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An application that ran this long before it failed starts again from the first backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);
/// An application's log is rotated when it would grow past this (one previous file kept, so
/// at most twice this on disk); `SHUTTLE_APP_LOG_MAX` (bytes) changes it.
const DEFAULT_LOG_MAX: u64 = 8 << 20;
/// While an application waits for a component that is not mounted yet, how often its VM's
/// monitor is asked to settle its shares again (a share refused because the provider's
/// directory did not exist yet is only tried again then).
const COMPONENT_RETRY: Duration = Duration::from_secs(1);

/// Where a system's supervisor keeps its runtime files.
pub fn runtime_dir(layout: &Layout, system: &str) -> PathBuf {
    layout.runtime.join("systems").join(system)
}

pub fn lock_file(layout: &Layout, system: &str) -> PathBuf {
    runtime_dir(layout, system).join("supervisor.lock")
}

pub fn state_file(layout: &Layout, system: &str) -> PathBuf {
    runtime_dir(layout, system).join("state.json")
}

pub fn log_dir(layout: &Layout, system: &str) -> PathBuf {
    layout.state.join("systems").join(system).join("logs")
}

pub fn app_log(layout: &Layout, system: &str, app: &str) -> PathBuf {
    log_dir(layout, system).join(format!("{app}.log"))
}

/// The previous log of an application, kept by one rotation.
pub fn previous_log(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

fn log_max() -> u64 {
    std::env::var("SHUTTLE_APP_LOG_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_LOG_MAX)
}

/// An application's log file, written only by the supervisor (its notes, and the output of
/// the application and its setup steps, relayed from pipes), so that it can be rotated: at
/// `max` bytes it becomes `VM.APP.log.1` (replacing the one before) and a new file starts.
/// Handing the application the file itself would leave it writing to the renamed file.
#[derive(Debug)]
pub struct AppLog {
    path: PathBuf,
    file: Option<fs::File>,
    len: u64,
    max: u64,
}

impl AppLog {
    pub fn new(path: PathBuf, max: u64) -> AppLog {
        AppLog {
            path,
            file: None,
            len: 0,
            max,
        }
    }

    pub fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            let f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.len = f.metadata()?.len();
            self.file = Some(f);
        }
        let mut rest = buf;
        while !rest.is_empty() {
            let room = usize::try_from(self.max.saturating_sub(self.len)).unwrap_or(usize::MAX);
            if rest.len() > room && self.len > 0 {
                self.rotate()?;
                continue;
            }
            // What fits; split a chunk larger than the whole bound after its last complete
            // line in the piece, so that lines stay whole wherever they can.
            let piece = if rest.len() <= room {
                rest.len()
            } else {
                rest[..room]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(room, |i| i + 1)
            };
            if let Some(f) = self.file.as_mut() {
                f.write_all(&rest[..piece])?;
                self.len += piece as u64;
            }
            rest = &rest[piece..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        fs::rename(&self.path, previous_log(&self.path))?;
        self.file = Some(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        self.len = 0;
        Ok(())
    }
}

type SharedLog = Arc<std::sync::Mutex<AppLog>>;

/// Log relays still copying (see [`log_pipe`]); the supervisor lets them finish before it
/// exits, so that what applications wrote while stopping is kept.
static RELAYS: AtomicU64 = AtomicU64::new(0);

/// A pipe whose read end a thread copies into `log` until every writer has closed it;
/// returns the write end (to hand to a command as its stdout and stderr).
fn log_pipe(log: &SharedLog) -> Result<OwnedFd> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let log = Arc::clone(log);
    RELAYS.fetch_add(1, Ordering::SeqCst);
    std::thread::spawn(move || {
        struct Done;
        impl Drop for Done {
            fn drop(&mut self) {
                RELAYS.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _done = Done;
        let mut read = fs::File::from(read);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match std::io::Read::read(&mut read, &mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = l.write(&buf[..n]) {
                        eprintln!("shuttle-supervise: writing {}: {e}", l.path.display());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    Ok(write)
}

/// Whether a supervisor holds the system's lock.
pub fn is_running(layout: &Layout, system: &str) -> bool {
    let Ok(file) = fs::File::open(lock_file(layout, system)) else {
        return false;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
    }
}

/// What `shuttle ps` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemState {
    pub system: String,
    pub manifest: String,
    pub supervisor_pid: u32,
    pub apps: Vec<AppRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRow {
    /// `VM.APP`.
    pub id: String,
    pub vm: String,
    /// waiting, starting, ready, stopping, backoff, exited, failed, stopped
    pub state: String,
    /// Its PID inside its VM, while it runs.
    pub pid: Option<i32>,
    pub restarts: u32,
    /// Unix seconds of its current start.
    pub started_at: Option<u64>,
    /// Its last exit status (shell style: 128+N for signal N).
    pub last_exit: Option<i32>,
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Waiting,
    Starting,
    Ready,
    Stopping,
    Exited,
    Failed,
}

impl St {
    fn name(self) -> &'static str {
        match self {
            St::Waiting => "waiting",
            St::Starting => "starting",
            St::Ready => "ready",
            St::Stopping => "stopping",
            St::Exited => "exited",
            St::Failed => "failed",
        }
    }
}

struct App {
    spec: AppSpec,
    log: SharedLog,
    /// While it waits for components of other VMs: when it must have them at the latest.
    component_deadline: Option<Instant>,
    /// When its VM's monitor was last asked to settle its shares again.
    component_retry_at: Option<Instant>,
    st: St,
    /// Bumped at every start; events of older runs are ignored.
    generation: Arc<AtomicU64>,
    signaller: Option<Signaller>,
    pid: Option<i32>,
    restarts: u32,
    failures_in_a_row: u32,
    started: Option<(Instant, u64)>,
    ready_deadline: Option<Instant>,
    /// While `up` waits: when this application must be ready at the latest, however often
    /// it restarts meanwhile.
    boot_deadline: Option<Instant>,
    next_start: Option<Instant>,
    last_exit: Option<i32>,
    setup_done: bool,
    /// Stopped because something it requires restarts: start again when that is ready.
    restart_after_stop: bool,
    /// Asked to stop for good (`down`).
    stop_for_good: bool,
}

enum Event {
    Exited {
        app: usize,
        generation: u64,
        code: i32,
    },
    Ready {
        app: usize,
        generation: u64,
    },
    Term,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Supervisor {
    layout: Layout,
    manifest: Manifest,
    apps: Vec<App>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    progress: Option<fs::File>,
    booting: bool,
    /// What `state.json` holds.
    last_state: Option<String>,
}

/// `shuttle __supervise MANIFEST FD`.
pub fn main(layout: &Layout, manifest_path: &Path, progress: Option<OwnedFd>) -> i32 {
    let mut progress = progress.map(fs::File::from);
    match run(layout, manifest_path, &mut progress) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shuttle-supervise: {e:#}");
            if let Some(p) = progress.as_mut() {
                let _ = writeln!(p, "error: {e:#}");
            }
            1
        }
    }
}

fn run(layout: &Layout, manifest_path: &Path, progress: &mut Option<fs::File>) -> Result<()> {
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_name(c"shuttle-system");
    let manifest = Manifest::load(manifest_path).map_err(|e| anyhow!("{e}"))?;
    let dir = runtime_dir(layout, &manifest.name);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::create_dir_all(log_dir(layout, &manifest.name))?;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_file(layout, &manifest.name))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| anyhow!("system {} is already up", manifest.name))?;
    let (events_tx, events) = mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
        .context("installing signal handlers")?;
    let term_tx = events_tx.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = term_tx.send(Event::Term);
        }
    });
    let log_max = log_max();
    let apps = manifest
        .apps
        .iter()
        .map(|spec| App {
            spec: spec.clone(),
            log: Arc::new(std::sync::Mutex::new(AppLog::new(
                app_log(layout, &manifest.name, &spec.id()),
                log_max,
            ))),
            component_deadline: None,
            component_retry_at: None,
            st: St::Waiting,
            generation: Arc::new(AtomicU64::new(0)),
            signaller: None,
            pid: None,
            restarts: 0,
            failures_in_a_row: 0,
            started: None,
            ready_deadline: None,
            boot_deadline: None,
            next_start: None,
            last_exit: None,
            setup_done: false,
            restart_after_stop: false,
            stop_for_good: false,
        })
        .collect();
    let mut sup = Supervisor {
        layout: layout.clone(),
        manifest,
        apps,
        events_tx,
        events,
        progress: progress.take(),
        booting: true,
        last_state: None,
    };
    let result = sup.serve();
    // The last output of stopped applications (a process they left behind may hold a pipe
    // open: not for long).
    let deadline = Instant::now() + Duration::from_secs(2);
    while RELAYS.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = fs::remove_file(state_file(layout, &sup.manifest.name));
    *progress = sup.progress.take();
    result
}

impl Supervisor {
    fn say(&mut self, line: String) {
        eprintln!("{line}");
        if let Some(p) = self.progress.as_mut() {
            let _ = writeln!(p, "{line}");
        }
    }

    fn note(&self, i: usize, line: &str) {
        let mut log = self.apps[i].log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = log.write(format!("[shuttle] {line}\n").as_bytes());
    }

    fn serve(&mut self) -> Result<()> {
        // Before any (possibly long) setup step: `down` finds the supervisor's pid here.
        self.write_state();
        loop {
            if let Err(e) = self.reconcile() {
                if self.booting {
                    self.stop_all();
                    return Err(e);
                }
                eprintln!("shuttle-supervise: {e:#}");
            }
            self.write_state();
            if self.booting
                && self
                    .apps
                    .iter()
                    .all(|a| a.st == St::Ready || (a.st == St::Exited && a.last_exit == Some(0)))
            {
                self.booting = false;
                self.say("ok".into());
                // `up` has its answer: close the pipe.
                self.progress = None;
            }
            let event = match self.events.recv_timeout(PROBE_INTERVAL) {
                Ok(e) => e,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("event channel closed"),
            };
            match event {
                Event::Term => {
                    self.stop_all();
                    if self.booting {
                        bail!("stopped (SIGTERM) before every application was ready");
                    }
                    return Ok(());
                }
                Event::Ready { app, generation } => {
                    if self.current(app, generation) && self.apps[app].st == St::Starting {
                        let a = &mut self.apps[app];
                        a.st = St::Ready;
                        a.ready_deadline = None;
                        let (id, t) = (a.spec.id(), a.started.map(|s| s.0.elapsed()));
                        self.note(app, "ready");
                        if self.apps[app].restarts > 0 {
                            self.tell_dependents(app);
                        }
                        if self.booting {
                            self.say(format!(
                                "  {id:<24} ready ({} ms)",
                                t.unwrap_or_default().as_millis()
                            ));
                        }
                    }
                }
                Event::Exited {
                    app,
                    generation,
                    code,
                } => {
                    if self.current(app, generation) {
                        if let Err(e) = self.exited(app, code) {
                            self.stop_all();
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    fn current(&self, app: usize, generation: u64) -> bool {
        self.apps[app].generation.load(Ordering::SeqCst) == generation
    }

    /// Starts what can start, and enforces readiness deadlines.
    fn reconcile(&mut self) -> Result<()> {
        let now = Instant::now();
        for i in 0..self.apps.len() {
            match self.apps[i].st {
                St::Waiting => {
                    let a = &self.apps[i];
                    if self.booting && a.boot_deadline.is_some_and(|d| now > d) {
                        bail!(
                            "{} kept exiting (last status {}) and never became ready within {:?}; its log: {}",
                            a.spec.id(),
                            a.last_exit.unwrap_or_default(),
                            a.spec.ready_timeout,
                            app_log(&self.layout, &self.manifest.name, &a.spec.id()).display()
                        );
                    }
                    if a.next_start.is_some_and(|t| now < t) {
                        continue;
                    }
                    let deps_ready = self.apps[i].spec.requires.iter().all(|r| {
                        self.apps.iter().any(|a| {
                            a.spec.id() == *r
                                && (a.st == St::Ready
                                    || (a.st == St::Exited && a.last_exit == Some(0)))
                        })
                    });
                    if deps_ready {
                        if let Err(e) = self.start(i) {
                            if self.booting {
                                return Err(e);
                            }
                            // Its VM cannot start, a setup step failed, ...: try again later
                            // rather than every tick.
                            self.note(i, &format!("cannot start: {e:#}"));
                            eprintln!("shuttle-supervise: {}: {e:#}", self.apps[i].spec.id());
                            let a = &mut self.apps[i];
                            a.st = St::Waiting;
                            a.next_start = Some(Instant::now() + backoff(a.failures_in_a_row));
                            a.failures_in_a_row += 1;
                        }
                    }
                }
                St::Starting if self.apps[i].ready_deadline.is_some_and(|d| now > d) => {
                    let a = &self.apps[i];
                    let msg = format!(
                        "{} did not become ready within {:?} ({}); its log: {}",
                        a.spec.id(),
                        a.spec.ready_timeout,
                        describe_probe(a.spec.ready.as_ref()),
                        app_log(&self.layout, &self.manifest.name, &a.spec.id()).display()
                    );
                    if self.booting {
                        bail!(msg);
                    }
                    eprintln!("shuttle-supervise: {msg}; killing it");
                    self.note(i, "not ready in time: killing it");
                    self.apps[i].ready_deadline = None;
                    if let Some(s) = &self.apps[i].signaller {
                        let _ = s.signal(libc::SIGKILL);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn ensure_vm(&self, vm: &str) -> Result<()> {
        if store::is_running(&self.layout, vm) {
            return Ok(());
        }
        // A whole VM that went away is started again (through the broker, as `vm start`).
        let exe = std::env::current_exe()?;
        let chan = shuttle_broker::client::connect_or_start(&self.layout, &exe, "start a VM")?;
        match shuttle_broker::client::request(
            &chan,
            &shuttle_proto::BrokerRequest::VmStart { name: vm.into() },
        )? {
            shuttle_proto::BrokerReply::Done => {
                // Started by the system: `down` stops it.
                let name = &self.manifest.name;
                let mut record =
                    crate::system_cmd::read_up_record(&self.layout, name).unwrap_or_default();
                if !record.started.iter().any(|v| v == vm) {
                    record.started.push(vm.to_owned());
                    if let Err(e) = crate::system_cmd::write_up_record(&self.layout, name, &record)
                    {
                        eprintln!("shuttle-supervise: recording that VM {vm} was started: {e:#}");
                    }
                }
                Ok(())
            }
            // Someone else started it meanwhile: wait until it is ready.
            shuttle_proto::BrokerReply::Failed { .. } if store::is_running(&self.layout, vm) => Ok(
                client::wait_until_ready(&self.layout, vm, Duration::from_secs(30))?,
            ),
            shuttle_proto::BrokerReply::Failed { message } => bail!("starting VM {vm}: {message}"),
            other => bail!("the broker answered unexpectedly: {other:?}"),
        }
    }

    fn log_fd(&self, i: usize) -> Result<OwnedFd> {
        log_pipe(&self.apps[i].log).context("making the pipe of an application's log")
    }

    /// Runs `argv` in VM `vm` to completion, output to the application's log.
    fn run_to_end(&self, i: usize, argv: &[String], user: Option<&str>) -> Result<i32> {
        let log = self.log_fd(i)?;
        let null = fs::File::open("/dev/null")?;
        let spec = &self.apps[i].spec;
        let cmd = command_spec(argv, user, spec.workdir.as_deref(), &spec.env);
        let session = client::run(
            &self.layout,
            &spec.vm,
            cmd,
            &[null.as_fd(), log.as_fd(), log.as_fd()],
        )?;
        Ok(session.wait()?.shell_code())
    }

    fn setup(&mut self, i: usize) -> Result<()> {
        let steps = self.apps[i].spec.setup.clone();
        let id = self.apps[i].spec.id();
        for (n, step) in steps.iter().enumerate() {
            if let Some(path) = &step.creates {
                let probe = [
                    SHUTTLE_IN_VM.to_owned(),
                    "__probe".into(),
                    "--exists".into(),
                    path.clone(),
                ];
                if self.run_to_end(i, &probe, None)? == 0 {
                    continue;
                }
            }
            self.note(
                i,
                &format!("setup step {}: {}", n + 1, step.command.join(" ")),
            );
            self.say(format!("  {id:<24} setup: {}", step.command.join(" ")));
            let code = self.run_to_end(i, &step.command, step.user.as_deref())?;
            if code != 0 {
                bail!(
                    "setup step {} of {id} ({}) failed with status {code}; its log: {}",
                    n + 1,
                    step.command.join(" "),
                    app_log(&self.layout, &self.manifest.name, &id).display()
                );
            }
        }
        self.apps[i].setup_done = true;
        Ok(())
    }

    /// Whether the components of application `i`'s VM are in place: each one mounted in the
    /// VM, and the providing application, if the component names one, ready. Errors once
    /// the application's `ready_timeout` has passed waiting for them.
    fn components_ready(&mut self, i: usize) -> Result<bool> {
        let vm = self.apps[i].spec.vm.clone();
        let components = self.manifest.components_of(&vm).to_vec();
        if components.is_empty() {
            return Ok(true);
        }
        let ready = |id: &str| {
            self.apps.iter().any(|a| {
                a.spec.id() == id
                    && (a.st == St::Ready || (a.st == St::Exited && a.last_exit == Some(0)))
            })
        };
        let init = client::status(&self.layout, &vm).map(|s| s.init_pid).ok();
        let mountinfo = init
            .and_then(|pid| fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok())
            .unwrap_or_default();
        let mut missing = Vec::new();
        let mut unmounted = false;
        for c in &components {
            if let Some(app) = c.app.as_deref().filter(|a| !ready(a)) {
                missing.push(format!("{app} to be ready"));
            } else if !mounted(&mountinfo, &c.at) {
                missing.push(format!("{}:{} at {}", c.vm, c.path, c.at));
                unmounted = true;
            }
        }
        let now = Instant::now();
        let a = &mut self.apps[i];
        if missing.is_empty() {
            a.component_deadline = None;
            a.component_retry_at = None;
            return Ok(true);
        }
        let first = a.component_deadline.is_none();
        let deadline = *a
            .component_deadline
            .get_or_insert(now + a.spec.ready_timeout);
        let id = a.spec.id();
        let timeout = a.spec.ready_timeout;
        if now > deadline {
            a.component_deadline = None;
            bail!(
                "{id} waited {timeout:?} for its components and still misses {}: is the \
                 directory there in the providing VM? `shuttle audit --vm {vm}` shows why a \
                 share was refused",
                missing.join(", ")
            );
        }
        if unmounted && a.component_retry_at.is_none_or(|t| now >= t) {
            // A share refused because the directory was not there yet (the provider's
            // application or `files` make it) is only tried again when asked.
            if let Err(e) = crate::policy_cmd::reapply(&self.layout, std::slice::from_ref(&vm)) {
                eprintln!("shuttle-supervise: settling the shares of VM {vm} again: {e:#}");
            }
            a.component_retry_at = Some(now + COMPONENT_RETRY);
        }
        if first {
            let line = format!("waiting for {}", missing.join(", "));
            self.note(i, &line);
            if self.booting {
                self.say(format!("  {id:<24} {line}"));
            }
        }
        Ok(false)
    }

    fn start(&mut self, i: usize) -> Result<()> {
        let vm = self.apps[i].spec.vm.clone();
        self.ensure_vm(&vm)?;
        if !self.components_ready(i)? {
            // Stays waiting: the next tick looks again (the wait has its own deadline).
            return Ok(());
        }
        if self.apps[i].boot_deadline.is_none() {
            self.apps[i].boot_deadline = Some(Instant::now() + self.apps[i].spec.ready_timeout);
        }
        if !self.apps[i].setup_done {
            self.setup(i)?;
        }
        let generation = self.apps[i].generation.fetch_add(1, Ordering::SeqCst) + 1;
        let log = self.log_fd(i)?;
        let null = fs::File::open("/dev/null")?;
        let spec = self.apps[i].spec.clone();
        let id = spec.id();
        let cmd = command_spec(
            &spec.command,
            spec.user.as_deref(),
            spec.workdir.as_deref(),
            &spec.env,
        );
        let started = client::run(
            &self.layout,
            &vm,
            cmd,
            &[null.as_fd(), log.as_fd(), log.as_fd()],
        );
        let session = match started {
            Ok(s) => s,
            Err(e) if self.booting => {
                // Not found, a bad user, ...: restarting would not help.
                bail!(
                    "cannot start {id}: {e}; its log: {}",
                    app_log(&self.layout, &self.manifest.name, &id).display()
                );
            }
            Err(e) => {
                // Could not even start (not found, bad user, ...): an exit like any other.
                let code = match &e {
                    client::ClientError::CommandFailed { exit_code, .. } => *exit_code,
                    _ => 125,
                };
                self.note(i, &format!("cannot start: {e}"));
                let _ = self.events_tx.send(Event::Exited {
                    app: i,
                    generation,
                    code,
                });
                self.apps[i].st = St::Starting;
                self.apps[i].started = Some((Instant::now(), now_unix()));
                return Ok(());
            }
        };
        let a = &mut self.apps[i];
        a.pid = Some(session.pid);
        a.signaller = session.signaller().ok();
        a.started = Some((Instant::now(), now_unix()));
        a.next_start = None;
        let tx = self.events_tx.clone();
        std::thread::spawn(move || {
            let code = match session.wait() {
                Ok(status) => status.shell_code(),
                // The VM (or its monitor) went away under it.
                Err(_) => 137,
            };
            let _ = tx.send(Event::Exited {
                app: i,
                generation,
                code,
            });
        });
        let pid = a.pid.unwrap_or(0);
        self.note(i, &format!("started (pid {pid} in VM {vm})"));
        if self.booting {
            self.say(format!("  {id:<24} started in VM {vm}"));
        }
        match spec.ready.clone() {
            None => {
                self.apps[i].st = St::Ready;
                if self.apps[i].restarts > 0 {
                    self.tell_dependents(i);
                }
                if self.booting {
                    self.say(format!("  {id:<24} ready (no readiness probe)"));
                }
            }
            Some(probe) => {
                let a = &mut self.apps[i];
                a.st = St::Starting;
                a.ready_deadline = Some(Instant::now() + spec.ready_timeout);
                let layout = self.layout.clone();
                let tx = self.events_tx.clone();
                let current = Arc::clone(&a.generation);
                let (user, workdir, env) = (spec.user.clone(), spec.workdir.clone(), spec.env);
                std::thread::spawn(move || {
                    while current.load(Ordering::SeqCst) == generation {
                        let ok = match &probe {
                            Probe::Socket(path) => {
                                vm_listens(&layout, &vm, |net| unix_listening(net, path))
                            }
                            Probe::Port(port) => {
                                vm_listens(&layout, &vm, |net| tcp_listening(net, *port))
                            }
                            Probe::Command(argv) => probe_command(
                                &layout,
                                &vm,
                                argv,
                                user.as_deref(),
                                workdir.as_deref(),
                                &env,
                            ),
                        };
                        if ok {
                            let _ = tx.send(Event::Ready { app: i, generation });
                            return;
                        }
                        std::thread::sleep(PROBE_INTERVAL);
                    }
                });
            }
        }
        Ok(())
    }

    fn exited(&mut self, i: usize, code: i32) -> Result<()> {
        let id = self.apps[i].spec.id();
        let log = app_log(&self.layout, &self.manifest.name, &id);
        let ran_for = self.apps[i]
            .started
            .map(|s| s.0.elapsed())
            .unwrap_or_default();
        let was = self.apps[i].st;
        {
            let a = &mut self.apps[i];
            a.signaller = None;
            a.pid = None;
            a.last_exit = Some(code);
            a.ready_deadline = None;
        }
        self.note(i, &format!("exited with status {code}"));
        if was == St::Stopping {
            let a = &mut self.apps[i];
            a.st = if a.restart_after_stop && !a.stop_for_good {
                St::Waiting
            } else {
                St::Exited
            };
            a.restart_after_stop = false;
            return Ok(());
        }
        let restart = self.apps[i].spec.restart.restarts(code);
        if !restart {
            self.apps[i].st = if code == 0 { St::Exited } else { St::Failed };
            if self.booting && was == St::Starting {
                bail!(
                    "{id} exited with status {code} before it was ready; its log: {}",
                    log.display()
                );
            }
            if self.booting && code != 0 {
                bail!(
                    "{id} failed (status {code}) while the system came up; its log: {}",
                    log.display()
                );
            }
            return Ok(());
        }
        if self.booting && was == St::Starting {
            // Still within its readiness deadline: try again.
            if self.apps[i]
                .boot_deadline
                .is_some_and(|d| Instant::now() > d)
            {
                bail!(
                    "{id} kept exiting (last status {code}) and never became ready; its log: {}",
                    log.display()
                );
            }
        }
        let a = &mut self.apps[i];
        if ran_for >= BACKOFF_RESET_AFTER {
            a.failures_in_a_row = 0;
        }
        let backoff = backoff(a.failures_in_a_row);
        a.failures_in_a_row += 1;
        a.restarts += 1;
        a.st = St::Waiting;
        a.next_start = Some(Instant::now() + backoff);
        self.note(i, &format!("restarting in {} ms", backoff.as_millis()));
        eprintln!(
            "shuttle-supervise: {id} exited with status {code}; restarting in {} ms",
            backoff.as_millis()
        );
        // Dependents that asked to follow their dependencies restart once it is ready again.
        for d in self.transitive_restart_dependents(&id) {
            if matches!(self.apps[d].st, St::Ready | St::Starting) {
                self.note(d, &format!("stopping: {id} restarts"));
                let a = &mut self.apps[d];
                a.st = St::Stopping;
                a.restart_after_stop = true;
                a.restarts += 1;
                if let Some(s) = &a.signaller {
                    let _ = s.signal(libc::SIGTERM);
                }
            }
        }
        Ok(())
    }

    /// Sends their signal to the running dependents that asked to be told when `app` is
    /// ready again after a restart (`on_dependency_restart = "signal:NAME"`).
    fn tell_dependents(&self, app: usize) {
        let id = self.apps[app].spec.id();
        for (j, a) in self.apps.iter().enumerate() {
            let DependencyRestart::Signal(sig) = a.spec.on_dependency_restart else {
                continue;
            };
            if !a.spec.requires.contains(&id) || !matches!(a.st, St::Ready | St::Starting) {
                continue;
            }
            if let Some(s) = &a.signaller {
                let _ = s.signal(sig);
                self.note(
                    j,
                    &format!("told with signal {sig}: {id} restarted and is ready"),
                );
            }
        }
    }

    fn transitive_restart_dependents(&self, id: &str) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        let mut todo = vec![id.to_owned()];
        while let Some(cur) = todo.pop() {
            for (j, a) in self.apps.iter().enumerate() {
                if a.spec.on_dependency_restart == DependencyRestart::Restart
                    && a.spec.requires.contains(&cur)
                    && !out.contains(&j)
                {
                    out.push(j);
                    todo.push(a.spec.id());
                }
            }
        }
        out
    }

    /// Stops every running application, dependents first (reverse start order), each with
    /// SIGTERM and SIGKILL after its `stop_timeout`.
    fn stop_all(&mut self) {
        for i in (0..self.apps.len()).rev() {
            self.apps[i].stop_for_good = true;
            self.apps[i].next_start = None;
            if self.apps[i].signaller.is_none() {
                if self.apps[i].st == St::Waiting {
                    self.apps[i].st = St::Exited;
                }
                continue;
            }
            let id = self.apps[i].spec.id();
            self.apps[i].st = St::Stopping;
            self.note(i, "stopping (SIGTERM)");
            if let Some(s) = &self.apps[i].signaller {
                let _ = s.signal(libc::SIGTERM);
            }
            let deadline = Instant::now() + self.apps[i].spec.stop_timeout;
            let mut killed = false;
            while self.apps[i].signaller.is_some() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() && !killed {
                    self.note(i, "did not stop in time: SIGKILL");
                    if let Some(s) = &self.apps[i].signaller {
                        let _ = s.signal(libc::SIGKILL);
                    }
                    killed = true;
                }
                let wait = if killed { Duration::from_secs(5) } else { left };
                match self
                    .events
                    .recv_timeout(wait.max(Duration::from_millis(10)))
                {
                    Ok(Event::Exited {
                        app,
                        generation,
                        code,
                    }) if self.current(app, generation) => {
                        let _ = self.exited(app, code);
                    }
                    Ok(_) => {}
                    Err(mpsc::RecvTimeoutError::Timeout) if killed => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            eprintln!("shuttle-supervise: {id} stopped");
            self.write_state();
        }
    }

    fn write_state(&mut self) {
        let state = SystemState {
            system: self.manifest.name.clone(),
            manifest: self.manifest.file.clone(),
            supervisor_pid: std::process::id(),
            apps: self
                .apps
                .iter()
                .map(|a| {
                    let running = matches!(a.st, St::Starting | St::Ready | St::Stopping);
                    let st = if a.st == St::Waiting && a.next_start.is_some() {
                        "backoff"
                    } else {
                        a.st.name()
                    };
                    AppRow {
                        id: a.spec.id(),
                        vm: a.spec.vm.clone(),
                        state: st.into(),
                        pid: a.pid,
                        restarts: a.restarts,
                        started_at: running.then(|| a.started.map(|s| s.1)).flatten(),
                        last_exit: a.last_exit,
                        log: app_log(&self.layout, &self.manifest.name, &a.spec.id())
                            .display()
                            .to_string(),
                    }
                })
                .collect(),
        };
        let path = state_file(&self.layout, &self.manifest.name);
        let tmp = path.with_extension("json.tmp");
        let Ok(text) = serde_json::to_string_pretty(&state) else {
            return;
        };
        // Called at every tick; the file changes only when something happened.
        if self.last_state.as_ref() == Some(&text) {
            return;
        }
        if fs::write(&tmp, &text).is_ok() && fs::rename(&tmp, &path).is_ok() {
            self.last_state = Some(text);
        }
    }
}

/// The wait before the next start after `failures` failures in a row: 0.5 s, doubling, at
/// most 30 s.
fn backoff(failures: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(1u32 << failures.min(6))
        .min(BACKOFF_MAX)
}

fn describe_probe(p: Option<&Probe>) -> String {
    match p {
        Some(Probe::Socket(s)) => format!("nothing listened on unix socket {s}"),
        Some(Probe::Port(p)) => format!("nothing listened on TCP port {p}"),
        Some(Probe::Command(c)) => format!("`{}` never succeeded", c.join(" ")),
        None => "no probe".into(),
    }
}

pub fn command_spec(
    argv: &[String],
    user: Option<&str>,
    workdir: Option<&str>,
    env: &[(String, String)],
) -> CommandSpec {
    let mut e: Vec<(Bytes, Bytes)> = vec![(Bytes::from("PATH"), Bytes::from(PATH))];
    for (k, v) in env {
        e.retain(|(key, _)| key.as_bytes() != k.as_bytes());
        e.push((Bytes::from(k.as_str()), Bytes::from(v.as_str())));
    }
    CommandSpec {
        argv: argv.iter().map(|a| Bytes::from(a.as_str())).collect(),
        env: e,
        cwd: workdir.map(Bytes::from),
        user: user.map(str::to_owned),
        terminal: None,
    }
}

/// Reads the kernel's socket tables of the VM's network namespace through its init's
/// `/proc/PID/net` (no process runs in the VM, and no `connect` is made that the VM's
/// monitor would have to judge and audit).
fn vm_listens(layout: &Layout, vm: &str, check: impl Fn(&Path) -> bool) -> bool {
    match client::status(layout, vm) {
        Ok(s) => check(&PathBuf::from(format!("/proc/{}/net", s.init_pid))),
        Err(_) => false,
    }
}

/// Whether something is mounted at `path` according to a `/proc/PID/mountinfo` (the fifth
/// field, with spaces, tabs, newlines and backslashes octal-escaped as the kernel writes
/// them; read for the VM's init, so paths are the VM's own).
pub fn mounted(mountinfo: &str, path: &str) -> bool {
    let escaped = path
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(escaped.as_str()))
}

/// Whether a listening unix socket is bound at `path` (`/proc/net/unix`: flags 00010000 is
/// `__SO_ACCEPTCON`, a listening socket; the path is the last field).
pub fn unix_listening(net: &Path, path: &str) -> bool {
    let Ok(text) = fs::read_to_string(net.join("unix")) else {
        return false;
    };
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[3] == "00010000" && f[7] == path
    })
}

/// Whether a TCP socket listens on `port` (`/proc/net/tcp{,6}`: state 0A is LISTEN).
pub fn tcp_listening(net: &Path, port: u16) -> bool {
    let want = format!("{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(net.join(f)).is_ok_and(|text| {
            text.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[3] == "0A" && f[1].rsplit(':').next() == Some(want.as_str())
            })
        })
    })
}

fn probe_command(
    layout: &Layout,
    vm: &str,
    argv: &[String],
    user: Option<&str>,
    workdir: Option<&str>,
    env: &[(String, String)],
) -> bool {
    let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return false;
    };
    let cmd = command_spec(argv, user, workdir, env);
    match client::run(layout, vm, cmd, &[null.as_fd(), null.as_fd(), null.as_fd()]) {
        Ok(s) => s.wait().is_ok_and(|st| st.shell_code() == 0),
        Err(_) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_limit() {
        let ms: Vec<u128> = (0..9).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(
            ms,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn mount_points_are_found_in_mountinfo() {
        let info = "36 35 0:31 / / rw,relatime - overlay overlay rw\n\
                    40 36 0:31 /srv/site /var/www ro,nosuid,nodev - overlay overlay rw\n\
                    41 36 0:31 /x /opt/my\\040docs ro - overlay overlay rw\n";
        assert!(mounted(info, "/var/www"));
        assert!(mounted(info, "/opt/my docs"));
        assert!(!mounted(info, "/var"));
        assert!(!mounted(info, "/srv/site"));
    }

    #[test]
    fn logs_rotate_at_their_bound_keeping_one_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.b.log");
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        let mut log = AppLog::new(path.clone(), 12);
        log.write(b"12345\n").unwrap();
        log.write(b"6789\n").unwrap();
        assert_eq!(read(&path), "12345\n6789\n");
        log.write(b"abc\n").unwrap();
        assert_eq!(read(&previous_log(&path)), "12345\n6789\n");
        assert_eq!(read(&path), "abc\n");
        // A chunk larger than the bound is split after its last whole line that fits.
        log.write(b"12345\n12345\n12345\n").unwrap();
        assert_eq!(read(&previous_log(&path)), "12345\n12345\n");
        assert_eq!(read(&path), "12345\n");
        // A line longer than the bound is cut at the bound.
        log.write(b"abcdefghijklmnopqrstuvwxyz").unwrap();
        assert_eq!(read(&previous_log(&path)), "mnopqrstuvwx");
        assert_eq!(read(&path), "yz");
        // A new supervisor carries on with the size on disk.
        let mut again = AppLog::new(path.clone(), 12);
        again.write(b"0123456789\n").unwrap();
        assert_eq!(read(&previous_log(&path)), "yz");
        assert_eq!(read(&path), "0123456789\n");
    }

    #[test]
    fn socket_tables_are_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("unix"),
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 1234 /run/postgresql/.s.PGSQL.5432\n\
             0000000000000000: 00000002 00000000 00000000 0001 03 1235 /run/other.sock\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("tcp"),
            "  sl  local_address rem_address   st\n   0: 0100007F:1F90 00000000:0000 0A 0\n   1: 0100007F:0050 0100007F:9999 01 0\n",
        )
        .unwrap();
        assert!(unix_listening(dir.path(), "/run/postgresql/.s.PGSQL.5432"));
        assert!(!unix_listening(dir.path(), "/run/other.sock"));
        assert!(tcp_listening(dir.path(), 8080));
        assert!(!tcp_listening(dir.path(), 80));
    }
}
