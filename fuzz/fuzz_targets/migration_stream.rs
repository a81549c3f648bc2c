//! Fuzzes the migration stream decoder. Three inputs:
//! - raw bytes, read as a stream (header, chunk framing, checksums);
//! - a framed stream: a header for a small layout and arbitrary chunk
//!   payloads sealed with valid checksums, so the record parser and the
//!   receiver's checks (references, deltas, page counts) are reached;
//! - a valid stream written by `StreamWriter` from arbitrary pages over
//!   rounds (and, optionally, a last round sending every page in address
//!   order, so duplicates form REF_RUN records of several pages), then
//!   damaged at one byte (or not).
//! Any panic is a crash; every input must end in `Ok` or a typed error, and
//! an undamaged valid stream must rebuild the sender's memory exactly.
//!
//! Limits keep one run small: at most 1 MiB of guest memory per layout.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::{
    migration::{format, receive, ReaderLimits, StreamWriter, WriterOptions},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};

const LIMITS: ReaderLimits = ReaderLimits {
    max_guest_bytes: 1 << 20,
    max_regions: 8,
};

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Framed {
        seed: u64,
        /// (gap pages, size pages) per region.
        regions: Vec<(u8, u8)>,
        chunks: Vec<Vec<u8>>,
    },
    Written {
        seed: u64,
        pages: u8,
        /// Per round: (page index, content kind, byte) writes.
        rounds: Vec<Vec<(u8, u8, u8)>>,
        cache: u8,
        sweep: bool,
        damage: Option<(u16, u8)>,
    },
}

fn layout(regions: &[(u8, u8)]) -> Vec<(u64, u64)> {
    let mut at = 0u64;
    regions
        .iter()
        .take(8)
        .map(|&(gap, n)| {
            let start = at + u64::from(gap) * 4096;
            let size = u64::from(n % 32) * 4096;
            at = start + size;
            (start, size)
        })
        .collect()
}

fn framed(seed: u64, layout: &[(u64, u64)], chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&format::MAGIC);
    b.extend_from_slice(&format::VERSION.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&4096u32.to_le_bytes());
    b.extend_from_slice(&seed.to_le_bytes());
    b.extend_from_slice(&(layout.len() as u32).to_le_bytes());
    for &(s, n) in layout {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
    }
    let sum = format::header_checksum(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    for (i, p) in chunks.iter().enumerate() {
        let mut c = (p.len() as u32).to_le_bytes().to_vec();
        c.extend_from_slice(p);
        let sum = format::chunk_checksum(&c, seed, i as u64);
        b.extend_from_slice(&c);
        b.extend_from_slice(&sum.to_le_bytes());
    }
    b
}

fn page_content(kind: u8, byte: u8, old: &mut [u8; PAGE_SIZE]) {
    match kind % 4 {
        0 => *old = [0; PAGE_SIZE],
        1 => *old = [byte; PAGE_SIZE],
        2 => old[usize::from(byte) * 13 % PAGE_SIZE] ^= byte | 1,
        _ => {
            for (i, b) in old.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(byte | 1);
            }
        }
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(bytes) => {
            let _ = receive(&bytes[..], LIMITS);
        }
        Input::Framed {
            seed,
            regions,
            chunks,
        } => {
            let s = framed(seed, &layout(&regions), &chunks);
            let _ = receive(&s[..], LIMITS);
        }
        Input::Written {
            seed,
            pages,
            rounds,
            cache,
            sweep,
            damage,
        } => {
            let n = u64::from(pages % 64) + 1;
            let Ok(mem) = GuestMemory::new(&[(GuestPhysAddr(0), n * 4096)]) else {
                return;
            };
            let opts = WriterOptions {
                seed: Some(seed),
                delta_cache_pages: usize::from(cache % 16),
                ..WriterOptions::default()
            };
            let mut w = StreamWriter::for_memory(Vec::new(), &mem, opts).expect("writer");
            for (r, writes) in rounds.iter().take(6).enumerate() {
                w.begin_round(r as u32).expect("round");
                for &(p, kind, byte) in writes.iter().take(64) {
                    let gpa = GuestPhysAddr(u64::from(p) % n * 4096);
                    let mut page = [0u8; PAGE_SIZE];
                    mem.read(gpa, &mut page).expect("read");
                    page_content(kind, byte, &mut page);
                    mem.write(gpa, &page).expect("write");
                    w.send_page(&mem, gpa).expect("send");
                }
            }
            if sweep {
                w.begin_round(6).expect("round");
                for p in 0..n {
                    w.send_page(&mem, GuestPhysAddr(p * 4096)).expect("send");
                }
            }
            let (mut bytes, _) = w.finish_verified(&mem).expect("finish");
            match damage {
                None => {
                    let (got, stats) = receive(&bytes[..], LIMITS).expect("valid stream");
                    assert!(stats.verified);
                    let mut a = vec![0u8; (n * 4096) as usize];
                    let mut b = a.clone();
                    mem.read(GuestPhysAddr(0), &mut a).expect("read");
                    got.read(GuestPhysAddr(0), &mut b).expect("read");
                    assert!(a == b, "receiver differs from sender");
                }
                Some((at, x)) => {
                    let at = usize::from(at) % bytes.len();
                    bytes[at] ^= x | 1;
                    assert!(
                        receive(&bytes[..], LIMITS).is_err(),
                        "damage at {at} went unnoticed"
                    );
                }
            }
        }
    }
});
