//! Restoring lazily: the guest runs before its memory is read. Every region
//! of a fresh [`GuestMemory`] is registered with a userfaultfd in missing
//! mode (`userfault::MissingPages`, the machinery post-copy migration
//! shares); the fault-server thread (`userfault::FaultServer`) hands each
//! first touch (a vCPU through KVM, a device, a raw pointer) to this
//! module's source, which serves it by reading that page from the snapshot
//! and placing it atomically (`UFFDIO_COPY`; zeros: `UFFDIO_ZEROPAGE`), while a
//! fetch thread copies every page not yet present, first the pages a
//! working-set file recorded as touched early at an earlier restore, then
//! the rest in address order. The two race safely: the kernel places a
//! page once, and the loser's `EEXIST` only means "done already".
//!
//! The handler checks a page's BLAKE3 on its own thread, never on rayon's
//! pool: the pool's workers may be threads waiting in a fault it is to
//! serve (a VMM's, or pagefold's own parallel reads of guest memory). The
//! fetch thread checks its batches on the pool; it may wait there, but the
//! handler goes on serving, so the wait ends.
//!
//! Zero pages are not fetched: once every stored page is present the
//! ranges are unregistered, and an untouched zero page is then a hole the
//! kernel fills with zeros on first touch, costing nothing until then.
//!
//! A page whose bytes do not match their address (a damaged snapshot) is
//! never shown to the guest: the error is recorded for
//! [`LazyRestore::wait`], and the page is poisoned (`UFFDIO_POISON`), so the
//! faulting thread wakes into a memory error (SIGBUS for a raw pointer, an
//! error from `KVM_RUN` for a vCPU) rather than waiting forever or reading
//! wrong bytes. On a kernel without poison (before 6.6) the page is
//! zero-filled instead, after the error is recorded: the VMM learns of it
//! from [`LazyRestore::wait`] and must discard the memory.
//!
//! Memory that a dedup host (or a raw-write tracker) already holds a
//! userfaultfd for cannot be registered again: [`LazyError::Claimed`]; a
//! lazy restore into a dedup host's domain is `lazy_folded.rs`, which
//! starts this machinery on a clone mapping an image still arriving: a
//! page of such a span is placed by writing it into the image's frame
//! (every clone maps it), not by `UFFDIO_COPY` into the clone. Memory on
//! huge pages is refused ([`LazyError::HugePages`], before anything is
//! registered: a missing fault there is filled a huge page at a time).

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use super::{
    error::{Part, SnapshotError},
    file::NewFile,
    layout::PageLayout,
    reader::{Located, SnapshotReader},
    scan::BATCH,
};
use crate::{
    addr::PageSize,
    addr::{GuestPhysAddr, PAGE_SIZE},
    dedup::{Arrival, ArrivingImage},
    host::residency::{seek_data, DataFrom},
    memory::{GuestMemory, GuestRegion},
    userfault::{FaultServer, FaultSource, MissingPages, MissingSpan, Userfault, UserfaultError},
};

const PAGE: u64 = PAGE_SIZE as u64;

/// Magic of a working-set file: then a page count (u64 LE) and that many
/// page indexes (u64 LE, in the snapshot's page order).
const WS_MAGIC: &[u8; 8] = b"PFWSET1\n";

/// Called by the fetch thread with each page it places, in order.
pub type FetchHook = Arc<dyn Fn(GuestPhysAddr) + Send + Sync>;

/// How to restore lazily.
#[derive(Clone, Default)]
pub struct LazyOptions {
    /// A working-set file: read at the start (pages it names are fetched
    /// first; a file that does not exist yet is an empty set), and written
    /// at the end of a successful [`LazyRestore::wait`] with the first
    /// [`record_pages`](Self::record_pages) pages touched.
    pub working_set: Option<PathBuf>,
    /// How many of the pages served on fault (in order of touch) to write
    /// to the working-set file; 0 writes nothing.
    pub record_pages: usize,
    /// Told of every page the fetch thread places, in order (for tests and
    /// tracing).
    pub on_fetch: Option<FetchHook>,
    /// How long after the restore returns the background fetch starts
    /// (zero: at once). Faults are served meanwhile. On a host with few
    /// cores the fetch (reads and BLAKE3 on rayon's pool) competes with
    /// the VMM creating its VM and vCPUs and with the first faults: a few
    /// milliseconds here bring the first instruction forward
    /// (`examples/snapshot_first_touch.rs` measures it), at the cost of
    /// the whole memory arriving that much later.
    pub fetch_delay: std::time::Duration,
}

impl std::fmt::Debug for LazyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyOptions")
            .field("working_set", &self.working_set)
            .field("record_pages", &self.record_pages)
            .field("on_fetch", &self.on_fetch.is_some())
            .field("fetch_delay", &self.fetch_delay)
            .finish()
    }
}

