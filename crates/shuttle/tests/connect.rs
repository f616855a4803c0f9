//! Cross-VM connections through mediated `connect`: allowed ones reach the server in the other
//! VM (with the caller's identity); others resolve in the caller's own VM, exactly as without
//! Shuttle, and are audited when the address is published to someone.
#![allow(clippy::unwrap_used)]

mod common;

use common::{audit_records as audit, load_policy as load};

use common::{assert_success, stdout, Env};
use serde_json::Value;

/// A server in `vm` answering every connection with "NAME uid=U" (U from SO_PEERCRED for unix
/// sockets) on a unix path and a loopback TCP port.
fn serve(env: &Env, vm: &str, path: &str, port: u16) {
    let code = format!(
        r#"
import os, socket, struct, sys, select
if os.fork(): sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("127.0.0.1", {port})); t.listen(64)
u = socket.socket(socket.AF_UNIX); u.bind("{path}"); os.chmod("{path}", 0o777); u.listen(64)
while True:
    r, _, _ = select.select([u, t], [], [])
    for s in r:
        c, _ = s.accept()
        uid = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1] if s is u else -1
        try:
            c.sendall(b"{vm} uid=%d\n" % uid)
        except OSError:
            pass  # a client that left early must not end the server
        c.close()
"#
    );
    let out = env.exec(vm, &["python3", "-c", &code]);
    assert_success(&out, "server");
    // Wait until it listens.
    let probe = format!("import socket,time\nfor _ in range(100):\n    try:\n        s=socket.socket(socket.AF_UNIX); s.connect('{path}'); s.recv(100); break\n    except OSError: time.sleep(0.05)\n");
    env.py_ok(vm, &probe);
}

const CLIENT: &str = r#"
import socket, sys
def go(fam, addr):
    try:
        s = socket.socket(fam); s.connect(addr); print(s.recv(100).decode().strip())
    except OSError as e:
        print("errno", e.errno)
kind, where = sys.argv[1], sys.argv[2]
go(socket.AF_UNIX, where) if kind == "unix" else go(socket.AF_INET, ("127.0.0.1", int(where)))
"#;

fn client(env: &Env, vm: &str, user: Option<&str>, kind: &str, target: &str) -> String {
    let mut args = vec!["run", vm];
    if let Some(u) = user {
        args.extend(["-u", u]);
    }
    args.extend(["--", "python3", "-c", CLIENT, kind, target]);
    stdout(&env.output(&args)).trim().to_owned()
}

/// VMs db (serving, see [`serve`]) and app, with [`POLICY`] loaded.
fn db_serving_app() -> Option<Env> {
    let env = Env::new()?;
    env.create("db", &[]);
    env.create("app", &[]);
    serve(&env, "db", "/run/db.sock", 7000);
    load(&env, POLICY);
    Some(env)
}

const POLICY: &str = r#"
[[rule]]
op = "connect"
from = "app"
to = "db"
object = "unix:/run/db.sock"
action = "allow"

[[rule]]
op = "connect"
from = "app"
to = "db"
object = "tcp:7000"
action = "allow"

[[rule]]
op = "connect"
from = "app"
to = "db"
object = "unix:/run/alias.sock"
target = "unix:/run/db.sock"
action = "allow"
"#;

#[test]
fn allowed_connections_reach_the_other_vm_with_the_callers_identity() {
    let Some(env) = Env::new() else { return };
    for vm in ["db", "app", "other"] {
        env.create(vm, &[]);
    }
    serve(&env, "db", "/run/db.sock", 7000);
    // Without a rule: the address resolves in app's own VM, where nothing listens.
    assert_eq!(client(&env, "app", None, "unix", "/run/db.sock"), "errno 2");
    load(&env, POLICY);
    assert_eq!(
        client(&env, "app", None, "unix", "/run/db.sock"),
        "db uid=0"
    );
    assert_eq!(
        client(&env, "app", Some("nobody"), "unix", "/run/db.sock"),
        "db uid=65534"
    );
    assert_eq!(
        client(&env, "app", Some("1234:99"), "unix", "/run/db.sock"),
        "db uid=1234"
    );
    assert_eq!(client(&env, "app", None, "tcp", "7000"), "db uid=-1");
    // Address translation: app asks for /run/alias.sock, reaches db's /run/db.sock.
    assert_eq!(
        client(&env, "app", None, "unix", "/run/alias.sock"),
        "db uid=0"
    );
    // A VM without a rule gets what it would get without Shuttle, and the attempt is audited.
    assert_eq!(
        client(&env, "other", None, "unix", "/run/db.sock"),
        "errno 2"
    );
    assert_eq!(client(&env, "other", None, "tcp", "7000"), "errno 111");
    let records = audit(&env);
    let denied: Vec<&Value> = records.iter().filter(|r| r["from"] == "other").collect();
    assert_eq!(denied.len(), 2, "{records:?}");
    assert!(denied
        .iter()
        .all(|r| r["result"] == "deny" && r["op"] == "connect"));
    let allowed = records
        .iter()
        .filter(|r| r["from"] == "app" && r["result"] == "allow")
        .count();
    assert_eq!(allowed, 5, "{records:?}");
}

