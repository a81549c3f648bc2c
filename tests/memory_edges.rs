//! Named, deterministic cases at the edges of guest memory's access rules:
//! zero-length accesses, ranges that wrap the address space, `discard`
//! alignment, refused writes, region boundaries, and raw writes to released
//! pages. Each pins one rule of `crates/pagefold-models/src/model.rs` that the proptests would
//! otherwise only hit at random.

use std::sync::atomic::Ordering;

use pagefold::{AccessError, GuestMemory, GuestPhysAddr};

const PAGE: u64 = 4096;
const PAGE_LEN: usize = 4096;
/// Highest end a region can have (the top page can never be mapped).
const TOP_END: u64 = 0xFFFF_FFFF_FFFF_F000;

const fn gpa(a: u64) -> GuestPhysAddr {
    GuestPhysAddr(a)
}

/// Two adjacent regions at 0x10000 (2 + 1 pages), a hole, one page at
/// 0x20000, and the highest possible page.
fn memory() -> GuestMemory {
    GuestMemory::new(&[
        (gpa(0x10000), 2 * PAGE),
        (gpa(0x12000), PAGE),
        (gpa(0x20000), PAGE),
        (gpa(TOP_END - PAGE), PAGE),
    ])
    .expect("valid layout")
}

/// A zero-length access touches no address, so it has no first unbacked
/// address to report and succeeds wherever it points; `read`, `write`,
/// `fill` and `discard` must agree on that.
#[test]
fn zero_length_accesses_succeed_anywhere() {
    let m = memory();
    for addr in [0x10000, 0x13000, 0x5000, TOP_END, u64::MAX] {
        let a = gpa(addr);
        let results = [
            ("read", m.read(a, &mut [])),
            ("write", m.write(a, &[])),
            ("fill", m.fill(a, 0xff, 0)),
        ];
        for (what, r) in results {
            assert_eq!(r, Ok(()), "{what} of 0 bytes at {addr:#x}");
        }
    }
    assert_eq!(m.discard(gpa(0x5000), 0), Ok(0));
    assert_eq!(m.discard(gpa(TOP_END), 0), Ok(0));
}

/// A range whose end wraps past `u64::MAX` is `Overflow`, whether it starts
/// in a region, in a hole or in the top page that can never be mapped: the
/// request itself is impossible, before any lookup. `fill` already does
/// this; `read`, `write`, `read_obj` and `write_obj` must say the same.
#[test]
fn ranges_that_wrap_report_overflow_wherever_they_start() {
    let m = memory();
    let cases = [
        (TOP_END - PAGE + 0x800, 2 * PAGE_LEN), // starts mapped
        (TOP_END + 0x800, PAGE_LEN),            // starts in the top page
        (u64::MAX - 3, 8),
        (u64::MAX, 1), // the last byte: `addr + len` is 2^64
    ];
    for (addr, len) in cases {
        let want = Err(AccessError::Overflow {
            addr: gpa(addr),
            len,
        });
        assert_eq!(m.fill(gpa(addr), 1, len), want, "fill {addr:#x}+{len:#x}");
        assert_eq!(
            m.read(gpa(addr), &mut vec![0; len]),
            want,
            "read {addr:#x}+{len:#x}"
        );
        assert_eq!(
            m.write(gpa(addr), &vec![0; len]),
            want,
            "write {addr:#x}+{len:#x}"
        );
    }
    let top = u64::MAX - 3;
    let want = |len| {
        Err(AccessError::Overflow {
            addr: gpa(top),
            len,
        })
    };
    assert_eq!(m.read_obj::<u64>(gpa(top)).map(|_| ()), want(8));
    assert_eq!(m.write_obj::<u64>(gpa(top), 1), want(8));
    // Not wrapping: the first unbacked address, even in the top page.
    assert_eq!(
        m.read(gpa(TOP_END), &mut [0; 16]),
        Err(AccessError::Unmapped { addr: gpa(TOP_END) })
    );
    assert_eq!(
        m.write(gpa(TOP_END - 8), &[0; 16]),
        Err(AccessError::Unmapped { addr: gpa(TOP_END) })
    );
    // Fits exactly: the last mappable byte.
    m.write_obj(gpa(TOP_END - 1), 0xabu8)
        .expect("last mappable byte");
    assert_eq!(m.read_obj::<u8>(gpa(TOP_END - 1)), Ok(0xab));
}

