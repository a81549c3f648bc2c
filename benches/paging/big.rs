//! Walks over tables the size of a real guest's, which do not sit in the
//! CPU caches: pagefold's [`Walker`] against the `x86_64` crate's
//! `OffsetPageTable::translate_addr` on identical 4-level tables.
//!
//! One table set (one PML4) maps two ranges:
//! - 4 GiB of 4 KiB pages at `BIG_4K_VA`: 1M last-level entries in 2048
//!   page tables (8 MiB) under 4 page directories;
//! - 1 TiB of 2 MiB pages at `BIG_2M_VA`: 512K entries in 1024 page
//!   directories (4 MiB).
//!
//! Every table page sits at a random frame of a 1 GiB guest memory (about
//! 12 MiB of it is tables; the rest is never touched). Leaf entries map the
//! ranges linearly onto guest-physical 0..4 GiB and 0..1 TiB, mostly
//! outside guest memory: neither walker reads the data frames (pagefold's
//! walk reads table entries only; the crate's `translate` dereferences only
//! next-level tables), so they need not exist.
//!
//! Each row is a latency: every address depends on the previous
//! translation's result (`va | (prev & zero)`, `zero` hidden behind
//! `black_box`), so walks cannot overlap, as in a VMM that uses each
//! translation before asking the next. Both sides run the same address
//! list in the same order through the same loop.
//!
//! Groups (`paging/<row>`, functions `pagefold` and `x86_64`):
//! - `big_cold_4k`, `big_cold_2m`: `COLD_ADDRS` random addresses over the
//!   whole range, a full walk each, no walk cache. The 4 KiB list touches
//!   about 4 MiB of distinct last-level lines per pass, more than this
//!   machine's 2 MiB L2, so last-level entries come from L3 (or further).
//! - `big_warm_4k`, `big_warm_2m`: pagefold translating through a warm
//!   [`WalkCache`] (every translation a hit, checked before and after), the
//!   crate walking the same addresses. The list is random pages over the
//!   whole range that fit the cache: it holds 2048 translations in 512 sets
//!   of 4 ways, so of `WARM_CANDIDATES` random pages those whose set would
//!   hold more than 4 are dropped (about 15%). `Walker::translate_with`,
//!   which builds the whole `Translation` (page size, level, permissions,
//!   attributes).
//! - `big_warm_lean_4k`, `big_warm_lean_2m`: the same list through the lean
//!   path, `BoundCache::translate_pa` (the cache bound to the walker once
//!   per pass), which returns the address only, as the crate's
//!   `translate_addr` does.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput};
use pagefold::{
    paging::{Access, BoundCache, WalkCache, WalkOptions, Walker, X86Paging},
    GuestMemory, GuestPhysAddr, GuestVirtAddr,
};
use rand::{rngs::SmallRng, seq::SliceRandom, Rng, SeedableRng};
use x86_64::{
    structures::paging::{OffsetPageTable, PageTable, Translate},
    VirtAddr,
};

/// Seed of the layout and address lists.
const SEED: u64 = 0x6269_6774_6162_6c65;
/// Guest memory: 1 GiB, tables scattered in it.
const BIG_MEM: u64 = 1 << 30;
/// 4 GiB of 4 KiB pages from here (PML4 slot 273, a direct map's).
const BIG_4K_VA: u64 = 0xffff_8880_0000_0000;
const BIG_4K_SPAN: u64 = 4 << 30;
/// 1 TiB of 2 MiB pages from here (PML4 slots 384 and 385).
const BIG_2M_VA: u64 = 0xffff_c000_0000_0000;
const BIG_2M_SPAN: u64 = 1 << 40;
/// Addresses per cold pass.
const COLD_ADDRS: usize = 1 << 16;
/// Random pages drawn for a warm list, before dropping those that do not
/// fit the cache.
const WARM_CANDIDATES: usize = 1024;

/// Table pages at random frames of guest memory.
struct Scatter<'m> {
    mem: &'m GuestMemory,
    /// Free frames (guest-physical addresses), in random order.
    free: Vec<u64>,
    tables: usize,
}

impl Scatter<'_> {
    fn alloc(&mut self) -> u64 {
        self.tables += 1;
        self.free.pop().expect("guest memory holds the tables")
    }

    /// Maps `va` to `pa` with a leaf at `leaf_level` (1: 4 KiB, 2: 2 MiB)
    /// under `root`, creating tables (present + writable) on the way.
    fn map(&mut self, root: u64, va: u64, pa: u64, leaf_level: u32) {
        let mut table = root;
        for level in (leaf_level + 1..=4).rev() {
            let at = GuestPhysAddr(table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8);
            let e: u64 = self.mem.read_obj(at).expect("table entry in memory");
            table = if e & 1 != 0 {
                e & 0x000f_ffff_ffff_f000
            } else {
                let t = self.alloc();
                self.mem.write_obj(at, t | 0x3).expect("table entry");
                t
            };
        }
        let at = GuestPhysAddr(table + ((va >> (12 + 9 * (leaf_level - 1))) & 0x1ff) * 8);
        let large = if leaf_level > 1 { 0x80 } else { 0 };
        self.mem
            .write_obj(at, pa | 0x3 | large)
            .expect("leaf entry in memory");
    }
}

