//! Restoring lazily and folded on arrival: a VM of a dedup host's domain
//! whose vCPUs start before its memory is read, each region mapping (one
//! remap, copy-on-write) an image of the snapshot's pages in the host's
//! frames that is filled as pages arrive. The first touch of a page (a
//! vCPU through KVM, a device, a raw pointer) faults into this restore's
//! userfaultfd (`lazy.rs`'s server); it writes the page into the image's
//! frame (not into the clone) and wakes the toucher, whose retried access
//! maps the frame. A fetch thread fills the rest, working set first. So
//! N clones restored from one snapshot, at once or one after another,
//! share every page from the moment it arrives: no private copies, no
//! merge pass, and a page arrives once for all of them.
//!
//! The image is not the host's shared frames until it is filled (an
//! unfilled frame reads as zeros, so no merge or restore may find it by
//! content, `dedup/arriving.rs`); until [`LazyFoldedRestore::wait`]
//! returns, the VM is registered but arriving: no pass scans it, and
//! unregistering or unmerging it is [`DedupError::Arriving`]. Once the
//! domain holds the whole image (a clone that arrived published it),
//! later clones are restored folded at once, with no fetch at all.
//!
//! Regions excluded from merging, and a region the mapping budget cannot
//! remap, are restored into their own frames, lazily as `restore_lazy`
//! does.
//!
//! [`DedupError::Arriving`]: crate::dedup::DedupError::Arriving

use std::sync::Arc;

use rayon::prelude::*;

use super::{
    error::SnapshotError,
    folded::{check_guest, stored_hash, too_large, DEFAULT_MAX_GUEST_BYTES},
    format::{content_hash, Hash},
    layout::PageLayout,
    lazy::{self, LazyError, LazyOptions, LazyRestore, LazyStats, Span},
    reader::{Located, SnapshotReader},
};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    dedup::{Arrival, DedupError, DedupHost, PageFrame, VmId, VmOptions},
    memory::GuestMemory,
    userfault::Userfault,
};

/// Pages whose addresses one task of rayon's pool looks up.
const LOCATE_CHUNK: usize = 8192;

/// How to restore lazily and folded on arrival.
#[derive(Clone, Debug)]
pub struct LazyFoldOptions {
    /// The lazy restore's working set, hooks and fetch delay.
    pub lazy: LazyOptions,
    /// The largest guest (all regions together, in bytes) to restore,
    /// checked against the snapshot's header before any work or memory
    /// per page.
    pub max_guest_bytes: u64,
}

impl Default for LazyFoldOptions {
    fn default() -> Self {
        LazyFoldOptions {
            lazy: LazyOptions::default(),
            max_guest_bytes: DEFAULT_MAX_GUEST_BYTES,
        }
    }
}

/// A VM restored lazily and folded on arrival (see the module).
#[derive(Debug)]
pub struct LazyFoldedRestore {
    /// The VM as the dedup host knows it: arriving until
    /// [`wait`](Self::wait) returns, an ordinary VM of the host after.
    pub vm: VmId,
    /// Its memory, ready for the VMM's vCPUs and devices now.
    pub memory: Arc<GuestMemory>,
    /// The restore in progress; none where the domain held the whole
    /// image already and nothing is left to arrive.
    lazy: Option<LazyRestore>,
    /// Then, the host's side: the VM is discarded if this is dropped
    /// before [`wait`](Self::wait), as any lazy folded restore is.
    arrival: Option<Arrival>,
    /// What a restore with nothing to fetch did.
    found: LazyStats,
}

impl LazyFoldedRestore {
    /// Pages present (or counted, for zero pages) so far.
    pub fn pages_done(&self) -> u64 {
        self.lazy
            .as_ref()
            .map_or(self.found.pages, LazyRestore::pages_done)
    }

    /// Waits until every page is there; the VM is then an ordinary VM of
    /// its host (the image the domain's shared frames, found by later
    /// restores and merge passes). On an error (a damaged page, poisoned
    /// in the clone) the VM is taken out of the host and its pages
    /// discarded: the memory must not run on.
    pub fn wait(self) -> Result<LazyStats, LazyError> {
        if let Some(lazy) = self.lazy {
            return lazy.wait();
        }
        if let Some(arrival) = self.arrival {
            arrival.arrived().map_err(SnapshotError::from)?;
        }
        Ok(self.found)
    }
}

