//! Application invocation across VMs, on the caller's monitor: a program of VM `a` (usually
//! the invoke stub at a program path, see [`crate::stubs`]) asks over a's own API socket to
//! run `program`; the monitor routes it with a's copy of the policy (first match wins, default
//! deny), journals the decision before anything happens, and asks the target VM's monitor to
//! run the real program there (`MonitorRequest::Run`, the same path as `shuttle run`), handing
//! over the caller's own stdin, stdout and stderr descriptors. Signals the caller forwards
//! reach the program's process group; the exit status comes back; a caller that goes away
//! without waiting gets its program killed.
//!
//! What the request says is trusted for nothing: the VM is the socket it arrived on; the
//! program is only ever the rule's object, in the VM the rule names, as the caller's own uid
//! and gid (from the kernel: `SO_PEERCRED`) or the rule's `user`; its environment is the
//! rule's allow list. Work started on a VM's behalf runs in a VM, never on the host.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use shuttle_audit::{AuditRecord, Caller, Outcome};
use shuttle_policy::{Action, FileAccess, InvokeParams, Op, OpParams, Request, Target, VmIdentity};
use shuttle_proto::{
    BrokerReply, BrokerRequest, Bytes, Channel, ChannelError, CommandSpec, Hello, InvokeSpec,
    VmReply, VmRequest, PROTOCOL_VERSION,
};

use crate::client::{self, ClientError};
use crate::layout::Layout;
use crate::vm_api::{self, ApiContext};
use crate::{store, transfer};

/// The longest program path accepted (PATH_MAX).
const MAX_PROGRAM: usize = 4096;

/// The most objects one `open` request may name.
const MAX_OPEN_OBJECTS: usize = 8;

/// The caller's uid and gid, from the kernel.
pub(crate) type CallerIds = Option<(u32, u32)>;

