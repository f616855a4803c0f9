//! `from`/`to` selectors and the identities they match.

use std::fmt;

use serde::Serialize;

use crate::glob::{is_glob, Glob};

/// Who takes part in an interaction: a VM (with its tags) or the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmIdentity<'a> {
    /// A host process (not inside any VM).
    Host,
    /// A process inside the VM `name`.
    Vm {
        /// The VM's name.
        name: &'a str,
        /// The VM's tags, as matched by `@tag:NAME`.
        tags: &'a [String],
    },
}

impl<'a> VmIdentity<'a> {
    /// A VM identity.
    pub fn vm(name: &'a str, tags: &'a [String]) -> Self {
        VmIdentity::Vm { name, tags }
    }

    /// The VM name, or `None` for the host.
    pub fn name(&self) -> Option<&'a str> {
        match self {
            VmIdentity::Host => None,
            VmIdentity::Vm { name, .. } => Some(name),
        }
    }
}

impl fmt::Display for VmIdentity<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmIdentity::Host => f.write_str("@host"),
            VmIdentity::Vm { name, .. } => f.write_str(name),
        }
    }
}

/// Whether `name` is a valid VM name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn is_valid_vm_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// One selector: which VMs (or the host) a rule's `from` or `to` matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Exactly the VM with this name.
    Vm(Box<str>),
    /// Every VM whose name matches the glob.
    Glob(Glob),
    /// Every VM carrying this tag (`@tag:NAME`).
    Tag(Box<str>),
    /// The host (`@host`).
    Host,
    /// Every VM and the host (`@any`).
    Any,
}

/// Why a selector could not be parsed: (message, hint).
pub(crate) type SelectorError = (String, String);

const SELECTOR_HINT: &str = "a selector is a VM name (a-z, 0-9 and '-', at most 63 characters, \
not starting with '-'), a glob over VM names such as `web-*`, `@tag:NAME`, `@host` or `@any`";

impl Selector {
    /// Parses one selector.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if let Some(rest) = text.strip_prefix('@') {
            return match rest {
                "host" => Ok(Selector::Host),
                "any" => Ok(Selector::Any),
                _ => match rest.strip_prefix("tag:") {
                    Some(tag) if is_valid_vm_name(tag) => Ok(Selector::Tag(tag.into())),
                    Some(tag) => Err((
                        format!("invalid tag name `{tag}` in selector `{text}`"),
                        "tag names are 1-63 characters of a-z, 0-9 and '-', \
                         not starting with '-'"
                            .into(),
                    )),
                    None => Err((
                        format!("unknown selector `{text}`"),
                        "the special selectors are `@host`, `@any` and `@tag:NAME`".into(),
                    )),
                },
            };
        }
        if is_glob(text) {
            let allowed =
                |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-*?[]!".contains(c);
            if let Some(bad) = text.chars().find(|&c| !allowed(c)) {
                return Err((
                    format!("invalid character `{bad}` in VM name pattern `{text}`"),
                    SELECTOR_HINT.into(),
                ));
            }
            return Glob::new(text)
                .map(Selector::Glob)
                .map_err(|e| (e.to_string(), SELECTOR_HINT.into()));
        }
        if is_valid_vm_name(text) {
            Ok(Selector::Vm(text.into()))
        } else if text.is_empty() {
            Err(("empty selector".into(), SELECTOR_HINT.into()))
        } else {
            Err((format!("invalid VM name `{text}`"), SELECTOR_HINT.into()))
        }
    }

    /// Whether this selector matches `id`. Never allocates.
    pub fn matches(&self, id: &VmIdentity<'_>) -> bool {
        match (self, id) {
            (Selector::Any, _) => true,
            (Selector::Host, VmIdentity::Host) => true,
            (Selector::Vm(n), VmIdentity::Vm { name, .. }) => **n == **name,
            (Selector::Glob(g), VmIdentity::Vm { name, .. }) => g.matches(name),
            (Selector::Tag(t), VmIdentity::Vm { tags, .. }) => tags.iter().any(|x| **x == **t),
            _ => false,
        }
    }

    /// Whether some VM (or the host) may be matched by both selectors (conservative: `false`
    /// only when certain; tags are not known here, so a tag may match any VM).
    pub(crate) fn may_overlap(&self, other: &Selector) -> bool {
        match (self, other) {
            (Selector::Any, _) | (_, Selector::Any) => true,
            (Selector::Host, Selector::Host) => true,
            (Selector::Host, _) | (_, Selector::Host) => false,
            (Selector::Vm(a), Selector::Vm(b)) => a == b,
            (Selector::Glob(g), Selector::Vm(n)) | (Selector::Vm(n), Selector::Glob(g)) => {
                g.matches(n)
            }
            (Selector::Glob(g), Selector::Glob(h)) => g.may_overlap(h),
            (Selector::Tag(_), _) | (_, Selector::Tag(_)) => true,
        }
    }

    /// Whether everything `other` matches is certainly matched by `self` (conservative).
    pub(crate) fn covers(&self, other: &Selector) -> bool {
        match (self, other) {
            (Selector::Any, _) => true,
            (Selector::Host, Selector::Host) => true,
            (Selector::Vm(a), Selector::Vm(b)) => a == b,
            (Selector::Tag(a), Selector::Tag(b)) => a == b,
            (Selector::Glob(g), Selector::Vm(n)) => g.matches(n),
            (Selector::Glob(g), Selector::Glob(h)) => g.covers(h),
            _ => false,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Vm(n) => f.write_str(n),
            Selector::Glob(g) => write!(f, "{g}"),
            Selector::Tag(t) => write!(f, "@tag:{t}"),
            Selector::Host => f.write_str("@host"),
            Selector::Any => f.write_str("@any"),
        }
    }
}

