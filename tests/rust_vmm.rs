//! pagefold memory through rust-vmm's vm-memory traits (feature
//! `vm-memory`): the traits' behaviour on pagefold regions and memories,
//! writes through them in pagefold's dirty log, memory hotplug through a
//! `GuestAddressSpace`, and device writes through vm-memory racing dedup's
//! merges and unmerges, checked byte for byte against a model.

// A failed unwrap is a failed test; every size here is small.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    collections::BTreeSet,
    os::unix::fs::FileExt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use pagefold::{
    rust_vmm::AtomicGuestMemory, DedupHost, DirtyRun, FrameStore, GuestMemory, GuestPhysAddr,
    GuestRegion, RegionSet, PAGE_SIZE,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use vm_memory::{
    bitmap::Bitmap, Bytes, GuestAddress, GuestAddressSpace, GuestMemory as VmGuestMemory,
    GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, MemoryRegionAddress, VolatileMemory,
};

const P: u64 = PAGE_SIZE as u64;

fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}

/// Two adjacent regions (16 and 8 pages) and a third after a hole.
fn three_regions() -> GuestMemory {
    GuestMemory::new(&[
        (gpa(0), 16 * P),
        (gpa(16 * P), 8 * P),
        (gpa(0x10_0000), 4 * P),
    ])
    .unwrap()
}

/// What a device written against vm-memory does: generic over the trait.
fn device_round_trip<M: VmGuestMemory + ?Sized>(m: &M) {
    // An object straddling the two adjacent regions.
    let at = GuestAddress(16 * P - 4);
    m.write_obj(0x1122_3344_5566_7788u64, at).unwrap();
    assert_eq!(m.read_obj::<u64>(at).unwrap(), 0x1122_3344_5566_7788);
    // A slice of three pages across the boundary.
    let data: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 253) as u8).collect();
    m.write_slice(&data, GuestAddress(15 * P)).unwrap();
    let mut back = vec![0u8; data.len()];
    m.read_slice(&mut back, GuestAddress(15 * P)).unwrap();
    assert_eq!(back, data);
    // The hole and past the end.
    assert!(matches!(
        m.read_obj::<u32>(GuestAddress(24 * P)),
        Err(GuestMemoryError::InvalidGuestAddress(_))
    ));
    assert!(m.write_slice(&[1; 16], GuestAddress(24 * P - 8)).is_err());
    assert!(m.check_range(
        GuestAddress(0),
        24 * PAGE_SIZE,
        vm_memory::Permissions::ReadWrite
    ));
    assert!(!m.check_range(
        GuestAddress(0),
        24 * PAGE_SIZE + 1,
        vm_memory::Permissions::Read
    ));
    // Atomics.
    m.store(7u32, GuestAddress(0x100), Ordering::SeqCst)
        .unwrap();
    assert_eq!(
        m.load::<u32>(GuestAddress(0x100), Ordering::SeqCst)
            .unwrap(),
        7
    );
}

