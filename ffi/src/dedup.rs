//! Deduplication: `pf_dedup` and its exports.
//!
//! A handle is a boxed [`DedupHost`]. The host holds an `Arc` of every
//! registered guest memory (the same `Arc` as the `pf_guest_memory` handle,
//! see `memory.rs`) and of its frame store, so the C handles of both may be
//! freed in any order. The core refuses a memory that a host already owns
//! (`PF_ERR_INVALID_ARGUMENT`).

// The types carry their C names, so the header and the Rust agree.
#![allow(non_camel_case_types)]

use std::{ffi::c_int, mem::size_of, sync::Arc, time::Duration};

use pagefold::{
    dedup::{DedupOptions, KernelView, ScanReport},
    DedupHost, DedupStats, DomainId, GuestMemory, GuestPhysAddr, ScanBudget, VmId, VmOptions,
};

use crate::{
    args::{self, SizePrefixed, SizedOut},
    memory::{memory, pf_guest_memory},
    status::{pf_status, Error},
    store::{frame_store, pf_frame_store},
};

/// The deduplication engine for the guest memories of one frame store:
/// folds identical pages of the registered VMs into one copy-on-write frame
/// and gives the memory of the duplicates, and of zero pages, back to the
/// host. Pages are shared only within a merge domain. A write to a merged
/// page (through this library, a raw pointer or a KVM vCPU) gets a private
/// copy from the kernel first; the other VMs never see it.
///
/// Made by `pf_dedup_new`, released by `pf_dedup_free`. Thread-safe: every
/// call but `pf_dedup_free` may run on one handle from several threads at
/// once (scans and merges take turns inside), and guest memory stays fully
/// usable by vCPU and device threads while they run.
pub struct pf_dedup {
    /// Shared with balloons that release merged pages through it
    /// (`pf_balloon_attach_dedup`).
    pub(crate) host: Arc<DedupHost>,
}

// Every export but `pf_dedup_free` shares the handle between threads.
const _: fn() = || {
    fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<pf_dedup>();
};

/// `pf_dedup_options.map_headroom` when it is 0: kernel mappings (VMAs) left
/// to the rest of the process.
pub const PF_DEDUP_DEFAULT_MAP_HEADROOM: u64 = 4096;

/// How `pf_dedup_new` builds a dedup host. Size-prefixed: set `struct_size`
/// to `sizeof(pf_dedup_options)`. All-zero fields mean the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pf_dedup_options {
    /// `sizeof(pf_dedup_options)` as the caller was compiled with.
    pub struct_size: usize,
    /// Kernel mappings (VMAs) kept for the rest of the process, in the
    /// frame store's mapping budget, which every remap of its guest pages
    /// spends from: below it merging stops (pages it skips are counted in
    /// `map_limit`), an unmerge takes back part of a merged stretch instead
    /// of splitting it, and a discard leaves merged pages merged. 0 means
    /// `PF_DEDUP_DEFAULT_MAP_HEADROOM`.
    pub map_headroom: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_dedup_options {
    const NAME: &'static str = "pf_dedup_options";
}

/// How a VM takes part in deduplication (`pf_dedup_register`).
/// Size-prefixed: set `struct_size` to `sizeof(pf_vm_options)`. All-zero
/// fields mean the defaults (domain 0, every region deduplicated).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_vm_options {
    /// `sizeof(pf_vm_options)` as the caller was compiled with.
    pub struct_size: usize,
    /// Merge domain (tenant): pages of VMs in different domains are never
    /// shared (identical pages of two tenants must not reveal each other
    /// through timing). Zero pages are released in every domain.
    pub domain: u32,
    /// Zero; reserved (other values are refused with
    /// `PF_ERR_INVALID_ARGUMENT`).
    pub reserved: u32,
    /// Guest-physical start addresses of regions to leave alone (device
    /// memory, regions another process maps through their fd). Each must be
    /// the start of one of the memory's regions. NULL when `exclude_count`
    /// is 0; only read during the call.
    pub exclude_starts: *const u64,
    /// Number of addresses at `exclude_starts`.
    pub exclude_count: usize,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers and a raw
// pointer only, which are valid for every bit pattern.
unsafe impl SizePrefixed for pf_vm_options {
    const NAME: &'static str = "pf_vm_options";
}

