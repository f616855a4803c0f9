//! Where a mediated call is carried out: another VM's namespaces (or the host's), entered by
//! one monitor thread at a time and left at once, under the caller's identity.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{
    connect, getsockopt, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockProtocol,
    SockType, SockaddrLike,
};
use nix::sys::stat::{fstat, Mode};
use nix::sys::time::TimeVal;
use shuttle_sys::unotify;

use super::caller::CallerInfo;
use super::housekeeper::Housekeeper;
use crate::cgroup::VmCgroup;
use crate::vm_api::{self, ApiContext};

/// A running VM that calls are carried into: its init, its root and the namespaces calls
/// need, opened once and checked to be that init's.
#[derive(Debug)]
pub(super) struct TargetVm {
    /// The init, whose pid the descriptors below were opened through.
    pidfd: OwnedFd,
    /// The VM's root directory (`O_PATH`), where unix paths are looked up. Holding it holds the
    /// VM's file system: [`Targets`] lets go of a stopped VM within a second.
    pub root: OwnedFd,
    net: OwnedFd,
    ipc: OwnedFd,
    pub net_inode: u64,
    /// Fresh sockets made in the target's network namespace ahead of need, by kind: entering
    /// the namespace and returning costs two setns(2) calls, so each visit makes a batch, and
    /// the housekeeper makes the next batch before the pool runs dry. They are plain new
    /// sockets, made by the monitor as any would be.
    spare_sockets: Mutex<HashMap<SocketKind, SparePool>>,
    /// The TCP options of a fresh socket in the target's network namespace, read once.
    pub tcp_defaults: OnceLock<Option<super::connect::TcpOptions>>,
}

#[derive(Debug, Default)]
struct SparePool {
    sockets: Vec<OwnedFd>,
    /// A refill was asked of the housekeeper and has not happened yet.
    refilling: bool,
}

/// Fresh sockets a pool is filled up to, and the level at which the housekeeper is asked to
/// fill it again (early enough that a client connecting in a loop does not find it empty).
const SPARE_SOCKETS: usize = 32;
const REFILL_BELOW: usize = 16;

/// Spares made in line when a pool is found empty (the housekeeper makes the rest): a one-off
/// connect does not leave thirty descriptors behind.
const SPARES_ON_DEMAND: usize = 3;

/// The most spare sockets one monitor holds, over all its targets and kinds: they are
/// descriptors, and running out of those would refuse calls.
const MAX_SPARES_HELD: usize = 256;

/// Spare sockets held now by this monitor's pools.
static SPARES_HELD: AtomicUsize = AtomicUsize::new(0);

/// A kind of socket: domain, type (with SOCK_NONBLOCK when wanted) and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct SocketKind {
    domain: i32,
    kind: i32,
    protocol: i32,
}

impl SocketKind {
    pub fn new(domain: i32, kind: i32, extra: SockFlag, protocol: i32) -> SocketKind {
        SocketKind {
            domain,
            kind: kind | extra.bits(),
            protocol,
        }
    }

    /// A new socket of this kind (close-on-exec), in the calling thread's network namespace.
    /// A kind the monitor cannot make fails here (EAFNOSUPPORT, EPROTOTYPE), before any is
    /// pooled.
    pub fn make(self) -> Result<OwnedFd, Errno> {
        let family = AddressFamily::from_i32(self.domain).ok_or(Errno::EAFNOSUPPORT)?;
        let flags = SockFlag::from_bits_truncate(self.kind) | SockFlag::SOCK_CLOEXEC;
        let kind = SockType::try_from(self.kind & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC))
            .map_err(|_| Errno::EPROTOTYPE)?;
        let proto = match self.protocol {
            p if p == libc::IPPROTO_TCP => Some(SockProtocol::Tcp),
            p if p == libc::IPPROTO_UDP => Some(SockProtocol::Udp),
            _ => None,
        };
        socket(family, kind, flags, proto)
    }
}

