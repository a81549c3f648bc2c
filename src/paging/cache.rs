//! `WalkCache`: what a TLB and paging-structure caches keep, in software —
//! final translations (guest-virtual to the walker's memory, both levels
//! folded in), upper-level guest entries (so a miss starts its walk low in
//! the tree), and second-level translations of guest-physical pages (so a
//! nested walk reads guest tables without walking the second level again).
//!
//! A cache belongs to one vCPU, as a TLB does: it is `&mut` on every use, so
//! a hit is a few loads with no atomics. Entries carry the number of the
//! walker's exact address-space key (root and PCID from CR3, mode and
//! format settings, second level root and settings), so one cache serves
//! a guest that switches CR3, and two spaces can never share an entry;
//! `Walker::space` is a hash of the key for naming a space to
//! invalidate. Like a
//! TLB, it is not coherent with the tables: after the guest (or the VMM)
//! edits page tables, invalidate — per address ([`WalkCache::invalidate_page`],
//! INVLPG), per address space ([`WalkCache::invalidate_space`],
//! [`WalkCache::invalidate_pcid`]: MOV CR3, INVPCID), the second level
//! ([`WalkCache::invalidate_second_level`]: INVEPT) or everything — or
//! attach a [`TableWatch`] so that writes to page-table pages through the
//! library invalidate for you.
//!
//! Permissions are checked again on every hit (CR0.WP, SMEP, SMAP and PKRU
//! are not part of the tag), and an access that needs an accessed or dirty
//! flag set that the cached walk did not set misses, so the walk sets it.
//!
//! [`WalkCache::bind`] binds a cache to one walker for a run of
//! translations (`BoundCache`, in `cached.rs`): its `translate_pa`
//! answers a hit with the
//! address alone from a 32-byte hit slot per entry, and sends everything
//! else down the full path.
//!
//! This file is the storage: entries, their lookups, fills and
//! invalidation. It never walks; translating through a cache (the hit,
//! and the walk around which a miss fills the cache) is `cached.rs`.

use std::sync::Arc;

pub use super::watch::TableWatch;
use super::{
    engine::{Start, Walked},
    format::Format,
    second::{memo_slot, SecondMemo},
    walker::{space_tag, SpaceKey},
};
use crate::addr::{GuestVirtAddr, PAGE_SHIFT};

/// Translation sets; `TLB_WAYS` ways each.
const TLB_SETS: usize = 512;
/// Ways per set.
const TLB_WAYS: usize = 4;
const UPPER_SLOTS: usize = 512;
/// Slots of the lean path's direct-mapped front (16 bytes each: 32 KiB).
const FRONT_SLOTS: usize = 2048;
/// A front slot's value: the 4 KiB frame's address (bits 12..52).
const FRONT_PA: u64 = ((1 << 52) - 1) & !PAGE_OFFSET;
/// The offset bits of a 4 KiB page.
const PAGE_OFFSET: u64 = (1 << PAGE_SHIFT) - 1;
/// A front slot's value: the walk set the accessed (bit 52) and dirty (bit
/// 53) flags; `TLB_ACCESSED` and `TLB_DIRTY` shifted up by this.
const FRONT_FLAGS_SHIFT: u32 = 51;
/// A front key's epoch: bits 52..64 (a 4 KiB page number has 52 bits).
const FRONT_EPOCH_SHIFT: u32 = 52;

