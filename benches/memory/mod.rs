//! Guest-memory access: pagefold's [`GuestMemory`] against `vm-memory`'s
//! `GuestMemoryMmap<()>` (backend-mmap, the `()` bitmap: dirty tracking off,
//! as it is on pagefold's side, which tracks nothing unless asked).
//!
//! What both sides share, so that only the access path differs:
//! - the layout: one 256 MiB region, or 8 or 64 regions splitting the same
//!   256 MiB with a 1 MiB hole after each;
//! - the backing: a shmem memfd with 4 KiB pages, mapped shared (pagefold's
//!   frame store is one; vm-memory gets its own, one file offset per region);
//! - the contents: every page written before measuring, so no page fault is
//!   measured;
//! - the addresses: one list per row, drawn once from a fixed-seed `SmallRng`
//!   over all regions, valid on both sides (checked before measuring).
//!
//! The lists are sized so lines and TLB entries stay warm from one iteration
//! to the next (1024 addresses for objects and lookups; 512 KiB and 1 MiB of
//! copy targets): DRAM latency would be the same on both sides and would only
//! hide the difference in the path itself (lookup, bounds checks, copy).
//!
//! Group `<row>/<layout>` holds functions `pagefold` and `vm-memory`;
//! `benches/memory_ratios.sh` prints their ratios.

use std::{fs::File, hint::black_box, io, os::fd::FromRawFd, sync::Arc, time::Duration};

use criterion::{measurement::WallTime, BenchmarkGroup, Criterion, Throughput};
use pagefold::{GuestMemory, GuestPhysAddr};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap,
    GuestMemoryRegion as _,
};

/// Guest memory size, the same for every layout.
const TOTAL: u64 = 256 << 20;
/// Unmapped gap after each region of a multi-region layout.
const HOLE: u64 = 1 << 20;
/// Seed of every address list (ASCII "pagefold").
const SEED: u64 = 0x7061_6765_666f_6c64;
/// Addresses per list for 8-byte objects and lookups.
const POINT_ADDRS: usize = 1024;

/// Criterion settings for this module: 54 benchmarks at about 3 s each.
pub(crate) fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

/// Every row on every layout. One layout's memory (2 x 256 MiB) lives at a
/// time.
pub(crate) fn benches(c: &mut Criterion) {
    for regions in [1, 8, 64] {
        let g = Guests::new(regions);
        objects(c, &g);
        copies(c, &g, 4 << 10, 128);
        copies(c, &g, 64 << 10, 16);
        lookups(c, &g);
    }
}

/// The same guest memory on both sides.
pub(crate) struct Guests {
    /// `1_region`, `8_regions`, `64_regions`.
    pub(crate) name: String,
    /// `(start, size)` of each region, sorted.
    layout: Vec<(u64, u64)>,
    pub(crate) pf: GuestMemory,
    pub(crate) vm: GuestMemoryMmap<()>,
}

impl Guests {
    pub(crate) fn new(regions: u64) -> Self {
        let size = TOTAL / regions;
        let gap = if regions == 1 { 0 } else { HOLE };
        let layout: Vec<(u64, u64)> = (0..regions).map(|i| (i * (size + gap), size)).collect();

        let pf_layout: Vec<_> = layout.iter().map(|&(s, n)| (GuestPhysAddr(s), n)).collect();
        let pf = GuestMemory::new(&pf_layout).expect("pagefold guest memory");

        let file = Arc::new(memfd(TOTAL));
        let vm_layout: Vec<_> = layout
            .iter()
            .zip((0..).step_by(usize_of(size)))
            .map(|(&(s, n), off)| {
                (
                    GuestAddress(s),
                    usize_of(n),
                    Some(FileOffset::from_arc(Arc::clone(&file), off)),
                )
            })
            .collect();
        let vm = GuestMemoryMmap::<()>::from_ranges_with_files(&vm_layout)
            .expect("vm-memory guest memory");

        // Touch every page on both sides, with the same bytes.
        let mut rng = SmallRng::seed_from_u64(SEED);
        let mut chunk = vec![0u8; 64 << 10];
        rng.fill(chunk.as_mut_slice());
        for &(start, len) in &layout {
            for off in (0..len).step_by(chunk.len()) {
                pf.write(GuestPhysAddr(start + off), &chunk)
                    .expect("pagefold touch");
                vm.write_slice(&chunk, GuestAddress(start + off))
                    .expect("vm-memory touch");
            }
        }

        let name = if regions == 1 {
            "1_region".to_owned()
        } else {
            format!("{regions}_regions")
        };
        Guests {
            name,
            layout,
            pf,
            vm,
        }
    }

