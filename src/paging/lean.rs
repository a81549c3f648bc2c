//! The lean walk: the common case — every entry present, nothing reserved,
//! the access allowed, no accessed/dirty update asked, no second level —
//! in as few instructions as the format allows, so a cold walk costs little
//! more than its memory loads. Anything else (a fault, an update, a nested
//! walk) returns `None` and the caller runs the full engine, which reports
//! the fault exactly. The lean walk never decides a fault on its own, so
//! the two can never disagree about one.

use super::{
    engine::{Start, Walked},
    format::{Decoded, Format},
    memory::PhysMemory,
    types::Access,
};

/// What a lean walk found.
#[derive(Clone, Copy, Debug)]
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
