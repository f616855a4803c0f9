//! The VM's mediated system calls, answered by its monitor (seccomp user notification).
//!
//! Every `connect` made in the VM stops here. Most stay inside the VM: no rule publishes their
//! address, so the call continues unchanged (counted, not logged) and resolves in the VM's own
//! namespaces, exactly as without Shuttle. When the policy routes the address to another VM
//! and allows it, the monitor makes the connection itself, in the target VM's namespaces, on
//! its own copy of the address, as the caller's uid and gid (so the server's SO_PEERCRED names
//! the caller), and injects the connected socket under the caller's descriptor number. After
//! that the kernel carries the data: Shuttle is out of the path. Denials are audited and the
//! call resolves locally, so the caller sees what it would see without Shuttle. Any error on
//! the cross-VM path refuses the connection (ECONNREFUSED): fail closed.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::socket::{
    connect, socket, AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    UnixAddr,
};
use nix::sys::stat::Mode;
use shuttle_audit::{AuditRecord, Caller, Outcome};
use shuttle_policy::{Action, Op, OpParams, Request, Target, VmIdentity};
use shuttle_sys::unotify::{self, Notification};

use crate::cgroup::VmCgroup;
use crate::vm_api::{self, ApiContext};

/// Serves the VM's notifications until the listener fails (the VM is gone).
pub fn serve(listener: OwnedFd, ctx: Arc<ApiContext>) {
    let listener = Arc::new(listener);
    if let Err(e) = unotify::prefer_synchronous_wakeups(listener.as_fd()) {
        tracing::debug!(error = %e, "synchronous seccomp wake-ups unavailable");
    }
    loop {
        let n = match unotify::receive(listener.as_fd()) {
            Ok(n) => n,
            // The caller died before we could read the notification.
            Err(Errno::ENOENT) => continue,
            Err(e) => {
                tracing::debug!(vm = %ctx.vm, error = %e, "notification listener closed");
                return;
            }
        };
        if n.nr as i64 == libc::SYS_connect {
            handle_connect(&listener, &ctx, &n);
        } else if n.nr as i64 == libc::SYS_mq_open {
            handle_mq_open(&listener, &ctx, &n);
        } else {
            // The filter sends nothing else; continuing is what the VM would get without us.
            let _ = unotify::allow_to_continue(listener.as_fd(), n.id);
        }
    }
}

/// A destination address as the caller gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destination {
    UnixPath(String),
    Abstract(String),
    Inet { port: u16, v6: bool },
}

/// Parses a sockaddr copied from the caller. `None` for anything Shuttle never routes
/// (relative paths, non-loopback addresses, other families): those stay local.
fn parse_destination(bytes: &[u8]) -> Option<Destination> {
    let family = u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]) as i32;
    match family {
        libc::AF_UNIX => {
            let path = &bytes[2..];
            if path.first() == Some(&0) {
                let name = &path[1..];
                return Some(Destination::Abstract(
                    String::from_utf8(name.to_vec()).ok()?,
                ));
            }
            let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
            let p = std::str::from_utf8(&path[..end]).ok()?;
            p.starts_with('/')
                .then(|| Destination::UnixPath(p.to_owned()))
        }
        libc::AF_INET if bytes.len() >= 8 => {
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
            ip.is_loopback()
                .then_some(Destination::Inet { port, v6: false })
        }
        libc::AF_INET6 if bytes.len() >= 24 => {
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let mut a = [0u8; 16];
            a.copy_from_slice(&bytes[8..24]);
            let ip = Ipv6Addr::from(a);
            let mapped_loopback = ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback());
            (ip.is_loopback() || mapped_loopback).then_some(Destination::Inet { port, v6: true })
        }
        _ => None,
    }
}

/// The caller's thread-group id and effective uid/gid, from /proc.
fn caller_identity(tid: u32) -> Option<(i32, u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let field = |name: &str, idx: usize| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().nth(idx))
            .and_then(|v| v.parse().ok())
    };
    Some((
        field("Tgid:", 0)? as i32,
        field("Uid:", 1)?,
        field("Gid:", 1)?,
    ))
}

