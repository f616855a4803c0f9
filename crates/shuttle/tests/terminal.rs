//! `shuttle run` on a terminal: the command gets the caller's terminal itself (test -t, stty),
//! echo and line editing are the terminal's, and Ctrl-C interrupts the command.

// Making the pseudo-terminal the controlling terminal of the spawned `shuttle run` needs
// `setsid` + `TIOCSCTTY` between fork and exec (`Command::pre_exec`, which is unsafe). The
// workspace denies unsafe code for the product; this test needs it only for that hook.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::pty::{openpty, Winsize};

use common::{describe, Env, Guard};

struct Pty {
    master: OwnedFd,
    run: Guard,
    /// Read from the terminal but not yet matched by `expect`.
    pending: std::cell::RefCell<Vec<u8>>,
}

impl Pty {
    fn spawn(env: &Env, args: &[&str]) -> Pty {
        let ws = Winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&ws), None).expect("openpty");
        let mut cmd = env.cmd(args);
        cmd.stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
            .stderr(Stdio::from(pty.slave.try_clone().unwrap()))
            .env("TERM", "xterm");
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let run = Guard(cmd.spawn().expect("spawning shuttle run on a pty"));
        drop(cmd);
        drop(pty.slave);
        Pty {
            master: pty.master,
            run,
            pending: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// Reads from the terminal until `pattern` shows up; returns everything up to the end of
    /// the match and keeps the rest for the next call.
    fn expect(&self, pattern: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut acc = std::mem::take(&mut *self.pending.borrow_mut());
        loop {
            if let Some(at) = acc
                .windows(pattern.len())
                .position(|w| w == pattern.as_bytes())
            {
                let rest = acc.split_off(at + pattern.len());
                *self.pending.borrow_mut() = rest;
                return String::from_utf8_lossy(&acc).into_owned();
            }
            let text = String::from_utf8_lossy(&acc).into_owned();
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {pattern:?} on the terminal within {timeout:?}; got {text:?}"
            );
            let mut fds = [nix::poll::PollFd::new(
                self.master.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).expect("poll");
            if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                let mut buf = [0u8; 4096];
                match nix::unistd::read(self.master.as_fd(), &mut buf) {
                    Ok(0) | Err(nix::errno::Errno::EIO) => {
                        panic!("terminal closed before {pattern:?}; got {text:?}")
                    }
                    Ok(n) => acc.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("reading the pty: {e}"),
                }
            }
        }
    }

    fn send(&self, data: &[u8]) {
        let n = nix::unistd::write(&self.master, data).expect("writing to the pty");
        assert_eq!(n, data.len());
    }
}

#[test]
fn command_runs_on_the_callers_terminal() {
    let Some(env) = Env::new() else { return };
    env.create("tty", &[]);
    let mut t = Pty::spawn(
        &env,
        &[
            "run", "tty", "--", "sh", "-c",
            "test -t 0 && test -t 1 && echo IS_TTY; stty size; echo \"term=$TERM\"; read x; echo got:$x",
        ],
    );
    t.expect("IS_TTY", Duration::from_secs(10));
    t.expect("33 101", Duration::from_secs(5));
    t.expect("term=xterm", Duration::from_secs(5));
    t.send(b"hello\n");
    // The terminal echoes the input, then the command answers.
    let seen = t.expect("got:hello", Duration::from_secs(5));
    assert!(seen.contains("hello\r\n"), "no echo of the input: {seen:?}");
    let st = t.run.wait_timeout(Duration::from_secs(10));
    assert!(st.success(), "{}", describe(st));
}

#[test]
fn ctrl_c_interrupts_the_command() {
    let Some(env) = Env::new() else { return };
    env.create("ctrlc", &[]);
    let mut t = Pty::spawn(
        &env,
        &[
            "run",
            "ctrlc",
            "--",
            "sh",
            "-c",
            "echo ready; exec sleep 100",
        ],
    );
    t.expect("ready", Duration::from_secs(10));
    // Give `exec sleep` a moment to replace the shell.
    std::thread::sleep(Duration::from_millis(200));
    t.send(b"\x03");
    let st = t.run.wait_timeout(Duration::from_secs(10));
    assert_eq!(st.code(), Some(130), "Ctrl-C: got {}", describe(st));
    let ps = env.run_ok("ctrlc", "ps -e -o args=");
    assert!(
        !ps.contains("sleep 100"),
        "the command survived Ctrl-C:\n{ps}"
    );
}

#[test]
fn window_size_changes_reach_the_command() {
    let Some(env) = Env::new() else { return };
    env.create("winch", &[]);
    let mut t = Pty::spawn(
        &env,
        &[
            "run",
            "winch",
            "--",
            "sh",
            "-c",
            "trap 'echo size:$(stty size)' WINCH; echo ready; while :; do sleep 0.05; done",
        ],
    );
    t.expect("ready", Duration::from_secs(10));
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the fd is our pty master.
    let rc = unsafe { libc::ioctl(t.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    t.expect("size:40 120", Duration::from_secs(5));
    t.send(b"\x03");
    let st = t.run.wait_timeout(Duration::from_secs(10));
    assert_eq!(st.code(), Some(130), "Ctrl-C: got {}", describe(st));
}
