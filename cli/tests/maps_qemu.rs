//! `pagefold maps` and `pagefold translate` against real guests: four
//! Debian-kernel + busybox guests booted under QEMU TCG by
//! `benches/guest/boot_guest.sh`, whose RAM, registers and `info tlb` were
//! saved while each guest was stopped. For every VM, `maps --format qemu`
//! on the RAM image must print exactly what QEMU's `info tlb` printed (same
//! lines, same order), and `translate` of every 1000th mapping must give
//! the physical address QEMU shows.
//!
//! The images are cached in `target/guest-images` (the script reuses them;
//! `PAGEFOLD_GUEST_IMAGES=DIR` names another folder, passed to the script
//! as `--out`). When they are missing the test runs the script, which installs QEMU and
//! fetches the kernel and busybox with apt. If that fails the test fails,
//! with the script's reason, unless `PAGEFOLD_SKIP_QEMU=1` is set: then it
//! prints a `SKIP` line saying why, and passes.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

const VMS: usize = 4;
const TRANSLATE_EVERY: usize = 1000;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn images_dir() -> PathBuf {
    match std::env::var_os("PAGEFOLD_GUEST_IMAGES") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo().join("target/guest-images"),
    }
}

fn have_images(dir: &Path) -> bool {
    (0..VMS).all(|i| {
        ["done-{}", "ram-{}.img", "registers-{}.txt", "tlb-{}.txt"]
            .iter()
            .all(|f| dir.join(f.replace("{}", &i.to_string())).is_file())
    })
}

/// Makes sure the images exist, booting the guests if needed. `Err` says
/// why they could not be made.
fn ensure_images() -> Result<PathBuf, String> {
    let dir = images_dir();
    if have_images(&dir) {
        return Ok(dir);
    }
    let script = repo().join("benches/guest/boot_guest.sh");
    if !script.is_file() {
        return Err(format!("{} is missing", script.display()));
    }
    eprintln!(
        "maps_qemu: {} has no complete set of {VMS} guest images; running {} \
         (boots {VMS} guests under QEMU TCG, a few minutes)",
        dir.display(),
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .arg("--out")
        .arg(&dir)
        .current_dir(repo())
        .output()
        .map_err(|e| format!("cannot run bash {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "{} failed ({}); its last messages:\n    {}",
            script.display(),
            out.status,
            tail.join("\n    ")
        ));
    }
    if !have_images(&dir) {
        return Err(format!(
            "{} succeeded but {} still lacks ram/registers/tlb files for {VMS} VMs",
            script.display(),
            dir.display()
        ));
    }
    Ok(dir)
}

/// CR0, CR3, CR4 and EFER from QEMU's `info registers`.
fn registers(text: &str) -> [u64; 4] {
    let mut regs = [None; 4];
    for token in text.split_whitespace() {
        for (slot, name) in ["CR0=", "CR3=", "CR4=", "EFER="].iter().enumerate() {
            if let Some(v) = token.strip_prefix(name) {
                regs[slot].get_or_insert(u64::from_str_radix(v, 16).unwrap());
            }
        }
    }
    regs.map(|r| r.expect("info registers lacks CR0, CR3, CR4 or EFER"))
}

fn guest_args(dir: &Path, vm: usize) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(format!("registers-{vm}.txt"))).unwrap();
    let [cr0, cr3, cr4, efer] = registers(&text);
    vec![
        "--ram".into(),
        dir.join(format!("ram-{vm}.img")).display().to_string(),
        "--cr0".into(),
        format!("{cr0:x}"),
        "--cr3".into(),
        format!("{cr3:#x}"),
        "--cr4".into(),
        format!("{cr4:x}"),
        "--efer".into(),
        format!("{efer:#x}"),
    ]
}

/// A line the test harness does not capture (a SKIP, the per-VM result).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn pagefold(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pagefold"))
        .args(args)
        .output()
        .unwrap()
}