/// Whether the caller's descriptor `fd` is close-on-exec (from /proc/PID/fdinfo).
fn caller_fd_cloexec(tgid: i32, fd: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{tgid}/fdinfo/{fd}"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .is_some_and(|flags| flags & 0o2000000 != 0)
}

/// Answers a `connect`: at once when nothing publishes its address (the common case, kept on
/// the receiving thread because it is fast), on a thread of its own when it must be mediated,
/// so that a slow target never holds up the VM's other connects.
fn handle_connect(listener_fd: &Arc<OwnedFd>, ctx: &Arc<ApiContext>, n: &Notification) {
    let listener = listener_fd.as_fd();
    // SAFETY of every `allow_to_continue` below (the only way a call continues here): the
    // call then runs in the caller's own namespaces, so even a caller that rewrites the
    // address after our check reaches only what its VM could reach without Shuttle.
    let stay_local = || {
        let _ = unotify::allow_to_continue(listener, n.id);
    };
    let (fd, addr, len) = (n.args[0] as i32, n.args[1], n.args[2] as usize);
    if addr == 0 || !(2..=128).contains(&len) {
        return stay_local();
    }
    let Ok(bytes) = unotify::read_memory(n.pid, addr, len) else {
        return stay_local();
    };
    // The caller may have died and its pid been reused between the notification and the read.
    if !unotify::id_valid(listener, n.id) {
        return;
    }
    let Some(dest) = parse_destination(&bytes) else {
        return stay_local();
    };
    let policy = ctx.policy.read().unwrap_or_else(|e| e.into_inner()).clone();
    let candidates: Vec<String> = match &dest {
        Destination::UnixPath(p) => vec![format!("unix:{p}")],
        Destination::Abstract(name) => vec![format!("abstract:{name}")],
        Destination::Inet { port, .. } => vec![format!("tcp:{port}"), format!("udp:{port}")],
    };
    // Fast path: nothing publishes this address across VMs, or this VM serves it itself and
    // no rule routes it anywhere (a server's own local connections).
    let from = VmIdentity::vm(&ctx.vm, &ctx.tags);
    let local = candidates.iter().all(|o| {
        !policy.publishes(Op::Connect, o)
            || (serves(&policy, Op::Connect, o, &ctx.vm)
                && policy.route(&Request::new(Op::Connect, from, o)).is_none())
    });
    if local {
        return stay_local();
    }
    let (listener, ctx, n) = (Arc::clone(listener_fd), Arc::clone(ctx), *n);
    std::thread::spawn(move || mediate(listener.as_fd(), &ctx, &n, fd, dest, candidates, &policy));
}

