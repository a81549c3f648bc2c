//! The RISC-V (RV64) address-translation registers as a guest or hypervisor
//! holds them: [`RiscvPaging`] for the first stage (`satp`, or `vsatp` for
//! a guest's VS stage, with the status and environment-configuration bits
//! the walk reads) and [`RiscvGStage`] for the G stage (`hgatp`), their
//! decoded forms ([`Satp`], [`Hgatp`], [`RiscvMode`]), and which values a
//! hart can hold: `decode` refuses the rest with the register and field
//! named ([`RiscvPagingError`]). It knows nothing of page-table entries
//! (`riscv.rs`, which imports it).
//!
//! What is refused, and why (RISC-V privileged specification, "Supervisor
//! Address Translation and Protection (satp) Register" and the H
//! extension's `hgatp`):
//! - a reserved or custom MODE (1..=7, 11..=15 in `satp`; the same and
//!   Sv64's 11 in `hgatp`): a write of an unsupported MODE to `satp` is
//!   ignored, so no hart holds one, and `hgatp`'s fields are WARL;
//! - `hgatp` bits 59:58, which read as zero;
//! - an `hgatp` root not aligned to its 16 KiB root table (`PPN[1:0]`
//!   always read as zero in the paged modes);
//! - a root above the physical-address width (the PPN field is WARL with
//!   the implemented bits only);
//! - a physical-address width outside 32..=56 bits (Sv39 and up produce
//!   56-bit physical addresses; below 32 no RV64 system exists).

/// `sstatus.SUM` (bit 18): S-mode may read and write U pages.
pub const SSTATUS_SUM: u64 = 1 << 18;
/// `sstatus.MXR` (bit 19): loads may read executable pages.
pub const SSTATUS_MXR: u64 = 1 << 19;
/// `menvcfg`/`henvcfg.ADUE` (bit 61): hardware updates A and D (Svadu).
pub const ENVCFG_ADUE: u64 = 1 << 61;
/// `menvcfg`/`henvcfg.PBMTE` (bit 62): Svpbmt is enabled.
pub const ENVCFG_PBMTE: u64 = 1 << 62;

/// The `satp` and `hgatp` PPN field (bits 43:0).
const PPN_FIELD: u64 = (1 << 44) - 1;
/// `hgatp` bits 59:58, read-only zero.
const HGATP_ZERO: u64 = 3 << 58;

/// A paged translation scheme: Sv39, Sv48 or Sv57 for the first stage,
/// Sv39x4, Sv48x4 or Sv57x4 (the same tables, two more input bits at the
/// root) for the G stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RiscvMode {
    /// Three levels: 39-bit virtual (41-bit guest-physical) addresses.
    Sv39,
    /// Four levels: 48-bit virtual (50-bit guest-physical) addresses.
    Sv48,
    /// Five levels: 57-bit virtual (59-bit guest-physical) addresses.
    Sv57,
}

impl RiscvMode {
    /// The number of table levels.
    pub const fn levels(self) -> u8 {
        match self {
            RiscvMode::Sv39 => 3,
            RiscvMode::Sv48 => 4,
            RiscvMode::Sv57 => 5,
        }
    }

    /// The width of a first-stage virtual address (39, 48 or 57); the G
    /// stage translates two bits more.
    pub const fn va_bits(self) -> u32 {
        12 + 9 * self.levels() as u32
    }

    /// The MODE field's value for this scheme (8, 9 or 10, in `satp` and
    /// `hgatp` alike).
    pub const fn mode_field(self) -> u64 {
        match self {
            RiscvMode::Sv39 => 8,
            RiscvMode::Sv48 => 9,
            RiscvMode::Sv57 => 10,
        }
    }

    /// The scheme a MODE field names: `Ok(None)` for Bare (0), `Err` with
    /// the value for a reserved or custom one.
    const fn from_field(mode: u64) -> Result<Option<Self>, u8> {
        match mode {
            0 => Ok(None),
            8 => Ok(Some(RiscvMode::Sv39)),
            9 => Ok(Some(RiscvMode::Sv48)),
            10 => Ok(Some(RiscvMode::Sv57)),
            // MODE is 4 bits.
            m => Err((m & 0xf) as u8),
        }
    }
}

