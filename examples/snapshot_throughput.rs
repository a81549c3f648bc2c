//! Save and restore throughput of a snapshot of a 256 MiB guest against a
//! plain copy of its memory into a file (`std::fs::write` of the bytes,
//! then `fsync`, as a save syncs) and back (`std::fs::read`, then one
//! write into guest memory), measured once each, in one run.
//!
//! Two memories: every page random (nothing to fold: the worst case for
//! hashing), and a mix (half zero, a quarter copies of 64 contents, a
//! quarter random). Files go to the directory given as the first argument
//! (default: the system's temporary directory) and are removed.
//!
//! `cargo run --release --example snapshot_throughput [DIR]`

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

use pagefold::{
    snapshot::{restore_into, save, SaveOptions, SnapshotReader},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 256 << 20;
const SIZE_BYTES: usize = 256 << 20;

fn fill(mem: &GuestMemory, mixed: bool) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut page = vec![0u8; PAGE_SIZE];
    for i in 0..SIZE / PAGE_SIZE as u64 {
        let kind = if mixed { i % 4 } else { 3 };
        match kind {
            0 | 1 => continue,
            2 => page.fill(u8::try_from(i % 64).unwrap_or(0) + 1),
            _ => rng.fill(&mut page[..]),
        }
        mem.write(GuestPhysAddr(i * PAGE_SIZE as u64), &page)?;
    }
    Ok(())
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn run(dir: &Path, mixed: bool) -> Result<(), Box<dyn std::error::Error>> {
    let layout = [(GuestPhysAddr(0), SIZE)];
    let mem = GuestMemory::new(&layout)?;
    fill(&mem, mixed)?;
    let snap_path = dir.join(format!("pagefold-throughput-{}.snap", std::process::id()));
    let raw_path = dir.join(format!("pagefold-throughput-{}.raw", std::process::id()));

    let t = Instant::now();
    let stats = save(&mem, &snap_path, &SaveOptions::default())?;
    let save_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut bytes = vec![0u8; SIZE_BYTES];
    mem.read(GuestPhysAddr(0), &mut bytes)?;
    std::fs::write(&raw_path, &bytes)?;
    File::open(&raw_path)?.sync_all()?;
    let raw_save_s = t.elapsed().as_secs_f64();
    drop(bytes);

    let dst = GuestMemory::new(&layout)?;
    let t = Instant::now();
    let snap = SnapshotReader::open(&snap_path)?;
    restore_into(&snap, &dst)?;
    let restore_s = t.elapsed().as_secs_f64();

    let dst2 = GuestMemory::new(&layout)?;
    let t = Instant::now();
    let bytes = std::fs::read(&raw_path)?;
    dst2.write(GuestPhysAddr(0), &bytes)?;
    let raw_restore_s = t.elapsed().as_secs_f64();

    let name = if mixed {
        "mixed (1/2 zero, 1/4 of 64 contents, 1/4 random)"
    } else {
        "random pages"
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{name}: snapshot file {} MiB ({} pages stored)",
        stats.file_bytes >> 20,
        stats.stored_pages
    )?;
    writeln!(
        out,
        "  save     {:7.1} ms ({:5.2} GB/s of guest memory)   fs::write+fsync {:7.1} ms ({:5.2} GB/s)   ratio {:.2}",
        save_s * 1e3,
        gbps(SIZE, save_s),
        raw_save_s * 1e3,
        gbps(SIZE, raw_save_s),
        save_s / raw_save_s
    )?;
    writeln!(
        out,
        "  restore  {:7.1} ms ({:5.2} GB/s of guest memory)   fs::read+write  {:7.1} ms ({:5.2} GB/s)   ratio {:.2}",
        restore_s * 1e3,
        gbps(SIZE, restore_s),
        raw_restore_s * 1e3,
        gbps(SIZE, raw_restore_s),
        restore_s / raw_restore_s
    )?;
    let _ = std::fs::remove_file(&snap_path);
    let _ = std::fs::remove_file(&raw_path);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(std::env::temp_dir, PathBuf::from);
    println!("rayon threads: {}", rayon::current_num_threads());
    run(&dir, false)?;
    run(&dir, true)?;
    Ok(())
}
