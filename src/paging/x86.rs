//! x86 paging: the guest's registers ([`X86Paging`]), the mode they select
//! ([`X86Mode`]), and the entry formats of 32-bit, PAE, 4-level and 5-level
//! paging with their permission rules (R/W, U/S, XD with EFER.NXE, CR0.WP,
//! SMEP, SMAP, protection keys), reserved bits per level and the page-fault
//! error code. AMD's nested page tables reuse the 4/5-level format, with
//! every access checked as a user access.
//!
//! References: Intel SDM vol. 3A chapter 4 (Paging), AMD APM vol. 2 §5 and
//! §15.25 (nested paging).

use super::{
    fault::{pf, FaultReason},
    format::{bits, Decoded, Denied, Format},
    lean::{LeanOut, ReadEntry, RootWalk},
    memory::PhysMemory,
    types::{Access, AccessKind, LeafAttributes, Permissions, Privilege, PAGE_SHIFT_U8},
};
use crate::addr::PAGE_SHIFT;

mod regs;

pub use regs::{
    X86Mode, X86Paging, X86PagingError, X86Register, CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE,
    CR4_PCIDE, CR4_PGE, CR4_PKE, CR4_PKS, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_LME,
    EFER_NXE,
};

/// Entry bits shared by every x86 format.
pub(crate) const P: u64 = 1 << 0;
pub(crate) const RW: u64 = 1 << 1;
pub(crate) const US: u64 = 1 << 2;
pub(crate) const PWT: u64 = 1 << 3;
pub(crate) const PCD: u64 = 1 << 4;
pub(crate) const A: u64 = 1 << 5;
pub(crate) const D: u64 = 1 << 6;
pub(crate) const PS: u64 = 1 << 7;
pub(crate) const G: u64 = 1 << 8;
pub(crate) const XD: u64 = 1 << 63;

/// An x86 table format, first level or AMD nested.
#[derive(Clone, Copy, Debug)]
pub(crate) struct X86Format {
    mode: X86Mode,
    root: u64,
    maxphy: u32,
    nxe: bool,
    pse: bool,
    gbpages: bool,
    wp: bool,
    smep: bool,
    smap: bool,
    pke: bool,
    pks: bool,
    pkru: u32,
    pkrs: u32,
    /// AMD nested paging: every access is checked as a user access.
    npt: bool,
    /// Reserved physical-address bits (and XD without NXE), precomputed.
    phys: u64,
    /// Table and 4 KiB frame address bits, precomputed.
    mask: u64,
}

// Accumulated permissions: the AND of U/S and R/W, the OR of XD, the first
// level that cleared or set each, and the leaf's level.
// R/W and U/S sit where the entry has them, so the lean walk folds an
// entry in with one AND.
const ACC_RW: u64 = RW;
const ACC_USER: u64 = US;
const ACC_XD: u64 = 1 << 3;
const ACC_FIRST_SUPER: u32 = 8;
const ACC_FIRST_RO: u32 = 12;
const ACC_FIRST_XD: u32 = 16;
const ACC_LEAF: u32 = 20;

#[inline]
fn acc_level(acc: u64, at: u32) -> u8 {
    ((acc >> at) & 0xf) as u8
}

#[inline]
fn set_first(acc: u64, at: u32, level: u8) -> u64 {
    if acc_level(acc, at) == 0 {
        acc | (u64::from(level) << at)
    } else {
        acc
    }
}

