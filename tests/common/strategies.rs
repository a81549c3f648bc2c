//! Proptest strategies for guest-memory layouts and operation sequences, in
//! the layout-relative form of [`OpSpec`], so one sequence means something
//! on any layout and shrinks well.
#![allow(dead_code)] // each test binary uses a subset

use proptest::prelude::*;

use pagefold_models::model::{AddrSel, OpSpec, Width, PAGE, TOP_END};

/// A valid layout of 1 to `max_regions` regions, each 1–4 granules, with
/// zero to three granules between neighbours (adjacent more often than not),
/// starting low or ending at the very top of the address space, and listed
/// in random order.
pub(crate) fn layout(granule: u64, max_regions: usize) -> impl Strategy<Value = Vec<(u64, u64)>> {
    let regions = prop::collection::vec(
        (prop_oneof![3 => Just(0u64), 2 => 1u64..4], 1u64..=4),
        1..=max_regions,
    );
    let base = prop_oneof![4 => (0u64..32).prop_map(Some), 1 => Just(None)];
    (regions, base)
        .prop_map(move |(regions, base)| {
            let span: u64 = regions.iter().map(|(gap, size)| gap + size).sum();
            // `None`: the last region ends at the highest possible address.
            let mut at = base.map_or(TOP_END / granule - span, |b| b) * granule;
            regions
                .into_iter()
                .map(|(gap, size)| {
                    at += gap * granule;
                    let region = (at, size * granule);
                    at += size * granule;
                    region
                })
                .collect::<Vec<_>>()
        })
        .prop_shuffle()
}

/// A layout-relative address, biased to region edges.
pub(crate) fn addr_sel() -> impl Strategy<Value = AddrSel> {
    let delta = prop_oneof![
        -16i64..16,
        (-64i64..64).prop_map(|x| x * 8),
        -3 * PAGE as i64..3 * PAGE as i64,
    ];
    (any::<u8>(), any::<u8>(), delta).prop_map(|(kind, region, delta)| AddrSel {
        kind,
        region,
        delta,
    })
}

/// A byte length: mostly short, sometimes a few pages (so ranges span
/// regions and run into holes). Never zero: zero-length accesses have their
/// own tests.
pub(crate) fn length() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 1usize..24, 1 => 1usize..3 * 4096 + 64]
}

fn width() -> impl Strategy<Value = Width> {
    any::<u8>().prop_map(Width::from_index)
}

/// One operation.
pub(crate) fn op() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        2 => (addr_sel(), length()).prop_map(|(at, len)| OpSpec::Read { at, len }),
        3 => (addr_sel(), length(), any::<u8>())
            .prop_map(|(at, len, seed)| OpSpec::Write { at, len, seed }),
        2 => (width(), addr_sel()).prop_map(|(width, at)| OpSpec::ReadObj { width, at }),
        2 => (width(), addr_sel(), any::<u64>())
            .prop_map(|(width, at, val)| OpSpec::WriteObj { width, at, val }),
        2 => (width(), addr_sel()).prop_map(|(width, at)| OpSpec::Load { width, at }),
        2 => (width(), addr_sel(), any::<u64>())
            .prop_map(|(width, at, val)| OpSpec::Store { width, at, val }),
        1 => (width(), addr_sel(), any::<u64>())
            .prop_map(|(width, at, val)| OpSpec::Swap { width, at, val }),
        2 => (width(), addr_sel(), any::<bool>(), any::<u64>(), any::<u64>()).prop_map(
            |(width, at, expect_current, current, new)| OpSpec::CompareExchange {
                width,
                at,
                expect_current,
                current,
                new
            }
        ),
        1 => (addr_sel(), any::<u8>(), prop_oneof![0usize..24, 0usize..3 * 4096 + 64])
            .prop_map(|(at, byte, len)| OpSpec::Fill { at, byte, len }),
        2 => (any::<u8>(), 0u8..6, 0u8..4, any::<u8>()).prop_map(|(region, first, count, skew)| {
            OpSpec::Discard {
                region,
                first,
                count,
                skew,
            }
        }),
        1 => (addr_sel(), prop_oneof![Just(0u64), Just(PAGE), any::<u64>()])
            .prop_map(|(at, len)| OpSpec::DiscardAt { at, len }),
        1 => (addr_sel(), length(), any::<u8>())
            .prop_map(|(at, len, seed)| OpSpec::HostWrite { at, len, seed }),
        1 => (addr_sel(), length()).prop_map(|(at, len)| OpSpec::HostRead { at, len }),
    ]
}

/// A sequence of up to `max` operations.
pub(crate) fn ops(max: usize) -> impl Strategy<Value = Vec<OpSpec>> {
    prop::collection::vec(op(), 1..=max)
}

/// Operations for comparing backings rather than access rules: addresses
/// stay away from the top of the address space and discard lengths are
/// whole granules. (The exact edge rules are pinned by `memory_proptest`
/// and `memory_edges`, once, on the default backing.)
pub(crate) fn backend_ops(max: usize) -> impl Strategy<Value = Vec<OpSpec>> {
    prop::collection::vec(op().prop_map(away_from_edges), 1..=max)
}

fn away_from_edges(op: OpSpec) -> OpSpec {
    let low = |mut at: AddrSel| {
        // Kinds 5 and 6 aim at the top of the address space (see `Model::addr`).
        if matches!(at.kind % 9, 5 | 6) {
            at.kind = 2;
        }
        at
    };
    match op {
        OpSpec::Read { at, len } => OpSpec::Read { at: low(at), len },
        OpSpec::Write { at, len, seed } => OpSpec::Write {
            at: low(at),
            len,
            seed,
        },
        OpSpec::ReadObj { width, at } => OpSpec::ReadObj { width, at: low(at) },
        OpSpec::WriteObj { width, at, val } => OpSpec::WriteObj {
            width,
            at: low(at),
            val,
        },
        OpSpec::Load { width, at } => OpSpec::Load { width, at: low(at) },
        OpSpec::Store { width, at, val } => OpSpec::Store {
            width,
            at: low(at),
            val,
        },
        OpSpec::Swap { width, at, val } => OpSpec::Swap {
            width,
            at: low(at),
            val,
        },
        OpSpec::CompareExchange {
            width,
            at,
            expect_current,
            current,
            new,
        } => OpSpec::CompareExchange {
            width,
            at: low(at),
            expect_current,
            current,
            new,
        },
        OpSpec::Fill { at, byte, len } => OpSpec::Fill {
            at: low(at),
            byte,
            len,
        },
        OpSpec::Discard {
            region,
            first,
            count,
            skew,
        } => OpSpec::Discard {
            region,
            first,
            count,
            // 3 misaligns the length, 4 aims at the top.
            skew: if matches!(skew % 8, 3 | 4) { 0 } else { skew },
        },
        OpSpec::DiscardAt { at, .. } => OpSpec::Discard {
            region: at.region,
            first: at.kind % 6,
            count: 1,
            skew: 0,
        },
        OpSpec::HostWrite { at, len, seed } => OpSpec::HostWrite {
            at: low(at),
            len,
            seed,
        },
        OpSpec::HostRead { at, len } => OpSpec::HostRead { at: low(at), len },
    }
}
