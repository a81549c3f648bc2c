//! AArch64 stage 2 of the EL1&0 regime (VTCR_EL2, VTTBR_EL2): the
//! configuration a VMM states ([`Aarch64Stage2`]) and its checks ([`Vtcr`],
//! refusing values whose walk is undefined), the stage-2 descriptor format
//! as a `Format` for the shared walk engine (`S2Format`: concatenated start
//! tables, S2AP, XN with FEAT_XNX, AF with HA, DBM with HD, 52-bit output
//! addresses with FEAT_LPA/FEAT_LPA2, the leaf's attributes as
//! [`Aarch64Stage2Attributes`]), and a stage-2 abort as the hypervisor sees
//! it: the fault kind and level (`S2Format::s2_fault`), ESR_EL2
//! ([`esr_el2`]) and HPFAR_EL2 ([`hpfar_el2`]). `second.rs` runs it under
//! a stage-1 walk; this file knows nothing of stage 1 beyond the layout and
//! fault codes the two share (`aarch64.rs`).
//!
//! Engine levels are as at stage 1: engine level `e` is architectural
//! level `4 - e`, and a stop at engine level 0 is one `check_input` raised
//! before any table was read (an IPA above the input size, a VTTBR_EL2
//! base above the OA size), both reported at level 0.
//!
//! Reference: Arm ARM DDI 0487, D8 (VMSAv8-64), the pseudocode
//! `AArch64.S2Translate` (an IPA above the input size: translation fault,
//! level 0; the AF check before the permission check), `AArch64.S2Walk`
//! (a VTTBR_EL2 base above the OA size: address size fault, level 0),
//! `AArch64.S2StartLevel`, `AArch64.S2InvalidSL`, `AArch64.S2InconsistentSL`
//! and `AArch64.S2MinTxSZ` (which `Aarch64Stage2::decode` refuses instead
//! of faulting every walk), `AArch64.S2CheckPermissions` (S2AP; `XN[1:0]`
//! with FEAT_XNX; execute does not need read with EL2 in AArch64), the
//! VTCR_EL2, ESR_EL2 and HPFAR_EL2 register descriptions; QEMU's
//! `target/arm/ptw.c` (`check_s2_mmu_setup`, `get_S2prot`) agrees.
//! Not modelled: HCR_EL2.FWB's combining of attributes (MemAttr is
//! reported raw), the contiguous hint (reported), FEAT_S2PIE/S2POE,
//! FEAT_D128, FEAT_HAFT and FEAT_HDBSS (refused when enabled), Secure
//! stage 2 (VSTCR_EL2).

use super::{
    arch_level, fault_status,
    regs::{check_base, check_pa_bits, oa_size, table_bytes, Aarch64PagingError, Granule},
    Aarch64FaultKind, Layout, AF, CONTIGUOUS, DBM,
};
use crate::addr::GuestPhysAddr;
use crate::paging::{
    engine::{self, DirectPort, Fail},
    fault::FaultReason,
    format::{bits, Decoded, Denied, Format},
    memory::PhysMemory,
    types::{Access, AccessKind, LeafAttributes, Permissions, WalkOptions},
};

/// VTCR_EL2.HA: hardware sets the stage-2 access flag.
pub const VTCR_HA: u64 = 1 << 21;
/// VTCR_EL2.HD: hardware manages stage-2 dirty state (DBM), only with HA.
pub const VTCR_HD: u64 = 1 << 22;
/// VTCR_EL2.DS: 52-bit IPAs and OAs with 4/16 KiB granules (FEAT_LPA2).
pub const VTCR_DS: u64 = 1 << 32;
/// VTCR_EL2.SL2: with DS and the 4 KiB granule, SL2 = 1 and SL0 = 0 start
/// the walk at level -1.
pub const VTCR_SL2: u64 = 1 << 33;

/// VTCR_EL2 fields of features this walker does not model: set, the walk
/// differs, so the configuration is refused.
const VTCR_UNMODELLED: [(u32, &str); 9] = [
    (34, "VTCR_EL2.AssuredOnly"),
    (35, "VTCR_EL2.TL1"),
    (36, "VTCR_EL2.S2PIE"),
    (37, "VTCR_EL2.S2POE"),
    (38, "VTCR_EL2.D128"),
    (40, "VTCR_EL2.GCSH"),
    (41, "VTCR_EL2.TL0"),
    (44, "VTCR_EL2.HAFT"),
    (45, "VTCR_EL2.HDBSS"),
];

/// Stage-2 descriptor bits: `S2AP[0]` (read), `S2AP[1]` (write), `XN[0]`
/// (FEAT_XNX), `XN[1]`.
const S2AP_R: u64 = 1 << 6;
const S2AP_W: u64 = 1 << 7;
const XN0: u64 = 1 << 53;
const XN1: u64 = 1 << 54;

/// Where the accumulated word keeps the leaf's engine level (stage 2 has
/// no hierarchical permissions to fold).
const ACC_LEAF: u32 = 8;

/// A VM's stage 2, as a VMM (or a nested hypervisor's registers) states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Aarch64Stage2 {
    /// VTCR_EL2: T0SZ (bits 5:0, the IPA size is `64 - T0SZ` bits), SL0
    /// (7:6, the start level), SH0 (13:12), TG0 (15:14, the granule, as
    /// TCR_EL1.TG0), PS (18:16, the output size, as TCR_EL1.IPS), HA (21),
    /// HD (22), DS (32, FEAT_LPA2) and SL2 (33). The cacheability fields,
    /// VS and the Secure fields are not read; fields of features this walker
    /// does not model (S2PIE, S2POE, D128, HAFT, HDBSS, AssuredOnly, TL0,
    /// TL1, GCSH) are refused when set.
    pub vtcr: u64,
    /// VTTBR_EL2: the start table (tables, when concatenated) in bits 47:1
    /// (with a 52-bit layout, `BADDR[51:48]` in bits 5:2), CnP in bit 0,
    /// the VMID in 63:48. An address in the walker's memory.
    pub vttbr: u64,
    /// The implemented physical-address size in bits
    /// (ID_AA64MMFR0_EL1.PARange): 32, 36, 40, 42, 44, 48, or 52 with
    /// FEAT_LPA.
    pub pa_bits: u8,
    /// FEAT_XNX (ID_AA64MMFR1_EL1.XNX): descriptor bit 53 (`XN[0]`) splits
    /// execute permission between EL0 and EL1; without it only bit 54 is
    /// read and it forbids both.
    pub xnx: bool,
    /// FEAT_LPA2: VTCR_EL2.DS and SL2 may be set.
    pub lpa2: bool,
    /// FEAT_TTST: small IPA spaces (T0SZ up to 48, 47 with 64 KiB), and
    /// SL0 = 0b11 with the 4 KiB granule starts at level 3.
    pub ttst: bool,
}

impl Aarch64Stage2 {
    /// A stage 2 of `ipa_bits` bits with `granule`, as KVM lays one out:
    /// the fewest levels, but at least two, the start level's tables
    /// concatenated (up to 16) rather than one more level; PS 48 bits and a 48-bit PA size (52,
    /// with FEAT_LPA, when `ipa_bits` is above 48; with the 4/16 KiB
    /// granules also DS and FEAT_LPA2); no HA, HD, XNX or TTST. `vttbr` is
    /// the register (the start table, VMID). An `ipa_bits` no start level
    /// can resolve gives a configuration [`Aarch64Stage2::decode`] refuses.
    pub const fn new(granule: Granule, ipa_bits: u8, vttbr: u64) -> Self {
        let gs = granule.shift();
        let stride = granule.stride();
        let ia = ipa_bits as u32;
        // Levels below the start table: it resolves up to stride + 4 bits.
        let rest = ia.saturating_sub(gs + stride + 4);
        let start: i8 = match rest.div_ceil(stride) {
            0 | 1 => 2,
            2 => 1,
            3 => 0,
            _ => -1,
        };
        let wide = ipa_bits > 48;
        let ds = wide && !matches!(granule, Granule::K64);
        let (sl0, sl2) = match (granule, start) {
            (Granule::K4, -1) => (0, true),
            (Granule::K4, 3) => (3, false),
            (Granule::K4, s) => ((2 - s) as u64, false),
            (_, s) => ((3 - s) as u64, false),
        };
        let vtcr = (64 - ipa_bits as u64) & 0x3f
            | (sl0 << 6)
            | (granule.tg0() << 14)
            | (if wide { 0b110 } else { 0b101 } << 16)
            | if ds { VTCR_DS } else { 0 }
            | if sl2 { VTCR_SL2 } else { 0 };
        Aarch64Stage2 {
            vtcr,
            vttbr,
            pa_bits: if wide { 52 } else { 48 },
            xnx: false,
            lpa2: ds,
            ttst: false,
        }
    }

