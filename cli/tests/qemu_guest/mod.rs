//! The QEMU ground truth of `benches/guest/boot_guest.sh --arch A ...` for
//! the walker tests of the emulated architectures (`maps_qemu_aarch64.rs`,
//! and a RISC-V sibling): finding or making the images (the skip rule of
//! `maps_qemu.rs`), and reading the files the capture wrote — the RAM image
//! and its base (`layout.txt`), the paging registers (`paging-0.txt`) and
//! QEMU's `gva2gpa` answers per privilege context (`gva2gpa-0.txt`) — and
//! `pagefold maps --format json` on the image, to hold QEMU's answers
//! against.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

/// One boot at a time: the tests of one guest run in parallel threads and
/// would otherwise start the script twice on one folder.
static BOOTING: Mutex<()> = Mutex::new(());

/// The files one captured VM leaves.
const FILES: [&str; 5] = [
    "done-0",
    "ram-0.img",
    "paging-0.txt",
    "gva2gpa-0.txt",
    "layout.txt",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `PAGEFOLD_GUEST_IMAGES_<NAME>` (upper case, `-` as `_`), else
/// `target/guest-images-<name>`.
fn images_dir(name: &str) -> PathBuf {
    let var = format!(
        "PAGEFOLD_GUEST_IMAGES_{}",
        name.to_uppercase().replace('-', "_")
    );
    match std::env::var_os(&var) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo().join(format!("target/guest-images-{name}")),
    }
}

fn have_images(dir: &Path) -> bool {
    FILES.iter().all(|f| dir.join(f).is_file())
}

/// A line the test harness does not capture (a SKIP, the result counts).
pub(crate) fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Makes sure the images of guest `name` exist, booting it with the
/// script's `args` if needed. `Err` says why they could not be made.
fn ensure_images(name: &str, args: &[&str]) -> Result<PathBuf, String> {
    let dir = images_dir(name);
    // A test that panicked while holding the lock leaves nothing half done
    // that the script would not redo.
    let _booting = BOOTING.lock().unwrap_or_else(|e| e.into_inner());
    if have_images(&dir) {
        return Ok(dir);
    }
    let script = repo().join("benches/guest/boot_guest.sh");
    if !script.is_file() {
        return Err(format!("{} is missing", script.display()));
    }
    let shown = args.join(" ");
    report(&format!(
        "maps_qemu_{name}: {} has no captured guest; running {} {shown} \
         (boots one guest under QEMU TCG and captures its ground truth, about a minute)",
        dir.display(),
        script.display()
    ));
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .arg("--out")
        .arg(&dir)
        .current_dir(repo())
        .output()
        .map_err(|e| format!("cannot run bash {}: {e}", script.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "{} {shown} failed ({}); its last messages:\n    {}",
            script.display(),
            out.status,
            tail.join("\n    ")
        ));
    }
    if !have_images(&dir) {
        return Err(format!(
            "{} succeeded but {} still lacks one of {FILES:?}",
            script.display(),
            dir.display()
        ));
    }
    Ok(dir)
}

/// The folder of guest `name` (booted by the script with `args` if
/// missing), or `None` after printing a SKIP line when it cannot be made
/// and `PAGEFOLD_SKIP_QEMU=1` is set; panics otherwise.
pub(crate) fn images_or_skip(name: &str, args: &[&str]) -> Option<PathBuf> {
    match ensure_images(name, args) {
        Ok(d) => Some(d),
        Err(why) if std::env::var("PAGEFOLD_SKIP_QEMU").as_deref() == Ok("1") => {
            report(&format!(
                "SKIP maps_qemu_{name}: no guest images ({why}); PAGEFOLD_SKIP_QEMU=1 is set"
            ));
            None
        }
        Err(why) => panic!(
            "maps_qemu_{name}: the QEMU guest images could not be made: {why}\n\
             (set PAGEFOLD_SKIP_QEMU=1 to skip this test where QEMU cannot run)"
        ),
    }
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("'{s}' is not hexadecimal: {e}"))
}

/// `paging-0.txt`: register name to value (`absent` ones left out).
pub(crate) fn paging(dir: &Path) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(dir.join("paging-0.txt")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, v)| v.starts_with("0x"))
        .map(|(k, v)| (k.to_string(), hex(v)))
        .collect()
}

/// The RAM image and the guest-physical address of its first byte (the
/// `layout.txt` range at file offset 0).
pub(crate) fn ram(dir: &Path) -> (Vec<u8>, u64) {
    let layout = std::fs::read_to_string(dir.join("layout.txt")).unwrap();
    let base = layout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && hex(f[2]) == 0)
        .map(|f| hex(f[0]))
        .unwrap_or_else(|| panic!("{}/layout.txt has no range at offset 0", dir.display()));
    (std::fs::read(dir.join("ram-0.img")).unwrap(), base)
}

/// What QEMU's `gva2gpa` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// `gpa: 0x...`.
    Mapped(u64),
    /// `Unmapped`.
    Unmapped,
    /// Anything else (the text).
    Error(String),
}

/// One sampled address in one context.
pub(crate) struct Sample {
    /// The virtual address.
    pub(crate) va: u64,
    /// QEMU's answer.
    pub(crate) answer: Answer,
    /// Where the sampler took it from (`user`, `linear`, `vmalloc`, ...).
    pub(crate) tag: String,
}

