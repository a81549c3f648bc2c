//! The vCPU states a snapshot may carry: plain data (no KVM feature
//! needed) and the part's encoding. Two encodings, told apart by header
//! flag bit 2:
//!
//! - sectioned (written since; flag bits 1 and 2): every vCPU's registers
//!   and the state KVM keeps beside them, each in its own sized section;
//! - fixed (read only, files of earlier builds; flag bit 1 alone): one
//!   504-byte register record per vCPU. Their states read back with no
//!   `XSAVE` area, `XCR`s, MSRs, local APIC, events or run state.
//!
//! # Sectioned part (all integers little-endian)
//!
//! | bytes | field |
//! |---|---|
//! | u64 | the part's length `L` in bytes, this field and the checksum included; bounded by the file's size before anything is read |
//! | per vCPU: u32, u32 | the entry's length `n` (the bytes after these 8), zero |
//! | 504 | the register record (below) |
//! | sections to `n` | each: tag u16, zero u16, length u32, then that many bytes; tags strictly increasing, each at most once |
//! | u64 | xxh3-64 (seed `..._0005`) of the part's first `L - 8` bytes |
//!
//! Sections: 1 the `XSAVE` area (at least 4096 bytes, a multiple of 4,
//! `KVM_GET_XSAVE2`'s layout), 2 `XCR`s (16 bytes each: number u32, zero
//! u32, value u64; at most 16), 3 MSRs (16 bytes each: index u32, zero u32,
//! value u64), 4 the local APIC (`struct kvm_lapic_state`, 1024 bytes), 5
//! pending events (`struct kvm_vcpu_events`, 64 bytes), 6 the run state
//! (u32, zero u32), 7 the guest's TSC rate (`KVM_GET_TSC_KHZ`: kHz u32,
//! zero u32). A section not there was not saved; a tag this build
//! does not know is refused (a newer writer's state is never half-loaded).
//!
//! # Register record (504 bytes)
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
//! The fixed part is the records in vCPU order, then the xxh3-64 (seed
//! `..._0004`) of the records; the header counts the records.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::error::{Part, Place, Problem, SnapshotError};

/// Bytes of one vCPU's record.
pub(crate) const VCPU_LEN: usize = 504;
/// Bytes of the part's checksum after the records.
pub(crate) const VCPU_SUM_LEN: usize = 8;
/// Seed of the fixed part's checksum.
const SEED: u64 = 0x5046_534e_4150_0004;
/// Seed of the sectioned part's checksum.
pub(crate) const SECTIONED_SEED: u64 = 0x5046_534e_4150_0005;
/// Bytes of the sectioned part around its entries: the length field and
/// the checksum.
pub(crate) const SECTIONED_MIN: u64 = 16;

/// Section tags of the sectioned part.
const TAG_XSAVE: u16 = 1;
const TAG_XCRS: u16 = 2;
const TAG_MSRS: u16 = 3;
const TAG_LAPIC: u16 = 4;
const TAG_EVENTS: u16 = 5;
const TAG_MP_STATE: u16 = 6;
const TAG_TSC_KHZ: u16 = 7;

/// A section's name for messages.
fn tag_name(tag: u16) -> &'static str {
    match tag {
        TAG_XSAVE => "XSAVE area",
        TAG_XCRS => "XCRs",
        TAG_MSRS => "MSRs",
        TAG_LAPIC => "local APIC",
        TAG_EVENTS => "vCPU events",
        TAG_MP_STATE => "MP state",
        TAG_TSC_KHZ => "TSC frequency",
        _ => "unknown section",
    }
}

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

