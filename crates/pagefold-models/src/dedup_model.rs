//! A byte-array model of deduplication: N VMs on one frame store, each a few
//! regions of a few pages, registered with one `DedupHost` in one or two
//! merge domains (maybe with an excluded region), driven by random sequences
//! of guest writes (library, atomics, raw host pointers), reads, merges,
//! incremental scan steps, unmerges, write-fault resolutions and
//! unregister/re-register. `tests/dedup_proptest.rs` and the fuzz target
//! `fuzz/fuzz_targets/dedup_ops.rs` run the same
//! scenarios against the real host and this model.
//!
//! The model keeps every byte of every VM, and how each page is backed as
//! dedup leaves it: its own frame, a copy-on-write view of a shared frame,
//! released zeros, or an anonymous copy the kernel made on a write. It
//! follows the scanner's documented rules exactly (keyed hashes are modelled
//! by content equality: a collision among a few dozen pages is not a
//! concern), so it predicts every page state, every scan report, every
//! statistic. After each operation the harness demands:
//!
//! * every byte of every VM equals the model (dedup never changes a byte);
//! * every page-state word says what the model says (kind, `REMAPPED`, never
//!   `LOCKED` or `WRITE_PROTECTED` between operations, the page's own frame
//!   unless it maps a shared one), and model shared frames map one-to-one
//!   onto real frame numbers;
//! * no shared frame is mapped by pages of two domains, excluded regions
//!   never hold a page dedup touched;
//! * the memfd holds exactly one page per page on its own frame plus one
//!   per shared frame (`FrameStore::allocated_bytes`, the kernel's count; the
//!   full byte check reads every page first, which allocates shmem holes);
//! * with statistics (after every operation, or at `Stats` operations and at
//!   the end): `stats()` and `vm_stats()` equal the model, and
//!   `pages_sharing + pages_shared` equals the pages in `Shared` state.
//!
//! Each `merge_now` must also free, by the kernel's count, at least one page
//! per page it takes off its own frame minus the shared frames it creates,
//! and leave nothing mergeable behind (no zero page, no two equal private
//! pages of one domain, no private page equal to a shared frame of its
//! domain).
//!
//! Left out on purpose: `GuestMemory::discard` (on a merged or copied page it
//! neither zeroes the page nor frees anything; pinned by failing tests in
//! `dedup_proptest.rs`), time budgets and the background scanner (how many
//! pages they visit depends on the clock).
// Every size here is tiny (at most 4 VMs x 3 regions x 8 pages), so casts
// between page counts and integer widths cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    sync::{atomic::Ordering, Arc},
};

use pagefold::{
    dedup::{ScanReport, VmStats},
    AccessError, DedupError, DedupHost, DedupStats, DomainId, FrameNumber, FrameStore, GuestMemory,
    GuestPhysAddr, PageKind, ScanBudget, VmId, VmOptions,
};

/// Bytes per page.
pub const PAGE: usize = 4096;
/// VMs per scenario.
pub const MIN_VMS: usize = 2;
/// VMs per scenario.
pub const MAX_VMS: usize = 4;
/// Regions per VM.
pub const MAX_REGIONS: usize = 3;
/// Pages per region.
pub const MAX_PAGES: usize = 8;
/// Merge domains.
pub const DOMAINS: u8 = 2;
/// Longest library access: crosses up to three pages (and regions).
pub const MAX_LEN: usize = 2 * PAGE + 64;
/// Palette entries (see [`palette`]).
pub const PALETTE: u8 = 6;
/// The scanner's batch size (`scan_step` hands at most this many pages to
/// one pass of hashing and grouping).
const BATCH: u64 = 4096;

/// Whole-page contents, few enough that duplicates and zero pages are
/// common: 0 zeros, 1 and 2 one byte repeated, 3 and 5 a pattern, 4 zeros
/// but for the last byte (so "zero" is decided by every byte).
pub fn palette(k: u8) -> Vec<u8> {
    match k % PALETTE {
        0 => vec![0; PAGE],
        1 => vec![0x11; PAGE],
        2 => vec![0x22; PAGE],
        3 => pattern(0x33, PAGE),
        4 => {
            let mut p = vec![0; PAGE];
            p[PAGE - 1] = 1;
            p
        }
        _ => pattern(0x55, PAGE),
    }
}

/// `len` bytes that differ per seed and are never zero.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[1] | 1
        })
        .collect()
}

/// One region: `gap` pages after the previous region's end (0: adjacent,
/// so accesses can span both), one palette entry per page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Pages between this region and the previous one (or address 0).
    pub gap: u8,
    /// Initial content of each page, as palette indices (1 to 8 pages).
    pub init: Vec<u8>,
}

/// One VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// 1 to 3 regions, in address order.
    pub regions: Vec<RegionSpec>,
    /// Merge domain (modulo [`DOMAINS`]).
    pub domain: u8,
}

/// A guest-physical address relative to a VM's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr {
    /// Region (modulo the VM's region count).
    pub region: u8,
    /// Page in the region (modulo its pages).
    pub page: u8,
    /// Offset in the page (or, for mode 6, below the region's end).
    pub offset: u16,
    /// 0-4: inside the page; 5: the page's start; 6: just below the region's
    /// end (accesses run into the next region or a hole); 7: past every
    /// region (unmapped).
    pub mode: u8,
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq)]
// Each variant says which call it makes; its fields are that call's
// arguments, named as there.
#[allow(missing_docs)]
pub enum DedupOp {
    /// `GuestMemory::write` of a pattern; may span pages and regions or
    /// run into a hole.
    Write {
        vm: u8,
        at: Addr,
        len: u16,
        seed: u8,
    },
    /// A whole palette page written at a page boundary (makes duplicates).
    WritePage { vm: u8, at: Addr, palette: u8 },
    /// `GuestMemory::fill` with zeros (even `byte`) or `byte`.
    Fill {
        vm: u8,
        at: Addr,
        byte: u8,
        len: u16,
    },
    /// `write_obj` of a 1, 2, 4 or 8-byte integer at any alignment.
    WriteObj {
        vm: u8,
        at: Addr,
        width: u8,
        val: u64,
    },
    /// Atomic `store` (the address aligned down to the width).
    Store {
        vm: u8,
        at: Addr,
        width: u8,
        val: u64,
    },
    /// A raw write through `host_address`, as a vCPU would, clipped to the
    /// page.
    HostWrite {
        vm: u8,
        at: Addr,
        len: u16,
        seed: u8,
    },
    /// `GuestMemory::read`, compared.
    Read { vm: u8, at: Addr, len: u16 },
    /// A raw read through `host_address`, clipped to the page, compared.
    HostRead { vm: u8, at: Addr, len: u16 },
    /// `DedupHost::merge_now`.
    MergeNow,
    /// `DedupHost::scan_step(ScanBudget::Pages(pages))`, `1 + repeat % 32`
    /// times (small steps in a row make full passes of several batches,
    /// where the unstable tree matters).
    ScanStep { pages: u16, repeat: u8 },
    /// `DedupHost::unmerge_all`.
    UnmergeAll,
    /// `DedupHost::resolve_write_fault` (unmapped addresses included).
    ResolveFault { vm: u8, at: Addr },
    /// Unregister the VM if registered, else register it (in `domain`).
    Toggle { vm: u8, domain: u8 },
    /// Register the VM (in `domain`): refused with `AlreadyRegistered` if it
    /// is, or with `NoSuchRegion` if `bad_exclude` adds an excluded address
    /// that starts no region.
    Register {
        vm: u8,
        domain: u8,
        bad_exclude: bool,
    },
    /// `vm_stats` of every VM, then `stats`, compared with the model.
    Stats,
}

