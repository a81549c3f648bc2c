//! The second level (Intel EPT, AMD NPT, AArch64 stage 2, the RISC-V G
//! stage) as a stage of a walk: translating one guest-physical address
//! into the walker's memory, for a guest table (through [`NestedPort`],
//! which makes the engine's loop hardware's two-dimensional walk) or for
//! the final address of an access; the exit a refusal is (EPT violation
//! or misconfiguration, NPT `EXITINFO1`, a stage-2 abort's ESR_EL2 and
//! HPFAR_EL2, a guest-page fault with `htval`/`htinst`); and
//! [`SecondMemo`], the second-level translations a walk may reuse.
//!
//! It knows nothing of the first level beyond what a fault report needs
//! (the guest table's level, whether the guest uses PAE paging), and never
//! calls a walk cache: a cache hands it a memo to read and fill.

use super::{
    aarch64::stage2::{esr_el2, hpfar_el2, S2Format, Stage2Access},
    engine::{self, DirectPort, Fail, Port, Start, Stop},
    ept::EptFormat,
    fault::{FaultCode, FaultReason, Stage, WalkFault},
    format::Format,
    memory::PhysMemory,
    riscv::{self, GStageSite, SvFormat},
    types::{Access, AccessKind, LeafAttributes, Permissions, Privilege, SecondOut},
    x86::X86Format,
};
use crate::addr::{GuestPhysAddr, GuestVirtAddr};

/// Second-level translations a memo keeps.
const MEMO_SLOTS: usize = 1024;

/// The second level's part of a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SecondTranslation {
    /// Size of the second-level page.
    pub page_size: u64,
    /// Its level (1 = last-level table).
    pub level: u8,
    /// What the second level allows.
    pub permissions: Permissions,
    /// Its leaf's attributes.
    pub attributes: LeafAttributes,
}

/// A walker's second level, ready to translate.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Second {
    /// Intel EPT.
    Ept(EptFormat),
    /// AMD NPT: the x86-64 format under the nested CR3.
    Npt(X86Format),
    /// The RISC-V G stage (Sv39x4, Sv48x4, Sv57x4) under `hgatp`.
    Riscv(SvFormat),
    /// AArch64 stage 2 under VTCR_EL2 and VTTBR_EL2.
    Aarch64(S2Format),
}

/// Runs `$body` with `$f` bound to the second level's own format.
macro_rules! each_second {
    ($second:expr, $f:ident => $body:expr) => {
        match $second {
            Second::Ept($f) => $body,
            Second::Npt($f) => $body,
            Second::Riscv($f) => $body,
            Second::Aarch64($f) => $body,
        }
    };
}

/// Where a second-level translation was needed, for its fault.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FaultSite {
    /// The address the whole walk translates.
    pub(crate) va: u64,
    /// The access the whole walk checks.
    pub(crate) access: Access,
    /// `Some(level)`: the guest's level-`level` table; `None`: the final
    /// guest-physical address.
    pub(crate) guest_table: Option<u8>,
    /// The guest uses PAE paging (its level-3 entries are PDPTEs).
    pub(crate) pae: bool,
}

impl FaultSite {
    /// Whether the access is the load of a PAE PDPTE (at MOV CR3 on
    /// hardware, not during a translation).
    #[inline]
    fn pdpte(&self) -> bool {
        self.pae && self.guest_table == Some(3)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct MemoSlot {
    valid: bool,
    space: u64,
    tag: u64,
    out: SecondOut,
}

/// Second-level translations of guest-physical pages, so that a nested walk
/// reads guest tables without walking the second level again. A walk cache
/// owns one and lends it to walks ([`Memo`]); entries are tagged with the
/// number of the second level's key in that cache.
#[derive(Debug)]
pub(crate) struct SecondMemo {
    slots: Box<[MemoSlot]>,
    hits: u64,
}

/// A [`SecondMemo`] lent to one walk, with the number of the walker's
/// second level in it.
#[derive(Debug)]
pub(crate) struct Memo<'a> {
    pub(crate) memo: &'a mut SecondMemo,
    pub(crate) space: u64,
}

impl Memo<'_> {
    /// The same memo, for a shorter borrow.
    #[inline]
    pub(crate) fn reborrow(&mut self) -> Memo<'_> {
        Memo {
            memo: self.memo,
            space: self.space,
        }
    }
}

/// The slot of `tag` in `space` among `slots` (a power of two), `salt`
/// telling apart what shares a table (levels, page sizes).
#[inline]
pub(crate) fn memo_slot(space: u64, tag: u64, salt: u64, slots: usize) -> usize {
    let h = (space ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt)
        .wrapping_mul(0xff51_afd7_ed55_8ccd);
    (h >> 32) as usize & (slots - 1)
}

