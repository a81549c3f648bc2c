//! VMs born merged: shared frames found or filled by content address (the
//! BLAKE3 of a page's bytes, as a snapshot names its contents), and a new
//! VM whose pages map them copy-on-write from its first moment, so N VMs
//! restored from one snapshot hold its content once with no merge pass.
//! The caller names contents and says where each page's is; this module
//! never reads a file.
//!
//! A [`FoldIn`] holds the scan's lock from the first frame it pins to the
//! VM's registration, so no pass or recount runs in between (a recount
//! would count the pins away and free frames about to be mapped), and
//! pins every frame it hands out until it ends. Nothing of the new VM is
//! visible before [`FoldIn::install`] returns it, so its pages need no
//! write protection or comparison: they are remapped, then published as
//! merged with the steps a merge uses, then the VM is registered.

use std::{
    os::fd::AsRawFd,
    sync::{Arc, MutexGuard, Weak},
};

use rayon::prelude::*;

use super::{
    arrival::Arrival,
    arriving::ArrivingImage,
    error::DedupError,
    key::DomainKey,
    locks::lock,
    options::{DomainId, VmId, VmOptions},
    shared::Address,
    state::{Cover, Inner, ScanState},
    steps::{self, Target},
};
use crate::{
    addr::{FrameNumber, GuestPhysAddr, PAGE_SIZE},
    frames::{FrameError, FrameRange, FrameStore, RemapTarget},
    memory::{GuestMemory, GuestRegion, PageKind},
    userfault::Userfault,
};

/// Contents filled per call of the fill function (1 MiB).
const FILL_CHUNK: usize = 256;
/// Pages copied per `pread`/`pwrite` where a run is not remapped.
const COPY_CHUNK: usize = 256;
/// Mappings one remapped run may add (it splits the region's mapping).
const MAPPINGS_PER_RUN: u64 = 2;

/// A restore in progress on one domain of a dedup host (see the module).
pub(crate) struct FoldIn<'h> {
    inner: &'h Arc<Inner>,
    scan: MutexGuard<'h, ScanState>,
    domain: DomainId,
    key: Arc<DomainKey>,
    /// Frames this restore holds a reference on, until it ends.
    pinned: Vec<FrameNumber>,
}

/// What [`FoldIn::frames_for_contents`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ContentFrames {
    /// Contents the domain held already.
    pub(crate) found: u64,
    /// Contents filled into new frames.
    pub(crate) filled: u64,
}

/// What a page of a VM made by [`FoldIn::install`] maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageFrame {
    /// Nothing: a zero page, released (a hole of its own frame).
    Hole,
    /// A shared frame holding the page's content.
    Content(FrameNumber),
    /// A zero page mapped onto a hole of an image (so its region's run of
    /// consecutive frames goes on through it): no memory, nothing shared,
    /// counted as neither.
    ZeroIn(FrameNumber),
}

impl PageFrame {
    fn frame(self) -> Option<FrameNumber> {
        match self {
            PageFrame::Hole => None,
            PageFrame::Content(f) | PageFrame::ZeroIn(f) => Some(f),
        }
    }
}

/// What [`FoldIn::install`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Installed {
    /// Pages with content mapping a shared frame (zero pages mapped onto
    /// an image's holes are not counted).
    pub(crate) shared_pages: u64,
    /// Pages with content that were to map a shared frame, copied into
    /// their own frame instead: the mapping budget could not pay for their
    /// runs, or their region is excluded from merging.
    pub(crate) copied_pages: u64,
    /// Remaps made (one per run of pages onto consecutive frames).
    pub(crate) remaps: u64,
}

impl<'h> FoldIn<'h> {
    /// Starts a restore into `domain`, holding the scan's lock `scan`.
    pub(super) fn new(
        inner: &'h Arc<Inner>,
        mut scan: MutexGuard<'h, ScanState>,
        domain: DomainId,
    ) -> Result<Self, DedupError> {
        let key = scan.domain_key(domain)?;
        scan.forget_clones_gone();
        Ok(FoldIn {
            inner,
            scan,
            domain,
            key,
            pinned: Vec::new(),
        })
    }

