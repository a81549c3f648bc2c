//! Errors of guest memory: a bad region layout, or an access that does not
//! fit the memory. Each names the offending address or region so a VMM can
//! report it to the operator or inject a fault into the guest.

use crate::{
    addr::{GuestPhysAddr, HostVirtAddr},
    frames::FrameError,
};

/// A region list that cannot become guest memory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The list is empty.
    #[error("guest memory needs at least one region")]
    NoRegions,
    /// A region of size zero.
    #[error("region {index} at {start} has size zero")]
    ZeroSize {
        /// Position in the list given.
        index: usize,
        /// Its start.
        start: GuestPhysAddr,
    },
    /// Start or size not a multiple of the backing's page size.
    #[error("region {index} ({start}, size {size:#x}) is not aligned to {align:#x} bytes")]
    Misaligned {
        /// Position in the list given.
        index: usize,
        /// Its start.
        start: GuestPhysAddr,
        /// Its size.
        size: u64,
        /// Required alignment of start and size.
        align: u64,
    },
    /// `start + size` wraps past the top of the 64-bit address space.
    #[error("region {index} ({start}, size {size:#x}) runs past the end of the address space")]
    AddressOverflow {
        /// Position in the list given.
        index: usize,
        /// Its start.
        start: GuestPhysAddr,
        /// Its size.
        size: u64,
    },
    /// Two regions share addresses.
    #[error("regions {first} and {second} overlap at {at}")]
    Overlap {
        /// Position of the lower region in the list given.
        first: usize,
        /// Position of the other one.
        second: usize,
        /// First shared address.
        at: GuestPhysAddr,
    },
    /// A region given to [`GuestMemory::from_regions`](super::GuestMemory::from_regions)
    /// or [`insert_region`](super::GuestMemory::insert_region) has its frames
    /// in another frame store than the others.
    #[error("region {index} at {start} is in another frame store than the memory's other regions")]
    OtherStore {
        /// Position in the list given.
        index: usize,
        /// Its start.
        start: GuestPhysAddr,
    },
    /// [`GuestMemory::remove_region`](super::GuestMemory::remove_region)
    /// found no region with that start and size.
    #[error("no region starts at {start} with size {size:#x}")]
    NoSuchRegion {
        /// The start asked for.
        start: GuestPhysAddr,
        /// The size asked for.
        size: u64,
    },
    /// A region's file offset is not a multiple of the file's page size.
    #[error("region {index}: file offset {file_offset:#x} is not aligned to the file's {align:#x}-byte pages")]
    FileMisaligned {
        /// Position in the list given.
        index: usize,
        /// Its file offset.
        file_offset: u64,
        /// The file's page size.
        align: u64,
    },
    /// A region's bytes run past the end of the VMM's file.
    #[error("region {index}: file bytes {file_offset:#x}+{size:#x} run past the end of the file ({file_size:#x} bytes)")]
    FileTooSmall {
        /// Position in the list given.
        index: usize,
        /// Its file offset.
        file_offset: u64,
        /// Its size.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// Two regions name the same bytes of the VMM's file.
    #[error("regions {first} and {second} share the file's bytes at offset {file_offset:#x}")]
    FileOverlap {
        /// Position of the region lower in the file.
        first: usize,
        /// Position of the other one.
        second: usize,
        /// First shared file offset.
        file_offset: u64,
    },
    /// A region's host address is not a multiple of the memory's page size.
    #[error("region {index}: host address {host_addr} is not aligned to {align:#x} bytes")]
    HostMisaligned {
        /// Position in the list given.
        index: usize,
        /// Its host address.
        host_addr: HostVirtAddr,
        /// Required alignment.
        align: u64,
    },
    /// Two regions name the same host addresses.
    #[error("regions {first} and {second} share host addresses from {host_addr}")]
    HostOverlap {
        /// Position of the lower region in the list given.
        first: usize,
        /// Position of the other one.
        second: usize,
        /// First shared host address.
        host_addr: HostVirtAddr,
    },
    /// The VMM's mapping of a region is not what it was said to be
    /// (checked against `/proc/self/maps`).
    #[error("region {index} at host address {host_addr}: {what}")]
    BadMapping {
        /// Position in the list given.
        index: usize,
        /// Its host address.
        host_addr: HostVirtAddr,
        /// What does not hold.
        what: &'static str,
    },
    /// Removing the region would leave the memory with none.
    #[error("the region at {start} is the memory's last one")]
    LastRegion {
        /// Its start.
        start: GuestPhysAddr,
    },
}

/// Why guest memory could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The region list is invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The host could not provide the frames or mappings.
    #[error(transparent)]
    Frames(#[from] FrameError),
}

/// An access that guest memory refused. Nothing was written when a write
/// returns one of these (ranges are checked before any byte moves).
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// No region holds this address (a hole, or past the end of memory).
    #[error("guest-physical address {addr} is not backed by any region")]
    Unmapped {
        /// The first unbacked address of the access.
        addr: GuestPhysAddr,
    },
    /// `addr + len` wraps past the top of the address space.
    #[error("access of {len} bytes at {addr} wraps past the end of the address space")]
    Overflow {
        /// Start of the access.
        addr: GuestPhysAddr,
        /// Its length.
        len: usize,
    },
    /// An atomic or page-granular operation on an unaligned address.
    #[error("address {addr} is not aligned to {align} bytes")]
    Misaligned {
        /// The address.
        addr: GuestPhysAddr,
        /// Required alignment.
        align: u64,
    },
    /// The page is write-protected by a layer that has no resolver for
    /// library writes installed.
    #[error("page at {addr} is write-protected")]
    WriteProtected {
        /// Start of the page.
        addr: GuestPhysAddr,
    },
    /// A memory ordering the atomic operation cannot take: a load cannot
    /// release, a store cannot acquire, and the failure ordering of a
    /// compare-exchange is a load's (std's atomics panic on these).
    #[error("an atomic {op} cannot take the memory ordering {order:?}")]
    Ordering {
        /// The operation.
        op: &'static str,
        /// The ordering given.
        order: std::sync::atomic::Ordering,
    },
    /// The host failed to release or provide memory.
    #[error(transparent)]
    Frames(#[from] FrameError),
}

impl PartialEq for AccessError {
    fn eq(&self, other: &Self) -> bool {
        use AccessError::*;
        match (self, other) {
            (Unmapped { addr: a }, Unmapped { addr: b }) => a == b,
            (Overflow { addr: a, len: l }, Overflow { addr: b, len: m }) => a == b && l == m,
            (Misaligned { addr: a, align: x }, Misaligned { addr: b, align: y }) => {
                a == b && x == y
            }
            (WriteProtected { addr: a }, WriteProtected { addr: b }) => a == b,
            (Ordering { op: a, order: x }, Ordering { op: b, order: y }) => a == b && x == y,
            _ => false,
        }
    }
}