/// `discard` names an unaligned start, and for an unaligned length the
/// unaligned end of the range (`addr + len`), never the length itself
/// dressed up as an address.
#[test]
fn discard_with_unaligned_length_names_the_unaligned_end() {
    let m = memory();
    assert_eq!(
        m.discard(gpa(0x10800), PAGE),
        Err(AccessError::Misaligned {
            addr: gpa(0x10800),
            align: PAGE
        })
    );
    assert_eq!(
        m.discard(gpa(0x11000), 0x1800),
        Err(AccessError::Misaligned {
            addr: gpa(0x12800),
            align: PAGE
        })
    );
}

/// Alignment is checked first, then wrapping, then mapping.
#[test]
fn discard_checks_alignment_then_range() {
    let m = memory();
    assert_eq!(
        m.discard(gpa(0x5000), PAGE),
        Err(AccessError::Unmapped { addr: gpa(0x5000) })
    );
    assert_eq!(
        m.discard(gpa(TOP_END), PAGE),
        Err(AccessError::Overflow {
            addr: gpa(TOP_END),
            len: PAGE_LEN
        })
    );
    assert_eq!(
        m.discard(gpa(0x5001), PAGE),
        Err(AccessError::Misaligned {
            addr: gpa(0x5001),
            align: PAGE
        })
    );
}

/// A write that runs from two adjacent regions into a hole is refused as a
/// whole: the error names the hole's first address and no byte of either
/// region changes. The same range is refused by `fill` and `discard`.
#[test]
fn refused_spanning_write_changes_nothing() {
    let m = memory();
    let before: Vec<u8> = (0..3 * PAGE).map(|i| (i % 251).to_le_bytes()[0]).collect();
    m.write(gpa(0x10000), &before).expect("three mapped pages");
    let hole = Err(AccessError::Unmapped { addr: gpa(0x13000) });
    assert_eq!(m.write(gpa(0x10800), &[0; 3 * PAGE_LEN]), hole);
    assert_eq!(m.fill(gpa(0x10800), 0, 3 * PAGE_LEN), hole);
    assert_eq!(m.discard(gpa(0x11000), 3 * PAGE).map(|_| ()), hole);
    let mut after = vec![0; before.len()];
    m.read(gpa(0x10000), &mut after)
        .expect("three mapped pages");
    assert_eq!(after, before);
}

/// Objects of every width at every offset across the boundary of two
/// adjacent regions read back whole, little-endian.
#[test]
fn objects_straddling_adjacent_regions_round_trip() {
    let m = memory();
    let boundary = 0x12000;
    for off in 1..8u64 {
        let at = gpa(boundary - off);
        m.write_obj(at, 0x1122_3344_5566_7788u64 ^ off)
            .expect("mapped");
        assert_eq!(m.read_obj::<u64>(at), Ok(0x1122_3344_5566_7788 ^ off));
        let mut le = [0; 8];
        m.read(at, &mut le).expect("mapped");
        assert_eq!(u64::from_le_bytes(le), 0x1122_3344_5566_7788 ^ off);
        m.write_obj(at, 0xa1b2_c3d4u32).expect("mapped");
        assert_eq!(m.read_obj::<u32>(at), Ok(0xa1b2_c3d4));
        m.write_obj(at, 0xbeefu16).expect("mapped");
        assert_eq!(m.read_obj::<u16>(at), Ok(0xbeef));
    }
    // Across a hole instead: the hole's first address.
    assert_eq!(
        m.read_obj::<u32>(gpa(0x20ffe)).map(|_| ()),
        Err(AccessError::Unmapped { addr: gpa(0x21000) })
    );
}

