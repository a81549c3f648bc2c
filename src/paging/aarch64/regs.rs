//! The AArch64 paging registers as a guest or a VMM holds them: the EL1&0
//! stage-1 regime ([`Aarch64Paging`]: TCR_EL1, TTBR0_EL1, TTBR1_EL1,
//! SCTLR_EL1, MAIR_EL1, PSTATE.PAN, the implemented physical-address size
//! and the LVA/LPA2 features), their fields ([`Granule`], [`Tcr`]), the
//! helpers stage 1 and stage 2 share (start levels, start-table sizes,
//! output-address sizes, the 52-bit base-register layout), and which values
//! a processor's walk gives a defined meaning: [`Aarch64Paging::decode`]
//! refuses the rest with the field named ([`Aarch64PagingError`], which
//! stage 2's decode in `aarch64/stage2.rs` shares). It knows nothing of
//! descriptors (`aarch64.rs`, which imports it).
//!
//! What is refused, and why (Arm ARM DDI 0487, D8 "The AArch64 Virtual
//! Memory System Architecture", and the TCR_EL1 / TTBRn_EL1 register
//! descriptions):
//! - a reserved TG0/TG1 encoding (TG0 = 0b11, TG1 = 0b00): the granule used
//!   is IMPLEMENTATION DEFINED;
//! - T0SZ/T1SZ outside 16..=39, or 12..=39 where a 52-bit VA is possible
//!   (`AArch64.S1MinTxSZ`: FEAT_LVA with the 64 KiB granule, or TCR_EL1.DS
//!   with 4/16 KiB): below the minimum a processor with FEAT_LPA faults and
//!   others may clamp, above 39 needs FEAT_TTST; either way the behaviour is
//!   not one walk;
//! - TCR_EL1.DS = 1 on a processor without FEAT_LPA2 (the bit is RES0);
//! - SCTLR_EL1.EE = 1 with the MMU on: big-endian table walks (descriptors
//!   are read little-endian here);
//! - TCR_EL1 bits 6 and 35, which are RES0 in every architecture version;
//! - a TTBR base not aligned to its start-level table (at least 64 bytes
//!   where the base register holds a 52-bit address): BADDR's bits below
//!   the table size are RES0, and whether a set one is used is CONSTRAINED
//!   UNPREDICTABLE (v8.0's pseudocode drops them, so a v8.0 part would walk
//!   the aligned table: refusing is the strict choice, which a next session
//!   may relax to masking);
//! - an implemented physical-address size that is not one of
//!   ID_AA64MMFR0_EL1.PARange's values (52 bits means FEAT_LPA).
//!
//! 52-bit addresses (FEAT_LPA, FEAT_LVA, FEAT_LPA2): with the 64 KiB
//! granule and a 52-bit OA size, descriptor bits 15:12 hold `OA[51:48]`;
//! with TCR_EL1.DS = 1 (4/16 KiB granules) descriptors hold `OA[49:12]` in
//! bits 49:12 and `OA[51:50]` in bits 9:8, so shareability comes from
//! TCR_EL1.SH0/SH1, and a 4 KiB walk of a 52-bit VA starts at level -1. In
//! both layouts the base register holds `BADDR[51:48]` in bits 5:2
//! (`AArch64.TTBaseAddress`).