impl TargetVm {
    /// Whether the init still lives (then its pid cannot have been reused).
    pub fn alive(&self) -> bool {
        shuttle_sys::process::pidfd_send_signal(self.pidfd.as_fd(), 0).is_ok()
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, HashMap<SocketKind, SparePool>> {
        self.spare_sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new socket of `kind` in the target's network namespace: a spare one (and the
    /// housekeeper asked to make more when few are left), or, when none is left, one made now
    /// with a few spares (within the monitor's budget, `MAX_SPARES_HELD`).
    pub fn socket_in_network(
        self: &Arc<Self>,
        kind: SocketKind,
        housekeeper: &Housekeeper,
    ) -> Result<OwnedFd, Errno> {
        let spare = self.pools().get_mut(&kind).and_then(|p| p.sockets.pop());
        let now = match spare {
            Some(sock) => {
                SPARES_HELD.fetch_sub(1, Ordering::Relaxed);
                sock
            }
            None => {
                let mut made = self.make_in_network(kind, 1 + spares_allowed(SPARES_ON_DEMAND))?;
                let now = made.pop().ok_or(Errno::EMFILE)?;
                self.keep_spares(kind, made);
                now
            }
        };
        let mut pools = self.pools();
        let pool = pools.entry(kind).or_default();
        if pool.sockets.len() < REFILL_BELOW && !pool.refilling {
            pool.refilling = housekeeper.refill_later(Arc::clone(self), kind);
        }
        Ok(now)
    }

    /// Fills the pool of `kind` up (the housekeeper's chore).
    pub fn refill(&self, kind: SocketKind) {
        let have = self.pools().get(&kind).map_or(0, |p| p.sockets.len());
        let made = match spares_allowed(SPARE_SOCKETS.saturating_sub(have)) {
            0 => Vec::new(),
            n => self.make_in_network(kind, n).unwrap_or_default(),
        };
        self.keep_spares(kind, made);
        if let Some(pool) = self.pools().get_mut(&kind) {
            pool.refilling = false;
        }
    }

    fn keep_spares(&self, kind: SocketKind, spares: Vec<OwnedFd>) {
        SPARES_HELD.fetch_add(spares.len(), Ordering::Relaxed);
        self.pools().entry(kind).or_default().sockets.extend(spares);
    }

    /// Up to `n` (at least one) new sockets of `kind` in the target's network namespace. Only
    /// the first must be made: spares are a saving, not a need.
    fn make_in_network(&self, kind: SocketKind, n: usize) -> Result<Vec<OwnedFd>, Errno> {
        in_namespace(self, Namespace::Net, || {
            let mut made = vec![kind.make()?];
            made.extend((1..n).map_while(|_| kind.make().ok()));
            Ok(made)
        })
    }
}

impl Drop for TargetVm {
    fn drop(&mut self) {
        let held: usize = self.pools().values().map(|p| p.sockets.len()).sum();
        SPARES_HELD.fetch_sub(held, Ordering::Relaxed);
    }
}

/// How many of `wanted` more spare sockets the monitor's budget allows.
fn spares_allowed(wanted: usize) -> usize {
    wanted.min(MAX_SPARES_HELD.saturating_sub(SPARES_HELD.load(Ordering::Relaxed)))
}

/// The running VMs a monitor has carried calls into, by name. A sweeper thread (started with
/// the first) drops those whose init has exited every second, so that no monitor holds a
/// stopped VM's root and namespaces for longer, calls or not.
#[derive(Debug, Default)]
pub struct Targets {
    cache: Arc<Mutex<HashMap<String, Arc<TargetVm>>>>,
    sweeper: OnceLock<()>,
}

impl Targets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TargetVm>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sweep_every_second(&self) {
        self.sweeper.get_or_init(|| {
            let cache = Arc::clone(&self.cache);
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, t| t.alive());
            });
        });
    }
}

/// The running VM `name`, from the cache while its init lives, else looked up anew (a
/// restarted VM has a new init).
pub(super) fn running_vm(ctx: &ApiContext, name: &str) -> Option<Arc<TargetVm>> {
    let targets = &ctx.mediation.targets;
    let mut cache = targets.lock();
    if let Some(t) = cache.get(name) {
        if t.alive() {
            return Some(Arc::clone(t));
        }
    }
    // Let go of the namespaces of every VM that stopped.
    cache.retain(|_, t| t.alive());
    if !crate::store::is_running(&ctx.layout, name) {
        return None;
    }
    let cg = VmCgroup::existing(&ctx.layout.cgroup_parent(), name)?;
    let pid = cg.pids().into_iter().find(|p| vm_api::is_vm_init(*p))?;
    let pidfd = shuttle_sys::process::pidfd_open(pid).ok()?;
    let open_ns = |kind: &str| open_read_only(&format!("/proc/{pid}/ns/{kind}")).ok();
    let (net, ipc) = (open_ns("net")?, open_ns("ipc")?);
    let net_inode = unotify::namespace_inode(net.as_fd()).ok()?;
    let root = nix::fcntl::open(
        Path::new(&format!("/proc/{pid}/root")),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    // Until init has moved into the VM's root (pivot_root), its root is the host's: such a VM
    // is still starting, and nothing in it can be reached yet.
    let same = |a: &OwnedFd, b: &OwnedFd| matches!((fstat(a), fstat(b)), (Ok(x), Ok(y)) if (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino));
    if same(&root, super::address::host_root().ok()?) {
        return None;
    }
    let target = TargetVm {
        pidfd,
        root,
        net,
        ipc,
        net_inode,
        spare_sockets: Mutex::default(),
        tcp_defaults: OnceLock::new(),
    };
    // Checked after opening: everything above belonged to a process that was this VM's init
    // and, its pidfd says, still is (so the pid was not reused in between).
    if !vm_api::is_vm_init(pid) || !cg.contains_pid_in_any(pid) || !target.alive() {
        return None;
    }
    let target = Arc::new(target);
    cache.insert(name.to_owned(), Arc::clone(&target));
    targets.sweep_every_second();
    Some(target)
}

fn open_read_only(path: &str) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        Path::new(path),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Namespace {
    Net,
    Ipc,
}

/// The monitor's own namespaces, to return to.
fn home(ns: Namespace) -> Result<&'static OwnedFd, Errno> {
    static HOME: OnceLock<Result<(OwnedFd, OwnedFd), Errno>> = OnceLock::new();
    let home = HOME.get_or_init(|| {
        Ok((
            open_read_only("/proc/self/ns/net")?,
            open_read_only("/proc/self/ns/ipc")?,
        ))
    });
    match (home, ns) {
        (Ok((net, _)), Namespace::Net) => Ok(net),
        (Ok((_, ipc)), Namespace::Ipc) => Ok(ipc),
        (Err(e), _) => Err(*e),
    }
}

