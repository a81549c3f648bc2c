//! The migration stream end to end: random layouts and contents sent over
//! several rounds with random dirtying between them must leave the
//! receiver byte-for-byte equal to the sender; duplicates cost about one
//! reference each; and every kind of damage (truncation at every offset,
//! bit flips, wrong version or magic, crafted records with valid checksums)
//! is the right typed error, never a panic.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{self, Write};

use pagefold::{
    migration::{
        format, receive, Malformed, ReaderLimits, Sent, StreamError, StreamReader, StreamWriter,
        WriterOptions,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use proptest::{prelude::*, test_runner::Config as ProptestConfig};

const PAGE: u64 = PAGE_SIZE as u64;

fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

fn opts(seed: u64) -> WriterOptions {
    WriterOptions {
        seed: Some(seed),
        ..WriterOptions::default()
    }
}

/// Every page address of `mem`, in order.
fn pages(mem: &GuestMemory) -> Vec<GuestPhysAddr> {
    mem.regions()
        .iter()
        .flat_map(|r| (0..r.size() / PAGE).map(move |i| GuestPhysAddr(r.start().0 + i * PAGE)))
        .collect()
}

fn read_page(mem: &GuestMemory, gpa: GuestPhysAddr) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    mem.read(gpa, &mut p).unwrap();
    p
}

fn assert_same(a: &GuestMemory, b: &GuestMemory) {
    assert_eq!(a.region_infos().len(), b.region_infos().len());
    for gpa in pages(a) {
        assert!(read_page(a, gpa) == read_page(b, gpa), "page {gpa} differs");
    }
}

/// What a page becomes.
#[derive(Clone, Debug)]
enum Content {
    Zero,
    /// One of a few shared contents (duplicates across the guest).
    Palette(u8),
    /// A few bytes changed from what the page holds.
    Tweak(u16, u8),
    /// Random bytes from a seed.
    Random(u64),
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        1 => Just(Content::Zero),
        3 => (0u8..6).prop_map(Content::Palette),
        3 => (any::<u16>(), any::<u8>()).prop_map(|(a, b)| Content::Tweak(a, b)),
        2 => any::<u64>().prop_map(Content::Random),
    ]
}

