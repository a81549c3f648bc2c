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

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::{fs::MetadataExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use pagefold::{
    service::{
        socket::Conn,
        wire::{self, Hello, Message, RegionDesc},
        ClientOptions, MappedRegion, Service, ServiceClient, ServiceOptions,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};

// ---------------------------------------------------------------- model

/// Page `i` of VM `vm`: the first half the same in every VM (a booted
/// kernel), a quarter zero, the rest the VM's own.
fn content(vm: u64, i: usize, pages: usize) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    if i < pages / 2 {
        for (k, c) in p.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&((i * 7919 + k) as u64 | 1).to_le_bytes());
        }
    } else if i >= pages * 3 / 4 {
        for (k, c) in p.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&((vm << 40) | (i * 512 + k) as u64 | 1).to_le_bytes());
        }
    }
    p
}

/// A child's memory and what it should hold.
struct Model {
    vm: u64,
    pages: usize,
    /// Pages written since, with the byte their first 64 bytes hold.
    written: HashMap<usize, u8>,
}

impl Model {
    fn page(&self, i: usize) -> [u8; PAGE_SIZE] {
        let mut p = content(self.vm, i, self.pages);
        if let Some(b) = self.written.get(&i) {
            p[..64].fill(*b);
        }
        p
    }

    fn check(&self, mem: &GuestMemory) -> Result<(), String> {
        let mut buf = [0u8; PAGE_SIZE];
        for i in 0..self.pages {
            mem.read(GuestPhysAddr((i * PAGE_SIZE) as u64), &mut buf)
                .map_err(|e| format!("read page {i}: {e}"))?;
            if buf != self.page(i) {
                return Err(format!("page {i} differs from the model"));
            }
            // And as a vCPU sees it, through the raw mapping.
            let raw = mem.regions()[0].host_addr().0 as usize + i * PAGE_SIZE;
            // SAFETY: the page lies inside the region's live mapping.
            let first = unsafe { std::ptr::read_volatile(raw as *const u64) };
            if first.to_le_bytes() != buf[..8] {
                return Err(format!("page {i}: the raw mapping differs from a read"));
            }
        }
        Ok(())
    }
}

fn build(vm: u64, pages: usize) -> Arc<GuestMemory> {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), (pages * PAGE_SIZE) as u64)]).unwrap();
    // Every page written, zero ones too: a guest's touched zero pages hold
    // memory until they are folded.
    for i in 0..pages {
        mem.write(
            GuestPhysAddr((i * PAGE_SIZE) as u64),
            &content(vm, i, pages),
        )
        .unwrap();
    }
    Arc::new(mem)
}

fn inode(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|m| m.ino())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- children

/// The VMM process: attaches, says `ready VM_ID MEMFD_INODE SHARED_INODE`,
/// then answers one command per line on stdin.
fn vm_child() {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let socket = PathBuf::from(env("PF_SOCKET"));
    let vm: u64 = env("PF_VM").parse().unwrap_or(0);
    let pages: usize = env("PF_PAGES").parse().unwrap_or(1024);
    let domain: u64 = env("PF_DOMAIN").parse().unwrap_or(0);
    let break_on_write = env("PF_BREAK") == "1";
    let options = ClientOptions {
        domain,
        vm_tag: vm,
        break_on_write,
    };
    let mem = build(vm, pages);
    let mut model = Model {
        vm,
        pages,
        written: HashMap::new(),
    };
    let memfd_inode = inode(mem.frame_store().as_fd());
    let mut client = Some(
        ServiceClient::attach(&socket, Arc::clone(&mem), options).unwrap_or_else(|e| {
            println!("error {e}");
            std::process::exit(3)
        }),
    );
    let shared_inode = client.as_ref().map_or(0, |c| inode(c.shared_frames_fd()));
    println!(
        "ready {} {memfd_inode} {shared_inode} {}",
        client.as_ref().map_or(0, |c| c.vm_id()),
        mem.frame_store().as_raw_fd()
    );
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        let reply = match w.as_slice() {
            ["check"] => model
                .check(&mem)
                .map(|()| "ok".to_string())
                .unwrap_or_else(|e| format!("bad {e}")),
            ["remapped"] => format!("{}", client.as_ref().map_or(0, |c| c.pages_remapped())),
            ["connected"] => format!("{}", client.as_ref().is_some_and(|c| c.connected())),
            ["expect", page, byte] => {
                model
                    .written
                    .insert(page.parse().unwrap_or(0), byte.parse().unwrap_or(0));
                "ok".to_string()
            }
            ["write", page, byte] | ["rawwrite", page, byte] => {
                let (page, byte): (usize, u8) =
                    (page.parse().unwrap_or(0), byte.parse().unwrap_or(0));
                if w[0] == "write" {
                    mem.write(GuestPhysAddr((page * PAGE_SIZE) as u64), &[byte; 64])
                        .unwrap();
                } else {
                    let at = mem.regions()[0].host_addr().0 as usize + page * PAGE_SIZE;
                    for k in 0..8 {
                        // SAFETY: inside the region's live, writable mapping (as a vCPU writes).
                        unsafe {
                            std::ptr::write_volatile(
                                (at + 8 * k) as *mut u64,
                                u64::from_le_bytes([byte; 8]),
                            )
                        };
                    }
                }
                model.written.insert(page, byte);
                "ok".to_string()
            }
            ["writeall", byte] => {
                let byte: u8 = byte.parse().unwrap_or(0);
                for page in 0..pages {
                    let at = mem.regions()[0].host_addr().0 as usize + page * PAGE_SIZE;
                    for k in 0..8 {
                        // SAFETY: as above.
                        unsafe {
                            std::ptr::write_volatile(
                                (at + 8 * k) as *mut u64,
                                u64::from_le_bytes([byte; 8]),
                            )
                        };
                    }
                    model.written.insert(page, byte);
                }
                "ok".to_string()
            }
            ["detach"] => match client.take().map(ServiceClient::detach) {
                Some(Ok(_)) => model
                    .check(&mem)
                    .map(|()| "ok".to_string())
                    .unwrap_or_else(|e| format!("bad {e}")),
                Some(Err(e)) => format!("bad detach: {e}"),
                None => "bad not attached".into(),
            },
            ["reattach"] => match client.take().map(|c| c.reattach(&socket, options)) {
                Some(Ok(c)) => {
                    client = Some(c);
                    "ok".into()
                }
                Some(Err(e)) => format!("bad reattach: {e}"),
                None => "bad not attached".into(),
            },
            ["sharedfd"] => client.as_ref().map_or("bad".into(), probe_shared_fd),
            ["fds"] => list_fd_inodes(),
            ["probe", pid] => probe_other_process(pid),
            ["dropuid"] => drop_privileges(),
            ["exit"] => break,
            _ => format!("bad command {line}"),
        };
        println!("{reply}");
    }
}

