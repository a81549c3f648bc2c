//! `pagefold demo`: the library's main job on built-in guests. Several VMs
//! share one frame store; each gets a PC-like layout (low RAM below a PCI
//! hole, the rest above 4 GiB), is filled with a mix of content (a "kernel"
//! image common to all VMs, zero pages, data of its own), read back and
//! verified, then folded by the dedup host (incremental scan with live
//! statistics, then a one-shot merge), written through copy-on-write, and
//! unmerged; part of one VM is ballooned (through the virtio queue's le32
//! payload and as a range) and partly deflated again. Memory figures come from the kernel (the memfd's allocated
//! blocks, RSS/PSS), not only from our counters. Last, VM 0 is live-migrated
//! in-process (pre-copy over an in-memory pipe with a bandwidth cap, a writer
//! thread dirtying it meanwhile) and the receiver is verified byte for byte.

use std::{
    error::Error,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use pagefold::{
    migration::{receive_migration, PrecopyOptions, ReaderLimits, Sender},
    Balloon, DedupHost, FrameStore, GuestMemory, GuestPhysAddr, ScanBudget, VmOptions, PAGE_SIZE,
};
use pagefold_tools::pipe::pipe;

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

    // Fold the VMs: a background-style incremental scan first (pages must
    // hash the same twice before they merge), with live statistics.
    let before_fold = store.allocated_bytes()?;
    let host = DedupHost::new(Arc::clone(&store))?;
    let guests: Vec<Arc<GuestMemory>> = guests.into_iter().map(Arc::new).collect();
    for mem in &guests {
        host.register(Arc::clone(mem), VmOptions::default())?;
    }
    let total_pages: u64 = guests
        .iter()
        .map(|m| m.total_size() / PAGE_SIZE as u64)
        .sum();
    println!(
        "dedup: incremental scan, {} pages per step",
        total_pages / 4
    );
    for step in 1..=8 {
        let r = host.scan_step(ScanBudget::Pages(total_pages / 4))?;
        let s = host.stats()?;
        println!(
            "  step {step}: scanned {:>6}, volatile {:>6}, shared {:>6}, sharing {:>6}, zero {:>6}, full scans {}, store {} MiB",
            r.pages_scanned,
            r.volatile,
            s.pages_shared,
            s.pages_sharing,
            s.zero_pages,
            s.full_scans,
            store.allocated_bytes()? / MIB
        );
        if s.full_scans >= 2 {
            break;
        }
    }
    let r = host.merge_now()?;
    let s = host.stats()?;
    let kv = host.kernel_view()?;
    println!(
        "merge_now: {} more pages shared, {} zero pages released in {:.1} ms ({} remaps)",
        r.merged_shared,
        r.merged_zero,
        (r.hash_nanos + r.group_nanos + r.merge_nanos) as f64 / 1e6,
        r.remaps
    );
    println!(
        "folded: {} shared frames serve {} more pages, {} zero pages released; profit {} MiB",
        s.pages_shared,
        s.pages_sharing,
        s.zero_pages,
        s.profit_bytes / MIB as i64
    );
    println!(
        "kernel: store holds {} MiB (was {} MiB), process RSS {} MiB, PSS {} MiB, {} mappings for guest memory",
        kv.store_bytes / MIB,
        before_fold / MIB,
        kv.rss_bytes / MIB,
        kv.pss_bytes / MIB,
        kv.guest_mappings
    );

    // A guest write to a merged page: the kernel copies it first, the other
    // VMs keep the shared bytes.
    let shared_page = GuestPhysAddr(PAGE_SIZE as u64);
    guests[0].write_obj(shared_page, 0xfeed_f00d_u64)?;
    let other: u64 = guests[1 % guests.len()].read_obj(shared_page)?;
    println!(
        "VM 0 wrote to a merged page: it reads {:#x}, VM {} still reads {:#x}; copy-on-write breaks so far: {}",
        guests[0].read_obj::<u64>(shared_page)?,
        1 % guests.len(),
        other,
        host.stats()?.cow_breaks
    );
    guests[0].write_obj(shared_page, first_word(0, 1))?;
    for (vm, mem) in guests.iter().enumerate() {
        let sum = checksum(mem)?;
        let expect = expected_checksum(mem, vm_id(vm))?;
        if sum != expect {
            return Err(format!("VM {vm}: checksum after folding {sum:#x} != {expect:#x}").into());
        }
    }
    println!("every VM's memory verified byte for byte after folding");
    let n = host.unmerge_all()?;
    println!(
        "unmerge_all: {n} pages back in their own frames; store holds {} MiB",
        store.allocated_bytes()? / MIB
    );
    balloon(&store, &guests)?;
    migrate(&guests[0])
}

