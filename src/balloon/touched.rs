//! Ballooned pages the guest touched behind the balloon's back (a vCPU or
//! a device through the raw mapping, so the kernel gave the page memory
//! again): found by residency and taken back as deflated.

use super::{error::BalloonError, Balloon};
use crate::{
    host::residency::is_resident,
    memory::{GuestRegion, PageKind},
};

impl Balloon {
    /// Takes back the ballooned pages the guest touched behind the
    /// balloon's back — a vCPU or a device read or wrote one through the raw
    /// mapping, so the kernel gave it memory again (zeros, then whatever
    /// was written) — and counts them as deflated. Returns how many. A
    /// ballooned page whose frame holds memory again (`mincore` over the
    /// runs of ballooned pages) was touched. Costs one state load per page
    /// of regions that have any layer's pages, plus one `mincore` per run
    /// of ballooned pages: cheap enough before reporting
    /// [`Balloon::actual`] to the device. On hugetlb (whole huge pages) it
    /// finds nothing. A touched page a library read found first was taken
    /// back and counted then (see [`Balloon::deflated`]); it is not found
    /// again here.
    pub fn reclaim_touched(&self) -> Result<u64, BalloonError> {
        if self.huge_pages > 1 {
            return Ok(0);
        }
        // Under the balloon's lock: an inflate holds it from its state
        // change to its punch, so a page being ballooned is never taken
        // for a touched one.
        let mut inner = self.lock();
        let mut n = 0;
        for r in self.mem.regions() {
            if !r.needs_state_checks() {
                continue; // nothing ballooned in this region
            }
            n += reclaim_region(r);
        }
        inner.deflated += n;
        Ok(n)
    }
}

/// [`Balloon::reclaim_touched`] for one region: the touched pages it took
/// back.
fn reclaim_region(r: &GuestRegion) -> u64 {
    let states = r.page_states();
    let ballooned = |p: usize| {
        let s = states.load(p);
        s.kind() == PageKind::Ballooned && s.is_unflagged()
    };
    let mut n = 0;
    // Runs of ballooned pages; `mincore` says which hold memory
    // again (bounded by the run, unlike a hole scan of the memfd).
    let mut p = 0;
    while p < r.pages() {
        if !ballooned(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < r.pages() && ballooned(p) {
            p += 1;
        }
        let Some(resident) = r.resident(start, p - start) else {
            continue;
        };
        for (k, &v) in resident.iter().enumerate() {
            let page = start + k;
            let s = states.load(page);
            if is_resident(v)
                && s.kind() == PageKind::Ballooned
                && s.is_unflagged()
                && states
                    .transition(page, s, s.with_kind(PageKind::Private))
                    .is_ok()
            {
                n += 1;
            }
        }
    }
    n
}
