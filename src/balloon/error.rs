//! What the balloon reports: [`BalloonError`], why one entry of a batch
//! (or a whole range, report or stats buffer) was not applied;
//! [`EntryError`], which ties one to its entry's index in the batch; and
//! [`BatchReport`], what a whole batch did.

use crate::{
    addr::{GuestFrame, GuestPhysAddr},
    frames::FrameError,
    memory::AccessError,
};

/// Why one entry of a batch (or a whole range) was not applied.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The frame lies beyond the end of guest memory.
    #[error("PFN {pfn:#x} is beyond guest memory")]
    OutOfRange {
        /// The guest frame number.
        pfn: GuestFrame,
    },
    /// The frame lies in a hole between regions.
    #[error("PFN {pfn:#x} is in a hole between regions")]
    Hole {
        /// The guest frame number.
        pfn: GuestFrame,
    },
    /// The frame appeared earlier in the same batch.
    #[error("PFN {pfn:#x} repeats entry {first}")]
    Repeated {
        /// The guest frame number.
        pfn: GuestFrame,
        /// Index of its first occurrence.
        first: usize,
    },
    /// The entry lies beyond the batch limit.
    #[error("entry beyond the batch limit of {limit} PFNs")]
    OverLimit {
        /// The limit.
        limit: usize,
    },
    /// Inflate of a page already in the balloon.
    #[error("PFN {pfn:#x} is already ballooned")]
    AlreadyBallooned {
        /// The guest frame number.
        pfn: GuestFrame,
    },
    /// Deflate of a page not in the balloon.
    #[error("PFN {pfn:#x} is not ballooned")]
    NotBallooned {
        /// The guest frame number.
        pfn: GuestFrame,
    },
    /// The page is merged by dedup (shared, or remapped onto another frame).
    #[error("PFN {pfn:#x} is a dedup-shared page; unmerge it first")]
    Shared {
        /// The guest frame number.
        pfn: GuestFrame,
    },
    /// Another layer holds the page (locked or write-protected) right now.
    #[error("PFN {pfn:#x} is busy (another layer holds it)")]
    Busy {
        /// The guest frame number.
        pfn: GuestFrame,
    },
    /// The queue's bytes end in a partial entry.
    #[error("a {len}-byte buffer ends in a partial {entry}-byte entry")]
    Truncated {
        /// Buffer length.
        len: usize,
        /// Entry size.
        entry: usize,
    },
    /// A range is not aligned to 4 KiB (or to the store's granule for a
    /// free page report).
    #[error("range at {addr:#x} (+{len:#x}) is not aligned to {align:#x}")]
    Misaligned {
        /// Start.
        addr: GuestPhysAddr,
        /// Length in bytes.
        len: u64,
        /// Needed alignment in bytes.
        align: u64,
    },
    /// A free page report's order is larger than any memory.
    #[error("free page report order {order} is too large")]
    Order {
        /// The order.
        order: u32,
    },
    /// Breaking the page's dedup sharing failed for another reason than a
    /// busy page: the process's kernel mappings are used up
    /// ([`FrameError::MapLimit`] inside), or the frame store failed. The
    /// page stays merged, and reads what it read.
    #[error("PFN {pfn:#x}: breaking its dedup sharing failed: {source}")]
    Unmerge {
        /// The guest frame number.
        pfn: GuestFrame,
        /// What the dedup host said.
        #[source]
        source: crate::dedup::DedupError,
    },
    /// The access layer refused the range.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The host refused to release the memory.
    #[error("releasing PFN {pfn:#x}: {source}")]
    Release {
        /// First guest frame of the run that failed.
        pfn: GuestFrame,
        /// What the frame store said.
        source: FrameError,
    },
}

/// One entry of a batch that was not applied.
#[derive(Debug)]
pub struct EntryError {
    /// Index of the entry in the batch (for a range: the page's index in it).
    pub index: usize,
    /// Why.
    pub error: BalloonError,
}

/// What one inflate or deflate batch did.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// Entries applied.
    pub applied: u64,
    /// 4 KiB pages whose memory went back to the host in this batch (a page
    /// that was already released, or never written, counts nothing; on
    /// hugetlb, pages waiting for the rest of their huge page count when it
    /// is released).
    pub released_pages: u64,
    /// Entries not applied, in batch order.
    pub errors: Vec<EntryError>,
}
