//! Real-world acceptance: PostgreSQL across VMs. A real server runs in VM db (its own data
//! directory, socket directory and network namespace); psql and pgbench in VM app reach it
//! through `connect` rules on its unix socket, where `peer` authentication sees the caller's
//! own uid, and on tcp:5432, where a password is needed. A VM without rules gets exactly what
//! it would get without Shuttle, and its attempts are audited. The server restarts (a new
//! socket) and the app reconnects; a rule removed at run time refuses the next connection.
//!
//! PostgreSQL must be installed (`scripts/install-deps.sh`: postgresql-15 and
//! postgresql-client-15). These tests fail without it; `SHUTTLE_SKIP_POSTGRES=1` skips them
//! explicitly (CI never sets it).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::{assert_success, stderr, stdout, Env};
use serde_json::Value;

const SOCKET_DIR: &str = "/run/postgresql";
const SOCKET: &str = "/run/postgresql/.s.PGSQL.5432";
const DATA: &str = "/srv/pgdata";
const PASSWORD: &str = "shuttle-test-secret";

/// The unix socket is the server's own; psql in app must name it (libpq's Debian default,
/// /var/run/postgresql, is another address as far as the policy is concerned).
const UNIX_RULE: &str = "unix:/run/postgresql/.s.PGSQL.5432";
const TCP_RULE: &str = "tcp:5432";

/// The server's configuration, appended to initdb's postgresql.conf.
const SERVER_CONF: &str = "
listen_addresses = '127.0.0.1,::1'   # the VM's own loopback
port = 5432
unix_socket_directories = '/run/postgresql'
# The test's data is thrown away: no waiting for the disk.
fsync = off
synchronous_commit = off
full_page_writes = off
";

/// Unix socket: `peer`, the OS user the kernel reports (SO_PEERCRED) mapped by pg_ident.conf,
/// so the role a client gets proves which uid reached the server. Loopback TCP (what a
/// tcp:5432 rule reaches): the server cannot learn who the caller is (no peer credentials on
/// TCP), so `trust` would hand every VM the rule admits any role, superuser included; a
/// password (scram-sha-256) keeps PostgreSQL's own authentication in force across the channel.
const PG_HBA: &str = "\
local all all peer map=vms
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
";

/// OS user `postgres` may be role postgres; OS user `nobody` (uid 65534) may be role reader,
/// and nobody else may.
const PG_IDENT: &str = "\
vms postgres postgres
vms nobody reader
";

/// The directory holding postgres, initdb, pg_ctl, pgbench and psql (Debian:
/// /usr/lib/postgresql/VERSION/bin, the newest complete one), or None when
/// `SHUTTLE_SKIP_POSTGRES=1`. Panics when PostgreSQL is missing, so that CI fails loudly.
fn pg_bin() -> Option<PathBuf> {
    if std::env::var("SHUTTLE_SKIP_POSTGRES").as_deref() == Ok("1") {
        eprintln!("SHUTTLE_SKIP_POSTGRES=1: skipping a PostgreSQL test");
        return None;
    }
    let tools = ["postgres", "initdb", "pg_ctl", "pgbench", "psql"];
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            tools
                .iter()
                .all(|t| bin.join(t).is_file())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    let bin = found.pop().map(|(_, bin)| bin);
    assert!(
        bin.is_some(),
        "PostgreSQL not found (no /usr/lib/postgresql/VERSION/bin with {tools:?}): install \
         postgresql-15 and postgresql-client-15 (scripts/install-deps.sh does), or set \
         SHUTTLE_SKIP_POSTGRES=1 to skip these tests explicitly"
    );
    bin
}

/// One test's installation, PostgreSQL tools and VM names (unique per test).
struct Pg {
    env: Env,
    bin: PathBuf,
    db: String,
    app: String,
}

