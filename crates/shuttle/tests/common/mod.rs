//! Harness for the privileged end-to-end tests: each test gets its own `SHUTTLE_ROOT`, drives
//! the real `shuttle` binary, and leaves nothing behind (VMs, mounts, cgroups, locks), even when
//! it panics.
//!
//! Privileged tests fail when they cannot run (not root). Setting `SHUTTLE_SKIP_PRIVILEGED=1`
//! makes them return early instead; CI never sets it.

// Every test binary compiles this module and uses only part of it.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The exit status `shuttle` uses when it fails itself.
pub const EXIT_SHUTTLE_FAILED: i32 = 125;

/// Whether privileged tests should run: true as root; false (with a note) when
/// `SHUTTLE_SKIP_PRIVILEGED=1`; panics otherwise, so that a CI run without root fails loudly.
pub fn privileged() -> bool {
    if std::env::var("SHUTTLE_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("SHUTTLE_SKIP_PRIVILEGED=1: skipping a privileged test");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged tests need root (namespaces, mounts, cgroups); run them as root, \
         or set SHUTTLE_SKIP_PRIVILEGED=1 to skip them explicitly"
    );
    true
}

/// One isolated Shuttle installation (state and runtime under a fresh temporary directory).
#[derive(Debug)]
pub struct Env {
    pub root: TempDir,
    /// Host cgroup directories seen for this installation's VMs; all must be gone at the end.
    cgroups: RefCell<Vec<PathBuf>>,
}

impl Env {
    /// A fresh installation under /tmp, or None when privileged tests are skipped.
    pub fn new() -> Option<Env> {
        Env::new_in("/tmp")
    }

    /// A fresh installation under `parent` (keep it short: unix socket paths are limited).
    pub fn new_in(parent: &str) -> Option<Env> {
        if !privileged() {
            return None;
        }
        let root = tempfile::Builder::new()
            .prefix("sh")
            .tempdir_in(parent)
            .expect("creating the SHUTTLE_ROOT temporary directory");
        Some(Env {
            root,
            cgroups: RefCell::new(Vec::new()),
        })
    }

