//! KVM's dirty log fetched into pagefold's log, with manual protection
//! (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`) and with the legacy
//! get-and-clear: a real-mode guest writes pages of two memory slots in
//! rounds, and each fetch reports exactly the pages written since the one
//! before (a page written twice once; a page written again in the next
//! round again). A second test races fetches and harvests against a guest
//! that keeps writing, and checks a copy kept from the harvests ends equal
//! to memory: no write lost. Skips, saying so, where `/dev/kvm` is absent or
//! unusable.
#![cfg(feature = "kvm")]
#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used)]

use pagefold_tools::mini_vmm::guest;

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use pagefold::{
    kvm::{Exit, Flow, KvmError, KvmOptions, KvmVcpu, KvmVm, LongMode},
    DirtyRun, GuestMemory, GuestPhysAddr, GuestVirtAddr, RegionSet, PAGE_SIZE,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// Region 0: 128 pages; region 1 (after a hole): 111 pages, so its bitmap
/// ends inside a word. Real mode reaches both (below 1 MiB).
const LAYOUT: [(GuestPhysAddr, u64); 2] = [
    (GuestPhysAddr(0), 0x8_0000),
    (GuestPhysAddr(0x9_0000), 0x6_f000),
];
const TABLE: u64 = 0x7000;
const CODE: u64 = 0x8000;
const PAGE: u64 = PAGE_SIZE as u64;

/// Writes one byte per table entry. Table at 0x7000: `count: u16`, then
/// `count` entries `(segment: u16, offset: u16)`; `count` >= 1.
const WRITE_TABLE: &[u8] = &[
    0xbe, 0x00, 0x70, // 00: mov si, 0x7000
    0x8b, 0x0c, // 03: mov cx, [si]
    0x83, 0xc6, 0x02, // 05: add si, 2
    0x8b, 0x04, // 08: mov ax, [si]
    0x8e, 0xc0, // 0a: mov es, ax
    0x8b, 0x7c, 0x02, // 0c: mov di, [si+2]
    0x26, 0x88, 0x0d, // 0f: mov es:[di], cl
    0x83, 0xc6, 0x04, // 12: add si, 4
    0xe2, 0xf1, // 15: loop 08
    0xf4, // 17: hlt
];

fn memory(code: &[u8]) -> Arc<GuestMemory> {
    let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
    mem.write(GuestPhysAddr(CODE), code).unwrap();
    mem
}

/// How the VM fetches its dirty log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Manual protection where offered (the default).
    Manual,
    /// Manual protection with `KVM_DIRTY_LOG_INITIALLY_SET`.
    ManualInitiallySet,
    /// The legacy get-and-clear, forced.
    Legacy,
}

/// The VM, or why KVM is unusable here (`None` and a SKIP line).
fn vm_or_skip(test: &str, mem: &Arc<GuestMemory>, mode: Mode) -> Option<KvmVm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP {test}: /dev/kvm does not exist");
        return None;
    }
    let options = KvmOptions {
        log_dirty_pages: true,
        legacy_dirty_log: mode == Mode::Legacy,
        dirty_log_initially_set: mode == Mode::ManualInitiallySet,
    };
    match KvmVm::with_options(mem, options) {
        Ok(vm) => Some(vm),
        Err(e @ KvmError::Ioctl { op, .. }) if op == "open /dev/kvm" || op == "KVM_CREATE_VM" => {
            println!("SKIP {test}: /dev/kvm is not usable: {e}");
            None
        }
        Err(e) => panic!("creating the VM: {e}"),
    }
}

/// Whether this KVM offers manual dirty-log protection at all.
fn kvm_offers_manual_protect() -> bool {
    kvm_ioctls::Kvm::new()
        .map(|k| {
            k.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) > 0
        })
        .unwrap_or(false)
}

fn check_mode(test: &str, vm: &KvmVm, mode: Mode) {
    println!(
        "{test}: manual protect {}, initially set {}",
        vm.manual_dirty_log_protect(),
        vm.dirty_log_initially_set()
    );
    if mode == Mode::Legacy {
        assert!(!vm.manual_dirty_log_protect(), "legacy forced");
    } else {
        assert_eq!(vm.manual_dirty_log_protect(), kvm_offers_manual_protect());
    }
    if mode != Mode::ManualInitiallySet {
        assert!(!vm.dirty_log_initially_set(), "INITIALLY_SET is opt-in");
    }
}

