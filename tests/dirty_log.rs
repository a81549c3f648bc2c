//! The dirty log against a `Vec<bool>` model: every library write path
//! marks, harvest returns runs and clears, KVM-style bitmaps merge in,
//! tracking turns on and off per region, holes report nothing, and writer
//! threads racing with a harvesting thread lose no page.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use pagefold::{DirtyError, DirtyRun, GuestMemory, GuestPhysAddr, RegionSet, PAGE_SIZE};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE as u64;

fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}

/// Layout with holes: three regions, gaps between the first two.
fn layout() -> Vec<(GuestPhysAddr, u64)> {
    vec![
        (gpa(0), 70 * P),
        (gpa(100 * P), 130 * P),
        (gpa(230 * P), 5 * P),
    ]
}

fn harvest(m: &GuestMemory) -> Vec<DirtyRun> {
    let mut v = Vec::new();
    m.harvest_dirty(RegionSet::All, &mut v).unwrap();
    v
}

fn pages_of(runs: &[DirtyRun]) -> Vec<u64> {
    runs.iter()
        .flat_map(|r| (0..r.pages).map(move |k| r.start.0 / P + k))
        .collect()
}

#[test]
fn every_write_path_marks() {
    let m = GuestMemory::new(&layout()).unwrap();
    m.set_dirty_tracking(RegionSet::All, true).unwrap();
    assert!(harvest(&m).is_empty(), "nothing dirty at start");
    m.write(gpa(P + 10), &[1; 3]).unwrap();
    m.write_obj(gpa(3 * P + 4090), 7u64).unwrap(); // slow path: two pages
    m.write_obj(gpa(10 * P), 7u32).unwrap(); // fast path
    m.fill(gpa(20 * P), 0xaa, 2 * PAGE_SIZE + 1).unwrap();
    m.store::<u64>(gpa(30 * P), 1, Ordering::SeqCst).unwrap();
    m.swap::<u32>(gpa(31 * P), 1, Ordering::SeqCst).unwrap();
    let ok = m
        .compare_exchange::<u64>(gpa(32 * P), 0, 5, Ordering::SeqCst, Ordering::SeqCst)
        .unwrap();
    assert!(ok.is_ok());
    let failed = m
        .compare_exchange::<u64>(gpa(33 * P), 9, 5, Ordering::SeqCst, Ordering::SeqCst)
        .unwrap();
    assert!(failed.is_err(), "a failed exchange writes nothing");
    m.discard(gpa(40 * P), 2 * P).unwrap();
    // Spanning the boundary of adjacent... regions 1 and 2 are not adjacent;
    // a write at the end of region 1.
    m.write(gpa(229 * P + 100), &[9; 8]).unwrap();
    let runs = harvest(&m);
    assert_eq!(
        pages_of(&runs),
        vec![1, 3, 4, 10, 20, 21, 22, 30, 31, 32, 40, 41, 229]
    );
    assert!(harvest(&m).is_empty(), "harvest clears");
    assert!(!m.is_dirty(gpa(P)));
}

#[test]
fn tracking_is_per_region_and_stopping_keeps_the_log() {
    let m = GuestMemory::new(&layout()).unwrap();
    m.write(gpa(0), &[1]).unwrap();
    assert!(harvest(&m).is_empty(), "off by default");
    m.set_dirty_tracking(RegionSet::One(1), true).unwrap();
    assert!(m.dirty_tracking(1).unwrap() && !m.dirty_tracking(0).unwrap());
    m.write(gpa(0), &[1]).unwrap();
    m.write(gpa(100 * P), &[1]).unwrap();
    m.set_dirty_tracking(RegionSet::All, false).unwrap();
    m.write(gpa(101 * P), &[1]).unwrap();
    assert_eq!(pages_of(&harvest(&m)), vec![100], "kept after stop");
    assert!(matches!(
        m.set_dirty_tracking(RegionSet::One(3), true),
        Err(DirtyError::NoSuchRegion { index: 3, count: 3 })
    ));
}

#[test]
fn kvm_bitmaps_merge() {
    let m = GuestMemory::new(&layout()).unwrap();
    // Region 1 has 130 pages: 3 words, 2 bits in the last.
    m.merge_dirty_bitmap(1, &[1 | 1 << 63, u64::MAX, 0b10])
        .unwrap();
    assert!(matches!(
        m.merge_dirty_bitmap(1, &[0, 0]),
        Err(DirtyError::BitmapSize { .. })
    ));
    assert!(
        matches!(
            m.merge_dirty_bitmap(1, &[0, 0, 0b100]),
            Err(DirtyError::BitmapSize { .. })
        ),
        "bit past the last page"
    );
    let runs = harvest(&m);
    assert_eq!(
        runs,
        vec![
            DirtyRun {
                start: gpa(100 * P),
                pages: 1
            },
            DirtyRun {
                start: gpa(163 * P),
                pages: 65
            },
            DirtyRun {
                start: gpa(229 * P),
                pages: 1
            },
        ]
    );
}

#[test]
fn starting_on_a_large_region_is_cheap() {
    // 64 GiB of guest memory: frames are never touched, the bitmap (2 MiB)
    // is allocated zeroed and lazily backed.
    let m = GuestMemory::new(&[(gpa(0), 64 << 30)]).unwrap();
    let t = std::time::Instant::now();
    m.set_dirty_tracking(RegionSet::All, true).unwrap();
    let took = t.elapsed();
    assert!(took.as_millis() < 50, "enabling took {took:?}");
    m.write_obj(gpa((64 << 30) - 8), 1u64).unwrap();
    assert_eq!(pages_of(&harvest(&m)), vec![(64 << 30) / P - 1]);
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u16),
    Obj(u64),
    Merge(usize, Vec<u64>),
    Track(Option<usize>, bool),
    Harvest,
}

