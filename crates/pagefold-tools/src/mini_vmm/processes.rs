//! The mini VMM with one process per VM, as production VMMs run: the host
//! process runs the pagefold service ([`pagefold::service::Service`]) and
//! folds while each VM process runs its guest on KVM with its memory under
//! the service ([`pagefold::service::ServiceClient`]); the VMs verify
//! their whole memory while being folded, and VM 0's process live-migrates
//! its guest into yet another process, which verifies it there.
//!
//! The host talks to each VM process over its stdin and stdout, a command
//! and a one-line answer at a time (`verify`, `stats`, `migrate`, `halt`).

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout},
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use pagefold::{
    kvm::KvmVm,
    service::{ClientOptions, Service, ServiceClient, ServiceOptions},
    FrameStore, ScanBudget,
};

use super::{
    guest::{self, Res},
    vmm::{self, mib, wait_for, Config, MigrationOutcome, Vm, VmCtl},
};

/// What the multi-process run saw, for the caller to check.
#[derive(Debug, Default)]
pub struct ProcessReport {
    /// Per VM: the verifications its guest passed and failed in its own
    /// process (VM 0's up to its migration).
    pub verified: Vec<(u64, u64)>,
    /// The most guest pages the service had merged at once.
    pub peak_pages_merged: u64,
    /// The VM processes' memfds, as the kernel counts them, once filled.
    pub guest_bytes_filled: u64,
    /// The same with the saving at its best (the shared frames counted
    /// apart, in `shared_bytes_at_peak`).
    pub guest_bytes_at_peak: u64,
    /// The service's shared frames then.
    pub shared_bytes_at_peak: u64,
    /// VM 0's migration, reported by the receiving process.
    pub migration: Option<MigrationOutcome>,
}

/// A VM process, seen from the host.
struct VmProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl VmProcess {
    fn line(&mut self) -> Res<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err("a VM process exited".into());
        }
        Ok(line.trim().to_owned())
    }

    fn ask(&mut self, cmd: &str) -> Res<String> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        self.line()
    }
}

/// Numbers after the first word of an answer.
fn numbers(answer: &str) -> Vec<u64> {
    answer
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// The host side: starts the service on a socket of its own, spawns one VM
/// process per VM through `spawn_vm(index, socket)` (which must run
/// [`vm_process`] with those arguments and piped stdin and stdout), folds
/// while they run, has them verify, and migrates VM 0.
pub fn run(
    cfg: &Config,
    spawn_vm: &dyn Fn(usize, &Path) -> std::io::Result<Child>,
) -> Res<ProcessReport> {
    let say = |s: String| {
        if cfg.verbose {
            println!("{s}");
        }
    };
    let socket =
        std::env::temp_dir().join(format!("pagefold-mini-vmm-{}.sock", std::process::id()));
    let service = Service::start(
        &socket,
        ServiceOptions {
            background: Some((ScanBudget::Pages(32 * 1024), Duration::from_millis(5))),
            ..ServiceOptions::default()
        },
    )?;
    let mut report = ProcessReport::default();
    let mut vms = Vec::new();
    for i in 0..cfg.vms {
        let mut child = spawn_vm(i, &socket)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err("a VM process needs piped stdin and stdout".into());
        };
        vms.push(VmProcess {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        });
    }
    for vm in &mut vms {
        let line = vm.line()?;
        if line != "filled" {
            return Err(format!("a VM process said {line:?} instead of filling its memory").into());
        }
    }
    let filled = service.stats()?;
    report.guest_bytes_filled = filled.guest_bytes;
    say(format!(
        "mini_vmm: {} VM processes, one vCPU each, {} MiB of data each, under the pagefold service ({} attached); their memfds hold {:.1} MiB",
        cfg.vms,
        cfg.data_mib,
        filled.vms,
        mib(filled.guest_bytes)
    ));
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < cfg.fold_secs
        || (report.peak_pages_merged < cfg.fold_goal_sharing && t.elapsed().as_secs() < 60)
    {
        std::thread::sleep(Duration::from_millis(250));
        let s = service.stats()?;
        say(format!(
            "mini_vmm: [{:4.1} s] service: {} pages merged, VM memfds {:6.1} MiB + shared frames {:5.1} MiB (of {:.1} MiB filled)",
            t.elapsed().as_secs_f64(),
            s.pages_merged,
            mib(s.guest_bytes),
            mib(s.shared_bytes),
            mib(report.guest_bytes_filled)
        ));
        if s.pages_merged >= report.peak_pages_merged {
            report.peak_pages_merged = s.pages_merged;
            report.guest_bytes_at_peak = s.guest_bytes;
            report.shared_bytes_at_peak = s.shared_bytes;
        }
    }
    for vm in &mut vms {
        let a = vm.ask("verify")?;
        let n = numbers(&a);
        if n.get(1).copied().unwrap_or(1) != 0 {
            return Err(format!("a guest's verification failed: {a}").into());
        }
    }
    say(
        "mini_vmm: every guest verified its whole memory in its own process while being folded"
            .into(),
    );
    let answer = vms[0].ask("migrate")?;
    let n = numbers(&answer);
    if n.len() < 6 {
        return Err(format!("VM 0's process could not migrate: {answer}").into());
    }
    report.migration = Some(MigrationOutcome {
        rounds: u32::try_from(n[0]).unwrap_or(u32::MAX),
        last_round_pages: n[1],
        downtime_us: n[2],
        verified: u32::try_from(n[3]).unwrap_or(u32::MAX),
        failed: u32::try_from(n[4]).unwrap_or(u32::MAX),
        rounds_after: n[5],
    });
    for vm in &mut vms {
        let a = vm.ask("halt")?;
        let n = numbers(&a);
        report.verified.push((
            n.first().copied().unwrap_or(0),
            n.get(1).copied().unwrap_or(1),
        ));
        let _ = vm.child.wait();
    }
    say(format!(
        "mini_vmm: done: per VM process (verified, failed) {:?}; the service merged at best {} pages, VM memfds {:.1} -> {:.1} MiB plus {:.1} MiB of shared frames",
        report.verified,
        report.peak_pages_merged,
        mib(report.guest_bytes_filled),
        mib(report.guest_bytes_at_peak),
        mib(report.shared_bytes_at_peak)
    ));
    drop(service);
    Ok(report)
}

