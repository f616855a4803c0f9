//! `share` rules: a directory, file or FIFO of one VM (or of the host) appears in another VM,
//! read-only unless the rule says `mode = "rw"`, added to and removed from running VMs when a
//! policy is loaded; symbolic links in the owner's path never lead out of the owner's root.
#![allow(clippy::unwrap_used)]

mod common;

use common::load_policy as load;

use std::process::Stdio;
use std::time::Duration;

use common::{host_dir, stdout, wait_for, Env, Guard};
use serde_json::Value;

fn share(from: &str, to: &str, object: &str, extra: &str) -> String {
    format!(
        "[[rule]]\nop = \"share\"\nfrom = \"{from}\"\nto = \"{to}\"\nobject = \"{object}\"\n{extra}action = \"allow\"\n\n"
    )
}

fn shares(env: &Env) -> Vec<Value> {
    stdout(&env.output(&["audit", "--json"]))
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["op"] == "share")
        .collect()
}

/// Whether `path` exists in `vm` (as anything, a dangling link too).
fn exists_in(env: &Env, vm: &str, path: &str) -> bool {
    env.run(vm, &format!("test -e '{path}' || test -L '{path}'"))
        .status
        .success()
}

#[test]
fn a_directory_of_one_vm_is_read_only_in_another_and_goes_with_the_rule() {
    let Some(env) = Env::new() else { return };
    for vm in ["a", "b", "c"] {
        env.create(vm, &[]);
    }
    env.run_ok("a", "mkdir -p /srv/data && echo from-a > /srv/data/f");
    env.run_ok("b", "true");
    load(&env, &share("b", "a", "/srv/data", ""));
    // In place in the running VM as soon as the load returns.
    assert_eq!(env.run_ok("b", "cat /srv/data/f").trim(), "from-a");
    // Live: what a writes later shows too.
    env.run_ok("a", "echo later > /srv/data/g");
    assert_eq!(env.run_ok("b", "cat /srv/data/g").trim(), "later");
    // Read-only, even for root in b.
    let out = env.run("b", "echo x > /srv/data/f");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{out:?}"
    );
    assert!(!env.run("b", "touch /srv/data/new").status.success());
    assert!(!exists_in(&env, "a", "/srv/data/new"));
    // A VM no rule names sees nothing of it.
    assert!(!exists_in(&env, "c", "/srv/data"));
    // b's own files stay b's: the share is a mount, nothing was copied.
    assert!(!env.upper("b").join("srv/data/f").exists());
    let records = shares(&env);
    assert!(
        records.iter().any(|r| r["from"] == "b"
            && r["to"] == "a"
            && r["object"] == "/srv/data"
            && r["result"] == "allow"),
        "{records:?}"
    );

    // A policy without the rule takes it away from the running VM, mount point and all.
    load(&env, "");
    assert!(!exists_in(&env, "b", "/srv/data/f"));
    assert!(!exists_in(&env, "b", "/srv/data"));
    assert_eq!(env.run_ok("a", "cat /srv/data/f").trim(), "from-a");
    let records = shares(&env);
    assert!(
        records.iter().any(|r| r["from"] == "b"
            && r["result"] == "deny"
            && r["reason"].as_str().unwrap_or("").contains("removed")),
        "{records:?}"
    );
}

