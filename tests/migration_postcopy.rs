//! Post-copy live migration end to end on real memory and the real
//! userfaultfd, over in-memory pipes (one each way): raw-pointer touches at
//! the destination while the push runs read exactly the source's bytes;
//! pages written after they were sent are discarded and arrive again;
//! post-copy with no pre-copy round; a connection broken on either side at
//! each phase is a typed error naming the phase (and a touch of a page that
//! never came is a memory error, not a hang or wrong bytes); hostile and
//! garbled return-path messages are refused while the migration goes on.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    io::{self, Read, Write},
    sync::{Arc, Mutex},
    time::Duration,
};

use pagefold::{
    migration::{
        format::{RETURN_MAGIC, RETURN_MSG_LEN},
        receive_postcopy, receive_postcopy_with, resume_postcopy, MigrationError, OnBreak,
        PostcopyError, PostcopyOptions, PostcopyPhase, PostcopySummary, PrecopyOptions,
        ReaderLimits, Sender,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use pagefold_tools::pipe::{pipe, PipeReader, PipeWriter};
use rand::{seq::SliceRandom, Rng, SeedableRng};

const PAGE: u64 = PAGE_SIZE as u64;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Two regions with a hole between them.
fn layout() -> Vec<(GuestPhysAddr, u64)> {
    vec![
        (GuestPhysAddr(0), 1024 * PAGE),
        (GuestPhysAddr(0x100_0000), 512 * PAGE),
    ]
}

fn pages(mem: &GuestMemory) -> Vec<GuestPhysAddr> {
    mem.regions()
        .iter()
        .flat_map(|r| (0..r.size() / PAGE).map(move |i| GuestPhysAddr(r.start().0 + i * PAGE)))
        .collect()
}

/// Zero, repeated and random pages.
fn source_memory(seed: u64) -> Arc<GuestMemory> {
    let mem = GuestMemory::new(&layout()).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    for gpa in pages(&mem) {
        let page: Vec<u8> = match rng.gen_range(0..4) {
            0 => continue,
            1 => vec![0xa0 + rng.gen_range(0..4u8); PAGE_SIZE],
            _ => (0..PAGE_SIZE).map(|_| rng.gen()).collect(),
        };
        mem.write(gpa, &page).unwrap();
    }
    Arc::new(mem)
}

fn page_of(mem: &GuestMemory, gpa: GuestPhysAddr) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    mem.read(gpa, &mut p).unwrap();
    p
}

/// Reads a page through its raw host pointer (faulting it in).
fn touch(mem: &GuestMemory, gpa: GuestPhysAddr) -> Vec<u8> {
    let hva = mem.host_address(gpa).unwrap().0 as *const u8;
    let mut out = vec![0u8; PAGE_SIZE];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: `hva` is the page's host address in a live mapping of
        // the memory, which outlives this call.
        *b = unsafe { std::ptr::read_volatile(hva.add(i)) };
    }
    out
}

