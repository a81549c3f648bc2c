//! The host service and its client: `pf_service`, `pf_service_client` and
//! their exports (issue 15).
//!
//! A `pf_service` is a boxed [`Service`]; a `pf_service_client` a boxed
//! [`ServiceClient`], which holds an `Arc` of the client's guest memory
//! (the same `Arc` as its `pf_guest_memory` handle, see `memory.rs`), so
//! the two C handles may be freed in either order. Status mapping of
//! [`ServiceError`] lives in `status.rs`; this file never decides a status
//! on its own beyond argument checks.

// The types carry their C names, so the header and the Rust agree.
#![allow(non_camel_case_types)]

use std::{
    ffi::{c_char, c_int, CStr, OsStr},
    mem::size_of,
    os::unix::ffi::OsStrExt,
    path::Path,
    sync::Arc,
    time::Duration,
};

use pagefold::{
    service::{ClientOptions, Service, ServiceClient, ServiceOptions, ServiceStats},
    ScanBudget,
};

use crate::{
    args::{self, SizePrefixed},
    dedup::pf_scan_report,
    memory::{memory, pf_guest_memory},
    status::{pf_status, Error},
};

/// The host service: folds the guest memory of the VMM processes that
/// attach to it over a Unix socket (`pf_service_client_attach`). Each merge
/// domain of each user is one dedup engine; processes of different users
/// never share a frame. Made by `pf_service_start`, released by
/// `pf_service_free`. Thread-safe: every call but `pf_service_free` may run
/// on one handle from several threads at once.
pub struct pf_service {
    service: Service,
}

/// A VMM process's guest memory under the host service: the connection and
/// the thread ("pagefold-remap") that applies the service's merges to this
/// process's mappings. Made by `pf_service_client_attach`, released by
/// `pf_service_client_detach` or `pf_service_client_free`. Thread-safe:
/// every call but those two may run on one handle from several threads at
/// once, and the guest memory stays fully usable by vCPU and device threads.
pub struct pf_service_client {
    client: ServiceClient,
}

// Every export but the releasing ones shares the handles between threads.
const _: fn() = || {
    fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<pf_service>();
    shared_between_threads::<pf_service_client>();
};

/// How `pf_service_start` runs the service. Size-prefixed: set
/// `struct_size` to `sizeof(pf_service_options)`. All-zero fields mean the
/// defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_service_options {
    /// `sizeof(pf_service_options)` as the caller was compiled with.
    pub struct_size: usize,
    /// Milliseconds a VMM process has to acknowledge a remap before the
    /// service rolls its window back (and gives up merging its pages).
    /// 0 means 500.
    pub ack_deadline_ms: u64,
    /// Most VMs (attached processes) at once; a process beyond it is
    /// refused. 0 means 4096.
    pub max_vms: u64,
    /// The largest guest memory, in bytes, one process may put under the
    /// service (the service keeps 12 bytes of state per 4 KiB page of it).
    /// 0 means 1 TiB.
    pub max_guest_bytes: u64,
    /// Background scanning: at most this many 4 KiB pages per scan step,
    /// one step every `background_interval_us` microseconds. 0 means no
    /// background scanning (the service merges only on
    /// `pf_service_merge_now`); then `background_interval_us` must be 0
    /// too.
    pub background_pages: u64,
    /// Microseconds between background scan steps; nonzero exactly when
    /// `background_pages` is.
    pub background_interval_us: u64,
    /// User ids allowed to attach besides the service's own (root always
    /// may). NULL when `allowed_uid_count` is 0; only read during the call.
    pub allowed_uids: *const u32,
    /// Number of user ids at `allowed_uids`.
    pub allowed_uid_count: usize,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers and a raw
// pointer only, which are valid for every bit pattern.
unsafe impl SizePrefixed for pf_service_options {
    const NAME: &'static str = "pf_service_options";
}

impl Default for pf_service_options {
    fn default() -> Self {
        pf_service_options {
            struct_size: size_of::<Self>(),
            ack_deadline_ms: 0,
            max_vms: 0,
            max_guest_bytes: 0,
            background_pages: 0,
            background_interval_us: 0,
            allowed_uids: std::ptr::null(),
            allowed_uid_count: 0,
        }
    }
}

