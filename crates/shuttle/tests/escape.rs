//! The escape suite (issue 7): from root inside a VM under a default-deny policy, no channel
//! reaches the host or another VM. Each case is a probe (`escape/probes.py`) run as root in the
//! attacker VM `evil` against real targets (`escape/fixture.py`): listeners, IPC objects, a
//! signal catcher with a secret in its memory and a named keyring on the host, the same in the
//! VM `victim`, and policy rules that publish the victim's objects to a third VM (so that the
//! monitor's mediation path is exercised, not bypassed). A case fails when its probe reports the
//! channel open, when any target logs a hit it did not allow, or when the probe is broken (no
//! verdict).
//!
//! Every probe is shown able to fail by running it where the channel is open: the `#[ignore]`d
//! test [`probes_detect_open_channels_on_the_host`] (`scripts/escape-on-host.sh`) runs the same
//! probes on the host, or in the victim's namespaces without its seccomp filter and capability
//! limits, and counts how many detect the open channel. The probes change nothing on the host
//! (see the header of `escape/probes.py`).

#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_success, host_dir, stdout, Env};
use serde_json::{json, Value};
use tempfile::TempDir;

const PROBES: &str = include_str!("escape/probes.py");
const FIXTURE: &str = include_str!("escape/fixture.py");
const PYTHON: &str = "/usr/bin/python3";
/// How long each race probe hammers the monitor.
const RACE_SECONDS: f64 = 1.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The host's fixture.
    Host,
    /// The victim VM's fixture.
    Vm,
    /// Nothing in particular: the probe tries a privileged operation.
    Kernel,
}

impl Target {
    fn arg(self) -> &'static str {
        match self {
            Target::Host => "host",
            Target::Vm => "vm",
            Target::Kernel => "-",
        }
    }
}

