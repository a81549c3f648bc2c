//! Live migration: the versioned, self-describing stream that carries guest
//! memory from a sender to a receiver.
//!
//! [`StreamWriter`] turns pages into records, each the cheapest the receiver
//! can decode: ZERO (no payload), REF (content the receiver already holds,
//! named by a keyed 128-bit hash), DELTA (an XBZRLE-style delta against the
//! version of the page last sent), or FULL. Records travel in checksummed
//! chunks with round markers and an end marker. [`StreamReader`] checks a
//! whole chunk before applying any of it to a [`GuestMemory`](crate::GuestMemory).
//! DESIGN.md ("migration stream") has the wire format.
//!
//! Files: `format.rs` has the wire format (constants, the checked region
//! layout, record parsing); `writer.rs` encodes pages into records, with
//! `index.rs` (the content index both ends keep in step) and `cache.rs`
//! (the sender's delta bases) and `xbzrle.rs` (the delta encoding);
//! `reader.rs` reads chunk by chunk, then applies record by record in
//! named steps (`next_record`, then one `apply_*` per record kind);
//! `precopy.rs` drives rounds of dirty pages over a writer and receives
//! over a reader; `postcopy.rs` switches such a sender to post-copy (the
//! DISCARD and SWITCHOVER records, then pages pushed with the return
//! path's requests first) and has the errors of both ends;
//! `postcopy_receive.rs` is the destination (pre-copy rounds applied, then
//! memory registered for missing-page faults and filled as pages arrive);
//! `digest.rs` and `holes.rs` hash memory and skip holes for round 0 and
//! the end marker; `error.rs` has the errors.
//!
//! This module owns the format and its two ends. It never decides which
//! pages to send or when (the pre-copy rounds and dirty harvesting live with
//! the sender), and no stream, however crafted, makes it panic, read or
//! write outside guest memory, or allocate more than its limits allow.

mod cache;
mod digest;
mod error;
pub mod format;
mod index;
mod postcopy;
mod postcopy_receive;
mod precopy;
mod reader;
mod taken;
mod writer;
pub mod xbzrle;

pub use digest::memory_digest;
pub use error::{Malformed, Position, StreamError};
pub use postcopy::{
    resume_postcopy, PostcopyError, PostcopyOptions, PostcopyPhase, PostcopySummary,
};
pub use postcopy_receive::{
    receive_postcopy, receive_postcopy_with, OnBreak, PostcopyIncoming, PostcopyReceiving,
    PostcopyStats,
};
pub use precopy::{
    receive_migration, receive_migration_folded, FoldedReceived, MigrationError, PrecopyOptions,
    Progress, ReceiveError, Received, Sender, Summary,
};
pub use reader::{receive, Event, ReaderLimits, ReceiveStats, StreamHeader, StreamReader};
pub use writer::{Sent, StreamWriter, WriterOptions, WriterStats};
