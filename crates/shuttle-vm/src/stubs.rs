//! Invoke stubs: for every program that an `invoke` rule routes from this VM to another, the
//! shuttle binary (`/run/shuttle/shuttle` in the VM) is bind-mounted, read-only, over that
//! program's path inside this VM. Running the program then runs the stub, which asks this
//! VM's monitor, over the VM's own API socket, to run the real program where the policy says
//! (see `crates/shuttle/src/invoke_cmd.rs` and [`crate::invoke`]).
//!
//! The mounts are made by a short-lived monitor thread that alone enters the VM's mount
//! namespace (`unshare(CLONE_FS)`, then `setns(2)`), with the new mount API on descriptors
//! resolved inside the VM's root, so that rules loaded at run time take effect in a running VM
//! and nothing the VM renames meanwhile can redirect a mount. A bind mount changes none of the
//! VM's files: removing the rule unmounts the stub and the VM's own program is back. A VM
//! cannot remove a stub itself (no `CAP_SYS_ADMIN`, and its seccomp filter refuses every
//! mount call), but nothing depends on that: a request gets only what the policy grants its
//! VM, whatever sends it.
//!
//! A program path that does not exist in the caller's VM gets an empty file of mode 0 as
//! mount point (in the VM's upper layer; removed again with the stub when still empty).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use shuttle_policy::{Action, Op, Policy, Request, Target, VmIdentity};

/// Where the stub binary is inside every VM.
pub const STUB_BINARY: &str = "/run/shuttle/shuttle";

/// Paths a stub is never put on: kernel file systems and Shuttle's own directory.
pub(crate) const NO_STUBS_UNDER: &[&str] = &["/proc", "/sys", "/run/shuttle"];

/// The program paths that need a stub in VM `vm`: the objects of `invoke` rules that the
/// policy routes from this VM to another VM with `allow` or `ask` (a `deny`, or no rule,
/// leaves the VM's own program in place: what no rule routes stays local).
pub fn wanted(policy: &Policy, vm: &str, tags: &[String]) -> BTreeSet<String> {
    let me = VmIdentity::vm(vm, tags);
    policy
        .rules()
        .iter()
        .filter(|r| r.op() == Op::Invoke)
        .map(|r| r.object().as_str())
        .filter(|object| stub_allowed_at(object))
        .filter(|object| {
            let routed = policy.route(&Request::new(Op::Invoke, me, object));
            matches!(routed, Some((d, Some(Target::Vm(to)))) if d.action != Action::Deny && **to != *vm)
        })
        .map(str::to_owned)
        .collect()
}

