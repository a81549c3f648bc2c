//! The RISC-V walker against real guests: Debian 13's riscv64 kernel with a
//! busybox initramfs, booted under QEMU TCG (`-machine virt`, OpenSBI) by
//! `benches/guest/boot_guest.sh --arch riscv64 ...`, each stopped with a
//! process busy reading /dev/zero (so satp is a live process's): in Sv57
//! (what the kernel picks on QEMU's rv64), Sv48 (`no5lvl`) and Sv39
//! (`no4lvl`). Each capture saved the RAM, satp/sstatus/menvcfg and the
//! privilege mode read through QEMU's gdbstub, and QEMU's own `gva2gpa`
//! for 12,000 sampled addresses (user mappings, the kernel image, the
//! linear map, vmalloc areas, the registers' targets, random and
//! non-canonical ones) in the privilege contexts set through the gdbstub:
//! as at the stop, S-mode with sstatus.SUM clear and set, and U-mode.
//!
//! For every address and context, `Walker` (`GuestPaging::Riscv64`) over
//! the RAM image must agree with QEMU: where QEMU translated, a data read in
//! that mode translates to the same physical address; where QEMU said
//! "Unmapped", the walker faults. And `pagefold maps --arch riscv64` must
//! list what QEMU translates in S-mode: each address QEMU translated lies in
//! a readable listed mapping at the same physical address, and each it
//! could not lies in none (or in one S-mode may not read).
//!
//! What QEMU 7.2's debug translation (`riscv_cpu_get_phys_page_debug`:
//! `get_physical_address(..., MMU_DATA_LOAD, mmu_idx, ..., is_debug)`)
//! checks: the mode's U/S rule and R (or X with sstatus.MXR), the reserved
//! and misaligned-superpage rules; but it takes sstatus.SUM as set (`sum =
//! ... || is_debug`; dropped in later QEMU), so the walker gets SUM set in
//! every S-mode context; and it sets a clear A bit in guest memory itself,
//! as hardware A/D updating does (the image, saved afterwards, has A set
//! wherever QEMU translated), so the walker gets Svadu (it writes nothing:
//! the image is read-only).
//!
//! The images are cached in `target/guest-images-<guest>` (see `GUEST_*`;
//! `PAGEFOLD_GUEST_IMAGES_<GUEST>=DIR`, `-` as `_`, names another folder);
//! when missing the test runs the script (QEMU and the Debian packages come
//! through apt). If that fails the test fails with the script's reason,
//! unless `PAGEFOLD_SKIP_QEMU=1` is set: then it prints a `SKIP` line and
//! passes.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod qemu_guest;

use pagefold::paging::{
    Access, AccessKind, GuestPaging, PhysImage, Privilege, RiscvPaging, Walker,
};
use pagefold::{GuestPhysAddr, GuestVirtAddr};
use qemu_guest::{Answer, Tally};
use std::collections::BTreeMap;

/// sstatus.MXR.
const SSTATUS_MXR: u64 = 1 << 19;
/// menvcfg.PBMTE.
const MENVCFG_PBMTE: u64 = 1 << 62;
/// QEMU's RV64 physical-address width (a PTE's 44-bit PPN).
const PA_BITS: u8 = 56;