#[test]
fn a_vm_keeps_its_own_server_at_an_address_published_elsewhere() {
    let Some(env) = Env::new() else { return };
    for vm in ["db", "app", "other"] {
        env.create(vm, &[]);
    }
    load(&env, POLICY);
    serve(&env, "db", "/run/db.sock", 7000);
    serve(&env, "other", "/run/db.sock", 7000);
    assert_eq!(
        client(&env, "other", None, "unix", "/run/db.sock"),
        "other uid=0"
    );
    assert_eq!(client(&env, "other", None, "tcp", "7000"), "other uid=-1");
    assert_eq!(client(&env, "app", None, "tcp", "7000"), "db uid=-1");
}

#[test]
fn ordinary_connections_inside_a_vm_are_untouched() {
    let Some(env) = Env::new() else { return };
    env.create("solo", &[]);
    serve(&env, "solo", "/run/local.sock", 7100);
    assert_eq!(
        client(&env, "solo", Some("nobody"), "unix", "/run/local.sock"),
        "solo uid=65534"
    );
    assert_eq!(client(&env, "solo", None, "tcp", "7100"), "solo uid=-1");
    // Nothing published, nothing audited: only counted.
    assert!(audit(&env).is_empty());
    let counts = &env.vm("solo")["intercepted"];
    assert!(counts["local"].as_u64().unwrap() >= 2, "{counts}");
    assert_eq!(counts["crossed"], 0, "{counts}");
    assert_eq!(counts["refused"], 0, "{counts}");
}

#[test]
fn a_rule_for_a_stopped_vm_refuses_the_connection() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("app", &[]);
    load(&env, POLICY);
    assert_eq!(client(&env, "app", None, "tcp", "7000"), "errno 111");
    let records = audit(&env);
    assert_eq!(records.last().unwrap()["result"], "error", "{records:?}");
}

#[test]
fn an_established_connection_outlives_a_killed_broker() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("app", &[]);
    // An echo server in db; app talks to it before and after the broker is killed.
    let echo = r#"
import os, socket, sys
if os.fork(): sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
u = socket.socket(socket.AF_UNIX); u.bind("/run/echo.sock"); os.chmod("/run/echo.sock", 0o777); u.listen(8)
c, _ = u.accept()
while True:
    d = c.recv(100)
    if not d: break
    c.sendall(d)
"#;
    assert_success(&env.exec("db", &["python3", "-c", echo]), "echo server");
    load(&env, "[[rule]]\nop = \"connect\"\nfrom = \"app\"\nto = \"db\"\nobject = \"unix:/run/echo.sock\"\naction = \"allow\"\n");
    let talk = r#"
import os, signal, socket, sys, time
s = socket.socket(socket.AF_UNIX)
for _ in range(100):
    try:
        s.connect("/run/echo.sock"); break
    except OSError: time.sleep(0.05)
