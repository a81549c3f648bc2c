//! Other VMMs' snapshots as input, end to end: a Firecracker guest memory
//! file (full, and a sparse diff whose holes are zero pages) and a
//! cloud-hypervisor snapshot directory (`memory-ranges` and a `state.json`
//! shaped like the one cloud-hypervisor writes) are restored by copy and
//! folded, every page checked; Firecracker's default layouts are those of
//! its source; and every damaged input is a typed error naming its file
//! and field.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use pagefold::{
    snapshot::{
        restore_folded, restore_foreign_into, restore_into, FirecrackerArch, ForeignMemory,
        ForeignProblem, SnapshotError, SnapshotReader,
    },
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, VmOptions, PAGE_SIZE,
};

mod common;
use common::temp_dir::TempDir;

const PAGE: u64 = PAGE_SIZE as u64;
const GIB: u64 = 1 << 30;

/// The content of the page at `gpa`: zero for a quarter of the pages, one
/// shared content for an eighth, the rest unique to their address.
fn content(gpa: u64) -> Vec<u8> {
    let i = gpa / PAGE;
    match i % 8 {
        0 | 1 => vec![0; PAGE_SIZE],
        2 => vec![0xAB; PAGE_SIZE],
        _ => {
            let mut p = vec![0u8; PAGE_SIZE];
            p[..8].copy_from_slice(&gpa.to_le_bytes());
            p[PAGE_SIZE - 1] = 0x5A;
            p
        }
    }
}

/// Writes `ranges` (`(gpa, length)`, in file order) to `path` one after
/// another, each page as `content` says.
fn write_ranges(path: &Path, ranges: &[(u64, u64)]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for &(gpa, len) in ranges {
        for k in 0..len / PAGE {
            f.write_all(&content(gpa + k * PAGE)).unwrap();
        }
    }
    f.flush().unwrap();
}

fn pages(layout: &[(GuestPhysAddr, u64)]) -> Vec<u64> {
    layout
        .iter()
        .flat_map(|&(s, n)| (0..n / PAGE).map(move |k| s.0 + k * PAGE))
        .collect()
}

/// Checks that every page of `mem` holds `want(gpa)`.
fn check(mem: &GuestMemory, want: impl Fn(u64) -> Vec<u8>) {
    let layout: Vec<_> = mem
        .regions()
        .iter()
        .map(|r| (r.start(), r.size()))
        .collect();
    let mut page = vec![0u8; PAGE_SIZE];
    for gpa in pages(&layout) {
        mem.read(GuestPhysAddr(gpa), &mut page).unwrap();
        assert!(page == want(gpa), "page {gpa:#x}");
    }
}

fn host() -> DedupHost {
    DedupHost::new(Arc::new(FrameStore::memfd().unwrap())).unwrap()
}

/// Restores `src` by copy, and through a pagefold snapshot by copy and
/// folded (two clones), checking every page each time against `want`.
fn restore_every_way(dir: &TempDir, src: &ForeignMemory, want: impl Fn(u64) -> Vec<u8> + Copy) {
    let layout = src.region_layout();
    let nonzero = pages(&layout)
        .into_iter()
        .filter(|&g| want(g).iter().any(|&b| b != 0))
        .count() as u64;

    let mem = GuestMemory::new(&layout).unwrap();
    // Whatever the memory held before is overwritten.
    mem.fill(layout[0].0, 0x77, PAGE_SIZE).unwrap();
    let stats = restore_foreign_into(src, &mem).unwrap();
    assert_eq!(stats.pages, src.pages());
    assert_eq!(stats.copied_pages, nonzero);
    assert_eq!(stats.zero_pages, src.pages() - nonzero);
    check(&mem, want);

    let path = dir.path("converted.snap");
    let saved = src.save_as(&path).unwrap();
    assert_eq!(saved.pages, src.pages());
    assert_eq!(saved.zero_pages, src.pages() - nonzero);
    let snap = SnapshotReader::open(&path).unwrap();
    assert_eq!(snap.region_layout(), layout);
    let copy = GuestMemory::new(&layout).unwrap();
    restore_into(&snap, &copy).unwrap();
    check(&copy, want);

    let host = host();
    let a = restore_folded(&host, VmOptions::default(), &snap).unwrap();
    let b = restore_folded(&host, VmOptions::default(), &snap).unwrap();
    check(&a.memory, want);
    check(&b.memory, want);
    assert_eq!(a.stats.zero_pages, src.pages() - nonzero);
    assert_eq!(b.stats.contents_read, 0, "the second clone reads nothing");
    assert_eq!(b.stats.shared_pages + b.stats.copied_pages, nonzero);
}

