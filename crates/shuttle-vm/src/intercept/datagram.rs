//! Datagrams sent to a named destination (`sendto`, `sendmsg`; `sendmmsg` is only checked):
//! continued when they stay in the VM, sent by the monitor when a rule routes them across.
//!
//! An allowed datagram is sent by the monitor on its own copy of the caller's bytes. To a unix
//! path it goes out of the caller's own socket (the receiver sees the caller's address, if it
//! has one). A UDP port or abstract name of another VM needs a socket in that VM's network
//! namespace: an unbound caller socket is replaced by one there (lent, see the module
//! documentation of `intercept`), so that replies come back to it and later datagrams keep
//! their source; a bound one keeps its binding, and the datagram leaves from a socket of the
//! monitor's that nothing answers to. Ancillary data (descriptors, credentials) is not carried
//! across VMs: such a call is refused with EOPNOTSUPP.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{getsockname, sendto, MsgFlags, SockaddrLike, SockaddrStorage};
use shuttle_policy::Op;
use shuttle_sys::unotify;

use super::address::{self, Address, Destination, MAX_SOCKADDR};
use super::caller::{CallerInfo, CallerSocket};
use super::connect::{caller_and_socket, root_for, socket_for};
use super::target::as_caller;
use super::{judge, route, stay_local_on, Call, Judgement};
use crate::vm_api;

/// The largest datagram the monitor copies (a unix datagram socket's default send buffer is
/// about this size); larger ones fail with EMSGSIZE.
const MAX_DATAGRAM: usize = 256 * 1024;
/// The most buffers one `sendmsg` may name (the kernel's UIO_MAXIOV).
const MAX_IOV: u64 = 1024;
/// `struct msghdr` and `struct mmsghdr` on 64-bit Linux.
const MSGHDR_LEN: usize = 56;
const MMSGHDR_LEN: u64 = 64;

/// Where the caller's bytes are.
#[derive(Debug, Clone, Copy)]
enum Payload {
    Flat {
        buf: u64,
        len: u64,
    },
    Vector {
        iov: u64,
        count: u64,
        control_len: u64,
    },
}

fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_ne_bytes(w)
}

pub(super) fn on_sendto(call: &Call<'_>) {
    let (fd, buf, len, flags) = (call.arg(0) as i32, call.arg(1), call.arg(2), call.arg(3));
    let (addr, addr_len) = (call.arg(4), call.arg(5) as usize);
    if addr == 0 || !(2..=MAX_SOCKADDR).contains(&addr_len) {
        return call.stay_local();
    }
    let payload = Payload::Flat { buf, len };
    on_named_send(call, fd, addr, addr_len, payload, flags as i32);
}

pub(super) fn on_sendmsg(call: &Call<'_>) {
    let (fd, msg, flags) = (call.arg(0) as i32, call.arg(1), call.arg(2) as i32);
    let header = match call.read(msg, MSGHDR_LEN) {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(_) => return call.stay_local(),
    };
    let (name, name_len) = (word(&header, 0), word(&header, 8) as u32 as usize);
    if name == 0 || name_len == 0 {
        // No destination: the socket's own peer, reached as it always was.
        return call.stay_local();
    }
    if name_len > MAX_SOCKADDR {
        return call.stay_local();
    }
    let payload = Payload::Vector {
        iov: word(&header, 16),
        count: word(&header, 24),
        control_len: word(&header, 40),
    };
    on_named_send(call, fd, name, name_len, payload, flags);
}

fn on_named_send(
    call: &Call<'_>,
    fd: i32,
    addr: u64,
    addr_len: usize,
    payload: Payload,
    flags: i32,
) {
    let bytes = match call.read(addr, addr_len) {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(_) => return call.stay_local(),
    };
    let lent_datagrams = call.ctx.mediation.holds_lent_datagram_sockets();
    let local = |dest_needs_netns: bool, bytes: Vec<u8>| {
        if dest_needs_netns && lent_datagrams {
            if let Some((info, sock)) = caller_and_socket(call, fd) {
                send_locally_on(call, &info, &sock, &bytes, payload, flags);
            }
        } else {
            call.stay_local();
        }
    };
    match address::parse(&bytes) {
        Address::Unspecified => local(true, bytes),
        Address::Local { needs_netns } => local(needs_netns, bytes),
        Address::Routable(dest) => {
            if call.stays_local(&call.policy(), Op::Connect, &dest) {
                local(dest.needs_netns(), bytes);
            } else {
                mediate(call, fd, dest, &bytes, payload, flags);
            }
        }
    }
}

