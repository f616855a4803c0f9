//! From TOML text to a validated [`Manifest`], collecting every error with its location.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{Document, Item, TableLike, Value};

use crate::error::{LineIndex, ManifestError, ManifestErrors};
use crate::manifest::{
    AppSpec, Component, DependencyRestart, FileCopy, Manifest, PolicySource, Probe, Restart,
    SetupStep, VmSpec,
};

const TOP_KEYS: &[&str] = &["name", "policy", "rule", "vm"];
const VM_KEYS: &[&str] = &[
    "base",
    "net",
    "memory",
    "pids",
    "hide",
    "tags",
    "files",
    "components",
    "app",
];
const COMPONENT_KEYS: &[&str] = &["from", "path", "at"];
const COMPONENT_HINT: &str = "write components = [{ from = \"db\", path = \"/usr/share/doc\", \
                              at = \"/opt/doc\" }] (from: a VM, or VM.APP to wait for that \
                              application; at: where it appears here, default the same path)";
const APP_KEYS: &[&str] = &[
    "command",
    "user",
    "workdir",
    "env",
    "restart",
    "ready",
    "ready_timeout",
    "stop_timeout",
    "requires",
    "on_dependency_restart",
    "setup",
];
const SETUP_KEYS: &[&str] = &["command", "user", "creates"];
/// An application and its `requires` entries with their positions (checked later).
type ParsedApp = (AppSpec, Vec<(String, usize)>);

/// A `components` entry as written, checked once every VM and application is known.
struct RawComponent {
    /// The consumer VM.
    vm: String,
    from: Option<(String, usize)>,
    path: Option<(String, usize)>,
    at: Option<(String, usize)>,
    entry_at: usize,
}

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

struct Ctx<'a> {
    file: &'a str,
    lines: LineIndex<'a>,
    errors: Vec<ManifestError>,
}

impl Ctx<'_> {
    fn err(&mut self, at: usize, message: impl Into<String>, hint: impl Into<String>) {
        self.errors.push(ManifestError {
            file: self.file.to_owned(),
            location: self.lines.location(at),
            message: message.into(),
            hint: hint.into(),
        });
    }
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

fn closest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let limit = if word.chars().count() <= 4 { 1 } else { 2 };
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// One key of a table: the item and where its value starts.
#[derive(Clone, Copy)]
struct Field<'a> {
    item: &'a Item,
    at: usize,
}

/// The keys of a table, each with its position; unknown keys reported.
struct Table<'a> {
    fields: Vec<(&'a str, Field<'a>)>,
    at: usize,
}

impl<'a> Table<'a> {
    fn read(cx: &mut Ctx<'_>, t: &'a dyn TableLike, at: usize, known: &[&str], what: &str) -> Self {
        let mut fields = Vec::new();
        for (key, item) in t.iter() {
            let key_at = t
                .get_key_value(key)
                .and_then(|(k, _)| k.span())
                .map_or(at, |s| s.start);
            if known.contains(&key) {
                let value_at = item.span().map_or(key_at, |s| s.start);
                fields.push((key, Field { item, at: value_at }));
            } else {
                let hint = match closest(key, known) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => format!("{what} takes {}", known.join(", ")),
                };
                cx.err(key_at, format!("unknown key `{key}` in {what}"), hint);
            }
        }
        Table { fields, at }
    }

    fn get(&self, key: &str) -> Option<Field<'a>> {
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, f)| *f)
    }

    fn str(&self, cx: &mut Ctx<'_>, key: &str, example: &str) -> Option<(&'a str, usize)> {
        let f = self.get(key)?;
        match f.item.as_str() {
            Some(s) => Some((s, f.at)),
            None => {
                cx.err(
                    f.at,
                    format!("`{key}` must be a string, found {}", f.item.type_name()),
                    format!("write {key} = {example}"),
                );
                None
            }
        }
    }

    fn strings(&self, cx: &mut Ctx<'_>, key: &str, example: &str) -> Vec<(String, usize)> {
        match self.get(key) {
            Some(f) => string_list(cx, key, f, example),
            None => Vec::new(),
        }
    }

    fn duration(&self, cx: &mut Ctx<'_>, key: &str, default: Duration) -> Duration {
        let Some((s, at)) = self.str(cx, key, "\"30s\"") else {
            return default;
        };
        match parse_duration(s) {
            Some(d) => d,
            None => {
                cx.err(
                    at,
                    format!("`{key}` is not a duration: {s:?}"),
                    "write a number and a unit: \"500ms\", \"30s\", \"2m\"",
                );
                default
            }
        }
    }
}