fn op() -> impl Strategy<Value = Op> {
    let total = 240 * P;
    prop_oneof![
        4 => (0..total, 1..3 * PAGE_SIZE as u16).prop_map(|(a, l)| Op::Write(a, l)),
        4 => (0..total / 8).prop_map(|a| Op::Obj(a * 8)),
        1 => (0..3usize, proptest::collection::vec(any::<u64>(), 3)).prop_map(|(r, v)| Op::Merge(r, v)),
        1 => (proptest::option::of(0..3usize), any::<bool>()).prop_map(|(r, b)| Op::Track(r, b)),
        2 => Just(Op::Harvest),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn matches_a_vec_bool_model(ops in proptest::collection::vec(op(), 1..60)) {
        let lay = layout();
        let m = GuestMemory::new(&lay).unwrap();
        let region_of = |page: u64| lay.iter().position(|&(s, n)| page * P >= s.0 && page * P < s.0 + n);
        let mut on = [false; 3];
        let mut model = vec![false; 240];
        for op in ops {
            match op {
                Op::Write(a, l) => {
                    let ok = m.write(gpa(a), &vec![1u8; l as usize]).is_ok();
                    if ok {
                        for p in a / P..=(a + u64::from(l) - 1) / P {
                            let r = region_of(p).unwrap();
                            if on[r] { model[p as usize] = true; }
                        }
                    }
                }
                Op::Obj(a) => {
                    if m.write_obj(gpa(a), a).is_ok() && on[region_of(a / P).unwrap()] {
                        model[(a / P) as usize] = true;
                    }
                }
                Op::Merge(r, mut bits) => {
                    let pages = (lay[r].1 / P) as usize;
                    bits.truncate(pages.div_ceil(64));
                    if pages % 64 != 0 {
                        let last = bits.len() - 1;
                        bits[last] &= (1u64 << (pages % 64)) - 1;
                    }
                    m.merge_dirty_bitmap(r, &bits).unwrap();
                    let base = lay[r].0 .0 / P;
                    for i in 0..pages {
                        if bits[i / 64] >> (i % 64) & 1 == 1 {
                            model[base as usize + i] = true;
                        }
                    }
                }
                Op::Track(r, b) => {
                    match r {
                        None => { m.set_dirty_tracking(RegionSet::All, b).unwrap(); on = [b; 3]; }
                        Some(r) => { m.set_dirty_tracking(RegionSet::One(r), b).unwrap(); on[r] = b; }
                    }
                }
                Op::Harvest => {
                    let got = pages_of(&harvest(&m));
                    let want: Vec<u64> = (0..240).filter(|&p| model[p as usize]).collect();
                    prop_assert_eq!(got, want);
                    model.iter_mut().for_each(|b| *b = false);
                }
            }
        }
        let runs = harvest(&m);
        // Runs are maximal within a region: no two touch inside one region.
        for w in runs.windows(2) {
            let end = w[0].start.0 + w[0].pages * P;
            prop_assert!(end != w[1].start.0 || region_of(w[0].start.0 / P) != region_of(w[1].start.0 / P));
        }
        let got = pages_of(&runs);
        let want: Vec<u64> = (0..240).filter(|&p| model[p as usize]).collect();
        prop_assert_eq!(got, want);
    }
}

/// Writer threads hammer pages through the API while another thread
/// harvests in a loop: every page written after tracking began is reported
/// at least once, and a page is reported only if it was written.
#[test]
fn writers_racing_a_harvester_lose_nothing() {
    const PAGES: u64 = 4096;
    let m = Arc::new(
        GuestMemory::new(&[(gpa(0), PAGES * P), (gpa((PAGES + 16) * P), PAGES * P)]).unwrap(),
    );
    m.set_dirty_tracking(RegionSet::All, true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                let mut written = vec![false; 2 * PAGES as usize];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for i in 0..200_000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Half the writes go to a small hot set, so bits are
                    // often already set (the skip path).
                    let page = if i % 2 == 0 { x % 64 } else { x % (2 * PAGES) };
                    let addr = if page < PAGES {
                        page * P
                    } else {
                        (page + 16) * P
                    };
                    match i % 3 {
                        0 => m.write_obj(gpa(addr + (x >> 40) % 512 * 8), i).unwrap(),
                        1 => m.write(gpa(addr + 8), &[t as u8; 16]).unwrap(),
                        _ => m
                            .store::<u64>(gpa(addr + 64), i, Ordering::Relaxed)
                            .unwrap(),
                    }
                    written[page as usize] = true;
                }
                written
            })
        })
        .collect();
    let harvester = {
        let m = Arc::clone(&m);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut seen = vec![false; 2 * PAGES as usize];
            let mut runs = Vec::new();
            let mut rounds = 0u64;
            while !stop.load(Ordering::Acquire) {
                runs.clear();
                m.harvest_dirty(RegionSet::All, &mut runs).unwrap();
                for p in pages_of(&runs) {
                    let idx = if p < PAGES { p } else { p - 16 };
                    seen[idx as usize] = true;
                }
                rounds += 1;
            }
            (seen, rounds)
        })
    };
    let mut written = vec![false; 2 * PAGES as usize];
    for w in writers {
        for (a, b) in written.iter_mut().zip(w.join().unwrap()) {
            *a |= b;
        }
    }
    stop.store(true, Ordering::Release);
    let (mut seen, rounds) = harvester.join().unwrap();
    for p in pages_of(&harvest(&m)) {
        let idx = if p < PAGES { p } else { p - 16 };
        seen[idx as usize] = true;
    }
    assert!(
        rounds > 1,
        "the harvester ran concurrently ({rounds} rounds)"
    );
    assert_eq!(seen, written, "every written page reported, nothing else");
}
