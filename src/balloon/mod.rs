//! The memory side of virtio-balloon: what the guest gives up goes back to
//! the host, for real.
//!
//! A VMM's balloon device hands [`Balloon`] what arrives on its queues:
//! inflate and deflate lists of 4 KiB guest frame numbers (as slices of
//! [`GuestFrame`], or as the raw little-endian 32-bit PFNs of the virtio
//! inflate and deflate queues), free page reports (ranges of 2^order pages)
//! and the stats queue's `(u16 tag, u64 value)` entries.
//!
//! * **Release by backing.** On a 4 KiB memfd store, an inflated page is
//!   punched out of the memfd (one `fallocate(PUNCH_HOLE)` per contiguous
//!   run, however many PFNs). On a hugetlb store, a huge page can only be
//!   released whole: inflated 4 KiB pages are collected in a bitmap per huge
//!   page and the huge page is punched when all of its 4 KiB pages are in the
//!   balloon; until then they stay mapped (and count in [`Balloon::actual`]).
//!   pagefold has no anonymous-memory backing (every region lives in a frame
//!   store's memfd, which is what lets dedup share frames), so there is no
//!   `MADV_DONTNEED` path.
//! * **State.** An inflated page's state word says
//!   [`PageKind::Ballooned`](crate::memory::PageKind::Ballooned): dedup
//!   skips it (the scanner only merges private pages), pre-copy migration
//!   sends it as nothing, it reads as zeros (a library read takes them from the memfd,
//!   so it gives the page no memory). A page that was already released as zero
//!   becomes ballooned without a second release. A library write to a
//!   ballooned page takes it back: it counts as deflated
//!   ([`Balloon::deflated`]). A guest that touches a ballooned page through
//!   the raw mapping (a vCPU, a device) reads zeros — the kernel gives it a
//!   zeroed page again — and [`Balloon::reclaim_touched`] finds such pages
//!   (their frame holds memory again) and counts them as deflated; a
//!   library read that finds one first (4 KiB stores) takes it back and
//!   counts it the same way, once.
//! * **Shared pages.** A page merged by dedup (shared or remapped) is
//!   released through the dedup host when the balloon knows it
//!   ([`Balloon::with_dedup`]): the host breaks the page's sharing as on a
//!   copy-on-write break (its shared frame loses one reference, counted again
//!   from the page states at the host's next recount, and is freed if it was
//!   the last), then the page is ballooned as a private one. If breaking
//!   the sharing fails (the process's mappings are used up, or the store
//!   fails) the entry gets [`BalloonError::Unmerge`] and the page stays
//!   merged; with the mapping budget spent, the unmerge takes back the near
//!   side of the page's merged stretch too. Without a host it is refused
//!   with [`BalloonError::Shared`] for that entry.
//! * **Untrusted input.** A PFN out of range, in a hole between regions,
//!   repeated within a batch, beyond the batch limit, already in the balloon,
//!   locked by another layer, or shared is a typed error for that entry
//!   ([`EntryError`]); the rest of the batch is applied ([`BatchReport`]).
//! * **Deflate on OOM.** With `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` the guest
//!   deflates on its own, without the host's consent, through the ordinary
//!   deflate queue. [`Balloon::deflate_pfns`] therefore never refuses a
//!   valid page; when a deflate takes [`Balloon::actual`] below
//!   [`Balloon::target`], those pages are counted as OOM deflates
//!   ([`Balloon::oom_deflated`]) and the hook set by
//!   [`Balloon::set_oom_hook`] is called with their number, so the VMM can
//!   lower its target or tell its management layer.
//! * **Free page reporting** ([`Balloon::report_free`]) releases the memory
//!   but the pages stay the guest's: they become zero pages, not ballooned
//!   ones, and do not count in [`Balloon::actual`].
//!
//! Files: `batch.rs` screens and locates what arrives (PFN lists, le32
//! queue payloads, ranges, free page reports) and hands the entries to
//! `apply.rs`, which takes and punches 4 KiB pages run by run, or passes
//! each to `huge.rs` on a hugetlb store; `page.rs` holds one page's state
//! transitions, which both use; `touched.rs` finds ballooned pages the
//! guest touched; `stats.rs` parses the stats queue; `error.rs` has the
//! errors and batch reports. This file has the [`Balloon`] itself, its
//! options and its counters.

