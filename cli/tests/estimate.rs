//! `pagefold estimate` end to end: exact figures on images whose answer is
//! known by construction, every file error naming its file, a trailing
//! partial page warned of, no privilege needed (run as `nobody` with
//! `vm.unprivileged_userfaultfd=0`), and memory that does not grow with
//! the images (the child's peak RSS, from `wait4`).

// A failed unwrap is a failed test; byte patterns are small numbers.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    io::{BufWriter, Read, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
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

/// Writes an image of `pages` pages where page `i` is `f(i)` repeated.
fn image(dir: &Path, name: &str, pages: usize, f: impl Fn(usize) -> u8) -> PathBuf {
    let p = dir.join(name);
    let mut w = BufWriter::new(std::fs::File::create(&p).unwrap());
    for i in 0..pages {
        w.write_all(&[f(i); PAGE]).unwrap();
    }
    w.flush().unwrap();
    p
}

/// Image A: 64 pages: 16 zero, 16 copies of content 1, 32 unique contents
/// (value 10 + i). Image B: a copy of A, so each of A's unique contents is
/// shared across the files. Distinct non-zero contents: 1 + 32 = 33; zero
/// pages: 32; total 128.
fn known_images(dir: &Path) -> (PathBuf, PathBuf) {
    let f = |i: usize| match i {
        0..=15 => 0,
        16..=31 => 1,
        _ => (10 + i) as u8,
    };
    (image(dir, "a.img", 64, f), image(dir, "b.img", 64, f))
}

#[test]
fn estimate_counts_what_the_images_hold_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = known_images(dir.path());
    let v = json(
        &bin()
            .args(["estimate", "--json"])
            .arg(&a)
            .arg(&b)
            .output()
            .unwrap(),
    );
    assert_eq!(v["total_pages"], 128);
    assert_eq!(v["zero_pages"], 32);
    assert_eq!(v["distinct_pages"], 33);
    assert_eq!(v["saved_pages"], 128 - 33);
    // 33 contents occur more than once; 96 non-zero pages, 33 first copies.
    assert_eq!(v["pages_shared"], 33);
    assert_eq!(v["pages_sharing"], 96 - 33);
    assert_eq!(v["exact"], true);
    assert_eq!(v["hash_collisions"], 0);
    assert_eq!(v["trailing_bytes"], 0);
    assert!(v.get("fold").is_none(), "no fold without --fold: {v}");
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for i in images {
        assert_eq!(i["total_pages"], 64);
        assert_eq!(i["zero_pages"], 16);
        assert_eq!(i["merged_pages"], 48);
    }

    // Text output names each image, a total, and says the figures are exact.
    let out = bin().arg("estimate").arg(&a).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("a.img") && text.contains("total: 64 pages"),
        "{text}"
    );
    assert!(
        text.contains("exact: every figure is byte-checked"),
        "{text}"
    );
}

/// `--fold` also runs the real scanner (here, as root) and reports the
/// kernel's figure beside the count.
#[test]
fn estimate_fold_reports_the_kernels_figure() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = known_images(dir.path());
    let out = bin()
        .args(["estimate", "--fold", "--json"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    if !out.status.success() && stderr(&out).contains("needs userfaultfd") {
        println!("SKIP --fold: {}", stderr(&out).trim());
        return;
    }
    let v = json(&out);
    assert_eq!(v["saved_pages"], 128 - 33);
    assert_eq!(v["fold"]["saved_pages"], 128 - 33);
    // The kernel's own figure covers at least the non-zero duplicates.
    assert!(v["fold"]["saved_bytes_kernel"].as_u64().unwrap() >= (128 - 33 - 32) * PAGE as u64);
}

/// Issue 13: a missing file printed only "No such file or directory (os
/// error 2)", a directory "Is a directory (os error 21)", naming neither.
#[test]
fn estimate_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = known_images(dir.path());
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let tiny = dir.path().join("tiny.img");
    std::fs::write(&tiny, [1u8; 100]).unwrap();
    let missing = dir.path().join("missing.img");
    let cases: [(&Path, &str); 4] = [
        (&missing, "cannot open: No such file or directory"),
        (dir.path(), "is a directory"),
        (&empty, "empty (0 bytes)"),
        (&tiny, "100 bytes, smaller than one page"),
    ];
    for (path, why) in cases {
        // A good image first: the bad one is still found before any work.
        let out = bin().arg("estimate").arg(&good).arg(path).output().unwrap();
        assert!(!out.status.success(), "{}", path.display());
        assert!(out.stdout.is_empty(), "no figures before the check");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("pagefold: {}: {why}", path.display())),
            "{err}"
        );
    }
}

