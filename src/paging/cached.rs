//! Translating through a [`WalkCache`]: the cache wraps the walk. A hit is
//! answered from the cache (rights re-checked for this access and these
//! settings); a miss runs the walker's stages (`walker.rs`) with the
//! cache's upper-level entry as the start and its second-level memo lent
//! to the walk, then fills the cache from what the stages handed back.
//! The walk never calls the cache. Also the public doors that take a
//! cache: [`Walker::translate_with`], [`Walker::translate_pa`] and
//! [`BoundCache`], the lean hit.

use super::{
    cache::{CacheStats, TlbEntry, WalkCache, TLB_ACCESSED, TLB_DIRTY, TLB_GLOBAL},
    engine::Walked,
    fault::WalkFault,
    memory::PhysMemory,
    second::Memo,
    types::{Access, SecondOut},
    walker::{FirstLeaf, FirstRoot, Request, Translation, WalkOptions, Walker},
};
use crate::addr::{GuestPhysAddr, GuestVirtAddr};

impl Walker {
    /// Translates `va` for `access` with `options`, through `cache` when
    /// given: a hit costs no memory reference; a miss walks (starting from
    /// the deepest cached upper-level entry) and fills the cache.
    #[inline(always)]
    pub fn translate_with<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: GuestVirtAddr,
        access: Access,
        options: WalkOptions,
        cache: Option<&mut WalkCache>,
    ) -> Result<Translation, WalkFault> {
        match cache {
            Some(c) => c.translate(self, mem, va.0, access, options),
            None => self.translate_uncached(mem, va.0, access, options),
        }
    }

    /// The address in the walker's memory for `va` (what
    /// [`Walker::translate_with`] returns as [`Translation::pa`]), through
    /// `cache` when given. With a cache this binds it for one call
    /// ([`WalkCache::bind`]); to translate many addresses, bind once and
    /// call [`BoundCache::translate_pa`].
    #[inline]
    pub fn translate_pa<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: GuestVirtAddr,
        access: Access,
        options: WalkOptions,
        cache: Option<&mut WalkCache>,
    ) -> Result<GuestPhysAddr, WalkFault> {
        match cache {
            Some(c) => c.bind(self).translate_pa(mem, va, access, options),
            None => self
                .translate_uncached(mem, va.0, access, options)
                .map(|t| t.pa),
        }
    }
}

impl WalkCache {
    /// Translates `va` for `walker`: the hit, else [`WalkCache::miss`].
    #[inline(always)]
    pub(crate) fn translate<M: PhysMemory + ?Sized>(
        &mut self,
        walker: &Walker,
        mem: &M,
        va: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<Translation, WalkFault> {
        let checks = self.check_index(walker.check_config());
        let space = self.space_id(walker.space_key());
        if let Some(i) = self.lookup(space, va) {
            let set_ad = options.set_accessed_dirty;
            let mut changed = false;
            let t = answer(
                walker,
                self.entry(i),
                checks,
                va,
                access,
                set_ad,
                &mut changed,
            );
            if changed {
                // The entry's rights changed: its hit slot follows.
                self.sync_hit(i);
            }
            if let Some(t) = t {
                self.count_hit();
                return Ok(t);
            }
        }
        self.count_miss();
        self.miss(walker, mem, va, access, options)
    }

    /// The second-level memo, lent to one walk of `walker` (`None` without
    /// a second level, so a first-level-only walker never numbers a
    /// second-level key).
    #[inline]
    fn memo(&mut self, walker: &Walker) -> Option<Memo<'_>> {
        if !walker.has_second_level() {
            return None;
        }
        let space = self.space_id(walker.second_key());
        Some(Memo {
            memo: self.second_memo(),
            space,
        })
    }

