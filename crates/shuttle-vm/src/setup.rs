//! Executes a set-up plan ([`crate::plan`]) inside the VM's fresh mount namespace.
//!
//! It runs in the VM's init before any VM process exists, so nothing inside the VM can race
//! it; still, the VM's upper layer is VM-controlled data from earlier runs, so no mount target
//! inside the new root may be reached through a symlink (see [`check_no_symlink`]).

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statfs::{
    statfs, FsType, OVERLAYFS_SUPER_MAGIC, PROC_SUPER_MAGIC, SYSFS_MAGIC, TMPFS_MAGIC,
};

use crate::plan::Step;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("mount({fstype}) on {target} failed: {errno}")]
    Mount {
        fstype: String,
        target: PathBuf,
        errno: Errno,
    },
    #[error("{what} at {path} failed: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} failed: {errno}")]
    Sys { what: String, errno: Errno },
    #[error("{path} is a symlink in the VM's root; Shuttle mounts there itself, so remove it from the VM's upper layer")]
    SymlinkInRoot { path: PathBuf },
    #[error("mount on {target} did not take effect (found filesystem type {found:#x}, expected {expected:#x})")]
    Unverified {
        target: PathBuf,
        found: i64,
        expected: i64,
    },
    #[error("path {0} cannot be used in overlay options (contains ',', ':' or '\\'); move it")]
    UnsafeOverlayPath(PathBuf),
}

fn do_mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SetupError> {
    mount(Some(source), target, fstype, flags, data).map_err(|errno| SetupError::Mount {
        fstype: fstype
            .unwrap_or(if flags.contains(MsFlags::MS_BIND) {
                "bind"
            } else {
                "none"
            })
            .to_owned(),
        target: target.to_owned(),
        errno,
    })
}

fn verify(target: &Path, expected: FsType) -> Result<(), SetupError> {
    let found = statfs(target)
        .map_err(|errno| SetupError::Sys {
            what: format!("statfs {}", target.display()),
            errno,
        })?
        .filesystem_type();
    if found != expected {
        return Err(SetupError::Unverified {
            target: target.to_owned(),
            found: found.0,
            expected: expected.0,
        });
    }
    Ok(())
}

fn mkdir_all(path: &Path) -> Result<(), SetupError> {
    fs::create_dir_all(path).map_err(|source| SetupError::Io {
        what: "mkdir",
        path: path.to_owned(),
        source,
    })
}

/// Fails if any component of `path` below the VM root (`root`) is a symlink. Returns whether
/// the full path exists.
fn check_no_symlink(root: &Path, path: &Path) -> Result<bool, SetupError> {
    let Ok(rel) = path.strip_prefix(root) else {
        return Ok(path.exists());
    };
    let mut cur = root.to_path_buf();
    for comp in rel.components() {
        cur.push(comp);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(SetupError::SymlinkInRoot { path: cur });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(SetupError::Io {
                    what: "lstat",
                    path: cur,
                    source,
                })
            }
        }
    }
    Ok(true)
}

/// The root of the plan's overlay, once mounted (targets below it get the symlink check).
fn upper_of(steps: &[Step]) -> Option<PathBuf> {
    steps.iter().find_map(|s| match s {
        Step::MountOverlay { upper, .. } => Some(upper.clone()),
        _ => None,
    })
}

fn root_of(steps: &[Step]) -> Option<PathBuf> {
    steps.iter().find_map(|s| match s {
        Step::MountOverlay { target, .. } => Some(target.clone()),
        _ => None,
    })
}