impl Default for pf_vm_options {
    fn default() -> Self {
        pf_vm_options {
            struct_size: size_of::<Self>(),
            domain: 0,
            reserved: 0,
            exclude_starts: std::ptr::null(),
            exclude_count: 0,
        }
    }
}

/// What one `pf_dedup_merge_now` or `pf_dedup_scan_step` did, in 4 KiB
/// pages unless named otherwise. Size-prefixed: set `struct_size` to
/// `sizeof(pf_scan_report)` before the call; the call sets it to the number
/// of bytes it filled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_scan_report {
    /// In: `sizeof(pf_scan_report)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Pages visited.
    pub pages_scanned: u64,
    /// Pages newly mapped onto a shared frame.
    pub merged_shared: u64,
    /// Zero pages newly released.
    pub merged_zero: u64,
    /// Pages skipped because their content changed since their previous
    /// visit (scan steps only: a page must hold still for a full scan).
    pub volatile_pages: u64,
    /// Pages whose bytes changed between hashing and merging (not merged).
    pub changed: u64,
    /// Pages another operation held (not merged).
    pub busy: u64,
    /// Pages not merged for lack of kernel mappings (see
    /// `pf_dedup_options.map_headroom`).
    pub map_limit: u64,
    /// Remap (mmap) calls made.
    pub remaps: u64,
    /// Pages read and hashed.
    pub pages_hashed: u64,
    /// Wall-clock nanoseconds spent hashing.
    pub hash_nanos: u64,
    /// Threads that hashed in parallel.
    pub hash_threads: u64,
    /// Wall-clock nanoseconds spent grouping and comparing candidates.
    pub group_nanos: u64,
    /// Wall-clock nanoseconds spent merging (protect, compare, remap, punch).
    pub merge_nanos: u64,
    /// 1 if a full pass over all VMs ended in this call, else 0.
    pub full_scan_completed: u32,
    /// Zero; reserved.
    pub reserved: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_scan_report {
    const NAME: &'static str = "pf_scan_report";
}

impl From<ScanReport> for pf_scan_report {
    fn from(r: ScanReport) -> Self {
        pf_scan_report {
            struct_size: size_of::<Self>(),
            pages_scanned: r.pages_scanned,
            merged_shared: r.merged_shared,
            merged_zero: r.merged_zero,
            volatile_pages: r.volatile,
            changed: r.changed,
            busy: r.busy,
            map_limit: r.map_limit,
            remaps: r.remaps,
            pages_hashed: r.pages_hashed,
            hash_nanos: r.hash_nanos,
            hash_threads: r.hash_threads,
            group_nanos: r.group_nanos,
            merge_nanos: r.merge_nanos,
            full_scan_completed: u32::from(r.full_scan_completed),
            reserved: 0,
        }
    }
}

/// Host-wide dedup statistics, in 4 KiB pages, with the names and meanings
/// of Linux KSM's `/sys/kernel/mm/ksm/`. Size-prefixed like
/// `pf_scan_report`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_host_stats {
    /// In: `sizeof(pf_host_stats)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Pages of all registered VMs.
    pub pages_total: u64,
    /// Shared frames in use (KSM `pages_shared`).
    pub pages_shared: u64,
    /// Guest pages mapping a shared frame beyond the first of each: the
    /// pages saved by sharing (KSM `pages_sharing`).
    pub pages_sharing: u64,
    /// Pages seen stable this full scan with no match yet (scan steps;
    /// KSM `pages_unshared`).
    pub pages_unshared: u64,
    /// Pages whose content changed between visits in the last full scan
    /// (KSM `pages_volatile`).
    pub pages_volatile: u64,
    /// Zero pages released: no frame, no shared copy (KSM
    /// `ksm_zero_pages`).
    pub zero_pages: u64,
    /// Full passes over all VMs (KSM `full_scans`).
    pub full_scans: u64,
    /// Writes to merged pages that made a private copy.
    pub cow_breaks: u64,
    /// Pages not merged because the process neared `vm.max_map_count`.
    pub map_limit_hits: u64,
    /// Write faults the userfaultfd handler saw (writers that met a merge
    /// in progress).
    pub write_faults_seen: u64,
    /// Bytes saved minus bytes of dedup bookkeeping (KSM
    /// `general_profit`); negative when dedup costs more than it saves.
    pub profit_bytes: i64,
    /// Background scan steps that failed (`pf_dedup_start_background`).
    pub background_errors: u64,
    /// Bytes of dedup bookkeeping allocated now (the page-state tables of
    /// the registered VMs, the hash each page left, the unstable index and
    /// the shared-frame table, as capacities); `profit_bytes` is the bytes
    /// saved minus these.
    pub metadata_bytes: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_host_stats {
    const NAME: &'static str = "pf_host_stats";
    // ABI 0.2 published it without `background_errors`.
    const FIRST_SIZE: usize = std::mem::offset_of!(pf_host_stats, background_errors);
}