impl X86Format {
    /// The guest's format, for a mode with paging.
    pub(crate) fn first_level(regs: &X86Paging, mode: X86Mode) -> Self {
        let maxphy = u32::from(regs.maxphyaddr);
        let root = match mode {
            X86Mode::NoPaging | X86Mode::Bits32 => regs.cr3 & 0xffff_f000,
            X86Mode::Pae => regs.cr3 & 0xffff_ffe0,
            X86Mode::Level4 | X86Mode::Level5 => regs.cr3 & bits(12, maxphy - 1),
        };
        let long = matches!(mode, X86Mode::Level4 | X86Mode::Level5);
        X86Format {
            mode,
            root,
            maxphy,
            // XD exists only in PAE and IA-32e paging.
            nxe: regs.efer & EFER_NXE != 0 && mode != X86Mode::Bits32,
            pse: regs.cr4 & CR4_PSE != 0 || mode != X86Mode::Bits32,
            gbpages: regs.gbpages,
            wp: regs.cr0 & CR0_WP != 0,
            smep: regs.cr4 & CR4_SMEP != 0,
            smap: regs.cr4 & CR4_SMAP != 0,
            pke: long && regs.cr4 & CR4_PKE != 0,
            pks: long && regs.cr4 & CR4_PKS != 0,
            pkru: regs.pkru,
            pkrs: regs.pkrs,
            npt: false,
            phys: 0,
            mask: 0,
        }
        .with_masks()
    }

    /// Fills the precomputed masks.
    fn with_masks(mut self) -> Self {
        self.phys = self.phys_reserved();
        self.mask = self.addr_mask();
        self
    }

    /// AMD nested page tables rooted at `ncr3`.
    pub(crate) fn nested(ncr3: u64, five_level: bool, nxe: bool, maxphyaddr: u8) -> Self {
        let maxphy = u32::from(maxphyaddr.clamp(32, 52));
        X86Format {
            mode: if five_level {
                X86Mode::Level5
            } else {
                X86Mode::Level4
            },
            root: ncr3 & bits(12, maxphy - 1),
            maxphy,
            nxe,
            pse: true,
            gbpages: true,
            wp: true,
            smep: false,
            smap: false,
            pke: false,
            pks: false,
            pkru: 0,
            pkrs: 0,
            npt: true,
            phys: 0,
            mask: 0,
        }
        .with_masks()
    }

    /// Whether fetches set the I/D bit of the error code.
    fn reports_fetch(&self) -> bool {
        self.nxe || self.smep
    }

    /// The #PF error code for a fault with `reason` on `access`.
    pub(crate) fn error_code(&self, reason: FaultReason, access: Access) -> u32 {
        let mut ec = 0;
        if reason != FaultReason::NotPresent {
            ec |= pf::PRESENT;
        }
        if access.is_write() {
            ec |= pf::WRITE;
        }
        if access.is_user() || self.npt {
            ec |= pf::USER;
        }
        if matches!(reason, FaultReason::Reserved { .. }) {
            ec |= pf::RSVD;
        }
        if access.is_fetch() && (self.reports_fetch() || self.npt) {
            ec |= pf::FETCH;
        }
        if matches!(reason, FaultReason::ProtectionKey { .. }) {
            ec |= pf::PK;
        }
        ec
    }

    fn phys_reserved(&self) -> u64 {
        let high = match self.mode {
            // PAE: bits 62:MAXPHYADDR are reserved.
            X86Mode::Pae => bits(self.maxphy, 62),
            // 4/5-level: bits 51:MAXPHYADDR; 62:52 are ignored (or keys).
            _ => bits(self.maxphy, 51),
        };
        high | if self.nxe { 0 } else { XD }
    }

    fn addr_mask(&self) -> u64 {
        bits(12, self.maxphy - 1)
    }

    /// Protection-key check for a data access to a page with `user_page`.
    fn key_check(
        &self,
        leaf: u64,
        access: Access,
        user_page: bool,
        level: u8,
    ) -> Result<(), Denied> {
        let (enabled, rights) = if user_page {
            (self.pke, self.pkru)
        } else {
            (self.pks, self.pkrs)
        };
        if !enabled || access.is_fetch() {
            return Ok(());
        }
        let key = ((leaf >> 59) & 0xf) as u8;
        let ad = rights >> (2 * u32::from(key)) & 1 != 0;
        let wd = rights >> (2 * u32::from(key) + 1) & 1 != 0;
        let denied = ad || (access.is_write() && wd && (access.is_user() || self.wp));
        if denied {
            Err(Denied {
                level,
                reason: FaultReason::ProtectionKey { key },
            })
        } else {
            Ok(())
        }
    }
}