#[test]
fn firecracker_default_layouts_are_those_of_its_source() {
    let r = |a: FirecrackerArch, size: u64| -> Vec<(u64, u64)> {
        a.regions(size).into_iter().map(|(s, n)| (s.0, n)).collect()
    };
    use FirecrackerArch::*;
    assert_eq!(r(X86_64, 128 << 20), [(0, 128 << 20)]);
    assert_eq!(r(X86_64, 3 * GIB), [(0, 3 * GIB)]);
    assert_eq!(r(X86_64, 4 * GIB), [(0, 3 * GIB), (4 * GIB, GIB)]);
    assert_eq!(
        r(X86_64, 300 * GIB),
        [(0, 3 * GIB), (4 * GIB, 252 * GIB), (512 * GIB, 45 * GIB)]
    );
    let gap = 0xD000_0000;
    assert_eq!(r(X86_64Legacy, gap), [(0, gap)]);
    assert_eq!(
        r(X86_64Legacy, 4 * GIB),
        [(0, gap), (4 * GIB, 4 * GIB - gap)]
    );
    assert_eq!(r(Aarch64, GIB), [(2 * GIB, GIB)]);
}

#[test]
fn firecracker_full_memory_file_restores_by_copy_and_folded() {
    let dir = TempDir::new("fc-full");
    // A layout from the vmstate file, given by the caller: two regions.
    let layout = [
        (GuestPhysAddr(0), 64 * PAGE),
        (GuestPhysAddr(0x10_0000), 32 * PAGE),
    ];
    let file = dir.path("mem");
    write_ranges(&file, &[(0, 64 * PAGE), (0x10_0000, 32 * PAGE)]);
    let src = ForeignMemory::firecracker(&file, &layout).unwrap();
    assert_eq!(src.region_layout(), layout);
    assert_eq!(src.pages(), 96);
    restore_every_way(&dir, &src, content);

    // aarch64's default layout from the file's size.
    let arm = dir.path("mem-arm");
    write_ranges(&arm, &[(2 * GIB, 48 * PAGE)]);
    let src = ForeignMemory::firecracker_default(&arm, FirecrackerArch::Aarch64).unwrap();
    assert_eq!(src.region_layout(), [(GuestPhysAddr(2 * GIB), 48 * PAGE)]);
    restore_every_way(&dir, &src, content);
}

#[test]
fn firecracker_diff_file_holes_are_zero_pages() {
    let dir = TempDir::new("fc-diff");
    let file = dir.path("diff");
    let total = 128 * PAGE;
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(total).unwrap();
    // Only the pages written since the last snapshot: every fifth one.
    let written = |gpa: u64| (gpa / PAGE) % 5 == 3;
    for gpa in (0..total).step_by(PAGE_SIZE).filter(|&g| written(g)) {
        f.write_all_at(&content(gpa), gpa).unwrap();
    }
    drop(f);
    let src = ForeignMemory::firecracker_default(&file, FirecrackerArch::X86_64).unwrap();
    assert_eq!(src.region_layout(), [(GuestPhysAddr(0), total)]);
    let want = |gpa: u64| {
        if written(gpa) {
            content(gpa)
        } else {
            vec![0; PAGE_SIZE]
        }
    };
    restore_every_way(&dir, &src, want);
}

#[test]
fn firecracker_diff_over_its_base_reads_the_base_in_its_holes() {
    let dir = TempDir::new("fc-rebase");
    let total = 96 * PAGE;
    let base = dir.path("base");
    write_ranges(&base, &[(0, total)]);
    let diff = dir.path("diff");
    let f = std::fs::File::create(&diff).unwrap();
    f.set_len(total).unwrap();
    // Written since the base: every seventh page, with new bytes, and
    // page 2 (shared content in the base) zeroed by the guest.
    let new = |gpa: u64| {
        let mut p = vec![0xEE; PAGE_SIZE];
        p[..8].copy_from_slice(&gpa.to_le_bytes());
        p
    };
    let written = |gpa: u64| (gpa / PAGE) % 7 == 4;
    for gpa in (0..total).step_by(PAGE_SIZE).filter(|&g| written(g)) {
        f.write_all_at(&new(gpa), gpa).unwrap();
    }
    f.write_all_at(&[0u8; PAGE_SIZE], 2 * PAGE).unwrap();
    drop(f);
    let open = |p: &Path| ForeignMemory::firecracker_default(p, FirecrackerArch::X86_64).unwrap();
    let src = open(&diff).over_base(open(&base)).unwrap();
    let want = move |gpa: u64| {
        if written(gpa) {
            new(gpa)
        } else if gpa == 2 * PAGE {
            vec![0; PAGE_SIZE]
        } else {
            content(gpa)
        }
    };
    restore_every_way(&dir, &src, want);

    // A base of another layout is refused.
    let short = dir.path("short");
    write_ranges(&short, &[(0, total - PAGE)]);
    assert!(matches!(
        open(&diff).over_base(open(&short)),
        Err(SnapshotError::LayoutMismatch { .. })
    ));
}

