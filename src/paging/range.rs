//! Translating a virtual range into physically contiguous segments (what a
//! device model needs for a DMA buffer or a virtio descriptor that spans
//! pages). In a 64-bit guest without a second level, one walk finds the
//! last-level table and the following pages are read straight from it, one
//! entry each, until the range or the table ends; every entry is decoded
//! and checked exactly as a walk would. Anything else walks per page.

use super::{
    fault::WalkFault, format::Format, lean, memory::PhysMemory, second::root_start, types::Access,
    walker::Walker, x86::X86Long,
};
use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SHIFT};

/// Bytes in a 4 KiB page, the last level's page.
const PAGE: u64 = 1 << PAGE_SHIFT;

/// A run of the range whose pages are physically contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Segment {
    /// First virtual address.
    pub va: GuestVirtAddr,
    /// Its guest-physical address.
    pub gpa: GuestPhysAddr,
    /// Its address in the walker's memory (`gpa` without a second level).
    pub pa: GuestPhysAddr,
    /// Bytes.
    pub len: u64,
}

/// Iterator over the segments of a range; see [`Walker::translate_range`].
/// After a fault it yields the fault and stops.
pub struct RangeSegments<'a, M: ?Sized> {
    walker: &'a Walker,
    mem: &'a M,
    access: Access,
    next: u64,
    end: u64,
    done: bool,
}

impl Walker {
    /// The segments of `[va, va + len)` for `access`, in order, each as
    /// long as physical contiguity allows. Changes nothing in memory.
    pub fn translate_range<'a, M: PhysMemory + ?Sized>(
        &'a self,
        mem: &'a M,
        va: GuestVirtAddr,
        len: u64,
        access: Access,
    ) -> RangeSegments<'a, M> {
        RangeSegments {
            walker: self,
            mem,
            access,
            next: va.0,
            end: va.0.saturating_add(len),
            done: len == 0,
        }
    }
}

/// A segment in the making: raw addresses, for the loop that extends it.
#[derive(Clone, Copy, Debug)]
struct Piece {
    va: u64,
    gpa: u64,
    pa: u64,
    len: u64,
}

impl Piece {
    fn segment(self) -> Segment {
        Segment {
            va: GuestVirtAddr(self.va),
            gpa: GuestPhysAddr(self.gpa),
            pa: GuestPhysAddr(self.pa),
            len: self.len,
        }
    }
}

impl<M: PhysMemory + ?Sized> RangeSegments<'_, M> {
    /// Extends `seg` through the last-level table `pt` (permissions above
    /// it `acc`) while entries map the following pages contiguously.
    fn extend_in_table(&self, long: &X86Long<'_>, pt: u64, acc: u64, seg: &mut Piece) {
        // Entries with the same rights bits get the same answer from the
        // check: decide it once per distinct set.
        let mut checked: Option<(u64, bool)> = None;
        while seg.va + seg.len < self.end {
            let va = seg.va + seg.len;
            if va & 0x1f_ffff == 0 {
                // The next page is in another table.
                return;
            }
            let Some(raw) = self.mem.read_u64(long.entry_addr(pt, 1, va)) else {
                return;
            };
            // Not present, reserved bits or not contiguous: the segment
            // ends (the next walk reports any fault).
            if long.pte_frame(raw) != Some(seg.gpa + seg.len) {
                return;
            }
            let rights = raw & X86Long::RIGHTS;
            let ok = match checked {
                Some((r, ok)) if r == rights => ok,
                _ => {
                    let acc = long.accumulate_fast(acc, 1, raw);
                    let ok = long.check(acc, raw, self.access, false).is_ok();
                    checked = Some((rights, ok));
                    ok
                }
            };
            if !ok {
                return;
            }
            seg.len += (self.end - va).min(PAGE);
        }
    }

    /// The contiguous piece starting at `va`: one walk, extended through
    /// its last-level table in the fast case.
    fn piece(&self, va: u64) -> Result<Piece, WalkFault> {
        // The fast case: a 64-bit guest, no second level.
        let fast = self
            .walker
            .x86_format()
            .and_then(X86Long::of)
            .filter(|_| !self.walker.has_second_level())
            .and_then(|long| {
                long.check_input(va).ok()?;
                let start = root_start(&long);
                let (w, _) = lean::walk_recorded(&long, self.mem, va, self.access, start)?;
                Some((long, w))
            });
        if let Some((long, w)) = fast {
            let size = 1u64 << w.shift;
            let gpa = w.base | (va & (size - 1));
            let mut seg = Piece {
                va,
                gpa,
                pa: gpa,
                len: (size - (va & (size - 1))).min(self.end - va),
            };
            if w.leaf_level == 1 {
                let (pt, acc) = w.tables[1];
                self.extend_in_table(&long, pt, acc, &mut seg);
            }
            return Ok(seg);
        }
        // Anything else (a fault ahead included: the full walk reports it).
        let t = self
            .walker
            .translate(self.mem, GuestVirtAddr(va), self.access)?;
        Ok(Piece {
            va,
            gpa: t.gpa.0,
            pa: t.pa.0,
            len: t.contiguous_bytes().min(self.end - va),
        })
    }
}

impl<M: PhysMemory + ?Sized> Iterator for RangeSegments<'_, M> {
    type Item = Result<Segment, WalkFault>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next >= self.end {
            return None;
        }
        let mut seg = match self.piece(self.next) {
            Ok(s) => s,
            Err(f) => {
                self.done = true;
                return Some(Err(f));
            }
        };
        // Join following pieces while they continue the segment physically
        // (a fault there ends the segment; the next call reports it).
        while seg.va + seg.len < self.end {
            match self.piece(seg.va + seg.len) {
                Ok(p) if p.pa == seg.pa + seg.len && p.gpa == seg.gpa + seg.len => seg.len += p.len,
                _ => break,
            }
        }
        self.next = seg.va + seg.len;
        Some(Ok(seg.segment()))
    }
}