impl Format for X86Format {
    #[inline]
    fn top_level(&self) -> u8 {
        self.mode.levels()
    }

    #[inline]
    fn root(&self) -> u64 {
        self.root
    }

    #[inline]
    fn wide(&self) -> bool {
        self.mode != X86Mode::Bits32
    }

    #[inline]
    fn check_input(&self, va: u64) -> Result<(), FaultReason> {
        match self.mode {
            X86Mode::NoPaging | X86Mode::Bits32 | X86Mode::Pae => {
                if va > u64::from(u32::MAX) {
                    return Err(FaultReason::AddressTooWide);
                }
            }
            X86Mode::Level4 | X86Mode::Level5 => {
                let width = if self.mode == X86Mode::Level5 { 57 } else { 48 };
                if self.npt {
                    // A guest-physical address has no sign extension.
                    if va >> width != 0 {
                        return Err(FaultReason::AddressTooWide);
                    }
                } else if ((va << (64 - width)) as i64 >> (64 - width)) as u64 != va {
                    return Err(FaultReason::NonCanonical);
                }
            }
        }
        Ok(())
    }

    fn entries(&self, level: u8) -> u64 {
        match self.mode {
            X86Mode::Bits32 => 1024,
            X86Mode::Pae if level == 3 => 4,
            _ => 512,
        }
    }

    #[inline]
    fn index_shift(&self, level: u8) -> u32 {
        let l = u32::from(level);
        match self.mode {
            X86Mode::Bits32 => PAGE_SHIFT + 10 * (l - 1),
            X86Mode::Pae if level == 3 => 30,
            _ => PAGE_SHIFT + 9 * (l - 1),
        }
    }

    #[inline]
    fn entry_addr(&self, table: u64, level: u8, va: u64) -> u64 {
        let l = u32::from(level);
        match self.mode {
            X86Mode::Bits32 => table + ((va >> (PAGE_SHIFT + 10 * (l - 1))) & 0x3ff) * 4,
            X86Mode::Pae if level == 3 => table + ((va >> 30) & 3) * 8,
            _ => table + ((va >> (PAGE_SHIFT + 9 * (l - 1))) & 0x1ff) * 8,
        }
    }

    #[inline(always)]
    fn decode(&self, level: u8, raw: u64) -> Decoded {
        if raw & P == 0 {
            return Decoded::NotPresent;
        }
        let check = |reserved: u64, ok: Decoded| {
            if raw & reserved != 0 {
                Decoded::Reserved(raw & reserved)
            } else {
                ok
            }
        };
        match self.mode {
            X86Mode::NoPaging => Decoded::NotPresent,
            X86Mode::Bits32 => {
                if level == 2 && raw & PS != 0 && self.pse {
                    // PSE-36: PDE bits 20:13 are physical bits 39:32, as many
                    // as MAXPHYADDR allows; bit 21 is reserved.
                    let high_bits = self.maxphy.min(40) - 32;
                    let reserved = (1 << 21) | bits(13 + high_bits, 20);
                    let base = (raw & 0xffc0_0000) | (((raw >> 13) & 0xff) << 32);
                    check(reserved, Decoded::Leaf { base, shift: 22 })
                } else if level == 1 {
                    Decoded::Leaf {
                        base: raw & 0xffff_f000,
                        shift: PAGE_SHIFT_U8,
                    }
                } else {
                    Decoded::Table(raw & 0xffff_f000)
                }
            }
            X86Mode::Pae if level == 3 => {
                // PDPTEs carry no permissions: 2:1 and 8:5 are reserved.
                let reserved = bits(1, 2) | bits(5, 8) | bits(self.maxphy, 63);
                check(reserved, Decoded::Table(raw & self.mask))
            }
            _ => {
                let (phys, mask) = (self.phys, self.mask);
                match level {
                    1 => check(
                        phys,
                        Decoded::Leaf {
                            base: raw & mask,
                            shift: PAGE_SHIFT_U8,
                        },
                    ),
                    2 if raw & PS != 0 => check(
                        phys | bits(13, 20),
                        Decoded::Leaf {
                            base: raw & mask & !bits(0, 20),
                            shift: 21,
                        },
                    ),
                    3 if raw & PS != 0 => {
                        if !self.gbpages {
                            return Decoded::Reserved(PS);
                        }
                        check(
                            phys | bits(13, 29),
                            Decoded::Leaf {
                                base: raw & mask & !bits(0, 29),
                                shift: 30,
                            },
                        )
                    }
                    2 => check(phys, Decoded::Table(raw & mask)),
                    // AMD reserves bit 8 of non-leaf PDPEs and PML4Es (as
                    // KVM's nested MMU checks, `nonleaf_bit8_rsvd`); NPT is
                    // AMD's, so its tables follow.
                    3 => check(phys | self.npt_bit8(), Decoded::Table(raw & mask)),
                    // PML4E and PML5E: PS is reserved.
                    _ => check(phys | PS | self.npt_bit8(), Decoded::Table(raw & mask)),
                }
            }
        }
    }

