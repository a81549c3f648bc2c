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

use super::window::{
    compare_window, for_each_held_run, lock_run, publish_unmerged, store_own, unlock_run, Remapped,
    MAX_RUN,
};
pub(super) use super::window::{
    continues_run, for_each_run, Candidate, FreshFrames, MergeCtx, MergeOutcome, Target,
    UnmergeOutcome,
};
use super::{error::DedupError, locks::lock, merge_remote, remote::remote_of, steps};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    frames::{FrameError, FrameRange, FrameStore, RemapTarget},
    memory::{GuestRegion, PageState},
};

/// Pages under one write-protect window (8 MiB): long enough to amortise
/// registration over many short runs, short enough that a writer caught in
/// it waits only for a few hundred page comparisons and remaps.
pub(super) const MAX_WINDOW: usize = 2048;
/// Mappings the budget must have left for the merge to make its second
/// thread (with the headroom, or at the kernel's limit with none).
const SPAWN_MARGIN: u64 = 64;

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
    if ctx.remotes.is_empty() {
        return merge_here(ctx, regions, cands);
    }
    // Regions other processes map go VM by VM on threads of their own: a
    // window there waits for its processes' acknowledgements, while the
    // windows of other VMs compare and their processes remap (each under
    // its own mmap lock), and their punches (each VM's own memfd) run side
    // by side.
    let mut local = Vec::new();
    let mut groups: Vec<(*const (), Vec<Span<'_>>)> = Vec::new();
    for &(region, ref span) in regions {
        match remote_of(ctx.remotes, region) {
            None => local.push((region, span.clone())),
            Some(r) => {
                let key = std::ptr::from_ref(r.mapper).cast::<()>();
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, g)) => g.push((region, span.clone())),
                    None => groups.push((key, vec![(region, span.clone())])),
                }
            }
        }
    }
    let groups: Vec<Vec<Span<'_>>> = groups.into_iter().map(|(_, g)| g).collect();
    let mut out = MergeOutcome::default();
    let mut first_err = None;
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        let mut inline = Vec::new();
        let threads = groups.len().min(REMOTE_THREADS);
        for t in 0..threads {
            let mine: Vec<&Vec<Span<'_>>> = groups.iter().skip(t).step_by(threads).collect();
            // A thread that cannot be made (the process may be out of
            // mappings for its stack) leaves its VMs to this one.
            let spawned = std::thread::Builder::new()
                .name("pagefold-merge-vm".into())
                .spawn_scoped(scope, {
                    let mine = mine.clone();
                    move || {
                        let mut out = MergeOutcome::default();
                        let mut first_err = None;
                        for g in mine {
                            if let Err(e) = merge_inline(ctx, g, cands, &mut out) {
                                first_err.get_or_insert(e);
                            }
                        }
                        (out, first_err)
                    }
                });
            match spawned {
                Ok(w) => workers.push(w),
                Err(_) => inline.extend(mine),
            }
        }
        for g in inline {
            if let Err(e) = merge_inline(ctx, g, cands, &mut out) {
                first_err.get_or_insert(e);
            }
        }
        if !local.is_empty() {
            match merge_here(ctx, &local, cands) {
                Ok(o) => out.add(&o),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for w in workers {
            let (o, e) = match w.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            out.add(&o);
            if let Some(e) = e {
                first_err.get_or_insert(e);
            }
        }
    });
    first_err.map_or(Ok(out), Err)
}

/// A region and its candidates' part of the list.
type Span<'r> = (&'r GuestRegion, std::ops::Range<usize>);

/// Most threads merging the VMs other processes map at once.
const REMOTE_THREADS: usize = 8;

/// Every window of `regions`, each finished (punched, published) right
/// after its remap, on this thread.
fn merge_inline(
    ctx: &MergeCtx<'_>,
    regions: &[(&GuestRegion, std::ops::Range<usize>)],
    cands: &[Candidate],
    out: &mut MergeOutcome,
) -> Result<(), DedupError> {
    let mut first_err = None;
    arm_windows(ctx, regions, cands, out, |done, out| {
        if let Err(e) = finish_window(ctx, done, out) {
            first_err.get_or_insert(e);
        }
    })?;
    first_err.map_or(Ok(()), Err)
}

