//! The host service across real processes: VMM processes (this test binary
//! run again as a child, `PAGEFOLD_CHILD=vm`) put their guest memory under
//! a service, which folds it; each child checks its memory byte for byte
//! against its own model on request. Faults are real: SIGKILL and SIGSTOP
//! of clients and of the service, and hostile bytes on the socket.
//!
//! `harness = false`: `main` runs the child roles or the tests, one after
//! another (each spawns processes and must not share the machine's two
//! cores with another).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use common::processes::{socket_path, wait_until, Proc};

use std::{
    io::Write,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::{fs::MetadataExt, net::UnixStream},
    },
    sync::Arc,
    time::Duration,
};

use pagefold::{
    service::{
        socket::Conn,
        wire::{self, Hello, Message, RegionDesc},
        Service, ServiceOptions,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};

// ---------------------------------------------------------------- tests

/// Two VMM processes fold; the kernel frees the merged pages' own frames;
/// writes through the library and through the raw mapping land where each
/// process sees them and nowhere else; a detach gives every page back.
fn two_processes_fold() {
    const PAGES: usize = 4096;
    let socket = socket_path("fold");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::vm(&socket, 1, PAGES, 0);
    let mut b = Proc::vm(&socket, 2, PAGES, 0);
    let before = service.stats().unwrap();
    assert_eq!(before.vms, 2);
    let report = service.merge_now().unwrap();
    assert!(report.merged_shared >= (PAGES / 2) as u64, "{report:?}");
    assert!(report.merged_zero >= (PAGES / 4) as u64, "{report:?}");
    let after = service.stats().unwrap();
    assert!(
        after.guest_bytes + (PAGES as u64 * PAGE_SIZE as u64) / 2 < before.guest_bytes,
        "the processes' memfds were not punched: {before:?} -> {after:?}"
    );
    assert!(after.shared_bytes <= (PAGES * PAGE_SIZE) as u64 / 2 + (1 << 20));
    assert!(a.remapped() >= (PAGES * 3 / 4) as u64);
    a.check();
    b.check();
    // Writes to merged pages: a vCPU's (raw) and the library's.
    for (page, byte) in [(0, 0x11), (7, 0x22), (PAGES / 2 + 3, 0x33)] {
        assert_eq!(a.ask(&format!("rawwrite {page} {byte}")), "ok");
        assert_eq!(a.ask(&format!("write {} {}", page + 1, byte + 1)), "ok");
    }
    a.check();
    b.check();
    // A second pass folds again without harm, and the written pages stay.
    service.merge_now().unwrap();
    a.check();
    b.check();
    assert_eq!(a.ask("detach"), "ok");
    assert_eq!(a.remapped(), 0);
    wait_until("the service to let A go", || {
        service.stats().unwrap().vms == 1
    });
    b.check();
    a.exit();
    b.exit();
}

/// A process killed with SIGKILL while the service merges: the others'
/// memory is intact, the dead VM is forgotten and its memfd let go, and
/// the service folds on.
fn client_killed_mid_merge() {
    const PAGES: usize = 16384;
    let socket = socket_path("kill");
    let service = Arc::new(Service::start(&socket, ServiceOptions::default()).unwrap());
    let mut a = Proc::vm(&socket, 1, PAGES, 0);
    let mut b = Proc::vm(&socket, 2, PAGES, 0);
    let c = Proc::vm(&socket, 3, PAGES, 0);
    let dead_inode: u64 = c.ready[1].parse().unwrap();
    let merging = {
        let service = Arc::clone(&service);
        std::thread::spawn(move || service.merge_now())
    };
    std::thread::sleep(Duration::from_millis(30));
    c.kill();
    // Whatever the merge made of the dead VM's windows, it ends.
    let _ = merging.join().unwrap();
    wait_until("the service to forget the dead VM", || {
        service.stats().unwrap().vms == 2
    });
    a.check();
    b.check();
    let report = service.merge_now().unwrap();
    let _ = report;
    a.check();
    b.check();
    assert!(a.remapped() > 0 && b.remapped() > 0);
    // The service holds no descriptor or mapping of the dead VM's memfd.
    let held = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .any(|m| m.ino() == dead_inode);
    assert!(!held, "the service still holds the dead VM's memfd");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        !maps.lines().any(|l| l.contains("vm-3")),
        "the service still maps the dead VM's memory"
    );
    a.exit();
    b.exit();
}

