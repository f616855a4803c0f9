//! Application invocation across VMs: a program path that an `invoke` rule routes from VM a to
//! VM b is a stub in a, and running it runs b's program, in b, with a's own stdin, stdout and
//! stderr, its exit status and signals relayed; refusals say why and are audited; rules loaded
//! at run time take effect in running VMs.
#![allow(clippy::unwrap_used)]

mod common;

use common::{audit_records as audit, load_policy as load};

use std::time::Duration;

use common::{assert_code, assert_success, stderr, stdout, wait_for, Env};
use serde_json::Value;

/// Where every VM finds the shuttle binary.
const IN_VM_SHUTTLE: &str = "/run/shuttle/shuttle";

fn rule(object: &str, extra: &str) -> String {
    format!(
        "[[rule]]\nop = \"invoke\"\nfrom = \"a\"\nto = \"b\"\nobject = \"{object}\"\n{extra}action = \"allow\"\n\n"
    )
}

/// a may run b's sha256sum, wc, hostname and bash (not dash: a's own `sh` stays a's).
fn policy() -> String {
    [
        "/usr/bin/sha256sum",
        "/usr/bin/wc",
        "/usr/bin/hostname",
        "/usr/bin/bash",
    ]
    .iter()
    .map(|p| rule(p, ""))
    .collect()
}

fn invokes(env: &Env) -> Vec<Value> {
    audit(env)
        .into_iter()
        .filter(|r| r["op"] == "invoke")
        .collect()
}

fn host_sha256(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// How many processes of `vm` run exactly `args`.
fn running_in(env: &Env, vm: &str, args: &str) -> usize {
    let out = env.run_ok(vm, &format!("ps -eo args= | grep -cx '{args}' || true"));
    out.trim().parse().unwrap_or(0)
}

#[test]
fn programs_of_another_vm_run_there_on_the_callers_pipes() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    load(&env, &policy());
    // Through a pipe, and from a file only a has, on stdin.
    assert_eq!(
        env.run_ok("a", "printf 'hello across\\n' | sha256sum")
            .split_whitespace()
            .next(),
        Some(host_sha256(b"hello across\n").as_str())
    );
    env.run_ok("a", "seq 1 100000 > /etc/a-only");
    let data: String = (1..=100_000).map(|n| format!("{n}\n")).collect();
    assert_eq!(
        env.run_ok("a", "sha256sum < /etc/a-only")
            .split_whitespace()
            .next(),
        Some(host_sha256(data.as_bytes()).as_str())
    );
    assert_eq!(
        env.run_ok("a", "seq 1 100000 | wc -l -c")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["100000", &data.len().to_string()]
    );
    assert_eq!(env.run_ok("a", "wc -w < /etc/a-only").trim(), "100000");
    // They really run in b: b's hostname, b's files, b's processes.
    assert_eq!(env.run_ok("a", "hostname").trim(), "b");
    env.run_ok("b", "echo only-in-b > /etc/b-only");
    assert_eq!(
        env.run_ok("a", "test -e /etc/b-only || bash -c 'cat /etc/b-only'")
            .trim(),
        "only-in-b"
    );
    assert_eq!(
        env.run_ok("a", "bash -c 'cat /proc/1/comm'").trim(),
        "shuttle-init"
    );
    // A pipeline of invoked programs, the output going on through a's own pipe.
    assert_eq!(
        env.run_ok("a", "bash -c 'seq 1 10' | wc -l | sha256sum | wc -c")
            .trim(),
        "68"
    );
    // Every one was decided and audited.
    let records = invokes(&env);
    assert!(records.len() >= 10, "{records:?}");
    assert!(records
        .iter()
        .all(|r| r["from"] == "a" && r["to"] == "b" && r["result"] == "allow"));
    assert!(records.iter().any(|r| r["object"] == "/usr/bin/sha256sum"));
}

