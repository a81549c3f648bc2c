//! The scanning pipeline: which pages to visit, hashing them in parallel,
//! the volatility rule, grouping equal hashes, allocating and filling shared
//! frames in an order that keeps clones' runs consecutive, and handing runs
//! to the merge protocol. It decides *what* to merge; `merge` decides
//! whether it is still safe to, under write protection.

use std::{sync::Arc, time::Instant};

use rayon::prelude::*;

use super::{
    key::DomainKey,
    lock,
    merge::{self, Candidate, Target},
    nanos_since, plan, DedupError, DomainId, Inner, ScanReport, ScanState, VmEntry,
};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    frames::{FrameRange, HostMapping},
    memory::PageState,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct PageRef {
    pub(super) vm: u32,
    pub(super) region: u32,
    pub(super) page: u32,
}

impl PageRef {
    /// `None` past 2^32 VMs, regions or pages per region (16 TiB regions):
    /// such pages are not scanned.
    pub(super) fn new(vm: usize, region: usize, page: usize) -> Option<Self> {
        Some(PageRef {
            vm: u32::try_from(vm).ok()?,
            region: u32::try_from(region).ok()?,
            page: u32::try_from(page).ok()?,
        })
    }
}

/// Pages with one hash in one domain: a slice of the sorted candidates, plus
/// possibly one page from the unstable tree.
struct Group {
    domain: DomainId,
    hash: u64,
    members: std::ops::Range<usize>,
    extra: Option<Hashed>,
}

/// Every page of every included region, a batch at a time: batch `w`
/// holds pages `[w * per_region, (w + 1) * per_region)` of every included
/// region of every VM, so the same pages of clones meet in one batch (and
/// merge there), and a pass never holds a list of every page: its
/// bookkeeping per batch is about 160 bytes a page, which for a whole
/// 4 GiB pass was the larger part of dedup's peak memory (found from
/// outside). Pages that match one in another batch are found through the
/// unstable index.
pub(super) struct Batches<'a> {
    vms: &'a [Arc<VmEntry>],
    window: usize,
    per_region: usize,
}

/// Candidates of a batched pass that lie outside the batch that found them
/// (pages of earlier batches, from the unstable index), with a pin on each
/// one's target and the mappings set aside for them: merged together at
/// the end of the pass. One by one each would be a write-protect window of
/// its own (found measuring: scattered duplicates, whose pairs all span
/// batches, took the merge from 0.38 s to 0.99 s).
#[derive(Default)]
pub(super) struct Deferred {
    cands: Vec<((u32, u32), Candidate)>,
    pins: Vec<FrameNumber>,
    reserved: u64,
    /// The read-only views of the batches' new frames that deferred pages
    /// target, kept for their comparison (else a `pread` a page).
    views: Vec<(FrameRange, HostMapping)>,
}

impl<'a> Batches<'a> {
    /// Pages `[lo, hi)` of every region: the batch last returned.
    pub(super) fn last_window(&self) -> (usize, usize) {
        let lo = self
            .window
            .saturating_sub(1)
            .saturating_mul(self.per_region);
        (lo, lo.saturating_add(self.per_region))
    }

    /// Batches of about `pages` pages.
    pub(super) fn new(vms: &'a [Arc<VmEntry>], pages: usize) -> Self {
        let regions = vms
            .iter()
            .map(|vm| vm.included.iter().filter(|i| **i).count())
            .sum::<usize>()
            .max(1);
        Batches {
            vms,
            window: 0,
            per_region: (pages / regions).max(512),
        }
    }
}

impl Iterator for Batches<'_> {
    type Item = Vec<PageRef>;

    fn next(&mut self) -> Option<Vec<PageRef>> {
        loop {
            let lo = self.window.checked_mul(self.per_region)?;
            let hi = lo.saturating_add(self.per_region);
            self.window += 1;
            let mut refs = Vec::new();
            let mut more = false;
            for (v, vm) in self.vms.iter().enumerate() {
                for (ri, r) in vm.mem.regions().iter().enumerate() {
                    if vm.included[ri] && r.pages() > lo {
                        more = true;
                        refs.extend((lo..hi.min(r.pages())).filter_map(|p| PageRef::new(v, ri, p)));
                    }
                }
            }
            if !more {
                return None;
            }
            if !refs.is_empty() {
                return Some(refs);
            }
        }
    }
}

