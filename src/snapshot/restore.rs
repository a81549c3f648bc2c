//! Restoring by copy: every page of a snapshot (through its chain) into a
//! [`GuestMemory`] of the same layout. Stored pages are read a run of slots
//! per `pread`, checked against their addresses, and written; zero pages
//! are released in the destination (a hole punched, nothing written), so a
//! restored guest holds memory only for the pages that have content.

use super::{
    error::SnapshotError,
    layout::PageLayout,
    reader::{Located, SnapshotReader},
    scan::BATCH,
};
use crate::{
    addr::{GuestPhysAddr, PAGE_SIZE},
    memory::GuestMemory,
};

const PAGE: u64 = PAGE_SIZE as u64;

/// What a restore did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Pages of the layout.
    pub pages: u64,
    /// Pages released as zero.
    pub zero_pages: u64,
    /// Pages copied from the snapshot files.
    pub copied_pages: u64,
}

/// Restores `snap` (with its ancestors attached) into `mem`, whose layout
/// must be the snapshot's ([`SnapshotReader::region_layout`]). On an error
/// (a damaged page, a missing ancestor) the memory is partly restored and
/// must be discarded; every page is checked before it is written, so no
/// page ever holds bytes the snapshot did not save. An error reading an
/// ancestor's file is [`SnapshotError::InFile`], naming it.
pub fn restore_into(
    snap: &SnapshotReader,
    mem: &GuestMemory,
) -> Result<RestoreStats, SnapshotError> {
    if let Some(what) = snap.layout().differs(&PageLayout::of(mem)) {
        return Err(SnapshotError::LayoutMismatch { what });
    }
    let mut stats = RestoreStats {
        pages: snap.pages(),
        ..RestoreStats::default()
    };
    let mut buf = vec![0u8; BATCH * PAGE_SIZE];
    let mut locs = Vec::with_capacity(BATCH);
    for (i, r) in mem.regions().iter().enumerate() {
        let base = snap.layout().first_page(i);
        let pages = r.pages() as u64;
        let mut k = 0u64;
        while k < pages {
            let n = (BATCH as u64).min(pages - k);
            locs.clear();
            for p in k..k + n {
                locs.push(snap.locate(base + p)?);
            }
            let gpa = |j: usize| GuestPhysAddr(r.start().0 + (k + j as u64) * PAGE);
            let mut j = 0usize;
            while j < locs.len() {
                match locs[j] {
                    Located::Zero => {
                        let e = (j..locs.len())
                            .find(|&e| !matches!(locs[e], Located::Zero))
                            .unwrap_or(locs.len());
                        release_zeros(mem, gpa(j), (e - j) as u64)?;
                        stats.zero_pages += (e - j) as u64;
                        j = e;
                    }
                    Located::Stored { file, slot } => {
                        let next = |e: usize| match locs[e] {
                            Located::Stored { file: f, slot: s } => {
                                std::ptr::eq(f, file) && s == slot + (e - j) as u64
                            }
                            Located::Zero => false,
                        };
                        let e = (j + 1..locs.len())
                            .find(|&e| !next(e))
                            .unwrap_or(locs.len());
                        let dst = &mut buf[j * PAGE_SIZE..e * PAGE_SIZE];
                        file.read_slots(slot, dst).map_err(|e| {
                            // An ancestor's file: the caller did not name it.
                            if std::ptr::eq(file, snap) {
                                e
                            } else {
                                file.name_error(e)
                            }
                        })?;
                        mem.write(gpa(j), dst)?;
                        stats.copied_pages += (e - j) as u64;
                        j = e;
                    }
                }
            }
            k += n;
        }
    }
    Ok(stats)
}

/// Makes `pages` pages from `gpa` zero without writing them: the store's
/// whole granules among them are released (punched); the pages of a
/// partial granule, or of memory with no file to punch, are read and
/// zeroed only where they are not zero already.
pub(crate) fn release_zeros(
    mem: &GuestMemory,
    gpa: GuestPhysAddr,
    pages: u64,
) -> Result<(), SnapshotError> {
    let end = gpa.0 + pages * PAGE;
    let (mut a, mut b) = (end, end);
    if mem.frame_store().has_file() {
        let g = mem.frame_store().granule().bytes();
        a = gpa.0.next_multiple_of(g).min(end);
        b = (end / g * g).max(a);
        if a < b {
            mem.discard(GuestPhysAddr(a), b - a)?;
        }
    }
    let mut page = [0u8; PAGE_SIZE];
    for at in (gpa.0..a).chain(b..end).step_by(PAGE_SIZE) {
        mem.read(GuestPhysAddr(at), &mut page)?;
        if !crate::addr::is_zero_page(&page) {
            mem.fill(GuestPhysAddr(at), 0, PAGE_SIZE)?;
        }
    }
    Ok(())
}
