//! Resource name transfer for invocations: a file named in the arguments of an invoked program
//! is opened by the stub in the caller's VM (so nothing the caller could not open itself is
//! ever passed), and its descriptor comes along. The caller's monitor shows exactly that file
//! to the target VM at `/shuttle/from/CALLER/PATH`, where PATH is the file's own path in the
//! caller's VM (symbolic links resolved there, by the kernel, from the descriptor: not what the
//! request says), read-only unless the rule grants `files = "read-write"` and the caller could
//! open it for writing; the argument is rewritten to that path. FVM's renaming scheme, readable
//! by humans.
//!
//! How: a monitor thread enters the caller's mount namespace alone, reads the descriptor's path
//! there and takes a detached bind mount of it (`open_tree(OPEN_TREE_CLONE)`); it then enters
//! the target's mount namespace, where `/shuttle` is a small tmpfs of Shuttle's (mounted on
//! first use), makes the mount point under `from/CALLER/` and attaches the file onto it
//! (`move_mount`), read-only, nosuid, nodev. When the program ends the file is unmounted (once
//! no other running invocation uses it) and its mount point removed. Only regular files of
//! ordinary file systems qualify: directories, devices, FIFOs, sockets and the files of
//! kernel file systems (`/proc`, `/sys`, ...) are passed as plain strings.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use shuttle_proto::Bytes;

use crate::client;
use crate::layout::Layout;

/// The most file arguments one invocation passes.
pub(crate) const MAX_FILES: usize = 64;

/// Where the target VM sees files of other VMs.
pub const FROM_DIR: &str = "/shuttle/from";

/// File systems whose "regular files" are views of the kernel (or of a VM's processes), never
/// passed to another VM.
pub(crate) const PSEUDO_FS: &[i64] = &[
    libc::PROC_SUPER_MAGIC,
    libc::SYSFS_MAGIC,
    libc::CGROUP_SUPER_MAGIC,
    libc::CGROUP2_SUPER_MAGIC,
    libc::DEVPTS_SUPER_MAGIC,
    libc::SECURITYFS_MAGIC,
    libc::DEBUGFS_MAGIC,
    libc::TRACEFS_MAGIC,
    libc::BPF_FS_MAGIC,
    libc::NSFS_MAGIC,
    libc::SELINUX_MAGIC,
    libc::SMACK_MAGIC,
    libc::HUGETLBFS_MAGIC,
    0x6165_676C,            // pstore
    0xde5e_81e4_u32 as i64, // efivarfs
    0x1980_0202,            // mqueue
    0x6265_6570,            // configfs
    0x6573_5543,            // fusectl
    0x4249_4e4d,            // binfmt_misc
];

/// The names `/proc/self/mountinfo` gives the file systems of [`PSEUDO_FS`] (and `sysfs`'
/// kin): a share whose tree holds a mount of one of them is refused.
pub(crate) const PSEUDO_FS_NAMES: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "securityfs",
    "debugfs",
    "tracefs",
    "bpf",
    "nsfs",
    "selinuxfs",
    "smackfs",
    "hugetlbfs",
    "pstore",
    "efivarfs",
    "mqueue",
    "configfs",
    "fusectl",
    "binfmt_misc",
];

/// Every short option letter and digit: what the stub, which does not know the rule, announces
/// as candidates.
pub const ANY_SHORT_OPTION: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Where the value starts in an option argument whose value may name a file: `--NAME=VALUE`
/// (NAME of letters, digits, `-` and `_`), or `-XVALUE` where X is one of `short` (the rule's
/// `file_options`: `grep -e/etc/passwd` is a pattern, `grep -f/etc/pats` a file, and only the
/// rule can tell them apart), where VALUE looks like a path: absolute, or starting with `./`
/// or `../`. The deliberate limit: a bare word (`--output=out.txt`, `-ofoo`) stays a string,
/// since option values are far more often names, numbers or modes than files, and `-abc`
/// clusters of flags must never be taken for a path. Used by the stub to announce candidates
/// (with [`ANY_SHORT_OPTION`]) and by the monitor, which trusts only its own reading with the
/// rule's options, to split the argument.
pub fn option_value(arg: &[u8], short: &[u8]) -> Option<usize> {
    let pathlike = |v: &[u8]| v.starts_with(b"/") || v.starts_with(b"./") || v.starts_with(b"../");
    if let Some(rest) = arg.strip_prefix(b"--") {
        let eq = rest.iter().position(|b| *b == b'=')?;
        let name = &rest[..eq];
        let valid = name.first().is_some_and(u8::is_ascii_alphanumeric)
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
        let start = 2 + eq + 1;
        return (valid && pathlike(&arg[start..])).then_some(start);
    }
    match arg {
        [b'-', x, value @ ..]
            if x.is_ascii_alphanumeric() && short.contains(x) && pathlike(value) =>
        {
            Some(2)
        }
        _ => None,
    }
}

