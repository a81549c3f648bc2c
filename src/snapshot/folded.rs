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
//! remap. Zero pages stay holes. [`FoldLayout::Auto`] weighs them, and a
//! mix of the two (the runs worth most mapped by content, an image of the
//! other pages), by the memory they would cost the clones still to come
//! within the process's mapping budget. The dedup side
//! (`dedup/fold_in.rs`) does the rest under the host's scan lock.

use std::{collections::HashMap, sync::Arc};

use super::{
    error::{Part, Problem, SnapshotError},
    format::{content_hash, Hash},
    reader::{Located, SnapshotReader},
};
use crate::{
    addr::{FrameNumber, PAGE_SIZE},
    dedup::{DedupError, DedupHost, FoldIn, PageFrame, VmId, VmOptions},
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

/// What a folded restore did. Every page is exactly one of zero, shared
/// or copied: `pages == zero_pages + shared_pages + copied_pages`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldedStats {
    /// Pages of the layout.
    pub pages: u64,
    /// Zero pages: no memory, no content stored or shared (holes; in an
    /// image, mapped onto the image's holes so its run goes on).
    pub zero_pages: u64,
    /// Pages with content mapping a shared frame of the domain.
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
    /// Whether the pages map an image of the snapshot
    /// ([`FoldLayout::Image`]; or, as [`FoldLayout::Auto`] may choose, of
    /// its pages outside the runs mapped by content) rather than a frame
    /// per distinct content alone.
    pub image: bool,
}

/// How a folded restore lays out the frames its pages map. A clone's cost
/// in kernel mappings (`vm.max_map_count`, the process's [`MapBudget`]
/// less its headroom) is what its remaps add: each run of pages onto
/// consecutive frames is one remap, splitting its region's mapping (up to
/// two mappings more; the budget is charged two). Past the budget a
/// clone's shortest runs are copied into its own frames instead (a page
/// of memory each), so no layout fails for want of mappings.
///
/// [`MapBudget`]: crate::frames::MapBudget
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FoldLayout {
    /// [`Image`](Self::Image) where the domain holds a whole image of the
    /// snapshot already (no new memory, a remap per region); else
    /// [`Contents`](Self::Contents) where the clones still to come (see
    /// [`FoldOptions::planned_clones`]) all fit the mapping budget that is
    /// left, so it never costs more than `Contents` where the budget
    /// allows it. Else the least memory over those clones of: contents
    /// (the contents the domain lacks, plus per clone the pages of the
    /// runs the budget cannot pay for, copied: the clones that fit get all
    /// their runs, the next the longest, the rest none); a partial image
    /// (the runs whose pages an image would store again, repeated or held
    /// contents, mapped by content, most such pages first, as many as
    /// each remaining clone's share of the budget pays for two mappings
    /// a run; one image of the other pages, shared by the clones, a remap
    /// per stretch between those runs); or a whole image. A partial image
    /// is recorded per snapshot and domain, so later clones map the same.
    /// The last clone of a plan past the budget copies rather than make an
    /// image (its copies are at most the image); clones past it with more
    /// to come share an image. Nothing fails for want of mappings: runs
    /// past the budget are copied.
    #[default]
    Auto,
    /// A frame per distinct content of the domain, shared with every
    /// snapshot that has it. Memory: the contents the domain lacks, once.
    /// Mappings: two per run of pages onto consecutive frames (a new
    /// snapshot's contents are stored in first-appearance order, so a run
    /// breaks at each repeated content and each content found in the
    /// domain: a repeated content costs a remap per page).
    Contents,
    /// The snapshot's pages in page order in a run of frames (its zero
    /// pages holes), shared by every clone of this snapshot. Memory: the
    /// snapshot's pages with content, once per domain (its duplicates, and
    /// contents the domain holds already, stored again). Mappings: two per
    /// region.
    Image,
}