/// One vCPU's state as a snapshot carries it: the registers (general,
/// control/segment, debug) and the state a guest needs to continue on
/// another host: the `XSAVE` area (x87, SSE, AVX, ...), the extended
/// control registers (`XCR0`), the model-specific registers KVM saves, the
/// in-kernel local APIC, pending events and the run state.
///
/// An empty or `None` part was not saved: a file written before the part
/// existed (format without vCPU sections), or a vCPU without it (no
/// in-kernel local APIC: the VM has no `KVM_CREATE_IRQCHIP`). A restore
/// ([`KvmVcpu::set_snapshot_state`]) then keeps the new vCPU's own value
/// there; [`missing`](Self::missing) names what a state lacks.
///
/// [`KvmVcpu::set_snapshot_state`]: ../kvm/struct.KvmVcpu.html#method.set_snapshot_state
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// General registers, `RIP`, `RFLAGS`.
    pub regs: GeneralRegs,
    /// Control, segment and descriptor-table registers.
    pub sregs: SpecialRegs,
    /// Debug registers.
    pub debug: DebugRegisters,
    /// The `XSAVE` area as `KVM_GET_XSAVE2` gives it (the architectural
    /// standard-format layout: legacy x87/SSE area, `XSAVE` header, then
    /// the components `XSTATE_BV` names), at least 4096 bytes and a
    /// multiple of 4 (`KVM_CAP_XSAVE2`'s size). Empty: not saved.
    pub xsave: Vec<u8>,
    /// Extended control registers, (`XCR` number, value): `XCR0` is number
    /// 0. Empty: not saved (or a vCPU without `XSAVE`).
    pub xcrs: Vec<(u32, u64)>,
    /// Model-specific registers, (index, value), in the order they are
    /// loaded back. Empty: not saved.
    pub msrs: Vec<(u32, u64)>,
    /// The in-kernel local APIC's register page (`struct kvm_lapic_state`,
    /// 1 KiB). `None`: not saved, or the vCPU had no in-kernel local APIC.
    pub lapic: Option<Box<[u8; LAPIC_LEN]>>,
    /// Pending exception, interrupt and NMI, interrupt shadow, SMM state:
    /// `struct kvm_vcpu_events` as x86-64 Linux lays it out (64 bytes,
    /// little-endian). `None`: not saved.
    pub events: Option<[u8; EVENTS_LEN]>,
    /// The run state (`KVM_MP_STATE_*`: 0 runnable, 1 uninitialised, 2
    /// waiting for INIT, 3 halted, 4 waiting for SIPI, ...). `None`: not
    /// saved.
    pub mp_state: Option<u32>,
    /// The rate of the guest's TSC in kHz (`KVM_GET_TSC_KHZ`): what its
    /// TSC calibration and kvmclock assume, loaded on a host of another
    /// TSC frequency with `KVM_SET_TSC_KHZ`. `None`: not saved.
    pub tsc_khz: Option<u32>,
}

/// Bytes of a local APIC's state ([`VcpuState::lapic`]).
pub const LAPIC_LEN: usize = 1024;
/// Bytes of a vCPU's pending events ([`VcpuState::events`]).
pub const EVENTS_LEN: usize = 64;
/// The smallest `XSAVE` area a section may hold (`struct kvm_xsave`).
const XSAVE_MIN: usize = 4096;
/// Most extended control registers (`KVM_MAX_XCRS`).
const MAX_XCRS: usize = 16;
/// The largest `XSAVE` area a section may hold: KVM's `KVM_CAP_XSAVE2`
/// size is about 11 KiB with AMX's tile data; this leaves room for what
/// later CPUs add while bounding what a file can make a reader allocate.
const MAX_XSAVE: usize = 64 * 1024;
/// Most MSRs a section may hold (KVM's index list has under 200).
const MAX_MSRS: usize = 4096;
/// The largest entry of one vCPU: its record and every section (7, each
/// with its 8-byte header) at its largest. With
/// [`MAX_VCPUS`](super::format::MAX_VCPUS) it bounds the part's length
/// before a byte of it is read, as a sparse file's length costs its author
/// nothing: exact, so a hostile count of vCPUs buys no slack.
const MAX_ENTRY: usize =
    VCPU_LEN + 7 * 8 + MAX_XSAVE + MAX_XCRS * 16 + MAX_MSRS * 16 + LAPIC_LEN + EVENTS_LEN + 8 + 8;

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
            ..VcpuState::default()
        })
    }
}

