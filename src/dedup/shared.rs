//! The shared frames: frames of the store that hold one copy of a content
//! mapped (copy-on-write) by several guest pages, with their reference counts
//! and the per-domain index from content hash to frame. A shared frame is
//! written once, before any page maps it (through the pass's fill mapping,
//! made read-only before the first merge, or by `pwrite`), and is only ever
//! mapped `MAP_PRIVATE` or read-only afterwards, so nothing can change its
//! bytes.

use std::collections::HashMap;

use super::DomainId;
use crate::{
    addr::FrameNumber,
    frames::{FrameError, FrameRange, FrameStore},
};

#[derive(Debug)]
struct SharedFrame {
    refs: u64,
    hash: u64,
    domain: DomainId,
}

/// Shared frames and the content index of every domain.
#[derive(Debug, Default)]
pub(crate) struct SharedFrames {
    frames: HashMap<FrameNumber, SharedFrame>,
    /// Per domain: hash -> frames with that hash (more than one on a hash
    /// collision, and for a template of identical frames).
    index: HashMap<DomainId, HashMap<u64, Vec<FrameNumber>>>,
}

impl SharedFrames {
    /// The content index of `domain`: hash -> frames with that hash.
    pub(crate) fn domain_index(&self, domain: DomainId) -> Option<&HashMap<u64, Vec<FrameNumber>>> {
        self.index.get(&domain)
    }

    /// Records a new shared frame with no references yet.
    pub(crate) fn insert(&mut self, frame: FrameNumber, domain: DomainId, hash: u64) {
        self.frames.insert(
            frame,
            SharedFrame {
                refs: 0,
                hash,
                domain,
            },
        );
        self.index
            .entry(domain)
            .or_default()
            .entry(hash)
            .or_default()
            .push(frame);
    }

    /// One more page maps `frame`.
    pub(crate) fn add_ref(&mut self, frame: FrameNumber, n: u64) {
        if let Some(f) = self.frames.get_mut(&frame) {
            f.refs += n;
        }
    }

    /// One page less maps `frame` (a page was unmerged: its state changed
    /// under this lock); the frame is freed when none does.
    pub(crate) fn drop_ref(
        &mut self,
        store: &FrameStore,
        frame: FrameNumber,
    ) -> Result<(), FrameError> {
        let Some(f) = self.frames.get_mut(&frame) else {
            return Ok(());
        };
        f.refs = f.refs.saturating_sub(1);
        if f.refs == 0 {
            self.remove(store, frame)?;
        }
        Ok(())
    }

    /// Sets every frame's reference count to the number of pages whose
    /// state maps it (`counts`), and frees frames no page maps. The page
    /// states are the truth: pages leave a shared frame by unmerging, by
    /// the kernel's copy on write, or by a discard, and only a recount from
    /// the states can never count one too few (which would free a frame a
    /// page still maps). Callers recount while no merge runs.
    pub(crate) fn recount(
        &mut self,
        store: &FrameStore,
        counts: &HashMap<FrameNumber, u64>,
    ) -> Result<(), FrameError> {
        for (frame, f) in self.frames.iter_mut() {
            f.refs = counts.get(frame).copied().unwrap_or(0);
        }
        self.free_unreferenced(store)
    }

    /// Frees every frame that ended up with no references (a merge that
    /// found its pages changed).
    pub(crate) fn free_unreferenced(&mut self, store: &FrameStore) -> Result<(), FrameError> {
        let dead: Vec<FrameNumber> = self
            .frames
            .iter()
            .filter(|(_, f)| f.refs == 0)
            .map(|(n, _)| *n)
            .collect();
        for n in dead {
            self.remove(store, n)?;
        }
        Ok(())
    }

    /// Frees an unreferenced frame. Out of the content index first (no
    /// merge may target it any more); the record goes only once the store
    /// freed the frame, so a failed punch (which leaves the allocator as it
    /// was) is retried by the next `free_unreferenced`, not leaked.
    fn remove(&mut self, store: &FrameStore, frame: FrameNumber) -> Result<(), FrameError> {
        let Some(f) = self.frames.get(&frame) else {
            return Ok(());
        };
        if let Some(m) = self.index.get_mut(&f.domain) {
            if let Some(v) = m.get_mut(&f.hash) {
                v.retain(|x| *x != frame);
                if v.is_empty() {
                    m.remove(&f.hash);
                }
            }
        }
        store.free(FrameRange {
            start: frame,
            count: 1,
        })?;
        self.frames.remove(&frame);
        Ok(())
    }

    /// Shared frames in use (KSM's `pages_shared`).
    pub(crate) fn len(&self) -> u64 {
        self.frames.len() as u64
    }

    /// Sum of references (pages mapping a shared frame).
    pub(crate) fn total_refs(&self) -> u64 {
        self.frames.values().map(|f| f.refs).sum()
    }

    /// Bytes of bookkeeping, for the profit figure.
    pub(crate) fn metadata_bytes(&self) -> u64 {
        (self.frames.len() * (std::mem::size_of::<(FrameNumber, SharedFrame)>() + 16)) as u64
    }
}
