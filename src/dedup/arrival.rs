//! A VM restored lazily and folded, as its restore holds it until every
//! page is there (onto an image still arriving, or onto a whole image
//! with regions of its own still arriving): [`Arrival::arrived`] makes it
//! an ordinary VM of the host (publishing the image if no clone did yet),
//! and an arrival dropped before that takes the VM out of the host
//! without unmerging (its memory was never all there: its pages are
//! discarded, reading zeros).

use std::sync::{atomic::Ordering, Arc, Weak};

use super::{
    arriving::ArrivingImage,
    error::DedupError,
    forget,
    locks::{lock, read},
    options::VmId,
    reconcile,
    state::Inner,
};
use crate::memory::GuestMemory;

/// The host's side of a lazy folded restore in progress (see the module).
#[derive(Debug)]
pub(crate) struct Arrival {
    pub(super) inner: Weak<Inner>,
    pub(super) vm: VmId,
    /// The image it maps while it arrives; none where it maps a whole
    /// image already and only regions of its own arrive.
    pub(super) image: Option<Arc<ArrivingImage>>,
    /// The VM's memory: discarded if it never arrives, even where the
    /// host is gone by then.
    pub(super) mem: Arc<GuestMemory>,
    /// Registered as an ordinary VM.
    pub(super) done: bool,
    /// Every page is there (`arrived` was called): kept whole even where
    /// the host is gone.
    pub(super) complete: bool,
}

impl Arrival {
    /// The VM, as the host knows it.
    pub(crate) fn vm(&self) -> VmId {
        self.vm
    }

    /// The image the VM maps while it arrives, if any.
    pub(crate) fn image(&self) -> Option<&Arc<ArrivingImage>> {
        self.image.as_ref()
    }

    /// Every page of the VM is there: the image's frames become the
    /// domain's shared frames (the first clone to arrive publishes them;
    /// the recount then counts every page mapping them, the clones still
    /// arriving included), and the VM is scanned and unmerged as any
    /// other from now on. A host gone meanwhile is `UnknownVm`: the memory
    /// keeps its bytes (the image's frames stay allocated until the store
    /// goes), unfolded.
    pub(crate) fn arrived(mut self) -> Result<VmId, DedupError> {
        self.complete = true;
        let inner = self.inner.upgrade().ok_or(DedupError::UnknownVm(self.vm))?;
        let _scan = lock(&inner.scan);
        let entry = read(&inner.vms)
            .iter()
            .find(|e| e.id == self.vm)
            .cloned()
            .ok_or(DedupError::UnknownVm(self.vm))?;
        let published = match &self.image {
            Some(image) => image.publish(&mut lock(&inner.shared))?,
            None => false,
        };
        if published {
            // Counted before anything is freed: a failed punch of a frame
            // nobody maps only leaves it to the next recount, and is no
            // reason to fail a VM that has arrived.
            let _ = reconcile::recount(&inner);
        }
        entry.arriving.store(false, Ordering::Release);
        self.done = true;
        Ok(self.vm)
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Its pages go back to their own frames, holes: the memory was
        // never all there, and must not keep mapping frames that may be
        // freed and filled with another domain's pages. Its host gone,
        // the image (never published) is still freed with its last holder:
        // discarded all the same (found by review: the memory went on
        // mapping frames the store handed out again).
        let discard = || {
            for r in self.mem.regions() {
                let _ = self.mem.discard(r.start(), r.size());
            }
        };
        let Some(inner) = self.inner.upgrade() else {
            // All there, its host gone: it keeps its bytes, unfolded (the
            // image's frames stay allocated while it maps them).
            if !self.complete {
                discard();
                if let Some(image) = &self.image {
                    image.unmapped();
                }
            }
            return;
        };
        let mut scan = lock(&inner.scan);
        discard();
        let entry = read(&inner.vms).iter().find(|e| e.id == self.vm).cloned();
        if let Some(entry) = entry {
            forget::remove_vm(&inner, &mut scan, &entry);
            if let Some(image) = &self.image {
                image.unmapped();
            }
        }
    }
}
