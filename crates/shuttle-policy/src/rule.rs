//! A validated rule and the requests it is matched against.

use std::fmt;

use serde::Serialize;

use crate::error::Location;
use crate::object::{ObjectPattern, Op};
use crate::params::{Params, Signal};
use crate::selector::{SelectorSet, Target, VmIdentity};

/// What a rule does with the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Perform the interaction.
    Allow,
    /// Refuse it (and audit the refusal).
    Deny,
    /// Hold it until someone answers with the CLI; deny on timeout.
    Ask,
}

impl Action {
    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Ask => "ask",
        }
    }

    pub(crate) fn from_name(s: &str) -> Option<Action> {
        match s {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            "ask" => Some(Action::Ask),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One interaction to decide.
///
/// `to` is `None` when the caller does not know the peer up front (a `connect` names only an
/// address): the first rule whose op, `from` and object match decides, and for ops that route
/// to a target ([`Op::routes_to_target`]) that rule's `to` is where the interaction goes. With
/// `to` given, the first rule whose op, `from`, `to` and object all match decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The operation.
    pub op: Op,
    /// Who asks.
    pub from: VmIdentity<'a>,
    /// The peer, when known.
    pub to: Option<VmIdentity<'a>>,
    /// The object in canonical form, e.g. `unix:/run/postgresql/.s.PGSQL.5432`.
    pub object: &'a str,
    /// For `signal`: which signal is sent.
    pub signal: Option<Signal>,
}

impl<'a> Request<'a> {
    /// A request whose peer is found by routing.
    pub fn new(op: Op, from: VmIdentity<'a>, object: &'a str) -> Self {
        Request {
            op,
            from,
            to: None,
            object,
            signal: None,
        }
    }

    /// Sets the peer.
    pub fn to(mut self, to: VmIdentity<'a>) -> Self {
        self.to = Some(to);
        self
    }

    /// Sets the signal (for `signal` requests).
    pub fn signal(mut self, signal: Signal) -> Self {
        self.signal = Some(signal);
        self
    }
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// 1-based position among its own file's rules (what `rule #N` says).
    pub(crate) number: usize,
    /// 0-based position in the whole policy (all its sources), set when it is added.
    #[serde(skip)]
    pub(crate) position: usize,
    /// The source (file) the rule was written in: a policy may be made of several.
    #[serde(skip)]
    pub(crate) source: Box<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<Box<str>>,
    pub(crate) location: Location,
    pub(crate) op: Op,
    pub(crate) from: SelectorSet,
    pub(crate) to: SelectorSet,
    #[serde(skip)]
    pub(crate) target: Option<Target>,
    pub(crate) object: ObjectPattern,
    pub(crate) action: Action,
    pub(crate) params: Params,
}

/// Why a rule did not match a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Mismatch {
    /// The rule is for another op.
    OpDiffers {
        /// The rule's op.
        rule_op: Op,
    },
    /// The requester is not matched by `from`.
    FromDoesNotMatch {
        /// The rule's `from`.
        selector: String,
    },
    /// The peer is not matched by `to`.
    ToDoesNotMatch {
        /// The rule's `to`.
        selector: String,
    },
    /// The object is not matched.
    ObjectDoesNotMatch {
        /// The rule's object.
        pattern: String,
    },
    /// The signal is not in the rule's `signals`.
    SignalNotListed {
        /// The rule's `signals`.
        signals: Vec<String>,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::OpDiffers { rule_op } => write!(f, "op differs (rule is for {rule_op})"),
            Mismatch::FromDoesNotMatch { selector } => {
                write!(f, "from does not match (rule has from = {selector})")
            }
            Mismatch::ToDoesNotMatch { selector } => {
                write!(f, "to does not match (rule has to = {selector})")
            }
            Mismatch::ObjectDoesNotMatch { pattern } => {
                write!(f, "object does not match (rule has object = {pattern})")
            }
            Mismatch::SignalNotListed { signals } => {
                write!(
                    f,
                    "signal not listed (rule has signals = {})",
                    signals.join(", ")
                )
            }
        }
    }
}

impl Rule {
    /// 1-based position among the file's rules, as shown to humans (`rule #3`).
    pub fn number(&self) -> usize {
        self.number
    }