fn apply_content(mem: &GuestMemory, gpa: GuestPhysAddr, c: &Content) {
    let mut p = read_page(mem, gpa);
    match *c {
        Content::Zero => p = [0; PAGE_SIZE],
        Content::Palette(k) => {
            for (i, b) in p.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(k.wrapping_add(3)) ^ k;
            }
        }
        Content::Tweak(at, v) => {
            let at = usize::from(at) % (PAGE_SIZE - 8);
            for (j, b) in p[at..at + 1 + usize::from(v % 8)].iter_mut().enumerate() {
                *b = b.wrapping_add(v | 1).wrapping_add(j as u8);
            }
        }
        Content::Random(seed) => {
            let mut x = seed
                .wrapping_add(1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .max(1);
            for b in p.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    mem.write(gpa, &p).unwrap();
}

/// A layout of 1-4 regions of 1-24 pages with gaps.
fn layout() -> impl Strategy<Value = Vec<(GuestPhysAddr, u64)>> {
    prop::collection::vec((0u64..4, 1u64..24), 1..4).prop_map(|rs| {
        let mut at = 0;
        rs.into_iter()
            .map(|(gap, n)| {
                let start = at + gap * PAGE;
                at = start + n * PAGE;
                (GuestPhysAddr(start), n * PAGE)
            })
            .collect()
    })
}

/// Sends `mem` like a pre-copy sender would: round 0 every non-zero page,
/// later rounds the pages dirtied by `rounds[i]` (index into the page list,
/// new content), ending with or without a digest.
fn migrate(
    mem: &GuestMemory,
    rounds: &[Vec<(usize, Content)>],
    opts: WriterOptions,
    verified: bool,
) -> (Vec<u8>, pagefold::migration::WriterStats) {
    let all = pages(mem);
    let mut w = StreamWriter::for_memory(Vec::new(), mem, opts).unwrap();
    w.begin_round(0).unwrap();
    for &gpa in &all {
        let p = read_page(mem, gpa);
        if p.iter().any(|&b| b != 0) {
            w.page(gpa, &p).unwrap();
        }
    }
    w.flush().unwrap();
    for (r, dirty) in rounds.iter().enumerate() {
        for (i, c) in dirty {
            apply_content(mem, all[i % all.len()], c);
        }
        w.begin_round(r as u32 + 1).unwrap();
        for (i, _) in dirty {
            w.send_page(mem, all[i % all.len()]).unwrap();
        }
    }
    if verified {
        w.finish_verified(mem).unwrap()
    } else {
        w.finish().unwrap()
    }
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn receiver_equals_sender(
        layout in layout(),
        initial in prop::collection::vec(content(), 1..96),
        rounds in prop::collection::vec(
            prop::collection::vec((any::<usize>(), content()), 0..24), 0..5),
        cache in 0usize..12,
        chunk in prop::sample::select(vec![format::MIN_CHUNK, 64 << 10, format::MAX_CHUNK]),
        seed in any::<u64>(),
        verified in any::<bool>(),
    ) {
        let mem = GuestMemory::new(&layout).unwrap();
        let all = pages(&mem);
        for (i, c) in initial.iter().enumerate() {
            apply_content(&mem, all[i % all.len()], c);
        }
        let opts = WriterOptions {
            chunk_bytes: chunk,
            delta_cache_pages: cache,
            delta_from_round: 1,
            seed: Some(seed),
        };
        let (bytes, sent) = migrate(&mem, &rounds, opts, verified);
        let mut events = 0u64;
        let mut reader = StreamReader::new(&bytes[..], ReaderLimits::default()).unwrap();
        let got = reader.create_memory().unwrap();
        let stats = reader.apply_all(&got, |_| events += 1).unwrap();
        assert_same(&mem, &got);
        prop_assert_eq!(stats.bytes, bytes.len() as u64);
        prop_assert_eq!(stats.verified, verified);
        prop_assert_eq!(stats.full_pages, sent.full_pages);
        prop_assert_eq!(stats.ref_pages, sent.ref_pages);
        prop_assert_eq!(stats.delta_pages, sent.delta_pages);
        prop_assert_eq!(stats.zero_pages, sent.zero_pages);
        prop_assert!(events > 0);
    }
}

#[test]
fn duplicates_cost_one_reference_each() {
    // 1024 pages: 16 distinct contents, each 64 times.
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 1024 * PAGE)]).unwrap();
    for (i, gpa) in pages(&mem).into_iter().enumerate() {
        apply_content(&mem, gpa, &Content::Random(i as u64 % 16 + 1));
    }
    let (bytes, stats) = migrate(&mem, &[], opts(1), false);
    assert_eq!(stats.full_pages, 16);
    assert_eq!(stats.ref_pages, 1008);
    let distinct = 16 * PAGE;
    let overhead = bytes.len() as u64 - distinct;
    // A reference (a REF_RUN of one page) is 21 bytes; framing adds a
    // little.
    assert!(overhead <= 1008 * 21 + 16 * 9 + 256, "overhead {overhead}");
    println!(
        "1024 pages, 16 distinct: {} bytes on the wire ({:.3} x distinct content; \
         a zero-page-only stream: {} bytes)",
        bytes.len(),
        bytes.len() as f64 / distinct as f64,
        1024 * (PAGE + 9)
    );
    let (got, _) = receive(&bytes[..], ReaderLimits::default()).unwrap();
    assert_same(&mem, &got);
}

#[test]
fn four_clones_send_one_copy() {
    // Four regions holding the same 512 pages (clones of one guest), 10% of
    // them zero.
    let layout: Vec<_> = (0..4)
        .map(|i| (GuestPhysAddr(i << 30), 512 * PAGE))
        .collect();
    let mem = GuestMemory::new(&layout).unwrap();
    for gpa in pages(&mem) {
        let i = (gpa.0 & ((1 << 30) - 1)) / PAGE;
        let c = if i % 10 == 0 {
            Content::Zero
        } else {
            Content::Random(i + 7)
        };
        apply_content(&mem, gpa, &c);
    }
    let (bytes, stats) = migrate(&mem, &[], opts(2), true);
    let distinct = stats.full_pages * PAGE;
    assert_eq!(stats.full_pages, 512 - 52);
    let ratio = bytes.len() as f64 / distinct as f64;
    println!(
        "4 clones x 512 pages: {} bytes, distinct non-zero content {} bytes, ratio {ratio:.4}",
        bytes.len(),
        distinct
    );
    // Clones 2..4 are REF_RUN records of 21 bytes, one per stretch between
    // zero pages (52 per clone): well under the +1% target.
    assert!(ratio < 1.01, "{ratio}");
    let (got, s) = receive(&bytes[..], ReaderLimits::default()).unwrap();
    assert!(s.verified);
    assert_same(&mem, &got);
}

