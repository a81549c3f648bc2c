//! `KvmVm::adopt`: the VMM opens its own KVM VM (here with kvm-ioctls, as a
//! rust-vmm VMM does), hands pagefold the fd and the slot numbers it
//! chooses (5 and 9), registers a third region itself, and runs the guest
//! on its own vCPU; the guest's stores land in pagefold's memory and
//! `fetch_dirty_log` reports exactly the pages written through pagefold's
//! slots. Also: pagefold's vCPU on an adopted VM, slots added and removed
//! while the VM lives, the slots deleted when the `KvmVm` drops (the VMM's
//! VM lives on), and every typed error of a wrong assignment, with nothing
//! left registered after it. Skips, saying so, where `/dev/kvm` is absent
//! or unusable.
#![cfg(feature = "kvm")]
#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    os::fd::{AsRawFd, BorrowedFd},
    sync::Arc,
};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use pagefold::{
    kvm::{KvmError, KvmOptions, KvmVm, RegionRef, SlotAssignment},
    DirtyRun, GuestMemory, GuestPhysAddr, RegionSet, PAGE_SIZE,
};

const CODE: u64 = 0x8000;
const PAGE: u64 = PAGE_SIZE as u64;

/// Region 0 (code), region 1, region 2 (registered by the VMM itself).
const LAYOUT: [(GuestPhysAddr, u64); 3] = [
    (GuestPhysAddr(0), 0x10000),
    (GuestPhysAddr(0x10000), 0x10000),
    (GuestPhysAddr(0x20000), 0x10000),
];

/// 16-bit real mode, every segment based at 0 except ES set by the guest.
const GUEST: &[u8] = &[
    0xb0, 0x42, // mov al, 0x42
    0xa2, 0x00, 0x10, // mov [0x1000], al        region 0, page 0x1000
    0xa2, 0xfe, 0x3f, // mov [0x3ffe], al        region 0, page 0x3000
    0xbb, 0x00, 0x10, // mov bx, 0x1000
    0x8e, 0xc3, // mov es, bx              ES base 0x10000
    0x26, 0xa2, 0x34, 0x02, // mov es:[0x0234], al     region 1, page 0x10000
    0x26, 0xa2, 0x08, 0xf0, // mov es:[0xf008], al     region 1, page 0x1f000
    0xbb, 0x00, 0x20, // mov bx, 0x2000
    0x8e, 0xc3, // mov es, bx              ES base 0x20000
    0x26, 0xa2, 0x10, 0x00, // mov es:[0x0010], al     region 2 (the VMM's slot)
    0xe6, 0x10, // out 0x10, al
    0xf4, // hlt
];

/// The pages the guest writes through pagefold's slots.
const WRITTEN: [u64; 4] = [0x1000, 0x3000, 0x10000, 0x1f000];

/// The VMM's side: its KVM, its VM (with the TSS real mode needs on
/// Intel, set by the VMM since `adopt` leaves the VM alone).
struct Vmm {
    vm: VmFd,
}

/// The VMM's VM, or why KVM is unusable here (`None` and a SKIP line).
fn vmm_or_skip(test: &str) -> Option<Vmm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP {test}: /dev/kvm does not exist");
        return None;
    }
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            println!("SKIP {test}: /dev/kvm is not usable: {e}");
            return None;
        }
    };
    let vm = match kvm.create_vm() {
        Ok(vm) => vm,
        Err(e) => {
            println!("SKIP {test}: KVM_CREATE_VM failed: {e}");
            return None;
        }
    };
    vm.set_tss_address(0xfffb_d000).unwrap();
    Some(Vmm { vm })
}

fn memory() -> Arc<GuestMemory> {
    let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
    mem.write(GuestPhysAddr(CODE), GUEST).unwrap();
    // Whatever the library log holds from loading the code goes; from
    // here on, only KVM's log feeds it.
    harvest_pages(&mem);
    mem
}

fn logging() -> KvmOptions {
    KvmOptions {
        log_dirty_pages: true,
        ..KvmOptions::default()
    }
}

fn vm_fd(vmm: &Vmm) -> BorrowedFd<'_> {
    // SAFETY: `vmm.vm` owns the fd and outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(vmm.vm.as_raw_fd()) }
}

