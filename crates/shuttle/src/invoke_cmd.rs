//! The invoke stub, and `shuttle invoke`: inside a VM, run a program where the policy's
//! `invoke` rules route it.
//!
//! The stub is this very binary, bind-mounted by the VM's monitor over the path of every
//! program a rule routes from the VM to another (see `shuttle_vm::stubs`). Started under that
//! path it knows itself by `/proc/self/exe` (which names the path it was mounted at, while
//! being the same file as `/run/shuttle/shuttle`), and asks the VM's own API socket to run the
//! program there, passing its arguments, environment (the monitor keeps only what the rule
//! allows), working directory and its own stdin, stdout and stderr descriptors. It forwards
//! the signals it gets and exits with the program's status (128+N when a signal N ended it).
//! Refused: a message on stderr and status 126.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use shuttle_proto::{
    Bytes, Channel, ChannelError, Hello, InvokeSpec, VmReply, VmRequest, PROTOCOL_VERSION,
};

use crate::broker_cmd::VM_API_SOCKET;
use crate::commands::{EXIT_SHUTTLE_FAILED, FORWARDED_SIGNALS};
use crate::terminal_io;

/// Where the shuttle binary is in every VM.
const IN_VM_SHUTTLE: &str = "/run/shuttle/shuttle";

/// Exit status of a refused invocation (as a shell's "cannot execute").
const EXIT_REFUSED: i32 = 126;

/// When this process is an invoke stub, the program path it stands for.
pub fn stub_program() -> Option<String> {
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    let exe = exe.to_str()?;
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(exe);
    if exe == IN_VM_SHUTTLE || !exe.starts_with('/') {
        return None;
    }
    // The stub is the file at /run/shuttle/shuttle, which exists in VMs only.
    let me = std::fs::metadata("/proc/self/exe").ok()?;
    let shuttle = std::fs::metadata(IN_VM_SHUTTLE).ok()?;
    (me.dev() == shuttle.dev() && me.ino() == shuttle.ino()).then(|| exe.to_owned())
}

/// Whether this binary was started as `xdg-open` (a link to it by that name).
pub fn called_as_xdg_open() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n == "xdg-open")
        })
        .unwrap_or(false)
}

/// `xdg-open PATH|URL`.
pub fn xdg_open_main() -> i32 {
    let mut args = std::env::args_os().skip(1);
    let (Some(target), None) = (args.next(), args.next()) else {
        eprintln!(
            "usage: xdg-open PATH|URL (Shuttle: opens it with the handler the policy routes it to)"
        );
        return 1;
    };
    match open(target) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shuttle: {}", crate::report::error_line(&e));
            EXIT_SHUTTLE_FAILED
        }
    }
}

/// The stub's whole life: never returns to the CLI's argument parser.
pub fn stub_main(program: String) -> i32 {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match invoke(program, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shuttle: {}", crate::report::error_line(&e));
            EXIT_SHUTTLE_FAILED
        }
    }
}

/// A standard descriptor, or /dev/null in its place when it is closed (a daemon may run a
/// program with no stdin): the program must not get some other descriptor under its number.
fn standard(fd: BorrowedFd<'_>, keep: &mut Vec<OwnedFd>) -> Result<()> {
    let open = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok();
    let copy = if open {
        fd.try_clone_to_owned()?
    } else {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .context("opening /dev/null")?
            .into()
    };
    keep.push(copy);
    Ok(())
}

/// The most file arguments passed along (the monitor takes no more).
const MAX_FILES: usize = 64;

/// The path an argument names for the transfer: the whole argument, or the value of an
/// option that looks like a path (`--input=/srv/a.txt`, `-o/srv/out`; see
/// `shuttle_vm::transfer::option_value`, the monitor's own reading of it with the rule's
/// `file_options`: a candidate it does not take stays a string).
fn named_path(arg: &OsString, option: bool) -> Option<&std::ffi::OsStr> {
    use std::os::unix::ffi::OsStrExt;
    if !option {
        return Some(arg.as_os_str());
    }
    let bytes = arg.as_bytes();
    shuttle_vm::transfer::option_value(bytes, shuttle_vm::transfer::ANY_SHORT_OPTION)
        .map(|start| std::ffi::OsStr::from_bytes(&bytes[start..]))
}

