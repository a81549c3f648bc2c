//! A naive model of `GuestMemory`: one `Vec<u8>` per region, plus the exact
//! error every access must give. The proptests, the conformance suite and the
//! fuzz target (`fuzz/fuzz_targets/memory_ops.rs`) all run
//! the same operations against the real memory and this model and demand
//! equality after every step.
//!
//! The error rules the model encodes (the specification, written once):
//!
//! * A byte range `[addr, addr+len)`: zero length always succeeds; otherwise
//!   `Overflow { addr, len }` if `addr + len` wraps past `u64::MAX`, else
//!   `Unmapped { addr: first address of the range no region holds }`.
//!   Ranges may span adjacent regions.
//! * An atomic of `n` bytes: `Misaligned { addr, align: n }` unless `addr` is
//!   a multiple of `n`, else `Unmapped { addr }` if no region holds it.
//! * `discard(addr, len)`: `Misaligned { addr, align: granule }` for an
//!   unaligned start, `Misaligned { addr: addr + len, align: granule }` (the
//!   unaligned end) for an unaligned length, then the byte-range rules. It
//!   returns the number of 4 KiB pages that were not already released since
//!   the last library write to them.
//! * Layouts: `NoRegions`; then per region in list order `ZeroSize`,
//!   `Misaligned`, `AddressOverflow`; then the first overlapping pair of the
//!   list sorted by (start, index), reported lower region first.
//!
//! Shared by several test binaries and the fuzz crate, each of which uses a
//! subset of it.

use std::{fmt::Write as _, sync::atomic::Ordering};

use pagefold::{AccessError, GuestMemory, GuestPhysAddr, LayoutError};

/// Base page size: the unit of the page-state table and of `discard` counts.
pub const PAGE: u64 = 4096;
/// The highest end a region can have: start and size are page multiples and
/// `start + size` must not wrap, so the top page of the address space can
/// never be mapped.
pub const TOP_END: u64 = 0xFFFF_FFFF_FFFF_F000;

/// Width of an object or atomic access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// `u8`.
    W1,
    /// `u16`.
    W2,
    /// `u32`.
    W4,
    /// `u64`.
    W8,
}

impl Width {
    /// All widths.
    pub const ALL: [Width; 4] = [Width::W1, Width::W2, Width::W4, Width::W8];

    /// Bytes.
    pub const fn bytes(self) -> usize {
        match self {
            Width::W1 => 1,
            Width::W2 => 2,
            Width::W4 => 4,
            Width::W8 => 8,
        }
    }

    /// Mask of the value bits.
    pub const fn mask(self) -> u64 {
        match self {
            Width::W8 => u64::MAX,
            w => (1u64 << (8 * w.bytes())) - 1,
        }
    }

    /// From any byte (for generators).
    pub const fn from_index(i: u8) -> Width {
        Width::ALL[(i % 4) as usize]
    }
}

/// Runs `$body` with `$T` bound to the unsigned integer type of `$w`.
macro_rules! by_width {
    ($w:expr, |$T:ident| $body:expr) => {
        match $w {
            Width::W1 => {
                type $T = u8;
                $body
            }
            Width::W2 => {
                type $T = u16;
                $body
            }
            Width::W4 => {
                type $T = u32;
                $body
            }
            Width::W8 => {
                type $T = u64;
                $body
            }
        }
    };
}

/// The low bits of `v` as the integer type `T` of width `w`.
fn narrow<T: TryFrom<u64>>(v: u64, w: Width) -> T {
    T::try_from(v & w.mask())
        .ok()
        .expect("masked value fits its width")
}

/// An address chosen relative to the layout, so generated operations hit
/// region edges, holes and the top of the address space often.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrSel {
    /// Which rule (see [`Model::addr`]).
    pub kind: u8,
    /// Which region (modulo the region count).
    pub region: u8,
    /// Offset, used as the rule says.
    pub delta: i64,
}

