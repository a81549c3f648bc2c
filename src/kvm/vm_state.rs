//! The VM-wide state KVM keeps outside the vCPUs, read and loaded for a
//! snapshot (`KvmVm::vm_state`, `KvmVm::set_vm_state`): the guest's
//! kvmclock (`KVM_GET_CLOCK`/`KVM_SET_CLOCK`), the in-kernel irqchip's
//! two PICs and IOAPIC (`KVM_GET_IRQCHIP`/`KVM_SET_IRQCHIP`) and the
//! in-kernel PIT (`KVM_GET_PIT2`/`KVM_SET_PIT2`), as pagefold's
//! [`VmState`] (named fields, no kernel bytes in the API). The ioctls go
//! through the raw VM fd (`sys.rs`), so an adopted VM works the same.

use std::os::fd::BorrowedFd;

use kvm_bindings::{kvm_clock_data, kvm_pit_channel_state, kvm_pit_state2};

use super::{error::KvmError, sys};
use crate::snapshot::{
    ClockState, IoapicState, IrqchipState, PicState, PitChannel, PitState, VmState, CLOCK_REALTIME,
    IOAPIC_PINS,
};

/// How [`KvmVm::set_vm_state_with`](super::KvmVm::set_vm_state_with)
/// sets the guest's kvmclock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClockRestore {
    /// The guest's clock goes on from the value saved: the time the VM
    /// spent stopped (or the snapshot spent on disk) does not pass for
    /// the guest. `KVM_SET_CLOCK` with no flag (what every KVM takes;
    /// the `KVM_CLOCK_TSC_STABLE` KVM reports is not loaded back, as KVM
    /// before 5.16 refuses any flag). What a snapshot restore wants.
    #[default]
    Continue,
    /// The guest's clock goes on from the value saved plus the host's
    /// `CLOCK_REALTIME` elapsed since it was read (`KVM_CLOCK_REALTIME`,
    /// KVM 5.16 on, where the saving host's clocksource was the TSC): for
    /// a live migration, whose guest expects wall time to have passed.
    /// KVM never steps the clock backwards. A saved clock without a
    /// realtime reading is refused ([`KvmError::Unsupported`]).
    AdvanceByRealtime,
}

/// The chip ids of `KVM_GET_IRQCHIP`.
const PIC_MASTER: u32 = 0;
const PIC_SLAVE: u32 = 1;
const IOAPIC: u32 = 2;

/// The VM-wide state of VM `vm` ([`KvmVm::vm_state`](super::KvmVm::vm_state)).
pub(super) fn read(vm: BorrowedFd<'_>) -> Result<VmState, KvmError> {
    let irqchip = match sys::get_irqchip(vm, PIC_MASTER) {
        Ok(master) => Some(IrqchipState {
            pic_master: pic_from(&master),
            pic_slave: pic_from(&sys::get_irqchip(vm, PIC_SLAVE)?),
            ioapic: ioapic_from(&sys::get_irqchip(vm, IOAPIC)?),
        }),
        Err(e) if is_enxio(&e) => None,
        Err(e) => return Err(e),
    };
    let pit = match sys::get_pit2(vm) {
        Ok(p) => Some(pit_from(&p)),
        Err(e) if is_enxio(&e) => None,
        Err(e) => return Err(e),
    };
    let c = sys::get_clock(vm)?;
    Ok(VmState {
        clock: Some(ClockState {
            clock: c.clock,
            flags: c.flags,
            realtime: c.realtime,
            host_tsc: c.host_tsc,
        }),
        irqchip,
        pit,
    })
}

/// Loads `state` into VM `vm`
/// ([`KvmVm::set_vm_state_with`](super::KvmVm::set_vm_state_with)):
/// checks first, the previous state loaded back if KVM refuses a part.
pub(super) fn load(
    vm: BorrowedFd<'_>,
    state: &VmState,
    clock: ClockRestore,
) -> Result<(), KvmError> {
    if state.irqchip.is_some() {
        if let Err(e) = sys::get_irqchip(vm, PIC_MASTER) {
            return Err(if is_enxio(&e) {
                KvmError::Unsupported {
                    part: "an irqchip state",
                    needs: "an in-kernel irqchip (KVM_CREATE_IRQCHIP) before the vCPUs",
                }
            } else {
                e
            });
        }
    }
    if state.pit.is_some() {
        if let Err(e) = sys::get_pit2(vm) {
            return Err(if is_enxio(&e) {
                KvmError::Unsupported {
                    part: "a PIT state",
                    needs: "an in-kernel PIT (KVM_CREATE_PIT2)",
                }
            } else {
                e
            });
        }
    }
    if clock == ClockRestore::AdvanceByRealtime
        && state.clock.is_some_and(|c| c.flags & CLOCK_REALTIME == 0)
    {
        return Err(KvmError::Unsupported {
            part: "a clock without a realtime reading",
            needs: "KVM_CLOCK_REALTIME in the saved clock (a source host on a TSC clocksource)",
        });
    }
    let before = read(vm)?;
    load_parts(vm, state, clock).inspect_err(|_| {
        let _ = load_parts(vm, &before, ClockRestore::Continue);
    })
}

