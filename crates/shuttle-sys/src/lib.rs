//! Thin, audited wrappers over the Linux system calls Shuttle needs that `nix` does not cover
//! (or covers without owned descriptors). This is the only crate of the workspace allowed to
//! contain `unsafe`; every block carries a `SAFETY:` comment.
#![allow(unsafe_code)]

pub mod caps;
pub mod fdpass;
pub mod net;
pub mod process;
pub mod seccomp;
pub mod terminal;
pub mod unotify;
pub mod vm_mount;
