//! `pagefold estimate`: how much a set of guest RAM images would save, found
//! by the real scanner (images are loaded as VMs and merged), not by a
//! separate counting path. The saving is the kernel's figure for the store.

use std::{error::Error, io::IsTerminal, path::PathBuf, sync::Arc};

use pagefold::{DedupHost, FrameStore, VmOptions, PAGE_SIZE};
use serde::Serialize;

use crate::workload::Workload;

#[derive(Serialize)]
struct ImageStats {
    image: String,
    total_pages: u64,
    zero_pages: u64,
    merged_pages: u64,
}

#[derive(Serialize)]
struct Totals {
    total_pages: u64,
    zero_pages: u64,
    distinct_pages: u64,
    saved_pages: u64,
    saved_bytes_kernel: u64,
    pages_shared: u64,
    pages_sharing: u64,
    images: Vec<ImageStats>,
}

/// Loads the images, merges them, prints per-image and total figures.
pub(crate) fn run(images: &[PathBuf], json: bool) -> Result<(), Box<dyn Error>> {
    if images.is_empty() {
        return Err("estimate needs at least one image".into());
    }
    let w = Workload::images(images)?;
    let store = Arc::new(FrameStore::memfd()?);
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(w.pages() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} pages")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message("loading");
        b
    });
    let vms = w.load(&store, |n| {
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    })?;
    if let Some(b) = &bar {
        b.set_message("merging");
    }
    let host = DedupHost::new(Arc::clone(&store))?;
    let ids = vms
        .iter()
        .map(|m| host.register(Arc::clone(m), VmOptions::default()))
        .collect::<Result<Vec<_>, _>>()?;
    let before = store.allocated_bytes()?;
    host.merge_now()?;
    let after = store.allocated_bytes()?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let stats = host.stats()?;
    let mut images_out = Vec::new();
    for (path, id) in images.iter().zip(&ids) {
        let s = host.vm_stats(*id)?;
        images_out.push(ImageStats {
            image: path.display().to_string(),
            total_pages: s.pages,
            zero_pages: s.zero_pages,
            merged_pages: s.pages_merged,
        });
    }
    let total_pages = stats.pages_total;
    let saved_pages = stats.pages_sharing + stats.zero_pages;
    let t = Totals {
        total_pages,
        zero_pages: stats.zero_pages,
        distinct_pages: total_pages - saved_pages,
        saved_pages,
        saved_bytes_kernel: before.saturating_sub(after),
        pages_shared: stats.pages_shared,
        pages_sharing: stats.pages_sharing,
        images: images_out,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&t)?);
        return Ok(());
    }
    for i in &t.images {
        println!(
            "{}: {} pages ({} MiB), {} zero, {} merged with other pages",
            i.image,
            i.total_pages,
            (i.total_pages * PAGE_SIZE as u64) >> 20,
            i.zero_pages,
            i.merged_pages
        );
    }
    println!(
        "total: {} pages, {} zero, {} distinct, saving {} pages ({} MiB, {:.1}%); the kernel freed {} MiB",
        t.total_pages,
        t.zero_pages,
        t.distinct_pages,
        t.saved_pages,
        (t.saved_pages * PAGE_SIZE as u64) >> 20,
        100.0 * t.saved_pages as f64 / t.total_pages.max(1) as f64,
        t.saved_bytes_kernel >> 20
    );
    Ok(())
}
