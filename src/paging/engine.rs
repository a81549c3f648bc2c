//! The walk engine: one loop, generic over a paging [`Format`] and over a
//! [`Port`] that reads and updates entries. A direct port reads physical
//! memory; the nested port first translates every table address through the
//! second level, which makes the same loop hardware's two-dimensional walk.
//!
//! The engine is the only code that follows guest-controlled pointers. Its
//! work is bounded by construction: one entry per level, `top_level()`
//! levels at most (five), and a bounded number of restarts when an
//! accessed/dirty update races with a writer of the entry.

use super::{
    fault::{FaultReason, WalkFault},
    format::{Decoded, Format},
    memory::PhysMemory,
    types::Access,
};
use crate::addr::GuestPhysAddr;

/// How many times a walk restarts after losing an accessed/dirty
/// compare-exchange before it reports [`FaultReason::Contended`].
pub(crate) const AD_RETRIES: u32 = 16;

/// Where a walk stopped inside its own format (the caller turns it into a
/// [`WalkFault`] with the right stage and code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stop {
    pub(crate) level: u8,
    pub(crate) entry_addr: Option<u64>,
    pub(crate) entry: Option<u64>,
    pub(crate) reason: FaultReason,
    /// Permissions accumulated before the stop (for EPT qualifications).
    pub(crate) acc: u64,
}

/// A failed walk: a stop in this walk's format, or a fault the port raised
/// (a second-level fault while reading a table), already complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fail {
    Stop(Stop),
    Port(WalkFault),
}

/// Reads and exchanges entries for the engine.
pub(crate) trait Port {
    /// The entry at `pa` (a table of level `level`).
    fn read(&mut self, pa: u64, wide: bool, level: u8) -> Result<u64, Fail>;
    /// Exchanges the entry at `pa` from `old` to `new`; `Ok(false)` if it
    /// no longer held `old`.
    fn exchange(
        &mut self,
        pa: u64,
        wide: bool,
        level: u8,
        old: u64,
        new: u64,
    ) -> Result<bool, Fail>;
}

/// Where a walk begins: the root, or a cached upper-level entry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Start {
    /// Level of the table to read first.
    pub(crate) level: u8,
    /// Physical address of that table.
    pub(crate) table: u64,
    /// Permissions accumulated above it.
    pub(crate) acc: u64,
}

/// A completed walk.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Walked {
    /// Output address of the page.
    pub(crate) base: u64,
    /// log2 of the page size.
    pub(crate) shift: u8,
    /// Accumulated permissions.
    pub(crate) acc: u64,
    /// Level of the leaf entry.
    pub(crate) leaf_level: u8,
    /// The leaf entry (as left after any accessed/dirty update).
    pub(crate) leaf: u64,
    /// For each level read (index = level), the table it was read from and
    /// the permissions accumulated above it: what a paging-structure cache
    /// keeps.
    pub(crate) tables: [(u64, u64); 6],
    /// The first level this walk read.
    pub(crate) start_level: u8,
}

/// Walks `va` from `start`, checks `access`, and when `set_ad` updates the
/// accessed/dirty flags as hardware does (compare-exchange; the walk
/// restarts if an entry changed under it). A faulting walk changes nothing.
pub(crate) fn walk<F: Format, P: Port>(
    fmt: &F,
    port: &mut P,
    va: u64,
    access: Access,
    user_linear: bool,
    set_ad: bool,
    mut start: Start,
) -> Result<Walked, Fail> {
    let mut tries = 0;
    // Filled in place by `descend` on every pass (never returned by value:
    // the two arrays are 200 bytes, and a copy per walk showed in the
    // nested walk's time, which runs the engine once per guest table).
    let mut out = Walked::default();
    let mut used: Used = [(0, 0); 6];
    loop {
        if !descend(
            fmt,
            port,
            va,
            access,
            user_linear,
            start,
            &mut out,
            &mut used,
        )? {
            // Denied by an entry above a cached start, which this walk
            // never read: walk again from the root so the fault names it.
            start = Start {
                level: fmt.top_level(),
                table: fmt.root(),
                acc: fmt.acc_start(),
            };
            continue;
        }
        if set_ad && !set_accessed_dirty(fmt, port, access, &mut out, &used, &mut tries)? {
            continue;
        }
        return Ok(out);
    }
}

/// A stop at `level`, at the entry `entry_addr` holding `entry`.
#[inline]
fn stop(
    level: u8,
    entry_addr: Option<u64>,
    entry: Option<u64>,
    reason: FaultReason,
    acc: u64,
) -> Fail {
    Fail::Stop(Stop {
        level,
        entry_addr,
        entry,
        reason,
        acc,
    })
}

/// The entries a walk used: per level, the entry's address and value as
/// read (for the accessed/dirty pass).
type Used = [(u64, u64); 6];

