//! Shuttle's wire protocol.
//!
//! Every conversation runs over a `SOCK_SEQPACKET` unix socket: one message per packet, JSON
//! encoded with serde, descriptors alongside with `SCM_RIGHTS` (at most
//! [`shuttle_sys::fdpass::MAX_FDS_PER_MESSAGE`]). A client opens with [`Hello`] carrying
//! [`PROTOCOL_VERSION`]; the server answers with its own and refuses a mismatch.
//!
//! Nothing in a message names the sender's identity: the socket a request arrives on *is*
//! the identity (DESIGN.md section 2).
#![forbid(unsafe_code)]

pub mod channel;
pub mod messages;

pub use channel::{Channel, ChannelError};
pub use messages::*;

/// Bumped whenever a message changes shape incompatibly.
pub const PROTOCOL_VERSION: u32 = 2;

/// The largest message either side accepts. Requests carry argv and environment, so this
/// bounds what one `shuttle run` may pass (like the kernel's own ARG_MAX-style limits).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