impl From<DedupStats> for pf_host_stats {
    fn from(s: DedupStats) -> Self {
        pf_host_stats {
            struct_size: size_of::<Self>(),
            pages_total: s.pages_total,
            pages_shared: s.pages_shared,
            pages_sharing: s.pages_sharing,
            pages_unshared: s.pages_unshared,
            pages_volatile: s.pages_volatile,
            zero_pages: s.zero_pages,
            full_scans: s.full_scans,
            cow_breaks: s.cow_breaks,
            map_limit_hits: s.map_limit_hits,
            write_faults_seen: s.write_faults_seen,
            profit_bytes: s.profit_bytes,
            background_errors: s.background_errors,
            metadata_bytes: s.metadata_bytes,
        }
    }
}

/// Dedup statistics of one VM, in 4 KiB pages. Size-prefixed like
/// `pf_scan_report`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_vm_stats {
    /// In: `sizeof(pf_vm_stats)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Pages of the VM.
    pub pages: u64,
    /// Pages mapping a shared frame.
    pub pages_merged: u64,
    /// Zero pages released.
    pub zero_pages: u64,
    /// Writes to merged pages that made a private copy.
    pub cow_breaks: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_vm_stats {
    const NAME: &'static str = "pf_vm_stats";
}

/// What the kernel says about memory right now, in bytes unless named
/// otherwise: the figures every saving is checked against. Size-prefixed
/// like `pf_scan_report`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_kernel_view {
    /// In: `sizeof(pf_kernel_view)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Bytes the frame store's memfd really holds (as
    /// `pf_frame_store_allocated_bytes`).
    pub store_bytes: u64,
    /// Resident set of the process (`Rss` of /proc/self/smaps_rollup).
    pub rss_bytes: u64,
    /// Proportional set of the process: shared pages divided by sharers
    /// (`Pss`).
    pub pss_bytes: u64,
    /// Anonymous memory of the process (`Anonymous`; includes the copies
    /// the kernel made on writes to merged pages).
    pub anon_bytes: u64,
    /// Mappings (VMAs) of the whole process.
    pub mappings: u64,
    /// Mappings covering registered guest memory.
    pub guest_mappings: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_kernel_view {
    const NAME: &'static str = "pf_kernel_view";
}

impl From<KernelView> for pf_kernel_view {
    fn from(k: KernelView) -> Self {
        pf_kernel_view {
            struct_size: size_of::<Self>(),
            store_bytes: k.store_bytes,
            rss_bytes: k.rss_bytes,
            pss_bytes: k.pss_bytes,
            anon_bytes: k.anon_bytes,
            mappings: k.mappings,
            guest_mappings: k.guest_mappings,
        }
    }
}

/// Borrows the dedup host behind `dedup`.
///
/// # Safety
///
/// `dedup` is NULL or a live handle that is not freed during `'a`.
unsafe fn host<'a>(dedup: *const pf_dedup) -> Result<&'a DedupHost, Error> {
    // SAFETY: forwarded from this function's contract.
    Ok(&unsafe { args::handle(dedup, "dedup") }?.host)
}

/// The shared dedup host behind `dedup`.
///
/// # Safety
///
/// `dedup` is NULL or a live handle that is not freed during the call.
pub(crate) unsafe fn shared_host(dedup: *const pf_dedup) -> Result<Arc<DedupHost>, Error> {
    // SAFETY: forwarded from this function's contract.
    Ok(Arc::clone(&unsafe { args::handle(dedup, "dedup") }?.host))
}

/// Checks an optional size-prefixed out-parameter: NULL means the caller
/// does not want it.
///
/// # Safety
///
/// As `args::sized_out`.
unsafe fn optional_sized_out<'a, T: SizePrefixed>(
    p: *mut T,
    arg: &str,
) -> Result<Option<SizedOut<'a, T>>, Error> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { args::sized_out(p, arg) }.map(Some)
}