/// Balloons part of the last VM: 1 MiB through the virtio inflate queue's
/// le32 payload, 1 MiB as a range; the kernel's allocated bytes drop. Then
/// the guest deflates the range back and reuses it; the ballooned pages read
/// as zeros and every other page keeps its bytes.
fn balloon(store: &FrameStore, guests: &[Arc<GuestMemory>]) -> Result<(), Box<dyn Error>> {
    const QUEUE_PAGES: u64 = 256; // one virtio request
    const RANGE_PAGES: u64 = 256;
    let vm = guests.len() - 1;
    let mem = &guests[vm];
    let balloon = Balloon::new(Arc::clone(mem));
    balloon.set_target(QUEUE_PAGES + RANGE_PAGES);
    let before = store.allocated_bytes()?;
    // Low RAM starts at guest-physical 0: PFN = page index. Pages
    // [0, 256) by the queue, [256, 512) by range (low RAM is >= 2 MiB).
    let mut payload = Vec::new();
    for pfn in 0..QUEUE_PAGES {
        payload.extend(u32::try_from(pfn)?.to_le_bytes());
    }
    let q = balloon.inflate_pfns_le32(&payload);
    let r = balloon.inflate_range(
        GuestPhysAddr(QUEUE_PAGES * PAGE_SIZE as u64),
        RANGE_PAGES * PAGE_SIZE as u64,
    )?;
    if !q.errors.is_empty() || !r.errors.is_empty() {
        return Err(format!("balloon: entry errors {:?} {:?}", q.errors, r.errors).into());
    }
    let inflated = store.allocated_bytes()?;
    println!(
        "balloon: VM {vm} inflates {} pages (le32 queue payload) + {} pages (range): actual {} \
         pages, {} pages released; store {} KiB -> {} KiB",
        q.applied,
        r.applied,
        balloon.actual(),
        q.released_pages + r.released_pages,
        before >> 10,
        inflated >> 10
    );
    // The host lowers its target, the guest deflates down to it.
    balloon.set_target(QUEUE_PAGES);
    let d = balloon.deflate_range(
        GuestPhysAddr(QUEUE_PAGES * PAGE_SIZE as u64),
        RANGE_PAGES * PAGE_SIZE as u64,
    )?;
    let mut page = vec![0u8; PAGE_SIZE];
    for p in QUEUE_PAGES..QUEUE_PAGES + RANGE_PAGES {
        page_pattern(vm_id(vm), p, &mut page);
        if page.iter().any(|&b| b != 0) {
            mem.write(GuestPhysAddr(p * PAGE_SIZE as u64), &page)?;
        }
    }
    println!(
        "balloon: VM {vm} deflates {} pages and writes them again: actual {} pages, {} \
         deflated, {} below target (deflate on OOM); store {} KiB",
        d.applied,
        balloon.actual(),
        balloon.deflated(),
        balloon.oom_deflated(),
        store.allocated_bytes()? >> 10
    );
    // Every page: zeros if still in the balloon, the pattern otherwise.
    let mut expect = vec![0u8; PAGE_SIZE];
    let mut index = 0;
    for reg in mem.regions() {
        for p in 0..reg.size() / PAGE_SIZE as u64 {
            mem.read(
                GuestPhysAddr(reg.start().0 + p * PAGE_SIZE as u64),
                &mut page,
            )?;
            if index < QUEUE_PAGES {
                expect.fill(0);
            } else {
                page_pattern(vm_id(vm), index, &mut expect);
            }
            if page != expect {
                return Err(format!("balloon: VM {vm} page {index} has the wrong bytes").into());
            }
            index += 1;
        }
    }
    if inflated >= before || balloon.actual() != QUEUE_PAGES {
        return Err("balloon: memory was not released".into());
    }
    println!("balloon verified: ballooned pages read as zeros, every other page intact");
    Ok(())
}

/// Guest writes per second during the migration, in pages, and the link.
const DIRTY_MIB_S: u64 = 20;
const LINK_MIB_S: u64 = 200;

