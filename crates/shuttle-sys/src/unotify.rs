//! Seccomp user notification (seccomp_unotify(2)): receiving intercepted system calls,
//! answering them, and injecting descriptors into the caller (SECCOMP_IOCTL_NOTIF_ADDFD).
//! Plus the helpers a supervisor needs to act for a caller: reading its memory, duplicating
//! its descriptors (pidfd_getfd(2)), and switching the calling thread's credentials.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

/// One intercepted system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    pub id: u64,
    /// The caller's thread id, in the listener's PID namespace.
    pub pid: u32,
    pub nr: i32,
    pub arch: u32,
    pub args: [u64; 6],
}

fn ioctl<T>(fd: BorrowedFd<'_>, request: libc::Ioctl, arg: *mut T) -> Result<i32, Errno> {
    // SAFETY: every caller passes a request code together with a pointer to the structure
    // that request reads or writes (seccomp_unotify(2)), valid for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// Asks the kernel to wake the supervisor and the caller synchronously
/// (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6): the notification round trip then skips two
/// scheduler hops, which is most of what mediation costs a `connect`. Older kernels refuse it;
/// that only costs speed.
///
/// Unlike the other notification requests, this one takes the flags themselves as its
/// argument, not a pointer to them (a pointer reads as unknown flags: EINVAL).
pub fn prefer_synchronous_wakeups(listener: BorrowedFd<'_>) -> Result<(), Errno> {
    const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: libc::c_ulong = 1;
    // SAFETY: the request reads no memory; its argument is the flag word.
    let r = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
            SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Waits for the next notification. `ENOENT` means the caller died before it could be read
/// (try again); `EINTR` is retried here.
pub fn receive(listener: BorrowedFd<'_>) -> Result<Notification, Errno> {
    loop {
        // SAFETY: seccomp_notif is a plain C struct; the kernel requires it zeroed.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        match ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) {
            Ok(_) => {
                return Ok(Notification {
                    id: n.id,
                    pid: n.pid,
                    nr: n.data.nr,
                    arch: n.data.arch,
                    args: n.data.args,
                })
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether notification `id` is still pending (its caller alive and waiting). Check it after
/// every read of the caller's memory: the caller's pid could otherwise have been reused.
pub fn id_valid(listener: BorrowedFd<'_>, id: u64) -> bool {
    let mut id = id;
    ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id).is_ok()
}

fn send(listener: BorrowedFd<'_>, id: u64, val: i64, error: i32, flags: u32) -> Result<(), Errno> {
    let mut resp = libc::seccomp_notif_resp {
        id,
        val,
        error,
        flags,
    };
    ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp).map(|_| ())
}

/// Lets the intercepted call run as if it had not been intercepted. Only ever for calls whose
/// effect stays within the caller's own namespaces: the caller may change the arguments
/// between our check and the kernel's use of them.
pub fn allow_to_continue(listener: BorrowedFd<'_>, id: u64) -> Result<(), Errno> {
    send(
        listener,
        id,
        0,
        0,
        libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
    )
}

/// Completes the call with return value `val` (for success) or fails it with `errno`.
pub fn complete(
    listener: BorrowedFd<'_>,
    id: u64,
    result: Result<i64, Errno>,
) -> Result<(), Errno> {
    match result {
        Ok(val) => send(listener, id, val, 0, 0),
        Err(e) => send(listener, id, 0, -(e as i32), 0),
    }
}

/// Installs `fd` in the caller as descriptor number `target` (replacing what was there),
/// close-on-exec if `cloexec`.
pub fn inject_fd(
    listener: BorrowedFd<'_>,
    id: u64,
    fd: BorrowedFd<'_>,
    target: u32,
    cloexec: bool,
) -> Result<(), Errno> {
    let mut addfd = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
        srcfd: fd.as_raw_fd() as u32,
        newfd: target,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ADDFD, &mut addfd).map(|_| ())
}

/// Installs `fd` in the caller as a new descriptor and completes the call with its number
/// in one step (SECCOMP_ADDFD_FLAG_SEND), as a call that opens something would return it.
pub fn inject_fd_as_result(
    listener: BorrowedFd<'_>,
    id: u64,
    fd: BorrowedFd<'_>,
    cloexec: bool,
) -> Result<i32, Errno> {
    let mut addfd = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SEND as u32,
        srcfd: fd.as_raw_fd() as u32,
        newfd: 0,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ADDFD, &mut addfd)
}

/// Reads a NUL-terminated string of at most `max` bytes at `addr` in process `pid`, page by
/// page so that a string ending just before an unmapped page is still read.
pub fn read_c_string(pid: u32, addr: u64, max: usize) -> Result<Vec<u8>, Errno> {
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < max {
        let to_page_end = 4096 - (at % 4096) as usize;
        let chunk = read_memory(pid, at, to_page_end.min(max - out.len()))?;
        if chunk.is_empty() {
            return Err(Errno::EFAULT);
        }
        if let Some(end) = chunk.iter().position(|b| *b == 0) {
            out.extend_from_slice(&chunk[..end]);
            return Ok(out);
        }
        at += chunk.len() as u64;
        out.extend_from_slice(&chunk);
    }
    Err(Errno::ENAMETOOLONG)
}

/// Moves the calling thread into namespace `ns` of type `nstype` (setns(2); network and IPC
/// namespaces apply to this thread alone).
pub fn enter_namespace(ns: BorrowedFd<'_>, nstype: libc::c_int) -> Result<(), Errno> {
    // SAFETY: setns takes a descriptor and a flag.
    let r = unsafe { libc::setns(ns.as_raw_fd(), nstype) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// mq_open(3) as the raw system call (the name without its leading slash; `attr` may be
/// null), returning the queue's descriptor.
/// `attr` is (flags, maxmsg, msgsize, curmsgs) as in `struct mq_attr`.
pub fn mq_open_raw(
    name: &std::ffi::CStr,
    oflag: i32,
    mode: u32,
    attr: Option<[i64; 4]>,
) -> Result<OwnedFd, Errno> {
    // SAFETY: mq_attr is a plain C struct (with private padding); all zeroes is valid.
    let mut a: libc::mq_attr = unsafe { std::mem::zeroed() };
    if let Some([flags, maxmsg, msgsize, curmsgs]) = attr {
        a.mq_flags = flags;
        a.mq_maxmsg = maxmsg;
        a.mq_msgsize = msgsize;
        a.mq_curmsgs = curmsgs;
    }
    let attr_ptr = if attr.is_some() {
        &a as *const libc::mq_attr
    } else {
        std::ptr::null()
    };
    // SAFETY: `name` is NUL-terminated and `attr_ptr` is null or points at a live mq_attr.
    let r = unsafe { libc::syscall(libc::SYS_mq_open, name.as_ptr(), oflag, mode, attr_ptr) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Copies `len` bytes at `addr` out of process `pid` (process_vm_readv(2)).
pub fn read_memory(pid: u32, addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` describes our own buffer of `len` bytes; the kernel validates `remote`
    // against the other process's address space and never writes to it.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(Errno::last());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Duplicates descriptor `fd` of the process behind `pidfd` into this process
/// (pidfd_getfd(2)); the copy is close-on-exec.
pub fn duplicate_from(pidfd: BorrowedFd<'_>, fd: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_getfd takes descriptors and flags and returns a new descriptor.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0u32) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Sets the effective uid and gid of the calling *thread* only (raw setresuid/setresgid:
/// the C library's wrappers would change every thread of the process). Real and saved ids
/// stay, so [`restore_thread_ids`] can switch back. Used so that a connection made for a VM
/// process carries that process's identity (SO_PEERCRED) and permissions.
pub fn set_thread_effective_ids(uid: u32, gid: u32) -> Result<(), Errno> {
    // SAFETY: plain integer arguments; -1 leaves an id unchanged.
    let r = unsafe { libc::syscall(libc::SYS_setresgid, -1i32, gid, -1i32) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: as above.
    let r = unsafe { libc::syscall(libc::SYS_setresuid, -1i32, uid, -1i32) };
    if r < 0 {
        let e = Errno::last();
        let _ = restore_thread_ids();
        return Err(e);
    }
    Ok(())
}

/// Sets the supplementary groups of the calling *thread* only (raw setgroups(2); the C
/// library's wrapper would change every thread). Monitor threads that act for VM processes run
/// with none, so a permission check never passes through a group of the monitor's, and with
/// the caller's own only for the retry that needs them.
pub fn set_thread_groups(groups: &[u32]) -> Result<(), Errno> {
    // SAFETY: the pointer and length describe `groups`, which outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Switches the calling thread back to effective uid and gid 0.
pub fn restore_thread_ids() -> Result<(), Errno> {
    // SAFETY: plain integer arguments. The uid goes first: changing the gid needs it.
    let r = unsafe { libc::syscall(libc::SYS_setresuid, -1i32, 0u32, -1i32) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: as above.
    let r = unsafe { libc::syscall(libc::SYS_setresgid, -1i32, 0u32, -1i32) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// The supplementary groups of the process at the other end of a unix socket, as the kernel
/// recorded them when it connected (SO_PEERGROUPS): never what the peer says.
pub fn peer_groups(fd: BorrowedFd<'_>) -> Result<Vec<u32>, Errno> {
    // NGROUPS_MAX is 65536; start small and grow to the size the kernel asks for (ERANGE).
    let mut groups: Vec<u32> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<u32>()) as libc::socklen_t;
        // SAFETY: the buffer is live and `len` bytes long; the kernel writes at most that.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / size_of::<u32>();
        if r == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let e = Errno::last();
        if e != Errno::ERANGE || count <= groups.len() || count > 65536 {
            return Err(e);
        }
        groups.resize(count, 0);
    }
}

/// The domain and protocol of a socket (SO_DOMAIN, SO_PROTOCOL).
pub fn socket_domain_and_protocol(fd: BorrowedFd<'_>) -> Result<(i32, i32), Errno> {
    Ok((
        int_socket_option(fd, libc::SO_DOMAIN)?,
        int_socket_option(fd, libc::SO_PROTOCOL)?,
    ))
}

/// The type of a socket (SO_TYPE: SOCK_STREAM, SOCK_DGRAM, ...); ENOTSOCK for other files.
pub fn socket_type(fd: BorrowedFd<'_>) -> Result<i32, Errno> {
    int_socket_option(fd, libc::SO_TYPE)
}

fn int_socket_option(fd: BorrowedFd<'_>, opt: i32) -> Result<i32, Errno> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(v)
    }
}

/// The inode number of the network namespace socket `fd` belongs to (ioctl SIOCGSKNS), to
/// compare with a VM's own: a socket keeps the namespace it was created in, wherever its
/// descriptor travels.
pub fn socket_netns_inode(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor, owned below.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: r is a fresh descriptor that nothing else owns.
    let ns = unsafe { OwnedFd::from_raw_fd(r) };
    namespace_inode(ns.as_fd())
}

/// The inode number of namespace descriptor `ns` (what `/proc/PID/ns/*` links name).
pub fn namespace_inode(ns: BorrowedFd<'_>) -> Result<u64, Errno> {
    nix::sys::stat::fstat(ns).map(|st| st.st_ino)
}
