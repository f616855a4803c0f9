//! `shuttle-bench --pgbench`: PostgreSQL across VMs (DESIGN.md §6: TPS ≥ 0.9× the same run
//! inside one VM).
//!
//! A server runs in VM pgdb; `pgbench -C -S -T N` runs in VM pgapp through a `connect` rule on
//! the server's unix socket and through one on tcp:5432, and the same run is made inside pgdb
//! itself as the baseline. What keeps the comparison fair:
//! * the same pgbench binary, flags, server and authentication on both sides, and both clients
//!   run inside a VM, so a VM's own cost (seccomp filter, cgroup) is in the baseline too: the
//!   difference is the cross-VM connect (interception, policy decision, the fsync'd audit
//!   record, the connection made in pgdb's namespaces as the caller, the injected socket);
//! * `-C`, one new connection per transaction, is mediation's worst case (without it the data
//!   path is the kernel's and the ratio is 1); `-S`, select-only, keeps the disk out: each
//!   transaction is a connection (a backend forked, authentication) and one indexed select;
//! * one client (`-c 1`, change it with --clients) on these 2-core machines, so that client,
//!   server backend and monitor do not fight over the cores more on one side than the other;
//! * unix socket clients authenticate with `peer` (cheap, and the point of the exercise: the
//!   caller's uid crosses); TCP ones with `trust`, because scram-sha-256's key derivation (4096
//!   HMAC rounds on each side, milliseconds per connection) would add the same time to both
//!   sides and flatter the ratio;
//! * a warm-up run on each side first; then the sides alternate (baseline first) for a few
//!   rounds (--rounds, default 3) and each side's median is compared: these machines are
//!   shared, and a build starting during one 10-second run would otherwise decide the ratio.

use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::Bench;

const DB: &str = "pgdb";
const APP: &str = "pgapp";
const DATA: &str = "/srv/pgdata";
const SOCKET_DIR: &str = "/run/postgresql";

const SERVER_CONF: &str = "
listen_addresses = '127.0.0.1'
port = 5432
unix_socket_directories = '/run/postgresql'
";

const PG_HBA: &str = "\
local all all peer
host all all 127.0.0.1/32 trust
";

/// The newest /usr/lib/postgresql/VERSION/bin with every tool this needs.
fn pg_bin() -> Result<String> {
    let tools = ["postgres", "initdb", "pg_ctl", "pgbench", "psql"];
    let mut found: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            tools
                .iter()
                .all(|t| bin.join(t).is_file())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    let (_, bin) = found.pop().context(
        "PostgreSQL not found: install postgresql-15 and postgresql-client-15 \
         (scripts/install-deps.sh does)",
    )?;
    Ok(bin.to_string_lossy().into_owned())
}

/// `shuttle run VM -u USER -- CMD...`; its stdout, or an error with its stderr.
fn run_in(bench: &Bench, vm: &str, user: &str, cmd: &[&str]) -> Result<String> {
    let out = bench
        .shuttle()
        .args(["run", vm, "-u", user, "--"])
        .args(cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?} in VM {vm}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} in VM {vm} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// initdb, configuration and start of the server in VM pgdb; pgbench's tables.
