//! Damaged and crafted vCPU parts: every byte of a sectioned vCPU part
//! (registers, `XSAVE` area, XCRs, MSRs, local APIC, events, run state)
//! flipped in turn and the file cut at every length inside the part, each
//! a typed error naming the vCPU part (or the header that covers it),
//! never a panic or a state that differs from what was saved; a part
//! whose checksum was resealed over a structural fault (a section past its
//! entry, out of order, of the wrong size, a tag this build does not know,
//! an entry count that is not the header's) refused, naming the offset; a
//! file of an earlier build (the fixed 504-byte records) still read, its
//! states saying what they lack.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    fs::File,
    os::{fd::FromRawFd, unix::fs::FileExt},
};

use pagefold::{
    snapshot::{
        save_with_vcpus, Part, Problem, SaveOptions, SnapshotError, SnapshotReader, VcpuState,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};

mod common;
use common::temp_dir::TempDir;

const PAGE: u64 = PAGE_SIZE as u64;
const HEADER_SEED: u64 = 0x5046_534e_4150_0001;
const FIXED_SEED: u64 = 0x5046_534e_4150_0004;
const SECTIONED_SEED: u64 = 0x5046_534e_4150_0005;

fn memory() -> GuestMemory {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 4 * PAGE)]).unwrap();
    mem.write(GuestPhysAddr(PAGE), b"vcpu part").unwrap();
    mem
}

/// Two complete states (every section), distinct values throughout.
fn states() -> Vec<VcpuState> {
    (0..2u64)
        .map(|i| {
            let mut s = VcpuState::default();
            s.regs.rip = 0x40_0000 + i;
            s.regs.r14 = 0xdead_beef ^ i;
            s.sregs.cr3 = 0x1000 * (i + 1);
            s.sregs.cs.selector = 0x2b;
            s.sregs.cs.l = 1;
            s.debug.dr7 = 0x400 + i;
            s.xsave = (0..4096).map(|k| (k * 7 + i as usize) as u8).collect();
            s.xcrs = vec![(0, 7)];
            s.msrs = vec![(0x10, 1234 + i), (0xc000_0082, 0xffff_ffff_8100_0000)];
            s.lapic = Some(Box::new(std::array::from_fn(|k| (k as u64 ^ i) as u8)));
            s.events = Some(std::array::from_fn(|k| (k as u64 + i) as u8));
            s.mp_state = Some(3);
            s
        })
        .collect()
}

fn memfd() -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it
    // touches no memory of ours.
    let fd = unsafe { libc::memfd_create(c"pagefold-vcpu".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

fn open_bytes(bytes: &[u8]) -> Result<SnapshotReader, SnapshotError> {
    let f = memfd();
    f.write_all_at(bytes, 0).unwrap();
    SnapshotReader::from_file(f)
}

fn u64_at(b: &[u8], k: usize) -> u64 {
    u64::from_le_bytes(b[k..k + 8].try_into().unwrap())
}

/// Where the header ends and the vCPU part starts.
fn offsets(b: &[u8]) -> (usize, usize) {
    let regions = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
    let hlen = 160 + 16 * regions;
    let (local, external) = (u64_at(b, 104), u64_at(b, 144));
    let table = u64_at(b, 136) as usize;
    (hlen, table + local as usize * 32 + external as usize * 48)
}

/// Reseals the sectioned part's checksum after an edit.
fn reseal_part(b: &mut [u8], part_at: usize) {
    let end = b.len() - 8;
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&b[part_at..end], SECTIONED_SEED);
    b[end..].copy_from_slice(&sum.to_le_bytes());
}

/// Sets the id and the header checksum as a writer would for these bytes.
fn reseal_header_and_id(b: &mut [u8]) {
    let (hlen, part_at) = offsets(b);
    let map = u64_at(b, 112) as usize;
    let runs = u64_at(b, 120) as usize;
    let table = u64_at(b, 136) as usize;
    let mut h = blake3::Hasher::new_derive_key("pagefold snapshot id v1");
    h.update(&b[..24]);
    h.update(&[0u8; 32]);
    h.update(&b[56..hlen]);
    h.update(&b[map..map + runs * 16]);
    h.update(&b[table..part_at]);
    h.update(&b[part_at..]);
    let id = *h.finalize().as_bytes();
    b[24..56].copy_from_slice(&id);
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&b[..hlen], HEADER_SEED);
    b[hlen..hlen + 8].copy_from_slice(&sum.to_le_bytes());
}

