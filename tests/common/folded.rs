//! Fixtures of the folded-restore tests: a small guest with zero pages, a
//! repeated content, scattered duplicates and pages of its own, its
//! snapshot, and dedup hosts with a chosen mapping budget.

use std::{collections::HashSet, sync::Arc};

use pagefold::{
    dedup::DedupOptions,
    snapshot::{save, FoldLayout, FoldOptions, SaveOptions, SnapshotReader},
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use rand::{Rng, SeedableRng};

use super::temp_dir::TempDir;

const PAGE: u64 = PAGE_SIZE as u64;

/// Two regions with a hole between them.
pub(crate) fn layout() -> Vec<(GuestPhysAddr, u64)> {
    vec![
        (GuestPhysAddr(0), 64 * PAGE),
        (GuestPhysAddr(0x10_0000), 32 * PAGE),
    ]
}

/// Every page's address, in order.
pub(crate) fn pages(mem: &GuestMemory) -> Vec<GuestPhysAddr> {
    mem.regions()
        .iter()
        .flat_map(|r| (0..r.size() / PAGE).map(move |i| GuestPhysAddr(r.start().0 + i * PAGE)))
        .collect()
}

/// Every page's bytes, in order.
pub(crate) fn image(mem: &GuestMemory) -> Vec<Vec<u8>> {
    pages(mem)
        .into_iter()
        .map(|g| {
            let mut p = vec![0u8; PAGE_SIZE];
            mem.read(g, &mut p).unwrap();
            p
        })
        .collect()
}

/// A page of `seed`'s bytes.
pub(crate) fn filled(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..PAGE_SIZE).map(|_| rng.gen()).collect()
}

/// A memory of `layout()` with zero pages, a run of one repeated content,
/// scattered duplicates and pages of their own (`salt` picks those), and
/// its number of distinct non-zero contents.
pub(crate) fn source(salt: u64) -> (GuestMemory, usize) {
    let mem = GuestMemory::new(&layout()).unwrap();
    let mut distinct = HashSet::new();
    for (i, gpa) in pages(&mem).into_iter().enumerate() {
        let bytes = match i % 8 {
            0 | 1 => continue,                        // zero
            2 if i < 48 => filled(7),                 // one content, repeated
            3 => filled(100 + (i as u64 % 5)),        // five contents, scattered
            _ => filled(salt * 1_000_000 + i as u64), // its own
        };
        distinct.insert(bytes.clone());
        mem.write(gpa, &bytes).unwrap();
    }
    (mem, distinct.len())
}

/// `mem` saved (no dirty tracking) as `name` in `dir`, opened.
pub(crate) fn saved(dir: &TempDir, name: &str, mem: &GuestMemory) -> SnapshotReader {
    let path = dir.path(name);
    save(mem, &path, &SaveOptions { track_dirty: false }).unwrap();
    SnapshotReader::open(&path).unwrap()
}

/// A dedup host on a store of its own.
pub(crate) fn host() -> (Arc<FrameStore>, DedupHost) {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    (store, host)
}

/// A host whose mapping budget leaves about `mappings` for remaps (other
/// tests' threads come and go).
pub(crate) fn host_with_mappings(mappings: u64) -> (Arc<FrameStore>, DedupHost) {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let now = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count() as u64;
    let host = DedupHost::with_options(
        Arc::clone(&store),
        DedupOptions {
            map_headroom: max.saturating_sub(now + mappings),
        },
    )
    .unwrap();
    (store, host)
}

/// Options laying the frames out as `layout` says.
pub(crate) fn laid(layout: FoldLayout) -> FoldOptions {
    FoldOptions {
        layout,
        ..FoldOptions::default()
    }
}

/// Options planning `n` clones.
pub(crate) fn planned(n: u64) -> FoldOptions {
    FoldOptions {
        planned_clones: Some(n),
        ..FoldOptions::default()
    }
}

/// Pages of `img` that are not all zeros.
pub(crate) fn nonzero(img: &[Vec<u8>]) -> usize {
    img.iter().filter(|p| p.iter().any(|&b| b != 0)).count()
}