/// `KvmVm::adopt` over the VMM's VM, under its contract: the fd is this
/// process's KVM VM, the slots are free and the VMM leaves them alone.
fn adopt(vmm: &Vmm, mem: &Arc<GuestMemory>, slots: &[SlotAssignment]) -> Result<KvmVm, KvmError> {
    // SAFETY: see above: the tests register none of pagefold's slot
    // numbers themselves while the `KvmVm` lives, and their own slots over
    // `mem` (region 2) hold an `Arc` of it (`VmmSlot`).
    unsafe { KvmVm::adopt(vm_fd(vmm), mem, slots, logging()) }
}

/// A slot the VMM registers itself over a region of `mem`, holding the
/// memory until it deletes the slot on drop.
struct VmmSlot<'a> {
    vm: &'a VmFd,
    desc: kvm_userspace_memory_region,
    _mem: Arc<GuestMemory>,
}

impl<'a> VmmSlot<'a> {
    fn new(vmm: &'a Vmm, mem: &Arc<GuestMemory>, region: usize, slot: u32) -> Self {
        let info = mem.regions()[region].info();
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: info.guest_start.0,
            memory_size: info.size,
            userspace_addr: info.host_addr.0,
        };
        // SAFETY: the slot maps the region's host mapping, which `_mem`
        // keeps until `drop` deletes the slot.
        unsafe { vmm.vm.set_user_memory_region(desc) }.unwrap();
        VmmSlot {
            vm: &vmm.vm,
            desc,
            _mem: Arc::clone(mem),
        }
    }
}

impl Drop for VmmSlot<'_> {
    fn drop(&mut self) {
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.desc
        };
        // SAFETY: deleting a slot reaches no memory.
        unsafe { self.vm.set_user_memory_region(gone) }.unwrap();
    }
}

/// Whether slot `slot` of the VMM's VM is free: registering a page of
/// fresh memory there succeeds (a slot in use with another size would be
/// refused), and the page is deleted again.
fn slot_is_free(vmm: &Vmm, slot: u32) -> bool {
    let page = vec![0u8; 2 * PAGE_SIZE];
    let aligned = (page.as_ptr() as u64 + PAGE - 1) & !(PAGE - 1);
    let desc = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: 0x1_0000_0000 + u64::from(slot) * PAGE,
        memory_size: PAGE,
        userspace_addr: aligned,
    };
    // SAFETY: the slot maps a page of `page`, deleted below before `page`
    // drops; no vCPU runs meanwhile.
    let free = unsafe { vmm.vm.set_user_memory_region(desc) }.is_ok();
    if free {
        let gone = kvm_userspace_memory_region {
            memory_size: 0,
            ..desc
        };
        // SAFETY: deleting a slot reaches no memory.
        unsafe { vmm.vm.set_user_memory_region(gone) }.unwrap();
    }
    free
}

fn harvest_pages(mem: &GuestMemory) -> BTreeSet<u64> {
    let mut runs: Vec<DirtyRun> = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    runs.iter()
        .flat_map(|r| (0..r.pages).map(move |i| r.start.0 + i * PAGE))
        .collect()
}

/// The VMM's own vCPU in real mode at `CODE`, every segment based at 0.
fn vmm_vcpu(vmm: &Vmm) -> VcpuFd {
    let vcpu = vmm.vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    vcpu
}

/// Runs the VMM's vCPU to `HLT`; returns its port writes.
fn run_to_halt(vcpu: &mut VcpuFd) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => out.push((port, data.to_vec())),
            Ok(VcpuExit::Hlt) => return out,
            Ok(VcpuExit::Intr) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
}

fn check_memory(mem: &GuestMemory) {
    for gpa in [0x1000, 0x3ffe, 0x10234, 0x1f008, 0x20010] {
        assert_eq!(
            mem.read_obj::<u8>(GuestPhysAddr(gpa)).unwrap(),
            0x42,
            "guest store at {gpa:#x}"
        );
    }
}

