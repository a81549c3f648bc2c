//! Listing every mapping of a guest address space, as QEMU's `info tlb`
//! does: a depth-first pass over the guest's tables in address order,
//! yielding one [`Mapping`] per present leaf (a 4 KiB page or a large page).
//! The pass reads tables through the second level when there is one, and is
//! bounded by an entry budget, because guest tables may form cycles.

use super::{
    engine::{DirectPort, Fail, Port},
    fault::{FaultCode, FaultReason, Stage, WalkFault},
    format::{Decoded, Format},
    memory::PhysMemory,
    types::{Access, LeafAttributes, Permissions},
    walker::Walker,
    x86::{X86Format, X86Mode},
};
use crate::addr::{GuestPhysAddr, GuestVirtAddr};

/// Default number of entries a listing may read: 2^24 (16 Mi), enough for
/// 64 GiB of 4 KiB pages.
pub const DEFAULT_ENTRY_BUDGET: u64 = 1 << 24;

/// One mapping of the guest address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// First virtual address (canonical form in 4/5-level paging).
    pub va: GuestVirtAddr,
    /// First guest-physical address.
    pub gpa: GuestPhysAddr,
    /// Size in bytes (4 KiB, 2 MiB, 4 MiB, 1 GiB).
    pub size: u64,
    /// Level of the leaf entry.
    pub level: u8,
    /// Permissions combined over every level.
    pub permissions: Permissions,
    /// The leaf's attributes.
    pub attributes: LeafAttributes,
    /// The leaf entry as stored.
    pub entry: u64,
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    level: u8,
    /// Address of the table in the walker's memory.
    table_pa: u64,
    next: u64,
    va_prefix: u64,
    acc: u64,
}

/// Iterator over the mappings of an address space; see
/// [`Walker::mappings`]. Yields `Err` for an entry it cannot use (reserved
/// bits, a table outside memory, a second-level fault on a table) and goes
/// on with the next one; after the budget runs out it yields one
/// [`FaultReason::TooManyEntries`] and stops.
pub struct Mappings<'a, M: ?Sized> {
    walker: &'a Walker,
    mem: &'a M,
    stack: Vec<Frame>,
    budget: u64,
    done: bool,
    no_paging_left: bool,
    root_fault: Option<WalkFault>,
}

impl Walker {
    /// Every mapping of this address space, in virtual-address order.
    pub fn mappings<'a, M: PhysMemory + ?Sized>(&'a self, mem: &'a M) -> Mappings<'a, M> {
        self.mappings_with_budget(mem, DEFAULT_ENTRY_BUDGET)
    }

    /// As [`Walker::mappings`], reading at most `budget` entries.
    pub fn mappings_with_budget<'a, M: PhysMemory + ?Sized>(
        &'a self,
        mem: &'a M,
        budget: u64,
    ) -> Mappings<'a, M> {
        let mut it = Mappings {
            walker: self,
            mem,
            stack: Vec::with_capacity(6),
            budget,
            done: false,
            no_paging_left: self.mode() == X86Mode::NoPaging,
            root_fault: None,
        };
        if let Some(fmt) = self.first_format() {
            match self.guest_table_to_pa(mem, fmt.root(), 0, fmt.top_level()) {
                Ok(pa) => it.stack.push(Frame {
                    level: fmt.top_level(),
                    table_pa: pa,
                    next: 0,
                    va_prefix: 0,
                    acc: fmt.acc_start(),
                }),
                // The root itself is unreachable: say so once, then stop.
                Err(w) => it.root_fault = Some(w),
            }
        }
        it
    }
}

impl<M: PhysMemory + ?Sized> Mappings<'_, M> {
    fn fault(
        &self,
        va: u64,
        level: u8,
        at: Option<u64>,
        entry: Option<u64>,
        reason: FaultReason,
    ) -> WalkFault {
        WalkFault {
            va: GuestVirtAddr(va),
            gpa: None,
            access: Access::read(),
            stage: Stage::First,
            level,
            entry_addr: at.map(GuestPhysAddr),
            entry,
            reason,
            code: FaultCode::Emulation,
        }
    }
}

fn canonical(va: u64, mode: X86Mode) -> u64 {
    let width = match mode {
        X86Mode::Level4 => 48,
        X86Mode::Level5 => 57,
        _ => return va,
    };
    ((va << (64 - width)) as i64 >> (64 - width)) as u64
}

