//! Dedup end to end on real memfd frames: merge several clone VMs, check
//! the kernel's figures dropped, every byte still reads as the model says,
//! writes through the API and through raw pointers copy on write, domains
//! stay apart, and unmerge restores private frames.

// A failed unwrap is a failed test; every size here is small.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::{atomic::Ordering, Arc};

use pagefold::{DedupHost, DomainId, FrameStore, GuestMemory, GuestPhysAddr, VmOptions, PAGE_SIZE};

const PAGES: usize = 1024; // 4 MiB per VM

/// Page `i` of VM `vm`: the first third shared by all VMs (like a booted
/// kernel image), the second third zero, the last third unique.
fn content(vm: usize, i: usize) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    match i * 3 / PAGES {
        0 => {
            for (k, c) in p.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&((i * 7919 + k) as u64).to_le_bytes());
            }
        }
        1 => {}
        _ => {
            for (k, c) in p.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&(((vm as u64) << 40) | ((i * 512 + k) as u64)).to_le_bytes());
            }
        }
    }
    p
}

fn build(store: &Arc<FrameStore>, vms: usize) -> Vec<Arc<GuestMemory>> {
    (0..vms)
        .map(|vm| {
            let mem = GuestMemory::with_store(
                Arc::clone(store),
                &[(GuestPhysAddr(0), (PAGES * PAGE_SIZE) as u64)],
            )
            .unwrap();
            for i in 0..PAGES {
                mem.write(GuestPhysAddr((i * PAGE_SIZE) as u64), &content(vm, i))
                    .unwrap();
            }
            Arc::new(mem)
        })
        .collect()
}

fn check(mem: &GuestMemory, model: &[[u8; PAGE_SIZE]]) {
    let mut buf = [0u8; PAGE_SIZE];
    for (i, want) in model.iter().enumerate() {
        mem.read(GuestPhysAddr((i * PAGE_SIZE) as u64), &mut buf)
            .unwrap();
        assert!(buf[..] == want[..], "page {i} differs from the model");
    }
}

#[test]
fn clones_fold_and_the_kernel_sees_it() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 4);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let ids: Vec<_> = vms
        .iter()
        .map(|m| host.register(Arc::clone(m), VmOptions::default()).unwrap())
        .collect();
    let before = store.allocated_bytes().unwrap();
    let report = host.merge_now().unwrap();
    let after = store.allocated_bytes().unwrap();

    let dup_contents = (0..PAGES).filter(|i| i * 3 / PAGES == 0).count();
    let zero_pages = (0..PAGES).filter(|i| i * 3 / PAGES == 1).count();
    assert_eq!(report.merged_shared as usize, 4 * dup_contents);
    assert_eq!(report.merged_zero as usize, 4 * zero_pages);
    let stats = host.stats().unwrap();
    assert_eq!(stats.pages_shared as usize, dup_contents);
    assert_eq!(stats.pages_sharing as usize, 3 * dup_contents);
    assert_eq!(stats.zero_pages as usize, 4 * zero_pages);
    // The kernel's figure: frames of 3 of every 4 clone pages and all zero
    // pages are gone.
    let saved_pages = (before - after) / PAGE_SIZE as u64;
    assert!(
        saved_pages as usize >= 3 * dup_contents,
        "store shrank by only {saved_pages} pages (before {before}, after {after})"
    );
    // Clones map runs of consecutive shared frames: the merge needed far
    // fewer remaps than pages.
    // (at most 512 pages per write-protect window, so a few per VM).
    assert!(report.remaps <= 4 * 4, "remaps {}", report.remaps);
    let kv = host.kernel_view().unwrap();
    assert!(
        kv.guest_mappings <= 4 * 6,
        "guest mappings {}",
        kv.guest_mappings
    );

    for (vm, mem) in vms.iter().enumerate() {
        let model: Vec<_> = (0..PAGES).map(|i| content(vm, i)).collect();
        check(mem, &model);
    }
    for id in &ids {
        let s = host.vm_stats(*id).unwrap();
        assert_eq!(s.pages_merged as usize, dup_contents);
    }
}