fn load_parts(vm: BorrowedFd<'_>, state: &VmState, clock: ClockRestore) -> Result<(), KvmError> {
    if let Some(i) = &state.irqchip {
        sys::set_irqchip(vm, PIC_MASTER, pic_bytes(&i.pic_master))?;
        sys::set_irqchip(vm, PIC_SLAVE, pic_bytes(&i.pic_slave))?;
        sys::set_irqchip(vm, IOAPIC, ioapic_bytes(&i.ioapic))?;
    }
    if let Some(p) = &state.pit {
        sys::set_pit2(vm, &pit_to(p))?;
    }
    if let Some(c) = &state.clock {
        let mut data = kvm_clock_data {
            clock: c.clock,
            ..Default::default()
        };
        if clock == ClockRestore::AdvanceByRealtime {
            data.flags = CLOCK_REALTIME;
            data.realtime = c.realtime;
        }
        sys::set_clock(vm, &data)?;
    }
    Ok(())
}

/// Whether `e` is KVM's `ENXIO`: the VM has no such in-kernel device.
fn is_enxio(e: &KvmError) -> bool {
    matches!(e, KvmError::Ioctl { source, .. } if source.raw_os_error() == Some(libc::ENXIO))
}

fn pic_from(b: &[u8; 512]) -> PicState {
    PicState {
        last_irr: b[0],
        irr: b[1],
        imr: b[2],
        isr: b[3],
        priority_add: b[4],
        irq_base: b[5],
        read_reg_select: b[6],
        poll: b[7],
        special_mask: b[8],
        init_state: b[9],
        auto_eoi: b[10],
        rotate_on_auto_eoi: b[11],
        special_fully_nested_mode: b[12],
        init4: b[13],
        elcr: b[14],
        elcr_mask: b[15],
    }
}

fn pic_bytes(p: &PicState) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..16].copy_from_slice(&[
        p.last_irr,
        p.irr,
        p.imr,
        p.isr,
        p.priority_add,
        p.irq_base,
        p.read_reg_select,
        p.poll,
        p.special_mask,
        p.init_state,
        p.auto_eoi,
        p.rotate_on_auto_eoi,
        p.special_fully_nested_mode,
        p.init4,
        p.elcr,
        p.elcr_mask,
    ]);
    b
}

/// `struct kvm_ioapic_state` (x86-64 layout, this host's byte order):
/// `base_address` u64 at 0, `ioregsel` u32 at 8, `id` at 12, `irr` at 16,
/// a pad at 20, the redirection entries (u64 each) from 24.
fn ioapic_from(b: &[u8; 512]) -> IoapicState {
    let u32_at = |k: usize| u32::from_ne_bytes([b[k], b[k + 1], b[k + 2], b[k + 3]]);
    let u64_at = |k: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[k..k + 8]);
        u64::from_ne_bytes(a)
    };
    IoapicState {
        base_address: u64_at(0),
        ioregsel: u32_at(8),
        id: u32_at(12),
        irr: u32_at(16),
        redirection: std::array::from_fn(|p| u64_at(24 + p * 8)),
    }
}

fn ioapic_bytes(s: &IoapicState) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(&s.base_address.to_ne_bytes());
    b[8..12].copy_from_slice(&s.ioregsel.to_ne_bytes());
    b[12..16].copy_from_slice(&s.id.to_ne_bytes());
    b[16..20].copy_from_slice(&s.irr.to_ne_bytes());
    for (p, e) in s.redirection.iter().enumerate().take(IOAPIC_PINS) {
        b[24 + p * 8..32 + p * 8].copy_from_slice(&e.to_ne_bytes());
    }
    b
}

fn pit_from(p: &kvm_pit_state2) -> PitState {
    PitState {
        channels: p.channels.map(|c| PitChannel {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        }),
        flags: p.flags,
    }
}

fn pit_to(p: &PitState) -> kvm_pit_state2 {
    kvm_pit_state2 {
        channels: p.channels.map(|c| kvm_pit_channel_state {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        }),
        flags: p.flags,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chip_bytes_round_trip() {
        let pic = PicState {
            imr: 0xa5,
            irq_base: 0x20,
            elcr_mask: 0xf8,
            init4: 1,
            ..PicState::default()
        };
        assert_eq!(pic_from(&pic_bytes(&pic)), pic);
        let io = IoapicState {
            base_address: 0xfec0_0000,
            ioregsel: 3,
            id: 1,
            irr: 0x10,
            redirection: std::array::from_fn(|p| 0x1_0000 | p as u64),
        };
        assert_eq!(ioapic_from(&ioapic_bytes(&io)), io);
    }
}
