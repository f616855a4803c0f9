//! Why a request is decided the way it is, for humans and for `--json`.

use std::fmt;

use serde::Serialize;

use crate::object::Op;
use crate::policy::Policy;
use crate::rule::{Action, Mismatch, Request, Rule};

/// The request being explained, as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestSummary {
    /// The op.
    pub op: Op,
    /// Who asks (`@host` for the host).
    pub from: String,
    /// The peer, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The object.
    pub object: String,
    /// The signal, for `signal` requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

/// A rule, as named in an explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleSummary {
    /// 1-based rule number.
    pub number: usize,
    /// The rule's name, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The policy's source name.
    pub file: String,
    /// 1-based line of the rule's table.
    pub line: u32,
    /// 1-based column of the rule's table.
    pub column: u32,
}

impl RuleSummary {
    fn new(rule: &Rule) -> Self {
        RuleSummary {
            number: rule.number(),
            name: rule.name().map(str::to_string),
            file: rule.source().to_string(),
            line: rule.location().line,
            column: rule.location().column,
        }
    }
}

impl fmt::Display for RuleSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {}:{}:{}",
            crate::rule::label(self.number, self.name.as_deref()),
            self.file,
            self.line,
            self.column
        )
    }
}

/// A rule before the deciding one, and why it did not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Considered {
    /// The rule.
    pub rule: RuleSummary,
    /// Every reason it did not match.
    pub reasons: Vec<Mismatch>,
}

/// Which rule decides a request, and why the rules before it did not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The request.
    pub request: RequestSummary,
    /// The decision.
    pub action: Action,
    /// Whether no rule matched (default deny).
    pub default: bool,
    /// The deciding rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<RuleSummary>,
    /// Where the deciding rule routes the interaction (for ops that route).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Every earlier rule, in order, with why it did not match.
    pub considered: Vec<Considered>,
}

impl Policy {
    /// Explains how `req` is decided (see [`Policy::decide`]).
    pub fn explain(&self, req: &Request<'_>) -> Explanation {
        let decision = self.decide(req);
        let upto = decision.rule.map_or(self.rules().len(), Rule::position);
        let considered = self
            .rules()
            .iter()
            .filter(|r| r.position() < upto)
            .map(|r| Considered {
                rule: RuleSummary::new(r),
                reasons: r.mismatches(req),
            })
            .collect();
        Explanation {
            request: RequestSummary {
                op: req.op,
                from: req.from.to_string(),
                to: req.to.map(|t| t.to_string()),
                object: req.object.to_string(),
                signal: req.signal.map(|s| s.name().to_string()),
            },
            action: decision.action,
            default: decision.is_default(),
            decided_by: decision.rule.map(RuleSummary::new),
            target: decision.target().map(ToString::to_string),
            considered,
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.request;
        write!(f, "{} from {}", r.op, r.from)?;
        if let Some(to) = &r.to {
            write!(f, " to {to}")?;
        }
        write!(f, " object {}", r.object)?;
        if let Some(s) = &r.signal {
            write!(f, " signal {s}")?;
        }
        writeln!(f, ": {}", self.action)?;
        match &self.decided_by {
            Some(rule) => writeln!(f, "  decided by {rule}")?,
            None => writeln!(f, "  no rule matched: default deny")?,
        }
        if let Some(t) = &self.target {
            writeln!(f, "  routed to {t}")?;
        }
        if !self.considered.is_empty() {
            writeln!(f, "  rules considered before:")?;
            for c in &self.considered {
                let reasons: Vec<String> = c.reasons.iter().map(ToString::to_string).collect();
                writeln!(f, "    {}: {}", c.rule, reasons.join("; "))?;
            }
        }
        Ok(())
    }
}
