//! Capability sets: the bounding set a VM keeps, and the sets of the calling process.
//! See capabilities(7), capget(2), prctl(2) PR_CAPBSET_DROP.

use nix::errno::Errno;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("prctl(PR_CAPBSET_DROP, {cap}) failed: {errno}")]
    DropBounding { cap: u32, errno: Errno },
    #[error("capget failed: {0}")]
    Get(#[source] Errno),
    #[error("capset failed: {0}")]
    Set(#[source] Errno),
    #[error("prctl(PR_CAP_AMBIENT_CLEAR_ALL) failed: {0}")]
    ClearAmbient(#[source] Errno),
}

/// The highest capability number this kernel knows (capabilities(7), cap_last_cap).
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Keeps only the capabilities in `keep` (a bit mask by capability number): drops every
/// other one from the bounding set (so no later `execve` can regain it), from the effective,
/// permitted and inheritable sets of this process, and clears the ambient set.
pub fn restrict_to(keep: u64) -> Result<(), CapsError> {
    for cap in 0..=last_cap() {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let errno = Errno::last();
            // EINVAL: this kernel does not know the capability; nothing to drop.
            if errno != Errno::EINVAL {
                return Err(CapsError::DropBounding { cap, errno });
            }
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(CapsError::ClearAmbient(Errno::last()));
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array are what version 3 of capget expects.
    if unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    } != 0
    {
        return Err(CapsError::Get(Errno::last()));
    }
    let masks = [keep as u32, (keep >> 32) as u32];
    for (d, m) in data.iter_mut().zip(masks) {
        d.effective &= m;
        d.permitted &= m;
        d.inheritable &= m;
    }
    // SAFETY: as for capget; the kernel only reads `data`.
    if unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    } != 0
    {
        return Err(CapsError::Set(Errno::last()));
    }
    Ok(())
}

/// Capability numbers (linux/capability.h), which the libc crate does not define.
pub mod numbers {
    pub const CAP_CHOWN: u32 = 0;
    pub const CAP_DAC_OVERRIDE: u32 = 1;
    pub const CAP_DAC_READ_SEARCH: u32 = 2;
    pub const CAP_FOWNER: u32 = 3;
    pub const CAP_FSETID: u32 = 4;
    pub const CAP_KILL: u32 = 5;
    pub const CAP_SETGID: u32 = 6;
    pub const CAP_SETUID: u32 = 7;
    pub const CAP_SETPCAP: u32 = 8;
    pub const CAP_NET_BIND_SERVICE: u32 = 10;
    pub const CAP_NET_ADMIN: u32 = 12;
    pub const CAP_NET_RAW: u32 = 13;
    pub const CAP_SYS_MODULE: u32 = 16;
    pub const CAP_SYS_RAWIO: u32 = 17;
    pub const CAP_SYS_CHROOT: u32 = 18;
    pub const CAP_SYS_PTRACE: u32 = 19;
    pub const CAP_SYS_ADMIN: u32 = 21;
    pub const CAP_SYS_BOOT: u32 = 22;
    pub const CAP_SYS_TIME: u32 = 25;
    pub const CAP_MKNOD: u32 = 27;
    pub const CAP_AUDIT_WRITE: u32 = 29;
    pub const CAP_SETFCAP: u32 = 31;
    pub const CAP_SYSLOG: u32 = 34;
    pub const CAP_BPF: u32 = 39;
}