    /// The VMID (16 bits; a VMM using 8-bit VMIDs masks it).
    pub const fn vmid(&self) -> u16 {
        (self.vttbr >> 48) as u16
    }

    /// VTCR_EL2 as the walk reads it, refusing values whose walk the
    /// architecture leaves undefined or makes a fault on every access (with
    /// the field named): unmodelled features, DS without FEAT_LPA2, SL2
    /// where it is RES0, a reserved TG0, T0SZ outside `AArch64.S2MinTxSZ`
    /// (64 minus the largest PA size the granule can express) ..=
    /// `AArch64.MaxTxSZ`, a start level `AArch64.S2InvalidSL` or
    /// `AArch64.S2InconsistentSL` rejects (reserved, needing a larger PA
    /// size or a feature, or needing more than 16 concatenated tables or
    /// none), and a VTTBR_EL2 base not aligned to its (concatenated) start
    /// table. PS above the implemented PA size behaves as that size, as
    /// the architecture has it, and is not refused.
    pub fn decode(&self) -> Result<Vtcr, Aarch64PagingError> {
        let v = self.vtcr;
        for (bit, field) in VTCR_UNMODELLED {
            if v & (1 << bit) != 0 {
                return Err(Aarch64PagingError::Unsupported { field });
            }
        }
        let pa_bits = check_pa_bits(self.pa_bits)?;
        let ds = v & VTCR_DS != 0;
        if ds && !self.lpa2 {
            return Err(Aarch64PagingError::FeatureAbsent {
                field: "VTCR_EL2.DS",
                feature: "FEAT_LPA2",
            });
        }
        let tg = (v >> 14) & 3;
        let granule = Granule::from_tg0(tg).ok_or(Aarch64PagingError::ReservedGranule {
            field: "VTCR_EL2.TG0",
            value: tg as u8,
        })?;
        // DS applies to the 4 KiB and 16 KiB granules only.
        let lpa2 = ds && granule != Granule::K64;
        let sl2 = v & VTCR_SL2 != 0;
        if sl2 && !(lpa2 && granule == Granule::K4) {
            return Err(Aarch64PagingError::Res0Field {
                field: "VTCR_EL2.SL2",
            });
        }
        let t0sz = (v & 0x3f) as u8;
        // `AArch64.S2MinTxSZ`: 64 minus the largest PA size the granule's
        // descriptors can express on this processor.
        let max_pa = if pa_bits == 52 && (granule == Granule::K64 || lpa2) {
            52
        } else {
            pa_bits.min(48)
        };
        let (min, max) = (64 - max_pa, max_txsz(granule, self.ttst));
        if !(min..=max).contains(&t0sz) {
            return Err(Aarch64PagingError::TxSz {
                field: "VTCR_EL2.T0SZ",
                value: t0sz,
                min,
                max,
            });
        }
        let sl0 = ((v >> 6) & 3) as u8;
        let ia_bits = 64 - u32::from(t0sz);
        let refused = Aarch64PagingError::StartLevel {
            sl0,
            sl2,
            t0sz,
            granule,
        };
        let start = start_level(granule, sl0, sl2, lpa2, pa_bits, self.ttst).ok_or(refused)?;
        // `AArch64.S2InconsistentSL`: the start level resolves at least one
        // bit and at most a table's worth and 16 concatenated tables.
        let (gs, stride) = (granule.shift(), granule.stride());
        let levels = (3 - start) as u32;
        let sl_min = levels * stride + gs + 1;
        if ia_bits < sl_min || ia_bits > sl_min + (stride - 1) + 4 {
            return Err(refused);
        }
        let oa_bits = oa_size((v >> 16) & 7, pa_bits);
        let wide = lpa2 || (granule == Granule::K64 && oa_bits == 52);
        let root = check_base(
            "VTTBR_EL2",
            self.vttbr,
            wide,
            table_bytes(granule, ia_bits, start),
        )?;
        Ok(Vtcr {
            t0sz,
            granule,
            start_level: start,
            concatenated: 1 << ia_bits.saturating_sub(sl_min - 1 + stride),
            oa_bits,
            ha: v & VTCR_HA != 0,
            hd: v & VTCR_HD != 0 && v & VTCR_HA != 0,
            ds: lpa2,
            sh0: ((v >> 12) & 3) as u8,
            root: GuestPhysAddr(root),
        })
    }
}

/// `AArch64.MaxTxSZ`: 39, or with FEAT_TTST 48 (47 with 64 KiB).
fn max_txsz(granule: Granule, ttst: bool) -> u8 {
    match (ttst, granule) {
        (false, _) => 39,
        (true, Granule::K64) => 47,
        (true, _) => 48,
    }
}

/// `AArch64.S2StartLevel`, or `None` where `AArch64.S2InvalidSL` rejects
/// the encoding (reserved, or needing a larger PA size or a feature).
fn start_level(g: Granule, sl0: u8, sl2: bool, ds: bool, pa_bits: u8, ttst: bool) -> Option<i8> {
    match (g, sl2, sl0) {
        (Granule::K4, true, 0) if pa_bits >= 52 => Some(-1),
        (Granule::K4, true, _) => None,
        (Granule::K4, false, 0) => Some(2),
        (Granule::K4, false, 1) => Some(1),
        (Granule::K4, false, 2) if pa_bits >= 44 => Some(0),
        (Granule::K4, false, 3) if ttst => Some(3),
        (Granule::K16, _, 0) | (Granule::K64, _, 0) => Some(3),
        (Granule::K16, _, 1) | (Granule::K64, _, 1) => Some(2),
        (Granule::K16, _, 2) if pa_bits >= 42 => Some(1),
        (Granule::K64, _, 2) if pa_bits >= 44 => Some(1),
        (Granule::K16, _, 3) if ds && pa_bits >= 52 => Some(0),
        _ => None,
    }
}

/// VTCR_EL2 as the walk reads it, checked by [`Aarch64Stage2::decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Vtcr {
    /// T0SZ: the IPA space is `2^(64 - t0sz)` bytes.
    pub t0sz: u8,
    /// TG0.
    pub granule: Granule,
    /// The architectural start level (-1..=3), from SL0 (and SL2).
    pub start_level: i8,
    /// How many tables the start level concatenates (1..=16).
    pub concatenated: u32,
    /// The output-address size in force: PS capped at the implemented PA
    /// size.
    pub oa_bits: u8,
    /// HA.
    pub ha: bool,
    /// HD, in effect only with HA (false when HA is clear).
    pub hd: bool,
    /// DS in effect (4/16 KiB granules): LPA2 descriptors.
    pub ds: bool,
    /// SH0: with DS, the shareability of every page (descriptor bits 9:8
    /// are address bits).
    pub sh0: u8,
    /// The start table's address (from VTTBR_EL2).
    pub root: GuestPhysAddr,
}

/// What a stage-2 leaf says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Aarch64Stage2Attributes {
    /// MemAttr (bits 5:2): with HCR_EL2.FWB clear, bits 3:2 the memory type
    /// (0b00 Device, else outer cacheability) and bits 1:0 the Device type
    /// or inner cacheability; with FWB, a combined encoding. Raw.
    pub mem_attr: u8,
    /// `SH[1:0]` (bits 9:8; with VTCR_EL2.DS, VTCR_EL2.SH0).
    pub shareability: u8,
    /// `S2AP[1:0]` (bits 7:6): bit 0 read, bit 1 write.
    pub s2ap: u8,
    /// `XN[1:0]` (bits 54:53; bit 53 means something only with FEAT_XNX).
    pub xn: u8,
    /// The access flag (bit 10).
    pub accessed: bool,
    /// DBM (bit 51): writable-clean when `S2AP[1]` is clear and
    /// VTCR_EL2.HD is on.
    pub dbm: bool,
    /// The contiguous hint (bit 52): reported, not used to size the page.
    pub contiguous: bool,
}

/// What a stage-2 translation was for, as ESR_EL2 reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage2Access {
    /// The access's own IPA (the output of stage 1).
    Final,
    /// A read of a stage-1 descriptor during the stage-1 walk (S1PTW).
    TableRead,
    /// A hardware update of a stage-1 descriptor (its access flag or dirty
    /// state, under TCR_EL1.HA/HD): S1PTW, and a write.
    TableUpdate,
}

