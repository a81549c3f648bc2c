//! vCPU states in snapshots: saved with the memory and read back field for
//! field, full and incremental (each snapshot carries its own); files
//! without them unchanged; the header's vCPU flag checked. And on KVM: the
//! mini VMM's guest run until it has written its memory and its running
//! checksum (a register), snapshotted with its vCPU, restored into a fresh
//! VM and vCPU, run on, and its own verification passes there, leaving the
//! same memory as the original run on as far. Skips the KVM test, saying
//! so, where `/dev/kvm` is absent or unusable.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use pagefold::{
    snapshot::{
        save, save_incremental, save_incremental_with_vcpus, save_with_vcpus, Part, Problem,
        SaveOptions, SnapshotError, SnapshotReader, VcpuState,
    },
    GuestMemory, GuestPhysAddr, RegionSet, PAGE_SIZE,
};

mod common;
use common::temp_dir::TempDir;

const PAGE: u64 = PAGE_SIZE as u64;

fn memory() -> GuestMemory {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 8 * PAGE)]).unwrap();
    mem.write(GuestPhysAddr(0), &[0x11; PAGE_SIZE]).unwrap();
    mem.write(GuestPhysAddr(3 * PAGE), b"vcpu").unwrap();
    mem
}

/// `n` states with every field distinct (a swapped pair shows).
fn states(n: u64, seed: u64) -> Vec<VcpuState> {
    (0..n)
        .map(|i| {
            let mut k = seed * 0x1_0000 + i * 0x100;
            let mut next = || {
                k += 1;
                k
            };
            let mut s = VcpuState::default();
            let r = &mut s.regs;
            for f in [
                &mut r.rax,
                &mut r.rbx,
                &mut r.rcx,
                &mut r.rdx,
                &mut r.rsi,
                &mut r.rdi,
                &mut r.rsp,
                &mut r.rbp,
                &mut r.r8,
                &mut r.r9,
                &mut r.r10,
                &mut r.r11,
                &mut r.r12,
                &mut r.r13,
                &mut r.r14,
                &mut r.r15,
                &mut r.rip,
                &mut r.rflags,
            ] {
                *f = next() | 1 << 63;
            }
            let x = &mut s.sregs;
            for f in [
                &mut x.cr0,
                &mut x.cr2,
                &mut x.cr3,
                &mut x.cr4,
                &mut x.cr8,
                &mut x.efer,
                &mut x.apic_base,
            ] {
                *f = next();
            }
            for g in [
                &mut x.cs, &mut x.ds, &mut x.es, &mut x.fs, &mut x.gs, &mut x.ss, &mut x.tr,
                &mut x.ldt,
            ] {
                g.base = next() << 32;
                g.limit = next() as u32;
                g.selector = next() as u16;
                for b in [
                    &mut g.type_,
                    &mut g.present,
                    &mut g.dpl,
                    &mut g.db,
                    &mut g.s,
                    &mut g.l,
                    &mut g.g,
                    &mut g.avl,
                    &mut g.unusable,
                ] {
                    *b = next() as u8;
                }
            }
            for t in [&mut x.gdt, &mut x.idt] {
                t.base = next();
                t.limit = next() as u16;
            }
            for v in &mut x.interrupt_bitmap {
                *v = next();
            }
            for v in &mut s.debug.db {
                *v = next();
            }
            s.debug.dr6 = next();
            s.debug.dr7 = next();
            // The state KVM keeps beside the registers.
            let b = next();
            s.xsave = (0..4096 + 64 * i).map(|k| (k ^ b) as u8).collect();
            s.xcrs = vec![(0, 7 + i)];
            s.msrs = (0..5).map(|k| (0xc000_0080 + k as u32, next())).collect();
            s.lapic = Some(Box::new(std::array::from_fn(|k| (k as u64 + b) as u8)));
            s.events = Some(std::array::from_fn(|k| (k as u64 * 3 + b) as u8));
            s.mp_state = Some(i as u32 % 4);
            s
        })
        .collect()
}

/// [`states`] with the registers only (what a file of an earlier build
/// reads back as).
fn registers_only(n: u64, seed: u64) -> Vec<VcpuState> {
    states(n, seed)
        .into_iter()
        .map(|s| VcpuState {
            regs: s.regs,
            sregs: s.sregs,
            debug: s.debug,
            ..VcpuState::default()
        })
        .collect()
}

