//! Errors of snapshots. Every error about a file's bytes names the part of
//! the file (header, padding, content, map, table, vCPU states, VM
//! state, device state) and the byte offset, so
//! an operator can tell a cut file from a damaged one from one of another
//! version.

use std::{fmt, io, path::PathBuf};

use crate::{
    addr::GuestPhysAddr,
    dedup::DedupError,
    dirty::DirtyError,
    memory::{AccessError, LayoutError, MemoryError},
};

use super::id::SnapshotId;

/// The parts of a snapshot file, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The header: magic, version, layout, part offsets and checksums.
    Header,
    /// The zero bytes between the header and the page-aligned content.
    Padding,
    /// The content area: each distinct page stored once.
    Content,
    /// The page map: runs of zero, parent and content pages.
    Map,
    /// The content table: the hash of each stored page, and the contents
    /// an incremental snapshot takes from its ancestors.
    Table,
    /// The vCPU states (only in a file whose header has the vCPU flag).
    Vcpus,
    /// The VM-wide KVM state: kvmclock, in-kernel irqchip and PIT (only
    /// in a file whose header has flag bit 3).
    VmState,
    /// The VMM's own device state, opaque to pagefold (only in a file
    /// whose header has flag bit 4).
    DeviceState,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Header => "header",
            Part::Padding => "header padding",
            Part::Content => "content area",
            Part::Map => "page map",
            Part::Table => "content table",
            Part::Vcpus => "vCPU states",
            Part::VmState => "VM state",
            Part::DeviceState => "device state",
        })
    }
}

/// A place in a snapshot file: a part and a byte offset from the file's
/// start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Place {
    /// The part the byte belongs to.
    pub part: Part,
    /// Byte offset from the start of the file.
    pub offset: u64,
}

impl Place {
    pub(crate) const fn new(part: Part, offset: u64) -> Self {
        Place { part, offset }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.part, self.offset)
    }
}

