//! A VM's configuration: what the user asked for (`VmOptions`), validated into what is stored
//! and started (`VmConfig`).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The lower layer of the VM's copy-on-write root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Base {
    /// The host's root filesystem.
    Host,
    /// A directory tree, such as one made by debootstrap.
    Dir(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetMode {
    /// A network namespace of its own with only loopback.
    None,
    /// The host's network namespace.
    Host,
}

/// The validated, stored description of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    pub base: Base,
    pub net: NetMode,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// Host paths made invisible inside the VM (absolute, normalised).
    pub hide: Vec<PathBuf>,
    pub tags: Vec<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// What a user asks for at `shuttle vm create`, before validation.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    pub name: String,
    /// `host` or a directory.
    pub base: Option<String>,
    /// `none` or `host`.
    pub net: Option<String>,
    /// A size such as `512M`.
    pub memory: Option<String>,
    pub pids: Option<u64>,
    pub hide: Vec<PathBuf>,
    pub tags: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid VM name {0:?}: use 1 to 63 lower-case letters, digits and '-', starting with a letter or digit")]
    BadName(String),
    #[error("invalid tag {0:?}: use 1 to 63 lower-case letters, digits, '-' and '_'")]
    BadTag(String),
    #[error("base directory {0} does not exist or is not a directory: give an existing root tree (for example one made by debootstrap) or --base host")]
    MissingBase(PathBuf),
    #[error("base directory must be an absolute path, got {0}")]
    RelativeBase(PathBuf),
    #[error("invalid --net {0:?}: use none (loopback only) or host")]
    BadNet(String),
    #[error(
        "invalid --memory {0:?}: give a size such as 512M, 2G or a number of bytes (at least 4M)"
    )]
    BadMemory(String),
    #[error("invalid --pids {0}: allow at least 2 processes (the VM's init and one command)")]
    BadPids(u64),
    #[error("invalid --hide {0}: give an absolute path without '..' other than / or a path Shuttle mounts itself (/proc, /dev, /sys, /tmp)")]
    BadHide(PathBuf),
}

/// Rules shared by VM names and everything derived from them (hostnames, cgroup names,
/// directory names, socket paths): short, lower-case, no separators.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName(name.to_owned()))
    }
}

fn validate_tag(tag: &str) -> Result<(), ConfigError> {
    let ok = !tag.is_empty()
        && tag.len() <= 63
        && tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadTag(tag.to_owned()))
    }
}

/// Parses `512M`, `2G`, `64k`, `1048576` (binary units; an optional `B`/`iB` suffix).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, mult) = match t.char_indices().last()? {
        (i, 'k' | 'K') => (&t[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&t[..i], 1 << 20),
        (i, 'g' | 'G') => (&t[..i], 1 << 30),
        (i, 't' | 'T') => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

const MOUNTED_BY_SHUTTLE: &[&str] = &["/proc", "/dev", "/sys", "/tmp"];

fn validate_hide(path: &Path) -> Result<PathBuf, ConfigError> {
    let bad = || ConfigError::BadHide(path.to_owned());
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(bad());
    }
    let normal: PathBuf = path.components().collect();
    if normal == Path::new("/") || MOUNTED_BY_SHUTTLE.iter().any(|m| normal.starts_with(m)) {
        return Err(bad());
    }
    Ok(normal)
}

impl VmOptions {
    /// Checks every option and produces the configuration to store.
    pub fn validate(&self, now: u64) -> Result<VmConfig, ConfigError> {
        validate_name(&self.name)?;
        let base = match self.base.as_deref() {
            None | Some("host") => Base::Host,
            Some(dir) => {
                let p = PathBuf::from(dir);
                if !p.is_absolute() {
                    return Err(ConfigError::RelativeBase(p));
                }
                let canonical = p
                    .canonicalize()
                    .map_err(|_| ConfigError::MissingBase(p.clone()))?;
                if !canonical.is_dir() {
                    return Err(ConfigError::MissingBase(p));
                }
                Base::Dir(canonical)
            }
        };
        let net = match self.net.as_deref() {
            None | Some("none") => NetMode::None,
            Some("host") => NetMode::Host,
            Some(other) => return Err(ConfigError::BadNet(other.to_owned())),
        };
        let memory_bytes = match &self.memory {
            None => None,
            Some(m) => match parse_size(m) {
                Some(b) if b >= 4 << 20 => Some(b),
                _ => return Err(ConfigError::BadMemory(m.clone())),
            },
        };
        if let Some(p) = self.pids {
            if p < 2 {
                return Err(ConfigError::BadPids(p));
            }
        }
        let mut hide = Vec::new();
        for h in &self.hide {
            let h = validate_hide(h)?;
            if !hide.contains(&h) {
                hide.push(h);
            }
        }
        let mut tags = Vec::new();
        for t in &self.tags {
            validate_tag(t)?;
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
        Ok(VmConfig {
            name: self.name.clone(),
            base,
            net,
            memory_bytes,
            pids: self.pids,
            hide,
            tags,
            created_at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names() {
        for good in ["web", "db-1", "0a", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Web",
            "-x",
            "a_b",
            "a.b",
            "a/b",
            "..",
            &"a".repeat(64),
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("64KiB"), Some(64 << 10));
        assert_eq!(parse_size("1000"), Some(1000));
        for bad in ["", "M", "-1M", "1.5G", "12X", "99999999999999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn validation_reports_the_first_bad_option() {
        let base = |f: &dyn Fn(&mut VmOptions)| {
            let mut o = VmOptions {
                name: "web".into(),
                ..Default::default()
            };
            f(&mut o);
            o.validate(0)
        };
        assert!(base(&|_| {}).is_ok());
        assert_eq!(
            base(&|o| o.net = Some("bridge".into())),
            Err(ConfigError::BadNet("bridge".into()))
        );
        assert!(matches!(
            base(&|o| o.memory = Some("1M".into())),
            Err(ConfigError::BadMemory(_))
        ));
        assert!(matches!(
            base(&|o| o.pids = Some(1)),
            Err(ConfigError::BadPids(1))
        ));
        assert!(matches!(
            base(&|o| o.hide = vec!["/proc/x".into()]),
            Err(ConfigError::BadHide(_))
        ));
        assert!(matches!(
            base(&|o| o.hide = vec!["etc".into()]),
            Err(ConfigError::BadHide(_))
        ));
        assert!(matches!(
            base(&|o| o.hide = vec!["/a/../b".into()]),
            Err(ConfigError::BadHide(_))
        ));
        assert!(matches!(
            base(&|o| o.base = Some("/does/not/exist".into())),
            Err(ConfigError::MissingBase(_))
        ));
        let c = base(&|o| o.hide = vec!["/srv/secret/".into(), "/srv/secret".into()]).unwrap();
        assert_eq!(c.hide, vec![PathBuf::from("/srv/secret")]);
    }
}
