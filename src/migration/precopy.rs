//! Pre-copy live migration on top of the stream: [`Sender`] sends all of
//! guest memory while the guest runs, then what it dirtied, round after
//! round, until what is left fits a downtime budget; the VMM then pauses its
//! vCPUs and [`Sender::finish`] sends the rest and the end marker.
//! [`receive_migration`] rebuilds the memory on the other side.
//!
//! ```
//! use pagefold::{GuestMemory, GuestPhysAddr};
//! use pagefold::migration::{receive_migration, PrecopyOptions, ReaderLimits, Sender};
//!
//! let mem = GuestMemory::new(&[(GuestPhysAddr(0), 1 << 20)])?;
//! mem.write_obj(GuestPhysAddr(0x3000), 7u64)?;
//! let mut m = Sender::start(&mem, Vec::new(), PrecopyOptions::default())?;
//! m.iterate()?; // returns when the rest fits the downtime budget
//! // ... the VMM pauses its vCPUs here ...
//! let (wire, summary) = m.finish()?;
//! let got = receive_migration(&wire[..], ReaderLimits::default())?;
//! assert_eq!(got.mem.read_obj::<u64>(GuestPhysAddr(0x3000))?, 7);
//! assert!(summary.rounds >= 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    collections::HashSet,
    io::{self, Read, Write},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    addr::{is_zero_page, GuestPhysAddr, PAGE_SIZE},
    dedup::{DedupError, DedupHost, ScanReport, VmId, VmOptions},
    dirty::{DirtyError, DirtyRun, RegionSet},
    memory::{AccessError, GuestMemory, PageKind},
};

use super::{
    error::StreamError,
    reader::{Event, ReaderLimits, ReceiveStats, StreamReader},
    taken::TakenPages,
    writer::{StreamWriter, WriterOptions, WriterStats},
};

/// Settings of a pre-copy migration.
#[derive(Clone, Copy, Debug)]
pub struct PrecopyOptions {
    /// Stop iterating when the dirty pages left would take at most this
    /// long to send at the measured bandwidth (the vCPUs are paused that
    /// long).
    pub downtime_budget: Duration,
    /// Stop iterating after this many rounds (round 0 included) even if
    /// the budget is not met (the guest dirties faster than the link).
    pub max_rounds: u32,
    /// Most bytes per second written to the output (a token bucket with a
    /// burst of a tenth of a second, at least 64 KiB); `None`: no cap.
    pub bandwidth_limit: Option<u64>,
    /// Put a digest of all of memory in the end marker, which the receiver
    /// checks (costs one read of memory on each side, during downtime).
    pub verify: bool,
    /// The stream's settings (chunk size, delta cache, seed).
    pub stream: WriterOptions,
}

impl Default for PrecopyOptions {
    fn default() -> Self {
        PrecopyOptions {
            downtime_budget: Duration::from_millis(300),
            max_rounds: 30,
            bandwidth_limit: None,
            verify: true,
            stream: WriterOptions::default(),
        }
    }
}

/// What a progress callback is told after each round's dirty harvest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// The round just sent (0: the full pass).
    pub round: u32,
    /// Bytes written to the output so far.
    pub bytes: u64,
    /// Pages sent in that round (zero pages of round 0 are not sent).
    pub round_pages: u64,
    /// Pages dirtied while that round was sent (what the next round sends).
    pub dirty_pages: u64,
    /// Those pages per second of that round.
    pub dirty_rate: f64,
    /// Measured bandwidth over all rounds, bytes per second.
    pub bandwidth: f64,
    /// `dirty_pages * 4 KiB / bandwidth`: the downtime if the VMM paused
    /// now.
    pub estimated_downtime: Duration,
}

/// How a migration went.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    /// Rounds sent, the last (paused) one included.
    pub rounds: u32,
    /// Pages sent in the last round, with the vCPUs paused.
    pub last_round_pages: u64,
    /// Time [`Sender::finish`] took: the downtime the sender caused.
    pub downtime: Duration,
    /// Time from [`Sender::start`] to the end.
    pub total: Duration,
    /// The stream's statistics (bytes, records of each kind).
    pub stream: WriterStats,
}

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The cancel flag was raised; the stream is incomplete. Start a new
    /// [`Sender`] to try again.
    #[error("migration cancelled")]
    Cancelled,
    /// The stream failed (the output's I/O error, or a bad page). Start a
    /// new [`Sender`] to try again.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Guest memory could not be read.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// Dirty tracking could not be set up or harvested.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// The dirty source ([`Sender::set_dirty_source`], e.g. KVM's dirty
    /// log) failed.
    #[error("fetching dirty pages from the dirty source: {0}")]
    DirtySource(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The sender failed or was cancelled earlier; it refuses further use.
    #[error("this migration already failed or was cancelled; start a new one")]
    Failed,
    /// Another [`Sender`] is migrating this memory; drop it first. (Each
    /// sender turns dirty tracking on and puts back what it found when it
    /// ends, so two at once would turn it off under each other.)
    #[error("another sender is migrating this memory; drop it first")]
    Busy,
}