fn opts(bandwidth: Option<u64>) -> PrecopyOptions {
    PrecopyOptions {
        max_rounds: 1,
        downtime_budget: Duration::from_secs(3600),
        bandwidth_limit: bandwidth,
        ..PrecopyOptions::default()
    }
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

/// A return-path writer that adds `extra` right after the magic.
struct Inject {
    inner: PipeWriter,
    extra: Option<Vec<u8>>,
}

impl Write for Inject {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(extra) = self.extra.take() {
            self.inner.write_all(&extra)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type SourceResult = Result<PostcopySummary, PostcopyError>;

/// Runs the source in a thread: `rounds` pre-copy rounds (0 or 1), then
/// `dirty` pages written, then the switchover with `state`.
fn run_source(
    src: &Arc<GuestMemory>,
    out: Box<dyn Write + Send>,
    back: PipeReader,
    rounds: u32,
    dirty: Vec<GuestPhysAddr>,
    bandwidth: Option<u64>,
) -> std::thread::JoinHandle<SourceResult> {
    let s = Arc::clone(src);
    std::thread::spawn(move || {
        let mut snd = Sender::start_postcopy(&s, out, opts(bandwidth))?;
        for _ in 0..rounds {
            snd.iterate()?;
        }
        for (k, &g) in dirty.iter().enumerate() {
            s.write(g, &[0xe0 ^ k as u8; PAGE_SIZE]).unwrap();
        }
        snd.switchover(back, b"vcpu state", PostcopyOptions::default())
            .map(|(_, summary)| summary)
    })
}

fn assert_same(src: &GuestMemory, dst: &GuestMemory) {
    for gpa in pages(src) {
        assert!(page_of(src, gpa) == page_of(dst, gpa), "page {gpa} differs");
    }
}

/// Touches from four threads, in random order, while the push runs under
/// a bandwidth cap: every touch reads the source's bytes (those written
/// after pre-copy too), then the whole memory matches and the stats add up.
#[test]
fn touches_while_the_push_runs_read_the_source_bytes() {
    let _s = serial();
    let src = source_memory(1);
    let all = pages(&src);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
    let dirty: Vec<GuestPhysAddr> = all.choose_multiple(&mut rng, 400).copied().collect();
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let source = run_source(&src, Box::new(fw), br, 1, dirty.clone(), Some(4 << 20));
    let inc = receive_postcopy(fr, bw, ReaderLimits::default()).unwrap();
    assert_eq!(inc.state, b"vcpu state");
    let mem = Arc::new(inc.mem);
    // The source is stopped now: what it holds is the truth.
    let touched: Vec<_> = (0..4u64)
        .map(|t| {
            let (m, s) = (Arc::clone(&mem), Arc::clone(&src));
            let mut order = all.clone();
            order.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(t));
            // The dirtied pages from the top (the push goes up from the
            // bottom), then others.
            let mut first: Vec<GuestPhysAddr> = dirty.clone();
            first.sort_by_key(|g| std::cmp::Reverse(g.0));
            first.extend(order.into_iter().take(300));
            std::thread::spawn(move || {
                for g in first {
                    assert!(touch(&m, g) == page_of(&s, g), "touched page {g} differs");
                }
            })
        })
        .collect();
    for t in touched {
        t.join().unwrap();
    }
    let stats = inc.receiving.wait().unwrap();
    let summary = source.join().unwrap().unwrap();
    assert_same(&src, &mem);
    assert_eq!(stats.discarded, dirty.len() as u64);
    assert_eq!(summary.discarded, dirty.len() as u64);
    assert_eq!(stats.needed, summary.needed);
    assert_eq!(summary.pushed + summary.requested, summary.needed);
    assert_eq!(stats.placed + stats.zero, stats.needed);
    // How many touches came before the push (requests) is the
    // scheduler's business; every request was answered.
    assert!(stats.placed_on_request <= stats.requests, "{stats:?}");
    assert_eq!(summary.refused_requests, 0);
    assert_eq!(stats.poisoned, 0);
    assert!(stats.complete_sent);
    eprintln!("{stats:?}\n{summary:?}");
}

/// Post-copy at once, with no pre-copy round: the destination starts from
/// nothing, and every page comes on touch or by the push.
#[test]
fn postcopy_with_no_precopy_round() {
    let _s = serial();
    let src = source_memory(2);
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let source = run_source(&src, Box::new(fw), br, 0, Vec::new(), Some(8 << 20));
    let inc = receive_postcopy(fr, bw, ReaderLimits::default()).unwrap();
    assert_eq!(inc.precopy.round, None);
    let mem = Arc::new(inc.mem);
    let last = *pages(&src).last().unwrap();
    assert!(touch(&mem, last) == page_of(&src, last));
    // Library reads and writes go through the mapping, and fault too.
    let g = GuestPhysAddr(0x100_0000 + 100 * PAGE);
    assert!(page_of(&mem, g) == page_of(&src, g));
    let stats = inc.receiving.wait().unwrap();
    let summary = source.join().unwrap().unwrap();
    assert_same(&src, &mem);
    assert_eq!(stats.needed, stats.pages);
    assert_eq!(summary.needed, stats.pages);
    assert_eq!(stats.discarded, 0);
}

/// Pages sent in pre-copy and written after: discarded at the switchover
/// (they fault again) and sent again; untouched, the push brings them.
#[test]
fn pages_written_after_they_were_sent_are_discarded_and_sent_again() {
    let _s = serial();
    let src = source_memory(3);
    let dirty: Vec<GuestPhysAddr> = pages(&src).into_iter().step_by(37).collect();
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let source = run_source(&src, Box::new(fw), br, 1, dirty.clone(), None);
    let inc = receive_postcopy(fr, bw, ReaderLimits::default()).unwrap();
    let mem = inc.mem;
    let stats = inc.receiving.wait().unwrap();
    let summary = source.join().unwrap().unwrap();
    assert_eq!(stats.discarded, dirty.len() as u64);
    assert_eq!(summary.needed, dirty.len() as u64);
    for (k, &g) in dirty.iter().enumerate() {
        assert!(page_of(&mem, g) == vec![0xe0 ^ k as u8; PAGE_SIZE], "{g}");
    }
    assert_same(&src, &mem);
}

/// The destination goes away after the switchover (drops its side): its
/// waiting threads are released, and the source stops with a typed error
/// in the push phase naming the pages the destination still lacks.
#[test]
fn destination_gone_during_push_is_a_typed_error_at_the_source() {
    let _s = serial();
    let src = source_memory(4);
    let (fw, fr) = pipe(4);
    let (bw, br) = pipe(4);
    let source = run_source(&src, Box::new(fw), br, 0, Vec::new(), Some(2 << 20));
    let inc = receive_postcopy(fr, bw, ReaderLimits::default()).unwrap();
    drop(inc.receiving);
    let e = source.join().unwrap().unwrap_err();
    match e {
        PostcopyError::Broken {
            phase: PostcopyPhase::Push,
            missing,
            ..
        } => assert!(missing > 0),
        other => panic!("{other}"),
    }
}

/// The source's stream breaks during pre-copy: both sides fail in the
/// pre-copy phase (the source's guest is whole; nothing was switched).
#[test]
fn stream_cut_during_precopy_is_typed_on_both_sides() {
    let _s = serial();
    let src = source_memory(5);
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let out = Cut {
        inner: Some(fw),
        left: 200_000,
    };
    let source = run_source(&src, Box::new(out), br, 1, Vec::new(), None);
    let e = receive_postcopy(fr, bw, ReaderLimits::default()).unwrap_err();
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
    let e = source.join().unwrap().unwrap_err();
    assert!(
        matches!(e, PostcopyError::Migration(MigrationError::Stream(_))),
        "{e}"
    );
}

/// Cuts the source's stream `after` bytes after the switchover record
/// (pre-copy round, 40 pages dirtied after it) and waits for both sides.
fn cut_in_push() -> (PostcopyError, PostcopyError, GuestMemory, Arc<GuestMemory>) {
    let src = source_memory(6);
    // Measure the pre-copy part of the stream on a dry run.
    let mut probe = Sender::start_postcopy(&src, io::sink(), opts(None)).unwrap();
    probe.iterate().unwrap();
    let precopy_bytes = probe.bytes();
    drop(probe);
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let out = Cut {
        inner: Some(fw),
        left: precopy_bytes + 2048 + 60 * PAGE,
    };
    let source = run_source(&src, Box::new(out), br, 0, Vec::new(), None);
    let inc = receive_postcopy(fr, bw, ReaderLimits::default()).unwrap();
    let mem = inc.mem;
    let dst_err = inc.receiving.wait().unwrap_err();
    let src_err = source.join().unwrap().unwrap_err();
    (dst_err, src_err, mem, src)
}

/// The source's stream breaks after the switchover: the destination's
/// `wait` is a typed error in the push phase with the pages missing, the
/// source's too; the pages that did arrive hold the source's bytes.
#[test]
fn stream_cut_during_push_is_typed_on_both_sides() {
    let _s = serial();
    let (dst_err, src_err, mem, src) = cut_in_push();
    let missing = match dst_err {
        PostcopyError::Broken {
            phase: PostcopyPhase::Push,
            missing,
            ..
        } => missing,
        other => panic!("{other}"),
    };
    assert!(missing > 0);
    assert!(
        matches!(
            src_err,
            PostcopyError::Broken {
                phase: PostcopyPhase::Push,
                missing: m,
                ..
            } if m > 0
        ),
        "{src_err}"
    );
    // The first page arrived before the cut.
    assert!(page_of(&mem, GuestPhysAddr(0)) == page_of(&src, GuestPhysAddr(0)));
}

const CHILD: &str = "PAGEFOLD_POSTCOPY_TOUCH_MISSING";

/// Run as a child process by the next test (does nothing otherwise): the
/// stream breaks mid-push, then a page that never came is touched through
/// its raw pointer, which must end in SIGBUS (poisoned), not a hang and
/// not zeros.
#[test]
fn child_touches_a_page_that_never_came() {
    if std::env::var(CHILD).is_err() {
        return;
    }
    let (dst_err, _, mem, _) = cut_in_push();
    assert!(matches!(dst_err, PostcopyError::Broken { .. }));
    let last = *pages(&mem).last().unwrap();
    let _ = touch(&mem, last);
    std::process::exit(3);
}

#[test]
fn touching_a_page_that_never_came_is_a_memory_error_not_a_hang() {
    use std::os::unix::process::ExitStatusExt;
    let _s = serial();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_touches_a_page_that_never_came",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the touch of a page that never came hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
}

/// The destination never confirms: it reads the whole stream but closes
/// the return path without COMPLETE. The source: a typed error in the
/// completion phase with nothing missing.
#[test]
fn return_path_closed_before_completion_is_typed_at_the_source() {
    let _s = serial();
    let src = source_memory(7);
    let (fw, mut fr) = pipe(16);
    let (mut bw, br) = pipe(16);
    let source = run_source(&src, Box::new(fw), br, 1, Vec::new(), None);
    bw.write_all(&RETURN_MAGIC).unwrap();
    drop(bw);
    let mut sink = Vec::new();
    fr.read_to_end(&mut sink).unwrap();
    let e = source.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            PostcopyError::Broken {
                phase: PostcopyPhase::Completion,
                missing: 0,
                ..
            }
        ),
        "{e}"
    );
}