/// The mediated part of a `connect` whose address some rule publishes.
fn mediate(
    listener: BorrowedFd<'_>,
    ctx: &ApiContext,
    n: &Notification,
    fd: i32,
    dest: Destination,
    candidates: Vec<String>,
    policy: &shuttle_policy::Policy,
) {
    // SAFETY: as in handle_connect; continuing stays inside the caller's own namespaces.
    let stay_local = || {
        let _ = unotify::allow_to_continue(listener, n.id);
    };
    let Some((tgid, uid, gid)) = caller_identity(n.pid) else {
        return stay_local();
    };
    let caller = caller_of(tgid, uid);
    // The caller's socket tells the kind (stream or datagram) and its flags.
    let sock = shuttle_sys::process::pidfd_open(tgid)
        .and_then(|pidfd| unotify::duplicate_from(pidfd.as_fd(), fd));
    let Ok(sock) = sock else { return stay_local() };
    let Ok((domain, stype, protocol)) = unotify::socket_kind(sock.as_fd()) else {
        return stay_local();
    };
    let object = match &dest {
        Destination::Inet { port, .. } if stype == libc::SOCK_DGRAM => format!("udp:{port}"),
        Destination::Inet { port, .. } => format!("tcp:{port}"),
        _ => candidates[0].clone(),
    };
    let record = new_record(ctx, "connect", &object, caller);
    let (decision, target, mut record) = match judge(ctx, policy, Op::Connect, &object, record) {
        Judgement::Local => return stay_local(),
        Judgement::Refuse => {
            let _ = unotify::complete(listener, n.id, Err(Errno::ECONNREFUSED));
            return;
        }
        Judgement::Allowed {
            decision,
            target,
            record,
        } => (decision, target, *record),
    };
    // Allowed: where exactly, possibly translated by the rule.
    let translated = decision.rule.and_then(|r| match &r.params().op {
        OpParams::Connect { target } => target.clone(),
        _ => None,
    });
    let dest = match translated.as_deref() {
        Some(t) => match t.split_once(':') {
            Some(("unix", p)) => Destination::UnixPath(p.to_owned()),
            Some(("abstract", a)) => Destination::Abstract(a.to_owned()),
            Some(("tcp" | "udp", p)) => match (p.parse(), &dest) {
                (Ok(port), Destination::Inet { v6, .. }) => Destination::Inet { port, v6: *v6 },
                _ => {
                    return refuse(
                        listener,
                        ctx,
                        n,
                        record,
                        "the rule's target does not fit the caller's address",
                    )
                }
            },
            _ => return refuse(listener, ctx, n, record, "the rule's target is malformed"),
        },
        None => dest,
    };
    let target_init = match target {
        Some(Target::Vm(name)) => match vm_init_pid(ctx, name) {
            Some(pid) => Some(pid),
            None => {
                return refuse(
                    listener,
                    ctx,
                    n,
                    record,
                    &format!("VM {name} is not running"),
                )
            }
        },
        Some(Target::Host) => None,
        None => return refuse(listener, ctx, n, record, "the rule names no single target"),
    };
    let nonblocking = nix::fcntl::fcntl(&sock, nix::fcntl::FcntlArg::F_GETFL)
        .map(|f| OFlag::from_bits_truncate(f).contains(OFlag::O_NONBLOCK))
        .unwrap_or(false);
    let connected = connect_in(
        ctx,
        target_init,
        (sock.as_fd(), domain, stype, protocol),
        &dest,
        (uid, gid),
    );
    let new_sock = match connected {
        Ok(s) => s,
        Err(e) => {
            // Nobody listening there (yet): the same answer a local connect would give.
            record.result = Outcome::Error;
            record.reason = Some(format!("connecting in the target failed: {e}"));
            let _ = vm_api::journal(ctx, record);
            let _ = unotify::complete(listener, n.id, Err(e));
            return;
        }
    };
    if nonblocking {
        let _ = nix::fcntl::fcntl(&new_sock, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
    }
    record.reason = Some(format!("connected to {dest:?}"));
    if !vm_api::journal(ctx, record) {
        let _ = unotify::complete(listener, n.id, Err(Errno::ECONNREFUSED));
        return;
    }
    let cloexec = caller_fd_cloexec(tgid, fd);
    match unotify::inject_fd(listener, n.id, new_sock.as_fd(), fd as u32, cloexec) {
        Ok(()) => {
            let _ = unotify::complete(listener, n.id, Ok(0));
        }
        Err(e) => {
            tracing::warn!(vm = %ctx.vm, error = %e, "injecting the connected socket failed");
            let _ = unotify::complete(listener, n.id, Err(Errno::ECONNREFUSED));
        }
    }
}

fn refuse(
    listener: BorrowedFd<'_>,
    ctx: &ApiContext,
    n: &Notification,
    record: AuditRecord,
    why: &str,
) {
    refuse_with(listener, ctx, n, record, why, Errno::ECONNREFUSED)
}

/// Whether the cached init with host pid `pid` still lives.
fn init_alive(ctx: &ApiContext, pid: i32) -> bool {
    let cache = ctx.targets.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .values()
        .find(|(p, _)| *p == pid)
        .is_some_and(|(_, fd)| shuttle_sys::process::pidfd_send_signal(fd.as_fd(), 0).is_ok())
}

/// PID (host view) of a running VM's init, cached while that init lives (its pidfd answers
/// signal 0; a restarted VM has a new init, found anew).
fn vm_init_pid(ctx: &ApiContext, vm: &str) -> Option<i32> {
    let mut cache = ctx.targets.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((pid, pidfd)) = cache.get(vm) {
        if shuttle_sys::process::pidfd_send_signal(pidfd.as_fd(), 0).is_ok() {
            return Some(*pid);
        }
        cache.remove(vm);
    }
    if !crate::store::is_running(&ctx.layout, vm) {
        return None;
    }
    let cg = VmCgroup::existing(&ctx.layout.cgroup_parent(), vm)?;
    let pid = cg.pids().into_iter().find(|p| vm_api::is_vm_init(*p))?;
    let pidfd = shuttle_sys::process::pidfd_open(pid).ok()?;
    // Checked after opening: the pidfd is for a process that was this VM's init.
    if !vm_api::is_vm_init(pid) || !cg.contains_pid_in_any(pid) {
        return None;
    }
    cache.insert(vm.to_owned(), (pid, pidfd));
    Some(pid)
}

/// Creates a socket of the caller's kind in the target's namespaces and connects it, as the
/// caller's effective uid and gid. `target_init` is the target VM's init, or `None` for the
/// host; `caller_sock` is (a duplicate of) the caller's own socket.
fn connect_in(
    ctx: &ApiContext,
    target_init: Option<i32>,
    (caller_sock, domain, stype, protocol): (BorrowedFd<'_>, i32, i32, i32),
    dest: &Destination,
    (uid, gid): (u32, u32),
) -> Result<OwnedFd, Errno> {
    let family = AddressFamily::from_i32(domain).ok_or(Errno::EAFNOSUPPORT)?;
    let kind = SockType::try_from(stype & 0xf).map_err(|_| Errno::EPROTOTYPE)?;
    let proto = match protocol {
        0 => None,
        p if p == libc::IPPROTO_TCP => Some(SockProtocol::Tcp),
        p if p == libc::IPPROTO_UDP => Some(SockProtocol::Udp),
        _ => None,
    };
    // Abstract and IP sockets belong to a network namespace: make the socket in the target's.
    let needs_netns = !matches!(dest, Destination::UnixPath(_));
    let sock = match (needs_netns, target_init) {
        (true, Some(pid)) => in_namespace(pid, NET, || {
            socket(family, kind, SockFlag::SOCK_CLOEXEC, proto)
        })?,
        _ => socket(family, kind, SockFlag::SOCK_CLOEXEC, proto)?,
    };
    if matches!(dest, Destination::Inet { .. }) && kind == SockType::Stream {
        carry_tcp_options(caller_sock, sock.as_fd());
    }
    // Resolve the address first, as root: opening the target's root through /proc needs
    // privileges the caller's identity does not have.
    let resolved = resolve(target_init, dest)?;
    // The target's namespaces were reached through /proc/PID: check that PID is still the
    // target's init (alive, so its number cannot have been reused meanwhile).
    if let Some(pid) = target_init {
        if !init_alive(ctx, pid) {
            return Err(Errno::ECONNREFUSED);
        }
    }
    let result = as_caller((uid, gid), || connect_bounded(&sock, &*resolved.addr));
    drop(resolved);
    result.map(|()| sock)
}

/// Sets on `ours`, the socket connected in the caller's place, the TCP options the caller set
/// on its own socket before `connect` (libpq, for one, sets TCP_NODELAY and keepalives there):
/// a fresh socket would otherwise run with Nagle's algorithm and without keepalives. Only
/// values that differ from a fresh socket's are set; a failure leaves the default.
fn carry_tcp_options(theirs: BorrowedFd<'_>, ours: BorrowedFd<'_>) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt, GetSockOpt, SetSockOpt};
    fn carry<T: PartialEq, O>(theirs: BorrowedFd<'_>, ours: BorrowedFd<'_>, opt: O)
    where
        O: GetSockOpt<Val = T> + SetSockOpt<Val = T> + Copy,
    {
        if let (Ok(want), Ok(have)) = (getsockopt(&theirs, opt), getsockopt(&ours, opt)) {
            if want != have {
                let _ = setsockopt(&ours, opt, &want);
            }
        }
    }
    carry(theirs, ours, sockopt::TcpNoDelay);
    carry(theirs, ours, sockopt::KeepAlive);
    carry(theirs, ours, sockopt::TcpKeepIdle);
    carry(theirs, ours, sockopt::TcpKeepInterval);
    carry(theirs, ours, sockopt::TcpKeepCount);
    carry(theirs, ours, sockopt::TcpUserTimeout);
}

