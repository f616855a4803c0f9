//! `share` rules: a directory, file, FIFO or shared-memory file of one VM (the rule's `to`, the
//! owner) or of the host (`to = "@host"`) appears in another VM (the rule's `from`, the
//! receiver) at the same path or at the rule's `at`, read-only unless `mode = "rw"`.
//!
//! The receiving VM's monitor reconciles its shares whenever a policy is loaded and when its VM
//! starts (before the VM is reported running), like the invoke stubs, and re-checks them every
//! second: a share of a VM that is not running is applied once it runs, and one whose owner
//! stopped is taken away (and applied again when it runs again).
//!
//! How one share is applied: a short-lived monitor thread enters the owner's mount namespace
//! alone (for a VM; the host's is the monitor's own), resolves the object there with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` and `O_NOFOLLOW` (nothing is followed out
//! of the owner's root, and a symbolic link as the object itself is refused), and takes a
//! detached copy of it with every mount beneath (`open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`,
//! so what the owner masks stays masked). It then enters the receiver's mount namespace,
//! makes the mount point where it is missing (a directory, or an empty file of mode 0),
//! restricts the copy (`mount_setattr`: read-only unless `rw`, always nosuid and nodev) and
//! attaches it onto the mount point's descriptor (`move_mount`), then verifies that the path
//! now shows the shared inode. Removal unmounts through the descriptor of the mount, whatever
//! the VM renamed since, and removes a mount point Shuttle made if it is still empty. Each
//! share applied, refused and removed is audited (op `share`, from the receiver, to the owner).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use shuttle_audit::{AuditRecord, Caller, Outcome, RuleRef};
use shuttle_policy::{Action, Op, OpParams, Policy, Request, ShareMode, Target, VmIdentity};

use crate::audit_log::VmJournal;
use crate::layout::Layout;

/// Paths never shared from, nor mounted onto, nor above: the root, kernel file systems, the
/// VM's Shuttle directory (its identity socket) and the tmpfs of passed files.
const RESERVED: &[&str] = &["/proc", "/sys", "/run/shuttle", "/shuttle"];

/// Where a share comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Host,
    Vm(String),
}

impl Owner {
    fn audit_name(&self) -> String {
        match self {
            Owner::Host => shuttle_audit::HOST.to_owned(),
            Owner::Vm(vm) => vm.clone(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Owner::Host => "the host".to_owned(),
            Owner::Vm(vm) => format!("VM {vm}"),
        }
    }
}

/// One share the policy wants in a VM (or, `into_host`, on the host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The path in the owner.
    pub object: String,
    pub owner: Owner,
    pub writable: bool,
    /// Programs on it may be executed (else the mount is noexec).
    pub exec: bool,
    /// Shown on the host (under the runtime directory), the owner being this VM.
    pub into_host: bool,
}

/// How the shares on the host are keyed among a VM's shares (mount points in the VM are
/// absolute paths, so they never start with this).
const HOST_KEY: &str = "@host:";

/// The shares of VM `vm`'s objects that the policy shows on the host, by `HOST_KEY` + host
/// mount point: `share` rules whose `from` names `@host` itself (`@any` does not: nothing of a
/// VM appears on the host unless a rule says so in so many words) routing the object to
/// `vm`, with `allow`. They appear at `RUNTIME/shares/VM/PATH`, never elsewhere on the host.
pub fn host_wanted(
    policy: &Policy,
    vm: &str,
    layout: &Layout,
) -> BTreeMap<String, (Wanted, Option<RuleRef>)> {
    let base = layout.host_shares_dir(vm);
    let mut out = BTreeMap::new();
    for r in policy.rules().iter().filter(|r| r.op() == Op::Share) {
        let object = r.object().as_str();
        let Some((d, Some(Target::Vm(to)))) =
            policy.route(&Request::new(Op::Share, VmIdentity::Host, object))
        else {
            continue;
        };
        let Some(rule) = d.rule else { continue };
        let named = rule
            .from()
            .selectors()
            .contains(&shuttle_policy::Selector::Host);
        if **to != *vm || d.action != Action::Allow || !named || !usable(object) {
            continue;
        }
        let OpParams::Share { mode, exec, .. } = &rule.params().op else {
            continue;
        };
        let at = base.join(object.trim_start_matches('/'));
        out.entry(format!("{HOST_KEY}{}", at.display())).or_insert((
            Wanted {
                object: object.to_owned(),
                owner: Owner::Vm(vm.to_owned()),
                writable: *mode == ShareMode::Rw,
                exec: exec.unwrap_or(false),
                into_host: true,
            },
            Some(crate::vm_api::rule_ref(policy, rule)),
        ));
    }
    out
}