/// Creates a dedup host for the guest memories of `store`, built as
/// `options` says (NULL means the defaults), and stores the handle in
/// `*out_dedup`. The host holds the store. It opens a userfaultfd (write
/// protection holds writers while a page changes backing) and starts one
/// thread, "pagefold-uffd", that serves it.
///
/// Errors: `PF_ERR_NULL_POINTER` (`store`, `out_dedup`),
/// `PF_ERR_STRUCT_TOO_SMALL` (`options`), `PF_ERR_UNSUPPORTED` (a hugetlb
/// store: dedup needs 4 KiB pages), `PF_ERR_USERFAULT` (no userfaultfd
/// write protection for shmem here, or no privilege for it), `PF_ERR_OS`.
///
/// # Safety
///
/// - `store` is NULL or a live `pf_frame_store` handle.
/// - `options` is NULL or points to a `pf_dedup_options` whose
///   `struct_size` bytes are readable.
/// - `out_dedup` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_new(
    store: *const pf_frame_store,
    options: *const pf_dedup_options,
    out_dedup: *mut *mut pf_dedup,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `store` is NULL or a live handle (contract).
        let store = unsafe { frame_store(store) }?;
        // SAFETY: `out_dedup` is NULL or writable for a pointer (contract).
        let out_dedup = unsafe { args::out(out_dedup, "out_dedup") }?;
        let options = if options.is_null() {
            pf_dedup_options::default()
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable (contract).
            unsafe { args::read_sized(options, "options") }?
        };
        let options = DedupOptions {
            map_headroom: match options.map_headroom {
                0 => PF_DEDUP_DEFAULT_MAP_HEADROOM,
                n => n,
            },
        };
        let host = DedupHost::with_options(Arc::clone(store), options)?;
        out_dedup.write(Box::into_raw(Box::new(pf_dedup { host: Arc::new(host) })));
        Ok(())
    }
}

/// Releases a dedup host: every merged page is brought back to a frame of
/// its own first (with its current bytes), then the host lets go of the
/// memories and the store (a memory whose handle was freed is unmapped now)
/// and its thread ends. Unmerging needs memory for every merged page again.
/// NULL is allowed and does nothing. A balloon attached to the host
/// (`pf_balloon_attach_dedup`) holds it: then all of this happens only when
/// the last such balloon is freed, and until then the host, and a
/// background scanner it runs, go on (stop the scanner first with
/// `pf_dedup_stop_background` if that matters).
///
/// # Safety
///
/// `dedup` is NULL or a handle from `pf_dedup_new` that has not been freed,
/// and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_free(dedup: *mut pf_dedup) {
    ffi_boundary! { returns ();
        if !dedup.is_null() {
            // Dropping unmerges and lets go of the memories.
            // SAFETY: `dedup` came from `Box::into_raw` in `pf_dedup_new`, was
            // not freed, and nothing uses it during or after this call.
            drop(unsafe { Box::from_raw(dedup) });
        }
    }
}