/// Where the probe runs to show that it detects the channel when it is open.
#[derive(Debug, Clone, Copy)]
enum Control {
    /// On the host, as root, with nothing of Shuttle in the way.
    Host,
    /// On the host, in the victim VM's namespaces (`nsenter` with these flags) but without its
    /// seccomp filter and capability limits: the objects live in those namespaces.
    InVictim(&'static [&'static str]),
    /// On the host, but the host may lack the facility (the reason); reported, not required.
    HostWhenPresent(&'static str),
    /// Cannot be shown open from the host (the reason).
    Unprovable(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Processes,
    Sockets,
    Ipc,
    Kernel,
    Files,
    Races,
}

#[derive(Debug)]
struct Case {
    probe: &'static str,
    target: Target,
    group: Group,
    control: Control,
}

impl Case {
    fn name(&self) -> String {
        match self.target {
            Target::Kernel => self.probe.to_owned(),
            t => format!("{}/{}", self.probe, t.arg()),
        }
    }
}

const fn case(probe: &'static str, target: Target, group: Group, control: Control) -> Case {
    Case {
        probe,
        target,
        group,
        control,
    }
}

use Control::{Host as H, HostWhenPresent as HWP, InVictim, Unprovable};
use Group::*;
use Target::{Host as TH, Kernel as TK, Vm as TV};

const NET: &[&str] = &["--net"];
const IPC: &[&str] = &["--ipc"];
const MNT: &[&str] = &["--mount"];

#[rustfmt::skip]
const CASES: &[Case] = &[
    // Processes: signals, tracing, memory, /proc.
    case("signal", TH, Processes, H),
    case("signal", TV, Processes, H),
    case("sigio", TH, Processes, H),
    case("sigio", TV, Processes, H),
    case("ptrace", TH, Processes, H),
    case("ptrace", TV, Processes, H),
    case("process-memory", TH, Processes, H),
    case("process-memory", TV, Processes, H),
    case("proc", TH, Processes, H),
    case("proc", TV, Processes, H),
    case("broker-signal", TV, Processes, Unprovable("the VM API exists only inside a VM; tests/broker.rs shows an allowed signal arrive")),
    case("broker-control", TV, Processes, Unprovable("on the host the control plane answers by design (and the commands would stop the victim)")),
    case("vm-init", TK, Processes, H),
    // Sockets, and netlink.
    case("unix-stream", TH, Sockets, H),
    case("unix-dgram", TH, Sockets, H),
    case("abstract", TH, Sockets, H),
    case("tcp", TH, Sockets, H),
    case("udp", TH, Sockets, H),
    case("unix-stream", TV, Sockets, InVictim(MNT)),
    case("unix-dgram", TV, Sockets, InVictim(MNT)),
    case("abstract", TV, Sockets, InVictim(NET)),
    case("tcp", TV, Sockets, InVictim(NET)),
    case("udp", TV, Sockets, InVictim(NET)),
    case("host-unix-sockets", TH, Sockets, H),
    case("socket-tables", TK, Sockets, H),
    case("shuttle-sockets", TK, Sockets, H),
    case("netlink-route", TK, Sockets, H),
    case("netlink-links", TK, Sockets, H),
    case("audit-control", TK, Sockets, H),
    case("audit-user", TK, Sockets, H),
    // IPC.
    case("sysv-shm", TH, Ipc, H),
    case("sysv-sem", TH, Ipc, H),
    case("sysv-msg", TH, Ipc, H),
    case("sysv-shm", TV, Ipc, InVictim(IPC)),
    case("sysv-sem", TV, Ipc, InVictim(IPC)),
    case("sysv-msg", TV, Ipc, InVictim(IPC)),
    case("mq", TH, Ipc, H),
    case("mq", TV, Ipc, InVictim(IPC)),
    case("dev-shm", TH, Ipc, H),
    case("dev-shm", TV, Ipc, InVictim(MNT)),
    case("fifo", TH, Ipc, H),
    case("fifo", TV, Ipc, InVictim(MNT)),
    case("keyring-join", TH, Ipc, H),
    case("keyring-add", TK, Ipc, H),
    case("proc-keys", TH, Ipc, H),
    // Kernel: mounts, namespaces, devices, code loading, clocks.
    case("mount", TK, Kernel, H),
    case("new-mount-api", TK, Kernel, H),
    case("umount", TK, Kernel, H),
    case("unshare", TK, Kernel, H),
    case("clone-namespaces", TK, Kernel, H),
    case("compat-syscalls", TK, Kernel, HWP("needs IA32 emulation in the kernel")),
    case("setns", TH, Kernel, H),
    case("setns", TV, Kernel, H),
    case("pivot-root", TK, Kernel, H),
    case("chroot-breakout", TK, Kernel, H),
    case("mknod", TK, Kernel, H),
    case("raw-disk", TK, Kernel, H),
    case("dev-mem", TK, Kernel, HWP("needs a kernel with CONFIG_DEVMEM")),
    case("dev-kmsg", TK, Kernel, H),
    case("syslog", TK, Kernel, H),
    case("proc-kmsg", TK, Kernel, H),
    case("host-device-inodes", TK, Kernel, H),
    case("terminal-injection", TK, Kernel, H),
    case("kernel-modules", TK, Kernel, HWP("needs a kernel with module support (CONFIG_MODULES)")),
    case("kexec", TK, Kernel, HWP("needs a kernel with CONFIG_KEXEC")),
    case("bpf", TK, Kernel, H),
    case("perf-events", TK, Kernel, H),
    case("userfaultfd", TK, Kernel, H),
    case("io-uring", TK, Kernel, HWP("needs io_uring enabled (kernel.io_uring_disabled = 0)")),
    case("name-to-handle", TK, Kernel, H),
    case("open-by-handle", TK, Kernel, H),
    case("hostname", TK, Kernel, H),
    case("clock-set", TK, Kernel, H),
    case("adjtimex", TK, Kernel, H),
    // Files: cgroups, /proc/sys, /sys, other VMs' layers, Shuttle's own files.
    case("cgroup-release-agent", TK, Files, HWP("needs a cgroup v1 hierarchy on the host")),
    case("cgroup-other", TK, Files, H),
    case("cgroup-parent", TK, Files, HWP("needs the test to run below the root cgroup")),
    case("cgroup-own-limits", TK, Files, HWP("needs the test to run below the root cgroup")),
    case("proc-sys-hostname", TK, Files, H),
    case("sysrq-trigger", TK, Files, HWP("needs a kernel with CONFIG_MAGIC_SYSRQ")),
    case("drop-caches", TK, Files, H),
    case("core-pattern", TK, Files, H),
    case("usermode-helpers", TK, Files, H),
    case("binfmt-misc", TK, Files, HWP("needs binfmt_misc mounted on the host")),
    case("uevent-helper", TK, Files, HWP("needs a kernel with CONFIG_UEVENT_HELPER")),
    case("sysfs-writable", TK, Files, H),
    case("kernel-memory", TK, Files, H),
    case("tracing", TK, Files, HWP("needs tracefs or debugfs mounted on the host")),
    case("fanotify", TK, Kernel, H),
    case("host-switches", TK, Kernel, H),
    case("io-ports", TK, Kernel, HWP("needs a kernel with CONFIG_X86_IOPL_IOPERM")),
    case("hidden-paths", TK, Files, H),
    case("lower-layer-writes", TH, Files, H),
    case("upper-state-dir", TV, Files, H),
    case("upper-proc-root", TV, Files, H),
    case("upper-mountinfo", TV, Files, H),
    case("shuttle-files", TK, Files, H),
    // Races against the monitor's mediation.
    case("symlink-race", TV, Races, H),
    case("parent-race", TV, Races, H),
    case("flip-unix", TV, Races, H),
    case("flip-tcp", TV, Races, H),
    case("flip-mq", TV, Races, H),
    case("nested-listener", TV, Races, InVictim(MNT)),
];

/// Runs `cmd`, killing it after `timeout`; returns its output.
fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning a probe");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("waiting for a probe"),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let out = rx.recv().unwrap().expect("waiting for a killed probe");
            panic!(
                "probe did not finish within {timeout:?}:\nstdout: {}\nstderr: {}",
                stdout(&out),
                common::stderr(&out)
            );
        }
    }
}