fn stub_allowed_at(path: &str) -> bool {
    path.starts_with('/')
        && path != "/"
        && !NO_STUBS_UNDER
            .iter()
            .any(|p| path == *p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/')))
}

#[derive(Debug, thiserror::Error)]
pub enum StubError {
    #[error("opening the mount namespace of VM {vm}: {errno}")]
    Namespace { vm: String, errno: Errno },
    #[error("entering the mount namespace of VM {vm}: {errno}")]
    Enter { vm: String, errno: Errno },
    #[error("{what} {path} in VM {vm}: {errno}")]
    Sys {
        vm: String,
        what: &'static str,
        path: String,
        errno: Errno,
    },
    #[error("{path} in VM {vm} is not a regular file ({kind}): name the file itself in the rule")]
    NotAFile {
        vm: String,
        path: String,
        kind: &'static str,
    },
    #[error("the stub placed at {path} in VM {vm} is not there after mounting it")]
    NotVerified { vm: String, path: String },
}

/// A stub in place.
#[derive(Debug, Clone)]
struct Placed {
    /// Shuttle made the (empty) mount point, so it removes it again with the stub.
    created: bool,
    /// Where the stub is mounted in the VM, which differs from the rule's path when a
    /// directory on the way is a symbolic link (`/bin/true` is `/usr/bin/true` on a merged
    /// /usr): the stub knows itself by this path.
    at: String,
}

/// The stubs of one running VM.
#[derive(Debug)]
pub struct Stubs {
    vm: String,
    tags: Vec<String>,
    mount_ns: OwnedFd,
    /// Held while a sync runs, so that syncs never interleave.
    placed: Mutex<BTreeMap<String, Placed>>,
}

impl Stubs {
    /// The stubs of the VM whose init is `init_pid` (the monitor's own child, so the pid cannot
    /// have been reused).
    pub fn new(vm: &str, tags: &[String], init_pid: i32) -> Result<Stubs, StubError> {
        let mount_ns = nix::fcntl::open(
            Path::new(&format!("/proc/{init_pid}/ns/mnt")),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| StubError::Namespace {
            vm: vm.to_owned(),
            errno,
        })?;
        Ok(Stubs {
            vm: vm.to_owned(),
            tags: tags.to_vec(),
            mount_ns,
            placed: Mutex::new(BTreeMap::new()),
        })
    }

    /// The VM's mount namespace.
    pub fn mount_namespace(&self) -> BorrowedFd<'_> {
        self.mount_ns.as_fd()
    }

    /// The stub paths in place now.
    pub fn placed(&self) -> Vec<String> {
        self.placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The rule's program path for a stub that knows itself as `at` (the path it is mounted
    /// at), when the two differ. Only paths Shuttle mounted a stub at are translated, so a
    /// request naming one gets no more than running that stub does.
    pub fn rule_path_for(&self, at: &str) -> Option<String> {
        self.placed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(path, p)| p.at == at && path.as_str() != at)
            .map(|(path, _)| path.clone())
    }

    /// Puts stubs where `policy` wants them and removes those it no longer wants. Failures are
    /// returned one by one (and leave that program as it was: the VM's own); the rest goes on.
    pub fn sync(&self, policy: &Policy) -> Vec<StubError> {
        let want = wanted(policy, &self.vm, &self.tags);
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        let remove: Vec<(String, Placed)> = placed
            .iter()
            .filter(|(p, _)| !want.contains(*p))
            .map(|(p, s)| (p.clone(), s.clone()))
            .collect();
        let add: Vec<String> = want
            .iter()
            .filter(|p| !placed.contains_key(*p))
            .cloned()
            .collect();
        if remove.is_empty() && add.is_empty() {
            return Vec::new();
        }
        let vm = self.vm.as_str();
        let ns = self.mount_ns.as_fd();
        // A thread of its own: it leaves the monitor's mount namespace for good.
        let outcome = std::thread::scope(|s| {
            s.spawn(|| in_vm(vm, ns, &remove, &add))
                .join()
                .unwrap_or_else(|_| {
                    Err(StubError::Enter {
                        vm: vm.to_owned(),
                        errno: Errno::EFAULT,
                    })
                })
        });
        let mut errors = Vec::new();
        match outcome {
            Ok(results) => {
                for (path, result) in results {
                    match result {
                        Ok(Some(state)) => {
                            tracing::info!(vm, %path, "invoke stub placed");
                            placed.insert(path, state);
                        }
                        Ok(None) => {
                            tracing::info!(vm, %path, "invoke stub removed");
                            placed.remove(&path);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "invoke stub");
                            errors.push(e);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "invoke stubs");
                errors.push(e);
            }
        }
        errors
    }
}

/// Per path: `Some` placed, `None` removed, or what failed.
type Results = Vec<(String, Result<Option<Placed>, StubError>)>;

/// Runs on a thread of its own, which it moves into the VM's mount namespace.
fn in_vm(
    vm: &str,
    ns: BorrowedFd<'_>,
    remove: &[(String, Placed)],
    add: &[String],
) -> Result<Results, StubError> {
    // This thread's descriptor directory on the host's /proc, opened before leaving the host's
    // mount namespace: unmounting through it names the exact mount a descriptor holds.
    let own_fds = nix::fcntl::open(
        Path::new("/proc/thread-self/fd"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| StubError::Namespace {
        vm: vm.to_owned(),
        errno,
    })?;
    shuttle_sys::vm_mount::enter_mount_namespace_alone(ns).map_err(|errno| StubError::Enter {
        vm: vm.to_owned(),
        errno,
    })?;
    let sys = |what: &'static str, path: &str| {
        let (vm, path) = (vm.to_owned(), path.to_owned());
        move |errno| StubError::Sys {
            vm,
            what,
            path,
            errno,
        }
    };
    // The thread's root is now the VM's; every path below is resolved beneath it.
    let root = nix::fcntl::open(
        Path::new("/"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("opening the root", "/"))?;
    let stub = resolve(&root, STUB_BINARY).map_err(sys("opening", STUB_BINARY))?;
    let stub_id = identity(&stub).map_err(sys("stat", STUB_BINARY))?;
    let mut results = Vec::new();
    for (path, state) in remove {
        let r = unplace(&root, &own_fds, stub_id, &state.at, state.created)
            .map(|()| None)
            .map_err(|(what, errno)| sys(what, path)(errno));
        results.push((path.clone(), r));
    }
    for path in add {
        let r = place(vm, &root, &own_fds, &stub, stub_id, path);
        results.push((path.clone(), r.map(Some)));
    }
    Ok(results)
}

/// Opens `path` (absolute, in the VM) as an `O_PATH` descriptor without following its last
/// component, resolving everything before it inside the VM's root (nothing followed out of it).
pub(crate) fn resolve(root: &OwnedFd, path: &str) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(root, Path::new(path.trim_start_matches('/')), how)
}

/// Creates `name` in `dir` as an empty file of mode 0 to bind-mount a file over: never
/// through a symbolic link, never over something already there. Mode 0: should what was
/// mounted on it ever be gone while the file stays, using it fails (permission denied) instead
/// of silently doing nothing.
pub(crate) fn create_mount_point_file<P: ?Sized + nix::NixPath>(
    dir: &OwnedFd,
    name: &P,
) -> Result<(), Errno> {
    openat(
        dir,
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(drop)
}

fn identity(fd: &OwnedFd) -> Result<(u64, u64), Errno> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

fn kind_of(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFREG => "a regular file",
        _ => "a special file",
    }
}

/// The directory `dir` (absolute, in the VM), made (mode 0755, root's) where it is missing.
pub(crate) fn directory(root: &OwnedFd, dir: &str) -> Result<OwnedFd, Errno> {
    let how = || {
        OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    match openat2(root, Path::new(dir.trim_start_matches('/')), how()) {
        Err(Errno::ENOENT) => {}
        other => return other,
    }
    // One component at a time. The thread's root is the VM's, so a symbolic link met on the
    // way (absolute or not) resolves inside the VM, like any lookup of the VM's own.
    let step = || {
        OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    let mut at = openat2(root, Path::new("."), how())?;
    for component in dir.split('/').filter(|c| !c.is_empty()) {
        at = match openat2(&at, Path::new(component), step()) {
            Err(Errno::ENOENT) => {
                match nix::sys::stat::mkdirat(&at, component, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e),
                }
                openat2(&at, Path::new(component), step())?
            }
            other => other?,
        };
    }
    Ok(at)
}

fn place(
    vm: &str,
    root: &OwnedFd,
    own_fds: &OwnedFd,
    stub: &OwnedFd,
    stub_id: (u64, u64),
    path: &str,
) -> Result<Placed, StubError> {
    let sys = |what: &'static str| {
        let (vm, path) = (vm.to_owned(), path.to_owned());
        move |errno| StubError::Sys {
            vm,
            what,
            path,
            errno,
        }
    };
    let (parent, name) = match path.rsplit_once('/') {
        Some((p, n)) if !n.is_empty() => (if p.is_empty() { "/" } else { p }, n),
        _ => return Err(sys("placing a stub at")(Errno::EINVAL)),
    };
    let dir = directory(root, parent).map_err(sys("opening the directory of"))?;
    let mut created = false;
    let target = match openat(
        &dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Err(Errno::ENOENT) => {
            // Mode 0: should the stub ever be gone while the file stays, running it fails
            // (permission denied) instead of silently doing nothing.
            create_mount_point_file(&dir, name).map_err(sys("creating a mount point at"))?;
            created = true;
            openat(
                &dir,
                name,
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys("opening"))?
        }
        other => other.map_err(sys("opening"))?,
    };
    // The path the VM (and the stub) will see it at: the descriptor's, from the thread's root.
    let at = nix::fcntl::readlinkat(own_fds, target.as_raw_fd().to_string().as_str())
        .ok()
        .and_then(|p| p.into_string().ok())
        .filter(|p| p.starts_with('/'))
        .unwrap_or_else(|| path.to_owned());
    let st = fstat(&target).map_err(sys("stat"))?;
    if (st.st_dev, st.st_ino) == stub_id {
        return Ok(Placed { created, at });
    }
    // A mount point Shuttle made in an earlier run of the VM is Shuttle's to remove too.
    created |= is_made_mount_point(&st);
    if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
        return Err(StubError::NotAFile {
            vm: vm.to_owned(),
            path: path.to_owned(),
            kind: kind_of(st.st_mode),
        });
    }
    let mount = shuttle_sys::vm_mount::clone_mount(stub.as_fd())
        .map_err(sys("open_tree(OPEN_TREE_CLONE) of the stub for"))?;
    shuttle_sys::vm_mount::restrict(mount.as_fd(), false)
        .map_err(sys("mount_setattr(MOUNT_ATTR_RDONLY) of the stub for"))?;
    shuttle_sys::vm_mount::attach_onto(mount.as_fd(), target.as_fd())
        .map_err(sys("move_mount of the stub onto"))?;
    // Verified by looking the path up anew; a stub that landed elsewhere (the VM renamed the
    // file meanwhile) is taken away again.
    let now = resolve(root, &at).and_then(|fd| identity(&fd));
    if now != Ok(stub_id) {
        if let Ok(mounted) = openat(
            &dir,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            let _ = unmount_through(own_fds, &mounted, stub_id);
        }
        return Err(StubError::NotVerified {
            vm: vm.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(Placed { created, at })
}

/// An empty regular file of mode 0: what [`place`] makes where a program is missing.
pub(crate) fn is_made_mount_point(st: &nix::sys::stat::FileStat) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()
        && st.st_mode & 0o7777 == 0
        && st.st_size == 0
}

/// Unmounts the stub mount `fd` holds, if it is the stub. umount2(2) takes a path: the
/// descriptor's magic link in this thread's host /proc names exactly that mount, whatever the
/// VM did to its path since.
fn unmount_through(
    own_fds: &OwnedFd,
    fd: &OwnedFd,
    stub_id: (u64, u64),
) -> Result<(), (&'static str, Errno)> {
    if identity(fd).map_err(|e| ("stat", e))? != stub_id {
        // Not our stub (any more): nothing to take away.
        return Ok(());
    }
    nix::unistd::fchdir(own_fds).map_err(|e| ("fchdir to /proc/thread-self/fd for", e))?;
    nix::mount::umount2(
        Path::new(&fd.as_raw_fd().to_string()),
        nix::mount::MntFlags::MNT_DETACH,
    )
    .map_err(|e| ("umount2 of the stub at", e))
}

fn unplace(
    root: &OwnedFd,
    own_fds: &OwnedFd,
    stub_id: (u64, u64),
    path: &str,
    created: bool,
) -> Result<(), (&'static str, Errno)> {
    let fd = match resolve(root, path) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(("opening", e)),
    };
    unmount_through(own_fds, &fd, stub_id)?;
    drop(fd);
    if created {
        // The empty mount point Shuttle made goes too, if it is still that.
        if let Some((parent, name)) = path.rsplit_once('/') {
            let parent = if parent.is_empty() { "/" } else { parent };
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            if let Ok(dir) = openat2(root, Path::new(parent.trim_start_matches('/')), how) {
                let empty = nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| is_made_mount_point(&st));
                if empty {
                    let _ =
                        nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
                }
            }
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
op = "invoke"
from = "a"
to = "b"
object = "/usr/bin/sha256sum"
action = "allow"

[[rule]]
op = "invoke"
from = "@any"
to = "b"
object = "/usr/bin/wc"
action = "ask"

[[rule]]
op = "invoke"
from = "c"
to = "b"
object = "/usr/bin/id"
action = "deny"

[[rule]]
op = "invoke"
from = "@any"
to = "b"
object = "/usr/bin/id"
action = "allow"

[[rule]]
op = "invoke"
from = "@tag:mail"
to = "@host"
object = "/usr/bin/evince"
action = "allow"

[[rule]]
op = "invoke"
from = "a"
to = "b"
object = "/proc/self/exe"
action = "allow"

[[rule]]
op = "signal"
from = "a"
to = "b"
object = "/usr/bin/tar"
action = "allow"
"#;

    #[test]
    fn stubs_go_where_rules_route_programs_to_another_vm() {
        let p = policy(RULES);
        let set = |vm: &str, tags: &[String]| wanted(&p, vm, tags).into_iter().collect::<Vec<_>>();
        assert_eq!(
            set("a", &[]),
            ["/usr/bin/id", "/usr/bin/sha256sum", "/usr/bin/wc"]
        );
        // A deny rule that comes first leaves c's own program in place.
        assert_eq!(set("c", &[]), ["/usr/bin/wc"]);
        // Nothing routes b's programs away from b itself.
        assert!(set("b", &[]).is_empty());
        // Invoking on the host is not done: no stub.
        assert_eq!(
            set("m", &["mail".to_owned()]),
            ["/usr/bin/id", "/usr/bin/wc"]
        );
    }

    #[test]
    fn kernel_and_shuttle_paths_never_get_stubs() {
        for p in [
            "/proc/self/exe",
            "/proc",
            "/sys/x",
            "/run/shuttle/shuttle",
            "/",
        ] {
            assert!(!stub_allowed_at(p), "{p}");
        }
        for p in ["/usr/bin/x", "/procfoo/x", "/run/shuttlex", "/run/x"] {
            assert!(stub_allowed_at(p), "{p}");
        }
    }
}