#[test]
fn adopted_vm_runs_the_vmms_vcpu_and_logs_exactly_the_written_pages() {
    let test = "kvm_adopt vmm vcpu";
    let Some(vmm) = vmm_or_skip(test) else { return };
    let mem = memory();
    let vm = adopt(
        &vmm,
        &mem,
        &[
            SlotAssignment::index(0, 5),
            SlotAssignment::starting_at(GuestPhysAddr(0x10000), 9),
        ],
    )
    .unwrap();
    assert!(vm.is_adopted());
    assert_eq!(
        vm.slots(),
        vec![(5, GuestPhysAddr(0)), (9, GuestPhysAddr(0x10000))]
    );
    // Region 2 is the VMM's: pagefold left it alone, the VMM maps it.
    let own = VmmSlot::new(&vmm, &mem, 2, 0);

    let mut vcpu = vmm_vcpu(&vmm);
    let ports = run_to_halt(&mut vcpu);
    assert_eq!(ports, vec![(0x10, vec![0x42])]);
    check_memory(&mem);

    let reported = vm.fetch_dirty_log().unwrap();
    let dirty = harvest_pages(&mem);
    println!(
        "{test}: manual protect {}, KVM reported {reported} pages: {dirty:#x?}",
        vm.manual_dirty_log_protect()
    );
    assert_eq!(dirty, BTreeSet::from(WRITTEN), "exactly the written pages");
    assert_eq!(reported, WRITTEN.len() as u64);
    assert_eq!(vm.fetch_dirty_log().unwrap(), 0, "nothing written since");

    // Dropping the `KvmVm` deletes slots 5 and 9 (the VMM's VM lives on)
    // and gives back its `Arc` of the memory.
    drop(vm);
    drop(own);
    drop(vcpu);
    assert_eq!(Arc::strong_count(&mem), 1, "no Arc of the memory kept");
    assert!(slot_is_free(&vmm, 5), "slot 5 deleted on drop");
    assert!(slot_is_free(&vmm, 9), "slot 9 deleted on drop");
    // The VM still takes slots: adopt it again.
    let again = adopt(&vmm, &mem, &[SlotAssignment::index(0, 5)]).unwrap();
    assert_eq!(again.slots(), vec![(5, GuestPhysAddr(0))]);
}

#[test]
fn pagefolds_vcpu_runs_on_an_adopted_vm() {
    let test = "kvm_adopt pagefold vcpu";
    let Some(vmm) = vmm_or_skip(test) else { return };
    let mem = memory();
    let vm = adopt(
        &vmm,
        &mem,
        &[
            SlotAssignment::index(0, 5),
            SlotAssignment::index(1, 9),
            SlotAssignment::index(2, 11),
        ],
    )
    .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.setup_real_mode(GuestPhysAddr(CODE)).unwrap();
    let mut ports = Vec::new();
    vcpu.run_until_halt(|port, data| ports.push((port, data.to_vec())))
        .unwrap();
    assert_eq!(ports, vec![(0x10, vec![0x42])]);
    check_memory(&mem);
    vm.fetch_dirty_log().unwrap();
    let mut want = BTreeSet::from(WRITTEN);
    want.insert(0x20000);
    assert_eq!(harvest_pages(&mem), want);
}

#[test]
fn slots_are_added_and_removed_while_the_vm_lives() {
    let test = "kvm_adopt hotplug";
    let Some(vmm) = vmm_or_skip(test) else { return };
    let mem = memory();
    // Only the code region at first, plus the VMM's region 2.
    let vm = adopt(&vmm, &mem, &[SlotAssignment::index(0, 5)]).unwrap();
    let _own = VmmSlot::new(&vmm, &mem, 2, 0);
    // Hotplug region 1.
    vm.add_slot(SlotAssignment::index(1, 9)).unwrap();
    assert_eq!(
        vm.slots(),
        vec![(5, GuestPhysAddr(0)), (9, GuestPhysAddr(0x10000))]
    );
    match vm.add_slot(SlotAssignment::index(1, 12)) {
        Err(KvmError::RegionTwice { index: 1 }) => {}
        other => panic!("want RegionTwice, got {other:?}"),
    }
    match vm.add_slot(SlotAssignment::index(2, 9)) {
        Err(KvmError::SlotTwice { slot: 9 }) => {}
        other => panic!("want SlotTwice, got {other:?}"),
    }

    let mut vcpu = vmm_vcpu(&vmm);
    run_to_halt(&mut vcpu);
    check_memory(&mem);

    // Unplug region 1: the pages the guest wrote there come into
    // pagefold's log with the removal, before any fetch.
    vm.remove_slot(9).unwrap();
    assert_eq!(harvest_pages(&mem), BTreeSet::from([0x10000, 0x1f000]));
    assert!(slot_is_free(&vmm, 9), "slot 9 deleted");
    match vm.remove_slot(9) {
        Err(KvmError::NoSuchSlot { slot: 9 }) => {}
        other => panic!("want NoSuchSlot, got {other:?}"),
    }
    vm.fetch_dirty_log().unwrap();
    assert_eq!(harvest_pages(&mem), BTreeSet::from([0x1000, 0x3000]));
    // Plugged again, in another slot.
    vm.add_slot(SlotAssignment::index(1, 7)).unwrap();
    assert_eq!(
        vm.slots(),
        vec![(5, GuestPhysAddr(0)), (7, GuestPhysAddr(0x10000))]
    );
}

