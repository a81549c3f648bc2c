//! Huge pages (a hugetlb store, 2 MiB granule): the kernel can only
//! release a huge page whole, so inflated 4 KiB pages wait in a bitmap per
//! huge page (`Inner::pending`, counted in [`Balloon::actual`]) and the huge
//! page is punched when every one of its 4 KiB pages is in the balloon. A
//! deflate of a waiting page just takes it out of the bitmap.

use super::{
    error::BalloonError,
    page::{check_inflatable, take_page, unlock_page},
    Balloon, Inner, Loc,
};
use crate::{
    addr::{GuestFrame, PAGE_SHIFT, PAGE_SIZE},
    frames::FrameRange,
    memory::{GuestRegion, PageKind},
};

/// Whether bit `i` of a pending bitmap is set.
fn is_set(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

/// Pages of one huge page locked for its punch.
#[derive(Default)]
struct Held {
    /// Pending pages taken (ballooned and locked) for the punch.
    taken: Vec<usize>,
    /// Pages ballooned before, locked as they are.
    kept: Vec<usize>,
}

impl Balloon {
    /// Hugetlb: marks the page pending; releases its huge page when whole.
    /// Returns the 4 KiB pages released.
    pub(super) fn inflate_huge(
        &self,
        inner: &mut Inner,
        l: Loc,
        pfn: GuestFrame,
    ) -> Result<u64, BalloonError> {
        let region = &self.mem.regions()[l.region];
        let t = region.page_states();
        check_inflatable(t.load(l.page), pfn)?;
        let hp = l.page / self.huge_pages;
        let words = self.huge_pages.div_ceil(64);
        let bits = inner
            .pending
            .entry((l.region, hp))
            .or_insert_with(|| vec![0u64; words]);
        let bit = l.page % self.huge_pages;
        if is_set(bits, bit) {
            return Err(BalloonError::AlreadyBallooned { pfn });
        }
        bits[bit / 64] |= 1 << (bit % 64);
        inner.pending_pages += 1;
        // Whole when every page is pending or already ballooned.
        let first = hp * self.huge_pages;
        let whole = (0..self.huge_pages)
            .all(|i| is_set(bits, i) || t.load(first + i).kind() == PageKind::Ballooned);
        if !whole {
            return Ok(0);
        }
        let bits = bits.clone();
        if !self.release_huge(region, first, &bits, pfn)? {
            return Ok(0);
        }
        let n = bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        inner.pending.remove(&(l.region, hp));
        inner.pending_pages -= n;
        Ok(self.huge_pages as u64)
    }

    /// Punches the huge page from page `first` of `region`, whose pages are
    /// all pending (`bits`) or ballooned. `Ok(true)`: punched, every page
    /// ballooned. `Ok(false)`: a page was taken back since the caller's
    /// check, so the huge page is not whole; nothing changed. `Err`: the
    /// punch failed. Either way short of `Ok(true)` the pending pages stay
    /// pending: a later inflate of the same huge page retries.
    fn release_huge(
        &self,
        region: &GuestRegion,
        first: usize,
        bits: &[u64],
        pfn: GuestFrame,
    ) -> Result<bool, BalloonError> {
        let (ok, held) = self.hold_huge(region, first, bits, pfn);
        let release = if ok {
            self.mem.frame_store().release(FrameRange {
                start: region.own_frame(first),
                count: self.huge_pages as u64,
            })
        } else {
            Ok(())
        };
        for &p in &held.kept {
            unlock_page(region, p, PageKind::Ballooned);
        }
        if !ok || release.is_err() {
            for &p in &held.taken {
                unlock_page(region, p, PageKind::Private);
            }
            return match release {
                Err(source) => Err(BalloonError::Release { pfn, source }),
                Ok(()) => Ok(false),
            };
        }
        for &p in &held.taken {
            unlock_page(region, p, PageKind::Ballooned);
        }
        region.dirty_log().note_write(
            (first as u64) << PAGE_SHIFT,
            (self.huge_pages * PAGE_SIZE) as u64,
        );
        Ok(true)
    }

    /// Locks every page of the huge page from here to the punch: the
    /// pending ones as they are taken, the ones ballooned before as they
    /// are (a library write takes a ballooned page back by writing it; it
    /// waits for the lock, then writes into the fresh huge page). A page
    /// taken back since the caller's check makes the huge page not whole:
    /// `false`, with what was locked so far.
    fn hold_huge(
        &self,
        region: &GuestRegion,
        first: usize,
        bits: &[u64],
        pfn: GuestFrame,
    ) -> (bool, Held) {
        let t = region.page_states();
        let mut held = Held::default();
        for i in 0..self.huge_pages {
            let p = first + i;
            if !is_set(bits, i) {
                let s = t.load(p);
                if s.kind() == PageKind::Ballooned && s.is_unflagged() && t.try_lock(p, s).is_ok() {
                    held.kept.push(p);
                    continue;
                }
                return (false, held);
            }
            match take_page(region, p, pfn) {
                Ok(_) => held.taken.push(p),
                Err(_) => return (false, held),
            }
        }
        (true, held)
    }

    /// Hugetlb: deflates page `l` if it is waiting for the rest of its huge
    /// page. Returns whether it was.
    pub(super) fn deflate_pending(&self, inner: &mut Inner, l: Loc) -> bool {
        let hp = l.page / self.huge_pages;
        let bit = l.page % self.huge_pages;
        let Some(bits) = inner.pending.get_mut(&(l.region, hp)) else {
            return false;
        };
        if !is_set(bits, bit) {
            return false;
        }
        bits[bit / 64] &= !(1 << (bit % 64));
        inner.pending_pages -= 1;
        if bits.iter().all(|w| *w == 0) {
            inner.pending.remove(&(l.region, hp));
        }
        true
    }
}
