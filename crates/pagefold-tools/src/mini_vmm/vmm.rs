//! The mini VMM itself: several KVM VMs over pagefold guest memory, folded
//! by one dedup host while they run, a balloon, the walker on each vCPU's
//! CR3, and a live migration of one VM over TCP into another process.
//! Run by `examples/mini_vmm/main.rs`, `pagefold demo` (where KVM is
//! usable) and `tests/kvm_mini_vmm.rs`.

use std::{
    io::{BufReader, BufWriter, Read, Write},
    net::{TcpListener, TcpStream},
    process::Child,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use pagefold::{
    kvm::{Exit, Flow, KvmError, KvmVcpu, KvmVm, VcpuState},
    migration::{receive_migration, PrecopyOptions, ReaderLimits, Sender},
    paging::{Access, AccessKind, Privilege, WalkOptions, Walker, X86Paging},
    Balloon, DedupHost, DedupStats, FrameStore, GuestMemory, GuestPhysAddr, GuestVirtAddr,
    ScanBudget, VmId, VmOptions, PAGE_SIZE,
};

use super::guest::{self, Res};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// VMs, one vCPU each.
    pub vms: usize,
    /// Data per VM, MiB (a multiple of 4).
    pub data_mib: u64,
    /// MiB of each VM's data its guest gives to the balloon.
    pub balloon_mib: u64,
    /// How long the dedup host folds with live statistics before the
    /// migration, seconds (at least).
    pub fold_secs: f64,
    /// Fold on past `fold_secs`, up to a minute, until this many pages
    /// share a frame (0: no goal). On a loaded machine the scanner gets
    /// less time; a goal keeps a check of the saving from depending on it.
    pub fold_goal_sharing: u64,
    /// Print progress.
    pub verbose: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vms: 3,
            data_mib: 64,
            balloon_mib: 8,
            fold_secs: 2.0,
            fold_goal_sharing: 0,
            verbose: true,
        }
    }
}

/// What happened, for the caller to check.
#[derive(Debug, Default)]
pub struct Report {
    /// Per VM: verifications that passed and failed on this host.
    pub verified: Vec<(u64, u64)>,
    /// Per VM: write rounds run on this host.
    pub rounds: Vec<u64>,
    /// The dedup statistics at their best saving.
    pub peak: DedupStats,
    /// The last statistics.
    pub last: DedupStats,
    /// Pages the balloon released (all VMs).
    pub ballooned_pages: u64,
    /// Frame-store bytes before the balloon.
    pub store_before_balloon: u64,
    /// Frame-store bytes after the balloon.
    pub store_after_balloon: u64,
    /// Translations checked against the layout (and their bytes against
    /// guest-physical reads).
    pub walks_checked: u64,
    /// The migrated VM's result from the receiving process.
    pub migration: Option<MigrationOutcome>,
}

/// What the receiving process reported back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationOutcome {
    /// Pre-copy rounds sent.
    pub rounds: u32,
    /// Pages sent while the vCPU was stopped.
    pub last_round_pages: u64,
    /// Downtime on the sending side, microseconds.
    pub downtime_us: u64,
    /// Verifications the migrated guest passed in the receiver.
    pub verified: u32,
    /// Verifications it failed there.
    pub failed: u32,
    /// Write rounds it ran there.
    pub rounds_after: u64,
}

/// The guest's program for a configuration.
pub fn program(cfg: &Config) -> guest::Program {
    let data_pages = cfg.data_mib * 256;
    guest::Program {
        data_pages,
        balloon_pages: cfg.balloon_mib * 256,
        hot_pages: (data_pages / 32).next_power_of_two() / 2,
        window_shift: 9,
        writes_per_round: 4096,
    }
}

