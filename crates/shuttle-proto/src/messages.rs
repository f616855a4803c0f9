//! The messages of each conversation.
//!
//! * CLI ↔ monitor, over the VM's `monitor.sock`: [`MonitorRequest`] / [`MonitorReply`].
//! * monitor ↔ VM init, over a socketpair made before the VM was forked: [`InitRequest`] /
//!   [`InitEvent`].

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use serde::{Deserialize, Serialize};

/// Bytes that are usually text (arguments, environment, paths). Valid UTF-8 travels as a JSON
/// string; anything else as an array of byte values, so no argument is ever mangled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Bytes {
    Text(String),
    Raw(Vec<u8>),
}

impl Bytes {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Bytes::Text(s) => s.as_bytes(),
            Bytes::Raw(b) => b,
        }
    }

    pub fn to_os_string(&self) -> OsString {
        OsString::from_vec(self.as_bytes().to_vec())
    }
}

impl From<&OsStr> for Bytes {
    fn from(s: &OsStr) -> Self {
        match s.to_str() {
            Some(t) => Bytes::Text(t.to_owned()),
            None => Bytes::Raw(s.as_bytes().to_vec()),
        }
    }
}

impl From<&str> for Bytes {
    fn from(s: &str) -> Self {
        Bytes::Text(s.to_owned())
    }
}

/// The opening message of every conversation, from the side that connected.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub version: u32,
}

/// What to run and how. The three standard descriptors travel alongside, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    pub argv: Vec<Bytes>,
    /// The complete environment of the command.
    pub env: Vec<(Bytes, Bytes)>,
    /// Working directory inside the VM; `/` (or the user's home) when absent.
    pub cwd: Option<Bytes>,
    /// `NAME`, `UID` or `UID:GID`, resolved against the VM's own /etc/passwd; root if absent.
    pub user: Option<String>,
    /// Run on a new pseudo-terminal of the VM's own, of this size (rows, columns), instead of
    /// on descriptors passed alongside. Used when the caller's stdin is a terminal: handing the
    /// caller's own terminal to a VM would let the VM's processes keep reading it after the
    /// command ends (everything typed into the host shell).
    #[serde(default)]
    pub terminal: Option<(u16, u16)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MonitorRequest {
    Hello(Hello),
    /// Run a command; stdin, stdout and stderr come alongside.
    Run(CommandSpec),
    /// Deliver a signal to the command this connection started (its process group).
    Signal {
        signal: i32,
    },
    /// Stop the VM: SIGTERM to everything, SIGKILL after `grace_ms`.
    Stop {
        grace_ms: u64,
    },
    Status,
    /// Replace the policy the monitor enforces (sent by the broker whenever the active policy
    /// changes): its sources in order, the policy loaded with `policy load` first, then the
    /// layers of the systems that are up.
    SetPolicy {
        parts: Vec<PolicyText>,
    },
}

/// One source of a policy: its name (a file path, for messages and audit records) and text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyText {
    pub source: String,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmStatus {
    pub name: String,
    /// PID of the VM's init as seen from the host.
    pub init_pid: i32,
    pub monitor_pid: i32,
    /// Seconds since the Unix epoch when the VM started.
    pub started_at: u64,
    /// Commands started through `shuttle run` that are still running.
    pub running_commands: usize,
    /// What became of the calls the VM's monitor intercepted since the VM started.
    #[serde(default)]
    pub intercepted: InterceptCounts,
}

/// Intercepted calls of a VM, counted (ordinary intra-VM traffic is counted, not logged).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InterceptCounts {
    /// Calls that stayed in the VM and continued unchanged.
    pub local: u64,
    /// Cross-VM calls the policy allowed and the monitor carried out.
    pub crossed: u64,
    /// Cross-VM attempts denied (audited one by one) or refused on error.
    pub refused: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MonitorReply {
    Hello {
        version: u32,
        vm: String,
    },
    /// The command runs, with this PID inside the VM.
    Started {
        pid: i32,
    },
    Exited(ExitStatus),
    /// The request could not be carried out; the message says why and what to do.
    Failed {
        message: String,
        exit_code: i32,
    },
    Status(VmStatus),
    /// Sent to the client that asked for a stop once the VM is gone.
    Stopped,
    /// The request was carried out.
    Done,
}

