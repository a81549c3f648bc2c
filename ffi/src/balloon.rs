//! Balloon reclaim: `pf_balloon`, the memory side of a virtio-balloon
//! device. A VMM hands it what arrives on the device's queues: inflate and
//! deflate PFN lists (guest frame numbers, guest-physical address / 4096, as
//! `uint64_t` arrays or the queues' raw little-endian 32-bit payloads),
//! ranges of guest-physical addresses, free page reports and the stats
//! buffer. The integers are converted to the library's typed addresses
//! (`GuestFrame`, `GuestPhysAddr`) here, at the boundary.
//!
//! A handle is a boxed `Balloon`, which holds its guest memory through an
//! `Arc`. `Balloon` is `Send + Sync` and every method takes `&self` (an
//! internal lock serializes the operations), so every export but
//! `pf_balloon_free` may be called on one handle from several threads at
//! once.

// The types carry their C names, so the header and the Rust agree.
#![allow(non_camel_case_types)]

use std::{ffi::c_void, mem::size_of, sync::Arc};

use pagefold::{Balloon, BalloonError, BalloonOptions, BalloonStats, BatchReport, GuestFrame};

use crate::{
    args::{self, SizePrefixed, SizedOut},
    memory::{memory, pf_guest_memory},
    status::{access_status, dedup_status, frame_status, pf_status, Error},
};

/// Entry error code: the PFN lies beyond the end of guest memory.
pub const PF_BALLOON_E_OUT_OF_RANGE: i32 = 1;
/// Entry error code: the PFN lies in a hole between regions.
pub const PF_BALLOON_E_HOLE: i32 = 2;
/// Entry error code: the PFN appeared earlier in the same batch.
pub const PF_BALLOON_E_REPEATED: i32 = 3;
/// Entry error code: the entry lies beyond the batch limit (`max_batch`).
pub const PF_BALLOON_E_OVER_LIMIT: i32 = 4;
/// Entry error code: inflate of a page already in the balloon.
pub const PF_BALLOON_E_ALREADY_BALLOONED: i32 = 5;
/// Entry error code: deflate of a page not in the balloon.
pub const PF_BALLOON_E_NOT_BALLOONED: i32 = 6;
/// Entry error code: the page is merged by dedup (shared or remapped);
/// unmerge it first.
pub const PF_BALLOON_E_SHARED: i32 = 7;
/// Entry error code: another layer holds the page right now.
pub const PF_BALLOON_E_BUSY: i32 = 8;
/// Entry error code: a le32 payload ends in a partial entry (its index is
/// the number of whole entries).
pub const PF_BALLOON_E_TRUNCATED: i32 = 9;
/// Entry error code: a range is misaligned.
pub const PF_BALLOON_E_MISALIGNED: i32 = 10;
/// Entry error code: a free page report's order is too large.
pub const PF_BALLOON_E_ORDER: i32 = 11;
/// Entry error code: the access layer refused the page.
pub const PF_BALLOON_E_ACCESS: i32 = 12;
/// Entry error code: the host refused to release the memory.
pub const PF_BALLOON_E_RELEASE: i32 = 13;
/// Entry error code: breaking the page's dedup sharing failed (the
/// process's mappings are used up, or the frame store failed); the page
/// stays merged.
pub const PF_BALLOON_E_UNMERGE: i32 = 14;

