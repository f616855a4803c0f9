//! `connect`: continued when it stays in the VM, carried out in the target when a rule routes
//! it across and allows it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{bind, connect, SockFlag, UnixAddr};
use shuttle_audit::Outcome;
use shuttle_policy::Op;
use shuttle_sys::unotify;

use super::address::{self, Address, Destination, MAX_SOCKADDR};
use super::caller::{CallerInfo, CallerSocket};
use super::target::{as_caller, connect_bounded, connect_nonblocking, SocketKind, TargetVm};
use super::{judge, route, stay_local_on, Call, Judgement};
use crate::vm_api;

pub(super) fn on_connect(call: &Call<'_>) {
    let (fd, addr, len) = (call.arg(0) as i32, call.arg(1), call.arg(2) as usize);
    if addr == 0 || !(2..=MAX_SOCKADDR).contains(&len) {
        // The kernel refuses these itself (EFAULT, EINVAL) without looking any further.
        return call.stay_local();
    }
    let bytes = match call.read(addr, len) {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(_) => return call.stay_local(),
    };
    let lent_datagrams = call.ctx.mediation.holds_lent_datagram_sockets();
    match address::parse(&bytes) {
        // Disconnecting must never free a lent socket: carried out here on the socket checked.
        Address::Unspecified => disconnect(call, fd),
        Address::Local { needs_netns } if needs_netns && lent_datagrams => {
            connect_locally(call, fd, bytes);
        }
        Address::Local { .. } => call.stay_local(),
        Address::Routable(dest) => {
            if call.stays_local(&call.policy(), Op::Connect, &dest) {
                if dest.needs_netns() && lent_datagrams {
                    connect_locally(call, fd, bytes);
                } else {
                    call.stay_local();
                }
            } else {
                mediate(call, fd, dest, bytes);
            }
        }
    }
}

/// The caller and its socket, or `None` when the call was answered already (gone, or refused).
pub(super) fn caller_and_socket(call: &Call<'_>, fd: i32) -> Option<(CallerInfo, CallerSocket)> {
    let Some(info) = CallerInfo::of(call.n.pid, &call.ctx.mediation) else {
        call.answer(Err(Errno::ECONNREFUSED));
        return None;
    };
    let sock = CallerSocket::of(&info, fd);
    if !call.still_pending() {
        return None;
    }
    match sock {
        Ok(sock) => Some((info, sock)),
        // Not a descriptor (EBADF) or not a socket (ENOTSOCK): the kernel's own answer, given
        // here rather than by letting the call continue, because another thread could put a
        // lent socket at that number before the kernel looked again.
        Err(e) => {
            call.answer(Err(e));
            None
        }
    }
}

fn disconnect(call: &Call<'_>, fd: i32) {
    let Some((info, sock)) = caller_and_socket(call, fd) else {
        return;
    };
    if sock.netns().ok() != Some(call.ctx.mediation.own_netns) {
        let record = call.record("connect", "(disconnect)", &info);
        return call.refuse(
            record,
            "a socket Shuttle connected to another VM cannot be disconnected",
            Errno::EOPNOTSUPP,
        );
    }
    let unspec = shuttle_sys::net::unspecified_sockaddr();
    call.answer(connect(sock.sock.as_raw_fd(), &unspec).map(|()| 0));
}

/// A connect that stays in the VM, in a VM that holds lent datagram sockets.
fn connect_locally(call: &Call<'_>, fd: i32, addr: Vec<u8>) {
    if let Some((info, sock)) = caller_and_socket(call, fd) {
        connect_locally_on(call, &info, &sock, &addr);
    }
}

