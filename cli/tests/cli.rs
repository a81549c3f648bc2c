//! The `pagefold` binary end to end: `estimate --json` on images whose
//! answer is known by construction, errors on bad input, and `demo`.

// A failed unwrap is a failed test; byte patterns are small numbers.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{path::PathBuf, process::Command};

const PAGE: usize = 4096;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pagefold"))
}

/// Writes an image of `pages` pages where page `i` is `f(i)` repeated.
fn image(dir: &std::path::Path, name: &str, pages: usize, f: impl Fn(usize) -> u8) -> PathBuf {
    let mut data = vec![0u8; pages * PAGE];
    for i in 0..pages {
        data[i * PAGE..(i + 1) * PAGE].fill(f(i));
    }
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn estimate_json_counts_what_the_images_hold() {
    let dir = std::env::temp_dir().join(format!("pagefold-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Image A: 64 pages: 16 zero, 16 copies of content 1, 32 unique contents
    // (value 10 + i). Image B: a copy of A. Distinct non-zero contents: 1 +
    // 32 = 33; zero pages: 32; total 128.
    let f = |i: usize| match i {
        0..=15 => 0,
        16..=31 => 1,
        _ => (10 + i) as u8,
    };
    let a = image(&dir, "a.img", 64, f);
    let b = image(&dir, "b.img", 64, f);
    let out = bin()
        .args(["estimate", "--json"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total_pages"], 128);
    assert_eq!(v["zero_pages"], 32);
    assert_eq!(v["distinct_pages"], 33);
    assert_eq!(v["saved_pages"], 128 - 33);
    // The kernel's own figure covers at least the non-zero duplicates.
    assert!(v["saved_bytes_kernel"].as_u64().unwrap() >= (128 - 33 - 32) * PAGE as u64);
    assert_eq!(v["images"].as_array().unwrap().len(), 2);

    // Text output names each image and a total.
    let out = bin().arg("estimate").arg(&a).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("a.img") && text.contains("total: 64 pages"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn estimate_refuses_missing_and_tiny_images() {
    let out = bin()
        .args(["estimate", "/nonexistent/ram.img"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pagefold:"));
    let dir = std::env::temp_dir().join(format!("pagefold-cli-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = dir.join("tiny.img");
    std::fs::write(&tiny, [1u8; 100]).unwrap();
    let out = bin().arg("estimate").arg(&tiny).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("smaller than one page"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn demo_runs_and_verifies_every_vm() {
    let out = bin()
        .args(["demo", "--vms", "2", "--mib", "8", "--no-kvm"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("pagefold demo: software path (--no-kvm given)"),
        "{text}"
    );
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("every VM's memory verified byte for byte after folding"),
        "{text}"
    );
    assert!(text.contains("copy-on-write breaks so far: 1"), "{text}");
    assert!(
        text.contains("balloon: VM 1 inflates 256 pages (le32 queue payload) + 256 pages (range): actual 512 pages"),
        "{text}"
    );
    assert!(
        text.contains("balloon: VM 1 deflates 256 pages and writes them again: actual 256 pages"),
        "{text}"
    );
    assert!(
        text.contains("balloon verified: ballooned pages read as zeros, every other page intact"),
        "{text}"
    );
    assert!(text.contains("migration: VM 0 (8 MiB)"), "{text}");
    assert!(text.contains("  round 0: "), "{text}");
    assert!(text.contains("on the wire ("), "{text}");
    assert!(text.contains("zero-page-only stream"), "{text}");
    assert!(text.contains("downtime "), "{text}");
    assert!(
        text.contains("migration verified: receiver equals VM 0 byte for byte (end-marker digest checked: true)"),
        "{text}"
    );
}

/// Where KVM is usable the demo runs real guests (and says so); elsewhere
/// it says why not and runs the software path.
#[test]
fn demo_uses_kvm_where_usable_and_says_which() {
    let out = bin()
        .args(["demo", "--vms", "2", "--mib", "8"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if text.starts_with("pagefold demo: software path (") {
        println!("SKIP the KVM path: {}", text.lines().next().unwrap_or(""));
        assert!(
            text.contains("every VM's memory verified byte for byte"),
            "{text}"
        );
        return;
    }
    assert!(text.starts_with("pagefold demo: KVM path: 2 VMs"), "{text}");
    assert!(
        text.contains("every guest verified its whole memory while being folded"),
        "{text}"
    );
    assert!(text.contains("2048 KiB page"), "{text}");
    assert!(text.contains("VM 0 migrated:"), "{text}");
    assert!(
        text.contains("every guest's memory checked out, before and after the migration"),
        "{text}"
    );
}
