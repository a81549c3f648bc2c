//! The dedup pipeline for one batch of pages, as named stages with typed
//! hand-offs (DESIGN.md "Pipeline"), chained in one place, [`process`]:
//!
//! 1. [`hash_pages`] (scan and hash): `Vec<PageRef>` -> [`HashedPages`]
//! 2. [`classify`] (volatility, zero, known shared frame): -> [`Classified`]
//! 3. [`group`] (groups of equal hashes, the unstable index, templates):
//!    -> [`Grouped`]
//! 4. [`allocate_and_fill`] (new shared frames, filled before anything maps
//!    them): -> [`Filled`]
//! 5. [`order`] (one sorted candidate list, a span per region) and
//!    [`plan_batch`] (the mapping budget's plan, pages deferred to the
//!    pass): -> [`Ordered`] -> [`Planned`]
//! 6. merge windows and publish (`merge::merge_regions`), then [`unpin`];
//!    a pass in batches merges what its batches deferred at its end
//!    ([`merge_deferred`]).
//!
//! It decides *what* to merge; `merge` decides whether it is still safe to,
//! under write protection. The hot loops (hashing, classifying) allocate
//! nothing per page and call nothing dynamically.

use std::{sync::Arc, time::Instant};

use rayon::prelude::*;

use super::{
    error::DedupError,
    key::DomainKey,
    locks::lock,
    merge::{self, Candidate, FreshFrames, MergeOutcome, Target},
    options::DomainId,
    plan,
    scan::{follows, residency, template_len, visit_hash, Deferred, Hashed, Mode, PageRef},
    state::{remote_regions, Inner, ScanState},
    stats::{nanos_since, ScanReport},
    vm::VmEntry,
};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    frames::{FrameRange, HostMapping},
    memory::{GuestRegion, PageState},
};

/// A candidate with its (VM, region).
type Keyed = ((u32, u32), Candidate);

/// This pass's new shared frames, and a read-only populated view of them
/// (`None`: merges read them with `pread`).
type Fresh = Option<(FrameRange, Option<HostMapping>)>;

/// Stage 1's output: one slot per page of the batch, `None` for pages that
/// are not candidates.
pub(super) struct HashedPages {
    pages: Vec<Option<Hashed>>,
    candidates: usize,
}

/// Stage 2's output: candidates whose target is known (zero, or a shared
/// frame already there), in (VM, region, page) order, and the pages left
/// for grouping.
pub(super) struct Classified {
    cands: Vec<Keyed>,
    /// `cands[..direct]` were pushed here, in batch order; group members
    /// follow, in group order.
    direct: usize,
    rest: Vec<(DomainId, Hashed)>,
    /// Shared frames pinned (one extra reference) until the batch ends, so
    /// an unmerge elsewhere cannot free one between a page's remap and its
    /// published state.
    pinned: Vec<FrameNumber>,
}

/// Pages with one hash in one domain: a slice of the sorted `rest`, plus
/// possibly one page from the unstable tree.
struct Group {
    domain: DomainId,
    hash: u64,
    members: std::ops::Range<usize>,
    extra: Option<Hashed>,
}

/// Stage 3's output: the groups in allocation order (of each one's
/// canonical page) and the frames each gets (a template of `n`, or 1).
pub(super) struct Grouped {
    classified: Classified,
    groups: Vec<Group>,
    lens: Vec<usize>,
}

/// Stage 4's output: every candidate targets a frame that holds its bytes.
pub(super) struct Filled {
    cands: Vec<Keyed>,
    direct: usize,
    pinned: Vec<FrameNumber>,
    fresh: Fresh,
    lens: Vec<usize>,
}

/// Stage 5's first output: each region's candidates, one per page, in page
/// order, in one list (`spans[i]` is region `span_keys[i]`'s part).
pub(super) struct Ordered<'v> {
    list: Vec<Candidate>,
    spans: Vec<(&'v GuestRegion, std::ops::Range<usize>)>,
    span_keys: Vec<(u32, u32)>,
    pinned: Vec<FrameNumber>,
    fresh: Fresh,
    lens: Vec<usize>,
}

