//! Lazy restore folded on arrival, on real memory, the real userfaultfd
//! and a real dedup host: clones whose pages are touched (raw pointers,
//! several threads, two clones at once) before the background fetch runs
//! read exactly what was saved, and share one copy of each page in the
//! host's frames from the moment it arrives (the store's own count of
//! allocated memory says so); writes stay private; a later clone maps the
//! whole image at once; the VM is left alone by passes and refuses to be
//! unmerged while it arrives; a damaged page or a restore dropped early
//! takes the VM out of the host and frees what only it held.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use pagefold::{
    dedup::{DedupError, VmOptions},
    snapshot::{restore_folded_lazy, LazyError, LazyFoldOptions, SnapshotReader},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use rand::{seq::SliceRandom, SeedableRng};

mod common;
use common::{
    folded::{host, image, layout, nonzero, pages, saved, source},
    lazy::{gated_options, touch},
    temp_dir::TempDir,
};

fn snapshot(dir: &TempDir, salt: u64) -> (GuestMemory, Arc<SnapshotReader>) {
    let (orig, _) = source(salt);
    let snap = Arc::new(saved(dir, "a.snap", &orig));
    (orig, snap)
}

#[test]
fn clones_touched_before_the_fetch_read_the_snapshot_and_hold_each_page_once() {
    let dir = TempDir::new("lazy-folded");
    let (orig, snap) = snapshot(&dir, 1);
    let want = image(&orig);
    let stored = nonzero(&want) as u64;
    let (store, host) = host();
    let gate = Arc::new(AtomicBool::new(false));
    let a = restore_folded_lazy(
        &host,
        VmOptions::default(),
        Arc::clone(&snap),
        gated_options(&gate),
    )
    .unwrap();
    let b = restore_folded_lazy(
        &host,
        VmOptions::default(),
        Arc::clone(&snap),
        gated_options(&gate),
    )
    .unwrap();
    assert_eq!(a.memory.regions().len(), layout().len());
    // Both clones touched at once, from two threads each, in scrambled
    // orders: a page arrives once, whichever clone touches it first.
    let mut order = pages(&orig);
    order.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(3));
    let index = |g: GuestPhysAddr| pages(&orig).iter().position(|&p| p == g).unwrap();
    std::thread::scope(|sc| {
        for clone in [&a.memory, &b.memory] {
            for half in order.chunks(order.len().div_ceil(2)) {
                let want = &want;
                sc.spawn(move || {
                    for &gpa in half {
                        assert!(touch(clone, gpa) == want[index(gpa)], "page {gpa}");
                    }
                });
            }
        }
    });
    // Every page was read by both clones, and the host's frames hold each
    // page with content once: the image, nothing private, zero pages
    // nothing.
    assert_eq!(store.allocated_bytes().unwrap(), stored * PAGE_SIZE as u64);
    // A write stays in its clone.
    let gpa = pages(&orig)[5];
    a.memory.write(gpa, &[0x5a; PAGE_SIZE]).unwrap();
    assert!(touch(&b.memory, gpa) == want[5]);
    assert!(touch(&a.memory, gpa) == vec![0x5a; PAGE_SIZE]);

    gate.store(true, Ordering::Release);
    let (va, vb) = (a.vm, b.vm);
    let sa = a.wait().unwrap();
    let sb = b.wait().unwrap();
    for s in [&sa, &sb] {
        assert_eq!(
            s.on_fault + s.fetched + s.found + s.zero_untouched + s.damaged,
            s.pages,
            "{s:?}"
        );
        assert_eq!(s.damaged, 0);
        // The fetch placed at most a batch before the gate held it.
        assert!(s.fetched < stored / 2, "{s:?}");
    }
    // Each stored page was filled once, by one clone's fault or fetch, and
    // found there by the other.
    let filled = |s: &pagefold::snapshot::LazyStats| {
        s.on_fault - (s.zero_pages - s.zero_untouched) + s.fetched
    };
    assert_eq!(filled(&sa) + filled(&sb), stored, "{sa:?} {sb:?}");
    assert_eq!(sa.found + sb.found, stored);

    // Arrived: the image is the domain's shared frames, and a third clone
    // maps it at once, nothing to fetch, nothing allocated.
    let c = restore_folded_lazy(
        &host,
        VmOptions::default(),
        Arc::clone(&snap),
        LazyFoldOptions::default(),
    )
    .unwrap();
    assert_eq!(c.pages_done(), want.len() as u64);
    let (vc, mc) = (c.vm, Arc::clone(&c.memory));
    let sc = c.wait().unwrap();
    assert_eq!(sc.found, stored);
    for (k, gpa) in pages(&orig).into_iter().enumerate() {
        assert!(touch(&mc, gpa) == want[k], "page {gpa}");
    }
    assert_eq!(store.allocated_bytes().unwrap(), stored * PAGE_SIZE as u64);
    assert!(host.stats().unwrap().pages_shared >= stored);
    // Ordinary VMs now: unregistered, each keeps its bytes.
    for vm in [va, vb, vc] {
        let mem = host.unregister(vm).unwrap();
        for (k, g) in pages(&orig).into_iter().enumerate() {
            let mut p = vec![0u8; PAGE_SIZE];
            mem.read(g, &mut p).unwrap();
            let expect = if vm == va && k == 5 {
                vec![0x5a; PAGE_SIZE]
            } else {
                want[k].clone()
            };
            assert!(p == expect, "VM {vm:?} page {g}");
        }
    }
}

