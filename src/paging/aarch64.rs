//! AArch64 (VMSAv8-64) translation: the stage-1 walk of the EL1&0 regime
//! (the descriptor format as a `Format` for the shared walk engine, the
//! TTBR0/TTBR1 split, and [`Aarch64Walker`], which translates a virtual
//! address to the stage-1 output address, the IPA when a stage 2 is in use,
//! with the permission, access-flag and dirty-state rules, and reports
//! faults as the architecture does: [`Aarch64Fault`], fault status code and
//! level), 52-bit addresses (FEAT_LPA, FEAT_LVA, FEAT_LPA2), and what stage
//! 1 and stage 2 share: the descriptor layout (`Layout`: which bits hold the
//! output address, where blocks may be, how a walk indexes its tables) and
//! the fault status codes. Registers and their checks live in
//! `aarch64/regs.rs`; stage 2 (VTCR_EL2/VTTBR_EL2, its format, its faults
//! as ESR_EL2 and HPFAR_EL2) in `aarch64/stage2.rs`, which imports this
//! file.
//!
//! Why the shared engine fits: a stage-1 walk is the engine's walk — one
//! 8-byte descriptor a level, tables or leaves, permissions folded down
//! the way (APTable, UXNTable, PXNTable) and checked at the leaf, and a
//! compare-exchange to update the leaf (the access flag, DBM's `AP[2]`) as
//! x86 sets A/D. Only the numbering differs: the engine counts levels up
//! from 1 (the last table), the architecture counts down to level 3, the
//! last table, from level 0 (or -1 for a 52-bit 4 KiB walk), so engine
//! level `e` is architectural level `4 - e`: a walk that starts at level 1
//! (64 KiB granule, 48-bit VA) has an engine top level of 3, one that
//! starts at level -1 a top level of 5. The engine's reasons map onto the
//! architecture's fault kinds in `classify`: not present is a translation
//! fault, "reserved" (an output address above the OA size) an address size
//! fault, and a denied leaf an access flag fault when its AF is clear
//! (that fault has priority over a permission fault) or else a permission
//! fault. The VA range checks (TTBR select, TxSZ, TBI, EPDn) happen before
//! the engine runs, in [`Aarch64Walker::translate_with`].
//!
//! 52-bit output addresses are assembled as the current pseudocode's
//! `AArch64.NextTableBase`/`AArch64.LeafBase` do: with FEAT_LPA (a 52-bit
//! implemented PA size) a 64 KiB descriptor's bits 15:12 are `OA[51:48]`
//! whatever the configured size, and with DS a 4/16 KiB descriptor's bits
//! 9:8 are `OA[51:50]`; an address so assembled above the configured OA
//! size is an address size fault (`AArch64.OAOutOfRange`). (v8.2's
//! pseudocode and QEMU read those bits only when the OA size is 52, and
//! ignore them otherwise.)
//!
//! Out of scope here (issue 17 goes on): the nested walk (`second.rs` runs
//! stage 2 under stage 1), FEAT_HAFT, EPAN, permission indirection and
//! overlays, FEAT_D128, FEAT_TTST at stage 1, the walk cache, mappings
//! listing, the CLI and the C ABI.
//!
//! Reference: Arm ARM DDI 0487, chapter D8 (VMSAv8-64), in particular the
//! pseudocode `AArch64.S1Walk`, `AArch64.S1Translate`, and v8.0's
//! `AArch64.TranslationTableWalk` (its order: invalid or level-3 0b01 ->
//! translation fault; a table's output address above the OA size ->
//! address size fault at the table descriptor's level; a block below the
//! first block level -> translation fault; the leaf's output address ->
//! address size fault; AF = 0 -> access flag fault; then the permission
//! check), `AArch64.BlockDescSupported` (4 KiB level-0 and 16 KiB level-1
//! blocks with DS, 64 KiB level-1 blocks with a 52-bit PA) and
//! `AArch64.CheckPermission`, whose rules `S1Format::allows` follows
//! (APTable folded into AP, "EL0-writable is never EL1-executable", WXN,
//! PAN). Not modelled: the IMPLEMENTATION DEFINED translation fault on a
//! misprogrammed contiguous bit, and reserved MAIR encodings (reported as
//! the byte they are).

pub mod regs;
pub mod stage2;

use super::{
    engine::{self, DirectPort, Fail, Start},
    fault::FaultReason,
    format::{bits, Decoded, Denied, Format},
    lean::{LeanOut, ReadEntry, RootWalk},
    memory::PhysMemory,
    types::{Access, AccessKind, Permissions, Privilege, WalkOptions},
};
use crate::addr::{GuestPhysAddr, GuestVirtAddr};
use regs::{base_address, SCTLR_EPAN, SCTLR_M, SCTLR_WXN};
pub use regs::{Aarch64Paging, Aarch64PagingError, Granule, Tcr, Ttbr};
pub use stage2::{
    esr_el2, hpfar_el2, Aarch64Stage2, Aarch64Stage2Attributes, Aarch64Stage2Fault,
    Aarch64Stage2Translation, Aarch64Stage2Walker, Stage2Access, Vtcr,
};

/// Descriptor bits (stage 1, VMSAv8-64; the output address is `Layout`'s).
const AP1: u64 = 1 << 6;
const AP2: u64 = 1 << 7;
pub(crate) const AF: u64 = 1 << 10;
const NG: u64 = 1 << 11;
const NS: u64 = 1 << 5;
pub(crate) const DBM: u64 = 1 << 51;
pub(crate) const CONTIGUOUS: u64 = 1 << 52;
const PXN: u64 = 1 << 53;
const UXN: u64 = 1 << 54;
/// Table-descriptor bits: PXNTable, UXNTable, `APTable[0]`, `APTable[1]`.
const PXN_TABLE: u64 = 1 << 59;
const UXN_TABLE: u64 = 1 << 60;
const AP_TABLE0: u64 = 1 << 61;
const AP_TABLE1: u64 = 1 << 62;

// Accumulated (hierarchical) restrictions from table descriptors, and the
// leaf's engine level.
const ACC_NO_EL0: u64 = 1 << 0;
const ACC_NO_WRITE: u64 = 1 << 1;
const ACC_UXN: u64 = 1 << 2;
const ACC_PXN: u64 = 1 << 3;
const ACC_LEAF: u32 = 8;