/// Stage 5's second output: what this batch merges now.
pub(super) struct Planned<'v> {
    list: Vec<Candidate>,
    spans: Vec<(&'v GuestRegion, std::ops::Range<usize>)>,
    pinned: Vec<FrameNumber>,
    fresh: Fresh,
}

/// Hash, group, compare and merge a batch of pages: the stages, chained.
pub(super) fn process(
    inner: &Inner,
    scan: &mut ScanState,
    vms: &[Arc<VmEntry>],
    refs: Vec<PageRef>,
    mode: Mode,
    mut deferred: Option<&mut Deferred>,
) -> Result<ScanReport, DedupError> {
    let mut report = ScanReport {
        pages_scanned: refs.len() as u64,
        ..ScanReport::default()
    };
    let keys: Vec<Arc<DomainKey>> = vms
        .iter()
        .map(|v| Arc::clone(&scan.keys[&v.domain]))
        .collect();
    let hash_started = Instant::now();
    let hashed = hash_pages(vms, &keys, refs);
    report.pages_hashed = hashed.candidates as u64;
    report.hash_nanos = nanos_since(hash_started);
    report.hash_threads = rayon::current_num_threads() as u64;

    let classified = classify(inner, scan, vms, hashed, mode, &mut report);
    let grouped = group(scan, vms, &keys, classified, mode);
    let filled = allocate_and_fill(inner, vms, grouped)?;
    report.group_nanos = nanos_since(hash_started).saturating_sub(report.hash_nanos);

    let merge_started = Instant::now();
    let ordered = order(vms, filled);
    let mut planned = plan_batch(inner, ordered, mode, deferred.as_deref_mut(), &mut report);
    let out = merge_planned(inner, vms, &planned)?;
    if let (Some(d), Some((range, Some(view)))) = (deferred, planned.fresh.take()) {
        if d.cands.iter().any(|(_, c)| {
            matches!(c.target, Target::Shared(f) if f.0 >= range.start.0 && f.0 < range.end())
        }) {
            d.views.push((range, view));
        }
    }
    report.add_merge(&out, nanos_since(merge_started));
    unpin(inner, planned.pinned)?;
    Ok(report)
}

/// Stage 1, scan and hash: which pages are candidates (private, unheld,
/// holding memory), and their hashes, in parallel.
fn hash_pages(vms: &[Arc<VmEntry>], keys: &[Arc<DomainKey>], refs: Vec<PageRef>) -> HashedPages {
    // Pages that hold no memory (never written, or released) are not
    // candidates: they save nothing, and reading one would make the
    // kernel allocate it (shmem has no shared zero page). KSM too scans
    // only pages that are present. (Found by review: untouched memory
    // was counted as saved zero pages, and the guest's first writes to
    // it as copy-on-write breaks.)
    let resident = residency(vms, &refs);
    // One slot per page (an indexed collect writes the Vec in place,
    // sized once); `None` for pages that are not candidates.
    let pages: Vec<Option<Hashed>> = refs
        .par_iter()
        .zip(resident.par_iter())
        .map(|(&at, &resident)| {
            if !resident {
                return None;
            }
            let region = &vms[at.vm as usize].mem.regions()[at.region as usize];
            // Only private pages are candidates: merged and released
            // pages are already where they should be.
            let state = region.page_states().load(at.page as usize);
            if !super::steps::mergeable(state) {
                return None;
            }
            let (hash, zero) = hash_page(region, at.page as usize, &keys[at.vm as usize]);
            Some(Hashed {
                at,
                state,
                hash,
                zero,
            })
        })
        .collect();
    let candidates = pages.iter().filter(|h| h.is_some()).count();
    HashedPages { pages, candidates }
}

