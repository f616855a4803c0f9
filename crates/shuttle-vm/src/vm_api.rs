//! The API a VM's processes reach at `/run/shuttle/broker.sock`, served by the VM's own
//! monitor.
//!
//! Identity comes from the socket: the monitor bound this listener for exactly one VM and
//! bind-mounted it into that VM only, so whatever arrives on it comes from that VM, whatever
//! the request says. Decisions use the monitor's copy of the last loaded policy, so they keep
//! working while the broker is down; each is written to the VM's audit journal *before*
//! it takes effect (and synced right behind, see [`crate::audit_log`]), and a journal that
//! cannot be written refuses the request.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::thread;

use nix::sys::socket::{accept4, getsockopt, sockopt, SockFlag};
use shuttle_audit::{AuditRecord, Caller, Outcome, RuleRef};
use shuttle_policy::{Action, Op, Policy, Request, Signal, VmIdentity};
use shuttle_proto::{
    BrokerReply, BrokerRequest, Channel, ChannelError, Hello, PolicyText, Question, VmReply,
    VmRequest, PROTOCOL_VERSION,
};

use crate::audit_log::VmJournal;
use crate::cgroup::VmCgroup;
use crate::layout::Layout;
use crate::store;

/// The policy a monitor enforces: swapped whole on every load, read without blocking loads.
pub type SharedPolicy = Arc<RwLock<Arc<Policy>>>;

/// Why the active policy's sources could not all be read. Never worked around by leaving a
/// source out: a layer may hold deny rules that a later layer's allow would otherwise get
/// past, so a partial policy can be wider than the whole.
#[derive(Debug, thiserror::Error)]
pub enum PolicyReadError {
    #[error(
        "cannot read policy source {path}: {message}; restore or remove it (a system's layer \
         goes with `shuttle down MANIFEST`) and try again"
    )]
    Read { path: String, message: String },
}

fn read_error(path: &Path, message: impl std::fmt::Display) -> PolicyReadError {
    PolicyReadError::Read {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The policy last loaded with `policy load`, if any. Only a missing file means "none".
pub fn read_loaded_policy(layout: &Layout) -> Result<Option<PolicyText>, PolicyReadError> {
    let path = layout.active_policy();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_error(&path, e)),
    };
    // The source's name is only used in messages: a missing one falls back to the path.
    let source = std::fs::read_to_string(layout.active_policy_source())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| path.display().to_string());
    Ok(Some(PolicyText { source, text }))
}

/// The names of the layers in `state/policy/layers/`, in the order they apply (by name).
/// Anything there that is not a layer file (`NAME.json`) or a temporary file of a write in
/// progress is an error rather than skipped.
pub fn layer_names(layout: &Layout) -> Result<Vec<String>, PolicyReadError> {
    let dir = layout.policy_layers_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_error(&dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| read_error(&dir, e))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            return Err(read_error(&entry.path(), "not a policy layer file name"));
        };
        if file_name.contains(".tmp-") {
            continue;
        }
        match file_name.strip_suffix(".json") {
            Some(name) if shuttle_policy::is_valid_vm_name(name) => names.push(name.to_owned()),
            _ => return Err(read_error(&entry.path(), "not a policy layer file name")),
        }
    }
    names.sort();
    Ok(names)
}

/// The file of layer `name`.
pub fn layer_file(layout: &Layout, name: &str) -> std::path::PathBuf {
    layout.policy_layers_dir().join(format!("{name}.json"))
}

/// The sources of layer `name`.
pub fn read_layer(layout: &Layout, name: &str) -> Result<Vec<PolicyText>, PolicyReadError> {
    let path = layer_file(layout, name);
    let bytes = std::fs::read(&path).map_err(|e| read_error(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| read_error(&path, e))
}

/// The active policy's sources, grouped: the loaded policy (if any), then each layer by
/// name with its sources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActiveSources {
    pub loaded: Option<PolicyText>,
    pub layers: Vec<(String, Vec<PolicyText>)>,
}

