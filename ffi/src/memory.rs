//! Guest memory: `pf_guest_memory` and its exports.
//!
//! A handle is a boxed `Arc<GuestMemory>`, on a frame store of its own
//! (`pf_guest_memory_new`) or on a shared one (`pf_guest_memory_new_in_store`
//! in `store.rs`). The `Arc` lets a dedup host hold the memory too, so the
//! C handle and the host release it independently. `GuestMemory` is
//! `Send + Sync`, so every export but `pf_guest_memory_free` may be called
//! on one handle from any number of threads at once.

// The types carry their C names, so the header and the Rust agree.
#![allow(non_camel_case_types)]

use std::{
    ffi::{c_char, c_int, c_void, CStr},
    mem::size_of,
    sync::{atomic::Ordering, Arc},
};

use pagefold::{
    memory::AtomicInt, Backing, FrameStore, GuestMemory, GuestPhysAddr, PageSize, StoreOptions,
};

use crate::{
    args::{self, SizePrefixed},
    status::{pf_status, Error},
};

/// Guest-physical memory of one VM: regions backed by a memfd, each mapped
/// once into this process. Made by `pf_guest_memory_new` (on a frame store of
/// its own) or `pf_guest_memory_new_in_store` (on a shared `pf_frame_store`),
/// released by `pf_guest_memory_free`. Thread-safe: every call but
/// `pf_guest_memory_free` may run on one handle from several threads at once.
pub struct pf_guest_memory {
    /// Shared with a dedup host the memory is registered with, which keeps
    /// it alive after `pf_guest_memory_free` until it lets go.
    pub(crate) mem: Arc<GuestMemory>,
}

/// One region of a guest-physical memory layout: `size` bytes starting at
/// guest-physical address `guest_start`. Both must be multiples of the
/// backing's page size (4 KiB, or the huge page size for hugetlb).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pf_region {
    /// First guest-physical address.
    pub guest_start: u64,
    /// Size in bytes; not zero.
    pub size: u64,
}

/// What backs guest memory: the values of `pf_memory_options.backing`.
///
/// Hugetlb memory reserves its huge pages when it is created: if the pool
/// (`free_hugepages` in /sys/kernel/mm/hugepages/hugepages-SIZEkB) cannot
/// back it, creation fails with `PF_ERR_NO_HUGE_PAGES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum pf_backing {
    /// A shmem memfd with 4 KiB pages (the default).
    PF_BACKING_MEMFD = 0,
    /// A hugetlbfs memfd with 2 MiB pages; regions must be 2 MiB aligned.
    PF_BACKING_HUGETLB_2M = 1,
    /// A hugetlbfs memfd with 1 GiB pages; regions must be 1 GiB aligned.
    PF_BACKING_HUGETLB_1G = 2,
}

/// `pf_memory_options.flags`: advise transparent huge pages
/// (`MADV_HUGEPAGE`) on the mappings; effective only where
/// /sys/kernel/mm/transparent_hugepage/shmem_enabled allows it.
pub const PF_MEMORY_TRANSPARENT_HUGE_PAGES: u32 = 1 << 0;
/// `pf_memory_options.flags`: populate the mappings up front
/// (`MAP_POPULATE`) instead of on first touch.
pub const PF_MEMORY_POPULATE: u32 = 1 << 1;
const PF_MEMORY_KNOWN_FLAGS: u32 = PF_MEMORY_TRANSPARENT_HUGE_PAGES | PF_MEMORY_POPULATE;

/// How `pf_guest_memory_new` builds memory, and how `pf_frame_store_new`
/// builds a frame store (as `pf_store_options`, the same struct): what backs
/// the frames and how they are mapped. Size-prefixed: set `struct_size`
/// to `sizeof(pf_memory_options)`. All-zero fields mean the defaults, so
/// `pf_memory_options o = { .struct_size = sizeof o };` is a valid start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_memory_options {
    /// `sizeof(pf_memory_options)` as the caller was compiled with.
    pub struct_size: usize,
    /// One of `pf_backing` (0, `PF_BACKING_MEMFD`, by default).
    pub backing: u32,
    /// A mix of `PF_MEMORY_TRANSPARENT_HUGE_PAGES` and `PF_MEMORY_POPULATE`;
    /// other bits are refused with `PF_ERR_INVALID_ARGUMENT`.
    pub flags: u32,
    /// Name of the memfd as shown in /proc/PID/maps, NUL-terminated; NULL
    /// means "pagefold". Only read during the call.
    pub name: *const c_char,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, and integers and a raw
