//! The `pagefold` binary as the host service of issue 15: `serve` with a
//! client of this test attached through the library, and
//! `compare-ksm --processes` (pagefold's side; KSM's would unmerge every
//! KSM page of the machine running the tests).

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::Arc,
};

use pagefold::{
    service::{ClientOptions, ServiceClient},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pagefold"))
}

/// The service needs userfaultfd (write protection) in every client.
fn no_userfaultfd() -> bool {
    if pagefold::userfault::Userfault::new().is_err() {
        println!("SKIP: no userfaultfd here (CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)");
        return true;
    }
    false
}

/// `key=value` of a stats line, as a number.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The byte page `i` of the served client holds: two contents.
fn byte(i: usize) -> u8 {
    if i % 2 == 0 {
        1
    } else {
        2
    }
}

#[test]
fn serve_folds_a_client_and_stops_on_sigterm() {
    if no_userfaultfd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("svc.sock");
    let mut serve = bin()
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(["--interval-ms", "10", "--stats-every-ms", "50"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(
        first,
        format!("pagefold serve: listening on {}", socket.display())
    );
    assert!(socket.exists());
    // Nothing attached yet.
    let empty = lines.next().unwrap().unwrap();
    assert_eq!(
        empty,
        "vms=0 domains=0 shared_bytes=0 guest_bytes=0 pages_merged=0"
    );

    // 64 pages: 32 copies of one content, 32 of another.
    let pages = 64;
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), (pages * PAGE_SIZE) as u64)]).unwrap();
    for i in 0..pages {
        let page = [byte(i); PAGE_SIZE];
        mem.write(GuestPhysAddr((i * PAGE_SIZE) as u64), &page)
            .unwrap();
    }
    let mem = Arc::new(mem);
    let client =
        ServiceClient::attach(&socket, Arc::clone(&mem), ClientOptions::default()).unwrap();

    // Stats lines until the service has folded the client's pages.
    let mut seen = Vec::new();
    let folded = loop {
        let Some(Ok(line)) = lines.next() else {
            break None;
        };
        seen.push(line.clone());
        assert!(line.starts_with("vms="), "{line}");
        for key in ["domains", "shared_bytes", "guest_bytes", "pages_merged"] {
            assert!(field(&line, key).is_some(), "{key} in {line}");
        }
        if field(&line, "vms") == Some(1) && field(&line, "pages_merged") == Some(pages as u64) {
            break Some(line);
        }
        assert!(seen.len() < 2000, "never folded: {seen:?}");
    };
    let folded = folded.unwrap_or_else(|| panic!("serve ended early: {seen:?}"));
    assert_eq!(field(&folded, "domains"), Some(1), "{folded}");
    // Two distinct contents: two shared frames.
    assert_eq!(
        field(&folded, "shared_bytes"),
        Some(2 * PAGE_SIZE as u64),
        "{folded}"
    );
    assert_eq!(client.pages_remapped(), pages as u64);
    let mut buf = [0u8; PAGE_SIZE];
    for i in 0..pages {
        mem.read(GuestPhysAddr((i * PAGE_SIZE) as u64), &mut buf)
            .unwrap();
        assert_eq!(buf, [byte(i); PAGE_SIZE], "page {i}");
    }

    // A second serve on the same socket refuses instead of taking it over.
    let second = bin()
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another service is listening on"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(socket.exists());

    let pid = libc::pid_t::try_from(serve.id()).unwrap();
    // SAFETY: kill takes a pid (our child's, not yet reaped) and a signal
    // number; it touches no memory of ours.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = serve.wait().unwrap();
    assert!(status.success(), "{status:?} {rest:?}");
    assert!(
        rest.iter()
            .any(|l| l == &format!("pagefold serve: signal {}, stopping", libc::SIGTERM)),
        "{rest:?}"
    );
    assert!(!socket.exists(), "socket file left behind");
    // The guest keeps its bytes with the service gone.
    for i in 0..pages {
        mem.read(GuestPhysAddr((i * PAGE_SIZE) as u64), &mut buf)
            .unwrap();
        assert_eq!(buf, [byte(i); PAGE_SIZE], "page {i} after stop");
    }
    drop(client);
}

#[test]
fn compare_ksm_processes_folds_across_processes() {
    if no_userfaultfd() {
        return;
    }
    let out = bin()
        .args([
            "compare-ksm",
            "--processes",
            "2",
            "--mib",
            "8",
            "--no-ksm",
            "--max-map-count",
            "0",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "== 2 booted clones x 8 MiB (synthetic) (4096 pages, 16 MiB), one process per VM (2 processes)",
        "{text}"
    );
    let achievable: u64 = lines[1]
        .strip_prefix("achievable saving: ")
        .and_then(|l| l.strip_suffix(" pages"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(achievable > 0, "{text}");
    assert!(
        lines[2].contains("merge_now in a loop"),
        "the mode is named: {text}"
    );
    assert!(
        text.contains("  client cost (mean of 2 processes): threads "),
        "{text}"
    );
    let row = lines
        .iter()
        .find(|l| l.starts_with("  pagefold  to 99%:"))
        .unwrap_or_else(|| panic!("{text}"));
    let saved: u64 = row
        .split_once("saved (kernel):")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{row}"));
    // The kernel freed at least 99% of what could be saved, and the run
    // says it got there.
    assert!(saved * 100 >= achievable * 99, "{row}");
    assert!(!row.contains("never"), "{row}");
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with("speedup_to_99pct=")
                && l.contains(" cpu_ratio=")
                && l.contains(" savings_ratio=")),
        "{text}"
    );
}

#[test]
fn compare_ksm_processes_wants_one_image_per_process() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    std::fs::write(&a, vec![0u8; 2 * PAGE_SIZE]).unwrap();
    let out = bin()
        .args(["compare-ksm", "--no-ksm", "--processes", "3"])
        .arg(&a)
        .arg(&a)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--processes 3: 2 image(s) given; give one image per process"),
        "{err}"
    );
}