/// Restores `snap` (with its ancestors attached) as a new VM of `host`, in
/// the domain and with the excluded regions of `options`, and returns once
/// its memory is mapped, before a page is read (see the module): the
/// guest may run. Every touch of a page not yet there waits in the kernel
/// until the page is in the image.
///
/// On an error nothing is registered and the host is as it was.
pub fn restore_folded_lazy(
    host: &DedupHost,
    options: VmOptions,
    snap: Arc<SnapshotReader>,
    fold: LazyFoldOptions,
) -> Result<LazyFoldedRestore, LazyError> {
    let reader = Arc::clone(&snap);
    let layout = reader.layout();
    check_guest(&snap, &options, fold.max_guest_bytes)?;
    // Before anything is registered: a kernel without missing faults on
    // shmem fails here.
    let uffd = Userfault::new_missing()?;
    let zero = content_hash(&[0u8; PAGE_SIZE]);
    let excluded: Vec<bool> = layout
        .regions()
        .iter()
        .map(|r| options.exclude.contains(&r.0))
        .collect();
    // The image holds the pages of the regions not excluded, in order:
    // where each region's first page is in it.
    let mut image_first: Vec<Option<u64>> = Vec::with_capacity(excluded.len());
    let mut on = 0u64;
    for (i, &(_, size)) in layout.regions().iter().enumerate() {
        image_first.push((!excluded[i]).then_some(on));
        on += if excluded[i] {
            0
        } else {
            size / PAGE_SIZE as u64
        };
    }
    // Bounded by the size limit, yet reserved fallibly: a limit the caller
    // set past this process's memory is an error, never an abort.
    let mut addrs: Vec<Hash> = Vec::new();
    let n = usize::try_from(on).map_err(|_| too_large(layout.total()))?;
    addrs
        .try_reserve_exact(n)
        .map_err(|_| too_large(layout.total()))?;
    addrs.resize(n, zero);
    // Each page's address, a stretch of a region per task of rayon's pool
    // (a binary search of the map per page: 20 ms for 1 GiB on one core,
    // on the way to the guest's first instruction).
    for (i, first) in image_first.iter().enumerate() {
        let Some(at) = *first else {
            continue;
        };
        let at_usize = usize::try_from(at).map_err(|_| too_large(layout.total()))?;
        let pages = layout.regions()[i].1 / PAGE_SIZE as u64;
        let region_first = layout.first_page(i);
        let dst = usize::try_from(pages)
            .ok()
            .and_then(|p| addrs.get_mut(at_usize..at_usize.checked_add(p)?))
            .ok_or_else(|| too_large(layout.total()))?;
        dst.par_chunks_mut(LOCATE_CHUNK)
            .enumerate()
            .try_for_each(|(c, chunk)| {
                let base = region_first + (c * LOCATE_CHUNK) as u64;
                snap.locate_each(base, chunk.len() as u64, |page, located| {
                    if let Located::Stored { file, slot } = located {
                        // `page` is `base + k` for `k` below the chunk's length.
                        if let Some(a) = usize::try_from(page - base)
                            .ok()
                            .and_then(|k| chunk.get_mut(k))
                        {
                            *a = stored_hash(file, slot)?;
                        }
                    }
                    Ok(())
                })
            })?;
    }
    if addrs.is_empty() {
        // Every region excluded: nothing to fold.
        return Err(
            SnapshotError::from(DedupError::Frames(crate::frames::FrameError::Empty)).into(),
        );
    }
    // Clones that exclude regions map an image of the other pages.
    let key = if excluded.contains(&true) {
        let mut h = blake3::Hasher::new_derive_key("pagefold lazy image excluding v1");
        h.update(&snap.id().0);
        for (r, _) in layout.regions().iter().zip(&excluded).filter(|(_, e)| **e) {
            h.update(&r.0 .0.to_le_bytes());
        }
        *h.finalize().as_bytes()
    } else {
        snap.id().0
    };
    let mut fold_in = host.fold_in(options.domain).map_err(SnapshotError::from)?;
    if let Some(start) = fold_in.whole_image(&key, &addrs) {
        // A clone arrived already: the image is all there, found (and
        // pinned) under the scan lock, mapped at once; only the regions
        // left off it (excluded, or past the mapping budget) arrive.
        let frames = page_frames(layout, start, &image_first, |g| addrs[g] == zero);
        let mem = GuestMemory::with_store(Arc::clone(host.frame_store()), layout.regions())
            .map_err(SnapshotError::from)?;
        let (arrival, memory, _installed, on_image) = fold_in
            .install_leaving_rest(mem, options, &frames, &key)
            .map_err(SnapshotError::from)?;
        let vm = arrival.vm();
        let mut outside = LazyStats {
            pages: layout.total(),
            ..LazyStats::default()
        };
        for (i, _) in on_image.iter().enumerate().filter(|(_, on)| **on) {
            let first = image_first[i].and_then(|f| usize::try_from(f).ok());
            let pages = memory.regions()[i].pages();
            let zeros = first
                .and_then(|f| addrs.get(f..f + pages))
                .unwrap_or(&[])
                .iter()
                .filter(|a| **a == zero)
                .count() as u64;
            outside.found += pages as u64 - zeros;
            outside.zero_pages += zeros;
            outside.zero_untouched += zeros;
        }
        if on_image.iter().all(|on| *on) {
            return Ok(LazyFoldedRestore {
                vm,
                memory,
                lazy: None,
                arrival: Some(arrival),
                found: outside,
            });
        }
        // The regions left off it arrive into their own frames; on an
        // error the arrival, dropped, takes the VM out again.
        let own = own_memory(&memory)?;
        let spans = spans(layout, &own, &on_image, &image_first, false);
        let lazy = lazy::start(snap, own, spans, uffd, Some(arrival), false, fold.lazy)?;
        return Ok(LazyFoldedRestore {
            vm,
            memory,
            lazy: Some(lazy.with_outside(outside)),
            arrival: None,
            found: LazyStats::default(),
        });
    }
    let image = fold_in
        .arriving_image(&key, addrs, &zero)
        .map_err(SnapshotError::from)?;
    let frames = page_frames(layout, image.start(), &image_first, |g| {
        image.is_zero(g as u64)
    });
    let mem = GuestMemory::with_store(Arc::clone(host.frame_store()), layout.regions())
        .map_err(SnapshotError::from)?;
    let (arrival, memory, _installed, on_image) = fold_in
        .install_arriving(mem, options, &frames, &key, image)
        .map_err(SnapshotError::from)?;
    drop(frames);
    let vm = arrival.vm();
    let own = own_memory(&memory)?;
    let spans = spans(layout, &own, &on_image, &image_first, true);
    let lazy = lazy::start(snap, own, spans, uffd, Some(arrival), false, fold.lazy)?;
    Ok(LazyFoldedRestore {
        vm,
        memory,
        lazy: Some(lazy),
        arrival: None,
        found: LazyStats::default(),
    })
}