fn set_up(bench: &Bench, bin: &str) -> Result<()> {
    bench.check(&["vm", "create", DB])?;
    bench.check(&["vm", "create", APP])?;
    // The socket directory is the VM's own (whatever the host's /run shows through the VM's
    // copy-on-write root is removed in the VM alone).
    run_in(
        bench,
        DB,
        "root",
        &[
            "sh",
            "-c",
            &format!(
                "install -d -o postgres -g postgres -m 0700 {DATA} && \
                 install -d -o postgres -g postgres -m 2775 {SOCKET_DIR} && \
                 rm -f {SOCKET_DIR}/.s.PGSQL.5432 {SOCKET_DIR}/.s.PGSQL.5432.lock"
            ),
        ],
    )?;
    run_in(
        bench,
        DB,
        "postgres",
        &[
            &format!("{bin}/initdb"),
            "-D",
            DATA,
            "-U",
            "postgres",
            "--locale=C",
            "-E",
            "UTF8",
            "-A",
            "peer",
        ],
    )?;
    let write = |path: &str, content: &str, op: &str| {
        let script = format!(r#"printf %s "$1" {op} "$2""#);
        run_in(
            bench,
            DB,
            "postgres",
            &["sh", "-c", &script, "sh", content, path],
        )
    };
    write(&format!("{DATA}/postgresql.conf"), SERVER_CONF, ">>")?;
    write(&format!("{DATA}/pg_hba.conf"), PG_HBA, ">")?;
    // The server's output goes to its log, so that it keeps none of our pipes open.
    run_in(
        bench,
        DB,
        "postgres",
        &[
            &format!("{bin}/pg_ctl"),
            "-D",
            DATA,
            "-l",
            &format!("{DATA}/server.log"),
            "-w",
            "start",
        ],
    )?;
    run_in(
        bench,
        DB,
        "postgres",
        &[
            &format!("{bin}/pgbench"),
            "-h",
            SOCKET_DIR,
            "-i",
            "-q",
            "-s",
            "1",
            "postgres",
        ],
    )?;
    Ok(())
}

/// `pgbench -C -S -T SECONDS -c CLIENTS` as OS user postgres in `vm` against `host`: its TPS
/// (connection set-up included).
fn pgbench(
    bench: &Bench,
    bin: &str,
    vm: &str,
    host: &str,
    seconds: usize,
    clients: usize,
) -> Result<f64> {
    let (secs, clients) = (seconds.to_string(), clients.to_string());
    let out = run_in(
        bench,
        vm,
        "postgres",
        &[
            &format!("{bin}/pgbench"),
            "-h",
            host,
            "-U",
            "postgres",
            "-C",
            "-S",
            "-T",
            &secs,
            "-c",
            &clients,
            "-j",
            &clients,
            "postgres",
        ],
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no `tps = ` line in pgbench's report: {out}"))
}

pub fn run(bench: &Bench, seconds: usize, clients: usize, rounds: usize) -> Result<()> {
    let bin = pg_bin()?;
    let rounds = rounds.max(1);
    println!(
        "pgbench -C -S -T {seconds} -c {clients}: one new connection per select-only transaction, \
         TPS including connection set-up; {rounds} rounds alternating db and app, median (min-max); \
         ratio = app (cross-VM rule) / db (same VM)"
    );
    set_up(bench, &bin)?;
    let dir = tempfile::Builder::new().prefix("shp").tempdir_in("/tmp")?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[rule]]\nop = \"connect\"\nfrom = \"{APP}\"\nto = \"{DB}\"\nobject = \"unix:{SOCKET_DIR}/.s.PGSQL.5432\"\naction = \"allow\"\n\n\
             [[rule]]\nop = \"connect\"\nfrom = \"{APP}\"\nto = \"{DB}\"\nobject = \"tcp:5432\"\naction = \"allow\"\n"
        ),
    )?;
    bench.check(&["policy", "load", policy.to_str().context("path")?])?;
    let transports = [("unix socket", SOCKET_DIR), ("tcp:5432", "127.0.0.1")];
    for (_, host) in transports {
        for vm in [DB, APP] {
            pgbench(bench, &bin, vm, host, 2, clients)?;
        }
    }
    // tps[transport][side]: one figure per round.
    let mut tps = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for _ in 0..rounds {
        for (t, (_, host)) in transports.iter().enumerate() {
            for (side, vm) in [DB, APP].into_iter().enumerate() {
                tps[t][side].push(pgbench(bench, &bin, vm, host, seconds, clients)?);
            }
        }
    }
    for (t, (what, _)) in transports.iter().enumerate() {
        let [db, app] = &mut tps[t];
        let (dbm, appm) = (median(db), median(app));
        println!(
            "{what:<12} db {dbm:>7.1} tps ({:.0}-{:.0})  app {appm:>7.1} tps ({:.0}-{:.0})  ratio {:.2} (target >= 0.90)",
            db[0],
            db[db.len() - 1],
            app[0],
            app[app.len() - 1],
            appm / dbm
        );
    }
    // The server goes with its VM (main removes every VM).
    Ok(())
}

/// Sorts `v` and returns its median.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