    /// The miss: the walker's stages around the cache's start, memo and
    /// fill. Kept out of line so a hit stays a few instructions.
    #[inline(never)]
    fn miss<M: PhysMemory + ?Sized>(
        &mut self,
        walker: &Walker,
        mem: &M,
        va: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<Translation, WalkFault> {
        let set_ad = options.set_accessed_dirty;
        let req = Request { va, access, set_ad };
        let mut refs = 0;
        let mut caching = true;
        let walked = match walker.first_root(va, access)? {
            None => None,
            Some(mut root) => {
                let space = self.space_id(walker.space_key());
                if let Some(s) = self.lookup_upper(space, va, &root.fmt, set_ad) {
                    root.start = s;
                }
                let (walked, pinned) = self.walk_pinned(walker, &root, mem, req, &mut refs)?;
                caching = pinned && walker.cacheable(va);
                if caching {
                    let space = self.space_id(walker.space_key());
                    self.insert_upper(space, walker.pcid(), va, &root.fmt, &walked, set_ad);
                }
                Some(walked)
            }
        };
        let leaf = walker.first_leaf(va, walked.as_ref());
        let memo = if caching { self.memo(walker) } else { None };
        let second = walker.translate_second(mem, req, &leaf, memo, &mut refs)?;
        let t = walker.build_translation(va, &leaf, second.as_ref(), refs);
        if caching {
            self.fill(walker, req, &leaf, second, &t);
        }
        Ok(t)
    }

    /// The guest's levels, walked until every table the walk read was
    /// marked in the attached watch before it was read
    /// (`WalkCache::tables_pinned`): a write racing the walk then either
    /// shows in it or flushes the cache. The first walk through unmarked
    /// pages marks them and walks again. The flag is `false` when the
    /// tables kept changing under four walks: the last walk answers, and
    /// the caller caches nothing.
    fn walk_pinned<M: PhysMemory + ?Sized>(
        &mut self,
        walker: &Walker,
        root: &FirstRoot<'_>,
        mem: &M,
        req: Request,
        refs: &mut u32,
    ) -> Result<(Walked, bool), WalkFault> {
        let mut pinned = Vec::new();
        let mut tries = 0;
        loop {
            *refs = 0;
            let memo = self.memo(walker);
            let walked = walker.walk_levels(root, mem, req, memo, refs)?;
            if self.tables_pinned(&walked, &mut pinned) {
                return Ok((walked, true));
            }
            tries += 1;
            if tries > 3 {
                return Ok((walked, false));
            }
        }
    }

    /// Keeps the translation `t` that a miss of `walker` walked (its first
    /// level `leaf`, its second level `second`).
    fn fill(
        &mut self,
        walker: &Walker,
        req: Request,
        leaf: &FirstLeaf,
        second: Option<SecondOut>,
        t: &Translation,
    ) {
        let Request { va, access, set_ad } = req;
        let shift = second.map_or(leaf.shift, |s| s.shift.min(leaf.shift));
        let mask = (1u64 << shift) - 1;
        let mut flags = 0;
        if set_ad {
            flags |= TLB_ACCESSED;
            let dirty2 = second.is_none_or(|s| s.dirty);
            if access.is_write() || (leaf.attributes.dirty && dirty2) {
                flags |= TLB_DIRTY;
            }
        }
        if leaf.attributes.global {
            flags |= TLB_GLOBAL;
        }
        let s2 = second.unwrap_or_default();
        // The access that made the walk is allowed; others are checked on
        // the hit that first asks, then remembered.
        let bit = 1u32 << access.index();
        let check_tag = self.check_index(walker.check_config());
        let space = self.space_id(walker.space_key());
        self.insert(TlbEntry {
            space,
            tag: TlbEntry::tag_of(va, u32::from(shift)),
            gpa_base: leaf.gpa & !mask,
            pa_base: t.pa.0 & !mask,
            leaf1: leaf.leaf,
            leaf2: s2.leaf,
            acc1: (leaf.acc & 0xff) as u8,
            acc2: (s2.acc & 0xff) as u8,
            check_tag,
            rights: bit | (bit << 16),
            pcid: walker.pcid(),
            shift,
            shift1: leaf.shift,
            level1: leaf.level,
            shift2: s2.shift,
            level2: s2.level,
            flags,
        });
    }
}

/// A translation from a cache entry, if the entry answers this access
/// (permissions allow it, and no accessed/dirty update is due). Sets
/// `changed` when it changed the entry's remembered rights.
#[inline(always)]
fn answer(
    walker: &Walker,
    e: &mut TlbEntry,
    checks: u16,
    va: u64,
    access: Access,
    set_ad: bool,
    changed: &mut bool,
) -> Option<Translation> {
    if set_ad && (e.flags & TLB_ACCESSED == 0 || (access.is_write() && e.flags & TLB_DIRTY == 0)) {
        return None;
    }
    let mask = (1u64 << e.shift) - 1;
    let acc1 = u64::from(e.acc1);
    let acc2 = u64::from(e.acc2);
    let bit = 1u32 << access.index();
    if e.check_tag != checks {
        // The guest changed CR0.WP, SMEP, SMAP or its keys since: forget
        // what was checked under the old settings.
        e.check_tag = checks;
        e.rights = 0;
        *changed = true;
    }
    let allowed = if e.rights & bit != 0 {
        e.rights & (bit << 16) != 0
    } else {
        let ok = walker.allows(va, acc1, e.leaf1, acc2, e.leaf2, e.shift2 != 0, access);
        e.rights |= bit | if ok { bit << 16 } else { 0 };
        *changed = true;
        ok
    };
    if !allowed {
        return None;
    }
    let (permissions, attributes, arch_attributes) =
        walker.first_report(va, acc1, e.leaf1, e.level1);
    let second = if walker.has_second_level() {
        if e.shift2 == 0 {
            return None;
        }
        walker.second_report(&SecondOut {
            base: 0,
            shift: e.shift2,
            level: e.level2,
            acc: acc2,
            leaf: e.leaf2,
            accessed: false,
            dirty: false,
        })
    } else {
        None
    };
    Some(Translation {
        va: GuestVirtAddr(va),
        gpa: GuestPhysAddr(e.gpa_base | (va & mask)),
        pa: GuestPhysAddr(e.pa_base | (va & mask)),
        page_size: 1 << e.shift1,
        level: e.level1,
        permissions,
        attributes,
        arch_attributes,
        second,
        memory_refs: 0,
    })
}

/// A [`WalkCache`] bound to one [`Walker`] ([`WalkCache::bind`]): the
/// cache's numbers for the walker's address space and permission-check
/// settings are looked up once, so a hit of [`BoundCache::translate_pa`]
/// is the watch's generation compare, the set probe, one rights bit and
/// the page offset added: no `Translation` is built.
///
/// Exactly as correct as [`Walker::translate_with`]: the lean hit answers
/// only from an entry of this space whose rights for this access were
/// already checked under these settings (and whose walk set the
/// accessed/dirty flags an update would need), and only while the attached
/// `TableWatch` saw no table write; anything else (a miss, a first check
/// of an access, a pending flush) goes through `translate_with` with the
/// cache, which walks, checks, flushes and fills as always. The binding
/// borrows the cache, so nothing else can invalidate it meanwhile; drop it
/// to invalidate, then bind again.
#[derive(Debug)]
pub struct BoundCache<'a> {
    cache: &'a mut WalkCache,
    walker: &'a Walker,
    /// `cache.space_id(walker.space_key())`, valid until the cache
    /// renumbers (only inside a call that takes it `&mut`: the miss path,
    /// which refreshes both numbers).
    space: u64,
    /// `cache.check_index(walker.check_config())`, as `space`.
    checks: u16,
}