#[test]
fn writes_to_merged_pages_copy_on_write() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 2);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let a = host
        .register(Arc::clone(&vms[0]), VmOptions::default())
        .unwrap();
    host.register(Arc::clone(&vms[1]), VmOptions::default())
        .unwrap();
    host.merge_now().unwrap();
    let mut models: Vec<Vec<[u8; PAGE_SIZE]>> = (0..2)
        .map(|vm| (0..PAGES).map(|i| content(vm, i)).collect())
        .collect();

    // Library write to a shared page of VM 0.
    vms[0]
        .write(GuestPhysAddr(3 * PAGE_SIZE as u64 + 100), b"hello")
        .unwrap();
    models[0][3][100..105].copy_from_slice(b"hello");
    // Atomic on a zero page.
    let zp = PAGES / 2;
    vms[0]
        .store(
            GuestPhysAddr((zp * PAGE_SIZE) as u64 + 8),
            0x1122_3344_5566_7788u64,
            Ordering::SeqCst,
        )
        .unwrap();
    models[0][zp][8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    // Raw pointer write to a shared page of VM 1, as a device model would.
    let hva = vms[1]
        .host_address(GuestPhysAddr(6 * PAGE_SIZE as u64))
        .unwrap();
    // SAFETY: the address is inside VM 1's live mapping (page 6 of 1024).
    unsafe { std::ptr::write_volatile(hva.0 as *mut u64, 0xdead_beef) };
    models[1][6][..8].copy_from_slice(&0xdead_beef_u64.to_le_bytes());

    check(&vms[0], &models[0]);
    check(&vms[1], &models[1]);
    let s = host.stats().unwrap();
    assert!(s.cow_breaks >= 3, "kernel copies noticed: {}", s.cow_breaks);

    // resolve_write_fault brings a merged page back to its own frame.
    assert!(host
        .resolve_write_fault(a, GuestPhysAddr(9 * PAGE_SIZE as u64))
        .unwrap());
    assert!(!host
        .resolve_write_fault(a, GuestPhysAddr(9 * PAGE_SIZE as u64))
        .unwrap());
    check(&vms[0], &models[0]);

    // Unmerge everything: all pages private again, contents unchanged.
    host.unmerge_all().unwrap();
    for (vm, mem) in vms.iter().enumerate() {
        let c = mem.census();
        assert_eq!(
            c.private as usize, PAGES,
            "VM {vm} fully private after unmerge"
        );
        check(mem, &models[vm]);
    }
    assert_eq!(
        host.stats().unwrap().pages_shared,
        0,
        "no shared frame left"
    );
}

/// Long runs of one content (a guest's `0xcc` padding, `0xff` fill) map a
/// template of identical shared frames, so a run costs a remap per 64
/// pages instead of one per page; the contents, copy on write and unmerge
/// are as for any merged page.
#[test]
fn runs_of_one_content_map_a_template() {
    const RUN: usize = 512;
    let store = Arc::new(FrameStore::memfd().unwrap());
    let fill = |vm: usize, i: usize| {
        let mut p = content(vm, i);
        if (100..100 + RUN).contains(&i) {
            p = [0xcc; PAGE_SIZE];
        }
        p
    };
    let vms: Vec<Arc<GuestMemory>> = (0..2)
        .map(|vm| {
            let mem = GuestMemory::with_store(
                Arc::clone(&store),
                &[(GuestPhysAddr(0), (PAGES * PAGE_SIZE) as u64)],
            )
            .unwrap();
            for i in 0..PAGES {
                mem.write(GuestPhysAddr((i * PAGE_SIZE) as u64), &fill(vm, i))
                    .unwrap();
            }
            Arc::new(mem)
        })
        .collect();
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    for m in &vms {
        host.register(Arc::clone(m), VmOptions::default()).unwrap();
    }
    let report = host.merge_now().unwrap();
    let mut models: Vec<Vec<[u8; PAGE_SIZE]>> = (0..2)
        .map(|vm| (0..PAGES).map(|i| fill(vm, i)).collect())
        .collect();
    // Shared: the run in both VMs, and the rest of the first third.
    let others = (0..PAGES)
        .filter(|i| i * 3 / PAGES == 0 && !(100..100 + RUN).contains(i))
        .count();
    assert_eq!(report.merged_shared as usize, 2 * (RUN + others));
    // One template of 64 frames for the run: 8 remaps per VM for it, where
    // one frame would need 512.
    let s = host.stats().unwrap();
    assert_eq!(s.pages_shared as usize, others + 64);
    assert!(report.remaps <= 2 * (8 + 8), "remaps {}", report.remaps);
    for (vm, mem) in vms.iter().enumerate() {
        check(mem, &models[vm]);
    }
    // A write to one page of the run copies only that page.
    vms[1]
        .write(GuestPhysAddr(200 * PAGE_SIZE as u64 + 5), b"x")
        .unwrap();
    models[1][200][5] = b'x';
    for (vm, mem) in vms.iter().enumerate() {
        check(mem, &models[vm]);
    }
    host.unmerge_all().unwrap();
    for (vm, mem) in vms.iter().enumerate() {
        assert_eq!(mem.census().private as usize, PAGES);
        check(mem, &models[vm]);
    }
    assert_eq!(host.stats().unwrap().pages_shared, 0);
}