#[test]
fn an_arriving_vm_is_left_alone_by_passes_and_refuses_unmerging_until_it_arrives() {
    let dir = TempDir::new("lazy-folded-arriving");
    let (orig, snap) = snapshot(&dir, 2);
    let want = image(&orig);
    let (_store, host) = host();
    let gate = Arc::new(AtomicBool::new(false));
    let c = restore_folded_lazy(&host, VmOptions::default(), snap, gated_options(&gate)).unwrap();
    let vm = c.vm;
    assert!(matches!(host.unregister(vm), Err(DedupError::Arriving(v)) if v == vm));
    assert!(matches!(host.unmerge_all(), Err(DedupError::Arriving(v)) if v == vm));
    assert!(matches!(
        host.merge_pages(vm, &pages(&orig)),
        Err(DedupError::Arriving(v)) if v == vm
    ));
    // A pass scans nothing of it (its pages fault into the restore's
    // userfaultfd, which a merge window could not register).
    let report = host.merge_now().unwrap();
    assert_eq!(report.pages_scanned, 0, "{report:?}");
    for (k, g) in pages(&orig).into_iter().enumerate() {
        assert!(touch(&c.memory, g) == want[k], "page {g}");
    }
    gate.store(true, Ordering::Release);
    let memory = Arc::clone(&c.memory);
    c.wait().unwrap();
    // Arrived: scanned and unmerged as any VM.
    assert!(host.merge_now().unwrap().pages_scanned > 0);
    let back = host.unregister(vm).unwrap();
    assert!(Arc::ptr_eq(&back, &memory));
    assert!(image(&back) == want);
}

/// Flips a byte of stored page slot 0 of the snapshot at `path` (the
/// content part starts at the first 4 KiB boundary).
fn damage_first_slot(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 4096 + 100).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, 4096 + 100).unwrap();
}

#[test]
fn a_damaged_page_fails_the_wait_and_takes_the_vm_out_of_the_host() {
    let dir = TempDir::new("lazy-folded-damaged");
    let (orig, _) = source(3);
    let good = saved(&dir, "a.snap", &orig);
    drop(good);
    damage_first_slot(&dir.path("a.snap"));
    let snap = Arc::new(SnapshotReader::open(dir.path("a.snap")).unwrap());
    let (store, host) = host();
    let c = restore_folded_lazy(
        &host,
        VmOptions::default(),
        Arc::clone(&snap),
        LazyFoldOptions::default(),
    )
    .unwrap();
    let (vm, memory) = (c.vm, Arc::clone(&c.memory));
    let err = c.wait().unwrap_err();
    assert!(matches!(err, LazyError::Snapshot(_)), "{err}");
    // Gone from the host, its pages discarded (zeros, no frame of the
    // image mapped), and the image it filled freed with it.
    assert!(matches!(host.memory(vm), Err(DedupError::UnknownVm(v)) if v == vm));
    assert_eq!(host.stats().unwrap().pages_total, 0);
    assert!(image(&memory).iter().all(|p| p.iter().all(|&b| b == 0)));
    drop(memory);
    assert_eq!(store.allocated_bytes().unwrap(), 0);
    // The host goes on: an intact snapshot restores as before.
    let (orig2, snap2) = {
        let d = TempDir::new("lazy-folded-damaged-2");
        let (o, s) = snapshot(&d, 4);
        (o, s)
    };
    let c = restore_folded_lazy(
        &host,
        VmOptions::default(),
        snap2,
        LazyFoldOptions::default(),
    )
    .unwrap();
    let memory = Arc::clone(&c.memory);
    c.wait().unwrap();
    assert!(image(&memory) == image(&orig2));
}