struct Big {
    mem: GuestMemory,
    walker: Walker,
    pml4: u64,
}

fn setup() -> Big {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), BIG_MEM)]).expect("guest memory");
    let mut rng = SmallRng::seed_from_u64(SEED);
    let mut free: Vec<u64> = (1..BIG_MEM / 4096).map(|f| f * 4096).collect();
    free.shuffle(&mut rng);
    let mut s = Scatter {
        mem: &mem,
        free,
        tables: 0,
    };
    let pml4 = s.alloc();
    for off in (0..BIG_4K_SPAN).step_by(4096) {
        s.map(pml4, BIG_4K_VA + off, off, 1);
    }
    for off in (0..BIG_2M_SPAN).step_by(2 << 20) {
        s.map(pml4, BIG_2M_VA + off, off, 2);
    }
    eprintln!(
        "paging/big: {} table pages ({} MiB) at random frames of {} MiB of guest memory",
        s.tables,
        (s.tables * 4096) >> 20,
        BIG_MEM >> 20
    );
    let walker = Walker::new(X86Paging::long_mode(pml4)).expect("valid registers");
    Big { mem, walker, pml4 }
}

/// Translates `addrs` in order, each address waiting for the previous
/// result: `zero` is 0, but the compiler cannot know it, so it cannot start
/// a walk before the previous one ended (nor can the processor).
#[inline(always)]
fn chain(addrs: &[u64], mut translate: impl FnMut(u64) -> u64) -> u64 {
    let zero = black_box(0u64);
    let mut prev = 0;
    for &va in addrs {
        prev = translate(va | (prev & zero));
    }
    prev
}

/// Times `iters` passes of `pass` (criterion's `iter_custom`).
fn passes(iters: u64, mut pass: impl FnMut() -> u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        black_box(pass());
    }
    start.elapsed()
}

/// `n` random addresses over `[base, base + span)`.
fn random_addrs(rng: &mut SmallRng, base: u64, span: u64, n: usize) -> Vec<u64> {
    (0..n).map(|_| base + rng.gen_range(0..span)).collect()
}

/// Random addresses in distinct pages of `1 << shift` bytes over the range,
/// minus those that do not stay in `cache` when the list is translated in
/// a loop (their set holds more than its ways); every translation of the
/// list through `cache` then hits.
fn warm_list(
    big: &Big,
    cache: &mut WalkCache,
    rng: &mut SmallRng,
    base: u64,
    span: u64,
    shift: u32,
) -> Vec<u64> {
    let pages: Vec<u64> = (0..span >> shift).collect();
    let mut list: Vec<u64> = pages
        .choose_multiple(rng, WARM_CANDIDATES)
        .map(|p| base + (p << shift) + rng.gen_range(0..1u64 << shift))
        .collect();
    let opts = WalkOptions::default();
    let translate = |c: &mut WalkCache, va: u64| {
        big.walker
            .translate_with(&big.mem, GuestVirtAddr(va), Access::read(), opts, Some(c))
            .expect("mapped");
    };
    loop {
        for &va in &list {
            translate(cache, va);
        }
        let before = list.len();
        list.retain(|&va| {
            let misses = cache.stats().misses;
            translate(cache, va);
            cache.stats().misses == misses
        });
        if list.len() == before {
            return list;
        }
    }
}