/// The shares the policy wants in VM `vm`, by mount point: for each `share` object, the first
/// rule that matches it from this VM decides; with `allow` and another VM (or the host) as
/// `to`, the object is shared. `ask` is not asked (nobody waits for a share to answer) and
/// counts as no.
pub fn wanted(
    policy: &Policy,
    vm: &str,
    tags: &[String],
) -> BTreeMap<String, (Wanted, Option<RuleRef>)> {
    let me = VmIdentity::vm(vm, tags);
    let mut out = BTreeMap::new();
    for r in policy.rules().iter().filter(|r| r.op() == Op::Share) {
        let object = r.object().as_str();
        let Some((d, Some(target))) = policy.route(&Request::new(Op::Share, me, object)) else {
            continue;
        };
        let Some(rule) = d.rule else { continue };
        if d.action != Action::Allow {
            continue;
        }
        let OpParams::Share { mode, at, exec } = &rule.params().op else {
            continue;
        };
        let owner = match target {
            Target::Host => Owner::Host,
            Target::Vm(to) if **to != *vm => Owner::Vm(to.to_string()),
            Target::Vm(_) => continue,
        };
        let at = at.clone().unwrap_or_else(|| object.to_owned());
        if !usable(object) || !usable(&at) {
            continue;
        }
        out.entry(at).or_insert((
            Wanted {
                object: object.to_owned(),
                owner,
                writable: *mode == ShareMode::Rw,
                exec: exec.unwrap_or(true),
                into_host: false,
            },
            Some(crate::vm_api::rule_ref(policy, rule)),
        ));
    }
    out
}

