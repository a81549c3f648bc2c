//! The AArch64 walker against real guests: stock Debian arm64 kernels with
//! a busybox initramfs, booted under QEMU TCG (`-machine virt -cpu max`) by
//! `benches/guest/boot_guest.sh --arch aarch64 ...`, each stopped with a
//! process busy reading /dev/zero (so TTBR0_EL1 is a live process's): 4 KiB
//! pages with 48-bit VAs (Debian 12), and from Debian 13 4 KiB pages with
//! 52-bit VAs and PAs (FEAT_LPA2, five levels), 16 KiB pages with 52-bit
//! VAs (LPA2) and, on a CPU without LPA2, 16 KiB pages with 47-bit VAs.
//! Each capture saved the RAM, the EL1&0 paging registers read through
//! QEMU's gdbstub, and QEMU's own `gva2gpa` for 12,000 sampled addresses
//! (user mappings, the kernel image, the linear map, vmalloc areas, the
//! registers' targets, random and non-canonical and top-byte-tagged ones)
//! in four privilege contexts set through the gdbstub: the PSTATE at the
//! stop, EL1 without PAN, EL1 with PAN, and EL0.
//!
//! For every address and context, `Aarch64Walker` over the RAM image must
//! agree with QEMU: where QEMU translated, a data read at that EL (with that
//! PSTATE.PAN) translates to the same physical address; where QEMU said
//! "Unmapped", the walker faults. And `pagefold maps --arch aarch64` on the
//! image must list exactly what QEMU translates at EL1 without PAN (where
//! every valid leaf is readable): each address QEMU translated lies in a
//! listed mapping at the same physical address, no address QEMU could not
//! translate lies in one.
//!
//! What QEMU's debug translation (`arm_cpu_get_phys_page_attrs_debug`, a
//! `MMU_DATA_LOAD` through `get_phys_addr_with_struct` with `in_debug`) does
//! and does not check: it uses the current EL's translation regime and
//! checks the read permission (AP, PAN) like a real load, and TBI, TxSZ,
//! EPDn and the output-address size; but it skips the access-flag check
//! (`if (likely(!ptw->in_debug))` around the AF test). So the walker is
//! built with TCR_EL1.HA set: a leaf with AF clear then translates (without
//! an update: the image is read-only) instead of taking an access flag
//! fault — the same answer as QEMU's.
//!
//! The images are cached in `target/guest-images-<guest>` (see `GUEST_*`;
//! `PAGEFOLD_GUEST_IMAGES_<GUEST>=DIR`, `-` as `_`, names another folder,
//! e.g. `PAGEFOLD_GUEST_IMAGES_AARCH64_16K_LPA2`); when missing
//! the test runs the script (QEMU and the Debian packages come through
//! apt). If that fails the test fails with the script's reason, unless
//! `PAGEFOLD_SKIP_QEMU=1` is set: then it prints a `SKIP` line and passes.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod qemu_guest;

use pagefold::paging::{
    aarch64::regs::TCR_HA, Aarch64Paging, Aarch64Walker, Access, AccessKind, PhysImage, Privilege,
};
use pagefold::{GuestPhysAddr, GuestVirtAddr};
use qemu_guest::{Answer, Tally};
use std::collections::BTreeMap;

/// ID_AA64MMFR0_EL1.PARange and TCR_EL1.IPS encodings, in bits.
const PA_SIZES: [u8; 7] = [32, 36, 40, 42, 44, 48, 52];

/// PSTATE.PAN.
const PSTATE_PAN: u64 = 1 << 22;

/// TCR_EL1.TBI0 and TBI1.
const TCR_TBI0: u64 = 1 << 37;
const TCR_TBI1: u64 = 1 << 38;

fn reg(regs: &BTreeMap<String, u64>, name: &str) -> u64 {
    *regs
        .get(name)
        .unwrap_or_else(|| panic!("paging-0.txt lacks {name}"))
}

/// What the CPU implements, from its ID registers: the PA size
/// (ID_AA64MMFR0_EL1.PARange), FEAT_LVA (ID_AA64MMFR2_EL1.VARange = 1) and
/// FEAT_LPA2 for the granule TCR_EL1.TG0 selects (TGran4 = 1, TGran16 = 2).
struct Features {
    pa_bits: u8,
    lva: bool,
    lpa2: bool,
}

