//! Whole systems from manifests, end to end: `shuttle up` starts applications in dependency
//! order behind readiness probes, a dependency that never becomes ready fails `up` and leaves
//! nothing running, crashed applications restart with backoff (and their dependents with
//! them when the manifest says so), whole VMs that stop come back, cycles are rejected with
//! file:line:column, `graph` draws the audited interactions, and both examples go up and down.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{stderr, stdout, wait_for, Env};
use serde_json::Value;

/// Runs `shuttle down FILE` when dropped (before the Env's own clean-up), so that no
/// supervisor outlives a failed test and restarts VMs under the clean-up.
struct Down<'a> {
    env: &'a Env,
    file: PathBuf,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = self
            .env
            .cmd(&["down".as_ref(), self.file.as_os_str()])
            .output();
    }
}

fn manifest(env: &Env, name: &str, text: &str) -> PathBuf {
    let dir = env.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("system.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn up<'a>(env: &'a Env, file: &Path) -> (Down<'a>, std::process::Output) {
    let guard = Down {
        env,
        file: file.to_owned(),
    };
    let out = env.output(&["up".as_ref(), file.as_os_str()]);
    (guard, out)
}

fn ps(env: &Env) -> Value {
    serde_json::from_str(&env.ok(&["ps", "--json"])).unwrap()
}

fn app(env: &Env, id: &str) -> Value {
    let ps = ps(env);
    for s in ps["systems"].as_array().unwrap() {
        for a in s["apps"].as_array().unwrap() {
            if a["id"] == id {
                return a.clone();
            }
        }
    }
    panic!("no application {id} in ps: {ps:#}");
}

fn supervisor_log(env: &Env, system: &str) -> String {
    std::fs::read_to_string(
        env.path()
            .join(format!("run/systems/{system}/supervisor.log")),
    )
    .unwrap_or_default()
}

fn assert_nothing_runs(env: &Env, system: &str) {
    assert!(
        !common::lock_held(
            &env.path()
                .join(format!("run/systems/{system}/supervisor.lock"))
        ),
        "the supervisor of {system} still runs"
    );
    for vm in env.vms() {
        assert_eq!(vm["state"], "stopped", "a VM still runs: {vm:#}");
    }
    let ps = ps(env);
    assert_eq!(ps["systems"].as_array().unwrap().len(), 0, "{ps:#}");
}

/// A unix socket server that starts listening after DELAY seconds.
fn server(path: &str, delay: &str) -> String {
    format!(
        "[\"python3\", \"-c\", \"import socket, time, os; time.sleep({delay}); s = socket.socket(socket.AF_UNIX); s.bind('{path}'); os.chmod('{path}', 0o666); s.listen(8)\\nwhile True: s.accept()[0].close()\"]"
    )
}

#[test]
fn up_starts_in_dependency_order_behind_readiness_and_down_stops_in_reverse() {
    let Some(env) = Env::new() else { return };
    // Declared dependents first: the order comes from `requires`, not from the file.
    let text = format!(
        r#"
name = "order"
[vm.front.app.client]
command = ["sh", "-c", "echo client started; sleep 0.5; touch /tmp/ok; exec sleep 1000"]
requires = ["back.server"]
ready = {{ command = ["test", "-e", "/tmp/ok"] }}

[vm.front.app.last]
command = ["sleep", "1000"]
requires = ["front.client"]

[vm.back.app.server]
command = {server}
ready = {{ socket = "/tmp/s.sock" }}
ready_timeout = "20s"
stop_timeout = "2s"
"#,
        server = server("/tmp/s.sock", "1.5")
    );
    let file = manifest(&env, "order", &text);
    let t = Instant::now();
    let (_down, out) = up(&env, &file);
    let err = stderr(&out);
    assert!(out.status.success(), "up failed: {err}");
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "up returned before the server was ready"
    );
    let pos = |needle: &str| {
        err.find(needle)
            .unwrap_or_else(|| panic!("`{needle}` missing from up's progress:\n{err}"))
    };
    assert!(pos("back.server              ready") < pos("front.client             started"));
    // A command probe: `last` waits until the client's `test -e /tmp/ok` succeeds.
    assert!(pos("front.client             ready") < pos("front.last               started"));
    assert!(err.contains("system order is up"), "{err}");
    let server = app(&env, "back.server");
    assert_eq!(server["state"], "ready");
    assert_eq!(server["restarts"], 0);
    assert!(
        server["uptime_secs"].is_u64() && server["pid"].is_i64(),
        "{server:#}"
    );
    assert_eq!(app(&env, "front.client")["state"], "ready");
    let logs = env.ok(&["logs", "front.client"]);
    assert!(logs.contains("client started"), "{logs}");
    // ps for people lists both, and the VMs.
    let table = env.ok(&["ps"]);
    assert!(
        table.contains("back.server") && table.contains("front"),
        "{table}"
    );

    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "down failed: {}", stderr(&out));
    let log = supervisor_log(&env, "order");
    let stopped = |id: &str| {
        log.find(&format!("{id} stopped"))
            .unwrap_or_else(|| panic!("{id} not stopped:\n{log}"))
    };
    assert!(stopped("front.last") < stopped("front.client"), "{log}");
    assert!(stopped("front.client") < stopped("back.server"), "{log}");
    assert_nothing_runs(&env, "order");
}

