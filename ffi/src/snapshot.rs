//! Snapshots of guest memory: saving (`pf_snapshot_save`, incremental on
//! an open parent, with the VMM's device state as an opaque byte buffer),
//! opening (`pf_snapshot`, one file or a chain) and restoring by copy, folded
//! into a dedup host's frames, lazily (`pf_lazy_restore`) and lazily folded
//! on arrival (`pf_lazy_folded_restore`); and the status of every
//! `SnapshotError` and `LazyError`.
//!
//! A `pf_snapshot` is a boxed `Arc<SnapshotReader>`: a lazy restore holds
//! the reader while its threads run, so the handle may be freed first.
//! Paths are C strings taken byte for byte (no encoding assumed).

// The types carry their C names, so the header and the Rust agree.
#![allow(non_camel_case_types)]

use std::{
    ffi::{c_char, c_void, CStr, OsStr},
    mem::size_of,
    os::unix::ffi::OsStrExt,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use pagefold::{
    snapshot::{
        restore_folded_lazy, restore_folded_with, restore_into, restore_lazy, save_incremental,
        save_incremental_machine, save_machine, FoldLayout, FoldOptions, LazyError,
        LazyFoldOptions, LazyFoldedRestore, LazyOptions, LazyRestore, LazyStats, MachineState,
        SaveOptions, SaveStats, SnapshotError, SnapshotReader, DEFAULT_MAX_GUEST_BYTES,
        MAX_DEVICE_STATE,
    },
    DedupHost, DirtyRun, GuestPhysAddr, VmOptions,
};

use crate::{
    args::{self, SizePrefixed, SizedOut},
    dedup::{pf_dedup, pf_vm_options, read_vm_options, shared_host},
    dirty::{dirty_status, pf_dirty_run},
    memory::{memory, pf_guest_memory, pf_region},
    status::{access_status, dedup_status, memory_status, pf_status, Error},
};

/// `pf_save_options.flags`: leave dirty tracking as it is (a full save
/// turns it on for every region and empties the log by default, so that an
/// incremental snapshot on this one gets every page written since). Ignored
/// by an incremental save, which needs tracking on.
pub const PF_SAVE_NO_TRACK_DIRTY: u32 = 1 << 0;
/// `pf_save_options.flags`: save `device_state` (`device_state_len` bytes,
/// which may be 0) as the snapshot's device-state part. Without it
/// `device_state` must be NULL and `device_state_len` 0, and the snapshot
/// has no device state.
pub const PF_SAVE_DEVICE_STATE: u32 = 1 << 1;
const PF_SAVE_KNOWN_FLAGS: u32 = PF_SAVE_NO_TRACK_DIRTY | PF_SAVE_DEVICE_STATE;

/// The most bytes of device state a snapshot carries (64 MiB): a save with
/// more is refused with `PF_ERR_INVALID_ARGUMENT` before a page is read.
pub const PF_SNAPSHOT_MAX_DEVICE_STATE: u64 = 64 << 20;

/// `pf_snapshot_info.flags`: the snapshot is incremental (its parent's id
/// is `parent_id`).
pub const PF_SNAPSHOT_INCREMENTAL: u32 = 1 << 0;
/// `pf_snapshot_info.flags`: the snapshot carries device state (possibly
/// of 0 bytes): `pf_snapshot_device_state` reads it.
pub const PF_SNAPSHOT_DEVICE_STATE: u32 = 1 << 1;
/// `pf_snapshot_info.flags`: the snapshot carries the VM-wide KVM state
/// (kvmclock, irqchip, PIT) that a Rust VMM saved; this ABI does not read
/// it.
pub const PF_SNAPSHOT_VM_STATE: u32 = 1 << 2;

/// How a save works. Size-prefixed: set `struct_size` to
/// `sizeof(pf_save_options)`. Zero fields mean the defaults (tracking
/// turned on, no device state), so
/// `pf_save_options o = { .struct_size = sizeof o };` is a valid start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_save_options {
    /// `sizeof(pf_save_options)` as the caller was compiled with.
    pub struct_size: usize,
    /// A mix of `PF_SAVE_NO_TRACK_DIRTY` and `PF_SAVE_DEVICE_STATE`; other
    /// bits are refused with `PF_ERR_INVALID_ARGUMENT`.
    pub flags: u32,
    /// Zero; reserved (other values are refused with
    /// `PF_ERR_INVALID_ARGUMENT`).
    pub reserved: u32,
    /// The VMM's device state (its virtio queues, serial port, ... in its
    /// own format), opaque to pagefold, with `PF_SAVE_DEVICE_STATE`: read
    /// back by `pf_snapshot_device_state`. NULL when `device_state_len`
    /// is 0; only read during the call.
    pub device_state: *const u8,
    /// Bytes at `device_state`, at most `PF_SNAPSHOT_MAX_DEVICE_STATE`.
    pub device_state_len: usize,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers and a raw
// pointer only, which are valid for every bit pattern.
unsafe impl SizePrefixed for pf_save_options {
    const NAME: &'static str = "pf_save_options";
}

impl Default for pf_save_options {
    fn default() -> Self {
        pf_save_options {
            struct_size: size_of::<Self>(),
            flags: 0,
            reserved: 0,
            device_state: std::ptr::null(),
            device_state_len: 0,
        }
    }
}

/// What a save wrote. Size-prefixed: set `struct_size` before the call;
/// the call sets it to the bytes it filled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_save_stats {
    /// In: `sizeof(pf_save_stats)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// The new snapshot's id: BLAKE3 of its contents and ancestry, as
    /// `pf_snapshot_info.id` reads it back.
    pub id: [u8; 32],
    /// Pages of the layout.
    pub pages: u64,
    /// Pages saved as zero (nothing stored).
    pub zero_pages: u64,
    /// Pages stored (distinct contents new to the chain).
    pub stored_pages: u64,
    /// Pages whose content this snapshot stores or names already.
    pub duplicate_pages: u64,
    /// Pages whose content an ancestor stores (named, not stored again).
    pub ancestor_pages: u64,
    /// Pages as in the parent (not dirty since it).
    pub parent_pages: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers and bytes
// only.
unsafe impl SizePrefixed for pf_save_stats {
    const NAME: &'static str = "pf_save_stats";
}

/// What `pf_snapshot_get_info` tells about an open snapshot. Size-prefixed like
/// `pf_save_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_snapshot_info {
    /// In: `sizeof(pf_snapshot_info)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// The snapshot's id (BLAKE3 of its header, map, table and parts: it
    /// names the whole image and its ancestry).
    pub id: [u8; 32],
    /// The parent's id for an incremental snapshot; zeros for a full one.
    pub parent_id: [u8; 32],
    /// Pages (4 KiB) of the layout.
    pub pages: u64,
    /// Pages stored in this file (each a distinct content).
    pub stored_pages: u64,
    /// The file's length in bytes.
    pub file_bytes: u64,
    /// Bytes of device state (0 without; see `PF_SNAPSHOT_DEVICE_STATE`).
    pub device_state_len: u64,
    /// Regions of the layout (`pf_snapshot_regions`).
    pub region_count: u32,
    /// vCPU states the file carries (saved by a Rust VMM; this ABI does not
    /// read them).
    pub vcpu_count: u32,
    /// A mix of `PF_SNAPSHOT_INCREMENTAL`, `PF_SNAPSHOT_DEVICE_STATE` and
    /// `PF_SNAPSHOT_VM_STATE`.
    pub flags: u32,
    /// Zero; reserved.
    pub reserved: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers and bytes
// only.
unsafe impl SizePrefixed for pf_snapshot_info {
    const NAME: &'static str = "pf_snapshot_info";
}

/// What `pf_snapshot_restore_into` did. Size-prefixed like
/// `pf_save_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_restore_stats {
    /// In: `sizeof(pf_restore_stats)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Pages of the layout.
    pub pages: u64,
    /// Pages released as zero (no memory).
    pub zero_pages: u64,
    /// Pages copied from the snapshot files.
    pub copied_pages: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_restore_stats {
    const NAME: &'static str = "pf_restore_stats";
}

/// How a folded restore lays out the frames its pages map: the values of
/// `pf_fold_options.layout`. Each run of pages onto consecutive frames
/// costs kernel mappings (`vm.max_map_count`); past the process's budget a
/// clone's shortest runs are copied into frames of its own instead, so no
/// layout fails for want of mappings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum pf_fold_layout {
    /// An image where the domain holds one already, else a frame per
    /// content where the clones still to come fit the mapping budget, else
    /// the least memory over those clones of contents, a partial image or a
    /// whole image (the default).
    PF_FOLD_AUTO = 0,
    /// A frame per distinct content of the domain, shared with every
    /// snapshot that has it: the least memory, two mappings per run.
    PF_FOLD_CONTENTS = 1,
    /// The snapshot's pages in page order in one run of frames shared by
    /// its clones: two mappings per region, its duplicates stored again.
    PF_FOLD_IMAGE = 2,
}

