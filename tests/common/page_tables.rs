//! A page-table builder for the paging tests: lays out the tables of any
//! paging format (32-bit with and without PSE, PAE, IA-32e 4- and 5-level,
//! EPT 4/5-level, AMD NPT 4/5-level) in a `GuestMemory` from a list of
//! intended mappings, and keeps a `HashMap` model of what each mapping
//! should translate to (frame, size, level, combined permissions).
//!
//! The builder encodes entries itself (it shares no code with the walker),
//! so a walker that decodes a bit differently disagrees with the model.
//! Tables live in a "table space" (the address the upper entries hold:
//! physical for a single-level walk, guest-physical for a nested guest)
//! that maps linearly onto memory at `mem_base`.

#![allow(dead_code)] // each test binary uses a subset

use std::collections::HashMap;

use pagefold::paging::{
    x86::{CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME, EFER_NXE},
    EptConfig, NptConfig, Permissions, SecondLevel, X86Paging,
};
use pagefold::{GuestMemory, GuestPhysAddr};

pub(crate) const PAGE: u64 = 4096;

/// A paging format the builder can lay out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Bits32,
    Bits32Pse,
    Pae,
    Level4,
    Level5,
    Ept4,
    Ept5,
    Npt4,
    Npt5,
}

impl Kind {
    pub(crate) const FIRST: [Kind; 5] = [
        Kind::Bits32,
        Kind::Bits32Pse,
        Kind::Pae,
        Kind::Level4,
        Kind::Level5,
    ];
    pub(crate) const SECOND: [Kind; 4] = [Kind::Ept4, Kind::Ept5, Kind::Npt4, Kind::Npt5];

    pub(crate) fn levels(self) -> u8 {
        match self {
            Kind::Bits32 | Kind::Bits32Pse => 2,
            Kind::Pae => 3,
            Kind::Level4 | Kind::Ept4 | Kind::Npt4 => 4,
            Kind::Level5 | Kind::Ept5 | Kind::Npt5 => 5,
        }
    }

    pub(crate) fn wide(self) -> bool {
        !matches!(self, Kind::Bits32 | Kind::Bits32Pse)
    }

    pub(crate) fn is_ept(self) -> bool {
        matches!(self, Kind::Ept4 | Kind::Ept5)
    }

    pub(crate) fn is_npt(self) -> bool {
        matches!(self, Kind::Npt4 | Kind::Npt5)
    }

    pub(crate) fn is_second(self) -> bool {
        self.is_ept() || self.is_npt()
    }

    /// Whether the format has an XD bit (with NXE).
    pub(crate) fn has_xd(self) -> bool {
        !matches!(self, Kind::Bits32 | Kind::Bits32Pse) && !self.is_ept()
    }

    /// x86 first level with sign-extended (canonical) addresses.
    pub(crate) fn canonical(self) -> bool {
        matches!(self, Kind::Level4 | Kind::Level5)
    }

    /// Input address width.
    pub(crate) fn va_bits(self) -> u32 {
        match self {
            Kind::Bits32 | Kind::Bits32Pse | Kind::Pae => 32,
            Kind::Level4 | Kind::Ept4 | Kind::Npt4 => 48,
            Kind::Level5 | Kind::Ept5 | Kind::Npt5 => 57,
        }
    }

    pub(crate) fn index_shift(self, level: u8) -> u32 {
        let l = u32::from(level);
        match self {
            Kind::Bits32 | Kind::Bits32Pse => 12 + 10 * (l - 1),
            _ => 12 + 9 * (l - 1),
        }
    }

    pub(crate) fn index_bits(self, level: u8) -> u32 {
        match self {
            Kind::Bits32 | Kind::Bits32Pse => 10,
            Kind::Pae if level == 3 => 2,
            _ => 9,
        }
    }

    /// Page sizes (log2) this format maps.
    pub(crate) fn leaf_shifts(self) -> &'static [u8] {
        match self {
            Kind::Bits32 => &[12],
            Kind::Bits32Pse => &[12, 22],
            Kind::Pae => &[12, 21],
            _ => &[12, 21, 30],
        }
    }

    pub(crate) fn level_of_shift(self, shift: u8) -> u8 {
        (1..=self.levels())
            .find(|&l| self.index_shift(l) == u32::from(shift))
            .expect("page size of this format")
    }

    /// Largest output address + 1 an entry of this format can hold.
    pub(crate) fn max_frame(self, shift: u8) -> u64 {
        match self {
            Kind::Bits32 => 1 << 32,
            Kind::Bits32Pse if shift == 22 => 1 << 40,
            Kind::Bits32Pse => 1 << 32,
            _ => 1 << 52,
        }
    }

    /// The sign-extended form of `va` for canonical formats.
    pub(crate) fn canon(self, va: u64) -> u64 {
        if self.canonical() {
            let w = self.va_bits();
            ((va << (64 - w)) as i64 >> (64 - w)) as u64
        } else {
            va
        }
    }
}

