//! Snapshots of other VMMs as input: Firecracker's guest memory file and
//! cloud-hypervisor's snapshot directory, opened as a [`ForeignMemory`]: a
//! region layout and where each range of it lies in one file, checked whole
//! at open (aligned, non-overlapping ranges; a file exactly as long as the
//! ranges), its pages read on demand.
//!
//! - Firecracker (`SnapshotType::Full`): `mem_file_path` holds the guest's
//!   memory regions one after another, in the order of the vmstate file's
//!   `GuestMemoryState` (address order). The vmstate file is not parsed:
//!   the caller gives the layout, or [`FirecrackerArch::regions`] computes
//!   Firecracker's default one from the memory size (the file's length). A
//!   `Diff` snapshot's file has the same layout, sparse: its holes (found
//!   with `SEEK_DATA`, never read) read as zero pages. A diff holds only
//!   the pages written since the snapshot before it, so it is the guest's
//!   memory only once merged onto its base (as Firecracker's `rebase-snap`
//!   does); opened alone, every page it does not hold is zero.
//! - cloud-hypervisor: `memory-ranges` holds the bytes of the memory
//!   manager's ranges one after another, in the order `state.json` lists
//!   them (`snapshots["memory-manager"].snapshot_data.state`, itself JSON,
//!   with `memory_ranges.data: [{gpa, length}]`; before that format, a
//!   `memory-manager-section` whose `snapshot` is the JSON's bytes). The
//!   layout is the ranges in address order, adjacent ones joined. Both
//!   files must be regular files in the directory, not links out of it.
//!
//! Restoring: [`restore_foreign_into`] copies into a memory of the layout
//! (zero pages released, never written), and [`ForeignMemory::save_as`]
//! converts to a pagefold snapshot (each page's BLAKE3 computed as it is
//! read), which [`restore_folded`](super::restore_folded) and
//! [`restore_into`](super::restore_into) take like any other.

use std::{
    fs::File,
    io::{self, Read},
    os::unix::{fs::FileExt, io::AsRawFd},
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{
    error::{ForeignProblem, SnapshotError},
    file::open_regular,
    layout::PageLayout,
    restore::{release_zeros, RestoreStats},
    save::{save_from, SaveStats},
    scan::BATCH,
};
use crate::{
    addr::{is_zero_page, GuestPhysAddr, PAGE_SIZE},
    memory::{validate_layout, GuestMemory},
};

const PAGE: u64 = PAGE_SIZE as u64;
const GIB: u64 = 1 << 30;
/// The largest `state.json` read: it is read and parsed whole, and
/// cloud-hypervisor's are kilobytes to a few megabytes (device and vCPU
/// states).
const STATE_MAX: u64 = 256 << 20;

/// The file of a cloud-hypervisor snapshot directory holding the memory.
pub const CLOUD_HYPERVISOR_MEMORY: &str = "memory-ranges";
/// The file of a cloud-hypervisor snapshot directory holding the VM state.
pub const CLOUD_HYPERVISOR_STATE: &str = "state.json";

/// Firecracker's default guest memory layouts
/// (`arch::<arch>::arch_memory_regions`): where a guest of a given memory
/// size has its RAM, hence how its memory file maps to addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirecrackerArch {
    /// x86_64, current releases: RAM from 0, around the 1 GiB MMIO gap
    /// below 4 GiB (from 3 GiB) and the 256 GiB 64-bit MMIO gap at 256 GiB.
    X86_64,
    /// x86_64, releases before the 64-bit MMIO gap: RAM from 0, around the
    /// 768 MiB gap below 4 GiB (from 3.25 GiB).
    X86_64Legacy,
    /// aarch64: one region from 2 GiB (`DRAM_MEM_START`).
    Aarch64,
}

