//! Post-copy against pre-copy on a guest that writes faster than the link,
//! measured in the same run over the same capped link (an in-memory pipe
//! behind the sender's token bucket).
//!
//! The guest: a thread rewriting random pages of 64 MiB of memory (half of
//! it random content) whole, with random bytes, at a fixed rate above the
//! link's (so no delta or reference shrinks them on the wire).
//! Pre-copy: rounds until the round limit (the dirty rate never lets the
//! estimate meet the budget), then the guest stops and the last round goes
//! out; the guest runs again at the destination once the receiver holds
//! everything. Post-copy: one round, then the guest stops, the switchover
//! goes out, and the guest runs at the destination at once (a thread there
//! writing at the same rate, its touches of pages not yet there served on
//! fault), while the rest is pushed.
//!
//! Downtime: from the guest's stop at the source to the moment it may run
//! at the destination. Total: from the start to the destination holding
//! every page. Printed for both, and as ratios post-copy / pre-copy.
//!
//! `cargo run --release --example postcopy_ratios [LINK_MIB_S [DIRTY_MIB_S]]`
//! (defaults 32 and 64).

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use pagefold::{
    migration::{
        memory_digest, receive_migration, receive_postcopy, PostcopyOptions, PrecopyOptions,
        ReaderLimits, Sender,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use pagefold_tools::pipe::pipe;
use rand::{rngs::SmallRng, Rng, SeedableRng};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const SIZE: u64 = 64 << 20;
const PAGES: u64 = SIZE / PAGE_SIZE as u64;

fn guest_memory() -> Res<Arc<GuestMemory>> {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), SIZE)])?;
    let mut rng = SmallRng::seed_from_u64(7);
    let mut page = [0u8; PAGE_SIZE];
    for p in (0..PAGES).filter(|p| p % 2 == 0) {
        rng.fill(&mut page[..]);
        mem.write(GuestPhysAddr(p * PAGE_SIZE as u64), &page)?;
    }
    Ok(Arc::new(mem))
}

/// The guest: rewrites random pages whole with random bytes (so no delta
/// or reference makes them cheaper on the wire) at `pages_s` pages a
/// second (5 ms steps) until `stop`; returns the pages written.
fn guest(mem: Arc<GuestMemory>, pages_s: u64, seed: u64, stop: Arc<AtomicBool>) -> Res<u64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let t = Instant::now();
    let mut n = 0u64;
    let mut page = [0u8; PAGE_SIZE];
    while !stop.load(Ordering::Relaxed) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a page count
        let due = (t.elapsed().as_secs_f64() * pages_s as f64) as u64;
        while n < due {
            let p = rng.gen_range(0..PAGES);
            rng.fill(&mut page[..]);
            mem.write(GuestPhysAddr(p * PAGE_SIZE as u64), &page)?;
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(n)
}

struct Run {
    downtime: Duration,
    total: Duration,
    rounds: u32,
    wire: u64,
}

fn precopy(link: u64, pages_s: u64, max_rounds: u32) -> Res<Run> {
    let mem = guest_memory()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (m, s) = (Arc::clone(&mem), Arc::clone(&stop));
    let writer = std::thread::spawn(move || guest(m, pages_s, 8, s));
    let (tx, rx) = pipe(64);
    let receiver = std::thread::spawn(move || receive_migration(rx, ReaderLimits::default()));
    let opts = PrecopyOptions {
        bandwidth_limit: Some(link),
        max_rounds,
        verify: false,
        ..PrecopyOptions::default()
    };
    let t0 = Instant::now();
    let mut snd = Sender::start(&mem, io::BufWriter::with_capacity(256 << 10, tx), opts)?;
    snd.iterate()?;
    // The VMM stops the guest here.
    stop.store(true, Ordering::Relaxed);
    writer.join().map_err(|_| "guest thread panicked")??;
    let stopped = Instant::now();
    let (out, summary) = snd.finish()?;
    drop(out);
    let got = receiver.join().map_err(|_| "receiver panicked")??;
    // The destination holds everything: the guest may run there now.
    let downtime = stopped.elapsed();
    let total = t0.elapsed();
    if memory_digest(&got.mem, 0)? != memory_digest(&mem, 0)? {
        return Err("pre-copy: the receiver differs from the sender".into());
    }
    Ok(Run {
        downtime,
        total,
        rounds: summary.rounds,
        wire: summary.stream.bytes,
    })
}