impl ActiveSources {
    /// Every source in the order monitors use.
    pub fn parts(&self) -> Vec<PolicyText> {
        self.loaded
            .iter()
            .cloned()
            .chain(self.layers.iter().flat_map(|(_, p)| p.iter().cloned()))
            .collect()
    }
}

/// Reads the active policy's sources, all of them or none (see [`PolicyReadError`]).
pub fn read_active_sources(layout: &Layout) -> Result<ActiveSources, PolicyReadError> {
    let loaded = read_loaded_policy(layout)?;
    let layers = layer_names(layout)?
        .into_iter()
        .map(|name| read_layer(layout, &name).map(|parts| (name, parts)))
        .collect::<Result<_, _>>()?;
    Ok(ActiveSources { loaded, layers })
}

/// The sources of the active policy, in order: the policy last loaded with `policy load`
/// (if any), then each layer of `state/policy/layers/` by name. A source that cannot be read
/// is an error, never left out.
pub fn active_policy_parts(layout: &Layout) -> Result<Vec<PolicyText>, PolicyReadError> {
    read_active_sources(layout).map(|s| s.parts())
}

/// Parses policy sources in order (see [`Policy::parse_layered`]).
pub fn parse_parts(parts: &[PolicyText]) -> Result<Policy, shuttle_policy::PolicyErrors> {
    let pairs: Vec<(&str, &str)> = parts
        .iter()
        .map(|p| (p.source.as_str(), p.text.as_str()))
        .collect();
    Policy::parse_layered(&pairs)
}

/// Builds the active policy from disk, or says why it cannot (a source unreadable or invalid).
pub fn build_active_policy(layout: &Layout) -> Result<Policy, String> {
    let parts = active_policy_parts(layout).map_err(|e| e.to_string())?;
    if parts.is_empty() {
        return Ok(Policy::empty("(no policy loaded)"));
    }
    parse_parts(&parts).map_err(|e| format!("{e}\nthe active policy is invalid"))
}

/// Reads the active policy for a monitor that is starting. Nothing loaded means no rules
/// (everything cross-VM denied). A policy that cannot be built whole — a source unreadable or
/// invalid — also means no rules: a starting monitor has no last good policy to keep, and
/// every part of a policy could be narrowing the rest, so any subset might be wider than the
/// whole. The broker refuses to start a VM while this is so (see its `VmStart`), so this is
/// the backstop for a file damaged in between.
pub fn load_active_policy(layout: &Layout) -> Arc<Policy> {
    match build_active_policy(layout) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            tracing::error!(error = %e, "the active policy cannot be built; denying everything");
            Arc::new(Policy::empty(&layout.active_policy().display().to_string()))
        }
    }
}

#[derive(Debug)]
pub struct ApiContext {
    pub layout: Layout,
    pub vm: String,
    /// The VM's init, on the host (the monitor's own child: its pid cannot be reused while
    /// the monitor serves).
    pub init_pid: i32,
    pub tags: Vec<String>,
    pub policy: SharedPolicy,
    pub journal: Arc<VmJournal>,
    /// What mediated calls remember between calls (see [`crate::intercept`]).
    pub mediation: crate::intercept::MediationState,
    /// The VM's invoke stubs (see [`crate::stubs`]).
    pub stubs: Option<Arc<crate::stubs::Stubs>>,
}

/// The most API connections (and so host threads) one VM may hold open at once: each
/// invocation holds one while its program runs. One more is answered with an error and closed.
pub const MAX_API_CONNECTIONS: usize = 128;