impl Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A non-empty list of selectors; matches when any of them does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SelectorSet(pub(crate) Vec<Selector>);

impl SelectorSet {
    /// The selectors, in the order written.
    pub fn selectors(&self) -> &[Selector] {
        &self.0
    }

    /// Whether any selector matches `id`. Never allocates.
    pub fn matches(&self, id: &VmIdentity<'_>) -> bool {
        self.0.iter().any(|s| s.matches(id))
    }

    /// Whether some VM (or the host) may be matched by both sets (conservative).
    pub(crate) fn may_overlap(&self, other: &SelectorSet) -> bool {
        self.0
            .iter()
            .any(|s| other.0.iter().any(|o| s.may_overlap(o)))
    }

    /// Whether everything `other` matches is certainly matched by `self` (conservative).
    pub(crate) fn covers(&self, other: &SelectorSet) -> bool {
        other.0.iter().all(|o| self.0.iter().any(|s| s.covers(o)))
    }

    /// The single concrete target this set names: one VM name or the host.
    pub(crate) fn single_target(&self) -> Option<Target> {
        match self.0.as_slice() {
            [Selector::Vm(n)] => Some(Target::Vm(n.clone())),
            [Selector::Host] => Some(Target::Host),
            _ => None,
        }
    }
}

impl fmt::Display for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                f.write_str("[")?;
                for (i, s) in many.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{s}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// The one place an interaction is routed to: a VM or the host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// The host.
    Host,
    /// The VM with this name.
    Vm(Box<str>),
}

impl Target {
    /// The VM name, or `None` for the host.
    pub fn vm_name(&self) -> Option<&str> {
        match self {
            Target::Host => None,
            Target::Vm(n) => Some(n),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host => f.write_str("@host"),
            Target::Vm(n) => f.write_str(n),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap()
    }

    #[test]
    fn parse_and_match() {
        let tags = vec!["db".to_string()];
        let web1 = VmIdentity::vm("web-1", &[]);
        let pg = VmIdentity::vm("pg", &tags);
        assert!(sel("web-1").matches(&web1));
        assert!(!sel("web-1").matches(&pg));
        assert!(sel("web-*").matches(&web1));
        assert!(sel("@tag:db").matches(&pg));
        assert!(!sel("@tag:db").matches(&web1));
        assert!(sel("@host").matches(&VmIdentity::Host));
        assert!(!sel("@host").matches(&web1));
        assert!(sel("@any").matches(&VmIdentity::Host));
        assert!(sel("@any").matches(&pg));
        assert!(!sel("web-*").matches(&VmIdentity::Host));
    }

    #[test]
    fn bad_selectors() {
        assert!(Selector::parse("Web").is_err());
        assert!(Selector::parse("-web").is_err());
        assert!(Selector::parse("@hosts").is_err());
        assert!(Selector::parse("@tag:").is_err());
        assert!(Selector::parse("").is_err());
        assert!(Selector::parse("web_*").is_err());
        assert!(Selector::parse(&"a".repeat(64)).is_err());
        assert!(Selector::parse(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn covers() {
        assert!(sel("@any").covers(&sel("@host")));
        assert!(sel("web-*").covers(&sel("web-1")));
        assert!(!sel("web-1").covers(&sel("web-*")));
        assert!(!sel("@tag:x").covers(&sel("web")));
        assert!(!sel("web-*").covers(&sel("@tag:web")));
    }
}
