//! A digest of all of a guest's memory, for the optional end-to-end check
//! in the end marker.

use xxhash_rust::xxh3::Xxh3;

use crate::{
    addr::GuestPhysAddr,
    memory::{AccessError, GuestMemory},
};

/// 128-bit xxh3, keyed by `seed`, over each region's start, size and bytes
/// in address order.
pub fn memory_digest(mem: &GuestMemory, seed: u64) -> Result<u128, AccessError> {
    let mut h = Xxh3::with_seed(seed);
    let mut buf = vec![0u8; 64 << 10];
    for r in mem.regions() {
        h.update(&r.start().0.to_le_bytes());
        h.update(&r.size().to_le_bytes());
        let mut off = 0u64;
        while off < r.size() {
            let n = (r.size() - off).min(buf.len() as u64);
            #[allow(clippy::cast_possible_truncation)] // <= buf.len()
            let part = &mut buf[..n as usize];
            mem.read(GuestPhysAddr(r.start().0 + off), part)?;
            h.update(part);
            off += n;
        }
    }
    Ok(h.digest128())
}