    #[inline]
    fn acc_start(&self) -> u64 {
        ACC_USER | ACC_RW
    }

    #[inline(always)]
    fn accumulate_fast(&self, acc: u64, level: u8, raw: u64) -> u64 {
        if self.mode == X86Mode::Pae && level == 3 {
            return acc;
        }
        let xd = if self.nxe { (raw >> 60) & ACC_XD } else { 0 };
        (acc & (raw | !(ACC_RW | ACC_USER))) | xd
    }

    #[inline]
    fn accumulate(&self, mut acc: u64, level: u8, raw: u64) -> u64 {
        acc = (acc & !(0xf << ACC_LEAF)) | (u64::from(level) << ACC_LEAF);
        if self.mode == X86Mode::Pae && level == 3 {
            return acc;
        }
        if raw & US == 0 && acc & ACC_USER != 0 {
            acc = set_first(acc & !ACC_USER, ACC_FIRST_SUPER, level);
        }
        if raw & RW == 0 && acc & ACC_RW != 0 {
            acc = set_first(acc & !ACC_RW, ACC_FIRST_RO, level);
        }
        if self.nxe && raw & XD != 0 && acc & ACC_XD == 0 {
            acc = set_first(acc | ACC_XD, ACC_FIRST_XD, level);
        }
        acc
    }

    #[inline]
    fn check(&self, acc: u64, leaf: u64, access: Access, _: bool) -> Result<(), Denied> {
        let user_page = acc & ACC_USER != 0;
        let leaf_level = acc_level(acc, ACC_LEAF);
        let keys = self.key_check(leaf, access, user_page, leaf_level);
        match self.paging_check(acc, access) {
            Ok(()) => keys,
            // SDM vol. 3A §4.7: the error code's PK flag is set whenever the
            // protection-key conditions hold for a data access, even when
            // the ordinary access rights deny it as well. Report the key
            // (so the error code carries PK) at the level the rights denied.
            Err(d) => match keys {
                Err(k) => Err(Denied {
                    level: d.level,
                    reason: k.reason,
                }),
                Ok(()) => Err(d),
            },
        }
    }

    #[inline]
    fn with_accessed(&self, level: u8, raw: u64, leaf: bool, write: bool) -> u64 {
        if self.mode == X86Mode::Pae && level == 3 {
            // PDPTEs are loaded with CR3 and have no accessed flag.
            return raw;
        }
        let mut new = raw | A;
        if leaf && write {
            new |= D;
        }
        new
    }

