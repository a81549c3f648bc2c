//! The merge and unmerge protocols on runs of consecutive pages of one region.
//!
//! Merge (DESIGN.md "Merge and COW"): lock the pages' state words, arm
//! userfaultfd write protection on their host pages (a raw writer or a vCPU
//! now waits in the kernel), compare each page byte for byte with its target
//! (a shared frame's content, or zeros), remap the equal ones in one
//! `mmap(MAP_FIXED)` per run as a *private* copy-on-write view of the shared
//! frames (or anonymous zeros), punch their own frames, then disarm and wake.
//! A writer that waited retries against the new mapping, where the kernel
//! copies the page before its write lands. The shared frame is never mapped
//! writable anywhere, so no write can ever reach it.
//!
//! Unmerge is the mirror: lock, protect, copy each page's current bytes into
//! its own frame, remap the run onto its own frames (shared, writable), wake.

use std::sync::atomic::{AtomicU64, Ordering};

use super::DedupError;
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    frames::{FrameRange, FrameStore, RemapTarget},
    memory::{
        page_state::{LOCKED, REMAPPED},
        GuestRegion, PageKind, PageState,
    },
    userfault::Userfault,
};

/// Longest run merged under one write-protect window (2 MiB).
const MAX_RUN: usize = 512;

/// What a page should become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// A copy-on-write view of this shared frame.
    Shared(FrameNumber),
    /// Anonymous zeros.
    Zero,
}

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
    pub(super) map_budget: &'a AtomicU64,
}

/// Merges `cands` (sorted by page, distinct pages) of `region`. Shared
/// frame references are returned per frame through `on_merged`.
pub(super) fn merge_region(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    cands: &[Candidate],
    mut on_merged: impl FnMut(FrameNumber, u64),
) -> Result<MergeOutcome, DedupError> {
    let mut out = MergeOutcome::default();
    let mut i = 0;
    while i < cands.len() {
        let mut j = i + 1;
        while j < cands.len() && j - i < MAX_RUN && continues_run(&cands[j - 1], &cands[j]) {
            j += 1;
        }
        if ctx.map_budget.load(Ordering::Relaxed) < 2 {
            out.map_limit += cands[i..].len() as u64;
            break;
        }
        merge_run(ctx, region, &cands[i..j], &mut out, &mut on_merged)?;
        i = j;
    }
    Ok(out)
}

fn continues_run(a: &Candidate, b: &Candidate) -> bool {
    b.page == a.page + 1
        && match (a.target, b.target) {
            (Target::Zero, Target::Zero) => true,
            (Target::Shared(x), Target::Shared(y)) => y.0 == x.0 + 1,
            _ => false,
        }
}

/// One run: consecutive pages with consecutive targets.
fn merge_run(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    run: &[Candidate],
    out: &mut MergeOutcome,
    on_merged: &mut impl FnMut(FrameNumber, u64),
) -> Result<(), DedupError> {
    let states = region.page_states();
    region.enable_state_checks();
    // 1. Lock. A page whose state moved since it was hashed is left alone.
    let locked: Vec<bool> = run
        .iter()
        .map(|c| {
            states
                .compare_exchange(c.page, c.expected, c.expected.with_flags(LOCKED))
                .is_ok()
        })
        .collect();
    out.busy += locked.iter().filter(|l| !**l).count() as u64;
    // Work on maximal locked sub-runs.
    let mut k = 0;
    while k < run.len() {
        if !locked[k] {
            k += 1;
            continue;
        }
        let mut e = k + 1;
        while e < run.len() && locked[e] {
            e += 1;
        }
        merge_locked(ctx, region, &run[k..e], out, on_merged)?;
        k = e;
    }
    Ok(())
}

