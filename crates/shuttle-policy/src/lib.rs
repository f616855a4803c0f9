//! Shuttle's policy engine: parse, validate, decide and explain cross-VM interaction rules.
//!
//! Pure: no syscalls and no I/O; the caller hands in the policy text. See the crate's
//! `README.md` for the policy syntax.
//!
//! ```
//! use shuttle_policy::{Action, Op, Policy, Request, VmIdentity};
//!
//! let policy = Policy::parse(
//!     "policy.toml",
//!     r#"
//! [[rule]]
//! name = "web-db"
//! op = "connect"
//! from = "web"
//! to = "db"
//! object = "unix:/run/postgresql/.s.PGSQL.5432"
//! action = "allow"
//! "#,
//! )
//! .expect("valid policy");
//!
//! let web = VmIdentity::vm("web", &[]);
//! let req = Request::new(Op::Connect, web, "unix:/run/postgresql/.s.PGSQL.5432");
//! let decision = policy.decide(&req);
//! assert_eq!(decision.action, Action::Allow);
//! assert_eq!(decision.target().map(ToString::to_string).as_deref(), Some("db"));
//! ```

#![forbid(unsafe_code)]

mod error;
mod explain;
mod glob;
mod object;
mod params;
mod parse;
mod policy;
mod rule;
mod selector;

pub use error::{
    Diagnostic, Diagnostics, ErrorKind, LineIndex, Location, PolicyError, PolicyErrors,
};
pub use explain::{Considered, Explanation, RequestSummary, RuleSummary};
pub use glob::{Glob, GlobError};
pub use object::{check_abs_path, ObjectError, ObjectKind, ObjectPattern, Op};
pub use params::{
    FileAccess, InvokeParams, OpParams, Params, ShareMode, Signal, SignalSet, DEFAULT_ASK_TIMEOUT,
    DEFAULT_INVOKE_ENV,
};
pub use policy::{Decision, Policy};
pub use rule::{Action, Mismatch, Request, Rule};
pub use selector::{is_valid_vm_name, Selector, SelectorSet, Target, VmIdentity};
