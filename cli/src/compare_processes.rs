//! `pagefold compare-ksm --processes`: one process per VM, as production
//! VMMs run. pagefold's side is a host service in this process with every
//! VM process attached to it; KSM's side is the same processes, each with
//! an anonymous `MADV_MERGEABLE` mapping, folded by `ksmd`. Also the hidden
//! `vm-process` role those processes play. Owns the child protocol (one
//! command a line on stdin, one answer a line on stdout); never leaves a
//! child behind (each is killed and reaped on drop).

use std::{
    error::Error,
    fs::File,
    io::{BufRead, BufReader, Write},
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use pagefold::{
    service::{ClientOptions, Service, ServiceClient, ServiceOptions},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use pagefold_tools::ksm;

use crate::{
    compare::{cpu_seconds_self, print_row, time_writes, EngineResult, MapCountRaised, Ratios},
    images::Image,
    workload::{Source, Workload},
};

/// Pages whose COW break is timed, over all processes.
const COW_SAMPLE: usize = 2000;

/// The hidden `vm-process` role: one VM's memory in a process of its own.
#[derive(Args, Debug)]
pub(crate) struct VmProcessArgs {
    /// The service's socket (pagefold's side).
    #[arg(long, required_unless_present = "ksm")]
    socket: Option<PathBuf>,
    /// Hold the memory in an anonymous MADV_MERGEABLE mapping for KSM
    /// instead of attaching to a service.
    #[arg(long)]
    ksm: bool,
    /// The VM's contents: image:PATH, clone:ID or dup:PERCENT.
    #[arg(long)]
    source: String,
    /// The VM's pages.
    #[arg(long)]
    pages: usize,
}

/// What went wrong between this process and its VM processes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProcessError {
    /// `--processes` does not match the images given.
    #[error("--processes {n}: {images} image(s) given; give one image per process, or none for synthetic clones")]
    Count {
        /// `--processes`.
        n: usize,
        /// Images given.
        images: usize,
    },
    /// `--source` of `vm-process` is not one this file writes.
    #[error("--source {spec:?}: expected image:PATH, clone:ID or dup:PERCENT")]
    Source {
        /// The text given.
        spec: String,
    },
    /// A VM process could not be started or talked to.
    #[error("VM process {vm}: {what}: {source}")]
    Io {
        /// The VM's index.
        vm: usize,
        /// What was being done.
        what: &'static str,
        /// The OS's error.
        source: std::io::Error,
    },
    /// A VM process answered something else than expected (or nothing).
    #[error("VM process {vm}: expected `{expected} ...`, got {got:?}")]
    Answer {
        /// The VM's index.
        vm: usize,
        /// The answer's first word expected.
        expected: &'static str,
        /// The line read ("" at end of output: the process ended).
        got: String,
    },
}

fn source_arg(s: &Source) -> String {
    match s {
        Source::Image(i) => format!("image:{}", i.path.display()),
        Source::BootedClone { vm } => format!("clone:{vm}"),
        Source::Duplicates { percent } => format!("dup:{percent}"),
    }
}

fn parse_source(spec: &str) -> Result<Source, Box<dyn Error>> {
    let bad = || ProcessError::Source { spec: spec.into() };
    let (kind, value) = spec.split_once(':').ok_or_else(bad)?;
    Ok(match kind {
        "image" => Source::Image(Image::check(Path::new(value))?),
        "clone" => Source::BootedClone {
            vm: value.parse().map_err(|_| bad())?,
        },
        "dup" => Source::Duplicates {
            percent: value.parse().map_err(|_| bad())?,
        },
        _ => return Err(bad().into()),
    })
}

/// Clock ticks per second of /proc's CPU times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of process `pid` (all its threads), in seconds; 0 once
/// the process is gone.
fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the ")" of the command name; utime and stime are fields
    // 14 and 15 of the whole line, 12 and 13 after the name.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / clock_ticks()
}

