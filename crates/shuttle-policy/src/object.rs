//! Operations and the objects they act on.

use std::fmt;

use serde::Serialize;

use crate::glob::{is_glob, Glob};

/// An interactive operation that a rule mediates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Connect to a unix (path or abstract), TCP or UDP socket in another VM.
    Connect,
    /// Open a POSIX message queue in another VM.
    Mq,
    /// Bind-mount a file or directory of another VM.
    Share,
    /// Share one SysV IPC namespace among a group of VMs.
    IpcGroup,
    /// Send a signal to a program in another VM.
    Signal,
    /// Run a program that lives in another VM.
    Invoke,
    /// Open a file or URL with another VM's handler.
    Open,
}

impl Op {
    /// Every op, in declaration order.
    pub const ALL: [Op; 7] = [
        Op::Connect,
        Op::Mq,
        Op::Share,
        Op::IpcGroup,
        Op::Signal,
        Op::Invoke,
        Op::Open,
    ];

    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Connect => "connect",
            Op::Mq => "mq",
            Op::Share => "share",
            Op::IpcGroup => "ipc-group",
            Op::Signal => "signal",
            Op::Invoke => "invoke",
            Op::Open => "open",
        }
    }

    /// Parses an op name as written in policy files.
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == name)
    }

    /// Whether the rule's `to` is the destination the object is routed to, so that it must name
    /// exactly one VM (or `@host`).
    pub fn routes_to_target(self) -> bool {
        matches!(
            self,
            Op::Connect | Op::Mq | Op::Share | Op::Invoke | Op::Open
        )
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// What objects of this op look like, for hints.
    pub(crate) fn object_forms(self) -> &'static str {
        match self {
            Op::Connect => "connect objects are unix:/PATH, abstract:NAME, tcp:PORT or udp:PORT",
            Op::Mq => "mq objects are mq:/NAME",
            Op::Share => "share objects are absolute paths such as /srv/data",
            Op::IpcGroup => "ipc-group objects are group names such as grp1",
            Op::Signal => "signal objects are program names such as nginx or absolute paths",
            Op::Invoke => "invoke objects are absolute program paths such as /usr/bin/evince",
            Op::Open => "open objects are scheme:NAME, mime:TYPE/SUBTYPE or ext:EXTENSION",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of an object, from its prefix or shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectKind {
    /// `unix:/path`
    Unix,
    /// `abstract:name`
    Abstract,
    /// `tcp:PORT`
    Tcp,
    /// `udp:PORT`
    Udp,
    /// `mq:/name`
    Mq,
    /// an absolute path
    Path,
    /// a bare name (ipc group or program name)
    Name,
    /// `scheme:NAME`
    Scheme,
    /// `mime:TYPE/SUBTYPE`
    Mime,
    /// `ext:EXTENSION`
    Ext,
}

impl ObjectKind {
    fn describe(self) -> &'static str {
        match self {
            ObjectKind::Unix => "a unix socket path",
            ObjectKind::Abstract => "an abstract unix socket",
            ObjectKind::Tcp => "a TCP port",
            ObjectKind::Udp => "a UDP port",
            ObjectKind::Mq => "a message queue",
            ObjectKind::Path => "a file path",
            ObjectKind::Name => "a bare name",
            ObjectKind::Scheme => "a URL scheme",
            ObjectKind::Mime => "a MIME type",
            ObjectKind::Ext => "a file extension",
        }
    }

    fn valid_for(self, op: Op) -> bool {
        use ObjectKind as K;
        match op {
            Op::Connect => matches!(self, K::Unix | K::Abstract | K::Tcp | K::Udp),
            Op::Mq => self == K::Mq,
            Op::Share | Op::Invoke => self == K::Path,
            Op::IpcGroup => self == K::Name,
            Op::Signal => matches!(self, K::Path | K::Name),
            Op::Open => matches!(self, K::Scheme | K::Mime | K::Ext),
        }
    }

    /// Whether a connect `target` of kind `target` may translate an object of this kind.
    pub(crate) fn same_family(self, target: ObjectKind) -> bool {
        use ObjectKind as K;
        matches!(
            (self, target),
            (K::Unix | K::Abstract, K::Unix | K::Abstract) | (K::Tcp, K::Tcp) | (K::Udp, K::Udp)
        )
    }

    fn glob_allowed(self, op: Op) -> bool {
        use ObjectKind as K;
        match self {
            // Ports are further restricted to a number or `*` by `check_port`.
            K::Unix | K::Abstract | K::Mq | K::Mime | K::Tcp | K::Udp => true,
            K::Path | K::Name => op == Op::Signal,
            K::Scheme | K::Ext => false,
        }
    }
}

/// An object as written in a rule: a literal or a glob over canonical object strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectPattern {
    kind: ObjectKind,
    text: Box<str>,
    glob: Option<Glob>,
}