/// The arguments that name regular files (in the caller's VM, as the program would resolve
/// them here): those the monitor may ask for, whole ones and options with a file value (in
/// that order). Missing paths, directories, devices, FIFOs and other options stay plain
/// strings.
fn file_candidates(args: &[OsString]) -> (Vec<u32>, Vec<u32>) {
    let is_file =
        |p: &std::ffi::OsStr| !p.is_empty() && std::fs::metadata(p).is_ok_and(|m| m.is_file());
    let (mut whole, mut options) = (Vec::new(), Vec::new());
    for (i, a) in args.iter().enumerate() {
        let Ok(i) = u32::try_from(i) else { break };
        if whole.len() + options.len() == MAX_FILES {
            break;
        }
        if is_file(a) {
            whole.push(i);
        } else if named_path(a, true).is_some_and(is_file) {
            options.push(i);
        }
    }
    (whole, options)
}

/// Opens the candidate file arguments here, in the caller's VM and with the caller's rights
/// (for writing too when `write` and allowed, else for reading), and sends their descriptors:
/// nothing the caller could not open itself is ever passed. One it cannot open stays a string.
fn send_files(
    chan: &Channel,
    args: &[OsString],
    candidates: &(Vec<u32>, Vec<u32>),
    write: bool,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut files: Vec<(u32, OwnedFd)> = Vec::new();
    let all = candidates
        .0
        .iter()
        .map(|i| (*i, false))
        .chain(candidates.1.iter().map(|i| (*i, true)));
    for (i, option) in all {
        let Some(arg) = args.get(i as usize).and_then(|a| named_path(a, option)) else {
            continue;
        };
        // Non-blocking, no controlling terminal: the path may have been swapped for a FIFO or
        // a terminal since it was looked at; the descriptor is checked again.
        let open = |write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(arg)
        };
        let opened = if write {
            open(true).or_else(|_| open(false))
        } else {
            open(false)
        };
        if let Ok(file) = opened {
            if file.metadata().is_ok_and(|m| m.is_file()) {
                files.push((i, OwnedFd::from(file)));
            }
        }
    }
    for chunk in files.chunks(shuttle_sys::fdpass::MAX_FDS_PER_MESSAGE) {
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, f)| f.as_fd()).collect();
        let args = chunk.iter().map(|(i, _)| *i).collect();
        chan.send_with_fds(&VmRequest::InvokeFiles { args }, &fds)?;
    }
    chan.send(&VmRequest::InvokeFiles { args: Vec::new() })?;
    Ok(())
}

/// Runs `program` (an absolute path, as the rule names it) with `args` where the policy routes
/// it; returns the exit status to exit with.
pub fn invoke(program: String, args: Vec<OsString>) -> Result<i32> {
    invoke_with(Call::new(program, args))
}

/// Whether this process runs inside a Shuttle VM: its binary is the one Shuttle binds at
/// `/run/shuttle/shuttle` in every VM (there is no such file on the host).
pub fn inside_vm() -> bool {
    let (Ok(me), Ok(shuttle)) = (
        std::fs::metadata("/proc/self/exe"),
        std::fs::metadata(IN_VM_SHUTTLE),
    ) else {
        return false;
    };
    me.dev() == shuttle.dev() && me.ino() == shuttle.ino()
}

/// `shuttle run [VM] -- CMD` inside a VM. Work started at a VM's request runs in a VM, never
/// on the host: with no VM named (or this VM's own name) the command runs in this VM, as
/// this process's uid and gid, a child of the VM's init; another VM runs it only where an
/// `invoke` rule routes the program (CMD resolved on PATH here to the absolute path rules
/// name), as an invocation (its rule's environment, user and file arguments). Which VM is
/// "this VM" is the monitor's knowledge (the socket the request comes in on), not ours.
pub fn run_in_vm(
    vm: Option<String>,
    command: Vec<OsString>,
    env: Vec<(Bytes, Bytes)>,
    workdir: Option<OsString>,
    user: Option<String>,
) -> Result<i32> {
    let Some((first, args)) = command.split_first() else {
        bail!("name the command to run after --");
    };
    let mut call = Call::new(String::new(), args.to_vec());
    // As invoke rules name programs, an absolute path, found here (the monitor runs this VM's
    // own program by that path too when the VM is this one: a rule must route it here).
    call.program = program_path(first, &env)?;
    call.run_in = Some(vm.unwrap_or_default());
    call.user = user;
    call.env = Some(env);
    if let Some(w) = workdir {
        call.cwd = Some(Bytes::from(w.as_os_str()));
    }
    invoke_with(call)
}

