//! Library reads of released pages (zero or ballooned, read from their
//! frame with `pread`) racing a change of the page's backing, made
//! deterministic with userfaultfd: the racing change runs while the
//! reading thread waits in a page fault at the exact point of the race.
//!
//! * The `pread` of a released run copies into the caller's buffer; a
//!   buffer page registered for missing-page faults stops the reader inside
//!   the `pread`, after it read one page and before the next, while the
//!   next page is written (it becomes private) and merged by dedup (its own
//!   frame punched). The merged page must read as its bytes, not as the
//!   hole its own frame now is.
//! * A word read of a page mid-inflate (ballooned and locked, its frame not
//!   yet punched) must not go through the mapping: a minor-fault
//!   registration on the guest page stops a read through the mapping, the
//!   inflate's punch lands there, and the read then makes the kernel
//!   allocate the page again.
//!
//! Needs userfaultfd with kernel-mode faults (root or
//! `vm.unprivileged_userfaultfd=1`), as dedup does.

// A failed unwrap is a failed test; every size here is small.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
};

use pagefold::{
    frames::FrameRange,
    memory::{self, PageState},
    paging::PhysMemory,
    Balloon, DedupHost, FrameNumber, FrameStore, GuestMemory, GuestPhysAddr, PageKind, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;

/// A bare userfaultfd for the tests: missing-page faults on an anonymous
/// buffer, minor faults on a shmem page.
struct Uffd {
    fd: OwnedFd,
}

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

impl Uffd {
    /// A userfaultfd that receives kernel-mode faults too (a `pread`'s copy
    /// into a registered buffer), with `features`.
    fn new(features: u64) -> Self {
        // SAFETY: plain syscall with flag arguments only.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert!(
            raw >= 0,
            "userfaultfd: {} (needs root or vm.unprivileged_userfaultfd=1)",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid, writable `uffdio_api` for the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) };
        assert_eq!(rc, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
        Uffd { fd }
    }

    fn register(&self, addr: u64, len: u64, mode: u64) {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid, writable `uffdio_register`; the kernel
        // checks the range against this process's mappings.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
        assert_eq!(
            rc,
            0,
            "UFFDIO_REGISTER: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The address of the next page fault, or `None` if none came within
    /// `ms` milliseconds (the handler threads poll so they can stop).
    fn next_fault(&self, ms: i32) -> Option<u64> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return None;
        }
        let mut msg = UffdMsg::default();
        // SAFETY: `msg` is a writable buffer of exactly one `uffd_msg`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut msg as *mut UffdMsg).cast(),
                std::mem::size_of::<UffdMsg>(),
            )
        };
        (n == std::mem::size_of::<UffdMsg>() as isize && msg.event == UFFD_EVENT_PAGEFAULT)
            .then_some(msg.address)
    }

    /// Resolves a missing-page fault at `addr` with a page of zeros (and
    /// wakes the faulting thread).
    fn zero_fill(&self, addr: u64) {
        let zeros = vec![0u8; PAGE_SIZE];
        let mut copy = UffdioCopy {
            dst: addr & !(PAGE - 1),
            src: zeros.as_ptr() as u64,
            len: PAGE,
            mode: 0,
            copy: 0,
        };
        // SAFETY: `copy` is a valid `uffdio_copy`; `src` is a readable page
        // that outlives the call; the kernel checks `dst`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut copy) };
        assert_eq!(rc, 0, "UFFDIO_COPY: {}", std::io::Error::last_os_error());
    }

    /// Wakes threads waiting on faults at `addr`'s page: they retry.
    fn wake(&self, addr: u64) {
        let mut range = UffdioRange {
            start: addr & !(PAGE - 1),
            len: PAGE,
        };
        // SAFETY: `range` is a valid `uffdio_range` for the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range) };
        assert_eq!(rc, 0, "UFFDIO_WAKE: {}", std::io::Error::last_os_error());
    }
}

/// An anonymous private mapping of `len` bytes, unmapped on drop.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping; no address is imposed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Anon {
            ptr: ptr.cast(),
            len,
        }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: `ptr, len` is the mapping `new` made; nothing uses it now.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn page_state(m: &GuestMemory, page: u64) -> PageState {
    let (r, off) = m.region_of(GuestPhysAddr(page * PAGE)).unwrap();
    r.page_state((off / PAGE) as usize).unwrap()
}