#[test]
fn different_domains_share_nothing() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 2);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    host.register(
        Arc::clone(&vms[0]),
        VmOptions {
            domain: DomainId(1),
            exclude: vec![],
        },
    )
    .unwrap();
    host.register(
        Arc::clone(&vms[1]),
        VmOptions {
            domain: DomainId(2),
            exclude: vec![],
        },
    )
    .unwrap();
    let r = host.merge_now().unwrap();
    assert_eq!(
        r.merged_shared, 0,
        "identical pages in two domains must not be shared"
    );
    let s = host.stats().unwrap();
    assert_eq!(s.pages_shared, 0);
    assert!(s.zero_pages > 0, "zero pages are released in every domain");
}

#[test]
fn incremental_steps_merge_only_pages_that_held_still() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 2);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    for m in &vms {
        host.register(Arc::clone(m), VmOptions::default()).unwrap();
    }
    // First full pass: every page is seen for the first time, so nothing is
    // stable yet (KSM's rule) and nothing merges.
    let first = host
        .scan_step(pagefold::ScanBudget::Pages((2 * PAGES) as u64))
        .unwrap();
    assert!(first.full_scan_completed);
    assert_eq!(first.merged_shared + first.merged_zero, 0);
    assert_eq!(first.volatile as usize, 2 * PAGES);

    // Keep one shared page changing between passes: it must stay unmerged.
    let hot = GuestPhysAddr(5 * PAGE_SIZE as u64);
    vms[1].write_obj(hot, 1u64).unwrap();
    let second = host
        .scan_step(pagefold::ScanBudget::Pages((2 * PAGES) as u64))
        .unwrap();
    let dup_contents = (0..PAGES).filter(|i| i * 3 / PAGES == 0).count();
    let zero_pages = (0..PAGES).filter(|i| i * 3 / PAGES == 1).count();
    assert_eq!(
        second.volatile, 1,
        "the page written between passes is volatile"
    );
    assert_eq!(second.merged_zero as usize, 2 * zero_pages);
    // VM 0's copy of the hot page has no stable partner; the rest pair up.
    assert_eq!(second.merged_shared as usize, 2 * dup_contents - 2);
    assert_eq!(host.stats().unwrap().full_scans, 2);

    // A time budget also makes progress and stops.
    let t = host
        .scan_step(pagefold::ScanBudget::Time(
            std::time::Duration::from_millis(5),
        ))
        .unwrap();
    assert!(t.pages_scanned > 0);
}

#[test]
fn excluded_regions_are_left_alone() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let layout = [
        (GuestPhysAddr(0), 64 * PAGE_SIZE as u64),
        (GuestPhysAddr(1 << 30), 64 * PAGE_SIZE as u64),
    ];
    let a = Arc::new(GuestMemory::with_store(Arc::clone(&store), &layout).unwrap());
    let b = Arc::new(GuestMemory::with_store(Arc::clone(&store), &layout).unwrap());
    for m in [&a, &b] {
        m.fill(GuestPhysAddr(0), 0x5a, 64 * PAGE_SIZE).unwrap();
        m.fill(GuestPhysAddr(1 << 30), 0x5a, 64 * PAGE_SIZE)
            .unwrap();
    }
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let opts = VmOptions {
        domain: DomainId(0),
        exclude: vec![GuestPhysAddr(1 << 30)],
    };
    host.register(Arc::clone(&a), opts.clone()).unwrap();
    host.register(Arc::clone(&b), opts).unwrap();
    host.merge_now().unwrap();
    for m in [&a, &b] {
        let high = &m.regions()[1];
        assert_eq!(
            high.census(),
            pagefold::memory::PageCensus {
                private: 64,
                ..Default::default()
            },
            "excluded region untouched"
        );
        let low = &m.regions()[0];
        assert_eq!(low.census().shared, 64, "included region merged");
    }
}

