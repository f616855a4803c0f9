//! Create, list, start, stop, remove; what a stopped VM leaves behind (nothing); `--base DIR`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{assert_code, pids_in_cgroup, stdout, Env};

#[test]
fn ls_shows_configuration_and_state() {
    let Some(env) = Env::new() else { return };
    let created = env.ok(&[
        "vm", "create", "conf", "--memory", "64M", "--pids", "50", "--tag", "front", "--tag",
        "web", "--hide", "/opt", "--net", "host", "--json",
    ]);
    let c: serde_json::Value = serde_json::from_str(&created).expect("create --json prints JSON");
    assert_eq!(c["name"], "conf");
    let v = env.vm("conf");
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["base"], "host");
    assert_eq!(v["net"], "host");
    assert_eq!(v["memory_bytes"], 64 << 20);
    assert_eq!(v["pids"], 50);
    assert_eq!(v["tags"], serde_json::json!(["front", "web"]));
    assert_eq!(v["hide"], serde_json::json!(["/opt"]));
    assert!(v["created_at"].is_u64());
    assert!(v.get("init_pid").is_none_or(serde_json::Value::is_null));
    assert!(env.vm_dir("conf").join("vm.json").is_file());

    env.ok(&["vm", "start", "conf"]);
    let v = env.vm("conf");
    assert_eq!(v["state"], "running");
    assert!(v["init_pid"].as_i64().is_some_and(|p| p > 1));
    assert!(v["monitor_pid"].as_i64().is_some_and(|p| p > 1));
    assert!(v["started_at"].is_u64());
    assert!(
        env.lock_held("conf"),
        "a running VM's monitor holds its lock"
    );

    let table = env.ok(&["vm", "ls"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("conf") && l.contains("running")),
        "{table}"
    );
}

#[test]
fn stop_leaves_nothing_behind() {
    let Some(env) = Env::new() else { return };
    env.create("clean", &["--memory", "128M", "--pids", "100"]);
    env.run_ok(
        "clean",
        "sleep 302 </dev/null >/dev/null 2>&1 & echo x > /tmp/t; mkdir -p /srv/keep && echo k > /srv/keep/f",
    );
    let v = env.vm("clean");
    let init = v["init_pid"].as_i64().unwrap();
    let monitor = i32::try_from(v["monitor_pid"].as_i64().unwrap()).unwrap();
    let monitor_start = proc_start_time(monitor);
    assert_ne!(monitor_start, "", "no monitor process {monitor}");
    let dirs = env.cgroup_dirs("clean");
    let cg_rel = {
        let mut it = dirs[0].components().rev();
        let vm = it
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        let parent = it
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        format!("/{parent}/{vm}")
    };
    let in_cgroup = pids_in_cgroup(&cg_rel);
    assert!(
        in_cgroup.len() >= 2,
        "init and the daemon should be in {cg_rel}: {in_cgroup:?}"
    );
    assert!(in_cgroup.contains(&i32::try_from(init).unwrap()));
    assert!(env.runtime_dir("clean").exists());
    let start_times: Vec<(i32, String)> = in_cgroup
        .iter()
        .map(|p| (*p, proc_start_time(*p)))
        .collect();

    let t = Instant::now();
    env.ok(&["vm", "stop", "clean"]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );

    assert_eq!(
        pids_in_cgroup(&cg_rel),
        Vec::<i32>::new(),
        "processes left in {cg_rel}"
    );
    for (pid, start) in &start_times {
        assert_ne!(
            &proc_start_time(*pid),
            start,
            "VM process {pid} survived the stop"
        );
    }
    assert_ne!(
        proc_start_time(monitor),
        monitor_start,
        "the monitor (pid {monitor}) survived the stop"
    );
    for d in &dirs {
        assert!(!d.exists(), "cgroup {} left after stop", d.display());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = env.path().to_string_lossy().into_owned();
    assert!(
        !mountinfo.lines().any(|l| l.contains(&root)),
        "mounts of the VM left on the host:\n{mountinfo}"
    );
    assert!(
        !env.runtime_dir("clean").exists(),
        "{} left after stop",
        env.runtime_dir("clean").display()
    );
    assert!(!env.lock_held("clean"), "the lock is still held after stop");
    let v = env.vm("clean");
    assert_eq!(v["state"], "stopped");
    assert!(
        v.get("init_pid").is_none_or(serde_json::Value::is_null),
        "{v}"
    );

    // The VM's files stay; its /tmp (a tmpfs) does not.
    assert_eq!(
        env.run_ok(
            "clean",
            "cat /srv/keep/f; test -e /tmp/t && echo tmp-kept; true"
        ),
        "k\n"
    );
}

/// Identifies a live process across pid reuse: its start time (field 22 of /proc/PID/stat),
/// or "" when it is gone or a zombie (a zombie is dead, it only waits for its parent, which
/// for a daemonised monitor is the host's PID 1, to reap it).
fn proc_start_time(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(") ")?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.first() == Some(&"Z") {
                return None;
            }
            fields.get(19).map(|f| (*f).to_owned())
        })
        .unwrap_or_default()
}

