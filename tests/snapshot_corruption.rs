//! Damaged snapshot files: every byte of a small full snapshot and of an
//! incremental one on top of it flipped in turn, and the file cut at every
//! length. Each must be a typed error that names the part and offset (at
//! open, or at the restore that reads the damaged page), never a panic and
//! never memory that differs from what was saved: the format has no byte
//! that is not checked (padding must be zero), so no damaged file restores.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    fs::File,
    os::{fd::FromRawFd, unix::fs::FileExt},
    path::Path,
};

use pagefold::{
    snapshot::{
        restore_into, save, save_incremental, save_incremental_with_vcpus, save_with_vcpus, Part,
        SaveOptions, SnapshotError, SnapshotReader, VcpuState,
    },
    GuestMemory, GuestPhysAddr, RegionSet, PAGE_SIZE,
};

mod common;
use common::temp_dir::TempDir;

const PAGE: u64 = PAGE_SIZE as u64;

fn layout() -> Vec<(GuestPhysAddr, u64)> {
    vec![
        (GuestPhysAddr(0), 4 * PAGE),
        (GuestPhysAddr(0x10_0000), 3 * PAGE),
    ]
}

/// A small memory: two distinct contents, a duplicate, zeros.
fn memory() -> GuestMemory {
    let mem = GuestMemory::new(&layout()).unwrap();
    mem.write(GuestPhysAddr(0), &[0x11; PAGE_SIZE]).unwrap();
    mem.write(GuestPhysAddr(PAGE), b"some bytes").unwrap();
    mem.write(GuestPhysAddr(0x10_0000), &[0x11; PAGE_SIZE])
        .unwrap();
    mem.write(GuestPhysAddr(0x10_0000 + 2 * PAGE), &[0x22; 100])
        .unwrap();
    mem
}

fn image(mem: &GuestMemory) -> Vec<u8> {
    let mut out = Vec::new();
    for r in mem.regions() {
        let mut b = vec![0u8; r.size() as usize];
        mem.read(r.start(), &mut b).unwrap();
        out.extend(b);
    }
    out
}

