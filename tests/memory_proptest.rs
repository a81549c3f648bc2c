//! Property tests of guest memory against a plain byte-array model: random
//! layouts and random access sequences (bytes, objects, atomics, fill,
//! discard, raw host writes) must leave memory equal to the model and give
//! exactly the model's error; bad layouts give exactly the right
//! `LayoutError`. The rules are written down once, in `crates/pagefold-models/src/model.rs`.

mod common;

use std::sync::atomic::Ordering;

use common::strategies;
use pagefold::{GuestMemory, GuestPhysAddr, LayoutError, MemoryError};
use pagefold_models::model::{validate, Model, PAGE, TOP_END};
use proptest::{prelude::*, sample::Index, test_runner::Config as ProptestConfig};

const fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}

/// `cases` unless `PROPTEST_CASES` says otherwise; no regression files (a
/// failure prints its minimal case, which belongs in a named test).
fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

fn new_memory(layout: &[(u64, u64)]) -> GuestMemory {
    let regions: Vec<(GuestPhysAddr, u64)> = layout.iter().map(|&(s, z)| (gpa(s), z)).collect();
    GuestMemory::new(&regions).expect("valid layout")
}

fn layout_result(layout: &[(u64, u64)]) -> Result<GuestMemory, MemoryError> {
    let regions: Vec<(GuestPhysAddr, u64)> = layout.iter().map(|&(s, z)| (gpa(s), z)).collect();
    GuestMemory::new(&regions)
}

/// One defect injected into a valid layout.
#[derive(Clone, Debug)]
enum Defect {
    Empty,
    ZeroSize(Index),
    MisalignedStart(Index, u64),
    MisalignedSize(Index, u64),
    /// Region moved `below` pages under the top and made `past` pages too long.
    Overflow(Index, u64, u64),
    /// A new region inserted at a position, starting some pages into an
    /// existing region, some pages long.
    Overlap {
        victim: Index,
        position: Index,
        into: Index,
        pages: u64,
    },
}

fn defect() -> impl Strategy<Value = Defect> {
    prop_oneof![
        Just(Defect::Empty),
        any::<Index>().prop_map(Defect::ZeroSize),
        (any::<Index>(), 1u64..PAGE).prop_map(|(i, o)| Defect::MisalignedStart(i, o)),
        (any::<Index>(), 1u64..PAGE).prop_map(|(i, o)| Defect::MisalignedSize(i, o)),
        (any::<Index>(), 0u64..4, 0u64..4).prop_map(|(i, b, p)| Defect::Overflow(i, b, p)),
        (any::<Index>(), any::<Index>(), any::<Index>(), 1u64..8).prop_map(
            |(victim, position, into, pages)| Defect::Overlap {
                victim,
                position,
                into,
                pages
            }
        ),
    ]
}

/// Applies `d` to the valid `layout`; returns the bad layout and the error
/// it must give, derived from the construction rather than from the model.
fn inject(mut layout: Vec<(u64, u64)>, d: &Defect) -> (Vec<(u64, u64)>, LayoutError) {
    let n = layout.len();
    let err = match d {
        Defect::Empty => {
            layout.clear();
            LayoutError::NoRegions
        }
        Defect::ZeroSize(i) => {
            let index = i.index(n);
            layout[index].1 = 0;
            LayoutError::ZeroSize {
                index,
                start: gpa(layout[index].0),
            }
        }
        Defect::MisalignedStart(i, off) | Defect::MisalignedSize(i, off) => {
            let index = i.index(n);
            if matches!(d, Defect::MisalignedStart(..)) {
                layout[index].0 += off;
            } else {
                layout[index].1 += off;
            }
            let (start, size) = layout[index];
            LayoutError::Misaligned {
                index,
                start: gpa(start),
                size,
                align: PAGE,
            }
        }
        Defect::Overflow(i, below, past) => {
            let index = i.index(n);
            let start = TOP_END - below * PAGE;
            // Reaches 2^64 + past pages: one page more than fits.
            let size = (below + 1 + past) * PAGE;
            layout[index] = (start, size);
            LayoutError::AddressOverflow {
                index,
                start: gpa(start),
                size,
            }
        }
        Defect::Overlap {
            victim,
            position,
            into,
            pages,
        } => {
            let q = victim.index(n);
            let (vs, vz) = layout[q];
            let start = vs + into.index(usize::try_from(vz / PAGE).expect("small")) as u64 * PAGE;
            let size = (*pages).min((TOP_END - start) / PAGE) * PAGE;
            let p = position.index(n + 1);
            layout.insert(p, (start, size));
            let victim_now = if p <= q { q + 1 } else { q };
            let (first, second) = if start > vs {
                (victim_now, p)
            } else {
                // Same start: the sort is stable, so the lower index is first.
                (victim_now.min(p), victim_now.max(p))
            };
            LayoutError::Overlap {
                first,
                second,
                at: gpa(start),
            }
        }
    };
    (layout, err)
}

/// A start address for an arbitrary (often invalid) layout.
fn raw_start() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..24).prop_map(|p| p * PAGE),
        1 => (0u64..24, 1u64..PAGE).prop_map(|(p, o)| p * PAGE + o),
        1 => (0u64..4).prop_map(|p| TOP_END - p * PAGE),
        1 => (0u64..4).prop_map(|p| u64::MAX - p),
    ]
}

