//! The compiled policy: per-op indexes for allocation-free decisions.

use std::collections::HashMap;

use serde::Serialize;

use crate::error::{ErrorKind, PolicyError, PolicyErrors};
use crate::object::Op;
use crate::parse::parse_rules;
use crate::rule::{Action, Request, Rule};
use crate::selector::Target;

/// Candidate rules of one op, found by object.
#[derive(Debug, Default)]
struct OpIndex {
    /// Literal object → rule indices, ascending.
    exact: HashMap<Box<str>, Vec<u32>>,
    /// Literal prefix of a glob object → rule indices, ascending.
    glob_by_prefix: HashMap<Box<str>, Vec<u32>>,
    /// Distinct byte lengths of the keys of `glob_by_prefix`, ascending.
    prefix_lens: Vec<usize>,
}

impl OpIndex {
    fn insert(&mut self, index: u32, rule: &Rule) {
        match rule.object.glob() {
            None => self
                .exact
                .entry(rule.object.as_str().into())
                .or_default()
                .push(index),
            Some(g) => {
                let prefix = g.literal_prefix();
                if let Err(at) = self.prefix_lens.binary_search(&prefix.len()) {
                    self.prefix_lens.insert(at, prefix.len());
                }
                self.glob_by_prefix
                    .entry(prefix.into())
                    .or_default()
                    .push(index);
            }
        }
    }

    /// Calls `f` with every candidate list for `key`: the rules whose object may match it
    /// (`exact` adds the literal-object rules). Each list is in ascending rule order.
    #[inline]
    fn for_each_list<'s>(&'s self, key: &str, exact: bool, mut f: impl FnMut(&'s [u32])) {
        if exact {
            if let Some(list) = self.exact.get(key) {
                f(list);
            }
        }
        for &len in &self.prefix_lens {
            if len > key.len() {
                break;
            }
            if let Some(list) = key.get(..len).and_then(|p| self.glob_by_prefix.get(p)) {
                f(list);
            }
        }
    }

    /// The lowest rule index among candidates for `object` satisfying `pred`. Never allocates.
    #[inline]
    fn first(&self, object: &str, mut pred: impl FnMut(u32) -> bool) -> Option<u32> {
        let mut best: Option<u32> = None;
        self.for_each_list(object, true, |list| {
            for &i in list {
                if best.is_some_and(|b| i >= b) {
                    break;
                }
                if pred(i) {
                    best = Some(i);
                    break;
                }
            }
        });
        best
    }
}

/// A validated, compiled policy.
#[derive(Debug)]
pub struct Policy {
    source_name: String,
    rules: Vec<Rule>,
    index: [OpIndex; 7],
}

/// The outcome of a decision. Borrowed from the policy; never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Decision<'p> {
    /// What to do.
    pub action: Action,
    /// The deciding rule; `None` means no rule matched and the default (deny) applies.
    pub rule: Option<&'p Rule>,
}

impl<'p> Decision<'p> {
    /// The decision when no rule matches.
    pub const DEFAULT: Decision<'static> = Decision {
        action: Action::Deny,
        rule: None,
    };

    /// Whether no rule matched (default deny).
    pub fn is_default(&self) -> bool {
        self.rule.is_none()
    }

    /// Whether the interaction may go ahead without asking anyone.
    pub fn is_allowed(&self) -> bool {
        self.action == Action::Allow
    }

    /// For ops that route: where the deciding rule sends the interaction.
    pub fn target(&self) -> Option<&'p Target> {
        self.rule.and_then(Rule::target)
    }
}

impl Policy {
    /// A policy without rules: everything is denied by default.
    pub fn empty(source_name: &str) -> Policy {
        Policy {
            source_name: source_name.to_string(),
            rules: Vec::new(),
            index: Default::default(),
        }
    }

    /// Parses and validates a policy. `source_name` is used in error messages (usually the
    /// file path). Returns every error found, in source order.
    pub fn parse(source_name: &str, text: &str) -> Result<Policy, PolicyErrors> {
        Policy::parse_layered(&[(source_name, text)])
    }

