//! SysV IPC across VMs: the VMs an `ipc-group` rule allows share one IPC namespace (coarse by
//! design); others keep their own.
#![allow(clippy::unwrap_used)]

mod common;

use common::load_policy as load;

use common::{assert_success, stdout, Env};

/// The SysV shared-memory segments a VM sees, by id.
fn segments(env: &Env, vm: &str) -> Vec<String> {
    env.run_ok(vm, "ipcs -m | awk '$1 ~ /^0x/ {print $2}'")
        .lines()
        .map(str::to_owned)
        .collect()
}

const GROUP: &str = r#"
[[rule]]
op = "ipc-group"
from = "g1"
to = "g2"
object = "grp1"
action = "allow"
"#;

#[test]
fn the_vms_of_a_group_share_sysv_ipc_and_no_one_else_does() {
    let Some(env) = Env::new() else { return };
    for vm in ["g1", "g2", "g3"] {
        env.create(vm, &[]);
    }
    load(&env, GROUP);
    // g1 starts the group's namespace and makes a segment in it.
    let made = env.run_ok("g1", "ipcmk -M 4096 | awk '{print $NF}'");
    let id = made.trim().to_owned();
    assert!(!id.is_empty(), "ipcmk printed nothing");
    assert_eq!(segments(&env, "g1"), vec![id.clone()]);
    // g2, started after, joins it and sees the segment; g3 (no rule) does not.
    assert_eq!(segments(&env, "g2"), vec![id.clone()]);
    assert!(segments(&env, "g3").is_empty());
    // The join was audited.
    let audit = stdout(&env.output(&["audit", "--json"]));
    let joins: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["op"] == "ipc-group")
        .collect();
    assert_eq!(joins.len(), 1, "{audit}");
    assert_eq!(joins[0]["from"], "g2");
    assert_eq!(joins[0]["to"], "g1");
    assert_eq!(joins[0]["object"], "grp1");
    assert_eq!(joins[0]["result"], "allow");
}

#[test]
fn groups_are_settled_when_a_vm_starts() {
    let Some(env) = Env::new() else { return };
    env.create("g1", &[]);
    env.create("g2", &[]);
    // Both running before any rule: separate namespaces.
    env.run_ok("g1", "ipcmk -M 4096");
    assert!(segments(&env, "g2").is_empty());
    load(&env, GROUP);
    assert!(
        segments(&env, "g2").is_empty(),
        "a running VM does not change namespace"
    );
    // g2 restarted under the rule joins g1's namespace (g1 started before the rule: it was
    // given no group, so g2 starts the group afresh and g1 still sees only its own).
    assert_success(&env.output(&["vm", "stop", "g2"]), "stop g2");
    assert_success(&env.output(&["vm", "stop", "g1"]), "stop g1");
    env.run_ok("g1", "ipcmk -M 8192");
    let g1 = segments(&env, "g1");
    assert_eq!(g1.len(), 1, "a restarted VM starts with no segments");
    assert_eq!(segments(&env, "g2"), g1, "g2 joined g1's group namespace");
}