/// A page's hash, and whether it is all zeros.
#[inline]
fn hash_page(region: &GuestRegion, page: usize, key: &DomainKey) -> (u64, bool) {
    // Zero pages (half of a freshly booted guest) are found by comparing in
    // place, which stops at the first non-zero byte of any other page; only
    // the rest is copied and hashed.
    if region.page_is_zero(page) {
        return (key.zero_hash(), true);
    }
    let mut buf = [0u8; PAGE_SIZE];
    region.read_page(page, &mut buf);
    let hash = key.hash(&buf);
    // Written to zero between the two reads: still zero.
    (
        hash,
        key.may_be_zero(hash) && crate::addr::is_zero_page(&buf),
    )
}

/// Stage 2, classify, in one pass over the hashed pages (no intermediate
/// list: at a quarter of a million pages, a list is megabytes of fresh
/// memory the kernel faults in page by page):
/// - volatility: an incremental step merges only pages whose hash did not
///   change since their previous visit;
/// - zero, matches a shared frame (pinned), or left for a group.
fn classify(
    inner: &Inner,
    scan: &mut ScanState,
    vms: &[Arc<VmEntry>],
    hashed: HashedPages,
    mode: Mode,
    report: &mut ScanReport,
) -> Classified {
    let HashedPages { pages, candidates } = hashed;
    // One list for every region, sorted by (VM, region, page) before
    // merging: at most one entry per stable page plus one per group.
    let mut c = Classified {
        cands: Vec::with_capacity(candidates),
        direct: 0,
        rest: Vec::with_capacity(candidates),
        pinned: Vec::new(),
    };
    let mut is_pinned = std::collections::HashSet::new();
    let mut volatile = 0;
    // Each VM's hash table and domain index, found once (not once per
    // page).
    let mut old_hashes: Vec<Option<&mut Vec<Vec<u32>>>> = vms.iter().map(|_| None).collect();
    for (id, table) in scan.old_hashes.iter_mut() {
        if let Some(v) = vms.iter().position(|e| e.id == *id) {
            old_hashes[v] = Some(table);
        }
    }
    let mut shared = lock(&inner.shared);
    let mut found = Vec::new();
    for h in pages.into_iter().flatten() {
        let v = h.at.vm as usize;
        let slot = old_hashes[v]
            .as_mut()
            .and_then(|r| r.get_mut(h.at.region as usize))
            .and_then(|r| r.get_mut(h.at.page as usize));
        let seen = visit_hash(h.hash);
        let old = slot.map(|s| std::mem::replace(s, seen));
        if mode.volatility && old != Some(seen) {
            volatile += 1;
            continue;
        }
        if h.zero {
            push(&mut c.cands, h.at, h.state, Target::Zero);
        } else if let Some(s) = shared.lookup(vms[v].domain, h.hash) {
            if is_pinned.insert(s) {
                found.push(s);
            }
            push(&mut c.cands, h.at, h.state, Target::Shared(s));
        } else {
            c.rest.push((vms[v].domain, h));
        }
    }
    for s in found {
        shared.add_ref(s, 1);
        c.pinned.push(s);
    }
    drop(shared);
    c.direct = c.cands.len();
    report.volatile += volatile;
    scan.volatile_this_scan += volatile;
    c
}

#[inline]
fn push(cands: &mut Vec<Keyed>, at: PageRef, expected: PageState, target: Target) {
    cands.push((
        (at.vm, at.region),
        Candidate {
            page: at.page as usize,
            expected,
            target,
        },
    ));
}

/// Stage 3, group and templates: equal hashes sit together after a sort;
/// each run is a group whose first page (in VM, region, page order) is its
/// canonical copy. Groups come out in allocation order, each with its
/// template length.
fn group(
    scan: &mut ScanState,
    vms: &[Arc<VmEntry>],
    keys: &[Arc<DomainKey>],
    mut classified: Classified,
    mode: Mode,
) -> Grouped {
    let rest = &mut classified.rest;
    rest.par_sort_unstable_by_key(|(d, h)| (*d, h.hash, h.at));
    let mut groups: Vec<Group> = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let (d, h) = rest[i];
        let mut j = i + 1;
        while j < rest.len() && rest[j].0 == d && rest[j].1.hash == h.hash {
            j += 1;
        }
        let extra = if mode.unstable {
            unstable_match(scan, vms, keys, &rest[i..j])
        } else {
            None
        };
        if j - i >= 2 || extra.is_some() {
            groups.push(Group {
                domain: d,
                hash: h.hash,
                members: i..j,
                extra,
            });
        }
        i = j;
    }
    // Allocation order = order of each group's canonical page, so clones
    // of one guest map runs of consecutive shared frames.
    groups.sort_by_key(|g| canonical(rest, g).at);
    // Frames per group: one, or a template of identical frames where the
    // group's pages come in long runs (see `template_len`).
    let lens = groups
        .iter()
        .map(|g| template_len(&rest[g.members.clone()]))
        .collect();
    Grouped {
        classified,
        groups,
        lens,
    }
}