#[test]
fn stop_kills_processes_that_ignore_sigterm() {
    let Some(env) = Env::new() else { return };
    env.create("stubborn", &[]);
    env.run_ok(
        "stubborn",
        "sh -c 'trap \"\" TERM; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &",
    );
    let dirs = env.cgroup_dirs("stubborn");
    let t = Instant::now();
    env.ok(&["vm", "stop", "-t", "1", "stubborn"]);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(6), "stop -t 1 took {took:?}");
    assert_eq!(env.state("stubborn"), "stopped");
    for d in &dirs {
        assert!(!d.exists(), "cgroup {} left after stop", d.display());
    }
}

/// Stopping a VM touches no other cgroup in the shared parent: an empty one (what a VM's is
/// while it starts) stays, and so does the parent holding it. The parent used to be removed
/// recursively, taking empty cgroups with it (and, with a running VM's in it, retrying for
/// 150 ms at every stop).
#[test]
fn stopping_a_vm_leaves_the_other_cgroups_in_its_parent_alone() {
    let Some(env) = Env::new() else { return };
    env.create("one", &[]);
    env.ok(&["vm", "start", "one"]);
    let probes: Vec<std::path::PathBuf> = env
        .cgroup_dirs("one")
        .iter()
        .map(|d| d.parent().unwrap().join("zz-empty-probe"))
        .collect();
    for p in &probes {
        std::fs::create_dir(p).unwrap();
    }
    env.ok(&["vm", "stop", "one"]);
    let left: Vec<bool> = probes.iter().map(|p| p.exists()).collect();
    for p in &probes {
        let _ = std::fs::remove_dir(p);
        // The parent, empty now, goes as a stop would have taken it.
        let _ = std::fs::remove_dir(p.parent().unwrap());
    }
    assert!(
        left.iter().all(|&e| e),
        "an empty cgroup beside the VM's was removed: {probes:?}"
    );
}

#[test]
fn start_stop_rm_cycle() {
    let Some(env) = Env::new() else { return };
    env.create("cycle", &[]);
    for i in 0..3 {
        env.ok(&["vm", "start", "cycle"]);
        assert_eq!(env.state("cycle"), "running");
        assert_eq!(
            env.run_ok(
                "cycle",
                &format!("echo {i} >> /root/count; wc -l < /root/count")
            )
            .trim(),
            (i + 1).to_string()
        );
        env.ok(&["vm", "stop", "cycle"]);
        assert_eq!(env.state("cycle"), "stopped");
    }
    // `run` starts a stopped VM by itself; --no-start refuses to.
    env.fails(&["run", "cycle", "--no-start", "--", "true"]);
    assert_eq!(env.state("cycle"), "stopped");
    assert_code(&env.run("cycle", "exit 0"), 0, "auto-start");
    assert_eq!(env.state("cycle"), "running");
    assert_code(
        &env.output(&["run", "cycle", "--no-start", "--", "true"]),
        0,
        "--no-start on a running VM",
    );
    env.ok(&["vm", "stop", "cycle"]);
    env.ok(&["vm", "rm", "cycle"]);
    assert!(!env.vm_dir("cycle").exists(), "rm leaves the VM's files");
    assert!(env.vms().is_empty());
    // A new VM of the same name starts from scratch.
    env.create("cycle", &[]);
    assert_eq!(
        env.run_ok("cycle", "test -e /root/count && echo old-files; true"),
        ""
    );
}

