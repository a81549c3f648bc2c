//! Snapshots end to end: round trips of memories with zero, duplicate and
//! random pages over several regions with holes; each distinct content
//! stored once; released pages saved without being read and restored
//! released; an incremental chain of three restoring each level exactly,
//! with contents taken from ancestors; the errors of wrong chains and
//! layouts; and a property test on random contents and writes.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};

use pagefold::{
    snapshot::{
        restore_into, save, save_incremental, PageSource, SaveOptions, SnapshotError,
        SnapshotReader,
    },
    DirtyRun, GuestMemory, GuestPhysAddr, RegionSet, PAGE_SIZE,
};
use proptest::{prelude::*, test_runner::Config as ProptestConfig};
use rand::{Rng, SeedableRng};

mod common;
use common::temp_dir::TempDir;

const PAGE: u64 = PAGE_SIZE as u64;

/// Three regions with holes between them, out of order in the list.
fn layout() -> Vec<(GuestPhysAddr, u64)> {
    vec![
        (GuestPhysAddr(0x10_0000), 48 * PAGE),
        (GuestPhysAddr(0), 32 * PAGE),
        (GuestPhysAddr(0x40_0000), 16 * PAGE),
    ]
}

fn pages(mem: &GuestMemory) -> Vec<GuestPhysAddr> {
    mem.regions()
        .iter()
        .flat_map(|r| (0..r.size() / PAGE).map(move |i| GuestPhysAddr(r.start().0 + i * PAGE)))
        .collect()
}

fn read_page(mem: &GuestMemory, gpa: GuestPhysAddr) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    mem.read(gpa, &mut p).unwrap();
    p
}

/// Every page's bytes.
fn image(mem: &GuestMemory) -> Vec<Vec<u8>> {
    pages(mem).into_iter().map(|g| read_page(mem, g)).collect()
}

fn restored(snap: &SnapshotReader) -> GuestMemory {
    let mem = GuestMemory::new(&snap.region_layout()).unwrap();
    restore_into(snap, &mem).unwrap();
    mem
}

/// Fills `mem` with zero, duplicate and random pages; returns the number
/// of distinct non-zero contents.
fn fill(mem: &GuestMemory, seed: u64) -> usize {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let patterns: Vec<Vec<u8>> = (0..4).map(|k| vec![0xa0 + k as u8; PAGE_SIZE]).collect();
    let mut distinct = std::collections::HashSet::new();
    for gpa in pages(mem) {
        let page = match rng.gen_range(0..4) {
            0 => continue, // zero
            1 => patterns[rng.gen_range(0..patterns.len())].clone(),
            2 => {
                let mut p = vec![0u8; PAGE_SIZE];
                p[rng.gen_range(0..PAGE_SIZE)] = rng.gen_range(1..=255);
                p
            }
            _ => (0..PAGE_SIZE).map(|_| rng.gen()).collect(),
        };
        mem.write(gpa, &page).unwrap();
        distinct.insert(page);
    }
    distinct.len()
}