/// How `pf_service_client_attach` joins the service. Size-prefixed: set
/// `struct_size` to `sizeof(pf_client_options)`. All-zero fields mean the
/// defaults (domain 0, tag 0).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_client_options {
    /// `sizeof(pf_client_options)` as the caller was compiled with.
    pub struct_size: usize,
    /// Merge domain among the domains of this process's user: only VMs of
    /// the same user and the same domain number share frames.
    pub domain: u64,
    /// A label the service keeps with the VM (logs, memfd names).
    pub vm_tag: u64,
    /// Nonzero: the VM's memory is (or will be) mapped by other processes
    /// too (vhost-user backends), so merged pages stay write-protected and
    /// a write breaks the sharing through the service into a frame every
    /// mapper maps (a round trip to the service on the first write to each
    /// merged page, instead of the kernel's private copy). Zero: the
    /// kernel's copy on write, seen by this process alone.
    pub break_on_write: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Regions the service leaves unmerged (device memory, regions shared
    /// by other means): bit `i` for the memory's region `i` in address
    /// order; no bit past the last region. Zero: all are merged.
    pub exclude_regions: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_client_options {
    const NAME: &'static str = "pf_client_options";
}

impl Default for pf_client_options {
    fn default() -> Self {
        pf_client_options {
            struct_size: size_of::<Self>(),
            domain: 0,
            vm_tag: 0,
            break_on_write: 0,
            reserved: 0,
            exclude_regions: 0,
        }
    }
}

/// What the service holds now, as the kernel counts it (filled in by
/// `pf_service_stats`; named apart from that function, as C needs).
/// Size-prefixed: set `struct_size` to `sizeof(pf_service_usage)` before
/// the call; the call sets it to the number of bytes it filled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_service_usage {
    /// In: `sizeof(pf_service_usage)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// VMM processes attached.
    pub vms: u64,
    /// Merge domains with at least one VM (or shared frames left).
    pub domains: u64,
    /// Bytes the kernel holds for the domains' shared frames.
    pub shared_bytes: u64,
    /// Bytes the kernel holds for the attached VMs' own memfds (falls as
    /// pages merge).
    pub guest_bytes: u64,
    /// Guest pages (4 KiB) mapping a shared frame or released as zero.
    pub pages_merged: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_service_usage {
    const NAME: &'static str = "pf_service_usage";
}

impl From<ServiceStats> for pf_service_usage {
    fn from(s: ServiceStats) -> Self {
        pf_service_usage {
            struct_size: size_of::<Self>(),
            vms: s.vms as u64,
            domains: s.domains as u64,
            shared_bytes: s.shared_bytes,
            guest_bytes: s.guest_bytes,
            pages_merged: s.pages_merged,
        }
    }
}

/// The socket path behind a C string (named `arg` in messages).
///
/// # Safety
///
/// `p` is NULL or a NUL-terminated string that lives during `'a`.
unsafe fn socket_path<'a>(p: *const c_char, arg: &str) -> Result<&'a Path, Error> {
    if p.is_null() {
        return Err(Error::null(arg));
    }
    // SAFETY: not NULL, NUL-terminated and alive during 'a (contract).
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(Error::invalid(format!("`{arg}` is an empty path")));
    }
    Ok(Path::new(OsStr::from_bytes(bytes)))
}

/// The Rust options from the C ones; zero fields take the defaults.
///
/// # Safety
///
/// `o.allowed_uids` is NULL or valid for reads of `o.allowed_uid_count`
/// `uint32_t`s during the call.
unsafe fn service_options(o: &pf_service_options) -> Result<ServiceOptions, Error> {
    let mut options = ServiceOptions::default();
    if o.ack_deadline_ms != 0 {
        options.ack_deadline = Duration::from_millis(o.ack_deadline_ms);
    }
    if o.max_vms != 0 {
        options.max_vms = usize::try_from(o.max_vms).map_err(|_| {
            Error::invalid(format!(
                "options->max_vms {} does not fit this host",
                o.max_vms
            ))
        })?;
    }
    if o.max_guest_bytes != 0 {
        options.max_guest_bytes = o.max_guest_bytes;
    }
    options.background = match (o.background_pages, o.background_interval_us) {
        (0, 0) => None,
        (pages, interval) if pages != 0 && interval != 0 => {
            Some((ScanBudget::Pages(pages), Duration::from_micros(interval)))
        }
        (pages, interval) => {
            return Err(Error::invalid(format!(
                "options->background_pages is {pages} and options->background_interval_us \
                 {interval}: set both to nonzero for background scanning, or both to 0"
            )))
        }
    };
    // SAFETY: `allowed_uids` holds `allowed_uid_count` elements (contract).
    options.allowed_uids = unsafe {
        args::array(
            o.allowed_uids,
            o.allowed_uid_count,
            "options->allowed_uids",
            "options->allowed_uid_count",
        )
    }?;
    Ok(options)
}

