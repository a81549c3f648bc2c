//! Memory and restore time of clones restored from snapshots, three ways,
//! measured in one run: 16 clones of one synthetic 256 MiB snapshot, or
//! (`--guests DIR`) 4 clones of each of the four booted guest images
//! `DIR/ram-{0..3}.img` of `benches/guest/boot_guest.sh`:
//!
//! - `folded`: pagefold's [`restore_folded`], every clone into one dedup
//!   host's domain (so content common to several snapshots is shared
//!   too), its layout chosen by `FoldLayout::Auto` (or `--layout`), told
//!   the clones planned of each snapshot: each distinct content in one
//!   shared frame (or, for clones past the kernel's mapping budget,
//!   whichever costs less memory of: copies of their shortest runs; an
//!   image of the snapshot in page order, shared by that snapshot's clones
//!   only; or such an image of the pages outside the runs worth most,
//!   which map the shared frames), every clone's pages mapping it
//!   copy-on-write from the restore on;
//! - `lazy` (with `--layout lazy`, in the default): pagefold's
//!   [`restore_folded_lazy`], every clone into one fresh dedup host, all
//!   restored one after another before the reads (so, unless a clone's
//!   background fetch finished first, they map one image of the snapshot
//!   in the host's frames that fills as pages arrive, each page once for
//!   all of them); after the reads every clone is `wait`ed for (the image
//!   then the domain's shared frames) before the memory is counted, and
//!   the writes follow as for the others;
//! - `map_private`: Firecracker's way, written here as a small baseline:
//!   each snapshot's raw memory file (on tmpfs: a memfd holding the
//!   non-zero pages, zero pages left as holes) mapped `MAP_PRIVATE` by
//!   each of its clones, so clones of one file share its page cache until
//!   they write, and nothing is shared across files;
//! - `copy`: a full copy per clone ([`restore_into`] of the same snapshot).
//!
//! After its restore each clone reads every page that has content (the
//! guest running), then writes 8 bytes to 1% of its pages, chosen at
//! random over all of them, then more up to 10%, then up to 50%, all
//! through raw pointers as a vCPU would. After each step: the memory the
//! kernel holds for the clones (the memfds' allocated blocks, plus the
//! process's anonymous memory and page tables, `VmPTE`, above what they
//! were before the clones: for `folded` the anonymous part includes
//! pagefold's bookkeeping, a page-state word and a hash per page), as a
//! ratio to the floor: the distinct non-zero content of all the snapshots
//! together plus the pages the clones wrote; and the time of each restore
//! call to its return (the first clone of each snapshot, and the mean of
//! the others). The snapshot files were just written, so they are in the
//! page cache for every method.
//!
//! Synthetic contents: blocks of `--block N` pages (default 32), half
//! zero, a quarter random, a quarter copies of 64 template blocks.
//! `--block 1` mixes page by page (every non-zero page a run of its own,
//! as in `snapshot_throughput`): that costs a folded clone two kernel
//! mappings per page, so clones past the budget map an image instead,
//! whole or partial (`image` in the output counts them).
//!
//! `cargo run --release -p pagefold --example snapshot_clones -- [--block N]
//! [--guests DIR] [--layout L[,L...]] [SNAPSHOT_DIR]`, each `L` one of
//! `auto`, `contents`, `image` (a `folded` row each) or `lazy` (the
//! `lazy` row); default `auto,lazy`.

