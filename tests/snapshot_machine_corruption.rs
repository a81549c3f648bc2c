//! Damaged, cut and crafted VM and device-state parts: every byte flipped
//! in turn and the file cut at every length inside them, each a typed
//! error naming the part (or a later one its length field points at, or
//! the header that covers it), never a panic or a state that differs from
//! what was saved; a VM part whose checksum was resealed over a structural
//! fault refused, naming the offset; a newer writer's flag refused. And
//! sparse files claiming the largest parts (a vCPU part of 4096 vCPUs'
//! worth, ~545 MB; a device-state part past its limit or at it) refused
//! with a typed error naming the part, with no allocation near the size
//! claimed: this binary's allocator records each thread's largest
//! allocation.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    fs::File,
    os::{fd::FromRawFd, unix::fs::FileExt},
};

use pagefold::{
    snapshot::{
        save_machine, save_with_vcpus, MachineState, Part, Problem, SaveOptions, SnapshotError,
        SnapshotReader, VcpuState, VmState, MAX_DEVICE_STATE, VM_PART_MAX,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};

mod common;
use common::temp_dir::TempDir;

/// The system allocator, recording the largest allocation each thread
/// asks for.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

// SAFETY: every call goes to `System` with the caller's arguments; the
// bookkeeping touches a const-initialised thread-local `Cell` (no
// allocation, no destructor).
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// The largest allocation `f` makes on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}

const PAGE: u64 = PAGE_SIZE as u64;
const HEADER_SEED: u64 = 0x5046_534e_4150_0001;
const VM_SEED: u64 = 0x5046_534e_4150_0006;
/// Bytes of one vCPU's largest entry and its 8-byte header: the bound a
/// sectioned vCPU part's length is checked against (`vcpu.rs`).
const VCPU_ENTRY_MAX: u64 = 133_000;

fn memory() -> GuestMemory {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 4 * PAGE)]).unwrap();
    mem.write(GuestPhysAddr(PAGE), b"machine part").unwrap();
    mem
}

fn vcpu() -> VcpuState {
    let mut s = VcpuState::default();
    s.regs.rip = 0x40_1000;
    s.mp_state = Some(0);
    s
}

/// Every part of a VM state, distinct values throughout.
fn vm_state() -> VmState {
    use pagefold::snapshot::{
        ClockState, IoapicState, IrqchipState, PicState, PitChannel, PitState,
    };
    VmState {
        clock: Some(ClockState {
            clock: 77_000_000_001,
            flags: 6,
            realtime: 1_765_000_000_123_456_789,
            host_tsc: 0xabc_def0,
        }),
        irqchip: Some(IrqchipState {
            pic_master: PicState {
                imr: 0xa5,
                irq_base: 0x20,
                elcr_mask: 0xf8,
                ..PicState::default()
            },
            pic_slave: PicState {
                imr: 0x5a,
                irq_base: 0x28,
                ..PicState::default()
            },
            ioapic: IoapicState {
                base_address: 0xfec0_0000,
                ioregsel: 1,
                id: 2,
                irr: 3,
                redirection: std::array::from_fn(|p| 0x1_0000 | (0x30 + p as u64)),
            },
        }),
        pit: Some(PitState {
            channels: std::array::from_fn(|c| PitChannel {
                count: 0xfff0 - c as u32,
                mode: 2,
                rw_mode: 3,
                gate: 1,
                count_load_time: 99,
                ..PitChannel::default()
            }),
            flags: 0,
        }),
    }
}

fn device() -> Vec<u8> {
    (0..300u32).map(|k| (k * 13 + 1) as u8).collect()
}

