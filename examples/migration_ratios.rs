//! Bytes on the wire of a pre-copy migration (one round, guest idle)
//! against the distinct non-zero content and against a zero-page-only
//! stream (what QEMU sends by default: every non-zero page whole, 4096
//! bytes plus a 9-byte page header here).
//!
//! Cases: four clones of one booted guest image (the same image four
//! times), the four booted images, and 1 GiB of random pages with 10%
//! duplicates. Images: `target/guest-images/ram-{0..3}.img` (skipped with a
//! note when missing; pass another directory as the first argument).
//!
//! `cargo run --release --example migration_ratios [IMAGE_DIR]`
//! (`benches/migration_ratios.sh` runs it.)

use std::{
    collections::HashSet,
    io::{self, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use pagefold::{
    migration::{PrecopyOptions, Sender},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// A per-page header of a zero-page-only stream (kind + address).
const PAGE_HEADER: u64 = 9;

/// Counts bytes, keeps none.
struct Count(u64);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// (non-zero pages, distinct non-zero contents).
fn census(mem: &GuestMemory) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let mut seen = HashSet::new();
    let mut nonzero = 0u64;
    let mut page = [0u8; PAGE_SIZE];
    for r in mem.regions() {
        for i in 0..r.size() / PAGE_SIZE as u64 {
            mem.read(GuestPhysAddr(r.start().0 + i * PAGE_SIZE as u64), &mut page)?;
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            nonzero += 1;
            seen.insert(xxhash_rust::xxh3::xxh3_128(&page));
        }
    }
    Ok((nonzero, seen.len() as u64))
}

fn measure(name: &str, mem: &GuestMemory) -> Result<(), Box<dyn std::error::Error>> {
    let (nonzero, distinct) = census(mem)?;
    let t = Instant::now();
    let m = Sender::start(mem, Count(0), PrecopyOptions::default())?;
    let (out, s) = m.finish()?;
    let secs = t.elapsed().as_secs_f64();
    let distinct_bytes = distinct * PAGE_SIZE as u64;
    let zero_only = nonzero * (PAGE_SIZE as u64 + PAGE_HEADER);
    println!(
        "{name}: {} MiB guest, {nonzero} non-zero pages, {distinct} distinct\n  \
         wire {} bytes = {:.4} x distinct non-zero content ({} bytes), target <= 1.01\n  \
         zero-page-only stream {} bytes: pagefold sends {:.4} x that ({:.2}x fewer bytes)\n  \
         records: {} full, {} ref (in REF_RUNs), {} zero; {:.2} s ({:.0} MiB/s of guest)",
        mem.total_size() >> 20,
        out.0,
        out.0 as f64 / distinct_bytes.max(1) as f64,
        distinct_bytes,
        zero_only,
        out.0 as f64 / zero_only.max(1) as f64,
        zero_only as f64 / out.0.max(1) as f64,
        s.stream.full_pages,
        s.stream.ref_pages,
        s.stream.zero_pages,
        secs,
        (mem.total_size() >> 20) as f64 / secs,
    );
    Ok(())
}

fn load(images: &[PathBuf]) -> Result<GuestMemory, Box<dyn std::error::Error>> {
    let mut layout = Vec::new();
    let mut datas = Vec::new();
    for (i, p) in images.iter().enumerate() {
        let data = std::fs::read(p)?;
        let size = (data.len() as u64).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        layout.push((GuestPhysAddr((i as u64) << 32), size));
        datas.push(data);
    }
    let mem = GuestMemory::new(&layout)?;
    for (&(start, _), data) in layout.iter().zip(&datas) {
        mem.write(start, data)?;
    }
    Ok(mem)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("target/guest-images"), PathBuf::from);
    let img = |i: usize| dir.join(format!("ram-{i}.img"));
    if Path::new(&img(0)).exists() {
        let mem = load(&[img(0), img(0), img(0), img(0)])?;
        measure("four clones of ram-0.img", &mem)?;
        drop(mem);
        if (0..4).all(|i| img(i).exists()) {
            let mem = load(&[img(0), img(1), img(2), img(3)])?;
            measure("the four booted images ram-{0..3}.img", &mem)?;
        }
    } else {
        println!("{} missing: image cases skipped", img(0).display());
    }

    // 1 GiB, random pages, 10% of them copies of other pages.
    let pages = (1u64 << 30) / PAGE_SIZE as u64;
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 1 << 30)])?;
    let mut rng = SmallRng::seed_from_u64(42);
    let mut page = [0u8; PAGE_SIZE];
    for p in 0..pages {
        let gpa = GuestPhysAddr(p * PAGE_SIZE as u64);
        if p > 0 && rng.gen_ratio(1, 10) {
            let from = rng.gen_range(0..p);
            mem.read(GuestPhysAddr(from * PAGE_SIZE as u64), &mut page)?;
        } else {
            rng.fill(&mut page[..]);
        }
        mem.write(gpa, &page)?;
    }
    measure("1 GiB random, 10% duplicates", &mem)?;
    Ok(())
}
