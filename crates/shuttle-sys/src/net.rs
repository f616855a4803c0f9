//! Network interface set-up inside a fresh network namespace. See netdevice(7).

use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Sets the loopback interface of the current network namespace up (a new namespace starts
/// with `lo` down, so even 127.0.0.1 would be unreachable).
pub fn bring_up_loopback() -> Result<(), Errno> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `ifr`, which we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags member.
    unsafe {
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `ifr`, which we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// A socket address from the raw bytes of a `struct sockaddr` of that length (as a caller
/// passed it to the kernel); `None` if the family does not fit the length.
pub fn sockaddr_from_bytes(bytes: &[u8]) -> Option<nix::sys::socket::SockaddrStorage> {
    let len = libc::socklen_t::try_from(bytes.len()).ok()?;
    if bytes.len() < 2 || bytes.len() > size_of::<libc::sockaddr_storage>() {
        return None;
    }
    // SAFETY: `bytes` holds `len` readable bytes, which from_raw copies; it checks the family
    // against the length itself.
    unsafe { nix::sys::socket::SockaddrLike::from_raw(bytes.as_ptr().cast(), Some(len)) }
}

/// `struct sockaddr` with family AF_UNSPEC: connecting to it dissolves an association.
pub fn unspecified_sockaddr() -> nix::sys::socket::SockaddrStorage {
    let mut raw = [0u8; size_of::<libc::sockaddr>()];
    raw[..2].copy_from_slice(&(libc::AF_UNSPEC as libc::sa_family_t).to_ne_bytes());
    sockaddr_from_bytes(&raw).unwrap_or_else(|| unreachable!("AF_UNSPEC fits any length"))
}
