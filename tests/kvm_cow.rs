//! KVM guests writing to pages dedup merged across VMs: every kind of store
//! a guest issues (plain, byte, SSE, non-temporal, SSE2 masked, AVX where
//! KVM offers it, `rep movsb` across pages, `rep stosq`, locked read-modify-write, a store straddling two
//! pages, a push, `fxsave`) breaks copy-on-write inside KVM's own fault
//! path, lands in the writer's private copy, and leaves the other VM and
//! the shared frame untouched; and guests that keep writing while the
//! scanner merges and unmerges in a loop never lose a write (their own
//! checksum over all their data, and the host's, agree). Skips, saying so,
//! where `/dev/kvm` is absent or unusable.
#![cfg(feature = "kvm")]
#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use pagefold_tools::mini_vmm::guest;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use pagefold::{
    kvm::{Exit, Flow, KvmVm},
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, VmOptions, PAGE_SIZE,
};

fn kvm_usable(test: &str) -> bool {
    match pagefold::kvm::probe() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIP {test}: KVM is not usable here: {e}");
            false
        }
    }
}

/// Fills the data of `mem` as the guest program's fill would.
fn fill(mem: &GuestMemory, data_pages: u64, seed: u64) {
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..data_pages {
        if guest::page_kind(p) == guest::PageKind::Zero {
            continue;
        }
        for (i, q) in page.chunks_exact_mut(8).enumerate() {
            q.copy_from_slice(&guest::fill_value(p * 512 + i as u64, seed).to_le_bytes());
        }
        mem.write(GuestPhysAddr(guest::DATA_GPA + p * PAGE_SIZE as u64), &page)
            .unwrap();
    }
}

fn data(mem: &GuestMemory, data_pages: u64) -> Vec<u8> {
    let mut out = vec![0u8; (data_pages * PAGE_SIZE as u64) as usize];
    mem.read(GuestPhysAddr(guest::DATA_GPA), &mut out).unwrap();
    out
}