/// Number of standard stats tags (virtio tags 0..=10).
pub const PF_BALLOON_STAT_TAGS: usize = 11;
/// Stats tag 0: bytes swapped in.
pub const PF_BALLOON_STAT_SWAP_IN: u32 = 0;
/// Stats tag 1: bytes swapped out.
pub const PF_BALLOON_STAT_SWAP_OUT: u32 = 1;
/// Stats tag 2: major page faults.
pub const PF_BALLOON_STAT_MAJOR_FAULTS: u32 = 2;
/// Stats tag 3: minor page faults.
pub const PF_BALLOON_STAT_MINOR_FAULTS: u32 = 3;
/// Stats tag 4: free memory in bytes.
pub const PF_BALLOON_STAT_FREE_MEMORY: u32 = 4;
/// Stats tag 5: total memory in bytes.
pub const PF_BALLOON_STAT_TOTAL_MEMORY: u32 = 5;
/// Stats tag 6: available memory in bytes.
pub const PF_BALLOON_STAT_AVAILABLE_MEMORY: u32 = 6;
/// Stats tag 7: disk caches in bytes.
pub const PF_BALLOON_STAT_DISK_CACHES: u32 = 7;
/// Stats tag 8: successful hugetlb page allocations.
pub const PF_BALLOON_STAT_HUGETLB_ALLOCATIONS: u32 = 8;
/// Stats tag 9: failed hugetlb page allocations.
pub const PF_BALLOON_STAT_HUGETLB_FAILURES: u32 = 9;
/// Stats tag 10: OOM kills.
pub const PF_BALLOON_STAT_OOM_KILLS: u32 = 10;

/// The balloon of one guest memory: made by `pf_balloon_new`, released by
/// `pf_balloon_free`. Thread-safe: every call but `pf_balloon_free` may run
/// on one handle from several threads at once (the operations are
/// serialized inside). It keeps its guest memory alive.
pub struct pf_balloon {
    balloon: Balloon,
}

/// Makes balloon `b` release pages that dedup merged through the dedup host
/// `dedup`, where its memory is registered as `vm_id`: such a page's
/// sharing is broken first (as on a copy-on-write break; the shared frame
/// loses the page's reference and is freed at the host's next recount if
/// it was the last), then it is ballooned like any other. Without it, such
/// entries get `PF_BALLOON_E_SHARED`. The balloon holds the host: a
/// `pf_dedup_free` before `pf_balloon_free` releases the host only when the
/// balloon goes. Call it before the balloon is used from other threads.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_INVALID_ARGUMENT` (`vm_id` is
/// not registered with `dedup`, or is registered for another memory than
/// the balloon's; the balloon is left as it was).
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle that no other thread uses
///   during the call.
/// - `dedup` is NULL or a live `pf_dedup` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_attach_dedup(
    b: *mut pf_balloon,
    dedup: *const crate::dedup::pf_dedup,
    vm_id: u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { crate::dedup::shared_host(dedup) }?;
        // SAFETY: NULL or a live handle used by this thread only (contract).
        let b = unsafe { b.as_mut() }.ok_or_else(|| Error::null("b"))?;
        let registered = host
            .memory(pagefold::VmId(vm_id))
            .map_err(|e| Error::invalid(format!("vm_id {vm_id}: {e}")))?;
        if !Arc::ptr_eq(&registered, b.balloon.memory()) {
            return Err(Error::invalid(format!(
                "vm_id {vm_id} is registered for another memory than the balloon's"
            )));
        }
        let placeholder = Balloon::new(Arc::clone(b.balloon.memory()));
        let balloon = std::mem::replace(&mut b.balloon, placeholder);
        b.balloon = balloon.with_dedup(host, pagefold::VmId(vm_id));
        Ok(())
    }
}

/// One entry of a batch that was not applied.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_balloon_entry_error {
    /// Index of the entry in the batch (for a range: the page's index in
    /// the range).
    pub index: usize,
    /// Why: a `PF_BALLOON_E_*` code.
    pub code: i32,
}

/// What one inflate or deflate call did. Size-prefixed: set `struct_size`
/// to `sizeof(pf_balloon_report)`, and `errors` / `errors_capacity` to an
/// array for the entry errors (NULL and 0 to only count them); the call
/// fills in the rest and sets `struct_size` to the bytes it filled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pf_balloon_report {
    /// In: `sizeof(pf_balloon_report)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// In: NULL, or room for `errors_capacity` entry errors. The first
    /// `min(error_count, errors_capacity)` are stored, in batch order.
    pub errors: *mut pf_balloon_entry_error,
    /// In: the number of entries `errors` has room for.
    pub errors_capacity: usize,
    /// Out: entries applied.
    pub applied: u64,
    /// Out: 4 KiB pages whose memory went back to the host in this call (a
    /// page already released counts nothing; on hugetlb, pages count when
    /// their whole huge page is released).
    pub released_pages: u64,
    /// Out: entries not applied (all of them, even beyond
    /// `errors_capacity`).
    pub error_count: usize,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers and a raw
