//! Images that arrive: the frames of a snapshot's image that clones map
//! before the image is filled (a lazy restore folded on arrival). An
//! [`ArrivingImage`] is a run of the host's frames, reserved but not yet
//! shared frames of the host: not in the content index (no merge or
//! restore finds them, since an unfilled frame reads as zeros), never
//! freed by a recount. Pages are filled into it as they arrive (a clone's
//! first touch, a fetch thread), each hashed with the domain's key as it
//! is written. Once every page with content is there, the first clone to
//! arrive publishes it ([`ArrivingImage::publish`]): its frames become the
//! domain's shared frames and the image is found by its name, as an image
//! a folded restore fills. One never published is freed with its last
//! holder.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use super::{
    error::DedupError,
    key::DomainKey,
    options::DomainId,
    shared::{Address, SharedFrames},
};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    frames::{FrameError, FrameRange, FrameStore},
};

/// A snapshot's image being filled while clones already map it (see the
/// module).
pub(crate) struct ArrivingImage {
    store: Arc<FrameStore>,
    key: Arc<DomainKey>,
    domain: DomainId,
    /// The image's name (a snapshot's id).
    name: Address,
    frames: FrameRange,
    /// Each page's content address; zero pages have `zero`.
    addrs: Vec<Address>,
    zero: Address,
    /// Keyed hash of each filled page (zero pages: the zero hash).
    hashes: Vec<AtomicU64>,
    /// A bit per page: filled.
    filled: Vec<AtomicU64>,
    /// Pages with content still to fill.
    left: AtomicU64,
    /// Whether the frames are the domain's shared frames now.
    published: AtomicBool,
}

impl std::fmt::Debug for ArrivingImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrivingImage")
            .field("frames", &self.frames)
            .field("left", &self.left.load(Ordering::Relaxed))
            .field("published", &self.published.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ArrivingImage {
    /// Reserves frames for an image of `addrs` (a page each, zero pages
    /// addressed `zero`) named `name` in `domain`.
    pub(super) fn reserve(
        store: &Arc<FrameStore>,
        key: Arc<DomainKey>,
        domain: DomainId,
        name: Address,
        addrs: Vec<Address>,
        zero: Address,
    ) -> Result<Self, DedupError> {
        if addrs.is_empty() {
            return Err(FrameError::Empty.into());
        }
        let frames = store.allocate(addrs.len() as u64)?;
        let left = addrs.iter().filter(|a| **a != zero).count() as u64;
        let zero_hash = key.zero_hash();
        Ok(ArrivingImage {
            store: Arc::clone(store),
            hashes: addrs.iter().map(|_| AtomicU64::new(zero_hash)).collect(),
            filled: (0..addrs.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            key,
            domain,
            name,
            frames,
            addrs,
            zero,
            left: AtomicU64::new(left),
            published: AtomicBool::new(false),
        })
    }

    /// The image's first frame: page `k` of the image is frame `start + k`.
    pub(crate) fn start(&self) -> FrameNumber {
        self.frames.start
    }

    /// The image's name.
    pub(super) fn name(&self) -> &Address {
        &self.name
    }

    /// Whether the image was made for `addrs` in `domain`.
    pub(super) fn is_for(&self, domain: DomainId, addrs: &[Address]) -> bool {
        self.domain == domain && self.addrs == addrs
    }

    /// Whether page `k` has no content (a hole, never filled).
    pub(crate) fn is_zero(&self, k: u64) -> bool {
        usize::try_from(k)
            .ok()
            .and_then(|k| self.addrs.get(k))
            .is_none_or(|a| *a == self.zero)
    }

    /// Whether page `k` is filled (zero pages never are).
    pub(crate) fn is_filled(&self, k: u64) -> bool {
        let Ok(k) = usize::try_from(k) else {
            return false;
        };
        self.filled
            .get(k / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (k % 64)) != 0)
    }

    /// Whether the frames are the domain's shared frames now.
    pub(crate) fn is_published(&self) -> bool {
        self.published.load(Ordering::Acquire)
    }

    /// Pages with content not filled yet.
    pub(crate) fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }

    /// Fills pages `first..first + bytes.len() / 4096` with `bytes`, which
    /// the caller checked against their addresses (a snapshot reader checks
    /// every page it reads); pages filled already (by another clone) or
    /// with no content are left alone. Returns how many this call filled.
    /// Two clones filling one page race harmlessly: they write the same
    /// bytes, and a page is counted once.
    pub(crate) fn fill(&self, first: u64, bytes: &[u8]) -> Result<u64, DedupError> {
        let n = (bytes.len() / PAGE_SIZE) as u64;
        if first.checked_add(n).is_none_or(|e| e > self.frames.count) {
            return Err(FrameError::NotAllocated {
                start: self.frames.start.0.saturating_add(first),
                count: n,
            }
            .into());
        }
        // Below the frame count, so an index of `addrs` (a `Vec`).
        let first = usize::try_from(first).map_err(|_| FrameError::TooLarge { frames: first })?;
        let n = bytes.len() / PAGE_SIZE;
        let mut done = 0;
        let mut k = 0usize;
        while k < n {
            let p = first + k;
            if self.is_filled(p as u64) || self.is_zero(p as u64) {
                k += 1;
                continue;
            }
            let mut e = k + 1;
            while e < n && !self.is_filled((first + e) as u64) && !self.is_zero((first + e) as u64)
            {
                e += 1;
            }
            let run = &bytes[k * PAGE_SIZE..e * PAGE_SIZE];
            self.store
                .write_frames(FrameNumber(self.frames.start.0 + p as u64), run)?;
            for (j, page) in run.chunks_exact(PAGE_SIZE).enumerate() {
                let q = p + j;
                self.hashes[q].store(self.key.hash(page), Ordering::Relaxed);
                let bit = 1u64 << (q % 64);
                // Set after the write: a page seen filled holds its bytes.
                if self.filled[q / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                    self.left.fetch_sub(1, Ordering::AcqRel);
                    done += 1;
                }
            }
            k = e;
        }
        Ok(done)
    }

    /// Makes the filled image the domain's shared frames, found by its
    /// name, under the host's scan lock (`shared` is the table, locked);
    /// whether this call published it. An image with pages left is an
    /// error: a clone arrives only once every page it maps is there.
    pub(super) fn publish(&self, shared: &mut SharedFrames) -> Result<bool, DedupError> {
        if self.published.load(Ordering::Acquire) {
            return Ok(false);
        }
        if self.left() > 0 {
            return Err(DedupError::NotArrived(self.left()));
        }
        let contents: Vec<(u64, Address)> = self
            .hashes
            .iter()
            .zip(&self.addrs)
            .map(|(h, a)| (h.load(Ordering::Relaxed), *a))
            .collect();
        if !shared.insert_addressed_run(self.frames.start, self.domain, &contents) {
            return Err(FrameError::TooLarge {
                frames: self.frames.count,
            }
            .into());
        }
        shared.insert_image(self.domain, self.name, self.frames.start);
        self.published.store(true, Ordering::Release);
        Ok(true)
    }
}

impl Drop for ArrivingImage {
    fn drop(&mut self) {
        // Never published: the frames are nobody's (every clone that
        // mapped them is gone with its last holder of this image).
        // Published, they belong to the shared frames.
        if !self.published.load(Ordering::Acquire) {
            let _ = self.store.free(self.frames);
        }
    }
}