#[test]
fn every_guest_store_kind_to_a_merged_page_breaks_cow_invisibly() {
    if !kvm_usable("every_guest_store_kind_to_a_merged_page_breaks_cow_invisibly") {
        return;
    }
    const PAGES: u64 = 1024;
    let store = Arc::new(FrameStore::memfd().unwrap());
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let a = guest::memory(&store, PAGES).unwrap();
    let b = guest::memory(&store, PAGES).unwrap();
    fill(&a, PAGES, 1);
    fill(&b, PAGES, 2);
    let cr3 = guest::build_page_tables(&a, PAGES).unwrap();
    let pattern = guest::pattern();
    a.write(GuestPhysAddr(guest::SCRATCH), &pattern).unwrap();
    let vm = KvmVm::new(&a).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let avx = vcpu.features().avx;
    if !avx {
        println!(
            "note: KVM offers this vCPU no AVX (CPUID.1:ECX.AVX clear in \
             KVM_GET_SUPPORTED_CPUID); the 256-bit store is not issued"
        );
    }
    let code = guest::store_kinds(avx).unwrap();
    vcpu.setup_long_mode(&guest::load(&a, &code, cr3, 1).unwrap())
        .unwrap();

    let a_id = host.register(Arc::clone(&a), VmOptions::default()).unwrap();
    host.register(Arc::clone(&b), VmOptions::default()).unwrap();
    let before_a = data(&a, PAGES);
    let before_b = data(&b, PAGES);
    host.merge_now().unwrap();
    let merged = host.vm_stats(a_id).unwrap();
    println!("kvm_cow: after merge_now: {merged:?}");

    let mut done = Vec::new();
    let report = vcpu
        .run(|exit| match exit {
            Exit::IoOut { port, data } if port == guest::PORT_STORE => {
                done.push(data[0]);
                Flow::Continue
            }
            Exit::IoOut { port, .. } if port == guest::PORT_HALT => Flow::Stop,
            other => panic!("unexpected exit {other:?}"),
        })
        .unwrap();
    println!("kvm_cow: store program ran: {report:?}, stores done {done:?}");
    assert_eq!(done, (1..=12).collect::<Vec<u8>>());

    // The model: the stores applied to A's bytes before.
    let mut want = before_a.clone();
    let stores = guest::stores();
    for s in &stores {
        if s.needs_avx && !avx {
            continue;
        }
        let at = s.offset as usize;
        let len = s.len as usize;
        if s.name.starts_with("rep stosq") {
            for q in want[at..at + len].chunks_exact_mut(8) {
                q.copy_from_slice(&pattern[..8]);
            }
        } else if s.name.starts_with("fxsave") {
            // Processor state, not modelled: take what the guest wrote.
        } else {
            want[at..at + len].copy_from_slice(&pattern[..len]);
        }
    }
    let after_a = data(&a, PAGES);
    let fx = stores
        .iter()
        .find(|s| s.name.starts_with("fxsave"))
        .unwrap();
    let fx = fx.offset as usize..(fx.offset + fx.len) as usize;
    want[fx.clone()].copy_from_slice(&after_a[fx.clone()]);
    assert_ne!(
        after_a[fx.clone()],
        before_a[fx],
        "fxsave wrote nothing visible"
    );
    for (i, (got, want)) in after_a
        .chunks_exact(PAGE_SIZE)
        .zip(want.chunks_exact(PAGE_SIZE))
        .enumerate()
    {
        if got != want {
            let diff: Vec<_> = (0..PAGE_SIZE)
                .filter(|&j| got[j] != want[j])
                .map(|j| (j, got[j], want[j]))
                .take(8)
                .collect();
            panic!("VM A data page {i} differs from the model: (offset, got, want) {diff:?}");
        }
    }
    // B (and with it every shared frame it maps) saw none of it.
    assert!(data(&b, PAGES) == before_b, "a guest write reached VM B");

    let stats = host.vm_stats(a_id).unwrap();
    println!("kvm_cow: after the stores: {stats:?}");
    // Pages written: one per store, two for the ones that cross a page.
    let written = stores
        .iter()
        .filter(|s| !s.needs_avx || avx)
        .map(|s| (s.offset + s.len - 1) / PAGE_SIZE as u64 - s.offset / PAGE_SIZE as u64 + 1)
        .sum::<u64>();
    assert!(
        host.stats().unwrap().cow_breaks >= written,
        "{written} pages written, COW breaks {}",
        host.stats().unwrap().cow_breaks
    );
    // Merging again folds A's unwritten pages back and leaves the written
    // ones (they differ) alone.
    host.merge_now().unwrap();
    assert!(data(&a, PAGES) == after_a);
    assert!(data(&b, PAGES) == before_b);
}