fn memfd() -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it
    // touches no memory of ours.
    let fd = unsafe { libc::memfd_create(c"pagefold-machine".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

fn open_bytes(bytes: &[u8]) -> Result<SnapshotReader, SnapshotError> {
    let f = memfd();
    f.write_all_at(bytes, 0).unwrap();
    SnapshotReader::from_file(f)
}

fn u64_at(b: &[u8], k: usize) -> u64 {
    u64::from_le_bytes(b[k..k + 8].try_into().unwrap())
}

/// Where the header ends and the parts after the table start.
fn offsets(b: &[u8]) -> (usize, usize) {
    let regions = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
    let hlen = 160 + 16 * regions;
    let (local, external) = (u64_at(b, 104), u64_at(b, 144));
    let table = u64_at(b, 136) as usize;
    (hlen, table + local as usize * 32 + external as usize * 48)
}

/// The header's checksum as a writer would set it.
fn reseal_header(b: &mut [u8]) {
    let (hlen, _) = offsets(b);
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&b[..hlen], HEADER_SEED);
    b[hlen..hlen + 8].copy_from_slice(&sum.to_le_bytes());
}

/// The id and the header checksum as a writer would set them for these
/// bytes (every part after the table runs to the file's end).
fn reseal_header_and_id(b: &mut [u8]) {
    let (hlen, _) = offsets(b);
    let map = u64_at(b, 112) as usize;
    let runs = u64_at(b, 120) as usize;
    let table = u64_at(b, 136) as usize;
    let mut h = blake3::Hasher::new_derive_key("pagefold snapshot id v1");
    h.update(&b[..24]);
    h.update(&[0u8; 32]);
    h.update(&b[56..hlen]);
    h.update(&b[map..map + runs * 16]);
    h.update(&b[table..]);
    let id = *h.finalize().as_bytes();
    b[24..56].copy_from_slice(&id);
    reseal_header(b);
}

/// A file with one vCPU, the VM state and the device state; where its VM
/// and device-state parts start.
fn saved(dir: &TempDir) -> (Vec<u8>, usize, usize) {
    let path = dir.path("m.snap");
    let (vm, dev, states) = (vm_state(), device(), [vcpu()]);
    save_machine(
        &memory(),
        &path,
        &SaveOptions { track_dirty: false },
        &MachineState {
            vcpus: &states,
            vm: Some(&vm),
            device_state: Some(&dev),
        },
    )
    .unwrap();
    let b = std::fs::read(&path).unwrap();
    let (_, vcpu_at) = offsets(&b);
    let vm_at = vcpu_at + u64_at(&b, vcpu_at) as usize;
    let dev_at = vm_at + u64_at(&b, vm_at) as usize;
    assert_eq!(dev_at + u64_at(&b, dev_at) as usize, b.len());
    (b, vm_at, dev_at)
}

#[test]
fn every_damaged_or_cut_byte_of_the_vm_and_device_parts_is_an_error() {
    let dir = TempDir::new("snap-machine-damage");
    let (good, vm_at, dev_at) = saved(&dir);
    let r = open_bytes(&good).unwrap();
    assert_eq!(r.vm_state(), Some(&vm_state()));
    assert_eq!(r.device_state(), Some(&device()[..]));
    assert_eq!(u64_at(&good, vm_at), VM_PART_MAX, "every VM section");
    let bad = memfd();
    for i in vm_at..good.len() {
        let mut b = good.clone();
        b[i] ^= 1 << (i % 8);
        bad.set_len(0).unwrap();
        bad.write_all_at(&b, 0).unwrap();
        let own = if i < dev_at {
            Part::VmState
        } else {
            Part::DeviceState
        };
        match SnapshotReader::from_file(bad.try_clone().unwrap()) {
            Ok(r) => panic!(
                "flipping byte {i} went unnoticed (VM state {}, device state {})",
                if r.vm_state() == Some(&vm_state()) {
                    "identical"
                } else {
                    "DIFFERENT"
                },
                if r.device_state() == Some(&device()[..]) {
                    "identical"
                } else {
                    "DIFFERENT"
                }
            ),
            Err(e) => {
                let at = e
                    .place()
                    .unwrap_or_else(|| panic!("byte {i}: names no place: {e}"));
                // The damaged part at or before the byte; or the part its
                // damaged length field now points at; or the header (id).
                let ok = match at.part {
                    Part::Header => true,
                    p if p == own => at.offset <= i as u64,
                    Part::DeviceState => own == Part::VmState && i < vm_at + 8,
                    _ => false,
                };
                assert!(ok, "byte {i} ({own}): {e}");
            }
        }
    }
    for len in vm_at..good.len() {
        bad.set_len(0).unwrap();
        bad.write_all_at(&good[..len], 0).unwrap();
        let own = if len < dev_at {
            Part::VmState
        } else {
            Part::DeviceState
        };
        match SnapshotReader::from_file(bad.try_clone().unwrap()) {
            Ok(_) => panic!("cut at {len} went unnoticed"),
            Err(e) => assert!(
                matches!(
                    e,
                    SnapshotError::Truncated { at, file_len }
                        if file_len == len as u64 && at.part == own
                ),
                "cut at {len}: {e}"
            ),
        }
    }
    // Bytes after the last part: its length field is named.
    let mut long = good.clone();
    long.extend_from_slice(&[0; 5]);
    match open_bytes(&long) {
        Err(SnapshotError::Malformed { at, problem }) => assert_eq!(
            (at.part, at.offset as usize, problem),
            (Part::DeviceState, dev_at, Problem::Trailing { extra: 5 })
        ),
        other => panic!("want Trailing, got {other:?}"),
    }
}

/// A VM part resealed (checksum, id, header) over a structural fault:
/// the error and its offset.
fn crafted(edit: impl FnOnce(&mut Vec<u8>, usize)) -> SnapshotError {
    let dir = TempDir::new("snap-machine-crafted");
    let (good, vm_at, dev_at) = saved(&dir);
    let mut b = good;
    edit(&mut b, vm_at);
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&b[vm_at..dev_at - 8], VM_SEED);
    b[dev_at - 8..dev_at].copy_from_slice(&sum.to_le_bytes());
    reseal_header_and_id(&mut b);
    match open_bytes(&b) {
        Ok(_) => panic!("a crafted VM part went unnoticed"),
        Err(e) => e,
    }
}