#[test]
fn a_fifo_of_one_vm_carries_data_to_another() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.run_ok("a", "mkdir -p /srv && mkfifo /srv/pipe");
    env.run_ok("b", "true");
    load(&env, &share("b", "a", "/srv/pipe", ""));
    assert_eq!(env.run_ok("b", "stat -c %F /srv/pipe").trim(), "fifo");
    let mut reader = Guard(
        env.cmd(&["run", "b", "--", "sh", "-c", "cat /srv/pipe"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    env.run_ok("a", "echo through-the-fifo > /srv/pipe");
    let got = reader.read_until("through-the-fifo", Duration::from_secs(10));
    assert!(got.contains("through-the-fifo"), "{got:?}");
    assert!(reader.wait_timeout(Duration::from_secs(10)).success());
}

#[test]
fn a_shared_memory_file_of_one_vm_is_mapped_in_another() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    // a keeps a POSIX shared-memory segment (a file in its own /dev/shm tmpfs) alive.
    let _holder = Guard(
        env.cmd(&[
            "run",
            "a",
            "--",
            "python3",
            "-c",
            "from multiprocessing import shared_memory as s, resource_tracker as r\n\
             m = s.SharedMemory(name='seg', create=True, size=64)\n\
             r.unregister(m._name, 'shared_memory')\n\
             m.buf[:7] = b'from-a!'\n\
             import time\n\
             time.sleep(60)",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    );
    assert!(wait_for(Duration::from_secs(10), || env
        .run("a", "test -s /dev/shm/seg")
        .status
        .success()));
    env.run_ok("b", "true");
    load(&env, &share("b", "a", "/dev/shm/seg", "mode = \"rw\"\n"));
    // b maps the same pages: what it writes, a reads.
    let got = env.py_ok(
        "b",
        "from multiprocessing import shared_memory as s, resource_tracker as r\n\
         m = s.SharedMemory(name='seg')\n\
         r.unregister(m._name, 'shared_memory')\n\
         print(bytes(m.buf[:7]).decode())\n\
         m.buf[:7] = b'from-b!'",
    );
    assert_eq!(got.trim(), "from-a!");
    assert_eq!(
        env.py_ok("a", "print(open('/dev/shm/seg', 'rb').read(7).decode())")
            .trim(),
        "from-b!"
    );
}

#[test]
fn a_host_directory_is_shared_into_a_vm_and_rw_writes_through() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    let dir = host_dir();
    std::fs::write(dir.path().join("host-file"), "from-host\n").unwrap();
    let object = dir.path().to_str().unwrap();
    env.run_ok("a", "mkdir -p /srv/rw && echo a-data > /srv/rw/f");
    let policy = share("b", "@host", object, "at = \"/mnt/host\"\n")
        + &share("b", "a", "/srv/rw", "mode = \"rw\"\n");
    env.run_ok("b", "true");
    load(&env, &policy);
    assert_eq!(
        env.run_ok("b", "cat /mnt/host/host-file").trim(),
        "from-host"
    );
    // Read-only by default: the host's directory is not written.
    assert!(!env.run("b", "touch /mnt/host/x").status.success());
    assert!(!dir.path().join("x").exists());
    // Something made on the host afterwards shows at once (a mount, not a copy).
    std::fs::write(dir.path().join("later"), "later\n").unwrap();
    assert_eq!(env.run_ok("b", "cat /mnt/host/later").trim(), "later");
    // rw: what b writes lands in a.
    env.run_ok("b", "echo from-b > /srv/rw/g && echo more >> /srv/rw/f");
    assert_eq!(env.run_ok("a", "cat /srv/rw/g").trim(), "from-b");
    assert_eq!(env.run_ok("a", "cat /srv/rw/f"), "a-data\nmore\n");
    // Still nosuid and nodev.
    let opts = env.run_ok("b", "grep ' /srv/rw ' /proc/self/mountinfo");
    assert!(opts.contains("nosuid") && opts.contains("nodev"), "{opts}");
    assert!(!opts.contains(" ro,") && opts.contains(" rw,"), "{opts}");
}

#[test]
fn shares_follow_the_owner_vm_starting_and_stopping() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.run_ok("a", "mkdir -p /srv/data && echo from-a > /srv/data/f");
    env.ok(&["vm", "stop", "a"]);
    env.run_ok("b", "true");
    load(&env, &share("b", "a", "/srv/data", ""));
    // a is not running: nothing yet, and the load did not start it.
    assert!(!exists_in(&env, "b", "/srv/data/f"));
    assert_eq!(env.state("a"), "stopped");
    env.ok(&["vm", "start", "a"]);
    assert!(
        wait_for(Duration::from_secs(10), || exists_in(
            &env,
            "b",
            "/srv/data/f"
        )),
        "the share did not appear in b once a ran"
    );
    env.ok(&["vm", "stop", "a"]);
    assert!(
        wait_for(Duration::from_secs(10), || !exists_in(
            &env,
            "b",
            "/srv/data/f"
        )),
        "the share stayed in b after a stopped"
    );
    // A quick restart: a's new run waits until b let go of its old one (one overlay at a
    // time on a's layers), then b gets the share of the new run.
    env.ok(&["vm", "start", "a"]);
    assert!(wait_for(Duration::from_secs(10), || exists_in(
        &env,
        "b",
        "/srv/data/f"
    )));
    env.ok(&["vm", "stop", "a"]);
    env.ok(&["vm", "start", "a"]);
    env.run_ok("a", "echo new-run > /srv/data/f");
    assert!(
        wait_for(Duration::from_secs(10), || env
            .run("b", "cat /srv/data/f")
            .status
            .success()
            && env.run_ok("b", "cat /srv/data/f").trim() == "new-run"),
        "b does not see a's new run"
    );
}

#[test]
fn symbolic_links_in_the_owner_never_lead_out_of_its_root() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    let host = host_dir();
    std::fs::write(host.path().join("secret"), "host-secret\n").unwrap();
    let state = env.path().join("state");
    // a: a link to its root, to Shuttle's state directory (hidden in a) and to a host path
    // that a does not have.
    env.run_ok(
        "a",
        &format!(
            "mkdir -p /srv && ln -s / /srv/root && ln -s {} /srv/state && ln -s /nowhere/x /srv/gone && \
             rm -rf {host} && ln -s {host} /srv/host",
            state.display(),
            host = host.path().display()
        ),
    );
    env.run_ok("b", "true");
    let policy = share("b", "a", "/srv/root", "")
        + &share("b", "a", "/srv/state/vms", "")
        + &share("b", "a", "/srv/gone", "")
        + &share("b", "a", "/srv/host", "")
        + &share("b", "a", "/srv/root/etc", "at = \"/mnt/etc\"\n");
    load(&env, &policy);
    // A link as the object is refused; through a link, the path resolves inside a's root.
    assert!(!exists_in(&env, "b", "/srv/root"));
    assert!(!exists_in(&env, "b", "/srv/gone"));
    assert!(!exists_in(&env, "b", "/srv/host"));
    assert!(!env
        .run("b", "ls -R /srv/state/vms 2>/dev/null | grep -q vm.json")
        .status
        .success());
    assert!(!env
        .run("b", "grep -rq host-secret /srv /mnt 2>/dev/null")
        .status
        .success());
    // /srv/root/etc is a's /etc (a link on the way, resolved in a's root).
    env.run_ok("a", "echo a-etc > /etc/a-marker");
    assert_eq!(env.run_ok("b", "cat /mnt/etc/a-marker").trim(), "a-etc");
    let refused: Vec<Value> = shares(&env)
        .into_iter()
        .filter(|r| r["result"] == "error")
        .collect();
    assert!(
        refused.iter().any(|r| r["object"] == "/srv/root"),
        "{refused:?}"
    );
}

