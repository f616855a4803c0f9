//! What restrictions a process of a VM placed on itself, compared with its VM's init: read
//! from `/proc` for the process a pidfd names (every thread of it), the pidfd checked again
//! afterwards so that the reading was of that process and not of one that took its pid.
//!
//! `shuttle run` inside a VM into the VM itself starts a fresh child of the VM's init: it
//! must not become a way out of restrictions the caller took on (a seccomp filter of its own,
//! no_new_privs, a smaller capability bounding set, dropped capabilities, a chroot), so such
//! callers are refused (see `invoke::serve_own_vm`). Not seen: a Landlock domain (nothing in
//! /proc shows one) and LSM labels.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// The restrictions of one process (all its threads together: the most restricted of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Restrictions {
    pub no_new_privs: bool,
    /// Seccomp filters in force (`Seccomp_filters`; the mode alone when the kernel does not
    /// say: 2 counts as one).
    pub seccomp_filters: u32,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    /// Some thread has a root directory other than the VM's (it chrooted itself).
    pub own_root: bool,
}

impl Restrictions {
    /// Combines two threads' restrictions: the stricter of each.
    fn stricter(self, other: Restrictions) -> Restrictions {
        Restrictions {
            no_new_privs: self.no_new_privs || other.no_new_privs,
            seccomp_filters: self.seccomp_filters.max(other.seccomp_filters),
            cap_eff: self.cap_eff & other.cap_eff,
            cap_bnd: self.cap_bnd & other.cap_bnd,
            own_root: self.own_root || other.own_root,
        }
    }

    /// Why a command started by init for a caller with these restrictions would hold more
    /// than the caller (`init`'s restrictions): `None` when it would not. `as_root`: the
    /// command may run as uid 0 (then it gets init's effective capabilities).
    pub fn escapes(&self, init: &Restrictions, as_root: bool) -> Option<String> {
        if self.own_root && !init.own_root {
            return Some("the caller runs in a root directory of its own (chroot)".into());
        }
        if self.no_new_privs && !init.no_new_privs {
            return Some("the caller set no_new_privs".into());
        }
        if self.seccomp_filters > init.seccomp_filters {
            return Some(format!(
                "the caller runs under {} seccomp filter(s) of its own beyond the VM's",
                self.seccomp_filters - init.seccomp_filters
            ));
        }
        if init.cap_bnd & !self.cap_bnd != 0 {
            return Some(format!(
                "the caller's capability bounding set is narrower than the VM's (missing \
                 {:#x})",
                init.cap_bnd & !self.cap_bnd
            ));
        }
        if as_root && init.cap_eff & !self.cap_eff != 0 {
            return Some(format!(
                "the caller's effective capabilities are narrower than the VM's init's \
                 (missing {:#x})",
                init.cap_eff & !self.cap_eff
            ));
        }
        None
    }
}

/// Parses one `/proc/PID/status`.
pub(crate) fn parse_status(text: &str) -> Option<Restrictions> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let hex = |name: &str| u64::from_str_radix(field(name)?, 16).ok();
    let seccomp: u32 = field("Seccomp")?.parse().ok()?;
    let seccomp_filters = match field("Seccomp_filters") {
        Some(n) => n.parse().ok()?,
        None => u32::from(seccomp != 0),
    };
    Some(Restrictions {
        no_new_privs: field("NoNewPrivs")? != "0",
        seccomp_filters,
        cap_eff: hex("CapEff")?,
        cap_bnd: hex("CapBnd")?,
        own_root: false,
    })
}

/// The pid a pidfd names, in the monitor's PID namespace (`Pid:` of its fdinfo; proc(5)).
fn pidfd_pid(pidfd: BorrowedFd<'_>) -> Result<i32, String> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(|e| format!("reading the caller's pidfd: {e}"))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse::<i32>().ok())
        .ok_or("the caller's pidfd names no pid")?;
    if pid <= 0 {
        return Err("the caller has gone".into());
    }
    Ok(pid)
}

/// The restrictions of the process `pidfd` names: every thread's status, the stricter of
/// each; then the pidfd is checked to name a live process still, so that the pid read was
/// not reused meanwhile (a dead process's pid can be reused only once it has been reaped,
/// after which signalling the pidfd fails).
pub(crate) fn of_process(pidfd: BorrowedFd<'_>, init_pid: i32) -> Result<Restrictions, String> {
    let vm_root = root_of(&format!("/proc/{init_pid}/root"))?;
    let pid = pidfd_pid(pidfd)?;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("the caller's threads (/proc/{pid}/task): {e}"))?;
    let mut all: Option<Restrictions> = None;
    for task in tasks {
        let task = task.map_err(|e| format!("the caller's threads: {e}"))?;
        let path = task.path().join("status");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // A thread that ended meanwhile restricts nothing any more.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut r =
            parse_status(&text).ok_or_else(|| format!("{} is unreadable", path.display()))?;
        let root = task.path().join("root");
        r.own_root = match root_of(&root.to_string_lossy()) {
            Ok(id) => id != vm_root,
            // Ended meanwhile; anything else is unknown, and unknown counts as restricted.
            Err(_) if !task.path().exists() => continue,
            Err(_) => true,
        };
        all = Some(all.map_or(r, |a| a.stricter(r)));
    }
    shuttle_sys::process::pidfd_send_signal(pidfd.as_fd(), 0)
        .map_err(|e| format!("the caller has gone ({e})"))?;
    all.ok_or_else(|| "the caller has no threads".into())
}

/// The device and inode of the directory `path` leads to (a `/proc/.../root` link).
fn root_of(path: &str) -> Result<(u64, u64), String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| format!("{path}: {e}"))
}

/// The restrictions of the VM's init (pid on the host; the monitor's own child).
pub(crate) fn of_init(pid: i32) -> Result<Restrictions, String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    parse_status(&text).ok_or_else(|| format!("{path} is unreadable"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tbash\nUid:\t0\t0\t0\t0\nCapInh:\t0000000000000000\n\
        CapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n\
        NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";

    #[test]
    fn a_caller_more_restricted_than_init_is_told_apart() {
        let init = parse_status(STATUS).unwrap();
        assert_eq!(init.seccomp_filters, 1);
        assert!(init.no_new_privs);
        assert_eq!(init.escapes(&init, true), None);
        let filtered = Restrictions {
            seccomp_filters: 2,
            ..init
        };
        assert!(filtered.escapes(&init, false).unwrap().contains("seccomp"));
        let fewer_caps = Restrictions { cap_eff: 0, ..init };
        assert_eq!(fewer_caps.escapes(&init, false), None, "not as root");
        assert!(fewer_caps
            .escapes(&init, true)
            .unwrap()
            .contains("effective"));
        let bounded = Restrictions {
            cap_bnd: init.cap_bnd & !1,
            ..init
        };
        assert!(bounded.escapes(&init, false).unwrap().contains("bounding"));
        let nnp = Restrictions {
            no_new_privs: false,
            ..init
        };
        assert!(init.escapes(&nnp, false).unwrap().contains("no_new_privs"));
        let chrooted = Restrictions {
            own_root: true,
            ..init
        };
        assert!(chrooted.escapes(&init, false).unwrap().contains("chroot"));
        assert!(init.stricter(chrooted).own_root);
        // Threads combine to the stricter.
        assert_eq!(init.stricter(filtered).seccomp_filters, 2);
        assert_eq!(init.stricter(fewer_caps).cap_eff, 0);
    }
}