#[test]
fn near_the_mapping_limit_merging_stops_and_writes_still_work() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 2);
    // A headroom as large as the whole budget leaves nothing for dedup.
    let host = pagefold::DedupHost::with_options(
        Arc::clone(&store),
        pagefold::dedup::DedupOptions {
            map_headroom: u64::MAX / 2,
        },
    )
    .unwrap();
    for m in &vms {
        host.register(Arc::clone(m), VmOptions::default()).unwrap();
    }
    let r = host.merge_now().unwrap();
    assert_eq!(r.merged_shared + r.merged_zero, 0);
    assert!(r.map_limit > 0);
    assert_eq!(host.stats().unwrap().map_limit_hits, r.map_limit);
    vms[0].write_obj(GuestPhysAddr(0), 42u64).unwrap();
    assert_eq!(vms[0].read_obj::<u64>(GuestPhysAddr(0)).unwrap(), 42);
}

#[test]
fn unregister_gives_the_vm_back_private_and_whole() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 2);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let a = host
        .register(Arc::clone(&vms[0]), VmOptions::default())
        .unwrap();
    host.register(Arc::clone(&vms[1]), VmOptions::default())
        .unwrap();
    host.merge_now().unwrap();
    let mem = host.unregister(a).unwrap();
    assert_eq!(mem.census().private as usize, PAGES);
    let model: Vec<_> = (0..PAGES).map(|i| content(0, i)).collect();
    check(&mem, &model);
    assert!(matches!(
        host.vm_stats(a),
        Err(pagefold::DedupError::UnknownVm(_))
    ));
    // Dropping the host unmerges the rest.
    drop(host);
    assert_eq!(vms[1].census().private as usize, PAGES);
}

#[test]
fn registration_is_checked() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 1);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let bad = VmOptions {
        domain: DomainId(0),
        exclude: vec![GuestPhysAddr(0x1000)],
    };
    assert!(matches!(
        host.register(Arc::clone(&vms[0]), bad),
        Err(pagefold::DedupError::NoSuchRegion(GuestPhysAddr(0x1000)))
    ));
    let id = host
        .register(Arc::clone(&vms[0]), VmOptions::default())
        .unwrap();
    assert!(matches!(
        host.register(Arc::clone(&vms[0]), VmOptions::default()),
        Err(pagefold::DedupError::AlreadyRegistered)
    ));
    // A second host on the same store may not take the same memory either.
    let other = DedupHost::new(Arc::clone(&store)).unwrap();
    assert!(matches!(
        other.register(Arc::clone(&vms[0]), VmOptions::default()),
        Err(pagefold::DedupError::AlreadyRegistered)
    ));
    host.unregister(id).unwrap();
    other
        .register(Arc::clone(&vms[0]), VmOptions::default())
        .unwrap();
    let msg = host.vm_stats(id).unwrap_err().to_string();
    assert!(msg.contains(&format!("VM {}", id.0)), "{msg}");
}

