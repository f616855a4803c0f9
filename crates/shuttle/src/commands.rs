//! What each subcommand does, and how its result is shown.

use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use shuttle_proto::{BrokerReply, BrokerRequest, Bytes, CommandSpec, VmCreateSpec};
use shuttle_vm::client::{self, ClientError};
use shuttle_vm::store::{self, StoreError};
use shuttle_vm::{Base, Layout, NetMode, VmConfig, VmOptions};

use crate::cli::{Cli, Command, CreateArgs, RunArgs, VmCommand};
use crate::terminal_io;

/// Exit status when shuttle itself fails (as container tools do, so that it is not confused
/// with a command's own status).
pub(crate) const EXIT_SHUTTLE_FAILED: i32 = 125;

/// Environment variables passed from the caller to `shuttle run` commands by default.
const PASSED_ENV: &[&str] = &["TERM", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "COLORTERM"];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHUTTLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: monitors and the broker log to files (`run/vms/NAME.log`),
    // where escape sequences only get in the way of reading and searching.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

pub fn dispatch(cli: Cli) -> i32 {
    let layout = Layout::from_env();
    if let Command::Monitor { name, ready_fd } = &cli.command {
        init_logging("info");
        let ready = shuttle_sys::fdpass::own_inherited(*ready_fd);
        // Nothing else the monitor inherited may stay open in it (or in the VM it forks).
        let keep: Vec<i32> = ready.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        if let Err(e) = shuttle_sys::process::close_descriptors_except(&keep) {
            eprintln!("shuttle: closing inherited descriptors: {e}");
            return EXIT_SHUTTLE_FAILED;
        }
        return shuttle_vm::monitor::main(&layout, name, ready);
    }
    if let Command::Probe {
        socket,
        port,
        exists,
    } = &cli.command
    {
        return crate::system_cmd::probe(socket.as_deref(), *port, exists.as_deref());
    }
    if let Command::Supervise { manifest, ready_fd } = &cli.command {
        init_logging("info");
        let progress = shuttle_sys::fdpass::own_inherited(*ready_fd);
        let keep: Vec<i32> = progress
            .iter()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .collect();
        if let Err(e) = shuttle_sys::process::close_descriptors_except(&keep) {
            eprintln!("shuttle: closing inherited descriptors: {e}");
            return EXIT_SHUTTLE_FAILED;
        }
        return crate::supervise::main(&layout, manifest, progress);
    }
    init_logging(if matches!(cli.command, Command::Daemon { .. }) {
        "info"
    } else {
        "warn"
    });
    let result = match cli.command {
        Command::Vm(vm) => vm_command(&layout, vm).map(|()| 0),
        Command::Run(args) => run(&layout, args),
        Command::Policy(cmd) => crate::policy_cmd::run(&layout, cmd),
        Command::Daemon {
            ready_fd,
            stop: false,
        } => crate::broker_cmd::daemon(&layout, ready_fd),
        Command::Daemon { stop: true, .. } => crate::broker_cmd::stop_daemon(&layout),
        Command::Audit(args) => crate::broker_cmd::audit(&layout, args),
        Command::Pending { json } => crate::broker_cmd::pending(&layout, json),
        Command::Answer {
            id,
            answer,
            remember,
        } => crate::broker_cmd::answer(&layout, id, &answer, remember.as_deref()),
        Command::Signal {
            vm,
            program,
            signal,
        } => crate::broker_cmd::signal(&vm, &program, &signal),
        Command::Invoke { program, args } => crate::invoke_cmd::invoke(program, args),
        Command::Up { file } => crate::system_cmd::up(&layout, &file),
        Command::Down { file } => crate::system_cmd::down(&layout, &file),
        Command::Ps { json } => crate::system_cmd::ps(&layout, json),
        Command::Logs { app, follow } => crate::system_cmd::logs(&layout, &app, follow),
        Command::Graph(args) => crate::graph_cmd::graph(&layout, &args),
        Command::Monitor { .. } | Command::Supervise { .. } | Command::Probe { .. } => Ok(0),
        Command::Open { target } => crate::invoke_cmd::open(target),
        Command::Path { target, json } => path(&layout, &target, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let code = match e.downcast_ref::<ClientError>() {
                Some(ClientError::CommandFailed { exit_code, .. }) => *exit_code,
                _ => EXIT_SHUTTLE_FAILED,
            };
            eprintln!("shuttle: {}", crate::report::error_line(&e));
            code
        }
    }
}