/// Serves one invocation on `chan` (the caller's API connection) until the program ends.
pub(crate) fn serve(
    ctx: &ApiContext,
    chan: &Channel,
    caller: &Caller,
    ids: CallerIds,
    spec: InvokeSpec,
    stdio: Vec<OwnedFd>,
) -> Result<(), ChannelError> {
    if spec
        .run_in
        .as_deref()
        .is_some_and(|vm| vm.is_empty() || vm == ctx.vm)
    {
        return serve_own_vm(ctx, chan, caller, ids, spec, stdio);
    }
    let mut record = AuditRecord {
        time: shuttle_audit::now_unix_nanos(),
        op: Op::Invoke.as_str().into(),
        from: ctx.vm.clone(),
        to: None,
        object: spec.program.chars().take(MAX_PROGRAM).collect(),
        result: Outcome::Deny,
        rule: None,
        caller: caller.clone(),
        reason: None,
        seq: 0,
    };
    let (target, params, approval, program) = match decide(ctx, &mut record, &spec, stdio.len()) {
        Ok(d) => d,
        Err(refusal) => return chan.send(&refusal),
    };
    let short = params.short_file_options();
    // File arguments are asked for only now that the invocation is allowed, and only when
    // the rule passes them.
    let files = if params.files == FileAccess::None
        || (spec.files.is_empty() && spec.option_files.is_empty())
    {
        Vec::new()
    } else {
        let write = params.files == FileAccess::ReadWrite;
        match chan
            .send(&VmReply::SendFiles { write })
            .map_err(|e| e.to_string())
            .and_then(|()| receive_files(chan, &spec))
        {
            // A `-XVALUE` the stub offered (it does not know the rule) counts only when the
            // rule lists `-X` in `file_options`; otherwise the argument stays a string.
            Ok(f) => {
                f.into_iter()
                    .filter(|f| {
                        !spec.option_files.contains(&(f.index as u32))
                            || spec.args.get(f.index).is_some_and(|a| {
                                transfer::option_value(a.as_bytes(), &short).is_some()
                            })
                    })
                    .collect()
            }
            Err(why) => {
                record.result = Outcome::Error;
                record.reason = Some(format!("receiving the file arguments: {why}"));
                let message = format!("invalid file arguments: {why}");
                return chan.send(&refuse(ctx, record, VmReply::Failed { message }));
            }
        }
    };
    let user = match (&params.user, ids) {
        (Some(u), _) => u.clone(),
        (None, Some((uid, gid))) => format!("{uid}:{gid}"),
        (None, None) => {
            // Without the caller's identity there is no one to run it as: refused (fail closed).
            let message = "the caller's uid and gid are unknown (no peer credentials)".to_owned();
            record.result = Outcome::Error;
            record.reason = Some(message.clone());
            return chan.send(&refuse(ctx, record, VmReply::Failed { message }));
        }
    };
    // Journaled before it happens (starting the target VM included); a journal that cannot
    // be written refuses.
    let starting = if store::is_running(&ctx.layout, &target) {
        ""
    } else {
        ", starting it"
    };
    let dirs = if params.expose_dir {
        " and the files of their directories"
    } else {
        ""
    };
    let passing = match (files.len(), params.files) {
        (0, _) | (_, FileAccess::None) => String::new(),
        (n, FileAccess::ReadOnly) => format!(" with {n} file argument(s){dirs} read-only"),
        (n, FileAccess::ReadWrite) => format!(" with {n} file argument(s){dirs} read-write"),
    };
    record.reason = Some(format!(
        "run as {user} in VM {target}{passing}{starting}{approval}"
    ));
    if !vm_api::journal(ctx, &record) {
        return chan.send(&journal_failed());
    }
    let fail = |mut record: AuditRecord, message: String| {
        record.time = shuttle_audit::now_unix_nanos();
        record.result = Outcome::Error;
        record.reason = Some(message.clone());
        let _ = vm_api::journal(ctx, &record);
        VmReply::Failed { message }
    };
    if let Err(message) = ensure_running(&ctx.layout, &target) {
        return chan.send(&fail(record, message));
    }
    let mut spec = spec;
    let mut exposed_files = None;
    // `expose_dir`: the files of each file argument's directory are opened with the caller's
    // credentials, all of them from the kernel (the groups too), never from the request.
    let dir_creds = match (params.expose_dir, ids) {
        (true, Some((uid, gid))) if !files.is_empty() => {
            match shuttle_sys::unotify::peer_groups(chan.as_fd()) {
                Ok(groups) => Some(transfer::CallerCreds { uid, gid, groups }),
                Err(e) => {
                    let why = format!("the caller's groups are unknown (SO_PEERGROUPS: {e})");
                    return chan.send(&fail(record, why));
                }
            }
        }
        _ => None,
    };
    if !files.is_empty() {
        let caller_ns = ctx.stubs.as_ref().map(|s| s.mount_namespace());
        let shown = caller_ns
            .ok_or_else(|| "the caller's mount namespace is not at hand".to_owned())
            .and_then(|ns| {
                let t = transfer::target_ns(&ctx.layout, &target)?;
                transfer::expose(
                    &ctx.layout,
                    &ctx.vm,
                    ns,
                    &t,
                    files,
                    params.files == FileAccess::ReadWrite,
                    dir_creds.as_ref(),
                )
            });
        match shown {
            Ok((rewritten, exposed)) => {
                for (index, arg) in rewritten {
                    let option = spec.option_files.contains(&(index as u32));
                    if let Some(a) = spec.args.get_mut(index) {
                        // `--input=/srv/a.txt`: only the value is the file's name.
                        let prefix = if option {
                            transfer::option_value(a.as_bytes(), &short)
                                .map(|start| &a.as_bytes()[..start])
                        } else {
                            None
                        };
                        *a = match prefix {
                            Some(prefix) => {
                                let mut v = prefix.to_vec();
                                v.extend_from_slice(arg.as_bytes());
                                Bytes::from(std::ffi::OsStr::from_bytes(&v))
                            }
                            None => arg,
                        };
                    }
                }
                exposed_files = Some(exposed);
            }
            Err(message) => {
                return chan.send(&fail(record, format!("passing file arguments: {message}")))
            }
        }
    }
    let command = command_for(ctx, &target, &params, user, &program, spec);
    relay(
        ctx,
        chan,
        record,
        (&target, &program),
        command,
        stdio,
        exposed_files,
    )
}