/// The VMM's side of one vCPU thread.
#[derive(Debug, Default)]
pub(super) struct VmCtl {
    /// The answer to the guest's next control read.
    pub(super) command: AtomicU32,
    /// Stop at the next round's end and hand the vCPU back.
    pause: AtomicBool,
    /// Capture the paging registers at the next round's end.
    want_regs: AtomicBool,
    regs: Mutex<Option<X86Paging>>,
    pub(super) filled: AtomicBool,
    /// First data page the guest gave up (`u64::MAX` until it says).
    pub(super) balloon_from: AtomicU64,
    pub(super) rounds: AtomicU64,
    pub(super) verified: AtomicU64,
    pub(super) failed: AtomicU64,
    halted: AtomicBool,
}

impl VmCtl {
    pub(super) fn new() -> Self {
        VmCtl {
            balloon_from: AtomicU64::new(u64::MAX),
            ..Default::default()
        }
    }

    pub(super) fn checks(&self) -> u64 {
        self.verified.load(Ordering::SeqCst) + self.failed.load(Ordering::SeqCst)
    }
}

/// Runs the vCPU until the guest halts or the VMM pauses it; returns it.
pub(super) fn vcpu_thread(mut vcpu: KvmVcpu, ctl: Arc<VmCtl>) -> Result<KvmVcpu, KvmError> {
    loop {
        vcpu.run(|exit| match exit {
            Exit::IoOut { port, data } => {
                let value = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
                match port {
                    guest::PORT_FILLED => ctl.filled.store(true, Ordering::SeqCst),
                    guest::PORT_BALLOON => {
                        ctl.balloon_from.store(u64::from(value), Ordering::SeqCst)
                    }
                    guest::PORT_VERIFY if value == 1 => {
                        ctl.verified.fetch_add(1, Ordering::SeqCst);
                    }
                    guest::PORT_VERIFY => {
                        ctl.failed.fetch_add(1, Ordering::SeqCst);
                    }
                    guest::PORT_PROGRESS => {
                        ctl.rounds.fetch_add(1, Ordering::Relaxed);
                        if ctl.pause.load(Ordering::SeqCst) || ctl.want_regs.load(Ordering::SeqCst)
                        {
                            return Flow::Stop;
                        }
                    }
                    guest::PORT_HALT => {
                        ctl.halted.store(true, Ordering::SeqCst);
                        return Flow::Stop;
                    }
                    _ => {}
                }
                Flow::Continue
            }
            Exit::IoIn { port, data } => {
                if port == guest::PORT_CONTROL {
                    let cmd = ctl.command.swap(guest::CONTROL_RUN, Ordering::SeqCst);
                    let n = data.len().min(4);
                    data[..n].copy_from_slice(&cmd.to_le_bytes()[..n]);
                }
                Flow::Continue
            }
            Exit::Halt => {
                ctl.halted.store(true, Ordering::SeqCst);
                Flow::Stop
            }
        })?;
        if ctl.halted.load(Ordering::SeqCst) || ctl.pause.load(Ordering::SeqCst) {
            return Ok(vcpu);
        }
        if ctl.want_regs.load(Ordering::SeqCst) {
            let s = vcpu.control_regs()?;
            if let Ok(mut r) = ctl.regs.lock() {
                *r = Some(X86Paging::new(s.cr0, s.cr3, s.cr4, s.efer));
            }
            ctl.want_regs.store(false, Ordering::SeqCst);
        }
    }
}

/// One running VM.
pub(super) struct Vm {
    pub(super) mem: Arc<GuestMemory>,
    pub(super) kvm: Arc<KvmVm>,
    /// Its id with this process's dedup host (none under the service).
    pub(super) id: Option<VmId>,
    pub(super) ctl: Arc<VmCtl>,
    pub(super) thread: Mutex<Option<JoinHandle<Result<KvmVcpu, KvmError>>>>,
}

impl Vm {
    /// Waits for the vCPU thread to hand the vCPU back (the guest halted
    /// or the VMM paused it).
    pub(super) fn join(&self) -> Res<Option<KvmVcpu>> {
        let thread = self.thread.lock().map_err(|_| "poisoned")?.take();
        match thread {
            Some(t) => Ok(Some(t.join().map_err(|_| "vCPU thread panicked")??)),
            None => Ok(None),
        }
    }
}

