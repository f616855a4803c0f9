//! The active policy on disk: `$STATE/policy/active.toml` plus the name of the file it came
//! from (what `policy load` replaces), and named layers in `$STATE/policy/layers/NAME.json`
//! (a system's rules while it is up, added by `up` and removed by `down`), which follow it.
//! Every change is checked against the whole (a layer's rule that the loaded policy makes
//! unreachable is an error) and written atomically (write a temporary file, fsync, rename),
//! so a crash leaves either the old state or the new one, never a mix.

use std::fs;
use std::io::Write;
use std::path::Path;

use shuttle_policy::{Policy, PolicyErrors};
use shuttle_proto::PolicyText;
use shuttle_vm::vm_api::{
    active_policy_parts, layer_file, layer_names, parse_parts, read_active_sources, read_layer,
    read_loaded_policy, PolicyReadError,
};
use shuttle_vm::Layout;

#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    #[error("{0}")]
    Invalid(PolicyErrors),
    #[error(transparent)]
    Read(#[from] PolicyReadError),
    #[error("invalid policy layer name {0:?}: use lower-case letters, digits and '-'")]
    LayerName(String),
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

/// The active policy's sources with the loaded policy replaced by `base` (`None`: kept) and
/// layer `layer` replaced by `parts` (`None`: removed), in the order monitors use. Every
/// source kept must be read whole: one that cannot be is an error naming it, never left out
/// (a layer's deny rules may be all that stops a later layer's allow). The layer being
/// replaced or removed is not read, so a damaged one can still be replaced or removed.
fn with_changes(
    layout: &Layout,
    base: Option<PolicyText>,
    layer: Option<(&str, Option<&[PolicyText]>)>,
) -> Result<Vec<PolicyText>, PolicyStoreError> {
    let mut out = Vec::new();
    match base {
        Some(b) => out.push(b),
        None => out.extend(read_loaded_policy(layout)?),
    }
    let mut names: Vec<String> = layer_names(layout)?;
    if let Some((name, Some(_))) = layer {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
            names.sort();
        }
    }
    for name in names {
        match layer {
            Some((l, Some(parts))) if l == name => out.extend(parts.iter().cloned()),
            Some((l, None)) if l == name => {}
            _ => out.extend(read_layer(layout, &name)?),
        }
    }
    Ok(out)
}

/// Validates `text` with the layers that follow it and makes it the loaded policy. A policy
/// with errors changes nothing. Returns the whole active policy and its sources.
pub fn activate(
    layout: &Layout,
    source: &str,
    text: &str,
) -> Result<(Policy, Vec<PolicyText>), PolicyStoreError> {
    let base = PolicyText {
        source: source.to_owned(),
        text: text.to_owned(),
    };
    let parts = with_changes(layout, Some(base), None)?;
    let policy = parse_parts(&parts).map_err(PolicyStoreError::Invalid)?;
    // Source first: a crash between the two leaves the old policy with a newer name at worst,
    // and the name is only used in messages and for SIGHUP.
    write_atomically(&layout.active_policy_source(), source.as_bytes())?;
    write_atomically(&layout.active_policy(), text.as_bytes())?;
    Ok((policy, parts))
}

/// Adds or replaces layer `name` after checking the whole active policy with it. A layer with
/// errors changes nothing.
pub fn set_layer(
    layout: &Layout,
    name: &str,
    layer: &[PolicyText],
) -> Result<(Policy, Vec<PolicyText>), PolicyStoreError> {
    if !shuttle_policy::is_valid_vm_name(name) {
        return Err(PolicyStoreError::LayerName(name.to_owned()));
    }
    let parts = with_changes(layout, None, Some((name, Some(layer))))?;
    let policy = parse_parts(&parts).map_err(PolicyStoreError::Invalid)?;
    let bytes = serde_json::to_vec_pretty(layer).map_err(|e| PolicyStoreError::Write {
        path: layer_file(layout, name).display().to_string(),
        source: std::io::Error::other(e),
    })?;
    write_atomically(&layer_file(layout, name), &bytes)?;
    Ok((policy, parts))
}

