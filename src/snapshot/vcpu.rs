//! The vCPU states a snapshot may carry: plain data (no KVM feature
//! needed), one fixed 504-byte little-endian record per vCPU, and the
//! part's encoding (records, then their xxh3-64).
//!
//! # Record layout (504 bytes, little-endian)
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 18 × u64 | `rax rbx rcx rdx rsi rdi rsp rbp r8`-`r15 rip rflags` |
//! | 144 | 7 × u64 | `cr0 cr2 cr3 cr4 cr8 efer apic_base` |
//! | 200 | 8 × 24 | segments `cs ds es fs gs ss tr ldt`: base u64, limit u32, selector u16, then one byte each: type, present, dpl, db, s, l, g, avl, unusable, and one zero byte |
//! | 392 | 2 × 16 | `gdt idt`: base u64, limit u16, 6 zero bytes |
//! | 424 | 4 × u64 | the pending-interrupt bitmap |
//! | 456 | 6 × u64 | `dr0`-`dr3 dr6 dr7` |
//!
//! The part is the records in vCPU order, then the xxh3-64 of the records
//! (8 bytes); the header counts the records.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes of one vCPU's record.
pub(crate) const VCPU_LEN: usize = 504;
/// Bytes of the part's checksum after the records.
pub(crate) const VCPU_SUM_LEN: usize = 8;
/// Seed of the part's checksum.
const SEED: u64 = 0x5046_534e_4150_0004;

/// A vCPU's general registers, `RIP` and `RFLAGS` (as
/// the kernel's `struct kvm_regs`; `pagefold::kvm::Regs` is this type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the registers' architectural names
pub struct GeneralRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl GeneralRegs {
    fn fields(&self) -> [u64; 18] {
        [
            self.rax,
            self.rbx,
            self.rcx,
            self.rdx,
            self.rsi,
            self.rdi,
            self.rsp,
            self.rbp,
            self.r8,
            self.r9,
            self.r10,
            self.r11,
            self.r12,
            self.r13,
            self.r14,
            self.r15,
            self.rip,
            self.rflags,
        ]
    }

    fn from_fields(f: [u64; 18]) -> Self {
        let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] =
            f;
        GeneralRegs {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rsp,
            rbp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip,
            rflags,
        }
    }
}

/// A segment register with its hidden part (the kernel's `kvm_segment`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the descriptor's architectural fields
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

/// A descriptor-table register (`GDTR`, `IDTR`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit (bytes less one).
    pub limit: u16,
}

/// A vCPU's control, segment and descriptor-table registers (the kernel's
/// `kvm_sregs`; the control registers as `pagefold::kvm::ControlRegs`
/// carries them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the registers' architectural names
pub struct SpecialRegs {
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    /// Pending external interrupts, one bit per vector.
    pub interrupt_bitmap: [u64; 4],
}

/// A vCPU's debug registers (as `pagefold::kvm::DebugRegs` carries them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugRegisters {
    /// `DR0`-`DR3`.
    pub db: [u64; 4],
    /// `DR6`.
    pub dr6: u64,
    /// `DR7`.
    pub dr7: u64,
}

/// One vCPU's state as a snapshot carries it: general, control/segment and
/// debug registers. Not carried: the `XSAVE` area, `XCR0`, MSRs, pending
/// events and the run state (the KVM layer's own `VcpuState` byte form
/// has them, for migration); a restore keeps the new vCPU's values there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// General registers, `RIP`, `RFLAGS`.
    pub regs: GeneralRegs,
    /// Control, segment and descriptor-table registers.
    pub sregs: SpecialRegs,
    /// Debug registers.
    pub debug: DebugRegisters,
}

const SEGMENTS_AT: usize = 200;
const SEGMENT_LEN: usize = 24;
const TABLES_AT: usize = 392;
const BITMAP_AT: usize = 424;
const DEBUG_AT: usize = 456;

impl VcpuState {
    fn segments(&self) -> [Segment; 8] {
        let s = &self.sregs;
        [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt]
    }

    /// The record (module doc's layout).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        for v in self.regs.fields() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let s = &self.sregs;
        for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for g in self.segments() {
            out.extend_from_slice(&g.base.to_le_bytes());
            out.extend_from_slice(&g.limit.to_le_bytes());
            out.extend_from_slice(&g.selector.to_le_bytes());
            out.extend_from_slice(&[
                g.type_, g.present, g.dpl, g.db, g.s, g.l, g.g, g.avl, g.unusable, 0,
            ]);
        }
        for t in [s.gdt, s.idt] {
            out.extend_from_slice(&t.base.to_le_bytes());
            out.extend_from_slice(&t.limit.to_le_bytes());
            out.extend_from_slice(&[0; 6]);
        }
        for v in s.interrupt_bitmap {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let d = &self.debug;
        for v in [d.db[0], d.db[1], d.db[2], d.db[3], d.dr6, d.dr7] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        debug_assert_eq!(out.len() - start, VCPU_LEN);
    }

