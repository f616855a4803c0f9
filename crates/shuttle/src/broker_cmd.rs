//! `shuttle daemon`, `shuttle audit` and `shuttle signal`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use shuttle_audit::{AuditStore, Filter};
use shuttle_proto::{BrokerRequest, Channel, Hello, VmReply, VmRequest, PROTOCOL_VERSION};
use shuttle_vm::Layout;

use crate::cli::AuditArgs;

/// Where a VM's own API socket appears inside the VM.
pub const VM_API_SOCKET: &str = "/run/shuttle/broker.sock";

pub fn daemon(layout: &Layout, ready_fd: Option<i32>) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the broker needs root: run `shuttle daemon` as root, for example with sudo");
    }
    let ready = ready_fd.and_then(shuttle_sys::fdpass::own_inherited);
    if let Some(r) = &ready {
        // Started in the background by the CLI: detach, and keep nothing it inherited by
        // accident (a stray pipe kept open can make a waiting parent hang).
        let _ = nix::unistd::setsid();
        shuttle_sys::process::close_descriptors_except(&[std::os::fd::AsRawFd::as_raw_fd(r)])
            .context("closing inherited descriptors")?;
    }
    let _ = nix::sys::prctl::set_name(c"shuttle-broker");
    shuttle_broker::daemon::run(layout, ready)?;
    Ok(0)
}

/// Stops the running broker and waits until it is gone.
pub fn stop_daemon(layout: &Layout) -> Result<i32> {
    let held = |l: &Layout| {
        std::fs::File::open(l.broker_lock())
            .map(|f| {
                matches!(
                    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock),
                    Err((_, nix::errno::Errno::EWOULDBLOCK))
                )
            })
            .unwrap_or(false)
    };
    if !held(layout) {
        eprintln!("no broker is running");
        return Ok(0);
    }
    let pid: i32 = std::fs::read_to_string(layout.broker_pid())
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .context("the broker runs but its pid file is missing")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("signalling the broker (pid {pid})"))?;
    for _ in 0..500 {
        if !held(layout) {
            eprintln!("broker stopped (VMs keep running)");
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the broker (pid {pid}) did not stop within 5 s")
}

pub fn audit(layout: &Layout, args: AuditArgs) -> Result<i32> {
    // Fresh records first, when a broker runs; without one, what is collected is shown (the
    // rest waits, durable, in the monitors' journals).
    if let Ok(chan) = shuttle_broker::client::connect(layout, "collect audit records") {
        let _ = shuttle_broker::client::request(&chan, &BrokerRequest::CollectAudit);
    }
    let db = layout.audit_db();
    if !db.exists() {
        eprintln!("no audit records yet ({} does not exist)", db.display());
        return Ok(0);
    }
    let store = AuditStore::open_read_only(&db)
        .with_context(|| format!("opening the audit store {}", db.display()))?;
    let since = match &args.since {
        Some(s) => {
            let d = shuttle_audit::parse_duration(s)
                .map_err(|e| anyhow::anyhow!("invalid --since {s:?}: {e}"))?;
            Some(shuttle_audit::now_unix_nanos().saturating_sub(d.as_nanos() as u64))
        }
        None => None,
    };
    let mut filter = Filter {
        vm: args.vm.clone(),
        denied_only: args.denied,
        since,
        after_id: None,
        limit: None,
    };
    loop {
        for (id, record) in store.query(&filter)? {
            if args.json {
                println!("{}", serde_json::to_string(&record)?);
            } else {
                println!("{}", shuttle_audit::format_record_line(&record));
            }
            // The largest id seen, not the last row's: rows come in time order, ids in
            // collection order.
            filter.after_id = Some(filter.after_id.map_or(id, |a| a.max(id)));
        }
        if !args.follow {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(250));
        if let Ok(chan) = shuttle_broker::client::connect(layout, "collect audit records") {
            let _ = shuttle_broker::client::request(&chan, &BrokerRequest::CollectAudit);
        }
    }
}

fn signal_number(text: &str) -> Result<i32> {
    if let Ok(n) = text.parse::<i32>() {
        return Ok(n);
    }
    let name = text.trim_start_matches("SIG").to_ascii_uppercase();
    format!("SIG{name}")
        .parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| {
            anyhow::anyhow!("unknown signal {text:?}: use a name such as TERM or HUP, or a number")
        })
}

pub fn signal(vm: &str, program: &str, signal: &str) -> Result<i32> {
    let number = signal_number(signal)?;
    let chan = Channel::connect(std::path::Path::new(VM_API_SOCKET)).map_err(|_| {
        anyhow::anyhow!("no Shuttle broker socket at {VM_API_SOCKET}: `shuttle signal` works inside a Shuttle VM")
    })?;
    chan.send(&VmRequest::Hello(Hello {
        version: PROTOCOL_VERSION,
    }))?;
    match chan.recv::<VmReply>()? {
        VmReply::Hello { .. } => {}
        VmReply::Failed { message } => bail!("{message}"),
        other => bail!("unexpected answer from the broker socket: {other:?}"),
    }
    chan.send(&VmRequest::Signal {
        vm: vm.into(),
        program: program.into(),
        signal: number,
    })?;
    match chan.recv::<VmReply>()? {
        VmReply::Signalled { count } => {
            eprintln!("signal {signal} sent to {count} process(es) running {program} in VM {vm}");
            Ok(if count > 0 { 0 } else { 1 })
        }
        VmReply::Denied { message } => {
            eprintln!("shuttle: {message}");
            Ok(1)
        }
        VmReply::Failed { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

pub fn pending(layout: &Layout, json: bool) -> Result<i32> {
    let chan = shuttle_broker::client::connect(layout, "list waiting requests")?;
    let questions = match shuttle_broker::client::request(&chan, &BrokerRequest::Pending)? {
        shuttle_proto::BrokerReply::Pending { questions } => questions,
        other => bail!("the broker answered unexpectedly: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&questions)?);
        return Ok(0);
    }
    if questions.is_empty() {
        eprintln!("no request is waiting for an answer");
    }
    for p in questions {
        let q = &p.question;
        println!(
            "{:>4}  {} from {} to {} object {}  ({}; waiting {:.1}s of {:.0}s)",
            p.id,
            q.op,
            q.vm,
            q.to.as_deref().unwrap_or("-"),
            q.object,
            q.rule,
            p.waiting_ms as f64 / 1000.0,
            q.timeout_ms as f64 / 1000.0
        );
    }
    Ok(0)
}

pub fn answer(layout: &Layout, id: u64, answer: &str, remember: Option<&str>) -> Result<i32> {
    let remember_ms = match remember {
        Some(r) => Some(
            shuttle_audit::parse_duration(r)
                .map_err(|e| anyhow::anyhow!("invalid --for {r:?}: {e}"))?
                .as_millis() as u64,
        ),
        None => None,
    };
    let chan = shuttle_broker::client::connect(layout, "answer a request")?;
    let req = BrokerRequest::Answer {
        id,
        allow: answer == "allow",
        remember_ms,
    };
    match shuttle_broker::client::request(&chan, &req)? {
        shuttle_proto::BrokerReply::Answered => {
            eprintln!("request {id}: {answer}");
            Ok(0)
        }
        shuttle_proto::BrokerReply::Failed { message } => bail!("{message}"),
        other => bail!("the broker answered unexpectedly: {other:?}"),
    }
}
