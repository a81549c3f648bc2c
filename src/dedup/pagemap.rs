//! The page map as reconciliation reads it: which pages of a region the
//! kernel copied (anonymous memory that is not the shared zero page), the
//! mark of a write to a merged page.

use std::io;

use crate::{host::pagemap, memory::GuestRegion};

/// The process's page map, opened once, and the zero page's PFN in it.
pub(super) struct PageMap {
    map: pagemap::PageMap,
    /// PFN of the kernel's zero page as this process sees it (0 when PFNs
    /// are hidden, then content decides).
    zero_pfn: u64,
}

impl PageMap {
    pub(super) fn open() -> io::Result<Self> {
        let map = pagemap::PageMap::open()?;
        let zero_pfn = map.zero_page_pfn().unwrap_or(0);
        Ok(PageMap { map, zero_pfn })
    }

    /// Entries for `count` pages of `region` starting at `first`.
    pub(super) fn entries(
        &self,
        region: &GuestRegion,
        first: usize,
        count: usize,
    ) -> io::Result<Vec<pagemap::Entry>> {
        let mut out = vec![pagemap::Entry::default(); count];
        self.map.read(region.page_host_addr(first), &mut out)?;
        Ok(out)
    }

    /// Whether an entry shows a page the kernel copied (anonymous memory
    /// that is not the shared zero page). `content_is_zero` is asked only
    /// when PFNs are hidden from this process.
    pub(super) fn is_private_copy(
        &self,
        entry: pagemap::Entry,
        content_is_zero: impl FnOnce() -> bool,
    ) -> bool {
        if !entry.is_present() || entry.is_file() {
            return false;
        }
        let pfn = entry.pfn();
        if self.zero_pfn != 0 && pfn != 0 {
            return pfn != self.zero_pfn;
        }
        !content_is_zero()
    }
}