// pointer only.
unsafe impl SizePrefixed for pf_balloon_report {
    const NAME: &'static str = "pf_balloon_report";
}

/// The balloon's counters, in 4 KiB pages. Size-prefixed: set
/// `struct_size` first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_balloon_counts {
    /// In: `sizeof(pf_balloon_counts)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// The target set last (`pf_balloon_set_target`; the device's
    /// `num_pages`).
    pub target: u64,
    /// Pages in the balloon now (the device's `actual`).
    pub actual: u64,
    /// Pages deflated so far: by deflate requests, by library writes to
    /// ballooned pages, and by library reads or `pf_balloon_reclaim_touched`
    /// finding a ballooned page the guest touched (each page once).
    pub deflated: u64,
    /// Pages the guest deflated below the target (deflate on OOM).
    pub oom_deflated: u64,
    /// Pages released through free page reporting.
    pub reported: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_balloon_counts {
    const NAME: &'static str = "pf_balloon_counts";
}

/// The guest's memory statistics recorded last. Size-prefixed: set
/// `struct_size` first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_balloon_stats {
    /// In: `sizeof(pf_balloon_stats)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Value per standard tag, indexed by `PF_BALLOON_STAT_*`; 0 where the
    /// guest did not send the tag.
    pub values: [u64; PF_BALLOON_STAT_TAGS],
    /// Bit `t` is set when the guest sent tag `t` (`1u << PF_BALLOON_STAT_*`).
    pub set: u32,
    /// Entries with a tag this library does not know (ignored).
    pub unknown_tags: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_balloon_stats {
    const NAME: &'static str = "pf_balloon_stats";
}

/// Called with the number of pages each time a deflate takes the
/// balloon's `actual` below its target (`VIRTIO_BALLOON_F_DEFLATE_ON_OOM`),
/// with the `user` pointer given to `pf_balloon_set_oom_hook`. It runs on
/// the thread that made the deflate call, while the balloon is locked: it must not call into the same
/// balloon, and must not unwind (no C++ exception, no longjmp out of it).
pub type pf_balloon_oom_fn = Option<unsafe extern "C" fn(pages: u64, user: *mut c_void)>;

/// The OOM hook's `user` pointer, carried to whichever thread deflates.
struct UserPtr(*mut c_void);

// SAFETY: the pointer is only handed back to the caller's hook; the caller
// chose it and is told the hook runs on any thread that deflates.
unsafe impl Send for UserPtr {}
// SAFETY: as for `Send`: the library never dereferences it.
unsafe impl Sync for UserPtr {}

/// The `PF_BALLOON_E_*` code of an entry error.
fn entry_code(e: &BalloonError) -> i32 {
    match e {
        BalloonError::OutOfRange { .. } => PF_BALLOON_E_OUT_OF_RANGE,
        BalloonError::Hole { .. } => PF_BALLOON_E_HOLE,
        BalloonError::Repeated { .. } => PF_BALLOON_E_REPEATED,
        BalloonError::OverLimit { .. } => PF_BALLOON_E_OVER_LIMIT,
        BalloonError::AlreadyBallooned { .. } => PF_BALLOON_E_ALREADY_BALLOONED,
        BalloonError::NotBallooned { .. } => PF_BALLOON_E_NOT_BALLOONED,
        BalloonError::Shared { .. } => PF_BALLOON_E_SHARED,
        BalloonError::Busy { .. } => PF_BALLOON_E_BUSY,
        BalloonError::Truncated { .. } => PF_BALLOON_E_TRUNCATED,
        BalloonError::Misaligned { .. } => PF_BALLOON_E_MISALIGNED,
        BalloonError::Order { .. } => PF_BALLOON_E_ORDER,
        BalloonError::Access(_) => PF_BALLOON_E_ACCESS,
        BalloonError::Release { .. } => PF_BALLOON_E_RELEASE,
        BalloonError::Unmerge { .. } => PF_BALLOON_E_UNMERGE,
    }
}