/// A cached final translation: one cache line, so a hit reads one line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TlbEntry {
    /// The space number (never 0 while valid; 0 once dropped, so a probe
    /// needs no separate validity test).
    pub(crate) space: u64,
    /// [`TlbEntry::tag_of`]: `va >> shift` with `shift` in bits 58..64, so
    /// one compare matches page and size.
    pub(crate) tag: u64,
    pub(crate) gpa_base: u64,
    pub(crate) pa_base: u64,
    pub(crate) leaf1: u64,
    pub(crate) leaf2: u64,
    /// Accumulated permission bits of each level (the low byte: the
    /// rights, without the levels a fault report would name).
    pub(crate) acc1: u8,
    pub(crate) acc2: u8,
    /// The number (see `WalkCache::check_index`) of the walker's exact
    /// permission-check settings (CR0.WP, SMEP, SMAP, keys) when `rights`
    /// was filled: the rights hold only while they match.
    pub(crate) check_tag: u16,
    /// Bit `Access::index()` set: that access was checked (bits 0..12),
    /// and, 16 bits up, allowed. Filled as accesses come.
    pub(crate) rights: u32,
    pub(crate) pcid: u16,
    /// log2 of the span this entry covers (the smaller of both levels'
    /// pages).
    pub(crate) shift: u8,
    pub(crate) shift1: u8,
    pub(crate) level1: u8,
    /// 0 without a second level.
    pub(crate) shift2: u8,
    pub(crate) level2: u8,
    pub(crate) flags: u8,
}

impl TlbEntry {
    /// The tag of the `1 << shift`-byte page holding `va` (`shift` >= 12,
    /// so `va >> shift` fits in 52 bits and bits 58.. are free).
    #[inline(always)]
    pub(crate) fn tag_of(va: u64, shift: u32) -> u64 {
        (va >> shift) | (u64::from(shift) << 58)
    }

    /// `va >> shift` of the page this entry covers.
    fn page(&self) -> u64 {
        self.tag & ((1 << 58) - 1)
    }

    /// Drops the entry: a cleared `space` never matches a probe.
    fn clear(&mut self) {
        self.flags = 0;
        self.space = 0;
    }
}

/// What a lean hit reads of a TLB entry, kept beside the entries in their
/// own array (32 bytes each, 64 KiB in all, against 128 KiB of entries) so
/// that the lean hits of a well-filled cache mostly stay in the L1 data
/// cache. Always equal to [`HitSlot::of`] its entry: every change of an
/// entry goes through `WalkCache` methods that copy it here.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HitSlot {
    /// The entry's `tag`.
    tag: u64,
    /// The entry's `space` (0: dropped).
    space: u64,
    /// The entry's `pa_base`.
    pa_base: u64,
    /// The entry's `check_tag`.
    check_tag: u16,
    /// Bit `Access::index()`: that access is known to be allowed under
    /// check settings `check_tag` (the entry's `rights >> 16`).
    allowed: u16,
    /// The entry's `flags`.
    flags: u8,
}

impl HitSlot {
    #[inline(always)]
    fn of(e: &TlbEntry) -> Self {
        HitSlot {
            tag: e.tag,
            space: e.space,
            pa_base: e.pa_base,
            check_tag: e.check_tag,
            allowed: (e.rights >> 16) as u16,
            flags: e.flags,
        }
    }
}

/// One 4 KiB page's translation in the lean path's front
/// ([`WalkCache::front_hit`]): `key` is the page number (`va >> 12`) with
/// the front's epoch in bits 52..64 (epoch 0 is never current, so an empty
/// slot never matches); `value` is the frame's address (`FRONT_PA`), bit
/// `Access::index()` for each access known allowed (bits 0..12), and the
/// accessed/dirty flags the walk set (bits 52, 53).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
struct FrontSlot {
    key: u64,
    value: u64,
}

/// The entry holds a translation.
pub(crate) const TLB_VALID: u8 = 1;
/// The walk that filled it set the accessed flags.
pub(crate) const TLB_ACCESSED: u8 = 2;
/// ... and the dirty flags.
pub(crate) const TLB_DIRTY: u8 = 4;
/// x86 global page.
pub(crate) const TLB_GLOBAL: u8 = 8;

#[derive(Clone, Copy, Debug, Default)]
struct UpperSlot {
    valid: bool,
    /// The walk that filled it set the accessed flags above `level`.
    accessed: bool,
    level: u8,
    pcid: u16,
    space: u64,
    tag: u64,
    table: u64,
    acc: u64,
}