    pub fn bin() -> &'static str {
        env!("CARGO_BIN_EXE_shuttle")
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    pub fn state_vms(&self) -> PathBuf {
        self.path().join("state/vms")
    }

    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.state_vms().join(vm)
    }

    pub fn upper(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm).join("upper")
    }

    pub fn run_vms(&self) -> PathBuf {
        self.path().join("run/vms")
    }

    pub fn runtime_dir(&self, vm: &str) -> PathBuf {
        self.run_vms().join(vm)
    }

    pub fn lock_file(&self, vm: &str) -> PathBuf {
        self.run_vms().join(format!("{vm}.lock"))
    }

    /// `shuttle ARGS...` with this installation's SHUTTLE_ROOT and no stdin.
    pub fn cmd<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(Env::bin());
        c.args(args)
            .env("SHUTTLE_ROOT", self.path())
            .env_remove("SHUTTLE_LOG")
            .stdin(Stdio::null());
        c
    }

    pub fn output<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(AsRef::as_ref).collect();
        self.cmd(&args)
            .output()
            .unwrap_or_else(|e| panic!("spawning shuttle {args:?}: {e}"))
    }

    /// Runs `shuttle ARGS...`, asserts success and returns its stdout.
    pub fn ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let out = self.output(args);
        let args: Vec<_> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        assert!(
            out.status.success(),
            "shuttle {args:?} failed with {}:\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `shuttle ARGS...`, asserts that shuttle itself failed (status 125) with a one-line
    /// `shuttle: ...` message, and returns that message.
    pub fn fails<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let out = self.output(args);
        let args: Vec<_> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(EXIT_SHUTTLE_FAILED),
            "shuttle {args:?} should have failed with status 125, got {}:\nstdout: {}\nstderr: {stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "shuttle {args:?}: expected exactly one line of error, got {stderr:?}"
        );
        assert!(
            lines[0].starts_with("shuttle: "),
            "shuttle {args:?}: error should start with `shuttle: `, got {stderr:?}"
        );
        lines[0].to_owned()
    }

    /// `shuttle vm create NAME EXTRA...`, asserting success.
    pub fn create(&self, vm: &str, extra: &[&str]) {
        let mut args = vec!["vm", "create", vm];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    /// `shuttle run VM -- ARGS...` (stdin null).
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, vm: &str, cmd: &[S]) -> Output {
        let mut args: Vec<&std::ffi::OsStr> = vec!["run".as_ref(), vm.as_ref(), "--".as_ref()];
        args.extend(cmd.iter().map(AsRef::as_ref));
        self.output(&args)
    }

    /// `shuttle run VM -- sh -c SCRIPT`.
    pub fn run(&self, vm: &str, script: &str) -> Output {
        self.exec(vm, &["sh", "-c", script])
    }

    /// `shuttle run VM -- sh -c SCRIPT`, asserting exit status 0; returns stdout.
    pub fn run_ok(&self, vm: &str, script: &str) -> String {
        let out = self.run(vm, script);
        assert_success(&out, &format!("in VM {vm}: {script}"));
        stdout(&out)
    }

    /// `shuttle run VM -- python3 -c CODE`, asserting exit status 0; returns stdout.
    pub fn py_ok(&self, vm: &str, code: &str) -> String {
        let out = self.exec(vm, &["python3", "-c", code]);
        assert_success(&out, &format!("in VM {vm}: python3 -c {code}"));
        stdout(&out)
    }

    /// `vm ls --json`, parsed.
    pub fn vms(&self) -> Vec<Value> {
        let out = self.ok(&["vm", "ls", "--json"]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`vm ls --json` printed invalid JSON ({e}): {out}"));
        v.as_array()
            .unwrap_or_else(|| panic!("`vm ls --json` should print an array: {out}"))
            .clone()
    }

    /// This VM's entry in `vm ls --json`.
    pub fn vm(&self, vm: &str) -> Value {
        self.vms()
            .into_iter()
            .find(|v| v["name"] == vm)
            .unwrap_or_else(|| panic!("VM {vm} missing from `vm ls --json`"))
    }

    pub fn state(&self, vm: &str) -> String {
        self.vm(vm)["state"]
            .as_str()
            .unwrap_or_else(|| panic!("VM {vm}: `state` is not a string"))
            .to_owned()
    }

    /// The host PID of the running VM's init.
    pub fn init_pid(&self, vm: &str) -> i32 {
        let v = self.vm(vm);
        let pid = v["init_pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("VM {vm} has no init_pid (is it running?): {v}"));
        i32::try_from(pid).expect("pid fits in i32")
    }

    /// The host directories of the running VM's cgroup (found through its init's
    /// /proc/PID/cgroup), remembered so that the end of the test checks they are gone.
    pub fn cgroup_dirs(&self, vm: &str) -> Vec<PathBuf> {
        let pid = self.init_pid(vm);
        let dirs = cgroup_dirs_of(pid);
        assert!(
            !dirs.is_empty(),
            "VM {vm}: found no shuttle cgroup directory for its init (pid {pid}): {}",
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
        );
        for d in &dirs {
            assert!(
                d.iter()
                    .any(|c| c.to_string_lossy().starts_with("shuttle-")),
                "VM {vm}: cgroup {} is not under a shuttle-* parent",
                d.display()
            );
            assert!(
                d.ends_with(vm),
                "VM {vm}: cgroup {} is not named after the VM",
                d.display()
            );
        }
        self.cgroups.borrow_mut().extend(dirs.iter().cloned());
        dirs
    }

    /// Whether some process (the VM's monitor) holds the VM's lock.
    pub fn lock_held(&self, vm: &str) -> bool {
        lock_held(&self.lock_file(vm))
    }

    fn names_on_disk(&self) -> Vec<String> {
        std::fs::read_dir(self.state_vms())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes every VM and returns what is left behind, if anything.
    fn clean_up(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut names = self.names_on_disk();
        match self.cmd(&["vm", "ls", "--json"]).output() {
            Ok(out) if out.status.success() => {
                if let Ok(Value::Array(vms)) = serde_json::from_slice::<Value>(&out.stdout) {
                    for v in vms {
                        // Remember the cgroups of running VMs, to check they go away.
                        if let Some(pid) = v["init_pid"].as_i64() {
                            let dirs = cgroup_dirs_of(i32::try_from(pid).unwrap_or(0));
                            let mut seen = self.cgroups.borrow_mut();
                            for d in dirs {
                                if !seen.contains(&d) {
                                    seen.push(d);
                                }
                            }
                        }
                        if let Some(n) = v["name"].as_str() {
                            if !names.iter().any(|x| x == n) {
                                names.push(n.to_owned());
                            }
                        }
                    }
                }
            }
            Ok(out) => problems.push(format!(
                "`vm ls --json` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => problems.push(format!("running `vm ls --json`: {e}")),
        }
        for n in &names {
            // A short grace period first, so that clean-up stays quick when a test left a
            // process that ignores SIGTERM.
            let _ = self.cmd(&["vm", "stop", "-t", "1", n.as_str()]).output();
            match self.cmd(&["vm", "rm", "--force", n.as_str()]).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => problems.push(format!(
                    "`vm rm --force {n}` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )),
                Err(e) => problems.push(format!("running `vm rm --force {n}`: {e}")),
            }
        }
        // The broker goes last: removing VMs goes through it (and would start a new one).
        let pid_file = self.path().join("run/broker.pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if !wait_for(Duration::from_secs(5), || {
                nix::sys::signal::kill(pid, None).is_err() || is_zombie(pid.as_raw())
            }) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                problems.push(format!("the broker (pid {pid}) did not stop on SIGTERM"));
            }
        }
        for n in self.names_on_disk() {
            problems.push(format!(
                "{} is left after `vm rm --force`",
                self.vm_dir(&n).display()
            ));
        }
        if let Ok(rd) = std::fs::read_dir(self.run_vms()) {
            for e in rd.filter_map(Result::ok) {
                let p = e.path();
                if p.is_dir() {
                    problems.push(format!("runtime directory {} is left", p.display()));
                }
                if p.extension().is_some_and(|x| x == "lock") && lock_held(&p) {
                    problems.push(format!("lock {} is still held", p.display()));
                }
            }
        }
        for d in self.cgroups.borrow().iter() {
            if d.exists() {
                problems.push(format!("cgroup {} is left", d.display()));
            }
        }
        let root = self.path().to_string_lossy().into_owned();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mountinfo.lines().filter(|l| l.contains(&root)) {
            problems.push(format!("mount left on the host: {line}"));
        }
        problems
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let problems = self.clean_up();
        if problems.is_empty() {
            return;
        }
        let msg = format!("clean-up left things behind:\n  {}", problems.join("\n  "));
        if std::thread::panicking() {
            eprintln!("{msg}");
        } else {
            panic!("{msg}");
        }
    }
}

/// Whether some process holds an flock on `path`.
pub fn lock_held(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(_locked) => false,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => true,
        Err((_, e)) => panic!("flock {}: {e}", path.display()),
    }
}

/// The host directories of the shuttle cgroups `pid` belongs to (v1, hybrid and v2 layouts).
pub fn cgroup_dirs_of(pid: i32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        if !path.contains("/shuttle") {
            continue;
        }
        let rel = path.trim_start_matches('/');
        let mut candidates = Vec::new();
        if controllers.is_empty() {
            candidates.push(Path::new("/sys/fs/cgroup").join(rel));
            candidates.push(Path::new("/sys/fs/cgroup/unified").join(rel));
        } else {
            candidates.push(Path::new("/sys/fs/cgroup").join(controllers).join(rel));
            for c in controllers.split(',') {
                let c = c.trim_start_matches("name=");
                candidates.push(Path::new("/sys/fs/cgroup").join(c).join(rel));
            }
        }
        for c in candidates {
            if c.is_dir() && !dirs.contains(&c) {
                dirs.push(c);
            }
        }
    }
    dirs
}

