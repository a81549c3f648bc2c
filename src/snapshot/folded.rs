//! Restoring folded: a VM restored from a snapshot (through its chain)
//! into a dedup host's domain with its pages already mapping the domain's
//! shared frames, copy-on-write, so N VMs restored from one snapshot (or
//! from several with content in common) hold each content once from the
//! first moment, with no copy and no merge pass.
//!
//! Two layouts ([`FoldLayout`]). Contents: each distinct content the
//! snapshot's pages name is looked up in the domain by its BLAKE3 address
//! (contents an earlier restore filled and a page still maps); the others
//! are read from their files, a `pread` per run of slots and checked
//! against their addresses as every read is, into one new run of shared
//! frames. Image: the snapshot's pages in page order in one run of frames,
//! found again by the snapshot's id, so a clone maps each region with one
//! remap. Zero pages stay holes. The dedup side (`dedup/fold_in.rs`) does
//! the rest under the host's scan lock.

use std::{collections::HashMap, sync::Arc};

use super::{
    error::{Part, Problem, SnapshotError},
    format::{content_hash, Hash},
    reader::{Located, SnapshotReader},
};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    dedup::{DedupError, DedupHost, VmId, VmOptions},
    frames::FrameError,
    memory::GuestMemory,
};

/// A VM restored folded: registered with the host, its memory ready for
/// the VMM's vCPUs and devices.
#[derive(Debug)]
pub struct FoldedRestore {
    /// The VM as the dedup host knows it.
    pub vm: VmId,
    /// Its memory (the host holds it too; [`DedupHost::unregister`] gives
    /// its pages their own frames back).
    pub memory: Arc<GuestMemory>,
    /// What the restore did.
    pub stats: FoldedStats,
}

/// What a folded restore did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldedStats {
    /// Pages of the layout.
    pub pages: u64,
    /// Zero pages (holes: no memory, nothing mapped).
    pub zero_pages: u64,
    /// Pages mapping a shared frame of the domain.
    pub shared_pages: u64,
    /// Pages with content copied into their own frame instead: the
    /// process's mapping budget could not pay for their runs, or their
    /// region is excluded from merging (a later merge pass may fold them).
    pub copied_pages: u64,
    /// Distinct contents the pages name.
    pub contents: u64,
    /// Of those, contents the domain held already (no read).
    pub contents_found: u64,
    /// Of those, contents read from the snapshot files into new frames
    /// (for a new image: its pages with content).
    pub contents_read: u64,
    /// Remaps made (one per run of pages onto consecutive frames).
    pub remaps: u64,
    /// Whether the pages map an image of the snapshot (see
    /// [`restore_folded`]) rather than a frame per distinct content.
    pub image: bool,
}

/// Clones of one snapshot [`FoldLayout::Auto`] plans the process's
/// mapping budget for: a snapshot new to the domain whose clone would
/// cost more than `budget / PLANNED_CLONES` mappings is mapped as an image.
pub const PLANNED_CLONES: u64 = 16;

/// How a folded restore lays out the frames its pages map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FoldLayout {
    /// [`Image`](Self::Image) where the domain has an image of the
    /// snapshot already; else [`Contents`](Self::Contents) where the
    /// domain holds every content and this clone's remaps (two mappings
    /// per run of pages onto consecutive frames) fit the process's mapping
    /// budget, or for a snapshot new to the domain where they fit it
    /// [`PLANNED_CLONES`] times; else an image.
    #[default]
    Auto,
    /// A frame per distinct content of the domain, shared with every
    /// snapshot that has it: the least memory, but each run of pages
    /// whose contents are not stored one after another costs a remap (a
    /// repeated content, one per page).
    Contents,
    /// The snapshot's pages in page order in a run of frames (its zero
    /// pages holes), shared by every clone of this snapshot: one remap per
    /// region, at the price of the snapshot's duplicate pages stored
    /// again (contents already in the domain are not looked up).
    Image,
}

