//! Review of the snapshot layer's file paths (issue 18, second pass): each
//! test is a defect found by review, failing before its fix.
//!
//! - A full save that fails after it emptied the dirty log lost the writes
//!   since the previous snapshot: an incremental on that snapshot then
//!   restored old bytes with no error.
//! - An incremental save to its own parent's path replaced the parent, so
//!   the new file named a parent that no longer existed anywhere.
//! - A FIFO given as a snapshot file, a Firecracker memory file or a
//!   cloud-hypervisor `state.json`/`memory-ranges` hung the open forever.
//! - A snapshot of a tenant's memory was created readable by every user
//!   (mode 0644 under the usual umask), and replacing a 0600 file widened
//!   it.
//! - A cloud-hypervisor directory's files could be symlinks to any file the
//!   restoring process can read.
//! - Errors in a chain did not say which file.
//! - A sparse file claiming terabytes of map, table or vCPU records
//!   aborted the process.
//! - A save to a 255-byte name failed (its temporary name was too long).
//! - An incremental save went ahead while a migration held the dirty log.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use pagefold::{
    snapshot::{
        restore_into, save, save_incremental, ForeignMemory, ForeignProblem, SaveOptions,
        SnapshotError, SnapshotReader,
    },
    DirtyRun, GuestMemory, GuestPhysAddr, RegionSet, PAGE_SIZE,
};

mod common;
use common::temp_dir::TempDir;

const PAGE: u64 = PAGE_SIZE as u64;

fn layout() -> Vec<(GuestPhysAddr, u64)> {
    vec![
        (GuestPhysAddr(0), 16 * PAGE),
        (GuestPhysAddr(0x10_0000), 8 * PAGE),
    ]
}

fn memory() -> GuestMemory {
    let mem = GuestMemory::new(&layout()).unwrap();
    for (i, r) in layout().iter().enumerate() {
        for k in 0..r.1 / PAGE {
            mem.write(
                GuestPhysAddr(r.0 .0 + k * PAGE),
                &[(i as u8 + 1) * 16 + k as u8; PAGE_SIZE],
            )
            .unwrap();
        }
    }
    mem
}

fn image(mem: &GuestMemory) -> Vec<u8> {
    let mut out = Vec::new();
    for r in mem.regions() {
        let mut b = vec![0u8; r.size() as usize];
        mem.read(r.start(), &mut b).unwrap();
        out.extend_from_slice(&b);
    }
    out
}

fn harvest(mem: &GuestMemory) -> Vec<DirtyRun> {
    let mut runs = Vec::new();
    mem.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    runs
}

#[test]
fn a_failed_full_save_keeps_the_writes_since_the_last_snapshot_in_the_log() {
    let dir = TempDir::new("failed-full");
    let mem = memory();
    let p0 = dir.path("s0.snap");
    save(&mem, &p0, &SaveOptions::default()).unwrap();
    let r0 = SnapshotReader::open(&p0).unwrap();

    // Written after s0: only the dirty log knows.
    mem.write(GuestPhysAddr(3 * PAGE), &[0x5a; PAGE_SIZE])
        .unwrap();
    mem.write(GuestPhysAddr(0x10_0000 + PAGE), b"after s0")
        .unwrap();

    // A new full snapshot that fails (its directory does not exist).
    let bad = dir.path("missing").join("s.snap");
    assert!(save(&mem, &bad, &SaveOptions::default()).is_err());

    // The VMM goes on with the chain on s0.
    let p1 = dir.path("s1.snap");
    save_incremental(&mem, &r0, &harvest(&mem), &p1).unwrap();
    let chain = SnapshotReader::open_chain(&[&p0, &p1]).unwrap();
    let back = GuestMemory::new(&chain.region_layout()).unwrap();
    restore_into(&chain, &back).unwrap();
    assert!(
        image(&back) == image(&mem),
        "the pages written before the failed save are not in the incremental"
    );
}

