//! `Walker`: one guest address space (the guest's paging registers, and
//! optionally a second level) and the translations a VMM asks of it — one
//! address, with or without accessed/dirty updates, with or without a
//! [`WalkCache`]. Faults come back as [`WalkFault`] with the architectural
//! event filled in for the stage that faulted.

use super::{
    cache::{TlbEntry, WalkCache, TLB_ACCESSED, TLB_DIRTY, TLB_GLOBAL},
    engine::{self, DirectPort, Fail, Port, Start, Stop},
    ept::{EptConfig, EptFormat, NptConfig},
    format::Format,
    x86::{X86Format, X86Long, X86Mode, X86Paging, X86PagingError},
    Access, AccessKind, FaultCode, FaultReason, PhysMemory, Privilege, Stage, WalkFault,
};

/// The guest's first-level paging. x86 today; AArch64 and RISC-V would be
/// further variants over their own formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestPaging {
    /// x86 paging in any mode the registers select.
    X86(X86Paging),
}

impl From<X86Paging> for GuestPaging {
    fn from(p: X86Paging) -> Self {
        GuestPaging::X86(p)
    }
}

/// The second level, translating guest-physical addresses to the memory the
/// walker reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecondLevel {
    /// Intel EPT.
    Ept(EptConfig),
    /// AMD nested paging.
    Npt(NptConfig),
}

/// Options of one walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WalkOptions {
    /// Set accessed flags on the entries used and the dirty flag on the leaf
    /// of a write, by compare-exchange, as hardware does (both levels). Off,
    /// the walk writes nothing: what a debugger wants.
    pub set_accessed_dirty: bool,
}

/// What a translation allows, combined over every level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Permissions {
    /// Data reads (always, for x86; EPT's R).
    pub read: bool,
    /// Data writes (R/W at every level; EPT's W).
    pub write: bool,
    /// Instruction fetches (no XD at any level with NXE; EPT's X, or
    /// supervisor-mode execute with mode-based execute control).
    pub execute: bool,
    /// A user page (U/S at every level). Always set for EPT.
    pub user: bool,
    /// User-mode fetches (x86: user and execute; EPT with mode-based
    /// execute control: bit 10).
    pub user_execute: bool,
    /// The protection key (x86 with CR4.PKE or PKS), else 0.
    pub key: u8,
}

/// Attributes of a leaf entry (what the entry says, not what was checked).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LeafAttributes {
    /// Accessed flag.
    pub accessed: bool,
    /// Dirty flag.
    pub dirty: bool,
    /// x86 global flag.
    pub global: bool,
    /// x86 PWT.
    pub write_through: bool,
    /// x86 PCD.
    pub cache_disable: bool,
    /// x86 PAT bit (bit 7 in a PTE, bit 12 in a large page).
    pub pat: bool,
    /// EPT memory type (bits 5:3).
    pub memory_type: Option<u8>,
    /// EPT ignore-PAT (bit 6).
    pub ignore_pat: bool,
}

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

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The address translated.
    pub va: u64,
    /// The guest-physical address (first-level output).
    pub gpa: u64,
    /// The address in the walker's memory: the second level's output, or
    /// `gpa` without one.
    pub pa: u64,
    /// Size of the guest's page (the whole linear space without paging is
    /// reported as 4 KiB pages).
    pub page_size: u64,
    /// Level of the guest's leaf entry (0 without paging).
    pub level: u8,
    /// What the guest's tables allow.
    pub permissions: Permissions,
    /// The guest's leaf attributes.
    pub attributes: LeafAttributes,
    /// The second level's part, if there is one.
    pub second: Option<SecondTranslation>,
    /// Memory references the walk made (entries read and updated, both
    /// levels); 0 for a translation answered from the cache.
    pub memory_refs: u32,
}

impl Translation {
    /// Bytes from `va` to the end of the page it is in, taking the smaller
    /// of the two levels' pages: how far `pa` stays contiguous.
    pub fn contiguous_bytes(&self) -> u64 {
        let size = match self.second {
            Some(s) => s.page_size.min(self.page_size),
            None => self.page_size,
        };
        size - (self.va & (size - 1))
    }
}

#[derive(Clone, Copy, Debug)]
enum First {
    NoPaging,
    X86(X86Format),
}

#[derive(Clone, Copy, Debug)]
enum Second {
    Ept(EptFormat),
    Npt(X86Format),
}