/// Runs the fill-and-write guest in `vms` VMs while the host merges (and,
/// every other pass, unmerges everything) in a loop; every guest verifies
/// its whole data against its running sum after each pass.
#[test]
fn guests_writing_while_the_scanner_merges_lose_nothing() {
    if !kvm_usable("guests_writing_while_the_scanner_merges_lose_nothing") {
        return;
    }
    const PAGES: u64 = 4096;
    const VMS: u64 = 3;
    const PASSES: u32 = 12;
    let program = guest::Program {
        data_pages: PAGES,
        balloon_pages: 0,
        hot_pages: 256,
        window_shift: 10,
        writes_per_round: 2000,
    };
    let code = guest::fill_and_write(&program).unwrap();
    let store = Arc::new(FrameStore::memfd().unwrap());
    let host = Arc::new(DedupHost::new(Arc::clone(&store)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    // Each pass raises the generation; a guest verifies once per
    // generation it sees, and counts its verifications.
    let generation = Arc::new(AtomicU32::new(0));
    let filled = Arc::new(AtomicU32::new(0));
    let mut threads = Vec::new();
    for seed in 1..=VMS {
        let mem = guest::memory(&store, PAGES).unwrap();
        let cr3 = guest::build_page_tables(&mem, PAGES).unwrap();
        let start = guest::load(&mem, &code, cr3, seed).unwrap();
        host.register(Arc::clone(&mem), VmOptions::default())
            .unwrap();
        let (stop, generation, filled) = (
            Arc::clone(&stop),
            Arc::clone(&generation),
            Arc::clone(&filled),
        );
        threads.push(std::thread::spawn(move || {
            let vm = KvmVm::new(&mem).unwrap();
            let mut vcpu = vm.create_vcpu(0).unwrap();
            vcpu.setup_long_mode(&start).unwrap();
            let (mut verified, mut failed, mut rounds, mut seen) = (0u32, 0u32, 0u64, 0u32);
            let mut halting = false;
            vcpu.run(|exit| match exit {
                Exit::IoOut { port, .. } if port == guest::PORT_FILLED => {
                    filled.fetch_add(1, Ordering::SeqCst);
                    Flow::Continue
                }
                Exit::IoOut { port, .. } if port == guest::PORT_PROGRESS => {
                    rounds += 1;
                    Flow::Continue
                }
                Exit::IoOut { port, data } if port == guest::PORT_VERIFY => {
                    if data[0] == 1 {
                        verified += 1;
                    } else {
                        failed += 1;
                    }
                    Flow::Continue
                }
                Exit::IoOut { port, .. } if port == guest::PORT_HALT => {
                    assert!(halting, "guest halted unasked");
                    Flow::Stop
                }
                Exit::IoOut { .. } => Flow::Continue,
                Exit::IoIn { port, data } if port == guest::PORT_CONTROL => {
                    let g = generation.load(Ordering::SeqCst);
                    let cmd = if stop.load(Ordering::SeqCst) {
                        halting = true;
                        guest::CONTROL_VERIFY_HALT
                    } else if g != seen {
                        seen = g;
                        guest::CONTROL_VERIFY
                    } else {
                        guest::CONTROL_RUN
                    };
                    data[..4].copy_from_slice(&cmd.to_le_bytes());
                    Flow::Continue
                }
                Exit::IoIn { .. } => Flow::Continue,
                Exit::Halt => panic!("HLT in ring 3"),
            })
            .unwrap();
            // The host's sum of the data equals the guest's running sum.
            let running = vcpu.regs().unwrap().r14;
            let mut bytes = vec![0u8; (PAGES * PAGE_SIZE as u64) as usize];
            mem.read(GuestPhysAddr(guest::DATA_GPA), &mut bytes)
                .unwrap();
            let host_sum = bytes
                .chunks_exact(8)
                .map(|q| u64::from_le_bytes(q.try_into().unwrap()))
                .fold(0u64, u64::wrapping_add);
            (seed, verified, failed, rounds, running == host_sum)
        }));
    }
    while filled.load(Ordering::SeqCst) < VMS as u32 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut merged_max = 0;
    for pass in 0..PASSES {
        let report = host.merge_now().unwrap();
        let stats = host.stats().unwrap();
        merged_max = merged_max.max(stats.pages_sharing);
        if pass % 2 == 1 {
            host.unmerge_all().unwrap();
        }
        println!(
            "kvm_cow: pass {pass}: merged {} pages, sharing {}, COW breaks {}",
            report.merged_shared + report.merged_zero,
            stats.pages_sharing,
            stats.cow_breaks
        );
        generation.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let final_stats = host.stats().unwrap();
    for t in threads {
        let (seed, verified, failed, rounds, sums_agree) = t.join().unwrap();
        println!(
            "kvm_cow: VM {seed}: {rounds} rounds, {verified} verifications passed, {failed} failed"
        );
        assert_eq!(
            failed, 0,
            "VM {seed}: a verification failed: a write was lost"
        );
        assert!(verified >= 2, "VM {seed} verified only {verified} times");
        assert!(sums_agree, "VM {seed}: host and guest sums differ");
    }
    // Identical content across the VMs merged (half the data pages are
    // alike in all of them until the moving window reaches them; at least
    // half of those are still alike at the first pass), and the window's
    // writes broke sharing.
    let alike = PAGES / 2 * (VMS - 1);
    assert!(
        merged_max >= alike / 2,
        "sharing peaked at {merged_max} pages, want {}",
        alike / 2
    );
    assert!(
        final_stats.cow_breaks >= program.hot_pages,
        "few COW breaks: {final_stats:?}"
    );
}
