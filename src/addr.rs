//! Address newtypes, one per address space, and the page sizes x86 and
//! friends map with. A bare `u64` that could be any of these is a bug waiting;
//! conversions between spaces only happen through the layer that owns them
//! (`memory` for guest-physical to host, `paging` for guest-virtual).

use std::fmt;

/// Bytes in a base (4 KiB) page; every page-state word describes one of these.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw address.
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + offset`, or `None` if it would wrap past `u64::MAX`.
            #[inline]
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// `self - base` as a byte offset, or `None` if `base > self`.
            #[inline]
            pub const fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// Rounds down to a multiple of `size`.
            #[inline]
            pub const fn align_down(self, size: PageSize) -> Self {
                Self(self.0 & !(size.bytes() - 1))
            }

            /// Whether the address is a multiple of `size`.
            #[inline]
            pub const fn is_aligned(self, size: PageSize) -> bool {
                self.0 & (size.bytes() - 1) == 0
            }

            /// Offset within the enclosing page of `size`.
            #[inline]
            pub const fn page_offset(self, size: PageSize) -> u64 {
                self.0 & (size.bytes() - 1)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// A guest-physical address: what the guest's page tables and DMA use,
    /// and what KVM memory slots are keyed by.
    GuestPhysAddr,
    "GuestPhysAddr"
);
address_type!(
    /// A guest-virtual (linear) address, translated by the guest's page tables.
    GuestVirtAddr,
    "GuestVirtAddr"
);
address_type!(
    /// A host-virtual address in this process: where a guest page is mapped.
    HostVirtAddr,
    "HostVirtAddr"
);

/// The all-zero page, to compare against.
pub(crate) static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Whether a page-sized buffer is all zeros (compared as a whole, which the
/// compiler turns into a vectorised `memcmp`, not a byte loop).
#[inline]
pub fn is_zero_page(page: &[u8; PAGE_SIZE]) -> bool {
    page == &ZERO_PAGE
}

/// Converts a `u64` that indexes host memory to `usize`. Lossless: pagefold
/// builds only for 64-bit hosts (see the `compile_error!` in `lib.rs`).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn usize_from(x: u64) -> usize {
    x as usize
}

/// A guest frame number: a guest-physical address shifted right by
/// [`PAGE_SHIFT`]. Balloon queues and dirty bitmaps speak in these.
///
/// `#[repr(transparent)]` over `u64` and [`bytemuck::Pod`], so a guest's
/// raw PFN array can be viewed as frames in place
/// ([`GuestFrame::from_raw_slice`]).
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Debug,
    bytemuck::Pod,
    bytemuck::Zeroable,
)]
#[repr(transparent)]
pub struct GuestFrame(pub u64);

impl GuestFrame {
    /// The frame holding `addr`.
    #[inline]
    pub const fn containing(addr: GuestPhysAddr) -> Self {
        Self(addr.0 >> PAGE_SHIFT)
    }

    /// The first address of the frame, or `None` if it does not fit in 64 bits.
    #[inline]
    pub const fn start(self) -> Option<GuestPhysAddr> {
        if self.0 > (u64::MAX >> PAGE_SHIFT) {
            None
        } else {
            Some(GuestPhysAddr(self.0 << PAGE_SHIFT))
        }
    }
}

// Added for the balloon, dirty and migration doors (issue 14).
impl GuestFrame {
    /// The raw frame number.
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Views a slice of raw frame numbers (a virtio queue's `u64` PFN
    /// array, a C caller's `uint64_t *`) as frames, without copying.
    #[inline]
    pub fn from_raw_slice(pfns: &[u64]) -> &[GuestFrame] {
        bytemuck::cast_slice(pfns)
    }

    /// `self + frames`, or `None` if it would wrap past `u64::MAX`.
    #[inline]
    pub const fn checked_add(self, frames: u64) -> Option<Self> {
        match self.0.checked_add(frames) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }

    /// Frames from `base` to `self`, or `None` if `base > self`.
    #[inline]
    pub const fn offset_from(self, base: Self) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// The first address of a frame known to hold one (it came from a
    /// [`GuestPhysAddr`], a region or a checked layout): the shift drops
    /// the top bits of a frame past `u64::MAX >> PAGE_SHIFT`, so a frame
    /// from untrusted input goes through [`start`](Self::start) instead.
    #[inline]
    pub const fn addr(self) -> GuestPhysAddr {
        GuestPhysAddr(self.0 << PAGE_SHIFT)
    }
}

impl fmt::Display for GuestFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for GuestFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl GuestPhysAddr {
    /// The guest frame holding this address (as [`GuestFrame::containing`]).
    #[inline]
    pub const fn frame(self) -> GuestFrame {
        GuestFrame::containing(self)
    }
}

/// A host frame of a [`FrameStore`](crate::frames::FrameStore): the index of
/// a 4 KiB page in the store's memfd, so the file offset is `index * 4096`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
#[repr(transparent)]
pub struct FrameNumber(pub u64);

impl FrameNumber {
    /// Byte offset of the frame in the store's file.
    #[inline]
    pub const fn file_offset(self) -> u64 {
        self.0 << PAGE_SHIFT
    }
}

/// The page sizes x86-64 (and AArch64 with a 4 KiB granule) map with.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum PageSize {
    /// 4 KiB.
    Size4K,
    /// 2 MiB.
    Size2M,
    /// 1 GiB.
    Size1G,
}

impl PageSize {
    /// Size in bytes.
    #[inline]
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// log2 of the size.
    #[inline]
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// Number of 4 KiB pages in one page of this size.
    #[inline]
    pub const fn base_pages(self) -> u64 {
        self.bytes() >> PAGE_SHIFT
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size1G => "1G",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers_agree_with_arithmetic() {
        let a = GuestPhysAddr(0x20_1234);
        assert_eq!(a.align_down(PageSize::Size4K), GuestPhysAddr(0x20_1000));
        assert_eq!(a.align_down(PageSize::Size2M), GuestPhysAddr(0x20_0000));
        assert_eq!(a.page_offset(PageSize::Size4K), 0x234);
        assert!(!a.is_aligned(PageSize::Size4K));
        assert!(GuestPhysAddr(0x4000_0000).is_aligned(PageSize::Size1G));
    }

    #[test]
    fn overflow_is_reported_not_wrapped() {
        assert_eq!(GuestPhysAddr(u64::MAX).checked_add(1), None);
        assert_eq!(GuestPhysAddr(1).offset_from(GuestPhysAddr(2)), None);
        assert_eq!(GuestFrame(u64::MAX).start(), None);
        assert_eq!(
            GuestFrame::containing(GuestPhysAddr(0x5fff)).start(),
            Some(GuestPhysAddr(0x5000))
        );
    }

    #[test]
    fn page_sizes_are_consistent() {
        for s in [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G] {
            assert_eq!(1u64 << s.shift(), s.bytes());
            assert_eq!(s.base_pages() * 4096, s.bytes());
        }
    }
}
