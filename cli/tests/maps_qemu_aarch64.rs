//! The AArch64 walker against a real guest: a stock Debian arm64 kernel
//! with a busybox initramfs, booted under QEMU TCG (`-machine virt -cpu
//! max`) by `benches/guest/boot_guest.sh --arch aarch64`, stopped with a
//! process busy reading /dev/zero (so TTBR0_EL1 is a live process's).
//! The capture saved its RAM, the EL1&0 paging registers read through
//! QEMU's gdbstub, and QEMU's own `gva2gpa` for 12,000 sampled addresses
//! (user mappings, the kernel image, the linear map, vmalloc areas, the
//! registers' targets, random and non-canonical and top-byte-tagged ones)
//! in four privilege contexts set through the gdbstub: the PSTATE at the
//! stop, EL1 without PAN, EL1 with PAN, and EL0.
//!
//! For every address and context, `Aarch64Walker` over the RAM image must
//! agree with QEMU: where QEMU translated, a data read at that EL (with that
//! PSTATE.PAN) translates to the same physical address; where QEMU said
//! "Unmapped", the walker faults.
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
//! The images are cached in `target/guest-images-aarch64`
//! (`PAGEFOLD_GUEST_IMAGES_AARCH64=DIR` names another folder); when missing
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

/// ID_AA64MMFR0_EL1.PARange and TCR_EL1.IPS encodings, in bits.
const PA_SIZES: [u8; 7] = [32, 36, 40, 42, 44, 48, 52];

/// PSTATE.PAN.
const PSTATE_PAN: u64 = 1 << 22;

fn reg(regs: &std::collections::BTreeMap<String, u64>, name: &str) -> u64 {
    *regs
        .get(name)
        .unwrap_or_else(|| panic!("paging-0.txt lacks {name}"))
}

#[test]
fn aarch64_walker_matches_qemu_gva2gpa() {
    let Some(dir) = qemu_guest::images_or_skip("aarch64") else {
        return;
    };
    let regs = qemu_guest::paging(&dir);
    let tcr = reg(&regs, "TCR_EL1");
    // The walker models PA sizes up to 48 bits. QEMU's `max` CPU reports
    // 52 (PARange 6), but the output size in force is min(IPS, PARange),
    // and a kernel without 52-bit PA support programs IPS <= 48: then 48
    // (or IPS) is the same limit.
    let parange = PA_SIZES[usize::try_from(reg(&regs, "ID_AA64MMFR0_EL1") & 0xf)
        .unwrap()
        .min(6)];
    let ips = PA_SIZES[usize::try_from((tcr >> 32) & 7).unwrap().min(6)];
    assert!(
        parange.min(ips) <= 48,
        "TCR_EL1.IPS and PARange both allow 52-bit output addresses (LPA): not modelled"
    );
    let pa_bits = parange.min(48);
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
            pa_bits,
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
            "maps_qemu_aarch64: context {ctx} (EL{el}, PAN {}): {} addresses; \
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
