//! Process creation into new namespaces, and small process-wide settings.

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::unistd::Pid;

/// Forks the calling process into new namespaces in one step (clone(2) with fork semantics:
/// no new stack, SIGCHLD on exit). Unlike `unshare` + `fork`, the caller itself stays in its
/// own namespaces, and with `CLONE_NEWPID` the child is PID 1 of the new PID namespace.
///
/// Returns `Ok(None)` in the child and `Ok(Some(pid))` in the parent.
///
/// # Safety
/// As for `fork`: the caller must be single-threaded (CONVENTIONS.md: never fork from a
/// multithreaded process), since only the calling thread exists in the child.
pub unsafe fn clone_into_namespaces(flags: CloneFlags) -> Result<Option<Pid>, Errno> {
    let raw_flags = flags.bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
    // SAFETY: a NULL stack makes clone behave like fork (the child continues on a copy of
    // the parent's stack); the caller guarantees there is no other thread whose locks the
    // child could inherit.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            raw_flags,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    match ret {
        r if r < 0 => Err(Errno::last()),
        0 => Ok(None),
        pid => Ok(Some(Pid::from_raw(pid as i32))),
    }
}

/// Forks the calling process (fork(2)).
///
/// # Safety
/// The caller must be single-threaded, or the child must only make async-signal-safe calls
/// before `execve` or `_exit`.
pub unsafe fn fork() -> Result<Option<Pid>, Errno> {
    // SAFETY: the caller upholds fork's requirements.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => Ok(None),
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child)),
    }
}

/// Marks every descriptor numbered `first` or above close-on-exec (close_range(2) with
/// CLOSE_RANGE_CLOEXEC). Used right before `execve` so that nothing a VM's init holds leaks
/// into the programs it starts, while the descriptor that reports exec failures stays usable
/// until the exec itself.
pub fn cloexec_descriptors_from(first: u32) -> Result<(), Errno> {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: close_range takes plain integers and only changes descriptor flags here.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Ends the process at once, without unwinding or running exit handlers (for forked
/// children that failed before `execve`).
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

/// `fork` for processes that are single-threaded by construction (a VM's init, the
/// launcher before it starts threads). Returns `Ok(None)` in the child.
pub fn fork_single_threaded() -> Result<Option<Pid>, Errno> {
    debug_assert!(
        thread_count() <= 1,
        "fork_single_threaded called with several threads"
    );
    // SAFETY: callers are single-threaded (checked in debug builds), so the child cannot
    // inherit a lock held by another thread.
    unsafe { fork() }
}

/// The number of threads of the calling process (from /proc/self/status).
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(1)
}

/// [`clone_into_namespaces`] for single-threaded callers (the monitor before it starts its
/// threads).
pub fn clone_into_namespaces_single_threaded(flags: CloneFlags) -> Result<Option<Pid>, Errno> {
    debug_assert!(
        thread_count() <= 1,
        "clone_into_namespaces called with several threads"
    );
    // SAFETY: callers are single-threaded (checked in debug builds).
    unsafe { clone_into_namespaces(flags) }
}

/// Makes descriptor number `target` (0, 1 or 2 in practice) refer to what `fd` refers to,
/// without close-on-exec (dup2(2)). Whatever `target` referred to before is closed.
pub fn dup_onto(fd: std::os::fd::BorrowedFd<'_>, target: i32) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: replacing a standard descriptor number is the purpose; callers only pass the
    // numbers of their own stdio, which no Rust object owns exclusively in these processes
    // (the VM's init and the child it is about to exec).
    let r = unsafe { libc::dup2(fd.as_raw_fd(), target) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Closes every descriptor numbered 3 or above except those in `keep` (close_range(2)).
/// Processes that start a new role (the monitor after exec, the VM's init after clone) call
/// it first so that nothing they inherited by accident stays open in them: a stray pipe kept
/// open can make a waiting parent hang, and a stray host file inside a VM is a leak.
pub fn close_descriptors_except(keep: &[std::os::fd::RawFd]) -> Result<(), Errno> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|fd| **fd >= 3)
        .map(|fd| *fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for k in keep.iter().copied().chain(std::iter::once(u32::MAX)) {
        if k > first {
            let last = if k == u32::MAX { u32::MAX } else { k - 1 };
            // SAFETY: close_range takes plain integers. The caller guarantees that no live
            // Rust object owns a descriptor outside `keep`.
            let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
            if r < 0 {
                return Err(Errno::last());
            }
        }
        first = k.saturating_add(1);
    }
    Ok(())
}

/// A descriptor for process `pid` (pidfd_open(2)): signals sent through it reach that process
/// or fail, never a later process that reused the number.
pub fn pidfd_open(pid: i32) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor (close-on-exec).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// A descriptor for one thread, `tid` (pidfd_open(2) with PIDFD_THREAD, Linux 6.9): what
/// [`pidfd_info`] reads and what `pidfd_getfd(2)` takes descriptors through. EINVAL on older
/// kernels.
pub fn pidfd_open_thread(tid: i32) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    // PIDFD_THREAD is O_EXCL (include/uapi/linux/pidfd.h).
    const PIDFD_THREAD: u32 = libc::O_EXCL as u32;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor (close-on-exec).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, PIDFD_THREAD) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Who a pidfd's task is, as `PIDFD_GET_INFO` tells it (Linux 6.13): one ioctl instead of
/// generating and parsing `/proc/TID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidfdInfo {
    /// The thread group (process) id, in the caller's PID namespace.
    pub tgid: i32,
    /// Effective ids: what permission checks use.
    pub euid: u32,
    pub egid: u32,
}

