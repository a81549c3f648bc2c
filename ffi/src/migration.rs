//! Live migration over a file descriptor: the pre-copy sender as a handle
//! (`pf_migration_sender`: start, iterate while the guest runs, finish with
//! the vCPUs paused, cancel from any thread) and the receiver
//! (`pf_migration_receive`), which builds new guest memory from a stream.
//!
//! The file descriptors are borrowed: pagefold reads or writes them during
//! the calls that take them (and, for a sender, until it is finished or
//! freed) and never closes them.

// The types carry their C names, so the header and the Rust agree.
#![allow(non_camel_case_types)]

use std::{
    ffi::{c_int, c_void},
    fs::File,
    io::{self, Read, Write},
    mem::{size_of, ManuallyDrop},
    os::fd::FromRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, TryLockError,
    },
    time::Duration,
};

use pagefold::{
    migration::{
        receive_migration, MigrationError, PrecopyOptions, Progress, ReaderLimits, Sender, Summary,
    },
    GuestMemory, StreamError,
};

use crate::{
    args::{self, SizePrefixed},
    memory::{memory, pf_guest_memory},
    status::{access_status, memory_status, pf_status, Error},
};

/// `pf_migration_options.flags`: leave the whole-memory digest out of the
/// end marker (by default it is sent and the receiver checks it, at the
/// cost of one read of memory on each side during the downtime).
pub const PF_MIGRATION_NO_VERIFY: u32 = 1 << 0;
const PF_MIGRATION_KNOWN_FLAGS: u32 = PF_MIGRATION_NO_VERIFY;

/// How a pre-copy migration runs. Size-prefixed: set `struct_size` to
/// `sizeof(pf_migration_options)`. Zero fields mean the defaults, so
/// `pf_migration_options o = { .struct_size = sizeof o };` is a valid start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_migration_options {
    /// `sizeof(pf_migration_options)` as the caller was compiled with.
    pub struct_size: usize,
    /// `pf_migration_sender_iterate` returns once the dirty pages left
    /// would take at most this many milliseconds to send at the measured
    /// bandwidth (the time the vCPUs stay paused). 0: 300 ms.
    pub downtime_budget_ms: u64,
    /// Most bytes per second written to the file descriptor; 0: no cap.
    pub bandwidth_limit: u64,
    /// `pf_migration_sender_iterate` returns after this many rounds (round
    /// 0, the full pass, included) even if the budget is not met. 0: 30.
    pub max_rounds: u32,
    /// `PF_MIGRATION_NO_VERIFY` or 0; other bits are refused with
    /// `PF_ERR_INVALID_ARGUMENT`.
    pub flags: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_migration_options {
    const NAME: &'static str = "pf_migration_options";
}

/// What the progress callback is told after each round of
/// `pf_migration_sender_iterate`. `struct_size` is the bytes this library
/// filled in; fields past what a caller knows are ignored by it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct pf_migration_progress {
    /// `sizeof(pf_migration_progress)` of this library.
    pub struct_size: usize,
    /// The round just sent (0: the full pass).
    pub round: u32,
    /// Zero; reserved.
    pub reserved: u32,
    /// Bytes written to the file descriptor so far.
    pub bytes: u64,
    /// Pages sent in that round.
    pub round_pages: u64,
    /// Pages dirtied while that round was sent (what the next one sends).
    pub dirty_pages: u64,
    /// Those pages per second of that round.
    pub dirty_rate: f64,
    /// Measured bandwidth over all rounds, bytes per second.
    pub bandwidth: f64,
    /// Estimated downtime in microseconds if the VMM paused now.
    pub estimated_downtime_us: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers and floats
// only, which are valid for every bit pattern.
unsafe impl SizePrefixed for pf_migration_progress {
    const NAME: &'static str = "pf_migration_progress";
}

/// Called after each round of `pf_migration_sender_iterate`, on the thread
/// that runs it, with a progress report valid during the call and the
/// `user` pointer given to `pf_migration_sender_start`. Return 0 to go on;
/// anything else cancels the migration (`pf_migration_sender_iterate` then
/// returns `PF_ERR_CANCELLED`). It must not unwind (no C++ exception, no
/// longjmp out of it) and must not call into the same sender.
pub type pf_migration_progress_fn = Option<
    unsafe extern "C" fn(progress: *const pf_migration_progress, user: *mut c_void) -> c_int,