/// Registers the guest memory `mem` as a VM with the dedup host, as
/// `options` says (NULL means domain 0, every region included), and stores
/// its id (never 0) in `*out_vm_id`. Its pages are merged from the next
/// `pf_dedup_merge_now` or `pf_dedup_scan_step` on. The host holds the
/// memory until `pf_dedup_unregister` or `pf_dedup_free`, so
/// `pf_guest_memory_free` may come first. A memory is registered with one
/// host at a time, once.
///
/// Errors: `PF_ERR_NULL_POINTER` (`dedup`, `mem`, `out_vm_id`,
/// `options->exclude_starts` while `exclude_count > 0`),
/// `PF_ERR_STRUCT_TOO_SMALL` (`options`), `PF_ERR_INVALID_ARGUMENT` (nonzero
/// `reserved`, an excluded address that does not start a region, the
/// memory is registered already), `PF_ERR_UNSUPPORTED` (the memory's store
/// has huge pages), `PF_ERR_OS`. The memory may live in the host's store or
/// in one of its own: shared frames live in the host's.
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `options` is NULL or points to a `pf_vm_options` whose `struct_size`
///   bytes are readable, and whose `exclude_starts` is NULL or valid for
///   reads of `exclude_count` `uint64_t`s.
/// - `out_vm_id` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_register(
    dedup: *const pf_dedup,
    mem: *const pf_guest_memory,
    options: *const pf_vm_options,
    out_vm_id: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let dedup = unsafe { args::handle(dedup, "dedup") }?;
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_vm_id` is NULL or writable (contract).
        let out = unsafe { args::out(out_vm_id, "out_vm_id") }?;
        // SAFETY: `options` is NULL or a readable `pf_vm_options` whose
        // `exclude_starts` holds `exclude_count` addresses (contract).
        let (domain, exclude) = unsafe { read_vm_options(options) }?;
        let exclude = region_starts(mem, &exclude)?;

        let id = dedup.host.register(Arc::clone(mem), VmOptions { domain, exclude })?;
        out.write(id.0);
        Ok(())
    }
}

/// Reads `options` (NULL: domain 0, nothing excluded): the domain and the
/// excluded addresses, not yet checked against any layout.
///
/// # Safety
///
/// `options` is NULL or points to a `pf_vm_options` whose `struct_size`
/// bytes are readable, and whose `exclude_starts` is NULL or valid for
/// reads of `exclude_count` `uint64_t`s.
pub(crate) unsafe fn read_vm_options(
    options: *const pf_vm_options,
) -> Result<(DomainId, Vec<u64>), Error> {
    let options = if options.is_null() {
        pf_vm_options::default()
    } else {
        // SAFETY: not NULL; `struct_size` bytes readable (contract).
        unsafe { args::read_sized(options, "options") }?
    };
    if options.reserved != 0 {
        return Err(Error::invalid(format!(
            "options->reserved is {}; it must be 0",
            options.reserved
        )));
    }
    // SAFETY: `exclude_starts` is NULL or `exclude_count` readable
    // `uint64_t`s (contract).
    let exclude = unsafe {
        args::array(
            options.exclude_starts,
            options.exclude_count,
            "options->exclude_starts",
            "options->exclude_count",
        )
    }?;
    Ok((DomainId(options.domain), exclude))
}

/// The excluded addresses as region starts of `mem`, each checked.
fn region_starts(mem: &GuestMemory, starts: &[u64]) -> Result<Vec<GuestPhysAddr>, Error> {
    starts
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if mem.regions().iter().any(|r| r.start().0 == s) {
                Ok(GuestPhysAddr(s))
            } else {
                Err(Error::invalid(format!(
                    "options->exclude_starts[{i}] = {s:#x} is not the start of a region \
                     of this memory"
                )))
            }
        })
        .collect()
}

/// Unregisters VM `vm_id`: its merged pages get frames of their own again
/// (with their current bytes) and the host lets go of its memory (unmapped
/// now if its handle was freed). Pages of other VMs that shared frames with
/// it stay merged.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNKNOWN_VM`, `PF_ERR_USERFAULT`,
/// `PF_ERR_OS`, `PF_ERR_BUSY` (a page stayed held by another call, such as
/// a `pf_dedup_resolve_write_fault`, for 2 s); after any of them the VM
/// stays registered.
///
/// # Safety
///
/// `dedup` is NULL or a live `pf_dedup` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_unregister(dedup: *const pf_dedup, vm_id: u64) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        host.unregister(VmId(vm_id))?;
        Ok(())
    }
}

/// Visits every page of every registered VM now (in batches; a pass the
/// mapping budget cut short runs again, up to three), merging what it can:
/// identical pages (within a domain) onto one shared frame, zero pages onto
/// nothing. For moments the VMM knows memory is quiet, e.g. right after
/// restoring VMs from one snapshot; pages need not hold still across scans
/// as with `pf_dedup_scan_step` (bytes are compared under write protection
/// before every merge either way). What it did goes to `*out_report` unless
/// that is NULL (set `out_report->struct_size` first).
///
/// Errors: `PF_ERR_NULL_POINTER` (`dedup`), `PF_ERR_STRUCT_TOO_SMALL`
/// (`out_report`), `PF_ERR_USERFAULT`, `PF_ERR_OS`, `PF_ERR_MAP_LIMIT` (the
/// kernel refused a remap: the process's mappings are used up).
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `out_report` is NULL or points to a `pf_scan_report` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_merge_now(
    dedup: *const pf_dedup,
    out_report: *mut pf_scan_report,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        // SAFETY: `out_report` is NULL or `struct_size` bytes we may read
        // and write (contract).
        let out = unsafe { optional_sized_out(out_report, "out_report") }?;
        let report = host.merge_now()?;
        if let Some(out) = out {
            out.write(report.into());
        }
        Ok(())
    }
}

