//! Post-copy live migration, the source's side and the errors both sides
//! share. A [`Sender`] started with [`Sender::start_postcopy`] sends zero or
//! more pre-copy rounds while the guest runs; the VMM then stops the guest
//! and calls [`Sender::switchover`], which sends the pages written since
//! they were sent as DISCARD records and the SWITCHOVER record (with the
//! VMM's state, e.g. the vCPUs'), after which the destination runs the
//! guest. The source then pushes every page the destination lacks in the
//! background, sending first the pages the destination asks for on the
//! return path (a thread there waits in a fault on them), and ends with the
//! end marker and the destination's COMPLETE message.
//!
//! Once the destination ran, the guest exists only as the two halves
//! together: the source's memory is stale for pages the destination wrote,
//! the destination lacks pages not yet sent. A broken connection is a
//! [`PostcopyError::Broken`] on both sides, naming the phase and the pages
//! still missing. The destination then either poisons them (its faulting
//! threads get a memory error, never wrong bytes and never a hang), or,
//! received with `OnBreak::Wait`, keeps its threads waiting until the VMM
//! resumes on a new connection: [`resume_postcopy`] here, with the guest
//! still stopped, sends the pages the destination says it lacks.

use std::{
    io::{self, Read, Write},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::{
    addr::{GuestPhysAddr, PAGE_SIZE},
    dirty::DirtyRun,
    memory::GuestMemory,
    userfault::UserfaultError,
};

use super::{
    error::StreamError,
    format::{self, ret, RETURN_MAGIC, RETURN_MSG_LEN},
    precopy::{MigrationError, PrecopyOptions, Sender, Throttle},
    writer::{StreamWriter, WriterStats},
};

const PAGE: u64 = PAGE_SIZE as u64;

/// Where a post-copy migration was when it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostcopyPhase {
    /// Pre-copy rounds, before the switchover: the source's guest is whole,
    /// the destination's memory can be dropped and the source resumed.
    Precopy,
    /// Sending the discards and the switchover record.
    Switchover,
    /// After the switchover: pages pushed and requested. The guest is
    /// split between the two sides.
    Push,
    /// Every page sent; waiting for the destination's COMPLETE.
    Completion,
}

impl std::fmt::Display for PostcopyPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PostcopyPhase::Precopy => "pre-copy",
            PostcopyPhase::Switchover => "switchover",
            PostcopyPhase::Push => "post-copy push",
            PostcopyPhase::Completion => "completion",
        })
    }
}

