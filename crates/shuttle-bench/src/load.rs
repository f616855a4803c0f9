//! `shuttle-bench --load [--seconds N]`: mediated cross-VM connects at full speed, sustained
//! (issue 7: at least 5 000 per second for 60 s on a 2-core machine, with no growth in the
//! monitor's memory or descriptors).
//!
//! One client (`shuttle-connect-loop`, a small native program, so that the client is not what
//! limits the rate) in VM lapp connects and closes as fast as it can to a server in VM ldb
//! through a `connect` rule, first on a unix socket, then on loopback TCP, for N seconds each
//! (default 60). Every connect is intercepted, decided, journaled, carried out in ldb and
//! injected by lapp's monitor, and the broker collects the journal meanwhile, as in
//! production. Every second the monitor's resident memory (VmRSS), proportional share (Pss),
//! open descriptors and threads are sampled. The same client against the same server, both
//! on the host, is the baseline, measured in the same run (for min(N, 10) seconds per kind).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::Bench;

const DB: &str = "ldb";
const APP: &str = "lapp";
const VM_SOCKET: &str = "/run/load.sock";
const PORT: &str = "17200";
/// The target rate (connects per second, sustained).
const TARGET_RATE: f64 = 5000.0;

/// The monitor's footprint at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    pss_kib: u64,
    fds: usize,
    threads: u64,
}

fn status_field(pid: i64, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn sample(pid: i64) -> Result<Sample> {
    Ok(Sample {
        rss_kib: status_field(pid, "VmRSS:")?,
        pss_kib: crate::pss_kib(pid)?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        threads: status_field(pid, "Threads:")?,
    })
}

/// What one client run printed (see `connect_loop.rs`).
#[derive(Debug)]
struct Run {
    connects: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    per_second: Vec<u64>,
}

impl Run {
    fn parse(out: &[u8]) -> Result<Run> {
        let text = String::from_utf8_lossy(out);
        let v: Value = serde_json::from_str(text.trim())
            .with_context(|| format!("unexpected client output {text:?}"))?;
        let f = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in {text}"));
        Ok(Run {
            connects: v["connects"].as_u64().context("connects")?,
            errors: v["errors"].as_u64().context("errors")?,
            first_error: v["first_error"].as_str().map(str::to_owned),
            seconds: f("seconds")?,
            p50_us: f("p50_us")?,
            p99_us: f("p99_us")?,
            per_second: v["per_second"]
                .as_array()
                .context("per_second")?
                .iter()
                .filter_map(Value::as_u64)
                .collect(),
        })
    }

    fn rate(&self) -> f64 {
        self.connects as f64 / self.seconds
    }

    /// The slowest whole second.
    fn min_rate(&self) -> u64 {
        self.per_second.iter().copied().min().unwrap_or(0)
    }

    /// How many whole seconds fell short of `rate`.
    fn seconds_below(&self, rate: f64) -> usize {
        self.per_second
            .iter()
            .filter(|n| (**n as f64) < rate)
            .count()
    }
}

fn loop_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join("shuttle-connect-loop"))
        .context("no parent directory")?;
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release)",
            bin.display()
        );
    }
    Ok(bin)
}

fn host_run(bin: &Path, target: &str, seconds: u64) -> Result<Run> {
    let out = Command::new(bin)
        .args(["connect", target, "--seconds", &seconds.to_string()])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("the host client failed: {}", out.status);
    }
    Run::parse(&out.stdout)
}

