//! What every walk fuzz target does with its walker: translate (cached
//! and uncached, which must agree), invalidate, list mappings with a small
//! budget, read and write guest-virtual memory. Nothing may panic, and
//! every walk's work must stay bounded. Included by each target with
//! `#[path]` (fuzz targets are separate binaries).

use arbitrary::Arbitrary;
use pagefold::paging::{Access, AccessKind, PhysImage, Privilege, WalkCache, WalkOptions, Walker};
use pagefold::{GuestMemory, GuestPhysAddr, GuestVirtAddr};

/// Guest memory: 64 KiB at 0 (the input's bytes), and a second region
/// after a hole so tables can point into the hole and past the end.
pub const LOW: u64 = 0x1_0000;
pub const HIGH: u64 = 0x2_0000;

#[derive(Arbitrary, Debug)]
pub enum Op {
    Translate {
        va: u64,
        kind: u8,
        privilege: u8,
        ac: bool,
    },
    Invalidate {
        va: u64,
        all: bool,
    },
    Mappings {
        budget: u8,
    },
    ReadVirt {
        va: u64,
        len: u16,
    },
    WriteVirt {
        va: u64,
        len: u16,
    },
}

pub fn access(kind: u8, privilege: u8, ac: bool) -> Access {
    let kind = match kind % 3 {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    };
    let privilege = match privilege % 3 {
        0 => Privilege::User,
        1 => Privilege::Supervisor,
        _ => Privilege::SupervisorImplicit,
    };
    Access::new(kind, privilege).with_ac(ac)
}

/// Guest memory holding `bytes` (repeated over the low region) and
/// `pokes` (entries at chosen offsets, so small inputs still describe deep
/// tables); `None` if it cannot be made.
pub fn memory(bytes: &[u8], pokes: &[(u16, u64)]) -> Option<GuestMemory> {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), LOW), (GuestPhysAddr(HIGH), LOW)]).ok()?;
    if !bytes.is_empty() {
        let mut buf = vec![0u8; LOW as usize];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = bytes[i % bytes.len()];
        }
        mem.write(GuestPhysAddr(0), &buf).unwrap();
    }
    for &(off, v) in pokes.iter().take(64) {
        let at = u64::from(off) & !7;
        mem.write_obj(GuestPhysAddr(at), v).unwrap();
    }
    Some(mem)
}

/// Runs `ops` against `walker` on `mem` (and on a read-only image of it).
pub fn run(walker: &Walker, mem: &GuestMemory, set_ad: bool, ops: &[Op]) {
    let options = WalkOptions {
        set_accessed_dirty: set_ad,
    };
    let mut snapshot = vec![0u8; LOW as usize];
    mem.read(GuestPhysAddr(0), &mut snapshot).unwrap();
    let image = PhysImage::new(GuestPhysAddr(0), &snapshot);
    let mut cache = WalkCache::new();
    for op in ops.iter().take(32) {
        match *op {
            Op::Translate {
                va,
                kind,
                privilege,
                ac,
            } => {
                let a = access(kind, privilege, ac);
                let va = GuestVirtAddr(va);
                let plain = walker.translate(mem, va, a);
                if let Ok(t) = &plain {
                    // At most five levels, each through at most five
                    // second-level references, plus A/D updates.
                    assert!(t.memory_refs <= 2 * 36, "{t:?}");
                }
                let _ = walker.translate(&image, va, a);
                let cached = walker.translate_with(mem, va, a, options, Some(&mut cache));
                // Without A/D updates memory does not change, so the cached
                // path must agree with the uncached one.
                if !set_ad {
                    match (&plain, &cached) {
                        (Ok(p), Ok(c)) => {
                            assert_eq!((p.gpa, p.pa, p.page_size), (c.gpa, c.pa, c.page_size));
                            assert_eq!(p.permissions, c.permissions);
                        }
                        (Err(p), Err(c)) => assert_eq!(p, c),
                        _ => panic!("cached {cached:?} vs uncached {plain:?}"),
                    }
                }
                let _ = walker.translate_with(&image, va, a, options, None);
            }
            Op::Invalidate { va, all } => {
                if all {
                    cache.invalidate_all();
                } else {
                    cache.invalidate_page(walker.space(), GuestVirtAddr(va));
                }
            }
            Op::Mappings { budget } => {
                let budget = u64::from(budget) * 8;
                let n = walker.mappings_with_budget(mem, budget).count();
                // One item per entry read at most, plus the budget's end
                // and the no-paging identity mapping.
                assert!(n as u64 <= budget + 2, "{n} items for budget {budget}");
                let _ = walker.mappings_with_budget(&image, budget).count();
            }
            Op::ReadVirt { va, len } => {
                let va = GuestVirtAddr(va);
                let mut buf = vec![0u8; usize::from(len % 0x3000)];
                let _ =
                    walker.read_virt(mem, va, &mut buf, Access::read(), options, Some(&mut cache));
                let _ = walker.read_virt(&image, va, &mut buf, Access::read(), options, None);
            }
            Op::WriteVirt { va, len } => {
                let va = GuestVirtAddr(va);
                let data = vec![0xa5u8; usize::from(len % 0x3000)];
                let _ =
                    walker.write_virt(mem, va, &data, Access::write(), options, Some(&mut cache));
                // Written bytes may be page tables: start the cache over.
                cache.invalidate_all();
            }
        }
    }
}
