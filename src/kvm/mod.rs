//! KVM (feature `kvm`): a VM whose memory slots are the regions of a
//! [`GuestMemory`], KVM's dirty log fetched into pagefold's dirty log
//! (`dirty_log.rs`), and vCPUs in real mode or directly in 64-bit mode with
//! a run loop and a migratable state (`vcpu.rs`).
//!
//! Lifetime rule: a KVM memory slot points at a region's host mapping by
//! address. The kernel VM (and with it every slot) lives as long as any of
//! its file descriptors: the VM fd and every vCPU fd. So [`KvmVm`] and every
//! [`KvmVcpu`] hold an `Arc<GuestMemory>` and close their fd before dropping
//! it (field order), which keeps the mappings alive for as long as the
//! kernel can reach them.
//!
//! Guest writes to pages the dedup host merged need nothing from this
//! module: a merged page is a private read-only view of its shared frame,
//! so KVM's own fault path copies it on the first write (no exit), and
//! merge windows hold a vCPU's store in the kernel with userfaultfd write
//! protection until they close (`DESIGN.md`, "kvm"; `tests/kvm_cow.rs`).

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VmFd};

mod dirty_log;
mod vcpu;

pub use vcpu::{
    Exit, Flow, KvmVcpu, LongMode, RunReport, VcpuFeatures, VcpuState, VcpuStateError,
    MIGRATED_MSRS,
};

use crate::{addr::PAGE_SIZE, dirty::DirtyError, memory::GuestMemory};