// pointer only, which are valid for every bit pattern.
unsafe impl SizePrefixed for pf_memory_options {
    const NAME: &'static str = "pf_memory_options";
}

impl Default for pf_memory_options {
    fn default() -> Self {
        pf_memory_options {
            struct_size: size_of::<Self>(),
            backing: pf_backing::PF_BACKING_MEMFD as u32,
            flags: 0,
            name: std::ptr::null(),
        }
    }
}

/// What KVM (`kvm_userspace_memory_region`: guest_start, size, host_addr)
/// and a vhost-user backend (its memory table also takes fd and
/// file_offset) need to map one region themselves. Size-prefixed: set
/// `struct_size` to `sizeof(pf_region_info)` before the call; the call sets
/// it to the number of bytes it filled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct pf_region_info {
    /// In: `sizeof(pf_region_info)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// First guest-physical address.
    pub guest_start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where the region is mapped in this process.
    pub host_addr: u64,
    /// Offset of the region's first byte in `fd`.
    pub file_offset: u64,
    /// The memfd holding the region: the frame store's, shared by every
    /// guest memory in that store. Owned by the store: valid while the
    /// memory or anything else holding the store (a `pf_frame_store`
    /// handle, a `pf_dedup`) lives; do not close it (dup it to keep it).
    pub fd: c_int,
    /// Zero; reserved.
    pub reserved: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_region_info {
    const NAME: &'static str = "pf_region_info";
}

/// Pages of guest memory by how they are backed, in 4 KiB pages.
/// Size-prefixed like `pf_region_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_page_census {
    /// In: `sizeof(pf_page_census)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Pages with a frame of their own.
    pub private_pages: u64,
    /// Pages released because they were zero (or discarded).
    pub zero_pages: u64,
    /// Pages mapped onto a frame shared with other pages.
    pub shared_pages: u64,
    /// Pages given up through the balloon.
    pub ballooned_pages: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_page_census {
    const NAME: &'static str = "pf_page_census";
}

/// Turns C options into the core's.
///
/// # Safety
///
/// `o.name` is NULL or a NUL-terminated string readable during the call.
pub(crate) unsafe fn store_options(o: &pf_memory_options) -> Result<StoreOptions, Error> {
    let backing = match o.backing {
        b if b == pf_backing::PF_BACKING_MEMFD as u32 => Backing::Memfd,
        b if b == pf_backing::PF_BACKING_HUGETLB_2M as u32 => Backing::Hugetlb(PageSize::Size2M),
        b if b == pf_backing::PF_BACKING_HUGETLB_1G as u32 => Backing::Hugetlb(PageSize::Size1G),
        b => return Err(Error::invalid(format!("unknown backing {b}"))),
    };
    let unknown = o.flags & !PF_MEMORY_KNOWN_FLAGS;
    if unknown != 0 {
        return Err(Error::invalid(format!("unknown flags {unknown:#x}")));
    }
    let name = if o.name.is_null() {
        StoreOptions::default().name
    } else {
        // SAFETY: not NULL (checked); the caller guarantees a readable
        // NUL-terminated string that lives for the call.
        unsafe { CStr::from_ptr(o.name) }
            .to_string_lossy()
            .into_owned()
    };
    Ok(StoreOptions {
        backing,
        transparent_huge_pages: o.flags & PF_MEMORY_TRANSPARENT_HUGE_PAGES != 0,
        populate: o.flags & PF_MEMORY_POPULATE != 0,
        name,
    })
}

// SAFETY: two integers, valid for every bit pattern.
unsafe impl args::Plain for pf_region {}

/// Copies the caller's region array.
///
/// # Safety
///
/// Unless `count` is 0, `p` is NULL or valid for reads of `count`
/// `pf_region`s (any alignment).
pub(crate) unsafe fn read_layout(
    p: *const pf_region,
    count: usize,
) -> Result<Vec<(GuestPhysAddr, u64)>, Error> {
    // The core reports the empty layout as PF_ERR_LAYOUT.
    // SAFETY: forwarded from this function's contract.
    let regions = unsafe { args::array(p, count, "regions", "region_count") }?;
    Ok(regions
        .into_iter()
        .map(|r| (GuestPhysAddr(r.guest_start), r.size))
        .collect())
}

