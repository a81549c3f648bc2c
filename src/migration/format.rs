//! The wire format, version 2: constants, the region layout, and the
//! encoding and parsing of records. All integers are little-endian.
//! DESIGN.md ("migration stream") has the tables.

use crate::{
    addr::{GuestFrame, GuestPhysAddr, PageSize, PAGE_SHIFT, PAGE_SIZE},
    memory::LayoutError,
};

use super::{error::Malformed, xbzrle};

/// First eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"\x89PFMIG\r\n";
/// The format version this build writes and reads.
pub const VERSION: u16 = 2;
/// Header flag: the stream may switch to post-copy (DISCARD and SWITCHOVER
/// records, then the rest of memory pushed and requested). A reader that
/// does not know post-copy refuses the stream at its header.
pub const FLAG_POSTCOPY: u16 = 1;
/// Header flag (with [`FLAG_POSTCOPY`]): the stream resumes a post-copy
/// migration whose connection broke; it carries only the pages the
/// destination said it lacks (FULL and ZERO records), then the end marker.
pub const FLAG_RESUME: u16 = 2;
/// Header flags this build knows.
pub(crate) const KNOWN_FLAGS: u16 = FLAG_POSTCOPY | FLAG_RESUME;
/// Bytes of the fixed header: magic, version, flags, page size, seed,
/// region count.
pub(crate) const FIXED_HEADER: usize = 8 + 2 + 2 + 4 + 8 + 4;
/// Largest chunk payload a reader accepts (and a writer may be set to).
pub const MAX_CHUNK: u32 = 1 << 20;
/// Smallest chunk size a writer may be set to (a FULL record must fit).
pub const MIN_CHUNK: u32 = 8 << 10;

/// Record kinds.
pub(crate) mod kind {
    pub(crate) const ROUND: u8 = 0x01;
    pub(crate) const ZERO: u8 = 0x02;
    pub(crate) const FULL: u8 = 0x03;
    pub(crate) const REF: u8 = 0x04;
    pub(crate) const DELTA: u8 = 0x05;
    pub(crate) const REF_RUN: u8 = 0x06;
    /// Post-copy streams only: pages the destination holds from an earlier
    /// round that were written since (gpa u64, pages u32).
    pub(crate) const DISCARD: u8 = 0x07;
    /// Post-copy streams only: the source's guest stopped; pages to come
    /// (u64), then the VMM's state (length u32, bytes).
    pub(crate) const SWITCHOVER: u8 = 0x08;
    pub(crate) const END: u8 = 0xff;
}

/// Record sizes before any variable payload.
pub(crate) const ROUND_LEN: usize = 1 + 4;
pub(crate) const ZERO_LEN: usize = 1 + 8 + 4;
pub(crate) const FULL_LEN: usize = 1 + 8 + PAGE_SIZE;
pub(crate) const DELTA_HEAD: usize = 1 + 8 + 8 + 2;
pub(crate) const REF_RUN_LEN: usize = 1 + 8 + 8 + 4;
pub(crate) const END_LEN: usize = 1 + 8 + 1;
pub(crate) const DISCARD_LEN: usize = 1 + 8 + 4;
pub(crate) const SWITCHOVER_HEAD: usize = 1 + 8 + 4;

/// The return path of a post-copy migration (destination to source): this
/// magic, then 16-byte messages: kind (u8), three zero bytes, pages (u32),
/// guest address (u64).
pub const RETURN_MAGIC: [u8; 8] = *b"\x89PFRET\r\n";
/// Bytes of one return-path message.
pub const RETURN_MSG_LEN: usize = 16;
/// Return-path message kinds.
pub(crate) mod ret {
    /// Send these pages first: a thread waits in a fault on them.
    pub(crate) const REQUEST: u8 = 1;
    /// Every page is placed: the migration is complete.
    pub(crate) const COMPLETE: u8 = 2;
    /// On a resumed connection: pages the destination still lacks.
    pub(crate) const NEED: u8 = 3;
    /// On a resumed connection: the NEED list is complete.
    pub(crate) const NEED_END: u8 = 4;
}

