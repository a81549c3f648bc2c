//! Review of the vCPU state snapshots carry (`KvmVcpu::snapshot_state`,
//! `set_snapshot_state`): what a guest restored into a fresh VM finds, and
//! what a state from a hostile file can load. Skips, saying so, where
//! `/dev/kvm` is absent or unusable.

#![allow(clippy::unwrap_used)]

#[cfg(all(feature = "kvm", target_arch = "x86_64"))]
mod on_kvm {
    use std::sync::Arc;

    use pagefold::{
        kvm::{KvmError, KvmVcpu, KvmVm},
        snapshot::VcpuState,
        GuestMemory, GuestPhysAddr,
    };
    use pagefold_tools::mini_vmm::guest;

    /// `IA32_TSC_DEADLINE`.
    const TSC_DEADLINE: u32 = 0x6e0;
    /// The local APIC's timer LVT register (offset in `kvm_lapic_state`).
    const LVTT: usize = 0x320;
    /// LVTT: TSC-deadline mode, masked, vector 0xec.
    const LVTT_DEADLINE: u32 = (0b10 << 17) | (1 << 16) | 0xec;

    fn layout() -> [(GuestPhysAddr, u64); 2] {
        [
            (GuestPhysAddr(0), guest::LOW_SIZE),
            (GuestPhysAddr(guest::DATA_GPA), 64 * 4096),
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

    /// `KVM_CREATE_IRQCHIP` on the VM (before its vCPUs).
    fn with_irqchip(vm: &KvmVm) -> bool {
        use std::os::fd::AsRawFd;
        /// `_IO(KVMIO, 0x60)`.
        const KVM_CREATE_IRQCHIP: u64 = 0xae60;
        // SAFETY: KVM_CREATE_IRQCHIP takes no argument and touches no
        // memory of ours; the fd is the VM's, open for the call.
        let r = unsafe { libc::ioctl(vm.vm_fd().as_raw_fd(), KVM_CREATE_IRQCHIP as _, 0) };
        r == 0
    }

    /// A VM with an in-kernel irqchip and one vCPU in long mode, or `None`
    /// (SKIP said).
    fn vcpu_with_irqchip(test: &str) -> Option<(KvmVm, KvmVcpu)> {
        let mem = Arc::new(GuestMemory::new(&layout()).unwrap());
        let cr3 = guest::build_page_tables(&mem, 64).unwrap();
        let code = guest::cpu_state().unwrap();
        let mode = guest::load(&mem, &code, cr3, 7).unwrap();
        let vm = vm_or_skip(test, &mem)?;
        if !with_irqchip(&vm) {
            println!(
                "SKIP {test}: KVM_CREATE_IRQCHIP refused: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.setup_long_mode(&mode).unwrap();
        Some((vm, vcpu))
    }

    fn msr(s: &VcpuState, index: u32) -> Option<u64> {
        s.msrs.iter().find(|&&(i, _)| i == index).map(|&(_, v)| v)
    }

    fn set_msr(s: &mut VcpuState, index: u32, value: u64) {
        match s.msrs.iter_mut().find(|(i, _)| *i == index) {
            Some(e) => e.1 = value,
            None => s.msrs.push((index, value)),
        }
    }

    /// A guest with its local APIC timer armed in TSC-deadline mode,
    /// snapshotted and restored into a fresh VM, finds its deadline armed
    /// there. KVM ignores `IA32_TSC_DEADLINE` while the APIC timer is not
    /// in TSC-deadline mode, and `KVM_SET_LAPIC` switching it into that
    /// mode clears the deadline: the MSR must load after the local APIC.
    #[test]
    fn a_tsc_deadline_timer_survives_a_restore() {
        let test = "a_tsc_deadline_timer_survives_a_restore";
        let Some((_vm, mut vcpu)) = vcpu_with_irqchip(test) else {
            return;
        };
        if !vcpu.saved_msrs().contains(&TSC_DEADLINE) {
            println!("SKIP {test}: KVM does not list IA32_TSC_DEADLINE");
            return;
        }
        // The guest arms its timer: LVTT in TSC-deadline mode first, then
        // the deadline (far ahead: it must not fire meanwhile).
        let mut s = vcpu.snapshot_state().unwrap();
        let lapic = s.lapic.as_mut().unwrap();
        lapic[LVTT..LVTT + 4].copy_from_slice(&LVTT_DEADLINE.to_le_bytes());
        vcpu.set_snapshot_state(&s).unwrap();
        let mut s = vcpu.snapshot_state().unwrap();
        let deadline = msr(&s, 0x10).unwrap() + (1 << 50);
        set_msr(&mut s, TSC_DEADLINE, deadline);
        vcpu.set_snapshot_state(&s).unwrap();
        let saved = vcpu.snapshot_state().unwrap();
        assert_eq!(
            msr(&saved, TSC_DEADLINE),
            Some(deadline),
            "the deadline armed on the source"
        );

        let Some((_vm2, mut v2)) = vcpu_with_irqchip(test) else {
            return;
        };
        v2.set_snapshot_state(&saved).unwrap();
        let back = v2.snapshot_state().unwrap();
        let l = back.lapic.as_ref().unwrap();
        assert_eq!(
            u32::from_le_bytes(l[LVTT..LVTT + 4].try_into().unwrap()),
            LVTT_DEADLINE
        );
        assert_eq!(
            msr(&back, TSC_DEADLINE),
            Some(deadline),
            "the restored guest's TSC deadline"
        );
    }

    /// A VM without irqchip and one vCPU in long mode, or `None` (SKIP
    /// said).
    fn plain_vcpu(test: &str) -> Option<(KvmVm, KvmVcpu)> {
        let mem = Arc::new(GuestMemory::new(&layout()).unwrap());
        let cr3 = guest::build_page_tables(&mem, 64).unwrap();
        let code = guest::cpu_state().unwrap();
        let mode = guest::load(&mem, &code, cr3, 7).unwrap();
        let vm = vm_or_skip(test, &mem)?;
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.setup_long_mode(&mode).unwrap();
        Some((vm, vcpu))
    }

    /// The state less the time-stamp counter (MSR 0x10), which runs on.
    fn without_tsc(mut s: VcpuState) -> VcpuState {
        s.msrs.retain(|&(i, _)| i != 0x10);
        s
    }

    /// A file's state may name only MSRs the vCPU saves (`saved_msrs`):
    /// one outside (here `IA32_MC0_STATUS`, which KVM takes from the VMM
    /// with any value but the guest may only clear: a machine check the
    /// guest never had) is refused by index before anything loads, the
    /// vCPU untouched. Such an MSR no `snapshot_state` writes, and the
    /// put-back after a later refusal would not undo it.
    #[test]
    fn an_msr_outside_the_saved_list_is_refused() {
        let test = "an_msr_outside_the_saved_list_is_refused";
        let Some((_vm, mut vcpu)) = plain_vcpu(test) else {
            return;
        };
        const MC0_STATUS: u32 = 0x401;
        assert!(!vcpu.saved_msrs().contains(&MC0_STATUS));
        let before = vcpu.snapshot_state().unwrap();
        let mut s = before.clone();
        s.regs.rax = 0x1234_5678;
        s.msrs.push((MC0_STATUS, 0xb200_0000_0000_0005));
        match vcpu.set_snapshot_state(&s) {
            Err(KvmError::MsrRefused { index }) => assert_eq!(index, MC0_STATUS),
            other => panic!("want MsrRefused(0x401), got {other:?}"),
        }
        let after = vcpu.snapshot_state().unwrap();
        assert_eq!(after.regs, before.regs, "the vCPU untouched");
    }

    /// A state KVM refuses part-way (a non-canonical `KERNEL_GS_BASE`, after the
    /// registers, `XSAVE` area and local APIC loaded) leaves the vCPU as
    /// it was: registers, XSAVE, local APIC, MSRs, events, run state.
    #[test]
    fn a_refused_state_leaves_the_vcpu_as_it_was() {
        let test = "a_refused_state_leaves_the_vcpu_as_it_was";
        let Some((_vm, mut vcpu)) = vcpu_with_irqchip(test) else {
            return;
        };
        let before = vcpu.snapshot_state().unwrap();
        let mut s = before.clone();
        s.regs.rip ^= 0x1000;
        s.sregs.cr3 ^= 0x1000;
        s.xsave[24] ^= 0x40; // MXCSR's flush-to-zero bit
        let l = s.lapic.as_mut().unwrap();
        l[0x80] = 0x40; // TPR
        let lstar = 0xc000_0082;
        set_msr(&mut s, lstar, 0xffff_ffff_8100_0000);
        set_msr(&mut s, 0xc000_0102, 1 << 63); // KERNEL_GS_BASE: not canonical
        s.mp_state = Some(3);
        match vcpu.set_snapshot_state(&s) {
            Err(KvmError::MsrRefused { index }) => assert_eq!(index, 0xc000_0102),
            other => panic!("want MsrRefused(0xc0000102), got {other:?}"),
        }
        let after = vcpu.snapshot_state().unwrap();
        assert_eq!(without_tsc(after), without_tsc(before));
    }

    /// `KVM_GET_TSC_KHZ` (`_IO(KVMIO, 0xa3)`) of a vCPU.
    fn tsc_khz(vcpu: &KvmVcpu) -> u32 {
        use std::os::fd::AsRawFd;
        // SAFETY: KVM_GET_TSC_KHZ takes no argument and touches no memory
        // of ours; the fd is the vCPU's, open for the call.
        let r = unsafe { libc::ioctl(vcpu.vcpu_fd().as_raw_fd(), 0xaea3 as _, 0) };
        u32::try_from(r).unwrap()
    }

    /// `KVM_SET_TSC_KHZ` (`_IO(KVMIO, 0xa2)`) of a vCPU: whether KVM took it.
    fn set_tsc_khz(vcpu: &KvmVcpu, khz: u32) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: KVM_SET_TSC_KHZ takes its argument by value and touches
        // no memory of ours; the fd is the vCPU's, open for the call.
        let r = unsafe {
            libc::ioctl(
                vcpu.vcpu_fd().as_raw_fd(),
                0xaea2 as _,
                khz as libc::c_ulong,
            )
        };
        r == 0
    }

    /// A guest whose TSC runs at a rate other than the new host's (set by
    /// the VMM with `KVM_SET_TSC_KHZ`, as after a migration from a host of
    /// another TSC frequency) finds that rate after a restore: its TSC
    /// calibration (and the kvmclock it derives) stay right. Firecracker
    /// saves `tsc_khz` with its vCPU state for this.
    #[test]
    fn the_guest_tsc_rate_survives_a_restore() {
        let test = "the_guest_tsc_rate_survives_a_restore";
        let Some((_vm, vcpu)) = plain_vcpu(test) else {
            return;
        };
        let host = tsc_khz(&vcpu);
        // Faster than the host's: KVM takes it with TSC scaling, or
        // without (catching the guest's TSC up on each entry).
        let khz = host + host / 2;
        if !set_tsc_khz(&vcpu, khz) {
            println!(
                "SKIP {test}: KVM_SET_TSC_KHZ {khz} refused: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        assert_eq!(tsc_khz(&vcpu), khz);
        let saved = vcpu.snapshot_state().unwrap();
        let Some((_vm2, mut v2)) = plain_vcpu(test) else {
            return;
        };
        assert_eq!(tsc_khz(&v2), host);
        v2.set_snapshot_state(&saved).unwrap();
        assert_eq!(tsc_khz(&v2), khz, "the restored guest's TSC rate");
    }

    /// The same for a migration's vCPU state (`VcpuState::from_bytes` of
    /// a peer's bytes, loaded with `set_state`): only `MIGRATED_MSRS`.
    #[test]
    fn a_migration_state_with_an_msr_outside_its_list_is_refused() {
        let test = "a_migration_state_with_an_msr_outside_its_list_is_refused";
        let Some((_vm, mut vcpu)) = plain_vcpu(test) else {
            return;
        };
        const MC0_STATUS: u32 = 0x401;
        let before = vcpu.state().unwrap();
        let mut s = before.clone();
        s.regs.rax = 0x1234_5678;
        s.msrs.push((MC0_STATUS, 0xb200_0000_0000_0005));
        let s = pagefold::kvm::VcpuState::from_bytes(&s.to_bytes()).unwrap();
        match vcpu.set_state(&s) {
            Err(KvmError::MsrRefused { index }) => assert_eq!(index, MC0_STATUS),
            other => panic!("want MsrRefused(0x401), got {other:?}"),
        }
        assert_eq!(
            vcpu.state().unwrap().regs,
            before.regs,
            "the vCPU untouched"
        );
    }

    /// Taking a vCPU's state does not change it, and gives what it is: an
    /// application processor with a SIPI pending (`KVM_MP_STATE_SIPI_RECEIVED`
    /// loaded) has it accepted by `KVM_GET_MP_STATE` (`CS:IP` set from the
    /// vector, runnable). Read after the registers, the saved state had
    /// the registers from before the SIPI and the run state after it: the
    /// SIPI lost, the AP restored to run from its reset `RIP`.
    #[test]
    fn taking_the_state_of_an_ap_with_a_pending_sipi_is_consistent() {
        let test = "taking_the_state_of_an_ap_with_a_pending_sipi_is_consistent";
        let Some((vm, _bsp)) = vcpu_with_irqchip(test) else {
            return;
        };
        let mut ap = vm.create_vcpu(1).unwrap();
        let mut s = ap.snapshot_state().unwrap();
        let ev = s.events.as_mut().unwrap();
        // struct kvm_vcpu_events: sipi_vector at 16, flags at 20;
        // KVM_VCPUEVENT_VALID_SIPI_VECTOR is 2.
        ev[16..20].copy_from_slice(&0x12u32.to_le_bytes());
        let flags = u32::from_le_bytes(ev[20..24].try_into().unwrap()) | 2;
        ev[20..24].copy_from_slice(&flags.to_le_bytes());
        s.mp_state = Some(4); // KVM_MP_STATE_SIPI_RECEIVED
        ap.set_snapshot_state(&s).unwrap();
        let first = ap.snapshot_state().unwrap();
        let second = ap.snapshot_state().unwrap();
        println!(
            "{test}: first CS base {:#x} RIP {:#x} run state {:?}; second CS base {:#x} RIP {:#x}",
            first.sregs.cs.base,
            first.regs.rip,
            first.mp_state,
            second.sregs.cs.base,
            second.regs.rip
        );
        assert_eq!(second.sregs.cs.base, 0x12000, "the SIPI delivered");
        assert_eq!(
            first.regs, second.regs,
            "the saved registers are the vCPU's"
        );
        assert_eq!(
            first.sregs, second.sregs,
            "the saved segments are the vCPU's"
        );
        assert_eq!(first.mp_state, second.mp_state);
    }
}
