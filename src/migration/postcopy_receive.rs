//! Post-copy live migration, the destination's side: [`receive_postcopy`]
//! applies the pre-copy rounds to fresh memory, then at the switchover
//! discards the pages the source wrote after sending them (punched out of
//! the memfd, so they fault again), registers every region with a
//! userfaultfd in missing mode, and returns the memory and the VMM's state:
//! the guest may run at once. Its touches of pages not yet here (a vCPU
//! through KVM, a device, a raw pointer) wait in the kernel while the fault
//! server asks the source for them on the return path; a receiving thread
//! places every page that arrives (`UFFDIO_COPY`), requested or pushed, and
//! at the end marker tells the source COMPLETE and unregisters the memory.
//!
//! A page the destination holds (or that is zero) is marked present from
//! the start; a zero page is never placed unless touched while registered
//! (then `UFFDIO_ZEROPAGE`), so zero runs cost nothing.
//!
//! A broken connection (or a malformed stream) after the switchover is
//! [`PostcopyError::Broken`], naming the phase and the pages missing. By
//! default ([`OnBreak::Poison`]) every page still missing is poisoned
//! (`UFFDIO_POISON`): a thread waiting on one, or touching one later, gets
//! a memory error (SIGBUS for a raw pointer, an error from `KVM_RUN` for a
//! vCPU), never wrong bytes and never a hang. The guest cannot go on: the
//! pages it lacks are only at the source, which holds a stale copy of the
//! rest. With [`OnBreak::Wait`] the faulting threads keep waiting instead
//! and [`PostcopyReceiving::wait_recoverable`] hands the break to the VMM,
//! which may [`resume`](PostcopyReceiving::resume) on a new connection
//! (the source runs [`resume_postcopy`](super::resume_postcopy)) or give up
//! (then the missing pages are poisoned). (On a
//! kernel without `UFFDIO_POISON`, before 6.6, missing pages are zero-filled
//! instead and the error is the only signal: the VMM must not resume the
//! guest.)

use std::{
    collections::HashMap,
    io::{Read, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    addr::{usize_from, GuestPhysAddr, HostVirtAddr, PageSize, PAGE_SIZE},
    memory::{GuestMemory, PageKind},
    userfault::{FaultServer, FaultSource, MissingPages, MissingSpan, Userfault, UserfaultError},
};

use super::{
    error::{Malformed, Position, StreamError},
    format::{self, ret, RETURN_MAGIC},
    postcopy::{PostcopyError, PostcopyPhase},
    reader::{Event, Precopy, Raw, ReaderLimits, ReceiveStats, StreamReader},
};

const PAGE: u64 = PAGE_SIZE as u64;

/// A position naming only the stream byte.
fn at_byte(offset: u64) -> Position {
    Position {
        offset,
        chunk: 0,
        record: 0,
    }
}

/// A bit per page of the memory, numbered as the fault server's set.
struct PageBits(Vec<u64>, u64);

impl PageBits {
    fn new(pages: u64) -> Self {
        PageBits(vec![0; usize_from(pages.div_ceil(64))], pages)
    }

    /// Sets pages `[from, from + n)` (clipped to the set), a word at a
    /// time: a record naming a whole region costs no more than its words.
    fn set_run(&mut self, from: u64, n: u64) {
        let end = from.saturating_add(n).min(self.1);
        let mut i = from;
        while i < end {
            let (w, b) = (usize_from(i / 64), i % 64);
            let take = (64 - b).min(end - i);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << b
            };
            self.0[w] |= mask;
            i += take;
        }
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first run of set pages in `[from, end)`: its start and length.
    fn next_run(&self, from: u64, end: u64) -> Option<(u64, u64)> {
        let end = end.min(self.1);
        let mut i = from;
        while i < end {
            let word = self.0[usize_from(i / 64)] >> (i % 64);
            if word == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            i += u64::from(word.trailing_zeros());
            break;
        }
        if i >= end {
            return None;
        }
        let start = i;
        while i < end {
            let word = !self.0[usize_from(i / 64)] >> (i % 64);
            let ones = if word == 0 {
                64 - i % 64
            } else {
                u64::from(word.trailing_zeros())
            };
            i += ones;
            if word != 0 {
                break;
            }
        }
        Some((start, i.min(end) - start))
    }
}

/// What the destination saw of a post-copy migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyStats {
    /// Pages of the memory.
    pub pages: u64,
    /// Pages lacking at the switchover (discarded, or all with no round).
    pub needed: u64,
    /// Pages discarded at the switchover (received, then written at the
    /// source).
    pub discarded: u64,
    /// Pages placed from the stream after the switchover (requested or
    /// pushed; zero pages not included).
    pub placed: u64,
    /// Of those, pages a thread had faulted on and asked for.
    pub placed_on_request: u64,
    /// Zero pages after the switchover (marked, never placed unless
    /// touched).
    pub zero: u64,
    /// Page requests sent on the return path.
    pub requests: u64,
    /// Faults on zero pages served with `UFFDIO_ZEROPAGE`.
    pub zero_faults: u64,
    /// Sum over requested pages of the time from the request to the page's
    /// placement.
    pub fault_wait: Duration,
    /// The longest of those.
    pub max_fault_wait: Duration,
    /// Pages poisoned because the connection broke.
    pub poisoned: u64,
    /// COMPLETE reached the return path. When not (the source stopped
    /// reading it), the destination still holds the whole guest; the
    /// source reports the migration unconfirmed.
    pub complete_sent: bool,
}

