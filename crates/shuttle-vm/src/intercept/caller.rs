//! Who made an intercepted call, and the socket it made it on, as the kernel tells it (never as
//! the VM says).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use shuttle_audit::Caller;
use shuttle_sys::process::{self, PidfdInfo};
use shuttle_sys::unotify;

use super::MediationState;

/// The calling thread's process and identity. On Linux 6.13 and later this costs a pidfd of
/// the thread and one ioctl (PIDFD_GET_INFO), plus the short `comm` file for the audit; older
/// kernels take it from one read of `/proc/TID/status`, which costs several times as much on
/// the path of every mediated call.
#[derive(Debug)]
pub(super) struct CallerInfo {
    tid: u32,
    pub tgid: i32,
    /// Effective ids: what permission checks use, and what a server's SO_PEERCRED must show.
    pub uid: u32,
    pub gid: u32,
    /// The calling thread (its process on kernels without PIDFD_THREAD): descriptors are
    /// taken through its pidfd, so they come from exactly the task that made the call.
    thread: Arc<KnownThread>,
    pid_in_vm: Option<i32>,
    program: Option<String>,
    /// What only `/proc/TID/status` tells, read when first needed (most calls never do).
    status: OnceLock<Option<StatusExtras>>,
}

/// The rarely needed part of `/proc/TID/status`.
#[derive(Debug, Clone)]
struct StatusExtras {
    threads: u32,
    groups: Vec<u32>,
}

/// Whether this kernel has PIDFD_THREAD and PIDFD_GET_INFO; cleared at the first sign it
/// does not, so older kernels do not pay for a failing attempt on every call.
static PIDFD_INFO_WORKS: AtomicBool = AtomicBool::new(true);

impl CallerInfo {
    /// The caller `tid` (as the notification names it), in the VM that `state` mediates for.
    /// `None` if the caller is gone.
    /// Check the notification is still pending after using any of this: only then is `tid`
    /// known to have been the caller.
    pub fn of(tid: u32, state: &MediationState) -> Option<CallerInfo> {
        if PIDFD_INFO_WORKS.load(Ordering::Relaxed) {
            match Self::from_pidfd(tid, state) {
                Ok(info) => return Some(info),
                Err(e @ (Errno::EINVAL | Errno::ENOTTY)) => {
                    tracing::debug!(error = %e, "PIDFD_GET_INFO unavailable; reading /proc status");
                    PIDFD_INFO_WORKS.store(false, Ordering::Relaxed);
                }
                // Gone (ESRCH), or out of descriptors: refused by the caller of this.
                Err(_) => return None,
            }
        }
        Self::from_status(tid)
    }

    fn from_pidfd(tid: u32, state: &MediationState) -> Result<CallerInfo, Errno> {
        let (thread, id) = state.callers.identify(tid)?;
        let mut comm = [0u8; 64];
        // A fresh read from offset 0 regenerates the file: the name as it is now.
        let program = match thread.comm.as_ref().map(|f| f.read_at(&mut comm, 0)) {
            Some(Ok(n)) => Some(String::from_utf8_lossy(&comm[..n]).trim_end().to_owned()),
            _ => None,
        };
        // A thread's process, and so its number in the VM, stays what it was (the number
        // changes hands only when the thread leaves: then this thread's pidfd fails above).
        let pid_in_vm = *thread.pid_in_vm.get_or_init(|| {
            state
                .vm_pidns()
                .and_then(|ns| process::tgid_in_pid_namespace(ns, id.tgid).ok())
        });
        Ok(CallerInfo {
            tid,
            tgid: id.tgid,
            uid: id.euid,
            gid: id.egid,
            pid_in_vm,
            program,
            thread,
            status: OnceLock::new(),
        })
    }

    fn from_status(tid: u32) -> Option<CallerInfo> {
        let status = read_proc(&format!("/proc/{tid}/status"))?;
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
        let nth = |name: &str, idx: usize| -> Option<u32> {
            field(name)?.split_whitespace().nth(idx)?.parse().ok()
        };
        let tgid = nth("Tgid:", 0)? as i32;
        Some(CallerInfo {
            tid,
            tgid,
            uid: nth("Uid:", 1)?,
            gid: nth("Gid:", 1)?,
            thread: Arc::new(KnownThread {
                pidfd: process::pidfd_open(tgid).ok()?,
                comm: None,
                fdinfo: Mutex::new(None),
                pid_in_vm: OnceLock::new(),
            }),
            // The innermost entry is the id inside the VM's PID namespace.
            pid_in_vm: field("NStgid:")
                .and_then(|v| v.split_whitespace().last())
                .and_then(|v| v.parse().ok()),
            program: field("Name:").map(|v| v.trim().to_owned()),
            status: OnceLock::from(StatusExtras::parse(&status)),
        })
    }

    fn status_extras(&self) -> Option<&StatusExtras> {
        self.status
            .get_or_init(|| {
                let status = read_proc(&format!("/proc/{}/status", self.tid))?;
                // Read by number: it was the caller's only if the caller still lives (then no
                // other task can have its number).
                if process::pidfd_send_signal(self.thread.pidfd.as_fd(), 0).is_err() {
                    return None;
                }
                StatusExtras::parse(&status)
            })
            .as_ref()
    }

