//! Page deduplication: fold identical guest pages, across every VM registered
//! with a [`DedupHost`], into one copy-on-write frame, and give the memory of
//! the duplicates (and of zero pages) back to the host for real.
//!
//! Pipeline (`pipeline.rs`, one named stage each): scan and hash (xxh3
//! keyed per merge domain) -> classify -> group and templates -> allocate
//! and fill -> order and plan -> merge windows and publish (`merge.rs`;
//! their page-state steps in `steps.rs`, which loom checks). Pages are shared only within a domain. A write to a merged
//! page, through the library or a raw pointer or a KVM vCPU, is copied by the
//! kernel first: merged pages are private copy-on-write views of their shared
//! frame, and a shared frame is never mapped writable anywhere.
//!
//! Two modes: [`DedupHost::scan_step`] (incremental, with a budget, for a
//! background thread; a page must hash the same on two visits before it is
//! merged, KSM's volatility rule) and [`DedupHost::merge_now`] (every page
//! now, in batches, volatility ignored: it is for the moments a VMM knows memory
//! is quiet, such as right after restoring N VMs from one snapshot; safety
//! never depends on the rule, since bytes are compared under write
//! protection before every merge).

mod arrival;
mod arriving;
mod catch_up;
mod error;
mod fold_in;
mod forget;
mod handler;
mod incremental;
mod key;
mod locks;
mod merge;
mod merge_remote;
mod options;
mod pagemap;
mod pipeline;
mod plan;
mod reconcile;
pub(crate) mod remote;
mod scan;
mod shared;
mod state;
mod stats;
// `pub` items for the loom door (`crate::__loom`); crate-private otherwise.
#[cfg_attr(not(loom), allow(unreachable_pub))]
pub(crate) mod steps;
mod unstable;
mod vm;
mod window;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

pub(crate) use arrival::Arrival;
pub(crate) use arriving::ArrivingImage;
pub use error::DedupError;
pub(crate) use fold_in::{FoldIn, PageFrame};
pub use options::{DedupOptions, DomainId, ScanBudget, VmId, VmOptions};
pub use remote::RemoteError;
pub use stats::{DedupStats, KernelView, ScanReport, VmStats};

use self::{
    locks::{lock, read},
    pagemap::PageMap,
    scan::Batches,
    shared::SharedFrames,
    state::{Inner, ScanState},
    unstable::Unstable,
    vm::VmEntry,
};
use crate::{
    addr::{GuestPhysAddr, PageSize, PAGE_SIZE},
    frames::FrameStore,
    memory::{GuestMemory, PageKind},
    userfault::Userfault,
};

/// Pages a `merge_now` pass takes at a time (32 MiB): its bookkeeping is
/// per batch, not per pass (8K measured 23.5 bytes per tracked page at the
/// peak of merging four 1 GiB clones, 16K 24.3).
const MERGE_BATCH: usize = 8 * 1024;

/// The dedup engine for every VM of one frame store.
pub struct DedupHost {
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
    handler: Option<std::thread::JoinHandle<()>>,
    background: Mutex<Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>>,
}

impl std::fmt::Debug for DedupHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupHost")
            .field("vms", &read(&self.inner.vms).len())
            .finish_non_exhaustive()
    }
}

impl DedupHost {
    /// A dedup host for VMs whose memory lives in `store`.
    pub fn new(store: Arc<FrameStore>) -> Result<Self, DedupError> {
        Self::with_options(store, DedupOptions::default())
    }

