//! Guest page-table walks: pagefold's [`Walker`] against the `x86_64`
//! crate's `OffsetPageTable` (`Translate::translate_addr`) on identical
//! 4-level tables in the same guest memory, plus pagefold's nested (EPT)
//! walks, which the crate does not do.
//!
//! The tables map 4096 random 4 KiB pages in the upper canonical half (a
//! kernel's direct map is there) to random frames; the crate reads them
//! through the guest memory's host mapping (its "physical memory offset"
//! is the mapping's base), pagefold through `GuestMemory`'s checked atomic
//! loads. Address lists are drawn once from a fixed seed.
//!
//! Groups (`paging/<row>`, functions `pagefold` and `x86_64`):
//! - `cold_walk`: a full walk per address, no cache on either side.
//! - `warm_translate`: pagefold with a warm [`WalkCache`] (the 512 addresses
//!   fit it) against the crate's walk (it has no cache).
//!   `Walker::translate_with`, building the whole `Translation`.
//! - `warm_lean`: the same cache and addresses through the lean path,
//!   `BoundCache::translate_pa` (bound once per pass; the address only, as
//!   the crate's `translate_addr` returns).
//! - `range_1mib`: the 256 pages of a 1 MiB virtual range: pagefold's
//!   `translate_range` (one walk, then the last-level table read in order;
//!   the range is one physical segment) against a crate walk per page; and
//!   `pagefold_cached_pages`, a cached translation per page.
//! - `nested_cold`, `nested_warm` (pagefold only): 4-level guest tables
//!   under a 4-level EPT, without and with the cache; the memory references
//!   per translation are printed beside them.
//!
//! These rows are the hot-table rows: 4096 pages need 8 table pages (32
//! KiB), so the tables sit in L1/L2 and every row is a throughput
//! (translations of a list are independent and overlap). `big.rs` adds
//! rows over guest-sized tables that miss the CPU caches, measured as
//! latencies.
//!
//! `benches/paging_ratios.sh` prints the ratios of one run. `arch.rs`
//! measures the walk of each architecture against x86's.

pub(crate) mod arch;
mod big;

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput};
use pagefold::{
    paging::{Access, EptConfig, SecondLevel, WalkCache, WalkOptions, Walker, X86Paging},
    GuestMemory, GuestPhysAddr, GuestVirtAddr,
};
use rand::{rngs::SmallRng, seq::SliceRandom, Rng, SeedableRng};
use x86_64::{
    structures::paging::{OffsetPageTable, PageTable, Translate},
    VirtAddr,
};

/// Seed of the layout and address lists.
const SEED: u64 = 0x7061_6765_7761_6c6b;
/// Pages mapped.
const PAGES: usize = 4096;
/// Addresses per measured list (fits the walk cache's 2048 entries).
const ADDRS: usize = 512;
/// Base of the mapped virtual range.
const VA_BASE: u64 = 0xffff_8880_0000_0000;
/// Guest memory: 64 MiB.
const MEM: u64 = 64 << 20;
/// Where the host side of a nested guest's physical space starts.
const NESTED_SHIFT: u64 = 32 << 20;

/// Criterion settings for this module.
pub(crate) fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

/// A bump allocator of zeroed 4 KiB table pages in guest memory.
struct Tables<'m> {
    mem: &'m GuestMemory,
    next: u64,
    /// Added to every table address when writing (the host side of a
    /// nested guest's physical space); 0 for a plain guest.
    shift: u64,
}

impl Tables<'_> {
    fn alloc(&mut self) -> u64 {
        let t = self.next;
        self.next += 4096;
        t
    }

    /// Maps the 4 KiB page at `va` to `pa` under `root` with `leaf_flags`,
    /// creating tables (present + writable, `upper_flags`) on the way.
    fn map(&mut self, root: u64, va: u64, pa: u64, levels: u32, upper: u64, leaf: u64) {
        let mut table = root;
        for level in (2..=levels).rev() {
            let at = table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
            let e: u64 = self
                .mem
                .read_obj(GuestPhysAddr(at + self.shift))
                .expect("table entry in memory");
            table = if e & 0x7 != 0 {
                e & 0x000f_ffff_ffff_f000
            } else {
                let t = self.alloc();
                self.mem
                    .write_obj(GuestPhysAddr(at + self.shift), t | upper)
                    .expect("table entry in memory");
                t
            };
        }
        let at = table + ((va >> 12) & 0x1ff) * 8;
        self.mem
            .write_obj(GuestPhysAddr(at + self.shift), pa | leaf)
            .expect("leaf entry in memory");
    }
}

struct Setup {
    mem: GuestMemory,
    plain: Walker,
    nested: Walker,
    pml4: u64,
    vas: Vec<u64>,
}