#[test]
fn deltas_carry_small_changes_and_fall_back_when_large() {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 4 * PAGE)]).unwrap();
    for gpa in pages(&mem) {
        apply_content(&mem, gpa, &Content::Random(gpa.0 + 1));
    }
    let mut w = StreamWriter::for_memory(Vec::new(), &mem, opts(3)).unwrap();
    w.begin_round(0).unwrap();
    for gpa in pages(&mem) {
        assert_eq!(w.send_page(&mem, gpa).unwrap(), Sent::Full);
    }
    w.begin_round(1).unwrap();
    for gpa in pages(&mem) {
        apply_content(&mem, gpa, &Content::Tweak(100, 3));
        // Not cached yet (round 0 does not fill the cache): full.
        assert_eq!(w.send_page(&mem, gpa).unwrap(), Sent::Full);
    }
    w.begin_round(2).unwrap();
    apply_content(&mem, GuestPhysAddr(0), &Content::Tweak(2000, 5));
    assert!(matches!(
        w.send_page(&mem, GuestPhysAddr(0)).unwrap(),
        Sent::Delta(n) if n < 16
    ));
    apply_content(&mem, GuestPhysAddr(PAGE), &Content::Random(99));
    assert_eq!(w.send_page(&mem, GuestPhysAddr(PAGE)).unwrap(), Sent::Full);
    assert_eq!(
        w.send_page(&mem, GuestPhysAddr(2 * PAGE)).unwrap(),
        Sent::Unchanged
    );
    let (bytes, _) = w.finish_verified(&mem).unwrap();
    let (got, s) = receive(&bytes[..], ReaderLimits::default()).unwrap();
    assert_eq!(s.delta_pages, 1);
    assert_same(&mem, &got);
}

/// A small stream with every record kind: rounds, full, ref, delta, zero run.
fn small_stream() -> (GuestMemory, Vec<u8>) {
    let mem = GuestMemory::new(&[
        (GuestPhysAddr(0), 3 * PAGE),
        (GuestPhysAddr(0x10_0000), 2 * PAGE),
    ])
    .unwrap();
    let all = pages(&mem);
    apply_content(&mem, all[0], &Content::Palette(1));
    apply_content(&mem, all[1], &Content::Palette(1));
    apply_content(&mem, all[3], &Content::Random(5));
    let rounds = vec![
        vec![(3, Content::Tweak(7, 1))],
        vec![
            (3, Content::Tweak(900, 2)),
            (1, Content::Zero),
            (2, Content::Zero),
        ],
    ];
    let (bytes, s) = migrate(&mem, &rounds, opts(4), true);
    assert!(
        s.ref_pages >= 1 && s.delta_pages >= 1 && s.zero_pages >= 2,
        "{s:?}"
    );
    (mem, bytes)
}

#[test]
fn truncation_at_every_offset_is_truncated() {
    let (mem, bytes) = small_stream();
    let (got, _) = receive(&bytes[..], ReaderLimits::default()).unwrap();
    assert_same(&mem, &got);
    for cut in 0..bytes.len() {
        match receive(&bytes[..cut], ReaderLimits::default()) {
            Err(StreamError::Truncated { at, .. }) => assert_eq!(at, cut as u64),
            other => panic!("cut at {cut}: {:?}", other.map(|(_, s)| s)),
        }
    }
}

#[test]
fn every_bit_flip_is_an_error() {
    let (_, bytes) = small_stream();
    let header_len = format::MAGIC.len() + 2 + 2 + 4 + 8 + 4 + 2 * 16 + 8;
    for at in 0..bytes.len() {
        for bit in [0, 3, 7] {
            let mut b = bytes.clone();
            b[at] ^= 1 << bit;
            let err = match receive(&b[..], ReaderLimits::default()) {
                Err(e) => e,
                Ok(_) => panic!("flip of bit {bit} at byte {at} went unnoticed"),
            };
            if at >= header_len {
                assert!(
                    matches!(
                        err,
                        StreamError::ChunkChecksum { .. }
                            | StreamError::ChunkLength { .. }
                            | StreamError::Truncated { .. }
                    ),
                    "byte {at}: {err}"
                );
            } else {
                assert!(
                    !matches!(
                        err,
                        StreamError::ChunkChecksum { .. } | StreamError::Malformed { .. }
                    ),
                    "header byte {at}: {err}"
                );
            }
        }
    }
}