/// [`FoldOptions::max_guest_bytes`] unless set: the largest guest a folded
/// restore takes by default (64 GiB, as a migration stream's reader).
pub const DEFAULT_MAX_GUEST_BYTES: u64 = 64 << 30;

/// How a folded restore goes about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoldOptions {
    /// How the frames are laid out ([`FoldLayout::Auto`] by default).
    pub layout: FoldLayout,
    /// Clones of this snapshot the caller plans to restore into the
    /// domain, those restored already and still registered included:
    /// [`FoldLayout::Auto`] plans the mapping budget for the ones still to
    /// come (this one at least). `None` (the default): as many more as are
    /// registered (the first clone plans for itself alone). A plan ends
    /// with the last of its clones: once none is registered, the next
    /// clone plans anew, on the budget as it is then.
    pub planned_clones: Option<u64>,
    /// The largest guest (all regions together, in bytes) to restore,
    /// checked against the snapshot's header before any work or memory
    /// per page: a small file may claim a huge guest of zero pages.
    pub max_guest_bytes: u64,
}

impl Default for FoldOptions {
    fn default() -> Self {
        FoldOptions {
            layout: FoldLayout::Auto,
            planned_clones: None,
            max_guest_bytes: DEFAULT_MAX_GUEST_BYTES,
        }
    }
}

/// Restores `snap` (with its ancestors attached) as a new VM of `host`, in
/// the domain and with the excluded regions of `options`, its pages
/// mapping the domain's shared frames from the start (see the module),
/// with [`FoldOptions::default`]. The memory lives in the host's frame
/// store, with the snapshot's layout.
///
/// On an error (a damaged page, a missing ancestor, a guest over the size
/// limit, the host's frame store failing) nothing is registered, no
/// content read by this restore is kept, and the host is as it was.
/// Shared frames are only ever shared within one domain.
pub fn restore_folded(
    host: &DedupHost,
    options: VmOptions,
    snap: &SnapshotReader,
) -> Result<FoldedRestore, SnapshotError> {
    restore_folded_with(host, options, snap, &FoldOptions::default())
}

