//! Library reads of pages the library knows are released (ballooned,
//! discarded, reported free) give zeros without the kernel allocating
//! memory for them, so `Balloon::reclaim_touched` does not take a page the
//! host only read for one the guest used; a page a vCPU wrote behind the
//! library's back reads as what it wrote, and a read then takes it back
//! as private (ballooned: deflated, counted once).
//! Every read path: `read` (alone, and across a released and a normal
//! page), `read_obj` (aligned word, unaligned object), atomic `load`, and
//! the page-table walker's entry loads.

#![allow(clippy::cast_possible_truncation)]

use std::sync::{atomic::Ordering, Arc};

use pagefold::{paging::PhysMemory, Balloon, GuestMemory, GuestPhysAddr, PageKind};

const PAGE: u64 = 4096;
/// Where the "vCPU" stores in the released page, and what.
const AT: u64 = 0x40;
const VALUE: u64 = 0x1122_3344_5566_7788;

/// 1 MiB of guest memory, every page holding memory: page `p` is filled
/// with byte `p | 1`.
fn filled() -> Arc<GuestMemory> {
    let m = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), 1 << 20)]).expect("guest memory"));
    for p in 0..256 {
        m.fill(GuestPhysAddr(p * PAGE), p as u8 | 1, PAGE as usize)
            .expect("fill");
    }
    m
}

fn allocated(m: &GuestMemory) -> u64 {
    m.frame_store().allocated_bytes().expect("fstat")
}

fn kind(m: &GuestMemory, page: u64) -> PageKind {
    let (r, off) = m.region_of(GuestPhysAddr(page * PAGE)).expect("mapped");
    r.page_state((off / PAGE) as usize)
        .expect("page in region")
        .kind()
}

/// Stores `VALUE` at `AT` in page `page` through the host mapping, as a
/// vCPU would (the library does not see it).
fn raw_store(m: &GuestMemory, page: u64) {
    let host = m
        .host_address(GuestPhysAddr(page * PAGE + AT))
        .expect("host")
        .0 as *mut u64;
    // SAFETY: 1. `host` is an 8-aligned address inside the memory's live
    // mapping (`AT` is 8-aligned, regions are page aligned); 2. the store is
    // volatile, as a vCPU's would be, and nothing holds a reference there.
    unsafe { host.write_volatile(VALUE) };
}

/// Page `page` as the library should read it: zeros with `word` at `AT`.
fn expected(word: u64) -> Vec<u8> {
    let mut want = vec![0u8; PAGE as usize];
    want[AT as usize..AT as usize + 8].copy_from_slice(&word.to_le_bytes());
    want
}

/// One way the library reads guest memory: reads page `page` (released,
/// or written by a vCPU since; the page before it is a normal one, filled
/// with `page - 1 | 1`) and checks the answer against [`expected`].
type Read = fn(&GuestMemory, u64, u64);

const READS: &[(&str, Read)] = &[
    ("64-byte read", |m, page, word| {
        let mut buf = [0xffu8; 64];
        m.read(GuestPhysAddr(page * PAGE + AT - 8), &mut buf)
            .expect("read");
        assert_eq!(buf[..], expected(word)[AT as usize - 8..AT as usize + 56]);
    }),
    ("read of the whole page", |m, page, word| {
        let mut buf = vec![0xffu8; PAGE as usize];
        m.read(GuestPhysAddr(page * PAGE), &mut buf).expect("read");
        assert_eq!(buf, expected(word));
    }),
    (
        "read across a normal and a released page",
        |m, page, word| {
            let mut buf = [0u8; 128];
            m.read(GuestPhysAddr(page * PAGE - 64), &mut buf)
                .expect("read");
            assert!(buf[..64].iter().all(|&b| b == (page - 1) as u8 | 1));
            assert_eq!(buf[64..], expected(word)[..64]);
        },
    ),
    ("read_obj of an aligned u64", |m, page, word| {
        let got = m.read_obj::<u64>(GuestPhysAddr(page * PAGE + AT));
        assert_eq!(got.expect("read_obj"), word);
    }),
    ("read_obj of an unaligned [u8; 12]", |m, page, word| {
        let got = m.read_obj::<[u8; 12]>(GuestPhysAddr(page * PAGE + AT - 2));
        assert_eq!(
            got.expect("read_obj")[..],
            expected(word)[AT as usize - 2..AT as usize + 10]
        );
    }),
    ("atomic load of a u64", |m, page, word| {
        let got = m.load::<u64>(GuestPhysAddr(page * PAGE + AT), Ordering::SeqCst);
        assert_eq!(got.expect("load"), word);
    }),
    ("atomic load of a u32", |m, page, word| {
        let got = m.load::<u32>(GuestPhysAddr(page * PAGE + AT + 4), Ordering::Acquire);
        assert_eq!(got.expect("load"), (word >> 32) as u32);
    }),
    ("walker entry load", |m, page, word| {
        assert_eq!(PhysMemory::read_u64(m, page * PAGE + AT), Some(word));
        assert_eq!(PhysMemory::read_u32(m, page * PAGE + AT), Some(word as u32));
    }),
];

