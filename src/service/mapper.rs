//! The service's side of one VMM process: a [`RemoteMapper`] that arms and
//! releases write protection in the process through its own userfaultfd,
//! and asks it over the socket to remap or restore pages, waiting for its
//! acknowledgement against a deadline.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use super::{
    control::{ControlPage, Window},
    socket::Conn,
    wire::{run_span, Ack, AckStatus, Message, PageRun, Remap, RemapRun, RemapTo, Restore},
};
use crate::{
    addr::HostVirtAddr,
    dedup::remote::{RemoteError, RemoteMapper, RemoteRun, RemoteTarget},
    userfault::Userfault,
};

/// Takes merges.
const USABLE: u8 = 0;
/// Takes no more merges (what the service's view shows of it can no
/// longer be trusted), but is still protected, broken and unmerged.
const QUARANTINED: u8 = 1;
/// Its connection is gone: nothing is asked of it.
const LOST: u8 = 2;

/// How long a `Restore` (the process copies its pages home) may take per
/// page beyond the deadline: 20 us a page, 5 s a GiB.
const RESTORE_PER_PAGE: Duration = Duration::from_micros(20);

/// One region of the client as it maps it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientRegion {
    pub(crate) host_addr: HostVirtAddr,
    pub(crate) pages: usize,
}

/// A VMM process under the service.
pub(crate) struct ConnMapper {
    sender: Mutex<Conn>,
    acks: Mutex<Receiver<Ack>>,
    uffd: Userfault,
    control: ControlPage,
    regions: Vec<ClientRegion>,
    seq: AtomicU64,
    state: AtomicU8,
    /// A window was rolled back for want of an answer: no more merges are
    /// asked of it (each would wait the deadline again, and the requests
    /// would fill its socket) until any answer comes.
    stalled: AtomicBool,
    /// Held from a request's send to its answer: one request at a time, so
    /// an answer is never taken by another waiter.
    request: Mutex<()>,
    deadline: Duration,
    /// The process, as a pidfd (readable once it exited), where the kernel
    /// gave one.
    pidfd: Option<OwnedFd>,
    pid: i32,
}

/// A request sent and not yet answered; the mapper takes no other meanwhile.
pub(crate) struct Pending<'a> {
    _one_at_a_time: std::sync::MutexGuard<'a, ()>,
    seq: u64,
    deadline: Duration,
}

