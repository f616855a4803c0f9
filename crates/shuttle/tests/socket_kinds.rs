//! Every kind of socket a `connect` rule covers, both ways: seqpacket and datagram unix sockets
//! by path (including the longest path sun_path holds), abstract stream and datagram sockets,
//! UDP (connected, and unconnected with replies), TCP over IPv6; and the guarantee that a
//! socket Shuttle lent into another VM's network reaches nothing there but what a rule allowed.
#![allow(clippy::unwrap_used)]

mod common;

use common::{audit_records as audit, load_policy as load};

use common::{assert_success, stdout, Env};
use serde_json::Value;

/// A directory whose socket path is exactly 107 bytes long, the most sun_path can hold.
fn long_dir() -> String {
    let path_len = 107;
    let tail = "/x.sock".len();
    format!("/run/{}", "d".repeat(path_len - tail - "/run/".len()))
}

/// Servers in VM db for every kind; each answers with what it is. Datagrams by path (which
/// cannot be answered: the sender's path lives in its own VM) are logged to /tmp/got.log.
fn serve_all(env: &Env) {
    let code = format!(
        r#"
import os, socket, sys, select
if os.fork(): sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
os.makedirs("{long}", exist_ok=True)
def unix(kind, path):
    s = socket.socket(socket.AF_UNIX, kind); s.bind(path)
    if path[0] != "\0": os.chmod(path, 0o777)
    if kind != socket.SOCK_DGRAM: s.listen(16)
    return s
seq = unix(socket.SOCK_SEQPACKET, "/run/seq.sock")
dg = unix(socket.SOCK_DGRAM, "/run/dg.sock")
abs_stream = unix(socket.SOCK_STREAM, "\0shuttle-abs")
abs_dg = unix(socket.SOCK_DGRAM, "\0shuttle-absdg")
longs = unix(socket.SOCK_STREAM, "{long}/x.sock")
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.1", 7001))
tcp6 = socket.socket(socket.AF_INET6); tcp6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp6.bind(("::1", 7002)); tcp6.listen(16)
answers = {{seq: b"seq", abs_stream: b"abs", longs: b"long", tcp6: b"tcp6"}}
while True:
    for s in select.select(list(answers) + [dg, abs_dg, udp], [], [])[0]:
        if s in answers:
            c, _ = s.accept(); c.send(answers[s]); c.close()
        elif s is dg:
            data = s.recv(1000)
            with open("/tmp/got.log", "ab") as f: f.write(data + b"\n")
        else:
            data, peer = s.recvfrom(1000)
            try:
                s.sendto(b"re:" + data, peer)
            except OSError:
                pass
"#,
        long = long_dir()
    );
    assert_success(&env.exec("db", &["python3", "-c", &code]), "servers");
    env.py_ok(
        "db",
        "import socket,time\nfor _ in range(100):\n    try:\n        s=socket.socket(socket.AF_INET6); s.connect(('::1',7002)); break\n    except OSError: time.sleep(0.05)\n",
    );
}

/// One rule per kind: app may reach db's servers.
fn policy() -> String {
    let long = format!("unix:{}/x.sock", long_dir());
    [
        "unix:/run/seq.sock",
        "unix:/run/dg.sock",
        "abstract:shuttle-abs",
        "abstract:shuttle-absdg",
        "udp:7001",
        "tcp:7002",
        &long,
    ]
    .iter()
    .map(|o| {
        format!("[[rule]]\nop = \"connect\"\nfrom = \"app\"\nto = \"db\"\nobject = \"{o}\"\naction = \"allow\"\n\n")
    })
    .collect()
}

/// Tries every kind from a VM; prints one line per case.
const CLIENT: &str = r#"
import ctypes, errno, socket, sys, threading
long = sys.argv[1]
def case(name, f):
    try:
        r = f()
    except socket.timeout:
        r = "timeout"
    except OSError as e:
        r = "errno %d" % e.errno
    print(name, r if isinstance(r, str) else r.decode())
def stream(fam, kind, addr):
    s = socket.socket(fam, kind); s.settimeout(3); s.connect(addr); return s.recv(100)
def reply(s, data, addr):
    s.settimeout(2); s.sendto(data, addr); return s.recv(100)
case("seqpacket", lambda: stream(socket.AF_UNIX, socket.SOCK_SEQPACKET, "/run/seq.sock"))
case("unix-dgram", lambda: "sent %d" % socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"hello-dg", "/run/dg.sock"))
case("abstract", lambda: stream(socket.AF_UNIX, socket.SOCK_STREAM, "\0shuttle-abs"))
case("abstract-dgram", lambda: reply(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), b"a", "\0shuttle-absdg"))
case("long-path", lambda: stream(socket.AF_UNIX, socket.SOCK_STREAM, long + "/x.sock"))
case("tcp6", lambda: stream(socket.AF_INET6, socket.SOCK_STREAM, ("::1", 7002)))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
case("udp-sendto", lambda: reply(u, b"one", ("127.0.0.1", 7001)))
case("udp-sendto-again", lambda: reply(u, b"two", ("127.0.0.1", 7001)))
def connected():
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(2)
    c.connect(("127.0.0.1", 7001)); c.send(b"conn"); return c
c = None
def udp_connected():
    global c
    c = connected(); return c.recv(100)