fn raw_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0u64),
        5 => (1u64..8).prop_map(|p| p * PAGE),
        1 => (1u64..8, 1u64..PAGE).prop_map(|(p, o)| p * PAGE + o),
        1 => Just(TOP_END),
    ]
}

proptest! {
    #![proptest_config(config(128))]

    /// Random layouts and access sequences: after every operation the whole
    /// of memory equals the model, and every result (value or exact error)
    /// equals the model's.
    #[test]
    fn accesses_match_the_byte_array_model(
        layout in strategies::layout(PAGE, 8),
        ops in strategies::ops(40),
    ) {
        let mut model = Model::new(&layout, PAGE).expect("generated layouts are valid");
        let mem = new_memory(&layout);
        model.check_all(&mem).map_err(TestCaseError::fail)?;
        model.run(&mem, &ops, true).map_err(TestCaseError::fail)?;
    }

    /// A valid layout with one defect injected gives exactly the error the
    /// defect calls for (and the model agrees).
    #[test]
    fn bad_layouts_give_the_exact_error(
        layout in strategies::layout(PAGE, 6),
        d in defect(),
    ) {
        let (bad, want) = inject(layout, &d);
        let model = validate(&bad, PAGE).err();
        prop_assert_eq!(model.as_ref(), Some(&want), "model: {:x?}", bad);
        match layout_result(&bad) {
            Err(MemoryError::Layout(got)) => prop_assert_eq!(got, want, "layout {:x?}", bad),
            Err(e) => prop_assert!(false, "layout {:x?}: {} instead of {:?}", bad, e, want),
            Ok(_) => prop_assert!(false, "layout {:x?} accepted instead of {:?}", bad, want),
        }
    }

    /// Arbitrary region lists (often several defects at once): the result
    /// follows the layout rules, and accepted layouts come back sorted.
    #[test]
    fn arbitrary_layouts_follow_the_layout_rules(
        layout in prop::collection::vec((raw_start(), raw_size()), 0..6),
    ) {
        let want = validate(&layout, PAGE);
        let total: u64 = layout.iter().map(|r| r.1).fold(0, u64::saturating_add);
        match (layout_result(&layout), want) {
            (Err(MemoryError::Layout(got)), Err(want)) => prop_assert_eq!(got, want),
            (Ok(mem), Ok(())) => {
                let mut sorted = layout.clone();
                sorted.sort_unstable();
                let got: Vec<(u64, u64)> =
                    mem.regions().iter().map(|r| (r.start().0, r.size())).collect();
                prop_assert_eq!(got, sorted);
                prop_assert_eq!(mem.total_size(), total);
            }
            // Too big for this host (16 EiB regions) is not a layout error.
            (Err(MemoryError::Frames(_)), Ok(())) if total > 1 << 40 => {}
            (got, want) => prop_assert!(
                false,
                "layout {:x?}: got {:?}, want {:?}",
                layout,
                got.map(|_| ()),
                want
            ),
        }
    }

    /// `discard` gives memory back to the kernel (the store's
    /// `allocated_bytes`, from `fstat`), the released pages read zero, and
    /// writing them again brings the memory back.
    #[test]
    fn discard_returns_memory_and_pages_come_back(
        layout in strategies::layout(PAGE, 4),
        picks in prop::collection::vec((any::<Index>(), any::<Index>(), 1u64..4), 1..6),
    ) {
        let mem = new_memory(&layout);
        let store = mem.frame_store();
        for &(start, size) in &layout {
            mem.fill(gpa(start), 0xee, usize::try_from(size).expect("small"))?;
        }
        let total = mem.total_size();
        prop_assert!(store.allocated_bytes()? >= total);
        for (region, first, pages) in picks {
            let (start, size) = layout[region.index(layout.len())];
            let first = first.index(usize::try_from(size / PAGE).expect("small")) as u64;
            let pages = pages.min(size / PAGE - first);
            let (addr, len) = (start + first * PAGE, pages * PAGE);
            let ulen = usize::try_from(len).expect("small");
            let before = store.allocated_bytes()?;
            // Every page was filled (or re-written below), so all are released.
            prop_assert_eq!(mem.discard(gpa(addr), len)?, pages);
            let after = store.allocated_bytes()?;
            prop_assert!(
                after + len <= before,
                "discard of {:#x}+{:#x}: {} -> {} bytes", addr, len, before, after
            );
            let mut buf = vec![0xff; ulen];
            mem.read(gpa(addr), &mut buf)?;
            prop_assert!(buf.iter().all(|&b| b == 0), "released pages read zero");
            prop_assert_eq!(mem.load::<u64>(gpa(addr), Ordering::SeqCst)?, 0);
            mem.fill(gpa(addr), 0xee, ulen)?;
            mem.read(gpa(addr), &mut buf)?;
            prop_assert!(buf.iter().all(|&b| b == 0xee), "released pages take writes");
            prop_assert!(store.allocated_bytes()? >= total, "rewritten pages hold memory");
        }
    }
}