#[test]
fn a_dependency_that_never_becomes_ready_fails_up_and_leaves_nothing_running() {
    let Some(env) = Env::new() else { return };
    let text = r#"
name = "stuck"
[vm.side.app.other]
command = ["sleep", "1000"]

[vm.db.app.server]
command = ["sleep", "1000"]
ready = { socket = "/run/never.sock" }
ready_timeout = "1s"
stop_timeout = "2s"

[vm.web.app.shop]
command = ["sleep", "1000"]
requires = ["db.server"]
"#;
    let file = manifest(&env, "stuck", text);
    let (_down, out) = up(&env, &file);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(common::EXIT_SHUTTLE_FAILED),
        "{err}"
    );
    assert!(
        err.contains("db.server did not become ready within 1s (nothing listened on unix socket /run/never.sock)"),
        "{err}"
    );
    assert!(
        err.contains("nothing of system stuck is left running"),
        "{err}"
    );
    assert!(
        !err.contains("web.shop "),
        "the dependent must not start: {err}"
    );
    assert_nothing_runs(&env, "stuck");
    // An application that exits before it is ready (restart = "no") fails `up` at once.
    let file = manifest(
        &env,
        "crash",
        "name = \"crash\"\n[vm.db.app.server]\ncommand = [\"sh\", \"-c\", \"echo oops >&2; exit 4\"]\nrestart = \"no\"\nready = { port = 5555 }\n",
    );
    let (_down2, out) = up(&env, &file);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("db.server exited with status 4 before it was ready"),
        "{err}"
    );
    assert!(env.ok(&["logs", "db.server"]).contains("oops"));
    assert_nothing_runs(&env, "crash");
    // A program that does not exist in the VM fails `up` with the reason.
    let file = manifest(
        &env,
        "missing",
        "name = \"missing\"\n[vm.db.app.ghost]\ncommand = [\"/no/such/program\"]\nrestart = \"always\"\n",
    );
    let (_down3, out) = up(&env, &file);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("cannot start db.ghost: "), "{err}");
    assert!(err.contains("/no/such/program"), "{err}");
    assert_nothing_runs(&env, "missing");
}

#[test]
fn crashed_applications_restart_with_backoff_and_take_their_dependents_along() {
    let Some(env) = Env::new() else { return };
    let text = r#"
name = "crashy"
[vm.a.app.flaky]
command = ["sh", "-c", "echo up; sleep 0.4; exit 3"]
restart = "on-failure"

[vm.a.app.once]
command = ["sh", "-c", "sleep 2; exit 5"]
restart = "no"

[vm.b.app.follower]
command = ["sleep", "1000"]
requires = ["a.flaky"]
on_dependency_restart = "restart"
stop_timeout = "2s"

[vm.b.app.loyal]
command = ["sleep", "1000"]
requires = ["a.flaky"]
stop_timeout = "2s"

[vm.b.app.told]
command = ["sh", "-c", "trap 'echo told' HUP; while :; do sleep 0.1; done"]
requires = ["a.flaky"]
on_dependency_restart = "signal:HUP"
stop_timeout = "2s"
"#;
    let file = manifest(&env, "crashy", text);
    let (_down, out) = up(&env, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    // Backoff 0.5 s, 1 s, 2 s after runs of 0.4 s: the third restart comes about 5 s in.
    assert!(
        wait_for(Duration::from_secs(10), || app(&env, "a.flaky")["restarts"]
            .as_u64()
            .unwrap()
            >= 3),
        "{:#}",
        ps(&env)
    );
    let log = env.ok(&["logs", "a.flaky"]);
    for line in [
        "exited with status 3",
        "restarting in 500 ms",
        "restarting in 1000 ms",
        "restarting in 2000 ms",
    ] {
        assert!(log.contains(line), "`{line}` missing:\n{log}");
    }
    assert!(log.lines().filter(|l| *l == "up").count() >= 3, "{log}");
    let follower = app(&env, "b.follower");
    assert!(follower["restarts"].as_u64().unwrap() >= 2, "{follower:#}");
    assert!(env.ok(&["logs", "b.follower"]).contains("a.flaky restarts"));
    assert_eq!(
        app(&env, "b.loyal")["restarts"],
        0,
        "ignore keeps it running"
    );
    let told = env.ok(&["logs", "b.told"]);
    assert!(
        told.contains("[shuttle] told with signal 1: a.flaky restarted and is ready"),
        "{told}"
    );
    assert!(told.lines().filter(|l| *l == "told").count() >= 2, "{told}");
    assert_eq!(app(&env, "b.told")["restarts"], 0, "told, not restarted");
    let once = app(&env, "a.once");
    assert_eq!(once["state"], "failed", "{once:#}");
    assert_eq!(once["last_exit"], 5);

    // A whole VM that stops comes back with its applications.
    let before = app(&env, "b.loyal")["restarts"].as_u64().unwrap();
    env.ok(&["vm", "stop", "-t", "1", "b"]);
    assert!(
        wait_for(Duration::from_secs(15), || {
            let a = app(&env, "b.loyal");
            a["restarts"].as_u64().unwrap() > before && a["state"] == "ready"
        }),
        "{:#}",
        ps(&env)
    );
    assert_eq!(env.state("b"), "running");
    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_nothing_runs(&env, "crashy");
}

#[test]
fn cycles_and_undeclared_dependencies_are_rejected_before_anything_starts() {
    let Some(env) = Env::new() else { return };
    let text = "[vm.a.app.x]\ncommand = [\"true\"]\nrequires = [\"b.y\"]\n\n[vm.b.app.y]\ncommand = [\"true\"]\nrequires = [\"a.x\"]\n\n[vm.c.app.z]\ncommand = [\"true\"]\nrequires = [\"a.w\"]\n";
    let file = manifest(&env, "cycle", text);
    let (_down, out) = up(&env, &file);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(common::EXIT_SHUTTLE_FAILED),
        "{err}"
    );
    let f = file.display();
    assert!(
        err.contains(&format!(
            "{f}:7:13: error: dependency cycle: a.x -> b.y -> a.x"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{f}:11:13: error: `c.z` requires `a.w`, which the manifest does not declare"
        )),
        "{err}"
    );
    assert!(err.contains("hint: "), "{err}");
    assert!(err.contains("nothing was started"), "{err}");
    assert!(env.vms().is_empty(), "no VM may be created");
}

