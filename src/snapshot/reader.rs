//! Opening a snapshot: the header, padding, map, table and vCPU part are read and
//! checked whole at open (they are small: 16 bytes per run of the map, 32
//! per stored page); stored pages are read on demand, one `pread` per run
//! of slots, and each page is checked against its BLAKE3 address before
//! anyone sees it. Every buffer is sized by the file's real length: a
//! header's counts are checked against it before anything is allocated,
//! and the map and table are read a chunk at a time, an entry of all zeros
//! (a hole: no valid entry is zeros) an error at once, so a sparse file
//! whose length claims terabytes costs a chunk.
//!
//! An incremental snapshot is opened alone and then given its parent
//! ([`SnapshotReader::with_parent`], or [`SnapshotReader::open_chain`]),
//! which checks the parent's id and layout and every content the child
//! takes from an ancestor.

use std::{
    fs::{File, Metadata},
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use rayon::prelude::*;

use super::{
    error::{Part, Place, Problem, SnapshotError},
    file::{open_regular, read_at},
    format::{self, content_hash, Hash, Header, Parts, EXTERNAL_LEN, FIXED, LOCAL_LEN, RUN_LEN},
    id::SnapshotId,
    layout::PageLayout,
    machine,
    map::{PageMap, PageSource},
    table::{ContentTable, Slot},
    vcpu::{self, VcpuState},
    vm::{self, VmState},
};
use crate::addr::{GuestPhysAddr, PageSize, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// An open snapshot file, and its ancestors once attached.
#[derive(Debug)]
pub struct SnapshotReader {
    file: File,
    header: Header,
    parts: Parts,
    layout: PageLayout,
    map: PageMap,
    table: ContentTable,
    vcpus: Vec<VcpuState>,
    vm_state: Option<VmState>,
    device_state: Option<Vec<u8>>,
    parent: Option<Box<SnapshotReader>>,
    /// The path it was opened by ([`open`](Self::open)), for errors.
    path: Option<PathBuf>,
}

/// Where a page's bytes are, through the chain.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Located<'a> {
    /// Zeros.
    Zero,
    /// Stored in `file`'s content area at `slot`.
    Stored { file: &'a SnapshotReader, slot: u64 },
}

impl SnapshotReader {
    /// Opens the snapshot at `path` and checks its header, map and table
    /// (not its stored pages: each is checked when read). Anything but a
    /// regular file (a FIFO, a device) is an error, never a wait. An incremental
    /// snapshot reads its unchanged pages from its parent, attached with
    /// [`with_parent`](Self::with_parent).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SnapshotError> {
        let path = path.as_ref();
        let file = open_regular(path, false).map_err(|e| SnapshotError::File {
            op: "open",
            path: path.to_path_buf(),
            source: e.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")
            }),
        })?;
        let mut snap = Self::from_file(file)?;
        snap.path = Some(path.to_path_buf());
        Ok(snap)
    }

    /// Opens a chain of snapshots, oldest (a full snapshot) first, each
    /// later one incremental against the one before; returns the newest,
    /// holding the others. An error about a file's bytes is
    /// [`SnapshotError::InFile`], naming the file.
    pub fn open_chain<P: AsRef<Path>>(paths: &[P]) -> Result<Self, SnapshotError> {
        let mut chain: Option<SnapshotReader> = None;
        for p in paths {
            let next = Self::open(p).map_err(|e| match e {
                e @ SnapshotError::File { .. } => e,
                e => SnapshotError::InFile {
                    path: p.as_ref().to_path_buf(),
                    source: Box::new(e),
                },
            })?;
            chain = Some(match chain {
                None => next,
                Some(parent) => next.with_parent(parent)?,
            });
        }
        chain.ok_or(SnapshotError::LayoutMismatch {
            what: "no snapshot in the chain".into(),
        })
    }

    /// [`open`](Self::open) on a file already open for reading.
    pub fn from_file(file: File) -> Result<Self, SnapshotError> {
        let file_len = file
            .metadata()
            .map_err(|source| SnapshotError::Io {
                at: Place::new(Part::Header, 0),
                source,
            })?
            .len();
        let truncated = |part, offset| SnapshotError::Truncated {
            at: Place::new(part, offset),
            file_len,
        };
        let fixed_len = usize::try_from(file_len.min(FIXED as u64)).unwrap_or(FIXED);
        let mut fixed = vec![0u8; fixed_len];
        read_at(&file, &mut fixed, 0, Part::Header)?;
        if fixed.len() < FIXED {
            format::check_magic_version(&fixed)?;
            return Err(truncated(Part::Header, 0));
        }
        let regions = format::region_count(&fixed)?;
        let header_len = format::header_len(regions)
            .filter(|&n| n <= file_len)
            .ok_or(truncated(Part::Header, FIXED as u64))?;
        let mut hbytes = vec![0u8; usize::try_from(header_len).unwrap_or(0)];
        read_at(&file, &mut hbytes, 0, Part::Header)?;
        let header = Header::parse(&hbytes)?;
        let mut parts = header.parts()?;
        for (part, start, end) in [
            (Part::Padding, parts.header_len, parts.content),
            (Part::Content, parts.content, parts.map),
            (Part::Map, parts.map, parts.table),
            (Part::Table, parts.table, parts.vcpus),
        ] {
            if end > file_len {
                return Err(truncated(part, start.min(file_len)));
            }
        }
        let tail = TailParts::locate(&file, &header, parts.vcpus, file_len)?;
        parts.end = tail.end;
        if parts.end < file_len {
            // A part's length field is the last word on where the file
            // ends: name it, not the bytes it leaves over.
            let (last, at) = tail.last.unwrap_or((Part::Table, parts.end));
            return Err(SnapshotError::malformed(
                last,
                at,
                Problem::Trailing {
                    extra: file_len - parts.end,
                },
            ));
        }
        // Every length below is at most the file's.
        let len = |a: u64, b: u64| usize::try_from(b - a).unwrap_or(0);
        let mut pad = vec![0u8; len(parts.header_len, parts.content)];
        read_at(&file, &mut pad, parts.header_len, Part::Padding)?;
        if let Some(k) = pad.iter().position(|&b| b != 0) {
            return Err(SnapshotError::malformed(
                Part::Padding,
                parts.header_len + k as u64,
                Problem::Reserved(pad[k]),
            ));
        }
        let mut map_bytes = Vec::new();
        read_entries(
            &file,
            Part::Map,
            (parts.map, parts.table),
            (RUN_LEN, 0, || Problem::EmptyRun),
            &mut map_bytes,
        )?;
        check_sum(Part::Map, parts.map, &map_bytes, header.map_checksum)?;
        let contents = header.local_count + header.external_count;
        let map = PageMap::parse(
            &map_bytes,
            parts.map,
            header.incremental,
            contents,
            header.total_pages,
        )?;
        let mut table_bytes = Vec::new();
        let externals = parts.table + header.local_count * LOCAL_LEN as u64;
        read_entries(
            &file,
            Part::Table,
            (parts.table, externals),
            (LOCAL_LEN, 0, || Problem::ZeroHash),
            &mut table_bytes,
        )?;
        read_entries(
            &file,
            Part::Table,
            (externals, parts.vcpus),
            (EXTERNAL_LEN, 32, || Problem::Depth),
            &mut table_bytes,
        )?;
        check_sum(
            Part::Table,
            parts.table,
            &table_bytes,
            header.table_checksum,
        )?;
        let table = ContentTable::parse(&table_bytes, parts.table, header.local_count)?;
        let (vcpu_at, vcpu_end) = tail.vcpus;
        let vcpu_bytes = read_summed(
            &file,
            Part::Vcpus,
            (vcpu_at, vcpu_end),
            Summed {
                seed: header.vcpu_sections.then_some(vcpu::SECTIONED_SEED),
                no_zero_chunk: true,
            },
        )?;
        let vcpus = if header.vcpu_sections {
            vcpu::parse_sectioned(&vcpu_bytes, vcpu_at, header.vcpu_count)?
        } else {
            vcpu::parse_fixed(&vcpu_bytes, vcpu_at)?
        };
        let (vm_at, vm_end) = tail.vm;
        let whole = Summed {
            seed: None,
            no_zero_chunk: false,
        };
        let vm_bytes = read_summed(&file, Part::VmState, (vm_at, vm_end), whole)?;
        let vm_state = if header.vm_state {
            Some(vm::parse_part(&vm_bytes, vm_at)?)
        } else {
            None
        };
        let (dev_at, dev_end) = tail.device;
        let dev_bytes = read_summed(
            &file,
            Part::DeviceState,
            (dev_at, dev_end),
            Summed {
                seed: Some(machine::DEVICE_SEED),
                // The VMM's bytes may be zeros.
                no_zero_chunk: false,
            },
        )?;
        let id = format::snapshot_id(
            &hbytes,
            &map_bytes,
            &table_bytes,
            &[&vcpu_bytes, &vm_bytes, &dev_bytes],
        );
        let device_state = if header.device_state {
            Some(machine::parse_device_part(dev_bytes, dev_at)?)
        } else {
            None
        };
        if id != header.id {
            return Err(SnapshotError::IdMismatch {
                at: Place::new(Part::Header, format::ID_AT as u64),
            });
        }
        Ok(SnapshotReader {
            file,
            layout: PageLayout::new(header.regions.clone()),
            header,
            parts,
            map,
            table,
            vcpus,
            vm_state,
            device_state,
            parent: None,
            path: None,
        })
    }

    /// Attaches this incremental snapshot's parent (with the parent's own
    /// ancestors attached, as far as they are). Checks the parent's id and
    /// layout, and every content this snapshot takes from an ancestor that
    /// is attached.
    pub fn with_parent(mut self, parent: SnapshotReader) -> Result<Self, SnapshotError> {
        if !self.header.incremental {
            return Err(SnapshotError::NotIncremental { id: self.id() });
        }
        if parent.id() != self.header.parent {
            return Err(SnapshotError::WrongParent {
                expected: self.header.parent,
                found: parent.id(),
            });
        }
        if let Some(what) = self.layout.differs(&parent.layout) {
            return Err(SnapshotError::LayoutMismatch { what });
        }
        let base = self.parts.table + self.table.local.len() as u64 * LOCAL_LEN as u64;
        for (i, e) in self.table.external.iter().enumerate() {
            let at = base + (i * EXTERNAL_LEN) as u64;
            let bad = |problem| SnapshotError::malformed(Part::Table, at, problem);
            let (mut anc, mut d) = (&parent, 1u32);
            while d < e.depth {
                match &anc.parent {
                    Some(p) => {
                        anc = p;
                        d += 1;
                    }
                    None => break,
                }
            }
            if d < e.depth {
                if anc.header.incremental {
                    continue; // not attached: `ParentMissing` if read
                }
                return Err(bad(Problem::DepthPastChain {
                    depth: e.depth,
                    chain: d,
                }));
            }
            let count = anc.table.local.len() as u64;
            let held = usize::try_from(e.slot)
                .ok()
                .and_then(|s| anc.table.local.get(s));
            match held {
                None => {
                    return Err(bad(Problem::Slot {
                        depth: e.depth,
                        slot: e.slot,
                        count,
                    }))
                }
                Some(h) if *h != e.hash => {
                    return Err(bad(Problem::ForeignContent {
                        depth: e.depth,
                        slot: e.slot,
                    }))
                }
                Some(_) => {}
            }
        }
        self.parent = Some(Box::new(parent));
        Ok(self)
    }

    /// This snapshot's id.
    pub fn id(&self) -> SnapshotId {
        self.header.id
    }

    /// The parent's id, for an incremental snapshot.
    pub fn parent_id(&self) -> Option<SnapshotId> {
        self.header.incremental.then_some(self.header.parent)
    }

    /// The vCPU states saved with this snapshot (each snapshot of a chain
    /// carries its own; empty where none were saved), in vCPU order.
    pub fn vcpus(&self) -> &[VcpuState] {
        &self.vcpus
    }

    /// The VM-wide KVM state saved with this snapshot (kvmclock,
    /// in-kernel irqchip and PIT: [`save_machine`](super::save_machine));
    /// `None` where none was saved (each snapshot of a chain carries its
    /// own).
    pub fn vm_state(&self) -> Option<&VmState> {
        self.vm_state.as_ref()
    }

    /// The VMM's device state saved with this snapshot, as it handed it
    /// to [`save_machine`](super::save_machine) (checked against the
    /// part's checksum at open); `None` where none was saved (each
    /// snapshot of a chain carries its own).
    pub fn device_state(&self) -> Option<&[u8]> {
        self.device_state.as_deref()
    }

    /// The path this snapshot was opened by (`None` for
    /// [`from_file`](Self::from_file)).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// `e`, an error reading this file, as [`SnapshotError::InFile`] where
    /// the file has a path.
    pub(crate) fn name_error(&self, e: SnapshotError) -> SnapshotError {
        match &self.path {
            Some(path) => SnapshotError::InFile {
                path: path.clone(),
                source: Box::new(e),
            },
            None => e,
        }
    }

    /// The parent, if attached.
    pub fn parent(&self) -> Option<&SnapshotReader> {
        self.parent.as_deref()
    }

    /// `(start, size)` of each region, in address order: the layout to make
    /// a [`GuestMemory`](crate::GuestMemory) to restore into.
    pub fn region_layout(&self) -> Vec<(GuestPhysAddr, u64)> {
        self.layout.regions().to_vec()
    }

    /// Pages of the layout.
    pub fn pages(&self) -> u64 {
        self.layout.total()
    }

    /// Pages stored in this file (each a distinct content).
    pub fn stored_pages(&self) -> u64 {
        self.table.local.len() as u64
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.parts.end
    }

    /// Where this snapshot's map says the page holding `gpa` is.
    pub fn source(&self, gpa: GuestPhysAddr) -> Result<PageSource, SnapshotError> {
        Ok(self.map.source(self.page_index(gpa)?))
    }

    /// Reads the page at `gpa` (page-aligned), through the ancestors where
    /// the page is as in a parent.
    pub fn read_page(
        &self,
        gpa: GuestPhysAddr,
        out: &mut [u8; PAGE_SIZE],
    ) -> Result<(), SnapshotError> {
        match self.locate(self.page_index(gpa)?)? {
            Located::Zero => {
                out.fill(0);
                Ok(())
            }
            Located::Stored { file, slot } => file.read_slots(slot, out),
        }
    }

    fn page_index(&self, gpa: GuestPhysAddr) -> Result<u64, SnapshotError> {
        gpa.is_aligned(PageSize::Size4K)
            .then(|| self.layout.page_of(gpa))
            .flatten()
            .ok_or(SnapshotError::PageNotInLayout { gpa })
    }

    /// Whether `meta` (of a path, not followed if a link) is this
    /// snapshot's file.
    pub(crate) fn is_file(&self, meta: &Metadata) -> bool {
        self.file
            .metadata()
            .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
    }

    pub(crate) fn layout(&self) -> &PageLayout {
        &self.layout
    }

    /// Stored addresses, by slot.
    pub(crate) fn stored_hashes(&self) -> &[Hash] {
        &self.table.local
    }

    /// Where page index `page` (below [`pages`](Self::pages)) is, through
    /// the ancestors.
    pub(crate) fn locate(&self, page: u64) -> Result<Located<'_>, SnapshotError> {
        let missing = |parent| SnapshotError::ParentMissing {
            gpa: self.layout.addr_of(page).unwrap_or(GuestPhysAddr(0)),
            parent,
        };
        let mut at = self;
        loop {
            match at.map.source(page) {
                PageSource::Zero => return Ok(Located::Zero),
                PageSource::Parent => {
                    at = at.parent.as_deref().ok_or(missing(at.header.parent))?;
                }
                PageSource::Content(n) => return at.content_at(n, page),
            }
        }
    }

    /// Where content `n` of this file's table (page `page`'s) is stored:
    /// here, or in the ancestor the table names.
    fn content_at(&self, n: u64, page: u64) -> Result<Located<'_>, SnapshotError> {
        match self.table.slot(n) {
            Slot::Local(slot) => Ok(Located::Stored { file: self, slot }),
            Slot::Ancestor { depth, slot } => {
                let mut anc = self;
                for _ in 0..depth {
                    anc = anc.parent.as_deref().ok_or(SnapshotError::ParentMissing {
                        gpa: self.layout.addr_of(page).unwrap_or(GuestPhysAddr(0)),
                        parent: anc.header.parent,
                    })?;
                }
                Ok(Located::Stored { file: anc, slot })
            }
        }
    }

    /// [`locate`](Self::locate) of pages `first..first + n`, in order,
    /// each told to `f` (stopping at its first error): this file's map is
    /// walked by runs, an ancestor's looked up per page it holds.
    pub(crate) fn locate_each(
        &self,
        first: u64,
        n: u64,
        mut f: impl FnMut(u64, Located<'_>) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        let mut out = Ok(());
        self.map.sources(first, n, |page, source| {
            if out.is_err() {
                return;
            }
            let located = match source {
                PageSource::Zero => Ok(Located::Zero),
                PageSource::Content(c) => self.content_at(c, page),
                PageSource::Parent => self.locate(page),
            };
            out = located.and_then(|l| f(page, l));
        });
        out
    }

    /// Reads stored slots `first..` into `dst` (whole pages), one `pread`,
    /// and checks each page against its address.
    pub(crate) fn read_slots(&self, first: u64, dst: &mut [u8]) -> Result<(), SnapshotError> {
        self.read_slots_checked(first, dst, true)
    }

    /// [`read_slots`](Self::read_slots) checked on the calling thread, not
    /// on rayon's pool: for the lazy restore's fault handler, which must
    /// never wait on pool workers that may themselves wait in a fault it is
    /// to serve.
    pub(crate) fn read_slots_here(&self, first: u64, dst: &mut [u8]) -> Result<(), SnapshotError> {
        self.read_slots_checked(first, dst, false)
    }

    fn read_slots_checked(
        &self,
        first: u64,
        dst: &mut [u8],
        parallel: bool,
    ) -> Result<(), SnapshotError> {
        let n = (dst.len() / PAGE_SIZE) as u64;
        let at = self
            .parts
            .content
            .saturating_add(first.saturating_mul(PAGE));
        let hashes = usize::try_from(first)
            .ok()
            .and_then(|f| {
                self.table
                    .local
                    .get(f..f.checked_add(usize::try_from(n).ok()?)?)
            })
            .filter(|_| dst.len() % PAGE_SIZE == 0)
            .ok_or(SnapshotError::malformed(
                Part::Content,
                at,
                Problem::Slot {
                    depth: 0,
                    slot: first,
                    count: self.table.local.len() as u64,
                },
            ))?;
        read_at(&self.file, dst, at, Part::Content)?;
        let bad = if parallel {
            dst.par_chunks(PAGE_SIZE)
                .zip(hashes.par_iter())
                .position_first(|(page, h)| content_hash(page) != *h)
        } else {
            dst.chunks(PAGE_SIZE)
                .zip(hashes.iter())
                .position(|(page, h)| content_hash(page) != *h)
        };
        match bad {
            None => Ok(()),
            Some(k) => Err(SnapshotError::ContentHash {
                at: Place::new(Part::Content, at + k as u64 * PAGE),
                slot: first + k as u64,
            }),
        }
    }
}

