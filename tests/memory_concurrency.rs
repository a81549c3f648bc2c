//! Guest memory under real threads: writers on disjoint pages (through
//! `write`, `fill`, `store` and raw host pointers) all land; aligned
//! integers never tear whichever path writes or reads them; compare-exchange
//! counters come out exact; discards of one thread's pages never lose
//! another's writes. Each test does a fixed amount of work (well under a
//! second in a debug build).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Barrier,
    },
    thread,
};

use pagefold::{GuestMemory, GuestPhysAddr};

const PAGE: u64 = 4096;
const PAGE_LEN: usize = 4096;
const THREADS: u64 = 4;

const fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}

/// Two adjacent regions (24 + 8 pages) and one beyond a hole (8 pages):
/// work spread over all three crosses the adjacent boundary.
fn memory() -> GuestMemory {
    GuestMemory::new(&[
        (gpa(0), 24 * PAGE),
        (gpa(24 * PAGE), 8 * PAGE),
        (gpa(64 * PAGE), 8 * PAGE),
    ])
    .expect("valid layout")
}

/// Page `i` of the 40 mapped pages.
fn page(i: u64) -> u64 {
    if i < 32 {
        i * PAGE
    } else {
        (64 + i - 32) * PAGE
    }
}

const PAGES: u64 = 40;

/// A byte no two (thread, round) pairs share within a run.
fn tag(thread: u64, round: u64) -> u8 {
    u8::try_from((thread * 61 + round * 7) % 255 + 1).expect("below 256")
}

#[test]
fn guest_memory_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<GuestMemory>();
    check::<Arc<GuestMemory>>();
    // And really moves: a 'static thread owning an `Arc`.
    let m = Arc::new(memory());
    let m2 = Arc::clone(&m);
    thread::spawn(move || m2.write_obj(gpa(8), 0x55aa_u16))
        .join()
        .expect("thread")
        .expect("mapped");
    assert_eq!(m.read_obj::<u16>(gpa(8)), Ok(0x55aa));
}

/// Four threads own every fourth page and rewrite them round after round,
/// each page through its own path (bytes, fill, atomics, raw pointer);
/// each thread checks its pages after every round while the others write
/// the neighbours, and at the end every page holds its owner's last round.
#[test]
fn disjoint_writers_all_land() {
    let m = memory();
    let rounds = 60;
    thread::scope(|s| {
        for t in 0..THREADS {
            let m = &m;
            s.spawn(move || {
                let mine = (0..PAGES).filter(|p| p % THREADS == t);
                for round in 0..rounds {
                    let b = tag(t, round);
                    for p in mine.clone() {
                        write_page(m, page(p), p % 4, b);
                    }
                    for p in mine.clone() {
                        check_page(m, page(p), b);
                    }
                }
            });
        }
    });
    for p in 0..PAGES {
        check_page(&m, page(p), tag(p % THREADS, rounds - 1));
    }
}

/// Fills the page at `addr` with `b` through one of four paths.
fn write_page(m: &GuestMemory, addr: u64, path: u64, b: u8) {
    let word = u64::from_ne_bytes([b; 8]);
    match path {
        0 => m.write(gpa(addr), &[b; PAGE_LEN]).expect("mapped"),
        1 => m.fill(gpa(addr), b, PAGE_LEN).expect("mapped"),
        2 => {
            for off in (0..PAGE).step_by(8) {
                m.store::<u64>(gpa(addr + off), word, Ordering::Relaxed)
                    .expect("aligned, mapped");
            }
        }
        _ => {
            let host = m.host_address(gpa(addr)).expect("mapped").0 as *mut u64;
            for i in 0..PAGE_LEN / 8 {
                // SAFETY: `host` is the start of a mapped, 8-aligned page
                // that this thread alone writes; `i < 512` keeps the store
                // inside it; no Rust reference to guest memory exists.
                unsafe { host.add(i).write_volatile(word) };
            }
        }
    }
}

fn check_page(m: &GuestMemory, addr: u64, b: u8) {
    let mut buf = vec![0; PAGE_LEN];
    m.read(gpa(addr), &mut buf).expect("mapped");
    if let Some(i) = buf.iter().position(|&x| x != b) {
        panic!(
            "page {addr:#x} byte {i:#x} holds {:#04x}, its owner wrote {b:#04x}",
            buf[i]
        );
    }
}

/// Values whose 8 bytes are all equal: a torn read mixes two of them and
/// shows up as unequal bytes.
fn splat(x: u8) -> u64 {
    u64::from(x) * 0x0101_0101_0101_0101
}

fn is_splat(v: u64) -> bool {
    v.to_le_bytes().iter().all(|&b| b == v.to_le_bytes()[0])
}

