//! Applying located entries: inflate (take each page, then one punch per
//! run of consecutive pages of a region) and deflate (give each page back,
//! and count what went below the target as deflate on OOM). Entries arrive
//! screened and located (`batch.rs`); on a hugetlb store each page goes
//! through `huge.rs` instead of being punched alone.

use super::{
    error::{BalloonError, BatchReport, EntryError},
    page::{give_back, resident_pages, take_page, unlock_page},
    Balloon, Inner, Loc,
};
use crate::{
    addr::{GuestFrame, PAGE_SHIFT, PAGE_SIZE},
    dedup::DedupError,
    frames::{FrameError, FrameRange},
    memory::{GuestRegion, PageKind},
};

/// A page taken for the balloon, waiting for its run's punch.
#[derive(Clone, Copy)]
struct Taken {
    /// Index of its entry in the batch.
    index: usize,
    /// Where it lives.
    loc: Loc,
    /// It was private (may hold memory), not already released as zero.
    had_memory: bool,
}

impl Balloon {
    /// Moves the located pages into the balloon and releases their memory.
    pub(super) fn inflate_entries(
        &self,
        inner: &mut Inner,
        entries: &[(usize, Loc)],
        report: &mut BatchReport,
    ) {
        // Pages whose state became Ballooned, to release.
        let mut taken: Vec<Taken> = Vec::with_capacity(entries.len());
        for &(index, l) in entries {
            let region = &self.mem.regions()[l.region];
            let pfn = self.pfn_of(l);
            if let Err(error) = self.check_file(pfn) {
                report.errors.push(EntryError { index, error });
                continue;
            }
            region.enable_state_checks();
            if self.huge_pages > 1 {
                match self.inflate_huge(inner, l, pfn) {
                    Ok(released) => {
                        report.applied += 1;
                        report.released_pages += released;
                    }
                    Err(error) => report.errors.push(EntryError { index, error }),
                }
                continue;
            }
            match self.take_for_inflate(region, l, pfn) {
                Ok(had_memory) => taken.push(Taken {
                    index,
                    loc: l,
                    had_memory,
                }),
                Err(error) => report.errors.push(EntryError { index, error }),
            }
        }
        // One punch per run of consecutive pages of one region.
        let mut k = 0;
        while k < taken.len() {
            let mut e = k + 1;
            while e < taken.len()
                && taken[e].loc.region == taken[k].loc.region
                && taken[e].loc.page == taken[e - 1].loc.page + 1
            {
                e += 1;
            }
            self.release_run(&taken[k..e], report);
            k = e;
        }
    }

    /// Takes page `l` for the balloon (see `take_page`); a page dedup
    /// merged has its sharing broken through the host first, when the
    /// balloon has one.
    fn take_for_inflate(
        &self,
        region: &GuestRegion,
        l: Loc,
        pfn: GuestFrame,
    ) -> Result<bool, BalloonError> {
        let took = take_page(region, l.page, pfn);
        let shared = matches!(took, Err(BalloonError::Shared { .. }));
        let Some((host, vm)) = self.dedup.as_ref().filter(|_| shared) else {
            return took;
        };
        // Break the sharing through the host, then take the page as a
        // private one.
        match host.resolve_write_fault(*vm, pfn.addr()) {
            Ok(_) => take_page(region, l.page, pfn),
            Err(DedupError::Busy(_)) => Err(BalloonError::Busy { pfn }),
            // What ran out is said, not hidden behind "busy".
            Err(source) => Err(BalloonError::Unmerge { pfn, source }),
        }
    }

    /// Releases a run of consecutive taken pages of one region with one
    /// punch, and settles their states: ballooned after the punch, private
    /// again (an error entry each) if it failed.
    fn release_run(&self, run: &[Taken], report: &mut BatchReport) {
        let l = run[0].loc;
        let region = &self.mem.regions()[l.region];
        let count = run.len();
        let range = FrameRange {
            start: region.own_frame(l.page),
            count: count as u64,
        };
        // What the punch really frees: the pages of the run that hold
        // memory (a page never written is a hole already); by page
        // state if the kernel cannot tell.
        let backed = resident_pages(region, l.page, count)
            .unwrap_or_else(|| run.iter().filter(|t| t.had_memory).count() as u64);
        let released = self.mem.frame_store().release(range);
        // The pages changed (now zeros, or back to private after a failed
        // punch): marked after the punch, as every write marks after its
        // bytes are stored, so a harvest that took the mark copies the
        // zeros (marked before, a harvest in between copied the old bytes
        // and nothing marked the zeros; found by review).
        region
            .dirty_log()
            .note_write((l.page as u64) << PAGE_SHIFT, (count * PAGE_SIZE) as u64);
        match released {
            Ok(()) => {
                for t in run {
                    unlock_page(region, t.loc.page, PageKind::Ballooned);
                }
                report.applied += count as u64;
                report.released_pages += backed;
            }
            Err(source) => {
                // Give the pages back as they were: the memory is still
                // there, so they must not claim to read zeros.
                for t in run {
                    unlock_page(region, t.loc.page, PageKind::Private);
                    report.errors.push(EntryError {
                        index: t.index,
                        error: BalloonError::Release {
                            pfn: self.pfn_of(t.loc),
                            source: FrameError::Os {
                                op: "fallocate(PUNCH_HOLE)",
                                source: std::io::Error::other(source.to_string()),
                            },
                        },
                    });
                }
            }
        }
    }

    /// Takes the located pages out of the balloon; a deflate that takes
    /// [`actual`](Self::actual) below the target counts as deflate on OOM
    /// and calls the OOM hook.
    pub(super) fn deflate_entries(
        &self,
        inner: &mut Inner,
        entries: &[(usize, Loc)],
        report: &mut BatchReport,
    ) {
        let before = self.mem.census().ballooned + inner.pending_pages;
        let mut done = 0u64;
        for &(index, l) in entries {
            let region = &self.mem.regions()[l.region];
            let pfn = self.pfn_of(l);
            let result = if self.huge_pages > 1 && self.deflate_pending(inner, l) {
                Ok(())
            } else {
                give_back(region, l.page, pfn)
            };
            match result {
                Ok(()) => {
                    done += 1;
                    report.applied += 1;
                }
                Err(error) => report.errors.push(EntryError { index, error }),
            }
        }
        inner.deflated += done;
        let target = self.target();
        let after = before.saturating_sub(done);
        // Deflated below the target: the guest did it on its own (OOM).
        let oom = target.saturating_sub(after).min(done);
        if oom > 0 {
            inner.oom_deflated += oom;
            if let Some(hook) = &inner.oom_hook {
                hook(oom);
            }
        }
    }
}
