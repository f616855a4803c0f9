//! Diagnostics: every error in a policy file (and, through `shuttle-system`, in a system
//! manifest) names `file:line:column` and says how to fix it. One type and one format for
//! both, so that the two read the same and tools can parse either.

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

/// The one format of a diagnostic: `FILE:LINE:COL: error: MESSAGE` and a hint line.
fn write_diagnostic(
    f: &mut fmt::Formatter<'_>,
    file: &str,
    location: Location,
    message: &str,
    hint: &str,
) -> fmt::Result {
    write!(f, "{file}:{location}: error: {message}\n  hint: {hint}")
}

/// One mistake at a place in a source file (a policy, a system manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The source's name, as given (usually its path).
    pub file: String,
    /// Where the offending key or value starts.
    pub location: Location,
    /// What is wrong (lower-case, no trailing period).
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_diagnostic(f, &self.file, self.location, &self.message, &self.hint)
    }
}

impl std::error::Error for Diagnostic {}

impl From<PolicyError> for Diagnostic {
    fn from(e: PolicyError) -> Self {
        Diagnostic {
            file: e.file,
            location: e.location,
            message: e.message,
            hint: e.hint,
        }
    }
}

/// Every mistake found in one source, in source order, shown one after the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Diagnostics<E>(pub Vec<E>);

impl<E> Diagnostics<E> {
    /// The individual errors, in source order.
    pub fn errors(&self) -> &[E] {
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

impl<E: fmt::Display> fmt::Display for Diagnostics<E> {
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

impl<E: fmt::Debug + fmt::Display> std::error::Error for Diagnostics<E> {}

impl<E> IntoIterator for Diagnostics<E> {
    type Item = E;
    type IntoIter = std::vec::IntoIter<E>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_diagnostic(f, &self.file, self.location, &self.message, &self.hint)
    }
}

impl std::error::Error for PolicyError {}

/// All the mistakes found in a policy file, in source order.
pub type PolicyErrors = Diagnostics<PolicyError>;

/// Maps byte offsets in the source to line/column locations.
#[derive(Debug)]
pub struct LineIndex<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    /// Indexes the line starts of `text`.
    pub fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, line_starts }
    }

    /// The 1-based line and column (in characters) of byte `offset`.
    pub fn location(&self, offset: usize) -> Location {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based_and_count_characters() {
        let idx = LineIndex::new("ab\ncdé\nx");
        assert_eq!(idx.location(0), Location { line: 1, column: 1 });
        assert_eq!(idx.location(4), Location { line: 2, column: 2 });
        assert_eq!(idx.location(8), Location { line: 3, column: 1 });
    }

    #[test]
    fn policy_errors_and_diagnostics_read_the_same() {
        let e = PolicyError {
            kind: ErrorKind::UnknownOp,
            file: "p.toml".into(),
            location: Location { line: 2, column: 6 },
            message: "unknown op `conect`".into(),
            hint: "did you mean `connect`?".into(),
        };
        let text = e.to_string();
        assert_eq!(
            text,
            "p.toml:2:6: error: unknown op `conect`\n  hint: did you mean `connect`?"
        );
        assert_eq!(Diagnostic::from(e).to_string(), text);
    }
}