/// A second mapper (a vhost-user backend): maps the VMM's memfd (taken
/// through /proc, as the vhost-user socket would hand it over), attaches,
/// and answers `check`, `expect`, `rawwrite`, `remapped`.
fn backend_child() {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let socket = PathBuf::from(env("PF_SOCKET"));
    let vm: u64 = env("PF_VM").parse().unwrap_or(0);
    let pages: usize = env("PF_PAGES").parse().unwrap_or(1024);
    let path = format!("/proc/{}/fd/{}", env("PF_TARGET_PID"), env("PF_TARGET_FD"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = pages * PAGE_SIZE;
    // SAFETY: a fresh shared mapping of the memfd, which is at least `len` long.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let region = MappedRegion {
        gpa: GuestPhysAddr(0),
        size: len as u64,
        host_addr: pagefold::HostVirtAddr(base as u64),
        file_offset: 0,
    };
    // SAFETY: the region is this process's MAP_SHARED mapping of the memfd,
    // left alone while the client lives.
    let client = unsafe { ServiceClient::attach_second_mapper(&socket, file.as_fd(), &[region]) }
        .unwrap_or_else(|e| {
            println!("error {e}");
            std::process::exit(3)
        });
    let mut model = Model {
        vm,
        pages,
        written: HashMap::new(),
    };
    println!("ready {}", client.vm_id());
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        let reply = match w.as_slice() {
            ["check"] => {
                let mut bad = None;
                for i in 0..pages {
                    let mut buf = [0u8; PAGE_SIZE];
                    for (k, c) in buf.chunks_exact_mut(8).enumerate() {
                        // SAFETY: inside the live mapping.
                        let v = unsafe {
                            std::ptr::read_volatile(
                                (base as usize + i * PAGE_SIZE + 8 * k) as *const u64,
                            )
                        };
                        c.copy_from_slice(&v.to_le_bytes());
                    }
                    if buf != model.page(i) {
                        bad = Some(i);
                        break;
                    }
                }
                bad.map_or("ok".into(), |i| {
                    format!("bad page {i} differs in the backend")
                })
            }
            ["expect", page, byte] => {
                model
                    .written
                    .insert(page.parse().unwrap_or(0), byte.parse().unwrap_or(0));
                "ok".into()
            }
            ["rawwrite", page, byte] => {
                let (page, byte): (usize, u8) =
                    (page.parse().unwrap_or(0), byte.parse().unwrap_or(0));
                for k in 0..8 {
                    // SAFETY: inside the live, writable mapping (a backend filling a buffer).
                    unsafe {
                        std::ptr::write_volatile(
                            (base as usize + page * PAGE_SIZE + 8 * k) as *mut u64,
                            u64::from_le_bytes([byte; 8]),
                        )
                    };
                }
                model.written.insert(page, byte);
                "ok".into()
            }
            ["remapped"] => format!("{}", client.pages_remapped()),
            ["exit"] => break,
            _ => format!("bad command {line}"),
        };
        println!("{reply}");
    }
    drop(client);
}