/// Borrows the guest memory behind `mem`.
///
/// # Safety
///
/// `mem` is NULL or a live handle that is not freed during `'a`.
pub(crate) unsafe fn memory<'a>(
    mem: *const pf_guest_memory,
) -> Result<&'a Arc<GuestMemory>, Error> {
    // SAFETY: forwarded from this function's contract.
    Ok(&unsafe { args::handle(mem, "mem") }?.mem)
}

/// Creates guest memory with the `region_count` regions at `regions`, on a
/// new memfd built as `options` says (NULL means the defaults), and stores
/// the handle in `*out_mem`. Regions may be given in any order; they must not
/// overlap, and each must be aligned to the backing's page size. Memory reads
/// as zeros and takes no host memory until written.
///
/// Errors: `PF_ERR_NULL_POINTER` (`out_mem`, or `regions` while
/// `region_count > 0`), `PF_ERR_STRUCT_TOO_SMALL` (`options`),
/// `PF_ERR_INVALID_ARGUMENT` (unknown backing or flag, absurd
/// `region_count`), `PF_ERR_LAYOUT` (no regions, a zero-sized, misaligned,
/// wrapping or overlapping region), `PF_ERR_NO_HUGE_PAGES`, `PF_ERR_OVERFLOW`
/// (larger than the host can map), `PF_ERR_OS`.
///
/// # Safety
///
/// - `regions` is NULL or valid for reads of `region_count` `pf_region`s.
/// - `options` is NULL or points to a `pf_memory_options` whose
///   `struct_size` bytes are readable, and whose `name` is NULL or a
///   NUL-terminated string.
/// - `out_mem` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_new(
    regions: *const pf_region,
    region_count: usize,
    options: *const pf_memory_options,
    out_mem: *mut *mut pf_guest_memory,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `out_mem` is NULL or writable for a pointer (contract).
        let out_mem = unsafe { args::out(out_mem, "out_mem") }?;
        let options = if options.is_null() {
            pf_memory_options::default()
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable (contract).
            unsafe { args::read_sized(options, "options") }?
        };
        // SAFETY: `name` is NULL or a C string (contract).
        let store_options = unsafe { store_options(&options) }?;
        // SAFETY: `regions` is NULL or holds `region_count` elements (contract).
        let layout = unsafe { read_layout(regions, region_count) }?;
        let store = Arc::new(FrameStore::new(store_options)?);
        let mem = Arc::new(GuestMemory::with_store(store, &layout)?);
        out_mem.write(Box::into_raw(Box::new(pf_guest_memory { mem })));
        Ok(())
    }
}

/// Releases the handle. The memory is unmapped (host addresses dangle) once
/// nothing else holds it: a dedup host it is registered with keeps it,
/// mapped and deduplicated, until `pf_dedup_unregister` or `pf_dedup_free`.
/// Its frames go back to the store, and the store's memfd is closed once no
/// memory, `pf_frame_store` handle or dedup host holds the store (file
/// descriptors from `pf_guest_memory_region_info` are invalid from then on).
/// NULL is allowed and does nothing.
///
/// # Safety
///
/// `mem` is NULL or a `pf_guest_memory` handle that has not been freed, and
/// no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_free(mem: *mut pf_guest_memory) {
    ffi_boundary! { returns ();
        if !mem.is_null() {
            // SAFETY: `mem` came from `Box::into_raw` in a `pf_guest_memory_new*`
            // call, was not freed, and nothing uses it during or after this
            // call (contract), so it owns a live box.
            drop(unsafe { Box::from_raw(mem) });
        }
    }
}

