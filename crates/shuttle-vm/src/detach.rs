//! Starting Shuttle's long-lived roles (a VM's monitor, the broker) as detached processes that
//! report readiness on a pipe.

use std::fs;
use std::io::{self, BufRead};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `exe ARGS... FD` with stdio to `log` and a clean environment, where FD is the write
/// end of a pipe on which the new process writes one line (`ok` or `error: ...`) once it is
/// ready, then returns that line (empty if the process died first). The process detaches
/// itself (setsid) and outlives the caller.
///
/// The environment is cleared because a monitor's VM init is forked from it without exec, and
/// any root process in the VM can read init's environment in /proc/1/environ: nothing of the
/// caller's may leak there.
pub fn spawn_detached(exe: &Path, args: &[&str], log: &Path) -> io::Result<String> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let (ready_read, ready_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // The write end must survive this one exec. Another thread of the caller spawning at the
    // same moment could inherit it too; that is harmless: every role closes all inherited
    // descriptors but its own first, and we read one line, not to end of file.
    fcntl(&ready_write, FcntlArg::F_SETFD(FdFlag::empty()))?;
    let mut cmd = Command::new(exe);
    cmd.env_clear().env("PATH", PATH);
    // One malloc arena and a fixed mmap threshold: these roles' few threads allocate little,
    // and glibc would otherwise give each thread an arena and, once the first large receive
    // buffer is freed, raise the threshold and keep such buffers in a heap that never shrinks:
    // hundreds of KiB more for every idle VM. (glibc tunables; ignored by other C libraries.)
    cmd.env("MALLOC_ARENA_MAX", "1")
        .env("MALLOC_MMAP_THRESHOLD_", "131072");
    for passed in ["SHUTTLE_ROOT", "SHUTTLE_LOG"] {
        if let Some(v) = std::env::var_os(passed) {
            cmd.env(passed, v);
        }
    }
    let spawned = cmd
        .args(args)
        .arg(ready_write.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn();
    drop(ready_write);
    let mut child = spawned?;
    let mut line = String::new();
    let _ = io::BufReader::new(fs::File::from(ready_read)).read_line(&mut line);
    // Reap it now if it already failed; otherwise it lives on, detached.
    let _ = child.try_wait();
    Ok(line.trim().to_owned())
}
