//! `PhysMemory`: the physical memory a walker reads tables from and updates
//! accessed/dirty flags in — [`GuestMemory`] for a running VMM, or
//! [`PhysImage`], a read-only byte image (a saved RAM file) for offline
//! tools.

use crate::{
    addr::GuestPhysAddr,
    memory::{AccessError, GuestMemory},
};

/// Physical memory as a walker sees it. Addresses are plain `u64`s of the
/// space the walker's output lives in (guest-physical for a VMM).
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
}

/// A read-only physical-memory image: `bytes` hold physical addresses
/// `base..base + len`. What `pagefold maps` reads a saved RAM file through;
/// accessed/dirty updates are refused (a walk that asks for them faults
/// with [`crate::paging::FaultReason::ReadOnlyTable`]).
#[derive(Clone, Copy, Debug)]
pub struct PhysImage<'a> {
    base: u64,
    bytes: &'a [u8],
}

impl<'a> PhysImage<'a> {
    /// An image of `bytes` starting at physical address `base`.
    pub fn new(base: u64, bytes: &'a [u8]) -> Self {
        PhysImage { base, bytes }
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
