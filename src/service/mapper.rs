//! The service's side of one VMM process: a [`RemoteMapper`] that arms and
//! releases write protection in the process through its own userfaultfd,
//! and asks it over the socket to remap or restore pages, waiting for its
//! acknowledgement against a deadline.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
        Mutex,
    },
    time::{Duration, Instant},
};

use super::{
    control::{ControlPage, Window},
    socket::Conn,
    wire::{Ack, AckStatus, Message, PageRun, Remap, RemapRun, RemapTo, Restore},
};
use crate::{
    addr::{HostVirtAddr, PAGE_SIZE},
    dedup::remote::{RemoteError, RemoteMapper, RemoteRun, RemoteTarget},
    userfault::Userfault,
};

const USABLE: u8 = 0;
const QUARANTINED: u8 = 1;
const LOST: u8 = 2;

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
    ) -> Self {
        ConnMapper {
            sender: Mutex::new(sender),
            acks: Mutex::new(acks),
            uffd,
            control,
            regions,
            seq: AtomicU64::new(1),
            state: AtomicU8::new(USABLE),
            deadline,
        }
    }

    /// The connection is gone: nothing more is asked of it.
    pub(crate) fn mark_lost(&self) {
        self.state.store(LOST, Ordering::SeqCst);
    }

    /// The client's address and length of `count` pages from `first` of
    /// `region`, if they lie inside it.
    fn span(&self, region: usize, first: usize, count: usize) -> Option<(HostVirtAddr, u64)> {
        let r = self.regions.get(region)?;
        if first.checked_add(count)? > r.pages || count == 0 {
            return None;
        }
        let addr = r.host_addr.0.checked_add((first * PAGE_SIZE) as u64)?;
        Some((HostVirtAddr(addr), (count * PAGE_SIZE) as u64))
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

impl RemoteMapper for ConnMapper {
    fn protect(&self, region: usize, first: usize, count: usize) -> Result<(), RemoteError> {
        if !self.usable() {
            return Err(RemoteError::Lost("the VMM process takes no merges".into()));
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

    fn remap(&self, region: usize, runs: &[RemoteRun]) -> Result<(), RemoteError> {
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
            Some(Ack { errno, .. }) => {
                return Err(self.lost(format!("the VMM process failed to remap (errno {errno})")))
            }
            None => {}
        }
        // The deadline passed: revoke the window unless the client took it.
        if self.control.advance(seq, Window::Armed, Window::Revoked) {
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

    fn restore(&self, region: usize, runs: &[(u64, u64)]) -> Result<(), RemoteError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let msg = Message::Restore(Restore {
            seq,
            region: u32::try_from(region).map_err(|_| self.lost("region index".into()))?,
            runs: runs
                .iter()
                .map(|&(first_page, pages)| PageRun { first_page, pages })
                .collect(),
        });
        self.send(&msg)?;
        match self.wait_ack(seq, Instant::now() + self.deadline)? {
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

    fn release(&self, region: usize, unprotect: &[(usize, usize)], wake: (usize, usize)) {
        for &(first, count) in unprotect {
            if let Some((addr, len)) = self.span(region, first, count) {
                let _ = self.uffd.unprotect(addr, len, false);
            }
        }
        if let Some((addr, len)) = self.span(region, wake.0, wake.1) {
            let _ = self.uffd.wake(addr, len);
        }
    }

    fn usable(&self) -> bool {
        self.state.load(Ordering::SeqCst) == USABLE
    }

    fn quarantine(&self) {
        let _ =
            self.state
                .compare_exchange(USABLE, QUARANTINED, Ordering::SeqCst, Ordering::SeqCst);
    }
}