#[test]
fn what_the_owner_hides_stays_hidden_and_vms_starting_later_get_their_shares() {
    let Some(env) = Env::new() else { return };
    let dir = host_dir();
    let base = dir.path().to_str().unwrap().to_owned();
    std::fs::create_dir(dir.path().join("secret")).unwrap();
    std::fs::write(dir.path().join("secret/key"), "host-key\n").unwrap();
    std::fs::write(dir.path().join("public"), "public\n").unwrap();
    env.create("a", &["--hide", &format!("{base}/secret")]);
    env.create("b", &[]);
    env.create("d", &[]);
    assert!(!exists_in(&env, "a", &format!("{base}/secret/key")));
    // d is not running when the policy is loaded: it gets the share when it starts.
    load(
        &env,
        &(share("b", "a", &base, "at = \"/mnt/a\"\n")
            + &share("d", "a", &base, "at = \"/mnt/a\"\n")),
    );
    for vm in ["b", "d"] {
        assert_eq!(env.run_ok(vm, "cat /mnt/a/public").trim(), "public");
        // a's mask over the secret came along with the directory.
        assert!(
            !env.run(vm, "cat /mnt/a/secret/key").status.success(),
            "a's hidden file shows in {vm}"
        );
        assert!(!env.run(vm, "grep -rq host-key /mnt/a").status.success());
    }
}