fn string_list(cx: &mut Ctx<'_>, key: &str, f: Field<'_>, example: &str) -> Vec<(String, usize)> {
    let Some(arr) = f.item.as_array() else {
        cx.err(
            f.at,
            format!(
                "`{key}` must be an array of strings, found {}",
                f.item.type_name()
            ),
            format!("write {key} = {example}"),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for v in arr.iter() {
        let at = v.span().map_or(f.at, |s| s.start);
        match v.as_str() {
            Some(s) => out.push((s.to_owned(), at)),
            None => cx.err(
                at,
                format!(
                    "elements of `{key}` must be strings, found {}",
                    v.type_name()
                ),
                "quote each element",
            ),
        }
    }
    out
}

fn parse_duration(text: &str) -> Option<Duration> {
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
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

/// Sub-tables of `item` (`[a.NAME]` or `a = { NAME = {...} }`), each with its position.
fn sub_tables<'a>(
    cx: &mut Ctx<'_>,
    item: &'a Item,
    at: usize,
    what: &str,
) -> Vec<(&'a str, &'a dyn TableLike, usize)> {
    let Some(t) = item.as_table_like() else {
        cx.err(
            at,
            format!("`{what}` must be a table, found {}", item.type_name()),
            format!("write [{what}.NAME] tables"),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, sub) in t.iter() {
        let name_at = t
            .get_key_value(name)
            .and_then(|(k, _)| k.span())
            .map_or(at, |s| s.start);
        match sub.as_table_like() {
            Some(st) => out.push((name, st, name_at)),
            None => cx.err(
                name_at,
                format!("`{what}.{name}` must be a table, found {}", sub.type_name()),
                format!("write a [{what}.{name}] table"),
            ),
        }
    }
    out
}

fn check_name(cx: &mut Ctx<'_>, name: &str, at: usize, what: &str) -> bool {
    let ok = shuttle_vm::config::validate_name(name).is_ok();
    if !ok {
        cx.err(
            at,
            format!("invalid {what} name `{name}`"),
            "use 1-63 lower-case letters, digits and '-', not starting with '-'",
        );
    }
    ok
}

fn command(cx: &mut Ctx<'_>, t: &Table<'_>, key: &str, required: bool) -> Vec<String> {
    let Some(f) = t.get(key) else {
        if required {
            cx.err(
                t.at,
                format!("missing `{key}`"),
                format!("write {key} = [\"program\", \"arg\", ...] (run without a shell)"),
            );
        }
        return Vec::new();
    };
    let argv: Vec<String> = string_list(cx, key, f, "[\"program\", \"arg\"]")
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    if argv.is_empty() && f.item.is_array() {
        cx.err(
            f.at,
            format!("`{key}` is empty"),
            "name at least the program to run",
        );
    }
    argv
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn parse_vm(
    cx: &mut Ctx<'_>,
    dir: &Path,
    name: &str,
    t: &dyn TableLike,
    at: usize,
    apps: &mut Vec<ParsedApp>,
    components: &mut Vec<RawComponent>,
) -> Option<VmSpec> {
    let name_ok = check_name(cx, name, at, "VM");
    let table = Table::read(cx, t, at, VM_KEYS, &format!("VM `{name}`"));
    let opt =
        |cx: &mut Ctx<'_>, key: &str, ex: &str| table.str(cx, key, ex).map(|(s, _)| s.to_owned());
    // A base directory may be given relative to the manifest.
    let base = opt(cx, "base", "\"host\"").map(|b| match b.as_str() {
        "host" => b,
        other => resolve(dir, other).display().to_string(),
    });
    let net = opt(cx, "net", "\"none\"");
    let memory = opt(cx, "memory", "\"512M\"");
    let pids = table.get("pids").and_then(|f| match f.item.as_integer() {
        Some(n) if n > 0 => u64::try_from(n).ok(),
        _ => {
            cx.err(
                f.at,
                "`pids` must be a positive integer",
                "write pids = 256",
            );
            None
        }
    });
    let hide = table
        .strings(cx, "hide", "[\"/home\"]")
        .into_iter()
        .map(|(s, _)| PathBuf::from(s))
        .collect();
    let tags = table
        .strings(cx, "tags", "[\"backend\"]")
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let mut files = Vec::new();
    if let Some(f) = table.get("files") {
        match f.item.as_table_like() {
            Some(ft) => {
                for (to, from) in ft.iter() {
                    let key_at = ft
                        .get_key_value(to)
                        .and_then(|(k, _)| k.span())
                        .map_or(f.at, |s| s.start);
                    if !to.starts_with('/') {
                        cx.err(
                            key_at,
                            format!("`{to}` is not an absolute path in the VM"),
                            "write \"/srv/app/app.py\" = \"app.py\" (VM path = host path)",
                        );
                        continue;
                    }
                    match from.as_str() {
                        Some(src) => {
                            let at = from.span().map_or(key_at, |s| s.start);
                            let from = resolve(dir, src);
                            if !from.is_file() {
                                cx.err(
                                    at,
                                    format!("`{}` is not a file", from.display()),
                                    "name a host file, relative to the manifest's directory",
                                );
                            }
                            files.push(FileCopy {
                                to: to.to_owned(),
                                from,
                            });
                        }
                        None => cx.err(
                            key_at,
                            format!("the source of `{to}` must be a string"),
                            "write \"/srv/app/app.py\" = \"app.py\"",
                        ),
                    }
                }
            }
            None => cx.err(
                f.at,
                "`files` must be a table of VM path = host path",
                "write files = { \"/srv/app/app.py\" = \"app.py\" }",
            ),
        }
    }
    if let Some(f) = table.get("components") {
        for (t, entry_at) in tables_of(cx, f, "components", COMPONENT_HINT) {
            let table = Table::read(cx, t, entry_at, COMPONENT_KEYS, "a component");
            let mut get =
                |key: &str, ex: &str| table.str(cx, key, ex).map(|(s, at)| (s.to_owned(), at));
            let from = get("from", "\"db\"");
            let path = get("path", "\"/usr/share/doc\"");
            let at_ = get("at", "\"/opt/doc\"");
            for (key, v) in [("from", &from), ("path", &path)] {
                if v.is_none() && table.get(key).is_none() {
                    cx.err(
                        entry_at,
                        format!("a component needs `{key}`"),
                        COMPONENT_HINT,
                    );
                }
            }
            components.push(RawComponent {
                vm: name.to_owned(),
                from,
                path,
                at: at_,
                entry_at,
            });
        }
    }
    let spec = VmSpec {
        name: name.to_owned(),
        base,
        net,
        memory,
        pids,
        hide,
        tags,
        files,
        components: Vec::new(),
        location: cx.lines.location(at),
    };
    if name_ok {
        // The same checks `shuttle vm create` makes.
        if let Err(e) = spec.options().validate(0) {
            cx.err(
                at,
                format!("VM `{name}`: {e}"),
                "fix the option (the same as shuttle vm create takes)",
            );
        }
    }
    if let Some(f) = table.get("app") {
        for (app, at_, app_at) in sub_tables(cx, f.item, f.at, &format!("vm.{name}.app")) {
            if let Some(a) = parse_app(cx, name, app, at_, app_at) {
                apps.push(a);
            }
        }
    }
    Some(spec)
}

fn parse_probe(cx: &mut Ctx<'_>, f: Field<'_>) -> Option<Probe> {
    const HINT: &str = "write ready = { socket = \"/run/app.sock\" }, { port = 8080 } or \
                        { command = [\"pg_isready\"] }";
    let Some(t) = f.item.as_table_like() else {
        cx.err(f.at, "`ready` must be a table", HINT);
        return None;
    };
    let table = Table::read(cx, t, f.at, &["socket", "port", "command"], "`ready`");
    if table.fields.len() != 1 {
        cx.err(
            f.at,
            "`ready` takes exactly one of socket, port or command",
            HINT,
        );
        return None;
    }
    let (key, field) = table.fields[0];
    match key {
        "socket" => {
            let (s, at) = table.str(cx, "socket", "\"/run/app.sock\"")?;
            if !s.starts_with('/') {
                cx.err(
                    at,
                    "the socket path must be absolute",
                    "write the path the application listens on inside its VM",
                );
                return None;
            }
            Some(Probe::Socket(s.to_owned()))
        }
        "port" => match field.item.as_integer().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p > 0 => Some(Probe::Port(p)),
            _ => {
                cx.err(
                    field.at,
                    "`port` must be a TCP port (1-65535)",
                    "write port = 8080",
                );
                None
            }
        },
        _ => {
            let argv = command(cx, &table, "command", true);
            (!argv.is_empty()).then_some(Probe::Command(argv))
        }
    }
}

/// The tables of an array of tables (`[[a.key]]` or `key = [{...}, ...]`), each with its
/// position; anything else is an error.
fn tables_of<'a>(
    cx: &mut Ctx<'_>,
    f: Field<'a>,
    key: &str,
    hint: &str,
) -> Vec<(&'a dyn TableLike, usize)> {
    let mut tables: Vec<(&dyn TableLike, usize)> = Vec::new();
    match f.item {
        Item::ArrayOfTables(aot) => {
            for t in aot.iter() {
                tables.push((t, t.span().map_or(f.at, |s| s.start)));
            }
        }
        Item::Value(Value::Array(arr)) => {
            for v in arr.iter() {
                let at = v.span().map_or(f.at, |s| s.start);
                match v.as_inline_table() {
                    Some(t) => tables.push((t, at)),
                    None => cx.err(at, format!("each element of `{key}` must be a table"), hint),
                }
            }
        }
        _ => cx.err(f.at, format!("`{key}` must be an array of tables"), hint),
    }
    tables
}

fn parse_setup(cx: &mut Ctx<'_>, f: Field<'_>) -> Vec<SetupStep> {
    const HINT: &str = "write setup = [{ command = [\"initdb\", \"-D\", \"/srv/data\"], user = \"postgres\", creates = \"/srv/data/PG_VERSION\" }]";
    let tables = tables_of(cx, f, "setup", HINT);
    let mut out = Vec::new();
    for (t, at) in tables {
        let table = Table::read(cx, t, at, SETUP_KEYS, "a setup step");
        let command = command(cx, &table, "command", true);
        let user = table
            .str(cx, "user", "\"postgres\"")
            .map(|(s, _)| s.to_owned());
        let creates = table
            .str(cx, "creates", "\"/srv/data/PG_VERSION\"")
            .map(|(s, _)| s.to_owned());
        out.push(SetupStep {
            command,
            user,
            creates,
        });
    }
    out
}

fn parse_app(
    cx: &mut Ctx<'_>,
    vm: &str,
    name: &str,
    t: &dyn TableLike,
    at: usize,
) -> Option<ParsedApp> {
    let name_ok = check_name(cx, name, at, "application");
    let table = Table::read(cx, t, at, APP_KEYS, &format!("application `{vm}.{name}`"));
    let command = command(cx, &table, "command", true);
    let user = table
        .str(cx, "user", "\"www-data\"")
        .map(|(s, _)| s.to_owned());
    let workdir = table
        .str(cx, "workdir", "\"/srv\"")
        .map(|(s, _)| s.to_owned());
    let mut env = Vec::new();
    if let Some(f) = table.get("env") {
        match f.item.as_table_like() {
            Some(et) => {
                for (k, v) in et.iter() {
                    match v.as_str() {
                        Some(v) if !k.is_empty() && !k.contains('=') => {
                            env.push((k.to_owned(), v.to_owned()));
                        }
                        _ => cx.err(
                            v.span().map_or(f.at, |s| s.start),
                            format!("environment variable `{k}` must be a string"),
                            "write env = { LANG = \"C.UTF-8\" }",
                        ),
                    }
                }
            }
            None => cx.err(
                f.at,
                "`env` must be a table",
                "write env = { LANG = \"C.UTF-8\" }",
            ),
        }
    }
    let restart = match table.str(cx, "restart", "\"on-failure\"") {
        None => Restart::OnFailure,
        Some(("no", _)) => Restart::No,
        Some(("on-failure", _)) => Restart::OnFailure,
        Some(("always", _)) => Restart::Always,
        Some((other, at)) => {
            cx.err(
                at,
                format!("unknown restart policy `{other}`"),
                "write restart = \"no\", \"on-failure\" (the default) or \"always\"",
            );
            Restart::OnFailure
        }
    };
    let on_dependency_restart = match table.str(cx, "on_dependency_restart", "\"restart\"") {
        None | Some(("ignore", _)) => DependencyRestart::Ignore,
        Some(("restart", _)) => DependencyRestart::Restart,
        Some((other, at)) => match other
            .strip_prefix("signal:")
            .and_then(shuttle_policy::Signal::from_name)
        {
            Some(sig) => DependencyRestart::Signal(sig.number()),
            None => {
                cx.err(
                    at,
                    format!("unknown on_dependency_restart `{other}`"),
                    "write \"ignore\" (the default: keep running), \"restart\" or \"signal:NAME\" \
                     (such as \"signal:HUP\": sent once the dependency is ready again)",
                );
                DependencyRestart::Ignore
            }
        },
    };
    let ready = table.get("ready").and_then(|f| parse_probe(cx, f));
    let ready_timeout = table.duration(cx, "ready_timeout", DEFAULT_READY_TIMEOUT);
    let stop_timeout = table.duration(cx, "stop_timeout", DEFAULT_STOP_TIMEOUT);
    let requires = table.strings(cx, "requires", "[\"db.postgres\"]");
    let setup = table
        .get("setup")
        .map(|f| parse_setup(cx, f))
        .unwrap_or_default();
    if !name_ok {
        return None;
    }
    Some((
        AppSpec {
            vm: vm.to_owned(),
            name: name.to_owned(),
            command,
            user,
            workdir,
            env,
            restart,
            ready,
            ready_timeout,
            stop_timeout,
            requires: Vec::new(),
            on_dependency_restart,
            setup,
            location: cx.lines.location(at),
        },
        requires,
    ))
}

/// The manifest's own `[[rule]]` tables as a policy. Everything else of the manifest is
/// blanked out (newlines kept), so that the policy parser's locations are the manifest's own
/// and its errors can be reported as they are.
fn inline_policy(cx: &mut Ctx<'_>, text: &str, dir: &Path, f: Field<'_>) -> Option<PolicySource> {
    let Item::ArrayOfTables(rules) = f.item else {
        cx.err(
            f.at,
            format!(
                "`rule` must be an array of tables, found {}",
                f.item.type_name()
            ),
            "write each rule as a `[[rule]]` table (the syntax of a policy file)",
        );
        return None;
    };
    let mut keep: Vec<std::ops::Range<usize>> = Vec::new();
    for t in rules.iter() {
        if let Some(span) = t.span() {
            keep.push(span);
        }
        for (key, item) in t.iter() {
            let start = t.get_key_value(key).and_then(|(k, _)| k.span());
            if let (Some(start), Some(end)) = (start, item.span()) {
                keep.push(start.start..end.end);
            }
        }
    }
    let masked: String = text
        .char_indices()
        .map(|(i, c)| {
            if c == '\n' || keep.iter().any(|r| r.contains(&i)) {
                c
            } else {
                ' '
            }
        })
        .collect();
    let file = cx.file.to_owned();
    if let Err(errors) = shuttle_policy::Policy::parse(&file, &masked) {
        cx.errors
            .extend(errors.into_iter().map(ManifestError::from));
        return None;
    }
    let name = Path::new(&file)
        .file_name()
        .map_or_else(|| PathBuf::from("system.toml"), PathBuf::from);
    Some(PolicySource {
        path: dir.join(name),
        text: masked,
        inline: true,
    })
}

pub(crate) fn parse(file: &str, text: &str) -> Result<Manifest, ManifestErrors> {
    let mut cx = Ctx {
        file,
        lines: LineIndex::new(text),
        errors: Vec::new(),
    };
    let doc = match Document::parse(text) {
        Ok(d) => d,
        Err(e) => {
            let at = e.span().map_or(0, |s| s.start);
            let msg = e
                .message()
                .trim()
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            cx.err(
                at,
                format!("invalid TOML: {msg}"),
                "check the quoting, brackets and `key = value` syntax at this position",
            );
            return Err(shuttle_policy::Diagnostics(cx.errors));
        }
    };
    let dir = Path::new(file)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    // Absolute, so that paths resolved beside the manifest stay valid from anywhere.
    let dir = dir.canonicalize().unwrap_or(dir);
    let root = Table::read(&mut cx, doc.as_table(), 0, TOP_KEYS, "a manifest");
    let name = match root.str(&mut cx, "name", "\"shop\"") {
        Some((n, at)) => {
            check_name(&mut cx, n, at, "system");
            n.to_owned()
        }
        None => {
            let base = dir
                .canonicalize()
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "system".to_owned());
            let cleaned: String = base
                .to_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            cleaned.trim_matches('-').to_owned()
        }
    };
    let policy = root
        .str(&mut cx, "policy", "\"policy.toml\"")
        .and_then(|(p, at)| {
            let path = resolve(&dir, p);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    if let Err(errors) =
                        shuttle_policy::Policy::parse(&path.display().to_string(), &text)
                    {
                        cx.err(
                            at,
                            format!("the policy {} has errors:\n{errors}", path.display()),
                            "fix the policy file (shuttle policy check FILE shows the same errors)",
                        );
                    }
                    Some(PolicySource {
                        path,
                        text,
                        inline: false,
                    })
                }
                Err(e) => {
                    cx.err(
                        at,
                        format!("cannot read the policy {}: {e}", path.display()),
                        "name a policy file, relative to the manifest's directory",
                    );
                    None
                }
            }
        });
    let policy_key = root.get("policy").is_some();
    let policy = match (policy, root.get("rule")) {
        (policy, None) => policy,
        (_, Some(f)) if policy_key => {
            cx.err(
                f.at,
                "the manifest has both `policy = FILE` and `[[rule]]` tables",
                "keep the rules in one place: in the policy file, or here",
            );
            None
        }
        (_, Some(f)) => inline_policy(&mut cx, text, &dir, f),
    };
    let mut vms = Vec::new();
    let mut apps: Vec<ParsedApp> = Vec::new();
    let mut raw_components = Vec::new();
    match root.get("vm") {
        Some(f) => {
            for (vm, t, at) in sub_tables(&mut cx, f.item, f.at, "vm") {
                if let Some(spec) =
                    parse_vm(&mut cx, &dir, vm, t, at, &mut apps, &mut raw_components)
                {
                    vms.push(spec);
                }
            }
        }
        None => cx.err(
            0,
            "the manifest declares no VM",
            "declare at least one: [vm.NAME] with [vm.NAME.app.APP] tables",
        ),
    }
    if !vms.is_empty() && apps.is_empty() && cx.errors.is_empty() {
        cx.err(
            0,
            "the manifest declares no application",
            "declare one with [vm.NAME.app.APP] and command = [...]",
        );
    }

    // Components: checked against the declared VMs and applications; an application of a
    // consumer VM starts after the providing application it names (an ordering edge like a
    // `requires`, at the component's `from`).
    let components = check_components(&mut cx, &mut vms, &apps, raw_components);
    let mut component_edges: Vec<Vec<(String, usize)>> = vec![Vec::new(); apps.len()];
    for (i, (app, _)) in apps.iter().enumerate() {
        for (c, from_at) in components.iter().filter(|(c, _)| c.0 == app.vm) {
            if let Some(provider) = &c.1.app {
                component_edges[i].push((provider.clone(), *from_at));
            }
        }
    }
    let components_policy = components_policy(&cx, &vms);

    // Dependencies: each must name a declared application; then the order, or the cycle.
    let index: HashMap<String, usize> = apps
        .iter()
        .enumerate()
        .map(|(i, (a, _))| (a.id(), i))
        .collect();
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); apps.len()];
    for (i, edges) in component_edges.iter().enumerate() {
        for (provider, _) in edges {
            if let Some(&j) = index.get(provider) {
                if !deps[i].contains(&j) {
                    deps[i].push(j);
                }
            }
        }
    }
    for (i, (app, requires)) in apps.iter().enumerate() {
        for (r, at) in requires {
            match index.get(r) {
                Some(&j) if j == i => cx.err(
                    *at,
                    format!("`{}` requires itself", app.id()),
                    "remove it from its own `requires`",
                ),
                Some(&j) => {
                    if !deps[i].contains(&j) {
                        deps[i].push(j);
                    }
                }
                None => {
                    let ids: Vec<&str> = index.keys().map(String::as_str).collect();
                    let hint = match closest(r, &ids) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None if !r.contains('.') => {
                            "name it as VM.APP, such as \"db.postgres\"".to_owned()
                        }
                        None => {
                            let mut ids = ids;
                            ids.sort_unstable();
                            format!("declared applications: {}", ids.join(", "))
                        }
                    };
                    cx.err(
                        *at,
                        format!(
                            "`{}` requires `{r}`, which the manifest does not declare",
                            app.id()
                        ),
                        hint,
                    );
                }
            }
        }
    }
    let order = match crate::order::start_order(&deps) {
        Ok(o) => o,
        Err(cycle) => {
            let path: Vec<String> = cycle.iter().map(|&i| apps[i].0.id()).collect();
            // Point at the `requires` entry that closes the cycle.
            let (last, first) = (cycle[cycle.len() - 2], cycle[cycle.len() - 1]);
            let first_id = apps[first].0.id();
            let at = apps[last]
                .1
                .iter()
                .chain(&component_edges[last])
                .find(|(r, _)| *r == first_id)
                .map_or(0, |(_, at)| *at);
            cx.err(
                at,
                format!("dependency cycle: {}", path.join(" -> ")),
                "applications cannot start before each other: remove one of these requirements \
                 (or components)",
            );
            Vec::new()
        }
    };
    if cx.errors.is_empty() {
        if let Some(text) = &components_policy {
            check_components_with_policy(&mut cx, policy.as_ref(), text, &components);
        }
    }
    if !cx.errors.is_empty() {
        cx.errors.sort_by_key(|e| e.location);
        return Err(shuttle_policy::Diagnostics(cx.errors));
    }
    let mut ordered: Vec<Option<ParsedApp>> = apps.into_iter().map(Some).collect();
    let apps = order
        .into_iter()
        .filter_map(|i| ordered[i].take())
        .map(|(mut app, requires)| {
            app.requires = requires.into_iter().map(|(r, _)| r).collect();
            app.requires.dedup();
            app
        })
        .collect();
    Ok(Manifest {
        name,
        file: file.to_owned(),
        vms,
        apps,
        policy,
        components_policy,
    })
}