/// Removes layer `name` (nothing to do if there is none). The rest is built and checked
/// first, and a rest that cannot be built (a source damaged on disk) changes nothing: the
/// layer stays, on disk and in every monitor, so the two never disagree. Removing a layer
/// is not always narrowing (its deny rules go too), so monitors must not be left with a
/// partial view either way.
pub fn remove_layer(
    layout: &Layout,
    name: &str,
) -> Result<(Policy, Vec<PolicyText>), PolicyStoreError> {
    if !shuttle_policy::is_valid_vm_name(name) {
        return Err(PolicyStoreError::LayerName(name.to_owned()));
    }
    let parts = with_changes(layout, None, Some((name, None)))?;
    let policy = parse_parts(&parts).map_err(PolicyStoreError::Invalid)?;
    let file = layer_file(layout, name);
    match fs::remove_file(&file) {
        Ok(()) => {
            let _ = fs::File::open(layout.policy_layers_dir()).and_then(|d| d.sync_all());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PolicyStoreError::Write {
                path: file.display().to_string(),
                source,
            })
        }
    }
    Ok((policy, parts))
}

/// The active policy's sources as monitors read them, all or none.
pub fn active_parts(layout: &Layout) -> Result<Vec<PolicyText>, PolicyStoreError> {
    Ok(active_policy_parts(layout)?)
}

/// Most conflicts [`layer_conflicts`] describes one by one.
const MAX_CONFLICTS: usize = 20;