impl<M: PhysMemory + ?Sized> Mappings<'_, M> {
    /// What comes before the tables: the identity mapping without paging,
    /// or the fault of an unreachable root. `None`: go on to the tables.
    fn prelude(&mut self) -> Option<Option<Result<Mapping, WalkFault>>> {
        if self.no_paging_left {
            // Without paging the whole 32-bit space maps to itself.
            self.no_paging_left = false;
            return Some(Some(Ok(Mapping {
                va: GuestVirtAddr(0),
                gpa: GuestPhysAddr(0),
                size: 1 << 32,
                level: 0,
                permissions: Permissions::no_paging(),
                attributes: LeafAttributes::default(),
                entry: 0,
            })));
        }
        if let Some(w) = self.root_fault.take() {
            self.done = true;
            return Some(Some(Err(w)));
        }
        self.done.then_some(None)
    }

    /// The next entry of the table on top of the stack: its frame, its
    /// index, or `Err` with what to yield (the budget spent), or `None`
    /// when the stack is empty.
    fn next_slot(&mut self, fmt: &X86Format) -> Option<Result<(Frame, u64), WalkFault>> {
        loop {
            let top = self.stack.last_mut()?;
            if top.next >= fmt.entries(top.level) {
                self.stack.pop();
                continue;
            }
            if self.budget == 0 {
                let (va, level) = (top.va_prefix, top.level);
                self.done = true;
                let f = self.fault(va, level, None, None, FaultReason::TooManyEntries);
                return Some(Err(f));
            }
            self.budget -= 1;
            let idx = top.next;
            top.next += 1;
            return Some(Ok((*top, idx)));
        }
    }

    /// Visits entry `idx` of `frame`'s table: `None` to go on with the next
    /// entry, else what to yield.
    fn visit(
        &mut self,
        fmt: &X86Format,
        frame: Frame,
        idx: u64,
    ) -> Option<Result<Mapping, WalkFault>> {
        let mode = fmt.mode();
        let va = frame.va_prefix | (idx << fmt.index_shift(frame.level));
        let at = frame.table_pa + idx * if fmt.wide() { 8 } else { 4 };
        let mut port = DirectPort {
            mem: self.mem,
            refs: 0,
        };
        let raw = match port.read(at, fmt.wide(), frame.level) {
            Ok(r) => r,
            Err(Fail::Stop(s)) => {
                // The rest of this table is unreadable too.
                self.stack.pop();
                let va = canonical(va, mode);
                return Some(Err(self.fault(va, frame.level, Some(at), None, s.reason)));
            }
            Err(Fail::Port(w)) => return Some(Err(w)),
        };
        let reason = match fmt.decode(frame.level, raw) {
            Decoded::NotPresent => return None,
            Decoded::Reserved(bits) => FaultReason::Reserved { bits },
            Decoded::Misconfigured => FaultReason::Misconfigured,
            Decoded::Table(next) => return self.descend(fmt, frame, va, raw, next),
            Decoded::Leaf { base, shift } => {
                let acc = fmt.accumulate(frame.acc, frame.level, raw);
                return Some(Ok(Mapping {
                    va: GuestVirtAddr(canonical(va, mode)),
                    gpa: GuestPhysAddr(base),
                    size: 1 << shift,
                    level: frame.level,
                    permissions: fmt.permissions(acc, raw),
                    attributes: fmt.attributes(frame.level, raw),
                    entry: raw,
                }));
            }
        };
        let va = canonical(va, mode);
        Some(Err(self.fault(
            va,
            frame.level,
            Some(at),
            Some(raw),
            reason,
        )))
    }

    /// Pushes the table `next` that entry `raw` of `frame` (mapping `va`)
    /// points at; `Some` with the fault if it cannot be reached.
    fn descend(
        &mut self,
        fmt: &X86Format,
        frame: Frame,
        va: u64,
        raw: u64,
        next: u64,
    ) -> Option<Result<Mapping, WalkFault>> {
        let acc = fmt.accumulate(frame.acc, frame.level, raw);
        if frame.level <= 1 {
            return None;
        }
        let level = frame.level - 1;
        let at_va = canonical(va, fmt.mode());
        match self.walker.guest_table_to_pa(self.mem, next, at_va, level) {
            Ok(pa) => {
                self.stack.push(Frame {
                    level,
                    table_pa: pa,
                    next: 0,
                    va_prefix: va,
                    acc,
                });
                None
            }
            Err(w) => Some(Err(w)),
        }
    }
}

impl<M: PhysMemory + ?Sized> Iterator for Mappings<'_, M> {
    type Item = Result<Mapping, WalkFault>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(item) = self.prelude() {
            return item;
        }
        let fmt = *self.walker.first_format()?;
        loop {
            let (frame, idx) = match self.next_slot(&fmt)? {
                Ok(slot) => slot,
                Err(f) => return Some(Err(f)),
            };
            if let Some(item) = self.visit(&fmt, frame, idx) {
                return Some(item);
            }
        }
    }
}
