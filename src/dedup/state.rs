//! What a dedup host holds: its frame store and userfaultfd, its VMs, the
//! scan's bookkeeping (domain keys, the hash each page left, the unstable
//! index, the incremental cursor) and the shared frames, with the ways
//! into them every stage shares (the merge context, the mapping budget,
//! unmerging a VM's pages).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock, Weak,
    },
};

use super::{
    arriving::ArrivingImage,
    error::DedupError,
    key::DomainKey,
    locks::write,
    merge::{self, MergeCtx},
    options::{DomainId, VmId, VmOptions},
    pagemap::PageMap,
    remote::{RemoteMapper, RemoteRegion},
    shared::SharedFrames,
    unstable::Unstable,
    vm::VmEntry,
};
use crate::{addr::PageSize, frames::FrameStore, memory::GuestMemory, userfault::Userfault};

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
    /// The VMs restored folded from each snapshot (by its id) into each
    /// domain that may still be registered (`fold_in.rs`): what a restore
    /// plans its layout by. Entries of VMs gone are dropped by
    /// [`forget_clones_gone`](Self::forget_clones_gone), and a snapshot's
    /// entry with its last VM, so this holds no more than the VMs
    /// registered (found by review: counts and covers of every snapshot
    /// ever restored stayed for good, and a plan outlived its clones).
    pub(super) restored: HashMap<(DomainId, super::shared::Address), Vec<VmId>>,
    /// The pages each snapshot's clones in each domain map by content
    /// beside a partial image of the rest (`fold_in.rs`): runs of pages
    /// (first, count) in page order over all regions. Kept while a clone
    /// of the snapshot in the domain is registered (see `restored`).
    pub(super) covers: HashMap<(DomainId, super::shared::Address), Cover>,
    /// Images still arriving (`arriving.rs`) by domain and name, while a
    /// clone maps them: a clone restored lazily meanwhile maps the same.
    pub(super) arriving: HashMap<(DomainId, super::shared::Address), Weak<ArrivingImage>>,
}

/// Runs of pages (first, count) in page order over all regions: the pages
/// a snapshot's clones map by content beside a partial image.
pub(crate) type Cover = Arc<Vec<(usize, usize)>>;

impl ScanState {
    /// Drops from `restored` the VMs no longer registered (their hashes
    /// go when they are forgotten), and the entry and cover of a snapshot
    /// with none left in its domain: its plan ended with its last clone
    /// (its partial image's frames went with their last page), and a
    /// later clone plans anew on the budget as it is then.
    pub(super) fn forget_clones_gone(&mut self) {
        let live = &self.old_hashes;
        self.restored.retain(|_, vms| {
            vms.retain(|vm| live.contains_key(vm));
            !vms.is_empty()
        });
        let restored = &self.restored;
        self.covers.retain(|k, _| restored.contains_key(k));
        self.arriving.retain(|_, image| image.strong_count() > 0);
    }

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

impl ScanState {
    /// The hashing key of `domain`, made on its first use.
    pub(super) fn domain_key(&mut self, domain: DomainId) -> Result<Arc<DomainKey>, DedupError> {
        if let Some(key) = self.keys.get(&domain) {
            return Ok(Arc::clone(key));
        }
        let key = Arc::new(DomainKey::random().map_err(|e| DedupError::Random(e.to_string()))?);
        self.keys.insert(domain, Arc::clone(&key));
        Ok(key)
    }
}

impl Inner {
    /// Registers a VM (under the scan's lock, `scan`). Its memory may live
    /// in this host's frame store or in a store of its own (4 KiB pages).
    pub(super) fn add_vm(
        &self,
        scan: &mut ScanState,
        mem: Arc<GuestMemory>,
        options: VmOptions,
        remote: Option<Arc<dyn RemoteMapper>>,
        arriving: bool,
    ) -> Result<VmId, DedupError> {
        // A merged page's own frame is punched, and mapped back on unmerge:
        // anonymous memory has no frames.
        mem.frame_store().file("dedup")?;
        if mem.frame_store().granule() != PageSize::Size4K {
            return Err(DedupError::HugeBacking(mem.frame_store().granule()));
        }
        if let Some(&bad) = options
            .exclude
            .iter()
            .find(|a| !mem.regions().iter().any(|r| r.start() == **a))
        {
            return Err(DedupError::NoSuchRegion(bad));
        }
        // One host per memory: two would each think they own its pages.
        if !mem.claim_for_dedup() {
            return Err(DedupError::AlreadyRegistered);
        }
        if let Err(e) = scan.domain_key(options.domain) {
            // Leave the memory as it came: free for another host.
            mem.release_from_dedup();
            return Err(e);
        }
        let id = VmId(self.next_vm.fetch_add(1, Ordering::Relaxed));
        let included = mem
            .regions()
            .iter()
            .map(|r| !options.exclude.contains(&r.start()))
            .collect();
        let hashes = mem
            .regions()
            .iter()
            .map(|r| vec![0u32; r.pages()])
            .collect();
        scan.old_hashes.insert(id, hashes);
        write(&self.vms).push(Arc::new(VmEntry {
            id,
            mem,
            domain: options.domain,
            included,
            cow_breaks: AtomicU64::new(0),
            remote,
            arriving: std::sync::atomic::AtomicBool::new(arriving),
        }));
        Ok(id)
    }

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
        if vm.is_arriving() {
            return Err(DedupError::Arriving(vm.id));
        }
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
