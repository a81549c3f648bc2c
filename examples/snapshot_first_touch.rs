//! Time from the restore call to a restored KVM guest's first instruction
//! and to its first 1,000 and 10,000 page touches, for a 1 GiB guest
//! (mini VMM, 1 GiB of data plus 2 MiB of page tables and code), in one
//! run:
//!
//! - Firecracker's way (the baseline): the raw memory file mapped
//!   `MAP_PRIVATE` (page faults read it from the page cache), its two
//!   ranges registered as KVM memory slots;
//! - pagefold's lazy restore (`snapshot::restore_lazy`) without and with
//!   a working-set file (recorded by a lazy restore of the same guest just
//!   before);
//! - a full copy (`snapshot::restore_into`) before the guest starts;
//! - the lazy restore again from a snapshot opened once beforehand (a VMM
//!   restoring many clones of one snapshot keeps it open), with the
//!   background fetch at once and 20 ms after the restore returns
//!   (`LazyOptions::fetch_delay`: on few cores the fetch competes with
//!   the VM's creation and first faults);
//! - pagefold's lazy restore folded on arrival
//!   (`snapshot::restore_folded_lazy`, snapshot open already) into a
//!   fresh dedup host: the first clone (its region maps an image of the
//!   snapshot in the host's memfd frames, filled as pages arrive), and a
//!   clone restored after an earlier clone of the same snapshot on the
//!   same host has arrived (`wait`ed; still running beside it): the image
//!   is whole, so the clone maps it at once and nothing is fetched.
//!
//! Each restore starts from the files (the snapshot is opened inside the
//! timed span; the baseline's vCPU state is at hand, as Firecracker's
//! small vmstate file would be), creates a fresh KVM VM and vCPU, loads
//! the snapshot's vCPU state (`KvmVcpu::set_snapshot_state`: the same
//! vCPU path for all) and runs the guest. The guest (`guest::first_touch`)
//! `OUT`s on its first instruction, after 1,000 and after 10,000 reads of
//! distinct pages spread over the data; the VMM timestamps each exit. The
//! guest's sum of what it read is checked against the original memory,
//! and a sample of pages after the restore is complete.
//!
//! The memory: half zero pages, a quarter copies of 64 contents, a quarter
//! random. Both files are read warm from the page cache (just written).
//! Median of REPS runs (default 3), printed with the ratio to the
//! `MAP_PRIVATE` baseline of the same run.
//!
//! `cargo run --release --example snapshot_first_touch [-- DIR [REPS]]`
//! (root, `/dev/kvm`; files go to DIR, default the system's temporary
//! directory, and are removed).

// Sizes and counts here are small (a 64-bit host).
#![allow(clippy::cast_possible_truncation)]