/// Bytes read per `pread` of the map and table.
const CHUNK: usize = 1 << 20;

/// Appends to `out` the bytes `start..end` of `file` (part `part`), which
/// hold entries of `entry` bytes, a chunk at a time, so the buffer grows
/// only with bytes read. An entry of all zero bytes, which no valid entry
/// is (`problem`, at byte `off` of the entry) but which a hole of a sparse
/// file reads as, is an error before anything after it is read: a sparse
/// file whose length claims terabytes costs a chunk, not its length.
fn read_entries(
    file: &File,
    part: Part,
    (start, end): (u64, u64),
    (entry, off, problem): (usize, u64, fn() -> Problem),
    out: &mut Vec<u8>,
) -> Result<(), SnapshotError> {
    let chunk = (CHUNK / entry * entry) as u64;
    let mut at = start;
    while at < end {
        let n = usize::try_from(chunk.min(end - at)).unwrap_or(CHUNK);
        let old = out.len();
        out.resize(old + n, 0);
        read_at(file, &mut out[old..], at, part)?;
        if let Some(k) = out[old..]
            .chunks_exact(entry)
            // A word at a time (every entry is whole words): byte by
            // byte this was a tenth of an open's time.
            .position(|e| e.chunks_exact(8).all(|w| w == [0u8; 8]))
        {
            return Err(SnapshotError::malformed(
                part,
                at + (k * entry) as u64 + off,
                problem(),
            ));
        }
        at += n as u64;
    }
    Ok(())
}