/// What a process inside a VM may ask, over `/run/shuttle/broker.sock` in the VM. The socket
/// it arrives on identifies the VM; nothing in a request names the requester.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmRequest {
    Hello(Hello),
    /// Deliver `signal` to every process of VM `vm` running `program` (a name, as `comm` or
    /// argv\[0\] shows it, or an absolute path).
    Signal {
        vm: String,
        program: String,
        signal: i32,
    },
    /// Run `program` where the policy's `invoke` rules route it (what an invoke stub asks);
    /// stdin, stdout and stderr come alongside, unless a terminal is asked for. Answered with
    /// [`VmReply::Invoked`] and then [`VmReply::Exited`], or with a refusal.
    Invoke(InvokeSpec),
    /// During an invocation: deliver `signal` to the invoked program (its process group).
    InvokeSignal {
        signal: i32,
    },
    /// Answering [`VmReply::SendFiles`]: descriptors of the file arguments `args` (indexes into
    /// [`InvokeSpec::args`]), opened by the caller, alongside (at most eight per message); an
    /// empty `args` ends the list.
    InvokeFiles {
        args: Vec<u32>,
    },
}

/// An invocation as the caller asks for it. Nothing in it is trusted beyond what the rule the
/// policy finds for `program` grants the caller's VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeSpec {
    /// The program's absolute path, as the `invoke` rule names it.
    pub program: String,
    /// The arguments after argv\[0\].
    pub args: Vec<Bytes>,
    /// The caller's environment: only what the rule's allow list names is passed on.
    pub env: Vec<(Bytes, Bytes)>,
    /// The caller's working directory; the program starts there if the target VM has it,
    /// else in `/`.
    pub cwd: Option<Bytes>,
    /// Run on a new pseudo-terminal of the target VM, of this size (rows, columns), whose
    /// master side comes back with [`VmReply::Invoked`] (the caller's stdin is a terminal,
    /// which is never handed to another VM).
    #[serde(default)]
    pub terminal: Option<(u16, u16)>,
    /// Which of `args` (0-based) name regular files in the caller's VM. When the rule passes
    /// files, the monitor asks for them ([`VmReply::SendFiles`]); each one the caller can open
    /// then appears to the program at `/shuttle/from/CALLER-VM/PATH` and its argument is
    /// rewritten to that path.
    #[serde(default)]
    pub files: Vec<u32>,
    /// Which of `args` are options whose value names a regular file (`--input=/srv/a.txt`,
    /// `-o/srv/out`): the monitor finds the value itself (`shuttle_vm::transfer::option_value`,
    /// `-X` forms only where the rule's `file_options` lists them) and treats it as a file
    /// argument, rewriting only the value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub option_files: Vec<u32>,
    /// `shuttle open`: the objects of `open` rules this request may match, in the order to
    /// try (`scheme:https`, `mime:application/pdf`, `ext:pdf`). When present, `program` is
    /// ignored: the first object some rule routes decides, and the program run is that rule's
    /// `handler`, with `args` (the path or URL) as its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open: Vec<String>,
    /// `shuttle run VM -- CMD` inside a VM: the VM the caller names. Its own VM (the one whose
    /// socket the request came in on, never a name it claims) runs `program` (found on the
    /// command's PATH) with `args` as the caller's uid and gid; another VM only as an
    /// invocation the policy routes there (`program` an absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_in: Option<String>,
    /// `shuttle run -u USER` inside a VM: honoured in the caller's own VM for a caller whose
    /// uid is 0 there (who could become anyone anyway); refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmReply {
    Hello {
        version: u32,
        vm: String,
    },
    /// Allowed and done: how many processes got the signal.
    Signalled {
        count: usize,
    },
    /// Refused; the message says which rule (or the default) decided.
    Denied {
        message: String,
    },
    Failed {
        message: String,
    },
    /// The invocation is allowed and the rule passes file arguments: send their descriptors
    /// ([`VmRequest::InvokeFiles`]), opened for writing too when `write` (and possible).
    SendFiles {
        write: bool,
    },
    /// The invoked program runs in VM `vm` with this PID there (with a terminal's master side
    /// alongside when one was asked for).
    Invoked {
        vm: String,
        pid: i32,
    },
    /// The invoked program ended.
    Exited(ExitStatus),
    /// The invocation was allowed but failed: the program could not be started, or its VM
    /// went away. `exit_code` follows shell conventions (126, 127, 137).
    InvokeFailed {
        message: String,
        exit_code: i32,
    },
}

