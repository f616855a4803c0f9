//! From TOML text to validated rules, collecting every error with its location.

use std::collections::HashMap;

use toml_edit::{Document, Item, TableLike, Value};

use crate::error::{ErrorKind, LineIndex, Location, PolicyError};
use crate::object::{check_abs_path, ObjectPattern, Op};
use crate::params::{
    parse_duration, FileAccess, InvokeParams, OpParams, Params, ShareMode, Signal, SignalSet,
};
use crate::rule::{Action, Rule};
use crate::selector::{Selector, SelectorSet};

/// Keys every rule may have.
const COMMON_KEYS: [&str; 6] = ["name", "op", "from", "to", "object", "action"];

/// Op parameters, with the ops that take them (`timeout` is for every op, with `ask`).
const PARAM_KEYS: [(&str, &[Op]); 12] = [
    ("target", &[Op::Connect]),
    ("mode", &[Op::Share]),
    ("at", &[Op::Share]),
    ("exec", &[Op::Share]),
    ("files", &[Op::Invoke, Op::Open]),
    ("expose_dir", &[Op::Invoke, Op::Open]),
    ("env", &[Op::Invoke, Op::Open]),
    ("user", &[Op::Invoke, Op::Open]),
    ("file_options", &[Op::Invoke, Op::Open]),
    ("handler", &[Op::Open]),
    ("signals", &[Op::Signal]),
    ("timeout", &Op::ALL),
];

fn all_rule_keys() -> impl Iterator<Item = &'static str> {
    COMMON_KEYS
        .into_iter()
        .chain(PARAM_KEYS.iter().map(|(k, _)| *k))
}

fn op_takes(op: Op, key: &str) -> bool {
    PARAM_KEYS
        .iter()
        .any(|(k, ops)| *k == key && ops.contains(&op))
}

fn op_params(op: Op) -> Vec<&'static str> {
    PARAM_KEYS
        .iter()
        .filter(|(k, ops)| *k != "timeout" && ops.contains(&op))
        .map(|(k, _)| *k)
        .collect()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub(crate) fn closest<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let limit = if word.chars().count() <= 3 { 1 } else { 2 };
    candidates
        .into_iter()
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn ops_list() -> String {
    Op::ALL.map(Op::as_str).join(", ")
}

struct Ctx<'a> {
    file: &'a str,
    lines: LineIndex<'a>,
    errors: Vec<PolicyError>,
}

impl Ctx<'_> {
    fn loc(&self, offset: usize) -> Location {
        self.lines.location(offset)
    }

    fn err(&mut self, kind: ErrorKind, offset: usize, message: String, hint: impl Into<String>) {
        let location = self.loc(offset);
        self.errors.push(PolicyError {
            kind,
            file: self.file.to_string(),
            location,
            message,
            hint: hint.into(),
        });
    }
}

fn item_offset(item: &Item) -> Option<usize> {
    item.span().map(|s| s.start)
}

fn value_offset(v: &Value) -> Option<usize> {
    v.span().map(|s| s.start)
}

/// One key of a rule table: where its key and value start.
#[derive(Clone, Copy)]
struct Field<'a> {
    item: &'a Item,
    value_at: usize,
}

