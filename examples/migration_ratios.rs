//! Bytes on the wire of a pre-copy migration (one round, guest idle)
//! against the distinct non-zero content and against a zero-page-only
//! stream (what QEMU sends by default: every non-zero page whole, 4096
//! bytes plus a 9-byte page header here).
//!
//! Cases: four clones of one booted guest image (the same image four
//! times), the four booted images, and 1 GiB of random pages with 10%
//! duplicates. Each is also sent as a zero-page-only stream (a plain loop
//! writing every non-zero page whole) in the same run, and both times are
//! printed. For the four clones, the receiver's memory as the kernel sees
//! it (the memfd's allocated bytes) is measured after a plain receive and
//! after a receive folded on arrival. Last, a downtime run: a writer thread
//! dirties a 256 MiB guest at a fixed rate while pre-copy runs over an
//! in-memory pipe with a bandwidth cap; measured downtime against the
//! budget. Images: `target/guest-images/ram-{0..3}.img` (skipped with a
//! note when missing; pass another directory as the first argument).
//!
//! `cargo run --release --example migration_ratios [IMAGE_DIR]`
//! (`benches/migration_ratios.sh` runs it.)

use std::{
    collections::HashSet,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use pagefold::{
    migration::{
        memory_digest, receive_migration, receive_migration_folded, PrecopyOptions, ReaderLimits,
        Sender,
    },
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, VmOptions, PAGE_SIZE,
};
use pagefold_tools::pipe::pipe;
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

/// A zero-page-only stream (QEMU's default): every page read, each
/// non-zero one written whole after a 9-byte header; returns bytes.
fn send_zero_page_only(mem: &GuestMemory, out: &mut impl Write) -> io::Result<u64> {
    let mut page = [0u8; PAGE_SIZE];
    let mut bytes = 0;
    for r in mem.regions() {
        for i in 0..r.size() / PAGE_SIZE as u64 {
            let gpa = r.start().0 + i * PAGE_SIZE as u64;
            mem.read(GuestPhysAddr(gpa), &mut page)
                .map_err(io::Error::other)?;
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            let mut head = [0u8; 9];
            head[0] = 3;
            head[1..].copy_from_slice(&gpa.to_le_bytes());
            out.write_all(&head)?;
            out.write_all(&page)?;
            bytes += PAGE_HEADER + PAGE_SIZE as u64;
        }
    }
    Ok(bytes)
}

/// Seconds to move `bytes` over a 10 Gbit/s link.
fn at_10g(bytes: u64) -> f64 {
    bytes as f64 / 1.25e9
}

fn measure(name: &str, mem: &GuestMemory) -> Result<(), Box<dyn std::error::Error>> {
    let (nonzero, distinct) = census(mem)?;
    let t = Instant::now();
    let m = Sender::start(mem, Count(0), PrecopyOptions::default())?;
    let (out, s) = m.finish()?;
    let secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut zc = Count(0);
    send_zero_page_only(mem, &mut zc)?;
    let zsecs = t.elapsed().as_secs_f64();
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
    println!(
        "  total time, no link limit (encode + digest): pagefold {secs:.2} s, zero-page-only \
         {zsecs:.2} s ({:.2}x); at 10 Gbit/s: pagefold {:.2} s, zero-page-only {:.2} s \
         ({:.2}x faster)",
        secs / zsecs.max(1e-9),
        secs.max(at_10g(out.0)),
        zsecs.max(at_10g(zc.0)),
        zsecs.max(at_10g(zc.0)) / secs.max(at_10g(out.0)).max(1e-9),
    );
    Ok(())
}

/// The receiver's memory as the kernel sees it, plain and folded on
/// arrival.
fn measure_fold(mem: &GuestMemory) -> Result<(), Box<dyn std::error::Error>> {
    let (_, distinct) = census(mem)?;
    let m = Sender::start(mem, Vec::new(), PrecopyOptions::default())?;
    let (wire, _) = m.finish()?;
    let want = memory_digest(mem, 0)?;
    let plain = receive_migration(&wire[..], ReaderLimits::default())?;
    let plain_bytes = plain.mem.frame_store().allocated_bytes()?;
    if memory_digest(&plain.mem, 0)? != want {
        return Err("plain receive differs from the sender".into());
    }
    let plain_secs = plain.elapsed.as_secs_f64();
    drop(plain);
    let store = Arc::new(FrameStore::memfd()?);
    let host = DedupHost::new(Arc::clone(&store))?;
    let got = receive_migration_folded(
        &wire[..],
        ReaderLimits::default(),
        &host,
        VmOptions::default(),
    )?;
    let folded = store.allocated_bytes()?;
    if memory_digest(&got.mem, 0)? != want {
        return Err("folded receive differs from the sender".into());
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "  receiver, kernel's allocated bytes: plain {:.1} MiB, folded on arrival {:.1} MiB \
         ({:.2}x less; distinct non-zero content {:.1} MiB); {} pages offered, {} merged, \
         {} zero released; receive {plain_secs:.2} s plain, {:.2} s + {:.2} s folding; \
         both verified byte for byte",
        mib(plain_bytes),
        mib(folded),
        plain_bytes as f64 / folded.max(1) as f64,
        mib(distinct * PAGE_SIZE as u64),
        got.fold_candidates,
        got.fold.merged_shared,
        got.fold.merged_zero,
        got.elapsed.as_secs_f64(),
        got.fold_time.as_secs_f64(),
    );
    Ok(())
}

/// Pre-copy of a 256 MiB guest over an in-memory pipe capped at
/// `link_mib_s` while a writer thread dirties `dirty_mib_s` worth of pages
/// a second; prints rounds and downtime against the 300 ms budget.
fn downtime_run(dirty_mib_s: u64, link_mib_s: u64) -> Result<(), Box<dyn std::error::Error>> {
    let size = 256u64 << 20;
    let pages = size / PAGE_SIZE as u64;
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), size)])?;
    let mut rng = SmallRng::seed_from_u64(7);
    let mut page = [0u8; PAGE_SIZE];
    for p in (0..pages).filter(|p| p % 2 == 0) {
        rng.fill(&mut page[..]);
        mem.write(GuestPhysAddr(p * PAGE_SIZE as u64), &page)?;
    }
    let opts = PrecopyOptions {
        bandwidth_limit: Some(link_mib_s << 20),
        ..PrecopyOptions::default()
    };
    let budget = opts.downtime_budget;
    let (tx, rx) = pipe(64);
    let stop = AtomicBool::new(false);
    let (summary, got, writes) =
        std::thread::scope(|s| -> Result<_, Box<dyn std::error::Error>> {
            let receiver = s.spawn(move || receive_migration(rx, ReaderLimits::default()));
            let writer = s.spawn(|| {
                // Pages dirtied per second, paced in 5 ms steps.
                let rate = (dirty_mib_s << 20) / PAGE_SIZE as u64;
                let mut rng = SmallRng::seed_from_u64(8);
                let t = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    #[allow(clippy::cast_possible_truncation)] // a page count
                    let due = (t.elapsed().as_secs_f64() * rate as f64) as u64;
                    while n < due {
                        let p = rng.gen_range(0..pages);
                        let v: u64 = rng.gen();
                        let _ = mem.write_obj(GuestPhysAddr(p * PAGE_SIZE as u64 + (v & 0xff8)), v);
                        n += 1;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                n
            });
            let mut m = Sender::start(&mem, io::BufWriter::with_capacity(256 << 10, tx), opts)?;
            m.on_progress(|p| {
                println!(
                    "  round {}: {} pages, {} pages dirtied ({:.1} MiB/s), bandwidth {:.0} MiB/s, \
                 estimated downtime {:.0} ms",
                    p.round,
                    p.round_pages,
                    p.dirty_pages,
                    p.dirty_rate * PAGE_SIZE as f64 / f64::from(1 << 20),
                    p.bandwidth / f64::from(1 << 20),
                    p.estimated_downtime.as_secs_f64() * 1e3
                );
            });
            let r = m.iterate();
            // The VMM pauses its vCPUs here.
            stop.store(true, Ordering::Relaxed);
            let writes = writer.join().map_err(|_| "writer thread panicked")?;
            r?;
            let (out, summary) = m.finish()?;
            drop(out);
            let got = receiver.join().map_err(|_| "receiver thread panicked")??;
            Ok((summary, got, writes))
        })?;
    if memory_digest(&got.mem, 0)? != memory_digest(&mem, 0)? {
        return Err("receiver differs from the sender".into());
    }
    println!(
        "  {} rounds, {:.1} MiB on the wire, {} pages in the paused round, downtime {:.0} ms \
         (budget {:.0} ms, {}), total {:.2} s; {writes} guest writes; receiver verified \
         byte for byte",
        summary.rounds,
        summary.stream.bytes as f64 / f64::from(1 << 20),
        summary.last_round_pages,
        summary.downtime.as_secs_f64() * 1e3,
        budget.as_secs_f64() * 1e3,
        if summary.downtime <= budget {
            "within"
        } else {
            "OVER"
        },
        summary.total.as_secs_f64(),
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
        measure_fold(&mem)?;
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
    drop(mem);

    println!(
        "downtime: 256 MiB guest (half random pages), 20 MiB/s of guest writes, \
         pipe capped at 500 MiB/s, budget 300 ms"
    );
    downtime_run(20, 500)?;
    Ok(())
}