#[test]
fn vcpu_states_round_trip_full_and_incremental() {
    let dir = TempDir::new("snap-vcpu-rt");
    let mem = memory();
    let full = dir.path("full.snap");
    save_with_vcpus(&mem, &full, &SaveOptions::default(), &states(3, 1)).unwrap();
    let base = SnapshotReader::open(&full).unwrap();
    assert_eq!(base.vcpus(), states(3, 1));

    // An incremental snapshot carries its own states, not its parent's.
    mem.write(GuestPhysAddr(5 * PAGE), &[0x55; 64]).unwrap();
    let mut dirty = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut dirty).unwrap();
    let inc = dir.path("inc.snap");
    save_incremental_with_vcpus(&mem, &base, &dirty, &inc, &states(2, 2)).unwrap();
    let chain = SnapshotReader::open_chain(&[&full, &inc]).unwrap();
    assert_eq!(chain.vcpus(), states(2, 2));
    assert_eq!(chain.parent().unwrap().vcpus(), states(3, 1));
    let mut page = [0u8; PAGE_SIZE];
    chain.read_page(GuestPhysAddr(5 * PAGE), &mut page).unwrap();
    assert_eq!(page[..64], [0x55; 64]);

    // One saved without: none, though its parent has some.
    mem.write(GuestPhysAddr(6 * PAGE), &[0x66; 8]).unwrap();
    mem.harvest_dirty(RegionSet::All, &mut dirty).unwrap();
    let bare = dir.path("bare.snap");
    save_incremental(&mem, &base, &dirty, &bare).unwrap();
    let bare = SnapshotReader::open(&bare)
        .unwrap()
        .with_parent(base)
        .unwrap();
    assert!(bare.vcpus().is_empty());
}

#[test]
fn a_file_without_vcpus_is_as_before() {
    let dir = TempDir::new("snap-vcpu-none");
    let mem = memory();
    let (a, b, c) = (dir.path("a"), dir.path("b"), dir.path("c"));
    let opts = SaveOptions { track_dirty: false };
    let sa = save(&mem, &a, &opts).unwrap();
    let sb = save_with_vcpus(&mem, &b, &opts, &[]).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(sa, sb);
    let bytes = std::fs::read(&a).unwrap();
    assert_eq!(bytes[10] & 2, 0, "no vCPU flag");
    assert_eq!(bytes[20..24], [0; 4], "no vCPU count");
    // With two vCPUs of registers only: the same memory, a new id, and
    // the sectioned part: its length, two entries of an 8-byte head and a
    // 504-byte record, the checksum.
    let sc = save_with_vcpus(&mem, &c, &opts, &registers_only(2, 3)).unwrap();
    assert_ne!(sc.id, sa.id);
    assert_eq!(sc.file_bytes, sa.file_bytes + 8 + 2 * (8 + 504) + 8);
    let with = std::fs::read(&c).unwrap();
    assert_eq!(with[10] & 6, 6, "vCPU flag and sectioned-part flag");
    assert_eq!(with[20..24], 2u32.to_le_bytes());
    let part_at = sa.file_bytes as usize;
    assert_eq!(
        with[part_at..part_at + 8],
        (8u64 + 2 * 512 + 8).to_le_bytes()
    );
    assert_eq!(
        SnapshotReader::open(&c).unwrap().vcpus(),
        registers_only(2, 3)
    );
}