#[test]
fn round_trip_zero_duplicate_and_random_pages() {
    let dir = TempDir::new("snap-rt");
    let mem = GuestMemory::new(&layout()).unwrap();
    let distinct = fill(&mem, 1);
    let path = dir.path("full.snap");
    let stats = save(&mem, &path, &SaveOptions::default()).unwrap();
    assert_eq!(stats.pages, 96);
    assert_eq!(stats.stored_pages as usize, distinct);
    assert_eq!(
        stats.zero_pages + stats.stored_pages + stats.duplicate_pages,
        96
    );
    // Only the snapshot is left in the directory: no temporary file.
    let names: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert_eq!(names.len(), 1);

    let snap = SnapshotReader::open(&path).unwrap();
    assert_eq!(snap.id(), stats.id);
    assert_eq!(snap.parent_id(), None);
    assert_eq!(snap.file_len(), stats.file_bytes);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), stats.file_bytes);
    let mut sorted = layout();
    sorted.sort();
    assert_eq!(snap.region_layout(), sorted);

    // Random access, page by page, in a scrambled order.
    let all = pages(&mem);
    let mut buf = [0u8; PAGE_SIZE];
    for k in 0..all.len() {
        let gpa = all[(k * 37) % all.len()];
        snap.read_page(gpa, &mut buf).unwrap();
        assert!(buf[..] == read_page(&mem, gpa)[..], "page {gpa}");
    }
    assert!(matches!(
        snap.read_page(GuestPhysAddr(0x20_0000), &mut buf),
        Err(SnapshotError::PageNotInLayout { .. })
    ));
    assert!(matches!(
        snap.read_page(GuestPhysAddr(0x10), &mut buf),
        Err(SnapshotError::PageNotInLayout { .. })
    ));

    let back = restored(&snap);
    assert!(image(&back) == image(&mem));
    // Zero pages are released in the restored memory, not written: it
    // holds memory for the non-zero pages only.
    let nonzero = image(&mem)
        .iter()
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64;
    let held = back.frame_store().allocated_bytes().unwrap();
    assert!(held <= nonzero * PAGE, "{held} bytes for {nonzero} pages");

    // Restoring into memory of another layout is refused.
    let other = GuestMemory::new(&[(GuestPhysAddr(0), 96 * PAGE)]).unwrap();
    assert!(matches!(
        restore_into(&snap, &other),
        Err(SnapshotError::LayoutMismatch { .. })
    ));
}

#[test]
fn restore_overwrites_whatever_the_memory_held() {
    let dir = TempDir::new("snap-over");
    let mem = GuestMemory::new(&layout()).unwrap();
    fill(&mem, 2);
    let path = dir.path("a.snap");
    save(&mem, &path, &SaveOptions::default()).unwrap();
    let dst = GuestMemory::new(&layout()).unwrap();
    fill(&dst, 3);
    restore_into(&SnapshotReader::open(&path).unwrap(), &dst).unwrap();
    assert!(image(&dst) == image(&mem));
}

#[test]
fn duplicate_pages_are_stored_once() {
    let dir = TempDir::new("snap-dup");
    let n = 200u64;
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 256 * PAGE)]).unwrap();
    for i in 0..n {
        mem.write(GuestPhysAddr(i * PAGE), &[0x5a; PAGE_SIZE])
            .unwrap();
    }
    let path = dir.path("dup.snap");
    let stats = save(&mem, &path, &SaveOptions::default()).unwrap();
    assert_eq!(stats.stored_pages, 1);
    assert_eq!(stats.duplicate_pages, n - 1);
    // Header page, one page of content, two map runs (the repeated content
    // and the zeros), one table entry.
    assert_eq!(stats.file_bytes, PAGE + PAGE + 2 * 16 + 32);
    let snap = SnapshotReader::open(&path).unwrap();
    assert_eq!(
        snap.source(GuestPhysAddr(7 * PAGE)).unwrap(),
        PageSource::Content(0)
    );
    assert_eq!(
        snap.source(GuestPhysAddr(n * PAGE)).unwrap(),
        PageSource::Zero
    );
    assert!(image(&restored(&snap)) == image(&mem));

    // Distinct contents in page order cost one map run however many.
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 64 * PAGE)]).unwrap();
    for i in 0..64u64 {
        mem.write(GuestPhysAddr(i * PAGE), &[i as u8 + 1; PAGE_SIZE])
            .unwrap();
    }
    let stats = save(&mem, dir.path("seq.snap"), &SaveOptions::default()).unwrap();
    assert_eq!(stats.file_bytes, PAGE + 64 * PAGE + 16 + 64 * 32);
}

