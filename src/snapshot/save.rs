//! Saving a snapshot: full ([`save`]) or incremental against an open parent
//! ([`save_incremental`]). Pages are visited in address order; each
//! distinct content is written once (found by its BLAKE3 address), a
//! content an ancestor already stores is named, not written again, and the
//! map records every page. The file is written beside its final name and
//! renamed into place once synced (`file.rs`).

use std::{collections::HashMap, path::Path};

use super::{
    error::{Part, SnapshotError},
    file::NewFile,
    format::{self, Hash, Header, Parts},
    id::SnapshotId,
    layout::PageLayout,
    machine::{self, MachineState},
    map::{MapBuilder, PageSource},
    reader::SnapshotReader,
    scan::{Scanner, BATCH},
    table::{ContentTable, External},
    vcpu::{self, VcpuState},
    vm::VmState,
};
use rayon::prelude::*;

use crate::{
    addr::{is_zero_page, usize_from, GuestPhysAddr, PAGE_SHIFT, PAGE_SIZE},
    dirty::{DirtyRun, RegionSet},
    memory::GuestMemory,
};

/// How [`save`] works.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Turn dirty tracking on for every region and clear the dirty log
    /// before any page is read, so that from then on the log holds the
    /// pages written since this snapshot, for an incremental snapshot on
    /// top of it. On by default. The log has one reader: such a save is
    /// refused while a migration sender holds the memory
    /// ([`SnapshotError::LogInUse`]). A migration started after it takes
    /// pages from the log while it runs and puts every one back when it
    /// ends, so an incremental snapshot after a migration still holds
    /// every page written since this one.
    pub track_dirty: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { track_dirty: true }
    }
}

/// What a save wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveStats {
    /// The new snapshot's id.
    pub id: SnapshotId,
    /// Pages of the layout.
    pub pages: u64,
    /// Pages saved as zero (nothing stored).
    pub zero_pages: u64,
    /// Pages stored (distinct contents new to the chain).
    pub stored_pages: u64,
    /// Pages whose content this snapshot stores or names already.
    pub duplicate_pages: u64,
    /// Pages whose content an ancestor stores (named, not stored again).
    pub ancestor_pages: u64,
    /// Pages as in the parent (not dirty since).
    pub parent_pages: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
}

/// Provisional content numbers of ancestor contents while the stored count
/// is not known yet (they become `stored + i` at the end).
const ANCESTOR_BASE: u64 = 1 << 62;

/// A save in progress.
struct Saver {
    out: NewFile,
    layout: PageLayout,
    parent: SnapshotId,
    map: MapBuilder,
    table: ContentTable,
    /// Content address -> content number (provisional for ancestors').
    index: HashMap<Hash, u64>,
    /// Content address -> (depth, slot) in the ancestors.
    chain: HashMap<Hash, (u32, u64)>,
    stats: SaveStats,
}

impl Saver {
    fn new(
        layout: PageLayout,
        path: &Path,
        parent: Option<&SnapshotReader>,
    ) -> Result<Self, SnapshotError> {
        let mut out = NewFile::create(path)?;
        // The header is written last, over these zeros.
        let content = format::header_len(layout.regions().len() as u64)
            .and_then(|n| n.checked_next_multiple_of(PAGE_SIZE as u64))
            .unwrap_or(0);
        out.write(&vec![0u8; usize_from(content)], Part::Padding)?;
        let mut chain = HashMap::new();
        let mut anc = parent;
        let mut depth = 1u32;
        while let Some(a) = anc {
            for (slot, h) in a.stored_hashes().iter().enumerate() {
                chain.entry(*h).or_insert((depth, slot as u64));
            }
            anc = a.parent();
            depth += 1;
        }
        Ok(Saver {
            out,
            stats: SaveStats {
                id: SnapshotId::NONE,
                pages: layout.total(),
                zero_pages: 0,
                stored_pages: 0,
                duplicate_pages: 0,
                ancestor_pages: 0,
                parent_pages: 0,
                file_bytes: 0,
            },
            layout,
            parent: parent.map_or(SnapshotId::NONE, SnapshotReader::id),
            map: MapBuilder::default(),
            table: ContentTable::default(),
            index: HashMap::new(),
            chain,
        })
    }

