//! The background scanner keeps `map_headroom` mappings free even when its
//! step never ends (found by review: it read the budget once per step).
//! Alone in its binary: it uses up most of the process's mappings.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use pagefold::{DedupHost, FrameStore, ScanBudget, VmOptions, PAGE_SIZE};

mod common;
use common::small_vms::{gpa, vm};

/// A background scanner whose step never ends (`Pages(u64::MAX)`) still
/// sees the mappings the rest of the process makes: once fewer than
/// `map_headroom` are left it merges nothing more.
#[test]
fn an_endless_background_step_keeps_the_mapping_headroom() {
    let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let maps = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count() as u64
    };
    let store = Arc::new(FrameStore::memfd().unwrap());
    let n = 256;
    let a = vm(&store, n, |i| i as u8); // all distinct (page index in first 8 bytes)
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    host.register(Arc::clone(&a), VmOptions::default()).unwrap();
    host.start_background(
        ScanBudget::Pages(u64::MAX),
        std::time::Duration::from_millis(5),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Eat mappings until only 1000 are left (headroom is 4096).
    let mut held = Vec::new();
    while maps() + 1000 < max {
        for _ in 0..1000 {
            // SAFETY: an anonymous one-page mapping, unmapped at the end.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    if held.len() % 2 == 0 {
                        libc::PROT_READ
                    } else {
                        libc::PROT_NONE
                    },
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            held.push(p as usize);
        }
    }
    eprintln!("max {max}, maps now {}", maps());
    // The scanner re-reads the budget at most every 100 ms: give it that
    // (and more) to see the mappings just made, then make duplicates.
    std::thread::sleep(std::time::Duration::from_millis(400));
    // Make isolated duplicates: every 4th page equal to page 0.
    let page0 = {
        let mut b = [0u8; PAGE_SIZE];
        a.read(gpa(0), &mut b).unwrap();
        b
    };
    for i in (4..n).step_by(4) {
        a.write(gpa(i), &page0).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    host.stop_background();
    let left = max - maps();
    let s = host.stats().unwrap();
    eprintln!(
        "after: pages_sharing {} map_limit_hits {} mappings left {left}",
        s.pages_sharing, s.map_limit_hits
    );
    for p in held {
        // SAFETY: a mapping this test made above, unmapped once.
        unsafe { libc::munmap(p as *mut libc::c_void, 4096) };
    }
    assert_eq!(
        s.pages_sharing, 0,
        "merged although fewer than map_headroom mappings were left"
    );
}
