//! Errors of the migration stream. A reader's error names what was wrong
//! and where (byte offset in the stream, chunk, record), so an operator can
//! tell a cut connection from a corrupt one from a peer of another version.

use std::{fmt, io};

use crate::{
    addr::GuestPhysAddr,
    memory::{AccessError, LayoutError, MemoryError},
};

use super::xbzrle::DeltaError;

/// Where in a stream a record or chunk starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Byte offset from the start of the stream.
    pub offset: u64,
    /// Chunk number, from 0.
    pub chunk: u64,
    /// Record number within the chunk, from 0 (0 for chunk-level errors).
    pub record: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "byte {} (chunk {}, record {})",
            self.offset, self.chunk, self.record
        )
    }
}

/// What is wrong with a record whose chunk passed its checksum (a peer bug
/// or a crafted stream, not line noise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// A record kind this version does not know.
    #[error("unknown record kind {0:#04x}")]
    UnknownKind(u8),
    /// The record runs past the end of its chunk.
    #[error("record cut off by the end of its chunk")]
    CutOff,
    /// A page address that is unaligned or outside every region (for a run
    /// of zero pages: a run that leaves its region).
    #[error("page {gpa} ({pages} pages) is not inside one region of the layout")]
    PageOutsideLayout {
        /// The address.
        gpa: GuestPhysAddr,
        /// Pages in the run.
        pages: u32,
    },
    /// A delta that does not decode.
    #[error("bad delta: {0}")]
    Delta(DeltaError),
    /// A delta longer than a page.
    #[error("delta of {0} bytes is longer than a page")]
    DeltaLength(u16),
    /// Round numbers went backwards.
    #[error("round {now} after round {before}")]
    RoundBackwards {
        /// The previous round.
        before: u32,
        /// This one.
        now: u32,
    },
    /// A record after the end marker, in its chunk.
    #[error("record after the end marker")]
    AfterEnd,
    /// The end marker's page count disagrees with the records seen.
    #[error("end marker counts {claimed} pages, the stream carried {seen}")]
    PageCount {
        /// What the end marker says.
        claimed: u64,
        /// Page records applied.
        seen: u64,
    },
    /// An end-marker flag byte with unknown bits.
    #[error("end marker flags {0:#04x} unknown")]
    EndFlags(u8),
    /// A post-copy record (DISCARD, SWITCHOVER) where it does not belong:
    /// in a pre-copy reader (receive a post-copy stream with
    /// `receive_postcopy`), or a second switchover.
    #[error("post-copy record where none belongs (read post-copy streams with receive_postcopy)")]
    PostcopyRecord,
    /// A switchover's VMM state longer than a chunk can carry.
    #[error("switchover state of {0} bytes does not fit its chunk")]
    StateLength(u32),
    /// After the switchover, a record other than a whole page, a zero run
    /// or the end marker (the destination cannot apply references or
    /// deltas against pages it may not hold).
    #[error("record kind {0:#04x} after the switchover (only FULL, ZERO and END)")]
    AfterSwitchover(u8),
    /// A post-copy stream's end marker before its switchover record (the
    /// sender was ended with `finish`, not `switchover`).
    #[error("end marker before the switchover: a stream from Sender::start_postcopy ends with Sender::switchover, not finish")]
    EndBeforeSwitchover,
    /// The switchover's count of pages still to come disagrees with the
    /// discards and rounds before it.
    #[error("switchover announces {claimed} pages to come; the discards and rounds before it leave {seen}")]
    NeededCount {
        /// What the switchover says.
        claimed: u64,
        /// What the destination counted.
        seen: u64,
    },
}