/// Writes `byte` over page `page` through the host mapping, as a vCPU
/// would (the library does not see it).
fn raw_fill(m: &GuestMemory, page: u64, byte: u8) {
    let host = m.host_address(GuestPhysAddr(page * PAGE)).unwrap().0 as *mut u8;
    // SAFETY: `host` is the first byte of a guest page inside the memory's
    // live mapping; nothing holds a reference to guest memory.
    unsafe { std::ptr::write_bytes(host, byte, PAGE_SIZE) };
}

/// Review finding: a read of a run of released pages loaded their states
/// once and then `pread` their own frames, with no second look. A page of
/// the run that meanwhile became private and was merged (dedup punches the
/// own frame, then publishes the new state) read as the hole, zeros,
/// though it held its bytes throughout.
#[test]
fn a_released_page_merged_during_the_read_keeps_its_bytes() {
    const A: u8 = 0xa1;
    const X: u8 = 0x5c;
    let store = Arc::new(FrameStore::memfd().unwrap());
    let m = Arc::new(
        GuestMemory::with_store(Arc::clone(&store), &[(GuestPhysAddr(0), 4 * PAGE)]).unwrap(),
    );
    // Page 2 holds X (it will be page 1's merge partner); pages 0 and 1 are
    // reported free, then reused by the vCPU: released by their state,
    // holding A and X in their frames.
    m.fill(GuestPhysAddr(2 * PAGE), X, PAGE_SIZE).unwrap();
    m.fill(GuestPhysAddr(0), 0x77, 2 * PAGE_SIZE).unwrap();
    assert_eq!(m.discard(GuestPhysAddr(0), 2 * PAGE).unwrap(), 2);
    raw_fill(&m, 0, A);
    raw_fill(&m, 1, X);
    assert_eq!(page_state(&m, 1).kind(), PageKind::Zero);
    let host = Arc::new(DedupHost::new(Arc::clone(&store)).unwrap());
    host.register(Arc::clone(&m), Default::default()).unwrap();

    let buf = Anon::new(2 * PAGE_SIZE);
    let uffd = Arc::new(Uffd::new(0));
    uffd.register(buf.ptr as u64, 2 * PAGE, UFFDIO_REGISTER_MODE_MISSING);
    let stop = Arc::new(AtomicBool::new(false));
    let merged = Arc::new(AtomicBool::new(false));
    let handler = {
        let (uffd, stop, merged, m, host) = (
            Arc::clone(&uffd),
            Arc::clone(&stop),
            Arc::clone(&merged),
            Arc::clone(&m),
            Arc::clone(&host),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let Some(addr) = uffd.next_fault(50) else {
                    continue;
                };
                if !merged.swap(true, Ordering::AcqRel) {
                    // The reader is inside its `pread`, page 0 read, page 1
                    // not yet: page 1 is written (the same bytes) and merged
                    // with page 2, its own frame punched.
                    m.write(GuestPhysAddr(PAGE), &[X; PAGE_SIZE]).unwrap();
                    host.merge_now().unwrap();
                }
                uffd.zero_fill(addr);
            }
        })
    };
    // SAFETY: `buf` is a live private mapping of two pages that nothing
    // else references; the kernel fills its pages on fault (the handler's
    // UFFDIO_COPY) while this thread waits, as a device would.
    let dst = unsafe { std::slice::from_raw_parts_mut(buf.ptr, 2 * PAGE_SIZE) };
    m.read(GuestPhysAddr(0), dst).unwrap();
    stop.store(true, Ordering::Release);
    handler.join().unwrap();

    assert!(merged.load(Ordering::Acquire), "the read never faulted");
    let s = page_state(&m, 1);
    assert!(s.is_remapped(), "page 1 was merged during the read: {s:?}");
    assert!(dst[..PAGE_SIZE].iter().all(|&b| b == A), "page 0");
    let wrong = dst[PAGE_SIZE..].iter().filter(|&&b| b != X).count();
    assert_eq!(
        wrong, 0,
        "page 1 held X throughout, but {wrong} bytes read otherwise (first {:#x})",
        dst[PAGE_SIZE]
    );
    let mut again = [0u8; PAGE_SIZE];
    m.read(GuestPhysAddr(PAGE), &mut again).unwrap();
    assert!(again.iter().all(|&b| b == X));
}

