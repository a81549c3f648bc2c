//! One conformance suite for guest memory, run on every backing a frame
//! store offers: memfd with 4 KiB pages, memfd with transparent huge pages,
//! hugetlb with 2 MiB and with 1 GiB pages. Hugetlb runs for real when the
//! kernel has huge pages reserved and is reported as `SKIPPED` on stderr
//! otherwise:
//!
//! ```text
//! echo 64 > /proc/sys/vm/nr_hugepages                                   # 2 MiB
//! echo 4 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages    # 1 GiB
//! cargo test --test memory_conformance -- --nocapture
//! ```

mod common;

use std::{
    os::fd::AsRawFd,
    sync::{atomic::Ordering, Arc, Mutex, MutexGuard},
};

use common::strategies;
use pagefold::{
    AccessError, Backing, FrameError, FrameStore, GuestMemory, GuestPhysAddr, LayoutError,
    MemoryError, PageSize, StoreOptions,
};
use pagefold_models::model::Model;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

const fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}

fn usize_of(x: u64) -> usize {
    usize::try_from(x).expect("64-bit host")
}

/// Huge pages the suite holds at its peak (one per region of [`layout`]).
fn granules_needed(size: PageSize) -> u64 {
    layout(size.bytes()).len() as u64
}

/// Hugetlb tests share the kernel's pool of free huge pages: one at a time.
static HUGE_POOL: Mutex<()> = Mutex::new(());

fn huge_pool() -> MutexGuard<'static, ()> {
    HUGE_POOL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The kernel's pool of `size` huge pages: (free, how many more it may
/// allocate on demand), or `None` where the size is not supported.
fn huge_pages_available(size: PageSize) -> Option<(u64, u64)> {
    let dir = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB",
        size.bytes() / 1024
    );
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{dir}/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let free = read("free_hugepages")?;
    let overcommit = read("nr_overcommit_hugepages")?.saturating_sub(read("surplus_hugepages")?);
    Some((free, overcommit))
}

fn reserve_hint(size: PageSize) -> String {
    match size {
        PageSize::Size2M => "echo 64 > /proc/sys/vm/nr_hugepages".to_owned(),
        _ => format!(
            "echo {} > /sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
            granules_needed(size),
            size.bytes() / 1024
        ),
    }
}

fn skip(name: &str, why: &str) {
    eprintln!("SKIPPED: {name}: {why}");
}

/// Why the host cannot give `size` huge pages to the suite, for the
/// `SKIPPED` line.
fn shortage(size: PageSize) -> String {
    match huge_pages_available(size) {
        None => format!("this kernel has no {size} huge pages"),
        Some((0, 0)) => format!("no huge pages reserved ({})", reserve_hint(size)),
        Some((free, more)) => format!(
            "{} free {size} huge pages, the suite needs {} ({})",
            free + more,
            granules_needed(size),
            reserve_hint(size)
        ),
    }
}

/// A store for `options`, or `None` (reported as skipped) where the host
/// cannot provide its pages.
fn store_for(name: &str, options: StoreOptions) -> Option<Arc<FrameStore>> {
    match FrameStore::new(options) {
        Ok(store) => Some(Arc::new(store)),
        Err(FrameError::NoHugePages { size }) => {
            skip(name, &shortage(size));
            None
        }
        Err(e) => panic!("{name}: cannot create the frame store: {e}"),
    }
}

/// The unit the suite sizes regions in: the store's granule, or 2 MiB where
/// transparent huge pages are asked for (smaller regions never get any).
fn unit_of(store: &FrameStore) -> u64 {
    let g = store.granule().bytes();
    if store.options().transparent_huge_pages {
        g.max(PageSize::Size2M.bytes())
    } else {
        g
    }
}

/// Two adjacent regions, a hole of one unit, a third region; starting 16
/// units up so addresses just below the first region are a hole too. With
/// 1 GiB units, only the two adjacent regions (hosts rarely reserve more
/// than a couple of 1 GiB pages at run time).
fn layout(unit: u64) -> Vec<(u64, u64)> {
    let base = 16 * unit;
    let mut l = vec![(base, unit), (base + unit, unit)];
    if unit < PageSize::Size1G.bytes() {
        l.push((base + 3 * unit, unit));
    }
    l
}

