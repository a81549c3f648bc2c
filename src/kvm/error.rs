//! What can go wrong in the KVM layer.

use crate::dirty::DirtyError;

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
        source: kvm_ioctls::Error,
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
    move |source| KvmError::Ioctl { op, source }
}