#[test]
fn released_pages_are_saved_without_being_read() {
    let dir = TempDir::new("snap-rel");
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 512 * PAGE)]).unwrap();
    mem.fill(GuestPhysAddr(0), 0x33, 512 * PAGE_SIZE).unwrap();
    mem.discard(GuestPhysAddr(64 * PAGE), 256 * PAGE).unwrap();
    let before = mem.frame_store().allocated_bytes().unwrap();
    let path = dir.path("rel.snap");
    let stats = save(&mem, &path, &SaveOptions::default()).unwrap();
    assert_eq!(mem.frame_store().allocated_bytes().unwrap(), before);
    assert_eq!(stats.zero_pages, 256);
    assert_eq!(stats.stored_pages, 1);
    let back = restored(&SnapshotReader::open(&path).unwrap());
    assert!(image(&back) == image(&mem));
    assert_eq!(back.frame_store().allocated_bytes().unwrap(), 256 * PAGE);
}

/// Harvests the dirty log since the last snapshot.
fn harvest(mem: &GuestMemory) -> Vec<DirtyRun> {
    let mut runs = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    runs
}

#[test]
fn incremental_chain_of_three_restores_each_level() {
    let dir = TempDir::new("snap-chain");
    let mem = GuestMemory::new(&layout()).unwrap();
    fill(&mem, 4);
    let paths: Vec<PathBuf> = (0..3).map(|i| dir.path(&format!("s{i}.snap"))).collect();
    let mut images = Vec::new();

    let s0 = save(&mem, &paths[0], &SaveOptions::default()).unwrap();
    images.push(image(&mem));

    // Level 1: overwrite some pages, zero one, release a few, and give a
    // page content the base stores elsewhere.
    let all = pages(&mem);
    mem.write(all[3], &[0x77; PAGE_SIZE]).unwrap();
    mem.write(all[40], &[0; PAGE_SIZE]).unwrap();
    mem.discard(all[50], 4 * PAGE).unwrap();
    let donor = (0..all.len())
        .find(|&i| {
            let p = read_page(&mem, all[i]);
            p.iter().any(|&b| b != 0) && p.iter().any(|&b| b != p[0])
        })
        .unwrap();
    mem.write(all[90], &read_page(&mem, all[donor])).unwrap();
    let r0 = SnapshotReader::open(&paths[0]).unwrap();
    let s1 = save_incremental(&mem, &r0, &harvest(&mem), &paths[1]).unwrap();
    images.push(image(&mem));
    assert_eq!(s1.parent_pages, 96 - 7);
    assert_eq!(s1.ancestor_pages, 1, "{s1:?}");
    assert_eq!(s1.stored_pages, 1);

    // Level 2: more writes; a page written back to what level 1 stored.
    mem.write(all[3], &[0x78; PAGE_SIZE]).unwrap();
    mem.write(all[10], &[0x77; PAGE_SIZE]).unwrap();
    mem.write(all[95], b"the last page").unwrap();
    let r1 = SnapshotReader::open(&paths[1])
        .unwrap()
        .with_parent(r0)
        .unwrap();
    assert_eq!(r1.parent_id(), Some(s0.id));
    let s2 = save_incremental(&mem, &r1, &harvest(&mem), &paths[2]).unwrap();
    images.push(image(&mem));
    assert_eq!(s2.ancestor_pages, 1);
    assert_eq!(s2.stored_pages, 2);
    assert!(s2.file_bytes < 4 * PAGE);

    for level in 0..3 {
        let snap = SnapshotReader::open_chain(&paths[..=level]).unwrap();
        let back = restored(&snap);
        assert!(image(&back) == images[level], "level {level}");
        let mut buf = [0u8; PAGE_SIZE];
        for (k, gpa) in all.iter().enumerate() {
            snap.read_page(*gpa, &mut buf).unwrap();
            assert!(buf[..] == images[level][k][..], "level {level} page {gpa}");
        }
    }
    let _ = s2;

    // Wrong chains.
    let alone = SnapshotReader::open(&paths[2]).unwrap();
    let dst = GuestMemory::new(&layout()).unwrap();
    assert!(matches!(
        restore_into(&alone, &dst),
        Err(SnapshotError::ParentMissing { .. })
    ));
    assert!(matches!(
        SnapshotReader::open(&paths[2])
            .unwrap()
            .with_parent(SnapshotReader::open(&paths[0]).unwrap()),
        Err(SnapshotError::WrongParent { .. })
    ));
    assert!(matches!(
        SnapshotReader::open(&paths[0])
            .unwrap()
            .with_parent(SnapshotReader::open(&paths[0]).unwrap()),
        Err(SnapshotError::NotIncremental { .. })
    ));
    assert!(matches!(
        SnapshotReader::open_chain(&[&paths[0], &paths[2]]),
        Err(SnapshotError::WrongParent { .. })
    ));
}