fn harvest_pages(mem: &GuestMemory) -> BTreeSet<u64> {
    let mut runs: Vec<DirtyRun> = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    runs.iter()
        .flat_map(|r| (0..r.pages).map(move |i| r.start.0 + i * PAGE))
        .collect()
}

/// Every page the guests may write: all pages of both regions but the
/// table's and the code's.
fn writable_pages() -> Vec<u64> {
    LAYOUT
        .iter()
        .flat_map(|&(start, size)| (0..size / PAGE).map(move |i| start.0 + i * PAGE))
        .filter(|&p| p != TABLE && p != CODE)
        .collect()
}

/// Runs `WRITE_TABLE` over `writes` (guest-physical byte addresses).
fn guest_writes(vm: &KvmVm, vcpu: &mut KvmVcpu, writes: &[u64]) {
    assert!(!writes.is_empty() && writes.len() <= 1000);
    let mut table = Vec::with_capacity(2 + 4 * writes.len());
    table.extend_from_slice(&u16::try_from(writes.len()).unwrap().to_le_bytes());
    for &gpa in writes {
        let page = gpa & !(PAGE - 1);
        table.extend_from_slice(&u16::try_from(page >> 4).unwrap().to_le_bytes());
        table.extend_from_slice(&u16::try_from(gpa - page).unwrap().to_le_bytes());
    }
    // A library write: not in KVM's log, and library tracking is off.
    vm.memory().write(GuestPhysAddr(TABLE), &table).unwrap();
    vcpu.setup_real_mode(GuestPhysAddr(CODE)).unwrap();
    vcpu.run_until_halt(|_, _| {}).unwrap();
}

fn rounds(mode: Mode) {
    let legacy = mode == Mode::Legacy;
    let test = if legacy {
        "kvm_dirty_log rounds (legacy)"
    } else {
        "kvm_dirty_log rounds (manual protect)"
    };
    let mem = memory(WRITE_TABLE);
    let Some(vm) = vm_or_skip(test, &mem, mode) else {
        return;
    };
    check_mode(test, &vm, mode);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    // Nothing written by the guest yet: the first fetch reports nothing,
    // whatever KVM_DIRTY_LOG_INITIALLY_SET did to the slots.
    assert_eq!(vm.fetch_dirty_log().unwrap(), 0, "{test}: first fetch");
    assert!(harvest_pages(&mem).is_empty());

    let pages = writable_pages();
    let r1_end = LAYOUT[1].0 .0 + LAYOUT[1].1;
    // Edges: each region's first and last page, both sides of the word
    // boundary at page 64 of each region, a page written twice (two
    // offsets) and one written at the very same byte twice.
    let mut edge = vec![
        0,
        0x3f000,
        0x40000,
        0x40ffe,
        0x40ffe,
        0x7f000,
        0x9_0000,
        0x9_0000 + 63 * PAGE,
        0x9_0000 + 64 * PAGE,
        r1_end - PAGE,
        r1_end - 1,
    ];
    let mut rng = SmallRng::seed_from_u64(7);
    let mut expect_next = BTreeSet::new();
    for round in 0..40 {
        let writes: Vec<u64> = match round {
            0 => std::mem::take(&mut edge),
            // Written in round 0 and again now: reported again (the
            // fetch re-armed tracking of the pages it cleared).
            1 => vec![0x40000 + 17, r1_end - PAGE + 5, 0x1000],
            _ => {
                let n = rng.gen_range(1..300);
                (0..n)
                    .map(|_| pages[rng.gen_range(0..pages.len())] + rng.gen_range(0..PAGE))
                    .collect()
            }
        };
        if round % 7 == 3 {
            // A round in which the guest does not run.
            assert_eq!(vm.fetch_dirty_log().unwrap(), 0, "{test}: idle round");
            assert!(harvest_pages(&mem).is_empty(), "{test}: idle round");
        }
        guest_writes(&vm, &mut vcpu, &writes);
        expect_next.clear();
        expect_next.extend(writes.iter().map(|a| a & !(PAGE - 1)));
        let reported = vm.fetch_dirty_log().unwrap();
        let got = harvest_pages(&mem);
        assert_eq!(got, expect_next, "{test}: round {round}");
        assert_eq!(
            reported,
            expect_next.len() as u64,
            "{test}: round {round} count"
        );
        // Every write landed: write j stores the low byte of the loop
        // counter, `len - j`; the last write to an address wins.
        let mut last = std::collections::BTreeMap::new();
        for (j, &a) in writes.iter().enumerate() {
            last.insert(a, (writes.len() - j).to_le_bytes()[0]);
        }
        for (&a, &v) in &last {
            assert_eq!(mem.read_obj::<u8>(GuestPhysAddr(a)).unwrap(), v, "{a:#x}");
        }
    }
    println!("{test}: 40 rounds exact");
}

