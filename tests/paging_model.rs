//! Property tests of the guest page-table walkers against a model: random
//! mapping sets (4 KiB and large pages, random permissions at every level,
//! addresses in both canonical halves) laid out by an independent builder
//! (`common/page_tables.rs`) in every paging mode, alone and nested under a
//! random EPT or NPT. Every translation of every probe (mapped pages, their
//! edges, unmapped neighbours, random and non-canonical addresses) for
//! every access kind and privilege must match the model: address, page
//! size, level, permissions, attributes, the fault (stage, reason, level,
//! architectural code) and the number of memory references. `mappings()`
//! must list exactly the model, and the cached path must agree with the
//! model before and after entries change and are invalidated; so must the
//! lean cached path (`BoundCache::translate_pa`, its own cache, invalidated
//! alike), asked twice so the second answer is a hit where one is cached.

// Test code: page-table fields are built from small known values.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use common::page_tables::{expected_attributes, Expect, Flags, Kind, Rng, Tables, PAGE};
use pagefold::paging::{
    Access, AccessKind, FaultCode, FaultReason, LeafAttributes, Permissions, Stage, Translation,
    WalkCache, WalkFault, WalkOptions, Walker, X86Paging,
};
use pagefold::{GuestMemory, GuestPhysAddr, GuestVirtAddr};
use proptest::{prelude::*, test_runner::Config as ProptestConfig};

fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

/// Host memory: 64 MiB; single-level tables (or the second level's) from
/// 1 MiB, nested guest tables backed from 8 MiB.
const MEM: u64 = 64 << 20;
const TABLES: u64 = 0x10_0000;
const TABLES_LEN: u64 = 0x70_0000;
/// Guest-physical home of a nested guest's tables (below 4 GiB so 32-bit
/// and PAE guests can point at them), and the host memory behind it.
const GUEST_TABLES_GPA: u64 = 0xc000_0000;
const GUEST_TABLES_HOST: u64 = 0x80_0000;
const GUEST_TABLES_LEN: u64 = 0x10_0000;

const ACCESSES: [Access; 6] = [
    Access::read(),
    Access::write(),
    Access::fetch(),
    Access::read().user(),
    Access::write().user(),
    Access::fetch().user(),
];

fn random_flags(rng: &mut Rng, kind: Kind, leaf: bool, bias: u64) -> Flags {
    let mut f = if kind.is_ept() {
        // Valid combinations only (W without R is a misconfiguration).
        let (r, w, x) = rng.pick(&[
            (true, false, false),
            (true, true, false),
            (true, false, true),
            (true, true, true),
            (false, false, true),
        ]);
        let (r, w, x) = if rng.chance(bias, 4) {
            (true, true, true)
        } else {
            (r, w, x)
        };
        Flags::full().with(r, w, x, true)
    } else {
        Flags::full().with(
            true,
            rng.chance(bias.max(2), 4),
            rng.chance(bias.max(2), 4),
            rng.chance(bias.max(2), 4),
        )
    };
    if !leaf {
        return f;
    }
    let maybe = |rng: &mut Rng, bits: &[u32]| {
        bits.iter()
            .filter(|_| rng.chance(1, 3))
            .fold(0u64, |acc, &b| acc | 1 << b)
    };
    let extra = if kind.is_ept() {
        (rng.pick(&[0u64, 1, 4, 5, 6]) << 3) | maybe(rng, &[6, 8, 9, 10, 11, 52, 53, 56])
    } else if matches!(kind, Kind::Level4 | Kind::Level5 | Kind::Npt4 | Kind::Npt5) {
        // Ignored bits (and the protection key, ignored without PKE).
        f.key = rng.below(16) as u8;
        maybe(rng, &[3, 4, 5, 6, 8, 9, 10, 11, 52, 55, 58])
    } else {
        maybe(rng, &[3, 4, 5, 6, 8, 9, 10, 11])
    };
    f.extra = extra;
    f
}