/// Runs the client in lapp for `seconds`, sampling lapp's monitor every second meanwhile.
fn vm_run(
    bench: &Bench,
    bin: &Path,
    monitor: i64,
    target: &str,
    seconds: u64,
) -> Result<(Run, Vec<Sample>)> {
    let bin = bin.to_str().context("binary path")?;
    let seconds_arg = seconds.to_string();
    let mut child = bench
        .shuttle()
        .args([
            "run",
            APP,
            "--",
            bin,
            "connect",
            target,
            "--seconds",
            &seconds_arg,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut samples = vec![sample(monitor)?];
    let mut next = Instant::now() + Duration::from_secs(1);
    while child.try_wait()?.is_none() {
        if Instant::now() >= next {
            samples.push(sample(monitor)?);
            next += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    samples.push(sample(monitor)?);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the client in {APP} failed: {}", out.status);
    }
    Ok((Run::parse(&out.stdout)?, samples))
}

fn start_server(bench: &Bench, bin: &Path) -> Result<()> {
    let bin = bin.to_str().context("binary path")?;
    bench.check(&[
        "run", DB, "--", bin, "serve", "--unix", VM_SOCKET, "--tcp", PORT,
    ])
}

pub fn run(bench: &Bench, seconds: u64) -> Result<()> {
    let bin = loop_binary()?;
    let base_seconds = seconds.min(10);
    println!(
        "load: one client connecting as fast as it can, {seconds} s per kind in VM {APP} \
         (mediated, to VM {DB}), {base_seconds} s on the host (baseline); latency of connect()"
    );

    // The baseline: the same client and server, both on the host.
    let dir = tempfile::Builder::new().prefix("shl").tempdir_in("/tmp")?;
    let host_sock = dir.path().join("s.sock");
    let host_sock = host_sock.to_str().context("path")?;
    let out = Command::new(&bin)
        .args(["serve", "--unix", host_sock, "--tcp", PORT])
        .output()?;
    if !out.status.success() {
        bail!(
            "the host server failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let host_server: i32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let result = measure(bench, &bin, seconds, base_seconds, host_sock);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host_server),
        nix::sys::signal::Signal::SIGKILL,
    );
    result
}

fn measure(
    bench: &Bench,
    bin: &Path,
    seconds: u64,
    base_seconds: u64,
    host_sock: &str,
) -> Result<()> {
    bench.check(&["vm", "create", DB])?;
    bench.check(&["vm", "create", APP])?;
    bench.check(&["vm", "start", APP])?;
    start_server(bench, bin)?;
    let policy = tempfile::NamedTempFile::new()?;
    std::fs::write(
        policy.path(),
        format!(
            "[[rule]]\nop = \"connect\"\nfrom = \"{APP}\"\nto = \"{DB}\"\nobject = \"unix:{VM_SOCKET}\"\naction = \"allow\"\n\n\
             [[rule]]\nop = \"connect\"\nfrom = \"{APP}\"\nto = \"{DB}\"\nobject = \"tcp:{PORT}\"\naction = \"allow\"\n"
        ),
    )?;
    bench.check(&["policy", "load", policy.path().to_str().context("path")?])?;
    let status = bench.json(&["vm", "ls", "--json"])?;
    let monitor = status
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == APP))
        .and_then(|v| v["monitor_pid"].as_i64())
        .context("no monitor pid for the client's VM")?;

    let idle = sample(monitor)?;
    let kinds = [
        (
            "unix",
            format!("unix:{VM_SOCKET}"),
            format!("unix:{host_sock}"),
        ),
        ("tcp", format!("tcp:{PORT}"), format!("tcp:{PORT}")),
    ];
    // Warm up both paths (mediator threads, the journal, target namespaces opened once).
    for (_, vm_target, host_target) in &kinds {
        vm_run(bench, bin, monitor, vm_target, 1)?;
        host_run(bin, host_target, 1)?;
    }
    println!(
        "monitor of {APP} idle before any load: {} KiB RSS, {} KiB PSS, {} fds, {} threads",
        idle.rss_kib, idle.pss_kib, idle.fds, idle.threads
    );
    for (kind, vm_target, host_target) in &kinds {
        let host = host_run(bin, host_target, base_seconds)?;
        let (vm, samples) = vm_run(bench, bin, monitor, vm_target, seconds)?;
        if vm.errors > 0 {
            println!(
                "  {kind}: {} connects failed (first: {})",
                vm.errors,
                vm.first_error.as_deref().unwrap_or("?")
            );
        }
        let rate = vm.rate();
        println!(
            "{kind:<4} mediated: {rate:>7.0} connects/s (slowest second {}, {} of {} seconds below the \
             target of {TARGET_RATE:.0}), p50 {:.1} µs, p99 {:.1} µs; host {:>7.0} connects/s, \
             p50 {:.1} µs, p99 {:.1} µs; ratio {:.2}",
            vm.min_rate(),
            vm.seconds_below(TARGET_RATE),
            vm.per_second.len(),
            vm.p50_us,
            vm.p99_us,
            host.rate(),
            host.p50_us,
            host.p99_us,
            rate / host.rate()
        );
        let (first, last) = (samples[0], samples[samples.len() - 1]);
        let max_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        let max_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
        println!(
            "     monitor at start / end: RSS {} / {} KiB ({:+} KiB, max {max_rss}), PSS {} / {} KiB ({:+} KiB), \
             fds {} / {} ({:+}, max {max_fds}), threads {} / {}",
            first.rss_kib,
            last.rss_kib,
            last.rss_kib as i64 - first.rss_kib as i64,
            first.pss_kib,
            last.pss_kib,
            last.pss_kib as i64 - first.pss_kib as i64,
            first.fds,
            last.fds,
            last.fds as i64 - first.fds as i64,
            first.threads,
            last.threads,
        );
        let trace: Vec<String> = samples
            .iter()
            .step_by((samples.len() / 10).max(1))
            .map(|s| format!("{}/{}", s.rss_kib, s.fds))
            .collect();
        println!("     RSS KiB / fds over the run: {}", trace.join(" "));
    }
    // Whether the broker kept up with collecting the journal into the audit store.
    let journal = bench.root.path().join("state/vms").join(APP).join("audit");
    let left: u64 = std::fs::read_dir(&journal)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "{APP}'s journal on disk at the end (not yet collected, at most one segment): {} KiB",
        left / 1024
    );
    Ok(())
}