/// Whether `path` (absolute, normalized) may be shared from or mounted onto: not the root, not
/// a reserved path, beneath one, or above one.
pub fn usable(path: &str) -> bool {
    path.starts_with('/')
        && path != "/"
        && !RESERVED.iter().any(|r| {
            path == *r
                || path
                    .strip_prefix(r)
                    .is_some_and(|rest| rest.starts_with('/'))
                || r.strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
}

/// Whether host path `path` is Shuttle's state or runtime directory, beneath one, or above one.
fn touches(path: &Path, dirs: &[PathBuf]) -> bool {
    dirs.iter()
        .any(|d| path.starts_with(d) || d.starts_with(path))
}

/// What Shuttle made to mount a share on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    Nothing,
    File,
    Dir,
}

#[derive(Debug)]
struct Applied {
    want: Wanted,
    /// The owner VM's init, to notice that it stopped.
    owner_init: Option<OwnedFd>,
    /// An `O_PATH` descriptor of the share's mount in the VM.
    mount: OwnedFd,
    /// The shared inode.
    id: (u64, u64),
    made: Made,
}

impl Applied {
    fn owner_alive(&self) -> bool {
        self.owner_init
            .as_ref()
            .is_none_or(|fd| shuttle_sys::process::pidfd_send_signal(fd.as_fd(), 0).is_ok())
    }
}

#[derive(Debug, Default)]
struct State {
    applied: BTreeMap<String, Applied>,
    /// Waiting for the owner VM to run.
    waiting: BTreeMap<String, Wanted>,
    /// Refused (audited once); tried again at the next policy load.
    failed: BTreeMap<String, Wanted>,
}

/// The shares of one running VM.
#[derive(Debug)]
pub struct Shares {
    vm: String,
    tags: Vec<String>,
    layout: Layout,
    journal: Arc<VmJournal>,
    /// The VM's mount namespace: where shares into the VM go, and where shares of the VM's
    /// objects into the host come from.
    mount_ns: OwnedFd,
    /// The host's (the monitor's own), for shares into the host.
    host_ns: OwnedFd,
    state: Mutex<State>,
}

impl Shares {
    /// The shares of the VM whose init is `init_pid` (the monitor's own child).
    pub fn new(
        layout: &Layout,
        vm: &str,
        tags: &[String],
        init_pid: i32,
        journal: Arc<VmJournal>,
    ) -> Result<Shares, Errno> {
        let mount_ns = nix::fcntl::open(
            Path::new(&format!("/proc/{init_pid}/ns/mnt")),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let host_ns = nix::fcntl::open(
            Path::new("/proc/self/ns/mnt"),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // Shares into the host go below a directory only root on the host may enter.
        let shares = layout.host_shares_dir(vm);
        let made = std::fs::create_dir_all(&shares).and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            let top = shares.parent().unwrap_or(&shares);
            std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o700))
        });
        made.map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        Ok(Shares {
            vm: vm.to_owned(),
            tags: tags.to_vec(),
            layout: layout.clone(),
            journal,
            mount_ns,
            host_ns,
            state: Mutex::new(State::default()),
        })
    }

    /// The mount points of the shares in place now.
    pub fn applied(&self) -> Vec<String> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.applied.keys().cloned().collect()
    }

    /// Whether [`Shares::sync`] has work to do without a policy change: an owner started or
    /// stopped.
    pub fn needs_recheck(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.applied.values().any(|a| !a.owner_alive())
            || st.waiting.values().any(|w| match &w.owner {
                Owner::Vm(o) => crate::store::is_running(&self.layout, o),
                Owner::Host => true,
            })
    }

    /// Applies the shares `policy` wants and removes the others. `policy_loaded`: refused
    /// shares are tried again (after a policy load or at start, not on a periodic check).
    pub fn sync(&self, policy: &Policy, policy_loaded: bool) {
        let mut want = wanted(policy, &self.vm, &self.tags);
        want.extend(host_wanted(policy, &self.vm, &self.layout));
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if policy_loaded {
            st.failed.clear();
        }
        let stale: Vec<String> = st
            .applied
            .iter()
            .filter(|(at, a)| {
                !(want.get(*at).is_some_and(|(w, _)| *w == a.want) && a.owner_alive())
            })
            .map(|(at, _)| at.clone())
            .collect();
        for at in stale {
            let Some(a) = st.applied.remove(&at) else {
                continue;
            };
            let still_wanted = want.get(&at).is_some_and(|(w, _)| *w == a.want);
            let why = if still_wanted {
                format!("{} stopped", a.want.owner.describe())
            } else {
                "no rule shares it any more".to_owned()
            };
            let rule = want.get(&at).and_then(|(_, r)| r.clone());
            match self.unapply(&at, &a) {
                Ok(()) => {
                    tracing::info!(vm = %self.vm, %at, "share removed");
                    self.audit(
                        &a.want,
                        &at,
                        Outcome::Deny,
                        rule,
                        format!("share removed from {at}: {why}"),
                    );
                }
                Err(e) => {
                    tracing::error!(vm = %self.vm, %at, error = %e, "removing a share");
                    self.audit(
                        &a.want,
                        &at,
                        Outcome::Error,
                        rule,
                        format!("removing the share at {at} failed: {e}"),
                    );
                    // Still mounted: kept, so that a later sync tries again.
                    st.applied.insert(at, a);
                }
            }
        }
        st.waiting
            .retain(|at, w| want.get(at).is_some_and(|(x, _)| x == w));
        st.failed
            .retain(|at, w| want.get(at).is_some_and(|(x, _)| x == w));
        for (at, (w, rule)) in want {
            if st.applied.contains_key(&at) || st.failed.contains_key(&at) {
                continue;
            }
            match self.apply(&at, &w, rule.clone()) {
                Ok(Some(a)) => {
                    tracing::info!(vm = %self.vm, %at, object = %w.object, "share applied");
                    st.waiting.remove(&at);
                    st.applied.insert(at, a);
                }
                Ok(None) => {
                    if st.waiting.insert(at.clone(), w.clone()).is_none() {
                        tracing::info!(vm = %self.vm, %at, "share waits for {}", w.owner.describe());
                    }
                }
                Err(e) => {
                    tracing::error!(vm = %self.vm, %at, error = %e, "share refused");
                    st.waiting.remove(&at);
                    self.audit(&w, &at, Outcome::Error, rule, format!("share refused: {e}"));
                    st.failed.insert(at, w);
                }
            }
        }
        self.record_owners(&st);
    }

    /// Writes the VMs this VM holds shares of to its runtime directory, for
    /// [`wait_for_receivers`].
    fn record_owners(&self, st: &State) {
        let owners: std::collections::BTreeSet<&str> = st
            .applied
            .values()
            .filter(|a| !a.want.into_host)
            .filter_map(|a| match &a.want.owner {
                Owner::Vm(o) => Some(o.as_str()),
                Owner::Host => None,
            })
            .collect();
        let file = owners_file(&self.layout, &self.vm);
        let text: String = owners.iter().map(|o| format!("{o}\n")).collect();
        if std::fs::read_to_string(&file).unwrap_or_default() == text {
            return;
        }
        let tmp = file.with_extension("tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &file));
        if let Err(e) = written {
            tracing::warn!(vm = %self.vm, error = %e, "recording the owners of shares");
        }
    }

    fn audit(
        &self,
        w: &Wanted,
        at: &str,
        result: Outcome,
        rule: Option<RuleRef>,
        reason: String,
    ) -> bool {
        let at = at.strip_prefix(HOST_KEY).unwrap_or(at);
        // Into the host: the host receives, this VM owns.
        let (from, to) = if w.into_host {
            (shuttle_audit::HOST.to_owned(), self.vm.clone())
        } else {
            (self.vm.clone(), w.owner.audit_name())
        };
        let record = AuditRecord {
            time: shuttle_audit::now_unix_nanos(),
            op: "share".into(),
            from,
            to: Some(to),
            object: w.object.clone(),
            result,
            rule,
            caller: Caller::default(),
            reason: Some(if at == w.object || reason.contains(at) {
                reason
            } else {
                format!("{reason} (at {at})")
            }),
            seq: 0,
        };
        self.journal.record(&self.vm, &record)
    }

    /// `Ok(None)`: the owner VM is not running.
    fn apply(
        &self,
        at: &str,
        w: &Wanted,
        rule: Option<RuleRef>,
    ) -> Result<Option<Applied>, String> {
        if let Some(host_at) = at.strip_prefix(HOST_KEY) {
            return self.apply_on_host(host_at, w, rule).map(Some);
        }
        let owner = match &w.owner {
            Owner::Host => None,
            Owner::Vm(o) => {
                if !crate::store::is_running(&self.layout, o) {
                    return Ok(None);
                }
                // Starting or stopping right now (locked, not serving yet): waits, and the
                // periodic check tries again.
                let Ok(ns) = crate::transfer::target_ns(&self.layout, o) else {
                    return Ok(None);
                };
                let pidfd = shuttle_sys::process::pidfd_open(ns.init_pid())
                    .map_err(|e| format!("VM {o}'s init: {e}"))?;
                Some((ns, pidfd))
            }
        };
        let mode = if w.writable {
            "read-write"
        } else {
            "read-only"
        };
        // Journaled before it takes effect, like every cross-VM decision.
        if !self.audit(
            w,
            at,
            Outcome::Allow,
            rule,
            format!(
                "{} of {} shared at {at} {mode}",
                w.object,
                w.owner.describe()
            ),
        ) {
            return Err("the audit journal cannot be written".into());
        }
        let forbidden = [self.layout.state.clone(), self.layout.runtime.clone()];
        let owner_ns = owner.as_ref().map(|(ns, _)| ns.mount_ns());
        let receiver = self.mount_ns.as_fd();
        let (mount, id, made) = std::thread::scope(|s| {
            s.spawn(|| {
                mount_share(
                    owner_ns,
                    receiver,
                    &w.object,
                    at,
                    (w.writable, w.exec),
                    &forbidden,
                )
            })
            .join()
            .unwrap_or_else(|_| Err("the share thread panicked".into()))
        })?;
        Ok(Some(Applied {
            want: w.clone(),
            owner_init: owner.map(|(_, pidfd)| pidfd),
            mount,
            id,
            made,
        }))
    }

    /// A share of this VM's object `w.object` on the host at `at`.
    fn apply_on_host(
        &self,
        at: &str,
        w: &Wanted,
        rule: Option<RuleRef>,
    ) -> Result<Applied, String> {
        let mode = if w.writable {
            "read-write"
        } else {
            "read-only"
        };
        let exec = if w.exec { "" } else { ", noexec" };
        if !self.audit(
            w,
            at,
            Outcome::Allow,
            rule,
            format!(
                "{} of VM {} shown on the host at {at} {mode}{exec}",
                w.object, self.vm
            ),
        ) {
            return Err("the audit journal cannot be written".into());
        }
        let base = self.layout.host_shares_dir(&self.vm);
        let (vm_ns, host_ns) = (self.mount_ns.as_fd(), self.host_ns.as_fd());
        let (mount, id, made) = std::thread::scope(|s| {
            s.spawn(|| mount_on_host(vm_ns, host_ns, &base, w))
                .join()
                .unwrap_or_else(|_| Err("the share thread panicked".into()))
        })?;
        Ok(Applied {
            want: w.clone(),
            owner_init: None,
            mount,
            id,
            made,
        })
    }

    fn unapply(&self, at: &str, a: &Applied) -> Result<(), String> {
        let base = at
            .starts_with(HOST_KEY)
            .then(|| self.layout.host_shares_dir(&self.vm));
        let (receiver, at) = match at.strip_prefix(HOST_KEY) {
            Some(host_at) => (self.host_ns.as_fd(), host_at),
            None => (self.mount_ns.as_fd(), at),
        };
        std::thread::scope(|s| {
            s.spawn(|| unmount_share(receiver, at, base.as_deref(), a))
                .join()
                .unwrap_or_else(|_| Err("the share thread panicked".into()))
        })
    }
}

