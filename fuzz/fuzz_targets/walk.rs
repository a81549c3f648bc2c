//! Fuzzes the x86 guest page-table walker with arbitrary guest memory (the
//! tables are whatever bytes the input holds), arbitrary paging registers,
//! an optional EPT or NPT, and arbitrary addresses, through the operations
//! every walk target runs (`shared/walk_ops.rs`): `translate`, the cached
//! path (which must agree with the uncached one), `mappings_with_budget`
//! with a small budget, and `read_virt`/`write_virt`. Nothing may panic,
//! and every walk's work must stay bounded.

#![no_main]

#[path = "shared/walk_ops.rs"]
mod walk_ops;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::paging::{EptConfig, NptConfig, SecondLevel, Walker, X86Paging};
use walk_ops::Op;

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

fuzz_target!(|input: Input| {
    let Some(mem) = walk_ops::memory(&input.bytes, &input.pokes) else {
        return;
    };
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
    walk_ops::run(&walker, &mem, input.set_ad, &input.ops);
});
