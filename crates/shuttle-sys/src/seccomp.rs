//! A small classic-BPF generator for seccomp filters, and its installation.
//!
//! Shuttle's filters are short lists of "this system call (optionally with this argument)
//! gets this action", ending in "allow". Generating the program ourselves keeps the exact
//! instructions visible and testable (see the interpreter in the tests) and lets later
//! filters add `SECCOMP_RET_USER_NOTIF` rules with the same code. See seccomp(2) and
//! Documentation/userspace-api/seccomp_filter.rst.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const OFFSET_ARGS: u32 = 16;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 0xC000_00B7;

/// System call numbers at or above this bit belong to the x32 ABI on x86_64; they reach the
/// same kernel code under other numbers, so a deny list must refuse them wholesale.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// What the filter does with a matching system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    /// Fail the call with this errno without running it.
    Errno(u16),
    /// Suspend the caller and hand the call to the listener (seccomp_unotify(2)).
    Notify,
    KillProcess,
}

impl Action {
    fn ret_value(self) -> u32 {
        match self {
            Action::Allow => RET_ALLOW,
            Action::Errno(e) => RET_ERRNO | u32::from(e),
            Action::Notify => RET_USER_NOTIF,
            Action::KillProcess => RET_KILL_PROCESS,
        }
    }
}

/// A condition on the low 32 bits of one argument. The calls Shuttle inspects this way
/// (`clone` flags, `ioctl` requests, `socket` families) take `int`-sized values, which the
/// kernel truncates to 32 bits itself, so the high half cannot be used to slip past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgCondition {
    /// `(arg & mask) != 0`
    AnyBitSet { arg: u8, mask: u32 },
    /// `arg == value`
    Equals { arg: u8, value: u32 },
    /// `arg != 0`, all 64 bits of it (for pointers: a null test on the low half alone could be
    /// slipped past with an address whose low 32 bits are zero).
    NonZero { arg: u8 },
}

/// One line of a filter: this call number, optionally under a condition, gets this action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub nr: i64,
    pub condition: Option<ArgCondition>,
    pub action: Action,
}

impl Rule {
    pub fn always(nr: i64, action: Action) -> Self {
        Rule {
            nr,
            condition: None,
            action,
        }
    }