#[test]
fn base_dir_is_the_lower_layer() {
    let Some(env) = Env::new() else { return };
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("this test needs a static busybox at /bin/busybox: install busybox-static (apt-get install busybox-static)");
    let base = common::host_dir();
    let bin = base.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::copy(busybox, bin.join("busybox")).unwrap();
    for applet in [
        "sh", "ls", "cat", "echo", "touch", "mkdir", "test", "hostname",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    std::fs::write(base.path().join("marker"), "from-base\n").unwrap();
    let base_str = base.path().to_str().unwrap();
    env.create("tiny", &["--base", base_str]);
    assert_eq!(env.vm("tiny")["base"], base_str);

    let out = env.exec(
        "tiny",
        &["/bin/sh", "-c", "echo base-ok; cat /marker; ls /"],
    );
    assert_code(&out, 0, "running in a busybox base");
    let s = stdout(&out);
    let mut lines = s.lines();
    assert_eq!(lines.next(), Some("base-ok"));
    assert_eq!(lines.next(), Some("from-base"));
    let listing: Vec<&str> = lines.flat_map(str::split_whitespace).collect();
    assert!(
        listing.contains(&"bin") && listing.contains(&"marker"),
        "{s}"
    );
    for host_only in ["usr", "etc", "home", "work", "var"] {
        assert!(
            !listing.contains(&host_only),
            "/{host_only} from the host shows up in a VM based on {base_str}: {s}"
        );
    }
    assert_eq!(
        stdout(&env.exec(
            "tiny",
            &[
                "/bin/sh",
                "-c",
                "hostname; test -e /usr/bin/python3 && echo host-python; true"
            ]
        )),
        "tiny\n"
    );

    assert_code(
        &env.exec(
            "tiny",
            &[
                "/bin/sh",
                "-c",
                "echo w > /bin/newfile && echo changed > /marker",
            ],
        ),
        0,
        "writing in the VM",
    );
    assert!(
        !bin.join("newfile").exists(),
        "a write inside reached the base directory"
    );
    assert_eq!(
        std::fs::read_to_string(base.path().join("marker")).unwrap(),
        "from-base\n"
    );
    assert!(env.upper("tiny").join("bin/newfile").is_file());
    assert_eq!(
        stdout(&env.exec("tiny", &["/bin/cat", "/marker", "/bin/newfile"])),
        "changed\nw\n"
    );
}

#[test]
fn concurrent_runs_start_the_vm_once() {
    let Some(env) = Env::new() else { return };
    env.create("race", &[]);
    for round in 0..3 {
        let children: Vec<_> = (0..4)
            .map(|i| {
                env.cmd(&["run", "race", "--", "sh", "-c", &format!("echo {i}")])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawning shuttle run")
            })
            .collect();
        for (i, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output().expect("waiting for shuttle run");
            assert_code(
                &out,
                0,
                &format!("round {round}: run #{i} racing 3 others to auto-start a stopped VM"),
            );
            assert_eq!(stdout(&out), format!("{i}\n"));
        }
        assert_eq!(env.state("race"), "running");
        env.ok(&["vm", "stop", "race"]);
    }
}

#[test]
fn concurrent_creates_of_one_name_make_one_vm() {
    let Some(env) = Env::new() else { return };
    let children: Vec<_> = (0..4)
        .map(|_| {
            env.cmd(&["vm", "create", "same"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawning shuttle vm create")
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("waiting for shuttle vm create"))
        .collect();
    let ok = outputs.iter().filter(|o| o.status.success()).count();
    let errors: Vec<String> = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert_eq!(
        ok, 1,
        "exactly one of 4 concurrent creates should succeed: {errors:?}"
    );
    assert_eq!(env.vms().len(), 1);
    assert_eq!(env.run_ok("same", "hostname"), "same\n");
}