/// The unstable index's part in a group of `members` (one hash, one
/// domain): a page of an earlier batch with this content joins a group of
/// several (found by review: it was left out for the pass); a page alone
/// in this batch may match one seen earlier in this full scan (KSM's
/// unstable tree), and takes its place in the tree if none does. The
/// earlier page is hashed again: it may have changed since.
fn unstable_match(
    scan: &mut ScanState,
    vms: &[Arc<VmEntry>],
    keys: &[Arc<DomainKey>],
    members: &[(DomainId, Hashed)],
) -> Option<Hashed> {
    let (d, h) = members[0];
    let earlier = scan
        .unstable
        .take(vms, d, h.hash)
        .and_then(|e| unstable_page(vms, keys, e, h.hash));
    if members.len() >= 2 {
        return earlier.filter(|e| !members.iter().any(|(_, m)| m.at == e.at));
    }
    let earlier = earlier.filter(|e| e.at != h.at);
    if earlier.is_none() {
        scan.unstable
            .insert((h.at.vm as usize, h.at.region, h.at.page), h.hash);
    }
    earlier
}

/// A group's canonical page: its first in (VM, region, page) order.
fn canonical(rest: &[(DomainId, Hashed)], g: &Group) -> Hashed {
    let first = rest[g.members.start].1;
    match g.extra {
        Some(e) if e.at < first.at => e,
        _ => first,
    }
}

/// Stage 4, allocate and fill: one allocation for the batch's groups, in
/// their order, filled with their canonical pages before anything maps
/// them; each group's pages become candidates on its frames
/// ([`target_group`]), each frame pinned.
fn allocate_and_fill(
    inner: &Inner,
    vms: &[Arc<VmEntry>],
    grouped: Grouped,
) -> Result<Filled, DedupError> {
    let Grouped {
        classified:
            Classified {
                mut cands,
                direct,
                rest,
                mut pinned,
            },
        groups,
        lens,
    } = grouped;
    if groups.is_empty() {
        return Ok(Filled {
            cands,
            direct,
            pinned,
            fresh: None,
            lens,
        });
    }
    let sources: Vec<PageRef> = groups
        .iter()
        .zip(&lens)
        .flat_map(|(g, &n)| std::iter::repeat_n(canonical(&rest, g).at, n))
        .collect();
    let base = inner.store.allocate(sources.len() as u64)?;
    let view = match fill_shared_frames(inner, vms, base, &sources, |&at| at) {
        Ok(v) => v,
        Err(e) => {
            let _ = inner.store.free(base);
            return Err(e);
        }
    };
    let mut shared = lock(&inner.shared);
    // The pass's frames, recorded as one run.
    shared.insert_run(
        base.start,
        groups
            .iter()
            .zip(&lens)
            .flat_map(|(g, &n)| std::iter::repeat_n((g.domain, g.hash), n)),
    );
    let mut next = base.start.0;
    for (g, &n) in groups.iter().zip(&lens) {
        let first = next;
        next += n as u64;
        for f in first..next {
            shared.add_ref(FrameNumber(f), 1);
            pinned.push(FrameNumber(f));
        }
        target_group(&mut cands, &rest, g, FrameNumber(first), n);
    }
    drop(shared);
    Ok(Filled {
        cands,
        direct,
        pinned,
        fresh: Some((base, view)),
        lens,
    })
}

