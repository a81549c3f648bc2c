//! Listing every mapping of a guest address space, as QEMU's `info tlb`
//! does: a depth-first pass over the guest's tables in address order,
//! yielding one [`Mapping`] per present leaf (a 4 KiB page or a large page),
//! range after range where the architecture has two (AArch64's TTBR0 and
//! TTBR1). The pass reads tables through the second level when there is
//! one, and is bounded by an entry budget, because guest tables may form
//! cycles.

use super::{
    engine::{DirectPort, Fail, Port},
    fault::{FaultCode, FaultReason, Stage, WalkFault},
    first::{ArchAttributes, First, FirstFmt},
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
    /// What the leaf says beyond `attributes`, per architecture.
    pub arch_attributes: ArchAttributes,
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
    /// The ranges still to list, the next one last: each range's format
    /// and its lowest address.
    ranges: Vec<(FirstFmt<'a>, u64)>,
    /// The format of the range being listed.
    fmt: Option<FirstFmt<'a>>,
    budget: u64,
    done: bool,
    /// Without paging: the size of the identity mapping still to yield.
    no_paging: Option<u64>,
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
        let (mut ranges, mut no_paging) = (Vec::with_capacity(2), None);
        match self.first() {
            First::NoPaging => no_paging = Some(1 << 32),
            First::X86(f) => ranges.push((FirstFmt::X86(f), 0)),
            First::Aarch64(a) if !a.mmu_on() => no_paging = Some(1 << a.pa_bits()),
            First::Aarch64(a) => {
                ranges.extend(a.ranges().map(|(f, base)| (FirstFmt::Aarch64(f), base)));
                ranges.reverse();
            }
            First::Riscv { fmt: Some(f), .. } => ranges.push((FirstFmt::Riscv(f), 0)),
            First::Riscv { fmt: None, pa_bits } => no_paging = Some(1 << pa_bits),
        }
        Mappings {
            walker: self,
            mem,
            stack: Vec::with_capacity(6),
            ranges,
            fmt: None,
            budget,
            done: false,
            no_paging,
        }
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

/// The address a listing reports for `va`: its canonical form in x86
/// 4/5-level paging and RISC-V (AArch64's ranges start at their lowest
/// address, so their addresses are whole already).
fn canonical(va: u64, fmt: &FirstFmt<'_>) -> u64 {
    let width = match fmt {
        FirstFmt::X86(f) => match f.mode() {
            X86Mode::Level4 => 48,
            X86Mode::Level5 => 57,
            _ => return va,
        },
        FirstFmt::Aarch64(_) => return va,
        FirstFmt::Riscv(f) => f.input_bits(),
    };
    ((va << (64 - width)) as i64 >> (64 - width)) as u64
}

impl<M: PhysMemory + ?Sized> Mappings<'_, M> {
    /// The identity mapping without paging, once.
    fn no_paging_mapping(&mut self) -> Option<Mapping> {
        let size = self.no_paging.take()?;
        Some(Mapping {
            va: GuestVirtAddr(0),
            gpa: GuestPhysAddr(0),
            size,
            level: 0,
            permissions: Permissions::no_paging(),
            attributes: LeafAttributes::default(),
            arch_attributes: ArchAttributes::None,
            entry: 0,
        })
    }

    /// Starts the next range: its root on the stack, or `Err` with the
    /// fault of an unreachable root (the listing goes on with the range
    /// after it). `None` when no range is left.
    fn next_range(&mut self) -> Option<Result<(), WalkFault>> {
        let (fmt, base) = self.ranges.pop()?;
        self.fmt = Some(fmt);
        let top = fmt.top_level();
        Some(
            self.walker
                .guest_table_to_pa(self.mem, fmt.root(), base, top)
                .map(|pa| {
                    self.stack.push(Frame {
                        level: top,
                        table_pa: pa,
                        next: 0,
                        va_prefix: base,
                        acc: fmt.acc_start(),
                    })
                }),
        )
    }

    /// The next entry of the table on top of the stack: its frame, its
    /// index, or `Err` with what to yield (the budget spent), or `None`
    /// when the stack is empty.
    fn next_slot(&mut self, fmt: &FirstFmt<'_>) -> Option<Result<(Frame, u64), WalkFault>> {
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
        fmt: &FirstFmt<'_>,
        frame: Frame,
        idx: u64,
    ) -> Option<Result<Mapping, WalkFault>> {
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
                let va = canonical(va, fmt);
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
                let va = canonical(va, fmt);
                // A leaf wider than its slot (a RISC-V NAPOT page: each of
                // its 16 entries maps the whole 64 KiB) is listed per slot.
                let slot = fmt.index_shift(frame.level);
                let (base, shift) = if u32::from(shift) > slot {
                    let within = va & ((1u64 << shift) - 1) & !((1u64 << slot) - 1);
                    (base | within, (slot & 0x3f) as u8)
                } else {
                    (base, shift)
                };
                let (permissions, attributes, arch_attributes) =
                    self.walker.first().report(va, acc, raw, frame.level);
                return Some(Ok(Mapping {
                    va: GuestVirtAddr(va),
                    gpa: GuestPhysAddr(base),
                    size: 1 << shift,
                    level: frame.level,
                    permissions,
                    attributes,
                    arch_attributes,
                    entry: raw,
                }));
            }
        };
        let va = canonical(va, fmt);
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
        fmt: &FirstFmt<'_>,
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
        let at_va = canonical(va, fmt);
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
        if let Some(m) = self.no_paging_mapping() {
            return Some(Ok(m));
        }
        loop {
            if self.done {
                return None;
            }
            if self.stack.is_empty() {
                match self.next_range()? {
                    Ok(()) => continue,
                    Err(w) => return Some(Err(w)),
                }
            }
            let fmt = self.fmt?;
            // An emptied stack: the next range, at the top of the loop.
            let (frame, idx) = match self.next_slot(&fmt) {
                None => continue,
                Some(Ok(slot)) => slot,
                Some(Err(f)) => return Some(Err(f)),
            };
            if let Some(item) = self.visit(&fmt, frame, idx) {
                return Some(item);
            }
        }
    }
}
