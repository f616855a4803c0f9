//! The broker, the policy and the audit trail, end to end: a VM asks (through its own broker
//! socket) to signal a program in another VM; the policy decides; every decision is audited;
//! enforcement and auditing go on while the broker is down.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{assert_code, assert_success, stderr, stdout, wait_for, Env};
use serde_json::Value;

const ALLOW_A_TO_SIGNAL_SLEEP_IN_B: &str = r#"
[[rule]]
name = "a-stops-b-sleep"
op = "signal"
from = "a"
to = "b"
object = "sleep"
action = "allow"
"#;

/// `shuttle signal VM PROGRAM` run inside VM `from`.
fn signal_from(env: &Env, from: &str, to: &str, program: &str) -> std::process::Output {
    env.exec(
        from,
        &[Env::bin(), "signal", to, program, "--signal", "TERM"],
    )
}

fn sleeps_in(env: &Env, vm: &str) -> usize {
    let out = env.run_ok(vm, "ps -eo comm= | grep -c '^sleep$' || true");
    out.trim().parse().unwrap_or(0)
}

fn write_policy(env: &Env, text: &str) -> String {
    let path = env.path().join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn audit(env: &Env, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--json"];
    args.extend_from_slice(extra);
    stdout(&env.output(&args))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn broker_pid(env: &Env) -> i32 {
    std::fs::read_to_string(env.path().join("run/broker.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn signals_across_vms_follow_the_policy_and_are_audited() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.run_ok("b", "sleep 300 >/dev/null 2>&1 &");
    assert_eq!(sleeps_in(&env, "b"), 1);

    // No policy: denied, and b's program lives on.
    let out = signal_from(&env, "a", "b", "sleep");
    assert_code(&out, 1, "signal without a rule");
    assert!(
        stderr(&out).contains("denied by policy"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sleeps_in(&env, "b"), 1);

    // Load a rule (this starts the broker): now a may stop b's sleep.
    let file = write_policy(&env, ALLOW_A_TO_SIGNAL_SLEEP_IN_B);
    let loaded = env.output(&["policy", "load", &file]);
    assert_success(&loaded, "policy load");
    assert!(
        stderr(&loaded).contains("enforced now by 2 running VM(s)"),
        "{}",
        stderr(&loaded)
    );
    let out = signal_from(&env, "a", "b", "sleep");
    assert_success(&out, "allowed signal");
    assert!(
        wait_for(Duration::from_secs(5), || sleeps_in(&env, "b") == 0),
        "b's sleep survived an allowed SIGTERM"
    );

    // The rule names a as the sender: b asking the same of a is denied, whatever b sends.
    env.run_ok("a", "sleep 300 >/dev/null 2>&1 &");
    assert_code(
        &signal_from(&env, "b", "a", "sleep"),
        1,
        "reverse direction",
    );
    assert_eq!(sleeps_in(&env, "a"), 1);

    // Every decision is in the audit trail, with the deciding rule or the default.
    let records = audit(&env, &[]);
    let signals: Vec<&Value> = records.iter().filter(|r| r["op"] == "signal").collect();
    assert_eq!(signals.len(), 3, "{records:?}");
    assert_eq!(signals[0]["from"], "a");
    assert_eq!(signals[0]["result"], "deny");
    assert!(signals[0]["rule"].is_null());
    assert_eq!(signals[1]["result"], "allow");
    assert_eq!(signals[1]["rule"]["name"], "a-stops-b-sleep");
    assert_eq!(signals[2]["from"], "b");
    assert_eq!(signals[2]["result"], "deny");
    let denied = audit(&env, &["--denied"]);
    assert_eq!(denied.len(), 2);
    assert!(audit(&env, &["--vm", "b", "--since", "1h"]).len() == 3);
}

#[test]
fn a_bad_policy_changes_nothing() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    let good = write_policy(&env, ALLOW_A_TO_SIGNAL_SLEEP_IN_B);
    assert_success(&env.output(&["policy", "load", &good]), "good policy");
    let bad = env.path().join("bad.toml");
    std::fs::write(&bad, "[[rule]]\nop = \"signal\"\nfrom = \"a\"\nto = \"b\"\nobject = \"sleep\"\naction = \"alow\"\n").unwrap();
    let out = env.output(&["policy", "load", bad.to_str().unwrap()]);
    assert_code(&out, 1, "bad policy");
    assert!(stderr(&out).contains("bad.toml:6:"), "{}", stderr(&out));
    // The good policy is still the one in force.
    env.run_ok("b", "sleep 300 >/dev/null 2>&1 &");
    assert_success(&signal_from(&env, "a", "b", "sleep"), "still allowed");
}

#[test]
fn enforcement_and_auditing_survive_a_broker_killed_with_sigkill() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.ok(&["vm", "start", "a"]);
    env.run_ok("b", "sleep 300 >/dev/null 2>&1 &");
    let file = write_policy(&env, ALLOW_A_TO_SIGNAL_SLEEP_IN_B);
    assert_success(&env.output(&["policy", "load", &file]), "policy load");
    let before = audit(&env, &[]).len();

    let pid = nix::unistd::Pid::from_raw(broker_pid(&env));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(wait_for(Duration::from_secs(5), || nix::sys::signal::kill(
        pid, None
    )
    .is_err()
        || common::is_zombie(pid.as_raw())));

    // VMs keep running; their monitors keep deciding with the last policy.
    assert_eq!(env.state("a"), "running");
    assert_eq!(env.state("b"), "running");
    assert_success(
        &signal_from(&env, "a", "b", "sleep"),
        "allowed while the broker is down",
    );
    assert!(wait_for(Duration::from_secs(5), || sleeps_in(&env, "b") == 0));
    assert_code(
        &signal_from(&env, "b", "a", "sleep"),
        1,
        "denied while the broker is down",
    );

    // A restarted broker collects what was decided meanwhile.
    let mut daemon = std::process::Command::new(Env::bin())
        .arg("daemon")
        .env("SHUTTLE_ROOT", env.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(5), || env
        .path()
        .join("run/broker.sock")
        .exists()
        && broker_pid(&env) == daemon.id() as i32));
    let records = audit(&env, &[]);
    assert_eq!(records.len(), before + 2, "{records:?}");
    let last = &records[records.len() - 1];
    assert_eq!(
        (last["from"].as_str(), last["result"].as_str()),
        (Some("b"), Some("deny"))
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    daemon.wait().unwrap();
}

#[test]
fn a_vm_cannot_reach_another_vms_broker_socket_or_the_hosts() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    // Its own API socket is there, read-only; Shuttle's runtime directory is not.
    let out = env.run_ok("a", "ls /run/shuttle; test -S /run/shuttle/broker.sock && echo socket; touch /run/shuttle/x 2>&1 || echo read-only");
    assert!(out.contains("socket") && out.contains("read-only"), "{out}");
    let run = env.path().join("run");
    let out = env.run(
        "a",
        &format!(
            "ls {}/vms {}/broker.sock 2>&1; echo done",
            run.display(),
            run.display()
        ),
    );
    assert!(
        !stdout(&out).contains("monitor.sock") && !stdout(&out).contains("api"),
        "{}",
        stdout(&out)
    );
}