/// Where two listings differ, for the failure message.
fn describe_mismatch(ours: &[&str], qemu: &[&str]) -> String {
    let same = ours.iter().zip(qemu).filter(|(a, b)| a == b).count();
    let mut s = format!(
        "{same} of {} QEMU lines match in place ({} lines from pagefold)\n",
        qemu.len(),
        ours.len()
    );
    let mut shown = 0;
    for i in 0..ours.len().max(qemu.len()) {
        let (a, b) = (ours.get(i), qemu.get(i));
        if a != b {
            s.push_str(&format!(
                "  line {}: pagefold {:?}\n           qemu     {:?}\n",
                i + 1,
                a.copied().unwrap_or("<none>"),
                b.copied().unwrap_or("<none>")
            ));
            shown += 1;
            if shown == 10 {
                s.push_str("  ...\n");
                break;
            }
        }
    }
    s
}

#[test]
fn maps_and_translate_match_qemu_info_tlb() {
    let dir = match ensure_images() {
        Ok(d) => d,
        Err(why) if std::env::var("PAGEFOLD_SKIP_QEMU").as_deref() == Ok("1") => {
            report(&format!(
                "SKIP maps_qemu: no guest images ({why}); PAGEFOLD_SKIP_QEMU=1 is set"
            ));
            return;
        }
        Err(why) => panic!(
            "maps_qemu: the QEMU guest images could not be made: {why}\n\
             (set PAGEFOLD_SKIP_QEMU=1 to skip this test where QEMU cannot run)"
        ),
    };

    let mut failures = Vec::new();
    for vm in 0..VMS {
        let guest = guest_args(&dir, vm);
        let qemu = std::fs::read_to_string(dir.join(format!("tlb-{vm}.txt"))).unwrap();
        let qemu_lines: Vec<&str> = qemu.lines().collect();
        assert!(
            qemu_lines.len() > 1000,
            "VM {vm}: tlb-{vm}.txt has only {} lines",
            qemu_lines.len()
        );

        let mut args = vec!["maps".to_string(), "--format".into(), "qemu".into()];
        args.extend(guest.iter().cloned());
        let out = pagefold(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "VM {vm}: pagefold maps failed: {stderr}"
        );
        let ours = String::from_utf8(out.stdout).unwrap();
        let our_lines: Vec<&str> = ours.lines().collect();
        let matched = our_lines
            .iter()
            .zip(&qemu_lines)
            .filter(|(a, b)| a == b)
            .count();
        let summary = format!(
            "maps_qemu: VM {vm}: {matched}/{} lines of info tlb matched ({} from pagefold){}",
            qemu_lines.len(),
            our_lines.len(),
            if stderr.is_empty() {
                String::new()
            } else {
                format!("; stderr: {}", stderr.trim())
            }
        );
        if our_lines != qemu_lines {
            report(&summary);
            failures.push(format!(
                "VM {vm}: maps --format qemu differs from info tlb: {}",
                describe_mismatch(&our_lines, &qemu_lines)
            ));
            continue;
        }

        // translate, for every 1000th mapping: the physical address QEMU
        // printed (its masked entry is the page's base for these long-mode
        // guests).
        let mut checked = 0;
        for line in qemu_lines.iter().step_by(TRANSLATE_EVERY) {
            let (va, rest) = line.split_once(": ").unwrap();
            let mut fields = rest.split_whitespace();
            let pa = u64::from_str_radix(fields.next().unwrap(), 16).unwrap();
            let flags = fields.next().unwrap();
            let mut args = vec!["translate".to_string(), "--json".into()];
            args.extend(guest.iter().cloned());
            if flags.contains('U') {
                args.push("--user".into());
            }
            args.push(va.to_string());
            let out = pagefold(&args);
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                failures.push(format!(
                    "VM {vm}: translate {va} failed ({}): {text} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let gpa = v["gpa"].as_str().unwrap();
            let gpa = u64::from_str_radix(gpa.trim_start_matches("0x"), 16).unwrap();
            if gpa != pa {
                failures.push(format!(
                    "VM {vm}: translate {va} gave {gpa:#x}, info tlb says {pa:#x} ({line})"
                ));
            }
            checked += 1;
        }
        report(&format!(
            "{summary}; translate agreed on {checked} sampled mappings"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn registers_are_read_from_info_registers() {
    let text = "RIP=ffffffffb66592eb RFL=00000246 [---Z-P-] CPL=0\n\
                CR0=80050033 CR2=00000000005794a9 CR3=0000000002b04000 CR4=000006f0\n\
                DR0=0000000000000000\n\
                EFER=0000000000000d01\n";
    assert_eq!(registers(text), [0x8005_0033, 0x2b0_4000, 0x6f0, 0xd01]);
}