    /// A dedup host with options.
    pub fn with_options(store: Arc<FrameStore>, options: DedupOptions) -> Result<Self, DedupError> {
        // Shared frames live in the host's store: it needs a file.
        store.file("dedup")?;
        if store.granule() != PageSize::Size4K {
            return Err(DedupError::HugeBacking(store.granule()));
        }
        // The pool's threads exist before any mapping is spent: once the
        // process's mappings run out a thread cannot map its stack, and
        // rayon (like `std::thread::spawn`) aborts the process over it.
        if let Err(e) = rayon::ThreadPoolBuilder::new().build_global() {
            // Already built (by us or the application) is fine; a failed
            // spawn is not.
            if let Some(source) = std::error::Error::source(&e) {
                return Err(DedupError::Proc {
                    what: "starting rayon's thread pool",
                    source: std::io::Error::other(source.to_string()),
                });
            }
        }
        store.map_budget().set_headroom(options.map_headroom);
        let uffd = Arc::new(Userfault::new()?);
        let pagemap = PageMap::open().map_err(|source| DedupError::Proc {
            what: crate::host::pagemap::PATH,
            source,
        })?;
        let inner = Arc::new(Inner {
            store,
            uffd: Arc::clone(&uffd),
            vms: RwLock::new(Vec::new()),
            next_vm: AtomicU64::new(1),
            scan: Mutex::new(ScanState {
                keys: HashMap::new(),
                old_hashes: HashMap::new(),
                unstable: Unstable::default(),
                cursor: (0, 0, 0),
                pagemap,
                volatile_this_scan: 0,
                volatile_last_scan: 0,
                restored: HashMap::new(),
                covers: HashMap::new(),
                arriving: HashMap::new(),
            }),
            shared: Mutex::new(SharedFrames::default()),
            full_scans: AtomicU64::new(0),
            cow_breaks: AtomicU64::new(0),
            map_limit_hits: AtomicU64::new(0),
            faults_seen: AtomicU64::new(0),
            background_errors: AtomicU64::new(0),
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
            background: Mutex::new(None),
        })
    }

    /// Registers a VM. Its memory may live in this host's frame store or in
    /// a store of its own (4 KiB pages): shared frames always live in the
    /// host's store, and a page's own frame in its memory's store.
    pub fn register(&self, mem: Arc<GuestMemory>, options: VmOptions) -> Result<VmId, DedupError> {
        self.register_entry(mem, options, None)
    }

    /// Registers a VM whose memory another process maps too (a VMM process
    /// under the host service): every merge and unmerge of its pages runs
    /// in that process as well, through `remote`.
    pub(crate) fn register_remote(
        &self,
        mem: Arc<GuestMemory>,
        options: VmOptions,
        remote: Arc<dyn remote::RemoteMapper>,
    ) -> Result<VmId, DedupError> {
        self.register_entry(mem, options, Some(remote))
    }

    fn register_entry(
        &self,
        mem: Arc<GuestMemory>,
        options: VmOptions,
        remote: Option<Arc<dyn remote::RemoteMapper>>,
    ) -> Result<VmId, DedupError> {
        let mut scan = lock(&self.inner.scan);
        self.inner.add_vm(&mut scan, mem, options, remote, false)
    }