/// [`restore_folded`] with the layout, planned clones and size limit of
/// `fold`.
pub fn restore_folded_with(
    host: &DedupHost,
    options: VmOptions,
    snap: &SnapshotReader,
    fold: &FoldOptions,
) -> Result<FoldedRestore, SnapshotError> {
    let layout = snap.layout();
    check_guest(snap, &options, fold.max_guest_bytes)?;
    let chain = chain(snap);
    let zero = content_hash(&[0u8; PAGE_SIZE]);
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
        // Bounded by the size limit, yet reserved fallibly: a limit the
        // caller set past this process's memory is an error, never an
        // aborted allocation.
        let mut region = Vec::new();
        region
            .try_reserve_exact(n)
            .map_err(|_| too_large(layout.total()))?;
        for k in 0..n as u64 {
            region.push(match snap.locate(first + k)? {
                Located::Zero => None,
                Located::Stored { file, slot } => {
                    let hash = stored_hash(file, slot)?;
                    // A stored page of zeros (another saver's file) is a
                    // zero page too: a hole, not a content.
                    (hash != zero).then(|| {
                        let depth = chain
                            .iter()
                            .position(|f| std::ptr::eq(*f, file))
                            .unwrap_or(0);
                        let next = contents.len();
                        let c = *index.entry(hash).or_insert(next);
                        if c == next {
                            contents.push((depth, slot));
                        }
                        c
                    })
                }
            });
        }
        stats.zero_pages += region.iter().filter(|c| c.is_none()).count() as u64;
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
    drop(order);
    stats.contents = sorted.len() as u64;

    let key = snap.id().0;
    let excluded: Vec<bool> = layout
        .regions()
        .iter()
        .map(|r| options.exclude.contains(&r.0))
        .collect();
    let planned = Planned {
        pages: &pages,
        rank: &rank,
        addrs: &addrs,
        zero,
    };
    let mut fold_in = host.fold_in(options.domain)?;
    // The whole image's page addresses, where one was looked for, and
    // where it starts if found (pinned: the image path maps it as found,
    // with no second check of every frame).
    let mut whole_addrs = None;
    let mut whole_start = None;
    let choice = match fold.layout {
        FoldLayout::Contents => Choice::Contents,
        FoldLayout::Image => Choice::Image(Arc::default()),
        FoldLayout::Auto => {
            if fold_in.has_image(&key) {
                let a = planned.image_addrs(layout.total(), &[])?;
                whole_start = fold_in.whole_image(&key, &a);
                whole_addrs = Some(a);
            }
            if whole_start.is_some() {
                // Its contents are all there in an image: no memory
                // either way, and a remap per region.
                Choice::Image(Arc::default())
            } else if let Some(cover) = fold_in.cover(&key) {
                // The partial image earlier clones map.
                Choice::Image(cover)
            } else {
                // The kernel's count now: mappings VMs gave back a moment
                // ago (clones unregistered, dropped) are not in a recent
                // reading, which only ever spent (found by review: a clone
                // replacing one just gone planned on a budget short by the
                // old one's mappings, and chose an image for good). Read
                // once per restore, as `install` reads it.
                let budget = host.frame_store().map_budget();
                budget.refresh();
                let restored = fold_in.restored(&key);
                let remaining = match fold.planned_clones {
                    Some(n) => n.saturating_sub(restored).max(1),
                    None => restored.saturating_add(1),
                };
                let est = planned.weigh(&fold_in, &excluded, remaining, budget.left());
                let choice = est.choose();
                if let Choice::Image(cover) = &choice {
                    if !cover.is_empty() {
                        fold_in.set_cover(&key, Arc::clone(cover));
                    }
                }
                choice
            }
        }
    };
    let page_frames: Vec<Vec<PageFrame>> = match choice {
        Choice::Image(cover) => {
            let covered = planned.covered(&cover);
            // The pages of the image: every page not mapped by content.
            let packed: Vec<usize> = (0..covered.len()).filter(|&p| !covered[p]).collect();
            let flat: Vec<Option<usize>> = pages.iter().flatten().copied().collect();
            let image_key = if cover.is_empty() {
                key
            } else {
                partial_key(&key, &cover)
            };
            let page_addrs = match whole_addrs {
                Some(a) if cover.is_empty() => a,
                _ => planned.image_addrs(layout.total(), &covered)?,
            };
            // Every page mapped by content: no image to make.
            let (start, found) = if page_addrs.is_empty() {
                (FrameNumber(0), true)
            } else if let Some(start) = whole_start.filter(|_| cover.is_empty()) {
                (start, true)
            } else {
                fold_in.image_frames(&image_key, &page_addrs, &zero, |first, dst: &mut [u8]| {
                    let n = dst.len() / PAGE_SIZE;
                    let list: Vec<(usize, u64)> = packed
                        .get(first..first + n)
                        .unwrap_or(&[])
                        .iter()
                        .filter_map(|&p| flat[p].map(|c| contents[c]))
                        .collect();
                    fill(&chain, &list, dst)
                })?
            };
            let image_len = page_addrs.len() as u64;
            drop(page_addrs);
            // The contents of the pages mapped by content, in file order.
            let mut want = vec![false; addrs.len()];
            let mut in_image = vec![false; addrs.len()];
            for (p, c) in flat.iter().enumerate() {
                if let Some(c) = c {
                    if covered[p] {
                        want[rank[*c]] = true;
                    } else {
                        in_image[rank[*c]] = true;
                    }
                }
            }
            let sub: Vec<usize> = (0..addrs.len()).filter(|&r| want[r]).collect();
            let sub_addrs: Vec<Hash> = sub.iter().map(|&r| addrs[r]).collect();
            let sub_sorted: Vec<(usize, u64)> = sub.iter().map(|&r| sorted[r]).collect();
            let (frames, cf) = fold_in
                .frames_for_contents(&sub_addrs, |first, dst: &mut [u8]| {
                    fill(&chain, &sub_sorted[first..], dst)
                })?;
            // Contents by content found in the image this restore just
            // made were read by it, not held by the domain (found by
            // review: the first clone counted them as found).
            let in_new_image = if found {
                0
            } else {
                frames
                    .iter()
                    .filter(|f| (start.0..start.0.saturating_add(image_len)).contains(&f.0))
                    .count() as u64
            };
            let mut by_rank = vec![FrameNumber(u64::MAX); addrs.len()];
            for (&r, f) in sub.iter().zip(frames) {
                by_rank[r] = f;
            }
            stats.image = true;
            let only_in_image = (0..addrs.len())
                .filter(|&r| in_image[r] && !want[r])
                .count() as u64;
            let image_content = packed.iter().filter(|&&p| flat[p].is_some()).count() as u64;
            stats.contents_found = if found {
                cf.found + only_in_image
            } else {
                cf.found.saturating_sub(in_new_image)
            };
            stats.contents_read = cf.filled + if found { 0 } else { image_content };
            let mut j = 0u64;
            let mut flat_p = 0usize;
            pages
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|c| {
                            let p = flat_p;
                            flat_p += 1;
                            match c {
                                Some(c) if covered[p] => PageFrame::Content(by_rank[rank[*c]]),
                                _ => {
                                    let f = FrameNumber(start.0 + j);
                                    j += 1;
                                    if c.is_some() {
                                        PageFrame::Content(f)
                                    } else {
                                        PageFrame::ZeroIn(f)
                                    }
                                }
                            }
                        })
                        .collect()
                })
                .collect()
        }
        Choice::Contents => {
            let (frames, found) = fold_in
                .frames_for_contents(&addrs, |first, dst: &mut [u8]| {
                    fill(&chain, &sorted[first..], dst)
                })?;
            stats.contents_found = found.found;
            stats.contents_read = found.filled;
            pages
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|c| c.map_or(PageFrame::Hole, |c| PageFrame::Content(frames[rank[c]])))
                        .collect()
                })
                .collect()
        }
    };
    drop(pages);
    let mem = GuestMemory::with_store(Arc::clone(host.frame_store()), layout.regions())?;
    let (vm, memory, installed) = fold_in.install(mem, options, &page_frames, &key)?;
    stats.shared_pages = installed.shared_pages;
    stats.copied_pages = installed.copied_pages;
    stats.remaps = installed.remaps;
    Ok(FoldedRestore { vm, memory, stats })
}