/// Continues a connect that stays in the VM once that is safe, or carries it out on the socket
/// checked.
fn connect_locally_on(call: &Call<'_>, info: &CallerInfo, sock: &CallerSocket, addr: &[u8]) {
    let Some(sock) = stay_local_on(call, info, sock, "connect") else {
        return;
    };
    // Carried out on the socket checked, with the caller's own address bytes.
    let Some(addr) = shuttle_sys::net::sockaddr_from_bytes(addr) else {
        return call.answer(Err(Errno::EINVAL));
    };
    let result = as_caller(info, || {
        if sock.nonblocking() {
            connect(sock.sock.as_raw_fd(), &addr)
        } else {
            connect_bounded(&sock.sock, &addr, &|| call.release_turn())
        }
    });
    call.answer(result.map(|()| 0));
}

/// The mediated part of a `connect` whose address some rule publishes.
fn mediate(call: &Call<'_>, fd: i32, dest: Destination, addr: Vec<u8>) {
    let Some((info, sock)) = caller_and_socket(call, fd) else {
        return;
    };
    let policy = call.policy();
    let object = dest.object(sock.is_datagram());
    let record = call.record("connect", &object, &info);
    let (decision, target, mut record) = match judge(call, &policy, Op::Connect, &object, record) {
        Judgement::Local if dest.needs_netns() => {
            return connect_locally_on(call, &info, &sock, &addr)
        }
        Judgement::Local => return call.stay_local(),
        Judgement::Refuse => return call.answer(Err(Errno::ECONNREFUSED)),
        Judgement::Allowed {
            decision,
            target,
            record,
        } => (decision, target, *record),
    };
    let route = match route(call.ctx, &decision, target, dest) {
        Ok(r) => r,
        Err(why) => return call.refuse(record, &why, Errno::ECONNREFUSED),
    };
    // The decision is on record before anything reaches the target: a connection refused
    // because its record could not be written must not have been made.
    record.reason = Some(format!("connecting to {:?}", route.dest));
    if !vm_api::journal(call.ctx, &record) {
        return call.answer(Err(Errno::ECONNREFUSED));
    }
    let target = route.target.as_ref();
    let connected = match route.dest {
        // A path is found through the filesystem, whatever the socket's network namespace:
        // the caller's own socket is connected, so nothing is replaced (no descriptor to
        // inject, which would cost the caller another wake-up) and its flags and options stay
        // its own.
        Destination::UnixPath(_) => {
            connect_own(call, target.map(Arc::as_ref), &sock, &route.dest, &info).map(|()| None)
        }
        _ => connect_in(call, target, &sock, &route.dest, &info).map(Some),
    };
    let new_sock = match connected {
        Ok(Some(s)) => s,
        Ok(None) => return call.crossed(0),
        Err(e) => {
            // Nobody listening there (yet): the same answer a local connect would give. The
            // failure is recorded after the decision.
            record.result = Outcome::Error;
            record.reason = Some(format!("connecting in the target failed: {e}"));
            let _ = vm_api::journal(call.ctx, &record);
            return call.answer(Err(e));
        }
    };
    let lent_datagram = route.dest.needs_netns() && sock.is_datagram();
    if lent_datagram {
        // Before the socket reaches the VM: from now on its calls are checked.
        call.ctx.mediation.note_lent_datagram_socket();
    }
    let injected = unotify::inject_fd(
        call.listener,
        call.n.id,
        new_sock.as_fd(),
        fd as u32,
        info.fd_cloexec(fd),
    );
    // Ours goes before the answer, while the caller still holds the socket: closed after, it
    // could be the last reference (a caller that closes at once), and this thread would carry
    // out the caller's TCP close (FIN, backlog) while the VM's next call waits.
    drop(new_sock);
    match injected {
        Ok(()) => call.crossed(0),
        Err(e) => {
            tracing::warn!(vm = %call.ctx.vm, error = %e, "injecting the connected socket failed");
            call.answer(Err(Errno::ECONNREFUSED));
        }
    }
    // The caller's old socket, whose last reference this is once replaced.
    call.ctx.mediation.housekeeper.close_later(sock.sock);
}

