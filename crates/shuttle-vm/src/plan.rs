//! The set-up plan: a VM's configuration turned into the explicit list of steps that build its
//! root and namespaces (in the spirit of bubblewrap's and youki's setup ops). Building the plan
//! is pure, so unit tests inspect it without privileges; [`crate::setup`] executes it.

use std::path::{Path, PathBuf};

use crate::config::{Base, NetMode, VmConfig};
use crate::hardening;
use crate::layout::Layout;

/// Host device nodes every VM gets (bind-mounted read-only, so their permissions stay the
/// host's and the VM cannot change them).
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Stop mount events from propagating back to the host (mount --make-rprivate /).
    MakeMountsPrivate,
    /// The copy-on-write root.
    MountOverlay {
        lower: PathBuf,
        upper: PathBuf,
        work: PathBuf,
        target: PathBuf,
    },
    /// An empty read-only directory over `target` (hiding what is there).
    HideDir {
        target: PathBuf,
    },
    /// An empty read-only file over `target`.
    HideFile {
        target: PathBuf,
    },
    /// Hide `target` whatever it is, if it exists in the new root (for --hide and Shuttle's
    /// own directories).
    HideIfPresent {
        target: PathBuf,
    },
    /// The VM's API directory (its broker socket) at /run/shuttle, read-only: the VM can
    /// connect to the socket but never replace it.
    BindApiDir {
        source: PathBuf,
        target: PathBuf,
    },
    /// The shuttle binary, read-only and executable, at /run/shuttle/shuttle: what a VM's
    /// programs run for `shuttle signal` (and later `shuttle open`).
    BindShuttleBinary {
        source: PathBuf,
        target: PathBuf,
    },
    MountProc {
        target: PathBuf,
    },
    MountSysfs {
        target: PathBuf,
    },
    /// cgroup2 at /sys/fs/cgroup, read-only, showing only the VM's own cgroup.
    MountCgroup2 {
        target: PathBuf,
    },
    /// A fresh tmpfs. `mode` is the octal mode of its root.
    MountTmpfs {
        target: PathBuf,
        mode: u32,
        size: &'static str,
        nosuid_nodev: bool,
    },
    BindDevice {
        host: PathBuf,
        target: PathBuf,
    },
    MountDevpts {
        target: PathBuf,
    },
    MountMqueue {
        target: PathBuf,
    },
    Symlink {
        link: PathBuf,
        points_to: PathBuf,
    },
    /// Bind `target` onto itself read-only, if it exists.
    ReadOnlyIfPresent {
        target: PathBuf,
    },
    /// Make `new_root` the root and detach the old one.
    PivotRoot {
        new_root: PathBuf,
    },
    SetHostname {
        name: String,
    },
    LoopbackUp,
}

/// Whether the host runs the unified cgroup v2 hierarchy alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCgroups {
    Unified,
    LegacyOrHybrid,
}

