//! Review of dirty-page tracking (issue 18): what the log must never miss,
//! checked against the real kernel. The raw-write tracker finds a raw
//! write to a page that was discarded or ballooned after it armed its
//! protection, and writes to transparent huge pages (the kernel splits the
//! huge mapping and reports the written 4 KiB pages); and the bytes a
//! harvester copies after each harvest equal memory once the writers stop,
//! for library writes (whose marks take the skip-if-set path on a hot set)
//! and raw writes found by the tracker; and a KVM guest's writes (no KVM
//! dirty log) are found by the tracker alone, exactly, and none is lost
//! while collects race the running guest. Prints a SKIP line and passes
//! where the kernel cannot run the tracker (before Linux 6.7) or
//! `/dev/kvm` is unusable.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use pagefold::{
    memory::AnonymousRegion, Balloon, DirtyError, DirtyRun, GuestFrame, GuestMemory, GuestPhysAddr,
    HostVirtAddr, RawWriteTracker, RegionSet, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE as u64;
const HUGE: usize = 2 << 20;

/// A tracker over all of `m`, or `None` (with a SKIP line) where the kernel
/// cannot run one.
fn tracker(m: &Arc<GuestMemory>, test: &str) -> Option<RawWriteTracker> {
    match RawWriteTracker::new(Arc::clone(m), RegionSet::All) {
        Ok(t) => Some(t),
        Err(DirtyError::TrackerUnavailable { reason }) => {
            println!("SKIP {test}: raw-write tracker unavailable on this kernel: {reason}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

fn pages_of(runs: &[DirtyRun]) -> Vec<u64> {
    runs.iter()
        .flat_map(|r| (0..r.pages).map(move |k| r.start.0 / P + k))
        .collect()
}

/// The pages `t` finds written, then harvested (and so cleared).
fn collect(m: &GuestMemory, t: &RawWriteTracker) -> Vec<u64> {
    t.collect().unwrap();
    let mut runs = Vec::new();
    m.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    pages_of(&runs)
}

/// Stores `v` through the host mapping at guest-physical `a` (a vCPU's or a
/// device model's write).
fn raw_write(m: &GuestMemory, a: u64, v: u64) {
    let p = m.host_address(GuestPhysAddr(a)).unwrap().0 as *mut u64;
    // SAFETY: `a` is 8-byte aligned inside a region of `m`, whose mapping
    // lives as long as `m`; nothing forms a reference into guest memory.
    unsafe { p.write_volatile(v) };
}

/// Punching a page (discard, balloon inflate) drops its page-table entry
/// and with it the tracker's protection: the kernel must still report the
/// next raw write, which allocates the page again. Library tracking stays
/// off, so only the tracker can find these pages.
#[test]
fn a_raw_write_to_a_discarded_or_ballooned_page_is_found() {
    let m = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), 64 * P)]).unwrap());
    for p in 0..8 {
        m.write(GuestPhysAddr(p * P), &[1]).unwrap();
    }
    let Some(t) = tracker(&m, "a_raw_write_to_a_discarded_or_ballooned_page_is_found") else {
        return;
    };
    // Page 1 written and collected (protected again), page 2 untouched
    // (protected since arming), page 3 written and not collected yet.
    raw_write(&m, P, 5);
    assert_eq!(collect(&m, &t), vec![1]);
    raw_write(&m, 3 * P, 5);
    m.discard(GuestPhysAddr(P), 3 * P).unwrap();
    let after_discard = collect(&m, &t);
    assert!(
        after_discard.iter().all(|&p| p == 3),
        "only the page written before the punch may be reported: {after_discard:?}"
    );
    for p in 1..4 {
        raw_write(&m, p * P, 7);
    }
    assert_eq!(collect(&m, &t), vec![1, 2, 3], "writes after the punch");

    let balloon = Balloon::new(Arc::clone(&m));
    let r = balloon.inflate_pfns(GuestFrame::from_raw_slice(&[5, 6]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(collect(&m, &t).is_empty(), "an inflate writes nothing");
    raw_write(&m, 5 * P, 7);
    assert_eq!(collect(&m, &t), vec![5], "a vCPU reusing a ballooned page");
    let mut b = [0u8; 8];
    m.read(GuestPhysAddr(5 * P), &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 7);
}

/// The VMM's anonymous memory with transparent huge pages asked for
/// (`MADV_HUGEPAGE`), populated before the tracker arms (huge mappings
/// then) or not: a raw write inside a huge page is reported as its own
/// 4 KiB page, every time.
#[test]
fn raw_writes_to_transparent_huge_pages_are_found() {
    const LEN: usize = 4 * HUGE;
    for populated in [true, false] {
        // SAFETY: a new private anonymous mapping at an address the kernel
        // picks; nothing else is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN + HUGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED);
        let host = (raw as usize).next_multiple_of(HUGE);
        // SAFETY: advice on the test's own mapping. Refused where THP is
        // compiled out: the test then runs on small pages.
        let _ = unsafe { libc::madvise(host as *mut libc::c_void, LEN, libc::MADV_HUGEPAGE) };
        if populated {
            for off in (0..LEN).step_by(PAGE_SIZE) {
                // SAFETY: inside the mapping above, which nothing else uses.
                unsafe { ((host + off) as *mut u8).write_volatile(1) };
            }
        }
        let regions = [AnonymousRegion {
            guest_start: GuestPhysAddr(0),
            size: LEN as u64,
            host_addr: HostVirtAddr(host as u64),
        }];
        // SAFETY: anonymous, readable and writable, unmapped only after the
        // memory and the tracker drop (below).
        let m = Arc::new(unsafe { GuestMemory::adopt_anonymous(&regions) }.unwrap());
        let Some(t) = tracker(&m, "raw_writes_to_transparent_huge_pages_are_found") else {
            drop(m);
            // SAFETY: the mapping made above; the memory over it is gone.
            unsafe { libc::munmap(raw, LEN + HUGE) };
            return;
        };
        let huge_pages = (LEN / HUGE) as u64;
        let per_huge = HUGE as u64 / P;
        for k in [3u64, 5, 3] {
            for h in 0..huge_pages {
                raw_write(&m, (h * per_huge + k) * P, k);
            }
            let want: Vec<u64> = (0..huge_pages).map(|h| h * per_huge + k).collect();
            assert_eq!(collect(&m, &t), want, "populated {populated}, page {k}");
        }
        drop(t);
        drop(m);
        // SAFETY: the mapping made above; the memory over it is gone.
        unsafe { libc::munmap(raw, LEN + HUGE) };
    }
}

/// Writers store to a hot set of pages (so most marks find their bit set
/// and skip the atomic) and to the rest; a harvester copies every page it
/// is given. Once the writers stop and a last harvest is copied, the
/// copies equal memory: no write was reported before its bytes were
/// visible, and none was left unreported.
fn copies_equal_memory(raw: bool) {
    const PAGES: u64 = 256;
    const ROUNDS: usize = 10_000;
    let m = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), PAGES * P)]).unwrap());
    m.set_dirty_tracking(RegionSet::All, true).unwrap();
    let t = if raw {
        match tracker(&m, "harvested_copies_equal_memory (raw writes)") {
            Some(t) => Some(t),
            None => return,
        }
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|k| {
            let (m, stop) = (Arc::clone(&m), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ k;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = if i % 4 != 0 { x % 8 } else { x % PAGES };
                    let a = page * P + (x >> 40) % 512 * 8;
                    if raw {
                        raw_write(&m, a, i);
                    } else {
                        m.write_obj(GuestPhysAddr(a), i).unwrap();
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let mut copy = vec![0u8; (PAGES * P) as usize];
    let mut runs = Vec::new();
    let mut pass = |copy: &mut [u8]| {
        if let Some(t) = &t {
            t.collect().unwrap();
        }
        runs.clear();
        m.harvest_dirty(RegionSet::All, &mut runs).unwrap();
        for p in pages_of(&runs) {
            let s = (p * P) as usize;
            m.read(GuestPhysAddr(p * P), &mut copy[s..s + PAGE_SIZE])
                .unwrap();
        }
        !runs.is_empty()
    };
    // Enough rounds that found writes to have raced the writers, within a
    // bound (the writers may be starved on a busy machine).
    let (mut rounds, mut busy) = (0usize, 0usize);
    while rounds < 50 * ROUNDS && (rounds < ROUNDS || busy < ROUNDS / 10) {
        if pass(&mut copy) {
            busy += 1;
        } else {
            std::thread::yield_now();
        }
        rounds += 1;
    }
    println!("raw {raw}: {rounds} rounds, {busy} found writes");
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    pass(&mut copy);
    let mut now = vec![0u8; copy.len()];
    m.read(GuestPhysAddr(0), &mut now).unwrap();
    let stale: Vec<usize> = (0..PAGES as usize)
        .filter(|&p| copy[p * PAGE_SIZE..][..PAGE_SIZE] != now[p * PAGE_SIZE..][..PAGE_SIZE])
        .collect();
    assert!(
        stale.is_empty(),
        "raw {raw}: stale copies of pages {stale:?}"
    );
}

#[test]
fn harvested_copies_equal_memory_library_writes() {
    copies_equal_memory(false);
}

#[test]
fn harvested_copies_equal_memory_raw_writes() {
    copies_equal_memory(true);
}

/// At least `want` free 2 MiB huge pages for one test, reserved as root if
/// there are not, put back as they were when it ends.
struct HugePages {
    restore: Option<String>,
}

impl HugePages {
    const NR: &'static str = "/proc/sys/vm/nr_hugepages";

    fn get(want: u64) -> Option<HugePages> {
        let free = || {
            std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        if free() >= want {
            return Some(HugePages { restore: None });
        }
        let old = std::fs::read_to_string(Self::NR).ok()?;
        let n = old.trim().parse::<u64>().ok()?;
        let guard = HugePages {
            restore: Some(old.trim().to_owned()),
        };
        std::fs::write(Self::NR, (n + want).to_string()).ok()?;
        (free() >= want).then_some(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(old) = &self.restore {
            let _ = std::fs::write(Self::NR, old);
        }
    }
}

/// On hugetlb the kernel protects and reports whole huge pages: a raw
/// write to one 4 KiB page reports its whole 2 MiB page (too much, never
/// too little), the scan re-protects it, and a huge page punched by a
/// discard after arming is reported again when the guest writes it.
#[test]
fn raw_writes_to_hugetlb_pages_report_whole_huge_pages() {
    use pagefold::{
        frames::{Backing, FrameStore, StoreOptions},
        PageSize,
    };
    const TEST: &str = "raw_writes_to_hugetlb_pages_report_whole_huge_pages";
    let Some(_pages) = HugePages::get(4) else {
        println!("SKIP {TEST}: no 2 MiB huge pages on this machine");
        return;
    };
    let options = StoreOptions {
        backing: Backing::Hugetlb(PageSize::Size2M),
        ..StoreOptions::default()
    };
    let Ok(store) = FrameStore::new(options) else {
        println!("SKIP {TEST}: no hugetlb memfd");
        return;
    };
    let m = Arc::new(
        GuestMemory::with_store(Arc::new(store), &[(GuestPhysAddr(0), 4 * HUGE as u64)]).unwrap(),
    );
    m.write(GuestPhysAddr(0), &[1]).unwrap();
    let Some(t) = tracker(&m, TEST) else {
        return;
    };
    let per = HUGE as u64 / P;
    let whole = |h: u64| (h * per..(h + 1) * per).collect::<Vec<u64>>();
    for k in [3u64, 5] {
        for h in [0u64, 2] {
            raw_write(&m, (h * per + k) * P, k);
        }
        assert_eq!(collect(&m, &t), [whole(0), whole(2)].concat(), "page {k}");
    }
    assert!(collect(&m, &t).is_empty(), "re-protected by the scan");
    assert_eq!(
        m.discard(GuestPhysAddr(2 * HUGE as u64), HUGE as u64)
            .unwrap(),
        per
    );
    raw_write(&m, (2 * per + 7) * P, 1);
    assert_eq!(
        collect(&m, &t),
        whole(2),
        "a punched huge page written again"
    );
}

/// A real-mode guest writes pages through KVM (EPT, no KVM dirty log)
/// while only the raw-write tracker watches: after each run, the tracker
/// reports exactly the pages the guest wrote, plus the table page the
/// library wrote through the mapping. Each collect re-protects what it
/// found, so KVM must fault again on the next round's writes (the scan's
/// write protection reaches KVM's own page tables through the MMU
/// notifier). Skips where `/dev/kvm` or the tracker is unavailable.
#[cfg(all(feature = "kvm", target_arch = "x86_64"))]
#[test]
fn guest_writes_through_kvm_are_found_by_the_tracker() {
    use pagefold::kvm::{KvmOptions, KvmVm};
    use std::collections::BTreeSet;
    const TEST: &str = "guest_writes_through_kvm_are_found_by_the_tracker";
    const TABLE: u64 = 0x7000;
    const CODE: u64 = 0x8000;
    /// Writes one byte per table entry. Table at 0x7000: `count: u16`,
    /// then `count` entries `(segment: u16, offset: u16)`.
    const WRITE_TABLE: &[u8] = &[
        0xbe, 0x00, 0x70, // mov si, 0x7000
        0x8b, 0x0c, // mov cx, [si]
        0x83, 0xc6, 0x02, // add si, 2
        0x8b, 0x04, // mov ax, [si]
        0x8e, 0xc0, // mov es, ax
        0x8b, 0x7c, 0x02, // mov di, [si+2]
        0x26, 0x88, 0x0d, // mov es:[di], cl
        0x83, 0xc6, 0x04, // add si, 4
        0xe2, 0xf1, // loop
        0xf4, // hlt
    ];
    // Region 1 ends inside a bitmap word.
    let layout = [
        (GuestPhysAddr(0), 0x8_0000),
        (GuestPhysAddr(0x9_0000), 0x6_f000),
    ];
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP {TEST}: /dev/kvm does not exist");
        return;
    }
    let mem = Arc::new(GuestMemory::new(&layout).unwrap());
    mem.write(GuestPhysAddr(CODE), WRITE_TABLE).unwrap();
    let options = KvmOptions {
        log_dirty_pages: false,
        ..KvmOptions::default()
    };
    let vm = match KvmVm::with_options(&mem, options) {
        Ok(vm) => vm,
        Err(e) => {
            println!("SKIP {TEST}: KVM unusable: {e}");
            return;
        }
    };
    let Some(t) = tracker(&mem, TEST) else {
        return;
    };
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let writable: Vec<u64> = layout
        .iter()
        .flat_map(|&(start, size)| (0..size / P).map(move |i| start.0 + i * P))
        .filter(|&p| p != TABLE && p != CODE)
        .collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for round in 0..30u64 {
        let writes: Vec<u64> = (0..1 + round * 7)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                writable[(x % writable.len() as u64) as usize] + (x >> 52) % P
            })
            .collect();
        let mut table = Vec::with_capacity(2 + 4 * writes.len());
        table.extend_from_slice(&u16::try_from(writes.len()).unwrap().to_le_bytes());
        for &gpa in &writes {
            let page = gpa & !(P - 1);
            table.extend_from_slice(&u16::try_from(page >> 4).unwrap().to_le_bytes());
            table.extend_from_slice(&u16::try_from(gpa - page).unwrap().to_le_bytes());
        }
        mem.write(GuestPhysAddr(TABLE), &table).unwrap();
        vcpu.setup_real_mode(GuestPhysAddr(CODE)).unwrap();
        vcpu.run_until_halt(|_, _| {}).unwrap();
        let mut want: BTreeSet<u64> = writes.iter().map(|a| a / P).collect();
        want.insert(TABLE / P);
        let got: BTreeSet<u64> = collect(&mem, &t).into_iter().collect();
        assert_eq!(got, want, "round {round}");
    }
}

/// A ring-3 long-mode guest writes 8 pages twice (a random pause between
/// the passes) while this thread collects, harvests and copies what was
/// reported into a shadow; after each run (guest stopped) a last collect
/// and harvest must leave the shadow equal to memory. A second write that
/// went through a writable mapping KVM kept past a scan's re-protection
/// would be in memory and in no report. Skips where `/dev/kvm` or the
/// tracker is unavailable.
#[cfg(all(feature = "kvm", target_arch = "x86_64"))]
#[test]
fn guest_writes_racing_the_trackers_scans_are_never_lost() {
    use pagefold::{
        kvm::{Exit, Flow, KvmOptions, KvmVm, LongMode},
        GuestVirtAddr,
    };
    const TEST: &str = "guest_writes_racing_the_trackers_scans_are_never_lost";
    const MIB: u64 = 1 << 20;
    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const CODE: u64 = 0x1_1000;
    const TABLE: u64 = 0x2_0000;
    const STACK: u64 = 0x8_0000;
    /// `rdi` = table: `value: u64`, `pause: u64` (at least 1), then `rsi`
    /// addresses. Writes `value` (32 bits) to every address, spins `pause`
    /// times, writes `value + 1` to every address, then `out 0x10, al`.
    const WRITE_TWICE: &[u8] = &[
        0x8b, 0x17, // mov edx, [rdi]
        0x48, 0x8b, 0x6f, 0x08, // mov rbp, [rdi+8]
        0x48, 0x83, 0xc7, 0x10, // add rdi, 16
        0x48, 0x89, 0xf1, // mov rcx, rsi
        0x48, 0x89, 0xfb, // mov rbx, rdi
        0x48, 0x8b, 0x03, // mov rax, [rbx]
        0x89, 0x10, // mov [rax], edx
        0x48, 0x83, 0xc3, 0x08, // add rbx, 8
        0x48, 0xff, 0xc9, // dec rcx
        0x75, 0xf2, // jnz
        0x48, 0x89, 0xe9, // mov rcx, rbp
        0xe2, 0xfe, // loop $
        0xff, 0xc2, // inc edx
        0x48, 0x89, 0xf1, // mov rcx, rsi
        0x48, 0x89, 0xfb, // mov rbx, rdi
        0x48, 0x8b, 0x03, // mov rax, [rbx]
        0x89, 0x10, // mov [rax], edx
        0x48, 0x83, 0xc3, 0x08, // add rbx, 8
        0x48, 0xff, 0xc9, // dec rcx
        0x75, 0xf2, // jnz
        0xe6, 0x10, // out 0x10, al
        0xeb, 0xfe, // jmp $
    ];
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP {TEST}: /dev/kvm does not exist");
        return;
    }
    let layout = [
        (GuestPhysAddr(0), 4 * MIB),
        (GuestPhysAddr(6 * MIB), 2 * MIB - 5 * P),
    ];
    let mem = Arc::new(GuestMemory::new(&layout).unwrap());
    // Identity map with 2 MiB pages: the first read-only (tables, code,
    // table), the rest writable with accessed and dirty set already, so no
    // page-table walk writes guest memory.
    mem.write_obj(GuestPhysAddr(PML4), PDPT | 0x27).unwrap();
    mem.write_obj(GuestPhysAddr(PDPT), PD | 0x27).unwrap();
    for i in 0..4u64 {
        let leaf = if i == 0 { 0xa5 } else { 0xe7 };
        mem.write_obj(GuestPhysAddr(PD + 8 * i), (i << 21) | leaf)
            .unwrap();
    }
    mem.write(GuestPhysAddr(CODE), WRITE_TWICE).unwrap();
    let options = KvmOptions {
        log_dirty_pages: false,
        ..KvmOptions::default()
    };
    let vm = match KvmVm::with_options(&mem, options) {
        Ok(vm) => vm,
        Err(e) => {
            println!("SKIP {TEST}: KVM unusable: {e}");
            return;
        }
    };
    let Some(t) = tracker(&mem, TEST) else {
        return;
    };
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let pages: Vec<u64> = layout
        .iter()
        .flat_map(|&(start, size)| (0..size / P).map(move |i| start.0 + i * P))
        .filter(|&p| p >= 2 * MIB)
        .step_by(97)
        .take(8)
        .collect();
    let mut shadow = vec![0u32; pages.len()];
    let copy = |shadow: &mut Vec<u32>, got: &[u64]| {
        for &p in got {
            if let Ok(i) = pages.binary_search(&(p * P)) {
                shadow[i] = mem.read_obj::<u32>(GuestPhysAddr(p * P)).unwrap();
            } else {
                assert_eq!(p * P, TABLE, "page {p:#x} was never written");
            }
        }
    };
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let (mut harvests, mut busy) = (0u64, 0u64);
    let mut lost = Vec::new();
    for run in 1..=200u32 {
        let value = run * 2 + 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut table = vec![u64::from(value), 1 + x % 2_000_000];
        table.extend(&pages);
        let bytes: Vec<u8> = table.iter().flat_map(|a| a.to_le_bytes()).collect();
        mem.write(GuestPhysAddr(TABLE), &bytes).unwrap();
        vcpu.setup_long_mode(&LongMode {
            cr3: GuestPhysAddr(PML4),
            entry: GuestVirtAddr(CODE),
            stack: GuestVirtAddr(STACK),
            args: [TABLE, pages.len() as u64],
            user_mode: true,
        })
        .unwrap();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let runner = s.spawn(|| {
                let r = vcpu.run(|exit| match exit {
                    Exit::IoOut { .. } => Flow::Stop,
                    _ => Flow::Continue,
                });
                done.store(true, Ordering::SeqCst);
                r
            });
            while !done.load(Ordering::SeqCst) {
                let got = collect(&mem, &t);
                copy(&mut shadow, &got);
                harvests += 1;
                busy += u64::from(got.iter().any(|&p| p * P != TABLE));
                std::thread::yield_now();
            }
            runner.join().unwrap().unwrap();
        });
        copy(&mut shadow, &collect(&mem, &t));
        for (i, &p) in pages.iter().enumerate() {
            let now = mem.read_obj::<u32>(GuestPhysAddr(p)).unwrap();
            assert_eq!(now, value + 1, "run {run}: page {p:#x}");
            if shadow[i] != now {
                lost.push((run, p, shadow[i], now));
            }
        }
        shadow.fill(value + 1);
    }
    println!("{TEST}: {harvests} harvests, {busy} met the running guest");
    assert!(
        lost.is_empty(),
        "writes lost (run, page, copy, memory): {lost:x?}"
    );
}

