//! `PhysMemory`: the physical memory a walker reads tables from and updates
//! accessed/dirty flags in — [`GuestMemory`] for a running VMM, or
//! [`PhysImage`], a read-only byte image (a saved RAM file) for offline
//! tools.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{
    addr::{self, GuestPhysAddr},
    memory::{AccessError, GuestMemory},
};

/// Physical memory as a walker sees it. Addresses are plain `u64`s of the
/// space the walker's output lives in (guest-physical for a VMM): every
/// entry of every walk is read through here, in the walk's inner loop; the
/// walker's public doors take and give `GuestPhysAddr`.
///
/// Entries are naturally aligned (a table is page aligned and an entry is 4
/// or 8 bytes), so implementations read and exchange them atomically: a
/// vCPU may edit its page tables while the walker runs.
pub trait PhysMemory {
    /// The aligned 8-byte entry at `pa`, or `None` where no memory backs it.
    fn read_u64(&self, pa: u64) -> Option<u64>;
    /// The aligned 4-byte entry at `pa`, or `None` where no memory backs it.
    fn read_u32(&self, pa: u64) -> Option<u32>;
    /// Compare-and-exchange of an 8-byte entry: `None` when it cannot be
    /// written (no memory, or read-only memory), `Some(Err(found))` when the
    /// entry no longer held `old`.
    fn compare_exchange_u64(&self, pa: u64, old: u64, new: u64) -> Option<Result<(), u64>>;
    /// Compare-and-exchange of a 4-byte entry, as for 8 bytes.
    fn compare_exchange_u32(&self, pa: u64, old: u32, new: u32) -> Option<Result<(), u32>>;
    /// Reads `buf.len()` bytes at `pa` (within one page); `Err` holds the
    /// first address not backed.
    fn read_bytes(&self, pa: u64, buf: &mut [u8]) -> Result<(), u64>;
    /// Writes `data` at `pa` (within one page); `Err` holds the first
    /// address that cannot be written.
    fn write_bytes(&self, pa: u64, data: &[u8]) -> Result<(), u64>;

    /// Internal to pagefold (its type cannot be named outside the crate):
    /// a run of this memory around `pa` that a walk may load entries from
    /// directly. Empty unless the memory says otherwise; everything else is
    /// read through [`PhysMemory::read_u64`].
    #[doc(hidden)]
    #[inline(always)]
    fn entry_window(&self, pa: u64) -> EntryWindow<'_> {
        let _ = pa;
        EntryWindow::empty()
    }
}

/// A run of physical memory whose 8-byte entries a walk may load straight
/// from the host mapping: `[start, start + size)` at host address `base`,
/// while `checks` reads false (a region some of whose pages may read as
/// zeros sets it for good; reads then go through
/// [`PhysMemory::read_u64`], which consults the page states). Obtained from
/// [`PhysMemory::entry_window`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct EntryWindow<'a> {
    start: u64,
    size: u64,
    /// Where physical address 0 would be: `base - start`, so that an
    /// entry's host address is one add away from its physical address (no
    /// subtraction on a walk's chain of dependent loads). Only ever
    /// dereferenced at `origin + pa` with `pa` inside the window.
    origin: *const u8,
    checks: &'a AtomicBool,
}

/// The `checks` flag of an empty window (never read: nothing is inside).
static NO_CHECKS: AtomicBool = AtomicBool::new(false);

impl<'a> EntryWindow<'a> {
    /// A window with nothing inside.
    #[inline(always)]
    pub(crate) fn empty() -> EntryWindow<'static> {
        EntryWindow {
            start: 0,
            size: 0,
            origin: std::ptr::null(),
            checks: &NO_CHECKS,
        }
    }

    /// The window of physical `[start, start + size)` at `base`.
    ///
    /// # Safety
    /// `start`, `size` and `base` are multiples of 8, and `base` is valid
    /// for atomic reads of `size` bytes for `'a` whenever `checks` reads
    /// false.
    #[inline(always)]
    pub(crate) unsafe fn new(
        start: u64,
        size: u64,
        base: *const u8,
        checks: &'a AtomicBool,
    ) -> Self {
        EntryWindow {
            start,
            size,
            origin: base.wrapping_sub(addr::usize_from(start)),
            checks,
        }
    }

    /// Whether the window holds anything and its pages need no state
    /// check now.
    #[inline(always)]
    pub(crate) fn is_open(&self) -> bool {
        self.size != 0 && !self.checks.load(Ordering::Acquire)
    }

    /// The aligned 8-byte entry at `pa`, if it lies inside the window and
    /// the window is still open; else `None` (the entry may still be
    /// readable through [`PhysMemory::read_u64`]).
    #[inline(always)]
    pub(crate) fn read_u64(&self, pa: u64) -> Option<u64> {
        let off = pa.wrapping_sub(self.start);
        if off >= self.size || pa % 8 != 0 || self.checks.load(Ordering::Acquire) {
            return None;
        }
        let at = self.origin.wrapping_add(addr::usize_from(pa)) as *mut u64;
        // `off` is 8-aligned (`pa` is, and so is `start` by `new`'s contract)
        // and below `size`, a multiple of 8 by that contract, so the 8 bytes
        // at `origin + pa` = `base + off` lie inside the window, aligned.
        // SAFETY: `at` is in the window and aligned (above); `checks` read
        // false, so `new`'s contract makes the atomic load valid.
        let entry = unsafe { AtomicU64::from_ptr(at) };
        Some(entry.load(Ordering::Acquire))
    }
}

