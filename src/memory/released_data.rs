//! Which released pages hold data after all. A page whose state says zero
//! or ballooned, and whose raw writes are not trapped, may have been
//! written behind the library's back (a guest reusing a page it reported
//! free, a vCPU touching a ballooned page); one that holds no memory reads
//! as zeros. Migration's round 0 and its digest ask here before reading, so
//! they skip holes a chunk of pages per call instead of reading each (a
//! library read no longer allocates such a page, `released.rs`, but costs
//! a `pread`): `mincore` (which does not count a page the host swapped
//! out), then `SEEK_DATA` on the memfd for a page on its own frame (which
//! does) or the page map's swap bit for a remapped page (anonymous memory).
//! Anything the kernel will not say counts as data: the page is then read,
//! never wrong. The kernel is asked through `crate::host`.

use std::os::fd::AsFd;

use super::{GuestMemory, GuestRegion, PageState};
use crate::{
    addr::PAGE_SIZE,
    frames::FrameStore,
    host::{
        pagemap::PageMap,
        residency::{self, DataFrom},
    },
};

/// Pages per `mincore` call.
const RESIDENT_CHUNK: usize = 512;

/// The probes, with what they learnt in passing (pages are asked in order).
/// One pass only: what they learnt goes stale as the guest writes, which
/// dirty tracking covers only by asking again next round, with new probes
/// (kept across rounds, a page written after its `mincore` answer would be
/// sent as zeros).
pub(crate) struct ReleasedData<'m> {
    store: &'m FrameStore,
    /// From the last `SEEK_DATA`: file offsets `[from, data)` are a hole.
    hole: (u64, u64),
    /// The last `mincore` answer: (region's host address, first page,
    /// residency of up to `RESIDENT_CHUNK` pages from there, `None` if
    /// refused).
    resident: Option<(u64, usize, Option<Vec<u8>>)>,
    pagemap: Option<PageMap>,
}

impl<'m> ReleasedData<'m> {
    /// Probes for the pages of `mem`.
    pub(crate) fn new(mem: &'m GuestMemory) -> Self {
        ReleasedData {
            store: mem.frame_store(),
            hole: (0, 0),
            resident: None,
            pagemap: None,
        }
    }

    /// Whether released page `page` of `region` (in `state`), which
    /// `mincore` says holds no memory, holds data all the same (swapped out).
    pub(crate) fn swapped_data(
        &mut self,
        region: &GuestRegion,
        page: usize,
        state: PageState,
    ) -> bool {
        if state.is_locked() || !self.store.has_file() {
            // Anonymous memory: the page map cannot tell a shared anonymous
            // page swapped out (shmem) from one never written, so the page
            // is read (a private one never written reads the zero page).
            return true;
        }
        if !state.is_remapped() {
            let offset = region.own_frame(page).file_offset();
            if self.hole.0 <= offset && offset + PAGE_SIZE as u64 <= self.hole.1 {
                return false;
            }
            let data = match residency::seek_data(self.store.as_fd(), offset) {
                DataFrom::At(data) => data,
                DataFrom::None => u64::MAX, // no data from here to the end
                DataFrom::Unknown => return true,
            };
            self.hole = (offset, data);
            return data < offset + PAGE_SIZE as u64;
        }
        // Anonymous memory: the page map's "swapped" or "present".
        if self.pagemap.is_none() {
            self.pagemap = PageMap::open().ok();
        }
        let Some(pm) = &self.pagemap else {
            return true;
        };
        pm.entry(region.page_host_addr(page))
            .map_or(true, |e| e.holds_data())
    }

    /// Whether released page `page` of `region` holds data: resident
    /// (`mincore`, asked a chunk of pages at a time), or swapped out.
    pub(crate) fn holds_data(
        &mut self,
        region: &GuestRegion,
        page: usize,
        state: PageState,
    ) -> bool {
        let base = region.host_addr().0;
        let first = page - page % RESIDENT_CHUNK;
        if !matches!(&self.resident, Some((b, f, _)) if *b == base && *f == first) {
            let len = RESIDENT_CHUNK.min(region.pages() - first);
            self.resident = Some((base, first, region.resident(first, len)));
        }
        let resident = match &self.resident {
            Some((_, _, Some(v))) => v
                .get(page - first)
                .is_none_or(|&b| residency::is_resident(b)),
            _ => true,
        };
        resident || self.swapped_data(region, page, state)
    }
}