/// Managing VMs needs root (namespaces, mounts, cgroups); say so before anything happens.
pub(crate) fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("managing VMs needs root (namespaces, mounts and cgroups): run shuttle as root, for example with sudo");
    }
    Ok(())
}

/// Kernel features a VM needs that a host may lack.
pub(crate) fn require_kernel_features() -> Result<()> {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        bail!("this kernel has no overlayfs: load it with `modprobe overlay` (or use a kernel built with CONFIG_OVERLAY_FS)");
    }
    if !std::path::Path::new("/proc/sys/kernel/seccomp/actions_avail").exists() {
        bail!("this kernel has no seccomp filter support (CONFIG_SECCOMP_FILTER): Shuttle cannot harden VMs without it");
    }
    Ok(())
}

pub(crate) fn shuttle_exe() -> Result<std::path::PathBuf> {
    std::env::current_exe().context("cannot find the shuttle binary to start the VM's monitor")
}

fn vm_command(layout: &Layout, cmd: VmCommand) -> Result<()> {
    match cmd {
        VmCommand::Create(args) => create(layout, args),
        VmCommand::Ls { json } => list(layout, json),
        VmCommand::Start { name } => {
            require_root()?;
            require_kernel_features()?;
            store::load(layout, &name)?;
            let t = std::time::Instant::now();
            lifecycle(
                layout,
                BrokerRequest::VmStart { name: name.clone() },
                "start a VM",
            )?;
            eprintln!("VM {name} started in {} ms", t.elapsed().as_millis());
            Ok(())
        }
        VmCommand::Stop { name, timeout } => {
            require_root()?;
            store::load(layout, &name)?;
            if !store::is_running(layout, &name) {
                bail!(ClientError::NotRunning(name));
            }
            let grace_ms = timeout.saturating_mul(1000);
            lifecycle(
                layout,
                BrokerRequest::VmStop {
                    name: name.clone(),
                    grace_ms,
                },
                "stop a VM",
            )?;
            eprintln!("VM {name} stopped");
            Ok(())
        }
        VmCommand::Rm { name, force } => {
            require_root()?;
            match store::load(layout, &name) {
                Ok(_) | Err(StoreError::Damaged { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            if store::is_running(layout, &name) && !force {
                bail!(StoreError::Running(name));
            }
            lifecycle(
                layout,
                BrokerRequest::VmRemove {
                    name: name.clone(),
                    force,
                },
                "remove a VM",
            )?;
            eprintln!("VM {name} removed");
            Ok(())
        }
    }
}

/// Has the broker carry out a lifecycle request (starting the broker first if needed).
/// Preconditions the user can fix are checked before, so bad input starts nothing.
pub(crate) fn lifecycle(layout: &Layout, req: BrokerRequest, purpose: &'static str) -> Result<()> {
    let chan = shuttle_broker::client::connect_or_start(layout, &shuttle_exe()?, purpose)?;
    match shuttle_broker::client::request(&chan, &req)? {
        BrokerReply::Done => Ok(()),
        BrokerReply::Failed { message } => bail!("{message}"),
        other => bail!("the broker answered unexpectedly: {other:?}"),
    }
}

fn create(layout: &Layout, args: CreateArgs) -> Result<()> {
    require_root()?;
    require_kernel_features()?;
    let options = VmOptions {
        name: args.name,
        base: Some(args.base),
        net: Some(args.net),
        memory: args.memory,
        pids: args.pids,
        hide: args.hide,
        tags: args.tag,
    };
    // Validated here first: bad input gets its error without starting anything.
    options.validate(0)?;
    let spec = VmCreateSpec {
        name: options.name.clone(),
        base: options.base.clone(),
        net: options.net.clone(),
        memory: options.memory.clone(),
        pids: options.pids,
        hide: options
            .hide
            .iter()
            .map(|h| h.display().to_string())
            .collect(),
        tags: options.tags.clone(),
    };
    if layout.vm_dir(&options.name).exists() {
        bail!(StoreError::Exists(options.name));
    }
    lifecycle(layout, BrokerRequest::VmCreate(spec), "create a VM")?;
    let config = store::load(layout, &options.name)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&VmRow::new(layout, config))?
        );
    } else {
        eprintln!(
            "VM {} created; run a command in it with `shuttle run {} -- CMD`",
            config.name, config.name
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct VmRow {
    name: String,
    state: &'static str,
    base: String,
    net: &'static str,
    memory_bytes: Option<u64>,
    pids: Option<u64>,
    hide: Vec<String>,
    tags: Vec<String>,
    created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    init_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    monitor_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<u64>,
    /// Calls the monitor intercepted since the VM started, by outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    intercepted: Option<shuttle_proto::InterceptCounts>,
}

impl VmRow {
    fn new(layout: &Layout, c: VmConfig) -> VmRow {
        let running = store::is_running(layout, &c.name);
        let status = if running {
            client::status(layout, &c.name).ok()
        } else {
            None
        };
        VmRow {
            state: if running { "running" } else { "stopped" },
            base: match &c.base {
                Base::Host => "host".into(),
                Base::Dir(d) => d.display().to_string(),
            },
            net: match c.net {
                NetMode::None => "none",
                NetMode::Host => "host",
            },
            memory_bytes: c.memory_bytes,
            pids: c.pids,
            hide: c.hide.iter().map(|h| h.display().to_string()).collect(),
            tags: c.tags,
            created_at: c.created_at,
            init_pid: status.as_ref().map(|s| s.init_pid),
            monitor_pid: status.as_ref().map(|s| s.monitor_pid),
            started_at: status.as_ref().map(|s| s.started_at),
            intercepted: status.as_ref().map(|s| s.intercepted),
            name: c.name,
        }
    }
}

fn human_size(bytes: u64) -> String {
    const UNITS: &[(u64, &str)] = &[
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (size, unit) in UNITS {
        if bytes >= *size && bytes.is_multiple_of(*size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

fn list(layout: &Layout, json: bool) -> Result<()> {
    let mut rows = Vec::new();
    for entry in store::list(layout)? {
        match entry {
            Ok(c) => rows.push(VmRow::new(layout, c)),
            Err(e) => eprintln!("shuttle: {e}"),
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    if rows.is_empty() {
        eprintln!("no VMs yet: create one with `shuttle vm create NAME`");
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<8} {:<6} {:<8} {:<6} {:<10} BASE",
        "NAME", "STATE", "NET", "MEMORY", "PIDS", "TAGS"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<20} {:<8} {:<6} {:<8} {:<6} {:<10} {}",
            r.name,
            r.state,
            r.net,
            r.memory_bytes.map(human_size).unwrap_or_else(|| "-".into()),
            r.pids.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            if r.tags.is_empty() {
                "-".into()
            } else {
                r.tags.join(",")
            },
            r.base
        )?;
    }
    Ok(())
}

fn command_env(args: &RunArgs) -> Result<Vec<(Bytes, Bytes)>> {
    let mut env: Vec<(Bytes, Bytes)> = vec![(Bytes::from("PATH"), Bytes::from(DEFAULT_PATH))];
    let mut set = |k: &str, v: Bytes| {
        env.retain(|(key, _)| key.as_bytes() != k.as_bytes());
        env.push((Bytes::from(k), v));
    };
    for k in PASSED_ENV {
        if let Some(v) = std::env::var_os(k) {
            set(k, Bytes::from(v.as_os_str()));
        }
    }
    for e in &args.env {
        let (k, v) = match e.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (e.as_str(), None),
        };
        if k.is_empty() || k.contains('\0') {
            bail!("invalid --env {e:?}: use KEY=VALUE, or KEY to pass this shell's value");
        }
        match v {
            Some(v) => set(k, Bytes::from(v)),
            None => {
                if let Some(v) = std::env::var_os(k) {
                    set(k, Bytes::from(v.as_os_str()))
                }
            }
        }
    }
    Ok(env)
}

/// Signals that `shuttle run` passes on to the command instead of dying of them.
pub(crate) const FORWARDED_SIGNALS: &[i32] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

fn run(layout: &Layout, args: RunArgs) -> Result<i32> {
    // Inside a VM there is no state directory to read and no monitor socket to reach: the
    // VM's own API socket carries the request, and the VM is the socket's.
    if crate::invoke_cmd::inside_vm() {
        let env = command_env(&args)?;
        return crate::invoke_cmd::run_in_vm(args.name, args.command, env, args.workdir, args.user);
    }
    require_root()?;
    let Some(name) = args.name.clone() else {
        bail!("name the VM to run in: shuttle run VM -- CMD");
    };
    let config = store::load(layout, &name)?;
    // Catch forwarded signals from now on, so one that arrives while the VM starts is
    // delivered once the command runs rather than killing shuttle.
    let signals = signal_hook::iterator::Signals::new(FORWARDED_SIGNALS)
        .context("installing signal handlers")?;
    if !store::is_running(layout, &name) {
        if args.no_start {
            bail!(ClientError::NotRunning(name));
        }
        require_kernel_features()?;
        let started = lifecycle(
            layout,
            BrokerRequest::VmStart {
                name: config.name.clone(),
            },
            "start a VM",
        );
        if let Err(e) = started {
            // Someone else started it meanwhile: wait until it is ready rather than fail.
            if !store::is_running(layout, &name) {
                return Err(e);
            }
            client::wait_until_ready(layout, &name, Duration::from_secs(60))?;
        }
    }
    let command = CommandSpec {
        argv: args
            .command
            .iter()
            .map(|a| Bytes::from(a.as_os_str()))
            .collect(),
        env: command_env(&args)?,
        cwd: args.workdir.as_ref().map(|w| Bytes::from(w.as_os_str())),
        user: args.user.clone(),
        terminal: None,
    };
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let done = Arc::new(AtomicBool::new(false));
    let mut relays = Vec::new();
    let mut command = command;
    // Never hand a terminal to the VM (see terminal_io.rs): a pseudo-terminal of the VM's own
    // when stdin is one; pipes copied to it when only stdout or stderr is one.
    let pty_mode = stdin.is_terminal();
    if pty_mode {
        command.terminal = Some(terminal_io::size_of(stdin.as_fd()));
    }
    let mut out_pipe = None;
    let mut err_pipe = None;
    if !pty_mode && stdout.is_terminal() {
        let (w, relay) = terminal_io::output_pipe(std::io::stdout(), Arc::clone(&done))?;
        out_pipe = Some(w);
        relays.push(relay);
    }
    if !pty_mode && stderr.is_terminal() {
        let (w, relay) = terminal_io::output_pipe(std::io::stderr(), Arc::clone(&done))?;
        err_pipe = Some(w);
        relays.push(relay);
    }
    let stdio: Vec<BorrowedFd<'_>> = if pty_mode {
        Vec::new()
    } else {
        vec![
            stdin.as_fd(),
            out_pipe.as_ref().map_or(stdout.as_fd(), |w| w.as_fd()),
            err_pipe.as_ref().map_or(stderr.as_fd(), |w| w.as_fd()),
        ]
    };
    let session = match client::run(layout, &name, command.clone(), &stdio) {
        // Its lock is held but its socket is not there yet: another `run` or `vm start` is
        // still setting the VM up. Wait for it rather than fail.
        Err(ClientError::NotRunning(_)) if store::is_running(layout, &name) => {
            client::wait_until_ready(layout, &name, Duration::from_secs(60))?;
            client::run(layout, &name, command, &stdio)?
        }
        other => other?,
    };
    // The command has its copies; ours must go so the relays see end of file.
    drop(stdio);
    drop(out_pipe);
    drop(err_pipe);
    let mut session = session;
    let master = session.terminal.take();
    let signaller = session.signaller()?;
    let status = terminal_io::relay_session(
        master,
        signals,
        relays,
        done,
        move |sig| signaller.signal(sig).is_ok(),
        || session.wait(),
    )?;
    Ok(status?.shell_code())
}

/// `shuttle path`: where a VM's file lives on the host, or the reverse.
fn path(layout: &Layout, target: &str, json: bool) -> Result<i32> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match shuttle_vm::paths::split_vm_path(target) {
        Some((vm, inside)) => {
            let found = match shuttle_vm::paths::in_vm(layout, vm, inside) {
                Ok(found) => found,
                Err(e) => return not_found(e),
            };
            if json {
                writeln!(out, "{}", serde_json::to_string(&found)?)?;
            } else {
                writeln!(out, "{}", found.host_path.display())?;
            }
        }
        None => {
            let absolute = std::path::absolute(target)?;
            let found = match shuttle_vm::paths::on_host(layout, &absolute.to_string_lossy()) {
                Ok(found) => found,
                Err(e) => return not_found(e),
            };
            if json {
                writeln!(out, "{}", serde_json::to_string(&found)?)?;
            } else {
                for f in found {
                    let layer = match f.layer {
                        shuttle_vm::paths::Layer::Upper => "upper",
                        shuttle_vm::paths::Layer::Base => "base",
                    };
                    writeln!(out, "{}:{}\t{layer}", f.vm, f.path)?;
                }
            }
        }
    }
    Ok(0)
}

/// A path that is not where it was looked for: exit status 1 (2 for other errors).
fn not_found(e: shuttle_vm::paths::PathError) -> Result<i32> {
    use shuttle_vm::paths::PathError;
    eprintln!("shuttle: {e}");
    Ok(match e {
        PathError::Store(_) | PathError::Io { .. } | PathError::NotAbsolute(_) => 2,
        _ => 1,
    })
}