/// Hit and miss counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Translations answered from the cache.
    pub hits: u64,
    /// Translations that walked.
    pub misses: u64,
    /// Walks that started below the root thanks to a cached upper entry.
    pub upper_hits: u64,
    /// Second-level translations answered from the cache.
    pub nested_hits: u64,
    /// Whole-cache flushes caused by a [`TableWatch`].
    pub watch_flushes: u64,
}

/// A software TLB and paging-structure cache for one vCPU.
#[derive(Debug)]
pub struct WalkCache {
    /// `TLB_WAYS` (4) ways per set, set `s` at `s * TLB_WAYS..`; the most
    /// recent in the first. An array, so a masked set index needs no bounds
    /// check.
    tlb: Box<[TlbEntry; TLB_WAYS * TLB_SETS]>,
    /// `HitSlot::of` each entry: entry `s * TLB_WAYS + w` at `[s][w]`.
    hits: Box<[[HitSlot; TLB_WAYS]; TLB_SETS]>,
    /// The lean path's direct-mapped front: 4 KiB pieces of entries that
    /// answered lean hits for one owner (space and check settings,
    /// `front_owner`), slot `(va >> 12) % FRONT_SLOTS`. A hit is one slot
    /// compare; anything else falls to the sets. Only valid slots of the
    /// current epoch match, and every change that could make a slot wrong
    /// starts a new epoch (`front_flush`) or clears the slots it covers
    /// (`insert`).
    front: Box<[FrontSlot; FRONT_SLOTS]>,
    /// The current epoch, shifted to bits 52..64 (never 0).
    front_epoch: u64,
    /// The (space number, check number) whose translations the front holds.
    front_owner: (u64, u16),
    upper: Box<[UpperSlot]>,
    /// Second-level translations, lent to walks.
    nested: SecondMemo,
    /// Bit `s` set: some TLB entry covers `1 << s` bytes.
    shifts: u64,
    /// Some TLB entry covers less than its guest page (a large guest page
    /// over smaller second-level pages).
    splintered: bool,
    /// Some TLB entry may be a global translation.
    globals: bool,
    stats: CacheStats,
    watch: Option<(Arc<TableWatch>, u64)>,
    /// Permission-check settings seen, numbered by position; the last one
    /// asked for, with its number, answers the common case in a compare.
    check_configs: Vec<u128>,
    last_check: (u128, u16),
    /// Address-space keys seen (`Walker`'s exact keys); an entry's `space`
    /// is its key's number here plus one, so equal numbers mean equal keys.
    spaces: Vec<SpaceKey>,
    last_space: (SpaceKey, u64),
}

impl Default for WalkCache {
    fn default() -> Self {
        Self::new()
    }
}

/// The set of a translation: the page number's low bits (`page` is `va >>
/// shift`) pick it, so consecutive pages of one space land in consecutive
/// sets and a range never conflicts with itself; the space's number, xored
/// in, moves other spaces' pages to other sets. Pages of different sizes
/// may share a set (their tags differ). Way `w` of set `s` is entry
/// `s * TLB_WAYS + w`: a set's hit slots are two adjacent cache lines, the
/// first two ways (where most hits land) in one.
#[inline(always)]
fn tlb_set(space: u64, page: u64) -> usize {
    crate::addr::usize_from(space ^ page) & (TLB_SETS - 1)
}