    pub fn when(nr: i64, condition: ArgCondition, action: Action) -> Self {
        Rule {
            nr,
            condition: Some(condition),
            action,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("system call number {0} is out of range for a filter")]
    BadSyscallNumber(i64),
    #[error("argument index {0} is out of range (0..=5)")]
    BadArgument(u8),
    #[error("seccomp(SECCOMP_SET_MODE_FILTER) failed: {0}")]
    Install(#[source] Errno),
}

/// A compiled classic-BPF program.
#[derive(Debug, Clone)]
pub struct Program {
    instructions: Vec<libc::sock_filter>,
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Where the high half of argument `arg` sits.
fn arg_high_offset(arg: u8) -> Result<u32, SeccompError> {
    let low = arg_low_offset(arg)?;
    Ok(if cfg!(target_endian = "little") {
        low + 4
    } else {
        low - 4
    })
}

fn arg_low_offset(arg: u8) -> Result<u32, SeccompError> {
    if arg > 5 {
        return Err(SeccompError::BadArgument(arg));
    }
    let base = OFFSET_ARGS + 8 * u32::from(arg);
    // The low half of a 64-bit argument sits first on little-endian machines.
    Ok(if cfg!(target_endian = "little") {
        base
    } else {
        base + 4
    })
}

impl Program {
    /// Compiles `rules` (first match wins) followed by `default`.
    pub fn compile(rules: &[Rule], default: Action) -> Result<Self, SeccompError> {
        let mut p = vec![
            stmt(BPF_LD_W_ABS, OFFSET_ARCH),
            jump(BPF_JEQ_K, AUDIT_ARCH_NATIVE, 1, 0),
            stmt(BPF_RET_K, RET_KILL_PROCESS),
            stmt(BPF_LD_W_ABS, OFFSET_NR),
        ];
        #[cfg(target_arch = "x86_64")]
        {
            p.push(jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1));
            p.push(stmt(BPF_RET_K, RET_ERRNO | libc::ENOSYS as u32));
        }
        for rule in rules {
            let nr = u32::try_from(rule.nr).map_err(|_| SeccompError::BadSyscallNumber(rule.nr))?;
            let ret = stmt(BPF_RET_K, rule.action.ret_value());
            match rule.condition {
                None => {
                    p.push(jump(BPF_JEQ_K, nr, 0, 1));
                    p.push(ret);
                }
                Some(ArgCondition::NonZero { arg }) => {
                    // Not this call: on to the reload of the number. Low half non-zero: the
                    // action. Else the high half decides the same way.
                    p.push(jump(BPF_JEQ_K, nr, 0, 6));
                    p.push(stmt(BPF_LD_W_ABS, arg_low_offset(arg)?));
                    p.push(jump(BPF_JEQ_K, 0, 1, 0));
                    p.push(ret);
                    p.push(stmt(BPF_LD_W_ABS, arg_high_offset(arg)?));
                    p.push(jump(BPF_JEQ_K, 0, 1, 0));
                    p.push(ret);
                    p.push(stmt(BPF_LD_W_ABS, OFFSET_NR));
                }
                Some(cond) => {
                    let (offset, test) = match cond {
                        ArgCondition::AnyBitSet { arg, mask } => {
                            (arg_low_offset(arg)?, jump(BPF_JSET_K, mask, 0, 1))
                        }
                        ArgCondition::Equals { arg, value } => {
                            (arg_low_offset(arg)?, jump(BPF_JEQ_K, value, 0, 1))
                        }
                        ArgCondition::NonZero { .. } => unreachable!("compiled above"),
                    };
                    // Not this call: skip the 4 instructions below with the number still
                    // in the accumulator. This call but condition false: fall onto the
                    // reload of the number so the following rules see it again.
                    p.push(jump(BPF_JEQ_K, nr, 0, 4));
                    p.push(stmt(BPF_LD_W_ABS, offset));
                    p.push(test);
                    p.push(ret);
                    p.push(stmt(BPF_LD_W_ABS, OFFSET_NR));
                }
            }
        }
        p.push(stmt(BPF_RET_K, default.ret_value()));
        Ok(Program { instructions: p })
    }

    pub fn len(&self) -> usize {
        self.instructions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instructions.is_empty()
    }

    /// Runs the program on a synthetic call, as the kernel would. Used by tests and by
    /// `shuttle` diagnostics; it supports exactly the instructions `compile` emits.
    pub fn evaluate(&self, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            let o = 16 + 8 * i;
            data[o..o + 8].copy_from_slice(&a.to_ne_bytes());
        }
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        while let Some(ins) = self.instructions.get(pc) {
            pc += 1;
            match ins.code {
                BPF_LD_W_ABS => {
                    let o = ins.k as usize;
                    let mut w = [0u8; 4];
                    w.copy_from_slice(&data[o..o + 4]);
                    acc = u32::from_ne_bytes(w);
                }
                BPF_RET_K => return ins.k,
                code => {
                    let taken = match code {
                        BPF_JEQ_K => acc == ins.k,
                        BPF_JSET_K => acc & ins.k != 0,
                        BPF_JGE_K => acc >= ins.k,
                        _ => return RET_KILL_PROCESS,
                    };
                    pc += usize::from(if taken { ins.jt } else { ins.jf });
                }
            }
        }
        RET_KILL_PROCESS
    }

    /// Installs the program on the calling thread (and, with TSYNC, all threads), inherited by
    /// every child. Requires `no_new_privs` (or CAP_SYS_ADMIN). With `new_listener`, returns
    /// the user-notification descriptor (seccomp_unotify(2)).
    pub fn install(&self, new_listener: bool) -> Result<Option<OwnedFd>, SeccompError> {
        let prog = libc::sock_fprog {
            len: u16::try_from(self.instructions.len())
                .map_err(|_| SeccompError::Install(Errno::E2BIG))?,
            filter: self.instructions.as_ptr().cast_mut(),
        };
        let mut flags: libc::c_ulong = libc::SECCOMP_FILTER_FLAG_TSYNC;
        if new_listener {
            // TSYNC and NEW_LISTENER cannot be combined (the return value would be ambiguous);
            // our callers are single-threaded when they install.
            flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
        }
        // SAFETY: `prog` points at `self.instructions`, which outlives the call; the kernel
        // copies the program before returning.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const libc::sock_fprog,
            )
        };
        if ret < 0 {
            return Err(SeccompError::Install(Errno::last()));
        }
        if new_listener {
            // SAFETY: with NEW_LISTENER the kernel returns a fresh descriptor (close-on-exec)
            // that nothing else owns.
            Ok(Some(unsafe { OwnedFd::from_raw_fd(ret as i32) }))
        } else {
            Ok(None)
        }
    }
}

/// Decodes a filter return value, for tests and diagnostics.
pub fn decode_ret(ret: u32) -> Action {
    match ret & 0xffff_0000 {
        RET_ALLOW => Action::Allow,
        RET_ERRNO => Action::Errno((ret & 0xffff) as u16),
        RET_USER_NOTIF => Action::Notify,
        _ => Action::KillProcess,
    }
}

