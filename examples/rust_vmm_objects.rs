//! `read_obj::<u64>` through vm-memory's `Bytes` on pagefold's memory and
//! on `GuestMemoryMmap` (`()` and `AtomicBitmap` bitmaps), in a small
//! binary of its own: the same generic loop the criterion bench
//! (`benches/rust_vmm`) runs, where the compiler inlines vm-memory's
//! slice path differently for the two backends. Best of 20 passes of
//! 100 x 1024 reads, nanoseconds per read.
//!
//! `cargo run --profile bench --example rust_vmm_objects`

// A failed setup is a failed measurement.
#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]
use std::{hint::black_box, time::Instant};
use vm_memory::{bitmap::AtomicBitmap, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

fn run<M: GuestMemory + ?Sized>(name: &str, m: &M, addrs: &[GuestAddress]) {
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        let mut sum = 0u64;
        for _ in 0..100 {
            for &a in addrs {
                sum = sum.wrapping_add(m.read_obj::<u64>(black_box(a)).unwrap_or(1));
            }
        }
        black_box(sum);
        best = best.min(t.elapsed().as_nanos() as f64 / (100.0 * addrs.len() as f64));
    }
    println!("{name}: {best:.2} ns");
}

fn main() {
    let size = 64 << 20;
    let pf = pagefold::GuestMemory::new(&[(pagefold::GuestPhysAddr(0), size)]).unwrap();
    let vm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
    let vmb =
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
    let addrs: Vec<GuestAddress> = (0..1024u64)
        .map(|i| GuestAddress((i * 7919 * 4096 + i * 8) % (size - 8)))
        .collect();
    for a in &addrs {
        Bytes::write_obj(&pf, 1u64, *a).unwrap();
        vm.write_obj(1u64, *a).unwrap();
        vmb.write_obj(1u64, *a).unwrap();
    }
    for _ in 0..2 {
        run("pagefold", &pf, &addrs);
        run("vm-memory ()", &vm, &addrs);
        run("vm-memory AtomicBitmap", &vmb, &addrs);
    }
}
