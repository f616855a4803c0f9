//! Property tests: the indexed decision equals a naive linear evaluation written here from
//! the rules' text, and the parser never panics.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use shuttle_policy::{Action, ErrorKind, Op, Policy, Request, Signal, VmIdentity};

#[derive(Debug, Clone)]
struct Spec {
    op: &'static str,
    from: Vec<&'static str>,
    to: Vec<&'static str>,
    object: &'static str,
    action: &'static str,
    signals: Option<Vec<&'static str>>,
}

const SELECTORS: &[&str] = &["a", "b", "c", "a*", "?", "[ab]*", "@tag:x", "@any", "@host"];
const TARGETS: &[&str] = &["a", "b", "c", "@host"];
const CONNECT: &[&str] = &[
    "tcp:1",
    "tcp:2",
    "tcp:*",
    "unix:/r/a",
    "unix:/r/*",
    "unix:/r/a*",
    "unix:/*",
    "abstract:x",
];
const MQ: &[&str] = &["mq:/a", "mq:/b", "mq:/*", "mq:/a?"];
const SIGNAL: &[&str] = &["nginx", "ng*", "/usr/bin/x", "/usr/*"];
const SIGNALS: &[&str] = &["HUP", "TERM", "KILL"];

fn pick(pool: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    prop::sample::select(pool)
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0..3usize,
        prop::collection::vec(pick(SELECTORS), 1..3),
        prop::collection::vec(pick(SELECTORS), 1..3),
        pick(TARGETS),
        0..8usize,
        pick(&["allow", "deny", "ask"]),
        prop::option::of(prop::collection::vec(pick(SIGNALS), 1..3)),
    )
        .prop_map(|(op, from, to, target, obj, action, signals)| match op {
            0 => Spec {
                op: "connect",
                from,
                to: vec![target],
                object: CONNECT[obj % CONNECT.len()],
                action,
                signals: None,
            },
            1 => Spec {
                op: "mq",
                from,
                to: vec![target],
                object: MQ[obj % MQ.len()],
                action,
                signals: None,
            },
            _ => Spec {
                op: "signal",
                from,
                to,
                object: SIGNAL[obj % SIGNAL.len()],
                action,
                signals,
            },
        })
}

fn quoted(items: &[&str]) -> String {
    let q: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", q.join(", "))
}

fn render(specs: &[Spec]) -> String {
    let mut text = String::new();
    for s in specs {
        text += &format!(
            "[[rule]]\nop = \"{}\"\nfrom = {}\nto = {}\nobject = \"{}\"\naction = \"{}\"\n",
            s.op,
            quoted(&s.from),
            quoted(&s.to),
            s.object,
            s.action
        );
        if let Some(sig) = &s.signals {
            text += &format!("signals = {}\n", quoted(sig));
        }
    }
    text
}

/// Parses, dropping rules the policy rejects (shadowed or intra-VM) until it is valid.
fn valid_policy(mut specs: Vec<Spec>) -> (Policy, Vec<Spec>) {
    loop {
        match Policy::parse("p.toml", &render(&specs)) {
            Ok(p) => return (p, specs),
            Err(errs) => {
                let mut drop = Vec::new();
                for e in errs.errors() {
                    assert!(
                        matches!(e.kind, ErrorKind::Shadowed | ErrorKind::IntraVm),
                        "unexpected error: {e}"
                    );
                    // Each rule has 5 or 6 lines; find the rule whose table holds the line.
                    let mut line = 1;
                    for (i, s) in specs.iter().enumerate() {
                        let len = 6 + usize::from(s.signals.is_some());
                        if (line..line + len).contains(&(e.location.line as usize)) {
                            drop.push(i);
                            break;
                        }
                        line += len;
                    }
                }
                drop.sort();
                drop.dedup();
                assert!(!drop.is_empty());
                for i in drop.into_iter().rev() {
                    specs.remove(i);
                }
            }
        }
    }
}

fn glob_match(p: &[char], s: &[char]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some(('*', rest)) => (0..=s.len()).any(|i| glob_match(rest, &s[i..])),
        Some(('?', rest)) => !s.is_empty() && glob_match(rest, &s[1..]),
        Some(('[', rest)) => {
            let close = rest.iter().position(|&c| c == ']').unwrap();
            !s.is_empty()
                && rest[..close].contains(&s[0])
                && glob_match(&rest[close + 1..], &s[1..])
        }
        Some((c, rest)) => s.first() == Some(c) && glob_match(rest, &s[1..]),
    }
}

