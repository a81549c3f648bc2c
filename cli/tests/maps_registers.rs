//! `pagefold maps` and `pagefold translate` refuse paging registers no
//! processor holds, naming the register and the reserved bits, instead of
//! walking the image in whatever mode the bits select (all-ones registers
//! used to be read as 5-level paging).

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::{path::PathBuf, process::Command};

/// A RAM image of two pages: a PML4 at 0 whose first entry points at a
/// PDPT at 0x1000 mapping the first GiB as one page. One file per test
/// (tests run in parallel).
fn image(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagefold-regs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{test}.img"));
    let mut ram = vec![0u8; 8192];
    // Present, writable; the PDPTE also PS.
    ram[..8].copy_from_slice(&0x1003u64.to_le_bytes());
    ram[0x1000..0x1008].copy_from_slice(&0x83u64.to_le_bytes());
    std::fs::write(&p, ram).unwrap();
    p
}

/// Runs `pagefold <cmd> --ram <image> --cr3 0 <regs> [extra]`: (success, stderr).
fn run(image: &PathBuf, cmd: &str, regs: &[&str], extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pagefold"))
        .arg(cmd)
        .arg("--ram")
        .arg(image)
        .args(["--cr3", "0"])
        .args(regs)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn all_ones_registers_are_refused_by_name() {
    const ONES: &str = "ffffffffffffffff";
    let img = image("all_ones");
    let cases = [
        (
            ["--cr0", ONES, "--cr4", "6f0", "--efer", "d01"],
            "bad paging registers: CR0 has reserved bits set: 0xffffffff1ffaffc0",
        ),
        (
            ["--cr0", "80050033", "--cr4", ONES, "--efer", "d01"],
            "bad paging registers: CR4 has reserved bits set: 0xfffffffee4008000",
        ),
        (
            ["--cr0", "80050033", "--cr4", "6f0", "--efer", ONES],
            "bad paging registers: EFER has reserved bits set: 0xffffffffffc902fe",
        ),
    ];
    for (regs, want) in cases {
        for (cmd, extra) in [("maps", &[][..]), ("translate", &["ffffffff81000000"][..])] {
            let (ok, stderr) = run(&img, cmd, &regs, extra);
            assert!(!ok, "{cmd} {regs:?} succeeded");
            assert!(stderr.contains(want), "{cmd} {regs:?}: {stderr}");
        }
    }
}

#[test]
fn a_real_guests_registers_are_accepted() {
    // The same image with a QEMU guest's registers lists its one mapping:
    // the refusals above are the registers', not the image's.
    let (ok, stderr) = run(
        &image("real"),
        "maps",
        &["--cr0", "80050033", "--cr4", "6f0", "--efer", "d01"],
        &[],
    );
    assert!(ok, "{stderr}");
}
