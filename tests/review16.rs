//! Review of issue 16's layers (vm-memory traits, VMM-memory adoption,
//! hotplug): each test shows a defect found in review and fails until it is
//! fixed. Each says what is wrong and what is expected.

// A failed unwrap is a failed test; every size here is small.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use pagefold::{
    memory::FileRegion,
    migration::{MigrationError, PrecopyOptions, Sender},
    FrameError, GuestMemory, GuestPhysAddr, GuestRegion, MemoryError,
};
use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}

/// A VMM's memfd of `len` bytes.
fn vmm_memfd(len: u64) -> OwnedFd {
    // SAFETY: a static NUL-terminated name and memfd flags.
    let raw = unsafe { libc::memfd_create(c"review16".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "memfd_create");
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain syscall on our descriptor.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(rc, 0);
    fd
}

/// Memory of one 1 MiB region whose pages need state checks (one page
/// discarded), so every write path goes through `prepare_write`.
fn checked_memory() -> GuestMemory {
    let mem = GuestMemory::new(&[(gpa(0), MIB)]).unwrap();
    mem.write(gpa(0), &[1u8; PAGE as usize]).unwrap();
    mem.discard(gpa(0), PAGE).unwrap();
    mem
}

/// `src/rust_vmm/region.rs` (`read_volatile_from`): a zero-count read from
/// a source at the region's very end (offset == len, which `clip` accepts
/// as an empty access) calls `prepare_write(len, 0)`, which loads the page
/// state of page `len / 4096`, one past the table: an index-out-of-bounds
/// panic once the region needs state checks (after any discard, balloon
/// inflate or dedup merge). vm-memory's own regions answer `Ok(0)` (an
/// empty slice at the end is in bounds); a device doing a zero-length
/// transfer must not crash the VMM.
#[test]
fn zero_count_read_volatile_from_at_region_end_is_ok() {
    let mem = checked_memory();
    let region = &*mem.regions()[0];
    let mut src: &[u8] = &[];
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Bytes::read_volatile_from(region, MemoryRegionAddress(MIB), &mut src, 0).map_err(|_| ())
    }));
    assert!(
        matches!(got, Ok(Ok(0))),
        "zero-count read_volatile_from at the region's end must be Ok(0) \
         as on GuestRegionMmap, got {got:?}"
    );
}

/// Same defect through `read_exact_volatile_from`: count 0 at offset == len
/// passes `clip`, then `prepare_write(len, 0)` indexes one page past the
/// state table and panics. Expected `Ok(())`, as vm-memory's regions.
#[test]
fn zero_count_read_exact_volatile_from_at_region_end_is_ok() {
    let mem = checked_memory();
    let region = &*mem.regions()[0];
    let mut src: &[u8] = &[];
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Bytes::read_exact_volatile_from(region, MemoryRegionAddress(MIB), &mut src, 0)
            .map_err(|_| ())
    }));
    assert!(
        matches!(got, Ok(Ok(()))),
        "zero-count read_exact_volatile_from at the region's end must be Ok(()), got {got:?}"
    );
}

/// `src/frames/allocator.rs` (`reserve`) and `src/frames/mod.rs` (`free`):
/// a VMM region's run is reserved "for good", and a region that drops
/// (after `remove_region`) leaves it reserved. So a VMM that unplugs a
/// DIMM / virtio-mem block of its file and plugs it back at the same file
/// offset is refused forever, though nothing uses the run any more (and
/// un-reserving would be safe: the run lies below the allocator's floor,
/// so it would never be handed out). Expected: the same `FileRegion` can be
/// plugged again once the removed region is gone.
#[test]
fn an_unplugged_file_region_can_be_plugged_back() {
    let fd = vmm_memfd(4 * MIB);
    let a = FileRegion {
        guest_start: gpa(0),
        size: MIB,
        file_offset: 0,
    };
    let b = FileRegion {
        guest_start: gpa(16 * MIB),
        size: MIB,
        file_offset: MIB,
    };
    let mem = GuestMemory::from_file(fd.as_fd(), &[a, b]).unwrap();
    let store = std::sync::Arc::clone(mem.frame_store());
    let (smaller, removed) = mem.remove_region(b.guest_start, b.size).unwrap();
    drop(mem);
    drop(removed);
    let again = GuestRegion::from_file(&store, b);
    assert!(
        again.is_ok(),
        "plugging back a region whose predecessor at the same file offset is gone \
         must work: {:?}",
        again.err()
    );
    let grown = smaller.insert_region(again.unwrap()).unwrap();
    assert_eq!(grown.regions().len(), 2);
}