/// Borrows the service behind `service`.
///
/// # Safety
///
/// `service` is NULL or a live handle that is not freed during `'a`.
unsafe fn service<'a>(service: *const pf_service) -> Result<&'a Service, Error> {
    // SAFETY: forwarded from this function's contract.
    Ok(&unsafe { args::handle(service, "service") }?.service)
}

/// Borrows the client behind `client`.
///
/// # Safety
///
/// `client` is NULL or a live handle that is not freed during `'a`.
unsafe fn client<'a>(client: *const pf_service_client) -> Result<&'a ServiceClient, Error> {
    // SAFETY: forwarded from this function's contract.
    Ok(&unsafe { args::handle(client, "client") }?.client)
}

/// Starts the host service on a new Unix socket at `socket_path` (a
/// NUL-terminated path; whatever file is there already is removed), run as
/// `options` says (NULL means the defaults), and stores the handle in
/// `*out_service`. Starts one thread, "pagefold-service", that accepts
/// processes, and one per attached process. The calling process is made
/// non-dumpable first (`PR_SET_DUMPABLE` 0), so another process of the same
/// user cannot take its descriptors, which reach every VM's memory.
///
/// Errors: `PF_ERR_NULL_POINTER` (`socket_path`, `out_service`),
/// `PF_ERR_STRUCT_TOO_SMALL` (`options`), `PF_ERR_INVALID_ARGUMENT` (an
/// empty path, background fields of which only one is nonzero, an absurd
/// `allowed_uid_count`), `PF_ERR_OS` (prctl, bind: e.g. the directory does
/// not exist; no thread). ABI 0.10.
///
/// # Safety
///
/// - `socket_path` is NULL or a NUL-terminated string.
/// - `options` is NULL or points to a `pf_service_options` whose
///   `struct_size` bytes are readable, and whose `allowed_uids` is NULL or
///   valid for reads of `allowed_uid_count` `uint32_t`s.
/// - `out_service` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_service_start(
    socket_path: *const c_char,
    options: *const pf_service_options,
    out_service: *mut *mut pf_service,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `out_service` is NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_service, "out_service") }?;
        // SAFETY: `socket_path` is NULL or a C string alive during the call
        // (contract).
        let path = unsafe { self::socket_path(socket_path, "socket_path") }?;
        let options = if options.is_null() {
            pf_service_options::default()
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable (contract).
            unsafe { args::read_sized(options, "options") }?
        };
        // SAFETY: `allowed_uids` holds `allowed_uid_count` elements (contract).
        let options = unsafe { service_options(&options) }?;
        let service = Service::start(path, options)?;
        out.write(Box::into_raw(Box::new(pf_service { service })));
        Ok(())
    }
}

/// Stops the service's listening: no new process is accepted and the
/// socket file is removed. Processes already attached keep their
/// connections, served by their own threads, until they detach or close
/// (their merge domains live as long); only merging on request
/// (`pf_service_merge_now`) ends with the handle. NULL is allowed and does
/// nothing.
///
/// # Safety
///
/// `service` is NULL or a handle from `pf_service_start` that has not been
/// freed, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_service_free(service: *mut pf_service) {
    ffi_boundary! { returns ();
        if !service.is_null() {
            // SAFETY: `service` came from `Box::into_raw` in
            // `pf_service_start`, was not freed, and nothing uses it during
            // or after this call.
            drop(unsafe { Box::from_raw(service) });
        }
    }
}