/// An output with an optional token-bucket rate limit that gives up while
/// waiting once the cancel flag is raised.
pub(super) struct Throttle<W> {
    pub(super) out: W,
    rate: Option<f64>,
    burst: f64,
    tokens: f64,
    last: Instant,
    cancel: Arc<AtomicBool>,
}

impl<W> Throttle<W> {
    /// A throttle of `rate` bytes a second (`None`: none) with its own
    /// cancel flag, for a stream without a [`Sender`].
    pub(super) fn new(out: W, rate: Option<u64>) -> Self {
        let rate = rate.map(|r| r.max(1) as f64);
        let burst = rate.map_or(0.0, |r| (r / 10.0).max(64.0 * 1024.0));
        Throttle {
            out,
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<W: Write> Write for Throttle<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(rate) = self.rate {
            let want = (buf.len() as f64).min(self.burst);
            loop {
                let now = Instant::now();
                let dt = now.duration_since(self.last).as_secs_f64();
                self.last = now;
                self.tokens = (self.tokens + dt * rate).min(self.burst);
                if self.tokens >= want {
                    break;
                }
                if self.cancel.load(Ordering::Relaxed) {
                    // Not `Interrupted`: `write_all` retries that kind, and
                    // would spin here until the tokens came back.
                    return Err(io::Error::other("migration cancelled"));
                }
                let wait = ((want - self.tokens) / rate).min(0.05);
                std::thread::sleep(Duration::from_secs_f64(wait));
            }
        }
        let n = self.out.write(buf)?;
        self.tokens -= n as f64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<W> std::fmt::Debug for Throttle<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

type ProgressFn<'a> = Box<dyn FnMut(&Progress) + Send + 'a>;
type DirtySourceFn<'a> =
    Box<dyn FnMut() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + 'a>;

/// The sending end of a pre-copy migration of `mem` to an output `W`.
///
/// The sender only reads guest memory. It turns dirty tracking on for every
/// region before round 0 reads a page (so no write is missed) and puts each
/// region's tracking back as it found it when it finishes, fails or is
/// dropped. After an error or a cancel it refuses further use; a new
/// `Sender` (a new stream) retries from scratch.
pub struct Sender<'m, W: Write> {
    pub(super) mem: &'m GuestMemory,
    pub(super) writer: Option<StreamWriter<Throttle<W>>>,
    pub(super) opts: PrecopyOptions,
    pub(super) cancel: Arc<AtomicBool>,
    progress: Option<ProgressFn<'m>>,
    dirty_source: Option<DirtySourceFn<'m>>,
    /// Each region's tracking before the migration (restored at the end).
    tracking_before: Option<Vec<bool>>,
    /// This sender holds the memory's migration claim (released on drop).
    claimed: bool,
    /// The stream was started for post-copy.
    pub(super) postcopy: bool,
    /// The next round to send.
    pub(super) round: u32,
    /// Dirty pages harvested and not yet sent.
    pub(super) pending: Vec<DirtyRun>,
    pub(super) pending_pages: u64,
    /// Every page a harvest took, put back into the log on drop.
    taken: TakenPages,
    /// Time spent sending and bytes sent, for the bandwidth estimate.
    busy: Duration,
    pub(super) started: Instant,
}

impl<W: Write> std::fmt::Debug for Sender<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("round", &self.round)
            .field("pending_pages", &self.pending_pages)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl<'m, W: Write> Sender<'m, W> {
    /// Starts a migration of `mem` to `out`: turns dirty tracking on for
    /// every region (clearing what it had logged: round 0 reads every page
    /// after this) and writes the stream header. Nothing else is sent until
    /// [`iterate`](Self::iterate). One sender at a time per memory: a
    /// second start while one lives is [`MigrationError::Busy`] (to retry
    /// after a cancel, drop the old sender first; a review found the
    /// idiomatic `s = Sender::start(..)?` letting the old one turn tracking
    /// off under the new one when it was dropped).
    pub fn start(
        mem: &'m GuestMemory,
        out: W,
        opts: PrecopyOptions,
    ) -> Result<Self, MigrationError> {
        Self::start_with(mem, out, opts, 0)
    }

    /// [`start`](Self::start) for a migration that switches to post-copy
    /// ([`switchover`](Self::switchover)) after zero or more
    /// [`iterate`](Self::iterate) calls: the stream's header says so
    /// (`FLAG_POSTCOPY`), and its receiver is
    /// [`receive_postcopy`](super::receive_postcopy).
    pub fn start_postcopy(
        mem: &'m GuestMemory,
        out: W,
        opts: PrecopyOptions,
    ) -> Result<Self, MigrationError> {
        Self::start_with(mem, out, opts, super::format::FLAG_POSTCOPY)
    }

    fn start_with(
        mem: &'m GuestMemory,
        out: W,
        opts: PrecopyOptions,
        flags: u16,
    ) -> Result<Self, MigrationError> {
        if !mem.claim_for_migration() {
            return Err(MigrationError::Busy);
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let rate = opts.bandwidth_limit.map(|r| r.max(1) as f64);
        let burst = rate.map_or(0.0, |r| (r / 10.0).max(64.0 * 1024.0));
        let throttle = Throttle {
            out,
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
            cancel: Arc::clone(&cancel),
        };
        let before = match (0..mem.regions().len())
            .map(|i| mem.dirty_tracking(i))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(before) => before,
            Err(e) => {
                mem.release_from_migration();
                return Err(e.into());
            }
        };
        let mut s = Sender {
            mem,
            writer: None,
            opts,
            cancel,
            progress: None,
            dirty_source: None,
            tracking_before: Some(before),
            claimed: true,
            postcopy: flags & super::format::FLAG_POSTCOPY != 0,
            round: 0,
            pending: Vec::new(),
            pending_pages: 0,
            taken: TakenPages::new(mem),
            busy: Duration::ZERO,
            started: Instant::now(),
        };
        // On error here, `Drop` restores tracking.
        mem.set_dirty_tracking(RegionSet::All, true)?;
        let mut stale = Vec::new();
        let took = mem.take_dirty(RegionSet::All, &mut stale);
        s.taken.record(mem, &stale);
        took?;
        s.writer = Some(StreamWriter::for_memory_flags(
            throttle,
            mem,
            opts.stream,
            flags,
        )?);
        Ok(s)
    }

    /// A flag that cancels the migration when set (from any thread): the
    /// running [`iterate`](Self::iterate) or [`finish`](Self::finish)
    /// returns [`MigrationError::Cancelled`] within a few pages or, under a
    /// bandwidth cap, within 50 ms.
    pub fn cancel_handle(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cancel)
    }

    /// Calls `f` after each round's dirty harvest.
    pub fn on_progress(&mut self, f: impl FnMut(&Progress) + Send + 'm) {
        self.progress = Some(Box::new(f));
    }

    /// Calls `f` before every harvest of the dirty log, for writers the
    /// memory layer does not see: a KVM VMM passes a closure that calls
    /// [`KvmVm::fetch_dirty_log`](crate::kvm::KvmVm::fetch_dirty_log),
    /// which ORs KVM's log into the memory's. Call it right after
    /// [`start`](Self::start) (round 0 reads every page after `start`, so
    /// KVM's log need only cover writes from then on: fetch and discard it
    /// before `start` if the VM ran with logging on). An error of `f` fails
    /// the migration with [`MigrationError::DirtySource`].
    pub fn set_dirty_source(
        &mut self,
        f: impl FnMut() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + 'm,
    ) {
        self.dirty_source = Some(Box::new(f));
    }

    /// Harvests the dirty log into `pending`, after asking the dirty
    /// source (if any) to bring its writes in.
    pub(super) fn harvest(&mut self) -> Result<u64, MigrationError> {
        if let Some(f) = self.dirty_source.as_mut() {
            f().map_err(MigrationError::DirtySource)?;
        }
        let before = self.pending.len();
        let took = self.mem.take_dirty(RegionSet::All, &mut self.pending);
        self.taken.record(self.mem, &self.pending[before..]);
        Ok(took?)
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.stats().bytes)
    }