/// TCR_EL1.EPD0: walks through TTBR0_EL1 are disabled.
pub const TCR_EPD0: u64 = 1 << 7;
/// TCR_EL1.A1: the ASID comes from TTBR1_EL1 (else TTBR0_EL1).
pub const TCR_A1: u64 = 1 << 22;
/// TCR_EL1.EPD1: walks through TTBR1_EL1 are disabled.
pub const TCR_EPD1: u64 = 1 << 23;
/// TCR_EL1.AS: 16-bit ASIDs (else 8-bit).
pub const TCR_AS: u64 = 1 << 36;
/// TCR_EL1.TBI0: top byte ignored in the TTBR0 range.
pub const TCR_TBI0: u64 = 1 << 37;
/// TCR_EL1.TBI1: top byte ignored in the TTBR1 range.
pub const TCR_TBI1: u64 = 1 << 38;
/// TCR_EL1.HA: hardware sets the access flag.
pub const TCR_HA: u64 = 1 << 39;
/// TCR_EL1.HD: hardware manages dirty state (DBM), only with HA.
pub const TCR_HD: u64 = 1 << 40;
/// TCR_EL1.HPD0: hierarchical permissions disabled in the TTBR0 range.
pub const TCR_HPD0: u64 = 1 << 41;
/// TCR_EL1.HPD1: hierarchical permissions disabled in the TTBR1 range.
pub const TCR_HPD1: u64 = 1 << 42;
/// TCR_EL1.TBID0: TBI0 applies to data accesses only.
pub const TCR_TBID0: u64 = 1 << 51;
/// TCR_EL1.TBID1: TBI1 applies to data accesses only.
pub const TCR_TBID1: u64 = 1 << 52;
/// TCR_EL1.E0PD0 (FEAT_E0PD): EL0 accesses to the TTBR0 range fault.
pub const TCR_E0PD0: u64 = 1 << 55;
/// TCR_EL1.E0PD1 (FEAT_E0PD): EL0 accesses to the TTBR1 range fault.
pub const TCR_E0PD1: u64 = 1 << 56;
/// TCR_EL1.DS: 52-bit addresses with 4 KiB and 16 KiB granules (LPA2).
pub const TCR_DS: u64 = 1 << 59;
/// TCR_EL1 bits that are RES0 in every architecture version.
const TCR_RES0: u64 = (1 << 6) | (1 << 35);
/// SCTLR_EL1.M: the stage-1 MMU is on.
pub const SCTLR_M: u64 = 1 << 0;
/// SCTLR_EL1.WXN: writable memory is never executable.
pub const SCTLR_WXN: u64 = 1 << 19;
/// SCTLR_EL1.EE: EL1 data accesses and EL1&0 stage-1 table walks are
/// big-endian.
pub const SCTLR_EE: u64 = 1 << 25;
/// SCTLR_EL1.EPAN (FEAT_PAN3): PAN also denies EL1 data accesses to pages
/// EL0 may execute.
pub const SCTLR_EPAN: u64 = 1 << 57;

/// A translation granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granule {
    /// 4 KiB pages, 512 entries a table.
    K4,
    /// 16 KiB pages, 2048 entries a table.
    K16,
    /// 64 KiB pages, 8192 entries a table.
    K64,
}

impl Granule {
    /// log2 of the page size.
    pub const fn shift(self) -> u32 {
        match self {
            Granule::K4 => 12,
            Granule::K16 => 14,
            Granule::K64 => 16,
        }
    }

    /// Virtual-address bits one table level resolves (`shift() - 3`).
    pub const fn stride(self) -> u32 {
        self.shift() - 3
    }

    /// TCR_EL1.TG0's encoding of this granule.
    pub const fn tg0(self) -> u64 {
        match self {
            Granule::K4 => 0b00,
            Granule::K64 => 0b01,
            Granule::K16 => 0b10,
        }
    }

    /// TCR_EL1.TG1's encoding of this granule.
    pub const fn tg1(self) -> u64 {
        match self {
            Granule::K16 => 0b01,
            Granule::K4 => 0b10,
            Granule::K64 => 0b11,
        }
    }

    /// The granule TCR_EL1.TG0 or VTCR_EL2.TG0 encodes (`None` for the
    /// reserved 0b11).
    pub(crate) fn from_tg0(v: u64) -> Option<Self> {
        match v {
            0b00 => Some(Granule::K4),
            0b01 => Some(Granule::K64),
            0b10 => Some(Granule::K16),
            _ => None,
        }
    }

    fn from_tg1(v: u64) -> Option<Self> {
        match v {
            0b01 => Some(Granule::K16),
            0b10 => Some(Granule::K4),
            0b11 => Some(Granule::K64),
            _ => None,
        }
    }

