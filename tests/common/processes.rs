//! Real processes for the host service's tests (`tests/service.rs`,
//! `tests/service_review.rs`): the test binary runs again as a VMM process
//! (`PAGEFOLD_CHILD=vm`), a vhost-user-like backend (`backend`) or the
//! service (`service`), each answering one command per line on stdin; the
//! parent's side (`Proc`) spawns them and asks. Each child checks its guest
//! memory byte for byte against a model it keeps.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use pagefold::{
    service::{ClientOptions, MappedRegion, Service, ServiceClient, ServiceOptions},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};

/// The test runner of the `harness = false` service tests: each test whose
/// name contains one of the command line's words (all without), every one
/// run even after another failed; exits 101 if any did. Skips, saying so,
/// where userfaultfd write protection is unavailable.
pub(crate) fn run_tests(tests: &[(&str, fn())]) {
    if pagefold::userfault::Userfault::new().is_err() {
        println!("SKIP: no userfaultfd write protection here");
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, Vec::new());
    for &(name, test) in tests {
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

/// Runs this process as the child `PAGEFOLD_CHILD` names, if it names one;
/// whether it did (the caller then returns).
pub(crate) fn run_child() -> bool {
    match std::env::var("PAGEFOLD_CHILD").as_deref() {
        Ok("vm") => vm_child(),
        Ok("backend") => backend_child(),
        Ok("service") => service_child(),
        _ => return false,
    }
    true
}

// ---------------------------------------------------------------- model

/// Page `i` of VM `vm`: the first half the same in every VM (a booted
/// kernel), a quarter zero, the rest the VM's own.
pub(crate) fn content(vm: u64, i: usize, pages: usize) -> [u8; PAGE_SIZE] {
    // `PF_DUP=1`: every page a copy of one of eight of the VM's own
    // pages, which no other VM has (frames only this VM uses).
    static DUP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *DUP.get_or_init(|| std::env::var("PF_DUP").as_deref() == Ok("1")) {
        return base_content(vm, pages * 3 / 4 + i % 8, pages);
    }
    base_content(vm, i, pages)
}

pub(crate) fn base_content(vm: u64, i: usize, pages: usize) -> [u8; PAGE_SIZE] {
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
pub(crate) struct Model {
    vm: u64,
    pages: usize,
    /// Pages written since, with the byte their first 64 bytes hold.
    written: HashMap<usize, u8>,
}

impl Model {
    pub(crate) fn page(&self, i: usize) -> [u8; PAGE_SIZE] {
        let mut p = content(self.vm, i, self.pages);
        if let Some(b) = self.written.get(&i) {
            p[..64].fill(*b);
        }
        p
    }

    pub(crate) fn check(&self, mem: &GuestMemory) -> Result<(), String> {
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

pub(crate) fn build(vm: u64, pages: usize) -> Arc<GuestMemory> {
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

pub(crate) fn inode(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|m| m.ino())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- children

/// The VMM process: attaches, says `ready VM_ID MEMFD_INODE SHARED_INODE`,
/// then answers one command per line on stdin.
pub(crate) fn vm_child() {
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
        // `PF_EXCLUDE`: regions the service must leave alone (a mask).
        exclude_regions: env("PF_EXCLUDE").parse().unwrap_or(0),
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
            ["drop"] => {
                // The client dropped without a goodbye (its thread ended,
                // or the VMM closes the socket): the VM runs on.
                drop(client.take());
                "ok".into()
            }
            ["exit"] => break,
            _ => format!("bad command {line}"),
        };
        println!("{reply}");
    }
}

/// A second mapper (a vhost-user backend): maps the VMM's memfd (taken
/// through /proc, as the vhost-user socket would hand it over), attaches,
/// and answers `check`, `expect`, `rawwrite`, `remapped`.
pub(crate) fn backend_child() {
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
    let mut client = Some(
        unsafe { ServiceClient::attach_second_mapper(&socket, file.as_fd(), &[region]) }
            .unwrap_or_else(|e| {
                println!("error {e}");
                std::process::exit(3)
            }),
    );
    let mut model = Model {
        vm,
        pages,
        written: HashMap::new(),
    };
    println!("ready {}", client.as_ref().map_or(0, |c| c.vm_id()));
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
            ["remapped"] => format!("{}", client.as_ref().map_or(0, |c| c.pages_remapped())),
            ["connected"] => format!("{}", client.as_ref().is_some_and(|c| c.connected())),
            // Attaches again (after its VMM reattached: the service hung up).
            ["reattach"] => {
                // The old client goes first: its userfaultfd holds the
                // registration of the mapping.
                drop(client.take());
                // SAFETY: as for the first attach.
                match unsafe {
                    ServiceClient::attach_second_mapper(&socket, file.as_fd(), &[region])
                } {
                    Ok(c) => {
                        client = Some(c);
                        "ok".to_string()
                    }
                    Err(e) => format!("bad reattach: {e}"),
                }
            }
            ["exit"] => break,
            _ => format!("bad command {line}"),
        };
        println!("{reply}");
    }
    drop(client);
}

/// Tries to write, grow, punch and map writable the domain's shared memfd
/// through the descriptor the service gave: every try must be refused.
pub(crate) fn probe_shared_fd(c: &ServiceClient) -> String {
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

pub(crate) fn list_fd_inodes() -> String {
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
pub(crate) fn drop_privileges() -> String {
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
pub(crate) fn probe_other_process(pid: &str) -> String {
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
pub(crate) fn service_child() {
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

pub(crate) struct Proc {
    pub(crate) child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub(crate) ready: Vec<String>,
}

impl Proc {
    pub(crate) fn spawn(role: &str, env: &[(&str, String)]) -> Proc {
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

    pub(crate) fn vm(socket: &Path, vm: u64, pages: usize, domain: u64) -> Proc {
        Proc::vm_with(socket, vm, pages, domain, false)
    }

    pub(crate) fn vm_with(
        socket: &Path,
        vm: u64,
        pages: usize,
        domain: u64,
        break_on_write: bool,
    ) -> Proc {
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
    pub(crate) fn backend(socket: &Path, target: &Proc, vm: u64, pages: usize) -> Proc {
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

    pub(crate) fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    /// Sends a command without waiting for its reply.
    pub(crate) fn tell(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next reply, if one comes within `secs` seconds (a liveness
    /// bound: the replies here take milliseconds).
    pub(crate) fn reply_within(&mut self, secs: i32) -> Option<String> {
        if self.stdout.buffer().is_empty() {
            let mut p = libc::pollfd {
                fd: self.stdout.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, secs * 1000) } <= 0 {
                return None;
            }
        }
        let mut line = String::new();
        self.stdout.read_line(&mut line).ok()?;
        Some(line.trim().to_owned())
    }

    pub(crate) fn check(&mut self) {
        assert_eq!(self.ask("check"), "ok", "child {} memory", self.child.id());
    }

    pub(crate) fn remapped(&mut self) -> u64 {
        self.ask("remapped").parse().unwrap()
    }

    pub(crate) fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    pub(crate) fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    pub(crate) fn exit(mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.wait();
    }
}

pub(crate) fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pagefold-test-{name}-{}.sock", std::process::id()))
}

pub(crate) fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