/// Warnings about rules of different layers that may match the same requests with different
/// actions. Layers apply in the order of their names, which says nothing about which system
/// should win; so whenever that order decides between an allow and a deny (or an ask), say
/// so, naming both rules. The loaded policy comes before every layer, by design, and is not
/// compared.
pub fn layer_conflicts(layout: &Layout) -> Result<Vec<String>, PolicyStoreError> {
    let sources = read_active_sources(layout)?;
    let policy = parse_parts(&sources.parts()).map_err(PolicyStoreError::Invalid)?;
    // The layer of each rule, by position: each source parses on its own to as many rules
    // as it has in the whole (it parsed in the whole).
    let mut layer_at = Vec::with_capacity(policy.len());
    if let Some(loaded) = &sources.loaded {
        let n = parse_parts(std::slice::from_ref(loaded)).map_or(0, |p| p.len());
        layer_at.extend(std::iter::repeat_n(None, n));
    }
    for (i, (_, parts)) in sources.layers.iter().enumerate() {
        for part in parts {
            let n = parse_parts(std::slice::from_ref(part)).map_or(0, |p| p.len());
            layer_at.extend(std::iter::repeat_n(Some(i), n));
        }
    }
    if layer_at.len() != policy.len() {
        // Cannot happen (see above); say nothing rather than something wrong.
        tracing::error!("counting the rules of each policy layer went wrong");
        return Ok(Vec::new());
    }
    let layer = |r: &shuttle_policy::Rule| layer_at[r.position()];
    let name = |r: &shuttle_policy::Rule| layer(r).map_or("", |i| sources.layers[i].0.as_str());
    let describe = |r: &shuttle_policy::Rule| {
        let loc = r.location();
        format!(
            "system {}'s {} at {}:{}:{} ({})",
            name(r),
            r.label(),
            r.source(),
            loc.line,
            loc.column,
            r.action().as_str()
        )
    };
    let conflicts = policy.conflicts_between_groups(layer);
    let mut out: Vec<String> = conflicts
        .iter()
        .take(MAX_CONFLICTS)
        .map(|(earlier, later)| {
            format!(
                "{} and {} may match the same requests: for those, system {}'s rule decides \
                 (systems' rules apply in the order of the systems' names) and the other never \
                 applies; decide those requests in the loaded policy (it comes before every \
                 system's rules) or narrow one of the two rules",
                describe(earlier),
                describe(later),
                name(earlier)
            )
        })
        .collect();
    if conflicts.len() > MAX_CONFLICTS {
        out.push(format!(
            "and {} more such pair(s) of rules",
            conflicts.len() - MAX_CONFLICTS
        ));
    }
    Ok(out)
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

    fn text(source: &str, text: &str) -> PolicyText {
        PolicyText {
            source: source.into(),
            text: text.into(),
        }
    }

    #[test]
    fn layers_follow_the_loaded_policy_and_go_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        activate(&layout, "base.toml", GOOD).unwrap();
        let sys = GOOD.replace("from = \"a\"", "from = \"c\"");
        let (p, parts) = set_layer(&layout, "shop", &[text("shop.toml", &sys)]).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(parts, active_parts(&layout).unwrap());
        assert_eq!(p.rules()[1].source(), "shop.toml");
        // Loading another policy keeps the layer; a layer the loaded policy shadows is refused.
        let (p, _) = activate(&layout, "other.toml", &GOOD.replace("sleep", "true")).unwrap();
        assert_eq!(p.len(), 2);
        let err = set_layer(
            &layout,
            "dup",
            &[text("dup.toml", GOOD.replace("sleep", "true").as_str())],
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("dup.toml:1:1: error: rule #1 can never match"),
            "{err}"
        );
        assert!(!layout.policy_layers_dir().join("dup.json").exists());
        // And a loaded policy that would shadow a layer's rule is refused too.
        let err = activate(&layout, "b.toml", &sys).unwrap_err();
        assert!(err.to_string().contains("shop.toml:1:1"), "{err}");
        let (p, parts) = remove_layer(&layout, "shop").unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(parts[0].source, "other.toml");
        assert!(set_layer(&layout, "../x", &[]).is_err());
    }

    #[test]
    fn a_damaged_layer_refuses_every_change_but_its_own_removal() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        activate(&layout, "base.toml", GOOD).unwrap();
        let deny = GOOD
            .replace("from = \"a\"", "from = \"c\"")
            .replace("allow", "deny");
        set_layer(&layout, "guard", &[text("guard.toml", &deny)]).unwrap();
        let damaged = layout.policy_layers_dir().join("guard.json");
        fs::write(&damaged, b"{ damaged").unwrap();
        // Without guard's deny, this allow would decide c's requests: refused, not partial.
        let allow = GOOD.replace("from = \"a\"", "from = \"@any\"");
        let err = set_layer(&layout, "shop", &[text("shop.toml", &allow)]).unwrap_err();
        assert!(matches!(err, PolicyStoreError::Read(_)), "{err:?}");
        assert!(err.to_string().contains("guard.json"), "{err}");
        assert!(!layer_file(&layout, "shop").exists());
        let err = activate(&layout, "other.toml", &allow).unwrap_err();
        assert!(err.to_string().contains("guard.json"), "{err}");
        assert_eq!(active_source(&layout).as_deref(), Some("base.toml"));
        assert!(active_parts(&layout).is_err());
        // The damaged layer itself can still be replaced or removed.
        set_layer(&layout, "guard", &[text("guard.toml", &deny)]).unwrap();
        fs::write(&damaged, b"{ damaged").unwrap();
        let (p, _) = remove_layer(&layout, "guard").unwrap();
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn removing_a_layer_from_a_policy_that_cannot_be_built_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        activate(&layout, "base.toml", GOOD).unwrap();
        let sys = GOOD.replace("from = \"a\"", "from = \"c\"");
        set_layer(&layout, "shop", &[text("shop.toml", &sys)]).unwrap();
        // The loaded policy damaged on disk: the rest cannot be built.
        fs::write(layout.active_policy(), "[[rule]]\nop = \"fly\"\n").unwrap();
        let err = remove_layer(&layout, "shop").unwrap_err();
        assert!(matches!(err, PolicyStoreError::Invalid(_)), "{err:?}");
        assert!(layer_file(&layout, "shop").exists(), "the layer must stay");
        // Another damaged layer: the same.
        activate(&layout, "base.toml", GOOD).unwrap();
        fs::write(layout.policy_layers_dir().join("zz.json"), b"[").unwrap();
        let err = remove_layer(&layout, "shop").unwrap_err();
        assert!(err.to_string().contains("zz.json"), "{err}");
        assert!(layer_file(&layout, "shop").exists(), "the layer must stay");
    }

    #[test]
    fn rules_of_different_layers_that_overlap_with_different_actions_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::under(tmp.path());
        // The loaded policy is not compared: it comes first by design.
        activate(
            &layout,
            "base.toml",
            &GOOD
                .replace("from = \"a\"", "from = \"@any\"")
                .replace("\"b\"", "\"z\""),
        )
        .unwrap();
        let allow = GOOD.replace("from = \"a\"", "from = \"web\"");
        let deny = GOOD
            .replace("from = \"a\"", "from = \"@any\"")
            .replace("allow", "deny");
        set_layer(&layout, "alpha", &[text("alpha.toml", &allow)]).unwrap();
        assert!(layer_conflicts(&layout).unwrap().is_empty());
        set_layer(&layout, "beta", &[text("beta.toml", &deny)]).unwrap();
        let warnings = layer_conflicts(&layout).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with(
                "system alpha's rule #1 at alpha.toml:1:1 (allow) and system beta's rule #1 at \
                 beta.toml:1:1 (deny) may match the same requests: for those, system alpha's \
                 rule decides"
            ),
            "{}",
            warnings[0]
        );
        remove_layer(&layout, "alpha").unwrap();
        assert!(layer_conflicts(&layout).unwrap().is_empty());
    }
}