/// Host PIDs of every process whose cgroup path contains `needle`.
pub fn pids_in_cgroup(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cg
            .lines()
            .any(|l| l.ends_with(needle) || l.contains(&format!("{needle}/")))
        {
            pids.push(pid);
        }
    }
    pids
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// Asserts the exit code, showing the output otherwise.
pub fn assert_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit status {code}, got {}:\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// A child process killed (and reaped) when dropped, so that a failing test leaves no
/// `shuttle run` behind.
#[derive(Debug)]
pub struct Guard(pub Child);

impl Guard {
    /// Waits up to `timeout` for the child to exit; panics (killing it) otherwise.
    pub fn wait_timeout(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.0.try_wait().expect("waiting for a child") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let st = self.0.wait().expect("reaping a killed child");
                panic!("child did not exit within {timeout:?} (killed: {st})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads the child's stdout until it contains `pattern` (a byte at a time, so that nothing
    /// after the pattern is consumed: use for short output); returns what was read.
    pub fn read_until(&mut self, pattern: &str, timeout: Duration) -> String {
        let out = self.0.stdout.as_mut().expect("child stdout is piped");
        let fd = std::os::fd::AsFd::as_fd(out);
        let deadline = Instant::now() + timeout;
        let mut acc = Vec::new();
        loop {
            if String::from_utf8_lossy(&acc).contains(pattern) {
                return String::from_utf8_lossy(&acc).into_owned();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {pattern:?} from the child within {timeout:?}; got {:?}",
                String::from_utf8_lossy(&acc)
            );
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).expect("poll");
            if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                let mut buf = [0u8; 1];
                let n = nix::unistd::read(fd, &mut buf).expect("reading the child's stdout");
                assert!(
                    n > 0,
                    "child's stdout closed before {pattern:?}; got {:?}",
                    String::from_utf8_lossy(&acc)
                );
                acc.extend_from_slice(&buf[..n]);
            }
        }
    }