/// Copies `len` bytes of guest memory at `gpa` into `buf`. The range may span
/// adjacent regions but no hole. Reads go through the host mapping, so a
/// discarded page reads as whatever was written to it since (zeros if
/// nothing), and reading one that holds no memory makes the kernel
/// allocate it.
///
/// Errors: `PF_ERR_NULL_POINTER` (`mem`, or `buf` while `len > 0`),
/// `PF_ERR_INVALID_ARGUMENT` (`len` > PTRDIFF_MAX), `PF_ERR_UNMAPPED`
/// (`gpa` or a later byte is in no region), `PF_ERR_OVERFLOW`
/// (`gpa + len` wraps).
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `buf` is NULL or valid for writes of `len` bytes, and not read or
///   written by anyone else during the call (in particular it is not guest
///   memory itself: copy through a separate buffer).
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_read(
    mem: *const pf_guest_memory,
    gpa: u64,
    buf: *mut c_void,
    len: usize,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `buf` is NULL or exclusively ours for `len` bytes (contract).
        let buf = unsafe { args::bytes_mut(buf, len, "buf") }?;
        mem.read(GuestPhysAddr(gpa), buf)?;
        Ok(())
    }
}

/// Copies `len` bytes from `data` into guest memory at `gpa`. The range may
/// span adjacent regions but no hole. The whole range is checked first: on
/// error nothing was written.
///
/// Errors: `PF_ERR_NULL_POINTER` (`mem`, or `data` while `len > 0`),
/// `PF_ERR_INVALID_ARGUMENT` (`len` > PTRDIFF_MAX), `PF_ERR_UNMAPPED`,
/// `PF_ERR_OVERFLOW`, `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `data` is NULL or valid for reads of `len` bytes that nobody writes
///   during the call (in particular it is not guest memory itself).
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_write(
    mem: *const pf_guest_memory,
    gpa: u64,
    data: *const c_void,
    len: usize,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `data` is NULL or `len` bytes nobody writes (contract).
        let data = unsafe { args::bytes(data, len, "data") }?;
        mem.write(GuestPhysAddr(gpa), data)?;
        Ok(())
    }
}

/// Stores the number of regions in `*out_count`.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_count` is NULL or valid for a write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_region_count(
    mem: *const pf_guest_memory,
    out_count: *mut usize,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_count` is NULL or writable (contract).
        let out = unsafe { args::out(out_count, "out_count") }?;
        out.write(mem.regions().len());
        Ok(())
    }
}

/// Describes region `index` (regions are numbered in order of guest-physical
/// address, from 0) in `*out_info`, for registering it with KVM or sending it
/// to a vhost-user backend. Set `out_info->struct_size` first.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`,
/// `PF_ERR_OUT_OF_RANGE` (`index` not below the region count).
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_info` is NULL or points to a `pf_region_info` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_region_info(
    mem: *const pf_guest_memory,
    index: usize,
    out_info: *mut pf_region_info,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_info` is NULL or `struct_size` bytes we may read and
        // write (contract).
        let out = unsafe { args::sized_out(out_info, "out_info") }?;
        let regions = mem.regions();
        let region = regions.get(index).ok_or_else(|| {
            Error::new(
                pf_status::PF_ERR_OUT_OF_RANGE,
                format!("region index {index} is not below the region count {}", regions.len()),
            )
        })?;
        let info = region.info();
        out.write(pf_region_info {
            struct_size: size_of::<pf_region_info>(),
            guest_start: info.guest_start.0,
            size: info.size,
            host_addr: info.host_addr.0,
            file_offset: info.file_offset,
            fd: info.fd,
            reserved: 0,
        });
        Ok(())
    }
}

/// Stores the host (this process's) address of guest-physical `gpa` in
/// `*out_host_addr`. The address stays valid until `pf_guest_memory_free`;
/// it is the same mapping `pf_guest_memory_region_info` reports.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_host_addr` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_host_address(
    mem: *const pf_guest_memory,
    gpa: u64,
    out_host_addr: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_host_addr` is NULL or writable (contract).
        let out = unsafe { args::out(out_host_addr, "out_host_addr") }?;
        out.write(mem.host_address(GuestPhysAddr(gpa))?.0);
        Ok(())
    }
}

/// Gives the host memory behind the whole pages of `[gpa, gpa + len)` back
/// to the kernel (punch hole). They read as zeros afterwards and the next
/// write allocates again. `gpa` and `len` must be multiples of the backing's
/// page size. `*out_released_pages` receives the number of 4 KiB pages that
/// held memory before. Writes racing with a discard of the same page may be
/// lost, as with `MADV_DONTNEED`.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_MISALIGNED`, `PF_ERR_UNMAPPED`,
/// `PF_ERR_OVERFLOW`, `PF_ERR_OS`, `PF_ERR_MAP_LIMIT` (the kernel refused
/// to map a merged page's own frame back).
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_released_pages` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_discard(
    mem: *const pf_guest_memory,
    gpa: u64,
    len: u64,
    out_released_pages: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_released_pages` is NULL or writable (contract).
        let out = unsafe { args::out(out_released_pages, "out_released_pages") }?;
        out.write(mem.discard(GuestPhysAddr(gpa), len)?);
        Ok(())
    }
}

