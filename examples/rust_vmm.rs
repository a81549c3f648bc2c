//! What a rust-vmm VMM (Firecracker- or cloud-hypervisor-style) changes to
//! run on pagefold, written against vm-memory's traits:
//!
//! 1. memory: the VMM's own memfd (as it makes it today, one file for
//!    all regions), mapped by pagefold (`GuestMemory::from_file`) where the
//!    VMM had `GuestMemoryMmap`, handed to devices as a `GuestAddressSpace`
//!    (`AtomicGuestMemory`, so regions can be plugged while devices run);
//! 2. devices: unchanged, generic over `GuestAddressSpace` (this one copies
//!    a backing file into guest buffers with `read_volatile_from`, as a
//!    block device does);
//! 3. KVM: the VMM's own VM fd, its own slot numbers (`KvmVm::adopt`);
//! 4. dedup: a `DedupHost` folds the memory while the device writes it;
//! 5. migration: device writes through vm-memory are in pagefold's dirty
//!    log, the one a pre-copy sender harvests.
//!
//! `cargo run --release --example rust_vmm`

use std::{
    error::Error,
    fs::File,
    io::{Seek, Write},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd},
    sync::Arc,
};

use pagefold::{
    memory::FileRegion, rust_vmm::AtomicGuestMemory, DedupHost, GuestMemory, GuestPhysAddr,
    GuestRegion, RegionSet,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const MIB: u64 = 1 << 20;

/// A device model as rust-vmm VMMs write them: generic over the address
/// space, it knows nothing of pagefold.
struct BlockLikeDevice<AS: GuestAddressSpace> {
    mem: AS,
    disk: File,
}

impl<AS: GuestAddressSpace> BlockLikeDevice<AS> {
    /// Reads `len` bytes of the disk at `sector_offset` into guest memory
    /// at `buf`, then writes a status byte after them, as a virtio-blk
    /// request completes.
    fn read_request(
        &mut self,
        sector_offset: u64,
        buf: u64,
        len: usize,
    ) -> Result<(), Box<dyn Error>> {
        let mem = self.mem.memory();
        self.disk.seek(std::io::SeekFrom::Start(sector_offset))?;
        mem.read_exact_volatile_from(GuestAddress(buf), &mut self.disk, len)?;
        mem.write_obj(0u8, GuestAddress(buf + len as u64))?;
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    // 1. Memory: the VMM's memfd: 64 MiB at 0 and 32 MiB at 4 GiB, and 16
    // MiB it keeps for a region to plug later (a region must lie in the
    // file as pagefold adopted it: pagefold's own frames go past its end).
    let guest_file = memfd_file("guest-ram")?;
    guest_file.set_len(112 * MIB)?;
    let mem = Arc::new(GuestMemory::from_file(
        guest_file.as_fd(),
        &[
            FileRegion {
                guest_start: GuestPhysAddr(0),
                size: 64 * MIB,
                file_offset: 0,
            },
            FileRegion {
                guest_start: GuestPhysAddr(4 << 30),
                size: 32 * MIB,
                file_offset: 64 * MIB,
            },
        ],
    )?);
    let space = AtomicGuestMemory::from(Arc::clone(&mem));

    // 5. Dirty tracking on before the device runs (what a pre-copy sender does).
    mem.set_dirty_tracking(RegionSet::All, true)?;
    mem.harvest_dirty(RegionSet::All, &mut Vec::new())?;

    // 2. A device over a "disk" holding the same 4 KiB block 256 times.
    let mut disk = memfd_file("disk")?;
    for i in 0..256u32 {
        let mut block = [0u8; 4096];
        block[..4].copy_from_slice(&(i % 8).to_le_bytes());
        disk.write_all(&block)?;
    }
    let mut dev = BlockLikeDevice {
        mem: space.clone(),
        disk,
    };
    for i in 0..256u64 {
        dev.read_request(i * 4096, 8 * MIB + i * 8192, 4096)?;
    }
    let mut runs = Vec::new();
    let dirty = mem.harvest_dirty(RegionSet::All, &mut runs)?;
    println!(
        "device wrote 256 requests; dirty log holds {dirty} pages in {} runs",
        runs.len()
    );

    // 3. KVM: the VMM opened its VM with its own kvm-ioctls (any version);
    // pagefold registers the regions as the slots the VMM chose.
    match kvm_ioctls::Kvm::new().and_then(|kvm| kvm.create_vm()) {
        Ok(vm_fd) => {
            // `vm_fd` is this process's KVM VM and stays open for
            // the call (adopt keeps a duplicate); slots 7 and 8 are free and
            // the VMM never touches them; the memory outlives the adopted
            // VM, which deletes its slots when dropped.
            // SAFETY: adopt's contract holds, as argued above.
            let kvm = unsafe {
                pagefold::kvm::KvmVm::adopt(
                    BorrowedFd::borrow_raw(vm_fd.as_raw_fd()),
                    &mem,
                    &[
                        pagefold::kvm::SlotAssignment::index(0, 7),
                        pagefold::kvm::SlotAssignment::index(1, 8),
                    ],
                    pagefold::kvm::KvmOptions {
                        log_dirty_pages: true,
                        ..Default::default()
                    },
                )?
            };
            println!(
                "KVM: pagefold's regions are the VMM's slots {:?}",
                kvm.slots()
            );
        }
        Err(e) => println!("KVM: skipped ({e})"),
    }

    // 4. Dedup: the 256 buffers hold 8 distinct blocks.
    let host = DedupHost::new(Arc::clone(mem.frame_store()))?;
    let vm = host.register(Arc::clone(&mem), Default::default())?;
    host.merge_now()?;
    host.merge_now()?;
    let s = host.vm_stats(vm)?;
    println!("dedup: {s:?}");
    // The device keeps writing merged pages: nothing is lost.
    dev.read_request(3 * 4096, 8 * MIB, 4096)?;
    let first: u32 = Bytes::read_obj(&*space.memory(), GuestAddress(8 * MIB))?;
    assert_eq!(first, 3);

    // Memory hotplug: a 16 MiB region at 8 GiB, swapped in while the
    // device holds the address space; dedup takes it as its own VM of the
    // same domain.
    let region = GuestRegion::from_file(
        mem.frame_store(),
        FileRegion {
            guest_start: GuestPhysAddr(8 << 30),
            size: 16 * MIB,
            file_offset: 96 * MIB,
        },
    )?;
    let plugged = space.memory().insert_region(Arc::clone(&region))?;
    space
        .lock()
        .map_err(|_| "address space lock poisoned")?
        .replace(plugged);
    dev.read_request(0, 8 << 30, 4096)?;
    let _plugged_vm = host.register(
        Arc::new(GuestMemory::from_regions(vec![region])?),
        Default::default(),
    )?;
    host.merge_now()?;
    println!("after hotplug: {:?}", host.stats()?);
    host.unmerge_all()?;
    Ok(())
}

/// An anonymous in-memory file (what a disk image would be).
fn memfd_file(name: &str) -> Result<File, Box<dyn Error>> {
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: `cname` is NUL-terminated and outlives the call; MFD_CLOEXEC
    // is a valid flag.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}