/// Header flag and count disagreeing (checksum resealed, as a writer bug
/// or a crafted file would): refused, naming the count's offset. A reader
/// from before the part knew only flag bit 0 and refuses bit 1 the same way
/// (`Problem::Flags`).
#[test]
fn the_vcpu_flag_and_count_must_agree() {
    let dir = TempDir::new("snap-vcpu-flag");
    let mem = memory();
    let path = dir.path("s.snap");
    let opts = SaveOptions { track_dirty: false };
    save_with_vcpus(&mem, &path, &opts, &states(1, 4)).unwrap();
    let good = std::fs::read(&path).unwrap();
    let regions = u32::from_le_bytes(good[16..20].try_into().unwrap()) as usize;
    let hlen = 160 + 16 * regions;
    let reseal = |b: &mut Vec<u8>| {
        let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&b[..hlen], 0x5046_534e_4150_0001);
        b[hlen..hlen + 8].copy_from_slice(&sum.to_le_bytes());
    };
    let mut b = good.clone();
    b[10] &= !2;
    reseal(&mut b);
    std::fs::write(&path, &b).unwrap();
    match SnapshotReader::open(&path) {
        Err(SnapshotError::Malformed { at, problem }) => {
            assert_eq!(
                (at.part, at.offset, problem),
                (Part::Header, 20, Problem::VcpuFlag)
            );
        }
        other => panic!("want VcpuFlag, got {other:?}"),
    }
    // A flag this build does not know is refused, as an older build
    // refuses the vCPU flag (bits 3 and 4 are the VM and device-state
    // parts since: `tests/snapshot_machine.rs`).
    let mut b = good.clone();
    b[10] |= 32;
    reseal(&mut b);
    std::fs::write(&path, &b).unwrap();
    assert!(matches!(
        SnapshotReader::open(&path),
        Err(SnapshotError::Malformed {
            problem: Problem::Flags(38),
            ..
        })
    ));
    // The sectioned-part flag without the vCPU flag: refused at the flags.
    let mut b = good.clone();
    b[10] &= !2;
    b[20..24].fill(0);
    reseal(&mut b);
    std::fs::write(&path, &b).unwrap();
    match SnapshotReader::open(&path) {
        Err(SnapshotError::Malformed { at, problem }) => {
            assert_eq!(
                (at.part, at.offset, problem),
                (Part::Header, 10, Problem::VcpuFlag)
            );
        }
        other => panic!("want VcpuFlag, got {other:?}"),
    }
    // A reserved byte of a record set, the part's checksum resealed:
    // named by its offset.
    save_with_vcpus(&mem, &path, &opts, &registers_only(1, 4)).unwrap();
    let good = std::fs::read(&path).unwrap();
    let part_len = 8 + 8 + 504 + 8;
    let part_at = good.len() - part_len;
    let mut b = good.clone();
    let k = part_at + 16 + 200 + 23; // cs's zero byte
    b[k] = 9;
    let end = good.len() - 8;
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&b[part_at..end], 0x5046_534e_4150_0005);
    b[end..].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    match SnapshotReader::open(&path) {
        Err(SnapshotError::Malformed { at, problem }) => {
            assert_eq!(
                (at.part, at.offset, problem),
                (Part::Vcpus, k as u64, Problem::Reserved(9))
            );
        }
        other => panic!("want Reserved, got {other:?}"),
    }
}

#[cfg(all(feature = "kvm", target_arch = "x86_64"))]
mod on_kvm {
    use std::sync::Arc;

    use pagefold::{
        kvm::{Exit, Flow, KvmError, KvmVcpu, KvmVm},
        snapshot::{restore_into, save_with_vcpus, SaveOptions, SnapshotReader, VcpuState},
        GuestMemory, GuestPhysAddr,
    };
    use pagefold_tools::mini_vmm::guest;

    use super::TempDir;

    const DATA_PAGES: u64 = 1024;

    /// The VM, or why KVM is unusable here (`None` and a SKIP line).
    fn vm_or_skip(test: &str, mem: &Arc<GuestMemory>) -> Option<KvmVm> {
        if !std::path::Path::new("/dev/kvm").exists() {
            println!("SKIP {test}: /dev/kvm does not exist");
            return None;
        }
        match KvmVm::new(mem) {
            Ok(vm) => Some(vm),
            Err(e @ KvmError::Ioctl { op, .. })
                if op == "open /dev/kvm" || op == "KVM_CREATE_VM" =>
            {
                println!("SKIP {test}: /dev/kvm is not usable: {e}");
                None
            }
            Err(e) => panic!("creating the VM: {e}"),
        }
    }