/// Where the parts after the table lie (each `(start, end)`, empty where
/// the file has none), found from the header's flags and count and each
/// length-prefixed part's own length field, every one bounded (by what
/// the part can hold, and by the file) before anything is sized by it.
struct TailParts {
    vcpus: (u64, u64),
    vm: (u64, u64),
    device: (u64, u64),
    /// Where the file ends by them.
    end: u64,
    /// The last part there and the offset a trailing byte is blamed on
    /// (its length field; the end of a fixed vCPU part); `None`: no part
    /// after the table.
    last: Option<(Part, u64)>,
}

impl TailParts {
    fn locate(file: &File, header: &Header, at: u64, file_len: u64) -> Result<Self, SnapshotError> {
        let mut last = None;
        let mut end = at;
        if header.vcpu_count > 0 {
            if header.vcpu_sections {
                let max = vcpu::sectioned_max_len(header.vcpu_count);
                end += part_len(file, Part::Vcpus, at, file_len, (vcpu::SECTIONED_MIN, max))?;
                last = Some((Part::Vcpus, at));
            } else {
                // Bounded by the header's count (`Header::parts` checked
                // it does not overflow).
                end = vcpu::part_len(u64::from(header.vcpu_count))
                    .and_then(|n| at.checked_add(n))
                    .filter(|&e| e <= file_len)
                    .ok_or(SnapshotError::Truncated {
                        at: Place::new(Part::Vcpus, at.min(file_len)),
                        file_len,
                    })?;
                last = Some((Part::Vcpus, end));
            }
        }
        let vcpus = (at, end);
        let vm_at = end;
        if header.vm_state {
            let bounds = (vm::VM_PART_MIN, vm::VM_PART_MAX);
            end += part_len(file, Part::VmState, vm_at, file_len, bounds)?;
            last = Some((Part::VmState, vm_at));
        }
        let dev_at = end;
        if header.device_state {
            let bounds = (machine::DEVICE_PART_MIN, machine::DEVICE_PART_MAX);
            end += part_len(file, Part::DeviceState, dev_at, file_len, bounds)?;
            last = Some((Part::DeviceState, dev_at));
        }
        Ok(TailParts {
            vcpus,
            vm: (vm_at, dev_at),
            device: (dev_at, end),
            end,
            last,
        })
    }
}