/// How `pf_snapshot_restore_folded` goes about it. Size-prefixed: set
/// `struct_size` to `sizeof(pf_fold_options)`. Zero fields mean the
/// defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pf_fold_options {
    /// `sizeof(pf_fold_options)` as the caller was compiled with.
    pub struct_size: usize,
    /// One of `pf_fold_layout` (0, `PF_FOLD_AUTO`, by default).
    pub layout: u32,
    /// Zero; reserved (other values are refused with
    /// `PF_ERR_INVALID_ARGUMENT`).
    pub reserved: u32,
    /// Clones of this snapshot the caller plans to restore into the domain,
    /// those restored already and still registered included:
    /// `PF_FOLD_AUTO` plans the mapping budget for the ones still to come.
    /// 0: as many more as are registered.
    pub planned_clones: u64,
    /// The largest guest (all regions together, in bytes) to restore,
    /// checked against the snapshot's header before any work per page (a
    /// small file may claim a huge guest of zero pages). 0: 64 GiB.
    pub max_guest_bytes: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_fold_options {
    const NAME: &'static str = "pf_fold_options";
}

/// What `pf_snapshot_restore_folded` did. Every page is exactly one of
/// zero, shared or copied. Size-prefixed like `pf_save_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_folded_stats {
    /// In: `sizeof(pf_folded_stats)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Pages of the layout.
    pub pages: u64,
    /// Zero pages: no memory, no content stored or shared.
    pub zero_pages: u64,
    /// Pages with content mapping a shared frame of the domain.
    pub shared_pages: u64,
    /// Pages with content copied into a frame of their own instead (the
    /// mapping budget could not pay for their runs, or their region is
    /// excluded from merging).
    pub copied_pages: u64,
    /// Distinct contents the pages name.
    pub contents: u64,
    /// Of those, contents the domain held already (nothing read).
    pub contents_found: u64,
    /// Of those, contents read from the snapshot files into new frames.
    pub contents_read: u64,
    /// Remaps made (one per run of pages onto consecutive frames).
    pub remaps: u64,
    /// 1 if the pages map an image of the snapshot (whole or partial), 0
    /// if a frame per content alone.
    pub image: u32,
    /// Zero; reserved.
    pub reserved: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_folded_stats {
    const NAME: &'static str = "pf_folded_stats";
}

/// How a lazy restore works (`pf_snapshot_restore_lazy`,
/// `pf_snapshot_restore_folded_lazy`). Size-prefixed: set `struct_size` to
/// `sizeof(pf_lazy_options)`. Zero fields mean the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_lazy_options {
    /// `sizeof(pf_lazy_options)` as the caller was compiled with.
    pub struct_size: usize,
    /// A working-set file, NUL-terminated (NULL: none): read at the start
    /// (the pages it names are fetched first; a file that does not exist
    /// yet is an empty set) and written by a successful wait with the first
    /// `record_pages` pages touched. Only read during the call.
    pub working_set: *const c_char,
    /// How many of the pages served on first touch (in order of touch) to
    /// write to the working-set file; 0 writes nothing.
    pub record_pages: u64,
    /// Microseconds after the call returns before the background fetch
    /// starts (first touches are served meanwhile): on a host with few
    /// cores a few milliseconds bring the guest's first instruction
    /// forward, at the cost of the whole memory arriving that much later.
    pub fetch_delay_us: u64,
    /// The largest guest (all regions together, in bytes) that
    /// `pf_snapshot_restore_folded_lazy` restores, checked before any work
    /// per page. 0: 64 GiB. (`pf_snapshot_restore_lazy` ignores it: the
    /// caller's memory has the size.)
    pub max_guest_bytes: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers and a raw
// pointer only, which are valid for every bit pattern.
unsafe impl SizePrefixed for pf_lazy_options {
    const NAME: &'static str = "pf_lazy_options";
}

impl Default for pf_lazy_options {
    fn default() -> Self {
        pf_lazy_options {
            struct_size: size_of::<Self>(),
            working_set: std::ptr::null(),
            record_pages: 0,
            fetch_delay_us: 0,
            max_guest_bytes: 0,
        }
    }
}

/// What a lazy restore did: `on_fault + fetched + found + zero_untouched +
/// damaged == pages`. Size-prefixed like `pf_save_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_lazy_stats {
    /// In: `sizeof(pf_lazy_stats)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Pages of the layout.
    pub pages: u64,
    /// Pages placed on first touch (zero pages included).
    pub on_fault: u64,
    /// Stored pages placed by the background fetch.
    pub fetched: u64,
    /// Of `fetched`, those fetched first because the working set named
    /// them.
    pub working_set: u64,
    /// Stored pages there before this restore placed them (a restore folded
    /// on arrival finds what another clone of the snapshot filled).
    pub found: u64,
    /// Zero pages nobody touched during the restore: left to the kernel.
    pub zero_untouched: u64,
    /// Zero pages of the snapshot (touched or not).
    pub zero_pages: u64,
    /// Pages whose snapshot bytes were damaged (poisoned, or zero-filled
    /// where the kernel cannot poison).
    pub damaged: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_lazy_stats {
    const NAME: &'static str = "pf_lazy_stats";
}

impl From<LazyStats> for pf_lazy_stats {
    fn from(s: LazyStats) -> Self {
        pf_lazy_stats {
            struct_size: size_of::<Self>(),
            pages: s.pages,
            on_fault: s.on_fault,
            fetched: s.fetched,
            working_set: s.working_set,
            found: s.found,
            zero_untouched: s.zero_untouched,
            zero_pages: s.zero_pages,
            damaged: s.damaged,
        }
    }
}

/// An open snapshot file, with its ancestors for a chain: made by
/// `pf_snapshot_open` or `pf_snapshot_open_chain`, released by
/// `pf_snapshot_free` (a lazy restore holds what it reads, so the handle
/// may go first). Thread-safe: every call but `pf_snapshot_free` may run on
/// one handle from several threads at once. ABI 0.11.
pub struct pf_snapshot {
    snap: Arc<SnapshotReader>,
}

/// A lazy restore in progress (`pf_snapshot_restore_lazy`): first touches
/// of the memory are served from the snapshot while a background fetch
/// copies the rest. `pf_lazy_restore_wait` waits for every page and
/// releases it; `pf_lazy_restore_free` before then stops the restore, and
/// the memory's unfetched pages read as zeros from then on: discard it.
pub struct pf_lazy_restore {
    lazy: LazyRestore,
}

/// A VM restored lazily into a dedup host, folded on arrival
/// (`pf_snapshot_restore_folded_lazy`): its pages map an image in the
/// host's frames that is filled as they arrive, shared by every clone of
/// the snapshot. `pf_lazy_folded_restore_wait` waits for every page and
/// releases it (the VM is then an ordinary VM of its host);
/// `pf_lazy_folded_restore_free` before then discards the VM.
pub struct pf_lazy_folded_restore {
    restore: LazyFoldedRestore,
    /// The host the VM is registered with, kept while the restore lives:
    /// the restore reaches it only weakly, and a host gone before the wait
    /// could not take the VM in (or out) any more.
    _host: Arc<DedupHost>,
}

// `pf_*_pages_done` may run on one handle from several threads at once.
const _: fn() = || {
    fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<pf_snapshot>();
    shared_between_threads::<pf_lazy_restore>();
    shared_between_threads::<pf_lazy_folded_restore>();
};

/// The status of a snapshot error.
pub(crate) fn snapshot_status(e: &SnapshotError) -> pf_status {
    match e {
        SnapshotError::File { .. } | SnapshotError::Io { .. } => pf_status::PF_ERR_OS,
        SnapshotError::Truncated { .. }
        | SnapshotError::BadMagic { .. }
        | SnapshotError::UnsupportedVersion { .. }
        | SnapshotError::Checksum { .. }
        | SnapshotError::ContentHash { .. }
        | SnapshotError::Malformed { .. }
        | SnapshotError::IdMismatch { .. }
        | SnapshotError::Foreign { .. }
        | SnapshotError::TooLarge { .. } => pf_status::PF_ERR_SNAPSHOT,
        SnapshotError::NotIncremental { .. }
        | SnapshotError::WrongParent { .. }
        | SnapshotError::ParentMissing { .. }
        | SnapshotError::LayoutMismatch { .. } => pf_status::PF_ERR_MISMATCH,
        // The caller's destination, memory or dirty runs.
        SnapshotError::OverwritesAncestor { .. }
        | SnapshotError::NotTracking { .. }
        | SnapshotError::DirtyRun { .. } => pf_status::PF_ERR_INVALID_ARGUMENT,
        SnapshotError::PageNotInLayout { .. } => pf_status::PF_ERR_UNMAPPED,
        // A migration sender holds the dirty log; save after it ends.
        SnapshotError::LogInUse => pf_status::PF_ERR_BUSY,
        SnapshotError::InFile { source, .. } => snapshot_status(source),
        SnapshotError::Access(a) => access_status(a),
        SnapshotError::Memory(m) => memory_status(m),
        SnapshotError::Dirty(d) => dirty_status(d),
        SnapshotError::Dedup(d) => dedup_status(d),
    }
}

