//! Small guests for dedup tests: a VM of `pages` pages on a store, each
//! page filled by `fill` and numbered in its first 8 bytes (so pages are
//! distinct unless `fill` and the number say otherwise).

use std::sync::Arc;

use pagefold::{FrameStore, GuestMemory, GuestPhysAddr, PAGE_SIZE};

#[allow(clippy::unwrap_used)]
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