/// A running VM's mount namespace, checked to be its init's.
#[derive(Debug)]
pub(crate) struct TargetNs {
    vm: String,
    init_pid: i32,
    mount_ns: Arc<OwnedFd>,
}

impl TargetNs {
    /// The VM's init, on the host.
    pub(crate) fn init_pid(&self) -> i32 {
        self.init_pid
    }

    /// The VM's mount namespace.
    pub(crate) fn mount_ns(&self) -> BorrowedFd<'_> {
        self.mount_ns.as_fd()
    }
}

/// Opens the mount namespace of running VM `vm`.
pub(crate) fn target_ns(layout: &Layout, vm: &str) -> Result<TargetNs, String> {
    let status = client::status(layout, vm).map_err(|e| e.to_string())?;
    let pid = status.init_pid;
    let pidfd = shuttle_sys::process::pidfd_open(pid)
        .map_err(|e| format!("VM {vm}'s init (pid {pid}): {e}"))?;
    let mount_ns = nix::fcntl::open(
        Path::new(&format!("/proc/{pid}/ns/mnt")),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("the mount namespace of VM {vm}: {e}"))?;
    // Checked after opening: the namespace belonged to a process that was this VM's init and,
    // its pidfd says, still is (so the pid was not reused in between).
    let cgroup = crate::cgroup::VmCgroup::existing(&layout.cgroup_parent(), vm);
    let still = crate::vm_api::is_vm_init(pid)
        && cgroup.is_some_and(|c| c.contains_pid_in_any(pid))
        && shuttle_sys::process::pidfd_send_signal(pidfd.as_fd(), 0).is_ok();
    if !still {
        return Err(format!("VM {vm} stopped"));
    }
    Ok(TargetNs {
        vm: vm.to_owned(),
        init_pid: pid,
        mount_ns: Arc::new(mount_ns),
    })
}

/// A file argument as the stub passed it.
#[derive(Debug)]
pub(crate) struct FileArg {
    /// Index into the arguments after argv\[0\].
    pub index: usize,
    pub fd: OwnedFd,
}

/// One file shown in a target VM: by (target VM, its init, path there).
type Key = (String, i32, Vec<u8>);

#[derive(Debug)]
struct Entry {
    /// Running invocations that use it.
    users: usize,
    /// The file's (device, inode).
    id: (u64, u64),
    /// The mount in the target (an `O_PATH` descriptor of it), to unmount exactly it.
    mount: OwnedFd,
    writable: bool,
    mount_ns: Arc<OwnedFd>,
}

/// Every file this monitor's VM has shown in other VMs.
static SHOWN: Mutex<Option<HashMap<Key, Entry>>> = Mutex::new(None);