/// The host's fixture: a child process, stopped with SIGTERM (it removes its IPC objects).
struct HostFixture {
    child: Child,
    ready: Value,
}

impl Drop for HostFixture {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_host_fixture(cfg: &Value, tag: &str) -> HostFixture {
    let mut child = Command::new(PYTHON)
        .args(["-c", FIXTURE, &cfg.to_string(), tag])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the host fixture");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .expect("reading the host fixture's readiness line");
    let ready = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("host fixture: bad readiness line {line:?}: {e}"));
    HostFixture { child, ready }
}

/// Inode numbers of a process's namespaces that Shuttle separates (user and time namespaces
/// are shared with the host by design: there is no user-namespace mode yet).
fn namespaces_of(pid: &str) -> Value {
    let mut m = serde_json::Map::new();
    for ns in ["net", "ipc", "mnt", "uts", "pid", "cgroup"] {
        let ino = std::fs::metadata(format!("/proc/{pid}/ns/{ns}"))
            .unwrap()
            .ino();
        m.insert(ns.to_owned(), json!(ino));
    }
    Value::Object(m)
}

/// Paths of the unix sockets listening on the host (its network namespace), at most 500.
fn host_unix_sockets() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap();
    let mut paths: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|p| p.starts_with('/'))
        .map(str::to_owned)
        .collect();
    paths.sort();
    paths.dedup();
    paths.truncate(500);
    paths
}

/// What a VM must never change in the host's file `path`: content, mode, times, extended
/// attributes and links.
fn file_state(path: &Path) -> String {
    let m = std::fs::metadata(path).unwrap();
    let xattrs = Command::new(PYTHON)
        .args(["-c", "import os, sys; print(os.listxattr(sys.argv[1]))"])
        .arg(path)
        .output()
        .unwrap();
    format!(
        "{:?} mode {:o} mtime {} nlink {} xattrs {:?}",
        std::fs::read_to_string(path).unwrap_or_default(),
        m.mode(),
        m.mtime_nsec() + m.mtime() * 1_000_000_000,
        m.nlink(),
        stdout(&xattrs).trim()
    )
}

/// Host pid of the process whose command line contains `tag`.
fn pid_with_tag(tag: &str) -> i32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmd.windows(tag.len()).any(|w| w == tag.as_bytes()) {
            return pid;
        }
    }
    panic!("no process runs with {tag} in its command line");
}

fn key(nonce: u64, i: u64) -> u64 {
    (nonce
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i * 7919)
        >> 33)
        & 0x3fff_ffff
}