    /// The source name (usually the file) the rule was written in.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// 0-based position in the whole policy: first match wins in this order.
    pub fn position(&self) -> usize {
        self.position
    }

    /// The rule's `name`, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Where the rule's table starts.
    pub fn location(&self) -> Location {
        self.location
    }

    /// The op.
    pub fn op(&self) -> Op {
        self.op
    }

    /// The `from` selectors.
    pub fn from(&self) -> &SelectorSet {
        &self.from
    }

    /// The `to` selectors.
    pub fn to(&self) -> &SelectorSet {
        &self.to
    }

    /// For ops that route ([`Op::routes_to_target`]): the one VM (or the host) `to` names.
    pub fn target(&self) -> Option<&Target> {
        self.target.as_ref()
    }

    /// The object pattern.
    pub fn object(&self) -> &ObjectPattern {
        &self.object
    }

    /// The action.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// `rule #N` or `rule #N "name"`, as used in messages.
    pub fn label(&self) -> String {
        label(self.number, self.name.as_deref())
    }

    /// `rule #N at FILE:LINE:COLUMN` (or with its name), as messages and questions name it.
    pub fn label_at(&self) -> String {
        format!(
            "{} at {}:{}:{}",
            self.label(),
            self.source,
            self.location.line,
            self.location.column
        )
    }

    fn signal_ok(&self, signal: Option<Signal>) -> bool {
        match self.params.signals() {
            None => true,
            Some(set) => signal.is_some_and(|s| set.contains(s)),
        }
    }

    /// Whether the rule matches `req` (its op is assumed equal). Never allocates.
    #[inline]
    pub(crate) fn matches_same_op(&self, req: &Request<'_>) -> bool {
        self.from.matches(&req.from)
            && req.to.as_ref().is_none_or(|to| self.to.matches(to))
            && self.object.matches(req.object)
            && self.signal_ok(req.signal)
    }

    /// Whether the rule matches `req`. Never allocates.
    pub fn matches(&self, req: &Request<'_>) -> bool {
        self.op == req.op && self.matches_same_op(req)
    }

    /// Every reason the rule does not match `req` (empty when it matches).
    pub fn mismatches(&self, req: &Request<'_>) -> Vec<Mismatch> {
        let mut why = Vec::new();
        if self.op != req.op {
            why.push(Mismatch::OpDiffers { rule_op: self.op });
            return why;
        }
        if !self.from.matches(&req.from) {
            why.push(Mismatch::FromDoesNotMatch {
                selector: self.from.to_string(),
            });
        }
        if let Some(to) = &req.to {
            if !self.to.matches(to) {
                why.push(Mismatch::ToDoesNotMatch {
                    selector: self.to.to_string(),
                });
            }
        }
        if !self.object.matches(req.object) {
            why.push(Mismatch::ObjectDoesNotMatch {
                pattern: self.object.to_string(),
            });
        }
        if !self.signal_ok(req.signal) {
            why.push(Mismatch::SignalNotListed {
                signals: self
                    .params
                    .signals()
                    .map(|s| s.iter().map(|s| s.name().to_string()).collect())
                    .unwrap_or_default(),
            });
        }
        why
    }

    /// Whether some request may be matched by both rules (conservative: `false` only when
    /// certain). For ops that route, `to` is left out: a routed request names no peer.
    pub fn may_overlap(&self, other: &Rule) -> bool {
        self.op == other.op
            && self.from.may_overlap(&other.from)
            && (self.op.routes_to_target() || self.to.may_overlap(&other.to))
            && self.object.may_overlap(&other.object)
            && match (self.params.signals(), other.params.signals()) {
                (Some(a), Some(b)) => a.iter().any(|s| b.contains(s)),
                _ => true,
            }
    }

    /// Whether every request this rule could match is certainly matched by `earlier` when
    /// routing (ignoring `to`) — i.e. this rule can never decide a routed request.
    pub(crate) fn covered_ignoring_to(&self, earlier: &Rule) -> bool {
        earlier.op == self.op
            && earlier.from.covers(&self.from)
            && earlier.object.covers(&self.object)
            && match (earlier.params.signals(), self.params.signals()) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(e), Some(s)) => e.is_superset(s),
            }
    }
}

pub(crate) fn label(number: usize, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("rule #{number} \"{n}\""),
        None => format!("rule #{number}"),
    }
}