#[test]
fn graph_draws_vms_apps_dependencies_and_audited_interactions() {
    let Some(env) = Env::new() else { return };
    let dir = env.path().join("g");
    std::fs::create_dir_all(&dir).unwrap();
    // The policy inline, as the manifest's own [[rule]] tables.
    let text = format!(
        r#"
name = "g"
[[rule]]
name = "b-to-a"
op = "connect"
from = "b"
to = "a"
object = "unix:/run/g.sock"
action = "allow"

[vm.a.app.server]
command = {server}
ready = {{ socket = "/run/g.sock" }}

[vm.b.app.client]
command = ["python3", "-c", "import socket, time\ns = socket.socket(socket.AF_UNIX); s.connect('/run/g.sock'); print('connected', flush=True); time.sleep(1000)"]
requires = ["a.server"]

[vm.c.app.intruder]
command = ["sh", "-c", "python3 -c \"import socket; socket.socket(socket.AF_UNIX).connect('/run/g.sock')\" 2>&1 | tail -n 1; exec sleep 1000"]
"#,
        server = server("/run/g.sock", "0")
    );
    let file = dir.join("system.toml");
    std::fs::write(&file, text).unwrap();
    let (_down, out) = up(&env, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(wait_for(Duration::from_secs(10), || env
        .ok(&["logs", "b.client"])
        .contains("connected")));
    // The rule's location is the manifest's own line.
    let explain = env.ok(&[
        "policy",
        "explain",
        "--op",
        "connect",
        "--from",
        "b",
        "--object",
        "unix:/run/g.sock",
    ]);
    assert!(explain.contains(":3:1"), "{explain}");
    let graph = || -> Value {
        serde_json::from_str(&env.ok(&["graph".as_ref(), file.as_os_str(), "--json".as_ref()]))
            .unwrap()
    };
    assert!(
        wait_for(Duration::from_secs(10), || {
            let g = graph();
            let edges = g["edges"].as_array().unwrap();
            edges
                .iter()
                .any(|e| e["kind"] == "rule" && e["allowed"] == 1)
                && edges
                    .iter()
                    .any(|e| e["kind"] == "denied" && e["from"] == "c")
        }),
        "{:#}",
        graph()
    );
    let g = graph();
    let vms: Vec<&str> = g["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(&vms[..3], ["a", "b", "c"]);
    let dot = env.ok(&["graph".as_ref(), file.as_os_str()]);
    for needle in [
        "digraph \"g\" {",
        "subgraph \"cluster_a\"",
        "label=\"VM a\"",
        "\"a.server\" [label=\"server\\nready\", shape=box, style=\"rounded,filled\", fillcolor=\"#dafbe1\"]",
        "\"b.client\" -> \"a.server\" [label=\"requires\"",
        "\"vm:b\" -> \"vm:a\" [ltail=\"cluster_b\", lhead=\"cluster_a\", label=\"connect unix:/run/g.sock (b-to-a)\\nallowed 1, denied 0\"",
        "\"vm:c\" -> ",
    ] {
        assert!(dot.contains(needle), "`{needle}` missing from:\n{dot}");
    }
    // Without FILE: the one system that is up.
    assert_eq!(env.ok(&["graph"]), dot);
    let out = env.output(&[
        "graph".as_ref(),
        file.as_os_str(),
        "--format".as_ref(),
        "svg".as_ref(),
    ]);
    if which("dot") {
        assert!(stdout(&out).contains("<svg"), "{}", stderr(&out));
    } else {
        assert!(
            stderr(&out).contains("needs Graphviz's `dot`"),
            "{}",
            stderr(&out)
        );
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .join("system.toml")
        .canonicalize()
        .unwrap()
}

#[test]
fn example_logs_collects_from_every_producer_and_survives_a_collector_restart() {
    let Some(env) = Env::new() else { return };
    let file = example("logs");
    let (_down, out) = up(&env, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    let collected = || env.run_ok("collector", "cat /var/log/collected.log");
    assert!(
        wait_for(Duration::from_secs(10), || {
            let c = collected();
            c.contains("uid=65534 producer-a line 2") && c.contains("uid=65534 producer-b line 2")
        }),
        "{}",
        collected()
    );
    // The producers' client library is collector's, read-only in them (a component).
    assert!(env
        .upper("collector")
        .join("srv/collector/lib/logclient.py")
        .is_file());
    assert!(!env
        .upper("producer-a")
        .join("opt/collector-lib/logclient.py")
        .exists());
    assert!(env
        .run_ok("producer-b", "cat /opt/collector-lib/logclient.py")
        .contains("class LogClient"));
    assert_eq!(
        write_errno(&env, "producer-a", "/opt/collector-lib/logclient.py"),
        "EROFS"
    );
    let out = env.exec("collector", &["pkill", "-f", "^python3 /srv/collector"]);
    common::assert_success(&out, "pkill in VM collector");
    assert!(
        wait_for(Duration::from_secs(10), || {
            let p = app(&env, "producer-a.emit");
            app(&env, "collector.collector")["restarts"] == 1
                && p["restarts"].as_u64() >= Some(1)
                && p["state"] == "ready"
        }),
        "{:#}",
        ps(&env)
    );
    let before = collected().matches("producer-b line").count();
    assert!(
        wait_for(Duration::from_secs(10), || collected()
            .matches("producer-b line")
            .count()
            > before + 1),
        "producers write again after the restart"
    );
    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_nothing_runs(&env, "logs");
}

#[test]
fn example_shop_serves_the_catalogue_from_db_and_keeps_the_intruder_out() {
    if std::env::var("SHUTTLE_SKIP_POSTGRES").as_deref() == Ok("1") {
        eprintln!("SHUTTLE_SKIP_POSTGRES=1: skipping a PostgreSQL test");
        return;
    }
    assert!(
        Path::new("/usr/lib/postgresql/15/bin/postgres").exists(),
        "examples/shop needs PostgreSQL 15: run scripts/install-deps.sh"
    );
    let Some(env) = Env::new() else { return };
    let file = example("shop");
    let (_down, out) = up(&env, &file);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("db.postgres              setup: sh /srv/setup/init-db.sh"),
        "{err}"
    );
    let page = env.py_ok(
        "shop",
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/', timeout=10).read().decode())",
    );
    assert!(page.contains("shop|teapot|24.50"), "{page}");
    // An invoice printed by VM printer's program through the invoke rule, on the shop's file.
    let printed = env.py_ok(
        "shop",
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/invoice', timeout=10).read().decode())",
    );
    assert!(
        printed.contains(
            "printed 3 lines on printer (/shuttle/from/shop/srv/shop/invoices/invoice.txt)"
        ),
        "{printed}"
    );
    assert!(env
        .run_ok("printer", "cat /tmp/printed-invoices.log")
        .contains("teapot|24.50"));
    assert!(
        wait_for(Duration::from_secs(15), || env
            .ok(&["audit", "--denied", "--json"])
            .contains("\"from\":\"intruder\"")),
        "the intruder's attempts are audited as denials"
    );
    let dot = env.ok(&["graph".as_ref(), file.as_os_str()]);
    assert!(dot.contains("\"shop.web\" -> \"db.postgres\""), "{dot}");
    assert!(dot.contains("shop-reads-catalogue"), "{dot}");
    assert!(dot.contains("\"vm:intruder\" -> "), "{dot}");

    // Down and up again: the database is kept, its set-up is not repeated.
    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_nothing_runs(&env, "shop");
    let (_down2, out) = up(&env, &file);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("setup: sh /srv/setup/init-db.sh"),
        "set-up ran twice: {err}"
    );
    let page = env.py_ok(
        "shop",
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/', timeout=10).read().decode())",
    );
    assert!(page.contains("shop|kettle|39.00"), "{page}");
    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_nothing_runs(&env, "shop");
}

#[test]
fn down_while_up_still_waits_stops_everything() {
    let Some(env) = Env::new() else { return };
    let text = "name = \"slow\"\n[vm.a.app.server]\ncommand = [\"sleep\", \"1000\"]\nready = { port = 4444 }\nready_timeout = \"60s\"\nstop_timeout = \"2s\"\n";
    let file = manifest(&env, "slow", text);
    let _down = Down {
        env: &env,
        file: file.clone(),
    };
    let up = env
        .cmd(&["up".as_ref(), file.as_os_str()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let state = env.path().join("run/systems/slow/state.json");
    assert!(
        wait_for(Duration::from_secs(20), || std::fs::read_to_string(&state)
            .is_ok_and(|s| s.contains("\"starting\""))),
        "the application never started"
    );
    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = up.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("stopped (SIGTERM) before every application was ready"),
        "{err}"
    );
    assert_nothing_runs(&env, "slow");
}

/// Runs `python3 -c CODE` in `vm` and returns its stdout (whatever the status).
fn py(env: &Env, vm: &str, code: &str) -> String {
    stdout(&env.exec(vm, &["python3", "-c", code]))
}

/// The errno name `open(PATH, "w")` fails with in `vm`, or `ok`.
fn write_errno(env: &Env, vm: &str, path: &str) -> String {
    py(
        env,
        vm,
        &format!(
            "import errno\ntry:\n    open('{path}', 'w').write('x')\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])"
        ),
    )
    .trim()
    .to_owned()
}

#[test]
fn a_component_is_a_directory_of_the_provider_vm_read_only_in_the_consumer_after_its_provider() {
    let Some(env) = Env::new() else { return };
    // The directory exists only in VM build's own overlay, made by its application: web's
    // share of it is refused when web starts, and made once build.make is ready.
    let text = r#"
name = "comp"
[vm.web]
components = [{ from = "build.make", path = "/srv/site", at = "/var/www" }]

[vm.web.app.server]
command = ["sh", "-c", "cat /var/www/index.html; touch /var/www/new 2>&1; exec sleep 1000"]
stop_timeout = "2s"

[vm.build.app.make]
command = ["sh", "-c", "sleep 1; mkdir -p /srv/site; echo made in VM build > /srv/site/index.html; touch /tmp/built; exec sleep 1000"]
ready = { command = ["test", "-e", "/tmp/built"] }
stop_timeout = "2s"
"#;
    let file = manifest(&env, "comp", text);
    let (_down, out) = up(&env, &file);
    let err = stderr(&out);
    assert!(out.status.success(), "up failed: {err}");
    let pos = |needle: &str| {
        err.find(needle)
            .unwrap_or_else(|| panic!("`{needle}` missing from up's progress:\n{err}"))
    };
    assert!(
        pos("web.server               waiting for build.make to be ready")
            < pos("build.make               ready"),
        "{err}"
    );
    assert!(pos("build.make               ready") < pos("web.server               started"));
    // The provider's own file (not the host's: the host has no /srv/site/index.html).
    assert!(env.upper("build").join("srv/site/index.html").is_file());
    assert!(!Path::new("/srv/site/index.html").exists());
    // At its start, the server read the provider's file and could not write beside it.
    assert!(
        wait_for(Duration::from_secs(10), || {
            let log = env.ok(&["logs", "web.server"]);
            log.contains("made in VM build") && log.contains("Read-only file system")
        }),
        "{}",
        env.ok(&["logs", "web.server"])
    );
    assert_eq!(
        env.run_ok("web", "cat /var/www/index.html"),
        "made in VM build\n"
    );
    assert_eq!(write_errno(&env, "web", "/var/www/index.html"), "EROFS");
    assert_eq!(write_errno(&env, "web", "/var/www/other"), "EROFS");
    // What the provider writes shows at once (a mount, not a copy); nothing web tried landed.
    env.run_ok("build", "echo v2 > /srv/site/index.html");
    assert_eq!(env.run_ok("web", "cat /var/www/index.html"), "v2\n");
    assert!(!env.upper("build").join("srv/site/new").exists());
    assert!(!env.upper("web").join("var/www/new").exists());
    // A share rule of the system's layer, audited, and drawn as an edge.
    let explain = env.ok(&[
        "policy",
        "explain",
        "--op",
        "share",
        "--from",
        "web",
        "--object",
        "/srv/site",
    ]);
    assert!(
        explain.contains("components.toml") && explain.contains("allow"),
        "{explain}"
    );
    assert!(wait_for(Duration::from_secs(10), || common::audit_records(
        &env
    )
    .iter()
    .any(|r| r["op"] == "share"
        && r["from"] == "web"
        && r["to"] == "build"
        && r["result"] == "allow")));
    let g: Value =
        serde_json::from_str(&env.ok(&["graph".as_ref(), file.as_os_str(), "--json".as_ref()]))
            .unwrap();
    let edge = g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "component")
        .unwrap_or_else(|| panic!("no component edge: {g:#}"))
        .clone();
    assert_eq!(
        (edge["from"].as_str(), edge["to"].as_str()),
        (Some("web"), Some("build"))
    );
    assert!(edge["allowed"].as_u64() >= Some(1), "{edge:#}");
    assert!(
        !g["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "denied" && e["from"] == "web"),
        "the share records are the component's: {g:#}"
    );

    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_nothing_runs(&env, "comp");
    // The system's rules went with it.
    assert!(!env.path().join("state/policy/layers/comp.json").exists());
}

#[test]
fn a_bad_component_is_an_error_at_its_line_and_changes_nothing() {
    let Some(env) = Env::new() else { return };
    let text = "name = \"badcomp\"\n[vm.web]\ncomponents = [\n  { from = \"biuld\", path = \"/srv/site\" },\n  { from = \"db\", path = \"srv\", at = \"/opt/x\" },\n]\n[vm.web.app.server]\ncommand = [\"sleep\", \"1000\"]\n[vm.db.app.pg]\ncommand = [\"sleep\", \"1000\"]\n";
    let file = manifest(&env, "badcomp", text);
    let (_down, out) = up(&env, &file);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(common::EXIT_SHUTTLE_FAILED),
        "{err}"
    );
    let f = file.display();
    assert!(
        err.contains(&format!(
            "{f}:4:12: error: component from VM `biuld`, which the manifest does not declare"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{f}:5:25: error: component path `srv` is not absolute"
        )),
        "{err}"
    );
    assert!(err.contains("hint: "), "{err}");
    assert!(err.contains("nothing was started"), "{err}");
    assert!(env.vms().is_empty(), "no VM may be created");
    assert!(
        !env.path().join("state/policy/layers").exists()
            || std::fs::read_dir(env.path().join("state/policy/layers"))
                .unwrap()
                .next()
                .is_none(),
        "no rule may be added"
    );
}

const BASE_POLICY: &str = "[[rule]]\nname = \"base\"\nop = \"signal\"\nfrom = \"x\"\nto = \"y\"\nobject = \"sleep\"\naction = \"allow\"\n";

fn explain_signal(env: &Env, from: &str) -> String {
    env.ok(&[
        "policy", "explain", "--op", "signal", "--from", from, "--to", "y", "--object", "sleep",
    ])
}

#[test]
fn a_systems_rules_are_a_layer_and_down_stops_only_what_up_started() {
    let Some(env) = Env::new() else { return };
    common::load_policy(&env, BASE_POLICY);
    // Running before `up`: down must leave it.
    env.create("pre", &[]);
    env.ok(&["vm", "start", "pre"]);
    let text = "name = \"layer\"\n[[rule]]\nname = \"sys\"\nop = \"signal\"\nfrom = \"pre\"\nto = \"y\"\nobject = \"sleep\"\naction = \"allow\"\n\n[vm.pre.app.a]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n[vm.fresh.app.b]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n";
    let file = manifest(&env, "layer", text);
    let (_down, out) = up(&env, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    // Both the loaded policy's rule and the system's decide.
    assert!(
        explain_signal(&env, "x").contains("allow"),
        "{}",
        explain_signal(&env, "x")
    );
    let sys = explain_signal(&env, "pre");
    assert!(
        sys.contains("allow") && sys.contains("layer/system.toml:2:1"),
        "{sys}"
    );
    // Loading another policy while the system is up keeps the system's rules.
    common::load_policy(&env, &BASE_POLICY.replace("from = \"x\"", "from = \"z\""));
    assert!(explain_signal(&env, "pre").contains("allow"));
    assert!(explain_signal(&env, "z").contains("allow"));

    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let line = |vm: &str| {
        err.lines()
            .find(|l| l.trim_start().starts_with(&format!("VM {vm} ")))
            .unwrap_or_else(|| panic!("no line for VM {vm}: {err}"))
            .to_owned()
    };
    assert!(
        line("pre").ends_with(
            "left running: it was running before `shuttle up` (stop it with `shuttle vm stop pre`)"
        ),
        "{err}"
    );
    assert!(line("fresh").ends_with(" stopped"), "{err}");
    assert_eq!(env.state("pre"), "running");
    assert_eq!(env.state("fresh"), "stopped");
    // Only the system's rule went.
    assert!(
        !explain_signal(&env, "pre").contains("allow"),
        "{}",
        explain_signal(&env, "pre")
    );
    assert!(explain_signal(&env, "z").contains("allow"));

    // A system rule the loaded policy makes unreachable: an error naming both, nothing starts.
    env.ok(&["vm", "stop", "pre"]);
    let clash = text.replace("from = \"pre\"", "from = \"z\"");
    let file = manifest(
        &env,
        "clash",
        &clash.replace("name = \"layer\"", "name = \"clash\""),
    );
    let (_down2, out) = up(&env, &file);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(
            "clash/system.toml:2:1: error: rule #1 \"sys\" can never match: rule #1 \"base\" at "
        ),
        "{err}"
    );
    assert!(err.contains("the active policy is unchanged"), "{err}");
    assert_eq!(env.state("pre"), "stopped");
    assert_eq!(env.state("fresh"), "stopped");
}

/// A policy source damaged on disk: nothing that would need the policy without it goes
/// ahead (a load, a VM start), yet `down` still stops the system's VMs and says that its
/// rules stayed; once the damage is gone, `down` again removes them.
#[test]
fn down_stops_its_vms_when_its_rules_cannot_be_removed_and_says_so() {
    let Some(env) = Env::new() else { return };
    let text = "name = \"stuck\"\n[[rule]]\nop = \"signal\"\nfrom = \"stk\"\nto = \"y\"\nobject = \"sleep\"\naction = \"allow\"\n\n[vm.stk.app.a]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n";
    let file = manifest(&env, "stuck", text);
    let (_down, out) = up(&env, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    let layers = env.path().join("state/policy/layers");
    let damaged = layers.join("zz.json");
    std::fs::write(&damaged, "[").unwrap();

    let policy = env.path().join("p.toml");
    std::fs::write(&policy, BASE_POLICY).unwrap();
    let out = env.output(&["policy".as_ref(), "load".as_ref(), policy.as_os_str()]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("zz.json"), "{err}");

    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("zz.json"), "{err}");
    assert!(
        err.contains("system stuck is down, but its rules are still part of the active policy"),
        "{err}"
    );
    assert_eq!(env.state("stk"), "stopped");
    assert!(layers.join("stuck.json").exists());
    assert_nothing_runs(&env, "stuck");
    // A VM does not start with a policy that cannot be built whole.
    let out = env.output(&["vm", "start", "stk"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the active policy cannot be built"), "{err}");
    assert_eq!(env.state("stk"), "stopped");

    std::fs::remove_file(&damaged).unwrap();
    let out = env.output(&["down".as_ref(), file.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!layers.join("stuck.json").exists());
}

/// Systems' rules apply in the order of the systems' names, so where two systems' rules
/// overlap with different actions, `up` (and `policy load`) say which one decides.
#[test]
fn overlapping_rules_of_two_systems_with_different_actions_are_a_warning_naming_both() {
    let Some(env) = Env::new() else { return };
    let system = |name: &str, from: &str, action: &str| {
        format!("name = \"{name}\"\n[[rule]]\nop = \"signal\"\nfrom = \"{from}\"\nto = \"y\"\nobject = \"sleep\"\naction = \"{action}\"\n\n[vm.{name}-vm.app.a]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n")
    };
    let alpha = manifest(&env, "alpha", &system("alpha", "web", "allow"));
    let beta = manifest(&env, "beta", &system("beta", "@any", "deny"));
    let (_down_a, out) = up(&env, &alpha);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("warning"), "{err}");
    let (_down_b, out) = up(&env, &beta);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let warning = format!(
        "warning: system alpha's rule #1 at {}:2:1 (allow) and system beta's rule #1 at {}:2:1 (deny) may match the same requests: for those, system alpha's rule decides",
        alpha.canonicalize().unwrap().display(),
        beta.canonicalize().unwrap().display()
    );
    assert!(err.contains(&warning), "{err}");
    // As warned: alpha's allow decides for web, beta's deny for the others.
    assert!(explain_signal(&env, "web").contains("allow"));
    assert!(explain_signal(&env, "other").contains("deny"));
    let policy = env.path().join("p.toml");
    std::fs::write(&policy, BASE_POLICY).unwrap();
    let out = env.output(&["policy".as_ref(), "load".as_ref(), policy.as_os_str()]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&warning), "{err}");
}

#[test]
fn changed_vm_options_are_an_error_that_says_how_to_recreate() {
    let Some(env) = Env::new() else { return };
    env.create("opt", &["--memory", "64M", "--tag", "old"]);
    let text = "name = \"opts\"\n[vm.opt]\nmemory = \"128M\"\ntags = [\"new\"]\n[vm.opt.app.a]\ncommand = [\"sleep\", \"1000\"]\n";
    let file = manifest(&env, "opts", text);
    let (_down, out) = up(&env, &file);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(common::EXIT_SHUTTLE_FAILED),
        "{err}"
    );
    assert!(
        err.contains("existing VMs differ from the manifest"),
        "{err}"
    );
    assert!(
        err.contains("VM opt: memory 64M (manifest: 128M); tags [\"old\"] (manifest: [\"new\"])"),
        "{err}"
    );
    assert!(err.contains("shuttle vm rm --force NAME"), "{err}");
    assert_eq!(env.state("opt"), "stopped", "nothing started");
    // Matching options: up goes ahead with the VM as it is.
    let same = text.replace("128M", "64M").replace("\"new\"", "\"old\"");
    let file = manifest(&env, "opts", &same);
    let (_down2, out) = up(&env, &file);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("VM opt                   exists (kept as it is)"));
}

#[test]
fn application_logs_rotate_at_their_bound_and_logs_shows_them_in_order() {
    let Some(env) = Env::new() else { return };
    // 400 numbered lines of 50 bytes (20 000 bytes) against a bound of 4 000 bytes.
    let text = "name = \"rot\"\n[vm.r.app.talk]\ncommand = [\"python3\", \"-c\", \"import sys, time\\nfor i in range(400):\\n    sys.stdout.write('line %05d ' % i + 'x' * 38 + '\\\\n'); sys.stdout.flush()\\nprint('done', flush=True)\\ntime.sleep(1000)\"]\nstop_timeout = \"1s\"\n";
    let file = manifest(&env, "rot", text);
    let _down = Down {
        env: &env,
        file: file.clone(),
    };
    let out = env
        .cmd(&["up".as_ref(), file.as_os_str()])
        .env("SHUTTLE_APP_LOG_MAX", "4000")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = env.path().join("state/systems/rot/logs/r.talk.log");
    let previous = env.path().join("state/systems/rot/logs/r.talk.log.1");
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("done"))),
        "{:?}",
        std::fs::read_to_string(&log)
    );
    for f in [&log, &previous] {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len > 0 && len <= 4000, "{}: {len} bytes", f.display());
    }
    // `logs`: the previous file, then the current one: consecutive lines up to the last.
    let shown = env.ok(&["logs", "r.talk"]);
    let numbers: Vec<u32> = shown
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|l| l[..5].parse().unwrap())
        .collect();
    assert_eq!(numbers.last(), Some(&399), "{shown}");
    // At least a whole file's worth (the bound, 80 lines of 50 bytes) is always kept.
    assert!(numbers.len() >= 79, "{} lines kept", numbers.len());
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "lines out of order or lost: {numbers:?}"
    );
    assert!(shown.trim_end().ends_with("done"), "{shown}");
}