/// The architectural level of engine level `level` (1..=5: 3..=-1).
#[inline]
pub(crate) const fn arch_level(level: u8) -> i8 {
    let l = if level > 5 { 5 } else { level };
    4 - l as i8
}

/// The fault status code of an abort of `kind` at architectural `level`
/// (ESR_ELx DFSC/IFSC, Arm ARM "ISS encoding for an exception from a Data
/// Abort"): address size 0b0000LL, translation 0b0001LL, access flag
/// 0b0010LL, permission 0b0011LL, and at level -1 (FEAT_LPA2) address size
/// 0b101001 and translation 0b101011. `None` for the kinds without a code
/// and for levels no such fault reports.
pub(crate) const fn fault_status(kind: Aarch64FaultKind, level: i8) -> Option<u8> {
    let class = match kind {
        Aarch64FaultKind::AddressSize => 0b00_0000,
        Aarch64FaultKind::Translation => 0b00_0100,
        Aarch64FaultKind::AccessFlag => 0b00_1000,
        Aarch64FaultKind::Permission => 0b00_1100,
        _ => return None,
    };
    match level {
        0..=3 => Some(class | level as u8),
        -1 => match kind {
            Aarch64FaultKind::AddressSize => Some(0b10_1001),
            Aarch64FaultKind::Translation => Some(0b10_1011),
            _ => None,
        },
        _ => None,
    }
}

/// How the descriptors of one walk (a stage-1 VA range, or a stage 2) are
/// indexed and where they hold the output address: the granule, the start
/// level and input size, the OA size, and the 52-bit layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) granule: Granule,
    /// Engine level of the start table (number of levels walked, 1..=5).
    pub(crate) top: u8,
    /// Input-address bits (64 - TxSZ).
    pub(crate) ia_bits: u32,
    /// The configured output-address size.
    pub(crate) oa_bits: u32,
    /// LPA2 descriptors (DS = 1, 4/16 KiB): `OA[49:gs]` in bits 49:gs,
    /// `OA[51:50]` in bits 9:8, blocks one level higher.
    pub(crate) ds: bool,
    /// FEAT_LPA with the 64 KiB granule (a 52-bit implemented PA size):
    /// `OA[51:48]` in bits 15:12, level-1 blocks.
    pub(crate) lpa: bool,
}

impl Layout {
    /// Whether a block descriptor is allowed at architectural `level`
    /// (`AArch64.BlockDescSupported`); elsewhere the encoding is a
    /// translation fault.
    pub(crate) fn block_allowed(&self, level: i8) -> bool {
        match self.granule {
            Granule::K4 => matches!(level, 1 | 2) || (level == 0 && self.ds),
            Granule::K16 => level == 2 || (level == 1 && self.ds),
            Granule::K64 => level == 2 || (level == 1 && self.lpa),
        }
    }

    /// The output address `raw` holds, granule-aligned, with the 52-bit
    /// bits where the layout puts them.
    #[inline]
    pub(crate) fn address(&self, raw: u64) -> u64 {
        let gs = self.granule.shift();
        if self.ds {
            (raw & bits(gs, 49)) | (((raw >> 8) & 3) << 50)
        } else if self.lpa {
            (raw & bits(gs, 47)) | (((raw >> 12) & 0xf) << 48)
        } else {
            raw & bits(gs, 47)
        }
    }

    /// Bits of `address` above the OA size (an address size fault).
    #[inline]
    pub(crate) fn excess(&self, address: u64) -> u64 {
        address & bits(self.oa_bits, 63)
    }

    /// A page or block descriptor at engine `level`.
    fn leaf(&self, level: u8, raw: u64) -> Decoded {
        let shift = self.index_shift(level);
        let a = self.address(raw);
        match self.excess(a) {
            0 => Decoded::Leaf {
                base: a & !bits(0, shift - 1),
                // At most 16 + 13 * 2: fits.
                shift: (shift & 0x3f) as u8,
            },
            excess => Decoded::Reserved(excess),
        }
    }

    /// The lowest input-address bit the engine-level `level` table indexes.
    #[inline]
    pub(crate) fn index_shift(&self, level: u8) -> u32 {
        self.granule.shift() + self.granule.stride() * (u32::from(level).max(1) - 1)
    }

    /// Entries in the engine-level `level` table: the start table resolves
    /// what is left of the input size (more than one table's worth at a
    /// stage 2's concatenated start level).
    #[inline]
    pub(crate) fn entries(&self, level: u8) -> u64 {
        if level >= self.top {
            1 << self.ia_bits.saturating_sub(self.index_shift(self.top))
        } else {
            1 << self.granule.stride()
        }
    }

    /// The address of the entry for `va` in the engine-level `level` table
    /// at `table`.
    #[inline]
    pub(crate) fn entry_addr(&self, table: u64, level: u8, va: u64) -> u64 {
        let index = (va >> self.index_shift(level)) & (self.entries(level) - 1);
        table + index * 8
    }

    /// What `raw` means at engine `level` (the same for both stages).
    pub(crate) fn decode(&self, level: u8, raw: u64) -> Decoded {
        let arch = arch_level(level);
        match raw & 3 {
            0 | 2 => Decoded::NotPresent,
            3 if arch < 3 => {
                let a = self.address(raw);
                match self.excess(a) {
                    0 => Decoded::Table(a),
                    excess => Decoded::Reserved(excess),
                }
            }
            // A page at level 3; a block where the granule allows one.
            3 => self.leaf(level, raw),
            1 if arch < 3 && self.block_allowed(arch) => self.leaf(level, raw),
            // Level-3 0b01 (reserved) and a block where none may be.
            _ => Decoded::NotPresent,
        }
    }
}