/// [`merge_regions`] for regions only this process maps.
fn merge_here(
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

/// One window: candidates within `MAX_WINDOW` pages of each other, protected
/// together so that registration and protection cost one call each for many
/// runs; each run is still remapped on its own. The steps: lock, protect,
/// compare, remap, disarm; the window then goes to [`finish_window`]. A
/// region another process maps goes through `merge_remote` instead.
fn merge_window<'r>(
    ctx: &MergeCtx<'_>,
    region: &'r GuestRegion,
    window: &[Candidate],
    last_remap: &mut Option<(usize, Target)>,
    out: &mut MergeOutcome,
) -> Result<Option<Remapped<'r>>, DedupError> {
    if let Some(r) = remote_of(ctx.remotes, region) {
        return merge_remote::merge_window(ctx, region, r, window, out);
    }
    let states = region.page_states();
    // 1. Lock. A page whose state moved since it was hashed is left alone.
    let run: Vec<Candidate> = window
        .iter()
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
    // 2. Arm write protection over the window: from here, raw writes to it
    // wait in the kernel (pages in the window that are not candidates too,
    // briefly; they are woken with the rest).
    // 3. Compare under protection, each page against its target's bytes.
    let equal = match protect(ctx, addr, len).and_then(|()| compare_window(ctx, region, &run)) {
        Ok(equal) => equal,
        Err(e) => {
            release_protection(ctx, addr, len);
            unlock_all(&run);
            return Err(e);
        }
    };
    // 4. Remap each maximal equal sub-run of a run in one call.
    let (merged, remap_error) = remap_equal(ctx, region, &run, &equal, last_remap, out);

    // 5. Disarm and wake: waiting writers retry against the new mapping.
    // Unregistering drops the protection of the pages left in place; the
    // remapped ones have fresh, unprotected mappings.
    release_protection(ctx, addr, len);
    drop(window);
    Ok(Some(Remapped {
        region,
        run,
        equal,
        merged,
        remap_error,
    }))
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
    if let Some(r) = remote_of(ctx.remotes, region) {
        return merge_remote::unmerge_range(ctx, r, first, count);
    }
    let mut out = UnmergeOutcome::default();
    for_each_held_run(region, first, count, &mut out, |p, run, out| {
        let cost = region.own_remap_cost(p, run.len());
        if cost <= 0 || ctx.map_budget.try_spend(cost.unsigned_abs()) {
            unmerge_locked(ctx, region, &run, first, out)?;
            if cost < 0 {
                ctx.map_budget.give_back(cost.unsigned_abs());
            }
            Ok(run.len())
        } else {
            unlock_run(region, &run);
            unmerge_stretch(ctx, region, p, first, out)?;
            Ok(1)
        }
    })?;
    Ok(out)
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
    let first = run[0].0;
    let n = run.len();
    let addr = region.page_host_addr(first);
    let len = (n * PAGE_SIZE) as u64;
    let unlock_all = || unlock_run(region, run);
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
    // Copy each page's bytes (as its mapping shows them, kernel copies
    // included) into its own frame. A page that reads all zeros gets a hole
    // punched instead: no memory, and no trust in what the frame held.
    let mut page = [0u8; PAGE_SIZE];
    for &(p, _) in run {
        region.read_page(p, &mut page);
        if let Err(e) = store_own(region, p, &page) {
            release_protection(ctx, addr, len);
            unlock_all();
            return Err(e.into());
        }
    }
    let own = RemapTarget::OwnShared {
        file_offset: region.own_frame(first).file_offset(),
    };
    if let Err(e) = region.remap_pages(first, n, own) {
        release_protection(ctx, addr, len);
        unlock_all();
        return Err(e.into());
    }
    release_protection(ctx, addr, len);
    drop(window);
    publish_unmerged(ctx, region, run, watch, out)
}