/// What one entry allows. x86 ignores `read` (always readable); EPT ignores
/// `user` and `key`. `extra` is OR-ed into leaf entries as is (A, D, G,
/// PWT/PCD/PAT, ignored bits, the EPT memory type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flags {
    pub(crate) read: bool,
    pub(crate) write: bool,
    pub(crate) exec: bool,
    pub(crate) user: bool,
    pub(crate) key: u8,
    pub(crate) extra: u64,
}

impl Flags {
    /// Everything allowed (EPT leaves write-back).
    pub(crate) const fn full() -> Self {
        Flags {
            read: true,
            write: true,
            exec: true,
            user: true,
            key: 0,
            extra: 6 << 3,
        }
    }

    pub(crate) const fn with(self, read: bool, write: bool, exec: bool, user: bool) -> Self {
        Flags {
            read,
            write,
            exec,
            user,
            ..self
        }
    }
}

/// One intended translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expect {
    /// First input address (canonical).
    pub(crate) va: u64,
    /// Output address of the page.
    pub(crate) frame: u64,
    pub(crate) size: u64,
    pub(crate) level: u8,
    pub(crate) perms: Permissions,
    /// Memory address of the leaf entry, and the entry.
    pub(crate) entry_addr: u64,
    pub(crate) entry: u64,
}

impl Expect {
    pub(crate) fn out(&self, va: u64) -> u64 {
        self.frame + (va - self.va)
    }
}

// x86 entry bits.
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
// EPT entry bits.
pub(crate) const ER: u64 = 1 << 0;
pub(crate) const EW: u64 = 1 << 1;
pub(crate) const EX: u64 = 1 << 2;
pub(crate) const EPS: u64 = 1 << 7;
pub(crate) const EA: u64 = 1 << 8;
pub(crate) const ED: u64 = 1 << 9;
pub(crate) const EWB: u64 = 6 << 3;

/// Page tables of one format, being built in memory.
pub(crate) struct Tables<'m> {
    pub(crate) kind: Kind,
    pub(crate) mem: &'m GuestMemory,
    /// Root table (table space).
    pub(crate) root: u64,
    space_base: u64,
    mem_base: u64,
    next: u64,
    end: u64,
    /// XD is honoured (EFER.NXE / NPT's NXE).
    pub(crate) nxe: bool,
    /// Protection keys are reported (CR4.PKE or PKS).
    pub(crate) pke: bool,
    /// The intended translations, by first input address.
    pub(crate) model: HashMap<u64, Expect>,
    /// Tables allocated (table space), root first.
    pub(crate) tables: Vec<u64>,
}

impl<'m> Tables<'m> {
    /// Tables of `kind` allocated from `[space_base, space_base + len)` in
    /// table space, which is memory at `mem_base`.
    pub(crate) fn new(
        kind: Kind,
        mem: &'m GuestMemory,
        space_base: u64,
        mem_base: u64,
        len: u64,
    ) -> Self {
        let mut t = Tables {
            kind,
            mem,
            root: 0,
            space_base,
            mem_base,
            next: space_base,
            end: space_base + len,
            nxe: kind.has_xd(),
            pke: false,
            model: HashMap::new(),
            tables: Vec::new(),
        };
        t.root = t.alloc().expect("room for the root table");
        t
    }

    /// Memory address of table-space address `a`.
    pub(crate) fn mem_addr(&self, a: u64) -> u64 {
        a - self.space_base + self.mem_base
    }

    fn alloc(&mut self) -> Option<u64> {
        if self.next + PAGE > self.end {
            return None;
        }
        let t = self.next;
        self.next += PAGE;
        self.mem
            .fill(GuestPhysAddr(self.mem_addr(t)), 0, PAGE as usize)
            .unwrap();
        self.tables.push(t);
        Some(t)
    }

    pub(crate) fn read_entry(&self, mem_addr: u64) -> u64 {
        if self.kind.wide() {
            self.mem.read_obj::<u64>(GuestPhysAddr(mem_addr)).unwrap()
        } else {
            u64::from(self.mem.read_obj::<u32>(GuestPhysAddr(mem_addr)).unwrap())
        }
    }

    pub(crate) fn write_entry(&self, mem_addr: u64, v: u64) {
        if self.kind.wide() {
            self.mem.write_obj(GuestPhysAddr(mem_addr), v).unwrap();
        } else {
            let v = u32::try_from(v).expect("32-bit entry");
            self.mem.write_obj(GuestPhysAddr(mem_addr), v).unwrap();
        }
    }