    /// Scans and records pages `first..first + count` of region `region`.
    fn pages(
        &mut self,
        scan: &mut Scanner<'_>,
        region: usize,
        first: usize,
        count: usize,
    ) -> Result<(), SnapshotError> {
        let mut k = 0;
        while k < count {
            let n = BATCH.min(count - k);
            scan.scan(region, first + k, n)?;
            self.record(&scan.hashes[..n], &scan.buf)?;
            k += n;
        }
        Ok(())
    }

    /// Records a batch of pages in page order: per page `None` for zero,
    /// else its content address and its bytes at `buf[j * PAGE_SIZE..]`.
    fn record(&mut self, hashes: &[Option<Hash>], buf: &[u8]) -> Result<(), SnapshotError> {
        for (j, h) in hashes.iter().enumerate() {
            let Some(h) = *h else {
                self.map.push(PageSource::Zero, 1);
                self.stats.zero_pages += 1;
                continue;
            };
            let c = if let Some(&c) = self.index.get(&h) {
                self.stats.duplicate_pages += 1;
                c
            } else {
                let c = if let Some(&(depth, slot)) = self.chain.get(&h) {
                    self.stats.ancestor_pages += 1;
                    self.table.external.push(External {
                        hash: h,
                        depth,
                        slot,
                    });
                    ANCESTOR_BASE + self.table.external.len() as u64 - 1
                } else {
                    self.stats.stored_pages += 1;
                    self.out
                        .write(&buf[j * PAGE_SIZE..(j + 1) * PAGE_SIZE], Part::Content)?;
                    self.table.local.push(h);
                    self.table.local.len() as u64 - 1
                };
                self.index.insert(h, c);
                c
            };
            self.map.push(PageSource::Content(c), 1);
        }
        Ok(())
    }

    fn finish(mut self, machine: &MachineState<'_>) -> Result<SaveStats, SnapshotError> {
        let vcpus = machine.vcpus;
        let stored = self.table.local.len() as u64;
        let vcpu_count = u32::try_from(vcpus.len())
            .ok()
            .filter(|&n| n <= format::MAX_VCPUS)
            .ok_or(SnapshotError::malformed(
                Part::Header,
                20,
                super::error::Problem::TooManyVcpus {
                    count: u32::try_from(vcpus.len()).unwrap_or(u32::MAX),
                    max: format::MAX_VCPUS,
                },
            ))?;
        let vcpu_bytes = vcpu::encode_part(vcpus)?;
        let vm_bytes = machine.vm.map(VmState::encode_part).unwrap_or_default();
        let dev_bytes = match machine.device_state {
            Some(d) => {
                machine::check_device_state(d)?;
                machine::encode_device_part(d)
            }
            None => Vec::new(),
        };
        let tail_bytes = (vcpu_bytes.len() + vm_bytes.len() + dev_bytes.len()) as u64;
        let (map, runs) = self.map.finish(|n| {
            if n >= ANCESTOR_BASE {
                n - ANCESTOR_BASE + stored
            } else {
                n
            }
        });
        let table = self.table.encode();
        let parts = Parts::new(
            self.layout.regions().len() as u64,
            stored,
            runs,
            self.table.external.len() as u64,
            tail_bytes,
        )
        .ok_or(SnapshotError::malformed(
            Part::Header,
            0,
            super::error::Problem::Overflow("the file size"),
        ))?;
        self.out.write(&map, Part::Map)?;
        self.out.write(&table, Part::Table)?;
        self.out.write(&vcpu_bytes, Part::Vcpus)?;
        self.out.write(&vm_bytes, Part::VmState)?;
        self.out.write(&dev_bytes, Part::DeviceState)?;
        let mut header = Header {
            incremental: !self.parent.is_none(),
            id: SnapshotId::NONE,
            parent: self.parent,
            regions: self.layout.regions().to_vec(),
            total_pages: self.layout.total(),
            content_offset: parts.content,
            local_count: stored,
            map_offset: parts.map,
            run_count: runs,
            map_checksum: format::part_checksum(Part::Map, &map),
            table_offset: parts.table,
            external_count: self.table.external.len() as u64,
            table_checksum: format::part_checksum(Part::Table, &table),
            vcpu_count,
            vcpu_sections: vcpu_count > 0,
            vm_state: machine.vm.is_some(),
            device_state: machine.device_state.is_some(),
        };
        header.id = format::snapshot_id(
            &header.encode(),
            &map,
            &table,
            &[&vcpu_bytes, &vm_bytes, &dev_bytes],
        );
        debug_assert_eq!(self.out.pos(), parts.end);
        self.stats.id = header.id;
        self.stats.file_bytes = self.out.pos();
        self.out.finish(&header.encode())?;
        Ok(self.stats)
    }
}