/// Who connects, from where, to what: a client's point of view.
#[derive(Clone, Copy)]
struct Client<'a> {
    vm: &'a str,
    /// The OS user the client runs as in its VM.
    os_user: &'a str,
    /// A socket directory or a loopback address.
    host: &'a str,
    /// The database role asked for.
    role: &'a str,
}

impl Pg {
    /// A fresh installation with VMs `PREFIX-db` and `PREFIX-app` created, or None when the
    /// test is skipped explicitly.
    fn new(prefix: &str) -> Option<Pg> {
        let env = Env::new()?;
        let bin = pg_bin()?;
        let (db, app) = (format!("{prefix}-db"), format!("{prefix}-app"));
        env.create(&db, &[]);
        env.create(&app, &[]);
        Some(Pg { env, bin, db, app })
    }

    fn tool(&self, name: &str) -> String {
        self.bin.join(name).to_string_lossy().into_owned()
    }

    /// `shuttle run VM -u USER [-e VAR]... -- CMD...`.
    fn run_as(&self, vm: &str, user: &str, vars: &[String], cmd: &[&str]) -> Output {
        let mut args: Vec<String> = vec!["run".into(), vm.into(), "-u".into(), user.into()];
        for v in vars {
            args.extend(["-e".into(), v.clone()]);
        }
        args.push("--".into());
        args.extend(cmd.iter().map(|c| (*c).to_owned()));
        self.env.output(&args)
    }

    fn run_as_ok(&self, vm: &str, user: &str, cmd: &[&str]) -> String {
        let out = self.run_as(vm, user, &[], cmd);
        assert_success(&out, &format!("in VM {vm} as {user}: {cmd:?}"));
        stdout(&out)
    }

    /// Writes (or appends to) a file in a VM as `user`, through the VM itself (never behind
    /// the back of its mounted overlay).
    fn write(&self, vm: &str, user: &str, path: &str, content: &str, append: bool) {
        let script = if append {
            r#"printf %s "$1" >> "$2""#
        } else {
            r#"printf %s "$1" > "$2""#
        };
        self.run_as_ok(vm, user, &["sh", "-c", script, "sh", content, path]);
    }

    /// initdb in VM db, configured as above, started with pg_ctl (it keeps running as a
    /// daemon of the VM), and given its roles.
    fn start_server(&self) {
        let db = self.db.as_str();
        // A socket directory of our own. A host whose /run is not a separate file system shows
        // its own /run/postgresql (perhaps with a host server's socket and lock file) through
        // the VM's copy-on-write root: whatever is there is removed in this VM alone.
        self.run_as_ok(
            db,
            "root",
            &[
                "sh",
                "-c",
                &format!(
                    "install -d -o postgres -g postgres -m 0700 {DATA} && \
                     install -d -o postgres -g postgres -m 2775 {SOCKET_DIR} && \
                     rm -f {SOCKET} {SOCKET}.lock"
                ),
            ],
        );
        self.run_as_ok(
            db,
            "postgres",
            &[
                &self.tool("initdb"),
                "-D",
                DATA,
                "-U",
                "postgres",
                "--locale=C",
                "-E",
                "UTF8",
                "--no-sync",
                "-A",
                "peer",
                "--auth-host=scram-sha-256",
            ],
        );
        self.write(
            db,
            "postgres",
            &format!("{DATA}/postgresql.conf"),
            SERVER_CONF,
            true,
        );
        self.write(
            db,
            "postgres",
            &format!("{DATA}/pg_hba.conf"),
            PG_HBA,
            false,
        );
        self.write(
            db,
            "postgres",
            &format!("{DATA}/pg_ident.conf"),
            PG_IDENT,
            false,
        );
        self.pg_ctl("start");
        let sql = format!("CREATE ROLE reader LOGIN; ALTER ROLE postgres PASSWORD '{PASSWORD}';");
        let server = Client {
            vm: db,
            os_user: "postgres",
            host: SOCKET_DIR,
            role: "postgres",
        };
        assert_success(&self.psql(server, &sql), "creating roles in VM db");
    }

