//! The `pagefold` binary end to end: `demo` (`estimate` has its own file,
//! `estimate.rs`).

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pagefold"))
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

/// Issue 13 (noticed while fixing estimate): `compare-ksm` run by an
/// ordinary user loaded and folded every workload before it failed on
/// KSM's knobs. It says what it needs before any work.
#[test]
fn compare_ksm_says_it_needs_root_before_any_work() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP compare-ksm as nobody: not root, cannot switch to nobody");
        return;
    }
    if !std::path::Path::new("/sys/kernel/mm/ksm/run").exists()
        || Command::new("setpriv").arg("--version").output().is_err()
    {
        println!("SKIP compare-ksm as nobody: no KSM or no setpriv here");
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_pagefold"))
        .arg("compare-ksm")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "refused before any work: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("compare-ksm drives KSM through /sys/kernel/mm/ksm/run and needs root"),
        "{err}"
    );
}
