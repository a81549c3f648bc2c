//! The memory side of virtio-balloon: what the guest gives up goes back to
//! the host, for real.
//!
//! A VMM's balloon device hands [`Balloon`] what arrives on its queues:
//! inflate and deflate lists of 4 KiB guest frame numbers (as slices of
//! `u64`, or as the raw little-endian 32-bit PFNs of the virtio inflate and
//! deflate queues), free page reports (ranges of 2^order pages) and the stats
//! queue's `(u16 tag, u64 value)` entries.
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
//!   [`PageKind::Ballooned`]: dedup skips it
//!   (the scanner only merges private pages), pre-copy migration sends it as
//!   nothing, it reads as zeros (a library read takes them from the memfd,
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

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use crate::{
    addr::{GuestPhysAddr, PAGE_SHIFT, PAGE_SIZE},
    dedup::{DedupHost, VmId},
    frames::{FrameError, FrameRange},
    memory::{AccessError, Flags, GuestMemory, PageKind},
};

/// Virtio's default: a `virtio_balloon` inflate/deflate request carries at
/// most 256 PFNs (`VIRTIO_BALLOON_ARRAY_PFNS_MAX`).
pub const DEFAULT_MAX_BATCH: usize = 256;

/// Why one entry of a batch (or a whole range) was not applied.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The frame lies beyond the end of guest memory.
    #[error("PFN {pfn:#x} is beyond guest memory")]
    OutOfRange {
        /// The frame number.
        pfn: u64,
    },
    /// The frame lies in a hole between regions.
    #[error("PFN {pfn:#x} is in a hole between regions")]
    Hole {
        /// The frame number.
        pfn: u64,
    },
    /// The frame appeared earlier in the same batch.
    #[error("PFN {pfn:#x} repeats entry {first}")]
    Repeated {
        /// The frame number.
        pfn: u64,
        /// Index of its first occurrence.
        first: usize,
    },
    /// The entry lies beyond the batch limit.
    #[error("entry beyond the batch limit of {limit} PFNs")]
    OverLimit {
        /// The limit.
        limit: usize,
    },
    /// Inflate of a page already in the balloon.
    #[error("PFN {pfn:#x} is already ballooned")]
    AlreadyBallooned {
        /// The frame number.
        pfn: u64,
    },
    /// Deflate of a page not in the balloon.
    #[error("PFN {pfn:#x} is not ballooned")]
    NotBallooned {
        /// The frame number.
        pfn: u64,
    },
    /// The page is merged by dedup (shared, or remapped onto another frame).
    #[error("PFN {pfn:#x} is a dedup-shared page; unmerge it first")]
    Shared {
        /// The frame number.
        pfn: u64,
    },
    /// Another layer holds the page (locked or write-protected) right now.
    #[error("PFN {pfn:#x} is busy (another layer holds it)")]
    Busy {
        /// The frame number.
        pfn: u64,
    },
    /// The queue's bytes end in a partial entry.
    #[error("a {len}-byte buffer ends in a partial {entry}-byte entry")]
    Truncated {
        /// Buffer length.
        len: usize,
        /// Entry size.
        entry: usize,
    },
    /// A range is not aligned to 4 KiB (or to the store's granule for a
    /// free page report).
    #[error("range at {addr:#x} (+{len:#x}) is not aligned to {align:#x}")]
    Misaligned {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
        /// Needed alignment.
        align: u64,
    },
    /// A free page report's order is larger than any memory.
    #[error("free page report order {order} is too large")]
    Order {
        /// The order.
        order: u32,
    },
    /// Breaking the page's dedup sharing failed for another reason than a
    /// busy page: the process's kernel mappings are used up
    /// ([`FrameError::MapLimit`] inside), or the frame store failed. The
    /// page stays merged, and reads what it read.
    #[error("PFN {pfn:#x}: breaking its dedup sharing failed: {source}")]
    Unmerge {
        /// The frame number.
        pfn: u64,
        /// What the dedup host said.
        #[source]
        source: crate::dedup::DedupError,
    },
    /// The access layer refused the range.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The host refused to release the memory.
    #[error("releasing PFN {pfn:#x}: {source}")]
    Release {
        /// First frame of the run that failed.
        pfn: u64,
        /// What the frame store said.
        source: FrameError,
    },
}