/// Checks, from the header alone and before anything per page or any
/// content is read, that `snap`'s guest is at most `max_guest_bytes` and
/// that every region `options` excludes is one of its regions
/// (registration checks that again).
pub(super) fn check_guest(
    snap: &SnapshotReader,
    options: &VmOptions,
    max_guest_bytes: u64,
) -> Result<(), SnapshotError> {
    let layout = snap.layout();
    let bytes = layout
        .regions()
        .iter()
        .fold(0u64, |a, r| a.saturating_add(r.1));
    if bytes > max_guest_bytes {
        return Err(SnapshotError::TooLarge {
            bytes,
            max: max_guest_bytes,
        });
    }
    if let Some(&bad) = options
        .exclude
        .iter()
        .find(|a| !layout.regions().iter().any(|r| r.0 == **a))
    {
        return Err(DedupError::NoSuchRegion(bad).into());
    }
    Ok(())
}

/// How a clone's frames are laid out.
#[derive(Debug, PartialEq, Eq)]
enum Choice {
    /// A frame per distinct content.
    Contents,
    /// The runs of pages given (first page, pages, in page order over all
    /// regions) by content, every other page on an image of the pages
    /// not in them (all of them: a whole image).
    Image(Arc<Vec<(usize, usize)>>),
}

/// The name of the partial image of snapshot `key` whose pages are those
/// not in the runs `cover`.
fn partial_key(key: &Hash, cover: &[(usize, usize)]) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("pagefold partial image v1");
    h.update(key);
    for &(first, n) in cover {
        h.update(&(first as u64).to_le_bytes());
        h.update(&(n as u64).to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// A snapshot's pages by content, as [`FoldLayout::Auto`] plans them.
struct Planned<'a> {
    /// Each region's pages: the index of its content, `None` for zero.
    pages: &'a [Vec<Option<usize>>],
    /// Each content's rank: its place in `addrs` (file order).
    rank: &'a [usize],
    /// The distinct contents' addresses, in file order.
    addrs: &'a [Hash],
    /// The address of a page of zeros.
    zero: Hash,
}

/// A run of pages onto consecutive frames in a contents layout, as
/// [`Planned::weigh`] estimates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RunAt {
    /// First page, in page order over all regions.
    first: usize,
    /// Pages.
    len: usize,
    /// Of those, pages an image would store again: contents the domain
    /// holds, or that the snapshot repeats.
    saving: u64,
}

