//! Review of the host service (issue 15): each test here showed a defect
//! found by reading `src/service/` and the engine's hooks for it, across
//! real processes (this binary run again as a child, as `tests/service.rs`
//! does, whose harness is copied here). Each failed before its fix and
//! guards it now; the doc comment of each says what went wrong.
//!
//! `harness = false`: `main` runs the child roles or the tests, one after
//! another.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use common::processes::{socket_path, wait_until, Proc};

use std::{
    io::Write,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use pagefold::service::{Service, ServiceOptions};

// ---------------------------------------------------------------- tests

/// A VMM in break-on-write mode whose connection ends without a goodbye
/// (its `ServiceClient` dropped, its remap thread gone, the socket closed)
/// while its vhost-user backend stays attached and the VM runs on. The
/// VMM's remap thread brings its merged pages home into the memfd; the
/// service `lose`s the VM (`server.rs` `lose`: `mark_lost` and `forget`)
/// but tells the backend nothing, so the backend keeps mapping the shared
/// frames: a guest write lands in the memfd, where the backend does not
/// look (and a backend write to such a page waits on a break the service
/// drops, since the VM is gone from `vms`).
fn backend_left_behind_when_the_vmm_connection_ends() {
    const PAGES: usize = 2048;
    let socket = socket_path("orphan");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::vm_with(&socket, 1, PAGES, 0, true);
    let b = Proc::vm_with(&socket, 2, PAGES, 0, true);
    let mut x = Proc::backend(&socket, &a, 1, PAGES);
    service.merge_now().unwrap();
    assert!(x.remapped() > 0, "the backend did not follow the merge");
    x.check();
    assert_eq!(a.ask("drop"), "ok");
    wait_until("the service to forget VM 1", || {
        service.stats().unwrap().vms == 1
    });
    // Page 3 is in the first half, merged with B's.
    assert_eq!(a.ask("rawwrite 3 81"), "ok");
    assert_eq!(x.ask("expect 3 81"), "ok");
    a.check();
    let seen = x.ask("check");
    let still_remapped = x.remapped();
    x.kill();
    a.exit();
    b.exit();
    assert_eq!(
        seen, "ok",
        "the backend does not see the VM's write ({still_remapped} pages still mapped to shared frames)"
    );
}

/// A VMM process that stops reading its socket (SIGSTOP, as in
/// `stuck_client_is_rolled_back`) while the service keeps merging: each
/// window is rolled back after the deadline, but the `Remap` messages pile
/// up in the socket, and once its buffer is full the service's `send`
/// (`mapper.rs` `ConnMapper::send`, `socket.rs` `Conn::send`, no write
/// timeout anywhere) blocks for good, holding the merge of the whole
/// domain and its scan lock (`DedupHost::merge_now`): `merge_now` never
/// returns while the process stays stopped, and another VM of the domain
/// cannot leave meanwhile (its `unregister` waits for the lock). Once the
/// stopped process is killed, that VM's detach goes on, and its restore is
/// judged against the (short) deadline: see
/// `late_restore_on_detach_loses_memory` for what follows.
fn stopped_client_blocks_merging_for_good() {
    const PAGES: usize = 2048;
    const PASSES: usize = 1500;
    let socket = socket_path("silent");
    let service = Service::start(
        &socket,
        ServiceOptions {
            ack_deadline: Duration::from_millis(1),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let mut a = Proc::vm(&socket, 1, PAGES, 0);
    let b = Proc::vm(&socket, 2, PAGES, 0);
    b.signal(libc::SIGSTOP);
    let passes = AtomicUsize::new(0);
    let finished = AtomicBool::new(false);
    let mut stuck_after = None;
    let (mut a_detach, mut a_detach_hung) = (None, false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..PASSES {
                let _ = service.merge_now();
                passes.fetch_add(1, Ordering::SeqCst);
            }
            finished.store(true, Ordering::SeqCst);
        });
        // A liveness check, not a timing: a pass that has not ended in a
        // minute is blocked (one pass takes milliseconds here).
        let mut last = (0, Instant::now());
        while !finished.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            let n = passes.load(Ordering::SeqCst);
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(60) {
                stuck_after = Some(n);
                break;
            }
        }
        // The pass holds the domain's scan lock meanwhile: another VM of
        // the domain cannot leave (its `unregister` waits for the lock).
        if stuck_after.is_some() {
            a.tell("detach");
            a_detach = a.reply_within(30);
        }
        // Unblocks the send (the socket closes) so the thread can end.
        b.signal(libc::SIGKILL);
    });
    let mut b = b;
    let _ = b.child.wait();
    if stuck_after.is_some() && a_detach.is_none() {
        a_detach = a.reply_within(60);
        a_detach_hung = true;
    }
    let a_memory = a.ask("check");
    a.exit();
    assert_eq!(
        (stuck_after, a_detach_hung, a_memory.as_str()),
        (None, false, "ok"),
        "merge_now blocked for good after {} passes (the service's send to a process that stopped reading has no deadline); meanwhile another VM's detach hung ({}), and once the stopped process was killed it ended: {a_detach:?}",
        stuck_after.unwrap_or(0),
        a_detach_hung,
    );
}