#[test]
fn a_restore_dropped_before_arrival_takes_the_vm_out_and_frees_its_image() {
    let dir = TempDir::new("lazy-folded-drop");
    let (orig, snap) = snapshot(&dir, 5);
    let want = image(&orig);
    let (store, host) = host();
    let gate = Arc::new(AtomicBool::new(false));
    let c = restore_folded_lazy(&host, VmOptions::default(), snap, gated_options(&gate)).unwrap();
    for (k, g) in pages(&orig).into_iter().enumerate().step_by(3) {
        assert!(touch(&c.memory, g) == want[k], "page {g}");
    }
    let (vm, memory) = (c.vm, Arc::clone(&c.memory));
    // The fetch goes on (it may even finish): the VM arrives only at
    // `wait`, which never comes.
    gate.store(true, Ordering::Release);
    drop(c);
    assert!(matches!(host.memory(vm), Err(DedupError::UnknownVm(_))));
    // Discarded: zeros, on its own frames (none holds memory), and the
    // image nobody maps any more is freed.
    assert!(image(&memory).iter().all(|p| p.iter().all(|&b| b == 0)));
    assert_eq!(store.allocated_bytes().unwrap(), 0);
}

#[test]
fn an_excluded_region_arrives_into_its_own_frames_and_the_rest_is_shared() {
    let dir = TempDir::new("lazy-folded-exclude");
    let (orig, snap) = snapshot(&dir, 6);
    let want = image(&orig);
    let (store, host) = host();
    let second = layout()[1].0;
    let options = VmOptions {
        exclude: vec![second],
        ..VmOptions::default()
    };
    let gate = Arc::new(AtomicBool::new(false));
    let clones: Vec<_> = (0..2)
        .map(|_| {
            restore_folded_lazy(
                &host,
                options.clone(),
                Arc::clone(&snap),
                gated_options(&gate),
            )
            .unwrap()
        })
        .collect();
    for c in &clones {
        for (k, g) in pages(&orig).into_iter().enumerate() {
            assert!(touch(&c.memory, g) == want[k], "page {g}");
        }
    }
    gate.store(true, Ordering::Release);
    for c in clones {
        c.wait().unwrap();
    }
    // The first region's pages with content once (the image), the second
    // region's once per clone, in their own frames, as a lazy restore
    // places them (a touched zero page too: zeros placed into a shared
    // mapping of shmem take a page).
    let first_pages = (layout()[0].1 / PAGE_SIZE as u64) as usize;
    let in_first = nonzero(&want[..first_pages]) as u64;
    let second = (want.len() - first_pages) as u64;
    assert_eq!(
        store.allocated_bytes().unwrap() / PAGE_SIZE as u64,
        in_first + 2 * second
    );
}

#[test]
fn a_host_dropped_while_a_clone_arrives_leaves_the_clone_its_bytes() {
    let dir = TempDir::new("lazy-folded-host-gone");
    let (orig, snap) = snapshot(&dir, 7);
    let want = image(&orig);
    let (store, host) = host();
    let gate = Arc::new(AtomicBool::new(false));
    let c = restore_folded_lazy(&host, VmOptions::default(), snap, gated_options(&gate)).unwrap();
    let memory = Arc::clone(&c.memory);
    touch(&memory, pages(&orig)[2]);
    drop(host);
    gate.store(true, Ordering::Release);
    // Every page arrives, but no host is there to make it an ordinary VM.
    let err = c.wait().unwrap_err();
    assert!(
        matches!(&err, LazyError::Snapshot(e) if e.to_string().contains("not registered")),
        "{err}"
    );
    for (k, g) in pages(&orig).into_iter().enumerate() {
        assert!(touch(&memory, g) == want[k], "page {g}");
    }
    assert!(store.allocated_bytes().unwrap() >= nonzero(&want) as u64 * PAGE_SIZE as u64);
}