impl SecondMemo {
    /// An empty memo.
    pub(crate) fn new() -> Self {
        SecondMemo {
            slots: vec![MemoSlot::default(); MEMO_SLOTS].into_boxed_slice(),
            hits: 0,
        }
    }

    /// Drops every translation.
    pub(crate) fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| s.valid = false);
    }

    /// Translations answered so far.
    pub(crate) fn hits(&self) -> u64 {
        self.hits
    }

    fn lookup(&mut self, space: u64, gpa: u64) -> Option<SecondOut> {
        // Second-level pages are at least 4 KiB; try the sizes cached.
        for shift in [12u8, 21, 30] {
            let tag = gpa >> shift;
            let n = &self.slots[memo_slot(space, tag, u64::from(shift), MEMO_SLOTS)];
            if n.valid && n.space == space && n.tag == tag && n.out.shift == shift {
                self.hits += 1;
                return Some(n.out);
            }
        }
        None
    }

    fn insert(&mut self, space: u64, gpa: u64, out: SecondOut) {
        let tag = gpa >> out.shift;
        let i = memo_slot(space, tag, u64::from(out.shift), MEMO_SLOTS);
        self.slots[i] = MemoSlot {
            valid: true,
            space,
            tag,
            out,
        };
    }
}

/// The second level sees every access as a user access of the same kind
/// (what NPT checks; EPT and the G stage ignore privilege).
#[inline]
pub(crate) fn second_access(kind: AccessKind) -> Access {
    Access::new(kind, Privilege::User)
}

fn stop_at_input(reason: FaultReason) -> Fail {
    Fail::Stop(Stop {
        level: 0,
        entry_addr: None,
        entry: None,
        reason,
        acc: 0,
    })
}

/// The start of a walk at `f`'s root.
#[inline]
pub(crate) fn root_start<F: Format>(f: &F) -> Start {
    Start {
        level: f.top_level(),
        table: f.root(),
        acc: f.acc_start(),
    }
}

/// The address in a second-level page of output `s` for `gpa`.
#[inline]
pub(crate) fn output(s: &SecondOut, gpa: u64) -> u64 {
    s.base | (gpa & ((1u64 << s.shift) - 1))
}

impl Second {
    /// The access this second level checks for an access of `kind` made
    /// at `privilege` in the guest: a user access of that kind, but for
    /// AArch64 stage 2, whose execute permission (FEAT_XNX) depends on the
    /// access's EL.
    #[inline]
    fn access_of(&self, kind: AccessKind, privilege: Privilege) -> Access {
        match self {
            Second::Aarch64(_) => Access::new(kind, privilege),
            _ => second_access(kind),
        }
    }

    /// Whether the cached rights `acc`/`leaf` allow an access of `kind` made
    /// at `privilege` (an access of the first level, seen as the second
    /// level sees it).
    #[inline]
    pub(crate) fn allows(
        &self,
        acc: u64,
        leaf: u64,
        kind: AccessKind,
        privilege: Privilege,
        user_linear: bool,
    ) -> bool {
        let access = self.access_of(kind, privilege);
        each_second!(self, f => f.check(acc, leaf, access, user_linear).is_ok())
    }

    /// The public report of a second-level output.
    pub(crate) fn info(&self, s: &SecondOut) -> SecondTranslation {
        let (permissions, attributes) = match self {
            Second::Ept(f) => (f.permissions(s.acc, s.leaf), f.attributes(s.level, s.leaf)),
            Second::Npt(f) => (f.permissions(s.acc, s.leaf), f.attributes(s.level, s.leaf)),
            Second::Riscv(f) => {
                let a = riscv::attributes(s.leaf);
                let leaf = LeafAttributes {
                    accessed: a.accessed,
                    dirty: a.dirty,
                    ..LeafAttributes::default()
                };
                (f.permissions(s.acc, s.leaf), leaf)
            }
            Second::Aarch64(f) => (f.permissions(s.acc, s.leaf), f.leaf_attributes(s.leaf)),
        };
        SecondTranslation {
            page_size: 1 << s.shift,
            level: s.level,
            permissions,
            attributes,
        }
    }

