//! The shared frames: frames of the store that hold one copy of a content
//! mapped (copy-on-write) by several guest pages, with their reference counts
//! and the per-domain index from content hash to frame. A shared frame is
//! written once, before any page maps it (through the pass's fill mapping,
//! made read-only before the first merge, or by `pwrite`), and is only ever
//! mapped `MAP_PRIVATE` or read-only afterwards, so nothing can change its
//! bytes.
//!
//! Kept compact because there is one record per shared frame (a quarter of
//! a million for four clones of 1 GiB): a 24-byte record in a slab grown a
//! chunk at a time; an open-addressing table of 4-byte slab indexes by
//! content (`hashbrown`'s `HashTable`, its entries the indexes alone,
//! hashed through the slab); and by frame, a sorted list of extents, since
//! a pass allocates its new frames as one run and records them in order
//! (a slot is its extent's first slot plus the frame's offset in it). About
//! 30 bytes a frame, where two `HashMap`s and a `Vec` per hash took about
//! 195 (found from outside: metadata was 60 bytes per tracked page); a
//! by-frame hash table, tried first, sat at 45% load for a quarter of a
//! million frames (power-of-two buckets) and was 2.5 bytes per tracked
//! page more, and more again while it grew. The content table holds one
//! frame per content; an image's repeated contents (more frames of one
//! content) hang off it in lists kept beside, so no probe chain grows with
//! the copies.

use std::collections::HashMap;

use hashbrown::HashTable;

use super::options::DomainId;
use crate::{
    addr::FrameNumber,
    frames::{FrameError, FrameRange, FrameStore},
};

#[derive(Clone, Copy, Debug)]
struct Record {
    /// The content's hash in its domain.
    hash: u64,
    frame: FrameNumber,
    refs: u32,
    domain: DomainId,
}

/// A free slab slot's record: unreachable from either table.
const FREE: Record = Record {
    hash: 0,
    frame: FrameNumber(u64::MAX),
    refs: 0,
    domain: DomainId(0),
};

/// Records per slab chunk (96 KiB): the slab grows a chunk at a time, so
/// it never holds more than one chunk of spare records, and growing never
/// copies (a `Vec` doubling held the old and the new array at once: the
/// larger part of a merge's peak).
const CHUNK: usize = 4096;

/// The records, in chunks; a slot is `chunk * CHUNK + index`.
#[derive(Debug, Default)]
struct Slab {
    chunks: Vec<Box<[Record]>>,
    len: usize,
}

impl Slab {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, slot: u32) -> &Record {
        let s = slot as usize;
        &self.chunks[s / CHUNK][s % CHUNK]
    }

    fn get_mut(&mut self, slot: u32) -> &mut Record {
        let s = slot as usize;
        &mut self.chunks[s / CHUNK][s % CHUNK]
    }

    /// Appends a record; `None` past 2^32 records.
    fn push(&mut self, r: Record) -> Option<u32> {
        let slot = u32::try_from(self.len).ok()?;
        if self.len % CHUNK == 0 {
            self.chunks.push(vec![FREE; CHUNK].into_boxed_slice());
        }
        self.len += 1;
        *self.get_mut(slot) = r;
        Some(slot)
    }

    fn iter(&self) -> impl Iterator<Item = &Record> {
        self.chunks.iter().flat_map(|c| c.iter()).take(self.len)
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Record> {
        self.chunks
            .iter_mut()
            .flat_map(|c| c.iter_mut())
            .take(self.len)
    }

    fn allocated_bytes(&self) -> usize {
        self.chunks.len() * CHUNK * std::mem::size_of::<Record>()
            + self.chunks.capacity() * std::mem::size_of::<Box<[Record]>>()
    }
}

/// SplitMix64's finaliser: frame numbers are consecutive, and the tables
/// need their bits spread (content hashes are keyed xxh3, spread already,
/// but mixed with their domain here too).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hashes a frame number (or a slot) with [`mix`]: the keys of
/// `address_of` and `dups` are the allocator's frame numbers and the
/// slab's slots, which no guest chooses, so they need no keyed hash
/// (SipHash was a third of checking a 1 GiB image).
#[derive(Clone, Copy, Debug, Default)]
struct FrameHash;

impl std::hash::BuildHasher for FrameHash {
    type Hasher = FrameHasher;

    fn build_hasher(&self) -> FrameHasher {
        FrameHasher(0)
    }
}

/// The hasher of [`FrameHash`].
#[derive(Clone, Copy, Debug, Default)]
struct FrameHasher(u64);

