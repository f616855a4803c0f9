//! The VMs on this host: creating, listing, loading and removing their state directories.
//!
//! Creation builds the whole directory under a temporary name and renames it into place, so a
//! failed or concurrent `vm create` never leaves a half-made VM behind.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::config::{validate_name, ConfigError, VmConfig, VmOptions};
use crate::layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("VM {0} already exists: pick another name, or remove it with `shuttle vm rm {0}`")]
    Exists(String),
    #[error("no VM named {0}: see `shuttle vm ls`, or create it with `shuttle vm create {0}`")]
    Missing(String),
    #[error("VM {0} is running: stop it first with `shuttle vm stop {0}`, or use --force")]
    Running(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the configuration of VM {name} at {path} is damaged ({message}); remove the VM and create it again")]
    Damaged {
        name: String,
        path: PathBuf,
        message: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A name no other call in any process can be using at the same time: the broker serves
/// requests on several threads of one process, so the pid alone is not enough.
fn unique_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Creates a VM's state directory. Nothing is left behind on failure.
pub fn create(layout: &Layout, options: &VmOptions) -> Result<VmConfig, StoreError> {
    let config = options.validate(now())?;
    let vms = layout.vms_dir();
    crate::layout::ensure_private_dir(&layout.state).map_err(io_err("creating", &layout.state))?;
    fs::create_dir_all(&vms).map_err(io_err("creating", &vms))?;
    let final_dir = layout.vm_dir(&config.name);
    if final_dir.exists() {
        return Err(StoreError::Exists(config.name));
    }
    let tmp = vms.join(format!(".{}.creating-{}", config.name, unique_suffix()));
    let result = (|| {
        fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
        for sub in ["upper", "work"] {
            let p = tmp.join(sub);
            fs::create_dir(&p).map_err(io_err("creating", &p))?;
        }
        let json = serde_json::to_vec_pretty(&config).map_err(|e| StoreError::Io {
            what: "encoding",
            path: tmp.clone(),
            source: io::Error::other(e),
        })?;
        let cfg = tmp.join("vm.json");
        fs::write(&cfg, json).map_err(io_err("writing", &cfg))?;
        // rename(2) onto an existing non-empty directory fails: the loser of a race between
        // two creates gets a clean "already exists".
        match fs::rename(&tmp, &final_dir) {
            Ok(()) => Ok(()),
            Err(e) if final_dir.exists() => {
                let _ = e;
                Err(StoreError::Exists(config.name.clone()))
            }
            Err(e) => Err(StoreError::Io {
                what: "renaming into",
                path: final_dir.clone(),
                source: e,
            }),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| config)
}

pub fn load(layout: &Layout, name: &str) -> Result<VmConfig, StoreError> {
    validate_name(name)?;
    let path = layout.config_file(name);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::Missing(name.into()))
        }
        Err(e) => {
            return Err(StoreError::Io {
                what: "reading",
                path,
                source: e,
            })
        }
    };
    let config: VmConfig = serde_json::from_slice(&text).map_err(|e| StoreError::Damaged {
        name: name.into(),
        path: path.clone(),
        message: e.to_string(),
    })?;
    if config.name != name {
        return Err(StoreError::Damaged {
            name: name.into(),
            path,
            message: "name mismatch".into(),
        });
    }
    Ok(config)
}

/// Every VM, sorted by name. Damaged entries are reported, not skipped silently.
pub fn list(layout: &Layout) -> Result<Vec<Result<VmConfig, StoreError>>, StoreError> {
    let dir = layout.vms_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => {
            return Err(StoreError::Io {
                what: "listing",
                path: dir,
                source: e,
            })
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.') && validate_name(n).is_ok())
        .collect();
    names.sort();
    Ok(names.iter().map(|n| load(layout, n)).collect())
}

/// The lock a VM's monitor holds while the VM runs.
pub fn open_lock(layout: &Layout, name: &str) -> Result<fs::File, StoreError> {
    let dir = layout.runtime_vms_dir();
    crate::layout::ensure_private_dir(&layout.runtime)
        .map_err(io_err("creating", &layout.runtime))?;
    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let path = layout.lock_file(name);
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))
}