/// Saves all of `mem` as a full snapshot at `path` (replacing a file there
/// only once the new one is complete and on disk).
///
/// Zero pages cost nothing; a released page that holds no data is zero
/// without being read. With [`SaveOptions::track_dirty`], dirty tracking is
/// on and the log empty before the first page is read, so a later
/// [`save_incremental`] on this snapshot gets every page written since,
/// even while vCPUs run during the save (a page written after it was read
/// is in the log; one written before is saved as written). A save that
/// fails puts back in the log what it took, so an incremental snapshot on
/// the snapshot before still gets every page written since that one.
pub fn save(
    mem: &GuestMemory,
    path: impl AsRef<Path>,
    opts: &SaveOptions,
) -> Result<SaveStats, SnapshotError> {
    save_with_vcpus(mem, path, opts, &[])
}

/// [`save`] with the states of the VM's vCPUs (stopped while the memory is
/// read, for a consistent image), in vCPU order: read back by
/// [`SnapshotReader::vcpus`]. A file with vCPU states does not open with a
/// pagefold build older than this part (its header flag is unknown there).
pub fn save_with_vcpus(
    mem: &GuestMemory,
    path: impl AsRef<Path>,
    opts: &SaveOptions,
    vcpus: &[VcpuState],
) -> Result<SaveStats, SnapshotError> {
    save_machine(
        mem,
        path,
        opts,
        &MachineState {
            vcpus,
            ..MachineState::default()
        },
    )
}

/// [`save`] with the whole machine's state beside the memory
/// ([`MachineState`]: the vCPUs' states, the VM-wide KVM state from
/// `KvmVm::vm_state`, the VMM's own device state), each taken with the
/// vCPUs stopped, for a consistent image. Read back by
/// [`SnapshotReader::vcpus`], [`SnapshotReader::vm_state`] and
/// [`SnapshotReader::device_state`]. A file with a VM or device-state part
/// does not open with a pagefold build older than that part (its header
/// flag is unknown there: a clean refusal naming the flags). A part no
/// reader would accept (a vCPU section over its bound, device state over
/// [`MAX_DEVICE_STATE`](super::MAX_DEVICE_STATE)) is refused before a page
/// is read.
pub fn save_machine(
    mem: &GuestMemory,
    path: impl AsRef<Path>,
    opts: &SaveOptions,
    machine: &MachineState<'_>,
) -> Result<SaveStats, SnapshotError> {
    // A state no reader would accept: refused before a page is read.
    check_machine(machine)?;
    // What the log held before this save: the writes since the snapshot
    // before, which an incremental on that one still needs if this save
    // fails.
    let mut taken = Vec::new();
    if opts.track_dirty {
        // The log has one reader at a time: a migration sender's rounds
        // would miss what this harvest takes.
        if !mem.claim_for_migration() {
            return Err(SnapshotError::LogInUse);
        }
        let cleared = mem
            .set_dirty_tracking(RegionSet::All, true)
            .and_then(|()| mem.take_dirty(RegionSet::All, &mut taken));
        mem.release_from_migration();
        if let Err(e) = cleared {
            remark(mem, &taken);
            return Err(e.into());
        }
    }
    let r = save_full(mem, path.as_ref(), machine);
    if r.is_err() {
        remark(mem, &taken);
    }
    r
}

/// Marks `runs` dirty again after a save that failed (best effort: the
/// runs came from this memory's own log).
fn remark(mem: &GuestMemory, runs: &[DirtyRun]) {
    for run in runs {
        let _ = mem.mark_dirty(run.start, run.pages);
    }
}

