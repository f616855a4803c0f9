//! Shuttle's system manifests: the VMs of a system, the applications each one runs, how they
//! depend on each other (also across VMs) and the system's policy, in one TOML file.
//!
//! [`Manifest::parse`] validates everything before anything starts: unknown keys, wrong types,
//! bad VM options, dependencies on undeclared applications and dependency cycles are errors
//! with `file:line:column` and a hint. The result carries the start order (dependencies
//! first), so that the supervisor only has to follow it.
//!
//! ```
//! use shuttle_system::Manifest;
//!
//! let m = Manifest::parse(
//!     "system.toml",
//!     r#"
//! [vm.db.app.postgres]
//! command = ["postgres", "-D", "/srv/pgdata"]
//! ready = { socket = "/run/postgresql/.s.PGSQL.5432" }
//!
//! [vm.web.app.shop]
//! command = ["python3", "/srv/shop.py"]
//! requires = ["db.postgres"]
//! "#,
//! )
//! .expect("valid manifest");
//! let order: Vec<String> = m.start_order().iter().map(|a| a.id()).collect();
//! assert_eq!(order, ["db.postgres", "web.shop"]);
//! ```
#![forbid(unsafe_code)]

mod error;
mod manifest;
mod order;
mod parse;

pub use error::{Location, ManifestError, ManifestErrors};
pub use manifest::{
    AppSpec, Component, DependencyRestart, FileCopy, Manifest, PolicySource, Probe, Restart,
    SetupStep, VmSpec,
};
