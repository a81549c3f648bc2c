//! The dirty log of guest memory: turning tracking on and off per region,
//! harvesting dirty pages as runs into a caller buffer, and merging a KVM
//! dirty bitmap in; and the raw-write tracker (`pf_raw_write_tracker`,
//! userfaultfd asynchronous write protection), which finds writes made
//! through raw host pointers.

// The types carry their C names, so the header and the Rust agree.
#![allow(non_camel_case_types)]

use std::{mem::size_of, sync::Arc};

use pagefold::{DirtyError, DirtyRun, GuestPhysAddr, RawWriteTracker, RegionSet};

use crate::{
    args,
    memory::{memory, pf_guest_memory},
    status::{pf_status, Error},
};

/// `region_index` value meaning every region of the memory.
pub const PF_ALL_REGIONS: usize = 0xffff_ffff_ffff_ffff;

/// A run of consecutive dirty 4 KiB pages: `pages` pages from guest-physical
/// address `gpa`. A run never crosses the end of a region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_dirty_run {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u64,
}

/// The status of a dirty-log error.
pub(crate) fn dirty_status(e: &DirtyError) -> pf_status {
    match e {
        DirtyError::NoSuchRegion { .. } => pf_status::PF_ERR_OUT_OF_RANGE,
        DirtyError::OutOfMemory { .. } => pf_status::PF_ERR_OS,
        DirtyError::BitmapSize { .. } => pf_status::PF_ERR_INVALID_ARGUMENT,
        DirtyError::Unmapped { .. } => pf_status::PF_ERR_UNMAPPED,
        DirtyError::TrackerUnavailable { .. } => pf_status::PF_ERR_UNSUPPORTED,
        DirtyError::UserfaultTaken => pf_status::PF_ERR_INVALID_ARGUMENT,
        DirtyError::LogInUse { .. } => pf_status::PF_ERR_BUSY,
        DirtyError::Userfault(_) => pf_status::PF_ERR_USERFAULT,
        DirtyError::Scan { .. } => pf_status::PF_ERR_OS,
    }
}

impl From<DirtyError> for Error {
    fn from(e: DirtyError) -> Self {
        Error::new(dirty_status(&e), e.to_string())
    }
}

fn region_set(index: usize) -> RegionSet {
    if index == PF_ALL_REGIONS {
        RegionSet::All
    } else {
        RegionSet::One(index)
    }
}

/// Starts (`enable` non-zero) or stops dirty tracking of writes made
/// through this library (`pf_guest_memory_write`, atomics, ...) to region
/// `region_index`, or to every region with `PF_ALL_REGIONS`. Starting is
/// cheap on any size (the bitmap is allocated zeroed and backed lazily);
/// every write that returns after it is logged. Stopping keeps what was
/// logged until it is harvested. Writes through raw host pointers (KVM,
/// device models) are not seen: merge KVM's dirty log with
/// `pf_guest_memory_merge_dirty_bitmap`.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_OUT_OF_RANGE` (`region_index`),
/// `PF_ERR_OS` (the bitmap could not be allocated).
///
/// # Safety
///
/// `mem` is NULL or a live `pf_guest_memory` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_set_dirty_tracking(
    mem: *const pf_guest_memory,
    region_index: usize,
    enable: u32,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        mem.set_dirty_tracking(region_set(region_index), enable != 0)?;
        Ok(())
    }
}