/// Makes group `g`'s pages candidates on its `n` frames from `first`: page
/// `k` of a run of consecutive members on frame `k mod n`, so the run is
/// remapped `n` pages a call; the unstable index's page on the first.
fn target_group(
    cands: &mut Vec<Keyed>,
    rest: &[(DomainId, Hashed)],
    g: &Group,
    first: FrameNumber,
    n: usize,
) {
    let mut off = 0;
    let mut prev: Option<PageRef> = None;
    for (_, m) in &rest[g.members.clone()] {
        off = match prev {
            Some(p) if follows(p, m.at) => (off + 1) % n,
            _ => 0,
        };
        prev = Some(m.at);
        let target = Target::Shared(FrameNumber(first.0 + off as u64));
        push(cands, m.at, m.state, target);
    }
    if let Some(e) = g.extra {
        push(cands, e.at, e.state, Target::Shared(first));
    }
}

/// Stage 5a, order: sorted by (VM, region, page), one entry per page (of
/// two for one page, the first pushed wins), a span per region. Only the
/// group members need a sort, then the two sorted runs are merged.
fn order(vms: &[Arc<VmEntry>], filled: Filled) -> Ordered<'_> {
    let Filled {
        mut cands,
        direct,
        pinned,
        fresh,
        lens,
    } = filled;
    let key = |e: &Keyed| (e.0, e.1.page);
    let (head, tail) = cands.split_at_mut(direct);
    tail.par_sort_by_key(key);
    if !head.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
        cands.par_sort_by_key(key);
    }
    let (head, tail) = cands.split_at(direct);
    let mut sorted = {
        let (mut h, mut t) = (head.iter().peekable(), tail.iter().peekable());
        std::iter::from_fn(move || match (h.peek(), t.peek()) {
            (Some(a), Some(b)) if key(b) < key(a) => t.next(),
            (Some(_), _) => h.next(),
            (None, _) => t.next(),
        })
    };
    let mut list: Vec<Candidate> = Vec::with_capacity(cands.len());
    let mut spans = Vec::new();
    let mut span_keys = Vec::new();
    let mut next = sorted.next();
    while let Some(&(k, first)) = next {
        let start = list.len();
        list.push(first);
        next = sorted.next();
        while let Some(&(k2, c)) = next {
            if k2 != k {
                break;
            }
            if list[list.len() - 1].page != c.page {
                list.push(c);
            }
            next = sorted.next();
        }
        let region: &GuestRegion = &vms[k.0 as usize].mem.regions()[k.1 as usize];
        spans.push((region, start..list.len()));
        span_keys.push(k);
    }
    Ordered {
        list,
        spans,
        span_keys,
        pinned,
        fresh,
        lens,
    }
}

/// Stage 5b, plan: with more runs than mappings to spend, merge what saves
/// most per mapping, each new frame with all its pages or none (see
/// `plan`; frames of groups left out are freed with the pins). Candidates
/// outside a pass's batch go to its [`Deferred`], pinned, their mappings
/// set aside.
fn plan_batch<'v>(
    inner: &Inner,
    ordered: Ordered<'v>,
    mode: Mode,
    deferred: Option<&mut Deferred>,
    report: &mut ScanReport,
) -> Planned<'v> {
    let Ordered {
        list,
        spans,
        span_keys,
        pinned,
        fresh,
        lens,
    } = ordered;
    let budget = inner.store.map_budget();
    budget.refresh_if_stale();
    let mut runs = Vec::new();
    for (_, span) in &spans {
        merge::for_each_run(&list[span.clone()], merge::continues_run, |k, e| {
            runs.push(plan::Run {
                start: span.start + k,
                len: e - k,
            });
        });
    }
    // A window's protection may split two mappings more while it lasts.
    // A pass in batches gives each its share of what is left (found by
    // review: the first batch spent everything on its worst units).
    let (part, whole) = mode.share;
    let spend = u64::try_from(
        u128::from(budget.left().saturating_sub(2)) * u128::from(part)
            / u128::from(whole.max(part).max(1)),
    )
    .unwrap_or(u64::MAX);
    let range = fresh.as_ref().map(|(r, _)| *r);
    let keep = plan::select(&list, &runs, range, &lens, spend).unwrap_or_default();
    let window = mode.batch.filter(|_| deferred.is_some());
    let mut planned = Planned {
        list,
        spans,
        pinned,
        fresh,
    };
    if keep.is_empty() && window.is_none() {
        return planned;
    }
    let later = keep_planned(&mut planned, &span_keys, &runs, &keep, window, report);
    if let Some(d) = deferred {
        defer(inner, d, later);
    }
    planned
}