/// Tries to write, grow, punch and map writable the domain's shared memfd
/// through the descriptor the service gave: every try must be refused.
fn probe_shared_fd(c: &ServiceClient) -> String {
    let fd = c.shared_frames_fd().as_raw_fd();
    let byte = [1u8];
    let mut refused = Vec::new();
    // SAFETY: plain syscalls on a descriptor we hold, with a valid buffer.
    unsafe {
        refused.push(libc::pwrite(fd, byte.as_ptr().cast(), 1, 0) < 0);
        refused.push(libc::ftruncate(fd, 1 << 30) != 0);
        refused.push(
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                4096,
            ) != 0,
        );
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        refused.push(p == libc::MAP_FAILED);
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            fd,
            0,
        );
        refused.push(p != libc::MAP_FAILED); // reading its own domain's frames is allowed
    }
    if refused.iter().all(|r| *r) {
        "ok".into()
    } else {
        format!("bad {refused:?}")
    }
}

fn list_fd_inodes() -> String {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for e in dir.flatten() {
            if let Ok(m) = std::fs::metadata(e.path()) {
                out.push(m.ino().to_string());
            }
        }
    }
    out.join(" ")
}

/// Becomes `nobody`, as a VMM process runs: only the descriptors it holds
/// stay its way into anything.
fn drop_privileges() -> String {
    // SAFETY: plain syscalls with integer arguments; an empty group list.
    let ok = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(65534, 65534, 65534) == 0
            && libc::setresuid(65534, 65534, 65534) == 0
    };
    if ok {
        "ok".into()
    } else {
        format!("bad {}", std::io::Error::last_os_error())
    }
}

/// Opens every descriptor of process `pid` it can through `/proc`; says
/// how many it got.
fn probe_other_process(pid: &str) -> String {
    let mut opened = 0;
    let mut seen = 0;
    for n in 0..256 {
        let path = format!("/proc/{pid}/fd/{n}");
        if std::fs::symlink_metadata(&path).is_ok() {
            seen += 1;
        }
        if std::fs::File::open(&path).is_ok() {
            opened += 1;
        }
    }
    format!("{opened} {seen}")
}

/// The service as a process of its own, merging in the background.
fn service_child() {
    let socket = PathBuf::from(std::env::var("PF_SOCKET").unwrap_or_default());
    let options = ServiceOptions {
        background: Some((pagefold::ScanBudget::Pages(2048), Duration::from_millis(5))),
        ..ServiceOptions::default()
    };
    let _service = Service::start(&socket, options).unwrap_or_else(|e| {
        println!("error {e}");
        std::process::exit(3)
    });
    println!("ready");
    // Until killed (or stdin closes).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

// ---------------------------------------------------------------- parent side

struct Proc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    ready: Vec<String>,
}

impl Proc {
    fn spawn(role: &str, env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env("PAGEFOLD_CHILD", role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("ready"),
            "{role} child did not start: {line}"
        );
        let ready = line.split_whitespace().skip(1).map(str::to_owned).collect();
        Proc {
            child,
            stdin,
            stdout,
            ready,
        }
    }

    fn vm(socket: &Path, vm: u64, pages: usize, domain: u64) -> Proc {
        Proc::vm_with(socket, vm, pages, domain, false)
    }

    fn vm_with(socket: &Path, vm: u64, pages: usize, domain: u64, break_on_write: bool) -> Proc {
        Proc::spawn(
            "vm",
            &[
                ("PF_SOCKET", socket.display().to_string()),
                ("PF_VM", vm.to_string()),
                ("PF_PAGES", pages.to_string()),
                ("PF_DOMAIN", domain.to_string()),
                (
                    "PF_BREAK",
                    if break_on_write { "1" } else { "0" }.to_string(),
                ),
            ],
        )
    }

    /// A second mapper of `target`'s memory.
    fn backend(socket: &Path, target: &Proc, vm: u64, pages: usize) -> Proc {
        Proc::spawn(
            "backend",
            &[
                ("PF_SOCKET", socket.display().to_string()),
                ("PF_VM", vm.to_string()),
                ("PF_PAGES", pages.to_string()),
                ("PF_TARGET_PID", target.child.id().to_string()),
                ("PF_TARGET_FD", target.ready[3].clone()),
            ],
        )
    }

    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    fn check(&mut self) {
        assert_eq!(self.ask("check"), "ok", "child {} memory", self.child.id());
    }

    fn remapped(&mut self) -> u64 {
        self.ask("remapped").parse().unwrap()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    fn exit(mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.wait();
    }
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pagefold-test-{name}-{}.sock", std::process::id()))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
    match std::env::var("PAGEFOLD_CHILD").as_deref() {
        Ok("vm") => return vm_child(),
        Ok("service") => return service_child(),
        Ok("backend") => return backend_child(),
        _ => {}
    }
    if pagefold::userfault::Userfault::new().is_err() {
        println!("SKIP: no userfaultfd write protection here");
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tests: [(&str, fn()); 8] = [
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
        ("hostile_connections", hostile_connections),
    ];
    let mut ran = 0;
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        println!("test {name} ...");
        test();
        println!("test {name} ... ok");
        ran += 1;
    }
    println!("test result: ok. {ran} passed");
}