impl ConnMapper {
    pub(crate) fn new(
        sender: Conn,
        acks: Receiver<Ack>,
        uffd: Userfault,
        control: ControlPage,
        regions: Vec<ClientRegion>,
        deadline: Duration,
        pid: i32,
    ) -> Self {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = libc::c_int::try_from(raw)
            .ok()
            .filter(|fd| *fd >= 0)
            // SAFETY: a fresh descriptor nobody else owns.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        ConnMapper {
            pidfd,
            pid,
            sender: Mutex::new(sender),
            acks: Mutex::new(acks),
            uffd,
            control,
            regions,
            seq: AtomicU64::new(1),
            state: AtomicU8::new(USABLE),
            stalled: AtomicBool::new(false),
            request: Mutex::new(()),
            deadline,
        }
    }

    /// Closes the connection: the process sees it end (it releases what the
    /// service armed and brings merged pages home where it must).
    pub(crate) fn hang_up(&self) {
        let conn = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = conn.stream().shutdown(std::net::Shutdown::Both);
    }

    /// Whether the process has exited (`None`: the kernel gave no pidfd).
    pub(crate) fn exited(&self, wait_ms: i32) -> Option<bool> {
        let Some(fd) = self.pidfd.as_ref() else {
            // No pidfd (the kernel refused one): whether the pid still
            // names a process. Never "gone" while it does.
            std::thread::sleep(Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)));
            // SAFETY: kill with signal 0 only checks that the pid exists.
            let rc = unsafe { libc::kill(self.pid, 0) };
            return Some(
                rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH),
            );
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, wait_ms) };
        Some(n > 0)
    }

    /// An answer came: a stalled process takes merges again.
    pub(crate) fn answered(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }

    /// Whether the connection is gone.
    pub(crate) fn is_lost(&self) -> bool {
        self.state.load(Ordering::SeqCst) == LOST
    }

    fn one_at_a_time(&self) -> std::sync::MutexGuard<'_, ()> {
        self.request
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection is gone: nothing more is asked of it.
    pub(crate) fn mark_lost(&self) {
        self.state.store(LOST, Ordering::SeqCst);
    }

    /// The client's address and length of `count` pages from `first` of
    /// `region`, if they lie inside it.
    fn span(&self, region: usize, first: usize, count: usize) -> Option<(HostVirtAddr, u64)> {
        let r = self.regions.get(region)?;
        let (addr, len) = run_span(r.host_addr, r.pages, first as u64, count as u64)?;
        Some((addr, len as u64))
    }

    fn send(&self, msg: &Message) -> Result<(), RemoteError> {
        let conn = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        conn.send(msg, &[]).map_err(|e| {
            self.mark_lost();
            RemoteError::Lost(e.to_string())
        })
    }

    /// Waits for the ack of `seq` until `until`: `None` on the deadline.
    fn wait_ack(&self, seq: u64, until: Instant) -> Result<Option<Ack>, RemoteError> {
        let acks = self
            .acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match acks.recv_timeout(left) {
                // An ack of an earlier, abandoned request: skip it.
                Ok(ack) if ack.seq != seq => continue,
                Ok(ack) => return Ok(Some(ack)),
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    self.mark_lost();
                    return Err(RemoteError::Lost("the connection closed".into()));
                }
            }
        }
    }

    fn lost(&self, why: String) -> RemoteError {
        self.quarantine();
        RemoteError::Lost(why)
    }
}

impl ConnMapper {
    pub(crate) fn protect(
        &self,
        region: usize,
        first: usize,
        count: usize,
    ) -> Result<(), RemoteError> {
        if self.is_lost() {
            return Err(RemoteError::Lost("the VMM process is gone".into()));
        }
        let (addr, len) = self.span(region, first, count).ok_or_else(|| {
            RemoteError::Lost(format!(
                "pages {first}+{count} of region {region} are outside the process's memory"
            ))
        })?;
        self.uffd
            .protect(addr, len)
            .map_err(|e| RemoteError::Lost(e.to_string()))
    }

    pub(crate) fn remap(&self, region: usize, runs: &[RemoteRun]) -> Result<(), RemoteError> {
        let _one = self.one_at_a_time();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let msg = Message::Remap(Remap {
            seq,
            region: u32::try_from(region).map_err(|_| self.lost("region index".into()))?,
            runs: runs
                .iter()
                .map(|r| RemapRun {
                    first_page: r.first_page,
                    pages: r.pages,
                    target: match r.target {
                        RemoteTarget::Shared { file_offset } => RemapTo::Shared { file_offset },
                        RemoteTarget::Zero => RemapTo::Zero,
                    },
                })
                .collect(),
        });
        self.control.arm(seq);
        self.send(&msg)?;
        let started = Instant::now();
        match self.wait_ack(seq, started + self.deadline)? {
            Some(Ack {
                status: AckStatus::Done,
                ..
            }) => return Ok(()),
            Some(Ack {
                status: AckStatus::Skipped,
                ..
            }) => {
                return Err(RemoteError::RolledBack {
                    millis: u64::try_from(self.deadline.as_millis()).unwrap_or(u64::MAX),
                })
            }
            Some(Ack { errno, .. }) if errno == libc::ENOMEM.unsigned_abs() => {
                // Out of mappings: it undid what it had done.
                return Err(RemoteError::MapLimit);
            }
            Some(Ack { errno, .. }) => {
                return Err(self.lost(format!("the VMM process failed to remap (errno {errno})")))
            }
            None => {}
        }
        // The deadline passed: revoke the window unless the client took it.
        if self.control.advance(seq, Window::Armed, Window::Revoked) {
            self.stalled.store(true, Ordering::SeqCst);
            return Err(RemoteError::RolledBack {
                millis: u64::try_from(self.deadline.as_millis()).unwrap_or(u64::MAX),
            });
        }
        // It took the window and is remapping: a few `mmap` calls. Give it
        // as long again, then give up on the process.
        let until = Instant::now() + self.deadline;
        loop {
            match self.control.state(seq) {
                Window::Done => return Ok(()),
                Window::Taken if Instant::now() < until => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                _ => {
                    return Err(self
                        .lost("the VMM process took a remap window and did not finish it".into()))
                }
            }
        }
    }