/// Why an object could not be parsed: (message, hint, is the kind wrong for the op).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: String,
    /// The object is well formed but of a kind this op does not take.
    pub wrong_kind: bool,
}

fn bad(message: String, hint: impl Into<String>) -> ObjectError {
    ObjectError {
        message,
        hint: hint.into(),
        wrong_kind: false,
    }
}

const PREFIXES: [(&str, ObjectKind); 8] = [
    ("unix", ObjectKind::Unix),
    ("abstract", ObjectKind::Abstract),
    ("tcp", ObjectKind::Tcp),
    ("udp", ObjectKind::Udp),
    ("mq", ObjectKind::Mq),
    ("scheme", ObjectKind::Scheme),
    ("mime", ObjectKind::Mime),
    ("ext", ObjectKind::Ext),
];

/// Checks that `path` is absolute and normalized: no empty, `.` or `..` components and no
/// trailing slash. Returns a reason on failure.
pub fn check_abs_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("is not absolute");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err("ends with '/'");
    }
    if path[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("is not normalized (it has an empty, `.` or `..` component)");
    }
    Ok(())
}

fn check_port(text: &str, body: &str) -> Result<(), ObjectError> {
    let hint = format!(
        "write the port number from 1 to 65535 (e.g. {}:5432) or `*` for any port; \
         service names are not resolved",
        &text[..text.len() - body.len() - 1]
    );
    if body == "*" {
        return Ok(());
    }
    if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(
            format!("`{body}` in `{text}` is not a port number"),
            hint,
        ));
    }
    if body.len() > 1 && body.starts_with('0') {
        return Err(bad(
            format!("port `{body}` in `{text}` has leading zeros"),
            hint,
        ));
    }
    match body.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(()),
        _ => Err(bad(
            format!("port `{body}` in `{text}` is out of range"),
            hint,
        )),
    }
}

impl ObjectPattern {
    /// Parses and validates an object for `op`.
    pub fn parse(op: Op, text: &str) -> Result<ObjectPattern, ObjectError> {
        if text.is_empty() {
            return Err(bad("object is empty".into(), op.object_forms()));
        }
        let (kind, body) = if text.starts_with('/') {
            (ObjectKind::Path, text)
        } else if let Some((prefix, body)) = text.split_once(':') {
            match PREFIXES.iter().find(|(p, _)| *p == prefix) {
                Some(&(_, kind)) => (kind, body),
                None => {
                    return Err(bad(
                        format!("unknown object kind `{prefix}:` in `{text}`"),
                        op.object_forms(),
                    ))
                }
            }
        } else {
            (ObjectKind::Name, text)
        };
        if !kind.valid_for(op) {
            return Err(ObjectError {
                message: format!(
                    "object `{text}` is {}, which `{op}` rules do not take",
                    kind.describe()
                ),
                hint: op.object_forms().into(),
                wrong_kind: true,
            });
        }
        let glob = is_glob(body);
        if glob && !kind.glob_allowed(op) {
            return Err(bad(
                format!("object `{text}` has wildcards, which {op} rules do not allow"),
                format!("name one exact object; {}", op.object_forms()),
            ));
        }
        Self::check_body(op, kind, text, body)?;
        let glob = if glob {
            Some(Glob::new(text).map_err(|e| {
                bad(
                    e.to_string(),
                    "close every `[` with `]`; `*` matches any text, `?` one character",
                )
            })?)
        } else {
            None
        };
        Ok(ObjectPattern {
            kind,
            text: text.into(),
            glob,
        })
    }