/// `src/frames/mod.rs` (`FrameStore::reserve`): a run that overlaps a
/// reserved run *exactly* (the same offset and size as a live region) is
/// reported as `FrameError::NotAllocated`, because the allocator's `Err`
/// carries the overlapped run and `reserve` takes "equal to the request"
/// to mean "past the file / free overlap". `GuestRegion::from_file` and
/// `FrameStore::reserve` document `FrameError::Reserved` for a run that
/// overlaps another region's; a VMM telling a double plug from a bad
/// offset relies on it. Expected: `Reserved` naming the other run.
#[test]
fn plugging_a_live_regions_run_again_is_reserved() {
    let fd = vmm_memfd(4 * MIB);
    let a = FileRegion {
        guest_start: gpa(0),
        size: MIB,
        file_offset: MIB,
    };
    let mem = GuestMemory::from_file(fd.as_fd(), &[a]).unwrap();
    let twin = FileRegion {
        guest_start: gpa(32 * MIB),
        ..a
    };
    let got = GuestRegion::from_file(mem.frame_store(), twin);
    assert!(
        matches!(
            got,
            Err(MemoryError::Frames(FrameError::Reserved {
                other_start: 256,
                other_count: 256,
                ..
            }))
        ),
        "the same run as a live region must be FrameError::Reserved, got {:?}",
        got.err()
    );
}

/// `src/memory/mod.rs` (`claim_for_migration`): the migration claim is a
/// flag of the `GuestMemory`, not of its regions, while dirty logs are the
/// regions'. A memory built over the same regions (`from_regions`, or the
/// memory `insert_region`/`remove_region` makes during a migration) starts
/// unclaimed, so a second `Sender` runs over the same dirty logs: each
/// harvest takes marks the other never sees (lost dirty pages, a corrupt
/// destination), and each turns tracking off under the other when it
/// drops. Dedup claims were made per region for exactly this reason.
/// Expected: `MigrationError::Busy`.
#[test]
fn a_second_sender_over_shared_regions_is_busy() {
    let mem = GuestMemory::new(&[(gpa(0), MIB), (gpa(4 * MIB), MIB)]).unwrap();
    let twin = GuestMemory::from_regions(mem.regions().to_vec()).unwrap();
    let first = Sender::start(&mem, Vec::new(), PrecopyOptions::default()).unwrap();
    let second = Sender::start(&twin, Vec::new(), PrecopyOptions::default());
    assert!(
        matches!(second, Err(MigrationError::Busy)),
        "a second sender over the same regions must be Busy"
    );
    drop(first);
}

/// `src/rust_vmm/region.rs` (`clip`, used by `Bytes::write`/`read`): an
/// empty buffer at an offset past the region's end is an `OutOfBounds`
/// error, where vm-memory's regions (`VolatileSlice::write`/`read`, and
/// `GuestMemoryRegionBytes`) return `Ok(0)` for any empty access before
/// looking at the offset. Generic device code that issues zero-length
/// accesses (descriptors of length 0) sees an error only on pagefold.
/// Expected: `Ok(0)`, as `GuestRegionMmap`.
#[test]
fn empty_region_accesses_past_the_end_are_ok_zero_like_guest_region_mmap() {
    let mem = GuestMemory::new(&[(gpa(0), MIB)]).unwrap();
    let region = &*mem.regions()[0];
    let theirs = vm_memory::GuestRegionMmap::<()>::from_range(
        vm_memory::GuestAddress(0),
        MIB as usize,
        None,
    )
    .unwrap();
    let past = MemoryRegionAddress(2 * MIB);
    assert_eq!(Bytes::write(&theirs, &[], past).unwrap(), 0);
    assert_eq!(Bytes::read(&theirs, &mut [], past).unwrap(), 0);
    assert_eq!(
        GuestMemoryRegion::len(&theirs),
        GuestMemoryRegion::len(region)
    );
    assert_eq!(
        Bytes::write(region, &[], past).ok(),
        Some(0),
        "empty write past the end"
    );
    assert_eq!(
        Bytes::read(region, &mut [], past).ok(),
        Some(0),
        "empty read past the end"
    );
}

