//! The lean cached path (`WalkCache::bind` then `BoundCache::translate_pa`,
//! and `Walker::translate_pa`): every answer equals the full translation's
//! address (or fault), hits count as hits, and after any invalidation —
//! per page, per space, everything, or a `TableWatch`-seen table write —
//! the lean path misses and walks again.

#![allow(clippy::unwrap_used)]

use pagefold::{
    paging::{
        x86::CR0_WP, Access, TableWatch, WalkCache, WalkFault, WalkOptions, Walker, X86Paging,
    },
    GuestMemory, GuestPhysAddr, GuestVirtAddr,
};

const MEM: u64 = 16 << 20;
const OPTS: WalkOptions = WalkOptions {
    set_accessed_dirty: false,
};

/// A small xorshift generator (deterministic, no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 4-level tables built from `0x1000` up.
struct Tables<'m> {
    mem: &'m GuestMemory,
    next: u64,
}

impl Tables<'_> {
    const ROOT: u64 = 0x1000;

    fn new(mem: &GuestMemory) -> Tables<'_> {
        Tables { mem, next: 0x2000 }
    }

    /// Maps `va` to `pa` with a leaf at `leaf_level` (1: 4 KiB, 2: 2 MiB)
    /// and leaf flags `flags` (present added); returns the leaf's address.
    fn map(&mut self, va: u64, pa: u64, leaf_level: u32, flags: u64) -> u64 {
        let mut table = Self::ROOT;
        for level in (leaf_level + 1..=4).rev() {
            let at = GuestPhysAddr(table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8);
            let e: u64 = self.mem.read_obj(at).unwrap();
            table = if e & 1 != 0 && e & 0x80 == 0 {
                e & 0x000f_ffff_ffff_f000
            } else {
                let t = self.next;
                self.next += 0x1000;
                self.mem.write_obj(at, t | 0x7).unwrap();
                t
            };
        }
        let at = table + ((va >> (12 + 9 * (leaf_level - 1))) & 0x1ff) * 8;
        let large = if leaf_level > 1 { 0x80 } else { 0 };
        self.mem
            .write_obj(GuestPhysAddr(at), pa | flags | 0x1 | large)
            .unwrap();
        at
    }
}

const ACCESSES: [Access; 6] = [
    Access::read(),
    Access::write(),
    Access::fetch(),
    Access::read().user(),
    Access::write().user(),
    Access::fetch().user(),
];

/// Random 4 KiB and 2 MiB pages with random R/W, U/S and XD; every lean
/// answer equals the uncached full translation, the second pass is all
/// hits, and the convenience form agrees.
#[test]
fn lean_hits_equal_full_translations() {
    for seed in 1..=8u64 {
        let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
        let mut t = Tables::new(&mem);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut vas = Vec::new();
        for _ in 0..200 {
            let large = rng.below(4) == 0;
            let (level, shift) = if large { (2, 21) } else { (1, 12) };
            // Canonical addresses in both halves.
            let mut va = (rng.next() & ((1 << 47) - 1)) >> shift << shift;
            if rng.below(2) == 0 {
                va |= 0xffff_8000_0000_0000;
            }
            let pa = (rng.next() & ((1 << 40) - 1)) >> shift << shift;
            let flags = (rng.below(2) << 1) | (rng.below(2) << 2) | (rng.below(2) << 63);
            t.map(va, pa, level, flags);
            vas.push(va + rng.below(1 << shift));
            vas.push(va ^ (1 << 30)); // mostly unmapped
        }
        let regs = X86Paging {
            efer: X86Paging::long_mode(Tables::ROOT).efer | (1 << 11),
            ..X86Paging::long_mode(Tables::ROOT)
        };
        let walker = Walker::new(regs).unwrap();
        let mut cache = WalkCache::new();
        for pass in 0..2 {
            let before = cache.stats();
            let mut hits = 0;
            let mut bound = cache.bind(&walker);
            for &va in &vas {
                for a in ACCESSES {
                    let full = walker.translate(&mem, GuestVirtAddr(va), a).map(|t| t.pa);
                    let lean = bound.translate_pa(&mem, GuestVirtAddr(va), a, OPTS);
                    assert_eq!(lean, full, "seed {seed} pass {pass} va {va:#x} {a:?}");
                    hits += u64::from(full.is_ok());
                }
            }
            let after = cache.stats();
            if pass == 1 {
                // Every translation that succeeded was a hit; faults walk.
                assert!(after.hits - before.hits >= hits - hits / 20, "{after:?}");
            }
            let mut other = WalkCache::new();
            for &va in vas.iter().take(50) {
                let a = Access::read();
                assert_eq!(
                    walker.translate_pa(&mem, GuestVirtAddr(va), a, OPTS, Some(&mut other)),
                    walker.translate_pa(&mem, GuestVirtAddr(va), a, OPTS, None),
                );
                assert_eq!(
                    walker.translate_pa(&mem, GuestVirtAddr(va), a, OPTS, None),
                    walker.translate(&mem, GuestVirtAddr(va), a).map(|t| t.pa),
                );
            }
        }
    }
}

