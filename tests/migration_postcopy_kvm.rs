//! Post-copy live migration of a running KVM guest that checks its own
//! memory (the mini VMM's fill-and-write program): it fills its data and
//! keeps writing while pre-copy rounds go out (KVM's dirty log feeding each
//! harvest), is stopped, and resumes in a fresh VM at the destination right
//! after the switchover, while most of what it wrote last is still at the
//! source: its vCPU's touches fault through KVM, are requested on the
//! return path and placed ahead of the push. There it verifies its whole
//! memory against its running checksum, writes on, and verifies again.
//! Also with no pre-copy round at all (the guest resumes on empty memory).
//! Skips, saying so, where `/dev/kvm` is absent or unusable.
#![cfg(feature = "kvm")]
#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use pagefold::{
    kvm::{Exit, Flow, KvmVcpu, KvmVm, VcpuState},
    migration::{receive_postcopy, PostcopyOptions, PrecopyOptions, ReaderLimits, Sender},
    FrameStore, GuestMemory,
};
use pagefold_tools::{mini_vmm::guest, pipe::pipe};

fn kvm_usable(test: &str) -> bool {
    match pagefold::kvm::probe() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIP {test}: KVM is not usable here: {e}");
            false
        }
    }
}

/// The VMM's side of the vCPU thread.
#[derive(Default)]
struct Ctl {
    command: AtomicU32,
    pause: AtomicBool,
    filled: AtomicBool,
    rounds: AtomicU64,
    verified: AtomicU64,
    failed: AtomicU64,
    halted: AtomicBool,
}