#[test]
fn vm_memory_traits_on_pagefold_memory() {
    let mem = three_regions();
    device_round_trip(&mem);
    // The same bytes through pagefold's own API.
    let mut b = vec![0u8; 3 * PAGE_SIZE];
    mem.read(gpa(15 * P), &mut b).unwrap();
    assert!(b.iter().enumerate().all(|(i, &x)| x == (i % 253) as u8));
    assert_eq!(mem.read_obj::<u32>(gpa(0x100)).unwrap(), 7);

    // The backend's lookups.
    assert_eq!(GuestMemoryBackend::num_regions(&mem), 3);
    assert_eq!(
        GuestMemoryBackend::last_addr(&mem),
        GuestAddress(0x10_0000 + 4 * P - 1)
    );
    let r = GuestMemoryBackend::find_region(&mem, GuestAddress(17 * P + 5)).unwrap();
    assert_eq!(r.start_addr(), GuestAddress(16 * P));
    assert_eq!(GuestMemoryRegion::len(r), 8 * P);
    assert!(GuestMemoryBackend::find_region(&mem, GuestAddress(24 * P)).is_none());
    assert!(GuestMemoryBackend::find_region(&mem, GuestAddress(u64::MAX)).is_none());
    let (r, off) = GuestMemoryBackend::to_region_addr(&mem, GuestAddress(0x10_0010)).unwrap();
    assert_eq!(
        (r.start_addr(), off),
        (GuestAddress(0x10_0000), MemoryRegionAddress(0x10))
    );
    assert_eq!(
        GuestMemoryBackend::get_host_address(&mem, GuestAddress(17 * P)).unwrap() as u64,
        mem.host_address(gpa(17 * P)).unwrap().0
    );
    let starts: Vec<u64> = GuestMemoryBackend::iter(&mem)
        .map(|r| r.start_addr().0)
        .collect();
    assert_eq!(starts, vec![0, 16 * P, 0x10_0000]);

    // A region's slices are bounded by the region.
    let r1 = &*mem.regions()[1];
    assert!(r1.get_slice(MemoryRegionAddress(8 * P - 8), 8).is_ok());
    assert!(r1.get_slice(MemoryRegionAddress(8 * P - 8), 9).is_err());
    assert!(r1.get_slice(MemoryRegionAddress(u64::MAX), 1).is_err());
    assert!(r1.get_host_address(MemoryRegionAddress(8 * P)).is_err());
    let s = r1.as_volatile_slice().unwrap();
    assert_eq!(s.len(), 8 * PAGE_SIZE);
    s.get_ref::<u32>(12).unwrap().store(0xfeed);
    assert_eq!(mem.read_obj::<u32>(gpa(16 * P + 12)).unwrap(), 0xfeed);
    assert_eq!(r1.is_hugetlbfs(), Some(false));

    // A region's own Bytes: at region offsets, clipped at its end.
    assert_eq!(
        r1.write(&[9u8; 32], MemoryRegionAddress(8 * P - 16))
            .unwrap(),
        16
    );
    assert!(matches!(
        r1.write_slice(&[9u8; 32], MemoryRegionAddress(8 * P - 16)),
        Err(GuestMemoryError::PartialBuffer {
            expected: 32,
            completed: 16
        })
    ));
    assert!(r1
        .read(&mut [0u8; 4], MemoryRegionAddress(8 * P + 1))
        .is_err());
    let mut back = [0u8; 16];
    r1.read_slice(&mut back, MemoryRegionAddress(8 * P - 16))
        .unwrap();
    assert_eq!(back, [9u8; 16]);
    r1.write_obj(0xabcdu16, MemoryRegionAddress(2)).unwrap();
    assert_eq!(mem.read_obj::<u16>(gpa(16 * P + 2)).unwrap(), 0xabcd);

    // The file and offset a vhost-user frontend sends: the region's bytes
    // are there.
    for r in mem.regions() {
        let fo = r.file_offset().unwrap();
        let mut from_file = [0u8; 64];
        fo.file()
            .read_exact_at(&mut from_file, fo.start() + 8)
            .unwrap();
        let mut through = [0u8; 64];
        mem.read(r.start().checked_add(8).unwrap(), &mut through)
            .unwrap();
        assert_eq!(from_file, through, "region at {}", r.start());
    }
}

/// Pages named by runs, as page numbers of the guest-physical space.
fn pages_of(runs: &[DirtyRun]) -> BTreeSet<u64> {
    runs.iter()
        .flat_map(|r| (0..r.pages).map(move |i| r.start.0 / P + i))
        .collect()
}

#[test]
fn writes_through_vm_memory_land_in_pagefolds_dirty_log() {
    let mem = three_regions();
    mem.set_dirty_tracking(RegionSet::All, true).unwrap();
    let mut runs = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();

    // Reads mark nothing.
    let _ = mem_read_everything(&mem);
    runs.clear();
    assert_eq!(mem.harvest_dirty(RegionSet::All, &mut runs).unwrap(), 0);

    // Each kind of write through vm-memory, at its own page.
    Bytes::write_obj(&mem, 5u64, GuestAddress(3 * P + 8)).unwrap();
    Bytes::write_slice(&mem, &[1u8; 2 * PAGE_SIZE], GuestAddress(10 * P + 100)).unwrap(); // 10, 11, 12
    let mut src: &[u8] = &[0x5a; 300];
    Bytes::read_volatile_from(&mem, GuestAddress(20 * P - 100), &mut src, 300).unwrap(); // 19, 20
    Bytes::store(
        &mem,
        9u32,
        GuestAddress(0x10_0000 + 2 * P),
        Ordering::Release,
    )
    .unwrap();
    let slice = GuestMemoryBackend::get_slice(&mem, GuestAddress(6 * P), 16).unwrap();
    slice.write_obj(3u64, 8).unwrap();
    let region = &*mem.regions()[0];
    region
        .write_slice(&[2u8; 4], MemoryRegionAddress(14 * P))
        .unwrap();
    // The bitmap answers before the harvest.
    assert!(region.bitmap().dirty_at((3 * P) as usize));
    assert!(!region.bitmap().dirty_at((4 * P) as usize));
    assert!(region.bitmap().slice_at((3 * P) as usize).dirty_at(8));

    runs.clear();
    mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    let want: BTreeSet<u64> = [3, 6, 10, 11, 12, 14, 19, 20, 0x100 + 2]
        .into_iter()
        .collect();
    assert_eq!(pages_of(&runs), want);

    // Tracking off: nothing is marked.
    mem.set_dirty_tracking(RegionSet::All, false).unwrap();
    Bytes::write_obj(&mem, 5u64, GuestAddress(3 * P)).unwrap();
    runs.clear();
    assert_eq!(mem.harvest_dirty(RegionSet::All, &mut runs).unwrap(), 0);
}

