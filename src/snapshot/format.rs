//! The file format, version 1: constants, the header, the part offsets
//! every header must name, and the checksums. All integers little-endian.
//! The module's `//!` and DESIGN.md ("Snapshot") have the table.
//!
//! Pure bytes: no I/O here.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{
    error::{Part, Problem, SnapshotError},
    id::SnapshotId,
};
use crate::addr::{GuestPhysAddr, PAGE_SHIFT, PAGE_SIZE};

/// First eight bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"\x89PFSNAP\n";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Header flag: the snapshot is incremental (it has a parent).
pub(crate) const FLAG_INCREMENTAL: u16 = 1;
/// Header flag: the file has a vCPU part (its count at byte 20). A reader
/// that does not know the flag refuses the file.
pub(crate) const FLAG_VCPUS: u16 = 2;
/// Header flag (with [`FLAG_VCPUS`]): the vCPU part is sectioned (its
/// length first, each vCPU's state in sized sections: `vcpu.rs`); without
/// it, the part is the fixed 504-byte records of earlier builds. A reader
/// that does not know the flag refuses the file (`Problem::Flags`).
pub(crate) const FLAG_VCPU_SECTIONS: u16 = 4;
/// Header flag: the file has a VM part after the vCPU part (the VM-wide
/// KVM state: `vm.rs`), its length its first field. A reader that does
/// not know the flag refuses the file (`Problem::Flags`).
pub(crate) const FLAG_VM_STATE: u16 = 8;
/// Header flag: the file has a device-state part last (the VMM's opaque
/// bytes: `machine.rs`), its length its first field. A reader that does
/// not know the flag refuses the file (`Problem::Flags`).
pub(crate) const FLAG_DEVICE_STATE: u16 = 16;
/// Every flag this build knows.
const KNOWN_FLAGS: u16 =
    FLAG_INCREMENTAL | FLAG_VCPUS | FLAG_VCPU_SECTIONS | FLAG_VM_STATE | FLAG_DEVICE_STATE;
/// The most vCPUs a snapshot holds (`KVM_MAX_VCPUS` on x86, the largest):
/// their part is read at open, so a count is bounded before it is read
/// (a part over a MiB has its checksum streamed first, a whole MiB of
/// zeros in it refused at once: `reader.rs`).
pub(crate) const MAX_VCPUS: u32 = 4096;
/// Bytes of the header before the regions.
pub(crate) const FIXED: usize = 160;
/// Bytes per region in the header: start, size.
pub(crate) const REGION_LEN: usize = 16;
/// Bytes of the header checksum after the regions.
const CHECKSUM_LEN: usize = 8;
/// Bytes per map run: pages u32, kind u8, 3 zero bytes, value u64.
pub(crate) const RUN_LEN: usize = 16;
/// Bytes per stored page's table entry: its BLAKE3 hash.
pub(crate) const LOCAL_LEN: usize = 32;
/// Bytes per ancestor content entry: hash, depth u32, 4 zero bytes, slot u64.
pub(crate) const EXTERNAL_LEN: usize = 48;
/// Offset of the version field.
pub(crate) const VERSION_AT: u64 = 8;
/// Offset of the id field.
pub(crate) const ID_AT: usize = 24;
/// The page size on disk.
const PAGE: u64 = PAGE_SIZE as u64;
/// The page size field's value.
#[allow(clippy::cast_possible_truncation)] // 4096
const PAGE_SIZE_U32: u32 = PAGE_SIZE as u32;

/// A BLAKE3 content address.
pub(crate) type Hash = [u8; 32];

/// The content address of a page: plain (unkeyed) BLAKE3, so the same
/// content has the same address in every snapshot file.
pub(crate) fn content_hash(page: &[u8]) -> Hash {
    *blake3::hash(page).as_bytes()
}

/// The checksum of a part's bytes, seeded per part so the bytes of one
/// part do not pass as another's.
pub(crate) fn part_checksum(part: Part, bytes: &[u8]) -> u64 {
    let seed = match part {
        Part::Header => 0x5046_534e_4150_0001,
        Part::Map => 0x5046_534e_4150_0002,
        Part::Table => 0x5046_534e_4150_0003,
        Part::Vcpus => 0x5046_534e_4150_0004,
        Part::VmState => 0x5046_534e_4150_0006,
        Part::DeviceState => 0x5046_534e_4150_0007,
        Part::Padding | Part::Content => 0,
    };
    xxh3_64_with_seed(bytes, seed)
}

