//! Second review of the host service (issue 15), after the fixes for the
//! first (`tests/service_review.rs`): each test here shows a defect still
//! in `src/service/` across real processes (this binary run again as a
//! child, through `tests/common/processes.rs`). Each fails at the commit
//! reviewed; the doc comment of each says what goes wrong.
//!
//! `harness = false`: `main` runs the child roles or the tests, one after
//! another.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use common::processes::{socket_path, wait_until, Proc};

use pagefold::service::{Service, ServiceOptions};

// ---------------------------------------------------------------- tests

/// A vhost-user backend (second mapper) that leaves while its VM stays
/// under the service: its `ServiceClient` is dropped (`Drop` sends `Bye`;
/// the service's `drop_second` answers `Bye`), its remap thread ends, and
/// in break-on-write mode `remap_loop` (`client.rs`) then runs
/// `home_everything` (`remap.rs`), which copies every page it still maps
/// onto a shared frame or zeros into the VM's memfd wherever that page's
/// own frame is a hole (`copy_home(.., only_holes = true)`). The service
/// still counts those pages merged (their state stays `Shared`/`Zero`, so
/// they are never candidates again and never punched again): every
/// backend restart quietly gives back all the memory the VM had folded,
/// for good. (The copy is also unsynchronised with the service: a break
/// of the same page by the VMM, `write_home_from_shared` then the VMM's
/// write into its own frame, can land between the backend's
/// `SEEK_DATA` check and its `pwrite`, which then puts the old bytes over
/// the VMM's write; the service's `store_own` takes no `PageLock`.)
fn backend_leaving_unfolds_its_vm() {
    const PAGES: usize = 2048;
    let socket = socket_path("backend-leaves");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::vm_with(&socket, 1, PAGES, 0, true);
    let mut b = Proc::vm_with(&socket, 2, PAGES, 0, true);
    let mut x = Proc::backend(&socket, &a, 1, PAGES);
    service.merge_now().unwrap();
    assert!(x.remapped() > 0, "the backend did not follow the merge");
    x.check();
    let before = service.stats().unwrap();
    assert!(before.pages_merged > 0);
    x.exit();
    // The backend's own goodbye is done once it has exited.
    a.check();
    b.check();
    let after = service.stats().unwrap();
    a.exit();
    b.exit();
    assert_eq!(
        (after.pages_merged, after.guest_bytes),
        (before.pages_merged, before.guest_bytes),
        "pages the service counts merged, and the bytes the VMs' memfds hold, before and after the backend left ({} pages merged)",
        before.pages_merged
    );
}

/// `ServiceClient::detach` (`client.rs`) sends `Bye` and then joins the
/// remap thread with no bound: the thread ends only when the service
/// answers `Bye` or closes. A service that is stopped (SIGSTOP, a debugger,
/// a host under memory pressure) or wedged keeps the VMM in `detach`
/// forever, though `Drop` (and `pf_service_client_free`) bounds the same
/// wait at a minute and then brings the pages home itself. (`detach` is
/// also what `reattach` and `pf_service_client_detach` run.)
fn detach_hangs_on_a_stopped_service() {
    const PAGES: usize = 1024;
    let socket = socket_path("stopped-service");
    let svc = Proc::spawn("service", &[("PF_SOCKET", socket.display().to_string())]);
    let mut a = Proc::vm(&socket, 1, PAGES, 0);
    let mut b = Proc::vm(&socket, 2, PAGES, 0);
    wait_until("the background scan to merge", || {
        a.remapped() > (PAGES / 8) as u64
    });
    svc.signal(libc::SIGSTOP);
    a.tell("detach");
    // A liveness bound past `Drop`'s own minute.
    let detached = a.reply_within(90);
    svc.signal(libc::SIGCONT);
    if detached.is_none() {
        // Its answer comes once the service runs again.
        let _ = a.reply_within(60);
    }
    svc.kill();
    a.exit();
    b.exit();
    assert!(
        detached.is_some(),
        "detach did not return within 90 s while the service was stopped"
    );
}

fn main() {
    if common::processes::run_child() {
        return;
    }
    if pagefold::userfault::Userfault::new().is_err() {
        println!("SKIP: no userfaultfd write protection here");
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tests: [(&str, fn()); 2] = [
        ("backend_leaving_unfolds_its_vm", backend_leaving_unfolds_its_vm),
        (
            "detach_hangs_on_a_stopped_service",
            detach_hangs_on_a_stopped_service,
        ),
    ];
    // Every test runs, failing or not: each shows a defect of its own.
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        println!("test {name} ...");
        if std::panic::catch_unwind(test).is_ok() {
            println!("test {name} ... ok");
            passed += 1;
        } else {
            println!("test {name} ... FAILED");
            failed.push(name);
        }
    }
    if failed.is_empty() {
        println!("test result: ok. {passed} passed");
    } else {
        println!(
            "test result: FAILED. {passed} passed, {} failed: {}",
            failed.len(),
            failed.join(", ")
        );
        std::process::exit(101);
    }
}