/// Runs `f` with this thread in namespace `ns` of `target`, then switches back. Both switches
/// apply to the calling thread alone.
pub(super) fn in_namespace<T>(
    target: &TargetVm,
    ns: Namespace,
    f: impl FnOnce() -> Result<T, Errno>,
) -> Result<T, Errno> {
    let (theirs, flag) = match ns {
        Namespace::Net => (&target.net, libc::CLONE_NEWNET),
        Namespace::Ipc => (&target.ipc, libc::CLONE_NEWIPC),
    };
    let home = home(ns)?;
    unotify::enter_namespace(theirs.as_fd(), flag)?;
    let result = f();
    if unotify::enter_namespace(home.as_fd(), flag).is_err() {
        tracing::error!(?ns, "cannot return to the monitor's own namespace; exiting");
        std::process::exit(70);
    }
    result
}

/// Runs `f` on this thread with the caller's effective uid and gid (so that permission checks
/// and SO_PEERCRED see the caller), then switches back.
///
/// Receiving threads hold no supplementary groups (see [`drop_supplementary_groups`]), so a
/// check never passes through a group of the monitor's. Reading the caller's own groups costs
/// a `/proc` read that most calls do not need: only when `f` fails with EACCES and the caller
/// has supplementary groups is it run again with them.
pub(super) fn as_caller<T>(
    caller: &CallerInfo,
    mut f: impl FnMut() -> Result<T, Errno>,
) -> Result<T, Errno> {
    if caller.uid == 0 && caller.gid == 0 {
        return f();
    }
    let once = |f: &mut dyn FnMut() -> Result<T, Errno>| {
        unotify::set_thread_effective_ids(caller.uid, caller.gid)?;
        let result = f();
        // Never keep working under the caller's identity: failing to switch back is fatal.
        if unotify::restore_thread_ids().is_err() {
            tracing::error!("cannot restore the monitor thread's credentials; exiting");
            std::process::exit(70);
        }
        result
    };
    match once(&mut f) {
        Err(Errno::EACCES) if !caller.supplementary_groups().is_empty() => {
            // Setting groups needs the monitor's own identity, so it comes between the tries.
            unotify::set_thread_groups(caller.supplementary_groups())?;
            let result = once(&mut f);
            drop_supplementary_groups();
            result
        }
        other => other,
    }
}

/// Leaves the calling thread without supplementary groups; every thread that acts for VM
/// processes starts with this. Failing is fatal: that thread could grant access through a
/// group of the monitor's.
pub(super) fn drop_supplementary_groups() {
    if let Err(e) = unotify::set_thread_groups(&[]) {
        tracing::error!(error = %e, "cannot drop the monitor thread's supplementary groups; exiting");
        std::process::exit(70);
    }
}

/// How long the monitor waits for a target to accept. Mediated calls share a few threads, so a
/// target whose backlog stays full must not hold them for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connect may wait before the mediator gives its turn at the listener to another
/// receiver (see `receive_forever`): a target that accepts at once never costs a hand-over.
const QUICK_CONNECT: Duration = Duration::from_millis(2);