/// Checks the `components` entries against the declared VMs and applications, and fills in
/// each VM's components. Returns every valid one as (consumer VM, component) with the
/// position of its `from`.
fn check_components(
    cx: &mut Ctx<'_>,
    vms: &mut [VmSpec],
    apps: &[ParsedApp],
    raw: Vec<RawComponent>,
) -> Vec<((String, Component), usize)> {
    let vm_names: Vec<String> = vms.iter().map(|v| v.name.clone()).collect();
    let app_ids: Vec<String> = apps.iter().map(|(a, _)| a.id()).collect();
    let mut out: Vec<((String, Component), usize)> = Vec::new();
    for r in raw {
        let (Some((from, from_at)), Some((path, path_at))) = (r.from, r.path) else {
            continue;
        };
        let mut ok = true;
        let (vm, app) = match from.split_once('.') {
            Some((vm, _)) => (vm.to_owned(), Some(from.clone())),
            None => (from.clone(), None),
        };
        if vm == r.vm {
            cx.err(
                from_at,
                format!("VM `{}` takes a component from itself", r.vm),
                "a component comes from another VM of the system: name that VM (or VM.APP)",
            );
            ok = false;
        } else if !vm_names.contains(&vm) {
            let names: Vec<&str> = vm_names.iter().map(String::as_str).collect();
            let hint = match closest(&vm, &names) {
                Some(c) => format!("did you mean `{c}`?"),
                None => format!("declared VMs: {}", names.join(", ")),
            };
            cx.err(
                from_at,
                format!("component from VM `{vm}`, which the manifest does not declare"),
                hint,
            );
            ok = false;
        } else if let Some(app) = &app {
            if !app_ids.contains(app) {
                let ids: Vec<&str> = app_ids.iter().map(String::as_str).collect();
                let hint = match closest(app, &ids) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => format!(
                        "name a declared application as VM.APP, or just the VM `{vm}` (then \
                         nothing waits for an application)"
                    ),
                };
                cx.err(
                    from_at,
                    format!(
                        "component from application `{app}`, which the manifest does not declare"
                    ),
                    hint,
                );
                ok = false;
            }
        }
        let check_path = |cx: &mut Ctx<'_>, p: &str, at: usize, what: &str| {
            if let Err(why) = shuttle_policy::check_abs_path(p) {
                cx.err(
                    at,
                    format!("component {what} `{p}` {why}"),
                    "write an absolute, normalized path such as \"/usr/share/doc\"",
                );
                false
            } else if !shuttle_vm::share::usable(p) {
                cx.err(
                    at,
                    format!("component {what} `{p}` cannot be shared"),
                    "/, /proc, /sys, /run/shuttle and /shuttle (and what is beneath or above \
                     them) are never shared: name a directory of its own",
                );
                false
            } else {
                true
            }
        };
        ok &= check_path(cx, &path, path_at, "path");
        let (at, at_at) = r.at.unwrap_or_else(|| (path.clone(), path_at));
        ok &= at == path || check_path(cx, &at, at_at, "mount point `at`");
        if !ok {
            continue;
        }
        // One mount per mount point, none inside another (it would be made in a read-only
        // directory of the provider), and a path comes into a VM once (share rules route a
        // path to one provider per VM: a second rule for it could never apply).
        let inside = |a: &str, b: &str| {
            a.strip_prefix(b)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        let clash = out.iter().find_map(|((consumer, c), _)| {
            if *consumer != r.vm {
                None
            } else if c.at == at {
                Some((
                    at_at,
                    format!(
                        "`{at}` in VM `{}` already holds a component (at {})",
                        r.vm, c.location
                    ),
                    "give each component its own `at`",
                ))
            } else if inside(&at, &c.at) || inside(&c.at, &at) {
                Some((
                    at_at,
                    format!(
                        "`{at}` and `{}` (at {}) are inside one another in VM `{}`",
                        c.at, c.location, r.vm
                    ),
                    "mount components side by side, such as /opt/a and /opt/b",
                ))
            } else if c.path == path {
                Some((
                    path_at,
                    format!(
                        "VM `{}` already takes `{path}` from VM `{}` (at {})",
                        r.vm, c.vm, c.location
                    ),
                    "a path comes into a VM once: take its parent directory, or drop one entry",
                ))
            } else {
                None
            }
        });
        if let Some((pos, message, hint)) = clash {
            cx.err(pos, message, hint);
            continue;
        }
        let component = Component {
            vm,
            app,
            path,
            at,
            location: cx.lines.location(r.entry_at),
        };
        if let Some(v) = vms.iter_mut().find(|v| v.name == r.vm) {
            v.components.push(component.clone());
        }
        out.push(((r.vm, component), from_at));
    }
    out
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `share` rules the components become, one per component, read-only, each under a
/// comment naming its entry in the manifest.
fn components_policy(cx: &Ctx<'_>, vms: &[VmSpec]) -> Option<String> {
    let q = toml_string;
    let mut text = String::new();
    for v in vms {
        for c in &v.components {
            let after = c
                .app
                .as_ref()
                .map(|a| format!(", after {a} is ready"))
                .unwrap_or_default();
            text.push_str(&format!(
                "# VM {} takes {}:{} at {} ({}:{}{after})\n[[rule]]\nop = \"share\"\nfrom = {}\nto = {}\nobject = {}\n",
                v.name,
                c.vm,
                c.path,
                c.at,
                cx.file,
                c.location,
                q(&v.name),
                q(&c.vm),
                q(&c.path),
            ));
            if c.at != c.path {
                text.push_str(&format!("at = {}\n", q(&c.at)));
            }
            text.push_str("mode = \"ro\"\naction = \"allow\"\n\n");
        }
    }
    (!text.is_empty()).then_some(text)
}