/// Why a post-copy migration (either side) stopped.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// Before the switchover: the pre-copy sender failed.
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// The stream was not started for post-copy: the sender by
    /// [`Sender::start`] instead of [`Sender::start_postcopy`], or a
    /// received stream without `FLAG_POSTCOPY`.
    #[error("the stream was not started for post-copy (Sender::start_postcopy)")]
    NotPostcopy,
    /// The connection broke (or the peer sent something unreadable) in
    /// `phase`, with `missing` pages not yet at the destination. From the
    /// switchover on, the guest is split: see the module docs.
    #[error("post-copy connection broken during {phase} with {missing} pages not yet at the destination: {source}")]
    Broken {
        /// Where the migration was.
        phase: PostcopyPhase,
        /// Pages the destination still lacks (as this side knows it).
        missing: u64,
        /// What failed.
        #[source]
        source: StreamError,
    },
    /// The return path carried a message that is not one (an unknown kind,
    /// padding not zero, a wrong magic): it cannot be read on, so the
    /// destination's completion cannot be confirmed. Every page was still
    /// pushed.
    #[error("return path garbled at message {index}: {bytes:02x?}")]
    ReturnPathGarbled {
        /// Messages read before it.
        index: u64,
        /// The message (or the magic) as read.
        bytes: Vec<u8>,
    },
    /// A page request outside the layout: refused, the migration goes on
    /// (see [`PostcopySummary::refused`]).
    #[error("page request for {pages} pages at {gpa} is outside the layout; refused")]
    BadRequest {
        /// The address asked for.
        gpa: GuestPhysAddr,
        /// Pages asked for.
        pages: u32,
    },
    /// The destination did not confirm completion in time.
    #[error("the destination did not confirm completion within {0:?}")]
    CompletionTimeout(Duration),
    /// The VMM state does not fit the switchover record.
    #[error(transparent)]
    State(StreamError),
    /// The destination's stream is malformed before the switchover, or
    /// its memory cannot be made.
    #[error(transparent)]
    Stream(StreamError),
    /// The destination's memory is on huge pages: missing-page faults
    /// there fill whole huge pages, which 4 KiB pages on the wire do not.
    #[error("post-copy needs 4 KiB pages at the destination")]
    HugePages,
    /// The destination's userfaultfd: unavailable, no missing faults on
    /// shmem, a failed ioctl.
    #[error(transparent)]
    Userfault(#[from] UserfaultError),
    /// Discarding a page at the destination failed.
    #[error("discarding {pages} pages at {gpa} at the destination: {source}")]
    Discard {
        /// First page.
        gpa: GuestPhysAddr,
        /// Pages.
        pages: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("starting the {0} thread: {1}")]
    Thread(&'static str, #[source] io::Error),
    /// `resume` on a migration that is not paused by a broken connection
    /// (received with [`OnBreak::Wait`](super::OnBreak::Wait), after
    /// `wait_recoverable` returned the break).
    #[error("resume needs a post-copy migration paused by a broken connection")]
    NotPaused,
    /// The resumed stream is not a resume of this migration (no
    /// `FLAG_RESUME`, or another layout).
    #[error("the resumed stream does not resume this migration: {0}")]
    ResumeMismatch(&'static str),
    /// A thread of the destination panicked.
    #[error("the post-copy {0} thread panicked")]
    Panicked(&'static str),
}

/// Settings of the post-copy phase.
#[derive(Clone, Copy, Debug)]
pub struct PostcopyOptions {
    /// Background pages sent between two looks at the request queue.
    pub batch_pages: u32,
    /// How long to wait for the destination's COMPLETE after the last page.
    pub completion_timeout: Duration,
}

impl Default for PostcopyOptions {
    fn default() -> Self {
        PostcopyOptions {
            batch_pages: 16,
            completion_timeout: Duration::from_secs(60),
        }
    }
}

/// How a post-copy migration went, at the source.
#[derive(Debug)]
pub struct PostcopySummary {
    /// Pre-copy rounds sent before the switchover.
    pub precopy_rounds: u32,
    /// Pages the destination was told to discard (sent, then written).
    pub discarded: u64,
    /// Pages the destination lacked at the switchover (pushed or requested).
    pub needed: u64,
    /// Of those, pages sent by the background push.
    pub pushed: u64,
    /// Of those, pages sent first because the destination asked.
    pub requested: u64,
    /// The first few refused requests (outside the layout), as errors.
    pub refused: Vec<PostcopyError>,
    /// Requests refused.
    pub refused_requests: u64,
    /// Time [`Sender::switchover`] took to send the discards and the
    /// switchover record: the source's part of the downtime.
    pub switchover: Duration,
    /// Time from the switchover record to the destination's COMPLETE.
    pub post_phase: Duration,
    /// Time from [`Sender::start_postcopy`] to the end.
    pub total: Duration,
    /// The stream's statistics.
    pub stream: WriterStats,
}

/// A message of the return path, as the reading thread hands it over.
enum Msg {
    Request(GuestPhysAddr, u32),
    Need(GuestPhysAddr, u32),
    NeedEnd,
    Complete,
    Garbled(u64, Vec<u8>),
    Closed(io::Error),
}

/// Messages of the return path read ahead of the push: the reading thread
/// waits when this many are queued, so a destination that floods requests
/// (while not reading the stream, say) stalls on its own side instead of
/// growing the source's memory (found by review: tests/review_postcopy.rs).
const RETURN_QUEUE: usize = 4096;

/// Reads the return path until COMPLETE, a garbled message or its end.
fn read_return<R: Read>(mut r: R, tx: &mpsc::SyncSender<Msg>) {
    let mut magic = [0u8; 8];
    if let Err(e) = r.read_exact(&mut magic) {
        let _ = tx.send(Msg::Closed(e));
        return;
    }
    if magic != RETURN_MAGIC {
        let _ = tx.send(Msg::Garbled(0, magic.to_vec()));
        return;
    }
    let mut index = 0u64;
    loop {
        let mut m = [0u8; RETURN_MSG_LEN];
        if let Err(e) = r.read_exact(&mut m) {
            let _ = tx.send(Msg::Closed(e));
            return;
        }
        let msg = match format::decode_return(&m) {
            Some((ret::REQUEST, gpa, pages)) => Msg::Request(gpa, pages),
            Some((ret::NEED, gpa, pages)) => Msg::Need(gpa, pages),
            Some((ret::NEED_END, ..)) => Msg::NeedEnd,
            Some(_) => Msg::Complete,
            None => Msg::Garbled(index, m.to_vec()),
        };
        let last = !matches!(msg, Msg::Request(..) | Msg::Need(..) | Msg::NeedEnd);
        if tx.send(msg).is_err() || last {
            return;
        }
        index += 1;
    }
}

/// The pages of `mem` numbered in address order.
struct Pages {
    /// `(start, pages, first index)` per region.
    regions: Vec<(u64, u64, u64)>,
    total: u64,
}

impl Pages {
    fn of(mem: &GuestMemory) -> Self {
        let mut regions = Vec::new();
        let mut total = 0;
        for r in mem.regions() {
            let n = r.size() / PAGE;
            regions.push((r.start().0, n, total));
            total += n;
        }
        Pages { regions, total }
    }

    /// The region holding `gpa`.
    fn region(&self, gpa: GuestPhysAddr) -> Option<usize> {
        self.regions
            .iter()
            .position(|&(s, n, _)| gpa.0 >= s && (gpa.0 - s) / PAGE < n)
    }

    fn index(&self, gpa: GuestPhysAddr) -> Option<u64> {
        self.regions
            .iter()
            .find(|&&(s, n, _)| gpa.0 >= s && (gpa.0 - s) / PAGE < n)
            .map(|&(s, _, f)| f + (gpa.0 - s) / PAGE)
    }

    /// The address of page `i`.
    fn gpa(&self, i: u64) -> Option<GuestPhysAddr> {
        self.regions
            .iter()
            .find(|&&(_, n, f)| i >= f && i - f < n)
            .map(|&(s, _, f)| GuestPhysAddr(s + (i - f) * PAGE))
    }
}

/// A bit per page.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u64, set: bool) -> Self {
        let word = if set { u64::MAX } else { 0 };
        Bits(vec![word; usize::try_from(n.div_ceil(64)).unwrap_or(0)])
    }
    fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    /// Sets bit `i`; whether it was clear.
    fn set(&mut self, i: u64) -> bool {
        match self.0.get_mut((i / 64) as usize) {
            Some(w) => {
                let was = *w & (1 << (i % 64)) == 0;
                *w |= 1 << (i % 64);
                was
            }
            None => false,
        }
    }
    fn clear(&mut self, i: u64) {
        if let Some(w) = self.0.get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
        }
    }
}

