//! A VM as the dedup host holds it: its memory, merge domain, which regions
//! it scans, and its count of copy-on-write breaks.

use std::sync::{atomic::AtomicU64, Arc};

use super::options::{DomainId, VmId};
use crate::memory::GuestMemory;

pub(super) struct VmEntry {
    pub(super) id: VmId,
    pub(super) mem: Arc<GuestMemory>,
    pub(super) domain: DomainId,
    pub(super) included: Vec<bool>,
    pub(super) cow_breaks: AtomicU64,
}