/// Where a running VM records the VMs it holds shares of.
fn owners_file(layout: &Layout, vm: &str) -> PathBuf {
    layout.runtime_vm_dir(vm).join("shares-from")
}

/// Before VM `owner` starts: waits (up to `timeout`) until no running VM holds a share of its
/// previous run any more. A share keeps the owner's old overlay mounted; a new overlay on the
/// same upper and work directories must not be mounted while it is (overlayfs: undefined
/// behaviour). Receivers let go within a second of the owner's end (their periodic check).
pub fn wait_for_receivers(layout: &Layout, owner: &str, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    let held = || {
        std::fs::read_dir(layout.runtime_vms_dir())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|vm| vm != owner)
            .find(|vm| {
                std::fs::read_to_string(owners_file(layout, vm))
                    .is_ok_and(|t| t.lines().any(|l| l == owner))
                    && crate::store::is_running(layout, vm)
            })
    };
    while let Some(vm) = held() {
        if std::time::Instant::now() >= deadline {
            tracing::warn!(owner, receiver = %vm, "a share of this VM's previous run is still held");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn errno(what: &'static str, path: &str) -> impl Fn(Errno) -> String {
    let path = path.to_owned();
    move |e| format!("{what} {path}: {e}")
}

fn open_root() -> Result<OwnedFd, String> {
    nix::fcntl::open(
        Path::new("/"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("opening the root", "/"))
}

fn own_fds() -> Result<OwnedFd, String> {
    nix::fcntl::open(
        Path::new("/proc/thread-self/fd"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("opening", "/proc/thread-self/fd"))
}

fn kind(mode: u32) -> SFlag {
    SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits())
}

/// Runs on a thread of its own, which it moves into the owner's mount namespace (unless the
/// host owns the object), then into the receiver's.
fn mount_share(
    owner_ns: Option<BorrowedFd<'_>>,
    receiver_ns: BorrowedFd<'_>,
    object: &str,
    at: &str,
    (writable, exec): (bool, bool),
    forbidden: &[PathBuf],
) -> Result<(OwnedFd, (u64, u64), Made), String> {
    let fds = own_fds()?;
    let (tree, st, is_dir) = take_from_owner(owner_ns, object, forbidden, &fds)?;
    shuttle_sys::vm_mount::enter_mount_namespace_alone(receiver_ns).map_err(errno(
        "entering the mount namespace of the VM to show",
        object,
    ))?;
    let root = open_root()?;
    let (point, made) = mount_point(&root, at, is_dir)?;
    shuttle_sys::vm_mount::restrict_tree_attrs(tree.as_fd(), writable, !exec, false)
        .map_err(errno("mount_setattr of the share for", at))?;
    shuttle_sys::vm_mount::attach_onto(tree.as_fd(), point.as_fd())
        .map_err(errno("move_mount of the share onto", at))?;
    let mounted = crate::stubs::resolve(&root, at).map_err(errno("opening the share at", at))?;
    let now = fstat(&mounted).map_err(errno("stat of the share at", at))?;
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
        // Landed elsewhere (the VM renamed something meanwhile): taken away again.
        let _ = nix::unistd::fchdir(&fds);
        let _ = nix::mount::umount2(
            Path::new(&point.as_raw_fd().to_string()),
            nix::mount::MntFlags::MNT_DETACH,
        );
        return Err(format!("the share is not at {at} after mounting it"));
    }
    Ok((mounted, (st.st_dev, st.st_ino), made))
}

/// On a thread of its own, which it moves into VM `vm_ns`'s mount namespace and then back
/// into the host's (`host_ns`): shows the VM's `w.object` at `base`/PATH on the host. The
/// mount is nosuid, nodev, nosymfollow (a link in the VM's tree is never followed on the host,
/// by anyone: it cannot lead a host program to the host's own files), noexec unless the rule
/// says `exec = true`, and read-only unless `mode = "rw"`. The mount point is made below
/// `base` (Shuttle's runtime directory, 0700) without following any link or crossing any
/// mount, so one share can never be mounted inside another (whose contents the VM controls).
fn mount_on_host(
    vm_ns: BorrowedFd<'_>,
    host_ns: BorrowedFd<'_>,
    base: &Path,
    w: &Wanted,
) -> Result<(OwnedFd, (u64, u64), Made), String> {
    let object = w.object.as_str();
    let fds = own_fds()?;
    let (tree, st, is_dir) = take_from_owner(Some(vm_ns), object, &[], &fds)?;
    shuttle_sys::vm_mount::enter_mount_namespace_alone(host_ns)
        .map_err(errno("entering the host's mount namespace to show", object))?;
    let base_fd = nix::fcntl::open(
        base,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("opening", &base.display().to_string()))?;
    let components: Vec<&str> = object.split('/').filter(|c| !c.is_empty()).collect();
    let Some((last, dirs)) = components.split_last() else {
        return Err(format!("{object}: nothing to share"));
    };
    let mut dir = base_fd;
    for d in dirs {
        dir = crate::transfer::subdir(&dir, d.as_bytes())
            .map_err(errno("making the directories on the host for", object))?;
    }
    let open_point = |dir: &OwnedFd| {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            );
        openat2(dir, Path::new(*last), how)
    };
    let (point, made) = match open_point(&dir) {
        Ok(fd) => (fd, Made::Nothing),
        Err(Errno::ENOENT) if is_dir => {
            let fd = crate::transfer::subdir(&dir, last.as_bytes())
                .map_err(errno("making the mount point on the host for", object))?;
            (fd, Made::Dir)
        }
        Err(Errno::ENOENT) => {
            crate::stubs::create_mount_point_file(&dir, Path::new(*last))
                .map_err(errno("making the mount point on the host for", object))?;
            let fd = open_point(&dir).map_err(errno("opening the mount point for", object))?;
            (fd, Made::File)
        }
        Err(e) => return Err(format!("the mount point on the host for {object}: {e}")),
    };
    let pst = fstat(&point).map_err(errno("stat of the mount point for", object))?;
    if (kind(pst.st_mode) == SFlag::S_IFDIR) != is_dir {
        return Err(format!(
            "something else is in the way on the host for {object}"
        ));
    }
    shuttle_sys::vm_mount::restrict_tree_attrs(tree.as_fd(), w.writable, !w.exec, true)
        .map_err(errno("mount_setattr of the share of", object))?;
    shuttle_sys::vm_mount::attach_onto(tree.as_fd(), point.as_fd())
        .map_err(errno("move_mount of the share of", object))?;
    let mounted = openat(
        &dir,
        Path::new(*last),
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("opening the share of", object))?;
    let now = fstat(&mounted).map_err(errno("stat of the share of", object))?;
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
        let _ = nix::unistd::fchdir(&fds);
        let _ = nix::mount::umount2(
            Path::new(&point.as_raw_fd().to_string()),
            nix::mount::MntFlags::MNT_DETACH,
        );
        return Err(format!(
            "the share of {object} is not on the host after mounting it"
        ));
    }
    Ok((mounted, (st.st_dev, st.st_ino), made))
}

