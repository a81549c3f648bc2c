//! The dirty log: pagefold's harvest against a full scan of `vm-memory`'s
//! `AtomicBitmap` (feature `backend-bitmap`), and guest-memory object
//! accesses with dirty tracking on in both libraries (`GuestMemoryMmap<
//! AtomicBitmap>` on vm-memory's side).
//!
//! Harvest rows (`harvest_16g_1pct/<pattern>`): 16 GiB of guest memory
//! (pagefold: one region on a sparse memfd, nothing touched; vm-memory: an
//! `AtomicBitmap` for 16 GiB of 4 KiB pages), 1% of the pages dirty, marked
//! before each iteration outside the timing. Each side returns the dirty
//! pages as `(first page, count)` runs and leaves the bitmap clean:
//! pagefold's `harvest_dirty`, and for vm-memory `get_and_reset()` (one
//! atomic swap per 64 pages, the fastest scan its API offers) followed by
//! decoding the words into runs. Patterns:
//! - `clustered`: the 1% as runs of 64 pages (256 KiB) at random
//!   64-aligned places, as guests dirty buffers and page-cache pages;
//! - `scattered`: 1% of pages drawn uniformly, the worst case for a
//!   summary level: about 47% of the 64-page words then hold a dirty page,
//!   so a harvest touches half the words however it walks.
//!
//! Access rows (`dirty_read_obj_u64/1_region`, `dirty_write_obj_u64/
//! 1_region`): as `benches/memory`'s object rows (256 MiB, one region, a
//! shared memfd, every page touched first, 1024 random 8-byte-aligned
//! addresses) with tracking on on both sides.
//!
//! `benches/dirty_ratios.sh` prints the ratios of one run.

use std::{
    fs::File, hint::black_box, io, num::NonZeroUsize, os::fd::FromRawFd, sync::Arc, time::Duration,
};

use criterion::{BatchSize, Criterion, Throughput};
use pagefold::{DirtyRun, GuestMemory, GuestPhysAddr, RegionSet};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use vm_memory::{bitmap::AtomicBitmap, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

/// Guest memory of the harvest rows.
const HARVEST_BYTES: u64 = 16 << 30;
const PAGE: u64 = 4096;
/// Guest memory of the access rows.
const ACCESS_BYTES: u64 = 256 << 20;
/// Seed of every random choice (ASCII "dirtylog").
const SEED: u64 = 0x6469_7274_796c_6f67;

/// Criterion settings for this module.
pub(crate) fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
}

pub(crate) fn benches(c: &mut Criterion) {
    harvest(c);
    access(c);
}

/// The dirty pages of one pattern, as a bitmap (bit i = page i).
fn pattern(clustered: bool) -> Vec<u64> {
    let pages = (HARVEST_BYTES / PAGE) as usize;
    let mut bits = vec![0u64; pages / 64];
    let mut rng = SmallRng::seed_from_u64(SEED ^ u64::from(clustered));
    let want = pages / 100;
    let mut have = 0;
    while have < want {
        if clustered {
            let w = rng.gen_range(0..bits.len());
            if bits[w] == 0 {
                bits[w] = u64::MAX;
                have += 64;
            }
        } else {
            let p = rng.gen_range(0..pages);
            if bits[p / 64] & (1 << (p % 64)) == 0 {
                bits[p / 64] |= 1 << (p % 64);
                have += 1;
            }
        }
    }
    bits
}

/// Runs of set bits in `words`, as pagefold reports them.
fn decode(words: &[u64], out: &mut Vec<(u64, u64)>) {
    let mut pending: Option<(u64, u64)> = None;
    for (w, &word) in words.iter().enumerate() {
        let mut v = word;
        while v != 0 {
            let lo = u64::from(v.trailing_zeros());
            let ones = u64::from((v >> lo).trailing_ones());
            let end = lo + ones;
            v = if end >= 64 { 0 } else { v & (u64::MAX << end) };
            let start = w as u64 * 64 + lo;
            pending = match pending {
                Some((s, n)) if s + n == start => Some((s, n + ones)),
                Some(p) => {
                    out.push(p);
                    Some((start, ones))
                }
                None => Some((start, ones)),
            };
        }
    }
    out.extend(pending);
}

