//! The broker, the policy and the audit trail, end to end: a VM asks (through its own broker
//! socket) to signal a program in another VM; the policy decides; every decision is audited;
//! enforcement and auditing go on while the broker is down.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{assert_code, assert_success, stderr, stdout, wait_for, Env};
use serde_json::Value;

/// Where every VM finds the shuttle binary.
const IN_VM_SHUTTLE: &str = "/run/shuttle/shuttle";

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
        &[IN_VM_SHUTTLE, "signal", to, program, "--signal", "TERM"],
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

const ASK_A_TO_SIGNAL_SLEEP_IN_B: &str = r#"
[[rule]]
name = "ask-first"
op = "signal"
from = "a"
to = "b"
object = "sleep"
action = "ask"
timeout = "20s"
"#;

fn pending(env: &Env) -> Vec<Value> {
    let out = env.output(&["pending", "--json"]);
    assert_success(&out, "pending");
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn ask_waits_for_an_answer_that_can_be_remembered() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.ok(&["vm", "start", "a"]);
    env.run_ok(
        "b",
        "sleep 300 >/dev/null 2>&1 & sleep 300 >/dev/null 2>&1 &",
    );
    let file = write_policy(&env, ASK_A_TO_SIGNAL_SLEEP_IN_B);
    assert_success(&env.output(&["policy", "load", &file]), "policy load");

    // The request waits; an operator sees it and allows it, for a while.
    let asking = std::process::Command::new(Env::bin())
        .args(["run", "a", "--", IN_VM_SHUTTLE, "signal", "b", "sleep"])
        .env("SHUTTLE_ROOT", env.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut questions = Vec::new();
    assert!(wait_for(Duration::from_secs(10), || {
        questions = pending(&env);
        !questions.is_empty()
    }));
    let q = &questions[0];
    assert_eq!(q["question"]["vm"], "a");
    assert_eq!(q["question"]["to"], "b");
    assert_eq!(q["question"]["object"], "sleep");
    assert!(q["question"]["rule"]
        .as_str()
        .unwrap()
        .contains("ask-first"));
    let id = q["id"].as_u64().unwrap().to_string();
    assert_code(
        &env.output(&["answer", "999", "allow"]),
        125,
        "unknown question",
    );
    assert_success(
        &env.output(&["answer", &id, "allow", "--for", "10m"]),
        "answer",
    );
    let done = asking.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(wait_for(Duration::from_secs(5), || sleeps_in(&env, "b") == 0));

    // Remembered: the same request is allowed at once, without a question.
    env.run_ok("b", "sleep 300 >/dev/null 2>&1 &");
    assert_success(&signal_from(&env, "a", "b", "sleep"), "remembered answer");
    assert!(pending(&env).is_empty());
    let results: Vec<String> = audit(&env, &[])
        .iter()
        .map(|r| r["result"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(results, ["ask-allow", "ask-allow"]);
}

#[test]
fn an_unanswered_question_is_denied_after_its_timeout() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.ok(&["vm", "start", "a"]);
    env.run_ok("b", "sleep 300 >/dev/null 2>&1 &");
    let file = write_policy(&env, &ASK_A_TO_SIGNAL_SLEEP_IN_B.replace("20s", "1s"));
    assert_success(&env.output(&["policy", "load", &file]), "policy load");
    let started = std::time::Instant::now();
    let out = signal_from(&env, "a", "b", "sleep");
    assert_code(&out, 1, "unanswered");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        stderr(&out).contains("no answer within"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sleeps_in(&env, "b"), 1);
    assert_eq!(audit(&env, &["--denied"])[0]["result"], "ask-deny");
}

#[test]
fn sighup_reloads_the_policy_file() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.ok(&["vm", "start", "a"]);
    env.run_ok("b", "sleep 300 >/dev/null 2>&1 &");
    let file = write_policy(&env, ALLOW_A_TO_SIGNAL_SLEEP_IN_B);
    assert_success(&env.output(&["policy", "load", &file]), "policy load");
    // The file changes to deny; nothing changes until SIGHUP.
    std::fs::write(
        &file,
        ALLOW_A_TO_SIGNAL_SLEEP_IN_B.replace("\"allow\"", "\"deny\""),
    )
    .unwrap();
    let pid = nix::unistd::Pid::from_raw(broker_pid(&env));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(env.path().join("state/policy/active.toml"))
            .map(|t| t.contains("\"deny\""))
            .unwrap_or(false)
    }));
    std::thread::sleep(Duration::from_millis(200));
    assert_code(
        &signal_from(&env, "a", "b", "sleep"),
        1,
        "denied after reload",
    );
    assert_eq!(sleeps_in(&env, "b"), 1);
}

#[test]
fn a_vm_cannot_claim_another_identity_on_its_socket() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.run_ok("b", "sleep 300 >/dev/null 2>&1 &");
    let file = write_policy(&env, ALLOW_A_TO_SIGNAL_SLEEP_IN_B);
    assert_success(&env.output(&["policy", "load", &file]), "policy load");
    // From VM c (no rules), a hand-made request that claims to come from a (version 2 is
    // shuttle_proto::PROTOCOL_VERSION).
    env.create("c", &[]);
    let forged = r#"
import json, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect("/run/shuttle/broker.sock")
s.send(json.dumps({"hello": {"version": 2}}).encode()); print(s.recv(65536).decode())
s.send(json.dumps({"signal": {"vm": "b", "program": "sleep", "signal": 15, "from": "a"}}).encode())
print(s.recv(65536).decode())
s2 = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s2.connect("/run/shuttle/broker.sock")
s2.send(json.dumps({"hello": {"version": 2}}).encode()); print(s2.recv(65536).decode())
s2.send(json.dumps({"signal": {"vm": "b", "program": "sleep", "signal": 15}}).encode())
print(s2.recv(65536).decode())
"#;
    let out = env.py_ok("c", forged);
    assert!(
        out.contains(r#""vm":"c""#),
        "the socket names the VM it belongs to: {out}"
    );
    assert!(
        out.contains("bad request"),
        "unknown fields are refused: {out}"
    );
    assert!(out.contains("denied"), "c is not a: {out}");
    assert_eq!(sleeps_in(&env, "b"), 1);
}