/// Runs `command` in VM `target` for the caller on `chan` (whose decision `record` is
/// journaled already) and relays until it ends: the start (with a terminal's master side),
/// the caller's signals, its death (the program is killed), the exit status. The files shown
/// for it (`exposed`) are taken away before the caller hears that the program ended.
fn relay(
    ctx: &ApiContext,
    chan: &Channel,
    mut record: AuditRecord,
    (target, program): (&str, &str),
    command: CommandSpec,
    stdio: Vec<OwnedFd>,
    exposed: Option<transfer::Exposed>,
) -> Result<(), ChannelError> {
    let target = target.to_owned();
    let fds: Vec<BorrowedFd<'_>> = stdio.iter().map(AsFd::as_fd).collect();
    let session = match client::run(&ctx.layout, &target, command.clone(), &fds) {
        // Its lock is held but its socket is not there yet: still starting.
        Err(ClientError::NotRunning(_)) if store::is_running(&ctx.layout, &target) => {
            client::wait_until_ready(&ctx.layout, &target, std::time::Duration::from_secs(60))
                .and_then(|()| client::run(&ctx.layout, &target, command, &fds))
        }
        other => other,
    };
    drop(fds);
    // The program holds its own copies now; ours must go so that pipes see their end.
    drop(stdio);
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            let (message, exit_code) = match e {
                ClientError::CommandFailed { message, exit_code } => (message, exit_code),
                other => (other.to_string(), 125),
            };
            record.time = shuttle_audit::now_unix_nanos();
            record.result = Outcome::Error;
            record.reason = Some(format!(
                "could not start {program} in VM {target}: {message}"
            ));
            let _ = vm_api::journal(ctx, &record);
            drop(exposed);
            return chan.send(&VmReply::InvokeFailed { message, exit_code });
        }
    };
    let started = VmReply::Invoked {
        vm: target.clone(),
        pid: session.pid,
    };
    let master = session.terminal.take();
    let sent = match &master {
        Some(m) => chan.send_with_fds(&started, &[m.as_fd()]),
        None => chan.send(&started),
    };
    drop(master);
    let finished = Arc::new(AtomicBool::new(false));
    // The caller's signals, while the program runs. Its connection ending first means it died
    // without waiting (SIGKILL): its program goes too.
    let forwarder = match (sent, session.signaller(), chan.try_clone()) {
        (Ok(()), Ok(signaller), Ok(reader)) => {
            let finished = Arc::clone(&finished);
            let vm = ctx.vm.clone();
            Some(std::thread::spawn(move || loop {
                match reader.recv::<VmRequest>() {
                    Ok(VmRequest::InvokeSignal { signal }) if (1..=64).contains(&signal) => {
                        let _ = signaller.signal(signal);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !finished.load(Ordering::SeqCst) {
                            tracing::debug!(%vm, error = %e, "invoking process gone: killing its program");
                            let _ = signaller.signal(libc::SIGKILL);
                        }
                        return;
                    }
                }
            }))
        }
        (sent, signaller, _) => {
            // Nobody to report to, or no way to pass signals on: the program must not run on
            // unsupervised.
            if let Ok(s) = signaller {
                let _ = s.signal(libc::SIGKILL);
            }
            sent?;
            None
        }
    };
    let reply = match session.wait() {
        Ok(status) => VmReply::Exited(status),
        Err(ClientError::CommandFailed { message, exit_code }) => {
            VmReply::InvokeFailed { message, exit_code }
        }
        Err(e) => VmReply::InvokeFailed {
            message: e.to_string(),
            exit_code: 125,
        },
    };
    finished.store(true, Ordering::SeqCst);
    drop(exposed);
    let r = chan.send(&reply);
    chan.shutdown();
    if let Some(f) = forwarder {
        let _ = f.join();
    }
    r
}

fn journal_failed() -> VmReply {
    VmReply::Failed {
        message: "the audit journal cannot be written: refused".into(),
    }
}

/// Journals a refusal and returns `reply`, or the journal's own failure.
fn refuse(ctx: &ApiContext, record: AuditRecord, reply: VmReply) -> VmReply {
    if vm_api::journal(ctx, &record) {
        reply
    } else {
        journal_failed()
    }
}