#[test]
fn rounds_report_exactly_the_pages_written_manual_protect() {
    rounds(Mode::Manual);
}

#[test]
fn rounds_report_exactly_the_pages_written_manual_protect_initially_set() {
    rounds(Mode::ManualInitiallySet);
}

#[test]
fn rounds_report_exactly_the_pages_written_legacy() {
    rounds(Mode::Legacy);
}

/// The same rounds with a 64-bit guest in ring 3, whose stores run
/// natively where KVM runs ring 0 through its instruction emulator (PVM):
/// there only these exercise KVM's write protection and its re-arming by
/// the clear. Memory: [0, 4 MiB) and [6 MiB, 8 MiB - 20 KiB), identity
/// mapped with 2 MiB pages; the first 2 MiB (tables, code, address table)
/// read-only, the rest writable with accessed and dirty already set, so no
/// page-table walk writes to guest memory.
mod long_mode {
    use super::*;

    pub(super) const LAYOUT: [(GuestPhysAddr, u64); 2] = [
        (GuestPhysAddr(0), 4 << 20),
        (GuestPhysAddr(6 << 20), (2 << 20) - 5 * PAGE),
    ];
    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    /// Where `guest::write_table` runs.
    const CODE: u64 = 0x1_0000;
    const CODE2: u64 = 0x1_1000;
    const TABLE: u64 = 0x2_0000;
    const STACK: u64 = 0x8_0000;

    /// `rdi` = table: `value: u64`, `pause: u64` (at least 1), then `rsi`
    /// addresses. Writes `value` (32 bits) to every address, spins `pause`
    /// times, writes `value + 1` to every address, then `out 0x10, al`.
    pub(super) const WRITE_TWICE: &[u8] = &[
        0x8b, 0x17, // 00: mov edx, [rdi]
        0x48, 0x8b, 0x6f, 0x08, // 02: mov rbp, [rdi+8]
        0x48, 0x83, 0xc7, 0x10, // 06: add rdi, 16
        0x48, 0x89, 0xf1, // 0a: mov rcx, rsi
        0x48, 0x89, 0xfb, // 0d: mov rbx, rdi
        0x48, 0x8b, 0x03, // 10: mov rax, [rbx]
        0x89, 0x10, // 13: mov [rax], edx
        0x48, 0x83, 0xc3, 0x08, // 15: add rbx, 8
        0x48, 0xff, 0xc9, // 19: dec rcx
        0x75, 0xf2, // 1c: jnz 10
        0x48, 0x89, 0xe9, // 1e: mov rcx, rbp
        0xe2, 0xfe, // 21: loop 21
        0xff, 0xc2, // 23: inc edx
        0x48, 0x89, 0xf1, // 25: mov rcx, rsi
        0x48, 0x89, 0xfb, // 28: mov rbx, rdi
        0x48, 0x8b, 0x03, // 2b: mov rax, [rbx]
        0x89, 0x10, // 2e: mov [rax], edx
        0x48, 0x83, 0xc3, 0x08, // 30: add rbx, 8
        0x48, 0xff, 0xc9, // 34: dec rcx
        0x75, 0xf2, // 37: jnz 2b
        0xe6, 0x10, // 39: out 0x10, al
        0xeb, 0xfe, // 3b: jmp 3b
    ];

    pub(super) fn memory() -> Arc<GuestMemory> {
        let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
        // P, RW, US, A; and PS, D for the 2 MiB leaves.
        mem.write_obj(GuestPhysAddr(PML4), PDPT | 0x27).unwrap();
        mem.write_obj(GuestPhysAddr(PDPT), PD | 0x27).unwrap();
        for i in 0..4u64 {
            let leaf = if i == 0 { 0xa5 } else { 0xe7 };
            mem.write_obj(GuestPhysAddr(PD + 8 * i), (i << 21) | leaf)
                .unwrap();
        }
        mem.write(GuestPhysAddr(CODE), &crate::guest::write_table().unwrap())
            .unwrap();
        mem.write(GuestPhysAddr(CODE2), WRITE_TWICE).unwrap();
        mem
    }