/// `src/memory/adopt.rs` (`GuestRegion::from_file`) with
/// `src/frames/allocator.rs` (`reserve`): the run is reserved before the
/// region is checked against the memory it is meant for, and a region that
/// drops leaves its run reserved. A hotplug that `insert_region` refuses
/// (here: a guest address overlapping a present region, an ordinary VMM
/// mistake to retry) burns the file's run for good: the corrected retry at
/// the same file offset is refused. Expected: the retry succeeds.
#[test]
fn a_refused_hotplug_does_not_burn_the_file_run() {
    let fd = vmm_memfd(4 * MIB);
    let a = FileRegion {
        guest_start: gpa(0),
        size: MIB,
        file_offset: 0,
    };
    let mem = GuestMemory::from_file(fd.as_fd(), &[a]).unwrap();
    let wrong = FileRegion {
        guest_start: gpa(0),
        size: MIB,
        file_offset: 2 * MIB,
    };
    let region = GuestRegion::from_file(mem.frame_store(), wrong).unwrap();
    assert!(mem.insert_region(region).is_err(), "overlaps region 0");
    let right = FileRegion {
        guest_start: gpa(8 * MIB),
        ..wrong
    };
    let retry = GuestRegion::from_file(mem.frame_store(), right);
    assert!(
        retry.is_ok(),
        "the run of a refused (and dropped) hotplug region must be usable again: {:?}",
        retry.err()
    );
}

/// `src/frames/mod.rs` (`FrameStore::adopt_file`) / `src/memory/adopt.rs`
/// (`GuestMemory::from_file`): the reservations and the allocator live in
/// the store, not with the file, and nothing stops a second adoption of a
/// file a live store already adopted (a VMM hotplugging with a second
/// `from_file` instead of `GuestRegion::from_file`, or one process keeping
/// two guests in one memfd at disjoint offsets, which `from_file` accepts).
/// Each store then hands out frames from the same floor (the file's end):
/// the same file pages become shared frames of both (dedup), each
/// overwriting and punching the other's. Expected: the two stores never
/// hand out the same frame of the file (or the second adoption is refused).
#[test]
fn two_adoptions_of_one_file_never_share_a_frame() {
    let fd = vmm_memfd(4 * MIB);
    let one = GuestMemory::from_file(
        fd.as_fd(),
        &[FileRegion {
            guest_start: gpa(0),
            size: MIB,
            file_offset: 0,
        }],
    )
    .unwrap();
    let two = match GuestMemory::from_file(
        fd.as_fd(),
        &[FileRegion {
            guest_start: gpa(0),
            size: MIB,
            file_offset: 2 * MIB,
        }],
    ) {
        Ok(m) => m,
        Err(_) => return, // refused: fine
    };
    let (s1, s2) = (one.frame_store(), two.frame_store());
    let f1 = s1.allocate(1).unwrap();
    let f2 = s2.allocate(1).unwrap();
    s1.write_frames(f1.start, &[0x11; PAGE as usize]).unwrap();
    s2.write_frames(f2.start, &[0x22; PAGE as usize]).unwrap();
    let mut back = [0u8; PAGE as usize];
    s1.read_frames(f1.start, &mut back).unwrap();
    assert_eq!(
        back[0], 0x11,
        "store 1's frame {:?} was overwritten by store 2's frame {:?} of the same file",
        f1, f2
    );
}

/// `src/frames/mod.rs` (`FrameStore::adopt_file`): the descriptor's access
/// mode is not checked. A VMM that maps its memfd read-write itself and
/// hands `adopt_mapped_file` a read-only descriptor of it (reopened through
/// `/proc/self/fd`, or a descriptor it received read-only) passes every
/// adoption check, and then every feature that writes the file through
/// pagefold's duplicate (punching for discard and balloon, growing it and
/// `pwrite` for dedup's shared frames and unmerges) fails later, at run
/// time. (An `O_APPEND` descriptor is worse: Linux's `pwrite` ignores the
/// offset there, so frames written back land at the file's end.) Expected:
/// adoption refuses a descriptor not open for reading and writing.
#[test]
fn adoption_refuses_a_read_only_descriptor() {
    let rw = vmm_memfd(2 * MIB);
    // SAFETY: a shared read-write mapping of our own memfd, kept for the test.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (2 * MIB) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            rw.as_raw_fd(),
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", rw.as_raw_fd())).unwrap();
    let region = pagefold::memory::MappedFileRegion {
        guest_start: gpa(0),
        size: 2 * MIB,
        host_addr: pagefold::HostVirtAddr(host as u64),
        file_offset: 0,
    };
    // SAFETY: the range is our live MAP_SHARED rw mapping of the file at
    // offset 0, left mapped for the rest of the process.
    let got = unsafe { GuestMemory::adopt_mapped_file(ro.as_fd(), &[region]) };
    if let Ok(mem) = &got {
        // What the VMM meets later: the file cannot be punched.
        mem.write(gpa(0), &[7u8; 16]).unwrap();
        let discard = mem.discard(gpa(0), PAGE);
        assert!(
            discard.is_ok(),
            "adopted a read-only descriptor; discard then fails: {discard:?}"
        );
    }
}