/// A return-path message.
pub(crate) fn encode_return(kind: u8, gpa: GuestPhysAddr, pages: u32) -> [u8; RETURN_MSG_LEN] {
    let mut m = [0u8; RETURN_MSG_LEN];
    m[0] = kind;
    m[4..8].copy_from_slice(&pages.to_le_bytes());
    m[8..].copy_from_slice(&gpa.0.to_le_bytes());
    m
}

/// Parses a return-path message: `(kind, gpa, pages)`, or `None` for one
/// that is garbled (unknown kind, non-zero padding).
pub(crate) fn decode_return(m: &[u8; RETURN_MSG_LEN]) -> Option<(u8, GuestPhysAddr, u32)> {
    if !(ret::REQUEST..=ret::NEED_END).contains(&m[0]) || m[1..4] != [0, 0, 0] {
        return None;
    }
    let mut p = [0u8; 4];
    p.copy_from_slice(&m[4..8]);
    let mut g = [0u8; 8];
    g.copy_from_slice(&m[8..]);
    Some((
        m[0],
        GuestPhysAddr(u64::from_le_bytes(g)),
        u32::from_le_bytes(p),
    ))
}
/// End-marker flag: a 16-byte whole-memory digest follows.
pub(crate) const END_DIGEST: u8 = 1;

/// A delta is sent only when it is at most this long: a delta record is then
/// at least a quarter smaller than a full one (and the receiver's work to
/// apply it pays off).
pub(crate) const DELTA_LIMIT: usize = PAGE_SIZE * 3 / 4;

/// The checksum of a chunk (its length field and payload), keyed by the
/// stream seed and the chunk number so a chunk from another stream or
/// another place in this one does not pass.
pub fn chunk_checksum(bytes: &[u8], seed: u64, chunk: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed ^ chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The content hash behind references: 128-bit xxh3 keyed by the stream's
/// random seed.
pub fn content_hash(page: &[u8; PAGE_SIZE], seed: u64) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(page, seed)
}

/// The page size on the wire (4 KiB).
#[allow(clippy::cast_possible_truncation)]
pub(crate) const PAGE_SIZE_U32: u32 = PAGE_SIZE as u32;

/// A validated region layout, sorted, as page-frame ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// `(first frame, end frame)` per region, sorted, disjoint.
    pfns: Vec<(GuestFrame, GuestFrame)>,
}

impl Layout {
    /// Checks a layout as `GuestMemory` would (non-empty, 4 KiB aligned,
    /// no wrap, no overlap) and sorts it.
    pub(crate) fn new(regions: &[(GuestPhysAddr, u64)]) -> Result<Self, LayoutError> {
        let order = crate::memory::validate_layout(regions, PAGE_SIZE as u64)?;
        let pfns = order
            .iter()
            .map(|&i| {
                let (start, size) = regions[i];
                (
                    start.frame(),
                    GuestFrame(start.frame().0 + (size >> PAGE_SHIFT)),
                )
            })
            .collect();
        Ok(Layout { pfns })
    }

    /// `(start, size)` per region, sorted.
    pub(crate) fn regions(&self) -> Vec<(GuestPhysAddr, u64)> {
        self.pfns
            .iter()
            .map(|&(s, e)| (s.addr(), (e.0 - s.0) << PAGE_SHIFT))
            .collect()
    }

    /// Total bytes (saturating; the reader checks it against its limit).
    pub(crate) fn total_bytes(&self) -> u64 {
        self.pfns.iter().fold(0u64, |t, &(s, e)| {
            t.saturating_add((e.0 - s.0) << PAGE_SHIFT)
        })
    }