    /// The architectural level of the first table for a TxSZ: the walk
    /// resolves `64 - txsz - shift()` bits, `stride()` a level, ending at
    /// level 3 (Arm ARM D8.2, "Translation table walk starting level").
    /// -1 for a 4 KiB walk of more than 48 bits (FEAT_LPA2).
    pub const fn start_level(self, txsz: u8) -> i8 {
        // Saturating, so a TxSZ `decode` refuses still gives a level.
        let bits = 64u32
            .saturating_sub(txsz as u32)
            .saturating_sub(self.shift());
        // One to five levels, so the result is -1..=3.
        match bits.div_ceil(self.stride()) {
            0 | 1 => 3,
            2 => 2,
            3 => 1,
            4 => 0,
            _ => -1,
        }
    }

    /// log2 of the bytes one entry at architectural `level` (-1..=3; others
    /// are clamped to that range) maps.
    pub(crate) const fn level_shift(self, level: i8) -> u32 {
        let below = match level {
            i8::MIN..=-1 => 4,
            0 => 3,
            1 => 2,
            2 => 1,
            _ => 0,
        };
        self.shift() + self.stride() * below
    }
}

/// Which of the two VA ranges (and translation table base registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ttbr {
    /// The lower range, TTBR0_EL1 (VA bit 55 clear).
    Ttbr0,
    /// The upper range, TTBR1_EL1 (VA bit 55 set).
    Ttbr1,
}

/// The raw registers of the EL1&0 stage-1 regime, as a VMM reads them
/// (KVM_GET_ONE_REG, a gdbstub, a saved state), and the processor features
/// that change what they mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Aarch64Paging {
    /// TCR_EL1.
    pub tcr: u64,
    /// TTBR0_EL1: base address in bits 47:1 (with a 52-bit layout,
    /// `BADDR[51:48]` in bits 5:2), CnP in bit 0, ASID in 63:48.
    pub ttbr0: u64,
    /// TTBR1_EL1, laid out as TTBR0_EL1.
    pub ttbr1: u64,
    /// SCTLR_EL1 (M, WXN and EPAN are read; EE is refused with the MMU
    /// on).
    pub sctlr: u64,
    /// MAIR_EL1: eight attribute bytes, indexed by a descriptor's AttrIndx.
    pub mair: u64,
    /// PSTATE.PAN: EL1 data accesses to EL0-accessible pages fault.
    pub pan: bool,
    /// The implemented physical-address size in bits
    /// (ID_AA64MMFR0_EL1.PARange): 32, 36, 40, 42, 44, 48, or 52 for a
    /// processor with FEAT_LPA (64 KiB descriptors then carry `OA[51:48]`
    /// in bits 15:12, and level-1 blocks are allowed with that granule).
    pub pa_bits: u8,
    /// FEAT_LVA (ID_AA64MMFR2_EL1.VARange = 1): 52-bit VAs with the 64 KiB
    /// granule, T0SZ/T1SZ down to 12.
    pub lva: bool,
    /// FEAT_LPA2 (ID_AA64MMFR0_EL1.TGran4/TGran16): TCR_EL1.DS may be set,
    /// giving 52-bit VAs and OAs with the 4 KiB and 16 KiB granules. Without
    /// it DS is RES0 and [`Aarch64Paging::decode`] refuses a set one.
    pub lpa2: bool,
}

impl Aarch64Paging {
    /// Registers for the common Linux layout: both ranges with `granule`
    /// and 48-bit VAs (T0SZ = T1SZ = 16), 48-bit IPS, MMU on, no PAN, WXN,
    /// HA or HD; `ttbr0`/`ttbr1` are the two roots, ASID 0; a 48-bit PA
    /// size without LVA or LPA2.
    pub const fn new(granule: Granule, ttbr0: u64, ttbr1: u64) -> Self {
        Aarch64Paging {
            tcr: 16 | (granule.tg0() << 14) | (16 << 16) | (granule.tg1() << 30) | (0b101 << 32),
            ttbr0,
            ttbr1,
            sctlr: SCTLR_M,
            mair: 0,
            pan: false,
            pa_bits: 48,
            lva: false,
            lpa2: false,
        }
    }