#[test]
fn exit_statuses_and_signals_cross_with_the_invocation() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    load(&env, &policy());
    assert_code(&env.run("a", "bash -c 'exit 7'"), 7, "exit 7 in b");
    assert_code(
        &env.run("a", "bash -c 'kill -TERM $$'"),
        128 + 15,
        "killed by SIGTERM in b",
    );
    assert_code(
        &env.exec("a", &["bash", "-c", "exit 3"]),
        3,
        "the stub run directly",
    );
    // A signal to the stub reaches the program, which handles it and exits with its own code.
    let out = env.run_ok(
        "a",
        r#"bash -c 'trap "echo got-TERM-in-$(hostname); exit 42" TERM; echo ready; while :; do sleep 0.05; done' > /tmp/out 2>&1 &
p=$!
until grep -q ready /tmp/out; do sleep 0.05; done
kill -TERM $p; wait $p; echo status=$?; cat /tmp/out"#,
    );
    assert!(out.contains("status=42"), "{out}");
    assert!(out.contains("got-TERM-in-b"), "{out}");
    // Ctrl-C (SIGINT) with no handler ends the program as it would end a local one.
    let out = env.run_ok(
        "a",
        "bash -c 'echo $$ > /tmp/pid; exec sleep 300' & p=$!; sleep 1; kill -INT $p; wait $p; echo status=$?",
    );
    assert!(out.contains("status=130"), "{out}");
    assert_eq!(running_in(&env, "b", "sleep 300"), 0);
    // A stub that dies without waiting (SIGKILL) takes its program with it.
    env.run_ok(
        "a",
        "bash -c 'exec sleep 301' >/dev/null 2>&1 & echo $! > /tmp/stub",
    );
    assert!(
        wait_for(Duration::from_secs(5), || running_in(
            &env,
            "b",
            "sleep 301"
        ) == 1),
        "the invoked program did not start in b"
    );
    env.run_ok("a", "kill -KILL $(cat /tmp/stub)");
    assert!(
        wait_for(Duration::from_secs(5), || running_in(
            &env,
            "b",
            "sleep 301"
        ) == 0),
        "the program outlived its killed stub"
    );
    // A program that cannot be executed in b: the shell's status, and a message.
    env.run_ok("b", "printf 'not a program' > /usr/local/bin/broken");
    load(
        &env,
        &format!("{}{}", policy(), rule("/usr/local/bin/broken", "")),
    );
    let out = env.run("a", "/usr/local/bin/broken");
    assert_code(&out, 126, "not executable in b");
    assert!(
        stderr(&out).contains("/usr/local/bin/broken"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_refused_invocation_says_why_and_is_audited() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    // No rule: `shuttle invoke` is refused; the VM's own program is untouched.
    let out = env.exec("a", &[IN_VM_SHUTTLE, "invoke", "/usr/bin/id", "-u"]);
    assert_code(&out, 126, "invoke without a rule");
    assert_eq!(
        stderr(&out).trim(),
        "shuttle: invoking /usr/bin/id is not allowed by the policy (no rule routes it from VM a to another VM)"
    );
    assert_eq!(env.run_ok("a", "id -u").trim(), "0");
    // A deny rule: the same, naming the rule; no stub, a's own program runs.
    let deny = "[[rule]]\nname = \"no-wc\"\nop = \"invoke\"\nfrom = \"a\"\nto = \"b\"\nobject = \"/usr/bin/wc\"\naction = \"deny\"\n\n";
    let ask = "[[rule]]\nop = \"invoke\"\nfrom = \"a\"\nto = \"b\"\nobject = \"/usr/bin/id\"\naction = \"ask\"\ntimeout = \"1s\"\n\n";
    load(
        &env,
        &format!("{deny}{ask}{}", rule("/usr/bin/hostname", "")),
    );
    let out = env.exec("a", &[IN_VM_SHUTTLE, "invoke", "/usr/bin/wc", "-c"]);
    assert_code(&out, 126, "denied by a rule");
    assert!(
        stderr(&out).starts_with(
            "shuttle: invoking /usr/bin/wc in VM b is not allowed by the policy (denied by rule #1 \"no-wc\" at "
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.run_ok("a", "printf abc | wc -c").trim(), "3");
    assert!(!env
        .run_ok("a", "cat /proc/self/mountinfo")
        .contains("/usr/bin/wc"));
    // An `ask` rule nobody answers: the stub is there, and refuses after the timeout.
    let out = env.run("a", "id -u");
    assert_code(&out, 126, "unanswered question");
    assert!(
        stderr(&out).contains("invoking /usr/bin/id in VM b is not allowed by the policy (not approved: no answer within 1s"),
        "{}",
        stderr(&out)
    );
    // Invoking on the host is never done.
    load(
        &env,
        "[[rule]]\nop = \"invoke\"\nfrom = \"a\"\nto = \"@host\"\nobject = \"/usr/bin/id\"\naction = \"allow\"\n",
    );
    let out = env.exec("a", &[IN_VM_SHUTTLE, "invoke", "/usr/bin/id"]);
    assert_code(&out, 126, "invoke on the host");
    assert!(
        stderr(&out).contains("on the host is not allowed"),
        "{}",
        stderr(&out)
    );
    // Every refusal is in the audit trail with the rule (or the default) that decided.
    let records = invokes(&env);
    let results: Vec<(&str, &str, bool)> = records
        .iter()
        .map(|r| {
            (
                r["object"].as_str().unwrap(),
                r["result"].as_str().unwrap(),
                r["rule"].is_null(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("/usr/bin/id", "deny", true),
            ("/usr/bin/wc", "deny", false),
            ("/usr/bin/id", "ask-deny", false),
            ("/usr/bin/id", "deny", false),
        ],
        "{records:?}"
    );
    assert_eq!(records[1]["rule"]["name"], "no-wc");
    let denied = stdout(&env.output(&["audit", "--denied", "--vm", "a"]));
    assert_eq!(
        denied.lines().filter(|l| l.contains("invoke")).count(),
        4,
        "{denied}"
    );
}

#[test]
fn rules_loaded_at_run_time_take_effect_in_running_vms() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    env.ok(&["vm", "start", "a"]);
    env.ok(&["vm", "start", "b"]);
    let init = env.init_pid("a");
    assert_eq!(env.run_ok("a", "hostname").trim(), "a");
    // A program b has and a lacks: a gets a stub at its path.
    env.run_ok(
        "b",
        "mkdir -p /opt/tool && printf '#!/bin/sh\\necho tool in $(hostname): \"$@\"\\n' > /opt/tool/run && chmod 755 /opt/tool/run",
    );
    load(&env, &format!("{}{}", policy(), rule("/opt/tool/run", "")));
    assert_eq!(env.run_ok("a", "hostname").trim(), "b");
    assert_eq!(
        env.run_ok("a", "/opt/tool/run one 'two words'").trim(),
        "tool in b: one two words"
    );
    // A rule may name the program through a directory that is a symbolic link (`/bin` on a
    // merged /usr): the stub lands on the file, and still stands for the rule's path. A rule
    // naming a symbolic link itself gets no stub (it would cover the link's target, which other
    // names share): the VM's own program stays.
    load(
        &env,
        &format!(
            "{}{}{}{}",
            policy(),
            rule("/opt/tool/run", ""),
            rule("/bin/uname", ""),
            rule("/usr/bin/python3", "")
        ),
    );
    assert_eq!(env.run_ok("a", "uname -n").trim(), "b");
    assert_eq!(
        env.py_ok("a", "import socket; print(socket.gethostname())")
            .trim(),
        "a"
    );
    assert!(invokes(&env)
        .iter()
        .any(|r| r["object"] == "/bin/uname" && r["result"] == "allow"));
    // A VM cannot take its stub away or write through it.
    let out = env.run("a", "rm -f /usr/bin/hostname || echo cannot-remove; echo x > /usr/bin/hostname || echo cannot-write");
    assert!(stdout(&out).contains("cannot-remove"), "{}", stdout(&out));
    assert!(stdout(&out).contains("cannot-write"), "{}", stdout(&out));
    // The rules go: a's own programs are back, the mount point made for the missing one too.
    load(&env, &rule("/usr/bin/wc", ""));
    assert_eq!(env.run_ok("a", "hostname").trim(), "a");
    assert_eq!(
        env.run("a", "test -e /opt/tool/run").status.code(),
        Some(1),
        "the mount point made for /opt/tool/run is left in a"
    );
    let mounts = env.run_ok("a", "cat /proc/self/mountinfo");
    assert!(!mounts.contains("/usr/bin/hostname"), "{mounts}");
    assert!(mounts.contains("/usr/bin/wc"), "{mounts}");
    // Neither VM was restarted.
    assert_eq!(env.init_pid("a"), init);
    // A VM started later gets its stubs before it runs anything.
    env.ok(&["vm", "stop", "a"]);
    assert_eq!(env.run_ok("a", "printf 'a b c' | wc -w").trim(), "3");
    assert!(env
        .run_ok("a", "cat /proc/self/mountinfo")
        .contains("/usr/bin/wc"));
}

#[test]
fn invoked_programs_run_as_the_caller_with_allowed_environment_and_directory() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    let pinned = rule("/usr/bin/id", "user = \"1234:99\"\n");
    load(
        &env,
        &format!(
            "{}{}{pinned}",
            policy(),
            rule("/usr/bin/env", "env = [\"LANG\", \"MY_*\"]\n")
        ),
    );
    // The caller's uid and gid (from the kernel), or the rule's user.
    let out = env.output(&[
        "run",
        "a",
        "-u",
        "nobody",
        "--",
        "bash",
        "-c",
        "id -u; id -g",
    ]);
    assert_success(&out, "as nobody");
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        ["65534", "65534"]
    );
    assert_eq!(
        env.run_ok("a", "id -u; id -g")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["1234", "99"]
    );
    // Only what the rule's env list allows crosses.
    let out = env.run_ok(
        "a",
        "LANG=C.UTF-8 MY_ONE=1 MY_TWO=2 SECRET=s LD_PRELOAD=/x.so env",
    );
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for k in ["LANG", "MY_ONE", "MY_TWO"] {
        assert!(names.contains(&k), "{k} missing: {out}");
    }
    for k in ["SECRET", "LD_PRELOAD", "TERM"] {
        assert!(!names.contains(&k), "{k} crossed: {out}");
    }
    // The working directory, where b has it; `/` where it does not.
    assert_eq!(
        env.run_ok("a", "cd /usr/share && bash -c pwd").trim(),
        "/usr/share"
    );
    assert_eq!(
        env.run_ok("a", "mkdir -p /only-a && cd /only-a && bash -c pwd")
            .trim(),
        "/"
    );
}

#[test]
fn an_interactive_program_gets_a_terminal_of_the_target_vm() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    load(&env, &policy());
    // In a, on a pseudo-terminal: a's terminal is never handed to b; the program gets one of
    // b's own, relayed by the stub.
    let code = r#"
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp("bash", ["bash", "-c", "test -t 0 && echo tty-$(hostname); read x; echo got-$x"])
out = b""
deadline = time.time() + 20
sent = False
while time.time() < deadline:
    if not sent and b"tty-" in out:
        os.write(fd, b"hello\n"); sent = True
    r, _, _ = select.select([fd], [], [], 0.2)
    if r:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
_, status = os.waitpid(pid, 0)
print(out.decode(errors="replace").replace("\r", ""))
print("status", os.waitstatus_to_exitcode(status))
"#;
    let out = env.py_ok("a", code);
    assert!(out.contains("tty-b"), "{out}");
    assert!(out.contains("got-hello"), "{out}");
    assert!(out.contains("status 0"), "{out}");
}

