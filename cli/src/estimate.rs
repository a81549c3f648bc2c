//! `pagefold estimate`: how much folding a set of raw guest RAM images would
//! save. The figures come from a streaming, byte-checked count
//! (`image_scan.rs`): no privilege, and memory that does not grow with the
//! images' bytes. `--fold` also loads the images as VMs and folds them with
//! the real scanner for the kernel's own figure; that needs userfaultfd and
//! memory for every image, both checked before any work is done.
//!
//! Other VMMs' snapshots count as images too: a Firecracker memory file and
//! a cloud-hypervisor directory's `memory-ranges` hold the guest's pages
//! one after another, so once the library has checked them against their
//! layout (`pagefold::snapshot::ForeignMemory`: an error names the file
//! and field) their memory file is counted like a raw image.

use std::{error::Error, io::IsTerminal, path::PathBuf, sync::Arc};

use indicatif::{ProgressBar, ProgressStyle};
use pagefold::{
    snapshot::{FirecrackerArch, ForeignMemory},
    userfault::UserfaultError,
    DedupError, DedupHost, FrameStore, VmOptions, PAGE_SIZE,
};
use serde::Serialize;

use crate::{
    image_scan::{self, Counts},
    images::Image,
    workload::Workload,
};

#[derive(Serialize)]
struct ImageStats {
    image: String,
    total_pages: u64,
    zero_pages: u64,
    merged_pages: u64,
    trailing_bytes: u64,
}

/// What the real scanner did with the images (`--fold`).
#[derive(Serialize)]
struct Folded {
    saved_pages: u64,
    saved_bytes_kernel: u64,
    pages_shared: u64,
    pages_sharing: u64,
}

#[derive(Serialize)]
struct Totals {
    total_pages: u64,
    zero_pages: u64,
    distinct_pages: u64,
    saved_pages: u64,
    pages_shared: u64,
    pages_sharing: u64,
    /// Every figure above is byte-checked, none rests on a hash alone.
    exact: bool,
    hash_collisions: u64,
    trailing_bytes: u64,
    images: Vec<ImageStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fold: Option<Folded>,
}

/// `--fold` refused before any work: the real scanner write-protects guest
/// memory with userfaultfd, which an ordinary user may not open.
#[derive(Debug, thiserror::Error)]
#[error("--fold folds the images with the real scanner, which needs userfaultfd: run it with CAP_SYS_PTRACE (as root) or with vm.unprivileged_userfaultfd=1; without --fold, estimate needs no privilege")]
struct FoldNeedsUserfault(#[source] DedupError);

/// `--fold` refused before any work: it would hold every image in memory.
#[derive(Debug, thiserror::Error)]
#[error("--fold loads every image into memory: {need_mib} MiB of images, {available_mib} MiB available; without --fold, estimate streams the images")]
struct FoldNeedsMemory {
    need_mib: u64,
    available_mib: u64,
}

/// Firecracker's default layouts, as `--firecracker-arch` names them.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum FirecrackerArchArg {
    /// x86_64, current releases (MMIO gaps at 3 GiB and 256 GiB).
    #[value(name = "x86_64")]
    X86_64,
    /// x86_64 before the 64-bit MMIO gap (768 MiB gap at 3.25 GiB).
    #[value(name = "x86_64-legacy")]
    X86_64Legacy,
    /// aarch64 (RAM from 2 GiB).
    #[value(name = "aarch64")]
    Aarch64,
}

impl From<FirecrackerArchArg> for FirecrackerArch {
    fn from(a: FirecrackerArchArg) -> Self {
        match a {
            FirecrackerArchArg::X86_64 => FirecrackerArch::X86_64,
            FirecrackerArchArg::X86_64Legacy => FirecrackerArch::X86_64Legacy,
            FirecrackerArchArg::Aarch64 => FirecrackerArch::Aarch64,
        }
    }
}

/// What `estimate` counts, one VM each.
pub(crate) struct Inputs {
    /// Raw RAM images.
    pub(crate) images: Vec<PathBuf>,
    /// Firecracker guest memory files.
    pub(crate) firecracker: Vec<PathBuf>,
    /// Their layout.
    pub(crate) firecracker_arch: FirecrackerArchArg,
    /// cloud-hypervisor snapshot directories.
    pub(crate) cloud_hypervisor: Vec<PathBuf>,
}

impl Inputs {
    /// Every file to count: the raw images, then each foreign snapshot's
    /// memory file once the library has checked it against its layout.
    fn files(&self) -> Result<Vec<PathBuf>, Box<dyn Error>> {
        let mut paths = self.images.clone();
        for f in &self.firecracker {
            let m = ForeignMemory::firecracker_default(f, self.firecracker_arch.into())?;
            paths.push(m.path().to_path_buf());
        }
        for d in &self.cloud_hypervisor {
            paths.push(ForeignMemory::cloud_hypervisor(d)?.path().to_path_buf());
        }
        Ok(paths)
    }
}