impl WalkCache {
    /// Binds this cache to `walker` for a run of translations
    /// ([`BoundCache`]).
    pub fn bind<'a>(&'a mut self, walker: &'a Walker) -> BoundCache<'a> {
        let space = self.space_id(walker.space_key());
        let checks = self.check_index(walker.check_config());
        self.front_claim(space, checks);
        BoundCache {
            cache: self,
            walker,
            space,
            checks,
        }
    }
}

impl BoundCache<'_> {
    /// The address in the walker's memory for `va`, as
    /// `walker.translate_with(mem, va, access, options, Some(cache))`
    /// would return in [`Translation::pa`], answered from the cache without
    /// building a `Translation` where it can.
    #[inline(always)]
    pub fn translate_pa<M: PhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        va: GuestVirtAddr,
        access: Access,
        options: WalkOptions,
    ) -> Result<GuestPhysAddr, WalkFault> {
        let need = if options.set_accessed_dirty {
            TLB_ACCESSED | if access.is_write() { TLB_DIRTY } else { 0 }
        } else {
            0
        };
        if let Some(pa) = self.cache.front_hit(va.0, access.index(), need) {
            return Ok(GuestPhysAddr(pa));
        }
        match self
            .cache
            .hit_pa(self.space, self.checks, va.0, access.index(), need)
        {
            Some(pa) => Ok(GuestPhysAddr(pa)),
            None => self.miss_pa(mem, va, access, options),
        }
    }

    /// The full translation, as [`Walker::translate_with`] with the cache.
    #[inline]
    pub fn translate<M: PhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        va: GuestVirtAddr,
        access: Access,
        options: WalkOptions,
    ) -> Result<Translation, WalkFault> {
        let r = self
            .cache
            .translate(self.walker, mem, va.0, access, options);
        self.refresh();
        r
    }

    /// The walker bound.
    pub fn walker(&self) -> &Walker {
        self.walker
    }

    /// The cache's counts so far.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Everything but the lean hit: the full path, then the numbers again
    /// (the full path may have renumbered spaces or settings).
    #[inline(never)]
    fn miss_pa<M: PhysMemory + ?Sized>(
        &mut self,
        mem: &M,
        va: GuestVirtAddr,
        access: Access,
        options: WalkOptions,
    ) -> Result<GuestPhysAddr, WalkFault> {
        self.translate(mem, va, access, options).map(|t| t.pa)
    }

    fn refresh(&mut self) {
        self.space = self.cache.space_id(self.walker.space_key());
        self.checks = self.cache.check_index(self.walker.check_config());
        self.cache.front_claim(self.space, self.checks);
    }
}