/// An operation in layout-relative form, as generators produce it.
#[derive(Clone, Debug, PartialEq, Eq)]
// Each variant says which call it makes; its fields are that call's
// arguments, named as there.
#[allow(missing_docs)]
pub enum OpSpec {
    /// `read`.
    Read { at: AddrSel, len: usize },
    /// `write` of a pattern.
    Write { at: AddrSel, len: usize, seed: u8 },
    /// `read_obj`.
    ReadObj { width: Width, at: AddrSel },
    /// `write_obj`.
    WriteObj { width: Width, at: AddrSel, val: u64 },
    /// `load`.
    Load { width: Width, at: AddrSel },
    /// `store`.
    Store { width: Width, at: AddrSel, val: u64 },
    /// `swap`.
    Swap { width: Width, at: AddrSel, val: u64 },
    /// `compare_exchange`; with `expect_current` the expected value is what
    /// memory holds (so it succeeds), otherwise `current`.
    CompareExchange {
        width: Width,
        at: AddrSel,
        expect_current: bool,
        current: u64,
        new: u64,
    },
    /// `fill`.
    Fill { at: AddrSel, byte: u8, len: usize },
    /// `discard` in granules: `first` granules into region `region` (may run
    /// past it), `count` granules long; `skew` 2 misaligns the start, 3 the
    /// length, 4 aims at the top of the address space.
    Discard {
        region: u8,
        first: u8,
        count: u8,
        skew: u8,
    },
    /// `discard` at an arbitrary address and length.
    DiscardAt { at: AddrSel, len: u64 },
    /// A raw write through `host_address` (what a vCPU or a vhost-user
    /// backend does), clipped to the region.
    HostWrite { at: AddrSel, len: usize, seed: u8 },
    /// A raw read through `host_address`, clipped to the region.
    HostRead { at: AddrSel, len: usize },
}

/// A concrete operation.
#[derive(Clone, Debug, PartialEq, Eq)]
// Each variant says which call it makes; its fields are that call's
// arguments, named as there.
#[allow(missing_docs)]
pub enum Op {
    /// `read(addr, len bytes)`.
    Read { addr: u64, len: usize },
    /// `write(addr, data)`.
    Write { addr: u64, data: Vec<u8> },
    /// `read_obj`.
    ReadObj { width: Width, addr: u64 },
    /// `write_obj`.
    WriteObj { width: Width, addr: u64, val: u64 },
    /// `load`.
    Load { width: Width, addr: u64 },
    /// `store`.
    Store { width: Width, addr: u64, val: u64 },
    /// `swap`.
    Swap { width: Width, addr: u64, val: u64 },
    /// `compare_exchange`; `current: None` means "what memory holds".
    CompareExchange {
        width: Width,
        addr: u64,
        current: Option<u64>,
        new: u64,
    },
    /// `fill`.
    Fill { addr: u64, byte: u8, len: usize },
    /// `discard`.
    Discard { addr: u64, len: u64 },
    /// Raw write through `host_address(addr)`.
    HostWrite { addr: u64, data: Vec<u8> },
    /// Raw read through `host_address(addr)`.
    HostRead { addr: u64, len: usize },
}

/// `len` bytes of a pattern that differs per seed and has few zeros.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[1] | 1
        })
        .collect()
}

/// The layout rules of `GuestMemory::new` (see the module docs).
pub fn validate(layout: &[(u64, u64)], granule: u64) -> Result<(), LayoutError> {
    if layout.is_empty() {
        return Err(LayoutError::NoRegions);
    }
    for (index, &(start, size)) in layout.iter().enumerate() {
        let start_addr = GuestPhysAddr(start);
        if size == 0 {
            return Err(LayoutError::ZeroSize {
                index,
                start: start_addr,
            });
        }
        if start % granule != 0 || size % granule != 0 {
            return Err(LayoutError::Misaligned {
                index,
                start: start_addr,
                size,
                align: granule,
            });
        }
        if start.checked_add(size).is_none() {
            return Err(LayoutError::AddressOverflow {
                index,
                start: start_addr,
                size,
            });
        }
    }
    let mut order: Vec<usize> = (0..layout.len()).collect();
    order.sort_by_key(|&i| (layout[i].0, i));
    for pair in order.windows(2) {
        let (a, b) = (layout[pair[0]], layout[pair[1]]);
        if b.0 < a.0 + a.1 {
            return Err(LayoutError::Overlap {
                first: pair[0],
                second: pair[1],
                at: GuestPhysAddr(b.0),
            });
        }
    }
    Ok(())
}

