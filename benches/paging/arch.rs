//! The walk per architecture against the x86 walk on the same machine:
//! identical layouts (4096 random 4 KiB pages under 4-level tables, the
//! same virtual addresses and frames) written in each architecture's
//! format — x86-64 4-level paging, AArch64 with the 4 KiB granule and
//! 48-bit VAs — and translated by the same `Walker`.
//!
//! Groups (`paging_arch/<row>`, one function per architecture, `x86_64`
//! the baseline):
//! - `cold`: a full walk per address, no cache.
//! - `warm`: a warm `WalkCache`, the full `Translation`.
//!
//! `benches/paging_arch_ratios.sh` prints each architecture's time over
//! x86's from one run.

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use pagefold::{
    paging::{Aarch64Paging, Access, Granule, WalkCache, WalkOptions, Walker, X86Paging},
    GuestMemory, GuestPhysAddr, GuestVirtAddr,
};
use rand::{rngs::SmallRng, seq::SliceRandom, Rng, SeedableRng};

/// Seed of the layout and address lists.
const SEED: u64 = 0x6172_6368_7761_6c6b;
/// Pages mapped.
const PAGES: usize = 4096;
/// Addresses per measured list (fits the walk cache).
const ADDRS: usize = 512;
/// Base of the mapped range: upper half on every architecture (x86's
/// direct map; AArch64's TTBR1 range).
const VA_BASE: u64 = 0xffff_8880_0000_0000;
/// Guest memory: 64 MiB.
const MEM: u64 = 64 << 20;

/// How one architecture writes a 4-level, 4 KiB table entry.
#[derive(Clone, Copy)]
struct Encoding {
    /// A table entry pointing at the table at `pa`.
    table: fn(u64) -> u64,
    /// A leaf entry mapping the page at `pa` (readable and writable at the
    /// most privileged level, accessed).
    leaf: fn(u64) -> u64,
    /// The table address an entry holds; 0 for an empty entry.
    next: fn(u64) -> u64,
}

const X86: Encoding = Encoding {
    table: |pa| pa | 0x3,
    leaf: |pa| pa | 0x23,
    next: |e| e & 0x000f_ffff_ffff_f000,
};

const AARCH64: Encoding = Encoding {
    table: |pa| pa | 0x3,
    // Page descriptor, AF; AP = 00 (EL1 read/write).
    leaf: |pa| pa | 0x3 | 1 << 10,
    next: |e| e & 0x0000_ffff_ffff_f000,
};

/// Writes the layout's 4-level tables in one encoding, from `base` in
/// guest memory; returns the root.
fn write_tables(mem: &GuestMemory, enc: Encoding, base: u64, pages: &[(u64, u64)]) -> u64 {
    let mut next = base;
    let mut alloc = || {
        let t = next;
        next += 4096;
        t
    };
    let root = alloc();
    for &(va, pa) in pages {
        let mut table = root;
        for level in (2..=4u32).rev() {
            let at = table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
            let e: u64 = mem.read_obj(GuestPhysAddr(at)).expect("entry in memory");
            table = if e != 0 {
                (enc.next)(e)
            } else {
                let t = alloc();
                mem.write_obj(GuestPhysAddr(at), (enc.table)(t))
                    .expect("entry in memory");
                t
            };
        }
        let at = table + ((va >> 12) & 0x1ff) * 8;
        mem.write_obj(GuestPhysAddr(at), (enc.leaf)(pa))
            .expect("entry in memory");
    }
    root
}

/// Every row.
pub(crate) fn benches(c: &mut Criterion) {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).expect("guest memory");
    let mut rng = SmallRng::seed_from_u64(SEED);
    let mut slots: Vec<u64> = (0..(1u64 << 18)).collect();
    slots.shuffle(&mut rng);
    let pages: Vec<(u64, u64)> = slots[..PAGES]
        .iter()
        .map(|p| (VA_BASE + p * 4096, rng.gen_range(1..4096u64) * 4096))
        .collect();
    let x86_root = write_tables(&mem, X86, 16 << 20, &pages);
    let arm_root = write_tables(&mem, AARCH64, 24 << 20, &pages);
    let walkers = [
        (
            "x86_64",
            Walker::new(X86Paging::long_mode(x86_root)).expect("valid registers"),
        ),
        (
            "aarch64",
            Walker::new(Aarch64Paging::new(Granule::K4, 0, arm_root)).expect("valid registers"),
        ),
    ];
    let addrs: Vec<u64> = pages
        .choose_multiple(&mut rng, ADDRS)
        .map(|&(va, _)| va + rng.gen_range(0..4096))
        .collect();
    // Every walker agrees with the layout before anything is measured.
    for (name, w) in &walkers {
        for &va in &addrs {
            let t = w
                .translate(&mem, GuestVirtAddr(va), Access::read())
                .unwrap_or_else(|f| panic!("{name}: {va:#x}: {f}"));
            let frame = pages
                .iter()
                .find(|&&(v, _)| v == va & !0xfff)
                .map(|&(_, pa)| pa);
            assert_eq!(Some(t.gpa.0 & !0xfff), frame, "{name}: {va:#x}");
            assert_eq!(t.memory_refs, 4, "{name}: {va:#x}");
        }
    }

    let n = addrs.len() as u64;
    let mut g = c.benchmark_group("paging_arch/cold");
    g.throughput(Throughput::Elements(n));
    for (name, w) in &walkers {
        g.bench_function(*name, |b| {
            b.iter(|| {
                for &va in &addrs {
                    black_box(
                        w.translate(&mem, black_box(GuestVirtAddr(va)), Access::read())
                            .map(|t| t.pa.0)
                            .ok(),
                    );
                }
            })
        });
    }
    g.finish();

    let opts = WalkOptions::default();
    let mut g = c.benchmark_group("paging_arch/warm");
    g.throughput(Throughput::Elements(n));
    for (name, w) in &walkers {
        let mut cache = WalkCache::new();
        g.bench_function(*name, |b| {
            b.iter(|| {
                for &va in &addrs {
                    black_box(
                        w.translate_with(
                            &mem,
                            black_box(GuestVirtAddr(va)),
                            Access::read(),
                            opts,
                            Some(&mut cache),
                        )
                        .map(|t| t.pa.0)
                        .ok(),
                    );
                }
            })
        });
        let s = cache.stats();
        eprintln!(
            "paging_arch/warm {name}: {} hits, {} misses (warm-up included)",
            s.hits, s.misses
        );
    }
    g.finish();
}