s.sendall(b"before"); print(s.recv(100).decode())
open("/tmp/connected", "w").close()
while not os.path.exists("/tmp/go"): time.sleep(0.02)
s.sendall(b"after"); print(s.recv(100).decode())
"#;
    let mut client = std::process::Command::new(Env::bin())
        .args(["run", "app", "--", "python3", "-c", talk])
        .env("SHUTTLE_ROOT", env.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(common::wait_for(std::time::Duration::from_secs(10), || {
        env.run("app", "test -e /tmp/connected").status.success()
    }));
    let pid: i32 = std::fs::read_to_string(env.path().join("run/broker.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    env.run_ok("app", "touch /tmp/go");
    let mut out = String::new();
    std::io::Read::read_to_string(client.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(client.wait().unwrap().success());
    assert_eq!(out, "before\nafter\n");
    let records = audit(&env);
    assert!(
        records
            .iter()
            .all(|r| r["caller"]["pid_in_vm"].as_i64().is_some()),
        "{records:?}"
    );
}

#[test]
fn tcp_options_set_before_a_mediated_connect_are_kept() {
    let Some(env) = db_serving_app() else { return };
    // libpq, for one, sets TCP_NODELAY and keepalives on its socket before connecting.
    let code = r#"
import socket
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
s.connect(("127.0.0.1", 7000))
print(s.recv(100).decode().strip())
print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
      s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
      s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))
"#;
    assert_eq!(env.py_ok("app", code), "db uid=-1\nTrue True 77\n");
}

/// A socket injected in the caller's place keeps what the caller made: its descriptor number,
/// its type, blocking or not, close-on-exec or not (TCP, where the socket is replaced, and a
/// unix path, where the caller's own is connected).
#[test]
fn a_mediated_socket_keeps_the_callers_number_and_flags() {
    let Some(env) = db_serving_app() else { return };
    let code = r#"
import os, select, socket
for fam, addr in ((socket.AF_INET, ("127.0.0.1", 7000)), (socket.AF_UNIX, "/run/db.sock")):
    for blocking in (True, False):
        for inheritable in (False, True):
            s = socket.socket(fam)
            s.setblocking(blocking); os.set_inheritable(s.fileno(), inheritable)
            fd = s.fileno()
            err = s.connect_ex(addr)
            if err:
                select.select([s], [], [], 5)
            got = s.recv(100).decode().strip() if blocking else (select.select([s], [], [], 5), s.recv(100).decode().strip())[1]
            print(fam == socket.AF_INET and "tcp" or "unix", blocking, inheritable, err,
                  s.fileno() == fd, os.get_blocking(fd) == blocking, os.get_inheritable(fd) == inheritable,
                  s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM, got)
            s.close()
"#;
    let out = env.py_ok("app", code);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}");
    for line in lines {
        // A mediated connect is complete when it returns, even on a non-blocking socket.
        let uid = if line.starts_with("tcp") { -1 } else { 0 };
        assert!(
            line.ends_with(&format!(" 0 True True True True db uid={uid}")),
            "{line} (all: {out})"
        );
    }
}

/// Permission checks on a socket in another VM use the caller's own identity, never the
/// monitor's: root's group does not open a root:root 0660 socket to uid 1234, a supplementary
/// group the caller holds opens a root:4242 one, and without it that one is refused too; a
/// socket in a directory the caller cannot search there is refused as it would be there.
#[test]
fn permission_on_a_socket_across_vms_follows_the_callers_groups() {
    let Some(env) = Env::new() else { return };
    // Every VM command runs with root's group and 4242 (as under sudo), so the broker and the
    // monitors it starts hold them.
    let with_groups = |args: &[&str]| {
        let out = std::process::Command::new("setpriv")
            .args(["--groups=0,4242", "--", Env::bin()])
            .args(args)
            .env("SHUTTLE_ROOT", env.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_success(&out, &format!("shuttle {args:?} with groups 0 and 4242"));
    };
    for vm in ["db", "app"] {
        with_groups(&["vm", "create", vm]);
        with_groups(&["vm", "start", vm]);
    }
    let vms: Value = serde_json::from_str(&env.ok(&["vm", "ls", "--json"])).unwrap();
    let monitor = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "app")
        .and_then(|v| v["monitor_pid"].as_i64())
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{monitor}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Groups:") && l.contains("4242")),
        "the monitor should hold group 4242 for this test to mean anything: {status}"
    );
    let server = r#"
import os, socket, sys, select
if os.fork(): sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
socks = []
for path, gid in (("/run/root.sock", 0), ("/run/grp.sock", 4242)):
    s = socket.socket(socket.AF_UNIX); s.bind(path); os.chown(path, 0, gid); os.chmod(path, 0o660); s.listen(8)
    socks.append(s)
os.mkdir("/run/private", 0o700)
s = socket.socket(socket.AF_UNIX); s.bind("/run/private/p.sock"); os.chmod("/run/private/p.sock", 0o777); s.listen(8)
socks.append(s)
open("/run/ready", "w").close()
while True:
    for s in select.select(socks, [], [])[0]:
        c, _ = s.accept(); c.sendall(b"ok\n"); c.close()
