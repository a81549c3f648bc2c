//! What the merge and unmerge protocols share, in this process or with
//! another: the candidates and what became of them, the context a window
//! runs in, comparing a window's pages with their targets under
//! protection, and holding runs of merged pages for an unmerge.

use rayon::prelude::*;

pub(super) use super::steps::Target;
use super::{
    error::DedupError,
    locks::lock,
    remote::RemoteRegion,
    steps::{self, RemappedClaim},
};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    frames::{FrameError, FrameRange, FrameStore, HostMapping, MapBudget},
    memory::{GuestRegion, PageKind, PageState},
    userfault::Userfault,
};

/// Longest run unmerged under one write-protect window (2 MiB).
pub(super) const MAX_RUN: usize = 512;

/// A page chosen for merging, with the state it had when it was hashed.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate {
    pub(super) page: usize,
    pub(super) expected: PageState,
    pub(super) target: Target,
}

/// Per-call outcome of merging one region's candidates.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MergeOutcome {
    /// Pages now mapping a shared frame.
    pub(super) shared: u64,
    /// Pages released as zero.
    pub(super) zero: u64,
    /// Pages whose bytes changed before the merge (not merged).
    pub(super) changed: u64,
    /// Pages another operation held (not merged).
    pub(super) busy: u64,
    /// Pages not merged because the kernel's mapping budget ran out.
    pub(super) map_limit: u64,
    /// Remap calls made (each may cost the kernel up to two mappings).
    pub(super) remaps: u64,
}

/// What the merge code needs from the host.
pub(super) struct MergeCtx<'a> {
    pub(super) store: &'a FrameStore,
    pub(super) uffd: &'a Userfault,
    /// Mappings (VMAs) the process may still create before dedup stops.
    pub(super) map_budget: &'a MapBudget,
    /// A read-only view of the shared frames made in this pass, to compare
    /// against in place instead of reading them with `pread`.
    pub(super) fresh: &'a [FreshFrames<'a>],
    /// Shared frames and their references.
    pub(super) shared: &'a std::sync::Mutex<super::shared::SharedFrames>,
    /// The regions that another process maps too, and how to reach it.
    pub(super) remotes: &'a [RemoteRegion<'a>],
}

/// Shared frames `start..start+count`, mapped read-only at `view`.
#[derive(Clone, Copy)]
pub(super) struct FreshFrames<'a> {
    pub(super) start: FrameNumber,
    pub(super) view: &'a HostMapping,
}

impl<'a> FreshFrames<'a> {
    /// The bytes of `frame` if it is one of these.
    fn page(self, frame: FrameNumber) -> Option<&'a [u8; PAGE_SIZE]> {
        let k = usize::try_from(frame.0.checked_sub(self.start.0)?).ok()?;
        if (k + 1) * PAGE_SIZE > self.view.len() {
            return None;
        }
        // The page lies inside the live read-only `view` (bounds checked), and
        // shared frames are never mapped writable, so the bytes cannot change.
        // SAFETY: in bounds, outlives the borrow, immutable (above).
        Some(unsafe {
            &*self
                .view
                .as_ptr()
                .add(k * PAGE_SIZE)
                .cast::<[u8; PAGE_SIZE]>()
        })
    }
}

impl MergeOutcome {
    pub(super) fn add(&mut self, o: &MergeOutcome) {
        self.shared += o.shared;
        self.zero += o.zero;
        self.changed += o.changed;
        self.busy += o.busy;
        self.map_limit += o.map_limit;
        self.remaps += o.remaps;
    }
}

/// A window after its remaps, protection released: its pages are still
/// locked, the merged ones' own frames not yet punched.
pub(super) struct Remapped<'r> {
    pub(super) region: &'r GuestRegion,
    pub(super) run: Vec<Candidate>,
    pub(super) equal: Vec<bool>,
    pub(super) merged: Vec<bool>,
    pub(super) remap_error: Option<FrameError>,
}