    /// Has the process map `runs` at their own frames again, copying its
    /// bytes there first with `copy` (`Restore`), or not (`Home`).
    pub(crate) fn home(
        &self,
        region: usize,
        runs: &[(u64, u64)],
        copy: bool,
    ) -> Result<(), RemoteError> {
        let pending = self.send_home(region, runs, copy)?;
        self.wait_home(pending)
    }

    /// Sends the `Restore` (with `copy`) or `Home` of [`home`](Self::home)
    /// without waiting: its sequence number, for [`wait_home`](Self::wait_home).
    pub(crate) fn send_home(
        &self,
        region: usize,
        runs: &[(u64, u64)],
        copy: bool,
    ) -> Result<Pending<'_>, RemoteError> {
        let one = self.one_at_a_time();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        // A process that copies its pages home may take a while for many;
        // one that only remaps takes the deadline.
        let pages: u64 = runs.iter().map(|r| r.1).sum();
        let deadline = if copy {
            self.deadline
                + RESTORE_PER_PAGE.saturating_mul(u32::try_from(pages).unwrap_or(u32::MAX))
        } else {
            self.deadline
        };
        let restore = Restore {
            seq,
            region: u32::try_from(region).map_err(|_| self.lost("region index".into()))?,
            runs: runs
                .iter()
                .map(|&(first_page, pages)| PageRun { first_page, pages })
                .collect(),
        };
        let msg = if copy {
            Message::Restore(restore)
        } else {
            Message::Home(restore)
        };
        self.send(&msg)?;
        Ok(Pending {
            _one_at_a_time: one,
            seq,
            deadline,
        })
    }

    /// Waits for the ack of a `Restore` or `Home` sent.
    pub(crate) fn wait_home(&self, pending: Pending<'_>) -> Result<(), RemoteError> {
        match self.wait_ack(pending.seq, Instant::now() + pending.deadline)? {
            Some(Ack {
                status: AckStatus::Done,
                ..
            }) => Ok(()),
            Some(Ack { errno, .. }) => Err(self.lost(format!(
                "the VMM process failed to restore its pages (errno {errno})"
            ))),
            // What it maps now is unknown: it may still restore them.
            None => Err(self.lost("the VMM process did not restore its pages in time".into())),
        }
    }

    pub(crate) fn release(
        &self,
        region: usize,
        unprotect: &[(usize, usize)],
        wake: (usize, usize),
    ) {
        for &(first, count) in unprotect {
            if let Some((addr, len)) = self.span(region, first, count) {
                let _ = self.uffd.unprotect(addr, len, false);
            }
        }
        if let Some((addr, len)) = self.span(region, wake.0, wake.1) {
            let _ = self.uffd.wake(addr, len);
        }
    }

    /// Whether it takes merges: not quarantined, lost or stalled.
    pub(crate) fn usable(&self) -> bool {
        self.state.load(Ordering::SeqCst) == USABLE && !self.stalled.load(Ordering::SeqCst)
    }

    pub(crate) fn quarantine(&self) {
        let _ =
            self.state
                .compare_exchange(USABLE, QUARANTINED, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Every process that maps one VM's memory: the VMM's and, in
/// break-on-write mode, its second mappers. What the dedup engine asks of
/// the VM's remote side goes to each in turn.
pub(crate) struct VmMappers {
    primary: Arc<ConnMapper>,
    others: RwLock<Vec<Arc<ConnMapper>>>,
    break_on_write: bool,
    quarantined: AtomicBool,
}

impl VmMappers {
    pub(crate) fn new(primary: Arc<ConnMapper>, break_on_write: bool) -> Self {
        VmMappers {
            primary,
            others: RwLock::new(Vec::new()),
            break_on_write,
            quarantined: AtomicBool::new(false),
        }
    }

    pub(crate) fn break_on_write(&self) -> bool {
        self.break_on_write
    }

    pub(crate) fn primary(&self) -> &Arc<ConnMapper> {
        &self.primary
    }

    /// Adds a second mapper: every window from now on includes it.
    pub(crate) fn add(&self, m: Arc<ConnMapper>) {
        write_lock(&self.others).push(m);
    }

    /// Drops a second mapper whose connection ended.
    pub(crate) fn remove(&self, m: &Arc<ConnMapper>) {
        write_lock(&self.others).retain(|o| !Arc::ptr_eq(o, m));
    }

    /// Every mapper, primary first. A lost one stays until it is removed,
    /// so an operation on the VM fails rather than skip a process that may
    /// still map its pages (found by review: an empty set counted as
    /// success, and frames a live process mapped were punched).
    fn all(&self) -> Vec<Arc<ConnMapper>> {
        let others = read_lock(&self.others);
        std::iter::once(Arc::clone(&self.primary))
            .chain(others.iter().cloned())
            .collect()
    }

    /// The second mappers still connected.
    pub(crate) fn others(&self) -> Vec<Arc<ConnMapper>> {
        read_lock(&self.others)
            .iter()
            .filter(|m| !m.is_lost())
            .cloned()
            .collect()
    }
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RemoteMapper for VmMappers {
    fn protect(&self, region: usize, first: usize, count: usize) -> Result<(), RemoteError> {
        for m in self.all() {
            m.protect(region, first, count)?;
        }
        Ok(())
    }

    fn remap(&self, region: usize, runs: &[RemoteRun]) -> Result<(), RemoteError> {
        let all = self.all();
        if let Some(gone) = all.iter().find(|m| m.is_lost()) {
            let _ = gone;
            return Err(RemoteError::Lost("a process of the VM is gone".into()));
        }
        for (i, m) in all.iter().enumerate() {
            if let Err(e) = m.remap(region, runs) {
                // The ones before remapped: back to their own frames
                // (unpunched, equal to what they held), still protected.
                let pages: Vec<(u64, u64)> = runs.iter().map(|r| (r.first_page, r.pages)).collect();
                for done in &all[..i] {
                    if done.home(region, &pages, false).is_err() {
                        self.quarantine();
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn holds_truth(&self) -> bool {
        !self.break_on_write
    }

    fn restore(&self, region: usize, runs: &[(u64, u64)]) -> Result<(), RemoteError> {
        // Every mapper at once: each remaps in its own process (its own
        // mmap lock), so the break costs one round trip, not one per mapper.
        let all = self.all();
        if all.iter().any(|m| m.is_lost()) {
            return Err(RemoteError::Lost("a process of the VM is gone".into()));
        }
        let mut sent = Vec::with_capacity(all.len());
        let mut result = Ok(());
        for m in &all {
            match m.send_home(region, runs, !self.break_on_write) {
                Ok(pending) => sent.push((m, pending)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        for (m, pending) in sent {
            if let Err(e) = m.wait_home(pending) {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        if result.is_err() {
            self.quarantine();
        }
        result
    }

    fn release(&self, region: usize, unprotect: &[(usize, usize)], wake: (usize, usize)) {
        for m in self.all() {
            m.release(region, unprotect, wake);
        }
    }

    fn usable(&self) -> bool {
        !self.quarantined.load(Ordering::SeqCst)
            && self.primary.usable()
            && self.all().iter().all(|m| m.usable())
    }

    fn quarantine(&self) {
        self.quarantined.store(true, Ordering::SeqCst);
    }

    fn keeps_merged_protected(&self) -> bool {
        self.break_on_write
    }
}