pub(super) fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Res<()> {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > timeout {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Asks every VM in `vms` to verify its data once; waits for the answers.
pub(super) fn verify_all(vms: &[&Vm]) -> Res<()> {
    let before: Vec<u64> = vms.iter().map(|vm| vm.ctl.checks()).collect();
    for vm in vms {
        vm.ctl
            .command
            .store(guest::CONTROL_VERIFY, Ordering::SeqCst);
    }
    wait_for("the guests' verification", Duration::from_secs(60), || {
        vms.iter().zip(&before).all(|(vm, b)| vm.ctl.checks() > *b)
    })
}

pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// Runs the whole show; `spawn_receiver(port)` starts the receiving
/// process, which must call [`receive`] with `port`.
pub fn run(cfg: &Config, spawn_receiver: &dyn Fn(u16) -> std::io::Result<Child>) -> Res<Report> {
    let say = |s: String| {
        if cfg.verbose {
            println!("{s}");
        }
    };
    let prog = program(cfg);
    let code = guest::fill_and_write(&prog)?;
    let store = Arc::new(FrameStore::memfd()?);
    let host = Arc::new(DedupHost::new(Arc::clone(&store))?);
    let mut report = Report::default();

    // 1. VMs: memory, tables, program, a vCPU thread each.
    let mut vms = Vec::new();
    for i in 0..cfg.vms {
        let mem = guest::memory(&store, prog.data_pages)?;
        let cr3 = guest::build_page_tables(&mem, prog.data_pages)?;
        let start = guest::load(&mem, &code, cr3, i as u64 + 1)?;
        let id = host.register(Arc::clone(&mem), VmOptions::default())?;
        let kvm = Arc::new(if std::env::var_os("MINI_VMM_LEGACY_LOG").is_some() {
            KvmVm::with_options(
                &mem,
                pagefold::kvm::KvmOptions {
                    log_dirty_pages: true,
                    legacy_dirty_log: true,
                    ..Default::default()
                },
            )?
        } else {
            KvmVm::new(&mem)?
        });
        let mut vcpu = kvm.create_vcpu(0)?;
        vcpu.setup_long_mode(&start)?;
        let ctl = Arc::new(VmCtl::new());
        let c = Arc::clone(&ctl);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu-{i}"))
            .spawn(move || vcpu_thread(vcpu, c))?;
        vms.push(Vm {
            mem,
            kvm,
            id: Some(id),
            ctl,
            thread: Mutex::new(Some(thread)),
        });
    }
    say(format!(
        "mini_vmm: {} VMs, one vCPU each, {} MiB of data each (half alike across VMs, a quarter zero, a quarter unique), 64-bit guests in ring 3 with 4 KiB and 2 MiB pages",
        cfg.vms, cfg.data_mib
    ));
    wait_for(
        "the guests to fill their memory",
        Duration::from_secs(120),
        || {
            vms.iter().all(|vm| {
                vm.ctl.filled.load(Ordering::SeqCst)
                    && vm.ctl.balloon_from.load(Ordering::SeqCst) != u64::MAX
            })
        },
    )?;
    let view = host.kernel_view()?;
    say(format!(
        "mini_vmm: guests filled their memory; frame store {:.1} MiB, RSS {:.1} MiB",
        mib(view.store_bytes),
        mib(view.rss_bytes)
    ));

    // 2. Balloon: each guest gave up the tail of its data.
    report.store_before_balloon = host.kernel_view()?.store_bytes;
    for vm in &vms {
        let from = vm.ctl.balloon_from.load(Ordering::SeqCst);
        let pages = prog.data_pages.saturating_sub(from);
        let id = vm.id.ok_or("a VM of this host has its id")?;
        let balloon = Balloon::new(Arc::clone(&vm.mem)).with_dedup(Arc::clone(&host), id);
        let r = balloon.inflate_range(
            GuestPhysAddr(guest::DATA_GPA + from * PAGE_SIZE as u64),
            pages * PAGE_SIZE as u64,
        )?;
        if !r.errors.is_empty() {
            return Err(format!("balloon: {:?}", r.errors).into());
        }
        report.ballooned_pages += r.released_pages;
    }
    report.store_after_balloon = host.kernel_view()?.store_bytes;
    say(format!(
        "mini_vmm: balloon: {} pages given up by the guests released; frame store {:.1} -> {:.1} MiB",
        report.ballooned_pages,
        mib(report.store_before_balloon),
        mib(report.store_after_balloon)
    ));
    let all: Vec<&Vm> = vms.iter().collect();
    verify_all(&all)?;

    // 3. Dedup in the background while the guests keep writing.
    host.start_background(ScanBudget::Pages(32 * 1024), Duration::from_millis(5))?;
    let t = Instant::now();
    let mut best = 0i64;
    while t.elapsed().as_secs_f64() < cfg.fold_secs
        || (report.peak.pages_sharing < cfg.fold_goal_sharing && t.elapsed().as_secs() < 60)
    {
        std::thread::sleep(Duration::from_millis(250));
        let s = host.stats()?;
        let v = host.kernel_view()?;
        say(format!(
            "mini_vmm: [{:4.1} s] shared {:6} sharing {:6} zero {:6} volatile {:5} COW breaks {:5} full scans {:3} | saved {:6.1} MiB, frame store {:6.1} MiB, RSS {:6.1} MiB | guest rounds {:?}",
            t.elapsed().as_secs_f64(),
            s.pages_shared,
            s.pages_sharing,
            s.zero_pages,
            s.pages_volatile,
            s.cow_breaks,
            s.full_scans,
            mib(u64::try_from(s.profit_bytes.max(0)).unwrap_or(0)),
            mib(v.store_bytes),
            mib(v.rss_bytes),
            vms.iter().map(|vm| vm.ctl.rounds.load(Ordering::Relaxed)).collect::<Vec<_>>(),
        ));
        if s.profit_bytes >= best {
            best = s.profit_bytes;
            report.peak = s;
        }
    }
    verify_all(&all)?;
    say("mini_vmm: every guest verified its whole memory while being folded".into());

    // 4. The walker on each vCPU's paging registers.
    for (i, vm) in vms.iter().enumerate() {
        vm.ctl.want_regs.store(true, Ordering::SeqCst);
        wait_for("the vCPU's registers", Duration::from_secs(10), || {
            !vm.ctl.want_regs.load(Ordering::SeqCst)
        })?;
        let paging = vm
            .ctl
            .regs
            .lock()
            .map_err(|_| "poisoned")?
            .take()
            .ok_or("no registers")?;
        let walker = Walker::new(paging)?;
        let data_size = prog.data_pages * PAGE_SIZE as u64;
        let probes = [
            (guest::CODE, guest::CODE, PAGE_SIZE as u64),
            (guest::DATA_VA + 0x1234, guest::DATA_GPA + 0x1234, 2 << 20),
            (
                guest::DATA_VA + data_size - 0x1000 + 8,
                guest::DATA_GPA + data_size - 0x1000 + 8,
                PAGE_SIZE as u64,
            ),
        ];
        for (va, want_gpa, want_size) in probes {
            let access = Access::new(AccessKind::Read, Privilege::User);
            let t = walker.translate(&*vm.mem, GuestVirtAddr(va), access)?;
            if t.gpa != GuestPhysAddr(want_gpa) || t.page_size != want_size {
                return Err(format!(
                    "VM {i}: {va:#x} translated to {:#x} ({} bytes), want {want_gpa:#x} ({want_size})",
                    t.gpa, t.page_size
                )
                .into());
            }
            let mut by_va = [0u8; 8];
            walker.read_virt(
                &*vm.mem,
                GuestVirtAddr(va),
                &mut by_va,
                access,
                WalkOptions::default(),
                None,
            )?;
            let by_gpa: u64 = vm.mem.read_obj(GuestPhysAddr(want_gpa))?;
            // The guest may write between the two reads; code and the
            // given-up tail do not change.
            if va == guest::CODE && u64::from_le_bytes(by_va) != by_gpa {
                return Err(format!("VM {i}: read_virt and read differ at {va:#x}").into());
            }
            report.walks_checked += 1;
            say(format!(
                "mini_vmm: VM {i}: CR3 {:#x}: {va:#x} -> {:#x} ({} KiB page, {} refs)",
                paging.cr3,
                t.gpa,
                t.page_size >> 10,
                t.memory_refs
            ));
        }
    }

    // 5. Live-migrate VM 0 into another process.
    report.migration = Some(migrate(&vms[0], spawn_receiver, &say)?);
    let vm0 = vms.remove(0);
    host.unregister(vm0.id.ok_or("a VM of this host has its id")?)?;

    // 6. Stop the others after a last verification.
    for vm in &vms {
        vm.ctl
            .command
            .store(guest::CONTROL_VERIFY_HALT, Ordering::SeqCst);
    }
    for vm in &vms {
        vm.join()?;
    }
    host.stop_background();
    report.last = host.stats()?;
    report.verified.push((
        vm0.ctl.verified.load(Ordering::SeqCst),
        vm0.ctl.failed.load(Ordering::SeqCst),
    ));
    report.rounds.push(vm0.ctl.rounds.load(Ordering::SeqCst));
    for vm in &vms {
        report.verified.push((
            vm.ctl.verified.load(Ordering::SeqCst),
            vm.ctl.failed.load(Ordering::SeqCst),
        ));
        report.rounds.push(vm.ctl.rounds.load(Ordering::SeqCst));
    }
    say(format!(
        "mini_vmm: done: per VM (verified, failed) {:?}, rounds {:?}; dedup at best: {} pages sharing, {:.1} MiB saved; COW breaks {}",
        report.verified,
        report.rounds,
        report.peak.pages_sharing,
        mib(u64::try_from(report.peak.profit_bytes.max(0)).unwrap_or(0)),
        report.last.cow_breaks
    ));
    Ok(report)
}

/// Pre-copy migration of `vm` to a fresh process: rounds while the guest
/// runs (KVM's dirty log feeds each harvest), then the vCPU stops at a
/// round's end, the last round and the vCPU state go out, and the
/// receiver runs the guest on, verifies, and reports.
pub(super) fn migrate(
    vm: &Vm,
    spawn_receiver: &dyn Fn(u16) -> std::io::Result<Child>,
    say: &dyn Fn(String),
) -> Res<MigrationOutcome> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let port = listener.local_addr()?.port();
    let mut child = spawn_receiver(port)?;
    // Accept with a deadline, and give up at once if the receiver died.
    listener.set_nonblocking(true)?;
    let t = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait()? {
                    return Err(format!("the receiving process exited early: {status}").into());
                }
                if t.elapsed() > Duration::from_secs(60) {
                    let _ = child.kill();
                    return Err("the receiving process never connected".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.set_nonblocking(false)?;
    let mut back = stream.try_clone()?;
    let opts = PrecopyOptions {
        downtime_budget: Duration::from_millis(20),
        max_rounds: 20,
        ..Default::default()
    };
    vm.kvm.fetch_dirty_log()?; // writes so far: round 0 reads everything
    let mut sender = Sender::start(&vm.mem, BufWriter::with_capacity(1 << 20, stream), opts)?;
    let kvm = Arc::clone(&vm.kvm);
    sender.set_dirty_source(move || {
        kvm.fetch_dirty_log()?;
        Ok(())
    });
    let p = sender.iterate()?;
    say(format!(
        "mini_vmm: migrating the VM to another process: {} rounds while it ran, {:.1} MiB sent, {} pages dirty at the pause",
        p.round + 1,
        mib(p.bytes),
        p.dirty_pages
    ));
    vm.ctl.pause.store(true, Ordering::SeqCst);
    let vcpu = vm.join()?.ok_or("VM 0 has no vCPU thread")?;
    let state = vcpu.state()?;
    let (mut out, summary) = sender.finish()?;
    let bytes = state.to_bytes();
    out.write_all(&(bytes.len() as u64).to_le_bytes())?;
    out.write_all(&bytes)?;
    out.flush()?;
    drop(out);
    let mut answer = [0u8; 24];
    back.read_exact(&mut answer)?;
    let status = child.wait()?;
    let word = |i: usize| u64::from_le_bytes(answer[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    let outcome = MigrationOutcome {
        rounds: summary.rounds,
        last_round_pages: summary.last_round_pages,
        downtime_us: u64::try_from(summary.downtime.as_micros()).unwrap_or(u64::MAX),
        verified: u32::try_from(word(0)).unwrap_or(u32::MAX),
        failed: u32::try_from(word(1)).unwrap_or(u32::MAX),
        rounds_after: word(2),
    };
    say(format!(
        "mini_vmm: VM 0 migrated: {} rounds, {} pages in the last, sender downtime {:.2} ms; in the new process it ran {} more rounds and verified its memory {} times ({} failed); receiver exit {status}",
        outcome.rounds,
        outcome.last_round_pages,
        outcome.downtime_us as f64 / 1000.0,
        outcome.rounds_after,
        outcome.verified,
        outcome.failed
    ));
    if !status.success() {
        return Err(format!("the receiving process failed: {status}").into());
    }
    Ok(outcome)
}

/// The receiving process: takes the memory stream and the vCPU state from
/// `port`, runs the guest in a new VM, has it verify its whole memory
/// right away and again after some more rounds, and reports (verified,
/// failed, rounds) back over the connection.
pub fn receive(port: u16) -> Res<()> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    let mut back = stream.try_clone()?;
    let mut input = BufReader::with_capacity(1 << 20, stream);
    let got = receive_migration(&mut input, ReaderLimits::default())?;
    let mut len = [0u8; 8];
    input.read_exact(&mut len)?;
    let len = usize::try_from(u64::from_le_bytes(len))?;
    if len > VcpuState::MAX_BYTES {
        return Err(format!(
            "vCPU state of {len} bytes, at most {}",
            VcpuState::MAX_BYTES
        )
        .into());
    }
    let mut bytes = vec![0u8; len];
    input.read_exact(&mut bytes)?;
    let state = VcpuState::from_bytes(&bytes)?;
    let mem = Arc::new(got.mem);
    let kvm = KvmVm::new(&mem)?;
    let mut vcpu = kvm.create_vcpu(0)?;
    vcpu.set_state(&state)?;
    println!(
        "receiver: {} MiB of guest memory and the vCPU state arrived (digest verified: {}); resuming the guest at RIP {:#x}",
        mem.total_size() >> 20,
        got.stats.verified,
        state.regs.rip
    );
    let ctl = Arc::new(VmCtl::new());
    // Verify at once; after 200 more rounds verify again and stop.
    ctl.command.store(guest::CONTROL_VERIFY, Ordering::SeqCst);
    let c = Arc::clone(&ctl);
    let thread = std::thread::spawn(move || vcpu_thread(vcpu, c));
    wait_for("the first verification", Duration::from_secs(60), || {
        ctl.checks() >= 1
    })?;
    let start = ctl.rounds.load(Ordering::SeqCst);
    wait_for("more rounds", Duration::from_secs(60), || {
        ctl.rounds.load(Ordering::SeqCst) >= start + 200
    })?;
    ctl.command
        .store(guest::CONTROL_VERIFY_HALT, Ordering::SeqCst);
    thread.join().map_err(|_| "vCPU thread panicked")??;
    let (v, f, r) = (
        ctl.verified.load(Ordering::SeqCst),
        ctl.failed.load(Ordering::SeqCst),
        ctl.rounds.load(Ordering::SeqCst),
    );
    println!("receiver: the guest ran {r} rounds here, verified {v} times, failed {f}");
    let mut answer = Vec::with_capacity(24);
    for w in [v, f, r] {
        answer.extend_from_slice(&w.to_le_bytes());
    }
    back.write_all(&answer)?;
    if f > 0 || v < 2 {
        return Err("the migrated guest's verification failed".into());
    }
    Ok(())
}