#[test]
fn structural_faults_under_a_valid_checksum_are_named() {
    // Sections: clock at +8 (header 8, data 32), irqchip at +48 (data
    // 248), PIT at +304 (data 80).
    let section = |e: SnapshotError| match e {
        SnapshotError::Malformed {
            at,
            problem: Problem::Section { what },
        } => (at.part, at.offset, what),
        other => panic!("want a section fault, got {other:?}"),
    };
    let dir = TempDir::new("snap-machine-offsets");
    let (_, vm_at, _) = saved(&dir);
    let vm_at = vm_at as u64;

    let (part, at, what) = section(crafted(|b, p| b[p + 8] = 9));
    assert_eq!((part, at), (Part::VmState, vm_at + 8));
    assert!(what.contains("tag 9 unknown"), "{what}");

    let (part, at, what) = section(crafted(|b, p| b[p + 304] = 2));
    assert_eq!((part, at), (Part::VmState, vm_at + 304));
    assert!(what.contains("out of order or twice"), "{what}");

    let (part, at, what) = section(crafted(|b, p| b[p + 12] = 24));
    assert_eq!((part, at), (Part::VmState, vm_at + 8));
    assert!(what.contains("is 24 bytes, expected 32"), "{what}");

    let (part, at, what) = section(crafted(|b, p| b[p + 308] = 0xff));
    assert_eq!((part, at), (Part::VmState, vm_at + 304));
    assert!(what.contains("the part has"), "{what}");

    // A reserved byte: a section header's, the clock's padding.
    for k in [10usize, 8 + 8 + 12] {
        match crafted(|b, p| b[p + k] = 1) {
            SnapshotError::Malformed { at, problem } => assert_eq!(
                (at.part, at.offset, problem),
                (Part::VmState, vm_at + k as u64, Problem::Reserved(1))
            ),
            other => panic!("byte {k}: want Reserved, got {other:?}"),
        }
    }
}

/// A flag this build does not know (a newer writer's part) is refused at
/// the flags, as builds before the VM and device-state parts refuse bits
/// 3 and 4.
#[test]
fn a_newer_writers_flag_is_refused() {
    let dir = TempDir::new("snap-machine-flag");
    let (mut b, _, _) = saved(&dir);
    b[10] |= 32;
    reseal_header(&mut b);
    match open_bytes(&b) {
        Err(SnapshotError::Malformed { at, problem }) => assert_eq!(
            (at.part, at.offset, problem),
            (Part::Header, 10, Problem::Flags(2 | 4 | 8 | 16 | 32))
        ),
        other => panic!("want Flags, got {other:?}"),
    }
}