/// Restores `snap` (with its ancestors attached) as a new VM of `host`, in
/// the domain and with the excluded regions of `options`, its pages
/// mapping the domain's shared frames from the start (see the module),
/// laid out as [`FoldLayout::Auto`] chooses. The memory lives in the
/// host's frame store, with the snapshot's layout.
///
/// On an error (a damaged page, a missing ancestor, the host's frame
/// store failing) nothing is registered, no content read by this restore
/// is kept, and the host is as it was. Shared frames are only ever shared
/// within one domain.
pub fn restore_folded(
    host: &DedupHost,
    options: VmOptions,
    snap: &SnapshotReader,
) -> Result<FoldedRestore, SnapshotError> {
    restore_folded_as(host, options, snap, FoldLayout::Auto)
}

/// [`restore_folded`] with the frames laid out as `fold_layout` says.
pub fn restore_folded_as(
    host: &DedupHost,
    options: VmOptions,
    snap: &SnapshotReader,
    fold_layout: FoldLayout,
) -> Result<FoldedRestore, SnapshotError> {
    let layout = snap.layout();
    // Checked before any content is read (registration checks it again).
    if let Some(&bad) = options
        .exclude
        .iter()
        .find(|a| !layout.regions().iter().any(|r| r.0 == **a))
    {
        return Err(DedupError::NoSuchRegion(bad).into());
    }
    let chain = chain(snap);
    // Each page's content, by index into the distinct contents.
    let mut index: HashMap<Hash, usize> = HashMap::new();
    let mut contents: Vec<(usize, u64)> = Vec::new();
    let mut pages: Vec<Vec<Option<usize>>> = Vec::with_capacity(layout.regions().len());
    let mut stats = FoldedStats {
        pages: layout.total(),
        ..FoldedStats::default()
    };
    for (i, &(_, size)) in layout.regions().iter().enumerate() {
        let first = layout.first_page(i);
        let n = usize::try_from(size / PAGE_SIZE as u64).unwrap_or(usize::MAX);
        // A page count a header claims: reserved fallibly, so a small file
        // claiming a huge guest is an error, never an aborted allocation.
        let mut region = Vec::new();
        region
            .try_reserve_exact(n)
            .map_err(|_| too_large(layout.total()))?;
        for k in 0..n as u64 {
            region.push(match snap.locate(first + k)? {
                Located::Zero => {
                    stats.zero_pages += 1;
                    None
                }
                Located::Stored { file, slot } => {
                    let depth = chain
                        .iter()
                        .position(|f| std::ptr::eq(*f, file))
                        .unwrap_or(0);
                    let hash = stored_hash(file, slot)?;
                    let next = contents.len();
                    let c = *index.entry(hash).or_insert(next);
                    if c == next {
                        contents.push((depth, slot));
                    }
                    Some(c)
                }
            });
        }
        pages.push(region);
    }
    drop(index);
    // Contents in file order, so a run of slots is one read.
    let mut order: Vec<usize> = (0..contents.len()).collect();
    order.sort_unstable_by_key(|&c| contents[c]);
    let sorted: Vec<(usize, u64)> = order.iter().map(|&c| contents[c]).collect();
    let addrs: Vec<Hash> = sorted
        .iter()
        .map(|&(d, slot)| stored_hash(chain[d], slot))
        .collect::<Result<_, _>>()?;
    let mut rank = vec![0usize; order.len()];
    for (r, &c) in order.iter().enumerate() {
        rank[c] = r;
    }
    stats.contents = sorted.len() as u64;

    // The mappings each clone would cost with a frame per distinct
    // content: a run per stretch of pages on consecutive frames (in rank
    // order, as new frames are allocated), two each.
    let runs: u64 = pages
        .iter()
        .map(|r| {
            let mut n = 0u64;
            let mut prev: Option<usize> = None;
            for c in r {
                let here = c.map(|c| rank[c]);
                if let Some(x) = here {
                    if prev.is_none_or(|p| p + 1 != x) {
                        n += 1;
                    }
                }
                prev = here;
            }
            n
        })
        .sum();
    let mut fold = host.fold_in(options.domain)?;
    let image = match fold_layout {
        FoldLayout::Contents => false,
        FoldLayout::Image => true,
        FoldLayout::Auto => {
            let budget = host.frame_store().map_budget();
            budget.refresh();
            let cost = 2 * runs;
            if fold.has_image(&snap.id().0) {
                // Clones of this snapshot map an image already.
                true
            } else if fold.held_contents(&addrs) == addrs.len() {
                // Its contents are all there: this clone maps them if it
                // can.
                cost > budget.left()
            } else {
                cost * PLANNED_CLONES > budget.left()
            }
        }
    };
    let page_frames: Vec<Vec<Option<FrameNumber>>> = if image {
        // Every page of the layout in order, zero pages as holes.
        let zero = content_hash(&[0u8; PAGE_SIZE]);
        let flat: Vec<Option<usize>> = pages.iter().flatten().copied().collect();
        let mut page_addrs: Vec<Hash> = Vec::new();
        page_addrs
            .try_reserve_exact(flat.len())
            .map_err(|_| too_large(layout.total()))?;
        page_addrs.extend(flat.iter().map(|c| match c {
            Some(c) => addrs[rank[*c]],
            None => zero,
        }));
        let (start, found) =
            fold.image_frames(&snap.id().0, &page_addrs, &zero, |first, dst: &mut [u8]| {
                let n = dst.len() / PAGE_SIZE;
                let list: Vec<(usize, u64)> = flat
                    .get(first..first + n)
                    .unwrap_or(&[])
                    .iter()
                    .filter_map(|c| c.map(|c| contents[c]))
                    .collect();
                fill(&chain, &list, dst)
            })?;
        stats.image = true;
        let nonzero = layout.total() - stats.zero_pages;
        if found {
            stats.contents_found = stats.contents;
        } else {
            stats.contents_read = nonzero;
        }
        let mut next = start.0;
        pages
            .iter()
            .map(|r| {
                r.iter()
                    .map(|_| {
                        next += 1;
                        Some(FrameNumber(next - 1))
                    })
                    .collect()
            })
            .collect()
    } else {
        let (frames, found) = fold.frames_for_contents(&addrs, |first, dst: &mut [u8]| {
            fill(&chain, &sorted[first..], dst)
        })?;
        stats.contents_found = found.found;
        stats.contents_read = found.filled;
        pages
            .iter()
            .map(|r| r.iter().map(|c| c.map(|c| frames[rank[c]])).collect())
            .collect()
    };
    drop(pages);
    let mem = GuestMemory::with_store(Arc::clone(host.frame_store()), layout.regions())?;
    let (vm, memory, installed) = fold.install(mem, options, &page_frames)?;
    stats.shared_pages = installed.shared_pages;
    stats.copied_pages = installed.copied_pages;
    stats.remaps = installed.remaps;
    Ok(FoldedRestore { vm, memory, stats })
}

