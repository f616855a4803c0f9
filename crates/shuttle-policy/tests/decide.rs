//! Decisions, routing, selectors and explanations on hand-written policies.

#![allow(clippy::unwrap_used)]

use shuttle_policy::{
    Action, FileAccess, Mismatch, Op, OpParams, Policy, Request, Signal, Target, VmIdentity,
};

const POLICY: &str = r#"
[[rule]]
name = "web-db"
op = "connect"
from = "web"
to = "db"
object = "unix:/run/postgresql/.s.PGSQL.5432"
action = "allow"

[[rule]]
name = "no-pg-for-others"
op = "connect"
from = "@any"
to = "db"
object = "unix:/run/postgresql/*"
action = "deny"

[[rule]]
op = "connect"
from = ["web-*", "@tag:front"]
to = "cache"
object = "tcp:6379"
action = "allow"

[[rule]]
op = "connect"
from = "@host"
to = "cache"
object = "tcp:*"
action = "ask"
timeout = "5s"

[[rule]]
op = "signal"
from = "@tag:ops"
to = "@any"
object = "nginx"
signals = ["HUP"]
action = "allow"

[[rule]]
op = "invoke"
from = "mail"
to = "viewer"
object = "/usr/bin/evince"
files = "read-write"
action = "allow"
"#;

fn policy() -> Policy {
    Policy::parse("p.toml", POLICY).unwrap()
}

const NO_TAGS: &[String] = &[];

fn vm(name: &str) -> VmIdentity<'_> {
    VmIdentity::vm(name, NO_TAGS)
}

#[test]
fn first_match_wins() {
    let p = policy();
    let pg = "unix:/run/postgresql/.s.PGSQL.5432";
    let d = p.decide(&Request::new(Op::Connect, vm("web"), pg));
    assert_eq!(d.action, Action::Allow);
    assert_eq!(d.rule.unwrap().name(), Some("web-db"));
    assert_eq!(d.target(), Some(&Target::Vm("db".into())));

    let d = p.decide(&Request::new(Op::Connect, vm("mail"), pg));
    assert_eq!(d.action, Action::Deny);
    assert_eq!(d.rule.unwrap().number(), 2);
    assert!(!d.is_default());
}

#[test]
fn no_match_is_default_deny() {
    let p = policy();
    let d = p.decide(&Request::new(Op::Connect, vm("web"), "tcp:80"));
    assert!(d.is_default());
    assert_eq!(d.action, Action::Deny);
    assert!(p
        .route(&Request::new(Op::Connect, vm("web"), "tcp:80"))
        .is_none());
    let empty = Policy::parse("e.toml", "").unwrap();
    assert!(empty.is_empty());
    assert!(empty
        .decide(&Request::new(Op::Mq, vm("a"), "mq:/x"))
        .is_default());
}

#[test]
fn selectors_glob_tag_host_lists() {
    let p = policy();
    let front = vec!["front".to_string()];
    let cases = [
        (vm("web-1"), Action::Allow, false),
        (VmIdentity::vm("shop", &front), Action::Allow, false),
        (vm("shop"), Action::Deny, true),
        (VmIdentity::Host, Action::Ask, false),
    ];
    for (from, action, default) in cases {
        let d = p.decide(&Request::new(Op::Connect, from, "tcp:6379"));
        assert_eq!((d.action, d.is_default()), (action, default), "{from}");
    }
    let d = p.decide(&Request::new(Op::Connect, VmIdentity::Host, "tcp:9"));
    assert_eq!(d.action, Action::Ask);
    assert_eq!(
        d.rule.unwrap().params().ask_timeout(),
        std::time::Duration::from_secs(5)
    );
}

#[test]
fn explicit_to_is_matched() {
    let p = policy();
    let pg = "unix:/run/postgresql/.s.PGSQL.5432";
    let d = p.decide(&Request::new(Op::Connect, vm("web"), pg).to(vm("db")));
    assert_eq!(d.action, Action::Allow);
    let d = p.decide(&Request::new(Op::Connect, vm("web"), pg).to(vm("other")));
    assert!(d.is_default());
}

#[test]
fn signals_restrict_matching() {
    let p = policy();
    let ops = vec!["ops".to_string()];
    let from = VmIdentity::vm("admin", &ops);
    let hup = Signal::from_name("HUP").unwrap();
    let kill = Signal::from_name("KILL").unwrap();
    let req = Request::new(Op::Signal, from, "nginx").to(vm("web"));
    assert_eq!(p.decide(&req.signal(hup)).action, Action::Allow);
    assert!(p.decide(&req.signal(kill)).is_default());
    assert!(p.decide(&req).is_default());
}

#[test]
fn params_are_exposed() {
    let p = policy();
    let d = p.decide(&Request::new(Op::Invoke, vm("mail"), "/usr/bin/evince"));
    match &d.rule.unwrap().params().op {
        OpParams::Invoke(i) => assert_eq!(i.files, FileAccess::ReadWrite),
        other => panic!("{other:?}"),
    }
}

#[test]
fn published_objects() {
    let p = policy();
    assert!(p.publishes(Op::Connect, "unix:/run/postgresql/.s.PGSQL.5432"));
    // Only a deny rule names it: nothing is published.
    assert!(!p.publishes(Op::Connect, "unix:/run/postgresql/other"));
    assert!(p.publishes(Op::Connect, "tcp:1234"));
    assert!(!p.publishes(Op::Mq, "mq:/x"));
    assert!(p.publishes(Op::Invoke, "/usr/bin/evince"));
}

