//! `shuttle-bench`: measures Shuttle's VM engine against bubblewrap in the same run and prints
//! ratios (these machines are noisy; absolute times mean little).
//!
//! Usage: `shuttle-bench --help` (the `USAGE` text below), as root, after
//! `cargo build --release`.
//!
//! It measures, interleaving the two sides so that drift in machine load hits both alike:
//! * `shuttle run VM -- true` into a running VM vs `bwrap --unshare-all ... true`
//!   (target: ratio ≤ 1.0);
//! * a fresh VM's `vm create` + first `run` vs the same bwrap command (target ≤ 2.0);
//! * the memory an idle VM costs beyond its applications: the proportional set size (PSS) of
//!   its monitor and init (target ≤ 2 MiB);
//! * creating and starting a fleet of VMs (default 100), in total and per VM.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod connect;
mod invoke;
mod load;
mod pgbench;
mod share;
mod throughput;

const BWRAP_ARGS: &[&str] = &[
    "--unshare-all",
    "--ro-bind",
    "/",
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "true",
];

struct Bench {
    shuttle: PathBuf,
    root: tempfile::TempDir,
}

impl Bench {
    fn shuttle(&self) -> Command {
        let mut c = Command::new(&self.shuttle);
        c.env("SHUTTLE_ROOT", self.root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }

    fn check(&self, args: &[&str]) -> Result<()> {
        let out = self.shuttle().args(args).stderr(Stdio::piped()).output()?;
        if !out.status.success() {
            bail!(
                "shuttle {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.shuttle().args(args).stdout(Stdio::piped()).output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

fn time(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    let d = t.elapsed();
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(d)
}

fn bwrap() -> Command {
    let mut c = Command::new("bwrap");
    c.args(BWRAP_ARGS).stdin(Stdio::null());
    c
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// A field of /proc/PID/smaps_rollup in KiB.
fn smaps_kib(pid: i64, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} line in smaps_rollup"))
}

/// PSS of a process in KiB (its fair share of shared pages).
fn pss_kib(pid: i64) -> Result<u64> {
    smaps_kib(pid, "Pss:")
}

/// Memory only this process has written (what one more VM really adds: the binary's pages are
/// shared by every monitor and init).
fn private_dirty_kib(pid: i64) -> Result<u64> {
    smaps_kib(pid, "Private_Dirty:")
}

fn rss_kib(pid: i64) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS line")
}

/// Lets the kernel finish the background teardown of namespaces that just went away.
fn settle() {
    std::thread::sleep(Duration::from_millis(100));
}

fn arg(args: &[String], flag: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args
            .get(i + 1)
            .context("missing value")?
            .parse()
            .context("not a number"),
        None => Ok(default),
    }
}

const USAGE: &str = "\
shuttle-bench: Shuttle measured against a baseline in the same run; prints ratios.
Run as root, after `cargo build --release`.

  shuttle-bench [--runs N] [--fleet N]
      VM start-up and memory against bubblewrap (run into a running VM, fresh VM create + run,
      idle VM memory, a fleet of N VMs)
  shuttle-bench --connect [--connects N] [--rounds N]
      what mediation adds to connect (intra-VM and cross-VM, unix and TCP)
  shuttle-bench --throughput [--mib N] [--rounds N]
      bulk data: mediated vs direct vs a socat relay
  shuttle-bench --invoke [--runs N] [--rounds N]
      `true` invoked across VMs vs `shuttle run` into the target
  shuttle-bench --pgbench [--seconds N] [--rounds N] [--clients N]
      PostgreSQL across VMs: pgbench -C -S, cross-VM vs same VM
  shuttle-bench --share [--mib N] [--files N] [--rounds N]
      files read through a share rule vs in the owner VM
  shuttle-bench --load [--seconds N]
      mediated connects at full speed, sustained; the monitor's memory and descriptors
";

/// Flags that take a number, and flags that choose a measurement.
const VALUE_FLAGS: &[&str] = &[
    "--runs",
    "--fleet",
    "--connects",
    "--rounds",
    "--mib",
    "--files",
    "--seconds",
    "--clients",
];
const MODE_FLAGS: &[&str] = &[
    "--connect",
    "--throughput",
    "--invoke",
    "--share",
    "--load",
    "--pgbench",
];

/// Refuses what is not a known flag (a mistyped one would otherwise run the default
/// measurement, which takes minutes).
fn check_args(args: &[String]) -> Result<()> {
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        if VALUE_FLAGS.contains(&a.as_str()) {
            rest.next();
        } else if !MODE_FLAGS.contains(&a.as_str()) {
            bail!("unknown argument {a:?}\n\n{USAGE}");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return Ok(());
    }
    check_args(&args)?;
    let runs = arg(&args, "--runs", 200)?;
    let fleet = arg(&args, "--fleet", 100)?;
    let exe = std::env::current_exe()?;
    let shuttle = exe
        .parent()
        .map(|d| d.join("shuttle"))
        .context("no parent dir")?;
    if !shuttle.exists() {
        bail!(
            "{} not found: build it first (cargo build --release)",
            shuttle.display()
        );
    }
    if Command::new("bwrap").arg("--version").output().is_err() {
        bail!("bwrap not found: install bubblewrap (apt-get install bubblewrap)");
    }
    let bench = Bench {
        shuttle,
        root: tempfile::Builder::new().prefix("shb").tempdir_in("/tmp")?,
    };
    let result = if args.iter().any(|a| a == "--connect") {
        connect::run(
            &bench,
            arg(&args, "--connects", 2000)?,
            arg(&args, "--rounds", 3)?,
        )
    } else if args.iter().any(|a| a == "--throughput") {
        throughput::run(
            &bench,
            arg(&args, "--mib", 1024)?,
            arg(&args, "--rounds", 3)?,
        )
    } else if args.iter().any(|a| a == "--invoke") {
        invoke::run(
            &bench,
            arg(&args, "--runs", 200)?,
            arg(&args, "--rounds", 3)?,
        )
    } else if args.iter().any(|a| a == "--share") {
        share::run(
            &bench,
            arg(&args, "--mib", 256)?,
            arg(&args, "--files", 2000)?,
            arg(&args, "--rounds", 5)?,
        )
    } else if args.iter().any(|a| a == "--load") {
        load::run(&bench, arg(&args, "--seconds", 60)? as u64)
    } else if args.iter().any(|a| a == "--pgbench") {
        pgbench::run(
            &bench,
            arg(&args, "--seconds", 10)?,
            arg(&args, "--clients", 1)?,
            arg(&args, "--rounds", 3)?,
        )
    } else {
        run_all(&bench, runs, fleet)
    };
    // Clean up whatever is left, even after a failure (VMs, then the broker).
    if let Ok(list) = bench.json(&["vm", "ls", "--json"]) {
        for vm in list.as_array().into_iter().flatten() {
            if let Some(name) = vm["name"].as_str() {
                let _ = bench.check(&["vm", "rm", "--force", name]);
            }
        }
    }
    let _ = bench.check(&["daemon", "--stop"]);
    result
}

fn run_all(bench: &Bench, runs: usize, fleet: usize) -> Result<()> {
    println!("shuttle-bench: {runs} runs per measurement, fleet of {fleet}; medians; ratio = shuttle / baseline");

    // 1. run into a running VM vs bwrap.
    bench.check(&["vm", "create", "warm"])?;
    bench.check(&["vm", "start", "warm"])?;
    for _ in 0..10 {
        time(bench.shuttle().args(["run", "warm", "--", "true"]))?;
        time(&mut bwrap())?;
    }
    let (mut s, mut b) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        s.push(time(bench.shuttle().args(["run", "warm", "--", "true"]))?);
        b.push(time(&mut bwrap())?);
    }
    let (sm, bm) = (median(&mut s), median(&mut b));
    println!(
        "run into a running VM:     shuttle {} vs bwrap {}  ratio {:.2} (target <= 1.00)",
        ms(sm),
        ms(bm),
        sm.as_secs_f64() / bm.as_secs_f64()
    );

    // 2. idle VM memory.
    let status = bench.json(&["vm", "ls", "--json"])?;
    let warm = status
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == "warm"))
        .context("warm VM not listed")?;
    let (monitor, init) = (
        warm["monitor_pid"].as_i64().context("no monitor pid")?,
        warm["init_pid"].as_i64().context("no init pid")?,
    );
    std::thread::sleep(Duration::from_millis(200));
    let pss = pss_kib(monitor)? + pss_kib(init)?;
    let rss = rss_kib(monitor)? + rss_kib(init)?;
    let private = private_dirty_kib(monitor)? + private_dirty_kib(init)?;
    println!(
        "idle VM memory:            {private} KiB private to monitor + init (ratio {:.2} of the 2 MiB target); alone on the host: {pss} KiB PSS, {rss} KiB RSS",
        private as f64 / 2048.0
    );