use std::{
    fs::File,
    io::Write,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use kvm_bindings::kvm_userspace_memory_region;
use pagefold::{
    kvm::{Exit, Flow, KvmOptions, KvmVcpu, KvmVm},
    snapshot::{
        restore_folded_lazy, restore_into, restore_lazy, save_with_vcpus, LazyFoldOptions,
        LazyOptions, SaveOptions, SnapshotReader, VcpuState,
    },
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, VmOptions, PAGE_SIZE,
};
use pagefold_tools::mini_vmm::guest::{self, Res};
use rand::{Rng, SeedableRng};

const DATA_PAGES: u64 = 1 << 18; // 1 GiB
const TOUCHES: u64 = 10_000;
const PAGE: u64 = PAGE_SIZE as u64;
const NO_LOG: KvmOptions = KvmOptions {
    log_dirty_pages: false,
    legacy_dirty_log: false,
    dirty_log_initially_set: false,
};

/// What one restore took, from the restore call.
#[derive(Clone, Copy, Debug, Default)]
struct Times {
    /// The snapshot (or raw file) open.
    file_open: Duration,
    /// And the memory mapped.
    opened: Duration,
    /// The restore call returned (lazily: the handler threads started).
    restored: Duration,
    /// The VM and vCPU ready to run (memory restored, lazily or not).
    ready: Duration,
    /// The guest's first instruction (its first exit).
    first: Duration,
    /// 1,000 page touches done.
    t1k: Duration,
    /// 10,000 page touches done.
    t10k: Duration,
}

/// Runs the restored guest to its end, timestamping its exits against
/// `t0`; checks its sum against `expect_sum`.
fn drive(vcpu: &mut KvmVcpu, t0: Instant, phases: [Duration; 4], expect_sum: u32) -> Res<Times> {
    let [file_open, opened, restored, ready] = phases;
    let mut t = Times {
        file_open,
        opened,
        restored,
        ready,
        ..Times::default()
    };
    let mut sum = None;
    vcpu.run(|exit| match exit {
        Exit::IoOut { port, data } => {
            let now = t0.elapsed();
            let v = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
            match port {
                guest::PORT_FIRST => t.first = now,
                guest::PORT_TOUCHED if v == 1000 => t.t1k = now,
                guest::PORT_TOUCHED => t.t10k = now,
                guest::PORT_TOUCH_SUM => sum = Some(v),
                guest::PORT_HALT => return Flow::Stop,
                _ => {}
            }
            Flow::Continue
        }
        Exit::IoIn { .. } => Flow::Continue,
        Exit::Halt => Flow::Stop,
    })?;
    if sum != Some(expect_sum) {
        return Err(
            format!("the guest read sum {sum:x?}, the snapshot's is {expect_sum:#x}").into(),
        );
    }
    if t.first.is_zero() || t.t1k.is_zero() || t.t10k.is_zero() {
        return Err(format!("the guest did not report every mark: {t:?}").into());
    }
    Ok(t)
}

/// Fills the data: half zero pages, a quarter 64 repeated contents, a
/// quarter random.
fn fill(mem: &GuestMemory) -> Res<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut page = vec![0u8; PAGE_SIZE];
    for i in 0..DATA_PAGES {
        match i % 4 {
            0 | 1 => continue,
            2 => page.fill((i % 64) as u8 + 1),
            _ => rng.fill(&mut page[..]),
        }
        mem.write(GuestPhysAddr(guest::DATA_GPA + i * PAGE), &page)?;
    }
    Ok(())
}

/// Samples data pages of `mem` against `orig` (the low region differs:
/// the guest's page walks set accessed bits in its page tables).
fn check(orig: &GuestMemory, mem: &GuestMemory) -> Res<()> {
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for r in orig.regions().iter().skip(1) {
        for p in (0..r.pages() as u64).step_by(61) {
            let gpa = GuestPhysAddr(r.start().0 + p * PAGE);
            orig.read(gpa, &mut a)?;
            mem.read(gpa, &mut b)?;
            if a != b {
                return Err(format!("page {gpa} differs after the restore").into());
            }
        }
    }
    Ok(())
}

/// The memory as one raw file, region after region (Firecracker's memory
/// file: every byte of guest memory at its offset).
fn write_raw(mem: &GuestMemory, path: &Path) -> Res<()> {
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    for r in mem.regions() {
        let mut off = 0;
        while off < r.size() {
            let n = buf.len().min((r.size() - off) as usize);
            mem.read(GuestPhysAddr(r.start().0 + off), &mut buf[..n])?;
            f.write_all(&buf[..n])?;
            off += n as u64;
        }
    }
    f.sync_all()?;
    Ok(())
}

/// A `MAP_PRIVATE` mapping of a file, unmapped on drop.
struct PrivateMap {
    addr: *mut libc::c_void,
    len: usize,
}

impl PrivateMap {
    fn new(file: &File, len: usize) -> Res<Self> {
        // SAFETY: a new mapping at an address of the kernel's choosing;
        // it replaces nothing, and `file` is open for reading.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(PrivateMap { addr, len })
    }
}