/// The ESR_EL2 value of a stage-2 abort taken to EL2 from EL0/EL1: EC 0x20
/// (instruction abort from a lower EL) for a fetch, 0x24 (data abort from
/// a lower EL) otherwise, also when the stage-2 fault was on the fetch's
/// stage-1 table walk; IL set; ISV clear (no instruction syndrome: the
/// emulator does not decode the instruction); S1PTW (bit 7) when `site` is
/// a stage-1 descriptor access; WnR (bit 6, data aborts only: RES0 in an
/// instruction abort) for a write of the access itself, or for a stage-2
/// fault on a hardware update of a stage-1 descriptor, and clear for one
/// on a descriptor read (the pseudocode's fault records the descriptor
/// access, whose `write` is set only for the update; KVM's
/// `kvm_is_write_fault` does not trust WnR with S1PTW and decides from the
/// fault status code instead); the fault status code with `level` (-1..=3;
/// level -1 only for translation and address size faults). `None` for the
/// kinds without a code ([`Aarch64FaultKind::Unbacked`] and the emulator's
/// own refusals) and for a level no such fault reports.
pub fn esr_el2(
    kind: Aarch64FaultKind,
    level: i8,
    access: AccessKind,
    site: Stage2Access,
) -> Option<u64> {
    let fsc = u64::from(fault_status(kind, level)?);
    let s1ptw = site != Stage2Access::Final;
    let (ec, wnr) = match access {
        AccessKind::Fetch => (0x20u64, false),
        AccessKind::Read | AccessKind::Write => (
            0x24,
            match site {
                Stage2Access::Final => access == AccessKind::Write,
                Stage2Access::TableRead => false,
                Stage2Access::TableUpdate => true,
            },
        ),
    };
    Some(ec << 26 | 1 << 25 | u64::from(s1ptw) << 7 | u64::from(wnr) << 6 | fsc)
}

/// The HPFAR_EL2 value for a stage-2 fault on `ipa`: FIPA (bits 47:4) =
/// `IPA[51:12]` (bits 43:4 = `IPA[47:12]` without FEAT_LPA; the IPA is
/// below 2^48 there), NS clear. Hardware writes it for stage-2
/// translation, access flag and address size faults and for any stage-2
/// fault on a stage-1 table walk; for a permission fault on the final IPA
/// it may leave it UNKNOWN (KVM then finds the IPA with an AT
/// instruction), so a VMM emulating that case is free to set it.
pub fn hpfar_el2(ipa: GuestPhysAddr) -> u64 {
    ((ipa.0 >> 12) << 4) & bits(4, 47)
}

/// The stage-2 format of one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct S2Format {
    layout: Layout,
    root: u64,
    ha: bool,
    hd: bool,
    xnx: bool,
    /// With DS: VTCR_EL2.SH0.
    sh: Option<u8>,
}

impl S2Format {
    /// The format `cfg` describes, or why it has no defined walk.
    pub(crate) fn new(cfg: &Aarch64Stage2) -> Result<Self, Aarch64PagingError> {
        let v = cfg.decode()?;
        Ok(S2Format {
            layout: Layout {
                granule: v.granule,
                // The start level is -1..=3: the top level is 1..=5.
                top: (4 - v.start_level) as u8,
                ia_bits: 64 - u32::from(v.t0sz),
                oa_bits: u32::from(v.oa_bits),
                ds: v.ds,
                lpa: v.granule == Granule::K64 && cfg.pa_bits >= 52,
            },
            root: v.root.0,
            ha: v.ha,
            hd: v.hd,
            xnx: cfg.xnx,
            sh: v.ds.then_some(v.sh0),
        })
    }

    /// Execute permission of `leaf`: (EL1, EL0).
    fn execute(&self, leaf: u64) -> (bool, bool) {
        if !self.xnx {
            let x = leaf & XN1 == 0;
            return (x, x);
        }
        match (leaf & XN1 != 0, leaf & XN0 != 0) {
            (false, false) => (true, true),
            (false, true) => (false, true),
            (true, false) => (false, false),
            (true, true) => (true, false),
        }
    }

    /// Whether `leaf` allows `access`: `S2AP[0]` reads, `S2AP[1]` writes (or
    /// DBM under HD, for a write), XN fetches at the access's EL
    /// (`Privilege::User` is EL0). A fetch needs no read permission.
    fn allows(&self, leaf: u64, access: Access) -> bool {
        match access.kind {
            AccessKind::Read => leaf & S2AP_R != 0,
            AccessKind::Write => leaf & S2AP_W != 0 || (self.hd && leaf & DBM != 0),
            AccessKind::Fetch => {
                let (el1, el0) = self.execute(leaf);
                if access.is_user() {
                    el0
                } else {
                    el1
                }
            }
        }
    }

    /// The leaf's attributes.
    pub(crate) fn attributes(&self, leaf: u64) -> Aarch64Stage2Attributes {
        Aarch64Stage2Attributes {
            mem_attr: ((leaf >> 2) & 0xf) as u8,
            shareability: self.sh.unwrap_or(((leaf >> 8) & 3) as u8),
            s2ap: ((leaf >> 6) & 3) as u8,
            xn: ((leaf >> 53) & 3) as u8,
            accessed: leaf & AF != 0,
            dbm: leaf & DBM != 0,
            contiguous: leaf & CONTIGUOUS != 0,
        }
    }

    /// The leaf's attributes in the shared shape (for `second.rs`'s
    /// `SecondTranslation`): accessed = AF, dirty =
    /// writable with DBM set (written since hardware or software cleaned
    /// it), `memory_type` = MemAttr.
    #[allow(dead_code)] // Until `second.rs` runs stage 2 under stage 1.
    pub(crate) fn leaf_attributes(&self, leaf: u64) -> LeafAttributes {
        LeafAttributes {
            accessed: leaf & AF != 0,
            dirty: leaf & DBM != 0 && leaf & S2AP_W != 0,
            memory_type: Some(((leaf >> 2) & 0xf) as u8),
            ..LeafAttributes::default()
        }
    }

    /// The architectural fault of a stage-2 stop: the engine's `reason`,
    /// engine `level` and the `entry` it stopped at, as the fault kind and
    /// the architectural level (-1..=3) ESR_EL2 reports. A stop at engine
    /// level 0 comes from [`Format::check_input`]: an IPA above the input
    /// size (translation fault) or a VTTBR_EL2 base above the OA size
    /// (address size fault), both at level 0. Otherwise: not present is a
    /// translation fault, "reserved" (an output address above the OA size)
    /// an address size fault, a denied leaf an access flag fault when its
    /// AF is clear without HA (checked before permissions) or else a
    /// permission fault; a table outside memory, a read-only image and
    /// lost update races keep their emulator kinds.
    pub(crate) fn s2_fault(
        &self,
        reason: FaultReason,
        level: u8,
        entry: Option<u64>,
    ) -> (Aarch64FaultKind, i8) {
        let kind = match reason {
            FaultReason::Reserved { .. } => Aarch64FaultKind::AddressSize,
            FaultReason::Permission => match entry {
                Some(e) if e & AF == 0 && !self.ha => Aarch64FaultKind::AccessFlag,
                _ => Aarch64FaultKind::Permission,
            },
            FaultReason::Unbacked { pa } => Aarch64FaultKind::Unbacked { pa },
            FaultReason::ReadOnlyTable => Aarch64FaultKind::ReadOnlyTable,
            FaultReason::Contended => Aarch64FaultKind::Contended,
            _ => Aarch64FaultKind::Translation,
        };
        if level == 0 {
            return (kind, 0);
        }
        (kind, arch_level(level))
    }
}

impl Format for S2Format {
    #[inline]
    fn top_level(&self) -> u8 {
        self.layout.top
    }

    #[inline]
    fn root(&self) -> u64 {
        self.root
    }

    #[inline]
    fn wide(&self) -> bool {
        true
    }

    /// An IPA above the input size is a translation fault, and a VTTBR_EL2
    /// base above the OA size an address size fault, both at level 0 and
    /// before any table is read (`AArch64.S2Translate`, `AArch64.S2Walk`).
    #[inline]
    fn check_input(&self, ipa: u64) -> Result<(), FaultReason> {
        if ipa >> self.layout.ia_bits != 0 {
            return Err(FaultReason::AddressTooWide);
        }
        match self.layout.excess(self.root) {
            0 => Ok(()),
            bits => Err(FaultReason::Reserved { bits }),
        }
    }

    #[inline]
    fn index_shift(&self, level: u8) -> u32 {
        self.layout.index_shift(level)
    }

    #[inline]
    fn entries(&self, level: u8) -> u64 {
        self.layout.entries(level)
    }

    #[inline]
    fn entry_addr(&self, table: u64, level: u8, ipa: u64) -> u64 {
        self.layout.entry_addr(table, level, ipa)
    }

    #[inline]
    fn decode(&self, level: u8, raw: u64) -> Decoded {
        self.layout.decode(level, raw)
    }