#[test]
fn incremental_needs_tracking_and_matching_layout() {
    let dir = TempDir::new("snap-inc-err");
    let mem = GuestMemory::new(&layout()).unwrap();
    fill(&mem, 5);
    let base = dir.path("base.snap");
    save(&mem, &base, &SaveOptions { track_dirty: false }).unwrap();
    let parent = SnapshotReader::open(&base).unwrap();
    assert!(matches!(
        save_incremental(&mem, &parent, &[], dir.path("x.snap")),
        Err(SnapshotError::NotTracking { region: 0 })
    ));
    mem.set_dirty_tracking(RegionSet::All, true).unwrap();
    let run = DirtyRun {
        start: GuestPhysAddr(0x10_0000 + 40 * PAGE),
        pages: 9,
    };
    assert!(matches!(
        save_incremental(&mem, &parent, &[run], dir.path("x.snap")),
        Err(SnapshotError::DirtyRun { .. })
    ));
    // The failed save put its runs back... only those inside the memory:
    // this one was not, so the log stays empty.
    assert!(harvest(&mem).is_empty());
    let other = GuestMemory::new(&[(GuestPhysAddr(0), 96 * PAGE)]).unwrap();
    other.set_dirty_tracking(RegionSet::All, true).unwrap();
    assert!(matches!(
        save_incremental(&other, &parent, &[], dir.path("x.snap")),
        Err(SnapshotError::LayoutMismatch { .. })
    ));
    assert!(!dir.path("x.snap").exists());
    // Nothing dirty: everything as in the parent.
    let s = save_incremental(&mem, &parent, &[], dir.path("y.snap")).unwrap();
    assert_eq!(s.parent_pages, 96);
    let chain = SnapshotReader::open_chain(&[&base, &dir.path("y.snap")]).unwrap();
    assert!(image(&restored(&chain)) == image(&mem));
}

#[test]
fn a_save_replaces_a_file_whole() {
    let dir = TempDir::new("snap-replace");
    let path = dir.path("s.snap");
    let a = GuestMemory::new(&layout()).unwrap();
    fill(&a, 6);
    save(&a, &path, &SaveOptions::default()).unwrap();
    let b = GuestMemory::new(&layout()).unwrap();
    fill(&b, 7);
    save(&b, &path, &SaveOptions::default()).unwrap();
    assert!(image(&restored(&SnapshotReader::open(&path).unwrap())) == image(&b));
    // A save into a directory that does not exist fails cleanly.
    assert!(matches!(
        save(&a, dir.path("no/such/dir.snap"), &SaveOptions::default()),
        Err(SnapshotError::File { .. })
    ));
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
}

#[test]
fn a_save_does_not_take_a_migrations_dirty_log() {
    let dir = TempDir::new("snap-mig");
    let mem = GuestMemory::new(&layout()).unwrap();
    fill(&mem, 8);
    let sender = pagefold::migration::Sender::start(
        &mem,
        std::io::sink(),
        pagefold::migration::PrecopyOptions::default(),
    )
    .unwrap();
    mem.write(GuestPhysAddr(0), b"dirty").unwrap();
    assert!(matches!(
        save(&mem, dir.path("a.snap"), &SaveOptions::default()),
        Err(SnapshotError::LogInUse)
    ));
    // The page stays logged for the sender.
    assert!(mem.is_dirty(GuestPhysAddr(0)));
    // Without touching the log, a save goes ahead.
    save(
        &mem,
        dir.path("b.snap"),
        &SaveOptions { track_dirty: false },
    )
    .unwrap();
    drop(sender);
    save(&mem, dir.path("c.snap"), &SaveOptions::default()).unwrap();
}