    fn permissions(&self, acc: u64, leaf: u64) -> Permissions {
        let user = acc & ACC_USER != 0;
        let execute = acc & ACC_XD == 0;
        Permissions {
            read: true,
            write: acc & ACC_RW != 0,
            execute,
            user,
            user_execute: user && execute,
            key: if self.pke || self.pks {
                ((leaf >> 59) & 0xf) as u8
            } else {
                0
            },
        }
    }
}

impl X86Format {
    /// The paging access rights (U/S, R/W, XD, CR0.WP, SMEP, SMAP),
    /// without protection keys.
    #[inline]
    fn paging_check(&self, acc: u64, access: Access) -> Result<(), Denied> {
        let user_page = acc & ACC_USER != 0;
        let writable = acc & ACC_RW != 0;
        let xd = acc & ACC_XD != 0;
        let leaf_level = acc_level(acc, ACC_LEAF);
        let deny = |at: u32| {
            Err(Denied {
                level: acc_level(acc, at),
                reason: FaultReason::Permission,
            })
        };
        let at_leaf = Err(Denied {
            level: leaf_level,
            reason: FaultReason::Permission,
        });
        if access.is_user() || self.npt {
            if !user_page {
                return deny(ACC_FIRST_SUPER);
            }
            match access.kind {
                AccessKind::Read => {}
                AccessKind::Write if !writable => return deny(ACC_FIRST_RO),
                AccessKind::Fetch if xd => return deny(ACC_FIRST_XD),
                _ => {}
            }
        } else {
            let smap_applies = user_page
                && self.smap
                && (access.privilege == Privilege::SupervisorImplicit || !access.ac);
            match access.kind {
                AccessKind::Fetch => {
                    if user_page && self.smep {
                        return at_leaf;
                    }
                    if xd {
                        return deny(ACC_FIRST_XD);
                    }
                }
                AccessKind::Read if smap_applies => return at_leaf,
                AccessKind::Read => {}
                AccessKind::Write => {
                    if smap_applies {
                        return at_leaf;
                    }
                    if self.wp && !writable {
                        return deny(ACC_FIRST_RO);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `access` is allowed: [`Format::check`]`(..).is_ok()` with
    /// only the rights bits of `acc` (U/S, R/W, XD) read, in few
    /// instructions and no fault to build (the lean walks' check).
    #[inline(always)]
    pub(crate) fn allows(&self, acc: u64, leaf: u64, access: Access) -> bool {
        let user_page = acc & ACC_USER != 0;
        let writable = acc & ACC_RW != 0;
        let xd = acc & ACC_XD != 0;
        let rights = if access.is_user() || self.npt {
            user_page
                && match access.kind {
                    AccessKind::Read => true,
                    AccessKind::Write => writable,
                    AccessKind::Fetch => !xd,
                }
        } else {
            let smap = user_page
                && self.smap
                && (access.privilege == Privilege::SupervisorImplicit || !access.ac);
            match access.kind {
                AccessKind::Fetch => !(xd || (user_page && self.smep)),
                AccessKind::Read => !smap,
                AccessKind::Write => !smap && (writable || !self.wp),
            }
        };
        let (keys, pkr) = if user_page {
            (self.pke, self.pkru)
        } else {
            (self.pks, self.pkrs)
        };
        if !rights || !keys || access.is_fetch() {
            return rights;
        }
        let key = 2 * ((leaf >> 59) & 0xf) as u32;
        let ad = (pkr >> key) & 1 != 0;
        let wd = (pkr >> (key + 1)) & 1 != 0;
        !(ad || (access.is_write() && wd && (access.is_user() || self.wp)))
    }

    /// Leaf attributes of `leaf` at `level`.
    pub(crate) fn attributes(&self, level: u8, leaf: u64) -> LeafAttributes {
        let large = level > 1;
        let pat_bit = if large { 1 << 12 } else { PS };
        LeafAttributes {
            accessed: leaf & A != 0,
            dirty: leaf & D != 0,
            global: leaf & G != 0,
            write_through: leaf & PWT != 0,
            cache_disable: leaf & PCD != 0,
            pat: leaf & pat_bit != 0,
            memory_type: None,
            ignore_pat: false,
        }
    }

    /// The mode this format walks.
    /// Bit 8 where AMD reserves it in non-leaf entries (NPT), else 0.
    #[inline(always)]
    fn npt_bit8(&self) -> u64 {
        if self.npt {
            1 << 8
        } else {
            0
        }
    }

    pub(crate) fn mode(&self) -> X86Mode {
        self.mode
    }
}

/// The 4- and 5-level format with the mode known: what the lean walk runs
/// for a 64-bit guest, with the per-mode branches of [`X86Format`] gone.
/// Meanings are [`X86Format`]'s, bit for bit (it delegates everything but
/// the hot path, and `tests/paging_model.rs` checks both against one model).
#[derive(Clone, Copy, Debug)]
pub(crate) struct X86Long<'a>(pub(crate) &'a X86Format);

impl X86Long<'_> {
    /// Wraps `f` if it is a 4- or 5-level format.
    pub(crate) fn of(f: &X86Format) -> Option<X86Long<'_>> {
        matches!(f.mode, X86Mode::Level4 | X86Mode::Level5).then_some(X86Long(f))
    }

    /// The frame of a present last-level entry with no reserved bit set,
    /// else `None` (what `decode(1, raw)` calls a leaf, in two tests).
    #[inline(always)]
    pub(crate) fn pte_frame(&self, raw: u64) -> Option<u64> {
        (raw & P != 0 && raw & self.0.phys == 0).then_some(raw & self.0.mask)
    }

    /// The entry bits a permission check reads (R/W, U/S, XD, the key).
    pub(crate) const RIGHTS: u64 = RW | US | XD | bits(59, 62);

    /// The lean walk from the root, unrolled per level: what
    /// [`super::lean::walk`] does for this format, with each level's
    /// present and reserved-bit checks folded into one mask test (a usable
    /// table entry has, of P, PS and the reserved bits, exactly P; a usable
    /// leaf exactly P and, above level 1, PS) and the permissions folded as
    /// an AND of the entries (R/W, U/S) and an OR (XD). `None` where the
    /// full engine must decide (a non-canonical address, any entry not
    /// usable, the access denied). First-level formats only.
    ///
    /// Entries are read through the memory's [`EntryWindow`] onto the
    /// region of the root table when it has one open (guest memory whose
    /// pages in that region all read as mapped): a bounds check on values
    /// held in registers instead of a region lookup per entry; a read
    /// outside moves the window to the entry's region. Memory without
    /// windows is read through [`PhysMemory::read_u64`].
    #[inline(always)]
    pub(crate) fn walk_root<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
    ) -> Option<LeanOut> {
        super::lean::walk_root(self, mem, va, access)
    }
}

/// The lean walk itself, with entries read through `reader` (the memory's
/// window onto the root's region, or `PhysMemory::read_u64`: `lean.rs`).
impl RootWalk for X86Long<'_> {
    #[inline(always)]
    fn lean_root(&self) -> u64 {
        self.0.root
    }

