//! `/proc/self/pagemap`: one 64-bit entry per virtual page of this process,
//! saying whether it is present, swapped, file-backed, and its PFN (zero
//! when PFNs are hidden from an unprivileged process).

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::FileExt,
    },
    sync::OnceLock,
};

use crate::addr::{HostVirtAddr, PAGE_SIZE};

/// The page map's path, for error messages.
pub(crate) const PATH: &str = "/proc/self/pagemap";

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE: u64 = 1 << 61;
const PFN_MASK: u64 = (1 << 55) - 1;

/// One page-map entry (its bytes are the kernel's, little-endian like the
/// host).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub(crate) struct Entry(u64);

impl Entry {
    /// The page is in memory.
    #[inline]
    pub(crate) const fn is_present(self) -> bool {
        self.0 & PRESENT != 0
    }

    /// The page is swapped out.
    #[inline]
    pub(crate) const fn is_swapped(self) -> bool {
        self.0 & SWAPPED != 0
    }

    /// The page maps a file (a shmem/memfd page, or the page cache) rather
    /// than anonymous memory.
    #[inline]
    pub(crate) const fn is_file(self) -> bool {
        self.0 & FILE != 0
    }

    /// The page holds data somewhere: in memory or in swap.
    #[inline]
    pub(crate) const fn holds_data(self) -> bool {
        self.is_present() || self.is_swapped()
    }

    /// The page frame number; zero when the kernel hides PFNs.
    #[inline]
    pub(crate) const fn pfn(self) -> u64 {
        self.0 & PFN_MASK
    }
}

/// The process's page map, opened once.
#[derive(Debug)]
pub(crate) struct PageMap {
    file: File,
}

impl PageMap {
    /// Opens `/proc/self/pagemap`.
    pub(crate) fn open() -> io::Result<Self> {
        Ok(PageMap {
            file: File::open(PATH)?,
        })
    }

    /// Entries of the `out.len()` pages from `addr` (rounded down to its
    /// page), in one read.
    pub(crate) fn read(&self, addr: HostVirtAddr, out: &mut [Entry]) -> io::Result<()> {
        let vpn = addr.0 / PAGE_SIZE as u64;
        self.file
            .read_exact_at(bytemuck::cast_slice_mut(out), vpn * 8)
    }

    /// The entry of the page at `addr`.
    pub(crate) fn entry(&self, addr: HostVirtAddr) -> io::Result<Entry> {
        let mut e = [Entry::default()];
        self.read(addr, &mut e)?;
        Ok(e[0])
    }

    /// PFN of the kernel's shared zero page as this process sees it (found
    /// once per process by reading an untouched anonymous page), or `None`
    /// where PFNs are hidden or the kernel will not say.
    pub(crate) fn zero_page_pfn(&self) -> Option<u64> {
        static ZERO_PFN: OnceLock<Option<u64>> = OnceLock::new();
        *ZERO_PFN.get_or_init(|| {
            // SAFETY: a fresh private anonymous mapping of one page; nothing
            // else knows its address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGE_SIZE,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return None;
            }
            // SAFETY: `p` is a readable mapping of one page; a read maps the
            // kernel's zero page.
            let _ = unsafe { std::ptr::read_volatile(p.cast::<u8>()) };
            let e = self.entry(HostVirtAddr(p as u64));
            // SAFETY: unmapping the page mapped above, which nothing
            // references.
            unsafe { libc::munmap(p, PAGE_SIZE) };
            let e = e.ok()?;
            (e.is_present() && e.pfn() != 0).then_some(e.pfn())
        })
    }
}

impl AsRawFd for PageMap {
    /// The descriptor, for the `PAGEMAP_SCAN` ioctl.
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