/// A whole scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// 2 to 4 VMs (more are ignored).
    pub vms: Vec<VmSpec>,
    /// `(vm, region)`, each modulo the count: a region registered as excluded.
    pub exclude: Option<(u8, u8)>,
    /// Check statistics (which reconciles) after every operation, rather
    /// than at `Stats` operations and at the end only.
    pub stats_every_op: bool,
    /// The operations.
    pub ops: Vec<DedupOp>,
}

/// Integer width of `WriteObj` and `Store`.
fn width(w: u8) -> usize {
    1 << (w % 4)
}

// ---------------------------------------------------------------------------
// The model.

/// How a page is backed, as dedup left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Back {
    /// Its own frame (`Private`, no flags).
    Own,
    /// An anonymous copy the kernel made on a write to a merged page, noticed
    /// by reconciliation (`Private | REMAPPED`).
    Anon,
    /// Released zeros (`Zero | REMAPPED`); `written` once anything wrote it
    /// (the kernel then holds an anonymous copy reconciliation will notice).
    Zero { written: bool },
    /// A copy-on-write view of model frame `frame` (`Shared | REMAPPED`).
    Shared { frame: u64, written: bool },
}

impl Back {
    fn is_private(self) -> bool {
        matches!(self, Back::Own | Back::Anon)
    }

    fn remapped(self) -> bool {
        self != Back::Own
    }

    fn written(self) -> Self {
        match self {
            Back::Zero { .. } => Back::Zero { written: true },
            Back::Shared { frame, .. } => Back::Shared {
                frame,
                written: true,
            },
            b => b,
        }
    }
}

#[derive(Clone, Debug)]
struct MRegion {
    start: u64,
    bytes: Vec<u8>,
    back: Vec<Back>,
    /// Whether the page's own frame holds memory (written, or read through
    /// the mapping, which makes shmem allocate it); an unmerge that finds a
    /// page all zeros punches it. Only pages that hold memory are scanned.
    resident: Vec<bool>,
    excluded: bool,
}

impl MRegion {
    fn pages(&self) -> usize {
        self.back.len()
    }

    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    fn page(&self, p: usize) -> &[u8] {
        &self.bytes[p * PAGE..(p + 1) * PAGE]
    }
}

/// A VM's registration.
#[derive(Clone, Debug)]
struct Reg {
    id: VmId,
    domain: u32,
    cow_breaks: u64,
    /// Content of each page at its last hashing (`None`: never hashed, the
    /// real table's initial 0).
    old: Vec<Vec<Option<Vec<u8>>>>,
}

#[derive(Clone, Debug)]
struct MVm {
    regions: Vec<MRegion>,
    reg: Option<Reg>,
    /// The id of the current or the last registration.
    last_id: VmId,
}

#[derive(Clone, Debug)]
struct MFrame {
    domain: u32,
    /// The content it is indexed under.
    key: Vec<u8>,
    /// The content it holds.
    bytes: Vec<u8>,
    refs: u64,
}

/// A page: (position in the host's VM list, region, page).
type At = (usize, usize, usize);
/// Candidates of a batch without a partner yet, by domain and content.
type Rest = BTreeMap<(u32, Vec<u8>), Vec<(At, Back)>>;
/// Merge candidates by (VM position, region): (page, state when hashed,
/// target), in the order they were listed.
type ByRegion = BTreeMap<(usize, usize), Vec<(usize, Back, Target)>>;

/// What a merge or scan reported, in the fields the model predicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Report {
    scanned: u64,
    hashed: u64,
    merged_shared: u64,
    merged_zero: u64,
    volatile: u64,
    changed: u64,
    busy: u64,
    map_limit: u64,
    full: bool,
}

impl Report {
    fn of(r: &ScanReport) -> Self {
        Report {
            scanned: r.pages_scanned,
            hashed: r.pages_hashed,
            merged_shared: r.merged_shared,
            merged_zero: r.merged_zero,
            volatile: r.volatile,
            changed: r.changed,
            busy: r.busy,
            map_limit: r.map_limit,
            full: r.full_scan_completed,
        }
    }

    fn add(&mut self, o: Report) {
        self.scanned += o.scanned;
        self.hashed += o.hashed;
        self.merged_shared += o.merged_shared;
        self.merged_zero += o.merged_zero;
        self.volatile += o.volatile;
        self.changed += o.changed;
        self.full |= o.full;
    }
}

/// The merge target of a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Zero,
    Frame(u64),
}

/// The model of a dedup host and its VMs.
#[derive(Clone, Debug)]
struct Model {
    vms: Vec<MVm>,
    /// Registered VMs (indices into `vms`) in the host's order.
    order: Vec<usize>,
    frames: BTreeMap<u64, MFrame>,
    /// (domain, key) -> frames, in insertion order.
    index: HashMap<(u32, Vec<u8>), Vec<u64>>,
    next_frame: u64,
    /// KSM's unstable tree: (domain, content when seen) -> (VM, region, page).
    unstable: HashMap<(u32, Vec<u8>), (VmId, usize, usize)>,
    cursor: At,
    volatile_this: u64,
    volatile_last: u64,
    full_scans: u64,
    cow_breaks: u64,
    /// Whether this process sees page frame numbers in `/proc/self/pagemap`
    /// (root). Without them the host decides "did the kernel copy this
    /// page" by content, and a copy that is all zeros goes unnoticed.
    pfns_visible: bool,
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl Model {
    fn vm_at(&self, at: At) -> usize {
        self.order[at.0]
    }

    fn region(&self, at: At) -> &MRegion {
        &self.vms[self.vm_at(at)].regions[at.1]
    }

    fn back(&self, at: At) -> Back {
        self.region(at).back[at.2]
    }

    fn set_back(&mut self, at: At, b: Back) {
        let vm = self.vm_at(at);
        self.vms[vm].regions[at.1].back[at.2] = b;
    }

    fn content(&self, at: At) -> Vec<u8> {
        self.region(at).page(at.2).to_vec()
    }

    fn domain_of(&self, vm: usize) -> u32 {
        self.vms[vm].reg.as_ref().map_or(u32::MAX, |r| r.domain)
    }

    /// The chunks `[addr, addr+len)` covers in VM `vm`, or the error.
    fn span(
        &self,
        vm: usize,
        addr: u64,
        len: usize,
    ) -> Result<Vec<(usize, usize, usize)>, AccessError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = addr.checked_add(len as u64).ok_or(AccessError::Overflow {
            addr: GuestPhysAddr(addr),
            len,
        })?;
        let regions = &self.vms[vm].regions;
        let mut out = Vec::new();
        let mut cur = addr;
        while cur < end {
            let i = regions
                .iter()
                .position(|r| r.start <= cur && cur < r.end())
                .ok_or(AccessError::Unmapped {
                    addr: GuestPhysAddr(cur),
                })?;
            let r = &regions[i];
            let n = end.min(r.end()) - cur;
            out.push((i, (cur - r.start) as usize, n as usize));
            cur += n;
        }
        Ok(out)
    }