impl Planned<'_> {
    /// Whether each page (in page order over all regions) is in `cover`.
    fn covered(&self, cover: &[(usize, usize)]) -> Vec<bool> {
        let total: usize = self.pages.iter().map(Vec::len).sum();
        let mut out = vec![false; total];
        for &(first, n) in cover {
            if let Some(s) = out.get_mut(first..first.saturating_add(n).min(total)) {
                s.fill(true);
            }
        }
        out
    }

    /// The address of every page not `covered` (all where it is empty) in
    /// page order, zero pages `zero`: an image.
    fn image_addrs(&self, total: u64, covered: &[bool]) -> Result<Vec<Hash>, SnapshotError> {
        let mut out: Vec<Hash> = Vec::new();
        out.try_reserve_exact(usize::try_from(total).unwrap_or(usize::MAX))
            .map_err(|_| too_large(total))?;
        out.extend(
            self.pages
                .iter()
                .flatten()
                .enumerate()
                .filter(|(p, _)| !covered.get(*p).copied().unwrap_or(false))
                .map(|(_, c)| c.map_or(self.zero, |c| self.addrs[self.rank[c]])),
        );
        Ok(out)
    }

    /// What a clone laid out by contents would cost: its runs as the
    /// domain holds the contents now (found ones where they are, the
    /// others in one new run in file order, as
    /// `FoldIn::frames_for_contents` allocates them) and the mappings they
    /// add, for `remaining` clones and `left` mappings.
    fn weigh(
        &self,
        fold_in: &FoldIn<'_>,
        excluded: &[bool],
        remaining: u64,
        left: u64,
    ) -> Estimate {
        // New frames numbered far from any real one.
        const NEW: u64 = 1 << 62;
        let found_at = fold_in.lookup_contents(self.addrs);
        let found: Vec<bool> = found_at.iter().map(Option::is_some).collect();
        let mut new = 0u64;
        let est: Vec<u64> = found_at
            .iter()
            .map(|f| match f {
                Some(f) => f.0,
                None => {
                    new += 1;
                    NEW + new
                }
            })
            .collect();
        drop(found_at);
        // How often each content (by rank) appears.
        let mut seen = vec![0u32; self.addrs.len()];
        for c in self.pages.iter().flatten().flatten() {
            let n = &mut seen[self.rank[*c]];
            *n = n.saturating_add(1);
        }
        let repeated = |c: usize| found[self.rank[c]] || seen[self.rank[c]] > 1;
        let mut runs: Vec<RunAt> = Vec::new();
        let mut cost = 0u64;
        let mut image_pages = 0u64;
        let mut flat = 0usize;
        for (r, region) in self.pages.iter().enumerate() {
            image_pages += region.iter().filter(|c| c.is_some()).count() as u64;
            let skip = excluded.get(r).copied().unwrap_or(false);
            // Mappings the region ends in: one per run, one per stretch
            // of its own pages between them.
            let mut pieces = 0u64;
            // The frame the current run goes on with, or `None` in a
            // stretch of own pages (`Some(None)`) or before any.
            let mut at: Option<Option<u64>> = None;
            for (p, c) in region.iter().enumerate() {
                if skip {
                    // Copied by every layout alike.
                    break;
                }
                match c.map(|c| (c, est[self.rank[c]])) {
                    None => {
                        if at != Some(None) {
                            pieces += 1;
                            at = Some(None);
                        }
                    }
                    Some((c, f)) => {
                        let saves = u64::from(repeated(c));
                        match runs.last_mut() {
                            Some(run) if at == Some(Some(f)) => {
                                run.len += 1;
                                run.saving += saves;
                            }
                            _ => {
                                pieces += 1;
                                runs.push(RunAt {
                                    first: flat + p,
                                    len: 1,
                                    saving: saves,
                                });
                            }
                        }
                        at = Some(Some(f + 1));
                    }
                }
            }
            // The region's own mapping, then what the runs add.
            cost += 1 + pieces.saturating_sub(1);
            flat += region.len();
        }
        let mut lengths: Vec<u64> = runs.iter().map(|r| r.len as u64).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        Estimate {
            weighing: Weighing {
                remaining,
                left,
                cost,
                runs: lengths,
                new_contents: new,
                image_pages,
                image_cost: 2 * excluded.iter().filter(|e| !**e).count() as u64,
            },
            runs,
            found,
            weighing_regions: self.pages.len() as u64,
            seen_in: self
                .pages
                .iter()
                .flatten()
                .map(|c| c.map(|c| self.rank[c]))
                .collect(),
        }
    }
}