/// Fills `t` with up to `n` random mappings whose inputs lie below
/// `1 << in_bits` (sign-extended for canonical formats); with `frames`,
/// outputs are often taken from those mappings of another table set.
fn random_mappings(
    rng: &mut Rng,
    t: &mut Tables<'_>,
    n: u64,
    in_bits: u32,
    frames: Option<&Tables<'_>>,
) {
    let kind = t.kind;
    let in_mask = if in_bits >= 64 {
        u64::MAX
    } else {
        (1 << in_bits) - 1
    };
    let clusters: Vec<u64> = (0..3).map(|_| rng.next() & in_mask).collect();
    let targets: Vec<Expect> = frames
        .map(|f| {
            let mut v: Vec<Expect> = f.model.values().copied().collect();
            v.sort_by_key(|e| e.va);
            v
        })
        .unwrap_or_default();
    for _ in 0..n {
        let shifts = kind.leaf_shifts();
        let shift = if shifts.len() > 1 && rng.chance(2, 5) {
            shifts[1 + rng.below(shifts.len() as u64 - 1) as usize]
        } else {
            12
        };
        let size = 1u64 << shift;
        let va = if rng.chance(3, 4) {
            rng.pick(&clusters) + rng.below(48) * size
        } else {
            rng.next()
        } & in_mask
            & !(size - 1);
        let max = kind.max_frame(shift).min(1 << 46);
        let frame = if !targets.is_empty() && rng.chance(3, 4) {
            let e = rng.pick(&targets);
            // A guest-physical address the second level maps.
            (e.va + rng.below(e.size)) & !(size - 1)
        } else {
            (rng.next() % max) & !(size - 1)
        };
        if frame >= max {
            continue;
        }
        let leaf = random_flags(rng, kind, true, 0);
        let mut up_rng = Rng(rng.next());
        t.map(va, frame, shift, leaf, |_| {
            random_flags(&mut up_rng, kind, false, 2)
        });
    }
}

/// What a translation should give.
#[derive(Debug)]
enum Want {
    Ok {
        gpa: u64,
        pa: u64,
        size: u64,
        level: u8,
        perms: Permissions,
        attrs: LeafAttributes,
        second: Option<(u64, u8, Permissions, LeafAttributes)>,
        refs: u32,
    },
    Fault {
        stage: Stage,
        reason: FaultReason,
        level: Option<u8>,
        /// `None`: not architectural (a 32-bit mode given a wider address).
        code: Option<FaultCode>,
    },
}

/// x86 permission rules with CR0.WP = 1 and no SMEP, SMAP or keys.
fn x86_allows(p: &Permissions, a: Access) -> bool {
    let user_ok = !a.is_user() || p.user;
    user_ok
        && match a.kind {
            AccessKind::Read => true,
            AccessKind::Write => p.write,
            AccessKind::Fetch => p.execute,
        }
}

fn pf_code(present: bool, a: Access, fetch_bit: bool) -> u32 {
    u32::from(present)
        | u32::from(a.is_write()) << 1
        | u32::from(a.is_user()) << 2
        | u32::from(a.is_fetch() && fetch_bit) << 4
}

/// One address space under test: the guest's tables (absent without
/// paging) and the second level's (absent without one).
struct Space<'m> {
    first: Option<Tables<'m>>,
    second: Option<Tables<'m>>,
}