/// `struct pidfd_info` as of Linux 6.13 (PIDFD_INFO_SIZE_VER0, 64 bytes); later kernels
/// accept this size and fill only what it holds.
#[repr(C)]
#[derive(Default)]
struct RawPidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

/// Reads the task behind `pidfd` with PIDFD_GET_INFO. ENOTTY or EINVAL on kernels without
/// it; ESRCH once the task has exited.
pub fn pidfd_info(pidfd: std::os::fd::BorrowedFd<'_>) -> Result<PidfdInfo, Errno> {
    use std::os::fd::AsRawFd;
    const PIDFD_INFO_PID: u64 = 1;
    const PIDFD_INFO_CREDS: u64 = 2;
    // _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info), encoded as this architecture does.
    const PIDFD_GET_INFO: libc::Ioctl = libc::_IOWR::<RawPidfdInfo>(0xFF, 11);
    let mut raw = RawPidfdInfo {
        mask: PIDFD_INFO_PID | PIDFD_INFO_CREDS,
        ..RawPidfdInfo::default()
    };
    // SAFETY: `raw` is a valid, writable struct of the size encoded in the request number.
    let r = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut raw) };
    if r < 0 {
        return Err(Errno::last());
    }
    let want = PIDFD_INFO_PID | PIDFD_INFO_CREDS;
    if raw.mask & want != want {
        return Err(Errno::EINVAL);
    }
    Ok(PidfdInfo {
        tgid: raw.tgid as i32,
        euid: raw.euid,
        egid: raw.egid,
    })
}

/// Translates `tgid` (in this process's PID namespace) into PID namespace `pidns`
/// (ioctl NS_GET_TGID_IN_PIDNS, Linux 6.9). ESRCH when the process is not visible there.
pub fn tgid_in_pid_namespace(pidns: std::os::fd::BorrowedFd<'_>, tgid: i32) -> Result<i32, Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: the request takes the pid as a plain integer argument and returns the result.
    let r = unsafe { libc::ioctl(pidns.as_raw_fd(), libc::NS_GET_TGID_IN_PIDNS as _, tgid) };
    if r <= 0 {
        return Err(if r < 0 { Errno::last() } else { Errno::ESRCH });
    }
    Ok(r)
}

/// Sends `signal` through a pidfd (pidfd_send_signal(2)).
pub fn pidfd_send_signal(pidfd: std::os::fd::BorrowedFd<'_>, signal: i32) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: NULL siginfo means "as kill(2) would"; flags must be 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}
