//! Fuzzes guest memory with structured input: a region layout (valid by
//! construction, or raw and checked against the layout rules) and a
//! sequence of accesses (bytes, objects, atomics, fill, discard, raw host
//! writes), run against `GuestMemory` and the byte-array model the
//! integration tests use (`pagefold_models::model`). A panic in pagefold and
//! any divergence from the model (a value, a byte, an error) are crashes.
//!
//! Sizes are capped (at most 8 regions of 64 pages, 64 operations of a few
//! pages each) so one run stays well under a millisecond or two.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::{GuestMemory, GuestPhysAddr, MemoryError};
use pagefold_models::model::{self, AddrSel, Model, OpSpec, Width, PAGE, TOP_END};

const MAX_REGIONS: usize = 8;
const MAX_PAGES: u64 = 64;
const MAX_OPS: usize = 64;
const MAX_LEN: usize = 3 * PAGE as usize + 64;

#[derive(Arbitrary, Debug)]
enum LayoutInput {
    /// Regions of (gap, size) pages placed low or ending at the very top,
    /// listed in a rotated order.
    Built {
        at_top: bool,
        base: u8,
        regions: Vec<(u8, u8)>,
        rotate: u8,
    },
    /// Anything, often invalid.
    Raw(Vec<RawRegion>),
}

#[derive(Arbitrary, Debug)]
struct RawRegion {
    start_page: u16,
    near_top: bool,
    size_pages: u8,
    /// Misaligns the start (or the size) when it is at least 0xf000.
    start_skew: u16,
    size_skew: u16,
}

impl LayoutInput {
    fn layout(&self) -> Vec<(u64, u64)> {
        match self {
            LayoutInput::Built {
                at_top,
                base,
                regions,
                rotate,
            } => {
                let regions: Vec<(u64, u64)> = regions
                    .iter()
                    .take(MAX_REGIONS)
                    .map(|&(gap, size)| (u64::from(gap % 4), 1 + u64::from(size) % MAX_PAGES))
                    .collect();
                let span: u64 = regions.iter().map(|(g, s)| g + s).sum();
                let mut at = if *at_top {
                    TOP_END - span * PAGE
                } else {
                    u64::from(*base) * PAGE
                };
                let mut out: Vec<(u64, u64)> = regions
                    .into_iter()
                    .map(|(gap, size)| {
                        at += gap * PAGE;
                        let r = (at, size * PAGE);
                        at += size * PAGE;
                        r
                    })
                    .collect();
                if !out.is_empty() {
                    let k = usize::from(*rotate) % out.len();
                    out.rotate_left(k);
                }
                out
            }
            LayoutInput::Raw(raw) => raw
                .iter()
                .take(MAX_REGIONS)
                .map(|r| {
                    let page = u64::from(r.start_page % 256);
                    let mut start = if r.near_top {
                        TOP_END - (page % 8) * PAGE
                    } else {
                        page * PAGE
                    };
                    if r.start_skew >= 0xf000 {
                        start += u64::from(r.start_skew) % PAGE;
                    }
                    let mut size = (u64::from(r.size_pages) % (MAX_PAGES + 1)) * PAGE;
                    if r.size_skew >= 0xf000 {
                        size += u64::from(r.size_skew) % PAGE;
                    }
                    (start, size)
                })
                .collect(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct At {
    kind: u8,
    region: u8,
    delta: i16,
}

impl From<At> for AddrSel {
    fn from(a: At) -> Self {
        AddrSel {
            kind: a.kind,
            region: a.region,
            // Wide enough to cross a few pages either way.
            delta: i64::from(a.delta) % (3 * PAGE as i64),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum FuzzOp {
    Read(At, u16),
    Write(At, u16, u8),
    ReadObj(u8, At),
    WriteObj(u8, At, u64),
    Load(u8, At),
    Store(u8, At, u64),
    Swap(u8, At, u64),
    CompareExchange(u8, At, bool, u64, u64),
    Fill(At, u8, u16),
    Discard(u8, u8, u8, u8),
    DiscardAt(At, u64),
    HostWrite(At, u16, u8),
    HostRead(At, u16),
}

fn len(x: u16) -> usize {
    usize::from(x) % (MAX_LEN + 1)
}

impl FuzzOp {
    fn spec(&self) -> OpSpec {
        let w = Width::from_index;
        match *self {
            FuzzOp::Read(at, l) => OpSpec::Read {
                at: at.into(),
                len: len(l),
            },
            FuzzOp::Write(at, l, seed) => OpSpec::Write {
                at: at.into(),
                len: len(l),
                seed,
            },
            FuzzOp::ReadObj(width, at) => OpSpec::ReadObj {
                width: w(width),
                at: at.into(),
            },
            FuzzOp::WriteObj(width, at, val) => OpSpec::WriteObj {
                width: w(width),
                at: at.into(),
                val,
            },
            FuzzOp::Load(width, at) => OpSpec::Load {
                width: w(width),
                at: at.into(),
            },
            FuzzOp::Store(width, at, val) => OpSpec::Store {
                width: w(width),
                at: at.into(),
                val,
            },
            FuzzOp::Swap(width, at, val) => OpSpec::Swap {
                width: w(width),
                at: at.into(),
                val,
            },
            FuzzOp::CompareExchange(width, at, expect_current, current, new) => {
                OpSpec::CompareExchange {
                    width: w(width),
                    at: at.into(),
                    expect_current,
                    current,
                    new,
                }
            }
            FuzzOp::Fill(at, byte, l) => OpSpec::Fill {
                at: at.into(),
                byte,
                len: len(l),
            },
            FuzzOp::Discard(region, first, count, skew) => OpSpec::Discard {
                region,
                first: first % 70,
                count: count % 70,
                skew,
            },
            FuzzOp::DiscardAt(at, l) => OpSpec::DiscardAt {
                at: at.into(),
                len: l,
            },
            FuzzOp::HostWrite(at, l, seed) => OpSpec::HostWrite {
                at: at.into(),
                len: len(l),
                seed,
            },
            FuzzOp::HostRead(at, l) => OpSpec::HostRead {
                at: at.into(),
                len: len(l),
            },
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    layout: LayoutInput,
    ops: Vec<FuzzOp>,
}

fuzz_target!(|input: Input| {
    let layout = input.layout.layout();
    let regions: Vec<(GuestPhysAddr, u64)> =
        layout.iter().map(|&(s, z)| (GuestPhysAddr(s), z)).collect();
    let want = model::validate(&layout, PAGE);
    let mem = match (GuestMemory::new(&regions), want) {
        (Ok(mem), Ok(())) => mem,
        (Err(MemoryError::Layout(got)), Err(want)) => {
            assert_eq!(got, want, "layout {layout:x?}");
            return;
        }
        (got, want) => panic!(
            "layout {layout:x?}: got {:?}, the layout rules say {want:?}",
            got.map(|_| ())
        ),
    };
    let mut model = Model::new(&layout, PAGE).expect("validated above");
    let specs: Vec<OpSpec> = input.ops.iter().take(MAX_OPS).map(FuzzOp::spec).collect();
    if let Err(divergence) = model.run(&mem, &specs, false) {
        panic!("guest memory diverged from the model: {divergence}");
    }
});