/// The CLI's (and monitors') conversation with the broker over `$RUNTIME/broker.sock`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BrokerRequest {
    Hello(Hello),
    /// Replace the active policy atomically: parse, persist, hand to every monitor. The
    /// layers of running systems stay (see `SetPolicyLayer`).
    LoadPolicy {
        source: String,
        text: String,
    },
    /// Add or replace a named layer of the active policy (a system's rules, by `shuttle up`):
    /// its rules come after the loaded policy's and other layers', and the whole must be
    /// valid, or nothing changes. Answered like `LoadPolicy`.
    SetPolicyLayer {
        layer: String,
        parts: Vec<PolicyText>,
    },
    /// Remove a named layer (`shuttle down`), leaving every other rule in place.
    RemovePolicyLayer {
        layer: String,
    },
    /// Hand the active policy again to these VMs' monitors, which settles what it wants
    /// there anew (a share refused earlier is tried again). Answered like `LoadPolicy`.
    ReapplyPolicy {
        vms: Vec<String>,
    },
    /// Collect every VM's audit journal into the store now.
    CollectAudit,
    Status,
    /// From a monitor: an `ask` rule matched; hold the question until an operator answers
    /// (or `timeout_ms` passes, which denies). Answered with [`BrokerReply::Answer`].
    Ask(Question),
    /// The questions waiting for an answer.
    Pending,
    /// VM lifecycle, which the broker owns.
    VmCreate(VmCreateSpec),
    VmStart {
        name: String,
    },
    VmStop {
        name: String,
        grace_ms: u64,
    },
    VmRemove {
        name: String,
        force: bool,
    },
    /// An operator's answer; `remember_ms` keeps it for the same question for that long.
    Answer {
        id: u64,
        allow: bool,
        remember_ms: Option<u64>,
    },
}

/// What `shuttle vm create` asks for, before validation (the broker validates).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmCreateSpec {
    pub name: String,
    pub base: Option<String>,
    pub net: Option<String>,
    pub memory: Option<String>,
    pub pids: Option<u64>,
    pub hide: Vec<String>,
    pub tags: Vec<String>,
}

/// A request held for an operator's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Question {
    pub vm: String,
    pub op: String,
    pub to: Option<String>,
    pub object: String,
    /// The rule that asks, as `rule #N "name" at FILE:LINE:COL`.
    pub rule: String,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PendingQuestion {
    pub id: u64,
    pub question: Question,
    pub waiting_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BrokerReply {
    Hello {
        version: u32,
    },
    /// The policy is active; `monitors` running VMs enforce it now, `unreached` did not answer
    /// (they read the new policy when they restart).
    PolicyLoaded {
        rules: usize,
        monitors: usize,
        unreached: Vec<String>,
    },
    /// The policy was not loaded; nothing changed.
    PolicyRejected {
        errors: String,
    },
    Collected {
        records: usize,
    },
    Status {
        pid: i32,
        policy_source: Option<String>,
        rules: usize,
        audit_records: u64,
    },
    /// The answer to an [`BrokerRequest::Ask`]; `how` says who or what decided.
    Answer {
        allow: bool,
        how: String,
    },
    Pending {
        questions: Vec<PendingQuestion>,
    },
    Answered,
    /// A lifecycle request was carried out.
    Done,
    Failed {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum InitRequest {
    /// Fork and exec a command; stdin, stdout and stderr come alongside.
    Spawn { id: u64, command: CommandSpec },
    /// Signal the process group of a command started earlier.
    Signal { id: u64, signal: i32 },
    /// Stop the VM: SIGTERM to every process, then exit when none is left.
    Shutdown,
    /// The monitor holds the notification listener now: init closes its own copy.
    ListenerTaken,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum InitEvent {
    /// Set-up is complete; commands may be spawned. `listener_fd` is the seccomp notification
    /// listener's descriptor number in init, which the monitor duplicates (pidfd_getfd): init
    /// cannot pass it along with a message, because its own sendmsg is caught by the very
    /// filter whose listener it would carry.
    Ready {
        listener_fd: i32,
    },
    /// Set-up failed before the VM could start; init exits after sending this.
    SetupFailed {
        message: String,
    },
    Spawned {
        id: u64,
        pid: i32,
    },
    /// The command could not be started (exit_code follows shell conventions: 126, 127).
    SpawnFailed {
        id: u64,
        message: String,
        exit_code: i32,
    },
    Exited {
        id: u64,
        status: ExitStatus,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn non_utf8_arguments_survive_the_round_trip() {
        let raw = OsStr::from_bytes(b"caf\xe9\n");
        let b = Bytes::from(raw);
        let json = serde_json::to_string(&b).unwrap();
        let back: Bytes = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_os_string(), raw);
        let text = Bytes::from(OsStr::new("plain"));
        assert_eq!(serde_json::to_string(&text).unwrap(), "\"plain\"");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let bad = r#"{"hello":{"version":1,"identity":"host"}}"#;
        assert!(serde_json::from_str::<MonitorRequest>(bad).is_err());
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(2).shell_code(), 130);
    }
}