/// The guests: (name, boot_guest.sh arguments).
type Guest = (&'static str, &'static [&'static str]);
const GUEST_SV57: Guest = ("riscv64", &["--arch", "riscv64"]);
const GUEST_SV48: Guest = ("riscv64-sv48", &["--arch", "riscv64", "--append", "no5lvl"]);
const GUEST_SV39: Guest = ("riscv64-sv39", &["--arch", "riscv64", "--append", "no4lvl"]);

#[test]
fn walker_matches_qemu_gva2gpa_sv57() {
    walker_matches_qemu(GUEST_SV57, 10);
}

#[test]
fn walker_matches_qemu_gva2gpa_sv48() {
    walker_matches_qemu(GUEST_SV48, 9);
}

#[test]
fn walker_matches_qemu_gva2gpa_sv39() {
    walker_matches_qemu(GUEST_SV39, 8);
}

#[test]
fn maps_lists_what_qemu_translates_in_s_mode_sv57() {
    maps_lists_what_qemu_translates(GUEST_SV57);
}

#[test]
fn maps_lists_what_qemu_translates_in_s_mode_sv48() {
    maps_lists_what_qemu_translates(GUEST_SV48);
}

#[test]
fn maps_lists_what_qemu_translates_in_s_mode_sv39() {
    maps_lists_what_qemu_translates(GUEST_SV39);
}

fn reg(regs: &BTreeMap<String, u64>, name: &str) -> u64 {
    *regs
        .get(name)
        .unwrap_or_else(|| panic!("paging-0.txt lacks {name}"))
}

/// The walker's registers for a context's sstatus (SUM taken as set, Svadu,
/// as QEMU 7.2's debug walk behaves; see the module comment).
fn paging(regs: &BTreeMap<String, u64>, sstatus: u64) -> RiscvPaging {
    RiscvPaging {
        satp: reg(regs, "satp"),
        sum: true,
        mxr: sstatus & SSTATUS_MXR != 0,
        adue: true,
        pbmte: regs.get("menvcfg").is_some_and(|m| m & MENVCFG_PBMTE != 0),
        svnapot: false,
        pa_bits: PA_BITS,
    }
}

fn walker_matches_qemu((name, args): Guest, mode: u64) {
    let Some(dir) = qemu_guest::images_or_skip(name, args) else {
        return;
    };
    let regs = qemu_guest::paging(&dir);
    assert_eq!(
        reg(&regs, "satp") >> 60,
        mode,
        "{name}: satp's MODE is not the one this guest is for"
    );
    let (image, base) = qemu_guest::ram(&dir);
    let mem = PhysImage::new(GuestPhysAddr(base), &image);
    let contexts = qemu_guest::truth(&dir);
    assert!(
        contexts.len() >= 3,
        "gva2gpa-0.txt has {} contexts",
        contexts.len()
    );
    let mut failures = Vec::new();
    let mut vas = std::collections::BTreeSet::new();
    for c in &contexts {
        let priv_mode = c.get("priv");
        assert!(
            priv_mode <= 1,
            "context {}: privilege {priv_mode} is not U or S",
            c.name
        );
        let p = paging(&regs, c.get("sstatus"));
        let walker = Walker::new(GuestPaging::Riscv64(p))
            .unwrap_or_else(|e| panic!("the captured registers are refused: {e} ({p:x?})"));
        let privilege = if priv_mode == 0 {
            Privilege::User
        } else {
            Privilege::Supervisor
        };
        let access = Access::new(AccessKind::Read, privilege);
        let mut tally = Tally::default();
        for s in &c.samples {
            vas.insert(s.va);
            if let Answer::Error(e) = &s.answer {
                failures.push(format!("{}: {:#x}: QEMU answered {e}", c.name, s.va));
                continue;
            }
            let ours = walker
                .translate(&mem, GuestVirtAddr(s.va), access)
                .map(|t| t.gpa.0)
                .map_err(|f| format!("{:?} at level {}", f.code, f.level));
            tally.check(&c.name, s, ours);
        }
        qemu_guest::report(&format!(
            "maps_qemu_{name}: context {} ({}-mode): {} addresses; \
             agreed on {} mapped and {} unmapped; {} disagreed",
            c.name,
            if priv_mode == 0 { 'U' } else { 'S' },
            c.samples.len(),
            tally.mapped,
            tally.unmapped,
            tally.mismatched
        ));
        if priv_mode == 1 {
            assert!(
                tally.mapped >= 2000 && tally.unmapped >= 2000,
                "context {}: too little of either kind to be a test ({} mapped, {} unmapped)",
                c.name,
                tally.mapped,
                tally.unmapped
            );
        }
        failures.extend(tally.mismatches);
        if tally.mismatched > 20 {
            failures.push(format!(
                "{}: ... {} disagreements in all",
                c.name, tally.mismatched
            ));
        }
    }
    assert!(
        vas.len() >= 10_000,
        "only {} distinct addresses sampled",
        vas.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn maps_lists_what_qemu_translates((name, args): Guest) {
    let Some(dir) = qemu_guest::images_or_skip(name, args) else {
        return;
    };
    let regs = qemu_guest::paging(&dir);
    let (_, base) = qemu_guest::ram(&dir);
    let contexts = qemu_guest::truth(&dir);
    let s_mode = contexts
        .iter()
        .find(|c| c.name == "s")
        .expect("gva2gpa-0.txt has no S-mode context");
    let p = paging(&regs, s_mode.get("sstatus"));
    let mut args: Vec<String> = vec![
        "--arch".into(),
        "riscv64".into(),
        "--satp".into(),
        format!("{:#x}", p.satp),
        "--pa-bits".into(),
        p.pa_bits.to_string(),
        "--sum".into(),
        "--adue".into(),
    ];
    for (on, flag) in [(p.mxr, "--mxr"), (p.pbmte, "--pbmte")] {
        if on {
            args.push(flag.into());
        }
    }
    let maps = qemu_guest::listing(&dir, base, &args);
    let mut tally = Tally::default();
    for s in &s_mode.samples {
        tally.check(&s_mode.name, s, qemu_guest::listed(&maps, s.va));
    }
    qemu_guest::report(&format!(
        "maps_qemu_{name}: maps listed {} mappings; of {} addresses QEMU translated in \
         S-mode {} lie in readable ones at the same address, and {} it could not are in \
         none it may read; {} disagreed",
        maps.len(),
        s_mode.samples.len(),
        tally.mapped,
        tally.unmapped,
        tally.mismatched
    ));
    assert!(
        tally.mismatches.is_empty(),
        "{}",
        tally.mismatches.join("\n")
    );
}