/// Errors of a lazy restore.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The snapshot: a layout that is not the memory's, a damaged page, a
    /// missing ancestor.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The userfaultfd: unavailable, a kernel without missing faults on
    /// shmem (`NoMissingShmem`), a failed ioctl.
    #[error(transparent)]
    Userfault(#[from] UserfaultError),
    /// A dedup host or a raw-write tracker holds a userfaultfd for this
    /// memory already; one range cannot be registered with two.
    #[error("the memory is owned by a dedup host or raw-write tracker (its userfaultfd); a lazy restore needs memory of its own")]
    Claimed,
    /// A page of the memory holds memory already: it would not fault, and
    /// would keep its old bytes. Restore lazily into fresh memory only.
    #[error("page at {gpa} of the memory is populated already; a lazy restore needs fresh memory")]
    NotFresh {
        /// The first populated page.
        gpa: GuestPhysAddr,
    },
    /// Memory whose frames are not in a file (anonymous memory).
    #[error("lazy restore needs memfd-backed memory")]
    NotMemfd,
    /// Memory on huge pages (a hugetlb memfd): a missing-page fault there
    /// is served a whole huge page at a time, which the 4 KiB pages of a
    /// snapshot do not fill; restore into 4 KiB memfd memory.
    #[error("lazy restore needs 4 KiB pages; this memory's frames are {granule:?} huge pages")]
    HugePages {
        /// The frame store's granule.
        granule: PageSize,
    },
    /// A working-set file that cannot be read or written, or is damaged.
    #[error("working-set file {path}: {what}")]
    WorkingSet {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// A thread of the restore panicked (the fetch thread: in the
    /// caller's [`on_fetch`](LazyOptions::on_fetch) hook, say) before every
    /// page was placed: the memory is not restored and must be discarded.
    #[error("the lazy restore's {0} thread panicked; the memory is not fully restored")]
    Panicked(&'static str),
    /// A thread could not be started.
    #[error("starting the {0} thread: {1}")]
    Thread(&'static str, #[source] std::io::Error),
}

/// What a lazy restore did. `on_fault + fetched + found + zero_untouched
/// + damaged == pages`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Pages of the layout.
    pub pages: u64,
    /// Pages placed by the fault handler on first touch (zero pages
    /// included).
    pub on_fault: u64,
    /// Stored pages placed by the fetch thread.
    pub fetched: u64,
    /// Of `fetched`, those fetched first because the working set named them.
    pub working_set: u64,
    /// Stored pages there before this restore placed them: a restore
    /// folded on arrival ([`restore_folded_lazy`](super::restore_folded_lazy))
    /// finds the pages another clone of the snapshot filled into the
    /// image they share (all of them where the image was there already).
    pub found: u64,
    /// Zero pages nobody touched while registered: left to the kernel.
    pub zero_untouched: u64,
    /// Zero pages of the snapshot (touched or not).
    pub zero_pages: u64,
    /// Pages whose snapshot bytes were damaged (poisoned, or zero-filled
    /// where the kernel cannot poison).
    pub damaged: u64,
}

/// One region as the threads see it: its first page index, pages, and
/// guest address (the fault machinery numbers pages, the hook names them).
pub(super) struct Span {
    pub(super) first: u64,
    pub(super) pages: u64,
    pub(super) gpa: GuestPhysAddr,
    /// Whether the region maps the arriving image (a restore folded on
    /// arrival) rather than its own frames.
    pub(super) on_image: bool,
    /// Whether its pages, copied into its own frames, are written into
    /// the arriving image too (a region the image was made for that could
    /// not be remapped onto it).
    pub(super) feeds_image: bool,
    /// The image's index of the span's first page (on or feeding it).
    pub(super) image_first: u64,
    /// Keeps the mapping alive while the threads run.
    pub(super) _region: Arc<GuestRegion>,
}

struct Shared {
    snap: Arc<SnapshotReader>,
    /// The image a restore folded on arrival fills: page `p` of a span on
    /// the image is its page `p`, placed by writing it there (the clone's
    /// private mapping of the frame then finds it).
    image: Option<Arc<ArrivingImage>>,
    /// The registered ranges and a bit per page: placed (or, for zero
    /// pages, counted).
    pages: Arc<MissingPages>,
    spans: Vec<Span>,
    stop: AtomicBool,
    error: Mutex<Option<LazyError>>,
    touched: Mutex<Vec<u64>>,
    record: usize,
    on_fault: AtomicU64,
    fetched: AtomicU64,
    found: AtomicU64,
    working_set: AtomicU64,
    zero_untouched: AtomicU64,
    zero_pages: AtomicU64,
    damaged: AtomicU64,
}

/// A lazy restore in progress. [`wait`](Self::wait) for every page;
/// dropping it before then stops its threads and unregisters the memory,
/// whose unfetched pages then read as zeros: discard such memory.
pub struct LazyRestore {
    shared: Arc<Shared>,
    mem: GuestMemory,
    handler: Option<FaultServer>,
    fetcher: Option<JoinHandle<()>>,
    working_set: Option<PathBuf>,
    released: bool,
    /// A restore folded on arrival: the dedup host's side, told when every
    /// page is there (dropped unarrived, it discards the VM).
    arrival: Option<Arrival>,
    /// The pages outside the spans (mapped whole by a folded restore):
    /// counted by the caller, added to the stats.
    outside: LazyStats,
}

impl std::fmt::Debug for LazyRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRestore")
            .field("pages", &self.shared.pages.pages())
            .finish_non_exhaustive()
    }
}