/// Routes the request: the target VM, the deciding rule's parameters, and how an `ask` was
/// approved; or the refusal to send (already journaled).
fn decide(
    ctx: &ApiContext,
    record: &mut AuditRecord,
    spec: &InvokeSpec,
    fds: usize,
) -> Result<(String, InvokeParams, String, String), VmReply> {
    if let Err(why) = check(spec, fds) {
        record.reason = Some(format!("malformed request: {why}"));
        return Err(refuse(
            ctx,
            record.clone(),
            VmReply::Failed {
                message: format!("invalid invoke request: {why}"),
            },
        ));
    }
    let policy = ctx.policy.read().unwrap_or_else(|e| e.into_inner()).clone();
    let me = VmIdentity::vm(&ctx.vm, &ctx.tags);
    // `shuttle open`: the first of the objects the caller names that a rule routes decides;
    // the program is that rule's handler.
    let opening = !spec.open.is_empty();
    let (program, routed) = if opening {
        record.op = Op::Open.as_str().into();
        record.object = spec.open.first().cloned().unwrap_or_default();
        let routed = spec.open.iter().find_map(|object| {
            policy
                .route(&Request::new(Op::Open, me, object))
                .map(|r| (object, r))
        });
        match routed {
            Some((object, r)) => {
                record.object = object.clone();
                let handler = match &r.0.rule.map(|rule| &rule.params().op) {
                    Some(OpParams::Open { handler, .. }) => handler.clone(),
                    _ => String::new(),
                };
                (handler, Some(r))
            }
            None => (String::new(), None),
        }
    } else {
        // A stub mounted where the rule's path leads (through a symbolic link to a
        // directory) knows itself by that place: the rule's path is the object.
        let translated = ctx
            .stubs
            .as_ref()
            .and_then(|s| s.rule_path_for(&spec.program));
        let program = translated.unwrap_or_else(|| spec.program.clone());
        record.object = program.clone();
        let routed = policy.route(&Request::new(Op::Invoke, me, &program));
        (program, routed)
    };
    let program = program.as_str();
    // What the messages call the request.
    let what = if opening {
        let arg: String = spec
            .args
            .first()
            .map(|a| {
                String::from_utf8_lossy(a.as_bytes())
                    .chars()
                    .take(200)
                    .collect()
            })
            .unwrap_or_default();
        format!("opening {arg} ({})", record.object)
    } else {
        format!("invoking {program}")
    };
    let Some((decision, target)) = routed else {
        record.reason = Some("no rule matched: default deny".into());
        if let Some(named) = &spec.run_in {
            record.to = Some(named.clone());
            let message = format!(
                "running {program} in VM {named} is not allowed by the policy (no invoke rule \
                 routes {program} from VM {} to VM {named}; in this VM itself, leave out the VM \
                 name)",
                ctx.vm
            );
            return Err(refuse(ctx, record.clone(), VmReply::Denied { message }));
        }
        let message = format!(
            "{what} is not allowed by the policy (no rule routes it from VM {} to another VM)",
            ctx.vm
        );
        return Err(refuse(ctx, record.clone(), VmReply::Denied { message }));
    };
    let rule = decision.rule.expect("a routed decision comes from a rule");
    record.rule = Some(vm_api::rule_ref(&policy, rule));
    let rule_at = rule.label_at();
    let to = match target {
        Some(Target::Vm(name)) => name.to_string(),
        _ => {
            record.to = Some(shuttle_audit::HOST.into());
            record.reason = Some(format!("{} routes it to the host", rule.label()));
            let message = format!(
                "{what} on the host is not allowed: work started on a VM's behalf runs in a \
                 VM ({rule_at} routes it to @host)"
            );
            return Err(refuse(ctx, record.clone(), VmReply::Denied { message }));
        }
    };
    record.to = Some(to.clone());
    // `shuttle run b -- PROGRAM` inside a: only where the rule routes PROGRAM to b itself.
    if let Some(named) = spec.run_in.as_deref().filter(|n| *n != to) {
        record.to = Some(named.to_owned());
        record.reason = Some(format!(
            "{} routes it to VM {to}, not to VM {named}",
            rule.label()
        ));
        let message = format!(
            "running {program} in VM {named} is not allowed by the policy ({rule_at} routes it \
             to VM {to})"
        );
        return Err(refuse(ctx, record.clone(), VmReply::Denied { message }));
    }
    if to == ctx.vm {
        record.reason = Some(format!(
            "{} routes it to the calling VM itself",
            rule.label()
        ));
        let message = format!(
            "{program} is this VM's own program ({rule_at} routes it to VM {to}): run it directly"
        );
        return Err(refuse(ctx, record.clone(), VmReply::Denied { message }));
    }
    let mut approval = String::new();
    match decision.action {
        Action::Allow => record.result = Outcome::Allow,
        Action::Deny => {
            record.reason = Some(format!("denied by {}", rule.label()));
            let message =
                format!("{what} in VM {to} is not allowed by the policy (denied by {rule_at})");
            return Err(refuse(ctx, record.clone(), VmReply::Denied { message }));
        }
        Action::Ask => {
            let (allow, how) = vm_api::ask(ctx, &policy, rule, record);
            if !allow {
                record.result = Outcome::AskDeny;
                record.reason = Some(how.clone());
                let message =
                    format!("{what} in VM {to} is not allowed by the policy (not approved: {how})");
                return Err(refuse(ctx, record.clone(), VmReply::Denied { message }));
            }
            record.result = Outcome::AskAllow;
            approval = format!("; {how}");
        }
    }
    let params = match &rule.params().op {
        OpParams::Invoke(p) => p.clone(),
        OpParams::Open { invoke, .. } => invoke.clone(),
        _ => InvokeParams::default(),
    };
    Ok((to, params, approval, program.to_owned()))
}

