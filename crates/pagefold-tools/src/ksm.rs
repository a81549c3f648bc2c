//! Linux KSM as the peer: its knobs under `/sys/kernel/mm/ksm/`, set to its
//! fastest and always put back as they were (also on error or panic), and
//! the figures it reports about itself and its `ksmd` thread.

use std::{
    fs, io,
    path::Path,
    sync::{Mutex, Once},
    time::Duration,
};

const KSM: &str = "/sys/kernel/mm/ksm";
/// The knobs this module changes; every one is restored on drop.
const KNOBS: [&str; 4] = ["run", "pages_to_scan", "sleep_millisecs", "use_zero_pages"];

/// KSM switched to its fastest setting until dropped.
pub struct KsmSession {
    saved: Vec<(&'static str, String)>,
    _on_signal: RestoreOnSignal,
}

/// Settings to put back if the process is told to stop (SIGINT, SIGTERM,
/// SIGHUP) while they are changed: the default action of those signals ends
/// the process without unwinding, so no `Drop` would run. Each entry is
/// (token, file, value), written in order.
static ON_SIGNAL: Mutex<Vec<(u64, String, String)>> = Mutex::new(Vec::new());
static NEXT_TOKEN: Mutex<u64> = Mutex::new(0);

/// While alive, `(file, value)` pairs are written back if a stop signal
/// arrives (by a thread that waits for those signals; then the process
/// exits with 128 + the signal's number). Dropping it forgets them (the
/// owner restores the settings itself).
pub struct RestoreOnSignal(u64);

impl RestoreOnSignal {
    /// Writes each `(file, value)` back, in order, if a stop signal
    /// arrives while the returned guard is alive (the first call starts
    /// the thread that waits for the signals).
    pub fn new(writes: Vec<(String, String)>) -> Self {
        static WATCHER: Once = Once::new();
        WATCHER.call_once(|| {
            use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
            // Without the watcher the settings are still restored on every
            // normal exit, error or panic; only a signal would miss them.
            if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
            {
                std::thread::spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        let pending = ON_SIGNAL.lock().unwrap_or_else(|e| e.into_inner());
                        for (_, file, value) in pending.iter() {
                            let _ = fs::write(file, value);
                        }
                        if !pending.is_empty() {
                            eprintln!("interrupted (signal {sig}): changed settings put back");
                        }
                        std::process::exit(128 + sig);
                    }
                });
            }
        });
        let token = {
            let mut t = NEXT_TOKEN.lock().unwrap_or_else(|e| e.into_inner());
            *t += 1;
            *t
        };
        let mut pending = ON_SIGNAL.lock().unwrap_or_else(|e| e.into_inner());
        for (file, value) in writes {
            pending.push((token, file, value));
        }
        RestoreOnSignal(token)
    }
}

impl Drop for RestoreOnSignal {
    fn drop(&mut self) {
        ON_SIGNAL
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(t, _, _)| *t != self.0);
    }
}

fn knob(name: &str) -> String {
    format!("{KSM}/{name}")
}

/// Whether this process may drive KSM, asked before any work: its `run`
/// knob opened for writing (which changes nothing). Without it,
/// `compare-ksm` used to load and fold every workload first and only then
/// fail on the knob.
pub fn check_access() -> io::Result<()> {
    if !Path::new(KSM).exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "this kernel has no KSM (/sys/kernel/mm/ksm)",
        ));
    }
    fs::OpenOptions::new()
        .write(true)
        .open(knob("run"))
        .map(drop)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "compare-ksm drives KSM through {} and needs root for it ({e}); --no-ksm runs pagefold's side alone",
                    knob("run")
                ),
            )
        })
}

/// Reads a numeric KSM counter.
pub fn counter(name: &str) -> io::Result<u64> {
    fs::read_to_string(knob(name))?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}")))
}

