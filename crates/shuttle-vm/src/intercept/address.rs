//! Socket addresses as callers give them, as policy objects name them, and as the monitor
//! reaches them in a target.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::socket::{SockaddrIn, SockaddrIn6, SockaddrLike, UnixAddr};
use nix::sys::stat::Mode;

/// The largest socket address a caller can pass (`sizeof(struct sockaddr_storage)`).
pub(super) const MAX_SOCKADDR: usize = 128;

/// A destination address as the caller gave it, when it is one a rule could route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Destination {
    UnixPath(String),
    Abstract(String),
    Inet { port: u16, v6: bool },
}

/// What a caller's address means to Shuttle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Address {
    /// One a rule could route to another VM.
    Routable(Destination),
    /// `AF_UNSPEC`: dissolves a socket's association (disconnect).
    Unspecified,
    /// Resolved in the caller's own namespaces whatever the policy says: relative unix paths,
    /// addresses other than loopback, other families.
    Local { needs_netns: bool },
}

impl Destination {
    /// The policy objects this address could be; the socket's kind picks between tcp and udp.
    pub fn object(&self, datagram: bool) -> String {
        match self {
            Destination::UnixPath(p) => format!("unix:{p}"),
            Destination::Abstract(name) => format!("abstract:{name}"),
            Destination::Inet { port, .. } if datagram => format!("udp:{port}"),
            Destination::Inet { port, .. } => format!("tcp:{port}"),
        }
    }

    /// Every object the address could be, before the socket's kind is known.
    pub fn candidate_objects(&self) -> Vec<String> {
        match self {
            Destination::Inet { .. } => vec![self.object(false), self.object(true)],
            _ => vec![self.object(false)],
        }
    }

    /// Whether the address means something only within a network namespace (abstract names
    /// and IP ports do; a path is found through the filesystem).
    pub fn needs_netns(&self) -> bool {
        !matches!(self, Destination::UnixPath(_))
    }

    /// The address a rule's `target` rewrites this one to. IP rules keep the caller's family.
    pub fn translated(&self, target: &str) -> Result<Destination, &'static str> {
        match target.split_once(':') {
            Some(("unix", p)) => Ok(Destination::UnixPath(p.to_owned())),
            Some(("abstract", a)) => Ok(Destination::Abstract(a.to_owned())),
            Some(("tcp" | "udp", p)) => match (p.parse(), self) {
                (Ok(port), Destination::Inet { v6, .. }) => Ok(Destination::Inet { port, v6: *v6 }),
                _ => Err("the rule's target does not fit the caller's address"),
            },
            _ => Err("the rule's target is malformed"),
        }
    }
}

/// Parses a sockaddr copied from the caller.
pub(super) fn parse(bytes: &[u8]) -> Address {
    let local = |needs_netns| Address::Local { needs_netns };
    let Some(family) = bytes
        .get(..2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]) as i32)
    else {
        return local(false);
    };
    match family {
        libc::AF_UNSPEC => Address::Unspecified,
        libc::AF_UNIX => {
            let path = &bytes[2..];
            if path.first() == Some(&0) {
                return match String::from_utf8(path[1..].to_vec()) {
                    Ok(name) => Address::Routable(Destination::Abstract(name)),
                    Err(_) => local(true),
                };
            }
            let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
            match std::str::from_utf8(&path[..end]) {
                Ok(p) if p.starts_with('/') => Address::Routable(Destination::UnixPath(p.into())),
                // An unnamed address (autobind) lands in the abstract namespace.
                _ => local(end == 0),
            }
        }
        libc::AF_INET if bytes.len() >= 8 => {
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
            if ip.is_loopback() {
                Address::Routable(Destination::Inet { port, v6: false })
            } else {
                local(true)
            }
        }
        libc::AF_INET6 if bytes.len() >= 24 => {
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let mut a = [0u8; 16];
            a.copy_from_slice(&bytes[8..24]);
            let ip = Ipv6Addr::from(a);
            let mapped_loopback = ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback());
            if ip.is_loopback() || mapped_loopback {
                Address::Routable(Destination::Inet { port, v6: true })
            } else {
                local(true)
            }
        }
        _ => local(true),
    }
}