    /// The image of the domain named `key` whose frame `k` still holds
    /// `pages[k]` for every `k`, each frame pinned until this restore
    /// ends: [`image_frames`](Self::image_frames) where it finds one,
    /// making none otherwise.
    pub(crate) fn whole_image(&mut self, key: &Address, pages: &[Address]) -> Option<FrameNumber> {
        let pinned = &mut self.pinned;
        lock(&self.inner.shared).lookup_image_pinned(self.domain, key, pages, |f| pinned.push(f))
    }

    /// Whether the domain has an image named `key` at all (cheap; it may
    /// have lost frames since, which
    /// [`whole_image`](Self::whole_image) checks).
    pub(crate) fn has_image(&self, key: &Address) -> bool {
        lock(&self.inner.shared).has_image(self.domain, key)
    }

    /// The frame the domain holds of each of `addrs`, if any, without
    /// pinning it (a plan: [`frames_for_contents`](Self::frames_for_contents)
    /// looks them up again and pins them).
    pub(crate) fn lookup_contents(&self, addrs: &[Address]) -> Vec<Option<FrameNumber>> {
        let shared = lock(&self.inner.shared);
        addrs
            .iter()
            .map(|a| shared.lookup_address(self.domain, a))
            .collect()
    }

    /// VMs restored into the domain from the snapshot (or other source)
    /// named `key` by [`install`](Self::install) and registered still
    /// (counted since the last time none was).
    pub(crate) fn restored(&self, key: &Address) -> u64 {
        self.scan
            .restored
            .get(&(self.domain, *key))
            .map_or(0, |vms| vms.len() as u64)
    }

    /// The pages clones of the snapshot named `key` map by content beside
    /// a partial image of the others, as [`set_cover`](Self::set_cover)
    /// recorded them: runs (first page, pages) in page order.
    pub(crate) fn cover(&self, key: &Address) -> Option<Cover> {
        self.scan.covers.get(&(self.domain, *key)).cloned()
    }

    /// Records `runs` as the pages clones of the snapshot named `key` map
    /// by content (see [`cover`](Self::cover)), so later clones find the
    /// same partial image.
    pub(crate) fn set_cover(&mut self, key: &Address, runs: Cover) {
        let domain = self.domain;
        self.scan.covers.insert((domain, *key), runs);
    }

