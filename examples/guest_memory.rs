//! A VMM's first steps with pagefold: build guest memory with a PCI hole,
//! load a "kernel" into it, hand the regions to a hypervisor (printed here as
//! the `kvm_userspace_memory_region` fields a VMM would pass), let two
//! "vCPUs" update a shared counter with guest-style atomics, and see the
//! typed errors a bad guest address gets.
//!
//! Run with `cargo run --example guest_memory`.

use std::{
    error::Error,
    sync::{atomic::Ordering, Arc},
    thread,
};

use pagefold::{AccessError, GuestMemory, GuestPhysAddr};

fn main() -> Result<(), Box<dyn Error>> {
    // Low RAM below the PCI hole, high RAM above 4 GiB (small, for a demo).
    let mem = Arc::new(GuestMemory::new(&[
        (GuestPhysAddr(0), 64 << 20),
        (GuestPhysAddr(4 << 30), 32 << 20),
    ])?);

    // What KVM_SET_USER_MEMORY_REGION takes, slot by slot.
    for (slot, r) in mem.region_infos().iter().enumerate() {
        println!(
            "slot {slot}: guest_phys_addr={} memory_size={:#x} userspace_addr={} (memfd {} offset {:#x})",
            r.guest_start, r.size, r.host_addr, r.fd, r.file_offset
        );
    }

    // Load a "kernel image" at 1 MiB and a boot parameter block at 0x7000.
    let kernel: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    mem.write(GuestPhysAddr(0x10_0000), &kernel)?;
    mem.write_obj(GuestPhysAddr(0x7000), 0x5aa5_u16)?;
    let mut back = vec![0u8; kernel.len()];
    mem.read(GuestPhysAddr(0x10_0000), &mut back)?;
    assert_eq!(back, kernel);

    // Two vCPU threads bump one counter in guest memory.
    let counter = GuestPhysAddr(0x8000);
    let vcpus: Vec<_> = (0..2)
        .map(|_| {
            let mem = Arc::clone(&mem);
            thread::spawn(move || -> Result<(), AccessError> {
                for _ in 0..10_000 {
                    let mut cur = mem.load::<u64>(counter, Ordering::Acquire)?;
                    while let Err(now) = mem.compare_exchange(
                        counter,
                        cur,
                        cur + 1,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )? {
                        cur = now;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for v in vcpus {
        v.join().map_err(|_| "vCPU thread panicked")??;
    }
    println!("counter = {}", mem.load::<u64>(counter, Ordering::SeqCst)?);

    // A guest pointing into the PCI hole gets an error that names the address.
    match mem.read_obj::<u32>(GuestPhysAddr(0xfee0_0000)) {
        Err(e) => println!("guest read in the hole: {e}"),
        Ok(v) => println!("unexpected: read {v:#x}"),
    }
    println!(
        "the kernel holds {} KiB for this guest's {} MiB",
        mem.frame_store().allocated_bytes()? >> 10,
        mem.total_size() >> 20
    );
    Ok(())
}