impl Space<'_> {
    fn not_present_level(t: &Tables<'_>, va: u64) -> u8 {
        t.kind.levels() + 1 - t.path(va).len() as u8
    }

    fn want(&self, va: u64, a: Access) -> Want {
        let (gpa, mut refs, first) = match &self.first {
            None if va >> 32 != 0 => {
                return Want::Fault {
                    stage: Stage::First,
                    reason: FaultReason::AddressTooWide,
                    level: Some(0),
                    code: Some(FaultCode::GeneralProtection),
                }
            }
            None => (va, 0, None),
            Some(t) => {
                let k = t.kind;
                if k.canonical() && k.canon(va) != va {
                    return Want::Fault {
                        stage: Stage::First,
                        reason: FaultReason::NonCanonical,
                        level: Some(0),
                        code: Some(FaultCode::GeneralProtection),
                    };
                }
                if !k.canonical() && va >> 32 != 0 {
                    return Want::Fault {
                        stage: Stage::First,
                        reason: FaultReason::AddressTooWide,
                        level: Some(0),
                        code: None,
                    };
                }
                let Some(e) = t.lookup(va) else {
                    return Want::Fault {
                        stage: Stage::First,
                        reason: FaultReason::NotPresent,
                        level: Some(Self::not_present_level(t, va)),
                        code: Some(FaultCode::PageFault {
                            error_code: pf_code(false, a, t.nxe),
                        }),
                    };
                };
                if !x86_allows(&e.perms, a) {
                    return Want::Fault {
                        stage: Stage::First,
                        reason: FaultReason::Permission,
                        level: None,
                        code: Some(FaultCode::PageFault {
                            error_code: pf_code(true, a, t.nxe),
                        }),
                    };
                }
                let reads = u32::from(k.levels() - e.level + 1);
                // Each guest table read costs a full second-level walk of a
                // 4 KiB page first.
                let per_read = 1 + self
                    .second
                    .as_ref()
                    .map_or(0, |s| u32::from(s.kind.levels()));
                (e.out(va), reads * per_read, Some(*e))
            }
        };
        let (pa, second) = match &self.second {
            None => (gpa, None),
            Some(s) => {
                // Bits 7 and 8: a linear address is known and this is its
                // translation (with paging off the linear address is the
                // guest-physical one; SDM table 28-7).
                let Some(e) = s.lookup(gpa) else {
                    let code = if s.kind.is_ept() {
                        FaultCode::EptViolation {
                            qualification: ept_access_bits(a) | 1 << 7 | 1 << 8,
                        }
                    } else {
                        FaultCode::NestedPageFault {
                            exit_info1: u64::from(pf_code(false, a.user(), true)) | 1 << 32,
                        }
                    };
                    return Want::Fault {
                        stage: Stage::Second { guest_table: None },
                        reason: FaultReason::NotPresent,
                        level: Some(Self::not_present_level(s, gpa)),
                        code: Some(code),
                    };
                };
                let p = e.perms;
                let ok = match a.kind {
                    AccessKind::Read => p.read && p.user,
                    AccessKind::Write => p.write && p.user,
                    AccessKind::Fetch => p.execute && p.user,
                };
                if !ok {
                    let code = if s.kind.is_ept() {
                        FaultCode::EptViolation {
                            qualification: ept_access_bits(a)
                                | u64::from(p.read) << 3
                                | u64::from(p.write) << 4
                                | u64::from(p.execute) << 5
                                | 1 << 7
                                | 1 << 8,
                        }
                    } else {
                        FaultCode::NestedPageFault {
                            exit_info1: u64::from(pf_code(true, a.user(), true)) | 1 << 32,
                        }
                    };
                    return Want::Fault {
                        stage: Stage::Second { guest_table: None },
                        reason: FaultReason::Permission,
                        level: None,
                        code: Some(code),
                    };
                }
                refs += u32::from(s.kind.levels() - e.level + 1);
                (
                    e.out(gpa),
                    Some((
                        e.size,
                        e.level,
                        e.perms,
                        expected_attributes(s.kind, e.level, e.entry),
                    )),
                )
            }
        };
        let (size, level, perms, attrs) = match (&first, &self.first) {
            (Some(e), Some(t)) => (
                e.size,
                e.level,
                e.perms,
                expected_attributes(t.kind, e.level, e.entry),
            ),
            _ => (
                PAGE,
                0,
                Permissions {
                    read: true,
                    write: true,
                    execute: true,
                    user: true,
                    user_execute: true,
                    key: 0,
                },
                LeafAttributes::default(),
            ),
        };
        Want::Ok {
            gpa,
            pa,
            size,
            level,
            perms,
            attrs,
            second,
            refs,
        }
    }
}

fn ept_access_bits(a: Access) -> u64 {
    match a.kind {
        AccessKind::Read => 1,
        AccessKind::Write => 2,
        AccessKind::Fetch => 4,
    }
}

