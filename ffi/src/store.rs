//! Frame stores: `pf_frame_store`, and guest memory made in one.
//!
//! A handle is a boxed `Arc<FrameStore>`. Every guest memory made in the
//! store and every dedup host on it holds the `Arc` too, so the handle may be
//! freed whenever the caller no longer needs to make memory in the store.

// The types carry their C names, so the header and the Rust agree.
#![allow(non_camel_case_types)]

use std::sync::Arc;

use pagefold::{FrameStore, GuestMemory};

use crate::{
    args,
    memory::{pf_guest_memory, pf_memory_options, pf_region, read_layout, store_options},
    status::{pf_status, Error},
};

/// A pool of host frames in one memfd that guest memories are made in.
/// Dedup shares frames only within one store: make every VM that should be
/// deduplicated together in the same store (`pf_guest_memory_new_in_store`)
/// and give the store to `pf_dedup_new`. Made by `pf_frame_store_new`,
/// released by `pf_frame_store_free`; the memories made in it and dedup
/// hosts on it keep it alive after that. Thread-safe.
pub struct pf_frame_store {
    pub(crate) store: Arc<FrameStore>,
}

/// How `pf_frame_store_new` builds a frame store: the backing, the mapping
/// flags and the memfd's name. The same struct as `pf_memory_options` (which
/// `pf_guest_memory_new` uses to build the store of its own), under the name
/// that says what it configures.
pub type pf_store_options = pf_memory_options;

/// Borrows the frame store behind `store`.
///
/// # Safety
///
/// `store` is NULL or a live handle that is not freed during `'a`.
pub(crate) unsafe fn frame_store<'a>(
    store: *const pf_frame_store,
) -> Result<&'a Arc<FrameStore>, Error> {
    // SAFETY: forwarded from this function's contract.
    Ok(&unsafe { args::handle(store, "store") }?.store)
}

/// Creates an empty frame store built as `options` says (NULL means the
/// defaults: a shmem memfd with 4 KiB pages named "pagefold") and stores the
/// handle in `*out_store`. It takes no host memory until memory made in it
/// is written.
///
/// Errors: `PF_ERR_NULL_POINTER` (`out_store`), `PF_ERR_STRUCT_TOO_SMALL`
/// (`options`), `PF_ERR_INVALID_ARGUMENT` (unknown backing or flag),
/// `PF_ERR_NO_HUGE_PAGES`, `PF_ERR_OS`.
///
/// # Safety
///
/// - `options` is NULL or points to a `pf_store_options` whose
///   `struct_size` bytes are readable, and whose `name` is NULL or a
///   NUL-terminated string.
/// - `out_store` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_frame_store_new(
    options: *const pf_store_options,
    out_store: *mut *mut pf_frame_store,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `out_store` is NULL or writable for a pointer (contract).
        let out_store = unsafe { args::out(out_store, "out_store") }?;
        let options = if options.is_null() {
            pf_store_options::default()
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable (contract).
            unsafe { args::read_sized(options, "options") }?
        };
        // SAFETY: `name` is NULL or a C string (contract).
        let options = unsafe { store_options(&options) }?;
        let store = Arc::new(FrameStore::new(options)?);
        out_store.write(Box::into_raw(Box::new(pf_frame_store { store })));
        Ok(())
    }
}

/// Releases the handle. The store itself lives on while guest memory made
/// in it or a dedup host on it does; its memfd is closed when the last of
/// them goes. NULL is allowed and does nothing.
///
/// # Safety
///
/// `store` is NULL or a handle from `pf_frame_store_new` that has not been
/// freed, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_frame_store_free(store: *mut pf_frame_store) {
    ffi_boundary! { returns ();
        if !store.is_null() {
            // SAFETY: `store` came from `Box::into_raw` in `pf_frame_store_new`,
            // was not freed, and nothing uses it during or after this call
            // (contract), so it owns a live box.
            drop(unsafe { Box::from_raw(store) });
        }
    }
}

/// Stores in `*out_bytes` how many bytes of memory the kernel really holds
/// for the store's memfd right now (its allocated blocks, from `fstat`): the
/// written pages of every guest memory in the store plus the shared frames
/// of deduplicated pages; never-written, discarded and merged-away pages do
/// not count. This is the figure deduplication lowers.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_OS`.
///
/// # Safety
///
/// - `store` is NULL or a live `pf_frame_store` handle.
/// - `out_bytes` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_frame_store_allocated_bytes(
    store: *const pf_frame_store,
    out_bytes: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `store` is NULL or a live handle (contract).
        let store = unsafe { frame_store(store) }?;
        // SAFETY: `out_bytes` is NULL or writable (contract).
        let out = unsafe { args::out(out_bytes, "out_bytes") }?;
        out.write(store.allocated_bytes()?);
        Ok(())
    }
}

/// Creates guest memory with the `region_count` regions at `regions` in the
/// frame store `store`, and stores the handle in `*out_mem`: like
/// `pf_guest_memory_new`, but on the given store (with its backing and
/// flags) rather than a new one. Memories in one store can be deduplicated
/// together (`pf_dedup_register`). The memory holds the store: freeing the
/// store's handle first is fine.
///
/// Errors: `PF_ERR_NULL_POINTER` (`store`, `out_mem`, or `regions` while
/// `region_count > 0`), `PF_ERR_INVALID_ARGUMENT` (absurd `region_count`),
/// `PF_ERR_LAYOUT` (no regions, a zero-sized, misaligned, wrapping or
/// overlapping region), `PF_ERR_NO_HUGE_PAGES`, `PF_ERR_OVERFLOW`,
/// `PF_ERR_OS`.
///
/// # Safety
///
/// - `store` is NULL or a live `pf_frame_store` handle.
/// - `regions` is NULL or valid for reads of `region_count` `pf_region`s.
/// - `out_mem` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_guest_memory_new_in_store(
    store: *const pf_frame_store,
    regions: *const pf_region,
    region_count: usize,
    out_mem: *mut *mut pf_guest_memory,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `store` is NULL or a live handle (contract).
        let store = unsafe { frame_store(store) }?;
        // SAFETY: `out_mem` is NULL or writable for a pointer (contract).
        let out_mem = unsafe { args::out(out_mem, "out_mem") }?;
        // SAFETY: `regions` is NULL or holds `region_count` elements (contract).
        let layout = unsafe { read_layout(regions, region_count) }?;
        let mem = Arc::new(GuestMemory::with_store(Arc::clone(store), &layout)?);
        out_mem.write(Box::into_raw(Box::new(pf_guest_memory { mem })));
        Ok(())
    }
}