/// One guest address space, ready to translate.
#[derive(Clone, Copy, Debug)]
pub struct Walker {
    first: First,
    second: Option<Second>,
    /// This address space, exactly: the first level's root and format
    /// settings, then the second level's root and settings (zeros without
    /// one). A [`WalkCache`] numbers the keys it sees.
    space_key: [u64; 4],
    /// The second level alone, for its cached translations.
    second_key: [u64; 4],
    pcid: u16,
    /// The settings permission checks read but the space tag leaves out,
    /// exactly: CR0.WP, SMEP, SMAP, PKE, PKS (bits 0..5), PKRU (32..64),
    /// PKRS (64..96). A cache numbers the ones it has seen.
    check_config: u128,
}

/// Errors building a walker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkerError {
    /// The x86 registers select no valid mode.
    #[error(transparent)]
    X86(#[from] X86PagingError),
    /// The EPTP's walk length is neither 4 nor 5 levels.
    #[error("EPTP {eptp:#x} has walk length {} (only 4 and 5 levels exist)", ((eptp >> 3) & 7) + 1)]
    EptWalkLength {
        /// The EPTP.
        eptp: u64,
    },
}

impl Walker {
    /// A walker for the guest's paging registers, with no second level.
    pub fn new(paging: impl Into<GuestPaging>) -> Result<Self, WalkerError> {
        let GuestPaging::X86(regs) = paging.into();
        let mode = regs.mode()?;
        let first = match mode {
            X86Mode::NoPaging => First::NoPaging,
            m => First::X86(X86Format::first_level(&regs, m)),
        };
        // Everything that changes what an entry means goes into the key,
        // exactly (what is allowed is checked again on every cache hit).
        let root = match &first {
            First::X86(f) => f.root(),
            First::NoPaging => 0,
        };
        let space_key = [
            root,
            mode as u64
                | u64::from(regs.cr4 & super::x86::CR4_PSE != 0) << 3
                | u64::from(regs.efer & super::x86::EFER_NXE != 0) << 4
                | u64::from(regs.gbpages) << 5
                | u64::from(regs.maxphyaddr) << 8
                | u64::from(regs.pcid()) << 16,
            0,
            0,
        ];
        let flag = |on: bool, bit: u32| u128::from(on) << bit;
        let check_config = flag(regs.cr0 & super::x86::CR0_WP != 0, 0)
            | flag(regs.cr4 & super::x86::CR4_SMEP != 0, 1)
            | flag(regs.cr4 & super::x86::CR4_SMAP != 0, 2)
            | flag(regs.cr4 & super::x86::CR4_PKE != 0, 3)
            | flag(regs.cr4 & super::x86::CR4_PKS != 0, 4)
            | u128::from(regs.pkru) << 32
            | u128::from(regs.pkrs) << 64;
        Ok(Walker {
            first,
            second: None,
            space_key,
            second_key: [0; 4],
            pcid: regs.pcid(),
            check_config,
        })
    }

    /// The same guest with a second level under it: every guest-physical
    /// address, page-table pointers included, is translated through it.
    pub fn with_second_level(mut self, second: SecondLevel) -> Result<Self, WalkerError> {
        let (s, root, bits) = match second {
            SecondLevel::Ept(cfg) => (
                Second::Ept(
                    EptFormat::new(&cfg).ok_or(WalkerError::EptWalkLength { eptp: cfg.eptp })?,
                ),
                cfg.eptp,
                1 | u64::from(cfg.execute_only) << 2
                    | u64::from(cfg.mode_based_execute) << 3
                    | u64::from(cfg.maxphyaddr) << 8,
            ),
            SecondLevel::Npt(cfg) => (
                Second::Npt(X86Format::nested(
                    cfg.ncr3,
                    cfg.five_level,
                    cfg.nxe,
                    cfg.maxphyaddr,
                )),
                cfg.ncr3,
                2 | u64::from(cfg.five_level) << 2
                    | u64::from(cfg.nxe) << 3
                    | u64::from(cfg.maxphyaddr) << 8,
            ),
        };
        self.second = Some(s);
        self.space_key[2] = root;
        self.space_key[3] = bits;
        self.second_key = [0, 0, root, bits];
        Ok(self)
    }

    /// The guest's paging mode.
    pub fn mode(&self) -> X86Mode {
        match &self.first {
            First::NoPaging => X86Mode::NoPaging,
            First::X86(f) => f.mode(),
        }
    }

    /// Whether a second level is configured.
    pub fn has_second_level(&self) -> bool {
        self.second.is_some()
    }

    /// This address space's tag in a [`WalkCache`] (CR3, PCID, mode and
    /// second level together): what [`WalkCache::invalidate_space`] takes.
    pub fn space(&self) -> u64 {
        super::cache::space_tag(&self.space_key)
    }