/// The most bytes a sectioned part of `count` vCPUs can hold: longer is
/// malformed, whatever the file's length.
pub(crate) fn sectioned_max_len(count: u32) -> u64 {
    SECTIONED_MIN + u64::from(count) * (8 + MAX_ENTRY as u64)
}

/// Refuses a state with a section larger than a reader accepts, naming
/// the vCPU: a save checks before it reads a page.
pub(crate) fn check_states(states: &[VcpuState]) -> Result<(), SnapshotError> {
    for (i, s) in states.iter().enumerate() {
        let what = if s.xsave.len() > MAX_XSAVE {
            Some(format!(
                "XSAVE area of {} bytes, at most {MAX_XSAVE}",
                s.xsave.len()
            ))
        } else if s.msrs.len() > MAX_MSRS {
            Some(format!("{} MSRs, at most {MAX_MSRS}", s.msrs.len()))
        } else if s.xcrs.len() > MAX_XCRS {
            Some(format!("{} XCRs, at most {MAX_XCRS}", s.xcrs.len()))
        } else {
            None
        };
        if let Some(what) = what {
            return Err(SnapshotError::malformed(
                Part::Vcpus,
                0,
                Problem::VcpuEntry {
                    vcpu: u32::try_from(i).unwrap_or(u32::MAX),
                    what,
                },
            ));
        }
    }
    Ok(())
}

/// The sectioned part's bytes for `states` (module doc's layout); empty
/// for no vCPU. A state with a section larger than a reader accepts (an
/// `XSAVE` area over 64 KiB, over 4096 MSRs or 16 XCRs) is refused,
/// naming the vCPU, rather than written into a file no reader opens.
pub(crate) fn encode_part(states: &[VcpuState]) -> Result<Vec<u8>, SnapshotError> {
    if states.is_empty() {
        return Ok(Vec::new());
    }
    check_states(states)?;
    let mut out = vec![0u8; 8];
    for s in states {
        let entry_at = out.len();
        out.extend_from_slice(&[0u8; 8]);
        s.encode(&mut out);
        s.encode_sections(&mut out);
        let n = u32::try_from(out.len() - entry_at - 8).unwrap_or(u32::MAX);
        out[entry_at..entry_at + 4].copy_from_slice(&n.to_le_bytes());
    }
    let len = out.len() as u64 + VCPU_SUM_LEN as u64;
    out[..8].copy_from_slice(&len.to_le_bytes());
    let sum = xxh3_64_with_seed(&out, SECTIONED_SEED);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// The fixed part's checksum of `records`.
pub(crate) fn checksum(records: &[u8]) -> u64 {
    xxh3_64_with_seed(records, SEED)
}

/// Bytes of the fixed part for `count` vCPUs, `None` on overflow.
pub(crate) fn part_len(count: u64) -> Option<u64> {
    if count == 0 {
        return Some(0);
    }
    count
        .checked_mul(VCPU_LEN as u64)?
        .checked_add(VCPU_SUM_LEN as u64)
}

impl VcpuState {
    /// The parts of the state that were not saved (module doc), by name:
    /// empty for a complete state. A VM without an in-kernel local APIC
    /// lacks `"local APIC"` by nature.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (tag, absent) in [
            (TAG_XSAVE, self.xsave.is_empty()),
            (TAG_XCRS, self.xcrs.is_empty()),
            (TAG_MSRS, self.msrs.is_empty()),
            (TAG_LAPIC, self.lapic.is_none()),
            (TAG_EVENTS, self.events.is_none()),
            (TAG_MP_STATE, self.mp_state.is_none()),
            (TAG_TSC_KHZ, self.tsc_khz.is_none()),
        ] {
            if absent {
                out.push(tag_name(tag));
            }
        }
        out
    }

    /// The sections of the state that were saved, in tag order.
    fn encode_sections(&self, out: &mut Vec<u8>) {
        let mut section = |tag: u16, bytes: &[u8]| {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&[0, 0]);
            let n = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(bytes);
        };
        let pairs = |v: &[(u32, u64)]| -> Vec<u8> {
            let mut b = Vec::with_capacity(v.len() * 16);
            for &(index, value) in v {
                b.extend_from_slice(&index.to_le_bytes());
                b.extend_from_slice(&[0; 4]);
                b.extend_from_slice(&value.to_le_bytes());
            }
            b
        };
        if !self.xsave.is_empty() {
            section(TAG_XSAVE, &self.xsave);
        }
        if !self.xcrs.is_empty() {
            section(TAG_XCRS, &pairs(&self.xcrs));
        }
        if !self.msrs.is_empty() {
            section(TAG_MSRS, &pairs(&self.msrs));
        }
        if let Some(l) = &self.lapic {
            section(TAG_LAPIC, &l[..]);
        }
        if let Some(e) = &self.events {
            section(TAG_EVENTS, e);
        }
        if let Some(m) = self.mp_state {
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&m.to_le_bytes());
            section(TAG_MP_STATE, &b);
        }
        if let Some(khz) = self.tsc_khz {
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&khz.to_le_bytes());
            section(TAG_TSC_KHZ, &b);
        }
    }
}

