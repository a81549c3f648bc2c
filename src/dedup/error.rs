//! What can go wrong in the dedup layer, one type for every operation of it.

use crate::{
    addr::{GuestPhysAddr, PageSize},
    frames::FrameError,
    userfault::UserfaultError,
};

use super::options::VmId;

/// Errors of the dedup layer.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// Write protection (userfaultfd) is unavailable or failed.
    #[error(transparent)]
    Userfault(#[from] UserfaultError),
    /// The frame store failed.
    #[error(transparent)]
    Frames(#[from] FrameError),
    /// The VMM process that maps the VM's memory did not do its part.
    #[error(transparent)]
    Remote(#[from] super::remote::RemoteError),
    /// The OS random source failed while creating a domain key.
    #[error("cannot create a domain key: {0}")]
    Random(String),
    /// Dedup needs a 4 KiB-page frame store.
    #[error("dedup needs a frame store with 4 KiB pages, not {0}")]
    HugeBacking(PageSize),
    /// No such VM is registered.
    #[error("VM {} is not registered with this dedup host", .0 .0)]
    UnknownVm(VmId),
    /// The memory's userfaultfd is taken: it is registered with a dedup host
    /// already, or a raw-write dirty tracker (`dirty::RawWriteTracker`)
    /// holds it (a mapping belongs to one userfaultfd, and dedup's remaps
    /// would drop the tracker's protection).
    #[error(
        "this guest memory is already registered with a dedup host or watched by a raw-write dirty tracker"
    )]
    AlreadyRegistered,
    /// An excluded address is not the start of one of the VM's regions.
    #[error("exclude: no region of the VM starts at {0}")]
    NoSuchRegion(GuestPhysAddr),
    /// The address is not in the VM's memory.
    #[error("guest-physical address {0} is not backed by any region of the VM")]
    Unmapped(GuestPhysAddr),
    /// The page stayed locked by another operation for too long.
    #[error("page at {0} stayed busy; try again")]
    Busy(GuestPhysAddr),
    /// A background scanner asked to scan nothing per step (no pages, or no
    /// time) would only spin.
    #[error("a background scan step needs a budget of at least one page or some time")]
    EmptyBudget,
    /// The VM was restored lazily onto an image still arriving
    /// (`snapshot::restore_folded_lazy`): its pages cannot be unmerged or
    /// merged until its restore's `wait` returns.
    #[error("VM {} is still arriving (a lazy folded restore); wait for its restore first", .0 .0)]
    Arriving(VmId),
    /// An image was published with pages still to arrive.
    #[error("{0} pages of the image have not arrived")]
    NotArrived(u64),
    /// Reading the kernel's view of this process failed.
    #[error("reading {what}: {source}")]
    Proc {
        /// The file.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
