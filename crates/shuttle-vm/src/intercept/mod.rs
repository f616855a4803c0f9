//! The VM's mediated system calls, answered by its monitor (seccomp user notification).
//!
//! Every `connect`, every `sendto`/`sendmsg` that names a destination, every `sendmmsg` and
//! every `mq_open` made in the VM stops here. Most stay inside the VM: no rule publishes their
//! address, so the call continues unchanged (counted, not logged) and resolves in the VM's own
//! namespaces, exactly as without Shuttle. When the policy routes the address to another VM
//! and allows it, the monitor carries the call out itself, in the target VM's namespaces, on
//! its own copy of the arguments, as the caller's uid and gid (so the server's SO_PEERCRED
//! names the caller), and injects the resulting descriptor into the caller. After that the
//! kernel carries the data: Shuttle is out of the path. Denials are audited and the call
//! resolves locally, so the caller sees what it would see without Shuttle. Any error on the
//! cross-VM path refuses the call: fail closed.
//!
//! # Lent sockets
//!
//! A socket connected to a TCP or UDP port or an abstract name of another VM must live in that
//! VM's network namespace, and a socket keeps its namespace wherever its descriptor goes. Such
//! a *lent* socket must never be re-aimed at anything else there, and a call that continues
//! uses whatever socket the caller's descriptor number names at that moment (another of its
//! threads can swap it after our check). So:
//! * a lent socket is always connected and bound: stream sockets then refuse any new
//!   `connect` (EISCONN), and disconnecting (`AF_UNSPEC`) is carried out here, on the very
//!   socket checked, and refused for lent ones;
//! * once a VM holds a lent *datagram* socket (which `connect` and named sends could re-aim),
//!   every call whose address means something in a network namespace is checked against the
//!   socket it names, and continues only when that socket is the VM's own and nothing can swap
//!   it (the caller has one thread; sharing a descriptor table outside a thread group is
//!   refused by the seccomp filter). Otherwise the monitor performs the call on the socket it
//!   checked.

mod address;
mod caller;
mod connect;
mod datagram;
mod housekeeper;
mod mq;
mod target;

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use shuttle_audit::{AuditRecord, Outcome};
use shuttle_policy::{Action, Op, Policy, Request, Target, VmIdentity};
use shuttle_sys::unotify::{self, Notification};

pub use target::Targets;

use crate::vm_api::{self, ApiContext};
use address::Destination;

/// What the mediation of one VM remembers between calls.
#[derive(Debug, Default)]
pub struct MediationState {
    /// Target VMs the monitor has carried calls into.
    pub targets: Targets,
    /// The VM's own network namespace (inode), to tell its sockets from lent ones; 0 when
    /// unknown, which makes every socket look lent (fail closed).
    pub own_netns: u64,
    /// Threads that made mediated calls lately.
    pub callers: caller::CallerCache,
    /// Closes what calls leave behind, and makes sockets ahead of need.
    housekeeper: housekeeper::Housekeeper,
    /// The VM's PID namespace, to name callers in the audit as the VM knows them.
    vm_pidns: Option<OwnedFd>,
    /// Whether the VM has ever been lent a datagram socket (see the module documentation).
    lent_datagram_sockets: AtomicBool,
    /// What became of the intercepted calls (shown by `shuttle vm ls --json`).
    pub counts: Arc<Counts>,
}

/// Intercepted calls by outcome: ordinary intra-VM traffic is counted, not logged.
#[derive(Debug, Default)]
pub struct Counts {
    local: AtomicU64,
    crossed: AtomicU64,
    refused: AtomicU64,
}