#[test]
fn file_arguments_appear_under_shuttle_from_and_nothing_else_does() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    let policy = format!(
        "{}{}{}{}",
        policy(),
        rule("/usr/bin/realpath", ""),
        rule("/usr/bin/cat", "files = \"none\"\n"),
        rule("/usr/bin/tee", "files = \"read-write\"\n")
    );
    load(&env, &policy);
    env.run_ok(
        "a",
        "echo hello > /root/doc.txt; echo sibling > /root/other.txt; seq 1 1000 > /etc/a-only; \
         : > /root/out.txt; echo secret > /root/secret; chmod 600 /root/secret",
    );
    // The file appears at /shuttle/from/a/PATH, and the argument names it there.
    assert_eq!(
        env.run_ok("a", "cd /root && sha256sum doc.txt").trim(),
        format!("{}  /shuttle/from/a/root/doc.txt", host_sha256(b"hello\n"))
    );
    assert_eq!(
        env.run_ok("a", "wc -l /etc/a-only").trim(),
        "1000 /shuttle/from/a/etc/a-only"
    );
    // Relative paths, `..`, symbolic links and /proc/self/root: the file's own path in a.
    for arg in [
        "cd /tmp && realpath ../root/doc.txt",
        "ln -sf /root/doc.txt /tmp/link && realpath /tmp/link",
        "realpath /proc/self/root/root/doc.txt",
    ] {
        assert_eq!(
            env.run_ok("a", arg).trim(),
            "/shuttle/from/a/root/doc.txt",
            "{arg}"
        );
    }
    // Exactly the named file: not its siblings, read-only, gone when the program ends.
    let seen = env.run_ok(
        "a",
        "bash -c 'find /shuttle -mindepth 1 | sort; echo x >> \"$1\" || echo read-only' _ /root/doc.txt",
    );
    assert_eq!(
        seen.lines().collect::<Vec<_>>(),
        [
            "/shuttle/from",
            "/shuttle/from/a",
            "/shuttle/from/a/root",
            "/shuttle/from/a/root/doc.txt",
            "read-only"
        ],
        "{seen}"
    );
    // (`cat` itself is invoked in b in this test: a's files are read with `head`.)
    assert_eq!(env.run_ok("a", "head -c 100 /root/doc.txt"), "hello\n");
    assert_eq!(
        env.run_ok("b", "find /shuttle/from/a -mindepth 1"),
        "",
        "what was passed stays in b after the program ended"
    );
    // Directories, devices, missing paths, kernel files and options stay strings.
    assert_eq!(
        env.run_ok(
            "a",
            "bash -c 'echo \"$@\"' _ /etc /dev/null /nonexistent /proc/self/status -n"
        )
        .trim(),
        "/etc /dev/null /nonexistent /proc/self/status -n"
    );
    // A file the caller cannot open is not passed (its name means b's own file, which b
    // lacks).
    let out = env.output(&["run", "a", "-u", "nobody", "--", "realpath", "/root/secret"]);
    assert!(!out.status.success());
    assert!(!stderr(&out).contains("/shuttle/from"), "{}", stderr(&out));
    // Names with odd bytes.
    let odd = env.run_ok(
        "a",
        "f=$(printf '/tmp/we ird\\nname'); printf x > \"$f\"; bash -c 'printf \"%s|\" \"$1\"; cat \"$1\"' _ \"$f\"",
    );
    assert_eq!(odd, "/shuttle/from/a/tmp/we ird\nname|x");
    // files = "none": names pass as strings; files = "read-write": the program writes a's file.
    let out = env.run("a", "cat /root/doc.txt");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/root/doc.txt"), "{}", stderr(&out));
    env.run_ok("a", "echo written-in-b | tee /root/out.txt >/dev/null");
    assert_eq!(
        env.run_ok("a", "head -c 100 /root/out.txt"),
        "written-in-b\n"
    );
    // The audit says what was passed.
    assert!(invokes(&env)
        .iter()
        .any(|r| r["object"] == "/usr/bin/sha256sum"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("with 1 file argument(s) read-only"))));
}

