//! Migration beside the other layers, as a review found them go wrong: a
//! balloon inflating during (or before) a migration keeps its memory
//! released (the sender's rounds and the end digest read ballooned holes
//! through the mapping, which made shmem allocate them, and
//! `reclaim_touched` then deflated pages the guest never touched); and one
//! sender per memory (a second one, started while the first lived, had its
//! tracking turned off when the first was dropped, and lost writes).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use pagefold::{
    migration::{receive_migration, MigrationError, PrecopyOptions, ReaderLimits, Sender},
    Balloon, GuestMemory, GuestPhysAddr,
};

const P: u64 = 4096;

#[test]
fn a_migration_leaves_ballooned_memory_released() {
    for verify in [false, true] {
        let n = 1024u64;
        let mem = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), n * P)]).unwrap());
        mem.fill(GuestPhysAddr(0), 0xab, (n * P) as usize).unwrap();
        let balloon = Balloon::new(Arc::clone(&mem));
        let opts = PrecopyOptions {
            verify,
            ..PrecopyOptions::default()
        };
        let mut s = Sender::start(&mem, Vec::new(), opts).unwrap();
        s.iterate().unwrap(); // round 0 sent the 0xab pages
        assert_eq!(
            balloon
                .inflate_range(GuestPhysAddr(0), n * P)
                .unwrap()
                .applied,
            n
        );
        let after_inflate = mem.frame_store().allocated_bytes().unwrap();
        let (wire, _) = s.finish().unwrap();
        assert_eq!(
            mem.frame_store().allocated_bytes().unwrap(),
            after_inflate,
            "verify {verify}: the migration gave ballooned pages memory again"
        );
        // The receiver has the zeros the inflate left.
        let got = receive_migration(&wire[..], ReaderLimits::default()).unwrap();
        let mut page = vec![1u8; P as usize];
        got.mem.read(GuestPhysAddr(7 * P), &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        // The source resumes: no page counts as touched by the guest.
        assert_eq!(balloon.reclaim_touched().unwrap(), 0);
        assert_eq!(balloon.actual(), n);
    }
}

#[test]
fn one_sender_per_memory() {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 64 * P)]).unwrap();
    mem.write_obj(GuestPhysAddr(0), 1u64).unwrap();
    let opts = PrecopyOptions {
        verify: false,
        ..PrecopyOptions::default()
    };
    let mut s = Sender::start(&mem, Vec::new(), opts).unwrap();
    s.iterate().unwrap();
    s.cancel_handle()
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // A second sender while the first lives is refused...
    assert!(matches!(
        Sender::start(&mem, Vec::new(), opts),
        Err(MigrationError::Busy)
    ));
    // ... and once it is dropped, the retry tracks every write.
    drop(s);
    let mut s = Sender::start(&mem, Vec::new(), opts).unwrap();
    s.iterate().unwrap();
    assert!(mem.dirty_tracking(0).unwrap());
    mem.write_obj(GuestPhysAddr(0x5000), 0xdead_beefu64)
        .unwrap();
    let (wire, _) = s.finish().unwrap();
    let got = receive_migration(&wire[..], ReaderLimits::default()).unwrap();
    assert_eq!(
        got.mem.read_obj::<u64>(GuestPhysAddr(0x5000)).unwrap(),
        0xdead_beef
    );
    assert!(
        !mem.dirty_tracking(0).unwrap(),
        "tracking put back as it was"
    );
}