    // 3. fresh VM: create + first run vs bwrap.
    let fresh_runs = (runs / 5).max(10);
    let (mut s, mut b) = (Vec::new(), Vec::new());
    for i in 0..fresh_runs {
        let name = format!("fresh{i}");
        // Both sides start alike: the kernel tears a network namespace down in the
        // background (under the lock a new one needs), so a measurement right after the
        // previous VM's removal or bwrap's exit would pay for that teardown too.
        settle();
        let t = Instant::now();
        bench.check(&["vm", "create", &name])?;
        time(bench.shuttle().args(["run", &name, "--", "true"]))?;
        s.push(t.elapsed());
        settle();
        b.push(time(&mut bwrap())?);
        bench.check(&["vm", "rm", "--force", &name])?;
    }
    let (sm, bm) = (median(&mut s), median(&mut b));
    println!(
        "fresh VM create + run:     shuttle {} vs bwrap {}  ratio {:.2} (target <= 2.00)",
        ms(sm),
        ms(bm),
        sm.as_secs_f64() / bm.as_secs_f64()
    );

    // 4. a fleet.
    let t = Instant::now();
    for i in 0..fleet {
        let name = format!("fleet{i}");
        bench.check(&["vm", "create", &name])?;
        bench.check(&["vm", "start", &name])?;
    }
    let total = t.elapsed();
    let mut fleet_pss = 0;
    for vm in bench
        .json(&["vm", "ls", "--json"])?
        .as_array()
        .into_iter()
        .flatten()
    {
        if let (Some(m), Some(i)) = (vm["monitor_pid"].as_i64(), vm["init_pid"].as_i64()) {
            fleet_pss += pss_kib(m).unwrap_or(0) + pss_kib(i).unwrap_or(0);
        }
    }
    println!(
        "create + start {fleet} VMs:     {:.2} s total, {} per VM; {} KiB PSS per running VM ({} KiB for all {})",
        total.as_secs_f64(),
        ms(total / fleet.max(1) as u32),
        fleet_pss / (fleet as u64 + 1),
        fleet_pss,
        fleet + 1
    );
    let t = Instant::now();
    for i in 0..fleet {
        bench.check(&["vm", "rm", "--force", &format!("fleet{i}")])?;
    }
    println!(
        "stop + remove {fleet} VMs:     {:.2} s total",
        t.elapsed().as_secs_f64()
    );
    let _ = Path::new("/");
    Ok(())
}