/// A page the guest wrote that the host reclaims before the next collect
/// (`MADV_PAGEOUT` stands for memory pressure: the kernel unmaps the page,
/// dropping the page-table entry that said "written") is still reported,
/// and its bytes are kept; an unwritten page reclaimed the same way is not.
#[test]
fn a_written_page_reclaimed_before_the_collect_is_still_found() {
    let m = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), 64 * P)]).unwrap());
    for p in 0..8 {
        m.write(GuestPhysAddr(p * P), &[1]).unwrap();
    }
    let Some(t) = tracker(
        &m,
        "a_written_page_reclaimed_before_the_collect_is_still_found",
    ) else {
        return;
    };
    raw_write(&m, 2 * P, 0xabcd);
    raw_write(&m, 3 * P, 0xabcd);
    for p in [2u64, 4] {
        let h = m.host_address(GuestPhysAddr(p * P)).unwrap().0;
        // SAFETY: advice on one page of the region's live mapping; the
        // kernel only unmaps it (its bytes stay in the memfd).
        let rc = unsafe { libc::madvise(h as *mut libc::c_void, PAGE_SIZE, libc::MADV_PAGEOUT) };
        if rc != 0 {
            println!(
                "SKIP a_written_page_reclaimed_before_the_collect_is_still_found: MADV_PAGEOUT: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
    }
    if present(&m, 2 * P) {
        println!("note: MADV_PAGEOUT left page 2 mapped here; the reclaim was not exercised");
    }
    assert_eq!(collect(&m, &t), vec![2, 3]);
    assert_eq!(m.read_obj::<u64>(GuestPhysAddr(2 * P)).unwrap(), 0xabcd);
}

/// Whether the host page of guest-physical `a` is mapped (present in
/// `/proc/self/pagemap`, bit 63).
fn present(m: &GuestMemory, a: u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let h = m.host_address(GuestPhysAddr(a)).unwrap().0;
    let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
    f.seek(SeekFrom::Start(h / P * 8)).unwrap();
    let mut b = [0u8; 8];
    f.read_exact(&mut b).unwrap();
    u64::from_le_bytes(b) >> 63 == 1
}

#[test]
fn a_harvest_during_a_migration_does_not_steal_its_pages() {
    // A VMM taking periodic incremental snapshots during a live migration
    // harvested pages the sender then never sent: the destination kept
    // stale bytes. The harvest is now refused while a sender holds the log.
    use pagefold::migration::{receive_migration, PrecopyOptions, ReaderLimits, Sender};
    let m = GuestMemory::new(&[(GuestPhysAddr(0), 16 * P)]).unwrap();
    let opts = PrecopyOptions {
        verify: false,
        ..PrecopyOptions::default()
    };
    let mut s = Sender::start(&m, Vec::new(), opts).unwrap();
    s.iterate().unwrap(); // round 0: page 7 is zero, not sent
    m.write(GuestPhysAddr(7 * P), &[7u8; 8]).unwrap();
    let mut runs = Vec::new();
    let taken = m.harvest_dirty(RegionSet::All, &mut runs);
    assert!(
        matches!(taken, Err(DirtyError::LogInUse { index: 0 })),
        "{taken:?}"
    );
    let (wire, _) = s.finish().unwrap();
    let got = receive_migration(&wire[..], ReaderLimits::default()).unwrap();
    let mut b = [0u8; 8];
    got.mem.read(GuestPhysAddr(7 * P), &mut b).unwrap();
    assert_eq!(b, [7u8; 8]);
    // The sender is gone: the log is the caller's again.
    assert!(m.harvest_dirty(RegionSet::All, &mut runs).is_ok());
}

#[test]
fn an_incremental_snapshot_after_a_cancelled_migration_is_complete() {
    // A sender's start and rounds take pages from the log; dropped, it
    // left an incremental snapshot on the last snapshot missing them.
    use pagefold::{
        migration::{PrecopyOptions, Sender},
        snapshot::{restore_into, save, save_incremental, SaveOptions, SnapshotReader},
    };
    let dir = std::env::temp_dir().join(format!("pf-review-dirty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let m = GuestMemory::new(&[(GuestPhysAddr(0), 16 * P)]).unwrap();
    save(&m, dir.join("s0"), &SaveOptions::default()).unwrap();
    m.write(GuestPhysAddr(3 * P), &[3u8; 8]).unwrap();
    {
        let mut s = Sender::start(&m, Vec::new(), PrecopyOptions::default()).unwrap();
        s.iterate().unwrap();
        m.write(GuestPhysAddr(9 * P), &[9u8; 8]).unwrap();
        s.iterate().unwrap();
        // cancelled: dropped without finish
    }
    m.write(GuestPhysAddr(5 * P), &[5u8; 8]).unwrap();
    let mut runs = Vec::new();
    m.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    let parent = SnapshotReader::open(dir.join("s0")).unwrap();
    save_incremental(&m, &parent, &runs, dir.join("s1")).unwrap();
    let s1 = SnapshotReader::open(dir.join("s1"))
        .unwrap()
        .with_parent(parent)
        .unwrap();
    let back = GuestMemory::new(&[(GuestPhysAddr(0), 16 * P)]).unwrap();
    restore_into(&s1, &back).unwrap();
    for page in [3u64, 5, 9] {
        let mut b = [0u8; 8];
        back.read(GuestPhysAddr(page * P), &mut b).unwrap();
        assert_eq!(b, [page as u8; 8], "page {page} lost by the incremental");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
