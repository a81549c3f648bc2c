//! The whole machine in a snapshot: the VM-wide KVM state (kvmclock,
//! in-kernel irqchip and PIT) and the VMM's opaque device state saved
//! beside the memory and the vCPUs (`save_machine`), full and incremental
//! (each snapshot carries its own), read back field for field; device
//! state over the limit refused before a page is read; files without the
//! new parts unchanged. And on KVM: a guest that programs its PIC and PIT
//! through port I/O, with IOAPIC redirection entries and the clock set,
//! saved with its vCPU and VM state and restored into a fresh VM, finds
//! there (reading the chips through port I/O itself) what it programmed,
//! the clock going on from the value saved; a VM without the chips refuses
//! their state by name. Skips the KVM tests, saying so, where `/dev/kvm`
//! is absent or unusable.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use pagefold::{
    snapshot::{
        save_incremental_machine, save_machine, save_with_vcpus, ClockState, IoapicState,
        IrqchipState, MachineState, Part, PicState, PitChannel, PitState, Problem, SaveOptions,
        SnapshotError, SnapshotReader, VcpuState, VmState, MAX_DEVICE_STATE,
    },
    GuestMemory, GuestPhysAddr, RegionSet, PAGE_SIZE,
};

mod common;
use common::temp_dir::TempDir;

const PAGE: u64 = PAGE_SIZE as u64;

fn memory() -> GuestMemory {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 8 * PAGE)]).unwrap();
    mem.write(GuestPhysAddr(PAGE), b"machine").unwrap();
    mem
}

/// A VM state with every part and distinct values throughout.
fn vm_state(seed: u64) -> VmState {
    VmState {
        clock: Some(ClockState {
            clock: 1_000_000_000 * seed + 17,
            flags: 6,
            realtime: 1_765_000_000_000_000_000 + seed,
            host_tsc: 0x1234_5678_9abc + seed,
        }),
        irqchip: Some(IrqchipState {
            pic_master: PicState {
                irr: 1,
                imr: 0xa5 ^ seed as u8,
                isr: 2,
                irq_base: 0x20,
                init4: 1,
                elcr: 0x08,
                elcr_mask: 0xf8,
                ..PicState::default()
            },
            pic_slave: PicState {
                imr: 0x5a,
                irq_base: 0x28,
                auto_eoi: 1,
                elcr_mask: 0xde,
                ..PicState::default()
            },
            ioapic: IoapicState {
                base_address: 0xfec0_0000,
                ioregsel: 0x12,
                id: seed as u32,
                irr: 0x100,
                redirection: std::array::from_fn(|p| (seed << 56) | 0x1_0000 | (0x40 + p as u64)),
            },
        }),
        pit: Some(PitState {
            channels: std::array::from_fn(|c| PitChannel {
                count: 0x1_0000 - c as u32 - seed as u32,
                latched_count: 7,
                rw_mode: 3,
                mode: 2,
                gate: u8::from(c != 2),
                count_load_time: 123_456 + c as i64,
                ..PitChannel::default()
            }),
            flags: 1,
        }),
    }
}

fn vcpus() -> Vec<VcpuState> {
    (0..2u64)
        .map(|i| {
            let mut s = VcpuState::default();
            s.regs.rip = 0x40_0000 + i;
            s.mp_state = Some(0);
            s.tsc_khz = Some(2_000_000);
            s
        })
        .collect()
}

fn flags(path: &std::path::Path) -> u16 {
    let b = std::fs::read(path).unwrap();
    u16::from_le_bytes([b[10], b[11]])
}