/// A memfd to hold damaged copies: rewriting a file on disk some 60,000
/// times cost half a minute on a shared disk.
fn memfd() -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it
    // touches no memory of ours.
    let fd = unsafe { libc::memfd_create(c"pagefold-snap".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// Makes `file` hold exactly `bytes`.
fn put(file: &File, bytes: &[u8]) {
    file.set_len(0).unwrap();
    file.write_all_at(bytes, 0).unwrap();
}

/// Opens the snapshot in `file` (with `parent` attached, if given) and
/// restores it into `dst`; what it gives.
fn open_and_restore(
    file: &File,
    parent: Option<&Path>,
    dst: &GuestMemory,
) -> Result<Vec<u8>, SnapshotError> {
    let snap = SnapshotReader::from_file(file.try_clone().unwrap())?;
    let snap = match parent {
        Some(p) => snap.with_parent(SnapshotReader::open(p)?)?,
        None => snap,
    };
    restore_into(&snap, dst)?;
    Ok(image(dst))
}

/// Flips one bit of every byte of `file` in turn (a different bit per
/// offset) and cuts it at every length; every result must be an error
/// naming a place in the file.
fn damage_every_byte(file: &Path, parent: Option<&Path>, expect: &[u8]) {
    let good = std::fs::read(file).unwrap();
    let dst = GuestMemory::new(&layout()).unwrap();
    let bad = memfd();
    put(&bad, &good);
    assert_eq!(open_and_restore(&bad, parent, &dst).unwrap(), expect);
    let mut parts = std::collections::HashMap::<Part, usize>::new();
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 1 << (i % 8);
        put(&bad, &b);
        match open_and_restore(&bad, parent, &dst) {
            Ok(img) => panic!(
                "flipping byte {i} of {} went unnoticed (memory {})",
                good.len(),
                if img == expect {
                    "identical"
                } else {
                    "DIFFERENT"
                }
            ),
            Err(e) => {
                let place = e
                    .place()
                    .unwrap_or_else(|| panic!("byte {i}: error names no place: {e}"));
                *parts.entry(place.part).or_default() += 1;
                // The place named is the damaged byte's part, or the
                // header whose checksums and counts cover the others.
                assert!(
                    place.offset <= i as u64 || place.part == Part::Header,
                    "byte {i}: {e}"
                );
            }
        }
    }
    let mut expected = vec![
        Part::Header,
        Part::Padding,
        Part::Content,
        Part::Map,
        Part::Table,
    ];
    // Header flag bit 1: the file has vCPU states.
    if good[10] & 2 != 0 {
        expected.push(Part::Vcpus);
    }
    for part in expected {
        assert!(
            parts.contains_key(&part),
            "no damage found in the {part}: {parts:?}"
        );
    }
    for len in 0..good.len() {
        put(&bad, &good[..len]);
        match open_and_restore(&bad, parent, &dst) {
            Ok(_) => panic!("cut at {len} of {} went unnoticed", good.len()),
            Err(e) => assert!(
                matches!(e, SnapshotError::Truncated { file_len, .. } if file_len == len as u64),
                "cut at {len}: {e}"
            ),
        }
    }
    // One byte too many.
    let mut long = good.clone();
    long.push(0);
    put(&bad, &long);
    assert!(matches!(
        open_and_restore(&bad, parent, &dst),
        Err(SnapshotError::Malformed { .. })
    ));
}

#[test]
fn every_damaged_byte_of_a_full_snapshot_is_an_error() {
    let dir = TempDir::new("snap-corrupt-full");
    let mem = memory();
    let path = dir.path("full.snap");
    save(&mem, &path, &SaveOptions::default()).unwrap();
    damage_every_byte(&path, None, &image(&mem));
}

#[test]
fn every_damaged_byte_of_an_incremental_snapshot_is_an_error() {
    let dir = TempDir::new("snap-corrupt-inc");
    let mem = memory();
    let base = dir.path("base.snap");
    save(&mem, &base, &SaveOptions::default()).unwrap();
    // A new content, a content the base stores, a zeroed page.
    mem.write(GuestPhysAddr(2 * PAGE), &[0x33; PAGE_SIZE])
        .unwrap();
    mem.write(GuestPhysAddr(3 * PAGE), &[0x11; PAGE_SIZE])
        .unwrap();
    mem.write(GuestPhysAddr(PAGE), &[0; 10]).unwrap();
    let mut dirty = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut dirty).unwrap();
    let inc = dir.path("inc.snap");
    let stats =
        save_incremental(&mem, &SnapshotReader::open(&base).unwrap(), &dirty, &inc).unwrap();
    assert_eq!((stats.stored_pages, stats.ancestor_pages), (1, 1));
    damage_every_byte(&inc, Some(&base), &image(&mem));
}

/// Two vCPU states with distinct values in every field group.
fn vcpus(seed: u64) -> Vec<VcpuState> {
    (0..2u64)
        .map(|i| {
            let mut s = VcpuState::default();
            s.regs.rip = 0x40_0000 + seed + i;
            s.regs.r15 = !seed;
            s.sregs.cr3 = 0x1000 * (i + 1);
            s.sregs.cs.selector = 0x2b;
            s.sregs.cs.l = 1;
            s.sregs.gdt.limit = 0x37;
            s.debug.dr7 = 0x400 + i;
            s
        })
        .collect()
}

#[test]
fn every_damaged_byte_of_a_snapshot_with_vcpus_is_an_error() {
    let dir = TempDir::new("snap-corrupt-vcpu");
    let mem = memory();
    let path = dir.path("full.snap");
    save_with_vcpus(&mem, &path, &SaveOptions::default(), &vcpus(1)).unwrap();
    assert_eq!(SnapshotReader::open(&path).unwrap().vcpus(), vcpus(1));
    damage_every_byte(&path, None, &image(&mem));
}