#[test]
fn header_errors_are_named() {
    let (_, bytes) = small_stream();
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(
        receive(&b[..], ReaderLimits::default()),
        Err(StreamError::BadMagic { found }) if found[0] == b'X'
    ));
    let mut b = bytes.clone();
    b[8..10].copy_from_slice(&1u16.to_le_bytes());
    assert!(matches!(
        receive(&b[..], ReaderLimits::default()),
        Err(StreamError::UnsupportedVersion {
            found: 1,
            supported: 2
        })
    ));
    let mut b = bytes.clone();
    b[8..10].copy_from_slice(&3u16.to_le_bytes());
    assert!(matches!(
        receive(&b[..], ReaderLimits::default()),
        Err(StreamError::UnsupportedVersion {
            found: 3,
            supported: 2
        })
    ));
    let mut b = bytes.clone();
    b[10] = 1;
    assert!(matches!(
        receive(&b[..], ReaderLimits::default()),
        Err(StreamError::UnsupportedFlags { flags: 1 })
    ));
    assert!(matches!(
        receive(
            &bytes[..],
            ReaderLimits {
                max_regions: 1,
                ..ReaderLimits::default()
            }
        ),
        Err(StreamError::TooManyRegions { count: 2, max: 1 })
    ));
    assert!(matches!(
        receive(
            &bytes[..],
            ReaderLimits {
                max_guest_bytes: 4 * PAGE,
                ..ReaderLimits::default()
            }
        ),
        Err(StreamError::TooLarge { bytes: 20480, .. })
    ));
    let err = receive(&b"hello"[..], ReaderLimits::default())
        .err()
        .unwrap();
    assert!(matches!(err, StreamError::Truncated { at: 5, .. }), "{err}");
    println!("{err}");
}