>;

/// How a migration went: `pf_migration_sender_finish` fills it in.
/// Size-prefixed: set `struct_size` before the call; the call sets it to the
/// bytes it filled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_migration_summary {
    /// In: `sizeof(pf_migration_summary)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Rounds sent, the last (paused) one included.
    pub rounds: u32,
    /// Zero; reserved.
    pub reserved: u32,
    /// Pages sent in the last round, with the vCPUs paused.
    pub last_round_pages: u64,
    /// Time `pf_migration_sender_finish` took, in microseconds: the
    /// downtime the sender caused.
    pub downtime_us: u64,
    /// Time from `pf_migration_sender_start` to the end, in microseconds.
    pub total_us: u64,
    /// Bytes written to the file descriptor, header included.
    pub bytes: u64,
    /// Chunks written.
    pub chunks: u64,
    /// Pages sent as zero records.
    pub zero_pages: u64,
    /// Pages sent whole.
    pub full_pages: u64,
    /// Pages sent as references to content the receiver already had.
    pub ref_pages: u64,
    /// Pages sent as deltas against their last version.
    pub delta_pages: u64,
    /// Pages not sent because the receiver held them already.
    pub unchanged_pages: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_migration_summary {
    const NAME: &'static str = "pf_migration_summary";
}

/// What `pf_migration_receive` accepts from a stream before it creates any
/// memory. Size-prefixed; zero fields mean the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_migration_limits {
    /// `sizeof(pf_migration_limits)` as the caller was compiled with.
    pub struct_size: usize,
    /// Most guest memory the stream's layout may describe, in bytes (set it
    /// to the VM's size). 0: 64 GiB.
    pub max_guest_bytes: u64,
    /// Most regions the layout may have. 0: 4096.
    pub max_regions: u32,
    /// Zero; reserved.
    pub reserved: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_migration_limits {
    const NAME: &'static str = "pf_migration_limits";
}

/// What `pf_migration_receive` received. Size-prefixed like
/// `pf_migration_summary`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pf_migration_received {
    /// In: `sizeof(pf_migration_received)` as the caller was compiled with.
    /// Out: the bytes this library filled in.
    pub struct_size: usize,
    /// Rounds the stream carried (the last round number plus one).
    pub rounds: u32,
    /// 1 if the sender's whole-memory digest was checked (and matched).
    pub verified: u32,
    /// Bytes read, header included.
    pub bytes: u64,
    /// Chunks read.
    pub chunks: u64,
    /// Pages zeroed.
    pub zero_pages: u64,
    /// Pages received whole.
    pub full_pages: u64,
    /// Pages received as references (shared frames on arrival).
    pub ref_pages: u64,
    /// Pages received as deltas.
    pub delta_pages: u64,
    /// Time from the first byte to the end marker, in microseconds.
    pub elapsed_us: u64,
    /// Time from the last round marker to the end marker, in microseconds
    /// (the receiver's share of the downtime).
    pub last_round_us: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_migration_received {
    const NAME: &'static str = "pf_migration_received";
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn stream_status(e: &StreamError) -> pf_status {
    match e {
        StreamError::Io { .. } | StreamError::Random(_) => pf_status::PF_ERR_OS,
        StreamError::Truncated { .. }
        | StreamError::BadMagic { .. }
        | StreamError::UnsupportedVersion { .. }
        | StreamError::UnsupportedFlags { .. }
        | StreamError::UnsupportedPageSize { .. }
        | StreamError::HeaderChecksum { .. }
        | StreamError::TooManyRegions { .. }
        | StreamError::TooLarge { .. }
        | StreamError::Layout(_)
        | StreamError::ChunkLength { .. }
        | StreamError::ChunkChecksum { .. }
        | StreamError::Malformed { .. }
        | StreamError::UnknownRef { .. }
        | StreamError::UnknownSource { .. }
        | StreamError::ContentMismatch { .. }
        | StreamError::DigestMismatch => pf_status::PF_ERR_STREAM,
        StreamError::Memory(m) => memory_status(m),
        StreamError::Access { source, .. } => access_status(source),
        // The sender gives the writer only pages and rounds of its layout,
        // and drops a writer or reader that failed.
        // The C ABI has no post-copy switchover (the only source of it).
        StreamError::PageNotInLayout { .. }
        | StreamError::StateTooLarge { .. }
        | StreamError::RoundBackwards { .. }
        | StreamError::WriterFailed
        | StreamError::ReaderFailed => pf_status::PF_ERR_INTERNAL,
    }
}

impl From<StreamError> for Error {
    fn from(e: StreamError) -> Self {
        Error::new(stream_status(&e), e.to_string())
    }
}

impl From<MigrationError> for Error {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::Cancelled => Error::new(pf_status::PF_ERR_CANCELLED, e.to_string()),
            MigrationError::Stream(s) => s.into(),
            MigrationError::Access(a) => a.into(),
            MigrationError::Dirty(d) => d.into(),
            MigrationError::DirtySource(_) => Error::new(pf_status::PF_ERR_OS, e.to_string()),
            MigrationError::Failed => Error::invalid(e),
            MigrationError::Busy => Error::new(pf_status::PF_ERR_BUSY, e.to_string()),
        }
    }
}

