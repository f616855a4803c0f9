//! Where Shuttle keeps things on the host.
//!
//! * state (`/var/lib/shuttle`, or `$SHUTTLE_ROOT/state`): one directory per VM with its
//!   configuration and its copy-on-write upper layer; survives reboots.
//! * runtime (`/run/shuttle`, or `$SHUTTLE_ROOT/run`): per running VM, the monitor's socket,
//!   its log, the VM root's mount point and the lock the monitor holds while it lives.
//!
//! Both trees are hidden inside every VM.

use std::path::{Path, PathBuf};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/shuttle";
pub const DEFAULT_RUNTIME_DIR: &str = "/run/shuttle";

/// `path` with every symlink resolved, as far as it exists. Shuttle hides its directories
/// inside VMs by path; a symlink on the way (`SHUTTLE_ROOT=/link/to/dir`) would resolve
/// differently inside a VM and leave the real directory visible.
fn canonical(path: &Path) -> PathBuf {
    if let Ok(c) = path.canonicalize() {
        return c;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if parent != path => canonical(parent).join(name),
        _ => path.to_path_buf(),
    }
}

/// Creates `path` (and its parents) if needed and makes it accessible to root only. Shuttle's
/// trees hold every VM's files (including setuid programs a VM's root may have made) and
/// every VM's API socket (whoever connects speaks as that VM): no other host user may enter.
pub fn ensure_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub state: PathBuf,
    pub runtime: PathBuf,
}

impl Layout {
    /// The layout from `SHUTTLE_ROOT`, or the system-wide default.
    pub fn from_env() -> Layout {
        let layout = match std::env::var_os("SHUTTLE_ROOT") {
            Some(root) if !root.is_empty() => Layout::under(Path::new(&root)),
            _ => Layout {
                state: PathBuf::from(DEFAULT_STATE_DIR),
                runtime: PathBuf::from(DEFAULT_RUNTIME_DIR),
            },
        };
        Layout {
            state: canonical(&layout.state),
            runtime: canonical(&layout.runtime),
        }
    }

    pub fn under(root: &Path) -> Layout {
        Layout {
            state: root.join("state"),
            runtime: root.join("run"),
        }
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state.join("vms")
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }

    pub fn config_file(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("vm.json")
    }

    /// The overlay's upper layer: every file the VM writes.
    pub fn upper_dir(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("upper")
    }

    /// overlayfs' scratch directory; must be on the same filesystem as the upper layer.
    pub fn work_dir(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("work")
    }

    pub fn runtime_vms_dir(&self) -> PathBuf {
        self.runtime.join("vms")
    }

    /// Where VM `name`'s `share` rules into the host (`from = "@host"`) show its objects:
    /// `RUNTIME/shares/NAME/PATH` (the `shares` directory is root's alone, 0700).
    pub fn host_shares_dir(&self, name: &str) -> PathBuf {
        self.runtime.join("shares").join(name)
    }

    pub fn runtime_vm_dir(&self, name: &str) -> PathBuf {
        self.runtime_vms_dir().join(name)
    }

    /// The SysV IPC group a running VM belongs to (see `ipc_group`).
    pub fn ipc_group_file(&self, name: &str) -> PathBuf {
        self.runtime_vm_dir(name).join("ipc-group")
    }

    /// Held (flock) by the VM's monitor for as long as the VM runs. It lives beside, not in,
    /// the VM's runtime directory so that clean-up can remove that directory while locked.
    pub fn lock_file(&self, name: &str) -> PathBuf {
        self.runtime_vms_dir().join(format!("{name}.lock"))
    }

    pub fn monitor_socket(&self, name: &str) -> PathBuf {
        self.runtime_vm_dir(name).join("monitor.sock")
    }

    pub fn monitor_log(&self, name: &str) -> PathBuf {
        self.runtime_vms_dir().join(format!("{name}.log"))
    }

    /// The cgroup under which this layout's VMs get theirs: `shuttle` for the system-wide
    /// layout, and one per `SHUTTLE_ROOT` otherwise, so that side-by-side installations (such
    /// as parallel tests) never touch each other's VMs even when names coincide.
    pub fn cgroup_parent(&self) -> String {
        if self.state == Path::new(DEFAULT_STATE_DIR) {
            return "shuttle".to_owned();
        }
        // FNV-1a: stable across builds, unlike the standard library's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.state.as_os_str().as_encoded_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("shuttle-{:08x}", h as u32)
    }

    /// The directory bind-mounted at /run/shuttle inside the VM; it holds the VM's own API
    /// socket (`broker.sock`), whose listener belongs to the VM's monitor.
    pub fn vm_api_dir(&self, name: &str) -> PathBuf {
        self.runtime_vm_dir(name).join("api")
    }

    pub fn vm_api_socket(&self, name: &str) -> PathBuf {
        self.vm_api_dir(name).join("broker.sock")
    }

    /// The VM's audit journal (a directory of segments): decisions its monitor made, durable until the broker collects
    /// them into the audit store.
    pub fn audit_journal(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("audit")
    }

    /// Journals of removed VMs, kept until the broker has collected them.
    pub fn orphaned_journals_dir(&self) -> PathBuf {
        self.state.join("journals")
    }

    /// The broker's audit store.
    pub fn audit_db(&self) -> PathBuf {
        self.state.join("audit.db")
    }

    /// The active policy, as last loaded (monitors read it when they start).
    pub fn active_policy(&self) -> PathBuf {
        self.state.join("policy").join("active.toml")
    }

    /// The file the active policy was loaded from (for SIGHUP reloads and messages).
    pub fn active_policy_source(&self) -> PathBuf {
        self.state.join("policy").join("source")
    }

    /// Named layers of the active policy (a system's rules while it is up), one JSON file
    /// each (`NAME.json`: its sources in order); they follow the loaded policy, by name.
    pub fn policy_layers_dir(&self) -> PathBuf {
        self.state.join("policy").join("layers")
    }

    pub fn broker_socket(&self) -> PathBuf {
        self.runtime.join("broker.sock")
    }

    pub fn broker_lock(&self) -> PathBuf {
        self.runtime.join("broker.lock")
    }

    /// The running broker's pid (informational; the lock is what says it runs).
    pub fn broker_pid(&self) -> PathBuf {
        self.runtime.join("broker.pid")
    }

    pub fn broker_log(&self) -> PathBuf {
        self.runtime.join("broker.log")
    }

    /// Where the VM's root is assembled (only inside the VM's own mount namespace).
    pub fn root_mount_point(&self, name: &str) -> PathBuf {
        self.runtime_vm_dir(name).join("root")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuttle_root_relocates_both_trees() {
        let l = Layout::under(Path::new("/x"));
        assert_eq!(l.upper_dir("web"), Path::new("/x/state/vms/web/upper"));
        assert_eq!(
            l.monitor_socket("web"),
            Path::new("/x/run/vms/web/monitor.sock")
        );
        assert_eq!(l.lock_file("web"), Path::new("/x/run/vms/web.lock"));
        assert_ne!(l.cgroup_parent(), "shuttle");
        assert_ne!(
            l.cgroup_parent(),
            Layout::under(Path::new("/y")).cgroup_parent()
        );
        assert_eq!(
            l.cgroup_parent(),
            Layout::under(Path::new("/x")).cgroup_parent()
        );
    }
}
