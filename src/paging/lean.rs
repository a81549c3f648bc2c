//! The lean walk: the common case — every entry present, nothing reserved,
//! the access allowed, no accessed/dirty update asked, no second level —
//! in as few instructions as the format allows, so a cold walk costs little
//! more than its memory loads. Anything else (a fault, an update, a nested
//! walk) returns `None` and the caller runs the full engine, which reports
//! the fault exactly. The lean walk never decides a fault on its own, so
//! the two can never disagree about one. A format may bring a lean walk
//! of its own from the root ([`RootWalk`]: AArch64 stage 1, RISC-V's
//! first stage), with its masks precomputed and its entries read through
//! the memory's [`EntryWindow`]; it answers exactly what [`walk`] does.

use super::{
    engine::{Start, Walked},
    format::{Decoded, Format},
    memory::{EntryWindow, PhysMemory},
    types::Access,
};

/// What a lean walk found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeanOut {
    pub(crate) base: u64,
    pub(crate) shift: u8,
    pub(crate) level: u8,
    pub(crate) refs: u32,
    pub(crate) acc: u64,
    pub(crate) leaf: u64,
}

/// Walks `va` from `start`, or `None` where the full engine must. When
/// `tables` is given, it receives (table, permissions above it) per level
/// read, for a paging-structure cache.
#[inline(always)]
pub(crate) fn walk<F: Format, M: PhysMemory + ?Sized>(
    fmt: &F,
    mem: &M,
    va: u64,
    access: Access,
    start: Start,
    mut tables: Option<&mut [(u64, u64); 6]>,
) -> Option<LeanOut> {
    let wide = fmt.wide();
    let mut level = start.level;
    let mut table = start.table;
    let mut acc = start.acc;
    let mut refs = 0;
    loop {
        let at = fmt.entry_addr(table, level, va);
        let raw = if wide {
            mem.read_u64(at)?
        } else {
            u64::from(mem.read_u32(at)?)
        };
        refs += 1;
        if let Some(t) = tables.as_deref_mut() {
            t[usize::from(level).min(5)] = (table, acc);
        }
        match fmt.decode(level, raw) {
            Decoded::Table(next) if level > 1 => {
                acc = fmt.accumulate_fast(acc, level, raw);
                table = next;
                level -= 1;
            }
            Decoded::Leaf { base, shift } => {
                acc = fmt.accumulate_fast(acc, level, raw);
                fmt.check(acc, raw, access, false).ok()?;
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
    }
}

/// As [`walk`], into a [`Walked`] for the cache-filling path.
#[inline]
pub(crate) fn walk_recorded<F: Format, M: PhysMemory + ?Sized>(
    fmt: &F,
    mem: &M,
    va: u64,
    access: Access,
    start: Start,
) -> Option<(Walked, u32)> {
    let mut w = Walked {
        start_level: start.level,
        ..Walked::default()
    };
    let l = walk(fmt, mem, va, access, start, Some(&mut w.tables))?;
    w.base = l.base;
    w.shift = l.shift;
    w.acc = l.acc;
    w.leaf_level = l.level;
    w.leaf = l.leaf;
    Some((w, l.refs))
}

/// How a format's own lean walk ([`RootWalk`]) reads an 8-byte entry.
pub(crate) trait ReadEntry {
    /// The entry at `pa`, or `None` where no memory backs it.
    fn read(&mut self, pa: u64) -> Option<u64>;
}

/// Reads through a window onto the region of the last entry read,
/// reopened on the region of `pa` when `pa` falls outside or the window
/// closed: then through [`PhysMemory::read_u64`] (the same value, read
/// the same way, without a region lookup per entry).
struct Windowed<'m, M: ?Sized> {
    mem: &'m M,
    window: EntryWindow<'m>,
}

impl<M: PhysMemory + ?Sized> ReadEntry for Windowed<'_, M> {
    #[inline(always)]
    fn read(&mut self, pa: u64) -> Option<u64> {
        match self.window.read_u64(pa) {
            Some(raw) => Some(raw),
            None => {
                let (window, raw) = reopen(self.mem, pa);
                self.window = window;
                raw
            }
        }
    }
}

/// The window onto the region of `pa`, and the entry at `pa` (read
/// through it, or through [`PhysMemory::read_u64`] if it is closed).
#[cold]
#[inline(never)]
fn reopen<M: PhysMemory + ?Sized>(mem: &M, pa: u64) -> (EntryWindow<'_>, Option<u64>) {
    let window = mem.entry_window(pa);
    let raw = match window.read_u64(pa) {
        Some(raw) => Some(raw),
        None => mem.read_u64(pa),
    };
    (window, raw)
}

/// Reads through [`PhysMemory::read_u64`].
struct ByMemory<'m, M: ?Sized>(&'m M);

impl<M: PhysMemory + ?Sized> ReadEntry for ByMemory<'_, M> {
    #[inline(always)]
    fn read(&mut self, pa: u64) -> Option<u64> {
        self.0.read_u64(pa)
    }
}

/// A format's own lean walk from its root: what [`walk`] answers from the
/// root, bit for bit (the same `LeanOut`, `None` wherever [`walk`] would
/// give `None` or might), with the format's per-level work precomputed.
pub(crate) trait RootWalk {
    /// The root table's physical address.
    fn lean_root(&self) -> u64;
    /// The walk of `va` for `access` from the root, reading through
    /// `reader`.
    fn walk_root_by<R: ReadEntry>(
        &self,
        va: u64,
        access: Access,
        reader: &mut R,
    ) -> Option<LeanOut>;
}

/// Runs `fmt`'s own lean walk of `va`, reading entries through the
/// memory's window onto the root's region when it has one open.
#[inline(always)]
pub(crate) fn walk_root<F: RootWalk, M: PhysMemory + ?Sized>(
    fmt: &F,
    mem: &M,
    va: u64,
    access: Access,
) -> Option<LeanOut> {
    let window = mem.entry_window(fmt.lean_root());
    if window.is_open() {
        fmt.walk_root_by(va, access, &mut Windowed { mem, window })
    } else {
        fmt.walk_root_by(va, access, &mut ByMemory(mem))
    }
}