#[test]
fn a_symlink_swapped_during_the_call_exposes_nothing_the_caller_cannot_open() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    load(&env, &format!("{}{}", policy(), rule("/usr/bin/head", "")));
    // As nobody in a, a link flips between a file nobody may read and one it may not, while
    // nobody invokes b's `head` on it again and again.
    env.run_ok(
        "a",
        "mkdir -p /var/tmp/race && chmod 777 /var/tmp/race && echo public > /var/tmp/public \
         && chmod 644 /var/tmp/public && echo private-data > /var/tmp/private && chmod 600 /var/tmp/private",
    );
    let script = r#"
cd /var/tmp/race
( while :; do ln -sfn /var/tmp/public link; ln -sfn /var/tmp/private link; done ) &
racer=$!
for i in $(seq 1 60); do head -n 1 link 2>&1; done
kill $racer
"#;
    let out = env.output(&["run", "a", "-u", "nobody", "--", "sh", "-c", script]);
    let text = stdout(&out);
    assert!(
        text.contains("public"),
        "no invocation read the public file: {text}{}",
        stderr(&out)
    );
    assert!(!text.contains("private-data"), "{text}");
}

#[test]
fn expose_dir_shows_the_other_files_of_the_directory_that_the_caller_can_open() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    load(
        &env,
        &format!(
            "{}{}{}",
            rule("/usr/bin/bash", "expose_dir = true\n"),
            rule(
                "/usr/bin/env",
                "expose_dir = true\nfiles = \"read-write\"\n"
            ),
            rule("/usr/bin/ls", "")
        ),
    );
    // A document with its image, a file nobody may read, a subdirectory, a link out.
    env.run_ok(
        "a",
        "mkdir -p /srv/docs/sub && echo doc > /srv/docs/doc.txt && echo png > /srv/docs/img.png \
         && echo secret > /srv/docs/private && chmod 600 /srv/docs/private \
         && echo deeper > /srv/docs/sub/x && ln -s /etc/shadow /srv/docs/link",
    );
    // Without the option: the named file alone.
    assert_eq!(
        env.run_ok("a", "ls /shuttle/from/a/srv/docs /srv/docs/doc.txt 2>&1"),
        "/shuttle/from/a/srv/docs/doc.txt\n\n/shuttle/from/a/srv/docs:\ndoc.txt\n"
    );
    // With it, as nobody: the siblings nobody can open, nothing else, read-only.
    let script = r#"d=$(dirname "$1"); ls -A "$d"; cat "$d/img.png"; echo x >> "$d/img.png" || echo read-only; touch "$d/new" || echo no-new-files"#;
    let out = env.output(&[
        "run",
        "a",
        "-u",
        "nobody",
        "--",
        "bash",
        "-c",
        script,
        "_",
        "/srv/docs/doc.txt",
    ]);
    assert_success(&out, "bash with expose_dir as nobody");
    assert_eq!(
        stdout(&out),
        "doc.txt\nimg.png\npng\nread-only\nno-new-files\n",
        "{}",
        stderr(&out)
    );
    // read-write granted and the caller (root) may write: the sibling is written in a.
    env.run_ok(
        "a",
        r#"env bash -c 'echo more >> "$(dirname "$1")/img.png"' _ /srv/docs/doc.txt"#,
    );
    assert_eq!(
        env.run_ok("a", "head -c 100 /srv/docs/img.png"),
        "png\nmore\n"
    );
    // A directory of too many files is refused whole, with a message (and nothing runs).
    env.run_ok(
        "a",
        "mkdir -p /srv/many && cd /srv/many && for i in $(seq 1 300); do : > f$i; done",
    );
    let out = env.run("a", "bash -c 'echo ran' _ /srv/many/f1");
    assert_code(&out, 125, "expose_dir on 300 files");
    assert!(!stdout(&out).contains("ran"));
    assert!(
        stderr(&out).contains("an invocation shows at most 256 files"),
        "{}",
        stderr(&out)
    );
    // Gone afterwards, and audited as such.
    assert_eq!(env.run_ok("b", "find /shuttle/from/a -mindepth 1"), "");
    assert!(invokes(&env).iter().any(|r| r["object"] == "/usr/bin/bash"
        && r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("and the files of their directories read-only"))));
}

