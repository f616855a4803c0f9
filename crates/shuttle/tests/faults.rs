//! Faults, end to end with the real binaries (issue 7): the broker killed under load, a VM's
//! monitor killed, a VM's init killed, the audit journal's disk full, and policy reloads in the
//! middle of traffic. In every case enforcement must go on or fail closed, every decision must
//! be in the audit trail, and nothing may be left behind.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{assert_success, stdout, wait_for, Env, Guard};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// Serves, in the VM it runs in, `/run/db.sock` and loopback TCP port 7000 (every connection
/// gets `db N\n`, N counting the connections accepted on either, then is closed) and
/// `/run/echo.sock` (connections kept open, everything echoed back).
const SERVER: &str = r#"
import os, select, socket, sys
if os.fork(): sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
def unix(path):
    if os.path.exists(path): os.unlink(path)  # left by a run before a restart
    s = socket.socket(socket.AF_UNIX); s.bind(path); os.chmod(path, 0o777); s.listen(512)
    return s
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", 7000)); t.listen(512)
u, e = unix("/run/db.sock"), unix("/run/echo.sock")
accepted, echoes = 0, []
while True:
    for s in select.select([u, t, e] + echoes, [], [])[0]:
        if s in (u, t):
            c, _ = s.accept()
            accepted += 1
            try:
                c.sendall(b"db %d\n" % accepted)
            except OSError:
                pass
            c.close()
        elif s is e:
            echoes.append(s.accept()[0])
        else:
            try:
                d = s.recv(4096)
            except OSError:
                d = b""
            if d:
                s.sendall(d)
            else:
                echoes.remove(s); s.close()
"#;

/// Connects in a loop until `/tmp/stop` exists, to every target named on the command line
/// (`NAME=unix:/PATH` or `NAME=tcp:PORT`), and counts the outcomes per phase: the phase is the
/// number of `/tmp/phaseN` files that existed (N = 1, 2, ...) when the attempt started. With
/// `--echo`, it also keeps one connection to `/run/echo.sock` open from start to end and checks
/// it every ten rounds. With `--log PATH`, it appends `TARGET OUTCOME` to PATH (flushed) the
/// first time it sees each, so that what a client killed with its VM saw survives it in the VM's
/// upper layer. Prints `started` once it runs, then the counts as JSON at the end:
/// `{phase: {target: {outcome: count}}}`, outcome `ok` (connected, and the server answered
/// `db N`), `errnoE` (connect failed), `recv-errnoE` (connected, but the answer failed) or
/// `bad` (connected, wrong answer).
const CLIENT: &str = r#"
import json, os, socket, sys
targets = []
echo = log = None
args = iter(sys.argv[1:])
for arg in args:
    if arg == "--echo":
        echo = socket.socket(socket.AF_UNIX); echo.connect("/run/echo.sock")
        continue
    if arg == "--log":
        log = open(next(args), "a")
        continue
    name, kind, where = arg.replace("=", ":", 1).split(":", 2)
    if kind == "unix":
        targets.append((name, socket.AF_UNIX, where))
    else:
        targets.append((name, socket.AF_INET, ("127.0.0.1", int(where))))
for f in os.listdir("/tmp"):
    if f == "stop" or f.startswith("phase"): os.unlink("/tmp/" + f)  # an earlier client's
counts, phase, rounds = {}, 0, 0
def count(what, outcome):
    if log is not None and not any(what in p and outcome in p[what] for p in counts.values()):
        log.write("%s %s\n" % (what, outcome)); log.flush()
    per = counts.setdefault(str(phase), {}).setdefault(what, {})
    per[outcome] = per.get(outcome, 0) + 1
print("started", flush=True)
while not os.path.exists("/tmp/stop"):
    if os.path.exists("/tmp/phase%d" % (phase + 1)):
        phase += 1
    for name, fam, addr in targets:
        s = socket.socket(fam)
        try:
            s.connect(addr)
        except OSError as e:
            count(name, "errno%d" % e.errno); s.close(); continue
        try:
            count(name, "ok" if s.recv(64).startswith(b"db ") else "bad")
        except OSError as e:
            count(name, "recv-errno%d" % e.errno)
        s.close()
    rounds += 1
    if echo is not None and rounds % 10 == 0:
        try:
            echo.sendall(b"ping"); count("echo", "ok" if echo.recv(16) == b"ping" else "bad")
        except OSError as e:
            count("echo", "errno%d" % e.errno)