/// A new socket of the caller's kind, in `target`'s network namespace when `dest` needs one
/// (`None`: the host's, which is the monitor's). Unix sockets made for another namespace are
/// bound at once (to an autobound name), so that the VM cannot bind them to a name of its
/// choosing in that namespace.
pub(super) fn socket_for(
    call: &Call<'_>,
    target: Option<&Arc<TargetVm>>,
    like: &CallerSocket,
    dest: &Destination,
) -> Result<OwnedFd, Errno> {
    socket_with(call, target, like, dest, SockFlag::empty())
}

/// [`socket_for`], made with `extra` flags (SOCK_NONBLOCK).
fn socket_with(
    call: &Call<'_>,
    target: Option<&Arc<TargetVm>>,
    like: &CallerSocket,
    dest: &Destination,
    extra: SockFlag,
) -> Result<OwnedFd, Errno> {
    let (domain, protocol) = like.domain_and_protocol()?;
    let kind = SocketKind::new(domain, like.kind, extra, protocol);
    let sock = match (dest.needs_netns(), target) {
        (true, Some(t)) => t.socket_in_network(kind, &call.ctx.mediation.housekeeper)?,
        _ => kind.make()?,
    };
    if dest.needs_netns() && domain == libc::AF_UNIX {
        bind(sock.as_raw_fd(), &UnixAddr::new_unnamed())?;
    }
    Ok(sock)
}

/// Creates a socket like the caller's in the target's namespaces and connects it to `dest`
/// (abstract and datagram kinds as the caller's effective uid and gid; TCP, which checks no
/// identity, in [`connect_tcp_in`]). The socket blocks or not as the caller's does.
fn connect_in(
    call: &Call<'_>,
    target: Option<&Arc<TargetVm>>,
    like: &CallerSocket,
    dest: &Destination,
    info: &CallerInfo,
) -> Result<OwnedFd, Errno> {
    if matches!(dest, Destination::Inet { .. }) && like.kind == libc::SOCK_STREAM {
        return connect_tcp_in(call, target, like, dest);
    }
    let sock = socket_for(call, target, like, dest)?;
    let root = root_for(target.map(Arc::as_ref), dest)?;
    as_caller(info, || {
        let resolved = address::resolve(root, dest)?;
        connect_bounded(&sock, &*resolved.addr, &|| call.release_turn())
    })?;
    if like.nonblocking() {
        fcntl(&sock, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    Ok(sock)
}

/// [`connect_in`] for TCP. The socket is made non-blocking (a fresh one of the monitor's, so
/// there is no timeout of anyone's to keep): on loopback the handshake is over when `connect`
/// returns EINPROGRESS, so one `poll` confirms it, where a bounded blocking connect would set
/// and restore a send timeout around it. No identity is taken on: connecting to a port checks
/// none, and a socket's owner is fixed when it is made.
fn connect_tcp_in(
    call: &Call<'_>,
    target: Option<&Arc<TargetVm>>,
    like: &CallerSocket,
    dest: &Destination,
) -> Result<OwnedFd, Errno> {
    static HOST_TCP_DEFAULTS: std::sync::OnceLock<Option<TcpOptions>> = std::sync::OnceLock::new();
    let sock = socket_with(call, target, like, dest, SockFlag::SOCK_NONBLOCK)?;
    let defaults = target.map_or(&HOST_TCP_DEFAULTS, |t| &t.tcp_defaults);
    carry_tcp_options(like.sock.as_fd(), sock.as_fd(), defaults);
    let resolved = address::resolve(None, dest)?;
    connect_nonblocking(&sock, &*resolved.addr, &|| call.release_turn())?;
    if !like.nonblocking() {
        fcntl(&sock, FcntlArg::F_SETFL(OFlag::empty()))?;
    }
    Ok(sock)
}

/// Connects the caller's own socket to unix path `dest` in the target's root, as the caller's
/// effective uid and gid, blocking or not as the caller's socket is.
fn connect_own(
    call: &Call<'_>,
    target: Option<&TargetVm>,
    sock: &CallerSocket,
    dest: &Destination,
    info: &CallerInfo,
) -> Result<(), Errno> {
    let root = root_for(target, dest)?;
    let nonblocking = sock.nonblocking();
    // Looked up and connected as the caller: directory and socket permissions in the target
    // apply as they would to the caller there.
    as_caller(info, || {
        let resolved = address::resolve(root, dest)?;
        if nonblocking {
            connect(sock.sock.as_raw_fd(), &*resolved.addr)
        } else {
            connect_bounded(&sock.sock, &*resolved.addr, &|| call.release_turn())
        }
    })
}

/// Where `dest` is looked up in the target (`None`: the host): for a unix path, the target's
/// root (opened when the target was looked up, with the monitor's privileges: the caller's
/// identity could not open `/proc/PID/root`).
pub(super) fn root_for<'t>(
    target: Option<&'t TargetVm>,
    dest: &Destination,
) -> Result<Option<&'t OwnedFd>, Errno> {
    Ok(match (dest, target) {
        (Destination::UnixPath(_), Some(t)) => Some(&t.root),
        (Destination::UnixPath(_), None) => Some(address::host_root()?),
        _ => None,
    })
}