/// Starts restoring `snap` (with its ancestors attached) into `mem`, which
/// must be fresh (no page populated) memfd memory of the snapshot's layout,
/// and returns at once: the guest may run. Every touch of a page not yet
/// present waits in the kernel until the page is placed from the snapshot.
pub fn restore_lazy(
    snap: Arc<SnapshotReader>,
    mem: &GuestMemory,
    options: LazyOptions,
) -> Result<LazyRestore, LazyError> {
    if let Some(what) = snap.layout().differs(&PageLayout::of(mem)) {
        return Err(SnapshotError::LayoutMismatch { what }.into());
    }
    if !mem.frame_store().has_file() {
        return Err(LazyError::NotMemfd);
    }
    let granule = mem.frame_store().granule();
    if granule != PageSize::Size4K {
        return Err(LazyError::HugePages { granule });
    }
    let uffd = Userfault::new_missing()?;
    // A memory made of the same regions: holds their mappings and claims.
    let own = GuestMemory::from_regions(mem.regions().to_vec()).map_err(|e| {
        SnapshotError::LayoutMismatch {
            what: e.to_string(),
        }
    })?;
    if !own.claim_for_dedup() {
        return Err(LazyError::Claimed);
    }
    let release = |e: LazyError| {
        own.release_from_dedup();
        e
    };
    let mut spans = Vec::with_capacity(own.regions().len());
    for (i, r) in own.regions().iter().enumerate() {
        match first_used_page(r) {
            Some(None) => {}
            Some(Some(k)) => {
                let gpa = GuestPhysAddr(r.start().0 + k as u64 * PAGE);
                return Err(release(LazyError::NotFresh { gpa }));
            }
            None => {
                let gpa = r.start();
                return Err(release(LazyError::NotFresh { gpa }));
            }
        }
        let first = snap.layout().first_page(i);
        spans.push(Span {
            first,
            pages: r.pages() as u64,
            gpa: r.start(),
            on_image: false,
            feeds_image: false,
            image_first: 0,
            _region: Arc::clone(r),
        });
    }
    start(snap, own, spans, uffd, None, true, options)
}

/// Starts a lazy restore of `snap` into `own` (a memory of its regions,
/// claimed: by this restore where `claimed_here`, else by a dedup host),
/// the regions `spans` lists (on the arriving image of `arrival`, or on their
/// own fresh frames): registers them with `uffd`, then starts the fault
/// server and the fetch thread. On an error nothing is registered, a
/// claim of this restore's own ends, and a VM still arriving is discarded.
pub(super) fn start(
    snap: Arc<SnapshotReader>,
    own: GuestMemory,
    spans: Vec<Span>,
    uffd: Userfault,
    arrival: Option<Arrival>,
    claimed_here: bool,
    options: LazyOptions,
) -> Result<LazyRestore, LazyError> {
    let fail = |e: LazyError| {
        if claimed_here {
            own.release_from_dedup();
        }
        e
    };
    let ws = match &options.working_set {
        Some(p) => read_working_set(p, snap.pages()).map_err(fail)?,
        None => Vec::new(),
    };
    let ranges = spans
        .iter()
        .map(|s| MissingSpan {
            host: s._region.host_addr(),
            len: s._region.size(),
            first: s.first,
        })
        .collect();
    let pages = Arc::new(MissingPages::register(uffd, ranges).map_err(|e| fail(e.into()))?);
    let image = arrival.as_ref().and_then(|a| a.image().cloned());
    let shared = Arc::new(Shared {
        snap,
        image,
        pages: Arc::clone(&pages),
        spans,
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        touched: Mutex::new(Vec::new()),
        record: options.record_pages,
        on_fault: AtomicU64::new(0),
        fetched: AtomicU64::new(0),
        found: AtomicU64::new(0),
        working_set: AtomicU64::new(0),
        zero_untouched: AtomicU64::new(0),
        zero_pages: AtomicU64::new(0),
        damaged: AtomicU64::new(0),
    });
    let mut lazy = LazyRestore {
        shared: Arc::clone(&shared),
        mem: own,
        handler: None,
        fetcher: None,
        working_set: options.working_set.clone(),
        // Memory a dedup host claimed stays its.
        released: !claimed_here,
        arrival,
        outside: LazyStats::default(),
    };
    // From here an error drops `lazy`, which unregisters the memory, stops
    // what started, ends a claim of its own (and discards a VM still
    // arriving).
    lazy.handler = Some(
        FaultServer::start(pages, Arc::clone(&shared), "pagefold-lazy-fault")
            .map_err(|e| LazyError::Thread("fault handler", e))?,
    );
    let s = Arc::clone(&shared);
    let hook = options.on_fetch.clone();
    let delay = options.fetch_delay;
    lazy.fetcher = Some(
        std::thread::Builder::new()
            .name("pagefold-lazy-fetch".into())
            .spawn(move || {
                if sleep_unless_stopped(&s.stop, delay) {
                    fetch_all(&s, &ws, hook.as_ref());
                }
            })
            .map_err(|e| LazyError::Thread("fetch", e))?,
    );
    Ok(lazy)
}

