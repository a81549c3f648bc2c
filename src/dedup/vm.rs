//! A VM as the dedup host holds it: its memory, merge domain, which regions
//! it scans, its count of copy-on-write breaks, and the process that maps it
//! besides the host, if any, and whether its memory is still arriving.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use super::{
    options::{DomainId, VmId},
    remote::RemoteMapper,
};
use crate::memory::GuestMemory;

pub(super) struct VmEntry {
    pub(super) id: VmId,
    pub(super) mem: Arc<GuestMemory>,
    pub(super) domain: DomainId,
    pub(super) included: Vec<bool>,
    pub(super) cow_breaks: AtomicU64,
    /// The VMM process that maps this VM's memory besides the host, when
    /// the VM is under the host service.
    pub(super) remote: Option<Arc<dyn RemoteMapper>>,
    /// Restored lazily onto an image still arriving (`arriving.rs`): its
    /// pages fault into another userfaultfd until the image is filled, so
    /// no pass scans it and nothing unmerges it until then.
    pub(super) arriving: AtomicBool,
}

impl VmEntry {
    /// Whether passes scan region `region` now: included, and the VM's
    /// memory is all there.
    pub(super) fn scans(&self, region: usize) -> bool {
        self.included.get(region).copied().unwrap_or(false) && !self.is_arriving()
    }

    /// Whether the VM is still arriving (see the field).
    pub(super) fn is_arriving(&self) -> bool {
        self.arriving.load(Ordering::Acquire)
    }
}
