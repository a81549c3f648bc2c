//! A pagefold region as vm-memory's `GuestMemoryRegion`: its bounds, its
//! host mapping as volatile slices carrying the region's dirty log, its
//! file and offset (what a vhost-user frontend sends a backend), and
//! `Bytes` at region offsets through pagefold's own accessors.

use std::{
    fs::File,
    sync::{atomic::Ordering, Arc},
};

use vm_memory::{
    bitmap::{Bitmap, BS},
    volatile_memory, AtomicAccess, Bytes, FileOffset, GuestAddress, GuestMemoryError,
    GuestMemoryRegion, GuestUsize, MemoryRegionAddress, ReadVolatile, VolatileSlice, WriteVolatile,
};

use crate::{
    addr::PageSize,
    memory::{AccessError, GuestRegion, RegionLog},
};

type Result<T> = std::result::Result<T, GuestMemoryError>;

impl GuestMemoryRegion for GuestRegion {
    type B = RegionLog;

    #[inline(always)]
    fn len(&self) -> GuestUsize {
        self.size()
    }

    #[inline(always)]
    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.start().0)
    }

    #[inline]
    fn bitmap(&self) -> BS<'_, RegionLog> {
        self.dirty_log().slice_at(0)
    }

    #[inline]
    fn get_host_address(&self, addr: MemoryRegionAddress) -> Result<*mut u8> {
        if addr.0 >= self.size() {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        Ok(self.ptr_at(addr.0))
    }

    fn file_offset(&self) -> Option<&FileOffset> {
        self.vmm_file
            .get_or_init(|| {
                // One duplicate of the store's descriptor per region, made
                // when a device first asks (a vhost-user frontend building
                // its memory table); `None` if the process is out of
                // descriptors, which the caller sees as "no file"; `None`
                // too for anonymous memory, which has no file to share.
                let file = self.store().file("a region's file offset").ok()?;
                let fd = file.try_clone_to_owned().ok()?;
                Some(FileOffset::from_arc(
                    Arc::new(File::from(fd)),
                    self.frames().start.file_offset(),
                ))
            })
            .as_ref()
    }

    #[inline(always)]
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, RegionLog>>> {
        let off = usize::try_from(offset.0).map_err(|_| out_of_bounds(usize::MAX))?;
        let end = off
            .checked_add(count)
            .ok_or(volatile_memory::Error::Overflow {
                base: off,
                offset: count,
            })?;
        if end as u64 > self.size() {
            return Err(out_of_bounds(end));
        }
        // `[off, off + count)` lies inside the region's mapping
        // (checked above), which lives as long as `self`, and so as long as
        // the slice borrowing it. Every other access to guest memory is
        // volatile or a raw copy (vCPUs, pagefold's accessors), never a
        // Rust reference, as `VolatileSlice` requires.
        // SAFETY: in bounds of a mapping that outlives the slice, and
        // only ever accessed volatile or raw (argued above).
        Ok(unsafe {
            VolatileSlice::with_bitmap(
                self.ptr_at(offset.0),
                count,
                self.dirty_log().slice_at(off),
                None,
            )
        })
    }

    fn is_hugetlbfs(&self) -> Option<bool> {
        Some(self.store().granule() != PageSize::Size4K)
    }
}

#[cold]
fn out_of_bounds(addr: usize) -> GuestMemoryError {
    volatile_memory::Error::OutOfBounds { addr }.into()
}

/// pagefold's refusal of a write (a page another layer holds read-only,
/// a frame the kernel would not give back) as vm-memory's error, its
/// message kept.
fn refused(e: AccessError) -> GuestMemoryError {
    GuestMemoryError::IOError(std::io::Error::other(e))
}

impl GuestRegion {
    /// Offset `addr` and how many of `len` bytes from it lie in the region;
    /// an error if `addr` is past the end. An empty access is `(addr, 0)`
    /// wherever it points, as vm-memory's own regions answer `Ok(0)` for it:
    /// callers do nothing for a zero count (no state change, no lookup past
    /// the page-state table's end).
    fn clip(&self, addr: MemoryRegionAddress, len: usize) -> Result<(u64, usize)> {
        if len == 0 {
            return Ok((addr.0, 0));
        }
        if addr.0 >= self.size() {
            return Err(out_of_bounds(usize::try_from(addr.0).unwrap_or(usize::MAX)));
        }
        let room = self.size() - addr.0;
        Ok((addr.0, usize::try_from(room).map_or(len, |r| r.min(len))))
    }