    /// The fields of TCR_EL1 the walk uses, checked.
    pub fn decode(&self) -> Result<Tcr, Aarch64PagingError> {
        let tcr = self.tcr;
        if tcr & TCR_RES0 != 0 {
            return Err(Aarch64PagingError::Res0 {
                bits: tcr & TCR_RES0,
                tcr,
            });
        }
        let ds = tcr & TCR_DS != 0;
        if ds && !self.lpa2 {
            return Err(Aarch64PagingError::FeatureAbsent {
                field: "TCR_EL1.DS",
                feature: "FEAT_LPA2",
            });
        }
        if self.sctlr & SCTLR_M != 0 && self.sctlr & SCTLR_EE != 0 {
            // Descriptors are read little-endian.
            return Err(Aarch64PagingError::Unsupported {
                field: "SCTLR_EL1.EE (big-endian table walks)",
            });
        }
        let pa_bits = check_pa_bits(self.pa_bits)?;
        let field = |v: u64| (v & 0x3f) as u8;
        let (t0sz, t1sz) = (field(tcr), field(tcr >> 16));
        let tg0 =
            Granule::from_tg0((tcr >> 14) & 3).ok_or(Aarch64PagingError::ReservedGranule {
                field: "TCR_EL1.TG0",
                value: ((tcr >> 14) & 3) as u8,
            })?;
        let tg1 =
            Granule::from_tg1((tcr >> 30) & 3).ok_or(Aarch64PagingError::ReservedGranule {
                field: "TCR_EL1.TG1",
                value: ((tcr >> 30) & 3) as u8,
            })?;
        for (name, v, g) in [("TCR_EL1.T0SZ", t0sz, tg0), ("TCR_EL1.T1SZ", t1sz, tg1)] {
            // `AArch64.S1MinTxSZ`: 12 with FEAT_LVA and 64 KiB, or with DS.
            let min = if (g == Granule::K64 && self.lva) || (ds && g != Granule::K64) {
                12
            } else {
                16
            };
            if !(min..=39).contains(&v) {
                return Err(Aarch64PagingError::TxSz {
                    field: name,
                    value: v,
                    min,
                    max: 39,
                });
            }
        }
        let t = Tcr {
            t0sz,
            t1sz,
            tg0,
            tg1,
            epd0: tcr & TCR_EPD0 != 0,
            epd1: tcr & TCR_EPD1 != 0,
            ha: tcr & TCR_HA != 0,
            // HD manages dirty state "only if the HA bit is also set"
            // (TCR_EL1.HD description).
            hd: tcr & TCR_HD != 0 && tcr & TCR_HA != 0,
            hpd0: tcr & TCR_HPD0 != 0,
            hpd1: tcr & TCR_HPD1 != 0,
            tbi0: tcr & TCR_TBI0 != 0,
            tbi1: tcr & TCR_TBI1 != 0,
            tbid0: tcr & TCR_TBID0 != 0,
            tbid1: tcr & TCR_TBID1 != 0,
            ds,
            sh0: ((tcr >> 12) & 3) as u8,
            sh1: ((tcr >> 28) & 3) as u8,
            e0pd0: tcr & TCR_E0PD0 != 0,
            e0pd1: tcr & TCR_E0PD1 != 0,
            oa_bits: oa_size((tcr >> 32) & 7, pa_bits),
        };
        for (reg, value, granule, txsz, enabled) in [
            ("TTBR0_EL1", self.ttbr0, tg0, t0sz, !t.epd0),
            ("TTBR1_EL1", self.ttbr1, tg1, t1sz, !t.epd1),
        ] {
            if enabled {
                let bytes = table_bytes(granule, 64 - u32::from(txsz), granule.start_level(txsz));
                check_base(reg, value, t.base52(granule), bytes)?;
            }
        }
        Ok(t)
    }

