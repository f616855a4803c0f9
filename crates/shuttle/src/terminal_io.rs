//! How `shuttle run` connects the caller's terminal to a command without ever handing the
//! terminal itself to the VM.
//!
//! Pipes and files are passed to the command as they are: the kernel carries the data. A
//! terminal is different: whoever holds a descriptor of it can read what is typed into it for as
//! long as they keep it, long after the command ended (a daemon left in the VM would read the
//! user's next commands). So when stdin is a terminal the command gets a pseudo-terminal of
//! the VM's own and `shuttle run` relays bytes between the two, with the caller's terminal in
//! raw mode (as ssh and `docker run -t` do); when only stdout or stderr is a terminal, the
//! command writes to a pipe that `shuttle run` copies to it.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, SetArg, Termios};

/// The caller's terminal in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

impl std::fmt::Debug for RawMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawMode")
    }
}

impl RawMode {
    pub fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// Copies `from` to `to` until end of file, or, once `done` is set, until `from` stays quiet
/// for a moment (a process left in the VM may hold the other end open forever).
pub fn copy_until_done(
    from: OwnedFd,
    mut to: impl Write + Send + 'static,
    done: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut file = std::fs::File::from(from);
        let mut buf = [0u8; 16 * 1024];
        loop {
            let ready = {
                let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
                let wait = if done.load(Ordering::SeqCst) {
                    50u16
                } else {
                    100
                };
                match poll(&mut fds, PollTimeout::from(wait)) {
                    Ok(0) => false,
                    Ok(_) => true,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                }
            };
            if !ready {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            match file.read(&mut buf) {
                // EOF, or EIO: every process holding the terminal's other side is gone.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Copies this process's stdin to `to` (a terminal's master side) for as long as both last.
/// Runs detached: a read from a terminal cannot be interrupted, and the process exits anyway.
pub fn copy_stdin_to(to: OwnedFd) {
    std::thread::spawn(move || {
        let mut out = std::fs::File::from(to);
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// A pipe for a command's output whose read end a thread copies to `to`.
pub fn output_pipe(
    to: impl Write + Send + 'static,
    done: Arc<AtomicBool>,
) -> std::io::Result<(OwnedFd, JoinHandle<()>)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((w, copy_until_done(r, to, done)))
}

/// The window size of `fd`, or a common default.
pub fn size_of(fd: BorrowedFd<'_>) -> (u16, u16) {
    shuttle_sys::terminal::window_size(fd)
        .filter(|(r, c)| *r > 0 && *c > 0)
        .unwrap_or((24, 80))
}

/// Waits briefly for relays to finish after the command ended.
pub fn finish(done: &AtomicBool, relays: Vec<JoinHandle<()>>) {
    done.store(true, Ordering::SeqCst);
    for r in relays {
        let _ = r.join();
    }
}

/// The part of a session that runs while the command does, shared by `shuttle run` and the
/// invoke stub: with `master` (the command's pseudo-terminal) the caller's terminal goes
/// into raw mode and is relayed both ways; the signals `signals` catches go to `forward`
/// (until it returns false), except SIGWINCH with a terminal, which resizes it (the kernel then
/// tells its foreground process group); `wait` blocks until the command ends. Afterwards the
/// relays are given a moment to drain and the terminal is restored.
pub fn relay_session<T>(
    master: Option<OwnedFd>,
    mut signals: signal_hook::iterator::Signals,
    mut relays: Vec<JoinHandle<()>>,
    done: Arc<AtomicBool>,
    mut forward: impl FnMut(i32) -> bool + Send + 'static,
    wait: impl FnOnce() -> T,
) -> std::io::Result<T> {
    let mut raw = None;
    let mut winch_target = None;
    if let Some(m) = &master {
        raw = RawMode::enter();
        copy_stdin_to(m.try_clone()?);
        relays.push(copy_until_done(
            m.try_clone()?,
            std::io::stdout(),
            Arc::clone(&done),
        ));
        winch_target = Some(m.try_clone()?);
    }
    drop(master);
    let handle = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for sig in signals.forever() {
            if let (libc::SIGWINCH, Some(m)) = (sig, &winch_target) {
                let (rows, cols) = size_of(std::io::stdin().as_fd());
                let _ = shuttle_sys::terminal::set_window_size(m.as_fd(), rows, cols);
                continue;
            }
            if !forward(sig) {
                break;
            }
        }
    });
    let result = wait();
    handle.close();
    let _ = forwarder.join();
    finish(&done, relays);
    drop(raw);
    Ok(result)
}