impl WalkCache {
    /// An empty cache (2048 translations in 512 sets of 4 ways, 512 upper-level
    /// entries, 1024 second-level translations).
    pub fn new() -> Self {
        WalkCache {
            tlb: Box::new([TlbEntry::default(); TLB_WAYS * TLB_SETS]),
            hits: Box::new([[HitSlot::default(); TLB_WAYS]; TLB_SETS]),
            front: Box::new([FrontSlot::default(); FRONT_SLOTS]),
            front_epoch: 1 << FRONT_EPOCH_SHIFT,
            front_owner: (0, 0),
            upper: vec![UpperSlot::default(); UPPER_SLOTS].into_boxed_slice(),
            nested: SecondMemo::new(),
            shifts: 0,
            splintered: false,
            globals: false,
            stats: CacheStats::default(),
            watch: None,
            check_configs: vec![0],
            last_check: (0, 0),
            spaces: Vec::new(),
            last_space: ([u64::MAX; 8], 0),
        }
    }

    /// Attaches `watch`: writes it is told of flush this cache. Everything
    /// cached so far is dropped: the watch knows nothing of the tables it
    /// came from, so it could not tell when they change.
    pub fn attach_watch(&mut self, watch: Arc<TableWatch>) {
        self.invalidate_all();
        let g = watch.generation();
        self.watch = Some((watch, g));
    }

    /// With a watch attached: marks the table pages `walked` read (from its
    /// first level down to its leaf) in the watch, and says whether all of
    /// them are in `pinned`, the pages this translation marked before the
    /// walk began; the pages not yet there are added (at most 24). Without
    /// a watch: `true`.
    ///
    /// A translation may cache a walk only if every table it read was
    /// marked before the read (then any later write to those tables, told
    /// to the watch, flushes this cache); a walk whose pages were not is
    /// walked again (`WalkCache::walk_pinned`).
    pub(crate) fn tables_pinned(&self, walked: &Walked, pinned: &mut Vec<u64>) -> bool {
        let Some((watch, _)) = &self.watch else {
            return true;
        };
        let mut all = true;
        for level in walked.leaf_level.max(1)..=walked.start_level.min(5) {
            let page = walked.tables[usize::from(level)].0 >> PAGE_SHIFT;
            if !pinned.contains(&page) {
                all = false;
                if pinned.len() < 24 {
                    pinned.push(page);
                }
                watch.note_table(page << PAGE_SHIFT);
            }
        }
        all
    }

    /// The number of an exact permission-check configuration. Numbers are
    /// stable until 65536 distinct ones were seen; then every entry is
    /// dropped and numbering starts again, so a number never names two.
    #[inline(always)]
    pub(crate) fn check_index(&mut self, config: u128) -> u16 {
        if self.last_check.0 == config {
            return self.last_check.1;
        }
        self.check_index_slow(config)
    }

    #[inline(never)]
    fn check_index_slow(&mut self, config: u128) -> u16 {
        let i = match self.check_configs.iter().position(|&c| c == config) {
            Some(i) => i,
            None => {
                if self.check_configs.len() > usize::from(u16::MAX) {
                    self.invalidate_all();
                    self.check_configs.clear();
                }
                self.check_configs.push(config);
                self.check_configs.len() - 1
            }
        };
        let i = u16::try_from(i).unwrap_or(0);
        self.last_check = (config, i);
        i
    }

    /// The number of an exact address-space key (never 0). Stable until a
    /// million distinct keys were seen; then every entry is dropped and
    /// numbering starts again, so a number never names two keys.
    #[inline(always)]
    pub(crate) fn space_id(&mut self, key: &SpaceKey) -> u64 {
        if self.last_space.0 == *key {
            return self.last_space.1;
        }
        self.space_id_slow(key)
    }

    #[inline(never)]
    fn space_id_slow(&mut self, key: &SpaceKey) -> u64 {
        let i = match self.spaces.iter().position(|k| k == key) {
            Some(i) => i,
            None => {
                if self.spaces.len() >= 1 << 20 {
                    self.invalidate_all();
                    self.spaces.clear();
                }
                self.spaces.push(*key);
                self.spaces.len() - 1
            }
        };
        let id = i as u64 + 1;
        self.last_space = (*key, id);
        id
    }