/// Keeps in `planned` the runs the plan kept (`keep[r]`, all where empty)
/// that lie inside the batch's `window` of pages; returns the kept ones
/// outside it.
fn keep_planned(
    planned: &mut Planned<'_>,
    span_keys: &[(u32, u32)],
    runs: &[plan::Run],
    keep: &[bool],
    window: Option<(usize, usize)>,
    report: &mut ScanReport,
) -> Vec<Keyed> {
    let list = &planned.list;
    let mut kept = Vec::with_capacity(list.len());
    let mut kept_spans = Vec::with_capacity(planned.spans.len());
    let mut later = Vec::new();
    let mut r = 0;
    for ((region, span), key) in planned.spans.iter().zip(span_keys) {
        let start = kept.len();
        while r < runs.len() && runs[r].start < span.end {
            let run = &list[runs[r].start..runs[r].start + runs[r].len];
            if keep.get(r).is_some_and(|k| !k) {
                report.map_limit += run.len() as u64;
            } else {
                for c in run {
                    match window {
                        Some((lo, hi)) if c.page < lo || c.page >= hi => {
                            later.push((*key, *c));
                        }
                        _ => kept.push(*c),
                    }
                }
            }
            r += 1;
        }
        if kept.len() > start {
            kept_spans.push((*region, start..kept.len()));
        }
    }
    planned.list = kept;
    planned.spans = kept_spans;
    later
}

/// Hands candidates outside the batch to the pass: pinned until the pass
/// merges them; their mappings set aside now, as the plan counted them in
/// this share (two a run, as the plan counted them: found by review, two
/// a page took a batch's whole budget).
fn defer(inner: &Inner, d: &mut Deferred, later: Vec<Keyed>) {
    let mut shared = lock(&inner.shared);
    for (_, c) in &later {
        if let Target::Shared(f) = c.target {
            shared.add_ref(f, 1);
            d.pins.push(f);
        }
    }
    drop(shared);
    let mut runs = 0u64;
    merge::for_each_run(
        &later,
        |a, b| a.0 == b.0 && merge::continues_run(&a.1, &b.1),
        |_, _| runs += 1,
    );
    d.reserved += inner.store.map_budget().set_aside(2 * runs);
    d.cands.extend(later);
}

/// Stage 6, merge windows and publish: the planned candidates, region by
/// region in page order, compared against the fresh frames in place.
fn merge_planned(
    inner: &Inner,
    vms: &[Arc<VmEntry>],
    planned: &Planned<'_>,
) -> Result<MergeOutcome, DedupError> {
    let fresh_view: Vec<FreshFrames<'_>> = match &planned.fresh {
        Some((range, Some(view))) => vec![FreshFrames {
            start: range.start,
            view,
        }],
        _ => Vec::new(),
    };
    let remotes = remote_regions(vms.iter().map(|v| &**v));
    let mut ctx = inner.ctx();
    ctx.fresh = &fresh_view;
    ctx.remotes = &remotes;
    merge::merge_regions(&ctx, &planned.spans, &planned.list)
}

/// Drops the batch's pins: frames no page ended up mapping are freed here.
fn unpin(inner: &Inner, pinned: Vec<FrameNumber>) -> Result<(), DedupError> {
    let mut shared = lock(&inner.shared);
    for f in pinned {
        shared.drop_ref(&inner.store, f)?;
    }
    Ok(())
}