"#;
    serve_in_db_for_app(&env, server);
    let connect_as = |groups: &str, path: &str| {
        let out = env.exec(
            "app",
            &[
                "setpriv",
                "--reuid=1234",
                "--regid=99",
                &format!("--groups={groups}"),
                "--",
                "python3",
                "-c",
                CLIENT,
                "unix",
                path,
            ],
        );
        assert_success(&out, "client");
        stdout(&out).trim().to_owned()
    };
    // The monitor runs as root with root's groups; none of that may reach the caller.
    assert_eq!(connect_as("99", "/run/root.sock"), "errno 13");
    assert_eq!(connect_as("99", "/run/grp.sock"), "errno 13");
    assert_eq!(connect_as("99,4242", "/run/grp.sock"), "ok");
    // The socket itself is open to all, but uid 1234 cannot search /run/private in db.
    assert_eq!(connect_as("99,4242", "/run/private/p.sock"), "errno 13");
    // Root in app reaches them all, as root would in db.
    for path in ["/run/root.sock", "/run/private/p.sock"] {
        assert_eq!(
            stdout(&env.exec("app", &["python3", "-c", CLIENT, "unix", path])).trim(),
            "ok"
        );
    }
}

/// A target whose listener never accepts holds up only the connects waiting for it (six here):
/// another mediated connect and the VM's own connects go on at once (each mediator gives up
/// its turn at the listener before it waits, and another receiver starts when all wait), and
/// the waiting ones fail after the bound (ETIMEDOUT).
#[test]
fn a_target_that_never_accepts_holds_up_nothing_else() {
    let Some(env) = Env::new() else { return };
    for vm in ["db", "app"] {
        env.create(vm, &[]);
    }
    let server = r#"
import os, socket, sys, time
if os.fork(): sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
full = socket.socket(socket.AF_UNIX); full.bind("/run/full.sock"); full.listen(0)
# Fill its backlog from inside db: connects that nobody will ever accept.
held = []
while True:
    c = socket.socket(socket.AF_UNIX); c.setblocking(False)
    try:
        c.connect("/run/full.sock"); held.append(c)
    except BlockingIOError:
        break
ok = socket.socket(socket.AF_UNIX); ok.bind("/run/ok.sock"); ok.listen(8)
open("/run/ready", "w").close()
while True:
    c, _ = ok.accept(); c.sendall(b"ok\n"); c.close()
"#;
    serve_in_db_for_app(&env, server);
    let client = r#"
import os, socket, threading, time
res = {}
def stuck():
    s = socket.socket(socket.AF_UNIX); t = time.monotonic()
    try:
        s.connect("/run/full.sock"); res.setdefault("full", set()).add("connected")
    except OSError as e:
        res.setdefault("full", set()).add("errno %d after %d s" % (e.errno, round(time.monotonic() - t)))
# More waiting connects than a VM starts receivers with: another one starts whenever all wait.
ths = [threading.Thread(target=stuck) for _ in range(6)]
for th in ths: th.start()
time.sleep(0.5)
local = socket.socket(socket.AF_UNIX); local.bind("/tmp/local.sock"); local.listen(1)
t = time.monotonic()
c = socket.socket(socket.AF_UNIX); c.connect("/tmp/local.sock")
s = socket.socket(socket.AF_UNIX); s.connect("/run/ok.sock"); got = s.recv(10).decode().strip()
print("others", got, "in %.2f s" % (time.monotonic() - t), "while waiting" if all(th.is_alive() for th in ths) else "after")
for th in ths: th.join()
print("full", " ".join(sorted(res["full"])))
"#;
    let out = env.py_ok("app", client);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let others: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(&others[..2], ["others", "ok"], "{out}");
    let secs: f64 = others[3].parse().unwrap();
    assert!(secs < 1.0, "a stuck target held up other connects: {out}");
    assert!(lines[0].ends_with("while waiting"), "{out}");
    assert_eq!(lines[1], "full errno 110 after 5 s", "{out}");
}

/// Starts `server` (Python that creates /run/ready once it listens) in VM db, waits for it,
/// and lets app connect to db's unix sockets under /run.
fn serve_in_db_for_app(env: &Env, server: &str) {
    assert_success(&env.exec("db", &["python3", "-c", server]), "server");
    env.py_ok(
        "db",
        "import os,time\nwhile not os.path.exists('/run/ready'): time.sleep(0.02)",
    );
    load(
        env,
        r#"
[[rule]]
op = "connect"
from = "app"
to = "db"
object = "unix:/run/*.sock"
action = "allow"
"#,
    );
}