/// The frames of an image starting at `start` that the pages of `layout`
/// map: page `k` of region `i` its frame `start + image_first[i] + k` (a
/// hole of the image where `is_zero` says so of that index), nothing
/// (its own frame, fresh) in a region not on the image.
fn page_frames(
    layout: &PageLayout,
    start: FrameNumber,
    image_first: &[Option<u64>],
    is_zero: impl Fn(usize) -> bool,
) -> Vec<Vec<PageFrame>> {
    layout
        .regions()
        .iter()
        .zip(image_first)
        .map(|(&(_, size), first)| {
            (0..size / PAGE_SIZE as u64)
                .map(|k| match first {
                    None => PageFrame::Hole,
                    Some(first) => {
                        let g = first + k;
                        let f = FrameNumber(start.0 + g);
                        if is_zero(usize::try_from(g).unwrap_or(usize::MAX)) {
                            PageFrame::ZeroIn(f)
                        } else {
                            PageFrame::Content(f)
                        }
                    }
                })
                .collect()
        })
        .collect()
}

/// A memory of `memory`'s regions, for the lazy restore to hold.
fn own_memory(memory: &GuestMemory) -> Result<GuestMemory, LazyError> {
    GuestMemory::from_regions(memory.regions().to_vec()).map_err(|e| {
        SnapshotError::LayoutMismatch {
            what: e.to_string(),
        }
        .into()
    })
}

/// The regions of `own` a lazy restore places: with an image arriving
/// (`arriving`), every region (those on the image filled into it, the
/// others copied in, and those the image was made for fed into it too,
/// since the other clones map it and it is published only once whole);
/// with the image there, only the regions left off it.
fn spans(
    layout: &PageLayout,
    own: &GuestMemory,
    on_image: &[bool],
    image_first: &[Option<u64>],
    arriving: bool,
) -> Vec<Span> {
    own.regions()
        .iter()
        .enumerate()
        .filter(|(i, _)| arriving || !on_image[*i])
        .map(|(i, r)| Span {
            first: layout.first_page(i),
            pages: r.pages() as u64,
            gpa: r.start(),
            on_image: arriving && on_image[i],
            feeds_image: arriving && !on_image[i] && image_first[i].is_some(),
            image_first: image_first[i].unwrap_or(0),
            _region: Arc::clone(r),
        })
        .collect()
}
