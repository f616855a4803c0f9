//! Shuttle's durable audit trail.
//!
//! Every decision about a cross-VM interaction is recorded durably **before** it takes effect,
//! and no decision goes unaudited, even while the broker is down. Two layers make that work:
//!
//! 1. [`Journal`]: an append-only, checksummed journal per VM monitor. [`Journal::append`]
//!    returns only after `fdatasync(2)`; an error means the monitor must refuse the request
//!    (fail closed). Monitors keep journaling while the broker is down.
//! 2. [`AuditStore`]: the broker's SQLite database (WAL, `synchronous=FULL`), bounded by
//!    [`Limits::max_records`]. [`AuditStore::collect_from`] moves journal records into it exactly
//!    once, even across crashes, by keeping a per-source high-water mark in the same transaction
//!    as the inserts.
//!
//! See the crate's `README.md` for the reasoning.
#![forbid(unsafe_code)]

mod duration;
mod journal;
mod record;
mod store;

pub use duration::{parse_duration, DurationError};
pub use journal::{
    Durability, Journal, JournalError, JournalOptions, JournalReader, JournalSource, PendingSync,
    Records, DEFAULT_SEGMENT_BYTES, MAX_BATCH_RECORDS, MAX_UNSYNCED_RECORDS, RESTART_SEQ_GAP,
};
pub use record::{
    format_record_line, format_rfc3339_utc, now_unix_nanos, AuditRecord, Caller, Outcome, RuleRef,
    HOST,
};
pub use store::{AuditStore, Counts, EdgeCount, Filter, Limits, StoreError, COLLECT_CHUNK};
