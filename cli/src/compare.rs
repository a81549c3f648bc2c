//! `pagefold compare-ksm`: the same bytes folded by pagefold and by Linux
//! KSM at its fastest, in one run. Reports seconds to 99% of the achievable
//! saving, CPU seconds, pages saved as the kernel sees them, COW-break
//! latency, and the scanner's hashing rate beside raw xxh3.

use std::{
    error::Error,
    sync::Arc,
    time::{Duration, Instant},
};

use pagefold::{DedupHost, FrameStore, GuestPhysAddr, VmOptions, PAGE_SIZE};
use pagefold_tools::ksm;

use crate::workload::Workload;

/// Results of one engine on one workload.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EngineResult {
    pub(crate) seconds_to_99: Option<f64>,
    pub(crate) cpu_seconds: f64,
    pub(crate) saved_pages: u64,
    pub(crate) cow_ns: f64,
}

/// `vm.max_map_count` raised for the run and put back on drop. Each merge
/// of an isolated page costs the process up to two mappings; at the default
/// limit (65,530) pagefold stops after about 30,000 scattered merges, where
/// KSM, inside the kernel, has no such limit. Hosts that run pagefold raise
/// it, as they do for other mapping-heavy services.
pub(crate) struct MapCountRaised {
    saved: Option<String>,
    _on_signal: Option<ksm::RestoreOnSignal>,
}

const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";

impl MapCountRaised {
    pub(crate) fn to(n: u64) -> Self {
        let saved = std::fs::read_to_string(MAX_MAP_COUNT).ok();
        let current = saved
            .as_deref()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if current < n {
            // Armed before the change, so a signal at any moment after it
            // finds the old value to put back.
            let on_signal = saved.as_ref().map(|v| {
                ksm::RestoreOnSignal::new(vec![(MAX_MAP_COUNT.to_owned(), v.trim().to_owned())])
            });
            if std::fs::write(MAX_MAP_COUNT, n.to_string()).is_ok() {
                println!(
                    "vm.max_map_count raised from {current} to {n} for this run (restored after)"
                );
                return MapCountRaised {
                    saved,
                    _on_signal: on_signal,
                };
            }
        }
        MapCountRaised {
            saved: None,
            _on_signal: None,
        }
    }
}

impl Drop for MapCountRaised {
    fn drop(&mut self) {
        if let Some(v) = &self.saved {
            let _ = std::fs::write(MAX_MAP_COUNT, v.trim());
        }
    }
}

/// Runs the comparison on each workload and prints the summary line last.
/// With `map_count`, raises `vm.max_map_count` to it for the run.
pub(crate) fn run(
    workloads: &[Workload],
    with_ksm: bool,
    map_count: Option<u64>,
) -> Result<(), Box<dyn Error>> {
    let _raised = map_count.map(MapCountRaised::to);
    let mut ratios = Ratios::default();
    for w in workloads {
        println!(
            "== {} ({} pages, {} MiB)",
            w.name,
            w.pages(),
            (w.pages() * PAGE_SIZE) >> 20
        );
        let achievable = w.achievable_saving()?;
        println!("achievable saving: {achievable} pages");
        // 99% of the achievable saving, rounded up, in integers.
        let target = (achievable * 99).div_ceil(100);

        let (pf, hash) = run_pagefold(w, target)?;
        let raw = raw_xxh3_gbps(w)?;
        println!(
            "hashing per core: scanner {:.1} GB/s, raw xxh3 {:.1} GB/s ({:.0}% of the limit)",
            hash,
            raw,
            100.0 * hash / raw
        );
        print_row("pagefold", &pf, achievable);
        if !with_ksm {
            continue;
        }
        let ks = run_ksm(w, target)?;
        print_row("ksm", &ks, achievable);
        ratios.add(&w.name, &pf, &ks);
    }
    ratios.print_summary();
    Ok(())
}

/// pagefold's figures against KSM's, workload by workload, and their
/// geometric means: the comparisons' result lines.
#[derive(Default)]
pub(crate) struct Ratios {
    speed: Vec<f64>,
    cpu: Vec<f64>,
    save: Vec<f64>,
}