/// The page each read of [`READS`] gets (its page before stays normal).
fn page_of(read: usize) -> u64 {
    5 + 2 * read as u64
}

/// Releases one page per read of [`READS`] with `release`; each read of
/// its page gives zeros and allocates nothing (checked one read at a time,
/// so every read path is checked on a page nothing else read). Then a vCPU
/// stores to every one, and every read gives what it stored. Returns the
/// balloon for the caller's checks.
fn released_pages(release: impl Fn(&Balloon, GuestPhysAddr), released_as: PageKind) -> Balloon {
    let m = filled();
    let b = Balloon::new(Arc::clone(&m));
    for i in 0..READS.len() {
        release(&b, GuestPhysAddr(page_of(i) * PAGE));
        assert_eq!(kind(&m, page_of(i)), released_as);
    }
    let before = allocated(&m);
    assert_eq!(before, (256 - READS.len() as u64) * PAGE, "released");

    for (i, (name, read)) in READS.iter().enumerate() {
        read(&m, page_of(i), 0);
        assert_eq!(
            allocated(&m),
            before,
            "{name} of a released page allocated it"
        );
    }
    assert_eq!(
        b.reclaim_touched().expect("reclaim"),
        0,
        "pages the host only read are not taken back"
    );
    for i in 0..READS.len() {
        assert_eq!(kind(&m, page_of(i)), released_as);
        raw_store(&m, page_of(i));
    }
    assert_eq!(allocated(&m), 256 * PAGE, "the vCPU's stores allocated");
    for (i, (_, read)) in READS.iter().enumerate() {
        read(&m, page_of(i), VALUE);
    }
    b
}

#[test]
fn reads_of_a_ballooned_page_allocate_nothing_and_reclaim_nothing() {
    let b = released_pages(
        |b, gpa| assert_eq!(b.inflate_range(gpa, PAGE).expect("inflate").applied, 1),
        PageKind::Ballooned,
    );
    // The vCPU's stores gave the pages memory again; reading them then
    // took them back (each counted as deflated once), not reading a hole.
    let n = READS.len() as u64;
    assert_eq!(b.deflated(), n);
    assert_eq!(b.reclaim_touched().expect("reclaim"), 0, "counted once");
    assert_eq!(b.deflated(), n);
    assert_eq!(b.actual(), 0);
    for (i, (_, read)) in READS.iter().enumerate() {
        assert_eq!(kind(b.memory(), page_of(i)), PageKind::Private);
        read(b.memory(), page_of(i), VALUE);
    }
}

#[test]
fn reads_of_a_discarded_page_allocate_nothing() {
    let b = released_pages(
        |b, gpa| assert_eq!(b.memory().discard(gpa, PAGE).expect("discard"), 1),
        PageKind::Zero,
    );
    assert_eq!(b.reclaim_touched().expect("reclaim"), 0, "not ballooned");
}

#[test]
fn reads_of_a_page_reported_free_allocate_nothing() {
    let b = released_pages(
        |b, gpa| assert_eq!(b.report_free(gpa, 0).expect("report"), 1),
        PageKind::Zero,
    );
    assert_eq!(b.reported(), READS.len() as u64);
}

