//! Races between a VMM's threads on one `DedupHost`, found by review:
//! unregistering a VM while another thread resolves a write fault in it
//! (the shared frame another VM maps must survive), and two threads
//! starting the background scanner at once (no scanner may outlive the
//! host).

#![allow(clippy::unwrap_used)]
use std::{sync::Arc, thread};

use pagefold::{DedupHost, FrameStore, GuestMemory, GuestPhysAddr, PAGE_SIZE};

#[test]
fn unregister_racing_resolve_keeps_other_vm_data() {
    let mut hits = 0;
    for iter in 0..100 {
        let store = Arc::new(FrameStore::memfd().unwrap());
        let mk = || {
            let m = GuestMemory::with_store(
                Arc::clone(&store),
                &[(GuestPhysAddr(0), PAGE_SIZE as u64)],
            )
            .unwrap();
            m.write(GuestPhysAddr(0), &[0x5a; PAGE_SIZE]).unwrap();
            Arc::new(m)
        };
        let a = mk();
        let b = mk();
        let host = Arc::new(DedupHost::new(Arc::clone(&store)).unwrap());
        let ia = host.register(Arc::clone(&a), Default::default()).unwrap();
        let _ib = host.register(Arc::clone(&b), Default::default()).unwrap();
        let r = host.merge_now().unwrap();
        assert_eq!(r.merged_shared, 2);
        let h2 = Arc::clone(&host);
        let t = thread::spawn(move || h2.resolve_write_fault(ia, GuestPhysAddr(0)));
        // Wait until the resolver holds the page, then unregister.
        let st = &a.regions()[0];
        let mut saw = false;
        for _ in 0..10_000_000 {
            if st.page_state(0).is_some_and(|s| s.is_locked()) {
                saw = true;
                break;
            }
            std::hint::spin_loop();
        }
        host.unregister(ia).unwrap();
        let _ = t.join().unwrap();
        if saw {
            hits += 1;
        }
        let mut buf = [0u8; PAGE_SIZE];
        b.read(GuestPhysAddr(0), &mut buf).unwrap();
        assert!(
            buf.iter().all(|&x| x == 0x5a),
            "iteration {iter}: B's merged page lost its bytes (first byte {:#x}); saw lock {saw}",
            buf[0]
        );
        let mut buf = [0u8; PAGE_SIZE];
        a.read(GuestPhysAddr(0), &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0x5a), "A lost bytes");
    }
    assert!(hits > 0, "the resolver was never seen holding the page");
}

#[test]
fn unregister_keeps_the_other_vms_bytes() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let mk = || {
        let m =
            GuestMemory::with_store(Arc::clone(&store), &[(GuestPhysAddr(0), PAGE_SIZE as u64)])
                .unwrap();
        m.write(GuestPhysAddr(0), &[0x5a; PAGE_SIZE]).unwrap();
        Arc::new(m)
    };
    let a = mk();
    let b = mk();
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let ia = host.register(Arc::clone(&a), Default::default()).unwrap();
    let _ib = host.register(Arc::clone(&b), Default::default()).unwrap();
    assert_eq!(host.merge_now().unwrap().merged_shared, 2);
    host.unregister(ia).unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    b.read(GuestPhysAddr(0), &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0x5a));
}

fn scan_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == "pagefold-scan")
        .count()
}

#[test]
fn concurrent_starts_leave_no_scanner_running_after_drop() {
    use pagefold::ScanBudget;
    use std::time::Duration;
    let store = Arc::new(FrameStore::memfd().unwrap());
    for _ in 0..50 {
        let host = Arc::new(DedupHost::new(Arc::clone(&store)).unwrap());
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let h = Arc::clone(&host);
                let b = Arc::clone(&barrier);
                thread::spawn(move || {
                    b.wait();
                    h.start_background(ScanBudget::Pages(1), Duration::from_millis(5))
                        .unwrap();
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        drop(host);
        std::thread::sleep(Duration::from_millis(30));
        let n = scan_threads();
        assert_eq!(
            n, 0,
            "{n} scanner thread(s) still running after the host was dropped"
        );
    }
}