/// One page at 0x40_0000 -> 0x5000; returns memory, leaf address, walker.
fn one_page() -> (GuestMemory, u64, Walker) {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
    let leaf = Tables::new(&mem).map(0x40_0000, 0x5000, 1, 0x2);
    let walker = Walker::new(X86Paging::long_mode(Tables::ROOT)).unwrap();
    (mem, leaf, walker)
}

fn misses(c: &WalkCache) -> u64 {
    c.stats().misses
}

#[test]
fn invalidation_makes_the_lean_path_walk_again() {
    let (mem, leaf, walker) = one_page();
    let mut cache = WalkCache::new();
    let va = 0x40_0123;
    let pa = |c: &mut WalkCache| {
        c.bind(&walker)
            .translate_pa(&mem, GuestVirtAddr(va), Access::read(), OPTS)
    };

    assert_eq!(pa(&mut cache), Ok(GuestPhysAddr(0x5123)));
    let m = misses(&cache);
    assert_eq!(pa(&mut cache), Ok(GuestPhysAddr(0x5123)));
    assert_eq!(misses(&cache), m, "a hit");

    // Without a watch, a remap is not seen until invalidated (a TLB).
    mem.write_obj(GuestPhysAddr(leaf), 0x6003u64).unwrap();
    assert_eq!(pa(&mut cache), Ok(GuestPhysAddr(0x5123)));
    assert_eq!(misses(&cache), m);

    // Per page.
    cache.invalidate_page(walker.space(), GuestVirtAddr(va));
    assert_eq!(pa(&mut cache), Ok(GuestPhysAddr(0x6123)));
    assert_eq!(misses(&cache), m + 1, "walked again after INVLPG");
    assert_eq!(pa(&mut cache), Ok(GuestPhysAddr(0x6123)));
    assert_eq!(misses(&cache), m + 1);

    // Per space.
    mem.write_obj(GuestPhysAddr(leaf), 0x7003u64).unwrap();
    cache.invalidate_space(walker.space());
    assert_eq!(pa(&mut cache), Ok(GuestPhysAddr(0x7123)));
    assert_eq!(misses(&cache), m + 2, "walked again after a space flush");

    // Per PCID (0 here) and everything.
    mem.write_obj(GuestPhysAddr(leaf), 0x8003u64).unwrap();
    cache.invalidate_pcid(walker.pcid());
    assert_eq!(pa(&mut cache), Ok(GuestPhysAddr(0x8123)));
    assert_eq!(misses(&cache), m + 3);
    mem.write_obj(GuestPhysAddr(leaf), 0x9003u64).unwrap();
    cache.invalidate_all();
    assert_eq!(pa(&mut cache), Ok(GuestPhysAddr(0x9123)));
    assert_eq!(misses(&cache), m + 4);

    // Unmapped: the lean path reports the walk's fault.
    mem.write_obj(GuestPhysAddr(leaf), 0u64).unwrap();
    cache.invalidate_page(walker.space(), GuestVirtAddr(va));
    assert_eq!(
        pa(&mut cache),
        walker
            .translate(&mem, GuestVirtAddr(va), Access::read())
            .map(|t| t.pa)
    );
    assert!(pa(&mut cache).is_err());
}