/// Aligned u64 slots (in every region, either side of the adjacent
/// boundary), each with one writer that stores rising values through every
/// write path, read by two threads through every read path at once: a
/// reader always sees a whole value (all bytes equal), never a mix of old
/// and new; atomic loads of a slot never go backwards; and `swap` hands the
/// writer back exactly its previous value.
#[test]
fn aligned_u64_never_tears() {
    let m = memory();
    let slots = [
        8,
        PAGE - 8,
        24 * PAGE - 8,
        24 * PAGE,
        24 * PAGE + 64,
        64 * PAGE + 128,
    ];
    let iterations = 40_000u64;
    let stop = AtomicBool::new(false);
    // Everyone starts together, or the writers may be done before the
    // readers run.
    let start = Barrier::new(4);
    thread::scope(|s| {
        let writers: Vec<_> = (0..2usize)
            .map(|w| {
                let (m, start) = (&m, &start);
                s.spawn(move || {
                    let mine: Vec<u64> = slots.iter().copied().skip(w).step_by(2).collect();
                    start.wait();
                    let mut prev = 0u64;
                    for i in 1..=iterations {
                        let v = splat(u8::try_from(i * 255 / iterations).expect("byte"));
                        for &a in &mine {
                            write_u64(m, a, v, prev, i);
                        }
                        prev = v;
                    }
                })
            })
            .collect();
        for r in 0..2u64 {
            let (m, stop, start) = (&m, &stop, &start);
            s.spawn(move || {
                let mut last = [0u64; 6];
                start.wait();
                let mut i = 0u64;
                while i < 200 || !stop.load(Ordering::Acquire) {
                    i += 1;
                    for (k, &a) in slots.iter().enumerate() {
                        let v = read_u64(m, a, i + k as u64 + r);
                        assert!(is_splat(v), "torn read at {a:#x}: {v:#018x}");
                        if (i + k as u64 + r) % 4 == 1 {
                            assert!(
                                v >= last[k],
                                "slot {a:#x} went back: {:#x} -> {v:#x}",
                                last[k]
                            );
                            last[k] = v;
                        }
                    }
                }
            });
        }
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, Ordering::Release);
    });
    for (k, &a) in slots.iter().enumerate() {
        assert_eq!(m.read_obj::<u64>(gpa(a)), Ok(splat(255)), "slot {k}");
    }
}

/// Writes `v` to the u64 at `addr`, by one of five paths chosen by `i`;
/// `prev` is what the slot holds (this thread is its only writer).
fn write_u64(m: &GuestMemory, addr: u64, v: u64, prev: u64, i: u64) {
    let a = gpa(addr);
    match i % 5 {
        0 => m.write_obj(a, v).expect("mapped"),
        1 => m.store::<u64>(a, v, Ordering::Release).expect("mapped"),
        2 => {
            let old = m.swap::<u64>(a, v, Ordering::AcqRel).expect("mapped");
            assert_eq!(old, prev, "swap at {addr:#x}");
        }
        3 => m.write(a, &v.to_le_bytes()).expect("mapped"),
        _ => {
            let host = m.host_address(a).expect("mapped").0 as *mut u64;
            // SAFETY: an 8-aligned u64 inside a mapped region; volatile, so
            // one 8-byte store; no Rust reference to guest memory exists.
            unsafe { host.write_volatile(v) };
        }
    }
}

/// Reads the u64 at `addr` by one of four paths chosen by `i` (1: `load`).
fn read_u64(m: &GuestMemory, addr: u64, i: u64) -> u64 {
    let a = gpa(addr);
    match i % 4 {
        0 => m.read_obj::<u64>(a).expect("mapped"),
        1 => m.load::<u64>(a, Ordering::Acquire).expect("mapped"),
        2 => {
            let mut b = [0u8; 8];
            m.read(a, &mut b).expect("mapped");
            u64::from_le_bytes(b)
        }
        _ => {
            let host = m.host_address(a).expect("mapped").0 as *const u64;
            // SAFETY: as for the raw store in `write_u64`.
            unsafe { host.read_volatile() }
        }
    }
}