print(json.dumps(counts), flush=True)
"#;

/// `{phase: {target: {outcome: count}}}`, as the client prints it.
type Counts = BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>;

/// The client, started in VM `vm`: stop it (and get its counts) with [`Client::finish`].
struct Client {
    vm: String,
    guard: Guard,
}

impl Client {
    fn start(env: &Env, vm: &str, targets: &[&str]) -> Client {
        let mut args = vec!["run", vm, "--", "python3", "-c", CLIENT];
        args.extend_from_slice(targets);
        let child = env
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the client");
        let mut guard = Guard(child);
        guard.read_until("started\n", Duration::from_secs(20));
        Client {
            vm: vm.to_owned(),
            guard,
        }
    }

    /// Starts phase `n` (1, 2, ...) of the client's counts.
    fn phase(&self, env: &Env, n: u32) {
        env.run_ok(&self.vm, &format!("touch /tmp/phase{n}"));
    }

    /// Stops the client and returns its counts.
    fn finish(mut self, env: &Env) -> Counts {
        env.run_ok(&self.vm, "touch /tmp/stop");
        let st = self.guard.wait_timeout(Duration::from_secs(20));
        let out = self.guard.rest_of_stdout();
        let mut err = String::new();
        if let Some(e) = self.guard.0.stderr.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut err);
        }
        assert!(st.success(), "the client failed ({st}): {out}{err}");
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("the client printed bad JSON ({e}): {out:?}"))
    }

    /// Waits for the `shuttle run` of a client whose VM went away; returns its exit status and
    /// stderr.
    fn ended(mut self) -> (std::process::ExitStatus, String) {
        let st = self.guard.wait_timeout(Duration::from_secs(20));
        let mut err = String::new();
        if let Some(e) = self.guard.0.stderr.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut err);
        }
        (st, err)
    }
}

/// How many attempts on `target` ended with `outcome` in `phase` (all phases for `None`).
fn tally(counts: &Counts, phase: Option<&str>, target: &str, outcome: &str) -> u64 {
    counts
        .iter()
        .filter(|(p, _)| phase.is_none_or(|want| want == p.as_str()))
        .filter_map(|(_, per)| per.get(target)?.get(outcome))
        .sum()
}

/// Every outcome seen for `target` in any phase.
fn outcomes(counts: &Counts, target: &str) -> Vec<String> {
    let mut all: Vec<String> = counts
        .values()
        .filter_map(|per| per.get(target))
        .flat_map(|o| o.keys().cloned())
        .collect();
    all.sort();
    all.dedup();
    all
}

fn serve(env: &Env, vm: &str) {
    assert_success(&env.exec(vm, &["python3", "-c", SERVER]), "server");
    let probe = "import socket,time\nfor _ in range(200):\n    try:\n        s=socket.socket(socket.AF_UNIX); s.connect('/run/db.sock'); s.recv(100); break\n    except OSError: time.sleep(0.05)\nelse: raise SystemExit('the server does not answer')\n";
    env.py_ok(vm, probe);
}