/// The VM state and device state read back as saved, with the vCPUs,
/// full and incremental (each its own), and with any part left out.
#[test]
fn vm_and_device_state_round_trip_full_and_incremental() {
    let dir = TempDir::new("snap-machine");
    let mem = memory();
    let states = vcpus();
    let vm = vm_state(1);
    let dev: Vec<u8> = (0..100_000u32).map(|k| (k * 7 + 3) as u8).collect();
    let full = dir.path("full.snap");
    save_machine(
        &mem,
        &full,
        &SaveOptions::default(),
        &MachineState {
            vcpus: &states,
            vm: Some(&vm),
            device_state: Some(&dev),
        },
    )
    .unwrap();
    assert_eq!(flags(&full), 2 | 4 | 8 | 16, "vCPU, sectioned, VM, device");
    let r = SnapshotReader::open(&full).unwrap();
    assert_eq!(r.vcpus(), states);
    assert_eq!(r.vm_state(), Some(&vm));
    assert_eq!(r.device_state(), Some(&dev[..]));

    // Incremental: its own parts, none taken from the parent.
    mem.write(GuestPhysAddr(2 * PAGE), b"later").unwrap();
    let mut dirty = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut dirty).unwrap();
    let vm2 = vm_state(2);
    let inc = dir.path("inc.snap");
    save_incremental_machine(
        &mem,
        &r,
        &dirty,
        &inc,
        &MachineState {
            vcpus: &[],
            vm: Some(&vm2),
            device_state: Some(b"serial: 3 bytes queued"),
        },
    )
    .unwrap();
    let chain = SnapshotReader::open_chain(&[&full, &inc]).unwrap();
    assert!(chain.vcpus().is_empty());
    assert_eq!(chain.vm_state(), Some(&vm2));
    assert_eq!(chain.device_state(), Some(&b"serial: 3 bytes queued"[..]));
    assert_eq!(chain.parent().unwrap().device_state(), Some(&dev[..]));
    let mut page = [0u8; PAGE_SIZE];
    chain.read_page(GuestPhysAddr(2 * PAGE), &mut page).unwrap();
    assert_eq!(&page[..5], b"later");

    // Each part alone, and an empty device state (saved, read as empty).
    let opts = SaveOptions { track_dirty: false };
    let partial = VmState {
        irqchip: None,
        ..vm_state(3)
    };
    for (i, m) in [
        MachineState {
            vm: Some(&partial),
            ..MachineState::default()
        },
        MachineState {
            device_state: Some(&[]),
            ..MachineState::default()
        },
        MachineState {
            vcpus: &states,
            device_state: Some(&dev[..10]),
            ..MachineState::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path(&format!("part{i}.snap"));
        save_machine(&mem, &p, &opts, &m).unwrap();
        let r = SnapshotReader::open(&p).unwrap();
        assert_eq!(r.vcpus(), m.vcpus, "case {i}");
        assert_eq!(r.vm_state(), m.vm, "case {i}");
        assert_eq!(r.device_state(), m.device_state, "case {i}");
    }

    // A file with vCPUs only has neither new part nor flag: what builds
    // before these parts wrote and read.
    let old = dir.path("vcpus.snap");
    save_with_vcpus(&mem, &old, &opts, &states).unwrap();
    assert_eq!(flags(&old), 2 | 4);
    let r = SnapshotReader::open(&old).unwrap();
    assert_eq!((r.vm_state(), r.device_state()), (None, None));
}

/// Device state over `MAX_DEVICE_STATE` is refused by name before a page
/// is read; nothing is left at the destination.
#[test]
fn device_state_over_the_limit_is_refused_before_the_save() {
    let dir = TempDir::new("snap-machine-limit");
    let mem = memory();
    let big = vec![1u8; MAX_DEVICE_STATE as usize + 1];
    let path = dir.path("big.snap");
    match save_machine(
        &mem,
        &path,
        &SaveOptions { track_dirty: false },
        &MachineState {
            device_state: Some(&big),
            ..MachineState::default()
        },
    ) {
        Err(SnapshotError::Malformed { at, problem }) => assert_eq!(
            (at.part, problem),
            (
                Part::DeviceState,
                Problem::TooLarge {
                    len: MAX_DEVICE_STATE + 1,
                    max: MAX_DEVICE_STATE
                }
            )
        ),
        other => panic!("want TooLarge, got {other:?}"),
    }
    assert!(!path.exists());
}

