//! Time to a runnable guest: a lazy restore of a 1 GiB memory snapshot
//! against restore by copy (`restore_into`), in one run. For each: the
//! time from the restore call to its return (the guest could start), to
//! the first 1,000 and 10,000 random page touches done (raw host pointer
//! reads, one thread, as a vCPU would), and to every page present. The
//! lazy restore runs twice: the first records its touched pages as a
//! working set, the second fetches them first.
//!
//! The memory is a mix: half zero pages, a quarter copies of 64 contents,
//! a quarter random. The snapshot file is read warm from the page cache
//! (it was just written). Files go to the directory given as the first
//! argument (default: the system's temporary directory) and are removed.
//!
//! `cargo run --release --example snapshot_lazy [DIR]`

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use pagefold::{
    snapshot::{restore_into, restore_lazy, save, LazyOptions, SaveOptions, SnapshotReader},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use rand::{seq::SliceRandom, Rng, SeedableRng};

const SIZE: u64 = 1 << 30;
const PAGES: u64 = SIZE / PAGE_SIZE as u64;

fn fill(mem: &GuestMemory) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut page = vec![0u8; PAGE_SIZE];
    for i in 0..PAGES {
        match i % 4 {
            0 | 1 => continue,
            2 => page.fill(u8::try_from(i % 64).unwrap_or(0) + 1),
            _ => rng.fill(&mut page[..]),
        }
        mem.write(GuestPhysAddr(i * PAGE_SIZE as u64), &page)?;
    }
    Ok(())
}

/// Reads one byte of each page in `order` through the host mapping; the
/// elapsed time since `t0` after the first 1,000 and after all.
fn touch(
    mem: &GuestMemory,
    order: &[GuestPhysAddr],
    t0: Instant,
) -> Result<(Duration, Duration), Box<dyn std::error::Error>> {
    let mut at_1k = Duration::ZERO;
    let mut sum = 0u64;
    for (k, &gpa) in order.iter().enumerate() {
        let hva = mem.host_address(gpa)?.0 as *const u8;
        // SAFETY: `hva` is a page's host address in the live mapping of
        // `mem`, which outlives this loop.
        sum = sum.wrapping_add(u64::from(unsafe { std::ptr::read_volatile(hva) }));
        if k + 1 == 1000 {
            at_1k = t0.elapsed();
        }
    }
    std::hint::black_box(sum);
    Ok((at_1k, t0.elapsed()))
}

fn ms(d: Duration) -> String {
    format!("{:9.3} ms", d.as_secs_f64() * 1e3)
}

fn check(orig: &GuestMemory, mem: &GuestMemory) -> Result<(), Box<dyn std::error::Error>> {
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for i in (0..PAGES).step_by(61) {
        let gpa = GuestPhysAddr(i * PAGE_SIZE as u64);
        orig.read(gpa, &mut a)?;
        mem.read(gpa, &mut b)?;
        if a != b {
            return Err(format!("page {gpa} differs after restore").into());
        }
    }
    Ok(())
}

fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let layout = [(GuestPhysAddr(0), SIZE)];
    let orig = GuestMemory::new(&layout)?;
    fill(&orig)?;
    let path = dir.join(format!("pagefold-lazy-{}.snap", std::process::id()));
    let ws: PathBuf = path.with_extension("ws");
    save(&orig, &path, &SaveOptions::default())?;
    let snap = Arc::new(SnapshotReader::open(&path)?);
    let mut order: Vec<GuestPhysAddr> = (0..PAGES)
        .map(|i| GuestPhysAddr(i * PAGE_SIZE as u64))
        .collect();
    order.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(2));
    order.truncate(10_000);

    println!(
        "1 GiB memory ({PAGES} pages: half zero, a quarter 64 repeated contents, a quarter random)"
    );
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>12}",
        "restore", "returned", "1k touches", "10k touches", "all present"
    );

    // By copy.
    let mem = GuestMemory::new(&layout)?;
    let t0 = Instant::now();
    restore_into(&snap, &mem)?;
    let ret = t0.elapsed();
    let (t1k, t10k) = touch(&mem, &order, t0)?;
    println!(
        "{:<28} {} {} {} {}",
        "by copy (restore_into)",
        ms(ret),
        ms(t1k),
        ms(t10k),
        ms(ret)
    );
    check(&orig, &mem)?;
    drop(mem);

    let _ = std::fs::remove_file(&ws);
    for (name, record) in [
        ("lazy, no working set", 10_000),
        ("lazy, working set first", 0),
    ] {
        let mem = GuestMemory::new(&layout)?;
        let t0 = Instant::now();
        let lazy = restore_lazy(
            Arc::clone(&snap),
            &mem,
            LazyOptions {
                working_set: Some(ws.clone()),
                record_pages: record,
                on_fetch: None,
                ..LazyOptions::default()
            },
        )?;
        let ret = t0.elapsed();
        let (t1k, t10k) = touch(&mem, &order, t0)?;
        let stats = lazy.wait()?;
        let all = t0.elapsed();
        println!(
            "{:<28} {} {} {} {}",
            name,
            ms(ret),
            ms(t1k),
            ms(t10k),
            ms(all)
        );
        println!(
            "{:<28} on fault {}, fetched {} ({} from the working set), zero left to the kernel {}",
            "", stats.on_fault, stats.fetched, stats.working_set, stats.zero_untouched
        );
        check(&orig, &mem)?;
    }
    let _ = std::fs::remove_file(&ws);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(std::env::temp_dir, PathBuf::from);
    run(&dir)
}