/// A layout of `pages` pages whose bookkeeping does not fit this process.
fn too_large(pages: u64) -> SnapshotError {
    DedupError::Frames(FrameError::TooLarge { frames: pages }).into()
}

/// The snapshot and its attached ancestors, newest first.
fn chain(snap: &SnapshotReader) -> Vec<&SnapshotReader> {
    std::iter::successors(Some(snap), |s| s.parent()).collect()
}

fn stored_hash(file: &SnapshotReader, slot: u64) -> Result<Hash, SnapshotError> {
    usize::try_from(slot)
        .ok()
        .and_then(|s| file.stored_hashes().get(s))
        .copied()
        .ok_or(SnapshotError::malformed(
            Part::Content,
            0,
            Problem::Slot {
                depth: 0,
                slot,
                count: file.stored_pages(),
            },
        ))
}

/// Reads contents `list` (file by depth in `chain`, slot) into `dst`, a
/// `pread` per run of consecutive slots of one file, each page checked
/// against its address.
fn fill(
    chain: &[&SnapshotReader],
    list: &[(usize, u64)],
    dst: &mut [u8],
) -> Result<(), SnapshotError> {
    let n = dst.len() / PAGE_SIZE;
    let mut j = 0;
    while j < n {
        // `frames_for_contents` asks for contents of the list only.
        let Some(&(d, slot)) = list.get(j) else {
            return Err(SnapshotError::malformed(
                Part::Content,
                0,
                Problem::Slot {
                    depth: 0,
                    slot: j as u64,
                    count: list.len() as u64,
                },
            ));
        };
        let mut e = j + 1;
        while e < n && list.get(e) == Some(&(d, slot + (e - j) as u64)) {
            e += 1;
        }
        chain[d].read_slots(slot, &mut dst[j * PAGE_SIZE..e * PAGE_SIZE])?;
        j = e;
    }
    Ok(())
}
