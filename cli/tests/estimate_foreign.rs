//! `pagefold estimate` over other VMMs' snapshots: a Firecracker memory
//! file (full, and a sparse diff) and a cloud-hypervisor snapshot
//! directory count exactly as the raw images of the same pages would, next
//! to raw images; a damaged one is an error naming its file and field.

// A failed unwrap is a failed test; byte patterns are small numbers.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const PAGE: usize = 4096;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pagefold"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Writes `pages` pages where page `i` is `f(i)` repeated.
fn pages_file(p: &Path, pages: usize, f: impl Fn(usize) -> u8) {
    let mut w = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
    for i in 0..pages {
        w.write_all(&[f(i); PAGE]).unwrap();
    }
    w.flush().unwrap();
}

/// 32 pages: 8 zero, 8 of content 1, 16 unique (20 + i).
fn pattern(i: usize) -> u8 {
    match i {
        0..=7 => 0,
        8..=15 => 1,
        _ => (20 + i) as u8,
    }
}

/// A cloud-hypervisor snapshot directory of two ranges holding the 32
/// pages of `pattern`, with a `state.json` shaped like cloud-hypervisor's.
fn ch_dir(root: &Path) -> PathBuf {
    let d = root.join("ch-snap");
    std::fs::create_dir_all(&d).unwrap();
    pages_file(&d.join("memory-ranges"), 32, pattern);
    let mm = serde_json::json!({
        "memory_ranges": { "data": [
            { "gpa": 0x10_0000u64, "length": 16 * PAGE },
            { "gpa": 0u64, "length": 16 * PAGE }
        ] },
        "guest_ram_mappings": [],
        "start_of_device_area": 0x1_0000_0000u64,
        "boot_ram": 0x20_0000u64,
        "current_ram": 0x20_0000u64,
        "arch_mem_regions": [],
        "hotplug_slots": [],
        "next_memory_slot": 1,
        "selected_slot": 0,
        "next_hotplug_slot": 0
    });
    let state = serde_json::json!({
        "snapshots": {
            "memory-manager": { "snapshots": {}, "snapshot_data": { "state": mm.to_string() } }
        },
        "snapshot_data": { "state": "{}" }
    });
    std::fs::write(d.join("state.json"), state.to_string()).unwrap();
    d
}

#[test]
fn estimate_counts_firecracker_and_cloud_hypervisor_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let fc = dir.path().join("fc.mem");
    pages_file(&fc, 32, pattern);
    // A diff: 32 pages, only pages 16..24 written (as in `pattern`).
    let diff = dir.path().join("fc.diff");
    let f = std::fs::File::create(&diff).unwrap();
    f.set_len(32 * PAGE as u64).unwrap();
    for i in 16..24 {
        f.write_all_at(&[pattern(i); PAGE], (i * PAGE) as u64)
            .unwrap();
    }
    drop(f);
    let ch = ch_dir(dir.path());
    let raw = dir.path().join("raw.img");
    pages_file(&raw, 32, pattern);

    let v = json(
        &bin()
            .args(["estimate", "--json", "--firecracker"])
            .arg(&fc)
            .arg("--firecracker")
            .arg(&diff)
            .arg("--cloud-hypervisor")
            .arg(&ch)
            .arg(&raw)
            .output()
            .unwrap(),
    );
    // Four VMs of 32 pages; the diff is 24 zero pages and 8 of the
    // unique contents.
    assert_eq!(v["total_pages"], 128);
    assert_eq!(v["zero_pages"], 8 * 3 + 24);
    // Content 1 and the 16 unique contents.
    assert_eq!(v["distinct_pages"], 17);
    assert_eq!(v["saved_pages"], 128 - 17);
    let images: Vec<String> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["image"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(images.len(), 4);
    assert!(images[0].ends_with("raw.img"), "{images:?}");
    assert!(images[1].ends_with("fc.mem"), "{images:?}");
    assert!(images[3].ends_with("ch-snap/memory-ranges"), "{images:?}");

    // aarch64's layout takes any whole number of pages too.
    let v = json(
        &bin()
            .args([
                "estimate",
                "--json",
                "--firecracker-arch",
                "aarch64",
                "--firecracker",
            ])
            .arg(&fc)
            .output()
            .unwrap(),
    );
    assert_eq!(v["total_pages"], 32);
}

#[test]
fn estimate_names_the_file_and_field_of_a_damaged_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let ch = ch_dir(dir.path());
    // memory-ranges a page short of its ranges.
    let mem = ch.join("memory-ranges");
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len(31 * PAGE as u64).unwrap();
    let out = bin()
        .args(["estimate", "--cloud-hypervisor"])
        .arg(&ch)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&mem.display().to_string()), "{err}");
    assert!(err.contains("length"), "{err}");

    // A state.json whose range has no length.
    f.set_len(32 * PAGE as u64).unwrap();
    let state = ch.join("state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, text.replace("\\\"length\\\"", "\\\"len\\\"")).unwrap();
    let out = bin()
        .args(["estimate", "--cloud-hypervisor"])
        .arg(&ch)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("state.json"), "{err}");
    assert!(
        err.contains("memory_ranges.data[0].length: missing"),
        "{err}"
    );

    // A Firecracker file that is not a whole number of pages.
    let fc = dir.path().join("odd.mem");
    std::fs::write(&fc, vec![1u8; PAGE + 10]).unwrap();
    let out = bin()
        .args(["estimate", "--firecracker"])
        .arg(&fc)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("odd.mem: length"), "{err}");

    // Nothing to count.
    let out = bin().arg("estimate").output().unwrap();
    assert!(!out.status.success());
}