fn vcpu_thread(mut vcpu: KvmVcpu, ctl: Arc<Ctl>) -> KvmVcpu {
    loop {
        vcpu.run(|exit| match exit {
            Exit::IoOut { port, data } => {
                let value = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
                match port {
                    guest::PORT_FILLED => ctl.filled.store(true, Ordering::SeqCst),
                    guest::PORT_VERIFY if value == 1 => {
                        ctl.verified.fetch_add(1, Ordering::SeqCst);
                    }
                    guest::PORT_VERIFY => {
                        ctl.failed.fetch_add(1, Ordering::SeqCst);
                    }
                    guest::PORT_PROGRESS => {
                        ctl.rounds.fetch_add(1, Ordering::SeqCst);
                        if ctl.pause.load(Ordering::SeqCst) {
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
        })
        .unwrap();
        if ctl.halted.load(Ordering::SeqCst) || ctl.pause.load(Ordering::SeqCst) {
            return vcpu;
        }
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Migrates a running mini VMM guest with `rounds` pre-copy rounds (0:
/// post-copy at once) and checks it at the destination.
fn migrate_running_guest(rounds: u32) {
    let prog = guest::Program {
        data_pages: 2048,
        balloon_pages: 0,
        hot_pages: 256,
        window_shift: 3,
        writes_per_round: 4096,
    };
    let code = guest::fill_and_write(&prog).unwrap();
    let store = Arc::new(FrameStore::memfd().unwrap());
    let mem = guest::memory(&store, prog.data_pages).unwrap();
    let cr3 = guest::build_page_tables(&mem, prog.data_pages).unwrap();
    let start = guest::load(&mem, &code, cr3, 7).unwrap();
    let kvm = Arc::new(KvmVm::new(&mem).unwrap());
    let mut vcpu = kvm.create_vcpu(0).unwrap();
    vcpu.setup_long_mode(&start).unwrap();
    let ctl = Arc::new(Ctl::default());
    let c = Arc::clone(&ctl);
    let thread = std::thread::spawn(move || vcpu_thread(vcpu, c));
    wait_for("the guest's fill", || ctl.filled.load(Ordering::SeqCst));

    // Source: rounds while the guest writes, then stop and switch over.
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let (m, k, c) = (Arc::clone(&mem), Arc::clone(&kvm), Arc::clone(&ctl));
    let source = std::thread::spawn(move || {
        k.fetch_dirty_log().unwrap();
        let opts = PrecopyOptions {
            max_rounds: rounds.max(1),
            downtime_budget: Duration::ZERO,
            bandwidth_limit: Some(32 << 20),
            ..PrecopyOptions::default()
        };
        let mut snd = Sender::start_postcopy(&m, fw, opts).unwrap();
        let kd = Arc::clone(&k);
        snd.set_dirty_source(move || {
            kd.fetch_dirty_log()?;
            Ok(())
        });
        if rounds > 0 {
            snd.iterate().unwrap();
        }
        c.pause.store(true, Ordering::SeqCst);
        let vcpu = thread.join().unwrap();
        let state = vcpu.state().unwrap().to_bytes();
        let rounds_at_source = c.rounds.load(Ordering::SeqCst);
        let (_, summary) = snd
            .switchover(br, &state, PostcopyOptions::default())
            .unwrap();
        (summary, rounds_at_source)
    });

    // Destination: resume at the switchover, verify at once.
    let inc = receive_postcopy(fr, bw, ReaderLimits::default()).unwrap();
    let dmem = Arc::new(inc.mem);
    let dkvm = KvmVm::new(&dmem).unwrap();
    let mut dvcpu = dkvm.create_vcpu(0).unwrap();
    dvcpu
        .set_state(&VcpuState::from_bytes(&inc.state).unwrap())
        .unwrap();
    let dctl = Arc::new(Ctl::default());
    dctl.command.store(guest::CONTROL_VERIFY, Ordering::SeqCst);
    let c = Arc::clone(&dctl);
    let dthread = std::thread::spawn(move || vcpu_thread(dvcpu, c));
    wait_for("the first verification", || {
        dctl.verified.load(Ordering::SeqCst) + dctl.failed.load(Ordering::SeqCst) >= 1
    });
    let stats = inc.receiving.wait().unwrap();
    let (summary, rounds_at_source) = source.join().unwrap();
    // Write on, then verify and stop.
    let r0 = dctl.rounds.load(Ordering::SeqCst);
    wait_for("more rounds", || {
        dctl.rounds.load(Ordering::SeqCst) >= r0 + 50
    });
    dctl.command
        .store(guest::CONTROL_VERIFY_HALT, Ordering::SeqCst);
    dthread.join().unwrap();
    eprintln!(
        "rounds at the source {rounds_at_source}, at the destination {}; {stats:?}; {summary:?}",
        dctl.rounds.load(Ordering::SeqCst)
    );
    assert_eq!(dctl.failed.load(Ordering::SeqCst), 0);
    assert_eq!(dctl.verified.load(Ordering::SeqCst), 2);
    assert_eq!(stats.needed, summary.needed);
    assert_eq!(summary.precopy_rounds, rounds.min(1));
    if rounds == 0 {
        assert_eq!(stats.needed, stats.pages);
    } else {
        assert!(stats.discarded > 0, "the guest wrote during the round");
    }
    assert_eq!(stats.poisoned, 0);
    assert!(stats.complete_sent);
    let _ = GuestMemory::total_size(&dmem);
}

#[test]
fn running_guest_migrates_post_copy_after_a_precopy_round() {
    if !kvm_usable("running_guest_migrates_post_copy_after_a_precopy_round") {
        return;
    }
    migrate_running_guest(1);
}

#[test]
fn running_guest_migrates_post_copy_at_once() {
    if !kvm_usable("running_guest_migrates_post_copy_at_once") {
        return;
    }
    migrate_running_guest(0);
}

/// A writer that fails (and closes its pipe) after `left` bytes.
struct Cut {
    inner: Option<pagefold_tools::pipe::PipeWriter>,
    left: u64,
}

impl std::io::Write for Cut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(w) = self.inner.as_mut() else {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        };
        if (buf.len() as u64) > self.left {
            let n = self.left as usize;
            if n > 0 {
                w.write_all(&buf[..n])?;
            }
            self.inner = None;
            self.left = 0;
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.left -= buf.len() as u64;
        w.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const CHILD: &str = "PAGEFOLD_POSTCOPY_KVM_BROKEN";

/// Run as a child process by the next test (does nothing otherwise): the
/// guest is switched over at once, the stream breaks after a few hundred
/// pages, and the guest is run at the destination anyway, asked to verify
/// its memory. Its vCPU must meet a memory error (SIGBUS, or an error from
/// `KVM_RUN`: exit 4), never finish a verification (3: passed, 5: failed
/// on wrong bytes) and never hang.
#[test]
fn child_runs_a_guest_whose_migration_broke() {
    if std::env::var(CHILD).is_err() {
        return;
    }
    let prog = guest::Program {
        data_pages: 1024,
        balloon_pages: 0,
        hot_pages: 128,
        window_shift: 3,
        writes_per_round: 4096,
    };
    let code = guest::fill_and_write(&prog).unwrap();
    let store = Arc::new(FrameStore::memfd().unwrap());
    let mem = guest::memory(&store, prog.data_pages).unwrap();
    let cr3 = guest::build_page_tables(&mem, prog.data_pages).unwrap();
    let start = guest::load(&mem, &code, cr3, 3).unwrap();
    let kvm = Arc::new(KvmVm::new(&mem).unwrap());
    let mut vcpu = kvm.create_vcpu(0).unwrap();
    vcpu.setup_long_mode(&start).unwrap();
    let ctl = Arc::new(Ctl::default());
    let c = Arc::clone(&ctl);
    let thread = std::thread::spawn(move || vcpu_thread(vcpu, c));
    wait_for("the guest's fill", || ctl.filled.load(Ordering::SeqCst));
    ctl.pause.store(true, Ordering::SeqCst);
    let vcpu = thread.join().unwrap();
    let state = vcpu.state().unwrap().to_bytes();
    let (fw, fr) = pipe(16);
    let (bw, br) = pipe(16);
    let m = Arc::clone(&mem);
    let source = std::thread::spawn(move || {
        let out = Cut {
            inner: Some(fw),
            left: 300 * 4096,
        };
        let snd = Sender::start_postcopy(&m, out, PrecopyOptions::default()).unwrap();
        snd.switchover(br, &state, PostcopyOptions::default())
            .map(|_| ())
    });
    let inc = receive_postcopy(fr, bw, ReaderLimits::default()).unwrap();
    let dmem = Arc::new(inc.mem);
    let e = inc.receiving.wait().unwrap_err();
    eprintln!("destination: {e}");
    assert!(source.join().unwrap().is_err());
    let dkvm = KvmVm::new(&dmem).unwrap();
    let mut dvcpu = dkvm.create_vcpu(0).unwrap();
    dvcpu
        .set_state(&VcpuState::from_bytes(&inc.state).unwrap())
        .unwrap();
    let dctl = Arc::new(Ctl::default());
    dctl.command.store(guest::CONTROL_VERIFY, Ordering::SeqCst);
    let r = dvcpu.run(|exit| match exit {
        Exit::IoOut { port, data } if port == guest::PORT_VERIFY => {
            let ok = data.first() == Some(&1);
            std::process::exit(if ok { 3 } else { 5 });
        }
        Exit::IoIn { port, data } => {
            if port == guest::PORT_CONTROL {
                let cmd = dctl.command.swap(guest::CONTROL_RUN, Ordering::SeqCst);
                let n = data.len().min(4);
                data[..n].copy_from_slice(&cmd.to_le_bytes()[..n]);
            }
            Flow::Continue
        }
        Exit::Halt => Flow::Stop,
        _ => Flow::Continue,
    });
    eprintln!("KVM_RUN: {r:?}");
    std::process::exit(if r.is_err() { 4 } else { 6 });
}

#[test]
fn a_guest_run_after_a_broken_migration_meets_a_memory_error() {
    use std::os::unix::process::ExitStatusExt;
    if !kvm_usable("a_guest_run_after_a_broken_migration_meets_a_memory_error") {
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_runs_a_guest_whose_migration_broke",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the guest of a broken migration hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    eprintln!("child: {status:?}\n{err}");
    assert!(
        status.signal() == Some(libc::SIGBUS) || status.code() == Some(4),
        "{status:?}: {err}"
    );
}
