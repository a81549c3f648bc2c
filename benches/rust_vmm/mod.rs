//! The rust-vmm path: the operations of vm-memory's own benchmarks
//! (`read_obj`, `write_obj`, `read_slice`/`write_slice`,
//! `read_volatile_from`, `write_volatile_to`, `get_slice`, region lookup)
//! through pagefold's vm-memory trait impls (feature `vm-memory`) against
//! vm-memory's `GuestMemoryMmap<()>`, on the layouts and memories of
//! `benches/memory` (one 256 MiB region, or 8 or 64 regions with holes).
//!
//! Both sides run the same generic code (`M: vm_memory::GuestMemory`), so
//! the only difference is the backend: pagefold's region lookup and its
//! regions' slices, which carry pagefold's dirty log as their bitmap (one
//! load of its on-flag per write; tracking is off, as the peer's `()`
//! bitmap tracks nothing). A VMM that switches to pagefold runs exactly
//! this path.
//!
//! Group `vmm_<row>/<layout>` holds functions `pagefold` and `vm-memory`;
//! `benches/rust_vmm_ratios.sh` prints their ratios.

use std::{fs::File, hint::black_box, io::Seek};

use criterion::{Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::Guests;

/// Addresses per list for 8-byte objects, lookups and slices.
const POINT_ADDRS: usize = 1024;

/// Every row on every layout; one layout's memory lives at a time.
pub(crate) fn benches(c: &mut Criterion) {
    for regions in [1, 8, 64] {
        let g = Guests::new(regions);
        objects(c, &g);
        slices(c, &g, 4 << 10, 128);
        volatile(c, &g, 64 << 10, 16);
        lookups(c, &g);
    }
}

/// Runs `f` over both memories as one group, `pagefold` then `vm-memory`.
macro_rules! both {
    ($c:expr, $g:expr, $row:expr, $tp:expr, |$m:ident| $body:expr) => {{
        let mut group = $g.group($c, &format!("vmm_{}", $row), $tp);
        group.bench_function("pagefold", |b| {
            let $m = &$g.pf;
            b.iter(|| $body)
        });
        group.bench_function("vm-memory", |b| {
            let $m = &$g.vm;
            b.iter(|| $body)
        });
        group.finish();
    }};
}

// Each side's loop is its own function, never inlined into the harness's
// closure: the compiler then inlines vm-memory's generic path (slice
// iterator, bounds checks, copy) into the loop the same way for both
// backends, as it does in a VMM's own device code, instead of deciding
// differently for the two instantiations inside one large closure.

#[inline(never)]
fn read_objs<M: GuestMemory + ?Sized>(m: &M, addrs: &[GuestAddress]) -> u64 {
    let mut sum = 0u64;
    for &a in addrs {
        sum = sum.wrapping_add(m.read_obj::<u64>(black_box(a)).unwrap_or(1));
    }
    sum
}

#[inline(never)]
fn write_objs<M: GuestMemory + ?Sized>(m: &M, addrs: &[GuestAddress]) -> u64 {
    let mut ok = 0u64;
    for &a in addrs {
        ok += u64::from(m.write_obj(a.0, black_box(a)).is_ok());
    }
    ok
}

/// `read_obj::<u64>` and `write_obj::<u64>` at random aligned addresses.
fn objects(c: &mut Criterion, g: &Guests) {
    let a = g.addrs("vmm_read_obj_u64", POINT_ADDRS, 8, 8);
    assert_eq!(
        read_objs(&g.pf, &a.vm),
        read_objs(&g.vm, &a.vm),
        "read_obj differs"
    );
    both!(c, g, "read_obj_u64", a.elements(), |m| read_objs(m, &a.vm));
    let a = g.addrs("vmm_write_obj_u64", POINT_ADDRS, 8, 8);
    both!(c, g, "write_obj_u64", a.elements(), |m| write_objs(
        m, &a.vm
    ));
}

/// `read_slice`/`write_slice` of `len` bytes at `count` addresses.
fn slices(c: &mut Criterion, g: &Guests, len: usize, count: usize) {
    let kib = len >> 10;
    let bytes = Throughput::Bytes((len * count) as u64);
    let a = g.addrs(&format!("vmm_read_slice_{kib}k"), count, len as u64, 8);
    let mut buf = vec![0u8; len];
    both!(c, g, format!("read_slice_{kib}k"), bytes.clone(), |m| {
        read_slices(m, &a.vm, &mut buf)
    });
    let a = g.addrs(&format!("vmm_write_slice_{kib}k"), count, len as u64, 8);
    let data = vec![0x5au8; len];
    both!(
        c,
        g,
        format!("write_slice_{kib}k"),
        bytes,
        |m| write_slices(m, &a.vm, &data)
    );
}

#[inline(never)]
fn read_slices<M: GuestMemory + ?Sized>(m: &M, addrs: &[GuestAddress], buf: &mut [u8]) -> u64 {
    let mut ok = 0u64;
    for &addr in addrs {
        ok += u64::from(m.read_slice(buf, black_box(addr)).is_ok());
        black_box(&mut *buf);
    }
    ok
}

#[inline(never)]
fn write_slices<M: GuestMemory + ?Sized>(m: &M, addrs: &[GuestAddress], data: &[u8]) -> u64 {
    let mut ok = 0u64;
    for &addr in addrs {
        ok += u64::from(m.write_slice(black_box(data), black_box(addr)).is_ok());
    }
    ok
}

/// `read_volatile_from` a file and `write_volatile_to` one, `len` bytes at
/// `count` addresses: what a block or net device does with its backend.
/// The file is a memfd (no disk): the copy in the kernel is the same on
/// both sides, so a difference is the backend's path around it.
fn volatile(c: &mut Criterion, g: &Guests, len: usize, count: usize) {
    let kib = len >> 10;
    let bytes = Throughput::Bytes((len * count) as u64);
    let mut file = memfd_file(len);
    let a = g.addrs(
        &format!("vmm_read_volatile_from_{kib}k"),
        count,
        len as u64,
        8,
    );
    both!(
        c,
        g,
        format!("read_volatile_from_{kib}k"),
        bytes.clone(),
        |m| {
            let mut n = 0usize;
            for &addr in &a.vm {
                let _ = file.rewind();
                n += m
                    .read_volatile_from(black_box(addr), &mut file, len)
                    .unwrap_or(0);
            }
            n
        }
    );
    let a = g.addrs(
        &format!("vmm_write_volatile_to_{kib}k"),
        count,
        len as u64,
        8,
    );
    both!(c, g, format!("write_volatile_to_{kib}k"), bytes, |m| {
        let mut n = 0usize;
        for &addr in &a.vm {
            let _ = file.rewind();
            n += m
                .write_volatile_to(black_box(addr), &mut file, len)
                .unwrap_or(0);
        }
        n
    });
}

/// Region lookup (`find_region`), address to region and offset
/// (`to_region_addr`), and `get_slice` of 8 bytes, at random addresses.
fn lookups(c: &mut Criterion, g: &Guests) {
    let a = g.addrs("vmm_lookup", POINT_ADDRS, 8, 1);
    for &addr in &a.vm {
        let x = GuestMemoryBackend::find_region(&g.pf, addr).map(|r| r.start_addr());
        let y = g.vm.find_region(addr).map(|r| r.start_addr());
        assert!(x.is_some() && x == y, "find_region differs at {addr:?}");
    }
    both!(c, g, "find_region", a.elements(), |m| {
        for &addr in &a.vm {
            black_box(GuestMemoryBackend::find_region(m, black_box(addr)).map(|r| r.len()));
        }
    });
    both!(c, g, "to_region_addr", a.elements(), |m| {
        for &addr in &a.vm {
            black_box(GuestMemoryBackend::to_region_addr(m, black_box(addr)).map(|(_, o)| o));
        }
    });
    both!(c, g, "get_slice", a.elements(), |m| {
        for &addr in &a.vm {
            black_box(
                GuestMemoryBackend::get_slice(m, black_box(addr), 8)
                    .map(|s| s.ptr_guard().as_ptr())
                    .ok(),
            );
        }
    });
}

/// A memfd of `len` bytes, filled.
fn memfd_file(len: usize) -> File {
    // SAFETY: the name is a NUL-terminated literal that outlives the call;
    // MFD_CLOEXEC is a valid flag.
    let fd = unsafe { libc::memfd_create(c"vmm-bench".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std::io::Write::write_all(&mut &file, &vec![0xa5u8; len]).expect("fill the memfd");
    file
}