/// The stage-1 format of one VA range (one TTBR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct S1Format {
    layout: Layout,
    root: u64,
    ha: bool,
    hd: bool,
    hpd: bool,
    wxn: bool,
    pan: bool,
    /// With DS: TCR_EL1.SHn, the range's shareability (descriptor bits 9:8
    /// are address bits).
    sh: Option<u8>,
    /// TCR_EL1.E0PDn: EL0 may not access this range at all.
    e0pd: bool,
    /// SCTLR_EL1.EPAN: PAN also covers EL0-executable pages.
    epan: bool,
    /// The lean walk's precomputed layout.
    lean: S1Lean,
    /// The range checks, precomputed.
    range: S1Range,
    /// `allows`, precomputed: per access (EL1 read, write, fetch, then
    /// EL0's), the 16 combinations of the effective bits it reads
    /// (`S1Format::lean_allows`) it accepts.
    allowed: [u16; 6],
}

/// What `Aarch64Walker::select` checks of one range, from TCR_EL1 and the
/// TTBR: computed once (`S1Format::new`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct S1Range {
    /// The TTBR1 range (VA bit 55 set).
    upper: bool,
    /// TBIn, TBIDn and EPDn.
    tbi: bool,
    tbid: bool,
    disabled: bool,
    /// The VA bits from the range's size up to bit 55 (under TBI) and to
    /// bit 63: all equal to bit 55 in the range.
    bits55: u64,
    bits63: u64,
    /// The root's bits above the OA size.
    root_excess: u64,
}

/// What the lean walk of one range needs, computed once from its
/// `Layout` (`S1Lean::of`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct S1Lean {
    /// A usable table descriptor has, of these bits, exactly `0b11`: the
    /// type bits and the output-address bits above the OA size (0, never
    /// matching, with the 52-bit layouts: their tables take `decode`).
    table_check: u64,
    /// The next table's address in a table descriptor (without the 52-bit
    /// layouts).
    address: u64,
    /// The start table's index: its lowest bit and its mask.
    top_shift: u32,
    top_mask: u64,
    /// Any other table's index mask, and the bits one level resolves.
    mask: u64,
    stride: u32,
    /// log2 of the granule: a page's size.
    page_shift: u8,
}

impl S1Lean {
    fn of(l: &Layout) -> Self {
        let gs = l.granule.shift();
        let address = bits(gs, 47);
        let plain = !l.ds && !l.lpa;
        S1Lean {
            table_check: if plain {
                3 | (address & bits(l.oa_bits, 63))
            } else {
                0
            },
            address,
            top_shift: l.index_shift(l.top),
            top_mask: l.entries(l.top) - 1,
            mask: (1 << l.granule.stride()) - 1,
            stride: l.granule.stride(),
            // 12, 14 or 16.
            page_shift: (gs & 0x1f) as u8,
        }
    }
}

impl S1Format {
    fn new(regs: &Aarch64Paging, tcr: &Tcr, ttbr: Ttbr) -> Self {
        let (granule, txsz, base, hpd, sh, e0pd) = match ttbr {
            Ttbr::Ttbr0 => (tcr.tg0, tcr.t0sz, regs.ttbr0, tcr.hpd0, tcr.sh0, tcr.e0pd0),
            Ttbr::Ttbr1 => (tcr.tg1, tcr.t1sz, regs.ttbr1, tcr.hpd1, tcr.sh1, tcr.e0pd1),
        };
        let ds = tcr.lpa2_layout(granule);
        let layout = Layout {
            granule,
            // The start level is -1..=3: the top level is 1..=5.
            top: (4 - granule.start_level(txsz)) as u8,
            ia_bits: 64 - u32::from(txsz),
            oa_bits: u32::from(tcr.oa_bits),
            ds,
            lpa: granule == Granule::K64 && regs.pa_bits >= 52,
        };
        let (tbi, tbid, disabled) = match ttbr {
            Ttbr::Ttbr0 => (tcr.tbi0, tcr.tbid0, tcr.epd0),
            Ttbr::Ttbr1 => (tcr.tbi1, tcr.tbid1, tcr.epd1),
        };
        let root = base_address(base, tcr.base52(granule));
        let mut f = S1Format {
            layout,
            lean: S1Lean::of(&layout),
            range: S1Range {
                upper: ttbr == Ttbr::Ttbr1,
                tbi,
                tbid,
                disabled,
                bits55: bits(layout.ia_bits, 55),
                bits63: bits(layout.ia_bits, 63),
                root_excess: layout.excess(root),
            },
            root,
            ha: tcr.ha,
            hd: tcr.hd,
            hpd,
            wxn: regs.sctlr & SCTLR_WXN != 0,
            pan: regs.pan,
            sh: ds.then_some(sh),
            e0pd,
            epan: regs.sctlr & SCTLR_EPAN != 0,
            allowed: [0; 6],
        };
        let mut allowed = [0u16; 6];
        for (i, set) in allowed.iter_mut().enumerate() {
            let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][i % 3];
            let privilege = if i < 3 {
                Privilege::Supervisor
            } else {
                Privilege::User
            };
            let access = Access::new(kind, privilege);
            for index in 0..16u16 {
                // A leaf whose own bits are the effective ones, under no
                // table restriction.
                let leaf = (u64::from(index & 1) * AP1)
                    | (u64::from((index >> 1) & 1) * AP2)
                    | (u64::from((index >> 2) & 1) * UXN)
                    | (u64::from((index >> 3) & 1) * PXN);
                if f.allows(0, leaf, access) {
                    *set |= 1 << index;
                }
            }
        }
        f.allowed = allowed;
        f
    }

    /// [`Format::check`]'s verdict (not its reason), from the sets
    /// precomputed by `allows`: the access flag, then the permissions.
    /// `rights` reads a leaf and the table restrictions only as four
    /// bits, which index the set: EL0 access (`AP[1]`, no APTable[0]),
    /// read-only (`AP[2]` unless a DBM page is written under HD, or
    /// APTable[1]), UXN and PXN (the leaf's or the tables').
    #[inline(always)]
    fn lean_allows(&self, acc: u64, leaf: u64, access: Access) -> bool {
        let (kind, write) = match access.kind {
            AccessKind::Read => (0, false),
            AccessKind::Write => (1, true),
            AccessKind::Fetch => (2, false),
        };
        let set = self.allowed[kind + if access.is_user() { 3 } else { 0 }];
        let leaf_ro = leaf & AP2 != 0 && !(write && self.hd && leaf & DBM != 0);
        let index = u32::from(leaf & AP1 != 0 && acc & ACC_NO_EL0 == 0)
            | (u32::from(leaf_ro || acc & ACC_NO_WRITE != 0) << 1)
            | (u32::from(leaf & UXN != 0 || acc & ACC_UXN != 0) << 2)
            | (u32::from(leaf & PXN != 0 || acc & ACC_PXN != 0) << 3);
        (leaf & AF != 0 || self.ha) && (set >> index) & 1 != 0
    }

    /// The root's bits above the OA size: nonzero, every address of the
    /// range takes an address size fault at level 0.
    pub(crate) fn root_excess(&self) -> u64 {
        self.layout.excess(self.root)
    }

    /// The leaf's permissions after the table restrictions: (EL0 read,
    /// EL0 write, EL1 write, EL0 execute, EL1 execute), with `dirty_write`
    /// treating a DBM page as writable (a write under TCR_EL1.HD).
    #[inline(always)]
    fn rights(&self, acc: u64, leaf: u64, dirty_write: bool) -> (bool, bool, bool, bool, bool) {
        let ap1 = leaf & AP1 != 0 && acc & ACC_NO_EL0 == 0;
        let leaf_ro = leaf & AP2 != 0 && !(dirty_write && self.hd && leaf & DBM != 0);
        let ro = leaf_ro || acc & ACC_NO_WRITE != 0;
        let user_r = ap1;
        let user_w = ap1 && !ro;
        let priv_w = !ro;
        let mut user_x = leaf & UXN == 0 && acc & ACC_UXN == 0;
        // An EL0-writable page is never executable at EL1, WXN or not.
        let mut priv_x = leaf & PXN == 0 && acc & ACC_PXN == 0 && !user_w;
        if self.wxn {
            user_x &= !user_w;
            priv_x &= !priv_w;
        }
        (user_r, user_w, priv_w, user_x, priv_x)
    }

    /// Whether `access` is allowed by the leaf `leaf` under `acc`.
    #[inline(always)]
    fn allows(&self, acc: u64, leaf: u64, access: Access) -> bool {
        let write = access.is_write();
        let (user_r, user_w, priv_w, user_x, priv_x) = self.rights(acc, leaf, write);
        match (access.privilege, access.kind) {
            // E0PD: the range check faults first; a cached translation
            // must not answer either.
            (Privilege::User, _) if self.e0pd => false,
            (Privilege::User, AccessKind::Read) => user_r,
            (Privilege::User, AccessKind::Write) => user_w,
            (Privilege::User, AccessKind::Fetch) => user_x,
            (_, AccessKind::Fetch) => priv_x,
            // PAN: EL1 data accesses to EL0-readable pages fault, and with
            // EPAN (FEAT_PAN3) to EL0-executable ones too.
            (_, _) if self.pan && (user_r || (self.epan && user_x)) => false,
            (_, AccessKind::Read) => true,
            (_, AccessKind::Write) => priv_w,
        }
    }
}