/// The name `up` gives the components' rules (a file it writes beside the system's state).
const COMPONENTS_SOURCE: &str = "components.toml";

/// Checks the components' rules after the system's own (as the active policy will hold
/// them): a rule of the system's that already decides a component's share makes it useless.
/// Errors are reported at the component's entry.
fn check_components_with_policy(
    cx: &mut Ctx<'_>,
    policy: Option<&PolicySource>,
    text: &str,
    components: &[((String, Component), usize)],
) {
    let mut parts: Vec<(String, &str)> = Vec::new();
    if let Some(p) = policy {
        parts.push((p.path.display().to_string(), p.text.as_str()));
    }
    parts.push((COMPONENTS_SOURCE.to_owned(), text));
    let pairs: Vec<(&str, &str)> = parts.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let Err(errors) = shuttle_policy::Policy::parse_layered(&pairs) else {
        return;
    };
    for e in errors {
        if e.file != COMPONENTS_SOURCE {
            continue;
        }
        // The k-th rule of the generated text is the k-th component (in VM order, as
        // `components_policy` wrote them).
        let k = text[..]
            .lines()
            .take(e.location.line as usize)
            .filter(|l| *l == "[[rule]]")
            .count();
        let Some(((_, c), _)) = components.get(k.saturating_sub(1)) else {
            continue;
        };
        let message = e.message.replace("rule #", "the share rule #");
        cx.errors.push(ManifestError {
            file: cx.file.to_owned(),
            location: c.location,
            message: format!("component {}:{} at {}: {message}", c.vm, c.path, c.at),
            hint: "the system's own rules already decide this share: remove that rule, \
                   or this component"
                .to_owned(),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse("sys/system.toml", text) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const SHOP: &str = r#"
name = "shop"

[vm.db]
memory = "512M"
pids = 256
tags = ["data"]

[vm.db.app.postgres]
command = ["postgres", "-D", "/srv/pgdata"]
user = "postgres"
ready = { socket = "/run/postgresql/.s.PGSQL.5432" }
ready_timeout = "20s"
setup = [{ command = ["initdb", "-D", "/srv/pgdata"], user = "postgres", creates = "/srv/pgdata/PG_VERSION" }]

[vm.shop.app.web]
command = ["python3", "/srv/shop.py"]
user = "www-data"
env = { LANG = "C.UTF-8" }
restart = "always"
requires = ["db.postgres"]
on_dependency_restart = "restart"
ready = { port = 8080 }

[vm.shop.app.worker]
command = ["python3", "/srv/worker.py"]
requires = ["shop.web", "db.postgres"]
restart = "no"
on_dependency_restart = "signal:HUP"
"#;

    #[test]
    fn a_full_manifest_parses() {
        let m = parse("sys/system.toml", SHOP).unwrap();
        assert_eq!(m.name, "shop");
        assert_eq!(m.vms.len(), 2);
        assert_eq!(m.vms[0].memory.as_deref(), Some("512M"));
        assert_eq!(m.vms[0].pids, Some(256));
        assert_eq!(m.vms[0].tags, ["data"]);
        let pg = m.app("db.postgres").unwrap();
        assert_eq!(pg.user.as_deref(), Some("postgres"));
        assert_eq!(
            pg.ready,
            Some(Probe::Socket("/run/postgresql/.s.PGSQL.5432".into()))
        );
        assert_eq!(pg.ready_timeout, Duration::from_secs(20));
        assert_eq!(pg.restart, Restart::OnFailure);
        assert_eq!(pg.setup.len(), 1);
        assert_eq!(
            pg.setup[0].creates.as_deref(),
            Some("/srv/pgdata/PG_VERSION")
        );
        let web = m.app("shop.web").unwrap();
        assert_eq!(web.restart, Restart::Always);
        assert_eq!(web.ready, Some(Probe::Port(8080)));
        assert_eq!(web.env, [("LANG".to_owned(), "C.UTF-8".to_owned())]);
        assert_eq!(web.on_dependency_restart, DependencyRestart::Restart);
        assert_eq!(m.dependents("db.postgres").len(), 2);
        let worker = m.app("shop.worker").unwrap();
        assert_eq!(worker.on_dependency_restart, DependencyRestart::Signal(1));
    }

    #[test]
    fn apps_start_after_what_they_require() {
        let text = r#"
[vm.a.app.last]
command = ["x"]
requires = ["b.middle"]
[vm.b.app.middle]
command = ["x"]
requires = ["c.first"]
[vm.c.app.first]
command = ["x"]
[vm.c.app.alone]
command = ["x"]
"#;
        let m = parse("s.toml", text).unwrap();
        let order: Vec<String> = m.start_order().iter().map(AppSpec::id).collect();
        assert_eq!(order, ["c.first", "b.middle", "a.last", "c.alone"]);
    }

    #[test]
    fn cycles_are_errors_at_the_requirement_that_closes_them() {
        let text = "[vm.a.app.x]\ncommand = [\"x\"]\nrequires = [\"b.y\"]\n\n[vm.b.app.y]\ncommand = [\"y\"]\nrequires = [\"a.x\"]\n";
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("sys/system.toml:7:13: error: dependency cycle: a.x -> b.y -> a.x"),
            "{}",
            e[0]
        );
        assert!(e[0].contains("hint:"));
    }

    #[test]
    fn undeclared_dependencies_are_errors_with_a_suggestion() {
        let text = "[vm.db.app.postgres]\ncommand = [\"pg\"]\n[vm.web.app.shop]\ncommand = [\"x\"]\nrequires = [\"db.postgre\"]\n";
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("sys/system.toml:5:13: error: `web.shop` requires `db.postgre`"),
            "{}",
            e[0]
        );
        assert!(e[0].contains("did you mean `db.postgres`?"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_all_reported() {
        let text = "[vm.db]\nmemroy = \"1G\"\n[vm.db.app.pg]\ncommand = \"postgres\"\nrestart = \"sometimes\"\nready = { socket = \"/a\", port = 1 }\nready_timeout = \"soon\"\n";
        let e = errors(text);
        assert_eq!(e.len(), 5, "{e:#?}");
        assert!(
            e[0].contains("2:1: error: unknown key `memroy`")
                && e[0].contains("did you mean `memory`?")
        );
        assert!(e[1].contains("4:11: error: `command` must be an array of strings"));
        assert!(e[2].contains("5:11: error: unknown restart policy `sometimes`"));
        assert!(e[3].contains("6:9: error: `ready` takes exactly one of"));
        assert!(e[4].contains("7:17: error: `ready_timeout` is not a duration"));
    }

    #[test]
    fn vm_options_are_checked_as_vm_create_does() {
        let e = errors("[vm.db]\nmemory = \"lots\"\n[vm.db.app.x]\ncommand = [\"x\"]\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("sys/system.toml:1:5: error: VM `db`:"),
            "{}",
            e[0]
        );
        let e = errors("[vm.Bad_Name.app.x]\ncommand = [\"x\"]\n");
        assert!(e[0].contains("invalid VM name `Bad_Name`"), "{e:?}");
    }

    #[test]
    fn syntax_errors_have_a_location() {
        let e = errors("[vm.db\ncommand = 1\n");
        assert!(e[0].starts_with("sys/system.toml:1:"), "{e:?}");
        assert!(e[0].contains("invalid TOML"));
    }

    #[test]
    fn a_missing_policy_file_is_an_error_at_its_key() {
        let e = errors("policy = \"nope.toml\"\n[vm.a.app.x]\ncommand = [\"x\"]\n");
        assert!(
            e[0].starts_with("sys/system.toml:1:10: error: cannot read the policy"),
            "{e:?}"
        );
    }

    #[test]
    fn copied_files_and_the_policy_are_found_beside_the_manifest() {
        let dir = std::env::temp_dir().join(format!("shuttle-system-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("app.py"), "print(1)\n").unwrap();
        std::fs::write(
            dir.join("policy.toml"),
            "[[rule]]\nop = \"connect\"\nfrom = \"a\"\nto = \"b\"\nobject = \"tcp:80\"\naction = \"allow\"\n",
        )
        .unwrap();
        let file = dir.join("system.toml");
        let text = "policy = \"policy.toml\"\n[vm.a]\nfiles = { \"/srv/app.py\" = \"app.py\" }\n[vm.a.app.x]\ncommand = [\"python3\", \"/srv/app.py\"]\n";
        let m = parse(&file.display().to_string(), text).unwrap();
        assert_eq!(m.vms[0].files[0].to, "/srv/app.py");
        assert_eq!(m.vms[0].files[0].from, dir.join("app.py"));
        assert_eq!(m.policy.as_ref().unwrap().path, dir.join("policy.toml"));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let m = parse(
            &file.display().to_string(),
            "[vm.a]\nbase = \"rootfs\"\n[vm.a.app.x]\ncommand = [\"x\"]\n",
        )
        .unwrap();
        assert_eq!(
            m.vms[0].base,
            Some(dir.join("rootfs").display().to_string())
        );
        let bad = "[vm.a]\nfiles = { \"/srv/app.py\" = \"nope.py\", \"rel\" = \"app.py\" }\n[vm.a.app.x]\ncommand = [\"x\"]\n";
        let e = parse(&file.display().to_string(), bad).unwrap_err();
        let e: Vec<String> = e.0.iter().map(ToString::to_string).collect();
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(
            e[0].contains(":2:27: error: ") && e[0].contains("nope.py` is not a file"),
            "{e:?}"
        );
        assert!(
            e[1].contains(":2:38: error: `rel` is not an absolute path in the VM"),
            "{e:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_policy_is_an_error_of_the_manifest() {
        let dir = std::env::temp_dir().join(format!("shuttle-system-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.toml"), "[[rule]]\nop = \"conect\"\n").unwrap();
        let file = dir.join("s.toml").display().to_string();
        let e = parse(
            &file,
            "policy = \"p.toml\"\n[vm.a.app.x]\ncommand = [\"x\"]\n",
        )
        .unwrap_err();
        let e = e.to_string();
        assert!(e.contains("s.toml:1:10: error: the policy"), "{e}");
        assert!(e.contains("p.toml:2:6: error: unknown op `conect`"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rules_may_live_in_the_manifest_with_errors_at_their_own_lines() {
        let text = "name = \"x\"\n[vm.a.app.x]\ncommand = [\"x\"]\n\n[[rule]]\nname = \"a-b\"\nop = \"connect\"\nfrom = \"a\"\nto = \"b\"  # the server\nobject = \"tcp:80\"\naction = \"allow\"\n\n[vm.b.app.y]\ncommand = [\"y\"]\n";
        let m = parse("dir/s.toml", text).unwrap();
        let p = m.policy.unwrap();
        assert!(p.inline);
        let policy = shuttle_policy::Policy::parse("s.toml", &p.text).unwrap();
        assert_eq!(policy.len(), 1);
        assert_eq!(policy.rules()[0].location().line, 5);
        assert_eq!(p.text.lines().count(), text.lines().count());
        assert!(!p.text.contains("vm."), "{}", p.text);
        let bad = text.replace("op = \"connect\"", "op = \"conect\"");
        let e = errors(&bad);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("sys/system.toml:7:6: error: unknown op `conect`"),
            "{e:?}"
        );
        let both = format!("policy = \"p.toml\"\n{text}");
        assert!(errors(&both)
            .iter()
            .any(|e| e.contains("both `policy = FILE` and `[[rule]]`")));
    }

    const COMPONENTS: &str = r#"
[vm.build.app.make]
command = ["make"]

[vm.web]
components = [
  { from = "build.make", path = "/srv/site", at = "/var/www" },
  { from = "build", path = "/usr/share/doc" },
]

[vm.web.app.server]
command = ["python3", "-m", "http.server"]

[vm.db.app.pg]
command = ["pg"]
"#;

    #[test]
    fn components_become_read_only_share_rules_and_order_the_consumers() {
        let m = parse("sys/system.toml", COMPONENTS).unwrap();
        let web = m.vm("web").unwrap();
        assert_eq!(web.components.len(), 2);
        let c = &web.components[0];
        assert_eq!(
            (
                c.vm.as_str(),
                c.app.as_deref(),
                c.path.as_str(),
                c.at.as_str()
            ),
            ("build", Some("build.make"), "/srv/site", "/var/www")
        );
        assert_eq!(c.location, crate::Location { line: 7, column: 3 });
        assert_eq!(web.components[1].at, "/usr/share/doc");
        // web.server starts after build.make, which it names; declaration order otherwise.
        let order: Vec<String> = m.start_order().iter().map(AppSpec::id).collect();
        assert_eq!(order, ["build.make", "web.server", "db.pg"]);
        assert!(m.app("web.server").unwrap().requires.is_empty());
        let text = m.components_policy.unwrap();
        assert!(text.contains("# VM web takes build:/srv/site at /var/www (sys/system.toml:7:3, after build.make is ready)"), "{text}");
        let p = shuttle_policy::Policy::parse("c.toml", &text).unwrap();
        assert_eq!(p.len(), 2);
        let web = shuttle_policy::VmIdentity::vm("web", &[]);
        let req = shuttle_policy::Request::new(shuttle_policy::Op::Share, web, "/srv/site");
        let (d, target) = p.route(&req).unwrap();
        assert!(d.is_allowed());
        assert_eq!(target.map(ToString::to_string).as_deref(), Some("build"));
        match &d.rule.unwrap().params().op {
            shuttle_policy::OpParams::Share { mode, at, exec } => {
                assert_eq!(*mode, shuttle_policy::ShareMode::Ro);
                assert_eq!(at.as_deref(), Some("/var/www"));
                assert_ne!(*exec, Some(true), "a component is never executable");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_components_are_errors_at_their_keys() {
        let bad = COMPONENTS
            .replace("from = \"build\", path", "from = \"biuld\", path")
            .replace("at = \"/var/www\"", "at = \"var/www\"");
        let e = errors(&bad);
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(
            e[0].starts_with(
                "sys/system.toml:7:51: error: component mount point `at` `var/www` is not absolute"
            ),
            "{e:?}"
        );
        assert!(e[1].starts_with("sys/system.toml:8:12: error: component from VM `biuld`, which the manifest does not declare"), "{e:?}");
        assert!(e[1].contains("did you mean `build`?"), "{e:?}");
        let dup = COMPONENTS.replace(
            "{ from = \"build\", path = \"/usr/share/doc\" }",
            "{ from = \"build\", path = \"/usr/share/doc\", at = \"/var/www\" }",
        );
        let e = errors(&dup);
        assert!(e[0].starts_with("sys/system.toml:8:51: error: `/var/www` in VM `web` already holds a component (at 7:3)"), "{e:?}");
        let nested = COMPONENTS.replace(
            "path = \"/usr/share/doc\" }",
            "path = \"/usr/share/doc\", at = \"/var/www/doc\" }",
        );
        assert!(errors(&nested)[0].contains("are inside one another"));
        let own = COMPONENTS.replace("from = \"build\", path", "from = \"web\", path");
        assert!(errors(&own)[0].contains("takes a component from itself"));
        let app = COMPONENTS.replace("build.make", "build.mak");
        assert!(errors(&app)[0]
            .contains("application `build.mak`, which the manifest does not declare"));
        let reserved = COMPONENTS.replace("/usr/share/doc", "/proc/sys");
        assert!(errors(&reserved)[0].contains("cannot be shared"));
        let missing = COMPONENTS.replace(
            "{ from = \"build\", path = \"/usr/share/doc\" }",
            "{ from = \"build\", at = \"/x\", mode = \"rw\" }",
        );
        let e = errors(&missing);
        assert!(
            e.iter()
                .any(|e| e.contains("unknown key `mode` in a component")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.contains("a component needs `path`")),
            "{e:?}"
        );
        // A cycle through a component: build.make requires web.server, which waits for it.
        let cycle = COMPONENTS.replace(
            "command = [\"make\"]",
            "command = [\"make\"]\nrequires = [\"web.server\"]",
        );
        let e = errors(&cycle);
        assert!(
            e[0].contains("dependency cycle: build.make -> web.server -> build.make"),
            "{e:?}"
        );
    }

    #[test]
    fn a_component_the_systems_own_rules_already_decide_is_an_error() {
        let text = format!("{COMPONENTS}\n[[rule]]\nop = \"share\"\nfrom = \"web\"\nto = \"db\"\nobject = \"/srv/site\"\naction = \"allow\"\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].starts_with("sys/system.toml:7:3: error: component build:/srv/site at /var/www: the share rule #1 can never match"), "{e:?}");
    }

    #[test]
    fn missing_commands_and_empty_manifests_are_errors() {
        let e = errors("[vm.a.app.x]\nuser = \"root\"\n");
        assert!(e[0].contains("missing `command`"), "{e:?}");
        let e = errors("name = \"x\"\n");
        assert!(e[0].contains("declares no VM"), "{e:?}");
    }
}
