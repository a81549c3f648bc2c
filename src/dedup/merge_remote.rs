//! The merge and unmerge protocols for a region that other processes map
//! (a VMM process and its backends under the host service), through the
//! [`RemoteMapper`](super::remote::RemoteMapper) port.
//!
//! The host's own mapping of such a region is a view for reading: nothing
//! writes through it, and it is never remapped. It shows the memfd, which
//! is the truth for every page in its own frame (every mapper maps those
//! shared); merged pages live only in the mappers' remaps, so the host
//! never reads one through its view (candidates are pages in their own
//! frame; an unmerge that copies reads the shared frame itself). Every
//! remap is the mappers' (each in its own process, under its own mmap lock
//! and mapping count), which is why this path spends nothing from the
//! host's mapping budget.
//!
//! Merge: lock the pages' states; arm write protection in every mapper;
//! compare in the view; have every mapper remap the equal runs (each
//! acknowledged, or revoked at a deadline and not done); release
//! protection where nothing was remapped and wake; then, as in one process,
//! punch the merged pages' own frames and publish. Unmerge: lock, protect
//! in every mapper, write each page's bytes into its own frame (the mapper
//! does, where the kernel may have copied the page in it; else the host,
//! from the shared frame), have every mapper map the run at its own frames,
//! release, publish.

use super::{
    error::DedupError,
    remote::{RemoteError, RemoteRegion, RemoteRun, RemoteTarget},
    steps,
    window::{
        compare_window, continues_run, for_each_held_run, for_each_run, publish_unmerged,
        store_own, unlock_run, Candidate, MergeCtx, MergeOutcome, Remapped, Target, UnmergeOutcome,
    },
};
use std::os::fd::AsFd;

use crate::{
    addr::PAGE_SIZE,
    frames::{FrameError, FramePageLock},
    memory::{GuestRegion, PageKind, PageState},
};

/// One window of candidates of a region other processes map.
pub(super) fn merge_window<'r>(
    ctx: &MergeCtx<'_>,
    region: &'r GuestRegion,
    r: RemoteRegion<'_>,
    window: &[Candidate],
    out: &mut MergeOutcome,
) -> Result<Option<Remapped<'r>>, DedupError> {
    if !r.mapper.usable() {
        out.busy += window.len() as u64;
        return Ok(None);
    }
    let states = region.page_states();
    // 1. Lock: only pages in their own frame (a merged page may have been
    // copied in a mapper, where only it can see).
    let run: Vec<Candidate> = window
        .iter()
        .filter(|c| !c.expected.is_remapped())
        .filter(|c| steps::claim_candidate(states, c.page, c.expected))
        .copied()
        .collect();
    out.busy += (window.len() - run.len()) as u64;
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Ok(None);
    };
    let pages = last.page - first.page + 1;
    let unlock_all = |run: &[Candidate]| {
        for c in run {
            steps::release_candidate(states, c.page, c.expected);
        }
    };
    // Keeps an unmerge of this region out of the window, as in one process.
    let guard = region.lock_protection();
    // 2. Protect in every mapper: its writers wait from here.
    if r.mapper.protect(r.index, first.page, pages).is_err() {
        // A process that cannot be protected takes no merge; the other
        // VMs go on.
        let keep = left_in_place(r, region, first.page, pages, &[]);
        r.mapper.release(r.index, &keep, (first.page, pages));
        unlock_all(&run);
        out.busy += run.len() as u64;
        return Ok(None);
    }
    // 3. Compare in the view, under the mappers' protection.
    let equal = match compare_window(ctx, region, &run) {
        Ok(equal) => equal,
        Err(e) => {
            let keep = left_in_place(r, region, first.page, pages, &[]);
            r.mapper.release(r.index, &keep, (first.page, pages));
            unlock_all(&run);
            return Err(e);
        }
    };
    // 4. Every mapper remaps the equal runs, or none does.
    let mut merged = equal.clone();
    let runs = remote_runs(&run, &merged);
    if !runs.is_empty() {
        match r.mapper.remap(r.index, &runs) {
            Ok(()) => out.remaps += runs.len() as u64,
            Err(e) => {
                let n = merged.iter().filter(|m| **m).count() as u64;
                match e {
                    RemoteError::MapLimit => out.map_limit += n,
                    _ => out.busy += n,
                }
                merged.iter_mut().for_each(|m| *m = false);
            }
        }
    }
    // 5. Release: the remapped pages have fresh mappings (protected for
    // good in break-on-write mode), the rest are unprotected; wake all.
    let now: Vec<usize> = run
        .iter()
        .zip(&merged)
        .filter(|(_, m)| **m)
        .map(|(c, _)| c.page)
        .collect();
    let keep = left_in_place(r, region, first.page, pages, &now);
    r.mapper.release(r.index, &keep, (first.page, pages));
    drop(guard);
    Ok(Some(Remapped {
        region,
        run,
        equal,
        merged,
        remap_error: None,
    }))
}

