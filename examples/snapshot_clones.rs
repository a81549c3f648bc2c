//! Memory and restore time of 16 clones of one 256 MiB snapshot, three
//! ways, measured in one run:
//!
//! - `folded`: pagefold's [`restore_folded`] into one dedup host, its
//!   layout chosen by `FoldLayout::Auto`: each distinct content in one
//!   shared frame (or, where that would cost more kernel mappings than the
//!   budget holds for 16 clones, an image of the snapshot in page order),
//!   every clone's pages mapping it copy-on-write from the restore on;
//! - `map_private`: Firecracker's way, written here as a small baseline:
//!   the raw memory file (on tmpfs: a memfd holding the non-zero pages,
//!   zero pages left as holes) mapped `MAP_PRIVATE` by each clone, so
//!   clones share its page cache until they write;
//! - `copy`: a full copy per clone ([`restore_into`] of the same snapshot).
//!
//! After its restore each clone reads every page that has content (the
//! guest running), then writes 8 bytes to 1% of its pages, chosen at
//! random over all of them, then more up to 10%, all through raw pointers
//! as a vCPU would. After each step: the memory the kernel holds for the
//! clones (the memfds' allocated blocks, plus the process's anonymous
//! memory and page tables, `VmPTE`, above what they were before the
//! clones: for `folded` the anonymous part includes pagefold's bookkeeping,
//! a page-state word and a hash per page), as a ratio to the snapshot's
//! distinct content; and the time of
//! each restore call to its return (the first clone, and the mean of the
//! others). The snapshot file was just written, so it is in the page cache
//! for every method.
//!
//! Contents: blocks of `--block N` pages (default 32), half zero, a
//! quarter random, a quarter copies of 64 template blocks. `--block 1`
//! mixes page by page (every non-zero page a run of its own, as in
//! `snapshot_throughput`): that costs a folded clone two kernel mappings
//! per page, so the clones map an image instead (`image` in the output
//! counts them).
//!
//! `cargo run --release --example snapshot_clones -- [--block N] [DIR]`

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use pagefold::{
    snapshot::{restore_folded, restore_into, save, SaveOptions, SnapshotReader},
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, VmOptions, PAGE_SIZE,
};
use rand::{seq::SliceRandom, Rng, SeedableRng};

const CLONES: usize = 16;
const SIZE: u64 = 256 << 20;
const SIZE_BYTES: usize = 256 << 20;
const PAGES: usize = SIZE_BYTES / PAGE_SIZE;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The source guest's pages: `None` for zero.
fn contents(unit: usize) -> Vec<Option<Vec<u8>>> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let templates: Vec<Vec<Vec<u8>>> = (0..64)
        .map(|_| {
            (0..unit)
                .map(|_| (0..PAGE_SIZE).map(|_| rng.gen()).collect())
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(PAGES);
    for _ in 0..PAGES / unit {
        let kind = rng.gen_range(0..4);
        let t = rng.gen_range(0..templates.len());
        for page in &templates[t] {
            out.push(match kind {
                0 | 1 => None,
                2 => Some(page.clone()),
                _ => Some((0..PAGE_SIZE).map(|_| rng.gen()).collect()),
            });
        }
    }
    out
}

/// A field of `/proc/self/smaps_rollup` or `/proc/self/status`, in bytes.
fn proc_kb(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)
                    .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        * 1024
}

/// Anonymous memory and page tables of the process.
fn anon_and_tables() -> (u64, u64) {
    (
        proc_kb("/proc/self/smaps_rollup", "Anonymous:"),
        proc_kb("/proc/self/status", "VmPTE:"),
    )
}

fn memfd_blocks(fd: i32) -> u64 {
    // SAFETY: `st` is a plain struct the call fills; `fd` is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return 0;
    }
    u64::try_from(st.st_blocks).unwrap_or(0) * 512
}

/// A clone as the measurement sees it: its memory's first byte.
struct Clone {
    base: *mut u8,
}

/// Reads every page with content, then writes `count` random pages.
fn touch(clones: &[Clone], content: &[Option<Vec<u8>>]) -> u64 {
    let mut sum = 0u64;
    for c in clones {
        for (i, p) in content.iter().enumerate() {
            if p.is_some() {
                // SAFETY: page `i` lies inside the clone's live mapping.
                sum = sum.wrapping_add(unsafe {
                    std::ptr::read_volatile(c.base.add(i * PAGE_SIZE).cast::<u64>())
                });
            }
        }
    }
    sum
}

