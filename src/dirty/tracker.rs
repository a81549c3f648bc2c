//! The raw-write tracker: finds pages written through the host mapping
//! (device models' pointers, vCPUs through KVM) without any fault reaching
//! userspace.
//!
//! Each tracked region is registered with a userfaultfd in asynchronous
//! write-protect mode (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+) and protected.
//! A write to a protected page is resolved by the kernel on the spot: it
//! drops the protection and lets the write go on, and the page table entry
//! now says "written". [`RawWriteTracker::collect`] asks the kernel, with
//! the `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap`
//! (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category
//! `PAGE_IS_WRITTEN`), for the written pages and re-protects exactly those
//! in the same walk, under the page-table lock: a write either happened
//! before the re-protection (the page is reported now, and the TLB
//! shoot-down that re-protection implies made its bytes visible) or faults
//! on the new protection and is reported by the next collect. Reported
//! pages are marked in the region's dirty bitmap, and the usual harvest
//! takes them.
//!
//! Dedup also registers these mappings, with its own synchronous
//! userfaultfd, and replaces pages with `MAP_FIXED` remaps, which would
//! silently drop this registration; a mapping can be registered with one
//! userfaultfd only. The two are refused together: the tracker claims the
//! memory the way a dedup host does, and whichever comes second gets an
//! error ([`DirtyError::UserfaultTaken`] here, `DedupError::AlreadyRegistered`
//! there).

use std::{
    io,
    os::fd::AsRawFd,
    sync::{Arc, Mutex, PoisonError},
};

use super::{DirtyError, RegionSet};
use crate::{
    addr::{HostVirtAddr, PAGE_SHIFT},
    host::pagemap::{self, PageMap},
    memory::GuestMemory,
    userfault::Userfault,
};

/// `_IOWR('f', 16, struct pm_scan_arg)` with the 96-byte argument
/// (`include/uapi/linux/fs.h`).
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
/// Write-protect the matched pages in the same walk.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (`EPERM`) on a mapping without asynchronous write protection.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// The page was written since it was last write-protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Output slots per `PAGEMAP_SCAN` call; a full buffer just means another
/// call from where the walk stopped.
const SCAN_SLOTS: usize = 512;

/// Tracks raw writes to some regions of one guest memory (see the module
/// comment). Dropping it unregisters the regions.
#[derive(Debug)]
pub struct RawWriteTracker {
    mem: Arc<GuestMemory>,
    uffd: Userfault,
    pagemap: PageMap,
    regions: Vec<usize>,
    /// Serialises collects (one scan buffer).
    scan: Mutex<Vec<PageRegion>>,
}

impl std::fmt::Debug for PageRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

impl RawWriteTracker {
    /// Starts tracking raw writes to the regions in `which`: registers and
    /// write-protects their host mappings. Pages written from now on are
    /// found by [`collect`](Self::collect).
    ///
    /// Errors: [`DirtyError::TrackerUnavailable`] where the kernel lacks
    /// asynchronous write protection or `PAGEMAP_SCAN` (checked here, with
    /// a real scan, so a tracker that exists works);
    /// [`DirtyError::UserfaultTaken`] if the memory is registered with a
    /// dedup host or another tracker.
    pub fn new(mem: Arc<GuestMemory>, which: RegionSet) -> Result<Self, DirtyError> {
        let regions: Vec<usize> = mem.region_indices(which)?.collect();
        let uffd = Userfault::new_async_wp().map_err(|e| DirtyError::TrackerUnavailable {
            reason: e.to_string(),
        })?;
        let pagemap = PageMap::open().map_err(|e| DirtyError::TrackerUnavailable {
            reason: format!("{}: {e}", pagemap::PATH),
        })?;
        for &i in &regions {
            super::region_bitmap(mem.regions()[i].dirty_log(), i)?;
        }
        if !mem.claim_for_dedup() {
            return Err(DirtyError::UserfaultTaken);
        }
        let tracker = RawWriteTracker {
            mem,
            uffd,
            pagemap,
            regions: Vec::new(),
            scan: Mutex::new(vec![PageRegion::default(); SCAN_SLOTS]),
        };
        tracker.arm(regions)
    }