mod apply;
mod batch;
mod error;
mod huge;
mod page;
mod stats;
mod touched;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

pub use self::{
    error::{BalloonError, BatchReport, EntryError},
    stats::{BalloonStats, STAT_ENTRY_SIZE},
};
use crate::{
    addr::{usize_from, GuestFrame, PAGE_SHIFT, PAGE_SIZE},
    dedup::{DedupHost, VmId},
    memory::GuestMemory,
};

/// Virtio's default: a `virtio_balloon` inflate/deflate request carries at
/// most 256 PFNs (`VIRTIO_BALLOON_ARRAY_PFNS_MAX`).
pub const DEFAULT_MAX_BATCH: usize = 256;

/// Tunables.
#[derive(Clone, Copy, Debug)]
pub struct BalloonOptions {
    /// Most PFNs one inflate/deflate request may carry; entries past it get
    /// [`BalloonError::OverLimit`].
    pub max_batch: usize,
}

impl Default for BalloonOptions {
    fn default() -> Self {
        BalloonOptions {
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

type OomHook = Box<dyn Fn(u64) + Send + Sync>;

#[derive(Default)]
struct Inner {
    /// Hugetlb only: per (region, huge page) the inflated 4 KiB pages not
    /// yet released.
    pending: HashMap<(usize, usize), Vec<u64>>,
    pending_pages: u64,
    deflated: u64,
    oom_deflated: u64,
    reported: u64,
    stats: BalloonStats,
    oom_hook: Option<OomHook>,
}

/// The balloon of one [`GuestMemory`]. `Send + Sync`; operations are
/// serialized by an internal lock.
pub struct Balloon {
    mem: Arc<GuestMemory>,
    options: BalloonOptions,
    target: AtomicU64,
    /// 4 KiB pages per store granule (1 for a 4 KiB memfd store).
    huge_pages: usize,
    inner: Mutex<Inner>,
    /// The dedup host the memory is registered with, if any: a shared page
    /// to balloon is unmerged through it first (see [`Balloon::with_dedup`]).
    dedup: Option<(Arc<DedupHost>, VmId)>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("options", &self.options)
            .field("target", &self.target())
            .finish_non_exhaustive()
    }
}

/// Where a page lives.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Loc {
    region: usize,
    page: usize,
}

impl Balloon {
    /// A balloon over `mem` with default options.
    pub fn new(mem: Arc<GuestMemory>) -> Self {
        Self::with_options(mem, BalloonOptions::default())
    }

    /// A balloon over `mem`.
    pub fn with_options(mem: Arc<GuestMemory>, options: BalloonOptions) -> Self {
        let granule = mem.frame_store().granule().bytes();
        let huge_pages = usize::try_from(granule / PAGE_SIZE as u64)
            .unwrap_or(1)
            .max(1);
        Balloon {
            mem,
            options,
            target: AtomicU64::new(0),
            huge_pages,
            inner: Mutex::new(Inner::default()),
            dedup: None,
        }
    }

    /// The same balloon for a memory registered with `host` as `vm`: an
    /// inflate of a page that dedup merged first breaks its sharing through
    /// the host (`DedupHost::resolve_write_fault`: the bytes go back to the
    /// page's own frame and the shared frame loses this page's reference,
    /// as on a copy-on-write break — freed at the host's next recount if it
    /// was the last), then releases the page like any other. Without it,
    /// such pages are refused with [`BalloonError::Shared`]. `vm` must be
    /// the id this balloon's memory is registered under
    /// ([`DedupHost::memory`] says which memory an id names; the C API checks
    /// it): with another VM's id, an inflate would unmerge that VM's page at
    /// the same address and then find its own page still shared.
    pub fn with_dedup(mut self, host: Arc<DedupHost>, vm: VmId) -> Self {
        self.dedup = Some((host, vm));
        self
    }