/// A whole-call failure (a range, a free page report, a stats buffer).
impl From<BalloonError> for Error {
    fn from(e: BalloonError) -> Self {
        let status = match &e {
            BalloonError::OutOfRange { .. } | BalloonError::Hole { .. } => {
                pf_status::PF_ERR_UNMAPPED
            }
            BalloonError::Misaligned { .. } => pf_status::PF_ERR_MISALIGNED,
            BalloonError::Busy { .. } => pf_status::PF_ERR_BUSY,
            BalloonError::Access(a) => access_status(a),
            BalloonError::Release { source, .. } => frame_status(source),
            BalloonError::Unmerge { source, .. } => dedup_status(source),
            BalloonError::Repeated { .. }
            | BalloonError::OverLimit { .. }
            | BalloonError::AlreadyBallooned { .. }
            | BalloonError::NotBallooned { .. }
            | BalloonError::Shared { .. }
            | BalloonError::Truncated { .. }
            | BalloonError::Order { .. } => pf_status::PF_ERR_INVALID_ARGUMENT,
        };
        Error::new(status, e.to_string())
    }
}

/// Borrows the balloon behind `b`.
///
/// # Safety
///
/// `b` is NULL or a live handle that is not freed during `'a`.
unsafe fn balloon<'a>(b: *const pf_balloon) -> Result<&'a Balloon, Error> {
    // SAFETY: forwarded from this function's contract.
    Ok(&unsafe { args::handle(b, "balloon") }?.balloon)
}

/// A caller's report, checked before the batch runs.
struct ReportOut<'a> {
    out: SizedOut<'a, pf_balloon_report>,
    input: pf_balloon_report,
    errors: &'a mut [u8],
}

/// Checks the report `p` and its error array.
///
/// # Safety
///
/// `p` is NULL or points to a `pf_balloon_report` whose `struct_size`
/// bytes are readable and writable during `'a`, and whose `errors` is NULL
/// or valid for writes of `errors_capacity` entries that nothing else uses
/// during `'a`.
unsafe fn report_out<'a>(p: *mut pf_balloon_report) -> Result<ReportOut<'a>, Error> {
    // SAFETY: `p` is NULL or `struct_size` readable bytes (contract).
    let input = unsafe { args::read_sized(p.cast_const(), "out_report") }?;
    let bytes = input
        .errors_capacity
        .checked_mul(size_of::<pf_balloon_entry_error>())
        .ok_or_else(|| {
            Error::invalid(format!(
                "errors_capacity {} is larger than any array can be",
                input.errors_capacity
            ))
        })?;
    // SAFETY: `errors` is NULL or writable for `errors_capacity` entries,
    // unused elsewhere during 'a (contract); checked for NULL and size here.
    let errors = unsafe { args::bytes_mut(input.errors.cast(), bytes, "out_report->errors") }?;
    // SAFETY: `p` is NULL or `struct_size` bytes we may read and write
    // (contract).
    let out = unsafe { args::sized_out(p, "out_report") }?;
    Ok(ReportOut { out, input, errors })
}

impl ReportOut<'_> {
    /// Stores what the batch did.
    fn finish(self, r: &BatchReport) {
        let size = size_of::<pf_balloon_entry_error>();
        for (slot, e) in self.errors.chunks_exact_mut(size).zip(&r.errors) {
            let entry = pf_balloon_entry_error {
                index: e.index,
                code: entry_code(&e.error),
            };
            // SAFETY: `slot` is `size_of::<pf_balloon_entry_error>()`
            // writable bytes of the caller's array; `write_unaligned` needs
            // no alignment.
            unsafe {
                slot.as_mut_ptr()
                    .cast::<pf_balloon_entry_error>()
                    .write_unaligned(entry)
            };
        }
        self.out.write(pf_balloon_report {
            struct_size: size_of::<pf_balloon_report>(),
            errors: self.input.errors,
            errors_capacity: self.input.errors_capacity,
            applied: r.applied,
            released_pages: r.released_pages,
            error_count: r.errors.len(),
        });
    }
}