    /// End frame of the region holding `pfn`, if any.
    pub(crate) fn region_end(&self, pfn: GuestFrame) -> Option<GuestFrame> {
        let i = self.pfns.partition_point(|&(s, _)| s <= pfn);
        let (s, e) = *self.pfns.get(i.checked_sub(1)?)?;
        (s <= pfn && pfn < e).then_some(e)
    }

    /// Whether the page at `gpa` and the `pages - 1` after it lie in one
    /// region.
    pub(crate) fn holds_run(&self, gpa: GuestPhysAddr, pages: u32) -> bool {
        gpa.is_aligned(PageSize::Size4K)
            && pages > 0
            && self
                .region_end(gpa.frame())
                .is_some_and(|end| u64::from(pages) <= end.0 - gpa.frame().0)
    }
}

/// One parsed record: offsets point into the chunk payload it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    Round(u32),
    Zero {
        gpa: GuestPhysAddr,
        pages: u32,
    },
    Full {
        gpa: GuestPhysAddr,
        data: usize,
    },
    Ref {
        gpa: GuestPhysAddr,
        hash: u128,
    },
    /// Page `gpa + i` gets the content page `from + i` holds, for `i` in
    /// `0..pages`, one page after the other (so a source page may be one
    /// the run itself just wrote).
    RefRun {
        gpa: GuestPhysAddr,
        from: GuestPhysAddr,
        pages: u32,
    },
    Delta {
        gpa: GuestPhysAddr,
        check: u64,
        data: usize,
        len: usize,
    },
    End {
        pages: u64,
        digest: Option<u128>,
    },
    Discard {
        gpa: GuestPhysAddr,
        pages: u32,
    },
    Switchover {
        needed: u64,
        state: usize,
        len: usize,
    },
}

/// A little-endian cursor over a chunk payload.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Malformed> {
        let s = self
            .buf
            .get(self.at..self.at.saturating_add(n))
            .ok_or(Malformed::CutOff)?;
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        self.array().map(u64::from_le_bytes)
    }
    fn u128(&mut self) -> Result<u128, Malformed> {
        self.array().map(u128::from_le_bytes)
    }
    fn gpa(&mut self) -> Result<GuestPhysAddr, Malformed> {
        self.u64().map(GuestPhysAddr)
    }
}

/// Parses and checks every record of a chunk payload before anything is
/// applied: kinds, lengths, addresses against the layout, delta encodings,
/// round order, nothing after the end marker. `last_round` is the last
/// round seen before this chunk. On error: the record's index, its offset
/// in the payload, and the problem.
pub(crate) fn parse_chunk(
    payload: &[u8],
    layout: &Layout,
    mut last_round: Option<u32>,
    postcopy: bool,
    out: &mut Vec<(usize, Record)>,
) -> Result<(), (u32, usize, Malformed)> {
    out.clear();
    let mut c = Cursor {
        buf: payload,
        at: 0,
    };
    let mut index = 0u32;
    while c.at < payload.len() {
        let start = c.at;
        let fail = |p| (index, start, p);
        if matches!(out.last(), Some((_, Record::End { .. }))) {
            return Err(fail(Malformed::AfterEnd));
        }
        let rec = parse_record(&mut c, layout, &mut last_round, postcopy).map_err(fail)?;
        out.push((start, rec));
        index = index.saturating_add(1);
    }
    Ok(())
}