/// A read spanning many released pages and normal ones between them (runs
/// of each, one `pread` per released run) allocates nothing either.
#[test]
fn a_large_read_over_released_runs_allocates_nothing() {
    let m = filled();
    let b = Balloon::new(Arc::clone(&m));
    b.inflate_range(GuestPhysAddr(16 * PAGE), 32 * PAGE)
        .expect("inflate");
    m.discard(GuestPhysAddr(64 * PAGE), 16 * PAGE)
        .expect("discard");
    let before = allocated(&m);
    let mut all = vec![0u8; 1 << 20];
    m.read(GuestPhysAddr(0), &mut all).expect("read");
    assert_eq!(allocated(&m), before);
    for (p, page) in all.chunks(PAGE as usize).enumerate() {
        let released = (16..48).contains(&p) || (64..80).contains(&p);
        let byte = if released { 0 } else { p as u8 | 1 };
        assert!(page.iter().all(|&x| x == byte), "page {p}");
    }
    assert_eq!(b.reclaim_touched().expect("reclaim"), 0);
    assert_eq!(b.actual(), 32);
}

/// Review: a page reported free (or ballooned) that the guest reused
/// through the raw mapping stayed released by its state, so every later
/// library read of it took the slow path (a `pread` and `mincore` each:
/// 481 ns a read instead of 14). A read that finds such a page holding
/// memory takes it back as private (every read path), and later reads take
/// the mapping; a ballooned page counts as deflated exactly once, whether
/// a read or `reclaim_touched` finds it first.
#[test]
fn a_read_takes_back_a_released_page_the_guest_reused() {
    let n = READS.len() as u64;
    type Release = fn(&Balloon, GuestPhysAddr);
    let releases: [(&str, Release, PageKind); 2] = [
        (
            "reported free",
            |b, gpa| assert_eq!(b.report_free(gpa, 0).expect("report"), 1),
            PageKind::Zero,
        ),
        (
            "ballooned",
            |b, gpa| assert_eq!(b.inflate_range(gpa, PAGE).expect("inflate").applied, 1),
            PageKind::Ballooned,
        ),
    ];
    for (how, release, released_as) in releases {
        let m = filled();
        let b = Balloon::new(Arc::clone(&m));
        for i in 0..READS.len() {
            release(&b, GuestPhysAddr(page_of(i) * PAGE));
            raw_store(&m, page_of(i));
            assert_eq!(kind(&m, page_of(i)), released_as);
        }
        for (i, (name, read)) in READS.iter().enumerate() {
            read(&m, page_of(i), VALUE);
            assert_eq!(
                kind(&m, page_of(i)),
                PageKind::Private,
                "{how}, reused: {name} left it {released_as:?}"
            );
            read(&m, page_of(i), VALUE);
        }
        assert_eq!(m.census().private, 256, "{how}");
        assert_eq!(allocated(&m), 256 * PAGE, "{how}");
        let deflated = if released_as == PageKind::Ballooned {
            n
        } else {
            0
        };
        assert_eq!(b.deflated(), deflated, "{how}");
        assert_eq!(b.reclaim_touched().expect("reclaim"), 0, "{how}");
        assert_eq!(b.deflated(), deflated, "{how}: counted once");
        assert_eq!(b.actual(), 0, "{how}");
    }

    // Found by `reclaim_touched` first: the read after it counts nothing.
    let m = filled();
    let b = Balloon::new(Arc::clone(&m));
    b.inflate_range(GuestPhysAddr(8 * PAGE), PAGE)
        .expect("inflate");
    raw_store(&m, 8);
    assert_eq!(b.reclaim_touched().expect("reclaim"), 1);
    READS[0].1(&m, 8, VALUE);
    assert_eq!(b.deflated(), 1);

    // In one read over a released run, only the reused page is taken back;
    // the holes stay holes, unallocated.
    b.inflate_range(GuestPhysAddr(16 * PAGE), 8 * PAGE)
        .expect("inflate");
    m.discard(GuestPhysAddr(32 * PAGE), 8 * PAGE)
        .expect("discard");
    raw_store(&m, 19);
    raw_store(&m, 37);
    let before = allocated(&m);
    let mut all = vec![0u8; 32 * PAGE as usize];
    m.read(GuestPhysAddr(16 * PAGE), &mut all).expect("read");
    assert_eq!(allocated(&m), before);
    for p in 16..48 {
        let want = match p {
            19 | 37 => PageKind::Private,
            16..=23 => PageKind::Ballooned,
            32..=39 => PageKind::Zero,
            _ => PageKind::Private,
        };
        assert_eq!(kind(&m, p), want, "page {p}");
    }
    assert_eq!(b.deflated(), 2);
    assert_eq!(b.actual(), 7);
    assert_eq!(all[(3 * PAGE + AT) as usize], VALUE as u8);
    assert_eq!(all[(21 * PAGE + AT) as usize], VALUE as u8);
}