/// One open API connection, counted while it lives.
struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Accepts connections from inside the VM, one thread each, at most
/// [`MAX_API_CONNECTIONS`] at once. Returns when accept fails for good (the listener was
/// closed).
pub fn serve(listener: OwnedFd, ctx: Arc<ApiContext>) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (refusals, refused) = std::sync::mpsc::sync_channel::<Channel>(32);
    let vm = ctx.vm.clone();
    thread::spawn(move || {
        // The peer's hello is read first (waiting at most 200 ms): a socket closed with
        // unread data resets the connection, and the peer would see that, not the reason.
        let message = format!(
            "VM {vm} has {MAX_API_CONNECTIONS} connections to Shuttle open already (the most at \
             once): try again when some invocations have ended"
        );
        for chan in refused {
            let timeout = nix::sys::time::TimeVal::new(0, 200_000);
            let _ = nix::sys::socket::setsockopt(&chan.as_fd(), sockopt::ReceiveTimeout, &timeout);
            let _ = nix::sys::socket::setsockopt(&chan.as_fd(), sockopt::SendTimeout, &timeout);
            let _ = chan.recv_with_fds::<VmRequest>();
            let _ = chan.send(&VmReply::Failed {
                message: message.clone(),
            });
        }
    });
    loop {
        let fd = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            Err(e) => {
                tracing::error!(error = %e, "VM API accept failed");
                return;
            }
        };
        let Some(fd) = shuttle_sys::fdpass::own_accepted(fd) else {
            continue;
        };
        let chan = Channel::from_fd(fd);
        if open.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_API_CONNECTIONS {
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(vm = %ctx.vm, "VM API connection refused: too many open");
            // Told why by one thread of its own; when that one is busy, just closed.
            let _ = refusals.try_send(chan);
            continue;
        }
        let counted = Counted(Arc::clone(&open));
        let ctx = Arc::clone(&ctx);
        thread::spawn(move || {
            let _counted = counted;
            if let Err(e) = handle(&ctx, &chan) {
                tracing::debug!(vm = %ctx.vm, error = %e, "VM API connection ended");
            }
        });
    }
}

fn handle(ctx: &ApiContext, chan: &Channel) -> Result<(), ChannelError> {
    // Who is calling, from the kernel: pid (host view) and uid of the connecting process.
    let cred = getsockopt(&chan.as_fd(), sockopt::PeerCredentials).ok();
    let caller = Caller {
        pid_in_vm: cred.and_then(|c| pid_in_vm(c.pid())),
        pid_on_host: cred.map(|c| c.pid()),
        uid: cred.map(|c| c.uid()),
        program: cred
            .and_then(|c| std::fs::read_to_string(format!("/proc/{}/comm", c.pid())).ok())
            .map(|s| s.trim().to_owned()),
    };
    // A connection that never says hello must not hold one of the VM's few API connections
    // (see `MAX_API_CONNECTIONS`) for ever: it has ten seconds.
    let hello_within = nix::sys::time::TimeVal::new(10, 0);
    let no_limit = nix::sys::time::TimeVal::new(0, 0);
    nix::sys::socket::setsockopt(&chan.as_fd(), sockopt::ReceiveTimeout, &hello_within)
        .map_err(ChannelError::Socket)?;
    let hello = chan.recv::<VmRequest>()?;
    // Invocations keep the connection for as long as their program runs: no limit after.
    nix::sys::socket::setsockopt(&chan.as_fd(), sockopt::ReceiveTimeout, &no_limit)
        .map_err(ChannelError::Socket)?;
    match hello {
        VmRequest::Hello(Hello { version }) if version == PROTOCOL_VERSION => {
            chan.send(&VmReply::Hello {
                version: PROTOCOL_VERSION,
                vm: ctx.vm.clone(),
            })?
        }
        VmRequest::Hello(Hello { version }) => {
            return Err(ChannelError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            })
        }
        _ => return Err(ChannelError::Unexpected("request before hello".into())),
    }
    loop {
        let reply = match chan.recv_with_fds::<VmRequest>() {
            // An invocation takes the connection over until its program ends.
            Ok((VmRequest::Invoke(spec), fds)) => {
                let ids = cred.map(|c| (c.uid(), c.gid()));
                return crate::invoke::serve(ctx, chan, &caller, ids, spec, fds);
            }
            Ok((_, fds)) if !fds.is_empty() => {
                let _ = chan.send(&VmReply::Failed {
                    message: "descriptors came with a request that takes none".into(),
                });
                return Err(ChannelError::Unexpected("unexpected descriptors".into()));
            }
            Ok((
                VmRequest::Signal {
                    vm,
                    program,
                    signal,
                },
                _,
            )) => signal_request(ctx, &caller, &vm, &program, signal),
            Ok((VmRequest::InvokeSignal { .. } | VmRequest::InvokeFiles { .. }, _)) => {
                VmReply::Failed {
                    message: "nothing was invoked on this connection".into(),
                }
            }
            Ok((VmRequest::Hello(_), _)) => VmReply::Failed {
                message: "hello twice".into(),
            },
            Err(ChannelError::Disconnected) => return Ok(()),
            Err(e) => {
                let _ = chan.send(&VmReply::Failed {
                    message: format!("bad request: {e}"),
                });
                return Err(e);
            }
        };
        chan.send(&reply)?;
    }
}