/// A backend that attaches while a merge window of its VM waits for the
/// VMM's ack. `VmMappers::remap` (`mapper.rs`) listed the mappers before
/// the backend was added, so the window never asks the backend to remap;
/// and the backend's catch-up (`catch_up.rs`) passes over the window's
/// pages, which are still private (held, not yet published): "a page that
/// is not remapped is passed over", locked or not. The backend is told
/// `Ready` and maps its own frames there; the window then publishes and
/// punches those frames: the backend reads zeros where the guest has
/// bytes, and a write of its lands in a frame no other mapper maps.
///
/// To hold the window open, the VMM is stopped (SIGSTOP) before the merge.
/// The backend's attach now waits for the window in flight (until it is
/// rolled back at the deadline: the VMM does not answer), so it is never
/// Ready while a window it was not part of can still remap; then the VMM
/// runs again, and a second pass merges with the backend following.
fn backend_joining_mid_window_misses_it() {
    const PAGES: usize = 2048;
    let socket = socket_path("join");
    let service = Service::start(
        &socket,
        ServiceOptions {
            ack_deadline: Duration::from_secs(3),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let mut a = Proc::vm_with(&socket, 1, PAGES, 0, true);
    let b = Proc::vm_with(&socket, 2, PAGES, 0, true);
    a.signal(libc::SIGSTOP);
    let mut x = std::thread::scope(|s| {
        let merge = s.spawn(|| service.merge_now());
        // The merge hashes, then its first window of A waits for A's ack.
        std::thread::sleep(Duration::from_secs(1));
        let x = Proc::backend(&socket, &a, 1, PAGES);
        a.signal(libc::SIGCONT);
        let _ = merge.join();
        x
    });
    let seen_first = x.ask("check");
    // A answers again once it ran its queued (revoked) remap; the next
    // pass merges A with the backend following.
    wait_until("A to answer again", || {
        service.merge_now().unwrap();
        a.remapped() > 0
    });
    let seen = x.ask("check");
    let (ra, rx) = (a.remapped(), x.remapped());
    a.check();
    x.kill();
    a.exit();
    b.exit();
    assert_eq!(seen_first, "ok", "the backend's view right after it joined");
    assert!(ra > 0, "the VMM did not merge");
    assert_eq!(
        (seen.as_str(), rx),
        ("ok", ra),
        "the backend that joined mid-window: its view, and its pages away from their own frames (the VMM's: {ra})"
    );
}

/// A backend that answers late once (SIGSTOP for longer than the ack
/// deadline: a loaded host, a debugger) while the VMM's write breaks a
/// merged page. The unmerge's `Home` to the backend times out, and
/// `ConnMapper::home` calls `lost`, which quarantines the backend for good
/// (`mapper.rs`). From then on every unmerge of the VM fails at
/// `VmMappers::protect` (a quarantined mapper refuses protection), and
/// `unmerge_locked` (`merge.rs`) then calls `release_all(.., None)`, which
/// unprotects the run in every mapper although its pages are still merged:
/// a later write from the backend to a merged page is the kernel's copy on
/// write into the backend's private memory, which the VMM never sees.
fn backend_late_once_during_a_break() {
    const PAGES: usize = 2048;
    let socket = socket_path("late");
    let service = Service::start(
        &socket,
        ServiceOptions {
            ack_deadline: Duration::from_millis(300),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let mut a = Proc::vm_with(&socket, 1, PAGES, 0, true);
    let b = Proc::vm_with(&socket, 2, PAGES, 0, true);
    let mut x = Proc::backend(&socket, &a, 1, PAGES);
    service.merge_now().unwrap();
    assert!(x.remapped() > 0, "the backend did not follow the merge");
    x.signal(libc::SIGSTOP);
    // Page 3 is merged (the first half is shared with B).
    a.tell("rawwrite 3 81");
    std::thread::sleep(Duration::from_secs(2));
    x.signal(libc::SIGCONT);
    let a_wrote = a.reply_within(60);
    let mut problems = Vec::new();
    if a_wrote.as_deref() != Some("ok") {
        problems.push(format!("the VMM's write did not complete: {a_wrote:?}"));
    } else {
        assert_eq!(x.ask("expect 3 81"), "ok");
        let seen = x.ask("check");
        if seen != "ok" {
            problems.push(format!("after the VMM's write, the backend: {seen}"));
        }
        // And the other way: a backend write to another merged page.
        x.tell("rawwrite 5 82");
        match x.reply_within(60) {
            Some(r) if r == "ok" => {
                assert_eq!(a.ask("expect 5 82"), "ok");
                let seen = a.ask("check");
                if seen != "ok" {
                    problems.push(format!("after the backend's write, the VMM: {seen}"));
                }
            }
            other => problems.push(format!("the backend's write did not complete: {other:?}")),
        }
    }
    x.kill();
    a.kill();
    b.exit();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Break-on-write mode, no fault at all: a merge window's range runs from
/// its first candidate to its last, and pages between them that were
/// merged before are in it, though not candidates. When the window ends,
/// `release_all` (`merge.rs`) unprotects every page of the range in the
/// other processes except those this window remapped (`keep`), so those
/// older merged pages, which must stay write-protected in every mapper,
/// lose their protection. A backend's write to one of them is then the
/// kernel's copy on write into the backend alone (here anonymous zeros
/// mapped private): the VMM never sees it.
///
/// Two zero pages of the VM are written with zeros (each breaks, and is a
/// private zero page again); the next pass merges them again in one
/// window whose range holds merged zero pages between them.
fn window_unprotects_merged_pages_inside_it() {
    const PAGES: usize = 2048;
    let (z1, z2) = (PAGES / 2 + 10, PAGES / 2 + 20);
    let socket = socket_path("inside");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::vm_with(&socket, 1, PAGES, 0, true);
    let b = Proc::vm_with(&socket, 2, PAGES, 0, true);
    let mut x = Proc::backend(&socket, &a, 1, PAGES);
    service.merge_now().unwrap();
    let merged = a.remapped();
    assert!(
        merged > 0 && x.remapped() == merged,
        "the backend did not follow"
    );
    for z in [z1, z2] {
        assert_eq!(a.ask(&format!("rawwrite {z} 0")), "ok");
        assert_eq!(x.ask(&format!("expect {z} 0")), "ok");
    }
    assert_eq!(a.remapped(), merged - 2, "the writes did not break");
    // Before the next pass the pages between them are still protected: a
    // backend write there breaks through the service and the VMM sees it.
    assert_eq!(x.ask(&format!("rawwrite {} 84", z1 + 3)), "ok");
    assert_eq!(a.ask(&format!("expect {} 84", z1 + 3)), "ok");
    a.check();
    // Page z1 + 3 now holds bytes of its own and stays private.
    let merged = merged - 1;
    // The broken zero pages merge again (a pass or a few).
    for _ in 0..4 {
        if a.remapped() == merged {
            break;
        }
        service.merge_now().unwrap();
    }
    assert_eq!(a.remapped(), merged, "the zero pages did not merge again");
    x.check();
    // A backend write to a merged zero page between the two.
    let page = z1 + 5;
    x.tell(&format!("rawwrite {page} 85"));
    let wrote = x.reply_within(60);
    assert_eq!(a.ask(&format!("expect {page} 85")), "ok");
    let seen = a.ask("check");
    x.kill();
    a.kill();
    b.exit();
    assert_eq!(
        wrote.as_deref(),
        Some("ok"),
        "the backend's write did not complete"
    );
    assert_eq!(seen, "ok", "the VMM does not see the backend's write");
}

/// Domains are made on first use (`server.rs` `domain_for`) and never
/// dropped: each holds a dedup host, a shared memfd, a read-only
/// descriptor of it and, with background scanning, a scanning thread. A
/// process that attaches and leaves with a new domain number each time
/// (any user the service allows) grows the service by one of each per
/// connection, until it is out of descriptors or threads and refuses every
/// VM. `ServiceStats::domains` says it counts "domains with at least one VM
/// (or shared frames left)"; here none has either.
fn domains_outlive_their_vms() {
    const PAGES: usize = 64;
    const ROUNDS: u64 = 8;
    let socket = socket_path("domains");
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let service = Service::start(
        &socket,
        ServiceOptions {
            background: Some((pagefold::ScanBudget::Pages(64), Duration::from_millis(50))),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let (threads_before, fds_before) = (threads(), fds());
    for d in 0..ROUNDS {
        let mut a = Proc::vm(&socket, 100 + d, PAGES, 1000 + d);
        assert_eq!(a.ask("detach"), "ok");
        a.exit();
    }
    wait_until("the service to let every VM go", || {
        service.stats().unwrap().vms == 0
    });
    let stats = service.stats().unwrap();
    let (threads_after, fds_after) = (threads(), fds());
    assert_eq!(
        (stats.domains, stats.shared_bytes),
        (0, 0),
        "{} domains with no VM and no shared frames are kept; the service grew by {} threads and {} descriptors over {ROUNDS} short connections",
        stats.domains,
        threads_after.saturating_sub(threads_before),
        fds_after.saturating_sub(fds_before),
    );
}

/// A VMM (default mode, not break-on-write) whose connection ends without
/// a goodbye while the service lives (its `ServiceClient` dropped: "merged
/// pages stay mapped here, readable", says its `Drop`). The service
/// `lose`s it: `forget` ends its references and frees the shared frames
/// only it used (`dedup/mod.rs`: "nothing maps its pages any more"). But
/// the process still maps them (private views of the shared memfd), so its
/// guest now reads zeros there.
fn dropped_client_loses_its_own_shared_frames() {
    const PAGES: usize = 1024;
    let socket = socket_path("dropped");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::spawn(
        "vm",
        &[
            ("PF_SOCKET", socket.display().to_string()),
            ("PF_VM", "1".into()),
            ("PF_PAGES", PAGES.to_string()),
            ("PF_DOMAIN", "5".into()),
            ("PF_DUP", "1".into()),
        ],
    );
    a.check();
    service.merge_now().unwrap();
    assert!(a.remapped() > 0, "the VM did not merge its own duplicates");
    assert!(service.stats().unwrap().shared_bytes > 0);
    a.check();
    assert_eq!(a.ask("drop"), "ok");
    wait_until("the service to forget the VM", || {
        service.stats().unwrap().vms == 0
    });
    let seen = a.ask("check");
    a.exit();
    assert_eq!(seen, "ok", "the VM's memory after its connection ended");
}

/// A VMM that leaves (detach, service alive) and answers its `Restore`
/// later than the ack deadline (SIGSTOP here; a large VM copying its
/// merged pages home, a loaded host). `ConnMapper::home` gives up, the
/// VM's `unregister` fails, and `detach` (`server.rs`) then `forget`s it:
/// the shared frames only it used are freed ("pages it could not restore
/// stay merged in the process, which holds the shared memfd"), though the
/// process still maps them. Its late restore then copies what it reads
/// there, zeros, into its own frames: the guest's memory is lost.
fn late_restore_on_detach_loses_memory() {
    const PAGES: usize = 8192;
    let socket = socket_path("late-restore");
    let service = Service::start(
        &socket,
        ServiceOptions {
            ack_deadline: Duration::from_millis(200),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let mut a = Proc::spawn(
        "vm",
        &[
            ("PF_SOCKET", socket.display().to_string()),
            ("PF_VM", "1".into()),
            ("PF_PAGES", PAGES.to_string()),
            ("PF_DOMAIN", "5".into()),
            ("PF_DUP", "1".into()),
        ],
    );
    service.merge_now().unwrap();
    assert!(a.remapped() > 0, "the VM did not merge its own duplicates");
    a.tell("detach");
    // The service takes the VM out of its table first, then asks for the
    // restore: stop the process as soon as it is out.
    while service.stats().unwrap().vms != 0 {
        std::hint::spin_loop();
    }
    a.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(2));
    a.signal(libc::SIGCONT);
    let detached = a.reply_within(60);
    let seen = a.ask("check");
    a.exit();
    assert_eq!(
        (detached.as_deref(), seen.as_str()),
        (Some("ok"), "ok"),
        "the detach's own check, and the memory after it"
    );
}

/// A connection the service refuses (garbage, a bad hello) gets its
/// `Error`, and its thread ends; but `accept_loop` (`server.rs`) keeps a
/// clone of every accepted stream in `State::conns` (to shut them all when
/// the service stops), pruned only at the next accept and only if the peer
/// hung up. So the service never closes the connection: the peer waits
/// forever for the close (`hostile_connections` in `tests/service.rs`
/// hangs at HEAD for this reason), and each refused peer that stays holds
/// a descriptor of the service. The same holds for a VMM whose connection
/// the service ends on a protocol error: it is forgotten, yet sees no
/// close, so it never brings its pages home, and in break-on-write mode
/// its breaks go to a socket nobody reads.
fn refused_connection_is_never_closed() {
    let socket = socket_path("refused");
    let _service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = fds();
    let mut held = Vec::new();
    let mut closed = 0;
    for _ in 0..4 {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(&[8, 0, 0, 0, 0x77, 0x77, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
        let mut conn = pagefold::service::socket::Conn::new(s);
        match conn.recv() {
            Ok(Some((pagefold::service::wire::Message::Error(_), _))) => {}
            other => panic!("garbage got {other:?}"),
        }
        // A liveness bound: the service closes at once or never.
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match conn.recv() {
            Ok(None) => closed += 1,
            Err(pagefold::service::wire::WireError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::WouldBlock
                    || source.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => closed += 1,
            Ok(Some(other)) => panic!("after the error came {other:?}"),
        }
        held.push(conn);
    }
    // Each refused peer still open holds a descriptor in the service (the
    // socket files here count 4, one per peer). A connection thread drops
    // its descriptor just after the peer sees the close: give a loaded
    // machine a bounded while for that.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut grown = fds().saturating_sub(before + held.len());
    while grown != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        grown = fds().saturating_sub(before + held.len());
    }
    assert_eq!(
        (closed, grown),
        (4, 0),
        "refused connections the service closed, and descriptors it keeps for them"
    );
}

fn main() {
    if common::processes::run_child() {
        return;
    }
    let tests: [(&str, fn()); 9] = [
        (
            "refused_connection_is_never_closed",
            refused_connection_is_never_closed,
        ),
        (
            "late_restore_on_detach_loses_memory",
            late_restore_on_detach_loses_memory,
        ),
        (
            "dropped_client_loses_its_own_shared_frames",
            dropped_client_loses_its_own_shared_frames,
        ),
        ("domains_outlive_their_vms", domains_outlive_their_vms),
        (
            "window_unprotects_merged_pages_inside_it",
            window_unprotects_merged_pages_inside_it,
        ),
        (
            "backend_late_once_during_a_break",
            backend_late_once_during_a_break,
        ),
        (
            "backend_left_behind_when_the_vmm_connection_ends",
            backend_left_behind_when_the_vmm_connection_ends,
        ),
        (
            "stopped_client_blocks_merging_for_good",
            stopped_client_blocks_merging_for_good,
        ),
        (
            "backend_joining_mid_window_misses_it",
            backend_joining_mid_window_misses_it,
        ),
    ];
    common::processes::run_tests(&tests);
}