/// Reads `va`'s entries from `start` down to the leaf and checks `access`
/// there, filling `out` (the walk) and `used` (the entries it read):
/// `Ok(true)` at an allowed leaf, `Ok(false)` when an entry above `start`
/// denied the access (walk again from the root).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn descend<F: Format, P: Port>(
    fmt: &F,
    port: &mut P,
    va: u64,
    access: Access,
    user_linear: bool,
    start: Start,
    out: &mut Walked,
    used: &mut Used,
) -> Result<bool, Fail> {
    let wide = fmt.wide();
    let mut level = start.level;
    let mut table = start.table;
    let mut acc = start.acc;
    *out = Walked {
        start_level: start.level,
        ..Walked::default()
    };
    *used = [(0, 0); 6];
    loop {
        let at = fmt.entry_addr(table, level, va);
        let raw = port.read(at, wide, level)?;
        out.tables[usize::from(level)] = (table, acc);
        used[usize::from(level)] = (at, raw);
        let reason = match fmt.decode(level, raw) {
            Decoded::NotPresent => FaultReason::NotPresent,
            Decoded::Reserved(bits) => FaultReason::Reserved { bits },
            Decoded::Misconfigured => FaultReason::Misconfigured,
            Decoded::Table(next) => {
                acc = fmt.accumulate(acc, level, raw);
                if level > 1 {
                    table = next;
                    level -= 1;
                    continue;
                }
                // A format never yields a table at level 1; treat a broken
                // one as not present rather than loop.
                FaultReason::NotPresent
            }
            Decoded::Leaf { base, shift } => {
                acc = fmt.accumulate(acc, level, raw);
                if let Err(d) = fmt.check(acc, raw, access, user_linear) {
                    if d.level > start.level {
                        return Ok(false);
                    }
                    let (ea, e) = used[usize::from(d.level)];
                    return Err(stop(d.level, Some(ea), Some(e), d.reason, acc));
                }
                out.base = base;
                out.shift = shift;
                out.acc = acc;
                out.leaf_level = level;
                out.leaf = raw;
                return Ok(true);
            }
        };
        return Err(stop(level, Some(at), Some(raw), reason, acc));
    }
}

/// Sets the accessed flags of the entries `out` used and the leaf's dirty
/// flag for a write, root first, as hardware sets them on the way down.
/// `Ok(false)`: an entry changed under the walk, which must walk again
/// (`tries` counts these, up to `AD_RETRIES`).
#[inline(always)]
fn set_accessed_dirty<F: Format, P: Port>(
    fmt: &F,
    port: &mut P,
    access: Access,
    out: &mut Walked,
    used: &Used,
    tries: &mut u32,
) -> Result<bool, Fail> {
    let wide = fmt.wide();
    for l in (out.leaf_level..=out.start_level).rev() {
        let (at, raw) = used[usize::from(l)];
        let leaf = l == out.leaf_level;
        let new = fmt.with_accessed(l, raw, leaf, access.is_write());
        if new == raw {
            continue;
        }
        if !port.exchange(at, wide, l, raw, new)? {
            *tries += 1;
            if *tries >= AD_RETRIES {
                return Err(stop(
                    l,
                    Some(at),
                    Some(raw),
                    FaultReason::Contended,
                    out.acc,
                ));
            }
            return Ok(false);
        }
        if leaf {
            out.leaf = new;
        }
    }
    Ok(true)
}

/// A port straight onto physical memory, counting the references it makes.
pub(crate) struct DirectPort<'m, M: ?Sized> {
    pub(crate) mem: &'m M,
    pub(crate) refs: u32,
}

impl<M: PhysMemory + ?Sized> Port for DirectPort<'_, M> {
    #[inline]
    fn read(&mut self, pa: u64, wide: bool, level: u8) -> Result<u64, Fail> {
        self.refs += 1;
        let v = if wide {
            self.mem.read_u64(pa)
        } else {
            self.mem.read_u32(pa).map(u64::from)
        };
        v.ok_or(Fail::Stop(Stop {
            level,
            entry_addr: Some(pa),
            entry: None,
            reason: FaultReason::Unbacked {
                pa: GuestPhysAddr(pa),
            },
            acc: 0,
        }))
    }

    fn exchange(
        &mut self,
        pa: u64,
        wide: bool,
        level: u8,
        old: u64,
        new: u64,
    ) -> Result<bool, Fail> {
        self.refs += 1;
        let r = if wide {
            self.mem.compare_exchange_u64(pa, old, new)
        } else {
            match (u32::try_from(old), u32::try_from(new)) {
                (Ok(o), Ok(n)) => self
                    .mem
                    .compare_exchange_u32(pa, o, n)
                    .map(|r| r.map_err(u64::from)),
                _ => None,
            }
        };
        match r {
            Some(r) => Ok(r.is_ok()),
            None => Err(Fail::Stop(Stop {
                level,
                entry_addr: Some(pa),
                entry: Some(old),
                reason: FaultReason::ReadOnlyTable,
                acc: 0,
            })),
        }
    }
}