#[test]
fn firecracker_memory_past_the_32_bit_gap_is_read_at_its_address() {
    let dir = TempDir::new("fc-gap");
    let file = dir.path("mem");
    // 3 GiB and 16 pages: sparse, all but the pages past the gap a hole.
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(3 * GIB + 16 * PAGE).unwrap();
    for k in 0..16 {
        f.write_all_at(&content(4 * GIB + k * PAGE), 3 * GIB + k * PAGE)
            .unwrap();
    }
    drop(f);
    let src = ForeignMemory::firecracker_default(&file, FirecrackerArch::X86_64).unwrap();
    assert_eq!(
        src.region_layout(),
        [
            (GuestPhysAddr(0), 3 * GIB),
            (GuestPhysAddr(4 * GIB), 16 * PAGE)
        ]
    );
    let mut page = [0u8; PAGE_SIZE];
    for k in 0..16 {
        let gpa = 4 * GIB + k * PAGE;
        src.read_page(GuestPhysAddr(gpa), &mut page).unwrap();
        assert!(page[..] == content(gpa)[..], "page {gpa:#x}");
    }
    src.read_page(GuestPhysAddr(3 * GIB - PAGE), &mut page)
        .unwrap();
    assert!(page.iter().all(|&b| b == 0));
    assert!(matches!(
        src.read_page(GuestPhysAddr(3 * GIB), &mut page),
        Err(SnapshotError::PageNotInLayout { .. })
    ));
}

/// The memory manager's state as cloud-hypervisor serializes it
/// (`MemoryManagerSnapshotData`), with `ranges` as its memory ranges.
fn mm_state(ranges: &[(u64, u64)]) -> serde_json::Value {
    let data: Vec<_> = ranges
        .iter()
        .map(|&(gpa, length)| serde_json::json!({ "gpa": gpa, "length": length }))
        .collect();
    serde_json::json!({
        "memory_ranges": { "data": data },
        "guest_ram_mappings": [],
        "start_of_device_area": 0x1_0000_0000u64,
        "boot_ram": 0x10_0000u64,
        "current_ram": 0x10_0000u64,
        "arch_mem_regions": [],
        "hotplug_slots": [],
        "next_memory_slot": 2,
        "selected_slot": 0,
        "next_hotplug_slot": 0
    })
}

/// A `state.json` of the current format: the VM's snapshot tree, the
/// memory manager's state a JSON string in its `snapshot_data.state`.
fn state_json(mm: &serde_json::Value) -> String {
    serde_json::json!({
        "snapshots": {
            "cpu-manager": { "snapshots": {}, "snapshot_data": { "state": "{}" } },
            "memory-manager": {
                "snapshots": {},
                "snapshot_data": { "state": mm.to_string() }
            },
            "device-manager": { "snapshots": {}, "snapshot_data": null }
        },
        "snapshot_data": { "state": "{}" }
    })
    .to_string()
}

/// Ranges in file order, not in address order; the first two adjacent.
const CH_RANGES: [(u64, u64); 3] = [(0x10_0000, 16 * PAGE), (0, 32 * PAGE), (0x2_0000, 8 * PAGE)];

fn ch_dir(dir: &TempDir, name: &str, state: &str) -> PathBuf {
    let d = dir.path(name);
    std::fs::create_dir_all(&d).unwrap();
    write_ranges(&d.join("memory-ranges"), &CH_RANGES);
    std::fs::write(d.join("state.json"), state).unwrap();
    std::fs::write(d.join("config.json"), "{}").unwrap();
    d
}