    /// Memory address of the entry for `va` in the level-`level` table at
    /// table-space address `table`.
    pub(crate) fn entry_mem_addr(&self, table: u64, level: u8, va: u64) -> u64 {
        let k = self.kind;
        let idx = (va >> k.index_shift(level)) & ((1 << k.index_bits(level)) - 1);
        self.mem_addr(table) + idx * if k.wide() { 8 } else { 4 }
    }

    fn present(&self, raw: u64) -> bool {
        if self.kind.is_ept() {
            raw & (ER | EW | EX) != 0
        } else {
            raw & P != 0
        }
    }

    fn is_leaf(&self, level: u8, raw: u64) -> bool {
        level == 1 || (level <= 3 && raw & PS != 0 && !(self.kind == Kind::Pae && level == 3))
    }

    fn addr_of(&self, raw: u64) -> u64 {
        if self.kind.wide() {
            raw & 0x000f_ffff_ffff_f000
        } else {
            raw & 0xffff_f000
        }
    }

    fn perm_bits(&self, f: Flags) -> u64 {
        if self.kind.is_ept() {
            (if f.read { ER } else { 0 })
                | (if f.write { EW } else { 0 })
                | (if f.exec { EX } else { 0 })
        } else {
            P | (if f.write { RW } else { 0 })
                | (if f.user { US } else { 0 })
                | (if !f.exec && self.nxe { XD } else { 0 })
        }
    }

    /// A table entry at `level` pointing at `next`.
    pub(crate) fn encode_table(&self, level: u8, next: u64, f: Flags) -> u64 {
        if self.kind == Kind::Pae && level == 3 {
            return next | P;
        }
        next | self.perm_bits(f)
    }

    /// A leaf entry at `level` mapping `frame`.
    pub(crate) fn encode_leaf(&self, level: u8, frame: u64, f: Flags) -> u64 {
        let mut e = self.perm_bits(f) | f.extra;
        if level > 1 {
            e |= PS;
        }
        if matches!(self.kind, Kind::Bits32Pse) && level == 2 {
            // PSE-36: physical bits 39:32 go in entry bits 20:13.
            e |= (frame & 0xffc0_0000) | ((frame >> 32) << 13);
        } else {
            e |= frame;
        }
        if matches!(self.kind, Kind::Level4 | Kind::Level5) {
            e |= u64::from(f.key & 0xf) << 59;
        }
        e
    }

    /// Folds an entry into the model's permissions (`None` = nothing yet).
    fn fold(&self, acc: Permissions, level: u8, raw: u64) -> Permissions {
        if self.kind.is_ept() {
            let execute = acc.execute && raw & EX != 0;
            return Permissions {
                read: acc.read && raw & ER != 0,
                write: acc.write && raw & EW != 0,
                execute,
                user: true,
                user_execute: execute,
                key: 0,
            };
        }
        if self.kind == Kind::Pae && level == 3 {
            return acc;
        }
        let user = acc.user && raw & US != 0;
        let execute = acc.execute && !(self.nxe && raw & XD != 0);
        Permissions {
            read: true,
            write: acc.write && raw & RW != 0,
            execute,
            user,
            user_execute: user && execute,
            key: if self.pke {
                ((raw >> 59) & 0xf) as u8
            } else {
                0
            },
        }
    }

    fn all() -> Permissions {
        Permissions {
            read: true,
            write: true,
            execute: true,
            user: true,
            user_execute: true,
            key: 0,
        }
    }

    /// Maps the `1 << shift`-byte page at `va` to `frame` with `leaf`
    /// permissions; `upper(level)` gives the permissions of a table entry
    /// the mapping needs to create. `false` (and no mapping) when the page
    /// overlaps an existing mapping or the tables are full.
    pub(crate) fn map(
        &mut self,
        va: u64,
        frame: u64,
        shift: u8,
        leaf: Flags,
        mut upper: impl FnMut(u8) -> Flags,
    ) -> bool {
        let k = self.kind;
        let size = 1u64 << shift;
        let va = k.canon(va);
        assert_eq!(va & (size - 1), 0, "va {va:#x} aligned to {size:#x}");
        assert_eq!(frame & (size - 1), 0, "frame {frame:#x} aligned");
        assert!(frame < k.max_frame(shift), "frame {frame:#x} fits");
        let leaf_level = k.level_of_shift(shift);
        let mut table = self.root;
        let mut acc = Self::all();
        for level in (leaf_level + 1..=k.levels()).rev() {
            let ea = self.entry_mem_addr(table, level, va);
            let mut raw = self.read_entry(ea);
            if self.present(raw) {
                if self.is_leaf(level, raw) {
                    return false;
                }
            } else {
                let Some(next) = self.alloc() else {
                    return false;
                };
                raw = self.encode_table(level, next, upper(level));
                self.write_entry(ea, raw);
            }
            acc = self.fold(acc, level, raw);
            table = self.addr_of(raw);
        }
        let ea = self.entry_mem_addr(table, leaf_level, va);
        if self.present(self.read_entry(ea)) {
            return false;
        }
        let raw = self.encode_leaf(leaf_level, frame, leaf);
        self.write_entry(ea, raw);
        let perms = self.fold(acc, leaf_level, raw);
        self.model.insert(
            va,
            Expect {
                va,
                frame,
                size,
                level: leaf_level,
                perms,
                entry_addr: ea,
                entry: raw,
            },
        );
        true
    }

