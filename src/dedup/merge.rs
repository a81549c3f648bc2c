//! The merge and unmerge protocols on runs of consecutive pages of one region.
//!
//! Merge (DESIGN.md "Merge and COW"): lock the pages' state words, arm
//! userfaultfd write protection on their host pages (a raw writer or a vCPU
//! now waits in the kernel), compare each page byte for byte with its target
//! (a shared frame's content, or zeros), remap the equal ones in one
//! `mmap(MAP_FIXED)` per run as a *private* copy-on-write view of the shared
//! frames (or anonymous zeros), disarm and wake, then punch their own frames
//! and publish the new states (on a second thread, overlapping the next
//! window).
//! A writer that waited retries against the new mapping, where the kernel
//! copies the page before its write lands. Once a page may map a shared
//! frame, the frame is never mapped writable anywhere (its only writable
//! mapping, the pass's fill, is made read-only first), so no write can ever
//! reach it.
//!
//! Unmerge is the mirror: lock, protect, copy each page's current bytes into
//! its own frame, remap the run onto its own frames (shared, writable), wake.

use std::os::fd::AsRawFd;

use rayon::prelude::*;

use super::{error::DedupError, locks::lock};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    frames::{FrameError, FrameRange, FrameStore, HostMapping, MapBudget, RemapTarget},
    memory::{GuestRegion, PageKind, PageState},
    userfault::Userfault,
};

use super::remote::{remote_of, RemoteRegion, RemoteRun, RemoteTarget};
pub(super) use super::steps::Target;
use super::steps::{self, RemappedClaim};

/// Pages under one write-protect window (8 MiB): long enough to amortise
/// registration over many short runs, short enough that a writer caught in
/// it waits only for a few hundred page comparisons and remaps.
const MAX_WINDOW: usize = 2048;
/// Mappings the budget must have left for the merge to make its second
/// thread (with the headroom, or at the kernel's limit with none).
const SPAWN_MARGIN: u64 = 64;
/// Longest run unmerged under one write-protect window (2 MiB).
const MAX_RUN: usize = 512;

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

/// Merges each region's candidates (`cands[span]`, sorted by page,
/// distinct pages), a window of nearby runs at a time. Shared frame
/// references are taken as pages are published.
///
/// Two stages overlap: this thread locks, protects, compares, remaps and
/// wakes a window, then hands it to a second thread that punches the merged
/// pages' own frames and publishes their states, while this one goes on to
/// the next window (the punch is kernel work of about the remap's size).
pub(super) fn merge_regions(
    ctx: &MergeCtx<'_>,
    regions: &[(&GuestRegion, std::ops::Range<usize>)],
    cands: &[Candidate],
) -> Result<MergeOutcome, DedupError> {
    let mut out = MergeOutcome::default();
    // One window has nothing to overlap with; and with the mapping budget
    // nearly spent no thread is made: near the kernel's limit a thread that
    // cannot map its signal stack aborts the process from inside (found by
    // review; the budget is what is left above the headroom, so the
    // headroom stays for the rest of the process).
    let single = regions.len() < 2 && cands.len() <= MAX_WINDOW;
    if single || ctx.map_budget.left() < SPAWN_MARGIN {
        let mut first_err = None;
        arm_windows(ctx, regions, cands, &mut out, |done, out| {
            if let Err(e) = finish_window(ctx, done, out) {
                first_err.get_or_insert(e);
            }
        })?;
        return first_err.map_or(Ok(out), Err);
    }
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Remapped<'_>>(8);
        // A thread that cannot be made (its stack is a mapping, and the
        // process may be out of them) is no error: the windows are then
        // finished on this thread, without the overlap. `scope.spawn`
        // would abort the process instead (found from outside).
        let finisher = std::thread::Builder::new()
            .name("pagefold-merge".into())
            .spawn_scoped(scope, move || {
                let mut out = MergeOutcome::default();
                let mut first_err = None;
                for done in rx {
                    if let Err(e) = finish_window(ctx, done, &mut out) {
                        first_err.get_or_insert(e);
                    }
                }
                (out, first_err)
            });
        let Ok(finisher) = finisher else {
            let mut first_err = None;
            arm_windows(ctx, regions, cands, &mut out, |done, out| {
                if let Err(e) = finish_window(ctx, done, out) {
                    first_err.get_or_insert(e);
                }
            })?;
            return first_err.map_or(Ok(out), Err);
        };
        let armed = arm_windows(ctx, regions, cands, &mut out, |done, _| {
            // The receiver lives until the sender is dropped below; should it
            // have panicked, the windows it took stay locked, and the panic
            // is raised by the join.
            let _ = tx.send(done);
        });
        drop(tx);
        let (finished, first_err) = match finisher.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        out.add(&finished);
        armed?;
        first_err.map_or(Ok(out), Err)
    })
}