fn check(want: &Want, got: &Result<Translation, WalkFault>, va: u64, a: Access, cached: bool) {
    let ctx = format!("va {va:#x} {a:?} cached={cached}: want {want:?}, got {got:?}");
    match (want, got) {
        (
            Want::Ok {
                gpa,
                pa,
                size,
                level,
                perms,
                attrs,
                second,
                refs,
            },
            Ok(t),
        ) => {
            assert_eq!(t.va, GuestVirtAddr(va), "{ctx}");
            assert_eq!(t.gpa, GuestPhysAddr(*gpa), "{ctx}");
            assert_eq!(t.pa, GuestPhysAddr(*pa), "{ctx}");
            assert_eq!(t.page_size, *size, "{ctx}");
            assert_eq!(t.level, *level, "{ctx}");
            assert_eq!(t.permissions, *perms, "{ctx}");
            assert_eq!(t.attributes, *attrs, "{ctx}");
            match (second, t.second) {
                (None, None) => {}
                (Some((size, level, perms, attrs)), Some(s)) => {
                    assert_eq!(s.page_size, *size, "{ctx}");
                    assert_eq!(s.level, *level, "{ctx}");
                    assert_eq!(s.permissions, *perms, "{ctx}");
                    assert_eq!(s.attributes, *attrs, "{ctx}");
                }
                _ => panic!("second level part differs: {ctx}"),
            }
            if !cached {
                assert_eq!(t.memory_refs, *refs, "memory_refs: {ctx}");
            }
        }
        (
            Want::Fault {
                stage,
                reason,
                level,
                code,
            },
            Err(f),
        ) => {
            assert_eq!(f.va, GuestVirtAddr(va), "{ctx}");
            assert_eq!(f.stage, *stage, "{ctx}");
            assert_eq!(f.reason, *reason, "{ctx}");
            if let Some(code) = code {
                assert_eq!(f.code, *code, "{ctx}");
            }
            assert_eq!(f.access, a, "{ctx}");
            if let Some(l) = level {
                assert_eq!(f.level, *l, "{ctx}");
            }
        }
        _ => panic!("outcome differs: {ctx}"),
    }
}

/// Addresses to probe: every mapping's first and last byte, a byte inside,
/// its neighbours on both sides, and random addresses (some non-canonical).
fn probes(rng: &mut Rng, sp: &Space<'_>) -> Vec<u64> {
    let (model, kind) = match (&sp.first, &sp.second) {
        (Some(t), _) | (None, Some(t)) => (&t.model, t.kind),
        (None, None) => unreachable!(),
    };
    let mut out = Vec::new();
    let bits = if sp.first.is_some() {
        kind.va_bits()
    } else {
        32
    };
    for e in model.values() {
        out.push(e.va);
        out.push(e.va + e.size - 1);
        out.push(e.va + rng.below(e.size));
        out.push(e.va.wrapping_sub(1));
        out.push(e.va.wrapping_add(e.size));
        out.push(e.va ^ (1 << (12 + rng.below(u64::from(bits) - 12))));
        // The canonical twin in the other half.
        out.push(e.va ^ (1u64 << (bits - 1)));
    }
    for _ in 0..8 {
        let v = rng.next() & ((1u64 << bits) - 1);
        out.push(if sp.first.is_some() { kind.canon(v) } else { v });
    }
    // Above the input width, and (for canonical modes) in the hole.
    out.push(1u64 << bits);
    out.push(rng.next());
    out.push((1u64 << bits) | rng.below(1 << 20));
    out
}

fn check_all(
    walker: &Walker,
    mem: &GuestMemory,
    sp: &Space<'_>,
    probes: &[u64],
    cache: &mut WalkCache,
    lean: &mut WalkCache,
) {
    let opts = WalkOptions::default();
    for &va in probes {
        for a in ACCESSES {
            let want = sp.want(va, a);
            let got = walker.translate(mem, GuestVirtAddr(va), a);
            check(&want, &got, va, a, false);
            let uncached = got;
            let pa = got.map(|t| t.pa);
            let got = walker.translate_with(mem, GuestVirtAddr(va), a, opts, Some(cache));
            check(&want, &got, va, a, true);
            // A cached fault names the same entry as the walk (a walk from
            // a cached upper entry denied above its start walks again from
            // the root to name it).
            if let (Err(u), Err(c)) = (&uncached, &got) {
                assert_eq!(
                    (c.level, c.entry_addr, c.entry),
                    (u.level, u.entry_addr, u.entry),
                    "cached fault names another entry: va {va:#x} {a:?}: {c:?} vs {u:?}"
                );
            }
            // An address exactly; a fault as the cached path's is checked.
            let mut bound = lean.bind(walker);
            for _ in 0..2 {
                match bound.translate_pa(mem, GuestVirtAddr(va), a, opts) {
                    Ok(lean_pa) => assert_eq!(Ok(lean_pa), pa, "lean va {va:#x} {a:?}"),
                    Err(f) => check(&want, &Err(f), va, a, true),
                }
            }
        }
    }
}

