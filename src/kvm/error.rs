//! What can go wrong in the KVM layer.

use crate::{addr::GuestPhysAddr, dirty::DirtyError};

/// Errors of the KVM layer.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// An ioctl (or opening `/dev/kvm`) failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The memory has more regions than KVM has slots.
    #[error("{regions} regions but KVM offers {slots} memory slots")]
    TooManyRegions {
        /// Regions in the memory.
        regions: usize,
        /// Slots KVM offers.
        slots: usize,
    },
    /// Dirty logging needs one page-state entry per 4 KiB page (KVM logs at
    /// that granularity); this region's pages are larger.
    #[error("region {index}: dirty logging needs 4 KiB pages in the page-state table")]
    DirtyGranule {
        /// The region.
        index: usize,
    },
    /// Merging a KVM bitmap into the dirty log failed.
    #[error("merging KVM's dirty bitmap: {0}")]
    Dirty(#[from] DirtyError),
    /// The guest exited for a reason the runner does not handle.
    #[error("unhandled vCPU exit: {0}")]
    UnhandledExit(String),
    /// A slot number at or past what the VM offers (`KVM_CAP_NR_MEMSLOTS`).
    #[error("memory slot {slot}: KVM offers slots 0 to {}", .limit.saturating_sub(1))]
    SlotOutOfRange {
        /// The slot number asked for.
        slot: u32,
        /// Slots the VM offers.
        limit: u32,
    },
    /// One slot number given for two regions, or a slot number this VM
    /// already registered.
    #[error("memory slot {slot} given twice")]
    SlotTwice {
        /// The slot number.
        slot: u32,
    },
    /// One region given two slots, or a region this VM already registered.
    #[error("region {index} given two memory slots")]
    RegionTwice {
        /// The region.
        index: usize,
    },
    /// A region added while the VM runs that already has a slot.
    #[error("the region at {start} has a memory slot already")]
    RegionSlotted {
        /// The region's start.
        start: crate::addr::GuestPhysAddr,
    },
    /// A region added while the VM runs whose pages are not 4 KiB, with
    /// dirty logging on (KVM logs 4 KiB pages).
    #[error("the region at {start} has no 4 KiB page states for KVM's dirty log")]
    DirtyGranuleAt {
        /// The region's start.
        start: crate::addr::GuestPhysAddr,
    },
    /// No region of the memory is at this index.
    #[error("no region {index} (the memory has {regions})")]
    NoRegionIndex {
        /// The index asked for.
        index: usize,
        /// Regions in the memory.
        regions: usize,
    },
    /// No region of the memory starts at this guest address.
    #[error("no region starts at guest address {start:#x}")]
    NoRegionAt {
        /// The guest address asked for.
        start: GuestPhysAddr,
    },
    /// No slot of this VM has this number (or it is not pagefold's).
    #[error("memory slot {slot} is not one this VM registered")]
    NoSuchSlot {
        /// The slot number.
        slot: u32,
    },
    /// The vCPU's `XSAVE` area is larger than the 4 KiB of a vCPU state
    /// (dynamically enabled features such as AMX): loading one would
    /// make KVM read past it.
    #[error("the vCPU's XSAVE area is {size} bytes; a vCPU state carries 4096")]
    XsaveTooLarge {
        /// Bytes KVM reads (`KVM_CAP_XSAVE2`).
        size: usize,
    },
    /// A snapshot's `XSAVE` area does not fit this vCPU: larger than the
    /// area KVM has for it (`KVM_CAP_XSAVE2`: the source had more state
    /// components, AVX-512 or AMX, than this host or process enables), or
    /// not a whole number of 4-byte words.
    #[error("the snapshot's XSAVE area is {saved} bytes; this vCPU's is {here} (KVM_CAP_XSAVE2)")]
    XsaveMismatch {
        /// Bytes of the snapshot's area.
        saved: usize,
        /// Bytes of this vCPU's area.
        here: usize,
    },
    /// The vCPU state holds a part this VM cannot take, naming the KVM
    /// capability or setup it lacks (a local APIC state for a VM without
    /// an in-kernel irqchip: `KVM_CREATE_IRQCHIP`).
    #[error("the vCPU state has {part}, which this VM cannot load: {needs}")]
    Unsupported {
        /// The part of the state.
        part: &'static str,
        /// What the VM lacks.
        needs: &'static str,
    },
    /// KVM would not load a model-specific register of a vCPU state (this
    /// host's KVM lacks it, or refused the value).
    #[error("KVM refused MSR {index:#x} of the vCPU state")]
    MsrRefused {
        /// The register's index.
        index: u32,
    },
}

/// Maps a kvm-ioctls error to [`KvmError::Ioctl`] naming the operation.
pub(super) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl {
        op,
        source: os_error(&source),
    }
}

/// A kvm-ioctls error as the `std` error it stands for (the public API
/// carries no kvm-ioctls type).
pub(super) fn os_error(e: &kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// [`KvmError::Ioctl`] of the calling thread's `errno`, for raw ioctls.
pub(super) fn last_os_error(op: &'static str) -> KvmError {
    KvmError::Ioctl {
        op,
        source: std::io::Error::last_os_error(),
    }
}
