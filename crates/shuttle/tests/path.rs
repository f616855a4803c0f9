//! `shuttle path`: where a VM's file lives on the host (its upper layer, or its base), and
//! which VM's file a host path is.
#![allow(clippy::unwrap_used)]

mod common;

use common::{stderr, stdout, Env};
use serde_json::Value;

#[test]
fn vm_files_are_found_on_the_host_and_back() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &["--hide", "/srv"]);
    env.run_ok(
        "a",
        "echo mine > /etc/a-file && rm -f /etc/hostname && mkdir -p /srv/new && echo n > /srv/new/f",
    );
    // Written by the VM: its upper layer.
    let upper = env.upper("a").join("etc/a-file");
    assert_eq!(
        env.ok(&["path", "a:/etc/a-file"]).trim(),
        upper.to_str().unwrap()
    );
    assert_eq!(std::fs::read_to_string(&upper).unwrap(), "mine\n");
    // Not written: the host's file, through the base; `..` and `.` taken by name.
    assert_eq!(
        env.ok(&["path", "a:/etc/../etc/./hosts"]).trim(),
        "/etc/hosts"
    );
    let v: Value = serde_json::from_str(&env.ok(&["path", "--json", "a:/srv/new/f"])).unwrap();
    assert_eq!(v["vm"], "a");
    assert_eq!(v["path"], "/srv/new/f");
    assert_eq!(v["layer"], "upper");
    assert_eq!(
        v["host_path"],
        env.upper("a").join("srv/new/f").to_str().unwrap()
    );
    // Deleted in the VM, its own file systems, hidden paths, missing files: exit status 1.
    for (arg, says) in [
        ("a:/etc/hostname", "deleted"),
        ("a:/tmp/x", "not stored on the host"),
        ("a:/proc/1/status", "not stored on the host"),
        ("b:/srv/x", "hidden"),
        ("a:/no/such/file", "does not exist"),
    ] {
        let out = env.output(&["path", arg]);
        assert_eq!(out.status.code(), Some(1), "{arg}: {out:?}");
        assert!(stderr(&out).contains(says), "{arg}: {}", stderr(&out));
    }
    assert_eq!(
        env.output(&["path", "nosuchvm:/etc"]).status.code(),
        Some(2)
    );

    // The reverse: an upper-layer file is that VM's own copy.
    assert_eq!(
        env.ok(&["path", upper.to_str().unwrap()]).trim(),
        "a:/etc/a-file\tupper"
    );
    // A host file both VMs see through their base, unless one replaced it.
    env.run_ok("b", "echo b-copy >> /etc/hosts");
    let rows: Vec<Value> =
        serde_json::from_str(&env.ok(&["path", "--json", "/etc/hosts"])).unwrap();
    let vms: Vec<&str> = rows.iter().map(|r| r["vm"].as_str().unwrap()).collect();
    assert_eq!(vms, ["a"], "{rows:?}");
    assert_eq!(rows[0]["layer"], "base");
    assert_eq!(rows[0]["path"], "/etc/hosts");
    assert_eq!(
        env.ok(&["path", "b:/etc/hosts"]).trim(),
        env.upper("b").join("etc/hosts").to_str().unwrap()
    );
    let out = env.output(&["path", "/no/such/host/file"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout(&out).is_empty());
}