    /// The ASID of the current address space (TTBR1's with TCR_EL1.A1, else
    /// TTBR0's; 8 bits without TCR_EL1.AS).
    pub const fn asid(&self) -> u16 {
        let ttbr = if self.tcr & TCR_A1 != 0 {
            self.ttbr1
        } else {
            self.ttbr0
        };
        let asid = (ttbr >> 48) as u16;
        if self.tcr & TCR_AS != 0 {
            asid
        } else {
            asid & 0xff
        }
    }
}

/// TTBRn_EL1.BADDR without LPA: bits 47:1 (bit 0 is CnP).
pub(crate) const BADDR: u64 = 0x0000_ffff_ffff_fffe;

/// `pa_bits` if it is one of ID_AA64MMFR0_EL1.PARange's sizes.
pub(crate) fn check_pa_bits(pa_bits: u8) -> Result<u8, Aarch64PagingError> {
    if matches!(pa_bits, 32 | 36 | 40 | 42 | 44 | 48 | 52) {
        Ok(pa_bits)
    } else {
        Err(Aarch64PagingError::PaBits { pa_bits })
    }
}

/// The output-address size a TCR_EL1.IPS or VTCR_EL2.PS encoding gives on
/// a processor with `pa_bits` (`AArch64.PhysicalAddressSize`): 0b110 is 52
/// bits, and 0b111 (reserved without FEAT_D128) is taken as 52 too, as
/// v8.0's pseudocode took it as the largest size; a size above the
/// implemented one behaves as that size ("if outputsize > PAMax() then
/// outputsize = PAMax()"). Descriptors that cannot hold bits 51:48 (4/16
/// KiB without DS) make a 52-bit size the same as 48.
pub(crate) const fn oa_size(field: u64, pa_bits: u8) -> u8 {
    let bits = match field & 7 {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    };
    if bits > pa_bits {
        pa_bits
    } else {
        bits
    }
}

/// The table base address a TTBRn_EL1 or VTTBR_EL2 value holds: bits 47:1,
/// or with the 52-bit layout (`wide`) bits 47:6 and `BADDR[51:48]` from
/// bits 5:2 (`AArch64.TTBaseAddress`).
pub(crate) const fn base_address(value: u64, wide: bool) -> u64 {
    if wide {
        (value & 0x0000_ffff_ffff_ffc0) | (((value >> 2) & 0xf) << 48)
    } else {
        value & BADDR
    }
}

/// Checks that the base in `value` is aligned to its start table of
/// `bytes` bytes (at least 64 with the 52-bit layout), naming `register`.
pub(crate) fn check_base(
    register: &'static str,
    value: u64,
    wide: bool,
    bytes: u64,
) -> Result<u64, Aarch64PagingError> {
    let (base, align) = if wide {
        (base_address(value, true), bytes.max(64))
    } else {
        (value & BADDR, bytes)
    };
    if base & (align - 1) != 0 {
        return Err(Aarch64PagingError::MisalignedBase {
            register,
            value,
            align,
        });
    }
    Ok(base)
}

/// Bytes of a start table at architectural level `start` for an input of
/// `ia_bits` bits (more than one table's worth: concatenated tables, as a
/// stage 2 allows). At least 8.
pub(crate) const fn table_bytes(g: Granule, ia_bits: u32, start: i8) -> u64 {
    let shift = g.level_shift(start);
    8 << ia_bits.saturating_sub(shift)
}