/// Refused invocations of a's programs in b, with the reason, and what b's /shuttle holds.
fn refused(env: &Env, cmd: &str, why: &str) {
    let out = env.run("a", cmd);
    assert_code(&out, 125, cmd);
    assert!(!stdout(&out).contains("ran"), "{cmd}: {}", stdout(&out));
    assert!(
        !stdout(&out).contains("b-content"),
        "{cmd}: {}",
        stdout(&out)
    );
    assert!(stderr(&out).contains(why), "{cmd}: {}", stderr(&out));
    assert!(
        invokes(env).iter().any(
            |r| r["result"] == "error" && r["reason"].as_str().is_some_and(|s| s.contains(why))
        ),
        "{cmd}: not audited as an error"
    );
}

#[test]
fn a_file_that_cannot_be_shown_refuses_the_invocation() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    load(
        &env,
        &format!(
            "{}{}",
            rule("/usr/bin/head", ""),
            rule("/usr/bin/bash", "expose_dir = true\n")
        ),
    );
    env.run_ok(
        "a",
        "mkdir -p /srv/w /srv/v && echo a-content > /srv/w/doc && echo doc2 > /srv/v/doc2 \
         && echo sib > /srv/v/sib",
    );
    env.run_ok("b", "mkdir -p /srv/w && echo b-content > /srv/w/doc");
    assert_eq!(env.run_ok("a", "head -n 1 /srv/w/doc"), "a-content\n");
    // Root in b puts something in the way of the mount points (its /shuttle is its own to
    // spoil): the file cannot be shown, and the program must not run on b's /srv/w/doc.
    env.run_ok(
        "b",
        "mkdir -p /shuttle/from/a/srv/w/doc /shuttle/from/a/srv/v/sib",
    );
    refused(&env, "head -n 1 /srv/w/doc", "cannot be shown in VM b");
    // The same for a file of an exposed directory; the argument shown before it goes again.
    refused(
        &env,
        "bash -c 'echo ran; cat \"$1\"' _ /srv/v/doc2",
        "srv/v/sib cannot be shown in VM b",
    );
    assert_eq!(
        env.run_ok("b", "find /shuttle/from/a -mindepth 1 -not -type d"),
        "",
        "a file shown before the failure stayed"
    );
    // At most 256 files per invocation, all exposed directories together.
    env.run_ok(
        "a",
        "for d in m1 m2; do mkdir -p /srv/$d && (cd /srv/$d && for i in $(seq 1 200); do : > f$i; done); done",
    );
    refused(
        &env,
        "bash -c 'echo ran' _ /srv/m1/f1 /srv/m2/f1",
        "an invocation shows at most 256",
    );
    // A file too deeply nested for the target's /shuttle (its inodes are bounded).
    env.run_ok(
        "a",
        "d=/srv/deep; for i in $(seq 1 1100); do d=$d/d; done; mkdir -p $d && echo x > $d/f && ln -s $d /srv/deeplink",
    );
    refused(
        &env,
        "head -n 1 /srv/deeplink/f",
        "more than the 1024 one invocation may use",
    );
    assert_eq!(
        env.run_ok("b", "find /shuttle/from/a -mindepth 1 -not -type d"),
        ""
    );
}

