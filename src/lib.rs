//! pagefold: guest memory virtualization for virtual machine monitors.
//!
//! A VMM hands pagefold the layout of a guest's physical memory and gets
//! back [`GuestMemory`]: regions backed by frames in a memfd
//! ([`frames::FrameStore`]), one contiguous host mapping per region (what a
//! KVM memory slot points at), a per-page state word whose protocol memory
//! owns (the dedup, balloon and migration layers change it through memory's
//! page-state operations), and a bounds-checked
//! access API (bytes, plain-old-data objects, aligned atomics) that stays
//! sound while guest vCPUs write the same memory.
//!
//! Layers, bottom up: [`addr`] (address newtypes), `host` (what the library
//! asks the host kernel: page map, residency, mappings), [`frames`] (host frames),
//! [`memory`] (guest-physical memory), and beside it [`dirty`] (the dirty
//! log: library writes, KVM bitmaps, raw writes via userfaultfd).
//! Guest-controlled input never makes the library touch memory outside a
//! mapping or panic: it gets a typed error.
//!
//! ```
//! use pagefold::{GuestMemory, GuestPhysAddr};
//!
//! let mem = GuestMemory::new(&[(GuestPhysAddr(0), 1 << 20)])?;
//! mem.write_obj(GuestPhysAddr(0x1000), 0xdead_beef_u32)?;
//! assert_eq!(mem.read_obj::<u32>(GuestPhysAddr(0x1000))?, 0xdead_beef);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(not(target_endian = "little"))]
compile_error!("pagefold supports little-endian hosts only (guest memory is little-endian)");
#[cfg(not(target_pointer_width = "64"))]
compile_error!("pagefold needs a 64-bit host");
#[cfg(not(target_os = "linux"))]
compile_error!("pagefold needs Linux (memfd, fallocate, userfaultfd)");

pub mod addr;
pub mod balloon;
pub mod dedup;
pub mod dirty;
pub mod frames;
mod host;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod memory;
pub mod migration;
pub mod paging;
mod sync;
pub mod userfault;

/// The loom door: the page-state table and the real page-state steps of
/// merge, unmerge and reconciliation, for `tests/loom_page_state.rs` (built
/// with `--cfg loom` only; not part of the API).
#[cfg(loom)]
#[doc(hidden)]
pub mod __loom {
    pub use crate::{
        dedup::steps::{
            claim_candidate, claim_remapped, mark_copied, mergeable, merged_state, publish_merge,
            publish_unmerge, reconcilable, release_candidate, release_remapped, RemappedClaim,
            Target,
        },
        memory::{page_state::PageStateTable, PageKind, PageState},
    };
}

pub use addr::{
    FrameNumber, GuestFrame, GuestPhysAddr, GuestVirtAddr, HostVirtAddr, PageSize, PAGE_SIZE,
};
pub use balloon::{Balloon, BalloonError, BalloonOptions, BalloonStats, BatchReport, EntryError};
pub use dedup::{
    DedupError, DedupHost, DedupOptions, DedupStats, DomainId, KernelView, ScanBudget, ScanReport,
    VmId, VmOptions, VmStats,
};
pub use dirty::{DirtyError, DirtyRun, RawWriteTracker, RegionSet};
pub use frames::{Backing, FrameError, FrameStore, MapBudget, StoreOptions};
pub use memory::{
    AccessError, GuestMemory, LayoutError, MemoryError, PageKind, RegionInfo, WriteObserver,
};
pub use migration::{StreamError, StreamReader, StreamWriter};