fn write_policy(env: &Env, name: &str, text: &str) -> String {
    let path = env.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn load(env: &Env, file: &str) {
    assert_success(&env.output(&["policy", "load", file]), "policy load");
}

fn audit(env: &Env) -> Vec<Value> {
    let out = env.output(&["audit", "--json"]);
    assert_success(&out, "audit");
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Audit records of `from` on `object` with `result`.
fn audited(records: &[Value], from: &str, object: &str, result: &str) -> u64 {
    records
        .iter()
        .filter(|r| r["from"] == from && r["object"] == object && r["result"] == result)
        .count() as u64
}

fn broker_pid(env: &Env) -> Option<i32> {
    std::fs::read_to_string(env.path().join("run/broker.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn gone(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_err() || common::is_zombie(pid)
}

fn sigkill(pid: i32, what: &str) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap_or_else(|e| panic!("killing {what}: {e}"));
    assert!(
        wait_for(Duration::from_secs(10), || gone(pid)),
        "{what} (pid {pid}) survived SIGKILL"
    );
}

/// Rules of the fault tests: app may reach db's servers; `/run/secret.sock` in db is published
/// to VM other only, so app's attempts on it are audited denials.
const POLICY: &str = r#"
[[rule]]
name = "app-db-unix"
op = "connect"
from = "app"
to = "db"
object = "unix:/run/db.sock"
action = "allow"

[[rule]]
name = "app-db-tcp"
op = "connect"
from = "app"
to = "db"
object = "tcp:7000"
action = "allow"

[[rule]]
name = "app-db-echo"
op = "connect"
from = "app"
to = "db"
object = "unix:/run/echo.sock"
action = "allow"

[[rule]]
name = "other-db-secret"
op = "connect"
from = "other"
to = "db"
object = "unix:/run/secret.sock"
action = "allow"
"#;

const TARGETS: [&str; 3] = [
    "unix=unix:/run/db.sock",
    "tcp=tcp:7000",
    "secret=unix:/run/secret.sock",
];

#[test]
fn a_broker_killed_under_load_stops_no_enforcement_and_loses_no_record() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("app", &[]);
    serve(&env, "db");
    load(&env, &write_policy(&env, "policy.toml", POLICY));

    let mut args = vec!["--echo"];
    args.extend_from_slice(&TARGETS);
    let client = Client::start(&env, "app", &args);
    std::thread::sleep(Duration::from_millis(700));
    let broker = broker_pid(&env).expect("the broker runs after `policy load`");
    sigkill(broker, "the broker");
    client.phase(&env, 1);
    // Down for a while: VMs run, monitors decide and journal on their own.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(env.state("app"), "running");
    assert_eq!(env.state("db"), "running");
    let mut daemon = Guard(
        Command::new(Env::bin())
            .arg("daemon")
            .env("SHUTTLE_ROOT", env.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let new_pid = daemon.0.id() as i32;
    assert!(
        wait_for(Duration::from_secs(10), || broker_pid(&env)
            == Some(new_pid)
            && env.path().join("run/broker.sock").exists()),
        "the restarted broker did not come up"
    );
    client.phase(&env, 2);
    std::thread::sleep(Duration::from_millis(700));
    let counts = client.finish(&env);
    eprintln!("client counts: {counts:?}");

    // Enforcement never stopped: before, while the broker was down, and after.
    for phase in ["0", "1", "2"] {
        for target in ["unix", "tcp"] {
            assert!(
                tally(&counts, Some(phase), target, "ok") > 0,
                "phase {phase}: no allowed {target} connect succeeded: {counts:?}"
            );
        }
        assert!(
            tally(&counts, Some(phase), "secret", "errno2") > 0,
            "phase {phase}: no denied connect was tried: {counts:?}"
        );
        assert!(
            tally(&counts, Some(phase), "echo", "ok") > 0,
            "phase {phase}: the established connection was not checked: {counts:?}"
        );
    }
    // Allowed ones always succeeded, denied ones always resolved in app itself (nothing there),
    // the established connection always echoed.
    assert_eq!(outcomes(&counts, "unix"), ["ok"], "{counts:?}");
    assert_eq!(outcomes(&counts, "tcp"), ["ok"], "{counts:?}");
    assert_eq!(outcomes(&counts, "secret"), ["errno2"], "{counts:?}");
    assert_eq!(outcomes(&counts, "echo"), ["ok"], "{counts:?}");

    // Every decision is in the audit store now, once.
    let allowed_unix = tally(&counts, None, "unix", "ok");
    let allowed_tcp = tally(&counts, None, "tcp", "ok");
    let denied = tally(&counts, None, "secret", "errno2");
    let records = audit(&env);
    let seen = |object, result| audited(&records, "app", object, result);
    assert_eq!(
        (
            seen("unix:/run/db.sock", "allow"),
            seen("tcp:7000", "allow"),
            seen("unix:/run/secret.sock", "deny"),
            seen("unix:/run/echo.sock", "allow"),
        ),
        (allowed_unix, allowed_tcp, denied, 1),
        "audit records (allowed unix, allowed tcp, denied, echo) vs the client's own counts"
    );
    let errors: Vec<&Value> = records.iter().filter(|r| r["result"] == "error").collect();
    assert!(errors.is_empty(), "{errors:?}");
    eprintln!(
        "{} connects in {} records, all audited",
        allowed_unix + allowed_tcp + denied,
        records.len()
    );
    kill(Pid::from_raw(new_pid), Signal::SIGTERM).unwrap();
    daemon.wait_timeout(Duration::from_secs(10));
}

/// What the VM's processes and the host hold for a VM that should be gone: processes in its
/// cgroups, the cgroup directories, its runtime directory, its lock, mounts under the
/// installation; empty when nothing is left.
fn leftovers(env: &Env, vm: &str, cgroups: &[PathBuf], monitor: i32) -> Vec<String> {
    let mut left = Vec::new();
    for d in cgroups {
        if d.exists() {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            left.push(format!(
                "cgroup {} (processes: {:?})",
                d.display(),
                procs.trim()
            ));
        }
    }
    if !gone(monitor) {
        left.push(format!("the monitor, pid {monitor}"));
    }
    if env.runtime_dir(vm).exists() {
        left.push(format!("{}", env.runtime_dir(vm).display()));
    }
    if env.lock_held(vm) {
        left.push(format!("the lock {}", env.lock_file(vm).display()));
    }
    let root = env.path().to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&root))
            .map(|l| format!("mount {l}")),
    );
    left
}

fn monitor_pid(env: &Env, vm: &str) -> i32 {
    let v = env.vm(vm);
    i32::try_from(
        v["monitor_pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("{vm}: {v}")),
    )
    .unwrap()
}

/// Every process of the VM (host pids), found through its cgroup directories.
fn processes(cgroups: &[PathBuf]) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroups
        .iter()
        .flat_map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// `TARGET OUTCOME` lines a client logged with `--log` into the VM's upper layer.
fn logged(env: &Env, vm: &str, path: &str) -> Vec<String> {
    let file = env.upper(vm).join(path.trim_start_matches('/'));
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    text.lines().map(str::to_owned).collect()
}

#[test]
fn a_killed_monitor_takes_its_vm_down_closed_and_leaves_it_restartable() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("app", &[]);
    serve(&env, "db");
    load(&env, &write_policy(&env, "policy.toml", POLICY));

    for round in 0..2 {
        let log = format!("/var/tmp/outcomes{round}");
        let mut args = vec!["--echo", "--log", &log];
        args.extend_from_slice(&TARGETS);
        let client = Client::start(&env, "app", &args);
        std::thread::sleep(Duration::from_millis(300));
        let cgroups = env.cgroup_dirs("app");
        let monitor = monitor_pid(&env, "app");
        let init = env.init_pid("app");
        assert!(processes(&cgroups).len() >= 2, "init and the client run");
        sigkill(monitor, "app's monitor");
        // init has PR_SET_PDEATHSIG: the VM dies with the monitor, and every process of the
        // VM's PID namespace with its init.
        assert!(
            wait_for(Duration::from_secs(5), || gone(init)),
            "app's init outlived its monitor"
        );
        assert!(
            wait_for(Duration::from_secs(5), || processes(&cgroups).is_empty()),
            "processes of app outlived its monitor: {:?}",
            processes(&cgroups)
        );
        let (status, stderr) = client.ended();
        eprintln!("round {round}: `shuttle run` ended with {status}: {stderr}");
        assert!(
            !status.success(),
            "the client cannot have finished normally"
        );
        assert_eq!(env.state("app"), "stopped");
        // What the client saw until it died: allowed connects reached db or failed, a denied
        // one never got through. Between the monitor's death and the VM's, an intercepted
        // call fails with ENOSYS (38): the kernel's answer when the notification listener is
        // gone (seccomp_unotify(2)), so that window fails closed too.
        let seen = logged(&env, "app", &log);
        eprintln!("round {round}: the client saw {seen:?}");
        for line in &seen {
            let (target, outcome) = line.split_once(' ').unwrap();
            match target {
                "secret" => assert!(
                    outcome == "errno2" || outcome == "errno38",
                    "a denied connect got through: {outcome}"
                ),
                _ => assert!(
                    outcome == "ok" || outcome.starts_with("errno"),
                    "{target}: {outcome}"
                ),
            }
        }
        // Stopping a VM that is already down says so; what the monitor would have cleaned up
        // is cleaned by the next start (round 0) or by `vm rm` (round 1).
        let msg = env.fails(&["vm", "stop", "app"]);
        assert!(msg.contains("not running"), "{msg}");
        if round == 0 {
            env.ok(&["vm", "start", "app"]);
            let out = env.py_ok(
                "app",
                "import socket\ns = socket.socket(socket.AF_UNIX); s.connect('/run/db.sock'); print(s.recv(64).decode().split()[0])",
            );
            assert_eq!(out.trim(), "db", "a mediated connect after the restart");
        } else {
            env.ok(&["vm", "rm", "app"]);
            let left = leftovers(&env, "app", &cgroups, monitor);
            assert!(left.is_empty(), "left after `vm rm`: {left:?}");
        }
    }
    // Every decision made before the kills was collected, none of them an error.
    let records = audit(&env);
    assert!(audited(&records, "app", "unix:/run/db.sock", "allow") > 0);
    assert!(audited(&records, "app", "unix:/run/secret.sock", "deny") > 0);
}

#[test]
fn a_killed_init_stops_its_vm_cleanly_and_connects_to_it_are_refused() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("app", &[]);
    serve(&env, "db");
    load(&env, &write_policy(&env, "policy.toml", POLICY));
    let client = Client::start(&env, "app", &TARGETS);
    std::thread::sleep(Duration::from_millis(300));

    // db's init killed from the host: its monitor reports it stopped and cleans up after it.
    let cgroups = env.cgroup_dirs("db");
    let (monitor, init) = (monitor_pid(&env, "db"), env.init_pid("db"));
    sigkill(init, "db's init");
    assert!(
        wait_for(Duration::from_secs(10), || leftovers(
            &env, "db", &cgroups, monitor
        )
        .is_empty()),
        "left after db's init was killed: {:?}",
        leftovers(&env, "db", &cgroups, monitor)
    );
    assert_eq!(env.state("db"), "stopped");
    client.phase(&env, 1);
    std::thread::sleep(Duration::from_millis(500));
    // Restartable, with what it wrote.
    client.phase(&env, 2);
    env.ok(&["vm", "start", "db"]);
    serve(&env, "db");
    client.phase(&env, 3);
    std::thread::sleep(Duration::from_millis(500));
    let counts = client.finish(&env);
    eprintln!("client counts: {counts:?}");
    // While db was down, app's allowed connects were refused (the rule's target is not
    // running); before and after they reached db. A denied one never got through.
    for target in ["unix", "tcp"] {
        assert!(tally(&counts, Some("0"), target, "ok") > 0, "{counts:?}");
        assert_eq!(
            counts["1"][target].keys().collect::<Vec<_>>(),
            ["errno111"],
            "{target}: refused while db is down: {counts:?}"
        );
        assert_eq!(
            counts["3"][target].keys().collect::<Vec<_>>(),
            ["ok"],
            "{target}: allowed again once db is back: {counts:?}"
        );
    }
    assert_eq!(outcomes(&counts, "secret"), ["errno2"], "{counts:?}");
    // Every refusal is audited as an error; every decision to allow as allowed, before the
    // connect in db (which may then fail, audited as an error after it).
    let records = audit(&env);
    for (target, object) in [("unix", "unix:/run/db.sock"), ("tcp", "tcp:7000")] {
        let (mut connected, mut refused) = (0, 0);
        for outcome in outcomes(&counts, target) {
            let n = tally(&counts, None, target, &outcome);
            if outcome.starts_with("errno") {
                refused += n;
            } else {
                connected += n;
            }
        }
        let failed_in_db = records
            .iter()
            .filter(|r| {
                r["from"] == "app"
                    && r["object"] == object
                    && r["result"] == "error"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|w| w.starts_with("connecting in the target failed"))
            })
            .count() as u64;
        assert_eq!(
            (
                audited(&records, "app", object, "allow"),
                audited(&records, "app", object, "error")
            ),
            (connected + failed_in_db, refused),
            "{target}: audit (allow, error) vs the client's counts {counts:?}"
        );
    }

    // app's own init killed: the `shuttle run` in it ends, app is stopped, nothing is left,
    // and it starts again.
    let client = Client::start(&env, "app", &TARGETS);
    let cgroups = env.cgroup_dirs("app");
    let (monitor, init) = (monitor_pid(&env, "app"), env.init_pid("app"));
    sigkill(init, "app's init");
    let (status, stderr) = client.ended();
    eprintln!("`shuttle run` in a VM whose init was killed: {status}: {stderr}");
    assert!(!status.success());
    assert!(
        wait_for(Duration::from_secs(10), || leftovers(
            &env, "app", &cgroups, monitor
        )
        .is_empty()),
        "left after app's init was killed: {:?}",
        leftovers(&env, "app", &cgroups, monitor)
    );
    assert_eq!(env.state("app"), "stopped");
    assert_eq!(env.run_ok("app", "echo again").trim(), "again");
}

