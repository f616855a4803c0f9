//! Bad input: one-line errors, status 125, and nothing created or changed.

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_code, Env};

fn vm_dirs(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.state_vms())
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn invalid_names_are_rejected() {
    let Some(env) = Env::new() else { return };
    let long = "a".repeat(64);
    for name in [
        "Bad",
        "a/b",
        "../x",
        "a b",
        "a.b",
        long.as_str(),
        "under_score",
    ] {
        let msg = env.fails(&["vm", "create", name]);
        assert!(
            msg.len() > "shuttle: ".len() + 10,
            "unhelpful message: {msg}"
        );
        assert_eq!(
            vm_dirs(&env),
            Vec::<String>::new(),
            "`vm create {name:?}` left files"
        );
    }
    assert!(env.vms().is_empty());
    // The longest valid name (63 characters) works, and becomes the hostname.
    let max = "b".repeat(63);
    env.create(&max, &[]);
    assert_eq!(env.run_ok(&max, "hostname"), format!("{max}\n"));
}

#[test]
fn duplicate_create_fails_and_keeps_the_original() {
    let Some(env) = Env::new() else { return };
    env.create("dup", &["--memory", "64M"]);
    let msg = env.fails(&["vm", "create", "dup", "--memory", "128M"]);
    assert!(msg.contains("dup"), "{msg}");
    assert_eq!(env.vm("dup")["memory_bytes"], 64 << 20);
    assert_eq!(env.vms().len(), 1);
}

#[test]
fn missing_vm_is_named_in_the_error() {
    let Some(env) = Env::new() else { return };
    for args in [
        vec!["vm", "start", "ghost"],
        vec!["vm", "stop", "ghost"],
        vec!["vm", "rm", "ghost"],
        vec!["vm", "rm", "--force", "ghost"],
        vec!["run", "ghost", "--", "true"],
    ] {
        let msg = env.fails(&args);
        assert!(msg.contains("ghost"), "{args:?}: {msg}");
    }
    assert_eq!(vm_dirs(&env), Vec::<String>::new());
}

#[test]
fn bad_options_create_nothing() {
    let Some(env) = Env::new() else { return };
    for extra in [
        &["--base", "/nonexistent/base"][..],
        &["--memory", "lots"],
        &["--memory", "12Q"],
        &["--net", "bridge"],
        &["--hide", "relative/path"],
    ] {
        let mut args = vec!["vm", "create", "opt"];
        args.extend_from_slice(extra);
        let msg = env.fails(&args);
        assert!(
            msg.contains(extra[1]) || msg.contains(extra[0].trim_start_matches("--")),
            "{extra:?}: the message should point at the bad value: {msg}"
        );
        assert_eq!(vm_dirs(&env), Vec::<String>::new(), "{extra:?} left files");
    }
}

#[test]
fn start_twice_says_already_running() {
    let Some(env) = Env::new() else { return };
    env.create("twice", &[]);
    env.ok(&["vm", "start", "twice"]);
    let pid = env.init_pid("twice");
    let out = env.output(&["vm", "start", "twice"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("already running"), "second start: {all}");
    assert_eq!(
        env.init_pid("twice"),
        pid,
        "the second start replaced the VM"
    );
}

#[test]
fn rm_of_a_running_vm_needs_force() {
    let Some(env) = Env::new() else { return };
    env.create("busy", &[]);
    env.run_ok("busy", "echo data > /root/data");
    let msg = env.fails(&["vm", "rm", "busy"]);
    assert!(msg.contains("busy"), "{msg}");
    assert!(msg.contains("running") || msg.contains("--force"), "{msg}");
    assert_eq!(env.state("busy"), "running");
    assert_eq!(env.run_ok("busy", "cat /root/data"), "data\n");

    let dirs = env.cgroup_dirs("busy");
    env.ok(&["vm", "rm", "--force", "busy"]);
    assert!(env.vms().is_empty());
    assert!(!env.vm_dir("busy").exists());
    assert!(!env.runtime_dir("busy").exists());
    for d in dirs {
        assert!(!d.exists(), "cgroup {} left after rm --force", d.display());
    }
}

#[test]
fn run_without_a_command_is_a_usage_error() {
    let Some(env) = Env::new() else { return };
    env.create("usage", &[]);
    let out = env.output(&["run", "usage"]);
    assert!(!out.status.success());
    assert_eq!(
        env.state("usage"),
        "stopped",
        "a usage error started the VM"
    );
    assert_code(&env.run("usage", "true"), 0, "run after the usage error");
}