/// Most refused requests kept as errors in the summary.
const REFUSED_KEPT: usize = 16;

impl<W: Write> Sender<'_, W> {
    /// With the guest stopped: switches the migration to post-copy and
    /// runs it to the end. Harvests the last writes; sends a DISCARD for
    /// every page sent before and written since (none if no round was
    /// sent: then every page is to come), and the SWITCHOVER record with
    /// `state` (the VMM's: vCPUs, devices; at most a chunk), after which the
    /// destination may run the guest. Then pushes every page the
    /// destination lacks, the pages it asks for on `ret` (the return path,
    /// e.g. a `try_clone` of the socket) first, and the end marker, and
    /// waits for the destination's COMPLETE.
    ///
    /// Requests outside the layout are refused and counted
    /// ([`PostcopySummary::refused`]); the migration goes on. A broken
    /// connection is [`PostcopyError::Broken`]: before the switchover
    /// record left, the source may resume its guest; after, the guest is
    /// split between the two sides (module docs). The thread reading `ret`
    /// ends when `ret` does (at COMPLETE, or when the connection closes).
    pub fn switchover<R: Read + Send + 'static>(
        mut self,
        ret: R,
        state: &[u8],
        opts: PostcopyOptions,
    ) -> Result<(W, PostcopySummary), PostcopyError> {
        let t = Instant::now();
        if self.writer.is_none() {
            return Err(MigrationError::Failed.into());
        }
        if !self.postcopy {
            return Err(PostcopyError::NotPostcopy);
        }
        let precopy_rounds = self.round;
        let r = self.harvest();
        self.fail_on_err(r)?;
        let mem = self.mem;
        let pages = Pages::of(mem);
        // What the destination lacks: everything if nothing was sent, else
        // the pages written since they were sent (a page never sent was
        // zero in round 0, and the destination holds it as zero).
        let mut sent = Bits::new(pages.total, precopy_rounds > 0);
        let mut discards: Vec<DirtyRun> = Vec::new();
        let mut needed = if precopy_rounds == 0 { pages.total } else { 0 };
        if precopy_rounds > 0 {
            let mut runs = std::mem::take(&mut self.pending);
            runs.sort_by_key(|r| r.start.0);
            for run in &runs {
                for gpa in run.addrs() {
                    if let Some(i) = pages.index(gpa) {
                        if sent.get(i) {
                            sent.clear(i);
                            needed += 1;
                            match discards.last_mut() {
                                Some(d)
                                    if d.start.0 + d.pages * PAGE == gpa.0
                                        && pages.region(d.start) == pages.region(gpa) =>
                                {
                                    d.pages += 1
                                }
                                _ => discards.push(DirtyRun {
                                    start: gpa,
                                    pages: 1,
                                }),
                            }
                        }
                    }
                }
            }
        }
        self.pending.clear();
        self.pending_pages = 0;
        let discarded = needed - if precopy_rounds == 0 { pages.total } else { 0 };
        let Some(mut w) = self.writer.take() else {
            return Err(PostcopyError::NotPostcopy);
        };
        let broken = |phase, missing, source| PostcopyError::Broken {
            phase,
            missing,
            source,
        };
        for d in &discards {
            let mut at = d.start;
            let mut left = d.pages;
            while left > 0 {
                let n = u32::try_from(left).unwrap_or(u32::MAX);
                w.discard(at, n)
                    .map_err(|e| broken(PostcopyPhase::Switchover, needed, e))?;
                at = GuestPhysAddr(at.0 + u64::from(n) * PAGE);
                left -= u64::from(n);
            }
        }
        match w.switchover(needed, state) {
            Ok(()) => {}
            Err(e @ StreamError::StateTooLarge { .. }) => return Err(PostcopyError::State(e)),
            Err(e) => return Err(broken(PostcopyPhase::Switchover, needed, e)),
        }
        let switchover = t.elapsed();
        let post = Instant::now();

        // The push, requests first.
        let (tx, rx) = mpsc::sync_channel(RETURN_QUEUE);
        std::thread::Builder::new()
            .name("pagefold-postcopy-return".into())
            .spawn(move || read_return(ret, &tx))
            .map_err(|e| PostcopyError::Thread("return path", e))?;
        let (out, stream, done) = push(mem, w, &rx, &pages, &mut sent, needed, None, opts)?;
        self.restore_tracking();
        let summary = PostcopySummary {
            precopy_rounds,
            discarded,
            needed,
            pushed: done.pushed,
            requested: done.requested,
            refused: done.refused,
            refused_requests: done.refused_count,
            switchover,
            post_phase: post.elapsed(),
            total: self.started.elapsed(),
            stream,
        };
        Ok((out.out, summary))
    }
}