/// What the destination does when the connection breaks after the
/// switchover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnBreak {
    /// Poison every page still missing: threads waiting on one, or
    /// touching one later, get a memory error. The guest cannot go on.
    #[default]
    Poison,
    /// Keep the threads waiting (their pages are remembered) until the VMM
    /// resumes on a new connection ([`PostcopyReceiving::resume`], with
    /// [`resume_postcopy`](super::resume_postcopy) at the source) or gives
    /// up (dropping the handle or [`PostcopyReceiving::wait`] poisons
    /// them then), as QEMU's post-copy recovery does.
    Wait,
}

/// The memory and state at the switchover, and the rest of the migration
/// running in the background.
#[derive(Debug)]
pub struct PostcopyIncoming {
    /// The guest's memory: run the guest on it now.
    pub mem: GuestMemory,
    /// The VMM state the source sent with the switchover.
    pub state: Vec<u8>,
    /// What the pre-copy rounds brought.
    pub precopy: ReceiveStats,
    /// Time from reading the switchover record to returning (discards,
    /// registration): the destination's part of the downtime.
    pub switchover: Duration,
    /// The rest of the migration.
    pub receiving: PostcopyReceiving,
}

/// The destination's threads after the switchover. [`wait`](Self::wait)
/// for every page; dropping it first abandons the migration: every page
/// still missing is poisoned and the memory unregistered.
pub struct PostcopyReceiving {
    dst: Arc<Dst>,
    server: Option<FaultServer>,
    receiver: Option<JoinHandle<()>>,
    /// Holds the regions' mappings and the claim on them.
    own: GuestMemory,
    released: bool,
}

impl std::fmt::Debug for PostcopyReceiving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyReceiving")
            .field("pages", &self.dst.pages.pages())
            .field("present", &self.dst.pages.done_count())
            .finish_non_exhaustive()
    }
}