/// A region plugged after the VM was made (it is not in the memory the
/// VM holds) gets a slot of its own: the guest writes it, KVM's dirty bits
/// land in the region's log, and dropping the VM deletes the slot and
/// lets the region go.
#[test]
fn a_region_plugged_after_the_vm_was_made_gets_a_slot() {
    let test = "kvm_adopt region hotplug";
    let Some(vmm) = vmm_or_skip(test) else { return };
    let full = memory();
    // The VM is made over the memory without region 1, as before a plug.
    let (base, plugged) = full.remove_region(GuestPhysAddr(0x10000), 0x10000).unwrap();
    let base = Arc::new(base);
    let vm = adopt(&vmm, &base, &[SlotAssignment::index(0, 5)]).unwrap();
    let _own = VmmSlot::new(&vmm, &full, 2, 0);
    vm.add_region_slot(&plugged, 9).unwrap();
    assert_eq!(
        vm.slots(),
        vec![(5, GuestPhysAddr(0)), (9, GuestPhysAddr(0x10000))]
    );
    match vm.add_region_slot(&plugged, 12) {
        Err(KvmError::RegionSlotted { start }) => assert_eq!(start, GuestPhysAddr(0x10000)),
        other => panic!("want RegionSlotted, got {other:?}"),
    }
    match vm.add_region_slot(&plugged, 5) {
        Err(KvmError::SlotTwice { slot: 5 }) => {}
        other => panic!("want SlotTwice, got {other:?}"),
    }

    let mut vcpu = vmm_vcpu(&vmm);
    run_to_halt(&mut vcpu);
    check_memory(&full);
    vm.fetch_dirty_log().unwrap();
    assert_eq!(harvest_pages(&full), BTreeSet::from(WRITTEN));

    let held = Arc::strong_count(&plugged);
    drop(vm);
    assert!(
        slot_is_free(&vmm, 9),
        "the plugged region's slot deleted on drop"
    );
    assert_eq!(
        Arc::strong_count(&plugged),
        held - 1,
        "the VM let the region go"
    );
}

/// With `KVM_DIRTY_LOG_INITIALLY_SET` an adopted slot's clear could drop a
/// store of a vCPU already running, so every page of it goes into
/// pagefold's log once instead.
#[test]
fn initially_set_on_an_adopted_vm_reports_every_page_once() {
    let test = "kvm_adopt initially set";
    let Some(vmm) = vmm_or_skip(test) else { return };
    let mem = memory();
    let options = KvmOptions {
        log_dirty_pages: true,
        legacy_dirty_log: false,
        dirty_log_initially_set: true,
    };
    // SAFETY: as in `adopt`.
    let vm = unsafe {
        KvmVm::adopt(
            vm_fd(&vmm),
            &mem,
            &[SlotAssignment::index(0, 5), SlotAssignment::index(1, 9)],
            options,
        )
    }
    .unwrap();
    if !vm.dirty_log_initially_set() {
        println!("{test}: this KVM does not offer KVM_DIRTY_LOG_INITIALLY_SET; nothing to check");
        return;
    }
    let all: BTreeSet<u64> = (0..0x20000 / PAGE).map(|i| i * PAGE).collect();
    assert_eq!(harvest_pages(&mem), all, "every page of both slots once");
    assert_eq!(vm.fetch_dirty_log().unwrap(), 0);
    let mut vcpu = vmm_vcpu(&vmm);
    let _own = VmmSlot::new(&vmm, &mem, 2, 0);
    run_to_halt(&mut vcpu);
    vm.fetch_dirty_log().unwrap();
    assert_eq!(harvest_pages(&mem), BTreeSet::from(WRITTEN));
}