/// Counts the inputs (and with `fold`, folds them), then prints per-image
/// and total figures.
pub(crate) fn run(inputs: &Inputs, json: bool, fold: bool) -> Result<(), Box<dyn Error>> {
    let images = Image::check_all(&inputs.files()?)?;
    let bytes: u64 = images.iter().map(Image::bytes).sum();
    let folder = if fold {
        Some(Folder::start(bytes)?)
    } else {
        None
    };

    let bar = progress_bar(
        bytes,
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
    );
    bar.set_message("counting");
    let counts = image_scan::count(&images, |n| bar.inc(n))?;
    bar.finish_and_clear();

    let folded = folder.map(|f| f.fold(&images)).transpose()?;
    print(&totals(&images, &counts, folded), json)
}

fn totals(images: &[Image], c: &Counts, fold: Option<Folded>) -> Totals {
    Totals {
        total_pages: c.total_pages(),
        zero_pages: c.zero_pages(),
        distinct_pages: c.distinct_pages,
        saved_pages: c.saved_pages(),
        pages_shared: c.pages_shared,
        pages_sharing: c.pages_sharing,
        exact: true,
        hash_collisions: c.hash_collisions,
        trailing_bytes: images.iter().map(|i| i.trailing_bytes).sum(),
        images: images
            .iter()
            .zip(&c.images)
            .map(|(i, n)| ImageStats {
                image: i.path.display().to_string(),
                total_pages: n.pages,
                zero_pages: n.zero_pages,
                merged_pages: n.merged_pages,
                trailing_bytes: i.trailing_bytes,
            })
            .collect(),
        fold,
    }
}

fn print(t: &Totals, json: bool) -> Result<(), Box<dyn Error>> {
    if json {
        println!("{}", serde_json::to_string_pretty(t)?);
        return Ok(());
    }
    let mib = |pages: u64| (pages * PAGE_SIZE as u64) >> 20;
    for i in &t.images {
        let trailing = match i.trailing_bytes {
            0 => String::new(),
            n => format!("; {n} trailing bytes (a partial page) not counted"),
        };
        println!(
            "{}: {} pages ({} MiB), {} zero, {} merged with other pages{trailing}",
            i.image,
            i.total_pages,
            mib(i.total_pages),
            i.zero_pages,
            i.merged_pages
        );
    }
    println!(
        "total: {} pages ({} MiB), {} zero, {} distinct, saving {} pages ({} MiB, {:.1}%)",
        t.total_pages,
        mib(t.total_pages),
        t.zero_pages,
        t.distinct_pages,
        t.saved_pages,
        mib(t.saved_pages),
        100.0 * t.saved_pages as f64 / t.total_pages.max(1) as f64,
    );
    println!(
        "exact: every figure is byte-checked (zero pages read as zeros, each duplicate compared with its first copy; {} hash collisions told apart)",
        t.hash_collisions
    );
    if let Some(f) = &t.fold {
        println!(
            "folded by the real scanner: saving {} pages ({} shared frames for {} sharing pages); the kernel freed {} MiB",
            f.saved_pages,
            f.pages_shared,
            f.pages_sharing,
            f.saved_bytes_kernel >> 20
        );
    }
    Ok(())
}

/// A progress bar on stderr, drawn only where stderr is a terminal (so
/// scripts and tests see nothing of it).
fn progress_bar(len: u64, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The real scanner, started before any image is read so that a missing
/// privilege or too little memory is said up front.
struct Folder {
    store: Arc<FrameStore>,
    host: DedupHost,
}

impl Folder {
    fn start(bytes: u64) -> Result<Self, Box<dyn Error>> {
        if let Some(available) = mem_available() {
            if bytes > available {
                return Err(FoldNeedsMemory {
                    need_mib: bytes >> 20,
                    available_mib: available >> 20,
                }
                .into());
            }
        }
        let store = Arc::new(FrameStore::memfd()?);
        let host = DedupHost::new(Arc::clone(&store)).map_err(|e| -> Box<dyn Error> {
            match e {
                DedupError::Userfault(UserfaultError::Unavailable(_)) => {
                    FoldNeedsUserfault(e).into()
                }
                e => e.into(),
            }
        })?;
        Ok(Folder { store, host })
    }

    /// Loads the images as VMs (every page written: a guest's zeroed memory
    /// is memory the host allocated), folds them, and reads the figures.
    fn fold(self, images: &[Image]) -> Result<Folded, Box<dyn Error>> {
        let w = Workload::from_images(images)?;
        let bar = progress_bar(w.pages() as u64, "{msg} [{bar:40}] {pos}/{len} pages");
        bar.set_message("loading");
        let vms = w.load(&self.store, |n| bar.inc(n as u64))?;
        bar.set_message("folding");
        for vm in &vms {
            self.host.register(Arc::clone(vm), VmOptions::default())?;
        }
        let before = self.store.allocated_bytes()?;
        self.host.merge_now()?;
        let after = self.store.allocated_bytes()?;
        bar.finish_and_clear();
        let s = self.host.stats()?;
        Ok(Folded {
            saved_pages: s.pages_sharing + s.zero_pages,
            saved_bytes_kernel: before.saturating_sub(after),
            pages_shared: s.pages_shared,
            pages_sharing: s.pages_sharing,
        })
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (`None` where unreadable:
/// the check is a courtesy, the load itself reports a real shortage).
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