fn overlay_option_path(p: &Path) -> Result<String, SetupError> {
    let s = p
        .to_str()
        .ok_or_else(|| SetupError::UnsafeOverlayPath(p.to_owned()))?;
    if s.contains([',', ':', '\\']) {
        return Err(SetupError::UnsafeOverlayPath(p.to_owned()));
    }
    Ok(s.to_owned())
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

fn hide_dir(target: &Path) -> Result<(), SetupError> {
    do_mount(
        "tmpfs",
        target,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | NOSUID_NODEV_NOEXEC,
        Some("mode=0755,size=4k"),
    )
}

fn hide_file(target: &Path) -> Result<(), SetupError> {
    bind_read_only(Path::new("/dev/null"), target, MsFlags::empty())
}

/// Binds `source` onto `target` and makes the new mount read-only, nosuid, nodev and noexec
/// (a bind mount takes its flags only from a remount). `extra` adds flags to the bind itself
/// (MS_REC to carry submounts along).
fn bind_read_only(source: &Path, target: &Path, extra: MsFlags) -> Result<(), SetupError> {
    bind_read_only_with(source, target, extra, NOSUID_NODEV_NOEXEC)
}

/// [`bind_read_only`] with the remount's flags besides MS_RDONLY given.
fn bind_read_only_with(
    source: &Path,
    target: &Path,
    extra: MsFlags,
    flags: MsFlags,
) -> Result<(), SetupError> {
    do_mount(
        &source.to_string_lossy(),
        target,
        None,
        MsFlags::MS_BIND | extra,
        None,
    )?;
    do_mount(
        "none",
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
        None,
    )
}

/// Performs every step in order. The first failure stops set-up; the caller (the VM's init)
/// reports it to the monitor and exits, and the namespace's mounts vanish with it.
pub fn execute(steps: &[Step]) -> Result<(), SetupError> {
    let root = root_of(steps);
    let guarded = |p: &Path| -> Result<bool, SetupError> {
        match &root {
            Some(r) => check_no_symlink(r, p),
            None => Ok(p.exists()),
        }
    };
    for step in steps {
        match step {
            Step::MakeMountsPrivate => do_mount(
                "none",
                Path::new("/"),
                None,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None,
            )?,
            Step::MountOverlay {
                lower,
                upper,
                work,
                target,
            } => {
                mkdir_all(target)?;
                let data = format!(
                    // redirect_dir, metacopy and index off: a rename inside the VM must never
                    // make a hidden lower directory reachable under another name.
                    "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
                    overlay_option_path(lower)?,
                    overlay_option_path(upper)?,
                    overlay_option_path(work)?
                );
                // nodev: device nodes reach a VM only through its own /dev (a separate mount).
                do_mount(
                    "shuttle",
                    target,
                    Some("overlay"),
                    MsFlags::MS_NODEV,
                    Some(&data),
                )?;
                verify(target, OVERLAYFS_SUPER_MAGIC)?;
            }
            Step::HideIfPresent { target } => {
                match check_no_symlink(root.as_deref().unwrap_or(Path::new("/")), target) {
                    Ok(false) => {}
                    // A symlink the VM made itself (it is in the upper layer) shadows whatever
                    // the lower layer has at this path, which is then unreachable anyway. A
                    // symlink of the lower layer would resolve inside the VM to what we must
                    // hide: refuse to start rather than leave it visible.
                    Err(SetupError::SymlinkInRoot { path }) => {
                        let made_by_vm = match (&root, upper_of(steps)) {
                            (Some(r), Some(upper)) => path
                                .strip_prefix(r)
                                .ok()
                                .and_then(|rel| fs::symlink_metadata(upper.join(rel)).ok())
                                .is_some_and(|m| m.file_type().is_symlink()),
                            _ => false,
                        };
                        if !made_by_vm {
                            return Err(SetupError::SymlinkInRoot { path });
                        }
                    }
                    Ok(true) => {
                        let meta =
                            fs::symlink_metadata(target).map_err(|source| SetupError::Io {
                                what: "lstat",
                                path: target.clone(),
                                source,
                            })?;
                        if meta.is_dir() {
                            hide_dir(target)?
                        } else {
                            hide_file(target)?
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Step::HideDir { target } => {
                if guarded(target)? {
                    hide_dir(target)?
                }
            }
            Step::HideFile { target } => {
                if guarded(target)? {
                    hide_file(target)?
                }
            }
            Step::BindApiDir { source, target } => {
                guarded(target)?;
                mkdir_all(target)?;
                bind_read_only(source, target, MsFlags::empty())?;
            }
            Step::BindShuttleBinary { source, target } => {
                // The mount point is a file the monitor created in the API directory; the
                // bind is read-only but, unlike that directory, executable.
                bind_read_only_with(
                    source,
                    target,
                    MsFlags::empty(),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                )?;
            }
            Step::MountProc { target } => {
                guarded(target)?;
                mkdir_all(target)?;
                do_mount("proc", target, Some("proc"), NOSUID_NODEV_NOEXEC, None)?;
                verify(target, PROC_SUPER_MAGIC)?;
            }
            Step::MountSysfs { target } => {
                guarded(target)?;
                mkdir_all(target)?;
                do_mount(
                    "sysfs",
                    target,
                    Some("sysfs"),
                    MsFlags::MS_RDONLY | NOSUID_NODEV_NOEXEC,
                    None,
                )?;
                verify(target, SYSFS_MAGIC)?;
            }
            Step::MountCgroup2 { target } => {
                if guarded(target)? {
                    do_mount(
                        "cgroup2",
                        target,
                        Some("cgroup2"),
                        MsFlags::MS_RDONLY | NOSUID_NODEV_NOEXEC,
                        None,
                    )?;
                }
            }
            Step::MountTmpfs {
                target,
                mode,
                size,
                nosuid_nodev,
            } => {
                guarded(target)?;
                mkdir_all(target)?;
                let flags = if *nosuid_nodev {
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV
                } else {
                    MsFlags::MS_NOSUID
                };
                let data = format!("mode={mode:04o},size={size}");
                do_mount("tmpfs", target, Some("tmpfs"), flags, Some(&data))?;
                verify(target, TMPFS_MAGIC)?;
            }
            Step::BindDevice { host, target } => {
                fs::File::create(target).map_err(|source| SetupError::Io {
                    what: "create device mount point",
                    path: target.clone(),
                    source,
                })?;
                do_mount(
                    &host.to_string_lossy(),
                    target,
                    None,
                    MsFlags::MS_BIND,
                    None,
                )?;
                // Read-only: the node is the host's own inode, so a chmod, chown or utimes
                // through a writable mount would change the host's device node. Reading and
                // writing the device itself works on a read-only mount.
                do_mount(
                    "none",
                    target,
                    None,
                    MsFlags::MS_BIND
                        | MsFlags::MS_REMOUNT
                        | MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NOEXEC,
                    None,
                )?;
            }
            Step::MountDevpts { target } => {
                mkdir_all(target)?;
                do_mount(
                    "devpts",
                    target,
                    Some("devpts"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                    Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
                )?;
            }
            Step::MountMqueue { target } => {
                mkdir_all(target)?;
                do_mount("mqueue", target, Some("mqueue"), NOSUID_NODEV_NOEXEC, None)?;
            }
            Step::Symlink { link, points_to } => {
                let _ = fs::remove_file(link);
                symlink(points_to, link).map_err(|source| SetupError::Io {
                    what: "symlink",
                    path: link.clone(),
                    source,
                })?;
            }
            Step::ReadOnlyIfPresent { target } => {
                if guarded(target)? {
                    bind_read_only(target, target, MsFlags::MS_REC)?;
                }
            }
            Step::PivotRoot { new_root } => pivot_root(new_root)?,
            Step::SetHostname { name } => {
                nix::unistd::sethostname(name).map_err(|errno| SetupError::Sys {
                    what: format!("sethostname({name})"),
                    errno,
                })?
            }
            Step::LoopbackUp => {
                shuttle_sys::net::bring_up_loopback().map_err(|errno| SetupError::Sys {
                    what: "bringing up lo".into(),
                    errno,
                })?
            }
        }
    }
    Ok(())
}

/// pivot_root(2) with the new root stacked on the old one ("." twice), then the old root
/// detached: no path to the host's tree remains in the VM's mount namespace.
fn pivot_root(new_root: &Path) -> Result<(), SetupError> {
    let sys = |what: &str| {
        let what = what.to_owned();
        move |errno| SetupError::Sys { what, errno }
    };
    nix::unistd::chdir(new_root).map_err(sys(&format!("chdir {}", new_root.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root(., .)"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("umount2(old root, MNT_DETACH)"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    Ok(())
}