impl Ratios {
    /// Prints workload `name`'s line (with its COW-break ratio) and keeps
    /// its ratios.
    pub(crate) fn add(&mut self, name: &str, pf: &EngineResult, ks: &EngineResult) {
        let s = match (pf.seconds_to_99, ks.seconds_to_99) {
            (Some(a), Some(b)) => b / a,
            (Some(_), None) => f64::INFINITY,
            _ => 0.0,
        };
        let c = ks.cpu_seconds / pf.cpu_seconds.max(1e-6);
        let v = pf.saved_pages as f64 / (ks.saved_pages as f64).max(1.0);
        println!(
            "{name}: speedup_to_99pct={s:.2} cpu_ratio={c:.2} savings_ratio={v:.3} cow_ratio={:.2}",
            pf.cow_ns / ks.cow_ns.max(1.0)
        );
        self.speed.push(s);
        self.cpu.push(c);
        self.save.push(v);
    }

    /// The last line, in the form every comparison ends with.
    pub(crate) fn print_summary(&self) {
        println!(
            "speedup_to_99pct={:.2} cpu_ratio={:.2} savings_ratio={:.3}",
            geomean(&self.speed),
            geomean(&self.cpu),
            geomean(&self.save)
        );
    }
}

pub(crate) fn geomean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|x| x.max(1e-9).ln()).sum::<f64>() / v.len() as f64).exp()
}

pub(crate) fn print_row(name: &str, r: &EngineResult, achievable: u64) {
    println!(
        "  {name:<9} to 99%: {:>9}  cpu: {:>7.3} s  saved (kernel): {:>8} pages ({:.1}% of achievable)  cow break: {:>6.2} us",
        r.seconds_to_99.map_or("never".into(), |s| format!("{s:.3} s")),
        r.cpu_seconds,
        r.saved_pages,
        100.0 * r.saved_pages as f64 / achievable.max(1) as f64,
        r.cow_ns / 1000.0
    );
}

