//! What the default mapping budget (`vm.max_map_count` as the machine has
//! it, 4,096 kept for the rest of the process) buys on two workloads whose
//! merges need more mappings than that: 1 GiB where every 10th page repeats
//! another page far away, and four 1 GiB clones with a page of their own
//! every 20 pages. Prints, per workload, the saving (KSM's `pages_sharing`
//! plus zero pages, and the memfd's allocated bytes before and after, the
//! kernel's figure), the shared frames made, and the pages left unmerged
//! for lack of mappings.
//!
//! `cargo run --release --example dedup_budget [GIB]`
//! (`benches/dedup_budget.sh` runs it.)

use std::{sync::Arc, time::Instant};

use pagefold::{DedupHost, FrameStore, GuestMemory, GuestPhysAddr, VmOptions, PAGE_SIZE};

/// Page `i`'s bytes: `fill` with the page number in its first 8 bytes.
fn page(i: u64, fill: u8) -> [u8; PAGE_SIZE] {
    let mut p = [fill; PAGE_SIZE];
    p[0..8].copy_from_slice(&(i + 1).to_le_bytes());
    p
}

fn vm(
    store: &Arc<FrameStore>,
    pages: u64,
    content: impl Fn(u64) -> [u8; PAGE_SIZE],
) -> Result<Arc<GuestMemory>, Box<dyn std::error::Error>> {
    let mem = GuestMemory::with_store(Arc::clone(store), &[(GuestPhysAddr(0), pages << 12)])?;
    for i in 0..pages {
        mem.write(GuestPhysAddr(i << 12), &content(i))?;
    }
    Ok(Arc::new(mem))
}

fn run(
    name: &str,
    vms: &[Arc<GuestMemory>],
    store: &Arc<FrameStore>,
) -> Result<(), Box<dyn std::error::Error>> {
    let host = DedupHost::new(Arc::clone(store))?;
    for m in vms {
        host.register(Arc::clone(m), VmOptions::default())?;
    }
    let before = store.allocated_bytes()?;
    let t = Instant::now();
    host.merge_now()?;
    let secs = t.elapsed().as_secs_f64();
    let s = host.stats()?;
    let after = store.allocated_bytes()?;
    let saved = (s.pages_sharing + s.zero_pages) * PAGE_SIZE as u64;
    println!(
        "{name}: saved {:.1} MiB (kernel: {:.1} MiB freed), pages_shared {} pages_sharing {} \
         zero {} left for lack of mappings {} merge {secs:.2} s",
        saved as f64 / (1 << 20) as f64,
        before.saturating_sub(after) as f64 / (1 << 20) as f64,
        s.pages_shared,
        s.pages_sharing,
        s.zero_pages,
        s.map_limit_hits,
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let n = gib << 18; // pages per VM
    println!(
        "vm.max_map_count {}",
        std::fs::read_to_string("/proc/sys/vm/max_map_count")?.trim()
    );
    {
        // Every 10th page repeats the page half the VM away (plus 5), which
        // is itself no repeat: isolated pairs, four mappings each.
        let store = Arc::new(FrameStore::memfd()?);
        let mem = vm(&store, n, |i| {
            let src = if i % 10 == 0 { (i + n / 2 + 5) % n } else { i };
            page(src, (src % 251) as u8 + 1)
        })?;
        run(
            &format!("{gib} GiB, every 10th page a scattered repeat"),
            &[mem],
            &store,
        )?;
    }
    {
        let store = Arc::new(FrameStore::memfd()?);
        let vms = (0..4u8)
            .map(|v| {
                vm(&store, n, |i| {
                    if i % 20 == 19 {
                        page(i, 0x80 + v) // this clone's own page
                    } else {
                        page(i, (i % 200) as u8 + 1)
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        run(
            &format!("four {gib} GiB clones, a page of their own every 20"),
            &vms,
            &store,
        )?;
    }
    Ok(())
}
