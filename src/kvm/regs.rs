//! pagefold's own x86-64 register sets (general, control, debug), so the
//! public API carries no kvm-bindings struct and a VMM linking another
//! kvm-bindings version still builds; the conversions to and from the
//! kernel's structures stay inside this module.

use kvm_bindings::{kvm_debugregs, kvm_regs, kvm_sregs};

/// A vCPU's general registers, `RIP` and `RFLAGS` (the kernel's
/// `struct kvm_regs`, field for field and in its order): the snapshot
/// format's type, so a vCPU's registers go into a snapshot as they are.
pub use crate::snapshot::GeneralRegs as Regs;

/// A vCPU's control registers and `EFER` (what a page-table walk needs:
/// `CR0.PG`/`WP`, `CR3`, `CR4.PAE`/`LA57`, `EFER.LMA`/`NXE`). Read-only
/// view: segments and descriptor tables travel in [`VcpuState`]'s byte
/// form.
///
/// [`VcpuState`]: super::VcpuState
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlRegs {
    /// `CR0`.
    pub cr0: u64,
    /// `CR2` (the last page-fault address).
    pub cr2: u64,
    /// `CR3` (the page-table root).
    pub cr3: u64,
    /// `CR4`.
    pub cr4: u64,
    /// `CR8` (task priority).
    pub cr8: u64,
    /// `IA32_EFER`.
    pub efer: u64,
    /// `IA32_APIC_BASE`.
    pub apic_base: u64,
}

/// A vCPU's debug registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugRegs {
    /// `DR0`-`DR3` (breakpoint addresses).
    pub db: [u64; 4],
    /// `DR6` (status).
    pub dr6: u64,
    /// `DR7` (control).
    pub dr7: u64,
}

/// [`Regs`] from the kernel's structure.
pub(super) fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// The kernel's structure from [`Regs`].
pub(super) fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// [`ControlRegs`] of the kernel's special registers.
pub(super) fn control_from_kvm(s: &kvm_sregs) -> ControlRegs {
    ControlRegs {
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// [`DebugRegs`] from the kernel's structure.
pub(super) fn debug_from_kvm(d: &kvm_debugregs) -> DebugRegs {
    DebugRegs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_round_trip_field_for_field() {
        let mut r = Regs::default();
        // Distinct values, so a swapped pair of fields shows.
        for (i, f) in [
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
        ]
        .into_iter()
        .enumerate()
        {
            *f = 0x1000 + i as u64;
        }
        let k = regs_to_kvm(&r);
        assert_eq!(
            (k.rax, k.r15, k.rip, k.rflags),
            (0x1000, 0x100f, 0x1010, 0x1011)
        );
        assert_eq!(regs_from_kvm(&k), r);
    }
}