    /// The access kind the second level checks for a guest page-table
    /// read: a write where the hardware updates accessed/dirty flags
    /// through it (EPT with A/D enabled; always for NPT, as the APM and
    /// KVM's nested MMU do), else a read (the RISC-V G stage checks the
    /// read of a VS-stage PTE as a load, its A/D update as a store).
    pub(crate) fn table_access_kind(&self) -> AccessKind {
        match self {
            Second::Ept(f) if !f.ad() => AccessKind::Read,
            Second::Riscv(_) | Second::Aarch64(_) => AccessKind::Read,
            _ => AccessKind::Write,
        }
    }

    /// Translates `gpa` through the second level for an access of `kind`
    /// (from a user page of the first level when `user_linear`), setting
    /// accessed/dirty flags when `set_ad`, reusing and filling `memo` when
    /// given, and adding the memory references it made to `refs`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) fn walk<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        gpa: u64,
        kind: AccessKind,
        user_linear: bool,
        set_ad: bool,
        site: FaultSite,
        mut memo: Option<Memo<'_>>,
        refs: &mut u32,
    ) -> Result<SecondOut, WalkFault> {
        if let Some(m) = memo.as_mut() {
            if let Some(n) = m.memo.lookup(m.space, gpa) {
                let ok = self.allows(n.acc, n.leaf, kind, site.access.privilege, user_linear);
                let ad_ok = !set_ad || (n.accessed && (kind != AccessKind::Write || n.dirty));
                if ok && ad_ok {
                    return Ok(n);
                }
            }
        }
        let access = self.access_of(kind, site.access.privilege);
        let mut port = DirectPort { mem, refs: 0 };
        let r = each_second!(self, f => f.check_input(gpa).map_err(stop_at_input).and_then(|()| {
            engine::walk(
                f,
                &mut port,
                gpa,
                access,
                user_linear,
                set_ad,
                root_start(f),
            )
        }));
        *refs += port.refs;
        let w = r.map_err(|f| match f {
            Fail::Stop(s) => self.fault(gpa, kind, site, s),
            Fail::Port(w) => w,
        })?;
        let out = SecondOut {
            base: w.base,
            shift: w.shift,
            level: w.leaf_level,
            acc: w.acc,
            leaf: w.leaf,
            accessed: set_ad,
            dirty: set_ad && kind == AccessKind::Write,
        };
        if let Some(m) = memo {
            m.memo.insert(m.space, gpa, out);
        }
        Ok(out)
    }

    /// A second-level stop as the VM exit a hypervisor would see.
    fn fault(&self, gpa: u64, kind: AccessKind, site: FaultSite, s: Stop) -> WalkFault {
        let code = match (self, s.reason) {
            (
                _,
                FaultReason::Unbacked { .. } | FaultReason::ReadOnlyTable | FaultReason::Contended,
            ) => FaultCode::Emulation,
            (Second::Ept(_), FaultReason::Misconfigured) => FaultCode::EptMisconfig,
            (Second::Ept(f), reason) => FaultCode::EptViolation {
                qualification: ept_qualification(f, kind, site, reason, s.acc),
            },
            (Second::Riscv(_), _) => {
                // The G stage was checked as a load for the read of a
                // VS-stage PTE and as a store for its A/D update; the trap
                // names the original access.
                let at = match (site.guest_table, kind) {
                    (None, _) => GStageSite::Final,
                    (Some(_), AccessKind::Write) => GStageSite::TableUpdate,
                    (Some(_), _) => GStageSite::TableRead,
                };
                riscv::g_stage_trap(&s, site.va, gpa, site.access.kind, at)
                    .map_or(FaultCode::Emulation, FaultCode::Riscv)
            }
            (Second::Aarch64(f), reason) => {
                let (kind2, level) = f.s2_fault(reason, s.level, s.entry);
                let at = match (site.guest_table, kind) {
                    (None, _) => Stage2Access::Final,
                    (Some(_), AccessKind::Write) => Stage2Access::TableUpdate,
                    (Some(_), _) => Stage2Access::TableRead,
                };
                esr_el2(kind2, level, site.access.kind, at).map_or(FaultCode::Emulation, |esr| {
                    FaultCode::Aarch64Stage2Abort {
                        esr,
                        hpfar: hpfar_el2(GuestPhysAddr(gpa)),
                    }
                })
            }
            (Second::Npt(f), reason) => {
                let mut info = u64::from(f.error_code(reason, second_access(kind)));
                info |= if site.guest_table.is_none() {
                    1 << 32
                } else {
                    1 << 33
                };
                FaultCode::NestedPageFault { exit_info1: info }
            }
        };
        WalkFault {
            va: GuestVirtAddr(site.va),
            gpa: Some(GuestPhysAddr(gpa)),
            access: site.access,
            stage: Stage::Second {
                guest_table: site.guest_table,
            },
            level: s.level,
            entry_addr: s.entry_addr.map(GuestPhysAddr),
            entry: s.entry,
            reason: s.reason,
            code,
        }
    }
}