/// Creates the balloon of `mem` and stores the handle in `*out_balloon`.
/// `max_batch` is the most PFNs one inflate or deflate call may carry
/// (entries past it get `PF_BALLOON_E_OVER_LIMIT`); 0 means virtio's 256.
/// The balloon keeps the memory alive. Make one balloon per guest memory.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_balloon` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_new(
    mem: *const pf_guest_memory,
    max_batch: usize,
    out_balloon: *mut *mut pf_balloon,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = Arc::clone(unsafe { memory(mem) }?);
        // SAFETY: `out_balloon` is NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_balloon, "out_balloon") }?;
        let mut options = BalloonOptions::default();
        if max_batch != 0 {
            options.max_batch = max_batch;
        }
        let balloon = Balloon::with_options(mem, options);
        out.write(Box::into_raw(Box::new(pf_balloon { balloon })));
        Ok(())
    }
}

/// Releases the balloon and its hold on the memory. Ballooned pages stay
/// ballooned (they read as zeros; a write takes them back). NULL is allowed
/// and does nothing.
///
/// # Safety
///
/// `b` is NULL or a `pf_balloon` handle that has not been freed, and no
/// other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_free(b: *mut pf_balloon) {
    ffi_boundary! { returns ();
        if !b.is_null() {
            // SAFETY: from `Box::into_raw` in `pf_balloon_new`, not freed,
            // not used again (contract).
            drop(unsafe { Box::from_raw(b) });
        }
    }
}

/// Inflates the pages with the `n` guest frame numbers (guest-physical
/// address / 4096) at `pfns` (one virtio inflate request): their memory
/// goes back to the host. Bad entries (out of range, in a hole, repeated,
/// past `max_batch`, already ballooned, dedup-shared, busy) are reported in
/// `*out_report` and the rest is applied; the call still returns `PF_OK`.
///
/// Errors: `PF_ERR_NULL_POINTER` (`b`, `out_report`, `pfns` while `n > 0`,
/// `out_report->errors` while its capacity is not 0),
/// `PF_ERR_STRUCT_TOO_SMALL`, `PF_ERR_INVALID_ARGUMENT` (absurd `n` or
/// capacity). Nothing is applied when the call fails.
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle.
/// - `pfns` is NULL or valid for reads of `n` `uint64_t`s (guest frame
///   numbers).
/// - `out_report` is NULL or points to a `pf_balloon_report` whose
///   `struct_size` bytes are readable and writable, and whose `errors` is
///   NULL or valid for writes of `errors_capacity` entries.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_inflate_pfns(
    b: *const pf_balloon,
    pfns: *const u64,
    n: usize,
    out_report: *mut pf_balloon_report,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        // SAFETY: `pfns` is NULL or `n` readable words (contract).
        let pfns = unsafe { args::array(pfns, n, "pfns", "n") }?;
        // SAFETY: as `report_out` needs (contract).
        let out = unsafe { report_out(out_report) }?;
        out.finish(&b.inflate_pfns(GuestFrame::from_raw_slice(&pfns)));
        Ok(())
    }
}