fn postcopy(link: u64, pages_s: u64) -> Res<(Run, String)> {
    let mem = guest_memory()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (m, s) = (Arc::clone(&mem), Arc::clone(&stop));
    let writer = std::thread::spawn(move || guest(m, pages_s, 8, s));
    let (tx, rx) = pipe(64);
    let (btx, brx) = pipe(64);
    let stopped_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let opts = PrecopyOptions {
        bandwidth_limit: Some(link),
        max_rounds: 1,
        verify: false,
        ..PrecopyOptions::default()
    };
    let t0 = Instant::now();
    let (src, st, at) = (Arc::clone(&mem), Arc::clone(&stop), Arc::clone(&stopped_at));
    let source = std::thread::spawn(move || -> Res<_> {
        let mut snd =
            Sender::start_postcopy(&src, io::BufWriter::with_capacity(256 << 10, tx), opts)?;
        snd.iterate()?;
        st.store(true, Ordering::Relaxed);
        writer.join().map_err(|_| "guest thread panicked")??;
        if let Ok(mut a) = at.lock() {
            *a = Some(Instant::now());
        }
        let (_, summary) = snd.switchover(brx, b"", PostcopyOptions::default())?;
        Ok(summary)
    });
    let inc = receive_postcopy(rx, btx, ReaderLimits::default())?;
    // The guest may run at the destination now.
    let resumed = Instant::now();
    let dst_switch = inc.switchover;
    let dmem = Arc::new(inc.mem);
    let dstop = Arc::new(AtomicBool::new(false));
    let (m, s) = (Arc::clone(&dmem), Arc::clone(&dstop));
    let dguest = std::thread::spawn(move || guest(m, pages_s, 9, s));
    let stats = inc.receiving.wait()?;
    let total = t0.elapsed();
    dstop.store(true, Ordering::Relaxed);
    let writes = dguest.join().map_err(|_| "guest thread panicked")??;
    let summary = source.join().map_err(|_| "source panicked")??;
    let stopped = stopped_at
        .lock()
        .map_err(|_| "poisoned")?
        .ok_or("the source never stopped the guest")?;
    let note = format!(
        "post-copy: downtime parts: source {:.1} ms (harvest, discards, switchover record), \
         destination {:.1} ms (discards, registration)\n\
         post-copy: {} pages lacking at the switchover ({} discarded), {} pushed, {} sent on request; \
         the guest ran at the destination during the push: {writes} pages written, {} page requests, \
         mean fault wait {:.2} ms, longest {:.2} ms",
        summary.switchover.as_secs_f64() * 1e3,
        dst_switch.as_secs_f64() * 1e3,
        summary.needed,
        summary.discarded,
        summary.pushed,
        summary.requested,
        stats.requests,
        stats.fault_wait.as_secs_f64() * 1e3 / stats.placed_on_request.max(1) as f64,
        stats.max_fault_wait.as_secs_f64() * 1e3,
    );
    Ok((
        Run {
            downtime: resumed.saturating_duration_since(stopped),
            total,
            rounds: summary.precopy_rounds,
            wire: summary.stream.bytes,
        },
        note,
    ))
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let link_mib: u64 = args.next().map_or(Ok(32), |a| a.parse())?;
    let dirty_mib: u64 = args.next().map_or(Ok(64), |a| a.parse())?;
    let link = link_mib << 20;
    let pages_s = (dirty_mib << 20) / PAGE_SIZE as u64;
    println!(
        "postcopy_ratios: 64 MiB guest (half random), rewriting {dirty_mib} MiB/s of random \
         pages whole over a {link_mib} MiB/s link"
    );
    let pre = precopy(link, pages_s, 5)?;
    let (post, note) = postcopy(link, pages_s)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "pre-copy : {} rounds, {:.1} MiB on the wire, downtime {:.1} ms, total {:.2} s",
        pre.rounds,
        mib(pre.wire),
        ms(pre.downtime),
        pre.total.as_secs_f64()
    );
    println!(
        "post-copy: {} round, {:.1} MiB on the wire, downtime {:.1} ms, total {:.2} s",
        post.rounds,
        mib(post.wire),
        ms(post.downtime),
        post.total.as_secs_f64()
    );
    println!("{note}");
    println!(
        "ratios post-copy / pre-copy: downtime {:.4}, total time {:.2}, bytes {:.2}",
        post.downtime.as_secs_f64() / pre.downtime.as_secs_f64().max(1e-9),
        post.total.as_secs_f64() / pre.total.as_secs_f64().max(1e-9),
        post.wire as f64 / pre.wire.max(1) as f64
    );
    Ok(())
}