    #[inline(always)]
    fn walk_root_by<R: ReadEntry>(
        &self,
        va: u64,
        access: Access,
        reader: &mut R,
    ) -> Option<LeanOut> {
        let f = self.0;
        // A first-level format (AMD's nested one checks its input
        // differently).
        debug_assert!(!f.npt);
        // `va` must be canonical: bits 63:47 (63:56 with LA57) copies of
        // one bit.
        let canonical = |s: u32| ((va << s) as i64 >> s) as u64 == va;
        let five = f.mode == X86Mode::Level5;
        if !(if five { canonical(7) } else { canonical(16) }) {
            return None;
        }
        // `mask` has no bit below 12 (the `&` tells the compiler, which
        // then drops the entry reads' alignment checks).
        let (phys, mask) = (f.phys, f.mask & !0xfff);
        let table_bits = phys | PS | P;
        let mut read = |table: u64, shift: u32| reader.read(table + ((va >> shift) & 0x1ff) * 8);
        let mut and = !0u64;
        let mut or = 0u64;
        let mut table = f.root & !0xfff;
        let mut refs = 0;
        // PML5E (5-level paging) and PML4E: tables only, PS reserved.
        if five {
            let raw = read(table, 48)?;
            if raw & table_bits != P {
                return None;
            }
            (and, or, table, refs) = (raw, raw, raw & mask, 1);
        }
        let raw = read(table, 39)?;
        if raw & table_bits != P {
            return None;
        }
        (and, or, table, refs) = (and & raw, or | raw, raw & mask, refs + 1);
        // PDPTE: a table, or a 1 GiB page where the processor has them.
        let raw = read(table, 30)?;
        (and, or, refs) = (and & raw, or | raw, refs + 1);
        if raw & table_bits != P {
            if !f.gbpages || raw & (table_bits | bits(13, 29)) != PS | P {
                return None;
            }
            return self.lean_leaf(and, or, raw, 3, refs, access);
        }
        table = raw & mask;
        // PDE: a table or a 2 MiB page.
        let raw = read(table, 21)?;
        (and, or, refs) = (and & raw, or | raw, refs + 1);
        if raw & table_bits != P {
            if raw & (table_bits | bits(13, 20)) != PS | P {
                return None;
            }
            return self.lean_leaf(and, or, raw, 2, refs, access);
        }
        table = raw & mask;
        // PTE.
        let raw = read(table, 12)?;
        if raw & (phys | P) != P {
            return None;
        }
        self.lean_leaf(and & raw, or | raw, raw, 1, refs + 1, access)
    }
}