fn setup() -> Setup {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).expect("guest memory");
    let mut rng = SmallRng::seed_from_u64(SEED);
    let mut pages: Vec<u64> = (0..(1u64 << 18)).collect();
    pages.shuffle(&mut rng);
    let vas: Vec<u64> = pages[..PAGES].iter().map(|p| VA_BASE + p * 4096).collect();

    // Plain guest: tables from 1 MiB, data frames anywhere below 16 MiB.
    let mut t = Tables {
        mem: &mem,
        next: 1 << 20,
        shift: 0,
    };
    let pml4 = t.alloc();
    let frames: Vec<u64> = vas
        .iter()
        .map(|_| rng.gen_range(1..4096u64) * 4096)
        .collect();
    for (&va, &frame) in vas.iter().zip(&frames) {
        t.map(pml4, va, frame, 4, 0x3, 0x3);
    }

    // Nested guest: the same mappings in guest-physical space (tables from
    // 1 MiB, frames below 16 MiB), stored at +32 MiB in memory, and an EPT
    // (tables from 56 MiB) mapping guest-physical p to p + 32 MiB.
    let mut g = Tables {
        mem: &mem,
        next: 1 << 20,
        shift: NESTED_SHIFT,
    };
    let gpml4 = g.alloc();
    for (&va, &frame) in vas.iter().zip(&frames) {
        g.map(gpml4, va, frame, 4, 0x3, 0x3);
    }
    let mut e = Tables {
        mem: &mem,
        next: 56 << 20,
        shift: 0,
    };
    let eptp_root = e.alloc();
    for gpa in (0..(16u64 << 20)).step_by(4096) {
        // Read, write, execute; write-back memory type on the leaf.
        e.map(eptp_root, gpa, gpa + NESTED_SHIFT, 4, 0x7, 0x7 | (6 << 3));
    }
    let plain = Walker::new(X86Paging::long_mode(pml4)).expect("valid registers");
    let nested = Walker::new(X86Paging::long_mode(gpml4))
        .and_then(|w| {
            w.with_second_level(SecondLevel::Ept(EptConfig::four_level(
                GuestPhysAddr(eptp_root),
                false,
            )))
        })
        .expect("valid registers");
    Setup {
        mem,
        plain,
        nested,
        pml4,
        vas,
    }
}