/// [`Planned::weigh`]'s estimate of a contents layout, with what choosing
/// a partial image needs.
struct Estimate {
    /// What the layouts cost.
    weighing: Weighing,
    /// The runs of a contents layout, in page order.
    runs: Vec<RunAt>,
    /// Whether the domain holds each content (by rank).
    found: Vec<bool>,
    /// Each page's content by rank (page order over all regions).
    seen_in: Vec<Option<usize>>,
    /// Regions of the layout (a mapping each in every clone).
    weighing_regions: u64,
}

impl Estimate {
    /// The layout that costs the remaining clones the least memory:
    /// contents where they all fit the budget; else the least of contents
    /// (runs past the budget copied), a partial image (the runs that save
    /// the most image pages mapped by content, as many as each remaining
    /// clone's share of the budget pays for, and an image of the other
    /// pages) and a whole image.
    fn choose(&self) -> Choice {
        let w = &self.weighing;
        if w.fits() || w.left < w.image_cost {
            return Choice::Contents;
        }
        let contents = w.contents_pages();
        // Each clone's share, less its regions' own mappings and its
        // image's runs; then two mappings per run by content (it splits
        // a run of the image).
        let regions = self.weighing_regions;
        let per_clone = (w.left / w.remaining.max(1)).saturating_sub(regions + w.image_cost);
        let mut best: Vec<RunAt> = self.runs.iter().filter(|r| r.saving > 0).copied().collect();
        best.sort_by_key(|r| std::cmp::Reverse(r.saving));
        best.truncate(usize::try_from(per_clone / 2).unwrap_or(usize::MAX));
        best.sort_by_key(|r| r.first);
        let cover: Vec<(usize, usize)> = best.iter().map(|r| (r.first, r.len)).collect();
        let partial = self.partial_pages(&cover);
        let whole = u128::from(w.image_pages);
        if contents <= partial.min(whole) {
            Choice::Contents
        } else if partial < whole {
            Choice::Image(Arc::new(cover))
        } else {
            Choice::Image(Arc::default())
        }
    }