/// Connects `ROUNDS` times to every target named (as for [`CLIENT`]) and prints, per target,
/// the outcome of every attempt as JSON: `ok N` (the server's connection count), `errnoE`,
/// `recv-errnoE` or `bad`.
const BURST: &str = r#"
import json, socket, sys
rounds, targets = int(sys.argv[1]), []
for arg in sys.argv[2:]:
    name, kind, where = arg.replace("=", ":", 1).split(":", 2)
    targets.append((name, socket.AF_UNIX, where) if kind == "unix" else (name, socket.AF_INET, ("127.0.0.1", int(where))))
seen = {name: [] for name, _, _ in targets}
for _ in range(rounds):
    for name, fam, addr in targets:
        s = socket.socket(fam)
        try:
            s.connect(addr)
        except OSError as e:
            seen[name].append("errno%d" % e.errno); s.close(); continue
        try:
            answer = s.recv(64).decode().split()
            seen[name].append("ok " + answer[1] if answer[:1] == ["db"] else "bad")
        except OSError as e:
            seen[name].append("recv-errno%d" % e.errno)
        s.close()
print(json.dumps(seen))
"#;

/// Outcomes of every attempt, per target, as [`BURST`] prints them.
fn burst(env: &Env, vm: &str, rounds: u32, targets: &[&str]) -> BTreeMap<String, Vec<String>> {
    let rounds = rounds.to_string();
    let mut args = vec!["python3", "-c", BURST, &rounds];
    args.extend_from_slice(targets);
    let out = env.exec(vm, &args);
    assert_success(&out, "burst client");
    serde_json::from_str(stdout(&out).trim()).unwrap()
}