/// The exit qualification of an EPT violation (SDM table 28-7).
fn ept_qualification(
    f: &EptFormat,
    kind: AccessKind,
    site: FaultSite,
    reason: FaultReason,
    acc: u64,
) -> u64 {
    let pdpte = site.pdpte();
    let mut q = match kind {
        AccessKind::Read => 1,
        // With EPT A/D on, every guest paging-structure access counts as a
        // write, and a violation reports both the read and the write bit
        // (SDM table 28-7, note 1).
        AccessKind::Write if site.guest_table.is_some() && f.ad() && !pdpte => 3,
        AccessKind::Write => 2,
        AccessKind::Fetch => 4,
    };
    if reason != FaultReason::NotPresent {
        q |= f.qualification_perms(acc);
    }
    // Bit 7: a linear address is known, for every violation but a PDPTE
    // load (at MOV CR3, not during a translation); with paging off the
    // linear address is the guest-physical one. Bit 8: the access was to
    // the translation of that linear address, not to a guest paging
    // structure.
    if !pdpte {
        q |= 1 << 7;
        if site.guest_table.is_none() {
            q |= 1 << 8;
        }
    }
    q
}

/// The engine's port for a nested walk: every guest page-table address is
/// translated through the second level before it is read or updated.
pub(crate) struct NestedPort<'a, M: ?Sized> {
    pub(crate) second: &'a Second,
    pub(crate) mem: &'a M,
    /// Where the walk is, for faults (`guest_table` is filled per table).
    pub(crate) site: FaultSite,
    pub(crate) set_ad: bool,
    pub(crate) refs: u32,
    pub(crate) memo: Option<Memo<'a>>,
}

impl<M: PhysMemory + ?Sized> NestedPort<'_, M> {
    /// Where the guest table entry at `gpa` (a table of `level`) lives, as
    /// the second level allows the access: a read of the entry
    /// (`update` false) or the update of its accessed/dirty flags (true).
    fn table_pa(&mut self, gpa: u64, level: u8, update: bool) -> Result<u64, Fail> {
        let site = FaultSite {
            guest_table: Some(level),
            ..self.site
        };
        let kind = if site.pdpte() {
            // PDPTEs are loaded (at MOV CR3, VM entry) as reads, even with
            // EPT A/D on, and carry no accessed flag (SDM 29.3.3.2, 4.4.1).
            AccessKind::Read
        } else if update {
            // Accessed/dirty updates of guest paging structures are data
            // writes to the second level, with EPT A/D off too (SDM
            // 29.3.3.2): a read-only mapping of the table faults.
            AccessKind::Write
        } else {
            self.second.table_access_kind()
        };
        let memo = self.memo.as_mut().map(Memo::reborrow);
        let s = self
            .second
            .walk(
                self.mem,
                gpa,
                kind,
                false,
                self.set_ad,
                site,
                memo,
                &mut self.refs,
            )
            .map_err(Fail::Port)?;
        Ok(output(&s, gpa))
    }

    fn unbacked(&self, gpa: u64, pa: u64, level: u8) -> Fail {
        Fail::Port(WalkFault {
            va: GuestVirtAddr(self.site.va),
            gpa: Some(GuestPhysAddr(gpa)),
            access: self.site.access,
            stage: Stage::Second {
                guest_table: Some(level),
            },
            level,
            entry_addr: None,
            entry: None,
            reason: FaultReason::Unbacked {
                pa: GuestPhysAddr(pa),
            },
            code: FaultCode::Emulation,
        })
    }
}

impl<M: PhysMemory + ?Sized> Port for NestedPort<'_, M> {
    fn read(&mut self, gpa: u64, wide: bool, level: u8) -> Result<u64, Fail> {
        let pa = self.table_pa(gpa, level, false)?;
        self.refs += 1;
        let v = if wide {
            self.mem.read_u64(pa)
        } else {
            self.mem.read_u32(pa).map(u64::from)
        };
        v.ok_or_else(|| self.unbacked(gpa, pa, level))
    }

    fn exchange(
        &mut self,
        gpa: u64,
        wide: bool,
        level: u8,
        old: u64,
        new: u64,
    ) -> Result<bool, Fail> {
        let pa = self.table_pa(gpa, level, true)?;
        let mut direct = DirectPort {
            mem: self.mem,
            refs: 0,
        };
        let r = direct.exchange(pa, wide, level, old, new);
        self.refs += direct.refs;
        r
    }
}
