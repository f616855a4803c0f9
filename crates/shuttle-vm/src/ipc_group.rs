//! SysV IPC across VMs (`ipc-group` rules): coarse by design. SysV objects are found by key,
//! with no descriptor to hand over, so the VMs of one group share one IPC namespace (SysV
//! shared memory, semaphores, message queues, and POSIX queues too) for as long as they run.
//!
//! A VM belongs to the group named by the first `ipc-group` rule that allows it (on either
//! side). When it starts, it joins the IPC namespace of a running member of that group that
//! the policy lets it share with (`from` this VM `to` the member, or the reverse); with none
//! running it starts the group's namespace itself. The decision is taken at start: a rule
//! loaded later applies when the VM next starts, and the join is audited.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use shuttle_audit::{AuditRecord, Caller, Outcome};
use shuttle_policy::{Action, Op, Policy, Request, VmIdentity};

use crate::cgroup::VmCgroup;
use crate::config::VmConfig;
use crate::layout::Layout;
use crate::{store, vm_api};

/// What a starting VM does about IPC.
#[derive(Debug)]
pub struct IpcPlan {
    /// The group the VM belongs to, recorded while it runs so that others can find it.
    pub group: Option<String>,
    /// The IPC namespace to enter instead of a new one, and the audit record of that decision.
    pub join: Option<(OwnedFd, AuditRecord)>,
}

/// Works out the IPC plan of VM `config` under `policy`.
pub fn plan(layout: &Layout, policy: &Policy, config: &VmConfig) -> IpcPlan {
    let me = VmIdentity::vm(&config.name, &config.tags);
    let group = policy.rules().iter().find_map(|r| {
        let names_me = r.from().matches(&me) || r.to().matches(&me);
        (r.op() == Op::IpcGroup && r.action() == Action::Allow && names_me && !r.object().is_glob())
            .then(|| r.object().as_str().to_owned())
    });
    let Some(group) = group else {
        return IpcPlan {
            group: None,
            join: None,
        };
    };
    let members = store::list(layout)
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .filter(|peer| peer.name != config.name && store::is_running(layout, &peer.name))
        .filter(|peer| recorded_group(layout, &peer.name).as_deref() == Some(group.as_str()));
    for peer in members {
        let them = VmIdentity::vm(&peer.name, &peer.tags);
        let allowed = |from, to| policy.decide(&Request::new(Op::IpcGroup, from, &group).to(to));
        let decision = [allowed(me, them), allowed(them, me)]
            .into_iter()
            .find(|d| d.action == Action::Allow);
        let Some(decision) = decision else { continue };
        let Some(ns) = ipc_namespace_of(layout, &peer.name) else {
            continue;
        };
        let record = AuditRecord {
            time: shuttle_audit::now_unix_nanos(),
            op: "ipc-group".into(),
            from: config.name.clone(),
            to: Some(peer.name.clone()),
            object: group.clone(),
            result: Outcome::Allow,
            rule: decision.rule.map(|r| vm_api::rule_ref(policy, r)),
            caller: Caller::default(),
            reason: Some(format!("joined the SysV IPC namespace of VM {}", peer.name)),
            seq: 0,
        };
        return IpcPlan {
            group: Some(group),
            join: Some((ns, record)),
        };
    }
    IpcPlan {
        group: Some(group),
        join: None,
    }
}

/// The group a running VM recorded when it started.
pub fn recorded_group(layout: &Layout, vm: &str) -> Option<String> {
    std::fs::read_to_string(layout.ipc_group_file(vm))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Opens the IPC namespace of running VM `vm`'s init, checked to be that init's.
fn ipc_namespace_of(layout: &Layout, vm: &str) -> Option<OwnedFd> {
    let cg = VmCgroup::existing(&layout.cgroup_parent(), vm)?;
    let pid = cg.pids().into_iter().find(|p| vm_api::is_vm_init(*p))?;
    let pidfd = shuttle_sys::process::pidfd_open(pid).ok()?;
    let ns = nix::fcntl::open(
        Path::new(&format!("/proc/{pid}/ns/ipc")),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let alive = shuttle_sys::process::pidfd_send_signal(pidfd.as_fd(), 0).is_ok();
    (alive && vm_api::is_vm_init(pid) && cg.contains_pid_in_any(pid)).then_some(ns)
}