/// The shared state of the fault server and the receiving thread.
struct Dst {
    pages: Arc<MissingPages>,
    /// `(first gpa, pages, first index)` per region.
    regions: Vec<(u64, u64, u64)>,
    ret: Mutex<Option<Box<dyn Write + Send>>>,
    requested: Mutex<HashMap<u64, Instant>>,
    broken: AtomicBool,
    abandon: AtomicBool,
    error: Mutex<Option<PostcopyError>>,
    needed: u64,
    discarded: u64,
    on_break: OnBreak,
    limits: ReaderLimits,
    placed: AtomicU64,
    placed_on_request: AtomicU64,
    zero: AtomicU64,
    requests: AtomicU64,
    zero_faults: AtomicU64,
    wait_ns: AtomicU64,
    max_wait_ns: AtomicU64,
    poisoned: AtomicU64,
    complete_sent: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Dst {
    fn index(&self, gpa: GuestPhysAddr) -> Option<u64> {
        self.regions
            .iter()
            .find(|&&(s, n, _)| gpa.0 >= s && (gpa.0 - s) / PAGE < n)
            .map(|&(s, _, f)| f + (gpa.0 - s) / PAGE)
    }

    fn gpa(&self, page: u64) -> Option<GuestPhysAddr> {
        self.regions
            .iter()
            .find(|&&(_, n, f)| page >= f && page - f < n)
            .map(|&(s, _, f)| GuestPhysAddr(s + (page - f) * PAGE))
    }

    fn missing(&self) -> u64 {
        self.pages.pages() - self.pages.done_count()
    }

    fn record_error(&self, e: PostcopyError) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// The connection broke: poison ([`OnBreak::Poison`]), or keep the
    /// faulting threads waiting for a resume ([`OnBreak::Wait`]).
    fn broke(&self, e: PostcopyError) {
        if self.on_break == OnBreak::Poison {
            return self.fail(e);
        }
        self.record_error(e);
        self.broken.store(true, Ordering::Release);
        *lock(&self.ret) = None;
    }

    /// The migration is over without every page: record why, and poison
    /// every page still missing so no thread waits for it or reads other
    /// bytes.
    fn fail(&self, e: PostcopyError) {
        self.record_error(e);
        self.broken.store(true, Ordering::Release);
        *lock(&self.ret) = None;
        self.poison_missing();
    }

    fn poison_missing(&self) {
        for page in 0..self.pages.pages() {
            if !self.pages.is_done(page) {
                if let Ok(true) = self.pages.poison(page) {
                    self.poisoned.fetch_add(1, Ordering::Relaxed);
                }
                self.pages.mark(page);
            }
        }
    }

    /// A page arrived and was placed: if a thread asked for it, count how
    /// long it waited.
    fn arrived(&self, page: u64) {
        if let Some(t) = lock(&self.requested).remove(&page) {
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.wait_ns.fetch_add(ns, Ordering::Relaxed);
            self.max_wait_ns.fetch_max(ns, Ordering::Relaxed);
            self.placed_on_request.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn send_return(&self, msg: &[u8]) -> Result<(), std::io::Error> {
        let mut ret = lock(&self.ret);
        let Some(w) = ret.as_mut() else {
            return Err(std::io::Error::from(std::io::ErrorKind::NotConnected));
        };
        w.write_all(msg)?;
        w.flush()
    }
}

impl FaultSource for Dst {
    fn fault(&self, pages: &MissingPages, page: u64) {
        if pages.is_done(page) {
            // Present but never placed: a zero page (or a race with its
            // placement, which the EEXIST of this fill absorbs).
            if let Ok(true) = pages.zero(page) {
                self.zero_faults.fetch_add(1, Ordering::Relaxed);
            }
            let _ = pages.wake(page, 1);
            return;
        }
        if self.broken.load(Ordering::Acquire) {
            if self.on_break == OnBreak::Wait && !self.abandon.load(Ordering::Acquire) {
                // Paused: the resume asks for it.
                lock(&self.requested)
                    .entry(page)
                    .or_insert_with(Instant::now);
            } else {
                let _ = pages.poison(page);
                let _ = pages.wake(page, 1);
            }
            return;
        }
        let first = {
            let mut r = lock(&self.requested);
            match r.entry(page) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Instant::now());
                    true
                }
            }
        };
        if !first {
            return; // asked already: it is on its way
        }
        let Some(gpa) = self.gpa(page) else { return };
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(source) = self.send_return(&format::encode_return(ret::REQUEST, gpa, 1)) {
            self.broke(PostcopyError::Broken {
                phase: PostcopyPhase::Push,
                missing: self.missing(),
                source: StreamError::Io { at: 0, source },
            });
        }
    }

