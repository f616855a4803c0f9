//! Journal appends per second: durable (`fdatasync` per append), group commit (one `fdatasync`
//! per batch) and, as the baseline, the same appends without any sync. Prints ratios against
//! the unsynced baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p shuttle-audit --example append_rate [-- DIR [RECORDS]]
//! ```
//!
//! DIR defaults to a temporary directory under the current directory (so that the measurement
//! hits the same file system as the state directory would, not a tmpfs).

use std::time::Instant;

use shuttle_audit::{AuditRecord, Caller, Journal, Outcome, RuleRef};

fn record(n: u64) -> AuditRecord {
    AuditRecord {
        time: shuttle_audit::now_unix_nanos(),
        op: "connect".into(),
        from: "web".into(),
        to: Some("db".into()),
        object: "unix:/run/postgresql/.s.PGSQL.5432".into(),
        result: Outcome::Allow,
        rule: Some(RuleRef {
            index: 0,
            name: Some("web-to-pg".into()),
            file: "/etc/shuttle/policy.toml".into(),
            line: 1,
            column: 1,
        }),
        caller: Caller {
            pid_in_vm: Some(42),
            pid_on_host: Some(31_337),
            uid: Some(1000),
            program: Some("/usr/bin/psql".into()),
        },
        reason: None,
        seq: n,
    }
}

fn rate(n: u64, f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = match args.next() {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir_in(".")?,
    };
    let n: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    const BATCH: usize = 64;

    let unsynced = {
        let mut journal = Journal::open_unsynced_for_benchmarks(base.path().join("unsynced"))?;
        rate(n, || {
            for i in 0..n {
                journal.append(&record(i)).expect("append");
            }
        })
    };
    let synced = {
        let mut journal = Journal::open(base.path().join("synced"))?;
        rate(n, || {
            for i in 0..n {
                journal.append(&record(i)).expect("append");
            }
        })
    };
    let grouped = {
        let mut journal = Journal::open(base.path().join("grouped"))?;
        let batch: Vec<_> = (0..BATCH as u64).map(record).collect();
        let batches = n / BATCH as u64;
        rate(batches * BATCH as u64, || {
            for _ in 0..batches {
                journal.append_batch(&batch).expect("append_batch");
            }
        })
    };

    println!(
        "journal appends/s on {} ({n} records)",
        base.path().display()
    );
    println!("  no sync (baseline)        {unsynced:>12.0}  1.00x");
    println!(
        "  fdatasync per append      {synced:>12.0}  {:.4}x",
        synced / unsynced
    );
    println!(
        "  fdatasync per {BATCH} (group) {grouped:>12.0}  {:.4}x",
        grouped / unsynced
    );
    println!("  group commit vs per-append: {:.1}x", grouped / synced);
    Ok(())
}