    /// `pg_ctl ACTION` in VM db, waiting for it to finish. The server's output goes to its
    /// log file, so that no pipe of this test stays open in the daemon.
    fn pg_ctl(&self, action: &str) {
        let log = format!("{DATA}/server.log");
        let out = self.run_as(
            &self.db,
            "postgres",
            &[],
            &[
                &self.tool("pg_ctl"),
                "-D",
                DATA,
                "-l",
                &log,
                "-w",
                "-t",
                "30",
                "-m",
                "fast",
                action,
            ],
        );
        if !out.status.success() {
            let log = self.run_as(&self.db, "root", &[], &["cat", &log]);
            panic!(
                "pg_ctl {action} in VM {} failed with {}:\n{}{}\nserver log:\n{}",
                self.db,
                out.status,
                stdout(&out),
                stderr(&out),
                stdout(&log)
            );
        }
    }

    /// Loads a policy letting app connect to db at each of `objects`.
    fn allow(&self, objects: &[&str]) {
        let mut policy = String::new();
        for o in objects {
            policy.push_str(&format!(
                "[[rule]]\nop = \"connect\"\nfrom = \"{}\"\nto = \"{}\"\nobject = \"{o}\"\naction = \"allow\"\n\n",
                self.app, self.db
            ));
        }
        let file = self.env.path().join("policy.toml");
        std::fs::write(&file, policy).unwrap();
        assert_success(
            &self.env.output(&["policy", "load", file.to_str().unwrap()]),
            "policy load",
        );
    }

    /// libpq's environment for `c`: over TCP the password (never prompted for), and a
    /// connection timeout so that nothing hangs.
    fn vars(c: Client<'_>) -> Vec<String> {
        let mut vars = vec!["PGCONNECT_TIMEOUT=10".to_owned()];
        if !c.host.starts_with('/') {
            vars.push(format!("PGPASSWORD={PASSWORD}"));
        }
        vars
    }

    /// psql running `sql` as client `c` (unaligned, tuples only, never prompting).
    fn psql(&self, c: Client<'_>, sql: &str) -> Output {
        let psql = self.tool("psql");
        let cmd = [
            psql.as_str(),
            "-X",
            "-w",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            c.host,
            "-U",
            c.role,
            "-d",
            "postgres",
            "-c",
            sql,
        ];
        self.run_as(c.vm, c.os_user, &Self::vars(c), &cmd)
    }

    /// The single value `sql` returns to client `c`, asserting success.
    fn query(&self, c: Client<'_>, sql: &str) -> String {
        let out = self.psql(c, sql);
        assert_success(
            &out,
            &format!(
                "psql in VM {} as {} to {} as role {}: {sql}",
                c.vm, c.os_user, c.host, c.role
            ),
        );
        stdout(&out).trim().to_owned()
    }

    /// pgbench as client `c` with `args`, asserting success; returns its report.
    fn pgbench(&self, c: Client<'_>, args: &[&str]) -> String {
        let pgbench = self.tool("pgbench");
        let mut cmd = vec![pgbench.as_str(), "-h", c.host, "-U", c.role];
        cmd.extend_from_slice(args);
        cmd.push("postgres");
        let out = self.run_as(c.vm, c.os_user, &Self::vars(c), &cmd);
        assert_success(
            &out,
            &format!("pgbench in VM {} to {}: {args:?}", c.vm, c.host),
        );
        stdout(&out)
    }