impl From<SnapshotError> for Error {
    fn from(e: SnapshotError) -> Self {
        Error::new(snapshot_status(&e), e.to_string())
    }
}

/// The status of a lazy restore error.
pub(crate) fn lazy_status(e: &LazyError) -> pf_status {
    match e {
        LazyError::Snapshot(s) => snapshot_status(s),
        LazyError::Userfault(_) => pf_status::PF_ERR_USERFAULT,
        // The caller's memory: registered with a dedup host or watched by
        // a raw-write tracker, or written already.
        LazyError::Claimed | LazyError::NotFresh { .. } => pf_status::PF_ERR_INVALID_ARGUMENT,
        LazyError::NotMemfd | LazyError::HugePages { .. } => pf_status::PF_ERR_UNSUPPORTED,
        LazyError::WorkingSet { .. } => pf_status::PF_ERR_SNAPSHOT,
        // A thread of the restore panicked: the memory must be discarded,
        // as after any panic of pagefold.
        LazyError::Panicked(_) => pf_status::PF_ERR_PANIC,
        LazyError::Thread(..) => pf_status::PF_ERR_OS,
    }
}

impl From<LazyError> for Error {
    fn from(e: LazyError) -> Self {
        Error::new(lazy_status(&e), e.to_string())
    }
}

/// The NUL-terminated string at `p` (named `arg` in messages) as a path,
/// byte for byte.
///
/// # Safety
///
/// `p` is NULL or a NUL-terminated string readable during the call.
unsafe fn path_arg(p: *const c_char, arg: &str) -> Result<PathBuf, Error> {
    if p.is_null() {
        return Err(Error::null(arg));
    }
    // SAFETY: not NULL (checked); a readable NUL-terminated string
    // (contract).
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(Error::invalid(format!("`{arg}` is an empty path")));
    }
    Ok(PathBuf::from(OsStr::from_bytes(bytes)))
}

/// Borrows the snapshot behind a handle.
///
/// # Safety
///
/// `p` is NULL or a live handle that is not freed during `'a`.
unsafe fn snapshot<'a>(p: *const pf_snapshot, arg: &str) -> Result<&'a Arc<SnapshotReader>, Error> {
    // SAFETY: forwarded from this function's contract.
    Ok(&unsafe { args::handle(p, arg) }?.snap)
}

/// Checks an optional size-prefixed out-parameter: NULL means the caller
/// does not want it.
///
/// # Safety
///
/// As `args::sized_out`.
unsafe fn optional_out<'a, T: SizePrefixed>(
    p: *mut T,
    arg: &str,
) -> Result<Option<SizedOut<'a, T>>, Error> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { args::sized_out(p, arg) }.map(Some)
}

/// The caller's save options, checked: flags, reserved, and the device
/// state (borrowed from the caller's buffer, which is only read during the
/// call).
///
/// # Safety
///
/// `options` is NULL or points to a `pf_save_options` whose `struct_size`
/// bytes are readable, and whose `device_state` is NULL or valid for reads
/// of `device_state_len` bytes that nobody writes during `'a`.
unsafe fn save_options<'a>(
    options: *const pf_save_options,
) -> Result<(SaveOptions, Option<&'a [u8]>), Error> {
    let o = if options.is_null() {
        pf_save_options::default()
    } else {
        // SAFETY: not NULL; `struct_size` bytes readable (contract).
        unsafe { args::read_sized(options, "options") }?
    };
    let unknown = o.flags & !PF_SAVE_KNOWN_FLAGS;
    if unknown != 0 {
        return Err(Error::invalid(format!(
            "options->flags has unknown bits {unknown:#x}"
        )));
    }
    if o.reserved != 0 {
        return Err(Error::invalid(format!(
            "options->reserved is {}; it must be 0",
            o.reserved
        )));
    }
    let device = if o.flags & PF_SAVE_DEVICE_STATE != 0 {
        if o.device_state_len as u64 > MAX_DEVICE_STATE {
            return Err(Error::invalid(format!(
                "options->device_state_len is {}, more than the {} bytes a snapshot's device \
                 state may hold",
                o.device_state_len, MAX_DEVICE_STATE
            )));
        }
        // SAFETY: `device_state` is NULL or `device_state_len` readable
        // bytes nobody writes during 'a (contract).
        Some(unsafe {
            args::bytes(
                o.device_state.cast(),
                o.device_state_len,
                "options->device_state",
            )
        }?)
    } else {
        if !o.device_state.is_null() || o.device_state_len != 0 {
            return Err(Error::invalid(
                "options->device_state is set but options->flags lacks PF_SAVE_DEVICE_STATE",
            ));
        }
        None
    };
    Ok((
        SaveOptions {
            track_dirty: o.flags & PF_SAVE_NO_TRACK_DIRTY == 0,
        },
        device,
    ))
}

fn save_stats_out(s: &SaveStats) -> pf_save_stats {
    pf_save_stats {
        struct_size: size_of::<pf_save_stats>(),
        id: s.id.0,
        pages: s.pages,
        zero_pages: s.zero_pages,
        stored_pages: s.stored_pages,
        duplicate_pages: s.duplicate_pages,
        ancestor_pages: s.ancestor_pages,
        parent_pages: s.parent_pages,
        file_bytes: s.file_bytes,
    }
}

/// Saves all of `mem` as a full snapshot at `path` (a file there is
/// replaced only once the new one is complete and on disk: no file that
/// opens as valid is ever left half written), with the device state of
/// `options` (NULL: the defaults), and stores what it wrote in
/// `*out_stats` unless that is NULL (set its `struct_size` first). Zero
/// pages cost nothing. Unless `PF_SAVE_NO_TRACK_DIRTY`, dirty tracking is
/// turned on for every region and the log emptied before the first page is
/// read, so that the next harvest (`pf_guest_memory_harvest_dirty`, after
/// merging KVM's dirty bitmaps) holds every page written since, for
/// `pf_snapshot_save_incremental`. Stop the vCPUs for a consistent image.
///
/// Errors: `PF_ERR_NULL_POINTER` (`mem`, `path`,
/// `options->device_state` while `device_state_len > 0`),
/// `PF_ERR_STRUCT_TOO_SMALL` (`options`, `out_stats`),
/// `PF_ERR_INVALID_ARGUMENT` (unknown flag, nonzero `reserved`, an empty
/// path, device state without `PF_SAVE_DEVICE_STATE` or over
/// `PF_SNAPSHOT_MAX_DEVICE_STATE`), `PF_ERR_BUSY` (tracking asked for while
/// a migration sender holds the dirty log), `PF_ERR_OS` (creating, writing,
/// syncing or renaming the file).
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `path` is NULL or a NUL-terminated string.
/// - `options` is NULL or points to a `pf_save_options` whose `struct_size`
///   bytes are readable, and whose `device_state` is NULL or valid for
///   reads of `device_state_len` bytes.
/// - `out_stats` is NULL or points to a `pf_save_stats` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_save(
    mem: *const pf_guest_memory,
    path: *const c_char,
    options: *const pf_save_options,
    out_stats: *mut pf_save_stats,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `path` is NULL or a C string (contract).
        let path = unsafe { path_arg(path, "path") }?;
        // SAFETY: `options` is NULL or readable, its device state too
        // (contract).
        let (opts, device) = unsafe { save_options(options) }?;
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read
        // and write (contract).
        let out = unsafe { optional_out(out_stats, "out_stats") }?;
        let machine = MachineState { vcpus: &[], vm: None, device_state: device };
        let stats = save_machine(mem, &path, &opts, &machine)?;
        if let Some(out) = out {
            out.write(save_stats_out(&stats));
        }
        Ok(())
    }
}