/// The merged pages of `run` as runs of one target each.
fn remote_runs(run: &[Candidate], merged: &[bool]) -> Vec<RemoteRun> {
    let mut runs = Vec::new();
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
    runs
}

/// The stretches of the window `first..first + pages` whose protection
/// a release lifts: every page but those the window just remapped (fresh
/// mappings, `now`, sorted) and, where merged pages stay protected for good
/// (break-on-write), every page merged before (found by review: a window
/// unprotected older merged pages inside its range, and a write to one
/// then became one process's private copy).
fn left_in_place(
    r: RemoteRegion<'_>,
    region: &GuestRegion,
    first: usize,
    pages: usize,
    now: &[usize],
) -> Vec<(usize, usize)> {
    let states = region.page_states();
    let keeps = r.mapper.keeps_merged_protected();
    let lift =
        |p: usize| now.binary_search(&p).is_err() && !(keeps && states.load(p).is_remapped());
    let mut out: Vec<(usize, usize)> = Vec::new();
    for p in first..first + pages {
        if !lift(p) {
            continue;
        }
        match out.last_mut() {
            Some((s, n)) if *s + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Brings every remapped page of the region in `[first, first + count)`
/// back to its own frame in every mapper, a run of at most `MAX_RUN`
/// pages at a time.
pub(super) fn unmerge_range(
    ctx: &MergeCtx<'_>,
    r: RemoteRegion<'_>,
    first: usize,
    count: usize,
) -> Result<UnmergeOutcome, DedupError> {
    let mut out = UnmergeOutcome::default();
    for_each_held_run(r.region, first, count, &mut out, |_, run, out| {
        unmerge_locked(ctx, r, &run, first, out)?;
        Ok(run.len())
    })?;
    Ok(out)
}

fn unmerge_locked(
    ctx: &MergeCtx<'_>,
    r: RemoteRegion<'_>,
    run: &[(usize, PageState)],
    watch: usize,
    out: &mut UnmergeOutcome,
) -> Result<(), DedupError> {
    let region = r.region;
    let first = run[0].0;
    let n = run.len();
    let guard = region.lock_protection();
    let fail = |e: DedupError| {
        // The pages are still merged: in break-on-write mode they stay
        // protected (writers are only woken, to ask again).
        let keep = if r.mapper.keeps_merged_protected() {
            Vec::new()
        } else {
            vec![(first, n)]
        };
        r.mapper.release(r.index, &keep, (first, n));
        unlock_run(region, run);
        Err(e)
    };
    if let Err(e) = r.mapper.protect(r.index, first, n) {
        return fail(e.into());
    }
    // Where no mapper can hold a copy of its own (break-on-write), the
    // shared frame is each page's truth: the host writes it home.
    if !r.mapper.holds_truth() {
        if let Err(e) = write_home_from_shared(ctx, region, run) {
            return fail(e);
        }
    }
    if let Err(e) = r.mapper.restore(r.index, &[(first as u64, n as u64)]) {
        return fail(e.into());
    }
    // Every mapper maps the run at its own frames now (fresh mappings).
    r.mapper.release(r.index, &[(first, n)], (first, n));
    drop(guard);
    publish_unmerged(ctx, region, run, watch, out)
}

/// Writes each held page's bytes into its own frame from what it maps:
/// its shared frame (read from the host's store), or zeros. Only into a
/// hole, under the page's lock, as processes that bring pages home without
/// a service do: a frame that holds data was brought home already and may
/// hold a write since (found by review).
fn write_home_from_shared(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    run: &[(usize, PageState)],
) -> Result<(), DedupError> {
    let mut page = [0u8; PAGE_SIZE];
    let fd = region.store().as_fd();
    for &(p, s) in run {
        match s.kind() {
            PageKind::Shared => ctx.store.read_frames(s.frame(), &mut page)?,
            // A hole reads as zeros already.
            PageKind::Zero => continue,
            // Not remapped onto anything the host knows: leave the frame.
            _ => continue,
        }
        let lock =
            FramePageLock::take(fd, region.own_frame(p).file_offset()).map_err(|source| {
                FrameError::Os {
                    op: "fcntl(F_OFD_SETLKW) on a page of guest memory",
                    source,
                }
            })?;
        if !lock.holds_data() {
            store_own(region, p, &page)?;
        }
    }
    Ok(())
}