fn write(clones: &[Clone], order: &[Vec<usize>], from: usize, to: usize) {
    for (c, o) in clones.iter().zip(order) {
        for &i in &o[from..to] {
            // SAFETY: page `i` lies inside the clone's live mapping.
            unsafe { std::ptr::write_volatile(c.base.add(i * PAGE_SIZE + 8).cast::<u64>(), !0) };
        }
    }
}

struct Row {
    name: &'static str,
    /// Bytes after the reads, after 1%, after 10%.
    bytes: [u64; 3],
    /// Files, anonymous memory, page tables after 10%.
    parts: (u64, u64, u64),
    first: Duration,
    rest: Duration,
    note: String,
}

fn measure(
    name: &'static str,
    content: &[Option<Vec<u8>>],
    order: &[Vec<usize>],
    restore: &mut dyn FnMut() -> Res<Clone>,
    files: &dyn Fn() -> u64,
    note: &dyn Fn() -> String,
) -> Res<Row> {
    let (a0, t0) = anon_and_tables();
    let mut clones = Vec::new();
    let mut times = Vec::new();
    for _ in 0..CLONES {
        let t = Instant::now();
        clones.push(restore()?);
        times.push(t.elapsed());
    }
    let parts = || {
        let (a, t) = anon_and_tables();
        (files(), a.saturating_sub(a0), t.saturating_sub(t0))
    };
    let held = || {
        let (f, a, t) = parts();
        f + a + t
    };
    std::hint::black_box(touch(&clones, content));
    let read = held();
    let one = PAGES / 100;
    write(&clones, order, 0, one);
    let w1 = held();
    write(&clones, order, one, PAGES / 10);
    let w10 = held();
    let parts = parts();
    let rest = times[1..].iter().sum::<Duration>() / u32::try_from(times.len() - 1).unwrap_or(1);
    Ok(Row {
        name,
        bytes: [read, w1, w10],
        parts,
        first: times[0],
        rest,
        note: note(),
    })
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let mut block = 32usize;
    let mut dir = std::env::temp_dir();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--block" => {
                block = args
                    .next()
                    .and_then(|b| b.parse().ok())
                    .filter(|&b| b > 0 && PAGES % b == 0)
                    .ok_or("--block takes a number of pages dividing 65536")?;
            }
            d => dir = PathBuf::from(d),
        }
    }
    let content = contents(block);
    let layout = [(GuestPhysAddr(0), SIZE)];
    let src = GuestMemory::new(&layout)?;
    for (i, p) in content.iter().enumerate() {
        if let Some(p) = p {
            src.write(GuestPhysAddr((i * PAGE_SIZE) as u64), p)?;
        }
    }
    let path = dir.join(format!("pagefold-clones-{}.snap", std::process::id()));
    let saved = save(&src, &path, &SaveOptions { track_dirty: false })?;
    let snap = SnapshotReader::open(&path)?;
    let distinct = snap.stored_pages() * PAGE_SIZE as u64;
    let nonzero = content.iter().filter(|p| p.is_some()).count();
    // The raw memory file: non-zero pages written, zero pages holes.
    // SAFETY: a valid C string; the call makes a new descriptor.
    let raw = unsafe { libc::memfd_create(c"pagefold-raw".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `raw` is a new descriptor nobody else owns.
    let raw = unsafe { OwnedFd::from_raw_fd(raw) };
    let file = std::fs::File::from(raw);
    file.set_len(SIZE)?;
    {
        use std::os::unix::fs::FileExt;
        for (i, p) in content.iter().enumerate() {
            if let Some(p) = p {
                file.write_all_at(p, (i * PAGE_SIZE) as u64)?;
            }
        }
    }
    drop(src);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    let order: Vec<Vec<usize>> = (0..CLONES)
        .map(|_| {
            let mut o: Vec<usize> = (0..PAGES).collect();
            o.shuffle(&mut rng);
            o
        })
        .collect();
    println!(
        "{CLONES} clones of a {} MiB snapshot (blocks of {} pages): {} pages with content, {} distinct ({} MiB), file {} MiB, {} mappings allowed",
        SIZE >> 20,
        block,
        nonzero,
        snap.stored_pages(),
        distinct >> 20,
        saved.file_bytes >> 20,
        std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap_or_default().trim(),
    );

    let mut rows = Vec::new();
    {
        let store = Arc::new(FrameStore::memfd()?);
        let host = DedupHost::new(Arc::clone(&store))?;
        let copied = std::cell::Cell::new(0u64);
        let images = std::cell::Cell::new(0u64);
        let mut keep = Vec::new();
        let mut restore = || -> Res<Clone> {
            let r = restore_folded(&host, VmOptions::default(), &snap)?;
            copied.set(copied.get() + r.stats.copied_pages);
            images.set(images.get() + u64::from(r.stats.image));
            let base = r.memory.regions()[0].host_addr().0 as *mut u8;
            keep.push(r);
            Ok(Clone { base })
        };
        let files = || store.allocated_bytes().unwrap_or(0);
        let note = || {
            format!(
                "{} of {CLONES} clones on an image, {} pages copied",
                images.get(),
                copied.get()
            )
        };
        rows.push(measure(
            "folded",
            &content,
            &order,
            &mut restore,
            &files,
            &note,
        )?);
        drop(keep);
    }
    {
        let mut maps: Vec<(usize, usize)> = Vec::new();
        let mut restore = || -> Res<Clone> {
            // SAFETY: a new private mapping of the whole file; nothing else
            // maps at the address the kernel picks.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    SIZE_BYTES,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error().into());
            }
            maps.push((p as usize, SIZE_BYTES));
            Ok(Clone { base: p.cast() })
        };
        let files = || memfd_blocks(file.as_raw_fd());
        let note = || String::new();
        rows.push(measure(
            "map_private",
            &content,
            &order,
            &mut restore,
            &files,
            &note,
        )?);
        for (p, len) in maps {
            // SAFETY: each is a mapping made above, unmapped once.
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
        }
    }
    {
        let store = Arc::new(FrameStore::memfd()?);
        let mut keep = Vec::new();
        let mut restore = || -> Res<Clone> {
            let m = GuestMemory::with_store(Arc::clone(&store), &snap.region_layout())?;
            restore_into(&snap, &m)?;
            let base = m.regions()[0].host_addr().0 as *mut u8;
            keep.push(m);
            Ok(Clone { base })
        };
        let files = || store.allocated_bytes().unwrap_or(0);
        let note = || String::new();
        rows.push(measure(
            "copy",
            &content,
            &order,
            &mut restore,
            &files,
            &note,
        )?);
        drop(keep);
    }
    let _ = std::fs::remove_file(&path);

    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "{:<12} {:>22} {:>22} {:>22} {:>12} {:>12}",
        "method",
        "after reads",
        "after 1% written",
        "after 10% written",
        "1st restore",
        "next (mean)"
    );
    for r in &rows {
        let cell = |b: u64| format!("{:.0} MiB ({:.2}x)", mib(b), b as f64 / distinct as f64);
        println!(
            "{:<12} {:>22} {:>22} {:>22} {:>10.2}ms {:>10.2}ms {}",
            r.name,
            cell(r.bytes[0]),
            cell(r.bytes[1]),
            cell(r.bytes[2]),
            r.first.as_secs_f64() * 1e3,
            r.rest.as_secs_f64() * 1e3,
            r.note,
        );
    }
    for r in &rows {
        println!(
            "{:<12} after 10%: files {:.0} MiB, anonymous {:.0} MiB, page tables {:.1} MiB",
            r.name,
            mib(r.parts.0),
            mib(r.parts.1),
            mib(r.parts.2),
        );
    }
    // The floor: the distinct content plus what the clones wrote.
    for (k, pct) in [(1usize, 1usize), (2, 10)] {
        let floor = distinct + (CLONES * PAGES * pct / 100 * PAGE_SIZE) as u64;
        println!(
            "after {pct}% written: floor (distinct + written pages) {:.0} MiB; folded / floor {:.3}, map_private / floor {:.3}, copy / floor {:.3}",
            mib(floor),
            rows[0].bytes[k] as f64 / floor as f64,
            rows[1].bytes[k] as f64 / floor as f64,
            rows[2].bytes[k] as f64 / floor as f64,
        );
    }
    Ok(())
}