    /// Pages of memory a partial image with `cover` mapped by content
    /// adds: the contents of the covered pages the domain lacks, and the
    /// other pages with content, in the image.
    fn partial_pages(&self, cover: &[(usize, usize)]) -> u128 {
        let mut covered = vec![false; self.seen_in.len()];
        for &(first, n) in cover {
            if let Some(s) = covered.get_mut(first..(first + n).min(self.seen_in.len())) {
                s.fill(true);
            }
        }
        let mut needed = vec![false; self.found.len()];
        let mut image = 0u128;
        for (p, c) in self.seen_in.iter().enumerate() {
            if let Some(r) = c {
                if covered[p] {
                    needed[*r] = true;
                } else {
                    image += 1;
                }
            }
        }
        let new = needed
            .iter()
            .zip(&self.found)
            .filter(|(n, f)| **n && !**f)
            .count() as u128;
        new + image
    }
}

/// What [`FoldLayout::Auto`] weighs for a clone of a snapshot the domain
/// holds no whole image of.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Weighing {
    /// Clones still to restore, this one included.
    remaining: u64,
    /// Mappings the budget has left.
    left: u64,
    /// Mappings one clone laid out by contents costs: its regions', and
    /// what its runs add.
    cost: u64,
    /// Pages of each content run (of regions not excluded), longest first.
    runs: Vec<u64>,
    /// Contents the domain does not hold (a contents layout stores them).
    new_contents: u64,
    /// Pages with content (a new image stores them).
    image_pages: u64,
    /// Mappings the budget charges a clone mapping an image (two per
    /// region not excluded).
    image_cost: u64,
}

impl Weighing {
    /// Whether every remaining clone's content runs fit the budget.
    fn fits(&self) -> bool {
        self.cost == 0 || self.left / self.cost >= self.remaining
    }

    /// Pages of memory the remaining clones laid out by contents would
    /// add: the new contents, and per clone the pages of the runs the
    /// budget cannot pay for, copied (each clone that fits takes all its
    /// runs, the next the longest it can pay for, the rest none).
    fn contents_pages(&self) -> u128 {
        let new = u128::from(self.new_contents);
        if self.cost == 0 {
            return new;
        }
        let full = (self.left / self.cost).min(self.remaining);
        if full >= self.remaining {
            return new;
        }
        let total: u128 = self.runs.iter().map(|&r| u128::from(r)).sum();
        let partial_left = self.left - full * self.cost;
        // At the clone's mean cost per run, longest first.
        let funded = u128::from(partial_left) * self.runs.len() as u128 / u128::from(self.cost);
        let funded = usize::try_from(funded).unwrap_or(usize::MAX);
        let remapped: u128 = self.runs.iter().take(funded).map(|&r| u128::from(r)).sum();
        let rest = u128::from(self.remaining - full - 1);
        new + (total - remapped) + rest * total
    }

    /// Whether contents cost no more memory than a new whole image (or
    /// the budget cannot even map an image: it would be copied from too).
    #[cfg(test)]
    fn contents_first(&self) -> bool {
        self.left < self.image_cost || self.contents_pages() <= u128::from(self.image_pages)
    }
}

/// A layout of `pages` pages whose bookkeeping does not fit this process.
pub(super) fn too_large(pages: u64) -> SnapshotError {
    DedupError::Frames(FrameError::TooLarge { frames: pages }).into()
}

/// The snapshot and its attached ancestors, newest first.
fn chain(snap: &SnapshotReader) -> Vec<&SnapshotReader> {
    std::iter::successors(Some(snap), |s| s.parent()).collect()
}