fn with_store(store: &Arc<FrameStore>, layout: &[(u64, u64)]) -> Result<GuestMemory, MemoryError> {
    let regions: Vec<(GuestPhysAddr, u64)> = layout.iter().map(|&(s, z)| (gpa(s), z)).collect();
    GuestMemory::with_store(Arc::clone(store), &regions)
}

/// The suite. `store` must be otherwise unused (the kernel's figure of the
/// memory it holds is checked).
fn conformance(name: &str, store: Arc<FrameStore>) {
    let started = std::time::Instant::now();
    layout_rules(&store);
    round_trips(&store);
    region_infos_describe_the_memfd(&store);
    discard_returns_memory(&store);
    vms_sharing_a_store(&store);
    model_ops(&store);
    assert_eq!(store.allocated_frames(), 0, "every VM returned its frames");
    eprintln!(
        "conformance: {name}: passed in {:.2?} (granule {}, unit {:#x})",
        started.elapsed(),
        store.granule(),
        unit_of(&store)
    );
}

/// Starts and sizes must be multiples of the granule; a refused layout
/// takes no frames.
fn layout_rules(store: &Arc<FrameStore>) {
    let g = store.granule().bytes();
    let layout_err = |layout: &[(u64, u64)]| match with_store(store, layout) {
        Err(MemoryError::Layout(e)) => e,
        Err(e) => panic!("layout {layout:x?}: {e}"),
        Ok(_) => panic!("layout {layout:x?} accepted"),
    };
    assert_eq!(
        layout_err(&[(0, g / 2)]),
        LayoutError::Misaligned {
            index: 0,
            start: gpa(0),
            size: g / 2,
            align: g
        }
    );
    assert_eq!(
        layout_err(&[(g, g), (g + g / 2, g)]),
        LayoutError::Misaligned {
            index: 1,
            start: gpa(g + g / 2),
            size: g,
            align: g
        }
    );
    if g > 4096 {
        // 4 KiB alignment is not enough for a huge-page store.
        assert_eq!(
            layout_err(&[(4096, g)]),
            LayoutError::Misaligned {
                index: 0,
                start: gpa(4096),
                size: g,
                align: g
            }
        );
    }
    assert_eq!(
        layout_err(&[(0, 2 * g), (g, g)]),
        LayoutError::Overlap {
            first: 0,
            second: 1,
            at: gpa(g)
        }
    );
    assert_eq!(
        layout_err(&[(0, g), (g, 0)]),
        LayoutError::ZeroSize {
            index: 1,
            start: gpa(g)
        }
    );
    assert_eq!(layout_err(&[]), LayoutError::NoRegions);
    assert_eq!(
        store.allocated_frames(),
        0,
        "refused layouts took no frames"
    );
    // One granule at the highest aligned address is fine.
    let top = u64::MAX - g + 1 - g;
    let m = with_store(store, &[(top, g)]).expect("highest aligned granule");
    m.write_obj(gpa(top + g - 8), 0x1234u64).expect("mapped");
    assert_eq!(m.read_obj::<u64>(gpa(top + g - 8)), Ok(0x1234));
}