    /// The PCID (0 without CR4.PCIDE).
    pub fn pcid(&self) -> u16 {
        self.pcid
    }

    /// Translates `va` for `access`, changing nothing in memory.
    #[inline]
    pub fn translate<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
    ) -> Result<Translation, WalkFault> {
        self.translate_with(mem, va, access, WalkOptions::default(), None)
    }

    /// Translates `va` for `access` with `options`, through `cache` when
    /// given: a hit costs no memory reference; a miss walks (starting from
    /// the deepest cached upper-level entry) and fills the cache.
    #[inline(always)]
    pub fn translate_with<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
        options: WalkOptions,
        mut cache: Option<&mut WalkCache>,
    ) -> Result<Translation, WalkFault> {
        // A walk with nothing to remember, update or translate again (no
        // cache, no A/D, no second level) in a 64-bit guest: the lean walk
        // straight into the answer.
        if cache.is_none() && self.second.is_none() && !options.set_accessed_dirty {
            if let Some(t) = self.translate_lean(mem, va, access) {
                return Ok(t);
            }
        }
        if let Some(c) = cache.as_deref_mut() {
            let checks = c.check_index(self.check_config);
            let space = c.space_id(&self.space_key);
            if let Some(i) = c.lookup(space, va) {
                let set_ad = options.set_accessed_dirty;
                let mut changed = false;
                let t =
                    self.answer_from_cache(c.entry(i), checks, va, access, set_ad, &mut changed);
                if changed {
                    // The entry's rights changed: its hit slot follows.
                    c.sync_hit(i);
                }
                if let Some(t) = t {
                    c.count_hit();
                    return Ok(t);
                }
            }
            c.count_miss();
        }
        self.translate_walk(mem, va, access, options, cache)
    }

    /// The address in the walker's memory for `va` (what
    /// [`Walker::translate_with`] returns as [`Translation::pa`]), through
    /// `cache` when given. With a cache this binds it for one call
    /// ([`WalkCache::bind`]); to translate many addresses, bind once and
    /// call [`BoundCache::translate_pa`].
    #[inline]
    pub fn translate_pa<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
        options: WalkOptions,
        cache: Option<&mut WalkCache>,
    ) -> Result<u64, WalkFault> {
        match cache {
            Some(c) => c.bind(self).translate_pa(mem, va, access, options),
            None => self
                .translate_with(mem, va, access, options, None)
                .map(|t| t.pa),
        }
    }

    /// The lean walk of a 4/5-level guest, straight into a translation;
    /// `None` sends the caller down the full path.
    #[inline(always)]
    fn translate_lean<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
    ) -> Option<Translation> {
        let First::X86(fmt) = &self.first else {
            return None;
        };
        let l = X86Long::of(fmt)?.walk_root(mem, va, access)?;
        Some(Translation {
            va,
            gpa: l.base | (va & ((1u64 << l.shift) - 1)),
            pa: l.base | (va & ((1u64 << l.shift) - 1)),
            page_size: 1 << l.shift,
            level: l.level,
            permissions: fmt.permissions(l.acc, l.leaf),
            attributes: fmt.attributes(l.level, l.leaf),
            second: None,
            memory_refs: l.refs,
        })
    }

    /// The miss path of [`Walker::translate_with`]: walk, then fill the
    /// cache. Kept out of line so a hit stays a few instructions.
    #[inline(never)]
    fn translate_walk<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
        options: WalkOptions,
        mut cache: Option<&mut WalkCache>,
    ) -> Result<Translation, WalkFault> {
        let set_ad = options.set_accessed_dirty;
        let mut refs = 0;
        let (first, start_level) = match &self.first {
            First::NoPaging => {
                if va > u64::from(u32::MAX) {
                    return Err(self.fault_first(
                        va,
                        access,
                        Stop {
                            level: 0,
                            entry_addr: None,
                            entry: None,
                            reason: FaultReason::AddressTooWide,
                            acc: 0,
                        },
                    ));
                }
                (None, 0)
            }
            First::X86(fmt) => {
                if let Err(reason) = fmt.check_input(va) {
                    return Err(self.fault_first(
                        va,
                        access,
                        Stop {
                            level: 0,
                            entry_addr: None,
                            entry: None,
                            reason,
                            acc: 0,
                        },
                    ));
                }
                let mut start = Start {
                    level: fmt.top_level(),
                    table: fmt.root(),
                    acc: fmt.acc_start(),
                };
                if let Some(c) = cache.as_deref_mut() {
                    let space = c.space_id(&self.space_key);
                    if let Some(s) = c.lookup_upper(space, va, fmt, set_ad) {
                        start = s;
                    }
                }
                // With a watch attached, a walk is cached only if every
                // table it read was marked in the watch before it read it
                // (`WalkCache::tables_pinned`): a write racing the walk
                // then either shows in it or flushes the cache. The first
                // walk through unmarked pages marks them and walks again.
                let first_start = start;
                let refs_before = refs;
                let mut pinned = Vec::new();
                let mut tries = 0;
                let walked = loop {
                    let mut start = first_start;
                    refs = refs_before;
                    let lean = match (&self.second, X86Long::of(fmt)) {
                        (None, Some(long)) if !set_ad => {
                            super::lean::walk_recorded(&long, mem, va, access, start)
                        }
                        (None, None) if !set_ad => {
                            super::lean::walk_recorded(fmt, mem, va, access, start)
                        }
                        _ => None,
                    };
                    // The lean walk stopped (a fault ahead, or not its case): the
                    // full engine walks from the root, so a fault it reports
                    // names the level that really denied, whatever the cache
                    // held.
                    if lean.is_none() && self.second.is_none() && !set_ad {
                        start = root_start(fmt);
                    }
                    let walked = match (&self.second, lean) {
                        (_, Some((w, n))) => {
                            refs += n;
                            Ok(w)
                        }
                        (None, None) => {
                            let mut port = DirectPort { mem, refs: 0 };
                            let r = engine::walk(fmt, &mut port, va, access, false, set_ad, start);
                            refs += port.refs;
                            r
                        }
                        (Some(second), None) => {
                            let mut port = NestedPort {
                                walker: self,
                                second,
                                mem,
                                va,
                                access,
                                set_ad,
                                refs: 0,
                                cache: cache.as_deref_mut(),
                            };
                            let r = engine::walk(fmt, &mut port, va, access, false, set_ad, start);
                            refs += port.refs;
                            r
                        }
                    };
                    let walked = walked.map_err(|f| match f {
                        Fail::Stop(s) => self.fault_first(va, access, s),
                        Fail::Port(w) => w,
                    })?;
                    match cache.as_deref_mut() {
                        Some(c) if !c.tables_pinned(&walked, &mut pinned) => {
                            tries += 1;
                            if tries > 3 {
                                // Tables that keep changing under the walk:
                                // answer, but cache nothing.
                                cache = None;
                                break walked;
                            }
                        }
                        _ => break walked,
                    }
                };
                if let Some(c) = cache.as_deref_mut() {
                    let space = c.space_id(&self.space_key);
                    c.insert_upper(space, self.pcid, va, fmt, &walked, set_ad);
                }
                (Some(walked), start.level)
            }
        };
        let _ = start_level;
        let (gpa, shift1, level1, perms1, attrs1, acc1, leaf1) = match (&first, &self.first) {
            (Some(w), First::X86(fmt)) => (
                w.base | (va & ((1u64 << w.shift) - 1)),
                w.shift,
                w.leaf_level,
                fmt.permissions(w.acc, w.leaf),
                fmt.attributes(w.leaf_level, w.leaf),
                w.acc,
                w.leaf,
            ),
            _ => (
                va,
                12,
                0,
                no_paging_permissions(),
                LeafAttributes::default(),
                0,
                0,
            ),
        };
        let mut t = Translation {
            va,
            gpa,
            pa: gpa,
            page_size: 1 << shift1,
            level: level1,
            permissions: perms1,
            attributes: attrs1,
            second: None,
            memory_refs: 0,
        };
        let mut second_out = None;
        if let Some(second) = &self.second {
            let s = self.second_walk(
                second,
                mem,
                gpa,
                access.kind,
                perms1.user,
                set_ad,
                FaultSite {
                    va,
                    access,
                    guest_table: None,
                },
                cache.as_deref_mut(),
                &mut refs,
            )?;
            t.pa = s.base | (gpa & ((1u64 << s.shift) - 1));
            t.second = Some(self.second_info(second, &s));
            second_out = Some(s);
        }
        t.memory_refs = refs;
        if let Some(c) = cache {
            let shift = second_out.map_or(shift1, |s| s.shift.min(shift1));
            let mask = (1u64 << shift) - 1;
            let mut flags = 0;
            if set_ad {
                flags |= TLB_ACCESSED;
                let dirty2 = second_out.map_or(true, |s| s.dirty);
                if access.is_write() || (attrs1.dirty && dirty2) {
                    flags |= TLB_DIRTY;
                }
            }
            if attrs1.global {
                flags |= TLB_GLOBAL;
            }
            let s2 = second_out.unwrap_or_default();
            // The access that made the walk is allowed; others are checked
            // on the hit that first asks, then remembered.
            let bit = 1u32 << access.index();
            {
                let check_tag = c.check_index(self.check_config);
                let space = c.space_id(&self.space_key);
                c.insert(TlbEntry {
                    space,
                    tag: TlbEntry::tag_of(va, u32::from(shift)),
                    gpa_base: gpa & !mask,
                    pa_base: t.pa & !mask,
                    leaf1,
                    leaf2: s2.leaf,
                    acc1: (acc1 & 0xff) as u8,
                    acc2: (s2.acc & 0xff) as u8,
                    check_tag,
                    rights: bit | (bit << 16),
                    pcid: self.pcid,
                    shift,
                    shift1,
                    level1,
                    shift2: s2.shift,
                    level2: s2.level,
                    flags,
                });
            }
        }
        Ok(t)
    }

    /// A translation from a cache entry, if the entry answers this access
    /// (permissions allow it, and no accessed/dirty update is due). Sets
    /// `changed` when it changed the entry's remembered rights.
    #[inline(always)]
    fn answer_from_cache(
        &self,
        e: &mut TlbEntry,
        checks: u16,
        va: u64,
        access: Access,
        set_ad: bool,
        changed: &mut bool,
    ) -> Option<Translation> {
        if set_ad
            && (e.flags & TLB_ACCESSED == 0 || (access.is_write() && e.flags & TLB_DIRTY == 0))
        {
            return None;
        }
        let mask = (1u64 << e.shift) - 1;
        let acc1 = u64::from(e.acc1);
        let acc2 = u64::from(e.acc2);
        let bit = 1u32 << access.index();
        if e.check_tag != checks {
            // The guest changed CR0.WP, SMEP, SMAP or its keys since: forget
            // what was checked under the old settings.
            e.check_tag = checks;
            e.rights = 0;
            *changed = true;
        }
        let allowed = if e.rights & bit != 0 {
            e.rights & (bit << 16) != 0
        } else {
            let ok = self.allows(acc1, e.leaf1, acc2, e.leaf2, e.shift2 != 0, access);
            e.rights |= bit | if ok { bit << 16 } else { 0 };
            *changed = true;
            ok
        };
        if !allowed {
            return None;
        }
        let (perms1, attrs1) = match &self.first {
            First::X86(fmt) => (
                fmt.permissions(acc1, e.leaf1),
                fmt.attributes(e.level1, e.leaf1),
            ),
            First::NoPaging => (no_paging_permissions(), LeafAttributes::default()),
        };
        let second = match &self.second {
            None => None,
            Some(s) => {
                let acc = acc2;
                if e.shift2 == 0 {
                    return None;
                }
                Some(self.second_info(
                    s,
                    &SecondOut {
                        base: 0,
                        shift: e.shift2,
                        level: e.level2,
                        acc,
                        leaf: e.leaf2,
                        accessed: false,
                        dirty: false,
                    },
                ))
            }
        };
        Some(Translation {
            va,
            gpa: e.gpa_base | (va & mask),
            pa: e.pa_base | (va & mask),
            page_size: 1 << e.shift1,
            level: e.level1,
            permissions: perms1,
            attributes: attrs1,
            second,
            memory_refs: 0,
        })
    }

    /// Whether both levels' cached rights allow `access`, with this
    /// walker's check settings.
    fn allows(
        &self,
        acc1: u64,
        leaf1: u64,
        acc2: u64,
        leaf2: u64,
        has_second: bool,
        access: Access,
    ) -> bool {
        let (first_ok, user) = match &self.first {
            First::X86(fmt) => (
                fmt.check(acc1, leaf1, access, false).is_ok(),
                fmt.permissions(acc1, leaf1).user,
            ),
            First::NoPaging => (true, true),
        };
        let second_ok = match (&self.second, has_second) {
            (None, _) => true,
            (Some(_), false) => false,
            (Some(Second::Ept(f)), true) => f
                .check(acc2, leaf2, second_access(access.kind), user)
                .is_ok(),
            (Some(Second::Npt(f)), true) => f
                .check(acc2, leaf2, second_access(access.kind), user)
                .is_ok(),
        };
        first_ok && second_ok
    }

    fn second_info(&self, second: &Second, s: &SecondOut) -> SecondTranslation {
        let (permissions, attributes) = match second {
            Second::Ept(f) => (f.permissions(s.acc, s.leaf), f.attributes(s.level, s.leaf)),
            Second::Npt(f) => (f.permissions(s.acc, s.leaf), f.attributes(s.level, s.leaf)),
        };
        SecondTranslation {
            page_size: 1 << s.shift,
            level: s.level,
            permissions,
            attributes,
        }
    }

    /// A first-level stop as the fault the guest would see.
    fn fault_first(&self, va: u64, access: Access, s: Stop) -> WalkFault {
        let code = match (s.reason, &self.first) {
            (FaultReason::NonCanonical, _) => FaultCode::GeneralProtection,
            (
                FaultReason::Unbacked { .. }
                | FaultReason::ReadOnlyTable
                | FaultReason::Contended
                | FaultReason::Misconfigured,
                _,
            ) => FaultCode::Emulation,
            (FaultReason::AddressTooWide, First::NoPaging) => FaultCode::GeneralProtection,
            (reason, First::X86(fmt)) => FaultCode::PageFault {
                error_code: fmt.error_code(reason, access),
            },
            (_, First::NoPaging) => FaultCode::Emulation,
        };
        WalkFault {
            va,
            gpa: None,
            access,
            stage: Stage::First,
            level: s.level,
            entry_addr: s.entry_addr,
            entry: s.entry,
            reason: s.reason,
            code,
        }
    }

    /// Translates `gpa` through the second level.
    #[allow(clippy::too_many_arguments)]
    fn second_walk<M: PhysMemory + ?Sized>(
        &self,
        second: &Second,
        mem: &M,
        gpa: u64,
        kind: AccessKind,
        user_linear: bool,
        set_ad: bool,
        site: FaultSite,
        mut cache: Option<&mut WalkCache>,
        refs: &mut u32,
    ) -> Result<SecondOut, WalkFault> {
        let access = second_access(kind);
        if let Some(c) = cache.as_deref_mut() {
            let second_space = c.space_id(&self.second_key);
            if let Some(n) = c.lookup_nested(second_space, gpa) {
                let ok = match second {
                    Second::Ept(f) => f.check(n.acc, n.leaf, access, user_linear).is_ok(),
                    Second::Npt(f) => f.check(n.acc, n.leaf, access, user_linear).is_ok(),
                };
                let ad_ok = !set_ad || (n.accessed && (kind != AccessKind::Write || n.dirty));
                if ok && ad_ok {
                    return Ok(n);
                }
            }
        }
        let mut port = DirectPort { mem, refs: 0 };
        let r = match second {
            Second::Ept(f) => f.check_input(gpa).map_err(stop_at_input).and_then(|()| {
                engine::walk(
                    f,
                    &mut port,
                    gpa,
                    access,
                    user_linear,
                    set_ad,
                    root_start(f),
                )
            }),
            Second::Npt(f) => f.check_input(gpa).map_err(stop_at_input).and_then(|()| {
                engine::walk(
                    f,
                    &mut port,
                    gpa,
                    access,
                    user_linear,
                    set_ad,
                    root_start(f),
                )
            }),
        };
        *refs += port.refs;
        let w = r.map_err(|f| match f {
            Fail::Stop(s) => self.fault_second(second, gpa, kind, site, s),
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
        if let Some(c) = cache {
            let second_space = c.space_id(&self.second_key);
            c.insert_nested(second_space, gpa, out);
        }
        Ok(out)
    }

    /// A second-level stop as the VM exit a hypervisor would see.
    fn fault_second(
        &self,
        second: &Second,
        gpa: u64,
        kind: AccessKind,
        site: FaultSite,
        s: Stop,
    ) -> WalkFault {
        let code = match (second, s.reason) {
            (
                _,
                FaultReason::Unbacked { .. } | FaultReason::ReadOnlyTable | FaultReason::Contended,
            ) => FaultCode::Emulation,
            (Second::Ept(_), FaultReason::Misconfigured) => FaultCode::EptMisconfig,
            (Second::Ept(f), reason) => {
                let pdpte = site.guest_table.is_some_and(|l| self.is_pae_pdpte(l));
                let mut q = match kind {
                    AccessKind::Read => 1,
                    // With EPT A/D on, every guest paging-structure access
                    // counts as a write, and a violation reports both the
                    // read and the write bit (SDM table 28-7, note 1).
                    AccessKind::Write if site.guest_table.is_some() && f.ad() && !pdpte => 3,
                    AccessKind::Write => 2,
                    AccessKind::Fetch => 4,
                };
                if reason != FaultReason::NotPresent {
                    q |= f.qualification_perms(s.acc);
                }
                // Bit 7: a linear address is known, for every violation but
                // a PDPTE load (at MOV CR3, not during a translation); with
                // paging off the linear address is the guest-physical one.
                // Bit 8: the access was to the translation of that linear
                // address, not to a guest paging structure.
                if !pdpte {
                    q |= 1 << 7;
                    if site.guest_table.is_none() {
                        q |= 1 << 8;
                    }
                }
                FaultCode::EptViolation { qualification: q }
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
            va: site.va,
            gpa: Some(gpa),
            access: site.access,
            stage: Stage::Second {
                guest_table: site.guest_table,
            },
            level: s.level,
            entry_addr: s.entry_addr,
            entry: s.entry,
            reason: s.reason,
            code,
        }
    }

    /// The access kind the second level checks for a guest page-table
    /// access: a write where the hardware updates accessed/dirty flags
    /// through it (EPT with A/D enabled; always for NPT, as the APM and
    /// KVM's nested MMU do), else a read.
    fn table_access_kind(second: &Second) -> AccessKind {
        match second {
            Second::Ept(f) if !f.ad() => AccessKind::Read,
            _ => AccessKind::Write,
        }
    }

    /// Whether a guest table of `level` is PAE paging's PDPT (its entries
    /// are loaded as the PDPTE registers, not walked).
    fn is_pae_pdpte(&self, level: u8) -> bool {
        level == 3
            && self
                .first_format()
                .is_some_and(|f| f.mode() == X86Mode::Pae)
    }

    pub(crate) fn first_format(&self) -> Option<&X86Format> {
        match &self.first {
            First::X86(f) => Some(f),
            First::NoPaging => None,
        }
    }

    /// Translates a guest-physical address through the second level (the
    /// identity without one): what reading a guest page table costs.
    pub(crate) fn guest_table_to_pa<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        gpa: u64,
        va: u64,
        level: u8,
    ) -> Result<u64, WalkFault> {
        match &self.second {
            None => Ok(gpa),
            Some(second) => {
                let mut refs = 0;
                let s = self.second_walk(
                    second,
                    mem,
                    gpa,
                    Self::table_access_kind(second),
                    false,
                    false,
                    FaultSite {
                        va,
                        access: Access::read(),
                        guest_table: Some(level),
                    },
                    None,
                    &mut refs,
                )?;
                Ok(s.base | (gpa & ((1u64 << s.shift) - 1)))
            }
        }
    }
}

/// A [`WalkCache`] bound to one [`Walker`] ([`WalkCache::bind`]): the
/// cache's numbers for the walker's address space and permission-check
/// settings are looked up once, so a hit of [`BoundCache::translate_pa`]
/// is the watch's generation compare, the set probe, one rights bit and
/// the page offset added: no `Translation` is built.
///
/// Exactly as correct as [`Walker::translate_with`]: the lean hit answers
/// only from an entry of this space whose rights for this access were
/// already checked under these settings (and whose walk set the
/// accessed/dirty flags an update would need), and only while the attached
/// [`super::TableWatch`] saw no table write; anything else (a miss, a
/// first check of an access, a pending flush) goes through
/// `translate_with` with the cache, which walks, checks, flushes and fills
/// as always. The binding borrows the cache, so nothing else can
/// invalidate it meanwhile; drop it to invalidate, then bind again.
#[derive(Debug)]
pub struct BoundCache<'a> {
    cache: &'a mut WalkCache,
    walker: &'a Walker,
    /// `cache.space_id(&walker.space_key)`, valid until the cache renumbers
    /// (only inside a call that takes it `&mut`: the miss path, which
    /// refreshes both numbers).
    space: u64,
    /// `cache.check_index(walker.check_config)`, as `space`.
    checks: u16,
}