/// The lean walk from the root: [`super::lean::walk`]'s answer, with the
/// index masks and shifts precomputed, a table descriptor recognised in
/// one mask test (exactly what `decode` calls a table with the 4/16/64 KiB
/// layouts below 52 bits; the 52-bit layouts' tables take `decode`), the
/// table restrictions folded as an OR of the tables, and the leaf decoded
/// and checked as there.
impl RootWalk for S1Format {
    #[inline(always)]
    fn lean_root(&self) -> u64 {
        self.root
    }

    #[inline(always)]
    fn walk_root_by<R: ReadEntry>(
        &self,
        va: u64,
        access: Access,
        reader: &mut R,
    ) -> Option<LeanOut> {
        let l = &self.lean;
        let mut level = self.layout.top;
        let mut table = self.root;
        let mut shift = l.top_shift;
        let mut mask = l.top_mask;
        let mut tables = 0u64;
        let mut refs = 0;
        loop {
            let raw = reader.read(table + ((va >> shift) & mask) * 8)?;
            refs += 1;
            let usable = raw & l.table_check == 3;
            let next = if level > 1 && usable {
                raw & l.address
            } else {
                // A page (`decode`'s answer for a usable level-3 page
                // descriptor), else whatever `decode` says.
                let decoded = if level == 1 && usable {
                    Decoded::Leaf {
                        base: raw & l.address,
                        shift: l.page_shift,
                    }
                } else {
                    self.layout.decode(level, raw)
                };
                match decoded {
                    Decoded::Table(next) if level > 1 => next,
                    Decoded::Leaf { base, shift } => {
                        // `accumulate` of each table, then of the leaf.
                        let restrict = if self.hpd {
                            0
                        } else {
                            ((tables >> 61) & (ACC_NO_EL0 | ACC_NO_WRITE))
                                | ((tables >> 58) & ACC_UXN)
                                | ((tables >> 56) & ACC_PXN)
                        };
                        let acc = restrict | u64::from(level) << ACC_LEAF;
                        // `check`'s verdict.
                        if !self.lean_allows(acc, raw, access) {
                            return None;
                        }
                        return Some(LeanOut {
                            base,
                            shift,
                            level,
                            refs,
                            acc,
                            leaf: raw,
                        });
                    }
                    _ => return None,
                }
            };
            tables |= raw;
            table = next;
            level -= 1;
            shift -= l.stride;
            mask = l.mask;
        }
    }
}

impl Format for S1Format {
    fn top_level(&self) -> u8 {
        self.layout.top
    }

    fn root(&self) -> u64 {
        self.root
    }

    fn wide(&self) -> bool {
        true
    }

    fn check_input(&self, va: u64) -> Result<(), FaultReason> {
        // The range checks need the TTBR select and TBI, which belong to
        // the walker (`Aarch64Walker::translate_with`); within one range
        // every index bit is in use.
        let _ = va;
        Ok(())
    }

    fn index_shift(&self, level: u8) -> u32 {
        self.layout.index_shift(level)
    }

    fn entries(&self, level: u8) -> u64 {
        self.layout.entries(level)
    }

    fn entry_addr(&self, table: u64, level: u8, va: u64) -> u64 {
        self.layout.entry_addr(table, level, va)
    }

    fn decode(&self, level: u8, raw: u64) -> Decoded {
        self.layout.decode(level, raw)
    }

    fn acc_start(&self) -> u64 {
        0
    }