/// A private anonymous mapping of `len` bytes, unmapped on drop.
struct AnonMap(*mut libc::c_void, usize);

impl AnonMap {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        AnonMap(p, len)
    }

    /// Guest memory of `layout()` over this mapping, regions packed.
    fn memory(&self) -> GuestMemory {
        let mut at = self.0 as u64;
        let regions: Vec<_> = layout()
            .into_iter()
            .map(|(start, size)| {
                let r = pagefold::memory::AnonymousRegion {
                    guest_start: start,
                    size,
                    host_addr: pagefold::HostVirtAddr(at),
                };
                at += size;
                r
            })
            .collect();
        assert!(at - self.0 as u64 <= self.1 as u64);
        // SAFETY: 1. the ranges lie inside this live, readable and writable
        // anonymous mapping; 2. they do not overlap; 3. the mapping outlives
        // the memory (each test drops the memory before the map).
        unsafe { GuestMemory::adopt_anonymous(&regions) }.unwrap()
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no memory over it is alive any more.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

#[test]
fn anonymous_memory_saves_and_restores() {
    // Memory with no file to punch: a restore writes zeros over non-zero
    // pages instead of releasing them.
    let dir = TempDir::new("snap-anon");
    let (a, b) = (AnonMap::new(96 * PAGE_SIZE), AnonMap::new(96 * PAGE_SIZE));
    {
        let src = a.memory();
        fill(&src, 9);
        let path = dir.path("anon.snap");
        save(&src, &path, &SaveOptions::default()).unwrap();
        let dst = b.memory();
        fill(&dst, 10);
        let snap = SnapshotReader::open(&path).unwrap();
        restore_into(&snap, &dst).unwrap();
        assert!(image(&dst) == image(&src));
    }
}

fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

/// A page's content: zero, one of a few patterns, or random bytes.
fn content() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![0u8; PAGE_SIZE]),
        (1u8..4).prop_map(|b| vec![b; PAGE_SIZE]),
        any::<u64>().prop_map(|s| {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(s);
            (0..PAGE_SIZE).map(|_| rng.gen()).collect()
        }),
    ]
}

fn check_chain(dir: &Path, writes: &[Vec<(u16, Vec<u8>)>], sizes: &[(u8, u8)]) {
    let mut at = 0u64;
    let regions: Vec<(GuestPhysAddr, u64)> = sizes
        .iter()
        .map(|&(gap, n)| {
            let start = at + u64::from(gap) * PAGE;
            let size = u64::from(n) * PAGE;
            at = start + size;
            (GuestPhysAddr(start), size)
        })
        .collect();
    let mem = GuestMemory::new(&regions).unwrap();
    let all = pages(&mem);
    let mut paths = Vec::new();
    let mut images = Vec::new();
    for (level, round) in writes.iter().enumerate() {
        for (p, bytes) in round {
            mem.write(all[usize::from(*p) % all.len()], bytes).unwrap();
        }
        let path = dir.join(format!("{level}.snap"));
        if level == 0 {
            save(&mem, &path, &SaveOptions::default()).unwrap();
        } else {
            let parent = SnapshotReader::open_chain(&paths).unwrap();
            save_incremental(&mem, &parent, &harvest(&mem), &path).unwrap();
        }
        paths.push(path);
        images.push(image(&mem));
    }
    for level in 0..paths.len() {
        let snap = SnapshotReader::open_chain(&paths[..=level]).unwrap();
        assert!(image(&restored(&snap)) == images[level], "level {level}");
    }
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn random_contents_round_trip(
        sizes in prop::collection::vec((0u8..3, 1u8..6), 1..4),
        writes in prop::collection::vec(
            prop::collection::vec((any::<u16>(), content()), 0..12), 1..4),
    ) {
        let dir = TempDir::new("snap-prop");
        check_chain(&dir.0, &writes, &sizes);
    }
}
