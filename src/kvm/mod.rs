//! KVM (feature `kvm`): a VM whose memory slots are regions of a
//! [`GuestMemory`] — one pagefold creates (slot `i` is region `i`) or the
//! VMM's own, adopted with the slot numbers it chooses
//! ([`KvmVm::adopt`]) — KVM's dirty log fetched into pagefold's dirty log
//! (`dirty_log.rs`), and vCPUs in real mode or directly in 64-bit mode with
//! a run loop and a migratable state (`vcpu.rs`), and the VM-wide state a
//! snapshot carries beside them: kvmclock, in-kernel irqchip and PIT
//! (`vm_state.rs`). The public API carries
//! no kvm-ioctls or kvm-bindings type (fds go out as [`BorrowedFd`],
//! registers as pagefold's [`Regs`], vCPU state as bytes, VM state as
//! [`snapshot::VmState`](crate::snapshot::VmState)), so a VMM
//! linking other versions of those crates still builds.
//!
//! Lifetime rule: a KVM memory slot points at a region's host mapping by
//! address. The kernel VM (and with it every slot) lives as long as any of
//! its file descriptors: the VM fd and every vCPU fd. So [`KvmVm`] and every
//! [`KvmVcpu`] hold an `Arc<GuestMemory>` and close their fd before dropping
//! it (field order), which keeps the mappings alive for as long as the
//! kernel can reach them. An adopted VM outlives pagefold's fds (the VMM
//! holds its own), so its `KvmVm` deletes the slots it registered before
//! it drops its `Arc` (and keeps the memory mapped for good if KVM refused
//! a delete); what the VMM must not do meanwhile is in
//! [`KvmVm::adopt`]'s `# Safety`.
//!
//! Guest writes to pages the dedup host merged need nothing from this
//! module: a merged page is a private read-only view of its shared frame,
//! so KVM's own fault path copies it on the first write (no exit), and
//! merge windows hold a vCPU's store in the kernel with userfaultfd write
//! protection until they close (`DESIGN.md`, "kvm"; `tests/kvm_cow.rs`).

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use kvm_bindings::{KVM_CAP_NR_MEMSLOTS, KVM_CAP_XSAVE2};
use kvm_ioctls::{Kvm, VmFd};

mod dirty_log;
mod error;
mod options;
mod regs;
mod slot;
mod sys;
mod vcpu;
#[cfg(target_arch = "x86_64")]
mod vm_state;

pub use error::KvmError;
pub use options::KvmOptions;
pub use regs::{ControlRegs, DebugRegs, Regs};
pub use slot::{RegionRef, SlotAssignment};
pub use vcpu::{
    Exit, Flow, KvmVcpu, LongMode, RunReport, VcpuFeatures, VcpuState, VcpuStateError,
    MIGRATED_MSRS,
};
#[cfg(target_arch = "x86_64")]
pub use vm_state::ClockRestore;

use self::{
    dirty_log::{DirtyLog, LoggedSlot},
    error::ioctl,
    slot::Slot,
};
use crate::{
    addr::GuestPhysAddr,
    memory::{GuestMemory, GuestRegion},
};

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

/// The kernel VM behind a [`KvmVm`].
#[derive(Debug)]
enum Vm {
    /// pagefold opened `/dev/kvm` and created the VM.
    Own { vm: VmFd, kvm: Kvm },
    /// The VMM's VM: pagefold's duplicate of its fd.
    Adopted(OwnedFd),
}