/// Reads every byte through vm-memory: `read_slice` and `write_volatile_to`.
fn mem_read_everything(mem: &GuestMemory) -> Vec<u8> {
    let mut all = vec![0u8; 24 * PAGE_SIZE];
    Bytes::read_slice(mem, &mut all, GuestAddress(0)).unwrap();
    let mut sink: Vec<u8> = Vec::new();
    Bytes::write_all_volatile_to(mem, GuestAddress(0x10_0000), &mut sink, 4 * PAGE_SIZE).unwrap();
    assert_eq!(sink.len(), 4 * PAGE_SIZE);
    all
}

/// A device that holds an address space and reaches whatever memory is
/// current, as virtio devices of rust-vmm VMMs do.
struct Device<AS: GuestAddressSpace> {
    mem: AS,
}

impl<AS: GuestAddressSpace> Device<AS> {
    fn poke(&self, addr: u64, v: u32) -> Result<(), GuestMemoryError> {
        self.mem.memory().write_obj(v, GuestAddress(addr))
    }
    fn peek(&self, addr: u64) -> Result<u32, GuestMemoryError> {
        self.mem.memory().read_obj(GuestAddress(addr))
    }
}

#[test]
fn hotplug_through_an_atomic_address_space_and_dedup_of_the_new_region() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let base = GuestMemory::with_store(Arc::clone(&store), &[(gpa(0), 64 * P)]).unwrap();
    for p in 0..64 {
        base.fill(gpa(p * P), (p % 4) as u8 + 1, PAGE_SIZE).unwrap();
    }
    let base = Arc::new(base);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let base_vm = host
        .register(Arc::clone(&base), Default::default())
        .unwrap();

    let space = AtomicGuestMemory::from(Arc::clone(&base));
    let dev = Device { mem: space.clone() };
    assert!(dev.poke(0x40_0000, 1).is_err(), "not plugged yet");

    // Plug a region of 32 pages at 4 MiB whose pages repeat the base's.
    let region = GuestRegion::allocate(&store, gpa(0x40_0000), 32 * P).unwrap();
    let plugged = base.insert_region(Arc::clone(&region)).unwrap();
    for p in 0..32 {
        plugged
            .fill(gpa(0x40_0000 + p * P), (p % 4) as u8 + 1, PAGE_SIZE)
            .unwrap();
    }
    let held = space.memory(); // A device mid-request keeps the old memory.
    space.lock().unwrap().replace(plugged);
    dev.poke(0x40_0000 + 4, 0x0101_0101).unwrap();
    assert_eq!(dev.peek(0x40_0000 + 4).unwrap(), 0x0101_0101);
    assert!(Bytes::read_obj::<u32>(&*held, GuestAddress(0x40_0000)).is_err());
    assert_eq!(
        Bytes::read_obj::<u32>(&*held, GuestAddress(0)).unwrap(),
        0x0101_0101
    );
    drop(held);

    // The plugged memory shares the base's regions, which the host owns:
    // it cannot be registered again; the new region alone can, in the same
    // domain, and folds with the base.
    let current: Arc<GuestMemory> = Arc::new(clone_memory(&space.memory()));
    assert!(host
        .register(Arc::clone(&current), Default::default())
        .is_err());
    let alone = Arc::new(GuestMemory::from_regions(vec![Arc::clone(&region)]).unwrap());
    let new_vm = host
        .register(Arc::clone(&alone), Default::default())
        .unwrap();
    host.merge_now().unwrap();
    host.merge_now().unwrap();
    let stats = host.stats().unwrap();
    assert!(
        stats.pages_sharing >= 64 + 32 - 4,
        "96 pages of 4 contents fold onto 4 frames: {stats:?}"
    );
    // A device write to a merged page of the new region, through the
    // address space, lands and stays private to that page.
    dev.poke(0x40_0000 + 5 * P, 0xdead_beef).unwrap();
    assert_eq!(dev.peek(0x40_0000 + 5 * P).unwrap(), 0xdead_beef);
    assert_eq!(dev.peek(0x40_0000 + 9 * P).unwrap(), 0x0202_0202);
    assert_eq!(dev.peek(P).unwrap(), 0x0202_0202);

    // Unplug: dedup gives the region back first, then the space drops it.
    host.unregister(new_vm).unwrap();
    let (unplugged, gone) = space
        .memory()
        .remove_region(gpa(0x40_0000), 32 * P)
        .unwrap();
    assert_eq!(gone.start(), gpa(0x40_0000));
    space.lock().unwrap().replace(unplugged);
    assert!(dev.peek(0x40_0000).is_err());
    assert_eq!(dev.peek(2 * P).unwrap(), 0x0303_0303);
    host.unregister(base_vm).unwrap();
}

