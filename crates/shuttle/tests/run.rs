//! `shuttle run`: exit statuses, signals, stdio, environment, users and daemons.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::{assert_code, describe, pids_in_cgroup, stderr, stdout, wait_for, Env, Guard};

#[test]
fn exit_status_is_the_commands() {
    let Some(env) = Env::new() else { return };
    env.create("exits", &[]);
    assert_code(&env.run("exits", "exit 0"), 0, "exit 0");
    assert_code(&env.run("exits", "exit 3"), 3, "exit 3");
    assert_code(&env.run("exits", "exit 124"), 124, "exit 124");
    assert_code(&env.run("exits", "kill -TERM $$"), 143, "killed by SIGTERM");
    assert_code(&env.run("exits", "kill -KILL $$"), 137, "killed by SIGKILL");
    assert_code(&env.exec("exits", &["false"]), 1, "false");
}

#[test]
fn missing_and_unexecutable_commands() {
    let Some(env) = Env::new() else { return };
    env.create("cmds", &[]);
    let out = env.exec("cmds", &["no-such-command-xyz", "arg"]);
    assert_code(&out, 127, "command not found");
    assert!(
        stderr(&out).contains("no-such-command-xyz"),
        "the message should name the command: {}",
        stderr(&out)
    );
    let out = env.exec("cmds", &["/nonexistent/bin/tool"]);
    assert_code(&out, 127, "absolute path not found");

    // A file that exists but is not executable.
    let out = env.exec("cmds", &["/etc/hostname"]);
    assert_code(&out, 126, "not executable");
    assert!(!stderr(&out).is_empty(), "126 should come with a message");
}

fn spawn_run(env: &Env, vm: &str, script: &str) -> Guard {
    let mut c = env.cmd(&["run", vm, "--", "sh", "-c", script]);
    c.stdout(Stdio::piped()).stderr(Stdio::inherit());
    Guard(c.spawn().expect("spawning shuttle run"))
}

fn signal_is_forwarded(sig: Signal, trap: &str, code: i32) {
    let Some(env) = Env::new() else { return };
    env.create("sig", &[]);
    env.ok(&["vm", "start", "sig"]);
    let mut run = spawn_run(
        &env,
        "sig",
        &format!(
            "trap 'echo got-{trap}; exit {code}' {trap}; echo ready; while :; do sleep 0.1; done"
        ),
    );
    run.read_until("ready\n", Duration::from_secs(10));
    run.signal(sig);
    let st = run.wait_timeout(Duration::from_secs(10));
    let rest = run.rest_of_stdout();
    assert_eq!(
        st.code(),
        Some(code),
        "{sig} to `shuttle run`: expected exit {code}, got {}",
        describe(st)
    );
    assert_eq!(rest, format!("got-{trap}\n"));
}

#[test]
fn sigterm_is_forwarded() {
    signal_is_forwarded(Signal::SIGTERM, "TERM", 7);
}

#[test]
fn sigint_is_forwarded() {
    signal_is_forwarded(Signal::SIGINT, "INT", 8);
}

#[test]
fn sighup_and_sigusr1_are_forwarded() {
    signal_is_forwarded(Signal::SIGHUP, "HUP", 9);
    signal_is_forwarded(Signal::SIGUSR1, "USR1", 10);
}

#[test]
fn untrapped_signal_gives_128_plus_signal() {
    let Some(env) = Env::new() else { return };
    env.create("sig2", &[]);
    let mut run = spawn_run(&env, "sig2", "echo ready; while :; do sleep 0.1; done");
    run.read_until("ready\n", Duration::from_secs(10));
    run.signal(Signal::SIGTERM);
    let st = run.wait_timeout(Duration::from_secs(10));
    assert_eq!(st.code(), Some(143), "got {}", describe(st));
    // The command's process group is gone.
    let ps = env.run_ok("sig2", "ps -e -o args=");
    assert!(!ps.contains("sleep 0.1"), "the command survived:\n{ps}");
}