/// Visits every page of every attached VM now and merges what it can,
/// domain by domain: identical pages onto one shared frame, zero pages onto
/// nothing. What it did goes to `*out_report` unless that is NULL (set
/// `out_report->struct_size` first); of its fields the service fills
/// `pages_scanned`, `merged_shared`, `merged_zero`, `changed`, `busy`,
/// `map_limit`, `remaps` and `pages_hashed`, summed over the domains, and
/// leaves the others 0.
///
/// Errors: `PF_ERR_NULL_POINTER` (`service`), `PF_ERR_STRUCT_TOO_SMALL`
/// (`out_report`), `PF_ERR_USERFAULT`, `PF_ERR_OS`, `PF_ERR_MAP_LIMIT`.
/// ABI 0.10.
///
/// # Safety
///
/// - `service` is NULL or a live `pf_service` handle.
/// - `out_report` is NULL or points to a `pf_scan_report` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_service_merge_now(
    service: *const pf_service,
    out_report: *mut pf_scan_report,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `service` is NULL or a live handle (contract).
        let service = unsafe { self::service(service) }?;
        let out = if out_report.is_null() {
            None
        } else {
            // SAFETY: not NULL; `struct_size` bytes we may read and write
            // (contract).
            Some(unsafe { args::sized_out(out_report, "out_report") }?)
        };
        let report = service.merge_now()?;
        if let Some(out) = out {
            out.write(report.into());
        }
        Ok(())
    }
}

/// What the service holds now into `*out_stats` (set
/// `out_stats->struct_size` first): attached VMs, domains, the bytes of
/// shared frames and of the VMs' own memfds, pages merged.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`, `PF_ERR_OS`.
/// ABI 0.10.
///
/// # Safety
///
/// - `service` is NULL or a live `pf_service` handle.
/// - `out_stats` is NULL or points to a `pf_service_usage` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_service_stats(
    service: *const pf_service,
    out_stats: *mut pf_service_usage,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `service` is NULL or a live handle (contract).
        let service = unsafe { self::service(service) }?;
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read and
        // write (contract).
        let out = unsafe { args::sized_out(out_stats, "out_stats") }?;
        out.write(service.stats()?.into());
        Ok(())
    }
}

/// Puts the guest memory `mem` under the service listening at
/// `socket_path` (NUL-terminated), as `options` says (NULL means domain 0,
/// tag 0), and stores the client handle in `*out_client`. The service
/// receives the memory's memfd, so the memory must be alone in its frame
/// store (made by `pf_guest_memory_new`, not `_new_in_store`), and it must
/// not be registered with a `pf_dedup` (a memory is under one engine at a
/// time). From here on the service merges the memory's pages; a write to a
/// merged page is copied by the kernel, as with `pf_dedup`. The client holds
/// the memory, so `pf_guest_memory_free` may come first.
///
/// Errors: `PF_ERR_NULL_POINTER` (`socket_path`, `mem`, `out_client`),
/// `PF_ERR_STRUCT_TOO_SMALL` (`options`), `PF_ERR_INVALID_ARGUMENT` (an
/// empty path; the memory shares its store, or is under a dedup host or a
/// service already), `PF_ERR_USERFAULT` (no userfaultfd write protection
/// here), `PF_ERR_OS` (e.g. connect: nobody listens at the path),
/// `PF_ERR_SERVICE_REFUSED` (the service said no: the message has its
/// reason), `PF_ERR_SERVICE_PROTOCOL` (the service answered something else
/// or closed the connection). ABI 0.10.
///
/// # Safety
///
/// - `socket_path` is NULL or a NUL-terminated string.
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `options` is NULL or points to a `pf_client_options` whose
///   `struct_size` bytes are readable.
/// - `out_client` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_service_client_attach(
    socket_path: *const c_char,
    mem: *const pf_guest_memory,
    options: *const pf_client_options,
    out_client: *mut *mut pf_service_client,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `out_client` is NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_client, "out_client") }?;
        // SAFETY: `socket_path` is NULL or a C string alive during the call
        // (contract).
        let path = unsafe { self::socket_path(socket_path, "socket_path") }?;
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = Arc::clone(unsafe { memory(mem) }?);
        let options = if options.is_null() {
            pf_client_options::default()
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
        let options = ClientOptions {
            domain: options.domain,
            vm_tag: options.vm_tag,
            break_on_write: options.break_on_write != 0,
            exclude_regions: options.exclude_regions,
        };
        let client = ServiceClient::attach(path, mem, options)?;
        out.write(Box::into_raw(Box::new(pf_service_client { client })));
        Ok(())
    }
}

