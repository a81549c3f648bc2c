//! Page deduplication: fold identical guest pages, across every VM registered
//! with a [`DedupHost`], into one copy-on-write frame, and give the memory of
//! the duplicates (and of zero pages) back to the host for real.
//!
//! Pipeline: scan -> hash (xxh3 keyed per merge domain) -> group by hash ->
//! compare bytes -> merge runs of pages (see [`merge`](self) for the
//! protocol). Pages are shared only within a domain. A write to a merged
//! page, through the library or a raw pointer or a KVM vCPU, is copied by the
//! kernel first: merged pages are private copy-on-write views of their shared
//! frame, and a shared frame is never mapped writable anywhere.
//!
//! Two modes: [`DedupHost::scan_step`] (incremental, with a budget, for a
//! background thread; a page must hash the same on two visits before it is
//! merged, KSM's volatility rule) and [`DedupHost::merge_now`] (one pass over
//! everything, volatility ignored: it is for the moments a VMM knows memory
//! is quiet, such as right after restoring N VMs from one snapshot; safety
//! never depends on the rule, since bytes are compared under write
//! protection before every merge).

mod handler;
mod key;
mod merge;
mod reconcile;
mod shared;
mod stats;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
    },
    time::{Duration, Instant},
};

use rayon::prelude::*;

pub use stats::{DedupStats, KernelView, ScanReport, VmStats};

use self::{
    key::DomainKey,
    merge::{Candidate, MergeCtx, Target},
    reconcile::PageMap,
    shared::SharedFrames,
};
use crate::{
    addr::{FrameNumber, GuestPhysAddr, PageSize, PAGE_SIZE},
    frames::{FrameError, FrameStore},
    memory::{
        page_state::{LOCKED, REMAPPED},
        GuestMemory, PageKind, PageState,
    },
    userfault::{Userfault, UserfaultError},
};

/// A merge domain (tenant). Pages of different domains are never shared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(pub u32);

/// A VM registered with a [`DedupHost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(pub u64);

