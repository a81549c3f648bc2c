//! Small guests for dedup tests: a VM of `pages` pages on a store, each
//! page filled by `fill` and numbered in its first 8 bytes (so pages are
//! distinct unless `fill` and the number say otherwise).

use std::sync::Arc;

use pagefold::{FrameStore, GuestMemory, GuestPhysAddr, PAGE_SIZE};

#[allow(clippy::unwrap_used, dead_code)]
pub(crate) fn vm(
    store: &Arc<FrameStore>,
    pages: usize,
    fill: impl Fn(usize) -> u8,
) -> Arc<GuestMemory> {
    let mem = GuestMemory::with_store(
        Arc::clone(store),
        &[(GuestPhysAddr(0), (pages * PAGE_SIZE) as u64)],
    )
    .unwrap();
    for i in 0..pages {
        let mut p = [fill(i); PAGE_SIZE];
        p[0..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        mem.write(GuestPhysAddr((i * PAGE_SIZE) as u64), &p)
            .unwrap();
    }
    Arc::new(mem)
}

/// The address of page `i`.
pub(crate) fn gpa(i: usize) -> GuestPhysAddr {
    GuestPhysAddr((i * PAGE_SIZE) as u64)
}

/// A page of `0x5a` bytes tagged `tag` in its first 8.
#[allow(dead_code)]
pub(crate) fn tagged(tag: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0x5au8; PAGE_SIZE];
    p[0..8].copy_from_slice(&tag.to_le_bytes());
    p
}

/// An empty VM of `pages` pages on `store`.
#[allow(clippy::unwrap_used, dead_code)]
pub(crate) fn blank(store: &Arc<FrameStore>, pages: usize) -> Arc<GuestMemory> {
    Arc::new(
        GuestMemory::with_store(
            Arc::clone(store),
            &[(GuestPhysAddr(0), (pages * PAGE_SIZE) as u64)],
        )
        .unwrap(),
    )
}

/// Writes the page tagged `tag` at page `i`.
#[allow(clippy::unwrap_used, dead_code)]
pub(crate) fn put(m: &GuestMemory, i: usize, tag: u64) {
    m.write(gpa(i), &tagged(tag)).unwrap();
}