impl ScanReport {
    /// What a merge of the batch's candidates did.
    fn add_merge(&mut self, out: &merge::MergeOutcome, nanos: u64) {
        self.merged_shared += out.shared;
        self.merged_zero += out.zero;
        self.changed += out.changed;
        self.busy += out.busy;
        self.map_limit += out.map_limit;
        self.remaps += out.remaps;
        self.merge_nanos = nanos;
    }
}

/// How a batch is processed.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mode {
    /// Merge only pages that hashed the same on their previous visit
    /// (incremental scanning); `false`: every candidate now.
    pub(super) volatility: bool,
    /// Look pages without a match in the batch up in the unstable index
    /// (and leave them there for later batches).
    pub(super) unstable: bool,
    /// The share of the mapping budget this batch may plan with: pages of
    /// this batch, pages of the pass still to come (this batch's included).
    pub(super) share: (u64, u64),
    /// Pages `[lo, hi)` of every region, for a batch of a pass: candidates
    /// outside them go to the pass's [`Deferred`].
    pub(super) batch: Option<(usize, usize)>,
}

/// The next `want` pages from `cursor`; `true` if this call reached the end
/// of a full pass (the cursor is back at the start).
pub(super) fn next_pages(
    cursor: &mut (usize, usize, usize),
    vms: &[Arc<VmEntry>],
    want: usize,
) -> (Vec<PageRef>, bool) {
    let mut refs = Vec::with_capacity(want);
    let (mut v, mut r, mut p) = *cursor;
    if v >= vms.len() {
        // Past the last VM (it was unregistered): that pass is over.
        *cursor = (0, 0, 0);
        return (refs, true);
    }
    let mut wrapped = false;
    loop {
        // Move past exhausted or excluded regions, and past the last VM.
        loop {
            let vm = &vms[v];
            let regions = vm.mem.regions();
            if r < regions.len() {
                if !vm.included[r] || p >= regions[r].pages() {
                    r += 1;
                    p = 0;
                    continue;
                }
                break;
            }
            v += 1;
            (r, p) = (0, 0);
            if v >= vms.len() {
                v = 0;
                wrapped = true;
                break;
            }
        }
        if wrapped || refs.len() >= want {
            break;
        }
        let n = (vms[v].mem.regions()[r].pages() - p).min(want - refs.len());
        refs.extend((p..p + n).filter_map(|page| PageRef::new(v, r, page)));
        p += n;
    }
    *cursor = (v, r, p);
    (refs, wrapped)
}

/// Whether each page of `refs` holds memory (`mincore`, one call per run of
/// consecutive pages of a region); `true` where the kernel would not say.
fn residency(vms: &[Arc<VmEntry>], refs: &[PageRef]) -> Vec<bool> {
    let mut out = vec![true; refs.len()];
    let mut i = 0;
    while i < refs.len() {
        let first = refs[i];
        let mut j = i + 1;
        while j < refs.len() && follows(refs[j - 1], refs[j]) {
            j += 1;
        }
        let region = &vms[first.vm as usize].mem.regions()[first.region as usize];
        if let Some(v) = region.resident(first.page as usize, j - i) {
            for (slot, b) in out[i..j].iter_mut().zip(v) {
                *slot = crate::host::residency::is_resident(b);
            }
        }
        i = j;
    }
    out
}

/// What a page's visit leaves for the next one to compare: the hash's top
/// 32 bits.
pub(super) fn visit_hash(hash: u64) -> u32 {
    let [a, b, c, d, ..] = hash.to_be_bytes();
    u32::from_be_bytes([a, b, c, d])
}

/// Longest template of identical shared frames for one content.
const MAX_TEMPLATE: usize = 64;
/// Shortest template: a shorter one saves little (a run of `k` still needs
/// `k / n` remaps), so short runs stay on one frame and small guests fold
/// exactly as KSM would.
const MIN_TEMPLATE: usize = 8;
/// Mappings a template frame must save to be worth its page.
const MAPPINGS_PER_TEMPLATE_FRAME: usize = 16;

