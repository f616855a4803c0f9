#![allow(dead_code)]

use std::fs;
use std::path::Path;

use shuttle_audit::{AuditRecord, Caller, Outcome, RuleRef};

/// A record at `time` on edge `from -> to` with `result`.
pub fn rec(time: u64, from: &str, to: &str, result: Outcome) -> AuditRecord {
    AuditRecord {
        time,
        op: "connect".into(),
        from: from.into(),
        to: Some(to.into()),
        object: format!("tcp:{time}"),
        result,
        rule: match result {
            Outcome::Allow | Outcome::AskAllow | Outcome::AskDeny => Some(RuleRef {
                index: 0,
                name: Some("r".into()),
                file: "/etc/shuttle/policy.toml".into(),
                line: 1,
                column: 1,
            }),
            Outcome::Deny | Outcome::Error => None,
        },
        caller: Caller {
            pid_in_vm: Some(7),
            pid_on_host: Some(4242),
            uid: Some(1000),
            program: Some("/usr/bin/psql".into()),
        },
        reason: None,
        seq: 0,
    }
}

pub fn allow(time: u64) -> AuditRecord {
    rec(time, "web", "db", Outcome::Allow)
}

/// Copies the files of a journal directory (the state a crash could leave behind).
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The segment files of a journal, sorted.
pub fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}
