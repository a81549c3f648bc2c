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
    x86::X86Mode,
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
            va,
            gpa: None,
            access: Access::read(),
            stage: Stage::First,
            level,
            entry_addr: at,
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

impl<M: PhysMemory + ?Sized> Iterator for Mappings<'_, M> {
    type Item = Result<Mapping, WalkFault>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.no_paging_left {
            // Without paging the whole 32-bit space maps to itself.
            self.no_paging_left = false;
            return Some(Ok(Mapping {
                va: GuestVirtAddr(0),
                gpa: GuestPhysAddr(0),
                size: 1 << 32,
                level: 0,
                permissions: Permissions::no_paging(),
                attributes: LeafAttributes::default(),
                entry: 0,
            }));
        }
        if let Some(w) = self.root_fault.take() {
            self.done = true;
            return Some(Err(w));
        }
        if self.done {
            return None;
        }
        let fmt = *self.walker.first_format()?;
        let mode = fmt.mode();
        loop {
            let top = self.stack.last_mut()?;
            if top.next >= fmt.entries(top.level) {
                self.stack.pop();
                continue;
            }
            if self.budget == 0 {
                let (va, level) = (top.va_prefix, top.level);
                self.done = true;
                return Some(Err(self.fault(
                    va,
                    level,
                    None,
                    None,
                    FaultReason::TooManyEntries,
                )));
            }
            self.budget -= 1;
            let idx = top.next;
            top.next += 1;
            let frame = *top;
            let shift = fmt.index_shift(frame.level);
            let va = frame.va_prefix | (idx << shift);
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
                    return Some(Err(self.fault(
                        canonical(va, mode),
                        frame.level,
                        Some(at),
                        None,
                        s.reason,
                    )));
                }
                Err(Fail::Port(w)) => return Some(Err(w)),
            };
            match fmt.decode(frame.level, raw) {
                Decoded::NotPresent => continue,
                Decoded::Reserved(bits) => {
                    return Some(Err(self.fault(
                        canonical(va, mode),
                        frame.level,
                        Some(at),
                        Some(raw),
                        FaultReason::Reserved { bits },
                    )))
                }
                Decoded::Misconfigured => {
                    return Some(Err(self.fault(
                        canonical(va, mode),
                        frame.level,
                        Some(at),
                        Some(raw),
                        FaultReason::Misconfigured,
                    )))
                }
                Decoded::Table(next) => {
                    let acc = fmt.accumulate(frame.acc, frame.level, raw);
                    if frame.level <= 1 {
                        continue;
                    }
                    match self.walker.guest_table_to_pa(
                        self.mem,
                        next,
                        canonical(va, mode),
                        frame.level - 1,
                    ) {
                        Ok(pa) => self.stack.push(Frame {
                            level: frame.level - 1,
                            table_pa: pa,
                            next: 0,
                            va_prefix: va,
                            acc,
                        }),
                        Err(w) => return Some(Err(w)),
                    }
                }
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
            }
        }
    }
}