/// Everything a group of cases needs: the VMs, both fixtures, the policy, and the context
/// handed to the probes (one for inside the VM, one for the host controls).
struct Lab {
    // Dropped first: the host's fixture removes its IPC objects before anything else goes.
    host_fixture: HostFixture,
    env: Env,
    host: TempDir,
    _secret: TempDir,
    victim_init: i32,
    ctx_vm: Value,
    ctx_host: Value,
    host_log: PathBuf,
    victim_log: PathBuf,
    hostname: String,
    /// A host file in the VMs' lower layer, and its state before any probe.
    cow: PathBuf,
    cow_state: String,
}

impl Lab {
    fn new() -> Option<Lab> {
        // Outside /tmp, so that Shuttle's own hiding is what keeps the state directory away.
        let env = Env::new_in("/var/tmp")?;
        let nonce_n = u64::from(std::process::id()) << 32
            ^ u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos(),
            );
        let nonce = format!("{nonce_n:x}");
        let host = host_dir();
        let secret = host_dir();
        std::fs::write(secret.path().join("secret"), &nonce).unwrap();
        let hp = host.path().to_str().unwrap().to_owned();
        let fx = format!("{hp}/fx");
        let lower_fifo = format!("{hp}/lower.fifo");
        nix::unistd::mkfifo(
            lower_fifo.as_str(),
            nix::sys::stat::Mode::from_bits(0o666).unwrap(),
        )
        .unwrap();
        for d in ["race", "race2"] {
            std::fs::create_dir(host.path().join(d)).unwrap();
        }

        env.create("evil", &["--hide", secret.path().to_str().unwrap()]);
        env.create("victim", &[]);
        env.create("friend", &[]);

        let host_cfg = json!({
            "mode": "serve", "where": "host", "nonce": nonce, "dir": fx,
            "log": format!("{hp}/hits.log"), "abstract": format!("escape-{nonce}-host"),
            "tcp_bind": "0.0.0.0",
            "shm_key": key(nonce_n, 1), "sem_key": key(nonce_n, 2), "msg_key": key(nonce_n, 3),
            "mqueues": [format!("/escape-{nonce}-host"), format!("/escD-{nonce}")],
            "shm_file": format!("/dev/shm/escape-{nonce}-host"),
            "keyring": format!("escape-{nonce}"), "with_addresses": true,
        });
        let host_fixture = start_host_fixture(&host_cfg, &format!("escape-fixture-host-{nonce}"));

        let victim_cfg = json!({
            "mode": "serve", "where": "vm", "daemon": true, "nonce": nonce, "dir": "/run/esc",
            "log": "/var/tmp/escape-hits.log", "abstract": format!("escape-{nonce}-vm"),
            "tcp_bind": "127.0.0.1",
            "shm_key": key(nonce_n, 4), "sem_key": key(nonce_n, 5), "msg_key": key(nonce_n, 6),
            "mqueues": [format!("/escape-{nonce}-vm"), format!("/escD-{nonce}")],
            "shm_file": format!("/dev/shm/escape-{nonce}-vm"),
            "secret_file": format!("/srv/escape-secret-{nonce}"),
            "lower_fifo": lower_fifo, "allowed": true,
        });
        let vm_tag = format!("escape-fixture-vm-{nonce}");
        let out = env.exec(
            "victim",
            &[PYTHON, "-c", FIXTURE, &victim_cfg.to_string(), &vm_tag],
        );
        assert_success(&out, "starting the victim's fixture");
        let vm_ready: Value = serde_json::from_str(stdout(&out).trim())
            .unwrap_or_else(|e| panic!("victim fixture: bad readiness line {out:?}: {e}"));
        let victim_init = env.init_pid("victim");
        env.ok(&["vm", "start", "evil"]);

        let h = &host_fixture.ready;
        let v = &vm_ready;
        let mut rules = String::new();
        let mut rule = |op: &str, from: &str, to: &str, object: String| {
            rules.push_str(&format!(
                "[[rule]]\nop = \"{op}\"\nfrom = \"{from}\"\nto = \"{to}\"\nobject = \"{object}\"\naction = \"allow\"\n\n"
            ));
        };
        // Published to `friend` only: evil's attempts go through the monitor's mediation and
        // are denied there.
        for object in [
            "unix:/run/esc/D.sock".to_owned(),
            "unix:/run/esc/x".to_owned(),
            "unix:/run/esc/dgram.sock".to_owned(),
            format!("abstract:escape-{nonce}-vm"),
            format!("tcp:{}", v["tcp_port"]),
            format!("udp:{}", v["udp_port"]),
        ] {
            rule("connect", "friend", "victim", object);
        }
        for q in [
            format!("mq:/escape-{nonce}-vm"),
            format!("mq:/escD-{nonce}"),
        ] {
            rule("mq", "friend", "victim", q);
        }
        rule("connect", "friend", "@host", format!("unix:{fx}/D.sock"));
        // What evil may reach: the targets of the races.
        for object in [
            "unix:/run/esc/A.sock".to_owned(),
            format!("tcp:{}", v["tcp_allowed_port"]),
            "unix:/run/race/x".to_owned(),
            "unix:/run/race2/d/x".to_owned(),
        ] {
            rule("connect", "evil", "victim", object);
        }
        let file = env.path().join("policy.toml");
        std::fs::write(&file, &rules).unwrap();
        env.ok(&["policy", "load", file.to_str().unwrap()]);

