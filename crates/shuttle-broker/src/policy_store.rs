//! The active policy on disk: `$STATE/policy/active.toml` plus the name of the file it came
//! from. Replaced atomically (write a temporary file, fsync, rename), so a crash leaves either
//! the old policy or the new one, never a mix.

use std::fs;
use std::io::Write;
use std::path::Path;

use shuttle_policy::{Policy, PolicyErrors};
use shuttle_vm::Layout;

#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    #[error("{0}")]
    Invalid(PolicyErrors),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), PolicyStoreError> {
    let err = |source| PolicyStoreError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(err)?;
    // Unique per call: the broker loads policies on several threads of one process.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Validates `text` and makes it the active policy. A policy with errors changes nothing.
pub fn activate(layout: &Layout, source: &str, text: &str) -> Result<Policy, PolicyStoreError> {
    let policy = Policy::parse(source, text).map_err(PolicyStoreError::Invalid)?;
    // Source first: a crash between the two leaves the old policy with a newer name at worst,
    // and the name is only used in messages and for SIGHUP.
    write_atomically(&layout.active_policy_source(), source.as_bytes())?;
    write_atomically(&layout.active_policy(), text.as_bytes())?;
    Ok(policy)
}

/// The file the active policy was loaded from, if any.
pub fn active_source(layout: &Layout) -> Option<String> {
    fs::read_to_string(layout.active_policy_source())
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = "[[rule]]\nop = \"signal\"\nfrom = \"a\"\nto = \"b\"\nobject = \"sleep\"\naction = \"allow\"\n";

    #[test]
    fn a_bad_policy_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        activate(&layout, "good.toml", GOOD).unwrap();
        let err = activate(&layout, "bad.toml", "[[rule]]\nop = \"fly\"\n").unwrap_err();
        assert!(err.to_string().contains("bad.toml:2:"), "{err}");
        assert_eq!(fs::read_to_string(layout.active_policy()).unwrap(), GOOD);
        assert_eq!(active_source(&layout).as_deref(), Some("good.toml"));
    }
}