    /// Starts restoring a VM into `domain` already merged (see
    /// `fold_in.rs`): holds the scan's lock until the returned value ends.
    pub(crate) fn fold_in(&self, domain: DomainId) -> Result<FoldIn<'_>, DedupError> {
        FoldIn::new(&self.inner, lock(&self.inner.scan), domain)
    }

    /// Unmerges a VM's pages and forgets it; returns its memory.
    pub fn unregister(&self, vm: VmId) -> Result<Arc<GuestMemory>, DedupError> {
        let entry = self.entry(vm)?;
        if let Some(remote) = &entry.remote {
            // Other processes bring the pages home, which may take a while:
            // not under the scan's lock, which would stop every other VM's
            // merges meanwhile (found by review). Taking no more merges, the
            // VM has nothing new merged behind this.
            remote.quarantine();
            self.inner.unmerge_vm(&entry)?;
        }
        let mut scan = lock(&self.inner.scan);
        // Every page back in its own frame before the VM is forgotten: a
        // page another thread holds (a `resolve_write_fault` in progress)
        // is waited for, since once the VM is gone nothing would count its
        // reference to a shared frame, and the frame could be freed under
        // another VM's page. Pages still held after the deadline leave the
        // VM registered (and usable), with `Busy`.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            self.inner.unmerge_vm(&entry)?;
            let Some(busy) = first_held_page(&entry) else {
                break;
            };
            if Instant::now() > deadline {
                return Err(DedupError::Busy(busy));
            }
            std::thread::yield_now();
        }
        forget::remove_vm(&self.inner, &mut scan, &entry);
        Ok(Arc::clone(&entry.mem))
    }

    /// Forgets a VM whose process is gone, without unmerging: nothing maps
    /// its pages any more, so its references to shared frames just end
    /// (the recount frees frames only it used). Its memory is dropped with
    /// the last reference to it.
    pub(crate) fn forget(&self, vm: VmId) -> Result<(), DedupError> {
        let mut scan = lock(&self.inner.scan);
        let entry = self.entry(vm)?;
        forget::remove_vm(&self.inner, &mut scan, &entry);
        Ok(())
    }

    /// Brings every merged page of `vm` back to its own frame (through the
    /// processes that map it); the VM stays registered.
    pub(crate) fn unmerge_vm(&self, vm: VmId) -> Result<u64, DedupError> {
        self.inner.unmerge_vm(&*self.entry(vm)?)
    }

    /// VMs registered now.
    pub(crate) fn vm_count(&self) -> usize {
        read(&self.inner.vms).len()
    }

    /// Tells a process that starts mapping `vm`'s memory every run of it
    /// that maps a shared frame or zeros, through `tell(region, runs)`.
    pub(crate) fn catch_up(
        &self,
        vm: VmId,
        wait: Duration,
        tell: impl FnMut(usize, &[remote::RemoteRun]) -> Result<(), RemoteError>,
    ) -> Result<(), DedupError> {
        catch_up::catch_up(&*self.entry(vm)?, wait, tell)
    }

    /// Runs `f` with page `page` of region `region` of `vm` held, if it is
    /// private and nothing else holds it; whether it ran.
    pub(crate) fn with_private_page_held(
        &self,
        vm: VmId,
        region: usize,
        page: usize,
        f: impl FnOnce(),
    ) -> Result<bool, DedupError> {
        let entry = self.entry(vm)?;
        let Some(r) = entry.mem.regions().get(region) else {
            return Ok(false);
        };
        if page >= r.pages() {
            return Ok(false);
        }
        Ok(catch_up::with_private_page_held(r, page, f))
    }

    /// Visits every page of every VM now, in batches of 8K pages, merging
    /// what it can; a pass the mapping budget cut short while an eighth of
    /// it was left runs again (up to three passes).
    pub fn merge_now(&self) -> Result<ScanReport, DedupError> {
        let mut scan = lock(&self.inner.scan);
        let vms = read(&self.inner.vms).clone();
        reconcile::reconcile(&self.inner, &mut scan, &vms)?;
        self.inner.refresh_map_budget();
        let mut report = ScanReport::default();
        let total: u64 = vms
            .iter()
            .flat_map(|vm| {
                vm.mem
                    .regions()
                    .iter()
                    .enumerate()
                    .filter(|(ri, _)| vm.scans(*ri))
                    .map(|(_, r)| r.pages() as u64)
            })
            .sum();
        // Each batch plans with its share of the mapping budget; a pass that
        // the budget cut short while an eighth of it was still left (a
        // batch used less than its share, after an earlier one had needed
        // more) runs again, up to three passes, with what is left.
        for _ in 0..3 {
            let budget_at_start = self.inner.store.map_budget().left();
            scan.unstable.clear();
            let mut pass_report = ScanReport::default();
            let mut done = 0u64;
            let mut deferred = scan::Deferred::default();
            let mut batches = Batches::new(&vms, MERGE_BATCH);
            while let Some(refs) = batches.next() {
                let part = refs.len() as u64;
                let mode = scan::Mode {
                    volatility: false,
                    unstable: true,
                    share: (part, total.saturating_sub(done)),
                    batch: Some(batches.last_window()),
                };
                done += part;
                match pipeline::process(
                    &self.inner,
                    &mut scan,
                    &vms,
                    refs,
                    mode,
                    Some(&mut deferred),
                ) {
                    Ok(r) => pass_report.add(&r),
                    Err(e) => {
                        pipeline::abandon_deferred(&self.inner, deferred);
                        return Err(e);
                    }
                }
            }
            let r = pipeline::merge_deferred(&self.inner, &vms, deferred)?;
            pass_report.add(&r);
            let cut_short = pass_report.map_limit > 0;
            // What every pass did; what the last left for lack of mappings.
            report.add(&pass_report);
            report.map_limit = pass_report.map_limit;
            let merged = pass_report.merged_shared + pass_report.merged_zero;
            let left = self.inner.store.map_budget().left();
            if !cut_short || merged == 0 || left < 4 || left < budget_at_start / 8 {
                break;
            }
        }
        self.inner
            .map_limit_hits
            .fetch_add(report.map_limit, Ordering::Relaxed);
        scan.unstable.clear();
        scan.cursor = (0, 0, 0);
        // A full scan: what the last one found volatile is this one's (none:
        // a one-shot pass ignores the rule), and a partial incremental scan
        // it cut short starts over.
        scan.volatile_last_scan = report.volatile;
        scan.volatile_this_scan = 0;
        lock(&self.inner.shared).trim();
        self.inner.full_scans.fetch_add(1, Ordering::Relaxed);
        report.full_scan_completed = true;
        Ok(report)
    }

    /// The frame store this host's VMs live in.
    pub fn frame_store(&self) -> &Arc<FrameStore> {
        &self.inner.store
    }

    /// Merges only the given pages of one VM, now (no volatility check, as
    /// [`merge_now`](Self::merge_now)): each is hashed, compared and mapped
    /// onto a shared frame it matches (one already shared by any VM of its
    /// domain, or another page of the list), or released if zero. For a
    /// caller that knows where duplicates are (a migration receiver folding
    /// the pages that arrived as references); the cost is that of the list,
    /// not of the VM. Addresses outside the VM's memory or in excluded
    /// regions are skipped; duplicates in the list are visited once.
    pub fn merge_pages(&self, vm: VmId, pages: &[GuestPhysAddr]) -> Result<ScanReport, DedupError> {
        let mut scan = lock(&self.inner.scan);
        let vms = read(&self.inner.vms).clone();
        let Some(v) = vms.iter().position(|e| e.id == vm) else {
            return Err(DedupError::UnknownVm(vm));
        };
        if vms[v].is_arriving() {
            return Err(DedupError::Arriving(vm));
        }
        reconcile::reconcile(&self.inner, &mut scan, &vms)?;
        self.inner.refresh_map_budget();
        let entry = &vms[v];
        let mut refs: Vec<scan::PageRef> = pages
            .iter()
            .filter_map(|&gpa| {
                let ri = entry.mem.find_region(gpa)?;
                if !entry.scans(ri) {
                    return None;
                }
                let r = &entry.mem.regions()[ri];
                let page = usize::try_from((gpa.0 - r.start().0) / PAGE_SIZE as u64).ok()?;
                scan::PageRef::new(v, ri, page)
            })
            .collect();
        refs.sort_unstable_by_key(|r| (r.region, r.page));
        refs.dedup();
        let one_shot = scan::Mode {
            volatility: false,
            unstable: false,
            share: (1, 1),
            batch: None,
        };
        let report = pipeline::process(&self.inner, &mut scan, &vms, refs, one_shot, None)?;
        self.inner
            .map_limit_hits
            .fetch_add(report.map_limit, Ordering::Relaxed);
        Ok(report)
    }

    /// One incremental step: visits pages from where the last step stopped,
    /// merging those that hashed the same on their previous visit.
    pub fn scan_step(&self, budget: ScanBudget) -> Result<ScanReport, DedupError> {
        incremental::scan_step(&self.inner, budget, None, true)
    }

    /// Runs [`scan_step`](Self::scan_step) with `budget` on a thread of its
    /// own every `interval`, as `ksmd` does with `pages_to_scan` and
    /// `sleep_millisecs`, until [`stop_background`](Self::stop_background)
    /// or drop. Replaces a scanner already running. A failed step is counted
    /// in `DedupStats::background_errors` and the next one runs as planned.
    /// Each step's parallel work (hashing, sorting, comparing) uses rayon's
    /// global pool, every core: see
    /// [`start_background_on`](Self::start_background_on) to leave the
    /// guests more. A budget of no pages or no time is refused
    /// ([`DedupError::EmptyBudget`]): the scanner would only spin.
    pub fn start_background(
        &self,
        budget: ScanBudget,
        interval: Duration,
    ) -> Result<(), DedupError> {
        self.spawn_background(budget, interval, None)
    }

    /// [`start_background`](Self::start_background) with each step's
    /// parallel work on a pool of `threads` threads of the scanner's own
    /// (1: the whole scanner on one core, as `ksmd`), so a background
    /// scanner running flat out takes at most that many cores from the
    /// vCPUs. [`merge_now`](Self::merge_now) still uses every core.
    pub fn start_background_on(
        &self,
        budget: ScanBudget,
        interval: Duration,
        threads: std::num::NonZeroUsize,
    ) -> Result<(), DedupError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.get())
            .thread_name(|i| format!("pagefold-scan-{i}"))
            .build()
            .map_err(|e| DedupError::Proc {
                what: "building the background scanner's thread pool",
                source: std::io::Error::other(e.to_string()),
            })?;
        self.spawn_background(budget, interval, Some(pool))
    }

    fn spawn_background(
        &self,
        budget: ScanBudget,
        interval: Duration,
        pool: Option<rayon::ThreadPool>,
    ) -> Result<(), DedupError> {
        if matches!(budget, ScanBudget::Pages(0))
            || matches!(budget, ScanBudget::Time(d) if d.is_zero())
        {
            return Err(DedupError::EmptyBudget);
        }
        // The slot stays locked from the stop to the store, so two callers
        // at once cannot both start a scanner and lose one (it would run on,
        // unstoppable, after the host is dropped).
        let mut slot = lock(&self.background);
        if let Some((stop, handle)) = slot.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let inner = Arc::clone(&self.inner);
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("pagefold-scan".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let step = || incremental::background_step(&inner, budget, &flag);
                    let result = match &pool {
                        Some(pool) => pool.install(step),
                        None => step(),
                    };
                    if result.is_err() {
                        inner.background_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    // Sleep in short slices so a stop is prompt (an
                    // interval past what `Instant` holds sleeps until then).
                    let until = Instant::now().checked_add(interval);
                    while !flag.load(Ordering::Relaxed) {
                        let slice = match until {
                            Some(u) => match u.checked_duration_since(Instant::now()) {
                                Some(left) if !left.is_zero() => left,
                                _ => break,
                            },
                            None => Duration::MAX,
                        };
                        std::thread::sleep(slice.min(Duration::from_millis(20)));
                    }
                }
            })
            .map_err(|source| DedupError::Proc {
                what: "spawning the background scanner thread",
                source,
            })?;
        *slot = Some((stop, handle));
        Ok(())
    }

    /// Stops the background scanner, if one runs, after its current batch
    /// (4096 pages at most).
    pub fn stop_background(&self) {
        if let Some((stop, handle)) = lock(&self.background).take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }

    /// Unmerges every page of every VM (KSM's `run=2`). Returns the number
    /// of pages brought back to their own frames.
    pub fn unmerge_all(&self) -> Result<u64, DedupError> {
        let _scan = lock(&self.inner.scan);
        let vms = read(&self.inner.vms).clone();
        if let Some(vm) = vms.iter().find(|v| v.is_arriving()) {
            return Err(DedupError::Arriving(vm.id));
        }
        let mut n = 0;
        for vm in &vms {
            n += self.inner.unmerge_vm(vm)?;
        }
        reconcile::recount(&self.inner)?;
        Ok(n)
    }

    /// Breaks sharing of the page holding `gpa` now, copying its bytes into
    /// its own frame: for a VMM that saw a write fault itself (an exit it
    /// cannot retry through the kernel's copy-on-write). Returns whether the
    /// page was merged.
    ///
    /// Safe to call from any thread while passes run.
    pub fn resolve_write_fault(&self, vm: VmId, gpa: GuestPhysAddr) -> Result<bool, DedupError> {
        let entry = self.entry(vm)?;
        let ri = entry
            .mem
            .find_region(gpa)
            .ok_or(DedupError::Unmapped(gpa))?;
        let region = &entry.mem.regions()[ri];
        let page = usize::try_from((gpa.0 - region.start().0) / PAGE_SIZE as u64)
            .map_err(|_| DedupError::Unmapped(gpa))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let s = region.page_states().load(page);
            if !s.is_remapped() {
                return Ok(false);
            }
            if !s.is_locked() {
                // A page the kernel already copied on a write (reconciled to
                // private) shares nothing: it goes back to its own frame,
                // but that is no new COW break (found by review: it was
                // counted twice and reported as merged).
                let was_shared = s.kind() != PageKind::Private;
                // Not `restored == 1`: with the mapping budget spent, part
                // of the merged stretch around the page goes back with it;
                // and not "no longer remapped": a caller racing this one
                // may have brought it back (found by review: both counted).
                let out = self.inner.unmerge_pages(&entry, ri, page, 1)?;
                if out.first_restored {
                    if was_shared {
                        entry.cow_breaks.fetch_add(1, Ordering::Relaxed);
                        self.inner.cow_breaks.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(was_shared);
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
        reconcile::reconcile(&self.inner, &mut scan, &vms)?;
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
            background_errors: self.inner.background_errors.load(Ordering::Relaxed),
            ..DedupStats::default()
        };
        let mut metadata = shared.metadata_bytes() + scan.metadata_bytes();
        for vm in &vms {
            let c = vm.mem.census();
            s.zero_pages += zero_remapped(&vm.mem);
            s.pages_total += c.private + c.zero + c.shared + c.ballooned;
            metadata += vm
                .mem
                .regions()
                .iter()
                .map(|r| (r.pages() * std::mem::size_of::<u64>()) as u64)
                .sum::<u64>();
        }
        s.metadata_bytes = metadata;
        let saved = (s.pages_sharing + s.zero_pages) * PAGE_SIZE as u64;
        s.profit_bytes =
            i64::try_from(saved).unwrap_or(i64::MAX) - i64::try_from(metadata).unwrap_or(i64::MAX);
        Ok(s)
    }

    /// The memory registered as `vm`.
    pub fn memory(&self, vm: VmId) -> Result<Arc<GuestMemory>, DedupError> {
        Ok(Arc::clone(&self.entry(vm)?.mem))
    }

    /// Statistics of one VM.
    pub fn vm_stats(&self, vm: VmId) -> Result<VmStats, DedupError> {
        let entry = self.entry(vm)?;
        {
            let mut scan = lock(&self.inner.scan);
            reconcile::reconcile(&self.inner, &mut scan, std::slice::from_ref(&entry))?;
        }
        let c = entry.mem.census();
        Ok(VmStats {
            pages: c.private + c.zero + c.shared + c.ballooned,
            pages_merged: c.shared,
            zero_pages: zero_remapped(&entry.mem),
            cow_breaks: entry.cow_breaks.load(Ordering::Relaxed),
        })
    }

    /// What the kernel says about memory right now: the allocated blocks of
    /// the host's store and of every VM's own store, this process's RSS/PSS
    /// and its mappings.
    pub fn kernel_view(&self) -> Result<KernelView, DedupError> {
        let vms = read(&self.inner.vms).clone();
        let mut stores: Vec<&Arc<FrameStore>> = vec![&self.inner.store];
        for v in &vms {
            if !stores.iter().any(|s| Arc::ptr_eq(s, v.mem.frame_store())) {
                stores.push(v.mem.frame_store());
            }
        }
        let ranges: Vec<(u64, u64)> = vms
            .iter()
            .flat_map(|v| {
                v.mem
                    .regions()
                    .iter()
                    .map(|r| (r.host_addr().0, r.host_addr().0 + r.size()))
            })
            .collect();
        stats::kernel_view(&stores, &ranges)
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
        self.stop_background();
        // Give every page its own frame back before the shared frames go
        // (a VM still arriving is its restore's to discard).
        {
            let _scan = lock(&self.inner.scan);
            let vms = read(&self.inner.vms).clone();
            for vm in vms.iter().filter(|v| !v.is_arriving()) {
                let _ = self.inner.unmerge_vm(vm);
            }
            let _ = reconcile::recount(&self.inner);
        }
        for vm in read(&self.inner.vms).iter() {
            vm.mem.release_from_dedup();
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

/// The guest-physical address of the first page of `vm` that is still
/// remapped or held by an operation, if any.
fn first_held_page(vm: &VmEntry) -> Option<GuestPhysAddr> {
    vm.mem.regions().iter().find_map(|r| {
        let states = r.page_states();
        (0..r.pages())
            .find(|&p| {
                let s = states.load(p);
                s.is_remapped() || s.is_locked()
            })
            .map(|p| GuestPhysAddr(r.start().0 + (p * PAGE_SIZE) as u64))
    })
}

fn zero_remapped(mem: &GuestMemory) -> u64 {
    let mut n = 0;
    for r in mem.regions() {
        let t = r.page_states();
        for p in 0..t.len() {
            let s = t.load(p);
            if s.kind() == PageKind::Zero && s.is_remapped() {
                n += 1;
            }
        }
    }
    n
}