    /// Starts `WRITE_TWICE` over `table` (value, pause, addresses) in a
    /// fresh run of `vcpu`; returns when the guest signals the end.
    pub(super) fn run_twice(
        mem: &GuestMemory,
        vcpu: &mut KvmVcpu,
        table: &[u64],
    ) -> Result<(), KvmError> {
        let bytes: Vec<u8> = table.iter().flat_map(|a| a.to_le_bytes()).collect();
        mem.write(GuestPhysAddr(TABLE), &bytes).unwrap();
        vcpu.setup_long_mode(&LongMode {
            cr3: GuestPhysAddr(PML4),
            entry: GuestVirtAddr(CODE2),
            stack: GuestVirtAddr(STACK),
            args: [TABLE, table.len() as u64 - 2],
            user_mode: true,
        })?;
        vcpu.run(|exit| match exit {
            Exit::IoOut { .. } => Flow::Stop,
            _ => Flow::Continue,
        })?;
        Ok(())
    }

    /// Every writable page.
    pub(super) fn pages() -> Vec<u64> {
        LAYOUT
            .iter()
            .flat_map(|&(start, size)| (0..size / PAGE).map(move |i| start.0 + i * PAGE))
            .filter(|&p| p >= 2 << 20)
            .collect()
    }

    /// Runs the guest over `writes` (4-byte aligned, inside one page each).
    pub(super) fn run(mem: &GuestMemory, vcpu: &mut KvmVcpu, writes: &[u64]) {
        let table: Vec<u8> = writes.iter().flat_map(|a| a.to_le_bytes()).collect();
        mem.write(GuestPhysAddr(TABLE), &table).unwrap();
        vcpu.setup_long_mode(&LongMode {
            cr3: GuestPhysAddr(PML4),
            entry: GuestVirtAddr(CODE),
            stack: GuestVirtAddr(STACK),
            args: [TABLE, writes.len() as u64],
            user_mode: true,
        })
        .unwrap();
        vcpu.run(|exit| match exit {
            Exit::IoOut { .. } => Flow::Stop,
            _ => Flow::Continue,
        })
        .unwrap();
        let mut last = std::collections::BTreeMap::new();
        for (j, &a) in writes.iter().enumerate() {
            last.insert(a, u32::try_from(writes.len() - j).unwrap());
        }
        for (&a, &v) in &last {
            assert_eq!(mem.read_obj::<u32>(GuestPhysAddr(a)).unwrap(), v, "{a:#x}");
        }
    }
}

fn rounds_long_mode(mode: Mode) {
    let legacy = mode == Mode::Legacy;
    let test = if legacy {
        "kvm_dirty_log long-mode rounds (legacy)"
    } else {
        "kvm_dirty_log long-mode rounds (manual protect)"
    };
    let mem = long_mode::memory();
    let Some(vm) = vm_or_skip(test, &mem, mode) else {
        return;
    };
    check_mode(test, &vm, mode);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    assert_eq!(vm.fetch_dirty_log().unwrap(), 0, "{test}: first fetch");
    assert!(harvest_pages(&mem).is_empty());
    let pages = long_mode::pages();
    let r1 = long_mode::LAYOUT[1].0 .0;
    let r1_end = r1 + long_mode::LAYOUT[1].1;
    let mut rng = SmallRng::seed_from_u64(11);
    for round in 0..40 {
        let writes: Vec<u64> = match round {
            0 => vec![
                2 << 20,
                (2 << 20) + 0x10,
                (4 << 20) - PAGE,
                r1,
                r1 + 63 * PAGE,
                r1 + 64 * PAGE + 0xffc,
                r1_end - PAGE,
                r1_end - 4,
                r1_end - 4,
            ],
            1 => vec![(2 << 20) + 8, r1_end - PAGE, r1 + 63 * PAGE + 4],
            _ => {
                let n = rng.gen_range(1..400);
                (0..n)
                    .map(|_| pages[rng.gen_range(0..pages.len())] + 4 * rng.gen_range(0..PAGE / 4))
                    .collect()
            }
        };
        if round % 7 == 3 {
            assert_eq!(vm.fetch_dirty_log().unwrap(), 0, "{test}: idle round");
            assert!(harvest_pages(&mem).is_empty(), "{test}: idle round");
        }
        long_mode::run(&mem, &mut vcpu, &writes);
        let expect: BTreeSet<u64> = writes.iter().map(|a| a & !(PAGE - 1)).collect();
        let reported = vm.fetch_dirty_log().unwrap();
        assert_eq!(harvest_pages(&mem), expect, "{test}: round {round}");
        assert_eq!(reported, expect.len() as u64, "{test}: round {round} count");
    }
    println!("{test}: 40 rounds exact");
}