/// Every row.
pub(crate) fn benches(c: &mut Criterion) {
    let big = setup();
    let host = big.mem.host_address(GuestPhysAddr(0)).expect("mapped").0;
    // (1) `host + pml4` is the page-aligned PML4 inside the guest memory's
    // live mapping, which outlives `table`; (2) nothing else accesses guest
    // memory while the crate holds this reference (the benchmark is
    // single-threaded and pagefold only reads); (3) a 4 KiB page is a valid
    // `PageTable` (any bits are valid entries).
    // SAFETY: (1)-(3) above.
    let table = unsafe { &mut *((host + big.pml4) as *mut PageTable) };
    // SAFETY: every table address the tables hold is below `BIG_MEM` and so
    // maps to `host + pa` inside the guest memory's live mapping (leaf
    // frames are never dereferenced); `table` is the level-4 table there.
    let crate_pt = unsafe { OffsetPageTable::new(table, VirtAddr::new(host)) };

    let mut rng = SmallRng::seed_from_u64(SEED ^ 1);
    let opts = WalkOptions::default();
    for (name, base, span, shift) in [
        ("4k", BIG_4K_VA, BIG_4K_SPAN, 12),
        ("2m", BIG_2M_VA, BIG_2M_SPAN, 21),
    ] {
        let cold = random_addrs(&mut rng, base, span, COLD_ADDRS);
        let mut cache = WalkCache::new();
        let warm = warm_list(&big, &mut cache, &mut rng, base, span, shift);

        // Both sides agree before anything is measured.
        for &va in cold.iter().chain(&warm) {
            let ours = big
                .walker
                .translate(&big.mem, GuestVirtAddr(va), Access::read())
                .expect("mapped");
            let theirs = crate_pt.translate_addr(VirtAddr::new(va)).expect("mapped");
            assert_eq!(
                ours.pa,
                GuestPhysAddr(theirs.as_u64()),
                "translation of {va:#x}"
            );
            assert_eq!(ours.pa, GuestPhysAddr(va - base), "linear map");
            assert_eq!(ours.page_size, 1 << shift);
        }

        let ours = |va| {
            big.walker
                .translate(&big.mem, GuestVirtAddr(va), Access::read())
                .map_or(0, |t| t.pa.0)
        };
        let theirs = |va| {
            crate_pt
                .translate_addr(VirtAddr::new(va))
                .map_or(0, |p| p.as_u64())
        };

        let mut g = c.benchmark_group(format!("paging/big_cold_{name}"));
        g.throughput(Throughput::Elements(cold.len() as u64));
        g.bench_function("pagefold", |b| {
            b.iter_custom(|iters| passes(iters, || chain(black_box(&cold), ours)))
        });
        g.bench_function("x86_64", |b| {
            b.iter_custom(|iters| passes(iters, || chain(black_box(&cold), theirs)))
        });
        g.finish();
        super::paired(
            &format!("big_cold_{name}"),
            cold.len(),
            101,
            || {
                black_box(chain(black_box(&cold), ours));
            },
            || {
                black_box(chain(black_box(&cold), theirs));
            },
        );

        let before = cache.stats();
        let mut g = c.benchmark_group(format!("paging/big_warm_{name}"));
        g.throughput(Throughput::Elements(warm.len() as u64));
        g.bench_function("pagefold", |b| {
            b.iter_custom(|iters| {
                passes(iters, || {
                    chain(black_box(&warm), |va| {
                        big.walker
                            .translate_with(
                                &big.mem,
                                GuestVirtAddr(va),
                                Access::read(),
                                opts,
                                Some(&mut cache),
                            )
                            .map_or(0, |t| t.pa.0)
                    })
                })
            })
        });
        g.bench_function("x86_64", |b| {
            b.iter_custom(|iters| passes(iters, || chain(black_box(&warm), theirs)))
        });
        g.finish();
        super::paired(
            &format!("big_warm_{name}"),
            warm.len(),
            2001,
            || {
                black_box(chain(black_box(&warm), |va| {
                    big.walker
                        .translate_with(
                            &big.mem,
                            GuestVirtAddr(va),
                            Access::read(),
                            opts,
                            Some(&mut cache),
                        )
                        .map_or(0, |t| t.pa.0)
                }));
            },
            || {
                black_box(chain(black_box(&warm), theirs));
            },
        );
        let stats = cache.stats();
        assert_eq!(stats.misses, before.misses, "every warm translation hit");
        eprintln!(
            "paging/big_warm_{name}: {} addresses in distinct pages; {} hits and no miss \
             in the group (warm-up included)",
            warm.len(),
            stats.hits - before.hits
        );

        // The lean path over the same list and cache: the address only.
        let lean_pass = |b: &mut BoundCache<'_>| {
            chain(black_box(&warm), |va| {
                b.translate_pa(&big.mem, GuestVirtAddr(va), Access::read(), opts)
                    .map_or(0, |p| p.0)
            })
        };
        for &va in &warm {
            let full = big
                .walker
                .translate(&big.mem, GuestVirtAddr(va), Access::read());
            let lean = cache.bind(&big.walker).translate_pa(
                &big.mem,
                GuestVirtAddr(va),
                Access::read(),
                opts,
            );
            assert_eq!(lean, full.map(|t| t.pa), "lean translation of {va:#x}");
        }
        let before = cache.stats();
        let mut g = c.benchmark_group(format!("paging/big_warm_lean_{name}"));
        g.throughput(Throughput::Elements(warm.len() as u64));
        g.bench_function("pagefold", |b| {
            b.iter_custom(|iters| passes(iters, || lean_pass(&mut cache.bind(&big.walker))))
        });
        g.bench_function("x86_64", |b| {
            b.iter_custom(|iters| passes(iters, || chain(black_box(&warm), theirs)))
        });
        g.finish();
        super::paired(
            &format!("big_warm_lean_{name}"),
            warm.len(),
            2001,
            || {
                black_box(lean_pass(&mut cache.bind(&big.walker)));
            },
            || {
                black_box(chain(black_box(&warm), theirs));
            },
        );
        let stats = cache.stats();
        assert_eq!(stats.misses, before.misses, "every lean translation hit");
        eprintln!(
            "paging/big_warm_lean_{name}: {} hits and no miss in the group (warm-up included)",
            stats.hits - before.hits
        );
    }
}
