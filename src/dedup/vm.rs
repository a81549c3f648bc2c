//! A VM as the dedup host holds it: its memory, merge domain, which regions
//! it scans, its count of copy-on-write breaks, and the process that maps it
//! besides the host, if any.

use std::sync::{atomic::AtomicU64, Arc};

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
}