fn parse_record(
    c: &mut Cursor<'_>,
    layout: &Layout,
    last_round: &mut Option<u32>,
    postcopy: bool,
) -> Result<Record, Malformed> {
    let page = |gpa: GuestPhysAddr, pages: u32| {
        if layout.holds_run(gpa, pages) {
            Ok(())
        } else {
            Err(Malformed::PageOutsideLayout { gpa, pages })
        }
    };
    Ok(match c.u8()? {
        kind::ROUND => {
            let now = c.u32()?;
            if let Some(before) = *last_round {
                if now < before {
                    return Err(Malformed::RoundBackwards { before, now });
                }
            }
            *last_round = Some(now);
            Record::Round(now)
        }
        kind::ZERO => {
            let (gpa, pages) = (c.gpa()?, c.u32()?);
            page(gpa, pages)?;
            Record::Zero { gpa, pages }
        }
        kind::FULL => {
            let gpa = c.gpa()?;
            page(gpa, 1)?;
            let data = c.at;
            c.take(PAGE_SIZE)?;
            Record::Full { gpa, data }
        }
        kind::REF => {
            let (gpa, hash) = (c.gpa()?, c.u128()?);
            page(gpa, 1)?;
            Record::Ref { gpa, hash }
        }
        kind::REF_RUN => {
            let (gpa, from, pages) = (c.gpa()?, c.gpa()?, c.u32()?);
            page(gpa, pages)?;
            page(from, pages)?;
            Record::RefRun { gpa, from, pages }
        }
        kind::DELTA => {
            let (gpa, check, len16) = (c.gpa()?, c.u64()?, c.u16()?);
            page(gpa, 1)?;
            let len = usize::from(len16);
            if len > PAGE_SIZE {
                return Err(Malformed::DeltaLength(len16));
            }
            let data = c.at;
            xbzrle::validate(c.take(len)?).map_err(Malformed::Delta)?;
            Record::Delta {
                gpa,
                check,
                data,
                len,
            }
        }
        kind::END => {
            let (pages, flags) = (c.u64()?, c.u8()?);
            let digest = match flags {
                0 => None,
                END_DIGEST => Some(c.u128()?),
                f => return Err(Malformed::EndFlags(f)),
            };
            Record::End { pages, digest }
        }
        kind::DISCARD if postcopy => {
            let (gpa, pages) = (c.gpa()?, c.u32()?);
            page(gpa, pages)?;
            Record::Discard { gpa, pages }
        }
        kind::SWITCHOVER if postcopy => {
            let (needed, len32) = (c.u64()?, c.u32()?);
            let len = usize::try_from(len32).map_err(|_| Malformed::StateLength(len32))?;
            let state = c.at;
            c.take(len).map_err(|_| Malformed::StateLength(len32))?;
            Record::Switchover { needed, state, len }
        }
        k => return Err(Malformed::UnknownKind(k)),
    })
}

/// Appends the fixed header and the layout (without the header checksum).
#[allow(clippy::cast_possible_truncation)] // region count checked by the caller
pub(crate) fn encode_header(out: &mut Vec<u8>, seed: u64, flags: u16, layout: &Layout) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&PAGE_SIZE_U32.to_le_bytes());
    out.extend_from_slice(&seed.to_le_bytes());
    out.extend_from_slice(&(layout.pfns.len() as u32).to_le_bytes());
    for (start, size) in layout.regions() {
        out.extend_from_slice(&start.0.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
    }
}

/// The header checksum over everything before it.
pub fn header_checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_lookup() {
        let l = Layout::new(&[
            (GuestPhysAddr(0x10_0000), 0x2000),
            (GuestPhysAddr(0), 0x1000),
        ])
        .expect("valid");
        assert!(l.holds_run(GuestPhysAddr(0), 1));
        assert!(!l.holds_run(GuestPhysAddr(0), 2));
        assert!(!l.holds_run(GuestPhysAddr(0x1000), 1));
        assert!(l.holds_run(GuestPhysAddr(0x10_0000), 2));
        assert!(l.holds_run(GuestPhysAddr(0x10_1000), 1));
        assert!(!l.holds_run(GuestPhysAddr(0x10_1000), 2));
        assert!(!l.holds_run(GuestPhysAddr(0x10_2000), 1));
        assert!(!l.holds_run(GuestPhysAddr(0x10_0800), 1));
        assert!(!l.holds_run(GuestPhysAddr(0x10_0000), 0));
        assert!(!l.holds_run(GuestPhysAddr(!0xfff), u32::MAX));
        assert_eq!(l.total_bytes(), 0x3000);
    }
}