/// The TCP options a client may set before `connect` that a socket made in its place must
/// carry (libpq, for one, sets TCP_NODELAY and keepalives there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TcpOptions {
    no_delay: bool,
    keep_alive: bool,
    keep_idle: i32,
    keep_interval: i32,
    keep_count: i32,
    user_timeout: u32,
}

impl TcpOptions {
    fn of(fd: BorrowedFd<'_>) -> Option<TcpOptions> {
        use nix::sys::socket::{getsockopt, sockopt};
        Some(TcpOptions {
            no_delay: getsockopt(&fd, sockopt::TcpNoDelay).ok()?,
            keep_alive: getsockopt(&fd, sockopt::KeepAlive).ok()?,
            keep_idle: getsockopt(&fd, sockopt::TcpKeepIdle).ok()? as i32,
            keep_interval: getsockopt(&fd, sockopt::TcpKeepInterval).ok()? as i32,
            keep_count: getsockopt(&fd, sockopt::TcpKeepCount).ok()? as i32,
            user_timeout: getsockopt(&fd, sockopt::TcpUserTimeout).ok()?,
        })
    }
}

/// Sets on `ours`, a fresh socket connected in the caller's place, the TCP options the caller
/// set on its own socket before `connect`: a fresh socket would otherwise run with Nagle's
/// algorithm and without keepalives. Only values that differ from a fresh socket's (read once
/// per target, `defaults`) are set; a failure leaves the default.
fn carry_tcp_options(
    theirs: BorrowedFd<'_>,
    ours: BorrowedFd<'_>,
    defaults: &std::sync::OnceLock<Option<TcpOptions>>,
) {
    use nix::sys::socket::{setsockopt, sockopt};
    let (Some(want), Some(have)) = (
        TcpOptions::of(theirs),
        *defaults.get_or_init(|| TcpOptions::of(ours)),
    ) else {
        return;
    };
    if want.no_delay != have.no_delay {
        let _ = setsockopt(&ours, sockopt::TcpNoDelay, &want.no_delay);
    }
    if want.keep_alive != have.keep_alive {
        let _ = setsockopt(&ours, sockopt::KeepAlive, &want.keep_alive);
    }
    if want.keep_idle != have.keep_idle {
        let _ = setsockopt(&ours, sockopt::TcpKeepIdle, &(want.keep_idle as u32));
    }
    if want.keep_interval != have.keep_interval {
        let _ = setsockopt(
            &ours,
            sockopt::TcpKeepInterval,
            &(want.keep_interval as u32),
        );
    }
    if want.keep_count != have.keep_count {
        let _ = setsockopt(&ours, sockopt::TcpKeepCount, &(want.keep_count as u32));
    }
    if want.user_timeout != have.user_timeout {
        let _ = setsockopt(&ours, sockopt::TcpUserTimeout, &want.user_timeout);
    }
}