/// A VM process: its guest on KVM with its memory under the service at
/// `socket`; prints `filled` once the guest filled its memory, then
/// answers the host's commands on stdin. `spawn_receiver(port)` starts the
/// process VM 0 migrates into (it must call [`vmm::receive`] with `port`).
pub fn vm_process(
    index: usize,
    socket: &Path,
    cfg: &Config,
    spawn_receiver: &dyn Fn(u16) -> std::io::Result<Child>,
) -> Res<()> {
    let prog = vmm::program(cfg);
    let code = guest::fill_and_write(&prog)?;
    // Alone in its store: the service receives the whole memfd.
    let store = Arc::new(FrameStore::memfd()?);
    let mem = guest::memory(&store, prog.data_pages)?;
    let cr3 = guest::build_page_tables(&mem, prog.data_pages)?;
    let start = guest::load(&mem, &code, cr3, index as u64 + 1)?;
    let kvm = Arc::new(KvmVm::new(&mem)?);
    let client = ServiceClient::attach(
        socket,
        Arc::clone(&mem),
        ClientOptions {
            vm_tag: index as u64,
            ..ClientOptions::default()
        },
    )?;
    let mut vcpu = kvm.create_vcpu(0)?;
    vcpu.setup_long_mode(&start)?;
    let ctl = Arc::new(VmCtl::new());
    let c = Arc::clone(&ctl);
    let thread = std::thread::Builder::new()
        .name(format!("vcpu-{index}"))
        .spawn(move || vmm::vcpu_thread(vcpu, c))?;
    let vm = Vm {
        mem,
        kvm,
        id: None,
        ctl,
        thread: Mutex::new(Some(thread)),
    };
    wait_for(
        "the guest to fill its memory",
        Duration::from_secs(120),
        || vm.ctl.filled.load(Ordering::SeqCst),
    )?;
    let out = std::io::stdout();
    let answer = |s: String| -> Res<()> {
        let mut o = out.lock();
        writeln!(o, "{s}")?;
        o.flush()?;
        Ok(())
    };
    answer("filled".into())?;
    let counts = |vm: &Vm| {
        (
            vm.ctl.verified.load(Ordering::SeqCst),
            vm.ctl.failed.load(Ordering::SeqCst),
            vm.ctl.rounds.load(Ordering::SeqCst),
        )
    };
    let mut migrated = false;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        match line.trim() {
            "verify" => {
                vmm::verify_all(&[&vm])?;
                let (v, f, r) = counts(&vm);
                answer(format!("verified {v} {f} {r}"))?;
            }
            "stats" => {
                let (_, _, r) = counts(&vm);
                answer(format!("stats {} {r}", client.pages_remapped()))?;
            }
            "migrate" => match vmm::migrate(&vm, spawn_receiver, &|s| eprintln!("{s}")) {
                Ok(m) => {
                    migrated = true;
                    answer(format!(
                        "migrated {} {} {} {} {} {}",
                        m.rounds,
                        m.last_round_pages,
                        m.downtime_us,
                        m.verified,
                        m.failed,
                        m.rounds_after
                    ))?;
                }
                Err(e) => answer(format!("error {e}"))?,
            },
            "halt" => {
                if !migrated {
                    vm.ctl
                        .command
                        .store(guest::CONTROL_VERIFY_HALT, Ordering::SeqCst);
                    vm.join()?;
                }
                let (v, f, r) = counts(&vm);
                answer(format!("halted {v} {f} {r}"))?;
                break;
            }
            other => answer(format!("error unknown command {other:?}"))?,
        }
    }
    drop(client);
    Ok(())
}