/// Takes the VM's lock without waiting; `None` when someone (a running monitor) holds it.
pub fn try_lock(layout: &Layout, name: &str) -> Result<Option<Flock<fs::File>>, StoreError> {
    let file = open_lock(layout, name)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(StoreError::Io {
            what: "locking",
            path: layout.lock_file(name),
            source: io::Error::from(e),
        }),
    }
}

/// Whether the VM's monitor is alive (it holds the lock).
pub fn is_running(layout: &Layout, name: &str) -> bool {
    let Ok(file) = fs::File::open(layout.lock_file(name)) else {
        return false;
    };
    let _ = file.as_fd();
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
    }
}

/// Removes a stopped VM and everything it wrote. Holds the VM's lock meanwhile so it cannot
/// start underneath.
pub fn remove(layout: &Layout, name: &str) -> Result<(), StoreError> {
    load(layout, name).or_else(|e| match e {
        StoreError::Damaged { .. } => Ok(placeholder(name)),
        e => Err(e),
    })?;
    let Some(_lock) = try_lock(layout, name)? else {
        return Err(StoreError::Running(name.into()));
    };
    let dir = layout.vm_dir(name);
    // A monitor that was killed could not remove the VM's cgroup (its next start would):
    // nothing runs the VM while we hold its lock, so whatever is left there goes now.
    if let Some(stale) = crate::cgroup::VmCgroup::existing(&layout.cgroup_parent(), name) {
        stale.remove(std::time::Duration::from_secs(2))?;
    }
    // So could shares of its files on the host (they would keep its old file system busy).
    crate::share::clear_host_shares(layout, name);
    // Decisions the broker has not collected yet outlive the VM: its journal moves aside.
    let journal = layout.audit_journal(name);
    if journal.exists() {
        let kept = layout.orphaned_journals_dir();
        fs::create_dir_all(&kept).map_err(io_err("creating", &kept))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let target = kept.join(format!("{name}-{stamp}"));
        fs::rename(&journal, &target).map_err(io_err("keeping the audit journal of", &journal))?;
    }
    // Move aside first so a crash mid-way never leaves a VM that looks valid but is partial.
    let doomed = layout
        .vms_dir()
        .join(format!(".{name}.removing-{}", unique_suffix()));
    fs::rename(&dir, &doomed).map_err(io_err("moving aside", &dir))?;
    fs::remove_dir_all(&doomed).map_err(io_err("removing", &doomed))?;
    let _ = fs::remove_file(layout.monitor_log(name));
    let _ = fs::remove_dir_all(layout.runtime_vm_dir(name));
    let _ = fs::remove_file(layout.lock_file(name));
    Ok(())
}

fn placeholder(name: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        base: crate::config::Base::Host,
        net: crate::config::NetMode::None,
        memory_bytes: None,
        pids: None,
        hide: vec![],
        tags: vec![],
        created_at: 0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn opts(name: &str) -> VmOptions {
        VmOptions {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn create_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        create(&layout, &opts("b")).unwrap();
        create(&layout, &opts("a")).unwrap();
        assert!(matches!(
            create(&layout, &opts("a")),
            Err(StoreError::Exists(_))
        ));
        let names: Vec<String> = list(&layout)
            .unwrap()
            .into_iter()
            .map(|c| c.unwrap().name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(layout.upper_dir("a").is_dir());
        remove(&layout, "a").unwrap();
        assert!(!layout.vm_dir("a").exists());
        assert!(matches!(remove(&layout, "a"), Err(StoreError::Missing(_))));
        // Nothing temporary is left behind.
        let leftovers: Vec<_> = fs::read_dir(layout.vms_dir()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn bad_options_create_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        assert!(create(&layout, &opts("Bad Name")).is_err());
        let mut o = opts("x");
        o.base = Some("/nonexistent/base".into());
        assert!(create(&layout, &o).is_err());
        assert!(!layout.vm_dir("x").exists());
    }

    #[test]
    fn a_held_lock_means_running() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        create(&layout, &opts("a")).unwrap();
        assert!(!is_running(&layout, "a"));
        let lock = try_lock(&layout, "a").unwrap().unwrap();
        assert!(is_running(&layout, "a"));
        assert!(matches!(remove(&layout, "a"), Err(StoreError::Running(_))));
        drop(lock);
        assert!(!is_running(&layout, "a"));
    }
}