fn request(gpa: u64, pages: u32) -> [u8; RETURN_MSG_LEN] {
    let mut m = [0u8; RETURN_MSG_LEN];
    m[0] = 1;
    m[4..8].copy_from_slice(&pages.to_le_bytes());
    m[8..].copy_from_slice(&gpa.to_le_bytes());
    m
}

/// Requests for pages outside the layout (past the end, in the hole,
/// unaligned, a run leaving its region) are refused with typed errors and
/// the migration completes; a valid hostile request only sends a page
/// early.
#[test]
fn out_of_range_requests_are_refused_and_the_migration_completes() {
    let _s = serial();
    let src = source_memory(8);
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let mut extra = Vec::new();
    extra.extend_from_slice(&request(!0xfff, 1));
    extra.extend_from_slice(&request(0x80_0000, 1));
    extra.extend_from_slice(&request(0x123, 1));
    extra.extend_from_slice(&request(1023 * PAGE, 2));
    extra.extend_from_slice(&request(0x100_0000, u32::MAX));
    extra.extend_from_slice(&request(0x100_0000 + 7 * PAGE, 1));
    let back = Inject {
        inner: bw,
        extra: Some(extra),
    };
    let source = run_source(&src, Box::new(fw), br, 0, Vec::new(), None);
    let inc = receive_postcopy(fr, back, ReaderLimits::default()).unwrap();
    let mem = inc.mem;
    inc.receiving.wait().unwrap();
    let summary = source.join().unwrap().unwrap();
    assert_eq!(summary.refused_requests, 5, "{summary:?}");
    assert!(summary
        .refused
        .iter()
        .all(|e| matches!(e, PostcopyError::BadRequest { .. })));
    assert_same(&src, &mem);
}

