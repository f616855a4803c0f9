//! The broker: Shuttle's control plane (`shuttle daemon`).
//!
//! It owns the active policy (parsing it, persisting it atomically, handing it to every
//! running VM's monitor) and the audit store (collecting every monitor's journal into it).
//! Enforcement does not depend on it: monitors keep deciding with the last policy they were
//! given and keep their journals until the broker, restarted, collects them. What needs the
//! broker itself (loading a policy, answering questions, reading the audit store through it)
//! is refused with a clear error while it is down.
#![forbid(unsafe_code)]

pub mod client;
pub mod daemon;
pub mod lifecycle;
pub mod policy_store;
pub mod questions;