    /// `count` addresses at which `len` bytes lie in one region, multiples
    /// of `align`, drawn from a generator seeded by the row's name.
    pub(crate) fn addrs(&self, row: &str, count: usize, len: u64, align: u64) -> Addrs {
        let seed = row.bytes().fold(SEED, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = SmallRng::seed_from_u64(seed ^ self.layout.len() as u64);
        let raw: Vec<u64> = (0..count)
            .map(|_| {
                let (start, size) = self.layout[rng.gen_range(0..self.layout.len())];
                start + rng.gen_range(0..=(size - len) / align) * align
            })
            .collect();
        Addrs {
            pf: raw.iter().map(|&a| GuestPhysAddr(a)).collect(),
            vm: raw.iter().map(|&a| GuestAddress(a)).collect(),
        }
    }

    pub(crate) fn group<'c>(
        &self,
        c: &'c mut Criterion,
        row: &str,
        throughput: Throughput,
    ) -> BenchmarkGroup<'c, WallTime> {
        let mut group = c.benchmark_group(format!("{row}/{}", self.name));
        group.throughput(throughput);
        group
    }
}

/// One address list in each side's address type, converted up front.
pub(crate) struct Addrs {
    pub(crate) pf: Vec<GuestPhysAddr>,
    pub(crate) vm: Vec<GuestAddress>,
}

impl Addrs {
    pub(crate) fn elements(&self) -> Throughput {
        Throughput::Elements(self.pf.len() as u64)
    }
}

/// `read_obj::<u64>` and `write_obj::<u64>` at random 8-byte-aligned
/// addresses.
fn objects(c: &mut Criterion, g: &Guests) {
    let a = g.addrs("read_obj_u64", POINT_ADDRS, 8, 8);
    for (p, v) in a.pf.iter().zip(&a.vm) {
        let (x, y) = (g.pf.read_obj::<u64>(*p), g.vm.read_obj::<u64>(*v));
        assert!(x.is_ok() && x.ok() == y.ok(), "read_obj differs at {p}");
    }
    let mut group = g.group(c, "read_obj_u64", a.elements());
    group.bench_function("pagefold", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &addr in &a.pf {
                let v = g.pf.read_obj::<u64>(black_box(addr)).unwrap_or(1);
                sum = sum.wrapping_add(v);
            }
            sum
        });
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &addr in &a.vm {
                let v = g.vm.read_obj::<u64>(black_box(addr)).unwrap_or(1);
                sum = sum.wrapping_add(v);
            }
            sum
        });
    });
    group.finish();

    let a = g.addrs("write_obj_u64", POINT_ADDRS, 8, 8);
    let mut group = g.group(c, "write_obj_u64", a.elements());
    group.bench_function("pagefold", |b| {
        b.iter(|| {
            let mut ok = 0u64;
            for &addr in &a.pf {
                ok += u64::from(g.pf.write_obj(black_box(addr), addr.0).is_ok());
            }
            ok
        });
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| {
            let mut ok = 0u64;
            for &addr in &a.vm {
                ok += u64::from(g.vm.write_obj(addr.0, black_box(addr)).is_ok());
            }
            ok
        });
    });
    group.finish();
}

