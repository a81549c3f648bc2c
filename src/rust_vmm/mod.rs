//! pagefold's memory through rust-vmm's vm-memory traits (feature
//! `vm-memory`): a [`GuestRegion`](crate::GuestRegion) is a
//! `GuestMemoryRegion`, a [`GuestMemory`](crate::GuestMemory) a
//! `GuestMemoryBackend` (and so a `GuestMemory` of vm-memory's, with its
//! `Bytes`), and a region's dirty log is its `Bitmap`. Devices written
//! against vm-memory (virtio-queue, vhost, vhost-user-backend,
//! linux-loader) run on pagefold memory unchanged.
//!
//! - `Arc<pagefold::GuestMemory>` is a `GuestAddressSpace` (vm-memory's
//!   own impl for `Arc<M>`); a VMM that adds or removes regions while it
//!   runs holds an [`AtomicGuestMemory`] and swaps in the memory
//!   [`GuestMemory::insert_region`](crate::GuestMemory::insert_region) or
//!   [`remove_region`](crate::GuestMemory::remove_region) made.
//! - Writes through vm-memory (`write_obj`, `VolatileSlice`,
//!   `read_volatile_from` a file or socket) mark pagefold's dirty log while
//!   tracking is on, as library writes do: [`GuestMemory::harvest_dirty`](crate::GuestMemory::harvest_dirty)
//!   reports them. There is no second bitmap.
//! - A vm-memory access of a whole memory (`Bytes<GuestAddress>`, which
//!   vm-memory implements once for every backend) reads and writes the
//!   regions' host mappings, as a vCPU does: a write to a merged page is
//!   the kernel's copy-on-write, held while a merge window is open, exactly
//!   as a guest's store is (`DESIGN.md`, "Dedup"). A region's own `Bytes`
//!   goes through pagefold's accessors instead (a released page is read
//!   from its frame, not allocated by the read).
//! - pagefold's inherent methods (`read_obj`, `write`, ...) take
//!   [`GuestPhysAddr`](crate::GuestPhysAddr) and win method lookup on the
//!   concrete type: call vm-memory's through the trait
//!   (`Bytes::read_obj(&*mem, GuestAddress(a))`) or from generic code.

mod bitmap;
mod memory;
mod region;

pub use bitmap::DirtyLogSlice;

/// A guest memory a VMM can change while devices run (memory hotplug,
/// virtio-mem): vm-memory's `GuestMemoryAtomic` over pagefold's memory, a
/// `GuestAddressSpace`. Swap a new memory in with
/// `atomic.lock()?.replace(new)`.
pub type AtomicGuestMemory = vm_memory::GuestMemoryAtomic<crate::GuestMemory>;