pub(crate) fn cpu_seconds_self() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: `ru` is a writable rusage buffer, filled on success.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } != 0 {
        return 0.0;
    }
    // SAFETY: getrusage succeeded, so the buffer is initialised.
    let ru = unsafe { ru.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Returns the engine result and the scanner's hashing rate (GB/s per core).
fn run_pagefold(w: &Workload, target: u64) -> Result<(EngineResult, f64), Box<dyn Error>> {
    let store = Arc::new(FrameStore::memfd()?);
    let vms = w.load(&store, |_| {})?;
    let host = DedupHost::new(Arc::clone(&store))?;
    for m in &vms {
        host.register(Arc::clone(m), VmOptions::default())?;
    }
    let before = store.allocated_bytes()?;
    let cpu0 = cpu_seconds_self();
    let t0 = Instant::now();
    let report = host.merge_now()?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds_self() - cpu0;
    let after = store.allocated_bytes()?;
    let saved = before.saturating_sub(after) / PAGE_SIZE as u64;
    println!(
        "  pagefold phases: hash {:.3} s, group+verify {:.3} s, merge {:.3} s ({} remaps, {} pages over the mapping budget)",
        report.hash_nanos as f64 / 1e9,
        report.group_nanos as f64 / 1e9,
        report.merge_nanos as f64 / 1e9,
        report.remaps,
        report.map_limit
    );
    let kv = host.kernel_view()?;
    let merged = report.merged_shared + report.merged_zero;
    println!(
        "  pagefold mappings: {} for guest memory, {:.4} per merged page ({} merged)",
        kv.guest_mappings,
        kv.guest_mappings.saturating_sub(vms.len() as u64) as f64 / merged.max(1) as f64,
        merged
    );
    let hash_rate = report.pages_hashed as f64 * PAGE_SIZE as f64
        / (report.hash_nanos as f64 * report.hash_threads.max(1) as f64);

    // COW break: one write each to merged pages nobody touched since.
    let mut targets = Vec::new();
    for (vm, m) in vms.iter().enumerate() {
        let region = &m.regions()[0];
        for p in 0..region.pages() {
            if region.page_state(p).map(|s| s.kind()) == Some(pagefold::PageKind::Shared)
                && targets.len() < 2000
            {
                targets.push((vm, p));
            }
        }
    }
    let cow_ns = time_writes(targets.iter().map(|&(vm, p)| {
        vms[vm]
            .host_address(GuestPhysAddr((p * PAGE_SIZE) as u64))
            .map(|h| h.0 as *mut u8)
    }))?;
    Ok((
        EngineResult {
            seconds_to_99: (saved >= target).then_some(secs),
            cpu_seconds: cpu,
            saved_pages: saved,
            cow_ns,
        },
        hash_rate,
    ))
}

/// Mean nanoseconds of one byte written to each page.
pub(crate) fn time_writes<E: Into<Box<dyn Error>>>(
    ptrs: impl Iterator<Item = Result<*mut u8, E>>,
) -> Result<f64, Box<dyn Error>> {
    let ptrs: Vec<*mut u8> = ptrs.collect::<Result<_, _>>().map_err(Into::into)?;
    if ptrs.is_empty() {
        return Ok(0.0);
    }
    let t0 = Instant::now();
    for &p in &ptrs {
        // SAFETY: every pointer is a page start inside a live mapping the
        // caller owns for the duration of this call.
        unsafe { std::ptr::write_volatile(p, 0xa5) };
    }
    Ok(t0.elapsed().as_nanos() as f64 / ptrs.len() as f64)
}

/// Raw single-thread xxh3 over the workload's first pages, GB/s.
fn raw_xxh3_gbps(w: &Workload) -> Result<f64, Box<dyn Error>> {
    let pages = w.vms[0].1.min(16384);
    let mut buf = vec![0u8; pages * PAGE_SIZE];
    w.fill(0, 0, &mut buf, &mut Vec::new())?;
    let mut acc = 0u64;
    let t0 = Instant::now();
    for _ in 0..4 {
        for page in buf.chunks_exact(PAGE_SIZE) {
            acc ^= xxhash_rust::xxh3::xxh3_64(std::hint::black_box(page));
        }
    }
    std::hint::black_box(acc);
    Ok(4.0 * buf.len() as f64 / t0.elapsed().as_nanos() as f64)
}

/// Anonymous private memory handed to KSM.
fn run_ksm(w: &Workload, target: u64) -> Result<EngineResult, Box<dyn Error>> {
    let session = ksm::KsmSession::fastest()?;
    std::thread::sleep(Duration::from_millis(50));
    let mut maps = Vec::new();
    let mut files = Vec::new();
    let mut dup_pages = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (vm, (_, pages)) in w.vms.iter().enumerate() {
        let mut map = ksm::MergeableMap::new(pages * PAGE_SIZE)?;
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        let mut q = 0;
        while q < *pages {
            let n = (*pages - q).min(256);
            w.fill(vm, q, &mut buf[..n * PAGE_SIZE], &mut files)?;
            map.bytes_mut()[q * PAGE_SIZE..(q + n) * PAGE_SIZE]
                .copy_from_slice(&buf[..n * PAGE_SIZE]);
            for (k, page) in buf[..n * PAGE_SIZE].chunks_exact(PAGE_SIZE).enumerate() {
                // A repeat of a non-zero content seen before is a page KSM
                // merges: the COW-break sample.
                if page.iter().any(|&b| b != 0)
                    && !seen.insert(xxhash_rust::xxh3::xxh3_128(page))
                    && dup_pages.len() < 2000
                {
                    dup_pages.push((maps.len(), q + k));
                }
            }
            q += n;
        }
        maps.push(map);
    }
    let base = session.saved_pages()?;
    let cpu0 = ksm::ksmd_cpu_seconds()?;
    let t0 = Instant::now();
    session.start()?;
    let limit = Duration::from_secs(600);
    let mut reached = None;
    let mut last = 0;
    let mut last_change = Instant::now();
    let mut cpu_at_99 = 0.0;
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let saved = session.saved_pages()?.saturating_sub(base);
        if saved != last {
            last = saved;
            last_change = Instant::now();
        }
        if reached.is_none() && saved >= target {
            reached = Some(t0.elapsed().as_secs_f64());
            cpu_at_99 = ksm::ksmd_cpu_seconds()? - cpu0;
        }
        let settled = last_change.elapsed() > Duration::from_millis(1500);
        if (reached.is_some() && settled) || t0.elapsed() > limit {
            break;
        }
    }
    let cpu = if reached.is_some() {
        cpu_at_99
    } else {
        ksm::ksmd_cpu_seconds()? - cpu0
    };
    // COW break on pages KSM merged (duplicated contents in clones).
    let cow_ns = time_writes(dup_pages.iter().map(|&(m, p)| {
        Ok::<_, std::io::Error>(
            // SAFETY: page `p` lies inside mapping `m` (both from the loop above).
            unsafe { maps[m].as_ptr().add(p * PAGE_SIZE) },
        )
    }))?;
    session.unmerge()?;
    drop(maps);
    Ok(EngineResult {
        seconds_to_99: reached,
        cpu_seconds: cpu,
        saved_pages: last,
        cow_ns,
    })
}