    fn error(&self, error: UserfaultError) {
        self.record_error(error.into());
    }
}

/// Receives a post-copy migration from `input` (a stream from
/// [`Sender::start_postcopy`](super::Sender::start_postcopy)), with `ret`
/// the return path to the source (e.g. a `try_clone` of the socket).
/// Applies the pre-copy rounds to fresh memory and returns at the
/// switchover with the memory (registered for missing-page faults) and the
/// VMM's state, the rest arriving in the background.
///
/// A stream that breaks or is malformed before the switchover is
/// [`PostcopyError::Broken`] with phase [`PostcopyPhase::Precopy`] (the
/// memory is dropped; the source's guest is whole).
pub fn receive_postcopy<R, W>(
    input: R,
    ret: W,
    limits: ReaderLimits,
) -> Result<PostcopyIncoming, PostcopyError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    receive_postcopy_with(input, ret, limits, OnBreak::Poison)
}

/// [`receive_postcopy`], choosing what a broken connection after the
/// switchover does to the threads waiting on missing pages.
pub fn receive_postcopy_with<R, W>(
    input: R,
    ret: W,
    limits: ReaderLimits,
    on_break: OnBreak,
) -> Result<PostcopyIncoming, PostcopyError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let mut reader = StreamReader::with_flags(input, limits, format::FLAG_POSTCOPY)
        .map_err(PostcopyError::Stream)?;
    if reader.header().flags & format::FLAG_POSTCOPY == 0 {
        return Err(PostcopyError::NotPostcopy);
    }
    let mem = reader.create_memory().map_err(PostcopyError::Stream)?;
    if mem.frame_store().granule() != PageSize::Size4K {
        return Err(PostcopyError::HugePages);
    }
    let total: u64 = mem.regions().iter().map(|r| r.size() / PAGE).sum();
    let pre = |missing, source| PostcopyError::Broken {
        phase: PostcopyPhase::Precopy,
        missing,
        source,
    };
    // Page numbering: regions in address order.
    let mut regions = Vec::new();
    let mut first = 0u64;
    for r in mem.regions() {
        let n = r.size() / PAGE;
        regions.push((r.start().0, n, first));
        first += n;
    }
    let index = |gpa: GuestPhysAddr| {
        regions
            .iter()
            .find(|&&(s, n, _)| gpa.0 >= s && (gpa.0 - s) / PAGE < n)
            .map(|&(s, _, f)| f + (gpa.0 - s) / PAGE)
    };
    // The pages discarded, as a set as the records come (a list of the
    // records grew with every one a hostile source repeated: found by
    // review, tests/review_postcopy.rs). A record's run lies in one region
    // (the reader checked it), so its pages are consecutive indexes.
    let mut discard_bits = PageBits::new(total);
    let (needed_claimed, state) = loop {
        match reader.next_precopy(&mem) {
            Ok(Precopy::Applied(Event::End { .. })) => {
                return Err(pre(
                    total,
                    StreamError::Malformed {
                        at: Position {
                            offset: reader.stats().bytes,
                            chunk: reader.stats().chunks,
                            record: 0,
                        },
                        problem: Malformed::EndBeforeSwitchover,
                    },
                ))
            }
            Ok(Precopy::Applied(_)) => {}
            Ok(Precopy::Discard { gpa, pages }) => {
                if let Some(i) = index(gpa) {
                    discard_bits.set_run(i, u64::from(pages));
                }
            }
            Ok(Precopy::Switchover { needed, state }) => break (needed, state),
            Err(e) => return Err(pre(total, e)),
        }
    };
    let switched = Instant::now();
    let precopy = reader.stats();
    // What is needed: every page with no round, else the discarded ones.
    let all = precopy.round.is_none();
    let needed = if all { total } else { discard_bits.count() };
    let discarded = if all { 0 } else { needed };
    if needed != needed_claimed {
        return Err(pre(
            needed_claimed,
            StreamError::Malformed {
                at: Position {
                    offset: precopy.bytes,
                    chunk: precopy.chunks,
                    record: 0,
                },
                problem: Malformed::NeededCount {
                    claimed: needed_claimed,
                    seen: needed,
                },
            },
        ));
    }
    // Discard: the page's frame becomes a hole again, mapped as a plain
    // page (a page the memory layer knows as released would be read from
    // its frame, as zeros, not through the mapping, which faults). One
    // MADV_REMOVE per run of adjacent pages.
    let zero = [0u8; PAGE_SIZE];
    for (r, &(start, n, first)) in mem.regions().iter().zip(&regions) {
        let mut k = 0u64;
        while let Some((from, len)) = discard_bits.next_run(first + k, first + n) {
            let states = r.page_states();
            for p in from - first..from - first + len {
                if states.load(usize_from(p)).kind() != PageKind::Private {
                    let g = GuestPhysAddr(start + p * PAGE);
                    mem.write(g, &zero).map_err(|e| {
                        pre(
                            needed,
                            StreamError::Access {
                                at: at_byte(precopy.bytes),
                                source: e,
                            },
                        )
                    })?;
                }
            }
            let gpa = GuestPhysAddr(start + (from - first) * PAGE);
            let hva = HostVirtAddr(r.host_addr().0 + (from - first) * PAGE);
            // The run lies within the region, and the memory holds its
            // mapping while this runs.
            // SAFETY: `[hva, hva + len pages)` is inside this region's live
            // shared mapping; MADV_REMOVE only frees the backing of these
            // pages, which read as missing from now on.
            let rc = unsafe {
                libc::madvise(
                    hva.0 as *mut libc::c_void,
                    usize_from(len * PAGE),
                    libc::MADV_REMOVE,
                )
            };
            if rc != 0 {
                return Err(PostcopyError::Discard {
                    gpa,
                    pages: len,
                    source: std::io::Error::last_os_error(),
                });
            }
            k = from - first + len;
        }
    }
    // Register: the memory holds its regions; a claim keeps a dedup host
    // (or another restore) from taking the same ranges.
    let own = GuestMemory::from_regions(mem.regions().to_vec())
        .map_err(|e| PostcopyError::Stream(StreamError::Layout(e)))?;
    if !own.claim_for_dedup() {
        return Err(PostcopyError::Userfault(UserfaultError::Ioctl {
            op: "claim (the memory is held by a dedup host)",
            start: HostVirtAddr(0),
            len: 0,
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        }));
    }
    let spans = own
        .regions()
        .iter()
        .zip(&regions)
        .map(|(r, &(_, _, first))| MissingSpan {
            host: r.host_addr(),
            len: r.size(),
            first,
        })
        .collect();
    let registered = Userfault::new_missing().and_then(|u| MissingPages::register(u, spans));
    let pages = match registered {
        Ok(p) => Arc::new(p),
        Err(e) => {
            own.release_from_dedup();
            return Err(e.into());
        }
    };
    if !all {
        pages.mark_all_but(&discard_bits.0);
    }
    let mut ret: Box<dyn Write + Send> = Box::new(ret);
    let hello = ret.write_all(&RETURN_MAGIC).and_then(|()| ret.flush());
    let dst = Arc::new(Dst {
        pages: Arc::clone(&pages),
        regions,
        ret: Mutex::new(Some(ret)),
        requested: Mutex::new(HashMap::new()),
        broken: AtomicBool::new(false),
        abandon: AtomicBool::new(false),
        error: Mutex::new(None),
        needed,
        discarded,
        on_break,
        limits,
        placed: AtomicU64::new(0),
        placed_on_request: AtomicU64::new(0),
        zero: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        zero_faults: AtomicU64::new(0),
        wait_ns: AtomicU64::new(0),
        max_wait_ns: AtomicU64::new(0),
        poisoned: AtomicU64::new(0),
        complete_sent: AtomicBool::new(false),
    });
    let mut receiving = PostcopyReceiving {
        dst: Arc::clone(&dst),
        server: None,
        receiver: None,
        own,
        released: false,
    };
    if let Err(source) = hello {
        dst.broke(PostcopyError::Broken {
            phase: PostcopyPhase::Switchover,
            missing: dst.missing(),
            source: StreamError::Io { at: 0, source },
        });
    }
    receiving.server = Some(
        FaultServer::start(pages, Arc::clone(&dst), "pagefold-postcopy-fault")
            .map_err(|e| PostcopyError::Thread("fault server", e))?,
    );
    let d = Arc::clone(&dst);
    receiving.receiver = Some(
        std::thread::Builder::new()
            .name("pagefold-postcopy-recv".into())
            .spawn(move || receive_rest(reader, &d))
            .map_err(|e| PostcopyError::Thread("receiver", e))?,
    );
    Ok(PostcopyIncoming {
        mem,
        state,
        precopy,
        switchover: switched.elapsed(),
        receiving,
    })
}