impl std::hash::Hasher for FrameHasher {
    fn finish(&self) -> u64 {
        mix(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 ^= x;
    }

    fn write_u32(&mut self, x: u32) {
        self.0 ^= u64::from(x);
    }
}

fn content_key(domain: DomainId, hash: u64) -> u64 {
    mix(hash ^ u64::from(domain.0).rotate_left(32))
}

/// Frames `frame..frame + count` are (or were) recorded at slots
/// `slot..slot + count`.
#[derive(Clone, Copy, Debug)]
struct Extent {
    frame: u64,
    slot: u32,
    count: u32,
}

/// Shared frames and the content index of every domain.
#[derive(Debug, Default)]
pub(crate) struct SharedFrames {
    slab: Slab,
    /// Records in use (the slab's other slots are FREE).
    live: usize,
    /// Sorted by frame, never overlapping.
    extents: Vec<Extent>,
    by_content: HashTable<u32>,
    /// Frames of one content beyond the first (an image holds a repeated
    /// content once per page): `by_content` holds one slot per content, the
    /// others hang off it in a list here, so a content with thousands of
    /// frames costs no probe chain of thousands of equal hashes (found by
    /// measurement: dropping a host with two image clones of a 1 GiB
    /// guest took 20 s, most of it in removing such entries one by one).
    dups: HashMap<u32, Link, FrameHash>,
    /// Content addresses (BLAKE3 of the bytes, a snapshot's name for a
    /// content) of the frames filled from one, per domain: how a restore
    /// finds a content it needs without reading it. An entry goes with
    /// its frame.
    by_address: HashMap<(DomainId, Address), FrameNumber>,
    /// The address of each frame that has one, by frame number.
    address_of: HashMap<u64, Address, FrameHash>,
    /// Images (a run of frames holding a snapshot's pages in page order)
    /// by their key, per domain: where each starts. An entry may outlive
    /// frames of its image; [`lookup_image`](Self::lookup_image) checks
    /// every frame.
    images: HashMap<(DomainId, Address), FrameNumber>,
}

/// A content address: the BLAKE3 hash of a page's bytes.
pub(crate) type Address = [u8; 32];

/// A slot's neighbours in its content's list of frames (`NONE`: none); the
/// first of a list is the one `by_content` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Link {
    prev: u32,
    next: u32,
}

const NONE: u32 = u32::MAX;

impl SharedFrames {
    fn record(&self, slot: u32) -> &Record {
        self.slab.get(slot)
    }

    /// The extent that covers `frame`'s slot position, by index.
    fn extent_of(&self, frame: FrameNumber) -> Option<usize> {
        let i = self
            .extents
            .partition_point(|e| e.frame <= frame.0)
            .checked_sub(1)?;
        let e = self.extents[i];
        (frame.0 - e.frame < u64::from(e.count)).then_some(i)
    }

    fn slot_of(&self, frame: FrameNumber) -> Option<u32> {
        let e = self.extents[self.extent_of(frame)?];
        let slot = e.slot + u32::try_from(frame.0 - e.frame).ok()?;
        (self.record(slot).frame == frame).then_some(slot)
    }

    /// A shared frame of `domain` whose content hashed to `hash`, if any
    /// (several on a hash collision or for a template of identical frames;
    /// any of them will do: merges compare bytes first).
    pub(crate) fn lookup(&self, domain: DomainId, hash: u64) -> Option<FrameNumber> {
        self.by_content
            .find(content_key(domain, hash), |&s| {
                let r = self.record(s);
                r.domain == domain && r.hash == hash
            })
            .map(|&s| self.record(s).frame)
    }

    /// The shared frame of `domain` filled with the content whose address
    /// is `address`, if it is still there.
    pub(crate) fn lookup_address(
        &self,
        domain: DomainId,
        address: &Address,
    ) -> Option<FrameNumber> {
        self.by_address.get(&(domain, *address)).copied()
    }

    /// [`insert_run`](Self::insert_run) of frames filled from content
    /// addresses: frame `start + k` holds `contents[k]`, hashed `hash` in
    /// `domain` and addressed `address`. Returns whether every frame was
    /// recorded (past 2^32 records one is not, and must not be mapped).
    pub(crate) fn insert_addressed_run(
        &mut self,
        start: FrameNumber,
        domain: DomainId,
        contents: &[(u64, Address)],
    ) -> bool {
        self.insert_run(start, contents.iter().map(|&(hash, _)| (domain, hash)));
        let mut all = true;
        for (k, &(_, address)) in contents.iter().enumerate() {
            let frame = FrameNumber(start.0 + k as u64);
            if self.slot_of(frame).is_none() {
                all = false;
                continue;
            }
            self.by_address.insert((domain, address), frame);
            self.address_of.insert(frame.0, address);
        }
        all
    }

    /// The image of `domain` under `key` whose frame `k` holds `pages[k]`
    /// (an address) for every `k`, if there is one: each frame still
    /// recorded, with that address. A stale entry is dropped.
    pub(crate) fn lookup_image(
        &mut self,
        domain: DomainId,
        key: &Address,
        pages: &[Address],
    ) -> Option<FrameNumber> {
        let start = *self.images.get(&(domain, *key))?;
        let whole = pages.iter().enumerate().all(|(k, a)| {
            let f = FrameNumber(start.0 + k as u64);
            self.slot_of(f)
                .is_some_and(|s| self.record(s).domain == domain)
                && self.address_of.get(&f.0) == Some(a)
        });
        if !whole {
            self.images.remove(&(domain, *key));
        }
        whole.then_some(start)
    }

    /// [`lookup_image`](Self::lookup_image), and a reference on each of
    /// the image's frames taken at once (`pin` is told each frame).
    pub(crate) fn lookup_image_pinned(
        &mut self,
        domain: DomainId,
        key: &Address,
        pages: &[Address],
        mut pin: impl FnMut(FrameNumber),
    ) -> Option<FrameNumber> {
        let start = self.lookup_image(domain, key, pages)?;
        for k in 0..pages.len() {
            let f = FrameNumber(start.0 + k as u64);
            self.add_ref(f, 1);
            pin(f);
        }
        Some(start)
    }