/// The first stage's registers: `satp` (or, for a guest with V=1, `vsatp`)
/// with the status and extension bits the walk reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RiscvPaging {
    /// `satp` (`vsatp` for a VS-stage walk): MODE in bits 63:60 (0 Bare,
    /// 8 Sv39, 9 Sv48, 10 Sv57), ASID in 59:44, the root table's physical
    /// page number in 43:0. Under a G stage the root is a guest-physical
    /// address.
    pub satp: u64,
    /// `sstatus.SUM` (`vsstatus.SUM` for a VS-stage walk): S-mode loads and
    /// stores may use U pages (fetches never may).
    pub sum: bool,
    /// `sstatus.MXR` for an HS- or S-level walk; for a VS-stage walk,
    /// `vsstatus.MXR` OR the HS-level `sstatus.MXR` (which makes executable
    /// pages readable in both stages): loads may read pages marked
    /// executable.
    pub mxr: bool,
    /// Svadu in force (`menvcfg.ADUE` for S/HS, `henvcfg.ADUE` for the VS
    /// stage): hardware sets A, and D on a store, by compare-exchange.
    /// Off (Svade), a leaf with A clear, or D clear on a store, is a page
    /// fault.
    pub adue: bool,
    /// Svpbmt in force (`menvcfg.PBMTE`, `henvcfg.PBMTE` for the VS stage):
    /// a leaf's PBMT field may be 1 (NC) or 2 (IO). Off, a nonzero PBMT is
    /// reserved (a page fault).
    pub pbmte: bool,
    /// Svnapot implemented: a level-0 leaf with N set and `PPN[3:0]` =
    /// 0b1000 maps 64 KiB. Without it N is reserved (a page fault).
    pub svnapot: bool,
    /// The implemented physical-address width in bits (32..=56): a table or
    /// page at or above `1 << pa_bits` is an access fault. 56 (every
    /// address a PTE can name) for a VS-stage walk under a G stage, whose
    /// output is a guest-physical address the G stage checks.
    pub pa_bits: u8,
}

impl RiscvPaging {
    /// `mode` rooted at the physical address `root` (its page number goes
    /// into `satp.PPN`), ASID 0, SUM and MXR clear, no Svadu, Svpbmt or
    /// Svnapot, a 56-bit physical-address width.
    pub const fn new(mode: RiscvMode, root: u64) -> Self {
        RiscvPaging {
            satp: (mode.mode_field() << 60) | ((root >> 12) & PPN_FIELD),
            sum: false,
            mxr: false,
            adue: false,
            pbmte: false,
            svnapot: false,
            pa_bits: 56,
        }
    }

    /// Translation off (`satp.MODE` = Bare).
    pub const fn bare() -> Self {
        RiscvPaging {
            satp: 0,
            ..Self::new(RiscvMode::Sv39, 0)
        }
    }

    /// The same registers with SUM and MXR taken from `sstatus` (or
    /// `vsstatus`).
    pub const fn with_status(self, sstatus: u64) -> Self {
        RiscvPaging {
            sum: sstatus & SSTATUS_SUM != 0,
            mxr: sstatus & SSTATUS_MXR != 0,
            ..self
        }
    }

    /// The same registers with ADUE and PBMTE taken from `menvcfg` (or
    /// `henvcfg` for the VS stage).
    pub const fn with_envcfg(self, envcfg: u64) -> Self {
        RiscvPaging {
            adue: envcfg & ENVCFG_ADUE != 0,
            pbmte: envcfg & ENVCFG_PBMTE != 0,
            ..self
        }
    }

    /// The address-space identifier (`satp` bits 59:44).
    pub const fn asid(&self) -> u16 {
        ((self.satp >> 44) & 0xffff) as u16
    }

    /// `satp` checked: `Ok(None)` for Bare (no translation), the scheme,
    /// ASID and root otherwise.
    pub fn decode(&self) -> Result<Option<Satp>, RiscvPagingError> {
        check_pa_bits(self.pa_bits)?;
        let mode = RiscvMode::from_field(self.satp >> 60).map_err(|mode| {
            RiscvPagingError::ReservedMode {
                register: "satp",
                mode,
            }
        })?;
        let Some(mode) = mode else {
            return Ok(None);
        };
        let root = (self.satp & PPN_FIELD) << 12;
        check_root("satp", root, self.pa_bits)?;
        Ok(Some(Satp {
            mode,
            asid: ((self.satp >> 44) & 0xffff) as u16,
            root,
        }))
    }
}

/// `satp` (or `vsatp`) as the walk reads it, checked by
/// [`RiscvPaging::decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Satp {
    /// The translation scheme.
    pub mode: RiscvMode,
    /// The address-space identifier (bits 59:44).
    pub asid: u16,
    /// The root table's address (`PPN << 12`).
    pub root: u64,
}