    /// Sends round 0 (every page that is not zero) if not yet sent, then
    /// rounds of dirtied pages until the estimated downtime fits the budget
    /// or the round limit is reached. Returns the last estimate; the VMM
    /// then pauses its vCPUs and calls [`finish`](Self::finish). May be
    /// called again (e.g. when the VMM could not pause yet).
    pub fn iterate(&mut self) -> Result<Progress, MigrationError> {
        let r = self.iterate_inner();
        self.fail_on_err(r)
    }

    fn iterate_inner(&mut self) -> Result<Progress, MigrationError> {
        loop {
            self.check_cancel()?;
            let t = Instant::now();
            let sent = if self.round == 0 {
                self.full_pass()?
            } else {
                self.send_pending()?
            };
            let elapsed = t.elapsed();
            self.busy += elapsed;
            self.round += 1;
            // What was dirtied while this round was sent.
            let dirty = self.harvest()?;
            self.pending_pages += dirty;
            let p = self.progress_now(sent, dirty, elapsed);
            if let Some(f) = self.progress.as_mut() {
                f(&p);
            }
            if p.estimated_downtime <= self.opts.downtime_budget
                || self.round >= self.opts.max_rounds.max(1)
            {
                return Ok(p);
            }
        }
    }

    /// With the vCPUs paused: sends the last round (every page dirtied
    /// since the last harvest), the end marker (with the memory digest if
    /// [`PrecopyOptions::verify`]), flushes, puts dirty tracking back as
    /// it was, and returns the output.
    pub fn finish(mut self) -> Result<(W, Summary), MigrationError> {
        let t = Instant::now();
        let r = self.finish_inner();
        let (pages, (out, stats)) = self.fail_on_err(r)?;
        self.restore_tracking();
        Ok((
            out.out,
            Summary {
                rounds: self.round,
                last_round_pages: pages,
                downtime: t.elapsed(),
                total: self.started.elapsed(),
                stream: stats,
            },
        ))
    }