/// Runs `f` on this thread with the caller's effective uid and gid (so that permission checks
/// and SO_PEERCRED see the caller), then switches back.
fn as_caller<T>((uid, gid): (u32, u32), f: impl FnOnce() -> Result<T, Errno>) -> Result<T, Errno> {
    if uid == 0 && gid == 0 {
        return f();
    }
    unotify::set_thread_effective_ids(uid, gid)?;
    let result = f();
    // Never keep working under the caller's identity: failing to switch back is fatal.
    if unotify::restore_thread_ids().is_err() {
        tracing::error!("cannot restore the monitor thread's credentials; exiting");
        std::process::exit(70);
    }
    result
}

/// How long the monitor waits for a target to accept. One VM's connects are answered in
/// order, so a target whose backlog stays full must not hold up the others for long.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// connect(2) that gives up after [`CONNECT_TIMEOUT`] (ETIMEDOUT): non-blocking, waiting for
/// TCP's handshake with poll and retrying while a unix listener's backlog is full (EAGAIN).
/// The socket is left blocking; the caller's own flags are applied afterwards.
fn connect_bounded(sock: &OwnedFd, addr: &dyn nix::sys::socket::SockaddrLike) -> Result<(), Errno> {
    use nix::fcntl::{fcntl, FcntlArg};
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    fcntl(sock, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let result = loop {
        match connect(sock.as_raw_fd(), addr) {
            Err(Errno::EAGAIN) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(Errno::EINPROGRESS) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let mut fds = [nix::poll::PollFd::new(
                    sock.as_fd(),
                    nix::poll::PollFlags::POLLOUT,
                )];
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                break match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                    Ok(0) => Err(Errno::ETIMEDOUT),
                    Ok(_) => match nix::sys::socket::getsockopt(
                        sock,
                        nix::sys::socket::sockopt::SocketError,
                    ) {
                        Ok(0) => Ok(()),
                        Ok(e) => Err(Errno::from_raw(e)),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
            }
            Err(Errno::EAGAIN) => break Err(Errno::ETIMEDOUT),
            other => break other,
        }
    };
    fcntl(sock, FcntlArg::F_SETFL(OFlag::empty()))?;
    result
}

/// An address ready to connect to, with whatever descriptor it refers through.
struct Resolved {
    addr: Box<dyn nix::sys::socket::SockaddrLike>,
    _path_fd: Option<OwnedFd>,
}

fn resolve(target_init: Option<i32>, dest: &Destination) -> Result<Resolved, Errno> {
    Ok(match dest {
        Destination::UnixPath(path) => {
            // Resolved inside the target's root (symlinks included): nothing leads out of it.
            let root_path = match target_init {
                Some(pid) => format!("/proc/{pid}/root"),
                None => "/".to_owned(),
            };
            let root = nix::fcntl::open(
                Path::new(&root_path),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            let target = openat2(&root, Path::new(path.trim_start_matches('/')), how)?;
            // Connecting through the O_PATH descriptor's magic link reaches exactly the inode
            // resolved above, whatever its path length.
            let addr =
                UnixAddr::new(format!("/proc/thread-self/fd/{}", target.as_raw_fd()).as_str())?;
            Resolved {
                addr: Box::new(addr),
                _path_fd: Some(target),
            }
        }
        Destination::Abstract(name) => Resolved {
            addr: Box::new(UnixAddr::new_abstract(name.as_bytes())?),
            _path_fd: None,
        },
        Destination::Inet { port, v6: false } => Resolved {
            addr: Box::new(SockaddrIn::new(127, 0, 0, 1, *port)),
            _path_fd: None,
        },
        Destination::Inet { port, v6: true } => Resolved {
            addr: Box::new(SockaddrIn6::from(std::net::SocketAddrV6::new(
                Ipv6Addr::LOCALHOST,
                *port,
                0,
                0,
            ))),
            _path_fd: None,
        },
    })
}

/// Runs `f` with this thread in namespace `kind` ("net" or "ipc", setns flag `flag`) of
/// process `pid`, then switches back. Both apply to the calling thread alone.
fn in_namespace<T>(
    pid: i32,
    (kind, flag): (&str, libc::c_int),
    f: impl FnOnce() -> Result<T, Errno>,
) -> Result<T, Errno> {
    let open = |path: String| {
        nix::fcntl::open(
            Path::new(&path),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    };
    let own = open(format!("/proc/thread-self/ns/{kind}"))?;
    let theirs = open(format!("/proc/{pid}/ns/{kind}"))?;
    unotify::enter_namespace(theirs.as_fd(), flag)?;
    let result = f();
    if unotify::enter_namespace(own.as_fd(), flag).is_err() {
        tracing::error!(
            kind,
            "cannot return to the monitor's own namespace; exiting"
        );
        std::process::exit(70);
    }
    result
}

const NET: (&str, libc::c_int) = ("net", libc::CLONE_NEWNET);
const IPC: (&str, libc::c_int) = ("ipc", libc::CLONE_NEWIPC);

/// Who is calling, as the kernel tells it (never as the VM says).
fn caller_of(tgid: i32, uid: u32) -> Caller {
    Caller {
        pid_in_vm: vm_api::pid_in_vm(tgid),
        pid_on_host: Some(tgid),
        uid: Some(uid),
        program: std::fs::read_to_string(format!("/proc/{tgid}/comm"))
            .ok()
            .map(|s| s.trim().to_owned()),
    }
}

fn new_record(ctx: &ApiContext, op: &str, object: &str, caller: Caller) -> AuditRecord {
    AuditRecord {
        time: shuttle_audit::now_unix_nanos(),
        op: op.into(),
        from: ctx.vm.clone(),
        to: None,
        object: object.to_owned(),
        result: Outcome::Deny,
        rule: None,
        caller,
        reason: None,
        seq: 0,
    }
}

/// What the policy (and, for `ask`, an operator) says about a mediated request.
enum Judgement<'p> {
    /// Resolve it in the caller's own VM; any denial is already journaled.
    Local,
    /// Refuse it: the journal could not be written (fail closed).
    Refuse,
    /// Carry it out, then journal `record`.
    Allowed {
        decision: shuttle_policy::Decision<'p>,
        target: Option<&'p Target>,
        record: Box<AuditRecord>,
    },
}

/// Routes `object` for the calling VM and audits every refusal before it takes effect.
fn judge<'p>(
    ctx: &ApiContext,
    policy: &'p shuttle_policy::Policy,
    op: Op,
    object: &str,
    mut record: AuditRecord,
) -> Judgement<'p> {
    let local_after = |record: AuditRecord| {
        if vm_api::journal(ctx, record) {
            Judgement::Local
        } else {
            Judgement::Refuse
        }
    };
    let from = VmIdentity::vm(&ctx.vm, &ctx.tags);
    let Some((decision, target)) = policy.route(&Request::new(op, from, object)) else {
        // Published to others, not to this VM: audited as a denial, then resolved locally.
        // The VM that serves the object reaching its own is ordinary local traffic.
        if !policy.publishes(op, object) || serves(policy, op, object, &ctx.vm) {
            return Judgement::Local;
        }
        record.reason = Some("no rule matched: default deny".into());
        return local_after(record);
    };
    record.rule = decision.rule.map(|r| vm_api::rule_ref(policy, r));
    record.to = target.map(|t| match t {
        Target::Host => shuttle_audit::HOST.to_owned(),
        Target::Vm(name) => name.to_string(),
    });
    match (decision.action, decision.rule) {
        (Action::Allow, _) => record.result = Outcome::Allow,
        (Action::Ask, Some(rule)) => {
            let (allow, how) = vm_api::ask(ctx, policy, rule, &record);
            record.result = if allow {
                Outcome::AskAllow
            } else {
                Outcome::AskDeny
            };
            record.reason = Some(how);
            if !allow {
                return local_after(record);
            }
        }
        (_, rule) => {
            record.reason = rule.map(|r| format!("denied by {}", r.label()));
            return local_after(record);
        }
    }
    Judgement::Allowed {
        decision,
        target,
        record: Box::new(record),
    }
}

