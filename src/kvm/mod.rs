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
mod error;
mod options;
mod slot;
mod vcpu;

pub use error::KvmError;
pub use options::KvmOptions;

pub use vcpu::{
    Exit, Flow, KvmVcpu, LongMode, RunReport, VcpuFeatures, VcpuState, VcpuStateError,
    MIGRATED_MSRS,
};

use self::{error::ioctl, slot::Slot};
use crate::{addr::PAGE_SIZE, memory::GuestMemory};

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

/// A KVM VM whose memory slots are the regions of a [`GuestMemory`]
/// (slot `i` is region `i`).
#[derive(Debug)]
pub struct KvmVm {
    // Field order matters: `vm` drops (closing the VM fd) before `mem`.
    vm: VmFd,
    slots: Vec<Slot>,
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

    /// Fetches KVM's dirty log of every slot and ORs it into pagefold's
    /// dirty log ([`GuestMemory::merge_dirty_bitmap`]); take the pages with
    /// [`GuestMemory::harvest_dirty`]. Returns the number of pages KVM
    /// reported: those the guest wrote since the previous fetch (the first
    /// fetch: since the VM was created), each once however often it was
    /// written. Does nothing (returns 0) without `log_dirty_pages`.
    ///
    /// With manual protection (see [`Self::manual_dirty_log_protect`]) each
    /// slot costs `KVM_GET_DIRTY_LOG` (a copy of KVM's bitmap into a buffer
    /// kept between fetches) and, if anything was dirty, one
    /// `KVM_CLEAR_DIRTY_LOG` of exactly the bits fetched, which re-arms
    /// tracking of those pages. The clear happens before the bits reach
    /// pagefold's log, so a harvest (on any thread) that reports a page
    /// starts after KVM re-armed it: a guest write the harvest's copy could
    /// miss sets the page's bit again and comes with the next fetch. The
    /// full argument is in the module documentation (`src/kvm/dirty_log.rs`).
    ///
    /// Fetches are serialised (the buffers sit behind a lock). On an error
    /// nothing fetched is lost: bits already cleared in KVM are merged
    /// before the error returns, bits not cleared come again next time.
    pub fn fetch_dirty_log(&self) -> Result<u64, KvmError> {
        // Without `log_dirty_pages` the log's mode is off: it fetches nothing.
        self.dirty.fetch(&self.vm, &self.slots, &self.mem)
    }

    /// Whether fetches use manual protection (`KVM_GET_DIRTY_LOG` then
    /// `KVM_CLEAR_DIRTY_LOG`); `false` for the legacy get-and-clear or with
    /// dirty logging off.
    pub fn manual_dirty_log_protect(&self) -> bool {
        self.dirty.is_manual()
    }

    /// Whether KVM's slots started all-dirty (`KVM_DIRTY_LOG_INITIALLY_SET`,
    /// cleared when the VM was created; fetches report the same either way).
    pub fn dirty_log_initially_set(&self) -> bool {
        self.dirty.initially_set()
    }
}