/// Takes the dirty pages of region `region_index` (or of every region with
/// `PF_ALL_REGIONS`): stores them as runs, in address order, in `runs`
/// (room for `capacity`), their number in `*out_count`, and clears them. A
/// write racing with the harvest is reported by this harvest or the next;
/// every reported write's bytes are visible to copies made after the call.
///
/// If the runs do not fit, nothing is taken (the pages stay dirty),
/// `*out_count` receives the number of runs needed and the call returns
/// `PF_ERR_BUFFER_TOO_SMALL`; retry with a larger buffer (the number can
/// grow in between). `runs` may be NULL with `capacity` 0 to ask.
///
/// Errors: `PF_ERR_NULL_POINTER` (`mem`, `out_count`, or `runs` while
/// `capacity > 0`), `PF_ERR_INVALID_ARGUMENT` (absurd `capacity`),
/// `PF_ERR_OUT_OF_RANGE`, `PF_ERR_BUFFER_TOO_SMALL`, `PF_ERR_BUSY` (a
/// migration sender holds the log: its rounds send what they harvest, and
/// it puts back every page it took when it ends).
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `runs` is NULL or valid for writes of `capacity` `pf_dirty_run`s.
/// - `out_count` is NULL or valid for a write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_harvest_dirty(
    mem: *const pf_guest_memory,
    region_index: usize,
    runs: *mut pf_dirty_run,
    capacity: usize,
    out_count: *mut usize,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_count` is NULL or writable (contract).
        let out = unsafe { args::out(out_count, "out_count") }?;
        let bytes = capacity
            .checked_mul(size_of::<pf_dirty_run>())
            .ok_or_else(|| Error::invalid(format!("capacity {capacity} is larger than any array can be")))?;
        // SAFETY: `runs` is NULL or writable for `capacity` runs, which
        // nothing else uses during the call (contract); checked for NULL
        // and size here.
        let buf = unsafe { args::bytes_mut(runs.cast(), bytes, "runs") }?;
        let mut taken: Vec<DirtyRun> = Vec::new();
        mem.harvest_dirty(region_set(region_index), &mut taken)?;
        if taken.len() > capacity {
            // Put them back: marking is idempotent, and a write racing with
            // this stays marked either way.
            for r in &taken {
                mem.mark_dirty(r.start, r.pages)?;
            }
            let needed = taken.len();
            out.write(needed);
            return Err(Error::new(
                pf_status::PF_ERR_BUFFER_TOO_SMALL,
                format!("{needed} dirty runs do not fit in a buffer of {capacity}"),
            ));
        }
        for (slot, r) in buf.chunks_exact_mut(size_of::<pf_dirty_run>()).zip(&taken) {
            let run = pf_dirty_run { gpa: r.start.0, pages: r.pages };
            // SAFETY: `slot` is `size_of::<pf_dirty_run>()` writable bytes
            // of the caller's buffer; `write_unaligned` needs no alignment.
            unsafe { slot.as_mut_ptr().cast::<pf_dirty_run>().write_unaligned(run) };
        }
        out.write(taken.len());
        Ok(())
    }
}

// SAFETY: two integers, valid for every bit pattern.
unsafe impl args::Plain for pf_dirty_run {}

/// ORs a dirty bitmap into region `region_index`'s log, as
/// `KVM_GET_DIRTY_LOG` returns it for the memory slot of that region: bit
/// `i` (bit `i % 64` of `bitmap[i / 64]`) is the region's page `i`. `words`
/// must be `ceil(pages / 64)` for the region's 4 KiB pages, and no bit past
/// the last page may be set. Works whether or not tracking is on; the pages
/// are reported by the next harvest.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_OUT_OF_RANGE` (`region_index`;
/// `PF_ALL_REGIONS` is not accepted here), `PF_ERR_INVALID_ARGUMENT` (wrong
/// `words`, or bits past the last page), `PF_ERR_OS`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `bitmap` is NULL or valid for reads of `words` `uint64_t`s.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_merge_dirty_bitmap(
    mem: *const pf_guest_memory,
    region_index: usize,
    bitmap: *const u64,
    words: usize,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `bitmap` is NULL or `words` readable words (contract).
        let bits = unsafe { args::array(bitmap, words, "bitmap", "words") }?;
        mem.merge_dirty_bitmap(region_index, &bits)?;
        Ok(())
    }
}

/// Marks `pages` 4 KiB pages from the page holding guest-physical address
/// `gpa` dirty, whether or not tracking is on: for writes the log cannot
/// see, such as a device model's DMA through a raw pointer. The range may span adjacent regions;
/// a hole is `PF_ERR_UNMAPPED` and then nothing is marked.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_OS`.
///
/// # Safety
///
/// `mem` is NULL or a live `pf_guest_memory` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_mark_dirty(
    mem: *const pf_guest_memory,
    gpa: u64,
    pages: u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        mem.mark_dirty(GuestPhysAddr(gpa), pages)?;
        Ok(())
    }
}

