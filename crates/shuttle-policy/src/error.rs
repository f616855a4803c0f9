//! Policy errors: every one names `file:line:column` and says how to fix it.

use std::fmt;

use serde::Serialize;

/// A 1-based position in the policy text (column counted in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Location {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// What kind of mistake a [`PolicyError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The text is not valid TOML.
    Syntax,
    /// A key that the policy format does not know.
    UnknownKey,
    /// A required key is missing.
    MissingKey,
    /// A key holds a value of the wrong TOML type.
    WrongType,
    /// `op` names no known operation.
    UnknownOp,
    /// The object is malformed.
    BadObject,
    /// The object is well formed but not something this op acts on.
    ObjectKindForOp,
    /// A `from`/`to` selector is malformed, or `to` does not name exactly one VM.
    BadSelector,
    /// `action` is not `allow`, `deny` or `ask`.
    BadAction,
    /// An op parameter has a bad value.
    BadParam,
    /// A parameter given to an op that does not take it.
    ParamNotForOp,
    /// Two rules share a name.
    DuplicateName,
    /// `from` and `to` are the same VM.
    IntraVm,
    /// An earlier rule matches every request this rule would.
    Shadowed,
}

/// One mistake in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{file}:{}:{}: error: {message}\n  hint: {hint}", location.line, location.column)]
pub struct PolicyError {
    /// What kind of mistake this is.
    pub kind: ErrorKind,
    /// The source name given to [`crate::Policy::parse`].
    pub file: String,
    /// Where the offending key or value starts.
    pub location: Location,
    /// What is wrong (lower-case, no trailing period).
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

/// All the mistakes found in a policy file, in source order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    /// The individual errors, in source order.
    pub fn errors(&self) -> &[PolicyError] {
        &self.0
    }

    /// How many errors were found.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no error was found (never the case for a returned `Err`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl IntoIterator for PolicyErrors {
    type Item = PolicyError;
    type IntoIter = std::vec::IntoIter<PolicyError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Maps byte offsets in the source to line/column locations.
#[derive(Debug)]
pub(crate) struct LineIndex<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, line_starts }
    }

    pub(crate) fn location(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        // Offsets from the parser are on char boundaries; be lenient if one is not.
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        Location {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
        }
    }
}
