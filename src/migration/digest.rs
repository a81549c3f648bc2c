//! A digest of all of a guest's memory, for the optional end-to-end check
//! in the end marker.

use xxhash_rust::xxh3::Xxh3;

use crate::{
    addr::{usize_from, GuestPhysAddr, PAGE_SHIFT, PAGE_SIZE},
    memory::{AccessError, GuestMemory, GuestRegion, ReleasedData},
};

/// Bytes hashed per step.
const CHUNK: usize = 64 << 10;

/// 128-bit xxh3, keyed by `seed`, over each region's start, size and bytes
/// in address order.
///
/// Pages that are holes in the frame store (never written, or released)
/// and whose state says the page maps its own frame are hashed as the
/// zeros they read as, without reading them: reading a hole through the
/// shared mapping would make the kernel allocate it, and a receiver (or a
/// sender at `finish`) would end up holding memory for every page of the
/// guest.
pub fn memory_digest(mem: &GuestMemory, seed: u64) -> Result<u128, AccessError> {
    let mut h = Xxh3::with_seed(seed);
    let mut holes = ReleasedData::new(mem);
    let mut buf = vec![0u8; CHUNK];
    let zeros = [0u8; CHUNK];
    for r in mem.regions() {
        h.update(&r.start().0.to_le_bytes());
        h.update(&r.size().to_le_bytes());
        let mut off = 0u64;
        while off < r.size() {
            let n = (r.size() - off).min(CHUNK as u64);
            #[allow(clippy::cast_possible_truncation)] // <= CHUNK
            let len = n as usize;
            let part = &mut buf[..len];
            let first = usize_from(off >> PAGE_SHIFT); // a page index of the region
            let pages = len.div_ceil(PAGE_SIZE);
            // Which pages hold memory; without an answer, read them all. A
            // page `mincore` calls empty may be swapped out: asked again
            // (`ReleasedData`, one `SEEK_DATA` per hole).
            let resident = r.resident(first, pages);
            let states = r.page_states();
            let hole: Vec<bool> = (0..pages)
                .map(|k| {
                    let p = first + k;
                    resident
                        .as_ref()
                        .is_some_and(|v| !crate::host::residency::is_resident(v[k]))
                        && own_frames(r, p as u64, 1)
                        && !holes.swapped_data(r, p, states.load(p))
                })
                .collect();
            if hole.iter().all(|&z| z) {
                h.update(&zeros[..len]);
            } else {
                // Page by page: read what holds memory (or maps another
                // frame), zero-fill the holes.
                for (k, page) in part.chunks_mut(PAGE_SIZE).enumerate() {
                    if !hole[k] {
                        mem.read(
                            GuestPhysAddr(r.start().0 + off + (k * PAGE_SIZE) as u64),
                            page,
                        )?;
                    } else {
                        page.fill(0);
                    }
                }
                h.update(part);
            }
            off += n;
        }
    }
    Ok(h.digest128())
}

/// Whether pages `[first, first + count)` of `r` each map their own frame
/// (so a hole in the frame means the page reads zeros): any kind, not
/// remapped, not held by an operation. (Released and ballooned pages map
/// their own frame too: reading their holes through the mapping would
/// allocate them; a review found the digest giving a balloon's pages their
/// memory back.)
fn own_frames(r: &GuestRegion, first: u64, count: u64) -> bool {
    if !r.needs_state_checks() {
        return true;
    }
    let states = r.page_states();
    (first..first + count).all(|p| {
        usize::try_from(p).is_ok_and(|p| {
            let s = states.load(p);
            !s.is_remapped() && !s.is_locked()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest is the same whether holes are read or skipped, and
    /// computing it allocates nothing.
    #[test]
    fn holes_hash_as_zeros_without_allocating() {
        let mem = GuestMemory::new(&[
            (GuestPhysAddr(0), 8 << 20),
            (GuestPhysAddr(16 << 20), 4 << 20),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        mem.write(GuestPhysAddr(0x3000), b"data")
            .unwrap_or_else(|e| panic!("{e}"));
        mem.write(GuestPhysAddr((16 << 20) + 0x12_3456), &[7; 9000])
            .unwrap_or_else(|e| panic!("{e}"));
        let before = mem.frame_store().allocated_bytes().unwrap_or(0);
        let fast = memory_digest(&mem, 5).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mem.frame_store().allocated_bytes().unwrap_or(0), before);

        // The reference: read every byte.
        let mut h = Xxh3::with_seed(5);
        for r in mem.regions() {
            h.update(&r.start().0.to_le_bytes());
            h.update(&r.size().to_le_bytes());
            let mut all = vec![0u8; usize::try_from(r.size()).unwrap_or(0)];
            mem.read(r.start(), &mut all)
                .unwrap_or_else(|e| panic!("{e}"));
            h.update(&all);
        }
        assert_eq!(fast, h.digest128());
    }
}
