//! What a dedup host holds: its frame store and userfaultfd, its VMs, the
//! scan's bookkeeping (domain keys, the hash each page left, the unstable
//! index, the incremental cursor) and the shared frames, with the ways
//! into them every stage shares (the merge context, the mapping budget,
//! unmerging a VM's pages).

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU64, Arc, Mutex, RwLock},
};

use super::{
    error::DedupError,
    key::DomainKey,
    merge::{self, MergeCtx},
    options::{DomainId, VmId},
    pagemap::PageMap,
    remote::RemoteRegion,
    shared::SharedFrames,
    unstable::Unstable,
    vm::VmEntry,
};
use crate::{frames::FrameStore, userfault::Userfault};

pub(super) struct ScanState {
    pub(super) keys: HashMap<DomainId, Arc<DomainKey>>,
    /// Hash of each page at its last visit, per VM and region: its top 32
    /// bits ([`scan::visit_hash`]), enough for the volatility rule (a page
    /// that changed yet kept them is merely compared, under protection, one
    /// visit early), at half the metadata of the whole hash.
    pub(super) old_hashes: HashMap<VmId, Vec<Vec<u32>>>,
    /// Pages seen once this full scan with no match yet (KSM's unstable tree).
    pub(super) unstable: Unstable,
    /// Where the incremental scan resumes: VM position, region, page.
    pub(super) cursor: (usize, usize, usize),
    pub(super) pagemap: PageMap,
    pub(super) volatile_this_scan: u64,
    pub(super) volatile_last_scan: u64,
}

impl ScanState {
    /// Bytes allocated for the scan's bookkeeping: the hash each page left
    /// and the unstable index.
    pub(super) fn metadata_bytes(&self) -> u64 {
        let hashes: usize = self
            .old_hashes
            .values()
            .flatten()
            .map(|r| r.capacity() * std::mem::size_of::<u32>())
            .sum();
        let unstable = self.unstable.allocated_bytes();
        (hashes + unstable) as u64
    }
}

pub(super) struct Inner {
    pub(super) store: Arc<FrameStore>,
    pub(super) uffd: Arc<Userfault>,
    pub(super) vms: RwLock<Vec<Arc<VmEntry>>>,
    pub(super) next_vm: AtomicU64,
    pub(super) scan: Mutex<ScanState>,
    pub(super) shared: Mutex<SharedFrames>,
    pub(super) full_scans: AtomicU64,
    pub(super) cow_breaks: AtomicU64,
    pub(super) map_limit_hits: AtomicU64,
    pub(super) faults_seen: AtomicU64,
    pub(super) background_errors: AtomicU64,
}

impl Inner {
    pub(super) fn ctx(&self) -> MergeCtx<'_> {
        MergeCtx {
            store: &self.store,
            uffd: &self.uffd,
            map_budget: self.store.map_budget(),
            fresh: &[],
            shared: &self.shared,
            remotes: &[],
        }
    }

    pub(super) fn refresh_map_budget(&self) {
        self.store.map_budget().refresh();
    }

    pub(super) fn unmerge_vm(&self, vm: &VmEntry) -> Result<u64, DedupError> {
        let mut n = 0;
        for (ri, r) in vm.mem.regions().iter().enumerate() {
            n += self.unmerge_pages(vm, ri, 0, r.pages())?.restored;
        }
        Ok(n)
    }

    pub(super) fn unmerge_pages(
        &self,
        vm: &VmEntry,
        region: usize,
        first: usize,
        count: usize,
    ) -> Result<merge::UnmergeOutcome, DedupError> {
        let r = &vm.mem.regions()[region];
        let remotes = remote_regions([vm]);
        let mut ctx = self.ctx();
        ctx.remotes = &remotes;
        merge::unmerge_range(&ctx, r, first, count)
    }
}

/// The regions of `vms` that another process maps too.
pub(super) fn remote_regions<'v>(
    vms: impl IntoIterator<Item = &'v VmEntry>,
) -> Vec<RemoteRegion<'v>> {
    vms.into_iter()
        .filter_map(|vm| vm.remote.as_deref().map(|m| (vm, m)))
        .flat_map(|(vm, mapper)| {
            vm.mem
                .regions()
                .iter()
                .enumerate()
                .map(move |(index, region)| RemoteRegion {
                    region,
                    index,
                    mapper,
                })
        })
        .collect()
}