/// Errors of the KVM layer.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// An ioctl (or opening `/dev/kvm`) failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The memory has more regions than KVM has slots.
    #[error("{regions} regions but KVM offers {slots} memory slots")]
    TooManyRegions {
        /// Regions in the memory.
        regions: usize,
        /// Slots KVM offers.
        slots: usize,
    },
    /// Dirty logging needs one page-state entry per 4 KiB page (KVM logs at
    /// that granularity); this region's pages are larger.
    #[error("region {index}: dirty logging needs 4 KiB pages in the page-state table")]
    DirtyGranule {
        /// The region.
        index: usize,
    },
    /// Merging a KVM bitmap into the dirty log failed.
    #[error("merging KVM's dirty bitmap: {0}")]
    Dirty(#[from] DirtyError),
    /// The guest exited for a reason the runner does not handle.
    #[error("unhandled vCPU exit: {0}")]
    UnhandledExit(String),
    /// KVM would not load a model-specific register of a vCPU state (this
    /// host's KVM lacks it, or refused the value).
    #[error("KVM refused MSR {index:#x} of the vCPU state")]
    MsrRefused {
        /// The register's index.
        index: u32,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// Whether KVM can run a guest here: opens `/dev/kvm`, creates a VM and a
/// vCPU, and drops them. The error says why not (no `/dev/kvm`, no
/// permission, no virtualization), for a VMM or a test to report before it
/// falls back or skips.
pub fn probe() -> Result<(), KvmError> {
    let kvm = Kvm::new().map_err(ioctl("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
    Ok(())
}

/// Options of [`KvmVm::with_options`].
#[derive(Clone, Copy, Debug, Default)]
pub struct KvmOptions {
    /// Register every slot with `KVM_MEM_LOG_DIRTY_PAGES`, so
    /// [`KvmVm::fetch_dirty_log`] can fetch guest writes.
    pub log_dirty_pages: bool,
    /// Fetch with the legacy get-and-clear `KVM_GET_DIRTY_LOG` even where
    /// KVM offers manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`,
    /// used by default); for comparisons and tests.
    pub legacy_dirty_log: bool,
    /// With manual protection, also ask for `KVM_DIRTY_LOG_INITIALLY_SET`
    /// (slots start all-dirty, and every clear also write-protects the
    /// 2 MiB ranges it covers). It only pays where logging starts on a
    /// slot a guest already uses, which `KvmVm` never does; off by default
    /// (`benches/kvm_dirty_ratios.sh` measured fetches of 1000 dirty pages
    /// 1.1-1.6x dearer with it).
    pub dirty_log_initially_set: bool,
}

/// One memory slot: the region it maps.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u32,
    region: usize,
    size: u64,
}

/// A KVM VM whose memory slots are the regions of a [`GuestMemory`]
/// (slot `i` is region `i`).
#[derive(Debug)]
pub struct KvmVm {
    // Field order matters: `vm` drops (closing the VM fd) before `mem`.
    vm: VmFd,
    slots: Vec<Slot>,
    options: KvmOptions,
    dirty: dirty_log::DirtyLog,
    mem: Arc<GuestMemory>,
    kvm: Kvm,
}

impl KvmVm {
    /// A VM over `mem` with dirty logging on.
    pub fn new(mem: &Arc<GuestMemory>) -> Result<Self, KvmError> {
        Self::with_options(
            mem,
            KvmOptions {
                log_dirty_pages: true,
                ..KvmOptions::default()
            },
        )
    }

    /// A VM over `mem`: opens `/dev/kvm`, creates a VM and registers every
    /// region as a memory slot.
    pub fn with_options(mem: &Arc<GuestMemory>, options: KvmOptions) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(ioctl("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        let max_slots = usize::try_from(kvm.check_extension_int(Cap::NrMemslots)).unwrap_or(0);
        let regions = mem.regions();
        if regions.len() > max_slots {
            return Err(KvmError::TooManyRegions {
                regions: regions.len(),
                slots: max_slots,
            });
        }
        #[cfg(target_arch = "x86_64")]
        {
            // Intel needs a 3-page TSS region for real mode without
            // unrestricted guest; put it just below 4 GiB, where QEMU does.
            vm.set_tss_address(0xfffb_d000)
                .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        }
        // Before the slots: manual protection applies to slots added later.
        let dirty = dirty_log::DirtyLog::enable(&vm, &options)?;
        let mut slots = Vec::with_capacity(regions.len());
        for (index, region) in regions.iter().enumerate() {
            if options.log_dirty_pages && region.size() / PAGE_SIZE as u64 != region.pages() as u64
            {
                return Err(KvmError::DirtyGranule { index });
            }
            let info = region.info();
            let id = u32::try_from(index).map_err(|_| KvmError::TooManyRegions {
                regions: regions.len(),
                slots: max_slots,
            })?;
            let desc = kvm_userspace_memory_region {
                slot: id,
                flags: if options.log_dirty_pages {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: info.guest_start.0,
                memory_size: info.size,
                userspace_addr: info.host_addr.0,
            };
            // The slot points at region `index`'s host mapping, which lives
            // as long as `mem`. Slots do not overlap: regions do not
            // (checked by `GuestMemory`).
            // SAFETY: the returned `KvmVm` and its vCPUs hold an `Arc` of
            // `mem` and close their fds before dropping it (field order), so
            // the kernel reaches the mapping only while it exists.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
            slots.push(Slot {
                id,
                region: index,
                size: info.size,
            });
        }
        dirty.start(&vm, &slots, mem)?;
        Ok(KvmVm {
            vm,
            slots,
            options,
            dirty,
            mem: Arc::clone(mem),
            kvm,
        })
    }

    /// The guest memory behind the slots.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The VM fd, for ioctls this type does not wrap.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Creates vCPU `id` with KVM's supported CPUID (so the guest sees
    /// the host's features KVM can virtualize: SSE, AVX, XSAVE, ...).
    pub fn create_vcpu(&self, id: u64) -> Result<KvmVcpu, KvmError> {
        let fd = self.vm.create_vcpu(id).map_err(ioctl("KVM_CREATE_VCPU"))?;
        let mut features = VcpuFeatures::default();
        #[cfg(target_arch = "x86_64")]
        {
            let cpuid = self
                .kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
            // CPUID leaf 1, ECX: bit 26 XSAVE, bit 28 AVX.
            if let Some(leaf1) = cpuid.as_slice().iter().find(|e| e.function == 1) {
                features.xsave = leaf1.ecx & (1 << 26) != 0;
                features.avx = features.xsave && leaf1.ecx & (1 << 28) != 0;
            }
            fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        }
        Ok(KvmVcpu::new(fd, features, Arc::clone(&self.mem)))
    }
}