    /// The numbers of the keys whose public tag is `tag`.
    fn ids_of(&self, tag: u64) -> Vec<u64> {
        self.spaces
            .iter()
            .enumerate()
            .filter(|(_, k)| space_tag(k) == tag)
            .map(|(i, _)| i as u64 + 1)
            .collect()
    }

    /// Hit and miss counts so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            nested_hits: self.nested.hits(),
            ..self.stats
        }
    }

    /// Drops every entry.
    pub fn invalidate_all(&mut self) {
        self.front_flush();
        self.tlb.iter_mut().for_each(TlbEntry::clear);
        self.sync_all_hits();
        self.upper.iter_mut().for_each(|s| s.valid = false);
        self.nested.clear();
        self.shifts = 0;
    }

    /// Drops what covers `va` in address space `space` (INVLPG), global
    /// translations included, and that space's upper-level entries (as
    /// INVLPG drops paging-structure caches for the current PCID).
    pub fn invalidate_page(&mut self, space: u64, va: GuestVirtAddr) {
        let va = va.0;
        self.front_flush();
        for id in self.ids_of(space) {
            self.invalidate_page_of(id, va);
        }
        // INVLPG drops global translations of the page whatever their
        // PCID (SDM 4.10.4.1): those cached under other spaces go too.
        if self.globals {
            let mut any = false;
            for e in self.tlb.iter_mut() {
                if e.flags & TLB_GLOBAL != 0 {
                    any = true;
                    let first_page = (e.page() << e.shift) >> e.shift1;
                    if first_page == va >> e.shift1 {
                        e.clear();
                    }
                }
            }
            self.globals = any;
            self.sync_all_hits();
        }
    }

    fn invalidate_page_of(&mut self, space: u64, va: u64) {
        if self.splintered {
            // A large guest page over smaller second-level pages is cached
            // as pieces; INVLPG drops every piece of the guest's page.
            for e in self.tlb.iter_mut() {
                let first_page = (e.page() << e.shift) >> e.shift1;
                if e.space == space && first_page == va >> e.shift1 {
                    e.clear();
                }
            }
            self.sync_all_hits();
        }
        for s in 0..64u32 {
            if self.shifts & (1 << s) == 0 {
                continue;
            }
            let set = tlb_set(space, va >> s);
            let tag = TlbEntry::tag_of(va, s);
            for w in 0..TLB_WAYS {
                let e = &mut self.tlb[set * TLB_WAYS + w];
                if e.tag == tag && e.space == space {
                    e.clear();
                    self.hits[set][w] = HitSlot::of(e);
                }
            }
        }
        self.upper
            .iter_mut()
            .filter(|u| u.space == space)
            .for_each(|u| u.valid = false);
    }

    /// Drops every entry of address space `space` (a CR3 switch without
    /// PCID preservation, INVPCID single-context); global translations go
    /// too, which is conservative.
    pub fn invalidate_space(&mut self, space: u64) {
        self.front_flush();
        for id in self.ids_of(space) {
            self.tlb
                .iter_mut()
                .filter(|e| e.space == id)
                .for_each(TlbEntry::clear);
            self.sync_all_hits();
            self.upper
                .iter_mut()
                .filter(|s| s.space == id)
                .for_each(|s| s.valid = false);
        }
    }

    /// Drops every entry tagged with `pcid`, whatever its CR3, except global
    /// translations (INVPCID single-context, MOV CR3 with CR4.PGE).
    pub fn invalidate_pcid(&mut self, pcid: u16) {
        self.front_flush();
        self.tlb
            .iter_mut()
            .filter(|e| e.pcid == pcid && e.flags & TLB_GLOBAL == 0)
            .for_each(TlbEntry::clear);
        self.sync_all_hits();
        self.upper
            .iter_mut()
            .filter(|s| s.pcid == pcid)
            .for_each(|s| s.valid = false);
    }

    /// Drops what depends on the second level (INVEPT, a change of NPT
    /// entries): every final translation and every cached second-level
    /// translation. Upper-level guest entries hold guest-physical table
    /// addresses and stay.
    pub fn invalidate_second_level(&mut self) {
        self.front_flush();
        self.tlb.iter_mut().for_each(TlbEntry::clear);
        self.sync_all_hits();
        self.nested.clear();
        self.shifts = 0;
    }

    /// Copies every entry's hit slot (after a bulk change of entries).
    fn sync_all_hits(&mut self) {
        for (h, e) in self.hits.iter_mut().flatten().zip(self.tlb.iter()) {
            *h = HitSlot::of(e);
        }
    }

    /// Flushes everything if the watch saw a page-table write since last
    /// time.
    #[inline(always)]
    fn sync_watch(&mut self) {
        let Some((w, seen)) = &self.watch else {
            return;
        };
        let g = w.generation();
        if g != *seen {
            self.watch = self.watch.take().map(|(w, _)| (w, g));
            self.invalidate_all();
            self.stats.watch_flushes += 1;
        }
    }

    /// The index of the entry translating `va` in `space`.
    #[inline(always)]
    pub(crate) fn lookup(&mut self, space: u64, va: u64) -> Option<usize> {
        self.sync_watch();
        self.probe(space, va)
    }

    /// The index of the entry translating `va` in `space` (a number from
    /// `space_id`, never 0), without looking at the watch: per page size
    /// cached, the set, then one tag and one space compare per way (a
    /// dropped entry's space is 0, its tag holds the size). The full path
    /// reads the entries themselves (it needs the line anyway); the lean
    /// path reads the hit slots (`probe_hit`).
    #[inline(always)]
    fn probe(&self, space: u64, va: u64) -> Option<usize> {
        let mut shifts = self.shifts;
        while shifts != 0 {
            let s = shifts.trailing_zeros();
            shifts &= shifts - 1;
            let set = tlb_set(space, va >> s);
            let tag = TlbEntry::tag_of(va, s);
            for i in set * TLB_WAYS..(set + 1) * TLB_WAYS {
                let e = &self.tlb[i];
                if e.tag == tag && e.space == space {
                    return Some(i);
                }
            }
        }
        None
    }

    /// As `probe`, the hit slot itself, and the page's shift.
    #[inline(always)]
    fn probe_hit(&self, space: u64, va: u64) -> Option<(&HitSlot, u32)> {
        let mut shifts = self.shifts;
        while shifts != 0 {
            let s = shifts.trailing_zeros();
            shifts &= shifts - 1;
            let page = va >> s;
            let tag = page | (u64::from(s) << 58);
            let set = tlb_set(space, page);
            for (w, h) in self.hits[set].iter().enumerate() {
                debug_assert_eq!(*h, HitSlot::of(&self.tlb[set * TLB_WAYS + w]), "in sync");
                if h.tag == tag && h.space == space {
                    return Some((h, s));
                }
            }
        }
        None
    }

    /// The lean hit: the address in the walker's memory for `va`, if the
    /// entry for it in `space` is known to allow the access numbered
    /// `access_index` under check settings `checks` and has set the
    /// accessed/dirty flags in `need` (`TLB_ACCESSED`, `TLB_DIRTY`), and
    /// the watch saw no table write since the last sync. `None` says
    /// nothing: the caller takes the full path, which decides.
    #[inline(always)]
    pub(crate) fn hit_pa(
        &mut self,
        space: u64,
        checks: u16,
        va: u64,
        access_index: u32,
        need: u8,
    ) -> Option<u64> {
        if let Some((w, seen)) = &self.watch {
            if w.generation() != *seen {
                return None;
            }
        }
        let (h, s) = self.probe_hit(space, va)?;
        if h.check_tag != checks || h.allowed & (1 << access_index) == 0 {
            return None;
        }
        if h.flags & need != need {
            return None;
        }
        let offset = va - ((va >> s) << s);
        let pa = h.pa_base | offset;
        let (allowed, flags) = (h.allowed, h.flags);
        self.stats.hits += 1;
        if self.front_owner == (space, checks) {
            self.front_fill(va, pa, allowed, flags);
        }
        Some(pa)
    }

    /// Starts a new front epoch: every front slot stops matching. After
    /// 4095 epochs the slots are cleared and the count starts again, so an
    /// epoch never comes back while a slot of it remains.
    fn front_flush(&mut self) {
        let next = (self.front_epoch >> FRONT_EPOCH_SHIFT) + 1;
        if next >> (64 - FRONT_EPOCH_SHIFT) != 0 {
            self.front.fill(FrontSlot::default());
            self.front_epoch = 1 << FRONT_EPOCH_SHIFT;
        } else {
            self.front_epoch = next << FRONT_EPOCH_SHIFT;
        }
    }

    /// Drops the front slots of the 4 KiB pages of `[va, va + (1 << shift))`
    /// (a new entry for them may differ from what the front holds).
    fn front_forget(&mut self, va: u64, shift: u8) {
        let first = va >> PAGE_SHIFT;
        let pages = 1u64 << (u32::from(shift).saturating_sub(PAGE_SHIFT)).min(63);
        if pages > FRONT_SLOTS as u64 {
            self.front_flush();
            return;
        }
        for page in first..first.saturating_add(pages) {
            let s = &mut self.front[crate::addr::usize_from(page) % FRONT_SLOTS];
            if s.key & ((1 << FRONT_EPOCH_SHIFT) - 1) == page {
                *s = FrontSlot::default();
            }
        }
    }

    /// Makes the front hold translations of `space` under check settings
    /// `checks` (a `BoundCache`'s numbers), starting a new epoch if
    /// it held another's.
    #[inline(always)]
    pub(crate) fn front_claim(&mut self, space: u64, checks: u16) {
        if self.front_owner != (space, checks) {
            self.front_owner = (space, checks);
            self.front_flush();
        }
    }

    /// The front's answer for `va`, for the owner's translations
    /// (`front_claim`): the address, if the 4 KiB page's slot is of the
    /// current epoch, allows the access numbered `access_index` and has
    /// the accessed/dirty flags in `need`, and the watch saw no table
    /// write. `None` says nothing.
    #[inline(always)]
    pub(crate) fn front_hit(&mut self, va: u64, access_index: u32, need: u8) -> Option<u64> {
        if let Some((w, seen)) = &self.watch {
            if w.generation() != *seen {
                return None;
            }
        }
        let page = va >> PAGE_SHIFT;
        let s = self.front[crate::addr::usize_from(page) % FRONT_SLOTS];
        let want = (1u64 << (access_index & 15)) | (u64::from(need) << FRONT_FLAGS_SHIFT);
        if s.key != page | self.front_epoch || s.value & want != want {
            return None;
        }
        self.stats.hits += 1;
        Some((s.value & FRONT_PA) | (va & PAGE_OFFSET))
    }

    /// Keeps in the front what a lean hit of the sets for `va` found: the
    /// 4 KiB page at `pa` (of the owner's space), with the accesses in
    /// `allowed` (bit `Access::index()`, checked under the owner's check
    /// settings) and the entry's `flags`.
    #[inline(always)]
    fn front_fill(&mut self, va: u64, pa: u64, allowed: u16, flags: u8) {
        if pa & !FRONT_PA & !PAGE_OFFSET != 0 {
            // Past 52 bits: not representable; the sets answer it.
            return;
        }
        let page = va >> PAGE_SHIFT;
        let flags = u64::from(flags & (TLB_ACCESSED | TLB_DIRTY)) << FRONT_FLAGS_SHIFT;
        self.front[crate::addr::usize_from(page) % FRONT_SLOTS] = FrontSlot {
            key: page | self.front_epoch,
            value: (pa & FRONT_PA) | u64::from(allowed & 0xfff) | flags,
        };
    }

    /// The entry at `i` (from `lookup`). Whoever changes it calls
    /// `sync_hit(i)` before the cache is probed again.
    #[inline(always)]
    pub(crate) fn entry(&mut self, i: usize) -> &mut TlbEntry {
        &mut self.tlb[i & (TLB_WAYS * TLB_SETS - 1)]
    }

    /// Copies the entry at `i` to its hit slot.
    #[inline(always)]
    pub(crate) fn sync_hit(&mut self, i: usize) {
        let i = i & (TLB_WAYS * TLB_SETS - 1);
        self.hits[i / TLB_WAYS][i % TLB_WAYS] = HitSlot::of(&self.tlb[i]);
    }

    pub(crate) fn insert(&mut self, mut entry: TlbEntry) {
        debug_assert!(entry.space != 0, "space numbers start at 1");
        debug_assert_eq!(entry.tag >> 58, u64::from(entry.shift), "tag from tag_of");
        entry.flags |= TLB_VALID;
        self.front_forget(entry.page() << entry.shift, entry.shift);
        let set = tlb_set(entry.space, entry.page());
        let same = |e: &TlbEntry| e.tag == entry.tag && e.space == entry.space;
        // Most recent first: the entry goes to way 0 and the others move
        // down one, dropping the last (or the entry's own older copy).
        let first = set * TLB_WAYS;
        let end = (0..TLB_WAYS)
            .find(|&w| {
                let e = &self.tlb[first + w];
                same(e) || e.space == 0
            })
            .unwrap_or(TLB_WAYS - 1);
        for w in (0..end).rev() {
            self.tlb[first + w + 1] = self.tlb[first + w];
            self.hits[set][w + 1] = self.hits[set][w];
        }
        self.tlb[first] = entry;
        self.hits[set][0] = HitSlot::of(&entry);
        self.shifts |= 1 << entry.shift;
        self.splintered |= entry.shift < entry.shift1;
        self.globals |= entry.flags & TLB_GLOBAL != 0;
    }

    pub(crate) fn count_hit(&mut self) {
        self.stats.hits += 1;
    }

    pub(crate) fn count_miss(&mut self) {
        self.stats.misses += 1;
    }

    /// The deepest cached upper-level entry for `va`, as a walk start.
    pub(crate) fn lookup_upper<F: Format>(
        &mut self,
        space: u64,
        va: u64,
        fmt: &F,
        need_accessed: bool,
    ) -> Option<Start> {
        for level in 1..fmt.top_level() {
            let tag = va >> fmt.index_shift(level + 1);
            let u = &self.upper[memo_slot(space, tag, u64::from(level) << 8, UPPER_SLOTS)];
            if u.valid
                && u.space == space
                && u.level == level
                && u.tag == tag
                && (u.accessed || !need_accessed)
            {
                self.stats.upper_hits += 1;
                return Some(Start {
                    level,
                    table: u.table,
                    acc: u.acc,
                });
            }
        }
        None
    }

    /// Keeps the tables a walk used below its start.
    pub(crate) fn insert_upper<F: Format>(
        &mut self,
        space: u64,
        pcid: u16,
        va: u64,
        fmt: &F,
        w: &Walked,
        accessed: bool,
    ) {
        let top = fmt.top_level();
        for level in w.leaf_level.max(1)..w.start_level.min(top) {
            let (table, acc) = w.tables[usize::from(level)];
            let tag = va >> fmt.index_shift(level + 1);
            let i = memo_slot(space, tag, u64::from(level) << 8, UPPER_SLOTS);
            self.upper[i] = UpperSlot {
                valid: true,
                accessed,
                level,
                pcid,
                space,
                tag,
                table,
                acc,
            };
        }
    }

    /// The second-level memo, to lend to a walk.
    #[inline]
    pub(crate) fn second_memo(&mut self) -> &mut SecondMemo {
        &mut self.nested
    }
}
