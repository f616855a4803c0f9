//! Whole systems from a manifest: `up`, `down`, `ps`, `logs`, `graph`, and the readiness
//! helper that runs inside VMs (`__probe`).

use std::fs;
use std::io::{BufRead, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use shuttle_proto::{BrokerRequest, PolicyText, VmCreateSpec};
use shuttle_system::Manifest;
use shuttle_vm::{client, store, Layout};

use crate::commands::{lifecycle, require_kernel_features, require_root, shuttle_exe};
use crate::supervise::{self, SystemState};

fn load_manifest(file: &Path) -> Result<Manifest> {
    Manifest::load(file).map_err(|errors| {
        let n = errors.errors().len();
        anyhow!(
            "{errors}\n{}: {n} error(s); nothing was started",
            file.display()
        )
    })
}

/// What one `up` of a system did to VMs, so that `down` undoes exactly that
/// (`run/systems/NAME/up.json`). The supervisor adds the VMs it starts again later.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct UpRecord {
    /// VMs `up` created.
    pub created: Vec<String>,
    /// VMs `up` (or the supervisor) started; those running before stay running at `down`.
    pub started: Vec<String>,
}

/// Where the broker keeps system `system`'s layer of the active policy.
fn layer_file(layout: &Layout, system: &str) -> PathBuf {
    layout.policy_layers_dir().join(format!("{system}.json"))
}

/// Whether `path` exists or cannot be told not to (`Path::exists` says no on any error, which
/// would skip removing a system's rules).
fn may_exist(path: &Path) -> bool {
    !matches!(path.try_exists(), Ok(false))
}

pub fn up_record_file(layout: &Layout, system: &str) -> PathBuf {
    supervise::runtime_dir(layout, system).join("up.json")
}