/// Starts VM `vm` through the broker (which owns VM lifecycle) unless it runs, and waits until
/// it accepts commands.
fn ensure_running(layout: &Layout, vm: &str) -> Result<(), String> {
    if store::is_running(layout, vm) {
        // Running may still mean starting (another invocation's start, say): wait until its
        // monitor answers, or what follows finds no VM to show files in.
        return client::wait_until_ready(layout, vm, std::time::Duration::from_secs(60))
            .map_err(|e| e.to_string());
    }
    let exchange = || -> Result<BrokerReply, ChannelError> {
        let chan = Channel::connect(&layout.broker_socket())?;
        chan.send(&BrokerRequest::Hello(Hello {
            version: PROTOCOL_VERSION,
        }))?;
        chan.recv::<BrokerReply>()?;
        chan.send(&BrokerRequest::VmStart { name: vm.into() })?;
        chan.recv::<BrokerReply>()
    };
    let started = match exchange() {
        Ok(BrokerReply::Done) => Ok(()),
        Ok(BrokerReply::Failed { message }) => Err(message),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(format!(
            "the broker, which starts VMs, cannot be reached ({e}); start VM {vm} on the host \
             with `shuttle vm start {vm}`"
        )),
    };
    match started {
        Ok(()) => Ok(()),
        // Someone else started it meanwhile: wait until it is ready.
        Err(_) if store::is_running(layout, vm) => {
            client::wait_until_ready(layout, vm, std::time::Duration::from_secs(60))
                .map_err(|e| e.to_string())
        }
        Err(message) => Err(format!(
            "VM {vm} is not running and could not be started: {message}"
        )),
    }
}

/// Receives the descriptors of file arguments, each one among those `spec` announced, until
/// an empty list ends them.
fn receive_files(chan: &Channel, spec: &InvokeSpec) -> Result<Vec<transfer::FileArg>, String> {
    let mut files: Vec<transfer::FileArg> = Vec::new();
    loop {
        let (args, fds) = match chan.recv_with_fds::<VmRequest>() {
            Ok((VmRequest::InvokeFiles { args }, fds)) => (args, fds),
            Ok(_) => return Err("expected the file arguments' descriptors".into()),
            Err(e) => return Err(e.to_string()),
        };
        if args.is_empty() && fds.is_empty() {
            return Ok(files);
        }
        if args.len() != fds.len() {
            return Err(format!(
                "{} descriptors for {} arguments",
                fds.len(),
                args.len()
            ));
        }
        for (i, fd) in args.into_iter().zip(fds) {
            let index = i as usize;
            let announced = spec.files.contains(&i) || spec.option_files.contains(&i);
            if !announced || files.iter().any(|f| f.index == index) {
                return Err(format!(
                    "argument {i} was not announced as a file, or came twice"
                ));
            }
            if files.len() == transfer::MAX_FILES {
                return Err(format!("more than {} file arguments", transfer::MAX_FILES));
            }
            files.push(transfer::FileArg { index, fd });
        }
    }
}