/// What a push did.
struct Pushed {
    pushed: u64,
    requested: u64,
    refused: Vec<PostcopyError>,
    refused_count: u64,
}

/// The post-copy push: the pages not set in `sent` (`needed` of them),
/// the pages set in `first` and the return path's requests before the
/// background order, then the end marker and the destination's COMPLETE.
#[allow(clippy::too_many_arguments)]
fn push<W: Write>(
    mem: &GuestMemory,
    mut w: StreamWriter<W>,
    rx: &mpsc::Receiver<Msg>,
    pages: &Pages,
    sent: &mut Bits,
    needed: u64,
    first: Option<Bits>,
    opts: PostcopyOptions,
) -> Result<(W, WriterStats, Pushed), PostcopyError> {
    let broken = |phase, missing, source| PostcopyError::Broken {
        phase,
        missing,
        source,
    };
    let mut left = needed;
    let mut pushed = 0u64;
    let mut requested = 0u64;
    let mut refused = Vec::new();
    let mut refused_count = 0u64;
    let mut garbled: Option<PostcopyError> = None;
    let mut complete = false;
    let mut closed: Option<io::Error> = None;
    let send = |w: &mut StreamWriter<_>, sent: &mut Bits, i: u64, gpa: GuestPhysAddr| {
        if !sent.set(i) {
            return Ok(false);
        }
        w.send_page_raw(mem, gpa).map(|()| true)
    };
    let batch = u64::from(opts.batch_pages.max(1));
    // The pages asked for before the push began (a resume's waiters).
    if let Some(first) = first {
        for (w_at, &word) in first.0.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let i = w_at as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let Some(g) = pages.gpa(i) else { continue };
                if send(&mut w, sent, i, g).map_err(|e| broken(PostcopyPhase::Push, left, e))? {
                    requested += 1;
                    left -= 1;
                }
            }
        }
        w.flush()
            .map_err(|e| broken(PostcopyPhase::Push, left, e))?;
    }
    let mut region = 0usize;
    let mut k = 0u64;
    loop {
        // Requests first: those queued, at most a queue's worth, so a
        // destination repeating requests for pages already sent cannot
        // keep the push from its next batch.
        let mut asked = false;
        for _ in 0..RETURN_QUEUE {
            let m = match rx.try_recv() {
                Ok(m) => m,
                Err(_) => break,
            };
            match m {
                Msg::Request(gpa, n) => {
                    if !w.holds_run(gpa, n) {
                        refused_count += 1;
                        if refused.len() < REFUSED_KEPT {
                            refused.push(PostcopyError::BadRequest { gpa, pages: n });
                        }
                        continue;
                    }
                    for j in 0..u64::from(n) {
                        let g = GuestPhysAddr(gpa.0 + j * PAGE);
                        let Some(i) = pages.index(g) else { continue };
                        if send(&mut w, sent, i, g)
                            .map_err(|e| broken(PostcopyPhase::Push, left, e))?
                        {
                            requested += 1;
                            left -= 1;
                            asked = true;
                        }
                    }
                }
                Msg::Complete => complete = true,
                Msg::Garbled(index, bytes) => {
                    garbled = Some(PostcopyError::ReturnPathGarbled { index, bytes })
                }
                Msg::Closed(e) => closed = Some(e),
                Msg::Need(..) | Msg::NeedEnd => {
                    garbled = Some(PostcopyError::ReturnPathGarbled {
                        index: 0,
                        bytes: b"NEED outside a resume".to_vec(),
                    })
                }
            }
        }
        if asked {
            w.flush()
                .map_err(|e| broken(PostcopyPhase::Push, left, e))?;
        }
        if (closed.is_some() || complete) && left > 0 {
            // The destination went away (or says it is done, which
            // it cannot be before the end marker): stop pushing.
            {
                let e = closed.take().unwrap_or_else(|| {
                    io::Error::other("the destination sent COMPLETE before every page")
                });
                return Err(broken(
                    PostcopyPhase::Push,
                    left,
                    StreamError::Io {
                        at: w.stats().bytes,
                        source: e,
                    },
                ));
            }
        }
        // Then a batch of the background push.
        let mut n = 0;
        while n < batch {
            let Some(&(start, count, first)) = pages.regions.get(region) else {
                break;
            };
            if k >= count {
                region += 1;
                k = 0;
                continue;
            }
            let gpa = GuestPhysAddr(start + k * PAGE);
            if send(&mut w, sent, first + k, gpa)
                .map_err(|e| broken(PostcopyPhase::Push, left, e))?
            {
                pushed += 1;
                left -= 1;
                n += 1;
            }
            k += 1;
        }
        if region >= pages.regions.len() {
            break;
        }
        // A batch per chunk: a request waits behind one batch at most,
        // not behind a whole chunk of background pages.
        if n > 0 {
            w.flush()
                .map_err(|e| broken(PostcopyPhase::Push, left, e))?;
        }
    }
    let (out, stream) = match w.finish() {
        Ok(r) => r,
        Err(e) => return Err(broken(PostcopyPhase::Push, left, e)),
    };
    // Completion: the destination placed every page.
    let deadline = Instant::now() + opts.completion_timeout;
    while !complete {
        if let Some(g) = garbled.take() {
            return Err(g);
        }
        if let Some(e) = closed.take() {
            return Err(broken(
                PostcopyPhase::Completion,
                0,
                StreamError::Io {
                    at: stream.bytes,
                    source: e,
                },
            ));
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Msg::Complete) => complete = true,
            Ok(Msg::Request(..)) => {} // in flight already
            Ok(Msg::Garbled(index, bytes)) => {
                garbled = Some(PostcopyError::ReturnPathGarbled { index, bytes })
            }
            Ok(Msg::Closed(e)) => closed = Some(e),
            Ok(Msg::Need(..) | Msg::NeedEnd) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(PostcopyError::CompletionTimeout(opts.completion_timeout))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                closed = Some(io::Error::from(io::ErrorKind::UnexpectedEof))
            }
        }
    }
    Ok((
        out,
        stream,
        Pushed {
            pushed,
            requested,
            refused,
            refused_count,
        },
    ))
}