/// What [`save_machine`] checks before a page is read.
fn check_machine(machine: &MachineState<'_>) -> Result<(), SnapshotError> {
    vcpu::check_states(machine.vcpus)?;
    if let Some(d) = machine.device_state {
        machine::check_device_state(d)?;
    }
    Ok(())
}

fn save_full(
    mem: &GuestMemory,
    path: &Path,
    machine: &MachineState<'_>,
) -> Result<SaveStats, SnapshotError> {
    let mut s = Saver::new(PageLayout::of(mem), path, None)?;
    let mut scan = Scanner::new(mem);
    for (i, r) in mem.regions().iter().enumerate() {
        s.pages(&mut scan, i, 0, r.pages())?;
    }
    s.finish(machine)
}

/// Saves the pages of `mem` in `dirty` as an incremental snapshot on top of
/// `parent` at `path`; every other page is "as in the parent". A content
/// stored by the parent or an ancestor attached to it is named, not stored
/// again.
///
/// `dirty` must hold every page written since `parent` was saved: with
/// tracking on since that save ([`SaveOptions::track_dirty`]), the VMM
/// merges what the log cannot see (KVM's dirty bitmaps, a
/// [`RawWriteTracker`](crate::RawWriteTracker)) and harvests
/// ([`GuestMemory::harvest_dirty`]) right before this call; pages written
/// from the harvest on are in the next harvest. Dirty tracking must be on
/// for every region. On failure the runs are marked dirty again, so a
/// retry after a fresh harvest still has them. `path` must not be the file
/// of `parent` or of an ancestor attached to it
/// ([`SnapshotError::OverwritesAncestor`]). Refused while a migration
/// sender holds the log ([`SnapshotError::LogInUse`]): its rounds take
/// pages from the log, so a harvest made meanwhile lacks them (it puts
/// them back when it ends).
pub fn save_incremental(
    mem: &GuestMemory,
    parent: &SnapshotReader,
    dirty: &[DirtyRun],
    path: impl AsRef<Path>,
) -> Result<SaveStats, SnapshotError> {
    save_incremental_with_vcpus(mem, parent, dirty, path, &[])
}

/// [`save_incremental`] with the states of the VM's vCPUs: an incremental
/// snapshot carries its own (none are taken from the parent).
pub fn save_incremental_with_vcpus(
    mem: &GuestMemory,
    parent: &SnapshotReader,
    dirty: &[DirtyRun],
    path: impl AsRef<Path>,
    vcpus: &[VcpuState],
) -> Result<SaveStats, SnapshotError> {
    save_incremental_machine(
        mem,
        parent,
        dirty,
        path,
        &MachineState {
            vcpus,
            ..MachineState::default()
        },
    )
}

/// [`save_incremental`] with the whole machine's state
/// ([`save_machine`]'s): an incremental snapshot carries its own vCPU, VM
/// and device state (none is taken from the parent).
pub fn save_incremental_machine(
    mem: &GuestMemory,
    parent: &SnapshotReader,
    dirty: &[DirtyRun],
    path: impl AsRef<Path>,
    machine: &MachineState<'_>,
) -> Result<SaveStats, SnapshotError> {
    check_machine(machine)?;
    let r = save_incremental_inner(mem, parent, dirty, path.as_ref(), machine);
    if r.is_err() {
        // Best effort: a run outside the memory was the error itself.
        remark(mem, dirty);
    }
    r
}

/// Refuses a destination that is the file of `parent` or of an ancestor
/// attached to it: the rename would replace the snapshot the new one
/// builds on. A symbolic link there is replaced itself, not its target,
/// so it is not followed.
fn check_not_ancestor(parent: &SnapshotReader, path: &Path) -> Result<(), SnapshotError> {
    let Ok(dest) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let (mut anc, mut depth) = (Some(parent), 1u32);
    while let Some(a) = anc {
        if a.is_file(&dest) {
            return Err(SnapshotError::OverwritesAncestor {
                path: path.to_path_buf(),
                depth,
            });
        }
        anc = a.parent();
        depth = depth.saturating_add(1);
    }
    Ok(())
}

