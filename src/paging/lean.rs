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
    Access, PhysMemory,
};

/// Walks `va` from `start`, or `None` where the full engine must.
#[inline]
pub(crate) fn walk<F: Format, M: PhysMemory + ?Sized>(
    fmt: &F,
    mem: &M,
    va: u64,
    access: Access,
    start: Start,
) -> Option<(Walked, u32)> {
    let wide = fmt.wide();
    let mut level = start.level;
    let mut table = start.table;
    let mut acc = start.acc;
    let mut out = Walked {
        start_level: start.level,
        ..Walked::default()
    };
    let mut refs = 0;
    loop {
        let at = fmt.entry_addr(table, level, va);
        let raw = if wide {
            mem.read_u64(at)?
        } else {
            u64::from(mem.read_u32(at)?)
        };
        refs += 1;
        out.tables[usize::from(level)] = (table, acc);
        match fmt.decode(level, raw) {
            Decoded::Table(next) if level > 1 => {
                acc = fmt.accumulate(acc, level, raw);
                table = next;
                level -= 1;
            }
            Decoded::Leaf { base, shift } => {
                acc = fmt.accumulate(acc, level, raw);
                fmt.check(acc, raw, access, false).ok()?;
                out.base = base;
                out.shift = shift;
                out.acc = acc;
                out.leaf_level = level;
                out.leaf = raw;
                return Some((out, refs));
            }
            _ => return None,
        }
    }
}