/// Review: a named FIFO was opened before its type was looked at, and
/// opening a FIFO with no writer blocks forever (`estimate` hung). It is
/// refused, naming it, without being opened; so is a character device.
#[test]
fn estimate_refuses_a_fifo_without_opening_it() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = known_images(dir.path());
    let fifo = dir.path().join("ram.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let null = Path::new("/dev/null");
    for path in [fifo.as_path(), null] {
        let mut child = bin()
            .arg("estimate")
            .arg(&good)
            .arg(path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Generous: the refusal comes before any work; a hang never ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("estimate of {} hangs", path.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{}", path.display());
        assert!(out.stdout.is_empty(), "no figures before the check");
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "pagefold: {}: not a regular file or block device",
                path.display()
            )),
            "{err}"
        );
    }
}

/// Issue 13: a 4,097-byte image was read as one page and its last byte
/// dropped without a word.
#[test]
fn estimate_warns_of_a_trailing_partial_page() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.img");
    let mut data = vec![3u8; PAGE + 1];
    data[PAGE] = 9;
    std::fs::write(&p, data).unwrap();
    let out = bin().args(["estimate", "--json"]).arg(&p).output().unwrap();
    assert!(
        stderr(&out).contains(&format!(
            "pagefold: warning: {}: 1 trailing bytes past the last whole 4 KiB page were not counted",
            p.display()
        )),
        "{}",
        stderr(&out)
    );
    let v = json(&out);
    assert_eq!(v["total_pages"], 1);
    assert_eq!(v["trailing_bytes"], 1);
    assert_eq!(v["images"][0]["trailing_bytes"], 1);
}

/// Puts a sysctl back when dropped, also when the test fails.
struct SysctlGuard {
    path: &'static str,
    saved: String,
}

impl SysctlGuard {
    /// Sets `path` to `value` where it holds something else.
    fn set(path: &'static str, value: &str) -> Option<Self> {
        let saved = std::fs::read_to_string(path).ok()?.trim().to_owned();
        if saved == value {
            return None;
        }
        std::fs::write(path, value).unwrap();
        Some(SysctlGuard { path, saved })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, &self.saved);
    }
}

/// Issue 13: an ordinary user got "userfaultfd unavailable: Operation not
/// permitted" (with the cause printed twice). Counting images needs no
/// privilege; `--fold` says what it needs before doing any work.
#[test]
fn estimate_runs_unprivileged() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP estimate as nobody: not root, cannot switch to nobody");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("SKIP estimate as nobody: no setpriv (util-linux) on this machine");
        return;
    }
    // What an ordinary user has by default: no userfaultfd at all.
    let _sysctl = SysctlGuard::set("/proc/sys/vm/unprivileged_userfaultfd", "0");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (a, b) = known_images(dir.path());
    for p in [&a, &b] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_pagefold"))
            .args(args)
            .arg(&a)
            .arg(&b)
            .output()
            .unwrap()
    };
    let v = json(&as_nobody(&["estimate", "--json"]));
    assert_eq!(v["saved_pages"], 128 - 33);
    assert_eq!(v["zero_pages"], 32);

    let out = as_nobody(&["estimate", "--fold"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "refused before any work");
    let err = stderr(&out);
    assert!(
        err.contains("--fold folds the images with the real scanner, which needs userfaultfd: run it with CAP_SYS_PTRACE (as root) or with vm.unprivileged_userfaultfd=1"),
        "{err}"
    );
    assert_eq!(
        err.matches("Operation not permitted").count(),
        1,
        "the cause once: {err}"
    );
}

/// The images are streamed: a 160 MiB image is counted with a peak RSS far
/// below its size (loading it, as estimate did, took more than its size).
#[test]
fn estimate_memory_does_not_grow_with_the_images() {
    const PAGES: usize = 160 << 8; // 160 MiB
    let dir = tempfile::tempdir().unwrap();
    // Each content twice, on consecutive pages: every other page is
    // byte-checked against the one before it.
    let p = dir.path().join("big.img");
    let mut w = BufWriter::new(std::fs::File::create(&p).unwrap());
    let mut page = [0xa5u8; PAGE];
    for i in 0..PAGES {
        page[..8].copy_from_slice(&(i as u64 / 2).to_le_bytes());
        w.write_all(&page).unwrap();
    }
    w.flush().unwrap();
    drop(w);

    // Reaped by the wait4 below, which also gives the child's own peak RSS
    // (RUSAGE_CHILDREN would mix in every other test's children).
    #[allow(clippy::zombie_processes)]
    let mut child = bin()
        .args(["estimate", "--json"])
        .arg(&p)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped (std waits only when
    // asked); `status` and `usage` are valid, writable and live for the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    // The child has exited; what it wrote (a few hundred bytes, within a
    // pipe's buffer, so it never blocked) is read to the end now.
    let (mut out, mut err) = (Vec::new(), String::new());
    stdout.read_to_end(&mut out).unwrap();
    stderr.read_to_string(&mut err).unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["total_pages"], PAGES as u64);
    assert_eq!(v["distinct_pages"], (PAGES / 2) as u64);
    assert_eq!(v["pages_sharing"], (PAGES / 2) as u64);
    let peak_mib = usage.ru_maxrss / 1024; // ru_maxrss is in KiB
    assert!(
        peak_mib < 64,
        "peak RSS {peak_mib} MiB for a 160 MiB image: the image is held in memory"
    );
}