#[test]
fn explain_names_rule_and_reasons() {
    let p = policy();
    let req = Request::new(
        Op::Connect,
        vm("mail"),
        "unix:/run/postgresql/.s.PGSQL.5432",
    )
    .to(vm("db"));
    let e = p.explain(&req);
    assert_eq!(e.action, Action::Deny);
    assert!(!e.default);
    assert_eq!(e.considered.len(), 1);
    assert_eq!(
        e.considered[0].reasons,
        vec![Mismatch::FromDoesNotMatch {
            selector: "web".into()
        }]
    );
    let text = e.to_string();
    assert_eq!(
        text,
        "connect from mail to db object unix:/run/postgresql/.s.PGSQL.5432: deny\n  \
         decided by rule #2 \"no-pg-for-others\" at p.toml:10:1\n  routed to db\n  \
         rules considered before:\n    \
         rule #1 \"web-db\" at p.toml:2:1: from does not match (rule has from = web)\n"
    );

    let e = p.explain(&Request::new(Op::Mq, vm("web"), "mq:/x"));
    assert!(e.default);
    assert_eq!(e.considered.len(), 6);
    assert!(e
        .considered
        .iter()
        .all(|c| matches!(c.reasons[..], [Mismatch::OpDiffers { .. }])));
    let text = e.to_string();
    assert!(text.starts_with("mq from web object mq:/x: deny\n  no rule matched: default deny\n"));
    assert!(
        text.contains("rule #6 at p.toml:41:1: op differs (rule is for invoke)"),
        "{text}"
    );

    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["action"], "deny");
    assert_eq!(json["default"], true);
    assert_eq!(json["considered"][0]["reasons"][0]["reason"], "op-differs");
    assert_eq!(json["considered"][0]["rule"]["line"], 2);
}

#[test]
fn decision_serializes() {
    let p = policy();
    let d = p.decide(&Request::new(Op::Connect, VmIdentity::Host, "tcp:9"));
    let json = serde_json::to_value(d).unwrap();
    assert_eq!(json["action"], "ask");
    assert_eq!(json["rule"]["number"], 4);
    assert_eq!(json["rule"]["params"]["op"], "connect");
    assert_eq!(json["rule"]["params"]["timeout"], 5000);
}

#[test]
fn errors_are_all_reported_in_order() {
    let text = "[[rule]]\nop = \"nope\"\n[[rule]]\nop = \"mq\"\nfrom = \"A\"\n";
    let e = Policy::parse("x.toml", text).unwrap_err();
    let lines: Vec<_> = e.errors().iter().map(|e| e.location.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
    assert!(e.len() >= 6, "{e}");
}

#[test]
fn inline_rule_array_is_accepted() {
    let text =
        r#"rule = [{ op = "mq", from = "a", to = "b", object = "mq:/q", action = "allow" }]"#;
    let p = Policy::parse("x.toml", text).unwrap();
    assert_eq!(p.len(), 1);
}

#[test]
fn host_to_host_is_rejected() {
    let text = "[[rule]]\nop = \"mq\"\nfrom = \"@host\"\nto = \"@host\"\nobject = \"mq:/q\"\naction = \"allow\"\n";
    let e = Policy::parse("h.toml", text).unwrap_err();
    assert_eq!(
        e.to_string(),
        "h.toml:4:6: error: `from` and `to` are both `@host`: intra-VM traffic is never \
         mediated\n  hint: remove this rule; applications inside one VM already interact directly"
    );
}

#[test]
fn an_invoke_rule_from_a_vm_to_itself_grants_shuttle_run_there() {
    let text = "[[rule]]\nop = \"invoke\"\nfrom = \"a\"\nto = \"a\"\nobject = \"/usr/bin/id\"\naction = \"allow\"\n";
    let p = Policy::parse("s.toml", text).unwrap();
    let a = VmIdentity::vm("a", &[]);
    let (d, target) = p
        .route(&Request::new(Op::Invoke, a, "/usr/bin/id"))
        .unwrap();
    assert_eq!(d.action, Action::Allow);
    assert_eq!(target.map(ToString::to_string).as_deref(), Some("a"));
    // The invocation parameters do not apply to it, and other ops stay intra-VM errors.
    let with_user = text.replace("action", "user = \"0\"\naction");
    let e = Policy::parse("s.toml", &with_user).unwrap_err();
    assert!(
        e.to_string().starts_with(
            "s.toml:6:8: error: `user` does not apply to an invoke rule from VM a to itself"
        ),
        "{e}"
    );
    let mq =
        "[[rule]]\nop = \"mq\"\nfrom = \"a\"\nto = \"a\"\nobject = \"mq:/q\"\naction = \"allow\"\n";
    assert!(Policy::parse("s.toml", mq)
        .unwrap_err()
        .to_string()
        .contains("intra-VM traffic is never mediated"));
}

#[test]
fn file_options_name_short_options_only() {
    let rule = |v: &str| {
        format!("[[rule]]\nop = \"invoke\"\nfrom = \"a\"\nto = \"b\"\nobject = \"/usr/bin/grep\"\nfile_options = {v}\naction = \"allow\"\n")
    };
    let p = Policy::parse("f.toml", &rule("[\"-f\", \"-o\"]")).unwrap();
    let a = VmIdentity::vm("a", &[]);
    let d = p.decide(&Request::new(Op::Invoke, a, "/usr/bin/grep"));
    match &d.rule.unwrap().params().op {
        OpParams::Invoke(i) => assert_eq!(i.short_file_options(), b"fo"),
        other => panic!("{other:?}"),
    }
    let e = Policy::parse("f.toml", &rule("[\"--file\"]")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("f.toml:6:17: error: invalid short option `--file` in `file_options`"),
        "{e}"
    );
    assert!(Policy::parse("f.toml", &rule("\"-f\"")).is_err());
}