/// The owner's side of a share, on the calling thread (moved into `owner_ns` unless the host
/// owns the object): the object resolved inside the owner's root and checked, and a detached
/// copy of it with every mount beneath it; with its stat and whether it is a directory.
fn take_from_owner(
    owner_ns: Option<BorrowedFd<'_>>,
    object: &str,
    forbidden: &[PathBuf],
    fds: &OwnedFd,
) -> Result<(OwnedFd, nix::sys::stat::FileStat, bool), String> {
    if let Some(ns) = owner_ns {
        shuttle_sys::vm_mount::enter_mount_namespace_alone(ns).map_err(errno(
            "entering the mount namespace of the owner of",
            object,
        ))?;
    }
    let root = open_root()?;
    let source = crate::stubs::resolve(&root, object).map_err(errno("opening", object))?;
    let st = fstat(&source).map_err(errno("stat", object))?;
    let is_dir = match kind(st.st_mode) {
        SFlag::S_IFDIR => true,
        SFlag::S_IFREG | SFlag::S_IFIFO | SFlag::S_IFSOCK => false,
        SFlag::S_IFLNK => {
            return Err(format!(
                "{object} is a symbolic link: name what it points to in the rule"
            ))
        }
        _ => return Err(format!("{object} is a device: devices are not shared")),
    };
    // Where it really is, seen from the owner's root (links on the way resolved there).
    let real = nix::fcntl::readlinkat(fds, source.as_raw_fd().to_string().as_str())
        .map_err(errno("reading the path of", object))?;
    let real_str = real.to_string_lossy();
    if !usable(&real_str) {
        return Err(format!(
            "{object} leads to {real_str}, which is never shared"
        ));
    }
    if owner_ns.is_none() && touches(Path::new(&real), forbidden) {
        return Err(format!(
            "{object} is Shuttle's state or runtime directory or holds it: never shared"
        ));
    }
    let fs = nix::sys::statfs::fstatfs(&source).map_err(errno("statfs", object))?;
    if crate::transfer::PSEUDO_FS.contains(&(fs.filesystem_type().0 as i64)) {
        return Err(format!("{object} is on a kernel file system: never shared"));
    }
    // The copy is recursive: a kernel file system mounted beneath the object (`/dev` holds
    // devpts and mqueue) would come along. Looked at before and after the copy (a VM cannot
    // mount, and the host's mounts change only by root's hand).
    let submount = || kernel_submount(fds, &real_str);
    if let Some(m) = submount()? {
        return Err(format!(
            "{object} holds a kernel file system at {m}: never shared"
        ));
    }
    let tree = shuttle_sys::vm_mount::clone_tree(source.as_fd())
        .map_err(errno("open_tree(OPEN_TREE_CLONE|AT_RECURSIVE) of", object))?;
    if let Some(m) = submount()? {
        return Err(format!(
            "{object} holds a kernel file system at {m}: never shared"
        ));
    }
    Ok((tree, st, is_dir))
}

