//! `shuttle-bench --share`: files of VM `sa` read through a `share` rule in VM `sb`, against
//! the same files read directly inside `sa`, measured in the same run. One small Python
//! program does the same work on both sides (read a large file in 1 MiB chunks; `stat`, then
//! `open` and `close`, each of many small files), so its own cost cancels out in the ratios.
//! Rounds alternate the two sides so that drift in machine load hits both alike, after a
//! warm-up pass that brings the files into the page cache (which a bind mount shares with its
//! source: what is compared is the path through the mount, not the disk).

use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::Bench;

/// Prints read throughput (MiB/s) of DIR/big, and the mean stat and open+close latency (µs)
/// over DIR/s0 .. DIR/s{N-1}.
const PROBE: &str = r#"
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
fd = os.open(d + "/big", os.O_RDONLY)
t = time.perf_counter(); total = 0
while True:
    b = os.read(fd, 1 << 20)
    if not b:
        break
    total += len(b)
read = time.perf_counter() - t
os.close(fd)
names = [d + "/s%d" % i for i in range(n)]
t = time.perf_counter()
for p in names:
    os.stat(p)
stat = time.perf_counter() - t
t = time.perf_counter()
for p in names:
    os.close(os.open(p, os.O_RDONLY))
opened = time.perf_counter() - t
print("%.1f %.3f %.3f" % (total / read / (1 << 20), stat / n * 1e6, opened / n * 1e6))
"#;

/// One probe's figures: read MiB/s, stat µs, open+close µs.
type Figures = (f64, f64, f64);

/// A printed row: what, unit, and which figure.
type Row = (&'static str, &'static str, fn(&Figures) -> f64);

fn probe(bench: &Bench, vm: &str, dir: &str, files: usize) -> Result<Figures> {
    let n = files.to_string();
    let out = bench
        .shuttle()
        .args(["run", vm, "--", "python3", "-c", PROBE, dir, &n])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?;
    if !out.status.success() {
        bail!(
            "the probe in VM {vm} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected probe output from VM {vm}: {text:?}"))?;
    match v[..] {
        [a, b, c] => Ok((a, b, c)),
        _ => bail!("unexpected probe output from VM {vm}: {text:?}"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(bench: &Bench, mib: usize, files: usize, rounds: usize) -> Result<()> {
    println!(
        "share: {rounds} rounds; a {mib} MiB file and {files} small files of VM sa, read in sa \
         directly and in sb through a share rule; medians; ratio = shared / direct"
    );
    bench.check(&["vm", "create", "sa"])?;
    bench.check(&["vm", "create", "sb"])?;
    let make = format!(
        "mkdir -p /srv/bench && head -c {} /dev/urandom > /srv/bench/big && \
         i=0; while [ $i -lt {files} ]; do echo $i > /srv/bench/s$i; i=$((i+1)); done",
        mib << 20
    );
    bench.check(&["run", "sa", "--", "sh", "-c", &make])?;
    bench.check(&["vm", "start", "sb"])?;
    let dir = tempfile::Builder::new().prefix("shs").tempdir_in("/tmp")?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nop = \"share\"\nfrom = \"sb\"\nto = \"sa\"\nobject = \"/srv/bench\"\n\
         at = \"/mnt/bench\"\naction = \"allow\"\n",
    )?;
    bench.check(&["policy", "load", policy.to_str().context("path")?])?;
    // Warm-up: the page cache, dentries, both VMs' Python.
    probe(bench, "sa", "/srv/bench", files)?;
    probe(bench, "sb", "/mnt/bench", files)?;
    let (mut direct, mut shared) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        direct.push(probe(bench, "sa", "/srv/bench", files)?);
        shared.push(probe(bench, "sb", "/mnt/bench", files)?);
    }
    let pick =
        |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| median(v.iter().map(f).collect());
    let rows: [Row; 3] = [
        ("read throughput", "MiB/s", |t| t.0),
        ("stat latency", "µs", |t| t.1),
        ("open+close latency", "µs", |t| t.2),
    ];
    for (what, unit, f) in rows {
        let (d, s) = (pick(&direct, f), pick(&shared, f));
        println!(
            "{what:<20} direct in sa {d:>10.2} {unit:<5}  shared in sb {s:>10.2} {unit:<5}  ratio {:.3}",
            s / d
        );
    }
    Ok(())
}