        let root = env.path().display().to_string();
        let cow = host.path().join("cow");
        std::fs::write(&cow, &nonce).unwrap();
        let cow_meta = std::fs::metadata(&cow).unwrap();
        let upper_secret = env
            .upper("victim")
            .join(format!("srv/escape-secret-{nonce}"));
        let root_dev = std::fs::metadata("/").unwrap().dev();
        let block_devices: Vec<String> = std::fs::read_dir("/sys/class/block")
            .map(|rd| {
                rd.flatten()
                    .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
                    .filter(|p| Path::new(p).exists())
                    .collect()
            })
            .unwrap_or_default();
        let mut devices = serde_json::Map::new();
        for d in ["null", "zero", "full", "random", "urandom", "tty"] {
            let m = std::fs::metadata(format!("/dev/{d}")).unwrap();
            devices.insert(format!("/dev/{d}"), json!([m.dev(), m.ino()]));
        }
        let host_target = json!({
            "where": "host", "pid": h["pid"], "dir": fx, "abstract": format!("escape-{nonce}-host"),
            "tcp_port": h["tcp_port"], "udp_port": h["udp_port"], "ips": h["ips"],
            "ifaces": h["ifaces"], "shm_key": host_cfg["shm_key"], "sem_key": host_cfg["sem_key"],
            "msg_key": host_cfg["msg_key"], "mq": format!("/escape-{nonce}-host"),
            "shm_file": host_cfg["shm_file"], "keyring": host_cfg["keyring"],
            "secret_addr": h["secret_addr"], "ns": namespaces_of("self"),
        });
        let vm_target = json!({
            "where": "vm", "pid": pid_with_tag(&vm_tag), "nspid": v["pid"], "dir": "/run/esc",
            "fifos": [victim_cfg["lower_fifo"]], "abstract": format!("escape-{nonce}-vm"),
            "tcp_port": v["tcp_port"], "udp_port": v["udp_port"],
            "shm_key": victim_cfg["shm_key"], "sem_key": victim_cfg["sem_key"],
            "msg_key": victim_cfg["msg_key"], "mq": format!("/escape-{nonce}-vm"),
            "shm_file": victim_cfg["shm_file"], "secret_addr": v["secret_addr"],
            "ns": namespaces_of(&victim_init.to_string()),
        });
        let ctx_vm = json!({
            "mode": "vm", "nonce": nonce, "host": host_target, "vm": vm_target,
            "victim_vm": "victim", "victim_init": victim_init,
            "hidden_secret": secret.path().join("secret"),
            "victim_secret": format!("/srv/escape-secret-{nonce}"),
            "victim_secret_on_host": upper_secret,
            "state_dir": format!("{root}/state"),
            "shuttle_sockets": [
                format!("{root}/run/broker.sock"), format!("{root}/run/vms/victim/monitor.sock"),
                format!("{root}/run/vms/victim/api/broker.sock"),
                format!("{root}/run/vms/evil/monitor.sock"),
            ],
            "shuttle_files": ["/run/shuttle/shuttle", "/run/shuttle"],
            "host_root_dev": [libc::major(root_dev), libc::minor(root_dev)],
            "host_block_devices": block_devices,
            "host_devices": devices,
            "host_unix_sockets": host_unix_sockets(),
            "host_cow_file": cow, "host_cow_id": [cow_meta.dev(), cow_meta.ino()],
            "init_pid": 1,
            "race": {"link": "/run/race/x", "parent_link": "/run/race2/d/x", "seconds": RACE_SECONDS},
            "flip": {
                "unix": ["/run/esc/A.sock", "/run/esc/D.sock", "/run/esc/U.sock"],
                "tcp": [v["tcp_allowed_port"], v["tcp_port"], 1],
                "mq": [format!("/escD-{nonce}"), format!("/escU-{nonce}")],
                "seconds": RACE_SECONDS,
            },
        });
        // The same probes on the host: the targets as the host sees them.
        let mut ctx_host = ctx_vm.clone();
        ctx_host["mode"] = json!("host");
        ctx_host["shuttle_files"] = json!([Env::bin(), format!("{root}/run/vms/evil/api")]);
        ctx_host["race"] = json!({
            "link": format!("{hp}/race/x"), "parent_link": format!("{hp}/race2/d/x"),
            "seconds": RACE_SECONDS,
        });
        ctx_host["flip"]["unix"] = json!([
            format!("{fx}/U.sock"),
            format!("{fx}/D.sock"),
            format!("{fx}/U.sock")
        ]);
        ctx_host["flip"]["tcp"] = json!([1, h["tcp_port"], 1]);
        ctx_host["init_pid"] = json!(victim_init);
        // Only the fixture's own socket: the host's other servers are none of our business.
        ctx_host["host_unix_sockets"] = json!([format!("{fx}/D.sock")]);

