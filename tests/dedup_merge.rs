//! Dedup end to end on real memfd frames: merge several clone VMs, check
//! the kernel's figures dropped, every byte still reads as the model says,
//! writes through the API and through raw pointers copy on write, domains
//! stay apart, and unmerge restores private frames.

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