/// Whether `b` is the page right after `a` in the same region.
fn follows(a: PageRef, b: PageRef) -> bool {
    a.vm == b.vm && a.region == b.region && a.page.checked_add(1) == Some(b.page)
}

/// How many identical shared frames a group of pages gets (`members`, in
/// (VM, region, page) order): 1, or a template of `n` (8 to 64) where the group's
/// pages come in runs of consecutive pages (a guest's pages of `0xcc`
/// padding or `0xff` fill, hundreds in a row). One remap maps one run of
/// consecutive frames, so a run of `k` pages on one frame costs `k` remaps
/// and `k` mappings; on a template of `n`, `ceil(k / n)`. The `n - 1` extra
/// frames are memory that is not saved, so a template is made only where
/// each extra frame saves at least `MAPPINGS_PER_TEMPLATE_FRAME` mappings
/// (about the kernel memory those mappings would take: a mapping and its
/// tree entries are about 250 bytes).
fn template_len(members: &[(DomainId, Hashed)]) -> usize {
    let mut runs: Vec<usize> = Vec::new();
    let mut prev: Option<PageRef> = None;
    for (_, m) in members {
        match (prev, runs.last_mut()) {
            (Some(p), Some(len)) if follows(p, m.at) => *len += 1,
            _ => runs.push(1),
        }
        prev = Some(m.at);
    }
    let longest = runs.iter().copied().max().unwrap_or(0);
    let mut n = longest.min(MAX_TEMPLATE);
    while n >= MIN_TEMPLATE {
        let saved: usize = runs.iter().map(|&k| k - k.div_ceil(n)).sum();
        if saved >= MAPPINGS_PER_TEMPLATE_FRAME * (n - 1) {
            return n;
        }
        n /= 2;
    }
    1
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

/// A page hashed this pass.
#[derive(Clone, Copy)]
struct Hashed {
    at: PageRef,
    state: PageState,
    hash: u64,
    zero: bool,
}

impl Inner {
    /// Hash, group, compare and merge a batch of pages.
    pub(super) fn process(
        &self,
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
        // Hash in parallel. Only private pages are candidates: merged and
        // released pages are already where they should be.
        let keys: Vec<Arc<DomainKey>> = vms
            .iter()
            .map(|v| Arc::clone(&scan.keys[&v.domain]))
            .collect();
        let hash_started = Instant::now();
        // Pages that hold no memory (never written, or released) are not
        // candidates: they save nothing, and reading one would make the
        // kernel allocate it (shmem has no shared zero page). KSM too scans
        // only pages that are present. (Found by review: untouched memory
        // was counted as saved zero pages, and the guest's first writes to
        // it as copy-on-write breaks.)
        let resident = residency(vms, &refs);
        // One slot per page (an indexed collect writes the Vec in place,
        // sized once); `None` for pages that are not candidates.
        let hashed: Vec<Option<Hashed>> = refs
            .par_iter()
            .zip(resident.par_iter())
            .map(|(&at, &resident)| {
                if !resident {
                    return None;
                }
                let vm = &vms[at.vm as usize];
                let region = &vm.mem.regions()[at.region as usize];
                let state = region.page_states().load(at.page as usize);
                if !super::steps::mergeable(state) {
                    return None;
                }
                let key = &keys[at.vm as usize];
                // Zero pages (half of a freshly booted guest) are found by
                // comparing in place, which stops at the first non-zero byte
                // of any other page; only the rest is copied and hashed.
                let (hash, zero) = if region.page_is_zero(at.page as usize) {
                    (key.zero_hash(), true)
                } else {
                    let mut buf = [0u8; PAGE_SIZE];
                    region.read_page(at.page as usize, &mut buf);
                    let hash = key.hash(&buf);
                    // Written to zero between the two reads: still zero.
                    (
                        hash,
                        key.may_be_zero(hash) && crate::addr::is_zero_page(&buf),
                    )
                };
                Some(Hashed {
                    at,
                    state,
                    hash,
                    zero,
                })
            })
            .collect();
        drop(refs);
        let candidates = hashed.iter().filter(|h| h.is_some()).count();
        report.pages_hashed = candidates as u64;
        report.hash_nanos = nanos_since(hash_started);
        report.hash_threads = rayon::current_num_threads() as u64;

        // One pass over the hashed pages (no intermediate list: at a
        // quarter of a million pages, a list is megabytes of fresh memory
        // the kernel faults in page by page):
        // - Volatility: an incremental step merges only pages whose hash
        //   did not change since their previous visit.
        // - Classify: zero, matches a shared frame, or needs a group.
        // One list for every region, sorted by (VM, region, page) before
        // merging: at most one entry per stable page plus one per group.
        let mut cands: Vec<((u32, u32), Candidate)> = Vec::with_capacity(candidates);
        let mut push = |at: PageRef, expected: PageState, target: Target| {
            cands.push((
                (at.vm, at.region),
                Candidate {
                    page: at.page as usize,
                    expected,
                    target,
                },
            ));
        };
        let mut rest: Vec<(DomainId, Hashed)> = Vec::with_capacity(candidates);
        // Every shared frame this pass may map pages onto holds one extra
        // reference ("pin") until the pass ends, so an unmerge elsewhere
        // cannot free it between a page's remap and its published state.
        let mut pinned: Vec<FrameNumber> = Vec::new();
        let mut is_pinned = std::collections::HashSet::new();
        let mut volatile = 0;
        // Entries pushed by this pass follow `refs`, in (VM, region, page)
        // order; group members are pushed after these, in group order.
        let mut direct = 0;
        {
            // Each VM's hash table and domain index, found once (not once
            // per page).
            let mut old_hashes: Vec<Option<&mut Vec<Vec<u32>>>> =
                vms.iter().map(|_| None).collect();
            for (id, table) in scan.old_hashes.iter_mut() {
                if let Some(v) = vms.iter().position(|e| e.id == *id) {
                    old_hashes[v] = Some(table);
                }
            }
            let mut shared = lock(&self.shared);

            let mut found = Vec::new();
            for h in hashed.into_iter().flatten() {
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
                    direct += 1;
                    push(h.at, h.state, Target::Zero);
                } else if let Some(s) = shared.lookup(vms[v].domain, h.hash) {
                    if is_pinned.insert(s) {
                        found.push(s);
                    }
                    direct += 1;
                    push(h.at, h.state, Target::Shared(s));
                } else {
                    rest.push((vms[v].domain, h));
                }
            }
            for s in found {
                shared.add_ref(s, 1);
                pinned.push(s);
            }
        }
        report.volatile += volatile;
        scan.volatile_this_scan += volatile;
        // Equal hashes sit together after a sort; each run is a group whose
        // first page (in VM, region, page order) is its canonical copy.
        rest.par_sort_unstable_by_key(|(d, h)| (*d, h.hash, h.at));
        let mut groups: Vec<Group> = Vec::new();
        let mut i = 0;
        while i < rest.len() {
            let (d, h) = rest[i];
            let mut j = i + 1;
            while j < rest.len() && rest[j].0 == d && rest[j].1.hash == h.hash {
                j += 1;
            }
            if j - i >= 2 {
                // A page of an earlier batch with this content joins the
                // group (found by review: it was left out for the pass).
                let extra = if mode.unstable {
                    scan.unstable
                        .take(vms, d, h.hash)
                        .and_then(|e| self.unstable_page(vms, &keys, e, h.hash))
                        .filter(|e| !rest[i..j].iter().any(|(_, m)| m.at == e.at))
                } else {
                    None
                };
                groups.push(Group {
                    domain: d,
                    hash: h.hash,
                    members: i..j,
                    extra,
                });
            } else if mode.unstable {
                // A page alone in this batch (a step, or a batch of `merge_now`) may match one seen
                // earlier in this full scan (KSM's unstable tree).
                // The earlier page is hashed again: it may have changed since
                // (then this page takes its place in the tree).
                let earlier = scan
                    .unstable
                    .take(vms, d, h.hash)
                    .and_then(|e| self.unstable_page(vms, &keys, e, h.hash))
                    .filter(|e| e.at != h.at);
                match earlier {
                    Some(e) => groups.push(Group {
                        domain: d,
                        hash: h.hash,
                        members: i..j,
                        extra: Some(e),
                    }),
                    None => {
                        scan.unstable
                            .insert((h.at.vm as usize, h.at.region, h.at.page), h.hash);
                    }
                }
            }
            i = j;
        }
        // Allocation order = order of each group's canonical page, so clones
        // of one guest map runs of consecutive shared frames.
        let canonical = |g: &Group| {
            let first = rest[g.members.start].1;
            match g.extra {
                Some(e) if e.at < first.at => e,
                _ => first,
            }
        };
        groups.sort_by_key(|g| canonical(g).at);
        // This pass's new shared frames, and a read-only, populated view of
        // them for comparing in place (without it, merges read with pread).
        let mut fresh: Option<(FrameRange, Option<HostMapping>)> = None;
        // Frames per group: one, or a template of identical frames where
        // the group's pages come in long runs (see `template_len`).
        let lens: Vec<usize> = groups
            .iter()
            .map(|g| template_len(&rest[g.members.clone()]))
            .collect();
        if !groups.is_empty() {
            let sources: Vec<PageRef> = groups
                .iter()
                .zip(&lens)
                .flat_map(|(g, &n)| std::iter::repeat(canonical(g).at).take(n))
                .collect();
            let base = self.store.allocate(sources.len() as u64)?;
            let view = self.fill_shared_frames(vms, base, &sources, |&at| at);
            let view = match view {
                Ok(v) => v,
                Err(e) => {
                    let _ = self.store.free(base);
                    return Err(e);
                }
            };
            fresh = Some((base, view));
            let mut shared = lock(&self.shared);
            // The pass's frames, recorded as one run.
            shared.insert_run(
                base.start,
                groups
                    .iter()
                    .zip(&lens)
                    .flat_map(|(g, &n)| std::iter::repeat((g.domain, g.hash)).take(n)),
            );
            let mut next = base.start.0;
            for (g, &n) in groups.iter().zip(&lens) {
                let first = next;
                next += n as u64;
                for f in first..next {
                    let frame = FrameNumber(f);
                    shared.add_ref(frame, 1);
                    pinned.push(frame);
                }
                // Page `k` of a run of consecutive members maps template
                // frame `k mod n`, so the run is remapped `n` pages a call.
                let mut off = 0;
                let mut prev: Option<PageRef> = None;
                for (_, m) in &rest[g.members.clone()] {
                    off = match prev {
                        Some(p) if follows(p, m.at) => (off + 1) % n,
                        _ => 0,
                    };
                    prev = Some(m.at);
                    push(
                        m.at,
                        m.state,
                        Target::Shared(FrameNumber(first + off as u64)),
                    );
                }
                if let Some(e) = g.extra {
                    push(e.at, e.state, Target::Shared(FrameNumber(first)));
                }
            }
        }

        report.group_nanos = nanos_since(hash_started).saturating_sub(report.hash_nanos);
        let merge_started = Instant::now();
        // Merge, region by region, in page order.
        // Sorted by (VM, region, page): only the group members need a sort,
        // then the two sorted runs are merged. Stable sorts: of two entries
        // for one page, the first pushed wins.
        let key = |e: &((u32, u32), Candidate)| (e.0, e.1.page);
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
        let mut ctx = self.ctx();
        let fresh_view: Vec<merge::FreshFrames<'_>> = match &fresh {
            Some((range, Some(view))) => vec![merge::FreshFrames {
                start: range.start,
                view,
            }],
            _ => Vec::new(),
        };
        ctx.fresh = &fresh_view;
        // Each region's candidates, one entry per page, in one list.
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
            let region = &vms[k.0 as usize].mem.regions()[k.1 as usize];
            spans.push((region, start..list.len()));
            span_keys.push(k);
        }
        drop(cands);
        // More runs than mappings to spend: merge what saves most per
        // mapping, each new frame with all its pages or none (see `plan`).
        // Frames of groups left out are freed with the pins below.
        let budget = self.store.map_budget();
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
        let planned = plan::select(&list, &runs, fresh.as_ref().map(|(r, _)| *r), &lens, spend);
        let keep = planned.unwrap_or_default();
        let window = mode.batch.filter(|_| deferred.is_some());
        if !keep.is_empty() || window.is_some() {
            let mut kept = Vec::with_capacity(list.len());
            let mut kept_spans = Vec::with_capacity(spans.len());
            let mut later = Vec::new();
            let mut r = 0;
            for ((region, span), key) in spans.iter().zip(&span_keys) {
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
            list = kept;
            spans = kept_spans;
            if let Some(d) = deferred.as_deref_mut() {
                // Pinned until the pass merges them; their mappings set
                // aside now, as the plan counted them in this share.
                let mut shared = lock(&self.shared);
                for (_, c) in &later {
                    if let Target::Shared(f) = c.target {
                        shared.add_ref(f, 1);
                        d.pins.push(f);
                    }
                }
                // Two a run, as the plan counted them (found by review: two
                // a page took a batch's whole budget).
                let mut runs = 0u64;
                merge::for_each_run(
                    &later,
                    |a, b| a.0 == b.0 && merge::continues_run(&a.1, &b.1),
                    |_, _| runs += 1,
                );
                d.reserved += budget.set_aside(2 * runs);
                d.cands.extend(later);
            }
        }
        drop(runs);
        let out = merge::merge_regions(&ctx, &spans, &list)?;
        drop(fresh_view);
        if let (Some(d), Some((range, Some(view)))) = (deferred, fresh.take()) {
            if d.cands.iter().any(|(_, c)| {
                matches!(c.target, Target::Shared(f) if f.0 >= range.start.0 && f.0 < range.end())
            }) {
                d.views.push((range, view));
            }
        }
        report.add_merge(&out, nanos_since(merge_started));
        // Unpin: frames no page ended up mapping are freed here.
        let mut shared = lock(&self.shared);
        for f in pinned {
            shared.drop_ref(&self.store, f)?;
        }
        Ok(report)
    }

    /// Drops a failed pass's deferred candidates: their mappings back to the
    /// budget, their pins (frames nobody maps are freed, or by the next
    /// recount should this fail too).
    pub(super) fn abandon_deferred(&self, deferred: Deferred) {
        self.store.map_budget().release_aside(deferred.reserved);
        let mut shared = lock(&self.shared);
        for f in deferred.pins {
            let _ = shared.drop_ref(&self.store, f);
        }
    }

    /// Merges a pass's deferred candidates, all together, and drops their
    /// pins.
    pub(super) fn merge_deferred(
        &self,
        vms: &[Arc<VmEntry>],
        deferred: Deferred,
    ) -> Result<ScanReport, DedupError> {
        let Deferred {
            mut cands,
            pins,
            reserved,
            views,
        } = deferred;
        let fresh: Vec<merge::FreshFrames<'_>> = views
            .iter()
            .map(|(range, view)| merge::FreshFrames {
                start: range.start,
                view,
            })
            .collect();
        let mut ctx = self.ctx();
        ctx.fresh = &fresh;
        self.store.map_budget().release_aside(reserved);
        let mut report = ScanReport::default();
        let merge_started = Instant::now();
        cands.sort_by_key(|(k, c)| (*k, c.page));
        cands.dedup_by_key(|(k, c)| (*k, c.page));
        // A page whose frame no page of its batch ended up mapping (they
        // changed, were busy, or found no mapping) would be alone on it,
        // saving nothing: left out (found by review).
        {
            let mut pinned: std::collections::HashMap<FrameNumber, u64> =
                std::collections::HashMap::new();
            for f in &pins {
                *pinned.entry(*f).or_default() += 1;
            }
            let shared = lock(&self.shared);
            let before = cands.len();
            cands.retain(|(_, c)| match c.target {
                Target::Shared(f) => shared.refs(f) > pinned.get(&f).copied().unwrap_or(0),
                Target::Zero => true,
            });
            report.changed += (before - cands.len()) as u64;
        }
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
            {
                spans.push((region, start..list.len()));
            }
        }
        drop(cands);
        let merged = merge::merge_regions(&ctx, &spans, &list);
        let mut shared = lock(&self.shared);
        let mut unpinned = Ok(());
        for f in pins {
            if let Err(e) = shared.drop_ref(&self.store, f) {
                unpinned = unpinned.and(Err(e));
            }
        }
        drop(shared);
        let out = merged?;
        unpinned?;
        report.add_merge(&out, nanos_since(merge_started));
        Ok(report)
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
        &self,
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
            self.store.write_frames(first, &buf)?;
            Ok(())
        };
        let Ok(map) = self.store.map_for_fill(base) else {
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
        &self,
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
}