    fn get(&self, vm: usize, chunks: &[(usize, usize, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(r, off, n) in chunks {
            out.extend_from_slice(&self.vms[vm].regions[r].bytes[off..off + n]);
        }
        out
    }

    /// A write landed: bytes change, and every page it touched that maps
    /// something copy-on-write now holds the kernel's copy.
    fn put(&mut self, vm: usize, chunks: &[(usize, usize, usize)], data: &[u8]) {
        let mut done = 0;
        for &(r, off, n) in chunks {
            let region = &mut self.vms[vm].regions[r];
            region.bytes[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
            for p in off / PAGE..=(off + n - 1) / PAGE {
                region.back[p] = region.back[p].written();
                region.resident[p] = true;
            }
        }
    }

    /// Every page on its own frame holds memory (all were read).
    fn touch_all(&mut self) {
        for vm in &mut self.vms {
            for r in &mut vm.regions {
                for (res, b) in r.resident.iter_mut().zip(&r.back) {
                    if *b == Back::Own {
                        *res = true;
                    }
                }
            }
        }
    }

    /// A read through the mapping: a page's own frame then holds memory.
    fn touch(&mut self, vm: usize, chunks: &[(usize, usize, usize)]) {
        for &(r, off, n) in chunks {
            let region = &mut self.vms[vm].regions[r];
            for p in off / PAGE..=(off + n - 1) / PAGE {
                if region.back[p] == Back::Own {
                    region.resident[p] = true;
                }
            }
        }
    }

    fn drop_ref(&mut self, frame: u64) {
        if let Some(f) = self.frames.get_mut(&frame) {
            f.refs = f.refs.saturating_sub(1);
            if f.refs == 0 {
                self.remove_frame(frame);
            }
        }
    }

    fn remove_frame(&mut self, frame: u64) {
        if let Some(f) = self.frames.remove(&frame) {
            let key = (f.domain, f.key);
            if let Some(v) = self.index.get_mut(&key) {
                v.retain(|x| *x != frame);
                if v.is_empty() {
                    self.index.remove(&key);
                }
            }
        }
    }

    /// Frames indexed under a content they do not hold.
    fn stale_frames(&self) -> usize {
        self.frames.values().filter(|f| f.key != f.bytes).count()
    }

    /// Moves pages the kernel copied to `Anon` (in VMs `vms`).
    fn reconcile(&mut self, vms: &[usize]) {
        for &v in vms {
            for r in 0..self.vms[v].regions.len() {
                for p in 0..self.vms[v].regions[r].pages() {
                    let region = &self.vms[v].regions[r];
                    let (frame, written) = match region.back[p] {
                        Back::Zero { written } => (None, written),
                        Back::Shared { frame, written } => (Some(frame), written),
                        _ => continue,
                    };
                    if !written || (!self.pfns_visible && is_zero(region.page(p))) {
                        continue;
                    }
                    self.vms[v].regions[r].back[p] = Back::Anon;
                    self.cow_breaks += 1;
                    if let Some(reg) = self.vms[v].reg.as_mut() {
                        reg.cow_breaks += 1;
                    }
                    if let Some(f) = frame {
                        self.drop_ref(f);
                    }
                }
            }
        }
    }

    fn reconcile_all(&mut self) {
        let order = self.order.clone();
        self.reconcile(&order);
    }

    /// Unmerges pages `[first, first+count)` of VM `vm`, region `r`.
    fn unmerge(&mut self, vm: usize, r: usize, first: usize, count: usize) -> u64 {
        let mut n = 0;
        let end = (first + count).min(self.vms[vm].regions[r].pages());
        for p in first..end {
            let b = self.vms[vm].regions[r].back[p];
            if !b.remapped() {
                continue;
            }
            self.vms[vm].regions[r].back[p] = Back::Own;
            let zero = is_zero(self.vms[vm].regions[r].page(p));
            self.vms[vm].regions[r].resident[p] = !zero;
            if let Back::Shared { frame, .. } = b {
                self.drop_ref(frame);
            }
            n += 1;
        }
        n
    }

    fn unmerge_vm(&mut self, vm: usize) -> u64 {
        (0..self.vms[vm].regions.len())
            .map(|r| self.unmerge(vm, r, 0, MAX_PAGES))
            .sum()
    }

    /// Every included page of every registered VM, in scan order.
    fn all_pages(&self) -> Vec<At> {
        let mut out = Vec::new();
        for (v, &vm) in self.order.iter().enumerate() {
            for (r, region) in self.vms[vm].regions.iter().enumerate() {
                if !region.excluded {
                    out.extend((0..region.pages()).map(|p| (v, r, p)));
                }
            }
        }
        out
    }

    /// The scanner's cursor walk (`next_pages`).
    fn next_pages(&mut self, want: usize) -> (Vec<At>, bool) {
        let mut refs = Vec::new();
        let (mut v, mut r, mut p) = self.cursor;
        if v >= self.order.len() {
            // Past the last VM (unregistered): that pass is over.
            self.cursor = (0, 0, 0);
            return (refs, true);
        }
        let mut wrapped = false;
        loop {
            loop {
                let regions = &self.vms[self.order[v]].regions;
                if r < regions.len() {
                    if regions[r].excluded || p >= regions[r].pages() {
                        r += 1;
                        p = 0;
                        continue;
                    }
                    break;
                }
                v += 1;
                (r, p) = (0, 0);
                if v >= self.order.len() {
                    v = 0;
                    wrapped = true;
                    break;
                }
            }
            if wrapped || refs.len() >= want {
                break;
            }
            let pages = self.vms[self.order[v]].regions[r].pages();
            let n = (pages - p).min(want - refs.len());
            refs.extend((p..p + n).map(|page| (v, r, page)));
            p += n;
        }
        self.cursor = (v, r, p);
        (refs, wrapped)
    }

    /// Hash, group, compare and merge a batch (`Inner::process`).
    fn process(&mut self, refs: &[At], one_shot: bool) -> (Report, u64, u64) {
        let mut rep = Report {
            scanned: refs.len() as u64,
            ..Report::default()
        };
        // Only private pages that hold memory are candidates.
        let hashed: Vec<(At, Back, Vec<u8>)> = refs
            .iter()
            .filter(|&&at| self.back(at).is_private() && self.region(at).resident[at.2])
            .map(|&at| (at, self.back(at), self.content(at)))
            .collect();
        rep.hashed = hashed.len() as u64;
        // Volatility.
        let mut stable = Vec::new();
        for (at, b, content) in hashed {
            let vm = self.vm_at(at);
            let Some(reg) = self.vms[vm].reg.as_mut() else {
                continue;
            };
            let old = reg.old[at.1][at.2].replace(content.clone());
            if !one_shot && old.as_ref() != Some(&content) {
                rep.volatile += 1;
                self.volatile_this += 1;
                continue;
            }
            stable.push((at, b, content));
        }
        // Classify.
        let mut cands: Vec<(At, Back, Target)> = Vec::new();
        let mut rest = Rest::new();
        for (at, b, content) in stable {
            let d = self.domain_of(self.vm_at(at));
            if is_zero(&content) {
                cands.push((at, b, Target::Zero));
            } else if let Some(&f) = self
                .index
                .get(&(d, content.clone()))
                .and_then(|v| v.first())
            {
                cands.push((at, b, Target::Frame(f)));
            } else {
                rest.entry((d, content)).or_default().push((at, b));
            }
        }
        // Groups: equal contents in this batch, with the unstable tree's
        // page for their content if it has one (as KSM, which takes pages
        // one by one, would merge it with the first of them).
        type Group = (u32, Vec<u8>, Vec<(At, Back)>, Option<(At, Back)>);
        let mut groups: Vec<Group> = Vec::new();
        for ((d, key), members) in rest {
            if members.len() >= 2 {
                let extra = if one_shot {
                    None
                } else {
                    self.unstable
                        .remove(&(d, key.clone()))
                        .and_then(|e| self.unstable_page(e))
                        .filter(|e| !members.iter().any(|m| m.0 == e.0) && self.content(e.0) == key)
                };
                groups.push((d, key, members, extra));
            } else if !one_shot {
                let (at, _) = members[0];
                // Like the host: the earlier page counts only if it still
                // holds the content it was entered with; else this page
                // takes its place in the tree.
                let earlier = self
                    .unstable
                    .remove(&(d, key.clone()))
                    .and_then(|e| self.unstable_page(e))
                    .filter(|e| e.0 != at && self.content(e.0) == key);
                match earlier {
                    Some(e) => groups.push((d, key, members, Some(e))),
                    None => {
                        let id = self.vms[self.vm_at(at)]
                            .reg
                            .as_ref()
                            .map_or(VmId(0), |r| r.id);
                        self.unstable.insert((d, key), (id, at.1, at.2));
                    }
                }
            }
        }
        let canonical = |g: &Group| match g.3 {
            Some((e, _)) if e < g.2[0].0 => e,
            _ => g.2[0].0,
        };
        groups.sort_by_key(canonical);
        let new_frames = groups.len() as u64;
        for g in &groups {
            let id = self.next_frame;
            self.next_frame += 1;
            let bytes = self.content(canonical(g));
            self.frames.insert(
                id,
                MFrame {
                    domain: g.0,
                    key: g.1.clone(),
                    bytes,
                    refs: 0,
                },
            );
            self.index.entry((g.0, g.1.clone())).or_default().push(id);
            for &(at, b) in &g.2 {
                cands.push((at, b, Target::Frame(id)));
            }
            if let Some((at, b)) = g.3 {
                cands.push((at, b, Target::Frame(id)));
            }
        }
        // Merge, region by region, in page order; a page listed twice is
        // merged (or not) once, as listed first.
        let mut by_region = ByRegion::new();
        for (at, b, t) in cands {
            by_region
                .entry((at.0, at.1))
                .or_default()
                .push((at.2, b, t));
        }
        let mut own_merged = 0;
        for ((v, r), mut list) in by_region {
            list.sort_by_key(|c| c.0);
            list.dedup_by_key(|c| c.0);
            for (p, expected, target) in list {
                let at = (v, r, p);
                if self.back(at) != expected {
                    rep.busy += 1;
                    continue;
                }
                let content = self.content(at);
                let (equal, new) = match target {
                    Target::Zero => (is_zero(&content), Back::Zero { written: false }),
                    Target::Frame(f) => (
                        self.frames.get(&f).is_some_and(|fr| fr.bytes == content),
                        Back::Shared {
                            frame: f,
                            written: false,
                        },
                    ),
                };
                if !equal {
                    rep.changed += 1;
                    continue;
                }
                self.set_back(at, new);
                if expected == Back::Own {
                    own_merged += 1;
                }
                match target {
                    Target::Zero => rep.merged_zero += 1,
                    Target::Frame(f) => {
                        rep.merged_shared += 1;
                        if let Some(fr) = self.frames.get_mut(&f) {
                            fr.refs += 1;
                        }
                    }
                }
            }
        }
        let dead: Vec<u64> = self
            .frames
            .iter()
            .filter(|(_, f)| f.refs == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.remove_frame(id);
        }
        (rep, own_merged, new_frames)
    }

    /// The page an unstable-tree entry names, if it is still a candidate
    /// (the caller checks its content).
    fn unstable_page(&self, (id, r, p): (VmId, usize, usize)) -> Option<(At, Back)> {
        let v = self
            .order
            .iter()
            .position(|&vm| self.vms[vm].reg.as_ref().is_some_and(|g| g.id == id))?;
        let region = self.vms[self.order[v]].regions.get(r)?;
        let b = *region.back.get(p)?;
        (b.is_private() && *region.resident.get(p)?).then_some(((v, r, p), b))
    }

    /// `merge_now`: the report, pages taken off their own frame, shared
    /// frames created, and the stale frames after reconciling.
    fn merge_now(&mut self) -> (Report, u64, u64, usize) {
        self.reconcile_all();
        let stale = self.stale_frames();
        let refs = self.all_pages();
        let (mut rep, own, created) = self.process(&refs, true);
        self.unstable.clear();
        self.cursor = (0, 0, 0);
        self.volatile_last = rep.volatile;
        self.volatile_this = 0;
        self.full_scans += 1;
        rep.full = true;
        (rep, own, created, stale)
    }

    fn scan_step(&mut self, pages: u64) -> Report {
        let mut total = Report::default();
        let mut left = pages;
        while left > 0 && !self.order.is_empty() {
            let want = left.min(BATCH) as usize;
            let (refs, wrapped) = self.next_pages(want);
            left = left.saturating_sub(refs.len() as u64);
            let (r, _, _) = self.process(&refs, false);
            total.add(r);
            if wrapped {
                self.full_scans += 1;
                self.unstable.clear();
                self.volatile_last = std::mem::take(&mut self.volatile_this);
                self.reconcile_all();
                total.full = true;
            }
            if refs.is_empty() {
                // The walk wrapped without a page: nothing is included.
                break;
            }
        }
        total
    }

    fn register(&mut self, vm: usize, id: VmId, domain: u32) {
        let old = self.vms[vm]
            .regions
            .iter()
            .map(|r| vec![None; r.pages()])
            .collect();
        self.vms[vm].reg = Some(Reg {
            id,
            domain,
            cow_breaks: 0,
            old,
        });
        self.vms[vm].last_id = id;
        self.order.push(vm);
    }

    fn unregister(&mut self, vm: usize) {
        self.unmerge_vm(vm);
        if let Some(gone) = self.order.iter().position(|&v| v == vm) {
            if self.cursor.0 > gone {
                self.cursor.0 -= 1;
            } else if self.cursor.0 == gone {
                self.cursor = (gone, 0, 0);
            }
        }
        self.order.retain(|&v| v != vm);
        if let Some(reg) = self.vms[vm].reg.take() {
            self.unstable.retain(|_, e| e.0 != reg.id);
        }
    }

    fn stats(&mut self) -> DedupStats {
        self.reconcile_all();
        let refs: u64 = self.frames.values().map(|f| f.refs).sum();
        let mut s = DedupStats {
            pages_shared: self.frames.len() as u64,
            pages_sharing: refs - self.frames.len() as u64,
            pages_unshared: self.unstable.len() as u64,
            pages_volatile: self.volatile_last.max(self.volatile_this),
            full_scans: self.full_scans,
            cow_breaks: self.cow_breaks,
            ..DedupStats::default()
        };
        for &v in &self.order {
            for r in &self.vms[v].regions {
                s.pages_total += r.pages() as u64;
                s.zero_pages += r
                    .back
                    .iter()
                    .filter(|b| matches!(b, Back::Zero { .. }))
                    .count() as u64;
            }
        }
        s
    }

    fn vm_stats(&mut self, vm: usize) -> VmStats {
        self.reconcile(&[vm]);
        let backs = || self.vms[vm].regions.iter().flat_map(|r| r.back.iter());
        VmStats {
            pages: backs().count() as u64,
            pages_merged: backs().filter(|b| matches!(b, Back::Shared { .. })).count() as u64,
            zero_pages: backs().filter(|b| matches!(b, Back::Zero { .. })).count() as u64,
            cow_breaks: self.vms[vm].reg.as_ref().map_or(0, |r| r.cow_breaks),
        }
    }
}

// ---------------------------------------------------------------------------
// The harness: the real host next to the model.

/// Whether `/proc/self/pagemap` shows this process page frame numbers.
fn pfns_visible() -> bool {
    use std::os::unix::fs::FileExt;
    let page = vec![1u8; 2 * PAGE];
    let addr = page.as_ptr() as u64 / PAGE as u64 + 1;
    let mut entry = [0u8; 8];
    let ok = std::fs::File::open("/proc/self/pagemap")
        .and_then(|f| f.read_exact_at(&mut entry, addr * 8))
        .is_ok();
    ok && u64::from_le_bytes(entry) & ((1 << 55) - 1) != 0 && page[PAGE] == 1
}

/// Whether shmem may use transparent huge pages, which would make the
/// store's allocated blocks coarser than 4 KiB pages.
fn shmem_thp() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").is_ok_and(|s| {
        ["[always]", "[within_size]", "[force]"]
            .iter()
            .any(|m| s.contains(m))
    })
}