    /// Whether an image of `domain` is named `key` (it may have lost
    /// frames since: [`lookup_image`](Self::lookup_image) checks).
    pub(crate) fn has_image(&self, domain: DomainId, key: &Address) -> bool {
        self.images.contains_key(&(domain, *key))
    }

    /// Names the image starting at `start` (recorded with
    /// [`insert_addressed_run`](Self::insert_addressed_run)) `key`.
    pub(crate) fn insert_image(&mut self, domain: DomainId, key: Address, start: FrameNumber) {
        self.images.insert((domain, key), start);
    }

    /// Records a new shared frame with no references yet.
    #[cfg(test)]
    fn insert(&mut self, frame: FrameNumber, domain: DomainId, hash: u64) {
        self.insert_run(frame, [(domain, hash)]);
    }

    /// Records a run of new shared frames `start..`, one per item of
    /// `contents` in order (a pass's one allocation). The extents of the
    /// frames no extent covers are built on the side and merged in once:
    /// a run into a hole where old (covered) and uncovered frames alternate
    /// cost a `Vec::insert` per frame, seconds at a million frames under
    /// the table's lock (found by review).
    pub(crate) fn insert_run(
        &mut self,
        start: FrameNumber,
        contents: impl IntoIterator<Item = (DomainId, u64)>,
    ) {
        let mut new: Vec<Extent> = Vec::new();
        for (k, (domain, hash)) in contents.into_iter().enumerate() {
            let frame = FrameNumber(start.0 + k as u64);
            if self.slot_of(frame).is_some() {
                continue;
            }
            let record = Record {
                hash,
                frame,
                refs: 0,
                domain,
            };
            let slot = match self.extent_of(frame) {
                // Its old place, freed: taken again, as the extents say.
                Some(i) => {
                    let e = self.extents[i];
                    let Ok(k) = u32::try_from(frame.0 - e.frame) else {
                        continue;
                    };
                    *self.slab.get_mut(e.slot + k) = record;
                    e.slot + k
                }
                None => {
                    // Past 2^32 records the frame is not recorded.
                    let Some(s) = self.slab.push(record) else {
                        continue;
                    };
                    match new.last_mut() {
                        Some(e)
                            if e.frame + u64::from(e.count) == frame.0
                                && e.slot.checked_add(e.count) == Some(s)
                                && e.count < u32::MAX =>
                        {
                            e.count += 1;
                        }
                        _ => new.push(Extent {
                            frame: frame.0,
                            slot: s,
                            count: 1,
                        }),
                    }
                    s
                }
            };
            self.live += 1;
            self.index(slot);
        }
        self.merge_extents(new);
    }

    /// Makes live record `slot` findable by its content: the first frame
    /// of its content goes in `by_content`, any other after it in the
    /// content's list.
    fn index(&mut self, slot: u32) {
        let r = *self.record(slot);
        let key = content_key(r.domain, r.hash);
        let slab = &self.slab;
        let first = self
            .by_content
            .find(key, |&s| {
                let o = slab.get(s);
                o.domain == r.domain && o.hash == r.hash
            })
            .copied();
        match first {
            Some(first) => {
                let next = self.dups.get(&first).map_or(NONE, |l| l.next);
                self.dups.insert(slot, Link { prev: first, next });
                self.dups
                    .entry(first)
                    .or_insert(Link {
                        prev: NONE,
                        next: NONE,
                    })
                    .next = slot;
                if let Some(n) = self.dups.get_mut(&next) {
                    n.prev = slot;
                }
            }
            None => {
                self.by_content.insert_unique(key, slot, |&s| {
                    let r = slab.get(s);
                    content_key(r.domain, r.hash)
                });
            }
        }
    }

    /// Takes live record `slot` out of the content index: its content's
    /// next frame, if any, takes its place.
    fn unindex(&mut self, slot: u32) {
        let r = *self.record(slot);
        let link = self.dups.remove(&slot).unwrap_or(Link {
            prev: NONE,
            next: NONE,
        });
        if link.prev == NONE {
            // The first of its content: in `by_content`.
            if let Ok(mut e) = self
                .by_content
                .find_entry(content_key(r.domain, r.hash), |&s| s == slot)
            {
                if link.next == NONE {
                    e.remove();
                } else {
                    *e.get_mut() = link.next;
                }
            }
        } else if let Some(p) = self.dups.get_mut(&link.prev) {
            p.next = link.next;
        }
        if let Some(n) = self.dups.get_mut(&link.next) {
            n.prev = link.prev;
        }
        // A first frame left alone needs no list.
        for s in [link.prev, link.next] {
            if self.dups.get(&s)
                == Some(&Link {
                    prev: NONE,
                    next: NONE,
                })
            {
                self.dups.remove(&s);
            }
        }
    }

