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

use super::{
    error::SnapshotError,
    folded::{
        restore_folded_with, stored_hash, too_large, FoldLayout, FoldOptions,
        DEFAULT_MAX_GUEST_BYTES,
    },
    format::{content_hash, Hash},
    lazy::{self, LazyError, LazyOptions, LazyRestore, LazyStats, Span},
    reader::{Located, SnapshotReader},
};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    dedup::{DedupError, DedupHost, PageFrame, VmId, VmOptions},
    memory::GuestMemory,
    userfault::Userfault,
};

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
    /// image already.
    lazy: Option<LazyRestore>,
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
        match self.lazy {
            Some(lazy) => lazy.wait(),
            None => Ok(self.found),
        }
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
    let layout = snap.layout();
    let bytes = layout
        .regions()
        .iter()
        .fold(0u64, |a, r| a.saturating_add(r.1));
    if bytes > fold.max_guest_bytes {
        return Err(SnapshotError::TooLarge {
            bytes,
            max: fold.max_guest_bytes,
        }
        .into());
    }
    if let Some(&bad) = options
        .exclude
        .iter()
        .find(|a| !layout.regions().iter().any(|r| r.0 == **a))
    {
        return Err(SnapshotError::from(DedupError::NoSuchRegion(bad)).into());
    }
    // Before anything is registered: a kernel without missing faults on
    // shmem fails here.
    let uffd = Userfault::new_missing()?;
    let zero = content_hash(&[0u8; PAGE_SIZE]);
    let excluded: Vec<bool> = layout
        .regions()
        .iter()
        .map(|r| options.exclude.contains(&r.0))
        .collect();
    // Bounded by the size limit, yet reserved fallibly: a limit the caller
    // set past this process's memory is an error, never an abort.
    let mut addrs: Vec<Hash> = Vec::new();
    usize::try_from(layout.total())
        .ok()
        .and_then(|n| addrs.try_reserve_exact(n).ok())
        .ok_or_else(|| too_large(layout.total()))?;
    for (i, &(_, size)) in layout.regions().iter().enumerate() {
        let first = layout.first_page(i);
        for p in first..first + size / PAGE_SIZE as u64 {
            // An excluded region's pages are its own: holes of the image.
            addrs.push(match snap.locate(p)? {
                _ if excluded[i] => zero,
                Located::Zero => zero,
                Located::Stored { file, slot } => stored_hash(file, slot)?,
            });
        }
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
    if !excluded.contains(&true) && fold_in.has_whole_image(&key, &addrs) {
        // A clone arrived already: everything is there.
        drop(fold_in);
        let with = FoldOptions {
            layout: FoldLayout::Image,
            planned_clones: None,
            max_guest_bytes: fold.max_guest_bytes,
        };
        let r = restore_folded_with(host, options, &snap, &with)?;
        let zero_pages = r.stats.zero_pages;
        return Ok(LazyFoldedRestore {
            vm: r.vm,
            memory: r.memory,
            lazy: None,
            found: LazyStats {
                pages: r.stats.pages,
                found: r.stats.pages - zero_pages,
                zero_pages,
                zero_untouched: zero_pages,
                ..LazyStats::default()
            },
        });
    }
    let image = fold_in
        .arriving_image(&key, addrs, &zero)
        .map_err(SnapshotError::from)?;
    let start = image.start();
    let mut frames: Vec<Vec<PageFrame>> = Vec::with_capacity(layout.regions().len());
    for (i, &(_, size)) in layout.regions().iter().enumerate() {
        let first = layout.first_page(i);
        let n = size / PAGE_SIZE as u64;
        frames.push(
            (first..first + n)
                .map(|g| {
                    let f = FrameNumber(start.0 + g);
                    if image.is_zero(g) {
                        PageFrame::ZeroIn(f)
                    } else {
                        PageFrame::Content(f)
                    }
                })
                .collect(),
        );
    }
    let mem = GuestMemory::with_store(Arc::clone(host.frame_store()), layout.regions())
        .map_err(SnapshotError::from)?;
    let (arrival, memory, _installed, on_image) = fold_in
        .install_arriving(mem, options, &frames, &key, image)
        .map_err(SnapshotError::from)?;
    drop(frames);
    let vm = arrival.vm();
    let own = GuestMemory::from_regions(memory.regions().to_vec()).map_err(|e| {
        SnapshotError::LayoutMismatch {
            what: e.to_string(),
        }
    })?;
    let spans = own
        .regions()
        .iter()
        .zip(on_image)
        .enumerate()
        .map(|(i, (r, on_image))| Span {
            first: layout.first_page(i),
            pages: r.pages() as u64,
            gpa: r.start(),
            on_image,
            // A region the mapping budget could not remap: its pages are
            // copied in, and filled into the image too, which the other
            // clones map and which is published only once whole.
            feeds_image: !on_image && !excluded[i],
            _region: Arc::clone(r),
        })
        .collect();
    let lazy = lazy::start(snap, own, spans, uffd, Some(arrival), fold.lazy)?;
    Ok(LazyFoldedRestore {
        vm,
        memory,
        lazy: Some(lazy),
        found: LazyStats::default(),
    })
}