    fn check_body(op: Op, kind: ObjectKind, text: &str, body: &str) -> Result<(), ObjectError> {
        match kind {
            ObjectKind::Unix => check_abs_path(body).map_err(|why| {
                bad(
                    format!("unix socket path in `{text}` {why}"),
                    "write an absolute, normalized path such as unix:/run/app/app.sock",
                )
            }),
            ObjectKind::Abstract => {
                if body.is_empty() || body.contains('\0') {
                    Err(bad(
                        format!("abstract socket name in `{text}` is empty or contains NUL"),
                        "write the name without the leading NUL, e.g. abstract:/tmp/.X11-unix/X0",
                    ))
                } else {
                    Ok(())
                }
            }
            ObjectKind::Tcp | ObjectKind::Udp => check_port(text, body),
            ObjectKind::Mq => {
                let name = body.strip_prefix('/').unwrap_or("");
                if name.is_empty() || name.contains('/') || name.contains('\0') || body.len() > 255
                {
                    Err(bad(
                        format!("message queue name in `{text}` is not of the form /NAME"),
                        "write mq:/NAME with one leading '/' and no other '/', e.g. mq:/jobs",
                    ))
                } else {
                    Ok(())
                }
            }
            ObjectKind::Path => check_abs_path(body).map_err(|why| {
                bad(
                    format!("path `{text}` {why}"),
                    match op {
                        Op::Invoke => "write the program's absolute path, e.g. /usr/bin/evince",
                        _ => "write an absolute, normalized path such as /srv/data",
                    },
                )
            }),
            ObjectKind::Name => {
                let ok = match op {
                    Op::IpcGroup => crate::selector::is_valid_vm_name(body),
                    _ => !body.contains(['\0', '/']) && !body.chars().any(char::is_whitespace),
                };
                if ok {
                    Ok(())
                } else {
                    Err(bad(
                        format!("invalid name `{text}`"),
                        match op {
                            Op::IpcGroup => {
                                "group names are 1-63 characters of a-z, 0-9 and '-', \
                                 not starting with '-'"
                            }
                            _ => "write a program name without spaces, or an absolute path",
                        },
                    ))
                }
            }
            ObjectKind::Scheme => {
                let b = body.as_bytes();
                let ok = !b.is_empty()
                    && b[0].is_ascii_lowercase()
                    && b.iter().all(|&c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || b"+.-".contains(&c)
                    });
                if ok {
                    Ok(())
                } else {
                    Err(bad(
                        format!("invalid URL scheme in `{text}`"),
                        "write a lower-case scheme without `://`, e.g. scheme:https",
                    ))
                }
            }
            ObjectKind::Mime => {
                let part_ok = |p: &str| {
                    !p.is_empty()
                        && p.chars().all(|c| {
                            c.is_ascii_lowercase()
                                || c.is_ascii_digit()
                                || "!#$&^_.+-*?[]".contains(c)
                        })
                };
                match body.split_once('/') {
                    Some((t, s)) if part_ok(t) && part_ok(s) => Ok(()),
                    _ => Err(bad(
                        format!("invalid MIME type in `{text}`"),
                        "write a lower-case TYPE/SUBTYPE, e.g. mime:application/pdf or mime:image/*",
                    )),
                }
            }
            ObjectKind::Ext => {
                let ok = !body.is_empty()
                    && !body.starts_with('.')
                    && body.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || "._+-".contains(c)
                    });
                if ok {
                    Ok(())
                } else {
                    Err(bad(
                        format!("invalid file extension in `{text}`"),
                        "write a lower-case extension without the leading dot, e.g. ext:pdf",
                    ))
                }
            }
        }
    }

    /// The object's kind.
    pub fn kind(&self) -> ObjectKind {
        self.kind
    }

    /// The object as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The compiled glob, when the object contains wildcards.
    pub fn glob(&self) -> Option<&Glob> {
        self.glob.as_ref()
    }

    /// Whether the object contains wildcards.
    pub fn is_glob(&self) -> bool {
        self.glob.is_some()
    }

    /// Whether the canonical object string `object` matches this pattern. Never allocates.
    pub fn matches(&self, object: &str) -> bool {
        match &self.glob {
            Some(g) => g.matches(object),
            None => *self.text == *object,
        }
    }

    /// Whether some object may be matched by both patterns (conservative: `false` only when
    /// certain).
    pub(crate) fn may_overlap(&self, other: &ObjectPattern) -> bool {
        match (&self.glob, &other.glob) {
            (None, None) => self.text == other.text,
            (Some(g), None) => g.matches(&other.text),
            (None, Some(h)) => h.matches(&self.text),
            (Some(g), Some(h)) => g.may_overlap(h),
        }
    }

    /// Whether every object `other` matches is certainly matched by `self` (conservative).
    pub(crate) fn covers(&self, other: &ObjectPattern) -> bool {
        match (&self.glob, &other.glob) {
            (None, None) => self.text == other.text,
            (Some(g), None) => g.matches(&other.text),
            (Some(g), Some(h)) => g.covers(h),
            (None, Some(_)) => false,
        }
    }
}