/// `sendmmsg` is not mediated: its datagrams always stay in the VM. In a VM that holds lent
/// datagram sockets it continues only where that is safe, and is refused (EOPNOTSUPP) when it
/// names destinations and the monitor cannot vouch for the socket.
pub(super) fn on_sendmmsg(call: &Call<'_>) {
    if !call.ctx.mediation.holds_lent_datagram_sockets() {
        return call.stay_local();
    }
    let (fd, vec, count) = (call.arg(0) as i32, call.arg(1), call.arg(2).min(MAX_IOV));
    let headers = match call.read(vec, (count * MMSGHDR_LEN) as usize) {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(_) => return call.stay_local(),
    };
    let names_any = headers
        .chunks(MMSGHDR_LEN as usize)
        .any(|h| word(h, 0) != 0 && word(h, 8) as u32 != 0);
    if !names_any {
        return call.stay_local();
    }
    let Some((info, sock)) = caller_and_socket(call, fd) else {
        return;
    };
    if stay_local_on(call, &info, &sock, "sendmmsg").is_some() {
        call.answer(Err(Errno::EOPNOTSUPP));
    }
}

/// Continues a send that stays in the VM once that is safe, or sends it on the socket checked.
fn send_locally_on(
    call: &Call<'_>,
    info: &CallerInfo,
    sock: &CallerSocket,
    addr: &[u8],
    payload: Payload,
    flags: i32,
) {
    let Some(sock) = stay_local_on(call, info, sock, "send") else {
        return;
    };
    let data = match read_payload(call, payload) {
        Ok(Some(d)) => d,
        Ok(None) => return,
        Err(e) => return call.answer(Err(e)),
    };
    let Some(addr) = shuttle_sys::net::sockaddr_from_bytes(addr) else {
        return call.answer(Err(Errno::EINVAL));
    };
    let sent = as_caller(info, || {
        send_bounded(&sock.sock, &data, &addr, flags, !sock.nonblocking(), call)
    });
    call.answer(sent.map(|n| n as i64));
}

/// The mediated part of a send to an address some rule publishes.
fn mediate(call: &Call<'_>, fd: i32, dest: Destination, addr: &[u8], payload: Payload, flags: i32) {
    let Some((info, sock)) = caller_and_socket(call, fd) else {
        return;
    };
    let local = |call: &Call<'_>| {
        if dest.needs_netns() {
            send_locally_on(call, &info, &sock, addr, payload, flags);
        } else {
            call.stay_local();
        }
    };
    if !sock.is_datagram() {
        // A connected stream socket ignores or refuses a destination: nothing to route.
        return local(call);
    }
    let policy = call.policy();
    let object = dest.object(true);
    let record = call.record("send", &object, &info);
    let (decision, target, mut record) = match judge(call, &policy, Op::Connect, &object, record) {
        Judgement::Local => return local(call),
        Judgement::Refuse => return call.answer(Err(Errno::ECONNREFUSED)),
        Judgement::Allowed {
            decision,
            target,
            record,
        } => (decision, target, *record),
    };
    let route = match route(call.ctx, &decision, target, dest.clone()) {
        Ok(r) => r,
        Err(why) => return call.refuse(record, &why, Errno::ECONNREFUSED),
    };
    let data = match read_payload(call, payload) {
        Ok(Some(d)) => d,
        Ok(None) => return,
        Err(Errno::EOPNOTSUPP) => {
            return call.refuse(
                record,
                "ancillary data is not carried across VMs",
                Errno::EOPNOTSUPP,
            )
        }
        Err(e) => return call.answer(Err(e)),
    };
    let target_vm = route.target.as_ref();
    let root = match root_for(target_vm.map(Arc::as_ref), &route.dest) {
        Ok(r) => r,
        Err(e) => return call.refuse(record, &format!("the target's root: {e}"), e),
    };
    // Looked up as the caller, as it would be there (see `connect::connect_own`).
    let resolved = match as_caller(&info, || address::resolve(root, &route.dest)) {
        Ok(r) => r,
        Err(e) => return call.refuse(record, &format!("no such address in the target: {e}"), e),
    };
    // Which socket the datagram leaves from (see the module documentation).
    let already_there = target_vm.is_some_and(|t| sock.netns().ok() == Some(t.net_inode));
    let (sender, lend): (Option<OwnedFd>, bool) = if !route.dest.needs_netns() || already_there {
        (None, false)
    } else {
        let fresh = match socket_for(call, target_vm, &sock, &route.dest) {
            Ok(s) => s,
            Err(e) => return call.refuse(record, &format!("no socket in the target: {e}"), e),
        };
        let own = sock.netns().ok() == Some(call.ctx.mediation.own_netns);
        (Some(fresh), own && unbound(&sock.sock))
    };
    record.reason = Some(format!("{} bytes to {:?}", data.len(), route.dest));
    if !vm_api::journal(call.ctx, &record) {
        return call.answer(Err(Errno::ECONNREFUSED));
    }
    if let (Some(fresh), true) = (&sender, lend) {
        if sock.nonblocking() {
            let _ = nix::fcntl::fcntl(
                fresh,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            );
        }
        call.ctx.mediation.note_lent_datagram_socket();
        let injected = unotify::inject_fd(
            call.listener,
            call.n.id,
            fresh.as_fd(),
            fd as u32,
            info.fd_cloexec(fd),
        );
        if injected.is_err() {
            return call.answer(Err(Errno::ECONNREFUSED));
        }
    }
    let via = sender.as_ref().unwrap_or(&sock.sock);
    let sent = as_caller(&info, || {
        send_bounded(
            via,
            &data,
            &*resolved.addr,
            flags,
            !sock.nonblocking(),
            call,
        )
    });
    match sent {
        Ok(n) => call.crossed(n as i64),
        Err(e) => call.answer(Err(e)),
    }
}