#[test]
fn a_directory_of_a_vm_is_shown_on_the_host_read_only_noexec_and_never_following_links() {
    use std::os::unix::fs::PermissionsExt;
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    let host = host_dir();
    let secret = host.path().join("secret");
    std::fs::write(&secret, "host-secret\n").unwrap();
    env.run_ok(
        "a",
        &format!(
            "mkdir -p /srv/out && echo report > /srv/out/r.txt && cp /usr/bin/true /srv/out/prog \
             && ln -s {} /srv/out/link && ln -s / /srv/out/root",
            secret.display()
        ),
    );
    load(&env, &share("@host", "a", "/srv/out", ""));
    let on_host = env.path().join("run/shares");
    let seen = on_host.join("a/srv/out");
    assert_eq!(
        std::fs::read_to_string(seen.join("r.txt")).unwrap(),
        "report\n"
    );
    // Only root on the host may enter; read-only; nothing runs from it; its links lead
    // nowhere on the host (nosymfollow), though they can be read as links.
    assert_eq!(
        std::fs::metadata(&on_host).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let err = std::fs::write(seen.join("r.txt"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = std::process::Command::new(seen.join("prog"))
        .status()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    assert_eq!(std::fs::read_link(seen.join("link")).unwrap(), secret);
    let err = std::fs::read_to_string(seen.join("link")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
    assert!(std::fs::read_dir(seen.join("root/etc")).is_err());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.contains(seen.to_str().unwrap()))
        .unwrap();
    for opt in ["ro", "nosuid", "nodev", "noexec", "nosymfollow"] {
        assert!(line.split([' ', ',']).any(|o| o == opt), "{opt}: {line}");
    }
    // A VM that no rule names does not appear; b's objects stay b's.
    assert!(!on_host.join("b").join("srv").exists());
    assert!(shares(&env)
        .iter()
        .any(|r| r["from"] == "@host" && r["to"] == "a" && r["result"] == "allow"));
    // rw and exec when the rule says so: what the host writes lands in a.
    load(
        &env,
        &share("@host", "a", "/srv/out", "mode = \"rw\"\nexec = true\n"),
    );
    std::fs::write(seen.join("from-host"), "hello a\n").unwrap();
    assert_eq!(env.run_ok("a", "cat /srv/out/from-host"), "hello a\n");
    assert!(std::process::Command::new(seen.join("prog"))
        .status()
        .unwrap()
        .success());
    // Removed with the rule; and with the VM's stop.
    load(&env, "");
    assert!(!seen.exists(), "the share stayed on the host");
    load(&env, &share("@host", "a", "/srv/out", ""));
    assert!(seen.join("r.txt").exists());
    env.ok(&["vm", "stop", "a"]);
    assert!(!seen.exists(), "the share outlived its VM");
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(on_host.to_str().unwrap())
    };
    assert!(!mounted());
    // A monitor killed outright cannot take it away: removing the VM does.
    env.run_ok("a", "true");
    assert!(
        seen.join("r.txt").exists(),
        "{}",
        std::fs::read_to_string(env.path().join("run/vms/a.log")).unwrap_or_default()
    );
    let monitor = env.vm("a")["monitor_pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(monitor).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_for(Duration::from_secs(10), || env.state("a") == "stopped"));
    env.ok(&["vm", "rm", "--force", "a"]);
    assert!(
        !mounted(),
        "a killed monitor's share outlived the VM's removal"
    );
}

#[test]
fn kernel_file_systems_beneath_a_shared_directory_are_never_shared() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.run_ok("b", "true");
    // a's /dev holds its devpts and mqueue mounts: the recursive copy would bring them along
    // (b would reach a's terminals and queues, the host its devpts).
    assert!(
        env.run_ok("a", "grep -c ' /dev/pts ' /proc/self/mountinfo")
            .trim()
            != "0"
    );
    load(
        &env,
        &(share("b", "a", "/dev", "at = \"/mnt/adev\"\n") + &share("@host", "a", "/dev", "")),
    );
    assert!(!exists_in(&env, "b", "/mnt/adev/pts/ptmx"));
    assert!(!exists_in(&env, "b", "/mnt/adev/null"));
    assert!(!env.path().join("run/shares/a/dev/pts").exists());
    let refused: Vec<Value> = shares(&env)
        .into_iter()
        .filter(|r| {
            r["result"] == "error"
                && r["object"] == "/dev"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("holds a kernel file system at /dev/"))
        })
        .collect();
    assert_eq!(
        refused.len(),
        2,
        "into b and onto the host: {:?}",
        shares(&env)
    );
}