fn features(regs: &BTreeMap<String, u64>) -> Features {
    let mmfr0 = reg(regs, "ID_AA64MMFR0_EL1");
    let mmfr2 = regs.get("ID_AA64MMFR2_EL1").copied().unwrap_or(0);
    let tg0 = (reg(regs, "TCR_EL1") >> 14) & 3;
    let lpa2 = match tg0 {
        0b00 => (mmfr0 >> 28) & 0xf == 1,
        0b10 => (mmfr0 >> 20) & 0xf == 2,
        _ => false,
    };
    Features {
        pa_bits: PA_SIZES[usize::try_from(mmfr0 & 0xf).unwrap().min(6)],
        lva: (mmfr2 >> 16) & 0xf == 1,
        lpa2,
    }
}

/// The guests: (name, boot_guest.sh arguments). `aarch64`: Debian 12's
/// arm64 kernel, 4 KiB granule, 48-bit VAs, 4 levels. Debian 13's kernels
/// are built for 52-bit VAs, which they use with FEAT_LPA2 (TCR_EL1.DS):
/// `aarch64-lpa2`, 4 KiB granule, 52-bit VAs and PAs, 5 levels (from level
/// -1); `aarch64-16k-lpa2`, the arm64-16k kernel, 16 KiB granule, 52-bit;
/// `aarch64-16k`, the same kernel on a CPU without FEAT_LPA2: 47-bit VAs.
type Guest = (&'static str, &'static [&'static str]);
const GUEST_4K: Guest = ("aarch64", &["--arch", "aarch64"]);
const GUEST_4K_LPA2: Guest = ("aarch64-lpa2", &["--arch", "aarch64", "--suite", "trixie"]);
const GUEST_16K: Guest = (
    "aarch64-16k",
    &[
        "--arch",
        "aarch64",
        "--flavour",
        "16k",
        "--cpu",
        "max,pauth-impdef=on,lpa2=off",
    ],
);
const GUEST_16K_LPA2: Guest = (
    "aarch64-16k-lpa2",
    &["--arch", "aarch64", "--flavour", "16k"],
);

#[test]
fn walker_matches_qemu_gva2gpa_4k() {
    walker_matches_qemu(GUEST_4K);
}

#[test]
fn walker_matches_qemu_gva2gpa_16k() {
    walker_matches_qemu(GUEST_16K);
}

#[test]
fn walker_matches_qemu_gva2gpa_4k_lpa2() {
    walker_matches_qemu(GUEST_4K_LPA2);
}

#[test]
fn walker_matches_qemu_gva2gpa_16k_lpa2() {
    walker_matches_qemu(GUEST_16K_LPA2);
}

#[test]
fn maps_lists_what_qemu_translates_at_el1_4k() {
    maps_lists_what_qemu_translates(GUEST_4K);
}

#[test]
fn maps_lists_what_qemu_translates_at_el1_4k_lpa2() {
    maps_lists_what_qemu_translates(GUEST_4K_LPA2);
}

#[test]
fn maps_lists_what_qemu_translates_at_el1_16k_lpa2() {
    maps_lists_what_qemu_translates(GUEST_16K_LPA2);
}

#[test]
fn maps_lists_what_qemu_translates_at_el1_16k() {
    maps_lists_what_qemu_translates(GUEST_16K);
}

fn walker_matches_qemu((name, args): (&str, &[&str])) {
    let Some(dir) = qemu_guest::images_or_skip(name, args) else {
        return;
    };
    let regs = qemu_guest::paging(&dir);
    let tcr = reg(&regs, "TCR_EL1");
    let cpu = features(&regs);
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
        let (ctx, samples) = (&c.name, &c.samples);
        let cpsr = c.get("cpsr");
        let el = (cpsr >> 2) & 3;
        assert!(el <= 1, "context {ctx}: EL{el} is not the EL1&0 regime");
        let paging = Aarch64Paging {
            tcr: tcr | TCR_HA,
            ttbr0: reg(&regs, "TTBR0_EL1"),
            ttbr1: reg(&regs, "TTBR1_EL1"),
            sctlr: reg(&regs, "SCTLR_EL1"),
            mair: reg(&regs, "MAIR_EL1"),
            pan: cpsr & PSTATE_PAN != 0,
            pa_bits: cpu.pa_bits,
            lva: cpu.lva,
            lpa2: cpu.lpa2,
        };
        let walker = Aarch64Walker::new(paging)
            .unwrap_or_else(|e| panic!("the captured registers are refused: {e} ({paging:x?})"));
        let privilege = if el == 0 {
            Privilege::User
        } else {
            Privilege::Supervisor
        };
        let access = Access::new(AccessKind::Read, privilege);
        let mut tally = Tally::default();
        for s in samples {
            vas.insert(s.va);
            if let Answer::Error(e) = &s.answer {
                failures.push(format!("{ctx}: {:#x}: QEMU answered {e}", s.va));
                continue;
            }
            let ours = walker
                .translate(&mem, GuestVirtAddr(s.va), access)
                .map(|t| t.pa.0)
                .map_err(|f| format!("{:?} fault at level {}", f.kind, f.level));
            tally.check(ctx, s, ours);
        }
        qemu_guest::report(&format!(
            "maps_qemu_{name}: context {ctx} (EL{el}, PAN {}): {} addresses; \
             agreed on {} mapped and {} unmapped; {} disagreed",
            u8::from(paging.pan),
            samples.len(),
            tally.mapped,
            tally.unmapped,
            tally.mismatched
        ));
        if el == 1 && !paging.pan {
            assert!(
                tally.mapped >= 2000 && tally.unmapped >= 2000,
                "context {ctx}: too little of either kind to be a test ({} mapped, {} unmapped)",
                tally.mapped,
                tally.unmapped
            );
        }
        failures.extend(tally.mismatches);
        if tally.mismatched > 20 {
            failures.push(format!(
                "{ctx}: ... {} disagreements in all",
                tally.mismatched
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

/// The `pagefold maps` arguments for the captured registers.
fn maps_args(regs: &BTreeMap<String, u64>) -> Vec<String> {
    let cpu = features(regs);
    let mut args: Vec<String> = vec![
        "--arch".into(),
        "aarch64".into(),
        "--pa-bits".into(),
        cpu.pa_bits.to_string(),
    ];
    if cpu.lva {
        args.push("--lva".into());
    }
    if cpu.lpa2 {
        args.push("--lpa2".into());
    }
    for (flag, name) in [
        ("--tcr", "TCR_EL1"),
        ("--ttbr0", "TTBR0_EL1"),
        ("--ttbr1", "TTBR1_EL1"),
        ("--sctlr", "SCTLR_EL1"),
        ("--mair", "MAIR_EL1"),
    ] {
        args.push(flag.into());
        args.push(format!("{:#x}", reg(regs, name)));
    }
    args
}

fn maps_lists_what_qemu_translates((name, args): (&str, &[&str])) {
    let Some(dir) = qemu_guest::images_or_skip(name, args) else {
        return;
    };
    let regs = qemu_guest::paging(&dir);
    let tcr = reg(&regs, "TCR_EL1");
    let (_, base) = qemu_guest::ram(&dir);
    let maps = qemu_guest::listing(&dir, base, &maps_args(&regs));
    let contexts = qemu_guest::truth(&dir);
    let el1 = contexts
        .iter()
        .find(|c| c.get("cpsr") & (PSTATE_PAN | 0xc) == 0x4)
        .expect("gva2gpa-0.txt has no EL1 context without PAN");
    let mut tally = Tally::default();
    for s in &el1.samples {
        // The listing has each mapping at its VA with the top byte as the
        // range (bit 55) extends it; under TBI the guest's top byte is
        // ignored, as QEMU did.
        let upper = s.va & (1 << 55) != 0;
        let tbi = tcr & if upper { TCR_TBI1 } else { TCR_TBI0 } != 0;
        let va = if tbi {
            (s.va & ((1 << 56) - 1)) | if upper { 0xff << 56 } else { 0 }
        } else {
            s.va
        };
        let hit = qemu_guest::listed(&maps, va);
        tally.check(&el1.name, s, hit);
    }
    qemu_guest::report(&format!(
        "maps_qemu_{name}: maps listed {} mappings; of {} addresses QEMU translated at EL1 \
         {} lie in them at the same address, and {} it could not are in none; {} disagreed",
        maps.len(),
        el1.samples.len(),
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
