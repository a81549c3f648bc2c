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
/// under the service. It used to copy its merged pages home by itself,
/// after a goodbye the service answered without bringing anything home:
/// the service still counted those pages merged, and the copy raced the
/// VMM's breaks (found by review). Now the service brings the VM's pages
/// home through every mapper before it answers the goodbye (a leaving
/// mapper must map the truth), and the next pass folds the VM again
/// without the backend: the memory and every mapper's view stay exact.
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
    a.check();
    b.check();
    let left = service.stats().unwrap();
    // The VM was brought home through every mapper: the service counts
    // none of its pages merged, nothing punched remains mapped anywhere.
    assert_eq!(
        a.remapped(),
        0,
        "the VMM still maps shared frames the service let go"
    );
    service.merge_now().unwrap();
    let again = service.stats().unwrap();
    a.check();
    b.check();
    a.exit();
    b.exit();
    assert!(
        left.pages_merged < before.pages_merged,
        "{left:?} {before:?}"
    );
    assert_eq!(
        (again.pages_merged, again.guest_bytes),
        (before.pages_merged, before.guest_bytes),
        "pages merged and memfd bytes once the VM folded again without the backend"
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
    let b = Proc::vm(&socket, 2, PAGES, 0);
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

/// A VMM in break-on-write mode with a vhost-user backend that is slow
/// (stopped here) when the VMM leaves. `detach` (`server.rs`) fails to
/// `unregister` (the backend's `Home` times out), keeps the VM, and still
/// answers `Bye`; the VMM's `remap_loop` then brings its pages home itself
/// and lifts every protection, so its vCPU's write waiting on a merged
/// page lands in the page's own frame. Its connection closes as `detach`
/// returns, and `lose` (the backend still attached) runs `unregister`
/// again: `unmerge_locked` writes every still-"merged" page home from its
/// shared frame (`write_home_from_shared`, break-on-write), over the
/// VMM's write. The guest's write is lost, in its own memory, with no
/// process left to notice.
fn failed_detach_then_lose_overwrites_the_vmm() {
    const PAGES: usize = 2048;
    let socket = socket_path("failed-detach");
    let service = Service::start(
        &socket,
        ServiceOptions {
            ack_deadline: std::time::Duration::from_millis(200),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let env = |vm: u64| {
        vec![
            ("PF_SOCKET", socket.display().to_string()),
            ("PF_VM", vm.to_string()),
            ("PF_PAGES", PAGES.to_string()),
        ]
    };
    let mut a = Proc::spawn("vcpu", &env(1));
    let b = Proc::spawn("vcpu", &env(2));
    let mut x = Proc::backend(&socket, &a, 1, PAGES);
    service.merge_now().unwrap();
    assert!(x.remapped() > 0, "the backend did not follow the merge");
    assert!(a.remapped() > 0, "the VM did not merge");
    x.signal(libc::SIGSTOP);
    // Pages 3..19 and 1000: the first half, merged with B's, protected in
    // A. The vCPU waits on page 1000 (whose breaks fail while the backend
    // is stopped) until the detach lifts every protection.
    assert_eq!(a.ask("vcpu 1000 3 16 77"), "ok");
    let detached = a.ask("detach");
    // `lose` runs once the VMM's connection closed: give it a while.
    let mut lost = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline && lost.is_empty() {
        for p in 3..19 {
            if a.ask(&format!("read {p}")) != "77" {
                lost.push(p);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    x.signal(libc::SIGCONT);
    x.kill();
    a.exit();
    b.exit();
    assert_eq!(
        (detached.as_str(), lost),
        ("ok", Vec::<usize>::new()),
        "the detach, and the pages whose vCPU write was lost after it"
    );
}

/// A VMM in break-on-write mode with a vhost-user backend that detaches
/// and attaches again (`reattach`: a VMM restarting its connection). The
/// detach used to leave the backend connected to a VM the service no
/// longer had, while the new VM on the same memfd punched frames the
/// backend mapped (found by review). Now the detach brings the backend
/// home too and hangs up on it; the backend sees that and attaches again,
/// to the new VM, whose merges it then follows.
fn backend_kept_across_reattach_reads_punched_frames() {
    const PAGES: usize = 2048;
    let socket = socket_path("reattach-backend");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::vm_with(&socket, 1, PAGES, 0, true);
    let mut b = Proc::vm_with(&socket, 2, PAGES, 0, true);
    let mut x = Proc::backend(&socket, &a, 1, PAGES);
    service.merge_now().unwrap();
    assert!(x.remapped() > 0, "the backend did not follow the merge");
    x.check();
    assert_eq!(a.ask("reattach"), "ok");
    wait_until("the backend to be hung up on", || {
        x.ask("connected") == "false"
    });
    assert_eq!(x.remapped(), 0, "the backend was not brought home");
    x.check();
    assert_eq!(x.ask("reattach"), "ok");
    service.merge_now().unwrap();
    assert!(a.remapped() > 0, "the reattached VM did not merge");
    a.check();
    b.check();
    let seen = x.ask("check");
    let (backend_remapped, vmm_remapped) = (x.remapped(), a.remapped());
    x.exit();
    a.exit();
    b.exit();
    assert_eq!(
        (seen.as_str(), backend_remapped),
        ("ok", vmm_remapped),
        "the backend's view after its VMM reattached, and its pages away from their own frames"
    );
}

// ---------------------------------------------------------------- child

/// A VMM process with a vCPU of its own (`PAGEFOLD_CHILD=vcpu`): attaches
/// in break-on-write mode and says `ready VM_ID 0 0 MEMFD_FD`, as the
/// `vm` child does; `vcpu TRIGGER FIRST COUNT BYTE` starts a thread that
/// writes BYTE over the first 64 bytes of page TRIGGER, then of pages
/// FIRST.. (it waits wherever a page is write-protected), `detach` detaches (then joins that thread), `read
/// PAGE` says the page's first byte.
fn vcpu_child() {
    use std::io::BufRead;
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let socket = std::path::PathBuf::from(env("PF_SOCKET"));
    let vm: u64 = env("PF_VM").parse().unwrap_or(0);
    let pages: usize = env("PF_PAGES").parse().unwrap_or(1024);
    let mem = common::processes::build(vm, pages);
    let options = pagefold::service::ClientOptions {
        vm_tag: vm,
        break_on_write: true,
        ..Default::default()
    };
    let mut client = Some(
        pagefold::service::ServiceClient::attach(&socket, std::sync::Arc::clone(&mem), options)
            .unwrap(),
    );
    println!(
        "ready {} 0 0 {}",
        client.as_ref().map_or(0, |c| c.vm_id()),
        std::os::fd::AsRawFd::as_raw_fd(mem.frame_store())
    );
    let base = mem.regions()[0].host_addr().0 as usize;
    let mut vcpu = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        let reply = match w.as_slice() {
            ["remapped"] => format!("{}", client.as_ref().map_or(0, |c| c.pages_remapped())),
            ["vcpu", trigger, first, count, byte] => {
                let (trigger, first, count, byte): (usize, usize, usize, u8) = (
                    trigger.parse().unwrap(),
                    first.parse().unwrap(),
                    count.parse().unwrap(),
                    byte.parse().unwrap(),
                );
                vcpu = Some(std::thread::spawn(move || {
                    for page in std::iter::once(trigger).chain(first..first + count) {
                        for k in 0..8 {
                            // SAFETY: inside the region's live, writable mapping (as a vCPU writes).
                            unsafe {
                                std::ptr::write_volatile(
                                    (base + page * pagefold::PAGE_SIZE + 8 * k) as *mut u64,
                                    u64::from_le_bytes([byte; 8]),
                                )
                            };
                        }
                    }
                }));
                "ok".into()
            }
            ["detach"] => {
                let r = client.take().map(pagefold::service::ServiceClient::detach);
                if let Some(t) = vcpu.take() {
                    let _ = t.join();
                }
                match r {
                    Some(Ok(_)) => "ok".into(),
                    Some(Err(e)) => format!("bad detach: {e}"),
                    None => "bad not attached".into(),
                }
            }
            ["read", page] => {
                let page: usize = page.parse().unwrap();
                // SAFETY: inside the region's live mapping.
                let v = unsafe {
                    std::ptr::read_volatile((base + page * pagefold::PAGE_SIZE) as *const u8)
                };
                format!("{v}")
            }
            ["exit"] => break,
            _ => format!("bad command {line}"),
        };
        println!("{reply}");
    }
}

fn main() {
    if std::env::var("PAGEFOLD_CHILD").as_deref() == Ok("vcpu") {
        vcpu_child();
        return;
    }
    if common::processes::run_child() {
        return;
    }
    let tests: [(&str, fn()); 4] = [
        (
            "backend_kept_across_reattach_reads_punched_frames",
            backend_kept_across_reattach_reads_punched_frames,
        ),
        (
            "failed_detach_then_lose_overwrites_the_vmm",
            failed_detach_then_lose_overwrites_the_vmm,
        ),
        (
            "backend_leaving_unfolds_its_vm",
            backend_leaving_unfolds_its_vm,
        ),
        (
            "detach_hangs_on_a_stopped_service",
            detach_hangs_on_a_stopped_service,
        ),
    ];
    common::processes::run_tests(&tests);
}