pub(super) fn continues_run(a: &Candidate, b: &Candidate) -> bool {
    b.page == a.page + 1
        && match (a.target, b.target) {
            (Target::Zero, Target::Zero) => true,
            (Target::Shared(x), Target::Shared(y)) => y.0 == x.0 + 1,
            _ => false,
        }
}

/// Calls `f(start, end)` for each maximal run `items[start..end]` in which
/// `same(items[k-1], items[k])` holds throughout.
pub(super) fn for_each_run<T>(
    items: &[T],
    same: impl Fn(&T, &T) -> bool,
    mut f: impl FnMut(usize, usize),
) {
    let mut k = 0;
    while k < items.len() {
        let mut e = k + 1;
        while e < items.len() && same(&items[e - 1], &items[e]) {
            e += 1;
        }
        f(k, e);
        k = e;
    }
}

/// The window's comparison, under protection: whether each page of `run`
/// equals its target's bytes. Shared frames are compared in the fresh view
/// in place, or read a run per `pread`; both cores compare.
pub(super) fn compare_window(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    run: &[Candidate],
) -> Result<Vec<bool>, DedupError> {
    let (slot, target_bytes) = read_older_targets(ctx, run)?;
    // A shared target with no source of bytes (impossible by the above)
    // compares unequal: never merge against bytes nobody read.
    Ok(run
        .par_iter()
        .zip(slot.par_iter())
        .map(|(c, at)| match (c.target, at) {
            (Target::Zero, _) => region.page_is_zero(c.page),
            (Target::Shared(_), Some(at)) => {
                <&[u8; PAGE_SIZE]>::try_from(&target_bytes[*at..*at + PAGE_SIZE])
                    .is_ok_and(|want| region.page_equals(c.page, want))
            }
            (Target::Shared(_), None) => {
                fresh_page(ctx, c).is_some_and(|want| region.page_equals(c.page, want))
            }
        })
        .collect())
}

/// The bytes of `c`'s target in the fresh view, if it is there.
pub(super) fn fresh_page<'a>(ctx: &MergeCtx<'a>, c: &Candidate) -> Option<&'a [u8; PAGE_SIZE]> {
    match c.target {
        Target::Shared(s) => ctx.fresh.iter().find_map(|f| f.page(s)),
        Target::Zero => None,
    }
}

/// Reads the targets of `run`'s pages that are older shared frames (not in
/// the fresh view) with one `pread` per run: `slot[i]` is page `i`'s offset
/// in the returned buffer. A run is read whole only where none of its
/// frames is in the view: a run may straddle the view's edge (an older
/// frame can sit right after the fresh ones), and a page compared against a
/// buffer nobody filled would compare against zeros.
pub(super) fn read_older_targets(
    ctx: &MergeCtx<'_>,
    run: &[Candidate],
) -> Result<(Vec<Option<usize>>, Vec<u8>), DedupError> {
    let same_source = |a: &Candidate, b: &Candidate| {
        continues_run(a, b) && fresh_page(ctx, a).is_some() == fresh_page(ctx, b).is_some()
    };
    let mut slot: Vec<Option<usize>> = vec![None; run.len()];
    let mut reads: Vec<(usize, usize)> = Vec::new();
    let mut pages = 0;
    for_each_run(run, same_source, |k, e| {
        if let (Target::Shared(_), None) = (run[k].target, fresh_page(ctx, &run[k])) {
            for (n, s) in slot[k..e].iter_mut().enumerate() {
                *s = Some((pages + n) * PAGE_SIZE);
            }
            reads.push((k, e));
            pages += e - k;
        }
    });
    let mut target_bytes = vec![0u8; pages * PAGE_SIZE];
    for &(k, e) in &reads {
        let (Target::Shared(s), Some(at)) = (run[k].target, slot[k]) else {
            continue;
        };
        ctx.store
            .read_frames(s, &mut target_bytes[at..at + (e - k) * PAGE_SIZE])?;
    }
    Ok((slot, target_bytes))
}