/// What is wrong with a part whose checksum holds (a writer bug or a
/// crafted file, not line noise), or with a reference between files.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Header flags this version does not know.
    #[error("unknown flags {0:#06x}")]
    Flags(u16),
    /// A page size other than 4 KiB.
    #[error("page size {0} (4096 only)")]
    PageSize(u32),
    /// A reserved field or padding byte that is not zero.
    #[error("reserved byte is {0:#04x}, not zero")]
    Reserved(u8),
    /// The vCPU flag and the vCPU count disagree.
    #[error("vCPU flag and vCPU count disagree")]
    VcpuFlag,
    /// A vCPU entry or section of the sectioned vCPU part that does not
    /// hold together (a length past its end, a section out of order, a tag
    /// this build does not know, a count that is not the header's).
    #[error("vCPU {vcpu}: {what}")]
    VcpuEntry {
        /// The vCPU's index (in file order).
        vcpu: u32,
        /// What is wrong.
        what: String,
    },
    /// A section of the VM part that does not hold together (a length
    /// other than its tag's, a section out of order or twice, a tag this
    /// build does not know).
    #[error("{what}")]
    Section {
        /// What is wrong.
        what: String,
    },
    /// A part longer than this build accepts (the device state's
    /// [`MAX_DEVICE_STATE`](super::MAX_DEVICE_STATE)): refused before a
    /// byte of it is read or allocated, or before a save reads a page.
    #[error("{len} bytes, more than the {max} this part may hold")]
    TooLarge {
        /// The length claimed (in a file) or given (to a save).
        len: u64,
        /// The most the part may hold.
        max: u64,
    },
    /// A whole chunk of zero bytes where no valid part has one: the hole
    /// of a sparse file whose length claims a part it does not hold.
    #[error("{len} bytes of zeros (a hole?), which no valid part holds")]
    Hole {
        /// Bytes of zeros read.
        len: u64,
    },
    /// More vCPUs than any VM has.
    #[error("{count} vCPUs (at most {max})")]
    TooManyVcpus {
        /// The header's count.
        count: u32,
        /// The most a snapshot may have.
        max: u32,
    },
    /// A content address of all zero bytes: no page has it (a hole of a
    /// sparse file reads so).
    #[error("a content address of all zeros")]
    ZeroHash,
    /// The incremental flag and the parent id disagree.
    #[error("incremental flag and parent id disagree")]
    Parent,
    /// The region layout is invalid.
    #[error("region layout: {0}")]
    Layout(LayoutError),
    /// Regions not sorted by address.
    #[error("regions are not in address order")]
    Unsorted,
    /// The header's page count is not the layout's.
    #[error("header counts {claimed} pages, the layout has {layout}")]
    TotalPages {
        /// The header's count.
        claimed: u64,
        /// The layout's.
        layout: u64,
    },
    /// A part does not start where the parts before it end.
    #[error("{field} is {found}, expected {expected}")]
    Offset {
        /// The header field.
        field: &'static str,
        /// Its value.
        found: u64,
        /// Where the part must start.
        expected: u64,
    },
    /// A size that overflows.
    #[error("{0} overflows")]
    Overflow(&'static str),
    /// Bytes after the last part.
    #[error("{extra} bytes after the last part")]
    Trailing {
        /// How many.
        extra: u64,
    },
    /// A map run of zero pages.
    #[error("empty run")]
    EmptyRun,
    /// A map run of a kind this version does not know.
    #[error("unknown run kind {0:#04x}")]
    RunKind(u8),
    /// A zero or parent run with a value.
    #[error("run value {0} where none belongs")]
    RunValue(u64),
    /// A parent run in a full snapshot.
    #[error("\"as in the parent\" in a snapshot with no parent")]
    ParentInFull,
    /// A run naming content the table does not have.
    #[error("content {index} (and {pages} pages on) is not below the table's {count}")]
    ContentIndex {
        /// First content index.
        index: u64,
        /// Pages of the run.
        pages: u64,
        /// Contents in the table.
        count: u64,
    },
    /// The map's runs do not cover the layout exactly.
    #[error("runs cover {runs} pages, the layout has {layout}")]
    MapPages {
        /// Pages the runs cover (saturated).
        runs: u64,
        /// Pages of the layout.
        layout: u64,
    },
    /// Contents taken from ancestors in a full snapshot.
    #[error("ancestor contents in a snapshot with no parent")]
    ExternalInFull,
    /// An ancestor reference with depth zero.
    #[error("ancestor depth 0")]
    Depth,
    /// An ancestor reference past a full snapshot (the chain ends there).
    #[error("ancestor depth {depth}, the chain has {chain}")]
    DepthPastChain {
        /// The depth named.
        depth: u32,
        /// Ancestors in the chain.
        chain: u32,
    },
    /// An ancestor reference to a slot the ancestor does not have.
    #[error("ancestor {depth} has no content slot {slot} ({count} stored)")]
    Slot {
        /// The depth named.
        depth: u32,
        /// The slot named.
        slot: u64,
        /// The ancestor's stored contents.
        count: u64,
    },
    /// An ancestor reference whose hash is not the ancestor's.
    #[error("ancestor {depth}'s content slot {slot} has another hash")]
    ForeignContent {
        /// The depth named.
        depth: u32,
        /// The slot named.
        slot: u64,
    },
}