    fn accumulate(&self, acc: u64, level: u8, raw: u64) -> u64 {
        let mut acc = (acc & !(0xf << ACC_LEAF)) | (u64::from(level) << ACC_LEAF);
        // Table descriptors only (a leaf's own bits are read in `check`);
        // TCR_EL1.HPDn turns the hierarchical bits off.
        let table = arch_level(level) < 3 && raw & 3 == 3;
        if table && !self.hpd {
            for (bit, flag) in [
                (AP_TABLE0, ACC_NO_EL0),
                (AP_TABLE1, ACC_NO_WRITE),
                (UXN_TABLE, ACC_UXN),
                (PXN_TABLE, ACC_PXN),
            ] {
                if raw & bit != 0 {
                    acc |= flag;
                }
            }
        }
        acc
    }

    #[inline(always)]
    fn check(&self, acc: u64, leaf: u64, access: Access, _user: bool) -> Result<(), Denied> {
        let level = ((acc >> ACC_LEAF) & 0xf) as u8;
        // Access flag first: it takes priority over a permission fault.
        // Both are reported at the leaf's level; `classify` tells them
        // apart from the leaf (the engine has no access-flag reason).
        if (leaf & AF == 0 && !self.ha) || !self.allows(acc, leaf, access) {
            return Err(Denied {
                level,
                reason: FaultReason::Permission,
            });
        }
        Ok(())
    }

    /// Hardware sets AF (and clears `AP[2]` for a DBM write) only on a walk
    /// that does not fault; the architecture allows an AF update on a
    /// walk that then takes a permission fault, but does not require it,
    /// and a faulting walk here writes nothing.
    fn with_accessed(&self, _level: u8, raw: u64, leaf: bool, write: bool) -> u64 {
        if !leaf || !self.ha {
            return raw;
        }
        let mut new = raw | AF;
        if write && self.hd && raw & DBM != 0 {
            new &= !AP2;
        }
        new
    }

    #[inline]
    fn permissions(&self, acc: u64, leaf: u64) -> Permissions {
        let (user_r, user_w, priv_w, user_x, priv_x) = self.rights(acc, leaf, false);
        let _ = user_w;
        Permissions {
            read: true,
            write: priv_w,
            execute: priv_x,
            user: user_r && !self.e0pd,
            user_execute: user_x && !self.e0pd,
            key: 0,
        }
    }
}

/// What an AArch64 stage-1 leaf says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Aarch64Attributes {
    /// AttrIndx (bits 4:2), the MAIR_EL1 byte it selects.
    pub attr_index: u8,
    /// MAIR_EL1's attribute byte for `attr_index` (memory type and
    /// cacheability).
    pub memory_attr: u8,
    /// `SH[1:0]` (bits 9:8; with TCR_EL1.DS, where those bits are address
    /// bits, the range's TCR_EL1.SH0/SH1): 0 non-shareable, 2 outer, 3
    /// inner.
    pub shareability: u8,
    /// `AP[2:1]` (bits 7:6).
    pub ap: u8,
    /// The access flag (bit 10).
    pub accessed: bool,
    /// Not global (bit 11): the translation belongs to the ASID.
    pub not_global: bool,
    /// NS (bit 5).
    pub non_secure: bool,
    /// DBM (bit 51): the page is writable-clean when `AP[2]` is set and
    /// TCR_EL1.HD is on.
    pub dbm: bool,
    /// The contiguous hint (bit 52): reported, not used to size the page.
    pub contiguous: bool,
}

impl Aarch64Attributes {
    #[inline]
    fn of(leaf: u64, mair: u64, sh: Option<u8>) -> Self {
        let attr_index = ((leaf >> 2) & 7) as u8;
        Aarch64Attributes {
            attr_index,
            memory_attr: mair.to_le_bytes()[usize::from(attr_index)],
            shareability: sh.unwrap_or(((leaf >> 8) & 3) as u8),
            ap: ((leaf >> 6) & 3) as u8,
            accessed: leaf & AF != 0,
            not_global: leaf & NG != 0,
            non_secure: leaf & NS != 0,
            dbm: leaf & DBM != 0,
            contiguous: leaf & CONTIGUOUS != 0,
        }
    }
}

/// A successful stage-1 translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Aarch64Translation {
    /// The virtual address translated.
    pub va: GuestVirtAddr,
    /// The stage-1 output address (an IPA when a stage 2 is in use; the
    /// address in the walker's memory here).
    pub pa: GuestPhysAddr,
    /// Size of the page or block (the granule's page at level 3; the
    /// contiguous hint does not change it). With the MMU off, one granule.
    pub page_size: u64,
    /// The leaf's architectural level (0..=3; a 4 KiB walk from level -1
    /// has no leaf there); `None` with the MMU off.
    pub level: Option<i8>,
    /// The range (TTBR) the address is in; `None` with the MMU off.
    pub ttbr: Option<Ttbr>,
    /// What the page allows: `read`/`write`/`execute` at EL1, `user` EL0
    /// read, `user_execute` EL0 execute (EL0 write is `user && write`).
    /// PSTATE.PAN is an access rule and is not folded in.
    pub permissions: Permissions,
    /// The leaf's attributes (all zero with the MMU off).
    pub attributes: Aarch64Attributes,
    /// Descriptors read and updated.
    pub memory_refs: u32,
}

/// The kind of a stage-1 or stage-2 abort, as its fault status code names
/// it, or a walk the emulator cannot finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Aarch64FaultKind {
    /// Translation fault (FSC 0b0001LL, 0b101011 at level -1): an invalid or
    /// reserved descriptor, an address outside both VA ranges or in a
    /// disabled one, an EL0 access to a range E0PDn closes (at stage 2: an
    /// IPA above the input size).
    Translation,
    /// Access flag fault (FSC 0b0010LL): AF clear without TCR_EL1.HA (or
    /// VTCR_EL2.HA at stage 2).
    AccessFlag,
    /// Permission fault (FSC 0b0011LL).
    Permission,
    /// Address size fault (FSC 0b0000LL, 0b101001 at level -1): a TTBR or
    /// descriptor output address above the OA size (or, MMU off, a VA above
    /// the PA size).
    AddressSize,
    /// A table lies where no memory backs it (hardware would report a
    /// synchronous external abort on the walk; a VMM emulates).
    Unbacked {
        /// The address that could not be read.
        pa: GuestPhysAddr,
    },
    /// An access flag or dirty update was due but the memory is read-only.
    ReadOnlyTable,
    /// The update kept losing races with writers of the descriptor.
    Contended,
}

