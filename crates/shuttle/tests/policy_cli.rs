//! `shuttle policy check|explain`: unprivileged, against the shipped example and broken files.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn shuttle(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shuttle"))
        .args(args)
        .output()
        .unwrap()
}

fn example() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/policy.toml")
        .display()
        .to_string()
}

#[test]
fn the_example_policy_is_valid() {
    let out = shuttle(&["policy", "check", &example()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok, 5 rules"));
}

#[test]
fn a_broken_policy_names_file_line_and_column_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[rule]]\nop = \"conect\"\nfrom = \"web\"\nto = \"db\"\nobject = \"tcp:5432\"\naction = \"allow\"\nextra = 1\n",
    )
    .unwrap();
    let out = shuttle(&["policy", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:2:6: error: unknown op `conect`",
            file.display()
        )),
        "{err}"
    );
    assert!(err.contains("did you mean `connect`?"), "{err}");
    assert!(
        err.contains(&format!(
            "{}:7:1: error: unknown key `extra`",
            file.display()
        )),
        "{err}"
    );
    let json = shuttle(&["policy", "check", "--json", file.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"].as_array().unwrap().len(), 2);
}

#[test]
fn explain_names_the_deciding_rule_or_the_default() {
    let ex = example();
    let out = shuttle(&[
        "policy", "explain", "--policy", &ex, "--op", "connect", "--from", "web", "--object",
        "tcp:5432",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("allow"), "{text}");
    assert!(text.contains("decided by rule #2 \"web-db-tcp\""), "{text}");
    let out = shuttle(&[
        "policy", "explain", "--policy", &ex, "--op", "connect", "--from", "intruder", "--to",
        "db", "--object", "tcp:5432",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("deny") && text.contains("no rule matched: default deny"),
        "{text}"
    );
    let bad = shuttle(&[
        "policy", "explain", "--policy", &ex, "--op", "fly", "--from", "a", "--object", "x",
    ]);
    assert_eq!(bad.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown op \"fly\""));
}