/// Live-migrates `mem` to a receiver thread over an in-memory pipe capped
/// at [`LINK_MIB_S`] while a writer thread dirties it, then checks the
/// receiver byte for byte.
fn migrate(mem: &GuestMemory) -> Result<(), Box<dyn Error>> {
    println!(
        "migration: VM 0 ({} MiB) to a receiver thread over an in-memory pipe capped at \
         {LINK_MIB_S} MiB/s, a writer thread dirtying {DIRTY_MIB_S} MiB/s of pages, \
         downtime budget 300 ms",
        mem.total_size() / MIB
    );
    let pages: Vec<GuestPhysAddr> = mem
        .regions()
        .iter()
        .flat_map(|r| {
            (0..r.size() / PAGE_SIZE as u64)
                .map(move |i| GuestPhysAddr(r.start().0 + i * PAGE_SIZE as u64))
        })
        .collect();
    let opts = PrecopyOptions {
        bandwidth_limit: Some(LINK_MIB_S * MIB),
        ..PrecopyOptions::default()
    };
    let budget = opts.downtime_budget;
    let (tx, rx) = pipe(64);
    let stop = AtomicBool::new(false);
    let (summary, got, writes) = std::thread::scope(|s| -> Result<_, Box<dyn Error>> {
        let receiver = s.spawn(move || receive_migration(rx, ReaderLimits::default()));
        let writer = s.spawn(|| {
            let rate = DIRTY_MIB_S * MIB / PAGE_SIZE as u64;
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let t = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                #[allow(clippy::cast_possible_truncation)] // a page count
                let due = (t.elapsed().as_secs_f64() * rate as f64) as u64;
                while n < due {
                    // xorshift64: a page and a value.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    #[allow(clippy::cast_possible_truncation)] // < pages.len()
                    let gpa = pages[(x % pages.len() as u64) as usize];
                    let _ = mem.write_obj(GuestPhysAddr(gpa.0 + (x >> 32 & 0xff8)), x);
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        });
        let mut m = Sender::start(mem, io::BufWriter::with_capacity(256 << 10, tx), opts)?;
        m.on_progress(|p| {
            println!(
                "  round {}: {} pages sent, {} dirtied meanwhile, {} KiB on the wire so far, \
                 estimated downtime {:.1} ms",
                p.round,
                p.round_pages,
                p.dirty_pages,
                p.bytes >> 10,
                p.estimated_downtime.as_secs_f64() * 1e3
            );
        });
        let r = m.iterate();
        // The VMM would pause the vCPUs here.
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().map_err(|_| "writer thread panicked")?;
        r?;
        let (out, summary) = m.finish()?;
        drop(out);
        let got = receiver.join().map_err(|_| "receiver thread panicked")??;
        Ok((summary, got, writes))
    })?;
    let mut a = vec![0u8; PAGE_SIZE];
    let mut b = vec![0u8; PAGE_SIZE];
    let mut nonzero = 0u64;
    for &gpa in &pages {
        mem.read(gpa, &mut a)?;
        got.mem.read(gpa, &mut b)?;
        if a != b {
            return Err(format!("migration: receiver's page {gpa} differs").into());
        }
        nonzero += u64::from(a.iter().any(|&x| x != 0));
    }
    // QEMU's default: every non-zero page whole, with a 9-byte header.
    let zero_only = nonzero * (PAGE_SIZE as u64 + 9);
    let bytes = summary.stream.bytes;
    println!(
        "  {} rounds, {} guest writes during the migration; {} KiB on the wire ({} full, {} \
         by reference, {} delta pages) vs {} KiB for a zero-page-only stream ({:.2} x that; \
         this guest has no duplicates within itself, so only zero pages are saved)",
        summary.rounds,
        writes,
        bytes >> 10,
        summary.stream.full_pages,
        summary.stream.ref_pages,
        summary.stream.delta_pages,
        zero_only >> 10,
        bytes as f64 / zero_only.max(1) as f64
    );
    println!(
        "  downtime {:.1} ms (budget {} ms), {} pages in the paused round, total {:.2} s",
        summary.downtime.as_secs_f64() * 1e3,
        budget.as_millis(),
        summary.last_round_pages,
        summary.total.as_secs_f64()
    );
    println!(
        "migration verified: receiver equals VM 0 byte for byte (end-marker digest checked: {})",
        got.stats.verified
    );
    Ok(())
}

/// The first 8 bytes of page `index` of VM `vm`'s pattern.
fn first_word(vm: u64, index: u64) -> u64 {
    let mut page = vec![0u8; PAGE_SIZE];
    page_pattern(vm, index, &mut page);
    let mut w = [0u8; 8];
    w.copy_from_slice(&page[..8]);
    u64::from_le_bytes(w)
}

fn vm_id(vm: usize) -> u64 {
    vm as u64
}

/// Content of page `index` (counted over the whole layout) of VM `vm`: in
/// runs of 32 pages, as a guest's kernel, page cache and heap lie, a third
/// identical across VMs, a third zero, a third unique.
fn page_pattern(vm: u64, index: u64, page: &mut [u8]) {
    match (index / 32 + 1) % 3 {
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