/// A garbled message (unknown kind) on the return path: the source stops
/// reading it but pushes every page (the destination completes), and
/// reports the garbled return path, since completion cannot be confirmed.
#[test]
fn garbled_return_path_is_typed_and_the_destination_still_completes() {
    let _s = serial();
    let src = source_memory(10);
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let mut bad = [0u8; RETURN_MSG_LEN];
    bad[0] = 0x77;
    let back = Inject {
        inner: bw,
        extra: Some(bad.to_vec()),
    };
    let source = run_source(&src, Box::new(fw), br, 1, Vec::new(), None);
    let inc = receive_postcopy(fr, back, ReaderLimits::default()).unwrap();
    let mem = inc.mem;
    // Whether COMPLETE still reached the pipe before the source's reader
    // let go of it is a race; the destination completes either way.
    inc.receiving.wait().unwrap();
    let e = source.join().unwrap().unwrap_err();
    assert!(
        matches!(e, PostcopyError::ReturnPathGarbled { index: 0, .. }),
        "{e}"
    );
    assert_same(&src, &mem);
}

/// A pre-copy stream (no post-copy flag) is refused by the post-copy
/// receiver at its header, a post-copy stream by the pre-copy receiver at
/// its header, and a pre-copy sender cannot switch over.
#[test]
fn streams_of_the_other_kind_are_refused() {
    let _s = serial();
    let src = source_memory(11);
    let mut snd = Sender::start(&src, Vec::new(), opts(None)).unwrap();
    snd.iterate().unwrap();
    let (wire, _) = snd.finish().unwrap();
    let (bw, _br) = pipe(4);
    let e = receive_postcopy(io::Cursor::new(wire), bw, ReaderLimits::default()).unwrap_err();
    assert!(matches!(e, PostcopyError::NotPostcopy), "{e}");

    let mut snd = Sender::start_postcopy(&src, Vec::new(), opts(None)).unwrap();
    snd.iterate().unwrap();
    let wire = snd.bytes();
    assert!(wire > 0);
    let (wire, _) = snd.finish().unwrap();
    let e = pagefold::migration::receive_migration(&wire[..], ReaderLimits::default()).unwrap_err();
    assert!(
        matches!(e, pagefold::StreamError::UnsupportedFlags { flags: 1 }),
        "{e}"
    );

    let (fw, fr) = pipe(64);
    let snd = Sender::start(&src, fw, opts(None)).unwrap();
    let (_bw, br) = pipe(4);
    let e = snd
        .switchover(br, b"", PostcopyOptions::default())
        .map(|(_, summary)| summary)
        .unwrap_err();
    assert!(matches!(e, PostcopyError::NotPostcopy), "{e}");
    drop(fr);
}

