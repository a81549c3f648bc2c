//! A KVM memory slot: the guest memory region it maps.

use crate::addr::PAGE_SIZE;

/// One memory slot: the region it maps.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub(super) id: u32,
    pub(super) region: usize,
    pub(super) size: u64,
}

/// Pages in `slot`.
pub(super) fn slot_pages(slot: &Slot) -> u64 {
    slot.size / PAGE_SIZE as u64
}