        Some(Lab {
            cow_state: file_state(&cow),
            cow,
            host_log: host.path().join("hits.log"),
            victim_log: env.upper("victim").join("var/tmp/escape-hits.log"),
            env,
            host,
            _secret: secret,
            host_fixture,
            victim_init,
            ctx_vm,
            ctx_host,
            hostname: nix::unistd::gethostname()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        })
    }

    fn hits(&self) -> (Vec<String>, Vec<String>) {
        let read = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        };
        (read(&self.host_log), read(&self.victim_log))
    }

    /// The racer of a race case: in the victim (`in_vm`) or on the host, swapping the link
    /// between the allowed socket and symlinks to the host's socket.
    fn start_racer(&self, case: &Case, in_vm: bool) -> Option<common::Guard> {
        let fx = self.ctx_vm["host"]["dir"].as_str().unwrap();
        let hp = self.host.path().display();
        let cfg = match (case.probe, in_vm) {
            ("symlink-race", true) => json!({
                "link": "/run/race/x", "real": "/run/race/sock",
                "targets": [format!("{fx}/D.sock"), format!("../..{fx}/D.sock"),
                            format!("/proc/self/root{fx}/D.sock"), format!("/proc/1/root{fx}/D.sock")],
            }),
            ("parent-race", true) => json!({
                "link": "/run/race2/d",
                "targets": ["real", fx, format!("../..{fx}"), format!("/proc/self/root{fx}")],
            }),
            ("symlink-race", false) => json!({
                "link": format!("{hp}/race/x"), "targets": ["/nonexistent-escape", format!("{fx}/D.sock")],
            }),
            ("parent-race", false) => json!({
                "link": format!("{hp}/race2/d"), "targets": ["/nonexistent-escape", fx],
            }),
            _ => return None,
        };
        let mut cfg = cfg;
        cfg["mode"] = json!("swap");
        cfg["seconds"] = json!(RACE_SECONDS + 20.0);
        let mut cmd = if in_vm {
            let mut c = self.env.cmd(&["run", "victim", "--", PYTHON]);
            c.args(["-c", FIXTURE, &cfg.to_string()]);
            c
        } else {
            let mut c = Command::new(PYTHON);
            c.args(["-c", FIXTURE, &cfg.to_string()]);
            c
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut g = common::Guard(child);
        g.read_until("swapping", Duration::from_secs(20));
        Some(g)
    }

    /// Runs one case in the attacker VM.
    fn run_in_vm(&self, case: &Case) -> Outcome {
        let before = self.hits();
        let racer = self.start_racer(case, true);
        let started = Instant::now();
        let mut cmd = self.env.cmd(&["run", "evil", "--", PYTHON]);
        cmd.args([
            "-c",
            PROBES,
            case.probe,
            case.target.arg(),
            &self.ctx_vm.to_string(),
        ]);
        let out = output_with_timeout(cmd, Duration::from_secs(120));
        drop(racer);
        if matches!(case.probe, "signal" | "sigio" | "broker-signal") {
            // Signals are delivered asynchronously: give the catcher a moment to log them.
            std::thread::sleep(Duration::from_millis(100));
        }
        let after = self.hits();
        let mut outcome = Outcome::of(case, &out, started.elapsed());
        if case.probe == "lower-layer-writes" && file_state(&self.cow) != self.cow_state {
            outcome.hits.push(format!(
                "host file {} changed: {} (was {})",
                self.cow.display(),
                file_state(&self.cow),
                self.cow_state
            ));
        }
        outcome.hits.extend(
            after.0[before.0.len()..]
                .iter()
                .map(|h| format!("host {h}"))
                .chain(
                    after.1[before.1.len()..]
                        .iter()
                        .filter(|h| !h.starts_with("HIT allowed-"))
                        .map(|h| format!("victim {h}")),
                ),
        );
        let allowed = after.1[before.1.len()..]
            .iter()
            .filter(|h| h.starts_with("HIT allowed-race"))
            .count();
        if racer_expected(case) && allowed == 0 {
            outcome.problem = Some(
                "the race never reached the allowed socket: the monitor's resolution was not \
                 exercised"
                    .into(),
            );
        }
        outcome
    }

    /// Runs one case where its channel is open (see [`Control`]).
    fn run_as_control(&self, case: &Case) -> Outcome {
        let racer = self.start_racer(case, false);
        let started = Instant::now();
        let args = [
            "-c",
            PROBES,
            case.probe,
            case.target.arg(),
            &self.ctx_host.to_string(),
        ];
        let cmd = match case.control {
            InVictim(flags) => {
                let mut c = Command::new("nsenter");
                c.args(["--target", &self.victim_init.to_string()])
                    .args(flags)
                    .arg("--")
                    .arg(PYTHON)
                    .args(args);
                c
            }
            _ => {
                let mut c = Command::new(PYTHON);
                c.args(args);
                c
            }
        };
        let out = output_with_timeout(cmd, Duration::from_secs(120));
        drop(racer);
        Outcome::of(case, &out, started.elapsed())
    }

    /// Checks that nothing of the host changed that a probe touches.
    /// `after_vm`: the probes ran in the VM (on the host, lower-layer-writes changes the test's
    /// own file on purpose).
    fn check_host_unchanged(&self, after_vm: bool) {
        assert_eq!(
            nix::unistd::gethostname()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            self.hostname,
            "the host's name changed"
        );
        assert!(
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(self.host_fixture.child.id()).unwrap()),
                None
            )
            .is_ok(),
            "the host fixture died"
        );
        assert!(
            !after_vm || file_state(&self.cow) == self.cow_state,
            "the host file {} in the VMs' lower layer changed",
            self.cow.display()
        );
    }
}

