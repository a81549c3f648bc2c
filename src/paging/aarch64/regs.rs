//! The AArch64 stage-1 paging registers of the EL1&0 regime as a guest
//! holds them ([`Aarch64Paging`]: TCR_EL1, TTBR0_EL1, TTBR1_EL1, SCTLR_EL1,
//! MAIR_EL1, PSTATE.PAN and the implemented physical-address size), their
//! fields ([`Granule`], [`Tcr`]), and which values a processor's walk gives
//! a defined meaning: [`Aarch64Paging::decode`] refuses the rest with the
//! field named. It knows nothing of descriptors (`aarch64.rs`, which imports
//! it).
//!
//! What is refused, and why (Arm ARM DDI 0487, D8 "The AArch64 Virtual
//! Memory System Architecture", and the TCR_EL1 / TTBRn_EL1 register
//! descriptions):
//! - a reserved TG0/TG1 encoding (TG0 = 0b11, TG1 = 0b00): the granule used
//!   is IMPLEMENTATION DEFINED;
//! - T0SZ/T1SZ outside 16..=39: below 16 needs FEAT_LVA (52-bit VA, out of
//!   scope here), above 39 needs FEAT_TTST; otherwise the behaviour is
//!   CONSTRAINED UNPREDICTABLE (treated as the limit, or a fault);
//! - TCR_EL1.DS = 1 (FEAT_LPA2, out of scope here);
//! - SCTLR_EL1.EE = 1 with the MMU on: big-endian table walks (descriptors
//!   are read little-endian here);
//! - TCR_EL1 bits 6 and 35, which are RES0 in every architecture version;
//! - a TTBR base not aligned to its start-level table (at least 64 bytes):
//!   BADDR's bits below the table size are RES0, and whether a set one is
//!   used is CONSTRAINED UNPREDICTABLE (v8.0's pseudocode drops them, so a
//!   v8.0 part would walk the aligned table: refusing is the strict choice,
//!   which a next session may relax to masking);
//! - an implemented physical-address size that is not one of
//!   ID_AA64MMFR0_EL1.PARange's values up to 48 bits (52-bit PA is LPA).

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

    fn from_tg0(v: u64) -> Option<Self> {
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
    pub const fn start_level(self, txsz: u8) -> u8 {
        // Saturating, so a TxSZ `decode` refuses still gives a level.
        let bits = 64u32
            .saturating_sub(txsz as u32)
            .saturating_sub(self.shift());
        let levels = bits.div_ceil(self.stride());
        // At least one level, so the result is 0..=3.
        let levels = if levels == 0 { 1 } else { levels };
        (4u32.saturating_sub(levels) & 3) as u8
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
/// (KVM_GET_ONE_REG, a gdbstub, a saved state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Aarch64Paging {
    /// TCR_EL1.
    pub tcr: u64,
    /// TTBR0_EL1: base address in bits 47:1, CnP in bit 0, ASID in 63:48.
    pub ttbr0: u64,
    /// TTBR1_EL1, laid out as TTBR0_EL1.
    pub ttbr1: u64,
    /// SCTLR_EL1 (M and WXN are read; EE is refused with the MMU on).
    pub sctlr: u64,
    /// MAIR_EL1: eight attribute bytes, indexed by a descriptor's AttrIndx.
    pub mair: u64,
    /// PSTATE.PAN: EL1 data accesses to EL0-accessible pages fault.
    pub pan: bool,
    /// The implemented physical-address size in bits
    /// (ID_AA64MMFR0_EL1.PARange): 32, 36, 40, 42, 44 or 48.
    pub pa_bits: u8,
}

impl Aarch64Paging {
    /// Registers for the common Linux layout: both ranges with `granule`
    /// and 48-bit VAs (T0SZ = T1SZ = 16), 48-bit IPS, MMU on, no PAN, WXN,
    /// HA or HD; `ttbr0`/`ttbr1` are the two roots, ASID 0.
    pub const fn new(granule: Granule, ttbr0: u64, ttbr1: u64) -> Self {
        Aarch64Paging {
            tcr: 16 | (granule.tg0() << 14) | (16 << 16) | (granule.tg1() << 30) | (0b101 << 32),
            ttbr0,
            ttbr1,
            sctlr: SCTLR_M,
            mair: 0,
            pan: false,
            pa_bits: 48,
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
        if tcr & TCR_DS != 0 {
            return Err(Aarch64PagingError::Unsupported {
                field: "TCR_EL1.DS (LPA2)",
            });
        }
        if self.sctlr & SCTLR_M != 0 && self.sctlr & SCTLR_EE != 0 {
            // Descriptors are read little-endian.
            return Err(Aarch64PagingError::Unsupported {
                field: "SCTLR_EL1.EE (big-endian table walks)",
            });
        }
        let pa_bits = self.pa_bits;
        if !matches!(pa_bits, 32 | 36 | 40 | 42 | 44 | 48) {
            return Err(Aarch64PagingError::PaBits { pa_bits });
        }
        let ips = (tcr >> 32) & 7;
        let ips_bits: u8 = match ips {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            5 => 48,
            // 0b110 is 52 bits with FEAT_LPA; 0b111 is reserved and
            // behaves as 0b101 or 0b110 (v8.0's `AArch64.TranslationTableWalk`:
            // "otherwise outputsize = 48"). Either way an IPS above the
            // implemented size behaves as that size ("if outputsize >
            // PAMax() then outputsize = PAMax()"), at most 48 bits here.
            _ => 52,
        };
        let field = |v: u64| (v & 0x3f) as u8;
        let (t0sz, t1sz) = (field(tcr), field(tcr >> 16));
        for (name, v) in [("T0SZ", t0sz), ("T1SZ", t1sz)] {
            if !(16..=39).contains(&v) {
                return Err(Aarch64PagingError::TxSz {
                    field: name,
                    value: v,
                });
            }
        }
        let tg0 =
            Granule::from_tg0((tcr >> 14) & 3).ok_or(Aarch64PagingError::ReservedGranule {
                field: "TG0",
                value: ((tcr >> 14) & 3) as u8,
            })?;
        let tg1 =
            Granule::from_tg1((tcr >> 30) & 3).ok_or(Aarch64PagingError::ReservedGranule {
                field: "TG1",
                value: ((tcr >> 30) & 3) as u8,
            })?;
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
            e0pd0: tcr & TCR_E0PD0 != 0,
            e0pd1: tcr & TCR_E0PD1 != 0,
            oa_bits: ips_bits.min(pa_bits),
        };
        for (reg, value, granule, txsz, enabled) in [
            ("TTBR0_EL1", self.ttbr0, tg0, t0sz, !t.epd0),
            ("TTBR1_EL1", self.ttbr1, tg1, t1sz, !t.epd1),
        ] {
            let align = table_bytes(granule, txsz).max(64);
            let base = value & BADDR;
            if enabled && base & (align - 1) & !1 != 0 {
                return Err(Aarch64PagingError::MisalignedBase {
                    register: reg,
                    value,
                    align,
                });
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

/// Bytes of the start-level table for a granule and TxSZ.
pub(crate) const fn table_bytes(g: Granule, txsz: u8) -> u64 {
    let start = g.start_level(txsz) as u32;
    let top = 64 - txsz as u32;
    let shift = g.shift() + g.stride() * (3 - start);
    8 << (top - shift)
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
    /// E0PD0: every EL0 access to the TTBR0 range takes a level 0
    /// translation fault.
    pub e0pd0: bool,
    /// E0PD1: likewise for the TTBR1 range.
    pub e0pd1: bool,
    /// The output-address size in force: IPS capped at the implemented PA
    /// size.
    pub oa_bits: u8,
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
    /// T0SZ or T1SZ outside 16..=39.
    #[error("TCR_EL1.{field} = {value} is outside 16..=39 (a VA size of 25 to 48 bits)")]
    TxSz {
        /// "T0SZ" or "T1SZ".
        field: &'static str,
        /// Its value.
        value: u8,
    },
    /// TG0 = 0b11 or TG1 = 0b00.
    #[error("TCR_EL1.{field} = {value:#b} is a reserved granule encoding")]
    ReservedGranule {
        /// "TG0" or "TG1".
        field: &'static str,
        /// Its value.
        value: u8,
    },
    /// A TTBR's base is not aligned to its start-level table.
    #[error("{register} = {value:#x}: base not aligned to its {align}-byte start-level table")]
    MisalignedBase {
        /// "TTBR0_EL1" or "TTBR1_EL1".
        register: &'static str,
        /// The register.
        value: u64,
        /// The alignment the table needs.
        align: u64,
    },
    /// The implemented PA size is not a PARange value up to 48 bits.
    #[error("implemented PA size {pa_bits} is not one of 32, 36, 40, 42, 44, 48")]
    PaBits {
        /// The size given.
        pa_bits: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_levels() {
        assert_eq!(Granule::K4.start_level(16), 0);
        assert_eq!(Granule::K4.start_level(25), 1);
        assert_eq!(Granule::K4.start_level(34), 2);
        assert_eq!(Granule::K4.start_level(39), 2);
        assert_eq!(Granule::K16.start_level(16), 0);
        assert_eq!(Granule::K16.start_level(17), 1);
        assert_eq!(Granule::K16.start_level(28), 2);
        assert_eq!(Granule::K16.start_level(39), 3);
        assert_eq!(Granule::K64.start_level(16), 1);
        assert_eq!(Granule::K64.start_level(22), 2);
        assert_eq!(Granule::K64.start_level(35), 3);
        assert_eq!(table_bytes(Granule::K16, 16), 16);
        assert_eq!(table_bytes(Granule::K64, 16), 512);
        assert_eq!(table_bytes(Granule::K4, 16), 4096);
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
            Aarch64PagingError::Unsupported { .. }
        ));
        // IPS 0b110 and 0b111 behave as the implemented PA size.
        let mut r = ok;
        r.tcr |= 7 << 32;
        assert_eq!(r.decode().unwrap().oa_bits, 48);
        r.pa_bits = 40;
        assert_eq!(r.decode().unwrap().oa_bits, 40);
        assert!(matches!(
            bad(|r| r.tcr = (r.tcr & !0x3f) | 15),
            Aarch64PagingError::TxSz {
                field: "T0SZ",
                value: 15
            }
        ));
        assert!(matches!(
            bad(|r| r.tcr = (r.tcr & !(0x3f << 16)) | (40 << 16)),
            Aarch64PagingError::TxSz {
                field: "T1SZ",
                value: 40
            }
        ));
        assert!(matches!(
            bad(|r| r.tcr |= 3 << 14),
            Aarch64PagingError::ReservedGranule { field: "TG0", .. }
        ));
        assert!(matches!(
            bad(|r| r.tcr &= !(3 << 30)),
            Aarch64PagingError::ReservedGranule { field: "TG1", .. }
        ));
        assert!(matches!(
            bad(|r| r.ttbr0 = 0x1800),
            Aarch64PagingError::MisalignedBase {
                register: "TTBR0_EL1",
                ..
            }
        ));
        assert!(matches!(
            bad(|r| r.pa_bits = 52),
            Aarch64PagingError::PaBits { pa_bits: 52 }
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
}