/// The receiving thread: places what arrives until the end marker.
fn receive_rest<R: Read>(mut reader: StreamReader<R>, d: &Dst) {
    if let Err(e) = receive_loop(&mut reader, d) {
        let missing = d.missing();
        d.broke(match e {
            PostcopyError::Broken { phase, source, .. } => PostcopyError::Broken {
                phase,
                missing,
                source,
            },
            other => other,
        });
    }
}

fn receive_loop<R: Read>(reader: &mut StreamReader<R>, d: &Dst) -> Result<(), PostcopyError> {
    let broken = |source| PostcopyError::Broken {
        phase: PostcopyPhase::Push,
        missing: 0,
        source,
    };
    loop {
        if d.abandon.load(Ordering::Acquire) || d.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        match reader.next_raw().map_err(broken)? {
            Raw::Full { gpa, at } => {
                let Some(page) = d.index(gpa) else { continue };
                if d.pages.is_done(page) {
                    continue; // sent twice, or announced zero: keep what is
                }
                let c = d.pages.place(page, reader.chunk_bytes(at))?;
                if c.bytes > 0 {
                    d.placed.fetch_add(1, Ordering::Relaxed);
                }
                d.arrived(page);
            }
            Raw::Zero { gpa, pages } => {
                let Some(first) = d.index(gpa) else { continue };
                for p in first..first + u64::from(pages) {
                    if d.pages.mark(p) {
                        d.zero.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Waiters retry, fault again, and get a zero page.
                let _ = d.pages.wake(first, u64::from(pages));
                let mut r = lock(&d.requested);
                for p in first..first + u64::from(pages) {
                    r.remove(&p);
                }
            }
            Raw::End => {
                let missing = d.missing();
                if missing != 0 {
                    return Err(broken(StreamError::Malformed {
                        at: at_byte(reader.stats().bytes),
                        problem: Malformed::NeededCount {
                            claimed: d.needed,
                            seen: d.needed.saturating_sub(missing),
                        },
                    }));
                }
                // Every page is here: the guest is whole at this side,
                // whether or not the source hears of it (it waits for this).
                let sent = d
                    .send_return(&format::encode_return(ret::COMPLETE, GuestPhysAddr(0), 0))
                    .is_ok();
                d.complete_sent.store(sent, Ordering::Release);
                *lock(&d.ret) = None;
                return Ok(());
            }
        }
    }
}

impl PostcopyReceiving {
    /// Pages present (placed, or known zero) so far.
    pub fn pages_present(&self) -> u64 {
        self.dst.pages.done_count()
    }

    /// Waits until every page is placed (or the migration failed),
    /// unregisters the memory and returns what happened. On
    /// [`PostcopyError::Broken`] every page that was missing is poisoned:
    /// the guest cannot go on (module docs).
    pub fn wait(mut self) -> Result<PostcopyStats, PostcopyError> {
        self.join();
        self.stop();
        if let Some(e) = lock(&self.dst.error).take() {
            return Err(e);
        }
        Ok(self.stats())
    }

    /// As [`wait`](Self::wait), but a broken connection under
    /// [`OnBreak::Wait`] returns its [`PostcopyError::Broken`] with the
    /// memory still registered and the faulting threads still waiting: the
    /// VMM may then [`resume`](Self::resume) on a new connection and wait
    /// again, or drop the handle (poisoning the missing pages).
    pub fn wait_recoverable(&mut self) -> Result<PostcopyStats, PostcopyError> {
        self.join();
        let paused = self.dst.on_break == OnBreak::Wait
            && self.dst.broken.load(Ordering::Acquire)
            && self.dst.missing() > 0
            && self.server.is_some();
        if paused {
            // Still paused however often it is asked (a VMM back here
            // after a failed resume): the break again, never `Ok` over
            // pages poisoned now (found by review: tests/review_postcopy.rs).
            let missing = self.dst.missing();
            return Err(lock(&self.dst.error)
                .take()
                .unwrap_or_else(|| PostcopyError::Broken {
                    phase: PostcopyPhase::Push,
                    missing,
                    source: StreamError::Io {
                        at: 0,
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            "paused by an earlier break: resume on a new connection, or drop to give up",
                        ),
                    },
                }));
        }
        self.stop();
        if let Some(e) = lock(&self.dst.error).take() {
            return Err(e);
        }
        Ok(self.stats())
    }

    /// Resumes a migration paused by a broken connection on a new one:
    /// `input` from [`resume_postcopy`](super::resume_postcopy) at the
    /// source, `ret` its return path. Tells the source the pages threads
    /// wait on, then every page still missing, and receives them in the
    /// background; [`wait_recoverable`](Self::wait_recoverable) again.
    pub fn resume<R, W>(&mut self, input: R, ret: W) -> Result<(), PostcopyError>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let d = &self.dst;
        if self.receiver.is_some()
            || self.server.is_none()
            || d.on_break != OnBreak::Wait
            || !d.broken.load(Ordering::Acquire)
        {
            return Err(PostcopyError::NotPaused);
        }
        let reader =
            StreamReader::with_flags(input, d.limits, format::FLAG_POSTCOPY | format::FLAG_RESUME)
                .map_err(PostcopyError::Stream)?;
        if reader.header().flags & format::FLAG_RESUME == 0 {
            return Err(PostcopyError::ResumeMismatch("no FLAG_RESUME"));
        }
        let layout: Vec<_> = d
            .regions
            .iter()
            .map(|&(s, n, _)| (GuestPhysAddr(s), n * PAGE))
            .collect();
        if reader.header().layout != layout {
            return Err(PostcopyError::ResumeMismatch("another memory layout"));
        }
        let mut msgs = Vec::new();
        msgs.extend_from_slice(&RETURN_MAGIC);
        let mut waiting: Vec<u64> = lock(&d.requested).keys().copied().collect();
        waiting.sort_unstable();
        for &page in &waiting {
            if let Some(gpa) = d.gpa(page) {
                msgs.extend_from_slice(&format::encode_return(ret::REQUEST, gpa, 1));
            }
        }
        for &(start, n, first) in &d.regions {
            let mut k = 0;
            while k < n {
                if d.pages.is_done(first + k) {
                    k += 1;
                    continue;
                }
                let run = (k..n)
                    .take_while(|&j| !d.pages.is_done(first + j))
                    .take(u32::MAX as usize)
                    .count() as u64;
                let gpa = GuestPhysAddr(start + k * PAGE);
                let pages = u32::try_from(run).unwrap_or(u32::MAX);
                msgs.extend_from_slice(&format::encode_return(ret::NEED, gpa, pages));
                k += u64::from(pages);
            }
        }
        msgs.extend_from_slice(&format::encode_return(ret::NEED_END, GuestPhysAddr(0), 0));
        let mut ret: Box<dyn Write + Send> = Box::new(ret);
        ret.write_all(&msgs)
            .and_then(|()| ret.flush())
            .map_err(|source| PostcopyError::Broken {
                phase: PostcopyPhase::Switchover,
                missing: d.missing(),
                source: StreamError::Io { at: 0, source },
            })?;
        *lock(&d.ret) = Some(ret);
        lock(&d.error).take();
        d.broken.store(false, Ordering::Release);
        let dst = Arc::clone(&self.dst);
        self.receiver = Some(
            std::thread::Builder::new()
                .name("pagefold-postcopy-recv".into())
                .spawn(move || receive_rest(reader, &dst))
                .map_err(|e| PostcopyError::Thread("receiver", e))?,
        );
        Ok(())
    }

    fn join(&mut self) {
        let joined = match self.receiver.take() {
            Some(t) => t.join().map_err(|_| PostcopyError::Panicked("receiver")),
            None => Ok(()),
        };
        if let Err(e) = joined {
            self.dst.fail(e);
        }
    }

    fn stats(&self) -> PostcopyStats {
        let d = &self.dst;
        PostcopyStats {
            pages: d.pages.pages(),
            needed: d.needed,
            discarded: d.discarded,
            placed: d.placed.load(Ordering::Relaxed),
            placed_on_request: d.placed_on_request.load(Ordering::Relaxed),
            zero: d.zero.load(Ordering::Relaxed),
            requests: d.requests.load(Ordering::Relaxed),
            zero_faults: d.zero_faults.load(Ordering::Relaxed),
            fault_wait: Duration::from_nanos(d.wait_ns.load(Ordering::Relaxed)),
            max_fault_wait: Duration::from_nanos(d.max_wait_ns.load(Ordering::Relaxed)),
            poisoned: d.poisoned.load(Ordering::Relaxed),
            complete_sent: d.complete_sent.load(Ordering::Acquire),
        }
    }

    /// Stops the fault server (unregistering the memory) and ends the
    /// claim. Pages still missing are poisoned first.
    fn stop(&mut self) {
        self.dst.abandon.store(true, Ordering::Release);
        if self.dst.missing() > 0 {
            self.dst.poison_missing();
        }
        if let Some(mut s) = self.server.take() {
            if !s.stop() {
                self.dst
                    .record_error(PostcopyError::Panicked("fault server"));
            }
        }
        if !self.released {
            self.own.release_from_dedup();
            self.released = true;
        }
    }
}