/// Drops a failed pass's deferred candidates: their mappings back to the
/// budget, their pins (frames nobody maps are freed, or by the next
/// recount should this fail too).
pub(super) fn abandon_deferred(inner: &Inner, deferred: Deferred) {
    inner.store.map_budget().release_aside(deferred.reserved);
    let mut shared = lock(&inner.shared);
    for f in deferred.pins {
        let _ = shared.drop_ref(&inner.store, f);
    }
}

/// The pass's last stage: merges its deferred candidates, all together
/// (merge windows and publish), and drops their pins.
pub(super) fn merge_deferred(
    inner: &Inner,
    vms: &[Arc<VmEntry>],
    deferred: Deferred,
) -> Result<ScanReport, DedupError> {
    let Deferred {
        mut cands,
        pins,
        reserved,
        views,
    } = deferred;
    let fresh: Vec<FreshFrames<'_>> = views
        .iter()
        .map(|(range, view)| FreshFrames {
            start: range.start,
            view,
        })
        .collect();
    let remotes = remote_regions(vms.iter().map(|v| &**v));
    let mut ctx = inner.ctx();
    ctx.fresh = &fresh;
    ctx.remotes = &remotes;
    inner.store.map_budget().release_aside(reserved);
    let mut report = ScanReport::default();
    let merge_started = Instant::now();
    cands.sort_by_key(|(k, c)| (*k, c.page));
    cands.dedup_by_key(|(k, c)| (*k, c.page));
    report.changed += drop_lonely(inner, &mut cands, &pins);
    let (list, spans) = deferred_spans(vms, cands);
    let merged = merge::merge_regions(&ctx, &spans, &list);
    let mut shared = lock(&inner.shared);
    let mut unpinned = Ok(());
    for f in pins {
        if let Err(e) = shared.drop_ref(&inner.store, f) {
            unpinned = unpinned.and(Err(e));
        }
    }
    drop(shared);
    let out = merged?;
    unpinned?;
    report.add_merge(&out, nanos_since(merge_started));
    Ok(report)
}

/// Leaves out a deferred page whose frame no page of its batch ended up
/// mapping (they changed, were busy, or found no mapping): it would be
/// alone on it, saving nothing (found by review). Returns how many.
fn drop_lonely(inner: &Inner, cands: &mut Vec<Keyed>, pins: &[FrameNumber]) -> u64 {
    let mut pinned: std::collections::HashMap<FrameNumber, u64> = std::collections::HashMap::new();
    for f in pins {
        *pinned.entry(*f).or_default() += 1;
    }
    let shared = lock(&inner.shared);
    let before = cands.len();
    cands.retain(|(_, c)| match c.target {
        Target::Shared(f) => shared.refs(f) > pinned.get(&f).copied().unwrap_or(0),
        Target::Zero => true,
    });
    (before - cands.len()) as u64
}

/// Sorted deferred candidates as one list and a span per region (regions
/// gone since are left out).
fn deferred_spans(
    vms: &[Arc<VmEntry>],
    cands: Vec<Keyed>,
) -> (Vec<Candidate>, Vec<(&GuestRegion, std::ops::Range<usize>)>) {
    let mut list = Vec::with_capacity(cands.len());
    let mut spans = Vec::new();
    let mut i = 0;
    while i < cands.len() {
        let k = cands[i].0;
        let start = list.len();
        while i < cands.len() && cands[i].0 == k {
            list.push(cands[i].1);
            i += 1;
        }
        if let Some(region) = vms
            .get(k.0 as usize)
            .and_then(|vm| vm.mem.regions().get(k.1 as usize))
            .map(|r| &**r)
        {
            spans.push((region, start..list.len()));
        }
    }
    (list, spans)
}

/// The fill mapping's address, handed to rayon's tasks; each writes only
/// its own pages through it.
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);

// SAFETY: only an address; `fill_shared_frames` argues each access.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(self, offset: usize) -> *mut u8 {
        self.0.wrapping_add(offset)
    }
}