/// Outcome of unmerging pages.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UnmergeOutcome {
    /// Pages now private in their own frame again.
    pub(super) restored: u64,
    /// Pages another operation held.
    pub(super) busy: u64,
    /// Whether this call brought back the range's first page itself (not
    /// a caller racing it): what a COW fault resolved for one page counts.
    pub(super) first_restored: bool,
}

/// Locks the remapped, unlocked pages from `p` on (up to `limit`), stopping
/// at the first that is not; a page another operation holds counts as busy.
pub(super) fn lock_run(
    region: &GuestRegion,
    p: usize,
    limit: usize,
    out: &mut UnmergeOutcome,
) -> Vec<(usize, PageState)> {
    let states = region.page_states();
    let mut run: Vec<(usize, PageState)> = Vec::new();
    for q in p..limit {
        match steps::claim_remapped(states, q) {
            RemappedClaim::Held(s) => run.push((q, s)),
            RemappedClaim::Skip => break,
            RemappedClaim::Busy => {
                out.busy += 1;
                break;
            }
        }
    }
    if run.is_empty() && states.load(p).is_locked() {
        out.busy += 1;
    }
    run
}

pub(super) fn unlock_run(region: &GuestRegion, run: &[(usize, PageState)]) {
    let states = region.page_states();
    for &(p, s) in run {
        steps::release_remapped(states, p, s);
    }
}

/// Writes `bytes` into page `p`'s own frame, or punches it if they are all
/// zeros (no memory, and no trust in what the frame held).
pub(super) fn store_own(
    region: &GuestRegion,
    p: usize,
    bytes: &[u8; PAGE_SIZE],
) -> Result<(), FrameError> {
    let own = region.own_frame(p);
    if crate::addr::is_zero_page(bytes) {
        region.store().release(FrameRange {
            start: own,
            count: 1,
        })
    } else {
        region.store().write_frames(own, bytes)
    }
}

/// An unmerge's last step: publishes the run's pages as private in their
/// own frames and drops their shared-frame references, under the
/// shared-frame lock, so a recount (which holds it too) sees both or
/// neither.
pub(super) fn publish_unmerged(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    run: &[(usize, PageState)],
    watch: usize,
    out: &mut UnmergeOutcome,
) -> Result<(), DedupError> {
    let states = region.page_states();
    let mut shared = lock(ctx.shared);
    let mut result = Ok(());
    for &(p, s) in run {
        let published = steps::publish_unmerge(states, p, s, region.own_frame(p));
        if published && p == watch {
            out.first_restored = true;
        }
        if published && s.kind() == PageKind::Shared {
            if let Err(e) = shared.drop_ref(ctx.store, s.frame()) {
                result = Err(e.into());
            }
        }
        out.restored += 1;
    }
    result
}

/// Walks the pages `[first, first + count)` of `region` for an unmerge:
/// each stretch of remapped pages is held (a run of at most [`MAX_RUN`])
/// and handed to `unmerge(page, run, out)`, which lets it go and says how
/// many pages on the walk resumes.
pub(super) fn for_each_held_run(
    region: &GuestRegion,
    first: usize,
    count: usize,
    out: &mut UnmergeOutcome,
    mut unmerge: impl FnMut(
        usize,
        Vec<(usize, PageState)>,
        &mut UnmergeOutcome,
    ) -> Result<usize, DedupError>,
) -> Result<(), DedupError> {
    let states = region.page_states();
    let end = (first + count).min(region.pages());
    let mut p = first;
    while p < end {
        if !states.load(p).is_remapped() {
            p += 1;
            continue;
        }
        let run = lock_run(region, p, end.min(p + MAX_RUN), out);
        if run.is_empty() {
            p += 1;
            continue;
        }
        p += unmerge(p, run, out)?;
    }
    Ok(())
}