/// The first mount of a kernel file system strictly beneath `path` in the thread's mount
/// namespace ("POINT (TYPE)"), read from its own mountinfo (through `fds`, the thread's host
/// `/proc/thread-self/fd`: the file shows the namespace the thread is in when it is opened).
fn kernel_submount(fds: &OwnedFd, path: &str) -> Result<Option<String>, String> {
    use std::io::Read;
    let file = openat(
        fds,
        Path::new("../mountinfo"),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("opening", "/proc/thread-self/mountinfo"))?;
    let mut text = String::new();
    std::fs::File::from(file)
        .read_to_string(&mut text)
        .map_err(|e| format!("reading /proc/thread-self/mountinfo: {e}"))?;
    let prefix = format!("{}/", path.trim_end_matches('/'));
    Ok(text.lines().find_map(|line| {
        let point = unescape_mountinfo(line.split(' ').nth(4)?);
        let fstype = line.split_once(" - ")?.1.split(' ').next()?;
        (point.starts_with(&prefix) && crate::transfer::PSEUDO_FS_NAMES.contains(&fstype))
            .then(|| format!("{point} ({fstype})"))
    }))
}

/// Takes away whatever is left of VM `vm`'s shares on the host (its monitor stopping, or a
/// crashed monitor's leftovers): every mount below `RUNTIME/shares/VM` is detached, deepest
/// first, then the directories and empty mount-point files Shuttle made there are removed,
/// never crossing into a mount (a share whose unmount failed keeps its files untouched).
pub fn clear_host_shares(layout: &Layout, vm: &str) {
    let base = layout.host_shares_dir(vm);
    let prefix = format!("{}/", base.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in &points {
        // Never through a symbolic link at the last component (UMOUNT_NOFOLLOW); the
        // directories above are Shuttle's own, made without following any.
        let flags = nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW;
        if let Err(e) = nix::mount::umount2(Path::new(p), flags) {
            tracing::error!(vm, path = %p, error = %e, "taking a share away from the host");
        }
    }
    let Ok(top) = std::fs::symlink_metadata(&base) else {
        return;
    };
    remove_made(&base, std::os::unix::fs::MetadataExt::dev(&top));
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes, bottom up, the directories and empty mode-0 files below `path` (itself included)
/// on device `dev`; nothing else, and nothing on another file system.
fn remove_made(path: &Path, dev: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.dev() != dev {
        return;
    }
    if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                remove_made(&e.path(), dev);
            }
        }
        let _ = std::fs::remove_dir(path);
    } else if meta.is_file() && meta.len() == 0 && meta.mode() & 0o7777 == 0 {
        let _ = std::fs::remove_file(path);
    }
}