    /// The intended translation covering `va`.
    pub(crate) fn lookup(&self, va: u64) -> Option<&Expect> {
        self.kind.leaf_shifts().iter().find_map(|&s| {
            let base = va & !((1u64 << s) - 1);
            self.model.get(&base).filter(|e| e.size == 1 << s)
        })
    }

    /// Clears the leaf entry of the mapping covering `va`.
    pub(crate) fn unmap(&mut self, va: u64) -> Option<Expect> {
        let e = *self.lookup(va)?;
        self.write_entry(e.entry_addr, 0);
        self.model.remove(&e.va);
        Some(e)
    }

    /// Memory addresses of the entries a walk for `va` reads, root first
    /// (stops at a leaf or a not-present entry).
    pub(crate) fn path(&self, va: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut table = self.root;
        for level in (1..=self.kind.levels()).rev() {
            let ea = self.entry_mem_addr(table, level, va);
            out.push(ea);
            let raw = self.read_entry(ea);
            if !self.present(raw) || self.is_leaf(level, raw) {
                break;
            }
            table = self.addr_of(raw);
        }
        out
    }

    /// Memory address of the level-`level` entry for `va` (the entries
    /// above it must be present tables).
    pub(crate) fn entry_at(&self, va: u64, level: u8) -> u64 {
        let mut table = self.root;
        for l in (level + 1..=self.kind.levels()).rev() {
            let raw = self.read_entry(self.entry_mem_addr(table, l, va));
            assert!(
                self.present(raw) && !self.is_leaf(l, raw),
                "level {l} is a table"
            );
            table = self.addr_of(raw);
        }
        self.entry_mem_addr(table, level, va)
    }

    /// x86 registers for this first-level format (CR0.WP, NXE where it
    /// exists).
    pub(crate) fn regs(&self) -> X86Paging {
        let pg = CR0_PE | CR0_PG | CR0_WP;
        let long = EFER_LME | EFER_LMA;
        let nxe = if self.nxe { EFER_NXE } else { 0 };
        match self.kind {
            Kind::Bits32 => X86Paging::new(pg, self.root, 0, 0),
            Kind::Bits32Pse => X86Paging::new(pg, self.root, CR4_PSE, 0),
            Kind::Pae => X86Paging::new(pg, self.root, CR4_PAE, nxe),
            Kind::Level4 => X86Paging::new(pg, self.root, CR4_PAE, long | nxe),
            Kind::Level5 => X86Paging::new(pg, self.root, CR4_PAE | CR4_LA57, long | nxe),
            k => panic!("{k:?} is not a first-level format"),
        }
    }

    /// The second-level configuration for this format.
    pub(crate) fn second(&self, ad: bool) -> SecondLevel {
        match self.kind {
            Kind::Ept4 => SecondLevel::Ept(EptConfig::four_level(GuestPhysAddr(self.root), ad)),
            Kind::Ept5 => SecondLevel::Ept(EptConfig::five_level(GuestPhysAddr(self.root), ad)),
            Kind::Npt4 | Kind::Npt5 => SecondLevel::Npt(NptConfig {
                ncr3: self.root,
                five_level: self.kind == Kind::Npt5,
                nxe: self.nxe,
                maxphyaddr: 52,
            }),
            k => panic!("{k:?} is not a second-level format"),
        }
    }
}

/// A small deterministic generator for the randomised builders.
#[derive(Clone, Debug)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub(crate) fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub(crate) fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// The leaf attributes the walker should report for `raw` at `level`.
pub(crate) fn expected_attributes(
    kind: Kind,
    level: u8,
    raw: u64,
) -> pagefold::paging::LeafAttributes {
    use pagefold::paging::LeafAttributes;
    if kind.is_ept() {
        return LeafAttributes {
            accessed: raw & EA != 0,
            dirty: raw & ED != 0,
            global: false,
            write_through: false,
            cache_disable: false,
            pat: false,
            memory_type: Some(((raw >> 3) & 7) as u8),
            ignore_pat: raw & (1 << 6) != 0,
        };
    }
    LeafAttributes {
        accessed: raw & A != 0,
        dirty: raw & D != 0,
        global: raw & G != 0,
        write_through: raw & PWT != 0,
        cache_disable: raw & PCD != 0,
        pat: raw & if level > 1 { 1 << 12 } else { PS } != 0,
        memory_type: None,
        ignore_pat: false,
    }
}