/// A file descriptor the caller owns, used as a `File` that is never
/// closed: `ManuallyDrop` keeps `File`'s destructor (the `close`) from
/// running, so the descriptor stays the caller's.
#[derive(Debug)]
struct BorrowedFd(ManuallyDrop<File>);

impl BorrowedFd {
    /// Wraps `fd` after checking it is an open descriptor.
    ///
    /// # Safety
    ///
    /// `fd` stays open, and is not closed or reused by anyone else, while
    /// the returned value lives.
    unsafe fn new(fd: c_int) -> Result<Self, Error> {
        // SAFETY: F_GETFD reads the descriptor flags of any integer; an
        // unopened one fails with EBADF.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::invalid(format!(
                "fd {fd} is not an open file descriptor"
            )));
        }
        // `fd` is open (checked) and stays open while `self` lives (caller).
        // `File` would own and close it on drop, but it is wrapped in
        // `ManuallyDrop` and never dropped, so ownership stays with the
        // caller; the `File` only issues read(2)/write(2) on it.
        // SAFETY: as just argued.
        Ok(BorrowedFd(ManuallyDrop::new(unsafe {
            File::from_raw_fd(fd)
        })))
    }
}

impl Write for BorrowedFd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

impl Read for BorrowedFd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

/// The progress callback's `user` pointer, carried to the thread that runs
/// `pf_migration_sender_iterate`.
struct UserPtr(*mut c_void);

// SAFETY: the pointer is only handed back to the caller's callback; the
// caller chose it and is told the callback runs on the iterating thread.
unsafe impl Send for UserPtr {}

/// A pre-copy migration in progress: made by `pf_migration_sender_start`,
/// driven by `pf_migration_sender_iterate`, completed (and released) by
/// `pf_migration_sender_finish`, or released early by
/// `pf_migration_sender_free`. One thread at a time drives it;
/// `pf_migration_sender_cancel` (and a cancel token) may be used from any
/// thread.
pub struct pf_migration_sender {
    /// Raised by `pf_migration_sender_cancel`, a cancel token or the
    /// progress callback; the sender polls it.
    cancel: Arc<AtomicBool>,
    /// The sender, locked by iterate and finish; `None` once it failed.
    /// Declared before `mem`, so dropped before it: it borrows `*mem`.
    sender: Mutex<Option<Sender<'static, BorrowedFd>>>,
    /// Keeps the memory alive, at one address, while `sender` borrows it.
    #[allow(dead_code)] // held, never read
    mem: Arc<GuestMemory>,
}

/// A cancel flag of a sender that outlives it: made by
/// `pf_migration_sender_cancel_token`, released by
/// `pf_migration_cancel_token_free`. Thread-safe.
pub struct pf_migration_cancel_token {
    cancel: Arc<AtomicBool>,
}