/// Runs a scenario; `Err` describes the first divergence, with the steps
/// that led to it. At the end the host is dropped, which must give every
/// page its own frame back.
pub fn run(s: &Scenario) -> Result<(), String> {
    run_with(s, |host| {
        drop(host);
        Ok(())
    })
}

/// [`run`], with `dispose` in place of dropping the host at the end: it must
/// leave every page on its own frame (`DedupHost::unmerge_all` does), and may
/// then drop the host elsewhere (a fuzzer does not want to wait for the
/// userfaultfd handler thread to notice it should stop).
pub fn run_with(
    s: &Scenario,
    dispose: impl FnOnce(DedupHost) -> Result<(), String>,
) -> Result<(), String> {
    let mut h = Harness::new(s)?;
    let mut log = String::new();
    let fail = |step: &str, e: String, log: &str| {
        format!("{step}: {e}\nsetup: {:?}\nresolved ops:\n{log}", s.vms)
    };
    h.check().map_err(|e| fail("after setup", e, &log))?;
    for (i, op) in s.ops.iter().enumerate() {
        let r = h.apply(op);
        let _ = writeln!(
            log,
            "  {i}: {}",
            r.as_ref()
                .map_or_else(|_| format!("{op:?} FAILED"), Clone::clone)
        );
        r.and_then(|_| h.check())
            .map(|()| {
                // `check` read every region through its mapping: every page
                // on its own frame holds memory now (shmem allocates holes
                // on a read).
                h.m.touch_all();
            })
            .and_then(|()| {
                if s.stats_every_op {
                    h.check_stats()
                } else {
                    Ok(())
                }
            })
            .map_err(|e| fail(&format!("step {i} ({op:?})"), e, &log))?;
    }
    h.finish(dispose).map_err(|e| fail("at the end", e, &log))
}

