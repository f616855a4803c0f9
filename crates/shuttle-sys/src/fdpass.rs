//! Sending and receiving one datagram together with file descriptors (`SCM_RIGHTS`).
//!
//! Received descriptors are always close-on-exec (`MSG_CMSG_CLOEXEC`) and returned as
//! [`OwnedFd`], so nothing leaks into programs the receiver later executes.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::cmsg_space;
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The most descriptors one message may carry. A peer that sends more is misbehaving.
pub const MAX_FDS_PER_MESSAGE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    #[error("sendmsg failed: {0}")]
    Send(#[source] Errno),
    #[error("recvmsg failed: {0}")]
    Receive(#[source] Errno),
    #[error("peer sent a message that was truncated (more than {0} bytes)")]
    Truncated(usize),
    #[error("peer sent more than {MAX_FDS_PER_MESSAGE} descriptors in one message")]
    TooManyFds,
    #[error("too many descriptors to send: {0} (at most {MAX_FDS_PER_MESSAGE})")]
    TooManyFdsToSend(usize),
}

/// Sends `data` as one message on a `SOCK_SEQPACKET` or `SOCK_DGRAM` socket, with `fds`.
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), FdPassError> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(FdPassError::TooManyFdsToSend(fds.len()));
    }
    if fds.is_empty() {
        // Plain send(2): inside a VM it is not one of the calls the monitor mediates.
        loop {
            match nix::sys::socket::send(socket.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(FdPassError::Send(e)),
            }
        }
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(FdPassError::Send(e)),
        }
    }
}

/// Receives one message into `buf`. Returns the number of bytes (0 means the peer closed a
/// stream or sent an empty datagram) and the descriptors that came with it.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>), FdPassError> {
    let mut cmsg_buf = cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let buf_len = buf.len();
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(FdPassError::Receive(e)),
        }
    };
    let mut fds = Vec::new();
    // Take ownership of every descriptor before checking anything else, so that a message
    // we reject still has all its descriptors closed (when `fds` drops).
    for cmsg in msg.cmsgs().map_err(FdPassError::Receive)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in our table for this message; no
                // other owner exists, so wrapping it in an OwnedFd is the unique ownership.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let ctrunc = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let len = msg.bytes;
    if truncated {
        return Err(FdPassError::Truncated(buf_len));
    }
    if ctrunc || fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(FdPassError::TooManyFds);
    }
    Ok((len, fds))
}

/// Takes ownership of a descriptor a system call just returned (such as `accept4`), which
/// `nix` hands out as a raw number. Negative numbers yield `None`.
pub fn own_accepted(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: the caller passes a descriptor freshly returned by the kernel that nothing else
    // owns; ownership moves into the OwnedFd.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of a descriptor this process inherited across `execve` under a number
/// its parent passed on (such as the monitor's readiness pipe), after checking that the
/// number is open, and marks it close-on-exec so it goes no further.
pub fn own_inherited(fd: RawFd) -> Option<OwnedFd> {
    if fd < 3 {
        return None;
    }
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the number is open (checked above) and was handed to this process to own;
    // nothing else in this process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD with FD_CLOEXEC only changes descriptor flags.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(owned)
}

/// A pidfd of the process at the other end of a connected unix socket, as it was when it
/// connected (`SO_PEERPIDFD`, Linux 6.5; socket(7)): unlike the pid of `SO_PEERCRED`, it
/// cannot come to name another process once that one has gone.
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a live c_int and `len` its size; the kernel writes at most that.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(Errno::last());
    }
    own_accepted(fd).ok_or(Errno::EBADF)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    use super::*;

    #[test]
    fn passes_a_pipe_through_a_seqpacket_pair() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[w.as_fd()]).unwrap();
        drop(w);
        let mut buf = [0u8; 64];
        let (n, mut fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fds must be close-on-exec"
        );
        let mut w = std::fs::File::from(fds.remove(0));
        w.write_all(b"through").unwrap();
        drop(w);
        let mut s = String::new();
        std::fs::File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(s, "through");
    }

    #[test]
    fn oversized_message_is_reported_truncated() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        send_with_fds(a.as_fd(), &[7u8; 100], &[]).unwrap();
        let mut buf = [0u8; 10];
        assert!(matches!(
            recv_with_fds(b.as_fd(), &mut buf),
            Err(FdPassError::Truncated(10))
        ));
    }
}