/// An address ready to connect or send to, with whatever descriptor it refers through.
pub(super) struct Resolved {
    pub addr: Box<dyn SockaddrLike>,
    _path_fd: Option<OwnedFd>,
}

/// The host's root, where unix paths routed to the host are looked up (opened once: the
/// monitor's root never changes).
pub(super) fn host_root() -> Result<&'static OwnedFd, Errno> {
    // Only a success is kept: one failed open (out of descriptors, say) must not leave the
    // monitor without the host's root for the rest of its life.
    static ROOT: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(root) = ROOT.get() {
        return Ok(root);
    }
    let root = nix::fcntl::open(
        Path::new("/"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(ROOT.get_or_init(|| root))
}

/// Resolves `dest` in a target. A unix path is looked up in `root` (the target's) with
/// the calling thread's credentials: run this as the caller, so that the directories on the
/// way are searched as the caller could search them there.
pub(super) fn resolve(root: Option<&OwnedFd>, dest: &Destination) -> Result<Resolved, Errno> {
    let plain = |addr: Box<dyn SockaddrLike>| Resolved {
        addr,
        _path_fd: None,
    };
    Ok(match dest {
        Destination::UnixPath(path) => {
            let root = root.ok_or(Errno::EINVAL)?;
            // Resolved inside the target's root (symlinks included): nothing leads out of it.
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            let target = openat2(root, Path::new(path.trim_start_matches('/')), how)?;
            // Connecting through the O_PATH descriptor's magic link reaches exactly the inode
            // resolved above, however long its path is.
            let addr =
                UnixAddr::new(format!("/proc/thread-self/fd/{}", target.as_raw_fd()).as_str())?;
            Resolved {
                addr: Box::new(addr),
                _path_fd: Some(target),
            }
        }
        Destination::Abstract(name) => plain(Box::new(UnixAddr::new_abstract(name.as_bytes())?)),
        Destination::Inet { port, v6: false } => {
            plain(Box::new(SockaddrIn::new(127, 0, 0, 1, *port)))
        }
        Destination::Inet { port, v6: true } => plain(Box::new(SockaddrIn6::from(
            std::net::SocketAddrV6::new(Ipv6Addr::LOCALHOST, *port, 0, 0),
        ))),
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

    fn routable(d: Destination) -> Address {
        Address::Routable(d)
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse(&unix(b"/run/x.sock\0")),
            routable(Destination::UnixPath("/run/x.sock".into()))
        );
        assert_eq!(
            parse(&unix(b"rel.sock\0")),
            Address::Local { needs_netns: false }
        );
        assert_eq!(
            parse(&unix(b"")),
            Address::Local { needs_netns: true },
            "autobind is abstract"
        );
        assert_eq!(
            parse(&unix(b"\0name")),
            routable(Destination::Abstract("name".into()))
        );
        let mut v4 = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        v4.extend_from_slice(&5432u16.to_be_bytes());
        v4.extend_from_slice(&[127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            parse(&v4),
            routable(Destination::Inet {
                port: 5432,
                v6: false
            })
        );
        v4[4] = 10;
        assert_eq!(
            parse(&v4),
            Address::Local { needs_netns: true },
            "only loopback is ever routed"
        );
        assert_eq!(parse(&[1]), Address::Local { needs_netns: false });
        assert_eq!(parse(&[0, 0]), Address::Unspecified);
    }

    #[test]
    fn objects_and_translation() {
        let tcp = Destination::Inet { port: 80, v6: true };
        assert_eq!(tcp.object(false), "tcp:80");
        assert_eq!(tcp.object(true), "udp:80");
        assert_eq!(
            tcp.translated("tcp:8080"),
            Ok(Destination::Inet {
                port: 8080,
                v6: true
            })
        );
        assert!(Destination::UnixPath("/a".into())
            .translated("tcp:1")
            .is_err());
        assert_eq!(
            tcp.translated("unix:/run/x"),
            Ok(Destination::UnixPath("/run/x".into()))
        );
        assert!(tcp.translated("nonsense").is_err());
    }
}