fn check_mappings(walker: &Walker, mem: &GuestMemory, sp: &Space<'_>) {
    let listed: Vec<_> = walker.mappings(mem).collect::<Result<Vec<_>, _>>().unwrap();
    let Some(t) = &sp.first else {
        // Without paging: the 32-bit space maps to itself.
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].va.0, listed[0].gpa.0, listed[0].size),
            (0, 0, 1 << 32)
        );
        return;
    };
    let mut want: Vec<_> = t.model.values().copied().collect();
    want.sort_by_key(|e| e.va);
    assert_eq!(listed.len(), want.len(), "{listed:#x?} vs {want:#x?}");
    for (m, e) in listed.iter().zip(&want) {
        assert_eq!(
            (m.va.0, m.gpa.0, m.size, m.level, m.permissions, m.entry),
            (e.va, e.frame, e.size, e.level, e.perms, e.entry),
        );
        assert_eq!(m.attributes, expected_attributes(t.kind, e.level, e.entry));
    }
}

/// Builds a random address space of `first` over `second` (either may be
/// absent, not both) and checks it against the model, then changes some
/// entries, invalidates, and checks again.
fn run(first: Option<Kind>, second: Option<Kind>, seed: u64) {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
    let mut rng = Rng(seed);
    let n = 1 + rng.below(24);
    let mut sec = second.map(|k| Tables::new(k, &mem, TABLES, TABLES, TABLES_LEN));
    let mut fst = None;
    if let Some(k) = first {
        if let Some(s) = sec.as_mut() {
            // The guest's table pages, mapped first with every permission.
            for i in 0..GUEST_TABLES_LEN / PAGE {
                let gpa = GUEST_TABLES_GPA + i * PAGE;
                assert!(
                    s.map(gpa, GUEST_TABLES_HOST + i * PAGE, 12, Flags::full(), |_| {
                        Flags::full()
                    })
                );
            }
            // Outputs a 32-bit guest can reach.
            let bits = if k.wide() { 40 } else { 32 };
            random_mappings(&mut rng, s, n, bits, None);
            let mut g = Tables::new(
                k,
                &mem,
                GUEST_TABLES_GPA,
                GUEST_TABLES_HOST,
                GUEST_TABLES_LEN,
            );
            random_mappings(&mut rng, &mut g, n, k.va_bits(), Some(s));
            fst = Some(g);
        } else {
            let mut g = Tables::new(k, &mem, TABLES, TABLES, TABLES_LEN);
            random_mappings(&mut rng, &mut g, n, k.va_bits(), None);
            fst = Some(g);
        }
    } else if let Some(s) = sec.as_mut() {
        random_mappings(&mut rng, s, n, 32, None);
    }
    let regs = fst
        .as_ref()
        .map_or(X86Paging::new(0, 0, 0, 0), |t| t.regs());
    let mut walker = Walker::new(regs).unwrap();
    if let Some(s) = &sec {
        walker = walker.with_second_level(s.second(false)).unwrap();
    }
    let mut sp = Space {
        first: fst,
        second: sec,
    };
    let probes = probes(&mut rng, &sp);
    let mut cache = WalkCache::new();
    let mut lean = WalkCache::new();
    check_mappings(&walker, &mem, &sp);
    // Cold, then warm.
    check_all(&walker, &mem, &sp, &probes, &mut cache, &mut lean);
    check_all(&walker, &mem, &sp, &probes, &mut cache, &mut lean);

    // Unmap some guest pages (INVLPG each), and some second-level pages
    // (INVEPT), then everything must still agree.
    if let Some(t) = sp.first.as_mut() {
        let mut vas: Vec<u64> = t.model.keys().copied().collect();
        vas.sort_unstable();
        for va in vas {
            if rng.chance(1, 3) {
                t.unmap(va).unwrap();
                // INVLPG of one address drops every TLB entry of its page,
                // fragments under smaller second-level pages included
                // (SDM 4.10.4.1).
                cache.invalidate_page(walker.space(), GuestVirtAddr(va));
                lean.invalidate_page(walker.space(), GuestVirtAddr(va));
            }
        }
    }
    if let Some(s) = sp.second.as_mut() {
        let mut gpas: Vec<u64> = s
            .model
            .keys()
            .copied()
            .filter(|&g| !(GUEST_TABLES_GPA..GUEST_TABLES_GPA + GUEST_TABLES_LEN).contains(&g))
            .collect();
        gpas.sort_unstable();
        let mut changed = false;
        for gpa in gpas {
            if rng.chance(1, 3) {
                s.unmap(gpa).unwrap();
                changed = true;
            }
        }
        if changed {
            cache.invalidate_second_level();
            lean.invalidate_second_level();
        }
    }
    check_mappings(&walker, &mem, &sp);
    check_all(&walker, &mem, &sp, &probes, &mut cache, &mut lean);
}