/// Whether `vm` is the target of a rule publishing `object`: it owns the object, and its own
/// use of it is local traffic, not an attempt to cross.
fn serves(policy: &shuttle_policy::Policy, op: Op, object: &str, vm: &str) -> bool {
    policy.rules().iter().any(|r| {
        r.op() == op
            && r.object().matches(object)
            && matches!(r.target(), Some(Target::Vm(t)) if &**t == vm)
    })
}

/// Answers an `mq_open`: at once when no rule publishes the queue's name (it then opens in the
/// caller's own IPC namespace), on a thread of its own when the policy may route it.
fn handle_mq_open(listener_fd: &Arc<OwnedFd>, ctx: &Arc<ApiContext>, n: &Notification) {
    let listener = listener_fd.as_fd();
    // SAFETY (continuing): the queue is then opened in the caller's own IPC namespace.
    let stay_local = || {
        let _ = unotify::allow_to_continue(listener, n.id);
    };
    let Ok(raw) = unotify::read_c_string(n.pid, n.args[0], 256) else {
        return stay_local();
    };
    if !unotify::id_valid(listener, n.id) {
        return;
    }
    // The C library strips the leading slash; the kernel refuses names with more slashes.
    let Ok(name) = String::from_utf8(raw) else {
        return stay_local();
    };
    if name.is_empty() || name.contains('/') {
        return stay_local();
    }
    let object = format!("mq:/{name}");
    let policy = ctx.policy.read().unwrap_or_else(|e| e.into_inner()).clone();
    if !policy.publishes(Op::Mq, &object) {
        return stay_local();
    }
    let (listener, ctx, n) = (Arc::clone(listener_fd), Arc::clone(ctx), *n);
    std::thread::spawn(move || mediate_mq(listener.as_fd(), &ctx, &n, &name, &object, &policy));
}

