//! A cold review of post-copy migration and its missing-page fault server,
//! as failing tests first. Each test names the defect it shows:
//!
//! - a second `wait_recoverable` on a migration paused by a broken
//!   connection (a VMM retrying after a failed `resume`) returned `Ok`,
//!   poisoned every missing page and unregistered the memory: the paused
//!   migration was silently turned into a finished one with holes;
//! - a hostile source streaming DISCARD records before the switchover grew
//!   the destination's list of discards without bound (16 bytes per
//!   13-byte record, never folded);
//! - a hostile destination flooding the return path with requests while
//!   not reading the stream grew the source's queue of requests without
//!   bound (the return path was read into an unbounded channel);
//! - the same flood on a resumed connection before its NEED list grew the
//!   source's list of first requests without bound;
//! - a stream from `Sender::start_postcopy` ended by `finish` (a pre-copy
//!   that converged) was refused at the destination as "record kind 0xff
//!   after the switchover (only FULL, ZERO and END)" with "0 pages not yet
//!   at the destination": it is an end before the switchover, with every
//!   page missing.
//!
//! Allocation is measured by a counting global allocator; the tests of
//! this file run one at a time.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    io::{self, Read, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};

use pagefold::{
    migration::{
        format::{self, RETURN_MAGIC, RETURN_MSG_LEN},
        receive_postcopy, receive_postcopy_with, resume_postcopy, OnBreak, PostcopyError,
        PostcopyOptions, PostcopyPhase, PrecopyOptions, ReaderLimits, Sender,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use pagefold_tools::pipe::{pipe, PipeWriter};

const PAGE: u64 = PAGE_SIZE as u64;

/// Counts the bytes allocated now and the most since the last reset.
struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        let p = unsafe { System.realloc(ptr, layout, new) };
        if !p.is_null() {
            NOW.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = NOW.fetch_add(new, Ordering::Relaxed) + new;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Starts measuring: the bytes allocated now.
fn measure() -> usize {
    let now = NOW.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// The most allocated since `measure` returned `base`, above it.
fn grown(base: usize) -> usize {
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn opts() -> PrecopyOptions {
    PrecopyOptions {
        max_rounds: 1,
        downtime_budget: Duration::from_secs(3600),
        ..PrecopyOptions::default()
    }
}

fn small_layout() -> Vec<(GuestPhysAddr, u64)> {
    vec![(GuestPhysAddr(0), 16 * PAGE)]
}

fn pages(mem: &GuestMemory) -> Vec<GuestPhysAddr> {
    mem.regions()
        .iter()
        .flat_map(|r| (0..r.size() / PAGE).map(move |i| GuestPhysAddr(r.start().0 + i * PAGE)))
        .collect()
}

fn page_of(mem: &GuestMemory, gpa: GuestPhysAddr) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    mem.read(gpa, &mut p).unwrap();
    p
}

/// A writer that fails (and closes its pipe) after `left` bytes.
struct Cut {
    inner: Option<PipeWriter>,
    left: u64,
}

impl Write for Cut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(w) = self.inner.as_mut() else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        if (buf.len() as u64) > self.left {
            let n = self.left as usize;
            if n > 0 {
                w.write_all(&buf[..n])?;
            }
            self.inner = None;
            self.left = 0;
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.left -= buf.len() as u64;
        w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A VMM whose `resume` fails (the new connection is not a resume) goes
/// back to `wait_recoverable`: the migration is still paused, so that is
/// the break again, never `Ok` over memory whose missing pages were just
/// poisoned; a later resume still completes it exactly.
#[test]
fn wait_recoverable_again_after_a_failed_resume_stays_paused() {
    let _s = serial();
    let layout = vec![(GuestPhysAddr(0), 256 * PAGE)];
    let src = Arc::new(GuestMemory::new(&layout).unwrap());
    for (k, gpa) in pages(&src).into_iter().enumerate() {
        src.write(gpa, &[k as u8 | 1; PAGE_SIZE]).unwrap();
    }
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let out = Cut {
        inner: Some(fw),
        left: 4096 + 40 * PAGE,
    };
    let s = Arc::clone(&src);
    let source = std::thread::spawn(move || {
        let snd = Sender::start_postcopy(&s, out, opts())?;
        snd.switchover(br, b"state", PostcopyOptions::default())
            .map(|_| ())
    });
    let inc = receive_postcopy_with(fr, bw, ReaderLimits::default(), OnBreak::Wait).unwrap();
    let mem = inc.mem;
    let mut receiving = inc.receiving;
    let e = receiving.wait_recoverable().unwrap_err();
    assert!(matches!(e, PostcopyError::Broken { .. }), "{e}");
    assert!(source.join().unwrap().is_err());
    let present = receiving.pages_present();
    assert!(present < 256);

    // A resume on a connection that is not one (a plain pre-copy stream).
    let (fw, fr) = pipe(16);
    let (bw, _br) = pipe(16);
    let plain = std::thread::spawn(move || {
        let m = GuestMemory::new(&[(GuestPhysAddr(0), 256 * PAGE)]).unwrap();
        let _ = Sender::start(&m, fw, opts()).and_then(|s| s.finish());
    });
    assert!(receiving.resume(fr, bw).is_err());
    plain.join().unwrap();

    // Still paused: the break again, nothing poisoned.
    let again = receiving.wait_recoverable();
    assert!(
        again.is_err(),
        "a paused migration waited on again: {again:?}"
    );
    assert_eq!(receiving.pages_present(), present);

    // And a real resume still completes it.
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let s = Arc::clone(&src);
    let source = std::thread::spawn(move || {
        resume_postcopy(&s, fw, br, opts(), PostcopyOptions::default()).map(|_| ())
    });
    receiving.resume(fr, bw).unwrap();
    let stats = receiving.wait_recoverable().unwrap();
    source.join().unwrap().unwrap();
    assert_eq!(stats.poisoned, 0);
    for gpa in pages(&src) {
        assert!(
            page_of(&src, gpa) == page_of(&mem, gpa),
            "page {gpa} differs"
        );
    }
}

/// A post-copy stream made by hand: the header for `layout`, then chunks
/// produced on demand by `next` (None: the stream ends), each given a
/// valid length and checksum.
struct Crafted<F: FnMut(u64) -> Option<Vec<u8>>> {
    seed: u64,
    next: F,
    chunk: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl<F: FnMut(u64) -> Option<Vec<u8>>> Crafted<F> {
    fn new(layout: &[(u64, u64)], flags: u16, next: F) -> Self {
        let seed: u64 = 0x5eed;
        let mut b = Vec::new();
        b.extend_from_slice(&format::MAGIC);
        b.extend_from_slice(&format::VERSION.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&4096u32.to_le_bytes());
        b.extend_from_slice(&seed.to_le_bytes());
        b.extend_from_slice(&(layout.len() as u32).to_le_bytes());
        for &(s, n) in layout {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
        }
        let sum = format::header_checksum(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        Crafted {
            seed,
            next,
            chunk: 0,
            buf: b,
            pos: 0,
        }
    }
}

impl<F: FnMut(u64) -> Option<Vec<u8>>> Read for Crafted<F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            let Some(p) = (self.next)(self.chunk) else {
                return Ok(0);
            };
            let mut c = (p.len() as u32).to_le_bytes().to_vec();
            c.extend_from_slice(&p);
            let sum = format::chunk_checksum(&c, self.seed, self.chunk);
            c.extend_from_slice(&sum.to_le_bytes());
            self.chunk += 1;
            (self.buf, self.pos) = (c, 0);
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A hostile source sends round 0 and then DISCARD record after DISCARD
/// record (of the same page) and never the switchover: the destination's
/// memory for them stays bounded (it is a set of pages, not a list of
/// records), and the stream's end is a pre-copy break.
#[test]
fn discard_flood_before_the_switchover_is_bounded() {
    let _s = serial();
    // 40 chunks of 80,000 discards: 3.2 million records, 41 MB of stream.
    let mut discard = vec![0x07u8];
    discard.extend_from_slice(&0u64.to_le_bytes());
    discard.extend_from_slice(&1u32.to_le_bytes());
    let chunk: Vec<u8> = discard.repeat(80_000);
    let stream = Crafted::new(&[(0, 16 * PAGE)], format::FLAG_POSTCOPY, move |n| {
        match n {
            0 => Some(vec![0x01, 0, 0, 0, 0]), // ROUND 0
            1..=40 => Some(chunk.clone()),
            _ => None,
        }
    });
    let (bw, _br) = pipe(16);
    let base = measure();
    let e = receive_postcopy(stream, bw, ReaderLimits::default()).unwrap_err();
    let grew = grown(base);
    assert!(
        matches!(
            e,
            PostcopyError::Broken {
                phase: PostcopyPhase::Precopy,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        grew < 16 << 20,
        "3.2 million discards of one page grew the destination by {grew} bytes"
    );
}

/// The return path of a hostile destination: the magic, then `left`
/// requests for page 0 (then the end), counting what was read.
struct Flood {
    magic: bool,
    left: u64,
    read: Arc<AtomicU64>,
    done: Option<mpsc::Sender<()>>,
    /// Requests start once this is set.
    go: Arc<AtomicBool>,
}

impl Read for Flood {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.magic {
            self.magic = true;
            out[..8].copy_from_slice(&RETURN_MAGIC);
            return Ok(8);
        }
        while !self.go.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.left == 0 {
            if let Some(d) = self.done.take() {
                let _ = d.send(());
            }
            return Ok(0);
        }
        let mut m = [0u8; RETURN_MSG_LEN];
        m[0] = 1; // REQUEST
        m[4..8].copy_from_slice(&1u32.to_le_bytes());
        let n = out.len().min(RETURN_MSG_LEN);
        out[..n].copy_from_slice(&m[..n]);
        if n == RETURN_MSG_LEN {
            self.left -= 1;
            self.read.fetch_add(1, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// An output that takes `open` bytes, then sets `stalled` and blocks
/// until `release` is set (and then fails: the destination went away).
struct Stalled {
    open: usize,
    stalled: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

impl Write for Stalled {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.open >= buf.len() {
            self.open -= buf.len();
            return Ok(buf.len());
        }
        self.stalled.store(true, Ordering::Release);
        while !self.release.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A hostile destination stops reading the stream during the push and
/// floods the return path with requests: the source reads the return
/// path only as fast as it serves it (the flood stalls on its side), so
/// its memory stays bounded, and the push ends as a typed break.
#[test]
fn request_flood_while_the_push_is_stalled_is_bounded() {
    let _s = serial();
    let src = GuestMemory::new(&small_layout()).unwrap();
    for (k, gpa) in pages(&src).into_iter().enumerate() {
        src.write(gpa, &[k as u8 | 1; PAGE_SIZE]).unwrap();
    }
    let release = Arc::new(AtomicBool::new(false));
    let stalled = Arc::new(AtomicBool::new(false));
    // The header and the switchover chunk pass; the push stalls, and only
    // then does the flood begin.
    let out = Stalled {
        open: 1024,
        stalled: Arc::clone(&stalled),
        release: Arc::clone(&release),
    };
    let read = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    const FLOOD: u64 = 2_000_000;
    let ret = Flood {
        magic: false,
        left: FLOOD,
        read: Arc::clone(&read),
        done: Some(done_tx),
        go: stalled,
    };
    let base = measure();
    std::thread::scope(|s| {
        let source = s.spawn(|| {
            let snd = Sender::start_postcopy(&src, out, opts())?;
            snd.switchover(ret, b"state", PostcopyOptions::default())
                .map(|_| ())
        });
        // The whole flood read while the source cannot send a byte means
        // it queued every request; a source reading only what it serves
        // stalls the flood far before.
        let all_read = done_rx.recv_timeout(Duration::from_secs(5)).is_ok();
        let grew = grown(base);
        release.store(true, Ordering::Release);
        let e = source.join().unwrap().unwrap_err();
        assert!(matches!(e, PostcopyError::Broken { .. }), "{e}");
        assert!(
            !all_read,
            "the source read {} requests while its push was stalled, growing by {grew} bytes",
            read.load(Ordering::Relaxed)
        );
        assert!(grew < 16 << 20, "the source grew by {grew} bytes");
    });
}

/// A hostile destination sends two million requests on a resumed
/// connection before its NEED list: the source keeps what it must send
/// first as a set of pages, not a list of messages.
#[test]
fn request_flood_before_the_need_list_is_bounded() {
    let _s = serial();
    let src = GuestMemory::new(&small_layout()).unwrap();
    let read = Arc::new(AtomicU64::new(0));
    let flood = Flood {
        magic: false,
        left: 2_000_000,
        read: Arc::clone(&read),
        done: None,
        go: Arc::new(AtomicBool::new(true)),
    };
    // The flood, then the NEED list's end and the return path's end.
    let mut end = [0u8; RETURN_MSG_LEN];
    end[0] = 4; // NEED_END
    let ret = flood.chain(io::Cursor::new(end.to_vec()));
    let (fw, _fr) = pipe(1 << 16);
    let base = measure();
    let r = resume_postcopy(&src, fw, ret, opts(), PostcopyOptions::default());
    let grew = grown(base);
    // Nothing was needed, so the resume ends waiting for COMPLETE on a
    // closed return path.
    assert!(r.is_err());
    assert_eq!(read.load(Ordering::Relaxed), 2_000_000);
    assert!(
        grew < 16 << 20,
        "two million requests before NEED_END grew the source by {grew} bytes"
    );
}

/// A VMM whose pre-copy converged calls `finish` on a sender started for
/// post-copy: the destination's error says the stream ended before its
/// switchover (and how such a stream must end), not that an end marker
/// came "after the switchover", where one is allowed.
#[test]
fn end_marker_before_the_switchover_is_named_so() {
    let _s = serial();
    let src = GuestMemory::new(&small_layout()).unwrap();
    src.write(GuestPhysAddr(0), &[7; PAGE_SIZE]).unwrap();
    let (fw, fr) = pipe(64);
    let (bw, _br) = pipe(16);
    let mut snd = Sender::start_postcopy(&src, fw, opts()).unwrap();
    snd.iterate().unwrap();
    snd.finish().unwrap();
    let e = receive_postcopy(fr, bw, ReaderLimits::default()).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(
            e,
            PostcopyError::Broken {
                phase: PostcopyPhase::Precopy,
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains("before the switchover") && text.contains("switchover"),
        "{text}"
    );
}