/// TCR_EL1 as the walk reads it, checked by [`Aarch64Paging::decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tcr {
    /// T0SZ: the TTBR0 range is `2^(64 - t0sz)` bytes.
    pub t0sz: u8,
    /// T1SZ: the TTBR1 range is the top `2^(64 - t1sz)` bytes.
    pub t1sz: u8,
    /// TG0.
    pub tg0: Granule,
    /// TG1.
    pub tg1: Granule,
    /// EPD0.
    pub epd0: bool,
    /// EPD1.
    pub epd1: bool,
    /// HA.
    pub ha: bool,
    /// HD, in effect only with HA (false when HA is clear).
    pub hd: bool,
    /// HPD0.
    pub hpd0: bool,
    /// HPD1.
    pub hpd1: bool,
    /// TBI0.
    pub tbi0: bool,
    /// TBI1.
    pub tbi1: bool,
    /// TBID0.
    pub tbid0: bool,
    /// TBID1.
    pub tbid1: bool,
    /// DS (FEAT_LPA2): 52-bit descriptors and VAs with 4/16 KiB granules.
    pub ds: bool,
    /// SH0: with DS, the shareability of the TTBR0 range's pages.
    pub sh0: u8,
    /// SH1: with DS, the shareability of the TTBR1 range's pages.
    pub sh1: u8,
    /// E0PD0: every EL0 access to the TTBR0 range takes a level 0
    /// translation fault.
    pub e0pd0: bool,
    /// E0PD1: likewise for the TTBR1 range.
    pub e0pd1: bool,
    /// The output-address size in force: IPS capped at the implemented PA
    /// size.
    pub oa_bits: u8,
}

impl Tcr {
    /// Whether a range with `granule` uses the LPA2 descriptor layout (DS
    /// applies to the 4 KiB and 16 KiB granules only).
    pub const fn lpa2_layout(&self, granule: Granule) -> bool {
        self.ds && !matches!(granule, Granule::K64)
    }

    /// Whether the base register of a range with `granule` holds a 52-bit
    /// address (bits 5:2 are `BADDR[51:48]`): with DS, or with the 64 KiB
    /// granule and a 52-bit OA size (FEAT_LPA).
    pub const fn base52(&self, granule: Granule) -> bool {
        self.ds || (matches!(granule, Granule::K64) && self.oa_bits == 52)
    }
}

