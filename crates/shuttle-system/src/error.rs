//! Manifest errors: every one names `file:line:column` and says how to fix it, in the same
//! form as policy errors (one diagnostic type, [`shuttle_policy::Diagnostic`], for both: a
//! manifest's own `[[rule]]` errors are reported as they are).

pub use shuttle_policy::{LineIndex, Location};

/// One mistake in a manifest.
pub type ManifestError = shuttle_policy::Diagnostic;

/// Every mistake found in a manifest, in source order (or why it could not be read).
pub type ManifestErrors = shuttle_policy::Diagnostics<ManifestError>;