case("udp-connected", udp_connected)
if sys.argv[2] == "attack":
    # The lent UDP socket lives in db's network: aiming it at another port there is refused.
    case("lent-udp-elsewhere", lambda: "sent %d" % c.sendto(b"x", ("127.0.0.1", 9)))
    case("lent-udp-reconnect", lambda: c.connect(("127.0.0.1", 9)) or "connected")
    # A lent TCP socket cannot be disconnected (and so never re-aimed).
    t = socket.socket(socket.AF_INET6); t.connect(("::1", 7002))
    libc = ctypes.CDLL(None, use_errno=True)
    unspec = (ctypes.c_ubyte * 16)()
    r = libc.connect(t.fileno(), unspec, 16)
    print("lent-tcp-disconnect", "ok" if r == 0 else "errno %d" % ctypes.get_errno())
    # The VM's own sockets still work as ever, from a second thread too (the monitor then
    # carries the call out on the very socket it checked).
    own = socket.socket(); own.bind(("127.0.0.1", 7100)); own.listen(4)
    res = []
    def th():
        try:
            x = socket.socket(); x.connect(("127.0.0.1", 7100)); res.append("connected")
        except OSError as e:
            res.append("errno %d" % e.errno)
    tt = threading.Thread(target=th); tt.start(); tt.join()
    print("own-from-thread", res[0])
    z = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); z.bind(("127.0.0.1", 7101))
    case("own-udp", lambda: "sent %d" % socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"me", ("127.0.0.1", 7101)))
    case("own-udp-received", lambda: (z.settimeout(2), z.recv(10))[1])
"#;

fn run_client(env: &Env, vm: &str, mode: &str) -> std::collections::BTreeMap<String, String> {
    let out = env.output(&["run", vm, "--", "python3", "-c", CLIENT, &long_dir(), mode]);
    assert_success(&out, "client");
    stdout(&out)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn every_socket_kind_crosses_when_allowed() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("app", &[]);
    serve_all(&env);
    load(&env, &policy());
    let got = run_client(&env, "app", "plain");
    let expect = [
        ("seqpacket", "seq"),
        ("unix-dgram", "sent 8"),
        ("abstract", "abs"),
        ("abstract-dgram", "re:a"),
        ("long-path", "long"),
        ("tcp6", "tcp6"),
        ("udp-sendto", "re:one"),
        ("udp-sendto-again", "re:two"),
        ("udp-connected", "re:conn"),
    ];
    for (case, want) in expect {
        assert_eq!(
            got.get(case).map(String::as_str),
            Some(want),
            "{case}: {got:?}"
        );
    }
    assert_eq!(
        env.run_ok("db", "cat /tmp/got.log").trim(),
        "hello-dg",
        "the datagram by path reached db"
    );
    let sends = audit(&env)
        .into_iter()
        .filter(|r| r["op"] == "send" && r["result"] == "allow")
        .count();
    assert!(sends >= 4, "every allowed datagram is audited");
    let counts = &env.vm("app")["intercepted"];
    assert!(counts["crossed"].as_u64().unwrap() >= 9, "{counts}");
}

#[test]
fn without_a_rule_every_kind_stays_in_the_callers_vm_and_is_audited() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("other", &[]);
    serve_all(&env);
    load(&env, &policy());
    let got = run_client(&env, "other", "plain");
    // What the same calls give in a VM where nothing listens, without Shuttle.
    let expect = [
        ("seqpacket", "errno 2"),
        ("unix-dgram", "errno 2"),
        ("abstract", "errno 111"),
        ("abstract-dgram", "errno 111"),
        ("long-path", "errno 2"),
        ("tcp6", "errno 111"),
        ("udp-sendto", "timeout"),
        ("udp-connected", "errno 111"),
    ];
    for (case, want) in expect {
        assert_eq!(
            got.get(case).map(String::as_str),
            Some(want),
            "{case}: {got:?}"
        );
    }
    assert!(
        env.run("db", "test -e /tmp/got.log").status.code() == Some(1),
        "no datagram reached db"
    );
    let denials: Vec<Value> = audit(&env)
        .into_iter()
        .filter(|r| r["from"] == "other" && r["result"] == "deny")
        .collect();
    for object in [
        "unix:/run/seq.sock",
        "unix:/run/dg.sock",
        "abstract:shuttle-abs",
        "abstract:shuttle-absdg",
        "udp:7001",
        "tcp:7002",
    ] {
        assert!(
            denials.iter().any(|r| r["object"] == object),
            "{object} not audited: {denials:?}"
        );
    }
}

#[test]
fn a_lent_socket_reaches_nothing_else_in_the_other_vm() {
    let Some(env) = Env::new() else { return };
    env.create("db", &[]);
    env.create("app", &[]);
    serve_all(&env);
    // Something in db that app must never reach: a UDP port and a TCP port with no rule.
    let sink = r#"
import os, socket, sys
if os.fork(): sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 9))
d = s.recv(100)
open("/tmp/leak", "wb").write(d)
"#;
    assert_success(&env.exec("db", &["python3", "-c", sink]), "sink");
    load(&env, &policy());
    let got = run_client(&env, "app", "attack");
    assert_eq!(got["udp-connected"], "re:conn", "{got:?}");
    assert_eq!(got["lent-udp-elsewhere"], "errno 106", "EISCONN: {got:?}");
    assert_eq!(got["lent-udp-reconnect"], "errno 106", "EISCONN: {got:?}");
    assert_eq!(
        got["lent-tcp-disconnect"], "errno 95",
        "EOPNOTSUPP: {got:?}"
    );
    assert_eq!(got["own-from-thread"], "connected", "{got:?}");
    assert_eq!(got["own-udp"], "sent 2", "{got:?}");
    assert_eq!(got["own-udp-received"], "me", "{got:?}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        env.run("db", "test -e /tmp/leak").status.code() == Some(1),
        "a datagram leaked to db's port 9"
    );
}