/// Parses `text` into rules: the valid rules, and every error found (unsorted). Rules with
/// errors are left out.
pub(crate) fn parse_rules(file: &str, text: &str) -> (Vec<Rule>, Vec<PolicyError>) {
    let mut cx = Ctx {
        file,
        lines: LineIndex::new(text),
        errors: Vec::new(),
    };
    let doc = match Document::parse(text) {
        Ok(d) => d,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let msg = e.message().trim().lines().next().unwrap_or("").trim();
            cx.err(
                ErrorKind::Syntax,
                offset,
                format!("invalid TOML: {msg}"),
                "check the quoting, brackets and `key = value` syntax at this position",
            );
            return (Vec::new(), cx.errors);
        }
    };

    // Collect rule tables: `[[rule]]` or `rule = [{ ... }]`.
    let mut tables: Vec<(&dyn TableLike, usize)> = Vec::new();
    let root = doc.as_table();
    for (key, item) in root.iter() {
        let key_at = root
            .get_key_value(key)
            .and_then(|(k, _)| k.span())
            .map_or(0, |s| s.start);
        if key != "rule" {
            let hint = match closest(key, ["rule"]) {
                Some(s) => format!("did you mean `[[{s}]]`?"),
                None => "a policy holds only `[[rule]]` tables".to_string(),
            };
            cx.err(
                ErrorKind::UnknownKey,
                key_at,
                format!("unknown top-level key `{key}`"),
                hint,
            );
            continue;
        }
        match item {
            Item::ArrayOfTables(aot) => {
                for t in aot.iter() {
                    tables.push((t, t.span().map_or(key_at, |s| s.start)));
                }
            }
            Item::Value(Value::Array(arr)) => {
                for v in arr.iter() {
                    match v.as_inline_table() {
                        Some(t) => tables.push((t, value_offset(v).unwrap_or(key_at))),
                        None => cx.err(
                            ErrorKind::WrongType,
                            value_offset(v).unwrap_or(key_at),
                            format!("a rule must be a table, found {}", v.type_name()),
                            "write each rule as a `[[rule]]` table",
                        ),
                    }
                }
            }
            _ => cx.err(
                ErrorKind::WrongType,
                item_offset(item).unwrap_or(key_at),
                format!(
                    "`rule` must be an array of tables, found {}",
                    item.type_name()
                ),
                "write each rule as a `[[rule]]` table",
            ),
        }
    }

    let mut rules = Vec::new();
    let mut names: HashMap<String, Location> = HashMap::new();
    for (i, (table, at)) in tables.into_iter().enumerate() {
        if let Some(rule) = parse_rule(&mut cx, &mut names, i + 1, table, at) {
            rules.push(rule);
        }
    }
    (rules, cx.errors)
}

fn expect_str<'a>(cx: &mut Ctx<'_>, key: &str, f: Field<'a>, example: &str) -> Option<&'a str> {
    match f.item.as_str() {
        Some(s) => Some(s),
        None => {
            cx.err(
                ErrorKind::WrongType,
                f.value_at,
                format!("`{key}` must be a string, found {}", f.item.type_name()),
                format!("write {key} = {example}"),
            );
            None
        }
    }
}

