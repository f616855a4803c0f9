//! `shuttle path`: where a VM's file lives on the host, and the reverse.
//!
//! A VM's root is an overlay: what the VM wrote is in its upper layer
//! (`STATE/vms/NAME/upper/PATH`), everything else comes from its base (the host's root, or the
//! `--base` directory). A file the VM deleted is a whiteout in the upper layer; a directory it
//! replaced is marked opaque there (nothing of the base shows below it). Paths are taken as
//! named (normalized without following symbolic links), and the VM's own file systems (`/proc`,
//! `/sys`, `/dev`, `/tmp`, Shuttle's directories) and its `--hide` paths are not on disk.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Base;
use crate::layout::Layout;
use crate::store;

/// Paths of a VM that are its own file systems, not files of its overlay.
const NOT_ON_DISK: &[&str] = &["/proc", "/sys", "/dev", "/tmp", "/run/shuttle", "/shuttle"];

/// Where a VM's file comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    /// The VM wrote it: its own copy, in its upper layer.
    Upper,
    /// Seen through the VM's base (the host's root or its `--base` directory), not copied.
    Base,
}

/// A file of a VM and where it lives on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Located {
    pub vm: String,
    /// The path inside the VM.
    pub path: String,
    pub layer: Layer,
    /// Where it is on the host.
    pub host_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{0} is not an absolute path: name it as the VM sees it, such as /etc/hostname")]
    NotAbsolute(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("{path} in VM {vm} is on the VM's own {what}, not stored on the host")]
    NotOnDisk {
        vm: String,
        path: String,
        what: &'static str,
    },
    #[error("{path} is hidden in VM {vm} (--hide or Shuttle's own directories)")]
    Hidden { vm: String, path: String },
    #[error("{path} does not exist in VM {vm}{why}")]
    Missing {
        vm: String,
        path: String,
        why: &'static str,
    },
    #[error("{path} is Shuttle's own file for VM {vm}, not seen inside it")]
    Internal { vm: String, path: String },
    #[error("{path} is not a file of any VM: no VM's upper layer or base holds it")]
    NoVm { path: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// `path` made absolute and normalized lexically (`.` and `..` resolved by name).
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(path.to_owned()));
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn under(path: &str, dir: &str) -> bool {
    dir == "/"
        || path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            let name = std::ffi::CString::new(*name).unwrap_or_default();
            shuttle_sys::vm_mount::lgetxattr(path, &name)
                .ok()
                .flatten()
                .is_some_and(|v| v == b"y")
        })
}

/// Where file `path` of VM `vm` lives on the host.
pub fn in_vm(layout: &Layout, vm: &str, path: &str) -> Result<Located, PathError> {
    let config = store::load(layout, vm)?;
    let path = normalize(path)?;
    let vm = config.name.clone();
    if let Some(fs) = NOT_ON_DISK.iter().find(|p| under(&path, p)) {
        let what = match *fs {
            "/proc" => "proc file system",
            "/sys" => "sysfs",
            "/dev" => "device file system",
            "/tmp" => "tmpfs (/tmp)",
            _ => "Shuttle directory",
        };
        return Err(PathError::NotOnDisk { vm, path, what });
    }
    let hidden = config
        .hide
        .iter()
        .any(|h| under(&path, &h.to_string_lossy()))
        || (config.base == Base::Host
            && [&layout.state, &layout.runtime]
                .iter()
                .any(|d| under(&path, &d.to_string_lossy())));
    if hidden {
        return Err(PathError::Hidden { vm, path });
    }
    let rel: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    // The upper layer, one component at a time: a whiteout deletes, an opaque directory hides
    // the base below it.
    let mut cur = layout.upper_dir(&vm);
    let mut opaque = false;
    for (i, c) in rel.iter().enumerate() {
        cur.push(c);
        let meta = match std::fs::symlink_metadata(&cur) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(source) => {
                return Err(PathError::Io {
                    path: cur.display().to_string(),
                    source,
                })
            }
        };
        if is_whiteout(&meta) {
            return Err(PathError::Missing {
                vm,
                path,
                why: " (the VM deleted it)",
            });
        }
        if i + 1 == rel.len() {
            return Ok(Located {
                vm,
                path,
                layer: Layer::Upper,
                host_path: cur,
            });
        }
        if !meta.is_dir() {
            return Err(PathError::Missing {
                vm,
                path,
                why: " (a file is in the way)",
            });
        }
        opaque |= is_opaque(&cur);
    }
    if opaque {
        return Err(PathError::Missing {
            vm,
            path,
            why: " (the VM replaced a directory on the way)",
        });
    }
    let base = match &config.base {
        Base::Host => PathBuf::from("/"),
        Base::Dir(d) => d.clone(),
    };
    let mut host_path = base;
    host_path.extend(&rel);
    match std::fs::symlink_metadata(&host_path) {
        Ok(_) => Ok(Located {
            vm,
            path,
            layer: Layer::Base,
            host_path,
        }),
        Err(_) => Err(PathError::Missing { vm, path, why: "" }),
    }
}