#[test]
fn a_watched_table_write_makes_the_lean_path_walk_again() {
    let (mem, leaf, walker) = one_page();
    let watch = TableWatch::new();
    mem.set_write_observer(watch.clone()).unwrap();
    let mut cache = WalkCache::new();
    cache.attach_watch(watch);
    let va = 0x40_0010;
    let mut bound = cache.bind(&walker);
    assert_eq!(
        bound.translate_pa(&mem, GuestVirtAddr(va), Access::read(), OPTS),
        Ok(GuestPhysAddr(0x5010))
    );
    assert_eq!(
        bound.translate_pa(&mem, GuestVirtAddr(va), Access::read(), OPTS),
        Ok(GuestPhysAddr(0x5010))
    );
    let s = bound.stats();
    assert_eq!((s.misses, s.watch_flushes), (1, 0));

    // A data write elsewhere: still a hit.
    mem.write_obj(GuestPhysAddr(0x9000), 1u64).unwrap();
    assert_eq!(
        bound.translate_pa(&mem, GuestVirtAddr(va), Access::read(), OPTS),
        Ok(GuestPhysAddr(0x5010))
    );
    assert_eq!(bound.stats().misses, 1);

    // The leaf rewritten through the library, with the cache still bound.
    mem.write_obj(GuestPhysAddr(leaf), 0x7003u64).unwrap();
    assert_eq!(
        bound.translate_pa(&mem, GuestVirtAddr(va), Access::read(), OPTS),
        Ok(GuestPhysAddr(0x7010))
    );
    let s = bound.stats();
    assert_eq!((s.misses, s.watch_flushes), (2, 1));
    assert_eq!(
        bound.translate_pa(&mem, GuestVirtAddr(va), Access::read(), OPTS),
        Ok(GuestPhysAddr(0x7010))
    );
    assert_eq!(bound.stats().misses, 2);
}

#[test]
fn rights_and_updates_are_decided_by_the_full_path() {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
    let mut t = Tables::new(&mem);
    let ro = t.map(0x40_0000, 0x5000, 1, 0); // read-only, supervisor
    let rw = t.map(0x40_1000, 0x6000, 1, 0x2);
    let walker = Walker::new(X86Paging::long_mode(Tables::ROOT)).unwrap();
    let mut cache = WalkCache::new();
    let mut bound = cache.bind(&walker);

    // A read fills the entry; a write to the read-only page, and a user
    // read of the supervisor page, still fault exactly as a walk does.
    assert_eq!(
        bound.translate_pa(&mem, GuestVirtAddr(0x40_0008), Access::read(), OPTS),
        Ok(GuestPhysAddr(0x5008))
    );
    for a in [Access::write(), Access::read().user()] {
        let want = walker
            .translate(&mem, GuestVirtAddr(0x40_0008), a)
            .map(|t| t.pa);
        assert!(want.is_err());
        for _ in 0..2 {
            assert_eq!(
                bound.translate_pa(&mem, GuestVirtAddr(0x40_0008), a, OPTS),
                want
            );
        }
    }

    // Accessed/dirty: a read without updates does not answer a write that
    // must set the dirty flag; the walk sets it, then hits.
    let ad = WalkOptions {
        set_accessed_dirty: true,
    };
    assert_eq!(
        bound.translate_pa(&mem, GuestVirtAddr(0x40_1000), Access::read(), OPTS),
        Ok(GuestPhysAddr(0x6000))
    );
    let m = bound.stats().misses;
    assert_eq!(
        bound.translate_pa(&mem, GuestVirtAddr(0x40_1000), Access::write(), ad),
        Ok(GuestPhysAddr(0x6000))
    );
    assert_eq!(bound.stats().misses, m + 1, "the update needs a walk");
    // (The binding ends here: the cache is bound again below.)
    let e: u64 = mem.read_obj(GuestPhysAddr(rw)).unwrap();
    assert_eq!(e & 0x60, 0x60, "accessed and dirty set");
    let mut bound = cache.bind(&walker);
    assert_eq!(
        bound.translate_pa(&mem, GuestVirtAddr(0x40_1000), Access::write(), ad),
        Ok(GuestPhysAddr(0x6000))
    );
    assert_eq!(bound.stats().misses, m + 1, "then a hit");
    let e: u64 = mem.read_obj(GuestPhysAddr(ro)).unwrap();
    assert_eq!(e & 0x20, 0, "the read-only page was never updated");
}