/// Saves the pages of `mem` in the `dirty_count` runs at `dirty` as an
/// incremental snapshot on top of `parent` at `path` (every other page is
/// "as in the parent"; a content the parent or an ancestor opened with it
/// stores is named, not stored again), with the device state of `options`
/// (an incremental snapshot carries its own; `PF_SAVE_NO_TRACK_DIRTY` is
/// ignored), and stores what it wrote in `*out_stats` unless that is NULL.
///
/// The runs must hold every page written since `parent` was saved: with
/// tracking on since that save, merge KVM's dirty bitmaps and harvest
/// (`pf_guest_memory_harvest_dirty`, `PF_ALL_REGIONS`) right before this
/// call, with the vCPUs stopped. On failure the runs are marked dirty
/// again, so a retry after a fresh harvest still has them.
///
/// Errors: `PF_ERR_NULL_POINTER` (`mem`, `parent`, `path`, `dirty` while
/// `dirty_count > 0`), `PF_ERR_STRUCT_TOO_SMALL`, `PF_ERR_INVALID_ARGUMENT`
/// (as `pf_snapshot_save`; a region not dirty tracked, a run outside the
/// memory, `path` the file of `parent` or an ancestor), `PF_ERR_MISMATCH`
/// (the memory's layout is not the parent's), `PF_ERR_BUSY` (a migration
/// sender holds the dirty log), `PF_ERR_SNAPSHOT` (an ancestor's file read
/// damaged), `PF_ERR_OS`.
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `parent` is NULL or a live `pf_snapshot` handle.
/// - `dirty` is NULL or valid for reads of `dirty_count` `pf_dirty_run`s.
/// - `path`, `options` and `out_stats` as for `pf_snapshot_save`.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_save_incremental(
    mem: *const pf_guest_memory,
    parent: *const pf_snapshot,
    dirty: *const pf_dirty_run,
    dirty_count: usize,
    path: *const c_char,
    options: *const pf_save_options,
    out_stats: *mut pf_save_stats,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `parent` is NULL or a live handle (contract).
        let parent = unsafe { snapshot(parent, "parent") }?;
        // SAFETY: `dirty` is NULL or `dirty_count` readable runs (contract).
        let runs = unsafe { args::array(dirty, dirty_count, "dirty", "dirty_count") }?;
        // SAFETY: `path` is NULL or a C string (contract).
        let path = unsafe { path_arg(path, "path") }?;
        // SAFETY: `options` is NULL or readable, its device state too
        // (contract).
        let (_, device) = unsafe { save_options(options) }?;
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read
        // and write (contract).
        let out = unsafe { optional_out(out_stats, "out_stats") }?;
        let runs: Vec<DirtyRun> = runs
            .iter()
            .map(|r| DirtyRun { start: GuestPhysAddr(r.gpa), pages: r.pages })
            .collect();
        let stats = match device {
            None => save_incremental(mem, parent, &runs, &path)?,
            Some(d) => {
                let machine = MachineState { vcpus: &[], vm: None, device_state: Some(d) };
                save_incremental_machine(mem, parent, &runs, &path, &machine)?
            }
        };
        if let Some(out) = out {
            out.write(save_stats_out(&stats));
        }
        Ok(())
    }
}

/// Opens the snapshot at `path` and checks its header, map and table (each
/// stored page is checked when read), and stores the handle in
/// `*out_snap`. Anything but a regular file (a FIFO, a device) is an
/// error, never a wait. An incremental snapshot opened alone knows its
/// parent only by id: restoring it needs its chain (`pf_snapshot_open_chain`).
///
/// Errors: `PF_ERR_NULL_POINTER` (`path`, `out_snap`),
/// `PF_ERR_INVALID_ARGUMENT` (empty path), `PF_ERR_OS` (the file cannot be
/// opened or read, or is not a regular file), `PF_ERR_SNAPSHOT` (not a
/// pagefold snapshot, another version, truncated, corrupt).
///
/// # Safety
///
/// - `path` is NULL or a NUL-terminated string.
/// - `out_snap` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_open(
    path: *const c_char,
    out_snap: *mut *mut pf_snapshot,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `path` is NULL or a C string (contract).
        let path = unsafe { path_arg(path, "path") }?;
        // SAFETY: `out_snap` is NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_snap, "out_snap") }?;
        let snap = SnapshotReader::open(&path)?;
        out.write(Box::into_raw(Box::new(pf_snapshot { snap: Arc::new(snap) })));
        Ok(())
    }
}

/// Opens a chain of `count` snapshots, `paths[0]` the oldest (a full
/// snapshot), each later one incremental on the one before, and stores a
/// handle to the newest (holding the others) in `*out_snap`. An error
/// about a file's bytes names the file.
///
/// Errors: `PF_ERR_NULL_POINTER` (`paths` or one of them, `out_snap`),
/// `PF_ERR_INVALID_ARGUMENT` (`count` 0, an empty path), `PF_ERR_OS`,
/// `PF_ERR_SNAPSHOT` (as `pf_snapshot_open`), `PF_ERR_MISMATCH` (a file is
/// not the child of the one before it: another parent, a full snapshot,
/// another layout).
///
/// # Safety
///
/// - `paths` is NULL or valid for reads of `count` pointers, each NULL or a
///   NUL-terminated string.
/// - `out_snap` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_open_chain(
    paths: *const *const c_char,
    count: usize,
    out_snap: *mut *mut pf_snapshot,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `out_snap` is NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_snap, "out_snap") }?;
        if count == 0 {
            return Err(Error::invalid("count is 0: a chain has at least one snapshot"));
        }
        // SAFETY: `paths` is NULL or `count` readable pointers (contract).
        let ptrs = unsafe { args::array(paths, count, "paths", "count") }?;
        let mut chain = Vec::with_capacity(ptrs.len());
        for (i, p) in ptrs.into_iter().enumerate() {
            // SAFETY: each pointer is NULL or a C string (contract).
            chain.push(unsafe { path_arg(p, &format!("paths[{i}]")) }?);
        }
        let snap = SnapshotReader::open_chain(&chain)?;
        out.write(Box::into_raw(Box::new(pf_snapshot { snap: Arc::new(snap) })));
        Ok(())
    }
}

/// Releases the handle (the file is closed once no lazy restore reads it).
/// NULL is allowed and does nothing.
///
/// # Safety
///
/// `snap` is NULL or a `pf_snapshot` handle that has not been freed, and no
/// other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_free(snap: *mut pf_snapshot) {
    ffi_boundary! { returns ();
        if !snap.is_null() {
            // SAFETY: from `Box::into_raw` in `pf_snapshot_open*`, not
            // freed, not used again (contract).
            drop(unsafe { Box::from_raw(snap) });
        }
    }
}

/// Describes the snapshot in `*out_info` (set `out_info->struct_size`
/// first): id, parent id, pages, regions, device state.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`.
///
/// # Safety
///
/// - `snap` is NULL or a live `pf_snapshot` handle.
/// - `out_info` is NULL or points to a `pf_snapshot_info` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_get_info(
    snap: *const pf_snapshot,
    out_info: *mut pf_snapshot_info,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `snap` is NULL or a live handle (contract).
        let snap = unsafe { snapshot(snap, "snap") }?;
        // SAFETY: `out_info` is NULL or `struct_size` bytes we may read and
        // write (contract).
        let out = unsafe { args::sized_out(out_info, "out_info") }?;
        let parent = snap.parent_id();
        let device = snap.device_state();
        let mut flags = 0;
        if parent.is_some() {
            flags |= PF_SNAPSHOT_INCREMENTAL;
        }
        if device.is_some() {
            flags |= PF_SNAPSHOT_DEVICE_STATE;
        }
        if snap.vm_state().is_some() {
            flags |= PF_SNAPSHOT_VM_STATE;
        }
        out.write(pf_snapshot_info {
            struct_size: size_of::<pf_snapshot_info>(),
            id: snap.id().0,
            parent_id: parent.map_or([0; 32], |p| p.0),
            pages: snap.pages(),
            stored_pages: snap.stored_pages(),
            file_bytes: snap.file_len(),
            device_state_len: device.map_or(0, |d| d.len() as u64),
            region_count: u32::try_from(snap.region_layout().len()).unwrap_or(u32::MAX),
            vcpu_count: u32::try_from(snap.vcpus().len()).unwrap_or(u32::MAX),
            flags,
            reserved: 0,
        });
        Ok(())
    }
}

/// Stores the snapshot's regions, in address order, in `regions` (room for
/// `capacity`) and their number in `*out_count`: the layout to make a
/// memory to restore into (`pf_guest_memory_new`). If they do not fit,
/// nothing is written but `*out_count`, the number needed, and the call
/// returns `PF_ERR_BUFFER_TOO_SMALL`; `regions` may be NULL with
/// `capacity` 0 to ask.
///
/// Errors: `PF_ERR_NULL_POINTER` (`snap`, `out_count`, `regions` while
/// `capacity > 0`), `PF_ERR_INVALID_ARGUMENT` (absurd `capacity`),
/// `PF_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
///
/// - `snap` is NULL or a live `pf_snapshot` handle.
/// - `regions` is NULL or valid for writes of `capacity` `pf_region`s.
/// - `out_count` is NULL or valid for a write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_regions(
    snap: *const pf_snapshot,
    regions: *mut pf_region,
    capacity: usize,
    out_count: *mut usize,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `snap` is NULL or a live handle (contract).
        let snap = unsafe { snapshot(snap, "snap") }?;
        // SAFETY: `out_count` is NULL or writable (contract).
        let out = unsafe { args::out(out_count, "out_count") }?;
        let bytes = capacity.checked_mul(size_of::<pf_region>()).ok_or_else(|| {
            Error::invalid(format!("capacity {capacity} is larger than any array can be"))
        })?;
        // SAFETY: `regions` is NULL or writable for `capacity` regions,
        // which nothing else uses during the call (contract); checked for
        // NULL and size here.
        let buf = unsafe { args::bytes_mut(regions.cast(), bytes, "regions") }?;
        let layout = snap.region_layout();
        if layout.len() > capacity {
            let needed = layout.len();
            out.write(needed);
            return Err(Error::new(
                pf_status::PF_ERR_BUFFER_TOO_SMALL,
                format!("{needed} regions do not fit in a buffer of {capacity}"),
            ));
        }
        for (slot, &(start, size)) in buf.chunks_exact_mut(size_of::<pf_region>()).zip(&layout) {
            let r = pf_region { guest_start: start.0, size };
            // SAFETY: `slot` is `size_of::<pf_region>()` writable bytes of
            // the caller's buffer; `write_unaligned` needs no alignment.
            unsafe { slot.as_mut_ptr().cast::<pf_region>().write_unaligned(r) };
        }
        out.write(layout.len());
        Ok(())
    }
}