/// `src/frames/mod.rs` (`check_granule`, via `FrameRange::end`): the range
/// check computes `start + count` unchecked, so a caller's range near the
/// top of the frame-number space (`start` = `u64::MAX`) overflows: a panic
/// ("attempt to add with overflow") in debug builds, and a wrapped end that
/// slips under `MAX_FRAMES` in release builds. Reachable from the pub
/// `FrameStore::reserve`, `free`, `release` and `map` with any caller
/// input. Expected: a typed error (`Misaligned`/`TooLarge`/`NotAllocated`).
#[test]
fn frame_ranges_near_the_top_are_errors_not_panics() {
    use pagefold::{addr::FrameNumber, frames::FrameRange};
    let fd = vmm_memfd(MIB);
    let mem = GuestMemory::from_file(
        fd.as_fd(),
        &[FileRegion {
            guest_start: gpa(0),
            size: MIB,
            file_offset: 0,
        }],
    )
    .unwrap();
    let store = mem.frame_store();
    let top = FrameRange {
        start: FrameNumber(u64::MAX),
        count: 1,
    };
    for (what, call) in [
        (
            "reserve",
            &(|| store.reserve(top).is_err()) as &dyn Fn() -> bool,
        ),
        ("free", &|| store.free(top).is_err()),
        ("release", &|| store.release(top).is_err()),
        ("map", &|| store.map(top).is_err()),
    ] {
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
        assert!(
            matches!(got, Ok(true)),
            "{what} of frames {top:?} must be a typed error, not a panic"
        );
    }
}

/// `src/frames/mod.rs` (`FrameStore::release`, also `write_frames`): on a
/// VMM's file the store checks nothing about the range, so it punches
/// (or overwrites) bytes the VMM never gave pagefold: the runs of its file
/// that no region names, which `adopt_file` promises to leave alone
/// ("Other runs of the file are left alone"; `free` already refuses them
/// with `NotAllocated`). A VMM keeping anything else in its memfd (a
/// second guest, firmware, a region not yet plugged) loses it to one call
/// with a wrong range. Expected: `release` of a run that is neither one of
/// the VMM's reserved runs nor allocated by the store is refused, and the
/// VMM's bytes survive.
#[test]
fn release_leaves_the_vmms_unnamed_runs_alone() {
    use pagefold::{addr::FrameNumber, frames::FrameRange};
    let fd = vmm_memfd(4 * MIB);
    let mem = GuestMemory::from_file(
        fd.as_fd(),
        &[FileRegion {
            guest_start: gpa(0),
            size: MIB,
            file_offset: 0,
        }],
    )
    .unwrap();
    // The VMM's own bytes at 3 MiB, a run no region names.
    let data = [0x5au8; PAGE as usize];
    // SAFETY: `data` is readable for its length; the fd is open.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            (3 * MIB) as libc::off_t,
        )
    };
    assert_eq!(n, PAGE as isize);
    let theirs = FrameRange {
        start: FrameNumber(3 * MIB / PAGE),
        count: 1,
    };
    let got = mem.frame_store().release(theirs);
    let mut back = [0u8; PAGE as usize];
    // SAFETY: `back` is writable for its length; the fd is open.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            back.as_mut_ptr().cast(),
            back.len(),
            (3 * MIB) as libc::off_t,
        )
    };
    assert_eq!(n, PAGE as isize);
    assert!(
        got.is_err() && back == data,
        "release of the VMM's unnamed run must be refused and leave its bytes: \
         got {got:?}, first byte now {:#x}",
        back[0]
    );
}

/// `src/rust_vmm/region.rs` (`read_volatile_from`, `store`): the pages are
/// brought to the private state (`prepare_write`) for the whole requested
/// count before anything is read from the source, so a transfer that moves
/// nothing (count 0 here, which is plainly avoidable; a source at EOF or a
/// short read does the same, which would need a bounce buffer) turns a
/// released page (discarded, reported free, ballooned) into a private one
/// though no byte was written: the page then counts as taken back (a
/// ballooned one as deflated), and pagefold's later reads go through the
/// mapping, which makes the kernel allocate the memory the release gave
/// back. vm-memory's own regions change nothing for an empty transfer.
/// Expected: a released page stays released after a zero-count transfer.
#[test]
fn an_empty_transfer_leaves_a_released_page_released() {
    let mem = checked_memory();
    let region = &*mem.regions()[0];
    let before = region.page_state(0).unwrap().kind();
    assert_ne!(before, pagefold::PageKind::Private, "discarded");
    let mut src: &[u8] = &[];
    let n = Bytes::read_volatile_from(region, MemoryRegionAddress(0), &mut src, 0).unwrap();
    assert_eq!(n, 0);
    assert_eq!(
        region.page_state(0).unwrap().kind(),
        before,
        "no byte of the page was written, yet it left the released state"
    );
}