/// Bytes, objects and atomics round-trip, also across the boundary of the
/// two adjacent regions; fresh memory reads zero; holes and the end are
/// unmapped.
fn round_trips(store: &Arc<FrameStore>) {
    let unit = unit_of(store);
    let l = layout(unit);
    let m = with_store(store, &l).expect("valid layout");
    let spots = |(start, size): (u64, u64)| [start, start + size / 2, start + size - 8];
    for &r in &l {
        for addr in spots(r) {
            assert_eq!(
                m.read_obj::<u64>(gpa(addr)),
                Ok(0),
                "fresh memory at {addr:#x}"
            );
        }
    }

    let boundary = l[1].0;
    let data: Vec<u8> = (0..4000u32)
        .map(|i| (i % 251).to_le_bytes()[0] ^ 0x5a)
        .collect();
    let at = gpa(boundary - 2000);
    m.write(at, &data).expect("spans the adjacent regions");
    let mut back = vec![0; data.len()];
    m.read(at, &mut back).expect("spans the adjacent regions");
    assert_eq!(back, data);

    for (i, &(start, size)) in l.iter().enumerate() {
        let last_page = gpa(start + size - 4096);
        m.fill(last_page, 0xc3, 4096).expect("mapped");
        let mut page = vec![0; 4096];
        m.read(last_page, &mut page).expect("mapped");
        assert!(page.iter().all(|&b| b == 0xc3));

        let tag = 0x0101_0101_0101_0101u64 * (i as u64 + 1);
        for addr in spots((start, size)) {
            m.store::<u64>(gpa(addr), tag, Ordering::SeqCst)
                .expect("aligned, mapped");
            assert_eq!(m.load::<u64>(gpa(addr), Ordering::SeqCst), Ok(tag));
            assert_eq!(
                m.compare_exchange::<u64>(gpa(addr), tag, !tag, Ordering::SeqCst, Ordering::SeqCst),
                Ok(Ok(tag))
            );
            let high = u32::try_from(!tag >> 32).expect("32 bits");
            assert_eq!(m.swap::<u32>(gpa(addr + 4), 7, Ordering::SeqCst), Ok(high));
            assert_eq!(
                m.read_obj::<u64>(gpa(addr)),
                Ok(!tag & 0xffff_ffff | 7 << 32)
            );
        }
    }
    // A hole, or the end of memory with 1 GiB units.
    let hole = l[1].0 + unit;
    assert_eq!(
        m.write(gpa(hole - 4), &[1; 8]),
        Err(AccessError::Unmapped { addr: gpa(hole) })
    );
    let end = l[l.len() - 1].0 + unit;
    assert_eq!(
        m.read_obj::<u16>(gpa(end - 1)),
        Err(AccessError::Unmapped { addr: gpa(end) })
    );
    assert_eq!(
        m.load::<u8>(gpa(l[0].0 - 1), Ordering::SeqCst),
        Err(AccessError::Unmapped {
            addr: gpa(l[0].0 - 1)
        })
    );
}

/// What KVM and vhost-user are given: the host address of each region, and
/// the memfd and offset under it. `pread` of the fd sees what `write` put
/// in; a second mapping of (fd, offset), as a vhost-user backend makes,
/// sees the same bytes both ways.
fn region_infos_describe_the_memfd(store: &Arc<FrameStore>) {
    let g = store.granule().bytes();
    let unit = unit_of(store);
    let l = layout(unit);
    let m = with_store(store, &l).expect("valid layout");
    let infos = m.region_infos();
    assert_eq!(infos.len(), l.len());
    let mut files = Vec::new();
    for (info, &(start, size)) in infos.iter().zip(&l) {
        assert_eq!((info.guest_start, info.size), (gpa(start), size));
        assert_eq!(m.host_address(gpa(start)), Ok(info.host_addr));
        assert_eq!(
            info.host_addr.0 % g,
            0,
            "host mapping aligned to the granule"
        );
        assert_eq!(info.fd, store.as_raw_fd());
        assert_eq!(info.file_offset % g, 0);
        files.push((info.file_offset, info.file_offset + size));
    }
    files.sort_unstable();
    assert!(
        files.windows(2).all(|w| w[0].1 <= w[1].0),
        "regions use distinct frames: {files:x?}"
    );

    for (i, info) in infos.iter().enumerate() {
        let salt = 0x11 * u8::try_from(i + 1).expect("three regions");
        let marker: Vec<u8> = (0..64u8).map(|b| b ^ salt).collect();
        let off = info.size - 4096 + 100;
        m.write(gpa(info.guest_start.0 + off), &marker)
            .expect("mapped");
        let mut from_fd = vec![0; marker.len()];
        let pos = libc::off_t::try_from(info.file_offset + off).expect("fits");
        // SAFETY: `from_fd` is a writable buffer of the length passed.
        let n = unsafe { libc::pread(info.fd, from_fd.as_mut_ptr().cast(), from_fd.len(), pos) };
        assert_eq!(n, 64, "pread: {}", std::io::Error::last_os_error());
        assert_eq!(from_fd, marker, "pread of region {i} sees the write");

        let len = usize_of(info.size);
        // SAFETY: a new shared mapping of `len` bytes of the store's memfd at
        // the region's (granule-aligned) offset; the kernel picks the
        // address, so nothing existing is replaced. Unmapped below.
        let other = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                info.fd,
                libc::off_t::try_from(info.file_offset).expect("fits"),
            )
        };
        assert_ne!(
            other,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        let other = other.cast::<u8>();
        // SAFETY: `off + 64 <= len`, inside the mapping made above.
        let seen = unsafe { std::slice::from_raw_parts(other.add(usize_of(off)), 64).to_vec() };
        assert_eq!(seen, marker, "second mapping sees the write");
        // SAFETY: byte 8 of the mapping made above.
        unsafe { other.add(8).write_volatile(0xee) };
        assert_eq!(m.read_obj::<u8>(gpa(info.guest_start.0 + 8)), Ok(0xee));
        // SAFETY: the mapping made above, unmapped once.
        assert_eq!(unsafe { libc::munmap(other.cast(), len) }, 0);
    }
}