/// One incremental scan step, for a background thread: visits pages from
/// where the last step stopped, merging those whose content did not change
/// since their previous visit (KSM's rule: a page is merged on its second
/// stable visit at the earliest). Exactly one budget must be nonzero: at most
/// `max_pages` pages, or no new batch after `max_micros` microseconds (at
/// least one batch is done). What it did goes to `*out_report` unless that
/// is NULL (set `out_report->struct_size` first).
///
/// Errors: `PF_ERR_NULL_POINTER` (`dedup`), `PF_ERR_INVALID_ARGUMENT` (both
/// budgets or neither nonzero), `PF_ERR_STRUCT_TOO_SMALL` (`out_report`),
/// `PF_ERR_USERFAULT`, `PF_ERR_OS`.
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `out_report` is NULL or points to a `pf_scan_report` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_scan_step(
    dedup: *const pf_dedup,
    max_pages: u64,
    max_micros: u64,
    out_report: *mut pf_scan_report,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        let budget = budget(max_pages, max_micros)?;
        // SAFETY: `out_report` is NULL or `struct_size` bytes we may read
        // and write (contract).
        let out = unsafe { optional_sized_out(out_report, "out_report") }?;
        let report = host.scan_step(budget)?;
        if let Some(out) = out {
            out.write(report.into());
        }
        Ok(())
    }
}

/// The scan budget from the two C arguments, exactly one nonzero.
fn budget(max_pages: u64, max_micros: u64) -> Result<ScanBudget, Error> {
    match (max_pages, max_micros) {
        (0, 0) => Err(Error::invalid(
            "no budget: set max_pages or max_micros (exactly one) to nonzero",
        )),
        (pages, 0) => Ok(ScanBudget::Pages(pages)),
        (0, micros) => Ok(ScanBudget::Time(Duration::from_micros(micros))),
        (pages, micros) => Err(Error::invalid(format!(
            "two budgets (max_pages {pages}, max_micros {micros}): set exactly one to nonzero"
        ))),
    }
}

/// Starts a background scanner thread, as the kernel's `ksmd`: every
/// `interval_micros` microseconds it runs one `pf_dedup_scan_step` with the
/// budget given (exactly one of `max_pages`, `max_micros` nonzero), until
/// `pf_dedup_stop_background` or `pf_dedup_free`. Replaces a scanner
/// already running. A failed step is counted in
/// `pf_host_stats.background_errors`.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_INVALID_ARGUMENT` (budgets),
/// `PF_ERR_OS` (no thread).
///
/// # Safety
///
/// `dedup` is NULL or a live `pf_dedup` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_start_background(
    dedup: *const pf_dedup,
    max_pages: u64,
    max_micros: u64,
    interval_micros: u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        let budget = budget(max_pages, max_micros)?;
        host.start_background(budget, Duration::from_micros(interval_micros))?;
        Ok(())
    }
}

/// `pf_dedup_start_background` with each step's parallel work (hashing,
/// sorting, comparing) on a thread pool of the scanner's own of `threads`
/// threads (1: the whole scanner on one core, as `ksmd`), so a scanner
/// running flat out takes at most that many cores from the vCPUs.
/// (`pf_dedup_start_background` uses every core, as `pf_dedup_merge_now`
/// does.) ABI 0.7.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_INVALID_ARGUMENT` (budgets,
/// `threads` 0), `PF_ERR_OS` (no thread).
///
/// # Safety
///
/// `dedup` is NULL or a live `pf_dedup` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_start_background_on(
    dedup: *const pf_dedup,
    max_pages: u64,
    max_micros: u64,
    interval_micros: u64,
    threads: u32,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        let budget = budget(max_pages, max_micros)?;
        let threads = usize::try_from(threads)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .ok_or_else(|| Error::invalid("threads must be at least 1"))?;
        host.start_background_on(budget, Duration::from_micros(interval_micros), threads)?;
        Ok(())
    }
}

/// Stops the background scanner after its current batch (4096 pages at
/// most); does nothing if none runs.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// `dedup` is NULL or a live `pf_dedup` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_stop_background(dedup: *const pf_dedup) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        host.stop_background();
        Ok(())
    }
}

