//! What the host service costs a VMM process, beside Linux KSM in the same
//! run: the latency of the first write to a merged page (a vCPU's write in
//! the VMM under the kernel's copy on write; the VMM's and a vhost-user
//! backend's write in break-on-write mode, which goes through the service)
//! against a write to a page KSM merged; the latency a merge window adds
//! to a write caught in it; and a client's threads and memory.
//!
//! `cargo run --release --example service_costs [PAGES]`
//! (`benches/service_costs.sh` runs it; root for KSM.)

#![allow(clippy::cast_possible_truncation)]

use std::{
    io::{BufRead, BufReader, Write},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use pagefold::{
    service::{ClientOptions, MappedRegion, Service, ServiceClient, ServiceOptions},
    GuestMemory, GuestPhysAddr, HostVirtAddr, PAGE_SIZE,
};
use pagefold_tools::ksm;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Page `i`: the same in every VM (each page distinct from the others).
fn page(i: usize) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for (k, c) in p.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&((i * 512 + k) as u64 | 1 << 63).to_le_bytes());
    }
    p
}

/// Times a one-byte write to each page `first..end` of `base`, in ns: the
/// median and the 99th percentile.
fn time_writes(base: *mut u8, first: usize, end: usize) -> (f64, f64) {
    let mut ns: Vec<f64> = (first..end)
        .map(|i| {
            // SAFETY: inside the caller's live, writable mapping.
            let at = unsafe { base.add(i * PAGE_SIZE) };
            let t = Instant::now();
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(at, 0x5a) };
            t.elapsed().as_nanos() as f64
        })
        .collect();
    ns.sort_by(f64::total_cmp);
    (ns[ns.len() / 2], ns[ns.len() * 99 / 100])
}

/// The pages a `time FIRST END` command names (all of them without).
fn range(cmd: &str, pages: usize) -> (usize, usize) {
    let w: Vec<usize> = cmd
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    match w.as_slice() {
        [a, b] if a < b && *b <= pages => (*a, *b),
        _ => (0, pages),
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// A VMM process: memory of `pages` pages, attached; answers `time`
/// (first writes to every page, after the host merged them), `window`
/// (a writer rewriting pages with their own bytes while the host merges,
/// until `stop`), `cost`, `exit`.
fn vm_child(socket: &Path, pages: usize, break_on_write: bool) -> Res<()> {
    let mem = Arc::new(GuestMemory::new(&[(
        GuestPhysAddr(0),
        (pages * PAGE_SIZE) as u64,
    )])?);
    for i in 0..pages {
        mem.write(GuestPhysAddr((i * PAGE_SIZE) as u64), &page(i))?;
    }
    let (rss0, threads0) = (rss_kib(), threads());
    let client = ServiceClient::attach(
        socket,
        Arc::clone(&mem),
        ClientOptions {
            break_on_write,
            ..ClientOptions::default()
        },
    )?;
    let (rss1, threads1) = (rss_kib(), threads());
    println!(
        "ready {} {}",
        std::process::id(),
        mem.frame_store().as_raw_fd()
    );
    let base = mem.regions()[0].host_addr().0 as *mut u8;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer: Option<std::thread::JoinHandle<(f64, f64, f64)>> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = match line.trim() {
            t if t.starts_with("time") => {
                let (first, end) = range(t, pages);
                let (p50, p99) = time_writes(base, first, end);
                format!("{p50} {p99} {}", client.pages_remapped())
            }
            "window" => {
                stop.store(false, Ordering::SeqCst);
                let (stop, addr) = (Arc::clone(&stop), base as usize);
                writer = Some(std::thread::spawn(move || {
                    let mut ns = Vec::new();
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let at = (addr + (i % pages) * PAGE_SIZE + 8) as *mut u8;
                        let t = Instant::now();
                        // SAFETY: inside the live mapping; rewrites the byte it holds,
                        // so the page stays a merge candidate.
                        unsafe { std::ptr::write_volatile(at, std::ptr::read_volatile(at)) };
                        ns.push(t.elapsed().as_nanos() as f64);
                        i += 97;
                    }
                    ns.sort_by(f64::total_cmp);
                    let n = ns.len().max(1);
                    (ns[n / 2], ns[n * 999 / 1000], ns[n - 1])
                }));
                "started".into()
            }
            "stop" => {
                stop.store(true, Ordering::SeqCst);
                match writer.take().map(|w| w.join()) {
                    Some(Ok((p50, p999, max))) => format!("{p50} {p999} {max}"),
                    _ => "0 0 0".into(),
                }
            }
            "cost" => format!(
                "{} {} {}",
                threads1 - threads0,
                rss1.saturating_sub(rss0),
                pages
            ),
            _ => break,
        };
        println!("{reply}");
    }
    drop(client);
    Ok(())
}

/// A backend: maps the VMM's memfd and attaches as a second mapper;
/// answers `time` like the VMM.
fn backend_child(socket: &Path, pages: usize, pid: &str, fd: &str) -> Res<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/fd/{fd}"))?;
    let len = pages * PAGE_SIZE;
    // SAFETY: a fresh shared mapping of the memfd, at least `len` long.
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
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    let region = MappedRegion {
        gpa: GuestPhysAddr(0),
        size: len as u64,
        host_addr: HostVirtAddr(base as u64),
        file_offset: 0,
    };
    // SAFETY: our MAP_SHARED mapping of the memfd, left alone meanwhile.
    let client = unsafe { ServiceClient::attach_second_mapper(socket, file.as_fd(), &[region])? };
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if !line.trim().starts_with("time") {
            break;
        }
        let (first, end) = range(line.trim(), pages);
        let (p50, p99) = time_writes(base.cast(), first, end);
        println!("{p50} {p99} {}", client.pages_remapped());
    }
    Ok(())
}

