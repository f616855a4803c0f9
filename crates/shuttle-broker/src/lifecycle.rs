//! VM lifecycle, carried out by the broker for the CLI. Errors come back as the one-line
//! messages the CLI prints.

use std::path::PathBuf;
use std::time::Duration;

use shuttle_proto::VmCreateSpec;
use shuttle_vm::client::{self, ClientError};
use shuttle_vm::store::{self, StoreError};
use shuttle_vm::{Layout, VmOptions};

/// The shuttle binary monitors are started from: the broker's own. After an upgrade replaced
/// the file, the running broker's image reads as "PATH (deleted)"; the new binary at PATH is
/// the one to use (the version handshake catches incompatible pairs).
fn exe() -> Result<PathBuf, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the shuttle binary: {e}"))?;
    let text = exe.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(original) if std::path::Path::new(original).exists() => Ok(PathBuf::from(original)),
        _ => Ok(exe),
    }
}

pub fn create(layout: &Layout, spec: VmCreateSpec) -> Result<(), String> {
    let options = VmOptions {
        name: spec.name,
        base: spec.base,
        net: spec.net,
        memory: spec.memory,
        pids: spec.pids,
        hide: spec.hide.into_iter().map(PathBuf::from).collect(),
        tags: spec.tags,
    };
    store::create(layout, &options)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub fn start(layout: &Layout, name: &str) -> Result<(), String> {
    tracing::debug!(vm = name, "starting");
    let r = client::start(layout, name, &exe()?).map_err(|e| e.to_string());
    tracing::debug!(vm = name, ok = r.is_ok(), "start done");
    r
}

pub fn stop(layout: &Layout, name: &str, grace: Duration) -> Result<(), String> {
    store::load(layout, name).map_err(|e| e.to_string())?;
    if !store::is_running(layout, name) {
        return Err(ClientError::NotRunning(name.into()).to_string());
    }
    client::stop(layout, name, grace).map_err(|e| e.to_string())
}

pub fn remove(layout: &Layout, name: &str, force: bool) -> Result<(), String> {
    match store::load(layout, name) {
        Ok(_) | Err(StoreError::Damaged { .. }) => {}
        Err(e) => return Err(e.to_string()),
    }
    if store::is_running(layout, name) {
        if !force {
            return Err(StoreError::Running(name.into()).to_string());
        }
        client::stop(layout, name, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    }
    store::remove(layout, name).map_err(|e| e.to_string())
}