/// Deflates the pages with the `n` guest frame numbers (guest-physical
/// address / 4096) at `pfns` (one virtio deflate request): they are the
/// guest's again and take memory on their next write. A valid page is never
/// refused (deflate on OOM needs no consent); a deflate below the target
/// counts in `oom_deflated` and calls the OOM hook. Bad entries are
/// reported as for `pf_balloon_inflate_pfns`.
///
/// Errors: as `pf_balloon_inflate_pfns`.
///
/// # Safety
///
/// As `pf_balloon_inflate_pfns`.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_deflate_pfns(
    b: *const pf_balloon,
    pfns: *const u64,
    n: usize,
    out_report: *mut pf_balloon_report,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        // SAFETY: `pfns` is NULL or `n` readable words (contract).
        let pfns = unsafe { args::array(pfns, n, "pfns", "n") }?;
        // SAFETY: as `report_out` needs (contract).
        let out = unsafe { report_out(out_report) }?;
        out.finish(&b.deflate_pfns(GuestFrame::from_raw_slice(&pfns)));
        Ok(())
    }
}

/// Inflates from the raw payload of the virtio inflate queue: `len` bytes
/// of little-endian 32-bit guest frame numbers. A trailing partial entry is
/// reported as a `PF_BALLOON_E_TRUNCATED` entry error; the whole entries
/// are applied.
///
/// Errors: `PF_ERR_NULL_POINTER` (`b`, `out_report`, `bytes` while
/// `len > 0`, `out_report->errors` while its capacity is not 0),
/// `PF_ERR_STRUCT_TOO_SMALL`, `PF_ERR_INVALID_ARGUMENT` (absurd `len` or
/// capacity).
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle.
/// - `bytes` is NULL or valid for reads of `len` bytes.
/// - `out_report` as for `pf_balloon_inflate_pfns`.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_inflate_le32(
    b: *const pf_balloon,
    bytes: *const c_void,
    len: usize,
    out_report: *mut pf_balloon_report,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        // SAFETY: `bytes` is NULL or `len` readable bytes (contract).
        let data = unsafe { args::bytes(bytes, len, "bytes") }?;
        // SAFETY: as `report_out` needs (contract).
        let out = unsafe { report_out(out_report) }?;
        out.finish(&b.inflate_pfns_le32(data));
        Ok(())
    }
}

/// Deflates from the raw payload of the virtio deflate queue; see
/// `pf_balloon_inflate_le32` and `pf_balloon_deflate_pfns`.
///
/// Errors: as `pf_balloon_inflate_le32`.
///
/// # Safety
///
/// As `pf_balloon_inflate_le32`.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_deflate_le32(
    b: *const pf_balloon,
    bytes: *const c_void,
    len: usize,
    out_report: *mut pf_balloon_report,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        // SAFETY: `bytes` is NULL or `len` readable bytes (contract).
        let data = unsafe { args::bytes(bytes, len, "bytes") }?;
        // SAFETY: as `report_out` needs (contract).
        let out = unsafe { report_out(out_report) }?;
        out.finish(&b.deflate_pfns_le32(data));
        Ok(())
    }
}

/// Inflates every 4 KiB page of `[gpa, gpa + len)` (`gpa` a guest-physical
/// address, `len` in bytes), which must be 4 KiB aligned and wholly inside
/// guest memory (it may span adjacent regions). Pages already in the
/// balloon are skipped silently; other per-page errors (shared, busy) carry
/// the page's index in the range. The range is not bounded by `max_batch`.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`,
/// `PF_ERR_INVALID_ARGUMENT` (absurd capacity), `PF_ERR_MISALIGNED`,
/// `PF_ERR_UNMAPPED` (a page of the range is not guest memory); then
/// nothing is applied and `*out_report` is left alone.
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle.
/// - `out_report` as for `pf_balloon_inflate_pfns`.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_inflate_range(
    b: *const pf_balloon,
    gpa: u64,
    len: u64,
    out_report: *mut pf_balloon_report,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        // SAFETY: as `report_out` needs (contract).
        let out = unsafe { report_out(out_report) }?;
        out.finish(&b.inflate_range(pagefold::GuestPhysAddr(gpa), len)?);
        Ok(())
    }
}