/// What is wrong with another VMM's snapshot files
/// ([`ForeignMemory`](super::ForeignMemory)).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ForeignProblem {
    /// A field the format requires is not there.
    #[error("missing")]
    Missing,
    /// A field of another JSON type than the format's.
    #[error("not {0}")]
    Type(&'static str),
    /// The file is not JSON, or a JSON string inside it is not.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// No memory at all.
    #[error("no memory ranges")]
    NoRanges,
    /// A range of zero bytes.
    #[error("range at {gpa} has length 0")]
    EmptyRange {
        /// The range's start.
        gpa: GuestPhysAddr,
    },
    /// A value that must be a multiple of 4 KiB.
    #[error("{value:#x} is not a multiple of 4096")]
    Unaligned {
        /// The value.
        value: u64,
    },
    /// Two ranges that share addresses.
    #[error("range [{gpa}, +{length:#x}) overlaps the range at {other}")]
    Overlap {
        /// The later range in address order.
        gpa: GuestPhysAddr,
        /// Its length.
        length: u64,
        /// The start of the range it overlaps.
        other: GuestPhysAddr,
    },
    /// A sum of lengths or an end address that overflows.
    #[error("overflows")]
    Overflow,
    /// The region layout given is invalid.
    #[error("region layout: {0}")]
    Layout(LayoutError),
    /// Not a regular file (a FIFO, a device, a directory): it could block
    /// the open or read without end.
    #[error("not a regular file")]
    NotAFile,
    /// A symbolic link where the file itself must be (a snapshot
    /// directory's files): followed, it could name any file the process
    /// can read.
    #[error(
        "a symbolic link (a snapshot directory's files must be in it; link the directory instead)"
    )]
    Symlink,
    /// A file too large for what it holds (a `state.json` is read whole).
    #[error("{len} bytes, more than the {max} this file may have")]
    TooLarge {
        /// The file's length.
        len: u64,
        /// The most it may have.
        max: u64,
    },
    /// The memory file is not as long as the ranges it must hold.
    #[error("the file is {found} bytes, the memory ranges need exactly {expected}")]
    Length {
        /// Bytes the ranges need.
        expected: u64,
        /// The file's length.
        found: u64,
    },
}