/// Errors of the dedup layer.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// Write protection (userfaultfd) is unavailable or failed.
    #[error(transparent)]
    Userfault(#[from] UserfaultError),
    /// The frame store failed.
    #[error(transparent)]
    Frames(#[from] FrameError),
    /// The OS random source failed while creating a domain key.
    #[error("cannot create a domain key: {0}")]
    Random(String),
    /// The VM's memory lives in another frame store than the host's.
    #[error("the VM's guest memory uses another frame store than this dedup host")]
    ForeignStore,
    /// Dedup needs a 4 KiB-page frame store.
    #[error("dedup needs a frame store with 4 KiB pages, not {0}")]
    HugeBacking(PageSize),
    /// No such VM is registered.
    #[error("VM {0:?} is not registered with this dedup host")]
    UnknownVm(VmId),
    /// The address is not in the VM's memory.
    #[error("guest-physical address {0} is not backed by any region of the VM")]
    Unmapped(GuestPhysAddr),
    /// The page stayed locked by another operation for too long.
    #[error("page at {0} stayed busy; try again")]
    Busy(GuestPhysAddr),
    /// Reading the kernel's view of this process failed.
    #[error("reading {what}: {source}")]
    Proc {
        /// The file.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// How a VM takes part in deduplication.
#[derive(Clone, Debug, Default)]
pub struct VmOptions {
    /// Its merge domain.
    pub domain: DomainId,
    /// Start addresses of regions to leave alone (device memory, regions
    /// shared with another process through their fd).
    pub exclude: Vec<GuestPhysAddr>,
}

/// How much one [`DedupHost::scan_step`] may do.
#[derive(Clone, Copy, Debug)]
pub enum ScanBudget {
    /// Visit at most this many pages.
    Pages(u64),
    /// Stop starting new batches after this long.
    Time(Duration),
}

/// Options of a dedup host.
#[derive(Clone, Debug)]
pub struct DedupOptions {
    /// Kernel mappings (VMAs) to leave to the rest of the process: merging
    /// stops while fewer than this many are left below `vm.max_map_count`.
    pub map_headroom: u64,
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions { map_headroom: 4096 }
    }
}

struct VmEntry {
    id: VmId,
    mem: Arc<GuestMemory>,
    domain: DomainId,
    included: Vec<bool>,
    cow_breaks: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct PageRef {
    vm: u32,
    region: u32,
    page: u32,
}

impl PageRef {
    /// `None` past 2^32 VMs, regions or pages per region (16 TiB regions):
    /// such pages are not scanned.
    fn new(vm: usize, region: usize, page: usize) -> Option<Self> {
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

struct ScanState {
    keys: HashMap<DomainId, Arc<DomainKey>>,
    /// Hash of each page at its last visit, per VM and region.
    old_hashes: HashMap<VmId, Vec<Vec<u64>>>,
    /// Pages seen once this full scan with no match yet (KSM's unstable tree).
    unstable: HashMap<(DomainId, u64), (VmId, u32, u32)>,
    /// Where the incremental scan resumes: VM position, region, page.
    cursor: (usize, usize, usize),
    pagemap: PageMap,
    volatile_this_scan: u64,
    volatile_last_scan: u64,
}

struct Inner {
    store: Arc<FrameStore>,
    uffd: Arc<Userfault>,
    options: DedupOptions,
    vms: RwLock<Vec<Arc<VmEntry>>>,
    next_vm: AtomicU64,
    scan: Mutex<ScanState>,
    shared: Mutex<SharedFrames>,
    map_budget: AtomicU64,
    full_scans: AtomicU64,
    cow_breaks: AtomicU64,
    map_limit_hits: AtomicU64,
    faults_seen: AtomicU64,
}

/// The dedup engine for every VM of one frame store.
pub struct DedupHost {
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
    handler: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for DedupHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupHost")
            .field("vms", &read(&self.inner.vms).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent between
    // statements; a panic elsewhere cannot have left it half-changed.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

impl DedupHost {
    /// A dedup host for VMs whose memory lives in `store`.
    pub fn new(store: Arc<FrameStore>) -> Result<Self, DedupError> {
        Self::with_options(store, DedupOptions::default())
    }

    /// A dedup host with options.
    pub fn with_options(store: Arc<FrameStore>, options: DedupOptions) -> Result<Self, DedupError> {
        if store.granule() != PageSize::Size4K {
            return Err(DedupError::HugeBacking(store.granule()));
        }
        let uffd = Arc::new(Userfault::new()?);
        let pagemap = PageMap::open().map_err(|source| DedupError::Proc {
            what: "/proc/self/pagemap",
            source,
        })?;
        let inner = Arc::new(Inner {
            store,
            uffd: Arc::clone(&uffd),
            options,
            vms: RwLock::new(Vec::new()),
            next_vm: AtomicU64::new(1),
            scan: Mutex::new(ScanState {
                keys: HashMap::new(),
                old_hashes: HashMap::new(),
                unstable: HashMap::new(),
                cursor: (0, 0, 0),
                pagemap,
                volatile_this_scan: 0,
                volatile_last_scan: 0,
            }),
            shared: Mutex::new(SharedFrames::default()),
            map_budget: AtomicU64::new(0),
            full_scans: AtomicU64::new(0),
            cow_breaks: AtomicU64::new(0),
            map_limit_hits: AtomicU64::new(0),
            faults_seen: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let handler =
            handler::spawn(Arc::downgrade(&inner), uffd, Arc::clone(&stop)).map_err(|source| {
                DedupError::Proc {
                    what: "spawning the userfaultfd handler thread",
                    source,
                }
            })?;
        Ok(DedupHost {
            inner,
            stop,
            handler: Some(handler),
        })
    }

    /// Registers a VM. Its memory must live in this host's frame store.
    pub fn register(&self, mem: Arc<GuestMemory>, options: VmOptions) -> Result<VmId, DedupError> {
        if !Arc::ptr_eq(mem.frame_store(), &self.inner.store) {
            return Err(DedupError::ForeignStore);
        }
        {
            let mut scan = lock(&self.inner.scan);
            if let std::collections::hash_map::Entry::Vacant(slot) = scan.keys.entry(options.domain)
            {
                let key = DomainKey::random().map_err(|e| DedupError::Random(e.to_string()))?;
                slot.insert(Arc::new(key));
            }
        }
        let id = VmId(self.inner.next_vm.fetch_add(1, Ordering::Relaxed));
        let included = mem
            .regions()
            .iter()
            .map(|r| !options.exclude.contains(&r.start()))
            .collect();
        let hashes = mem
            .regions()
            .iter()
            .map(|r| vec![0u64; r.pages()])
            .collect();
        lock(&self.inner.scan).old_hashes.insert(id, hashes);
        write(&self.inner.vms).push(Arc::new(VmEntry {
            id,
            mem,
            domain: options.domain,
            included,
            cow_breaks: AtomicU64::new(0),
        }));
        Ok(id)
    }

    /// Unmerges a VM's pages and forgets it; returns its memory.
    pub fn unregister(&self, vm: VmId) -> Result<Arc<GuestMemory>, DedupError> {
        let _scan = lock(&self.inner.scan);
        let entry = self.entry(vm)?;
        self.inner.unmerge_vm(&entry)?;
        write(&self.inner.vms).retain(|e| e.id != vm);
        let mut scan = _scan;
        scan.old_hashes.remove(&vm);
        scan.unstable.retain(|_, (v, _, _)| *v != vm);
        Ok(Arc::clone(&entry.mem))
    }

    /// One pass over every page of every VM, merging all it can now.
    pub fn merge_now(&self) -> Result<ScanReport, DedupError> {
        let mut scan = lock(&self.inner.scan);
        let vms = read(&self.inner.vms).clone();
        self.inner.reconcile(&mut scan, &vms)?;
        self.inner.refresh_map_budget();
        let refs = all_pages(&vms);
        let mut report = self.inner.process(&mut scan, &vms, refs, true)?;
        scan.unstable.clear();
        scan.cursor = (0, 0, 0);
        self.inner.full_scans.fetch_add(1, Ordering::Relaxed);
        report.full_scan_completed = true;
        Ok(report)
    }

    /// One incremental step: visits pages from where the last step stopped,
    /// merging those that hashed the same on their previous visit.
    pub fn scan_step(&self, budget: ScanBudget) -> Result<ScanReport, DedupError> {
        let started = Instant::now();
        let mut scan = lock(&self.inner.scan);
        let vms = read(&self.inner.vms).clone();
        self.inner.refresh_map_budget();
        let mut total = ScanReport::default();
        if vms.is_empty() {
            return Ok(total);
        }
        const BATCH: usize = 4096;
        let mut left = match budget {
            ScanBudget::Pages(n) => n,
            ScanBudget::Time(_) => u64::MAX,
        };
        while left > 0 {
            if let ScanBudget::Time(d) = budget {
                if started.elapsed() >= d && total.pages_scanned > 0 {
                    break;
                }
            }
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(BATCH);
            let (refs, wrapped) = next_pages(&mut scan.cursor, &vms, want);
            left = left.saturating_sub(refs.len() as u64);
            let r = self.inner.process(&mut scan, &vms, refs, false)?;
            total.add(&r);
            if wrapped {
                self.inner.full_scans.fetch_add(1, Ordering::Relaxed);
                scan.unstable.clear();
                scan.volatile_last_scan = std::mem::take(&mut scan.volatile_this_scan);
                self.inner.reconcile(&mut scan, &vms)?;
                total.full_scan_completed = true;
                if matches!(budget, ScanBudget::Pages(_)) {
                    continue;
                }
            }
        }
        Ok(total)
    }

    /// Unmerges every page of every VM (KSM's `run=2`). Returns the number
    /// of pages brought back to their own frames.
    pub fn unmerge_all(&self) -> Result<u64, DedupError> {
        let _scan = lock(&self.inner.scan);
        let vms = read(&self.inner.vms).clone();
        let mut n = 0;
        for vm in &vms {
            n += self.inner.unmerge_vm(vm)?;
        }
        Ok(n)
    }

    /// Breaks sharing of the page holding `gpa` now, copying its bytes into
    /// its own frame: for a VMM that saw a write fault itself (an exit it
    /// cannot retry through the kernel's copy-on-write). Returns whether the
    /// page was merged.
    pub fn resolve_write_fault(&self, vm: VmId, gpa: GuestPhysAddr) -> Result<bool, DedupError> {
        let entry = self.entry(vm)?;
        let (ri, _) = entry
            .mem
            .find_region(gpa)
            .map(|i| (i, ()))
            .ok_or(DedupError::Unmapped(gpa))?;
        let region = &entry.mem.regions()[ri];
        let page = usize::try_from((gpa.0 - region.start().0) / PAGE_SIZE as u64)
            .map_err(|_| DedupError::Unmapped(gpa))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let s = region.page_states().load(page);
            if s.flags() & REMAPPED == 0 {
                return Ok(false);
            }
            if s.flags() & LOCKED == 0 {
                let out = self.inner.unmerge_pages(&entry, ri, page, 1)?;
                if out.restored == 1 {
                    entry.cow_breaks.fetch_add(1, Ordering::Relaxed);
                    self.inner.cow_breaks.fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
            }
            if Instant::now() > deadline {
                return Err(DedupError::Busy(gpa));
            }
            std::thread::yield_now();
        }
    }

    /// Host-wide statistics, with KSM's meanings. Reconciles first, so
    /// copies the kernel made since the last scan are counted.
    pub fn stats(&self) -> Result<DedupStats, DedupError> {
        let mut scan = lock(&self.inner.scan);
        let vms = read(&self.inner.vms).clone();
        self.inner.reconcile(&mut scan, &vms)?;
        let shared = lock(&self.inner.shared);
        let mut s = DedupStats {
            pages_shared: shared.len(),
            pages_sharing: shared.total_refs().saturating_sub(shared.len()),
            pages_unshared: scan.unstable.len() as u64,
            pages_volatile: scan.volatile_last_scan.max(scan.volatile_this_scan),
            full_scans: self.inner.full_scans.load(Ordering::Relaxed),
            cow_breaks: self.inner.cow_breaks.load(Ordering::Relaxed),
            map_limit_hits: self.inner.map_limit_hits.load(Ordering::Relaxed),
            write_faults_seen: self.inner.faults_seen.load(Ordering::Relaxed),
            ..DedupStats::default()
        };
        let mut metadata = shared.metadata_bytes() + scan.unstable.len() as u64 * 40;
        for vm in &vms {
            let c = vm.mem.census();
            s.zero_pages += zero_remapped(&vm.mem);
            s.pages_total += c.private + c.zero + c.shared + c.ballooned;
            metadata += vm
                .mem
                .regions()
                .iter()
                .map(|r| r.pages() as u64 * 8)
                .sum::<u64>();
        }
        let saved = (s.pages_sharing + s.zero_pages) * PAGE_SIZE as u64;
        s.profit_bytes =
            i64::try_from(saved).unwrap_or(i64::MAX) - i64::try_from(metadata).unwrap_or(i64::MAX);
        Ok(s)
    }

    /// Statistics of one VM.
    pub fn vm_stats(&self, vm: VmId) -> Result<VmStats, DedupError> {
        let entry = self.entry(vm)?;
        {
            let mut scan = lock(&self.inner.scan);
            self.inner
                .reconcile(&mut scan, std::slice::from_ref(&entry))?;
        }
        let c = entry.mem.census();
        Ok(VmStats {
            pages: c.private + c.zero + c.shared + c.ballooned,
            pages_merged: c.shared,
            zero_pages: zero_remapped(&entry.mem),
            cow_breaks: entry.cow_breaks.load(Ordering::Relaxed),
        })
    }

    /// What the kernel says about memory right now: the store's allocated
    /// blocks, this process's RSS/PSS and its mappings.
    pub fn kernel_view(&self) -> Result<KernelView, DedupError> {
        let vms = read(&self.inner.vms).clone();
        let ranges: Vec<(u64, u64)> = vms
            .iter()
            .flat_map(|v| {
                v.mem
                    .regions()
                    .iter()
                    .map(|r| (r.host_addr().0, r.host_addr().0 + r.size()))
            })
            .collect();
        stats::kernel_view(&self.inner.store, &ranges)
    }

    fn entry(&self, vm: VmId) -> Result<Arc<VmEntry>, DedupError> {
        read(&self.inner.vms)
            .iter()
            .find(|e| e.id == vm)
            .cloned()
            .ok_or(DedupError::UnknownVm(vm))
    }
}

impl Drop for DedupHost {
    fn drop(&mut self) {
        // Give every page its own frame back before the shared frames go.
        let _ = self.unmerge_all();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

fn nanos_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn zero_remapped(mem: &GuestMemory) -> u64 {
    let mut n = 0;
    for r in mem.regions() {
        let t = r.page_states();
        for p in 0..t.len() {
            let s = t.load(p);
            if s.kind() == PageKind::Zero && s.flags() & REMAPPED != 0 {
                n += 1;
            }
        }
    }
    n
}

/// Every page of every included region, in VM, region, page order.
fn all_pages(vms: &[Arc<VmEntry>]) -> Vec<PageRef> {
    let mut refs = Vec::new();
    for (v, vm) in vms.iter().enumerate() {
        for (ri, r) in vm.mem.regions().iter().enumerate() {
            if !vm.included[ri] {
                continue;
            }
            refs.extend((0..r.pages()).filter_map(|p| PageRef::new(v, ri, p)));
        }
    }
    refs
}

/// The next `want` pages from `cursor`; `true` if this call reached the end
/// of a full pass (the cursor is back at the start).
fn next_pages(
    cursor: &mut (usize, usize, usize),
    vms: &[Arc<VmEntry>],
    want: usize,
) -> (Vec<PageRef>, bool) {
    let mut refs = Vec::with_capacity(want);
    let (mut v, mut r, mut p) = *cursor;
    if v >= vms.len() {
        (v, r, p) = (0, 0, 0);
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

/// A page hashed this pass.
#[derive(Clone, Copy)]
struct Hashed {
    at: PageRef,
    state: PageState,
    hash: u64,
    zero: bool,
}

impl Inner {
    fn ctx(&self) -> MergeCtx<'_> {
        MergeCtx {
            store: &self.store,
            uffd: &self.uffd,
            map_budget: &self.map_budget,
        }
    }

    fn refresh_map_budget(&self) {
        let max = stats::max_map_count().unwrap_or(65530);
        let now = stats::mapping_count().unwrap_or(max);
        let budget = max
            .saturating_sub(now)
            .saturating_sub(self.options.map_headroom);
        self.map_budget.store(budget, Ordering::Relaxed);
    }

    /// Hash, group, compare and merge a batch of pages.
    fn process(
        &self,
        scan: &mut ScanState,
        vms: &[Arc<VmEntry>],
        refs: Vec<PageRef>,
        one_shot: bool,
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
        let hashed: Vec<Hashed> = refs
            .par_iter()
            .filter_map(|&at| {
                let vm = &vms[at.vm as usize];
                let region = &vm.mem.regions()[at.region as usize];
                let state = region.page_states().load(at.page as usize);
                if state.kind() != PageKind::Private || state.flags() & LOCKED != 0 {
                    return None;
                }
                let mut buf = [0u8; PAGE_SIZE];
                region.read_page(at.page as usize, &mut buf);
                let key = &keys[at.vm as usize];
                let hash = key.hash(&buf);
                let zero = key.may_be_zero(hash) && buf.iter().all(|&b| b == 0);
                Some(Hashed {
                    at,
                    state,
                    hash,
                    zero,
                })
            })
            .collect();
        report.pages_hashed = hashed.len() as u64;
        report.hash_nanos = nanos_since(hash_started);
        report.hash_threads = rayon::current_num_threads() as u64;

        // Volatility: an incremental step merges only pages whose hash did
        // not change since their previous visit.
        let mut stable = Vec::with_capacity(hashed.len());
        for h in hashed {
            let vm = &vms[h.at.vm as usize];
            let slot = scan
                .old_hashes
                .get_mut(&vm.id)
                .and_then(|r| r.get_mut(h.at.region as usize))
                .and_then(|r| r.get_mut(h.at.page as usize));
            let old = slot.map(|s| std::mem::replace(s, h.hash));
            if !one_shot && old != Some(h.hash) {
                report.volatile += 1;
                scan.volatile_this_scan += 1;
                continue;
            }
            stable.push(h);
        }

        // Classify: zero, matches a shared frame, or needs a group.
        let mut cands: HashMap<(u32, u32), Vec<Candidate>> = HashMap::new();
        let mut push = |at: PageRef, expected: PageState, target: Target| {
            cands
                .entry((at.vm, at.region))
                .or_default()
                .push(Candidate {
                    page: at.page as usize,
                    expected,
                    target,
                });
        };
        let mut rest: Vec<(DomainId, Hashed)> = Vec::with_capacity(stable.len());
        {
            let shared = lock(&self.shared);
            for h in stable {
                let domain = vms[h.at.vm as usize].domain;
                if h.zero {
                    push(h.at, h.state, Target::Zero);
                } else if let Some(s) = shared.lookup(domain, h.hash).first() {
                    push(h.at, h.state, Target::Shared(*s));
                } else {
                    rest.push((domain, h));
                }
            }
        }
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
                groups.push(Group {
                    domain: d,
                    hash: h.hash,
                    members: i..j,
                    extra: None,
                });
            } else if !one_shot {
                // Incremental: a page alone in this batch may match one seen
                // earlier in this full scan (KSM's unstable tree).
                match scan.unstable.remove(&(d, h.hash)) {
                    Some(earlier) => {
                        if let Some(e) = self.unstable_page(vms, earlier, h.hash) {
                            if e.at != h.at {
                                groups.push(Group {
                                    domain: d,
                                    hash: h.hash,
                                    members: i..j,
                                    extra: Some(e),
                                });
                            }
                        }
                    }
                    None => {
                        scan.unstable.insert(
                            (d, h.hash),
                            (vms[h.at.vm as usize].id, h.at.region, h.at.page),
                        );
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
        if !groups.is_empty() {
            let base = self.store.allocate(groups.len() as u64)?;
            // Copy canonical pages into the new shared frames, a chunk of
            // frames per pwrite. Members that differ from the canonical page
            // (a hash collision, or a write since hashing) fail the byte
            // comparison at merge time and stay private.
            const CHUNK: usize = 256;
            let mut content = vec![0u8; CHUNK * PAGE_SIZE];
            for (c, chunk) in groups.chunks(CHUNK).enumerate() {
                content[..chunk.len() * PAGE_SIZE]
                    .par_chunks_mut(PAGE_SIZE)
                    .zip(chunk.par_iter())
                    .for_each(|(dst, g)| {
                        let at = canonical(g).at;
                        let region = &vms[at.vm as usize].mem.regions()[at.region as usize];
                        let mut page = [0u8; PAGE_SIZE];
                        region.read_page(at.page as usize, &mut page);
                        dst.copy_from_slice(&page);
                    });
                let first = FrameNumber(base.start.0 + (c * CHUNK) as u64);
                self.store
                    .write_frames(first, &content[..chunk.len() * PAGE_SIZE])?;
            }
            let mut shared = lock(&self.shared);
            for (k, g) in groups.iter().enumerate() {
                let frame = FrameNumber(base.start.0 + k as u64);
                shared.insert(frame, g.domain, g.hash);
                for (_, m) in &rest[g.members.clone()] {
                    push(m.at, m.state, Target::Shared(frame));
                }
                if let Some(e) = g.extra {
                    push(e.at, e.state, Target::Shared(frame));
                }
            }
        }

        report.group_nanos = nanos_since(hash_started).saturating_sub(report.hash_nanos);
        let merge_started = Instant::now();
        // Merge, region by region, in page order.
        let mut keys_sorted: Vec<(u32, u32)> = cands.keys().copied().collect();
        keys_sorted.sort_unstable();
        let ctx = self.ctx();
        let mut refs_added: HashMap<FrameNumber, u64> = HashMap::new();
        for k in keys_sorted {
            let mut list = cands.remove(&k).unwrap_or_default();
            list.sort_by_key(|c| c.page);
            list.dedup_by_key(|c| c.page);
            let region = &vms[k.0 as usize].mem.regions()[k.1 as usize];
            let out = merge::merge_region(&ctx, region, &list, |f, n| {
                *refs_added.entry(f).or_default() += n;
            })?;
            report.merged_shared += out.shared;
            report.merged_zero += out.zero;
            report.changed += out.changed;
            report.busy += out.busy;
            report.map_limit += out.map_limit;
            report.remaps += out.remaps;
        }
        report.merge_nanos = nanos_since(merge_started);
        self.map_limit_hits
            .fetch_add(report.map_limit, Ordering::Relaxed);
        let mut shared = lock(&self.shared);
        for (f, n) in refs_added {
            shared.add_ref(f, n);
        }
        shared.free_unreferenced(&self.store)?;
        Ok(report)
    }

    /// The page an unstable-tree entry names, if it is still a candidate.
    fn unstable_page(
        &self,
        vms: &[Arc<VmEntry>],
        (vm_id, region, page): (VmId, u32, u32),
        hash: u64,
    ) -> Option<Hashed> {
        let v = vms.iter().position(|e| e.id == vm_id)?;
        let r = vms[v].mem.regions().get(region as usize)?;
        let state = r.page_states().load(page as usize);
        if state.kind() != PageKind::Private || state.flags() & LOCKED != 0 {
            return None;
        }
        Some(Hashed {
            at: PageRef::new(v, region as usize, page as usize)?,
            state,
            hash,
            zero: false,
        })
    }

    /// Moves pages the kernel copied (a write to a merged page) from
    /// "shared" to "private, remapped" and drops their references.
    fn reconcile(&self, scan: &mut ScanState, vms: &[Arc<VmEntry>]) -> Result<(), DedupError> {
        let mut dropped: Vec<FrameNumber> = Vec::new();
        for vm in vms {
            for region in vm.mem.regions() {
                let t = region.page_states();
                // Only regions with merged pages need the kernel's page map.
                let Some(first) = (0..t.len()).find(|&p| {
                    let s = t.load(p);
                    s.flags() & REMAPPED != 0 && s.kind() != PageKind::Private
                }) else {
                    continue;
                };
                let entries = scan
                    .pagemap
                    .entries(region, first, t.len() - first)
                    .map_err(|source| DedupError::Proc {
                        what: "/proc/self/pagemap",
                        source,
                    })?;
                for (i, e) in entries.into_iter().enumerate() {
                    let p = first + i;
                    let s = t.load(p);
                    if s.flags() & REMAPPED == 0
                        || s.flags() & LOCKED != 0
                        || s.kind() == PageKind::Private
                    {
                        continue;
                    }
                    let copied = scan.pagemap.is_private_copy(e, || {
                        let mut b = [0u8; PAGE_SIZE];
                        region.read_page(p, &mut b);
                        b.iter().all(|&x| x == 0)
                    });
                    if !copied {
                        continue;
                    }
                    let new = PageState::new(PageKind::Private, region.own_frame(p), REMAPPED);
                    if t.compare_exchange(p, s, new).is_ok() {
                        vm.cow_breaks.fetch_add(1, Ordering::Relaxed);
                        self.cow_breaks.fetch_add(1, Ordering::Relaxed);
                        if s.kind() == PageKind::Shared {
                            dropped.push(s.frame());
                        }
                    }
                }
            }
        }
        let mut shared = lock(&self.shared);
        for f in dropped {
            shared.drop_ref(&self.store, f)?;
        }
        Ok(())
    }

    fn unmerge_vm(&self, vm: &VmEntry) -> Result<u64, DedupError> {
        let mut n = 0;
        for (ri, r) in vm.mem.regions().iter().enumerate() {
            n += self.unmerge_pages(vm, ri, 0, r.pages())?.restored;
        }
        Ok(n)
    }

    fn unmerge_pages(
        &self,
        vm: &VmEntry,
        region: usize,
        first: usize,
        count: usize,
    ) -> Result<merge::UnmergeOutcome, DedupError> {
        let r = &vm.mem.regions()[region];
        let mut unshared = Vec::new();
        let out = merge::unmerge_range(&self.ctx(), r, first, count, |f| unshared.push(f))?;
        let mut shared = lock(&self.shared);
        for f in unshared {
            shared.drop_ref(&self.store, f)?;
        }
        Ok(out)
    }
}