/// Copies the snapshot's device state (the bytes a save was given with
/// `PF_SAVE_DEVICE_STATE`, checked against their checksum at open) into
/// `buf` (room for `capacity` bytes) and stores its length in `*out_len`.
/// A snapshot without device state has 0 bytes of it (`pf_snapshot_get_info`'s
/// `PF_SNAPSHOT_DEVICE_STATE` tells that from an empty one). If the bytes
/// do not fit, nothing is copied, `*out_len` receives the length and the
/// call returns `PF_ERR_BUFFER_TOO_SMALL`; `buf` may be NULL with
/// `capacity` 0 to ask.
///
/// Errors: `PF_ERR_NULL_POINTER` (`snap`, `out_len`, `buf` while
/// `capacity > 0`), `PF_ERR_INVALID_ARGUMENT` (`capacity` over
/// PTRDIFF_MAX), `PF_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
///
/// - `snap` is NULL or a live `pf_snapshot` handle.
/// - `buf` is NULL or valid for writes of `capacity` bytes.
/// - `out_len` is NULL or valid for a write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_device_state(
    snap: *const pf_snapshot,
    buf: *mut c_void,
    capacity: usize,
    out_len: *mut usize,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `snap` is NULL or a live handle (contract).
        let snap = unsafe { snapshot(snap, "snap") }?;
        // SAFETY: `out_len` is NULL or writable (contract).
        let out = unsafe { args::out(out_len, "out_len") }?;
        // SAFETY: `buf` is NULL or exclusively ours for `capacity` bytes
        // (contract).
        let buf = unsafe { args::bytes_mut(buf, capacity, "buf") }?;
        let state = snap.device_state().unwrap_or(&[]);
        if state.len() > capacity {
            out.write(state.len());
            return Err(Error::new(
                pf_status::PF_ERR_BUFFER_TOO_SMALL,
                format!("{} bytes of device state do not fit in a buffer of {capacity}", state.len()),
            ));
        }
        buf[..state.len()].copy_from_slice(state);
        out.write(state.len());
        Ok(())
    }
}

/// Restores `snap` (with its chain) into `mem` by copy: stored pages are
/// read, checked against their content addresses and written; zero pages
/// are released (no memory). `mem` must have the snapshot's layout
/// (`pf_snapshot_regions`). What it did goes to `*out_stats` unless that
/// is NULL (set its `struct_size` first).
///
/// On an error (a damaged page, a missing ancestor) the memory is partly
/// restored and must be discarded; no page ever holds bytes the snapshot
/// did not save.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`,
/// `PF_ERR_MISMATCH` (another layout; an incremental snapshot opened
/// without its chain), `PF_ERR_SNAPSHOT` (a damaged page), `PF_ERR_OS`,
/// `PF_ERR_WRITE_PROTECTED`.
///
/// # Safety
///
/// - `snap` is NULL or a live `pf_snapshot` handle.
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `out_stats` is NULL or points to a `pf_restore_stats` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_restore_into(
    snap: *const pf_snapshot,
    mem: *const pf_guest_memory,
    out_stats: *mut pf_restore_stats,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `snap` is NULL or a live handle (contract).
        let snap = unsafe { snapshot(snap, "snap") }?;
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read
        // and write (contract).
        let out = unsafe { optional_out(out_stats, "out_stats") }?;
        let s = restore_into(snap, mem)?;
        if let Some(out) = out {
            out.write(pf_restore_stats {
                struct_size: size_of::<pf_restore_stats>(),
                pages: s.pages,
                zero_pages: s.zero_pages,
                copied_pages: s.copied_pages,
            });
        }
        Ok(())
    }
}

fn max_guest_bytes(v: u64) -> u64 {
    if v == 0 {
        DEFAULT_MAX_GUEST_BYTES
    } else {
        v
    }
}

/// The caller's fold options, checked.
fn fold_options(o: &pf_fold_options) -> Result<FoldOptions, Error> {
    let layout = match o.layout {
        l if l == pf_fold_layout::PF_FOLD_AUTO as u32 => FoldLayout::Auto,
        l if l == pf_fold_layout::PF_FOLD_CONTENTS as u32 => FoldLayout::Contents,
        l if l == pf_fold_layout::PF_FOLD_IMAGE as u32 => FoldLayout::Image,
        l => {
            return Err(Error::invalid(format!(
                "fold->layout is {l}, not a pf_fold_layout"
            )))
        }
    };
    if o.reserved != 0 {
        return Err(Error::invalid(format!(
            "fold->reserved is {}; it must be 0",
            o.reserved
        )));
    }
    Ok(FoldOptions {
        layout,
        planned_clones: (o.planned_clones != 0).then_some(o.planned_clones),
        max_guest_bytes: max_guest_bytes(o.max_guest_bytes),
    })
}

/// Restores `snap` (with its chain) as a new VM of the dedup host `dedup`,
/// in the domain and with the excluded regions of `vm_options` (NULL:
/// domain 0, nothing excluded), its pages mapping the domain's shared
/// frames from the first moment, copy-on-write: N VMs restored from one
/// snapshot hold each content once, with no copy and no merge pass.
/// `fold` (NULL: the defaults) says how frames are laid out. Stores the
/// VM's id in `*out_vm_id` and a handle to its memory (in the host's frame
/// store, with the snapshot's layout; the host holds it too, as after
/// `pf_dedup_register`) in `*out_mem`, and what it did in `*out_stats`
/// unless that is NULL.
///
/// On an error nothing is registered and the host is as it was.
///
/// Errors: `PF_ERR_NULL_POINTER` (`dedup`, `snap`, `out_vm_id`, `out_mem`,
/// `vm_options->exclude_starts` while `exclude_count > 0`),
/// `PF_ERR_STRUCT_TOO_SMALL`, `PF_ERR_INVALID_ARGUMENT` (unknown layout,
/// nonzero `reserved`, an excluded address that starts no region of the
/// snapshot), `PF_ERR_SNAPSHOT` (a damaged page; a guest over
/// `max_guest_bytes`), `PF_ERR_MISMATCH` (an incremental snapshot opened
/// without its chain), `PF_ERR_USERFAULT`, `PF_ERR_MAP_LIMIT`, `PF_ERR_OS`.
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `snap` is NULL or a live `pf_snapshot` handle.
/// - `vm_options` is NULL or points to a `pf_vm_options` whose
///   `struct_size` bytes are readable, and whose `exclude_starts` is NULL
///   or valid for reads of `exclude_count` `uint64_t`s.
/// - `fold` is NULL or points to a `pf_fold_options` whose `struct_size`
///   bytes are readable.
/// - `out_vm_id` is NULL or valid for a write of one `uint64_t`;
///   `out_mem` is NULL or valid for a write of one pointer.
/// - `out_stats` is NULL or points to a `pf_folded_stats` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_restore_folded(
    dedup: *const pf_dedup,
    snap: *const pf_snapshot,
    vm_options: *const pf_vm_options,
    fold: *const pf_fold_options,
    out_vm_id: *mut u64,
    out_mem: *mut *mut pf_guest_memory,
    out_stats: *mut pf_folded_stats,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { shared_host(dedup) }?;
        // SAFETY: `snap` is NULL or a live handle (contract).
        let snap = unsafe { snapshot(snap, "snap") }?;
        // SAFETY: `vm_options` is NULL or readable, with its exclusions
        // (contract).
        let vm = unsafe { vm_options_arg(vm_options) }?;
        let fold = if fold.is_null() {
            FoldOptions::default()
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable (contract).
            fold_options(&unsafe { args::read_sized(fold, "fold") }?)?
        };
        // SAFETY: `out_vm_id` is NULL or writable (contract).
        let out_vm_id = unsafe { args::out(out_vm_id, "out_vm_id") }?;
        // SAFETY: `out_mem` is NULL or writable for a pointer (contract).
        let out_mem = unsafe { args::out(out_mem, "out_mem") }?;
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read
        // and write (contract).
        let out_stats = unsafe { optional_out(out_stats, "out_stats") }?;
        let r = restore_folded_with(&host, vm, snap, &fold)?;
        if let Some(out) = out_stats {
            let s = r.stats;
            out.write(pf_folded_stats {
                struct_size: size_of::<pf_folded_stats>(),
                pages: s.pages,
                zero_pages: s.zero_pages,
                shared_pages: s.shared_pages,
                copied_pages: s.copied_pages,
                contents: s.contents,
                contents_found: s.contents_found,
                contents_read: s.contents_read,
                remaps: s.remaps,
                image: u32::from(s.image),
                reserved: 0,
            });
        }
        out_vm_id.write(r.vm.0);
        out_mem.write(Box::into_raw(Box::new(pf_guest_memory { mem: r.memory })));
        Ok(())
    }
}