/// A failed stage-1 translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("AArch64 stage-1 {kind:?} fault at level {level} translating {va:#x}")]
pub struct Aarch64Fault {
    /// The virtual address.
    pub va: GuestVirtAddr,
    /// The access: EL0 for `Privilege::User`, EL1 otherwise.
    pub access: Access,
    /// What went wrong.
    pub kind: Aarch64FaultKind,
    /// The architectural lookup level (-1..=3) the fault is reported at.
    pub level: i8,
    /// The descriptor's address, if one was read.
    pub entry_addr: Option<GuestPhysAddr>,
    /// The descriptor, if one was read.
    pub entry: Option<u64>,
    /// The range the address selected (`None` with the MMU off).
    pub ttbr: Option<Ttbr>,
}

impl Aarch64Fault {
    /// The 6-bit fault status code (ESR_ELx DFSC for data aborts, IFSC for
    /// instruction aborts); `None` for faults with no architectural code.
    /// Level -1 (FEAT_LPA2) has its own codes: 0b101011 translation,
    /// 0b101001 address size.
    pub fn fsc(&self) -> Option<u8> {
        fault_status(self.kind, self.level)
    }

    /// Whether the access was made at EL0.
    pub fn el0(&self) -> bool {
        self.access.is_user()
    }

    /// The ESR_EL1 value for the abort taken to EL1: EC (instruction abort
    /// 0x20/0x21 or data abort 0x24/0x25, from EL0 or EL1), IL, WnR for a
    /// write, and the FSC; ISV and the other syndrome bits are zero.
    pub fn esr_el1(&self) -> Option<u64> {
        let fsc = u64::from(self.fsc()?);
        // Bit 0 of the EC: taken without a change of EL (an EL1 access).
        let same_el = u64::from(!self.el0());
        let (ec, wnr) = match self.access.kind {
            AccessKind::Fetch => (0x20 | same_el, 0),
            AccessKind::Read => (0x24 | same_el, 0),
            AccessKind::Write => (0x24 | same_el, 1 << 6),
        };
        Some(ec << 26 | 1 << 25 | wnr | fsc)
    }
}

/// An AArch64 EL1&0 stage-1 address space, ready to translate.
#[derive(Clone, Copy, Debug)]
pub struct Aarch64Walker {
    regs: Aarch64Paging,
    tcr: Tcr,
    lo: S1Format,
    hi: S1Format,
}

impl Aarch64Walker {
    /// A walker for `regs`, refusing values whose walk is undefined
    /// ([`Aarch64Paging::decode`]).
    pub fn new(regs: Aarch64Paging) -> Result<Self, Aarch64PagingError> {
        let tcr = regs.decode()?;
        Ok(Aarch64Walker {
            regs,
            tcr,
            lo: S1Format::new(&regs, &tcr, Ttbr::Ttbr0),
            hi: S1Format::new(&regs, &tcr, Ttbr::Ttbr1),
        })
    }

    /// The registers.
    pub fn registers(&self) -> &Aarch64Paging {
        &self.regs
    }

    /// TCR_EL1 as decoded.
    pub fn tcr(&self) -> &Tcr {
        &self.tcr
    }

    /// The current ASID.
    pub fn asid(&self) -> u16 {
        self.regs.asid()
    }

    /// Translates `va` for `access`, writing nothing.
    pub fn translate<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: GuestVirtAddr,
        access: Access,
    ) -> Result<Aarch64Translation, Aarch64Fault> {
        self.translate_with(mem, va, access, WalkOptions::default())
    }

    /// Translates `va` for `access`; with `options.set_accessed_dirty`,
    /// sets the access flag (TCR_EL1.HA) and clears `AP[2]` of a DBM page on
    /// a write (TCR_EL1.HD) by compare-exchange, as hardware does.
    pub fn translate_with<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: GuestVirtAddr,
        access: Access,
        options: WalkOptions,
    ) -> Result<Aarch64Translation, Aarch64Fault> {
        let v = va.0;
        let fault = |kind, level, ttbr| Aarch64Fault {
            va,
            access,
            kind,
            level,
            entry_addr: None,
            entry: None,
            ttbr,
        };
        if self.regs.sctlr & SCTLR_M == 0 {
            // Stage 1 off: the output is the VA (its top byte dropped
            // under TBI), which must fit the PA size (an address size
            // fault at level 0).
            let Some(pa) = self.mmu_off_output(v, access) else {
                return Err(fault(Aarch64FaultKind::AddressSize, 0, None));
            };
            return Ok(Aarch64Translation {
                va,
                pa: GuestPhysAddr(pa),
                page_size: 1 << self.tcr.tg0.shift(),
                level: None,
                ttbr: None,
                permissions: Permissions::no_paging(),
                attributes: Aarch64Attributes::default(),
                memory_refs: 0,
            });
        }
        let (ttbr, fmt) = self
            .select(v, access)
            .map_err(|(kind, ttbr)| fault(kind, 0, Some(ttbr)))?;
        let mut port = DirectPort { mem, refs: 0 };
        let start = Start {
            level: fmt.layout.top,
            table: fmt.root,
            acc: fmt.acc_start(),
        };
        let walked = engine::walk(
            fmt,
            &mut port,
            v,
            access,
            false,
            options.set_accessed_dirty,
            start,
        );
        match walked {
            Ok(w) => Ok(Aarch64Translation {
                va,
                pa: GuestPhysAddr(w.base | (v & ((1u64 << w.shift) - 1))),
                page_size: 1 << w.shift,
                level: Some(arch_level(w.leaf_level)),
                ttbr: Some(ttbr),
                permissions: fmt.permissions(w.acc, w.leaf),
                attributes: Aarch64Attributes::of(w.leaf, self.regs.mair, fmt.sh),
                memory_refs: port.refs,
            }),
            Err(Fail::Stop(s)) => Err(Aarch64Fault {
                kind: classify(fmt, s.reason, s.entry),
                level: arch_level(s.level),
                entry_addr: s.entry_addr.map(GuestPhysAddr),
                entry: s.entry,
                ..fault(Aarch64FaultKind::Translation, 0, Some(ttbr))
            }),
            // A direct port raises no port faults; keep the walk total.
            Err(Fail::Port(w)) => Err(Aarch64Fault {
                level: arch_level(w.level),
                ..fault(Aarch64FaultKind::Contended, 0, Some(ttbr))
            }),
        }
    }
}