impl Drop for PostcopyReceiving {
    fn drop(&mut self) {
        if self.receiver.is_some() {
            // Abandoned: the receiving thread ends at its next record or
            // when the input closes; nothing waits for it.
            self.dst.abandon.store(true, Ordering::Release);
            self.dst.broken.store(true, Ordering::Release);
            self.receiver = None;
        }
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]

    use super::PageBits;

    /// Runs found word by word match a bit-by-bit model, across word edges.
    #[test]
    fn page_bits_runs() {
        let total = 300u64;
        let mut bits = PageBits::new(total);
        let mut model = vec![false; total as usize];
        for &(from, n) in &[
            (0u64, 1u64),
            (3, 70),
            (63, 2),
            (127, 1),
            (200, 99),
            (299, 5),
        ] {
            bits.set_run(from, n);
            for i in from..(from + n).min(total) {
                model[i as usize] = true;
            }
        }
        assert_eq!(bits.count(), model.iter().filter(|&&b| b).count() as u64);
        for (lo, hi) in [(0u64, total), (5, 250), (64, 128), (128, 300)] {
            let mut runs = Vec::new();
            let mut k = lo;
            while let Some((s, n)) = bits.next_run(k, hi) {
                runs.push((s, n));
                k = s + n;
            }
            let mut want = Vec::new();
            let mut i = lo;
            while i < hi {
                if model[i as usize] {
                    let s = i;
                    while i < hi && model[i as usize] {
                        i += 1;
                    }
                    want.push((s, i - s));
                } else {
                    i += 1;
                }
            }
            assert_eq!(runs, want, "runs in [{lo}, {hi})");
        }
    }
}