/// The mount point `at` in the VM (the thread's root), made where it is missing.
fn mount_point(root: &OwnedFd, at: &str, is_dir: bool) -> Result<(OwnedFd, Made), String> {
    let in_the_way = || {
        format!(
            "something else than a {} is at {at}",
            if is_dir { "directory" } else { "file" }
        )
    };
    match crate::stubs::resolve(root, at) {
        Ok(fd) => {
            let st = fstat(&fd).map_err(errno("stat", at))?;
            let ok = match kind(st.st_mode) {
                SFlag::S_IFDIR => is_dir,
                SFlag::S_IFLNK => false,
                _ => !is_dir,
            };
            if !ok {
                return Err(in_the_way());
            }
            return Ok((fd, Made::Nothing));
        }
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(format!("opening {at}: {e}")),
    }
    if is_dir {
        let fd = crate::stubs::directory(root, at).map_err(errno("making the directory", at))?;
        return Ok((fd, Made::Dir));
    }
    let (parent, name) = split(at).ok_or_else(in_the_way)?;
    let dir =
        crate::stubs::directory(root, parent).map_err(errno("making the directory", parent))?;
    crate::stubs::create_mount_point_file(&dir, name)
        .map_err(errno("making a mount point at", at))?;
    let fd = openat(
        &dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("opening", at))?;
    Ok((fd, Made::File))
}

fn split(path: &str) -> Option<(&str, &str)> {
    match path.rsplit_once('/') {
        Some((p, n)) if !n.is_empty() => Some((if p.is_empty() { "/" } else { p }, n)),
        _ => None,
    }
}