#[test]
fn two_spaces_never_share_lean_hits() {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
    let mut a = Tables::new(&mem);
    a.map(0x40_0000, 0x5000, 1, 0x2);
    // A second root at 0x80_0000 mapping the same address elsewhere.
    let mut b = Tables {
        mem: &mem,
        next: 0x80_1000,
    };
    let mut table = 0x80_0000u64;
    for level in (2..=4u32).rev() {
        let at = table + ((0x40_0000u64 >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
        let t = b.next;
        b.next += 0x1000;
        mem.write_obj(GuestPhysAddr(at), t | 0x7).unwrap();
        table = t;
    }
    mem.write_obj(GuestPhysAddr(table), 0x9003u64).unwrap();
    let wa = Walker::new(X86Paging::long_mode(Tables::ROOT)).unwrap();
    let wb = Walker::new(X86Paging::long_mode(0x80_0000)).unwrap();
    let mut cache = WalkCache::new();
    for _ in 0..3 {
        assert_eq!(
            cache
                .bind(&wa)
                .translate_pa(&mem, GuestVirtAddr(0x40_0010), Access::read(), OPTS),
            Ok(GuestPhysAddr(0x5010))
        );
        assert_eq!(
            cache
                .bind(&wb)
                .translate_pa(&mem, GuestVirtAddr(0x40_0010), Access::read(), OPTS),
            Ok(GuestPhysAddr(0x9010))
        );
    }
    assert_eq!(cache.stats().misses, 2);
    // Dropping one space leaves the other's entry.
    cache.invalidate_space(wa.space());
    assert_eq!(
        cache
            .bind(&wb)
            .translate_pa(&mem, GuestVirtAddr(0x40_0010), Access::read(), OPTS),
        Ok(GuestPhysAddr(0x9010))
    );
    assert_eq!(cache.stats().misses, 2);
    assert_eq!(
        cache
            .bind(&wa)
            .translate_pa(&mem, GuestVirtAddr(0x40_0010), Access::read(), OPTS),
        Ok(GuestPhysAddr(0x5010))
    );
    assert_eq!(cache.stats().misses, 3);
}

#[test]
fn check_settings_never_share_lean_hits() {
    // One address space (same CR3) under CR0.WP = 0 and 1: a supervisor
    // write to a read-only page is allowed only without WP, and the lean
    // answers must follow the walker bound, in either order, however often
    // they alternate.
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
    Tables::new(&mem).map(0x40_0000, 0x5000, 1, 0);
    let wp = X86Paging::long_mode(Tables::ROOT);
    let mut no_wp = wp;
    no_wp.cr0 &= !CR0_WP;
    let wp = Walker::new(wp).unwrap();
    let no_wp = Walker::new(no_wp).unwrap();
    assert_eq!(wp.space(), no_wp.space(), "one space, two check settings");
    let mut cache = WalkCache::new();
    let w = Access::write();
    for _ in 0..3 {
        for _ in 0..2 {
            assert_eq!(
                cache
                    .bind(&no_wp)
                    .translate_pa(&mem, GuestVirtAddr(0x40_0010), w, OPTS),
                Ok(GuestPhysAddr(0x5010))
            );
        }
        for _ in 0..2 {
            assert_eq!(
                cache
                    .bind(&wp)
                    .translate_pa(&mem, GuestVirtAddr(0x40_0010), w, OPTS),
                wp.translate(&mem, GuestVirtAddr(0x40_0010), w)
                    .map(|t| t.pa)
            );
            assert!(cache
                .bind(&wp)
                .translate_pa(&mem, GuestVirtAddr(0x40_0010), w, OPTS)
                .is_err());
        }
    }
}

/// A lean read translation of `va` through `cache` bound to `walker`.
fn lean_read(
    cache: &mut WalkCache,
    walker: &Walker,
    mem: &GuestMemory,
    va: u64,
) -> Result<u64, WalkFault> {
    cache
        .bind(walker)
        .translate_pa(mem, GuestVirtAddr(va), Access::read(), OPTS)
        .map(|p| p.0)
}

#[test]
fn a_new_walk_replaces_what_the_lean_path_answers() {
    // The tables change without an invalidation; a write that must set the
    // dirty flag walks again and caches the new translation. From then on
    // the lean path and the full path answer alike (the new one), as a TLB
    // that refilled the entry would.
    let (mem, leaf, walker) = one_page();
    let mut cache = WalkCache::new();
    let va = 0x40_0123;
    let ad = WalkOptions {
        set_accessed_dirty: true,
    };
    for _ in 0..3 {
        assert_eq!(lean_read(&mut cache, &walker, &mem, va), Ok(0x5123));
    }
    mem.write_obj(GuestPhysAddr(leaf), 0x6003u64).unwrap();
    assert_eq!(
        cache
            .bind(&walker)
            .translate_pa(&mem, GuestVirtAddr(va), Access::write(), ad),
        Ok(GuestPhysAddr(0x6123))
    );
    for _ in 0..3 {
        assert_eq!(lean_read(&mut cache, &walker, &mem, va), Ok(0x6123));
        assert_eq!(
            walker
                .translate_with(
                    &mem,
                    GuestVirtAddr(va),
                    Access::read(),
                    OPTS,
                    Some(&mut cache)
                )
                .map(|t| t.pa),
            Ok(GuestPhysAddr(0x6123))
        );
    }
}

#[test]
fn lean_answers_stay_exact_across_many_invalidations() {
    // More invalidations than the lean front has epochs (4095): after each,
    // the next answers are the tables' new ones.
    let (mem, leaf, walker) = one_page();
    let mut cache = WalkCache::new();
    let va = 0x40_0123;
    for i in 0..10_000u64 {
        let frame = 0x5000 + (i % 7) * 0x1000;
        mem.write_obj(GuestPhysAddr(leaf), frame | 3).unwrap();
        cache.invalidate_page(walker.space(), GuestVirtAddr(va));
        for _ in 0..2 {
            assert_eq!(
                lean_read(&mut cache, &walker, &mem, va),
                Ok(frame | 0x123),
                "after invalidation {i}"
            );
        }
    }
}

#[test]
fn an_old_lean_answer_never_comes_back() {
    // A page's answer kept by the lean path, then the page invalidated and
    // left alone while other pages are invalidated thousands of times (the
    // front's epochs wrap around): the page's next answer is the tables'.
    let (mem, leaf, walker) = one_page();
    let (a, b) = (0x40_0123, 0x7f_f000);
    for flushes in 4085..4105 {
        mem.write_obj(GuestPhysAddr(leaf), 0x5003u64).unwrap();
        let mut cache = WalkCache::new();
        for _ in 0..2 {
            assert_eq!(lean_read(&mut cache, &walker, &mem, a), Ok(0x5123));
        }
        mem.write_obj(GuestPhysAddr(leaf), 0x6003u64).unwrap();
        cache.invalidate_page(walker.space(), GuestVirtAddr(a));
        for _ in 0..flushes {
            cache.invalidate_page(walker.space(), GuestVirtAddr(b));
        }
        assert_eq!(
            lean_read(&mut cache, &walker, &mem, a),
            Ok(0x6123),
            "after {flushes} more invalidations"
        );
    }
}