fn mediate_mq(
    listener: BorrowedFd<'_>,
    ctx: &ApiContext,
    n: &Notification,
    name: &str,
    object: &str,
    policy: &shuttle_policy::Policy,
) {
    let stay_local = || {
        let _ = unotify::allow_to_continue(listener, n.id);
    };
    let Some((tgid, uid, gid)) = caller_identity(n.pid) else {
        return stay_local();
    };
    let record = new_record(ctx, "mq", object, caller_of(tgid, uid));
    let (target, mut record) = match judge(ctx, policy, Op::Mq, object, record) {
        Judgement::Local => return stay_local(),
        Judgement::Refuse => {
            let _ = unotify::complete(listener, n.id, Err(Errno::EACCES));
            return;
        }
        Judgement::Allowed { target, record, .. } => (target, *record),
    };
    let Some(Target::Vm(target_vm)) = target else {
        return refuse_with(
            listener,
            ctx,
            n,
            record,
            "queues are routed to VMs only",
            Errno::EACCES,
        );
    };
    let Some(init) = vm_init_pid(ctx, target_vm) else {
        return refuse_with(
            listener,
            ctx,
            n,
            record,
            &format!("VM {target_vm} is not running"),
            Errno::ENOENT,
        );
    };
    let oflag = n.args[1] as i32;
    let mode = n.args[2] as u32;
    // Only with O_CREAT does the kernel read the attributes; copy them the same way.
    let attr = if oflag & libc::O_CREAT != 0 && n.args[3] != 0 {
        match unotify::read_memory(n.pid, n.args[3], size_of::<libc::mq_attr>()) {
            Ok(b) if b.len() == size_of::<libc::mq_attr>() => {
                let field = |k: usize| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&b[k * 8..k * 8 + 8]);
                    i64::from_ne_bytes(w)
                };
                Some([field(0), field(1), field(2), field(3)])
            }
            _ => {
                return refuse_with(
                    listener,
                    ctx,
                    n,
                    record,
                    "unreadable queue attributes",
                    Errno::EFAULT,
                )
            }
        }
    } else {
        None
    };
    if !unotify::id_valid(listener, n.id) {
        return;
    }
    let opened = open_queue_in(ctx, init, name, oflag, mode, attr, (uid, gid));
    let queue = match opened {
        Ok(q) => q,
        Err(e) => {
            record.result = Outcome::Error;
            record.reason = Some(format!("opening the queue in VM {target_vm} failed: {e}"));
            let _ = vm_api::journal(ctx, record);
            let _ = unotify::complete(listener, n.id, Err(e));
            return;
        }
    };
    record.reason = Some(format!("opened {object} in VM {target_vm}"));
    if !vm_api::journal(ctx, record) {
        let _ = unotify::complete(listener, n.id, Err(Errno::EACCES));
        return;
    }
    if let Err(e) =
        unotify::inject_fd_as_result(listener, n.id, queue.as_fd(), oflag & libc::O_CLOEXEC != 0)
    {
        tracing::warn!(vm = %ctx.vm, error = %e, "injecting the queue failed");
        let _ = unotify::complete(listener, n.id, Err(Errno::EACCES));
    }
}