/// One VM process, killed and reaped when dropped.
struct VmChild {
    vm: usize,
    child: std::process::Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl VmChild {
    fn spawn(w: &Workload, vm: usize, socket: Option<&Path>) -> Result<Self, ProcessError> {
        let io = |what| move |source| ProcessError::Io { vm, what, source };
        let exe = std::env::current_exe().map_err(io("find this program"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("vm-process")
            .arg("--source")
            .arg(source_arg(&w.vms[vm].0))
            .arg("--pages")
            .arg(w.vms[vm].1.to_string());
        match socket {
            Some(s) => cmd.arg("--socket").arg(s),
            None => cmd.arg("--ksm"),
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io("start"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io("take its pipes")(std::io::ErrorKind::BrokenPipe.into()));
        };
        Ok(VmChild {
            vm,
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    fn send(&mut self, line: &str) -> Result<(), ProcessError> {
        writeln!(self.stdin, "{line}").map_err(|source| ProcessError::Io {
            vm: self.vm,
            what: "send a command",
            source,
        })
    }

    /// Reads one answer and returns its numbers after `expected`.
    fn expect<T: std::str::FromStr>(
        &mut self,
        expected: &'static str,
    ) -> Result<Vec<T>, ProcessError> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|source| ProcessError::Io {
                vm: self.vm,
                what: "read an answer",
                source,
            })?;
        let mut words = line.split_whitespace();
        let nums: Option<Vec<T>> = match words.next() {
            Some(w) if w == expected => words.map(|x| x.parse().ok()).collect(),
            _ => None,
        };
        nums.ok_or(ProcessError::Answer {
            vm: self.vm,
            expected,
            got: line.trim_end().to_owned(),
        })
    }

    fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.child.id())
    }
}

impl Drop for VmChild {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_all(w: &Workload, socket: Option<&Path>) -> Result<(Vec<VmChild>, u64), ProcessError> {
    let mut children = Vec::new();
    for vm in 0..w.vms.len() {
        children.push(VmChild::spawn(w, vm, socket)?);
    }
    // They fill their memory at once; each says how many bytes it holds.
    let mut bytes = 0;
    for c in &mut children {
        bytes += c.expect::<u64>("filled")?.first().copied().unwrap_or(0);
    }
    Ok((children, bytes))
}

fn children_cpu(children: &[VmChild]) -> f64 {
    children.iter().map(VmChild::cpu_seconds).sum()
}

/// Mean COW-break nanoseconds over up to [`COW_SAMPLE`] merged pages of
/// every child.
fn cow_ns(children: &mut [VmChild]) -> Result<f64, ProcessError> {
    let each = COW_SAMPLE / children.len().max(1);
    let (mut total, mut pages) = (0.0, 0.0);
    for c in children.iter_mut() {
        c.send(&format!("cow {each}"))?;
        let a = c.expect::<f64>("cow")?;
        if let [ns, n] = a[..] {
            total += ns * n;
            pages += n;
        }
    }
    Ok(if pages > 0.0 { total / pages } else { 0.0 })
}

/// Runs the comparison with one process per VM of `w` and prints the
/// summary line last.
pub(crate) fn run(
    w: &Workload,
    with_ksm: bool,
    map_count: Option<u64>,
) -> Result<(), Box<dyn Error>> {
    let _raised = map_count.map(MapCountRaised::to);
    println!(
        "== {} ({} pages, {} MiB), one process per VM ({} processes)",
        w.name,
        w.pages(),
        (w.pages() * PAGE_SIZE) >> 20,
        w.vms.len()
    );
    let achievable = w.achievable_saving()?;
    println!("achievable saving: {achievable} pages");
    let target = (achievable * 99).div_ceil(100);

    let pf = run_pagefold(w, target)?;
    print_row("pagefold", &pf, achievable);
    let mut ratios = Ratios::default();
    if with_ksm {
        let ks = run_ksm(w, target)?;
        print_row("ksm", &ks, achievable);
        ratios.add(&w.name, &pf, &ks);
    }
    ratios.print_summary();
    Ok(())
}

/// A socket path for this run's service, removed by the service on drop.
fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!("pagefold-compare-{}.sock", std::process::id()))
}

fn run_pagefold(w: &Workload, target: u64) -> Result<EngineResult, Box<dyn Error>> {
    // `merge_now` in a loop, no background scanning: one pass visits every
    // page with the scanner's threads at once. Measured on the 4 real guest
    // images: 0.48 s to 99%, where background steps of 16 Ki, 64 Ki or
    // 256 Ki pages with no pause took 0.90-0.98 s and 50% more CPU.
    println!(
        "  pagefold: the service in this process, merge_now in a loop (no background scanning: the fastest to 99%)"
    );
    let service = Service::start(&socket_path(), ServiceOptions::default())?;
    let (mut children, before) = spawn_all(w, Some(service.path()))?;
    // Attaching is not counted, as registering is not in one process and
    // MADV_MERGEABLE is not for KSM: a VMM attaches once, when it starts.
    let attach0 = Instant::now();
    for c in &mut children {
        c.send("attach")?;
    }
    let mut attached = Vec::new();
    for c in &mut children {
        attached.push(c.expect::<u64>("attached")?);
    }
    let attach_secs = attach0.elapsed().as_secs_f64();
    let cpu_self0 = cpu_seconds_self();
    let cpu_children0 = children_cpu(&children);
    let t0 = Instant::now();
    let saved_now = |s: &pagefold::service::ServiceStats| {
        before.saturating_sub(s.guest_bytes + s.shared_bytes) / PAGE_SIZE as u64
    };
    let mut reached = None;
    let mut passes = 0;
    let (cpu_service, cpu_clients) = loop {
        let report = service.merge_now()?;
        passes += 1;
        let saved = saved_now(&service.stats()?);
        let progress = report.merged_shared + report.merged_zero > 0;
        if reached.is_none() && saved >= target {
            reached = Some(t0.elapsed().as_secs_f64());
        }
        if reached.is_some() || !progress || t0.elapsed() > Duration::from_secs(600) {
            break (
                cpu_seconds_self() - cpu_self0,
                children_cpu(&children) - cpu_children0,
            );
        }
    };
    let stats = service.stats()?;
    let saved = saved_now(&stats);
    println!(
        "  pagefold processes: attach {attach_secs:.3} s (not counted); {passes} merge pass(es); cpu: service {cpu_service:.3} s + clients {cpu_clients:.3} s; guest memfds {} MiB -> {} MiB + shared {} MiB",
        before >> 20,
        stats.guest_bytes >> 20,
        stats.shared_bytes >> 20
    );
    // What one client costs: the threads its attach added, and the
    // anonymous memory its attach and the merge added (the remap thread,
    // the remapped-page map of one bool per guest page).
    for c in &mut children {
        c.send("cost")?;
        let cost = c.expect::<u64>("cost")?;
        if let Some(a) = attached.get_mut(c.vm) {
            a.extend(cost);
        }
    }
    let n = attached.len().max(1) as f64;
    let mean = |k: usize| {
        attached
            .iter()
            .map(|a| a.get(k).copied().unwrap_or(0) as f64)
            .sum::<f64>()
            / n
    };
    println!(
        "  client cost (mean of {} processes): threads {:.0} -> {:.0}; anonymous memory +{:.0} KiB at attach, +{:.0} KiB after the merge (remapped-page map: {} KiB of it)",
        attached.len(),
        mean(0),
        mean(1),
        mean(3) - mean(2),
        mean(5) - mean(2),
        (w.pages() / w.vms.len().max(1)) >> 10
    );
    let mut remapped = 0;
    for c in &mut children {
        c.send("remapped")?;
        remapped += c.expect::<u64>("remapped")?.first().copied().unwrap_or(0);
    }
    println!("  pages the clients map shared or zero now: {remapped}");
    let cow = cow_ns(&mut children)?;
    drop(children);
    drop(service);
    Ok(EngineResult {
        seconds_to_99: reached,
        cpu_seconds: cpu_service + cpu_clients,
        saved_pages: saved,
        cow_ns: cow,
    })
}

fn run_ksm(w: &Workload, target: u64) -> Result<EngineResult, Box<dyn Error>> {
    let session = ksm::KsmSession::fastest()?;
    std::thread::sleep(Duration::from_millis(50));
    let (mut children, _) = spawn_all(w, None)?;
    let base = session.saved_pages()?;
    let cpu0 = ksm::ksmd_cpu_seconds()? + children_cpu(&children);
    let t0 = Instant::now();
    session.start()?;
    let limit = Duration::from_secs(600);
    let (mut reached, mut cpu_at_99) = (None, 0.0);
    let mut last = 0;
    let mut last_change = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let saved = session.saved_pages()?.saturating_sub(base);
        if saved != last {
            last = saved;
            last_change = Instant::now();
        }
        if reached.is_none() && saved >= target {
            reached = Some(t0.elapsed().as_secs_f64());
            cpu_at_99 = ksm::ksmd_cpu_seconds()? + children_cpu(&children) - cpu0;
        }
        let settled = last_change.elapsed() > Duration::from_millis(1500);
        if (reached.is_some() && settled) || t0.elapsed() > limit {
            break;
        }
    }
    let cpu = if reached.is_some() {
        cpu_at_99
    } else {
        ksm::ksmd_cpu_seconds()? + children_cpu(&children) - cpu0
    };
    let cow = cow_ns(&mut children)?;
    session.unmerge()?;
    drop(children);
    Ok(EngineResult {
        seconds_to_99: reached,
        cpu_seconds: cpu,
        saved_pages: last,
        cow_ns: cow,
    })
}