/// Discarding a granule-aligned range lowers the kernel's count of the
/// store's memory; the pages read zero (through the library and through the
/// fd) and take writes again.
fn discard_returns_memory(store: &Arc<FrameStore>) {
    let g = store.granule().bytes();
    let unit = unit_of(store);
    let l = layout(unit);
    let m = with_store(store, &l).expect("valid layout");
    let (start, size) = l[0];
    m.fill(gpa(start), 0x77, usize_of(size)).expect("mapped");
    let before = store.allocated_bytes().expect("fstat");
    assert!(before >= size, "filled region is backed: {before} < {size}");

    assert_eq!(m.discard(gpa(start), size), Ok(size / 4096));
    let after = store.allocated_bytes().expect("fstat");
    assert!(
        after + size <= before,
        "discard of {size:#x} bytes: the store held {before}, holds {after}"
    );
    assert_eq!(m.read_obj::<u64>(gpa(start + size - 8)), Ok(0));
    assert_eq!(
        m.load::<u32>(gpa(start + size / 2), Ordering::SeqCst),
        Ok(0)
    );
    let info = m.region_infos()[0];
    let mut from_fd = [0xffu8; 16];
    // SAFETY: `from_fd` is a writable buffer of the length passed.
    let n = unsafe {
        libc::pread(
            info.fd,
            from_fd.as_mut_ptr().cast(),
            from_fd.len(),
            libc::off_t::try_from(info.file_offset).expect("fits"),
        )
    };
    assert_eq!(n, 16);
    assert_eq!(from_fd, [0; 16], "the memfd reads zero after discard");

    m.write_obj(gpa(start + 8), 0xfeed_u64).expect("mapped");
    assert_eq!(m.read_obj::<u64>(gpa(start + 8)), Ok(0xfeed));
    assert!(
        store.allocated_bytes().expect("fstat") > after,
        "a write backs the page again"
    );
    assert_eq!(
        m.discard(gpa(start + g / 2), g),
        Err(AccessError::Misaligned {
            addr: gpa(start + g / 2),
            align: g
        })
    );
    assert_eq!(
        m.read_obj::<u64>(gpa(start + 8)),
        Ok(0xfeed),
        "a refused discard keeps data"
    );
}