/// A KSM peer: anonymous mergeable memory holding the same pages twice;
/// answers `time` once KSM merged them.
fn ksm_child(pages: usize) -> Res<()> {
    let mut a = ksm::MergeableMap::new(pages * PAGE_SIZE)?;
    let mut b = ksm::MergeableMap::new(pages * PAGE_SIZE)?;
    for i in 0..pages {
        a.bytes_mut()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(&page(i));
        b.bytes_mut()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(&page(i));
    }
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        if line?.trim() != "time" {
            break;
        }
        let (p50, p99) = time_writes(a.as_ptr(), 0, pages);
        println!("{p50} {p99} 0");
    }
    Ok(())
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    ready: Vec<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Res<Proc> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.starts_with("ready") {
            return Err(format!("{args:?} did not start: {line}").into());
        }
        let ready = line.split_whitespace().skip(1).map(str::to_owned).collect();
        Ok(Proc {
            child,
            stdin,
            stdout,
            ready,
        })
    }

    fn ask(&mut self, cmd: &str) -> Res<Vec<f64>> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect())
    }

    fn end(mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.wait();
    }
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let socket = |s: &str| PathBuf::from(s);
    match args.get(1).map(String::as_str) {
        Some("--vm") => return vm_child(&socket(&args[2]), args[3].parse()?, args[4] == "1"),
        Some("--backend") => {
            return backend_child(&socket(&args[2]), args[3].parse()?, &args[4], &args[5])
        }
        Some("--ksm") => return ksm_child(args[2].parse()?),
        _ => {}
    }
    let pages: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4096);
    let p = pages.to_string();
    let path = std::env::temp_dir().join(format!("pagefold-costs-{}.sock", std::process::id()));
    let s = path.display().to_string();
    let service = Service::start(&path, ServiceOptions::default())?;
    println!("service costs: {pages} pages per VM, first write to each merged page");

    // The kernel's copy on write in a VMM process under the service.
    let mut a = Proc::spawn(&["--vm", &s, &p, "0"])?;
    let b = Proc::spawn(&["--vm", &s, &p, "0"])?;
    let cost = a.ask("cost")?;
    service.merge_now()?;
    let cow = a.ask("time")?;
    println!(
        "pagefold, guest write, kernel copy on write: p50 {:.0} ns, p99 {:.0} ns ({} pages were merged)",
        cow[0], cow[1], cow[2]
    );
    a.end();
    b.end();

    // Break-on-write: the VMM's write and a backend's.
    let mut a = Proc::spawn(&["--vm", &s, &p, "1"])?;
    let b = Proc::spawn(&["--vm", &s, &p, "1"])?;
    let (pid, fd) = (a.ready[0].clone(), a.ready[1].clone());
    let mut x = Proc::spawn(&["--backend", &s, &p, &pid, &fd])?;
    service.merge_now()?;
    let half = pages / 2;
    let vmm_break = a.ask(&format!("time 0 {half}"))?;
    println!(
        "pagefold, guest write, break on write (through the service): p50 {:.0} ns, p99 {:.0} ns",
        vmm_break[0], vmm_break[1]
    );
    let backend_break = x.ask(&format!("time {half} {pages}"))?;
    println!(
        "pagefold, backend write, break on write (through the service): p50 {:.0} ns, p99 {:.0} ns ({} pages were merged)",
        backend_break[0], backend_break[1], backend_break[2]
    );
    x.end();
    a.end();
    b.end();

    // A write caught in a merge window.
    let mut a = Proc::spawn(&["--vm", &s, &p, "0"])?;
    let b = Proc::spawn(&["--vm", &s, &p, "0"])?;
    a.ask("window")?;
    std::thread::sleep(Duration::from_millis(50));
    service.merge_now()?;
    let w = a.ask("stop")?;
    println!(
        "pagefold, writes during a merge pass: p50 {:.0} ns, p99.9 {:.0} ns, max {:.0} ns",
        w[0], w[1], w[2]
    );
    a.end();
    b.end();
    println!(
        "one client: {} threads ({} with break on write), {} KiB of RSS at attach for {} pages",
        cost[0] as u64,
        cost[0] as u64 + 1,
        cost[1] as u64,
        cost[2] as u64
    );

    // The peer: KSM at its fastest on the same pages.
    let ksm_cow = match ksm::KsmSession::fastest() {
        Ok(session) => {
            let mut k = Proc::spawn(&["--ksm", &p])?;
            let base = session.saved_pages()?;
            session.start()?;
            let t = Instant::now();
            while session.saved_pages()?.saturating_sub(base) < (pages as u64) * 99 / 100
                && t.elapsed() < Duration::from_secs(120)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let r = k.ask("time")?;
            k.end();
            session.unmerge()?;
            println!(
                "ksm, write to a merged page: p50 {:.0} ns, p99 {:.0} ns",
                r[0], r[1]
            );
            Some(r[0])
        }
        Err(e) => {
            println!("ksm: not available here ({e}); no ratios");
            None
        }
    };
    if let Some(k) = ksm_cow {
        println!(
            "cow_ratio={:.2} break_ratio={:.2} backend_break_ratio={:.2}",
            cow[0] / k,
            vmm_break[0] / k,
            backend_break[0] / k
        );
    }
    drop(service);
    Ok(())
}
