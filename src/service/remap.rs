//! What a process under the service does to its own address space when the
//! service asks: remap runs of guest pages onto the domain's shared frames
//! or zeros, bring them home to their own frames (with or without copying
//! this process's bytes there first), and, without a service, bring every
//! merged page home by itself. Nothing the service says can make it map
//! over anything but its own guest memory (`span` checks every run).
//!
//! In break-on-write mode (memory shared with other processes) merged
//! pages stay write-protected, and every remap puts the new mapping in
//! place already protected: it is built at a scratch address, registered
//! and protected there, then moved over the old one with `mremap`, which
//! keeps both (`UFFD_FEATURE_EVENT_REMAP`). A plain `mmap(MAP_FIXED)` would
//! leave a moment where a write to the new private mapping is copied into
//! this process alone.

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    sync::{atomic::AtomicBool, Arc, Mutex},
};

use super::{
    control::ControlPage,
    wire::{run_span, AckStatus, PageRun, RemapRun, RemapTo},
};
use crate::{
    addr::{HostVirtAddr, PAGE_SIZE},
    frames::FramePageLock,
    memory::GuestMemory,
    userfault::Userfault,
};

/// One region as this process maps it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    pub(crate) host_addr: HostVirtAddr,
    pub(crate) pages: usize,
    /// Byte offset of its first frame in the guest memfd.
    pub(crate) own_offset: u64,
}