    /// Whether the caller's process has one thread (so no other thread can swap its
    /// descriptors under a check). Unknown counts as several: fail closed.
    pub fn single_threaded(&self) -> bool {
        self.status_extras().is_some_and(|s| s.threads == 1)
    }

    /// The caller's supplementary groups (empty when unknown).
    pub fn supplementary_groups(&self) -> &[u32] {
        self.status_extras().map_or(&[], |s| &s.groups)
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

    /// Whether descriptor `fd` of the caller is close-on-exec (from /proc/TID/fdinfo; the
    /// thread shares its process's descriptor table).
    pub fn fd_cloexec(&self, fd: i32) -> bool {
        let text = match self.thread.fdinfo(self.tid, fd) {
            Some(text) => Some(text),
            None => read_proc(&format!("/proc/{}/fdinfo/{fd}", self.tgid)),
        };
        text.and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .is_some_and(|flags| flags & libc::O_CLOEXEC as u32 != 0)
    }
}

/// A thread that made mediated calls: its pidfd and its open `comm` file. Both name that very
/// thread, never a later one that reuses its number: once it exits, both answer ESRCH.
#[derive(Debug)]
pub(super) struct KnownThread {
    pidfd: OwnedFd,
    /// `None` on the `/proc/TID/status` path, which reads the name from there.
    comm: Option<std::fs::File>,
    /// `/proc/TID/fdinfo/N` for the descriptor number the thread last had a socket injected
    /// at, kept open: the file is regenerated from whatever the thread's descriptor `N` is at
    /// each read from offset 0, and a client connecting again nearly always uses the same
    /// number. One pread instead of a path lookup, open, read and close, on the path of every
    /// injected socket.
    fdinfo: Mutex<Option<(i32, std::fs::File)>>,
    /// Its process's number in the VM's PID namespace, for the audit (looked up once).
    pid_in_vm: OnceLock<Option<i32>>,
}

impl KnownThread {
    /// The text of `/proc/TID/fdinfo/FD` now.
    fn fdinfo(&self, tid: u32, fd: i32) -> Option<String> {
        let mut last = self.fdinfo.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_none_or(|(n, _)| *n != fd) {
            *last = None;
            let file = std::fs::File::open(format!("/proc/{tid}/fdinfo/{fd}")).ok()?;
            *last = Some((fd, file));
        }
        let (_, file) = last.as_ref()?;
        let mut buf = [0u8; 512];
        let n = file.read_at(&mut buf, 0).ok()?;
        String::from_utf8(buf[..n].to_vec()).ok()
    }
}

/// Threads that made mediated calls lately, by thread id, so that a thread connecting again
/// (a client making a connection per transaction) costs one ioctl and one read instead of
/// opening, reading and closing two files.
#[derive(Debug, Default)]
pub struct CallerCache(Mutex<HashMap<u32, Arc<KnownThread>>>);

/// At most this many threads are kept (three descriptors each); the cache starts over when full.
const CACHED_THREADS: usize = 64;

impl CallerCache {
    /// The thread `tid` and its identity now: from the cache while that thread lives, else
    /// opened anew.
    fn identify(&self, tid: u32) -> Result<(Arc<KnownThread>, PidfdInfo), Errno> {
        let cached = self.lock().get(&tid).cloned();
        if let Some(thread) = cached {
            match process::pidfd_info(thread.pidfd.as_fd()) {
                Ok(id) => return Ok((thread, id)),
                // That thread exited; `tid` now names another one (or none).
                Err(Errno::ESRCH) => {
                    self.lock().remove(&tid);
                }
                Err(e) => return Err(e),
            }
        }
        let pidfd = process::pidfd_open_thread(tid as i32)?;
        let id = process::pidfd_info(pidfd.as_fd())?;
        let thread = Arc::new(KnownThread {
            pidfd,
            comm: std::fs::File::open(format!("/proc/{tid}/comm")).ok(),
            fdinfo: Mutex::new(None),
            pid_in_vm: OnceLock::new(),
        });
        let mut cache = self.lock();
        if cache.len() >= CACHED_THREADS {
            cache.clear();
        }
        cache.insert(tid, Arc::clone(&thread));
        Ok((thread, id))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<KnownThread>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StatusExtras {
    fn parse(status: &str) -> Option<StatusExtras> {
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
        Some(StatusExtras {
            threads: field("Threads:")?.trim().parse().ok()?,
            groups: field("Groups:")?
                .split_whitespace()
                .map(|g| g.parse())
                .collect::<Result<_, _>>()
                .ok()?,
        })
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
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub kind: i32,
}

impl CallerSocket {
    /// Duplicates descriptor `fd` of the caller. Check the notification is still valid
    /// afterwards: only then is the caller known to have been the one that made the call.
    pub fn of(caller: &CallerInfo, fd: i32) -> Result<CallerSocket, Errno> {
        let sock = unotify::duplicate_from(caller.thread.pidfd.as_fd(), fd)?;
        // ENOTSOCK for a descriptor that is not a socket.
        let kind = unotify::socket_type(sock.as_fd())?;
        Ok(CallerSocket {
            sock,
            kind: kind & 0xf,
        })
    }

    /// The socket's domain and protocol (read only when a socket like it is to be made).
    pub fn domain_and_protocol(&self) -> Result<(i32, i32), Errno> {
        unotify::socket_domain_and_protocol(self.sock.as_fd())
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