/// Whether `rule` is one of `policy`'s own (a rule names its source file itself; a policy
/// may be made of several).
fn from_policy(policy: &Policy, rule: &shuttle_policy::Rule) -> bool {
    policy
        .rules()
        .get(rule.position())
        .is_some_and(|r| std::ptr::eq(r, rule))
}

pub(crate) fn rule_ref(policy: &Policy, rule: &shuttle_policy::Rule) -> RuleRef {
    debug_assert!(from_policy(policy, rule), "a rule of another policy");
    let loc = rule.location();
    RuleRef {
        index: rule.number().saturating_sub(1),
        name: rule.name().map(str::to_owned),
        file: rule.source().to_owned(),
        line: loc.line,
        column: loc.column,
    }
}

/// Records `record` before the decision takes effect (see [`crate::audit_log`]); false when
/// that failed (the caller must refuse).
pub(crate) fn journal(ctx: &ApiContext, record: &AuditRecord) -> bool {
    ctx.journal.record(&ctx.vm, record)
}

fn signal_request(
    ctx: &ApiContext,
    caller: &Caller,
    target: &str,
    program: &str,
    signal: i32,
) -> VmReply {
    let mut record = AuditRecord {
        time: shuttle_audit::now_unix_nanos(),
        op: "signal".into(),
        from: ctx.vm.clone(),
        to: Some(target.to_owned()),
        object: program.to_owned(),
        result: Outcome::Deny,
        rule: None,
        caller: caller.clone(),
        reason: None,
        seq: 0,
    };
    let refuse = |record: AuditRecord, message: String| {
        if journal(ctx, &record) {
            VmReply::Denied { message }
        } else {
            VmReply::Failed {
                message: "the audit journal cannot be written: refused".into(),
            }
        }
    };
    // Malformed requests are refused (and audited) before the policy sees them.
    let sig = Signal::from_number(signal);
    let valid_program = !program.is_empty() && program.len() <= 4096 && !program.contains('\0');
    if crate::config::validate_name(target).is_err() || sig.is_none() || !valid_program {
        record.reason = Some("malformed request".into());
        return refuse(
            record,
            format!("invalid signal request (vm {target:?}, signal {signal}, program {program:?})"),
        );
    }
    let target_tags = store::load(&ctx.layout, target)
        .map(|c| c.tags)
        .unwrap_or_default();
    let policy = ctx.policy.read().unwrap_or_else(|e| e.into_inner()).clone();
    let req = Request::new(Op::Signal, VmIdentity::vm(&ctx.vm, &ctx.tags), program)
        .to(VmIdentity::vm(target, &target_tags))
        .signal(sig.expect("checked above"));
    let decision = policy.decide(&req);
    record.rule = decision.rule.map(|r| rule_ref(&policy, r));
    match decision.action {
        Action::Allow => {}
        Action::Deny => {
            record.reason = Some(match decision.rule {
                Some(r) => format!("denied by {}", r.label()),
                None => "no rule matched: default deny".into(),
            });
            return refuse(
                record,
                format!("signal to {program} in VM {target} denied by policy"),
            );
        }
        Action::Ask => {
            let rule = decision.rule.expect("an ask decision comes from a rule");
            let (allow, how) = ask(ctx, &policy, rule, &record);
            record.result = if allow {
                Outcome::AskAllow
            } else {
                Outcome::AskDeny
            };
            record.reason = Some(how.clone());
            if !allow {
                return refuse(
                    record,
                    format!("signal to {program} in VM {target} was not approved: {how}"),
                );
            }
        }
    }
    // Allowed: find the target's processes first, so that what is journaled is what happens.
    let targets = match processes_running(&ctx.layout, target, program) {
        Ok(t) => t,
        Err(message) => {
            record.result = Outcome::Error;
            record.reason = Some(message.clone());
            return if journal(ctx, &record) {
                VmReply::Failed { message }
            } else {
                VmReply::Failed {
                    message: "the audit journal cannot be written: refused".into(),
                }
            };
        }
    };
    if record.result != Outcome::AskAllow {
        record.result = Outcome::Allow;
    }
    let approval = record
        .reason
        .take()
        .map(|r| format!("; {r}"))
        .unwrap_or_default();
    record.reason = Some(format!("{} matching process(es){approval}", targets.len()));
    if !journal(ctx, &record) {
        return VmReply::Failed {
            message: "the audit journal cannot be written: refused".into(),
        };
    }
    let mut count = 0;
    for pidfd in &targets {
        if shuttle_sys::process::pidfd_send_signal(pidfd.as_fd(), signal).is_ok() {
            count += 1;
        }
    }
    VmReply::Signalled { count }
}