/// A process that stops answering (SIGSTOP) while the service merges: its
/// windows are rolled back after the deadline, the others merge, and once
/// it runs again its memory is intact and it merges on the next pass.
fn stuck_client_is_rolled_back() {
    const PAGES: usize = 2048;
    let socket = socket_path("stuck");
    let service = Service::start(
        &socket,
        ServiceOptions {
            ack_deadline: Duration::from_millis(100),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let mut a = Proc::vm(&socket, 1, PAGES, 0);
    let mut b = Proc::vm(&socket, 2, PAGES, 0);
    b.signal(libc::SIGSTOP);
    let report = service.merge_now().unwrap();
    assert!(report.busy > 0, "no window was rolled back: {report:?}");
    assert!(a.remapped() > 0, "the answering process did not merge");
    b.signal(libc::SIGCONT);
    b.check();
    a.check();
    let b_before = b.remapped();
    assert_eq!(b_before, 0, "a rolled-back window left pages remapped");
    service.merge_now().unwrap();
    assert!(
        b.remapped() > 0,
        "the process did not merge once it answered"
    );
    a.check();
    b.check();
    a.exit();
    b.exit();
}

/// The service killed with SIGKILL while it merges in the background:
/// every process's memory stays intact and writable; a restarted service
/// takes the processes again and folds them.
fn service_killed_mid_merge() {
    const PAGES: usize = 8192;
    let socket = socket_path("svc");
    let env = [("PF_SOCKET", socket.display().to_string())];
    let svc = Proc::spawn("service", &env);
    let mut a = Proc::vm(&socket, 1, PAGES, 0);
    let mut b = Proc::vm(&socket, 2, PAGES, 0);
    wait_until("the background scan to merge", || {
        a.remapped() > (PAGES / 8) as u64
    });
    svc.kill();
    wait_until("A to see the service gone", || {
        a.ask("connected") == "false"
    });
    wait_until("B to see the service gone", || {
        b.ask("connected") == "false"
    });
    a.check();
    b.check();
    assert_eq!(a.ask("writeall 90"), "ok");
    a.check();
    b.check();
    let svc = Proc::spawn("service", &env);
    assert_eq!(a.ask("reattach"), "ok");
    assert_eq!(b.ask("reattach"), "ok");
    a.check();
    b.check();
    wait_until("the new service to merge B", || {
        b.remapped() > (PAGES / 8) as u64
    });
    a.check();
    b.check();
    svc.kill();
    a.exit();
    b.exit();
}

/// A process gets its own memory and a read-only view of its own domain's
/// shared frames, and nothing else: it cannot write, grow or punch the
/// shared memfd, holds no descriptor of another VM or domain, and cannot
/// take the service's descriptors through /proc.
fn isolation() {
    const PAGES: usize = 1024;
    let socket = socket_path("iso");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::vm(&socket, 1, PAGES, 1);
    let mut b = Proc::vm(&socket, 2, PAGES, 2);
    let mut c = Proc::vm(&socket, 3, PAGES, 1);
    service.merge_now().unwrap();
    assert!(a.remapped() > 0 && b.remapped() > 0);
    assert_eq!(a.ready[2], c.ready[2], "A and C share a domain");
    assert_ne!(
        a.ready[2], b.ready[2],
        "B's domain has its own shared memfd"
    );
    assert_eq!(a.ask("sharedfd"), "ok");
    let fds = a.ask("fds");
    let held: Vec<&str> = fds.split_whitespace().collect();
    for (what, ino) in [
        ("B's memfd", &b.ready[1]),
        ("C's memfd", &c.ready[1]),
        ("B's domain's shared memfd", &b.ready[2]),
    ] {
        assert!(!held.contains(&ino.as_str()), "A holds {what}");
    }
    // A process of another user than the service's (as a VMM runs), or of
    // the same one (the service is not dumpable), cannot take the
    // service's descriptors.
    assert_eq!(a.ask("dropuid"), "ok");
    let probe = a.ask(&format!("probe {}", std::process::id()));
    let (opened, seen): (u32, u32) = {
        let mut w = probe
            .split_whitespace()
            .map(|s| s.parse().unwrap_or(u32::MAX));
        (w.next().unwrap_or(u32::MAX), w.next().unwrap_or(0))
    };
    assert_eq!(
        opened, 0,
        "A opened {opened} of the service's {seen} descriptors"
    );
    a.check();
    b.check();
    c.check();
    a.exit();
    b.exit();
    c.exit();
}

/// A vhost-user backend maps a VM's memory besides its VMM: every merge is
/// followed in both (a backend attached before the merge, and one attached
/// after, which is told every merged run), and a write from either (a
/// vCPU's in the VMM, the backend filling a buffer) is seen by both and by
/// nobody else, whether it hits a merged page or not.
fn second_mappers_follow_and_share_writes() {
    const PAGES: usize = 2048;
    let socket = socket_path("second");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::vm_with(&socket, 1, PAGES, 0, true);
    let mut b = Proc::vm_with(&socket, 2, PAGES, 0, true);
    let mut x = Proc::backend(&socket, &a, 1, PAGES);
    x.check();
    service.merge_now().unwrap();
    let merged = a.remapped();
    assert!(
        merged > 0 && x.remapped() == merged,
        "the backend did not follow the merge"
    );
    let mut y = Proc::backend(&socket, &a, 1, PAGES);
    assert_eq!(
        y.remapped(),
        merged,
        "the late backend was not told the merged runs"
    );
    for p in [&mut a, &mut x, &mut y] {
        p.check();
    }
    // Writes to merged pages (the first half is shared with B) and to
    // private ones, from each process.
    let writes: [(usize, u8, usize); 6] = [
        (3, 0x41, 0),
        (5, 0x42, 1),
        (9, 0x43, 2),
        (PAGES - 2, 0x44, 1),
        (3, 0x45, 2),
        (PAGES / 2 + 10, 0x46, 0),
    ];
    for (page, byte, who) in writes {
        let mut procs = [&mut a, &mut x, &mut y];
        for (k, p) in procs.iter_mut().enumerate() {
            let cmd = if k == who { "rawwrite" } else { "expect" };
            assert_eq!(p.ask(&format!("{cmd} {page} {byte}")), "ok");
        }
        for p in procs.iter_mut() {
            p.check();
        }
    }
    b.check();
    // Another pass with the backends attached, then one leaves.
    service.merge_now().unwrap();
    for p in [&mut a, &mut x, &mut y, &mut b] {
        p.check();
    }
    x.exit();
    service.merge_now().unwrap();
    assert_eq!(a.ask("rawwrite 1 77"), "ok");
    assert_eq!(y.ask("expect 1 77"), "ok");
    a.check();
    y.check();
    b.check();
    y.exit();
    a.exit();
    b.exit();
}

/// The service killed while a VMM and its backend share merged pages
/// (break-on-write): both bring every merged page home into the memfd by
/// themselves, and afterwards a write from either is seen by the other.
fn service_killed_with_a_backend() {
    const PAGES: usize = 4096;
    let socket = socket_path("svc2");
    let env = [("PF_SOCKET", socket.display().to_string())];
    let svc = Proc::spawn("service", &env);
    let mut a = Proc::vm_with(&socket, 1, PAGES, 0, true);
    let mut b = Proc::vm_with(&socket, 2, PAGES, 0, true);
    let mut x = Proc::backend(&socket, &a, 1, PAGES);
    wait_until("the background scan to merge", || {
        a.remapped() > (PAGES / 8) as u64 && x.remapped() > (PAGES / 8) as u64
    });
    svc.kill();
    wait_until("A to see the service gone", || {
        a.ask("connected") == "false"
    });
    wait_until("A to bring its pages home", || a.remapped() == 0);
    wait_until("the backend to bring its pages home", || x.remapped() == 0);
    a.check();
    x.check();
    b.check();
    for (page, byte, from_vmm) in [(2, 0x51, true), (4, 0x52, false), (PAGES - 1, 0x53, false)] {
        let (w, r) = if from_vmm {
            (&mut a, &mut x)
        } else {
            (&mut x, &mut a)
        };
        assert_eq!(w.ask(&format!("rawwrite {page} {byte}")), "ok");
        assert_eq!(r.ask(&format!("expect {page} {byte}")), "ok");
        a.check();
        x.check();
    }
    x.exit();
    a.exit();
    b.exit();
}

/// A VM whose only region is excluded (`ClientOptions::exclude_regions`,
/// as `VmOptions::exclude` in one process) keeps every page in its own
/// frame, while the VMs beside it with the same bytes fold.
fn excluded_regions_stay_unmerged() {
    const PAGES: usize = 1024;
    let socket = socket_path("exclude");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::spawn(
        "vm",
        &[
            ("PF_SOCKET", socket.display().to_string()),
            ("PF_VM", "1".into()),
            ("PF_PAGES", PAGES.to_string()),
            ("PF_EXCLUDE", "1".into()),
        ],
    );
    let mut b = Proc::vm(&socket, 2, PAGES, 0);
    let mut c = Proc::vm(&socket, 3, PAGES, 0);
    let report = service.merge_now().unwrap();
    assert!(report.merged_shared > 0, "{report:?}");
    assert_eq!(a.remapped(), 0, "a page of an excluded region was merged");
    assert!(b.remapped() > 0 && c.remapped() > 0);
    a.check();
    b.check();
    c.check();
    a.exit();
    b.exit();
    c.exit();
}

/// Hostile bytes and hostile hellos: a typed error back, that connection
/// closed, everything else served.
fn hostile_connections() {
    const PAGES: usize = 1024;
    let socket = socket_path("hostile");
    let service = Service::start(&socket, ServiceOptions::default()).unwrap();
    let mut a = Proc::vm(&socket, 1, PAGES, 0);
    let mut b = Proc::vm(&socket, 2, PAGES, 0);

    // Garbage: a frame of an unknown kind, then more.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(&[8, 0, 0, 0, 0x77, 0x77, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
        .unwrap();
    let mut conn = Conn::new(s);
    match conn.recv() {
        Ok(Some((Message::Error(e), _))) => assert!(e.text.contains("kind"), "{e:?}"),
        other => panic!("garbage got {other:?}"),
    }
    assert!(
        matches!(conn.recv(), Ok(None) | Err(_)),
        "the connection stayed open"
    );

    // A hello whose memfd can shrink under the service.
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), (PAGES * PAGE_SIZE) as u64)]).unwrap();
    let hello = |offset| {
        Message::Hello(Hello {
            second_mapper: false,
            break_on_write: false,
            exclude_regions: 0,
            domain: 0,
            vm_tag: 9,
            regions: vec![RegionDesc {
                gpa: GuestPhysAddr(0),
                size: (PAGES * PAGE_SIZE) as u64,
                host_addr: mem.regions()[0].host_addr(),
                file_offset: offset,
            }],
        })
    };
    let uffd = pagefold::userfault::Userfault::new().unwrap();
    let ctl = memfd(true);
    let refusal = |msg: &Message, fds: &[std::os::fd::BorrowedFd<'_>]| {
        let mut conn = Conn::new(UnixStream::connect(&socket).unwrap());
        conn.send(msg, fds).unwrap();
        match conn.recv() {
            Ok(Some((Message::Error(e), _))) => e.text,
            other => panic!("a hostile hello got {other:?}"),
        }
    };
    // SAFETY: the descriptor is live for the call.
    let uffd_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(uffd.as_raw_fd()) };
    let text = refusal(
        &hello(0),
        &[mem.frame_store().as_fd(), uffd_fd, ctl.as_fd()],
    );
    assert!(text.contains("F_SEAL_SHRINK"), "{text}");
    // A pipe where the memfd belongs.
    let (r, _w) = pipe();
    let text = refusal(&hello(0), &[r.as_fd(), uffd_fd, ctl.as_fd()]);
    assert!(text.contains("memfd"), "{text}");
    // Frames claimed at another offset than the memory has them.
    mem.frame_store().forbid_shrinking().unwrap();
    let text = refusal(
        &hello(0x1000),
        &[mem.frame_store().as_fd(), uffd_fd, ctl.as_fd()],
    );
    assert!(text.contains("offset"), "{text}");
    // An unsealed control page.
    let text = refusal(
        &hello(0),
        &[mem.frame_store().as_fd(), uffd_fd, memfd(false).as_fd()],
    );
    assert!(text.contains("control"), "{text}");

    // Nothing else was affected.
    assert_eq!(service.stats().unwrap().vms, 2);
    service.merge_now().unwrap();
    assert!(a.remapped() > 0);
    a.check();
    b.check();
    let _ = wire::PROTOCOL_VERSION;
    a.exit();
    b.exit();
}

fn memfd(sealed: bool) -> OwnedFd {
    // SAFETY: a valid name and flags.
    let raw =
        unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0);
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain syscalls on our descriptor.
    unsafe {
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), 4096), 0);
        if sealed {
            assert_eq!(
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
                ),
                0
            );
        }
    }
    fd
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn main() {
    if common::processes::run_child() {
        return;
    }
    let tests: [(&str, fn()); 9] = [
        ("two_processes_fold", two_processes_fold),
        ("client_killed_mid_merge", client_killed_mid_merge),
        ("stuck_client_is_rolled_back", stuck_client_is_rolled_back),
        ("service_killed_mid_merge", service_killed_mid_merge),
        ("isolation", isolation),
        (
            "second_mappers_follow_and_share_writes",
            second_mappers_follow_and_share_writes,
        ),
        (
            "service_killed_with_a_backend",
            service_killed_with_a_backend,
        ),
        (
            "excluded_regions_stay_unmerged",
            excluded_regions_stay_unmerged,
        ),
        ("hostile_connections", hostile_connections),
    ];
    common::processes::run_tests(&tests);
}