fn merge_locked(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    run: &[Candidate],
    out: &mut MergeOutcome,
    on_merged: &mut impl FnMut(FrameNumber, u64),
) -> Result<(), DedupError> {
    let states = region.page_states();
    let first = run[0].page;
    let n = run.len();
    let addr = region.page_host_addr(first);
    let len = (n * PAGE_SIZE) as u64;
    let unlock_all = |run: &[Candidate]| {
        for c in run {
            let _ = states.compare_exchange(c.page, c.expected.with_flags(LOCKED), c.expected);
        }
    };

    // 2. Arm write protection: from here, raw writes wait in the kernel.
    if let Err(e) = ctx
        .uffd
        .register(addr, len)
        .and_then(|()| ctx.uffd.protect(addr, len))
    {
        let _ = ctx.uffd.unregister(addr, len);
        unlock_all(run);
        return Err(e.into());
    }

    // 3. Compare under protection, against the target's bytes.
    let mut target_bytes = vec![0u8; n * PAGE_SIZE];
    if let Target::Shared(s) = run[0].target {
        if let Err(e) = ctx.store.read_frames(s, &mut target_bytes) {
            release_protection(ctx, addr, len);
            unlock_all(run);
            return Err(e.into());
        }
    }
    let equal: Vec<bool> = run
        .iter()
        .zip(target_bytes.chunks_exact(PAGE_SIZE))
        .map(|(c, want)| {
            let want: &[u8; PAGE_SIZE] = want.try_into().unwrap_or(&[0u8; PAGE_SIZE]);
            region.page_equals(c.page, want)
        })
        .collect();

    // 4. Remap each maximal equal sub-run; 5. punch the own frames it used.
    let mut merged = vec![false; n];
    let mut k = 0;
    while k < n {
        if !equal[k] {
            k += 1;
            continue;
        }
        let mut e = k + 1;
        while e < n && equal[e] {
            e += 1;
        }
        if ctx.map_budget.load(Ordering::Relaxed) < 2 {
            out.map_limit += (e - k) as u64;
            k = e;
            continue;
        }
        let target = match run[k].target {
            Target::Zero => RemapTarget::AnonZero,
            Target::Shared(s) => RemapTarget::PrivateCopyOf {
                file_offset: s.file_offset(),
            },
        };
        match region.remap_pages(run[k].page, e - k, target) {
            Ok(()) => {
                out.remaps += 1;
                let _ = ctx
                    .map_budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                        Some(b.saturating_sub(2))
                    });
                merged[k..e].iter_mut().for_each(|m| *m = true);
                punch_own_frames(ctx.store, region, &run[k..e])?;
            }
            Err(crate::frames::FrameError::Os { source, .. })
                if source.raw_os_error() == Some(libc::ENOMEM) =>
            {
                // The kernel's mapping budget is spent: stop merging, never
                // fail a guest write for it.
                ctx.map_budget.store(0, Ordering::Relaxed);
                out.map_limit += (e - k) as u64;
            }
            Err(e) => {
                release_protection(ctx, addr, len);
                unlock_all(run);
                return Err(e.into());
            }
        }
        k = e;
    }

    // 6. Disarm and wake: waiting writers retry against the new mapping.
    // Pages left in place still have their protected mapping: unprotect them
    // explicitly (the remapped ones have a fresh, unprotected mapping).
    let mut k = 0;
    while k < n {
        if merged[k] {
            k += 1;
            continue;
        }
        let mut e = k + 1;
        while e < n && !merged[e] {
            e += 1;
        }
        let _ = ctx.uffd.unprotect(
            region.page_host_addr(run[k].page),
            ((e - k) * PAGE_SIZE) as u64,
            false,
        );
        k = e;
    }
    release_protection(ctx, addr, len);

    // 7. Publish the new states (this also unlocks).
    for (idx, c) in run.iter().enumerate() {
        let locked = c.expected.with_flags(LOCKED);
        if merged[idx] {
            let new = match c.target {
                Target::Zero => {
                    out.zero += 1;
                    PageState::new(PageKind::Zero, region.own_frame(c.page), REMAPPED)
                }
                Target::Shared(s) => {
                    out.shared += 1;
                    on_merged(FrameNumber(s.0), 1);
                    PageState::new(PageKind::Shared, s, REMAPPED)
                }
            };
            let _ = states.compare_exchange(c.page, locked, new);
        } else {
            if !equal[idx] {
                out.changed += 1;
            }
            let _ = states.compare_exchange(c.page, locked, c.expected);
        }
    }
    Ok(())
}