    #[inline]
    fn acc_start(&self) -> u64 {
        0
    }

    #[inline]
    fn accumulate(&self, _acc: u64, level: u8, _raw: u64) -> u64 {
        u64::from(level) << ACC_LEAF
    }

    /// `access.privilege` is the EL of the access being translated
    /// (`Privilege::User` = EL0, else EL1): it picks the execute permission
    /// under FEAT_XNX and matters to nothing else. `user_linear` is not
    /// read.
    #[inline]
    fn check(&self, acc: u64, leaf: u64, access: Access, _user_linear: bool) -> Result<(), Denied> {
        // Access flag first: `AArch64.S2Translate` checks it before the
        // permissions; `s2_fault` tells the two apart from the leaf.
        if (leaf & AF == 0 && !self.ha) || !self.allows(leaf, access) {
            return Err(Denied {
                level: ((acc >> ACC_LEAF) & 0xf) as u8,
                reason: FaultReason::Permission,
            });
        }
        Ok(())
    }

    /// As at stage 1: AF set under HA, and `S2AP[1]` set by a write to a
    /// DBM page under HD, only on a walk that does not fault.
    #[inline]
    fn with_accessed(&self, _level: u8, raw: u64, leaf: bool, write: bool) -> u64 {
        if !leaf || !self.ha {
            return raw;
        }
        let mut new = raw | AF;
        if write && self.hd && raw & DBM != 0 {
            new |= S2AP_W;
        }
        new
    }

    fn permissions(&self, _acc: u64, leaf: u64) -> Permissions {
        let (el1, el0) = self.execute(leaf);
        Permissions {
            read: leaf & S2AP_R != 0,
            write: leaf & S2AP_W != 0,
            execute: el1,
            user: true,
            user_execute: el0,
            key: 0,
        }
    }
}

/// A successful stage-2 translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Aarch64Stage2Translation {
    /// The IPA translated.
    pub ipa: GuestPhysAddr,
    /// The output address, in the walker's memory.
    pub pa: GuestPhysAddr,
    /// Size of the page or block (the contiguous hint does not change it).
    pub page_size: u64,
    /// The leaf's architectural level (0..=3).
    pub level: i8,
    /// What the page allows: `read`, `write`, `execute` (at EL1) and
    /// `user_execute` (at EL0; the same as `execute` without FEAT_XNX);
    /// `user` is always set (stage 2 tells data accesses of EL0 and EL1
    /// nothing apart).
    pub permissions: Permissions,
    /// The leaf's attributes.
    pub attributes: Aarch64Stage2Attributes,
    /// Descriptors read and updated.
    pub memory_refs: u32,
}

/// A failed stage-2 translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("AArch64 stage-2 {kind:?} fault at level {level} translating IPA {ipa:#x}")]
pub struct Aarch64Stage2Fault {
    /// The IPA.
    pub ipa: GuestPhysAddr,
    /// The access (its privilege is the EL: `Privilege::User` is EL0).
    pub access: Access,
    /// What went wrong.
    pub kind: Aarch64FaultKind,
    /// The architectural level (-1..=3) the fault is reported at.
    pub level: i8,
    /// The descriptor's address, if one was read.
    pub entry_addr: Option<GuestPhysAddr>,
    /// The descriptor, if one was read.
    pub entry: Option<u64>,
}

impl Aarch64Stage2Fault {
    /// The 6-bit fault status code; `None` for faults with no
    /// architectural code.
    pub fn fsc(&self) -> Option<u8> {
        fault_status(self.kind, self.level)
    }

    /// ESR_EL2 for this fault on a translation made for `site` ([`esr_el2`]).
    pub fn esr_el2(&self, site: Stage2Access) -> Option<u64> {
        esr_el2(self.kind, self.level, self.access.kind, site)
    }

    /// HPFAR_EL2 for this fault ([`hpfar_el2`]).
    pub fn hpfar_el2(&self) -> u64 {
        hpfar_el2(self.ipa)
    }
}

/// A VM's stage 2 on its own, ready to translate IPAs (what a VMM needs to
/// find the memory behind an IPA a guest faulted on; `second.rs` runs the
/// same format under a stage-1 walk).
#[derive(Clone, Copy, Debug)]
pub struct Aarch64Stage2Walker {
    cfg: Aarch64Stage2,
    vtcr: Vtcr,
    fmt: S2Format,
}