struct Harness {
    store: Arc<FrameStore>,
    host: Option<DedupHost>,
    mems: Vec<Arc<GuestMemory>>,
    m: Model,
    kernel_checks: bool,
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Harness {
    fn new(s: &Scenario) -> Result<Self, String> {
        let store = Arc::new(FrameStore::memfd().map_err(err("FrameStore::memfd"))?);
        let specs: Vec<&VmSpec> = s.vms.iter().take(MAX_VMS).collect();
        let mut vms = Vec::new();
        let mut mems = Vec::new();
        for (v, spec) in specs.iter().enumerate() {
            let mut at = 0u64;
            let mut regions = Vec::new();
            for (r, rs) in spec.regions.iter().take(MAX_REGIONS).enumerate() {
                at += u64::from(rs.gap % 4) * PAGE as u64;
                let init: Vec<u8> = if rs.init.is_empty() {
                    vec![0]
                } else {
                    rs.init.iter().take(MAX_PAGES).copied().collect()
                };
                let bytes: Vec<u8> = init.iter().flat_map(|&k| palette(k)).collect();
                let excluded = s.exclude.is_some_and(|(ev, er)| {
                    usize::from(ev) % specs.len() == v
                        && usize::from(er) % spec.regions.len().min(MAX_REGIONS) == r
                });
                let region = MRegion {
                    start: at,
                    back: vec![Back::Own; init.len()],
                    resident: vec![true; init.len()],
                    bytes,
                    excluded,
                };
                at = region.end();
                regions.push(region);
            }
            if regions.is_empty() {
                return Err("a VM with no regions".into());
            }
            let layout: Vec<(GuestPhysAddr, u64)> = regions
                .iter()
                .map(|r| (GuestPhysAddr(r.start), r.bytes.len() as u64))
                .collect();
            let mem = GuestMemory::with_store(Arc::clone(&store), &layout)
                .map_err(err("GuestMemory::with_store"))?;
            for r in &regions {
                mem.write(GuestPhysAddr(r.start), &r.bytes)
                    .map_err(err("initial write"))?;
            }
            mems.push(Arc::new(mem));
            vms.push(MVm {
                regions,
                reg: None,
                last_id: VmId(0),
            });
        }
        let host = DedupHost::new(Arc::clone(&store)).map_err(err("DedupHost::new"))?;
        let m = Model {
            vms,
            order: Vec::new(),
            frames: BTreeMap::new(),
            index: HashMap::new(),
            next_frame: 0,
            unstable: HashMap::new(),
            cursor: (0, 0, 0),
            volatile_this: 0,
            volatile_last: 0,
            full_scans: 0,
            cow_breaks: 0,
            pfns_visible: pfns_visible(),
        };
        let mut h = Harness {
            store,
            host: None,
            mems,
            m,
            kernel_checks: !shmem_thp(),
        };
        for (v, spec) in specs.iter().enumerate() {
            let domain = u32::from(spec.domain % DOMAINS);
            let id = host
                .register(Arc::clone(&h.mems[v]), h.options(v, domain))
                .map_err(err("register"))?;
            h.m.register(v, id, domain);
        }
        h.host = Some(host);
        Ok(h)
    }

    fn host(&self) -> Result<&DedupHost, String> {
        self.host.as_ref().ok_or_else(|| "no host".to_string())
    }

    fn options(&self, vm: usize, domain: u32) -> VmOptions {
        VmOptions {
            domain: DomainId(domain),
            exclude: self.m.vms[vm]
                .regions
                .iter()
                .filter(|r| r.excluded)
                .map(|r| GuestPhysAddr(r.start))
                .collect(),
        }
    }

    fn vm(&self, v: u8) -> usize {
        usize::from(v) % self.mems.len()
    }

    fn addr(&self, vm: usize, a: Addr) -> u64 {
        let regions = &self.m.vms[vm].regions;
        let r = &regions[usize::from(a.region) % regions.len()];
        let page = (usize::from(a.page) % r.pages()) as u64;
        let offset = u64::from(a.offset) % PAGE as u64;
        match a.mode % 8 {
            0..=4 => r.start + page * PAGE as u64 + offset,
            5 => r.start + page * PAGE as u64,
            6 => r.end() - 1 - offset % 16,
            _ => regions[regions.len() - 1].end() + (1 + offset % 4) * PAGE as u64,
        }
    }

    /// A library write: the model's span decides success; the pages it
    /// touches hold the kernel's copy afterwards.
    fn library_write(
        &mut self,
        vm: usize,
        addr: u64,
        data: &[u8],
        act: Result<(), AccessError>,
    ) -> Result<(), String> {
        match (self.m.span(vm, addr, data.len()), act) {
            (Ok(chunks), Ok(())) => {
                self.m.put(vm, &chunks, data);
                Ok(())
            }
            (Err(e), Err(a)) if e == a => Ok(()),
            (e, a) => Err(format!("expected {:?}, got {a:?}", e.map(|_| ()))),
        }
    }

    /// The host pointer for a raw access at `addr` and its length clipped to
    /// the page, `None` where `host_address` rightly refused.
    fn host_target(
        &self,
        vm: usize,
        addr: u64,
        len: usize,
    ) -> Result<Option<(*mut u8, usize)>, String> {
        let mem = &self.mems[vm];
        let expected = self.m.span(vm, addr, 1);
        match (expected, mem.host_address(GuestPhysAddr(addr))) {
            (Ok(c), Ok(h)) => {
                let base = mem.regions()[c[0].0].host_addr().0;
                if h.0 != base + c[0].1 as u64 {
                    return Err(format!(
                        "host_address({addr:#x}) = {h:?}, region base {base:#x}"
                    ));
                }
                let n = len.min(PAGE - (addr as usize % PAGE));
                Ok(Some((h.0 as *mut u8, n)))
            }
            (Err(e), Err(a)) if e == a => Ok(None),
            (e, a) => Err(format!(
                "host_address({addr:#x}): expected {e:?}, got {a:?}"
            )),
        }
    }

    /// Applies one operation to the host and the model; returns it resolved.
    fn apply(&mut self, op: &DedupOp) -> Result<String, String> {
        let g = GuestPhysAddr;
        match *op {
            DedupOp::Write { vm, at, len, seed } => {
                let vm = self.vm(vm);
                let addr = self.addr(vm, at);
                let data = pattern(seed, 1 + usize::from(len) % MAX_LEN);
                let act = self.mems[vm].write(g(addr), &data);
                self.library_write(vm, addr, &data, act)?;
                Ok(format!(
                    "vm{vm}.write({addr:#x}, {} bytes, seed {seed})",
                    data.len()
                ))
            }
            DedupOp::WritePage { vm, at, palette: k } => {
                let vm = self.vm(vm);
                let addr = self.addr(vm, at) & !(PAGE as u64 - 1);
                let data = palette(k);
                let act = self.mems[vm].write(g(addr), &data);
                self.library_write(vm, addr, &data, act)?;
                Ok(format!("vm{vm}.write({addr:#x}, palette {})", k % PALETTE))
            }
            DedupOp::Fill { vm, at, byte, len } => {
                let vm = self.vm(vm);
                let addr = self.addr(vm, at);
                let byte = if byte % 2 == 0 { 0 } else { byte };
                let len = 1 + usize::from(len) % MAX_LEN;
                let act = self.mems[vm].fill(g(addr), byte, len);
                self.library_write(vm, addr, &vec![byte; len], act)?;
                Ok(format!("vm{vm}.fill({addr:#x}, {byte:#x}, {len})"))
            }
            DedupOp::WriteObj {
                vm,
                at,
                width: w,
                val,
            } => {
                let vm = self.vm(vm);
                let addr = self.addr(vm, at);
                let mem = &self.mems[vm];
                let n = width(w);
                let act = match n {
                    1 => mem.write_obj(g(addr), val as u8),
                    2 => mem.write_obj(g(addr), val as u16),
                    4 => mem.write_obj(g(addr), val as u32),
                    _ => mem.write_obj(g(addr), val),
                };
                self.library_write(vm, addr, &val.to_le_bytes()[..n], act)?;
                Ok(format!(
                    "vm{vm}.write_obj::<u{}>({addr:#x}, {val:#x})",
                    8 * n
                ))
            }
            DedupOp::Store {
                vm,
                at,
                width: w,
                val,
            } => {
                let vm = self.vm(vm);
                let n = width(w);
                let addr = self.addr(vm, at) & !(n as u64 - 1);
                let mem = &self.mems[vm];
                let o = Ordering::SeqCst;
                let act = match n {
                    1 => mem.store(g(addr), val as u8, o),
                    2 => mem.store(g(addr), val as u16, o),
                    4 => mem.store(g(addr), val as u32, o),
                    _ => mem.store(g(addr), val, o),
                };
                // An aligned atomic never leaves its region: the model's span
                // and the atomic rules agree here.
                self.library_write(vm, addr, &val.to_le_bytes()[..n], act)?;
                Ok(format!("vm{vm}.store::<u{}>({addr:#x}, {val:#x})", 8 * n))
            }
            DedupOp::HostWrite { vm, at, len, seed } => {
                let vm = self.vm(vm);
                let addr = self.addr(vm, at);
                let data = pattern(seed, 1 + usize::from(len) % PAGE);
                if let Some((ptr, n)) = self.host_target(vm, addr, data.len())? {
                    // `host_target` clipped `ptr..ptr+n` to one live page.
                    // SAFETY: in bounds; `data` is a separate buffer; no Rust
                    // reference into guest memory exists.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, n) };
                    let chunks = self.m.span(vm, addr, n).map_err(|e| e.to_string())?;
                    self.m.put(vm, &chunks, &data[..n]);
                }
                Ok(format!(
                    "vm{vm} raw write at {addr:#x}, {} bytes",
                    data.len()
                ))
            }
            DedupOp::Read { vm, at, len } => {
                let vm = self.vm(vm);
                let addr = self.addr(vm, at);
                let len = 1 + usize::from(len) % MAX_LEN;
                let mut buf = vec![0xa5; len];
                let act = self.mems[vm].read(g(addr), &mut buf).map(|()| buf);
                let exp = self.m.span(vm, addr, len).map(|c| self.m.get(vm, &c));
                if let Ok(c) = self.m.span(vm, addr, len) {
                    self.m.touch(vm, &c);
                }
                if exp != act {
                    return Err(format!("read({addr:#x}, {len}) differs from the model"));
                }
                Ok(format!("vm{vm}.read({addr:#x}, {len})"))
            }
            DedupOp::HostRead { vm, at, len } => {
                let vm = self.vm(vm);
                let addr = self.addr(vm, at);
                if let Some((ptr, n)) = self.host_target(vm, addr, 1 + usize::from(len) % PAGE)? {
                    let mut buf = vec![0u8; n];
                    // SAFETY: as for the raw write, reading instead.
                    unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), n) };
                    let chunks = self.m.span(vm, addr, n).map_err(|e| e.to_string())?;
                    self.m.touch(vm, &chunks);
                    if buf != self.m.get(vm, &chunks) {
                        return Err(format!("raw read at {addr:#x}+{n} differs from the model"));
                    }
                }
                Ok(format!("vm{vm} raw read at {addr:#x}"))
            }
            DedupOp::MergeNow => self.merge_now(),
            DedupOp::ScanStep { pages, repeat } => {
                let pages = u64::from(pages);
                let mut reports = Vec::new();
                for _ in 0..1 + repeat % 32 {
                    let got = self
                        .host()?
                        .scan_step(ScanBudget::Pages(pages))
                        .map_err(err("scan_step"))?;
                    let want = self.m.scan_step(pages);
                    if Report::of(&got) != want {
                        return Err(format!(
                            "scan_step report {:?}, model {want:?} (after {reports:?})",
                            Report::of(&got)
                        ));
                    }
                    reports.push(want);
                }
                Ok(format!(
                    "scan_step(Pages({pages})) x{} -> {reports:?}",
                    reports.len()
                ))
            }
            DedupOp::UnmergeAll => {
                let got = self.host()?.unmerge_all().map_err(err("unmerge_all"))?;
                let order = self.m.order.clone();
                let want: u64 = order.iter().map(|&v| self.m.unmerge_vm(v)).sum();
                if got != want {
                    return Err(format!("unmerge_all restored {got} pages, model {want}"));
                }
                Ok(format!("unmerge_all -> {got}"))
            }
            DedupOp::ResolveFault { vm, at } => {
                let vm = self.vm(vm);
                let addr = self.addr(vm, at);
                let id = self.m.vms[vm].last_id;
                let got = self.host()?.resolve_write_fault(id, g(addr));
                let registered = self.m.vms[vm].reg.is_some();
                let want = self.m.span(vm, addr, 1).ok().map(|c| c[0]);
                match (registered, want, got) {
                    (false, _, Err(DedupError::UnknownVm(x))) if x == id => {}
                    (true, None, Err(DedupError::Unmapped(x))) if x == g(addr) => {}
                    (true, Some((r, off, _)), Ok(merged)) => {
                        let p = off / PAGE;
                        let b = self.m.vms[vm].regions[r].back[p];
                        // A page the kernel already copied (reconciled to
                        // `Anon`) goes back to its own frame, but shared
                        // nothing: no COW break, and "not merged".
                        let was = matches!(b, Back::Zero { .. } | Back::Shared { .. });
                        if merged != was {
                            return Err(format!(
                                "resolve_write_fault({addr:#x}) = {merged}, model {was}"
                            ));
                        }
                        if b.remapped() {
                            self.m.unmerge(vm, r, p, 1);
                        }
                        if was {
                            self.m.cow_breaks += 1;
                            if let Some(reg) = self.m.vms[vm].reg.as_mut() {
                                reg.cow_breaks += 1;
                            }
                        }
                    }
                    (reg, want, got) => {
                        return Err(format!(
                            "resolve_write_fault(vm{vm}, {addr:#x}): registered {reg}, \
                             model region {want:?}, got {got:?}"
                        ))
                    }
                }
                Ok(format!("vm{vm}.resolve_write_fault({addr:#x})"))
            }
            DedupOp::Toggle { vm, domain } => {
                let vm = self.vm(vm);
                if let Some(reg) = self.m.vms[vm].reg.as_ref() {
                    let id = reg.id;
                    let mem = self.host()?.unregister(id).map_err(err("unregister"))?;
                    if !Arc::ptr_eq(&mem, &self.mems[vm]) {
                        return Err("unregister returned another VM's memory".into());
                    }
                    self.m.unregister(vm);
                    Ok(format!("unregister vm{vm} ({id:?})"))
                } else {
                    let domain = u32::from(domain % DOMAINS);
                    let opts = self.options(vm, domain);
                    let id = self
                        .host()?
                        .register(Arc::clone(&self.mems[vm]), opts)
                        .map_err(err("register"))?;
                    self.m.register(vm, id, domain);
                    Ok(format!("register vm{vm} in domain {domain} ({id:?})"))
                }
            }
            DedupOp::Register {
                vm,
                domain,
                bad_exclude,
            } => {
                let vm = self.vm(vm);
                let domain = u32::from(domain % DOMAINS);
                let mut opts = self.options(vm, domain);
                // Inside the first region (or past every region when it has
                // one page): never a region start.
                let first = &self.m.vms[vm].regions[0];
                let bad = GuestPhysAddr(if first.pages() > 1 {
                    first.start + PAGE as u64
                } else {
                    self.addr(
                        vm,
                        Addr {
                            region: 0,
                            page: 0,
                            offset: 0,
                            mode: 7,
                        },
                    )
                });
                if bad_exclude {
                    opts.exclude.push(bad);
                }
                let registered = self.m.vms[vm].reg.is_some();
                let got = self.host()?.register(Arc::clone(&self.mems[vm]), opts);
                match got {
                    Err(DedupError::NoSuchRegion(a)) if bad_exclude && a == bad => {}
                    Err(DedupError::AlreadyRegistered) if registered && !bad_exclude => {}
                    Ok(id) if !registered && !bad_exclude => self.m.register(vm, id, domain),
                    got => {
                        return Err(format!(
                            "register(vm{vm}): registered {registered}, bad exclude \
                             {bad_exclude}: got {got:?}"
                        ))
                    }
                }
                Ok(format!("register vm{vm} (bad exclude {bad_exclude})"))
            }
            DedupOp::Stats => {
                self.check_stats()?;
                Ok("stats".into())
            }
        }
    }

    fn merge_now(&mut self) -> Result<String, String> {
        let before = self
            .store
            .allocated_bytes()
            .map_err(err("allocated_bytes"))?;
        let got = self.host()?.merge_now().map_err(err("merge_now"))?;
        let after = self
            .store
            .allocated_bytes()
            .map_err(err("allocated_bytes"))?;
        let (want, own_merged, created, stale) = self.m.merge_now();
        if Report::of(&got) != want {
            return Err(format!(
                "merge_now report {:?}, model {want:?}",
                Report::of(&got)
            ));
        }
        // The kernel's figure. Every page merge_now takes off its own frame
        // held exactly one 4 KiB page of the memfd (the last full check read
        // every page, which allocates shmem holes) and loses it to the punch;
        // the only memfd pages it adds are its new shared frames. Frames
        // that reconciliation freed only make the drop larger. So no slack.
        let freed = i128::from(before) - i128::from(after);
        let at_least = (i128::from(own_merged) - i128::from(created)) * PAGE as i128;
        if self.kernel_checks && freed < at_least {
            return Err(format!(
                "merge_now took {own_merged} pages off their frames and made {created} shared \
                 frames, but the store shrank by only {freed} bytes ({before} -> {after})"
            ));
        }
        if stale == 0 {
            self.check_merged_everything()?;
        }
        Ok(format!("merge_now -> {want:?}, freed {freed} bytes"))
    }

    /// After `merge_now`, nothing mergeable is left: no private included page
    /// of a registered VM is zero, equals another one of its domain, or
    /// equals a shared page of its domain. (Checked on the real page states
    /// and the model's bytes, independently of the model's predictions.)
    fn check_merged_everything(&self) -> Result<(), String> {
        let mut seen: HashMap<(u32, &[u8]), (usize, u64)> = HashMap::new();
        let mut shared: HashSet<(u32, &[u8])> = HashSet::new();
        for &v in &self.m.order {
            let d = self.m.domain_of(v);
            for (mr, r) in self.m.vms[v].regions.iter().zip(self.mems[v].regions()) {
                for p in 0..mr.pages() {
                    if r.page_state(p).expect("page in region").kind() == PageKind::Shared {
                        shared.insert((d, mr.page(p)));
                    }
                }
            }
        }
        for &v in &self.m.order {
            let d = self.m.domain_of(v);
            for (mr, r) in self.m.vms[v].regions.iter().zip(self.mems[v].regions()) {
                if mr.excluded {
                    continue;
                }
                for p in 0..mr.pages() {
                    if r.page_state(p).expect("page in region").kind() != PageKind::Private {
                        continue;
                    }
                    let gpa = mr.start + (p * PAGE) as u64;
                    let bytes = mr.page(p);
                    if is_zero(bytes) {
                        return Err(format!("vm{v} page {gpa:#x} is zero but stayed private"));
                    }
                    if shared.contains(&(d, bytes)) {
                        return Err(format!(
                            "vm{v} page {gpa:#x} equals a shared page of its domain but stayed private"
                        ));
                    }
                    if let Some((w, other)) = seen.insert((d, bytes), (v, gpa)) {
                        return Err(format!(
                            "vm{v} page {gpa:#x} and vm{w} page {other:#x} are equal, in one \
                             domain, and both stayed private"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes, page states, domains, exclusions and the kernel's figure.
    fn check(&self) -> Result<(), String> {
        let mut frames: HashMap<u64, FrameNumber> = HashMap::new();
        let mut real: HashMap<FrameNumber, (u64, u32)> = HashMap::new();
        let mut own_pages = 0u64;
        for (v, (mv, mem)) in self.m.vms.iter().zip(&self.mems).enumerate() {
            let registered = mv.reg.is_some();
            if mem.regions().len() != mv.regions.len() {
                return Err(format!(
                    "vm{v}: {} regions, model {}",
                    mem.regions().len(),
                    mv.regions.len()
                ));
            }
            for (mr, r) in mv.regions.iter().zip(mem.regions()) {
                let mut buf = vec![0x5a; mr.bytes.len()];
                mem.read(GuestPhysAddr(mr.start), &mut buf)
                    .map_err(err("read of a whole region"))?;
                if buf != mr.bytes {
                    let i = buf
                        .iter()
                        .zip(&mr.bytes)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    return Err(format!(
                        "vm{v} byte at {:#x} is {:#04x}, model {:#04x} (page state {:?}, model {:?})",
                        mr.start + i as u64,
                        buf[i],
                        mr.bytes[i],
                        r.page_state(i / PAGE).expect("page in region"),
                        mr.back[i / PAGE]
                    ));
                }
                for p in 0..mr.pages() {
                    let s = r.page_state(p).expect("page in region");
                    let b = mr.back[p];
                    let gpa = mr.start + (p * PAGE) as u64;
                    let own = FrameNumber(r.frames().start.0 + p as u64);
                    let want_kind = match b {
                        Back::Own | Back::Anon => PageKind::Private,
                        Back::Zero { .. } => PageKind::Zero,
                        Back::Shared { .. } => PageKind::Shared,
                    };
                    if s.kind() != want_kind
                        || s.is_remapped() != b.remapped()
                        || s.is_locked()
                        || s.is_write_protected()
                    {
                        return Err(format!("vm{v} page {gpa:#x}: state {s:?}, model {b:?}"));
                    }
                    if mr.excluded && (s.is_remapped() || s.kind() == PageKind::Shared) {
                        return Err(format!("vm{v} page {gpa:#x} of an excluded region: {s:?}"));
                    }
                    match b {
                        Back::Shared { frame, .. } => {
                            if !registered {
                                return Err(format!(
                                    "unregistered vm{v} maps shared page {gpa:#x}"
                                ));
                            }
                            let d = self.m.domain_of(v);
                            let f = s.frame();
                            if *frames.entry(frame).or_insert(f) != f {
                                return Err(format!(
                                    "model frame {frame} is real frames {} and {}",
                                    frames[&frame].0, f.0
                                ));
                            }
                            let (mf, md) = *real.entry(f).or_insert((frame, d));
                            if mf != frame {
                                return Err(format!(
                                    "real frame {} is model frames {mf} and {frame}",
                                    f.0
                                ));
                            }
                            if md != d {
                                return Err(format!(
                                    "frame {} is shared by domains {md} and {d} (vm{v} page {gpa:#x})",
                                    f.0
                                ));
                            }
                        }
                        _ => {
                            if s.frame() != own {
                                return Err(format!(
                                    "vm{v} page {gpa:#x}: frame {}, own frame {}",
                                    s.frame().0,
                                    own.0
                                ));
                            }
                        }
                    }
                    if b == Back::Own {
                        own_pages += 1;
                    }
                }
            }
        }
        if frames.len() != self.m.frames.len() {
            return Err(format!(
                "{} shared frames are mapped, the model holds {}",
                frames.len(),
                self.m.frames.len()
            ));
        }
        if self.kernel_checks {
            // Exactly one memfd page per page on its own frame (every one was
            // just read, so none is a hole) and one per shared frame.
            let held = self
                .store
                .allocated_bytes()
                .map_err(err("allocated_bytes"))?;
            let want = (own_pages + real.len() as u64) * PAGE as u64;
            if held != want {
                return Err(format!(
                    "the store holds {held} bytes; {own_pages} pages on their own frames and {} \
                     shared frames make {want}",
                    real.len()
                ));
            }
        }
        Ok(())
    }

    /// `vm_stats` of every VM, then `stats`, against the model; and KSM's
    /// identity between the counters and the page states.
    fn check_stats(&mut self) -> Result<(), String> {
        for v in 0..self.mems.len() {
            let id = self.m.vms[v].last_id;
            let got = self.host()?.vm_stats(id);
            if self.m.vms[v].reg.is_none() {
                if !matches!(got, Err(DedupError::UnknownVm(x)) if x == id) {
                    return Err(format!("vm_stats of unregistered vm{v}: {got:?}"));
                }
                continue;
            }
            let got = got.map_err(err("vm_stats"))?;
            let want = self.m.vm_stats(v);
            if got != want {
                return Err(format!("vm{v} vm_stats {got:?}, model {want:?}"));
            }
        }
        let got = self.host()?.stats().map_err(err("stats"))?;
        // Bookkeeping is the library's own: the model checks only that the
        // profit is what was saved less it, and that some is counted for
        // every registered VM (its page-state table at least).
        let want = DedupStats {
            profit_bytes: got.profit_bytes,
            metadata_bytes: got.metadata_bytes,
            ..self.m.stats()
        };
        if got != want {
            return Err(format!("stats {got:?}\n  model {want:?}"));
        }
        let saved = (got.pages_sharing + got.zero_pages) * pagefold::PAGE_SIZE as u64;
        if i128::from(got.profit_bytes) != i128::from(saved) - i128::from(got.metadata_bytes)
            || (got.pages_total > 0 && got.metadata_bytes < got.pages_total * 8)
        {
            return Err(format!("profit and bookkeeping disagree: {got:?}"));
        }
        let shared: u64 = self
            .m
            .order
            .iter()
            .map(|&v| self.mems[v].census().shared)
            .sum();
        if got.pages_sharing + got.pages_shared != shared {
            return Err(format!(
                "pages_sharing {} + pages_shared {} != {shared} pages in Shared state",
                got.pages_sharing, got.pages_shared
            ));
        }
        Ok(())
    }

    /// Final checks, then dispose of the host: every page is back on its own
    /// frame with its bytes, and the store holds one page per guest page.
    fn finish(
        mut self,
        dispose: impl FnOnce(DedupHost) -> Result<(), String>,
    ) -> Result<(), String> {
        self.check()?;
        self.check_stats()?;
        if let Some(host) = self.host.take() {
            dispose(host)?;
        }
        let order = self.m.order.clone();
        for v in order {
            self.m.unregister(v);
        }
        if !self.m.frames.is_empty() {
            return Err(format!("model bug: frames left {:?}", self.m.frames.keys()));
        }
        self.check()
    }
}
