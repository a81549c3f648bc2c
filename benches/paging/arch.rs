//! The walk per architecture against the x86 walk on the same machine:
//! identical layouts (4096 random 4 KiB pages under 4-level tables, the
//! same virtual addresses and frames) written in each architecture's
//! format — x86-64 4-level paging, AArch64 with the 4 KiB granule and
//! 48-bit VAs, RISC-V Sv48 — and translated by the same `Walker`; and the
//! nested walk, the same guest tables under a 4-level second level mapping
//! guest-physical `p` to `p + 32 MiB` (EPT, AArch64 stage 2, the Sv48x4 G
//! stage): 24 memory references cold.
//!
//! Groups (`paging_arch/<row>`, one function per architecture, `x86_64`
//! the baseline):
//! - `cold`: a full walk per address, no cache.
//! - `warm`: a warm `WalkCache`, the full `Translation`.
//! - `nested_cold`, `nested_warm`: the two-stage walk, without and with
//!   the cache.
//!
//! `benches/paging_arch_ratios.sh` prints each architecture's time over
//! x86's from one run.

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use pagefold::{
    paging::{
        Aarch64Paging, Aarch64Stage2, Access, EptConfig, Granule, RiscvGStage, RiscvMode,
        RiscvPaging, SecondLevel, WalkCache, WalkOptions, Walker, X86Paging,
    },
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
/// Guest memory: 128 MiB.
const MEM: u64 = 128 << 20;
/// The second level maps guest-physical `p` to `p + NESTED_SHIFT`.
const NESTED_SHIFT: u64 = 32 << 20;
/// Guest-physical memory the second level maps.
const NESTED_GUEST: u64 = 32 << 20;

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

const RISCV: Encoding = Encoding {
    table: |pa| (pa >> 12) << 10 | 1,
    // V, R, W, A, D.
    leaf: |pa| (pa >> 12) << 10 | 0xc7,
    next: |e| ((e >> 10) & ((1 << 44) - 1)) << 12,
};

/// Second-level encodings: EPT (RWX, write-back), AArch64 stage 2 (AF,
/// S2AP read/write, normal memory), the G stage (V, R, W, X, U, A, D).
const EPT: Encoding = Encoding {
    table: |pa| pa | 0x7,
    leaf: |pa| pa | 0x7 | 6 << 3,
    next: |e| e & 0x000f_ffff_ffff_f000,
};

const STAGE2: Encoding = Encoding {
    table: |pa| pa | 0x3,
    leaf: |pa| pa | 0x3 | 1 << 10 | 3 << 6 | 0xf << 2,
    next: |e| e & 0x0000_ffff_ffff_f000,
};

const G_STAGE: Encoding = Encoding {
    table: |pa| (pa >> 12) << 10 | 1,
    leaf: |pa| (pa >> 12) << 10 | 0xdf,
    next: |e| ((e >> 10) & ((1 << 44) - 1)) << 12,
};

/// Writes 4-level tables mapping `pages` in one encoding, tables from
/// `base` (addresses as the tables name them, stored at `+ offset` in
/// memory; `root_bits` index the root: 9, or 11 for the G stage's 16 KiB
/// root); returns the root.
fn write_tables(
    mem: &GuestMemory,
    enc: Encoding,
    base: u64,
    offset: u64,
    root_bits: u32,
    pages: &[(u64, u64)],
) -> u64 {
    let mut next = base;
    let mut alloc = |size: u64| {
        let t = next;
        next += size;
        t
    };
    let root = alloc(8 << root_bits);
    for &(va, pa) in pages {
        let mut table = root;
        for level in (2..=4u32).rev() {
            let bits = if level == 4 { root_bits } else { 9 };
            let at = table + ((va >> (12 + 9 * (level - 1))) & ((1 << bits) - 1)) * 8;
            let e: u64 = mem
                .read_obj(GuestPhysAddr(at + offset))
                .expect("entry in memory");
            table = if e != 0 {
                (enc.next)(e)
            } else {
                let t = alloc(4096);
                mem.write_obj(GuestPhysAddr(at + offset), (enc.table)(t))
                    .expect("entry in memory");
                t
            };
        }
        let at = table + ((va >> 12) & 0x1ff) * 8;
        mem.write_obj(GuestPhysAddr(at + offset), (enc.leaf)(pa))
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
    let x86_root = write_tables(&mem, X86, 16 << 20, 0, 9, &pages);
    let arm_root = write_tables(&mem, AARCH64, 20 << 20, 0, 9, &pages);
    let rv_root = write_tables(&mem, RISCV, 24 << 20, 0, 9, &pages);
    let walkers = [
        (
            "x86_64",
            Walker::new(X86Paging::long_mode(x86_root)).expect("valid registers"),
        ),
        (
            "aarch64",
            Walker::new(Aarch64Paging::new(Granule::K4, 0, arm_root)).expect("valid registers"),
        ),
        (
            "riscv64",
            Walker::new(RiscvPaging::new(RiscvMode::Sv48, rv_root)).expect("valid registers"),
        ),
    ];
    // Nested: each architecture's guest tables (from guest-physical 16
    // MiB, stored at +32 MiB) under a second level (from 80 MiB) mapping
    // the first 32 MiB of guest-physical memory to +32 MiB.
    let identity: Vec<(u64, u64)> = (0..NESTED_GUEST)
        .step_by(4096)
        .map(|gpa| (gpa, gpa + NESTED_SHIFT))
        .collect();
    let g_x86 = write_tables(&mem, X86, 16 << 20, NESTED_SHIFT, 9, &pages);
    let g_arm = write_tables(&mem, AARCH64, 20 << 20, NESTED_SHIFT, 9, &pages);
    let g_rv = write_tables(&mem, RISCV, 24 << 20, NESTED_SHIFT, 9, &pages);
    let ept = write_tables(&mem, EPT, 80 << 20, 0, 9, &identity);
    let s2 = write_tables(&mem, STAGE2, 88 << 20, 0, 9, &identity);
    let gst = write_tables(&mem, G_STAGE, 96 << 20, 0, 11, &identity);
    let nested = [
        (
            "x86_64",
            Walker::new(X86Paging::long_mode(g_x86)).and_then(|w| {
                w.with_second_level(SecondLevel::Ept(EptConfig::four_level(
                    GuestPhysAddr(ept),
                    false,
                )))
            }),
        ),
        (
            "aarch64",
            Walker::new(Aarch64Paging::new(Granule::K4, 0, g_arm)).and_then(|w| {
                w.with_second_level(SecondLevel::Aarch64(Aarch64Stage2::new(
                    Granule::K4,
                    48,
                    s2,
                )))
            }),
        ),
        (
            "riscv64",
            Walker::new(RiscvPaging::new(RiscvMode::Sv48, g_rv)).and_then(|w| {
                w.with_second_level(SecondLevel::Riscv(RiscvGStage::new(RiscvMode::Sv48, gst)))
            }),
        ),
    ]
    .map(|(name, w)| (name, w.expect("valid registers")));
    let addrs: Vec<u64> = pages
        .choose_multiple(&mut rng, ADDRS)
        .map(|&(va, _)| va + rng.gen_range(0..4096))
        .collect();
    // Every walker agrees with the layout before anything is measured.
    let frame_of = |va: u64| {
        pages
            .iter()
            .find(|&&(v, _)| v == va & !0xfff)
            .map(|&(_, pa)| pa)
    };
    for (name, w) in &walkers {
        for &va in &addrs {
            let t = w
                .translate(&mem, GuestVirtAddr(va), Access::read())
                .unwrap_or_else(|f| panic!("{name}: {va:#x}: {f}"));
            assert_eq!(Some(t.gpa.0 & !0xfff), frame_of(va), "{name}: {va:#x}");
            assert_eq!(t.memory_refs, 4, "{name}: {va:#x}");
        }
    }
    for (name, w) in &nested {
        for &va in &addrs {
            let t = w
                .translate(&mem, GuestVirtAddr(va), Access::read())
                .unwrap_or_else(|f| panic!("nested {name}: {va:#x}: {f}"));
            assert_eq!(
                Some(t.gpa.0 & !0xfff),
                frame_of(va),
                "nested {name}: {va:#x}"
            );
            assert_eq!(t.pa.0, t.gpa.0 + NESTED_SHIFT, "nested {name}: {va:#x}");
            assert_eq!(t.memory_refs, 24, "nested {name}: {va:#x}");
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

    let mut g = c.benchmark_group("paging_arch/nested_cold");
    g.throughput(Throughput::Elements(n));
    for (name, w) in &nested {
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

    let mut g = c.benchmark_group("paging_arch/nested_warm");
    g.throughput(Throughput::Elements(n));
    for (name, w) in &nested {
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
        let refs: u64 = addrs
            .iter()
            .map(|&va| {
                w.translate_with(
                    &mem,
                    GuestVirtAddr(va),
                    Access::read(),
                    opts,
                    Some(&mut cache),
                )
                .map_or(0, |t| u64::from(t.memory_refs))
            })
            .sum();
        eprintln!(
            "paging_arch/nested_warm {name}: {:.2} memory references per warm translation (24 cold)",
            refs as f64 / n as f64
        );
    }
    g.finish();
}