/// A sparse file whose sectioned vCPU part claims what 4096 vCPUs can
/// hold (~545 MB: the exact bound) is refused at its first whole chunk of
/// zeros, naming the vCPU part, and one whose claim is cheaper to fake
/// (a byte written in every MiB, so no chunk is all zeros) at its
/// checksum: neither allocates near the size claimed.
#[test]
fn a_sparse_vcpu_part_claiming_the_most_costs_no_large_allocation() {
    let dir = TempDir::new("snap-machine-sparse-vcpus");
    let path = dir.path("v.snap");
    save_with_vcpus(
        &memory(),
        &path,
        &SaveOptions { track_dirty: false },
        &[vcpu()],
    )
    .unwrap();
    let good = std::fs::read(&path).unwrap();
    let (_, part_at) = offsets(&good);
    for (count, fill_every_mib) in [(4096u32, false), (64, true)] {
        let claim = 16 + u64::from(count) * VCPU_ENTRY_MAX;
        let mut b = good.clone();
        b[20..24].copy_from_slice(&count.to_le_bytes());
        b[part_at..part_at + 8].copy_from_slice(&claim.to_le_bytes());
        reseal_header(&mut b);
        let f = memfd();
        f.write_all_at(&b, 0).unwrap();
        f.set_len(part_at as u64 + claim).unwrap();
        if fill_every_mib {
            let mut at = part_at as u64 + (1 << 20);
            while at < part_at as u64 + claim - 8 {
                f.write_all_at(&[1], at).unwrap();
                at += 1 << 20;
            }
        }
        let (res, largest) = largest_allocation(|| SnapshotReader::from_file(f));
        match (fill_every_mib, res) {
            (
                false,
                Err(SnapshotError::Malformed {
                    at,
                    problem: Problem::Hole { len },
                }),
            ) => {
                assert_eq!(at.part, Part::Vcpus);
                assert_eq!((at.offset, len), (part_at as u64 + (1 << 20), 1 << 20));
            }
            (true, Err(SnapshotError::Checksum { at, .. })) => {
                assert_eq!((at.part, at.offset), (Part::Vcpus, part_at as u64));
            }
            (_, other) => panic!("{count} vCPUs claimed: got {other:?}"),
        }
        assert!(
            largest < 2 << 20 && (largest as u64) < claim / 4,
            "{count} vCPUs claimed ({claim} bytes): an allocation of {largest} bytes"
        );
    }
}

/// A sparse file whose device-state part claims more than the limit is
/// refused at its length field (`TooLarge`, naming the part), one that
/// claims the most the limit allows at its checksum: neither allocates
/// near the size claimed.
#[test]
fn a_sparse_device_part_claiming_the_most_costs_no_large_allocation() {
    let dir = TempDir::new("snap-machine-sparse-device");
    let (good, _, dev_at) = saved(&dir);
    let part_max = MAX_DEVICE_STATE + 16;
    for claim in [part_max + 1, u64::MAX / 2, part_max] {
        let mut b = good.clone();
        b.truncate(dev_at + 8);
        b[dev_at..dev_at + 8].copy_from_slice(&claim.to_le_bytes());
        reseal_header_and_id(&mut b);
        let f = memfd();
        f.write_all_at(&b, 0).unwrap();
        f.set_len((dev_at as u64 + claim).min(dev_at as u64 + part_max + 1))
            .unwrap();
        let (res, largest) = largest_allocation(|| SnapshotReader::from_file(f));
        match res {
            Err(SnapshotError::Malformed {
                at,
                problem: Problem::TooLarge { len, max },
            }) if claim > part_max => {
                assert_eq!(
                    (at.part, at.offset, len, max),
                    (Part::DeviceState, dev_at as u64, claim, part_max)
                );
            }
            Err(SnapshotError::Checksum { at, .. }) if claim == part_max => {
                assert_eq!((at.part, at.offset), (Part::DeviceState, dev_at as u64));
            }
            other => panic!("claim {claim}: got {other:?}"),
        }
        assert!(
            largest < 2 << 20,
            "claim {claim}: an allocation of {largest} bytes"
        );
    }
}