/// The G stage's registers: `hgatp` with the extension bits the walk
/// reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RiscvGStage {
    /// `hgatp`: MODE in bits 63:60 (0 Bare, 8 Sv39x4, 9 Sv48x4, 10
    /// Sv57x4), bits 59:58 zero, VMID in 57:44, the 16 KiB root table's
    /// physical page number in 43:0 (`PPN[1:0]` zero).
    pub hgatp: u64,
    /// The HS-level `sstatus.MXR`, which also makes executable G-stage
    /// pages readable (`vsstatus.MXR` does not reach the G stage).
    pub mxr: bool,
    /// `menvcfg.ADUE`: hardware sets A and D in G-stage entries (Svadu);
    /// off, A clear or D clear on a store is a guest-page fault.
    pub adue: bool,
    /// `menvcfg.PBMTE`: G-stage leaves may carry PBMT 1 or 2.
    pub pbmte: bool,
    /// Svnapot implemented (64 KiB NAPOT leaves at level 0).
    pub svnapot: bool,
    /// The implemented physical-address width in bits (32..=56): a table or
    /// page at or above `1 << pa_bits` is an access fault.
    pub pa_bits: u8,
}

impl RiscvGStage {
    /// `mode` (as its x4 variant) rooted at the physical address `root` (16
    /// KiB aligned for [`RiscvGStage::decode`] to accept it), VMID 0, MXR
    /// clear, no Svadu, Svpbmt or Svnapot, a 56-bit physical-address width.
    pub const fn new(mode: RiscvMode, root: u64) -> Self {
        RiscvGStage {
            hgatp: (mode.mode_field() << 60) | ((root >> 12) & PPN_FIELD),
            mxr: false,
            adue: false,
            pbmte: false,
            svnapot: false,
            pa_bits: 56,
        }
    }

    /// The same registers with ADUE and PBMTE taken from `menvcfg`.
    pub const fn with_envcfg(self, menvcfg: u64) -> Self {
        RiscvGStage {
            adue: menvcfg & ENVCFG_ADUE != 0,
            pbmte: menvcfg & ENVCFG_PBMTE != 0,
            ..self
        }
    }

    /// `hgatp` checked: `Ok(None)` for Bare (guest-physical addresses are
    /// supervisor-physical ones), the scheme, VMID and root otherwise.
    pub fn decode(&self) -> Result<Option<Hgatp>, RiscvPagingError> {
        check_pa_bits(self.pa_bits)?;
        let hgatp = self.hgatp;
        let mode =
            RiscvMode::from_field(hgatp >> 60).map_err(|mode| RiscvPagingError::ReservedMode {
                register: "hgatp",
                mode,
            })?;
        if hgatp & HGATP_ZERO != 0 {
            return Err(RiscvPagingError::NonZero {
                register: "hgatp",
                field: "bits 59:58",
                value: hgatp,
            });
        }
        let Some(mode) = mode else {
            return Ok(None);
        };
        if hgatp & 3 != 0 {
            return Err(RiscvPagingError::NonZero {
                register: "hgatp",
                field: "PPN[1:0] (the root table is 16 KiB aligned)",
                value: hgatp,
            });
        }
        let root = (hgatp & PPN_FIELD) << 12;
        check_root("hgatp", root, self.pa_bits)?;
        Ok(Some(Hgatp {
            mode,
            vmid: ((hgatp >> 44) & 0x3fff) as u16,
            root,
        }))
    }
}

/// `hgatp` as the walk reads it, checked by [`RiscvGStage::decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hgatp {
    /// The scheme, walked as its x4 variant.
    pub mode: RiscvMode,
    /// The virtual-machine identifier (bits 57:44).
    pub vmid: u16,
    /// The 16 KiB root table's address (`PPN << 12`).
    pub root: u64,
}

fn check_pa_bits(pa_bits: u8) -> Result<(), RiscvPagingError> {
    if (32..=56).contains(&pa_bits) {
        Ok(())
    } else {
        Err(RiscvPagingError::PaBits { pa_bits })
    }
}

fn check_root(register: &'static str, root: u64, pa_bits: u8) -> Result<(), RiscvPagingError> {
    if root >> pa_bits != 0 {
        return Err(RiscvPagingError::RootTooWide {
            register,
            root,
            pa_bits,
        });
    }
    Ok(())
}

