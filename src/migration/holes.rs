//! Which released pages hold data after all. A page whose state says zero
//! or ballooned, and whose raw writes are not trapped, may have been
//! written behind the library's back (a guest reusing a page it reported
//! free, a vCPU touching a ballooned page); one that holds no memory reads
//! as zeros. Round 0 and the digest ask the kernel before reading, so they
//! skip holes a chunk of pages per call instead of reading each (a library
//! read no longer allocates such a page, `memory/released.rs`, but costs a
//! `pread`): `mincore` (which does not count a page the host swapped out),
//! then `SEEK_DATA` on the memfd for a page on its own frame (which does) or
//! the page map's swap bit for a remapped page (anonymous memory). Anything
//! the kernel will not say counts as data: the page is then read, never
//! wrong.

use std::os::{fd::AsRawFd, unix::fs::FileExt};

use crate::{
    addr::PAGE_SIZE,
    memory::{
        page_state::{LOCKED, REMAPPED},
        GuestMemory, GuestRegion, PageKind, PageState,
    },
};

/// Pages per `mincore` call.
const RESIDENT_CHUNK: usize = 512;

/// The probes, with what they learnt in passing (pages are asked in order).
/// One pass only: what they learnt goes stale as the guest writes, which
/// dirty tracking covers only by asking again next round, with new probes
/// (kept across rounds, a page written after its `mincore` answer would be
/// sent as zeros).
pub(super) struct Holes {
    fd: std::os::fd::RawFd,
    /// From the last `SEEK_DATA`: file offsets `[from, data)` are a hole.
    hole: (u64, u64),
    /// The last `mincore` answer: (region's host address, first page,
    /// residency of up to `RESIDENT_CHUNK` pages from there, `None` if
    /// refused).
    resident: Option<(u64, usize, Option<Vec<u8>>)>,
    pagemap: Option<std::fs::File>,
}

/// Whether the page state is one whose bytes the state alone does not give:
/// released or ballooned with raw writes untrapped. (`reads_zero` states
/// read zeros without memory; other kinds are read as they are.)
pub(super) fn released(state: PageState) -> bool {
    matches!(state.kind(), PageKind::Zero | PageKind::Ballooned) && !state.reads_zero()
}

impl Holes {
    pub(super) fn new(mem: &GuestMemory) -> Self {
        Holes {
            fd: mem.frame_store().as_raw_fd(),
            hole: (0, 0),
            resident: None,
            pagemap: None,
        }
    }

    /// Whether released page `page` of `region` (in `state`), which
    /// `mincore` says holds no memory, holds data all the same (swapped out).
    pub(super) fn swapped_data(
        &mut self,
        region: &GuestRegion,
        page: usize,
        state: PageState,
    ) -> bool {
        if state.flags() & LOCKED != 0 {
            return true;
        }
        if state.flags() & REMAPPED == 0 {
            let offset = region.own_frame(page).file_offset();
            if self.hole.0 <= offset && offset + PAGE_SIZE as u64 <= self.hole.1 {
                return false;
            }
            let Ok(at) = libc::off_t::try_from(offset) else {
                return true;
            };
            // SAFETY: `lseek` only reads the descriptor's file; the store's
            // memfd stays open while the memory lives, which outlives this.
            let data = unsafe { libc::lseek(self.fd, at, libc::SEEK_DATA) };
            let data = if data < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    u64::MAX // no data from here to the end
                } else {
                    return true;
                }
            } else {
                u64::try_from(data).unwrap_or(0)
            };
            self.hole = (offset, data);
            return data < offset + PAGE_SIZE as u64;
        }
        // Anonymous memory: the page map's "swapped" (bit 62) or "present"
        // (bit 63).
        if self.pagemap.is_none() {
            self.pagemap = std::fs::File::open("/proc/self/pagemap").ok();
        }
        let Some(pm) = &self.pagemap else {
            return true;
        };
        let vpn = region.page_host_addr(page).0 / PAGE_SIZE as u64;
        let mut entry = [0u8; 8];
        match pm.read_exact_at(&mut entry, vpn * 8) {
            Ok(()) => u64::from_le_bytes(entry) & (3 << 62) != 0,
            Err(_) => true,
        }
    }

    /// Whether released page `page` of `region` holds data: resident
    /// (`mincore`, asked a chunk of pages at a time), or swapped out.
    pub(super) fn holds_data(
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
            Some((_, _, Some(v))) => v.get(page - first).map_or(true, |b| b & 1 != 0),
            _ => true,
        };
        resident || self.swapped_data(region, page, state)
    }
}