/// Register values whose walk the architecture leaves undefined (or that
/// need features this walker does not model); each names the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Aarch64PagingError {
    /// RES0 bits of TCR_EL1 are set.
    #[error("TCR_EL1 has RES0 bits set: {bits:#x} (TCR_EL1 = {tcr:#x})")]
    Res0 {
        /// The RES0 bits that are set.
        bits: u64,
        /// TCR_EL1.
        tcr: u64,
    },
    /// A feature this walker does not model is enabled.
    #[error("{field} is set: not supported by this walker")]
    Unsupported {
        /// The field.
        field: &'static str,
    },
    /// A field is set that the processor's features leave RES0.
    #[error("{field} is set, but the processor does not implement {feature}")]
    FeatureAbsent {
        /// The field.
        field: &'static str,
        /// The feature it needs.
        feature: &'static str,
    },
    /// A RES0 field is set where its feature does not apply.
    #[error("{field} is set where it is RES0")]
    Res0Field {
        /// The field.
        field: &'static str,
    },
    /// A TxSZ field outside the sizes the walk can use.
    #[error("{field} = {value} is outside {min}..={max}")]
    TxSz {
        /// "TCR_EL1.T0SZ", "TCR_EL1.T1SZ" or "VTCR_EL2.T0SZ".
        field: &'static str,
        /// Its value.
        value: u8,
        /// The smallest value allowed.
        min: u8,
        /// The largest value allowed.
        max: u8,
    },
    /// A reserved granule encoding (TG0 = 0b11, TG1 = 0b00).
    #[error("{field} = {value:#b} is a reserved granule encoding")]
    ReservedGranule {
        /// "TCR_EL1.TG0", "TCR_EL1.TG1" or "VTCR_EL2.TG0".
        field: &'static str,
        /// Its value.
        value: u8,
    },
    /// VTCR_EL2's start level is reserved for the granule, needs a larger
    /// PA size or a feature, or cannot resolve T0SZ's input size with at
    /// most 16 concatenated tables (`AArch64.S2InvalidSL`,
    /// `AArch64.S2InconsistentSL`: every walk would take a level-0
    /// translation fault).
    #[error(
        "VTCR_EL2.SL0 = {sl0:#b} (SL2 = {sl2}) is not a usable start level for a {granule:?} \
         granule and T0SZ = {t0sz}"
    )]
    StartLevel {
        /// SL0.
        sl0: u8,
        /// SL2.
        sl2: bool,
        /// T0SZ.
        t0sz: u8,
        /// TG0.
        granule: Granule,
    },
    /// A base register is not aligned to its start-level table.
    #[error("{register} = {value:#x}: base not aligned to its {align}-byte start-level table")]
    MisalignedBase {
        /// "TTBR0_EL1", "TTBR1_EL1" or "VTTBR_EL2".
        register: &'static str,
        /// The register.
        value: u64,
        /// The alignment the table needs.
        align: u64,
    },
    /// The implemented PA size is not a PARange value.
    #[error("implemented PA size {pa_bits} is not one of 32, 36, 40, 42, 44, 48, 52")]
    PaBits {
        /// The size given.
        pa_bits: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(g: Granule, txsz: u8) -> u64 {
        table_bytes(g, 64 - u32::from(txsz), g.start_level(txsz))
    }

    #[test]
    fn start_levels() {
        assert_eq!(Granule::K4.start_level(12), -1);
        assert_eq!(Granule::K4.start_level(15), -1);
        assert_eq!(Granule::K4.start_level(16), 0);
        assert_eq!(Granule::K4.start_level(25), 1);
        assert_eq!(Granule::K4.start_level(34), 2);
        assert_eq!(Granule::K4.start_level(39), 2);
        assert_eq!(Granule::K16.start_level(12), 0);
        assert_eq!(Granule::K16.start_level(16), 0);
        assert_eq!(Granule::K16.start_level(17), 1);
        assert_eq!(Granule::K16.start_level(28), 2);
        assert_eq!(Granule::K16.start_level(39), 3);
        assert_eq!(Granule::K64.start_level(12), 1);
        assert_eq!(Granule::K64.start_level(16), 1);
        assert_eq!(Granule::K64.start_level(22), 2);
        assert_eq!(Granule::K64.start_level(35), 3);
        assert_eq!(bytes(Granule::K16, 16), 16);
        assert_eq!(bytes(Granule::K64, 16), 512);
        assert_eq!(bytes(Granule::K4, 16), 4096);
        assert_eq!(bytes(Granule::K4, 12), 128);
        assert_eq!(bytes(Granule::K16, 12), 256);
        assert_eq!(bytes(Granule::K64, 12), 8192);
        // A stage-2 start table: 40 bits from level 1 with 4 KiB is two
        // concatenated tables.
        assert_eq!(table_bytes(Granule::K4, 40, 1), 8192);
    }

    #[test]
    fn base_layouts() {
        let v = 0x0000_1234_5678_9000 | (0xa << 2) | 1;
        assert_eq!(base_address(v, false), 0x0000_1234_5678_9028);
        assert_eq!(base_address(v, true), 0x000a_1234_5678_9000);
        assert_eq!(oa_size(6, 52), 52);
        assert_eq!(oa_size(6, 48), 48);
        assert_eq!(oa_size(7, 44), 44);
        assert_eq!(oa_size(0, 52), 32);
    }

    #[test]
    fn refuses_undefined_values() {
        let ok = Aarch64Paging::new(Granule::K4, 0x1000, 0x2000);
        assert!(ok.decode().is_ok());
        let bad = |f: fn(&mut Aarch64Paging)| {
            let mut r = ok;
            f(&mut r);
            r.decode().unwrap_err()
        };
        assert!(matches!(
            bad(|r| r.tcr |= 1 << 6),
            Aarch64PagingError::Res0 { .. }
        ));
        assert!(matches!(
            bad(|r| r.tcr |= TCR_DS),
            Aarch64PagingError::FeatureAbsent {
                field: "TCR_EL1.DS",
                feature: "FEAT_LPA2"
            }
        ));
        // IPS 0b110 and 0b111 behave as the implemented PA size.
        let mut r = ok;
        r.tcr |= 7 << 32;
        assert_eq!(r.decode().unwrap().oa_bits, 48);
        r.pa_bits = 40;
        assert_eq!(r.decode().unwrap().oa_bits, 40);
        r.pa_bits = 52;
        assert_eq!(r.decode().unwrap().oa_bits, 52);
        assert!(matches!(
            bad(|r| r.tcr = (r.tcr & !0x3f) | 15),
            Aarch64PagingError::TxSz {
                field: "TCR_EL1.T0SZ",
                value: 15,
                min: 16,
                max: 39
            }
        ));
        assert!(matches!(
            bad(|r| r.tcr = (r.tcr & !(0x3f << 16)) | (40 << 16)),
            Aarch64PagingError::TxSz {
                field: "TCR_EL1.T1SZ",
                value: 40,
                ..
            }
        ));
        assert!(matches!(
            bad(|r| r.tcr |= 3 << 14),
            Aarch64PagingError::ReservedGranule {
                field: "TCR_EL1.TG0",
                ..
            }
        ));
        assert!(matches!(
            bad(|r| r.tcr &= !(3 << 30)),
            Aarch64PagingError::ReservedGranule {
                field: "TCR_EL1.TG1",
                ..
            }
        ));
        assert!(matches!(
            bad(|r| r.ttbr0 = 0x1800),
            Aarch64PagingError::MisalignedBase {
                register: "TTBR0_EL1",
                ..
            }
        ));
        assert!(matches!(
            bad(|r| r.pa_bits = 50),
            Aarch64PagingError::PaBits { pa_bits: 50 }
        ));
        // CnP and the ASID are not part of the base; a disabled range's
        // base is not read.
        let mut r = ok;
        r.ttbr0 |= 1 | (0x1234 << 48);
        r.ttbr1 = 0x10;
        r.tcr |= TCR_EPD1;
        assert!(r.decode().is_ok());
        assert_eq!(r.asid(), 0x34);
        r.tcr |= TCR_AS;
        assert_eq!(r.asid(), 0x1234);
    }

    #[test]
    fn fifty_two_bit_sizes() {
        let txsz = |r: &mut Aarch64Paging, t0: u64, t1: u64| {
            r.tcr = (r.tcr & !0x3f_003f) | t0 | (t1 << 16);
        };
        // 64 KiB: 52-bit VAs need FEAT_LVA.
        let mut r = Aarch64Paging::new(Granule::K64, 0x1_0000, 0x2_0000);
        txsz(&mut r, 12, 12);
        assert!(matches!(
            r.decode(),
            Err(Aarch64PagingError::TxSz { min: 16, .. })
        ));
        r.lva = true;
        assert!(r.decode().is_ok());
        // 4 KiB: with DS (and FEAT_LPA2) down to 12, not below.
        let mut r = Aarch64Paging::new(Granule::K4, 0x1000, 0x2000);
        r.lpa2 = true;
        r.pa_bits = 52;
        txsz(&mut r, 12, 16);
        assert!(matches!(
            r.decode(),
            Err(Aarch64PagingError::TxSz { min: 16, .. })
        ));
        r.tcr |= TCR_DS | (0b110 << 32);
        let t = r.decode().unwrap();
        assert!(t.ds && t.lpa2_layout(Granule::K4) && t.base52(Granule::K4));
        assert!(!t.lpa2_layout(Granule::K64));
        assert_eq!(t.oa_bits, 52);
        txsz(&mut r, 11, 16);
        assert!(matches!(
            r.decode(),
            Err(Aarch64PagingError::TxSz {
                value: 11,
                min: 12,
                ..
            })
        ));
        // The 52-bit base layout: BADDR[51:48] in bits 5:2, and a table of
        // at least 64 bytes (a 16-entry level -1 table is 128).
        txsz(&mut r, 12, 16);
        r.ttbr0 = 0x1000 | (0x3 << 2);
        assert!(r.decode().is_ok());
        r.ttbr0 = 0x1040;
        assert!(matches!(
            r.decode(),
            Err(Aarch64PagingError::MisalignedBase { align: 128, .. })
        ));
    }
}