/// The reserved bytes `b[k..k + n]`: an error naming the first that is not
/// zero (file offset `at + its index`), if one is not.
fn reserved(b: &[u8], k: usize, n: usize, at: u64) -> Result<(), SnapshotError> {
    match b[k..k + n].iter().position(|&x| x != 0) {
        None => Ok(()),
        Some(z) => Err(SnapshotError::malformed(
            Part::Vcpus,
            at + (k + z) as u64,
            Problem::Reserved(b[k + z]),
        )),
    }
}

/// A little-endian integer at `k` of `b` (which holds it: checked by the
/// caller).
fn le<const N: usize>(b: &[u8], k: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = b.get(k..k + N) {
        a.copy_from_slice(s);
    }
    a
}

/// Reads a fixed part at file offset `at` (records and checksum, as the
/// header's count sizes it): checksum first, then each record's reserved
/// bytes.
pub(crate) fn parse_fixed(bytes: &[u8], at: u64) -> Result<Vec<VcpuState>, SnapshotError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let (records, sum) = bytes.split_at(bytes.len().saturating_sub(VCPU_SUM_LEN));
    let found = u64::from_le_bytes(le(sum, 0));
    let computed = checksum(records);
    if found != computed {
        return Err(SnapshotError::Checksum {
            at: Place::new(Part::Vcpus, at),
            found,
            computed,
        });
    }
    records
        .chunks_exact(VCPU_LEN)
        .enumerate()
        .map(|(i, r)| decode_record(r, at + (i * VCPU_LEN) as u64))
        .collect()
}

/// One register record at file offset `at`.
fn decode_record(r: &[u8], at: u64) -> Result<VcpuState, SnapshotError> {
    let mut rec = [0u8; VCPU_LEN];
    if r.len() != VCPU_LEN {
        return Err(SnapshotError::malformed(
            Part::Vcpus,
            at,
            Problem::Overflow("a vCPU record past its entry"),
        ));
    }
    rec.copy_from_slice(r);
    VcpuState::decode(&rec).map_err(|k| {
        SnapshotError::malformed(Part::Vcpus, at + k as u64, Problem::Reserved(rec[k]))
    })
}

