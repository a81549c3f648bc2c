//! Fuzzes the snapshot reader. Two inputs:
//! - raw bytes, opened as a snapshot file: every page is read and, for a
//!   small layout, the snapshot is restored;
//! - a valid snapshot saved from arbitrary small memory (and optionally an
//!   incremental one on top of it), then damaged at a few bytes or cut (or
//!   not). An undamaged snapshot must restore the saved memory exactly; a
//!   damaged one must be a typed error or restore identical memory.
//!
//! Any panic is a crash. Files live in the temporary directory, one per
//! fuzzing process.

#![no_main]

use std::path::PathBuf;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::{
    snapshot::{restore_into, save, save_incremental, SaveOptions, SnapshotReader},
    GuestMemory, GuestPhysAddr, RegionSet, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;
/// Largest layout read page by page or restored.
const MAX_PAGES: u64 = 256;

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Written {
        /// (gap pages, size pages) per region.
        regions: Vec<(u8, u8)>,
        /// (page, kind, byte) writes before the full snapshot.
        base: Vec<(u8, u8, u8)>,
        /// Writes before an incremental snapshot, if any.
        next: Option<Vec<(u8, u8, u8)>>,
        /// (offset, xor) damage to the newest file.
        damage: Vec<(u16, u8)>,
        cut: Option<u16>,
    },
}

fn path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pagefold-fuzz-{}-{name}", std::process::id()))
}

fn image(mem: &GuestMemory) -> Vec<u8> {
    let mut out = Vec::new();
    for r in mem.regions() {
        let mut b = vec![0u8; r.size() as usize];
        if mem.read(r.start(), &mut b).is_err() {
            return Vec::new();
        }
        out.extend(b);
    }
    out
}

/// Reads every page and restores, where the layout is small; the image
/// restored, if it got that far.
fn exercise(snap: &SnapshotReader) -> Option<Vec<u8>> {
    if snap.pages() > MAX_PAGES {
        return None;
    }
    let mut page = [0u8; PAGE_SIZE];
    for (start, size) in snap.region_layout() {
        for k in 0..size / PAGE {
            let _ = snap.read_page(GuestPhysAddr(start.0 + k * PAGE), &mut page);
        }
    }
    let mem = GuestMemory::new(&snap.region_layout()).ok()?;
    restore_into(snap, &mem).ok()?;
    Some(image(&mem))
}

fn write(mem: &GuestMemory, writes: &[(u8, u8, u8)]) {
    let pages = (mem.total_size() / PAGE) as usize;
    let all: Vec<GuestPhysAddr> = mem
        .regions()
        .iter()
        .flat_map(|r| (0..r.size() / PAGE).map(move |i| GuestPhysAddr(r.start().0 + i * PAGE)))
        .collect();
    for &(p, kind, byte) in writes.iter().take(64) {
        let gpa = all[usize::from(p) % pages];
        let _ = match kind % 4 {
            0 => mem.write(gpa, &[0; PAGE_SIZE]),
            1 => mem.write(gpa, &[byte; PAGE_SIZE]),
            2 => mem.write(GuestPhysAddr(gpa.0 + u64::from(byte) * 16), &[byte | 1]),
            _ => mem.discard(gpa, PAGE).map(|_| ()),
        };
    }
}

fn written(
    regions: &[(u8, u8)],
    base: &[(u8, u8, u8)],
    next: Option<&[(u8, u8, u8)]>,
    damage: &[(u16, u8)],
    cut: Option<u16>,
) {
    let mut at = 0u64;
    let layout: Vec<(GuestPhysAddr, u64)> = regions
        .iter()
        .take(4)
        .map(|&(gap, n)| {
            let start = at + u64::from(gap % 8) * PAGE;
            let size = u64::from(n % 16 + 1) * PAGE;
            at = start + size;
            (GuestPhysAddr(start), size)
        })
        .collect();
    let Ok(mem) = GuestMemory::new(&layout) else {
        return;
    };
    write(&mem, base);
    let (p0, p1) = (path("base"), path("inc"));
    if save(&mem, &p0, &SaveOptions::default()).is_err() {
        return;
    }
    let newest = if let Some(next) = next {
        write(&mem, next);
        let mut dirty = Vec::new();
        let Ok(parent) = SnapshotReader::open(&p0) else {
            panic!("a snapshot just saved does not open");
        };
        if mem.harvest_dirty(RegionSet::All, &mut dirty).is_err()
            || save_incremental(&mem, &parent, &dirty, &p1).is_err()
        {
            return;
        }
        &p1
    } else {
        &p0
    };
    let expect = image(&mem);
    let Ok(mut bytes) = std::fs::read(newest) else {
        return;
    };
    let len = bytes.len();
    let mut damaged = false;
    for &(off, x) in damage.iter().take(4) {
        if x != 0 {
            bytes[usize::from(off) % len] ^= x;
            damaged = true;
        }
    }
    if let Some(c) = cut {
        bytes.truncate(usize::from(c) % len);
        damaged = true;
    }
    if std::fs::write(newest, &bytes).is_err() {
        return;
    }
    let open = || {
        let snap = SnapshotReader::open(newest)?;
        if next.is_some() {
            snap.with_parent(SnapshotReader::open(&p0)?)
        } else {
            Ok(snap)
        }
    };
    match open() {
        Ok(snap) => {
            let got = exercise(&snap);
            if !damaged {
                assert!(got.as_ref() == Some(&expect), "an undamaged snapshot restored wrong");
            } else if let Some(got) = got {
                assert!(got == expect, "a damaged snapshot restored different memory");
            }
        }
        Err(e) => assert!(damaged, "an undamaged snapshot failed to open: {e}"),
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(bytes) => {
            let p = path("raw");
            if std::fs::write(&p, &bytes).is_ok() {
                if let Ok(snap) = SnapshotReader::open(&p) {
                    exercise(&snap);
                }
            }
        }
        Input::Written {
            regions,
            base,
            next,
            damage,
            cut,
        } => written(&regions, &base, next.as_deref(), &damage, cut),
    }
});
