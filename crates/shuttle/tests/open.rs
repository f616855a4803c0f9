//! `shuttle open PATH|URL` inside a VM: `open` rules route a URL by its scheme and a file by
//! its type or extension to a handler program in another VM, which gets the URL, or the file
//! at /shuttle/from/CALLER/PATH; as the VM's xdg-open too.
#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_code, stderr, stdout, Env};
use serde_json::Value;

/// Where every VM finds the shuttle binary.
const IN_VM_SHUTTLE: &str = "/run/shuttle/shuttle";

fn open_rule(object: &str) -> String {
    format!(
        "[[rule]]\nop = \"open\"\nfrom = \"a\"\nto = \"viewer\"\nobject = \"{object}\"\nhandler = \"/usr/local/bin/record\"\naction = \"allow\"\n\n"
    )
}

#[test]
fn urls_and_files_open_with_the_handler_of_the_routed_vm() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("viewer", &[]);
    // The handler records its argument, where it runs, and what the file holds.
    env.run_ok(
        "viewer",
        "mkdir -p /usr/local/bin /srv && printf '%s\\n' '#!/bin/sh' \
         'echo \"$(hostname) $1\" >> /srv/opened' \
         'if [ -f \"$1\" ]; then cat \"$1\" >> /srv/opened; fi' > /usr/local/bin/record && \
         chmod 755 /usr/local/bin/record",
    );
    let policy = open_rule("scheme:https") + &open_rule("ext:note") + &open_rule("mime:text/*");
    let file = env.path().join("policy.toml");
    std::fs::write(&file, policy).unwrap();
    env.ok(&["policy", "load", file.to_str().unwrap()]);

    env.run_ok(
        "a",
        &format!("{IN_VM_SHUTTLE} open 'https://example.org/a?b=c'"),
    );
    env.run_ok(
        "a",
        &format!("mkdir -p /srv/docs && echo 'the note' > /srv/docs/x.note && cd /srv/docs && {IN_VM_SHUTTLE} open x.note"),
    );
    // As xdg-open, a link to the shuttle binary by that name.
    env.run_ok(
        "a",
        &format!("ln -sf {IN_VM_SHUTTLE} /usr/local/bin/xdg-open && /usr/local/bin/xdg-open https://second.example/"),
    );
    // By MIME type (the caller's /etc/mime.types says text/plain for .txt), a glob rule.
    env.run_ok(
        "a",
        &format!("echo 'plain text' > /srv/docs/y.txt && {IN_VM_SHUTTLE} open /srv/docs/y.txt"),
    );
    assert_eq!(
        env.run_ok("viewer", "cat /srv/opened"),
        "viewer https://example.org/a?b=c\n\
         viewer /shuttle/from/a/srv/docs/x.note\n\
         the note\n\
         viewer https://second.example/\n\
         viewer /shuttle/from/a/srv/docs/y.txt\n\
         plain text\n"
    );
    // A scheme no rule routes: refused with a message, exit status 126, audited.
    let out = env.run("a", &format!("{IN_VM_SHUTTLE} open mailto:x@example.org"));
    assert_code(&out, 126, "open mailto:");
    assert!(
        stderr(&out).contains("not allowed by the policy"),
        "{}",
        stderr(&out)
    );
    let records: Vec<Value> = stdout(&env.output(&["audit", "--json"]))
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["op"] == "open")
        .collect();
    let allowed: Vec<&str> = records
        .iter()
        .filter(|r| r["result"] == "allow")
        .map(|r| r["object"].as_str().unwrap())
        .collect();
    assert_eq!(
        allowed,
        [
            "scheme:https",
            "ext:note",
            "scheme:https",
            "mime:text/plain"
        ],
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["result"] == "deny" && r["object"] == "scheme:mailto"),
        "{records:?}"
    );
}

#[test]
fn an_open_rule_with_expose_dir_shows_the_documents_siblings_to_the_handler() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("viewer", &[]);
    // The handler lists the document's directory as it sees it.
    env.run_ok(
        "viewer",
        "mkdir -p /usr/local/bin && printf '%s\\n' '#!/bin/sh' 'ls \"$(dirname \"$1\")\"' \
         > /usr/local/bin/record && chmod 755 /usr/local/bin/record",
    );
    let rule = open_rule("ext:html").replace("action", "expose_dir = true\naction");
    let file = env.path().join("policy.toml");
    std::fs::write(&file, rule + &open_rule("ext:note")).unwrap();
    env.ok(&["policy", "load", file.to_str().unwrap()]);
    env.run_ok(
        "a",
        "mkdir -p /srv/site && echo '<img src=logo.png>' > /srv/site/index.html \
         && echo png > /srv/site/logo.png && echo n > /srv/site/x.note",
    );
    assert_eq!(
        env.run_ok("a", &format!("{IN_VM_SHUTTLE} open /srv/site/index.html")),
        "index.html\nlogo.png\nx.note\n"
    );
    // Without the option (the `ext:note` rule): the document alone.
    assert_eq!(
        env.run_ok("a", &format!("{IN_VM_SHUTTLE} open /srv/site/x.note")),
        "x.note\n"
    );
}