/// Why a migration stream could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The underlying reader or writer failed.
    #[error("I/O error at stream byte {at}: {source}")]
    Io {
        /// Bytes of the stream read or written before the failure.
        at: u64,
        /// The error.
        source: io::Error,
    },
    /// The stream ended early.
    #[error("stream truncated at byte {at}: it ends inside {what}")]
    Truncated {
        /// Offset where more bytes were needed.
        at: u64,
        /// What was being read.
        what: &'static str,
    },
    /// Not a pagefold migration stream.
    #[error("not a pagefold migration stream (magic {found:02x?})")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A format version this build does not read.
    #[error("stream format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// Version in the header.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// Header flags this version does not know.
    #[error("stream header flags {flags:#06x} are not supported")]
    UnsupportedFlags {
        /// The flags.
        flags: u16,
    },
    /// A page size other than 4 KiB.
    #[error("stream page size {found} is not supported (4096 only)")]
    UnsupportedPageSize {
        /// The page size in the header.
        found: u32,
    },
    /// The header's checksum does not match its bytes.
    #[error("stream header checksum mismatch (header ends at byte {at})")]
    HeaderChecksum {
        /// Offset of the checksum.
        at: u64,
    },
    /// More regions than the reader accepts.
    #[error("stream layout has {count} regions; at most {max} accepted")]
    TooManyRegions {
        /// Regions in the header.
        count: u32,
        /// The reader's limit.
        max: u32,
    },
    /// More guest memory than the reader accepts.
    #[error("stream layout holds {bytes:#x} bytes of guest memory; at most {max:#x} accepted")]
    TooLarge {
        /// Total size of the layout (saturated).
        bytes: u64,
        /// The reader's limit.
        max: u64,
    },
    /// The region layout is invalid.
    #[error("stream layout is invalid: {0}")]
    Layout(#[from] LayoutError),
    /// A chunk length of zero or over the format's maximum.
    #[error("chunk at {at} claims {len} bytes (1 to {max} allowed)")]
    ChunkLength {
        /// Where the chunk starts.
        at: Position,
        /// The length it claims.
        len: u32,
        /// The maximum.
        max: u32,
    },
    /// A chunk's checksum does not match: nothing from it was applied.
    #[error("chunk at {at} is corrupt: checksum {found:#018x}, computed {computed:#018x}")]
    ChunkChecksum {
        /// Where the chunk starts.
        at: Position,
        /// The checksum on the wire.
        found: u64,
        /// The checksum of the bytes received.
        computed: u64,
    },
    /// A record that does not make sense (nothing from its chunk applied).
    #[error("malformed record at {at}: {problem}")]
    Malformed {
        /// Where the record starts.
        at: Position,
        /// What is wrong.
        problem: Malformed,
    },
    /// A reference to content the receiver does not hold.
    #[error("record at {at} references content {hash:#034x} that was never sent")]
    UnknownRef {
        /// Where the record starts.
        at: Position,
        /// The content hash.
        hash: u128,
    },
    /// A reference run copies from a page that holds no content this
    /// stream sent.
    #[error("record at {at} copies from page {gpa}, which holds nothing this stream sent")]
    UnknownSource {
        /// Where the record starts.
        at: Position,
        /// The source page.
        gpa: GuestPhysAddr,
    },
    /// A page's content after a reference or delta is not what the sender
    /// meant: the two ends disagree about what the receiver holds.
    #[error("record at {at}: page {gpa} does not hold the content the sender meant")]
    ContentMismatch {
        /// Where the record starts.
        at: Position,
        /// The page.
        gpa: GuestPhysAddr,
    },
    /// The whole-memory digest in the end marker does not match the
    /// memory received.
    #[error("memory received does not match the sender's digest")]
    DigestMismatch,
    /// Guest memory for the layout could not be created.
    #[error("cannot create guest memory for the stream's layout: {0}")]
    Memory(#[from] MemoryError),
    /// Guest memory refused an access while applying a record.
    #[error("applying record at {at}: {source}")]
    Access {
        /// Where the record starts (offset 0 for the sender).
        at: Position,
        /// The refusal.
        source: AccessError,
    },
    /// The sender was given a page outside its layout or unaligned.
    #[error("page {gpa} is not a page of the stream's layout")]
    PageNotInLayout {
        /// The address given.
        gpa: GuestPhysAddr,
    },
    /// The VMM state given to a post-copy switchover is larger than a
    /// chunk can carry.
    #[error("switchover state of {len} bytes; at most {max} fit a chunk")]
    StateTooLarge {
        /// Its length.
        len: usize,
        /// The most that fits.
        max: usize,
    },
    /// The sender was asked for a round number lower than the last.
    #[error("round {now} after round {before}")]
    RoundBackwards {
        /// The previous round.
        before: u32,
        /// The one asked for.
        now: u32,
    },
    /// A writer that failed before: its stream is unusable; start a new one.
    #[error("the stream writer failed earlier; start a new stream")]
    WriterFailed,
    /// A reader that failed before: the memory it was filling is partial
    /// and must be discarded.
    #[error("the stream reader failed earlier; discard the memory it filled")]
    ReaderFailed,
    /// No randomness for the stream's hash seed.
    #[error("cannot draw a random stream seed: {0}")]
    Random(getrandom::Error),
}