fn harvest(c: &mut Criterion) {
    let pf =
        GuestMemory::new(&[(GuestPhysAddr(0), HARVEST_BYTES)]).expect("16 GiB of guest memory");
    pf.set_dirty_tracking(RegionSet::All, true)
        .expect("tracking");
    let vm = AtomicBitmap::new(
        usize_of(HARVEST_BYTES),
        NonZeroUsize::new(4096).expect("4096"),
    );

    for (name, clustered) in [("clustered", true), ("scattered", false)] {
        let bits = pattern(clustered);
        let dirty: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
        // Both sides report the same pages.
        pf.merge_dirty_bitmap(0, &bits).expect("merge");
        let mut pf_runs = Vec::new();
        pf.harvest_dirty(RegionSet::All, &mut pf_runs)
            .expect("harvest");
        for (w, &b) in bits.iter().enumerate() {
            if b != 0 {
                for k in 0..64 {
                    if b >> k & 1 == 1 {
                        vm.set_bit(w * 64 + k);
                    }
                }
            }
        }
        let mut vm_runs = Vec::new();
        decode(&vm.get_and_reset(), &mut vm_runs);
        let pf_pairs: Vec<(u64, u64)> = pf_runs
            .iter()
            .map(|r| (r.start.0 / PAGE, r.pages))
            .collect();
        assert_eq!(pf_pairs, vm_runs, "both sides report the same runs");
        assert_eq!(pf_pairs.iter().map(|r| r.1).sum::<u64>(), dirty);

        let mut group = c.benchmark_group(format!("harvest_16g_1pct/{name}"));
        group.throughput(Throughput::Elements(dirty));
        group.sample_size(30);
        let runs_cap = pf_runs.len();
        group.bench_function("pagefold", |b| {
            b.iter_batched_ref(
                || {
                    pf.merge_dirty_bitmap(0, &bits).expect("merge");
                    Vec::<DirtyRun>::with_capacity(runs_cap)
                },
                |out| black_box(pf.harvest_dirty(RegionSet::All, out).expect("harvest")),
                BatchSize::PerIteration,
            );
        });
        group.bench_function("vm-memory", |b| {
            b.iter_batched_ref(
                || {
                    for (w, &word) in bits.iter().enumerate() {
                        let mut v = word;
                        while v != 0 {
                            vm.set_bit(w * 64 + v.trailing_zeros() as usize);
                            v &= v - 1;
                        }
                    }
                    Vec::<(u64, u64)>::with_capacity(runs_cap)
                },
                |out| {
                    decode(&vm.get_and_reset(), out);
                    black_box(out.len())
                },
                BatchSize::PerIteration,
            );
        });
        group.finish();
    }
}

/// `read_obj::<u64>` / `write_obj::<u64>` with dirty tracking on.
fn access(c: &mut Criterion) {
    let pf = GuestMemory::new(&[(GuestPhysAddr(0), ACCESS_BYTES)]).expect("pagefold memory");
    pf.set_dirty_tracking(RegionSet::All, true)
        .expect("tracking");
    let file = Arc::new(memfd(ACCESS_BYTES));
    let vm = GuestMemoryMmap::<AtomicBitmap>::from_ranges_with_files(&[(
        GuestAddress(0),
        usize_of(ACCESS_BYTES),
        Some(FileOffset::from_arc(file, 0)),
    )])
    .expect("vm-memory memory");
    let mut rng = SmallRng::seed_from_u64(SEED);
    let mut chunk = vec![0u8; 64 << 10];
    rng.fill(chunk.as_mut_slice());
    for off in (0..ACCESS_BYTES).step_by(chunk.len()) {
        pf.write(GuestPhysAddr(off), &chunk)
            .expect("pagefold touch");
        vm.write_slice(&chunk, GuestAddress(off))
            .expect("vm-memory touch");
    }
    let addrs: Vec<u64> = (0..1024)
        .map(|_| rng.gen_range(0..ACCESS_BYTES / 8) * 8)
        .collect();
    let pf_addrs: Vec<GuestPhysAddr> = addrs.iter().map(|&a| GuestPhysAddr(a)).collect();
    let vm_addrs: Vec<GuestAddress> = addrs.iter().map(|&a| GuestAddress(a)).collect();
    for (p, v) in pf_addrs.iter().zip(&vm_addrs) {
        let (x, y) = (pf.read_obj::<u64>(*p), vm.read_obj::<u64>(*v));
        assert!(x.is_ok() && x.ok() == y.ok(), "read_obj differs at {p}");
    }
    let elements = Throughput::Elements(addrs.len() as u64);

    let mut group = c.benchmark_group("dirty_read_obj_u64/1_region");
    group.throughput(elements.clone());
    group.bench_function("pagefold", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &addr in &pf_addrs {
                sum = sum.wrapping_add(pf.read_obj::<u64>(black_box(addr)).unwrap_or(1));
            }
            sum
        });
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &addr in &vm_addrs {
                sum = sum.wrapping_add(vm.read_obj::<u64>(black_box(addr)).unwrap_or(1));
            }
            sum
        });
    });
    group.finish();

    let mut group = c.benchmark_group("dirty_write_obj_u64/1_region");
    group.throughput(elements);
    group.bench_function("pagefold", |b| {
        b.iter(|| {
            let mut ok = 0u64;
            for &addr in &pf_addrs {
                ok += u64::from(pf.write_obj(black_box(addr), addr.0).is_ok());
            }
            ok
        });
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| {
            let mut ok = 0u64;
            for &addr in &vm_addrs {
                ok += u64::from(vm.write_obj(addr.0, black_box(addr)).is_ok());
            }
            ok
        });
    });
    group.finish();
    // Both logged the writes.
    let mut runs = Vec::new();
    pf.harvest_dirty(RegionSet::All, &mut runs)
        .expect("harvest");
    assert!(!runs.is_empty(), "pagefold logged the writes");
}

/// A shmem memfd of `len` bytes, like the one under pagefold's frame store.
fn memfd(len: u64) -> File {
    // SAFETY:
    // 1. The name is a NUL-terminated literal that outlives the call.
    // 2. `MFD_CLOEXEC` is a valid flag for memfd_create.
    let fd = unsafe { libc::memfd_create(c"vm-memory-dirty".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created, is open, and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).expect("size the vm-memory memfd");
    file
}

fn usize_of(x: u64) -> usize {
    usize::try_from(x).expect("sizes fit in usize on 64-bit hosts")
}