/// Finds writes made through raw host pointers (KVM vCPUs, device models)
/// to some regions of one guest memory: made by `pf_raw_write_tracker_new`,
/// released by `pf_raw_write_tracker_free`. Thread-safe.
pub struct pf_raw_write_tracker {
    tracker: RawWriteTracker,
}

/// Starts tracking writes through host pointers to region `region_index`
/// of `mem` (or every region with `PF_ALL_REGIONS`) and stores the tracker
/// in `*out_tracker`. The regions are registered with a userfaultfd in
/// asynchronous write-protect mode and write-protected: the kernel resolves
/// the first write to each page itself (no thread handles faults) and
/// `pf_raw_write_tracker_collect` asks it which pages were written. Needs
/// Linux 6.7 or later (`UFFD_FEATURE_WP_ASYNC` and the `PAGEMAP_SCAN`
/// ioctl), checked here with a real scan. The memory cannot be registered
/// with a dedup host while a tracker lives, nor tracked by two trackers.
/// The tracker keeps the memory alive.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_OUT_OF_RANGE` (`region_index`),
/// `PF_ERR_UNSUPPORTED` (this kernel lacks asynchronous write protection
/// or `PAGEMAP_SCAN`, or userfaultfd is not permitted; the message says
/// which), `PF_ERR_INVALID_ARGUMENT` (registered with a dedup host or
/// another tracker), `PF_ERR_USERFAULT` (registering or protecting
/// failed), `PF_ERR_OS`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_tracker` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_raw_write_tracker_new(
    mem: *const pf_guest_memory,
    region_index: usize,
    out_tracker: *mut *mut pf_raw_write_tracker,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = Arc::clone(unsafe { memory(mem) }?);
        // SAFETY: `out_tracker` is NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_tracker, "out_tracker") }?;
        let tracker = RawWriteTracker::new(mem, region_set(region_index))?;
        out.write(Box::into_raw(Box::new(pf_raw_write_tracker { tracker })));
        Ok(())
    }
}

/// Finds the pages written through host pointers since the last collect (or
/// since the tracker was made), write-protects them again and marks them in
/// the memory's dirty log, whether or not tracking is on there; stores their
/// number in `*out_pages` (NULL allowed). Call it before
/// `pf_guest_memory_harvest_dirty`, which then reports them. A write racing
/// with the collect is reported by this collect or the next.
///
/// Errors: `PF_ERR_NULL_POINTER` (`tracker`), `PF_ERR_OS` (the scan
/// failed).
///
/// # Safety
///
/// - `tracker` is NULL or a live `pf_raw_write_tracker` handle.
/// - `out_pages` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_raw_write_tracker_collect(
    tracker: *const pf_raw_write_tracker,
    out_pages: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or a live handle (contract).
        let t = unsafe { args::handle(tracker, "tracker") }?;
        let found = t.tracker.collect()?;
        if !out_pages.is_null() {
            // SAFETY: not NULL; writable for a `uint64_t` (contract).
            unsafe { args::out(out_pages, "out_pages") }?.write(found);
        }
        Ok(())
    }
}

/// Stops tracking: unregisters the regions (which drops their write
/// protection) and releases the tracker and its hold on the memory. Pages
/// already marked stay in the dirty log. NULL is allowed and does nothing.
///
/// # Safety
///
/// `tracker` is NULL or a `pf_raw_write_tracker` handle that has not been
/// freed, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_raw_write_tracker_free(tracker: *mut pf_raw_write_tracker) {
    ffi_boundary! { returns ();
        if !tracker.is_null() {
            // SAFETY: from `Box::into_raw` in `pf_raw_write_tracker_new`, not
            // freed, not used again (contract).
            drop(unsafe { Box::from_raw(tracker) });
        }
    }
}
