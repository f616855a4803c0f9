//! A tiny glob matcher for VM names and object patterns.
//!
//! Syntax: `*` matches any run of characters (including `/`), `?` matches one character,
//! `[abc]`, `[a-z]` and `[!a-z]` match one character from (or not from) a set. There are no
//! escapes: a pattern that contains none of `*`, `?`, `[` is a literal.
//!
//! Kept in-house rather than pulled from `globset` so that matching never allocates and so that
//! the shadowing analysis can reason about the pattern structure.

use std::fmt;

/// The characters that make a string a glob pattern.
pub(crate) const GLOB_CHARS: &[char] = &['*', '?', '['];

/// Whether `text` contains any glob metacharacter.
pub(crate) fn is_glob(text: &str) -> bool {
    text.contains(GLOB_CHARS)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyChar,
    Star,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Token {
    fn matches_char(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::AnyChar => true,
            Token::Star => true,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

/// A compiled glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    text: Box<str>,
    tokens: Vec<Token>,
    /// Byte length of the literal text before the first wildcard.
    literal_prefix_len: usize,
}

/// Why a glob pattern could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// A `[` without its closing `]`.
    #[error("unclosed `[` in pattern `{0}`")]
    UnclosedClass(String),
    /// `[]` or `[!]`.
    #[error("empty character class in pattern `{0}`")]
    EmptyClass(String),
    /// `[z-a]`.
    #[error("reversed range `{1}-{2}` in pattern `{0}`")]
    ReversedRange(String, char, char),
}

impl Glob {
    /// Compiles `text` into a glob.
    pub fn new(text: &str) -> Result<Glob, GlobError> {
        let mut tokens = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => {
                    // Consecutive stars are equivalent to one.
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                '?' => tokens.push(Token::AnyChar),
                '[' => {
                    let negated = chars.next_if_eq(&'!').is_some();
                    let mut ranges = Vec::new();
                    let mut closed = false;
                    while let Some(lo) = chars.next() {
                        if lo == ']' {
                            closed = true;
                            break;
                        }
                        if chars.peek() == Some(&'-') {
                            let mut ahead = chars.clone();
                            ahead.next();
                            match ahead.peek() {
                                Some(&hi) if hi != ']' => {
                                    chars.next();
                                    chars.next();
                                    if hi < lo {
                                        return Err(GlobError::ReversedRange(text.into(), lo, hi));
                                    }
                                    ranges.push((lo, hi));
                                    continue;
                                }
                                _ => {}
                            }
                        }
                        ranges.push((lo, lo));
                    }
                    if !closed {
                        return Err(GlobError::UnclosedClass(text.into()));
                    }
                    if ranges.is_empty() {
                        return Err(GlobError::EmptyClass(text.into()));
                    }
                    tokens.push(Token::Class { negated, ranges });
                }
                c => tokens.push(Token::Literal(c)),
            }
        }
        let literal_prefix_len = text.find(GLOB_CHARS).unwrap_or(text.len());
        Ok(Glob {
            text: text.into(),
            tokens,
            literal_prefix_len,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal text before the first wildcard; every matching string starts with it.
    pub fn literal_prefix(&self) -> &str {
        &self.text[..self.literal_prefix_len]
    }

    /// Whether `s` matches the whole pattern. Never allocates.
    pub fn matches(&self, s: &str) -> bool {
        let toks = &self.tokens;
        let (mut p, mut i) = (0usize, 0usize);
        // Where to resume after the most recent star: (token after star, string position).
        let mut resume: Option<(usize, usize)> = None;
        loop {
            if p < toks.len() {
                if toks[p] == Token::Star {
                    resume = Some((p + 1, i));
                    p += 1;
                    continue;
                }
                if let Some(c) = s[i..].chars().next() {
                    if toks[p].matches_char(c) {
                        p += 1;
                        i += c.len_utf8();
                        continue;
                    }
                }
            } else if i == s.len() {
                return true;
            }
            // Mismatch: let the last star swallow one more character.
            match resume {
                Some((rp, ri)) if ri < s.len() => {
                    let c = s[ri..].chars().next().map_or(1, char::len_utf8);
                    resume = Some((rp, ri + c));
                    p = rp;
                    i = ri + c;
                }
                _ => return false,
            }
        }
    }

    /// Whether some string may be matched by both `self` and `other`. Conservative: `false`
    /// only when that is certain (their literal prefixes disagree).
    pub fn may_overlap(&self, other: &Glob) -> bool {
        let (a, b) = (self.literal_prefix(), other.literal_prefix());
        a.starts_with(b) || b.starts_with(a)
    }

    /// Whether every string matched by `other` is matched by `self`.
    ///
    /// Conservative: `true` only when that is certain (identical patterns, or `self` is a
    /// literal prefix followed by a single trailing `*` and `other` starts with that prefix).
    pub fn covers(&self, other: &Glob) -> bool {
        if self.text == other.text {
            return true;
        }
        match self.tokens.split_last() {
            Some((Token::Star, head)) if head.iter().all(|t| matches!(t, Token::Literal(_))) => {
                other.text.starts_with(self.literal_prefix())
            }
            _ => false,
        }
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn g(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }

    #[test]
    fn star_and_question() {
        assert!(g("web-*").matches("web-1"));
        assert!(g("web-*").matches("web-"));
        assert!(!g("web-*").matches("web"));
        assert!(g("*").matches(""));
        assert!(g("a*b*c").matches("aXXbYYc"));
        assert!(!g("a*b*c").matches("aXXbYY"));
        assert!(g("unix:/run/*.sock").matches("unix:/run/a/b.sock"));
        assert!(g("v?").matches("v1"));
        assert!(!g("v?").matches("v12"));
        assert!(g("*é").matches("café"));
    }

    #[test]
    fn classes() {
        assert!(g("db[0-9]").matches("db7"));
        assert!(!g("db[0-9]").matches("dbx"));
        assert!(g("db[!0-9]").matches("dbx"));
        assert!(g("x[-a]").matches("x-"));
        assert!(g("x[a-]").matches("x-"));
        assert_eq!(
            Glob::new("a[b").unwrap_err(),
            GlobError::UnclosedClass("a[b".into())
        );
        assert_eq!(
            Glob::new("a[]").unwrap_err(),
            GlobError::EmptyClass("a[]".into())
        );
        assert!(matches!(
            Glob::new("[z-a]"),
            Err(GlobError::ReversedRange(..))
        ));
    }

    #[test]
    fn prefix_and_cover() {
        assert_eq!(g("unix:/run/*.sock").literal_prefix(), "unix:/run/");
        assert!(g("web-*").covers(&g("web-a*")));
        assert!(g("web-*").covers(&g("web-*")));
        assert!(!g("web-a*").covers(&g("web-*")));
        assert!(!g("*.sock").covers(&g("*.sock*")));
    }
}
