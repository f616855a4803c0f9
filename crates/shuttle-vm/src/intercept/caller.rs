//! Who made an intercepted call, and the socket it made it on, as the kernel tells it (never as
//! the VM says).

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use shuttle_audit::Caller;
use shuttle_sys::unotify;

/// The calling process, from one read of `/proc/TID/status`.
#[derive(Debug, Clone)]
pub(super) struct CallerInfo {
    pub tgid: i32,
    /// Effective ids: what permission checks use, and what a server's SO_PEERCRED must show.
    pub uid: u32,
    pub gid: u32,
    pub threads: u32,
    pid_in_vm: Option<i32>,
    program: Option<String>,
}

impl CallerInfo {
    pub fn of(tid: u32) -> Option<CallerInfo> {
        let status = read_proc(&format!("/proc/{tid}/status"))?;
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
        let nth = |name: &str, idx: usize| -> Option<u32> {
            field(name)?.split_whitespace().nth(idx)?.parse().ok()
        };
        Some(CallerInfo {
            tgid: nth("Tgid:", 0)? as i32,
            uid: nth("Uid:", 1)?,
            gid: nth("Gid:", 1)?,
            threads: nth("Threads:", 0)?,
            // The innermost entry is the id inside the VM's PID namespace.
            pid_in_vm: field("NStgid:")
                .and_then(|v| v.split_whitespace().last())
                .and_then(|v| v.parse().ok()),
            program: field("Name:").map(|v| v.trim().to_owned()),
        })
    }

    /// The caller as an audit record names it.
    pub fn audit(&self) -> Caller {
        Caller {
            pid_in_vm: self.pid_in_vm,
            pid_on_host: Some(self.tgid),
            uid: Some(self.uid),
            program: self.program.clone(),
        }
    }

    /// Whether descriptor `fd` of the caller is close-on-exec (from /proc/PID/fdinfo).
    pub fn fd_cloexec(&self, fd: i32) -> bool {
        read_proc(&format!("/proc/{}/fdinfo/{fd}", self.tgid))
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .is_some_and(|flags| flags & libc::O_CLOEXEC as u32 != 0)
    }
}

/// Reads a small /proc file with one read(2) (it is generated whole at the first read): no
/// size probe, no growing buffer, which on the mediated path of every call add up.
fn read_proc(path: &str) -> Option<String> {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    let n = std::fs::File::open(path).ok()?.read(&mut buf).ok()?;
    String::from_utf8(buf[..n].to_vec()).ok()
}

/// The socket object behind a caller's descriptor, duplicated into the monitor. Acting on this
/// copy acts on exactly the object that was checked, whatever the caller's other threads do to
/// their descriptor table meanwhile.
#[derive(Debug)]
pub(super) struct CallerSocket {
    pub sock: OwnedFd,
    pub domain: i32,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub kind: i32,
    pub protocol: i32,
}

impl CallerSocket {
    /// Duplicates descriptor `fd` of process `tgid`. Check the notification is still valid
    /// afterwards: only then is `tgid` known to have been the caller.
    pub fn of(tgid: i32, fd: i32) -> Result<CallerSocket, Errno> {
        let pidfd = shuttle_sys::process::pidfd_open(tgid)?;
        let sock = unotify::duplicate_from(pidfd.as_fd(), fd)?;
        let (domain, kind, protocol) = unotify::socket_kind(sock.as_fd())?;
        Ok(CallerSocket {
            sock,
            domain,
            kind: kind & 0xf,
            protocol,
        })
    }

    pub fn is_datagram(&self) -> bool {
        self.kind == libc::SOCK_DGRAM
    }

    /// The network namespace the socket was created in.
    pub fn netns(&self) -> Result<u64, Errno> {
        unotify::socket_netns_inode(self.sock.as_fd())
    }

    pub fn nonblocking(&self) -> bool {
        fcntl(&self.sock, FcntlArg::F_GETFL)
            .map(|f| OFlag::from_bits_truncate(f).contains(OFlag::O_NONBLOCK))
            .unwrap_or(false)
    }
}