/// One entry of a batch that was not applied.
#[derive(Debug)]
pub struct EntryError {
    /// Index of the entry in the batch (for a range: the page's index in it).
    pub index: usize,
    /// Why.
    pub error: BalloonError,
}

/// What one inflate or deflate batch did.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// Entries applied.
    pub applied: u64,
    /// 4 KiB pages whose memory went back to the host in this batch (a page
    /// that was already released, or never written, counts nothing; on
    /// hugetlb, pages waiting for the rest of their huge page count when it
    /// is released).
    pub released_pages: u64,
    /// Entries not applied, in batch order.
    pub errors: Vec<EntryError>,
}

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

/// The guest's memory statistics from the stats queue (virtio tags
/// 0..=10). A tag the guest did not send is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Tag 0: bytes swapped in.
    pub swap_in: Option<u64>,
    /// Tag 1: bytes swapped out.
    pub swap_out: Option<u64>,
    /// Tag 2: major page faults.
    pub major_faults: Option<u64>,
    /// Tag 3: minor page faults.
    pub minor_faults: Option<u64>,
    /// Tag 4: free memory in bytes.
    pub free_memory: Option<u64>,
    /// Tag 5: total memory in bytes.
    pub total_memory: Option<u64>,
    /// Tag 6: available memory in bytes.
    pub available_memory: Option<u64>,
    /// Tag 7: disk caches in bytes.
    pub disk_caches: Option<u64>,
    /// Tag 8: successful hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Tag 9: failed hugetlb page allocations.
    pub hugetlb_failures: Option<u64>,
    /// Tag 10: OOM kills.
    pub oom_kills: Option<u64>,
    /// Entries with a tag pagefold does not know (ignored).
    pub unknown_tags: u32,
}

/// Size of one stats entry: `le16 tag, le64 val`, packed.
pub const STAT_ENTRY_SIZE: usize = 10;

impl BalloonStats {
    /// Parses the stats queue's buffer. Unknown tags are counted and
    /// ignored; a later entry with the same tag wins.
    pub fn parse(bytes: &[u8]) -> Result<Self, BalloonError> {
        if bytes.len() % STAT_ENTRY_SIZE != 0 {
            return Err(BalloonError::Truncated {
                len: bytes.len(),
                entry: STAT_ENTRY_SIZE,
            });
        }
        let mut s = BalloonStats::default();
        for e in bytes.chunks_exact(STAT_ENTRY_SIZE) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            let val = Some(u64::from_le_bytes(v));
            match tag {
                0 => s.swap_in = val,
                1 => s.swap_out = val,
                2 => s.major_faults = val,
                3 => s.minor_faults = val,
                4 => s.free_memory = val,
                5 => s.total_memory = val,
                6 => s.available_memory = val,
                7 => s.disk_caches = val,
                8 => s.hugetlb_allocations = val,
                9 => s.hugetlb_failures = val,
                10 => s.oom_kills = val,
                _ => s.unknown_tags = s.unknown_tags.saturating_add(1),
            }
        }
        Ok(s)
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

