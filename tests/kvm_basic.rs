//! A tiny real-mode guest on KVM over pagefold's `GuestMemory` (two regions,
//! two memory slots): its stores land in guest memory, its port write
//! reaches the runner, and KVM's dirty log, fetched into pagefold's log,
//! names exactly the pages it wrote. Skips, saying so, where `/dev/kvm` is
//! absent or unusable.
#![cfg(feature = "kvm")]
#![cfg(target_arch = "x86_64")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use pagefold::{
    kvm::{KvmError, KvmVm},
    DirtyRun, GuestMemory, GuestPhysAddr, RegionSet, PAGE_SIZE,
};

const CODE: u64 = 0x8000;

/// 16-bit real mode, every segment based at 0 except ES set by the guest.
const GUEST: &[u8] = &[
    0xbb, 0x00, 0x10, // mov bx, 0x1000
    0x8e, 0xc3, // mov es, bx            (ES base 0x10000: region 1)
    0xb0, 0x42, // mov al, 0x42
    0xa2, 0x00, 0x10, // mov [0x1000], al      (region 0, page 0x1000)
    0x26, 0xa2, 0x34, 0x02, // mov es:[0x0234], al   (region 1, gpa 0x10234)
    0xe6, 0x10, // out 0x10, al
    0xf4, // hlt
];

/// The VM, or why KVM is unusable here (`None` and a SKIP line).
fn vm_or_skip(mem: &Arc<GuestMemory>) -> Option<KvmVm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP kvm_basic: /dev/kvm does not exist");
        return None;
    }
    match KvmVm::new(mem) {
        Ok(vm) => Some(vm),
        Err(e @ KvmError::Ioctl { op, .. }) if op == "open /dev/kvm" || op == "KVM_CREATE_VM" => {
            println!("SKIP kvm_basic: /dev/kvm is not usable: {e}");
            None
        }
        Err(e) => panic!("creating the VM: {e}"),
    }
}

fn dirty_pages(mem: &GuestMemory) -> Vec<u64> {
    let mut runs: Vec<DirtyRun> = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    runs.iter()
        .flat_map(|r| (0..r.pages).map(move |i| r.start.0 + i * PAGE_SIZE as u64))
        .collect()
}

#[test]
fn real_mode_guest_writes_memory_port_and_dirty_log() {
    let mem = Arc::new(
        GuestMemory::new(&[
            (GuestPhysAddr(0), 0x10000),
            (GuestPhysAddr(0x10000), 0x10000),
        ])
        .unwrap(),
    );
    mem.write(GuestPhysAddr(CODE), GUEST).unwrap();
    // Whatever the library log holds from loading the code goes; from here
    // on, only KVM's log feeds it.
    dirty_pages(&mem);

    let Some(vm) = vm_or_skip(&mem) else { return };
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.setup_real_mode(GuestPhysAddr(CODE)).unwrap();

    let mut port_writes: Vec<(u16, Vec<u8>)> = Vec::new();
    let report = vcpu
        .run_until_halt(|port, data| port_writes.push((port, data.to_vec())))
        .unwrap();
    println!("kvm_basic: guest halted after {report:?}, port writes {port_writes:x?}");

    assert_eq!(port_writes, vec![(0x10, vec![0x42])]);
    assert_eq!(mem.read_obj::<u8>(GuestPhysAddr(0x1000)).unwrap(), 0x42);
    assert_eq!(mem.read_obj::<u8>(GuestPhysAddr(0x10234)).unwrap(), 0x42);

    let reported = vm.fetch_dirty_log().unwrap();
    let dirty = dirty_pages(&mem);
    println!("kvm_basic: KVM reported {reported} dirty pages: {dirty:#x?}");
    assert!(dirty.contains(&0x1000), "page 0x1000 not in the dirty log");
    assert!(
        dirty.contains(&0x10000),
        "page 0x10000 not in the dirty log"
    );
    assert!(!dirty.contains(&0x2000), "untouched page 0x2000 logged");
    assert!(!dirty.contains(&CODE), "code page (only read) logged");

    // KVM_GET_DIRTY_LOG cleared KVM's log and the harvest cleared ours.
    assert_eq!(vm.fetch_dirty_log().unwrap(), 0);
    assert!(dirty_pages(&mem).is_empty());
}