fn to_usize(x: u64) -> usize {
    usize::try_from(x).expect("64-bit host")
}

/// One region of the model.
#[derive(Clone, Debug)]
struct ModelRegion {
    start: u64,
    bytes: Vec<u8>,
    /// Per 4 KiB page: released by `discard` and not written through the
    /// library since (raw host writes do not change it).
    released: Vec<bool>,
    /// Per 4 KiB page: released, then touched through the host mapping (a
    /// raw read or write gives it memory again). A later library read may
    /// find that memory and take the page back as private, so the next
    /// discard may count it again, or not.
    touched: Vec<bool>,
}

impl ModelRegion {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

/// What an operation returned, in a comparable form.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Bytes(Vec<u8>),
    Value(u64),
    Exchange(Result<u64, u64>),
}

/// A chunk of a byte range: (region index, offset in region, length).
type Chunk = (usize, usize, usize);

/// The model of one `GuestMemory`.
#[derive(Clone, Debug)]
pub struct Model {
    granule: u64,
    /// Sorted by start.
    regions: Vec<ModelRegion>,
    /// Whether the frame store holds only this memory's frames and maps
    /// 4 KiB (or hugetlb) pages, so `allocated_bytes` bounds can be checked.
    pub check_kernel_figure: bool,
}

impl Model {
    /// A zero-filled model of `layout`, or the error `GuestMemory` must give.
    pub fn new(layout: &[(u64, u64)], granule: u64) -> Result<Self, LayoutError> {
        validate(layout, granule)?;
        let mut regions: Vec<ModelRegion> = layout
            .iter()
            .map(|&(start, size)| ModelRegion {
                start,
                bytes: vec![0; to_usize(size)],
                released: vec![false; to_usize(size / PAGE)],
                touched: vec![false; to_usize(size / PAGE)],
            })
            .collect();
        regions.sort_by_key(|r| r.start);
        Ok(Model {
            granule,
            regions,
            check_kernel_figure: true,
        })
    }