#[test]
fn cloud_hypervisor_directory_restores_by_copy_and_folded() {
    let dir = TempDir::new("ch");
    let d = ch_dir(&dir, "snap", &state_json(&mm_state(&CH_RANGES)));
    let src = ForeignMemory::cloud_hypervisor(&d).unwrap();
    assert_eq!(
        src.region_layout(),
        [
            (GuestPhysAddr(0), 40 * PAGE),
            (GuestPhysAddr(0x10_0000), 16 * PAGE)
        ]
    );
    assert_eq!(src.path(), d.join("memory-ranges"));
    restore_every_way(&dir, &src, content);

    // The format before `SnapshotData { state }`: a section whose
    // `snapshot` is the state's JSON bytes.
    let bytes: Vec<u8> = mm_state(&CH_RANGES).to_string().into_bytes();
    let old = serde_json::json!({
        "id": "vm",
        "snapshots": {
            "memory-manager": {
                "id": "memory-manager",
                "snapshots": {},
                "snapshot_data": {
                    "memory-manager-section": { "id": "memory-manager-section", "snapshot": bytes }
                }
            }
        },
        "snapshot_data": {}
    });
    let d = ch_dir(&dir, "old", &old.to_string());
    let src = ForeignMemory::cloud_hypervisor(&d).unwrap();
    assert_eq!(src.pages(), 56);
    let mem = GuestMemory::new(&src.region_layout()).unwrap();
    restore_foreign_into(&src, &mem).unwrap();
    check(&mem, content);
}

/// The error's file, field and problem.
fn foreign_err(r: Result<ForeignMemory, SnapshotError>) -> (PathBuf, String, ForeignProblem) {
    match r {
        Err(SnapshotError::Foreign {
            path,
            field,
            problem,
        }) => (path, field, problem),
        other => panic!("expected a Foreign error, got {other:?}"),
    }
}

#[test]
fn damaged_firecracker_inputs_are_typed_errors() {
    let dir = TempDir::new("fc-bad");
    let file = dir.path("mem");
    write_ranges(&file, &[(0, 64 * PAGE)]);
    let layout = [(GuestPhysAddr(0), 64 * PAGE)];
    // Cut by a page, or a page too long: the layout does not fit.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(63 * PAGE).unwrap();
    let (path, field, problem) = foreign_err(ForeignMemory::firecracker(&file, &layout));
    assert_eq!((path, field.as_str()), (file.clone(), "length"));
    assert_eq!(
        problem,
        ForeignProblem::Length {
            expected: 64 * PAGE,
            found: 63 * PAGE
        }
    );
    f.set_len(65 * PAGE).unwrap();
    let (_, _, problem) = foreign_err(ForeignMemory::firecracker(&file, &layout));
    assert!(matches!(problem, ForeignProblem::Length { .. }));
    // Not a whole number of pages.
    f.set_len(64 * PAGE + 100).unwrap();
    let (_, field, problem) = foreign_err(ForeignMemory::firecracker_default(
        &file,
        FirecrackerArch::X86_64,
    ));
    assert_eq!(field, "length");
    assert!(matches!(problem, ForeignProblem::Unaligned { .. }));
    f.set_len(64 * PAGE).unwrap();
    // A layout that is unaligned, or overlaps.
    let (_, field, problem) = foreign_err(ForeignMemory::firecracker(
        &file,
        &[(GuestPhysAddr(0x800), 64 * PAGE)],
    ));
    assert_eq!(field, "regions");
    assert!(matches!(problem, ForeignProblem::Layout(_)));
    let (_, _, problem) = foreign_err(ForeignMemory::firecracker(
        &file,
        &[
            (GuestPhysAddr(0), 32 * PAGE),
            (GuestPhysAddr(PAGE), 32 * PAGE),
        ],
    ));
    assert!(matches!(problem, ForeignProblem::Layout(_)));
    // No file.
    assert!(matches!(
        ForeignMemory::firecracker(dir.path("none"), &layout),
        Err(SnapshotError::File { op: "open", .. })
    ));
    // Cut after opening: reading past the end is a typed error.
    let src = ForeignMemory::firecracker(&file, &layout).unwrap();
    f.set_len(8 * PAGE).unwrap();
    let mem = GuestMemory::new(&layout).unwrap();
    assert!(matches!(
        restore_foreign_into(&src, &mem),
        Err(SnapshotError::Foreign {
            problem: ForeignProblem::Length { .. },
            ..
        })
    ));
    // A memory of another layout.
    let other = GuestMemory::new(&[(GuestPhysAddr(0), 32 * PAGE)]).unwrap();
    assert!(matches!(
        restore_foreign_into(&src, &other),
        Err(SnapshotError::LayoutMismatch { .. })
    ));
}

