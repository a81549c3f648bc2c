//! Noticing the copies the kernel made. A merged page is a private
//! copy-on-write view of its shared frame; when anything writes it, the kernel
//! gives the page an anonymous copy and the write lands there. The page-state
//! word still says "shared" until this module reads the kernel's page map
//! (`/proc/self/pagemap`: present, not file-backed, not the zero page) and
//! moves the page to private-remapped, dropping its shared-frame reference.

use std::sync::{atomic::Ordering, Arc};

use super::pagemap::PageMap;
use super::{
    error::DedupError,
    locks::{lock, read},
    state::{Inner, ScanState},
    steps,
    vm::VmEntry,
};
use crate::{
    addr::PAGE_SIZE,
    host::pagemap,
    memory::{GuestRegion, PageKind},
};

/// Moves pages the kernel copied (a write to a merged page) from
/// "shared" to "private, remapped" and drops their references.
pub(super) fn reconcile(
    inner: &Inner,
    scan: &mut ScanState,
    vms: &[Arc<VmEntry>],
) -> Result<(), DedupError> {
    // A VM other processes map: this process's view never shows their
    // copies (it is never remapped), so its pages are left to them.
    for vm in vms.iter().filter(|vm| vm.remote.is_none()) {
        for region in vm.mem.regions() {
            let t = region.page_states();
            // Only regions with merged pages need the kernel's page map.
            let Some(first) = (0..t.len()).find(|&p| {
                let s = t.load(p);
                s.is_remapped() && s.kind() != PageKind::Private
            }) else {
                continue;
            };
            // A chunk of the page map at a time (128 KiB of entries for
            // 64 MiB of guest memory), not the region's whole tail: a
            // TiB region would ask for gigabytes at once, and a larger
            // chunk is dedup's peak memory (it is read and dropped).
            const CHUNK: usize = 1 << 14;
            for chunk in (first..t.len()).step_by(CHUNK) {
                let count = CHUNK.min(t.len() - chunk);
                let entries = scan
                    .pagemap
                    .entries(region, chunk, count)
                    .map_err(|source| DedupError::Proc {
                        what: pagemap::PATH,
                        source,
                    })?;
                reconcile_entries(inner, vm, region, chunk, &entries, &scan.pagemap);
            }
        }
    }
    recount(inner)
}

/// Reconciles the pages `first..` of `region` from their page-map
/// `entries`.
fn reconcile_entries(
    inner: &Inner,
    vm: &VmEntry,
    region: &GuestRegion,
    first: usize,
    entries: &[pagemap::Entry],
    pagemap: &PageMap,
) {
    let t = region.page_states();
    for (i, &e) in entries.iter().enumerate() {
        let p = first + i;
        let s = t.load(p);
        if !steps::reconcilable(s) {
            continue;
        }
        let copied = pagemap.is_private_copy(e, || {
            let mut b = [0u8; PAGE_SIZE];
            region.read_page(p, &mut b);
            crate::addr::is_zero_page(&b)
        });
        if !copied {
            continue;
        }
        if steps::mark_copied(t, p, s, region.own_frame(p)) {
            vm.cow_breaks.fetch_add(1, Ordering::Relaxed);
            inner.cow_breaks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Recounts shared-frame references from the page states of *every*
/// registered VM (a subset would count too few and free frames still
/// mapped) and frees the frames no page maps any more.
pub(super) fn recount(inner: &Inner) -> Result<(), DedupError> {
    let vms = read(&inner.vms).clone();
    // Held while counting, so no unmerge publishes a state and drops
    // its reference in between.
    let mut shared = lock(&inner.shared);
    shared.recount(&inner.store, |count| {
        for vm in &vms {
            for region in vm.mem.regions() {
                let t = region.page_states();
                if !region.needs_state_checks() {
                    continue;
                }
                for p in 0..t.len() {
                    let s = t.load(p);
                    if s.kind() == PageKind::Shared {
                        count(s.frame());
                    }
                }
            }
        }
    })?;
    Ok(())
}