/// The same for u32 and u16: one writer, one reader per width, values with
/// all bytes equal, through the object and atomic paths.
#[test]
fn aligned_u32_and_u16_never_tear() {
    let m = memory();
    let (a32, a16) = (gpa(24 * PAGE - 4), gpa(64 * PAGE + 2));
    let rounds = 100_000u32;
    let stop = AtomicBool::new(false);
    let start = Barrier::new(2);
    thread::scope(|s| {
        let writer = s.spawn(|| {
            start.wait();
            for i in 0..rounds {
                let x = u8::try_from(i % 251).expect("byte");
                let (v32, v16) = (u32::from(x) * 0x0101_0101, u16::from(x) * 0x0101);
                if i % 2 == 0 {
                    m.write_obj(a32, v32).expect("mapped");
                    m.store::<u16>(a16, v16, Ordering::Release).expect("mapped");
                } else {
                    m.store::<u32>(a32, v32, Ordering::Release).expect("mapped");
                    m.write_obj(a16, v16).expect("mapped");
                }
            }
        });
        s.spawn(|| {
            start.wait();
            let mut i = 0u32;
            while i < 200 || !stop.load(Ordering::Acquire) {
                i += 1;
                let (v32, v16) = if i % 2 == 0 {
                    (
                        m.read_obj::<u32>(a32).expect("mapped"),
                        m.load::<u16>(a16, Ordering::Acquire).expect("mapped"),
                    )
                } else {
                    (
                        m.load::<u32>(a32, Ordering::Acquire).expect("mapped"),
                        m.read_obj::<u16>(a16).expect("mapped"),
                    )
                };
                let b = v32.to_le_bytes();
                assert!(b.iter().all(|&x| x == b[0]), "torn u32 {v32:#010x}");
                let b = v16.to_le_bytes();
                assert_eq!(b[0], b[1], "torn u16 {v16:#06x}");
            }
        });
        writer.join().expect("writer");
        stop.store(true, Ordering::Release);
    });
}

/// Counters of every width, side by side in one word and in other regions,
/// incremented from four threads at once with compare-exchange loops: each
/// ends at exactly the number of increments (modulo its width), and no
/// counter disturbs its neighbour.
#[test]
fn compare_exchange_counters_count_exactly() {
    let m = memory();
    let per_thread = 5_000u64;
    let (c8, c16, c32, c64) = (
        gpa(64 * PAGE + 1),
        gpa(64 * PAGE + 2),
        gpa(64 * PAGE + 4),
        gpa(24 * PAGE - 8),
    );
    m.write_obj(gpa(64 * PAGE), 0xa5u8).expect("mapped");
    let start = Barrier::new(usize::try_from(THREADS).expect("small"));
    thread::scope(|s| {
        for _ in 0..THREADS {
            let (m, start) = (&m, &start);
            s.spawn(move || {
                start.wait();
                for _ in 0..per_thread {
                    increment::<u8>(m, c8, |x| x.wrapping_add(1));
                    increment::<u16>(m, c16, |x| x.wrapping_add(1));
                    increment::<u32>(m, c32, |x| x + 1);
                    increment::<u64>(m, c64, |x| x + 1);
                }
            });
        }
    });
    let total = THREADS * per_thread;
    assert_eq!(m.read_obj::<u8>(gpa(64 * PAGE)), Ok(0xa5), "neighbour byte");
    assert_eq!(m.read_obj::<u8>(c8).map(u64::from), Ok(total % 256));
    assert_eq!(m.read_obj::<u16>(c16).map(u64::from), Ok(total % 65536));
    assert_eq!(m.read_obj::<u32>(c32).map(u64::from), Ok(total));
    assert_eq!(m.read_obj::<u64>(c64), Ok(total));
}

fn increment<T: pagefold::memory::AtomicInt>(m: &GuestMemory, a: GuestPhysAddr, next: fn(T) -> T) {
    let mut cur = m.load::<T>(a, Ordering::Relaxed).expect("mapped");
    loop {
        match m
            .compare_exchange(a, cur, next(cur), Ordering::AcqRel, Ordering::Relaxed)
            .expect("mapped")
        {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

/// One thread writes, discards and raw-writes its own pages over and over
/// while three others write theirs: the discarding thread sees zeros after
/// each discard and its raw writes after that, and nobody else loses a
/// byte.
#[test]
fn discards_never_lose_other_threads_writes() {
    let m = memory();
    let rounds = 40;
    thread::scope(|s| {
        // Thread 0 discards its pages; 1..4 only write.
        for t in 0..THREADS {
            let m = &m;
            s.spawn(move || {
                let mine = (0..PAGES).filter(|p| p % THREADS == t);
                for round in 0..rounds {
                    let b = tag(t, round);
                    for p in mine.clone() {
                        write_page(m, page(p), (p + round) % 4, b);
                        check_page(m, page(p), b);
                        if t != 0 {
                            continue;
                        }
                        // A raw write leaves the page's state alone, but
                        // the read that checks it finds the page holding
                        // memory and takes it back as private, so every
                        // discard releases it again.
                        assert_eq!(m.discard(gpa(page(p)), PAGE), Ok(1), "page {p}");
                        check_page(m, page(p), 0);
                        write_page(m, page(p), 3, b);
                        check_page(m, page(p), b);
                    }
                }
            });
        }
    });
    for p in 0..PAGES {
        check_page(&m, page(p), tag(p % THREADS, rounds - 1));
    }
}