    /// Parses a policy made of several sources, `(source name, text)`, in order: the rules
    /// of the first come first (first match wins across all of them). Each source is
    /// validated as a file of its own (errors name it, rule names are unique within it), and
    /// a rule that an earlier one, in the same source or an earlier one, makes unreachable is
    /// an error at the later rule. Errors come grouped by source, in source order.
    pub fn parse_layered(sources: &[(&str, &str)]) -> Result<Policy, PolicyErrors> {
        let name = match sources {
            [] => "(no policy)".to_owned(),
            [(one, _)] => (*one).to_owned(),
            many => many.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" + "),
        };
        let mut policy = Policy::empty(&name);
        let mut all = Vec::new();
        for (source, text) in sources {
            let (rules, mut errors) = parse_rules(source, text);
            for rule in rules {
                if let Some(e) = policy.shadowed_by(&rule) {
                    errors.push(e);
                }
                policy.push(rule);
            }
            errors.sort_by_key(|e| e.location);
            all.extend(errors);
        }
        if all.is_empty() {
            Ok(policy)
        } else {
            Err(crate::Diagnostics(all))
        }
    }

    fn push(&mut self, mut rule: Rule) {
        rule.position = self.rules.len();
        let index = u32::try_from(self.rules.len()).expect("fewer than 2^32 rules");
        self.index[rule.op.index()].insert(index, &rule);
        self.rules.push(rule);
    }

    /// If an earlier rule certainly matches every request `rule` could, the error saying so.
    fn shadowed_by(&self, rule: &Rule) -> Option<PolicyError> {
        let idx = &self.index[rule.op.index()];
        let key = match rule.object.glob() {
            Some(g) => g.literal_prefix(),
            None => rule.object.as_str(),
        };
        let mut best: Option<u32> = None;
        idx.for_each_list(key, !rule.object.is_glob(), |list| {
            for &j in list {
                if best.is_some_and(|b| j >= b) {
                    break;
                }
                let earlier = &self.rules[j as usize];
                if rule.covered_ignoring_to(earlier)
                    && (rule.op.routes_to_target() || earlier.to.covers(&rule.to))
                {
                    best = Some(j);
                    break;
                }
            }
        });
        let earlier = &self.rules[best? as usize];
        let (message, hint) = if earlier.to.covers(&rule.to) {
            (
                format!(
                    "{} can never match: {} at {}:{} comes first and matches every request \
                     it would",
                    rule.label(),
                    earlier.label(),
                    earlier.source,
                    earlier.location
                ),
                format!(
                    "first match wins: remove this rule, or move it above {}",
                    earlier.label()
                ),
            )
        } else {
            (
                format!(
                    "{} can never match: {} at {}:{} comes first and already routes every {} \
                     request it would to `{}`",
                    rule.label(),
                    earlier.label(),
                    earlier.source,
                    earlier.location,
                    rule.op,
                    earlier.to
                ),
                "an object is served by one VM for a given caller: remove one of the two \
                 rules, or narrow `from` or `object`"
                    .to_string(),
            )
        };
        Some(PolicyError {
            kind: ErrorKind::Shadowed,
            file: rule.source.to_string(),
            location: rule.location,
            message,
            hint,
        })
    }

    /// Pairs of rules `(earlier, later)` from different groups that may match a common
    /// request with different actions: for such requests the earlier decides and the later
    /// never applies. `group_of` gives a rule's group (`None`: left out of the comparison),
    /// e.g. the layer it came from. Conservative: a pair is reported unless it certainly
    /// cannot overlap.
    pub fn conflicts_between_groups(
        &self,
        group_of: impl Fn(&Rule) -> Option<usize>,
    ) -> Vec<(&Rule, &Rule)> {
        let grouped: Vec<(usize, &Rule)> = self
            .rules
            .iter()
            .filter_map(|r| group_of(r).map(|g| (g, r)))
            .collect();
        let mut out = Vec::new();
        for (i, (g, earlier)) in grouped.iter().enumerate() {
            for (h, later) in &grouped[i + 1..] {
                if g != h && earlier.action != later.action && earlier.may_overlap(later) {
                    out.push((*earlier, *later));
                }
            }
        }
        out
    }

    /// The source name given to [`Policy::parse`] (the sources joined with ` + ` for
    /// [`Policy::parse_layered`]); each rule knows its own ([`Rule::source`]).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the policy has no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides `req`: the first matching rule wins; no match is a default deny.
    ///
    /// With `req.to == None` this routes: see [`Request`]. Never allocates.
    pub fn decide<'p>(&'p self, req: &Request<'_>) -> Decision<'p> {
        let rules = &self.rules;
        let found = self.index[req.op.index()].first(req.object, |i| {
            rules
                .get(i as usize)
                .is_some_and(|r| r.matches_same_op(req))
        });
        match found.and_then(|i| rules.get(i as usize)) {
            Some(rule) => Decision {
                action: rule.action,
                rule: Some(rule),
            },
            None => Decision::DEFAULT,
        }
    }

    /// Finds where `req` goes: the deciding rule (ignoring `req.to`) and its target, or `None`
    /// when no rule matches, in which case the interaction stays inside the caller's VM.
    pub fn route<'p>(&'p self, req: &Request<'_>) -> Option<(Decision<'p>, Option<&'p Target>)> {
        let req = Request { to: None, ..*req };
        let d = self.decide(&req);
        d.rule.map(|r| (d, r.target()))
    }

    /// Whether some rule publishes `object` of `op` across VMs, i.e. a non-deny rule matches
    /// it for some caller. Attempts on published objects by callers no rule allows are audited
    /// as denials; others are ordinary intra-VM traffic. Never allocates.
    pub fn publishes(&self, op: Op, object: &str) -> bool {
        let rules = &self.rules;
        self.index[op.index()]
            .first(object, |i| {
                rules
                    .get(i as usize)
                    .is_some_and(|r| r.action != Action::Deny && r.object.matches(object))
            })
            .is_some()
    }

    /// The reference evaluation: a linear scan in rule order. Slow; for tests and explain.
    pub fn decide_linear<'p>(&'p self, req: &Request<'_>) -> Decision<'p> {
        match self.rules.iter().find(|r| r.matches(req)) {
            Some(rule) => Decision {
                action: rule.action,
                rule: Some(rule),
            },
            None => Decision::DEFAULT,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::VmIdentity;

    const BASE: &str = "[[rule]]\nop = \"connect\"\nfrom = \"a\"\nto = \"b\"\nobject = \"tcp:80\"\naction = \"allow\"\n";
    const SYSTEM: &str = "\n[[rule]]\nname = \"c-b\"\nop = \"connect\"\nfrom = \"c\"\nto = \"b\"\nobject = \"tcp:80\"\naction = \"allow\"\n";

    #[test]
    fn layers_keep_their_own_sources_and_order() {
        let p = Policy::parse_layered(&[("base.toml", BASE), ("system.toml", SYSTEM)]).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p.source_name(), "base.toml + system.toml");
        let r = &p.rules()[1];
        assert_eq!(
            (r.source(), r.number(), r.position()),
            ("system.toml", 1, 1)
        );
        assert_eq!(r.location(), crate::Location { line: 2, column: 1 });
        let c = VmIdentity::vm("c", &[]);
        let d = p.decide(&Request::new(Op::Connect, c, "tcp:80"));
        assert_eq!(d.rule.map(Rule::source), Some("system.toml"));
        let e = p.explain(&Request::new(Op::Connect, c, "tcp:80"));
        assert_eq!(e.considered.len(), 1, "{e:#?}");
        assert_eq!(e.decided_by.unwrap().file, "system.toml");
    }

    #[test]
    fn a_rule_an_earlier_layer_makes_unreachable_is_an_error_at_it() {
        let e = Policy::parse_layered(&[("base.toml", BASE), ("system.toml", BASE)]).unwrap_err();
        assert_eq!(e.len(), 1, "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with(
                "system.toml:1:1: error: rule #1 can never match: rule #1 at base.toml:1:1"
            ),
            "{text}"
        );
        // Names are a file's own: the same name in two layers is fine.
        let named = SYSTEM.replace("from = \"c\"", "from = \"d\"");
        assert!(Policy::parse_layered(&[("one.toml", SYSTEM), ("two.toml", &named)]).is_ok());
    }

    #[test]
    fn conflicts_between_groups_are_overlaps_with_different_actions() {
        let rule = |from: &str, object: &str, action: &str| {
            format!("[[rule]]\nop = \"connect\"\nfrom = \"{from}\"\nto = \"b\"\nobject = \"{object}\"\naction = \"{action}\"\n")
        };
        let a = rule("web-1", "tcp:80", "allow");
        let b = rule("web-*", "tcp:80", "deny") + &rule("@tag:x", "tcp:443", "deny");
        let c = rule("db", "tcp:80", "deny") + &rule("@host", "tcp:80", "deny");
        let p = Policy::parse_layered(&[("a.toml", &a), ("b.toml", &b), ("c.toml", &c)]).unwrap();
        let group = |r: &Rule| Some(usize::from(r.source().as_bytes()[0]));
        let found: Vec<(String, String)> = p
            .conflicts_between_groups(group)
            .into_iter()
            .map(|(e, l)| {
                (
                    format!("{}:{}", e.source(), e.number()),
                    format!("{}:{}", l.source(), l.number()),
                )
            })
            .collect();
        // web-1 and web-* meet on tcp:80; db and @host never meet them; tcp:443 is another object.
        assert_eq!(found, [("a.toml:1".to_owned(), "b.toml:1".to_owned())]);
        // Rules of one group are never compared.
        assert!(p.conflicts_between_groups(|_| Some(0)).is_empty());
        assert!(p.conflicts_between_groups(|_| None).is_empty());
    }
}