impl WalkCache {
    /// Binds this cache to `walker` for a run of translations
    /// ([`BoundCache`]).
    pub fn bind<'a>(&'a mut self, walker: &'a Walker) -> BoundCache<'a> {
        let space = self.space_id(&walker.space_key);
        let checks = self.check_index(walker.check_config);
        self.front_claim(space, checks);
        BoundCache {
            cache: self,
            walker,
            space,
            checks,
        }
    }
}

impl BoundCache<'_> {
    /// The address in the walker's memory for `va`, as
    /// `walker.translate_with(mem, va, access, options, Some(cache))`
    /// would return in [`Translation::pa`], answered from the cache without
    /// building a `Translation` where it can.
    #[inline(always)]
    pub fn translate_pa<M: PhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        va: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<u64, WalkFault> {
        let need = if options.set_accessed_dirty {
            TLB_ACCESSED | if access.is_write() { TLB_DIRTY } else { 0 }
        } else {
            0
        };
        if let Some(pa) = self.cache.front_hit(va, access.index(), need) {
            return Ok(pa);
        }
        match self
            .cache
            .hit_pa(self.space, self.checks, va, access.index(), need)
        {
            Some(pa) => Ok(pa),
            None => self.miss_pa(mem, va, access, options),
        }
    }

    /// The full translation, as [`Walker::translate_with`] with the cache.
    #[inline]
    pub fn translate<M: PhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        va: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<Translation, WalkFault> {
        let r = self
            .walker
            .translate_with(mem, va, access, options, Some(&mut *self.cache));
        self.refresh();
        r
    }

    /// The walker bound.
    pub fn walker(&self) -> &Walker {
        self.walker
    }

    /// The cache's counts so far.
    pub fn stats(&self) -> super::CacheStats {
        self.cache.stats()
    }

    /// Everything but the lean hit: the full path, then the numbers again
    /// (the full path may have renumbered spaces or settings).
    #[inline(never)]
    fn miss_pa<M: PhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        va: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<u64, WalkFault> {
        self.translate(mem, va, access, options).map(|t| t.pa)
    }

    fn refresh(&mut self) {
        self.space = self.cache.space_id(&self.walker.space_key);
        self.checks = self.cache.check_index(self.walker.check_config);
        self.cache.front_claim(self.space, self.checks);
    }
}

