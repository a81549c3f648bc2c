//! Fuzzes the guest page-table walkers with arbitrary guest memory (the
//! tables are whatever bytes the input holds), arbitrary paging registers,
//! an optional EPT or NPT, and arbitrary addresses: `translate`, the cached
//! path (which must agree with the uncached one), `mappings_with_budget`
//! with a small budget, and `read_virt`/`write_virt`. Nothing may panic,
//! and every walk's work must stay bounded.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::paging::{
    Access, AccessKind, EptConfig, NptConfig, PhysImage, Privilege, SecondLevel, WalkCache,
    WalkOptions, Walker, X86Paging,
};
use pagefold::{GuestMemory, GuestPhysAddr, GuestVirtAddr};

/// Guest memory: 64 KiB at 0 (the input's bytes), and a second region
/// after a hole so tables can point into the hole and past the end.
const LOW: u64 = 0x1_0000;
const HIGH: u64 = 0x2_0000;

#[derive(Arbitrary, Debug)]
struct Input {
    cr0: u64,
    cr3: u16,
    cr4: u64,
    efer: u64,
    maxphyaddr: u8,
    gbpages: bool,
    pkru: u32,
    pkrs: u32,
    second: Option<SecondInput>,
    set_ad: bool,
    /// Table memory, repeated to fill the low region.
    bytes: Vec<u8>,
    /// Entries written at chosen offsets (so small inputs still describe
    /// deep tables).
    pokes: Vec<(u16, u64)>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum SecondInput {
    Ept {
        root: u16,
        eptp_low: u8,
        execute_only: bool,
        mode_based_execute: bool,
        maxphyaddr: u8,
    },
    Npt {
        root: u16,
        five_level: bool,
        nxe: bool,
        maxphyaddr: u8,
    },
}

#[derive(Arbitrary, Debug)]
enum Op {
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

fn access(kind: u8, privilege: u8, ac: bool) -> Access {
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

fuzz_target!(|input: Input| {
    let Ok(mem) = GuestMemory::new(&[(GuestPhysAddr(0), LOW), (GuestPhysAddr(HIGH), LOW)]) else {
        return;
    };
    if !input.bytes.is_empty() {
        let mut buf = vec![0u8; LOW as usize];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = input.bytes[i % input.bytes.len()];
        }
        mem.write(GuestPhysAddr(0), &buf).unwrap();
    }
    for &(off, v) in input.pokes.iter().take(64) {
        let at = u64::from(off) & !7;
        mem.write_obj(GuestPhysAddr(at), v).unwrap();
    }
    // The walker refuses reserved bits of the paging registers up front;
    // to reach the walks, most inputs keep only the bits that shape them
    // (1 in 256 goes through as it came, for the refusals).
    let raw = input.cr0 & 0xff00 == 0xff00;
    let (cr0, cr4, efer) = if raw {
        (input.cr0, input.cr4, input.efer)
    } else {
        const CR0: u64 = 1 | 1 << 16 | 1 << 31; // PE, WP, PG
                                                // PSE, PAE, PGE, LA57, PCIDE, SMEP, SMAP, PKE, CET, PKS
        const CR4: u64 = 1 << 4
            | 1 << 5
            | 1 << 7
            | 1 << 12
            | 1 << 17
            | 1 << 20
            | 1 << 21
            | 1 << 22
            | 1 << 23
            | 1 << 24;
        const EFER: u64 = 1 << 8 | 1 << 10 | 1 << 11; // LME, LMA, NXE
        (input.cr0 & CR0, input.cr4 & CR4, input.efer & EFER)
    };
    let mut regs = X86Paging::new(cr0, u64::from(input.cr3) << 4, cr4, efer);
    regs.maxphyaddr = input.maxphyaddr;
    regs.gbpages = input.gbpages;
    regs.pkru = input.pkru;
    regs.pkrs = input.pkrs;
    let Ok(mut walker) = Walker::new(regs) else {
        return;
    };
    if let Some(s) = &input.second {
        let second = match *s {
            SecondInput::Ept {
                root,
                eptp_low,
                execute_only,
                mode_based_execute,
                maxphyaddr,
            } => SecondLevel::Ept(EptConfig {
                eptp: (u64::from(root) << 12) | u64::from(eptp_low),
                execute_only,
                mode_based_execute,
                maxphyaddr,
            }),
            SecondInput::Npt {
                root,
                five_level,
                nxe,
                maxphyaddr,
            } => SecondLevel::Npt(NptConfig {
                ncr3: u64::from(root) << 12,
                five_level,
                nxe,
                maxphyaddr,
            }),
        };
        match walker.with_second_level(second) {
            Ok(w) => walker = w,
            Err(_) => return,
        }
    }
    let options = WalkOptions {
        set_accessed_dirty: input.set_ad,
    };
    let mut snapshot = vec![0u8; LOW as usize];
    mem.read(GuestPhysAddr(0), &mut snapshot).unwrap();
    let image = PhysImage::new(GuestPhysAddr(0), &snapshot);
    let mut cache = WalkCache::new();
    for op in input.ops.iter().take(32) {
        match *op {
            Op::Translate {
                va,
                kind,
                privilege,
                ac,
            } => {
                let a = access(kind, privilege, ac);
                let va = GuestVirtAddr(va);
                let plain = walker.translate(&mem, va, a);
                if let Ok(t) = &plain {
                    // At most five levels, each through at most five
                    // second-level references, plus A/D updates.
                    assert!(t.memory_refs <= 2 * 36, "{t:?}");
                }
                let _ = walker.translate(&image, va, a);
                let cached = walker.translate_with(&mem, va, a, options, Some(&mut cache));
                // Without A/D updates memory does not change, so the cached
                // path must agree with the uncached one.
                if !input.set_ad {
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
                let n = walker.mappings_with_budget(&mem, budget).count();
                // One item per entry read at most, plus the budget's end
                // and the no-paging identity mapping.
                assert!(n as u64 <= budget + 2, "{n} items for budget {budget}");
                let _ = walker.mappings_with_budget(&image, budget).count();
            }
            Op::ReadVirt { va, len } => {
                let va = GuestVirtAddr(va);
                let mut buf = vec![0u8; usize::from(len % 0x3000)];
                let _ = walker.read_virt(
                    &mem,
                    va,
                    &mut buf,
                    Access::read(),
                    options,
                    Some(&mut cache),
                );
                let _ = walker.read_virt(&image, va, &mut buf, Access::read(), options, None);
            }
            Op::WriteVirt { va, len } => {
                let va = GuestVirtAddr(va);
                let data = vec![0xa5u8; usize::from(len % 0x3000)];
                let _ =
                    walker.write_virt(&mem, va, &data, Access::write(), options, Some(&mut cache));
                // Written bytes may be page tables: start the cache over.
                cache.invalidate_all();
            }
        }
    }
});