/// The absolute path of program `name` here: itself when it has a `/` (made absolute, links
/// not resolved: rules name the path), else the first executable file of that name on `env`'s
/// PATH.
fn program_path(name: &std::ffi::OsStr, env: &[(Bytes, Bytes)]) -> Result<String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let found = if name.as_bytes().contains(&b'/') {
        Some(std::path::absolute(name)?)
    } else {
        let path = env
            .iter()
            .find(|(k, _)| k.as_bytes() == b"PATH")
            .map(|(_, v)| v.as_bytes().to_vec())
            .unwrap_or_default();
        path.split(|b| *b == b':')
            .filter(|d| d.starts_with(b"/"))
            .map(|d| std::path::Path::new(std::ffi::OsStr::from_bytes(d)).join(name))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    };
    let Some(found) = found else {
        bail!(
            "{} not found on PATH in this VM: name the program's absolute path, as the invoke rule does",
            name.to_string_lossy()
        );
    };
    found
        .into_os_string()
        .into_string()
        .map_err(|_| anyhow::anyhow!("the program's path is not valid UTF-8"))
}

/// What the stub, `shuttle invoke`, `shuttle open` and `shuttle run` inside a VM ask of the
/// VM's monitor.
struct Call {
    program: String,
    args: Vec<OsString>,
    open: Vec<String>,
    run_in: Option<String>,
    user: Option<String>,
    /// `None`: this process's environment (the monitor keeps what the rule allows).
    env: Option<Vec<(Bytes, Bytes)>>,
    /// `None`: this process's working directory.
    cwd: Option<Bytes>,
}

impl Call {
    fn new(program: String, args: Vec<OsString>) -> Call {
        Call {
            program,
            args,
            open: Vec::new(),
            run_in: None,
            user: None,
            env: None,
            cwd: None,
        }
    }
}

/// `shuttle open PATH|URL` (and `xdg-open` when this binary is installed under that name):
/// opens a file or URL with the handler of the VM the policy's `open` rules route it to. A
/// URL is routed by its scheme (`scheme:https`); a file by its MIME type (from
/// /etc/mime.types, `mime:application/pdf`; a directory is `mime:inode/directory`), then by
/// its extension (`ext:pdf`). A file is passed as a file argument.
pub fn open(target: OsString) -> Result<i32> {
    let text = target.to_string_lossy().into_owned();
    let (arg, objects) = match url_scheme(&text) {
        Some(scheme) if scheme != "file" => (target, vec![format!("scheme:{scheme}")]),
        Some(_) => {
            // file:///path is the path.
            let path = text.trim_start_matches("file://").to_owned();
            let objects = file_objects(&path);
            (OsString::from(path), objects)
        }
        None => (target.clone(), file_objects(&text)),
    };
    if objects.is_empty() {
        bail!("{text}: no scheme, type or extension to route by: name a URL or a file with an extension");
    }
    let mut call = Call::new(String::new(), vec![arg]);
    call.open = objects;
    invoke_with(call)
}

/// The scheme of `s` (lower case) when it is a URL: `NAME:` with NAME of two or more
/// characters (so that no path is taken for one).
fn url_scheme(s: &str) -> Option<String> {
    let (scheme, _) = s.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (scheme.len() >= 2
        && first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c)))
    .then(|| scheme.to_ascii_lowercase())
}

/// The `open` objects a file may match, most specific first.
fn file_objects(path: &str) -> Vec<String> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return vec!["mime:inode/directory".to_owned()];
    }
    let ext = std::path::Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .filter(|e| !e.is_empty());
    let Some(ext) = ext else {
        return Vec::new();
    };
    let mut objects = Vec::new();
    if let Some(mime) = std::fs::read_to_string("/etc/mime.types")
        .ok()
        .and_then(|types| mime_of(&types, &ext))
    {
        objects.push(format!("mime:{mime}"));
    }
    objects.push(format!("ext:{ext}"));
    objects
}

/// The MIME type /etc/mime.types gives extension `ext`.
fn mime_of(types: &str, ext: &str) -> Option<String> {
    types
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            let mime = words.next()?;
            words.any(|w| w == ext).then(|| mime.to_owned())
        })
}

