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