/// Every row.
pub(crate) fn benches(c: &mut Criterion) {
    let s = setup();
    let mut rng = SmallRng::seed_from_u64(SEED ^ 1);
    let addrs: Vec<u64> = s
        .vas
        .choose_multiple(&mut rng, ADDRS)
        .map(|va| va + rng.gen_range(0..4096))
        .collect();
    let host = s.mem.host_address(GuestPhysAddr(0)).expect("mapped").0;
    // (1) `host + pml4` is the page-aligned PML4 inside the guest memory's
    // live mapping, which outlives `table`; (2) nothing else accesses guest
    // memory while the crate holds this reference (the benchmark is
    // single-threaded and pagefold only reads); (3) a 4 KiB page is a valid
    // `PageTable` (any bits are valid entries).
    // SAFETY: (1)-(3) above.
    let table = unsafe { &mut *((host + s.pml4) as *mut PageTable) };
    let crate_pt = unsafe_offset_table(table, host);

    // Both sides agree before anything is measured.
    for &va in &addrs {
        let ours = s
            .plain
            .translate(&s.mem, GuestVirtAddr(va), Access::read())
            .expect("mapped")
            .gpa;
        let theirs = crate_pt
            .translate_addr(VirtAddr::new(va))
            .expect("mapped")
            .as_u64();
        assert_eq!(ours, GuestPhysAddr(theirs), "translation of {va:#x}");
        let nested = s
            .nested
            .translate(&s.mem, GuestVirtAddr(va), Access::read())
            .expect("mapped");
        assert_eq!(nested.pa, GuestPhysAddr(ours.0 + NESTED_SHIFT));
        assert_eq!(nested.memory_refs, 24);
    }

    let n = addrs.len() as u64;
    // One pass over the list on each side, shared by criterion's rows and
    // the paired ratio (the closures only borrow, so they are `Copy`).
    let crate_pass = || {
        for &va in &addrs {
            black_box(crate_pt.translate_addr(VirtAddr::new(black_box(va))));
        }
    };
    let cold_pass = || {
        for &va in &addrs {
            black_box(
                s.plain
                    .translate(&s.mem, black_box(GuestVirtAddr(va)), Access::read())
                    .map(|t| t.pa.0)
                    .ok(),
            );
        }
    };
    let mut g = c.benchmark_group("paging/cold_walk");
    g.throughput(Throughput::Elements(n));
    g.bench_function("pagefold", |b| b.iter(cold_pass));
    g.bench_function("x86_64", |b| b.iter(crate_pass));
    g.finish();
    paired("cold_walk", addrs.len(), 2001, cold_pass, crate_pass);

    let mut cache = WalkCache::new();
    let opts = WalkOptions::default();
    let warm_pass = |cache: &mut WalkCache| {
        for &va in &addrs {
            black_box(
                s.plain
                    .translate_with(
                        &s.mem,
                        black_box(GuestVirtAddr(va)),
                        Access::read(),
                        opts,
                        Some(cache),
                    )
                    .map(|t| t.pa.0)
                    .ok(),
            );
        }
    };
    let before = cache.stats();
    let mut g = c.benchmark_group("paging/warm_translate");
    g.throughput(Throughput::Elements(n));
    g.bench_function("pagefold", |b| b.iter(|| warm_pass(&mut cache)));
    g.bench_function("x86_64", |b| b.iter(crate_pass));
    g.finish();
    paired(
        "warm_translate",
        addrs.len(),
        2001,
        || warm_pass(&mut cache),
        crate_pass,
    );

    // A 1 MiB range: map it first (256 consecutive pages after the list's
    // first page are not all mapped, so use a freshly mapped range).
    let after = cache.stats();
    eprintln!(
        "paging/warm_translate: {} hits, {} misses in the group (warm-up included)",
        after.hits - before.hits,
        after.misses - before.misses
    );
    // The same addresses through the lean path (the cache bound once per
    // pass): the address only, as the crate's `translate_addr`.
    for &va in &addrs {
        assert_eq!(
            cache
                .bind(&s.plain)
                .translate_pa(&s.mem, GuestVirtAddr(va), Access::read(), opts),
            s.plain
                .translate(&s.mem, GuestVirtAddr(va), Access::read())
                .map(|t| t.pa),
        );
    }
    let lean_pass = |cache: &mut WalkCache| {
        let mut b = cache.bind(&s.plain);
        for &va in &addrs {
            black_box(
                b.translate_pa(&s.mem, black_box(GuestVirtAddr(va)), Access::read(), opts)
                    .ok(),
            );
        }
    };
    let before = cache.stats();
    let mut g = c.benchmark_group("paging/warm_lean");
    g.throughput(Throughput::Elements(n));
    g.bench_function("pagefold", |b| b.iter(|| lean_pass(&mut cache)));
    g.bench_function("x86_64", |b| b.iter(crate_pass));
    g.finish();
    paired(
        "warm_lean",
        addrs.len(),
        2001,
        || lean_pass(&mut cache),
        crate_pass,
    );
    // The list is random pages: a set that draws more than its 4 ways
    // misses, on both rows alike.
    let after = cache.stats();
    eprintln!(
        "paging/warm_lean: {} hits, {} misses in the group (warm-up included)",
        after.hits - before.hits,
        after.misses - before.misses
    );

    let range_va = VA_BASE - (1 << 20);
    {
        let mut t = Tables {
            mem: &s.mem,
            next: 40 << 20,
            shift: 0,
        };
        for k in 0..256u64 {
            t.map(
                s.pml4,
                range_va + k * 4096,
                (20 << 20) + k * 4096,
                4,
                0x3,
                0x3,
            );
        }
    }
    let mut range_cache = WalkCache::new();
    let mut g = c.benchmark_group("paging/range_1mib");
    g.throughput(Throughput::Elements(256));
    g.bench_function("pagefold", |b| {
        b.iter(|| {
            for seg in s.plain.translate_range(
                &s.mem,
                black_box(GuestVirtAddr(range_va)),
                1 << 20,
                Access::read(),
            ) {
                black_box(seg.map(|g| g.pa).ok());
            }
        })
    });
    g.bench_function("pagefold_cached_pages", |b| {
        b.iter(|| {
            for k in 0..256u64 {
                let va = black_box(range_va + k * 4096);
                black_box(
                    s.plain
                        .translate_with(
                            &s.mem,
                            GuestVirtAddr(va),
                            Access::read(),
                            opts,
                            Some(&mut range_cache),
                        )
                        .map(|t| t.pa.0)
                        .ok(),
                );
            }
        })
    });
    g.bench_function("x86_64", |b| {
        b.iter(|| {
            for k in 0..256u64 {
                let va = black_box(range_va + k * 4096);
                black_box(crate_pt.translate_addr(VirtAddr::new(va)));
            }
        })
    });
    g.finish();
    paired(
        "range_1mib",
        256,
        2001,
        || {
            for seg in s.plain.translate_range(
                &s.mem,
                black_box(GuestVirtAddr(range_va)),
                1 << 20,
                Access::read(),
            ) {
                black_box(seg.map(|g| g.pa).ok());
            }
        },
        || {
            for k in 0..256u64 {
                let va = black_box(range_va + k * 4096);
                black_box(crate_pt.translate_addr(VirtAddr::new(va)));
            }
        },
    );

    // Nested walks, with their memory references.
    let cold_refs: u64 = addrs
        .iter()
        .map(|&va| {
            s.nested
                .translate(&s.mem, GuestVirtAddr(va), Access::read())
                .map_or(0, |t| u64::from(t.memory_refs))
        })
        .sum();
    let mut ncache = WalkCache::new();
    for &va in &addrs {
        let _ = s.nested.translate_with(
            &s.mem,
            GuestVirtAddr(va),
            Access::read(),
            opts,
            Some(&mut ncache),
        );
    }
    let warm_refs: u64 = addrs
        .iter()
        .map(|&va| {
            s.nested
                .translate_with(
                    &s.mem,
                    GuestVirtAddr(va),
                    Access::read(),
                    opts,
                    Some(&mut ncache),
                )
                .map_or(0, |t| u64::from(t.memory_refs))
        })
        .sum();
    // Fresh addresses under a cache warmed by the list: what upper-level
    // and second-level caching save on a TLB miss.
    let mut rng3 = SmallRng::seed_from_u64(SEED ^ 2);
    let fresh: Vec<u64> = s.vas.choose_multiple(&mut rng3, ADDRS).copied().collect();
    let miss_refs: u64 = fresh
        .iter()
        .map(|&va| {
            s.nested
                .translate_with(
                    &s.mem,
                    GuestVirtAddr(va),
                    Access::read(),
                    opts,
                    Some(&mut ncache),
                )
                .map_or(0, |t| u64::from(t.memory_refs))
        })
        .sum();
    eprintln!(
        "paging/nested memory references per translation: cold {:.2}, warm {:.2}, \
         other pages under a warm cache {:.2}",
        cold_refs as f64 / n as f64,
        warm_refs as f64 / n as f64,
        miss_refs as f64 / fresh.len() as f64
    );
    let mut g = c.benchmark_group("paging/nested_cold");
    g.throughput(Throughput::Elements(n));
    g.bench_function("pagefold", |b| {
        b.iter(|| {
            for &va in &addrs {
                black_box(
                    s.nested
                        .translate(&s.mem, black_box(GuestVirtAddr(va)), Access::read())
                        .map(|t| t.pa.0)
                        .ok(),
                );
            }
        })
    });
    g.finish();
    let mut g = c.benchmark_group("paging/nested_warm");
    g.throughput(Throughput::Elements(n));
    g.bench_function("pagefold", |b| {
        b.iter(|| {
            for &va in &addrs {
                black_box(
                    s.nested
                        .translate_with(
                            &s.mem,
                            black_box(GuestVirtAddr(va)),
                            Access::read(),
                            opts,
                            Some(&mut ncache),
                        )
                        .map(|t| t.pa.0)
                        .ok(),
                );
            }
        })
    });
    g.finish();

    big::benches(c);
}

