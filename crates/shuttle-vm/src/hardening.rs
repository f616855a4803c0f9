//! The hardening every VM gets (DESIGN.md section 5): which capabilities stay, which system
//! calls fail, which /proc and /sys paths are masked or read-only.
//!
//! The lists follow the widely used container default profiles (Docker's and Podman's
//! seccomp and capability defaults), tightened where Shuttle's model allows it: no VM ever
//! mounts, changes namespaces or loads code into the kernel, and `io_uring` is refused
//! because its operations would bypass system-call interception.

use shuttle_sys::caps::numbers as caps;
use shuttle_sys::seccomp::{Action, ArgCondition, Program, Rule, SeccompError};

use crate::config::NetMode;

/// Capabilities a VM's root keeps (capabilities(7) numbers). Everything else — notably
/// CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_SYS_RAWIO, CAP_SYS_BOOT, CAP_NET_ADMIN,
/// CAP_MKNOD, CAP_SYS_TIME, CAP_SYSLOG, CAP_DAC_READ_SEARCH, CAP_BPF, CAP_PERFMON — is
/// dropped from the bounding set, so no program in the VM can ever hold it.
pub fn kept_capabilities(net: NetMode) -> u64 {
    let mut caps = [
        caps::CAP_CHOWN,
        caps::CAP_DAC_OVERRIDE,
        caps::CAP_FOWNER,
        caps::CAP_FSETID,
        caps::CAP_KILL,
        caps::CAP_SETGID,
        caps::CAP_SETUID,
        caps::CAP_SETPCAP,
        caps::CAP_NET_BIND_SERVICE,
        caps::CAP_SYS_CHROOT,
        caps::CAP_AUDIT_WRITE,
        caps::CAP_SETFCAP,
    ]
    .to_vec();
    // Raw sockets are harmless on a private loopback-only network, not on the host's.
    if net == NetMode::None {
        caps.push(caps::CAP_NET_RAW);
    }
    caps.iter().fold(0u64, |mask, c| mask | (1u64 << *c))
}

const EPERM: Action = Action::Errno(libc::EPERM as u16);

/// System calls no VM process may make; they fail with EPERM.
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("keyctl", libc::SYS_keyctl),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("pivot_root", libc::SYS_pivot_root),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("syslog", libc::SYS_syslog),
    ("acct", libc::SYS_acct),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("quotactl", libc::SYS_quotactl),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("vhangup", libc::SYS_vhangup),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    #[cfg(target_arch = "x86_64")]
    ("uselib", libc::SYS_uselib),
];

/// Namespace flags a `clone` must not carry: a VM never makes new namespaces.
const CLONE_NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP
    | 0x80) as u32; // CLONE_NEWTIME

/// The seccomp program of every VM process.
pub fn seccomp_rules() -> Vec<Rule> {
    let mut rules: Vec<Rule> = DENIED_SYSCALLS
        .iter()
        .map(|(_, nr)| Rule::always(*nr, EPERM))
        .collect();
    rules.push(Rule::when(
        libc::SYS_clone,
        ArgCondition::AnyBitSet {
            arg: 0,
            mask: CLONE_NAMESPACE_FLAGS,
        },
        EPERM,
    ));
    // A descriptor table is shared only within a thread group: the monitor relies on it when
    // it lets a checked socket call continue (see intercept/mod.rs, "Lent sockets"). Threads
    // are allowed first; any other clone sharing the table is refused.
    rules.push(Rule::when(
        libc::SYS_clone,
        ArgCondition::AnyBitSet {
            arg: 0,
            mask: libc::CLONE_THREAD as u32,
        },
        Action::Allow,
    ));
    rules.push(Rule::when(
        libc::SYS_clone,
        ArgCondition::AnyBitSet {
            arg: 0,
            mask: libc::CLONE_FILES as u32,
        },
        EPERM,
    ));
    // clone3 passes its flags in memory, where a filter cannot look. ENOSYS makes the C
    // library fall back to clone, whose flags the rule above checks (as Docker does).
    rules.push(Rule::always(
        libc::SYS_clone3,
        Action::Errno(libc::ENOSYS as u16),
    ));
    // A VM's commands may hold the caller's terminal: pushing input into it (TIOCSTI) or
    // console tricks (TIOCLINUX) would type commands into the user's host shell.
    for request in [libc::TIOCSTI, libc::TIOCLINUX] {
        rules.push(Rule::when(
            libc::SYS_ioctl,
            ArgCondition::Equals {
                arg: 1,
                value: request as u32,
            },
            EPERM,
        ));
    }
    // The host kernel's audit log is not the VM's to write to (CAP_AUDIT_WRITE is kept so
    // that logins inside the VM work, and the kernel checks nothing else). Protocol 9 is
    // NETLINK_AUDIT; for IP sockets it would be IGP, which nothing uses. Programs treat
    // EPROTONOSUPPORT as "this kernel has no auditing" and carry on.
    rules.push(Rule::when(
        libc::SYS_socket,
        ArgCondition::Equals {
            arg: 2,
            value: libc::NETLINK_AUDIT as u32,
        },
        Action::Errno(libc::EPROTONOSUPPORT as u16),
    ));
    // Mediated: every connect and every send that names a destination goes to the VM's
    // monitor, which lets it continue unless the policy routes its address to another VM (see
    // intercept/). sendto is caught only with an address (all 64 bits tested: send() is
    // sendto without one and carries most traffic); sendmsg and sendmmsg keep theirs in
    // memory, where a filter cannot look, so all of them are caught.
    rules.push(Rule::always(libc::SYS_connect, Action::Notify));
    rules.push(Rule::when(
        libc::SYS_sendto,
        ArgCondition::NonZero { arg: 4 },
        Action::Notify,
    ));
    rules.push(Rule::always(libc::SYS_sendmsg, Action::Notify));
    rules.push(Rule::always(libc::SYS_sendmmsg, Action::Notify));
    // Mediated the same way: POSIX message queues routed to another VM's IPC namespace.
    rules.push(Rule::always(libc::SYS_mq_open, Action::Notify));
    rules
}

