//! How a [`KvmVm`](super::KvmVm) is set up: dirty logging and its mode.

/// Options of [`KvmVm::with_options`](super::KvmVm::with_options).
#[derive(Clone, Copy, Debug, Default)]
pub struct KvmOptions {
    /// Register every slot with `KVM_MEM_LOG_DIRTY_PAGES`, so
    /// [`KvmVm::fetch_dirty_log`](super::KvmVm::fetch_dirty_log) can fetch guest writes.
    pub log_dirty_pages: bool,
    /// Fetch with the legacy get-and-clear `KVM_GET_DIRTY_LOG` even where
    /// KVM offers manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`,
    /// used by default); for comparisons and tests.
    pub legacy_dirty_log: bool,
    /// With manual protection, also ask for `KVM_DIRTY_LOG_INITIALLY_SET`
    /// (slots start all-dirty, and every clear also write-protects the
    /// 2 MiB ranges it covers). It only pays where logging starts on a
    /// slot a guest already uses, which `KvmVm` never does (and on an
    /// adopted VM or a slot added later, every page of the slot goes into
    /// pagefold's dirty log when it is registered, as a vCPU may write
    /// before the clear; `src/kvm/dirty_log.rs`); off by default
    /// (`benches/kvm_dirty_ratios.sh` measured fetches of 1000 dirty pages
    /// 1.1-1.6x dearer with it).
    pub dirty_log_initially_set: bool,
}