    /// The memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the number of 4 KiB pages the host wants in the balloon (the
    /// device's `num_pages`).
    pub fn set_target(&self, pages: u64) {
        self.target.store(pages, Ordering::Relaxed);
    }

    /// The target set last.
    pub fn target(&self) -> u64 {
        self.target.load(Ordering::Relaxed)
    }

    /// 4 KiB pages in the balloon now (the device's `actual`): ballooned
    /// pages plus, on hugetlb, pages waiting for the rest of their huge page.
    pub fn actual(&self) -> u64 {
        let pending = self.lock().pending_pages;
        self.mem.census().ballooned + pending
    }

    /// Pages deflated so far: by deflate requests, by library writes to
    /// ballooned pages, and by library reads or [`Balloon::reclaim_touched`]
    /// finding a ballooned page the guest touched (each page once).
    pub fn deflated(&self) -> u64 {
        let writes: u64 = self.mem.regions().iter().map(|r| r.balloon_taken()).sum();
        self.lock().deflated + writes
    }

    /// Pages the guest deflated below the target (deflate on OOM).
    pub fn oom_deflated(&self) -> u64 {
        self.lock().oom_deflated
    }

    /// Pages released through free page reporting so far.
    pub fn reported(&self) -> u64 {
        self.lock().reported
    }

    /// Sets the hook called with the number of pages each time a deflate
    /// takes [`actual`](Self::actual) below [`target`](Self::target)
    /// (`VIRTIO_BALLOON_F_DEFLATE_ON_OOM`). It runs under the balloon's lock:
    /// it must not call back into the balloon.
    pub fn set_oom_hook(&self, hook: impl Fn(u64) + Send + Sync + 'static) {
        self.lock().oom_hook = Some(Box::new(hook));
    }

    /// Records the stats queue's buffer; see [`BalloonStats::parse`].
    pub fn update_stats(&self, bytes: &[u8]) -> Result<BalloonStats, BalloonError> {
        let s = BalloonStats::parse(bytes)?;
        self.lock().stats = s;
        Ok(s)
    }

    /// The stats recorded last (all unset before the first).
    pub fn stats(&self) -> BalloonStats {
        self.lock().stats
    }

    /// Where guest frame `pfn` lives, or why it is no page of the memory.
    fn locate(&self, pfn: GuestFrame) -> Result<Loc, BalloonError> {
        let gpa = pfn.start().ok_or(BalloonError::OutOfRange { pfn })?;
        match self.mem.find_region(gpa) {
            Some(region) => {
                let r = &self.mem.regions()[region];
                Ok(Loc {
                    region,
                    page: usize_from((gpa.0 - r.start().0) >> PAGE_SHIFT),
                })
            }
            None => {
                let end = self.mem.regions().last().map_or(0, |r| r.end());
                let below = self.mem.regions().first().map_or(0, |r| r.start().0);
                if gpa.0 >= end || gpa.0 < below {
                    Err(BalloonError::OutOfRange { pfn })
                } else {
                    Err(BalloonError::Hole { pfn })
                }
            }
        }
    }

    /// The guest frame of a located page.
    fn pfn_of(&self, l: Loc) -> GuestFrame {
        GuestFrame(self.mem.regions()[l.region].start().frame().0 + l.page as u64)
    }

    /// The balloon releases a page by punching its frame: anonymous memory
    /// (`GuestMemory::adopt_anonymous`) has none, so inflates and free
    /// page reports of it are refused, naming the feature.
    fn check_file(&self, pfn: GuestFrame) -> Result<(), BalloonError> {
        match self.mem.frame_store().file("balloon") {
            Ok(_) => Ok(()),
            Err(source) => Err(BalloonError::Release { pfn, source }),
        }
    }
}