fn shown() -> MutexGuard<'static, Option<HashMap<Key, Entry>>> {
    SHOWN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The files shown for one invocation; dropping it takes them away again (those no other
/// running invocation uses).
#[derive(Debug, Default)]
pub(crate) struct Exposed {
    keys: Vec<Key>,
    /// The inodes reserved for it in [`RESERVED_INODES`].
    reserved: usize,
}

/// Inodes of targets' `/shuttle` tmpfs (mount points and the directories made for them) that
/// this monitor's running invocations may need, counted before anything is made there.
static RESERVED_INODES: Mutex<usize> = Mutex::new(0);

/// Reserves `n` inodes for one invocation, or says why not.
fn reserve_inodes(n: usize) -> Result<(), String> {
    if n > MAX_SHOWN_INODES {
        return Err(format!(
            "the files to show need {n} files and directories in the target's {FROM_DIR}, more \
             than the {MAX_SHOWN_INODES} one invocation may use: pass fewer or less deeply \
             nested files"
        ));
    }
    let mut reserved = RESERVED_INODES.lock().unwrap_or_else(|e| e.into_inner());
    if *reserved + n > MAX_CALLER_INODES {
        return Err(format!(
            "this VM's running invocations already show {} files and directories in other VMs \
             (at most {MAX_CALLER_INODES} at once): try again when some have ended",
            *reserved
        ));
    }
    *reserved += n;
    Ok(())
}

/// How many inodes the paths need under `/shuttle/from/CALLER`: each distinct directory and
/// file, at most (some may be there already).
fn inodes_needed<'a>(paths: impl Iterator<Item = &'a [u8]>) -> usize {
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        for (i, b) in path.iter().enumerate().skip(1) {
            if *b == b'/' {
                seen.insert(&path[..i]);
            }
        }
        seen.insert(path);
    }
    seen.len()
}

impl Drop for Exposed {
    fn drop(&mut self) {
        if self.reserved > 0 {
            let mut reserved = RESERVED_INODES.lock().unwrap_or_else(|e| e.into_inner());
            *reserved = reserved.saturating_sub(self.reserved);
        }
        if self.keys.is_empty() {
            return;
        }
        let mut guard = shown();
        let Some(map) = guard.as_mut() else {
            return;
        };
        let mut gone = Vec::new();
        for key in self.keys.drain(..) {
            if let Some(e) = map.get_mut(&key) {
                e.users -= 1;
                if e.users == 0 {
                    if let Some(e) = map.remove(&key) {
                        gone.push((key, e));
                    }
                }
            }
        }
        // Unmounted while the registry is held, so that no new invocation reuses an entry
        // being taken away; one thread for the files of one target.
        while let Some((first, _)) = gone.first() {
            let (vm, pid) = (first.0.clone(), first.1);
            let (batch, rest): (Vec<_>, Vec<_>) =
                gone.into_iter().partition(|(k, _)| k.0 == vm && k.1 == pid);
            gone = rest;
            let ns = Arc::clone(&batch[0].1.mount_ns);
            let results = std::thread::scope(|s| {
                s.spawn(|| take_away(ns.as_fd(), &batch))
                    .join()
                    .unwrap_or(Err(Errno::EFAULT))
            });
            if let Err(e) = results {
                tracing::warn!(%vm, error = %e, "could not take passed files away");
            }
        }
    }
}

/// The checks on a passed descriptor, in the monitor: a regular file, still linked, of an
/// ordinary file system. Returns its (device, inode) and whether it was opened for writing.
fn qualifies(fd: &OwnedFd) -> Option<((u64, u64), bool)> {
    let st = fstat(fd).ok()?;
    if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() || st.st_nlink == 0 {
        return None;
    }
    let fs = nix::sys::statfs::fstatfs(fd).ok()?;
    #[allow(clippy::unnecessary_cast)]
    let kind = fs.filesystem_type().0 as i64;
    if PSEUDO_FS.contains(&kind) {
        return None;
    }
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).ok()?;
    let writable = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE == OFlag::O_RDWR;
    Some(((st.st_dev, st.st_ino), writable))
}