fn first_kind() -> impl Strategy<Value = Kind> {
    proptest::sample::select(Kind::FIRST.to_vec())
}

fn second_kind() -> impl Strategy<Value = Kind> {
    proptest::sample::select(Kind::SECOND.to_vec())
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn guest_tables_alone(kind in first_kind(), seed in any::<u64>()) {
        run(Some(kind), None, seed);
    }

    #[test]
    fn second_level_alone(kind in second_kind(), seed in any::<u64>()) {
        run(None, Some(kind), seed);
    }

    #[test]
    fn nested(first in first_kind(), second in second_kind(), seed in any::<u64>()) {
        run(Some(first), Some(second), seed);
    }
}

/// Every mode pair once with a fixed seed, so a plain `cargo test` covers
/// all of them whatever proptest draws.
#[test]
fn every_mode_pair() {
    for (i, &f) in Kind::FIRST.iter().enumerate() {
        run(Some(f), None, 1000 + i as u64);
        for (j, &s) in Kind::SECOND.iter().enumerate() {
            run(Some(f), Some(s), 2000 + (i * 10 + j) as u64);
        }
    }
    for (j, &s) in Kind::SECOND.iter().enumerate() {
        run(None, Some(s), 3000 + j as u64);
    }
}

/// The reference counts the design promises: n + 1 references per guest
/// level plus the final second-level walk, (n + 1)(m + 1) - 1 in all.
#[test]
fn memory_refs_formula() {
    for (first, n) in [(Kind::Level4, 4u32), (Kind::Level5, 5)] {
        for (second, m) in [
            (None, 0u32),
            (Some(Kind::Ept4), 4),
            (Some(Kind::Ept5), 5),
            (Some(Kind::Npt4), 4),
        ] {
            let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
            let va = 0x7f12_3456_7000u64;
            let walker;
            if let Some(sk) = second {
                let mut s = Tables::new(sk, &mem, TABLES, TABLES, TABLES_LEN);
                for i in 0..16 {
                    let gpa = GUEST_TABLES_GPA + i * PAGE;
                    assert!(
                        s.map(gpa, GUEST_TABLES_HOST + i * PAGE, 12, Flags::full(), |_| {
                            Flags::full()
                        })
                    );
                }
                assert!(s.map(0x5000, 0x9000, 12, Flags::full(), |_| Flags::full()));
                let mut g = Tables::new(
                    first,
                    &mem,
                    GUEST_TABLES_GPA,
                    GUEST_TABLES_HOST,
                    GUEST_TABLES_LEN,
                );
                assert!(g.map(va, 0x5000, 12, Flags::full(), |_| Flags::full()));
                walker = Walker::new(g.regs())
                    .unwrap()
                    .with_second_level(s.second(false))
                    .unwrap();
            } else {
                let mut g = Tables::new(first, &mem, TABLES, TABLES, TABLES_LEN);
                assert!(g.map(va, 0x5000, 12, Flags::full(), |_| Flags::full()));
                walker = Walker::new(g.regs()).unwrap();
            }
            let t = walker
                .translate(&mem, GuestVirtAddr(va + 0x10), Access::read())
                .unwrap();
            assert_eq!(
                t.memory_refs,
                (n + 1) * (m + 1) - 1,
                "{first:?} on {second:?}"
            );
            assert_eq!(t.gpa, GuestPhysAddr(0x5010));
            assert_eq!(
                t.pa,
                GuestPhysAddr(if second.is_some() { 0x9010 } else { 0x5010 })
            );
            // A cache hit costs nothing.
            let mut cache = WalkCache::new();
            walker
                .translate_with(
                    &mem,
                    GuestVirtAddr(va),
                    Access::read(),
                    WalkOptions::default(),
                    Some(&mut cache),
                )
                .unwrap();
            let t = walker
                .translate_with(
                    &mem,
                    GuestVirtAddr(va + 8),
                    Access::read(),
                    WalkOptions::default(),
                    Some(&mut cache),
                )
                .unwrap();
            assert_eq!(t.memory_refs, 0);
        }
    }
}
