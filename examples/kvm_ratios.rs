//! KVM measurements against Linux KSM, same guest program, same KVM, same
//! run: (1) the round trip of a guest write to a merged page (the vCPU's
//! fault, the copy-on-write break, the resume), pagefold's merged pages
//! against KSM-merged anonymous memory; (2) the guest's slowdown while the
//! scanner runs flat out (pagefold's background scanner against `ksmd` at
//! its fastest), as write rounds per second against the same guest with no
//! scanner. KSM's settings are put back afterwards (also on error).
//!
//! `cargo run --release --example kvm_ratios [-- PAGES REPS SECONDS]`
//! (root, `/dev/kvm`); `benches/kvm_ratios.sh` runs it.

// Sizes here are small page counts (a 64-bit host).
#![allow(clippy::cast_possible_truncation)]

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use std::os::fd::AsRawFd;

use guest::Res;
use kvm_bindings::kvm_userspace_memory_region;
use pagefold::{
    kvm::{Exit, Flow, KvmOptions, KvmVcpu, KvmVm},
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, ScanBudget, VmOptions, PAGE_SIZE,
};
use pagefold_tools::{ksm, mini_vmm::guest};

const NO_LOG: KvmOptions = KvmOptions {
    log_dirty_pages: false,
    legacy_dirty_log: false,
    dirty_log_initially_set: false,
};

/// A VM whose data region is pagefold guest memory or KSM anonymous memory.
struct TestVm {
    // Field order matters: the vCPU and VM fds close before the memory
    // they map is unmapped.
    vcpu: KvmVcpu,
    _vm: KvmVm,
    mem: Arc<GuestMemory>,
    anon: Option<ksm::MergeableMap>,
}