/// This process's guest memory as the service's requests see it.
pub(crate) struct AddressSpace {
    /// The VMM's memory (kept alive while attached); `None` in a second
    /// mapper, which mapped the memfd itself.
    pub(crate) mem: Option<Arc<GuestMemory>>,
    /// The guest memfd, opened anew by this process (its own open file
    /// description, so the page locks of `copy_home` exclude each other
    /// between processes that received the same descriptor).
    pub(crate) memfd: OwnedFd,
    pub(crate) uffd: Userfault,
    pub(crate) control: ControlPage,
    pub(crate) regions: Vec<Region>,
    /// The domain's shared frames, read-only.
    pub(crate) shared_fd: OwnedFd,
    /// Per region, which pages map something other than their own frame.
    pub(crate) remapped: Mutex<Vec<Vec<bool>>>,
    pub(crate) connected: AtomicBool,
    pub(crate) break_on_write: bool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The bitmaps are consistent between statements.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl AddressSpace {
    /// The host address and length of `pages` from `first` in `region`, if
    /// they lie inside it.
    pub(crate) fn span(
        &self,
        region: usize,
        first: u64,
        pages: u64,
    ) -> Option<(HostVirtAddr, usize)> {
        let r = self.regions.get(region)?;
        run_span(r.host_addr, r.pages, first, pages)
    }

    /// The region and page of host address `addr`, if it is guest memory.
    pub(crate) fn page_of(&self, addr: HostVirtAddr) -> Option<(u32, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let page = addr.0.checked_sub(r.host_addr.0)? / PAGE_SIZE as u64;
            if page < r.pages as u64 {
                Some((u32::try_from(i).ok()?, page))
            } else {
                None
            }
        })
    }

    /// Maps `len` bytes at `addr` anew (`flags`, `fd`, `offset` as for
    /// `mmap`) and registers the mapping for write protection; in
    /// break-on-write mode the new mapping is protected before it takes
    /// the old one's place.
    fn map_over(
        &self,
        addr: HostVirtAddr,
        len: usize,
        flags: libc::c_int,
        fd: RawFd,
        offset: u64,
    ) -> Result<(), i32> {
        let offset = libc::off_t::try_from(offset).map_err(|_| libc::EINVAL)?;
        if !self.break_on_write {
            // `addr..addr+len` lies inside this process's guest memory
            // (checked by `span`), which its owner's mapping covers; MAP_FIXED
            // replaces only those pages, and no Rust reference into them
            // exists.
            // SAFETY: as argued above; `fd` is a live descriptor or -1.
            let p = unsafe {
                libc::mmap(
                    addr.0 as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    fd,
                    offset,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(errno());
            }
            return self.uffd.register(addr, len as u64).map_err(|_| libc::EIO);
        }
        // SAFETY: a new mapping at an address the kernel picks; nothing is
        // replaced; `fd` is a live descriptor or -1.
        let scratch = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_NORESERVE,
                fd,
                offset,
            )
        };
        if scratch == libc::MAP_FAILED {
            return Err(errno());
        }
        let at = HostVirtAddr(scratch as u64);
        let armed = self
            .uffd
            .register(at, len as u64)
            .and_then(|()| self.uffd.protect(at, len as u64));
        if armed.is_err() {
            // SAFETY: the scratch mapping made above, unmapped once.
            unsafe { libc::munmap(scratch, len) };
            return Err(libc::EIO);
        }
        // Moves the protected mapping over `addr..addr+len`, which lies in
        // this process's guest memory (checked by `span`), replacing just
        // those pages in one step.
        // SAFETY: as argued above; the scratch range is ours.
        let p = unsafe {
            libc::mremap(
                scratch,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                addr.0 as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            let e = errno();
            // SAFETY: the scratch mapping is still there after a failed move.
            unsafe { libc::munmap(scratch, len) };
            return Err(e);
        }
        Ok(())
    }

    fn mark(&self, region: usize, first: u64, pages: u64, remapped: bool) {
        if let Some(r) = lock(&self.remapped).get_mut(region) {
            let (Ok(first), Ok(pages)) = (usize::try_from(first), usize::try_from(pages)) else {
                return;
            };
            if let Some(s) = first
                .checked_add(pages)
                .and_then(|end| r.get_mut(first..end))
            {
                s.iter_mut().for_each(|m| *m = remapped);
            }
        }
    }

    /// Applies a remap: each run onto the shared frames or zeros. Out of
    /// kernel mappings (`ENOMEM`), it brings the runs it did back home
    /// first, so the service hears that none was done.
    pub(crate) fn remap(&self, region: u32, runs: &[RemapRun]) -> Result<AckStatus, i32> {
        match self.remap_runs(region, runs) {
            Err((done, libc::ENOMEM)) => {
                let home: Vec<PageRun> = runs[..done]
                    .iter()
                    .map(|r| PageRun {
                        first_page: r.first_page,
                        pages: r.pages,
                    })
                    .collect();
                // Their own frames are not punched yet and hold the same
                // bytes; failing that, the service hears another error and
                // takes the VM out of merging.
                self.home(region, &home, false).map_err(|_| libc::EIO)?;
                Err(libc::ENOMEM)
            }
            Err((_, e)) => Err(e),
            Ok(()) => Ok(AckStatus::Done),
        }
    }

    /// Remaps `runs` in order; on failure, how many were done and why.
    fn remap_runs(&self, region: u32, runs: &[RemapRun]) -> Result<(), (usize, i32)> {
        let region = region as usize;
        for (done, run) in runs.iter().enumerate() {
            self.remap_run(region, run).map_err(|e| (done, e))?;
        }
        Ok(())
    }

    fn remap_run(&self, region: usize, run: &RemapRun) -> Result<(), i32> {
        {
            let (addr, len) = self
                .span(region, run.first_page, run.pages)
                .ok_or(libc::EINVAL)?;
            match run.target {
                RemapTo::Shared { file_offset } => self.map_over(
                    addr,
                    len,
                    libc::MAP_PRIVATE,
                    self.shared_fd.as_raw_fd(),
                    file_offset,
                )?,
                RemapTo::Zero => {
                    self.map_over(addr, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)?
                }
            }
            self.mark(region, run.first_page, run.pages, true);
        }
        Ok(())
    }

    /// Maps each run shared at its own frames again; with `copy`, this
    /// process's bytes of the pages (its kernel copies included) are
    /// written there first. The service holds the pages' writers meanwhile.
    pub(crate) fn home(&self, region: u32, runs: &[PageRun], copy: bool) -> Result<(), i32> {
        let region = region as usize;
        for run in runs {
            let (addr, len) = self
                .span(region, run.first_page, run.pages)
                .ok_or(libc::EINVAL)?;
            let own = self.regions[region].own_offset + run.first_page * PAGE_SIZE as u64;
            if copy {
                self.copy_home(addr, len, own, false)?;
            }
            self.map_over(addr, len, libc::MAP_SHARED, self.memfd.as_raw_fd(), own)?;
            self.mark(region, run.first_page, run.pages, false);
        }
        Ok(())
    }

    /// Writes the bytes mapped at `addr..addr+len` into the guest memfd at
    /// `own`, a page at a time. With `only_holes` (several processes may do
    /// this at once), a page is written only where the memfd holds no data
    /// yet, under an open-file-description lock on it, so the first writer
    /// wins and no later copy overwrites a guest write made since.
    /// Otherwise an all-zero page is punched instead of written.
    fn copy_home(
        &self,
        addr: HostVirtAddr,
        len: usize,
        own: u64,
        only_holes: bool,
    ) -> Result<(), i32> {
        let fd = self.memfd.as_raw_fd();
        let mut page = [0u8; PAGE_SIZE];
        for k in 0..len / PAGE_SIZE {
            let at = usize::try_from(addr.0).map_err(|_| libc::EINVAL)? + k * PAGE_SIZE;
            let off =
                libc::off_t::try_from(own + (k * PAGE_SIZE) as u64).map_err(|_| libc::EINVAL)?;
            let _lock = if only_holes {
                let l = FramePageLock::take(self.memfd.as_fd(), own + (k * PAGE_SIZE) as u64)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                if l.holds_data() {
                    continue;
                }
                Some(l)
            } else {
                None
            };
            // The page lies inside this process's guest memory (checked by
            // the caller), which stays mapped for the call; writers wait on
            // write protection, and the copy forms no reference into guest
            // memory.
            // SAFETY: as argued above.
            unsafe { crate::memory::copy::copy_from_guest(at as *const u8, &mut page) };
            let rc = if !only_holes && page.iter().all(|b| *b == 0) {
                // SAFETY: plain syscall on the guest memfd.
                unsafe {
                    libc::fallocate(
                        fd,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        PAGE_SIZE as libc::off_t,
                    )
                }
            } else {
                // SAFETY: `page` is valid for PAGE_SIZE bytes of reads.
                let n = unsafe { libc::pwrite(fd, page.as_ptr().cast(), PAGE_SIZE, off) };
                if n == PAGE_SIZE as isize {
                    0
                } else {
                    -1
                }
            };
            if rc != 0 {
                return Err(errno());
            }
        }
        Ok(())
    }

    /// With no service left to release them, disarms every write
    /// protection in this process's guest memory and wakes whoever waits.
    pub(crate) fn release_everything(&self) {
        for r in &self.regions {
            let len = (r.pages * PAGE_SIZE) as u64;
            let _ = self.uffd.unprotect(r.host_addr, len, true);
            let _ = self.uffd.wake(r.host_addr, len);
        }
    }

    /// Without a service: brings every page this process maps away from
    /// its own frame home, under its own write protection, so the memfd
    /// holds the guest's bytes again. In break-on-write mode several
    /// processes do this at once, and only holes are filled (see
    /// `copy_home`); otherwise this process holds the only copy of pages the
    /// kernel copied, and writes every page.
    pub(crate) fn home_everything(&self) -> Result<(), i32> {
        let runs: Vec<(usize, u64, u64)> = {
            let remapped = lock(&self.remapped);
            let mut v = Vec::new();
            for (ri, r) in remapped.iter().enumerate() {
                let mut p = 0;
                while p < r.len() {
                    if r[p] {
                        let s = p;
                        while p < r.len() && r[p] {
                            p += 1;
                        }
                        v.push((ri, s as u64, (p - s) as u64));
                    } else {
                        p += 1;
                    }
                }
            }
            v
        };
        let mut result = Ok(());
        for (region, first, pages) in runs {
            let Some((addr, len)) = self.span(region, first, pages) else {
                continue;
            };
            let own = self.regions[region].own_offset + first * PAGE_SIZE as u64;
            let r = self
                .uffd
                .protect(addr, len as u64)
                .map_err(|_| libc::EIO)
                .and_then(|()| self.copy_home(addr, len, own, self.break_on_write))
                .and_then(|()| {
                    self.map_over(addr, len, libc::MAP_SHARED, self.memfd.as_raw_fd(), own)
                });
            if r.is_ok() {
                self.mark(region, first, pages, false);
            }
            let _ = self.uffd.unprotect(addr, len as u64, true);
            let _ = self.uffd.wake(addr, len as u64);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}
