//! Review of issue 18's snapshot layer: each test here is a defect found
//! by reading the code, shown by a hostile or damaged input that must be a
//! typed error (or restore the right bytes) rather than abort, hang or
//! restore wrong memory.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use pagefold::{
    snapshot::{restore_folded, restore_lazy, save, LazyOptions, SaveOptions, SnapshotReader},
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, VmOptions,
};

mod common;
use common::temp_dir::TempDir;

const PAGE: u64 = 4096;

/// A full snapshot file, built byte by byte as the format says (every
/// checksum and the id correct): one region `[0, size)`, every page zero
/// (runs of `run_pages` zero pages), nothing stored.
fn all_zero_snapshot(size: u64, run_pages: u32) -> Vec<u8> {
    let total = size / PAGE;
    let runs = total.div_ceil(u64::from(run_pages));
    let mut map = Vec::new();
    let mut left = total;
    for _ in 0..runs {
        let n = left.min(u64::from(run_pages));
        map.extend_from_slice(&(n as u32).to_le_bytes());
        map.extend_from_slice(&[0u8; 4]); // kind zero, padding
        map.extend_from_slice(&0u64.to_le_bytes());
        left -= n;
    }
    let table: Vec<u8> = Vec::new();
    let header_len = 160 + 16 + 8;
    let content = PAGE; // header rounded up to a page
    let map_at = content;
    let table_at = map_at + map.len() as u64;
    let mut h = Vec::new();
    h.extend_from_slice(b"\x89PFSNAP\n");
    h.extend_from_slice(&1u16.to_le_bytes()); // version
    h.extend_from_slice(&0u16.to_le_bytes()); // flags
    h.extend_from_slice(&4096u32.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes()); // regions
    h.extend_from_slice(&0u32.to_le_bytes()); // vCPUs
    h.extend_from_slice(&[0u8; 32]); // id, set below
    h.extend_from_slice(&[0u8; 32]); // parent
    for v in [
        total,
        content,
        0, // stored
        map_at,
        runs,
        xxhash_rust::xxh3::xxh3_64_with_seed(&map, 0x5046_534e_4150_0002),
        table_at,
        0, // external
        xxhash_rust::xxh3::xxh3_64_with_seed(&table, 0x5046_534e_4150_0003),
    ] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&0u64.to_le_bytes()); // region start
    h.extend_from_slice(&size.to_le_bytes());
    // The id: over the header with the id field zeroed, map, table, vCPUs.
    let mut id = blake3::Hasher::new_derive_key("pagefold snapshot id v1");
    id.update(&h);
    id.update(&map);
    id.update(&table);
    let id = *id.finalize().as_bytes();
    h[24..56].copy_from_slice(&id);
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&h, 0x5046_534e_4150_0001);
    h.extend_from_slice(&sum.to_le_bytes());
    assert_eq!(h.len(), header_len);
    h.resize(content as usize, 0);
    h.extend_from_slice(&map);
    h.extend_from_slice(&table);
    h
}

/// A 24 KiB file claiming a 64 TiB guest (every page zero: a legal
/// snapshot) made `restore_folded` allocate 16 bytes per claimed page
/// (`Vec::with_capacity` of 2^34 entries, 256 GiB) before anything else:
/// the allocation fails and the process aborts. It must be a typed error.
#[test]
fn a_tiny_file_claiming_a_huge_guest_is_an_error_in_folded_restore() {
    let dir = TempDir::new("review18-huge");
    let path = dir.path("huge.snap");
    std::fs::write(&path, all_zero_snapshot(1 << 46, 1 << 31)).unwrap();
    let snap = SnapshotReader::open(&path).unwrap();
    assert_eq!(snap.pages(), 1 << 34);
    let store = Arc::new(FrameStore::memfd().unwrap());
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let r = restore_folded(&host, VmOptions::default(), &snap);
    assert!(r.is_err(), "a 64 TiB guest restored folded");
}

/// The fetch thread ending early by a panic (here of the caller's
/// `on_fetch` hook) was ignored by `LazyRestore::wait`, which then
/// unregistered the memory and reported success: every page not fetched
/// yet read as zeros, a silently wrong restore. It must be an error.
#[test]
fn a_fetch_thread_that_dies_is_an_error_not_a_restore_of_zeros() {
    let dir = TempDir::new("review18-lazy-panic");
    let path = dir.path("s.snap");
    let layout = vec![(GuestPhysAddr(0), 1024 * PAGE)];
    let mem = GuestMemory::new(&layout).unwrap();
    for k in 0..1024u64 {
        mem.write(GuestPhysAddr(k * PAGE), &[(k % 251) as u8 + 1; 4096])
            .unwrap();
    }
    save(&mem, &path, &SaveOptions::default()).unwrap();
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let fresh = GuestMemory::new(&snap.region_layout()).unwrap();
    let opts = LazyOptions {
        on_fetch: Some(Arc::new(|gpa: GuestPhysAddr| {
            assert!(gpa.0 < 8 * PAGE, "the caller's hook fails at {gpa}");
        })),
        ..LazyOptions::default()
    };
    let lazy = restore_lazy(snap, &fresh, opts).unwrap();
    let r = lazy.wait();
    let mut page = vec![0u8; 4096];
    fresh.read(GuestPhysAddr(900 * PAGE), &mut page).unwrap();
    assert!(
        r.is_err() || page == vec![(900 % 251) as u8 + 1; 4096],
        "wait said {r:?} but page 900 reads {:#x}",
        page[0]
    );
}