#[test]
fn a_vms_running_invocations_use_a_bounded_part_of_the_targets_shuttle() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    load(&env, &rule("/usr/bin/bash", ""));
    // Files 1000 directories deep: about 1000 of b's /shuttle inodes each. Four running
    // invocations hold about 4000; a fifth would pass a's limit of 4096 and is refused
    // cleanly; once they end it runs. The fifth starts only once the four run in b.
    let script = r#"
deep() { d=/srv/p$1; for i in $(seq 1 1000); do d=$d/d; done; mkdir -p $d; echo $1 > $d/f; ln -sfn $d /srv/l$1; }
for n in 1 2 3 4 5; do deep $n; done
for n in 1 2 3 4; do bash -c 'echo up; sleep 6' _ /srv/l$n/f > /tmp/up$n & done
# Each prints "up" once it runs in b, that is once its file is shown there (the time that
# takes varies with the machine's load).
for n in 1 2 3 4; do
  for t in $(seq 1 600); do grep -q up /tmp/up$n 2>/dev/null && break; sleep 0.1; done
done
bash -c 'cat "$1"' _ /srv/l5/f 2>&1; echo "exit $?"
wait
bash -c 'cat "$1"' _ /srv/l5/f
"#;
    let out = env.run_ok("a", script);
    assert!(
        out.contains("this VM's running invocations already show"),
        "{out}"
    );
    assert!(out.contains("exit 125"), "{out}");
    assert!(out.ends_with("5\n"), "{out}");
    assert_eq!(env.run_ok("b", "find /shuttle/from/a -mindepth 1"), "");
}

#[test]
fn option_values_that_name_files_cross_as_file_arguments() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    env.create("b", &[]);
    load(
        &env,
        &format!(
            "{}{}{}",
            rule("/usr/bin/bash", ""),
            rule("/usr/bin/grep", "file_options = [\"-f\"]\n"),
            rule("/usr/bin/sort", "files = \"read-write\"\n"),
        ),
    );
    env.run_ok(
        "a",
        "mkdir -p /srv/w && printf 'b\\nzz\\n' > /srv/w/pats && printf 'a\\nb\\nc\\nzz\\n' > /srv/w/data \
         && printf '3\\n1\\n2\\n' > /srv/w/in && : > /srv/w/out && : > /srv/w/ro-out",
    );
    // Only the value is rewritten; a bare word stays a string (deliberately: see README), and
    // so does a short option the rule does not list in `file_options` (bash's lists none).
    assert_eq!(
        env.run_ok(
            "a",
            "cd /srv/w && bash -c 'echo \"$@\"' _ --input=/srv/w/pats -o/srv/w/pats --x=./pats --y=pats -la --z=/nonexistent"
        )
        .trim(),
        "--input=/shuttle/from/a/srv/w/pats -o/srv/w/pats \
         --x=/shuttle/from/a/srv/w/pats --y=pats -la --z=/nonexistent"
    );
    // grep's rule lists -f, not -e: `-e/srv/w/pats` is a pattern, matched as written (in b).
    env.run_ok("a", "echo /srv/w/pats >> /srv/w/data");
    assert_eq!(
        env.run_ok("a", "grep -e/srv/w/pats /srv/w/data"),
        "/srv/w/pats\n"
    );
    // A real program reads a file named in an option, long and short.
    assert_eq!(
        env.run_ok("a", "grep --file=/srv/w/pats /srv/w/data"),
        "b\nzz\n"
    );
    assert_eq!(
        env.run_ok("a", "cd /srv/w && grep -f./pats data"),
        "b\nzz\n"
    );
    // `--file=pats` is not transferred: b has no such file.
    let out = env.run("a", "cd /srv/w && grep --file=pats /srv/w/data");
    assert_code(&out, 2, "grep --file=pats");
    // Written through an option where the rule grants it...
    env.run_ok("a", "sort --output=/srv/w/out /srv/w/in");
    assert_eq!(env.run_ok("a", "head -c 100 /srv/w/out"), "1\n2\n3\n");
    // ... and refused where it does not (bash's rule passes files read-only).
    let out = env.run("a", "bash -c 'echo x > \"${1#--o=}\"' _ --o=/srv/w/ro-out");
    assert!(!out.status.success(), "wrote a read-only option file");
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.run_ok("a", "head -c 10 /srv/w/ro-out"), "");
    assert!(invokes(&env).iter().any(|r| r["object"] == "/usr/bin/sort"
        && r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("with 2 file argument(s) read-write"))));
}