/// The architectural fault for an engine stop (see the module comment).
fn classify(fmt: &S1Format, reason: FaultReason, entry: Option<u64>) -> Aarch64FaultKind {
    match reason {
        FaultReason::Reserved { .. } => Aarch64FaultKind::AddressSize,
        FaultReason::Permission => match entry {
            Some(e) if e & AF == 0 && !fmt.ha => Aarch64FaultKind::AccessFlag,
            _ => Aarch64FaultKind::Permission,
        },
        FaultReason::Unbacked { pa } => Aarch64FaultKind::Unbacked { pa },
        FaultReason::ReadOnlyTable => Aarch64FaultKind::ReadOnlyTable,
        FaultReason::Contended => Aarch64FaultKind::Contended,
        _ => Aarch64FaultKind::Translation,
    }
}

/// What `Walker`'s AArch64 first level needs of the regime (and this
/// walker itself): the range an address selects, and a stop turned into
/// the architectural fault.
impl Aarch64Walker {
    /// Whether stage 1 is on (SCTLR_EL1.M).
    #[inline]
    pub(crate) fn mmu_on(&self) -> bool {
        self.regs.sctlr & SCTLR_M != 0
    }

    /// The width of an output address with the MMU off: the PA size.
    pub(crate) fn pa_bits(&self) -> u8 {
        self.regs.pa_bits
    }

    /// The output address of `va` with stage 1 off, or `None` for the
    /// address size fault (level 0) it takes: `AArch64.S1DisabledOutput`
    /// checks `va<AddrTop:PAMax>` (AddrTop 55 under TBI, which TBID limits
    /// to data accesses, else 63) and outputs `va<51:0>`.
    pub(crate) fn mmu_off_output(&self, va: u64, access: Access) -> Option<u64> {
        let upper = va & (1 << 55) != 0;
        let t = &self.tcr;
        let (tbi, tbid) = if upper {
            (t.tbi1, t.tbid1)
        } else {
            (t.tbi0, t.tbid0)
        };
        let top = if tbi && !(tbid && access.is_fetch()) {
            55
        } else {
            63
        };
        (va & bits(u32::from(self.regs.pa_bits), top) == 0).then_some(va & bits(0, 51))
    }

    /// The range (TTBR) `va` selects for `access` and its format, or the
    /// level-0 fault (kind) that selecting it raises. VA bit 55 selects
    /// the range; the bits above the range's size must all equal it (bits
    /// 63:56 are ignored under TBI, which TBID limits to data accesses).
    /// Outside both ranges, an EL0 access to a range E0PDn closes, or in a
    /// range whose walks EPDn disables: a translation fault at level 0 (`AArch64.S1Walk`; v8.0
    /// `AArch64.TranslationTableWalk`: "level = 0; AArch32 reports this as
    /// a level 1 fault"). A root above the OA size: an address size fault
    /// at level 0.
    #[inline]
    pub(crate) fn select(
        &self,
        va: u64,
        access: Access,
    ) -> Result<(Ttbr, &S1Format), (Aarch64FaultKind, Ttbr)> {
        let fmt = self.range_format(va);
        let r = &fmt.range;
        let ttbr = if r.upper { Ttbr::Ttbr1 } else { Ttbr::Ttbr0 };
        // TBI ignores bits 63:56 (TBID: for data accesses only).
        let range = if r.tbi && !(r.tbid && access.is_fetch()) {
            r.bits55
        } else {
            r.bits63
        };
        let want = if r.upper { range } else { 0 };
        if va & range != want || (access.is_user() && fmt.e0pd) || r.disabled {
            return Err((Aarch64FaultKind::Translation, ttbr));
        }
        if r.root_excess != 0 {
            return Err((Aarch64FaultKind::AddressSize, ttbr));
        }
        Ok((ttbr, fmt))
    }

    /// The enabled ranges, in address order, each with its format and its
    /// lowest address: what a listing of every mapping walks.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = (&S1Format, u64)> {
        let lo = (!self.tcr.epd0).then_some((&self.lo, 0));
        let hi = (!self.tcr.epd1).then_some((&self.hi, !0u64 << self.hi.layout.ia_bits));
        lo.into_iter().chain(hi)
    }

    /// Whether translations of `va` may be cached: not a tagged address
    /// (top byte unlike bit 55). A tagged address translates as its
    /// untagged page, which TLBI by VA (`VA[55:12]`) invalidates whatever
    /// the tag, so a cache entry of its own would outlive the page's
    /// invalidation; under TBID only data accesses may use it at all.
    pub(crate) fn cacheable(&self, va: u64) -> bool {
        let sign = if va & (1 << 55) != 0 { 0xff } else { 0 };
        va >> 56 == sign
    }

    /// The architectural fault (kind and level) for an engine stop in
    /// `fmt`'s walk.
    pub(crate) fn stop_fault(
        &self,
        fmt: &S1Format,
        reason: FaultReason,
        level: u8,
        entry: Option<u64>,
    ) -> (Aarch64FaultKind, i8) {
        (classify(fmt, reason, entry), arch_level(level))
    }

    /// The attributes reported for the leaf `leaf` of `fmt`'s range.
    #[inline]
    pub(crate) fn attributes_in(&self, fmt: &S1Format, leaf: u64) -> Aarch64Attributes {
        Aarch64Attributes::of(leaf, self.regs.mair, fmt.sh)
    }

    /// The space key's words for these registers (see `Walker`): the two
    /// roots, TCR_EL1, and the PA size, the LVA/LPA2 features and
    /// SCTLR_EL1.M.
    pub(crate) fn key_words(&self) -> [u64; 4] {
        let r = &self.regs;
        [
            r.ttbr0,
            r.ttbr1,
            r.tcr,
            1 << 63
                | u64::from(self.mmu_on())
                | u64::from(r.lva) << 1
                | u64::from(r.lpa2) << 2
                | u64::from(r.pa_bits) << 8,
        ]
    }

    /// The permission-check settings outside the space key: WXN, PAN and
    /// EPAN.
    pub(crate) fn check_bits(&self) -> u128 {
        let sctlr = self.regs.sctlr;
        u128::from(sctlr & SCTLR_WXN != 0)
            | u128::from(self.regs.pan) << 1
            | u128::from(sctlr & SCTLR_EPAN != 0) << 2
    }
}