/// `read`/`write` of `len` bytes against vm-memory's `read_slice`/
/// `write_slice`, at `count` random 8-byte-aligned addresses.
fn copies(c: &mut Criterion, g: &Guests, len: usize, count: usize) {
    let kib = len >> 10;
    let bytes = Throughput::Bytes((len * count) as u64);

    let row = format!("read_{kib}k");
    let a = g.addrs(&row, count, len as u64, 8);
    let mut pf_buf = vec![0u8; len];
    let mut vm_buf = vec![0u8; len];
    for (p, v) in a.pf.iter().zip(&a.vm) {
        let x = g.pf.read(*p, &mut pf_buf);
        let y = g.vm.read_slice(&mut vm_buf, *v);
        assert!(
            x.is_ok() && y.is_ok() && pf_buf == vm_buf,
            "read differs at {p}"
        );
    }
    let mut group = g.group(c, &row, bytes.clone());
    group.bench_function("pagefold", |b| {
        b.iter(|| {
            let mut ok = 0u64;
            for &addr in &a.pf {
                ok += u64::from(g.pf.read(black_box(addr), &mut pf_buf).is_ok());
                black_box(pf_buf.as_mut_slice());
            }
            ok
        });
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| {
            let mut ok = 0u64;
            for &addr in &a.vm {
                ok += u64::from(g.vm.read_slice(&mut vm_buf, black_box(addr)).is_ok());
                black_box(vm_buf.as_mut_slice());
            }
            ok
        });
    });
    group.finish();

    let row = format!("write_{kib}k");
    let a = g.addrs(&row, count, len as u64, 8);
    let data = pf_buf;
    let mut group = g.group(c, &row, bytes);
    group.bench_function("pagefold", |b| {
        b.iter(|| {
            let mut ok = 0u64;
            for &addr in &a.pf {
                ok += u64::from(g.pf.write(black_box(addr), black_box(&data)).is_ok());
            }
            ok
        });
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| {
            let mut ok = 0u64;
            for &addr in &a.vm {
                ok += u64::from(g.vm.write_slice(black_box(&data), black_box(addr)).is_ok());
            }
            ok
        });
    });
    group.finish();
}

/// Address to region, three ways, at random byte addresses: the region
/// (`find_region`), the region and the offset in it (pagefold `region_of`
/// against vm-memory `to_region_addr`), and the host address.
fn lookups(c: &mut Criterion, g: &Guests) {
    let a = g.addrs("lookup", POINT_ADDRS, 1, 1);
    let regions = g.pf.regions();
    for (p, v) in a.pf.iter().zip(&a.vm) {
        let x = g.pf.find_region(*p).map(|i| regions[i].start().0);
        let y = g.vm.find_region(*v).map(|r| r.start_addr().0);
        assert!(x.is_some() && x == y, "find_region differs at {p}");
        let x = g.pf.host_address(*p);
        assert!(
            x.is_ok() && g.vm.get_host_address(*v).is_ok(),
            "host_address at {p}"
        );
    }

    let mut group = g.group(c, "find_region", a.elements());
    group.bench_function("pagefold", |b| {
        b.iter(|| {
            for &addr in &a.pf {
                black_box(g.pf.find_region(black_box(addr)).map(|i| &regions[i]));
            }
        });
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| {
            for &addr in &a.vm {
                black_box(g.vm.find_region(black_box(addr)));
            }
        });
    });
    group.finish();

    let mut group = g.group(c, "to_region_addr", a.elements());
    group.bench_function("pagefold", |b| {
        b.iter(|| {
            for &addr in &a.pf {
                black_box(g.pf.region_of(black_box(addr)).ok());
            }
        });
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| {
            for &addr in &a.vm {
                black_box(g.vm.to_region_addr(black_box(addr)));
            }
        });
    });
    group.finish();

    let mut group = g.group(c, "host_address", a.elements());
    group.bench_function("pagefold", |b| {
        b.iter(|| {
            for &addr in &a.pf {
                black_box(g.pf.host_address(black_box(addr)).ok());
            }
        });
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| {
            for &addr in &a.vm {
                black_box(g.vm.get_host_address(black_box(addr)).ok());
            }
        });
    });
    group.finish();
}

/// A shmem memfd of `len` bytes, like the one under pagefold's frame store.
fn memfd(len: u64) -> File {
    // SAFETY:
    // 1. The name is a NUL-terminated literal that outlives the call.
    // 2. `MFD_CLOEXEC` is a valid flag for memfd_create.
    let fd = unsafe { libc::memfd_create(c"vm-memory-bench".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created, is open, and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).expect("size the vm-memory memfd");
    file
}

fn usize_of(x: u64) -> usize {
    usize::try_from(x).expect("sizes fit in usize on 64-bit hosts")
}