#[test]
fn every_damaged_byte_of_an_incremental_snapshot_with_vcpus_is_an_error() {
    let dir = TempDir::new("snap-corrupt-vcpu-inc");
    let mem = memory();
    let base = dir.path("base.snap");
    save_with_vcpus(&mem, &base, &SaveOptions::default(), &vcpus(1)).unwrap();
    mem.write(GuestPhysAddr(2 * PAGE), &[0x33; PAGE_SIZE])
        .unwrap();
    let mut dirty = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut dirty).unwrap();
    let inc = dir.path("inc.snap");
    let parent = SnapshotReader::open(&base).unwrap();
    save_incremental_with_vcpus(&mem, &parent, &dirty, &inc, &vcpus(2)).unwrap();
    damage_every_byte(&inc, Some(&base), &image(&mem));
}

#[test]
fn a_file_whose_header_was_never_written_does_not_open() {
    // What a save leaves before its last step: every part but the header.
    let dir = TempDir::new("snap-corrupt-hdr");
    let path = dir.path("s.snap");
    save(&memory(), &path, &SaveOptions::default()).unwrap();
    let mut b = std::fs::read(&path).unwrap();
    b[..PAGE_SIZE].fill(0);
    std::fs::write(&path, &b).unwrap();
    assert!(matches!(
        SnapshotReader::open(&path),
        Err(SnapshotError::BadMagic { .. })
    ));
}

#[test]
fn crafted_headers_with_valid_checksums_are_refused() {
    // A header whose counts claim more than the file holds, checksum fixed
    // up: refused by the file's length before anything is allocated.
    let dir = TempDir::new("snap-corrupt-craft");
    let path = dir.path("s.snap");
    save(&memory(), &path, &SaveOptions::default()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let regions = u32::from_le_bytes(good[16..20].try_into().unwrap()) as usize;
    let hlen = 160 + 16 * regions;
    let reseal = |b: &mut Vec<u8>| {
        let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&b[..hlen], 0x5046_534e_4150_0001);
        b[hlen..hlen + 8].copy_from_slice(&sum.to_le_bytes());
    };
    // Stored count (offset 104) huge, offsets left: an offset mismatch.
    let mut b = good.clone();
    b[104..112].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    reseal(&mut b);
    std::fs::write(&path, &b).unwrap();
    let e = SnapshotReader::open(&path).unwrap_err();
    assert!(matches!(e, SnapshotError::Malformed { .. }), "{e}");
    // Region count huge: cut off by the file's length.
    let mut b = good.clone();
    b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let e = SnapshotReader::open(&path).unwrap_err();
    assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");
    // A version from the future.
    let mut b = good.clone();
    b[8] = 2;
    std::fs::write(&path, &b).unwrap();
    let e = SnapshotReader::open(&path).unwrap_err();
    assert!(
        matches!(e, SnapshotError::UnsupportedVersion { found: 2, .. }),
        "{e}"
    );
}

#[test]
fn a_damaged_page_fails_alone() {
    // Open checks the header, map and table only: a damaged stored page is
    // found when that page is read, and the other pages still read.
    let dir = TempDir::new("snap-corrupt-page");
    let path = dir.path("s.snap");
    let mem = memory();
    save(&mem, &path, &SaveOptions::default()).unwrap();
    let mut b = std::fs::read(&path).unwrap();
    // The second stored page ("some bytes", slot 1).
    b[PAGE_SIZE + PAGE_SIZE + 5] ^= 0x40;
    let f = memfd();
    put(&f, &b);
    let snap = SnapshotReader::from_file(f).unwrap();
    let mut page = [0u8; PAGE_SIZE];
    snap.read_page(GuestPhysAddr(0), &mut page).unwrap();
    assert_eq!(page, [0x11; PAGE_SIZE]);
    let e = snap.read_page(GuestPhysAddr(PAGE), &mut page).unwrap_err();
    assert!(
        matches!(e, SnapshotError::ContentHash { slot: 1, at } if at.part == Part::Content
            && at.offset == 2 * PAGE),
        "{e}"
    );
}