    #[allow(clippy::type_complexity)]
    fn finish_inner(&mut self) -> Result<(u64, (Throttle<W>, WriterStats)), MigrationError> {
        self.check_cancel()?;
        if self.round == 0 {
            self.full_pass()?;
            self.round = 1;
        }
        let dirty = self.harvest()?;
        self.pending_pages += dirty;
        let pages = self.send_pending()?;
        self.round += 1;
        self.check_cancel()?;
        let w = self.writer.take().ok_or(MigrationError::Failed)?;
        let done = if self.opts.verify {
            w.finish_verified(self.mem)
        } else {
            w.finish()
        };
        Ok((pages, self.map_stream(done)?))
    }

    /// Round 0: every page that is not zero. The receiver starts from
    /// zeroed memory, so zero pages need no record. Pages the memory layer
    /// knows read zeros are not even read; a released or ballooned page
    /// whose raw writes are not trapped may have been written since (a
    /// guest reusing a page it reported free, a vCPU storing to a merged
    /// zero page), so it is read if the kernel holds memory for it: one
    /// that holds none is a hole and reads as zeros (reading it through the
    /// mapping would only allocate it).
    fn full_pass(&mut self) -> Result<u64, MigrationError> {
        self.begin_round(0)?;
        let mem = self.mem;
        let mut sent = 0u64;
        let mut page = [0u8; PAGE_SIZE];
        let mut holes = crate::memory::ReleasedData::new(mem);
        for region in mem.regions() {
            let states = region.page_states();
            for i in 0..states.len() {
                if i % 256 == 0 {
                    self.check_cancel()?;
                }
                let state = states.load(i);
                if matches!(state.kind(), PageKind::Zero | PageKind::Ballooned)
                    && !(state.is_released_untrapped() && holes.holds_data(region, i, state))
                {
                    continue;
                }
                let gpa = GuestPhysAddr(region.start().0 + (i as u64) * PAGE_SIZE as u64);
                mem.read(gpa, &mut page)?;
                if is_zero_page(&page) {
                    continue;
                }
                let w = self.writer.as_mut().ok_or(MigrationError::Failed)?;
                let r = w.page(gpa, &page);
                self.map_stream(r)?;
                sent += 1;
            }
        }
        self.flush()?;
        Ok(sent)
    }