/// `shuttle run [VM] -- CMD` inside VM a naming a itself (or no VM): CMD runs in a, a fresh
/// child of a's init like any `shuttle run`, only where an `invoke` rule routes the program
/// from a to a itself (the one intra-VM rule: such a child holds init's capabilities and
/// none of the restrictions its caller took on, so it is granted as explicitly as a
/// crossing). It runs as the caller's uid, gid and supplementary groups from the kernel
/// (`SO_PEERCRED`, `SO_PEERGROUPS`); `-u` only for a caller holding `CAP_SETUID` and
/// `CAP_SETGID`, who could become anyone there anyway. A caller that restricted itself beyond
/// its VM (seccomp filters of its own, no_new_privs, a narrower bounding set, or fewer
/// effective capabilities than init when it would run as root) is refused. Audited as op
/// `run`, from and to a.
fn serve_own_vm(
    ctx: &ApiContext,
    chan: &Channel,
    caller: &Caller,
    ids: CallerIds,
    spec: InvokeSpec,
    stdio: Vec<OwnedFd>,
) -> Result<(), ChannelError> {
    let mut record = AuditRecord {
        time: shuttle_audit::now_unix_nanos(),
        op: "run".into(),
        from: ctx.vm.clone(),
        to: Some(ctx.vm.clone()),
        object: spec.program.chars().take(MAX_PROGRAM).collect(),
        result: Outcome::Deny,
        rule: None,
        caller: caller.clone(),
        reason: None,
        seq: 0,
    };
    // File arguments the caller announced (it does not know which VM is its own) are names
    // of its own VM's files already: they are neither asked for nor rewritten.
    let malformed = check_run(&spec, stdio.len()).err().or_else(|| {
        (!spec.open.is_empty()).then(|| "open objects in a run in the caller's own VM".into())
    });
    let malformed = malformed.or_else(|| {
        (!spec.program.starts_with('/'))
            .then(|| format!("program {:?} is not an absolute path", spec.program))
    });
    if let Some(why) = malformed {
        record.reason = Some(format!("malformed request: {why}"));
        let message = format!("invalid run request: {why}");
        return chan.send(&refuse(ctx, record, VmReply::Failed { message }));
    }
    let vm = ctx.vm.clone();
    let program = spec.program.clone();
    // The policy: an invoke rule written for exactly this VM to itself (`from` and `to` both
    // naming it), the first that speaks to the request. A rule for other VMs (`@any`, a tag,
    // another `to`) never grants a run here, though an earlier deny that matches still refuses.
    let policy = ctx.policy.read().unwrap_or_else(|e| e.into_inner()).clone();
    let me = VmIdentity::vm(&ctx.vm, &ctx.tags);
    let only_me = |set: &shuttle_policy::SelectorSet| matches!(set.selectors(), [shuttle_policy::Selector::Vm(n)] if **n == *vm);
    let hint = format!(
        "an invoke rule with from = \"{vm}\", to = \"{vm}\" and object = \"{program}\" allows \
         it"
    );
    let deciding = policy.rules().iter().find(|r| {
        r.op() == Op::Invoke
            && r.from().matches(&me)
            && r.object().matches(&program)
            && (r.action() == Action::Deny
                || (only_me(r.from())
                    && only_me(r.to())
                    && matches!(r.target(), Some(Target::Vm(t)) if **t == *vm)))
    });
    let Some(rule) = deciding else {
        record.reason = Some("no rule for this VM to itself matched: default deny".into());
        let message = format!(
            "running {program} in this VM ({vm}) through shuttle run is not allowed by the \
             policy (no rule allows it from VM {vm} to VM {vm}; {hint})"
        );
        return chan.send(&refuse(ctx, record, VmReply::Denied { message }));
    };
    let decision = shuttle_policy::Decision {
        action: rule.action(),
        rule: Some(rule),
    };
    record.rule = Some(vm_api::rule_ref(&policy, rule));
    let rule_at = rule.label_at();
    if decision.action == Action::Deny {
        record.reason = Some(format!("denied by {}", rule.label()));
        let message = format!(
            "running {program} in this VM ({vm}) through shuttle run is not allowed by the \
             policy (denied by {rule_at})"
        );
        return chan.send(&refuse(ctx, record, VmReply::Denied { message }));
    }
    // Who the caller is and what it holds, from the kernel.
    let Some((uid, gid)) = ids else {
        let message = "the caller's uid and gid are unknown (no peer credentials)".to_owned();
        record.result = Outcome::Error;
        record.reason = Some(message.clone());
        return chan.send(&refuse(ctx, record, VmReply::Failed { message }));
    };
    let held = caller_restrictions(ctx, chan);
    let (own, init) = match held {
        Ok(r) => r,
        Err(why) => {
            record.result = Outcome::Error;
            record.reason = Some(why.clone());
            let message = format!("the caller's restrictions cannot be checked: {why}");
            return chan.send(&refuse(ctx, record, VmReply::Failed { message }));
        }
    };
    const CAP_SETGID: u64 = 1 << 6;
    const CAP_SETUID: u64 = 1 << 7;
    let may_switch = own.cap_eff & (CAP_SETUID | CAP_SETGID) == CAP_SETUID | CAP_SETGID;
    let user = match &spec.user {
        None => {
            let groups = match shuttle_sys::unotify::peer_groups(chan.as_fd()) {
                Ok(g) => g,
                Err(e) => {
                    let message = format!("the caller's groups are unknown (SO_PEERGROUPS: {e})");
                    record.result = Outcome::Error;
                    record.reason = Some(message.clone());
                    return chan.send(&refuse(ctx, record, VmReply::Failed { message }));
                }
            };
            let list: Vec<String> = groups.iter().map(u32::to_string).collect();
            format!("{uid}:{gid}:{}", list.join(","))
        }
        Some(u) if may_switch => u.clone(),
        Some(u) => {
            record.reason = Some(format!(
                "uid {uid} without CAP_SETUID and CAP_SETGID asked to run as {u}"
            ));
            let message = format!(
                "running as {u} is not allowed: a command started from inside VM {vm} runs as \
                 its caller (uid {uid}); only a caller holding CAP_SETUID and CAP_SETGID there \
                 may name another user"
            );
            return chan.send(&refuse(ctx, record, VmReply::Denied { message }));
        }
    };
    let as_root = spec.user.is_some() || uid == 0;
    if let Some(why) = own.escapes(&init, as_root) {
        record.reason = Some(format!("{why}: its command would not keep that"));
        let message = format!(
            "running {program} through shuttle run is refused: {why}, and a command started by \
             VM {vm}'s init would not keep that restriction; run it directly"
        );
        return chan.send(&refuse(ctx, record, VmReply::Denied { message }));
    }
    // An `ask` is put only once nothing else refuses.
    let mut approval = String::new();
    let mut allowed = Outcome::Allow;
    if decision.action == Action::Ask {
        let (allow, how) = vm_api::ask(ctx, &policy, rule, &record);
        if !allow {
            record.result = Outcome::AskDeny;
            record.reason = Some(how.clone());
            let message = format!(
                "running {program} in this VM ({vm}) is not allowed by the policy (not \
                 approved: {how})"
            );
            return chan.send(&refuse(ctx, record, VmReply::Denied { message }));
        }
        allowed = Outcome::AskAllow;
        approval = format!("; {how}");
    }
    record.result = allowed;
    record.reason = Some(format!(
        "run as {user} in the caller's own VM {vm}{approval}"
    ));
    if !vm_api::journal(ctx, &record) {
        return chan.send(&journal_failed());
    }
    let env = spec
        .env
        .into_iter()
        .filter(|(k, v)| {
            let k = k.as_bytes();
            !k.is_empty() && !k.contains(&b'=') && !k.contains(&0) && !v.as_bytes().contains(&0)
        })
        .collect();
    let mut argv = Vec::with_capacity(spec.args.len() + 1);
    argv.push(Bytes::from(spec.program.as_str()));
    argv.extend(spec.args);
    let command = CommandSpec {
        argv,
        env,
        cwd: spec.cwd,
        user: Some(user),
        terminal: spec.terminal,
    };
    relay(ctx, chan, record, (&vm, &program), command, stdio, None)
}