/// The id the service gave this VM (never 0) into `*out_vm_id`.
///
/// Errors: `PF_ERR_NULL_POINTER`. ABI 0.10.
///
/// # Safety
///
/// - `client` is NULL or a live `pf_service_client` handle.
/// - `out_vm_id` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_service_client_vm_id(
    client: *const pf_service_client,
    out_vm_id: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `client` is NULL or a live handle (contract).
        let client = unsafe { self::client(client) }?;
        // SAFETY: `out_vm_id` is NULL or writable (contract).
        let out = unsafe { args::out(out_vm_id, "out_vm_id") }?;
        out.write(client.vm_id());
        Ok(())
    }
}

/// Whether the service is still there: `*out_connected` receives 1, or 0
/// once the connection ended (the service stopped or died; the memory goes
/// on as it is, merged pages readable and copied on write).
///
/// Errors: `PF_ERR_NULL_POINTER`. ABI 0.10.
///
/// # Safety
///
/// - `client` is NULL or a live `pf_service_client` handle.
/// - `out_connected` is NULL or valid for a write of one `int`.
#[no_mangle]
pub unsafe extern "C" fn pf_service_client_connected(
    client: *const pf_service_client,
    out_connected: *mut c_int,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `client` is NULL or a live handle (contract).
        let client = unsafe { self::client(client) }?;
        // SAFETY: `out_connected` is NULL or writable (contract).
        let out = unsafe { args::out(out_connected, "out_connected") }?;
        out.write(c_int::from(client.connected()));
        Ok(())
    }
}

/// Pages (4 KiB) of this process's guest memory that map a shared frame or
/// zeros now, into `*out_pages`.
///
/// Errors: `PF_ERR_NULL_POINTER`. ABI 0.10.
///
/// # Safety
///
/// - `client` is NULL or a live `pf_service_client` handle.
/// - `out_pages` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_service_client_pages_remapped(
    client: *const pf_service_client,
    out_pages: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `client` is NULL or a live handle (contract).
        let client = unsafe { self::client(client) }?;
        // SAFETY: `out_pages` is NULL or writable (contract).
        let out = unsafe { args::out(out_pages, "out_pages") }?;
        out.write(client.pages_remapped());
        Ok(())
    }
}