/// A second memory over the same regions as `m` (what a VMM holding the
/// current memory of an address space has).
fn clone_memory(m: &GuestMemory) -> GuestMemory {
    GuestMemory::from_regions(m.regions().to_vec()).unwrap()
}

#[test]
fn layout_errors_of_hotplug_name_the_region() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let other = Arc::new(FrameStore::memfd().unwrap());
    let mem = GuestMemory::with_store(Arc::clone(&store), &[(gpa(0), 4 * P)]).unwrap();
    let overlapping = GuestRegion::allocate(&store, gpa(2 * P), 4 * P).unwrap();
    assert!(matches!(
        mem.insert_region(overlapping),
        Err(pagefold::LayoutError::Overlap { .. })
    ));
    let elsewhere = GuestRegion::allocate(&other, gpa(8 * P), P).unwrap();
    assert!(matches!(
        mem.insert_region(elsewhere),
        Err(pagefold::LayoutError::OtherStore { index: 1, .. })
    ));
    assert!(matches!(
        GuestRegion::allocate(&store, gpa(100), P),
        Err(pagefold::MemoryError::Layout(
            pagefold::LayoutError::Misaligned { .. }
        ))
    ));
    assert!(matches!(
        mem.remove_region(gpa(0), P),
        Err(pagefold::LayoutError::NoSuchRegion { .. })
    ));
    assert!(matches!(
        mem.remove_region(gpa(0), 4 * P),
        Err(pagefold::LayoutError::LastRegion { .. })
    ));
    assert!(matches!(
        GuestMemory::from_regions(Vec::new()),
        Err(pagefold::LayoutError::NoRegions)
    ));
}

const VMS: usize = 2;
const PAGES: usize = 192;
const WRITERS: usize = 3;

fn palette(k: u8) -> [u8; PAGE_SIZE] {
    [k.wrapping_mul(0x11); PAGE_SIZE]
}