fn glob(p: &str, s: &str) -> bool {
    let p: Vec<char> = p.chars().collect();
    let s: Vec<char> = s.chars().collect();
    glob_match(&p, &s)
}

fn sel_match(sel: &str, id: &VmIdentity<'_>) -> bool {
    match (sel, id) {
        ("@any", _) => true,
        ("@host", VmIdentity::Host) => true,
        (_, VmIdentity::Host) => false,
        (s, VmIdentity::Vm { name, tags }) => match s.strip_prefix("@tag:") {
            Some(t) => tags.iter().any(|x| x == t),
            None => glob(s, name),
        },
    }
}

fn reference(specs: &[Spec], req: &Request<'_>) -> Option<usize> {
    specs.iter().position(|s| {
        s.op == req.op.as_str()
            && s.from.iter().any(|f| sel_match(f, &req.from))
            && req
                .to
                .as_ref()
                .is_none_or(|to| s.to.iter().any(|t| sel_match(t, to)))
            && glob(s.object, req.object)
            && s.signals
                .as_ref()
                .is_none_or(|sig| req.signal.is_some_and(|r| sig.contains(&r.name())))
    })
}

const REQ_OBJECTS: &[&str] = &[
    "tcp:1",
    "tcp:2",
    "tcp:3",
    "unix:/r/a",
    "unix:/r/ab",
    "unix:/q",
    "abstract:x",
    "abstract:y",
    "mq:/a",
    "mq:/ab",
    "mq:/c",
    "nginx",
    "ngx",
    "/usr/bin/x",
    "/opt/y",
];

fn request_parts() -> impl Strategy<Value = (usize, Option<usize>, usize, usize, usize)> {
    (
        0..6usize,
        prop::option::of(0..6usize),
        0..3usize,
        0..REQ_OBJECTS.len(),
        0..4usize,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn indexed_decision_equals_linear_reference(
        specs in prop::collection::vec(spec(), 0..25),
        requests in prop::collection::vec(request_parts(), 1..40),
    ) {
        let (policy, specs) = valid_policy(specs);
        let x = vec!["x".to_string()];
        let ids = [
            VmIdentity::vm("a", &[]),
            VmIdentity::vm("ab", &[]),
            VmIdentity::vm("b", &x),
            VmIdentity::vm("c", &[]),
            VmIdentity::vm("zz", &x),
            VmIdentity::Host,
        ];
        for (from, to, op, obj, sig) in requests {
            let op = [Op::Connect, Op::Mq, Op::Signal][op];
            let mut req = Request::new(op, ids[from], REQ_OBJECTS[obj]);
            if let Some(to) = to {
                req = req.to(ids[to]);
            }
            if let Some(name) = ["HUP", "TERM", "INT"].get(sig) {
                req = req.signal(Signal::from_name(name).unwrap());
            }
            let got = policy.decide(&req);
            let want = reference(&specs, &req);
            prop_assert_eq!(got.rule.map(|r| r.number() - 1), want, "{:?}", req);
            let want_action = want.map_or(Action::Deny, |i| match specs[i].action {
                "allow" => Action::Allow,
                "deny" => Action::Deny,
                _ => Action::Ask,
            });
            prop_assert_eq!(got.action, want_action);
            prop_assert_eq!(got, policy.decide_linear(&req));
            let published = specs.iter().any(|s| {
                s.op == op.as_str() && s.action != "deny" && glob(s.object, req.object)
            });
            prop_assert_eq!(policy.publishes(op, req.object), published);
        }
    }

    #[test]
    fn parser_never_panics_on_arbitrary_text(text in "\\PC*") {
        let _ = Policy::parse("fuzz.toml", &text);
    }

    #[test]
    fn parser_never_panics_on_mutated_policies(
        specs in prop::collection::vec(spec(), 0..6),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), "[\\[\\]\"=\n*@:/a-z0-9 ]{0,3}"), 0..6),
    ) {
        let mut text = render(&specs);
        for (at, insert) in cuts {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            text.insert_str(i, &insert);
        }
        if let Err(e) = Policy::parse("m.toml", &text) {
            // Every error renders as file:line:col: error: ... with a hint.
            for line in e.to_string().lines().step_by(2) {
                prop_assert!(line.starts_with("m.toml:"), "{}", line);
                prop_assert!(line.contains(": error: "), "{}", line);
            }
        }
    }
}