/// Leaves the service cleanly: the service restores every merged page into
/// this memory's own memfd (with its current bytes) and lets go of the VM;
/// if the service is gone, the pages are restored here. Afterwards the
/// memory is an ordinary `pf_guest_memory` again, which may be attached or
/// registered with a `pf_dedup` anew. Restoring needs memory for every
/// merged page again.
///
/// Consumes the handle whatever the status: do not use or free it after
/// this call. NULL is refused (`PF_ERR_NULL_POINTER`).
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_USERFAULT` (write protection
/// for the restore failed), `PF_ERR_OS` (a page could not be restored).
/// Either way the memory stays usable, pages not restored still mapping
/// the domain's frames (readable, copied on write). ABI 0.10.
///
/// # Safety
///
/// `client` is NULL or a handle from `pf_service_client_attach` that has
/// not been released, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_service_client_detach(client: *mut pf_service_client) -> pf_status {
    ffi_boundary! {
        if client.is_null() {
            return Err(Error::null("client"));
        }
        // SAFETY: `client` came from `Box::into_raw` in
        // `pf_service_client_attach`, was not released, and nothing uses it
        // during or after this call.
        let client = unsafe { Box::from_raw(client) }.client;
        // The memory handed back is the `pf_guest_memory` handle's own.
        client.detach()?;
        Ok(())
    }
}

/// Releases the client as `pf_service_client_detach` does, without a
/// status: the service brings every merged page home into this process's
/// memfd and says goodbye (should it not within a minute, this process
/// brings home what is left itself), then the connection closes. The memory
/// stays fully usable and may be attached or registered with a dedup host
/// again once every page came home. NULL is allowed and does nothing.
///
/// # Safety
///
/// `client` is NULL or a handle from `pf_service_client_attach` that has
/// not been released, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_service_client_free(client: *mut pf_service_client) {
    ffi_boundary! { returns ();
        if !client.is_null() {
            // SAFETY: `client` came from `Box::into_raw` in
            // `pf_service_client_attach`, was not released, and nothing
            // uses it during or after this call.
            drop(unsafe { Box::from_raw(client) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_options_are_the_core_defaults() {
        // SAFETY: no uid list.
        let o = unsafe { service_options(&pf_service_options::default()) };
        let d = ServiceOptions::default();
        let o = o.ok();
        assert_eq!(o.as_ref().map(|o| o.ack_deadline), Some(d.ack_deadline));
        assert_eq!(o.as_ref().map(|o| o.max_vms), Some(d.max_vms));
        assert_eq!(
            o.as_ref().map(|o| o.max_guest_bytes),
            Some(d.max_guest_bytes)
        );
        assert!(o.as_ref().is_some_and(|o| o.background.is_none()));
        assert!(o.is_some_and(|o| o.allowed_uids.is_empty()));
    }

    #[test]
    fn options_carry_every_field() {
        let uids = [1000_u32, 1001];
        let c = pf_service_options {
            ack_deadline_ms: 250,
            max_vms: 3,
            max_guest_bytes: 1 << 30,
            background_pages: 64,
            background_interval_us: 1000,
            allowed_uids: uids.as_ptr(),
            allowed_uid_count: uids.len(),
            ..pf_service_options::default()
        };
        // SAFETY: `uids` holds two elements and outlives the call.
        let o = unsafe { service_options(&c) };
        let Ok(o) = o else {
            panic!("options refused: {:?}", o.err());
        };
        assert_eq!(o.ack_deadline, Duration::from_millis(250));
        assert_eq!(o.max_vms, 3);
        assert_eq!(o.max_guest_bytes, 1 << 30);
        assert!(matches!(
            o.background,
            Some((ScanBudget::Pages(64), d)) if d == Duration::from_micros(1000)
        ));
        assert_eq!(o.allowed_uids, uids);
    }

    #[test]
    fn half_a_background_setting_is_refused() {
        for (pages, interval) in [(64, 0), (0, 1000)] {
            let c = pf_service_options {
                background_pages: pages,
                background_interval_us: interval,
                ..pf_service_options::default()
            };
            // SAFETY: no uid list.
            let e = unsafe { service_options(&c) }.err();
            assert_eq!(
                e.as_ref().map(|e| e.status),
                Some(pf_status::PF_ERR_INVALID_ARGUMENT)
            );
            assert!(e.is_some_and(|e| e.message.contains("background_pages")));
        }
        let c = pf_service_options {
            allowed_uid_count: 2,
            ..pf_service_options::default()
        };
        // SAFETY: NULL with a count is checked, never read.
        let e = unsafe { service_options(&c) }.err();
        assert_eq!(e.map(|e| e.status), Some(pf_status::PF_ERR_NULL_POINTER));
    }

    #[test]
    fn attach_to_a_socket_nobody_listens_on_names_the_cause() {
        let mut mem = std::ptr::null_mut();
        let region = crate::memory::pf_region {
            guest_start: 0,
            size: 1 << 16,
        };
        // SAFETY: one region, default options, a valid out-pointer.
        let s =
            unsafe { crate::memory::pf_guest_memory_new(&region, 1, std::ptr::null(), &mut mem) };
        assert_eq!(s, pf_status::PF_OK);
        let path = c"/nonexistent-pagefold-dir/service.sock";
        let mut client = std::ptr::null_mut();
        // SAFETY: live handle, C string, valid out-pointer.
        let s =
            unsafe { pf_service_client_attach(path.as_ptr(), mem, std::ptr::null(), &mut client) };
        assert!(client.is_null());
        let mut buf = [0 as c_char; 512];
        let mut needed = 0;
        // SAFETY: `buf` is valid for its length; `needed` is writable.
        unsafe { crate::boundary::pf_last_error_message(buf.as_mut_ptr(), buf.len(), &mut needed) };
        // SAFETY: the call above wrote a NUL-terminated string into `buf`.
        let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
        // Without userfaultfd here the client fails before it connects.
        if s != pf_status::PF_ERR_USERFAULT {
            assert_eq!(s, pf_status::PF_ERR_OS, "{msg}");
            assert!(msg.contains("connect to the service"), "{msg}");
        }
        // SAFETY: the handle from above, not used again.
        unsafe { crate::memory::pf_guest_memory_free(mem) };
    }
}