/// The VM options of a restore into a dedup host; the excluded addresses
/// are checked against the snapshot's layout by the restore.
///
/// # Safety
///
/// As `read_vm_options`.
unsafe fn vm_options_arg(options: *const pf_vm_options) -> Result<VmOptions, Error> {
    // SAFETY: forwarded from this function's contract.
    let (domain, exclude) = unsafe { read_vm_options(options) }?;
    Ok(VmOptions {
        domain,
        exclude: exclude.into_iter().map(GuestPhysAddr).collect(),
    })
}

/// The caller's lazy options (NULL: the defaults), and the size limit.
///
/// # Safety
///
/// `options` is NULL or points to a `pf_lazy_options` whose `struct_size`
/// bytes are readable, and whose `working_set` is NULL or a NUL-terminated
/// string.
unsafe fn lazy_options(options: *const pf_lazy_options) -> Result<(LazyOptions, u64), Error> {
    let o = if options.is_null() {
        pf_lazy_options::default()
    } else {
        // SAFETY: not NULL; `struct_size` bytes readable (contract).
        unsafe { args::read_sized(options, "options") }?
    };
    let working_set = if o.working_set.is_null() {
        None
    } else {
        // SAFETY: not NULL; a C string (contract).
        Some(unsafe { path_arg(o.working_set, "options->working_set") }?)
    };
    Ok((
        LazyOptions {
            working_set,
            record_pages: usize::try_from(o.record_pages).unwrap_or(usize::MAX),
            on_fetch: None,
            fetch_delay: Duration::from_micros(o.fetch_delay_us),
        },
        max_guest_bytes(o.max_guest_bytes),
    ))
}

/// Starts restoring `snap` (with its chain) into `mem` lazily and returns
/// at once: the guest may run. `mem` must be fresh (no page written) 4 KiB
/// memfd memory of the snapshot's layout, registered with no dedup host or
/// raw-write tracker. Every first touch of a page (a vCPU through KVM, a
/// device, `pf_guest_memory_read`) waits in the kernel until the page is
/// placed from the snapshot, while a background thread fetches the rest
/// (the working set of `options` first). Stores the restore's handle in
/// `*out_restore`: poll it with `pf_lazy_restore_pages_done`, end it with
/// `pf_lazy_restore_wait`. A damaged page is never shown to the guest: it
/// is poisoned (the toucher gets SIGBUS, or an error from `KVM_RUN`) and
/// the wait reports it.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`,
/// `PF_ERR_INVALID_ARGUMENT` (the memory is registered with a dedup host or
/// tracker, or was written; an empty working-set path), `PF_ERR_MISMATCH`
/// (another layout; an incremental snapshot opened without its chain),
/// `PF_ERR_UNSUPPORTED` (hugetlb or anonymous memory), `PF_ERR_USERFAULT`
/// (no userfaultfd with missing faults on shmem, or no privilege for it),
/// `PF_ERR_SNAPSHOT` (a damaged working-set file), `PF_ERR_OS`.
///
/// # Safety
///
/// - `snap` is NULL or a live `pf_snapshot` handle.
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `options` is NULL or points to a `pf_lazy_options` whose `struct_size`
///   bytes are readable, and whose `working_set` is NULL or a
///   NUL-terminated string.
/// - `out_restore` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_restore_lazy(
    snap: *const pf_snapshot,
    mem: *const pf_guest_memory,
    options: *const pf_lazy_options,
    out_restore: *mut *mut pf_lazy_restore,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `snap` is NULL or a live handle (contract).
        let snap = unsafe { snapshot(snap, "snap") }?;
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: `options` is NULL or readable, its path a C string
        // (contract).
        let (opts, _) = unsafe { lazy_options(options) }?;
        // SAFETY: `out_restore` is NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_restore, "out_restore") }?;
        let lazy = restore_lazy(Arc::clone(snap), mem, opts)?;
        out.write(Box::into_raw(Box::new(pf_lazy_restore { lazy })));
        Ok(())
    }
}

/// Stores in `*out_pages` the pages present (or counted, for zero pages)
/// so far; the restore is complete when it reaches `pf_snapshot_get_info`'s
/// `pages`.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// - `restore` is NULL or a live `pf_lazy_restore` handle, not released
///   during the call.
/// - `out_pages` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_lazy_restore_pages_done(
    restore: *const pf_lazy_restore,
    out_pages: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or a live handle (contract).
        let r = unsafe { args::handle(restore, "restore") }?;
        // SAFETY: `out_pages` is NULL or writable (contract).
        let out = unsafe { args::out(out_pages, "out_pages") }?;
        out.write(r.lazy.pages_done());
        Ok(())
    }
}

/// Waits until every page is present, unregisters the memory, writes the
/// working-set file (if asked), stores what was done in `*out_stats`
/// unless that is NULL (set its `struct_size` first), and releases the
/// restore, whatever the wait returns. An error (a damaged page, poisoned)
/// means the memory must be discarded. An invalid `restore` or
/// `out_stats` is refused before anything happens (the restore is then
/// not released).
///
/// Errors: `PF_ERR_NULL_POINTER` (`restore`), `PF_ERR_STRUCT_TOO_SMALL`
/// (`out_stats`), `PF_ERR_SNAPSHOT` (a damaged page; the working-set file
/// cannot be written), `PF_ERR_MISMATCH` (a page in an ancestor not
/// opened), `PF_ERR_USERFAULT`, `PF_ERR_PANIC` (a thread of the restore
/// panicked), `PF_ERR_OS`.
///
/// # Safety
///
/// - `restore` is NULL or a `pf_lazy_restore` handle that has not been
///   released, and no other call uses it during or after this one (unless
///   it fails with `PF_ERR_NULL_POINTER` or `PF_ERR_STRUCT_TOO_SMALL`).
/// - `out_stats` is NULL or points to a `pf_lazy_stats` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_lazy_restore_wait(
    restore: *mut pf_lazy_restore,
    out_stats: *mut pf_lazy_stats,
) -> pf_status {
    ffi_boundary! {
        if restore.is_null() {
            return Err(Error::null("restore"));
        }
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read
        // and write (contract).
        let out = unsafe { optional_out(out_stats, "out_stats") }?;
        // SAFETY: from `Box::into_raw` in `pf_snapshot_restore_lazy`, not
        // released, not used again (contract).
        let handle = unsafe { Box::from_raw(restore) };
        let stats = handle.lazy.wait()?;
        if let Some(out) = out {
            out.write(stats.into());
        }
        Ok(())
    }
}

/// Releases a restore without waiting: stops its threads and unregisters
/// the memory, whose pages not yet fetched read as zeros from then on:
/// discard it. NULL is allowed and does nothing.
///
/// # Safety
///
/// `restore` is NULL or a `pf_lazy_restore` handle that has not been
/// released, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_lazy_restore_free(restore: *mut pf_lazy_restore) {
    ffi_boundary! { returns ();
        if !restore.is_null() {
            // SAFETY: from `Box::into_raw` in `pf_snapshot_restore_lazy`,
            // not released, not used again (contract).
            drop(unsafe { Box::from_raw(restore) });
        }
    }
}

/// Restores `snap` (with its chain) lazily as a new VM of the dedup host
/// `dedup`, in the domain and with the excluded regions of `vm_options`
/// (NULL: domain 0, nothing excluded), and returns once its memory is
/// mapped, before a page is read: the guest may run. Each region maps
/// (copy-on-write) an image of the snapshot in the host's frames that is
/// filled as pages arrive, on first touch or by the background fetch, so
/// N clones restored from one snapshot share every page from the moment
/// it arrives, and a page arrives once for all of them; once a clone has
/// arrived, later ones are restored folded at once. Stores the VM's id in
/// `*out_vm_id`, a handle to its memory in `*out_mem` (as
/// `pf_snapshot_restore_folded`) and the restore's in `*out_restore`.
///
/// Until `pf_lazy_folded_restore_wait` returns, the VM is arriving: no
/// merge pass scans it, and unregistering or unmerging it fails with
/// `PF_ERR_BUSY`. On an error nothing is registered and the host is as it
/// was.
///
/// Errors: as `pf_snapshot_restore_folded` and `pf_snapshot_restore_lazy`
/// (`max_guest_bytes` of `options` is the size limit).
///
/// # Safety
///
/// - `dedup` is NULL or a live `pf_dedup` handle.
/// - `snap` is NULL or a live `pf_snapshot` handle.
/// - `vm_options` as for `pf_snapshot_restore_folded`.
/// - `options` as for `pf_snapshot_restore_lazy`.
/// - `out_vm_id` is NULL or valid for a write of one `uint64_t`;
///   `out_mem` and `out_restore` are NULL or valid for a write of one
///   pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_snapshot_restore_folded_lazy(
    dedup: *const pf_dedup,
    snap: *const pf_snapshot,
    vm_options: *const pf_vm_options,
    options: *const pf_lazy_options,
    out_vm_id: *mut u64,
    out_mem: *mut *mut pf_guest_memory,
    out_restore: *mut *mut pf_lazy_folded_restore,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `dedup` is NULL or a live handle (contract).
        let host = unsafe { shared_host(dedup) }?;
        // SAFETY: `snap` is NULL or a live handle (contract).
        let snap = unsafe { snapshot(snap, "snap") }?;
        // SAFETY: `vm_options` is NULL or readable, with its exclusions
        // (contract).
        let vm = unsafe { vm_options_arg(vm_options) }?;
        // SAFETY: `options` is NULL or readable, its path a C string
        // (contract).
        let (lazy, max) = unsafe { lazy_options(options) }?;
        // SAFETY: `out_vm_id` is NULL or writable (contract).
        let out_vm_id = unsafe { args::out(out_vm_id, "out_vm_id") }?;
        // SAFETY: `out_mem` is NULL or writable for a pointer (contract).
        let out_mem = unsafe { args::out(out_mem, "out_mem") }?;
        // SAFETY: `out_restore` is NULL or writable for a pointer (contract).
        let out_restore = unsafe { args::out(out_restore, "out_restore") }?;
        let fold = LazyFoldOptions { lazy, max_guest_bytes: max };
        let restore = restore_folded_lazy(&host, vm, Arc::clone(snap), fold)?;
        out_vm_id.write(restore.vm.0);
        let mem = Arc::clone(&restore.memory);
        out_mem.write(Box::into_raw(Box::new(pf_guest_memory { mem })));
        out_restore.write(Box::into_raw(Box::new(pf_lazy_folded_restore {
            restore,
            _host: host,
        })));
        Ok(())
    }
}