// ---------------------------------------------------------------- the child

/// Threads and anonymous resident memory of this process (`RssAnon`, in
/// KiB: what the client adds; the guest's own memfd pages are `RssShmem`).
fn self_cost() -> (usize, u64) {
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    (threads, rss)
}

/// Fills `dst` (whole pages) with VM 0 of `w`, 256 pages at a time.
fn fill_pages(
    w: &Workload,
    pages: usize,
    mut put: impl FnMut(usize, &[u8]) -> Result<(), Box<dyn Error>>,
) -> Result<(), Box<dyn Error>> {
    let mut files = Vec::new();
    let mut buf = vec![0u8; 256 * PAGE_SIZE];
    let mut p = 0;
    while p < pages {
        let n = (pages - p).min(256);
        w.fill(0, p, &mut buf[..n * PAGE_SIZE], &mut files)?;
        put(p, &buf[..n * PAGE_SIZE])?;
        p += n;
    }
    Ok(())
}

/// Pages in `[base, base + len)` that map the file with inode `ino`
/// (`/proc/self/maps`), at most `limit`.
fn pages_mapping(ino: u64, base: usize, len: usize, limit: usize) -> Vec<usize> {
    // Inode 0 is every anonymous mapping: no file to look for.
    if ino == 0 {
        return Vec::new();
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut out = Vec::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(inode)) = (f.first(), f.get(4)) else {
            continue;
        };
        if inode.parse::<u64>().ok() != Some(ino) {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        let mut p = a.max(base);
        while p < b.min(base + len) && out.len() < limit {
            out.push(p);
            p += PAGE_SIZE;
        }
    }
    out
}

