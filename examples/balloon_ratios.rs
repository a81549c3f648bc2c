//! Inflating 1 GiB of written guest memory through the balloon, in 4 KiB
//! PFNs (virtio requests of 256 little-endian 32-bit PFNs, as the inflate
//! queue carries them) and in ranges (one 1 GiB range): seconds, GiB/s
//! released, and the share of the ballooned memory the kernel shows as freed
//! (the memfd's allocated bytes before and after). Targets: at least 99%
//! freed; at least 10 GiB/s for contiguous ranges.
//!
//! `cargo run --release --example balloon_ratios [GIB]`
//! (`benches/balloon_ratios.sh` runs it.)

use std::{sync::Arc, time::Instant};

use pagefold::{Balloon, GuestMemory, GuestPhysAddr};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let size = gib << 30;
    for mode in ["4 KiB PFNs (le32, 256 per request)", "ranges"] {
        let mem = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), size)])?);
        // Touch every page (non-zero) so the kernel holds all of it.
        mem.fill(GuestPhysAddr(0), 0xa5, usize::try_from(size)?)?;
        let store = Arc::clone(mem.frame_store());
        let before = store.allocated_bytes()?;
        let balloon = Balloon::new(Arc::clone(&mem));
        let pages = size / 4096;
        let mut released = 0u64;
        let t = Instant::now();
        if mode == "ranges" {
            let r = balloon.inflate_range(GuestPhysAddr(0), size)?;
            released += r.released_pages;
        } else {
            let mut buf = Vec::with_capacity(256 * 4);
            let mut pfn = 0u64;
            while pfn < pages {
                buf.clear();
                for p in pfn..(pfn + 256).min(pages) {
                    buf.extend_from_slice(&u32::try_from(p)?.to_le_bytes());
                }
                let r = balloon.inflate_pfns_le32(&buf);
                if !r.errors.is_empty() {
                    return Err(format!("{:?}", r.errors).into());
                }
                released += r.released_pages;
                pfn += 256;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let after = store.allocated_bytes()?;
        let ballooned = released * 4096;
        let freed = before.saturating_sub(after);
        println!(
            "{mode:>36}: {gib} GiB in {secs:.4} s = {:.1} GiB/s released; kernel freed {:.2}% of ballooned ({} of {} bytes); actual {} pages",
            ballooned as f64 / (1u64 << 30) as f64 / secs,
            100.0 * freed as f64 / ballooned.max(1) as f64,
            freed,
            ballooned,
            balloon.actual()
        );
    }
    Ok(())
}