/// Shows `files` (of VM `caller`, whose mount namespace is `caller_ns`) in `target`, writable
/// where `allow_write` and the caller opened them so. Returns each passed argument's new
/// value (`/shuttle/from/CALLER/PATH`) by index, and the guard that takes them away. A file
/// that does not qualify (not a regular file, unlinked, of a kernel file system) keeps its
/// argument as it was; one that qualifies but cannot be shown (nor a qualifying file of an
/// exposed directory) refuses the whole invocation, as do more than [`MAX_SHOWN_FILES`] files
/// or more inodes than [`MAX_SHOWN_INODES`] (and [`MAX_CALLER_INODES`] for all running
/// invocations) in the target's `/shuttle`.
pub(crate) fn expose(
    layout: &Layout,
    caller: &str,
    caller_ns: BorrowedFd<'_>,
    target: &TargetNs,
    files: Vec<FileArg>,
    allow_write: bool,
    dirs: Option<&CallerCreds>,
) -> Result<(Vec<(usize, Bytes)>, Exposed), String> {
    let files: Vec<(FileArg, (u64, u64), bool)> = files
        .into_iter()
        .filter_map(|f| {
            let (id, writable) = qualifies(&f.fd)?;
            Some((f, id, writable && allow_write))
        })
        .collect();
    if files.is_empty() {
        return Ok((Vec::new(), Exposed::default()));
    }
    // One monitor at a time sets up the target's /shuttle (several VMs may pass it files).
    let lock_path = layout.runtime_vm_dir(&target.vm).join("shuttle-from.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("flock {}: {e}", lock_path.display()))?;
    let mut guard = shown();
    let map = guard.get_or_insert_with(HashMap::new);
    let mut exposed = Exposed::default();
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            show(
                caller,
                caller_ns,
                target,
                &files,
                allow_write,
                dirs,
                map,
                &mut exposed,
            )
        })
        .join()
        .unwrap_or_else(|_| Err("the thread showing the files failed".to_owned()))
    });
    // Failing closed: a file that could not be shown must not leave its argument naming the
    // caller's path (which the target would resolve in its own VM), so nothing runs; what
    // was shown already is taken away again (the registry released first: dropping takes it).
    drop(guard);
    let outcome = outcome?;
    let mut rewritten = Vec::new();
    for (index, name) in outcome {
        rewritten.push((index, Bytes::from(std::ffi::OsStr::from_bytes(&name))));
    }
    Ok((rewritten, exposed))
}