impl Aarch64Walker {
    /// The format of the range bit 55 of `va` selects (without the range
    /// checks of [`Aarch64Walker::select`]).
    #[inline(always)]
    pub(crate) fn range_format(&self, va: u64) -> &S1Format {
        if va & (1 << 55) != 0 {
            &self.hi
        } else {
            &self.lo
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: known-small values.
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::{
        super::{
            format::Format,
            lean::{self, RootWalk},
            second::root_start,
        },
        Aarch64Paging, Aarch64Walker, S1Format,
    };
    use crate::{
        paging::{Access, AccessKind, Privilege},
        GuestMemory, GuestPhysAddr,
    };

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Memory of the random tables.
    const MEM: u64 = 256 << 10;

    /// A descriptor that is mostly usable: a table, page or block (or an
    /// invalid type) at an address in memory (sometimes anywhere below
    /// 2^52), with sparse random attribute, table-restriction and 52-bit
    /// address bits.
    fn descriptor(rng: &mut Rng) -> u64 {
        let ty = [3, 3, 3, 3, 1, 1, 0, 2][rng.below(8) as usize];
        let addr = if rng.below(16) == 0 {
            rng.next() & super::bits(12, 51)
        } else {
            rng.below(MEM) & !0xfff
        };
        let sparse = rng.next() & rng.next() & rng.next();
        (sparse & (super::bits(2, 11) | super::bits(48, 63))) | addr | ty
    }

    /// Each range's lean walk from the root answers exactly what the
    /// generic lean walk does from the root, for random tables under
    /// random registers (every granule, TxSZ, OA size, DS and LPA layout,
    /// HPD, WXN, PAN, EPAN, HA/HD, E0PD), for every access.
    #[test]
    fn root_walk_matches_the_generic_lean_walk() {
        let mut rng = Rng(0x05ee_da64);
        let mut walks = 0u32;
        let mut answered = 0u32;
        for _ in 0..400 {
            let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
            for i in 0..MEM / 8 {
                mem.write_obj(GuestPhysAddr(i * 8), descriptor(&mut rng))
                    .unwrap();
            }
            let tg0 = [0b00u64, 0b01, 0b10][rng.below(3) as usize];
            let tg1 = [0b01u64, 0b10, 0b11][rng.below(3) as usize];
            let t0 = 12 + rng.below(28);
            let t1 = 12 + rng.below(28);
            let flags = rng.next()
                & (1 << 37 | 1 << 38 | 1 << 39 | 1 << 40 | 1 << 41 | 1 << 42 | 1 << 55 | 1 << 56);
            let ds = if rng.below(2) == 0 { 1 << 59 } else { 0 };
            let tcr = t0 | tg0 << 14 | t1 << 16 | tg1 << 30 | rng.below(7) << 32 | flags | ds;
            let wide = rng.below(2) == 0;
            let regs = Aarch64Paging {
                tcr,
                ttbr0: rng.below(MEM) & !0xfff,
                ttbr1: rng.below(MEM) & !0xfff,
                sctlr: 1 | (rng.next() & (1 << 19 | 1 << 57)),
                mair: rng.next(),
                pan: rng.below(2) == 0,
                pa_bits: [32u8, 40, 48, 52][rng.below(4) as usize],
                lva: wide,
                lpa2: wide,
            };
            let Ok(w) = Aarch64Walker::new(regs) else {
                continue;
            };
            let formats: [&S1Format; 2] = [&w.lo, &w.hi];
            for _ in 0..128 {
                let va = rng.next();
                for fmt in formats {
                    for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                        for privilege in [Privilege::User, Privilege::Supervisor] {
                            let access = Access::new(kind, privilege);
                            let got = lean::walk_root(fmt, &mem, va, access);
                            let want = lean::walk(fmt, &mem, va, access, root_start(fmt), None);
                            assert_eq!(got, want, "{regs:x?} {va:#x} {access:?}");
                            walks += 1;
                            answered += u32::from(got.is_some());
                            assert_eq!(fmt.lean_root(), fmt.root);
                        }
                    }
                }
            }
        }
        // The draw reaches both answers.
        assert!(answered > walks / 50, "{answered} of {walks}");
    }

    /// The precomputed permission sets give `check`'s verdict for any leaf,
    /// table restrictions and access, under any WXN, PAN, EPAN, E0PD, HA
    /// and HD.
    #[test]
    fn lean_allows_is_checks_verdict() {
        let mut rng = Rng(0x00a1_10e5);
        for _ in 0..256 {
            let flags = rng.next() & (1 << 39 | 1 << 40 | 1 << 55 | 1 << 56);
            let regs = Aarch64Paging {
                tcr: 16 | 16 << 16 | 0b10 << 30 | 0b101 << 32 | flags,
                sctlr: 1 | (rng.next() & (1 << 19 | 1 << 57)),
                pan: rng.below(2) == 0,
                ..Aarch64Paging::new(super::Granule::K4, 0, 0)
            };
            let w = Aarch64Walker::new(regs).unwrap();
            for fmt in [&w.lo, &w.hi] {
                for _ in 0..256 {
                    let leaf = rng.next();
                    let acc = rng.next() & 0xfff;
                    for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                        for privilege in [
                            Privilege::User,
                            Privilege::Supervisor,
                            Privilege::SupervisorImplicit,
                        ] {
                            let access = Access::new(kind, privilege);
                            assert_eq!(
                                fmt.lean_allows(acc, leaf, access),
                                fmt.check(acc, leaf, access, false).is_ok(),
                                "{regs:x?} {leaf:#x} {acc:#x} {access:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