fn refuse_with(
    listener: BorrowedFd<'_>,
    ctx: &ApiContext,
    n: &Notification,
    mut record: AuditRecord,
    why: &str,
    errno: Errno,
) {
    record.result = Outcome::Error;
    record.reason = Some(why.to_owned());
    let _ = vm_api::journal(ctx, record);
    let _ = unotify::complete(listener, n.id, Err(errno));
}

/// Opens queue `name` in the IPC namespace of process `init`, as the caller's uid and gid.
fn open_queue_in(
    ctx: &ApiContext,
    init: i32,
    name: &str,
    oflag: i32,
    mode: u32,
    attr: Option<[i64; 4]>,
    (uid, gid): (u32, u32),
) -> Result<OwnedFd, Errno> {
    let cname = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
    in_namespace(init, IPC, || {
        // The namespace was reached through /proc/PID: PID must still be the target's init.
        if !init_alive(ctx, init) {
            return Err(Errno::ENOENT);
        }
        as_caller((uid, gid), || {
            unotify::mq_open_raw(&cname, oflag | libc::O_CLOEXEC, mode, attr)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &[u8]) -> Vec<u8> {
        let mut v = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(path);
        v
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_destination(&unix(b"/run/x.sock\0")),
            Some(Destination::UnixPath("/run/x.sock".into()))
        );
        assert_eq!(parse_destination(&unix(b"rel.sock\0")), None);
        assert_eq!(
            parse_destination(&unix(b"\0name")),
            Some(Destination::Abstract("name".into()))
        );
        let mut v4 = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        v4.extend_from_slice(&5432u16.to_be_bytes());
        v4.extend_from_slice(&[127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            parse_destination(&v4),
            Some(Destination::Inet {
                port: 5432,
                v6: false
            })
        );
        v4[4] = 10;
        assert_eq!(parse_destination(&v4), None, "only loopback is ever routed");
        assert_eq!(parse_destination(&[1]), None);
    }
}