    /// Decodes a record; `Err(k)` names a reserved byte at `k` that is not
    /// zero.
    pub(crate) fn decode(b: &[u8; VCPU_LEN]) -> Result<Self, usize> {
        let u64_at = |k: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[k..k + 8]);
            u64::from_le_bytes(a)
        };
        let mut gen = [0u64; 18];
        for (i, v) in gen.iter_mut().enumerate() {
            *v = u64_at(i * 8);
        }
        let ctl: [u64; 7] = std::array::from_fn(|i| u64_at(144 + i * 8));
        let mut segs = [Segment::default(); 8];
        for (i, g) in segs.iter_mut().enumerate() {
            let k = SEGMENTS_AT + i * SEGMENT_LEN;
            let r = &b[k..k + SEGMENT_LEN];
            if r[23] != 0 {
                return Err(k + 23);
            }
            *g = Segment {
                base: u64_at(k),
                limit: u32::from_le_bytes([r[8], r[9], r[10], r[11]]),
                selector: u16::from_le_bytes([r[12], r[13]]),
                type_: r[14],
                present: r[15],
                dpl: r[16],
                db: r[17],
                s: r[18],
                l: r[19],
                g: r[20],
                avl: r[21],
                unusable: r[22],
            };
        }
        let mut tables = [DescriptorTable::default(); 2];
        for (i, t) in tables.iter_mut().enumerate() {
            let k = TABLES_AT + i * 16;
            if let Some(z) = (k + 10..k + 16).find(|&z| b[z] != 0) {
                return Err(z);
            }
            *t = DescriptorTable {
                base: u64_at(k),
                limit: u16::from_le_bytes([b[k + 8], b[k + 9]]),
            };
        }
        let [cs, ds, es, fs, gs, ss, tr, ldt] = segs;
        let [gdt, idt] = tables;
        let [cr0, cr2, cr3, cr4, cr8, efer, apic_base] = ctl;
        Ok(VcpuState {
            regs: GeneralRegs::from_fields(gen),
            sregs: SpecialRegs {
                cr0,
                cr2,
                cr3,
                cr4,
                cr8,
                efer,
                apic_base,
                cs,
                ds,
                es,
                fs,
                gs,
                ss,
                tr,
                ldt,
                gdt,
                idt,
                interrupt_bitmap: std::array::from_fn(|i| u64_at(BITMAP_AT + i * 8)),
            },
            debug: DebugRegisters {
                db: std::array::from_fn(|i| u64_at(DEBUG_AT + i * 8)),
                dr6: u64_at(DEBUG_AT + 32),
                dr7: u64_at(DEBUG_AT + 40),
            },
        })
    }
}

/// The part's bytes for `states`: the records, then their checksum; empty
/// for no vCPU.
pub(crate) fn encode_part(states: &[VcpuState]) -> Vec<u8> {
    if states.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(states.len() * VCPU_LEN + VCPU_SUM_LEN);
    for s in states {
        s.encode(&mut out);
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The part's checksum of `records`.
pub(crate) fn checksum(records: &[u8]) -> u64 {
    xxh3_64_with_seed(records, SEED)
}

/// Bytes of the part for `count` vCPUs, `None` on overflow.
pub(crate) fn part_len(count: u64) -> Option<u64> {
    if count == 0 {
        return Some(0);
    }
    count
        .checked_mul(VCPU_LEN as u64)?
        .checked_add(VCPU_SUM_LEN as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reserved_bytes_are_checked() {
        let mut s = VcpuState::default();
        s.regs.rip = 0x40_1000;
        s.regs.rflags = 0x3202;
        s.sregs.cr3 = 0x9000;
        s.sregs.ldt.unusable = 1;
        s.sregs.idt.limit = 0xfff;
        s.sregs.interrupt_bitmap[3] = 1 << 63;
        s.debug.dr7 = 0x400;
        let mut b = Vec::new();
        s.encode(&mut b);
        let arr: [u8; VCPU_LEN] = b.as_slice().try_into().unwrap_or([0; VCPU_LEN]);
        assert_eq!(VcpuState::decode(&arr), Ok(s));
        for k in (0..8)
            .map(|i| SEGMENTS_AT + i * SEGMENT_LEN + 23)
            .chain((0..2).flat_map(|i| TABLES_AT + i * 16 + 10..TABLES_AT + i * 16 + 16))
        {
            let mut bad = arr;
            bad[k] = 1;
            assert_eq!(VcpuState::decode(&bad), Err(k));
        }
    }
}