/// Why a snapshot could not be saved, opened, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Opening, creating, syncing or renaming a file failed.
    #[error("cannot {op} {path}: {source}")]
    File {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Reading or writing at an offset failed.
    #[error("I/O error at the {at}: {source}")]
    Io {
        /// Where.
        at: Place,
        /// The error.
        source: io::Error,
    },
    /// The file ends inside a part.
    #[error("snapshot truncated: the file ends at byte {file_len}, inside the {at}")]
    Truncated {
        /// The part cut, and where it (or the field cut) starts.
        at: Place,
        /// The file's length.
        file_len: u64,
    },
    /// Not a pagefold snapshot.
    #[error("not a pagefold snapshot (magic {found:02x?} at the {at})")]
    BadMagic {
        /// Byte 0 of the header.
        at: Place,
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A format version this build does not read.
    #[error("snapshot format version {found} (the {at}); this build reads version {supported}")]
    UnsupportedVersion {
        /// The version field.
        at: Place,
        /// Version in the file.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// A part's checksum does not match its bytes.
    #[error("the {at} is corrupt: checksum {found:#018x}, computed {computed:#018x}")]
    Checksum {
        /// The part and where it starts.
        at: Place,
        /// The checksum in the file.
        found: u64,
        /// The checksum of the bytes read.
        computed: u64,
    },
    /// A stored page's bytes do not hash to its address in the table.
    #[error("the {at} is corrupt: stored page {slot} does not match its hash")]
    ContentHash {
        /// The page's place in the content area.
        at: Place,
        /// Its slot.
        slot: u64,
    },
    /// The header, map or table, checksum intact, does not make sense.
    #[error("malformed {at}: {problem}")]
    Malformed {
        /// Where.
        at: Place,
        /// What is wrong.
        problem: Problem,
    },
    /// The snapshot's id is not the hash of its header, map and table.
    #[error("the {at}: the snapshot id does not match its contents")]
    IdMismatch {
        /// The id field.
        at: Place,
    },
    /// A save whose destination is the file of one of the snapshots it
    /// builds on: replacing it would leave the new snapshot naming an
    /// ancestor that no longer exists.
    #[error("cannot save to {}: it is the file of ancestor {depth} (1: the parent) of the snapshot being saved", .path.display())]
    OverwritesAncestor {
        /// The destination.
        path: PathBuf,
        /// Which ancestor (1: the parent).
        depth: u32,
    },
    /// A full snapshot was given a parent.
    #[error("snapshot {id} is full: it has no parent")]
    NotIncremental {
        /// The snapshot.
        id: SnapshotId,
    },
    /// The parent given is not the snapshot's parent.
    #[error("the parent given is {found}, the snapshot's parent is {expected}")]
    WrongParent {
        /// The parent the snapshot names.
        expected: SnapshotId,
        /// The one given.
        found: SnapshotId,
    },
    /// A page or content is in an ancestor that was not attached.
    #[error("page {gpa} is in ancestor snapshot {parent}, which was not opened with this one")]
    ParentMissing {
        /// The page.
        gpa: GuestPhysAddr,
        /// The missing ancestor.
        parent: SnapshotId,
    },
    /// A parent and its child, or a snapshot and a memory, differ in their
    /// region layout.
    #[error("region layout differs: {what}")]
    LayoutMismatch {
        /// The two layouts.
        what: String,
    },
    /// An address that is not a page of the snapshot's layout.
    #[error("{gpa} is not a page of the snapshot's layout")]
    PageNotInLayout {
        /// The address.
        gpa: GuestPhysAddr,
    },
    /// An incremental save of memory whose region `region` is not dirty
    /// tracked: the dirty log cannot say what changed since the parent.
    #[error("region {region} is not dirty tracked: an incremental snapshot needs the log since its parent")]
    NotTracking {
        /// The region index.
        region: usize,
    },
    /// A save that would take the dirty log ([`SaveOptions::track_dirty`](super::SaveOptions::track_dirty)),
    /// or an incremental save, while a migration sender holds it: the
    /// sender's rounds need every page the log reports, and take pages an
    /// incremental's harvest would then lack.
    #[error("a migration sender holds this memory's dirty log; save without track_dirty, or after the migration")]
    LogInUse,
    /// A dirty run outside the memory.
    #[error("dirty run at {gpa} ({pages} pages) is not inside the memory")]
    DirtyRun {
        /// Start of the run.
        gpa: GuestPhysAddr,
        /// Its pages.
        pages: u64,
    },
    /// Another VMM's snapshot (a Firecracker memory file, a
    /// cloud-hypervisor snapshot directory) is not what its format says:
    /// `field` names the part of `path` that is wrong.
    #[error("{}: {field}: {problem}", .path.display())]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The field or part of it (`snapshots.memory-manager...` in a
        /// JSON file, `length` for a memory file's size).
        field: String,
        /// What is wrong with it.
        problem: ForeignProblem,
    },
    /// An error in one file of a chain, where the call named several
    /// ([`SnapshotReader::open_chain`](super::SnapshotReader::open_chain))
    /// or read an ancestor the caller did not name
    /// ([`restore_into`](super::restore_into)); [`place`](Self::place) is
    /// the inner error's.
    #[error("{}: {source}", .path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<SnapshotError>,
    },
    /// Guest memory refused an access.
    #[error("guest memory: {0}")]
    Access(#[from] AccessError),
    /// Guest memory could not be made.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// The dirty log refused.
    #[error("dirty log: {0}")]
    Dirty(#[from] DirtyError),
    /// The snapshot's guest is larger than the restore accepts
    /// ([`FoldOptions::max_guest_bytes`](super::FoldOptions::max_guest_bytes)),
    /// refused before any work per page.
    #[error("the snapshot's guest is {bytes} bytes, over the restore's limit of {max} bytes")]
    TooLarge {
        /// The guest's size, all regions together (saturated).
        bytes: u64,
        /// The caller's limit.
        max: u64,
    },
    /// The dedup host refused or failed a folded restore
    /// ([`restore_folded`](super::restore_folded)).
    #[error("dedup: {0}")]
    Dedup(#[from] DedupError),
}

impl SnapshotError {
    /// Where in a file the error is, for errors about a file's bytes.
    pub fn place(&self) -> Option<Place> {
        use SnapshotError::*;
        match self {
            Io { at, .. }
            | Truncated { at, .. }
            | BadMagic { at, .. }
            | UnsupportedVersion { at, .. }
            | Checksum { at, .. }
            | ContentHash { at, .. }
            | Malformed { at, .. }
            | IdMismatch { at } => Some(*at),
            InFile { source, .. } => source.place(),
            _ => None,
        }
    }

    pub(crate) fn malformed(part: Part, offset: u64, problem: Problem) -> Self {
        SnapshotError::Malformed {
            at: Place::new(part, offset),
            problem,
        }
    }
}
