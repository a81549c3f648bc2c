//! One page's way into and out of the balloon: which page states may be
//! ballooned, taking a page (ballooned and locked until its release) and
//! letting it go again, and asking the kernel which pages of a run hold
//! memory. Page-state words only; releasing memory is the caller's.

use super::error::BalloonError;
use crate::{
    addr::GuestFrame,
    host::residency::is_resident,
    memory::{Flags, GuestRegion, PageKind, PageState},
};

/// Whether a page in state `s` may enter the balloon.
pub(super) fn check_inflatable(s: PageState, pfn: GuestFrame) -> Result<(), BalloonError> {
    if s.is_locked() {
        return Err(BalloonError::Busy { pfn });
    }
    if s.is_remapped() || s.kind() == PageKind::Shared {
        return Err(BalloonError::Shared { pfn });
    }
    if s.kind() == PageKind::Ballooned {
        return Err(BalloonError::AlreadyBallooned { pfn });
    }
    if !s.is_unflagged() {
        return Err(BalloonError::Busy { pfn });
    }
    Ok(())
}

/// How many of pages `[first, first + count)` of `region` hold memory
/// (`mincore` on the region's mapping: bounded by the run, unlike a
/// `SEEK_HOLE` scan of the shared memfd). The pages map their own frames
/// here (remapped pages are never taken), so residency is the frame's.
/// `None` if the kernel refuses.
pub(super) fn resident_pages(region: &GuestRegion, first: usize, count: usize) -> Option<u64> {
    region
        .resident(first, count)
        .map(|v| v.iter().filter(|&&b| is_resident(b)).count() as u64)
}

/// Makes page `page` ballooned and locked (until `unlock_page`, after its
/// punch): a library write that would take it back waits, then writes into
/// the fresh frame, instead of landing in the frame about to be punched.
/// `Ok(true)` if it was private (may hold memory), `Ok(false)` if it was
/// already released as zero.
pub(super) fn take_page(
    region: &GuestRegion,
    page: usize,
    pfn: GuestFrame,
) -> Result<bool, BalloonError> {
    let t = region.page_states();
    let mut s = t.load(page);
    loop {
        check_inflatable(s, pfn)?;
        match t.try_lock_as(page, s, s.with_kind(PageKind::Ballooned)) {
            Ok(()) => return Ok(s.kind() == PageKind::Private),
            Err(now) => s = now,
        }
    }
}

/// Unlocks a page `take_page` (or the huge-page path) locked, as `kind`.
pub(super) fn unlock_page(region: &GuestRegion, page: usize, kind: PageKind) {
    let t = region.page_states();
    let s = t.load(page);
    if s.kind() == PageKind::Ballooned && s.flags() == Flags::LOCKED {
        let held = s.without_flags(Flags::LOCKED);
        let _ = t.unlock_to(page, held, held.with_kind(kind));
    }
}

/// Moves a ballooned page back to private (a deflate). The page must not
/// be locked: an inflate holds it between its state change and its punch.
pub(super) fn give_back(
    region: &GuestRegion,
    page: usize,
    pfn: GuestFrame,
) -> Result<(), BalloonError> {
    let t = region.page_states();
    let mut s = t.load(page);
    loop {
        if s.kind() != PageKind::Ballooned {
            return Err(BalloonError::NotBallooned { pfn });
        }
        if s.is_locked() {
            return Err(BalloonError::Busy { pfn });
        }
        match t.transition(page, s, s.with_kind(PageKind::Private)) {
            Ok(()) => return Ok(()),
            Err(now) => s = now,
        }
    }
}