impl Drop for PrivateMap {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once; the VM that
        // reached it is dropped before (field order in `baseline`).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Firecracker's way: the raw file mapped `MAP_PRIVATE`, its ranges as
/// KVM slots (through a pagefold `KvmVm` whose own slot 0 is one page at
/// 4 GiB the guest never uses, so the vCPU path is pagefold's, as in the
/// other restores).
fn baseline(raw: &Path, state: &VcpuState, expect_sum: u32) -> Res<Times> {
    let dummy = Arc::new(GuestMemory::new(&[(GuestPhysAddr(1 << 32), PAGE)])?);
    let t0 = Instant::now();
    let file = File::open(raw)?;
    let file_open = t0.elapsed();
    let len = (guest::LOW_SIZE + DATA_PAGES * PAGE) as usize;
    let map = PrivateMap::new(&file, len)?;
    let opened = t0.elapsed();
    let vm = KvmVm::with_options(&dummy, NO_LOG)?;
    for (slot, gpa, off, size) in [
        (1, 0, 0, guest::LOW_SIZE),
        (2, guest::DATA_GPA, guest::LOW_SIZE, DATA_PAGES * PAGE),
    ] {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: map.addr as u64 + off,
        };
        /// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
        const KVM_SET_USER_MEMORY_REGION: u32 = 0x4020_ae46;
        // The slot maps part of `map`, which outlives the VM (dropped
        // first, below); the kernel reads `region`, live for the call.
        // SAFETY: the mapping outlives the slot, `region` the call.
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
    let restored = t0.elapsed();
    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.set_snapshot_state(state)?;
    let ready = t0.elapsed();
    let t = drive(
        &mut vcpu,
        t0,
        [file_open, opened, restored, ready],
        expect_sum,
    )?;
    drop(vcpu);
    drop(vm);
    drop(map);
    Ok(t)
}

/// pagefold: open the snapshot (unless `open` holds it open already, as
/// for clones of one snapshot), restore (lazily, with or without a
/// working set, or by copy), VM, vCPU, run.
fn pagefold_restore(
    path: &Path,
    open: Option<&Arc<SnapshotReader>>,
    lazy: Option<LazyOptions>,
    orig: &GuestMemory,
    expect_sum: u32,
) -> Res<Times> {
    let t0 = Instant::now();
    let snap = match open {
        Some(s) => Arc::clone(s),
        None => Arc::new(SnapshotReader::open(path)?),
    };
    let file_open = t0.elapsed();
    let mem = Arc::new(GuestMemory::new(&snap.region_layout())?);
    let opened = t0.elapsed();
    let restore = match lazy {
        Some(opts) => Some(restore_lazy(Arc::clone(&snap), &mem, opts)?),
        None => {
            restore_into(&snap, &mem)?;
            None
        }
    };
    let restored = t0.elapsed();
    let vm = KvmVm::with_options(&mem, NO_LOG)?;
    let mut vcpu = vm.create_vcpu(0)?;
    let state = snap.vcpus().first().ok_or("no vCPU in the snapshot")?;
    vcpu.set_snapshot_state(state)?;
    let ready = t0.elapsed();
    let t = drive(
        &mut vcpu,
        t0,
        [file_open, opened, restored, ready],
        expect_sum,
    )?;
    if let Some(r) = restore {
        r.wait()?;
    }
    check(orig, &mem)?;
    Ok(t)
}

/// pagefold folded on arrival: a fresh dedup host on a fresh memfd store
/// (set up before the timed span, as a VMM's host runs already); with
/// `after_arrival`, a first clone of the snapshot is restored and
/// `wait`ed on it first (kept beside the timed clone), so the timed one
/// finds the image whole. Then the timed restore (`restore_folded_lazy`
/// of the snapshot opened once), VM, vCPU, run; the clone is waited for
/// and checked.
fn folded_lazy_restore(
    open: &Arc<SnapshotReader>,
    after_arrival: bool,
    orig: &GuestMemory,
    expect_sum: u32,
) -> Res<Times> {
    let host = DedupHost::new(Arc::new(FrameStore::memfd()?))?;
    let earlier = if after_arrival {
        let first = restore_folded_lazy(
            &host,
            VmOptions::default(),
            Arc::clone(open),
            LazyFoldOptions::default(),
        )?;
        let memory = Arc::clone(&first.memory);
        first.wait()?;
        Some(memory)
    } else {
        None
    };
    let t0 = Instant::now();
    let snap = Arc::clone(open);
    let file_open = t0.elapsed();
    let r = restore_folded_lazy(
        &host,
        VmOptions::default(),
        Arc::clone(&snap),
        LazyFoldOptions::default(),
    )?;
    // The memory is mapped by the restore call itself.
    let restored = t0.elapsed();
    let pages: u64 = snap.region_layout().iter().map(|r| r.1 / PAGE).sum();
    if after_arrival && r.pages_done() < pages {
        return Err(format!(
            "a clone after an arrived one found {} of {pages} pages: the image was not whole",
            r.pages_done(),
        )
        .into());
    }
    let mem = Arc::clone(&r.memory);
    let vm = KvmVm::with_options(&mem, NO_LOG)?;
    let mut vcpu = vm.create_vcpu(0)?;
    let state = snap.vcpus().first().ok_or("no vCPU in the snapshot")?;
    vcpu.set_snapshot_state(state)?;
    let ready = t0.elapsed();
    let t = drive(
        &mut vcpu,
        t0,
        [file_open, restored, restored, ready],
        expect_sum,
    )?;
    r.wait()?;
    check(orig, &mem)?;
    if let Some(m) = &earlier {
        check(orig, m)?;
    }
    drop(vcpu);
    drop(vm);
    Ok(t)
}

/// One figure of [`Times`].
type Field = fn(&Times) -> Duration;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(dir: &Path, reps: usize) -> Res<()> {
    // The guest as saved: memory filled, program loaded, vCPU at its
    // first instruction.
    let layout = [
        (GuestPhysAddr(0), guest::LOW_SIZE),
        (GuestPhysAddr(guest::DATA_GPA), DATA_PAGES * PAGE),
    ];
    let orig = Arc::new(GuestMemory::new(&layout)?);
    let cr3 = guest::build_page_tables(&orig, DATA_PAGES)?;
    let code = guest::first_touch(DATA_PAGES, TOUCHES)?;
    let mode = guest::load(&orig, &code, cr3, 1)?;
    fill(&orig)?;
    let state = {
        let vm = KvmVm::with_options(&orig, NO_LOG)?;
        let mut vcpu = vm.create_vcpu(0)?;
        vcpu.setup_long_mode(&mode)?;
        vcpu.snapshot_state()?
    };
    let expect_sum = guest::first_touch_sum(TOUCHES, DATA_PAGES, |off| {
        orig.read_obj::<u64>(GuestPhysAddr(guest::DATA_GPA + off))
            .unwrap_or(0)
    });
    let tag = std::process::id();
    let snap_path = dir.join(format!("pagefold-first-touch-{tag}.snap"));
    let raw_path = dir.join(format!("pagefold-first-touch-{tag}.mem"));
    let ws_path = dir.join(format!("pagefold-first-touch-{tag}.ws"));
    let saved = save_with_vcpus(
        &orig,
        &snap_path,
        &SaveOptions { track_dirty: false },
        std::slice::from_ref(&state),
    )?;
    write_raw(&orig, &raw_path)?;
    println!(
        "guest: 1 GiB data + 2 MiB low memory ({} pages; data half zero, a quarter 64 repeated \
         contents, a quarter random); snapshot {} MiB, raw memory file {} MiB; {reps} runs, medians",
        DATA_PAGES + guest::LOW_SIZE / PAGE,
        saved.file_bytes >> 20,
        (guest::LOW_SIZE + DATA_PAGES * PAGE) >> 20
    );
    let names = [
        "MAP_PRIVATE raw file (Firecracker)",
        "pagefold lazy, no working set",
        "pagefold lazy, working set",
        "pagefold full copy (restore_into)",
        "pagefold lazy, snapshot open already",
        "pagefold lazy, open already, fetch 20 ms on",
        "pagefold folded lazy, 1st clone",
        "pagefold folded lazy, after arrival",
    ];
    let mut all: Vec<Vec<Times>> = vec![Vec::new(); names.len()];
    // Opened once, as a VMM restoring many clones of one snapshot keeps
    // it (`restore_lazy` takes it shared).
    let open = Arc::new(SnapshotReader::open(&snap_path)?);
    for _ in 0..reps {
        all[0].push(baseline(&raw_path, &state, expect_sum)?);
        let _ = std::fs::remove_file(&ws_path);
        all[1].push(pagefold_restore(
            &snap_path,
            None,
            Some(LazyOptions {
                working_set: Some(ws_path.clone()),
                record_pages: TOUCHES as usize,
                on_fetch: None,
                ..LazyOptions::default()
            }),
            &orig,
            expect_sum,
        )?);
        all[2].push(pagefold_restore(
            &snap_path,
            None,
            Some(LazyOptions {
                working_set: Some(ws_path.clone()),
                record_pages: 0,
                on_fetch: None,
                ..LazyOptions::default()
            }),
            &orig,
            expect_sum,
        )?);
        all[3].push(pagefold_restore(&snap_path, None, None, &orig, expect_sum)?);
        all[4].push(pagefold_restore(
            &snap_path,
            Some(&open),
            Some(LazyOptions::default()),
            &orig,
            expect_sum,
        )?);
        all[5].push(pagefold_restore(
            &snap_path,
            Some(&open),
            Some(LazyOptions {
                fetch_delay: Duration::from_millis(20),
                ..LazyOptions::default()
            }),
            &orig,
            expect_sum,
        )?);
        all[6].push(folded_lazy_restore(&open, false, &orig, expect_sum)?);
        all[7].push(folded_lazy_restore(&open, true, &orig, expect_sum)?);
    }
    let med = |k: usize, f: Field| median(all[k].iter().map(f).collect());
    let fields: [(&str, Field); 7] = [
        ("file opened", |t| t.file_open),
        ("memory mapped", |t| t.opened),
        ("restore returned", |t| t.restored),
        ("VM+vCPU ready", |t| t.ready),
        ("first instruction", |t| t.first),
        ("1,000 touches", |t| t.t1k),
        ("10,000 touches", |t| t.t10k),
    ];
    println!("time from the restore call to (median ms, ratio to MAP_PRIVATE):");
    print!("{:<36}", "");
    for (f, _) in fields {
        print!(" {f:>18}");
    }
    println!();
    for (k, name) in names.iter().enumerate() {
        print!("{name:<36}");
        for (_, f) in fields {
            let v = med(k, f);
            let base = med(0, f).as_secs_f64();
            print!(
                " {:>9.2} {:>7}",
                v.as_secs_f64() * 1e3,
                format!("{:.2}x", v.as_secs_f64() / base)
            );
        }
        println!();
    }
    println!("(each figure: median time, then its ratio to the MAP_PRIVATE baseline of this run)");
    let _ = std::fs::remove_file(&ws_path);
    let _ = std::fs::remove_file(&snap_path);
    let _ = std::fs::remove_file(&raw_path);
    Ok(())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map_or_else(std::env::temp_dir, PathBuf::from);
    let reps = args.next().map_or(Ok(3), |s| s.parse::<usize>())?.max(1);
    if let Err(e) = pagefold::kvm::probe() {
        println!("SKIP: KVM is not usable here: {e}");
        return Ok(());
    }
    run(&dir, reps)
}
