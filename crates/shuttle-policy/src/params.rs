//! Op-specific rule parameters.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// How a shared path is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShareMode {
    /// Read-only (the default).
    #[default]
    Ro,
    /// Read-write.
    Rw,
}

/// What an invoked program or handler may do with the file arguments it is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileAccess {
    /// File arguments are not passed across.
    None,
    /// File arguments are passed read-only (the default).
    #[default]
    ReadOnly,
    /// File arguments are passed read-write.
    ReadWrite,
}

/// The environment variables an `invoke` or `open` rule passes when it has no `env` key.
pub const DEFAULT_INVOKE_ENV: [&str; 5] = ["LANG", "LANGUAGE", "LC_*", "TERM", "TZ"];

/// Parameters of `invoke` and `open` rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvokeParams {
    /// Access to file arguments.
    pub files: FileAccess,
    /// Whether the directory of each file argument is exposed as well.
    pub expose_dir: bool,
    /// Environment variables passed through (allow list); everything else is dropped. A name
    /// ending in `*` allows every variable with that prefix (`LC_*`).
    pub env: Vec<String>,
    /// Who the program runs as in the target VM (`NAME`, `UID` or `UID:GID`, resolved there);
    /// `None`: the caller's own uid and gid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Short options (`-f`) whose glued value names a file (`-f./pats`, `-o/srv/out`): only
    /// these are read that way; `--NAME=VALUE` always is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub file_options: Vec<String>,
}

impl Default for InvokeParams {
    fn default() -> Self {
        InvokeParams {
            files: FileAccess::default(),
            expose_dir: false,
            env: DEFAULT_INVOKE_ENV.iter().map(|s| (*s).to_owned()).collect(),
            user: None,
            file_options: Vec::new(),
        }
    }
}

impl InvokeParams {
    /// The letters and digits X of the rule's `file_options` (`-X`).
    pub fn short_file_options(&self) -> Vec<u8> {
        self.file_options
            .iter()
            .filter_map(|o| match o.as_bytes() {
                [b'-', x] => Some(*x),
                _ => None,
            })
            .collect()
    }

    /// Whether the environment variable `name` may be passed to the program.
    pub fn passes_env(&self, name: &[u8]) -> bool {
        self.env
            .iter()
            .any(|allowed| match allowed.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix.as_bytes()),
                None => name == allowed.as_bytes(),
            })
    }
}

/// A signal, by its Linux number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signal(u8);

const SIGNALS: [&str; 31] = [
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];

impl Signal {
    /// Parses `TERM` or `SIGTERM` (upper-case, as in `kill -l`).
    pub fn from_name(name: &str) -> Option<Signal> {
        let bare = name.strip_prefix("SIG").unwrap_or(name);
        SIGNALS
            .iter()
            .position(|s| *s == bare)
            .and_then(|i| u8::try_from(i + 1).ok())
            .map(Signal)
    }

    /// The signal with Linux number `n` (1-31).
    pub fn from_number(n: i32) -> Option<Signal> {
        u8::try_from(n)
            .ok()
            .filter(|n| (1..=31).contains(n))
            .map(Signal)
    }

    /// The Linux signal number.
    pub fn number(self) -> i32 {
        i32::from(self.0)
    }

    /// The name without `SIG`, e.g. `TERM`.
    pub fn name(self) -> &'static str {
        SIGNALS[usize::from(self.0) - 1]
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Signal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A set of signals (bit `n` = signal `n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SignalSet(u64);

impl SignalSet {
    /// Adds a signal.
    pub fn insert(&mut self, s: Signal) {
        self.0 |= 1 << s.0;
    }

    /// Whether `s` is in the set.
    pub fn contains(self, s: Signal) -> bool {
        self.0 & (1 << s.0) != 0
    }

    /// Whether every signal of `other` is in `self`.
    pub fn is_superset(self, other: SignalSet) -> bool {
        other.0 & !self.0 == 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The signals, in numeric order.
    pub fn iter(self) -> impl Iterator<Item = Signal> {
        (1..=31u8).map(Signal).filter(move |s| self.contains(*s))
    }
}

impl Serialize for SignalSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// The parameters specific to a rule's op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum OpParams {
    /// `connect`: optional address translation.
    Connect {
        /// The address the caller's address is rewritten to in the target VM.
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
    /// `mq` takes no parameters.
    Mq,
    /// `share`
    Share {
        /// Read-only or read-write.
        mode: ShareMode,
        /// Mount point inside the `from` VM; `None` means the same path as the object.
        #[serde(skip_serializing_if = "Option::is_none")]
        at: Option<String>,
        /// Whether programs on the share may be executed: `None` means the default, which is
        /// yes in a VM (a component shared for use) and no on the host (`from = "@host"`).
        #[serde(skip_serializing_if = "Option::is_none")]
        exec: Option<bool>,
    },
    /// `ipc-group` takes no parameters.
    IpcGroup,
    /// `signal`
    Signal {
        /// The signals the rule covers; `None` means every signal.
        #[serde(skip_serializing_if = "Option::is_none")]
        signals: Option<SignalSet>,
    },
    /// `invoke`
    Invoke(InvokeParams),
    /// `open`
    Open {
        /// File and environment handling.
        #[serde(flatten)]
        invoke: InvokeParams,
        /// The program in the target VM that opens the object.
        handler: String,
    },
}

/// The default time an `ask` decision is held before it is denied.
pub const DEFAULT_ASK_TIMEOUT: Duration = Duration::from_secs(60);

/// A rule's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Params {
    /// Op-specific parameters.
    #[serde(flatten)]
    pub op: OpParams,
    /// How long an `ask` is held before it is denied (only for `action = "ask"`).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_duration"
    )]
    pub timeout: Option<Duration>,
}

impl Params {
    /// The `ask` timeout in force: the rule's own or [`DEFAULT_ASK_TIMEOUT`].
    pub fn ask_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_ASK_TIMEOUT)
    }

    /// The signals a `signal` rule is limited to (`None`: all, or not a signal rule).
    pub fn signals(&self) -> Option<SignalSet> {
        match self.op {
            OpParams::Signal { signals } => signals,
            _ => None,
        }
    }
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}

/// Parses `500ms`, `30s`, `5m` or `1h`.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = text.split_at(split);
    if num.is_empty() || num.len() > 9 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(Signal::from_name("TERM").unwrap().number(), 15);
        assert_eq!(Signal::from_name("SIGKILL").unwrap().number(), 9);
        assert_eq!(Signal::from_name("SYS").unwrap().number(), 31);
        assert!(Signal::from_name("term").is_none());
        assert!(Signal::from_name("FOO").is_none());
        assert_eq!(Signal::from_number(1).unwrap().name(), "HUP");
        assert!(Signal::from_number(0).is_none());
        let mut set = SignalSet::default();
        set.insert(Signal::from_name("HUP").unwrap());
        assert!(set.contains(Signal::from_number(1).unwrap()));
        assert!(!set.contains(Signal::from_number(2).unwrap()));
    }

    #[test]
    fn invoke_env_allow_list() {
        let p = InvokeParams::default();
        for ok in ["LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ"] {
            assert!(p.passes_env(ok.as_bytes()), "{ok}");
        }
        for no in ["PATH", "LD_PRELOAD", "HOME", "LANGX", "SSH_AUTH_SOCK"] {
            assert!(!p.passes_env(no.as_bytes()), "{no}");
        }
        let none = InvokeParams {
            env: Vec::new(),
            ..InvokeParams::default()
        };
        assert!(!none.passes_env(b"LANG"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1d"), None);
    }
}