    /// The rest of the child's stdout (until EOF).
    pub fn rest_of_stdout(&mut self) -> String {
        let mut s = String::new();
        if let Some(out) = self.0.stdout.as_mut() {
            let _ = out.read_to_string(&mut s);
        }
        s
    }

    pub fn write_stdin(&mut self, data: &[u8]) {
        self.0
            .stdin
            .as_mut()
            .expect("child stdin is piped")
            .write_all(data)
            .expect("writing to the child's stdin");
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("pid fits"));
        nix::sys::signal::kill(pid, sig).expect("signalling the child");
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The signal that killed a process, or its exit code, for messages.
pub fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => format!("{st}"),
    }
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A host directory outside /tmp (which every VM replaces by its own tmpfs), so that the VM
/// sees it through its copy-on-write root.
pub fn host_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("shuttle-test")
        .tempdir_in("/var/tmp")
        .expect("creating a temporary directory in /var/tmp")
}

/// Whether `pid` has exited but was not reaped yet (its parent may be gone).
pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Writes `policy` beside the test's state and loads it with `shuttle policy load`.
pub fn load_policy(env: &Env, policy: &str) {
    let file = env.path().join("policy.toml");
    std::fs::write(&file, policy).unwrap();
    assert_success(
        &env.output(&["policy", "load", file.to_str().unwrap()]),
        "policy load",
    );
}

/// Every audit record so far, from `shuttle audit --json`.
pub fn audit_records(env: &Env) -> Vec<Value> {
    stdout(&env.output(&["audit", "--json"]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