/// Pages of `[base, base + len)` that KSM merged (`KPF_KSM` in
/// /proc/kpageflags, which needs root), at most `limit`; none where the
/// kernel does not say.
fn ksm_pages(base: usize, len: usize, limit: usize) -> Vec<usize> {
    const KPF_KSM: u64 = 1 << 21;
    const PRESENT: u64 = 1 << 63;
    const PFN: u64 = (1 << 55) - 1;
    let (Ok(pagemap), Ok(flags)) = (
        File::open("/proc/self/pagemap"),
        File::open("/proc/kpageflags"),
    ) else {
        return Vec::new();
    };
    let mut entries = vec![0u8; len / PAGE_SIZE * 8];
    if pagemap
        .read_exact_at(&mut entries, (base / PAGE_SIZE * 8) as u64)
        .is_err()
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, e) in entries.chunks_exact(8).enumerate() {
        if out.len() >= limit {
            break;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        let e = u64::from_le_bytes(b);
        let pfn = e & PFN;
        if e & PRESENT == 0 || pfn == 0 {
            continue;
        }
        let mut f = [0u8; 8];
        if flags.read_exact_at(&mut f, pfn * 8).is_ok() && u64::from_le_bytes(f) & KPF_KSM != 0 {
            out.push(base + i * PAGE_SIZE);
        }
    }
    out
}

