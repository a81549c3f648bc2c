//! KVM's dirty log fetched into pagefold's dirty log.

use super::{ioctl, KvmError, KvmVm};

impl KvmVm {
    /// Fetches (and clears) KVM's dirty log of every slot with
    /// `KVM_GET_DIRTY_LOG` and ORs it into pagefold's dirty log
    /// ([`GuestMemory::merge_dirty_bitmap`]); take the pages with
    /// [`GuestMemory::harvest_dirty`]. Returns the number of pages KVM
    /// reported. Does nothing (returns 0) without `log_dirty_pages`.
    pub fn fetch_dirty_log(&self) -> Result<u64, KvmError> {
        if !self.options.log_dirty_pages {
            return Ok(0);
        }
        let mut total = 0u64;
        for slot in &self.slots {
            let size = usize::try_from(slot.size).unwrap_or(usize::MAX);
            let bitmap = self
                .vm
                .get_dirty_log(slot.id, size)
                .map_err(ioctl("KVM_GET_DIRTY_LOG"))?;
            total += bitmap
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>();
            self.mem.merge_dirty_bitmap(slot.region, &bitmap)?;
        }
        Ok(total)
    }
}
