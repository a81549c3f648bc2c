//! Fuzzes the RISC-V walk with arbitrary guest memory (the tables are
//! whatever bytes the input holds), arbitrary `satp` with SUM, MXR,
//! Svadu, Svpbmt, Svnapot and PA width, an optional G stage (arbitrary
//! `hgatp`: the nested walk), and arbitrary addresses, through the
//! operations every walk target runs (`shared/walk_ops.rs`): translate
//! (cached and uncached must agree), list mappings with a small budget,
//! read and write guest-virtual memory. Nothing may panic, and every
//! walk's work must stay bounded.

#![no_main]

#[path = "shared/walk_ops.rs"]
mod walk_ops;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagefold::paging::{RiscvGStage, RiscvPaging, SecondLevel, Walker};
use walk_ops::Op;

#[derive(Arbitrary, Debug)]
struct Input {
    /// MODE selector (most inputs get a defined mode) and ASID.
    mode: u8,
    asid: u16,
    root: u16,
    sum: bool,
    mxr: bool,
    adue: bool,
    pbmte: bool,
    svnapot: bool,
    pa_bits: u8,
    g_stage: Option<GStageInput>,
    set_ad: bool,
    /// Table memory, repeated to fill the low region.
    bytes: Vec<u8>,
    /// Entries written at chosen offsets.
    pokes: Vec<(u16, u64)>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
struct GStageInput {
    mode: u8,
    vmid: u16,
    root: u16,
    mxr: bool,
    adue: bool,
}

/// A MODE field: Bare, Sv39, Sv48, Sv57 mostly, any 4-bit value at times.
fn mode(sel: u8) -> u64 {
    match sel % 8 {
        0 => 0,
        1 | 2 => 8,
        3 | 4 => 9,
        5 | 6 => 10,
        _ => u64::from(sel >> 4),
    }
}

fuzz_target!(|input: Input| {
    let Some(mem) = walk_ops::memory(&input.bytes, &input.pokes) else {
        return;
    };
    let pa_bits = 32 + input.pa_bits % 25;
    let regs = RiscvPaging {
        satp: mode(input.mode) << 60 | u64::from(input.asid) << 44 | u64::from(input.root) >> 4,
        sum: input.sum,
        mxr: input.mxr,
        adue: input.adue,
        pbmte: input.pbmte,
        svnapot: input.svnapot,
        pa_bits,
    };
    let Ok(mut walker) = Walker::new(regs) else {
        return;
    };
    if let Some(g) = &input.g_stage {
        let second = SecondLevel::Riscv(RiscvGStage {
            hgatp: mode(g.mode) << 60 | u64::from(g.vmid & 0x3fff) << 44 | u64::from(g.root) >> 4,
            mxr: g.mxr,
            adue: g.adue,
            pbmte: input.pbmte,
            svnapot: input.svnapot,
            pa_bits,
        });
        match walker.with_second_level(second) {
            Ok(w) => walker = w,
            Err(_) => return,
        }
    }
    walk_ops::run(&walker, &mem, input.set_ad, &input.ops);
});