/// Answers `cow N`: times one write to each of up to N pages `find` names.
fn answer_cow(
    arg: Option<&str>,
    find: impl FnOnce(usize) -> Vec<usize>,
) -> Result<(), Box<dyn Error>> {
    let limit = arg.and_then(|a| a.parse().ok()).unwrap_or(COW_SAMPLE);
    let pages = find(limit);
    let ns = time_writes(pages.iter().map(|&p| Ok::<_, std::io::Error>(p as *mut u8)))?;
    println!("cow {ns:.1} {}", pages.len());
    Ok(())
}

/// The `vm-process` role: fills one VM's memory, says `filled BYTES`, then
/// answers commands on stdin until `exit` or its end.
pub(crate) fn vm_process(args: &VmProcessArgs) -> Result<(), Box<dyn Error>> {
    let w = Workload {
        name: String::new(),
        vms: vec![(parse_source(&args.source)?, args.pages)],
    };
    let len = args.pages * PAGE_SIZE;
    // Either the service's client (with its memory) or KSM's mapping.
    let mut ksm_map = None;
    let mut mem = None;
    if args.ksm {
        let mut map = ksm::MergeableMap::new(len)?;
        fill_pages(&w, args.pages, |p, bytes| {
            map.bytes_mut()[p * PAGE_SIZE..p * PAGE_SIZE + bytes.len()].copy_from_slice(bytes);
            Ok(())
        })?;
        println!("filled {len}");
        ksm_map = Some(map);
    } else {
        let m = GuestMemory::new(&[(GuestPhysAddr(0), len as u64)])?;
        fill_pages(&w, args.pages, |p, bytes| {
            m.write(GuestPhysAddr((p * PAGE_SIZE) as u64), bytes)
                .map_err(Into::into)
        })?;
        println!("filled {}", m.frame_store().allocated_bytes()?);
        mem = Some(Arc::new(m));
    }
    let mut client: Option<ServiceClient> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match (words.next(), &mem, &ksm_map) {
            (Some("attach"), Some(m), _) => {
                let (threads0, rss0) = self_cost();
                let socket = args.socket.clone().unwrap_or_default();
                let c = ServiceClient::attach(&socket, Arc::clone(m), ClientOptions::default())?;
                let (threads1, rss1) = self_cost();
                println!("attached {threads0} {threads1} {rss0} {rss1}");
                client = Some(c);
            }
            (Some("cost"), _, _) => {
                let (threads, anon) = self_cost();
                println!("cost {threads} {anon}");
            }
            (Some("remapped"), _, _) => {
                println!(
                    "remapped {}",
                    client.as_ref().map_or(0, |c| c.pages_remapped())
                );
            }
            (Some("cow"), Some(m), _) => {
                let base = usize::try_from(m.regions()[0].host_addr().0)?;
                let ino = client.as_ref().map_or(0, |c| {
                    use std::os::fd::AsRawFd;
                    std::fs::metadata(format!(
                        "/proc/self/fd/{}",
                        c.shared_frames_fd().as_raw_fd()
                    ))
                    .map_or(0, |md| md.ino())
                });
                answer_cow(words.next(), |limit| pages_mapping(ino, base, len, limit))?;
            }
            (Some("cow"), _, Some(map)) => {
                let base = map.as_ptr() as usize;
                answer_cow(words.next(), |limit| ksm_pages(base, len, limit))?;
            }
            (Some("exit"), _, _) => break,
            _ => println!("unknown {line:?}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{parse_source, process_cpu_seconds, source_arg, Source};

    #[test]
    fn a_source_goes_to_the_child_and_back() {
        for s in [
            Source::BootedClone { vm: 3 },
            Source::Duplicates { percent: 10 },
        ] {
            let back = parse_source(&source_arg(&s)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{s:?}"));
        }
        for bad in [
            "clone",
            "clone:x",
            "dup:-1",
            "tar:1",
            "image:/nonexistent/ram.img",
        ] {
            assert!(parse_source(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_seconds_of_a_process_grow_with_its_work() {
        let me = std::process::id();
        let before = process_cpu_seconds(me);
        let t0 = std::time::Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        assert!(process_cpu_seconds(me) > before);
        // A process that is gone has used nothing more.
        assert_eq!(process_cpu_seconds(u32::MAX), 0.0);
    }
}