/// Copies the canonical page of each group into the new shared frames
/// `base` (group `k` into frame `base.start + k`), in parallel, before
/// anything maps them; returns a read-only view of them, already
/// populated, or `None` where only `pwrite` could fill them.
///
/// The frames are mapped shared and writable only here, while no guest
/// page maps them and nothing else reads them; the mapping is made
/// read-only before this returns, and is dropped if that fails. Members
/// that differ from the canonical page (a hash collision, or a write
/// since hashing) fail the byte comparison at merge time and stay
/// private.
fn fill_shared_frames<G: Sync>(
    inner: &Inner,
    vms: &[Arc<VmEntry>],
    base: FrameRange,
    groups: &[G],
    canonical: impl Fn(&G) -> PageRef + Sync,
) -> Result<Option<HostMapping>, DedupError> {
    const CHUNK: usize = 64;
    let copy = |at: PageRef, dst: &mut [u8; PAGE_SIZE]| {
        let region = &vms[at.vm as usize].mem.regions()[at.region as usize];
        region.read_page(at.page as usize, dst);
    };
    // A chunk the mapping cannot take (no mapping, or populating failed:
    // no memory) goes through pwrite, which reports the error instead of
    // a SIGBUS on the write.
    let by_pwrite = |c: usize, chunk: &[G]| -> Result<(), DedupError> {
        let mut buf = vec![0u8; chunk.len() * PAGE_SIZE];
        for (g, dst) in chunk.iter().zip(buf.chunks_exact_mut(PAGE_SIZE)) {
            if let Ok(dst) = <&mut [u8; PAGE_SIZE]>::try_from(dst) {
                copy(canonical(g), dst);
            }
        }
        let first = FrameNumber(base.start.0 + (c * CHUNK) as u64);
        inner.store.write_frames(first, &buf)?;
        Ok(())
    };
    let Ok(map) = inner.store.map_for_fill(base) else {
        groups
            .par_chunks(CHUNK)
            .enumerate()
            .try_for_each(|(c, chunk)| by_pwrite(c, chunk))?;
        return Ok(None);
    };
    let dst = SendPtr(map.as_ptr());
    groups
        .par_chunks(CHUNK)
        .enumerate()
        .try_for_each(|(c, chunk)| {
            let off = c * CHUNK * PAGE_SIZE;
            if map.populate_write(off, chunk.len() * PAGE_SIZE).is_err() {
                return by_pwrite(c, chunk);
            }
            for (k, g) in chunk.iter().enumerate() {
                let page = dst.at(off + k * PAGE_SIZE);
                // Frame `c * CHUNK + k` < `groups.len()` <= `base.count`
                // lies inside the live mapping, populated just above;
                // this task is its only writer and nothing reads it
                // until the fill ends (no guest page maps new frames).
                // SAFETY: in bounds, exclusive, page-aligned (above).
                let page = unsafe { &mut *page.cast::<[u8; PAGE_SIZE]>() };
                copy(canonical(g), page);
            }
            Ok(())
        })?;
    // Read-only from here: every later read of the view sees bytes that
    // can no longer change. If this fails the mapping is dropped
    // (unmapped) here, before any page maps the frames.
    Ok(map.make_read_only().ok().map(|()| map))
}

/// The page an unstable-tree entry names, if it is still a candidate
/// with this hash (read and hashed again: it may have changed, or
/// shared only the index's 32 bits).
fn unstable_page(
    vms: &[Arc<VmEntry>],
    keys: &[Arc<DomainKey>],
    (v, region, page): super::unstable::Place,
    hash: u64,
) -> Option<Hashed> {
    let r = vms.get(v)?.mem.regions().get(region as usize)?;
    let state = r.page_states().load(page as usize);
    if !super::steps::mergeable(state) {
        return None;
    }
    // No memory (unmerged as zeros since): not a candidate, and reading
    // it would allocate it.
    if r.resident(page as usize, 1).is_some_and(|v| {
        v.first()
            .is_some_and(|&b| !crate::host::residency::is_resident(b))
    }) {
        return None;
    }
    let mut buf = [0u8; PAGE_SIZE];
    r.read_page(page as usize, &mut buf);
    if keys.get(v)?.hash(&buf) != hash {
        return None;
    }
    Some(Hashed {
        at: PageRef::new(v, region as usize, page as usize)?,
        state,
        hash,
        zero: false,
    })
}