/// An invoke rule from a to a itself: `shuttle run` inside a may start the program in a.
fn self_rule(object: &str) -> String {
    format!(
        "[[rule]]\nop = \"invoke\"\nfrom = \"a\"\nto = \"a\"\nobject = \"{object}\"\naction = \"allow\"\n\n"
    )
}

#[test]
fn shuttle_run_inside_a_vm_runs_there_and_elsewhere_only_where_an_invoke_rule_routes() {
    let Some(env) = Env::new() else { return };
    for vm in ["a", "b", "c"] {
        env.create(vm, &[]);
    }
    let run = |vm_args: &str, cmd: &str| format!("{IN_VM_SHUTTLE} run {vm_args} -- {cmd}");
    env.run_ok("a", "echo a-only > /etc/a-marker");
    // Not even in its own VM without a rule: a child of init holds none of its caller's
    // restrictions, so it is granted explicitly.
    let out = env.run("a", &run("", "hostname"));
    assert_code(&out, 126, "shuttle run inside a without a rule");
    assert!(
        stderr(&out).contains(
            "running /usr/bin/hostname in this VM (a) through shuttle run is not allowed by the \
             policy (no rule allows it from VM a to VM a"
        ),
        "{}",
        stderr(&out)
    );
    let own: String = [
        "/usr/bin/hostname",
        "/usr/bin/cat",
        "/usr/bin/sh",
        "/usr/bin/id",
    ]
    .iter()
    .map(|p| self_rule(p))
    .collect();
    load(&env, &own);
    // No VM named, or its own name: in the caller's VM, a child of its init (not of the
    // caller), as the caller.
    assert_eq!(env.run_ok("a", &run("", "hostname")).trim(), "a");
    assert_eq!(
        env.run_ok("a", &run("a", "cat /etc/a-marker")).trim(),
        "a-only"
    );
    assert_eq!(
        env.run_ok("a", &run("", "sh -c 'echo $PPID'")).trim(),
        "1",
        "not started by the VM's init"
    );
    let as_nobody = |cmd: &str| env.output(&["run", "a", "-u", "nobody", "--", "sh", "-c", cmd]);
    let out = as_nobody(&run("", "id -u"));
    assert_success(&out, "shuttle run as nobody inside a");
    assert_eq!(stdout(&out).trim(), "65534");
    // Only a caller holding CAP_SETUID and CAP_SETGID may name another user.
    let out = as_nobody(&run("-u root", "id -u"));
    assert_code(&out, 126, "nobody asking for root");
    assert!(
        stderr(&out).contains("only a caller holding CAP_SETUID and CAP_SETGID there"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.run_ok("a", &run("-u nobody", "id -u")).trim(), "65534");
    // The caller's own supplementary groups, not those a's /etc/group gives its uid.
    assert_eq!(
        env.run_ok(
            "a",
            &format!(
                "setpriv --reuid=65534 --regid=65534 --groups=4,100 {}",
                run("", "id -G")
            )
        )
        .trim(),
        "65534 4 100"
    );
    // A caller that restricted itself is refused: a narrower bounding set, a seccomp filter
    // of its own (allow-all, installed under the VM's no_new_privs).
    let out = env.run(
        "a",
        &format!("setpriv --bounding-set=-chown {}", run("", "id -u")),
    );
    assert_code(&out, 126, "a caller with a narrower bounding set");
    assert!(
        stderr(&out).contains("capability bounding set is narrower than the VM's"),
        "{}",
        stderr(&out)
    );
    let filtered = format!(
        r#"
import ctypes, os
class F(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
class P(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(F))]
f = (F * 1)(F(6, 0, 0, 0x7fff0000))
p = P(1, ctypes.cast(f, ctypes.POINTER(F)))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(22, 2, ctypes.byref(p), 0, 0) == 0, ctypes.get_errno()
os.execv("{IN_VM_SHUTTLE}", ["shuttle", "run", "--", "/usr/bin/id", "-u"])
"#
    );
    let out = env.exec("a", &["python3", "-c", &filtered]);
    assert_code(&out, 126, "a caller under a seccomp filter of its own");
    assert!(
        stderr(&out).contains("seccomp filter(s) of its own beyond the VM's"),
        "{}",
        stderr(&out)
    );
    // Another VM: refused without a rule, whatever the name says.
    let out = env.run("a", &run("b", "uname"));
    assert_code(&out, 126, "shuttle run b inside a without a rule");
    assert!(
        stderr(&out).contains(
            "running /usr/bin/uname in VM b is not allowed by the policy (no invoke rule"
        ),
        "{}",
        stderr(&out)
    );
    // A malformed name is refused (and audited as such).
    assert!(!env.run("a", &run("no-such-vm!", "true")).status.success());
    // With a rule routing the program to b: it runs in b; never in a VM the rule does not
    // name; and no longer in a itself (its rule routes it to b).
    let others: String = ["/usr/bin/cat", "/usr/bin/sh", "/usr/bin/id"]
        .iter()
        .map(|p| self_rule(p))
        .collect();
    load(&env, &format!("{}{others}", rule("/usr/bin/hostname", "")));
    assert_eq!(env.run_ok("a", &run("b", "hostname")).trim(), "b");
    let out = env.run("a", &run("c", "hostname"));
    assert_code(&out, 126, "shuttle run c with the rule routing to b");
    assert!(
        stderr(&out).contains("routes it to VM b)"),
        "{}",
        stderr(&out)
    );
    let out = env.run("a", &run("", "/usr/bin/hostname"));
    assert_code(&out, 126, "shuttle run in a with the rule routing to b");
    // A rule for other VMs never grants a run in the caller's own: b is among `@any` here,
    // and the rule routes to b, yet b may not run hostname in itself without a rule of its own.
    let any = "[[rule]]\nop = \"invoke\"\nfrom = \"@any\"\nto = \"b\"\nobject = \"/usr/bin/uname\"\naction = \"allow\"\n\n";
    load(
        &env,
        &format!("{}{others}{any}", rule("/usr/bin/hostname", "")),
    );
    let out = env.run("b", &run("", "uname"));
    assert_code(&out, 126, "shuttle run uname inside b under an @any rule");
    assert!(
        stderr(&out).contains("no rule allows it from VM b to VM b"),
        "{}",
        stderr(&out)
    );
    // Every one audited, with the VM the caller named.
    let records = audit(&env);
    let seen: Vec<(&str, &str, &str)> = records
        .iter()
        .filter(|r| r["from"] == "a" && (r["op"] == "run" || r["op"] == "invoke"))
        .map(|r| {
            (
                r["op"].as_str().unwrap(),
                r["to"].as_str().unwrap_or(""),
                r["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("run", "a", "deny"),
            ("run", "a", "allow"),
            ("run", "a", "allow"),
            ("run", "a", "allow"),
            ("run", "a", "allow"),
            ("run", "a", "deny"),
            ("run", "a", "allow"),
            ("run", "a", "allow"),
            ("run", "a", "deny"),
            ("run", "a", "deny"),
            ("invoke", "b", "deny"),
            ("invoke", "", "deny"),
            ("invoke", "b", "allow"),
            ("invoke", "c", "deny"),
            ("run", "a", "deny"),
        ],
        "{records:?}"
    );
    // The rule that allowed each run is named.
    assert!(records
        .iter()
        .filter(|r| r["op"] == "run" && r["result"] == "allow")
        .all(|r| !r["rule"].is_null()));
}

#[test]
fn a_vm_holds_a_bounded_number_of_api_connections() {
    let Some(env) = Env::new() else { return };
    env.create("a", &[]);
    // 128 idle connections held open: the next one is answered with an error at once (no
    // host thread waits for it); once they close, requests are served again.
    let code = format!(
        r#"
import socket, subprocess, time
def attempt():
    r = subprocess.run(["{IN_VM_SHUTTLE}", "run", "--", "/usr/bin/true"], capture_output=True, text=True)
    return r.stderr.strip()
held = []
for i in range(128):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect("/run/shuttle/broker.sock")
    held.append(s)
time.sleep(0.3)
print("full:", attempt())
for s in held:
    s.close()
for i in range(50):
    time.sleep(0.1)
    answer = attempt()
    if "connections to Shuttle open already" not in answer:
        break
print("after:", answer)
"#
    );
    let out = env.py_ok("a", &code);
    assert!(
        out.contains("full: shuttle: VM a has 128 connections to Shuttle open already"),
        "{out}"
    );
    assert!(
        out.contains("after: shuttle: running /usr/bin/true in this VM (a) through shuttle run is not allowed"),
        "{out}"
    );
}
