//! `shuttle-connect-loop`: the load generator of `shuttle-bench --load`, small and native so
//! that the client costs little next to what it measures (a Python loop is slower than the
//! monitor). The same binary runs on the host (the baseline) and inside VMs, which see the
//! host's files through their copy-on-write root.
//!
//! ```text
//! shuttle-connect-loop serve --unix PATH --tcp PORT     accept and close, forever (forks into
//!                                                     the background once listening)
//! shuttle-connect-loop connect unix:PATH|tcp:PORT --seconds N
//!                                                     connect and close as fast as it can for
//!                                                     N seconds; prints one JSON line
//! ```
//!
//! The server accepts and hangs up; the client waits for that before it closes its end, as a
//! client of a server that answers one request per connection would. So the TCP connection's
//! TIME_WAIT is the server's (which the kernel reuses for a new connection from the same port):
//! a client that closed first would hold tens of thousands of ports in TIME_WAIT within
//! seconds, and its connects would stall for a SYN retransmission (1 s) every so often.
#![forbid(unsafe_code)]

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("connect") => connect(&args[1..]),
        Some(ACCEPT) => accept_forever(),
        _ => bail!(
            "usage: shuttle-connect-loop serve --unix PATH --tcp PORT | connect unix:PATH|tcp:PORT --seconds N"
        ),
    }
}

fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

/// Listens on both addresses, then detaches (the parent exits once the sockets are bound, so
/// that whoever started it can connect at once) and accepts forever, a thread per listener.
fn serve(args: &[String]) -> Result<()> {
    let path = value(args, "--unix").context("serve needs --unix PATH")?;
    let port: u16 = value(args, "--tcp")
        .context("serve needs --tcp PORT")?
        .parse()
        .context("--tcp PORT")?;
    let _ = std::fs::remove_file(path);
    let unix = UnixListener::bind(path).with_context(|| format!("binding {path}"))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let tcp = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    // Detach: the accepting process is a new session (it must outlive `shuttle run`, which
    // hangs up on what it started), handed the listeners as its stdin and stdout; this one
    // exits once they listen, so whoever started it can connect at once.
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(exe)
        .arg(ACCEPT)
        .stdin(std::process::Stdio::from(OwnedFd::from(unix)))
        .stdout(std::process::Stdio::from(OwnedFd::from(tcp)))
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the accepting process")?;
    println!("{}", child.id());
    Ok(())
}

/// The hidden role of the detached server.
const ACCEPT: &str = "__accept";

/// Accepts and closes on both listeners (stdin: unix, stdout: TCP), forever. The standard
/// library listens with a backlog of 128: enough, with a thread per listener that does
/// nothing but accept.
fn accept_forever() -> Result<()> {
    let _ = nix::unistd::setsid();
    let unix = UnixListener::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let tcp = TcpListener::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let _ = nix::unistd::dup2_stdin(std::fs::File::open("/dev/null")?);
    let _ = nix::unistd::dup2_stdout(std::fs::File::open("/dev/null")?);
    let t = std::thread::spawn(move || loop {
        let _ = tcp.accept();
    });
    loop {
        let _ = unix.accept();
        if t.is_finished() {
            bail!("the TCP accept thread ended");
        }
    }
}

/// One JSON line: how many connects succeeded and failed, over how long, the connect latency
/// percentiles, and the connects of each whole second.
fn connect(args: &[String]) -> Result<()> {
    let target = args
        .first()
        .context("connect needs unix:PATH or tcp:PORT")?;
    let seconds: u64 = value(args, "--seconds").unwrap_or("10").parse()?;
    let run = Duration::from_secs(seconds);
    let mut latencies_ns: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut per_second: Vec<u64> = vec![0; seconds as usize + 1];
    let mut errors = 0u64;
    let mut first_error = None;
    let start = Instant::now();
    loop {
        let t0 = Instant::now();
        let since = t0 - start;
        if since >= run {
            break;
        }
        let connected: std::io::Result<Box<dyn Read>> = match target.split_once(':') {
            Some(("unix", path)) => UnixStream::connect(path).map(|s| Box::new(s) as _),
            Some(("tcp", port)) => {
                let port: u16 = port.parse().context("tcp:PORT")?;
                TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
                    .map(|s| Box::new(s) as _)
            }
            _ => bail!("unknown target {target:?}: use unix:PATH or tcp:PORT"),
        };
        let took = t0.elapsed();
        // The server hangs up first (see the module documentation).
        let ok = connected.and_then(|mut s| s.read(&mut [0u8; 16]).map(drop));
        match ok {
            Ok(()) => {
                latencies_ns.push(u32::try_from(took.as_nanos()).unwrap_or(u32::MAX));
                per_second[since.as_secs() as usize] += 1;
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
                if errors > 1000 && latencies_ns.is_empty() {
                    bail!("every connect to {target} fails: {e}");
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    per_second.truncate(seconds as usize);
    latencies_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies_ns.is_empty() {
            return 0.0;
        }
        let i = ((latencies_ns.len() as f64 * p) as usize).min(latencies_ns.len() - 1);
        f64::from(latencies_ns[i]) / 1e3
    };
    let out = serde_json::json!({
        "target": target,
        "connects": latencies_ns.len(),
        "errors": errors,
        "first_error": first_error,
        "seconds": elapsed,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "max_us": latencies_ns.last().map(|n| f64::from(*n) / 1e3),
        "per_second": per_second,
    });
    println!("{out}");
    Ok(())
}
