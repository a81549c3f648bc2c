//! Guest RAM contents for `estimate` and `compare-ksm`: raw RAM images (a
//! QEMU `memory-backend-file`, a dump) or built-in synthetic workloads, with
//! the figure every saving is judged against: how many pages could be saved
//! at best (all pages minus distinct non-zero contents).

use std::{collections::HashSet, error::Error, fs::File, io, path::PathBuf, sync::Arc};

use pagefold::{FrameStore, GuestMemory, GuestPhysAddr, PAGE_SIZE};
use xxhash_rust::xxh3::xxh3_128;

use crate::images::{Image, ImageError};

/// Where one VM's RAM comes from.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// A raw image file, checked (its whole pages are the VM's RAM).
    Image(Image),
    /// Page `i` of a clone of a booted guest: zero, common to all clones,
    /// or the VM's own, in runs as a real guest's page cache and heap are.
    BootedClone { vm: u64 },
    /// Unique pages, of which a share repeat earlier pages of the same VM.
    Duplicates { percent: u64 },
}

/// A set of VMs.
#[derive(Clone, Debug)]
pub(crate) struct Workload {
    pub(crate) name: String,
    pub(crate) vms: Vec<(Source, usize)>,
}

impl Workload {
    /// Four clones of a booted guest, 256 MiB each.
    pub(crate) fn booted_clones() -> Self {
        let pages = (256 << 20) / PAGE_SIZE;
        Workload {
            name: "4 booted clones x 256 MiB (synthetic)".into(),
            vms: (0..4)
                .map(|vm| (Source::BootedClone { vm }, pages))
                .collect(),
        }
    }

    /// 1 GiB with 10% duplicate pages.
    pub(crate) fn duplicates_1g() -> Self {
        Workload {
            name: "1 GiB, 10% duplicates".into(),
            vms: vec![(Source::Duplicates { percent: 10 }, (1 << 30) / PAGE_SIZE)],
        }
    }

    /// One VM per image file, each checked before any is read (errors name
    /// the file; a trailing partial page is warned of on stderr).
    pub(crate) fn images(paths: &[PathBuf]) -> Result<Self, ImageError> {
        Self::from_images(&Image::check_all(paths)?)
    }

    /// One VM per image already checked.
    pub(crate) fn from_images(images: &[Image]) -> Result<Self, ImageError> {
        let mut vms = Vec::new();
        for i in images {
            // Only a 32-bit host could hold more pages than `usize` counts.
            let pages = usize::try_from(i.pages).map_err(|_| ImageError::TooLarge {
                path: i.path.clone(),
            })?;
            vms.push((Source::Image(i.clone()), pages));
        }
        Ok(Workload {
            name: format!("{} image(s)", images.len()),
            vms,
        })
    }

    /// Total pages.
    pub(crate) fn pages(&self) -> usize {
        self.vms.iter().map(|(_, n)| n).sum()
    }

    /// Fills `buf` (a whole number of pages) with pages `first..` of VM `vm`.
    pub(crate) fn fill(
        &self,
        vm: usize,
        first: usize,
        buf: &mut [u8],
        files: &mut Vec<Option<File>>,
    ) -> io::Result<()> {
        match &self.vms[vm].0 {
            Source::Image(image) => {
                if files.len() <= vm {
                    files.resize_with(vm + 1, || None);
                }
                let f = match files[vm].take() {
                    Some(f) => f,
                    None => image.open().map_err(io::Error::other)?,
                };
                let f = files[vm].insert(f);
                image
                    .read_at(f, buf, (first * PAGE_SIZE) as u64)
                    .map_err(io::Error::other)
            }
            Source::BootedClone { vm: id } => {
                for (k, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    booted_clone_page(*id, (first + k) as u64, page);
                }
                Ok(())
            }
            Source::Duplicates { percent } => {
                for (k, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    duplicates_page(*percent, (first + k) as u64, page);
                }
                Ok(())
            }
        }
    }

    /// Loads every VM into guest memory on `store` (one region at GPA 0 per
    /// VM), writing every page, zero pages too: a guest's zeroed memory is
    /// memory the host allocated. `progress` is told each chunk of pages.
    pub(crate) fn load(
        &self,
        store: &Arc<FrameStore>,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Arc<GuestMemory>>, Box<dyn Error>> {
        let mut files = Vec::new();
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        let mut vms = Vec::new();
        for (vm, (_, pages)) in self.vms.iter().enumerate() {
            let mem = GuestMemory::with_store(
                Arc::clone(store),
                &[(GuestPhysAddr(0), (*pages * PAGE_SIZE) as u64)],
            )?;
            let mut p = 0;
            while p < *pages {
                let n = (*pages - p).min(256);
                self.fill(vm, p, &mut buf[..n * PAGE_SIZE], &mut files)?;
                mem.write(GuestPhysAddr((p * PAGE_SIZE) as u64), &buf[..n * PAGE_SIZE])?;
                p += n;
                progress(n);
            }
            vms.push(Arc::new(mem));
        }
        Ok(vms)
    }

    /// Pages that can be saved at best: all pages minus distinct non-zero
    /// contents (every zero page can be released).
    pub(crate) fn achievable_saving(&self) -> io::Result<u64> {
        let mut seen = HashSet::new();
        let mut files = Vec::new();
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        for (vm, (_, pages)) in self.vms.iter().enumerate() {
            let mut p = 0;
            while p < *pages {
                let n = (*pages - p).min(256);
                self.fill(vm, p, &mut buf[..n * PAGE_SIZE], &mut files)?;
                for page in buf[..n * PAGE_SIZE].chunks_exact(PAGE_SIZE) {
                    if page.iter().any(|&b| b != 0) {
                        seen.insert(xxh3_128(page));
                    }
                }
                p += n;
            }
        }
        Ok(self.pages() as u64 - seen.len() as u64)
    }
}

/// A cheap deterministic mixer (splitmix64), so content is reproducible.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fill_words(page: &mut [u8], seed: u64) {
    for (i, c) in page.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&mix(seed ^ (i as u64) << 1).to_le_bytes());
    }
}

/// A booted guest, as measured on real ones: about 40% zero pages, half its
/// memory the same kernel and page cache as every clone, and 10% its own,
/// laid out in runs of 1–64 pages.
fn booted_clone_page(vm: u64, i: u64, page: &mut [u8]) {
    let run = i / 32;
    match mix(run) % 10 {
        0..=3 => page.fill(0),
        4..=8 => fill_words(page, mix(i) | 1),
        _ => fill_words(page, mix(i ^ (vm + 1) << 48) | 1),
    }
}

/// Unique pages, `percent`% of which repeat a page seen before.
fn duplicates_page(percent: u64, i: u64, page: &mut [u8]) {
    let r = mix(i ^ 0xd00d);
    if i > 0 && r % 100 < percent {
        // A copy of an earlier unique page.
        let mut src = mix(r) % i;
        while mix(src ^ 0xd00d) % 100 < percent && src > 0 {
            src = mix(src) % src;
        }
        fill_words(page, mix(src) | 1);
    } else {
        fill_words(page, mix(i) | 1);
    }
}
