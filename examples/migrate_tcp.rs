//! Live migration between two processes over TCP on loopback.
//!
//! The sender creates a VM's memory (256 MiB by default, a third of it
//! filled, with duplicates), listens on a loopback port, and starts itself
//! again as the receiver (`migrate_tcp receive PORT`). A writer thread
//! keeps dirtying guest memory at a set rate while the pre-copy rounds run;
//! when the estimated downtime fits the budget the writer stops (the
//! "vCPUs" pause), the last round and the end marker with a digest of all
//! of memory go out. The receiver rebuilds the memory, checks the digest
//! (every byte), and sends back an FNV hash of its memory as a second,
//! independent check. Both print rounds, bytes and downtime.
//!
//! `cargo run --release --example migrate_tcp [MEM_MIB [DIRTY_MIB_PER_S]]`

use std::{
    io::{BufReader, BufWriter, Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use pagefold::{
    migration::{receive_migration, PrecopyOptions, ReaderLimits, Sender},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A plain hash of all of memory, independent of the stream's digest.
fn memory_hash(mem: &GuestMemory) -> Res<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut page = [0u8; PAGE_SIZE];
    for r in mem.regions() {
        for i in 0..r.size() / PAGE_SIZE as u64 {
            mem.read(GuestPhysAddr(r.start().0 + i * PAGE_SIZE as u64), &mut page)?;
            let x = xxhash_rust::xxh3::xxh3_64(&page);
            h = (h ^ x).wrapping_mul(0x100_0000_01b3);
        }
    }
    Ok(h)
}

fn receiver(port: u16) -> Res<()> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    let mut back = stream.try_clone()?;
    let got = receive_migration(
        BufReader::with_capacity(1 << 20, stream),
        ReaderLimits::default(),
    )?;
    let h = memory_hash(&got.mem)?;
    back.write_all(&h.to_le_bytes())?;
    println!(
        "receiver: {} MiB rebuilt, {} bytes, last round {:?} (round {:?}), digest verified: {}, \
         {} full / {} ref / {} delta / {} zero pages, {:.2} s",
        got.mem.total_size() >> 20,
        got.stats.bytes,
        got.last_round,
        got.stats.round,
        got.stats.verified,
        got.stats.full_pages,
        got.stats.ref_pages,
        got.stats.delta_pages,
        got.stats.zero_pages,
        got.elapsed.as_secs_f64(),
    );
    if !got.stats.verified {
        return Err("stream carried no digest".into());
    }
    Ok(())
}

fn sender(mib: u64, dirty_mib_s: u64) -> Res<()> {
    let size = mib << 20;
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), size)])?;
    let pages = size / PAGE_SIZE as u64;
    let mut rng = SmallRng::seed_from_u64(1);
    let mut page = [0u8; PAGE_SIZE];
    for p in (0..pages).filter(|p| p % 3 == 0) {
        if rng.gen_ratio(1, 5) {
            page.fill(rng.gen_range(1..8)); // duplicates
        } else {
            rng.fill(&mut page[..]);
        }
        mem.write(GuestPhysAddr(p * PAGE_SIZE as u64), &page)?;
    }

    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let port = listener.local_addr()?.port();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["receive", &port.to_string()])
        .spawn()?;
    let (conn, _) = listener.accept()?;
    conn.set_nodelay(true)?;
    let mut back = conn.try_clone()?;

    let stop = AtomicBool::new(false);
    let t = Instant::now();
    let (summary, written) = std::thread::scope(|s| -> Res<_> {
        // The "vCPU": dirty_mib_s MiB/s of page writes, in 10 ms steps.
        let writer = s.spawn(|| {
            let mut rng = SmallRng::seed_from_u64(2);
            let per_step = (dirty_mib_s << 20) / PAGE_SIZE as u64 / 100;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..per_step {
                    let p = rng.gen_range(0..pages);
                    let v: u64 = rng.gen();
                    if mem
                        .write_obj(GuestPhysAddr(p * PAGE_SIZE as u64 + (v & 0xff8)), v)
                        .is_ok()
                    {
                        n += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        });
        let mut m = Sender::start(
            &mem,
            BufWriter::with_capacity(1 << 20, conn),
            PrecopyOptions::default(),
        )?;
        m.on_progress(|p| {
            println!(
                "sender: round {} sent {} pages, {} MiB on the wire, {} pages dirtied \
                 ({:.0}/s), bandwidth {:.0} MiB/s, estimated downtime {:?}",
                p.round,
                p.round_pages,
                p.bytes >> 20,
                p.dirty_pages,
                p.dirty_rate,
                p.bandwidth / f64::from(1 << 20),
                p.estimated_downtime
            );
        });
        let r = m.iterate();
        // Pause the vCPUs (also on error, so the thread ends).
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().map_err(|_| "writer thread panicked")?;
        r?;
        let (_, summary) = m.finish()?;
        Ok((summary, written))
    })?;
    let want = memory_hash(&mem)?;
    let mut got = [0u8; 8];
    back.read_exact(&mut got)?;
    let status = child.wait()?;
    println!(
        "sender: {} rounds, {} bytes ({:.1} MiB) for a {mib} MiB VM, {} pages in the paused \
         round, downtime {:?}, total {:.2} s; {written} guest writes during migration",
        summary.rounds,
        summary.stream.bytes,
        summary.stream.bytes as f64 / f64::from(1 << 20),
        summary.last_round_pages,
        summary.downtime,
        t.elapsed().as_secs_f64(),
    );
    if u64::from_le_bytes(got) != want || !status.success() {
        return Err("receiver's memory differs from the sender's".into());
    }
    println!("receiver's memory equals the sender's, byte for byte");
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("receive") {
        let port = args.get(2).ok_or("receive needs a port")?.parse()?;
        return receiver(port);
    }
    let mib = args.get(1).map_or(Ok(256), |s| s.parse())?;
    let rate = args.get(2).map_or(Ok(10), |s| s.parse())?;
    sender(mib, rate)
}