/// The VMs' files that host path `host` is: the VM's own copy when it is in a VM's upper
/// layer, else every VM that sees it through its base (and has not replaced it).
pub fn on_host(layout: &Layout, host: &str) -> Result<Vec<Located>, PathError> {
    let path = normalize(host)?;
    let vms_dir = layout.vms_dir().to_string_lossy().into_owned();
    if under(&path, &vms_dir) && path != vms_dir {
        let rest = &path[vms_dir.len() + 1..];
        let (vm, inner) = rest.split_once('/').unwrap_or((rest, ""));
        return match inner.split_once('/').unwrap_or((inner, "")) {
            ("upper", inside) => {
                let located = in_vm(layout, vm, &format!("/{inside}"))?;
                Ok(vec![located])
            }
            _ => Err(PathError::Internal {
                vm: vm.to_owned(),
                path,
            }),
        };
    }
    let mut found = Vec::new();
    for config in store::list(layout)?.into_iter().flatten() {
        let base = match &config.base {
            Base::Host => "/".to_owned(),
            Base::Dir(d) => d.to_string_lossy().into_owned(),
        };
        if !under(&path, &base) {
            continue;
        }
        let inside = if base == "/" {
            path.clone()
        } else {
            normalize(&format!("/{}", &path[base.len()..]))?
        };
        if let Ok(l) = in_vm(layout, &config.name, &inside) {
            if l.layer == Layer::Base && l.host_path == Path::new(&path) {
                found.push(l);
            }
        }
    }
    if found.is_empty() {
        return Err(PathError::NoVm { path });
    }
    Ok(found)
}

/// Whether `arg` names a VM's file (`VM:/path`) rather than a host path.
pub fn split_vm_path(arg: &str) -> Option<(&str, &str)> {
    let (vm, path) = arg.split_once(':')?;
    (path.starts_with('/')
        && !vm.is_empty()
        && vm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    .then_some((vm, path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_by_name() {
        assert_eq!(normalize("/a/./b/../c//d/").unwrap(), "/a/c/d");
        assert_eq!(normalize("/../..").unwrap(), "/");
        assert!(normalize("a/b").is_err());
    }

    #[test]
    fn vm_paths_are_told_from_host_paths() {
        assert_eq!(split_vm_path("web:/etc/x"), Some(("web", "/etc/x")));
        assert_eq!(split_vm_path("/etc/x"), None);
        assert_eq!(split_vm_path("/srv/a:b"), None);
        assert_eq!(split_vm_path("Web:/x"), None);
        assert_eq!(split_vm_path("web:x"), None);
    }

    #[test]
    fn under_means_the_directory_or_beneath() {
        assert!(under("/tmp", "/tmp"));
        assert!(under("/tmp/x", "/tmp"));
        assert!(!under("/tmpx", "/tmp"));
        assert!(under("/anything", "/"));
    }
}
