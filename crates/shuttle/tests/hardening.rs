//! DESIGN.md section 5: what even root inside a VM cannot do.

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_code, stdout, Env};

fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status:\n{status}"))
        .trim()
        .to_owned()
}

#[test]
fn capabilities_no_new_privs_and_seccomp() {
    let Some(env) = Env::new() else { return };
    env.create("caps", &[]);
    let status = env.run_ok("caps", "cat /proc/self/status");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(
        status_field(&status, "Seccomp"),
        "2",
        "a seccomp filter is active"
    );
    for field in ["CapBnd", "CapEff", "CapPrm"] {
        let caps = u64::from_str_radix(&status_field(&status, field), 16).unwrap();
        for (bit, name) in [
            (12, "NET_ADMIN"),
            (16, "SYS_MODULE"),
            (17, "SYS_RAWIO"),
            (19, "SYS_PTRACE"),
            (21, "SYS_ADMIN"),
            (22, "SYS_BOOT"),
            (27, "MKNOD"),
        ] {
            assert_eq!(caps & (1 << bit), 0, "{field} {caps:#x} has CAP_{name}");
        }
    }
}

#[test]
fn mount_and_namespace_calls_fail() {
    let Some(env) = Env::new() else { return };
    env.create("ns", &[]);
    for cmd in [
        "unshare -m true",
        "unshare -U true",
        "unshare -n true",
        "mount -t tmpfs x /mnt",
        "mount --bind /etc /mnt",
        "umount /proc",
        "hostname foo",
        "mknod /tmp/sda b 8 0",
        "echo foo > /proc/sys/kernel/hostname",
        "echo x > /sys/kernel/uevent_helper",
        "touch /sys/shuttle-test",
    ] {
        let out = env.run("ns", &format!("{cmd} 2>/dev/null"));
        assert!(
            !out.status.success(),
            "`{cmd}` succeeded as root inside a VM"
        );
    }
    assert_eq!(env.run_ok("ns", "hostname"), "ns\n");
    assert_eq!(env.run_ok("ns", "cat /proc/sys/kernel/hostname"), "ns\n");
    let mountinfo = env.run_ok("ns", "cat /proc/self/mountinfo");
    let sys = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/sys"))
        .unwrap_or_else(|| panic!("no /sys mount:\n{mountinfo}"));
    let opts = sys.split_whitespace().nth(5).unwrap();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "/sys is not read-only: {sys}"
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn denied_syscalls_fail_with_eperm() {
    let Some(env) = Env::new() else { return };
    env.create("sysc", &[]);
    // Each would succeed or fail differently (EFAULT, EINVAL, ...) without the seccomp filter.
    let out = env.exec(
        "sysc",
        &[
            "python3",
            "-c",
            "import ctypes\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             calls = {\n\
             \x20   'keyctl': (250, 0, -3, 0),\n\
             \x20   'bpf': (321, 0, 0, 0),\n\
             \x20   'io_uring_setup': (425, 1, 0),\n\
             \x20   'unshare': (272, 0x10000000),\n\
             \x20   'setns': (308, 0, 0),\n\
             \x20   'open_by_handle_at': (304, 0, 0, 0),\n\
             \x20   'userfaultfd': (323, 0),\n\
             \x20   'perf_event_open': (298, 0, 0, -1, -1, 0),\n\
             }\n\
             for name, args in calls.items():\n\
             \x20   r = libc.syscall(*args)\n\
             \x20   print(name, r, ctypes.get_errno())\n",
        ],
    );
    assert_code(&out, 0, "syscall probe");
    let s = stdout(&out);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 8, "{s}");
    for l in lines {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!(
            (f[1], f[2]),
            ("-1", "1"),
            "{} should fail with EPERM (result, errno): {l}",
            f[0]
        );
    }
}

#[test]
fn proc_is_masked_and_dev_is_minimal() {
    let Some(env) = Env::new() else { return };
    env.create("devs", &[]);
    let out = env.run("devs", "cat /proc/kcore 2>/dev/null | head -c 16 | wc -c");
    assert_eq!(stdout(&out).trim(), "0", "/proc/kcore is readable");
    let out = env.run(
        "devs",
        "cat /proc/sysrq-trigger 2>/dev/null; echo b > /proc/sysrq-trigger",
    );
    assert!(!out.status.success(), "/proc/sysrq-trigger is writable");

    let dev = env.run_ok("devs", "ls -A /dev");
    let allowed = [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue", "fd",
        "stdin", "stdout", "stderr", "console", "core",
    ];
    for d in dev.lines() {
        assert!(allowed.contains(&d), "unexpected /dev/{d} in a VM:\n{dev}");
    }
    for d in ["null", "zero", "urandom", "tty", "ptmx", "shm", "mqueue"] {
        assert!(dev.lines().any(|l| l == d), "/dev/{d} missing:\n{dev}");
    }
    let out = env.run(
        "devs",
        "for d in /dev/sda /dev/vda /dev/mem /dev/kmem /dev/kmsg /dev/port; do test -e $d && echo $d; done; true",
    );
    assert_eq!(stdout(&out), "", "host devices inside the VM");
    assert_code(
        &env.run(
            "devs",
            "echo ok > /dev/null && head -c 4 /dev/urandom | wc -c",
        ),
        0,
        "safe devices work",
    );
}

#[test]
fn unprivileged_user_has_no_capabilities() {
    let Some(env) = Env::new() else { return };
    env.create("nobody", &[]);
    let out = env.output(&[
        "run",
        "nobody",
        "-u",
        "nobody",
        "--",
        "cat",
        "/proc/self/status",
    ]);
    assert_code(&out, 0, "run -u nobody");
    let status = stdout(&out);
    assert_eq!(
        status_field(&status, "Uid").split_whitespace().next(),
        Some("65534")
    );
    assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
}