/// Reads a sectioned part at file offset `at` (the whole part, as its
/// length field sizes it, checked against the file's size by the caller)
/// holding `count` vCPUs: checksum first, then every entry and section.
pub(crate) fn parse_sectioned(
    bytes: &[u8],
    at: u64,
    count: u32,
) -> Result<Vec<VcpuState>, SnapshotError> {
    let bad = |k: usize, vcpu: usize, what: String| {
        SnapshotError::malformed(
            Part::Vcpus,
            at + k as u64,
            Problem::VcpuEntry {
                vcpu: u32::try_from(vcpu).unwrap_or(u32::MAX),
                what,
            },
        )
    };
    if (bytes.len() as u64) < SECTIONED_MIN {
        return Err(SnapshotError::malformed(
            Part::Vcpus,
            at,
            Problem::Overflow("the vCPU part's length (under 16 bytes)"),
        ));
    }
    let (body, sum) = bytes.split_at(bytes.len() - VCPU_SUM_LEN);
    let found = u64::from_le_bytes(le(sum, 0));
    let computed = xxh3_64_with_seed(body, SECTIONED_SEED);
    if found != computed {
        return Err(SnapshotError::Checksum {
            at: Place::new(Part::Vcpus, at),
            found,
            computed,
        });
    }
    let mut out = Vec::new();
    let mut k = 8usize;
    while k < body.len() {
        let i = out.len();
        if i >= count as usize {
            return Err(bad(
                k,
                i,
                format!("more vCPU entries than the header's {count}"),
            ));
        }
        if body.len() - k < 8 {
            return Err(bad(k, i, "entry header cut by the part's end".into()));
        }
        let n = u32::from_le_bytes(le(body, k)) as usize;
        reserved(body, k + 4, 4, at)?;
        let start = k + 8;
        let Some(end) = start.checked_add(n).filter(|&e| e <= body.len()) else {
            return Err(bad(
                k,
                i,
                format!(
                    "entry of {n} bytes, the part has {} left",
                    body.len() - start
                ),
            ));
        };
        if n > MAX_ENTRY {
            return Err(bad(
                k,
                i,
                format!("entry of {n} bytes, at most {MAX_ENTRY}"),
            ));
        }
        if n < VCPU_LEN {
            return Err(bad(
                k,
                i,
                format!("entry of {n} bytes, under a register record's {VCPU_LEN}"),
            ));
        }
        let mut state = decode_record(&body[start..start + VCPU_LEN], at + start as u64)?;
        let mut s = start + VCPU_LEN;
        let mut last_tag = 0u16;
        while s < end {
            if end - s < 8 {
                return Err(bad(s, i, "section header cut by the entry's end".into()));
            }
            let tag = u16::from_le_bytes(le(body, s));
            let name = tag_name(tag);
            reserved(body, s + 2, 2, at)?;
            let len = u32::from_le_bytes(le(body, s + 4)) as usize;
            let data_at = s + 8;
            if len > end - data_at {
                return Err(bad(
                    s,
                    i,
                    format!(
                        "section {tag} ({name}) of {len} bytes, the entry has {} left",
                        end - data_at
                    ),
                ));
            }
            if tag <= last_tag {
                return Err(bad(
                    s,
                    i,
                    format!(
                        "section {tag} ({name}) after section {last_tag}: out of order or twice"
                    ),
                ));
            }
            last_tag = tag;
            let data = &body[data_at..data_at + len];
            let wrong_len = |expected: &str| {
                bad(
                    s,
                    i,
                    format!("section {tag} ({name}) is {len} bytes, expected {expected}"),
                )
            };
            let pairs = |max: usize| -> Result<Vec<(u32, u64)>, SnapshotError> {
                if len % 16 != 0 || len / 16 > max {
                    return Err(wrong_len(&format!(
                        "a multiple of 16, at most {}",
                        max * 16
                    )));
                }
                data.chunks_exact(16)
                    .enumerate()
                    .map(|(j, e)| {
                        reserved(body, data_at + j * 16 + 4, 4, at)?;
                        Ok((u32::from_le_bytes(le(e, 0)), u64::from_le_bytes(le(e, 8))))
                    })
                    .collect()
            };
            match tag {
                TAG_XSAVE => {
                    if !(XSAVE_MIN..=MAX_XSAVE).contains(&len) || len % 4 != 0 {
                        return Err(wrong_len("a multiple of 4, from 4096 to 65536"));
                    }
                    state.xsave = data.to_vec();
                }
                TAG_XCRS => state.xcrs = pairs(MAX_XCRS)?,
                TAG_MSRS => state.msrs = pairs(MAX_MSRS)?,
                TAG_LAPIC => {
                    let mut l = Box::new([0u8; LAPIC_LEN]);
                    if len != LAPIC_LEN {
                        return Err(wrong_len("1024"));
                    }
                    l.copy_from_slice(data);
                    state.lapic = Some(l);
                }
                TAG_EVENTS => {
                    if len != EVENTS_LEN {
                        return Err(wrong_len("64"));
                    }
                    state.events = Some(le(data, 0));
                }
                TAG_MP_STATE => {
                    if len != 8 {
                        return Err(wrong_len("8"));
                    }
                    reserved(body, data_at + 4, 4, at)?;
                    state.mp_state = Some(u32::from_le_bytes(le(data, 0)));
                }
                TAG_TSC_KHZ => {
                    if len != 8 {
                        return Err(wrong_len("8"));
                    }
                    reserved(body, data_at + 4, 4, at)?;
                    state.tsc_khz = Some(u32::from_le_bytes(le(data, 0)));
                }
                _ => {
                    return Err(bad(
                        s,
                        i,
                        format!("section tag {tag} unknown to this build (a newer writer's?)"),
                    ))
                }
            }
            s = data_at + len;
        }
        out.push(state);
        k = end;
    }
    if out.len() != count as usize {
        return Err(bad(
            body.len(),
            out.len(),
            format!("{} vCPU entries, the header counts {count}", out.len()),
        ));
    }
    Ok(out)
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

    #[test]
    fn the_tsc_rate_section_round_trips_and_is_checked() {
        let s = VcpuState {
            mp_state: Some(3),
            tsc_khz: Some(2_599_998),
            ..VcpuState::default()
        };
        let part = encode_part(std::slice::from_ref(&s)).unwrap_or_default();
        assert_eq!(parse_sectioned(&part, 0, 1).ok(), Some(vec![s.clone()]));
        // The section is last: tag, zero, length 8, kHz, 4 zero bytes,
        // then the checksum.
        let at = part.len() - 8 - 16;
        assert_eq!(part[at..at + 2], TAG_TSC_KHZ.to_le_bytes());
        let reseal = |mut b: Vec<u8>| {
            let n = b.len() - 8;
            let sum = xxh3_64_with_seed(&b[..n], SECTIONED_SEED);
            b[n..].copy_from_slice(&sum.to_le_bytes());
            b
        };
        let mut b = part.clone();
        b[at + 8 + 4] = 1; // a reserved byte
        assert!(matches!(
            parse_sectioned(&reseal(b), 0, 1),
            Err(SnapshotError::Malformed { .. })
        ));
        let mut b = part.clone();
        b[at + 4] = 4; // length 4
        let err = parse_sectioned(&reseal(b), 0, 1)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("TSC frequency")),
            "{err:?}"
        );
    }

    #[test]
    fn the_largest_entry_a_writer_makes_parses() {
        let s = VcpuState {
            xsave: vec![0; MAX_XSAVE],
            xcrs: vec![(0, 1); MAX_XCRS],
            msrs: vec![(0x10, 1); MAX_MSRS],
            lapic: Some(Box::new([0; LAPIC_LEN])),
            events: Some([0; EVENTS_LEN]),
            mp_state: Some(0),
            tsc_khz: Some(1),
            ..VcpuState::default()
        };
        let part = encode_part(std::slice::from_ref(&s)).unwrap_or_default();
        assert_eq!(part.len() as u64, sectioned_max_len(1), "exact bound");
        assert_eq!(parse_sectioned(&part, 0, 1).ok(), Some(vec![s]));
    }
}
