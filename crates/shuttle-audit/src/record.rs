//! The audit record, its outcome, and the one-line human rendering.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The sender of a request that came from the host rather than from a VM.
pub const HOST: &str = "@host";

/// One decision about one cross-VM interaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// When the decision was made, in nanoseconds since the Unix epoch (UTC).
    pub time: u64,
    /// The policy operation: `connect`, `signal`, `invoke`, `open`, `mq`, `share`, ...
    pub op: String,
    /// The requesting VM, or [`HOST`].
    pub from: String,
    /// The target VM, when the request names one.
    pub to: Option<String>,
    /// The object of the operation, e.g. `unix:/run/postgresql/.s.PGSQL.5432`.
    pub object: String,
    /// What was decided.
    pub result: Outcome,
    /// The rule that decided; `None` means no rule matched and the default (deny) applied.
    pub rule: Option<RuleRef>,
    /// Who asked.
    pub caller: Caller,
    /// Why, in words: `no rule matched: default deny`, or the text of an error.
    pub reason: Option<String>,
    /// Per-journal sequence number, assigned by [`crate::Journal::append`]; 0 for a record that
    /// was never journaled (inserted directly into the store).
    #[serde(default)]
    pub seq: u64,
}

/// The result of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// A rule allowed it.
    Allow,
    /// A rule (or the default) denied it.
    Deny,
    /// An `ask` rule, answered yes.
    AskAllow,
    /// An `ask` rule, answered no or timed out.
    AskDeny,
    /// Carrying out the request failed, so it was refused (fail closed).
    Error,
}

impl Outcome {
    /// Every outcome, in a stable order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Allow,
        Outcome::Deny,
        Outcome::AskAllow,
        Outcome::AskDeny,
        Outcome::Error,
    ];

    /// The wire and database spelling: `allow`, `deny`, `ask-allow`, `ask-deny`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::AskAllow => "ask-allow",
            Outcome::AskDeny => "ask-deny",
            Outcome::Error => "error",
        }
    }

    /// Parses [`Outcome::as_str`]'s spelling.
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whether the request was refused. An error counts as a refusal, because every error on a
    /// cross-VM path refuses the request.
    pub fn is_denied(self) -> bool {
        !matches!(self, Outcome::Allow | Outcome::AskAllow)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the deciding rule is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleRef {
    /// Position of the rule in the loaded policy (0-based).
    pub index: usize,
    /// The rule's optional name.
    pub name: Option<String>,
    /// The policy file.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
}

/// Who made the request, as far as the monitor could tell from the kernel (never from what the VM
/// says about itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caller {
    /// The process id inside the VM's PID namespace.
    pub pid_in_vm: Option<i32>,
    /// The process id in the host's PID namespace.
    pub pid_on_host: Option<i32>,
    /// The user id of the caller.
    pub uid: Option<u32>,
    /// The program (executable path or `comm`).
    pub program: Option<String>,
}

/// The current time in nanoseconds since the Unix epoch, for [`AuditRecord::time`].
pub fn now_unix_nanos() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// Renders one record as one line for humans:
///
/// `2026-01-02T03:04:05.123456Z deny connect web -> db unix:/x default deny pid=12/3456 uid=0 psql: reason`
pub fn format_record_line(record: &AuditRecord) -> String {
    let mut line = format!(
        "{} {} {} {} -> {} {}",
        format_rfc3339_utc(record.time),
        record.result,
        record.op,
        record.from,
        record.to.as_deref().unwrap_or("-"),
        record.object,
    );
    match &record.rule {
        Some(rule) => {
            // Numbered from 1, as `shuttle policy explain` numbers rules.
            line.push_str(&format!(" rule #{}", rule.index + 1));
            if let Some(name) = &rule.name {
                line.push_str(&format!(" \"{name}\""));
            }
            line.push_str(&format!(" at {}:{}:{}", rule.file, rule.line, rule.column));
        }
        None => line.push_str(" default deny"),
    }
    let caller = &record.caller;
    let pid = |p: Option<i32>| p.map_or_else(|| "?".to_owned(), |p| p.to_string());
    if caller.pid_in_vm.is_some() || caller.pid_on_host.is_some() {
        line.push_str(&format!(
            " pid={}/{}",
            pid(caller.pid_in_vm),
            pid(caller.pid_on_host)
        ));
    }
    if let Some(uid) = caller.uid {
        line.push_str(&format!(" uid={uid}"));
    }
    if let Some(program) = &caller.program {
        line.push_str(&format!(" {program}"));
    }
    if let Some(reason) = &record.reason {
        line.push_str(&format!(": {reason}"));
    }
    line
}

/// Formats Unix nanoseconds as RFC 3339 UTC with microseconds, e.g. `2026-01-02T03:04:05.123456Z`.
pub fn format_rfc3339_utc(unix_nanos: u64) -> String {
    let secs = unix_nanos / 1_000_000_000;
    let micros = (unix_nanos % 1_000_000_000) / 1_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard Hinnant's
/// `civil_from_days`, restricted to dates at or after the epoch.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(format_rfc3339_utc(0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29T12:34:56.789012Z (leap day)
        assert_eq!(
            format_rfc3339_utc(951_827_696_789_012_345),
            "2000-02-29T12:34:56.789012Z"
        );
        // 2024-12-31T23:59:59Z
        assert_eq!(
            format_rfc3339_utc(1_735_689_599_000_000_000),
            "2024-12-31T23:59:59.000000Z"
        );
    }

    #[test]
    fn outcome_spelling_round_trips() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
            let json = serde_json::to_string(&o).expect("serialize");
            assert_eq!(json, format!("\"{}\"", o.as_str()));
        }
        assert!(Outcome::Error.is_denied());
        assert!(!Outcome::AskAllow.is_denied());
    }

    #[test]
    fn line_shows_rule_location_or_default_deny() {
        let mut r = AuditRecord {
            time: 0,
            op: "connect".into(),
            from: "web".into(),
            to: Some("db".into()),
            object: "unix:/run/pg.sock".into(),
            result: Outcome::Deny,
            rule: None,
            caller: Caller {
                pid_in_vm: Some(12),
                pid_on_host: Some(3456),
                uid: Some(0),
                program: Some("/usr/bin/psql".into()),
            },
            reason: Some("no rule matched: default deny".into()),
            seq: 1,
        };
        assert_eq!(
            format_record_line(&r),
            "1970-01-01T00:00:00.000000Z deny connect web -> db unix:/run/pg.sock default deny \
             pid=12/3456 uid=0 /usr/bin/psql: no rule matched: default deny"
        );
        r.result = Outcome::Allow;
        r.reason = None;
        r.rule = Some(RuleRef {
            index: 3,
            name: Some("pg".into()),
            file: "/etc/shuttle/policy.toml".into(),
            line: 12,
            column: 1,
        });
        assert!(format_record_line(&r)
            .contains("allow connect web -> db unix:/run/pg.sock rule #4 \"pg\" at /etc/shuttle/policy.toml:12:1"));
    }
}
