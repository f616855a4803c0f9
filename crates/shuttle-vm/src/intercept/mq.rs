//! `mq_open`: POSIX message queues a rule routes to another VM are opened in that VM's IPC
//! namespace and injected as the call's result.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use shuttle_audit::Outcome;
use shuttle_policy::{Op, Target};
use shuttle_sys::unotify;

use super::caller::CallerInfo;
use super::target::{as_caller, in_namespace, running_vm, Namespace, TargetVm};
use super::{judge, Call, Judgement};
use crate::vm_api;

/// Answers at once when no rule publishes the queue's name (it then opens in the caller's own
/// IPC namespace); hands the call to a mediator when the policy may route it.
pub(super) fn on_mq_open(call: &Call<'_>) {
    let Ok(raw) = unotify::read_c_string(call.n.pid, call.arg(0), 256) else {
        return call.stay_local();
    };
    if !call.still_pending() {
        return;
    }
    // The C library strips the leading slash; the kernel refuses names with more slashes.
    let Ok(name) = String::from_utf8(raw) else {
        return call.stay_local();
    };
    if name.is_empty() || name.contains('/') {
        return call.stay_local();
    }
    let object = format!("mq:/{name}");
    if !call.policy().publishes(Op::Mq, &object) {
        return call.stay_local();
    }
    mediate(call, &name, &object);
}

fn mediate(call: &Call<'_>, name: &str, object: &str) {
    let Some(info) = CallerInfo::of(call.n.pid, &call.ctx.mediation) else {
        return call.answer(Err(Errno::EACCES));
    };
    // Only while the call is pending is the thread read above known to be the caller.
    if !call.still_pending() {
        return;
    }
    let policy = call.policy();
    let record = call.record("mq", object, &info);
    let (target, mut record) = match judge(call, &policy, Op::Mq, object, record) {
        Judgement::Local => return call.stay_local(),
        Judgement::Refuse => return call.answer(Err(Errno::EACCES)),
        Judgement::Allowed { target, record, .. } => (target, *record),
    };
    let Some(Target::Vm(target_vm)) = target else {
        return call.refuse(record, "queues are routed to VMs only", Errno::EACCES);
    };
    let Some(target) = running_vm(call.ctx, target_vm) else {
        let why = format!("VM {target_vm} is not running");
        return call.refuse(record, &why, Errno::ENOENT);
    };
    let oflag = call.arg(1) as i32;
    let mode = call.arg(2) as u32;
    // Only with O_CREAT does the kernel read the attributes; copy them the same way.
    let attr = if oflag & libc::O_CREAT != 0 && call.arg(3) != 0 {
        match call.read(call.arg(3), size_of::<libc::mq_attr>()) {
            Ok(Some(b)) => {
                let field = |k: usize| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&b[k * 8..k * 8 + 8]);
                    i64::from_ne_bytes(w)
                };
                Some([field(0), field(1), field(2), field(3)])
            }
            Ok(None) => return,
            Err(_) => {
                return call.refuse(record, "unreadable queue attributes", Errno::EFAULT);
            }
        }
    } else {
        None
    };
    // On record before the queue is opened (or created) in the target.
    record.reason = Some(format!("opening {object} in VM {target_vm}"));
    if !vm_api::journal(call.ctx, &record) {
        return call.answer(Err(Errno::EACCES));
    }
    let queue = match open_queue_in(&target, name, oflag, mode, attr, &info) {
        Ok(q) => q,
        Err(e) => {
            record.result = Outcome::Error;
            record.reason = Some(format!("opening the queue in VM {target_vm} failed: {e}"));
            let _ = vm_api::journal(call.ctx, &record);
            return call.answer(Err(e));
        }
    };
    match unotify::inject_fd_as_result(
        call.listener,
        call.n.id,
        queue.as_fd(),
        oflag & libc::O_CLOEXEC != 0,
    ) {
        Ok(_) => call.count(|c| &c.crossed),
        Err(e) => {
            tracing::warn!(vm = %call.ctx.vm, error = %e, "injecting the queue failed");
            call.answer(Err(Errno::EACCES));
        }
    }
}

/// Opens queue `name` in the IPC namespace of `target`, as the caller's uid and gid.
fn open_queue_in(
    target: &TargetVm,
    name: &str,
    oflag: i32,
    mode: u32,
    attr: Option<[i64; 4]>,
    info: &CallerInfo,
) -> Result<OwnedFd, Errno> {
    let cname = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
    in_namespace(target, Namespace::Ipc, || {
        as_caller(info, || {
            unotify::mq_open_raw(&cname, oflag | libc::O_CLOEXEC, mode, attr)
        })
    })
}