/// Two VMs on one store get distinct frames; dropping one returns its frames
/// and its memory, and the next VM on those frames sees zeros, not the old
/// guest's data.
fn vms_sharing_a_store(store: &Arc<FrameStore>) {
    let unit = unit_of(store);
    let frames_per_unit = unit / 4096;
    let a = with_store(store, &layout(unit)[..1]).expect("valid layout");
    let base_frames = store.allocated_frames();
    assert_eq!(base_frames, frames_per_unit);
    let b = with_store(store, &[(0, unit)]).expect("valid layout");
    assert_eq!(store.allocated_frames(), base_frames + frames_per_unit);
    let (ia, ib) = (a.region_infos(), b.region_infos()[0]);
    for i in &ia {
        let disjoint =
            i.file_offset + i.size <= ib.file_offset || ib.file_offset + ib.size <= i.file_offset;
        assert!(disjoint, "VMs share frames: {i:?} and {ib:?}");
        assert_eq!(i.fd, ib.fd, "one store, one memfd");
    }

    let a0 = ia[0].guest_start;
    a.write_obj(a0, 0xaaaa_aaaa_u32).expect("mapped");
    b.fill(gpa(0), 0xbb, usize_of(unit)).expect("mapped");
    assert_eq!(a.read_obj::<u32>(a0), Ok(0xaaaa_aaaa));
    assert_eq!(b.read_obj::<u32>(gpa(0)), Ok(0xbbbb_bbbb));

    let held = store.allocated_bytes().expect("fstat");
    drop(b);
    assert_eq!(
        store.allocated_frames(),
        base_frames,
        "dropped VM returned its frames"
    );
    let after = store.allocated_bytes().expect("fstat");
    assert!(
        after + unit <= held,
        "dropped VM returned its memory: {held} -> {after}"
    );

    let c = with_store(store, &[(0, unit)]).expect("valid layout");
    let mut buf = vec![0xffu8; usize_of(unit.min(1 << 21))];
    // Every 2 MiB of small units; 16 samples of a 1 GiB one.
    let step = (unit / 16).max(buf.len() as u64);
    let mut off = 0;
    while off < unit {
        c.read(gpa(off), &mut buf).expect("mapped");
        assert!(
            buf.iter().all(|&x| x == 0),
            "new VM sees zeros at {off:#x}, not an old guest's data"
        );
        off += step;
    }
    assert_eq!(a.read_obj::<u32>(a0), Ok(0xaaaa_aaaa), "other VM untouched");
}