/// Runs on a thread of its own, which it moves into the receiver's mount namespace. `base`:
/// on the host, the VM's `RUNTIME/shares/VM`, below which `at` lies; the mount point's
/// directory is then opened from it without following any link or crossing any mount (a
/// VM's share may hold links), never from `/`.
fn unmount_share(
    receiver_ns: BorrowedFd<'_>,
    at: &str,
    base: Option<&Path>,
    a: &Applied,
) -> Result<(), String> {
    let fds = own_fds()?;
    shuttle_sys::vm_mount::enter_mount_namespace_alone(receiver_ns)
        .map_err(errno("entering the mount namespace of the VM at", at))?;
    let st = fstat(&a.mount).map_err(errno("stat of the share at", at))?;
    if (st.st_dev, st.st_ino) == a.id {
        // umount2(2) takes a path: the descriptor's magic link in this thread's host /proc
        // names exactly the share's mount.
        nix::unistd::fchdir(&fds).map_err(errno("fchdir to", "/proc/thread-self/fd"))?;
        nix::mount::umount2(
            Path::new(&a.mount.as_raw_fd().to_string()),
            nix::mount::MntFlags::MNT_DETACH,
        )
        .map_err(errno("umount2 of the share at", at))?;
    }
    if a.made == Made::Nothing {
        return Ok(());
    }
    // The mount point Shuttle made goes too, if it is still empty.
    let Some((parent, name)) = split(at) else {
        return Ok(());
    };
    let dir = match base {
        Some(base) => {
            let Ok(relative) = Path::new(parent).strip_prefix(base) else {
                return Err(format!("{at} is not below {}", base.display()));
            };
            let base_fd = nix::fcntl::open(
                base,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno("opening", &base.display().to_string()))?;
            let relative = if relative.as_os_str().is_empty() {
                Path::new(".")
            } else {
                relative
            };
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(
                    ResolveFlag::RESOLVE_BENEATH
                        | ResolveFlag::RESOLVE_NO_SYMLINKS
                        | ResolveFlag::RESOLVE_NO_MAGICLINKS
                        | ResolveFlag::RESOLVE_NO_XDEV,
                );
            openat2(&base_fd, relative, how)
        }
        None => {
            let root = open_root()?;
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            openat2(&root, Path::new(parent.trim_start_matches('/')), how)
        }
    };
    if let Ok(dir) = dir {
        match a.made {
            Made::Dir => {
                let _ = nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::RemoveDir);
            }
            Made::File => {
                let empty =
                    nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| crate::stubs::is_made_mount_point(&st));
                if empty {
                    let _ =
                        nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
                }
            }
            Made::Nothing => {}
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::parse("test.toml", text).unwrap()
    }

    const RULES: &str = r#"
[[rule]]
op = "share"
from = "b"
to = "a"
object = "/srv/data"
action = "allow"

[[rule]]
op = "share"
from = "@any"
to = "@host"
object = "/opt/tools"
mode = "rw"
at = "/tools"
action = "allow"

[[rule]]
op = "share"
from = "c"
to = "a"
object = "/srv/ask"
action = "ask"

[[rule]]
op = "share"
from = "c"
to = "a"
object = "/srv/no"
action = "deny"

[[rule]]
op = "share"
from = "@any"
to = "a"
object = "/srv/no"
action = "allow"

[[rule]]
op = "share"
from = "b"
to = "a"
object = "/run"
action = "allow"
"#;

    #[test]
    fn shares_go_where_rules_route_objects() {
        let p = policy(RULES);
        let b = wanted(&p, "b", &[]);
        assert_eq!(
            b.keys().collect::<Vec<_>>(),
            ["/srv/data", "/srv/no", "/tools"]
        );
        assert_eq!(
            b["/srv/data"].0,
            Wanted {
                object: "/srv/data".into(),
                owner: Owner::Vm("a".into()),
                writable: false,
                exec: true,
                into_host: false,
            }
        );
        assert_eq!(
            b["/tools"].0,
            Wanted {
                object: "/opt/tools".into(),
                owner: Owner::Host,
                writable: true,
                exec: true,
                into_host: false,
            }
        );
        // ask and deny share nothing; the owner gets nothing of its own back.
        let c = wanted(&p, "c", &[]);
        assert_eq!(c.keys().collect::<Vec<_>>(), ["/tools"]);
        let a = wanted(&p, "a", &[]);
        assert_eq!(a.keys().collect::<Vec<_>>(), ["/tools"]);
        // Only a rule naming @host itself shows a VM's object on the host (`@any` is not
        // enough), and only under the runtime directory.
        let layout = Layout::under(Path::new("/x"));
        assert!(host_wanted(&p, "a", &layout).is_empty());
        let text = format!(
            "{RULES}\n[[rule]]\nop = \"share\"\nfrom = \"@host\"\nto = \"a\"\nobject = \"/srv/out\"\naction = \"allow\"\n"
        );
        let p = policy(&text);
        let host = host_wanted(&p, "a", &layout);
        let (key, (w, _)) = host.iter().next().unwrap();
        assert_eq!(key, "@host:/x/run/shares/a/srv/out");
        assert!(w.into_host && !w.exec && !w.writable);
        assert!(host_wanted(&p, "b", &layout).is_empty());
    }

    #[test]
    fn reserved_paths_are_never_shared() {
        for p in [
            "/",
            "/proc",
            "/proc/1",
            "/sys/x",
            "/run",
            "/run/shuttle",
            "/shuttle/from/a",
            "rel",
        ] {
            assert!(!usable(p), "{p}");
        }
        for p in ["/srv", "/run/x", "/dev/shm/x", "/procx", "/runx"] {
            assert!(usable(p), "{p}");
        }
        let dirs = [PathBuf::from("/var/lib/shuttle")];
        assert!(touches(Path::new("/var"), &dirs));
        assert!(touches(Path::new("/var/lib/shuttle/vms"), &dirs));
        assert!(!touches(Path::new("/var/lib/shuttlex"), &dirs));
        assert!(!touches(Path::new("/srv"), &dirs));
    }
}