/// Releases the memory of the own frames of pages that used them (pages that
/// were remapped before hold their bytes elsewhere, already released).
fn punch_own_frames(
    store: &FrameStore,
    region: &GuestRegion,
    run: &[Candidate],
) -> Result<(), DedupError> {
    let mut k = 0;
    while k < run.len() {
        if run[k].expected.flags() & REMAPPED != 0 {
            k += 1;
            continue;
        }
        let mut e = k + 1;
        while e < run.len()
            && run[e].expected.flags() & REMAPPED == 0
            && run[e].page == run[e - 1].page + 1
        {
            e += 1;
        }
        store.release(FrameRange {
            start: region.own_frame(run[k].page),
            count: (e - k) as u64,
        })?;
        k = e;
    }
    Ok(())
}

/// Removes write protection and registration from a range and wakes anyone
/// waiting there. Never fails silently into a stuck writer: unregistering
/// wakes waiters even if the range was partly remapped.
fn release_protection(ctx: &MergeCtx<'_>, addr: crate::addr::HostVirtAddr, len: u64) {
    let _ = ctx.uffd.unprotect(addr, len, false);
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
}

/// Brings every remapped page of `region` in `[first, first+count)` back to
/// its own frame, with its current bytes. `on_unshared` is told each shared
/// frame a page stopped mapping.
pub(super) fn unmerge_range(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    first: usize,
    count: usize,
    mut on_unshared: impl FnMut(FrameNumber),
) -> Result<UnmergeOutcome, DedupError> {
    let states = region.page_states();
    let mut out = UnmergeOutcome::default();
    let end = (first + count).min(region.pages());
    let mut p = first;
    while p < end {
        // Find a run of remapped pages and lock it.
        let s = states.load(p);
        if s.flags() & REMAPPED == 0 {
            p += 1;
            continue;
        }
        let mut run: Vec<(usize, PageState)> = Vec::new();
        let mut q = p;
        while q < end && run.len() < MAX_RUN {
            let s = states.load(q);
            if s.flags() & REMAPPED == 0 || s.flags() & LOCKED != 0 {
                break;
            }
            if states.compare_exchange(q, s, s.with_flags(LOCKED)).is_err() {
                out.busy += 1;
                break;
            }
            run.push((q, s));
            q += 1;
        }
        if run.is_empty() {
            if states.load(p).flags() & LOCKED != 0 {
                out.busy += 1;
            }
            p += 1;
            continue;
        }
        unmerge_locked(ctx, region, &run, &mut out, &mut on_unshared)?;
        p = q;
    }
    Ok(out)
}

fn unmerge_locked(
    ctx: &MergeCtx<'_>,
    region: &GuestRegion,
    run: &[(usize, PageState)],
    out: &mut UnmergeOutcome,
    on_unshared: &mut impl FnMut(FrameNumber),
) -> Result<(), DedupError> {
    let states = region.page_states();
    let first = run[0].0;
    let n = run.len();
    let addr = region.page_host_addr(first);
    let len = (n * PAGE_SIZE) as u64;
    let unlock_all = || {
        for &(p, s) in run {
            let _ = states.compare_exchange(p, s.with_flags(LOCKED), s);
        }
    };
    if let Err(e) = ctx
        .uffd
        .register(addr, len)
        .and_then(|()| ctx.uffd.protect(addr, len))
    {
        let _ = ctx.uffd.unregister(addr, len);
        unlock_all();
        return Err(e.into());
    }
    // Copy each page's bytes (as its mapping shows them, kernel copies
    // included) into its own frame. Zero pages need nothing: their own
    // frame is a hole, which reads as zeros.
    let mut page = [0u8; PAGE_SIZE];
    for &(p, s) in run {
        region.read_page(p, &mut page);
        let is_zero_page = s.kind() == PageKind::Zero && crate::addr::is_zero_page(&page);
        if !is_zero_page {
            if let Err(e) = ctx.store.write_frame(region.own_frame(p), &page) {
                release_protection(ctx, addr, len);
                unlock_all();
                return Err(e.into());
            }
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
    for &(p, s) in run {
        if s.kind() == PageKind::Shared {
            on_unshared(s.frame());
        }
        let new = PageState::new(PageKind::Private, region.own_frame(p), 0);
        let _ = states.compare_exchange(p, s.with_flags(LOCKED), new);
        out.restored += 1;
    }
    Ok(())
}