/// Deflates every 4 KiB page of `[gpa, gpa + len)` (`gpa` a guest-physical
/// address, `len` in bytes); pages not in the balloon are skipped silently.
/// See `pf_balloon_inflate_range` and `pf_balloon_deflate_pfns`.
///
/// Errors: as `pf_balloon_inflate_range`.
///
/// # Safety
///
/// As `pf_balloon_inflate_range`.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_deflate_range(
    b: *const pf_balloon,
    gpa: u64,
    len: u64,
    out_report: *mut pf_balloon_report,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        // SAFETY: as `report_out` needs (contract).
        let out = unsafe { report_out(out_report) }?;
        out.finish(&b.deflate_range(pagefold::GuestPhysAddr(gpa), len)?);
        Ok(())
    }
}

/// Free page reporting: the guest reports `2^order` free 4 KiB pages at
/// guest-physical address `gpa` (aligned to that size or to the store's
/// page size). Their memory is released; they stay the guest's (zero pages,
/// not counted in `actual`). On a hugetlb store a report smaller than a
/// huge page releases nothing. Stores the pages released in
/// `*out_released_pages` (NULL allowed).
///
/// Errors: `PF_ERR_NULL_POINTER` (`b`), `PF_ERR_INVALID_ARGUMENT` (`order`
/// above 40), `PF_ERR_MISALIGNED`, `PF_ERR_UNMAPPED`, `PF_ERR_OS`.
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle.
/// - `out_released_pages` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_report_free(
    b: *const pf_balloon,
    gpa: u64,
    order: u32,
    out_released_pages: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        let released = b.report_free(pagefold::GuestPhysAddr(gpa), order)?;
        if !out_released_pages.is_null() {
            // SAFETY: not NULL; writable for a `uint64_t` (contract).
            unsafe { args::out(out_released_pages, "out_released_pages") }?.write(released);
        }
        Ok(())
    }
}

/// Sets the number of 4 KiB pages the host wants in the balloon (the
/// device's `num_pages`). Deflates that take `actual` below it count as OOM
/// deflates.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// `b` is NULL or a live `pf_balloon` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_set_target(b: *const pf_balloon, pages: u64) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        b.set_target(pages);
        Ok(())
    }
}

/// Takes back the ballooned pages the guest touched through the raw
/// mapping (a vCPU or a device read or wrote one, so the kernel gave it
/// memory again), counts them as deflated, and stores how many in
/// `*out_pages` (NULL allowed). Call it before reporting `actual` to the
/// device. Finds nothing on hugetlb, nor in a run of pages whose residency
/// the kernel would not report (`mincore` failing: left for the next call).
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle.
/// - `out_pages` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_reclaim_touched(
    b: *const pf_balloon,
    out_pages: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        let n = b.reclaim_touched()?;
        if !out_pages.is_null() {
            // SAFETY: not NULL; writable for a `uint64_t` (contract).
            unsafe { args::out(out_pages, "out_pages") }?.write(n);
        }
        Ok(())
    }
}

/// Stores the balloon's counters in `*out_counts`. Set
/// `out_counts->struct_size` first. A snapshot: other threads may change
/// them while they are read.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`.
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle.
/// - `out_counts` is NULL or points to a `pf_balloon_counts` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_get_counts(
    b: *const pf_balloon,
    out_counts: *mut pf_balloon_counts,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        // SAFETY: `out_counts` is NULL or `struct_size` bytes we may read
        // and write (contract).
        let out = unsafe { args::sized_out(out_counts, "out_counts") }?;
        out.write(pf_balloon_counts {
            struct_size: size_of::<pf_balloon_counts>(),
            target: b.target(),
            actual: b.actual(),
            deflated: b.deflated(),
            oom_deflated: b.oom_deflated(),
            reported: b.reported(),
        });
        Ok(())
    }
}