/// Builds a stream by hand: header for `layout` with `seed`, then each
/// payload as a chunk with a valid checksum.
fn crafted(layout: &[(u64, u64)], count: u32, seed: u64, chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&format::MAGIC);
    b.extend_from_slice(&format::VERSION.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&4096u32.to_le_bytes());
    b.extend_from_slice(&seed.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    for &(s, n) in layout {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
    }
    let sum = format::header_checksum(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    for (i, p) in chunks.iter().enumerate() {
        let mut c = (p.len() as u32).to_le_bytes().to_vec();
        c.extend_from_slice(p);
        let sum = format::chunk_checksum(&c, seed, i as u64);
        b.extend_from_slice(&c);
        b.extend_from_slice(&sum.to_le_bytes());
    }
    b
}

fn rec(kind: u8, fields: &[&[u8]]) -> Vec<u8> {
    let mut r = vec![kind];
    for f in fields {
        r.extend_from_slice(f);
    }
    r
}

fn end(pages: u64) -> Vec<u8> {
    rec(0xff, &[&pages.to_le_bytes(), &[0]])
}

fn malformed(stream: &[u8]) -> (u64, u32, Malformed) {
    match receive(stream, ReaderLimits::default()) {
        Err(StreamError::Malformed { at, problem }) => (at.offset, at.record, problem),
        other => panic!("{:?}", other.map(|(_, s)| s)),
    }
}

#[test]
fn crafted_records_with_valid_checksums_are_refused() {
    let l = [(0u64, 2 * PAGE)];
    let header = 8 + 2 + 2 + 4 + 8 + 4 + 16 + 8;
    let full = |gpa: u64| rec(0x03, &[&gpa.to_le_bytes(), &[7u8; PAGE_SIZE]]);

    // A valid minimal stream first.
    let ok = crafted(&l, 1, 9, &[[full(0), end(1)].concat()]);
    let (m, _) = receive(&ok[..], ReaderLimits::default()).unwrap();
    assert_eq!(read_page(&m, GuestPhysAddr(0))[5], 7);

    let cases: Vec<(Vec<u8>, u32, Malformed)> = vec![
        (rec(0x42, &[]), 0, Malformed::UnknownKind(0x42)),
        (
            full(2 * PAGE),
            0,
            Malformed::PageOutsideLayout {
                gpa: GuestPhysAddr(2 * PAGE),
                pages: 1,
            },
        ),
        (
            full(0x800),
            0,
            Malformed::PageOutsideLayout {
                gpa: GuestPhysAddr(0x800),
                pages: 1,
            },
        ),
        (
            rec(0x02, &[&PAGE.to_le_bytes(), &2u32.to_le_bytes()]),
            0,
            Malformed::PageOutsideLayout {
                gpa: GuestPhysAddr(PAGE),
                pages: 2,
            },
        ),
        (
            rec(0x02, &[&0u64.to_le_bytes(), &0u32.to_le_bytes()]),
            0,
            Malformed::PageOutsideLayout {
                gpa: GuestPhysAddr(0),
                pages: 0,
            },
        ),
        (
            rec(0x03, &[&0u64.to_le_bytes(), &[1; 100]]),
            0,
            Malformed::CutOff,
        ),
        (
            [
                rec(0x01, &[&5u32.to_le_bytes()]),
                rec(0x01, &[&4u32.to_le_bytes()]),
            ]
            .concat(),
            1,
            Malformed::RoundBackwards { before: 5, now: 4 },
        ),
        ([end(0), end(0)].concat(), 1, Malformed::AfterEnd),
        (
            rec(
                0x05,
                &[
                    &0u64.to_le_bytes(),
                    &0u64.to_le_bytes(),
                    &5000u16.to_le_bytes(),
                ],
            ),
            0,
            Malformed::DeltaLength(5000),
        ),
        (
            rec(0xff, &[&0u64.to_le_bytes(), &[4]]),
            0,
            Malformed::EndFlags(4),
        ),
        (
            [full(0), end(2)].concat(),
            1,
            Malformed::PageCount {
                claimed: 2,
                seen: 1,
            },
        ),
    ];
    for (payload, record, want) in cases {
        let s = crafted(&l, 1, 9, &[payload]);
        let (offset, got_record, got) = malformed(&s);
        assert_eq!((got_record, got), (record, want));
        assert!(offset >= header as u64 + 4, "{offset}");
    }

    // A bad delta encoding.
    let s = crafted(
        &l,
        1,
        9,
        &[rec(
            0x05,
            &[
                &0u64.to_le_bytes(),
                &0u64.to_le_bytes(),
                &2u16.to_le_bytes(),
                &[0, 0],
            ],
        )],
    );
    assert!(matches!(malformed(&s).2, Malformed::Delta(_)));

    // A reference to content never sent.
    let s = crafted(
        &l,
        1,
        9,
        &[rec(0x04, &[&0u64.to_le_bytes(), &77u128.to_le_bytes()])],
    );
    assert!(matches!(
        receive(&s[..], ReaderLimits::default()),
        Err(StreamError::UnknownRef { hash: 77, .. })
    ));
    // Reference runs: one copying from a page that holds nothing sent,
    // one leaving the layout, one whose source leaves it, an empty one.
    let run = |gpa: u64, from: u64, pages: u32| {
        rec(
            0x06,
            &[
                &gpa.to_le_bytes(),
                &from.to_le_bytes(),
                &pages.to_le_bytes(),
            ],
        )
    };
    let s = crafted(&l, 1, 9, &[run(0, PAGE, 1)]);
    assert!(matches!(
        receive(&s[..], ReaderLimits::default()),
        Err(StreamError::UnknownSource { gpa, .. }) if gpa == GuestPhysAddr(PAGE)
    ));
    for (r, gpa, pages) in [
        (run(PAGE, 0, 2), PAGE, 2),
        (run(0, PAGE, 2), PAGE, 2),
        (run(0, 0, 0), 0, 0),
        (run(0, 3 * PAGE, 1), 3 * PAGE, 1),
    ] {
        let s = crafted(&l, 1, 9, &[[full(0), r].concat()]);
        let (_, record, problem) = malformed(&s);
        assert_eq!(record, 1);
        assert_eq!(
            problem,
            Malformed::PageOutsideLayout {
                gpa: GuestPhysAddr(gpa),
                pages
            }
        );
    }
    // A valid run: page 1 copies page 0; a run onto itself is allowed.
    let s = crafted(
        &l,
        1,
        9,
        &[[full(0), run(PAGE, 0, 1), run(0, 0, 2), end(4)].concat()],
    );
    let (m, st) = receive(&s[..], ReaderLimits::default()).unwrap();
    assert_eq!(st.ref_pages, 3);
    assert_eq!(read_page(&m, GuestPhysAddr(PAGE))[9], 7);
    // A delta whose result does not match the sender's check.
    let s = crafted(
        &l,
        1,
        9,
        &[rec(
            0x05,
            &[
                &0u64.to_le_bytes(),
                &1u64.to_le_bytes(),
                &3u16.to_le_bytes(),
                &[0, 1, 9],
            ],
        )],
    );
    assert!(matches!(
        receive(&s[..], ReaderLimits::default()),
        Err(StreamError::ContentMismatch { .. })
    ));
    // Chunk lengths: zero, and over the maximum (no allocation of it).
    let mut s = crafted(&l, 1, 9, &[]);
    s.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        receive(&s[..], ReaderLimits::default()),
        Err(StreamError::ChunkLength { len: u32::MAX, .. })
    ));
    let mut s = crafted(&l, 1, 9, &[]);
    s.extend_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        receive(&s[..], ReaderLimits::default()),
        Err(StreamError::ChunkLength { len: 0, .. })
    ));
    // A layout that claims a billion regions is refused before reading them.
    let s = crafted(&[], 1 << 30, 9, &[]);
    assert!(matches!(
        receive(&s[..], ReaderLimits::default()),
        Err(StreamError::TooManyRegions { .. })
    ));
    // Overlapping regions.
    let s = crafted(&[(0, 2 * PAGE), (PAGE, PAGE)], 2, 9, &[end(0)]);
    assert!(matches!(
        receive(&s[..], ReaderLimits::default()),
        Err(StreamError::Layout(_))
    ));
    // A chunk of another stream (other seed) does not pass.
    let mut s = crafted(&l, 1, 9, &[]);
    let other = crafted(&l, 1, 10, &[end(0)]);
    s.extend_from_slice(&other[header..]);
    assert!(matches!(
        receive(&s[..], ReaderLimits::default()),
        Err(StreamError::ChunkChecksum { .. })
    ));
}