impl FirecrackerArch {
    /// The regions of a guest with `mem_bytes` of memory, in address (and
    /// memory file) order.
    pub fn regions(self, mem_bytes: u64) -> Vec<(GuestPhysAddr, u64)> {
        match self {
            FirecrackerArch::X86_64 => {
                around_gaps(mem_bytes, &[(3 * GIB, GIB), (256 * GIB, 256 * GIB)])
            }
            FirecrackerArch::X86_64Legacy => {
                around_gaps(mem_bytes, &[((4 * GIB) - (768 << 20), 768 << 20)])
            }
            FirecrackerArch::Aarch64 => vec![(GuestPhysAddr(2 * GIB), mem_bytes)],
        }
    }
}

/// `size` bytes of RAM from address 0, skipping the `(start, size)` gaps
/// (sorted), as Firecracker's `arch_memory_regions_with_gap` lays them.
fn around_gaps(size: u64, gaps: &[(u64, u64)]) -> Vec<(GuestPhysAddr, u64)> {
    let mut out = Vec::new();
    let (mut at, mut left) = (0u64, size);
    for &(start, len) in gaps {
        if left == 0 {
            break;
        }
        if at.saturating_add(left) <= start {
            break;
        }
        if at < start {
            out.push((GuestPhysAddr(at), start - at));
            left -= start - at;
        }
        at = at.max(start.saturating_add(len));
    }
    if left > 0 {
        out.push((GuestPhysAddr(at), left));
    }
    out
}

/// Which VMM wrote a [`ForeignMemory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForeignKind {
    /// A Firecracker guest memory file.
    Firecracker,
    /// A cloud-hypervisor snapshot directory's `memory-ranges`.
    CloudHypervisor,
}

/// One range of guest memory and where its bytes are in the file.
#[derive(Clone, Copy, Debug)]
struct Range {
    gpa: u64,
    len: u64,
    offset: u64,
}

/// Another VMM's snapshot memory, open and checked.
#[derive(Debug)]
pub struct ForeignMemory {
    kind: ForeignKind,
    path: PathBuf,
    file: File,
    /// Bytes the ranges need: the file's length when opened.
    len: u64,
    /// Sorted by address.
    ranges: Vec<Range>,
    /// The layout: the ranges in address order, adjacent ones joined.
    regions: Vec<(GuestPhysAddr, u64)>,
    /// What the holes of a diff file hold ([`ForeignMemory::over_base`]).
    base: Option<Box<ForeignMemory>>,
}

impl ForeignMemory {
    /// Opens Firecracker's guest memory file `mem_file` holding `regions`
    /// (the vmstate file's regions, in its order: each region's bytes
    /// follow the one before's in the file).
    pub fn firecracker(
        mem_file: impl AsRef<Path>,
        regions: &[(GuestPhysAddr, u64)],
    ) -> Result<Self, SnapshotError> {
        let path = mem_file.as_ref();
        validate_layout(regions, PAGE)
            .map_err(|e| foreign(path, "regions", ForeignProblem::Layout(e)))?;
        let list: Vec<(u64, u64)> = regions.iter().map(|&(s, n)| (s.0, n)).collect();
        Self::open(ForeignKind::Firecracker, path, path, "regions", &list)
    }