/// Resumes a post-copy migration whose connection broke after the
/// switchover, on a new connection (`out`, and `ret` its return path), with
/// the guest still stopped at the source and `mem` its memory. The
/// destination ([`PostcopyReceiving::resume`](super::PostcopyReceiving::resume))
/// says which pages it still lacks (and which threads wait on); this sends
/// those, requests first, then the end marker, and waits for COMPLETE.
/// `opts.bandwidth_limit` and `opts.stream` apply as to a [`Sender`].
pub fn resume_postcopy<W: Write, R: Read + Send + 'static>(
    mem: &GuestMemory,
    out: W,
    ret: R,
    opts: PrecopyOptions,
    post: PostcopyOptions,
) -> Result<(W, PostcopySummary), PostcopyError> {
    let t = Instant::now();
    let throttle = Throttle::new(out, opts.bandwidth_limit);
    let w = StreamWriter::for_memory_flags(
        throttle,
        mem,
        opts.stream,
        format::FLAG_POSTCOPY | format::FLAG_RESUME,
    )
    .map_err(|e| PostcopyError::Broken {
        phase: PostcopyPhase::Switchover,
        missing: 0,
        source: e,
    })?;
    let (tx, rx) = mpsc::sync_channel(RETURN_QUEUE);
    std::thread::Builder::new()
        .name("pagefold-postcopy-return".into())
        .spawn(move || read_return(ret, &tx))
        .map_err(|e| PostcopyError::Thread("return path", e))?;
    let pages = Pages::of(mem);
    let mut sent = Bits::new(pages.total, true);
    let mut needed = 0u64;
    // Requests before the NEED list: a set of pages, however many times
    // the destination repeats them (a list grew without bound: found by
    // review, tests/review_postcopy.rs).
    let mut first = Bits::new(pages.total, false);
    let mut refused = Vec::new();
    let mut refused_requests = 0u64;
    let deadline = Instant::now() + post.completion_timeout;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let broken = |source| PostcopyError::Broken {
            phase: PostcopyPhase::Switchover,
            missing: needed,
            source,
        };
        match rx.recv_timeout(wait) {
            Ok(Msg::Request(gpa, n)) => {
                if !w.holds_run(gpa, n) {
                    refused_requests += 1;
                    if refused.len() < REFUSED_KEPT {
                        refused.push(PostcopyError::BadRequest { gpa, pages: n });
                    }
                    continue;
                }
                for j in 0..u64::from(n) {
                    if let Some(i) = pages.index(GuestPhysAddr(gpa.0 + j * PAGE)) {
                        first.set(i);
                    }
                }
            }
            Ok(Msg::Need(gpa, n)) => {
                if !w.holds_run(gpa, n) {
                    return Err(PostcopyError::BadRequest { gpa, pages: n });
                }
                for j in 0..u64::from(n) {
                    if let Some(i) = pages.index(GuestPhysAddr(gpa.0 + j * PAGE)) {
                        if sent.get(i) {
                            sent.clear(i);
                            needed += 1;
                        }
                    }
                }
            }
            Ok(Msg::NeedEnd) => break,
            Ok(Msg::Complete) => {
                return Err(PostcopyError::ReturnPathGarbled {
                    index: 0,
                    bytes: b"COMPLETE before the NEED list".to_vec(),
                })
            }
            Ok(Msg::Garbled(index, bytes)) => {
                return Err(PostcopyError::ReturnPathGarbled { index, bytes })
            }
            Ok(Msg::Closed(e)) => {
                return Err(broken(StreamError::Io { at: 0, source: e }));
            }
            Err(_) => return Err(PostcopyError::CompletionTimeout(post.completion_timeout)),
        }
    }
    let switchover = t.elapsed();
    let post_start = Instant::now();
    let (out, stream, mut done) = push(mem, w, &rx, &pages, &mut sent, needed, Some(first), post)?;
    refused.append(&mut done.refused);
    refused.truncate(REFUSED_KEPT);
    Ok((
        out.out,
        PostcopySummary {
            precopy_rounds: 0,
            discarded: 0,
            needed,
            pushed: done.pushed,
            requested: done.requested,
            refused,
            refused_requests: refused_requests + done.refused_count,
            switchover,
            post_phase: post_start.elapsed(),
            total: t.elapsed(),
            stream,
        },
    ))
}