/// The server's connection count in an `ok N` outcome.
fn accepted(outcome: &str) -> Option<u64> {
    outcome.strip_prefix("ok ")?.parse().ok()
}

/// A small tmpfs mounted on the host, unmounted (lazily: a monitor may hold files open there)
/// when dropped.
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(at: PathBuf, size: &str) -> TinyFs {
        std::fs::create_dir_all(&at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &at,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap_or_else(|e| panic!("mounting a tmpfs on {}: {e}", at.display()));
        TinyFs(at)
    }

    /// Fills the file system with `fill`; returns how many bytes it took.
    fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("fill")).unwrap();
        let block = vec![0u8; 4096];
        let mut written = 0;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.0.display()),
            }
        }
        written
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("fill")).unwrap();
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", self.0.display());
        }
    }
}

/// A write that fails for want of space leaves the journal as it was (the partial line is cut
/// off), so decisions work again as soon as there is room; only a failed `fdatasync` poisons
/// the journal until the monitor reopens it (the kernel may have dropped the pages), which a
/// tmpfs never reports.
#[test]
fn a_full_audit_disk_refuses_every_decision_and_says_why() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("app", &[]);
    // app's journal on a file system of its own, 1 MiB.
    let disk = TinyFs::mount(env.vm_dir("app").join("audit"), "1m");
    serve(&env, "db");
    load(&env, &write_policy(&env, "policy.toml", POLICY));

    let before = burst(&env, "app", 5, &TARGETS);
    assert!(
        before["unix"].iter().all(|o| o.starts_with("ok ")),
        "{before:?}"
    );
    assert!(before["secret"].iter().all(|o| o == "errno2"), "{before:?}");
    let last_accepted = before["tcp"]
        .iter()
        .filter_map(|o| accepted(o))
        .max()
        .unwrap();

    let filled = disk.fill();
    eprintln!("filled the journal's file system with {filled} bytes");
    let full = burst(&env, "app", 60, &TARGETS);
    eprintln!("with the disk full: {full:?}");
    // The space left in the journal's last page may take a few more records; then every
    // decision, allowed or denied, is refused: none can be recorded.
    for (target, seen) in &full {
        let tail = &seen[seen.len() - 40..];
        assert!(
            tail.iter().all(|o| o == "errno111"),
            "{target}: decisions that cannot be audited must be refused: {seen:?}"
        );
        assert!(
            seen.iter()
                .all(|o| o == "errno111" || o.starts_with("ok ") || o == "errno2"),
            "{target}: {seen:?}"
        );
    }
    let log = std::fs::read_to_string(env.run_vms().join("app.log")).unwrap();
    let refusals = log.lines().filter(|l| l.contains("refusing")).count();
    eprintln!(
        "{refusals} lines of the monitor's log say why, such as: {}",
        log.lines().find(|l| l.contains("refusing")).unwrap_or("")
    );
    assert!(
        !log.contains('\x1b'),
        "escape sequences in a log file:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("refusing") && l.contains("No space left on device")),
        "the monitor's log should say why decisions are refused:\n{log}"
    );

    disk.free();
    let after = burst(&env, "app", 5, &TARGETS);
    eprintln!("after freeing space: {after:?}");
    assert!(
        after["unix"].iter().all(|o| o.starts_with("ok ")),
        "{after:?}"
    );
    assert!(
        after["tcp"].iter().all(|o| o.starts_with("ok ")),
        "{after:?}"
    );
    assert!(after["secret"].iter().all(|o| o == "errno2"), "{after:?}");

    // A refused connect never reached the server: its count went up by the connects that
    // were allowed, no more.
    let oks_while_full = full["unix"]
        .iter()
        .chain(&full["tcp"])
        .filter(|o| o.starts_with("ok "))
        .count() as u64;
    let first_after = after["unix"]
        .iter()
        .filter_map(|o| accepted(o))
        .min()
        .unwrap();
    assert_eq!(
        first_after,
        last_accepted + oks_while_full + 1,
        "db accepted connections that app was refused"
    );

    // The audit trail has every decision that took effect, and nothing else.
    let records = audit(&env);
    let all = |target: &str| -> Vec<&String> {
        before[target]
            .iter()
            .chain(&full[target])
            .chain(&after[target])
            .collect()
    };
    for (target, object, result, outcome) in [
        ("unix", "unix:/run/db.sock", "allow", "ok "),
        ("tcp", "tcp:7000", "allow", "ok "),
        ("secret", "unix:/run/secret.sock", "deny", "errno2"),
    ] {
        let took_effect = all(target)
            .iter()
            .filter(|o| o.starts_with(outcome))
            .count() as u64;
        assert_eq!(
            audited(&records, "app", object, result),
            took_effect,
            "{target}: audit records vs decisions that took effect"
        );
    }
    env.ok(&["vm", "stop", "app"]);
    drop(disk);
}