/// Unmerges every page of every VM (KSM's `run = 2`): each merged or
/// released page gets a frame of its own again, with its current bytes.
/// `*out_pages` receives the number of pages brought back. Registrations
/// stay; a later merge or scan merges again.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_USERFAULT`, `PF_ERR_OS`,
/// `PF_ERR_MAP_LIMIT` (the kernel refused a remap; pages stay merged).
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `out_pages` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_unmerge_all(
    dedup: *const pf_dedup,
    out_pages: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        // SAFETY: `out_pages` is NULL or writable (contract).
        let out = unsafe { args::out(out_pages, "out_pages") }?;
        out.write(host.unmerge_all()?);
        Ok(())
    }
}

/// Gives the page holding guest-physical `gpa` of VM `vm_id` a frame of its
/// own now, with its current bytes: for a VMM that met a write fault on a
/// merged page itself (an exit it cannot retry through the kernel's
/// copy-on-write). `*out_was_merged` receives 1 if the page was merged (or
/// released as zero) and is its own now, 0 if it was its own already.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNKNOWN_VM`, `PF_ERR_UNMAPPED`
/// (`gpa` is in no region of the VM), `PF_ERR_BUSY` (another operation held
/// the page for seconds; try again), `PF_ERR_USERFAULT`, `PF_ERR_OS`,
/// `PF_ERR_MAP_LIMIT` (the kernel refused the remap; the page stays
/// merged).
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `out_was_merged` is NULL or valid for a write of one `int`.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_resolve_write_fault(
    dedup: *const pf_dedup,
    vm_id: u64,
    gpa: u64,
    out_was_merged: *mut c_int,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        // SAFETY: `out_was_merged` is NULL or writable (contract).
        let out = unsafe { args::out(out_was_merged, "out_was_merged") }?;
        let was_merged = host.resolve_write_fault(VmId(vm_id), GuestPhysAddr(gpa))?;
        out.write(c_int::from(was_merged));
        Ok(())
    }
}

/// Host-wide statistics into `*out_stats` (set `out_stats->struct_size`
/// first). Copies the kernel made on writes to merged pages since the last
/// scan are counted first, so the figures are current.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`, `PF_ERR_OS`.
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `out_stats` is NULL or points to a `pf_host_stats` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_stats(
    dedup: *const pf_dedup,
    out_stats: *mut pf_host_stats,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read and
        // write (contract).
        let out = unsafe { args::sized_out(out_stats, "out_stats") }?;
        out.write(host.stats()?.into());
        Ok(())
    }
}

/// Statistics of VM `vm_id` into `*out_stats` (set `out_stats->struct_size`
/// first), current like `pf_dedup_stats`.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`,
/// `PF_ERR_UNKNOWN_VM`, `PF_ERR_OS`.
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `out_stats` is NULL or points to a `pf_vm_stats` whose `struct_size`
///   bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_vm_stats(
    dedup: *const pf_dedup,
    vm_id: u64,
    out_stats: *mut pf_vm_stats,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read and
        // write (contract).
        let out = unsafe { args::sized_out(out_stats, "out_stats") }?;
        let s = host.vm_stats(VmId(vm_id))?;
        out.write(pf_vm_stats {
            struct_size: size_of::<pf_vm_stats>(),
            pages: s.pages,
            pages_merged: s.pages_merged,
            zero_pages: s.zero_pages,
            cow_breaks: s.cow_breaks,
        });
        Ok(())
    }
}

/// What the kernel says about memory right now into `*out_view` (set
/// `out_view->struct_size` first): the store's allocated bytes, this
/// process's RSS, PSS and anonymous memory, and its mappings.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`, `PF_ERR_OS`.
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `out_view` is NULL or points to a `pf_kernel_view` whose `struct_size`
///   bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_dedup_kernel_view(
    dedup: *const pf_dedup,
    out_view: *mut pf_kernel_view,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { host(dedup) }?;
        // SAFETY: `out_view` is NULL or `struct_size` bytes we may read and
        // write (contract).
        let out = unsafe { args::sized_out(out_view, "out_view") }?;
        out.write(host.kernel_view()?.into());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_headroom_is_the_core_default() {
        assert_eq!(
            PF_DEDUP_DEFAULT_MAP_HEADROOM,
            DedupOptions::default().map_headroom
        );
    }
}
