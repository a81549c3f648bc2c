//! `pagefold demo`: the library's main job on built-in guests. Several VMs
//! share one frame store; each gets a PC-like layout (low RAM below a PCI
//! hole, the rest above 4 GiB), is filled with a mix of content (a "kernel"
//! image common to all VMs, zero pages, data of its own), read back and
//! verified, and partly released to the host. Every memory figure printed
//! comes from the kernel (the memfd's allocated blocks), not our counters.

use std::{error::Error, sync::Arc};

use pagefold::{FrameStore, GuestMemory, GuestPhysAddr, PAGE_SIZE};

const MIB: u64 = 1 << 20;
/// Where high RAM starts on a PC: above the 32-bit PCI hole.
const HIGH_RAM: u64 = 4 << 30;

/// Runs the demo with `vms` guests of `mib` MiB each.
pub(crate) fn run(vms: u32, mib: u64) -> Result<(), Box<dyn Error>> {
    if vms == 0 || mib < 4 {
        return Err("demo needs at least one VM of at least 4 MiB".into());
    }
    let store = Arc::new(FrameStore::memfd()?);
    let low = (mib * 3 / 4).max(2) * MIB;
    let high = mib * MIB - low;
    let mut layout = vec![(GuestPhysAddr(0), low)];
    if high > 0 {
        layout.push((GuestPhysAddr(HIGH_RAM), high));
    }
    println!("pagefold demo: {vms} VMs x {mib} MiB on one memfd frame store");
    println!(
        "layout per VM: {}",
        layout
            .iter()
            .map(|(s, l)| format!("[{s}, {:#x})", s.0 + l))
            .collect::<Vec<_>>()
            .join(" + ")
    );

    let mut guests = Vec::new();
    for vm in 0..vms {
        let mem = GuestMemory::with_store(Arc::clone(&store), &layout)?;
        fill_guest(&mem, vm)?;
        guests.push(mem);
    }
    println!(
        "after boot: {} MiB of guest RAM, kernel holds {} MiB for the store",
        u64::from(vms) * mib,
        store.allocated_bytes()? / MIB
    );

    for (vm, mem) in guests.iter().enumerate() {
        let sum = checksum(mem)?;
        let expect = expected_checksum(mem, vm_id(vm))?;
        if sum != expect {
            return Err(
                format!("VM {vm}: memory checksum {sum:#x} != expected {expect:#x}").into(),
            );
        }
        println!(
            "VM {vm}: {} regions, checksum {sum:016x} verified",
            mem.regions().len()
        );
        for info in mem.region_infos() {
            println!(
                "    gpa [{}, {:#x})  host {}  memfd {} @ {:#x}",
                info.guest_start,
                info.guest_start.0 + info.size,
                info.host_addr,
                info.fd,
                info.file_offset
            );
        }
    }

    // The guests' zero pages still hold memory: a VMM that knows a range is
    // free (a balloon, a zeroed DMA buffer) gives it back to the host.
    let before = store.allocated_bytes()?;
    let mut released = 0;
    for mem in &guests {
        released += mem.discard(GuestPhysAddr(low / 2), low / 4)?;
    }
    let after = store.allocated_bytes()?;
    println!(
        "released {released} pages ({} MiB) with punch hole: kernel holds {} MiB -> {} MiB",
        released * PAGE_SIZE as u64 / MIB,
        before / MIB,
        after / MIB
    );
    for (vm, mem) in guests.iter().enumerate() {
        let c = mem.census();
        println!(
            "VM {vm}: pages private {} zero {} shared {} ballooned {}",
            c.private, c.zero, c.shared, c.ballooned
        );
    }
    println!("released pages read as zeros; nothing reads them here, so they stay free");
    Ok(())
}

fn vm_id(vm: usize) -> u64 {
    vm as u64
}

/// Content of page `index` (counted over the whole layout) of VM `vm`: a
/// third identical across VMs, a third zero, a third unique.
fn page_pattern(vm: u64, index: u64, page: &mut [u8]) {
    match index % 3 {
        0 => page.fill(0),
        1 => {
            for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&(index * 0x9e37_79b9 + i as u64).to_le_bytes());
            }
        }
        _ => {
            for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
                let v = (vm << 48) ^ (index << 12) ^ i as u64;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

fn fill_guest(mem: &GuestMemory, vm: u32) -> Result<(), Box<dyn Error>> {
    let mut page = vec![0u8; PAGE_SIZE];
    let mut index = 0;
    for r in mem.regions() {
        for p in 0..r.size() / PAGE_SIZE as u64 {
            page_pattern(u64::from(vm), index, &mut page);
            if page.iter().any(|&b| b != 0) {
                mem.write(GuestPhysAddr(r.start().0 + p * PAGE_SIZE as u64), &page)?;
            }
            index += 1;
        }
    }
    Ok(())
}

fn checksum(mem: &GuestMemory) -> Result<u64, Box<dyn Error>> {
    let mut page = vec![0u8; PAGE_SIZE];
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    for r in mem.regions() {
        for p in 0..r.size() / PAGE_SIZE as u64 {
            mem.read(GuestPhysAddr(r.start().0 + p * PAGE_SIZE as u64), &mut page)?;
            sum = fold(sum, &page);
        }
    }
    Ok(sum)
}

fn expected_checksum(mem: &GuestMemory, vm: u64) -> Result<u64, Box<dyn Error>> {
    let mut page = vec![0u8; PAGE_SIZE];
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    let pages: u64 = mem
        .regions()
        .iter()
        .map(|r| r.size() / PAGE_SIZE as u64)
        .sum();
    for index in 0..pages {
        page_pattern(vm, index, &mut page);
        sum = fold(sum, &page);
    }
    Ok(sum)
}

/// FNV-1a over 8-byte words: enough to tell a wrong page from a right one.
fn fold(mut sum: u64, page: &[u8]) -> u64 {
    for chunk in page.chunks_exact(8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        sum = (sum ^ u64::from_le_bytes(w)).wrapping_mul(0x0100_0000_01b3);
    }
    sum
}