/// A vCPU part over a MiB (read with its checksum streamed first, every
/// whole MiB checked not to be zeros) of states that are nearly all zero
/// bytes (the longest runs of zeros a writer makes: a 64 KiB `XSAVE` area,
/// 4096 MSRs of index and value 0) reads back as saved, with the VM and
/// device parts after it (the device state all zeros, over a MiB too).
#[test]
fn large_parts_of_zeros_read_back() {
    let dir = TempDir::new("snap-machine-large");
    let states: Vec<VcpuState> = (0..20)
        .map(|i| VcpuState {
            xsave: vec![0; 64 * 1024],
            msrs: vec![(0, 0); 4096],
            mp_state: Some(i),
            ..VcpuState::default()
        })
        .collect();
    let vm = VmState::default();
    let dev = vec![0u8; 3 << 20];
    let path = dir.path("large.snap");
    save_machine(
        &memory(),
        &path,
        &SaveOptions { track_dirty: false },
        &MachineState {
            vcpus: &states,
            vm: Some(&vm),
            device_state: Some(&dev),
        },
    )
    .unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() > 5 << 20);
    let r = SnapshotReader::open(&path).unwrap();
    assert_eq!(r.vcpus(), states);
    assert_eq!(r.vm_state(), Some(&vm));
    assert_eq!(r.device_state(), Some(&dev[..]));
}

#[cfg(all(feature = "kvm", target_arch = "x86_64"))]
mod on_kvm {
    use std::{os::fd::AsRawFd, sync::Arc};

    use pagefold::{
        kvm::{ClockRestore, Exit, Flow, KvmError, KvmVcpu, KvmVm},
        snapshot::{
            save_machine, MachineState, SaveOptions, SnapshotReader, VmState, CLOCK_REALTIME,
        },
        GuestMemory, GuestPhysAddr,
    };
    use pagefold_tools::mini_vmm::guest;

    use super::TempDir;

    /// Ports the test guest reports on.
    const PORT_STOP: u16 = 0x1f;
    const PORT_MASTER_IMR: u16 = 0x30;
    const PORT_SLAVE_IMR: u16 = 0x31;
    const PORT_PIT_STATUS: u16 = 0x32;
    /// What the guest programs: the PICs' interrupt masks, the PIT's
    /// channel 0 in mode 2 (rate generator), lobyte/hibyte access, binary,
    /// with this count.
    const MASTER_IMR: u8 = 0xa5;
    const SLAVE_IMR: u8 = 0x5a;
    const PIT_COUNT: u16 = 0xfff0;
    /// Channel 0's read-back status without its output bit: access mode 3
    /// (bits 4-5), mode 2 (bits 1-3), binary.
    const PIT_STATUS: u8 = (3 << 4) | (2 << 1);

    /// Ring-3 code with `IOPL` 3 (the mini VMM's user mode): programs the
    /// chips, stops (the snapshot is taken there), then reads them back
    /// through port I/O, reports each, and stops again.
    fn program() -> Vec<u8> {
        let [lo, hi] = PIT_COUNT.to_le_bytes();
        let mut c = vec![
            0xb0, MASTER_IMR, 0xe6, 0x21, // mov al, imr; out 0x21, al (OCW1)
            0xb0, SLAVE_IMR, 0xe6, 0xa1, // out 0xa1
            0xb0, 0x34, 0xe6, 0x43, // PIT: channel 0, lo/hi, mode 2, binary
            0xb0, lo, 0xe6, 0x40, // count, low byte
            0xb0, hi, 0xe6, 0x40, // count, high byte
            0xe6, 0x1f, // out PORT_STOP: snapshot here
        ];
        c.extend_from_slice(&[
            0xe4, 0x21, 0xe6, 0x30, // in al, 0x21; out PORT_MASTER_IMR
            0xe4, 0xa1, 0xe6, 0x31, // in al, 0xa1; out PORT_SLAVE_IMR
            0xb0, 0xe2, 0xe6, 0x43, // read-back: status of channel 0
            0xe4, 0x40, 0xe6, 0x32, // in al, 0x40; out PORT_PIT_STATUS
            0xe6, 0x1f, // out PORT_STOP
            0xeb, 0xfe, // jmp $
        ]);
        c
    }