/// Second-level result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SecondOut {
    pub(crate) base: u64,
    pub(crate) shift: u8,
    pub(crate) level: u8,
    pub(crate) acc: u64,
    pub(crate) leaf: u64,
    /// The walk set the accessed flags.
    pub(crate) accessed: bool,
    /// The leaf's dirty flag is known to be set.
    pub(crate) dirty: bool,
}

/// Where a second-level walk was needed, for its fault.
#[derive(Clone, Copy, Debug)]
struct FaultSite {
    va: u64,
    access: Access,
    guest_table: Option<u8>,
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

fn root_start<F: Format>(f: &F) -> Start {
    Start {
        level: f.top_level(),
        table: f.root(),
        acc: f.acc_start(),
    }
}

/// The second level sees every access as a user access of the same kind
/// (what NPT checks; EPT ignores privilege).
fn second_access(kind: AccessKind) -> Access {
    Access::new(kind, Privilege::User)
}

fn no_paging_permissions() -> Permissions {
    Permissions {
        read: true,
        write: true,
        execute: true,
        user: true,
        user_execute: true,
        key: 0,
    }
}

/// The engine's port for a nested walk: every guest page-table address is
/// translated through the second level before it is read or updated.
struct NestedPort<'a, M: ?Sized> {
    walker: &'a Walker,
    second: &'a Second,
    mem: &'a M,
    va: u64,
    access: Access,
    set_ad: bool,
    refs: u32,
    cache: Option<&'a mut WalkCache>,
}