    /// Opens Firecracker's guest memory file `mem_file` with `arch`'s
    /// default layout for a guest whose memory size is the file's length.
    pub fn firecracker_default(
        mem_file: impl AsRef<Path>,
        arch: FirecrackerArch,
    ) -> Result<Self, SnapshotError> {
        let path = mem_file.as_ref();
        let len = std::fs::metadata(path)
            .map_err(|source| SnapshotError::File {
                op: "open",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if len % PAGE != 0 {
            return Err(foreign(
                path,
                "length",
                ForeignProblem::Unaligned { value: len },
            ));
        }
        if len == 0 {
            return Err(foreign(path, "length", ForeignProblem::NoRanges));
        }
        Self::firecracker(path, &arch.regions(len))
    }

    /// Opens the cloud-hypervisor snapshot directory `dir`: the ranges of
    /// its `state.json`, their bytes in its `memory-ranges`. Both must be
    /// regular files in `dir`, not symbolic links (`dir` itself may be
    /// one): a link could make the restore read any file this process can.
    pub fn cloud_hypervisor(dir: impl AsRef<Path>) -> Result<Self, SnapshotError> {
        let dir = dir.as_ref();
        let state = dir.join(CLOUD_HYPERVISOR_STATE);
        let read_err = |source| SnapshotError::File {
            op: "read",
            path: state.clone(),
            source,
        };
        let file = open_file(&state, "read", true)?;
        let len = file.metadata().map_err(read_err)?.len();
        if len > STATE_MAX {
            return Err(foreign(
                &state,
                "length",
                ForeignProblem::TooLarge {
                    len,
                    max: STATE_MAX,
                },
            ));
        }
        let mut text = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        // Bounded also if the file grows while it is read.
        file.take(STATE_MAX + 1)
            .read_to_end(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > STATE_MAX {
            return Err(foreign(
                &state,
                "length",
                ForeignProblem::TooLarge {
                    len: text.len() as u64,
                    max: STATE_MAX,
                },
            ));
        }
        let (field, list) = cloud_hypervisor_ranges(&state, &text)?;
        Self::open(
            ForeignKind::CloudHypervisor,
            &dir.join(CLOUD_HYPERVISOR_MEMORY),
            &state,
            &field,
            &list,
        )
    }

    /// Checks `list` (`(gpa, length)` in file order; `field` of
    /// `layout_path` names it in errors) and opens `path`, which must be
    /// exactly as long as the ranges.
    fn open(
        kind: ForeignKind,
        path: &Path,
        layout_path: &Path,
        field: &str,
        list: &[(u64, u64)],
    ) -> Result<Self, SnapshotError> {
        let bad = |i: usize, what: &str, problem| {
            foreign(layout_path, &format!("{field}[{i}].{what}"), problem)
        };
        if list.is_empty() {
            return Err(foreign(layout_path, field, ForeignProblem::NoRanges));
        }
        let mut ranges = Vec::with_capacity(list.len());
        let mut offset = 0u64;
        for (i, &(gpa, len)) in list.iter().enumerate() {
            if gpa % PAGE != 0 {
                return Err(bad(i, "gpa", ForeignProblem::Unaligned { value: gpa }));
            }
            if len % PAGE != 0 {
                return Err(bad(i, "length", ForeignProblem::Unaligned { value: len }));
            }
            if len == 0 {
                return Err(bad(
                    i,
                    "length",
                    ForeignProblem::EmptyRange {
                        gpa: GuestPhysAddr(gpa),
                    },
                ));
            }
            if gpa.checked_add(len).is_none() {
                return Err(bad(i, "length", ForeignProblem::Overflow));
            }
            ranges.push(Range { gpa, len, offset });
            offset = offset
                .checked_add(len)
                .ok_or(bad(i, "length", ForeignProblem::Overflow))?;
        }
        ranges.sort_by_key(|r| r.gpa);
        for w in ranges.windows(2) {
            if w[1].gpa < w[0].gpa + w[0].len {
                let i = list.iter().position(|&(g, _)| g == w[1].gpa).unwrap_or(0);
                return Err(bad(
                    i,
                    "gpa",
                    ForeignProblem::Overlap {
                        gpa: GuestPhysAddr(w[1].gpa),
                        length: w[1].len,
                        other: GuestPhysAddr(w[0].gpa),
                    },
                ));
            }
        }
        let mut regions: Vec<(GuestPhysAddr, u64)> = Vec::new();
        for r in &ranges {
            match regions.last_mut() {
                Some((s, n)) if s.0 + *n == r.gpa => *n += r.len,
                _ => regions.push((GuestPhysAddr(r.gpa), r.len)),
            }
        }
        let file = open_file(path, "open", kind == ForeignKind::CloudHypervisor)?;
        let found = file
            .metadata()
            .map_err(|source| SnapshotError::File {
                op: "find the length of",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if found != offset {
            return Err(foreign(
                path,
                "length",
                ForeignProblem::Length {
                    expected: offset,
                    found,
                },
            ));
        }
        Ok(ForeignMemory {
            kind,
            path: path.to_path_buf(),
            file,
            len: offset,
            ranges,
            regions,
            base: None,
        })
    }

    /// Layers this Firecracker diff file over `base`, the memory of the
    /// snapshot it was taken after (a full one, or a diff over its own
    /// base): the diff's holes, the pages not written since, read from
    /// `base`, as Firecracker's `rebase-snap` merges them. The two must
    /// have one layout, range for range in the same file order. Holes are
    /// found with `SEEK_DATA`/`SEEK_HOLE`, so the diff must be on a file
    /// system that keeps them (ext4, xfs, btrfs, tmpfs do).
    pub fn over_base(mut self, base: ForeignMemory) -> Result<Self, SnapshotError> {
        let same = self.len == base.len
            && self.ranges.len() == base.ranges.len()
            && self
                .ranges
                .iter()
                .zip(&base.ranges)
                .all(|(a, b)| (a.gpa, a.len, a.offset) == (b.gpa, b.len, b.offset));
        if !same {
            let show = |m: &ForeignMemory| {
                m.ranges
                    .iter()
                    .map(|r| format!("[{:#x}, +{:#x}) at byte {}", r.gpa, r.len, r.offset))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            return Err(SnapshotError::LayoutMismatch {
                what: format!("diff {} against base {}", show(&self), show(&base)),
            });
        }
        self.base = Some(Box::new(base));
        Ok(self)
    }

    /// Which VMM's format this is.
    pub fn kind(&self) -> ForeignKind {
        self.kind
    }

    /// The file holding the memory's bytes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(start, size)` of each region, in address order: the layout to make
    /// a [`GuestMemory`] to restore into.
    pub fn region_layout(&self) -> Vec<(GuestPhysAddr, u64)> {
        self.regions.clone()
    }

    /// Pages of the layout.
    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }

    /// Reads `buf.len()` bytes of guest memory from `gpa`: every byte must
    /// be in the layout. Holes of a sparse file are zeros, not read.
    pub fn read(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa.0.saturating_add(done as u64);
            let i = self.ranges.partition_point(|r| r.gpa <= at).checked_sub(1);
            let r = i
                .and_then(|i| self.ranges.get(i))
                .filter(|r| at - r.gpa < r.len)
                .ok_or(SnapshotError::PageNotInLayout {
                    gpa: GuestPhysAddr(at),
                })?;
            let off = at - r.gpa;
            let n = usize::try_from(r.len - off)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            self.read_at(r.offset + off, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Reads the page at `gpa` (page-aligned).
    pub fn read_page(
        &self,
        gpa: GuestPhysAddr,
        out: &mut [u8; PAGE_SIZE],
    ) -> Result<(), SnapshotError> {
        if gpa.0 % PAGE != 0 {
            return Err(SnapshotError::PageNotInLayout { gpa });
        }
        self.read(gpa, out)
    }

    /// Writes this memory as a full pagefold snapshot at `path` (replacing
    /// a file there only once the new one is complete): each distinct
    /// content stored once under its BLAKE3 address, zero pages and holes
    /// stored as nothing. Open it with
    /// [`SnapshotReader::open`](super::SnapshotReader::open) to restore by
    /// copy or folded.
    pub fn save_as(&self, path: impl AsRef<Path>) -> Result<SaveStats, SnapshotError> {
        save_from(self.regions.clone(), path.as_ref(), |gpa, buf| {
            self.read(gpa, buf)
        })
    }

    /// Reads `dst.len()` bytes at `offset` of the file: its data by
    /// `pread`, its holes (`SEEK_DATA`/`SEEK_HOLE`) from the base where one
    /// is attached, else as zeros, unread. A file cut since it was opened
    /// is an error, never zeros.
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<(), SnapshotError> {
        let end = offset.saturating_add(dst.len() as u64);
        let found = self
            .file
            .metadata()
            .map_err(|source| SnapshotError::File {
                op: "find the length of",
                path: self.path.clone(),
                source,
            })?
            .len();
        if found < end {
            return Err(foreign(
                &self.path,
                "length",
                ForeignProblem::Length {
                    expected: self.len,
                    found,
                },
            ));
        }
        let mut at = offset;
        while at < end {
            let i = usize::try_from(at - offset).unwrap_or(0);
            let data = self.seek(at, libc::SEEK_DATA).unwrap_or(end).min(end);
            if data > at {
                let j = usize::try_from(data - offset).unwrap_or(dst.len());
                match &self.base {
                    Some(b) => b.read_at(at, &mut dst[i..j])?,
                    None => dst[i..j].fill(0),
                }
                at = data;
                continue;
            }
            // Data from `at` to the next hole (all of it where the file
            // system cannot say).
            let hole = self.seek(at, libc::SEEK_HOLE).unwrap_or(end).min(end);
            let hole = if hole > at { hole } else { end };
            let j = usize::try_from(hole - offset).unwrap_or(dst.len());
            self.file
                .read_exact_at(&mut dst[i..j], at)
                .map_err(|source| {
                    if source.kind() == io::ErrorKind::UnexpectedEof {
                        foreign(
                            &self.path,
                            "length",
                            ForeignProblem::Length {
                                expected: self.len,
                                found: self.file.metadata().map_or(0, |m| m.len()),
                            },
                        )
                    } else {
                        SnapshotError::File {
                            op: "read",
                            path: self.path.clone(),
                            source,
                        }
                    }
                })?;
            at = hole;
        }
        Ok(())
    }

    /// `lseek(at, whence)` for `SEEK_DATA` or `SEEK_HOLE`: the offset of
    /// the next data or hole at or after `at`; `None` where there is none
    /// (`ENXIO`: only holes from `at` on, for `SEEK_DATA`). A file system
    /// that cannot say answers as if the whole file were data; any other
    /// error is taken the same way (the bytes are then read).
    fn seek(&self, at: u64, whence: libc::c_int) -> Option<u64> {
        let Ok(off) = libc::off_t::try_from(at) else {
            return Some(at);
        };
        // SAFETY: lseek on a descriptor this struct owns and keeps open;
        // it touches no memory. The file position it moves is not used
        // (every read is a pread at an offset).
        let next = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if next < 0 {
            let enxio = io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            return if enxio && whence == libc::SEEK_DATA {
                None
            } else {
                Some(at)
            };
        }
        u64::try_from(next).ok()
    }
}

/// Restores `src` into `mem` by copy; `mem`'s layout must be
/// [`ForeignMemory::region_layout`]. Zero pages (and holes) are released
/// in `mem`, never written. On an error the memory is partly restored and
/// must be discarded.
pub fn restore_foreign_into(
    src: &ForeignMemory,
    mem: &GuestMemory,
) -> Result<RestoreStats, SnapshotError> {
    let layout = PageLayout::new(src.region_layout());
    if let Some(what) = layout.differs(&PageLayout::of(mem)) {
        return Err(SnapshotError::LayoutMismatch { what });
    }
    let mut stats = RestoreStats {
        pages: layout.total(),
        ..RestoreStats::default()
    };
    let mut buf = vec![0u8; BATCH * PAGE_SIZE];
    for &(start, size) in layout.regions() {
        let pages = size / PAGE;
        let mut k = 0u64;
        while k < pages {
            let n = usize::try_from((BATCH as u64).min(pages - k)).unwrap_or(BATCH);
            let base = start.0 + k * PAGE;
            let dst = &mut buf[..n * PAGE_SIZE];
            src.read(GuestPhysAddr(base), dst)?;
            let zero: Vec<bool> = dst
                .chunks_exact(PAGE_SIZE)
                .map(|p| <&[u8; PAGE_SIZE]>::try_from(p).is_ok_and(is_zero_page))
                .collect();
            let mut j = 0usize;
            while j < n {
                let e = (j..n).find(|&e| zero[e] != zero[j]).unwrap_or(n);
                let gpa = GuestPhysAddr(base + j as u64 * PAGE);
                if zero[j] {
                    release_zeros(mem, gpa, (e - j) as u64)?;
                    stats.zero_pages += (e - j) as u64;
                } else {
                    mem.write(gpa, &dst[j * PAGE_SIZE..e * PAGE_SIZE])?;
                    stats.copied_pages += (e - j) as u64;
                }
                j = e;
            }
            k += n as u64;
        }
    }
    Ok(stats)
}

/// Opens `path` for reading: a regular file only (a FIFO would block the
/// open, a device read without end). `op` names what failed in an error
/// of the open. With `in_dir` (a file a snapshot directory holds, named by
/// this module, not by the caller) a symbolic link is refused: whoever
/// wrote the directory could point it at any file this process may read.
fn open_file(path: &Path, op: &'static str, in_dir: bool) -> Result<File, SnapshotError> {
    open_regular(path, in_dir).map_err(|e| match e {
        Some(source) if in_dir && source.raw_os_error() == Some(libc::ELOOP) => {
            foreign(path, "(file)", ForeignProblem::Symlink)
        }
        Some(source) => SnapshotError::File {
            op,
            path: path.to_path_buf(),
            source,
        },
        None => foreign(path, "(file)", ForeignProblem::NotAFile),
    })
}

fn foreign(path: &Path, field: &str, problem: ForeignProblem) -> SnapshotError {
    SnapshotError::Foreign {
        path: path.to_path_buf(),
        field: field.to_string(),
        problem,
    }
}

/// The memory manager's ranges in `state.json` (at `path`, bytes `text`),
/// in file order, and the field that lists them.
fn cloud_hypervisor_ranges(
    path: &Path,
    text: &[u8],
) -> Result<(String, Vec<(u64, u64)>), SnapshotError> {
    let bad = |field: &str, problem| foreign(path, field, problem);
    let json = |field: &str, e: serde_json::Error| bad(field, ForeignProblem::Json(e.to_string()));
    let root: Value = serde_json::from_slice(text).map_err(|e| json("(file)", e))?;
    let get = |v: &Value, field: &str, key: &str| -> Result<Value, SnapshotError> {
        match v.get(key) {
            Some(x) if !x.is_null() => Ok(x.clone()),
            _ => Err(bad(field, ForeignProblem::Missing)),
        }
    };
    let mm = get(
        &get(&root, "snapshots", "snapshots")?,
        "snapshots.memory-manager",
        "memory-manager",
    )?;
    let data_field = "snapshots.memory-manager.snapshot_data";
    let data = get(&mm, data_field, "snapshot_data")?;
    let (field, state) = if data.get("state").is_some() {
        let f = format!("{data_field}.state");
        let s = get(&data, &f, "state")?;
        let s = s
            .as_str()
            .ok_or(bad(&f, ForeignProblem::Type("a string")))?;
        let state: Value = serde_json::from_str(s).map_err(|e| json(&f, e))?;
        (f, state)
    } else if data.get("memory-manager-section").is_some() {
        // Releases before `SnapshotData { state }`: a section whose
        // `snapshot` is the state's JSON as an array of bytes.
        let f = format!("{data_field}.memory-manager-section.snapshot");
        let sec = get(&data, &f, "memory-manager-section")?;
        let bytes: Option<Vec<u8>> = get(&sec, &f, "snapshot")?.as_array().and_then(|a| {
            a.iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect()
        });
        let bytes = bytes.ok_or(bad(&f, ForeignProblem::Type("an array of bytes")))?;
        let state: Value = serde_json::from_slice(&bytes).map_err(|e| json(&f, e))?;
        (f, state)
    } else {
        return Err(bad(&format!("{data_field}.state"), ForeignProblem::Missing));
    };
    let f = format!("{field}: memory_ranges.data");
    let ranges = get(
        &get(&state, &format!("{field}: memory_ranges"), "memory_ranges")?,
        &f,
        "data",
    )?;
    let ranges = ranges
        .as_array()
        .ok_or(bad(&f, ForeignProblem::Type("an array")))?;
    let mut list = Vec::with_capacity(ranges.len());
    for (i, r) in ranges.iter().enumerate() {
        let num = |key: &str| -> Result<u64, SnapshotError> {
            let f = format!("{f}[{i}].{key}");
            get(r, &f, key)?
                .as_u64()
                .ok_or(bad(&f, ForeignProblem::Type("an unsigned integer")))
        };
        list.push((num("gpa")?, num("length")?));
    }
    Ok((f, list))
}