/// Bytes from which a part of the id is hashed on rayon's threads.
const PARALLEL_HASH: usize = 256 * 1024;

/// A snapshot's id: BLAKE3 (in key-derivation mode, so it is no page's
/// content address) of its header without the id and checksum, its map,
/// its table and the parts after the table, in file order (the vCPU, VM
/// and device-state parts, those it has: a file without the later ones
/// keeps the id it had before they existed).
pub(crate) fn snapshot_id(header: &[u8], map: &[u8], table: &[u8], tail: &[&[u8]]) -> SnapshotId {
    let mut h = blake3::Hasher::new_derive_key("pagefold snapshot id v1");
    let body = &header[..header.len().saturating_sub(CHECKSUM_LEN)];
    h.update(body.get(..ID_AT).unwrap_or(body));
    h.update(&[0u8; 32]);
    h.update(body.get(ID_AT + 32..).unwrap_or(&[]));
    // BLAKE3's tree splits a long input across rayon's threads with the
    // same result: an open's id check over megabytes of map and table is
    // the largest part of its time.
    for part in [map, table].into_iter().chain(tail.iter().copied()) {
        if part.len() >= PARALLEL_HASH {
            h.update_rayon(part);
        } else {
            h.update(part);
        }
    }
    SnapshotId(*h.finalize().as_bytes())
}

/// Bytes of a header with `regions` regions.
pub(crate) fn header_len(regions: u64) -> Option<u64> {
    regions
        .checked_mul(REGION_LEN as u64)?
        .checked_add((FIXED + CHECKSUM_LEN) as u64)
}

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) incremental: bool,
    pub(crate) id: SnapshotId,
    pub(crate) parent: SnapshotId,
    /// `(start, size)`, sorted, checked as a `GuestMemory` layout.
    pub(crate) regions: Vec<(GuestPhysAddr, u64)>,
    pub(crate) total_pages: u64,
    pub(crate) content_offset: u64,
    pub(crate) local_count: u64,
    pub(crate) map_offset: u64,
    pub(crate) run_count: u64,
    pub(crate) map_checksum: u64,
    pub(crate) table_offset: u64,
    pub(crate) external_count: u64,
    pub(crate) table_checksum: u64,
    /// vCPU records in the vCPU part (0: no part, flag clear).
    pub(crate) vcpu_count: u32,
    /// The vCPU part is sectioned ([`FLAG_VCPU_SECTIONS`]): its length is
    /// its first field, not a product of the count.
    pub(crate) vcpu_sections: bool,
    /// The file has a VM part ([`FLAG_VM_STATE`]).
    pub(crate) vm_state: bool,
    /// The file has a device-state part ([`FLAG_DEVICE_STATE`]).
    pub(crate) device_state: bool,
}

/// Where each part starts and the file ends, as the counts of a header
/// place them: each part right after the one before, the content area on a
/// page boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Parts {
    pub(crate) header_len: u64,
    pub(crate) content: u64,
    pub(crate) map: u64,
    pub(crate) table: u64,
    pub(crate) vcpus: u64,
    pub(crate) end: u64,
}

impl Parts {
    /// The parts for these counts and a vCPU part of `vcpu_bytes`, `None`
    /// on overflow.
    pub(crate) fn new(
        regions: u64,
        local: u64,
        runs: u64,
        external: u64,
        vcpu_bytes: u64,
    ) -> Option<Self> {
        let header_len = header_len(regions)?;
        let content = header_len.checked_next_multiple_of(PAGE)?;
        let map = content.checked_add(local.checked_mul(PAGE)?)?;
        let table = map.checked_add(runs.checked_mul(RUN_LEN as u64)?)?;
        let vcpu_at = table
            .checked_add(local.checked_mul(LOCAL_LEN as u64)?)?
            .checked_add(external.checked_mul(EXTERNAL_LEN as u64)?)?;
        let end = vcpu_at.checked_add(vcpu_bytes)?;
        Some(Parts {
            header_len,
            content,
            map,
            table,
            vcpus: vcpu_at,
            end,
        })
    }
}

/// A little-endian cursor over a header.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = self.buf.get(self.at..self.at + N) {
            a.copy_from_slice(s);
        }
        self.at += N;
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// The region count of a header whose fixed part is `fixed` (checked for
/// magic and version first).
pub(crate) fn region_count(fixed: &[u8]) -> Result<u64, SnapshotError> {
    check_magic_version(fixed)?;
    let mut c = Cursor { buf: fixed, at: 16 };
    Ok(u64::from(c.u32()))
}