/// Counts the pages of guest memory by how they are backed into
/// `*out_census`. Set `out_census->struct_size` first. The counts are a
/// snapshot: other threads may change pages while they are counted.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_census` is NULL or points to a `pf_page_census` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_census(
    mem: *const pf_guest_memory,
    out_census: *mut pf_page_census,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_census` is NULL or `struct_size` bytes we may read and
        // write (contract).
        let out = unsafe { args::sized_out(out_census, "out_census") }?;
        let c = mem.census();
        out.write(pf_page_census {
            struct_size: size_of::<pf_page_census>(),
            private_pages: c.private,
            zero_pages: c.zero,
            shared_pages: c.shared,
            ballooned_pages: c.ballooned,
        });
        Ok(())
    }
}

/// Stores the sum of the region sizes, in bytes, in `*out_size`.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_size` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_total_size(
    mem: *const pf_guest_memory,
    out_size: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_size` is NULL or writable (contract).
        let out = unsafe { args::out(out_size, "out_size") }?;
        out.write(mem.total_size());
        Ok(())
    }
}

/// Stores in `*out_bytes` how many bytes of memory the kernel really holds
/// for this guest memory's memfd right now (its allocated blocks, from
/// `fstat`): written pages count, never-written and discarded ones do not.
/// The memfd is the frame store's: for memory made by
/// `pf_guest_memory_new_in_store` this is the whole store, every guest
/// memory in it and its shared (deduplicated) frames, the same figure as
/// `pf_frame_store_allocated_bytes`.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_OS`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_bytes` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_allocated_bytes(
    mem: *const pf_guest_memory,
    out_bytes: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_bytes` is NULL or writable (contract).
        let out = unsafe { args::out(out_bytes, "out_bytes") }?;
        out.write(mem.frame_store().allocated_bytes()?);
        Ok(())
    }
}

/// Body of the `pf_guest_memory_load_*` exports.
///
/// # Safety
///
/// `mem` is NULL or a live handle; `out_value` is NULL or valid for a write
/// of one `T`.
unsafe fn atomic_load<T: AtomicInt>(
    mem: *const pf_guest_memory,
    gpa: u64,
    out_value: *mut T,
) -> Result<(), Error> {
    // SAFETY: forwarded from this function's contract.
    let mem = unsafe { memory(mem) }?;
    // SAFETY: forwarded from this function's contract.
    let out = unsafe { args::out(out_value, "out_value") }?;
    out.write(mem.load::<T>(GuestPhysAddr(gpa), Ordering::SeqCst)?);
    Ok(())
}

/// Body of the `pf_guest_memory_store_*` exports.
///
/// # Safety
///
/// `mem` is NULL or a live handle.
unsafe fn atomic_store<T: AtomicInt>(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: T,
) -> Result<(), Error> {
    // SAFETY: forwarded from this function's contract.
    let mem = unsafe { memory(mem) }?;
    mem.store(GuestPhysAddr(gpa), value, Ordering::SeqCst)?;
    Ok(())
}

/// Body of the `pf_guest_memory_swap_*` exports.
///
/// # Safety
///
/// `mem` is NULL or a live handle; `out_previous` is NULL or valid for a
/// write of one `T`.
unsafe fn atomic_swap<T: AtomicInt>(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: T,
    out_previous: *mut T,
) -> Result<(), Error> {
    // SAFETY: forwarded from this function's contract.
    let mem = unsafe { memory(mem) }?;
    // SAFETY: forwarded from this function's contract.
    let out = unsafe { args::out(out_previous, "out_previous") }?;
    out.write(mem.swap(GuestPhysAddr(gpa), value, Ordering::SeqCst)?);
    Ok(())
}