/// Atomics: alignment before mapping, and a natural alignment that makes
/// straddling a region's end impossible.
#[test]
fn atomics_check_alignment_before_mapping() {
    let m = memory();
    assert_eq!(
        m.load::<u32>(gpa(0x5002), Ordering::SeqCst),
        Err(AccessError::Misaligned {
            addr: gpa(0x5002),
            align: 4
        })
    );
    assert_eq!(
        m.store::<u64>(gpa(0x5000), 1, Ordering::SeqCst),
        Err(AccessError::Unmapped { addr: gpa(0x5000) })
    );
    assert_eq!(
        m.swap::<u16>(gpa(0x11fff), 1, Ordering::SeqCst),
        Err(AccessError::Misaligned {
            addr: gpa(0x11fff),
            align: 2
        })
    );
    m.store::<u64>(gpa(0x11ff8), 7, Ordering::SeqCst)
        .expect("last u64 of a region");
    assert_eq!(
        m.compare_exchange::<u64>(gpa(0x11ff8), 7, 9, Ordering::SeqCst, Ordering::SeqCst),
        Ok(Ok(7))
    );
    assert_eq!(
        m.compare_exchange::<u64>(gpa(0x11ff8), 7, 11, Ordering::SeqCst, Ordering::SeqCst),
        Ok(Err(9))
    );
    assert_eq!(m.read_obj::<u64>(gpa(0x11ff8)), Ok(9));
}

/// After `discard`, a write that does not go through the library (a vCPU
/// through KVM, a device model through `host_address`, a vhost-user backend
/// through its own mapping of the memfd) lands in memory, and every library
/// read sees it: the page state must not make reads answer stale zeros.
#[test]
fn raw_writes_to_discarded_pages_are_read_back() {
    let m = memory();
    m.fill(gpa(0x10000), 0x11, 2 * PAGE_LEN).expect("mapped");
    assert_eq!(m.discard(gpa(0x10000), 2 * PAGE), Ok(2));
    let host = m.host_address(gpa(0x10008)).expect("mapped").0 as *mut u64;
    // SAFETY: 0x10008 is 8-aligned and 8 bytes inside the region's live
    // mapping; no Rust reference to guest memory exists.
    unsafe { host.write_volatile(0x0102_0304_0506_0708) };
    assert_eq!(m.read_obj::<u64>(gpa(0x10008)), Ok(0x0102_0304_0506_0708));
    assert_eq!(
        m.load::<u64>(gpa(0x10008), Ordering::SeqCst),
        Ok(0x0102_0304_0506_0708)
    );
    let mut page = vec![0xff; PAGE_LEN];
    m.read(gpa(0x10000), &mut page).expect("mapped");
    assert_eq!(page[8..16], 0x0102_0304_0506_0708u64.to_le_bytes());
    assert!(page[..8].iter().chain(&page[16..]).all(|&b| b == 0));

    // A second mapping of (fd, file_offset), as a vhost-user backend makes.
    let info = m.region_infos()[0];
    // SAFETY: maps `info.size` bytes of the store's memfd at the region's
    // offset, shared, at an address the kernel picks; unmapped below.
    let other = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            usize::try_from(info.size).expect("small"),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            info.fd,
            libc::off_t::try_from(info.file_offset).expect("small"),
        )
    };
    assert_ne!(
        other,
        libc::MAP_FAILED,
        "{}",
        std::io::Error::last_os_error()
    );
    // SAFETY: byte 0x1010 of the 2-page mapping just created.
    unsafe { other.cast::<u8>().add(0x1010).write_volatile(0x5a) };
    assert_eq!(m.read_obj::<u8>(gpa(0x11010)), Ok(0x5a));
    // SAFETY: the mapping created above, unmapped once.
    assert_eq!(unsafe { libc::munmap(other, 2 * PAGE_LEN) }, 0);
}

/// An ordering an atomic operation cannot take is a typed error, not a
/// panic inside std's atomics (found by review: `load` with `Release`).
#[test]
fn impossible_atomic_orderings_are_errors() {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 0x1000)]).unwrap();
    let at = GuestPhysAddr(8);
    for order in [Ordering::Release, Ordering::AcqRel] {
        assert!(matches!(
            mem.load::<u64>(at, order),
            Err(AccessError::Ordering { op: "load", .. })
        ));
        assert!(matches!(
            mem.compare_exchange::<u32>(at, 0, 1, Ordering::SeqCst, order),
            Err(AccessError::Ordering { .. })
        ));
    }
    for order in [Ordering::Acquire, Ordering::AcqRel] {
        assert!(matches!(
            mem.store::<u16>(at, 7, order),
            Err(AccessError::Ordering { op: "store", .. })
        ));
    }
    // Nothing was written, and the memory works as before.
    assert_eq!(mem.load::<u64>(at, Ordering::SeqCst).unwrap(), 0);
    mem.store::<u64>(at, 9, Ordering::Release).unwrap();
    assert_eq!(mem.load::<u64>(at, Ordering::Acquire).unwrap(), 9);
}
