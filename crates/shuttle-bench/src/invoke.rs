//! `shuttle-bench --invoke`: the round trip of a trivial program (`true`) invoked from one VM
//! in another (its stub in VM `ia`, the program in VM `ib`), against `shuttle run ib -- true`
//! from the host, measured in the same run. Both are timed by the same small Python loop (start
//! a program, wait for it), inside `ia` for the invocation and on the host for `shuttle run`,
//! so the loop's own cost cancels out in the ratio. Rounds alternate so that drift in machine
//! load hits both alike; medians of the rounds are compared.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::Bench;

/// Runs argv\[2..\] N times; prints the median and the 90th percentile in milliseconds.
const TIMER: &str = r#"
import subprocess, sys, time
n, cmd = int(sys.argv[1]), sys.argv[2:]
ts = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    ts.append(time.perf_counter() - t)
ts.sort()
print("%.3f %.3f" % (ts[len(ts) // 2] * 1e3, ts[int(len(ts) * 0.9)] * 1e3))
"#;

fn parse(out: &std::process::Output, what: &str) -> Result<(f64, f64)> {
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => bail!("unexpected timer output from {what}: {text:?}"),
    }
}

fn in_vm(bench: &Bench, vm: &str, n: usize, cmd: &[&str]) -> Result<(f64, f64)> {
    let n = n.to_string();
    let mut args = vec!["run", vm, "--", "python3", "-c", TIMER, &n];
    args.extend_from_slice(cmd);
    let out = bench
        .shuttle()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?;
    parse(&out, &format!("{cmd:?} in VM {vm}"))
}

fn on_host(bench: &Bench, n: usize, cmd: &[&str]) -> Result<(f64, f64)> {
    let out = Command::new("python3")
        .args(["-c", TIMER, &n.to_string()])
        .args(cmd)
        .env("SHUTTLE_ROOT", bench.root.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?;
    parse(&out, &format!("{cmd:?} on the host"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(bench: &Bench, n: usize, rounds: usize) -> Result<()> {
    println!(
        "invoke: {rounds} rounds of {n} runs; medians (p90) in ms; ratio = invoked / shuttle run"
    );
    bench.check(&["vm", "create", "ia"])?;
    bench.check(&["vm", "create", "ib"])?;
    bench.check(&["vm", "start", "ia"])?;
    bench.check(&["vm", "start", "ib"])?;
    // A copy of `true` the stub will not cover, for the cost of a plain exec in a VM (made
    // before the rule puts a stub over /usr/bin/true).
    bench.check(&["run", "ia", "--", "cp", "/usr/bin/true", "/var/tmp/true"])?;
    // Eight small files, passed as file arguments (each shown in ib at /shuttle/from/ia/...).
    bench.check(&[
        "run",
        "ia",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8; do echo $i > /var/tmp/f$i; done",
    ])?;
    let with_files: Vec<String> = (1..=8).map(|i| format!("/var/tmp/f{i}")).collect();
    let mut files_cmd = vec!["/usr/bin/true"];
    files_cmd.extend(with_files.iter().map(String::as_str));
    let dir = tempfile::Builder::new().prefix("shi").tempdir_in("/tmp")?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nop = \"invoke\"\nfrom = \"ia\"\nto = \"ib\"\nobject = \"/usr/bin/true\"\naction = \"allow\"\n",
    )?;
    bench.check(&["policy", "load", policy.to_str().context("path")?])?;
    let shuttle = bench.shuttle.to_str().context("shuttle path")?;
    let run_cmd = [shuttle, "run", "ib", "--", "true"];
    // Warm-up: caches, the audit journal, the broker.
    in_vm(bench, "ia", 20, &["/usr/bin/true"])?;
    on_host(bench, 20, &run_cmd)?;
    let (mut inv, mut run, mut local, mut files) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut inv90, mut run90) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let (m, p) = in_vm(bench, "ia", n, &["/usr/bin/true"])?;
        inv.push(m);
        inv90.push(p);
        let (m, p) = on_host(bench, n, &run_cmd)?;
        run.push(m);
        run90.push(p);
        let (m, _) = in_vm(bench, "ia", n, &["/var/tmp/true"])?;
        local.push(m);
        let (m, _) = in_vm(bench, "ia", n, &files_cmd)?;
        files.push(m);
    }
    let (im, rm, lm) = (median(inv), median(run), median(local));
    println!(
        "true invoked from ia in ib:          {im:>7.3} ({:.3})",
        median(inv90)
    );
    println!(
        "shuttle run ib -- true (host):       {rm:>7.3} ({:.3})  ratio {:.2}",
        median(run90),
        im / rm
    );
    println!("a copy of true run in ia itself:     {lm:>7.3}  (a plain exec in a VM, for scale)");
    let fm = median(files);
    println!(
        "true with 8 file arguments, invoked: {fm:>7.3}  added per file argument: {:.3}",
        (fm - im) / 8.0
    );
    Ok(())
}