/// The audit architecture value of the machine this was built for.
pub fn native_arch() -> u32 {
    AUDIT_ARCH_NATIVE
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn program() -> Program {
        Program::compile(
            &[
                Rule::always(libc::SYS_bpf, Action::Errno(libc::EPERM as u16)),
                Rule::when(
                    libc::SYS_clone,
                    ArgCondition::AnyBitSet {
                        arg: 0,
                        mask: libc::CLONE_NEWUSER as u32,
                    },
                    Action::Errno(libc::EPERM as u16),
                ),
                Rule::when(
                    libc::SYS_ioctl,
                    ArgCondition::Equals {
                        arg: 1,
                        value: libc::TIOCSTI as u32,
                    },
                    Action::Errno(libc::EPERM as u16),
                ),
                Rule::when(
                    libc::SYS_sendto,
                    ArgCondition::NonZero { arg: 4 },
                    Action::Notify,
                ),
                Rule::always(libc::SYS_connect, Action::Notify),
            ],
            Action::Allow,
        )
        .unwrap()
    }

    fn eval(nr: i64, args: [u64; 6]) -> Action {
        decode_ret(program().evaluate(native_arch(), nr as u32, args))
    }

    #[test]
    fn unconditional_rules_match_by_number() {
        assert_eq!(
            eval(libc::SYS_bpf, [0; 6]),
            Action::Errno(libc::EPERM as u16)
        );
        assert_eq!(eval(libc::SYS_connect, [0; 6]), Action::Notify);
        assert_eq!(eval(libc::SYS_read, [0; 6]), Action::Allow);
    }

    #[test]
    fn conditions_look_at_the_argument_and_fall_through_otherwise() {
        let newuser = libc::CLONE_NEWUSER as u64 | libc::SIGCHLD as u64;
        assert_eq!(
            eval(libc::SYS_clone, [newuser, 0, 0, 0, 0, 0]),
            Action::Errno(1)
        );
        assert_eq!(
            eval(libc::SYS_clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            Action::Allow
        );
        assert_eq!(
            eval(libc::SYS_ioctl, [0, libc::TIOCSTI, 0, 0, 0, 0]),
            Action::Errno(1)
        );
        // The high half of an int argument is ignored by the kernel, so by us too.
        assert_eq!(
            eval(libc::SYS_ioctl, [0, (1 << 32) | libc::TIOCSTI, 0, 0, 0, 0]),
            Action::Errno(1)
        );
        assert_eq!(
            eval(libc::SYS_ioctl, [0, libc::TCGETS, 0, 0, 0, 0]),
            Action::Allow
        );
        // After a failed condition, later rules still see the call number.
        assert_eq!(eval(libc::SYS_connect, [0; 6]), Action::Notify);
    }

    #[test]
    fn non_zero_tests_all_64_bits() {
        let sendto = |addr: u64| eval(libc::SYS_sendto, [3, 0, 0, 0, addr, 16]);
        assert_eq!(sendto(0), Action::Allow, "no address");
        assert_eq!(sendto(0x7fff_1234), Action::Notify);
        assert_eq!(
            sendto(0x7f00_0000_0000),
            Action::Notify,
            "an address whose low half is zero"
        );
        assert_eq!(sendto(0xffff_ffff_0000_0000), Action::Notify);
        // The following rules still see the call number.
        assert_eq!(eval(libc::SYS_connect, [0; 6]), Action::Notify);
    }

    #[test]
    fn foreign_architectures_are_killed() {
        let ret = program().evaluate(0x4000_0003, libc::SYS_read as u32, [0; 6]);
        assert_eq!(decode_ret(ret), Action::KillProcess);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_numbers_are_refused() {
        let ret = program().evaluate(native_arch(), X32_SYSCALL_BIT | 321, [0; 6]);
        assert_eq!(decode_ret(ret), Action::Errno(libc::ENOSYS as u16));
    }

    #[test]
    fn installed_filter_denies_in_a_child() {
        use nix::sys::wait::{waitpid, WaitStatus};
        use nix::unistd::{fork, ForkResult};
        let prog = Program::compile(
            &[Rule::always(
                libc::SYS_getppid,
                Action::Errno(libc::EACCES as u16),
            )],
            Action::Allow,
        )
        .unwrap();
        // SAFETY: the test harness may be multithreaded; the child only makes raw system
        // calls and exits, which is async-signal-safe.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                // SAFETY: plain prctl/syscall calls in the forked child.
                unsafe {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                }
                let code = match prog.install(false) {
                    Ok(_) => {
                        // SAFETY: getppid takes no arguments.
                        let r = unsafe { libc::syscall(libc::SYS_getppid) };
                        let e = Errno::last();
                        if r == -1 && e == Errno::EACCES {
                            0
                        } else {
                            2
                        }
                    }
                    Err(_) => 3,
                };
                // SAFETY: _exit is async-signal-safe and ends the child without unwinding.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
            }
        }
    }
}