    /// Takes back the ballooned pages the guest touched behind the
    /// balloon's back — a vCPU or a device read or wrote one through the raw
    /// mapping, so the kernel gave it memory again (zeros, then whatever
    /// was written) — and counts them as deflated. Returns how many. A
    /// ballooned page whose frame holds memory again (`mincore` over the
    /// runs of ballooned pages) was touched. Costs one state load per page
    /// of regions that have any layer's pages, plus one `mincore` per run
    /// of ballooned pages: cheap enough before reporting
    /// [`Balloon::actual`] to the device. On hugetlb (whole huge pages) it
    /// finds nothing. A touched page a library read found first was taken
    /// back and counted then (see [`Balloon::deflated`]); it is not found
    /// again here.
    pub fn reclaim_touched(&self) -> Result<u64, BalloonError> {
        if self.huge_pages > 1 {
            return Ok(0);
        }
        // Under the balloon's lock: an inflate holds it from its state
        // change to its punch, so a page being ballooned is never taken
        // for a touched one.
        let mut inner = self.lock();
        let mut n = 0;
        for r in self.mem.regions() {
            if !r.needs_state_checks() {
                continue; // nothing ballooned in this region
            }
            let states = r.page_states();
            let ballooned = |p: usize| {
                let s = states.load(p);
                s.kind() == PageKind::Ballooned && s.is_unflagged()
            };
            // Runs of ballooned pages; `mincore` says which hold memory
            // again (bounded by the run, unlike a hole scan of the memfd).
            let mut p = 0;
            while p < r.pages() {
                if !ballooned(p) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < r.pages() && ballooned(p) {
                    p += 1;
                }
                let Some(resident) = r.resident(start, p - start) else {
                    continue;
                };
                for (k, &v) in resident.iter().enumerate() {
                    let page = start + k;
                    let s = states.load(page);
                    if crate::host::residency::is_resident(v)
                        && s.kind() == PageKind::Ballooned
                        && s.is_unflagged()
                        && states
                            .transition(page, s, s.with_kind(PageKind::Private))
                            .is_ok()
                    {
                        n += 1;
                    }
                }
            }
        }
        inner.deflated += n;
        Ok(n)
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

    fn locate(&self, pfn: u64) -> Result<Loc, BalloonError> {
        let gpa = pfn
            .checked_mul(PAGE_SIZE as u64)
            .ok_or(BalloonError::OutOfRange { pfn })?;
        match self.mem.find_region(GuestPhysAddr(gpa)) {
            Some(region) => {
                let r = &self.mem.regions()[region];
                Ok(Loc {
                    region,
                    page: ((gpa - r.start().0) >> PAGE_SHIFT) as usize,
                })
            }
            None => {
                let end = self.mem.regions().last().map_or(0, |r| r.end());
                let below = self.mem.regions().first().map_or(0, |r| r.start().0);
                if gpa >= end || gpa < below {
                    Err(BalloonError::OutOfRange { pfn })
                } else {
                    Err(BalloonError::Hole { pfn })
                }
            }
        }
    }

    fn pfn_of(&self, l: Loc) -> u64 {
        (self.mem.regions()[l.region].start().0 >> PAGE_SHIFT) + l.page as u64
    }

    /// Validates a batch: limit, range, repeats. Returns the located entries.
    fn screen(&self, pfns: &[u64], report: &mut BatchReport) -> Vec<(usize, Loc)> {
        let mut seen: HashMap<u64, usize> = HashMap::with_capacity(pfns.len().min(4096));
        let mut out = Vec::with_capacity(pfns.len().min(self.options.max_batch));
        for (index, &pfn) in pfns.iter().enumerate() {
            if index >= self.options.max_batch {
                report.errors.push(EntryError {
                    index,
                    error: BalloonError::OverLimit {
                        limit: self.options.max_batch,
                    },
                });
                continue;
            }
            if let Some(&first) = seen.get(&pfn) {
                report.errors.push(EntryError {
                    index,
                    error: BalloonError::Repeated { pfn, first },
                });
                continue;
            }
            seen.insert(pfn, index);
            match self.locate(pfn) {
                Ok(l) => out.push((index, l)),
                Err(error) => report.errors.push(EntryError { index, error }),
            }
        }
        out
    }

    /// Inflates the pages with these 4 KiB frame numbers (one virtio
    /// inflate request).
    pub fn inflate_pfns(&self, pfns: &[u64]) -> BatchReport {
        let mut report = BatchReport::default();
        let entries = self.screen(pfns, &mut report);
        let mut inner = self.lock();
        self.inflate_entries(&mut inner, &entries, &mut report);
        report.errors.sort_by_key(|e| e.index);
        report
    }

    /// Inflates from the raw bytes of the virtio inflate queue: little-endian
    /// 32-bit PFNs. A trailing partial entry is an error entry.
    pub fn inflate_pfns_le32(&self, bytes: &[u8]) -> BatchReport {
        let (pfns, tail) = le32_pfns(bytes);
        let mut r = self.inflate_pfns(&pfns);
        push_tail(&mut r, tail, bytes.len(), pfns.len());
        r
    }

    /// Deflates the pages with these 4 KiB frame numbers (one virtio
    /// deflate request). Their memory comes back on the next access.
    pub fn deflate_pfns(&self, pfns: &[u64]) -> BatchReport {
        let mut report = BatchReport::default();
        let entries = self.screen(pfns, &mut report);
        let mut inner = self.lock();
        self.deflate_entries(&mut inner, &entries, &mut report);
        report.errors.sort_by_key(|e| e.index);
        report
    }

    /// Deflates from the raw bytes of the virtio deflate queue.
    pub fn deflate_pfns_le32(&self, bytes: &[u8]) -> BatchReport {
        let (pfns, tail) = le32_pfns(bytes);
        let mut r = self.deflate_pfns(&pfns);
        push_tail(&mut r, tail, bytes.len(), pfns.len());
        r
    }

    /// Checks a range: 4 KiB aligned and wholly inside guest memory.
    fn range_pages(&self, gpa: u64, len: u64) -> Result<Vec<(usize, usize, usize)>, BalloonError> {
        let mis = BalloonError::Misaligned {
            addr: gpa,
            len,
            align: PAGE_SIZE as u64,
        };
        if gpa % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE as u64 != 0 {
            return Err(mis);
        }
        let end = gpa.checked_add(len).ok_or(BalloonError::OutOfRange {
            pfn: gpa >> PAGE_SHIFT,
        })?;
        // (region, first page, count) per region touched.
        let mut out = Vec::new();
        let mut at = gpa;
        while at < end {
            let l = self.locate(at >> PAGE_SHIFT)?;
            let r = &self.mem.regions()[l.region];
            let stop = r.end().min(end);
            out.push((l.region, l.page, ((stop - at) >> PAGE_SHIFT) as usize));
            at = stop;
        }
        Ok(out)
    }

    /// Inflates every page of `[gpa, gpa+len)` (4 KiB aligned). Pages
    /// already in the balloon are skipped silently; per-page errors carry the
    /// page's index in the range.
    pub fn inflate_range(&self, gpa: GuestPhysAddr, len: u64) -> Result<BatchReport, BalloonError> {
        let mut report = self.for_range(gpa, len, Self::inflate_entries)?;
        report
            .errors
            .retain(|e| !matches!(e.error, BalloonError::AlreadyBallooned { .. }));
        Ok(report)
    }

    /// Deflates every page of `[gpa, gpa+len)`; pages not in the balloon are
    /// skipped silently.
    pub fn deflate_range(&self, gpa: GuestPhysAddr, len: u64) -> Result<BatchReport, BalloonError> {
        let mut report = self.for_range(gpa, len, Self::deflate_entries)?;
        report
            .errors
            .retain(|e| !matches!(e.error, BalloonError::NotBallooned { .. }));
        Ok(report)
    }

    /// Runs `apply` (inflate or deflate) over every page of `[gpa, gpa+len)`,
    /// one region's run at a time, under the balloon's lock; entry indices
    /// count pages from the start of the range.
    fn for_range(
        &self,
        gpa: GuestPhysAddr,
        len: u64,
        apply: fn(&Self, &mut Inner, &[(usize, Loc)], &mut BatchReport),
    ) -> Result<BatchReport, BalloonError> {
        let runs = self.range_pages(gpa.0, len)?;
        let mut report = BatchReport::default();
        let mut inner = self.lock();
        let mut index = 0usize;
        for (region, first, count) in runs {
            let entries: Vec<(usize, Loc)> = (0..count)
                .map(|i| {
                    (
                        index + i,
                        Loc {
                            region,
                            page: first + i,
                        },
                    )
                })
                .collect();
            index += count;
            apply(self, &mut inner, &entries, &mut report);
        }
        Ok(report)
    }

    /// Free page reporting: the guest reports `2^order` free 4 KiB pages at
    /// `gpa`. Their memory is released; they stay the guest's (zero pages,
    /// not counted in [`actual`](Self::actual)). On a hugetlb store a report
    /// smaller than a huge page releases nothing. Returns the pages released.
    pub fn report_free(&self, gpa: GuestPhysAddr, order: u32) -> Result<u64, BalloonError> {
        let gpa = gpa.0;
        if order > 40 {
            return Err(BalloonError::Order { order });
        }
        let len = (PAGE_SIZE as u64) << order;
        let granule = self.mem.frame_store().granule().bytes();
        if len < granule {
            return Ok(0);
        }
        if gpa % len != 0 && gpa % granule != 0 {
            return Err(BalloonError::Misaligned {
                addr: gpa,
                len,
                align: granule,
            });
        }
        // Checks the span first, so a report into a hole changes nothing.
        self.range_pages(gpa, len)?;
        let n = self.mem.discard(GuestPhysAddr(gpa), len)?;
        self.lock().reported += n;
        Ok(n)
    }

    /// Moves the located pages into the balloon and releases their memory.
    fn inflate_entries(
        &self,
        inner: &mut Inner,
        entries: &[(usize, Loc)],
        report: &mut BatchReport,
    ) {
        // Pages whose state became Ballooned, to release: (entry index,
        // location, needs a release).
        let mut taken: Vec<(usize, Loc, bool)> = Vec::with_capacity(entries.len());
        for &(index, l) in entries {
            let region = &self.mem.regions()[l.region];
            region.enable_state_checks();
            let pfn = self.pfn_of(l);
            if self.huge_pages > 1 {
                match self.inflate_huge(inner, l, pfn) {
                    Ok(released) => {
                        report.applied += 1;
                        report.released_pages += released;
                    }
                    Err(error) => report.errors.push(EntryError { index, error }),
                }
                continue;
            }
            let mut took = take_page(region, l.page, pfn);
            if let (Err(BalloonError::Shared { .. }), Some((host, vm))) = (&took, &self.dedup) {
                // Break the sharing through the host, then take the page as
                // a private one.
                let gpa = GuestPhysAddr(pfn << PAGE_SHIFT);
                took = match host.resolve_write_fault(*vm, gpa) {
                    Ok(_) => take_page(region, l.page, pfn),
                    Err(crate::dedup::DedupError::Busy(_)) => Err(BalloonError::Busy { pfn }),
                    // What ran out is said, not hidden behind "busy".
                    Err(source) => Err(BalloonError::Unmerge { pfn, source }),
                };
            }
            match took {
                Ok(had_memory) => taken.push((index, l, had_memory)),
                Err(error) => report.errors.push(EntryError { index, error }),
            }
        }
        // One punch per run of consecutive pages of one region.
        let mut k = 0;
        while k < taken.len() {
            let mut e = k + 1;
            while e < taken.len()
                && taken[e].1.region == taken[k].1.region
                && taken[e].1.page == taken[e - 1].1.page + 1
            {
                e += 1;
            }
            let l = taken[k].1;
            let region = &self.mem.regions()[l.region];
            let count = e - k;
            let range = FrameRange {
                start: region.own_frame(l.page),
                count: count as u64,
            };
            // What the punch really frees: the pages of the run that hold
            // memory (a page never written is a hole already); by page
            // state if the kernel cannot tell.
            let backed = resident_pages(region, l.page, count)
                .unwrap_or_else(|| taken[k..e].iter().filter(|t| t.2).count() as u64);
            let released = self.mem.frame_store().release(range);
            // The pages changed (now zeros, or back to private after a failed
            // punch): marked after the punch, as every write marks after its
            // bytes are stored, so a harvest that took the mark copies the
            // zeros (marked before, a harvest in between copied the old bytes
            // and nothing marked the zeros; found by review).
            region
                .dirty_log()
                .note_write((l.page as u64) << PAGE_SHIFT, (count * PAGE_SIZE) as u64);
            match released {
                Ok(()) => {
                    for &(_, tl, _) in &taken[k..e] {
                        unlock_page(region, tl.page, PageKind::Ballooned);
                    }
                    report.applied += count as u64;
                    report.released_pages += backed;
                }
                Err(source) => {
                    // Give the pages back as they were: the memory is still
                    // there, so they must not claim to read zeros.
                    for &(index, tl, _) in &taken[k..e] {
                        unlock_page(region, tl.page, PageKind::Private);
                        report.errors.push(EntryError {
                            index,
                            error: BalloonError::Release {
                                pfn: self.pfn_of(tl),
                                source: FrameError::Os {
                                    op: "fallocate(PUNCH_HOLE)",
                                    source: std::io::Error::other(source.to_string()),
                                },
                            },
                        });
                    }
                }
            }
            k = e;
        }
    }

    /// Hugetlb: marks the page pending; releases its huge page when whole.
    fn inflate_huge(&self, inner: &mut Inner, l: Loc, pfn: u64) -> Result<u64, BalloonError> {
        let region = &self.mem.regions()[l.region];
        let t = region.page_states();
        let s = t.load(l.page);
        check_inflatable(s, pfn)?;
        let hp = l.page / self.huge_pages;
        let words = self.huge_pages.div_ceil(64);
        let bits = inner
            .pending
            .entry((l.region, hp))
            .or_insert_with(|| vec![0u64; words]);
        let bit = l.page % self.huge_pages;
        if bits[bit / 64] & (1 << (bit % 64)) != 0 {
            return Err(BalloonError::AlreadyBallooned { pfn });
        }
        bits[bit / 64] |= 1 << (bit % 64);
        inner.pending_pages += 1;
        // Whole when every page is pending or already ballooned.
        let first = hp * self.huge_pages;
        let whole = (0..self.huge_pages).all(|i| {
            bits[i / 64] & (1 << (i % 64)) != 0 || t.load(first + i).kind() == PageKind::Ballooned
        });
        if !whole {
            return Ok(0);
        }
        // Every page of the huge page is locked from here to the punch: the
        // pending ones as they are taken, the ones ballooned before as they
        // are (a library write takes a ballooned page back by writing it; it
        // waits for the lock, then writes into the fresh huge page). A page
        // taken back since the check above makes the huge page not whole.
        let mut held = Vec::new();
        let mut kept = Vec::new();
        let mut ok = true;
        for i in 0..self.huge_pages {
            let p = first + i;
            if bits[i / 64] & (1 << (i % 64)) == 0 {
                let s = t.load(p);
                if s.kind() == PageKind::Ballooned && s.is_unflagged() && t.try_lock(p, s).is_ok() {
                    kept.push(p);
                    continue;
                }
                ok = false;
                break;
            }
            match take_page(region, p, pfn) {
                Ok(_) => held.push(p),
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        let release = if ok {
            self.mem.frame_store().release(FrameRange {
                start: region.own_frame(first),
                count: self.huge_pages as u64,
            })
        } else {
            Ok(())
        };
        for &p in &kept {
            unlock_page(region, p, PageKind::Ballooned);
        }
        if !ok || release.is_err() {
            // Stays pending: a later inflate of the same huge page retries.
            for p in held {
                unlock_page(region, p, PageKind::Private);
            }
            return match release {
                Err(source) => Err(BalloonError::Release { pfn, source }),
                Ok(()) => Ok(0),
            };
        }
        for &p in &held {
            unlock_page(region, p, PageKind::Ballooned);
        }
        region.dirty_log().note_write(
            (first as u64) << PAGE_SHIFT,
            (self.huge_pages * PAGE_SIZE) as u64,
        );
        let n = bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        inner.pending.remove(&(l.region, hp));
        inner.pending_pages -= n;
        Ok(self.huge_pages as u64)
    }

    fn deflate_entries(
        &self,
        inner: &mut Inner,
        entries: &[(usize, Loc)],
        report: &mut BatchReport,
    ) {
        let before = self.mem.census().ballooned + inner.pending_pages;
        let mut done = 0u64;
        for &(index, l) in entries {
            let region = &self.mem.regions()[l.region];
            let pfn = self.pfn_of(l);
            if self.huge_pages > 1 {
                let hp = l.page / self.huge_pages;
                let bit = l.page % self.huge_pages;
                if let Some(bits) = inner.pending.get_mut(&(l.region, hp)) {
                    if bits[bit / 64] & (1 << (bit % 64)) != 0 {
                        bits[bit / 64] &= !(1 << (bit % 64));
                        inner.pending_pages -= 1;
                        if bits.iter().all(|w| *w == 0) {
                            inner.pending.remove(&(l.region, hp));
                        }
                        done += 1;
                        report.applied += 1;
                        continue;
                    }
                }
            }
            let t = region.page_states();
            let mut s = t.load(l.page);
            let result = loop {
                if s.kind() != PageKind::Ballooned {
                    break Err(BalloonError::NotBallooned { pfn });
                }
                if s.is_locked() {
                    break Err(BalloonError::Busy { pfn });
                }
                match t.transition(l.page, s, s.with_kind(PageKind::Private)) {
                    Ok(()) => break Ok(()),
                    Err(now) => s = now,
                }
            };
            match result {
                Ok(()) => {
                    done += 1;
                    report.applied += 1;
                }
                Err(error) => report.errors.push(EntryError { index, error }),
            }
        }
        inner.deflated += done;
        let target = self.target();
        let after = before.saturating_sub(done);
        // Deflated below the target: the guest did it on its own (OOM).
        let oom = target.saturating_sub(after).min(done);
        if oom > 0 {
            inner.oom_deflated += oom;
            if let Some(hook) = &inner.oom_hook {
                hook(oom);
            }
        }
    }
}

/// Whether a page in state `s` may enter the balloon.
fn check_inflatable(s: crate::memory::PageState, pfn: u64) -> Result<(), BalloonError> {
    if s.is_locked() {
        return Err(BalloonError::Busy { pfn });
    }
    if s.is_remapped() || s.kind() == PageKind::Shared {
        return Err(BalloonError::Shared { pfn });
    }
    if s.kind() == PageKind::Ballooned {
        return Err(BalloonError::AlreadyBallooned { pfn });
    }
    if !s.is_unflagged() {
        return Err(BalloonError::Busy { pfn });
    }
    Ok(())
}

/// How many of pages `[first, first + count)` of `region` hold memory
/// (`mincore` on the region's mapping: bounded by the run, unlike a
/// `SEEK_HOLE` scan of the shared memfd). The pages map their own frames
/// here (remapped pages are never taken), so residency is the frame's.
/// `None` if the kernel refuses.
fn resident_pages(region: &crate::memory::GuestRegion, first: usize, count: usize) -> Option<u64> {
    region.resident(first, count).map(|v| {
        v.iter()
            .filter(|&&b| crate::host::residency::is_resident(b))
            .count() as u64
    })
}

/// Moves page `page` to Ballooned; `Ok(true)` if it had memory (private),
/// `Ok(false)` if it was already released as zero.
/// Makes the page ballooned and locked (until `unlock_page`, after its
/// punch): a library write that would take it back waits, then writes into
/// the fresh frame, instead of landing in the frame about to be punched.
/// `Ok(true)` if it was private (may hold memory).
fn take_page(
    region: &crate::memory::GuestRegion,
    page: usize,
    pfn: u64,
) -> Result<bool, BalloonError> {
    let t = region.page_states();
    let mut s = t.load(page);
    loop {
        check_inflatable(s, pfn)?;
        match t.try_lock_as(page, s, s.with_kind(PageKind::Ballooned)) {
            Ok(()) => return Ok(s.kind() == PageKind::Private),
            Err(now) => s = now,
        }
    }
}

/// Unlocks a page `take_page` (or the huge-page path) locked, as `kind`.
fn unlock_page(region: &crate::memory::GuestRegion, page: usize, kind: PageKind) {
    let t = region.page_states();
    let s = t.load(page);
    if s.kind() == PageKind::Ballooned && s.flags() == Flags::LOCKED {
        let held = s.without_flags(Flags::LOCKED);
        let _ = t.unlock_to(page, held, held.with_kind(kind));
    }
}

fn le32_pfns(bytes: &[u8]) -> (Vec<u64>, bool) {
    let pfns = bytes
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    (pfns, bytes.len() % 4 != 0)
}

fn push_tail(r: &mut BatchReport, tail: bool, len: usize, index: usize) {
    if tail {
        r.errors.push(EntryError {
            index,
            error: BalloonError::Truncated { len, entry: 4 },
        });
    }
}