impl LazyRestore {
    /// Pages present (or counted, for zero pages) so far.
    pub fn pages_done(&self) -> u64 {
        self.shared.pages.done_count() + self.outside.found + self.outside.zero_pages
    }

    /// Counts `outside` (pages of regions not in the spans, there already)
    /// in the stats.
    pub(super) fn with_outside(mut self, outside: LazyStats) -> Self {
        self.outside = outside;
        self
    }

    /// Waits until every page is present, unregisters the memory, writes
    /// the working-set file (if asked), and returns what was done, or the
    /// first error met (the memory must then be discarded: a damaged page
    /// is poisoned, or zero where the kernel cannot poison).
    pub fn wait(mut self) -> Result<LazyStats, LazyError> {
        if let Some(f) = self.fetcher.take() {
            if f.join().is_err() {
                // It stopped short: the pages it did not place would read
                // as zeros once the ranges are unregistered.
                self.shared.record_error(LazyError::Panicked("fetch"));
            }
        }
        // Kept past the threads' end where the fetch placed every page:
        // dropped on an error below, it discards the VM. Where it failed
        // (pages may be missing from the image), left for `stop_threads`
        // to discard the VM before the ranges are unregistered.
        let failed = lock(&self.shared.error).is_some();
        let arrival = if failed { None } else { self.arrival.take() };
        self.stop_threads();
        if let Some(e) = lock(&self.shared.error).take() {
            return Err(e);
        }
        if let Some(arrival) = arrival {
            // Every page is in the image: the VM is an ordinary one of
            // its host from here.
            arrival.arrived().map_err(SnapshotError::from)?;
        }
        let s = &self.shared;
        let stats = LazyStats {
            pages: s.snap.pages(),
            on_fault: s.on_fault.load(Ordering::Relaxed),
            fetched: s.fetched.load(Ordering::Relaxed),
            found: s.found.load(Ordering::Relaxed) + self.outside.found,
            working_set: s.working_set.load(Ordering::Relaxed),
            zero_untouched: s.zero_untouched.load(Ordering::Relaxed) + self.outside.zero_untouched,
            zero_pages: s.zero_pages.load(Ordering::Relaxed) + self.outside.zero_pages,
            damaged: s.damaged.load(Ordering::Relaxed),
        };
        if let (Some(path), true) = (&self.working_set, s.record > 0) {
            let touched = lock(&s.touched).clone();
            write_working_set(path, &touched)?;
        }
        Ok(stats)
    }