#[test]
fn background_scanner_folds_like_ksmd_and_stops() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 2);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    for m in &vms {
        host.register(Arc::clone(m), VmOptions::default()).unwrap();
    }
    host.start_background(
        pagefold::ScanBudget::Pages(512),
        std::time::Duration::from_millis(2),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let dup_contents = (0..PAGES).filter(|i| i * 3 / PAGES == 0).count() as u64;
    loop {
        let s = host.stats().unwrap();
        if s.pages_sharing == dup_contents {
            // Pages merge during the second pass, after a first one saw them.
            assert!(s.full_scans >= 1, "merging needs a page seen twice: {s:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "background scanner made no progress: {s:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    host.stop_background();
    let scans = host.stats().unwrap().full_scans;
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        host.stats().unwrap().full_scans,
        scans,
        "stopped means stopped"
    );
    assert_eq!(host.stats().unwrap().background_errors, 0);
}

/// A background scanner on a one-thread pool of its own, with a budget of
/// endless full scans per step (`Pages(u64::MAX)`, no pause): it folds, and
/// a stop still ends it (between batches, not after the step).
#[test]
fn one_thread_background_scanner_with_an_endless_budget_folds_and_stops() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 2);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    for m in &vms {
        host.register(Arc::clone(m), VmOptions::default()).unwrap();
    }
    host.start_background_on(
        pagefold::ScanBudget::Pages(u64::MAX),
        std::time::Duration::ZERO,
        std::num::NonZeroUsize::new(1).unwrap(),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let dup_contents = (0..PAGES).filter(|i| i * 3 / PAGES == 0).count() as u64;
    while host.stats().unwrap().pages_sharing < dup_contents {
        assert!(
            std::time::Instant::now() < deadline,
            "background scanner made no progress: {:?}",
            host.stats().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    host.stop_background();
    let scans = host.stats().unwrap().full_scans;
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        host.stats().unwrap().full_scans,
        scans,
        "stopped means stopped"
    );
    assert_eq!(host.stats().unwrap().background_errors, 0);
    for (vm, m) in vms.iter().enumerate() {
        let model: Vec<[u8; PAGE_SIZE]> = (0..PAGES).map(|i| content(vm, i)).collect();
        check(m, &model);
    }
}

#[test]
fn a_step_over_nothing_returns() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let m =
        Arc::new(GuestMemory::with_store(Arc::clone(&store), &[(GuestPhysAddr(0), 4096)]).unwrap());
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let empty = host.scan_step(pagefold::ScanBudget::Pages(100)).unwrap();
    assert_eq!(empty.pages_scanned, 0);
    host.register(
        m,
        VmOptions {
            domain: DomainId(0),
            exclude: vec![GuestPhysAddr(0)],
        },
    )
    .unwrap();
    let r = host.scan_step(pagefold::ScanBudget::Pages(100)).unwrap();
    assert_eq!(r.pages_scanned, 0);
    let r = host
        .scan_step(pagefold::ScanBudget::Time(
            std::time::Duration::from_millis(1),
        ))
        .unwrap();
    assert_eq!(r.pages_scanned, 0);
}

/// A VM whose memory lives in a store of its own (as a VMM process's
/// memory does under the host service) merges with one in the host's
/// store: shared frames come from the host's store, the merged pages' own
/// frames are released in the VM's store, writes copy, and unregistering
/// writes every page back into the VM's own store.
#[test]
fn a_vm_on_its_own_store_merges_with_the_hosts() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms = build(&store, 1);
    let own = Arc::new(FrameStore::memfd().unwrap());
    let other = build(&own, 1).remove(0);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    host.register(Arc::clone(&vms[0]), VmOptions::default())
        .unwrap();
    let b = host
        .register(Arc::clone(&other), VmOptions::default())
        .unwrap();
    let own_before = own.allocated_bytes().unwrap();
    let report = host.merge_now().unwrap();
    assert!(report.merged_shared > 0, "{report:?}");
    let own_after = own.allocated_bytes().unwrap();
    assert!(
        own_after < own_before,
        "the VM's own store released nothing: {own_before} -> {own_after}"
    );
    let mut model: Vec<_> = (0..PAGES).map(|i| content(0, i)).collect();
    check(&other, &model);
    // A write to a merged page lands in the VM, not in the shared frame.
    let page = (0..PAGES)
        .find(|&i| {
            other.regions()[0]
                .page_state(i)
                .is_some_and(|s| s.kind() == pagefold::PageKind::Shared)
        })
        .expect("a merged page");
    other
        .write(GuestPhysAddr((page * PAGE_SIZE) as u64), &[0xA5; 64])
        .unwrap();
    model[page][..64].fill(0xA5);
    check(&other, &model);
    check(
        &vms[0],
        &(0..PAGES).map(|i| content(0, i)).collect::<Vec<_>>(),
    );
    let mem = host.unregister(b).unwrap();
    assert_eq!(mem.census().private as usize, PAGES);
    check(&mem, &model);
}