/// As `pf_lazy_restore_pages_done`, for a restore folded on arrival.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// - `restore` is NULL or a live `pf_lazy_folded_restore` handle, not
///   released during the call.
/// - `out_pages` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_lazy_folded_restore_pages_done(
    restore: *const pf_lazy_folded_restore,
    out_pages: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or a live handle (contract).
        let r = unsafe { args::handle(restore, "restore") }?;
        // SAFETY: `out_pages` is NULL or writable (contract).
        let out = unsafe { args::out(out_pages, "out_pages") }?;
        out.write(r.restore.pages_done());
        Ok(())
    }
}

/// Waits until every page is there, stores what was done in `*out_stats`
/// unless that is NULL, and releases the restore, whatever the wait
/// returns. On success the VM is an ordinary VM of its host (its image the
/// domain's shared frames, found by later restores and merges). On an
/// error (a damaged page, poisoned in the clone) the VM is taken out of
/// the host and its pages discarded: its memory must not run on (free its
/// handle). An invalid `restore` or `out_stats` is refused before anything
/// happens (the restore is then not released).
///
/// Errors: as `pf_lazy_restore_wait`.
///
/// # Safety
///
/// - `restore` is NULL or a `pf_lazy_folded_restore` handle that has not
///   been released, and no other call uses it during or after this one
///   (unless it fails with `PF_ERR_NULL_POINTER` or
///   `PF_ERR_STRUCT_TOO_SMALL`).
/// - `out_stats` is NULL or points to a `pf_lazy_stats` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_lazy_folded_restore_wait(
    restore: *mut pf_lazy_folded_restore,
    out_stats: *mut pf_lazy_stats,
) -> pf_status {
    ffi_boundary! {
        if restore.is_null() {
            return Err(Error::null("restore"));
        }
        // SAFETY: `out_stats` is NULL or `struct_size` bytes we may read
        // and write (contract).
        let out = unsafe { optional_out(out_stats, "out_stats") }?;
        // SAFETY: from `Box::into_raw` in `pf_snapshot_restore_folded_lazy`,
        // not released, not used again (contract).
        let handle = unsafe { Box::from_raw(restore) };
        let stats = handle.restore.wait()?;
        if let Some(out) = out {
            out.write(stats.into());
        }
        Ok(())
    }
}