#[test]
fn an_incremental_save_over_its_own_parent_is_refused() {
    let dir = TempDir::new("over-parent");
    let mem = memory();
    let p0 = dir.path("s0.snap");
    let s0 = save(&mem, &p0, &SaveOptions::default()).unwrap();
    mem.write(GuestPhysAddr(2 * PAGE), &[0x11; PAGE_SIZE])
        .unwrap();
    let r0 = SnapshotReader::open(&p0).unwrap();
    let dirty = harvest(&mem);
    let e = save_incremental(&mem, &r0, &dirty, &p0).unwrap_err();
    assert!(
        matches!(e, SnapshotError::OverwritesAncestor { depth: 1, .. }),
        "{e:?}"
    );
    // Through another name of the same file too (a hard link).
    let link = dir.path("link.snap");
    std::fs::hard_link(&p0, &link).unwrap();
    let p1 = dir.path("s1.snap");
    save_incremental(&mem, &r0, &dirty, &p1).unwrap();
    let r1 = SnapshotReader::open(&p1).unwrap().with_parent(r0).unwrap();
    mem.write(GuestPhysAddr(5 * PAGE), &[0x12; PAGE_SIZE])
        .unwrap();
    let e = save_incremental(&mem, &r1, &harvest(&mem), &link).unwrap_err();
    assert!(
        matches!(e, SnapshotError::OverwritesAncestor { depth: 2, .. }),
        "{e:?}"
    );
    // The parent is still there, whole, and the runs are dirty again.
    assert_eq!(SnapshotReader::open(&p0).unwrap().id(), s0.id);
    assert!(!harvest(&mem).is_empty());
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that lives across the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// Runs `f` on a thread; its result, or a panic after 10 s (a hang: the
/// thread stays blocked until the test process ends).
fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} hangs"))
}