#[test]
fn stdin_and_stdout_are_passed_through() {
    let Some(env) = Env::new() else { return };
    env.create("pipe", &[]);
    let mut c = env.cmd(&["run", "pipe", "--", "tr", "a-z", "A-Z"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut run = Guard(c.spawn().unwrap());
    run.write_stdin(b"hi\n");
    drop(run.0.stdin.take());
    let st = run.wait_timeout(Duration::from_secs(10));
    assert!(st.success(), "{}", describe(st));
    assert_eq!(run.rest_of_stdout(), "HI\n");

    // A megabyte through cat, in both directions, intact; stderr separate.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut c = env.cmd(&["run", "pipe", "--", "sh", "-c", "cat; echo to-stderr >&2"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn({
        let data = data.clone();
        move || std::io::Write::write_all(&mut input, &data)
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert_code(&out, 0, "cat");
    assert!(out.stdout == data, "1 MiB through cat came back different");
    assert_eq!(stderr(&out), "to-stderr\n");
}

#[test]
fn env_workdir_and_user() {
    let Some(env) = Env::new() else { return };
    env.create("opts", &[]);
    let out = env.output(&[
        "run",
        "opts",
        "-e",
        "FOO=bar baz",
        "-w",
        "/usr",
        "--",
        "sh",
        "-c",
        "echo \"$FOO\"; pwd; id -u",
    ]);
    assert_code(&out, 0, "run with -e and -w");
    assert_eq!(stdout(&out), "bar baz\n/usr\n0\n");
    assert_eq!(env.run_ok("opts", "pwd"), "/\n", "default cwd is /");

    let out = env.output(&[
        "run",
        "opts",
        "-u",
        "nobody",
        "--",
        "sh",
        "-c",
        "id -u; grep CapEff /proc/self/status",
    ]);
    assert_code(&out, 0, "run -u nobody");
    assert_eq!(stdout(&out), "65534\nCapEff:\t0000000000000000\n");
}

#[test]
fn daemons_outlive_run_until_the_vm_stops() {
    let Some(env) = Env::new() else { return };
    env.create("daemon", &[]);
    let started = Instant::now();
    env.run_ok("daemon", "sleep 301 </dev/null >/dev/null 2>&1 &");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "run should return without waiting for the daemon"
    );
    let ps = env.run_ok("daemon", "ps -e -o args=");
    assert!(
        ps.contains("sleep 301"),
        "the daemon died with its run:\n{ps}"
    );

    let dirs = env.cgroup_dirs("daemon");
    let cg = dirs[0]
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    let needle = format!("/{}/{}", cg[1], cg[0]);
    let host_sleep: Vec<i32> = pids_in_cgroup(&needle)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default() == b"sleep\x00301\x00"
        })
        .collect();
    assert_eq!(host_sleep.len(), 1, "the daemon's host pid in {needle}");

    env.ok(&["vm", "stop", "daemon"]);
    let pid = host_sleep[0];
    assert!(
        wait_for(Duration::from_secs(2), || {
            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default() != b"sleep\x00301\x00"
        }),
        "the daemon (host pid {pid}) survived `vm stop`"
    );
}

#[test]
fn stopping_the_vm_ends_an_attached_run() {
    let Some(env) = Env::new() else { return };
    env.create("attached", &[]);
    let mut run = spawn_run(&env, "attached", "echo ready; exec sleep 100");
    run.read_until("ready\n", Duration::from_secs(10));
    env.ok(&["vm", "stop", "attached"]);
    let st = run.wait_timeout(Duration::from_secs(5));
    assert!(
        matches!(st.code(), Some(143 | 137)),
        "a run whose VM stops should end as its command did (SIGTERM/SIGKILL), got {}",
        describe(st)
    );
}

#[test]
fn env_key_alone_passes_the_callers_value() {
    let Some(env) = Env::new() else { return };
    env.create("envpass", &[]);
    let out = env
        .cmd(&[
            "run",
            "envpass",
            "-e",
            "SHUTTLE_TEST_VAR",
            "--",
            "sh",
            "-c",
            "echo \"[$SHUTTLE_TEST_VAR][$HOME_NOT_PASSED]\"",
        ])
        .env("SHUTTLE_TEST_VAR", "from caller")
        .env("HOME_NOT_PASSED", "leak")
        .output()
        .expect("spawning shuttle run");
    assert_code(&out, 0, "run -e KEY");
    assert_eq!(stdout(&out), "[from caller][]\n", "only -e variables pass");
}
