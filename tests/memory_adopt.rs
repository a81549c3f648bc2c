//! Guest memory over what a VMM made: its memfd at offsets of its choosing
//! (bytes meet at those offsets both ways, dropping punches nothing), its
//! hugetlbfs memfd, its own mapping of the file (used in place, left
//! mapped), and its anonymous memory (access, dirty log, raw-write
//! tracker, migration both ways; every feature that needs a file refused
//! by name). Dedup folds a
//! VMM's memfd for real. Bad descriptions are typed errors naming the
//! region.

// A failed unwrap is a failed test; every size here is small.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::Arc,
};

use pagefold::{
    dirty::RegionSet,
    frames::FrameRange,
    memory::{AnonymousRegion, FileRegion, MappedFileRegion},
    migration::{receive, ReaderLimits, StreamReader, StreamWriter, WriterOptions},
    service::{ClientOptions, ServiceClient, ServiceError},
    AccessError, Balloon, BalloonError, DedupError, DedupHost, FrameError, FrameStore, GuestMemory,
    GuestPhysAddr, HostVirtAddr, LayoutError, MemoryError, PageSize, VmOptions, PAGE_SIZE,
};

const MIB: u64 = 1 << 20;
/// A host address no process maps (the kernel's half).
const NOWHERE: u64 = 0xffff_8000_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;

fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}

/// What a VMM does first: a memfd of `len` bytes (`flags` adds to
/// `MFD_CLOEXEC`), or `None` where the kernel refuses (no huge pages).
fn vmm_memfd(len: u64, flags: libc::c_uint) -> Option<OwnedFd> {
    // SAFETY: a static NUL-terminated name and memfd flags.
    let raw = unsafe { libc::memfd_create(c"vmm-guest".as_ptr(), libc::MFD_CLOEXEC | flags) };
    if raw < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain syscall on our descriptor.
    (unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } == 0).then_some(fd)
}