fn progress_out(p: &Progress) -> pf_migration_progress {
    pf_migration_progress {
        struct_size: size_of::<pf_migration_progress>(),
        round: p.round,
        reserved: 0,
        bytes: p.bytes,
        round_pages: p.round_pages,
        dirty_pages: p.dirty_pages,
        dirty_rate: p.dirty_rate,
        bandwidth: p.bandwidth,
        estimated_downtime_us: micros(p.estimated_downtime),
    }
}

fn precopy_options(o: &pf_migration_options) -> Result<PrecopyOptions, Error> {
    let unknown = o.flags & !PF_MIGRATION_KNOWN_FLAGS;
    if unknown != 0 {
        return Err(Error::invalid(format!("unknown flags {unknown:#x}")));
    }
    let d = PrecopyOptions::default();
    Ok(PrecopyOptions {
        downtime_budget: if o.downtime_budget_ms == 0 {
            d.downtime_budget
        } else {
            Duration::from_millis(o.downtime_budget_ms)
        },
        max_rounds: if o.max_rounds == 0 {
            d.max_rounds
        } else {
            o.max_rounds
        },
        bandwidth_limit: (o.bandwidth_limit != 0).then_some(o.bandwidth_limit),
        verify: o.flags & PF_MIGRATION_NO_VERIFY == 0,
        stream: d.stream,
    })
}

/// Borrows the sender behind a handle.
///
/// # Safety
///
/// `s` is NULL or a live handle that is not freed during `'a`.
unsafe fn sender<'a>(s: *const pf_migration_sender) -> Result<&'a pf_migration_sender, Error> {
    // SAFETY: forwarded from this function's contract.
    unsafe { args::handle(s, "sender") }
}

/// Starts a pre-copy migration of `mem` to the file descriptor `fd` (a
/// socket, pipe or file open for writing): turns dirty tracking on for every
/// region (what it had logged is dropped: the full pass reads every page)
/// and writes the stream header. Nothing else is sent until
/// `pf_migration_sender_iterate`. `options` NULL means the defaults.
/// `progress` (NULL: none) is called with `user` after each round.
///
/// `fd` is borrowed, never closed: it must stay open until the sender is
/// finished or freed. Writes are plain write(2) calls, blocking or not as
/// the descriptor is (a non-blocking one fails with `PF_ERR_OS` when full);
/// writing to a pipe or socket whose reader is gone raises SIGPIPE unless
/// the process ignores it. Dirty tracking is put back as it was when the
/// sender finishes, fails or is freed. While the sender lives the memory
/// stays alive even if its handle is freed.
///
/// Errors: `PF_ERR_NULL_POINTER` (`mem`, `out_sender`),
/// `PF_ERR_STRUCT_TOO_SMALL` (`options`), `PF_ERR_INVALID_ARGUMENT`
/// (unknown flag, `fd` not open), `PF_ERR_OS` (writing the header),
/// `PF_ERR_BUSY` (another sender of this memory is alive: free it first).
///
/// # Safety
///
/// - `mem` is NULL or a live `pf_guest_memory` handle.
/// - `options` is NULL or points to a `pf_migration_options` whose
///   `struct_size` bytes are readable.
/// - `progress`, if not NULL, is safe to call with a progress report valid
///   during the call and `user`, on whatever thread iterates.
/// - `fd` stays open, and is not closed or reused, until the sender is
///   finished or freed.
/// - `out_sender` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_migration_sender_start(
    mem: *const pf_guest_memory,
    fd: c_int,
    options: *const pf_migration_options,
    progress: pf_migration_progress_fn,
    user: *mut c_void,
    out_sender: *mut *mut pf_migration_sender,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: `mem` is NULL or a live handle (contract).
        let mem = Arc::clone(unsafe { memory(mem) }?);
        // SAFETY: `out_sender` is NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_sender, "out_sender") }?;
        let opts = if options.is_null() {
            PrecopyOptions::default()
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable (contract).
            precopy_options(&unsafe { args::read_sized(options, "options") }?)?
        };
        // SAFETY: `fd` stays open until the sender, which holds this, is
        // finished or freed (contract).
        let fd = unsafe { BorrowedFd::new(fd) }?;
        // The `Arc` in the handle keeps the memory alive at this address for
        // as long as the handle, and the handle drops `sender` before `mem`
        // (field order); no reference leaves the handle, so `'static` is
        // never observed past the memory's life.
        // SAFETY: as just argued.
        let borrowed: &'static GuestMemory = unsafe { &*Arc::as_ptr(&mem) };
        let mut s = Sender::start(borrowed, fd, opts)?;
        let cancel = s.cancel_handle();
        if let Some(callback) = progress {
            let flag = Arc::clone(&cancel);
            let user = UserPtr(user);
            s.on_progress(move |p| {
                let c = progress_out(p);
                let user = &user;
                // SAFETY: the callback is callable with a report valid for
                // the call and `user`, on this thread (contract).
                if unsafe { callback(&c, user.0) } != 0 {
                    flag.store(true, Ordering::Relaxed);
                }
            });
        }
        out.write(Box::into_raw(Box::new(pf_migration_sender {
            cancel,
            sender: Mutex::new(Some(s)),
            mem,
        })));
        Ok(())
    }
}

