//! Receiver folding: a migration received with `receive_migration_folded`
//! equals the sender's memory byte for byte, and the kernel holds about the
//! distinct content for it (pages that arrived as references share frames),
//! while a plain receive holds every non-zero page. Also: folded pages stay
//! correct under copy-on-write, a later round overwriting a referenced page
//! is not folded wrongly, and a corrupt stream leaves nothing registered.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use pagefold::{
    migration::{
        receive_migration, receive_migration_folded, PrecopyOptions, ReaderLimits, ReceiveError,
        Sender,
    },
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, VmOptions, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;
const REGION: u64 = 4 << 20; // 1024 pages

fn assert_same(a: &GuestMemory, b: &GuestMemory) {
    let mut x = vec![0u8; PAGE_SIZE];
    let mut y = vec![0u8; PAGE_SIZE];
    for r in a.regions() {
        for i in 0..r.size() / PAGE {
            let gpa = GuestPhysAddr(r.start().0 + i * PAGE);
            a.read(gpa, &mut x).unwrap();
            b.read(gpa, &mut y).unwrap();
            assert!(x == y, "page {gpa:?} differs");
        }
    }
}

/// Four regions holding the same image: 3/4 of the pages unique content,
/// 1/4 zero; returns (memory, distinct non-zero pages).
fn four_clones() -> (GuestMemory, u64) {
    let layout: Vec<_> = (0..4u64)
        .map(|i| (GuestPhysAddr(i << 32), REGION))
        .collect();
    let mem = GuestMemory::new(&layout).unwrap();
    let mut distinct = 0;
    for p in 0..REGION / PAGE {
        if p % 4 == 3 {
            continue;
        }
        let mut page: Vec<u8> = (0..PAGE_SIZE)
            .map(|i| (p as u8) ^ (i as u8).wrapping_mul(31))
            .collect();
        page[..8].copy_from_slice(&(p + 1).to_le_bytes());
        distinct += 1;
        for &(start, _) in &layout {
            mem.write(GuestPhysAddr(start.0 + p * PAGE), &page).unwrap();
        }
    }
    (mem, distinct)
}

fn send(mem: &GuestMemory) -> Vec<u8> {
    let m = Sender::start(mem, Vec::new(), PrecopyOptions::default()).unwrap();
    m.finish().unwrap().0
}

#[test]
fn folded_receive_equals_sender_and_holds_about_the_distinct_content() {
    let (mem, distinct) = four_clones();
    let wire = send(&mem);

    let plain = receive_migration(&wire[..], ReaderLimits::default()).unwrap();
    // Measured before any comparison reads (a read of a hole in a memfd
    // mapping allocates it).
    let plain_bytes = plain.mem.frame_store().allocated_bytes().unwrap();
    assert_same(&mem, &plain.mem);
    assert!(plain_bytes >= 4 * distinct * PAGE, "{plain_bytes}");
    drop(plain);

    let store = Arc::new(FrameStore::memfd().unwrap());
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let got = receive_migration_folded(
        &wire[..],
        ReaderLimits::default(),
        &host,
        VmOptions::default(),
    )
    .unwrap();
    assert!(got.stats.verified);
    let folded = store.allocated_bytes().unwrap();
    assert_same(&mem, &got.mem);
    // Three clones' worth arrived as references and now share frames.
    assert_eq!(got.stats.ref_pages, 3 * distinct);
    assert!(got.fold.merged_shared >= 3 * distinct, "{:?}", got.fold);
    // About the distinct content: one frame per content (the shared frame;
    // the canonical page's own frame is punched), small slack for metadata.
    assert!(
        folded <= distinct * PAGE + (64 << 10),
        "folded {folded} vs distinct {}",
        distinct * PAGE
    );
    assert!(plain_bytes - folded >= 3 * distinct * PAGE - (64 << 10));

    // Copy-on-write: a write to one clone leaves the others alone.
    got.mem
        .write_obj(GuestPhysAddr(1 << 32), 0xdead_beef_u64)
        .unwrap();
    assert_eq!(
        got.mem.read_obj::<u64>(GuestPhysAddr(1 << 32)).unwrap(),
        0xdead_beef
    );
    assert_eq!(
        got.mem.read_obj::<u64>(GuestPhysAddr(0)).unwrap(),
        mem.read_obj::<u64>(GuestPhysAddr(0)).unwrap()
    );
    let mut x = vec![0u8; PAGE_SIZE];
    let mut y = vec![0u8; PAGE_SIZE];
    mem.read(GuestPhysAddr(2 << 32), &mut x).unwrap();
    got.mem.read(GuestPhysAddr(2 << 32), &mut y).unwrap();
    assert_eq!(x, y);
}

#[test]
fn later_rounds_overwriting_referenced_pages_fold_correctly() {
    let (mem, _) = four_clones();
    let mut m = Sender::start(&mem, Vec::new(), PrecopyOptions::default()).unwrap();
    m.iterate().unwrap();
    // Overwrite some referenced pages and some sources after round 0.
    for p in (0..REGION / PAGE).step_by(5) {
        mem.fill(GuestPhysAddr((1 << 32) + p * PAGE), p as u8 | 1, 100)
            .unwrap();
        mem.fill(GuestPhysAddr(p * PAGE + 200), 7, 3).unwrap();
    }
    let (wire, _) = m.finish().unwrap();
    let store = Arc::new(FrameStore::memfd().unwrap());
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let got = receive_migration_folded(
        &wire[..],
        ReaderLimits::default(),
        &host,
        VmOptions::default(),
    )
    .unwrap();
    assert_same(&mem, &got.mem);
    assert!(got.fold.merged_shared > 0);
}

#[test]
fn corrupt_stream_registers_nothing() {
    let (mem, _) = four_clones();
    let mut wire = send(&mem);
    let n = wire.len();
    wire[n / 2] ^= 0x40;
    let store = Arc::new(FrameStore::memfd().unwrap());
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let err = receive_migration_folded(
        &wire[..],
        ReaderLimits::default(),
        &host,
        VmOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ReceiveError::Stream(_)), "{err}");
    assert_eq!(host.stats().unwrap().pages_total, 0);
    assert_eq!(store.allocated_bytes().unwrap(), 0);
    let wire = send(&mem);
    let truncated = &wire[..wire.len() - 20];
    assert!(receive_migration_folded(
        truncated,
        ReaderLimits::default(),
        &host,
        VmOptions::default()
    )
    .is_err());
    assert_eq!(store.allocated_bytes().unwrap(), 0);
}
