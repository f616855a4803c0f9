//! `shuttle-bench --connect`: what mediation adds to `connect`, as ratios against connects
//! on the host measured in the same run. The client and server are small Python programs, the
//! same on the host and in the VMs, so their own cost cancels out in the ratios.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::Bench;

/// Serves a unix socket and a loopback TCP port, accepting and closing at once.
const SERVER: &str = r#"
import os, socket, sys, select
path, port = sys.argv[1], int(sys.argv[2])
if os.fork(): sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("127.0.0.1", port)); t.listen(512)
try: os.unlink(path)
except OSError: pass
u = socket.socket(socket.AF_UNIX); u.bind(path); os.chmod(path, 0o777); u.listen(512)
while True:
    for s in select.select([u, t], [], [])[0]:
        c, _ = s.accept(); c.close()
"#;

/// Connects N times; prints the median and the 99th percentile in microseconds.
const CLIENT: &str = r#"
import socket, sys, time
kind, where, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ts = []
if kind == "sendmsg":
    # sendmsg is always intercepted (its destination is in memory): what that costs a
    # connected socket, whose calls all continue.
    a, b = socket.socketpair()
    for _ in range(n):
        t = time.perf_counter()
        a.sendmsg([b"x"])
        ts.append(time.perf_counter() - t)
        b.recv(1)
    ts.sort()
    print("%.1f %.1f" % (ts[len(ts) // 2] * 1e6, ts[int(len(ts) * 0.99)] * 1e6))
    sys.exit(0)
for _ in range(n):
    s = socket.socket(socket.AF_UNIX) if kind == "unix" else socket.socket()
    t = time.perf_counter()
    s.connect(where if kind == "unix" else ("127.0.0.1", int(where)))
    ts.append(time.perf_counter() - t)
    s.close()
ts.sort()
print("%.1f %.1f" % (ts[len(ts) // 2] * 1e6, ts[int(len(ts) * 0.99)] * 1e6))
"#;

fn parse(out: &[u8]) -> Result<(f64, f64)> {
    let text = String::from_utf8_lossy(out);
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>());
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => bail!("unexpected client output {text:?}"),
    }
}

fn host_client(kind: &str, target: &str, n: usize) -> Result<(f64, f64)> {
    let out = Command::new("python3")
        .args(["-c", CLIENT, kind, target, &n.to_string()])
        .output()?;
    parse(&out.stdout)
}

fn vm_client(bench: &Bench, vm: &str, kind: &str, target: &str, n: usize) -> Result<(f64, f64)> {
    let out = bench
        .shuttle()
        .args([
            "run",
            vm,
            "--",
            "python3",
            "-c",
            CLIENT,
            kind,
            target,
            &n.to_string(),
        ])
        .stdout(Stdio::piped())
        .output()?;
    parse(&out.stdout)
}

pub fn run(bench: &Bench, n: usize, rounds: usize) -> Result<()> {
    let rounds = rounds.max(1);
    println!(
        "connect: {n} connects per measurement, {rounds} rounds alternating host and VM; \
         median / p99 in µs (the round with the median added cost); ratio = VM / host"
    );
    // The host baseline: a server and client on the host itself, no interception.
    let dir = tempfile::Builder::new().prefix("shc").tempdir_in("/tmp")?;
    let host_sock = dir.path().join("s.sock");
    let status = Command::new("python3")
        .args(["-c", SERVER, host_sock.to_str().context("path")?, "17000"])
        .status()?;
    if !status.success() {
        bail!("host server failed");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    bench.check(&["vm", "create", "cdb"])?;
    bench.check(&["vm", "create", "capp"])?;
    for vm in ["cdb", "capp"] {
        let out = bench
            .shuttle()
            .args([
                "run",
                vm,
                "--",
                "python3",
                "-c",
                SERVER,
                "/run/s.sock",
                "17000",
            ])
            .status()?;
        if !out.success() {
            bail!("server in {vm} failed");
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nop = \"connect\"\nfrom = \"capp\"\nto = \"cdb\"\nobject = \"unix:/run/x.sock\"\ntarget = \"unix:/run/s.sock\"\naction = \"allow\"\n\n\
         [[rule]]\nop = \"connect\"\nfrom = \"capp\"\nto = \"cdb\"\nobject = \"tcp:17001\"\ntarget = \"tcp:17000\"\naction = \"allow\"\n",
    )?;
    bench.check(&["policy", "load", policy.to_str().context("path")?])?;
    let rows: [(&str, &str, &str, &str); 5] = [
        ("sendmsg", "intra-VM (continued)", "-", "-"),
        ("unix", "intra-VM (continued)", "/run/s.sock", "/run/s.sock"),
        ("tcp", "intra-VM (continued)", "17000", "17000"),
        (
            "unix",
            "cross-VM (mediated, journaled)",
            "/run/x.sock",
            "/run/s.sock",
        ),
        ("tcp", "cross-VM (mediated, journaled)", "17001", "17000"),
    ];
    for (kind, what, vm_target, host_target) in rows {
        let host_target = if kind == "unix" {
            host_sock.to_str().context("path")?
        } else {
            host_target
        };
        // Alternating rounds: this machine's noise comes and goes over seconds.
        let mut runs = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let (hm, hp) = host_client(kind, host_target, n)?;
            let (vm_m, vm_p) = vm_client(bench, "capp", kind, vm_target, n)?;
            runs.push((vm_m - hm, hm, hp, vm_m, vm_p));
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (added, hm, hp, vm_m, vm_p) = runs[runs.len() / 2];
        let (low, high) = (runs[0].0, runs[runs.len() - 1].0);
        println!(
            "{kind:<7} {what:<32} VM {vm_m:>7.1} / {vm_p:>7.1}  host {hm:>6.1} / {hp:>6.1}  ratio {:.2}  added {added:.1} µs at the median ({low:.1}-{high:.1} over the rounds; target <= 50)",
            vm_m / hm,
        );
    }
    // The host server goes with its socket directory; the VM servers with their VMs.
    let _ = Command::new("pkill")
        .args(["-f", host_sock.to_str().unwrap_or("")])
        .status();
    Ok(())
}