/// Records the stats queue's buffer: `len` bytes of packed
/// `(le16 tag, le64 value)` entries (10 bytes each). Unknown tags are
/// counted and ignored; a later entry with the same tag wins. Read them
/// back with `pf_balloon_get_stats`.
///
/// Errors: `PF_ERR_NULL_POINTER` (`b`, `bytes` while `len > 0`),
/// `PF_ERR_INVALID_ARGUMENT` (`len` not a multiple of 10, or absurd); then
/// the stats recorded before stay.
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle.
/// - `bytes` is NULL or valid for reads of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_update_stats(
    b: *const pf_balloon,
    bytes: *const c_void,
    len: usize,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        // SAFETY: `bytes` is NULL or `len` readable bytes (contract).
        let data = unsafe { args::bytes(bytes, len, "bytes") }?;
        b.update_stats(data)?;
        Ok(())
    }
}

fn stats_out(s: &BalloonStats) -> pf_balloon_stats {
    let tags = [
        s.swap_in,
        s.swap_out,
        s.major_faults,
        s.minor_faults,
        s.free_memory,
        s.total_memory,
        s.available_memory,
        s.disk_caches,
        s.hugetlb_allocations,
        s.hugetlb_failures,
        s.oom_kills,
    ];
    let mut out = pf_balloon_stats {
        struct_size: size_of::<pf_balloon_stats>(),
        unknown_tags: s.unknown_tags,
        ..pf_balloon_stats::default()
    };
    for (tag, v) in tags.into_iter().enumerate() {
        if let Some(v) = v {
            out.values[tag] = v;
            out.set |= 1 << tag;
        }
    }
    out
}

/// Stores the stats recorded last in `*out_stats` (all unset before the
/// first `pf_balloon_update_stats`). Set `out_stats->struct_size` first.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`.
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle.
/// - `out_stats` is NULL or points to a `pf_balloon_stats` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_get_stats(
    b: *const pf_balloon,
    out_stats: *mut pf_balloon_stats,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read and
        // write (contract).
        let out = unsafe { args::sized_out(out_stats, "out_stats") }?;
        out.write(stats_out(&b.stats()));
        Ok(())
    }
}

/// Sets the OOM hook: `hook(pages, user)` is called each time a deflate
/// takes `actual` below the target (see `pf_balloon_oom_fn`). A NULL `hook`
/// removes it. `user` must stay valid, and usable from any thread that
/// deflates, until the hook is replaced or the balloon freed.
///
/// Errors: `PF_ERR_NULL_POINTER` (`b`).
///
/// # Safety
///
/// - `b` is NULL or a live `pf_balloon` handle.
/// - `hook` is NULL or callable as `pf_balloon_oom_fn` says, from any
///   thread, with `user`, for as long as it is set.
#[no_mangle]
pub unsafe extern "C" fn pf_balloon_set_oom_hook(
    b: *const pf_balloon,
    hook: pf_balloon_oom_fn,
    user: *mut c_void,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `b` is NULL or a live handle (contract).
        let b = unsafe { balloon(b) }?;
        match hook {
            Some(hook) => {
                let user = UserPtr(user);
                b.set_oom_hook(move |pages| {
                    let user = &user;
                    // SAFETY: the hook is callable with `user` from this
                    // thread while it is set (contract).
                    unsafe { hook(pages, user.0) }
                });
            }
            None => b.set_oom_hook(|_| {}),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_distinct_code() {
        let errs = [
            BalloonError::OutOfRange { pfn: GuestFrame(0) },
            BalloonError::Hole { pfn: GuestFrame(0) },
            BalloonError::Repeated {
                pfn: GuestFrame(0),
                first: 0,
            },
            BalloonError::OverLimit { limit: 1 },
            BalloonError::AlreadyBallooned { pfn: GuestFrame(0) },
            BalloonError::NotBallooned { pfn: GuestFrame(0) },
            BalloonError::Shared { pfn: GuestFrame(0) },
            BalloonError::Busy { pfn: GuestFrame(0) },
            BalloonError::Truncated { len: 3, entry: 4 },
            BalloonError::Misaligned {
                addr: pagefold::GuestPhysAddr(1),
                len: 1,
                align: 4096,
            },
            BalloonError::Order { order: 99 },
        ];
        let mut codes: Vec<i32> = errs.iter().map(entry_code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), errs.len());
    }
}