pub fn seccomp_program() -> Result<Program, SeccompError> {
    Program::compile(&seccomp_rules(), Action::Allow)
}

/// /proc files replaced by an empty, read-only file (they leak host kernel state).
pub const MASKED_FILES: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
];

/// Directories replaced by an empty, read-only directory.
pub const MASKED_DIRS: &[&str] = &["/proc/acpi", "/proc/scsi", "/sys/firmware"];

/// Paths left visible but made read-only.
pub const READ_ONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use shuttle_sys::seccomp::{decode_ret, native_arch};

    use super::*;

    fn eval(nr: i64, args: [u64; 6]) -> Action {
        decode_ret(
            seccomp_program()
                .unwrap()
                .evaluate(native_arch(), nr as u32, args),
        )
    }

    #[test]
    fn denied_calls_fail_with_eperm() {
        for (name, nr) in DENIED_SYSCALLS {
            assert_eq!(eval(*nr, [0; 6]), EPERM, "{name}");
        }
    }

    #[test]
    fn ordinary_calls_pass() {
        for nr in [libc::SYS_read, libc::SYS_openat, libc::SYS_execve] {
            assert_eq!(eval(nr, [0; 6]), Action::Allow);
        }
        assert_eq!(eval(libc::SYS_connect, [0; 6]), Action::Notify);
        let fork_flags = (libc::CLONE_CHILD_SETTID | libc::SIGCHLD) as u64;
        assert_eq!(
            eval(libc::SYS_clone, [fork_flags, 0, 0, 0, 0, 0]),
            Action::Allow
        );
        assert_eq!(
            eval(libc::SYS_ioctl, [1, libc::TIOCGWINSZ, 0, 0, 0, 0]),
            Action::Allow
        );
    }

    #[test]
    fn namespaces_and_terminal_injection_are_refused() {
        for flag in [libc::CLONE_NEWUSER, libc::CLONE_NEWNS, libc::CLONE_NEWNET] {
            let flags = (flag | libc::SIGCHLD) as u64;
            assert_eq!(eval(libc::SYS_clone, [flags, 0, 0, 0, 0, 0]), EPERM);
        }
        assert_eq!(
            eval(libc::SYS_clone3, [0; 6]),
            Action::Errno(libc::ENOSYS as u16)
        );
        assert_eq!(eval(libc::SYS_ioctl, [0, libc::TIOCSTI, 0, 0, 0, 0]), EPERM);
    }

    #[test]
    fn descriptor_tables_are_shared_only_by_threads() {
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        assert_eq!(
            eval(libc::SYS_clone, [thread, 0, 0, 0, 0, 0]),
            Action::Allow
        );
        let shared_table = (libc::CLONE_FILES | libc::SIGCHLD) as u64;
        assert_eq!(eval(libc::SYS_clone, [shared_table, 0, 0, 0, 0, 0]), EPERM);
        let vfork = (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64;
        assert_eq!(eval(libc::SYS_clone, [vfork, 0, 0, 0, 0, 0]), Action::Allow);
        // A thread asking for a new namespace is still refused.
        let thread_ns = thread | libc::CLONE_NEWNET as u64;
        assert_eq!(eval(libc::SYS_clone, [thread_ns, 0, 0, 0, 0, 0]), EPERM);
    }

    #[test]
    fn the_host_audit_log_is_out_of_reach() {
        let audit = [libc::AF_NETLINK as u64, libc::SOCK_RAW as u64, 9, 0, 0, 0];
        assert_eq!(
            eval(libc::SYS_socket, audit),
            Action::Errno(libc::EPROTONOSUPPORT as u16)
        );
        let route = [libc::AF_NETLINK as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0];
        assert_eq!(eval(libc::SYS_socket, route), Action::Allow);
    }

    #[test]
    fn sends_are_caught_only_with_a_destination() {
        assert_eq!(eval(libc::SYS_sendto, [3, 1, 1, 0, 0, 0]), Action::Allow);
        assert_eq!(
            eval(libc::SYS_sendto, [3, 1, 1, 0, 0x7f00_0000_0000, 16]),
            Action::Notify
        );
        assert_eq!(eval(libc::SYS_sendmsg, [0; 6]), Action::Notify);
        assert_eq!(eval(libc::SYS_sendmmsg, [0; 6]), Action::Notify);
    }

    #[test]
    fn dangerous_capabilities_are_not_kept() {
        for net in [NetMode::None, NetMode::Host] {
            let kept = kept_capabilities(net);
            for cap in [
                caps::CAP_SYS_ADMIN,
                caps::CAP_SYS_MODULE,
                caps::CAP_SYS_PTRACE,
                caps::CAP_SYS_RAWIO,
                caps::CAP_SYS_BOOT,
                caps::CAP_NET_ADMIN,
                caps::CAP_MKNOD,
                caps::CAP_DAC_READ_SEARCH,
            ] {
                assert_eq!(kept & (1 << cap), 0, "capability {cap} must be dropped");
            }
        }
        assert_eq!(
            kept_capabilities(NetMode::Host) & (1 << caps::CAP_NET_RAW),
            0
        );
    }
}
