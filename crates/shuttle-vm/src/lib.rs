//! Shuttle's VM engine.
//!
//! A VM is described by a validated [`config::VmConfig`], stored under the state directory
//! ([`layout::Layout`]). Starting it turns the configuration into an explicit list of set-up
//! steps ([`plan`]), forks the VM's init into new namespaces and executes the plan there
//! ([`setup`]), then hardens the init ([`hardening`]) before it accepts commands ([`init`]).
//! A host-side [`monitor`] process supervises each running VM; the CLI talks to it through
//! [`client`].
#![forbid(unsafe_code)]

pub mod audit_log;
pub(crate) mod caller_state;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod detach;
pub mod hardening;
pub mod init;
pub mod intercept;
pub mod invoke;
pub mod ipc_group;
pub mod layout;
pub mod monitor;
pub mod paths;
pub mod plan;
pub mod setup;
pub mod share;
pub mod store;
pub mod stubs;
pub mod transfer;
pub mod users;
pub mod vm_api;

pub use config::{Base, NetMode, VmConfig, VmOptions};
pub use layout::Layout;