fn errno(what: &str) -> impl Fn(Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Who called, from the kernel (`SO_PEERCRED`, `SO_PEERGROUPS`): the files of an exposed
/// directory are opened with exactly these credentials.
#[derive(Debug, Clone)]
pub(crate) struct CallerCreds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A passed file in its directory: its name there and its (device, inode).
type Passed = (Vec<u8>, (u64, u64));

/// The most files one invocation shows in the target, file arguments and the files of exposed
/// directories together: each is a mount there, and a descriptor of the monitor's while the
/// program runs.
pub(crate) const MAX_SHOWN_FILES: usize = 256;

/// The most inodes of the target's `/shuttle` tmpfs (mount points and the directories made for
/// them) one invocation may need.
pub(crate) const MAX_SHOWN_INODES: usize = 1024;

/// The most such inodes the running invocations of one VM may hold in other VMs at once (and
/// so the most mount descriptors its monitor holds for them).
pub(crate) const MAX_CALLER_INODES: usize = 4096;

/// The size of each target's `/shuttle` tmpfs in inodes: eight callers at their limit. Past
/// it, making a mount point fails and the invocation is refused.
const SHUTTLE_TMPFS_INODES: usize = 8 * MAX_CALLER_INODES;

/// On a thread of its own (it leaves the monitor's mount namespace for good): reads each file's
/// path in the caller's VM, clones a mount of it there, and attaches it in the target VM.
/// With `dirs` (the rule's `expose_dir`), the other regular files of each file's directory
/// that the caller can open come along (see [`open_siblings`]). Returns (argument index, path
/// in the target) for each passed file argument; every file shown goes into `exposed`, so that
/// an error part way takes away what was shown before it. Any qualifying file that cannot be
/// shown is an error: the invocation must not run with its argument unchanged.
#[allow(clippy::too_many_arguments)]
fn show(
    caller: &str,
    caller_ns: BorrowedFd<'_>,
    target: &TargetNs,
    files: &[(FileArg, (u64, u64), bool)],
    allow_write: bool,
    dirs: Option<&CallerCreds>,
    map: &mut HashMap<Key, Entry>,
    exposed: &mut Exposed,
) -> Result<Vec<(usize, Vec<u8>)>, String> {
    let own_fds = nix::fcntl::open(
        Path::new("/proc/thread-self/fd"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("/proc/thread-self/fd"))?;
    shuttle_sys::vm_mount::enter_mount_namespace_alone(caller_ns)
        .map_err(errno("entering the caller's mount namespace"))?;
    let mut trees = Vec::new();
    for (file, id, writable) in files {
        // The descriptor's path as the caller's VM sees it (the thread's root is its root).
        let path = nix::fcntl::readlinkat(&own_fds, file.fd.as_raw_fd().to_string().as_str())
            .map_err(|e| {
                format!(
                    "the path of file argument {} in the caller's VM: {e}",
                    file.index
                )
            })?;
        let path = path.as_bytes().to_vec();
        if !path.starts_with(b"/") || path.len() > 4000 {
            return Err(format!(
                "file argument {} has no path in the caller's VM that can be shown",
                file.index
            ));
        }
        let tree = shuttle_sys::vm_mount::clone_mount(file.fd.as_fd())
            .map_err(|e| format!("open_tree of file argument {}: {e}", file.index))?;
        trees.push((Some(file.index), path, tree, *id, *writable));
    }
    if let Some(creds) = dirs {
        // Each directory once, with the names (and inodes) of the passed files in it.
        let mut by_dir: Vec<(Vec<u8>, Vec<Passed>)> = Vec::new();
        for (_, path, _, id, _) in &trees {
            let Some(cut) = path.iter().rposition(|b| *b == b'/') else {
                continue;
            };
            let (dir, name) = (&path[..cut.max(1)], path[cut + 1..].to_vec());
            match by_dir.iter_mut().find(|(d, _)| d == dir) {
                Some((_, names)) => names.push((name, *id)),
                None => by_dir.push((dir.to_vec(), vec![(name, *id)])),
            }
        }
        for (dir, passed) in by_dir {
            let room = MAX_SHOWN_FILES.saturating_sub(trees.len());
            // A thread of its own, spawned from this one so that it shares the caller's mount
            // namespace and root, takes the caller's credentials and dies with them.
            let opened = std::thread::scope(|s| {
                s.spawn(|| open_siblings(&dir, &passed, creds, allow_write, room))
                    .join()
                    .unwrap_or_else(|_| Err("the thread opening a directory's files failed".into()))
            })?;
            for (name, fd) in opened {
                // Not a regular file of an ordinary file system (any more): not shown, and no
                // argument names it.
                let Some((id, writable)) = qualifies(&fd) else {
                    continue;
                };
                let mut path = dir.clone();
                if path != b"/" {
                    path.push(b'/');
                }
                path.extend_from_slice(&name);
                let tree = shuttle_sys::vm_mount::clone_mount(fd.as_fd()).map_err(|e| {
                    format!(
                        "open_tree of {} (expose_dir): {e}",
                        String::from_utf8_lossy(&path)
                    )
                })?;
                trees.push((None, path, tree, id, writable && allow_write));
            }
        }
    }
    if trees.len() > MAX_SHOWN_FILES {
        return Err(format!(
            "{} files to show: an invocation shows at most {MAX_SHOWN_FILES} (file arguments and \
             the files of exposed directories together); pass fewer files",
            trees.len()
        ));
    }
    let needed = inodes_needed(trees.iter().map(|t| t.1.as_slice()));
    reserve_inodes(needed)?;
    exposed.reserved = needed;
    shuttle_sys::vm_mount::enter_mount_namespace_alone(target.mount_ns.as_fd())
        .map_err(errno("entering the target's mount namespace"))?;
    let from = from_dir(&own_fds, caller)?;
    let mut shown = Vec::new();
    for (index, path, tree, id, writable) in trees {
        let mut name = format!("{FROM_DIR}/{caller}").into_bytes();
        name.extend_from_slice(&path);
        let key: Key = (target.vm.clone(), target.init_pid, name.clone());
        let lossy = || String::from_utf8_lossy(&path).into_owned();
        if let Some(e) = map.get_mut(&key) {
            // Already shown for a running invocation: the same file (and access) is shared;
            // another one at that path (replaced in the caller's VM meanwhile) cannot be.
            if e.id != id || e.writable != writable {
                return Err(format!(
                    "{} cannot be shown: another file (or the same one with other access) is \
                     shown at its place for a running invocation; try again when it has ended",
                    lossy()
                ));
            }
            e.users += 1;
            exposed.keys.push(key);
        } else {
            let mount = attach(&from, &path, &tree, id, writable).map_err(|e| {
                // The mount point and directories made for it go again where they are empty
                // (the tmpfs's inodes are bounded).
                remove_mount_point(&name);
                format!("{} cannot be shown in VM {}: {e}", lossy(), target.vm)
            })?;
            map.insert(
                key.clone(),
                Entry {
                    users: 1,
                    id,
                    mount,
                    writable,
                    mount_ns: Arc::clone(&target.mount_ns),
                },
            );
            exposed.keys.push(key);
        }
        if let Some(index) = index {
            shown.push((index, name));
        }
    }
    Ok(shown)
}

/// With the caller's credentials (this thread's alone: raw setgroups, setresgid, setresuid;
/// the effective capabilities go with a non-zero uid), in the caller's mount namespace: opens
/// directory `dir` as the caller could (every component searched, the directory read, no
/// symbolic link followed: `dir` is the kernel's own path of a passed file's parent), checks
/// that each passed file is really in it, and opens its other regular files, for writing too
/// when `write` and the caller may, else for reading. What the caller cannot open, mounts in
/// the directory (masks of hidden paths among them: `RESOLVE_NO_XDEV`), links, directories and
/// special files are left out. Refused with more than `room` such files (what is left of
/// [`MAX_SHOWN_FILES`]).
fn open_siblings(
    dir: &[u8],
    passed: &[Passed],
    creds: &CallerCreds,
    write: bool,
    room: usize,
) -> Result<Vec<(Vec<u8>, OwnedFd)>, String> {
    let shown = String::from_utf8_lossy(dir).into_owned();
    shuttle_sys::unotify::set_thread_groups(&creds.groups).map_err(errno("setgroups"))?;
    shuttle_sys::unotify::set_thread_effective_ids(creds.uid, creds.gid)
        .map_err(errno("taking the caller's uid and gid"))?;
    let root = nix::fcntl::open(
        Path::new("/"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("the caller's root"))?;
    let relative = std::ffi::OsStr::from_bytes(&dir[1..]);
    let relative = if relative.is_empty() {
        std::ffi::OsStr::new(".")
    } else {
        relative
    };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let dirfd = openat2(&root, Path::new(relative), how)
        .map_err(|e| format!("the directory {shown} cannot be opened by the caller: {e}"))?;
    for (name, id) in passed {
        let st = nix::sys::stat::fstatat(
            &dirfd,
            Path::new(std::ffi::OsStr::from_bytes(name)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| format!("a passed file is not in {shown} any more: {e}"))?;
        if (st.st_dev, st.st_ino) != *id {
            return Err(format!("a passed file is not in {shown} any more"));
        }
    }
    let listing =
        nix::dir::Dir::from_fd(nix::unistd::dup(&dirfd).map_err(errno("dup of a directory"))?)
            .map_err(errno("reading a directory"))?;
    let mut names = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| format!("reading the directory {shown}: {e}"))?;
        let name = entry.file_name().to_bytes();
        // A file system that does not say the type in its listing is asked (no link
        // followed); the descriptor is checked again once open (`qualifies`).
        let regular = match entry.file_type() {
            Some(kind) => kind == nix::dir::Type::File,
            None => nix::sys::stat::fstatat(
                &dirfd,
                entry.file_name(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .is_ok_and(|st| st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()),
        };
        if name == b"." || name == b".." || !regular || passed.iter().any(|(n, _)| n == name) {
            continue;
        }
        names.push(name.to_vec());
        if names.len() > room {
            return Err(format!(
                "too many files to show: the directory {shown} holds more than {room} other \
                 files, and an invocation shows at most {MAX_SHOWN_FILES} files (expose_dir); \
                 pass the files themselves"
            ));
        }
    }
    let open = |name: &[u8], access: OFlag| {
        let how = OpenHow::new()
            .flags(
                access | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            )
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            );
        openat2(&dirfd, Path::new(std::ffi::OsStr::from_bytes(name)), how)
    };
    let mut opened = Vec::new();
    for name in names {
        let fd = if write {
            open(&name, OFlag::O_RDWR).or_else(|_| open(&name, OFlag::O_RDONLY))
        } else {
            open(&name, OFlag::O_RDONLY)
        };
        if let Ok(fd) = fd {
            opened.push((name, fd));
        }
    }
    Ok(opened)
}

fn how_beneath() -> OpenHow {
    OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV
                | ResolveFlag::RESOLVE_BENEATH,
        )
}

/// The directory `name` in `dir`, made (0755) when missing; never through a symbolic link or
/// onto another file system.
pub(crate) fn subdir(dir: &OwnedFd, name: &[u8]) -> Result<OwnedFd, Errno> {
    let name = std::ffi::OsStr::from_bytes(name);
    match openat2(dir, Path::new(name), how_beneath()) {
        Err(Errno::ENOENT) => {
            match nix::sys::stat::mkdirat(dir, Path::new(name), Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
            openat2(dir, Path::new(name), how_beneath())
        }
        other => other,
    }
}

/// `/shuttle/from/CALLER` in the target VM (the thread is in its mount namespace), with a tmpfs
/// of Shuttle's at `/shuttle`.
fn from_dir(own_fds: &OwnedFd, caller: &str) -> Result<OwnedFd, String> {
    let root = nix::fcntl::open(
        Path::new("/"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("the target's root"))?;
    // /shuttle itself may be a mount (the tmpfs): looked up without RESOLVE_NO_XDEV.
    let open_top = || {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(
                ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_BENEATH,
            );
        openat2(&root, Path::new("shuttle"), how)
    };
    let top = match open_top() {
        Err(Errno::ENOENT) => {
            match nix::sys::stat::mkdirat(&root, "shuttle", Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(format!("making /shuttle in the target VM: {e}")),
            }
            open_top()
        }
        other => other,
    }
    .map_err(errno("/shuttle in the target VM"))?;
    let fs = nix::sys::statfs::fstatfs(&top).map_err(errno("statfs /shuttle"))?;
    // The VM itself cannot mount anything: a tmpfs there is Shuttle's.
    let top = if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
        top
    } else {
        nix::unistd::fchdir(own_fds).map_err(errno("fchdir"))?;
        nix::mount::mount(
            Some("tmpfs"),
            Path::new(&top.as_raw_fd().to_string()),
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("mode=0755,size=1m,nr_inodes={SHUTTLE_TMPFS_INODES}").as_str()),
        )
        .map_err(errno("mounting a tmpfs at /shuttle in the target VM"))?;
        let top = open_top().map_err(errno("/shuttle in the target VM"))?;
        let fs = nix::sys::statfs::fstatfs(&top).map_err(errno("statfs /shuttle"))?;
        if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
            return Err("the tmpfs at /shuttle is not there after mounting it".into());
        }
        top
    };
    let from = subdir(&top, b"from").map_err(errno("/shuttle/from"))?;
    subdir(&from, caller.as_bytes()).map_err(errno("/shuttle/from/CALLER"))
}

/// Attaches `tree` at `from` + `path`; returns an `O_PATH` descriptor of the new mount.
fn attach(
    from: &OwnedFd,
    path: &[u8],
    tree: &OwnedFd,
    id: (u64, u64),
    writable: bool,
) -> Result<OwnedFd, String> {
    let components: Vec<&[u8]> = path
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let Some((name, dirs)) = components.split_last() else {
        return Err("an empty path".into());
    };
    if components.iter().any(|c| *c == b"." || *c == b"..") {
        return Err("a path that is not normalized".into());
    }
    let mut dir = from.try_clone().map_err(|e| e.to_string())?;
    for d in dirs {
        dir = subdir(&dir, d).map_err(errno("making the directories of a passed file"))?;
    }
    let name = std::ffi::OsStr::from_bytes(name);
    let open_point = |dir: &OwnedFd| {
        openat(
            dir,
            Path::new(name),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    };
    let point = match open_point(&dir) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => {
            crate::stubs::create_mount_point_file(&dir, Path::new(name))
                .map_err(errno("making a mount point"))?;
            open_point(&dir).map_err(errno("opening a mount point"))?
        }
        Err(e) => return Err(format!("opening a mount point: {e}")),
    };
    let st = fstat(&point).map_err(errno("stat of a mount point"))?;
    if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
        return Err("something else than a file is in the way".into());
    }
    shuttle_sys::vm_mount::restrict(tree.as_fd(), writable).map_err(errno("mount_setattr"))?;
    shuttle_sys::vm_mount::attach_onto(tree.as_fd(), point.as_fd()).map_err(errno("move_mount"))?;
    let mounted = open_point(&dir).map_err(errno("opening the passed file"))?;
    let now = fstat(&mounted).map_err(errno("stat of the passed file"))?;
    if (now.st_dev, now.st_ino) != id {
        return Err("the passed file is not where it was mounted".into());
    }
    Ok(mounted)
}

