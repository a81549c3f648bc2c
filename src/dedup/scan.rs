//! What the pipeline (`pipeline.rs`) works on: which pages to visit (a
//! step's next pages, a pass's batches), their residency, a hashed page and
//! what its visit leaves, template lengths, and the candidates a pass
//! defers to its end and merges together.

use std::sync::Arc;

use super::{
    merge::{self, Candidate},
    options::DomainId,
    stats::ScanReport,
    vm::VmEntry,
};
use crate::{
    addr::FrameNumber,
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
    pub(super) cands: Vec<((u32, u32), Candidate)>,
    pub(super) pins: Vec<FrameNumber>,
    pub(super) reserved: u64,
    /// The read-only views of the batches' new frames that deferred pages
    /// target, kept for their comparison (else a `pread` a page).
    pub(super) views: Vec<(FrameRange, HostMapping)>,
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
            .map(|vm| (0..vm.included.len()).filter(|&ri| vm.scans(ri)).count())
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
                    if vm.scans(ri) && r.pages() > lo {
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
    pub(super) fn add_merge(&mut self, out: &merge::MergeOutcome, nanos: u64) {
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
                if !vm.scans(r) || p >= regions[r].pages() {
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
pub(super) fn residency(vms: &[Arc<VmEntry>], refs: &[PageRef]) -> Vec<bool> {
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
pub(super) fn follows(a: PageRef, b: PageRef) -> bool {
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
pub(super) fn template_len(members: &[(DomainId, Hashed)]) -> usize {
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

/// A page hashed this pass.
#[derive(Clone, Copy)]
pub(super) struct Hashed {
    pub(super) at: PageRef,
    pub(super) state: PageState,
    pub(super) hash: u64,
    pub(super) zero: bool,
}