impl KsmSession {
    /// Saves the knobs and sets KSM to scan as fast as it can.
    pub fn fastest() -> io::Result<Self> {
        if !Path::new(KSM).exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "this kernel has no KSM (/sys/kernel/mm/ksm)",
            ));
        }
        let mut saved = Vec::new();
        for k in KNOBS {
            saved.push((k, fs::read_to_string(knob(k))?.trim().to_owned()));
        }
        // What `drop` does, in its order, should a signal end the process.
        let mut writes = vec![(knob("run"), "2".to_owned())];
        for (k, v) in saved.iter().rev().filter(|(k, _)| *k != "run") {
            writes.push((knob(k), v.clone()));
        }
        if let Some((_, v)) = saved.iter().find(|(k, _)| *k == "run") {
            writes.push((knob("run"), v.clone()));
        }
        let session = KsmSession {
            saved,
            _on_signal: RestoreOnSignal::new(writes),
        };
        // Unmerge anything left from before so counters start clean.
        fs::write(knob("run"), "2")?;
        fs::write(knob("pages_to_scan"), "100000")?;
        fs::write(knob("sleep_millisecs"), "0")?;
        fs::write(knob("use_zero_pages"), "1")?;
        Ok(session)
    }

    /// Starts scanning.
    pub fn start(&self) -> io::Result<()> {
        fs::write(knob("run"), "1")
    }

    /// Pages KSM saves now: sharing pages plus zero pages it mapped to the
    /// kernel's zero page.
    pub fn saved_pages(&self) -> io::Result<u64> {
        Ok(counter("pages_sharing")? + counter("ksm_zero_pages").unwrap_or(0))
    }

    /// Stops KSM and unmerges everything it merged (run=2).
    pub fn unmerge(&self) -> io::Result<()> {
        fs::write(knob("run"), "2")
    }
}

impl Drop for KsmSession {
    fn drop(&mut self) {
        // Unmerge first (run=2 works whatever the old run value), then put
        // back every knob, run last.
        let _ = fs::write(knob("run"), "2");
        std::thread::sleep(Duration::from_millis(10));
        for (k, v) in self.saved.iter().rev() {
            if *k != "run" {
                let _ = fs::write(knob(k), v);
            }
        }
        if let Some((_, v)) = self.saved.iter().find(|(k, _)| *k == "run") {
            let _ = fs::write(knob("run"), v);
        }
    }
}

/// CPU seconds `ksmd` has used so far.
pub fn ksmd_cpu_seconds() -> io::Result<f64> {
    for e in fs::read_dir("/proc")? {
        let e = e?;
        let comm = e.path().join("comm");
        if fs::read_to_string(&comm)
            .map(|c| c.trim() == "ksmd")
            .unwrap_or(false)
        {
            let stat = fs::read_to_string(e.path().join("stat"))?;
            // Fields after the ")" of the command name; utime and stime are
            // fields 14 and 15 of the whole line.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            // SAFETY: sysconf has no memory-safety preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            return Ok((ticks(11) + ticks(12)) as f64 / hz);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no ksmd thread found",
    ))
}

/// Private anonymous memory advised `MADV_MERGEABLE`: what a VMM gives KSM
/// (and what KSM scans). Unmapped on drop.
pub struct MergeableMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the value owns its mapping; the pointer is only used for slices
// and addresses of it, and the mapping lives until `drop`.
unsafe impl Send for MergeableMap {}
// SAFETY: as above; `&self` hands out only the address, writes need
// `&mut self`.
unsafe impl Sync for MergeableMap {}

impl MergeableMap {
    /// `len` bytes of fresh zero memory (no swap reserved), mergeable.
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping at an address the kernel
        // picks; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Owned from here: an error below unmaps it.
        let map = MergeableMap { ptr: p.cast(), len };
        // SAFETY: advice on the mapping just created.
        if unsafe { libc::madvise(p, len, libc::MADV_MERGEABLE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(map)
    }

    /// The mapping's first byte (for a KVM memory slot or a raw write).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` readable and writable bytes that live
        // as long as `self`; `&mut self` makes this the only slice.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for MergeableMap {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value created and owns.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