    /// `count`, if all `count` bytes at `addr` lie in the region; else
    /// vm-memory's `PartialBuffer` (nothing was transferred).
    fn whole(&self, addr: MemoryRegionAddress, count: usize) -> Result<usize> {
        let (_, n) = self.clip(addr, count)?;
        if n != count {
            return Err(GuestMemoryError::PartialBuffer {
                expected: count,
                completed: 0,
            });
        }
        Ok(n)
    }

    /// The slice of `n` bytes at `addr` (inside the region, as `clip`
    /// made it), its pages made writable first; `None` for `n == 0`,
    /// which changes nothing.
    fn writable_slice(
        &self,
        addr: MemoryRegionAddress,
        n: usize,
    ) -> Result<Option<VolatileSlice<'_, BS<'_, RegionLog>>>> {
        if n == 0 {
            return Ok(None);
        }
        self.prepare_write(addr.0, n as u64).map_err(refused)?;
        Ok(Some(self.get_slice(addr, n)?))
    }
}

/// At region offsets, through pagefold's accessors: a write brings its
/// pages to a writable state first (a merged page is copied back into its
/// own frame rather than left to the kernel's copy-on-write) and marks the
/// dirty log; a read of a released page reads its frame without making the
/// kernel allocate it. `read` and `write` stop at the region's end and
/// return the count, as vm-memory's own regions do.
impl Bytes<MemoryRegionAddress> for GuestRegion {
    type E = GuestMemoryError;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<usize> {
        let (off, n) = self.clip(addr, buf.len())?;
        if n != 0 {
            self.write_at(off, &buf[..n]).map_err(refused)?;
        }
        Ok(n)
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<usize> {
        let (off, n) = self.clip(addr, buf.len())?;
        if n != 0 {
            self.read_at(off, &mut buf[..n]);
        }
        Ok(n)
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> Result<()> {
        let n = self.write(buf, addr)?;
        if n != buf.len() {
            return Err(GuestMemoryError::PartialBuffer {
                expected: buf.len(),
                completed: n,
            });
        }
        Ok(())
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> Result<()> {
        let n = self.read(buf, addr)?;
        if n != buf.len() {
            return Err(GuestMemoryError::PartialBuffer {
                expected: buf.len(),
                completed: n,
            });
        }
        Ok(())
    }

    fn read_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<usize> {
        let (_, n) = self.clip(addr, count)?;
        match self.writable_slice(addr, n)? {
            Some(slice) => Ok(slice.read_volatile_from(0, src, n)?),
            None => Ok(0),
        }
    }

    fn read_exact_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> Result<()> {
        let n = self.whole(addr, count)?;
        match self.writable_slice(addr, n)? {
            Some(slice) => Ok(slice.read_exact_volatile_from(0, src, n)?),
            None => Ok(()),
        }
    }

    fn write_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<usize> {
        let (_, n) = self.clip(addr, count)?;
        if n == 0 {
            return Ok(0);
        }
        Ok(self.get_slice(addr, n)?.write_volatile_to(0, dst, n)?)
    }

    fn write_all_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> Result<()> {
        let n = self.whole(addr, count)?;
        if n == 0 {
            return Ok(());
        }
        Ok(self.get_slice(addr, n)?.write_all_volatile_to(0, dst, n)?)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> Result<()> {
        let (off, n) = self.clip(addr, std::mem::size_of::<T>())?;
        self.prepare_write(off, n as u64).map_err(refused)?;
        Ok(self.get_slice(addr, n)?.store(val, 0, order)?)
    }

    fn load<T: AtomicAccess>(&self, addr: MemoryRegionAddress, order: Ordering) -> Result<T> {
        let (_, n) = self.clip(addr, std::mem::size_of::<T>())?;
        Ok(self.get_slice(addr, n)?.load(0, order)?)
    }
}
