//! A guest cannot use up its VMM's kernel mappings by breaking sharing page
//! by page (found from outside: a balloon inflating every other page of a
//! merged clone cut one page at a time out of merged stretches, two
//! mappings each, until the process had none left; the next `merge_now`
//! could not map a thread's stack and the process aborted).
//! Alone in its binary: it uses up most of the process's mappings.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use pagefold::{Balloon, DedupHost, FrameStore, VmOptions, PAGE_SIZE};

mod common;
use common::small_vms::{gpa, vm};

fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn maps() -> u64 {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count() as u64
}

/// One-page mappings held until drop, alternating protections so the
/// kernel cannot join them.
struct Eaten(Vec<usize>);

impl Eaten {
    /// Maps until only `left` mappings are left below the limit.
    fn until_left(left: u64) -> Eaten {
        let max = max_map_count();
        let mut held = Vec::new();
        loop {
            let now = maps();
            if now + left >= max {
                break;
            }
            let batch = (max - left - now).min(4096);
            for _ in 0..batch {
                let prot = if held.len() % 2 == 0 {
                    libc::PROT_READ
                } else {
                    libc::PROT_NONE
                };
                // SAFETY: an anonymous one-page mapping nothing else uses,
                // unmapped by drop.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                held.push(p as usize);
            }
        }
        Eaten(held)
    }
}

impl Drop for Eaten {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: mapped by `until_left`, one page, not used since.
            unsafe { libc::munmap(p as *mut libc::c_void, 4096) };
        }
    }
}

fn fill(i: usize) -> u8 {
    (i % 251) as u8 + 1
}

/// What page `i` of a clone held when it was made.
fn original(i: usize) -> [u8; PAGE_SIZE] {
    let mut p = [fill(i); PAGE_SIZE];
    p[0..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    p
}

fn read(mem: &pagefold::GuestMemory, i: usize) -> [u8; PAGE_SIZE] {
    let mut b = [0u8; PAGE_SIZE];
    mem.read(gpa(i), &mut b).unwrap();
    b
}

/// Two merged clones; the guest of the first balloons every other page
/// (batches of 256, as a guest freeing scattered pages would), deflates
/// and writes some back; the second reports every other page free. The
/// process keeps its headroom of mappings throughout, every page reads
/// what it must, and a later merge and a thread spawn still work.
#[test]
fn a_balloon_of_scattered_pages_never_uses_up_the_mappings() {
    let n = 16_384; // 64 MiB per clone
    let store = Arc::new(FrameStore::memfd().unwrap());
    let a = vm(&store, n, fill);
    let b = vm(&store, n, fill);
    let host = Arc::new(DedupHost::new(Arc::clone(&store)).unwrap());
    let va = host.register(Arc::clone(&a), VmOptions::default()).unwrap();
    host.register(Arc::clone(&b), VmOptions::default()).unwrap();
    let r = host.merge_now().unwrap();
    assert_eq!(r.merged_shared, 2 * n as u64, "the clones merge whole");

    // 6,000 mappings left: the headroom (4,096) and about 1,900 to spend.
    // Cutting 8,192 pages one by one out of the merged stretch would take
    // 16,384.
    let eaten = Eaten::until_left(6000);
    let max = max_map_count();
    let headroom = pagefold::MapBudget::DEFAULT_HEADROOM;

    let balloon = Balloon::new(Arc::clone(&a)).with_dedup(Arc::clone(&host), va);
    let pfns: Vec<u64> = (0..n).step_by(2).map(|i| i as u64).collect();
    for batch in pfns.chunks(256) {
        let rep = balloon.inflate_pfns(pagefold::GuestFrame::from_raw_slice(batch));
        assert!(rep.errors.is_empty(), "inflate: {:?}", rep.errors.first());
        assert!(
            maps() + headroom / 2 < max,
            "the guest took the process's mappings: {} of {max}",
            maps()
        );
    }
    assert_eq!(balloon.actual(), pfns.len() as u64);

    // Deflate, and the guest writes 4,096 pages back.
    for batch in pfns.chunks(256) {
        let rep = balloon.deflate_pfns(pagefold::GuestFrame::from_raw_slice(batch));
        assert!(rep.errors.is_empty(), "deflate: {:?}", rep.errors.first());
    }
    for i in (0..n).step_by(4) {
        a.write(gpa(i), &[0xee; PAGE_SIZE]).unwrap();
    }
    // The next merge runs (and spawns what it needs) without aborting.
    host.merge_now().unwrap();
    assert!(maps() + headroom / 2 < max);

    // Free page reporting of every other page of the second clone.
    let balloon_b = Balloon::new(Arc::clone(&b));
    for i in (1..n).step_by(2) {
        balloon_b.report_free(gpa(i), 0).unwrap();
    }
    assert!(maps() + headroom / 2 < max);

    for i in 0..n {
        let want_a = if i % 4 == 0 {
            [0xee; PAGE_SIZE]
        } else if i % 2 == 0 {
            [0; PAGE_SIZE] // ballooned and deflated: zeros
        } else {
            original(i)
        };
        assert!(read(&a, i) == want_a, "VM 0 page {i}");
        let got = read(&b, i);
        // A reported page reads zeros, or what it held where it stayed
        // merged for lack of mappings (it holds no memory of its own).
        let ok = got == original(i) || (i % 2 == 1 && got == [0; PAGE_SIZE]);
        assert!(ok, "VM 1 page {i}");
    }
    // The process can still make threads, and give every page back.
    std::thread::spawn(|| ()).join().unwrap();
    host.unmerge_all().unwrap();
    drop(eaten);
}