    /// Merges `new` (sorted, disjoint from every extent) into the extents:
    /// joined to the one it continues, appended past the last, or one
    /// linear merge of the two sorted lists.
    fn merge_extents(&mut self, new: Vec<Extent>) {
        let Some(&first) = new.first() else {
            return;
        };
        let at = self.extents.partition_point(|e| e.frame <= first.frame);
        let mut rest = new.into_iter().peekable();
        if let Some(e) = at.checked_sub(1).map(|p| &mut self.extents[p]) {
            if e.frame + u64::from(e.count) == first.frame
                && e.slot.checked_add(e.count) == Some(first.slot)
            {
                if let Some(count) = e.count.checked_add(first.count) {
                    e.count = count;
                    rest.next();
                }
            }
        }
        if at == self.extents.len() {
            self.extents.extend(rest);
            return;
        }
        let old = std::mem::take(&mut self.extents);
        let mut merged = Vec::with_capacity(old.len() + rest.len());
        let mut old = old.into_iter().peekable();
        loop {
            let next = match (old.peek(), rest.peek()) {
                (Some(a), Some(b)) if a.frame < b.frame => old.next(),
                (Some(_), Some(_)) | (None, Some(_)) => rest.next(),
                (Some(_), None) => old.next(),
                (None, None) => None,
            };
            let Some(e) = next else { break };
            merged.push(e);
        }
        self.extents = merged;
    }

    /// Records that `frame` sits at `slot` (the slab's last): the extent
    /// ending right before both grows, or a new one goes in its place.
    fn extend_extents(&mut self, frame: FrameNumber, slot: u32) {
        let i = self.extents.partition_point(|e| e.frame <= frame.0);
        if let Some(e) = i.checked_sub(1).map(|p| &mut self.extents[p]) {
            if e.frame + u64::from(e.count) == frame.0
                && e.slot.checked_add(e.count) == Some(slot)
                && e.count < u32::MAX
            {
                // The next extent starts past `frame` (`extent_of` found
                // none covering it), so they stay apart.
                e.count += 1;
                return;
            }
        }
        self.extents.insert(
            i,
            Extent {
                frame: frame.0,
                slot,
                count: 1,
            },
        );
    }

    /// References to `frame` (pages and pins), 0 for no shared frame.
    pub(crate) fn refs(&self, frame: FrameNumber) -> u64 {
        self.slot_of(frame)
            .map_or(0, |s| u64::from(self.record(s).refs))
    }