/// Pidfds of the processes of VM `vm` whose program is `program`: an absolute path matches
/// argv\[0\]; a name matches `comm` or argv\[0\]'s last component. The VM's init never matches.
fn processes_running(layout: &Layout, vm: &str, program: &str) -> Result<Vec<OwnedFd>, String> {
    let cgroup = VmCgroup::existing(&layout.cgroup_parent(), vm)
        .filter(|_| store::is_running(layout, vm))
        .ok_or_else(|| format!("VM {vm} is not running"))?;
    let mut found = Vec::new();
    for pid in cgroup.pids() {
        let Ok(pidfd) = shuttle_sys::process::pidfd_open(pid) else {
            continue;
        };
        // Checked after opening the pidfd: if `pid` was reused meanwhile, the check reads the
        // new process and the pidfd refers to it too, or the old one is gone (ESRCH later).
        if !cgroup.contains_pid_in_any(pid) || is_vm_init(pid) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let argv0 = String::from_utf8_lossy(argv0);
        let matches = if program.starts_with('/') {
            argv0 == program
        } else {
            comm.trim() == program
                || Path::new(argv0.as_ref())
                    .file_name()
                    .is_some_and(|n| n == program)
        };
        if matches {
            found.push(pidfd);
        }
    }
    Ok(found)
}

/// Whether host pid `pid` is PID 1 of its PID namespace (a VM's init).
pub(crate) fn is_vm_init(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .map(|v| v.split_whitespace().last() == Some("1"))
        })
        .unwrap_or(false)
}

