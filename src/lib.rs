//! pagefold: guest memory virtualization for virtual machine monitors.
//!
//! A VMM hands pagefold the layout of a guest's physical memory and gets
//! back [`GuestMemory`]: regions on frames of a memfd, one host mapping per
//! region (what a KVM memory slot or a vhost-user backend points at), and a
//! bounds-checked access API (bytes, plain-old-data objects, aligned atomics)
//! that stays sound while guest vCPUs write the same memory.
//!
//! # Layers
//!
//! Bottom up; each imports only those below it.
//!
//! - [`addr`]: one newtype per address space ([`GuestPhysAddr`],
//!   [`GuestVirtAddr`], [`HostVirtAddr`]) and per frame number
//!   ([`GuestFrame`], [`FrameNumber`]); raw integers stay inside hot loops.
//! - `host` (crate-private): what the library asks the kernel: the page
//!   map, `mincore`, `SEEK_DATA`, `/proc`.
//! - [`frames`]: [`FrameStore`], host frames in a memfd (4 KiB or hugetlb),
//!   their allocator and mappings, and the [`MapBudget`] every remap spends
//!   from.
//! - [`memory`]: [`GuestMemory`] and its regions, the per-page state word
//!   that every layer above changes only through `memory`'s operations, and
//!   each region's dirty log.
//! - [`userfault`]: the userfaultfd descriptor that write-protects pages.
//! - [`paging`]: guest page-table walkers (x86 32-bit, PAE, 4- and 5-level;
//!   EPT and NPT as the second level), the walk cache and mapping listings.
//! - [`dirty`]: harvesting the dirty log, merging KVM bitmaps, and the
//!   raw-write tracker.
//! - `kvm` (feature `kvm`): memory slots, KVM's dirty log, vCPUs.
//! - [`dedup`]: [`DedupHost`], KSM-style merging of identical pages of
//!   several VMs into shared copy-on-write frames, and unmerging.
//! - [`balloon`]: the memory side of virtio-balloon over untrusted PFN lists.
//! - [`migration`]: the live-migration stream, the pre-copy sender, and a
//!   receiver that folds what arrives.
//!
//! # Invariants
//!
//! 1. **No lost write.** A page's backing changes only under its lock bit
//!    with its old mapping write-protected, shared frames are never mapped
//!    writable once a page maps them (a guest write is the kernel's own
//!    copy-on-write), and the dirty log's ordering reports every write.
//! 2. **No cross-domain sharing.** Pages merge only within a merge domain,
//!    whose hashes are keyed by its own secret.
//! 3. **No out-of-bounds access and no panic on guest data.** Addresses,
//!    page tables, PFN lists and streams from a guest or a peer get a typed
//!    error that names what was wrong, and leave the library usable.
//! 4. **Real savings.** Every figure of memory held is the kernel's own.
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
#[cfg(feature = "vm-memory")]
pub mod rust_vmm;
pub mod service;
pub mod snapshot;
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
    AccessError, GuestMemory, GuestRegion, LayoutError, MemoryError, PageKind, RegionInfo,
    WriteObserver,
};
pub use migration::{StreamError, StreamReader, StreamWriter};