impl Aarch64Stage2Walker {
    /// A walker for `cfg`, refusing values whose walk is undefined
    /// ([`Aarch64Stage2::decode`]).
    pub fn new(cfg: Aarch64Stage2) -> Result<Self, Aarch64PagingError> {
        Ok(Aarch64Stage2Walker {
            cfg,
            vtcr: cfg.decode()?,
            fmt: S2Format::new(&cfg)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Aarch64Stage2 {
        &self.cfg
    }

    /// VTCR_EL2 as decoded.
    pub fn vtcr(&self) -> &Vtcr {
        &self.vtcr
    }

    /// Translates `ipa` for `access`, writing nothing.
    pub fn translate<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        ipa: GuestPhysAddr,
        access: Access,
    ) -> Result<Aarch64Stage2Translation, Aarch64Stage2Fault> {
        self.translate_with(mem, ipa, access, WalkOptions::default())
    }

    /// Translates `ipa` for `access` (its privilege the EL of the access);
    /// with `options.set_accessed_dirty`, sets the access flag
    /// (VTCR_EL2.HA) and `S2AP[1]` of a DBM page on a write (VTCR_EL2.HD)
    /// by compare-exchange, as hardware does.
    pub fn translate_with<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        ipa: GuestPhysAddr,
        access: Access,
        options: WalkOptions,
    ) -> Result<Aarch64Stage2Translation, Aarch64Stage2Fault> {
        let f = &self.fmt;
        let fault = |(kind, level): (Aarch64FaultKind, i8), entry_addr: Option<u64>, entry| {
            Aarch64Stage2Fault {
                ipa,
                access,
                kind,
                level,
                entry_addr: entry_addr.map(GuestPhysAddr),
                entry,
            }
        };
        f.check_input(ipa.0)
            .map_err(|r| fault(f.s2_fault(r, 0, None), None, None))?;
        let mut port = DirectPort { mem, refs: 0 };
        let start = engine::Start {
            level: f.top_level(),
            table: f.root(),
            acc: f.acc_start(),
        };
        let set = options.set_accessed_dirty;
        match engine::walk(f, &mut port, ipa.0, access, false, set, start) {
            Ok(w) => Ok(Aarch64Stage2Translation {
                ipa,
                pa: GuestPhysAddr(w.base | (ipa.0 & ((1u64 << w.shift) - 1))),
                page_size: 1 << w.shift,
                level: arch_level(w.leaf_level),
                permissions: f.permissions(w.acc, w.leaf),
                attributes: f.attributes(w.leaf),
                memory_refs: port.refs,
            }),
            Err(Fail::Stop(s)) => Err(fault(
                f.s2_fault(s.reason, s.level, s.entry),
                s.entry_addr,
                s.entry,
            )),
            // A direct port raises no port faults; keep the walk total.
            Err(Fail::Port(w)) => Err(fault(
                (Aarch64FaultKind::Contended, arch_level(w.level)),
                None,
                None,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: table fields are built from small known values.
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;
    use crate::paging::engine::Start;
    use crate::paging::types::Privilege;
    use crate::GuestMemory;

    const MEM: u64 = 8 << 20;
    const TABLE: u64 = 3; // also a level-3 page
    const BLOCK: u64 = 1;
    const RW: u64 = S2AP_R | S2AP_W;

    /// Hand-built stage-2 tables for one granule: tables from 1 MiB up
    /// (the first MiB is left for start tables, 16 concatenated 64 KiB
    /// tables at most).
    struct T {
        mem: GuestMemory,
        g: Granule,
        next: u64,
    }

    impl T {
        fn new(g: Granule) -> Self {
            T {
                mem: GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap(),
                g,
                next: 1 << 20,
            }
        }

        fn alloc(&mut self) -> u64 {
            let t = self.next;
            self.next += 1 << self.g.shift();
            t
        }

        fn rd(&self, pa: u64) -> u64 {
            self.mem.read_obj(GuestPhysAddr(pa)).unwrap()
        }

        fn wr(&self, pa: u64, v: u64) {
            self.mem.write_obj(GuestPhysAddr(pa), v).unwrap();
        }

        /// The index of `ipa` in its level-`level` table (the start table,
        /// all its concatenated tables as one, at `start`).
        fn index(&self, ia: u32, start: i8, level: i8, ipa: u64) -> u64 {
            let shift = self.g.level_shift(level);
            let width = if level == start {
                ia - shift
            } else {
                self.g.stride()
            };
            (ipa >> shift) & ((1 << width) - 1)
        }

        /// Maps `ipa` with `leaf` at `level` under `root`; returns the
        /// leaf's address.
        fn map(&mut self, root: u64, ia: u32, start: i8, ipa: u64, level: i8, leaf: u64) -> u64 {
            let mut table = root;
            for l in start..level {
                let at = table + 8 * self.index(ia, start, l, ipa);
                let e = self.rd(at);
                table = if e & 3 == 3 {
                    e & bits(self.g.shift(), 47)
                } else {
                    let t = self.alloc();
                    self.wr(at, t | TABLE);
                    t
                };
            }
            let at = table + 8 * self.index(ia, start, level, ipa);
            self.wr(at, leaf);
            at
        }
    }

    /// VTCR_EL2 for a granule, T0SZ, SL0 and PS; FEAT_TTST so every SL0
    /// is usable.
    fn cfg(g: Granule, t0sz: u8, sl0: u64, ps: u64, vttbr: u64) -> Aarch64Stage2 {
        Aarch64Stage2 {
            vtcr: u64::from(t0sz) | (sl0 << 6) | (g.tg0() << 14) | (ps << 16),
            vttbr,
            pa_bits: 48,
            xnx: false,
            lpa2: false,
            ttst: true,
        }
    }

    type Walk = Result<(u64, u64, i8, u32), (Aarch64FaultKind, i8, Option<u64>)>;

    /// One walk through the engine and a direct port, faults as
    /// `S2Format::s2_fault` gives them: (output, page size, level,
    /// references) or (kind, level, entry address).
    fn walk(c: &Aarch64Stage2, mem: &GuestMemory, ipa: u64, access: Access, set_ad: bool) -> Walk {
        let f = S2Format::new(c).unwrap();
        if let Err(r) = f.check_input(ipa) {
            let (k, l) = f.s2_fault(r, 0, None);
            return Err((k, l, None));
        }
        let mut port = DirectPort { mem, refs: 0 };
        let start = Start {
            level: f.top_level(),
            table: f.root(),
            acc: f.acc_start(),
        };
        match engine::walk(&f, &mut port, ipa, access, false, set_ad, start) {
            Ok(w) => Ok((
                w.base | (ipa & ((1 << w.shift) - 1)),
                1 << w.shift,
                arch_level(w.leaf_level),
                port.refs,
            )),
            Err(Fail::Stop(s)) => {
                let (k, l) = f.s2_fault(s.reason, s.level, s.entry);
                Err((k, l, s.entry_addr))
            }
            Err(Fail::Port(_)) => panic!("a direct port raises no port faults"),
        }
    }

    fn fault(w: Walk) -> (Aarch64FaultKind, i8) {
        let (k, l, _) = w.unwrap_err();
        (k, l)
    }

    /// The start level each SL0 names, written from the VTCR_EL2
    /// description (4 KiB: 0b11 with FEAT_TTST; 16 KiB 0b11 needs DS; 64
    /// KiB 0b11 is reserved).
    fn named_start(g: Granule, sl0: u64) -> Option<i8> {
        match (g, sl0) {
            (Granule::K4, 0) => Some(2),
            (Granule::K4, 1) => Some(1),
            (Granule::K4, 2) => Some(0),
            (Granule::K4, _) => Some(3),
            (_, 3) => None,
            (_, s) => Some(3 - s as i8),
        }
    }

    /// Every granule with every SL0 and every T0SZ: `decode` accepts
    /// exactly the start levels that resolve the IPA size with one to 16
    /// concatenated tables, and a walk of an IPA in the first, the second
    /// and the last concatenated table maps, one reference per level; the
    /// last table's entry is where concatenation puts it.
    #[test]
    fn every_granule_start_level_and_concatenation() {
        let mut valid = 0;
        for g in [Granule::K4, Granule::K16, Granule::K64] {
            let (gs, stride) = (g.shift(), g.stride());
            for sl0 in 0..4u64 {
                for t0sz in 16..=48u8 {
                    let ia = 64 - u32::from(t0sz);
                    let c = cfg(g, t0sz, sl0, 0b101, 0);
                    let start = named_start(g, sl0);
                    let ok = start.is_some_and(|s| {
                        let resolved = gs + stride * (3 - s) as u32;
                        ia > resolved
                            && ia <= resolved + stride + 4
                            && t0sz <= if g == Granule::K64 { 47 } else { 48 }
                    });
                    let d = c.decode();
                    assert_eq!(d.is_ok(), ok, "{g:?} sl0 {sl0} t0sz {t0sz}: {d:?}");
                    let Ok(v) = d else {
                        assert!(matches!(
                            d,
                            Err(Aarch64PagingError::StartLevel { .. }
                                | Aarch64PagingError::TxSz { .. })
                        ));
                        continue;
                    };
                    valid += 1;
                    let start = v.start_level;
                    assert_eq!(Some(start), named_start(g, sl0));
                    let single = gs + stride * (4 - start) as u32;
                    let tables = 1u64 << ia.saturating_sub(single);
                    assert_eq!(u64::from(v.concatenated), tables);
                    let mut t = T::new(g);
                    // The start tables at 0 (aligned to any size).
                    let c = cfg(g, t0sz, sl0, 0b101, 0);
                    let page = 1u64 << gs;
                    let per_table = 1u64 << stride;
                    let top = g.level_shift(start);
                    let mut ipas = vec![page, (1u64 << ia) - page];
                    if tables > 1 {
                        // Index `per_table`: the second table's first entry.
                        ipas.push(per_table << top);
                    }
                    // (A one-page IPA space has one page.)
                    ipas.dedup();
                    for (k, &ipa) in ipas.iter().enumerate() {
                        let leaf = (0x7000_0000 + (k as u64) * page) | TABLE | AF | RW;
                        t.map(0, ia, start, ipa, 3, leaf);
                    }
                    for (k, &ipa) in ipas.iter().enumerate() {
                        let ctx = format!("{g:?} sl0 {sl0} t0sz {t0sz} ipa {ipa:#x}");
                        let got = walk(&c, &t.mem, ipa + 8, Access::read(), false);
                        let want = (0x7000_0008 + (k as u64) * page, page, 3, (4 - start) as u32);
                        assert_eq!(got, Ok(want), "{ctx}");
                    }
                    // The last IPA's start entry is the last of the last
                    // concatenated table.
                    let entries = 1u64 << (ia - top);
                    assert!(entries == tables * per_table || tables == 1);
                    let last = 8 * (entries - 1);
                    assert_eq!(last, 8 * t.index(ia, start, start, (1u64 << ia) - page));
                    t.wr(last, 0);
                    let got = walk(&c, &t.mem, (1u64 << ia) - page, Access::read(), false);
                    assert_eq!(
                        got,
                        Err((Aarch64FaultKind::Translation, start, Some(last))),
                        "{g:?} sl0 {sl0} t0sz {t0sz}"
                    );
                }
            }
        }
        // 4 KiB: 2 + 16 + ..., enough to know the loops ran.
        assert!(valid > 60, "{valid}");
    }

    /// Blocks where each granule allows them (4 KiB at levels 1 and 2, 16
    /// and 64 KiB at level 2), translation faults elsewhere and for
    /// level-3 0b01.
    #[test]
    fn blocks_where_allowed() {
        // (granule, T0SZ, SL0, start, allowed, refused)
        let cases = [
            (Granule::K4, 16, 2, 0, &[1i8, 2][..], &[0i8][..]),
            (Granule::K16, 16, 2, 1, &[2], &[1]),
            (Granule::K64, 16, 2, 1, &[2], &[1]),
        ];
        for (g, t0sz, sl0, start, ok, bad) in cases {
            let ia = 64 - u32::from(t0sz);
            for &level in ok {
                let mut t = T::new(g);
                let size = 1u64 << g.level_shift(level);
                let ipa = 3 * size;
                t.map(
                    0,
                    ia,
                    start,
                    ipa,
                    level,
                    (5 * size) | BLOCK | AF | RW | CONTIGUOUS,
                );
                let c = cfg(g, t0sz, sl0, 0b101, 0);
                let got = walk(&c, &t.mem, ipa + size - 8, Access::read(), false);
                let refs = (level - start + 1) as u32;
                assert_eq!(got, Ok((6 * size - 8, size, level, refs)), "{g:?} {level}");
                let w = Aarch64Stage2Walker::new(c).unwrap();
                let tr = w
                    .translate(&t.mem, GuestPhysAddr(ipa), Access::read())
                    .unwrap();
                assert!(tr.attributes.contiguous);
                assert_eq!((tr.level, tr.page_size), (level, size));
            }
            for &level in bad {
                let mut t = T::new(g);
                let ipa = 1u64 << g.level_shift(level);
                let at = t.map(0, ia, start, ipa, level, BLOCK | AF | RW);
                let c = cfg(g, t0sz, sl0, 0b101, 0);
                let got = walk(&c, &t.mem, ipa, Access::read(), false);
                assert_eq!(got, Err((Aarch64FaultKind::Translation, level, Some(at))));
            }
            let mut t = T::new(g);
            t.map(0, ia, start, 0, 3, 0x10_0000 | BLOCK | AF | RW);
            let c = cfg(g, t0sz, sl0, 0b101, 0);
            let got = fault(walk(&c, &t.mem, 0, Access::read(), false));
            assert_eq!(got, (Aarch64FaultKind::Translation, 3));
        }
    }

    /// S2AP by read/write/fetch at EL0 and EL1, by every XN value, with and
    /// without FEAT_XNX: a fetch needs no read permission; the reported
    /// permissions agree.
    #[test]
    fn s2ap_and_xn_matrix() {
        let g = Granule::K4;
        let mut t = T::new(g);
        let mut n = 0u64;
        for s2ap in 0..4u64 {
            for xn in 0..4u64 {
                n += 1;
                let ipa = n << 12;
                t.map(
                    0,
                    40,
                    1,
                    ipa,
                    3,
                    0x90_0000 | TABLE | AF | (s2ap << 6) | (xn << 53),
                );
                for xnx in [false, true] {
                    let mut c = cfg(g, 24, 1, 0b101, 0);
                    c.xnx = xnx;
                    // (EL1, EL0) execute: XNX's table, else XN[1] alone.
                    let (x1, x0) = match (xnx, xn) {
                        (false, 0 | 1) | (true, 0) => (true, true),
                        (true, 1) => (false, true),
                        (true, 3) => (true, false),
                        _ => (false, false),
                    };
                    let (r, w) = (s2ap & 1 != 0, s2ap & 2 != 0);
                    for (kind, el0, want) in [
                        (AccessKind::Read, false, r),
                        (AccessKind::Read, true, r),
                        (AccessKind::Write, false, w),
                        (AccessKind::Write, true, w),
                        (AccessKind::Fetch, false, x1),
                        (AccessKind::Fetch, true, x0),
                    ] {
                        let p = if el0 {
                            Privilege::User
                        } else {
                            Privilege::Supervisor
                        };
                        let got = walk(&c, &t.mem, ipa, Access::new(kind, p), false);
                        let ctx = format!("s2ap {s2ap:#b} xn {xn:#b} xnx {xnx} {kind:?} el0 {el0}");
                        if want {
                            assert!(got.is_ok(), "{ctx}: {got:?}");
                        } else {
                            assert_eq!(fault(got), (Aarch64FaultKind::Permission, 3), "{ctx}");
                        }
                    }
                    let tr = Aarch64Stage2Walker::new(c).unwrap().translate(
                        &t.mem,
                        GuestPhysAddr(ipa),
                        Access::read(),
                    );
                    if let Ok(tr) = tr {
                        let p = tr.permissions;
                        assert_eq!((p.read, p.write, p.execute, p.user_execute), (r, w, x1, x0));
                        assert_eq!(
                            (tr.attributes.s2ap, tr.attributes.xn),
                            (s2ap as u8, xn as u8)
                        );
                    }
                }
            }
        }
    }

    /// AF clear: an access flag fault without HA (before the permission
    /// check), allowed with HA, and set by the walk only when asked.
    /// DBM: a write to a writable-clean page under HD (with HA) is allowed
    /// and sets `S2AP[1]`; HD without HA, or no DBM, is a permission fault,
    /// and a faulting walk writes nothing.
    #[test]
    fn access_flag_and_dirty_state() {
        let g = Granule::K16;
        let mut t = T::new(g);
        // 36-bit IPA, start level 2 (SL0 = 1), read-only, no AF, DBM.
        let leaf = 0x100_0000 | TABLE | S2AP_R | DBM | (0b1111 << 2);
        let at = t.map(0, 36, 2, 0x4000, 3, leaf);
        let base = cfg(g, 28, 1, 0b101, 0);
        for a in [Access::read(), Access::write(), Access::fetch()] {
            assert_eq!(
                fault(walk(&base, &t.mem, 0x4000, a, true)),
                (Aarch64FaultKind::AccessFlag, 3)
            );
        }
        assert_eq!(t.rd(at), leaf);
        let mut ha = base;
        ha.vtcr |= VTCR_HA;
        assert!(walk(&ha, &t.mem, 0x4000, Access::read(), false).is_ok());
        assert_eq!(t.rd(at), leaf, "no update unless asked");
        let got = walk(&ha, &t.mem, 0x4000, Access::read(), true).unwrap();
        assert_eq!(got.3, 2 + 1, "two reads and one exchange");
        assert_eq!(t.rd(at), leaf | AF);
        // A write: no HD, a permission fault.
        assert_eq!(
            fault(walk(&ha, &t.mem, 0x4000, Access::write(), true)),
            (Aarch64FaultKind::Permission, 3)
        );
        // HD without HA does nothing.
        let mut hd_only = base;
        hd_only.vtcr |= VTCR_HD;
        assert!(!hd_only.decode().unwrap().hd);
        assert_eq!(
            fault(walk(&hd_only, &t.mem, 0x4000, Access::write(), true)),
            (Aarch64FaultKind::Permission, 3)
        );
        let mut hd = ha;
        hd.vtcr |= VTCR_HD;
        assert!(walk(&hd, &t.mem, 0x4000, Access::write(), false).is_ok());
        assert_eq!(t.rd(at), leaf | AF);
        let w = Aarch64Stage2Walker::new(hd).unwrap();
        let set = WalkOptions {
            set_accessed_dirty: true,
        };
        let tr = w
            .translate_with(&t.mem, GuestPhysAddr(0x4000), Access::write(), set)
            .unwrap();
        assert_eq!(t.rd(at), leaf | AF | S2AP_W);
        assert_eq!(tr.attributes.s2ap, 0b11);
        assert_eq!(tr.attributes.mem_attr, 0b1111);
        assert!(tr.attributes.dbm && tr.attributes.accessed);
        let f = S2Format::new(&hd).unwrap();
        let la = f.leaf_attributes(t.rd(at));
        assert!(la.accessed && la.dirty);
        assert_eq!(la.memory_type, Some(0b1111));
        // Without DBM, HD does not make the page writable.
        t.wr(at, (leaf | AF) & !DBM);
        assert_eq!(
            fault(walk(&hd, &t.mem, 0x4000, Access::write(), true)),
            (Aarch64FaultKind::Permission, 3)
        );
        assert_eq!(t.rd(at), (leaf | AF) & !DBM);
        // An update into a read-only image is refused without a code.
        t.wr(at, leaf);
        let mut bytes = vec![0u8; 0x20_0000];
        t.mem.read(GuestPhysAddr(0), &mut bytes).unwrap();
        let image = crate::paging::PhysImage::new(GuestPhysAddr(0), &bytes);
        let f = w
            .translate_with(&image, GuestPhysAddr(0x4000), Access::read(), set)
            .unwrap_err();
        assert_eq!((f.kind, f.fsc()), (Aarch64FaultKind::ReadOnlyTable, None));
    }

    /// Output addresses above PS: the leaf's, a table's, and VTTBR_EL2's
    /// (level 0, before any read); an IPA above the input size is a
    /// level-0 translation fault; a table outside memory is `Unbacked`.
    #[test]
    fn sizes_and_unbacked_tables() {
        let g = Granule::K4;
        let mut t = T::new(g);
        let at = t.map(0, 40, 1, 0x5000, 3, (1u64 << 40) | TABLE | AF | RW);
        let ps32 = cfg(g, 24, 1, 0b000, 0);
        let got = walk(&ps32, &t.mem, 0x5000, Access::read(), false);
        assert_eq!(got, Err((Aarch64FaultKind::AddressSize, 3, Some(at))));
        let ps48 = cfg(g, 24, 1, 0b101, 0);
        assert_eq!(
            walk(&ps48, &t.mem, 0x5000, Access::read(), false).map(|w| w.0),
            Ok(1 << 40)
        );
        // PS above the implemented PA size behaves as that size.
        // (A 36-bit IPA: an IPA wider than the PA is refused.)
        let mut pa36 = cfg(g, 28, 1, 0b101, 0);
        pa36.pa_bits = 36;
        assert_eq!(pa36.decode().unwrap().oa_bits, 36);
        assert_eq!(
            fault(walk(&pa36, &t.mem, 0x5000, Access::read(), false)),
            (Aarch64FaultKind::AddressSize, 3)
        );
        // A level-2 table descriptor pointing above 4 GiB.
        let l2 = t.rd(0) & bits(12, 47);
        t.wr(l2, t.rd(l2) | (1 << 36));
        assert_eq!(
            fault(walk(&ps32, &t.mem, 0x5000, Access::read(), false)),
            (Aarch64FaultKind::AddressSize, 2)
        );
        // VTTBR_EL2 above 4 GiB: level 0, no entry read.
        let high = cfg(g, 24, 1, 0b000, 1 << 33);
        let w = Aarch64Stage2Walker::new(high).unwrap();
        let f = w
            .translate(&t.mem, GuestPhysAddr(0x5000), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.kind, f.level, f.entry_addr, f.fsc()),
            (Aarch64FaultKind::AddressSize, 0, None, Some(0))
        );
        // An IPA above 40 bits.
        let f = Aarch64Stage2Walker::new(ps48)
            .unwrap()
            .translate(&t.mem, GuestPhysAddr(1 << 40), Access::write())
            .unwrap_err();
        assert_eq!(
            (f.kind, f.level, f.entry, f.fsc()),
            (Aarch64FaultKind::Translation, 0, None, Some(0b00_0100))
        );
        assert_eq!(
            f.esr_el2(Stage2Access::Final),
            Some(0x24 << 26 | 1 << 25 | 1 << 6 | 0b00_0100)
        );
        assert_eq!(f.hpfar_el2(), (1u64 << 28) << 4);
        // A table outside memory: no architectural code.
        let t = T::new(g);
        t.wr(0, (1u64 << 40) | TABLE);
        let got = walk(&ps48, &t.mem, 0x5000, Access::read(), false);
        let (kind, level, _) = got.unwrap_err();
        assert_eq!(
            (kind, level),
            (
                Aarch64FaultKind::Unbacked {
                    pa: GuestPhysAddr(1 << 40)
                },
                2
            )
        );
        assert_eq!(
            esr_el2(kind, level, AccessKind::Read, Stage2Access::Final),
            None
        );
    }

    /// Tables that point at themselves: the walk reads one entry a level
    /// and ends, whatever it finds.
    #[test]
    fn cycles_are_bounded() {
        let g = Granule::K4;
        let t = T::new(g);
        // The start table (level 0) maps itself as a table at every level;
        // at level 3 the same entry is a page.
        t.wr(0x1000, 0x1000 | TABLE | AF | RW);
        let c = cfg(g, 16, 2, 0b101, 0x1000);
        let got = walk(&c, &t.mem, 0x123, Access::read(), true);
        assert_eq!(got, Ok((0x1123, 0x1000, 3, 4)));
        // Two tables pointing at each other.
        t.wr(0x1000, 0x2000 | TABLE | AF | RW);
        t.wr(0x2000, 0x1000 | TABLE | AF | RW);
        let got = walk(&c, &t.mem, 0x123, Access::read(), false);
        assert_eq!(got, Ok((0x1123, 0x1000, 3, 4)));
    }

    /// 52-bit IPAs and OAs: 4 KiB with DS from level -1 (SL2), OA bits
    /// 51:50 in descriptor bits 9:8 and shareability from VTCR_EL2.SH0; 16
    /// KiB with DS from level 0 (SL0 = 0b11) and a level-1 block; 64 KiB
    /// with FEAT_LPA, OA bits 51:48 in bits 15:12, a level-1 block and the
    /// 52-bit VTTBR_EL2 layout; level -1 faults and their codes.
    #[test]
    fn fifty_two_bits() {
        // 4 KiB, DS, T0SZ 12, start level -1: 16 entries at level -1.
        let g = Granule::K4;
        let mut t = T::new(g);
        let ipa = (1u64 << 51) | (1 << 49) | 0x5000;
        let pa = (3u64 << 50) | (1 << 49) | 0x1234_5000;
        let leaf = (pa & bits(12, 49)) | (((pa >> 50) & 3) << 8) | TABLE | AF | RW;
        t.map(0, 52, -1, ipa, 3, leaf);
        let c = Aarch64Stage2::new(g, 52, 0);
        let v = c.decode().unwrap();
        assert_eq!((v.start_level, v.concatenated, v.ds), (0, 16, true));
        let mut c = c;
        c.vtcr = (c.vtcr & !(3 << 6)) | VTCR_SL2 | (0b10 << 12);
        let v = c.decode().unwrap();
        assert_eq!((v.start_level, v.concatenated, v.oa_bits), (-1, 1, 52));
        let w = Aarch64Stage2Walker::new(c).unwrap();
        let tr = w
            .translate(&t.mem, GuestPhysAddr(ipa + 0x42), Access::read())
            .unwrap();
        assert_eq!(
            (tr.pa, tr.level, tr.memory_refs),
            (GuestPhysAddr(pa + 0x42), 3, 5)
        );
        assert_eq!(tr.attributes.shareability, 0b10);
        // A 512 GiB block at level 0.
        let mut t0 = T::new(g);
        let big = 1u64 << 39;
        t0.map(0, 52, -1, 7 * big, 0, (5 * big) | BLOCK | AF | RW);
        assert_eq!(
            walk(&c, &t0.mem, 7 * big + 9, Access::read(), false),
            Ok((5 * big + 9, big, 0, 2))
        );
        // The level -1 entry knocked out: a level -1 translation fault.
        let top = 8 * t.index(52, -1, -1, ipa);
        let table = t.rd(top);
        t.wr(top, 0);
        let f = w
            .translate(&t.mem, GuestPhysAddr(ipa), Access::fetch())
            .unwrap_err();
        assert_eq!(
            (f.kind, f.level, f.fsc()),
            (Aarch64FaultKind::Translation, -1, Some(0b10_1011))
        );
        assert_eq!(
            f.esr_el2(Stage2Access::TableRead),
            Some(0x20 << 26 | 1 << 25 | 1 << 7 | 0b10_1011)
        );
        // A level -1 table above a 48-bit PS: address size, level -1.
        t.wr(top, table | (1 << 8));
        let mut ps48 = c;
        ps48.vtcr = (ps48.vtcr & !(7 << 16)) | (0b101 << 16);
        let f = Aarch64Stage2Walker::new(ps48)
            .unwrap()
            .translate(&t.mem, GuestPhysAddr(ipa), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.kind, f.level, f.fsc()),
            (Aarch64FaultKind::AddressSize, -1, Some(0b10_1001))
        );
        // With DS, VTTBR_EL2 bits 5:2 are BADDR[51:48]: above 48 bits.
        ps48.vttbr = 1 << 2;
        let f = Aarch64Stage2Walker::new(ps48)
            .unwrap()
            .translate(&t.mem, GuestPhysAddr(ipa), Access::read())
            .unwrap_err();
        assert_eq!((f.kind, f.level), (Aarch64FaultKind::AddressSize, 0));

        // 16 KiB, DS, T0SZ 12, SL0 = 0b11: level 0 with 32 entries; a
        // 64 GiB block at level 1.
        let g = Granule::K16;
        let mut t = T::new(g);
        let size = 1u64 << 36;
        let ipa = (1u64 << 51) | (3 * size);
        let out = (2u64 << 50) | (5 * size);
        let leaf = (out & bits(14, 49)) | (((out >> 50) & 3) << 8) | BLOCK | AF | RW;
        t.map(0, 52, 0, ipa, 1, leaf);
        let mut c = Aarch64Stage2::new(g, 52, 0);
        assert_eq!(c.vtcr & (3 << 6), 3 << 6);
        assert_eq!(c.decode().unwrap().start_level, 0);
        // Level 1 (SL0 = 0b10) cannot resolve 52 bits with 16 tables.
        c.vtcr &= !(1 << 6);
        assert!(matches!(
            c.decode(),
            Err(Aarch64PagingError::StartLevel { sl0: 2, .. })
        ));
        c.vtcr |= 3 << 6;
        assert_eq!(
            walk(&c, &t.mem, ipa + 1, Access::read(), false),
            Ok((out + 1, size, 1, 2))
        );
        // Without DS the encoding is reserved.
        c.vtcr &= !VTCR_DS;
        assert!(matches!(c.decode(), Err(Aarch64PagingError::TxSz { .. })));
        c.vtcr = (c.vtcr & !0x3f) | 16;
        assert!(matches!(
            c.decode(),
            Err(Aarch64PagingError::StartLevel { .. })
        ));

        // 64 KiB, FEAT_LPA: T0SZ 12, level 1 (SL0 = 0b10), a 4 TiB block
        // with OA[51:48] in bits 15:12; the table base in VTTBR bits 5:2.
        let g = Granule::K64;
        let mut t = T::new(g);
        let size = 1u64 << 42;
        let ipa = (1u64 << 51) | (3 * size);
        let out = (0xau64 << 48) | (5 * size);
        let leaf = (out & bits(16, 47)) | (((out >> 48) & 0xf) << 12) | BLOCK | AF | RW;
        t.map(0, 52, 1, ipa, 1, leaf);
        t.map(0, 52, 1, 3 * size, 1, leaf);
        let c = Aarch64Stage2::new(g, 52, 0);
        let v = c.decode().unwrap();
        assert_eq!((v.start_level, v.oa_bits, v.ds), (1, 52, false));
        assert_eq!(
            walk(&c, &t.mem, ipa + 1, Access::read(), false),
            Ok((out + 1, size, 1, 1))
        );
        // The same block under a 48-bit PS: its bits 15:12 are too wide.
        let mut c48 = c;
        c48.vtcr = (c48.vtcr & !(7 << 16)) | (0b101 << 16);
        c48.vtcr = (c48.vtcr & !0x3f) | 16;
        assert_eq!(
            fault(walk(&c48, &t.mem, 3 * size, Access::read(), false)),
            (Aarch64FaultKind::AddressSize, 1)
        );
        // Without FEAT_LPA, bits 15:12 are not address bits and a level-1
        // block is a translation fault.
        c48.pa_bits = 48;
        assert_eq!(
            fault(walk(&c48, &t.mem, 3 * size, Access::read(), false)),
            (Aarch64FaultKind::Translation, 1)
        );
        let mut wide = c;
        wide.vttbr = 0xf << 2;
        let f = Aarch64Stage2Walker::new(wide)
            .unwrap()
            .translate(&t.mem, GuestPhysAddr(ipa), Access::read())
            .unwrap_err();
        assert_eq!(
            f.kind,
            Aarch64FaultKind::Unbacked {
                pa: GuestPhysAddr((0xf << 48) + 8 * t.index(52, 1, 1, ipa))
            }
        );
    }

    /// Configurations without a defined walk are refused with the field
    /// named.
    #[test]
    fn refuses_undefined_configurations() {
        let ok = cfg(Granule::K4, 24, 1, 0b101, 0x2000);
        assert!(ok.decode().is_ok());
        assert_eq!(ok.decode().unwrap().concatenated, 2);
        // `new` as KVM: 40 bits from level 1 with two tables, 32 bits from
        // level 2 with four, at least two levels.
        let v = Aarch64Stage2::new(Granule::K4, 40, 0).decode().unwrap();
        assert_eq!((v.start_level, v.concatenated, v.oa_bits), (1, 2, 48));
        let v = Aarch64Stage2::new(Granule::K4, 32, 0).decode().unwrap();
        assert_eq!((v.start_level, v.concatenated), (2, 4));
        let v = Aarch64Stage2::new(Granule::K64, 42, 0).decode().unwrap();
        assert_eq!((v.start_level, v.concatenated), (2, 1));
        let v = Aarch64Stage2::new(Granule::K16, 48, 0).decode().unwrap();
        assert_eq!((v.start_level, v.concatenated), (1, 2));
        let bad = |f: fn(&mut Aarch64Stage2)| {
            let mut c = ok;
            f(&mut c);
            c.decode().unwrap_err()
        };
        assert_eq!(
            bad(|c| c.vtcr |= 1 << 38),
            Aarch64PagingError::Unsupported {
                field: "VTCR_EL2.D128"
            }
        );
        assert_eq!(
            bad(|c| c.vtcr |= VTCR_DS),
            Aarch64PagingError::FeatureAbsent {
                field: "VTCR_EL2.DS",
                feature: "FEAT_LPA2"
            }
        );
        assert_eq!(
            bad(|c| c.vtcr |= VTCR_SL2),
            Aarch64PagingError::Res0Field {
                field: "VTCR_EL2.SL2"
            }
        );
        assert!(matches!(
            bad(|c| c.vtcr |= 3 << 14),
            Aarch64PagingError::ReservedGranule {
                field: "VTCR_EL2.TG0",
                value: 3
            }
        ));
        // An IPA wider than the PA size (T0SZ below 64 - 48).
        assert!(matches!(
            bad(|c| c.vtcr = (c.vtcr & !0x3f) | 15),
            Aarch64PagingError::TxSz {
                field: "VTCR_EL2.T0SZ",
                value: 15,
                min: 16,
                max: 48
            }
        ));
        // Above 39 without FEAT_TTST, and SL0 = 0b11 (level 3) with it off.
        assert!(matches!(
            bad(|c| {
                c.ttst = false;
                c.vtcr = (c.vtcr & !0x3f) | 40;
            }),
            Aarch64PagingError::TxSz { max: 39, .. }
        ));
        assert!(matches!(
            bad(|c| {
                c.ttst = false;
                c.vtcr = (c.vtcr & !0xff) | 40 | (3 << 6);
            }),
            Aarch64PagingError::TxSz { .. }
        ));
        assert!(matches!(
            bad(|c| {
                c.ttst = false;
                c.vtcr = (c.vtcr & !0xff) | 39 | (3 << 6);
            }),
            Aarch64PagingError::StartLevel { sl0: 3, .. }
        ));
        // Level 0 with 4 KiB needs a PA size of 44 bits or more.
        assert!(matches!(
            bad(|c| {
                c.pa_bits = 40;
                c.vtcr = (c.vtcr & !0xff) | 24 | (2 << 6);
            }),
            Aarch64PagingError::StartLevel { sl0: 2, .. }
        ));
        // 17 tables' worth: 41 bits from level 1 would need 4 tables, fine;
        // 44 bits from level 1 would need 32.
        assert!(matches!(
            bad(|c| c.vtcr = (c.vtcr & !0x3f) | 20),
            Aarch64PagingError::StartLevel { t0sz: 20, .. }
        ));
        // Two concatenated tables need an 8 KiB-aligned base.
        assert_eq!(
            bad(|c| c.vttbr = 0x1000),
            Aarch64PagingError::MisalignedBase {
                register: "VTTBR_EL2",
                value: 0x1000,
                align: 0x2000
            }
        );
        assert_eq!(
            bad(|c| c.pa_bits = 50),
            Aarch64PagingError::PaBits { pa_bits: 50 }
        );
        // The VMID is not part of the base.
        let mut c = ok;
        c.vttbr |= 0x42 << 48 | 1;
        assert!(c.decode().is_ok());
        assert_eq!(c.vmid(), 0x42);
    }

    /// ESR_EL2 and HPFAR_EL2 as the register descriptions lay them out.
    #[test]
    fn syndromes() {
        use Aarch64FaultKind as K;
        let il = 1u64 << 25;
        let dabt = 0x24u64 << 26 | il;
        let iabt = 0x20u64 << 26 | il;
        for (kind, level, access, site, want) in [
            (
                K::Translation,
                2,
                AccessKind::Write,
                Stage2Access::Final,
                Some(dabt | 1 << 6 | 0b00_0110),
            ),
            (
                K::Translation,
                2,
                AccessKind::Read,
                Stage2Access::Final,
                Some(dabt | 0b00_0110),
            ),
            (
                K::Permission,
                3,
                AccessKind::Write,
                Stage2Access::TableRead,
                Some(dabt | 1 << 7 | 0b00_1111),
            ),
            (
                K::AccessFlag,
                1,
                AccessKind::Read,
                Stage2Access::TableUpdate,
                Some(dabt | 1 << 7 | 1 << 6 | 0b00_1001),
            ),
            (
                K::AddressSize,
                0,
                AccessKind::Fetch,
                Stage2Access::Final,
                Some(iabt),
            ),
            (
                K::Permission,
                3,
                AccessKind::Fetch,
                Stage2Access::TableUpdate,
                Some(iabt | 1 << 7 | 0b00_1111),
            ),
            (
                K::Translation,
                -1,
                AccessKind::Read,
                Stage2Access::Final,
                Some(dabt | 0b10_1011),
            ),
            (
                K::AddressSize,
                -1,
                AccessKind::Read,
                Stage2Access::Final,
                Some(dabt | 0b10_1001),
            ),
            (
                K::Permission,
                -1,
                AccessKind::Read,
                Stage2Access::Final,
                None,
            ),
            (K::Contended, 2, AccessKind::Read, Stage2Access::Final, None),
        ] {
            assert_eq!(
                esr_el2(kind, level, access, site),
                want,
                "{kind:?} {level} {access:?} {site:?}"
            );
        }
        assert_eq!(
            hpfar_el2(GuestPhysAddr(0x000f_1234_5678_9abc)),
            0x0000_0f12_3456_7890
        );
        assert_eq!(hpfar_el2(GuestPhysAddr(0xfff)), 0);
    }
}