/// Runs the first stage over every window of every region, handing each
/// window that got as far as its remap (or a failed one) to `finish`.
fn arm_windows<'r>(
    ctx: &MergeCtx<'_>,
    regions: &[(&'r GuestRegion, std::ops::Range<usize>)],
    cands: &[Candidate],
    out: &mut MergeOutcome,
    mut finish: impl FnMut(Remapped<'r>, &mut MergeOutcome),
) -> Result<(), DedupError> {
    for (region, span) in regions {
        let cands = &cands[span.clone()];
        region.enable_state_checks();
        // Where the last remap of this region ended, and what page would
        // continue it there.
        let mut last_remap: Option<(usize, Target)> = None;
        let mut i = 0;
        while i < cands.len() {
            if ctx.map_budget.left() < 2 {
                out.map_limit += cands[i..].len() as u64;
                break;
            }
            let first = cands[i].page;
            let mut j = i + 1;
            while j < cands.len() && cands[j].page < first + MAX_WINDOW {
                j += 1;
            }
            if let Some(done) = merge_window(ctx, region, &cands[i..j], &mut last_remap, out)? {
                let failed = done.remap_error.is_some();
                finish(done, out);
                if failed {
                    // Reported by the finishing stage.
                    return Ok(());
                }
            }
            i = j;
        }
    }
    Ok(())
}

impl MergeOutcome {
    fn add(&mut self, o: &MergeOutcome) {
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
    region: &'r GuestRegion,
    run: Vec<Candidate>,
    equal: Vec<bool>,
    merged: Vec<bool>,
    remap_error: Option<FrameError>,
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

/// One window: candidates within `MAX_WINDOW` pages of each other, protected
/// together so that registration and protection cost one call each for many
/// runs; each run is still remapped on its own. The steps: lock, protect,
/// compare, remap, disarm; the window then goes to [`finish_window`].
fn merge_window<'r>(
    ctx: &MergeCtx<'_>,
    region: &'r GuestRegion,
    window: &[Candidate],
    last_remap: &mut Option<(usize, Target)>,
    out: &mut MergeOutcome,
) -> Result<Option<Remapped<'r>>, DedupError> {
    let states = region.page_states();
    let remote = remote_of(ctx.remotes, region);
    // Under another process, only pages in their own frame are candidates:
    // a merged page may have been copied there, where only it can see.
    let eligible = |c: &&Candidate| remote.is_none() || !c.expected.is_remapped();
    if remote.is_some_and(|r| !r.mapper.usable()) {
        out.busy += window.len() as u64;
        return Ok(None);
    }
    // 1. Lock. A page whose state moved since it was hashed is left alone.
    let run: Vec<Candidate> = window
        .iter()
        .filter(eligible)
        .filter(|c| steps::claim_candidate(states, c.page, c.expected))
        .copied()
        .collect();
    out.busy += (window.len() - run.len()) as u64;
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Ok(None);
    };
    let addr = region.page_host_addr(first.page);
    let len = ((last.page - first.page + 1) * PAGE_SIZE) as u64;
    let unlock_all = |run: &[Candidate]| {
        for c in run {
            steps::release_candidate(states, c.page, c.expected);
        }
    };

    // The region's protection lock is held for the life of the window:
    // registration belongs to the one userfaultfd, not to a caller, so an
    // unmerge's unregister inside this window (or the reverse) would drop
    // the other's protection between its comparison or copy and its remap,
    // and lose a write.
    let window = region.lock_protection();
    let pages = last.page - first.page + 1;
    // 2. Arm write protection over the window: from here, raw writes to it
    // wait in the kernel (pages in the window that are not candidates too,
    // briefly; they are woken with the rest), in the other process too.
    if let Err(e) = protect(ctx, addr, len) {
        release_protection(ctx, addr, len);
        unlock_all(&run);
        return Err(e);
    }
    if let Some(r) = remote {
        if r.mapper.protect(r.index, first.page, pages).is_err() {
            // A process that cannot be protected takes no merge; the other
            // VMs go on.
            r.mapper
                .release(r.index, &[(first.page, pages)], (first.page, pages));
            release_protection(ctx, addr, len);
            unlock_all(&run);
            out.busy += run.len() as u64;
            return Ok(None);
        }
    }
    // 3. Compare under protection, each page against its target's bytes.
    let equal = match compare_window(ctx, region, &run) {
        Ok(equal) => equal,
        Err(e) => {
            release_all(ctx, remote, addr, len, (first.page, pages), None);
            unlock_all(&run);
            return Err(e);
        }
    };
    // 4. Remap each maximal equal sub-run of a run in one call, here, then
    // in the other process; what it does not take goes back here.
    let (mut merged, mut remap_error) = remap_equal(ctx, region, &run, &equal, last_remap, out);
    if let Some(r) = remote {
        if remap_remote(r, &run, &merged).is_err() {
            out.busy += merged.iter().filter(|m| **m).count() as u64;
            if let Err(e) = revert_local(region, &run, &mut merged) {
                // This view now maps shared frames where the other process
                // maps its own: it no longer shows that VM's bytes, so the
                // VM takes no more merges (a merge compares in this view).
                // Nothing is punched or published for the window.
                r.mapper.quarantine();
                merged.iter_mut().for_each(|m| *m = false);
                remap_error.get_or_insert(e);
            }
            *last_remap = None;
        }
    }

    // 5. Disarm and wake: waiting writers retry against the new mapping.
    // Unregistering drops the protection of the pages left in place; the
    // remapped ones have fresh, unprotected mappings.
    release_all(
        ctx,
        remote,
        addr,
        len,
        (first.page, pages),
        Some((&run, &merged)),
    );
    drop(window);
    Ok(Some(Remapped {
        region,
        run,
        equal,
        merged,
        remap_error,
    }))
}

/// Releases a window's protection here and in the other process, where
/// the pages `remapped` says it remapped have fresh, unprotected mappings
/// and the rest are unprotected.
fn release_all(
    ctx: &MergeCtx<'_>,
    remote: Option<RemoteRegion<'_>>,
    addr: crate::addr::HostVirtAddr,
    len: u64,
    window: (usize, usize),
    remapped: Option<(&[Candidate], &[bool])>,
) {
    release_protection(ctx, addr, len);
    let Some(r) = remote else {
        return;
    };
    let (first, pages) = window;
    let mut keep: Vec<(usize, usize)> = Vec::new();
    let mut from = first;
    if let Some((run, merged)) = remapped {
        for (c, _) in run.iter().zip(merged).filter(|(_, m)| **m) {
            if c.page > from {
                keep.push((from, c.page - from));
            }
            from = c.page + 1;
        }
    }
    if first + pages > from {
        keep.push((from, first + pages - from));
    }
    r.mapper.release(r.index, &keep, window);
}

/// Asks the other process to remap the pages `merged` says this one did,
/// a message per window with a run per stretch of one target.
fn remap_remote(
    r: RemoteRegion<'_>,
    run: &[Candidate],
    merged: &[bool],
) -> Result<(), super::remote::RemoteError> {
    let mut runs: Vec<RemoteRun> = Vec::new();
    let items: Vec<(&Candidate, &bool)> = run.iter().zip(merged).collect();
    for_each_run(
        &items,
        |a, b| *a.1 && *b.1 && continues_run(a.0, b.0),
        |k, e| {
            if *items[k].1 {
                runs.push(RemoteRun {
                    first_page: run[k].page as u64,
                    pages: (e - k) as u64,
                    target: match run[k].target {
                        Target::Zero => RemoteTarget::Zero,
                        Target::Shared(s) => RemoteTarget::Shared {
                            file_offset: s.file_offset(),
                        },
                    },
                });
            }
        },
    );
    if runs.is_empty() {
        return Ok(());
    }
    r.mapper.remap(r.index, &runs)
}

/// Maps the pages this process remapped but the other did not back onto
/// their own frames (not yet punched, and equal to what they held), so
/// both processes map the same frames again.
fn revert_local(
    region: &GuestRegion,
    run: &[Candidate],
    merged: &mut [bool],
) -> Result<(), FrameError> {
    let mut result = Ok(());
    let idx: Vec<usize> = (0..run.len()).filter(|&k| merged[k]).collect();
    for_each_run(
        &idx,
        |a, b| run[*b].page == run[*a].page + 1,
        |k, e| {
            let first = run[idx[k]].page;
            let own = RemapTarget::OwnShared {
                file_offset: region.own_frame(first).file_offset(),
            };
            match region.remap_pages(first, e - k, own) {
                Ok(()) => idx[k..e].iter().for_each(|&i| merged[i] = false),
                Err(err) => {
                    if result.is_ok() {
                        result = Err(err);
                    }
                }
            }
        },
    );
    result
}

/// Registers and write-protects `[addr, addr + len)`.
fn protect(
    ctx: &MergeCtx<'_>,
    addr: crate::addr::HostVirtAddr,
    len: u64,
) -> Result<(), DedupError> {
    ctx.uffd
        .register(addr, len)
        .and_then(|()| ctx.uffd.protect(addr, len))
        .map_err(Into::into)
}

/// The window's comparison, under protection: whether each page of `run`
/// equals its target's bytes. Shared frames are compared in the fresh view
/// in place, or read a run per `pread`; both cores compare.
fn compare_window(
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
fn fresh_page<'a>(ctx: &MergeCtx<'a>, c: &Candidate) -> Option<&'a [u8; PAGE_SIZE]> {
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
fn read_older_targets(
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

/// Remaps each maximal equal sub-run of a run of `run` onto its targets in
/// one call: which pages were merged, and the first error that stopped the
/// remaps (a spent mapping budget only skips).
fn remap_equal(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    run: &[Candidate],
    equal: &[bool],
    last_remap: &mut Option<(usize, Target)>,
    out: &mut MergeOutcome,
) -> (Vec<bool>, Option<FrameError>) {
    let mut merged = vec![false; run.len()];
    let mut remap_error = None;
    for_each_run(
        &run.iter().zip(equal).collect::<Vec<_>>(),
        |a, b| *a.1 && *b.1 && continues_run(a.0, b.0),
        |k, e| {
            if !equal[k] || remap_error.is_some() {
                return;
            }
            // A run that continues the last remap (the page after it, the
            // frame after it: a run the window's edge cut) joins its
            // mapping, so it costs none (found by review: the plan costs a
            // run once, and a long run was charged once per window).
            let continues = *last_remap == Some((run[k].page, run[k].target));
            if !continues && !ctx.map_budget.try_spend(2) {
                out.map_limit += (e - k) as u64;
                return;
            }
            let target = match run[k].target {
                Target::Zero => RemapTarget::AnonZero,
                Target::Shared(s) => RemapTarget::PrivateCopyOf {
                    fd: ctx.store.as_raw_fd(),
                    file_offset: s.file_offset(),
                },
            };
            match region.remap_pages(run[k].page, e - k, target) {
                Ok(()) => {
                    out.remaps += 1;
                    merged[k..e].iter_mut().for_each(|m| *m = true);
                    let next = match run[e - 1].target {
                        Target::Zero => Target::Zero,
                        Target::Shared(f) => Target::Shared(FrameNumber(f.0 + 1)),
                    };
                    *last_remap = Some((run[e - 1].page + 1, next));
                }
                Err(FrameError::MapLimit { .. }) => {
                    // The kernel's mappings are spent (the budget says so
                    // now): stop merging, never fail a guest write for it.
                    out.map_limit += (e - k) as u64;
                }
                Err(err) => remap_error = Some(err),
            }
        },
    );
    (merged, remap_error)
}

/// The second stage of a window: punch, then publish.
fn finish_window(
    ctx: &MergeCtx<'_>,
    done: Remapped<'_>,
    out: &mut MergeOutcome,
) -> Result<(), DedupError> {
    let Remapped {
        region,
        run,
        equal,
        merged,
        remap_error,
    } = done;
    let states = region.page_states();
    // 6. Release the own frames of the merged pages, a call per stretch of
    // consecutive pages (runs of different targets join up here). Nothing
    // maps them any more, and the pages stay locked until they are
    // published, so no unmerge can write a page's bytes back into its own
    // frame before this punch.
    let punched = punch_own_frames(region.store(), region, &run, &merged);

    // 7. Publish the new states (this also unlocks), taking each shared
    // frame's reference under its table's lock: an unmerge of a page just
    // published then finds the count it expects.
    let mut shared = lock(ctx.shared);
    for (idx, c) in run.iter().enumerate() {
        let now = merged[idx].then(|| {
            match c.target {
                Target::Zero => out.zero += 1,
                Target::Shared(s) => {
                    out.shared += 1;
                    shared.add_ref(s, 1);
                }
            }
            steps::merged_state(c.target, region.own_frame(c.page))
        });
        if now.is_none() && !equal[idx] {
            out.changed += 1;
        }
        let _ = steps::publish_merge(states, c.page, c.expected, now);
    }
    if let Some(err) = remap_error {
        return Err(err.into());
    }
    punched
}

/// Releases the memory of the own frames of merged pages that used them
/// (pages remapped before hold their bytes elsewhere, already released).
fn punch_own_frames(
    store: &FrameStore,
    region: &GuestRegion,
    run: &[Candidate],
    merged: &[bool],
) -> Result<(), DedupError> {
    let own = |k: usize| merged[k] && !run[k].expected.is_remapped();
    let idx: Vec<usize> = (0..run.len()).filter(|&k| own(k)).collect();
    let mut result = Ok(());
    for_each_run(
        &idx,
        |a, b| run[*b].page == run[*a].page + 1,
        |k, e| {
            if result.is_ok() {
                result = store.release(FrameRange {
                    start: region.own_frame(run[idx[k]].page),
                    count: (e - k) as u64,
                });
            }
        },
    );
    result.map_err(Into::into)
}

/// Removes write protection and registration from a range and wakes anyone
/// waiting there (unregistering alone does not wake write-protect waiters).
/// Errors are ignored on purpose: parts of the range may have been
/// remapped (fresh, unregistered mappings), and the handler thread wakes
/// any writer that a failed call would have left waiting.
fn release_protection(ctx: &MergeCtx<'_>, addr: crate::addr::HostVirtAddr, len: u64) {
    let _ = ctx.uffd.unregister(addr, len);
    let _ = ctx.uffd.wake(addr, len);
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

/// Brings every remapped page of `region` in `[first, first+count)` back to
/// its own frame, with its current bytes. Shared-frame references are not
/// touched here: the host recounts them from the page states.
///
/// Each run is cut out of its merged stretch where the mapping budget can
/// pay for the split; where it cannot, the part of the stretch from the
/// page to one end goes back (the side that costs no mapping, then the
/// shorter), which joins mappings instead of splitting them; the rest stays
/// merged
/// (found from outside: a guest ballooning scattered pages made one unmerge
/// per page, two mappings each, until the process had none left and the
/// next thread spawn aborted it). That costs memory, never more than the
/// guest's own pages took before they were merged.
pub(super) fn unmerge_range(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    first: usize,
    count: usize,
) -> Result<UnmergeOutcome, DedupError> {
    let states = region.page_states();
    let mut out = UnmergeOutcome::default();
    let end = (first + count).min(region.pages());
    let mut p = first;
    while p < end {
        if !states.load(p).is_remapped() {
            p += 1;
            continue;
        }
        let run = lock_run(region, p, end.min(p + MAX_RUN), &mut out);
        if run.is_empty() {
            p += 1;
            continue;
        }
        let cost = region.own_remap_cost(p, run.len());
        if cost <= 0 || ctx.map_budget.try_spend(cost.unsigned_abs()) {
            let q = p + run.len();
            unmerge_locked(ctx, region, &run, first, &mut out)?;
            if cost < 0 {
                ctx.map_budget.give_back(cost.unsigned_abs());
            }
            p = q;
        } else {
            unlock_run(region, &run);
            unmerge_stretch(ctx, region, p, first, &mut out)?;
            p += 1;
        }
    }
    Ok(out)
}

/// Locks the remapped, unlocked pages from `p` on (up to `limit`), stopping
/// at the first that is not; a page another operation holds counts as busy.
fn lock_run(
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

fn unlock_run(region: &GuestRegion, run: &[(usize, PageState)]) {
    let states = region.page_states();
    for &(p, s) in run {
        steps::release_remapped(states, p, s);
    }
}

/// Unmerges, around `page`, the part of its merged stretch that reaches
/// the nearer end beside a page in its own frame: a piece of at most
/// `MAX_RUN` pages at a time from that end inward, so each piece joins the
/// mapping beside it instead of splitting the stretch (one mapping more
/// only for a stretch that fills its region). The rest of the stretch stays
/// merged. `watch` is the page whose unmerge the caller counts.
fn unmerge_stretch(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    page: usize,
    watch: usize,
    out: &mut UnmergeOutcome,
) -> Result<(), DedupError> {
    let states = region.page_states();
    let remapped = |p: usize| states.load(p).is_remapped_unlocked();
    let mut lo = page;
    while lo > 0 && remapped(lo - 1) {
        lo -= 1;
    }
    let mut hi = page + 1;
    while hi < region.pages() && remapped(hi) {
        hi += 1;
    }
    // Towards the start, `[lo, page]` from `lo` up; towards the end,
    // `[page, hi)` from `hi` down. A side whose end is the region's edge
    // costs one mapping; otherwise none. The cheaper, then shorter, side.
    let left = (u8::from(lo == 0), page + 1 - lo);
    let right = (u8::from(hi == region.pages()), hi - page);
    let pieces: Vec<(usize, usize)> = if left <= right {
        (lo..=page)
            .step_by(MAX_RUN)
            .map(|s| (s, (s + MAX_RUN).min(page + 1)))
            .collect()
    } else {
        let mut v = Vec::new();
        let mut end = hi;
        while end > page {
            let start = end.saturating_sub(MAX_RUN).max(page);
            v.push((start, end));
            end = start;
        }
        v
    };
    for (start, end) in pieces {
        let run = lock_run(region, start, end, out);
        if run.is_empty() {
            continue;
        }
        let cost = region.own_remap_cost(start, run.len());
        if cost > 0 {
            // Made whatever the budget says: this is how the stretch
            // gives mappings back.
            ctx.map_budget.spend(cost.unsigned_abs());
        }
        unmerge_locked(ctx, region, &run, watch, out)?;
        if cost < 0 {
            ctx.map_budget.give_back(cost.unsigned_abs());
        }
    }
    Ok(())
}

fn unmerge_locked(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    run: &[(usize, PageState)],
    watch: usize,
    out: &mut UnmergeOutcome,
) -> Result<(), DedupError> {
    let states = region.page_states();
    let first = run[0].0;
    let n = run.len();
    let addr = region.page_host_addr(first);
    let len = (n * PAGE_SIZE) as u64;
    let unlock_all = || unlock_run(region, run);
    let remote = remote_of(ctx.remotes, region);
    let window = region.lock_protection();
    if let Err(e) = ctx
        .uffd
        .register(addr, len)
        .and_then(|()| ctx.uffd.protect(addr, len))
    {
        release_protection(ctx, addr, len);
        unlock_all();
        return Err(e.into());
    }
    if let Some(r) = remote {
        if let Err(e) = r.mapper.protect(r.index, first, n) {
            release_all(ctx, remote, addr, len, (first, n), None);
            unlock_all();
            return Err(e.into());
        }
    }
    // Where another process may hold the pages' true bytes (the kernel
    // may have copied them there), it writes them into their own frames,
    // under its protection, and maps them shared again; this view then
    // follows without a copy. Otherwise this view's bytes are the truth.
    let copied_there = remote.is_some_and(|r| r.mapper.holds_truth());
    // Copy each page's bytes (as its mapping shows them, kernel copies
    // included) into its own frame. A page that reads all zeros gets a hole
    // punched instead: no memory, and no trust in what the frame held.
    let mut page = [0u8; PAGE_SIZE];
    for &(p, _) in run.iter().filter(|_| !copied_there) {
        region.read_page(p, &mut page);
        let own = region.own_frame(p);
        let stored = if crate::addr::is_zero_page(&page) {
            region.store().release(FrameRange {
                start: own,
                count: 1,
            })
        } else {
            region.store().write_frames(own, &page)
        };
        if let Err(e) = stored {
            release_protection(ctx, addr, len);
            unlock_all();
            return Err(e.into());
        }
    }
    if let Some(r) = remote {
        if let Err(e) = r.mapper.restore(r.index, &[(first as u64, n as u64)]) {
            release_all(ctx, remote, addr, len, (first, n), None);
            unlock_all();
            return Err(e.into());
        }
    }
    let own = RemapTarget::OwnShared {
        file_offset: region.own_frame(first).file_offset(),
    };
    if let Err(e) = region.remap_pages(first, n, own) {
        if let Some(r) = remote {
            // The other process maps its own frames now, this view does
            // not: see `merge_window`.
            r.mapper.quarantine();
        }
        release_all(ctx, remote, addr, len, (first, n), Some((&[], &[])));
        unlock_all();
        return Err(e.into());
    }
    // The other process restored every page to a fresh mapping.
    release_all(ctx, remote, addr, len, (first, n), Some((&[], &[])));
    drop(window);
    // Publish and drop the shared-frame references under the shared-frame
    // lock, so a recount (which holds it too) sees both or neither.
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