    /// Registers and protects each region; on error the drop undoes what
    /// was done.
    fn arm(mut self, regions: Vec<usize>) -> Result<Self, DirtyError> {
        for i in regions {
            let r = &self.mem.regions()[i];
            let (addr, len) = (r.host_addr(), r.size());
            self.uffd.register(addr, len)?;
            self.regions.push(i);
            self.uffd.protect(addr, len)?;
        }
        // Prove the scan works here (an unknown ioctl is ENOTTY; a kernel
        // without WP_ASYNC support in the walk is EPERM or EINVAL).
        match self.collect() {
            Ok(_) => Ok(self),
            Err(DirtyError::Scan { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOTTY | libc::EINVAL | libc::EPERM | libc::EOPNOTSUPP)
                ) =>
            {
                Err(DirtyError::TrackerUnavailable {
                    reason: format!("PAGEMAP_SCAN on /proc/self/pagemap: {source}"),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether this kernel can run the tracker: a cheap probe of the
    /// userfaultfd features (`PAGEMAP_SCAN` is checked by [`new`](Self::new)).
    pub fn probe() -> Result<(), DirtyError> {
        Userfault::new_async_wp()
            .map(drop)
            .map_err(|e| DirtyError::TrackerUnavailable {
                reason: e.to_string(),
            })
    }

    /// The regions tracked.
    pub fn regions(&self) -> &[usize] {
        &self.regions
    }

    /// Finds the pages written through the host mapping since the last
    /// collect (or since tracking began), re-protects them, and marks them
    /// in the dirty log, whether or not library-write tracking is on.
    /// Returns the number of pages found. Call it before
    /// [`GuestMemory::harvest_dirty`].
    pub fn collect(&self) -> Result<u64, DirtyError> {
        let mut buf = self.scan.lock().unwrap_or_else(PoisonError::into_inner);
        let mut found = 0u64;
        for &i in &self.regions {
            let r = &self.mem.regions()[i];
            let base = r.host_addr().0;
            let end = base + r.size();
            let mut start = base;
            while start < end {
                let mut arg = PmScanArg {
                    size: std::mem::size_of::<PmScanArg>() as u64,
                    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    start,
                    end,
                    vec: buf.as_mut_ptr() as u64,
                    vec_len: buf.len() as u64,
                    category_mask: PAGE_IS_WRITTEN,
                    return_mask: PAGE_IS_WRITTEN,
                    ..PmScanArg::default()
                };
                // 1. `arg` is a valid, writable `pm_scan_arg` whose `size`
                //    is its own size;
                // 2. `vec` points to `vec_len` writable `page_region`s
                //    (`buf`, locked by us for the call);
                // 3. the range is this region's live mapping; the kernel
                //    only reads and changes its page tables.
                // SAFETY: 1-3 above.
                let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
                if n < 0 {
                    let source = io::Error::last_os_error();
                    if source.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    // The kernel may have reported and re-protected pages
                    // before the error, and the count of what it put in
                    // `buf` is lost with it: their writes would not be found
                    // again. Mark everything it may have walked (to
                    // `walk_end`, which it writes back on errors too; the
                    // rest of the region if it did not say) as written, so
                    // a caller that retries loses nothing.
                    let upto = if arg.walk_end > start && arg.walk_end <= end {
                        arg.walk_end
                    } else {
                        end
                    };
                    let first = ((start - base) >> PAGE_SHIFT) as usize;
                    let count = ((upto - start) >> PAGE_SHIFT) as usize;
                    super::region_bitmap(r.dirty_log(), i)?.mark_pages(first, count);
                    return Err(DirtyError::Scan {
                        start: HostVirtAddr(start),
                        end: HostVirtAddr(end),
                        source,
                    });
                }
                let n = usize::try_from(n).unwrap_or(0).min(buf.len());
                for pr in &buf[..n] {
                    let s = pr.start.clamp(base, end);
                    let e = pr.end.clamp(base, end);
                    if e > s {
                        let first = ((s - base) >> PAGE_SHIFT) as usize;
                        let count = ((e - s) >> PAGE_SHIFT) as usize;
                        super::region_bitmap(r.dirty_log(), i)?.mark_pages(first, count);
                        found += count as u64;
                    }
                }
                // The kernel stops early when the buffer fills; it says
                // where. No progress would loop forever: stop instead.
                if arg.walk_end <= start || arg.walk_end >= end {
                    break;
                }
                start = arg.walk_end;
            }
        }
        Ok(found)
    }
}

impl Drop for RawWriteTracker {
    fn drop(&mut self) {
        for &i in &self.regions {
            let r = &self.mem.regions()[i];
            let addr: HostVirtAddr = r.host_addr();
            // Best effort: unregistering also drops the protection.
            let _ = self.uffd.unregister(addr, r.size());
        }
        self.mem.release_from_dedup();
    }
}
