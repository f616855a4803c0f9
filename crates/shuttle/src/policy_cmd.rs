//! `shuttle policy ...`: checking and explaining policy files. Pure: the policy engine needs
//! no privileges, so these commands work for any user.

use std::path::Path;

use anyhow::{bail, Context, Result};
use shuttle_policy::{ObjectPattern, Op, Policy, Request, Signal, VmIdentity};
use shuttle_vm::{store, Layout};

use shuttle_proto::{BrokerReply, BrokerRequest, PolicyText};

use crate::cli::{PolicyCommand, DEFAULT_POLICY};

pub fn run(layout: &Layout, cmd: PolicyCommand) -> Result<i32> {
    match cmd {
        PolicyCommand::Check { file, json } => check(&file, json),
        PolicyCommand::Load { file } => load(layout, &file),
        PolicyCommand::Explain {
            op,
            from,
            to,
            object,
            signal,
            policy,
            json,
        } => {
            // Without --policy: the active policy, with the layers of running systems.
            let parts = shuttle_vm::vm_api::active_policy_parts(layout)?;
            let policy = match policy {
                Some(file) => read_policy(&file)?,
                None if !parts.is_empty() => shuttle_vm::vm_api::parse_parts(&parts)
                    .map_err(|e| anyhow::anyhow!("{e}\nthe active policy is invalid"))?,
                None => read_policy(Path::new(DEFAULT_POLICY))?,
            };
            explain(
                layout,
                &op,
                &from,
                to.as_deref(),
                &object,
                signal.as_deref(),
                &policy,
                json,
            )
        }
    }
}

fn read(file: &Path) -> Result<String> {
    std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy file {}", file.display()))
}

fn read_policy(policy_file: &Path) -> Result<Policy> {
    let text = read(policy_file)?;
    Policy::parse(&policy_file.display().to_string(), &text).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nfix the policy first (shuttle policy check {})",
            policy_file.display()
        )
    })
}

fn check(file: &Path, json: bool) -> Result<i32> {
    let text = read(file)?;
    let name = file.display().to_string();
    match Policy::parse(&name, &text) {
        Ok(policy) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "file": name, "valid": true, "rules": policy.len() })
                );
            } else {
                println!("{name}: ok, {} rules", policy.len());
            }
            Ok(0)
        }
        Err(errors) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "file": name, "valid": false, "errors": errors.errors() })
                );
            } else {
                eprintln!("{errors}");
                eprintln!("{name}: {} error(s); nothing was loaded", errors.len());
            }
            Ok(1)
        }
    }
}

/// A VM's tags as stored at `vm create`, for `@tag:` selectors; none for unknown VMs.
fn tags_of(layout: &Layout, name: &str) -> Vec<String> {
    store::load(layout, name)
        .map(|c| c.tags)
        .unwrap_or_default()
}

fn identity<'a>(name: &'a str, tags: &'a [String]) -> Result<VmIdentity<'a>> {
    if name == "@host" {
        return Ok(VmIdentity::Host);
    }
    if !shuttle_policy::is_valid_vm_name(name) {
        bail!("invalid VM name {name:?}: give a VM name or @host");
    }
    Ok(VmIdentity::vm(name, tags))
}

#[allow(clippy::too_many_arguments)]
fn explain(
    layout: &Layout,
    op: &str,
    from: &str,
    to: Option<&str>,
    object: &str,
    signal: Option<&str>,
    policy: &Policy,
    json: bool,
) -> Result<i32> {
    let op = Op::from_name(op).with_context(|| {
        format!("unknown op {op:?}: use connect, mq, share, ipc-group, signal, invoke or open")
    })?;
    ObjectPattern::parse(op, object)
        .map_err(|e| anyhow::anyhow!("invalid --object {object:?}: {} ({})", e.message, e.hint))?;
    let from_tags = tags_of(layout, from);
    let to_tags = to.map(|t| tags_of(layout, t)).unwrap_or_default();
    let mut req = Request::new(op, identity(from, &from_tags)?, object);
    if let Some(t) = to {
        req = req.to(identity(t, &to_tags)?);
    }
    if let Some(s) = signal {
        let sig = Signal::from_name(s.trim_start_matches("SIG"))
            .with_context(|| format!("unknown signal {s:?}: use a name such as TERM or HUP"))?;
        req = req.signal(sig);
    }
    let explanation = policy.explain(&req);
    if json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        println!("{explanation}");
    }
    Ok(0)
}