impl X86Long<'_> {
    /// The end of [`X86Long::walk_root`]: the leaf `raw` at `level`, with
    /// `and`/`or` the AND and OR of every entry used.
    #[inline(always)]
    fn lean_leaf(
        &self,
        and: u64,
        or: u64,
        raw: u64,
        level: u8,
        refs: u32,
        access: Access,
    ) -> Option<LeanOut> {
        let f = self.0;
        let xd = if f.nxe { (or >> 60) & ACC_XD } else { 0 };
        let acc = (and & (ACC_RW | ACC_USER)) | xd;
        if !f.allows(acc, raw, access) {
            return None;
        }
        let shift = PAGE_SHIFT_U8 + 9 * (level - 1);
        Some(LeanOut {
            base: raw & f.mask & !((1u64 << shift) - 1),
            shift,
            level,
            refs,
            acc,
            leaf: raw,
        })
    }
}

impl Format for X86Long<'_> {
    #[inline(always)]
    fn top_level(&self) -> u8 {
        self.0.top_level()
    }
    #[inline(always)]
    fn root(&self) -> u64 {
        self.0.root
    }
    #[inline(always)]
    fn wide(&self) -> bool {
        true
    }
    #[inline(always)]
    fn check_input(&self, va: u64) -> Result<(), FaultReason> {
        self.0.check_input(va)
    }
    #[inline(always)]
    fn entries(&self, _level: u8) -> u64 {
        512
    }
    #[inline(always)]
    fn index_shift(&self, level: u8) -> u32 {
        PAGE_SHIFT + 9 * (u32::from(level) - 1)
    }
    #[inline(always)]
    fn entry_addr(&self, table: u64, level: u8, va: u64) -> u64 {
        table + ((va >> self.index_shift(level)) & 0x1ff) * 8
    }
    #[inline(always)]
    fn decode(&self, level: u8, raw: u64) -> Decoded {
        if raw & P == 0 {
            return Decoded::NotPresent;
        }
        let f = self.0;
        let large = raw & PS != 0;
        let (reserved, leaf_shift) = match (level, large) {
            (1, _) => (f.phys, PAGE_SHIFT_U8),
            (2, true) => (f.phys | bits(13, 20), 21),
            (3, true) if f.gbpages => (f.phys | bits(13, 29), 30),
            (3, true) => return Decoded::Reserved(PS),
            (2 | 3, false) => (f.phys, 0),
            _ => (f.phys | PS, 0),
        };
        if raw & reserved != 0 {
            return Decoded::Reserved(raw & reserved);
        }
        if leaf_shift == 0 {
            Decoded::Table(raw & f.mask)
        } else {
            Decoded::Leaf {
                base: raw & f.mask & !((1u64 << leaf_shift) - 1),
                shift: leaf_shift,
            }
        }
    }
    #[inline(always)]
    fn acc_start(&self) -> u64 {
        self.0.acc_start()
    }
    #[inline(always)]
    fn accumulate(&self, acc: u64, level: u8, raw: u64) -> u64 {
        self.0.accumulate(acc, level, raw)
    }
    #[inline(always)]
    fn accumulate_fast(&self, acc: u64, _level: u8, raw: u64) -> u64 {
        let xd = if self.0.nxe { (raw >> 60) & ACC_XD } else { 0 };
        (acc & (raw | !(ACC_RW | ACC_USER))) | xd
    }
    #[inline(always)]
    fn check(&self, acc: u64, leaf: u64, access: Access, user_linear: bool) -> Result<(), Denied> {
        self.0.check(acc, leaf, access, user_linear)
    }
    #[inline(always)]
    fn with_accessed(&self, level: u8, raw: u64, leaf: bool, write: bool) -> u64 {
        self.0.with_accessed(level, raw, leaf, write)
    }
    #[inline(always)]
    fn permissions(&self, acc: u64, leaf: u64) -> Permissions {
        self.0.permissions(acc, leaf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `allows` (the lean walks' check) says yes exactly where `check` does,
    /// for every setting, right, key and access.
    #[test]
    fn allows_agrees_with_check() {
        let mut n = 0;
        for settings in 0..1u32 << 7 {
            let on = |bit: u32| settings & (1 << bit) != 0;
            let mut regs = X86Paging::long_mode(0x1000);
            regs.cr0 &= !CR0_WP;
            regs.efer &= !EFER_NXE;
            let flags = [
                (0, CR0_WP, 0),
                (1, 0, CR4_SMEP),
                (2, 0, CR4_SMAP),
                (3, 0, CR4_PKE),
                (4, 0, CR4_PKS),
            ];
            for (bit, cr0, cr4) in flags {
                if on(bit) {
                    regs.cr0 |= cr0;
                    regs.cr4 |= cr4;
                }
            }
            if on(5) {
                regs.efer |= EFER_NXE;
            }
            for (pkru, pkrs) in [
                (0, 0),
                (0x5555_5554, 0xaaaa_aaa8),
                (0xffff_fffc, 0x1234_5678),
            ] {
                regs.pkru = pkru;
                regs.pkrs = pkrs;
                let f = if on(6) {
                    X86Format::nested(0x1000, false, on(5), 52)
                } else {
                    X86Format::first_level(&regs, X86Mode::Level4)
                };
                for rights in 0..8u64 {
                    let acc_fast = rights & (ACC_RW | ACC_USER) | (rights & 1) << 3;
                    for key in 0..16u64 {
                        let leaf = P | key << 59;
                        for level in 1..=3u64 {
                            // `check` reads the levels a fault names; give
                            // it some.
                            let acc = acc_fast
                                | level << ACC_LEAF
                                | level << ACC_FIRST_RO
                                | level << ACC_FIRST_SUPER
                                | level << ACC_FIRST_XD;
                            for a in Access::ALL {
                                assert_eq!(
                                    f.allows(acc_fast, leaf, a),
                                    f.check(acc, leaf, a, false).is_ok(),
                                    "settings {settings:#b} rights {rights:#b} key {key} {a:?}"
                                );
                                n += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(n > 100_000);
    }
}
