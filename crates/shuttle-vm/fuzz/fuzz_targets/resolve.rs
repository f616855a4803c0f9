//! The monitor's resolver of unix socket paths inside a target VM's root (`openat2` with
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS` from `/proc/PID/root`): whatever path a VM names,
//! what it resolves to is inside that root, never the host's (or another VM's) files.
//!
//! The "VM" is a thread of this process with its own mount namespace and filesystem root (a
//! temporary tree full of hostile symlinks, with a procfs mounted inside, whose magic links
//! such as `proc/1/root` lead to the host's root), reached through `/proc/TID/root` exactly
//! as the monitor reaches a VM through its init's. Every inode of the tree is recorded before;
//! a resolved path must be one of them, or a file of the tree's own procfs.
//!
//! Needs root (a mount namespace, chroot). `intercept/address.rs` is private to the monitor,
//! so it is compiled here as a module of this crate, unchanged.

#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/intercept/address.rs"]
mod address;

use std::collections::HashSet;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use address::Destination;
use libfuzzer_sys::fuzz_target;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::socket::{SockaddrLike, UnixAddr};

struct VmRoot {
    dir: PathBuf,
    /// The thread whose root `dir` is (as a VM's init's root is the VM's).
    tid: i32,
    inodes: HashSet<(u64, u64)>,
    proc_dev: u64,
}

static ROOT: OnceLock<VmRoot> = OnceLock::new();

/// Builds the tree: ordinary files and directories, and symlinks that try to lead out.
fn build(dir: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    for d in ["run/sub", "etc", "proc", "srv/data"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(dir.join("run/db.sock"), "stands for a socket")?;
    std::fs::write(dir.join("etc/passwd"), "the VM's own\n")?;
    std::fs::write(dir.join("srv/data/file"), "data")?;
    for (link, to) in [
        ("up", "../../../../../.."),
        ("abs", "/"),
        ("hostetc", "/etc"),
        ("loop", "loop"),
        ("ping", "pong"),
        ("pong", "ping"),
        ("run/back", "../.."),
        ("run/sub/far", "../../../../../../etc/passwd"),
        ("run/link.sock", "/run/db.sock"),
        ("deep", "run/sub/../../run/db.sock"),
        ("self", "proc/self"),
        ("hostroot", "/proc/1/root"),
        ("mine", "/proc/self/root/etc"),
        ("fdlink", "/proc/self/fd/0"),
    ] {
        symlink(to, dir.join(link))?;
    }
    Ok(())
}

fn inodes(dir: &Path, into: &mut HashSet<(u64, u64)>) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    into.insert((meta.dev(), meta.ino()));
    if meta.is_dir() {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            inodes(&e.path(), into);
        }
    }
}

/// Trees of earlier runs whose process is gone (libFuzzer ends a run with `exit`, which runs
/// no destructors).
fn remove_stale_trees() {
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("shuttle-fuzz-resolve-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The inode a resolved address leads to.
fn resolved_inode(resolved: &address::Resolved) -> (u64, u64) {
    // SAFETY: `resolve` made this address with `UnixAddr::new`; `as_ptr` and `len` describe
    // exactly that sockaddr_un, which lives as long as `resolved`.
    let addr = unsafe { UnixAddr::from_raw(resolved.addr.as_ptr(), Some(resolved.addr.len())) }
        .expect("a unix address");
    let link = addr.path().expect("a path").to_path_buf();
    assert!(
        link.starts_with("/proc/thread-self/fd/"),
        "resolved to {link:?}, not to the descriptor resolved"
    );
    let meta = std::fs::metadata(&link).expect("the resolved descriptor");
    (meta.dev(), meta.ino())
}

fn vm_root() -> &'static VmRoot {
    ROOT.get_or_init(|| {
        remove_stale_trees();
        let dir = std::env::temp_dir().join(format!("shuttle-fuzz-resolve-{}", std::process::id()));
        build(&dir).expect("building the VM tree");
        let mut set = HashSet::new();
        inodes(&dir, &mut set);
        let (tx, rx) = std::sync::mpsc::channel();
        let inside = dir.clone();
        std::thread::spawn(move || {
            // This thread alone: its own mount namespace (with a procfs inside the tree) and
            // its own root, which is what /proc/TID/root then shows.
            let setup = || -> nix::Result<()> {
                unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS)?;
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )?;
                mount(
                    Some("proc"),
                    &inside.join("proc"),
                    Some("proc"),
                    MsFlags::empty(),
                    None::<&str>,
                )?;
                nix::unistd::chroot(&inside)?;
                nix::unistd::chdir("/")
            };
            let result = setup().map(|()| nix::unistd::gettid().as_raw());
            tx.send(result).expect("reporting the VM thread");
            loop {
                std::thread::park();
            }
        });
        let tid = rx
            .recv()
            .expect("the VM thread")
            .expect("setting up the VM thread (run the fuzzer as root)");
        let proc_dev = std::fs::metadata(format!("/proc/{tid}/root/proc"))
            .expect("the VM's procfs")
            .dev();
        assert_ne!(proc_dev, std::fs::metadata(&dir).unwrap().dev());
        let root = VmRoot {
            dir,
            tid,
            inodes: set,
            proc_dev,
        };
        // The check can fail: a file of the tree resolves inside, a host file would not.
        let inside = address::resolve(Some(tid), &Destination::UnixPath("/run/db.sock".into()))
            .expect("resolving a file of the tree");
        assert!(root.inside(resolved_inode(&inside)));
        let host = std::fs::metadata("/etc/passwd").expect("the host's /etc/passwd");
        assert!(!root.inside((host.dev(), host.ino())));
        root
    })
}

impl VmRoot {
    fn inside(&self, (dev, ino): (u64, u64)) -> bool {
        self.inodes.contains(&(dev, ino)) || dev == self.proc_dev
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let root = vm_root();
    let dest = Destination::UnixPath(format!("/{}", path.trim_start_matches('/')));
    let Ok(resolved) = address::resolve(Some(root.tid), &dest) else {
        return;
    };
    assert!(
        root.inside(resolved_inode(&resolved)),
        "{path:?} resolved outside the VM's root {}",
        root.dir.display(),
    );
});