fn racer_expected(case: &Case) -> bool {
    matches!(case.probe, "symlink-race" | "parent-race")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Open,
    Closed,
    Broken,
}

#[derive(Debug)]
struct Outcome {
    name: String,
    verdict: Verdict,
    detail: String,
    hits: Vec<String>,
    problem: Option<String>,
    took: Duration,
}

impl Outcome {
    fn of(case: &Case, out: &Output, took: Duration) -> Outcome {
        let text = stdout(out);
        let line = text.lines().find(|l| l.starts_with("VERDICT "));
        let (verdict, detail) = match line {
            Some(l) if l.starts_with("VERDICT OPEN") => {
                (Verdict::Open, l["VERDICT OPEN".len()..].trim().to_owned())
            }
            Some(l) if l.starts_with("VERDICT CLOSED") => (
                Verdict::Closed,
                l["VERDICT CLOSED".len()..].trim().to_owned(),
            ),
            _ => (
                Verdict::Broken,
                format!(
                    "no verdict ({}):\nstdout: {text}\nstderr: {}",
                    common::describe(out.status),
                    common::stderr(out)
                ),
            ),
        };
        Outcome {
            name: case.name(),
            verdict,
            detail,
            hits: Vec::new(),
            problem: None,
            took,
        }
    }

    fn escaped(&self) -> bool {
        self.verdict != Verdict::Closed || !self.hits.is_empty() || self.problem.is_some()
    }
}