pub(super) fn stored_hash(file: &SnapshotReader, slot: u64) -> Result<Hash, SnapshotError> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Choice, Estimate, RunAt, Weighing};

    fn weighing(remaining: u64, left: u64) -> Weighing {
        // Ten runs of 10 pages and 90 of one: 190 pages, 100 runs
        // costing 200 mappings, 150 contents new, 190 pages in an image.
        let mut runs = vec![10; 10];
        runs.extend([1; 90]);
        Weighing {
            remaining,
            left,
            cost: 200,
            runs,
            new_contents: 150,
            image_pages: 190,
            image_cost: 2,
        }
    }

    #[test]
    fn clones_that_fit_take_contents() {
        assert_eq!(weighing(4, 800).contents_pages(), 150);
        assert!(weighing(4, 800).contents_first());
        assert!(weighing(1, 200).contents_first());
    }

    #[test]
    fn the_last_clone_past_the_budget_copies_rather_than_make_an_image() {
        // No mappings at all: copies either way, no image stored.
        assert!(weighing(4, 1).contents_first());
        // Mappings for one run: 180 pages copied, nothing new stored.
        let w = Weighing {
            new_contents: 0,
            ..weighing(1, 2)
        };
        assert_eq!(w.contents_pages(), 180);
        assert!(w.contents_first());
        // Half the mappings: the 50 longest runs, 140 pages, remapped.
        let w = Weighing {
            new_contents: 0,
            ..weighing(1, 100)
        };
        assert_eq!(w.contents_pages(), 50);
    }

    #[test]
    fn clones_past_the_budget_with_more_to_come_share_an_image() {
        // Two fit; the third gets 100 mappings (50 pages copied), the
        // fourth none (190).
        let w = weighing(4, 500);
        assert_eq!(w.contents_pages(), 150 + 50 + 190);
        assert!(!w.contents_first());
        // No content to store and a short budget: cheaper than an image.
        let w = Weighing {
            new_contents: 0,
            ..weighing(2, 300)
        };
        assert_eq!(w.contents_pages(), 50);
        assert!(w.contents_first());
    }

    #[test]
    fn runs_that_add_no_mapping_always_fit() {
        let w = Weighing {
            cost: 0,
            ..weighing(u64::MAX, 0)
        };
        assert_eq!(w.contents_pages(), 150);
    }

    /// Eight pages of four new contents, 0 and 1 three times each; a
    /// contents layout's runs: pages 0..2, 2..6 and 6..8.
    fn estimate(remaining: u64, left: u64) -> Estimate {
        let seen_in = [0, 1, 0, 1, 2, 3, 0, 1].map(Some).to_vec();
        Estimate {
            weighing: Weighing {
                remaining,
                left,
                cost: 30,
                runs: vec![4, 2, 2],
                new_contents: 4,
                image_pages: 8,
                image_cost: 2,
            },
            runs: vec![
                RunAt {
                    first: 0,
                    len: 2,
                    saving: 2,
                },
                RunAt {
                    first: 2,
                    len: 4,
                    saving: 2,
                },
                RunAt {
                    first: 6,
                    len: 2,
                    saving: 2,
                },
            ],
            found: vec![false; 4],
            seen_in,
            weighing_regions: 1,
        }
    }

    #[test]
    fn a_partial_image_maps_the_runs_each_clone_can_pay_for_by_content() {
        // Seven mappings a clone: its region, the image's run, and two
        // runs by content. They store the four contents, the image the
        // two pages after them: 6 pages, against 8 for a whole image and
        // 30 for contents copied past the budget.
        let e = estimate(4, 28);
        assert_eq!(e.weighing.contents_pages(), 30);
        assert_eq!(e.partial_pages(&[(0, 2), (2, 4)]), 6);
        assert_eq!(e.choose(), Choice::Image(Arc::new(vec![(0, 2), (2, 4)])));
        // No share left for a run by content: a whole image.
        assert_eq!(estimate(4, 8).choose(), Choice::Image(Arc::default()));
        // All four fit: contents.
        assert_eq!(estimate(4, 120).choose(), Choice::Contents);
    }
}
