//! Noticing the copies the kernel made. A merged page is a private
//! copy-on-write view of its shared frame; when anything writes it, the kernel
//! gives the page an anonymous copy and the write lands there. The page-state
//! word still says "shared" until this module reads the kernel's page map
//! (`/proc/self/pagemap`: present, not file-backed, not the zero page) and
//! moves the page to private-remapped, dropping its shared-frame reference.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    sync::{atomic::Ordering, Arc, OnceLock},
};

use super::{lock, read, DedupError, Inner, ScanState, VmEntry};
use crate::{
    addr::PAGE_SIZE,
    memory::{
        page_state::{LOCKED, REMAPPED},
        GuestRegion, PageKind, PageState,
    },
};

const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// The process's page map, opened once.
pub(super) struct PageMap {
    file: File,
    /// PFN of the kernel's zero page as this process sees it (0 when PFNs
    /// are hidden, then content decides).
    zero_pfn: u64,
}

impl PageMap {
    pub(super) fn open() -> io::Result<Self> {
        let file = File::open("/proc/self/pagemap")?;
        let zero_pfn = zero_page_pfn(&file).unwrap_or(0);
        Ok(PageMap { file, zero_pfn })
    }

    /// Entries for `count` pages of `region` starting at `first`.
    pub(super) fn entries(
        &self,
        region: &GuestRegion,
        first: usize,
        count: usize,
    ) -> io::Result<Vec<u64>> {
        let mut buf = vec![0u8; count * 8];
        let off = region.page_host_addr(first).0 / PAGE_SIZE as u64 * 8;
        self.file.read_exact_at(&mut buf, off)?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect())
    }

    /// Whether an entry shows a page the kernel copied (anonymous memory
    /// that is not the shared zero page). `content_is_zero` is asked only
    /// when PFNs are hidden from this process.
    pub(super) fn is_private_copy(
        &self,
        entry: u64,
        content_is_zero: impl FnOnce() -> bool,
    ) -> bool {
        if entry & PM_PRESENT == 0 || entry & PM_FILE != 0 {
            return false;
        }
        let pfn = entry & PM_PFN_MASK;
        if self.zero_pfn != 0 && pfn != 0 {
            return pfn != self.zero_pfn;
        }
        !content_is_zero()
    }
}

/// Finds the zero page's PFN by reading an untouched anonymous page.
fn zero_page_pfn(pagemap: &File) -> Option<u64> {
    static ZERO_PFN: OnceLock<Option<u64>> = OnceLock::new();
    *ZERO_PFN.get_or_init(|| {
        // SAFETY: a fresh private anonymous mapping of one page; nothing
        // else knows its address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `p` is a readable mapping of one page; a read maps the
        // kernel's zero page.
        let _ = unsafe { std::ptr::read_volatile(p.cast::<u8>()) };
        let mut buf = [0u8; 8];
        let ok = pagemap
            .read_exact_at(&mut buf, p as u64 / PAGE_SIZE as u64 * 8)
            .is_ok();
        // SAFETY: unmapping the page mapped above, which nothing references.
        unsafe { libc::munmap(p, PAGE_SIZE) };
        let e = u64::from_le_bytes(buf);
        (ok && e & PM_PRESENT != 0 && e & PM_PFN_MASK != 0).then_some(e & PM_PFN_MASK)
    })
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
                    s.flags() & REMAPPED != 0 && s.kind() != PageKind::Private
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
                            what: "/proc/self/pagemap",
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
        entries: &[u64],
        pagemap: &PageMap,
    ) {
        let t = region.page_states();
        for (i, &e) in entries.iter().enumerate() {
            let p = first + i;
            let s = t.load(p);
            if s.flags() & REMAPPED == 0 || s.flags() & LOCKED != 0 || s.kind() == PageKind::Private
            {
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
            let new = PageState::new(PageKind::Private, region.own_frame(p), REMAPPED);
            if t.compare_exchange(p, s, new).is_ok() {
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