fn saved(dir: &TempDir, states: &[VcpuState]) -> Vec<u8> {
    let path = dir.path("s.snap");
    save_with_vcpus(
        &memory(),
        &path,
        &SaveOptions { track_dirty: false },
        states,
    )
    .unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn every_damaged_or_cut_byte_of_the_vcpu_part_is_an_error() {
    let dir = TempDir::new("snap-vcpu-damage");
    let good = saved(&dir, &states());
    let (_, part_at) = offsets(&good);
    assert_eq!(
        u64_at(&good, part_at) as usize,
        good.len() - part_at,
        "the part's length field"
    );
    assert_eq!(open_bytes(&good).unwrap().vcpus(), states());
    let bad = memfd();
    for i in part_at..good.len() {
        let mut b = good.clone();
        b[i] ^= 1 << (i % 8);
        bad.set_len(0).unwrap();
        bad.write_all_at(&b, 0).unwrap();
        match SnapshotReader::from_file(bad.try_clone().unwrap()) {
            Ok(r) => panic!(
                "flipping byte {i} went unnoticed (states {})",
                if r.vcpus() == states() {
                    "identical"
                } else {
                    "DIFFERENT"
                }
            ),
            Err(e) => {
                let at = e
                    .place()
                    .unwrap_or_else(|| panic!("byte {i}: names no place: {e}"));
                assert!(
                    at.part == Part::Vcpus && at.offset <= i as u64 || at.part == Part::Header,
                    "byte {i}: {e}"
                );
            }
        }
    }
    for len in part_at..good.len() {
        bad.set_len(0).unwrap();
        bad.write_all_at(&good[..len], 0).unwrap();
        match SnapshotReader::from_file(bad.try_clone().unwrap()) {
            Ok(_) => panic!("cut at {len} went unnoticed"),
            Err(e) => assert!(
                matches!(
                    e,
                    SnapshotError::Truncated { at, file_len }
                        if file_len == len as u64 && at.part == Part::Vcpus
                ),
                "cut at {len}: {e}"
            ),
        }
    }
    // Bytes after the part: the length field is named.
    let mut long = good.clone();
    long.extend_from_slice(&[0; 3]);
    match open_bytes(&long) {
        Err(SnapshotError::Malformed { at, problem }) => {
            assert_eq!(
                (at.part, at.offset as usize, problem),
                (Part::Vcpus, part_at, Problem::Trailing { extra: 3 })
            );
        }
        other => panic!("want Trailing, got {other:?}"),
    }
}

/// What a resealed (checksum-valid) part with a structural fault gives:
/// the offset and the fault's text.
fn crafted(good: &[u8], edit: impl FnOnce(&mut Vec<u8>, usize)) -> (u64, u32, String) {
    let (_, part_at) = offsets(good);
    let mut b = good.to_vec();
    edit(&mut b, part_at);
    let part_at_now = offsets(&b).1;
    let len = (b.len() - part_at_now) as u64;
    b[part_at_now..part_at_now + 8].copy_from_slice(&len.to_le_bytes());
    reseal_part(&mut b, part_at_now);
    reseal_header_and_id(&mut b);
    match open_bytes(&b) {
        Err(SnapshotError::Malformed {
            at,
            problem: Problem::VcpuEntry { vcpu, what },
        }) => {
            assert_eq!(at.part, Part::Vcpus);
            (at.offset - part_at as u64, vcpu, what)
        }
        other => panic!("want a VcpuEntry error, got {other:?}"),
    }
}

#[test]
fn structural_faults_under_a_valid_checksum_are_named() {
    let dir = TempDir::new("snap-vcpu-crafted");
    let good = saved(&dir, &states());
    // Layout of the first entry: part length (8), entry head (8), record
    // (504), then the XSAVE section's head at 520.
    let first_section = 8 + 8 + 504;
    let section_len = |b: &[u8], at: usize, s: usize| {
        u32::from_le_bytes(b[at + s + 4..at + s + 8].try_into().unwrap()) as usize
    };
    // A tag this build does not know (the XSAVE section's tag set to 99).
    let (off, vcpu, what) = crafted(&good, |b, at| {
        b[at + first_section..at + first_section + 2].copy_from_slice(&99u16.to_le_bytes());
    });
    assert_eq!((off as usize, vcpu), (first_section, 0));
    assert!(what.contains("unknown"), "{what}");
    // Two sections out of order: XCRs (tag 2) relabelled 1 after XSAVE.
    let xcrs_at = first_section + 8 + section_len(&good, offsets(&good).1, first_section);
    let (off, _, what) = crafted(&good, |b, at| {
        b[at + xcrs_at..at + xcrs_at + 2].copy_from_slice(&1u16.to_le_bytes());
    });
    assert_eq!(off as usize, xcrs_at);
    assert!(what.contains("out of order"), "{what}");
    // A section length past its entry.
    let (off, _, what) = crafted(&good, |b, at| {
        let k = at + first_section + 4;
        b[k..k + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    });
    assert_eq!(off as usize, first_section);
    assert!(what.contains("left"), "{what}");
    // An XSAVE area under 4096 bytes: the section shortened by 4 bytes
    // (and the entry with it).
    let (off, _, what) = crafted(&good, |b, at| {
        let k = at + first_section;
        b[k + 4..k + 8].copy_from_slice(&4092u32.to_le_bytes());
        b.drain(k + 8..k + 12);
        let n = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) - 4;
        b[at + 8..at + 12].copy_from_slice(&n.to_le_bytes());
    });
    assert_eq!(off as usize, first_section);
    assert!(what.contains("expected"), "{what}");
    // An entry longer than what is left of the part.
    let (off, _, what) = crafted(&good, |b, at| {
        b[at + 8..at + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    });
    assert_eq!(off, 8);
    assert!(what.contains("left"), "{what}");
    // The header counts 3 vCPUs, the part holds 2.
    let (off, vcpu, what) = crafted(&good, |b, _| {
        b[20..24].copy_from_slice(&3u32.to_le_bytes());
    });
    assert_eq!(vcpu, 2);
    assert!(what.contains("header counts 3"), "{what} at {off}");
    // A nonzero reserved byte of a section head: Reserved at its offset.
    let mut b = good.clone();
    let part_at = offsets(&b).1;
    b[part_at + first_section + 2] = 5;
    reseal_part(&mut b, part_at);
    reseal_header_and_id(&mut b);
    match open_bytes(&b) {
        Err(SnapshotError::Malformed { at, problem }) => assert_eq!(
            (at.offset as usize, problem),
            (part_at + first_section + 2, Problem::Reserved(5))
        ),
        other => panic!("want Reserved, got {other:?}"),
    }
    // A nonzero reserved byte inside an MSR entry (its index's padding).
    let mut b = good.clone();
    let msrs_at = xcrs_at + 8 + section_len(&good, part_at, xcrs_at);
    assert_eq!(
        u16::from_le_bytes(
            good[part_at + msrs_at..part_at + msrs_at + 2]
                .try_into()
                .unwrap()
        ),
        3,
        "the MSR section"
    );
    let k = part_at + msrs_at + 8 + 16 + 6; // the second entry's padding
    b[k] = 0x40;
    reseal_part(&mut b, part_at);
    reseal_header_and_id(&mut b);
    match open_bytes(&b) {
        Err(SnapshotError::Malformed { at, problem }) => {
            assert_eq!((at.offset as usize, problem), (k, Problem::Reserved(0x40)));
        }
        other => panic!("want Reserved, got {other:?}"),
    }
}

/// A file of an earlier build: the vCPU flag without the sectioned-part
/// flag, the fixed 504-byte records, their checksum. Made here from a new
/// file of register-only states (the record layout is the same), with the
/// id and checksums an earlier build wrote.
#[test]
fn a_file_of_fixed_records_from_an_earlier_build_still_reads() {
    let dir = TempDir::new("snap-vcpu-legacy");
    let regs_only: Vec<VcpuState> = states()
        .into_iter()
        .map(|s| VcpuState {
            regs: s.regs,
            sregs: s.sregs,
            debug: s.debug,
            ..VcpuState::default()
        })
        .collect();
    let new = saved(&dir, &regs_only);
    let (_, part_at) = offsets(&new);
    let mut records = Vec::new();
    let mut k = part_at + 8;
    for _ in 0..2 {
        records.extend_from_slice(&new[k + 8..k + 8 + 504]);
        k += 8 + 504;
    }
    let mut old = new[..part_at].to_vec();
    old[10] &= !4;
    old.extend_from_slice(&records);
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&records, FIXED_SEED);
    old.extend_from_slice(&sum.to_le_bytes());
    reseal_header_and_id(&mut old);
    let r = open_bytes(&old).unwrap();
    assert_eq!(r.vcpus(), regs_only);
    assert_eq!(
        r.vcpus()[0].missing(),
        [
            "XSAVE area",
            "XCRs",
            "MSRs",
            "local APIC",
            "vCPU events",
            "MP state",
            "TSC frequency"
        ]
    );
    // Its damage is still found: a record's reserved byte.
    let mut b = old.clone();
    b[part_at + 504 + 223] = 1;
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&b[part_at..part_at + 1008], FIXED_SEED);
    b[part_at + 1008..].copy_from_slice(&sum.to_le_bytes());
    reseal_header_and_id(&mut b);
    match open_bytes(&b) {
        Err(SnapshotError::Malformed { at, problem }) => assert_eq!(
            (at.part, at.offset as usize, problem),
            (Part::Vcpus, part_at + 504 + 223, Problem::Reserved(1))
        ),
        other => panic!("want Reserved, got {other:?}"),
    }
}