/// A KVM VM whose memory slots map regions of a [`GuestMemory`]: one
/// pagefold creates ([`new`](Self::new), slot `i` is region `i`) or the
/// VMM's own ([`adopt`](Self::adopt), slot numbers of its choosing).
#[derive(Debug)]
pub struct KvmVm {
    // Field order matters: `vm` drops (closing pagefold's VM fd) before
    // `mem`; an adopted VM's slots are deleted first, in `Drop`.
    vm: Vm,
    /// The slots pagefold registered, with their dirty-log buffers (the
    /// lock also serialises fetches and slot changes).
    slots: Mutex<Vec<LoggedSlot>>,
    /// `KVM_CAP_NR_MEMSLOTS` of the VM.
    max_slots: u32,
    dirty: DirtyLog,
    mem: Arc<GuestMemory>,
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
    /// region as a memory slot (slot `i` is region `i`).
    pub fn with_options(mem: &Arc<GuestMemory>, options: KvmOptions) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(ioctl("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        let max_slots = max_slots(vm_borrow(&vm))?;
        let regions = mem.regions().len();
        if regions > max_slots as usize {
            return Err(KvmError::TooManyRegions {
                regions,
                slots: max_slots as usize,
            });
        }
        #[cfg(target_arch = "x86_64")]
        {
            // Intel needs a 3-page TSS region for real mode without
            // unrestricted guest; put it just below 4 GiB, where QEMU does.
            vm.set_tss_address(0xfffb_d000)
                .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        }
        let assignments: Vec<SlotAssignment> = (0..regions)
            .map(|i| SlotAssignment::index(i, u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        let dirty = DirtyLog::enable(vm_borrow(&vm), &options)?;
        let this = KvmVm {
            vm: Vm::Own { vm, kvm },
            slots: Mutex::new(Vec::new()),
            max_slots,
            dirty,
            mem: Arc::clone(mem),
        };
        this.add_slots(&assignments, false)?;
        Ok(this)
    }

    /// Registers regions of `mem` as memory slots of the VMM's own KVM VM
    /// `vm_fd`, in the slot numbers `slots` gives (a region no assignment
    /// names stays the VMM's business: it may register it itself, or
    /// leave it out). Opens no `/dev/kvm`, creates no VM, sets no TSS:
    /// the VM is the VMM's. pagefold keeps a duplicate of the fd.
    ///
    /// Dirty logging as [`with_options`](Self::with_options) sets it up:
    /// with `options.log_dirty_pages` the slots log dirty pages and
    /// [`fetch_dirty_log`](Self::fetch_dirty_log) fetches them; manual
    /// protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) is enabled where
    /// KVM offers it unless `options.legacy_dirty_log`. That capability is
    /// the VM's, not a slot's: a VMM that fetches the dirty log of slots
    /// of its own must then clear it with `KVM_CLEAR_DIRTY_LOG` (or adopt
    /// with `legacy_dirty_log`).
    ///
    /// Everything is checked before the VM is touched: a slot number at
    /// or past the VM's `KVM_CAP_NR_MEMSLOTS` ([`KvmError::SlotOutOfRange`]),
    /// a slot number or a region given twice ([`KvmError::SlotTwice`],
    /// [`KvmError::RegionTwice`]), a region not in `mem`
    /// ([`KvmError::NoRegionIndex`], [`KvmError::NoRegionAt`]). If KVM
    /// refuses a slot (its number is the VMM's already, or overlaps one),
    /// the slots registered before it are deleted again and the error
    /// returned.
    ///
    /// Dropping the `KvmVm` deletes the slots it registered (the VMM's VM
    /// lives on); vCPUs made by [`create_vcpu`](Self::create_vcpu) hold
    /// their own `Arc` of the memory.
    ///
    /// # Safety
    ///
    /// pagefold can no longer see every fd of the VM, so the VMM
    /// guarantees, for as long as the returned `KvmVm` lives:
    ///
    /// - `vm_fd` is a KVM VM fd (from `KVM_CREATE_VM`) created by this
    ///   process, not some other file;
    /// - the slot numbers in `slots` are free in the VM (in address space
    ///   0), and the VMM does not register, change or delete them (nor
    ///   those added by [`add_slot`](Self::add_slot)) through any fd of
    ///   the VM, nor turn `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` on or off;
    /// - the VMM registers no slot of its own over the host mappings of
    ///   `mem`'s regions unless it keeps an `Arc` of `mem` for as long as
    ///   that slot exists.
    ///
    /// Under these, every slot pointing at `mem`'s mappings is pagefold's,
    /// and pagefold deletes each before the mapping can go.
    pub unsafe fn adopt(
        vm_fd: BorrowedFd<'_>,
        mem: &Arc<GuestMemory>,
        slots: &[SlotAssignment],
        options: KvmOptions,
    ) -> Result<Self, KvmError> {
        let max_slots = max_slots(vm_fd)?;
        // Every typed error before the VM is touched.
        let mut planned: Vec<Slot> = Vec::with_capacity(slots.len());
        for a in slots {
            let s = slot::resolve(mem, a, max_slots, &planned, options.log_dirty_pages)?;
            planned.push(s);
        }
        let fd = vm_fd
            .try_clone_to_owned()
            .map_err(|source| KvmError::Ioctl {
                op: "dup of the VM fd",
                source,
            })?;
        let dirty = DirtyLog::enable(fd.as_fd(), &options)?;
        let this = KvmVm {
            vm: Vm::Adopted(fd),
            slots: Mutex::new(Vec::new()),
            max_slots,
            dirty,
            mem: Arc::clone(mem),
        };
        // On an error `this` drops, deleting what was registered.
        this.add_slots(slots, true)?;
        Ok(this)
    }

    /// Registers region `assignment.region` as slot `assignment.slot`
    /// while the VM runs (memory hotplug of a region the VM did not map
    /// yet), with the VM's dirty logging. The same checks and errors as
    /// [`adopt`](Self::adopt), against the slots registered now; a slot
    /// removed with [`remove_slot`](Self::remove_slot) may be added again.
    pub fn add_slot(&self, assignment: SlotAssignment) -> Result<(), KvmError> {
        self.add_slots(std::slice::from_ref(&assignment), true)
    }

    /// Deletes slot `slot` (one this VM registered) while the VM runs
    /// (memory unplug): the dirty pages KVM logged in it are fetched into
    /// pagefold's log first, so none is lost; after it returns the guest
    /// no longer reaches the region (an access is an MMIO exit).
    pub fn remove_slot(&self, slot: u32) -> Result<(), KvmError> {
        let mut table = self.table();
        let at = table
            .iter()
            .position(|l| l.slot.id == slot)
            .ok_or(KvmError::NoSuchSlot { slot })?;
        let vm = self.vm_fd();
        self.dirty.fetch(vm, std::slice::from_mut(&mut table[at]))?;
        slot::delete(vm, &table[at].slot)?;
        table.remove(at);
        Ok(())
    }

    /// Registers `region`, one the VM's memory did not have when the VM
    /// was made (memory hotplug: a region from
    /// [`GuestRegion::allocate`](crate::GuestRegion::allocate) or
    /// `GuestRegion::from_file`, put in the memory devices see with
    /// [`GuestMemory::insert_region`]), as slot `slot` while the VM runs,
    /// with the VM's dirty logging: KVM's dirty bits of the slot go into
    /// the region's own log. The VM holds the region until the slot is
    /// removed ([`remove_slot`](Self::remove_slot)) or the VM drops, which
    /// deletes it first (a pagefold-made VM too: its vCPUs' fds would keep
    /// the kernel VM, and the slot, alive past this handle).
    pub fn add_region_slot(&self, region: &Arc<GuestRegion>, slot: u32) -> Result<(), KvmError> {
        let mut table = self.table();
        let taken: Vec<Slot> = table.iter().map(|l| l.slot.clone()).collect();
        let s = slot::resolve_region(region, slot, self.max_slots, &taken, self.dirty.logs())?;
        self.register(&mut table, s, true)
    }

    /// The slots this VM registered: (slot number, start of the region it
    /// maps), in the order they were added.
    pub fn slots(&self) -> Vec<(u32, GuestPhysAddr)> {
        self.table()
            .iter()
            .map(|l| (l.slot.id, l.slot.region.start()))
            .collect()
    }

    /// Checks and registers `assignments`, in order; stops at the first
    /// error (what was registered before it stays). `vcpus_may_run`:
    /// whether a vCPU may write through a slot as soon as it exists (all
    /// but the creation of pagefold's own VM).
    fn add_slots(
        &self,
        assignments: &[SlotAssignment],
        vcpus_may_run: bool,
    ) -> Result<(), KvmError> {
        let mut table = self.table();
        for a in assignments {
            let taken: Vec<Slot> = table.iter().map(|l| l.slot.clone()).collect();
            let s = slot::resolve(&self.mem, a, self.max_slots, &taken, self.dirty.logs())?;
            self.register(&mut table, s, vcpus_may_run)?;
        }
        Ok(())
    }

    /// Registers checked slot `s` on the VM and tracks its dirty log; on
    /// an error nothing stays registered.
    fn register(
        &self,
        table: &mut Vec<LoggedSlot>,
        s: Slot,
        vcpus_may_run: bool,
    ) -> Result<(), KvmError> {
        let vm = self.vm_fd();
        // The slot points at region `s.region`'s host mapping, which lives
        // as long as the `Arc` the slot holds. Slots do not overlap each
        // other (regions of one memory do not: checked by `GuestMemory`;
        // one slot per region: `resolve`; KVM refuses an added region
        // overlapping a slot).
        // The slot stays registered at most as long as its entry in the
        // table, which holds the region: an entry leaves the table
        // only after its slot is deleted (`remove_slot`, `Drop`), or is
        // leaked if KVM refuses the delete; a VM pagefold created closes
        // its fd in `Drop` after deleting the slots of added regions (its
        // vCPUs hold the memory it was made with); the VMM touches none of
        // them (`adopt`'s contract).
        // SAFETY: the region outlives the slot (argued above); slots
        // do not overlap.
        unsafe { slot::register(vm, &s, self.dirty.logs()) }?;
        match self.dirty.track(vm, s.clone(), vcpus_may_run) {
            Ok(logged) => {
                table.push(logged);
                Ok(())
            }
            Err(e) => {
                // Not tracked: do not leave it registered.
                if slot::delete(vm, &s).is_err() {
                    std::mem::forget(s);
                    self.keep_memory_forever();
                }
                Err(e)
            }
        }
    }

    fn table(&self) -> MutexGuard<'_, Vec<LoggedSlot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Leaks one `Arc` of the memory: its mappings then stay for the
    /// life of the process, for a slot KVM would not delete.
    fn keep_memory_forever(&self) {
        std::mem::forget(Arc::clone(&self.mem));
    }

    /// The guest memory behind the slots.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Whether pagefold created the VM (`false`: adopted from the VMM).
    pub fn is_adopted(&self) -> bool {
        matches!(self.vm, Vm::Adopted(_))
    }

    /// The VM fd, for ioctls this type does not wrap (through the VMM's
    /// own KVM crate, whichever version it links). Do not register,
    /// change or delete the slots this type registered through it.
    pub fn vm_fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }

    /// Creates vCPU `id` with KVM's supported CPUID (so the guest sees
    /// the host's features KVM can virtualize: SSE, AVX, XSAVE, ...). On
    /// an adopted VM this opens `/dev/kvm` (for `KVM_GET_VCPU_MMAP_SIZE`
    /// and the supported CPUID); a VMM running its own vCPUs never calls
    /// it.
    pub fn create_vcpu(&self, id: u64) -> Result<KvmVcpu, KvmError> {
        let opened;
        let (kvm, vm) = match &self.vm {
            Vm::Own { vm, kvm } => (kvm, vm),
            Vm::Adopted(fd) => {
                let kvm = Kvm::new().map_err(ioctl("open /dev/kvm"))?;
                let dup = fd.try_clone().map_err(|source| KvmError::Ioctl {
                    op: "dup of the VM fd",
                    source,
                })?;
                let raw = std::os::fd::IntoRawFd::into_raw_fd(dup);
                // `raw` is a KVM VM fd (adopt's contract) this call owns
                // (just duplicated, handed over here).
                // SAFETY: the `VmFd` takes ownership of `raw` and closes it.
                let vm = unsafe { kvm.create_vmfd_from_rawfd(raw) }
                    .map_err(ioctl("KVM_GET_VCPU_MMAP_SIZE"))?;
                opened = (kvm, vm);
                (&opened.0, &opened.1)
            }
        };
        let fd = vm.create_vcpu(id).map_err(ioctl("KVM_CREATE_VCPU"))?;
        let mut features = VcpuFeatures::default();
        // At least the 4 KiB of `struct kvm_xsave`; asked after the vCPU
        // exists (the guest's XSTATE permissions are locked then).
        let xsave_size = sys::check_extension(self.vm_fd(), KVM_CAP_XSAVE2)
            .ok()
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(0)
            .max(4096);
        #[cfg(target_arch = "x86_64")]
        {
            let cpuid = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
            // CPUID leaf 1, ECX: bit 26 XSAVE, bit 28 AVX.
            if let Some(leaf1) = cpuid.as_slice().iter().find(|e| e.function == 1) {
                features.xsave = leaf1.ecx & (1 << 26) != 0;
                features.avx = features.xsave && leaf1.ecx & (1 << 28) != 0;
            }
            fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        }
        #[cfg(target_arch = "x86_64")]
        let saved_msrs = vcpu::msrs_to_save(
            kvm.get_msr_index_list()
                .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?
                .as_slice(),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let saved_msrs = Vec::new();
        Ok(KvmVcpu::new(
            fd,
            features,
            xsave_size,
            saved_msrs,
            Arc::clone(&self.mem),
        ))
    }
    /// The VM-wide state a restore needs beside the vCPUs: the guest's
    /// kvmclock (`KVM_GET_CLOCK`), and the in-kernel irqchip (master and
    /// slave PIC, IOAPIC: `KVM_GET_IRQCHIP`) and PIT (`KVM_GET_PIT2`)
    /// where the VM has them (`None` where it has not: KVM answers
    /// `ENXIO`; the VMM emulates them or has none). Any other refusal is an
    /// error naming the ioctl. Take it with the vCPUs stopped, beside
    /// their states ([`KvmVcpu::snapshot_state`]), for
    /// [`save_machine`](crate::snapshot::save_machine).
    #[cfg(target_arch = "x86_64")]
    pub fn vm_state(&self) -> Result<crate::snapshot::VmState, KvmError> {
        vm_state::read(self.vm_fd())
    }

    /// Loads a state taken by [`vm_state`](Self::vm_state) (here or on
    /// another host; from
    /// [`SnapshotReader::vm_state`](crate::snapshot::SnapshotReader::vm_state))
    /// with [`ClockRestore::Continue`]: the guest's clock goes on from the
    /// value saved.
    #[cfg(target_arch = "x86_64")]
    pub fn set_vm_state(&self, state: &crate::snapshot::VmState) -> Result<(), KvmError> {
        self.set_vm_state_with(state, ClockRestore::Continue)
    }

    /// Loads `state`: the irqchip's three chips, the PIT, then the clock
    /// as `clock` says; parts the state lacks keep this VM's values. Load
    /// it before the vCPUs run (with their states). Refused with a typed
    /// error before anything loads: an irqchip state where this VM has no
    /// in-kernel irqchip, or a PIT state where it has no in-kernel PIT
    /// ([`KvmError::Unsupported`] naming `KVM_CREATE_IRQCHIP` or
    /// `KVM_CREATE_PIT2`: create them as the source did, before the
    /// vCPUs), and [`ClockRestore::AdvanceByRealtime`] for a clock saved
    /// without a realtime reading. If KVM refuses a part, the VM's
    /// previous state is loaded back (as far as KVM takes it) and the
    /// error names the ioctl.
    #[cfg(target_arch = "x86_64")]
    pub fn set_vm_state_with(
        &self,
        state: &crate::snapshot::VmState,
        clock: ClockRestore,
    ) -> Result<(), KvmError> {
        vm_state::load(self.vm_fd(), state, clock)
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
        let mut table = self.table();
        self.dirty.fetch(self.vm_fd(), &mut table)
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

impl Drop for KvmVm {
    fn drop(&mut self) {
        // The VMM's VM outlives this, and a VM pagefold made lives as long
        // as its vCPUs' fds, which hold only the memory it was made with:
        // delete every slot of an adopted VM, and the slots of regions
        // added later on either, before the regions they hold can go. One
        // KVM would not delete keeps its memory mapped for good.
        let adopted = self.is_adopted();
        let table = std::mem::take(self.slots.get_mut().unwrap_or_else(PoisonError::into_inner));
        let vm = self.vm_fd();
        let mut refused = false;
        for l in &table {
            if adopted || l.slot.index.is_none() {
                refused |= slot::delete(vm, &l.slot).is_err();
            }
        }
        if refused {
            std::mem::forget(table);
            self.keep_memory_forever();
        }
    }
}

impl AsFd for KvmVm {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.vm {
            Vm::Own { vm, .. } => vm_borrow(vm),
            Vm::Adopted(fd) => fd.as_fd(),
        }
    }
}

impl AsRawFd for KvmVm {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// `vm`'s fd, borrowed for as long as `vm`.
fn vm_borrow(vm: &VmFd) -> BorrowedFd<'_> {
    // SAFETY: the raw fd is `vm`'s, open for as long as `vm` (and so the
    // returned borrow) lives.
    unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }
}

/// `KVM_CAP_NR_MEMSLOTS` of the VM: the slot numbers it takes (in address
/// space 0).
fn max_slots(vm: BorrowedFd<'_>) -> Result<u32, KvmError> {
    let n = sys::check_extension(vm, KVM_CAP_NR_MEMSLOTS).map_err(|e| match e {
        KvmError::Ioctl { source, .. } => KvmError::Ioctl {
            op: "KVM_CHECK_EXTENSION(KVM_CAP_NR_MEMSLOTS) on the VM fd",
            source,
        },
        other => other,
    })?;
    Ok(u32::try_from(n).unwrap_or(0))
}