#[test]
fn a_vm_two_systems_use_is_stopped_by_the_last_down() {
    let Some(env) = Env::new() else { return };
    let one = manifest(
        &env,
        "one",
        "name = \"one\"\n[vm.shared.app.a]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n[vm.solo.app.b]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n",
    );
    let two = manifest(
        &env,
        "two",
        "name = \"two\"\n[vm.shared.app.c]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n",
    );
    let (_down1, out) = up(&env, &one);
    assert!(out.status.success(), "{}", stderr(&out));
    let (_down2, out) = up(&env, &two);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.output(&["down".as_ref(), one.as_os_str()]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("left running: system two, which is up, uses it too"),
        "{err}"
    );
    assert_eq!(env.state("shared"), "running");
    assert_eq!(env.state("solo"), "stopped");
    assert_eq!(app(&env, "shared.c")["state"], "ready");
    let out = env.output(&["down".as_ref(), two.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_nothing_runs(&env, "two");
}

#[test]
fn a_component_that_never_appears_fails_up_and_leaves_nothing_running() {
    let Some(env) = Env::new() else { return };
    let text = "name = \"nocomp\"\n[vm.web]\ncomponents = [{ from = \"build\", path = \"/srv/never\" }]\n[vm.web.app.server]\ncommand = [\"sleep\", \"1000\"]\nready_timeout = \"2s\"\n[vm.build.app.idle]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n";
    let file = manifest(&env, "nocomp", text);
    let (_down, out) = up(&env, &file);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(common::EXIT_SHUTTLE_FAILED),
        "{err}"
    );
    assert!(
        err.contains("web.server waited 2s for its components and still misses build:/srv/never at /srv/never"),
        "{err}"
    );
    assert!(err.contains("shuttle audit --vm web"), "{err}");
    assert!(
        err.contains("nothing of system nocomp is left running"),
        "{err}"
    );
    assert_nothing_runs(&env, "nocomp");
    assert!(!env.path().join("state/policy/layers/nocomp.json").exists());
    // The refusal and its reason are in the audit.
    assert!(common::audit_records(&env)
        .iter()
        .any(|r| r["op"] == "share"
            && r["from"] == "web"
            && r["result"] == "error"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("/srv/never"))));
}