    /// Audit records, parsed, for `shuttle audit ARGS... --json`.
    fn audit(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["audit", "--json"];
        all.extend_from_slice(args);
        self.env
            .ok(&all)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A psql failure that is about reaching the server at all (what a client gets where nothing
/// listens), with its message.
fn connection_failure(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: psql should fail to connect (exit 2), got {}:\nstdout: {}\nstderr: {err}",
        out.status,
        stdout(out)
    );
    assert!(
        err.contains("No such file or directory") || err.contains("Connection refused"),
        "{what}: expected a connection failure, got {err:?}"
    );
    err
}

#[test]
fn psql_and_pgbench_reach_db_through_its_unix_socket_and_tcp_as_the_caller() {
    let Some(pg) = Pg::new("pgreach") else { return };
    pg.start_server();
    pg.allow(&[UNIX_RULE, TCP_RULE]);
    let unix = Client {
        vm: &pg.app,
        os_user: "postgres",
        host: SOCKET_DIR,
        role: "postgres",
    };
    let tcp = Client {
        os_user: "root",
        host: "127.0.0.1",
        ..unix
    };

    // Peer authentication sees the caller's own uid: only OS user nobody (uid 65534) of app is
    // mapped to role reader, OS user postgres to role postgres, and root to neither.
    let nobody = Client {
        os_user: "nobody",
        role: "reader",
        ..unix
    };
    assert_eq!(pg.query(nobody, "SELECT current_user"), "reader");
    assert_eq!(pg.query(unix, "SELECT current_user"), "postgres");
    let out = pg.psql(
        Client {
            os_user: "root",
            ..nobody
        },
        "SELECT 1",
    );
    assert!(
        !out.status.success()
            && stderr(&out).contains("Peer authentication failed for user \"reader\""),
        "root in app must not pass as reader: {}{}",
        stdout(&out),
        stderr(&out)
    );

    // TCP: an ordinary password-authenticated client of db's own loopback.
    assert_eq!(
        pg.query(
            tcp,
            "SELECT current_user || ' ' || host(inet_client_addr())"
        ),
        "postgres 127.0.0.1"
    );
    let out = pg.run_as(
        &pg.app,
        "root",
        &["PGPASSWORD=wrong".to_owned()],
        &[
            &pg.tool("psql"),
            "-X",
            "-w",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-c",
            "SELECT 1",
            "postgres",
        ],
    );
    assert!(
        !out.status.success()
            && stderr(&out).contains("password authentication failed for user \"postgres\""),
        "a wrong password must be refused: {}{}",
        stdout(&out),
        stderr(&out)
    );
    if std::path::Path::new("/proc/net/if_inet6").exists() {
        let v6 = Client { host: "::1", ..tcp };
        assert_eq!(pg.query(v6, "SELECT host(inet_client_addr())"), "::1");
    } else {
        eprintln!("no IPv6 on this host: the ::1 path of the tcp:5432 rule is not exercised");
    }

    // pgbench: initialised and run over the unix socket, then run over TCP with one new
    // connection per transaction.
    pg.pgbench(unix, &["-i", "-q", "-s", "1"]);
    let report = pg.pgbench(unix, &["-t", "50"]);
    assert!(
        report.contains("number of transactions actually processed: 50/50"),
        "{report}"
    );
    let report = pg.pgbench(tcp, &["-C", "-S", "-t", "50"]);
    assert!(
        report.contains("number of transactions actually processed: 50/50"),
        "{report}"
    );

    // It all happened in db's cluster.
    let in_db = Client { vm: &pg.db, ..unix };
    assert_eq!(
        pg.query(in_db, "SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    assert_eq!(
        pg.query(in_db, "SELECT sum(tbalance) <> 0 FROM pgbench_tellers"),
        "t"
    );
    // Every connection from app is audited as allowed (pgbench -C alone made 50; the broker
    // collects journals in the background).
    let mut records = Vec::new();
    common::wait_for(Duration::from_secs(10), || {
        records = pg.audit(&["--vm", &pg.app]);
        records.len() > 50
    });
    assert!(
        records.len() > 50
            && records
                .iter()
                .all(|r| r["from"] == pg.app.as_str() && r["result"] == "allow"),
        "{records:?}"
    );
}

#[test]
fn a_vm_without_rules_gets_what_it_would_without_shuttle_and_is_audited() {
    let Some(pg) = Pg::new("pgdeny") else { return };
    let other = "pgdeny-other";
    pg.env.create(other, &[]);
    pg.start_server();
    let unix = Client {
        vm: &pg.app,
        os_user: "postgres",
        host: SOCKET_DIR,
        role: "postgres",
    };
    let tcp = Client {
        host: "127.0.0.1",
        ..unix
    };
    // Before any rule, app is a VM where nothing listens: what its clients get is the baseline.
    let base_unix = connection_failure(&pg.psql(unix, "SELECT 1"), "app, no rule, unix");
    let base_tcp = connection_failure(&pg.psql(tcp, "SELECT 1"), "app, no rule, tcp");
    pg.allow(&[UNIX_RULE, TCP_RULE]);
    assert_eq!(pg.query(unix, "SELECT 1"), "1");
    assert_eq!(pg.query(tcp, "SELECT 1"), "1");

    // other has no rule: exactly the baseline, the server in db stays out of reach.
    let unix_other = connection_failure(
        &pg.psql(Client { vm: other, ..unix }, "SELECT 1"),
        "other, unix",
    );
    let tcp_other = connection_failure(
        &pg.psql(Client { vm: other, ..tcp }, "SELECT 1"),
        "other, tcp",
    );
    assert_eq!(unix_other, base_unix);
    assert_eq!(tcp_other, base_tcp);

    // ... and both attempts are audited as denials (the broker collects journals in the
    // background).
    let mut denied = Vec::new();
    let collected = common::wait_for(Duration::from_secs(10), || {
        denied = pg.audit(&["--vm", other, "--denied"]);
        denied.len() >= 2
    });
    assert!(collected, "other's denials were not audited: {denied:?}");
    let mut objects: Vec<&str> = denied.iter().filter_map(|r| r["object"].as_str()).collect();
    objects.sort_unstable();
    assert_eq!(objects, [TCP_RULE, UNIX_RULE], "{denied:?}");
    // The VMs' /etc/passwd is the host's (`--base host`).
    let postgres_uid = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("an OS user postgres")
        .uid
        .as_raw();
    for r in &denied {
        assert_eq!(r["op"], "connect", "{r}");
        assert_eq!(r["from"], other, "{r}");
        assert_eq!(r["result"], "deny", "{r}");
        assert_eq!(r["caller"]["program"], "psql", "{r}");
        assert_eq!(r["caller"]["uid"], postgres_uid, "{r}");
    }
}

#[test]
fn the_app_reconnects_after_a_restart_and_a_removed_rule_refuses_the_next_connection() {
    let Some(pg) = Pg::new("pgrestart") else {
        return;
    };
    pg.start_server();
    pg.allow(&[UNIX_RULE, TCP_RULE]);
    let unix = Client {
        vm: &pg.app,
        os_user: "postgres",
        host: SOCKET_DIR,
        role: "postgres",
    };
    let tcp = Client {
        host: "127.0.0.1",
        ..unix
    };
    let started = "SELECT pg_postmaster_start_time()";
    // Inode numbers are reused at once: the inode and its change time tell sockets apart.
    let inode = || pg.run_as_ok(&pg.db, "root", &["stat", "-c", "%i %z", SOCKET]);
    let (before, socket_before) = (pg.query(unix, started), inode());

    pg.pg_ctl("restart");
    assert_ne!(
        inode(),
        socket_before,
        "the restart should make a new socket"
    );
    let after = pg.query(unix, started);
    assert_ne!(after, before, "app should reach the restarted server");
    assert_eq!(pg.query(tcp, started), after);

    // The unix rule goes at run time: app's next connection there resolves in app itself and
    // finds nothing; the TCP rule still works.
    pg.allow(&[TCP_RULE]);
    connection_failure(&pg.psql(unix, "SELECT 1"), "app after the rule went");
    assert_eq!(pg.query(tcp, "SELECT 1"), "1");
    pg.allow(&[]);
    connection_failure(&pg.psql(tcp, "SELECT 1"), "app after every rule went");
}
