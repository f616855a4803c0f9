//! A typed, descriptor-carrying channel over a `SOCK_SEQPACKET` socket.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{connect, socket, socketpair, AddressFamily, SockFlag, SockType, UnixAddr};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shuttle_sys::fdpass::{self, FdPassError};

use crate::MAX_MESSAGE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the peer closed the connection")]
    Disconnected,
    #[error("could not connect to {path}: {errno}")]
    Connect { path: String, errno: Errno },
    #[error("could not create a socket: {0}")]
    Socket(Errno),
    #[error(transparent)]
    Transfer(#[from] FdPassError),
    #[error("malformed message from peer: {0}")]
    Decode(serde_json::Error),
    #[error("could not encode message: {0}")]
    Encode(serde_json::Error),
    #[error("message too large: {0} bytes (limit {MAX_MESSAGE_BYTES})")]
    TooLarge(usize),
    #[error("peer speaks protocol version {theirs}, this program speaks {ours}; use matching shuttle binaries")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("unexpected message from peer: {0}")]
    Unexpected(String),
}

/// One end of a conversation.
#[derive(Debug)]
pub struct Channel {
    socket: OwnedFd,
}

impl Channel {
    pub fn from_fd(socket: OwnedFd) -> Self {
        Channel { socket }
    }

    /// Two connected ends, close-on-exec (for a parent and the child it forks).
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(ChannelError::Socket)?;
        Ok((Channel { socket: a }, Channel { socket: b }))
    }

    /// Connects to a listening `SOCK_SEQPACKET` socket at `path`.
    pub fn connect(path: &Path) -> Result<Channel, ChannelError> {
        let err = |errno| ChannelError::Connect {
            path: path.display().to_string(),
            errno,
        };
        let socket = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(ChannelError::Socket)?;
        let addr = UnixAddr::new(path).map_err(err)?;
        loop {
            match connect(std::os::fd::AsRawFd::as_raw_fd(&socket), &addr) {
                Ok(()) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(err(e)),
            }
        }
        Ok(Channel { socket })
    }

    pub fn send<T: Serialize>(&self, msg: &T) -> Result<(), ChannelError> {
        self.send_with_fds(msg, &[])
    }

    pub fn send_with_fds<T: Serialize>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        let data = serde_json::to_vec(msg).map_err(ChannelError::Encode)?;
        if data.len() > MAX_MESSAGE_BYTES {
            return Err(ChannelError::TooLarge(data.len()));
        }
        match fdpass::send_with_fds(self.socket.as_fd(), &data, fds) {
            Err(FdPassError::Send(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN)) => {
                Err(ChannelError::Disconnected)
            }
            other => Ok(other?),
        }
    }

    /// Receives one message, with the descriptors that came with it.
    pub fn recv_with_fds<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
        let (n, fds) = match fdpass::recv_with_fds(self.socket.as_fd(), &mut buf) {
            Err(FdPassError::Receive(Errno::ECONNRESET)) => return Err(ChannelError::Disconnected),
            other => other?,
        };
        if n == 0 && fds.is_empty() {
            // End of file, or an empty packet (which a peer can send on purpose): only the
            // former ends the conversation; the latter is a malformed message.
            let mut pfd = [nix::poll::PollFd::new(
                self.socket.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let hung_up = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO).is_ok()
                && pfd[0]
                    .revents()
                    .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP));
            return Err(if hung_up {
                ChannelError::Disconnected
            } else {
                ChannelError::Unexpected("an empty message".into())
            });
        }
        let msg = serde_json::from_slice(&buf[..n]).map_err(ChannelError::Decode)?;
        Ok((msg, fds))
    }

    /// Receives one message and refuses any descriptor sent with it.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<T, ChannelError> {
        let (msg, fds) = self.recv_with_fds()?;
        if !fds.is_empty() {
            return Err(ChannelError::Unexpected(format!(
                "{} descriptors where none were expected",
                fds.len()
            )));
        }
        Ok(msg)
    }

    /// Makes a second handle to the same socket (for a reader and a writer thread).
    pub fn try_clone(&self) -> Result<Channel, ChannelError> {
        let fd = self
            .socket
            .try_clone()
            .map_err(|e| ChannelError::Socket(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        Ok(Channel { socket: fd })
    }

    /// Ends the conversation for every handle of this socket, waking a blocked reader.
    pub fn shutdown(&self) {
        use std::os::fd::AsRawFd;
        let _ =
            nix::sys::socket::shutdown(self.socket.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl From<Channel> for OwnedFd {
    fn from(c: Channel) -> OwnedFd {
        c.socket
    }
}
