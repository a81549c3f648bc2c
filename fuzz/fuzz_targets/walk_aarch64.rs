//! Fuzzes the AArch64 walk with arbitrary guest memory (the tables are
//! whatever bytes the input holds), arbitrary TCR_EL1, TTBRs, SCTLR_EL1,
//! MAIR_EL1, PAN and PA size, and arbitrary addresses, through the
//! operations every walk target runs (`shared/walk_ops.rs`): translate
//! (cached and uncached must agree), list mappings with a small budget,
//! read and write guest-virtual memory. Nothing may panic, and every
//! walk's work must stay bounded.

#![no_main]

#[path = "shared/walk_ops.rs"]
mod walk_ops;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::paging::{Aarch64Paging, Walker};
use walk_ops::Op;

#[derive(Arbitrary, Debug)]
struct Input {
    tcr: u64,
    ttbr0: u16,
    ttbr1: u16,
    /// High bits of the TTBRs (ASID, CnP, bits past the PA size).
    ttbr_high: u64,
    sctlr: u64,
    mair: u64,
    pan: bool,
    pa_bits: u8,
    set_ad: bool,
    /// Table memory, repeated to fill the low region.
    bytes: Vec<u8>,
    /// Entries written at chosen offsets.
    pokes: Vec<(u16, u64)>,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let Some(mem) = walk_ops::memory(&input.bytes, &input.pokes) else {
        return;
    };
    // Most inputs keep TCR_EL1 to the fields the walk reads and a PA size
    // the CPU may have, so they reach the walks; 1 in 256 goes through as
    // it came, for the refusals.
    let raw = input.tcr & 0xff == 0xff;
    const TCR_FIELDS: u64 = 0x3f // T0SZ
        | 1 << 7 // EPD0
        | 3 << 14 // TG0
        | 0x3f << 16 // T1SZ
        | 1 << 22 | 1 << 23 // A1, EPD1
        | 3 << 30 // TG1
        | 7 << 32 // IPS
        | 1 << 36 | 1 << 37 | 1 << 38 // AS, TBI0, TBI1
        | 3 << 39 // HA, HD
        | 3 << 41 // HPD0, HPD1
        | 3 << 51; // TBID0, TBID1
    let tcr = if raw {
        input.tcr
    } else {
        input.tcr & TCR_FIELDS
    };
    let pa_bits = if raw {
        input.pa_bits
    } else {
        [32, 36, 40, 42, 44, 48][usize::from(input.pa_bits % 6)]
    };
    let high = if raw {
        input.ttbr_high
    } else {
        input.ttbr_high & 0xffff_0000_0000_0001
    };
    let regs = Aarch64Paging {
        tcr,
        ttbr0: u64::from(input.ttbr0) << 4 | high,
        ttbr1: u64::from(input.ttbr1) << 4 | high,
        sctlr: input.sctlr,
        mair: input.mair,
        pan: input.pan,
        pa_bits,
    };
    let Ok(walker) = Walker::new(regs) else {
        return;
    };
    walk_ops::run(&walker, &mem, input.set_ad, &input.ops);
});
