//! Snapshots of a guest's memory: a content-addressed, versioned,
//! checksummed file with random access by page, saved full or incremental
//! against a parent, and restored into a [`GuestMemory`](crate::GuestMemory).
//!
//! # Format (version 1, little-endian)
//!
//! | part | bytes | checked by |
//! |---|---|---|
//! | header | magic `\x89PFSNAP\n`, version, flags (bit 0: incremental, bit 1: vCPU states, bit 2: the vCPU part is sectioned, bit 3: a VM part, bit 4: a device-state part), page size, region count, vCPU count (u32, zero without bit 1), id (32), parent id (32, zero for a full snapshot), page count, content offset, stored count, map offset, run count, map checksum, table offset, ancestor count, table checksum, then `(start, size)` per region, then a checksum of all of it | xxh3-64 |
//! | padding | zeros to the next 4 KiB boundary | must be zero |
//! | content | each distinct stored page once, 4 KiB each, in slot order | each page's BLAKE3 in the table |
//! | map | runs of 16 bytes: pages (u32), kind, 3 zero bytes, value (u64); kinds zero, as in the parent, a sequence of contents from `value`, one content `value` repeated | xxh3-64 in the header |
//! | table | BLAKE3 of each stored page by slot; then per content taken from an ancestor: BLAKE3, depth (1: the parent), 4 zero bytes, slot there | xxh3-64 in the header |
//! | vCPU states (only with flag bit 1) | with bit 2 (written since): the part's length (u64), then per vCPU its entry's length, a 504-byte register record and sized sections (`XSAVE` area, XCRs, MSRs, local APIC, events, run state), then the xxh3-64 of the part; without bit 2 (earlier builds, still read): one 504-byte record per vCPU, then the xxh3-64 of the records (`vcpu.rs` has both layouts) | its own checksum |
//! | VM state (only with flag bit 3) | the part's length (u64, at most 400), then sections (tag, zero, length): 1 kvmclock, 2 irqchip (two PICs, IOAPIC), 3 PIT; then the xxh3-64 of the part (`vm.rs`) | its own checksum |
//! | device state (only with flag bit 4) | the part's length (u64, at most 16 + 64 MiB), the VMM's opaque bytes, the xxh3-64 of the part (`machine.rs`) | its own checksum |
//!
//! Each part starts where the one before ends, so the counts in the header
//! (and the own lengths of the sectioned vCPU, VM and device-state parts,
//! each bounded by what the part can hold and by the file's size before it
//! sizes anything) fix every offset and the file's exact length:
//! any missing or extra byte is an error. A part longer than a MiB has its
//! checksum streamed before its bytes are kept, and a vCPU part holding a
//! whole MiB of zeros (a sparse file's hole) is refused at once, so a file
//! claiming a part of hundreds of megabytes costs a MiB of memory. The id
//! is BLAKE3 of the header (less id and checksum), map, table and the parts
//! after it; since the table holds every stored page's BLAKE3 and the
//! header the parent's id, it names the whole image and its ancestry.
//!
//! Why BLAKE3 as the content address rather than xxh3-128 with a byte
//! comparison at save: an address has to mean the same content in every
//! file (an incremental snapshot names its ancestors' contents, and a
//! restore folded across several snapshots will share frames by address),
//! so it cannot be keyed by a per-file secret, and an unkeyed xxh3 is not
//! collision-resistant against a guest that picks its memory. BLAKE3 is,
//! and it checks each stored page's bytes when read, with no second
//! checksum. It costs more CPU than xxh3: pages are hashed in parallel at
//! save and at restore (`examples/snapshot_throughput.rs` measures both
//! against a plain copy to a file).
//!
//! # Dirty since the last snapshot
//!
//! [`save`] (with [`SaveOptions::track_dirty`]) turns dirty tracking on and
//! empties the log before it reads a page. Before [`save_incremental`] the
//! VMM merges KVM's bitmaps into the log and harvests it
//! ([`GuestMemory::harvest_dirty`](crate::GuestMemory::harvest_dirty)); the
//! harvest is the set of pages written since the parent, and what is
//! written from then on is in the next harvest.
//!
//! # What this module must never do
//!
//! Panic, allocate by a length a file claims (every buffer is bounded by
//! the file's real size), hand out a page whose bytes do not match its
//! address, read a released page into memory, or leave a file at the
//! destination that opens as valid before the save finished.
//!
//! Files, bottom up: `error`, `id`, `format` (header, offsets, checksums),
//! `vcpu` (the vCPU part: plain register data, no KVM feature needed),
//! `vm` (the VM part: kvmclock, irqchip, PIT as plain data), `machine`
//! (what a whole-machine save carries; the device-state part),
//! `map`, `table`, `layout` (page indexes), `file` (reads at an offset,
//! the temporary file renamed into place), `reader`, `scan` (reading guest
//! memory for a save), `save`, `restore` (by copy), `folded` (restored
//! into a dedup host's domain, sharing frames from the first moment),
//! `foreign` (Firecracker's and cloud-hypervisor's snapshot memory as
//! input: restored by copy, or converted to this format for a folded
//! restore), `lazy` (restored on first touch through a userfaultfd in
//! missing mode, the rest fetched in the background, working set first),
//! `lazy_folded` (lazily, onto an image in a dedup host's frames that its
//! clones share as it arrives).

mod error;
mod file;
mod folded;
mod foreign;
mod format;
mod id;
mod layout;
mod lazy;
mod lazy_folded;
mod machine;
mod map;
mod reader;
mod restore;
mod save;
mod scan;
mod table;
mod vcpu;
mod vm;

pub use error::{ForeignProblem, Part, Place, Problem, SnapshotError};
pub use folded::{
    restore_folded, restore_folded_with, FoldLayout, FoldOptions, FoldedRestore, FoldedStats,
    DEFAULT_MAX_GUEST_BYTES,
};
pub use foreign::{
    restore_foreign_into, FirecrackerArch, ForeignKind, ForeignMemory, CLOUD_HYPERVISOR_MEMORY,
    CLOUD_HYPERVISOR_STATE,
};
pub use format::{MAGIC, VERSION};
pub use id::SnapshotId;
pub use lazy::{restore_lazy, FetchHook, LazyError, LazyOptions, LazyRestore, LazyStats};
pub use lazy_folded::{restore_folded_lazy, LazyFoldOptions, LazyFoldedRestore};
pub use machine::{MachineState, MAX_DEVICE_STATE};
pub use map::PageSource;
pub use reader::SnapshotReader;
pub use restore::{restore_into, RestoreStats};
pub use save::{
    save, save_incremental, save_incremental_machine, save_incremental_with_vcpus, save_machine,
    save_with_vcpus, SaveOptions, SaveStats,
};
pub use vcpu::{
    DebugRegisters, DescriptorTable, GeneralRegs, Segment, SpecialRegs, VcpuState, EVENTS_LEN,
    LAPIC_LEN,
};
pub use vm::{
    ClockState, IoapicState, IrqchipState, PicState, PitChannel, PitState, VmState, CLOCK_HOST_TSC,
    CLOCK_REALTIME, CLOCK_TSC_STABLE, IOAPIC_PINS, VM_PART_MAX,
};