pub(crate) fn load(layout: &Layout, file: &Path) -> Result<i32> {
    let text = read(file)?;
    // Check here first: a bad file gets its errors without starting anything.
    let source = std::fs::canonicalize(file)
        .unwrap_or_else(|_| file.to_owned())
        .display()
        .to_string();
    if let Err(errors) = Policy::parse(&source, &text) {
        eprintln!("{errors}");
        eprintln!(
            "{}: {} error(s); the active policy is unchanged",
            file.display(),
            errors.len()
        );
        return Ok(1);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("loading a policy needs root: run shuttle as root, for example with sudo");
    }
    let exe =
        std::env::current_exe().context("cannot find the shuttle binary to start the broker")?;
    let chan = shuttle_broker::client::connect_or_start(layout, &exe, "load a policy")?;
    match shuttle_broker::client::request(
        &chan,
        &BrokerRequest::LoadPolicy {
            source: source.clone(),
            text,
        },
    )? {
        BrokerReply::PolicyLoaded {
            rules,
            monitors,
            unreached,
        } => {
            eprintln!(
                "policy {source} loaded: {rules} rules, enforced now by {monitors} running VM(s)"
            );
            warn_about_layer_conflicts(layout);
            if !unreached.is_empty() {
                eprintln!(
                    "warning: VM(s) {} did not answer; they use the new policy when restarted",
                    unreached.join(", ")
                );
            }
            Ok(0)
        }
        BrokerReply::PolicyRejected { errors } => {
            eprintln!("{errors}");
            eprintln!("the active policy is unchanged");
            Ok(1)
        }
        BrokerReply::Failed { message } => bail!("the broker could not load the policy: {message}"),
        other => bail!("the broker answered unexpectedly: {other:?}"),
    }
}

/// Sends a change of the active policy to the broker (started if needed) and reports it.
fn change(layout: &Layout, request: &BrokerRequest, what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("changing the policy needs root: run shuttle as root, for example with sudo");
    }
    let exe =
        std::env::current_exe().context("cannot find the shuttle binary to start the broker")?;
    let chan = shuttle_broker::client::connect_or_start(layout, &exe, "change the policy")?;
    match shuttle_broker::client::request(&chan, request)? {
        BrokerReply::PolicyLoaded {
            rules,
            monitors,
            unreached,
        } => {
            eprintln!("{what}: the active policy has {rules} rules, enforced now by {monitors} running VM(s)");
            warn_about_layer_conflicts(layout);
            if !unreached.is_empty() {
                eprintln!(
                    "warning: VM(s) {} did not answer; they use the new policy when restarted",
                    unreached.join(", ")
                );
            }
            Ok(())
        }
        BrokerReply::PolicyRejected { errors } => {
            bail!("{errors}\nthe active policy is unchanged")
        }
        BrokerReply::Failed { message } => {
            bail!("the broker could not change the policy: {message}")
        }
        other => bail!("the broker answered unexpectedly: {other:?}"),
    }
}

/// Says which rules of different systems overlap with different actions, since the order
/// between systems (their names) is what decides between them (see
/// `shuttle_broker::policy_store::layer_conflicts`).
fn warn_about_layer_conflicts(layout: &Layout) {
    match shuttle_broker::policy_store::layer_conflicts(layout) {
        Ok(warnings) => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
        }
        Err(e) => eprintln!("warning: cannot compare the rules of running systems: {e}"),
    }
}

/// Adds (or replaces) the named layer of the active policy: a system's rules, after the
/// loaded policy's.
pub(crate) fn set_layer(layout: &Layout, name: &str, parts: Vec<PolicyText>) -> Result<()> {
    let what = format!("system {name}'s rules added");
    change(
        layout,
        &BrokerRequest::SetPolicyLayer {
            layer: name.to_owned(),
            parts,
        },
        &what,
    )
}

/// Removes the named layer; every other rule stays.
pub(crate) fn remove_layer(layout: &Layout, name: &str) -> Result<()> {
    let what = format!("system {name}'s rules removed");
    change(
        layout,
        &BrokerRequest::RemovePolicyLayer {
            layer: name.to_owned(),
        },
        &what,
    )
}

/// Hands the active policy again to these VMs' monitors, quietly (shares refused earlier are
/// tried again).
pub(crate) fn reapply(layout: &Layout, vms: &[String]) -> Result<()> {
    let chan = shuttle_broker::client::connect(layout, "reapply the policy")?;
    match shuttle_broker::client::request(
        &chan,
        &BrokerRequest::ReapplyPolicy { vms: vms.to_vec() },
    )? {
        BrokerReply::PolicyLoaded { .. } => Ok(()),
        BrokerReply::PolicyRejected { errors } => bail!("{errors}"),
        BrokerReply::Failed { message } => bail!("{message}"),
        other => bail!("the broker answered unexpectedly: {other:?}"),
    }
}