fn inside(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// Builds the plan for `config`. `hidden` lists host paths that must be invisible in every VM
/// (Shuttle's state and runtime directories) besides the VM's own `--hide` paths.
pub fn build(
    config: &VmConfig,
    layout: &Layout,
    cgroups: HostCgroups,
    shuttle_binary: Option<&Path>,
) -> Vec<Step> {
    let root = layout.root_mount_point(&config.name);
    let lower = match &config.base {
        Base::Host => PathBuf::from("/"),
        Base::Dir(d) => d.clone(),
    };
    let mut steps = vec![
        Step::MakeMountsPrivate,
        Step::MountOverlay {
            lower,
            upper: layout.upper_dir(&config.name),
            work: layout.work_dir(&config.name),
            target: root.clone(),
        },
    ];
    // Shuttle's own trees first: every VM's upper layer lives in the state directory, which
    // the host root (this VM's lower layer) contains.
    for own in [&layout.state, &layout.runtime] {
        steps.push(Step::HideIfPresent {
            target: root.join(own.strip_prefix("/").unwrap_or(own)),
        });
    }
    for h in &config.hide {
        steps.push(Step::HideIfPresent {
            target: root.join(h.strip_prefix("/").unwrap_or(h)),
        });
    }

    // After hiding Shuttle's own runtime directory, which may well be /run/shuttle itself.
    steps.push(Step::BindApiDir {
        source: layout.vm_api_dir(&config.name),
        target: inside(&root, "/run/shuttle"),
    });
    if let Some(exe) = shuttle_binary {
        steps.push(Step::BindShuttleBinary {
            source: exe.to_path_buf(),
            target: inside(&root, "/run/shuttle/shuttle"),
        });
    }
    steps.push(Step::MountProc {
        target: inside(&root, "/proc"),
    });
    for f in hardening::MASKED_FILES {
        steps.push(Step::HideFile {
            target: inside(&root, f),
        });
    }
    steps.push(Step::MountSysfs {
        target: inside(&root, "/sys"),
    });
    if cgroups == HostCgroups::Unified {
        steps.push(Step::MountCgroup2 {
            target: inside(&root, "/sys/fs/cgroup"),
        });
    }
    for d in hardening::MASKED_DIRS {
        steps.push(Step::HideDir {
            target: inside(&root, d),
        });
    }
    for p in hardening::READ_ONLY_PATHS {
        steps.push(Step::ReadOnlyIfPresent {
            target: inside(&root, p),
        });
    }

    let dev = inside(&root, "/dev");
    steps.push(Step::MountTmpfs {
        target: dev.clone(),
        mode: 0o755,
        size: "64k",
        nosuid_nodev: false,
    });
    for d in DEVICES {
        steps.push(Step::BindDevice {
            host: Path::new("/dev").join(d),
            target: dev.join(d),
        });
    }
    steps.push(Step::MountDevpts {
        target: dev.join("pts"),
    });
    steps.push(Step::Symlink {
        link: dev.join("ptmx"),
        points_to: "pts/ptmx".into(),
    });
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        steps.push(Step::Symlink {
            link: dev.join(name),
            points_to: to.into(),
        });
    }
    steps.push(Step::MountTmpfs {
        target: dev.join("shm"),
        mode: 0o1777,
        size: "50%",
        nosuid_nodev: true,
    });
    steps.push(Step::MountMqueue {
        target: dev.join("mqueue"),
    });
    steps.push(Step::MountTmpfs {
        target: inside(&root, "/tmp"),
        mode: 0o1777,
        size: "50%",
        nosuid_nodev: true,
    });

    steps.push(Step::PivotRoot { new_root: root });
    steps.push(Step::SetHostname {
        name: config.name.clone(),
    });
    if config.net == NetMode::None {
        steps.push(Step::LoopbackUp);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmOptions;

    fn config(f: impl Fn(&mut VmOptions)) -> VmConfig {
        let mut o = VmOptions {
            name: "web".into(),
            ..Default::default()
        };
        f(&mut o);
        o.validate(0).expect("valid options")
    }

    fn layout() -> Layout {
        Layout::under(Path::new("/srv/sh"))
    }

    #[test]
    fn host_base_overlays_the_host_root_and_hides_shuttle_itself() {
        let plan = build(
            &config(|_| {}),
            &layout(),
            HostCgroups::LegacyOrHybrid,
            None,
        );
        assert_eq!(plan[0], Step::MakeMountsPrivate);
        assert_eq!(
            plan[1],
            Step::MountOverlay {
                lower: "/".into(),
                upper: "/srv/sh/state/vms/web/upper".into(),
                work: "/srv/sh/state/vms/web/work".into(),
                target: "/srv/sh/run/vms/web/root".into(),
            }
        );
        assert!(plan.contains(&Step::HideIfPresent {
            target: "/srv/sh/run/vms/web/root/srv/sh/state".into()
        }));
        assert!(plan.contains(&Step::HideIfPresent {
            target: "/srv/sh/run/vms/web/root/srv/sh/run".into()
        }));
        // Pivot after every mount; hostname and loopback after that.
        let pivot = plan
            .iter()
            .position(|s| matches!(s, Step::PivotRoot { .. }));
        assert_eq!(pivot, Some(plan.len() - 3));
        assert_eq!(plan[plan.len() - 1], Step::LoopbackUp);
        assert!(!plan.iter().any(|s| matches!(s, Step::MountCgroup2 { .. })));
        // The VM's API socket directory comes after the hiding of the runtime directory.
        let api = plan
            .iter()
            .position(|s| matches!(s, Step::BindApiDir { .. }))
            .expect("api dir bound");
        let hide_run = plan
            .iter()
            .position(|s| {
                *s == Step::HideIfPresent {
                    target: "/srv/sh/run/vms/web/root/srv/sh/run".into(),
                }
            })
            .expect("runtime hidden");
        assert!(hide_run < api);
        assert_eq!(
            plan[api],
            Step::BindApiDir {
                source: "/srv/sh/run/vms/web/api".into(),
                target: "/srv/sh/run/vms/web/root/run/shuttle".into()
            }
        );
    }

    #[test]
    fn options_shape_the_plan() {
        let c = config(|o| {
            o.net = Some("host".into());
            o.hide = vec!["/home".into()];
        });
        let plan = build(&c, &layout(), HostCgroups::Unified, None);
        assert!(!plan.contains(&Step::LoopbackUp));
        assert!(plan.contains(&Step::HideIfPresent {
            target: "/srv/sh/run/vms/web/root/home".into()
        }));
        assert!(plan.iter().any(|s| matches!(s, Step::MountCgroup2 { .. })));
        assert!(plan.contains(&Step::SetHostname { name: "web".into() }));
    }

    #[test]
    fn proc_is_masked_and_dev_is_minimal() {
        let plan = build(
            &config(|_| {}),
            &layout(),
            HostCgroups::LegacyOrHybrid,
            None,
        );
        let r = Path::new("/srv/sh/run/vms/web/root");
        assert!(plan.contains(&Step::HideFile {
            target: r.join("proc/kcore")
        }));
        assert!(plan.contains(&Step::ReadOnlyIfPresent {
            target: r.join("proc/sys")
        }));
        let devices: Vec<_> = plan
            .iter()
            .filter_map(|s| match s {
                Step::BindDevice { host, .. } => Some(host.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(devices.len(), DEVICES.len());
        assert!(devices
            .iter()
            .all(|d| DEVICES.iter().any(|n| d == &Path::new("/dev").join(n))));
        // Masks come after the mount they mask.
        let proc_at = plan
            .iter()
            .position(|s| matches!(s, Step::MountProc { .. }));
        let kcore_at = plan.iter().position(|s| {
            *s == Step::HideFile {
                target: r.join("proc/kcore"),
            }
        });
        assert!(proc_at < kcore_at);
    }
}