/// The restrictions of the caller on `chan` (through a pidfd of it from `SO_PEERPIDFD`) and of
/// the VM's init.
fn caller_restrictions(
    ctx: &ApiContext,
    chan: &Channel,
) -> Result<
    (
        crate::caller_state::Restrictions,
        crate::caller_state::Restrictions,
    ),
    String,
> {
    // Only SO_PEERPIDFD names the connecting process for sure: the pid SO_PEERCRED gives may
    // have been reused once that process exited (while a child holding the socket lives on),
    // so there is no fallback to it.
    let pidfd = shuttle_sys::fdpass::peer_pidfd(chan.as_fd()).map_err(|e| {
        format!(
            "the process that connected cannot be identified (SO_PEERPIDFD: {e}; it has \
             exited, or the kernel is older than 6.5)"
        )
    })?;
    let own = crate::caller_state::of_process(pidfd.as_fd(), ctx.init_pid)?;
    let init = crate::caller_state::of_init(ctx.init_pid)?;
    Ok((own, init))
}

/// The checks of [`check`] that every request shares: descriptors, terminal, sizes.
fn check_run(spec: &InvokeSpec, fds: usize) -> Result<(), String> {
    let p = &spec.program;
    if p.is_empty() || p.len() > MAX_PROGRAM || p.contains('\0') {
        return Err(format!("program {p:?} is empty or too long"));
    }
    if spec
        .user
        .as_ref()
        .is_some_and(|u| u.is_empty() || u.len() > 256 || u.contains('\0'))
    {
        return Err("an invalid user".into());
    }
    check_stdio(spec, fds)
}

/// The caller's stdio as the request must bring it: three descriptors, or none with a
/// terminal of a real size.
fn check_stdio(spec: &InvokeSpec, fds: usize) -> Result<(), String> {
    let expected = if spec.terminal.is_some() { 0 } else { 3 };
    if fds != expected {
        return Err(format!(
            "{fds} descriptors came with it, {expected} expected (stdin, stdout, stderr)"
        ));
    }
    if spec.terminal.is_some_and(|(r, c)| r == 0 || c == 0) {
        return Err("a terminal of size 0".into());
    }
    Ok(())
}

