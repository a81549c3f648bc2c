//! Serving missing-page faults: the machinery lazy snapshot restore and
//! post-copy migration share. [`MissingPages`] is a set of ranges
//! registered with one userfaultfd in missing mode, numbered as one run of
//! page indexes, with a bit per page saying it is present (placed, or known
//! by its [`FaultSource`] not to need placing); [`FaultServer`] is the thread
//! that reads the faults and hands each to the source, which places the
//! page at once (a snapshot's page, read from its file) or asks for it and
//! places it when it arrives (post-copy: a request on the return path).
//!
//! Placing is atomic and happens once: `UFFDIO_COPY` of a page that is
//! present already fails with `EEXIST`, which only means "someone placed it
//! first" (the fault path and a background fetch race by design). Every
//! placement wakes the threads waiting on that page.
//!
//! The server thread never serves a fault itself by blocking on anything
//! a faulting thread may hold: sources read files on their own thread, or
//! only write a request and return.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use super::{Copied, Userfault, UserfaultError};
use crate::addr::{HostVirtAddr, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// One registered range: `len` bytes of host memory from `host`, holding
/// pages `first..first + len / 4096` of the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissingSpan {
    /// Start of the range (page-aligned host address).
    pub host: HostVirtAddr,
    /// Bytes (a multiple of 4 KiB).
    pub len: u64,
    /// Index of the range's first page in the set.
    pub first: u64,
}

/// Where the pages of a missing-page fault come from.
pub trait FaultSource: Send + Sync + 'static {
    /// A thread waits in a fault on page `page` of `pages` (present or
    /// not: a page marked present but never placed faults too). Place it
    /// now, or arrange for it to be placed; never return leaving the
    /// toucher waiting with nothing under way.
    fn fault(&self, pages: &MissingPages, page: u64);

    /// Reading the descriptor failed (the server goes on).
    fn error(&self, error: UserfaultError);
}

/// Ranges registered for missing-page faults, with a bit per page: present.
/// The caller keeps the memory of the ranges mapped while this lives.
#[derive(Debug)]
pub struct MissingPages {
    uffd: Userfault,
    spans: Vec<MissingSpan>,
    pages: u64,
    done: Vec<AtomicU64>,
    finishing: AtomicBool,
}

impl MissingPages {
    /// Registers every span with `uffd` (from [`Userfault::new_missing`])
    /// in missing mode; on failure the spans registered so far are
    /// unregistered again. Spans are numbered as given: span `k`'s pages
    /// start at `spans[k].first`, which must follow the spans before it.
    pub fn register(uffd: Userfault, spans: Vec<MissingSpan>) -> Result<Self, UserfaultError> {
        for (k, s) in spans.iter().enumerate() {
            if let Err(e) = uffd.register_missing(s.host, s.len) {
                for t in &spans[..k] {
                    let _ = uffd.unregister(t.host, t.len);
                }
                return Err(e);
            }
        }
        let pages = spans
            .iter()
            .map(|s| s.first + s.len / PAGE)
            .max()
            .unwrap_or(0);
        Ok(MissingPages {
            uffd,
            spans,
            pages,
            done: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            finishing: AtomicBool::new(false),
        })
    }

    /// The userfaultfd.
    pub fn uffd(&self) -> &Userfault {
        &self.uffd
    }

    /// The spans.
    pub fn spans(&self) -> &[MissingSpan] {
        &self.spans
    }

    /// Pages of the set (one past the highest index).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The page index of host address `addr`, if a span holds it.
    pub fn page_at(&self, addr: HostVirtAddr) -> Option<u64> {
        self.spans
            .iter()
            .find(|s| addr.0 >= s.host.0 && addr.0 - s.host.0 < s.len)
            .map(|s| s.first + (addr.0 - s.host.0) / PAGE)
    }

    /// The span holding page `page`.
    pub fn span_of(&self, page: u64) -> Option<&MissingSpan> {
        self.spans
            .iter()
            .find(|s| page >= s.first && page - s.first < s.len / PAGE)
    }

    /// The host address of page `page`.
    pub fn host_of(&self, page: u64) -> Option<HostVirtAddr> {
        self.span_of(page)
            .map(|s| HostVirtAddr(s.host.0 + (page - s.first) * PAGE))
    }

    /// One past the last page of the span holding `page` (runs of pages
    /// never cross it: host addresses jump there); `page` if none holds it.
    pub fn span_end(&self, page: u64) -> u64 {
        self.span_of(page).map_or(page, |s| s.first + s.len / PAGE)
    }