impl TestVm {
    /// `mem` holds region 0 (and the data too unless `anon` is given).
    fn new(
        mem: Arc<GuestMemory>,
        mut anon: Option<ksm::MergeableMap>,
        code: &[u8],
        pages: u64,
        seed: u64,
    ) -> Res<Self> {
        let cr3 = guest::build_page_tables(&mem, pages)?;
        let start = guest::load(&mem, code, cr3, seed)?;
        let vm = KvmVm::with_options(&mem, NO_LOG)?;
        if let Some(a) = anon.as_mut() {
            let region = kvm_userspace_memory_region {
                slot: 1,
                flags: 0,
                guest_phys_addr: guest::DATA_GPA,
                memory_size: a.bytes_mut().len() as u64,
                userspace_addr: a.as_ptr() as u64,
            };
            // `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`: the
            // VM fd takes the VMM's own ioctls (kvm-ioctls' `VmFd` is not
            // part of pagefold's API).
            const KVM_SET_USER_MEMORY_REGION: u32 = 0x4020_ae46;
            // The slot maps `anon`, which `TestVm` drops after the
            // VM and vCPU fds (field order), so KVM never reaches a
            // mapping that is gone; it does not overlap region 0; the
            // kernel reads `region`, live for the call.
            // SAFETY: the mapping outlives the slot and `region` the
            // call (argued above).
            let r = unsafe {
                libc::ioctl(
                    vm.vm_fd().as_raw_fd(),
                    KVM_SET_USER_MEMORY_REGION as libc::Ioctl,
                    &region,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        let mut vcpu = vm.create_vcpu(0)?;
        vcpu.setup_long_mode(&start)?;
        Ok(TestVm {
            vcpu,
            _vm: vm,
            mem,
            anon,
        })
    }

    /// Runs until the guest's halt port; returns the time it took.
    fn run_to_halt(&mut self) -> Res<Duration> {
        let t = Instant::now();
        self.vcpu.run(|exit| match exit {
            Exit::IoOut { port, .. } if port == guest::PORT_HALT => Flow::Stop,
            _ => Flow::Continue,
        })?;
        Ok(t.elapsed())
    }
}

/// One page of the content every page of the COW test holds.
fn alike_page() -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (i * 7 + 3) as u8).collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Starts `ksmd` and waits until it has completed two full scans (its
/// counters are only brought up to date by scanning: pages a guest wrote
/// since still count as merged until then) and has merged `at_least`
/// pages (shared + sharing: KSM shares one page at most
/// `max_page_sharing` times, 256 by default, so 4096 alike pages become 16
/// KSM pages).
fn wait_ksm_merged(at_least: u64, timeout: Duration) -> Res<()> {
    let t = Instant::now();
    let scans = ksm::counter("full_scans")?;
    ksm_run("1")?;
    while ksm::counter("full_scans")? < scans + 2
        || ksm::counter("pages_sharing")? + ksm::counter("pages_shared")? < at_least
    {
        if t.elapsed() > timeout {
            return Err(format!(
                "KSM merged only {} pages in {timeout:?}",
                ksm::counter("pages_sharing")?
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn ksm_run(value: &str) -> Res<()> {
    std::fs::write("/sys/kernel/mm/ksm/run", value)?;
    Ok(())
}

/// (first write to each merged page, second write to the same pages) in
/// microseconds per page, medians over `reps`.
fn cow_pagefold(pages: u64, reps: usize) -> Res<(f64, f64)> {
    let store = Arc::new(FrameStore::memfd()?);
    let host = DedupHost::new(Arc::clone(&store))?;
    let mem = guest::memory(&store, pages)?;
    let mut vm = TestVm::new(
        Arc::clone(&mem),
        None,
        &guest::touch_pages(pages)?,
        pages,
        1,
    )?;
    host.register(Arc::clone(&mem), VmOptions::default())?;
    let page = alike_page();
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        for p in 0..pages {
            vm.mem
                .write(GuestPhysAddr(guest::DATA_GPA + p * PAGE_SIZE as u64), &page)?;
        }
        host.merge_now()?;
        // Shared frames plus the pages sharing them: every page merged (a
        // run of one content maps a template of several alike frames).
        let s = host.stats()?;
        let merged = s.pages_shared + s.pages_sharing;
        if merged < pages {
            return Err(format!("pagefold merged only {merged} of {pages} pages").into());
        }
        let t1 = vm.run_to_halt()?;
        let t2 = vm.run_to_halt()?;
        first.push(t1.as_secs_f64() * 1e6 / pages as f64);
        second.push(t2.as_secs_f64() * 1e6 / pages as f64);
    }
    Ok((median(&mut first), median(&mut second)))
}

fn cow_ksm(pages: u64, reps: usize, _session: &ksm::KsmSession) -> Res<(f64, f64)> {
    let low = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), guest::LOW_SIZE)])?);
    let anon = ksm::MergeableMap::new((pages * PAGE_SIZE as u64) as usize)?;
    let mut vm = TestVm::new(low, Some(anon), &guest::touch_pages(pages)?, pages, 1)?;
    let page = alike_page();
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        if let Some(a) = vm.anon.as_mut() {
            for chunk in a.bytes_mut().chunks_exact_mut(PAGE_SIZE) {
                chunk.copy_from_slice(&page);
            }
        }
        wait_ksm_merged(pages, Duration::from_secs(120))?;
        ksm_run("0")?; // ksmd stops; merged pages stay merged
        let t1 = vm.run_to_halt()?;
        let t2 = vm.run_to_halt()?;
        first.push(t1.as_secs_f64() * 1e6 / pages as f64);
        second.push(t2.as_secs_f64() * 1e6 / pages as f64);
    }
    Ok((median(&mut first), median(&mut second)))
}

/// What one slowdown run measured.
#[derive(Clone, Copy, Debug)]
struct Slowdown {
    /// Guest write rounds per second with no scanner.
    idle: f64,
    /// The same with the scanner running.
    busy: f64,
    /// Full scans per second the scanner completed meanwhile.
    scans: f64,
}

impl Slowdown {
    fn kept(&self) -> f64 {
        self.busy / self.idle
    }
}

/// How hard a scanner runs: pages per step (`pages_to_scan`) and the pause
/// between steps (`sleep_millisecs`).
#[derive(Clone, Copy, Debug)]
struct Pace {
    pages: u64,
    sleep_ms: u64,
}

/// Runs the fill-and-write guest; returns its write rounds per second over
/// `secs` with no scanner and then with `scan_on` running, and the full
/// scans per second (`full_scans`) meanwhile.
fn rounds_per_second(
    vm: TestVm,
    secs: f64,
    scan_on: &dyn Fn() -> Res<()>,
    scan_off: &dyn Fn() -> Res<()>,
    full_scans: &dyn Fn() -> Res<u64>,
) -> Res<Slowdown> {
    let rounds = Arc::new(AtomicU64::new(0));
    let filled = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (r, f, s) = (Arc::clone(&rounds), Arc::clone(&filled), Arc::clone(&stop));
    let mut vm = vm;
    let thread = std::thread::spawn(move || -> Res<TestVm> {
        vm.vcpu.run(|exit| match exit {
            Exit::IoOut { port, .. } if port == guest::PORT_FILLED => {
                f.store(true, Ordering::SeqCst);
                Flow::Continue
            }
            Exit::IoOut { port, .. } if port == guest::PORT_PROGRESS => {
                r.fetch_add(1, Ordering::Relaxed);
                if s.load(Ordering::SeqCst) {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            }
            _ => Flow::Continue,
        })?;
        Ok(vm)
    });
    while !filled.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300)); // settle
    let rate = |d: f64| -> f64 {
        let r0 = rounds.load(Ordering::Relaxed);
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(d));
        (rounds.load(Ordering::Relaxed) - r0) as f64 / t.elapsed().as_secs_f64()
    };
    // Idle and scanning windows alternate (three of each), so a change in
    // the machine's load hits both alike.
    let (mut idle, mut busy, mut scans) = (0.0, 0.0, 0.0);
    const CYCLES: u32 = 3;
    for _ in 0..CYCLES {
        idle += rate(secs / f64::from(CYCLES));
        scan_on()?;
        std::thread::sleep(Duration::from_millis(100));
        let (s0, t0) = (full_scans()?, Instant::now());
        busy += rate(secs / f64::from(CYCLES));
        scans += (full_scans()? - s0) as f64 / t0.elapsed().as_secs_f64();
        scan_off()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let (idle, busy, scans) = (
        idle / f64::from(CYCLES),
        busy / f64::from(CYCLES),
        scans / f64::from(CYCLES),
    );
    stop.store(true, Ordering::SeqCst);
    thread.join().map_err(|_| "vCPU thread panicked")??;
    Ok(Slowdown { idle, busy, scans })
}

