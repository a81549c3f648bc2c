//! `pagefold maps --arch aarch64` and `translate --arch aarch64` on a
//! hand-built RAM image above 1 GiB (where arm's `virt` machine puts RAM):
//! both TTBR ranges listed in address order with their attributes, a
//! translation and an abort with its ESR, and the refusals (x86-only
//! `--format qemu`, a missing register).

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::{path::PathBuf, process::Command};

const BASE: u64 = 0x4000_0000;

/// 4 KiB granule, 48-bit ranges: TTBR0's tables at BASE + 0x1000.., one
/// user page at VA 0x40_0000; TTBR1's at BASE + 0x5000.., a 2 MiB kernel
/// block at 0xffff_8000_0020_0000.
fn image(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagefold-arch-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{test}.img"));
    let mut ram = vec![0u8; 0x10_0000];
    let mut put = |off: u64, v: u64| {
        let o = usize::try_from(off).unwrap();
        ram[o..o + 8].copy_from_slice(&v.to_le_bytes());
    };
    let table = |off: u64| (BASE + off) | 3;
    // TTBR0: L0[0] -> L1 at 0x2000, L1[0] -> L2 at 0x3000, L2[2] -> L3 at
    // 0x4000, L3[0]: page at BASE + 0x8_0000, AF, AP[1] (EL0 rw), nG,
    // AttrIndx 1.
    put(0x1000, table(0x2000));
    put(0x2000, table(0x3000));
    put(0x3000 + 2 * 8, table(0x4000));
    put(
        0x4000,
        (BASE + 0x8_0000) | 3 | 1 << 10 | 1 << 6 | 1 << 11 | 1 << 2,
    );
    // TTBR1: L0[256] -> L1 at 0x6000, L1[0] -> L2 at 0x7000, L2[1]: a
    // block at BASE, AF, UXN (EL1 read, write and execute).
    put(0x5000 + 256 * 8, table(0x6000));
    put(0x6000, table(0x7000));
    put(0x7000 + 8, BASE | 1 | 1 << 10 | 1 << 54);
    std::fs::write(&p, ram).unwrap();
    p
}

const TCR: &str = "0x5b5103510"; // T0SZ = T1SZ = 16, 4 KiB, IPS 48 bits, IRGN/ORGN/SH

fn run(img: &PathBuf, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pagefold"))
        .args(&args[..1])
        .arg("--ram")
        .arg(img)
        .args(["--ram-base", "40000000", "--arch", "aarch64"])
        .args(&args[1..])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const REGS: [&str; 8] = [
    "--tcr", TCR, "--ttbr0", "40001000", "--ttbr1", "40005000", "--mair", "ff00",
];

#[test]
fn maps_lists_both_ranges_with_their_attributes() {
    let img = image("maps");
    let (code, out, err) = run(&img, &[&["maps"][..], &REGS[..]].concat());
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "0000000000400000 0000000040080000 4K rw- u -A---- el0=rwx attr=0xff sh=0",
            "ffff800000200000 0000000040000000 2M rwx s GA---- attr=0x00 sh=0",
        ],
        "{err}"
    );
    let (code, out, _) = run(&img, &[&["maps", "--json"][..], &REGS[..]].concat());
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 2);
    assert!(out.contains("\"va\":\"0xffff800000200000\""), "{out}");
}

#[test]
fn translate_gives_the_address_or_the_abort() {
    let img = image("translate");
    let (code, out, err) = run(
        &img,
        &[&["translate"][..], &REGS[..], &["ffff800000212345"]].concat(),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("ffff800000212345 -> 0000000040012345 2M"),
        "{out}"
    );
    // EL0 may not read the kernel block: a permission fault at level 2,
    // a data abort from EL0 (EC 0x24).
    let (code, out, _) = run(
        &img,
        &[
            &["translate", "--user"][..],
            &REGS[..],
            &["ffff800000212345"],
        ]
        .concat(),
    );
    assert_eq!(code, Some(3));
    assert!(
        out.contains("abort, ESR_EL1 0x9200000e (FSC 0x0e)"),
        "{out}"
    );
    // Outside both ranges: a translation fault at level 0.
    let (code, out, _) = run(
        &img,
        &[&["translate"][..], &REGS[..], &["0001000000000000"]].concat(),
    );
    assert_eq!(code, Some(3));
    assert!(out.contains("(FSC 0x04)"), "{out}");
}

#[test]
fn x86_only_output_and_missing_registers_are_refused() {
    let img = image("refused");
    let (code, _, err) = run(
        &img,
        &[&["maps", "--format", "qemu"][..], &REGS[..]].concat(),
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("--format qemu prints x86"), "{err}");
    let (code, _, err) = run(&img, &["maps", "--tcr", TCR, "--ttbr0", "40001000"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--ttbr1"), "{err}");
    let (code, _, err) = run(
        &img,
        &[
            "maps",
            "--tcr",
            "ffffffffffffffff",
            "--ttbr0",
            "0",
            "--ttbr1",
            "0",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("bad paging registers"), "{err}");
}