impl<M: PhysMemory + ?Sized> NestedPort<'_, M> {
    /// Where the guest table entry at `gpa` (a table of `level`) lives, as
    /// the second level allows the access: a read of the entry
    /// (`update` false) or the update of its accessed/dirty flags (true).
    fn table_pa(&mut self, gpa: u64, level: u8, update: bool) -> Result<u64, Fail> {
        let kind = if self.walker.is_pae_pdpte(level) {
            // PDPTEs are loaded (at MOV CR3, VM entry) as reads, even with
            // EPT A/D on, and carry no accessed flag (SDM 29.3.3.2, 4.4.1).
            AccessKind::Read
        } else if update {
            // Accessed/dirty updates of guest paging structures are data
            // writes to the second level, with EPT A/D off too (SDM
            // 29.3.3.2): a read-only mapping of the table faults.
            AccessKind::Write
        } else {
            Walker::table_access_kind(self.second)
        };
        let s = self
            .walker
            .second_walk(
                self.second,
                self.mem,
                gpa,
                kind,
                false,
                self.set_ad,
                FaultSite {
                    va: self.va,
                    access: self.access,
                    guest_table: Some(level),
                },
                self.cache.as_deref_mut(),
                &mut self.refs,
            )
            .map_err(Fail::Port)?;
        Ok(s.base | (gpa & ((1u64 << s.shift) - 1)))
    }

    fn unbacked(&self, gpa: u64, pa: u64, level: u8) -> Fail {
        Fail::Port(WalkFault {
            va: self.va,
            gpa: Some(gpa),
            access: self.access,
            stage: Stage::Second {
                guest_table: Some(level),
            },
            level,
            entry_addr: None,
            entry: None,
            reason: FaultReason::Unbacked { pa },
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