#[test]
fn logs_follow_carries_on_across_rotations() {
    let Some(env) = Env::new() else { return };
    // 60 lines of 50 bytes, one every 25 ms, against a bound of 500 bytes: a rotation about
    // every quarter of a second while `logs --follow` reads.
    let text = "name = \"follow\"\n[vm.f.app.talk]\ncommand = [\"python3\", \"-c\", \"import sys, time\\ntime.sleep(1)\\nfor i in range(60):\\n    sys.stdout.write('line %05d ' % i + 'x' * 38 + '\\\\n'); sys.stdout.flush(); time.sleep(0.025)\\nprint('done', flush=True)\\ntime.sleep(1000)\"]\nstop_timeout = \"1s\"\n";
    let file = manifest(&env, "follow", text);
    let _down = Down {
        env: &env,
        file: file.clone(),
    };
    let out = env
        .cmd(&["up".as_ref(), file.as_os_str()])
        .env("SHUTTLE_APP_LOG_MAX", "500")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut follow = common::Guard(
        env.cmd(&["logs", "--follow", "f.talk"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let shown = follow.read_until("done", Duration::from_secs(20));
    let numbers: Vec<u32> = shown
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|l| l[..5].parse().unwrap())
        .collect();
    assert_eq!(numbers, (0..60).collect::<Vec<u32>>(), "{shown}");
    assert!(env
        .path()
        .join("state/systems/follow/logs/f.talk.log.1")
        .exists());
}