/// Locks the sender for iterate or finish: `PF_ERR_BUSY` if another thread
/// is in one of them.
fn lock(
    s: &pf_migration_sender,
) -> Result<std::sync::MutexGuard<'_, Option<Sender<'static, BorrowedFd>>>, Error> {
    match s.sender.try_lock() {
        Ok(g) => Ok(g),
        // A call that panicked: the caller was told to free the handle
        // only; the sender itself refuses further use after a failure.
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(TryLockError::WouldBlock) => Err(Error::new(
            pf_status::PF_ERR_BUSY,
            "another thread is iterating or finishing this sender",
        )),
    }
}

fn spent() -> Error {
    Error::invalid("this migration already failed or was cancelled; free it and start a new one")
}

/// Sends round 0 (every page that is not zero) if not yet sent, then rounds
/// of the pages dirtied meanwhile, until the estimated downtime fits the
/// budget or the round limit is reached; calls the progress callback after
/// each round. Returns when the VMM should pause its vCPUs and call
/// `pf_migration_sender_finish`; may be called again instead (e.g. when the
/// VMM cannot pause yet). `*out_progress` (NULL allowed; set its
/// `struct_size` first) receives the last round's report.
///
/// After an error or a cancel the sender is spent: it has put dirty tracking
/// back and refuses further use (`PF_ERR_INVALID_ARGUMENT`); free it and
/// start a new migration (a new stream) to retry.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`
/// (`out_progress`), `PF_ERR_CANCELLED` (`pf_migration_sender_cancel`, a
/// cancel token or the callback), `PF_ERR_OS` (writing to the descriptor),
/// `PF_ERR_BUSY` (another thread is iterating or finishing it),
/// `PF_ERR_INVALID_ARGUMENT` (spent); also, rarely, the status of a failed
/// guest-memory read (as `pf_guest_memory_read` reports it), of the dirty
/// tracking (as `pf_guest_memory_harvest_dirty` reports it), or
/// `PF_ERR_INTERNAL` (the stream's writer failed).
///
/// # Safety
///
/// - `sender` is NULL or a live `pf_migration_sender` handle.
/// - `out_progress` is NULL or points to a `pf_migration_progress` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_migration_sender_iterate(
    sender: *const pf_migration_sender,
    out_progress: *mut pf_migration_progress,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or a live handle (contract).
        let s = unsafe { self::sender(sender) }?;
        let out = if out_progress.is_null() {
            None
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable and writable
            // (contract).
            Some(unsafe { args::sized_out(out_progress, "out_progress") }?)
        };
        let mut guard = lock(s)?;
        let m = guard.as_mut().ok_or_else(spent)?;
        let r = m.iterate();
        // A callback that asked to cancel in the round that converged:
        // honour it now rather than at finish.
        let r = match r {
            Ok(_) if s.cancel.load(Ordering::Relaxed) => Err(MigrationError::Cancelled),
            r => r,
        };
        match r {
            Ok(p) => {
                if let Some(out) = out {
                    out.write(progress_out(&p));
                }
                Ok(())
            }
            Err(e) => {
                // Spent: drop it now, which puts dirty tracking back.
                *guard = None;
                Err(e.into())
            }
        }
    }
}