fn invoke_with(call: Call) -> Result<i32> {
    let Call {
        program,
        args,
        open,
        run_in,
        user,
        env,
        cwd,
    } = call;
    // Caught from now on: one that arrives while the program starts is delivered once it runs.
    let signals = signal_hook::iterator::Signals::new(FORWARDED_SIGNALS)
        .context("installing signal handlers")?;
    let chan = Channel::connect(std::path::Path::new(VM_API_SOCKET)).map_err(|_| {
        anyhow::anyhow!(
            "no Shuttle broker socket at {VM_API_SOCKET}: `shuttle invoke` works inside a Shuttle VM"
        )
    })?;
    chan.send(&VmRequest::Hello(Hello {
        version: PROTOCOL_VERSION,
    }))?;
    match chan.recv::<VmReply>()? {
        VmReply::Hello { .. } => {}
        VmReply::Failed { message } => bail!("{message}"),
        other => bail!("unexpected answer from the broker socket: {other:?}"),
    }

    // Stdio as `shuttle run` does it: descriptors passed as they are, except a terminal,
    // which never goes to another VM (its processes could read it after the program ends):
    // the program gets a terminal of its VM's own, relayed from here.
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let done = Arc::new(AtomicBool::new(false));
    let mut relays = Vec::new();
    let pty_mode = stdin.is_terminal();
    let mut stdio: Vec<OwnedFd> = Vec::new();
    if !pty_mode {
        standard(stdin.as_fd(), &mut stdio)?;
        if stdout.is_terminal() {
            let (w, relay) = terminal_io::output_pipe(std::io::stdout(), Arc::clone(&done))?;
            relays.push(relay);
            stdio.push(w);
        } else {
            standard(stdout.as_fd(), &mut stdio)?;
        }
        if stderr.is_terminal() {
            let (w, relay) = terminal_io::output_pipe(std::io::stderr(), Arc::clone(&done))?;
            relays.push(relay);
            stdio.push(w);
        } else {
            standard(stderr.as_fd(), &mut stdio)?;
        }
    }
    let candidates = file_candidates(&args);
    let spec = InvokeSpec {
        program: program.clone(),
        args: args.iter().map(|a| Bytes::from(a.as_os_str())).collect(),
        env: env.unwrap_or_else(|| {
            std::env::vars_os()
                .map(|(k, v)| (Bytes::from(k.as_os_str()), Bytes::from(v.as_os_str())))
                .collect()
        }),
        cwd: cwd.or_else(|| {
            std::env::current_dir()
                .ok()
                .map(|d| Bytes::from(d.as_os_str()))
        }),
        terminal: pty_mode.then(|| terminal_io::size_of(stdin.as_fd())),
        files: candidates.0.clone(),
        option_files: candidates.1.clone(),
        open,
        run_in,
        user,
    };
    let borrowed: Vec<BorrowedFd<'_>> = stdio.iter().map(AsFd::as_fd).collect();
    chan.send_with_fds(&VmRequest::Invoke(spec), &borrowed)?;
    drop(borrowed);
    // The program has its own copies; ours must go so that relays see end of file.
    drop(stdio);
    let receive = || match chan.recv_with_fds::<VmReply>() {
        Ok(r) => Ok(r),
        Err(ChannelError::Disconnected) => bail!("this VM's monitor closed the connection"),
        Err(e) => Err(anyhow::Error::from(e)),
    };
    let (mut reply, mut fds) = receive()?;
    if let VmReply::SendFiles { write } = reply {
        send_files(&chan, &args, &candidates, write)?;
        (reply, fds) = receive()?;
    }
    match reply {
        VmReply::Invoked { .. } => {}
        VmReply::Denied { message } => {
            eprintln!("shuttle: {message}");
            return Ok(EXIT_REFUSED);
        }
        VmReply::InvokeFailed { message, exit_code } => {
            eprintln!("shuttle: {message}");
            return Ok(exit_code);
        }
        VmReply::Failed { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
    let sender = chan.try_clone()?;
    let reply = terminal_io::relay_session(
        fds.pop(),
        signals,
        relays,
        done,
        move |signal| sender.send(&VmRequest::InvokeSignal { signal }).is_ok(),
        || chan.recv::<VmReply>(),
    )?;
    match reply {
        Ok(VmReply::Exited(status)) => Ok(status.shell_code()),
        Ok(VmReply::InvokeFailed { message, exit_code }) => {
            eprintln!("shuttle: {message}");
            Ok(exit_code)
        }
        Ok(other) => bail!("unexpected answer: {other:?}"),
        Err(ChannelError::Disconnected) => {
            bail!("this VM's monitor went away while {program} ran")
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert_eq!(url_scheme("https://x").as_deref(), Some("https"));
        assert_eq!(url_scheme("MAILTO:a@b").as_deref(), Some("mailto"));
        assert_eq!(url_scheme("/srv/a:b"), None);
        assert_eq!(url_scheme("c:x"), None);
        assert_eq!(url_scheme("doc.pdf"), None);
    }

    #[test]
    fn mime_types_come_from_the_table() {
        let types = "# comment\napplication/pdf pdf\ntext/plain txt text conf\n";
        assert_eq!(mime_of(types, "conf").as_deref(), Some("text/plain"));
        assert_eq!(mime_of(types, "pdf").as_deref(), Some("application/pdf"));
        assert_eq!(mime_of(types, "comment"), None);
    }
}