impl fmt::Display for ObjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for ObjectPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn valid_objects() {
        for (op, o) in [
            (Op::Connect, "unix:/run/postgresql/.s.PGSQL.5432"),
            (Op::Connect, "unix:/run/app/*.sock"),
            (Op::Connect, "abstract:/tmp/.X11-unix/X0"),
            (Op::Connect, "tcp:5432"),
            (Op::Connect, "udp:*"),
            (Op::Mq, "mq:/jobs"),
            (Op::Share, "/srv/data"),
            (Op::IpcGroup, "grp1"),
            (Op::Signal, "nginx"),
            (Op::Signal, "/usr/sbin/nginx"),
            (Op::Invoke, "/usr/bin/evince"),
            (Op::Open, "scheme:https"),
            (Op::Open, "mime:image/*"),
            (Op::Open, "ext:pdf"),
        ] {
            ObjectPattern::parse(op, o).unwrap();
        }
    }

    #[test]
    fn invalid_objects() {
        for (op, o, wrong_kind) in [
            (Op::Connect, "unix:relative", false),
            (Op::Connect, "unix:/a/../b", false),
            (Op::Connect, "tcp:0", false),
            (Op::Connect, "tcp:65536", false),
            (Op::Connect, "tcp:http", false),
            (Op::Connect, "tcp:08", false),
            (Op::Connect, "tcp:8*", false),
            (Op::Connect, "mq:/x", true),
            (Op::Connect, "foo:bar", false),
            (Op::Mq, "mq:x", false),
            (Op::Share, "/srv/*", false),
            (Op::Share, "srv", true),
            (Op::Invoke, "evince", true),
            (Op::Open, "ext:.pdf", false),
            (Op::Open, "scheme:HTTPS", false),
            (Op::Open, "mime:pdf", false),
            (Op::IpcGroup, "Grp", false),
        ] {
            let e = ObjectPattern::parse(op, o).unwrap_err();
            assert_eq!(e.wrong_kind, wrong_kind, "{op} {o}: {e:?}");
        }
    }

    #[test]
    fn matching() {
        let p = ObjectPattern::parse(Op::Connect, "unix:/run/app/*.sock").unwrap();
        assert!(p.matches("unix:/run/app/a.sock"));
        assert!(!p.matches("unix:/run/app/a.socket"));
        let any = ObjectPattern::parse(Op::Connect, "tcp:*").unwrap();
        assert!(any.matches("tcp:80"));
        assert!(!any.matches("udp:80"));
    }
}
