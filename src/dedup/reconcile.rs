//! Noticing the copies the kernel made. A merged page is a private
//! copy-on-write view of its shared frame; when anything writes it, the kernel
//! gives the page an anonymous copy and the write lands there. The page-state
//! word still says "shared" until this module reads the kernel's page map
//! (`/proc/self/pagemap`: present, not file-backed, not the zero page) and
//! moves the page to private-remapped, dropping its shared-frame reference.

use std::{
    io,
    sync::{atomic::Ordering, Arc},
};

use super::{lock, read, steps, DedupError, Inner, ScanState, VmEntry};
use crate::{
    addr::PAGE_SIZE,
    host::pagemap,
    memory::{GuestRegion, PageKind},
};

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

impl Inner {
    /// Moves pages the kernel copied (a write to a merged page) from
    /// "shared" to "private, remapped" and drops their references.
    pub(super) fn reconcile(
        &self,
        scan: &mut ScanState,
        vms: &[Arc<VmEntry>],
    ) -> Result<(), DedupError> {
        for vm in vms {
            for region in vm.mem.regions() {
                let t = region.page_states();
                // Only regions with merged pages need the kernel's page map.
                let Some(first) = (0..t.len()).find(|&p| {
                    let s = t.load(p);
                    s.is_remapped() && s.kind() != PageKind::Private
                }) else {
                    continue;
                };
                // A chunk of the page map at a time (128 KiB of entries for
                // 64 MiB of guest memory), not the region's whole tail: a
                // TiB region would ask for gigabytes at once, and a larger
                // chunk is dedup's peak memory (it is read and dropped).
                const CHUNK: usize = 1 << 14;
                for chunk in (first..t.len()).step_by(CHUNK) {
                    let count = CHUNK.min(t.len() - chunk);
                    let entries = scan
                        .pagemap
                        .entries(region, chunk, count)
                        .map_err(|source| DedupError::Proc {
                            what: pagemap::PATH,
                            source,
                        })?;
                    self.reconcile_entries(vm, region, chunk, &entries, &scan.pagemap);
                }
            }
        }
        self.recount()
    }

    /// Reconciles the pages `first..` of `region` from their page-map
    /// `entries`.
    fn reconcile_entries(
        &self,
        vm: &VmEntry,
        region: &crate::memory::GuestRegion,
        first: usize,
        entries: &[pagemap::Entry],
        pagemap: &PageMap,
    ) {
        let t = region.page_states();
        for (i, &e) in entries.iter().enumerate() {
            let p = first + i;
            let s = t.load(p);
            if !steps::reconcilable(s) {
                continue;
            }
            let copied = pagemap.is_private_copy(e, || {
                let mut b = [0u8; PAGE_SIZE];
                region.read_page(p, &mut b);
                crate::addr::is_zero_page(&b)
            });
            if !copied {
                continue;
            }
            if steps::mark_copied(t, p, s, region.own_frame(p)) {
                vm.cow_breaks.fetch_add(1, Ordering::Relaxed);
                self.cow_breaks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Recounts shared-frame references from the page states of *every*
    /// registered VM (a subset would count too few and free frames still
    /// mapped) and frees the frames no page maps any more.
    pub(super) fn recount(&self) -> Result<(), DedupError> {
        let vms = read(&self.vms).clone();
        // Held while counting, so no unmerge publishes a state and drops
        // its reference in between.
        let mut shared = lock(&self.shared);
        shared.recount(&self.store, |count| {
            for vm in &vms {
                for region in vm.mem.regions() {
                    let t = region.page_states();
                    if !region.needs_state_checks() {
                        continue;
                    }
                    for p in 0..t.len() {
                        let s = t.load(p);
                        if s.kind() == PageKind::Shared {
                            count(s.frame());
                        }
                    }
                }
            }
        })?;
        Ok(())
    }
}