fn save_incremental_inner(
    mem: &GuestMemory,
    parent: &SnapshotReader,
    dirty: &[DirtyRun],
    path: &Path,
    machine: &MachineState<'_>,
) -> Result<SaveStats, SnapshotError> {
    check_not_ancestor(parent, path)?;
    // A migration sender's rounds take pages from the log: a harvest made
    // while it runs lacks them, and so would this snapshot.
    if !mem.claim_for_migration() {
        return Err(SnapshotError::LogInUse);
    }
    mem.release_from_migration();
    let layout = PageLayout::of(mem);
    if let Some(what) = layout.differs(parent.layout()) {
        return Err(SnapshotError::LayoutMismatch { what });
    }
    for i in 0..mem.regions().len() {
        if !mem.dirty_tracking(i)? {
            return Err(SnapshotError::NotTracking { region: i });
        }
    }
    // Per region, its dirty page ranges, sorted and joined.
    let mut ranges: Vec<Vec<(usize, usize)>> = vec![Vec::new(); mem.regions().len()];
    for run in dirty {
        let i = mem.find_region(run.start).ok_or(SnapshotError::DirtyRun {
            gpa: run.start,
            pages: run.pages,
        })?;
        let r = &mem.regions()[i];
        let first = (run.start.0 - r.start().0) >> PAGE_SHIFT;
        if run.pages > r.pages() as u64 - first {
            return Err(SnapshotError::DirtyRun {
                gpa: run.start,
                pages: run.pages,
            });
        }
        ranges[i].push((usize_from(first), usize_from(first + run.pages)));
    }
    let mut s = Saver::new(layout, path, Some(parent))?;
    let mut scan = Scanner::new(mem);
    for (i, r) in mem.regions().iter().enumerate() {
        let list = &mut ranges[i];
        list.sort_unstable();
        let mut at = 0usize;
        for &(a, b) in list.iter() {
            let a = a.max(at);
            if b <= a {
                continue;
            }
            if a > at {
                s.map.push(PageSource::Parent, (a - at) as u64);
                s.stats.parent_pages += (a - at) as u64;
            }
            s.pages(&mut scan, i, a, b - a)?;
            at = b;
        }
        let rest = r.pages() - at;
        if rest > 0 {
            s.map.push(PageSource::Parent, rest as u64);
            s.stats.parent_pages += rest as u64;
        }
    }
    s.finish(machine)
}

/// Saves pages that `read` supplies as a full snapshot with the layout
/// `regions` (checked, sorted) at `path`: `read(gpa, buf)` fills `buf`,
/// whole pages, with the memory from `gpa` (inside one region). Each
/// page's content address is computed here, in parallel; all-zero pages
/// are stored as zero.
pub(crate) fn save_from(
    regions: Vec<(GuestPhysAddr, u64)>,
    path: &Path,
    mut read: impl FnMut(GuestPhysAddr, &mut [u8]) -> Result<(), SnapshotError>,
) -> Result<SaveStats, SnapshotError> {
    let layout = PageLayout::new(regions);
    let mut s = Saver::new(layout.clone(), path, None)?;
    let mut buf = vec![0u8; BATCH * PAGE_SIZE];
    let mut hashes: Vec<Option<Hash>> = Vec::with_capacity(BATCH);
    for &(start, size) in layout.regions() {
        let pages = size >> PAGE_SHIFT;
        let mut k = 0u64;
        while k < pages {
            let n = usize_from((BATCH as u64).min(pages - k));
            let dst = &mut buf[..n * PAGE_SIZE];
            read(GuestPhysAddr(start.0 + (k << PAGE_SHIFT)), dst)?;
            dst.par_chunks(PAGE_SIZE)
                .map(|page| {
                    let zero = <&[u8; PAGE_SIZE]>::try_from(page).is_ok_and(is_zero_page);
                    (!zero).then(|| format::content_hash(page))
                })
                .collect_into_vec(&mut hashes);
            s.record(&hashes, dst)?;
            k += n as u64;
        }
    }
    s.finish(&MachineState::default())
}