fn pread(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` is writable for `len` bytes; the fd is open.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, offset as i64) };
    assert_eq!(n, len as isize, "pread at {offset:#x}");
    buf
}

fn pwrite(fd: BorrowedFd<'_>, offset: u64, data: &[u8]) {
    // SAFETY: `data` is readable for its length; the fd is open.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            offset as i64,
        )
    };
    assert_eq!(n, data.len() as isize, "pwrite at {offset:#x}");
}

fn blocks(fd: BorrowedFd<'_>) -> i64 {
    // SAFETY: `st` is filled by a successful fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid buffer, open fd.
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
    st.st_blocks
}

/// The VMM's own mapping of `len` bytes: `flags` with `fd` at `offset`,
/// or anonymous when `fd` is -1.
fn vmm_mmap(len: u64, flags: libc::c_int, fd: libc::c_int, offset: u64) -> *mut u8 {
    // SAFETY: a fresh mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            offset as libc::off_t,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "the VMM's mmap");
    p.cast()
}

fn vmm_munmap(p: *mut u8, len: u64) {
    // SAFETY: the test's own mapping, no longer used.
    unsafe { libc::munmap(p.cast(), len as usize) };
}

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

#[test]
fn memfd_regions_meet_the_vmm_at_its_offsets() {
    let file = vmm_memfd(16 * MIB, 0).unwrap();
    let regions = [
        FileRegion {
            guest_start: gpa(MIB),
            size: 2 * MIB,
            file_offset: 8 * MIB,
        },
        FileRegion {
            guest_start: gpa(0),
            size: MIB,
            file_offset: 4 * MIB,
        },
    ];
    let mem = GuestMemory::from_file(file.as_fd(), &regions).unwrap();
    assert_eq!(mem.total_size(), 3 * MIB);
    let infos = mem.region_infos();
    assert_eq!(infos[0].file_offset, 4 * MIB);
    assert_eq!(infos[1].file_offset, 8 * MIB);
    assert_ne!(
        infos[0].fd,
        file.as_raw_fd(),
        "pagefold holds its own duplicate"
    );

    // Written through pagefold: in the file at the region's offsets.
    let a = pattern(1, 3 * PAGE_SIZE);
    mem.write(gpa(0x3000), &a).unwrap();
    assert_eq!(pread(file.as_fd(), 4 * MIB + 0x3000, a.len()), a);
    let b = pattern(2, 100);
    mem.write(gpa(MIB + 0x1_0010), &b).unwrap();
    assert_eq!(pread(file.as_fd(), 8 * MIB + 0x1_0010, b.len()), b);
    // A write spanning both regions lands at both offsets.
    let c = pattern(3, 2 * PAGE_SIZE);
    mem.write(gpa(MIB - PAGE), &c).unwrap();
    assert_eq!(
        pread(file.as_fd(), 5 * MIB - PAGE, PAGE_SIZE),
        c[..PAGE_SIZE]
    );
    assert_eq!(pread(file.as_fd(), 8 * MIB, PAGE_SIZE), c[PAGE_SIZE..]);

    // Written into the file: read through pagefold.
    let d = pattern(4, 5000);
    pwrite(file.as_fd(), 8 * MIB + MIB, &d);
    let mut back = vec![0u8; d.len()];
    mem.read(gpa(2 * MIB), &mut back).unwrap();
    assert_eq!(back, d);
    assert_eq!(
        mem.read_obj::<u64>(gpa(2 * MIB)).unwrap().to_le_bytes(),
        d[..8]
    );

    // Frames allocated later (hotplug) never take the VMM's offsets.
    let store = Arc::clone(mem.frame_store());
    assert!(store.is_vmm_file());
    let fresh = store.allocate(4).unwrap();
    assert!(fresh.start.file_offset() >= 16 * MIB, "{fresh:?}");
    store.free(fresh).unwrap();
    // Nor give back what is the VMM's: a region's run, or a run it named
    // for no region.
    assert!(matches!(
        store.free(FrameRange {
            start: pagefold::FrameNumber(0),
            count: 16,
        }),
        Err(FrameError::NotAllocated { .. })
    ));
    assert!(matches!(
        store.reserve(FrameRange {
            start: pagefold::FrameNumber(8 * MIB / PAGE),
            count: 1,
        }),
        Err(FrameError::Reserved { .. })
    ));
    // A VMM region hotplugged from the same file, and one overlapping.
    let plugged = pagefold::memory::GuestRegion::from_file(
        &store,
        FileRegion {
            guest_start: gpa(8 * MIB),
            size: MIB,
            file_offset: 12 * MIB,
        },
    )
    .unwrap();
    let bigger = mem.insert_region(plugged).unwrap();
    bigger.write(gpa(8 * MIB + 8), b"hotplug").unwrap();
    assert_eq!(pread(file.as_fd(), 12 * MIB + 8, 7), b"hotplug");
    let clash = pagefold::memory::GuestRegion::from_file(
        &store,
        FileRegion {
            guest_start: gpa(10 * MIB),
            size: MIB,
            file_offset: 8 * MIB + MIB,
        },
    );
    assert!(
        matches!(
            clash,
            Err(MemoryError::Frames(FrameError::Reserved { start, other_start, .. }))
                if start == (9 * MIB) / PAGE && other_start == (8 * MIB) / PAGE
        ),
        "{clash:?}"
    );

    // Dropping the memory punches nothing: the VMM's bytes stay.
    let held = blocks(file.as_fd());
    drop(bigger);
    drop(mem);
    drop(store);
    assert_eq!(blocks(file.as_fd()), held, "drop punched the VMM's file");
    assert_eq!(pread(file.as_fd(), 4 * MIB + 0x3000, a.len()), a);
    assert_eq!(pread(file.as_fd(), 12 * MIB + 8, 7), b"hotplug");
}

#[test]
fn bad_file_descriptions_are_typed_and_name_the_region() {
    let file = vmm_memfd(4 * MIB, 0).unwrap();
    let one = |guest_start, size, file_offset| FileRegion {
        guest_start: gpa(guest_start),
        size,
        file_offset,
    };

    // Not a regular file: a directory, a pipe.
    let dir = std::fs::File::open("/").unwrap();
    let e = GuestMemory::from_file(dir.as_fd(), &[one(0, MIB, 0)]).unwrap_err();
    assert!(
        matches!(e, MemoryError::Frames(FrameError::NotAdoptable { what }) if what.contains("regular file")),
        "{e}"
    );
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors nobody else owns.
    let (r, _w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    assert!(matches!(
        GuestMemory::from_file(r.as_fd(), &[one(0, MIB, 0)]),
        Err(MemoryError::Frames(FrameError::NotAdoptable { .. }))
    ));

    // The file too small for the second region.
    let e = GuestMemory::from_file(file.as_fd(), &[one(0, MIB, 0), one(MIB, 2 * MIB, 3 * MIB)])
        .unwrap_err();
    assert!(
        matches!(
            e,
            MemoryError::Layout(LayoutError::FileTooSmall {
                index: 1,
                file_offset,
                size,
                file_size
            }) if file_offset == 3 * MIB && size == 2 * MIB && file_size == 4 * MIB
        ),
        "{e}"
    );
    assert!(e.to_string().contains("region 1"), "{e}");

    // Misaligned: file offset, guest start, size.
    assert!(matches!(
        GuestMemory::from_file(file.as_fd(), &[one(0, MIB, 100)]),
        Err(MemoryError::Layout(LayoutError::FileMisaligned {
            index: 0,
            file_offset: 100,
            align: 4096
        }))
    ));
    assert!(matches!(
        GuestMemory::from_file(file.as_fd(), &[one(0, MIB, 0), one(2 * MIB + 1, PAGE, MIB)]),
        Err(MemoryError::Layout(LayoutError::Misaligned {
            index: 1,
            ..
        }))
    ));
    assert!(matches!(
        GuestMemory::from_file(file.as_fd(), &[one(0, MIB + 1, 0)]),
        Err(MemoryError::Layout(LayoutError::Misaligned {
            index: 0,
            ..
        }))
    ));

    // Two regions on the same bytes of the file.
    let e = GuestMemory::from_file(
        file.as_fd(),
        &[one(0, MIB, 2 * MIB), one(4 * MIB, MIB, 2 * MIB + MIB / 2)],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            MemoryError::Layout(LayoutError::FileOverlap { first: 0, second: 1, file_offset })
                if file_offset == 2 * MIB + MIB / 2
        ),
        "{e}"
    );
    // Guest addresses overlapping stay the layout's error.
    assert!(matches!(
        GuestMemory::from_file(file.as_fd(), &[one(0, 2 * MIB, 0), one(MIB, MIB, 2 * MIB)]),
        Err(MemoryError::Layout(LayoutError::Overlap { .. }))
    ));
}

/// Huge pages for one test, put back as they were when it ends.
struct HugePages {
    restore: Option<String>,
}

impl HugePages {
    const NR: &'static str = "/proc/sys/vm/nr_hugepages";

    /// At least `want` free 2 MiB pages, reserving some as root if there
    /// are not; `None` if the machine cannot give them.
    fn get(want: u64) -> Option<HugePages> {
        let free = || {
            std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let total = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Total:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if total > 0 && free() >= want {
            return Some(HugePages { restore: None });
        }
        let old = std::fs::read_to_string(Self::NR).ok()?;
        let n = old.trim().parse::<u64>().ok()?;
        let guard = HugePages {
            restore: Some(old.trim().to_owned()),
        };
        std::fs::write(Self::NR, (n + want).to_string()).ok()?;
        (free() >= want).then_some(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(old) = &self.restore {
            let _ = std::fs::write(Self::NR, old);
        }
    }
}

#[test]
fn hugetlbfs_memfd_uses_its_huge_pages() {
    const HUGE: u64 = 2 * MIB;
    let Some(_pages) = HugePages::get(4) else {
        println!("SKIP hugetlbfs_memfd_uses_its_huge_pages: no 2 MiB huge pages on this machine");
        return;
    };
    let Some(file) = vmm_memfd(4 * HUGE, libc::MFD_HUGETLB | libc::MFD_HUGE_2MB) else {
        println!("SKIP hugetlbfs_memfd_uses_its_huge_pages: no hugetlb memfd");
        return;
    };
    // Misaligned to the file's 2 MiB pages: offset, then size.
    let e = GuestMemory::from_file(
        file.as_fd(),
        &[FileRegion {
            guest_start: gpa(0),
            size: HUGE,
            file_offset: PAGE,
        }],
    )
    .unwrap_err();
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::FileMisaligned { align, .. }) if align == HUGE),
        "{e}"
    );
    assert!(matches!(
        GuestMemory::from_file(
            file.as_fd(),
            &[FileRegion {
                guest_start: gpa(0),
                size: MIB,
                file_offset: 0,
            }],
        ),
        Err(MemoryError::Layout(LayoutError::Misaligned { align, .. })) if align == HUGE
    ));

    let mem = Arc::new(
        GuestMemory::from_file(
            file.as_fd(),
            &[FileRegion {
                guest_start: gpa(0),
                size: 2 * HUGE,
                file_offset: HUGE,
            }],
        )
        .unwrap(),
    );
    assert_eq!(mem.frame_store().granule(), PageSize::Size2M);
    let a = pattern(9, 3 * PAGE_SIZE);
    mem.write(gpa(HUGE + 0x5000), &a).unwrap();
    assert_eq!(pread(file.as_fd(), 2 * HUGE + 0x5000, a.len()), a);
    // hugetlbfs takes no write(2): the VMM writes through a mapping of its
    // own (of a huge page pagefold's mapping already holds).
    let vmm = vmm_mmap(HUGE, libc::MAP_SHARED, file.as_raw_fd(), HUGE);
    // SAFETY: inside the VMM's live mapping.
    unsafe { std::ptr::copy_nonoverlapping(b"from the vmm".as_ptr(), vmm.add(64), 12) };
    vmm_munmap(vmm, HUGE);
    let mut back = [0u8; 12];
    mem.read(gpa(64), &mut back).unwrap();
    assert_eq!(&back, b"from the vmm");

    // Dedup on huge pages stays refused, by its own error.
    let host = DedupHost::new(Arc::new(FrameStore::memfd().unwrap())).unwrap();
    assert!(matches!(
        host.register(Arc::clone(&mem), VmOptions::default()),
        Err(DedupError::HugeBacking(PageSize::Size2M))
    ));

    let held = blocks(file.as_fd());
    drop(host);
    drop(mem);
    assert_eq!(
        blocks(file.as_fd()),
        held,
        "drop punched the VMM's huge pages"
    );
    assert_eq!(pread(file.as_fd(), 2 * HUGE + 0x5000, a.len()), a);
}

#[test]
fn the_vmms_own_mapping_is_used_in_place() {
    let file = vmm_memfd(8 * MIB, 0).unwrap();
    let len = 2 * MIB;
    let host = vmm_mmap(len, libc::MAP_SHARED, file.as_raw_fd(), 2 * MIB);
    let region = MappedFileRegion {
        guest_start: gpa(0x1000_0000),
        size: len,
        host_addr: HostVirtAddr(host as u64),
        file_offset: 2 * MIB,
    };
    // SAFETY: the mapping above is MAP_SHARED of `file` at 2 MiB, and
    // stays mapped, untouched, until after the memory drops.
    let mem = unsafe { GuestMemory::adopt_mapped_file(file.as_fd(), &[region]) }.unwrap();
    assert_eq!(mem.regions()[0].host_addr(), HostVirtAddr(host as u64));
    assert_eq!(
        mem.host_address(gpa(0x1000_0010)).unwrap(),
        HostVirtAddr(host as u64 + 0x10)
    );

    // Through pagefold, seen by the VMM's pointer and in the file.
    let a = pattern(5, 2 * PAGE_SIZE);
    mem.write(gpa(0x1000_3000), &a).unwrap();
    let mut seen = vec![0u8; a.len()];
    // SAFETY: inside the VMM's live mapping.
    unsafe { std::ptr::copy_nonoverlapping(host.add(0x3000), seen.as_mut_ptr(), seen.len()) };
    assert_eq!(seen, a);
    assert_eq!(pread(file.as_fd(), 2 * MIB + 0x3000, a.len()), a);
    // Through the VMM's pointer, seen by pagefold.
    // SAFETY: inside the VMM's live mapping.
    unsafe { std::ptr::copy_nonoverlapping(b"vcpu".as_ptr(), host.add(0x8000), 4) };
    let mut back = [0u8; 4];
    mem.read(gpa(0x1000_8000), &mut back).unwrap();
    assert_eq!(&back, b"vcpu");

    // Dropped: the VMM's mapping is still there, bytes and all.
    drop(mem);
    let mut after = [0u8; 4];
    // SAFETY: the VMM's mapping, which pagefold must not have unmapped.
    unsafe { std::ptr::copy_nonoverlapping(host.add(0x8000), after.as_mut_ptr(), 4) };
    assert_eq!(&after, b"vcpu");

    // What /proc/self/maps shows otherwise is refused, naming the region.
    let at = |host_addr: u64, file_offset| MappedFileRegion {
        guest_start: gpa(0),
        size: len,
        host_addr: HostVirtAddr(host_addr),
        file_offset,
    };
    let bad = |r: MappedFileRegion| {
        // SAFETY: every case is refused before anything is adopted.
        unsafe { GuestMemory::adopt_mapped_file(file.as_fd(), &[r]) }.unwrap_err()
    };
    let e = bad(at(host as u64, 0));
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::BadMapping { index: 0, what, .. }) if what.contains("offsets")),
        "{e}"
    );
    let private = vmm_mmap(len, libc::MAP_PRIVATE, file.as_raw_fd(), 0);
    let e = bad(at(private as u64, 0));
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::BadMapping { what, .. }) if what.contains("private")),
        "{e}"
    );
    vmm_munmap(private, len);
    let other = vmm_memfd(8 * MIB, 0).unwrap();
    let elsewhere = vmm_mmap(len, libc::MAP_SHARED, other.as_raw_fd(), 0);
    let e = bad(at(elsewhere as u64, 0));
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::BadMapping { what, .. }) if what.contains("another file")),
        "{e}"
    );
    vmm_munmap(elsewhere, len);
    // Not mapped at all (in the kernel's half: a freed range of our own
    // could be mapped again meanwhile by another test's thread).
    vmm_munmap(host, len);
    let e = bad(at(NOWHERE, 2 * MIB));
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::BadMapping { what, .. }) if what.contains("not mapped")),
        "{e}"
    );
    let e = bad(at(host as u64 + 1, 2 * MIB));
    assert!(
        matches!(
            e,
            MemoryError::Layout(LayoutError::HostMisaligned { index: 0, .. })
        ),
        "{e}"
    );
}

/// Anonymous guest memory of a VMM: regions at 0 and 4 MiB, 2 MiB each,
/// in one private (or shared) anonymous mapping of 4 MiB.
fn anonymous(shared: bool) -> (GuestMemory, *mut u8) {
    let kind = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    let host = vmm_mmap(4 * MIB, kind | libc::MAP_ANONYMOUS, -1, 0);
    let regions = [
        AnonymousRegion {
            guest_start: gpa(4 * MIB),
            size: 2 * MIB,
            host_addr: HostVirtAddr(host as u64 + 2 * MIB),
        },
        AnonymousRegion {
            guest_start: gpa(0),
            size: 2 * MIB,
            host_addr: HostVirtAddr(host as u64),
        },
    ];
    // SAFETY: the mapping above is anonymous, readable and writable, and
    // each test unmaps it only after dropping the memory.
    let mem = unsafe { GuestMemory::adopt_anonymous(&regions) }.unwrap();
    (mem, host)
}

#[test]
fn anonymous_memory_serves_access_and_the_dirty_log() {
    for shared in [false, true] {
        let (mem, host) = anonymous(shared);
        assert!(!mem.frame_store().has_file());
        assert!(mem.region_infos().iter().all(|i| i.fd == -1));
        // vm-memory's view agrees: no file a vhost-user backend could map.
        assert!(mem
            .regions()
            .iter()
            .all(|r| vm_memory::GuestMemoryRegion::file_offset(&**r).is_none()));
        assert_eq!(
            mem.regions()[1].host_addr(),
            HostVirtAddr(host as u64 + 2 * MIB)
        );

        let a = pattern(7, 3 * PAGE_SIZE);
        mem.write(gpa(4 * MIB + 0x2000), &a).unwrap();
        let mut seen = vec![0u8; a.len()];
        // SAFETY: inside the VMM's live mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                host.add(2 * MIB as usize + 0x2000),
                seen.as_mut_ptr(),
                a.len(),
            )
        };
        assert_eq!(seen, a);
        // SAFETY: inside the VMM's live mapping.
        unsafe { std::ptr::write_volatile(host.add(0x10).cast::<u64>(), 0xfeed) };
        assert_eq!(mem.read_obj::<u64>(gpa(0x10)).unwrap(), 0xfeed);
        assert_eq!(
            mem.load::<u32>(gpa(0x10), std::sync::atomic::Ordering::Acquire)
                .unwrap(),
            0xfeed
        );
        assert!(matches!(
            mem.write(gpa(2 * MIB), b"hole"),
            Err(AccessError::Unmapped { .. })
        ));

        // The dirty log: library writes, and KVM's bitmap merged in.
        mem.set_dirty_tracking(RegionSet::All, true).unwrap();
        mem.write(gpa(0x5000), b"x").unwrap();
        mem.write(gpa(4 * MIB + 0x7000), b"y").unwrap();
        let mut kvm = vec![0u64; 512 / 64];
        kvm[0] = 1 << 9;
        mem.merge_dirty_bitmap(1, &kvm).unwrap();
        let mut runs = Vec::new();
        assert_eq!(mem.harvest_dirty(RegionSet::All, &mut runs).unwrap(), 3);
        let pages: Vec<_> = runs.iter().flat_map(|r| r.addrs()).collect();
        assert_eq!(
            pages,
            [gpa(0x5000), gpa(4 * MIB + 0x7000), gpa(4 * MIB + 0x9000)]
        );
        assert_eq!(mem.harvest_dirty(RegionSet::All, &mut runs).unwrap(), 0);

        // Dropped: the VMM's memory is still mapped, bytes and all.
        drop(mem);
        // SAFETY: the VMM's mapping, which pagefold must not have unmapped.
        let kept = unsafe { std::ptr::read_volatile(host.add(0x10).cast::<u64>()) };
        assert_eq!(kept, 0xfeed);
        vmm_munmap(host, 4 * MIB);
    }
}

/// Sends all of `mem` in one round, verified.
fn send(mem: &GuestMemory) -> Vec<u8> {
    let mut w = StreamWriter::for_memory(Vec::new(), mem, WriterOptions::default()).unwrap();
    w.begin_round(0).unwrap();
    for r in mem.regions() {
        for p in 0..r.size() / PAGE {
            w.send_page(mem, gpa(r.start().0 + p * PAGE)).unwrap();
        }
    }
    w.finish_verified(mem).unwrap().0
}

fn assert_same(a: &GuestMemory, b: &GuestMemory) {
    assert_eq!(a.region_infos().len(), b.region_infos().len());
    let (mut x, mut y) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for r in a.regions() {
        for p in 0..r.size() / PAGE {
            let at = gpa(r.start().0 + p * PAGE);
            a.read(at, &mut x).unwrap();
            b.read(at, &mut y).unwrap();
            assert!(x == y, "page {at} differs");
        }
    }
}

#[test]
fn anonymous_memory_migrates_both_ways() {
    let (anon, host) = anonymous(false);
    for i in 0..64u64 {
        // Mixed pages: zero, duplicated, unique.
        let p = match i % 3 {
            0 => vec![0u8; PAGE_SIZE],
            1 => pattern(1, PAGE_SIZE),
            _ => pattern(i as u8, PAGE_SIZE),
        };
        anon.write(gpa(i * 3 * PAGE), &p).unwrap();
        anon.write(gpa(4 * MIB + i * 5 * PAGE), &p).unwrap();
    }
    // Out: into normal memory.
    let bytes = send(&anon);
    let (normal, _) = receive(&bytes[..], ReaderLimits::default()).unwrap();
    assert!(normal.frame_store().has_file());
    assert_same(&anon, &normal);

    // In: a normal memory's stream into fresh anonymous memory (its zero
    // pages filled, since there is nothing to release).
    normal.write(gpa(0x1000), &pattern(42, PAGE_SIZE)).unwrap();
    normal.fill(gpa(3 * PAGE), 0, PAGE_SIZE).unwrap();
    let bytes = send(&normal);
    let (fresh, fresh_host) = anonymous(false);
    let mut reader = StreamReader::new(&bytes[..], ReaderLimits::default()).unwrap();
    reader.apply_all(&fresh, |_| {}).unwrap();
    assert_same(&normal, &fresh);

    drop(anon);
    drop(fresh);
    vmm_munmap(host, 4 * MIB);
    vmm_munmap(fresh_host, 4 * MIB);
}

#[test]
fn anonymous_memory_refuses_what_needs_a_file_by_name() {
    let (mem, host) = anonymous(false);
    let mem = Arc::new(mem);
    let needs = |e: &FrameError, feature: &str| {
        matches!(e, FrameError::NeedsFile { feature: f } if *f == feature)
            && e.to_string()
                == format!("{feature} needs guest memory in a memfd; this memory is anonymous")
    };

    // Dedup: registering the memory, or a host over its store.
    let host_store = Arc::new(FrameStore::memfd().unwrap());
    let dedup = DedupHost::new(host_store).unwrap();
    match dedup.register(Arc::clone(&mem), VmOptions::default()) {
        Err(DedupError::Frames(e)) => assert!(needs(&e, "dedup"), "{e}"),
        other => panic!("dedup of anonymous memory: {other:?}"),
    }
    match DedupHost::new(Arc::clone(mem.frame_store())) {
        Err(DedupError::Frames(e)) => assert!(needs(&e, "dedup"), "{e}"),
        other => panic!("dedup host on an anonymous store: {:?}", other.err()),
    }
    // The memory was left unclaimed: a raw-write tracker may still have it
    // (it needs no file), had dedup claimed it this would say so.
    drop(dedup);

    // Discard.
    mem.write(gpa(0), b"kept").unwrap();
    match mem.discard(gpa(0), PAGE) {
        Err(AccessError::Frames(e)) => assert!(needs(&e, "discard"), "{e}"),
        other => panic!("discard of anonymous memory: {other:?}"),
    }
    let mut back = [0u8; 4];
    mem.read(gpa(0), &mut back).unwrap();
    assert_eq!(&back, b"kept", "a refused discard changed nothing");

    // Balloon: inflates and free page reports; the page stays the guest's.
    let balloon = Balloon::new(Arc::clone(&mem));
    let report = balloon.inflate_pfns(&[gpa(0).frame(), gpa(4 * MIB).frame()]);
    assert_eq!(report.applied, 0);
    assert_eq!(report.errors.len(), 2);
    for e in &report.errors {
        match &e.error {
            BalloonError::Release { source, .. } => assert!(needs(source, "balloon"), "{source}"),
            other => panic!("inflate of anonymous memory: {other}"),
        }
    }
    match balloon.report_free(gpa(4 * MIB), 0) {
        Err(BalloonError::Release { source, .. }) => assert!(needs(&source, "balloon")),
        other => panic!("free page report of anonymous memory: {other:?}"),
    }
    assert_eq!(mem.census().ballooned, 0);
    mem.read(gpa(0), &mut back).unwrap();
    assert_eq!(&back, b"kept");

    // The host service: refused before any socket is touched.
    let socket = std::env::temp_dir().join("pagefold-memory-adopt-no-such.sock");
    match ServiceClient::attach(&socket, Arc::clone(&mem), ClientOptions::default()) {
        Err(ServiceError::Frames(e)) => assert!(needs(&e, "the host service"), "{e}"),
        other => panic!("service attach of anonymous memory: {:?}", other.err()),
    }

    // The store itself: frames name no memory.
    let store = mem.frame_store();
    let frames = FrameRange {
        start: mem.regions()[0].frames().start,
        count: 1,
    };
    assert!(matches!(
        store.release(frames),
        Err(FrameError::NeedsFile { .. })
    ));
    assert!(matches!(
        store.map(frames),
        Err(FrameError::NeedsFile { .. })
    ));
    assert!(matches!(
        store.allocated_bytes(),
        Err(FrameError::NeedsFile { .. })
    ));
    assert!(matches!(
        store.file("x"),
        Err(FrameError::NeedsFile { feature: "x" })
    ));

    drop(balloon);
    drop(mem);
    vmm_munmap(host, 4 * MIB);
}

#[test]
fn bad_anonymous_descriptions_are_typed() {
    let host = vmm_mmap(2 * MIB, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
    let file = vmm_memfd(2 * MIB, 0).unwrap();
    let private_file = vmm_mmap(2 * MIB, libc::MAP_PRIVATE, file.as_raw_fd(), 0);
    let region = |g, h: *mut u8, size| AnonymousRegion {
        guest_start: gpa(g),
        size,
        host_addr: HostVirtAddr(h as u64),
    };
    let adopt = |r: &[AnonymousRegion]| {
        // SAFETY: every case is refused before anything is adopted.
        unsafe { GuestMemory::adopt_anonymous(r) }.unwrap_err()
    };
    let e = adopt(&[
        region(0, host, MIB),
        region(MIB, host.wrapping_add(MIB as usize / 2), MIB),
    ]);
    assert!(
        matches!(
            e,
            MemoryError::Layout(LayoutError::HostOverlap {
                first: 0,
                second: 1,
                ..
            })
        ),
        "{e}"
    );
    let e = adopt(&[region(0, NOWHERE as *mut u8, MIB)]);
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::BadMapping { index: 0, what, .. }) if what.contains("not mapped")),
        "{e}"
    );
    // Half of it the VMM made inaccessible.
    // SAFETY: the upper half of the test's own mapping, unused.
    let rc =
        unsafe { libc::mprotect(host.add(MIB as usize).cast(), MIB as usize, libc::PROT_NONE) };
    assert_eq!(rc, 0);
    let e = adopt(&[region(0, host, 2 * MIB)]);
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::BadMapping { index: 0, what, .. }) if what.contains("readable and writable")),
        "{e}"
    );
    let e = adopt(&[region(0, private_file, MIB)]);
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::BadMapping { what, .. }) if what.contains("of a file")),
        "{e}"
    );
    let e = adopt(&[region(0, host.wrapping_add(8), MIB)]);
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::HostMisaligned { .. })),
        "{e}"
    );
    let e = adopt(&[region(0, host, MIB + 1)]);
    assert!(
        matches!(e, MemoryError::Layout(LayoutError::Misaligned { .. })),
        "{e}"
    );
    vmm_munmap(host, 2 * MIB);
    vmm_munmap(private_file, 2 * MIB);
}

const DEDUP_PAGES: u64 = 1024;

/// Page `i`: the first half four contents repeated, the third quarter
/// zero, the last quarter unique.
fn dedup_content(i: u64) -> Vec<u8> {
    match i * 4 / DEDUP_PAGES {
        0 | 1 => pattern((i % 4) as u8 + 10, PAGE_SIZE),
        2 => vec![0u8; PAGE_SIZE],
        _ => {
            let mut p = pattern(0, PAGE_SIZE);
            p[..8].copy_from_slice(&i.to_le_bytes());
            p
        }
    }
}

#[test]
fn dedup_folds_a_vmms_memfd() {
    let file = vmm_memfd(8 * MIB, 0).unwrap();
    let offset = 2 * MIB;
    let mem = Arc::new(
        GuestMemory::from_file(
            file.as_fd(),
            &[FileRegion {
                guest_start: gpa(0),
                size: DEDUP_PAGES * PAGE,
                file_offset: offset,
            }],
        )
        .unwrap(),
    );
    for i in 0..DEDUP_PAGES {
        mem.write(gpa(i * PAGE), &dedup_content(i)).unwrap();
    }
    let host = DedupHost::new(Arc::new(FrameStore::memfd().unwrap())).unwrap();
    let vm = host
        .register(Arc::clone(&mem), VmOptions::default())
        .unwrap();
    let before = mem.frame_store().allocated_bytes().unwrap();
    assert_eq!(before, blocks(file.as_fd()) as u64 * 512);
    let report = host.merge_now().unwrap();
    let after = mem.frame_store().allocated_bytes().unwrap();
    let zero = DEDUP_PAGES / 4;
    let dup = DEDUP_PAGES / 2;
    assert_eq!(report.merged_zero, zero);
    assert_eq!(report.merged_shared, dup);
    let stats = host.stats().unwrap();
    assert_eq!(stats.pages_shared, 4);
    assert_eq!(stats.pages_sharing, dup - 4);
    // The VMM's file gave the merged pages' memory back (the kernel's
    // figure, from its fstat).
    assert!(
        before - after >= (zero + dup) * PAGE,
        "the VMM's file held {before} bytes before, {after} after"
    );
    let mut buf = vec![0u8; PAGE_SIZE];
    for i in 0..DEDUP_PAGES {
        mem.read(gpa(i * PAGE), &mut buf).unwrap();
        assert!(buf == dedup_content(i), "page {i} changed by the merge");
    }

    // Writes after the merge land, in the page alone. (The file does not
    // hold them yet: a merged page's copy on write lives in anonymous
    // memory until the host unmerges it, which is why a VMM reaches such
    // memory only through pagefold.)
    mem.write(gpa(5 * PAGE + 100), b"written after").unwrap();
    mem.write(gpa(600 * PAGE), b"zero no more").unwrap();
    let mut want5 = dedup_content(5);
    want5[100..113].copy_from_slice(b"written after");
    mem.read(gpa(5 * PAGE), &mut buf).unwrap();
    assert!(buf == want5);
    mem.read(gpa(9 * PAGE), &mut buf).unwrap();
    assert!(
        buf == dedup_content(9),
        "a page sharing the frame kept its bytes"
    );
    let mut zero_no_more = [0u8; 12];
    mem.read(gpa(600 * PAGE), &mut zero_no_more).unwrap();
    assert_eq!(&zero_no_more, b"zero no more");

    // Unregistered, every page's bytes are back at its offset in the file.
    host.unregister(vm).unwrap();
    let mut want600 = vec![0u8; PAGE_SIZE];
    want600[..12].copy_from_slice(b"zero no more");
    for i in 0..DEDUP_PAGES {
        let want = match i {
            5 => want5.clone(),
            600 => want600.clone(),
            _ => dedup_content(i),
        };
        assert!(
            pread(file.as_fd(), offset + i * PAGE, PAGE_SIZE) == want,
            "page {i} is not back in the VMM's file"
        );
    }
}

#[test]
fn the_raw_write_tracker_needs_no_file() {
    for shared in [false, true] {
        let (mem, host) = anonymous(shared);
        let mem = Arc::new(mem);
        let tracker = match pagefold::RawWriteTracker::new(Arc::clone(&mem), RegionSet::All) {
            Ok(t) => t,
            Err(pagefold::DirtyError::TrackerUnavailable { reason }) => {
                println!("SKIP the_raw_write_tracker_needs_no_file: {reason}");
                drop(mem);
                vmm_munmap(host, 4 * MIB);
                return;
            }
            Err(e) => panic!("tracker over anonymous memory (shared: {shared}): {e}"),
        };
        assert_eq!(tracker.collect().unwrap(), 0, "nothing written yet");
        for off in [0x3000u64, 2 * MIB + 0x5008] {
            // SAFETY: inside the VMM's live mapping, aligned; a vCPU's store.
            unsafe { host.add(off as usize).cast::<u64>().write_volatile(0xfeed) };
        }
        assert_eq!(tracker.collect().unwrap(), 2);
        let mut runs = Vec::new();
        mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();
        let pages: Vec<_> = runs.iter().flat_map(|r| r.addrs()).collect();
        assert_eq!(pages, [gpa(0x3000), gpa(4 * MIB + 0x5000)]);
        drop(tracker);
        drop(mem);
        vmm_munmap(host, 4 * MIB);
    }
}