fn failed_at(e: &AccessError, fallback: u64) -> u64 {
    match e {
        AccessError::Unmapped { addr } => addr.0,
        _ => fallback,
    }
}

impl PhysMemory for GuestMemory {
    #[inline(always)]
    fn read_u64(&self, pa: u64) -> Option<u64> {
        self.load_entry::<u64>(GuestPhysAddr(pa))
    }

    #[inline(always)]
    fn read_u32(&self, pa: u64) -> Option<u32> {
        self.load_entry::<u32>(GuestPhysAddr(pa))
    }

    fn compare_exchange_u64(&self, pa: u64, old: u64, new: u64) -> Option<Result<(), u64>> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        self.compare_exchange_quiet(GuestPhysAddr(pa), old, new, AcqRel, Acquire)
            .ok()
            .map(|r| r.map(drop))
    }

    fn compare_exchange_u32(&self, pa: u64, old: u32, new: u32) -> Option<Result<(), u32>> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        self.compare_exchange_quiet(GuestPhysAddr(pa), old, new, AcqRel, Acquire)
            .ok()
            .map(|r| r.map(drop))
    }

    fn read_bytes(&self, pa: u64, buf: &mut [u8]) -> Result<(), u64> {
        self.read(GuestPhysAddr(pa), buf)
            .map_err(|e| failed_at(&e, pa))
    }

    fn write_bytes(&self, pa: u64, data: &[u8]) -> Result<(), u64> {
        self.write(GuestPhysAddr(pa), data)
            .map_err(|e| failed_at(&e, pa))
    }

    /// The walker's direct view of the region holding `pa`: a walk then
    /// bounds-checks each entry against values it holds in registers
    /// instead of looking the region up.
    #[inline(always)]
    fn entry_window(&self, pa: u64) -> EntryWindow<'_> {
        let Some(r) = self.window_region(pa) else {
            return EntryWindow::empty();
        };
        // The flag is the one `load_entry` reads before it loads through
        // the mapping.
        // SAFETY: the region maps its `size()` bytes from `ptr_at(0)` for
        // as long as `self` is borrowed (the lifetime the window gets).
        unsafe { EntryWindow::new(r.start().0, r.size(), r.ptr_at(0), r.state_checks_flag()) }
    }
}

impl<M: PhysMemory + ?Sized> PhysMemory for &M {
    #[inline]
    fn read_u64(&self, pa: u64) -> Option<u64> {
        (**self).read_u64(pa)
    }
    #[inline]
    fn read_u32(&self, pa: u64) -> Option<u32> {
        (**self).read_u32(pa)
    }
    fn compare_exchange_u64(&self, pa: u64, old: u64, new: u64) -> Option<Result<(), u64>> {
        (**self).compare_exchange_u64(pa, old, new)
    }
    fn compare_exchange_u32(&self, pa: u64, old: u32, new: u32) -> Option<Result<(), u32>> {
        (**self).compare_exchange_u32(pa, old, new)
    }
    fn read_bytes(&self, pa: u64, buf: &mut [u8]) -> Result<(), u64> {
        (**self).read_bytes(pa, buf)
    }
    fn write_bytes(&self, pa: u64, data: &[u8]) -> Result<(), u64> {
        (**self).write_bytes(pa, data)
    }
    #[inline(always)]
    fn entry_window(&self, pa: u64) -> EntryWindow<'_> {
        (**self).entry_window(pa)
    }
}

/// A read-only physical-memory image: `bytes` hold physical addresses
/// `base..base + len`. What `pagefold maps` reads a saved RAM file through;
/// accessed/dirty updates are refused (a walk that asks for them faults
/// with `FaultReason::ReadOnlyTable`).
#[derive(Clone, Copy, Debug)]
pub struct PhysImage<'a> {
    base: u64,
    bytes: &'a [u8],
}

impl<'a> PhysImage<'a> {
    /// An image of `bytes` starting at guest-physical address `base`.
    pub fn new(base: GuestPhysAddr, bytes: &'a [u8]) -> Self {
        PhysImage {
            base: base.0,
            bytes,
        }
    }

    /// The byte range for `[pa, pa+len)`, if it lies inside the image.
    #[inline]
    fn range(&self, pa: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let off = usize::try_from(pa.checked_sub(self.base)?).ok()?;
        let end = off.checked_add(len)?;
        (end <= self.bytes.len()).then_some(off..end)
    }
}

impl PhysMemory for PhysImage<'_> {
    #[inline]
    fn read_u64(&self, pa: u64) -> Option<u64> {
        let r = self.range(pa, 8)?;
        Some(u64::from_le_bytes(self.bytes[r].try_into().ok()?))
    }

    #[inline]
    fn read_u32(&self, pa: u64) -> Option<u32> {
        let r = self.range(pa, 4)?;
        Some(u32::from_le_bytes(self.bytes[r].try_into().ok()?))
    }

    fn compare_exchange_u64(&self, _: u64, _: u64, _: u64) -> Option<Result<(), u64>> {
        None
    }

    fn compare_exchange_u32(&self, _: u64, _: u32, _: u32) -> Option<Result<(), u32>> {
        None
    }

    fn read_bytes(&self, pa: u64, buf: &mut [u8]) -> Result<(), u64> {
        match self.range(pa, buf.len()) {
            Some(r) => {
                buf.copy_from_slice(&self.bytes[r]);
                Ok(())
            }
            None => Err(pa.max(self.base.saturating_add(self.bytes.len() as u64))),
        }
    }

    fn write_bytes(&self, pa: u64, _: &[u8]) -> Result<(), u64> {
        Err(pa)
    }
}
