//! A balloon inflate racing a dirty-log harvester (a pre-copy sender): the
//! last copy the harvester made of a page after the page's last report
//! equals the page (zeros once ballooned). Found by review: the inflate
//! marked the page before punching it, so a harvest in between copied the
//! old bytes and nothing reported the zeros.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc, Mutex,
};

use pagefold::{Balloon, DirtyRun, GuestMemory, GuestPhysAddr, RegionSet};

const P: u64 = 4096;

#[test]
fn an_inflate_racing_a_harvest_is_reported_after_it_zeroes() {
    let mem = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), 64 * P)]).unwrap());
    let balloon = Balloon::new(Arc::clone(&mem));
    mem.set_dirty_tracking(RegionSet::All, true).unwrap();
    // Last copy of each page the harvester made ("sent"), all 0xab at first.
    let copies = Arc::new(Mutex::new(vec![vec![0u8; P as usize]; 64]));
    let iters = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let (mem, copies, iters, stop) = (
            Arc::clone(&mem),
            Arc::clone(&copies),
            Arc::clone(&iters),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            let mut runs: Vec<DirtyRun> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                runs.clear();
                mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();
                let mut c = copies.lock().unwrap();
                for r in &runs {
                    for k in 0..r.pages {
                        let pfn = r.start.0 / P + k;
                        mem.read(GuestPhysAddr(pfn * P), &mut c[pfn as usize])
                            .unwrap();
                    }
                }
                drop(c);
                iters.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let wait_two = || {
        let i = iters.load(Ordering::SeqCst);
        while iters.load(Ordering::SeqCst) < i + 2 {
            std::hint::spin_loop();
        }
    };
    let mut lost = Vec::new();
    for trial in 0..5000u64 {
        let pfn = trial % 64;
        let gpa = GuestPhysAddr(pfn * P);
        balloon.deflate_pfns(pagefold::GuestFrame::from_raw_slice(&[pfn]));
        mem.fill(gpa, 0xab, P as usize).unwrap();
        wait_two();
        let r = balloon.inflate_pfns(pagefold::GuestFrame::from_raw_slice(&[pfn]));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        wait_two();
        let mut now = vec![0u8; P as usize];
        mem.read(gpa, &mut now).unwrap();
        if copies.lock().unwrap()[pfn as usize] != now {
            lost.push(trial);
        }
    }
    stop.store(true, Ordering::SeqCst);
    h.join().unwrap();
    assert!(
        lost.is_empty(),
        "{} of 5000 trials: the last copy after the page's last report is stale (first: {:?})",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}