/// Releases a restore folded on arrival without waiting: stops it and has
/// the host discard the VM (it is unregistered; its memory must not run
/// on: free its handle). NULL is allowed and does nothing.
///
/// # Safety
///
/// `restore` is NULL or a `pf_lazy_folded_restore` handle that has not
/// been released, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_lazy_folded_restore_free(restore: *mut pf_lazy_folded_restore) {
    ffi_boundary! { returns ();
        if !restore.is_null() {
            // SAFETY: from `Box::into_raw` in
            // `pf_snapshot_restore_folded_lazy`, not released, not used
            // again (contract).
            let handle = unsafe { Box::from_raw(restore) };
            // Dropped before its wait, a restore takes its VM out of the
            // host and discards its pages (whether its image was arriving
            // or whole).
            drop(*handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io, os::unix::ffi::OsStrExt as _};

    use pagefold::{
        snapshot::{Part, Place, Problem, SnapshotId},
        userfault::UserfaultError,
        AccessError, DedupError, LayoutError, MemoryError, PageSize, VmId,
    };

    use super::*;

    fn at(part: Part) -> Place {
        Place { part, offset: 4096 }
    }

    #[test]
    fn snapshot_errors_map_to_their_codes() {
        let io = || io::Error::from_raw_os_error(libc::ENOENT);
        let cases: Vec<(SnapshotError, pf_status)> = vec![
            (
                SnapshotError::File {
                    op: "open",
                    path: "/nonexistent/snap".into(),
                    source: io(),
                },
                pf_status::PF_ERR_OS,
            ),
            (
                SnapshotError::Io {
                    at: at(Part::Content),
                    source: io(),
                },
                pf_status::PF_ERR_OS,
            ),
            (
                SnapshotError::Truncated {
                    at: at(Part::Map),
                    file_len: 10,
                },
                pf_status::PF_ERR_SNAPSHOT,
            ),
            (
                SnapshotError::BadMagic {
                    at: at(Part::Header),
                    found: *b"garbage!",
                },
                pf_status::PF_ERR_SNAPSHOT,
            ),
            (
                SnapshotError::UnsupportedVersion {
                    at: at(Part::Header),
                    found: 9,
                    supported: 1,
                },
                pf_status::PF_ERR_SNAPSHOT,
            ),
            (
                SnapshotError::Checksum {
                    at: at(Part::Table),
                    found: 1,
                    computed: 2,
                },
                pf_status::PF_ERR_SNAPSHOT,
            ),
            (
                SnapshotError::ContentHash {
                    at: at(Part::Content),
                    slot: 3,
                },
                pf_status::PF_ERR_SNAPSHOT,
            ),
            (
                SnapshotError::Malformed {
                    at: at(Part::Map),
                    problem: Problem::EmptyRun,
                },
                pf_status::PF_ERR_SNAPSHOT,
            ),
            (
                SnapshotError::IdMismatch {
                    at: at(Part::Header),
                },
                pf_status::PF_ERR_SNAPSHOT,
            ),
            (
                SnapshotError::TooLarge { bytes: 2, max: 1 },
                pf_status::PF_ERR_SNAPSHOT,
            ),
            (
                SnapshotError::OverwritesAncestor {
                    path: "p".into(),
                    depth: 1,
                },
                pf_status::PF_ERR_INVALID_ARGUMENT,
            ),
            (
                SnapshotError::NotIncremental {
                    id: SnapshotId([1; 32]),
                },
                pf_status::PF_ERR_MISMATCH,
            ),
            (
                SnapshotError::WrongParent {
                    expected: SnapshotId([1; 32]),
                    found: SnapshotId([2; 32]),
                },
                pf_status::PF_ERR_MISMATCH,
            ),
            (
                SnapshotError::ParentMissing {
                    gpa: GuestPhysAddr(0),
                    parent: SnapshotId([1; 32]),
                },
                pf_status::PF_ERR_MISMATCH,
            ),
            (
                SnapshotError::LayoutMismatch {
                    what: "two regions, one".into(),
                },
                pf_status::PF_ERR_MISMATCH,
            ),
            (
                SnapshotError::PageNotInLayout {
                    gpa: GuestPhysAddr(1 << 40),
                },
                pf_status::PF_ERR_UNMAPPED,
            ),
            (
                SnapshotError::NotTracking { region: 1 },
                pf_status::PF_ERR_INVALID_ARGUMENT,
            ),
            (SnapshotError::LogInUse, pf_status::PF_ERR_BUSY),
            (
                SnapshotError::DirtyRun {
                    gpa: GuestPhysAddr(1 << 40),
                    pages: 1,
                },
                pf_status::PF_ERR_INVALID_ARGUMENT,
            ),
            (
                SnapshotError::Access(AccessError::Unmapped {
                    addr: GuestPhysAddr(1 << 40),
                }),
                pf_status::PF_ERR_UNMAPPED,
            ),
            (
                SnapshotError::Memory(MemoryError::Layout(LayoutError::NoRegions)),
                pf_status::PF_ERR_LAYOUT,
            ),
            (
                SnapshotError::Dedup(DedupError::HugeBacking(PageSize::Size2M)),
                pf_status::PF_ERR_UNSUPPORTED,
            ),
            (
                SnapshotError::Dedup(DedupError::Arriving(VmId(3))),
                pf_status::PF_ERR_BUSY,
            ),
        ];
        for (e, want) in cases {
            let e = Error::from(e);
            assert_eq!(e.status, want, "{}", e.message);
            assert!(!e.message.is_empty());
        }
        // An error in one file of a chain: the inner error's status, the
        // file named in the message.
        let e = Error::from(SnapshotError::InFile {
            path: "/snaps/child".into(),
            source: Box::new(SnapshotError::Checksum {
                at: at(Part::Table),
                found: 1,
                computed: 2,
            }),
        });
        assert_eq!(e.status, pf_status::PF_ERR_SNAPSHOT);
        assert!(
            e.message.starts_with("/snaps/child: the content table"),
            "{}",
            e.message
        );
    }

    #[test]
    fn lazy_errors_map_to_their_codes() {
        let cases: Vec<(LazyError, pf_status)> = vec![
            (
                SnapshotError::LayoutMismatch { what: "x".into() }.into(),
                pf_status::PF_ERR_MISMATCH,
            ),
            (
                UserfaultError::Unavailable(io::Error::from_raw_os_error(libc::EPERM)).into(),
                pf_status::PF_ERR_USERFAULT,
            ),
            (LazyError::Claimed, pf_status::PF_ERR_INVALID_ARGUMENT),
            (
                LazyError::NotFresh {
                    gpa: GuestPhysAddr(0x1000),
                },
                pf_status::PF_ERR_INVALID_ARGUMENT,
            ),
            (LazyError::NotMemfd, pf_status::PF_ERR_UNSUPPORTED),
            (
                LazyError::HugePages {
                    granule: PageSize::Size2M,
                },
                pf_status::PF_ERR_UNSUPPORTED,
            ),
            (
                LazyError::WorkingSet {
                    path: "ws".into(),
                    what: "bad magic".into(),
                },
                pf_status::PF_ERR_SNAPSHOT,
            ),
            (LazyError::Panicked("fetch"), pf_status::PF_ERR_PANIC),
            (
                LazyError::Thread("fetch", io::Error::from_raw_os_error(libc::EAGAIN)),
                pf_status::PF_ERR_OS,
            ),
        ];
        for (e, want) in cases {
            let e = Error::from(e);
            assert_eq!(e.status, want, "{}", e.message);
            assert!(!e.message.is_empty());
        }
    }

    /// The last error message of this thread, through the export.
    fn message() -> String {
        let mut buf = [0 as c_char; 512];
        let mut needed = 0;
        // SAFETY: `buf` is valid for its length; `needed` is writable.
        unsafe { crate::boundary::pf_last_error_message(buf.as_mut_ptr(), buf.len(), &mut needed) };
        // SAFETY: the call above wrote a NUL-terminated string into `buf`.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    fn c_path(p: &std::path::Path) -> std::ffi::CString {
        std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
    }

    #[test]
    fn save_open_restore_and_refusals_through_the_exports() {
        use crate::memory::{
            pf_guest_memory_free, pf_guest_memory_new, pf_guest_memory_read, pf_guest_memory_write,
        };
        let dir = std::env::temp_dir().join(format!("pf-ffi-snapshot-{}", std::process::id()));
        assert!(std::fs::create_dir_all(&dir).is_ok());
        let file = c_path(&dir.join("snap"));
        let region = pf_region {
            guest_start: 0,
            size: 16 << 12,
        };
        let (mut mem, mut copy) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: one region, default options, valid out-pointers.
        unsafe {
            assert_eq!(
                pf_guest_memory_new(&region, 1, std::ptr::null(), &mut mem),
                pf_status::PF_OK
            );
            assert_eq!(
                pf_guest_memory_new(&region, 1, std::ptr::null(), &mut copy),
                pf_status::PF_OK
            );
        }
        let page = [0xa5u8; 4096];
        // SAFETY: a live handle and a 4096-byte buffer.
        let s = unsafe { pf_guest_memory_write(mem, 3 << 12, page.as_ptr().cast(), page.len()) };
        assert_eq!(s, pf_status::PF_OK);
        let device = *b"device";
        let options = pf_save_options {
            flags: PF_SAVE_DEVICE_STATE,
            device_state: device.as_ptr(),
            device_state_len: device.len(),
            ..pf_save_options::default()
        };
        let mut stats = pf_save_stats {
            struct_size: size_of::<pf_save_stats>(),
            ..Default::default()
        };
        // SAFETY: live handle, C string, options and stats valid for the call.
        let s = unsafe { pf_snapshot_save(mem, file.as_ptr(), &options, &mut stats) };
        assert_eq!(s, pf_status::PF_OK, "{}", message());
        assert_eq!(
            (stats.pages, stats.zero_pages, stats.stored_pages),
            (16, 15, 1)
        );

        let mut snap = std::ptr::null_mut();
        // SAFETY: C string, valid out-pointer.
        let s = unsafe { pf_snapshot_open(file.as_ptr(), &mut snap) };
        assert_eq!(s, pf_status::PF_OK, "{}", message());
        let mut info = pf_snapshot_info {
            struct_size: size_of::<pf_snapshot_info>(),
            ..Default::default()
        };
        // SAFETY: live handle, valid out-struct.
        let s = unsafe { pf_snapshot_get_info(snap, &mut info) };
        assert_eq!(s, pf_status::PF_OK);
        assert_eq!(info.id, stats.id);
        assert_eq!(
            (info.pages, info.device_state_len, info.flags),
            (16, 6, PF_SNAPSHOT_DEVICE_STATE)
        );
        // SAFETY: live handles, no out-struct.
        let s = unsafe { pf_snapshot_restore_into(snap, copy, std::ptr::null_mut()) };
        assert_eq!(s, pf_status::PF_OK, "{}", message());
        let mut got = [0u8; 4096];
        // SAFETY: a live handle and a 4096-byte buffer.
        let s = unsafe { pf_guest_memory_read(copy, 3 << 12, got.as_mut_ptr().cast(), got.len()) };
        assert_eq!(s, pf_status::PF_OK);
        assert_eq!(got, page);

        // A damaged table: its checksum fails, and the message says where.
        let bytes = std::fs::read(dir.join("snap")).unwrap_or_default();
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 40] ^= 1;
        assert!(std::fs::write(dir.join("bad"), &bad).is_ok());
        let mut other = std::ptr::null_mut();
        // SAFETY: C string, valid out-pointer.
        let s = unsafe { pf_snapshot_open(c_path(&dir.join("bad")).as_ptr(), &mut other) };
        assert_eq!(s, pf_status::PF_ERR_SNAPSHOT);
        assert!(other.is_null());
        assert!(message().contains("corrupt"), "{}", message());
        // A missing file.
        // SAFETY: as above.
        let s = unsafe { pf_snapshot_open(c_path(&dir.join("missing")).as_ptr(), &mut other) };
        assert_eq!(s, pf_status::PF_ERR_OS);
        assert!(message().contains("No such file"), "{}", message());
        // NULL everywhere.
        // SAFETY: NULL arguments are checked, never dereferenced.
        unsafe {
            assert_eq!(
                pf_snapshot_open(std::ptr::null(), &mut other),
                pf_status::PF_ERR_NULL_POINTER
            );
            assert_eq!(
                pf_snapshot_restore_into(std::ptr::null(), copy, std::ptr::null_mut()),
                pf_status::PF_ERR_NULL_POINTER
            );
            assert_eq!(
                pf_lazy_restore_wait(std::ptr::null_mut(), std::ptr::null_mut()),
                pf_status::PF_ERR_NULL_POINTER
            );
        }
        assert_eq!(message(), "argument `restore` is NULL");

        // SAFETY: the handles from above, each freed once, not used again.
        unsafe {
            pf_snapshot_free(snap);
            pf_guest_memory_free(mem);
            pf_guest_memory_free(copy);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn zero_options_mean_the_defaults() {
        let f = fold_options(&pf_fold_options {
            struct_size: size_of::<pf_fold_options>(),
            ..pf_fold_options::default()
        })
        .ok();
        assert_eq!(f, Some(FoldOptions::default()));
        let bad = pf_fold_options {
            layout: 3,
            ..pf_fold_options::default()
        };
        assert_eq!(
            fold_options(&bad).err().map(|e| e.status),
            Some(pf_status::PF_ERR_INVALID_ARGUMENT)
        );
        assert_eq!(PF_SNAPSHOT_MAX_DEVICE_STATE, MAX_DEVICE_STATE);
        // SAFETY: NULL options are the defaults; nothing is dereferenced.
        let (o, device) = unsafe { save_options(std::ptr::null()) }.ok().unzip();
        assert_eq!(
            o.map(|o| o.track_dirty),
            Some(SaveOptions::default().track_dirty)
        );
        assert_eq!(device, Some(None));
        // SAFETY: as above.
        let (o, max) = unsafe { lazy_options(std::ptr::null()) }.ok().unzip();
        assert_eq!(max, Some(DEFAULT_MAX_GUEST_BYTES));
        assert_eq!(o.map(|o| (o.working_set, o.record_pages)), Some((None, 0)));
    }
}