    fn layout() -> [(GuestPhysAddr, u64); 2] {
        [
            (GuestPhysAddr(0), guest::LOW_SIZE),
            (GuestPhysAddr(guest::DATA_GPA), 16 * 4096),
        ]
    }

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

    /// `KVM_CREATE_IRQCHIP` then `KVM_CREATE_PIT2` on the VM (before its
    /// vCPUs), as a VMM with in-kernel chips makes them; the error where
    /// KVM refuses.
    fn with_chips(vm: &KvmVm) -> Result<(), std::io::Error> {
        /// `_IO(KVMIO, 0x60)`.
        const KVM_CREATE_IRQCHIP: u64 = 0xae60;
        /// `_IOW(KVMIO, 0x77, struct kvm_pit_config)` (64 bytes).
        const KVM_CREATE_PIT2: u64 = 0x4040_ae77;
        let fd = vm.vm_fd().as_raw_fd();
        // SAFETY: KVM_CREATE_IRQCHIP takes no argument and touches no
        // memory of ours; the fd is the VM's, open for the call.
        if unsafe { libc::ioctl(fd, KVM_CREATE_IRQCHIP as _, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // `struct kvm_pit_config`: flags u32 (0: no speaker dummy), 15
        // reserved u32.
        let config = [0u32; 16];
        // SAFETY: KVM_CREATE_PIT2 reads the 64-byte config, live for the
        // call.
        if unsafe { libc::ioctl(fd, KVM_CREATE_PIT2 as _, config.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// A VM over a fresh copy of the guest's memory, with the chips (or
    /// without), and its vCPU 0.
    fn machine(test: &str, code: &[u8], chips: bool) -> Option<(Arc<GuestMemory>, KvmVm, KvmVcpu)> {
        let mem = Arc::new(GuestMemory::new(&layout()).unwrap());
        let cr3 = guest::build_page_tables(&mem, 16).unwrap();
        let mode = guest::load(&mem, code, cr3, 1).unwrap();
        let vm = vm_or_skip(test, &mem)?;
        if chips {
            if let Err(e) = with_chips(&vm) {
                println!("SKIP {test}: KVM refused the in-kernel irqchip or PIT: {e}");
                return None;
            }
        }
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.setup_long_mode(&mode).unwrap();
        Some((mem, vm, vcpu))
    }

    /// Runs to the next `OUT` to `PORT_STOP`; returns the reports
    /// (port, byte) on the way.
    fn run_to_stop(vcpu: &mut KvmVcpu) -> Vec<(u16, u8)> {
        let mut seen = Vec::new();
        vcpu.run(|exit| match exit {
            Exit::IoOut {
                port: PORT_STOP, ..
            } => Flow::Stop,
            Exit::IoOut { port, data } => {
                seen.push((port, data[0]));
                Flow::Continue
            }
            other => panic!("unexpected exit {other:?}"),
        })
        .unwrap();
        seen
    }

    /// The guest programs its PIC and PIT; the host sets IOAPIC
    /// redirection entries and moves the clock to 1000 s; all saved with
    /// the vCPU (`save_machine`) and restored into a fresh VM with the
    /// chips: its VM state reads back as saved (the PIT's load time aside,
    /// which KVM sets to the load; the clock not before the saved value and
    /// not past it by more than the test's run), and the guest, run on
    /// there, reads its PIC masks and PIT mode back through port I/O. The
    /// same vCPU state in a fresh VM without the VM state reads KVM's
    /// reset values: the test tells them apart.
    #[test]
    fn irqchip_pit_and_clock_restore_into_a_fresh_vm() {
        let test = "irqchip_pit_and_clock_restore_into_a_fresh_vm";
        let code = program();
        let Some((mem, vm, mut vcpu)) = machine(test, &code, true) else {
            return;
        };
        assert_eq!(run_to_stop(&mut vcpu), []);
        let mut state = vm.vm_state().unwrap();
        let chip = state.irqchip.expect("a VM with KVM_CREATE_IRQCHIP has one");
        assert_eq!(chip.pic_master.imr, MASTER_IMR, "the guest's OCW1");
        assert_eq!(chip.pic_slave.imr, SLAVE_IMR);
        let pit = state.pit.expect("a VM with KVM_CREATE_PIT2 has one");
        assert_eq!(
            (pit.channels[0].mode, pit.channels[0].rw_mode),
            (2, 3),
            "the guest's PIT command"
        );
        assert_eq!(pit.channels[0].count, u32::from(PIT_COUNT));
        let clock = state.clock.unwrap();
        println!(
            "{test}: source clock {} ns, flags {:#x}",
            clock.clock, clock.flags
        );
        // Host-side: redirection entries (masked: no interrupt meanwhile)
        // and the clock moved far from a fresh VM's.
        let mut io = chip.ioapic;
        for (p, e) in io.redirection.iter_mut().enumerate() {
            *e = (1 << 16) | (0x30 + p as u64) | ((p as u64 % 4) << 56);
        }
        state.irqchip = Some(pagefold::snapshot::IrqchipState { ioapic: io, ..chip });
        state.clock = Some(pagefold::snapshot::ClockState {
            clock: 1_000_000_000_000,
            ..clock
        });
        vm.set_vm_state(&state).unwrap();
        let saved_vm = vm.vm_state().unwrap();
        assert_eq!(saved_vm.irqchip.unwrap().ioapic.redirection, io.redirection);
        let saved_clock = saved_vm.clock.unwrap().clock;
        assert!(saved_clock >= 1_000_000_000_000, "clock {saved_clock}");
        let saved_vcpu = vcpu.snapshot_state().unwrap();

        let dir = TempDir::new("snap-machine-kvm");
        let path = dir.path("m.snap");
        save_machine(
            &mem,
            &path,
            &SaveOptions { track_dirty: false },
            &MachineState {
                vcpus: std::slice::from_ref(&saved_vcpu),
                vm: Some(&saved_vm),
                device_state: Some(b"no devices"),
            },
        )
        .unwrap();
        drop((vcpu, vm));
        let r = SnapshotReader::open(&path).unwrap();
        let read_vm = *r.vm_state().unwrap();
        assert_eq!(read_vm, saved_vm, "the file's VM state");

        // A fresh VM: memory restored, chips created, VM state, vCPU.
        let Some((mem2, vm2, mut v2)) = machine(test, &code, true) else {
            return;
        };
        pagefold::snapshot::restore_into(&r, &mem2).unwrap();
        vm2.set_vm_state(&read_vm).unwrap();
        v2.set_snapshot_state(&r.vcpus()[0]).unwrap();
        let back = vm2.vm_state().unwrap();
        assert_eq!(back.irqchip, read_vm.irqchip, "PICs and IOAPIC as saved");
        let (pb, ps) = (back.pit.unwrap(), read_vm.pit.unwrap());
        for c in 0..3 {
            let (mut b, s) = (pb.channels[c], ps.channels[c]);
            b.count_load_time = s.count_load_time;
            assert_eq!(b, s, "PIT channel {c}");
        }
        assert_eq!(pb.flags, ps.flags);
        let now = back.clock.unwrap().clock;
        assert!(
            now >= saved_clock && now - saved_clock < 600_000_000_000,
            "restored clock {now}, saved {saved_clock}"
        );
        // The guest reads its chips there.
        let seen = run_to_stop(&mut v2);
        let get = |port| seen.iter().find(|&&(p, _)| p == port).map(|&(_, v)| v);
        assert_eq!(get(PORT_MASTER_IMR), Some(MASTER_IMR), "{seen:x?}");
        assert_eq!(get(PORT_SLAVE_IMR), Some(SLAVE_IMR), "{seen:x?}");
        assert_eq!(
            get(PORT_PIT_STATUS).map(|s| s & 0x3f),
            Some(PIT_STATUS),
            "{seen:x?}"
        );
        // The guest's clock goes on from there: never before the saved
        // value.
        assert!(vm2.vm_state().unwrap().clock.unwrap().clock >= now);

        // Without the VM state the same vCPU state finds KVM's reset
        // chips and a clock near zero.
        let Some((mem3, vm3, mut v3)) = machine(test, &code, true) else {
            return;
        };
        pagefold::snapshot::restore_into(&r, &mem3).unwrap();
        v3.set_snapshot_state(&r.vcpus()[0]).unwrap();
        assert!(vm3.vm_state().unwrap().clock.unwrap().clock < saved_clock);
        let seen = run_to_stop(&mut v3);
        assert!(
            seen.contains(&(PORT_MASTER_IMR, 0)),
            "a fresh PIC masks nothing: {seen:x?}"
        );
    }

    /// A VM without the in-kernel chips reports none, and refuses a state
    /// with them by name, loading nothing (its clock untouched); a clock
    /// alone loads. `ClockRestore::AdvanceByRealtime` advances the clock by
    /// the host time since the reading where KVM gave one, and is refused
    /// by name where it did not.
    #[test]
    fn chips_refused_where_the_vm_has_none_and_the_clock_modes() {
        let test = "chips_refused_where_the_vm_has_none_and_the_clock_modes";
        let code = program();
        let Some((_mem, vm, _vcpu)) = machine(test, &code, false) else {
            return;
        };
        let own = vm.vm_state().unwrap();
        assert_eq!((own.irqchip, own.pit), (None, None), "no chips made");
        let full = super::vm_state(1);
        let before = own.clock.unwrap().clock;
        match vm.set_vm_state(&full) {
            Err(KvmError::Unsupported { part, needs }) => {
                println!("{test}: refused: {part}: {needs}");
                assert!(needs.contains("KVM_CREATE_IRQCHIP"), "{needs}");
            }
            other => panic!("want Unsupported, got {other:?}"),
        }
        let pit_only = VmState {
            irqchip: None,
            clock: None,
            ..full
        };
        assert!(matches!(
            vm.set_vm_state(&pit_only),
            Err(KvmError::Unsupported { needs, .. }) if needs.contains("KVM_CREATE_PIT2")
        ));
        let after = vm.vm_state().unwrap().clock.unwrap().clock;
        assert!(after < full.clock.unwrap().clock, "nothing loaded: {after}");
        assert!(after >= before);

        // The clock alone: continues from the value given.
        let mut clock = own.clock.unwrap();
        clock.clock = 5_000_000_000_000;
        let only_clock = VmState {
            clock: Some(clock),
            ..VmState::default()
        };
        vm.set_vm_state(&only_clock).unwrap();
        let now = vm.vm_state().unwrap().clock.unwrap();
        assert!(now.clock >= clock.clock && now.clock - clock.clock < 600_000_000_000);

        // Advanced by the host's realtime since the reading: 100 s back.
        if now.flags & CLOCK_REALTIME == 0 {
            let res = vm.set_vm_state_with(
                &VmState {
                    clock: Some(now),
                    ..VmState::default()
                },
                ClockRestore::AdvanceByRealtime,
            );
            assert!(matches!(res, Err(KvmError::Unsupported { .. })), "{res:?}");
            println!(
                "{test}: KVM gives no realtime reading here (flags {:#x}): refusal checked",
                now.flags
            );
            return;
        }
        let mut earlier = now;
        earlier.realtime -= 100_000_000_000;
        vm.set_vm_state_with(
            &VmState {
                clock: Some(earlier),
                ..VmState::default()
            },
            ClockRestore::AdvanceByRealtime,
        )
        .unwrap();
        let advanced = vm.vm_state().unwrap().clock.unwrap().clock;
        assert!(
            advanced >= now.clock + 100_000_000_000,
            "advanced {advanced}, read {}",
            now.clock
        );
    }
}