/// In the target's mount namespace: unmounts each entry's mount (through its descriptor's
/// magic link, whatever the VM did to the path) and removes the empty mount point and the
/// directories made for it.
fn take_away(ns: BorrowedFd<'_>, entries: &[(Key, Entry)]) -> Result<(), Errno> {
    let own_fds = nix::fcntl::open(
        Path::new("/proc/thread-self/fd"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    shuttle_sys::vm_mount::enter_mount_namespace_alone(ns)?;
    nix::unistd::fchdir(&own_fds)?;
    for (key, entry) in entries {
        if let Err(e) = nix::mount::umount2(
            Path::new(&entry.mount.as_raw_fd().to_string()),
            nix::mount::MntFlags::MNT_DETACH,
        ) {
            tracing::warn!(vm = %key.0, path = %String::from_utf8_lossy(&key.2), error = %e, "umount2 of a passed file");
            continue;
        }
        remove_mount_point(&key.2);
    }
    Ok(())
}

/// Removes the mount point at `path` if it is still the empty file Shuttle made, and the
/// directories made for it, up to /shuttle/from/CALLER, as they empty: no name of the
/// caller's stays behind.
fn remove_mount_point(path: &[u8]) {
    let path = Path::new(std::ffi::OsStr::from_bytes(path));
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    if let Ok(dir) = openat2(nix::fcntl::AT_FDCWD, parent, how) {
        let made = nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| crate::stubs::is_made_mount_point(&st));
        if made {
            let _ = nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }
    let mut dir = Some(parent);
    while let Some(d) = dir {
        // `/`, `shuttle`, `from`, CALLER: kept.
        if d.components().count() <= 4
            || nix::unistd::unlinkat(
                nix::fcntl::AT_FDCWD,
                d,
                nix::unistd::UnlinkatFlags::RemoveDir,
            )
            .is_err()
        {
            break;
        }
        dir = d.parent();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{inodes_needed, option_value, reserve_inodes, Exposed, MAX_CALLER_INODES};

    #[test]
    fn inodes_are_counted_and_reserved_per_caller() {
        let paths: [&[u8]; 3] = [b"/srv/w/a", b"/srv/w/b", b"/etc/x"];
        // /srv, /srv/w, a, b, /etc, x
        assert_eq!(inodes_needed(paths.into_iter()), 6);
        assert!(
            reserve_inodes(2000).is_err(),
            "more than one invocation may use"
        );
        let held: Vec<Exposed> = (0..MAX_CALLER_INODES / 1000)
            .map(|_| {
                reserve_inodes(1000).unwrap();
                Exposed {
                    keys: Vec::new(),
                    reserved: 1000,
                }
            })
            .collect();
        assert!(reserve_inodes(1000).is_err(), "past the caller's limit");
        drop(held);
        reserve_inodes(1000).unwrap();
    }

    #[test]
    fn option_values_that_look_like_paths_are_found() {
        let any = super::ANY_SHORT_OPTION;
        assert_eq!(option_value(b"--input=/srv/a.txt", b""), Some(8));
        assert_eq!(option_value(b"--files0-from=./list", b""), Some(14));
        assert_eq!(option_value(b"--out_file=../x", b""), Some(11));
        assert_eq!(option_value(b"-o/srv/out", b"o"), Some(2));
        assert_eq!(option_value(b"-C./dir", any), Some(2));
        // Short options only where the rule lists them: `-e/etc/passwd` is grep's pattern.
        assert_eq!(option_value(b"-e/etc/passwd", b"f"), None);
        assert_eq!(option_value(b"-f/etc/pats", b"f"), Some(2));
        // Bare words, flags, clusters, odd names and plain paths are not options with files.
        for no in [
            &b"--output=out.txt"[..],
            b"--output=",
            b"--=/x",
            b"---x=/y",
            b"--a b=/x",
            b"-ofoo",
            b"-la",
            b"-/x",
            b"--",
            b"-",
            b"/srv/a.txt",
            b"--input /srv/a",
        ] {
            assert_eq!(
                option_value(no, any),
                None,
                "{}",
                String::from_utf8_lossy(no)
            );
        }
    }
}