/// A string or an array of strings, each with its offset.
fn str_list<'a>(cx: &mut Ctx<'_>, key: &str, f: Field<'a>) -> Option<Vec<(&'a str, usize)>> {
    if let Some(s) = f.item.as_str() {
        return Some(vec![(s, f.value_at)]);
    }
    let Some(arr) = f.item.as_array() else {
        cx.err(
            ErrorKind::WrongType,
            f.value_at,
            format!(
                "`{key}` must be a string or an array of strings, found {}",
                f.item.type_name()
            ),
            format!("write {key} = \"web\" or {key} = [\"web\", \"@tag:front\"]"),
        );
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for v in arr.iter() {
        let at = value_offset(v).unwrap_or(f.value_at);
        match v.as_str() {
            Some(s) => out.push((s, at)),
            None => {
                ok = false;
                cx.err(
                    ErrorKind::WrongType,
                    at,
                    format!(
                        "elements of `{key}` must be strings, found {}",
                        v.type_name()
                    ),
                    "quote each element",
                );
            }
        }
    }
    ok.then_some(out)
}

fn parse_selectors(cx: &mut Ctx<'_>, key: &str, f: Field<'_>) -> Option<SelectorSet> {
    let items = str_list(cx, key, f)?;
    if items.is_empty() {
        cx.err(
            ErrorKind::BadSelector,
            f.value_at,
            format!("`{key}` is an empty list"),
            "name at least one VM, glob, `@tag:NAME`, `@host` or `@any`",
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (s, at) in items {
        match Selector::parse(s) {
            Ok(sel) => out.push(sel),
            Err((message, hint)) => {
                ok = false;
                cx.err(ErrorKind::BadSelector, at, message, hint);
            }
        }
    }
    ok.then_some(SelectorSet(out))
}

fn parse_rule(
    cx: &mut Ctx<'_>,
    names: &mut HashMap<String, Location>,
    number: usize,
    table: &dyn TableLike,
    header_at: usize,
) -> Option<Rule> {
    let errors_before = cx.errors.len();
    let mut fields: HashMap<&str, Field<'_>> = HashMap::new();
    let mut unknown: Vec<(String, usize)> = Vec::new();
    for (key, item) in table.iter() {
        let key_at = table
            .get_key_value(key)
            .and_then(|(k, _)| k.span())
            .map_or(header_at, |s| s.start);
        if all_rule_keys().any(|k| k == key) {
            let value_at = item_offset(item).unwrap_or(key_at);
            fields.insert(key, Field { item, value_at });
        } else {
            unknown.push((key.to_string(), key_at));
        }
    }

    // The op first: it decides which keys are valid.
    let mut op = None;
    if let Some(f) = fields.get("op").copied() {
        if let Some(s) = expect_str(cx, "op", f, "\"connect\"") {
            op = Op::from_name(s);
            if op.is_none() {
                let hint = match closest(s, Op::ALL.map(Op::as_str)) {
                    Some(c) => format!("did you mean `{c}`? valid ops are {}", ops_list()),
                    None => format!("valid ops are {}", ops_list()),
                };
                cx.err(
                    ErrorKind::UnknownOp,
                    f.value_at,
                    format!("unknown op `{s}`"),
                    hint,
                );
            }
        }
    }

    // A misspelt required key is reported once, as the misspelling.
    let mut suggested: Vec<&str> = Vec::new();
    for (key, at) in unknown {
        let suggestion = closest(&key, all_rule_keys());
        suggested.extend(suggestion);
        let hint = match (suggestion, op) {
            (Some(s), _) => format!("did you mean `{s}`?"),
            (None, Some(op)) => {
                let mut keys: Vec<&str> = COMMON_KEYS.to_vec();
                keys.extend(op_params(op));
                keys.push("timeout");
                format!("valid keys for {op} rules are {}", keys.join(", "))
            }
            (None, None) => format!(
                "valid keys are {}",
                all_rule_keys().collect::<Vec<_>>().join(", ")
            ),
        };
        cx.err(
            ErrorKind::UnknownKey,
            at,
            format!("unknown key `{key}` in rule"),
            hint,
        );
    }

    let name = match fields.get("name").copied() {
        Some(f) => match expect_str(cx, "name", f, "\"web-to-db\"") {
            Some(n) if n.is_empty() || n.len() > 128 || n.chars().any(char::is_control) => {
                cx.err(
                    ErrorKind::BadParam,
                    f.value_at,
                    "rule name must be 1-128 printable characters".into(),
                    "use a short label such as \"web-to-db\"",
                );
                None
            }
            Some(n) => {
                let here = cx.loc(f.value_at);
                if let Some(first) = names.get(n) {
                    let first = *first;
                    cx.err(
                        ErrorKind::DuplicateName,
                        f.value_at,
                        format!("duplicate rule name `{n}`"),
                        format!(
                            "rule names label audit records and must be unique; `{n}` is already \
                             used at {}:{first}",
                            cx.file
                        ),
                    );
                } else {
                    names.insert(n.to_string(), here);
                }
                Some(n)
            }
            None => None,
        },
        None => None,
    };

    let from = fields
        .get("from")
        .copied()
        .and_then(|f| parse_selectors(cx, "from", f));
    let to = fields
        .get("to")
        .copied()
        .and_then(|f| parse_selectors(cx, "to", f));

    let object = match (fields.get("object").copied(), op) {
        (Some(f), Some(op)) => {
            expect_str(cx, "object", f, "\"unix:/run/app.sock\"").and_then(|s| {
                match ObjectPattern::parse(op, s) {
                    Ok(o) => Some(o),
                    Err(e) => {
                        let kind = if e.wrong_kind {
                            ErrorKind::ObjectKindForOp
                        } else {
                            ErrorKind::BadObject
                        };
                        cx.err(kind, f.value_at, e.message, e.hint);
                        None
                    }
                }
            })
        }
        (Some(f), None) => {
            expect_str(cx, "object", f, "\"unix:/run/app.sock\"");
            None
        }
        (None, _) => None,
    };

    let action = fields.get("action").copied().and_then(|f| {
        let s = expect_str(cx, "action", f, "\"allow\"")?;
        let a = Action::from_name(s);
        if a.is_none() {
            let hint = match closest(s, ["allow", "deny", "ask"]) {
                Some(c) => format!("did you mean `{c}`? action is one of allow, deny, ask"),
                None => "action is one of allow, deny, ask".to_string(),
            };
            cx.err(
                ErrorKind::BadAction,
                f.value_at,
                format!("unknown action `{s}`"),
                hint,
            );
        }
        a
    });

    // Missing required keys, reported at the rule's header.
    let mut required: Vec<(&str, String)> = vec![
        (
            "op",
            format!("add op = \"connect\" (one of {})", ops_list()),
        ),
        (
            "from",
            "add from = \"VM\" naming the VM that starts the interaction".into(),
        ),
        (
            "to",
            "add to = \"VM\" naming the VM that serves the object".into(),
        ),
        (
            "object",
            match op {
                Some(op) => format!("add object = ...; {}", op.object_forms()),
                None => "add object = \"...\" naming what the rule is about".into(),
            },
        ),
        (
            "action",
            "add action = \"allow\", \"deny\" or \"ask\"".into(),
        ),
    ];
    if op == Some(Op::Open) {
        required.push((
            "handler",
            "add handler = \"/usr/bin/xdg-open\" naming the program in the target VM that opens \
             the object"
                .into(),
        ));
    }
    for (key, hint) in required {
        if !fields.contains_key(key) && !suggested.contains(&key) {
            let message = match (key, op) {
                ("handler", Some(op)) => format!("{op} rule is missing required key `{key}`"),
                _ => format!("rule is missing required key `{key}`"),
            };
            cx.err(ErrorKind::MissingKey, header_at, message, hint);
        }
    }

    // Parameters.
    let params = op.and_then(|op| parse_params(cx, op, &fields, action, object.as_ref()));

    // Cross-field checks.
    let mut target = None;
    if let (Some(op), Some(from), Some(to)) = (op, &from, &to) {
        let to_at = fields.get("to").map_or(header_at, |f| f.value_at);
        if op.routes_to_target() {
            target = to.single_target();
            if target.is_none() {
                cx.err(
                    ErrorKind::BadSelector,
                    to_at,
                    format!("`to` of a {op} rule must name exactly one VM, not `{to}`"),
                    "the broker must know which VM serves the object: write one VM name or \
                     @host, and one rule per serving VM",
                );
            }
        }
        // A share into the host always appears under Shuttle's runtime directory
        // (`shares/VM/PATH`), never at a host path a rule names: a VM's files must not be
        // able to cover the host's own.
        if op == Op::Share && from.selectors().contains(&Selector::Host) {
            if let Some(f) = fields.get("at") {
                cx.err(
                    ErrorKind::BadParam,
                    f.value_at,
                    "`at` cannot be used with from = \"@host\": a share into the host appears \
                     under Shuttle's runtime directory, at shares/VM/PATH"
                        .into(),
                    "remove `at` (or write a separate rule for the VMs that use it)",
                );
            }
        }
        if op != Op::IpcGroup {
            let same = match (from.selectors(), to.selectors()) {
                ([Selector::Vm(a)], [Selector::Vm(b)]) if a == b => Some(a.to_string()),
                ([Selector::Host], [Selector::Host]) => Some("@host".to_string()),
                _ => None,
            };
            // An invoke rule from a VM to itself is the one intra-VM rule: it lets processes
            // of that VM start the program in it through `shuttle run` (a fresh child of the
            // VM's init), which must be granted as explicitly as any crossing. It runs the
            // VM's own program as its caller: the invocation parameters do not apply.
            if let (Op::Invoke, Some(a)) = (op, same.as_deref().filter(|a| *a != "@host")) {
                for key in ["files", "expose_dir", "env", "user", "file_options"] {
                    if let Some(f) = fields.get(key) {
                        cx.err(
                            ErrorKind::ParamNotForOp,
                            f.value_at,
                            format!(
                                "`{key}` does not apply to an invoke rule from VM {a} to itself: \
                                 `shuttle run` inside {a} runs {a}'s own program with the \
                                 caller's own names, environment and identity"
                            ),
                            "remove it (or route the program to another VM)",
                        );
                    }
                }
            } else if let Some(a) = same {
                cx.err(
                    ErrorKind::IntraVm,
                    to_at,
                    format!("`from` and `to` are both `{a}`: intra-VM traffic is never mediated"),
                    "remove this rule; applications inside one VM already interact directly",
                );
            }
        }
    }

    if cx.errors.len() != errors_before {
        return None;
    }
    Some(Rule {
        number,
        position: 0,
        source: cx.file.into(),
        name: name.map(Into::into),
        location: cx.loc(header_at),
        op: op?,
        from: from?,
        to: to?,
        target,
        object: object?,
        action: action?,
        params: params?,
    })
}

fn parse_params(
    cx: &mut Ctx<'_>,
    op: Op,
    fields: &HashMap<&str, Field<'_>>,
    action: Option<Action>,
    object: Option<&ObjectPattern>,
) -> Option<Params> {
    let errors_before = cx.errors.len();
    // Reject parameters this op does not take, in source order.
    let mut given: Vec<(&str, Field<'_>)> = fields
        .iter()
        .filter(|(k, _)| !COMMON_KEYS.contains(k))
        .map(|(k, f)| (*k, *f))
        .collect();
    given.sort_by_key(|(_, f)| f.value_at);
    for (key, f) in &given {
        if !op_takes(op, key) {
            let users: Vec<&str> = PARAM_KEYS
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, ops)| ops.iter().map(|o| o.as_str()).collect())
                .unwrap_or_default();
            let takes = op_params(op);
            let takes = if takes.is_empty() {
                format!("{op} rules take no parameters")
            } else {
                format!("{op} rules take: {}", takes.join(", "))
            };
            cx.err(
                ErrorKind::ParamNotForOp,
                f.value_at,
                format!("`{key}` is not a parameter of {op} rules"),
                format!("`{key}` applies to {} rules; {takes}", users.join(" and ")),
            );
        }
    }
    if cx.errors.len() != errors_before {
        return None;
    }
    let get = |k: &str| fields.get(k).copied();

    let timeout = match get("timeout") {
        None => None,
        Some(f) => {
            let s = expect_str(cx, "timeout", f, "\"30s\"")?;
            let Some(d) = parse_duration(s) else {
                cx.err(
                    ErrorKind::BadParam,
                    f.value_at,
                    format!("invalid timeout `{s}`"),
                    "write a positive number followed by ms, s, m or h, e.g. \"30s\"",
                );
                return None;
            };
            if action.is_some_and(|a| a != Action::Ask) {
                cx.err(
                    ErrorKind::BadParam,
                    f.value_at,
                    "`timeout` is only valid with action = \"ask\"".into(),
                    "remove `timeout`, or set action = \"ask\"",
                );
                return None;
            }
            Some(d)
        }
    };

    let op_params = match op {
        Op::Mq => OpParams::Mq,
        Op::IpcGroup => OpParams::IpcGroup,
        Op::Connect => OpParams::Connect {
            target: match get("target") {
                None => None,
                Some(f) => Some(parse_target(cx, f, object)?),
            },
        },
        Op::Share => {
            let mode = match get("mode") {
                None => ShareMode::Ro,
                Some(f) => match expect_str(cx, "mode", f, "\"ro\"")? {
                    "ro" => ShareMode::Ro,
                    "rw" => ShareMode::Rw,
                    other => {
                        cx.err(
                            ErrorKind::BadParam,
                            f.value_at,
                            format!("invalid share mode `{other}`"),
                            "mode is \"ro\" (read-only, the default) or \"rw\" (read-write)",
                        );
                        return None;
                    }
                },
            };
            let at = match get("at") {
                None => None,
                Some(f) => {
                    let s = expect_str(cx, "at", f, "\"/mnt/data\"")?;
                    if let Err(why) = check_abs_path(s) {
                        cx.err(
                            ErrorKind::BadParam,
                            f.value_at,
                            format!("mount point `{s}` {why}"),
                            "write an absolute, normalized path inside the receiving VM, e.g. \
                             \"/mnt/data\"",
                        );
                        return None;
                    }
                    Some(s.to_string())
                }
            };
            let exec = match get("exec") {
                None => None,
                Some(f) => match f.item.as_bool() {
                    Some(b) => Some(b),
                    None => {
                        cx.err(
                            ErrorKind::WrongType,
                            f.value_at,
                            format!("`exec` must be a boolean, found {}", f.item.type_name()),
                            "write exec = true or exec = false (unquoted)",
                        );
                        return None;
                    }
                },
            };
            OpParams::Share { mode, at, exec }
        }
        Op::Signal => OpParams::Signal {
            signals: match get("signals") {
                None => None,
                Some(f) => Some(parse_signals(cx, f)?),
            },
        },
        Op::Invoke => OpParams::Invoke(parse_invoke(cx, fields)?),
        Op::Open => {
            let invoke = parse_invoke(cx, fields);
            let handler = match get("handler") {
                None => None,
                Some(f) => {
                    let s = expect_str(cx, "handler", f, "\"/usr/bin/xdg-open\"")?;
                    if let Err(why) = check_abs_path(s) {
                        cx.err(
                            ErrorKind::BadParam,
                            f.value_at,
                            format!("handler `{s}` {why}"),
                            "write the absolute path of the program in the target VM, e.g. \
                             \"/usr/bin/xdg-open\"",
                        );
                        return None;
                    }
                    Some(s.to_string())
                }
            };
            OpParams::Open {
                invoke: invoke?,
                handler: handler?,
            }
        }
    };
    Some(Params {
        op: op_params,
        timeout,
    })
}

fn parse_target(cx: &mut Ctx<'_>, f: Field<'_>, object: Option<&ObjectPattern>) -> Option<String> {
    let s = expect_str(cx, "target", f, "\"unix:/run/other.sock\"")?;
    let t = match ObjectPattern::parse(Op::Connect, s) {
        Ok(t) => t,
        Err(e) => {
            cx.err(
                ErrorKind::BadParam,
                f.value_at,
                format!("invalid target: {}", e.message),
                e.hint,
            );
            return None;
        }
    };
    if t.is_glob() {
        cx.err(
            ErrorKind::BadParam,
            f.value_at,
            format!("target `{s}` contains wildcards"),
            "a target is one exact address, e.g. \"unix:/run/postgresql/.s.PGSQL.5432\"",
        );
        return None;
    }
    let object = object?;
    if object.is_glob() {
        cx.err(
            ErrorKind::BadParam,
            f.value_at,
            format!("`target` cannot translate the wildcard object `{object}`"),
            "give `target` only with one exact object; write one rule per address",
        );
        return None;
    }
    if !object.kind().same_family(t.kind()) {
        cx.err(
            ErrorKind::BadParam,
            f.value_at,
            format!("target `{s}` is not the same kind of address as object `{object}`"),
            "unix and abstract addresses translate to each other, tcp to tcp and udp to udp",
        );
        return None;
    }
    Some(s.to_string())
}

fn parse_signals(cx: &mut Ctx<'_>, f: Field<'_>) -> Option<SignalSet> {
    let Some(arr) = f.item.as_array() else {
        cx.err(
            ErrorKind::WrongType,
            f.value_at,
            format!(
                "`signals` must be an array of strings, found {}",
                f.item.type_name()
            ),
            "write signals = [\"TERM\", \"HUP\"]",
        );
        return None;
    };
    if arr.is_empty() {
        cx.err(
            ErrorKind::BadParam,
            f.value_at,
            "`signals` is an empty list".into(),
            "omit `signals` to cover every signal, or name at least one",
        );
        return None;
    }
    let mut set = SignalSet::default();
    let mut ok = true;
    for v in arr.iter() {
        let at = value_offset(v).unwrap_or(f.value_at);
        match v.as_str().map(|s| (s, Signal::from_name(s))) {
            Some((_, Some(sig))) => set.insert(sig),
            Some((s, None)) => {
                ok = false;
                cx.err(
                    ErrorKind::BadParam,
                    at,
                    format!("unknown signal `{s}`"),
                    "write upper-case signal names as listed by `kill -l`, e.g. \"TERM\" or \
                     \"HUP\"",
                );
            }
            None => {
                ok = false;
                cx.err(
                    ErrorKind::WrongType,
                    at,
                    format!(
                        "elements of `signals` must be strings, found {}",
                        v.type_name()
                    ),
                    "write signal names, e.g. \"TERM\"",
                );
            }
        }
    }
    ok.then_some(set)
}

fn parse_invoke(cx: &mut Ctx<'_>, fields: &HashMap<&str, Field<'_>>) -> Option<InvokeParams> {
    let mut p = InvokeParams::default();
    let mut ok = true;
    if let Some(f) = fields.get("files").copied() {
        match expect_str(cx, "files", f, "\"read-only\"") {
            Some("none") => p.files = FileAccess::None,
            Some("read-only") => p.files = FileAccess::ReadOnly,
            Some("read-write") => p.files = FileAccess::ReadWrite,
            Some(other) => {
                ok = false;
                cx.err(
                    ErrorKind::BadParam,
                    f.value_at,
                    format!("invalid files access `{other}`"),
                    "files is \"none\", \"read-only\" (the default) or \"read-write\"",
                );
            }
            None => ok = false,
        }
    }
    if let Some(f) = fields.get("expose_dir").copied() {
        match f.item.as_bool() {
            Some(b) => p.expose_dir = b,
            None => {
                ok = false;
                cx.err(
                    ErrorKind::WrongType,
                    f.value_at,
                    format!(
                        "`expose_dir` must be a boolean, found {}",
                        f.item.type_name()
                    ),
                    "write expose_dir = true or expose_dir = false (unquoted)",
                );
            }
        }
    }
    // Exposing the directory of file arguments that are not passed would do nothing: a rule
    // that says both is a mistake, not a preference.
    if let (true, FileAccess::None, Some(f)) = (p.expose_dir, p.files, fields.get("expose_dir")) {
        ok = false;
        cx.err(
            ErrorKind::BadParam,
            f.value_at,
            "`expose_dir = true` with `files = \"none\"`: no file argument is passed, so no \
             directory can be exposed"
                .into(),
            "remove expose_dir, or set files = \"read-only\" or \"read-write\"",
        );
    }
    if let Some(f) = fields.get("env").copied() {
        // Given, the list replaces the default one (`env = []` passes nothing).
        p.env.clear();
        match f.item.as_array() {
            Some(arr) => {
                for v in arr.iter() {
                    let at = value_offset(v).unwrap_or(f.value_at);
                    let valid = |s: &str| {
                        let name = s.strip_suffix('*').unwrap_or(s);
                        let mut c = name.chars();
                        c.next()
                            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                            && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
                    };
                    match v.as_str() {
                        Some(s) if valid(s) => p.env.push(s.to_string()),
                        Some(s) => {
                            ok = false;
                            cx.err(
                                ErrorKind::BadParam,
                                at,
                                format!("invalid environment variable name `{s}`"),
                                "names are letters, digits and '_', not starting with a digit, \
                                 e.g. \"LANG\"; a trailing '*' allows a prefix, e.g. \"LC_*\"",
                            );
                        }
                        None => {
                            ok = false;
                            cx.err(
                                ErrorKind::WrongType,
                                at,
                                format!(
                                    "elements of `env` must be strings, found {}",
                                    v.type_name()
                                ),
                                "write env = [\"LANG\", \"TZ\"]",
                            );
                        }
                    }
                }
            }
            None => {
                ok = false;
                cx.err(
                    ErrorKind::WrongType,
                    f.value_at,
                    format!(
                        "`env` must be an array of strings, found {}",
                        f.item.type_name()
                    ),
                    "write env = [\"LANG\", \"TZ\"]",
                );
            }
        }
    }
    if let Some(f) = fields.get("file_options").copied() {
        let hint = "write file_options = [\"-f\", \"-o\"]: each a dash and one letter or digit, \
                    an option whose glued value (-f./patterns) names a file";
        match f.item.as_array() {
            Some(arr) => {
                for v in arr.iter() {
                    let at = value_offset(v).unwrap_or(f.value_at);
                    match v.as_str() {
                        Some(s) if matches!(s.as_bytes(), [b'-', x] if x.is_ascii_alphanumeric()) => {
                            p.file_options.push(s.to_owned())
                        }
                        Some(s) => {
                            ok = false;
                            cx.err(
                                ErrorKind::BadParam,
                                at,
                                format!("invalid short option `{s}` in `file_options`"),
                                hint,
                            );
                        }
                        None => {
                            ok = false;
                            cx.err(
                                ErrorKind::WrongType,
                                at,
                                format!(
                                    "elements of `file_options` must be strings, found {}",
                                    v.type_name()
                                ),
                                hint,
                            );
                        }
                    }
                }
            }
            None => {
                ok = false;
                cx.err(
                    ErrorKind::WrongType,
                    f.value_at,
                    format!(
                        "`file_options` must be an array of strings, found {}",
                        f.item.type_name()
                    ),
                    hint,
                );
            }
        }
    }
    if let Some(f) = fields.get("user").copied() {
        match expect_str(cx, "user", f, "\"1000:1000\"") {
            Some(s) if valid_user(s) => p.user = Some(s.to_owned()),
            Some(s) => {
                ok = false;
                cx.err(
                    ErrorKind::BadParam,
                    f.value_at,
                    format!("invalid user `{s}`"),
                    "write a user name of the target VM, a UID, or UID:GID, e.g. \"www-data\" or \"1000:1000\"",
                );
            }
            None => ok = false,
        }
    }
    ok.then_some(p)
}

/// `NAME`, `UID` or `UID:GID` (a name as `useradd` accepts it).
fn valid_user(s: &str) -> bool {
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let numeric = |t: &str| !t.is_empty() && t.len() <= 10 && t.bytes().all(|b| b.is_ascii_digit());
    let name = |t: &str| {
        !t.is_empty()
            && t.len() <= 32
            && !t.starts_with('-')
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b) || b == b'$')
    };
    match group {
        Some(g) => numeric(user) && numeric(g),
        None => numeric(user) || name(user),
    }
}