    /// `n` more pages map `frame`.
    pub(crate) fn add_ref(&mut self, frame: FrameNumber, n: u64) {
        if let Some(s) = self.slot_of(frame) {
            let r = self.slab.get_mut(s);
            r.refs = r.refs.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
    }

    /// One page less maps `frame` (a page was unmerged: its state changed
    /// under this lock); the frame is freed when none does.
    pub(crate) fn drop_ref(
        &mut self,
        store: &FrameStore,
        frame: FrameNumber,
    ) -> Result<(), FrameError> {
        let Some(s) = self.slot_of(frame) else {
            return Ok(());
        };
        let r = self.slab.get_mut(s);
        // A count that saturated is left for the next recount: counting
        // it down could free a frame pages still map.
        if r.refs != u32::MAX {
            r.refs = r.refs.saturating_sub(1);
        }
        if r.refs == 0 {
            self.remove(store, s)?;
        }
        Ok(())
    }

    /// Sets every frame's reference count to the number of pages whose
    /// state maps it, as `count` reports them (it calls its argument once
    /// per such page), and frees frames no page maps. The page states are
    /// the truth: pages leave a shared frame by unmerging, by the kernel's
    /// copy on write, or by a discard, and only a recount from the states
    /// can never count one too few (which would free a frame a page still
    /// maps). Callers recount while no merge runs.
    pub(crate) fn recount(
        &mut self,
        store: &FrameStore,
        count: impl FnOnce(&mut dyn FnMut(FrameNumber)),
    ) -> Result<(), FrameError> {
        for r in self.slab.iter_mut() {
            r.refs = 0;
        }
        count(&mut |frame| self.add_ref(frame, 1));
        self.free_unreferenced(store)
    }

    /// Frees every frame that ended up with no references (a merge that
    /// found its pages changed).
    pub(crate) fn free_unreferenced(&mut self, store: &FrameStore) -> Result<(), FrameError> {
        let dead: Vec<u32> = self
            .slab
            .iter()
            .enumerate()
            .filter(|(_, r)| r.refs == 0 && r.frame != FREE.frame)
            .filter_map(|(s, _)| u32::try_from(s).ok())
            .collect();
        for s in dead {
            self.remove(store, s)?;
        }
        self.shrink();
        Ok(())
    }

    /// Frees an unreferenced frame. Out of the content index first (no
    /// merge may target it any more); the record goes only once the store
    /// freed the frame, so a failed punch (which leaves the allocator as it
    /// was) is retried by the next `free_unreferenced`, not leaked.
    fn remove(&mut self, store: &FrameStore, slot: u32) -> Result<(), FrameError> {
        let r = *self.record(slot);
        self.unindex(slot);
        if let Some(a) = self.address_of.get(&r.frame.0).copied() {
            if self.by_address.get(&(r.domain, a)) == Some(&r.frame) {
                self.by_address.remove(&(r.domain, a));
            }
        }
        store.free(FrameRange {
            start: r.frame,
            count: 1,
        })?;
        self.address_of.remove(&r.frame.0);
        *self.slab.get_mut(slot) = FREE;
        self.live -= 1;
        Ok(())
    }

    /// Gives back what a shrinking table no longer needs (after frames are
    /// freed in numbers): the tables are the metadata a VMM pays for.
    fn shrink(&mut self) {
        let live = self.live;
        if self.slab.len() > CHUNK && live < self.slab.len() / 2 {
            // Compact the slab: live records in frame order, then the
            // extents and the content table again.
            let mut records: Vec<Record> = self
                .slab
                .iter()
                .filter(|r| r.frame != FREE.frame)
                .copied()
                .collect();
            records.sort_unstable_by_key(|r| r.frame);
            self.slab = Slab::default();
            self.extents = Vec::new();
            self.by_content = HashTable::with_capacity(live);
            self.dups = HashMap::default();
            for r in records {
                let Some(s) = self.slab.push(r) else { break };
                self.extend_extents(r.frame, s);
                self.index(s);
            }
        }
    }

    /// Trims the tables' spare capacity at the end of a full scan. Once a
    /// full scan, not per batch: a table trimmed to fit doubles again on
    /// its next insert, a rehash of every entry.
    pub(crate) fn trim(&mut self) {
        self.extents.shrink_to_fit();
        self.by_address.shrink_to_fit();
        self.address_of.shrink_to_fit();
        self.dups.shrink_to_fit();
        let slab = &self.slab;
        self.by_content.shrink_to(0, |&x| {
            let r = slab.get(x);
            content_key(r.domain, r.hash)
        });
    }

    /// Shared frames in use (KSM's `pages_shared`).
    pub(crate) fn len(&self) -> u64 {
        self.live as u64
    }

    /// Sum of references (pages mapping a shared frame).
    pub(crate) fn total_refs(&self) -> u64 {
        self.slab.iter().map(|r| u64::from(r.refs)).sum()
    }

    /// Bytes allocated for the table, for the profit figure.
    pub(crate) fn metadata_bytes(&self) -> u64 {
        (self.slab.allocated_bytes()
            + self.extents.capacity() * std::mem::size_of::<Extent>()
            + self.by_content.allocation_size()
            + self.dups.capacity() * std::mem::size_of::<(u32, Link)>()
            + self.by_address.capacity()
                * std::mem::size_of::<((DomainId, Address), FrameNumber)>()
            + self.address_of.capacity() * std::mem::size_of::<(u64, Address)>()
            + self.images.capacity() * std::mem::size_of::<((DomainId, Address), FrameNumber)>())
            as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_by_frame_and_by_content_and_freed_at_zero() -> Result<(), FrameError> {
        let store = FrameStore::memfd()?;
        let frames = store.allocate(300)?;
        let mut t = SharedFrames::default();
        let d = DomainId(3);
        for k in 0..300u64 {
            // Frames 0..100 share one content (a template), the rest their own.
            let hash = if k < 100 { 7 } else { 1000 + k };
            t.insert(FrameNumber(frames.start.0 + k), d, hash);
            t.add_ref(FrameNumber(frames.start.0 + k), 2);
        }
        assert_eq!(t.len(), 300);
        assert_eq!(t.total_refs(), 600);
        assert!(t.lookup(d, 7).is_some_and(|f| f.0 < frames.start.0 + 100));
        assert_eq!(t.lookup(d, 1150), Some(FrameNumber(frames.start.0 + 150)));
        assert_eq!(t.lookup(DomainId(4), 1150), None, "domains never mix");
        // Two drops free a frame; its content is no longer found.
        let f = FrameNumber(frames.start.0 + 150);
        t.drop_ref(&store, f)?;
        assert_eq!(t.lookup(d, 1150), Some(f));
        t.drop_ref(&store, f)?;
        assert_eq!(t.lookup(d, 1150), None);
        assert_eq!(t.len(), 299);
        // A recount from the states: only the template's frames are mapped.
        t.recount(&store, |count| {
            for k in 0..100 {
                count(FrameNumber(frames.start.0 + k));
            }
        })?;
        assert_eq!(t.len(), 100);
        assert_eq!(t.total_refs(), 100);
        assert!(t.lookup(d, 7).is_some());
        assert_eq!(t.lookup(d, 1200), None);
        // Slots are reused, the slab shrank, and records stay findable.
        t.insert(FrameNumber(frames.start.0 + 200), d, 5);
        assert_eq!(t.lookup(d, 5), Some(FrameNumber(frames.start.0 + 200)));
        t.trim();
        // One chunk of records, and the tables for about a hundred.
        assert!(
            t.metadata_bytes() < (CHUNK * std::mem::size_of::<Record>() + 4096) as u64,
            "{}",
            t.metadata_bytes()
        );
        Ok(())
    }

    /// Frames filled from content addresses are found by address in their
    /// domain only, by content hash as any other, and the address goes
    /// with the frame.
    #[test]
    fn addressed_frames_are_found_by_address_until_freed() -> Result<(), FrameError> {
        let store = FrameStore::memfd()?;
        let frames = store.allocate(3)?;
        let mut t = SharedFrames::default();
        let d = DomainId(2);
        let addr = |b: u8| [b; 32];
        assert!(t.insert_addressed_run(
            frames.start,
            d,
            &[(10, addr(1)), (11, addr(2)), (12, addr(3))]
        ));
        let f = |k: u64| FrameNumber(frames.start.0 + k);
        for k in 0..3 {
            t.add_ref(f(k), 1);
        }
        assert_eq!(t.lookup_address(d, &addr(2)), Some(f(1)));
        assert_eq!(
            t.lookup_address(DomainId(3), &addr(2)),
            None,
            "domains never mix"
        );
        assert_eq!(t.lookup(d, 12), Some(f(2)));
        t.drop_ref(&store, f(1))?;
        assert_eq!(t.lookup_address(d, &addr(2)), None);
        assert_eq!(t.lookup_address(d, &addr(1)), Some(f(0)));
        t.recount(&store, |_| {})?;
        assert_eq!(t.lookup_address(d, &addr(1)), None);
        assert!(t.address_of.is_empty() && t.by_address.is_empty());
        assert_eq!(store.allocated_frames(), 0);
        check(&t);
        Ok(())
    }

    /// An image is found by its key while every frame holds its address;
    /// once one is freed the entry is stale and dropped.
    #[test]
    fn an_image_is_found_while_whole() -> Result<(), FrameError> {
        let store = FrameStore::memfd()?;
        let frames = store.allocate(3)?;
        let mut t = SharedFrames::default();
        let d = DomainId(1);
        let pages = [[1u8; 32], [0u8; 32], [1u8; 32]];
        let contents: Vec<(u64, Address)> = pages.iter().map(|&a| (u64::from(a[0]), a)).collect();
        assert!(t.insert_addressed_run(frames.start, d, &contents));
        t.insert_image(d, [9; 32], frames.start);
        for k in 0..3 {
            t.add_ref(FrameNumber(frames.start.0 + k), 1);
        }
        assert!(t.has_image(d, &[9; 32]));
        assert_eq!(t.lookup_image(d, &[9; 32], &pages), Some(frames.start));
        assert_eq!(t.lookup_image(DomainId(2), &[9; 32], &pages), None);
        let other = [[1u8; 32], [2u8; 32], [1u8; 32]];
        assert_eq!(t.lookup_image(d, &[9; 32], &other), None, "another image");
        t.insert_image(d, [9; 32], frames.start);
        t.drop_ref(&store, FrameNumber(frames.start.0 + 1))?;
        assert_eq!(t.lookup_image(d, &[9; 32], &pages), None);
        assert!(!t.has_image(d, &[9; 32]), "a stale entry is dropped");
        check(&t);
        Ok(())
    }

    /// Freeing most frames compacts the slab; every survivor is still
    /// found by frame and by content, and counted.
    #[test]
    fn compaction_keeps_every_live_frame() -> Result<(), FrameError> {
        let store = FrameStore::memfd()?;
        let n = 3 * CHUNK as u64;
        let frames = store.allocate(n)?;
        let mut t = SharedFrames::default();
        let d = DomainId(1);
        for k in 0..n {
            t.insert(FrameNumber(frames.start.0 + k), d, 10_000 + k);
        }
        let full = t.metadata_bytes();
        let keep = |k: u64| k % 7 == 3;
        t.recount(&store, |count| {
            for k in (0..n).filter(|&k| keep(k)) {
                count(FrameNumber(frames.start.0 + k));
            }
        })?;
        t.trim();
        assert!(
            t.metadata_bytes() < full / 2,
            "{} of {full}",
            t.metadata_bytes()
        );
        assert_eq!(t.len(), (0..n).filter(|&k| keep(k)).count() as u64);
        for k in 0..n {
            let f = FrameNumber(frames.start.0 + k);
            let want = keep(k).then_some(f);
            assert_eq!(t.lookup(d, 10_000 + k), want, "frame {k}");
        }
        // References still land on the right records.
        t.add_ref(FrameNumber(frames.start.0 + 3), 4);
        assert_eq!(t.total_refs(), t.len() + 4);
        Ok(())
    }

    /// The table's own invariants: extents sorted and apart, every slot in
    /// one extent and holding that extent's frame or nothing, every live
    /// record found by frame and indexed once by content.
    fn check(t: &SharedFrames) {
        for w in t.extents.windows(2) {
            assert!(w[0].frame + u64::from(w[0].count) <= w[1].frame, "{w:?}");
        }
        let mut slots = std::collections::HashSet::new();
        for e in &t.extents {
            assert!(
                e.count > 0 && (e.slot + e.count) as usize <= t.slab.len(),
                "{e:?}"
            );
            for k in 0..e.count {
                assert!(slots.insert(e.slot + k), "slot in two extents");
                let r = t.record(e.slot + k);
                assert!(r.frame == FREE.frame || r.frame.0 == e.frame + u64::from(k));
            }
        }
        let mut live = 0;
        for (s, r) in t.slab.iter().enumerate() {
            if r.frame != FREE.frame {
                live += 1;
                assert_eq!(t.slot_of(r.frame), u32::try_from(s).ok());
            }
        }
        assert_eq!(live, t.live);
        // Every live record is the first of its content (in `by_content`)
        // or in the list after one, and the lists link both ways.
        let listed = t.dups.values().filter(|l| l.prev != NONE).count();
        assert_eq!(t.by_content.len() + listed, t.live);
        for (&s, l) in &t.dups {
            assert_ne!(t.record(s).frame, FREE.frame, "a free slot listed");
            if l.prev != NONE {
                assert_eq!(t.dups[&l.prev].next, s);
            }
            if l.next != NONE {
                assert_eq!(t.dups[&l.next].prev, s);
                let (a, b) = (t.record(s), t.record(l.next));
                assert!(a.domain == b.domain && a.hash == b.hash);
            }
        }
    }

    /// Many frames per content (lists of dozens), and frees that fail (a
    /// store that never allocated the frames: `NotAllocated` after the
    /// record was unindexed) retried any number of times, through
    /// `drop_ref` and `free_unreferenced`, with compactions and reused
    /// slots between: the lists stay linked both ways, a content is found
    /// while a frame of it is indexed, and a retried `unindex` corrupts
    /// nothing. Written by a review of the lists.
    #[test]
    fn lists_survive_failed_frees_and_their_retries() -> Result<(), FrameError> {
        use std::collections::HashMap;

        use rand::{rngs::SmallRng, Rng, SeedableRng};
        for seed in 0..3 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let store = FrameStore::memfd()?;
            let bad = FrameStore::memfd()?;
            let mut t = SharedFrames::default();
            // frame -> (hash, refs, indexed)
            let mut m: HashMap<u64, (u64, u32, bool)> = HashMap::new();
            let mut ever: Vec<u64> = Vec::new();
            for step in 0..400 {
                match rng.gen_range(0..100) {
                    0..=19 => {
                        let n = if rng.gen_bool(0.2) {
                            rng.gen_range(CHUNK as u64 / 2..CHUNK as u64 + 500)
                        } else {
                            rng.gen_range(1..200)
                        };
                        let r = store.allocate(n)?;
                        let c: Vec<u64> = (0..r.count).map(|_| rng.gen_range(0..4u64)).collect();
                        t.insert_run(r.start, c.iter().map(|&h| (DomainId(1), h)));
                        for (k, &h) in c.iter().enumerate() {
                            let f = r.start.0 + k as u64;
                            t.add_ref(FrameNumber(f), 1);
                            assert!(m.insert(f, (h, 1, true)).is_none());
                            ever.push(f);
                        }
                    }
                    20..=59 if !ever.is_empty() => {
                        let f = ever[rng.gen_range(0..ever.len())];
                        let fail = rng.gen_bool(0.3);
                        let s = if fail { &bad } else { &store };
                        let res = t.drop_ref(s, FrameNumber(f));
                        if let Some(e) = m.get_mut(&f) {
                            e.1 = e.1.saturating_sub(1);
                            if e.1 == 0 {
                                if fail {
                                    assert!(res.is_err());
                                    e.2 = false;
                                } else {
                                    res?;
                                    m.remove(&f);
                                }
                            }
                        }
                    }
                    60..=69 => {
                        // A retry that fails again, or one that frees all.
                        if rng.gen_bool(0.5) {
                            let _ = t.free_unreferenced(&bad);
                            for e in m.values_mut().filter(|e| e.1 == 0) {
                                e.2 = false;
                            }
                        } else {
                            t.free_unreferenced(&store)?;
                            m.retain(|_, e| e.1 > 0);
                        }
                    }
                    70..=74 => t.trim(),
                    75..=79 => {
                        // Most frames dropped at once (a VM gone): frees
                        // in numbers, some failing, then a compaction.
                        let mut fs: Vec<u64> =
                            m.iter().filter(|(_, e)| e.1 > 0).map(|(&f, _)| f).collect();
                        fs.sort_unstable();
                        for f in fs {
                            if rng.gen_bool(0.3) {
                                continue;
                            }
                            let fail = rng.gen_bool(0.1);
                            let res = t.drop_ref(if fail { &bad } else { &store }, FrameNumber(f));
                            if let Some(e) = m.get_mut(&f) {
                                e.1 -= 1;
                                if e.1 == 0 {
                                    if fail {
                                        assert!(res.is_err());
                                        e.2 = false;
                                    } else {
                                        res?;
                                        m.remove(&f);
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
                if step % 4 != 0 {
                    continue;
                }
                let unindexed = m.values().filter(|e| !e.2).count();
                let listed = t.dups.values().filter(|l| l.prev != NONE).count();
                assert_eq!(
                    t.by_content.len() + listed + unindexed,
                    t.live,
                    "seed {seed} step {step}"
                );
                for (&s, l) in &t.dups {
                    assert_ne!(t.record(s).frame, FREE.frame, "a free slot listed");
                    if l.prev != NONE {
                        assert_eq!(t.dups[&l.prev].next, s, "seed {seed} step {step}");
                    }
                    if l.next != NONE {
                        assert_eq!(t.dups[&l.next].prev, s, "seed {seed} step {step}");
                    }
                }
                assert_eq!(t.len(), m.len() as u64);
                for h in 0..4u64 {
                    let any = m.values().any(|e| e.0 == h && e.2);
                    let found = t.lookup(DomainId(1), h);
                    assert_eq!(found.is_some(), any, "seed {seed} step {step} hash {h}");
                    if let Some(f) = found {
                        assert!(m.get(&f.0).is_some_and(|e| e.0 == h && e.2));
                    }
                }
                // Every list, walked from its first, holds its content's
                // indexed frames, each once.
                for &first in t.by_content.iter() {
                    let h = t.record(first).hash;
                    let mut n = 0;
                    let mut s = first;
                    while s != NONE {
                        let r = t.record(s);
                        assert!(m.get(&r.frame.0).is_some_and(|e| e.0 == h && e.2));
                        n += 1;
                        s = t.dups.get(&s).map_or(NONE, |l| l.next);
                        assert!(n <= m.len(), "a cycle, seed {seed} step {step}");
                    }
                    let want = m.values().filter(|e| e.0 == h && e.2).count();
                    assert_eq!(n, want, "seed {seed} step {step} hash {h}");
                }
            }
        }
        Ok(())
    }

    /// Random passes, guest allocations from the same store, references,
    /// drops, recounts, frees and trims against a map of frame -> (domain,
    /// hash, references), with the store's own count of frames (a frame
    /// freed early or leaked shows there). Written by a review of the
    /// extents; about 5,000 reused slots and dozens of compactions a seed.
    #[test]
    fn the_table_follows_a_naive_model() -> Result<(), FrameError> {
        use std::collections::HashMap;

        use rand::{rngs::SmallRng, Rng, SeedableRng};
        for seed in 0..6 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let store = FrameStore::memfd()?;
            let mut t = SharedFrames::default();
            let mut m: HashMap<u64, (u32, u64, u32)> = HashMap::new();
            let mut guest: Vec<FrameRange> = Vec::new();
            let mut ever: Vec<u64> = Vec::new();
            for step in 0..2000 {
                match rng.gen_range(0..100) {
                    0..=24 => {
                        let n = if rng.gen_bool(0.3) {
                            rng.gen_range(1..4)
                        } else {
                            rng.gen_range(1..600)
                        };
                        let r = store.allocate(n)?;
                        let c: Vec<(u32, u64)> = (0..r.count)
                            .map(|_| (rng.gen_range(0..3u32), rng.gen_range(0..40u64)))
                            .collect();
                        t.insert_run(r.start, c.iter().map(|&(d, h)| (DomainId(d), h)));
                        for (k, &(d, h)) in c.iter().enumerate() {
                            let f = r.start.0 + k as u64;
                            let pin = rng.gen_bool(0.9);
                            if pin {
                                t.add_ref(FrameNumber(f), 1);
                            }
                            assert!(m.insert(f, (d, h, u32::from(pin))).is_none());
                            ever.push(f);
                        }
                    }
                    25..=29 => guest.push(store.allocate(rng.gen_range(1..300))?),
                    30..=33 if !guest.is_empty() => {
                        store.free(guest.swap_remove(rng.gen_range(0..guest.len())))?;
                    }
                    34..=49 if !ever.is_empty() => {
                        let f = ever[rng.gen_range(0..ever.len())];
                        let n = rng.gen_range(1..4u32);
                        t.add_ref(FrameNumber(f), u64::from(n));
                        if let Some(e) = m.get_mut(&f) {
                            e.2 += n;
                        }
                    }
                    50..=79 if !ever.is_empty() => {
                        let f = ever[rng.gen_range(0..ever.len())];
                        t.drop_ref(&store, FrameNumber(f))?;
                        if let Some(e) = m.get_mut(&f) {
                            e.2 = e.2.saturating_sub(1);
                            if e.2 == 0 {
                                m.remove(&f);
                            }
                        }
                    }
                    80..=85 => {
                        let counts: Vec<(u64, u32)> = m
                            .keys()
                            .map(|&f| {
                                (
                                    f,
                                    if rng.gen_bool(0.5) {
                                        0
                                    } else {
                                        rng.gen_range(1..3)
                                    },
                                )
                            })
                            .collect();
                        t.recount(&store, |c| {
                            for &(f, n) in &counts {
                                for _ in 0..n {
                                    c(FrameNumber(f));
                                }
                            }
                            c(FrameNumber(u64::MAX));
                        })?;
                        for (f, n) in counts {
                            match m.get_mut(&f) {
                                Some(e) if n > 0 => e.2 = n,
                                _ => {
                                    m.remove(&f);
                                }
                            }
                        }
                    }
                    86..=89 => {
                        t.free_unreferenced(&store)?;
                        m.retain(|_, e| e.2 > 0);
                    }
                    90..=92 => t.trim(),
                    _ => {}
                }
                if step % 16 == 0 {
                    check(&t);
                    for &f in &ever {
                        let want = m.get(&f).map_or(0, |e| u64::from(e.2));
                        assert_eq!(t.refs(FrameNumber(f)), want, "seed {seed} step {step}");
                    }
                    for d in 0..4u32 {
                        for h in 0..41u64 {
                            let found = t.lookup(DomainId(d), h);
                            let any = m.iter().any(|(_, e)| e.0 == d && e.1 == h);
                            assert_eq!(found.is_some(), any, "seed {seed} step {step}");
                            if let Some(f) = found {
                                assert!(m.get(&f.0).is_some_and(|e| e.0 == d && e.1 == h));
                            }
                        }
                    }
                }
                assert_eq!(t.len(), m.len() as u64);
                assert_eq!(
                    t.total_refs(),
                    m.values().map(|e| u64::from(e.2)).sum::<u64>()
                );
                let g: u64 = guest.iter().map(|g| g.count).sum();
                assert_eq!(store.allocated_frames(), m.len() as u64 + g);
            }
        }
        Ok(())
    }
}