/// Runs every case of `group` in the attacker VM; fails naming each case whose channel is open.
fn escape_group(group: Group) {
    let Some(lab) = Lab::new() else { return };
    let cases: Vec<&Case> = CASES.iter().filter(|c| c.group == group).collect();
    let outcomes: Vec<Outcome> = cases.iter().map(|c| lab.run_in_vm(c)).collect();
    lab.check_host_unchanged(true);
    let mut report = String::new();
    for o in &outcomes {
        report.push_str(&format!(
            "  {:<26} {:<7} {:>5} ms  {}{}{}\n",
            o.name,
            if o.escaped() { "OPEN" } else { "closed" },
            o.took.as_millis(),
            o.detail,
            if o.hits.is_empty() {
                String::new()
            } else {
                format!(" [target hits: {}]", o.hits.join(", "))
            },
            o.problem
                .as_ref()
                .map(|p| format!(" [{p}]"))
                .unwrap_or_default(),
        ));
    }
    eprintln!("escape cases ({group:?}):\n{report}");
    let open: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.escaped())
        .map(|o| o.name.as_str())
        .collect();
    assert!(
        open.is_empty(),
        "{} of {} escape cases found an open channel (or a broken probe): {open:?} (details above)",
        open.len(),
        outcomes.len()
    );
}

#[test]
fn processes_of_the_host_and_other_vms_are_out_of_reach() {
    escape_group(Processes);
}

#[test]
fn sockets_of_the_host_and_other_vms_are_out_of_reach() {
    escape_group(Sockets);
}

#[test]
fn ipc_objects_of_the_host_and_other_vms_are_out_of_reach() {
    escape_group(Ipc);
}

#[test]
fn privileged_kernel_operations_are_refused() {
    escape_group(Kernel);
}

#[test]
fn host_files_and_other_vms_files_are_out_of_reach() {
    escape_group(Files);
}

#[test]
fn races_against_the_monitor_never_reach_the_host_or_an_unallowed_server() {
    escape_group(Races);
}

#[test]
fn every_case_has_a_probe_and_the_suite_is_complete() {
    let names: std::collections::BTreeSet<String> = CASES.iter().map(Case::name).collect();
    assert_eq!(names.len(), CASES.len(), "case names must be unique");
    assert!(CASES.len() >= 40, "the suite has {} cases", CASES.len());
    for c in CASES {
        assert!(
            PROBES.contains(&format!("@probe(\"{}\")", c.probe)),
            "case {} has no probe in escape/probes.py",
            c.name()
        );
    }
    for line in PROBES.lines() {
        if let Some(name) = line
            .strip_prefix("@probe(\"")
            .and_then(|r| r.strip_suffix("\")"))
        {
            assert!(
                CASES.iter().any(|c| c.probe == name),
                "probe {name} in escape/probes.py belongs to no case"
            );
        }
    }
}

/// Runs every probe where its channel is open and counts how many detect it. Run it with
/// `scripts/escape-on-host.sh` (or `--run-ignored only`); it changes nothing on the host.
#[test]
#[ignore = "runs the probes on the host itself; scripts/escape-on-host.sh"]
fn probes_detect_open_channels_on_the_host() {
    let Some(lab) = Lab::new() else { return };
    let mut report = String::new();
    let (mut detected, mut required, mut missed) = (0, 0, Vec::new());
    for case in CASES {
        let o = lab.run_as_control(case);
        let open = o.verdict == Verdict::Open;
        detected += usize::from(open);
        let (how, must) = match case.control {
            H => ("host".to_owned(), true),
            InVictim(flags) => (format!("host, nsenter {}", flags.join(" ")), true),
            HWP(why) => (format!("host when present: {why}"), false),
            Unprovable(why) => (format!("unprovable: {why}"), false),
        };
        required += usize::from(must);
        if must && !open {
            missed.push(o.name.clone());
        }
        report.push_str(&format!(
            "  {:<26} {:<13} {:>5} ms  ({how}) {}\n",
            o.name,
            match o.verdict {
                Verdict::Open => "detects OPEN",
                Verdict::Closed => "closed",
                Verdict::Broken => "BROKEN",
            },
            o.took.as_millis(),
            o.detail
        ));
    }
    lab.check_host_unchanged(false);
    eprintln!(
        "probes on the host:\n{report}{detected} of {} cases detect the open channel on the host \
         ({required} are required to)",
        CASES.len()
    );
    assert!(
        missed.is_empty(),
        "these probes did not detect their channel open on the host: {missed:?}\n{report}"
    );
}