/// Whether a socket has no address yet (nothing would be lost by replacing it).
fn unbound(sock: &OwnedFd) -> bool {
    match getsockname::<SockaddrStorage>(sock.as_raw_fd()) {
        Ok(a) => match (a.as_sockaddr_in(), a.as_sockaddr_in6(), a.as_unix_addr()) {
            (Some(v4), _, _) => v4.port() == 0,
            (_, Some(v6), _) => v6.port() == 0,
            (_, _, Some(u)) => u.path().is_none() && u.as_abstract().is_none(),
            _ => false,
        },
        Err(_) => false,
    }
}

/// Copies the caller's datagram. `Ok(None)` if the call is gone; EOPNOTSUPP for ancillary data.
fn read_payload(call: &Call<'_>, payload: Payload) -> Result<Option<Vec<u8>>, Errno> {
    match payload {
        Payload::Flat { buf, len } => {
            let len = usize::try_from(len).map_err(|_| Errno::EMSGSIZE)?;
            if len > MAX_DATAGRAM {
                return Err(Errno::EMSGSIZE);
            }
            if len == 0 {
                return Ok(Some(Vec::new()));
            }
            call.read(buf, len)
        }
        Payload::Vector {
            iov,
            count,
            control_len,
        } => {
            if control_len != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            if count > MAX_IOV {
                return Err(Errno::EMSGSIZE);
            }
            if count == 0 {
                return Ok(Some(Vec::new()));
            }
            let Some(vecs) = call.read(iov, count as usize * 16)? else {
                return Ok(None);
            };
            let mut data = Vec::new();
            for v in vecs.chunks(16) {
                let (base, len) = (word(v, 0), word(v, 8));
                let len = usize::try_from(len).map_err(|_| Errno::EMSGSIZE)?;
                if data.len() + len > MAX_DATAGRAM {
                    return Err(Errno::EMSGSIZE);
                }
                if len == 0 {
                    continue;
                }
                let Some(part) = call.read(base, len)? else {
                    return Ok(None);
                };
                data.extend_from_slice(&part);
            }
            Ok(Some(data))
        }
    }
}

/// How long a send waits for room in the receiver's queue on behalf of a blocking caller.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// sendto(2) that never blocks a mediator for long: a blocking caller's datagram waits for
/// room up to [`SEND_TIMEOUT`], then fails with EAGAIN. Before waiting, the mediator gives its
/// turn at the listener to another receiver.
fn send_bounded(
    sock: &OwnedFd,
    data: &[u8],
    addr: &dyn SockaddrLike,
    flags: i32,
    blocking: bool,
    call: &Call<'_>,
) -> Result<usize, Errno> {
    let deadline = Instant::now() + SEND_TIMEOUT;
    let flags =
        MsgFlags::from_bits_truncate(flags) | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    loop {
        match sendto(sock.as_raw_fd(), data, addr, flags) {
            Err(Errno::EAGAIN) if blocking && Instant::now() < deadline => {
                call.release_turn();
                let mut fds = [nix::poll::PollFd::new(
                    sock.as_fd(),
                    nix::poll::PollFlags::POLLOUT,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16));
            }
            other => return other,
        }
    }
}