/// With the vCPUs paused: sends the last round (every page dirtied since the
/// last round), the end marker (with the memory digest unless
/// `PF_MIGRATION_NO_VERIFY`), puts dirty tracking back as it was and
/// releases the sender, whatever the call returns (unless `sender` is
/// NULL). `*out_summary` (NULL allowed; set its `struct_size` first)
/// receives how the migration went. The descriptor is not closed.
///
/// Errors: `PF_ERR_STRUCT_TOO_SMALL` (`out_summary`; the sender is released
/// all the same), `PF_ERR_CANCELLED`, `PF_ERR_OS`, `PF_ERR_BUSY` (another
/// thread is iterating: then the sender is not released),
/// `PF_ERR_INVALID_ARGUMENT` (spent).
///
/// # Safety
///
/// - `sender` is NULL or a `pf_migration_sender` handle that has not been
///   released, and no other call uses it after this one (a cancel from
///   another thread must have returned before this call starts).
/// - `out_summary` is NULL or points to a `pf_migration_summary` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_migration_sender_finish(
    sender: *mut pf_migration_sender,
    out_summary: *mut pf_migration_summary,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or a live handle (contract).
        let s = unsafe { self::sender(sender) }?;
        let taken = lock(s)?.take();
        // SAFETY: `sender` came from `Box::into_raw` in
        // `pf_migration_sender_start`, was not released, and nothing uses it
        // after this call (contract); the lock above was released.
        let handle = unsafe { Box::from_raw(sender) };
        // The handle holds the memory the sender borrows (the caller may
        // have freed its own memory handle): it is dropped only after the
        // sender is, on every path (a review found `finish` running on
        // freed memory when the handle went first).
        // SAFETY: `out_summary` is NULL or valid (contract).
        let r = unsafe { finish_sender(taken, out_summary) };
        drop(handle);
        r
    }
}

/// The body of `pf_migration_sender_finish` once the sender is out of its
/// handle: consumes (and drops) the sender before returning.
///
/// # Safety
///
/// `out_summary` is NULL or points to a `pf_migration_summary` whose
/// `struct_size` bytes are readable and writable.
unsafe fn finish_sender(
    taken: Option<Sender<'static, BorrowedFd>>,
    out_summary: *mut pf_migration_summary,
) -> Result<(), Error> {
    {
        let out = if out_summary.is_null() {
            None
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable and writable
            // (contract).
            Some(unsafe { args::sized_out(out_summary, "out_summary") }?)
        };
        let (_, sum): (BorrowedFd, Summary) = taken.ok_or_else(spent)?.finish()?;
        if let Some(out) = out {
            out.write(pf_migration_summary {
                struct_size: size_of::<pf_migration_summary>(),
                rounds: sum.rounds,
                reserved: 0,
                last_round_pages: sum.last_round_pages,
                downtime_us: micros(sum.downtime),
                total_us: micros(sum.total),
                bytes: sum.stream.bytes,
                chunks: sum.stream.chunks,
                zero_pages: sum.stream.zero_pages,
                full_pages: sum.stream.full_pages,
                ref_pages: sum.stream.ref_pages,
                delta_pages: sum.stream.delta_pages,
                unchanged_pages: sum.stream.unchanged_pages,
            });
        }
        Ok(())
    }
}

/// Asks the migration to stop: the `pf_migration_sender_iterate` running on
/// another thread (or the next call) returns `PF_ERR_CANCELLED` within a
/// few pages or, under a bandwidth cap, about 50 ms. The sender is then
/// spent; free it. May be called from any thread while another iterates,
/// but not during or after `pf_migration_sender_finish` or
/// `pf_migration_sender_free` (which release the handle): a thread that
/// cannot know when those run uses a cancel token instead.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// `sender` is NULL or a live `pf_migration_sender` handle that is not
/// released during the call.
#[no_mangle]
pub unsafe extern "C" fn pf_migration_sender_cancel(
    sender: *const pf_migration_sender,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or a live handle (contract). Only the atomic flag is
        // touched: iterate holds no `&mut` to the handle, just its lock.
        let s = unsafe { self::sender(sender) }?;
        s.cancel.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Stores in `*out_token` a token that cancels this sender
/// (`pf_migration_cancel_token_cancel`) and stays valid after the sender is
/// finished or freed (cancelling then does nothing). Release it with
/// `pf_migration_cancel_token_free`.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// - `sender` is NULL or a live `pf_migration_sender` handle.
/// - `out_token` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_migration_sender_cancel_token(
    sender: *const pf_migration_sender,
    out_token: *mut *mut pf_migration_cancel_token,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or a live handle (contract).
        let s = unsafe { self::sender(sender) }?;
        // SAFETY: NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_token, "out_token") }?;
        let cancel = Arc::clone(&s.cancel);
        out.write(Box::into_raw(Box::new(pf_migration_cancel_token { cancel })));
        Ok(())
    }
}

