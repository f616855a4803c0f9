//! Resource limits (cgroups): memory and number of processes.

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_code, stdout, Env};

#[test]
fn memory_limit_kills_the_hog() {
    let Some(env) = Env::new() else { return };
    env.create("mem", &["--memory", "64M"]);
    assert_eq!(env.vm("mem")["memory_bytes"], 64 << 20);
    let out = env.exec(
        "mem",
        &[
            "python3",
            "-c",
            "b = b'x' * (300 << 20); print('allocated')",
        ],
    );
    assert_code(&out, 137, "allocating 300 MiB under a 64 MiB limit");
    assert!(!stdout(&out).contains("allocated"));
    // The VM itself survives its OOM kill.
    assert_eq!(env.run_ok("mem", "echo alive"), "alive\n");

    let dirs = env.cgroup_dirs("mem");
    let limit = dirs.iter().find_map(|d| {
        ["memory.max", "memory.limit_in_bytes"]
            .iter()
            .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
    });
    assert_eq!(
        limit.as_deref().map(str::trim),
        Some("67108864"),
        "the VM's memory cgroup limit"
    );
    // A modest allocation still works.
    assert_code(
        &env.exec("mem", &["python3", "-c", "b = b'x' * (8 << 20)"]),
        0,
        "allocating 8 MiB under a 64 MiB limit",
    );
}

#[test]
fn pids_limit_stops_a_fork_storm() {
    let Some(env) = Env::new() else { return };
    env.create("forks", &["--pids", "20"]);
    assert_eq!(env.vm("forks")["pids"], 20);
    let out = env.exec(
        "forks",
        &[
            "python3",
            "-c",
            "import os, time, signal\n\
             kids, err, peak = [], None, 0\n\
             for i in range(50):\n\
             \x20   try:\n\
             \x20       pid = os.fork()\n\
             \x20   except OSError as e:\n\
             \x20       err = e.errno; break\n\
             \x20   if pid == 0:\n\
             \x20       time.sleep(5); os._exit(0)\n\
             \x20   kids.append(pid)\n\
             \x20   peak = max(peak, len([p for p in os.listdir('/proc') if p.isdigit()]))\n\
             print(len(kids), err, peak)\n\
             for k in kids: os.kill(k, signal.SIGKILL)\n\
             for k in kids: os.waitpid(k, 0)\n",
        ],
    );
    assert_code(&out, 0, "fork storm");
    let s = stdout(&out);
    let f: Vec<&str> = s.split_whitespace().collect();
    assert_eq!(f.len(), 3, "{s}");
    let forked: usize = f[0].parse().unwrap();
    let peak: usize = f[2].parse().unwrap();
    assert_eq!(f[1], "11", "fork should fail with EAGAIN: {s}");
    assert!(forked < 20, "forked {forked} processes under --pids 20");
    assert!(peak <= 20, "{peak} processes in a VM limited to 20");

    let dirs = env.cgroup_dirs("forks");
    let max = dirs
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("pids.max")).ok());
    assert_eq!(max.as_deref().map(str::trim), Some("20"));
    // The VM is usable again once the storm is over.
    assert_eq!(env.run_ok("forks", "echo calm"), "calm\n");
}