/// connect(2) that gives up after [`CONNECT_TIMEOUT`] (ETIMEDOUT): a blocking connect bounded
/// by SO_SNDTIMEO, which TCP (the handshake) and unix sockets (a listener's full backlog) both
/// honour, so that the common case costs one call. A connect still waiting after
/// [`QUICK_CONNECT`] calls `release_turn` first. The socket's own timeout is restored.
pub(super) fn connect_bounded(
    sock: &OwnedFd,
    addr: &dyn SockaddrLike,
    release_turn: &dyn Fn(),
) -> Result<(), Errno> {
    let own_timeout = getsockopt(sock, sockopt::SendTimeout)?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let quick = TimeVal::new(0, QUICK_CONNECT.as_micros() as _);
    setsockopt(sock, sockopt::SendTimeout, &quick)?;
    let result = match connect(sock.as_raw_fd(), addr) {
        // A unix listener's backlog is full: nothing was started, so try again, for longer.
        Err(Errno::EAGAIN) => {
            release_turn();
            let rest = CONNECT_TIMEOUT - QUICK_CONNECT;
            setsockopt(
                sock,
                sockopt::SendTimeout,
                &TimeVal::new(rest.as_secs() as _, rest.subsec_micros() as _),
            )
            .and_then(|()| match connect(sock.as_raw_fd(), addr) {
                Err(Errno::EAGAIN) => Err(Errno::ETIMEDOUT),
                other => other,
            })
        }
        // The TCP handshake goes on (slow, or a signal came): wait for it here.
        Err(Errno::EINPROGRESS | Errno::EINTR) => {
            release_turn();
            wait_connected(sock, deadline)
        }
        other => other,
    };
    // Restoring the socket's own timeout cannot undo a connection made: a failure to restore
    // must not report a connected socket as failed.
    let restored = setsockopt(sock, sockopt::SendTimeout, &own_timeout);
    result.and(restored.or_else(|e| {
        tracing::warn!(error = %e, "cannot restore a mediated socket's send timeout");
        Ok(())
    }))
}

/// connect(2) on a non-blocking socket of the monitor's own, waited for as
/// [`connect_bounded`] waits: a handshake still going after [`QUICK_CONNECT`] calls
/// `release_turn` first, and one still going after [`CONNECT_TIMEOUT`] fails (ETIMEDOUT).
pub(super) fn connect_nonblocking(
    sock: &OwnedFd,
    addr: &dyn SockaddrLike,
    release_turn: &dyn Fn(),
) -> Result<(), Errno> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    match connect(sock.as_raw_fd(), addr) {
        Err(Errno::EINPROGRESS) => match wait_connected(sock, Instant::now() + QUICK_CONNECT) {
            Err(Errno::ETIMEDOUT) => {
                release_turn();
                wait_connected(sock, deadline)
            }
            other => other,
        },
        other => other,
    }
}

fn wait_connected(sock: &OwnedFd, deadline: Instant) -> Result<(), Errno> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
    let ready = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up: a wait of less than a millisecond must not become a poll that returns
        // at once.
        let ms = u16::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            // A signal for the monitor (its stop) came to this thread: the handshake goes on.
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    match ready {
        0 => Err(Errno::ETIMEDOUT),
        // Connected, nothing wrong: no need to ask for the error.
        _ if fds[0].revents() == Some(PollFlags::POLLOUT) => Ok(()),
        _ => match getsockopt(sock, sockopt::SocketError)? {
            0 => Ok(()),
            e => Err(Errno::from_raw(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_sockets_stay_within_the_monitors_budget() {
        SPARES_HELD.store(0, Ordering::Relaxed);
        assert_eq!(spares_allowed(5), 5);
        SPARES_HELD.store(MAX_SPARES_HELD - 2, Ordering::Relaxed);
        assert_eq!(spares_allowed(5), 2);
        SPARES_HELD.store(MAX_SPARES_HELD, Ordering::Relaxed);
        assert_eq!(spares_allowed(5), 0);
        SPARES_HELD.store(0, Ordering::Relaxed);
    }

    #[test]
    fn a_connect_nobody_answers_is_refused_and_one_answered_completes() {
        use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
        let kind = SocketKind::new(
            libc::AF_INET,
            libc::SOCK_STREAM,
            SockFlag::SOCK_NONBLOCK,
            libc::IPPROTO_TCP,
        );
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("{e}"));
        let open = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let addr = |port| nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, port);
        let sock = kind.make().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            connect_nonblocking(&sock, &addr(open.port()), &|| ()),
            Ok(())
        );
        // A port nobody listens on (the listener's, once closed).
        drop(listener);
        let sock = kind.make().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            connect_nonblocking(&sock, &addr(open.port()), &|| ()),
            Err(Errno::ECONNREFUSED)
        );
    }
}