#[test]
fn reader_stops_after_error() {
    let (_, bytes) = small_stream();
    let mut r = StreamReader::new(&bytes[..bytes.len() - 3], ReaderLimits::default()).unwrap();
    let mem = r.create_memory().unwrap();
    let err = loop {
        match r.next_event(&mem) {
            Ok(Some(_)) => {}
            Ok(None) => panic!("truncated stream ended"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, StreamError::Truncated { .. }));
    assert!(matches!(r.next_event(&mem), Err(StreamError::ReaderFailed)));
}

struct FailAfter(usize);

impl Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0 < buf.len() {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"));
        }
        self.0 -= buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn writer_errors() {
    let layout = [(GuestPhysAddr(0), 2 * PAGE)];
    let mut w = StreamWriter::new(Vec::new(), &layout, opts(1)).unwrap();
    let p = [1u8; PAGE_SIZE];
    assert!(matches!(
        w.page(GuestPhysAddr(2 * PAGE), &p),
        Err(StreamError::PageNotInLayout { .. })
    ));
    assert!(matches!(
        w.page(GuestPhysAddr(1), &p),
        Err(StreamError::PageNotInLayout { .. })
    ));
    w.begin_round(3).unwrap();
    assert!(matches!(
        w.begin_round(2),
        Err(StreamError::RoundBackwards { before: 3, now: 2 })
    ));
    // Still usable after caller errors.
    w.page(GuestPhysAddr(0), &p).unwrap();
    w.finish().unwrap();

    // A broken pipe fails the writer for good.
    let mut w = StreamWriter::new(FailAfter(100), &layout, opts(1)).unwrap();
    w.page(GuestPhysAddr(0), &p).unwrap();
    assert!(matches!(w.flush(), Err(StreamError::Io { .. })));
    assert!(matches!(
        w.page(GuestPhysAddr(PAGE), &p),
        Err(StreamError::WriterFailed)
    ));
    assert!(StreamWriter::new(Vec::new(), &[], opts(1)).is_err());
}

#[test]
fn zero_runs_coalesce() {
    let mem = GuestMemory::new(&[
        (GuestPhysAddr(0), 64 * PAGE),
        (GuestPhysAddr(64 * PAGE), 64 * PAGE),
    ])
    .unwrap();
    let mut w = StreamWriter::for_memory(Vec::new(), &mem, opts(1)).unwrap();
    for gpa in pages(&mem) {
        assert_eq!(w.page(gpa, &[0; PAGE_SIZE]).unwrap(), Sent::Zero);
    }
    let (bytes, s) = w.finish().unwrap();
    assert_eq!(s.zero_pages, 128);
    // Header (68 bytes), then one chunk: two runs (one per region) of 13
    // bytes, an end marker of 10, 12 bytes of framing.
    assert_eq!(bytes.len(), 68 + 12 + 2 * 13 + 10);
    let (got, r) = receive(&bytes[..], ReaderLimits::default()).unwrap();
    assert_eq!(r.zero_pages, 128);
    assert_same(&mem, &got);
}