/// The magic and version of the first bytes of a file (as many as it has).
pub(crate) fn check_magic_version(bytes: &[u8]) -> Result<(), SnapshotError> {
    use super::error::Place;
    let at = Place::new(Part::Header, 0);
    let Some(magic) = bytes.get(..8) else {
        return Err(SnapshotError::Truncated {
            at,
            file_len: bytes.len() as u64,
        });
    };
    if magic != MAGIC {
        let mut found = [0u8; 8];
        found.copy_from_slice(magic);
        return Err(SnapshotError::BadMagic { at, found });
    }
    let Some(v) = bytes.get(8..10) else {
        return Err(SnapshotError::Truncated {
            at: Place::new(Part::Header, VERSION_AT),
            file_len: bytes.len() as u64,
        });
    };
    let found = u16::from_le_bytes([v[0], v[1]]);
    if found != VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            at: Place::new(Part::Header, VERSION_AT),
            found,
            supported: VERSION,
        });
    }
    Ok(())
}

impl Header {
    /// Encodes the header with its checksum.
    #[allow(clippy::cast_possible_truncation)] // region count checked by the writer
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED + self.regions.len() * REGION_LEN + CHECKSUM_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let mut flags = if self.incremental {
            FLAG_INCREMENTAL
        } else {
            0
        };
        if self.vcpu_count > 0 {
            flags |= FLAG_VCPUS;
            if self.vcpu_sections {
                flags |= FLAG_VCPU_SECTIONS;
            }
        }
        if self.vm_state {
            flags |= FLAG_VM_STATE;
        }
        if self.device_state {
            flags |= FLAG_DEVICE_STATE;
        }
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&PAGE_SIZE_U32.to_le_bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.vcpu_count.to_le_bytes());
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.parent.0);
        for v in [
            self.total_pages,
            self.content_offset,
            self.local_count,
            self.map_offset,
            self.run_count,
            self.map_checksum,
            self.table_offset,
            self.external_count,
            self.table_checksum,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        debug_assert_eq!(out.len(), FIXED);
        for &(start, size) in &self.regions {
            out.extend_from_slice(&start.0.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        let sum = part_checksum(Part::Header, &out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Decodes and checks a whole header (`bytes` is exactly its length for
    /// its region count): checksum, then every field, then the part
    /// offsets against the counts. The file's length is checked by the
    /// caller against [`Parts::end`].
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, SnapshotError> {
        use super::error::Place;
        check_magic_version(bytes)?;
        let body_len = bytes.len().saturating_sub(CHECKSUM_LEN);
        let (body, sum) = bytes.split_at(body_len);
        let mut found = [0u8; 8];
        found.copy_from_slice(sum.get(..8).unwrap_or(&[0; 8]));
        let found = u64::from_le_bytes(found);
        let computed = part_checksum(Part::Header, body);
        if found != computed {
            return Err(SnapshotError::Checksum {
                at: Place::new(Part::Header, 0),
                found,
                computed,
            });
        }
        let bad =
            |offset: usize, problem| SnapshotError::malformed(Part::Header, offset as u64, problem);
        let mut c = Cursor { buf: body, at: 10 };
        let flags = c.u16();
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(10, Problem::Flags(flags)));
        }
        let page_size = c.u32();
        if page_size != PAGE_SIZE_U32 {
            return Err(bad(12, Problem::PageSize(page_size)));
        }
        let count = c.u32();
        let vcpu_count = c.u32();
        if (flags & FLAG_VCPUS != 0) != (vcpu_count != 0) {
            return Err(bad(20, Problem::VcpuFlag));
        }
        if flags & FLAG_VCPU_SECTIONS != 0 && flags & FLAG_VCPUS == 0 {
            return Err(bad(10, Problem::VcpuFlag));
        }
        if vcpu_count > MAX_VCPUS {
            return Err(bad(
                20,
                Problem::TooManyVcpus {
                    count: vcpu_count,
                    max: MAX_VCPUS,
                },
            ));
        }
        let id = SnapshotId(c.array());
        let parent = SnapshotId(c.array());
        let incremental = flags & FLAG_INCREMENTAL != 0;
        if incremental == parent.is_none() {
            return Err(bad(56, Problem::Parent));
        }
        let mut h = Header {
            incremental,
            id,
            parent,
            regions: Vec::new(),
            total_pages: c.u64(),
            content_offset: c.u64(),
            local_count: c.u64(),
            map_offset: c.u64(),
            run_count: c.u64(),
            map_checksum: c.u64(),
            table_offset: c.u64(),
            external_count: c.u64(),
            table_checksum: c.u64(),
            vcpu_count,
            vcpu_sections: flags & FLAG_VCPU_SECTIONS != 0,
            vm_state: flags & FLAG_VM_STATE != 0,
            device_state: flags & FLAG_DEVICE_STATE != 0,
        };
        // The caller read `FIXED + count * REGION_LEN` bytes, bounded by
        // the file's size.
        h.regions = (0..count)
            .map(|_| (GuestPhysAddr(c.u64()), c.u64()))
            .collect();
        let order = crate::memory::validate_layout(&h.regions, PAGE)
            .map_err(|e| bad(FIXED, Problem::Layout(e)))?;
        if order.iter().enumerate().any(|(i, &o)| i != o) {
            return Err(bad(FIXED, Problem::Unsorted));
        }
        let layout = h
            .regions
            .iter()
            .try_fold(0u64, |t, &(_, size)| t.checked_add(size >> PAGE_SHIFT))
            .ok_or(bad(FIXED, Problem::Overflow("the layout's page count")))?;
        if h.total_pages != layout {
            return Err(bad(
                88,
                Problem::TotalPages {
                    claimed: h.total_pages,
                    layout,
                },
            ));
        }
        if !incremental && h.external_count != 0 {
            return Err(bad(144, Problem::ExternalInFull));
        }
        let parts = h.parts()?;
        for (at, field, found, expected) in [
            (96, "the content offset", h.content_offset, parts.content),
            (112, "the map offset", h.map_offset, parts.map),
            (136, "the table offset", h.table_offset, parts.table),
        ] {
            if found != expected {
                return Err(bad(
                    at,
                    Problem::Offset {
                        field,
                        found,
                        expected,
                    },
                ));
            }
        }
        Ok(h)
    }

    /// Where the parts lie by this header's counts. A sectioned vCPU part
    /// counts its minimum (16 bytes) here: its length is its own first
    /// field, which the reader reads next.
    pub(crate) fn parts(&self) -> Result<Parts, SnapshotError> {
        let vcpu_bytes = if self.vcpu_sections {
            super::vcpu::SECTIONED_MIN
        } else {
            super::vcpu::part_len(u64::from(self.vcpu_count)).ok_or(SnapshotError::malformed(
                Part::Header,
                20,
                Problem::Overflow("the vCPU part's size"),
            ))?
        };
        Parts::new(
            self.regions.len() as u64,
            self.local_count,
            self.run_count,
            self.external_count,
            vcpu_bytes,
        )
        .ok_or(SnapshotError::malformed(
            Part::Header,
            104,
            Problem::Overflow("the file size the counts give"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        let parts = Parts::new(2, 3, 4, 0, 0).unwrap_or_else(|| panic!("parts"));
        Header {
            incremental: false,
            id: SnapshotId([7; 32]),
            parent: SnapshotId::NONE,
            regions: vec![
                (GuestPhysAddr(0), 0x2000),
                (GuestPhysAddr(0x10_0000), 0x1000),
            ],
            total_pages: 3,
            content_offset: parts.content,
            local_count: 3,
            map_offset: parts.map,
            run_count: 4,
            map_checksum: 1,
            table_offset: parts.table,
            external_count: 0,
            table_checksum: 2,
            vcpu_count: 0,
            vcpu_sections: false,
            vm_state: false,
            device_state: false,
        }
    }

    #[test]
    fn header_round_trips_and_checks_every_byte() {
        let h = header();
        let bytes = h.encode();
        assert_eq!(bytes.len() as u64, header_len(2).unwrap_or(0));
        assert_eq!(Header::parse(&bytes).ok(), Some(h));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Header::parse(&b).is_err(), "byte {i}");
        }
    }

    #[test]
    fn ids_ignore_the_id_field_only() {
        let mut h = header();
        let a = snapshot_id(&h.encode(), b"m", b"t", &[]);
        h.id = SnapshotId([9; 32]);
        assert_eq!(snapshot_id(&h.encode(), b"m", b"t", &[]), a);
        h.total_pages = 4;
        assert_ne!(snapshot_id(&h.encode(), b"m", b"t", &[]), a);
        assert_ne!(snapshot_id(&header().encode(), b"n", b"t", &[]), a);
    }
}