/// Data for the slowdown runs: the guest's fill plus a second VM's worth
/// of the same mix (seed 2) written by the host, so there is something to
/// fold.
fn other_vm_bytes(pages: u64) -> Vec<u8> {
    let mut out = vec![0u8; (pages * PAGE_SIZE as u64) as usize];
    for (q, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&guest::fill_value(q as u64, 2).to_le_bytes());
    }
    out
}

fn program(pages: u64) -> guest::Program {
    guest::Program {
        data_pages: pages,
        balloon_pages: 0,
        hot_pages: 64,
        window_shift: 12,
        writes_per_round: 4096,
    }
}

fn slowdown_pagefold(
    pages: u64,
    secs: f64,
    pace: Pace,
    threads: Option<std::num::NonZeroUsize>,
) -> Res<Slowdown> {
    let store = Arc::new(FrameStore::memfd()?);
    let host = Arc::new(DedupHost::new(Arc::clone(&store))?);
    let mem = guest::memory(&store, pages)?;
    let other = guest::memory(&store, pages)?;
    other.write(GuestPhysAddr(guest::DATA_GPA), &other_vm_bytes(pages))?;
    let vm = TestVm::new(
        Arc::clone(&mem),
        None,
        &guest::fill_and_write(&program(pages))?,
        pages,
        1,
    )?;
    host.register(mem, VmOptions::default())?;
    host.register(other, VmOptions::default())?;
    let (h1, h2, h3) = (Arc::clone(&host), Arc::clone(&host), Arc::clone(&host));
    let r = rounds_per_second(
        vm,
        secs,
        &move || {
            let budget = ScanBudget::Pages(pace.pages);
            let pause = Duration::from_millis(pace.sleep_ms);
            match threads {
                Some(n) => h1.start_background_on(budget, pause, n)?,
                None => h1.start_background(budget, pause)?,
            }
            Ok(())
        },
        &move || {
            h2.stop_background();
            Ok(())
        },
        &move || Ok(h3.stats()?.full_scans),
    )?;
    println!(
        "  pagefold: {} pages sharing after the scanning phase",
        host.stats()?.pages_sharing
    );
    Ok(r)
}