/// Cancels the sender the token came from, as `pf_migration_sender_cancel`
/// does; from any thread, at any time while the token lives.
///
/// Errors: `PF_ERR_NULL_POINTER`.
///
/// # Safety
///
/// `token` is NULL or a live `pf_migration_cancel_token`.
#[no_mangle]
pub unsafe extern "C" fn pf_migration_cancel_token_cancel(
    token: *const pf_migration_cancel_token,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or a live handle (contract).
        let t = unsafe { args::handle(token, "token") }?;
        t.cancel.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Releases a cancel token. NULL is allowed and does nothing.
///
/// # Safety
///
/// `token` is NULL or a `pf_migration_cancel_token` that has not been
/// freed, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_migration_cancel_token_free(token: *mut pf_migration_cancel_token) {
    ffi_boundary! { returns ();
        if !token.is_null() {
            // SAFETY: from `Box::into_raw` in
            // `pf_migration_sender_cancel_token`, not freed, not used again
            // (contract).
            drop(unsafe { Box::from_raw(token) });
        }
    }
}

/// Releases a sender without finishing: the stream stays incomplete (a
/// receiver reports it truncated), dirty tracking is put back as it was,
/// the descriptor is not closed. NULL is allowed and does nothing.
///
/// # Safety
///
/// `sender` is NULL or a `pf_migration_sender` handle that has not been
/// released, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_migration_sender_free(sender: *mut pf_migration_sender) {
    ffi_boundary! { returns ();
        if !sender.is_null() {
            // SAFETY: from `Box::into_raw` in `pf_migration_sender_start`,
            // not released, not used again (contract).
            drop(unsafe { Box::from_raw(sender) });
        }
    }
}