#[test]
fn long_mode_rounds_report_exactly_the_pages_written_manual_protect() {
    rounds_long_mode(Mode::Manual);
}

#[test]
fn long_mode_rounds_report_exactly_the_pages_written_manual_protect_initially_set() {
    rounds_long_mode(Mode::ManualInitiallySet);
}

#[test]
fn long_mode_rounds_report_exactly_the_pages_written_legacy() {
    rounds_long_mode(Mode::Legacy);
}

/// Runs of a ring-3 guest that writes every one of 200 pages twice (two
/// passes, a random pause between them), while one thread fetches in a
/// loop and this one harvests and copies what was reported into a shadow.
/// After each run (guest stopped) a last fetch and harvest must leave the
/// shadow equal to memory: a second write that slipped between a fetch's
/// get and clear, or between a clear and a harvest's copy, unreported,
/// would leave a stale page.
fn racing(mode: Mode) {
    let legacy = mode == Mode::Legacy;
    let test = if legacy {
        "kvm_dirty_log racing (legacy)"
    } else {
        "kvm_dirty_log racing (manual protect)"
    };
    let mem = long_mode::memory();
    let pages: Vec<u64> = long_mode::pages().into_iter().step_by(97).take(8).collect();
    let Some(vm) = vm_or_skip(test, &mem, mode) else {
        return;
    };
    check_mode(test, &vm, mode);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut rng = SmallRng::seed_from_u64(5);

    let mut shadow = vec![0u32; pages.len()];
    let copy = |shadow: &mut Vec<u32>, got: &BTreeSet<u64>| {
        for &p in got {
            let i = pages
                .binary_search(&p)
                .unwrap_or_else(|_| panic!("{test}: page {p:#x} never written"));
            shadow[i] = mem.read_obj::<u32>(GuestPhysAddr(p)).unwrap();
        }
    };
    let stop_fetching = AtomicBool::new(false);
    let (mut runs, mut harvests, mut busy) = (0u32, 0u64, 0u64);
    let mut lost = Vec::new();
    let fetches = std::thread::scope(|s| {
        let fetcher = s.spawn(|| {
            let mut fetches = 0u64;
            while !stop_fetching.load(Ordering::SeqCst) {
                vm.fetch_dirty_log().unwrap();
                fetches += 1;
                // Leave the guest CPU time (this host may have two CPUs
                // for three threads).
                std::thread::sleep(Duration::from_micros(50));
            }
            fetches
        });
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(500) && runs < 1000 {
            runs += 1;
            let value = runs * 2 + 1;
            let mut table = vec![u64::from(value), rng.gen_range(1..20_000)];
            table.extend(&pages);
            let done = AtomicBool::new(false);
            std::thread::scope(|s| {
                let runner = s.spawn(|| {
                    let r = long_mode::run_twice(&mem, &mut vcpu, &table);
                    done.store(true, Ordering::SeqCst);
                    r
                });
                while !done.load(Ordering::SeqCst) {
                    let got = harvest_pages(&mem);
                    copy(&mut shadow, &got);
                    harvests += 1;
                    busy += u64::from(!got.is_empty());
                    std::thread::sleep(Duration::from_micros(20));
                }
                runner.join().unwrap().unwrap();
            });
            // The guest is stopped: this fetch (after any the fetcher has
            // under way) and harvest take everything it wrote.
            vm.fetch_dirty_log().unwrap();
            let got = harvest_pages(&mem);
            copy(&mut shadow, &got);
            for (i, &p) in pages.iter().enumerate() {
                let now = mem.read_obj::<u32>(GuestPhysAddr(p)).unwrap();
                assert_eq!(now, value + 1, "{test}: run {runs}: page {p:#x}");
                if shadow[i] != now {
                    lost.push((runs, p, shadow[i], now));
                }
            }
            shadow.fill(value + 1);
        }
        stop_fetching.store(true, Ordering::SeqCst);
        fetcher.join().unwrap()
    });
    println!(
        "{test}: {runs} runs, {fetches} fetches, {harvests} harvests ({busy} found pages), lost writes (run, page, copy, memory): {lost:x?}"
    );
    assert!(lost.is_empty(), "{test}: writes lost: {lost:x?}");
    assert!(
        busy >= 10,
        "{test}: too few harvests met the running guest ({busy})"
    );
}