/// Pagefold's pass over a list and the crate's, alternately (`pairs`
/// times, each side first every other time, after one pair not counted):
/// prints the median over pairs of crate time / pagefold time, and each
/// side's median pass time per translation. Both sides then see the same
/// load on the machine, which the two criterion functions, measured one
/// after the other, do not; `benches/paging_ratios.sh` shows it beside
/// criterion's ratio.
pub(crate) fn paired(
    row: &str,
    n: usize,
    pairs: usize,
    mut ours: impl FnMut(),
    mut theirs: impl FnMut(),
) {
    fn time(f: &mut impl FnMut()) -> f64 {
        let t = Instant::now();
        f();
        t.elapsed().as_nanos() as f64
    }
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    let _ = (time(&mut ours), time(&mut theirs));
    let (mut ratio, mut pf, mut xc) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        let (p, x) = if i % 2 == 0 {
            let p = time(&mut ours);
            (p, time(&mut theirs))
        } else {
            let x = time(&mut theirs);
            (time(&mut ours), x)
        };
        ratio.push(x / p);
        pf.push(p / n as f64);
        xc.push(x / n as f64);
    }
    eprintln!(
        "paging/{row} paired: ratio {:.2} (pagefold {:.2} ns, x86_64 {:.2} ns per translation; \
         medians of {pairs} alternating passes)",
        median(ratio),
        median(pf),
        median(xc)
    );
}

/// The crate's table over guest memory whose physical address 0 is at host
/// address `host`.
fn unsafe_offset_table(table: &mut PageTable, host: u64) -> OffsetPageTable<'_> {
    // SAFETY: (1) every physical address the tables hold is below `MEM` and
    // so maps to `host + pa` inside the guest memory's live mapping; (2)
    // `table` is the level-4 table at that mapping, as required.
    unsafe { OffsetPageTable::new(table, VirtAddr::new(host)) }
}