/// Register values no hart holds; each names the register and field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RiscvPagingError {
    /// MODE is reserved or custom (not Bare, Sv39, Sv48 or Sv57).
    #[error("{register}.MODE = {mode} is reserved (0 Bare, 8 Sv39, 9 Sv48, 10 Sv57)")]
    ReservedMode {
        /// "satp" or "hgatp".
        register: &'static str,
        /// The MODE field.
        mode: u8,
    },
    /// A field that reads as zero is not.
    #[error("{register} = {value:#x}: {field} must be zero")]
    NonZero {
        /// "hgatp".
        register: &'static str,
        /// The field.
        field: &'static str,
        /// The register.
        value: u64,
    },
    /// The root table lies above the physical-address width.
    #[error(
        "{register}.PPN: root table {root:#x} is above the {pa_bits}-bit physical-address width"
    )]
    RootTooWide {
        /// "satp" or "hgatp".
        register: &'static str,
        /// The root's address.
        root: u64,
        /// The width given.
        pa_bits: u8,
    },
    /// The physical-address width is outside 32..=56.
    #[error("physical-address width {pa_bits} is outside 32..=56 bits")]
    PaBits {
        /// The width given.
        pa_bits: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn satp_modes_and_fields() {
        assert_eq!(RiscvPaging::bare().decode(), Ok(None));
        for (mode, levels, va) in [
            (RiscvMode::Sv39, 3, 39),
            (RiscvMode::Sv48, 4, 48),
            (RiscvMode::Sv57, 5, 57),
        ] {
            assert_eq!((mode.levels(), mode.va_bits()), (levels, va));
            let mut r = RiscvPaging::new(mode, 0x8020_3000);
            r.satp |= 0xbeef << 44;
            let s = r.decode().unwrap().unwrap();
            assert_eq!((s.mode, s.asid, s.root), (mode, 0xbeef, 0x8020_3000));
        }
        for m in (1..=7).chain(11..=15) {
            let r = RiscvPaging {
                satp: m << 60,
                ..RiscvPaging::bare()
            };
            assert_eq!(
                r.decode(),
                Err(RiscvPagingError::ReservedMode {
                    register: "satp",
                    mode: u8::try_from(m).unwrap()
                })
            );
        }
        let mut r = RiscvPaging::new(RiscvMode::Sv39, 1 << 40);
        r.pa_bits = 40;
        assert!(matches!(
            r.decode(),
            Err(RiscvPagingError::RootTooWide {
                register: "satp",
                ..
            })
        ));
        r.pa_bits = 41;
        assert!(r.decode().is_ok());
        for bad in [31, 57, 64] {
            r.pa_bits = bad;
            assert_eq!(r.decode(), Err(RiscvPagingError::PaBits { pa_bits: bad }));
        }
        let r = RiscvPaging::bare()
            .with_status(SSTATUS_SUM | SSTATUS_MXR)
            .with_envcfg(ENVCFG_ADUE | ENVCFG_PBMTE);
        assert!(r.sum && r.mxr && r.adue && r.pbmte && !r.svnapot);
    }

    #[test]
    fn hgatp_modes_alignment_and_fields() {
        let g = RiscvGStage::new(RiscvMode::Sv48, 0x8000_4000);
        let mut v = g;
        v.hgatp |= 0x2abc << 44;
        let h = v.decode().unwrap().unwrap();
        assert_eq!(
            (h.mode, h.vmid, h.root),
            (RiscvMode::Sv48, 0x2abc, 0x8000_4000)
        );
        // The root must be 16 KiB aligned.
        for misaligned in [0x8000_1000u64, 0x8000_2000, 0x8000_3000] {
            let e = RiscvGStage::new(RiscvMode::Sv39, misaligned).decode();
            assert!(matches!(
                e,
                Err(RiscvPagingError::NonZero {
                    register: "hgatp",
                    field,
                    ..
                }) if field.starts_with("PPN[1:0]")
            ));
        }
        // Bits 59:58 read as zero, Bare included.
        let mut z = g;
        z.hgatp |= 1 << 58;
        assert!(matches!(
            z.decode(),
            Err(RiscvPagingError::NonZero {
                field: "bits 59:58",
                ..
            })
        ));
        let bare = RiscvGStage { hgatp: 0, ..g };
        assert_eq!(bare.decode(), Ok(None));
        for m in [1u64, 7, 11, 15] {
            let r = RiscvGStage {
                hgatp: m << 60,
                ..g
            };
            assert!(matches!(
                r.decode(),
                Err(RiscvPagingError::ReservedMode {
                    register: "hgatp",
                    ..
                })
            ));
        }
        let w = RiscvGStage::new(RiscvMode::Sv39, 0).with_envcfg(ENVCFG_ADUE);
        assert!(w.adue && !w.pbmte);
    }
}
