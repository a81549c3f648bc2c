//! Other processes that map a VM's memory and must follow its merges: the
//! port through which the merge and unmerge protocols reach a VMM process
//! under the host service (`service::server` implements it over the
//! socket; the in-process host has none).
//!
//! The service maps each VM's memfd itself and runs the same windows on its
//! own view; a remote mapper adds, per window, write protection of the same
//! pages in its process (armed by the service through the process's own
//! userfaultfd), the same remaps there, acknowledged before any own frame
//! is punched, and the release of protection. A page whose state is private
//! is mapped shared at its own frame in every mapper, so the service's
//! view of it is the truth; a merged page may have been copied by the
//! kernel in the mapper, so only the mapper can restore it.

use crate::memory::GuestRegion;

/// Where one run of pages is remapped to in the mapper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RemoteTarget {
    /// A private copy-on-write view of the domain's shared frames at this
    /// byte offset of the shared memfd.
    Shared {
        /// Byte offset in the domain's shared-frame memfd.
        file_offset: u64,
    },
    /// Anonymous zeros.
    Zero,
}

/// A run of consecutive pages of one region and what they now map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RemoteRun {
    /// First page of the run (index in its region).
    pub(crate) first_page: u64,
    /// Pages in the run.
    pub(crate) pages: u64,
    /// What they map.
    pub(crate) target: RemoteTarget,
}

/// Why a remote mapper did not do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The mapper did not answer in time; the request was revoked before it
    /// took it, so it changed nothing.
    #[error("the VMM process did not answer within {millis} ms; its window was rolled back")]
    RolledBack {
        /// The deadline, in milliseconds.
        millis: u64,
    },
    /// The mapper ran out of kernel mappings (`vm.max_map_count`) and
    /// remapped none of the runs.
    #[error(
        "the VMM process's kernel mappings are used up (vm.max_map_count); nothing was remapped"
    )]
    MapLimit,
    /// The mapper is gone (its socket closed) or answered that it failed:
    /// what it maps is unknown, and the VM takes no more merges.
    #[error("the VMM process is lost: {0}")]
    Lost(String),
}

/// A process besides the host that maps a VM's memory.
pub(crate) trait RemoteMapper: Send + Sync {
    /// Arms write protection on pages `[first, first + count)` of region
    /// `region` in the mapper: its writers wait from now on.
    fn protect(&self, region: usize, first: usize, count: usize) -> Result<(), RemoteError>;
    /// Remaps `runs` of region `region` in the mapper; `Ok` once it has
    /// remapped every one, `Err` when it remapped none.
    fn remap(&self, region: usize, runs: &[RemoteRun]) -> Result<(), RemoteError>;
    /// Whether the mapper may hold the only copy of a merged page (its
    /// merged pages are copy-on-write views, and the kernel copies there):
    /// then [`restore`](Self::restore) copies its bytes home, and the host
    /// must not. Otherwise (merged pages write-protected in every mapper)
    /// the shared frame is the truth and the host copies it home itself.
    fn holds_truth(&self) -> bool;
    /// Has the mapper map `runs` (`(first, pages)`) shared at their own
    /// frames again, first copying its bytes of them there if it
    /// [holds the truth](Self::holds_truth).
    fn restore(&self, region: usize, runs: &[(u64, u64)]) -> Result<(), RemoteError>;
    /// Disarms protection of the stretches `unprotect` (`(first, pages)`:
    /// the window's pages the mapper did not remap; remapped ones are fresh
    /// mappings, never protected) and wakes every writer waiting in
    /// `wake` (best effort: a lost mapper has no writers to wake).
    fn release(&self, region: usize, unprotect: &[(usize, usize)], wake: (usize, usize));
    /// Whether the mapper still takes merges.
    fn usable(&self) -> bool;
    /// Whether merged pages stay write-protected in the mapper for good
    /// (break-on-write): a release must then never unprotect a page that
    /// maps away from its own frame.
    fn keeps_merged_protected(&self) -> bool;
    /// Takes the mapper out of merging for good: the host's view of its
    /// memory can no longer be trusted to show its bytes.
    fn quarantine(&self);
}

/// A region with a remote mapper: what the merge windows consult.
#[derive(Clone, Copy)]
pub(super) struct RemoteRegion<'a> {
    pub(super) region: &'a GuestRegion,
    pub(super) index: usize,
    pub(super) mapper: &'a dyn RemoteMapper,
}

/// The remote mapper of `region` among `remotes`, if it has one.
pub(super) fn remote_of<'a>(
    remotes: &[RemoteRegion<'a>],
    region: &GuestRegion,
) -> Option<RemoteRegion<'a>> {
    remotes
        .iter()
        .find(|r| std::ptr::eq(r.region, region))
        .copied()
}
