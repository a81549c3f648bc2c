//! Fuzzes the balloon with untrusted input: raw le32 PFN bytes as they
//! arrive on the virtio inflate/deflate queues, u64 PFN lists, ranges, free
//! page reports, stats buffers and library writes, over a small layout with
//! a hole. Nothing may panic; after every operation `actual` must equal the
//! ballooned pages the state table shows.

#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::{Balloon, BalloonOptions, GuestMemory, GuestPhysAddr};

#[derive(Arbitrary, Debug)]
enum Op {
    InflateLe32(Vec<u8>),
    DeflateLe32(Vec<u8>),
    Inflate(Vec<u64>),
    Deflate(Vec<u64>),
    InflateRange(u64, u64),
    DeflateRange(u64, u64),
    Report(u64, u32),
    Stats(Vec<u8>),
    Target(u64),
    Write(u16, u8),
}

fuzz_target!(|input: (u8, Vec<Op>)| {
    let (limit, ops) = input;
    // 64 pages, a 64-page hole, 64 pages.
    let Ok(mem) = GuestMemory::new(&[
        (GuestPhysAddr(0), 64 * 4096),
        (GuestPhysAddr(128 * 4096), 64 * 4096),
    ]) else {
        return;
    };
    let mem = Arc::new(mem);
    let b = Balloon::with_options(
        Arc::clone(&mem),
        BalloonOptions {
            max_batch: usize::from(limit % 32),
        },
    );
    for op in ops.into_iter().take(64) {
        match op {
            Op::InflateLe32(v) => drop(b.inflate_pfns_le32(&v)),
            Op::DeflateLe32(v) => drop(b.deflate_pfns_le32(&v)),
            Op::Inflate(v) => drop(b.inflate_pfns(pagefold::GuestFrame::from_raw_slice(&v))),
            Op::Deflate(v) => drop(b.deflate_pfns(pagefold::GuestFrame::from_raw_slice(&v))),
            Op::InflateRange(a, l) => {
                drop(b.inflate_range(GuestPhysAddr(a % (1 << 22)), l % (1 << 22)))
            }
            Op::DeflateRange(a, l) => drop(b.deflate_range(GuestPhysAddr(a), l)),
            Op::Report(a, o) => drop(b.report_free(GuestPhysAddr(a), o)),
            Op::Stats(v) => drop(b.update_stats(&v)),
            Op::Target(t) => b.set_target(t),
            Op::Write(p, v) => {
                let _ = mem.write_obj(GuestPhysAddr(u64::from(p) * 4096 % (192 * 4096)), v);
            }
        }
        assert_eq!(b.actual(), mem.census().ballooned);
    }
});