/// Over a real TCP connection, each side using the socket and a
/// `try_clone` of it as its two halves.
#[test]
fn over_tcp_with_try_clone_halves() {
    use std::net::{TcpListener, TcpStream};
    let _s = serial();
    let src = source_memory(12);
    let dirty: Vec<GuestPhysAddr> = pages(&src).into_iter().step_by(11).collect();
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = Arc::clone(&src);
    let d = dirty.clone();
    let source = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let back = sock.try_clone().unwrap();
        let mut snd = Sender::start_postcopy(&s, sock, opts(Some(16 << 20))).unwrap();
        snd.iterate().unwrap();
        for &g in &d {
            s.write(g, &[0x5a; PAGE_SIZE]).unwrap();
        }
        snd.switchover(back, b"state", PostcopyOptions::default())
            .map(|(_, summary)| summary)
    });
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let ret = sock.try_clone().unwrap();
    let inc = receive_postcopy(sock, ret, ReaderLimits::default()).unwrap();
    let mem = inc.mem;
    for &g in dirty.iter().rev().take(50) {
        assert!(touch(&mem, g) == vec![0x5a; PAGE_SIZE], "{g}");
    }
    let stats = inc.receiving.wait().unwrap();
    let summary = source.join().unwrap().unwrap();
    assert_eq!(stats.discarded, dirty.len() as u64);
    assert_eq!(summary.needed, dirty.len() as u64);
    assert!(stats.complete_sent);
    assert_same(&src, &mem);
}

/// Post-copy recovery: the stream breaks mid-push with the destination set
/// to wait; a thread touching a page that has not come keeps waiting (no
/// poison, no wrong bytes); the VMM resumes on a new connection, the
/// source sends what the destination says it lacks (the waited-on page
/// first), and everything ends exact.
#[test]
fn broken_push_resumes_on_a_new_connection() {
    let _s = serial();
    let src = source_memory(13);
    let all = pages(&src);
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let out = Cut {
        inner: Some(fw),
        left: 4096 + 100 * PAGE,
    };
    let source = run_source(&src, Box::new(out), br, 0, Vec::new(), None);
    let inc = receive_postcopy_with(fr, bw, ReaderLimits::default(), OnBreak::Wait).unwrap();
    let mem = Arc::new(inc.mem);
    let mut receiving = inc.receiving;
    let e = receiving.wait_recoverable().unwrap_err();
    assert!(
        matches!(
            e,
            PostcopyError::Broken {
                phase: PostcopyPhase::Push,
                ..
            }
        ),
        "{e}"
    );
    let e = source.join().unwrap().unwrap_err();
    assert!(matches!(e, PostcopyError::Broken { .. }), "{e}");
    let present = receiving.pages_present();
    assert!(present < all.len() as u64);
    // A touch of a page that never came waits for the resume.
    let last = *all.last().unwrap();
    let (m, s) = (Arc::clone(&mem), Arc::clone(&src));
    let toucher = std::thread::spawn(move || touch(&m, last) == page_of(&s, last));

    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let s = Arc::clone(&src);
    let source = std::thread::spawn(move || {
        resume_postcopy(&s, fw, br, opts(None), PostcopyOptions::default())
            .map(|(_, summary)| summary)
    });
    receiving.resume(fr, bw).unwrap();
    let stats = receiving.wait_recoverable().unwrap();
    let summary = source.join().unwrap().unwrap();
    assert!(toucher.join().unwrap(), "the waited-on page came right");
    assert_eq!(summary.needed, all.len() as u64 - present);
    assert_eq!(stats.poisoned, 0);
    assert!(stats.complete_sent);
    assert_same(&src, &mem);
    // Not paused any more.
    let (_fw, fr) = pipe(1);
    let (bw, _br) = pipe(1);
    assert!(matches!(
        receiving.resume(fr, bw),
        Err(PostcopyError::NotPaused)
    ));
}