    /// Marks page `page` present; whether this call did (false: it was, or
    /// the index is out of range).
    pub fn mark(&self, page: u64) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        match self.done.get(w) {
            Some(word) => word.fetch_or(1 << b, Ordering::AcqRel) & (1 << b) == 0,
            None => false,
        }
    }

    /// Marks present every page whose bit is clear in `absent` (a bit per
    /// page, as this set numbers them), a word at a time.
    pub fn mark_all_but(&self, absent: &[u64]) {
        for (w, word) in self.done.iter().enumerate() {
            let mut present = !absent.get(w).copied().unwrap_or(0);
            let first = w as u64 * 64;
            if self.pages - first < 64 {
                present &= (1u64 << (self.pages - first)) - 1;
            }
            word.fetch_or(present, Ordering::AcqRel);
        }
    }

    /// Whether page `page` is marked present.
    pub fn is_done(&self, page: u64) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        self.done
            .get(w)
            .is_some_and(|word| word.load(Ordering::Acquire) & (1 << b) != 0)
    }

    /// Pages marked present.
    pub fn done_count(&self) -> u64 {
        self.done
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Places `bytes` (whole pages, inside one span) at page `page` and
    /// on, marking what it placed. Stops at the first page present already
    /// (`exists`): the caller skips that page and goes on.
    pub fn place(&self, page: u64, bytes: &[u8]) -> Result<Copied, UserfaultError> {
        let Some(host) = self.host_of(page) else {
            return Ok(Copied {
                bytes: 0,
                exists: true,
            });
        };
        let c = self.uffd.copy(host, bytes)?;
        for p in page..page + c.bytes / PAGE {
            self.mark(p);
        }
        Ok(c)
    }

    /// Fills page `page` with zeros (`UFFDIO_ZEROPAGE`); `Ok(false)` if
    /// it was present already. The caller marks it.
    pub fn zero(&self, page: u64) -> Result<bool, UserfaultError> {
        let Some(host) = self.host_of(page) else {
            return Ok(false);
        };
        self.uffd.zero(host, PAGE)
    }

    /// Makes page `page` a memory error for whoever touches it
    /// (`UFFDIO_POISON`; zeros on a kernel without it, see
    /// [`Userfault::can_poison`]): a page whose bytes cannot be had is
    /// never shown as other bytes. `Ok(false)` if it was present. The
    /// caller marks it.
    pub fn poison(&self, page: u64) -> Result<bool, UserfaultError> {
        let Some(host) = self.host_of(page) else {
            return Ok(false);
        };
        if self.uffd.can_poison() {
            self.uffd.poison(host, PAGE)
        } else {
            self.uffd.zero(host, PAGE)
        }
    }

    /// Wakes threads waiting on pages `[page, page + n)` (one span): they
    /// retry the access, and fault again if the page is still missing.
    pub fn wake(&self, page: u64, n: u64) -> Result<(), UserfaultError> {
        match self.host_of(page) {
            Some(host) => self.uffd.wake(host, n * PAGE),
            None => Ok(()),
        }
    }

    /// Whether [`unregister_all`](Self::unregister_all) began: ioctl errors
    /// from then on are expected (the ranges are going).
    pub fn is_finishing(&self) -> bool {
        self.finishing.load(Ordering::Acquire)
    }

    /// Unregisters every span: waiting threads wake, and a page still
    /// missing is then filled by the kernel as any hole is (zeros). Only
    /// call it once every page that matters is placed, or to abandon the
    /// memory.
    pub fn unregister_all(&self) {
        self.finishing.store(true, Ordering::Release);
        for s in &self.spans {
            let _ = self.uffd.unregister(s.host, s.len);
        }
    }
}

/// The thread serving the faults of a [`MissingPages`] from a
/// [`FaultSource`]. [`stop`](Self::stop) (or dropping it) unregisters the
/// ranges and ends the thread.
#[derive(Debug)]
pub struct FaultServer {
    pages: Arc<MissingPages>,
    thread: Option<JoinHandle<()>>,
}

impl FaultServer {
    /// Starts the thread `name`, serving faults of `pages` from `source`.
    pub fn start<S: FaultSource>(
        pages: Arc<MissingPages>,
        source: Arc<S>,
        name: &str,
    ) -> std::io::Result<Self> {
        let p = Arc::clone(&pages);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serve(&p, &*source))?;
        Ok(FaultServer {
            pages,
            thread: Some(thread),
        })
    }

    /// The pages it serves.
    pub fn pages(&self) -> &Arc<MissingPages> {
        &self.pages
    }

    /// Unregisters every range (no toucher is left waiting on a server
    /// that is gone) and ends the thread. Whether the thread ended cleanly
    /// (false: it panicked, in the source).
    pub fn stop(&mut self) -> bool {
        self.pages.unregister_all();
        match self.thread.take() {
            Some(t) => t.join().is_ok(),
            None => true,
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server's loop: until the ranges are unregistered.
fn serve<S: FaultSource + ?Sized>(pages: &MissingPages, source: &S) {
    loop {
        if pages.is_finishing() {
            return;
        }
        match pages.uffd.wait(20) {
            Ok(true) => loop {
                match pages.uffd.read_page_fault() {
                    Ok(Some(f)) => {
                        if f.write_protect {
                            continue;
                        }
                        if let Some(page) = pages.page_at(HostVirtAddr(f.addr.0 & !(PAGE - 1))) {
                            source.fault(pages, page);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if !pages.is_finishing() {
                            source.error(e);
                        }
                        break;
                    }
                }
            },
            Ok(false) => {}
            Err(e) => {
                if !pages.is_finishing() {
                    source.error(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}
