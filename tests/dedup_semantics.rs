//! KSM's meanings, checked where a review found them wrong: a page the
//! kernel already copied is one COW break, not two; memory the guest never
//! touched is neither scanned nor counted as saved; unregistering a VM
//! does not make the incremental scan skip pages; `merge_now` is a full
//! scan for `pages_volatile` too.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use pagefold::{
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, ScanBudget, VmOptions, PAGE_SIZE,
};

mod common;
use common::small_vms::{gpa, vm};

/// A page the kernel already copied (counted by reconciliation) is not
/// counted again by `resolve_write_fault`, which says it was not merged.
#[test]
fn a_copied_page_is_one_cow_break() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let a = vm(&store, 4, |_| 7);
    let b = vm(&store, 4, |_| 7);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let ia = host.register(Arc::clone(&a), VmOptions::default()).unwrap();
    let _ib = host.register(Arc::clone(&b), VmOptions::default()).unwrap();
    host.merge_now().unwrap();
    let hva = a.host_address(gpa(1)).unwrap();
    // SAFETY: inside the memory's live mapping, aligned; nothing else
    // touches the page now.
    unsafe { std::ptr::write_volatile((hva.0 + 104) as *mut u64, 0xdead_beef) };
    let s1 = host.stats().unwrap();
    let was = host.resolve_write_fault(ia, gpa(1)).unwrap();
    let s2 = host.stats().unwrap();
    assert_eq!(s1.cow_breaks, 1, "the kernel's copy, reconciled");
    assert!(!was, "the page shared nothing any more");
    assert_eq!(s2.cow_breaks, 1, "one write, one COW break");
    let mut word = [0u8; 8];
    a.read(GuestPhysAddr(gpa(1).0 + 104), &mut word).unwrap();
    assert_eq!(u64::from_le_bytes(word), 0xdead_beef, "the write kept");
}

/// Guest memory nobody touched holds no memory: it is not merged, not
/// counted as saved, and the guest's first writes to it are no COW breaks.
#[test]
fn untouched_memory_is_not_counted_as_saved() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let pages = 4096;
    let mem = Arc::new(
        GuestMemory::with_store(
            Arc::clone(&store),
            &[(GuestPhysAddr(0), (pages * PAGE_SIZE) as u64)],
        )
        .unwrap(),
    );
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let id = host
        .register(Arc::clone(&mem), VmOptions::default())
        .unwrap();
    let before = store.allocated_bytes().unwrap();
    let r = host.merge_now().unwrap();
    let after = store.allocated_bytes().unwrap();
    let s = host.stats().unwrap();
    assert_eq!((before, after), (0, 0));
    assert_eq!(r.merged_zero, 0);
    assert_eq!(r.pages_hashed, 0, "untouched pages are not read");
    assert_eq!(s.zero_pages, 0);
    assert!(
        s.profit_bytes <= 0,
        "profit {} for memory never allocated",
        s.profit_bytes
    );
    for i in 0..100 {
        mem.write(gpa(i), &[1u8; 8]).unwrap();
    }
    let s = host.stats().unwrap();
    let v = host.vm_stats(id).unwrap();
    assert_eq!(
        (s.cow_breaks, v.cow_breaks),
        (0, 0),
        "first touches are no COW breaks"
    );
    // Written zeros are memory: those are released.
    mem.fill(gpa(200), 0, 16 * PAGE_SIZE).unwrap();
    assert_eq!(host.merge_now().unwrap().merged_zero, 16);
}

/// Unregistering a VM before the scan's cursor does not move the cursor
/// into the next VM: the full scan still visits every page after it.
#[test]
fn unregistering_a_vm_skips_no_page_of_the_others() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let n = 100;
    let a = vm(&store, n, |_| 1);
    let b = vm(&store, n, |_| 2);
    let c = vm(&store, n, |_| 3);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let ia = host.register(a, VmOptions::default()).unwrap();
    let _ = host.register(b, VmOptions::default()).unwrap();
    let _ = host.register(c, VmOptions::default()).unwrap();
    let r = host.scan_step(ScanBudget::Pages(150)).unwrap(); // cursor: B page 50
    assert!(!r.full_scan_completed);
    host.unregister(ia).unwrap();
    let mut scanned = 0;
    loop {
        let r = host.scan_step(ScanBudget::Pages(10)).unwrap();
        scanned += r.pages_scanned;
        if r.full_scan_completed {
            break;
        }
    }
    assert!(
        scanned >= 150,
        "B[50..] and C were not all visited before the scan counted as full"
    );
}

/// `pages_volatile` after `merge_now` (a full scan) is that of the last full
/// scan, not mixed with a partial incremental one.
#[test]
fn merge_now_is_a_full_scan_for_pages_volatile() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let a = vm(&store, 100, |_| 1);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    host.register(a, VmOptions::default()).unwrap();
    host.scan_step(ScanBudget::Pages(50)).unwrap();
    host.merge_now().unwrap();
    let r = host.scan_step(ScanBudget::Pages(100)).unwrap();
    assert!(r.full_scan_completed);
    assert_eq!(host.stats().unwrap().pages_volatile, r.volatile);
}

/// A background scanner with nothing to do per step is refused, not left to
/// spin (re-reading the process's mappings under the mmap lock).
#[test]
fn an_empty_background_budget_is_refused() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    for budget in [
        ScanBudget::Pages(0),
        ScanBudget::Time(std::time::Duration::ZERO),
    ] {
        assert!(matches!(
            host.start_background(budget, std::time::Duration::ZERO),
            Err(pagefold::DedupError::EmptyBudget)
        ));
    }
    host.start_background(ScanBudget::Pages(1), std::time::Duration::from_millis(1))
        .unwrap();
    host.stop_background();
}