pub fn read_up_record(layout: &Layout, system: &str) -> Option<UpRecord> {
    fs::read(up_record_file(layout, system))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

pub fn write_up_record(layout: &Layout, system: &str, record: &UpRecord) -> Result<()> {
    let path = up_record_file(layout, system);
    shuttle_vm::layout::ensure_private_dir(&layout.runtime)?;
    fs::create_dir_all(supervise::runtime_dir(layout, system))?;
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// How an existing VM differs from what the manifest declares (the options only apply when
/// a VM is created).
fn option_drift(existing: &shuttle_vm::VmConfig, wanted: &shuttle_vm::VmConfig) -> Vec<String> {
    let mut out = Vec::new();
    let base = |b: &shuttle_vm::Base| match b {
        shuttle_vm::Base::Host => "host".to_owned(),
        shuttle_vm::Base::Dir(d) => d.display().to_string(),
    };
    let opt = |v: Option<u64>| v.map_or_else(|| "none".to_owned(), |n| n.to_string());
    if existing.base != wanted.base {
        out.push(format!(
            "base {} (manifest: {})",
            base(&existing.base),
            base(&wanted.base)
        ));
    }
    if existing.net != wanted.net {
        out.push(format!("net {:?} (manifest: {:?})", existing.net, wanted.net).to_lowercase());
    }
    if existing.memory_bytes != wanted.memory_bytes {
        let size = |v: Option<u64>| match v {
            Some(n) if n % (1 << 20) == 0 => format!("{}M", n >> 20),
            other => opt(other),
        };
        out.push(format!(
            "memory {} (manifest: {})",
            size(existing.memory_bytes),
            size(wanted.memory_bytes)
        ));
    }
    if existing.pids != wanted.pids {
        out.push(format!(
            "pids {} (manifest: {})",
            opt(existing.pids),
            opt(wanted.pids)
        ));
    }
    if existing.hide != wanted.hide {
        out.push(format!(
            "hide {:?} (manifest: {:?})",
            existing.hide, wanted.hide
        ));
    }
    if existing.tags != wanted.tags {
        out.push(format!(
            "tags {:?} (manifest: {:?})",
            existing.tags, wanted.tags
        ));
    }
    out
}

/// The system's layer of the active policy: its own rules (the policy file, or the
/// manifest's `[[rule]]` tables at the manifest's lines), then the share rules of its
/// components, written to `state/systems/NAME/components.toml` so that audit records and
/// `policy explain` name a file one can read.
fn policy_layer(layout: &Layout, manifest: &Manifest) -> Result<Vec<PolicyText>> {
    let mut parts = Vec::new();
    if let Some(policy) = &manifest.policy {
        let source = if policy.inline {
            fs::canonicalize(&manifest.file).unwrap_or_else(|_| policy.path.clone())
        } else {
            fs::canonicalize(&policy.path).unwrap_or_else(|_| policy.path.clone())
        };
        parts.push(PolicyText {
            source: source.display().to_string(),
            text: policy.text.clone(),
        });
    }
    if let Some(text) = &manifest.components_policy {
        let dir = layout.state.join("systems").join(&manifest.name);
        fs::create_dir_all(&dir)?;
        let path = dir.join("components.toml");
        let text = format!(
            "# The components of system {} ({}) as share rules, written by `shuttle up`.\n{text}",
            manifest.name, manifest.file
        );
        fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        parts.push(PolicyText {
            source: path.display().to_string(),
            text,
        });
    }
    Ok(parts)
}

/// `shuttle up FILE`.
pub fn up(layout: &Layout, file: &Path) -> Result<i32> {
    require_root()?;
    let manifest = load_manifest(file)?;
    require_kernel_features()?;
    let name = manifest.name.clone();
    if supervise::is_running(layout, &name) {
        bail!(
            "system {name} is already up: see `shuttle ps`, or stop it with `shuttle down {}`",
            file.display()
        );
    }
    // A VM that exists keeps the options it was created with: say so rather than run it
    // with options the manifest no longer declares. Checked before anything changes.
    let mut drift = Vec::new();
    for vm in &manifest.vms {
        if let (Ok(existing), Ok(wanted)) =
            (store::load(layout, &vm.name), vm.options().validate(0))
        {
            let d = option_drift(&existing, &wanted);
            if !d.is_empty() {
                drift.push(format!("  VM {}: {}", vm.name, d.join("; ")));
            }
        }
    }
    if !drift.is_empty() {
        bail!(
            "existing VMs differ from the manifest (a VM's options are set when it is created):\n{}\n\
             nothing was started: recreate them with `shuttle vm rm --force NAME` (their files \
             are lost) and run `shuttle up {}` again, or change the manifest to match",
            drift.join("\n"),
            file.display()
        );
    }
    let t0 = Instant::now();
    eprintln!(
        "system {name}: {} VM(s), {} application(s)",
        manifest.vms.len(),
        manifest.apps.len()
    );
    let mut record = UpRecord::default();
    // Undone if `up` fails: VMs this `up` started are stopped again, its rules removed.
    let mut layer_set = false;
    let result = (|| -> Result<()> {
        let parts = policy_layer(layout, &manifest)?;
        if !parts.is_empty() {
            // A layer of the active policy: other systems' rules and the policy loaded with
            // `policy load` stay as they are. First, so that rules in conflict with those
            // change nothing.
            crate::policy_cmd::set_layer(layout, &name, parts)?;
            layer_set = true;
        } else if may_exist(&layer_file(layout, &name)) {
            // Rules of an earlier version of the manifest whose `down` never ran.
            crate::policy_cmd::remove_layer(layout, &name)?;
        }
        for vm in &manifest.vms {
            if layout.vm_dir(&vm.name).exists() {
                eprintln!("  VM {:<21} exists (kept as it is)", vm.name);
                continue;
            }
            let o = vm.options();
            lifecycle(
                layout,
                BrokerRequest::VmCreate(VmCreateSpec {
                    name: o.name.clone(),
                    base: o.base.clone(),
                    net: o.net.clone(),
                    memory: o.memory.clone(),
                    pids: o.pids,
                    hide: o.hide.iter().map(|h| h.display().to_string()).collect(),
                    tags: o.tags.clone(),
                }),
                "create a VM",
            )?;
            record.created.push(vm.name.clone());
            eprintln!("  VM {:<21} created", vm.name);
        }
        for vm in &manifest.vms {
            if store::is_running(layout, &vm.name) {
                continue;
            }
            lifecycle(
                layout,
                BrokerRequest::VmStart {
                    name: vm.name.clone(),
                },
                "start a VM",
            )?;
            record.started.push(vm.name.clone());
            eprintln!("  VM {:<21} started", vm.name);
        }
        write_up_record(layout, &name, &record)?;
        for vm in &manifest.vms {
            for f in &vm.files {
                copy_into(layout, &vm.name, &f.from, &f.to)?;
            }
        }
        spawn_supervisor(layout, file, &name)
    })();
    if let Err(e) = result {
        for vm in record.started.iter().rev() {
            let _ = client::stop(layout, vm, Duration::from_secs(5));
            eprintln!("  VM {vm:<21} stopped again");
        }
        if layer_set {
            if let Err(e) = crate::policy_cmd::remove_layer(layout, &name) {
                eprintln!("warning: removing system {name}'s rules again: {e:#}");
            }
        }
        let _ = fs::remove_file(up_record_file(layout, &name));
        return Err(e);
    }
    eprintln!(
        "system {name} is up in {:.1} s: `shuttle ps` lists it, `shuttle down {}` stops it",
        t0.elapsed().as_secs_f64(),
        file.display()
    );
    Ok(0)
}

/// Copies a host file into a running VM (through `sh` in the VM, with the file as its stdin,
/// so the write happens inside the VM's own root), keeping its permission bits (a script
/// stays executable).
fn copy_into(layout: &Layout, vm: &str, from: &Path, to: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let src = fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mode = src.metadata()?.permissions().mode() & 0o777;
    let err = std::io::stderr();
    let cmd = supervise::command_spec(
        &[
            "sh".into(),
            "-c".into(),
            "mkdir -p \"$(dirname \"$1\")\" && cat > \"$1\" && chmod \"$2\" \"$1\"".into(),
            "sh".into(),
            to.into(),
            format!("{mode:o}"),
        ],
        None,
        None,
        &[],
    );
    let code = client::run(layout, vm, cmd, &[src.as_fd(), err.as_fd(), err.as_fd()])?
        .wait()?
        .shell_code();
    if code != 0 {
        bail!(
            "copying {} to {to} in VM {vm} failed (status {code})",
            from.display()
        );
    }
    eprintln!("  VM {vm:<21} {to} <- {}", from.display());
    Ok(())
}

/// Starts the system's supervisor, detached, and relays its progress lines until it says
/// `ok` (every application ready) or `error: ...` (it stopped what it started).
fn spawn_supervisor(layout: &Layout, file: &Path, name: &str) -> Result<()> {
    let manifest_path = fs::canonicalize(file)?;
    let dir = supervise::runtime_dir(layout, name);
    shuttle_vm::layout::ensure_private_dir(&layout.runtime)?;
    fs::create_dir_all(&dir)?;
    let log_path = dir.join("supervisor.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // The write end must survive this one exec (see shuttle_vm::detach).
    nix::fcntl::fcntl(
        &write,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    let mut cmd = Command::new(shuttle_exe()?);
    cmd.env_clear().env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    for passed in ["SHUTTLE_ROOT", "SHUTTLE_LOG", "SHUTTLE_APP_LOG_MAX"] {
        if let Some(v) = std::env::var_os(passed) {
            cmd.env(passed, v);
        }
    }
    let spawned = cmd
        .arg("__supervise")
        .arg(&manifest_path)
        .arg(write.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn();
    drop(write);
    let mut child = spawned.context("starting the system's supervisor")?;
    let mut last = String::new();
    for line in std::io::BufReader::new(fs::File::from(read)).lines() {
        let line = line?;
        if line == "ok" || line.starts_with("error: ") {
            last = line;
            break;
        }
        eprintln!("{line}");
    }
    let _ = child.try_wait();
    match last.strip_prefix("error: ") {
        None if last == "ok" => Ok(()),
        Some(msg) => bail!(
            "{msg}\nnothing of system {name} is left running (supervisor log: {})",
            log_path.display()
        ),
        None => bail!(
            "the supervisor exited before the system was up (its log: {})",
            log_path.display()
        ),
    }
}

/// `shuttle down FILE`.
pub fn down(layout: &Layout, file: &Path) -> Result<i32> {
    require_root()?;
    let manifest = load_manifest(file)?;
    let name = &manifest.name;
    if supervise::is_running(layout, name) {
        let pid = fs::read_to_string(supervise::state_file(layout, name))
            .ok()
            .and_then(|t| serde_json::from_str::<SystemState>(&t).ok())
            .map(|s| s.supervisor_pid)
            .ok_or_else(|| anyhow!("cannot find the supervisor of system {name}"))?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("signalling the supervisor (pid {pid})"))?;
        let limit: Duration = manifest
            .apps
            .iter()
            .map(|a| a.stop_timeout + Duration::from_secs(5))
            .sum();
        let deadline = Instant::now() + limit;
        while supervise::is_running(layout, name) {
            if Instant::now() > deadline {
                bail!("the supervisor of system {name} (pid {pid}) did not stop within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for app in manifest.apps.iter().rev() {
            eprintln!("  {:<24} stopped", app.id());
        }
    }
    // The system's rules go; every other rule stays. If they cannot go (the broker changes
    // nothing when the rest of the policy cannot be built), the VMs still stop: a VM that
    // is not running uses no rule, and `down` reports the failure at the end.
    let layer_error = if may_exist(&layer_file(layout, name)) {
        let e = crate::policy_cmd::remove_layer(layout, name).err();
        if e.is_some() {
            eprintln!(
                "  system {name}'s rules could not be removed (see the error at the end); \
                 stopping its VMs anyway"
            );
        }
        e
    } else {
        None
    };
    let record = read_up_record(layout, name);
    // VMs that other systems that are up declare stay for them.
    let others: Vec<(String, Vec<String>)> = systems(layout)
        .into_iter()
        .filter(|s| s.system != *name)
        .filter_map(|s| {
            Manifest::load(Path::new(&s.manifest))
                .ok()
                .map(|m| (s.system, m.vms.into_iter().map(|v| v.name).collect()))
        })
        .collect();
    for vm in manifest.vms.iter().rev() {
        if !store::is_running(layout, &vm.name) {
            continue;
        }
        // Without a record (an `up` of an older shuttle), every VM of the manifest is the
        // system's, as it used to be.
        let ours = record
            .as_ref()
            .is_none_or(|r| r.started.contains(&vm.name) || r.created.contains(&vm.name));
        if !ours {
            eprintln!(
                "  VM {:<21} left running: it was running before `shuttle up` (stop it with `shuttle vm stop {}`)",
                vm.name, vm.name
            );
            continue;
        }
        if let Some((other, _)) = others.iter().find(|(_, vms)| vms.contains(&vm.name)) {
            // Handed over: the other system's `down` stops it.
            let mut theirs = read_up_record(layout, other).unwrap_or_default();
            if !theirs.started.contains(&vm.name) {
                theirs.started.push(vm.name.clone());
                write_up_record(layout, other, &theirs)?;
            }
            eprintln!(
                "  VM {:<21} left running: system {other}, which is up, uses it too (its down stops it)",
                vm.name
            );
            continue;
        }
        let stopped = lifecycle(
            layout,
            BrokerRequest::VmStop {
                name: vm.name.clone(),
                grace_ms: 10_000,
            },
            "stop a VM",
        );
        // Someone else (a failing `up`) may be stopping it meanwhile: its monitor holds the
        // VM's lock until the VM is gone.
        if let Err(e) = stopped {
            let deadline = Instant::now() + Duration::from_secs(15);
            while store::is_running(layout, &vm.name) {
                if Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        eprintln!("  VM {:<21} stopped", vm.name);
    }
    let _ = fs::remove_file(up_record_file(layout, name));
    if let Some(e) = layer_error {
        bail!(
            "{e:#}\nsystem {name} is down, but its rules are still part of the active policy: \
             fix the error above and run `shuttle down {}` again",
            file.display()
        );
    }
    eprintln!("system {name} is down");
    Ok(0)
}

#[derive(Debug, Serialize)]
struct PsOutput {
    systems: Vec<PsSystem>,
    vms: Vec<PsVm>,
}

#[derive(Debug, Serialize)]
struct PsSystem {
    name: String,
    manifest: String,
    supervisor: &'static str,
    apps: Vec<PsApp>,
}

#[derive(Debug, Serialize)]
struct PsApp {
    #[serde(flatten)]
    row: supervise::AppRow,
    uptime_secs: Option<u64>,
}

#[derive(Debug, Serialize)]
struct PsVm {
    name: String,
    state: &'static str,
    started_at: Option<u64>,
    uptime_secs: Option<u64>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn systems(layout: &Layout) -> Vec<SystemState> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(layout.runtime.join("systems")) else {
        return out;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !supervise::is_running(layout, &name) {
            continue;
        }
        if let Some(s) = fs::read_to_string(supervise::state_file(layout, &name))
            .ok()
            .and_then(|t| serde_json::from_str::<SystemState>(&t).ok())
        {
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.system.cmp(&b.system));
    out
}

/// The state of system `name`, if it is up.
pub fn running_state(layout: &Layout, name: &str) -> Option<SystemState> {
    systems(layout).into_iter().find(|s| s.system == name)
}

/// The manifests of the systems that are up.
pub fn running_manifests(layout: &Layout) -> Vec<PathBuf> {
    systems(layout)
        .into_iter()
        .map(|s| PathBuf::from(s.manifest))
        .collect()
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `shuttle ps [--json]`.
pub fn ps(layout: &Layout, json: bool) -> Result<i32> {
    let now = now_unix();
    let systems: Vec<PsSystem> = systems(layout)
        .into_iter()
        .map(|s| PsSystem {
            name: s.system,
            manifest: s.manifest,
            supervisor: "running",
            apps: s
                .apps
                .into_iter()
                .map(|row| PsApp {
                    uptime_secs: row.started_at.map(|t| now.saturating_sub(t)),
                    row,
                })
                .collect(),
        })
        .collect();
    let mut vms = Vec::new();
    for c in store::list(layout)?.into_iter().flatten() {
        let running = store::is_running(layout, &c.name);
        let started_at = if running {
            client::status(layout, &c.name).ok().map(|s| s.started_at)
        } else {
            None
        };
        vms.push(PsVm {
            state: if running { "running" } else { "stopped" },
            uptime_secs: started_at.map(|t| now.saturating_sub(t)),
            started_at,
            name: c.name,
        });
    }
    let out = PsOutput { systems, vms };
    let mut o = std::io::stdout().lock();
    if json {
        writeln!(o, "{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(0);
    }
    if out.systems.is_empty() {
        writeln!(o, "no system is up (start one with `shuttle up FILE`)")?;
    }
    for s in &out.systems {
        writeln!(o, "system {} ({})", s.name, s.manifest)?;
        writeln!(
            o,
            "  {:<24} {:<9} {:>8} {:>8} {:>7} {:>5}",
            "APP", "STATE", "RESTARTS", "UPTIME", "PID", "EXIT"
        )?;
        for a in &s.apps {
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            writeln!(
                o,
                "  {:<24} {:<9} {:>8} {:>8} {:>7} {:>5}",
                a.row.id,
                a.row.state,
                a.row.restarts,
                opt(a.uptime_secs.map(human_duration)),
                opt(a.row.pid.map(|p| p.to_string())),
                opt(a.row.last_exit.map(|c| c.to_string())),
            )?;
        }
    }
    if !out.vms.is_empty() {
        writeln!(o, "  {:<24} {:<9} {:>8}", "VM", "STATE", "UPTIME")?;
        for v in &out.vms {
            writeln!(
                o,
                "  {:<24} {:<9} {:>8}",
                v.name,
                v.state,
                v.uptime_secs
                    .map(human_duration)
                    .unwrap_or_else(|| "-".into())
            )?;
        }
    }
    Ok(0)
}

/// Finds the log of application `VM.APP`: in the running systems first, then in every
/// system's kept logs.
fn find_log(layout: &Layout, app: &str) -> Result<PathBuf> {
    if !app.contains('.') {
        bail!("name the application as VM.APP, such as db.postgres (see `shuttle ps`)");
    }
    for s in systems(layout) {
        if let Some(row) = s.apps.iter().find(|a| a.id == app) {
            return Ok(PathBuf::from(&row.log));
        }
    }
    if let Ok(rd) = fs::read_dir(layout.state.join("systems")) {
        for e in rd.filter_map(Result::ok) {
            let p = e.path().join("logs").join(format!("{app}.log"));
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!(
        "no application {app} has a log: see `shuttle ps` for the applications of running systems"
    )
}

/// `shuttle logs APP [--follow]`: the kept output, the file before the last rotation first;
/// following goes on in the new file when the log is rotated.
pub fn logs(layout: &Layout, app: &str, follow: bool) -> Result<i32> {
    use std::os::unix::fs::MetadataExt;
    let path = find_log(layout, app)?;
    let mut out = std::io::stdout().lock();
    let previous = supervise::previous_log(&path);
    let mut f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    if let Ok(mut p) = fs::File::open(&previous) {
        std::io::copy(&mut p, &mut out)?;
    }
    let mut buf = Vec::new();
    loop {
        buf.clear();
        f.read_to_end(&mut buf)?;
        out.write_all(&buf)?;
        out.flush()?;
        if !follow {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
        let now = fs::metadata(&path).ok();
        let mine = f.metadata()?;
        if now.as_ref().is_some_and(|m| m.ino() != mine.ino()) {
            // Rotated: what was written to the old file before the switch, then the new one
            // from its start.
            buf.clear();
            f.read_to_end(&mut buf)?;
            out.write_all(&buf)?;
            if let Ok(new) = fs::File::open(&path) {
                f = new;
            }
        } else if mine.len() < f.stream_position().unwrap_or(0) {
            // Truncated meanwhile: start again from the top.
            f.rewind()?;
        }
    }
}

/// `shuttle __probe --socket PATH | --port N | --exists PATH` (inside a VM).
pub fn probe(socket: Option<&str>, port: Option<u16>, exists: Option<&str>) -> i32 {
    let ok = if let Some(p) = socket {
        std::os::unix::net::UnixStream::connect(p).is_ok()
    } else if let Some(port) = port {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1),
        )
        .is_ok()
    } else if let Some(p) = exists {
        fs::symlink_metadata(p).is_ok()
    } else {
        false
    };
    i32::from(!ok)
}