#[test]
fn fifos_as_snapshot_files_are_errors_not_hangs() {
    let dir = TempDir::new("fifo");
    let fifo = dir.path("fifo");
    mkfifo(&fifo);

    let f = fifo.clone();
    let r = within_10s("SnapshotReader::open on a FIFO", move || {
        SnapshotReader::open(&f).map(|_| ())
    });
    assert!(matches!(r, Err(SnapshotError::File { .. })), "{r:?}");

    let f = fifo.clone();
    let r = within_10s("ForeignMemory::firecracker on a FIFO", move || {
        ForeignMemory::firecracker(&f, &[(GuestPhysAddr(0), 16 * PAGE)]).map(|_| ())
    });
    assert!(
        matches!(
            r,
            Err(SnapshotError::Foreign {
                problem: ForeignProblem::NotAFile,
                ..
            })
        ),
        "{r:?}"
    );

    // cloud-hypervisor: state.json a FIFO; then memory-ranges one.
    let ch = dir.path("ch");
    std::fs::create_dir(&ch).unwrap();
    mkfifo(&ch.join("state.json"));
    let d = ch.clone();
    let r = within_10s("cloud_hypervisor with a FIFO state.json", move || {
        ForeignMemory::cloud_hypervisor(&d).map(|_| ())
    });
    assert!(
        matches!(
            r,
            Err(SnapshotError::Foreign {
                problem: ForeignProblem::NotAFile,
                ..
            })
        ),
        "{r:?}"
    );
    std::fs::remove_file(ch.join("state.json")).unwrap();
    let state = serde_json::json!({
        "snapshots": {
            "memory-manager": {
                "snapshot_data": {
                    "state": serde_json::json!({
                        "memory_ranges": { "data": [{ "gpa": 0, "length": 16 * PAGE }] }
                    }).to_string()
                }
            }
        }
    });
    std::fs::write(ch.join("state.json"), state.to_string()).unwrap();
    mkfifo(&ch.join("memory-ranges"));
    let d = ch.clone();
    let r = within_10s("cloud_hypervisor with a FIFO memory-ranges", move || {
        ForeignMemory::cloud_hypervisor(&d).map(|_| ())
    });
    assert!(
        matches!(
            r,
            Err(SnapshotError::Foreign {
                problem: ForeignProblem::NotAFile,
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn a_state_json_that_never_ends_is_refused_by_its_size() {
    // A character device reads forever: refused before any byte is read,
    // where the read would have grown a buffer until memory ran out.
    let dir = TempDir::new("zero");
    let ch = dir.path("ch");
    std::fs::create_dir(&ch).unwrap();
    std::os::unix::fs::symlink("/dev/zero", ch.join("state.json")).unwrap();
    let r = ForeignMemory::cloud_hypervisor(&ch);
    assert!(
        matches!(
            r,
            Err(SnapshotError::Foreign {
                problem: ForeignProblem::NotAFile | ForeignProblem::Symlink,
                ..
            })
        ),
        "{r:?}"
    );
    // A regular one larger than any cloud-hypervisor writes (sparse: no
    // disk taken) is refused by its length before it is read.
    std::fs::remove_file(ch.join("state.json")).unwrap();
    let f = std::fs::File::create(ch.join("state.json")).unwrap();
    f.set_len(1 << 30).unwrap();
    let r = ForeignMemory::cloud_hypervisor(&ch);
    assert!(
        matches!(
            r,
            Err(SnapshotError::Foreign {
                problem: ForeignProblem::TooLarge {
                    len: 0x4000_0000,
                    ..
                },
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn snapshots_of_guest_memory_are_readable_by_their_owner_only() {
    let dir = TempDir::new("mode");
    let mem = memory();
    let p = dir.path("s.snap");
    save(&mem, &p, &SaveOptions::default()).unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "mode {mode:o}");
}

/// A cloud-hypervisor directory whose `memory-ranges` is `mem` and whose
/// ranges are one of 16 pages at 0.
fn ch_dir_with(dir: &TempDir, name: &str, mem: impl FnOnce(&Path)) -> PathBuf {
    let ch = dir.path(name);
    std::fs::create_dir(&ch).unwrap();
    let state = serde_json::json!({
        "snapshots": {
            "memory-manager": {
                "snapshot_data": {
                    "state": serde_json::json!({
                        "memory_ranges": { "data": [{ "gpa": 0, "length": 16 * PAGE }] }
                    }).to_string()
                }
            }
        }
    });
    std::fs::write(ch.join("state.json"), state.to_string()).unwrap();
    mem(&ch.join("memory-ranges"));
    ch
}

#[test]
fn a_cloud_hypervisor_directory_cannot_link_to_files_outside_it() {
    // Whoever wrote the directory would restore into their guest any file
    // of the right length the restoring VMM can read (another tenant's
    // memory file, a host secret).
    let dir = TempDir::new("ch-link");
    let secret = dir.path("other-tenant-memory");
    std::fs::write(&secret, vec![0x5e; 16 * PAGE_SIZE]).unwrap();
    let ch = ch_dir_with(&dir, "ch", |m| {
        std::os::unix::fs::symlink(&secret, m).unwrap()
    });
    let r = ForeignMemory::cloud_hypervisor(&ch);
    assert!(
        matches!(
            r,
            Err(SnapshotError::Foreign {
                problem: ForeignProblem::Symlink,
                ..
            })
        ),
        "{r:?}"
    );
    let ch = ch_dir_with(&dir, "ch2", |m| {
        std::fs::write(m, vec![0x11; 16 * PAGE_SIZE]).unwrap()
    });
    std::fs::rename(ch.join("state.json"), dir.path("state.json")).unwrap();
    std::os::unix::fs::symlink(dir.path("state.json"), ch.join("state.json")).unwrap();
    let r = ForeignMemory::cloud_hypervisor(&ch);
    assert!(
        matches!(
            r,
            Err(SnapshotError::Foreign {
                problem: ForeignProblem::Symlink,
                ..
            })
        ),
        "{r:?}"
    );
    // The directory itself may be a link: the caller named it.
    let ch = ch_dir_with(&dir, "ch3", |m| {
        std::fs::write(m, vec![0x11; 16 * PAGE_SIZE]).unwrap()
    });
    let linked = dir.path("linked");
    std::os::unix::fs::symlink(&ch, &linked).unwrap();
    assert!(ForeignMemory::cloud_hypervisor(&linked).is_ok());
}

#[test]
fn errors_in_a_chain_name_the_file() {
    let dir = TempDir::new("chain-names");
    let mem = memory();
    let p0 = dir.path("s0.snap");
    let p1 = dir.path("s1.snap");
    save(&mem, &p0, &SaveOptions::default()).unwrap();
    mem.write(GuestPhysAddr(PAGE), &[0x99; PAGE_SIZE]).unwrap();
    let r0 = SnapshotReader::open(&p0).unwrap();
    save_incremental(&mem, &r0, &harvest(&mem), &p1).unwrap();
    drop(r0);

    // A cut newer file: open_chain names it.
    let whole = std::fs::read(&p1).unwrap();
    std::fs::write(&p1, &whole[..whole.len() - 1]).unwrap();
    let e = SnapshotReader::open_chain(&[&p0, &p1]).unwrap_err();
    assert!(e.to_string().contains("s1.snap"), "{e}");
    assert!(e.place().is_some(), "{e}");
    std::fs::write(&p1, &whole).unwrap();

    // A damaged page of the base, read through the chain: the restore
    // names the base.
    let mut base = std::fs::read(&p0).unwrap();
    // The first stored page is at the first 4 KiB boundary after the header.
    base[PAGE_SIZE + 7] ^= 0x20;
    std::fs::write(&p0, &base).unwrap();
    let chain = SnapshotReader::open_chain(&[&p0, &p1]).unwrap();
    let back = GuestMemory::new(&chain.region_layout()).unwrap();
    let e = restore_into(&chain, &back).unwrap_err();
    assert!(e.to_string().contains("s0.snap"), "{e}");
    assert!(e.place().is_some(), "{e}");
}

/// A snapshot file at `path` with a valid header (checksum included) of
/// one region of one page, `runs` map runs, `external` ancestor contents
/// (then it is incremental) and `vcpus` vCPU records, and nothing but a
/// hole after it: a sparse file as long as the counts say, costing no
/// disk. Returns where the map starts.
fn sparse_claim(path: &Path, runs: u64, external: u64, vcpus: u32) -> u64 {
    let incremental = external > 0;
    let mut h = Vec::new();
    h.extend_from_slice(b"\x89PFSNAP\n");
    h.extend_from_slice(&1u16.to_le_bytes());
    let flags = u16::from(incremental) | if vcpus > 0 { 2 } else { 0 };
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&4096u32.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&vcpus.to_le_bytes());
    h.extend_from_slice(&[7; 32]); // id
    h.extend_from_slice(&[u8::from(incremental); 32]); // parent
    let content = 4096u64;
    let map = content;
    let table = map + runs * 16;
    let vcpu_at = table + external * 48;
    let end = vcpu_at
        + if vcpus > 0 {
            u64::from(vcpus) * 504 + 8
        } else {
            0
        };
    // With one run, a valid one (one zero page) and its checksum.
    let mut run = [0u8; 16];
    run[0] = 1;
    let map_sum = if runs == 1 {
        xxhash_rust::xxh3::xxh3_64_with_seed(&run, 0x5046_534e_4150_0002)
    } else {
        0
    };
    for v in [1u64, content, 0, map, runs, map_sum, table, external, 0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&0u64.to_le_bytes());
    h.extend_from_slice(&PAGE.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&h, 0x5046_534e_4150_0001);
    h.extend_from_slice(&sum.to_le_bytes());
    let f = std::fs::File::create(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &h, 0).unwrap();
    if runs == 1 {
        std::os::unix::fs::FileExt::write_all_at(&f, &run, map).unwrap();
    }
    f.set_len(end).unwrap();
    map
}

#[test]
fn a_sparse_file_claiming_terabytes_of_map_or_table_is_an_error_not_an_abort() {
    // The parts are sized by the file's length, but a sparse file's length
    // costs its author nothing: a buffer of that length, allocated before
    // a byte is checked, aborted the process (or, where memory is
    // overcommitted, filled it with the holes' zeros).
    let dir = TempDir::new("sparse");
    let p = dir.path("map.snap");
    let map = sparse_claim(&p, 1 << 38, 0, 0); // 4 TiB of map
    match SnapshotReader::open(&p) {
        Err(SnapshotError::Malformed {
            at,
            problem: pagefold::snapshot::Problem::EmptyRun,
        }) => assert_eq!(at.offset, map),
        other => panic!("{other:?}"),
    }
    let p = dir.path("table.snap");
    let table = sparse_claim(&p, 1, 1 << 36, 0); // 3 TiB of ancestor contents
    match SnapshotReader::open(&p) {
        Err(SnapshotError::Malformed {
            at,
            problem: pagefold::snapshot::Problem::Depth,
        }) => assert_eq!(at.offset, table + 16 + 32),
        other => panic!("{other:?}"),
    }
    let p = dir.path("vcpus.snap");
    sparse_claim(&p, 1, 0, u32::MAX); // 2 TiB of vCPU records
    match SnapshotReader::open(&p) {
        Err(SnapshotError::Malformed {
            problem: pagefold::snapshot::Problem::TooManyVcpus { .. },
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_save_to_a_name_of_the_longest_length_succeeds() {
    // The temporary file's name is the destination's plus a suffix: at
    // 255 bytes (NAME_MAX) that name was too long and the save failed.
    let dir = TempDir::new("long-name");
    let mem = memory();
    let p = dir.path(&"s".repeat(255));
    save(&mem, &p, &SaveOptions::default()).unwrap();
    assert!(SnapshotReader::open(&p).is_ok());
}

#[test]
fn an_incremental_save_while_a_migration_holds_the_log_is_refused() {
    // The sender's rounds take pages from the log: a harvest made while it
    // runs lacks them, and an incremental of it restores their old bytes.
    let dir = TempDir::new("inc-mig");
    let mem = memory();
    let p0 = dir.path("s0.snap");
    save(&mem, &p0, &SaveOptions::default()).unwrap();
    let r0 = SnapshotReader::open(&p0).unwrap();
    let sender = pagefold::migration::Sender::start(
        &mem,
        std::io::sink(),
        pagefold::migration::PrecopyOptions::default(),
    )
    .unwrap();
    mem.write(GuestPhysAddr(0), b"dirty").unwrap();
    // The harvest itself is refused now (review_dirty.rs); a harvest from
    // before the sender started is refused by the save.
    let mut dirty = Vec::new();
    assert!(matches!(
        mem.harvest_dirty(RegionSet::All, &mut dirty),
        Err(pagefold::DirtyError::LogInUse { .. })
    ));
    dirty.push(DirtyRun {
        start: GuestPhysAddr(0),
        pages: 1,
    });
    let e = save_incremental(&mem, &r0, &dirty, dir.path("s1.snap")).unwrap_err();
    assert!(matches!(e, SnapshotError::LogInUse), "{e:?}");
    drop(sender);
}

#[test]
fn a_sparse_file_claiming_terabytes_of_sectioned_vcpu_state_is_an_error_not_an_abort() {
    // The sectioned vCPU part names its own length, bounded only by the
    // file's: a sparse file claiming a terabyte there had its buffer
    // allocated before a byte was checked.
    let dir = TempDir::new("sparse-vcpu");
    let mem = memory();
    let p = dir.path("v.snap");
    let state = pagefold::snapshot::VcpuState {
        xsave: vec![0; 4096],
        ..Default::default()
    };
    pagefold::snapshot::save_with_vcpus(&mem, &p, &SaveOptions::default(), &[state]).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let len = bytes.len() as u64;
    // The part's first word is its length, and it ends the file.
    let at = (0..bytes.len() - 8)
        .rev()
        .find(|&k| u64::from_le_bytes(bytes[k..k + 8].try_into().unwrap()) == len - k as u64)
        .unwrap() as u64;
    let claim: u64 = 1 << 40;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &claim.to_le_bytes(), at).unwrap();
    f.set_len(at + claim).unwrap();
    match SnapshotReader::open(&p) {
        Err(SnapshotError::Malformed { at: place, .. }) => assert_eq!(place.offset, at),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_fifo_or_oversized_working_set_is_an_error_not_a_hang() {
    use pagefold::snapshot::{restore_lazy, LazyError, LazyOptions};
    use std::sync::Arc;
    let dir = TempDir::new("ws-fifo");
    let mem = memory();
    let snap = dir.path("s.snap");
    save(&mem, &snap, &SaveOptions::default()).unwrap();
    let ws = dir.path("ws");
    let c = std::ffi::CString::new(ws.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path alive across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let run = |ws: PathBuf| {
        let (tx, rx) = mpsc::channel();
        let snap = snap.clone();
        std::thread::spawn(move || {
            let snap = Arc::new(SnapshotReader::open(&snap).unwrap());
            let dst = GuestMemory::new(&snap.region_layout()).unwrap();
            let opts = LazyOptions {
                working_set: Some(ws),
                ..LazyOptions::default()
            };
            let r = restore_lazy(snap, &dst, opts).map(|l| l.wait().map(|_| ()));
            let _ = tx.send(matches!(r, Err(LazyError::WorkingSet { .. })));
        });
        rx.recv_timeout(Duration::from_secs(20))
    };
    assert_eq!(
        run(ws.clone()),
        Ok(true),
        "a FIFO working set hangs or is taken"
    );
    // Regular, but longer than a set of every page (a sparse file: its
    // length costs its author nothing).
    let big = dir.path("big.ws");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    assert_eq!(run(big), Ok(true));
}

#[test]
fn a_working_set_is_written_through_a_fresh_private_temporary_file() {
    // The temporary name was predictable (`NAME.tmp.PID`) and created
    // following links: a link planted there had its target overwritten.
    use pagefold::snapshot::{restore_lazy, LazyOptions};
    use std::sync::Arc;
    let dir = TempDir::new("ws-link");
    let mem = memory();
    let snap = dir.path("s.snap");
    save(&mem, &snap, &SaveOptions::default()).unwrap();
    let victim = dir.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let ws = dir.path("vm.ws");
    std::os::unix::fs::symlink(&victim, dir.path(&format!("vm.tmp.{}", std::process::id())))
        .unwrap();
    let snap = Arc::new(SnapshotReader::open(&snap).unwrap());
    let dst = GuestMemory::new(&snap.region_layout()).unwrap();
    let opts = LazyOptions {
        working_set: Some(ws.clone()),
        record_pages: 100,
        ..LazyOptions::default()
    };
    restore_lazy(snap, &dst, opts).unwrap().wait().unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let mode = std::fs::metadata(&ws).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "mode {mode:o}");
}

#[test]
fn a_lazy_restore_names_the_ancestor_whose_page_is_damaged() {
    use pagefold::snapshot::{restore_lazy, LazyOptions};
    use std::sync::Arc;
    let dir = TempDir::new("lazy-chain-names");
    let mem = memory();
    let p0 = dir.path("s0.snap");
    let p1 = dir.path("s1.snap");
    save(&mem, &p0, &SaveOptions::default()).unwrap();
    mem.write(GuestPhysAddr(PAGE), &[0x99; PAGE_SIZE]).unwrap();
    let r0 = SnapshotReader::open(&p0).unwrap();
    save_incremental(&mem, &r0, &harvest(&mem), &p1).unwrap();
    drop(r0);
    let mut base = std::fs::read(&p0).unwrap();
    // The first stored page is at the first 4 KiB boundary after the header.
    base[PAGE_SIZE + 7] ^= 0x20;
    std::fs::write(&p0, &base).unwrap();
    let chain = Arc::new(SnapshotReader::open_chain(&[&p0, &p1]).unwrap());
    let back = GuestMemory::new(&chain.region_layout()).unwrap();
    let e = restore_lazy(chain, &back, LazyOptions::default())
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(e.to_string().contains("s0.snap"), "{e}");
}