/// One privilege context of `gva2gpa-0.txt`.
pub(crate) struct Context {
    /// Its name (`stop`, `el1`, `s`, `u`, ...).
    pub(crate) name: String,
    /// The registers the capture set (through the gdbstub) before its pass.
    pub(crate) set: Vec<(String, u64)>,
    /// QEMU's answers.
    pub(crate) samples: Vec<Sample>,
}

impl Context {
    /// The value the context gave `register`.
    pub(crate) fn get(&self, register: &str) -> u64 {
        self.set
            .iter()
            .find(|(k, _)| k == register)
            .map(|&(_, v)| v)
            .unwrap_or_else(|| panic!("context {} sets no {register}", self.name))
    }
}

/// Reads `gva2gpa-0.txt`: its contexts, in file order.
pub(crate) fn truth(dir: &Path) -> Vec<Context> {
    let text = std::fs::read_to_string(dir.join("gva2gpa-0.txt")).unwrap();
    let mut contexts: Vec<Context> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"context") {
            let set = f[2..]
                .iter()
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), hex(v))
                })
                .collect();
            contexts.push(Context {
                name: f[1].to_string(),
                set,
                samples: Vec::new(),
            });
            continue;
        }
        assert!(f.len() >= 3, "gva2gpa-0.txt: short line {line:?}");
        let answer = match f[2] {
            "unmapped" => Answer::Unmapped,
            a if a.starts_with("0x") => Answer::Mapped(hex(a)),
            a => Answer::Error(a.to_string()),
        };
        let ctx = contexts
            .iter_mut()
            .find(|c| c.name == f[0])
            .unwrap_or_else(|| panic!("gva2gpa-0.txt: context {} not declared", f[0]));
        ctx.samples.push(Sample {
            va: hex(f[1]),
            answer,
            tag: f.get(3).unwrap_or(&"").to_string(),
        });
    }
    contexts
}

/// Agreement counts of one context.
#[derive(Default)]
pub(crate) struct Tally {
    /// Both translated, to the same address.
    pub(crate) mapped: usize,
    /// Neither translated.
    pub(crate) unmapped: usize,
    /// Disagreements, described (the first 20 kept).
    pub(crate) mismatches: Vec<String>,
    /// How many disagreed.
    pub(crate) mismatched: usize,
}

impl Tally {
    /// Records one comparison: `ours` is the walker's address or its fault
    /// (described).
    pub(crate) fn check(&mut self, ctx: &str, s: &Sample, ours: Result<u64, String>) {
        let bad = match (&s.answer, &ours) {
            (Answer::Mapped(q), Ok(p)) if q == p => {
                self.mapped += 1;
                return;
            }
            (Answer::Unmapped, Err(_)) => {
                self.unmapped += 1;
                return;
            }
            (q, o) => {
                let q = match q {
                    Answer::Mapped(p) => format!("{p:#x}"),
                    other => format!("{other:?}"),
                };
                let o = match o {
                    Ok(p) => format!("{p:#x}"),
                    Err(f) => f.clone(),
                };
                format!("{ctx}: {:#018x} ({}): QEMU {q}, walker {o}", s.va, s.tag)
            }
        };
        self.mismatched += 1;
        if self.mismatches.len() < 20 {
            self.mismatches.push(bad);
        }
    }
}

/// One mapping `pagefold maps --format json` listed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Listed {
    /// First virtual address.
    pub(crate) va: u64,
    /// Its physical address.
    pub(crate) gpa: u64,
    /// Bytes.
    pub(crate) size: u64,
    /// Supervisor data reads are allowed.
    pub(crate) read: bool,
}

/// `pagefold maps --format json` on guest `dir`'s image (based at `base`)
/// with the architecture's `registers` arguments: every mapping, sorted by
/// VA.
pub(crate) fn listing(dir: &Path, base: u64, registers: &[String]) -> Vec<Listed> {
    let mut args: Vec<String> = vec![
        "maps".into(),
        "--format".into(),
        "json".into(),
        "--ram".into(),
        dir.join("ram-0.img").display().to_string(),
        "--ram-base".into(),
        format!("{base:#x}"),
    ];
    args.extend(registers.iter().cloned());
    let out = Command::new(env!("CARGO_BIN_EXE_pagefold"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pagefold {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut maps: Vec<Listed> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Listed {
                va: hex(v["va"].as_str().unwrap()),
                gpa: hex(v["gpa"].as_str().unwrap()),
                size: v["size"].as_u64().unwrap(),
                read: v["read"].as_bool().unwrap(),
            }
        })
        .collect();
    maps.sort_unstable_by_key(|m| m.va);
    assert!(
        maps.len() > 1000,
        "maps listed only {} mappings for {}",
        maps.len(),
        dir.display()
    );
    maps
}

/// What the listing says of `va`: the physical address of a readable
/// mapping holding it, else why not.
pub(crate) fn listed(maps: &[Listed], va: u64) -> Result<u64, String> {
    let i = maps.partition_point(|m| m.va <= va);
    let m = i
        .checked_sub(1)
        .map(|i| maps[i])
        .filter(|m| va - m.va < m.size)
        .ok_or_else(|| "in no listed mapping".to_string())?;
    if m.read {
        Ok(m.gpa + (va - m.va))
    } else {
        Err(format!("listed at {:#x}, not readable", m.va))
    }
}