/// Body of the `pf_guest_memory_compare_exchange_*` exports.
///
/// # Safety
///
/// `mem` is NULL or a live handle; `out_previous` is NULL or valid for a
/// write of one `T`.
unsafe fn atomic_compare_exchange<T: AtomicInt>(
    mem: *const pf_guest_memory,
    gpa: u64,
    expected: T,
    desired: T,
    out_previous: *mut T,
) -> Result<(), Error> {
    // SAFETY: forwarded from this function's contract.
    let mem = unsafe { memory(mem) }?;
    // SAFETY: forwarded from this function's contract.
    let out = unsafe { args::out(out_previous, "out_previous") }?;
    let found = mem.compare_exchange(
        GuestPhysAddr(gpa),
        expected,
        desired,
        Ordering::SeqCst,
        Ordering::SeqCst,
    )?;
    out.write(match found {
        Ok(v) | Err(v) => v,
    });
    Ok(())
}

// The atomic exports, one per operation and width, written out because
// cbindgen reads the source and does not expand macros.

/// Atomically loads the `uint8_t` at guest-physical `gpa` (sequentially
/// consistent) into `*out_value`.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_value` is NULL or valid for a write of one `uint8_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_load_u8(
    mem: *const pf_guest_memory,
    gpa: u64,
    out_value: *mut u8,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_load` demands exactly this function's contract.
        unsafe { atomic_load(mem, gpa, out_value) }
    }
}
/// Atomically stores `value` as the `uint8_t` at guest-physical `gpa`
/// (sequentially consistent).
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_store_u8(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: u8,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_store` demands exactly this function's contract.
        unsafe { atomic_store(mem, gpa, value) }
    }
}
/// Atomically replaces the `uint8_t` at guest-physical `gpa` with `value`
/// (sequentially consistent) and stores the value it had in `*out_previous`.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_previous` is NULL or valid for a write of one `uint8_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_swap_u8(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: u8,
    out_previous: *mut u8,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_swap` demands exactly this function's contract.
        unsafe { atomic_swap(mem, gpa, value, out_previous) }
    }
}
/// Atomically compares the `uint8_t` at guest-physical `gpa` with `expected`
/// and, if they are equal, replaces it with `desired` (sequentially consistent,
/// also when they differ). `*out_previous` receives the value found: the
/// exchange happened exactly when `*out_previous == expected`. Returns `PF_OK`
/// either way.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_previous` is NULL or valid for a write of one `uint8_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_compare_exchange_u8(
    mem: *const pf_guest_memory,
    gpa: u64,
    expected: u8,
    desired: u8,
    out_previous: *mut u8,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_compare_exchange` demands exactly this function's contract.
        unsafe { atomic_compare_exchange(mem, gpa, expected, desired, out_previous) }
    }
}
/// Atomically loads the `uint16_t` at guest-physical `gpa` (sequentially
/// consistent) into `*out_value`. `gpa` must be a multiple of 2.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_value` is NULL or valid for a write of one `uint16_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_load_u16(
    mem: *const pf_guest_memory,
    gpa: u64,
    out_value: *mut u16,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_load` demands exactly this function's contract.
        unsafe { atomic_load(mem, gpa, out_value) }
    }
}
/// Atomically stores `value` as the `uint16_t` at guest-physical `gpa`
/// (sequentially consistent). `gpa` must be a multiple of 2.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_store_u16(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: u16,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_store` demands exactly this function's contract.
        unsafe { atomic_store(mem, gpa, value) }
    }
}
/// Atomically replaces the `uint16_t` at guest-physical `gpa` with `value`
/// (sequentially consistent) and stores the value it had in `*out_previous`.
/// `gpa` must be a multiple of 2.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_previous` is NULL or valid for a write of one `uint16_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_swap_u16(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: u16,
    out_previous: *mut u16,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_swap` demands exactly this function's contract.
        unsafe { atomic_swap(mem, gpa, value, out_previous) }
    }
}
/// Atomically compares the `uint16_t` at guest-physical `gpa` with `expected`
/// and, if they are equal, replaces it with `desired` (sequentially consistent,
/// also when they differ). `*out_previous` receives the value found: the
/// exchange happened exactly when `*out_previous == expected`. Returns `PF_OK`
/// either way. `gpa` must be a multiple of 2.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_previous` is NULL or valid for a write of one `uint16_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_compare_exchange_u16(
    mem: *const pf_guest_memory,
    gpa: u64,
    expected: u16,
    desired: u16,
    out_previous: *mut u16,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_compare_exchange` demands exactly this function's contract.
        unsafe { atomic_compare_exchange(mem, gpa, expected, desired, out_previous) }
    }
}
/// Atomically loads the `uint32_t` at guest-physical `gpa` (sequentially
/// consistent) into `*out_value`. `gpa` must be a multiple of 4.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_value` is NULL or valid for a write of one `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_load_u32(
    mem: *const pf_guest_memory,
    gpa: u64,
    out_value: *mut u32,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_load` demands exactly this function's contract.
        unsafe { atomic_load(mem, gpa, out_value) }
    }
}
/// Atomically stores `value` as the `uint32_t` at guest-physical `gpa`
/// (sequentially consistent). `gpa` must be a multiple of 4.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_store_u32(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: u32,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_store` demands exactly this function's contract.
        unsafe { atomic_store(mem, gpa, value) }
    }
}
/// Atomically replaces the `uint32_t` at guest-physical `gpa` with `value`
/// (sequentially consistent) and stores the value it had in `*out_previous`.
/// `gpa` must be a multiple of 4.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_previous` is NULL or valid for a write of one `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_swap_u32(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: u32,
    out_previous: *mut u32,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_swap` demands exactly this function's contract.
        unsafe { atomic_swap(mem, gpa, value, out_previous) }
    }
}
/// Atomically compares the `uint32_t` at guest-physical `gpa` with `expected`
/// and, if they are equal, replaces it with `desired` (sequentially consistent,
/// also when they differ). `*out_previous` receives the value found: the
/// exchange happened exactly when `*out_previous == expected`. Returns `PF_OK`
/// either way. `gpa` must be a multiple of 4.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_previous` is NULL or valid for a write of one `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_compare_exchange_u32(
    mem: *const pf_guest_memory,
    gpa: u64,
    expected: u32,
    desired: u32,
    out_previous: *mut u32,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_compare_exchange` demands exactly this function's contract.
        unsafe { atomic_compare_exchange(mem, gpa, expected, desired, out_previous) }
    }
}
/// Atomically loads the `uint64_t` at guest-physical `gpa` (sequentially
/// consistent) into `*out_value`. `gpa` must be a multiple of 8.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_value` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_load_u64(
    mem: *const pf_guest_memory,
    gpa: u64,
    out_value: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_load` demands exactly this function's contract.
        unsafe { atomic_load(mem, gpa, out_value) }
    }
}
/// Atomically stores `value` as the `uint64_t` at guest-physical `gpa`
/// (sequentially consistent). `gpa` must be a multiple of 8.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_store_u64(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_store` demands exactly this function's contract.
        unsafe { atomic_store(mem, gpa, value) }
    }
}
/// Atomically replaces the `uint64_t` at guest-physical `gpa` with `value`
/// (sequentially consistent) and stores the value it had in `*out_previous`.
/// `gpa` must be a multiple of 8.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_previous` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_swap_u64(
    mem: *const pf_guest_memory,
    gpa: u64,
    value: u64,
    out_previous: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_swap` demands exactly this function's contract.
        unsafe { atomic_swap(mem, gpa, value, out_previous) }
    }
}
/// Atomically compares the `uint64_t` at guest-physical `gpa` with `expected`
/// and, if they are equal, replaces it with `desired` (sequentially consistent,
/// also when they differ). `*out_previous` receives the value found: the
/// exchange happened exactly when `*out_previous == expected`. Returns `PF_OK`
/// either way. `gpa` must be a multiple of 8.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_UNMAPPED`, `PF_ERR_MISALIGNED`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_previous` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_compare_exchange_u64(
    mem: *const pf_guest_memory,
    gpa: u64,
    expected: u64,
    desired: u64,
    out_previous: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `atomic_compare_exchange` demands exactly this function's contract.
        unsafe { atomic_compare_exchange(mem, gpa, expected, desired, out_previous) }
    }
}