    /// Stops the fetch thread (if running), unregisters every region (so
    /// no toucher waits on a handler that is gone), stops the handler, and
    /// ends the claim on the memory.
    fn stop_threads(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::Release);
        if let Some(f) = self.fetcher.take() {
            let _ = f.join();
        }
        // Still arriving (not waited for, or failed): its host discards it
        // now, while its ranges are registered and served. Once they are
        // not, an access to a page not in the image yet no longer faults:
        // shmem fills the image's frame with zeros, which another clone
        // arriving on the image then maps as the page (found by review).
        self.arrival = None;
        s.pages.unregister_all();
        if let Some(mut h) = self.handler.take() {
            h.stop();
        }
        if !self.released {
            self.mem.release_from_dedup();
            self.released = true;
        }
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn record_error(&self, e: LazyError) {
        if self.pages.is_finishing() {
            return; // the ranges are being unregistered: expected
        }
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// Marks page `page` done; whether this call did.
    fn mark(&self, page: u64) -> bool {
        self.pages.mark(page)
    }

    fn is_done(&self, page: u64) -> bool {
        self.pages.is_done(page)
    }

    /// A page of `file` (the snapshot or an ancestor) read damaged:
    /// record the error (naming an ancestor's file: the caller named only
    /// the newest), then poison the page (or zero it) so its waiters wake.
    fn damaged_in(&self, file: &SnapshotReader, page: u64, e: SnapshotError) {
        if std::ptr::eq(file, &*self.snap) {
            self.damaged(page, e);
        } else {
            self.damaged(page, file.name_error(e));
        }
    }

    /// A damaged page: record the error, then poison it (or zero it) so
    /// its waiters wake.
    fn damaged(&self, page: u64, e: SnapshotError) {
        self.record_error(e.into());
        match self.pages.poison(page) {
            Ok(true) => {
                if self.mark(page) {
                    self.damaged.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(false) => {}
            Err(e) => self.record_error(e.into()),
        }
    }

    /// The arriving image, if page `page` maps it.
    fn image_at(&self, page: u64) -> Option<OnImage<'_>> {
        let image = self.image.as_deref()?;
        self.span_of(page)
            .filter(|sp| sp.on_image)
            .map(|sp| OnImage::of(image, sp))
    }

    /// The arriving image, if page `page` is copied into its own frame
    /// and written into the image too.
    fn image_fed_at(&self, page: u64) -> Option<OnImage<'_>> {
        let image = self.image.as_deref()?;
        self.span_of(page)
            .filter(|sp| sp.feeds_image)
            .map(|sp| OnImage::of(image, sp))
    }

    fn span_of(&self, page: u64) -> Option<&Span> {
        self.spans
            .iter()
            .find(|sp| page >= sp.first && page - sp.first < sp.pages)
    }

    /// Writes `bytes` (pages `page..`, read for a copy) into the image
    /// where the span feeds it.
    fn feed_image(&self, page: u64, bytes: &[u8]) {
        if let Some(image) = self.image_fed_at(page) {
            if let Err(e) = image.fill(page, bytes) {
                self.record_error(SnapshotError::from(e).into());
            }
        }
    }

    /// Places pages `page..` of the arriving image `image` from `bytes`
    /// (whole pages, one span): writes what is not in the image yet into
    /// it (the frame, never this clone's mapping: the retried access maps
    /// the frame, copy-on-write), marks the pages present and wakes their
    /// waiters. Returns the pages this call filled into the image and the
    /// pages it marked present here (a page another clone filled is marked
    /// but not filled; one this clone's other thread marked, neither).
    fn fill_image(
        &self,
        image: OnImage<'_>,
        page: u64,
        bytes: &[u8],
    ) -> Result<(u64, u64), LazyError> {
        let n = (bytes.len() / PAGE_SIZE) as u64;
        let filled = image.fill(page, bytes).map_err(SnapshotError::from)?;
        // Marked after the write: a page seen present is in the frame.
        let marked = (page..page + n).filter(|&p| self.mark(p)).count() as u64;
        self.pages.wake(page, n)?;
        Ok((filled, marked))
    }

    /// Serves one fault on page `page`.
    fn serve(&self, page: u64) {
        let Some(at) = self.pages.host_of(page) else {
            return;
        };
        let image = self.image_at(page);
        let how = match self.snap.locate(page) {
            Err(e) => {
                self.damaged(page, e);
                return;
            }
            Ok(Located::Zero) => Serve::Zero,
            Ok(Located::Stored { file, slot }) => match image {
                None => Serve::Copy { file, slot },
                // A page of zeros stored (another saver's file) is a hole
                // of the image: zeros in this clone's mapping alone.
                Some(i) if i.is_zero(page) => Serve::Zero,
                // Another clone (or this one's fetch) filled it.
                Some(i) if i.is_filled(page) => Serve::Filled,
                Some(i) => Serve::Fill {
                    image: i,
                    file,
                    slot,
                },
            },
        };
        let placed: Result<bool, LazyError> = match how {
            Serve::Zero => {
                let r = self.pages.zero(page);
                if let Ok(true) = r {
                    if self.mark(page) {
                        self.zero_pages.fetch_add(1, Ordering::Relaxed);
                        self.on_fault.fetch_add(1, Ordering::Relaxed);
                    }
                }
                r.map_err(Into::into)
            }
            Serve::Filled => {
                if self.mark(page) {
                    self.found.fetch_add(1, Ordering::Relaxed);
                }
                // Woken below.
                Ok(false)
            }
            Serve::Copy { file, slot } | Serve::Fill { file, slot, .. } => {
                let mut buf = [0u8; PAGE_SIZE];
                if let Err(e) = file.read_slots_here(slot, &mut buf) {
                    self.damaged_in(file, page, e);
                    return;
                }
                match how {
                    Serve::Fill { image, .. } => {
                        self.fill_image(image, page, &buf).map(|(filled, marked)| {
                            // Filled by another clone meanwhile: found.
                            let count = if filled > 0 {
                                &self.on_fault
                            } else {
                                &self.found
                            };
                            count.fetch_add(marked, Ordering::Relaxed);
                            marked > 0
                        })
                    }
                    _ => match self.pages.uffd().copy(at, &buf) {
                        Ok(c) => {
                            self.feed_image(page, &buf);
                            let placed = !c.exists && self.mark(page);
                            self.on_fault
                                .fetch_add(u64::from(placed), Ordering::Relaxed);
                            Ok(placed)
                        }
                        Err(e) => Err(e.into()),
                    },
                }
            }
        };
        match placed {
            Ok(true) => {
                if self.record > 0 {
                    let mut t = lock(&self.touched);
                    if t.len() < self.record {
                        t.push(page);
                    }
                }
            }
            // Placed by the fetch thread (or another clone) meanwhile: its
            // placing woke the waiters, but wake again in case this fault
            // came after.
            Ok(false) => {
                let _ = self.pages.wake(page, 1);
            }
            Err(e) => {
                // The kernel would not place the page (no memory, a copy
                // that kept failing): never leave the toucher waiting, and
                // never show it bytes that are not the page's. Poisoned as
                // a damaged page is (zeros only where the kernel cannot
                // poison, `wait`'s error then the only signal). (Found by
                // review: it was zero-filled, and the guest ran on.)
                self.record_error(e);
                match self.pages.poison(page) {
                    Ok(true) => {
                        if self.mark(page) {
                            self.damaged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(false) => {}
                    Err(_) => {
                        let _ = self.pages.zero(page);
                    }
                }
                let _ = self.pages.wake(page, 1);
            }
        }
    }
}

/// How [`Shared::serve`] serves a fault.
#[derive(Clone, Copy)]
enum Serve<'a> {
    /// Zeros in this mapping.
    Zero,
    /// The image holds it already: only wake.
    Filled,
    /// Copied into this mapping (`UFFDIO_COPY`) from a slot of a file.
    Copy { file: &'a SnapshotReader, slot: u64 },
    /// Written into the arriving image from a slot of a file.
    Fill {
        image: OnImage<'a>,
        file: &'a SnapshotReader,
        slot: u64,
    },
}

/// The pages of one span on the arriving image: page `p` of the restore
/// is page `p - span.first + span.image_first` of the image.
#[derive(Clone, Copy)]
struct OnImage<'a> {
    image: &'a ArrivingImage,
    span_first: u64,
    image_first: u64,
}

impl<'a> OnImage<'a> {
    fn of(image: &'a ArrivingImage, span: &Span) -> Self {
        OnImage {
            image,
            span_first: span.first,
            image_first: span.image_first,
        }
    }

    /// The image's index of page `page` (of this span).
    fn at(self, page: u64) -> u64 {
        page - self.span_first + self.image_first
    }

    fn is_zero(self, page: u64) -> bool {
        self.image.is_zero(self.at(page))
    }

    fn is_filled(self, page: u64) -> bool {
        self.image.is_filled(self.at(page))
    }

    fn fill(self, page: u64, bytes: &[u8]) -> Result<u64, crate::dedup::DedupError> {
        self.image.fill(self.at(page), bytes)
    }
}

impl FaultSource for Shared {
    fn fault(&self, _pages: &MissingPages, page: u64) {
        self.serve(page);
    }

    fn error(&self, error: UserfaultError) {
        self.record_error(error.into());
    }
}

/// The first page of `r` that is not fresh (it maps another frame, or its
/// own frame holds data: in memory or swapped out), `Some(None)` if every
/// page is fresh, `None` where the kernel would not say. A page that is
/// not fresh never faults in missing mode, so a lazy restore would leave
/// its old bytes in place of the snapshot's.
fn first_used_page(r: &GuestRegion) -> Option<Option<usize>> {
    let states = r.page_states();
    if let Some(p) = (0..r.pages()).find(|&p| states.load(p).is_remapped()) {
        return Some(Some(p));
    }
    // One `SEEK_DATA` over the region's own frames: it counts a page the
    // host swapped out as data, where `mincore` (one lookup per page, and
    // slower: a millisecond per GiB) calls it absent.
    if let Ok(fd) = r.store().file("checking memory is fresh") {
        let start = r.own_frame(0).file_offset();
        let end = start + r.pages() as u64 * PAGE;
        match seek_data(fd, start) {
            DataFrom::None => return Some(None),
            DataFrom::At(at) if at >= end => return Some(None),
            DataFrom::At(at) => return Some(Some(((at - start) / PAGE) as usize)),
            DataFrom::Unknown => {}
        }
    }
    let v = r.resident(0, r.pages())?;
    Some(v.iter().position(|b| b & 1 != 0))
}

/// Sleeps `delay` in steps of at most a millisecond; `false` if `stop`
/// was set meanwhile (the restore was dropped).
fn sleep_unless_stopped(stop: &AtomicBool, delay: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + delay;
    loop {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        let now = std::time::Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(std::time::Duration::from_millis(1)));
    }
}

/// The fetch thread: the working set, then every page in order.
fn fetch_all(s: &Shared, ws: &[u64], hook: Option<&FetchHook>) {
    let mut buf = vec![0u8; BATCH * PAGE_SIZE];
    for &page in ws {
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        // A page of a region this restore does not place (one a folded
        // restore mapped whole) is not its to fetch.
        if s.span_of(page).is_some() && fetch_run(s, page, 1, &mut buf, hook) > 0 {
            s.working_set.fetch_add(1, Ordering::Relaxed);
        }
    }
    for span in &s.spans {
        // Runs never cross a region's end: host addresses jump there.
        let end = span.first + span.pages;
        let mut k = span.first;
        while k < end {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let n = (BATCH as u64).min(end - k);
            fetch_run(s, k, n, &mut buf, hook);
            k += n;
        }
    }
}

/// Fetches pages `[first, first + n)` (one region) not yet present;
/// returns how many stored pages it placed.
fn fetch_run(s: &Shared, first: u64, n: u64, buf: &mut [u8], hook: Option<&FetchHook>) -> u64 {
    let mut placed = 0;
    let mut j = first;
    let end = first + n;
    let image = s.image_at(first);
    // Filled into the image by another clone: nothing to read.
    let filled = |p: u64| image.is_some_and(|i| i.is_filled(p));
    while j < end {
        if s.is_done(j) {
            j += 1;
            continue;
        }
        if filled(j) {
            if s.mark(j) {
                s.found.fetch_add(1, Ordering::Relaxed);
            }
            j += 1;
            continue;
        }
        let loc = match s.snap.locate(j) {
            Ok(l) => l,
            Err(e) => {
                s.damaged(j, e);
                j += 1;
                continue;
            }
        };
        // An image's hole (a zero page, or a stored page of zeros).
        let hole = |p: u64| image.is_some_and(|i| i.is_zero(p));
        match loc {
            _ if hole(j) => {
                // Mapped as zeros here, untouched: the clone's first read
                // of it would otherwise fill the hole in the image's
                // frame (shmem allocates a page for a read of a hole).
                let mut e = j + 1;
                while e < end && hole(e) && !s.is_done(e) {
                    e += 1;
                }
                zero_untouched(s, j, e);
                j = e;
            }
            Located::Zero => {
                if s.mark(j) {
                    s.zero_pages.fetch_add(1, Ordering::Relaxed);
                    s.zero_untouched.fetch_add(1, Ordering::Relaxed);
                }
                j += 1;
            }
            Located::Stored { file, slot } => {
                // The run of consecutive slots of one file, not done.
                let mut e = j + 1;
                while e < end && !s.is_done(e) && !filled(e) {
                    match s.snap.locate(e) {
                        Ok(Located::Stored { file: f, slot: sl })
                            if std::ptr::eq(f, file) && sl == slot + (e - j) =>
                        {
                            e += 1
                        }
                        _ => break,
                    }
                }
                let len = bytes_of(e - j);
                let dst = &mut buf[..len];
                if file.read_slots(slot, dst).is_err() {
                    // Find the damaged page(s): one page at a time.
                    for p in j..e {
                        let one = &mut dst[..PAGE_SIZE];
                        match file.read_slots(slot + (p - j), one) {
                            Ok(()) => placed += place(s, p, one, hook),
                            Err(err) => s.damaged_in(file, p, err),
                        }
                    }
                } else {
                    let mut p = j;
                    while p < e {
                        let off = bytes_of(p - j);
                        placed += place_run(s, p, e, &dst[off..], hook, &mut p);
                    }
                }
                j = e;
            }
        }
    }
    placed
}

/// Maps untouched zero pages `[from, to)` (one span, on an image) as
/// zeros in this clone's mapping, a run per ioctl where none was touched
/// meanwhile, else page by page, and counts them.
fn zero_untouched(s: &Shared, from: u64, to: u64) {
    let whole = s
        .pages
        .host_of(from)
        .map(|at| s.pages.uffd().zero(at, (to - from) * PAGE));
    if !matches!(whole, Some(Ok(true))) {
        // Page by page. One present already (zeroed by the run's ioctl
        // before it met a page the handler placed, or placed by the
        // handler) or no longer registered (discarded: its own frame's
        // hole) is done all the same, and `mark` counts each page once
        // (found by review: such pages were never counted, so the stats
        // fell short of `pages`).
        for p in from..to {
            let _ = s.pages.zero(p);
        }
    }
    for p in from..to {
        if s.mark(p) {
            s.zero_pages.fetch_add(1, Ordering::Relaxed);
            s.zero_untouched.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Places one page `page` from `bytes`; 1 if this call placed it.
fn place(s: &Shared, page: u64, bytes: &[u8], hook: Option<&FetchHook>) -> u64 {
    let mut p = page;
    place_run(s, page, page + 1, bytes, hook, &mut p)
}

/// Copies pages `[from, to)` from `bytes` with one ioctl where it can;
/// advances `*at` past what it handled (placed, or present already).
fn place_run(
    s: &Shared,
    from: u64,
    to: u64,
    bytes: &[u8],
    hook: Option<&FetchHook>,
    at: &mut u64,
) -> u64 {
    if s.pages.host_of(from).is_none() {
        *at = to;
        return 0;
    }
    let len = bytes_of(to - from);
    if let Some(image) = s.image_at(from) {
        *at = to;
        return match s.fill_image(image, from, &bytes[..len]) {
            Ok((filled, marked)) => {
                // What another clone filled meanwhile was found, not
                // fetched (and a page this clone's fault served is neither).
                let fetched = filled.min(marked);
                s.fetched.fetch_add(fetched, Ordering::Relaxed);
                s.found.fetch_add(marked - fetched, Ordering::Relaxed);
                if let Some(h) = hook {
                    for p in from..to {
                        h(page_gpa(s, p));
                    }
                }
                fetched
            }
            Err(e) => {
                s.record_error(e);
                0
            }
        };
    }
    match s.pages.place(from, &bytes[..len]) {
        Ok(c) => {
            let pages = c.bytes / PAGE;
            s.feed_image(from, &bytes[..bytes_of(pages)]);
            for p in from..from + pages {
                if let Some(h) = hook {
                    h(page_gpa(s, p));
                }
            }
            s.fetched.fetch_add(pages, Ordering::Relaxed);
            // A page present already: someone placed it; skip it.
            *at = from + pages + u64::from(c.exists);
            pages
        }
        Err(e) => {
            s.record_error(e.into());
            *at = to;
            0
        }
    }
}

/// Bytes of `pages` pages of one run (at most a batch, so it fits).
fn bytes_of(pages: u64) -> usize {
    usize::try_from(pages).map_or(usize::MAX, |n| n.saturating_mul(PAGE_SIZE))
}

fn page_gpa(s: &Shared, page: u64) -> GuestPhysAddr {
    s.spans
        .iter()
        .find(|sp| page >= sp.first && page - sp.first < sp.pages)
        .map_or(GuestPhysAddr(0), |sp| {
            GuestPhysAddr(sp.gpa.0 + (page - sp.first) * PAGE)
        })
}

/// Reads a working-set file: page indexes below `pages`. A file that does
/// not exist is an empty set.
fn read_working_set(path: &Path, pages: u64) -> Result<Vec<u64>, LazyError> {
    let bad = |what: String| LazyError::WorkingSet {
        path: path.to_path_buf(),
        what,
    };
    // A regular file only (a FIFO would hang the restore, a device such
    // as /dev/zero grow a buffer until memory ran out), and no longer than
    // a set of every page.
    let mut file = match super::file::open_regular(path, false) {
        Ok(f) => f,
        Err(Some(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(Some(e)) => return Err(bad(e.to_string())),
        Err(None) => return Err(bad("not a regular file".into())),
    };
    let most = pages.saturating_mul(8).saturating_add(16);
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if len > most {
        return Err(bad(format!(
            "{len} bytes, more than a set of the snapshot's {pages} pages ({most})"
        )));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, most), &mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() < 16 || &bytes[..8] != WS_MAGIC {
        return Err(bad("no working-set header (magic PFWSET1)".into()));
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let count = word(8);
    let body = (bytes.len() - 16) / 8;
    if (bytes.len() - 16) % 8 != 0 || count != body as u64 {
        return Err(bad(format!(
            "count {count}, the file holds {} bytes of pages",
            bytes.len() - 16
        )));
    }
    (0..body)
        .map(|i| {
            let p = word(16 + i * 8);
            if p < pages {
                Ok(p)
            } else {
                Err(bad(format!(
                    "page {p} at byte {} is not below the snapshot's {pages}",
                    16 + i * 8
                )))
            }
        })
        .collect()
}

/// Writes a working-set file beside its name (a fresh temporary file of
/// the owner's only, removed on error, as a snapshot's), then renames it
/// into place.
fn write_working_set(path: &Path, pages: &[u64]) -> Result<(), LazyError> {
    let bad = |e: SnapshotError| LazyError::WorkingSet {
        path: path.to_path_buf(),
        what: e.to_string(),
    };
    let mut out = Vec::with_capacity(16 + pages.len() * 8);
    out.extend_from_slice(WS_MAGIC);
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let mut f = NewFile::create(path).map_err(bad)?;
    f.write(&out, Part::Header).map_err(bad)?;
    f.finish(&out[..16]).map_err(bad)
}