/// Receives a migration stream from the file descriptor `fd` (a socket,
/// pipe or file open for reading, at the stream's first byte) into new guest
/// memory with the stream's layout, and stores its handle in `*out_mem` and,
/// if `out_stats` is not NULL (set its `struct_size` first), what the stream
/// carried in `*out_stats`. Reads until the end marker; the descriptor is
/// not closed. `limits` NULL means the defaults.
///
/// On error nothing is stored: memory filled from a truncated, corrupt or
/// unexpected stream is discarded.
///
/// Errors: `PF_ERR_NULL_POINTER` (`out_mem`), `PF_ERR_STRUCT_TOO_SMALL`
/// (`limits`, `out_stats`), `PF_ERR_INVALID_ARGUMENT` (`fd` not open),
/// `PF_ERR_STREAM` (not a pagefold stream, an unknown version, truncated,
/// corrupt, over the limits, or the digest does not match), `PF_ERR_OS`
/// (reading), `PF_ERR_LAYOUT`, `PF_ERR_OVERFLOW` (memory for the layout).
///
/// # Safety
///
/// - `fd` stays open during the call.
/// - `limits` is NULL or points to a `pf_migration_limits` whose
///   `struct_size` bytes are readable.
/// - `out_mem` is NULL or valid for a write of one pointer.
/// - `out_stats` is NULL or points to a `pf_migration_received` whose
///   `struct_size` bytes are readable and writable.
#[no_mangle]
pub unsafe extern "C" fn pf_migration_receive(
    fd: c_int,
    limits: *const pf_migration_limits,
    out_mem: *mut *mut pf_guest_memory,
    out_stats: *mut pf_migration_received,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or writable for a pointer (contract).
        let out_mem = unsafe { args::out(out_mem, "out_mem") }?;
        let out_stats = if out_stats.is_null() {
            None
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable and writable
            // (contract).
            Some(unsafe { args::sized_out(out_stats, "out_stats") }?)
        };
        let d = ReaderLimits::default();
        let limits = if limits.is_null() {
            d
        } else {
            // SAFETY: not NULL; `struct_size` bytes readable (contract).
            let l = unsafe { args::read_sized(limits, "limits") }?;
            ReaderLimits {
                max_guest_bytes: if l.max_guest_bytes == 0 { d.max_guest_bytes } else { l.max_guest_bytes },
                max_regions: if l.max_regions == 0 { d.max_regions } else { l.max_regions },
            }
        };
        // SAFETY: `fd` stays open during the call (contract), and the
        // wrapper is dropped (without closing it) before the call returns.
        let input = unsafe { BorrowedFd::new(fd) }?;
        let got = receive_migration(input, limits)?;
        if let Some(out) = out_stats {
            let st = got.stats;
            out.write(pf_migration_received {
                struct_size: size_of::<pf_migration_received>(),
                rounds: st.round.map_or(0, |r| r.saturating_add(1)),
                verified: u32::from(st.verified),
                bytes: st.bytes,
                chunks: st.chunks,
                zero_pages: st.zero_pages,
                full_pages: st.full_pages,
                ref_pages: st.ref_pages,
                delta_pages: st.delta_pages,
                elapsed_us: micros(got.elapsed),
                last_round_us: micros(got.last_round),
            });
        }
        out_mem.write(Box::into_raw(Box::new(pf_guest_memory { mem: Arc::new(got.mem) })));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use pagefold::{migration::Position, LayoutError, MemoryError};

    use super::*;

    #[test]
    fn stream_and_migration_errors_map_to_their_codes() {
        let at = Position {
            offset: 40,
            chunk: 1,
            record: 0,
        };
        let cases: [(Error, pf_status); 8] = [
            (
                StreamError::Truncated {
                    at: 9,
                    what: "a chunk",
                }
                .into(),
                pf_status::PF_ERR_STREAM,
            ),
            (
                StreamError::ChunkChecksum {
                    at,
                    found: 1,
                    computed: 2,
                }
                .into(),
                pf_status::PF_ERR_STREAM,
            ),
            (
                StreamError::UnsupportedVersion {
                    found: 9,
                    supported: 2,
                }
                .into(),
                pf_status::PF_ERR_STREAM,
            ),
            (
                StreamError::Io {
                    at: 0,
                    source: io::Error::from_raw_os_error(libc::EPIPE),
                }
                .into(),
                pf_status::PF_ERR_OS,
            ),
            (
                StreamError::Memory(MemoryError::Layout(LayoutError::NoRegions)).into(),
                pf_status::PF_ERR_LAYOUT,
            ),
            (StreamError::WriterFailed.into(), pf_status::PF_ERR_INTERNAL),
            (
                MigrationError::Cancelled.into(),
                pf_status::PF_ERR_CANCELLED,
            ),
            (
                MigrationError::Failed.into(),
                pf_status::PF_ERR_INVALID_ARGUMENT,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.status, want, "{}", e.message);
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn zero_options_mean_the_defaults() {
        let d = PrecopyOptions::default();
        let o = pf_migration_options {
            struct_size: size_of::<pf_migration_options>(),
            downtime_budget_ms: 0,
            bandwidth_limit: 0,
            max_rounds: 0,
            flags: 0,
        };
        let got = precopy_options(&o).ok();
        assert_eq!(got.map(|g| g.downtime_budget), Some(d.downtime_budget));
        assert_eq!(got.map(|g| g.max_rounds), Some(d.max_rounds));
        assert_eq!(
            got.map(|g| (g.bandwidth_limit, g.verify)),
            Some((None, true))
        );
        let o = pf_migration_options {
            flags: PF_MIGRATION_NO_VERIFY,
            bandwidth_limit: 5,
            ..o
        };
        let got = precopy_options(&o).ok();
        assert_eq!(
            got.map(|g| (g.bandwidth_limit, g.verify)),
            Some((Some(5), false))
        );
        let bad = pf_migration_options { flags: 2, ..o };
        assert_eq!(
            precopy_options(&bad).err().map(|e| e.status),
            Some(pf_status::PF_ERR_INVALID_ARGUMENT)
        );
    }
}