    /// What a run saw.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Seen {
        rounds: u64,
        verified: Vec<u32>,
        halted: bool,
    }

    /// Runs the guest for `rounds` more rounds of writes; stops at the end
    /// of the last (`verify` false), or has it verify its memory and halt.
    fn drive(vcpu: &mut KvmVcpu, rounds: u64, verify: bool) -> Seen {
        let mut seen = Seen::default();
        vcpu.run(|exit| match exit {
            Exit::IoOut { port, data } => {
                let value = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
                match port {
                    guest::PORT_PROGRESS => {
                        seen.rounds += 1;
                        if seen.rounds == rounds && !verify {
                            return Flow::Stop;
                        }
                    }
                    guest::PORT_VERIFY => seen.verified.push(value),
                    guest::PORT_HALT => {
                        seen.halted = true;
                        return Flow::Stop;
                    }
                    _ => {}
                }
                Flow::Continue
            }
            Exit::IoIn { port, data } => {
                if port == guest::PORT_CONTROL {
                    let cmd = if verify && seen.rounds >= rounds {
                        guest::CONTROL_VERIFY_HALT
                    } else {
                        guest::CONTROL_RUN
                    };
                    let n = data.len().min(4);
                    data[..n].copy_from_slice(&cmd.to_le_bytes()[..n]);
                }
                Flow::Continue
            }
            Exit::Halt => Flow::Stop,
        })
        .unwrap();
        seen
    }

    /// The state less the time-stamp counter (MSR 0x10), which runs on
    /// between a load and a read back.
    fn without_tsc(mut s: VcpuState) -> VcpuState {
        s.msrs.retain(|&(i, _)| i != 0x10);
        s
    }

    fn image(mem: &GuestMemory) -> Vec<u8> {
        let mut out = Vec::new();
        for r in mem.regions() {
            let mut b = vec![0u8; r.size() as usize];
            mem.read(r.start(), &mut b).unwrap();
            out.extend(b);
        }
        out
    }

    /// A running guest saved with its vCPU.
    struct Saved {
        mem: Arc<GuestMemory>,
        vm: KvmVm,
        vcpu: KvmVcpu,
        state: VcpuState,
        path: std::path::PathBuf,
    }

    /// The writer guest (`guest::fill_and_write`) filled and run 10 rounds
    /// (memory and its running sum in R14 both changed), then saved with
    /// its vCPU into `dir`; `None` (and a SKIP line) where KVM is unusable.
    fn saved_guest(test: &str, dir: &TempDir) -> Option<Saved> {
        let prog = guest::Program {
            data_pages: DATA_PAGES,
            balloon_pages: 0,
            hot_pages: 64,
            window_shift: 2,
            writes_per_round: 4096,
        };
        let layout = [
            (GuestPhysAddr(0), guest::LOW_SIZE),
            (GuestPhysAddr(guest::DATA_GPA), DATA_PAGES * 4096),
        ];
        let mem = Arc::new(GuestMemory::new(&layout).unwrap());
        let cr3 = guest::build_page_tables(&mem, DATA_PAGES).unwrap();
        let code = guest::fill_and_write(&prog).unwrap();
        let mode = guest::load(&mem, &code, cr3, 0x5eed).unwrap();
        let vm = vm_or_skip(test, &mem)?;
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.setup_long_mode(&mode).unwrap();
        assert_eq!(drive(&mut vcpu, 10, false).rounds, 10);
        let state = vcpu.snapshot_state().unwrap();
        assert_ne!(state.regs.r14, 0, "the running sum is in R14");
        let path = dir.path("guest.snap");
        save_with_vcpus(
            &mem,
            &path,
            &SaveOptions { track_dirty: false },
            std::slice::from_ref(&state),
        )
        .unwrap();
        Some(Saved {
            mem,
            vm,
            vcpu,
            state,
            path,
        })
    }

    #[test]
    fn a_guest_snapshotted_with_its_vcpu_runs_on_in_a_fresh_vm() {
        let test = "a_guest_snapshotted_with_its_vcpu_runs_on_in_a_fresh_vm";
        let dir = TempDir::new("snap-vcpu-kvm");
        let Some(Saved {
            mem,
            vm: _vm,
            mut vcpu,
            state,
            path,
        }) = saved_guest(test, &dir)
        else {
            return;
        };

        // Restore into a fresh memory, VM and vCPU.
        let snap = SnapshotReader::open(&path).unwrap();
        assert_eq!(snap.vcpus(), std::slice::from_ref(&state));
        assert_eq!(state.missing(), ["local APIC"], "no in-kernel irqchip");
        let mem2 = Arc::new(GuestMemory::new(&snap.region_layout()).unwrap());
        restore_into(&snap, &mem2).unwrap();
        let vm2 = KvmVm::new(&mem2).unwrap();
        let mut v2 = vm2.create_vcpu(0).unwrap();
        v2.set_snapshot_state(&snap.vcpus()[0]).unwrap();
        assert_eq!(
            without_tsc(v2.snapshot_state().unwrap()),
            without_tsc(state)
        );

        // Both run 20 more rounds, verify and halt: the same outcome.
        let restored = drive(&mut v2, 20, true);
        let original = drive(&mut vcpu, 20, true);
        println!("{test}: restored {restored:?}, original {original:?}");
        assert_eq!(restored.verified, [1], "the restored guest's memory check");
        assert!(restored.halted);
        assert_eq!(restored, original);
        assert!(image(&mem2) == image(&mem), "memories differ after the run");
    }

    /// Runs the CPU-state program until `stop_port`; the value it wrote to
    /// `PORT_VERIFY` (if it did).
    fn run_to(vcpu: &mut KvmVcpu, stop_port: u16) -> Option<u32> {
        let mut verified = None;
        vcpu.run(|exit| match exit {
            Exit::IoOut { port, data } => {
                if port == guest::PORT_VERIFY {
                    verified = Some(u32::from_le_bytes(data.try_into().unwrap_or([0; 4])));
                }
                if port == stop_port {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            }
            Exit::IoIn { .. } => Flow::Continue,
            Exit::Halt => Flow::Stop,
        })
        .unwrap();
        verified
    }

    /// The state a guest keeps outside its general registers (SSE and x87
    /// registers, `MXCSR`, the time-stamp counter) and MSRs the VMM set
    /// survive a snapshot and a restore into a fresh VM: the guest's own
    /// checks pass there, its memory check too. Restored from the
    /// registers alone (what a file of an earlier build carried), the
    /// same guest finds its vector and x87 registers and `MXCSR` lost: the
    /// checks see the difference.
    #[test]
    fn sse_x87_mxcsr_tsc_and_msrs_survive_a_restore_into_a_fresh_vm() {
        let test = "sse_x87_mxcsr_tsc_and_msrs_survive_a_restore_into_a_fresh_vm";
        let pages = 1024;
        let layout = [
            (GuestPhysAddr(0), guest::LOW_SIZE),
            (GuestPhysAddr(guest::DATA_GPA), pages * 4096),
        ];
        let mem = Arc::new(GuestMemory::new(&layout).unwrap());
        let cr3 = guest::build_page_tables(&mem, pages).unwrap();
        let code = guest::cpu_state().unwrap();
        let mode = guest::load(&mem, &code, cr3, 0x5eed_0042).unwrap();
        let Some(vm) = vm_or_skip(test, &mem) else {
            return;
        };
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.setup_long_mode(&mode).unwrap();
        // MSRs a guest kernel sets once (SYSCALL and SYSENTER targets),
        // set here by the VMM (the guest runs in ring 3).
        let msrs = [
            (0xc000_0082, 0xffff_ffff_8123_4560u64), // LSTAR
            (0x176, 0xffff_ffff_8100_0040),          // SYSENTER_EIP
            (0xc000_0102, 0xffff_8880_0000_1000),    // KERNEL_GS_BASE
        ];
        let mut st = vcpu.state().unwrap();
        st.msrs = msrs.to_vec();
        vcpu.set_state(&st).unwrap();
        assert_eq!(run_to(&mut vcpu, guest::PORT_CPU_STATE_READY), None);
        let state = vcpu.snapshot_state().unwrap();
        println!(
            "{test}: XSAVE {} bytes, XCRs {:x?}, {} MSRs saved of {} listed, missing {:?}",
            state.xsave.len(),
            state.xcrs,
            state.msrs.len(),
            vcpu.saved_msrs().len(),
            state.missing()
        );
        assert!(state.xsave.len() >= 4096);
        for m in msrs {
            assert!(state.msrs.contains(&m), "MSR {:#x} saved", m.0);
        }
        let dir = TempDir::new("snap-vcpu-cpu");
        let path = dir.path("cpu.snap");
        save_with_vcpus(
            &mem,
            &path,
            &SaveOptions { track_dirty: false },
            std::slice::from_ref(&state),
        )
        .unwrap();
        let snap = SnapshotReader::open(&path).unwrap();
        assert_eq!(snap.vcpus(), std::slice::from_ref(&state));

        let restore = |s: &VcpuState| {
            let mem2 = Arc::new(GuestMemory::new(&snap.region_layout()).unwrap());
            restore_into(&snap, &mem2).unwrap();
            let vm2 = KvmVm::new(&mem2).unwrap();
            let mut v2 = vm2.create_vcpu(0).unwrap();
            v2.set_snapshot_state(s).unwrap();
            let back = v2.snapshot_state().unwrap();
            let verified = run_to(&mut v2, guest::PORT_HALT);
            (verified, back)
        };
        let (verified, back) = restore(&snap.vcpus()[0]);
        assert_eq!(
            verified,
            Some(guest::cpu_check::ALL),
            "the restored guest's checks (bits: TSC, XMM, x87, MXCSR, memory)"
        );
        for m in msrs {
            assert!(back.msrs.contains(&m), "MSR {:#x} restored", m.0);
        }
        assert_eq!(back.xsave, state.xsave, "XSAVE area loaded as saved");

        // The registers alone: the vector and x87 state is lost, the
        // guest sees it.
        let bare = VcpuState {
            regs: state.regs,
            sregs: state.sregs,
            debug: state.debug,
            ..VcpuState::default()
        };
        let (verified, _) = restore(&bare);
        let v = verified.unwrap();
        println!("{test}: registers only: checks {v:#07b}");
        assert_eq!(v & guest::cpu_check::MEMORY, guest::cpu_check::MEMORY);
        assert_eq!(
            v & (guest::cpu_check::XMM | guest::cpu_check::X87 | guest::cpu_check::MXCSR),
            0
        );
    }

    /// `KVM_CREATE_IRQCHIP` on the VM (before its vCPUs): an in-kernel
    /// local APIC per vCPU. `None` where KVM refuses (said, and skipped).
    fn with_irqchip(vm: &KvmVm) -> Option<()> {
        use std::os::fd::AsRawFd;
        /// `_IO(KVMIO, 0x60)`.
        const KVM_CREATE_IRQCHIP: u64 = 0xae60;
        // SAFETY: KVM_CREATE_IRQCHIP takes no argument and touches no
        // memory of ours; the fd is the VM's, open for the call.
        let r = unsafe { libc::ioctl(vm.vm_fd().as_raw_fd(), KVM_CREATE_IRQCHIP as _, 0) };
        (r == 0).then_some(())
    }

    /// With an in-kernel irqchip, the local APIC's state is saved (the
    /// `"local APIC"` section), loads into a fresh VM with one (read back
    /// the same), and is refused by name where the fresh VM has none
    /// (`KvmError::Unsupported`), which leaves that vCPU as it was.
    #[test]
    fn a_local_apic_state_restores_only_where_the_vm_has_an_irqchip() {
        let test = "a_local_apic_state_restores_only_where_the_vm_has_an_irqchip";
        let pages = 1024;
        let layout = [
            (GuestPhysAddr(0), guest::LOW_SIZE),
            (GuestPhysAddr(guest::DATA_GPA), pages * 4096),
        ];
        let mem = Arc::new(GuestMemory::new(&layout).unwrap());
        let cr3 = guest::build_page_tables(&mem, pages).unwrap();
        let code = guest::cpu_state().unwrap();
        let mode = guest::load(&mem, &code, cr3, 7).unwrap();
        let Some(vm) = vm_or_skip(test, &mem) else {
            return;
        };
        if with_irqchip(&vm).is_none() {
            println!(
                "SKIP {test}: KVM_CREATE_IRQCHIP refused: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.setup_long_mode(&mode).unwrap();
        assert_eq!(run_to(&mut vcpu, guest::PORT_CPU_STATE_READY), None);
        let state = vcpu.snapshot_state().unwrap();
        assert!(state.missing().is_empty(), "missing {:?}", state.missing());
        let lapic = state.lapic.as_ref().unwrap();
        // The APIC ID register (offset 0x20) of vCPU 0, and the version
        // register (0x30) KVM fills in.
        assert_eq!(lapic[0x20..0x24], [0; 4]);
        assert_ne!(lapic[0x30..0x34], [0; 4], "a local APIC's version");

        let mem2 = Arc::new(GuestMemory::new(&layout).unwrap());
        restore_into_mem(&mem, &mem2);
        let vm2 = KvmVm::new(&mem2).unwrap();
        with_irqchip(&vm2).unwrap();
        let mut v2 = vm2.create_vcpu(0).unwrap();
        v2.set_snapshot_state(&state).unwrap();
        let back = v2.snapshot_state().unwrap();
        assert_eq!(back.lapic, state.lapic, "the local APIC as saved");
        assert_eq!(
            run_to(&mut v2, guest::PORT_HALT),
            Some(guest::cpu_check::ALL)
        );

        // No irqchip there: refused by name, the vCPU untouched.
        let vm3 = KvmVm::new(&mem2).unwrap();
        let mut v3 = vm3.create_vcpu(0).unwrap();
        let before = v3.snapshot_state().unwrap();
        match v3.set_snapshot_state(&state) {
            Err(KvmError::Unsupported { part, needs }) => {
                println!("{test}: refused: {part}: {needs}");
                assert!(needs.contains("KVM_CREATE_IRQCHIP"));
            }
            other => panic!("want Unsupported, got {other:?}"),
        }
        assert_eq!(v3.snapshot_state().unwrap().regs, before.regs);
    }

    /// Copies `from`'s memory into `to` (same layout).
    fn restore_into_mem(from: &GuestMemory, to: &GuestMemory) {
        for r in from.regions() {
            let mut b = vec![0u8; r.size() as usize];
            from.read(r.start(), &mut b).unwrap();
            to.write(r.start(), &b).unwrap();
        }
    }

    /// The same guest, saved with its vCPU, restored three ways beside the
    /// original: two clones folded into one dedup domain (sharing frames
    /// from the start) and one lazily (its vCPU starts before a page is
    /// read; its touches fault through KVM into pagefold's handler). Each
    /// runs the same 20 rounds as the original, checks its whole memory
    /// and halts: the same outcome, the same bytes, and the folded clones'
    /// writes stay their own.
    #[test]
    fn a_guest_restored_folded_and_lazily_runs_on_and_checks_its_memory() {
        use pagefold::{
            snapshot::{
                restore_folded, restore_folded_lazy, restore_lazy, LazyFoldOptions, LazyOptions,
            },
            DedupHost, FrameStore, VmOptions,
        };
        let test = "a_guest_restored_folded_and_lazily_runs_on_and_checks_its_memory";
        let dir = TempDir::new("snap-vcpu-fold-lazy");
        let Some(Saved {
            mem,
            vm: _vm,
            mut vcpu,
            path,
            ..
        }) = saved_guest(test, &dir)
        else {
            return;
        };
        let original = drive(&mut vcpu, 20, true);
        assert_eq!(original.verified, [1]);
        let want = image(&mem);
        let snap = Arc::new(SnapshotReader::open(&path).unwrap());

        // Two folded clones in one domain.
        let store = Arc::new(FrameStore::memfd().unwrap());
        let host = DedupHost::new(Arc::clone(&store)).unwrap();
        let clones: Vec<_> = (0..2)
            .map(|_| restore_folded(&host, VmOptions::default(), &snap).unwrap())
            .collect();
        assert!(
            clones.iter().all(|c| c.stats.shared_pages > 0),
            "the clones share no frame"
        );
        for c in &clones {
            let vm = KvmVm::new(&c.memory).unwrap();
            let mut v = vm.create_vcpu(0).unwrap();
            v.set_snapshot_state(&snap.vcpus()[0]).unwrap();
            let seen = drive(&mut v, 20, true);
            assert_eq!(seen, original, "a folded clone's run");
            assert!(image(&c.memory) == want, "a folded clone's memory");
        }
        // The clones wrote copies of their own: the shared frames still
        // hold the snapshot's bytes (a third clone reads them).
        let third = restore_folded(&host, VmOptions::default(), &snap).unwrap();
        let mut fresh = GuestMemory::new(&snap.region_layout()).unwrap();
        restore_into(&snap, &fresh).unwrap();
        assert!(
            image(&third.memory) == image(&fresh),
            "the shared frames changed"
        );
        assert!(image(&fresh) != want, "the 20 rounds wrote nothing");
        drop(clones);
        drop(third);

        // A lazy restore: the vCPU runs at once.
        fresh = GuestMemory::new(&snap.region_layout()).unwrap();
        let lazy_mem = Arc::new(fresh);
        // The fetch holds after its first page until the guest has run,
        // so the guest's touches are served on fault.
        let gate = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let g = Arc::clone(&gate);
        let opts = LazyOptions {
            on_fetch: Some(Arc::new(move |_| {
                while !g.load(std::sync::atomic::Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })),
            ..LazyOptions::default()
        };
        let lazy = restore_lazy(Arc::clone(&snap), &lazy_mem, opts).unwrap();
        let vm = KvmVm::new(&lazy_mem).unwrap();
        let mut v = vm.create_vcpu(0).unwrap();
        v.set_snapshot_state(&snap.vcpus()[0]).unwrap();
        let seen = drive(&mut v, 20, true);
        assert_eq!(seen, original, "the lazily restored guest's run");
        gate.store(true, std::sync::atomic::Ordering::Release);
        let stats = lazy.wait().unwrap();
        println!("{test}: lazy {stats:?}");
        assert!(
            stats.on_fault > 0,
            "the guest's touches were served on fault"
        );
        assert!(image(&lazy_mem) == want, "the lazily restored memory");
        drop(vm);

        // Two clones restored lazily and folded on arrival into one
        // domain: each vCPU runs before a page is read, their touches
        // fill one image both map, each verifies its whole memory, and
        // the image holds the snapshot's bytes once, untouched by their
        // writes.
        let (store, host) = {
            let store = Arc::new(FrameStore::memfd().unwrap());
            let host = DedupHost::new(Arc::clone(&store)).unwrap();
            (store, host)
        };
        gate.store(false, std::sync::atomic::Ordering::Release);
        let arriving: Vec<_> = (0..2)
            .map(|_| {
                let g = Arc::clone(&gate);
                let opts = LazyFoldOptions {
                    lazy: LazyOptions {
                        on_fetch: Some(Arc::new(move |_| {
                            while !g.load(std::sync::atomic::Ordering::Acquire) {
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                        })),
                        ..LazyOptions::default()
                    },
                    ..LazyFoldOptions::default()
                };
                restore_folded_lazy(&host, VmOptions::default(), Arc::clone(&snap), opts).unwrap()
            })
            .collect();
        for c in &arriving {
            let vm = KvmVm::new(&c.memory).unwrap();
            let mut v = vm.create_vcpu(0).unwrap();
            v.set_snapshot_state(&snap.vcpus()[0]).unwrap();
            let seen = drive(&mut v, 20, true);
            assert_eq!(seen, original, "a clone restored folded on arrival");
            assert!(image(&c.memory) == want, "its memory");
        }
        gate.store(true, std::sync::atomic::Ordering::Release);
        let mut with_content = 0;
        for c in arriving {
            let memory = Arc::clone(&c.memory);
            let stats = c.wait().unwrap();
            println!("{test}: folded on arrival {stats:?}");
            assert!(image(&memory) == want, "its memory after arrival");
            with_content = stats.pages - stats.zero_pages;
        }
        // The host's frames hold the image's pages with content once for
        // both clones; their writes are their own (the kernel's copies),
        // and their zero pages hold nothing.
        assert_eq!(store.allocated_bytes().unwrap() / 4096, with_content);
        let third = restore_folded(&host, VmOptions::default(), &snap).unwrap();
        assert!(
            image(&third.memory) == image(&fresh_copy(&snap)),
            "the image changed"
        );
    }

    fn fresh_copy(snap: &SnapshotReader) -> GuestMemory {
        let mem = GuestMemory::new(&snap.region_layout()).unwrap();
        restore_into(snap, &mem).unwrap();
        mem
    }
}