    /// A frame of the domain for each of `addrs` (distinct content
    /// addresses), in order, each pinned until this restore ends. Contents
    /// the domain holds already (filled by an earlier restore and still
    /// mapped by some page) are found by address; the others get one new
    /// run of frames, in order, filled by `fill(first, bytes)` with the
    /// contents `addrs[first..]` (a page each, `bytes.len() / 4096` of
    /// them), and recorded as shared frames of the domain (keyed hash
    /// and address), so later merge passes find them too. `fill` must
    /// hand over only bytes whose BLAKE3 is their address (a snapshot
    /// reader checks every page it reads). On an error nothing new is
    /// recorded and the new frames are freed.
    pub(crate) fn frames_for_contents<E: From<DedupError>>(
        &mut self,
        addrs: &[Address],
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<(Vec<FrameNumber>, ContentFrames), E> {
        let mut frames = vec![FrameNumber(u64::MAX); addrs.len()];
        let mut missing = Vec::new();
        {
            let mut shared = lock(&self.inner.shared);
            for (i, a) in addrs.iter().enumerate() {
                match shared.lookup_address(self.domain, a) {
                    Some(f) => {
                        shared.add_ref(f, 1);
                        self.pinned.push(f);
                        frames[i] = f;
                    }
                    None => missing.push(i),
                }
            }
        }
        let stats = ContentFrames {
            found: (addrs.len() - missing.len()) as u64,
            filled: missing.len() as u64,
        };
        if missing.is_empty() {
            return Ok((frames, stats));
        }
        let store = &self.inner.store;
        let base = store
            .allocate(missing.len() as u64)
            .map_err(DedupError::from)?;
        let hashes = match self.fill_frames(base, &missing, &mut fill) {
            Ok(h) => h,
            Err(e) => {
                let _ = store.free(base);
                return Err(e);
            }
        };
        let contents: Vec<(u64, Address)> = missing
            .iter()
            .zip(hashes)
            .map(|(&i, h)| (h, addrs[i]))
            .collect();
        let mut shared = lock(&self.inner.shared);
        if !shared.insert_addressed_run(base.start, self.domain, &contents) {
            // Past 2^32 records: the frames recorded are unpinned, so freed
            // by the next recount, and the rest freed now.
            drop(shared);
            let _ = store.free(base);
            return Err(DedupError::Frames(FrameError::TooLarge { frames: base.count }).into());
        }
        for (k, &i) in missing.iter().enumerate() {
            let f = FrameNumber(base.start.0 + k as u64);
            shared.add_ref(f, 1);
            self.pinned.push(f);
            frames[i] = f;
        }
        Ok((frames, stats))
    }

    /// A run of frames holding an image: frame `start + k` holds the
    /// content addressed `pages[k]`, for every page of a layout, zero
    /// pages (address `zero`) as holes, so a VM can map each of its
    /// regions with one remap whatever the order of its contents. Found
    /// again by `key` (the image's name: a snapshot's id) while every
    /// frame is still there with its address, else made and filled by
    /// `fill(first, bytes)` with the pages `pages[first..]` that are not
    /// zero, a stretch at a time. Each frame is recorded as a shared frame
    /// (keyed hash and address, so restores and merge passes find the
    /// contents in it) and pinned until this restore ends. Returns the
    /// first frame and whether the image was found.
    pub(crate) fn image_frames<E: From<DedupError>>(
        &mut self,
        key: &Address,
        pages: &[Address],
        zero: &Address,
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<(FrameNumber, bool), E> {
        if let Some(start) = self.whole_image(key, pages) {
            return Ok((start, true));
        }
        if pages.is_empty() {
            return Err(DedupError::Frames(FrameError::Empty).into());
        }
        let store = &self.inner.store;
        let base = store
            .allocate(pages.len() as u64)
            .map_err(DedupError::from)?;
        let mut hashes = vec![self.key.zero_hash(); pages.len()];
        let mut buf = vec![0u8; FILL_CHUNK * PAGE_SIZE];
        let mut k = 0;
        while k < pages.len() {
            if pages[k] == *zero {
                k += 1;
                continue;
            }
            let mut e = k + 1;
            while e < pages.len() && e - k < FILL_CHUNK && pages[e] != *zero {
                e += 1;
            }
            let bytes = &mut buf[..(e - k) * PAGE_SIZE];
            let filled = fill(k, bytes).and_then(|()| {
                store
                    .write_frames(FrameNumber(base.start.0 + k as u64), bytes)
                    .map_err(|e| DedupError::from(e).into())
            });
            if let Err(err) = filled {
                let _ = store.free(base);
                return Err(err);
            }
            let key = &self.key;
            hashes[k..e]
                .par_iter_mut()
                .zip(bytes.par_chunks(PAGE_SIZE))
                .for_each(|(h, p)| *h = key.hash(p));
            k = e;
        }
        let contents: Vec<(u64, Address)> = hashes.into_iter().zip(pages.iter().copied()).collect();
        let mut shared = lock(&self.inner.shared);
        if !shared.insert_addressed_run(base.start, self.domain, &contents) {
            drop(shared);
            let _ = store.free(base);
            return Err(DedupError::Frames(FrameError::TooLarge { frames: base.count }).into());
        }
        shared.insert_image(self.domain, *key, base.start);
        for k in 0..pages.len() {
            let f = FrameNumber(base.start.0 + k as u64);
            shared.add_ref(f, 1);
            self.pinned.push(f);
        }
        Ok((base.start, false))
    }

    /// An image of `addrs` (a page each, zero pages addressed `zero`)
    /// named `key` that clones map while it arrives (`arriving.rs`): the
    /// one a clone restored lazily before made, if it is still arriving,
    /// else new frames. The caller looked for a whole image first
    /// ([`whole_image`](Self::whole_image)).
    pub(crate) fn arriving_image(
        &mut self,
        key: &Address,
        addrs: Vec<Address>,
        zero: &Address,
    ) -> Result<Arc<ArrivingImage>, DedupError> {
        let domain = self.domain;
        if let Some(image) = self
            .scan
            .arriving
            .get(&(domain, *key))
            .and_then(Weak::upgrade)
        {
            if image.is_for(domain, &addrs) && !image.is_published() {
                return Ok(image);
            }
        }
        let image = Arc::new(ArrivingImage::reserve(
            &self.inner.store,
            Arc::clone(&self.key),
            domain,
            *key,
            addrs,
            *zero,
        )?);
        self.scan
            .arriving
            .insert((domain, *image.name()), Arc::downgrade(&image));
        Ok(image)
    }

    /// Fills frames `base` with the contents `missing` names (indexes
    /// into the caller's addresses), a stretch of consecutive indexes per
    /// call of `fill`, and returns each one's keyed hash.
    fn fill_frames<E: From<DedupError>>(
        &self,
        base: FrameRange,
        missing: &[usize],
        fill: &mut impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<Vec<u64>, E> {
        let mut hashes = Vec::with_capacity(missing.len());
        let mut buf = vec![0u8; FILL_CHUNK * PAGE_SIZE];
        let mut k = 0;
        while k < missing.len() {
            let mut e = k + 1;
            while e < missing.len() && e - k < FILL_CHUNK && missing[e] == missing[e - 1] + 1 {
                e += 1;
            }
            let bytes = &mut buf[..(e - k) * PAGE_SIZE];
            fill(missing[k], bytes)?;
            let key = &self.key;
            hashes.par_extend(bytes.par_chunks(PAGE_SIZE).map(|p| key.hash(p)));
            self.inner
                .store
                .write_frames(FrameNumber(base.start.0 + k as u64), bytes)
                .map_err(DedupError::from)?;
            k = e;
        }
        Ok(hashes)
    }

    /// Makes `mem` (new memory, every page still a hole in its own frame,
    /// in a 4 KiB file store: the host's or one of its own) a VM whose
    /// page `p` of region `r` maps what `frames[r][p]` says (frames
    /// [`frames_for_contents`](Self::frames_for_contents) or
    /// [`image_frames`](Self::image_frames) handed out; a hole is
    /// released: reads as zeros, holds no memory); registers it with
    /// `options` and counts it as a clone of `clone_of` (see
    /// [`restored`](Self::restored)). Each run of pages onto consecutive
    /// frames is one remap, priced against the mapping budget, longest
    /// runs first; a run the budget cannot pay for (and every run of an
    /// excluded region) is copied into the pages' own frames instead, left
    /// for a later merge pass. On an error nothing is registered and the
    /// memory is gone.
    pub(crate) fn install(
        self,
        mem: GuestMemory,
        options: VmOptions,
        frames: &[Vec<PageFrame>],
        clone_of: &Address,
    ) -> Result<(VmId, Arc<GuestMemory>, Installed), DedupError> {
        let (id, mem, out, _) = self.install_with(mem, options, frames, clone_of, Rest::Copy)?;
        Ok((id, mem, out))
    }

    /// [`install`](Self::install), except that a run the mapping budget
    /// cannot pay for, or of an excluded region, is left as it is (fresh:
    /// its own frames' holes) for the caller to fill, as a lazy restore
    /// does. Returns, per region, whether its pages map the frames (every
    /// run of it remapped).
    /// The VM is registered as an ordinary one at once; the returned
    /// [`Arrival`] only discards it (and takes it out of the host) if
    /// dropped before the caller says the rest has arrived.
    pub(crate) fn install_leaving_rest(
        self,
        mem: GuestMemory,
        options: VmOptions,
        frames: &[Vec<PageFrame>],
        clone_of: &Address,
    ) -> Result<(Arrival, Arc<GuestMemory>, Installed, Vec<bool>), DedupError> {
        let inner = Arc::downgrade(self.inner);
        let (vm, mem, out, on_image) =
            self.install_with(mem, options, frames, clone_of, Rest::Later(None))?;
        Ok((
            Arrival {
                inner,
                vm,
                image: None,
                mem: Arc::clone(&mem),
                done: false,
                complete: false,
            },
            mem,
            out,
            on_image,
        ))
    }

    /// [`install`](Self::install) onto `image`, still arriving: the VM is
    /// registered as arriving (no pass scans it, nothing unmerges it) until
    /// the returned [`Arrival`] says it has arrived, and a run the mapping
    /// budget cannot pay for, or of an excluded region, is not copied (the
    /// image is not there to copy) but left as it is, its own frames'
    /// holes, for the caller to fill. Returns, per region, whether its
    /// pages map the image (every run of it remapped).
    pub(crate) fn install_arriving(
        self,
        mem: GuestMemory,
        options: VmOptions,
        frames: &[Vec<PageFrame>],
        clone_of: &Address,
        image: Arc<ArrivingImage>,
    ) -> Result<(Arrival, Arc<GuestMemory>, Installed, Vec<bool>), DedupError> {
        let inner = Arc::downgrade(self.inner);
        let (vm, mem, out, on_image) =
            self.install_with(mem, options, frames, clone_of, Rest::Later(Some(&image)))?;
        image.mapped();
        Ok((
            Arrival {
                inner,
                vm,
                image: Some(image),
                mem: Arc::clone(&mem),
                done: false,
                complete: false,
            },
            mem,
            out,
            on_image,
        ))
    }

    fn install_with(
        mut self,
        mem: GuestMemory,
        options: VmOptions,
        frames: &[Vec<PageFrame>],
        clone_of: &Address,
        rest: Rest<'_>,
    ) -> Result<(VmId, Arc<GuestMemory>, Installed, Vec<bool>), DedupError> {
        let (copy_rest, arriving) = match rest {
            Rest::Copy => (true, None),
            Rest::Later(arriving) => (false, arriving),
        };
        let store = Arc::clone(&self.inner.store);
        // A page named past the memory's: the caller's layout and frames
        // disagree.
        if let Some(r) = mem
            .regions()
            .iter()
            .zip(frames)
            .find(|(r, f)| r.pages() != f.len())
            .map(|(r, _)| r)
        {
            return Err(DedupError::Unmapped(GuestPhysAddr(r.end())));
        }
        if mem.regions().len() != frames.len() {
            return Err(DedupError::Unmapped(GuestPhysAddr(
                mem.regions().last().map_or(0, |r| r.end()),
            )));
        }
        // Runs of pages onto consecutive frames: (region, first page,
        // pages, first frame, pages with content).
        let mut runs: Vec<(usize, usize, usize, FrameNumber, u64)> = Vec::new();
        for (ri, f) in frames.iter().enumerate() {
            let mut p = 0;
            while p < f.len() {
                let Some(first) = f[p].frame() else {
                    p += 1;
                    continue;
                };
                let mut e = p + 1;
                while e < f.len() && f[e].frame() == Some(FrameNumber(first.0 + (e - p) as u64)) {
                    e += 1;
                }
                let content = f[p..e]
                    .iter()
                    .filter(|f| matches!(f, PageFrame::Content(_)))
                    .count() as u64;
                runs.push((ri, p, e - p, first, content));
                p = e;
            }
        }
        // Pages saved per mapping spent: the longest runs first.
        runs.sort_by_key(|r| std::cmp::Reverse(r.2));
        let budget = store.map_budget();
        budget.refresh();
        let excluded = |ri: usize| options.exclude.contains(&mem.regions()[ri].start());
        // What every run together adds, exactly: paid at once where the
        // budget has it (no run copied), else each run is charged the
        // most it could add, longest first, while the budget lasts.
        let mut all: Vec<(usize, usize, usize, FrameNumber)> = runs
            .iter()
            .filter(|r| !excluded(r.0))
            .map(|r| (r.0, r.1, r.2, r.3))
            .collect();
        let exact = added_mappings(&mem, &mut all);
        drop(all);
        let mut paid = budget.try_spend(exact);
        let mut charged = if paid { exact } else { 0 };
        let mut out = Installed::default();
        let mut remapped: Vec<(usize, usize, usize, FrameNumber)> = Vec::new();
        let mut buf = Vec::new();
        // Pages copied as zeros: holes, released below.
        let mut holes: Vec<(usize, usize)> = Vec::new();
        // Regions with a run left for the caller (`Rest::Later` only).
        let mut left: Vec<usize> = Vec::new();
        for &(ri, page, count, frame, content) in &runs {
            let region = &mem.regions()[ri];
            let afford = !excluded(ri)
                && (paid || {
                    let ok = budget.try_spend(MAPPINGS_PER_RUN);
                    charged += if ok { MAPPINGS_PER_RUN } else { 0 };
                    ok
                });
            if afford {
                let target = RemapTarget::PrivateCopyOf {
                    fd: store.as_raw_fd(),
                    file_offset: frame.file_offset(),
                };
                match region.remap_pages(page, count, target) {
                    Ok(()) => {
                        out.remaps += 1;
                        out.shared_pages += content;
                        remapped.push((ri, page, count, frame));
                        continue;
                    }
                    // Out of kernel mappings: the rest is copied.
                    Err(FrameError::MapLimit { .. }) => {
                        budget.exhausted();
                        paid = false;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !copy_rest {
                // Not copied: the caller fills these pages.
                left.push(ri);
                continue;
            }
            out.copied_pages += copy_run(&store, region, page, count, frame, &mut buf, &mut |p| {
                holes.push((ri, p));
            })?;
        }
        // What was charged beyond what the remaps really added (a run
        // beside another, or at a region's edge, splits less) goes back,
        // so the next restore plans on the kernel's count without reading
        // it again.
        budget.give_back(charged.saturating_sub(added_mappings(&mem, &mut remapped)));
        if mem.frame_store().options().populate {
            // Mapped up front: the own frames under the remapped pages
            // hold memory nobody reads.
            for &(ri, page, count, _) in &remapped {
                let region = &mem.regions()[ri];
                region.store().release(FrameRange {
                    start: region.own_frame(page),
                    count: count as u64,
                })?;
            }
            // And the pages left for the caller are present, zeros, so no
            // access to them would fault into its lazy restore: holes
            // again (found by review: an excluded region read zeros).
            // (A region with nothing to map, excluded, is left whole.)
            if !copy_rest {
                for ri in 0..frames.len() {
                    if left.contains(&ri) || !remapped.iter().any(|r| r.0 == ri) {
                        release_own(&mem, (ri, 0, mem.regions()[ri].pages()))?;
                    }
                }
            }
        }
        // Pages with no content are released (a hole, and the state says
        // so, as a discard leaves them): a read then takes zeros from the
        // file without allocating, where a read through the mapping would
        // allocate the hole.
        let none = frames.iter().enumerate().flat_map(|(ri, f)| {
            f.iter()
                .enumerate()
                .filter(|(_, f)| **f == PageFrame::Hole)
                .map(move |(p, _)| (ri, p))
        });
        let populated = mem.frame_store().options().populate;
        // A stretch of own frames still to punch (populated only):
        // region, first page, pages.
        let mut punch: Option<(usize, usize, usize)> = None;
        // A caller that fills what it was left (`Rest::Later`) is left
        // its pages with nothing to map fresh too.
        let none = none.filter(|_| copy_rest);
        for (ri, p) in none.chain(holes) {
            let region = &mem.regions()[ri];
            region.enable_state_checks();
            let states = region.page_states();
            let seen = states.load(p);
            if seen.kind() == PageKind::Private && !seen.is_remapped() {
                let _ = states.transition(p, seen, seen.with_kind(PageKind::Zero));
            }
            // Mapped up front, their own frames hold pages of zeros (found
            // by review: a page of memory per zero page of every clone,
            // which the state called released).
            if populated {
                punch = match punch {
                    Some((r, first, n)) if r == ri && first + n == p => Some((r, first, n + 1)),
                    other => {
                        if let Some(run) = other {
                            release_own(&mem, run)?;
                        }
                        Some((ri, p, 1))
                    }
                };
            }
        }
        if let Some(run) = punch {
            release_own(&mem, run)?;
        }
        if arriving.is_none() {
            map_zero_pages(&mem, frames, &remapped);
        }
        // Published as merged, as a merge publishes (the pages are fresh
        // and private, and nothing else can see them yet).
        for &(ri, page, count, frame) in &remapped {
            let region = &mem.regions()[ri];
            region.enable_state_checks();
            let states = region.page_states();
            for k in 0..count {
                let p = page + k;
                let seen = states.load(p);
                let merged = steps::merged_state(
                    Target::Shared(FrameNumber(frame.0 + k as u64)),
                    region.own_frame(p),
                );
                if !(steps::claim_candidate(states, p, seen)
                    && steps::publish_merge(states, p, seen, Some(merged)))
                {
                    return Err(DedupError::Busy(GuestPhysAddr(
                        region.start().0 + (p * PAGE_SIZE) as u64,
                    )));
                }
            }
        }
        let mem = Arc::new(mem);
        let on_image: Vec<bool> = (0..frames.len())
            .map(|ri| !copy_rest && !left.contains(&ri) && remapped.iter().any(|r| r.0 == ri))
            .collect();
        let id = self.inner.add_vm(
            &mut self.scan,
            Arc::clone(&mem),
            options,
            None,
            arriving.is_some(),
        )?;
        let domain = self.domain;
        self.scan
            .restored
            .entry((domain, *clone_of))
            .or_default()
            .push(id);
        // An arriving image's frames are no shared frames yet: the recount
        // at its publication counts them.
        if arriving.is_none() {
            let mut shared = lock(&self.inner.shared);
            for &(_, _, count, frame) in &remapped {
                for k in 0..count {
                    shared.add_ref(FrameNumber(frame.0 + k as u64), 1);
                }
            }
        }
        Ok((id, mem, out, on_image))
    }
}

/// What [`FoldIn::install_with`] does with the runs it does not remap.
#[derive(Clone, Copy)]
enum Rest<'a> {
    /// Copies them into the pages' own frames.
    Copy,
    /// Leaves them for the caller; the VM is registered as arriving onto
    /// the image given.
    Later(Option<&'a Arc<ArrivingImage>>),
}

/// Mappings the remapped runs (region, first page, pages, frame) add to
/// the regions of `mem`: a region with runs ends in one mapping per run
/// and one per stretch of its own pages around them. Sorts `runs`.
fn added_mappings(mem: &GuestMemory, runs: &mut [(usize, usize, usize, FrameNumber)]) -> u64 {
    runs.sort_unstable_by_key(|r| (r.0, r.1));
    let mut added = 0u64;
    let mut k = 0;
    while k < runs.len() {
        let ri = runs[k].0;
        let pages = mem.regions()[ri].pages();
        let mut pieces = 0u64;
        let mut at = 0usize;
        while k < runs.len() && runs[k].0 == ri {
            let (_, page, count, _) = runs[k];
            pieces += 1 + u64::from(page > at);
            at = page + count;
            k += 1;
        }
        pieces += u64::from(at < pages);
        added += pieces - 1;
    }
    added
}

/// Maps the zero pages of `remapped` runs (pages onto an image's holes)
/// as zeros in `mem`'s mappings (`UFFDIO_ZEROPAGE` through a userfaultfd
/// of its own, registered for the call): a read of a hole through a
/// private mapping of shmem would otherwise allocate a page of zeros in
/// the image's frame (found from outside: a clone's reads of its zero
/// pages grew the shared image by a page each). Best effort: where the
/// kernel will not, a read allocates that page, once for every clone.
fn map_zero_pages(
    mem: &GuestMemory,
    frames: &[Vec<PageFrame>],
    remapped: &[(usize, usize, usize, FrameNumber)],
) {
    let zero_in = |ri: usize, p: usize| matches!(frames[ri][p], PageFrame::ZeroIn(_));
    if !remapped
        .iter()
        .any(|&(ri, page, count, _)| (page..page + count).any(|p| zero_in(ri, p)))
    {
        return;
    }
    let Ok(uffd) = Userfault::new_missing() else {
        return;
    };
    for &(ri, page, count, _) in remapped {
        let region = &mem.regions()[ri];
        let (at, len) = (region.page_host_addr(page), (count * PAGE_SIZE) as u64);
        if uffd.register_missing(at, len).is_err() {
            continue;
        }
        let mut p = page;
        while p < page + count {
            if !zero_in(ri, p) {
                p += 1;
                continue;
            }
            let mut e = p + 1;
            while e < page + count && zero_in(ri, e) {
                e += 1;
            }
            let _ = uffd.zero(region.page_host_addr(p), ((e - p) * PAGE_SIZE) as u64);
            p = e;
        }
        let _ = uffd.unregister(at, len);
    }
}

/// Punches the own frames of pages `first..first + count` of region
/// `region` of `mem` (pages no layer can see yet).
fn release_own(
    mem: &GuestMemory,
    (region, first, count): (usize, usize, usize),
) -> Result<(), DedupError> {
    let region = &mem.regions()[region];
    region.store().release(FrameRange {
        start: region.own_frame(first),
        count: count as u64,
    })?;
    Ok(())
}

/// Copies frames `frame..` into the own frames of pages `page..` of
/// `region` (`count` of each), a chunk per `pread` and a `pwrite` per
/// stretch of pages with content (a zero page stays a hole, handed to
/// `hole`); returns the pages with content.
fn copy_run(
    shared: &FrameStore,
    region: &GuestRegion,
    page: usize,
    count: usize,
    frame: FrameNumber,
    buf: &mut Vec<u8>,
    hole: &mut dyn FnMut(usize),
) -> Result<u64, DedupError> {
    let mut copied = 0;
    let mut k = 0;
    while k < count {
        let n = COPY_CHUNK.min(count - k);
        buf.resize(n * PAGE_SIZE, 0);
        shared.read_frames(FrameNumber(frame.0 + k as u64), buf)?;
        let zero: Vec<bool> = buf
            .chunks_exact(PAGE_SIZE)
            .map(|p| p.iter().all(|&b| b == 0))
            .collect();
        let mut j = 0;
        while j < n {
            if zero[j] {
                hole(page + k + j);
                j += 1;
                continue;
            }
            let e = (j..n).find(|&e| zero[e]).unwrap_or(n);
            region.store().write_frames(
                region.own_frame(page + k + j),
                &buf[j * PAGE_SIZE..e * PAGE_SIZE],
            )?;
            copied += (e - j) as u64;
            j = e;
        }
        k += n;
    }
    Ok(copied)
}

impl Drop for FoldIn<'_> {
    fn drop(&mut self) {
        // The pins end: a frame no page maps now (a restore that failed)
        // is freed here, one a failed punch kept by a later recount.
        let mut shared = lock(&self.inner.shared);
        for &f in &self.pinned {
            let _ = shared.drop_ref(&self.inner.store, f);
        }
    }
}
