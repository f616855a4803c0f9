//! A VM's control group, on pure cgroup v2 hosts and on v1/hybrid hosts alike, through the
//! cgroups-rs crate (which picks the hierarchy the host runs).
//!
//! Each VM gets `shuttle/<name>` with the memory and pids controllers. Memory limits also cap
//! swap, so a memory hog is stopped by the OOM killer instead of swapping the host to a halt.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cgroups_rs::cgroup_builder::CgroupBuilder;
use cgroups_rs::{Cgroup, CgroupPid, MaxValue};

use crate::plan::HostCgroups;

const CONTROLLERS: &[&str] = &["memory", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("creating cgroup {path}: {message}")]
    Create { path: String, message: String },
    #[error("moving process {pid} into cgroup {path}: {message}")]
    AddTask {
        path: String,
        pid: i32,
        message: String,
    },
    #[error("removing cgroup {path}: processes are still in it after {waited:?}")]
    Busy { path: String, waited: Duration },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

pub struct VmCgroup {
    cgroup: Cgroup,
}

impl std::fmt::Debug for VmCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmCgroup")
            .field("path", &self.cgroup.path())
            .finish()
    }
}

/// Which cgroup layout the host runs.
pub fn host_cgroups() -> HostCgroups {
    if cgroups_rs::hierarchies::is_cgroup2_unified_mode() {
        HostCgroups::Unified
    } else {
        HostCgroups::LegacyOrHybrid
    }
}

/// The host directories of cgroup `path` for `controller` (one on v2, one per hierarchy on v1).
fn dirs_of(v2: bool, path: &str, controller: &str) -> Vec<PathBuf> {
    let hier = cgroups_rs::hierarchies::auto();
    if v2 {
        vec![hier.root().join(path)]
    } else {
        vec![hier.root().join(controller).join(path)]
    }
}

fn path_for(parent: &str, vm: &str) -> String {
    format!("{parent}/{vm}")
}

fn controllers() -> Vec<String> {
    CONTROLLERS.iter().map(|s| s.to_string()).collect()
}

impl VmCgroup {
    /// Creates the VM's cgroup with its limits, replacing a stale one left by a crash.
    pub fn create(parent: &str, vm: &str, limits: Limits) -> Result<VmCgroup, CgroupError> {
        let path = path_for(parent, vm);
        if let Some(stale) = VmCgroup::existing(parent, vm) {
            stale.remove(Duration::from_secs(2))?;
        }
        let mut builder = CgroupBuilder::new(&path).set_specified_controllers(controllers());
        if let Some(m) = limits.memory_bytes {
            builder = builder.memory().memory_hard_limit(m as i64).done();
        }
        if let Some(p) = limits.pids {
            builder = builder
                .pid()
                .maximum_number_of_processes(MaxValue::Value(p as i64))
                .done();
        }
        let cgroup = builder
            .build(cgroups_rs::hierarchies::auto())
            .map_err(|e| CgroupError::Create {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let cg = VmCgroup { cgroup };
        if let Some(m) = limits.memory_bytes {
            cg.limit_swap(m);
        }
        Ok(cg)
    }

    /// The VM's cgroup if it exists (after a crash, or to inspect a running VM).
    pub fn existing(parent: &str, vm: &str) -> Option<VmCgroup> {
        let cgroup = Cgroup::load_with_specified_controllers(
            cgroups_rs::hierarchies::auto(),
            path_for(parent, vm),
            controllers(),
        );
        cgroup.exists().then_some(VmCgroup { cgroup })
    }

    /// No swap beyond the memory limit: v1 counts memory+swap together (memsw), v2 counts
    /// swap alone. Hosts without swap accounting simply lack the file; nothing to limit then.
    fn limit_swap(&self, memory_bytes: u64) {
        let (file, value) = if self.cgroup.v2() {
            ("memory.swap.max", "0".to_string())
        } else {
            ("memory.memsw.limit_in_bytes", memory_bytes.to_string())
        };
        for dir in self.dirs("memory") {
            let p = dir.join(file);
            if p.exists() {
                if let Err(e) = std::fs::write(&p, &value) {
                    tracing::warn!(path = %p.display(), error = %e, "could not limit swap");
                }
            }
        }
    }

    /// The directories of this cgroup for `controller` (one on v2, one per hierarchy on v1).
    fn dirs(&self, controller: &str) -> Vec<PathBuf> {
        dirs_of(self.cgroup.v2(), self.cgroup.path(), controller)
    }

    /// Removes the shared parent (`shuttle-…`) once the last VM's cgroup in it is gone: one
    /// plain rmdir per hierarchy, which fails (EBUSY) while any other cgroup is in it. Never
    /// the crate's `delete`, which removes sub-cgroups recursively (another VM's, empty while
    /// that VM starts) and, failing, retries for 150 ms: every stop while other VMs ran took
    /// that long.
    fn remove_parent_if_empty(&self) {
        let parent = self.cgroup.parent_control_group();
        let path = parent.path();
        if !path.starts_with("shuttle") || path.contains('/') {
            return;
        }
        for dir in CONTROLLERS
            .iter()
            .flat_map(|c| dirs_of(self.cgroup.v2(), path, c))
        {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// On cgroup v1, the `tasks` files through which a single-threaded process can move
    /// itself. Writing "0" (the calling thread) to `tasks` is the one migration for which the
    /// kernel skips its global threadgroup lock, whose write side costs an RCU grace period
    /// (5-15 ms per VM start, see cgroup_procs_write_start in kernel/cgroup/cgroup.c). `None`
    /// on cgroup v2, where the monitor moves init through `cgroup.procs`.
    pub fn self_attach_files(&self) -> Option<Vec<PathBuf>> {
        if self.cgroup.v2() {
            return None;
        }
        Some(
            CONTROLLERS
                .iter()
                .flat_map(|c| self.dirs(c))
                .map(|d| d.join("tasks"))
                .collect(),
        )
    }

    /// Whether `pid` is in this cgroup (in every hierarchy of it, on v1).
    pub fn contains(&self, pid: i32) -> bool {
        self.cgroup.procs().iter().any(|p| p.pid == pid as u64)
            && CONTROLLERS.iter().flat_map(|c| self.dirs(c)).all(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .map(|t| t.lines().any(|l| l.trim() == pid.to_string()))
                    .unwrap_or(false)
            })
    }

    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        self.cgroup
            .add_task_by_tgid(CgroupPid::from(pid as u64))
            .map_err(|e| CgroupError::AddTask {
                path: self.cgroup.path().to_owned(),
                pid,
                message: e.to_string(),
            })
    }

    /// Host pids of the VM's processes.
    pub fn pids(&self) -> Vec<i32> {
        self.cgroup.procs().iter().map(|p| p.pid as i32).collect()
    }

    /// Whether `pid` is listed in the cgroup's first hierarchy (cheap membership check).
    pub fn contains_pid_in_any(&self, pid: i32) -> bool {
        self.cgroup.procs().iter().any(|p| p.pid == pid as u64)
    }

    /// Kills whatever is left and removes the cgroup, waiting up to `wait` for the kernel to
    /// finish reaping.
    pub fn remove(&self, wait: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        loop {
            let procs = self.cgroup.procs();
            for p in &procs {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if procs.is_empty() && self.cgroup.delete().is_ok() && !self.cgroup.exists() {
                self.remove_parent_if_empty();
                return Ok(());
            }
            if start.elapsed() > wait {
                return Err(CgroupError::Busy {
                    path: self.cgroup.path().to_owned(),
                    waited: wait,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