#[test]
fn damaged_cloud_hypervisor_inputs_name_file_and_field() {
    let dir = TempDir::new("ch-bad");
    let open = |name: &str, state: &str| ForeignMemory::cloud_hypervisor(ch_dir(&dir, name, state));
    let mm_field = "snapshots.memory-manager.snapshot_data.state: memory_ranges.data";

    // Not JSON.
    let (path, field, problem) = foreign_err(open("a", "{\"snapshots\": "));
    assert!(path.ends_with("a/state.json"), "{path:?}");
    assert_eq!(field, "(file)");
    assert!(matches!(problem, ForeignProblem::Json(_)));
    // No memory manager.
    let (_, field, problem) = foreign_err(open("b", r#"{"snapshots": {}}"#));
    assert_eq!(
        (field.as_str(), problem),
        ("snapshots.memory-manager", ForeignProblem::Missing)
    );
    // Its state is not a string, or a string that is not JSON.
    let s = r#"{"snapshots": {"memory-manager": {"snapshot_data": {"state": 5}}}}"#;
    let (_, field, problem) = foreign_err(open("c", s));
    assert_eq!(field, "snapshots.memory-manager.snapshot_data.state");
    assert_eq!(problem, ForeignProblem::Type("a string"));
    let s = r#"{"snapshots": {"memory-manager": {"snapshot_data": {"state": "[1,"}}}}"#;
    let (_, _, problem) = foreign_err(open("d", s));
    assert!(matches!(problem, ForeignProblem::Json(_)));
    // A range without a length; a length that is a string.
    let mut mm = mm_state(&CH_RANGES);
    mm["memory_ranges"]["data"][1]
        .as_object_mut()
        .unwrap()
        .remove("length");
    let (_, field, problem) = foreign_err(open("e", &state_json(&mm)));
    assert_eq!(
        (field, problem),
        (format!("{mm_field}[1].length"), ForeignProblem::Missing)
    );
    let mut mm = mm_state(&CH_RANGES);
    mm["memory_ranges"]["data"][2]["length"] = serde_json::json!("8");
    let (_, field, problem) = foreign_err(open("f", &state_json(&mm)));
    assert_eq!(field, format!("{mm_field}[2].length"));
    assert_eq!(problem, ForeignProblem::Type("an unsigned integer"));
    // Unaligned, empty and overlapping ranges.
    let (_, field, problem) = foreign_err(open("g", &state_json(&mm_state(&[(0x800, 56 * PAGE)]))));
    assert_eq!(field, format!("{mm_field}[0].gpa"));
    assert_eq!(problem, ForeignProblem::Unaligned { value: 0x800 });
    let (_, field, problem) = foreign_err(open(
        "h",
        &state_json(&mm_state(&[(0, 56 * PAGE), (0x10_0000, 0)])),
    ));
    assert_eq!(field, format!("{mm_field}[1].length"));
    assert!(matches!(problem, ForeignProblem::EmptyRange { .. }));
    let (_, field, problem) = foreign_err(open(
        "i",
        &state_json(&mm_state(&[(0, 40 * PAGE), (PAGE, 16 * PAGE)])),
    ));
    assert_eq!(field, format!("{mm_field}[1].gpa"));
    assert!(matches!(problem, ForeignProblem::Overlap { .. }));
    let (_, _, problem) = foreign_err(open("j", &state_json(&mm_state(&[]))));
    assert_eq!(problem, ForeignProblem::NoRanges);
    // Ranges longer than memory-ranges: the memory file is named.
    let (path, field, problem) = foreign_err(open(
        "k",
        &state_json(&mm_state(&[(0, 40 * PAGE), (0x10_0000, 17 * PAGE)])),
    ));
    assert!(path.ends_with("k/memory-ranges"), "{path:?}");
    assert_eq!(field, "length");
    assert_eq!(
        problem,
        ForeignProblem::Length {
            expected: 57 * PAGE,
            found: 56 * PAGE
        }
    );
    // No state.json at all.
    let d = dir.path("none");
    std::fs::create_dir_all(&d).unwrap();
    assert!(matches!(
        ForeignMemory::cloud_hypervisor(&d),
        Err(SnapshotError::File { op: "read", .. })
    ));
    // The errors say it in words.
    let e = open("l", r#"{"snapshots": {}}"#).unwrap_err().to_string();
    assert!(
        e.contains("state.json: snapshots.memory-manager: missing"),
        "{e}"
    );
}