/// Invariant 1 through vm-memory: device threads write pages of two VMs
/// through every kind of vm-memory write while the main thread merges,
/// scans and unmerges. Afterwards every byte equals the writers' model, and
/// every page a writer wrote is in the dirty log.
#[test]
fn device_writes_through_vm_memory_lose_nothing_while_pages_merge_and_unmerge() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms: Vec<Arc<GuestMemory>> = (0..VMS)
        .map(|_| {
            let m = GuestMemory::with_store(
                Arc::clone(&store),
                &[
                    (gpa(0), (PAGES / 2) as u64 * P),
                    (gpa((PAGES / 2) as u64 * P), (PAGES / 2) as u64 * P),
                ],
            )
            .unwrap();
            for p in 0..PAGES {
                m.write(gpa(p as u64 * P), &palette((p % 4) as u8)).unwrap();
            }
            m.set_dirty_tracking(RegionSet::All, true).unwrap();
            Arc::new(m)
        })
        .collect();
    for m in &vms {
        m.harvest_dirty(RegionSet::All, &mut Vec::new()).unwrap();
    }
    let host = Arc::new(DedupHost::new(Arc::clone(&store)).unwrap());
    for m in &vms {
        host.register(Arc::clone(m), Default::default()).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let vms = vms.clone();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(w as u64 + 11);
                let mut model: Vec<Vec<[u8; PAGE_SIZE]>> = (0..VMS)
                    .map(|_| (0..PAGES).map(|p| palette((p % 4) as u8)).collect())
                    .collect();
                let mut written: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); VMS];
                while !stop.load(Ordering::Relaxed) {
                    let vm = rng.gen_range(0..VMS);
                    let page = rng.gen_range(0..PAGES / WRITERS) * WRITERS + w;
                    let base = page as u64 * P;
                    let m: &GuestMemory = &vms[vm];
                    match rng.gen_range(0..5) {
                        // A whole palette page with `write_slice`.
                        0 => {
                            let c = palette(rng.gen_range(0..4));
                            Bytes::write_slice(m, &c, GuestAddress(base)).unwrap();
                            model[vm][page] = c;
                        }
                        // An object with `write_obj`, at any alignment.
                        1 => {
                            let off = rng.gen_range(0..PAGE_SIZE - 8);
                            let v: u64 = rng.gen();
                            Bytes::write_obj(m, v, GuestAddress(base + off as u64)).unwrap();
                            model[vm][page][off..off + 8].copy_from_slice(&v.to_le_bytes());
                        }
                        // An atomic store, as a device's used-ring update.
                        2 => {
                            let off = rng.gen_range(0..PAGE_SIZE / 4) * 4;
                            let v: u32 = rng.gen();
                            Bytes::store(m, v, GuestAddress(base + off as u64), Ordering::Release)
                                .unwrap();
                            model[vm][page][off..off + 4].copy_from_slice(&v.to_le_bytes());
                        }
                        // `read_volatile_from` a reader (a socket or file
                        // in a device; a byte slice here).
                        3 => {
                            let off = rng.gen_range(0..PAGE_SIZE - 512);
                            let bytes: Vec<u8> = (0..512).map(|_| rng.gen()).collect();
                            let mut src: &[u8] = &bytes;
                            Bytes::read_exact_volatile_from(
                                m,
                                GuestAddress(base + off as u64),
                                &mut src,
                                512,
                            )
                            .unwrap();
                            model[vm][page][off..off + 512].copy_from_slice(&bytes);
                        }
                        // A region's own `Bytes`, through pagefold's
                        // accessors.
                        _ => {
                            let (r, off) = m.region_of(gpa(base)).unwrap();
                            let c = palette(rng.gen_range(0..4));
                            r.write_slice(&c, MemoryRegionAddress(off)).unwrap();
                            model[vm][page] = c;
                        }
                    }
                    written[vm].insert(page as u64);
                }
                (model, written)
            })
        })
        .collect();

    let started = Instant::now();
    let mut rng = SmallRng::seed_from_u64(5);
    let (mut merged, mut unmerged) = (0u64, 0u64);
    let run_for = Duration::from_millis(2000);
    while started.elapsed() < run_for
        || ((merged == 0 || unmerged == 0) && started.elapsed() < run_for * 4)
    {
        match rng.gen_range(0..4) {
            0 | 1 => {
                let r = host.merge_now().unwrap();
                merged += r.merged_shared + r.merged_zero;
            }
            2 => unmerged += host.unmerge_all().unwrap(),
            _ => {
                let r = host.scan_step(pagefold::ScanBudget::Pages(200)).unwrap();
                merged += r.merged_shared + r.merged_zero;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        merged > 0 && unmerged > 0,
        "merged {merged}, unmerged {unmerged}"
    );
    // One more merge, so the check reads merged pages too.
    host.merge_now().unwrap();

    for (vm, m) in vms.iter().enumerate() {
        let mut runs = Vec::new();
        m.harvest_dirty(RegionSet::All, &mut runs).unwrap();
        let dirty = pages_of(&runs);
        for (w, (model, written)) in results.iter().enumerate() {
            for page in (w..PAGES).step_by(WRITERS) {
                let mut through_vm_memory = [0u8; PAGE_SIZE];
                Bytes::read_slice(&**m, &mut through_vm_memory, GuestAddress(page as u64 * P))
                    .unwrap();
                let mut through_pagefold = [0u8; PAGE_SIZE];
                m.read(gpa(page as u64 * P), &mut through_pagefold).unwrap();
                assert!(
                    through_vm_memory == model[vm][page] && through_pagefold == model[vm][page],
                    "VM {vm} page {page} differs from the model"
                );
            }
            for page in &written[vm] {
                assert!(
                    dirty.contains(page),
                    "VM {vm} page {page} written, not logged"
                );
            }
        }
    }
}