/// The length field (the first 8 bytes) of the length-prefixed part
/// `part` at `at`: at least `min`, at most `max` (else an error naming the
/// part, before anything is sized by it), and within the file.
fn part_len(
    file: &File,
    part: Part,
    at: u64,
    file_len: u64,
    (min, max): (u64, u64),
) -> Result<u64, SnapshotError> {
    if at.saturating_add(8) > file_len {
        return Err(SnapshotError::Truncated {
            at: Place::new(part, at.min(file_len)),
            file_len,
        });
    }
    let mut first = [0u8; 8];
    read_at(file, &mut first, at, part)?;
    let len = u64::from_le_bytes(first);
    if len > max {
        return Err(SnapshotError::malformed(
            part,
            at,
            Problem::TooLarge { len, max },
        ));
    }
    if len < min {
        return Err(SnapshotError::malformed(
            part,
            at,
            Problem::Overflow("the part's length (under its length field and checksum)"),
        ));
    }
    if at + len > file_len {
        return Err(SnapshotError::Truncated {
            at: Place::new(part, at),
            file_len,
        });
    }
    Ok(len)
}

/// How [`read_summed`] reads a part.
#[derive(Clone, Copy)]
struct Summed {
    /// The xxh3-64 seed of the checksum the part ends in (of the bytes
    /// before it); `None`: read whole (a part bounded small).
    seed: Option<u64>,
    /// No valid part has a whole chunk of zero bytes (the vCPU part: its
    /// longest run of zeros is under a section's 64 KiB): such a chunk (a
    /// hole of a sparse file) is an error at once.
    no_zero_chunk: bool,
}