/// Puts an `ask` question to the broker and waits for the answer. Anything but an explicit
/// "allow" — no broker, a broken connection, a timeout — is a denial (fail closed).
pub(crate) fn ask_broker(layout: &Layout, question: Question) -> (bool, String) {
    let unavailable = |e: &dyn std::fmt::Display| {
        (
            false,
            format!("the broker could not ask anyone ({e}): denied"),
        )
    };
    let chan = match Channel::connect(&layout.broker_socket()) {
        Ok(c) => c,
        Err(e) => return unavailable(&e),
    };
    let exchange = || -> Result<BrokerReply, ChannelError> {
        chan.send(&BrokerRequest::Hello(Hello {
            version: PROTOCOL_VERSION,
        }))?;
        chan.recv::<BrokerReply>()?;
        chan.send(&BrokerRequest::Ask(question))?;
        chan.recv::<BrokerReply>()
    };
    match exchange() {
        Ok(BrokerReply::Answer { allow, how }) => (allow, how),
        Ok(other) => unavailable(&format!("unexpected reply {other:?}")),
        Err(e) => unavailable(&e),
    }
}

/// The pid of host process `pid` as its own VM sees it (the last NSpid field).
pub(crate) fn pid_in_vm(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Puts the question an `ask` rule raises about `record`'s request to the operator (through
/// the broker) and waits for the answer.
pub(crate) fn ask(
    ctx: &ApiContext,
    policy: &Policy,
    rule: &shuttle_policy::Rule,
    record: &AuditRecord,
) -> (bool, String) {
    debug_assert!(from_policy(policy, rule), "a rule of another policy");
    let question = Question {
        vm: ctx.vm.clone(),
        op: record.op.clone(),
        to: record.to.clone(),
        object: record.object.clone(),
        rule: rule.label_at(),
        timeout_ms: rule.params().ask_timeout().as_millis() as u64,
    };
    ask_broker(&ctx.layout, question)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rule(from: &str, action: &str) -> String {
        format!(
            "[[rule]]\nop = \"signal\"\nfrom = \"{from}\"\nto = \"b\"\nobject = \"sleep\"\naction = \"{action}\"\n"
        )
    }

    fn write_layer(layout: &Layout, name: &str, text: &str) {
        std::fs::create_dir_all(layout.policy_layers_dir()).unwrap();
        let parts = vec![PolicyText {
            source: format!("{name}.toml"),
            text: text.to_owned(),
        }];
        std::fs::write(
            layer_file(layout, name),
            serde_json::to_vec(&parts).unwrap(),
        )
        .unwrap();
    }

    fn allowed(policy: &Policy, from: &str) -> bool {
        let req = Request::new(Op::Signal, VmIdentity::vm(from, &[]), "sleep")
            .to(VmIdentity::vm("b", &[]));
        policy.decide(&req).is_allowed()
    }

    #[test]
    fn a_damaged_layer_is_never_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        // Layer "a" denies what layer "b" allows: without "a", the allow would get through.
        write_layer(&layout, "a", &rule("a", "deny"));
        write_layer(&layout, "b", &rule("@any", "allow"));
        let whole = load_active_policy(&layout);
        assert!(!allowed(&whole, "a"));
        assert!(allowed(&whole, "c"));
        std::fs::write(layer_file(&layout, "a"), b"{ not json").unwrap();
        let err = active_policy_parts(&layout).unwrap_err().to_string();
        assert!(err.contains("a.json"), "{err}");
        let policy = load_active_policy(&layout);
        assert!(policy.is_empty(), "a damaged layer means no rules at all");
        assert!(!allowed(&policy, "a"));
        assert!(build_active_policy(&layout).is_err());
    }

    #[test]
    fn stray_files_among_layers_are_errors_and_temporaries_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        write_layer(&layout, "a", &rule("a", "allow"));
        std::fs::write(layout.policy_layers_dir().join("a.tmp-1-0"), b"").unwrap();
        assert_eq!(layer_names(&layout).unwrap(), ["a"]);
        std::fs::write(layout.policy_layers_dir().join("Bad Name.json"), b"[]").unwrap();
        assert!(layer_names(&layout).is_err());
    }
}