/// Review finding: a word read of a page mid-inflate (ballooned and
/// locked, memory not yet punched) saw the page hold memory (`mincore`)
/// and loaded the word through the mapping; an inflate's punch landing in
/// between made that load allocate the page again, which
/// `Balloon::reclaim_touched` then took for a page the guest used. Here
/// the page is taken exactly as `Balloon`'s inflate takes it (its state to
/// ballooned and locked, the punch, the unlock), and the punch lands while
/// a read through the mapping waits in its fault. Every word read: an
/// aligned `read_obj`, an atomic `load`, the page-table walker's entry
/// load.
#[test]
fn a_word_read_during_an_inflate_allocates_nothing() {
    type WordRead = fn(&GuestMemory, u64) -> u64;
    let reads: [(&str, WordRead); 3] = [
        ("read_obj", |m, gpa| {
            m.read_obj::<u64>(GuestPhysAddr(gpa)).unwrap()
        }),
        ("load", |m, gpa| {
            m.load::<u64>(GuestPhysAddr(gpa), Ordering::SeqCst).unwrap()
        }),
        ("walker entry load", |m, gpa| {
            PhysMemory::read_u64(m, gpa).unwrap()
        }),
    ];
    let grew: Vec<String> = reads
        .iter()
        .filter_map(|&(name, read)| {
            word_read_during_an_inflate(read).map(|e| format!("{name}: {e}"))
        })
        .collect();
    assert!(grew.is_empty(), "{grew:#?}");
}

/// One read of [`a_word_read_during_an_inflate_allocates_nothing`]:
/// `None` if it allocated nothing, else what went wrong.
fn word_read_during_an_inflate(read: fn(&GuestMemory, u64) -> u64) -> Option<String> {
    const P: u64 = 1;
    const AT: u64 = 0x40;
    const VALUE: u64 = 0x1122_3344_5566_7788;
    let m = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), 4 * PAGE)]).unwrap());
    let b = Balloon::new(Arc::clone(&m));
    m.fill(GuestPhysAddr(0), 0x33, 4 * PAGE_SIZE).unwrap();
    m.write_obj(GuestPhysAddr(P * PAGE + AT), VALUE).unwrap();
    // Page 3 ballooned: the region consults page states from now on.
    assert_eq!(
        b.inflate_range(GuestPhysAddr(3 * PAGE), PAGE)
            .unwrap()
            .applied,
        1
    );
    let allocated = || m.frame_store().allocated_bytes().unwrap();
    assert_eq!(allocated(), 3 * PAGE);

    // No page-table entry for page P in this process (the memfd keeps the
    // page), so a load through the mapping faults; the minor-fault
    // registration holds that fault for the handler.
    let host = m.host_address(GuestPhysAddr(P * PAGE)).unwrap().0;
    // SAFETY: `host` is a page-aligned page of the guest mapping; dropping
    // its page-table entry leaves the shared memfd page in place.
    let rc = unsafe { libc::madvise(host as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    let uffd = Arc::new(Uffd::new(UFFD_FEATURE_MINOR_SHMEM));
    uffd.register(host, PAGE, UFFDIO_REGISTER_MODE_MINOR);

    // The inflate's first step: ballooned and locked, memory still there.
    let (r, _) = m.region_of(GuestPhysAddr(P * PAGE)).unwrap();
    let taken = memory::__test::hold_as(r, P as usize, PageKind::Ballooned)
        .unwrap()
        .unwrap();
    let frame = FrameRange {
        start: FrameNumber(r.frames().start.0 + P),
        count: 1,
    };
    let punched = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (uffd, stop, punched, faults, m) = (
            Arc::clone(&uffd),
            Arc::clone(&stop),
            Arc::clone(&punched),
            Arc::clone(&faults),
            Arc::clone(&m),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let Some(addr) = uffd.next_fault(50) else {
                    continue;
                };
                faults.fetch_add(1, Ordering::Relaxed);
                // The inflate's punch lands while the read waits.
                if !punched.swap(true, Ordering::AcqRel) {
                    m.frame_store().release(frame).unwrap();
                }
                uffd.wake(addr);
            }
        })
    };
    let got = read(&m, P * PAGE + AT);
    stop.store(true, Ordering::Release);
    handler.join().unwrap();
    // The inflate goes on: its punch (unless it landed already), the unlock.
    if !punched.load(Ordering::Acquire) {
        m.frame_store().release(frame).unwrap();
    }
    memory::__test::release(r, P as usize, taken).unwrap();

    // Mid-inflate the page reads as before or as ballooned.
    assert!(got == VALUE || got == 0, "read {got:#x}");
    if allocated() != 2 * PAGE {
        return Some(format!(
            "the read gave the ballooned page memory again ({} bytes allocated, {} faults through the mapping)",
            allocated(),
            faults.load(Ordering::Relaxed)
        ));
    }
    assert_eq!(b.reclaim_touched().unwrap(), 0, "only the host read it");
    assert_eq!(read(&m, P * PAGE + AT), 0);
    None
}
