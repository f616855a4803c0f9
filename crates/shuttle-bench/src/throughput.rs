//! `shuttle-bench --throughput`: bulk data over a connection Shuttle mediated, against a
//! direct connection inside one VM and against a `socat` relay, measured in one run.
//!
//! * direct: client and sink in VM tdb (one network and mount namespace);
//! * mediated: client in VM tapp, connected to the same sink through a `connect` rule: after
//!   the connect the kernel carries the bytes, so this should match direct (target ≥ 0.98×);
//! * relay: client in VM tdb through `socat` (a user-space relay, what a proxy-based design
//!   would put in the data path) to the same sink (target: mediated ≥ 2× relay).
//!
//! Every side runs the same Python client and sink; they alternate over several rounds and
//! medians are compared.

use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::Bench;

/// A sink on a unix path and a TCP port: reads each connection to its end, then answers "ok".
const SINK: &str = r#"
import os, socket, sys, select, threading
path, port = sys.argv[1], int(sys.argv[2])
if os.fork(): sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("127.0.0.1", port)); t.listen(16)
u = socket.socket(socket.AF_UNIX); u.bind(path); os.chmod(path, 0o777); u.listen(16)
def drain(c):
    buf = bytearray(1 << 20)
    while c.recv_into(buf):
        pass
    c.sendall(b"ok"); c.close()
while True:
    for s in select.select([u, t], [], [])[0]:
        c, _ = s.accept()
        threading.Thread(target=drain, args=(c,)).start()
"#;

/// Sends MIB mebibytes; prints MB/s from the first byte to the sink's answer.
const CLIENT: &str = r#"
import socket, sys, time
kind, where, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_UNIX) if kind == "unix" else socket.socket()
s.connect(where if kind == "unix" else ("127.0.0.1", int(where)))
chunk = b"x" * (1 << 20)
t = time.perf_counter()
for _ in range(mib):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
assert s.recv(2) == b"ok"
print("%.1f" % (mib * 1.048576 / (time.perf_counter() - t)))
"#;

fn client(bench: &Bench, vm: &str, kind: &str, target: &str, mib: usize) -> Result<f64> {
    let out = bench
        .shuttle()
        .args(["run", vm, "--", "python3", "-c", CLIENT, kind, target])
        .arg(mib.to_string())
        .stdout(Stdio::piped())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("client in {vm} ({kind} {target}) printed {text:?}"))
}

pub fn run(bench: &Bench, mib: usize, rounds: usize) -> Result<()> {
    if std::process::Command::new("socat")
        .arg("-V")
        .output()
        .is_err()
    {
        bail!("socat not found: install it (apt-get install socat)");
    }
    println!("throughput: {mib} MiB per transfer, {rounds} rounds; medians in MB/s");
    bench.check(&["vm", "create", "tdb"])?;
    bench.check(&["vm", "create", "tapp"])?;
    bench.check(&[
        "run",
        "tdb",
        "--",
        "python3",
        "-c",
        SINK,
        "/run/sink.sock",
        "18000",
    ])?;
    // The relays: socat forking a relay process per connection, as it is usually run.
    for relay in [
        "UNIX-LISTEN:/run/relay.sock,fork UNIX-CONNECT:/run/sink.sock",
        "TCP-LISTEN:18001,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:18000",
    ] {
        let script = format!("setsid socat {relay} </dev/null >/dev/null 2>&1 &");
        bench.check(&["run", "tdb", "--", "sh", "-c", &script])?;
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let dir = tempfile::Builder::new().prefix("sht").tempdir_in("/tmp")?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nop = \"connect\"\nfrom = \"tapp\"\nto = \"tdb\"\nobject = \"unix:/run/sink.sock\"\naction = \"allow\"\n\n\
         [[rule]]\nop = \"connect\"\nfrom = \"tapp\"\nto = \"tdb\"\nobject = \"tcp:18000\"\naction = \"allow\"\n",
    )?;
    bench.check(&["policy", "load", policy.to_str().context("path")?])?;
    for (kind, sink, relay) in [
        ("unix", "/run/sink.sock", "/run/relay.sock"),
        ("tcp", "18000", "18001"),
    ] {
        // Warm-up, then alternate the three sides.
        client(bench, "tdb", kind, sink, mib / 4 + 1)?;
        client(bench, "tapp", kind, sink, mib / 4 + 1)?;
        let (mut direct, mut mediated, mut relayed) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            direct.push(client(bench, "tdb", kind, sink, mib)?);
            mediated.push(client(bench, "tapp", kind, sink, mib)?);
            relayed.push(client(bench, "tdb", kind, relay, mib)?);
        }
        let (d, m, r) = (
            median(&mut direct),
            median(&mut mediated),
            median(&mut relayed),
        );
        println!(
            "{kind:<4} direct {d:>8.0}  mediated {m:>8.0}  socat relay {r:>8.0}  mediated/direct {:.3} (target >= 0.98)  mediated/relay {:.2} (target >= 2)",
            m / d,
            m / r
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
