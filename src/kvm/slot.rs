//! KVM memory slots: which region a slot maps, how a VMM names the slot
//! numbers it chooses ([`SlotAssignment`]), and registering and deleting
//! a slot on the VM fd.

use std::{os::fd::BorrowedFd, sync::Arc};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};

use super::{error::KvmError, sys};
use crate::{
    addr::{GuestPhysAddr, PAGE_SIZE},
    memory::{GuestMemory, GuestRegion},
};

/// Which region of the memory a slot maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionRef {
    /// The region at this index of [`GuestMemory::regions`].
    Index(usize),
    /// The region that starts at this guest-physical address.
    Start(GuestPhysAddr),
}

/// A region and the KVM slot number the VMM chose for it (see
/// [`KvmVm::adopt`](super::KvmVm::adopt)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotAssignment {
    /// The region.
    pub region: RegionRef,
    /// The slot number (below the VM's `KVM_CAP_NR_MEMSLOTS`; address
    /// space 0).
    pub slot: u32,
}

impl SlotAssignment {
    /// Region `index` in slot `slot`.
    pub fn index(index: usize, slot: u32) -> Self {
        SlotAssignment {
            region: RegionRef::Index(index),
            slot,
        }
    }

    /// The region starting at `start` in slot `slot`.
    pub fn starting_at(start: GuestPhysAddr, slot: u32) -> Self {
        SlotAssignment {
            region: RegionRef::Start(start),
            slot,
        }
    }
}

/// One memory slot: the region it maps (held, so its mapping lives as
/// long as the slot) and where.
#[derive(Clone, Debug)]
pub(super) struct Slot {
    pub(super) id: u32,
    pub(super) region: Arc<GuestRegion>,
    /// Its index in the memory the VM was made with; `None` for a region
    /// added later ([`KvmVm::add_region_slot`](super::KvmVm::add_region_slot)).
    pub(super) index: Option<usize>,
    pub(super) guest_start: u64,
    pub(super) host_addr: u64,
    pub(super) size: u64,
}

/// Pages in `slot`.
pub(super) fn slot_pages(slot: &Slot) -> u64 {
    slot.size / PAGE_SIZE as u64
}

/// The slot `assignment` asks for over `mem`, checked against the VM's
/// `limit` of slots and the slots `taken` already: the region exists,
/// the number is in range, neither is used twice, and (with dirty
/// logging) the region's page-state table has 4 KiB pages.
pub(super) fn resolve(
    mem: &GuestMemory,
    assignment: &SlotAssignment,
    limit: u32,
    taken: &[Slot],
    log_dirty_pages: bool,
) -> Result<Slot, KvmError> {
    let regions = mem.regions();
    let index = match assignment.region {
        RegionRef::Index(index) => {
            if index >= regions.len() {
                return Err(KvmError::NoRegionIndex {
                    index,
                    regions: regions.len(),
                });
            }
            index
        }
        RegionRef::Start(start) => regions
            .iter()
            .position(|r| r.info().guest_start == start)
            .ok_or(KvmError::NoRegionAt { start })?,
    };
    let slot = assignment.slot;
    if slot >= limit {
        return Err(KvmError::SlotOutOfRange { slot, limit });
    }
    if taken.iter().any(|s| s.id == slot) {
        return Err(KvmError::SlotTwice { slot });
    }
    let region = &regions[index];
    if taken.iter().any(|s| Arc::ptr_eq(&s.region, region)) {
        return Err(KvmError::RegionTwice { index });
    }
    if log_dirty_pages && region.size() / PAGE_SIZE as u64 != region.pages() as u64 {
        return Err(KvmError::DirtyGranule { index });
    }
    Ok(slot_of(slot, region, Some(index)))
}

/// The slot `slot` for `region`, a region added after the VM was made,
/// with the checks of [`resolve`] (a region slotted twice is named by its
/// start).
pub(super) fn resolve_region(
    region: &Arc<GuestRegion>,
    slot: u32,
    limit: u32,
    taken: &[Slot],
    log_dirty_pages: bool,
) -> Result<Slot, KvmError> {
    if slot >= limit {
        return Err(KvmError::SlotOutOfRange { slot, limit });
    }
    if taken.iter().any(|s| s.id == slot) {
        return Err(KvmError::SlotTwice { slot });
    }
    if taken.iter().any(|s| Arc::ptr_eq(&s.region, region)) {
        return Err(KvmError::RegionSlotted {
            start: region.start(),
        });
    }
    if log_dirty_pages && region.size() / PAGE_SIZE as u64 != region.pages() as u64 {
        return Err(KvmError::DirtyGranuleAt {
            start: region.start(),
        });
    }
    Ok(slot_of(slot, region, None))
}

fn slot_of(id: u32, region: &Arc<GuestRegion>, index: Option<usize>) -> Slot {
    let info = region.info();
    Slot {
        id,
        region: Arc::clone(region),
        index,
        guest_start: info.guest_start.0,
        host_addr: info.host_addr.0,
        size: info.size,
    }
}

/// Registers `slot` on `vm` (`KVM_SET_USER_MEMORY_REGION`), logging dirty
/// pages if asked.
///
/// # Safety
///
/// The slot's host mapping (its region's) stays mapped until the slot is
/// deleted ([`delete`]) or the kernel VM is gone.
pub(super) unsafe fn register(
    vm: BorrowedFd<'_>,
    slot: &Slot,
    log_dirty_pages: bool,
) -> Result<(), KvmError> {
    let desc = kvm_userspace_memory_region {
        slot: slot.id,
        flags: if log_dirty_pages {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: slot.guest_start,
        memory_size: slot.size,
        userspace_addr: slot.host_addr,
    };
    // SAFETY: the mapping outlives the slot: the caller's promise.
    unsafe { sys::set_user_memory_region(vm, &desc) }
}

/// Deletes `slot` from `vm` (`KVM_SET_USER_MEMORY_REGION` of size 0):
/// once this returns, neither the guest nor KVM reaches its mapping.
pub(super) fn delete(vm: BorrowedFd<'_>, slot: &Slot) -> Result<(), KvmError> {
    let desc = kvm_userspace_memory_region {
        slot: slot.id,
        flags: 0,
        guest_phys_addr: slot.guest_start,
        memory_size: 0,
        userspace_addr: slot.host_addr,
    };
    // SAFETY: a slot of size 0 reaches no memory; the kernel reads `desc`.
    unsafe { sys::set_user_memory_region(vm, &desc) }
}