/// Checks what the policy does not: sizes and descriptors.
fn check(spec: &InvokeSpec, fds: usize) -> Result<(), String> {
    let p = &spec.program;
    if spec.open.is_empty() && (!p.starts_with('/') || p.len() > MAX_PROGRAM || p.contains('\0')) {
        return Err(format!("program {p:?} is not an absolute path"));
    }
    if let Some(vm) = &spec.run_in {
        if crate::config::validate_name(vm).is_err() || !spec.open.is_empty() {
            return Err(format!("VM name {vm:?} is not valid"));
        }
    }
    if spec.user.is_some() {
        return Err(
            "a user for another VM: who the program runs as there is the invoke rule's `user` \
             (or the caller's uid and gid)"
                .into(),
        );
    }
    if spec.open.len() > MAX_OPEN_OBJECTS || spec.open.iter().any(|o| o.len() > MAX_PROGRAM) {
        return Err("too many or too long objects to open".into());
    }
    if !spec.open.is_empty() && spec.args.len() != 1 {
        return Err("open takes one path or URL".into());
    }
    check_stdio(spec, fds)?;
    if spec.files.len() > spec.args.len()
        || spec.files.iter().any(|&i| i as usize >= spec.args.len())
    {
        return Err("file arguments that are not arguments".into());
    }
    // Option arguments with a file value: each an argument of that form (as the monitor reads
    // it), once, and not also a whole file argument.
    let mut seen = std::collections::BTreeSet::new();
    for &i in &spec.option_files {
        let is_option = spec.args.get(i as usize).is_some_and(|a| {
            transfer::option_value(a.as_bytes(), transfer::ANY_SHORT_OPTION).is_some()
        });
        if !is_option || spec.files.contains(&i) || !seen.insert(i) {
            return Err(format!("argument {i} is not an option with a file value"));
        }
    }
    if spec.files.len() + spec.option_files.len() > transfer::MAX_FILES {
        return Err(format!("more than {} file arguments", transfer::MAX_FILES));
    }
    Ok(())
}

/// What the target VM's init is asked to run.
fn command_for(
    ctx: &ApiContext,
    target: &str,
    params: &InvokeParams,
    user: String,
    program: &str,
    spec: InvokeSpec,
) -> CommandSpec {
    let env = spec
        .env
        .into_iter()
        .filter(|(k, v)| {
            let k = k.as_bytes();
            !k.is_empty()
                && !k.contains(&b'=')
                && !k.contains(&0)
                && !v.as_bytes().contains(&0)
                && params.passes_env(k)
        })
        .collect();
    let cwd = spec
        .cwd
        .filter(|c| directory_exists_in(ctx, target, c))
        .unwrap_or_else(|| Bytes::from("/"));
    let mut argv = Vec::with_capacity(spec.args.len() + 1);
    argv.push(Bytes::from(program));
    argv.extend(spec.args);
    CommandSpec {
        argv,
        env,
        cwd: Some(cwd),
        user: Some(user),
        terminal: spec.terminal,
    }
}

/// Whether `dir` (an absolute path) is a directory inside the running VM `vm`'s root.
fn directory_exists_in(ctx: &ApiContext, vm: &str, dir: &Bytes) -> bool {
    let dir = dir.as_bytes();
    if dir == b"/" {
        return true;
    }
    if !dir.starts_with(b"/") || dir.contains(&0) {
        return false;
    }
    let Ok(status) = client::status(&ctx.layout, vm) else {
        return false;
    };
    let Ok(root) = nix::fcntl::open(
        Path::new(&format!("/proc/{}/root", status.init_pid)),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let relative = std::ffi::OsStr::from_bytes(&dir[1..]);
    let relative = if relative.is_empty() {
        std::ffi::OsStr::new(".")
    } else {
        relative
    };
    openat2(&root, Path::new(relative), how).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(program: &str, terminal: Option<(u16, u16)>) -> InvokeSpec {
        InvokeSpec {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            terminal,
            files: Vec::new(),
            option_files: Vec::new(),
            open: Vec::new(),
            run_in: None,
            user: None,
        }
    }

    #[test]
    fn malformed_requests_are_refused() {
        assert!(check(&spec("/usr/bin/wc", None), 3).is_ok());
        assert!(check(&spec("/usr/bin/wc", Some((24, 80))), 0).is_ok());
        assert!(check(&spec("wc", None), 3).is_err());
        assert!(check(&spec("/usr/bin/wc", None), 2).is_err());
        assert!(check(&spec("/usr/bin/wc", Some((24, 80))), 3).is_err());
        assert!(check(&spec("/usr/bin/wc", Some((0, 80))), 0).is_err());
        assert!(check(&spec(&format!("/{}", "a".repeat(5000)), None), 3).is_err());
        let mut s = spec("/usr/bin/sort", None);
        s.args = vec![Bytes::from("--output=/srv/out"), Bytes::from("/srv/in")];
        s.files = vec![1];
        s.option_files = vec![0];
        assert!(check(&s, 3).is_ok());
        s.option_files = vec![1];
        assert!(check(&s, 3).is_err(), "a whole argument is not an option");
        s.option_files = vec![0, 0];
        assert!(check(&s, 3).is_err(), "twice");
        s.args[0] = Bytes::from("--output=out");
        s.option_files = vec![0];
        assert!(check(&s, 3).is_err(), "no path value");
    }
}