    /// The layout, sorted.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.start, r.bytes.len() as u64))
            .collect()
    }

    /// Sum of region sizes.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.bytes.len() as u64).sum()
    }

    /// Resolves a layout-relative address.
    pub fn addr(&self, sel: AddrSel) -> u64 {
        let r = &self.regions[usize::from(sel.region) % self.regions.len()];
        let size = r.bytes.len() as u64;
        let mag = sel.delta.unsigned_abs();
        match sel.kind % 9 {
            0 => r.start.wrapping_add_signed(sel.delta),
            1 => r.end().wrapping_add_signed(sel.delta),
            2 => r.start + mag % size,
            // Naturally aligned for every width, inside the region.
            3 => r.start + ((mag % size) & !7),
            // Just below the end: accesses run into the next region or a hole.
            4 => r.end() - 1 - mag % size.min(64),
            // Near the top of the address space: never mapped, and ranges wrap.
            5 => u64::MAX - mag % 64,
            6 => TOP_END.wrapping_add_signed(sel.delta),
            7 => mag,
            _ => r.end() + mag % PAGE,
        }
    }

    /// Resolves a generated operation against this layout and contents.
    pub fn resolve(&self, spec: &OpSpec) -> Op {
        match *spec {
            OpSpec::Read { at, len } => Op::Read {
                addr: self.addr(at),
                len,
            },
            OpSpec::Write { at, len, seed } => Op::Write {
                addr: self.addr(at),
                data: pattern(seed, len),
            },
            OpSpec::ReadObj { width, at } => Op::ReadObj {
                width,
                addr: self.addr(at),
            },
            OpSpec::WriteObj { width, at, val } => Op::WriteObj {
                width,
                addr: self.addr(at),
                val,
            },
            OpSpec::Load { width, at } => Op::Load {
                width,
                addr: self.addr(at),
            },
            OpSpec::Store { width, at, val } => Op::Store {
                width,
                addr: self.addr(at),
                val,
            },
            OpSpec::Swap { width, at, val } => Op::Swap {
                width,
                addr: self.addr(at),
                val,
            },
            OpSpec::CompareExchange {
                width,
                at,
                expect_current,
                current,
                new,
            } => Op::CompareExchange {
                width,
                addr: self.addr(at),
                current: (!expect_current).then_some(current),
                new,
            },
            OpSpec::Fill { at, byte, len } => Op::Fill {
                addr: self.addr(at),
                byte,
                len,
            },
            OpSpec::Discard {
                region,
                first,
                count,
                skew,
            } => {
                let g = self.granule;
                let r = &self.regions[usize::from(region) % self.regions.len()];
                let (mut addr, mut len) = (
                    r.start.wrapping_add(u64::from(first) * g),
                    u64::from(count) * g,
                );
                match skew % 8 {
                    2 => addr = addr.wrapping_add(g / 2),
                    3 => len += g / 2,
                    4 => addr = TOP_END,
                    _ => {}
                }
                Op::Discard { addr, len }
            }
            OpSpec::DiscardAt { at, len } => Op::Discard {
                addr: self.addr(at),
                len,
            },
            OpSpec::HostWrite { at, len, seed } => Op::HostWrite {
                addr: self.addr(at),
                data: pattern(seed, len),
            },
            OpSpec::HostRead { at, len } => Op::HostRead {
                addr: self.addr(at),
                len,
            },
        }
    }

    fn region_index(&self, addr: u64) -> Option<usize> {
        self.regions
            .iter()
            .position(|r| r.start <= addr && addr < r.end())
    }

    /// The chunks `[addr, addr+len)` covers, or the error it must give.
    pub fn span(&self, addr: u64, len: usize) -> Result<Vec<Chunk>, AccessError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = addr.checked_add(len as u64).ok_or(AccessError::Overflow {
            addr: GuestPhysAddr(addr),
            len,
        })?;
        let mut chunks = Vec::new();
        let mut cur = addr;
        while cur < end {
            let i = self.region_index(cur).ok_or(AccessError::Unmapped {
                addr: GuestPhysAddr(cur),
            })?;
            let r = &self.regions[i];
            let n = end.min(r.end()) - cur;
            chunks.push((i, to_usize(cur - r.start), to_usize(n)));
            cur += n;
        }
        Ok(chunks)
    }

    fn atomic_target(&self, addr: u64, width: Width) -> Result<Vec<Chunk>, AccessError> {
        let n = width.bytes() as u64;
        if addr % n != 0 {
            return Err(AccessError::Misaligned {
                addr: GuestPhysAddr(addr),
                align: n,
            });
        }
        let i = self.region_index(addr).ok_or(AccessError::Unmapped {
            addr: GuestPhysAddr(addr),
        })?;
        Ok(vec![(
            i,
            to_usize(addr - self.regions[i].start),
            width.bytes(),
        )])
    }

    fn get(&self, chunks: &[Chunk]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(i, off, n) in chunks {
            out.extend_from_slice(&self.regions[i].bytes[off..off + n]);
        }
        out
    }

    fn get_value(&self, chunks: &[Chunk]) -> u64 {
        let mut le = [0u8; 8];
        let bytes = self.get(chunks);
        le[..bytes.len()].copy_from_slice(&bytes);
        u64::from_le_bytes(le)
    }

    /// Writes `data` over `chunks`; a library write also marks the pages as
    /// holding memory again (a raw host write does not change page states).
    fn put(&mut self, chunks: &[Chunk], data: &[u8], library: bool) {
        let mut done = 0;
        for &(i, off, n) in chunks {
            let r = &mut self.regions[i];
            r.bytes[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
            if library && n > 0 {
                let page = |x: usize| to_usize(x as u64 / PAGE);
                for p in page(off)..=page(off + n - 1) {
                    r.released[p] = false;
                    r.touched[p] = false;
                }
            }
        }
        if library {
            // The written pages' huge pages now hold memory.
            for &chunk in chunks {
                self.hold_granules(chunk);
            }
        }
    }

    /// The released pages of the granules `chunk` touches now hold memory,
    /// as if touched through the mapping (a library read of one takes it
    /// back; a later discard may count it released again): the pages
    /// themselves, and on a store whose granule is larger than a 4 KiB page
    /// (hugetlb) every page of their huge pages, which one write fills.
    fn hold_granules(&mut self, (i, off, n): Chunk) {
        if n == 0 {
            return;
        }
        let per = to_usize(self.granule / PAGE).max(1);
        let r = &mut self.regions[i];
        let first = to_usize(off as u64 / PAGE) / per * per;
        let last = (to_usize((off + n - 1) as u64 / PAGE) / per + 1) * per;
        for p in first..last.min(r.released.len()) {
            r.touched[p] |= r.released[p];
        }
    }

    fn put_value(&mut self, chunks: &[Chunk], val: u64, width: Width) {
        let le = val.to_le_bytes();
        self.put(chunks, &le[..width.bytes()], true);
    }

    /// Applies `op` to the model and to `mem`; `Err` describes a divergence.
    // `by_width!`'s u64 arm converts u64 to itself.
    #[allow(clippy::useless_conversion)]
    pub fn apply(&mut self, mem: &GuestMemory, op: &Op) -> Result<(), String> {
        let g = GuestPhysAddr;
        let (expected, actual): (Result<Outcome, AccessError>, Result<Outcome, AccessError>) =
            match op {
                &Op::Read { addr, len } => {
                    let exp = self.span(addr, len).map(|c| Outcome::Bytes(self.get(&c)));
                    let mut buf = vec![0xa5; len];
                    let act = mem.read(g(addr), &mut buf).map(|()| Outcome::Bytes(buf));
                    (exp, act)
                }
                Op::Write { addr, data } => {
                    let span = self.span(*addr, data.len());
                    let act = mem.write(g(*addr), data).map(|()| Outcome::Done);
                    if let Ok(c) = &span {
                        self.put(c, data, true);
                    }
                    (span.map(|_| Outcome::Done), act)
                }
                &Op::ReadObj { width, addr } => {
                    let exp = self
                        .span(addr, width.bytes())
                        .map(|c| Outcome::Value(self.get_value(&c)));
                    let act = by_width!(width, |T| mem.read_obj::<T>(g(addr)).map(u64::from))
                        .map(Outcome::Value);
                    (exp, act)
                }
                &Op::WriteObj { width, addr, val } => {
                    let span = self.span(addr, width.bytes());
                    let act = by_width!(width, |T| mem
                        .write_obj::<T>(g(addr), narrow::<T>(val, width)))
                    .map(|()| Outcome::Done);
                    if let Ok(c) = &span {
                        self.put_value(c, val, width);
                    }
                    (span.map(|_| Outcome::Done), act)
                }
                &Op::Load { width, addr } => {
                    let exp = self
                        .atomic_target(addr, width)
                        .map(|c| Outcome::Value(self.get_value(&c)));
                    let act = by_width!(width, |T| mem
                        .load::<T>(g(addr), Ordering::SeqCst)
                        .map(u64::from))
                    .map(Outcome::Value);
                    (exp, act)
                }
                &Op::Store { width, addr, val } => {
                    let span = self.atomic_target(addr, width);
                    let act = by_width!(width, |T| mem.store::<T>(
                        g(addr),
                        narrow::<T>(val, width),
                        Ordering::SeqCst
                    ))
                    .map(|()| Outcome::Done);
                    if let Ok(c) = &span {
                        self.put_value(c, val, width);
                    }
                    (span.map(|_| Outcome::Done), act)
                }
                &Op::Swap { width, addr, val } => {
                    let span = self.atomic_target(addr, width);
                    let exp = self
                        .atomic_target(addr, width)
                        .map(|c| Outcome::Value(self.get_value(&c)));
                    let act = by_width!(width, |T| mem
                        .swap::<T>(g(addr), narrow::<T>(val, width), Ordering::SeqCst)
                        .map(u64::from))
                    .map(Outcome::Value);
                    if let Ok(c) = &span {
                        self.put_value(c, val, width);
                    }
                    (exp, act)
                }
                &Op::CompareExchange {
                    width,
                    addr,
                    current,
                    new,
                } => {
                    let span = self.atomic_target(addr, width);
                    let old = span.as_ref().map(|c| self.get_value(c)).unwrap_or(0);
                    let cur = current.unwrap_or(old) & width.mask();
                    let exp = self
                        .atomic_target(addr, width)
                        .map(|_| Outcome::Exchange(if old == cur { Ok(old) } else { Err(old) }));
                    let act = by_width!(width, |T| mem
                        .compare_exchange::<T>(
                            g(addr),
                            narrow::<T>(cur, width),
                            narrow::<T>(new, width),
                            Ordering::SeqCst,
                            Ordering::SeqCst
                        )
                        .map(|r| r.map(u64::from).map_err(u64::from)))
                    .map(Outcome::Exchange);
                    if let Ok(c) = &span {
                        // A failed exchange is still a write access (a locked
                        // cmpxchg always writes): the page holds memory after.
                        let v = if old == cur { new } else { old };
                        self.put_value(c, v, width);
                    }
                    (exp, act)
                }
                &Op::Fill { addr, byte, len } => {
                    let span = self.span(addr, len);
                    let act = mem.fill(g(addr), byte, len).map(|()| Outcome::Done);
                    if let Ok(c) = &span {
                        self.put(c, &vec![byte; len], true);
                    }
                    (span.map(|_| Outcome::Done), act)
                }
                &Op::Discard { addr, len } => return self.apply_discard(mem, addr, len),
                Op::HostWrite { addr, data } => return self.apply_host_write(mem, *addr, data),
                &Op::HostRead { addr, len } => return self.apply_host_read(mem, addr, len),
            };
        if expected == actual {
            Ok(())
        } else {
            Err(format!(
                "{op:?}:\n  expected {expected:?}\n  got      {actual:?}"
            ))
        }
    }

    fn apply_discard(&mut self, mem: &GuestMemory, addr: u64, len: u64) -> Result<(), String> {
        let g = self.granule;
        let expected = if addr % g != 0 {
            Err(AccessError::Misaligned {
                addr: GuestPhysAddr(addr),
                align: g,
            })
        } else if len % g != 0 {
            Err(AccessError::Misaligned {
                addr: GuestPhysAddr(addr.wrapping_add(len)),
                align: g,
            })
        } else {
            self.span(addr, to_usize(len))
        };
        let actual = mem.discard(GuestPhysAddr(addr), len);
        let op = Op::Discard { addr, len };
        let chunks = match (expected, actual) {
            (Ok(chunks), Ok(count)) => {
                let mut want = 0u64;
                let mut maybe = 0u64;
                for &(i, off, n) in &chunks {
                    let r = &mut self.regions[i];
                    r.bytes[off..off + n].fill(0);
                    let pages = to_usize(off as u64 / PAGE)..to_usize((off + n) as u64 / PAGE);
                    for p in pages {
                        want += u64::from(!r.released[p]);
                        maybe += u64::from(r.released[p] && r.touched[p]);
                        r.released[p] = true;
                        r.touched[p] = false;
                    }
                }
                if count < want || count > want + maybe {
                    return Err(format!(
                        "{op:?}: released {count} pages, expected {want} (+ up to {maybe} touched raw)"
                    ));
                }
                chunks
            }
            (Err(e), Err(a)) if e == a => return Ok(()),
            (e, a) => {
                return Err(format!("{op:?}:\n  expected {e:?}\n  got      {a:?}"));
            }
        };
        if self.check_kernel_figure && !chunks.is_empty() {
            // Whatever else holds memory, the discarded range holds none now.
            let held = mem
                .frame_store()
                .allocated_bytes()
                .map_err(|e| e.to_string())?;
            let limit = self.total_size() - len;
            if held > limit {
                return Err(format!(
                    "{op:?}: store holds {held} bytes after discard, at most {limit} possible"
                ));
            }
        }
        Ok(())
    }

    /// The host pointer and clipped length for a raw access, or the error
    /// `host_address` must give.
    fn host_target(
        &self,
        mem: &GuestMemory,
        addr: u64,
        len: usize,
    ) -> Result<Option<(*mut u8, Chunk)>, String> {
        let expected = self.region_index(addr);
        let actual = mem.host_address(GuestPhysAddr(addr));
        match (expected, actual) {
            (None, Err(AccessError::Unmapped { addr: a })) if a.0 == addr => Ok(None),
            (Some(i), Ok(h)) => {
                let r = &self.regions[i];
                let base = mem
                    .host_address(GuestPhysAddr(r.start))
                    .map_err(|e| format!("host_address of region start {:#x}: {e}", r.start))?;
                let off = addr - r.start;
                if h.0 != base.0 + off {
                    return Err(format!(
                        "host_address({addr:#x}) = {h:?}, region base {base:?} + {off:#x}"
                    ));
                }
                let n = len.min(to_usize(r.end() - addr));
                Ok(Some((h.0 as *mut u8, (i, to_usize(off), n))))
            }
            (e, a) => Err(format!(
                "host_address({addr:#x}): expected region {e:?}, got {a:?}"
            )),
        }
    }

    fn apply_host_write(
        &mut self,
        mem: &GuestMemory,
        addr: u64,
        data: &[u8],
    ) -> Result<(), String> {
        if let Some((ptr, chunk)) = self.host_target(mem, addr, data.len())? {
            // `ptr..ptr+n` lies inside one region's live mapping (clipped to
            // the region's end); `data` is a separate buffer.
            // SAFETY: in bounds, non-overlapping, no Rust reference aliased.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, chunk.2) };
            self.put(&[chunk], &data[..chunk.2], false);
            self.touch(chunk);
        }
        Ok(())
    }

    /// Pages of `chunk` touched through the host mapping.
    fn touch(&mut self, chunk: Chunk) {
        self.hold_granules(chunk);
    }

    fn apply_host_read(&mut self, mem: &GuestMemory, addr: u64, len: usize) -> Result<(), String> {
        if let Some((ptr, chunk)) = self.host_target(mem, addr, len)? {
            let mut buf = vec![0u8; chunk.2];
            // SAFETY: as in `apply_host_write`, reading instead of writing.
            unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), chunk.2) };
            self.touch(chunk);
            let want = self.get(&[chunk]);
            if buf != want {
                return Err(format!(
                    "raw read at {addr:#x}+{}: {}",
                    chunk.2,
                    first_difference(&want, &buf, addr)
                ));
            }
        }
        Ok(())
    }

    /// Compares every byte of `mem` with the model, and the region list.
    pub fn check_all(&self, mem: &GuestMemory) -> Result<(), String> {
        let regions: Vec<(u64, u64)> = mem
            .regions()
            .iter()
            .map(|r| (r.start().0, r.size()))
            .collect();
        if regions != self.layout() {
            return Err(format!(
                "regions {regions:x?}, expected {:x?}",
                self.layout()
            ));
        }
        for r in &self.regions {
            self.check_range(mem, r.start, r.bytes.len())?;
        }
        if self.check_kernel_figure {
            let dirty = self
                .regions
                .iter()
                .flat_map(|r| r.bytes.chunks(to_usize(PAGE)))
                .filter(|p| p.iter().any(|&b| b != 0))
                .count() as u64;
            let held = mem
                .frame_store()
                .allocated_bytes()
                .map_err(|e| e.to_string())?;
            if held < dirty * PAGE {
                return Err(format!(
                    "store holds {held} bytes but {dirty} pages hold non-zero bytes"
                ));
            }
        }
        Ok(())
    }

    /// Compares `[addr, addr+len)`, clipped to regions, with the model.
    pub fn check_range(&self, mem: &GuestMemory, addr: u64, len: usize) -> Result<(), String> {
        for r in &self.regions {
            let lo = addr.max(r.start);
            let hi = addr.saturating_add(len as u64).min(r.end());
            if lo >= hi {
                continue;
            }
            let (off, n) = (to_usize(lo - r.start), to_usize(hi - lo));
            let mut buf = vec![0x5a; n];
            mem.read(GuestPhysAddr(lo), &mut buf)
                .map_err(|e| format!("read of mapped {lo:#x}+{n:#x} failed: {e}"))?;
            if buf != r.bytes[off..off + n] {
                return Err(first_difference(&r.bytes[off..off + n], &buf, lo));
            }
        }
        Ok(())
    }

    /// Applies every operation, checking all memory after each one (or,
    /// without `full`, the pages each touched, and all memory at the end).
    pub fn run(&mut self, mem: &GuestMemory, specs: &[OpSpec], full: bool) -> Result<(), String> {
        let mut log = String::new();
        for (step, spec) in specs.iter().enumerate() {
            let op = self.resolve(spec);
            let _ = writeln!(log, "  {step}: {op:?}");
            let check = self.apply(mem, &op).and_then(|()| {
                if full {
                    self.check_all(mem)
                } else {
                    let (addr, len) = op_range(&op);
                    let lo = addr.saturating_sub(PAGE) & !(PAGE - 1);
                    self.check_range(mem, lo, len.saturating_add(to_usize(3 * PAGE)))
                }
            });
            if let Err(e) = check {
                return Err(format!(
                    "step {step}: {e}\nlayout {:x?}\nops:\n{log}",
                    self.layout()
                ));
            }
        }
        self.check_all(mem)
            .map_err(|e| format!("final check: {e}\nlayout {:x?}\nops:\n{log}", self.layout()))
    }
}

/// The byte range an operation touches (for partial checks).
fn op_range(op: &Op) -> (u64, usize) {
    match op {
        Op::Read { addr, len } | Op::Fill { addr, len, .. } | Op::HostRead { addr, len } => {
            (*addr, *len)
        }
        Op::Write { addr, data } | Op::HostWrite { addr, data } => (*addr, data.len()),
        Op::ReadObj { width, addr }
        | Op::WriteObj { width, addr, .. }
        | Op::Load { width, addr }
        | Op::Store { width, addr, .. }
        | Op::Swap { width, addr, .. }
        | Op::CompareExchange { width, addr, .. } => (*addr, width.bytes()),
        Op::Discard { addr, len } => (*addr, usize::try_from(*len).unwrap_or(usize::MAX)),
    }
}

fn first_difference(want: &[u8], got: &[u8], base: u64) -> String {
    let i = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
    let lo = i.saturating_sub(4);
    let hi = (i + 12).min(want.len());
    format!(
        "memory differs from the model at {:#x}: expected {:02x?}, got {:02x?}",
        base + i as u64,
        &want[lo..hi],
        &got[lo..hi.min(got.len())]
    )
}
