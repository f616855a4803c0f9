//! The validated form of a manifest.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Location, ManifestErrors};

/// A whole system: its VMs, their applications (in start order) and its policy.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    /// The system's name (`name = ...`, or the manifest's directory name).
    pub name: String,
    /// The manifest's path, as given.
    pub file: String,
    /// The VMs, in declaration order.
    pub vms: Vec<VmSpec>,
    /// Every application, dependencies before their dependents (declaration order otherwise).
    pub apps: Vec<AppSpec>,
    /// The system's policy, if it has one.
    pub policy: Option<PolicySource>,
    /// The `share` rules the VMs' `components` become (read-only, provider to consumer), as
    /// policy text: one rule per component, each under a comment naming its manifest entry.
    pub components_policy: Option<String>,
}

/// Where the system's policy comes from.
#[derive(Debug, Clone, Serialize)]
pub struct PolicySource {
    /// The policy file (relative paths are resolved beside the manifest).
    pub path: PathBuf,
    /// Its text, as validated.
    pub text: String,
    /// The rules are the manifest's own `[[rule]]` tables: `path` is the manifest, and
    /// `text` the manifest with everything but its rules blanked out (lines kept, so rule
    /// locations are the manifest's).
    pub inline: bool,
}

/// One VM of the system, with the options of `shuttle vm create`.
#[derive(Debug, Clone, Serialize)]
pub struct VmSpec {
    pub name: String,
    pub base: Option<String>,
    pub net: Option<String>,
    pub memory: Option<String>,
    pub pids: Option<u64>,
    pub hide: Vec<PathBuf>,
    pub tags: Vec<String>,
    /// Host files copied into the VM by `up`, before any application starts.
    pub files: Vec<FileCopy>,
    /// Directories of other VMs this VM uses, read-only (`components = [...]`).
    pub components: Vec<Component>,
    pub location: Location,
}

/// A component dependency: a directory of another VM (the provider) shown read-only in this
/// one. It becomes a `share` rule of the system's policy, and this VM's applications start
/// only once it is mounted (and, when `from` names an application, once that one is ready).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Component {
    /// The providing VM.
    pub vm: String,
    /// The providing application (`VM.APP`), when `from` names one.
    pub app: Option<String>,
    /// The directory in the provider.
    pub path: String,
    /// Where it appears in this VM (`at`, default the same path).
    pub at: String,
    /// Where the entry starts in the manifest.
    pub location: Location,
}

impl VmSpec {
    /// The options `shuttle vm create` would take.
    pub fn options(&self) -> shuttle_vm::VmOptions {
        shuttle_vm::VmOptions {
            name: self.name.clone(),
            base: self.base.clone(),
            net: self.net.clone(),
            memory: self.memory.clone(),
            pids: self.pids,
            hide: self.hide.clone(),
            tags: self.tags.clone(),
        }
    }
}

/// A host file copied into a VM.
#[derive(Debug, Clone, Serialize)]
pub struct FileCopy {
    /// Absolute path inside the VM.
    pub to: String,
    /// The host file (relative paths resolved beside the manifest).
    pub from: PathBuf,
}

/// When a supervisor restarts an application that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Never: an application that ends stays ended.
    No,
    /// When it exits with a non-zero status or is killed by a signal.
    OnFailure,
    /// Whenever it ends.
    Always,
}

impl Restart {
    /// Whether an application that ended with `code` (shell style: 128+N for signal N) is
    /// restarted.
    pub fn restarts(self, code: i32) -> bool {
        match self {
            Restart::No => false,
            Restart::OnFailure => code != 0,
            Restart::Always => true,
        }
    }
}

/// What an application does when one of the applications it requires restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DependencyRestart {
    /// Keep running (it is expected to reconnect by itself).
    Ignore,
    /// Stop it and start it again once the dependency is ready again.
    Restart,
    /// Tell it: send it this signal (by number) once the dependency is ready again
    /// (`"signal:HUP"`).
    Signal(i32),
}

/// How a supervisor knows an application is ready for its dependents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Probe {
    /// A unix socket at this path in the application's VM accepts a connection.
    Socket(String),
    /// A TCP port on the VM's loopback accepts a connection.
    Port(u16),
    /// This command, run in the application's VM, exits with status 0.
    Command(Vec<String>),
}

/// A one-shot command run before an application's first start (by each `up`).
#[derive(Debug, Clone, Serialize)]
pub struct SetupStep {
    pub command: Vec<String>,
    pub user: Option<String>,
    /// Skip the step when this path exists in the VM (it was done before).
    pub creates: Option<String>,
}

/// One application (service) of a VM.
#[derive(Debug, Clone, Serialize)]
pub struct AppSpec {
    pub vm: String,
    pub name: String,
    pub command: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub env: Vec<(String, String)>,
    pub restart: Restart,
    pub ready: Option<Probe>,
    pub ready_timeout: Duration,
    pub stop_timeout: Duration,
    /// Applications this one needs, as `VM.APP` ids.
    pub requires: Vec<String>,
    pub on_dependency_restart: DependencyRestart,
    pub setup: Vec<SetupStep>,
    pub location: Location,
}

impl AppSpec {
    /// `VM.APP`, the name commands and other applications use.
    pub fn id(&self) -> String {
        format!("{}.{}", self.vm, self.name)
    }
}

impl Manifest {
    /// Parses and validates a manifest. `file` is its path: it names the manifest in errors,
    /// and relative paths inside it (the policy, copied files) are resolved beside it.
    pub fn parse(file: &str, text: &str) -> Result<Manifest, ManifestErrors> {
        crate::parse::parse(file, text)
    }

    /// Reads and parses the manifest at `path`.
    pub fn load(path: &std::path::Path) -> Result<Manifest, ManifestErrors> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Manifest::parse(&file, &text),
            Err(e) => Err(shuttle_policy::Diagnostics(vec![crate::ManifestError {
                file,
                location: Location { line: 1, column: 1 },
                message: format!("cannot read the manifest: {e}"),
                hint: "check the path (shuttle up FILE takes a system manifest)".into(),
            }])),
        }
    }

    /// The applications, dependencies first.
    pub fn start_order(&self) -> &[AppSpec] {
        &self.apps
    }

    pub fn app(&self, id: &str) -> Option<&AppSpec> {
        self.apps.iter().find(|a| a.id() == id)
    }

    pub fn vm(&self, name: &str) -> Option<&VmSpec> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// The components VM `vm` uses.
    pub fn components_of(&self, vm: &str) -> &[Component] {
        self.vm(vm).map_or(&[], |v| v.components.as_slice())
    }

    /// The applications that require `id` directly.
    pub fn dependents(&self, id: &str) -> Vec<&AppSpec> {
        self.apps
            .iter()
            .filter(|a| a.requires.iter().any(|r| r == id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies() {
        assert!(!Restart::No.restarts(1));
        assert!(!Restart::OnFailure.restarts(0));
        assert!(Restart::OnFailure.restarts(3));
        assert!(Restart::OnFailure.restarts(128 + 9));
        assert!(Restart::Always.restarts(0));
    }
}
