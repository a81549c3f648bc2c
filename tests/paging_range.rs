//! `Walker::translate_range` against per-page translation: the segments
//! cover the range in order, each is physically contiguous, neighbours are
//! not (segments are maximal), and a fault ends the listing with the fault
//! a per-page walk reports.

// Test code: values are small and known.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use pagefold::{
    paging::{Access, Segment, Walker, X86Paging},
    GuestMemory, GuestPhysAddr, GuestVirtAddr,
};
use proptest::prelude::*;

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT0: u64 = 0x4000;
const PT1: u64 = 0x5000;
/// Frames handed out from here.
const DATA: u64 = 0x10_0000;

/// VA 0..2 MiB through PT0, 2..4 MiB through PT1, 4..6 MiB one 2 MiB page.
/// `frames[i]` is the frame of page i of the first 4 MiB (None: unmapped);
/// `ro[i]` makes it read-only.
fn guest(frames: &[Option<u64>], ro: &[bool]) -> GuestMemory {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 16 << 20)]).unwrap();
    let w = |a: u64, v: u64| mem.write_obj(GuestPhysAddr(a), v).unwrap();
    w(PML4, PDPT | 7);
    w(PDPT, PD | 7);
    w(PD, PT0 | 7);
    w(PD + 8, PT1 | 7);
    w(PD + 16, (8 << 20) | 0x87);
    for (i, f) in frames.iter().enumerate() {
        if let Some(f) = f {
            let pt = if i < 512 { PT0 } else { PT1 };
            let rw = if ro[i] { 0 } else { 2 };
            w(pt + (i as u64 % 512) * 8, f | 5 | rw);
        }
    }
    mem
}

fn check(walker: &Walker, mem: &GuestMemory, va: u64, len: u64, access: Access) {
    let mut at = va;
    let mut prev: Option<Segment> = None;
    for s in walker.translate_range(mem, GuestVirtAddr(va), len, access) {
        match s {
            Ok(s) => {
                assert_eq!(
                    s.va,
                    GuestVirtAddr(at),
                    "segments are in order, without gaps"
                );
                assert!(s.len > 0);
                // Every byte of the segment agrees with a page walk.
                let mut off = 0;
                while off < s.len {
                    let t = walker
                        .translate(mem, GuestVirtAddr(s.va.0 + off), access)
                        .unwrap();
                    assert_eq!(t.pa, GuestPhysAddr(s.pa.0 + off), "va {:#x}", s.va.0 + off);
                    off += t.contiguous_bytes().min(s.len - off);
                }
                if let Some(p) = prev {
                    assert_ne!(p.pa.0 + p.len, s.pa.0, "segments are maximal");
                }
                at += s.len;
                prev = Some(s);
            }
            Err(f) => {
                let want = walker
                    .translate(mem, GuestVirtAddr(at), access)
                    .unwrap_err();
                assert_eq!(f, want);
                return;
            }
        }
    }
    assert_eq!(at, va + len, "the range is covered");
}

proptest! {
    #[test]
    fn segments_match_page_walks(
        layout in proptest::collection::vec((any::<bool>(), 0u8..4, any::<bool>()), 1024),
        start in 0u64..(6 << 20),
        len in 1u64..(3 << 20),
        write in any::<bool>(),
    ) {
        // Runs of consecutive frames, broken where `layout` says.
        let mut next = DATA;
        let frames: Vec<Option<u64>> = layout
            .iter()
            .map(|&(mapped, jump, _)| {
                if jump == 0 {
                    next += 0x7000;
                }
                let f = next;
                next += 4096;
                (mapped || jump != 1).then_some(f)
            })
            .collect();
        let ro: Vec<bool> = layout.iter().map(|&(_, _, r)| r && write).collect();
        let mem = guest(&frames, &ro);
        let walker = Walker::new(X86Paging::long_mode(PML4)).unwrap();
        let access = if write { Access::write().user() } else { Access::read().user() };
        let len = len.min((6 << 20) - start);
        check(&walker, &mem, start, len, access);
    }
}

#[test]
fn one_contiguous_mebibyte_is_one_segment() {
    let frames: Vec<Option<u64>> = (0..1024).map(|i| Some(DATA + i * 4096)).collect();
    let mem = guest(&frames, &[false; 1024]);
    let walker = Walker::new(X86Paging::long_mode(PML4)).unwrap();
    let segs: Vec<_> = walker
        .translate_range(&mem, GuestVirtAddr(0x800), 4 << 20, Access::read())
        .collect::<Result<_, _>>()
        .unwrap();
    // 0x800..4 MiB contiguous through both tables, then the large page.
    assert_eq!(segs.len(), 2);
    assert_eq!(
        (segs[0].va.0, segs[0].pa.0, segs[0].len),
        (0x800, DATA + 0x800, (4 << 20) - 0x800)
    );
    assert_eq!(
        (segs[1].va.0, segs[1].pa.0, segs[1].len),
        (4 << 20, 8 << 20, 0x800)
    );
}