#[test]
fn wrong_assignments_are_typed_errors_and_leave_nothing_registered() {
    let test = "kvm_adopt errors";
    let Some(vmm) = vmm_or_skip(test) else { return };
    let mem = memory();
    let limit = u32::try_from(vmm.vm.check_extension_int(kvm_ioctls::Cap::NrMemslots)).unwrap();
    println!("{test}: the VM offers {limit} memory slots");

    let err = |slots: &[SlotAssignment]| adopt(&vmm, &mem, slots).err();
    match err(&[SlotAssignment::index(0, 5), SlotAssignment::index(1, limit)]) {
        Some(KvmError::SlotOutOfRange { slot, limit: l }) => {
            assert_eq!((slot, l), (limit, limit));
        }
        other => panic!("want SlotOutOfRange, got {other:?}"),
    }
    match err(&[SlotAssignment::index(0, 5), SlotAssignment::index(1, 5)]) {
        Some(KvmError::SlotTwice { slot: 5 }) => {}
        other => panic!("want SlotTwice, got {other:?}"),
    }
    match err(&[
        SlotAssignment::index(1, 5),
        SlotAssignment::starting_at(GuestPhysAddr(0x10000), 6),
    ]) {
        Some(KvmError::RegionTwice { index: 1 }) => {}
        other => panic!("want RegionTwice, got {other:?}"),
    }
    match err(&[SlotAssignment::index(3, 5)]) {
        Some(KvmError::NoRegionIndex {
            index: 3,
            regions: 3,
        }) => {}
        other => panic!("want NoRegionIndex, got {other:?}"),
    }
    match err(&[SlotAssignment {
        region: RegionRef::Start(GuestPhysAddr(0x11000)),
        slot: 5,
    }]) {
        Some(KvmError::NoRegionAt { start }) => assert_eq!(start, GuestPhysAddr(0x11000)),
        other => panic!("want NoRegionAt, got {other:?}"),
    }
    // Typed errors come before the VM is touched: slot 5 is free.
    assert!(slot_is_free(&vmm, 5));

    // A slot KVM refuses (slot 3 is the VMM's, mapping region 2: region 1
    // there would change the slot's memory, which KVM does not allow):
    // the error names the ioctl, and slot 5, registered before it, is
    // deleted again.
    let own = VmmSlot::new(&vmm, &mem, 2, 3);
    match err(&[SlotAssignment::index(0, 5), SlotAssignment::index(1, 3)]) {
        Some(KvmError::Ioctl { op, source }) => {
            println!("{test}: KVM refused slot 3: {op}: {source}");
            assert_eq!(op, "KVM_SET_USER_MEMORY_REGION");
        }
        other => panic!("want the ioctl's error, got {other:?}"),
    }
    assert!(slot_is_free(&vmm, 5), "slot 5 deleted after the failure");
    drop(own);
    assert_eq!(Arc::strong_count(&mem), 1);

    // Not a KVM fd at all (a pipe: `KVM_CHECK_EXTENSION` fails with
    // ENOTTY there, before anything else is asked of it).
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds `pipe` writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: `fds[0]` is open until closed below. The contract's first
    // point is broken on purpose: with a pipe, the one ioctl issued
    // (`KVM_CHECK_EXTENSION`, `_IO(0xAE, 3)`) fails with ENOTTY.
    let r = unsafe {
        KvmVm::adopt(
            BorrowedFd::borrow_raw(fds[0]),
            &mem,
            &[SlotAssignment::index(0, 5)],
            logging(),
        )
    };
    match r {
        Err(KvmError::Ioctl { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOTTY));
        }
        other => panic!("want ENOTTY, got {other:?}"),
    }
    for fd in fds {
        // SAFETY: the test's own fds, closed once.
        unsafe { libc::close(fd) };
    }
}