fn slowdown_ksm(pages: u64, secs: f64, pace: Pace, _session: &ksm::KsmSession) -> Res<Slowdown> {
    ksm_run("2")?;
    std::fs::write("/sys/kernel/mm/ksm/pages_to_scan", pace.pages.to_string())?;
    std::fs::write(
        "/sys/kernel/mm/ksm/sleep_millisecs",
        pace.sleep_ms.to_string(),
    )?;
    let low = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), guest::LOW_SIZE)])?);
    let anon = ksm::MergeableMap::new((pages * PAGE_SIZE as u64) as usize)?;
    let mut other = ksm::MergeableMap::new((pages * PAGE_SIZE as u64) as usize)?;
    other.bytes_mut().copy_from_slice(&other_vm_bytes(pages));
    let vm = TestVm::new(
        low,
        Some(anon),
        &guest::fill_and_write(&program(pages))?,
        pages,
        1,
    )?;
    let r = rounds_per_second(vm, secs, &|| ksm_run("1"), &|| ksm_run("0"), &|| {
        Ok(ksm::counter("full_scans")?)
    })?;
    println!(
        "  KSM: {} pages sharing after the scanning phase",
        ksm::counter("pages_sharing")?
    );
    drop(other);
    Ok(r)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let pages = num(0, 4096).max(1024) / 1024 * 1024;
    let reps = usize::try_from(num(1, 5)).unwrap_or(5).max(1);
    let secs = num(2, 3) as f64;
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP kvm_ratios: /dev/kvm does not exist");
        return Ok(());
    }
    let session = ksm::KsmSession::fastest()?;

    println!("COW break of a guest write, {pages} merged pages, one 8-byte write each, median of {reps}:");
    let (pf1, pf2) = cow_pagefold(pages, reps)?;
    let (k1, k2) = cow_ksm(pages, reps, &session)?;
    println!("| engine | write to a merged page | write to an own page | COW cost |");
    println!("|---|---|---|---|");
    println!(
        "| pagefold | {pf1:.2} us | {pf2:.3} us | {:.2} us |",
        pf1 - pf2
    );
    println!("| KSM | {k1:.2} us | {k2:.3} us | {:.2} us |", k1 - k2);
    println!(
        "cow_round_trip_ratio={:.2} (KSM time / pagefold time per write to a merged page; >1: pagefold faster)",
        k1 / pf1
    );

    let one = std::num::NonZeroUsize::new(1).ok_or("1 is not zero")?;
    for (name, pace) in [
        (
            "flat out (100000 pages per step, no pause)",
            Pace {
                pages: 100_000,
                sleep_ms: 0,
            },
        ),
        (
            "paced (1024 pages per step, 20 ms pause: both scan at most 50k pages/s)",
            Pace {
                pages: 1024,
                sleep_ms: 20,
            },
        ),
    ] {
        println!(
            "\nGuest slowdown while the scanner runs {name}, 2 x {} MiB to fold, {secs} s each:",
            pages / 256
        );
        let all = slowdown_pagefold(pages, secs, pace, None)?;
        let single = slowdown_pagefold(pages, secs, pace, Some(one))?;
        let k = slowdown_ksm(pages, secs, pace, &session)?;
        println!(
            "| scanner | rounds/s idle | rounds/s scanning | guest speed kept | full scans/s |"
        );
        println!("|---|---|---|---|---|");
        for (who, s) in [
            ("pagefold, every core (start_background)", all),
            ("pagefold, one thread (start_background_on 1)", single),
            ("ksmd (one thread)", k),
        ] {
            println!(
                "| {who} | {:.0} | {:.0} | {:.1}% | {:.1} |",
                s.idle,
                s.busy,
                100.0 * s.kept(),
                s.scans
            );
        }
        println!(
            "guest_speed_ratio={:.2} (share of guest speed kept under pagefold's one-thread scanner / under ksmd's; every core: {:.2})",
            single.kept() / k.kept(),
            all.kept() / k.kept()
        );
    }
    drop(session);
    Ok(())
}