#[test]
fn no_write_lost_while_the_guest_runs_manual_protect() {
    racing(Mode::Manual);
}

#[test]
fn no_write_lost_while_the_guest_runs_legacy() {
    racing(Mode::Legacy);
}

/// The KVM behaviour the order inside a fetch rests on, shown with raw
/// ioctls and the ring-3 guest (native stores): with manual protection, a
/// guest write between `KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG` to a
/// page the get reported sets nothing (the page is still writable), and
/// the clear then drops the page's bit. So a fetch must clear before the
/// bits reach pagefold's log: a harvest that copied the page before that
/// write would otherwise never see it again. (Clear-then-merge makes every
/// harvest that reports the page start after the clear.)
#[test]
fn kvm_drops_a_write_between_get_and_clear_of_a_reported_page() {
    use std::os::fd::AsRawFd;
    const TEST: &str = "kvm_dirty_log get/write/clear";
    /// Slot 0 is [0, 4 MiB): 1024 pages, 16 bitmap words.
    const WORDS: usize = 16;
    const PAGE_INDEX: usize = 0x205;
    const PAGE_GPA: u64 = PAGE_INDEX as u64 * PAGE;
    let mem = long_mode::memory();
    let Some(vm) = vm_or_skip(TEST, &mem, Mode::Manual) else {
        return;
    };
    if !vm.manual_dirty_log_protect() {
        println!("SKIP {TEST}: KVM offers no manual dirty-log protection");
        return;
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let bit = 1u64 << (PAGE_INDEX % 64);
    let fd = vm.vm_fd().as_raw_fd();
    let get = || {
        let mut bitmap = [0u64; WORDS];
        let log = kvm_bindings::kvm_dirty_log {
            slot: 0,
            padding1: 0,
            __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        // KVM_GET_DIRTY_LOG (_IOW(0xae, 0x42, 16 bytes)) writes slot 0's
        // bitmap, 1024 pages = 128 bytes.
        // SAFETY: `bitmap` has those 128 bytes, live and not otherwise
        // borrowed; `log` lives across the call.
        let r = unsafe { libc::ioctl(fd, 0x4010_ae42, &log) };
        assert_eq!(r, 0, "KVM_GET_DIRTY_LOG");
        bitmap[PAGE_INDEX / 64]
    };
    let clear = |mask: u64| {
        let mut words = [0u64; WORDS];
        words[PAGE_INDEX / 64] = mask;
        let c = kvm_bindings::kvm_clear_dirty_log {
            slot: 0,
            num_pages: 1024,
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_mut_ptr().cast(),
            },
        };
        // SAFETY: KVM_CLEAR_DIRTY_LOG (_IOWR(0xae, 0xc0, 24 bytes)) reads
        // 1024 bits = 128 bytes from `words` (128 bytes, live); `c` lives
        // across the call.
        let r = unsafe { libc::ioctl(fd, 0xc018_aec0, &c) };
        assert_eq!(r, 0, "KVM_CLEAR_DIRTY_LOG");
    };
    long_mode::run(&mem, &mut vcpu, &[PAGE_GPA + 4]);
    assert_eq!(get(), bit, "written once");
    long_mode::run(&mem, &mut vcpu, &[PAGE_GPA + 8]);
    clear(bit);
    assert_eq!(get(), 0, "the write between get and clear left no bit");
    long_mode::run(&mem, &mut vcpu, &[PAGE_GPA + 12]);
    assert_eq!(get(), bit, "a write after the clear sets it again");
    clear(bit);
    // And through the API: a page written between fetches is reported.
    long_mode::run(&mem, &mut vcpu, &[PAGE_GPA + 16]);
    assert_eq!(vm.fetch_dirty_log().unwrap(), 1);
    assert_eq!(harvest_pages(&mem), BTreeSet::from([PAGE_GPA]));
}