#[test]
fn policy_reloads_in_the_middle_of_traffic_change_only_what_they_say() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("app", &[]);
    serve(&env, "db");
    // With: app may reach db. Without: the same objects are published to VM other only, so
    // app's attempts resolve in app itself (nothing there) and are audited as denials.
    let with = write_policy(&env, "with.toml", POLICY);
    let without = write_policy(
        &env,
        "without.toml",
        &POLICY
            .replace(
                "name = \"app-db-unix\"\nop = \"connect\"\nfrom = \"app\"",
                "name = \"app-db-unix\"\nop = \"connect\"\nfrom = \"other\"",
            )
            .replace(
                "name = \"app-db-tcp\"\nop = \"connect\"\nfrom = \"app\"",
                "name = \"app-db-tcp\"\nop = \"connect\"\nfrom = \"other\"",
            ),
    );
    assert_ne!(
        std::fs::read(&with).unwrap(),
        std::fs::read(&without).unwrap()
    );
    load(&env, &with);
    let client = Client::start(&env, "app", &TARGETS[..2]);
    for i in 0..12 {
        load(&env, if i % 2 == 0 { &without } else { &with });
        std::thread::sleep(Duration::from_millis(150));
    }
    let counts = client.finish(&env);
    eprintln!("client counts: {counts:?}");
    // Every connect either reached db or resolved in app; both happened.
    for (target, refused) in [("unix", "errno2"), ("tcp", "errno111")] {
        let seen = outcomes(&counts, target);
        assert!(
            seen.iter().all(|o| o == "ok" || o == refused),
            "{target}: only `ok` or {refused}: {counts:?}"
        );
        assert!(
            tally(&counts, None, target, "ok") > 0 && tally(&counts, None, target, refused) > 0,
            "{target}: both policies took effect: {counts:?}"
        );
    }
    // And the audit trail says exactly that.
    let records = audit(&env);
    for (target, object, refused) in [
        ("unix", "unix:/run/db.sock", "errno2"),
        ("tcp", "tcp:7000", "errno111"),
    ] {
        assert_eq!(
            (
                audited(&records, "app", object, "allow"),
                audited(&records, "app", object, "deny"),
                audited(&records, "app", object, "error"),
            ),
            (
                tally(&counts, None, target, "ok"),
                tally(&counts, None, target, refused),
                0
            ),
            "{target}: audit (allow, deny, error) vs the client's counts"
        );
    }
}