    /// A round of the pages harvested so far.
    fn send_pending(&mut self) -> Result<u64, MigrationError> {
        self.begin_round(self.round)?;
        let runs = std::mem::take(&mut self.pending);
        self.pending_pages = 0;
        let mut sent = 0u64;
        for run in &runs {
            for gpa in run.addrs() {
                if sent % 256 == 0 {
                    self.check_cancel()?;
                }
                let w = self.writer.as_mut().ok_or(MigrationError::Failed)?;
                let r = w.send_page(self.mem, gpa);
                self.map_stream(r)?;
                sent += 1;
            }
        }
        self.flush()?;
        Ok(sent)
    }

    fn begin_round(&mut self, round: u32) -> Result<(), MigrationError> {
        let w = self.writer.as_mut().ok_or(MigrationError::Failed)?;
        let r = w.begin_round(round);
        self.map_stream(r)
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        let w = self.writer.as_mut().ok_or(MigrationError::Failed)?;
        let r = w.flush();
        self.map_stream(r)
    }

    fn progress_now(&self, round_pages: u64, dirty: u64, elapsed: Duration) -> Progress {
        let secs = self.busy.as_secs_f64().max(1e-6);
        let mut bandwidth = self.bytes() as f64 / secs;
        if let Some(cap) = self.opts.bandwidth_limit {
            bandwidth = bandwidth.min(cap as f64);
        }
        let bandwidth = bandwidth.max(1.0);
        let est = self.pending_pages as f64 * PAGE_SIZE as f64 / bandwidth;
        Progress {
            round: self.round - 1,
            bytes: self.bytes(),
            round_pages,
            dirty_pages: dirty,
            dirty_rate: dirty as f64 / elapsed.as_secs_f64().max(1e-6),
            bandwidth,
            estimated_downtime: Duration::from_secs_f64(est.min(1e9)),
        }
    }