use std::{
    collections::HashSet,
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use pagefold::{
    snapshot::{
        restore_folded_lazy, restore_folded_with, restore_into, save, FoldLayout, FoldOptions,
        LazyFoldOptions, LazyFoldedRestore, SaveOptions, SnapshotReader,
    },
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, VmOptions, PAGE_SIZE,
};
use rand::{seq::SliceRandom, Rng, SeedableRng};

const SIZE: u64 = 256 << 20;
const SIZE_BYTES: usize = 256 << 20;
const PAGES: usize = SIZE_BYTES / PAGE_SIZE;
/// Percentages of its pages each clone has written after each step.
const STEPS: [usize; 3] = [1, 10, 50];

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The synthetic guest's pages: `None` for zero.
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

/// A snapshot the clones restore from, and its raw memory file.
struct Source {
    snap: Arc<SnapshotReader>,
    path: PathBuf,
    /// The raw memory file: non-zero pages written, zero pages holes.
    raw: File,
    /// Whether each page has content (is not zero).
    has_content: Vec<bool>,
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Saves a 256 MiB memory whose page `i` is `page(i)` (`None`: zero) as
/// a snapshot in `dir`, and writes its raw memory file; adds the BLAKE3 of
/// each non-zero page to `distinct`.
fn source<'p>(
    dir: &Path,
    tag: &str,
    page: &dyn Fn(usize) -> Option<&'p [u8]>,
    distinct: &mut HashSet<[u8; 32]>,
) -> Res<Source> {
    let src = GuestMemory::new(&[(GuestPhysAddr(0), SIZE)])?;
    // SAFETY: a valid C string; the call makes a new descriptor.
    let raw = unsafe { libc::memfd_create(c"pagefold-raw".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `raw` is a new descriptor nobody else owns.
    let raw = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    raw.set_len(SIZE)?;
    let mut has_content = vec![false; PAGES];
    for (i, has) in has_content.iter_mut().enumerate() {
        if let Some(p) = page(i) {
            use std::os::unix::fs::FileExt;
            let at = (i * PAGE_SIZE) as u64;
            src.write(GuestPhysAddr(at), p)?;
            raw.write_all_at(p, at)?;
            distinct.insert(*blake3::hash(p).as_bytes());
            *has = true;
        }
    }
    let path = dir.join(format!("pagefold-clones-{}-{tag}.snap", std::process::id()));
    save(&src, &path, &SaveOptions { track_dirty: false })?;
    Ok(Source {
        snap: Arc::new(SnapshotReader::open(&path)?),
        path,
        raw,
        has_content,
    })
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

/// Reads every page with content of each clone (of source `plan[k]`).
fn touch(clones: &[Clone], sources: &[Source], plan: &[usize]) -> u64 {
    let mut sum = 0u64;
    for (c, &s) in clones.iter().zip(plan) {
        for (i, _) in sources[s].has_content.iter().enumerate().filter(|p| *p.1) {
            // SAFETY: page `i` lies inside the clone's live mapping.
            sum = sum.wrapping_add(unsafe {
                std::ptr::read_volatile(c.base.add(i * PAGE_SIZE).cast::<u64>())
            });
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
    /// Bytes after the reads, then after each of [`STEPS`].
    bytes: [u64; 1 + STEPS.len()],
    /// Files, anonymous memory, page tables after the reads.
    parts_read: (u64, u64, u64),
    /// Files, anonymous memory, page tables after the last step.
    parts: (u64, u64, u64),
    /// Mean restore time of the first clone of each source, of the rest.
    first: Duration,
    rest: Duration,
    note: String,
}

/// What a method does: restore a clone of a source, count its files.
struct Method<'a> {
    name: &'static str,
    restore: &'a mut dyn FnMut(&Source) -> Res<Clone>,
    files: &'a dyn Fn() -> u64,
    note: &'a dyn Fn() -> String,
    /// Run after the reads, before the memory is first counted (the lazy
    /// restores are waited for).
    settle: &'a mut dyn FnMut() -> Res<()>,
}

/// Restores a clone of `sources[plan[k]]` for each `k`, then reads and
/// writes them step by step, counting the memory after each.
fn measure(sources: &[Source], plan: &[usize], order: &[Vec<usize>], m: Method) -> Res<Row> {
    // Heap freed before (a method measured earlier, the sources' pages)
    // goes back to the kernel, so that this method's allocations are not
    // served from memory already counted in the baseline.
    // SAFETY: glibc's own call on its own heap; no pointer is passed.
    unsafe { libc::malloc_trim(0) };
    let (a0, t0) = anon_and_tables();
    let mut clones = Vec::new();
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    for (k, &s) in plan.iter().enumerate() {
        let t = Instant::now();
        clones.push((m.restore)(&sources[s])?);
        let took = t.elapsed();
        if plan[..k].contains(&s) {
            rest.push(took);
        } else {
            first.push(took);
        }
    }
    let parts = || {
        let (a, t) = anon_and_tables();
        ((m.files)(), a.saturating_sub(a0), t.saturating_sub(t0))
    };
    let held = || {
        let (f, a, t) = parts();
        f + a + t
    };
    std::hint::black_box(touch(&clones, sources, plan));
    (m.settle)()?;
    let parts_read = parts();
    let mut bytes = [held(); 1 + STEPS.len()];
    let mut done = 0;
    for (k, pct) in STEPS.iter().enumerate() {
        let to = PAGES * pct / 100;
        write(&clones, order, done, to);
        done = to;
        bytes[k + 1] = held();
    }
    let mean =
        |v: &[Duration]| v.iter().sum::<Duration>() / u32::try_from(v.len().max(1)).unwrap_or(1);
    Ok(Row {
        name: m.name,
        bytes,
        parts_read,
        parts: parts(),
        first: mean(&first),
        rest: mean(&rest),
        note: (m.note)(),
    })
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let mut block = 32usize;
    let mut guests: Option<PathBuf> = None;
    let mut layouts = vec![FoldLayout::Auto];
    let mut lazy = true;
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
            "--guests" => guests = Some(args.next().ok_or("--guests takes a directory")?.into()),
            "--layout" => {
                let list = args.next().unwrap_or_default();
                lazy = list.split(',').any(|l| l == "lazy");
                layouts = list
                    .split(',')
                    .filter(|&l| l != "lazy")
                    .map(|l| match l {
                        "auto" => Ok(FoldLayout::Auto),
                        "contents" => Ok(FoldLayout::Contents),
                        "image" => Ok(FoldLayout::Image),
                        _ => Err("--layout takes auto, contents, image or lazy, comma-separated"),
                    })
                    .collect::<Result<_, _>>()?;
            }
            d => dir = PathBuf::from(d),
        }
    }
    let mut distinct = HashSet::new();
    let mut sources = Vec::new();
    let plan: Vec<usize>;
    let what;
    // Kept to the end, as the pages of the baseline's heap.
    let content;
    if let Some(g) = &guests {
        for i in 0..4 {
            let file = g.join(format!("ram-{i}.img"));
            let image = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            if image.len() != SIZE_BYTES {
                return Err(
                    format!("{}: {} bytes, not 256 MiB", file.display(), image.len()).into(),
                );
            }
            let page = |k: usize| {
                let p = &image[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
                p.iter().any(|&b| b != 0).then_some(p)
            };
            sources.push(source(&dir, &format!("guest{i}"), &page, &mut distinct)?);
        }
        plan = (0..16).map(|k| k / 4).collect();
        what = format!("4 clones of each of 4 guest images ({})", g.display());
    } else {
        content = contents(block);
        let page = |k: usize| content[k].as_deref();
        sources.push(source(&dir, "synthetic", &page, &mut distinct)?);
        plan = vec![0; 16];
        what = format!("16 clones of a 256 MiB snapshot (blocks of {block} pages)");
    }
    let distinct = distinct.len() as u64 * PAGE_SIZE as u64;
    let nonzero: usize = sources
        .iter()
        .map(|s| s.has_content.iter().filter(|&&h| h).count())
        .sum();
    let stored: u64 = sources.iter().map(|s| s.snap.stored_pages()).sum();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    let order: Vec<Vec<usize>> = plan
        .iter()
        .map(|_| {
            let mut o: Vec<usize> = (0..PAGES).collect();
            o.shuffle(&mut rng);
            o
        })
        .collect();
    println!(
        "{what}: {nonzero} pages with content, {stored} distinct per snapshot, {} distinct in all ({} MiB), {} mappings allowed",
        distinct / PAGE_SIZE as u64,
        distinct >> 20,
        std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap_or_default().trim(),
    );

    let mut rows = Vec::new();
    for &layout in &layouts {
        let store = Arc::new(FrameStore::memfd()?);
        let host = DedupHost::new(Arc::clone(&store))?;
        let copied = std::cell::Cell::new(0u64);
        let images = std::cell::Cell::new(0u64);
        let mut keep = Vec::new();
        let mut restore = |s: &Source| -> Res<Clone> {
            // The clones of this snapshot the run restores.
            let planned = sources
                .iter()
                .position(|o| std::ptr::eq(o, s))
                .map(|i| plan.iter().filter(|&&p| p == i).count() as u64);
            let fold = FoldOptions {
                layout,
                planned_clones: planned,
                ..FoldOptions::default()
            };
            let r = restore_folded_with(&host, VmOptions::default(), &s.snap, &fold)?;
            copied.set(copied.get() + r.stats.copied_pages);
            images.set(images.get() + u64::from(r.stats.image));
            let base = r.memory.regions()[0].host_addr().0 as *mut u8;
            keep.push(r);
            Ok(Clone { base })
        };
        let files = || store.allocated_bytes().unwrap_or(0);
        let note = || {
            format!(
                "{} of {} clones on an image, {} pages copied",
                images.get(),
                plan.len(),
                copied.get()
            )
        };
        let m = Method {
            name: match layout {
                FoldLayout::Auto => "folded",
                FoldLayout::Contents => "folded:contents",
                FoldLayout::Image => "folded:image",
            },
            restore: &mut restore,
            files: &files,
            note: &note,
            settle: &mut || Ok(()),
        };
        rows.push(measure(&sources, &plan, &order, m)?);
        drop(keep);
    }
    if lazy {
        let store = Arc::new(FrameStore::memfd()?);
        let host = DedupHost::new(Arc::clone(&store))?;
        let whole = std::cell::Cell::new(0u64);
        let found = std::cell::Cell::new(0u64);
        let fetched = std::cell::Cell::new(0u64);
        let on_fault = std::cell::Cell::new(0u64);
        let arriving: std::cell::RefCell<Vec<LazyFoldedRestore>> = Default::default();
        let mut keep = Vec::new();
        let mut restore = |s: &Source| -> Res<Clone> {
            let r = restore_folded_lazy(
                &host,
                VmOptions::default(),
                Arc::clone(&s.snap),
                LazyFoldOptions::default(),
            )?;
            let pages: u64 =
                s.snap.region_layout().iter().map(|r| r.1).sum::<u64>() / PAGE_SIZE as u64;
            if r.pages_done() == pages {
                // An earlier clone of this snapshot had arrived (its fetch
                // done): this one mapped the whole image.
                whole.set(whole.get() + 1);
            }
            let base = r.memory.regions()[0].host_addr().0 as *mut u8;
            keep.push(Arc::clone(&r.memory));
            arriving.borrow_mut().push(r);
            Ok(Clone { base })
        };
        let mut settle = || -> Res<()> {
            for r in arriving.borrow_mut().drain(..) {
                let st = r.wait()?;
                found.set(found.get() + st.found);
                fetched.set(fetched.get() + st.fetched);
                on_fault.set(on_fault.get() + st.on_fault);
            }
            Ok(())
        };
        let files = || store.allocated_bytes().unwrap_or(0);
        let note = || {
            format!(
                "{} of {} clones mapped a whole image; pages filled on fault {}, by fetch {}, found {}",
                whole.get(),
                plan.len(),
                on_fault.get(),
                fetched.get(),
                found.get(),
            )
        };
        let m = Method {
            name: "lazy",
            restore: &mut restore,
            files: &files,
            note: &note,
            settle: &mut settle,
        };
        rows.push(measure(&sources, &plan, &order, m)?);
        drop(keep);
    }
    {
        let mut maps: Vec<(usize, usize)> = Vec::new();
        let mut restore = |s: &Source| -> Res<Clone> {
            // SAFETY: a new private mapping of the whole file; nothing else
            // maps at the address the kernel picks.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    SIZE_BYTES,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    s.raw.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error().into());
            }
            maps.push((p as usize, SIZE_BYTES));
            Ok(Clone { base: p.cast() })
        };
        let files = || {
            sources
                .iter()
                .map(|s| memfd_blocks(s.raw.as_raw_fd()))
                .sum()
        };
        let m = Method {
            name: "map_private",
            restore: &mut restore,
            files: &files,
            note: &String::new,
            settle: &mut || Ok(()),
        };
        rows.push(measure(&sources, &plan, &order, m)?);
        for (p, len) in maps {
            // SAFETY: each is a mapping made above, unmapped once.
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
        }
    }
    {
        let store = Arc::new(FrameStore::memfd()?);
        let mut keep = Vec::new();
        let mut restore = |s: &Source| -> Res<Clone> {
            let m = GuestMemory::with_store(Arc::clone(&store), &s.snap.region_layout())?;
            restore_into(&s.snap, &m)?;
            let base = m.regions()[0].host_addr().0 as *mut u8;
            keep.push(m);
            Ok(Clone { base })
        };
        let files = || store.allocated_bytes().unwrap_or(0);
        let m = Method {
            name: "copy",
            restore: &mut restore,
            files: &files,
            note: &String::new,
            settle: &mut || Ok(()),
        };
        rows.push(measure(&sources, &plan, &order, m)?);
        drop(keep);
    }
    drop(sources);

    // The floor: the distinct content plus what the clones wrote.
    let floors: Vec<u64> = std::iter::once(0)
        .chain(STEPS)
        .map(|pct| distinct + (plan.len() * PAGES * pct / 100 * PAGE_SIZE) as u64)
        .collect();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "{:<16} {:>22} {:>22} {:>22} {:>22} {:>12} {:>12}",
        "method",
        "after reads",
        "after 1% written",
        "after 10% written",
        "after 50% written",
        "1st restore",
        "next (mean)"
    );
    for r in &rows {
        let cells: Vec<String> = r
            .bytes
            .iter()
            .zip(&floors)
            .map(|(&b, &f)| format!("{:.0} MiB ({:.3}x)", mib(b), b as f64 / f as f64))
            .collect();
        println!(
            "{:<16} {:>22} {:>22} {:>22} {:>22} {:>10.2}ms {:>10.2}ms {}",
            r.name,
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            r.first.as_secs_f64() * 1e3,
            r.rest.as_secs_f64() * 1e3,
            r.note,
        );
    }
    println!("(x: over the floor, the distinct content plus the pages written)");
    for r in &rows {
        for (when, p) in [("reads", r.parts_read), ("50%", r.parts)] {
            println!(
                "{:<16} after {when}: files {:.0} MiB, anonymous {:.0} MiB, page tables {:.1} MiB",
                r.name,
                mib(p.0),
                mib(p.1),
                mib(p.2),
            );
        }
    }
    // The pagefold rows, then map_private.
    let folded = layouts.len() + usize::from(lazy);
    let auto = layouts.iter().position(|&l| l == FoldLayout::Auto);
    for (k, f) in floors.iter().enumerate() {
        let step = match k {
            0 => "reads".to_string(),
            k => format!("{}% written", STEPS[k - 1]),
        };
        let over: Vec<String> = rows
            .iter()
            .map(|r| format!("{} {:.3}", r.name, r.bytes[k] as f64 / *f as f64))
            .collect();
        let vs: Vec<String> = rows[..folded]
            .iter()
            .map(|r| {
                let m = rows[folded].bytes[k] as f64;
                format!("{} / map_private {:.3}", r.name, r.bytes[k] as f64 / m)
            })
            .collect();
        let vs_auto = match (lazy, auto) {
            (true, Some(a)) => format!(
                "; lazy / folded {:.3}",
                rows[layouts.len()].bytes[k] as f64 / rows[a].bytes[k] as f64
            ),
            _ => String::new(),
        };
        println!(
            "after {step}: floor {:.0} MiB; over it: {}; {}{vs_auto}",
            mib(*f),
            over.join(", "),
            vs.join(", "),
        );
    }
    Ok(())
}