impl Counts {
    pub fn snapshot(&self) -> shuttle_proto::InterceptCounts {
        shuttle_proto::InterceptCounts {
            local: self.local.load(Ordering::Relaxed),
            crossed: self.crossed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

impl MediationState {
    pub fn new(init_pid: i32) -> MediationState {
        use std::os::unix::fs::MetadataExt;
        MediationState {
            own_netns: std::fs::metadata(format!("/proc/{init_pid}/ns/net"))
                .map(|m| m.ino())
                .unwrap_or(0),
            vm_pidns: std::fs::File::open(format!("/proc/{init_pid}/ns/pid"))
                .ok()
                .map(OwnedFd::from),
            ..MediationState::default()
        }
    }

    fn vm_pidns(&self) -> Option<BorrowedFd<'_>> {
        self.vm_pidns.as_ref().map(|fd| fd.as_fd())
    }

    fn holds_lent_datagram_sockets(&self) -> bool {
        self.lent_datagram_sockets.load(Ordering::Acquire)
    }

    fn note_lent_datagram_socket(&self) {
        self.lent_datagram_sockets.store(true, Ordering::Release);
    }
}

/// Serves the VM's notifications until the listener fails (the VM is gone).
pub fn serve(listener: OwnedFd, ctx: Arc<ApiContext>) {
    let listener = Arc::new(listener);
    if let Err(e) = unotify::prefer_synchronous_wakeups(listener.as_fd()) {
        // Kernels before 6.6: correct, only slower (two cross-CPU wake-ups per call).
        tracing::info!(error = %e, "synchronous seccomp wake-ups unavailable");
    }
    let mediators = Arc::new(Mediators {
        receiving: Mutex::new(()),
        receivers: AtomicUsize::new(1),
        away: AtomicUsize::new(0),
        listener: Arc::clone(&listener),
        ctx: Arc::clone(&ctx),
    });
    receive_forever(&listener, &ctx, &mediators);
}

/// Receives and answers notifications until the listener fails (the VM is gone).
///
/// One receiver at a time waits on the listener (it holds its *turn*, `Mediators::receiving`):
/// the kernel wakes every thread waiting there for each notification, so several waiting
/// receivers would all be woken, onto the caller's CPU, for every call. A receiver gives its
/// turn up only before it may wait (on a slow target, or an operator's answer), so a mediated
/// call that does not wait costs no hand-over either.
fn receive_forever(listener: &OwnedFd, ctx: &ApiContext, mediators: &Arc<Mediators>) {
    target::drop_supplementary_groups();
    loop {
        let turn = mediators
            .receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = match unotify::receive(listener.as_fd()) {
            Ok(n) => n,
            // The caller died before we could read the notification.
            Err(Errno::ENOENT) => continue,
            Err(e) => {
                tracing::debug!(vm = %ctx.vm, error = %e, "notification listener closed");
                return;
            }
        };
        let call = Call {
            listener: listener.as_fd(),
            ctx,
            n,
            turn: RefCell::new(Some(turn)),
            mediators,
            away: Cell::new(false),
        };
        match i64::from(n.nr) {
            libc::SYS_connect => connect::on_connect(&call),
            libc::SYS_sendto => datagram::on_sendto(&call),
            libc::SYS_sendmsg => datagram::on_sendmsg(&call),
            libc::SYS_sendmmsg => datagram::on_sendmmsg(&call),
            libc::SYS_mq_open => mq::on_mq_open(&call),
            // The filter sends nothing else; continuing is what the VM would get without us.
            _ => call.stay_local(),
        }
        if call.away.get() {
            mediators.away.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One intercepted call, and the listener that answers it.
pub(super) struct Call<'a> {
    listener: BorrowedFd<'a>,
    ctx: &'a ApiContext,
    n: Notification,
    /// The receiving thread's turn at the listener (see [`receive_forever`]).
    turn: RefCell<Option<MutexGuard<'a, ()>>>,
    mediators: &'a Arc<Mediators>,
    /// Whether this thread gave its turn up to wait (and so counts as away).
    away: Cell<bool>,
}

impl Call<'_> {
    /// Lets another receiver take the listener: call before anything that may wait.
    fn release_turn(&self) {
        if self.turn.borrow_mut().take().is_some() {
            self.away.set(true);
            self.mediators.going_away();
        }
    }

    fn arg(&self, i: usize) -> u64 {
        self.n.args[i]
    }

    /// Lets the call run unchanged in the caller's own namespaces. Only for calls that stay in
    /// the caller's VM: a caller that rewrites its arguments after our check still reaches
    /// only what its own namespaces reach (see the module documentation for sockets).
    fn stay_local(&self) {
        self.count(|c| &c.local);
        let _ = unotify::allow_to_continue(self.listener, self.n.id);
    }

    fn count(&self, which: impl FnOnce(&Counts) -> &AtomicU64) {
        which(&self.ctx.mediation.counts).fetch_add(1, Ordering::Relaxed);
    }

    /// Completes a cross-VM call the monitor carried out.
    fn crossed(&self, result: i64) {
        self.count(|c| &c.crossed);
        self.answer(Ok(result));
    }

    fn answer(&self, result: Result<i64, Errno>) {
        let _ = unotify::complete(self.listener, self.n.id, result);
    }

    /// Whether the caller still waits for this call: check after every read of its memory or
    /// /proc, or its pid could have been reused in between.
    fn still_pending(&self) -> bool {
        unotify::id_valid(self.listener, self.n.id)
    }

    /// Copies `len` bytes of the caller's memory. `Err` if unreadable (the kernel would fail
    /// the call with EFAULT); `Ok(None)` if the call is gone (nothing left to answer).
    fn read(&self, addr: u64, len: usize) -> Result<Option<Vec<u8>>, Errno> {
        let bytes = unotify::read_memory(self.n.pid, addr, len)?;
        if !self.still_pending() {
            return Ok(None);
        }
        if bytes.len() < len {
            return Err(Errno::EFAULT);
        }
        Ok(Some(bytes))
    }

    /// Refuses the call with `errno`, audited as an error for `why`.
    fn refuse(&self, mut record: AuditRecord, why: &str, errno: Errno) {
        self.count(|c| &c.refused);
        record.result = Outcome::Error;
        record.reason = Some(why.to_owned());
        let _ = vm_api::journal(self.ctx, &record);
        self.answer(Err(errno));
    }

    fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.ctx.policy.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn record(&self, op: &str, object: &str, caller: &caller::CallerInfo) -> AuditRecord {
        AuditRecord {
            time: shuttle_audit::now_unix_nanos(),
            op: op.into(),
            from: self.ctx.vm.clone(),
            to: None,
            object: object.to_owned(),
            result: Outcome::Deny,
            rule: None,
            caller: caller.audit(),
            reason: None,
            seq: 0,
        }
    }

    /// Whether no rule routes `dest` across VMs for this VM: nothing publishes it, or this
    /// VM serves it itself and no rule routes it elsewhere (a server's own connections).
    fn stays_local(&self, policy: &Policy, op: Op, dest: &Destination) -> bool {
        let from = VmIdentity::vm(&self.ctx.vm, &self.ctx.tags);
        dest.candidate_objects().iter().all(|o| {
            !policy.publishes(op, o)
                || (serves(policy, op, o, &self.ctx.vm)
                    && policy.route(&Request::new(op, from, o)).is_none())
        })
    }
}

/// Mediation runs on the thread that received the call: no hand-off between threads, which
/// would cost a wake-up and a cold cache on every mediated call. So that a slow target never
/// holds up the VM's other calls, a mediator about to wait gives up its turn at the listener,
/// and when every receiver is away waiting, another one starts (most VMs never need a second).
pub(super) struct Mediators {
    /// Held by the one receiver waiting on the listener (see [`receive_forever`]).
    receiving: Mutex<()>,
    /// Receiver threads started, and how many of them are away (gave their turn up to wait).
    receivers: AtomicUsize,
    away: AtomicUsize,
    listener: Arc<OwnedFd>,
    ctx: Arc<ApiContext>,
}

/// The most receiver threads one VM gets: this many targets slow at once (each given up on
/// after 5 s, an `ask` after its timeout) delay the VM's other calls until one returns.
const MAX_RECEIVERS: usize = 16;

impl Mediators {
    /// A receiver gave up its turn to wait: if no receiver is left to take it, start one.
    fn going_away(self: &Arc<Self>) {
        self.away.fetch_add(1, Ordering::SeqCst);
        loop {
            let started = self.receivers.load(Ordering::SeqCst);
            if self.away.load(Ordering::SeqCst) < started || started >= MAX_RECEIVERS {
                return;
            }
            let more = started + 1;
            if self
                .receivers
                .compare_exchange(started, more, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                let me = Arc::clone(self);
                std::thread::spawn(move || receive_forever(&me.listener, &me.ctx, &me));
            }
        }
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
    call: &Call<'_>,
    policy: &'p Policy,
    op: Op,
    object: &str,
    mut record: AuditRecord,
) -> Judgement<'p> {
    let ctx = call.ctx;
    let local_after = |record: AuditRecord| {
        ctx.mediation.counts.refused.fetch_add(1, Ordering::Relaxed);
        if vm_api::journal(ctx, &record) {
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
            // An operator may take a while to answer.
            call.release_turn();
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
fn serves(policy: &Policy, op: Op, object: &str, vm: &str) -> bool {
    policy.rules().iter().any(|r| {
        r.op() == op
            && r.object().matches(object)
            && matches!(r.target(), Some(Target::Vm(t)) if &**t == vm)
    })
}

/// Where an allowed request goes: the rule's target, possibly with the address translated.
struct Route {
    dest: Destination,
    /// `None` for the host.
    target: Option<Arc<target::TargetVm>>,
}

/// Works out [`Route`] for an allowed request, or why it cannot be carried out.
fn route(
    ctx: &ApiContext,
    decision: &shuttle_policy::Decision<'_>,
    target: Option<&Target>,
    dest: Destination,
) -> Result<Route, String> {
    let translated = decision.rule.and_then(|r| match &r.params().op {
        shuttle_policy::OpParams::Connect { target } => target.clone(),
        _ => None,
    });
    let dest = match translated.as_deref() {
        Some(t) => dest.translated(t)?,
        None => dest,
    };
    let target = match target {
        Some(Target::Vm(name)) => {
            Some(target::running_vm(ctx, name).ok_or_else(|| format!("VM {name} is not running"))?)
        }
        Some(Target::Host) => None,
        None => return Err("the rule names no single target".into()),
    };
    Ok(Route { dest, target })
}

/// Continues a call on a socket whose address means something in a network namespace, once
/// that is safe (see the module documentation). Returns the socket back when the monitor must
/// carry the call out itself (the VM's own socket, but a caller with several threads).
fn stay_local_on<'s>(
    call: &Call<'_>,
    info: &caller::CallerInfo,
    sock: &'s caller::CallerSocket,
    op: &str,
) -> Option<&'s caller::CallerSocket> {
    let state = &call.ctx.mediation;
    if sock.netns().ok() != Some(state.own_netns) || state.own_netns == 0 {
        // A lent socket: it reaches another VM's network, and nothing but what a rule routed.
        let record = call.record(op, "(a socket connected across VMs)", info);
        call.refuse(
            record,
            "a socket Shuttle connected to another VM cannot be aimed anywhere else",
            Errno::EISCONN,
        );
        return None;
    }
    if !state.holds_lent_datagram_sockets() || info.single_threaded() {
        call.stay_local();
        return None;
    }
    Some(sock)
}
