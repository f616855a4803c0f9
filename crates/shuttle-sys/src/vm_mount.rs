//! The new mount API (open_tree(2), mount_setattr(2), move_mount(2)) for what Shuttle mounts
//! into a VM that already runs: a detached copy of a mount the caller holds open, made
//! read-only, attached onto a file the caller holds open. Nothing is looked up by path twice,
//! so a VM renaming things meanwhile cannot redirect a mount.
//!
//! These calls act in the caller's mount namespace: a monitor thread enters the VM's first
//! (see [`enter_mount_namespace_alone`]).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

// From <linux/mount.h> (stable kernel ABI).
const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_NOSYMFOLLOW: u64 = 0x0020_0000;

/// `struct mount_attr` (<linux/mount.h>, MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
#[derive(Debug, Default)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Moves the calling thread, and only it, into mount namespace `ns`: it first stops sharing
/// its filesystem attributes (root, working directory) with the other threads
/// (unshare(CLONE_FS)), which setns(2) requires of a mount namespace change. The thread's root
/// and working directory become the namespace's root. Meant for a short-lived thread that
/// ends afterwards (it cannot come back).
pub fn enter_mount_namespace_alone(ns: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: unshare takes a flag; CLONE_FS affects only the calling thread's fs_struct.
    if unsafe { libc::unshare(libc::CLONE_FS) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: setns takes a descriptor and a flag.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// A detached copy of the mount at `fd` (open_tree(fd, "", OPEN_TREE_CLONE | AT_EMPTY_PATH)):
/// a bind mount of what `fd` refers to, attached nowhere until [`attach_onto`]. The mount
/// must belong to the caller's mount namespace.
pub fn clone_mount(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as u32;
    // SAFETY: the path is a valid empty C string; the flags are plain integers.
    let r = unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Makes a detached mount nosuid and nodev, and read-only unless `writable`
/// (mount_setattr(2)).
pub fn restrict(mount: BorrowedFd<'_>, writable: bool) -> Result<(), Errno> {
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        ..MountAttr::default()
    };
    if !writable {
        attr.attr_set |= MOUNT_ATTR_RDONLY;
    }
    // SAFETY: `attr` is a live, properly laid out struct mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Attaches the detached mount `mount` onto what `target` refers to (move_mount(2) with both
/// ends given as descriptors). `target` must be in the caller's mount namespace.
pub fn attach_onto(mount: BorrowedFd<'_>, target: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: both paths are valid empty C strings; descriptors and flags are integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Like [`clone_mount`], with every mount beneath `fd` too (`AT_RECURSIVE`): what a VM masks
/// inside a shared directory (hidden paths, Shuttle's own directories) stays masked in the copy.
pub fn clone_tree(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let flags = OPEN_TREE_CLONE
        | libc::O_CLOEXEC as libc::c_uint
        | libc::AT_EMPTY_PATH as u32
        | libc::AT_RECURSIVE as u32;
    // SAFETY: the path is a valid empty C string; the flags are plain integers.
    let r = unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Like [`restrict`], for every mount of a tree made by [`clone_tree`] (`AT_RECURSIVE`).
pub fn restrict_tree(mount: BorrowedFd<'_>, writable: bool) -> Result<(), Errno> {
    restrict_tree_attrs(mount, writable, false, false)
}

/// Like [`restrict_tree`], and `noexec` (nothing on it may be executed) and `nosymfollow`
/// (no symbolic link on it is followed by any path lookup: Linux 5.10, mount_setattr(2)).
pub fn restrict_tree_attrs(
    mount: BorrowedFd<'_>,
    writable: bool,
    noexec: bool,
    nosymfollow: bool,
) -> Result<(), Errno> {
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        ..MountAttr::default()
    };
    if !writable {
        attr.attr_set |= MOUNT_ATTR_RDONLY;
    }
    if noexec {
        attr.attr_set |= MOUNT_ATTR_NOEXEC;
    }
    if nosymfollow {
        attr.attr_set |= MOUNT_ATTR_NOSYMFOLLOW;
    }
    // SAFETY: `attr` is a live, properly laid out struct mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// The value of extended attribute `name` of `path` itself (lgetxattr(2): a symbolic link is
/// not followed), or `None` when it has none. Used to read overlayfs' markers
/// (`trusted.overlay.opaque`) in a VM's upper layer.
pub fn lgetxattr(path: &std::path::Path, name: &std::ffi::CStr) -> Result<Option<Vec<u8>>, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are valid C strings; the buffer is live and of the length passed.
    let r = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast::<libc::c_void>(),
            buf.len(),
        )
    };
    if r < 0 {
        return match Errno::last() {
            Errno::ENODATA | Errno::ENOTSUP => Ok(None),
            e => Err(e),
        };
    }
    buf.truncate(r as usize);
    Ok(Some(buf))
}