/// Random access sequences against the byte-array model, on this backing.
fn model_ops(store: &Arc<FrameStore>) {
    let unit = unit_of(store);
    let l = layout(unit);
    let total: u64 = l.iter().map(|r| r.1).sum();
    if total > 64 << 20 {
        eprintln!("  (model check skipped: {total:#x} bytes is too big for a byte-array model)");
        return;
    }
    let small = total <= 1 << 20;
    let mut config = ProptestConfig::with_cases(if small { 24 } else { 6 });
    config.failure_persistence = None;
    let mut runner = TestRunner::new(config);
    let thp = store.options().transparent_huge_pages;
    let result = runner.run(&strategies::backend_ops(32), |ops| {
        let mut model = Model::new(&l, store.granule().bytes()).expect("valid layout");
        // Under THP a 4 KiB punch may leave a huge page in place.
        model.check_kernel_figure = !thp;
        let mem = with_store(store, &l).expect("valid layout");
        model
            .run(&mem, &ops, small)
            .map_err(proptest::test_runner::TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn memfd_4k() {
    if let Some(store) = store_for("memfd 4K", StoreOptions::default()) {
        conformance("memfd 4K", store);
    }
}

#[test]
fn memfd_transparent_huge_pages() {
    let name = "memfd THP";
    let options = StoreOptions {
        transparent_huge_pages: true,
        ..StoreOptions::default()
    };
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    if !shmem.contains("[advise]") && !shmem.contains("[always]") && !shmem.contains("[force]") {
        eprintln!(
            "NOTE: {name}: shmem THP is off here ({}), so the advice has no effect",
            shmem.trim()
        );
    }
    if let Some(store) = store_for(name, options) {
        conformance(name, store);
    }
}

fn hugetlb(size: PageSize) {
    let _pool = huge_pool();
    let name = format!("hugetlb {size}");
    let options = StoreOptions {
        backing: Backing::Hugetlb(size),
        ..StoreOptions::default()
    };
    let Some(store) = store_for(&name, options) else {
        return;
    };
    // Hugetlb pages are reserved when a region is mapped: a store that
    // cannot back the suite's peak refuses it now, with `NoHugePages`.
    let peak = granules_needed(size) * size.bytes();
    match with_store(&store, &[(0, peak)]) {
        Err(MemoryError::Frames(FrameError::NoHugePages { .. })) => {
            skip(&name, &shortage(size));
            return;
        }
        Err(e) => panic!("{name}: {e}"),
        Ok(m) => drop(m),
    }
    conformance(&name, store);
}

#[test]
fn hugetlb_2m() {
    hugetlb(PageSize::Size2M);
}

/// On hugetlb a library write to one 4 KiB page gives its whole huge page
/// memory, so a library read of a released page beside it finds memory and
/// takes the page back, and the next discard of the huge page counts that
/// page released again. The model knows (found by the random sequences:
/// `released 2 pages, expected 1` after discard, write, read, discard).
#[test]
fn hugetlb_write_gives_the_huge_page_memory_for_its_neighbours_too() {
    use pagefold_models::model::Op;
    let _pool = huge_pool();
    let options = StoreOptions {
        backing: Backing::Hugetlb(PageSize::Size2M),
        ..StoreOptions::default()
    };
    let Some(store) = store_for("hugetlb 2M", options) else {
        return;
    };
    let (start, size) = (0x200_0000u64, 0x20_0000u64);
    let mem = match with_store(&store, &[(start, size)]) {
        Err(MemoryError::Frames(FrameError::NoHugePages { .. })) => {
            skip("hugetlb 2M", &shortage(PageSize::Size2M));
            return;
        }
        other => other.expect("valid layout"),
    };
    let mut model = Model::new(&[(start, size)], store.granule().bytes()).expect("valid layout");
    let end = start + size;
    let discard = Op::Discard {
        addr: start,
        len: size,
    };
    model.apply(&mem, &discard).expect("discard");
    let write = Op::Write {
        addr: end - 53,
        data: vec![1, 2, 3],
    };
    model.apply(&mem, &write).expect("write");
    // Reads the released page before the written one: it holds memory now.
    model
        .check_range(&mem, end - 2 * 4096, 2 * 4096)
        .expect("read back");
    model.apply(&mem, &discard).expect("discard again");
    model.check_all(&mem).expect("memory equals the model");
}

#[test]
fn hugetlb_1g() {
    hugetlb(PageSize::Size1G);
}

/// Asking for more huge pages than the kernel can give fails when the
/// memory is built (`FrameError::NoHugePages`), rather than handing out a
/// mapping whose first touch kills the process with SIGBUS (hugetlbfs only
/// finds out at fault time unless pages are reserved at `mmap`). Nothing
/// here touches the memory.
#[test]
fn hugetlb_shortage_is_an_error_not_a_sigbus() {
    let _pool = huge_pool();
    for size in [PageSize::Size2M, PageSize::Size1G] {
        let Some((free, more)) = huge_pages_available(size) else {
            continue;
        };
        let options = StoreOptions {
            backing: Backing::Hugetlb(size),
            ..StoreOptions::default()
        };
        let store = match FrameStore::new(options) {
            Ok(s) => Arc::new(s),
            Err(FrameError::NoHugePages { .. }) => continue,
            Err(e) => panic!("hugetlb {size}: {e}"),
        };
        let too_many = (free + more + 1) * size.bytes();
        match with_store(&store, &[(0, too_many)]) {
            Err(MemoryError::Frames(FrameError::NoHugePages { size: s })) => assert_eq!(s, size),
            Err(e) => panic!("hugetlb {size}: {e} instead of NoHugePages"),
            Ok(_) => panic!(
                "hugetlb {size}: {} huge pages handed out with {} available; \
                 the first touch past them raises SIGBUS",
                free + more + 1,
                free + more
            ),
        }
    }
}