/// The bytes `start..end` of `file` (part `part`, within the file: checked
/// by the caller). With a seed, a part longer than a chunk has its
/// checksum streamed a chunk at a time before its bytes are kept: a part
/// that fails it (the hole of a sparse file claiming hundreds of
/// megabytes) costs a chunk of memory, not its claimed length. The parse
/// that follows checks the checksum again over the bytes kept.
fn read_summed(
    file: &File,
    part: Part,
    (start, end): (u64, u64),
    how: Summed,
) -> Result<Vec<u8>, SnapshotError> {
    let len = end - start;
    if let Some(seed) = how.seed.filter(|_| len > CHUNK as u64) {
        let mut h = xxhash_rust::xxh3::Xxh3::with_seed(seed);
        let mut buf = vec![0u8; CHUNK];
        let body_end = end - 8;
        let mut at = start;
        while at < body_end {
            let n = usize::try_from((body_end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            read_at(file, &mut buf[..n], at, part)?;
            if how.no_zero_chunk && n == CHUNK && buf.chunks_exact(8).all(|w| w == [0u8; 8]) {
                return Err(SnapshotError::malformed(
                    part,
                    at,
                    Problem::Hole { len: n as u64 },
                ));
            }
            h.update(&buf[..n]);
            at += n as u64;
        }
        let mut sum = [0u8; 8];
        read_at(file, &mut sum, body_end, part)?;
        let (found, computed) = (u64::from_le_bytes(sum), h.digest());
        if found != computed {
            return Err(SnapshotError::Checksum {
                at: Place::new(part, start),
                found,
                computed,
            });
        }
    }
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
    read_at(file, &mut bytes, start, part)?;
    Ok(bytes)
}

fn check_sum(part: Part, at: u64, bytes: &[u8], found: u64) -> Result<(), SnapshotError> {
    let computed = format::part_checksum(part, bytes);
    if computed == found {
        Ok(())
    } else {
        Err(SnapshotError::Checksum {
            at: Place::new(part, at),
            found,
            computed,
        })
    }
}