    /// A stream error, or `Cancelled` if the error came from a cancel.
    fn map_stream<T>(&self, r: Result<T, StreamError>) -> Result<T, MigrationError> {
        r.map_err(|e| {
            if self.cancel.load(Ordering::Relaxed) {
                MigrationError::Cancelled
            } else {
                MigrationError::Stream(e)
            }
        })
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.writer.is_none() {
            Err(MigrationError::Failed)
        } else if self.cancel.load(Ordering::Relaxed) {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// After an error the sender is spent: drop the stream, put tracking
    /// back.
    pub(super) fn fail_on_err<T>(
        &mut self,
        r: Result<T, MigrationError>,
    ) -> Result<T, MigrationError> {
        if r.is_err() {
            self.writer = None;
            self.restore_tracking();
        }
        r
    }

    pub(super) fn restore_tracking(&mut self) {
        if let Some(before) = self.tracking_before.take() {
            for (i, on) in before.into_iter().enumerate() {
                // Only fails for a region index out of range, which these
                // are not; nothing useful to do with an error in a drop.
                let _ = self.mem.set_dirty_tracking(RegionSet::One(i), on);
            }
        }
    }
}

impl<W: Write> Drop for Sender<'_, W> {
    fn drop(&mut self) {
        // Whether the migration finished, failed or was cancelled: the
        // log keeps every page written since the last snapshot.
        self.taken.put_back(self.mem);
        self.restore_tracking();
        if std::mem::take(&mut self.claimed) {
            self.mem.release_from_migration();
        }
    }
}

/// What [`receive_migration`] rebuilt.
#[derive(Debug)]
pub struct Received {
    /// The guest memory, byte for byte the sender's at pause time.
    pub mem: GuestMemory,
    /// What the stream carried.
    pub stats: ReceiveStats,
    /// Time from the first byte to the end marker.
    pub elapsed: Duration,
    /// Time from the last round marker to the end marker (the receiver's
    /// share of the downtime).
    pub last_round: Duration,
}

/// Receives a pre-copy migration into new guest memory with the stream's
/// layout. On any error (truncated, corrupt, unknown version, digest
/// mismatch) the partial memory is dropped and a typed error returned.
pub fn receive_migration<R: Read>(input: R, limits: ReaderLimits) -> Result<Received, StreamError> {
    let t = Instant::now();
    let mut reader = StreamReader::new(input, limits)?;
    let mem = reader.create_memory()?;
    let mut last = Instant::now();
    let stats = reader.apply_all(&mem, |ev| {
        if matches!(ev, super::reader::Event::Round(_)) {
            last = Instant::now();
        }
    })?;
    Ok(Received {
        mem,
        stats,
        elapsed: t.elapsed(),
        last_round: last.elapsed(),
    })
}

/// What [`receive_migration_folded`] rebuilt.
#[derive(Debug)]
pub struct FoldedReceived {
    /// The guest memory, byte for byte the sender's at pause time, on the
    /// host's frame store and registered with it.
    pub mem: Arc<GuestMemory>,
    /// Its id with the dedup host.
    pub vm: VmId,
    /// What the stream carried.
    pub stats: ReceiveStats,
    /// Pages the stream delivered as references (and their sources) that
    /// were offered to the dedup host.
    pub fold_candidates: u64,
    /// What folding them did.
    pub fold: ScanReport,
    /// Time folding took (after the end marker).
    pub fold_time: Duration,
    /// Time from the first byte to the end marker, folding not included.
    pub elapsed: Duration,
    /// Time from the last round marker to the end marker.
    pub last_round: Duration,
}

/// Why [`receive_migration_folded`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream was truncated, corrupt or of an unknown version, or the
    /// memory could not be created; nothing was kept.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Registering with or folding by the dedup host failed.
    #[error(transparent)]
    Dedup(#[from] DedupError),
}

/// Receives a pre-copy migration folded on arrival: the memory is created
/// on `host`'s frame store and registered with it (`options`), and every
/// page that arrived as a reference (REF, REF_RUN), together with the page
/// it was copied from, is merged by the host once the end marker has
/// checked out ([`DedupHost::merge_pages`]: hashed and compared again, so a
/// page overwritten by a later round simply does not merge). Duplicates of
/// content the host already shares for other VMs of the domain fold onto
/// those frames too. Zero pages are never allocated (the receiver starts
/// zeroed and punches ZERO runs). Pages that arrived whole are not
/// scanned; the host's own scanner finds anything else later.
///
/// On any stream error the partial memory is dropped (it is registered
/// only after the end marker checked out); if folding fails, it is
/// unregistered again.
pub fn receive_migration_folded<R: Read>(
    input: R,
    limits: ReaderLimits,
    host: &DedupHost,
    options: VmOptions,
) -> Result<FoldedReceived, ReceiveError> {
    let t = Instant::now();
    let mut reader = StreamReader::new(input, limits)?;
    let mem = Arc::new(reader.create_memory_in(Arc::clone(host.frame_store()))?);
    let mut last = Instant::now();
    // Pages whose last record carried them whole (FULL, DELTA): not
    // offered. References and their sources are; so are pages no record
    // wrote (holes: the scan finds them zero and leaves them released).
    let mut whole: HashSet<GuestPhysAddr> = HashSet::new();
    let mut sources: Vec<GuestPhysAddr> = Vec::new();
    let page = PAGE_SIZE as u64;
    let applied = reader.apply_all(&mem, |ev| match *ev {
        Event::Round(_) => last = Instant::now(),
        Event::Full { gpa } | Event::Delta { gpa, .. } => {
            whole.insert(gpa);
        }
        Event::Zero { gpa, pages } => {
            for i in 0..u64::from(pages) {
                whole.remove(&GuestPhysAddr(gpa.0 + i * page));
            }
        }
        Event::Ref { gpa, from } => {
            whole.remove(&gpa);
            sources.push(from);
        }
        Event::RefRun { gpa, from, pages } => {
            for i in 0..u64::from(pages) {
                whole.remove(&GuestPhysAddr(gpa.0 + i * page));
                sources.push(GuestPhysAddr(from.0 + i * page));
            }
        }
        Event::End { .. } => {}
    });
    let stats = applied?;
    let elapsed = t.elapsed();
    let last_round = last.elapsed();
    let vm = host.register(Arc::clone(&mem), options)?;
    let f = Instant::now();
    let mut candidates = sources;
    for r in mem.regions() {
        candidates.extend(
            (0..r.size() / page)
                .map(|i| GuestPhysAddr(r.start().0 + i * page))
                .filter(|a| !whole.contains(a)),
        );
    }
    candidates.sort_unstable();
    candidates.dedup();
    let fold = match host.merge_pages(vm, &candidates) {
        Ok(r) => r,
        Err(e) => {
            let _ = host.unregister(vm);
            return Err(e.into());
        }
    };
    Ok(FoldedReceived {
        mem,
        vm,
        stats,
        fold_candidates: candidates.len() as u64,
        fold,
        fold_time: f.elapsed(),
        elapsed,
        last_round,
    })
}
