//! A loom model of the page-state machine: merge, library write, raw write
//! (a vCPU through the host mapping), write-fault resolution, unmerge and
//! reconcile, against a small model of the kernel side of one guest page
//! (what its host page maps, the userfaultfd write-protect bit,
//! copy-on-write of a private mapping), where the page-table lock makes each
//! kernel step atomic as it is in Linux. The page-state steps are the
//! library's own (`dedup/steps.rs`, through the `pagefold::__loom` door) on
//! the real `PageStateTable`; only the syscalls between them are modelled.
//!
//! Checked in every interleaving: the last value written is the value read
//! (no lost write), the shared frame's bytes never change (no write lands in
//! a shared frame), and the state word ends unlocked and consistent with
//! what the page maps.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_page_state`.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::{
    sync::{Arc, Mutex},
    thread,
};
use pagefold::{
    __loom::{
        claim_candidate, claim_remapped, mark_copied, mergeable, merged_state, publish_merge,
        publish_unmerge, reconcilable, PageKind, PageStateTable, RemappedClaim, Target,
    },
    FrameNumber,
};

const SHARED_CONTENT: u64 = 7;
const SHARED_FRAME: FrameNumber = FrameNumber(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Maps {
    /// The page's own frame, shared and writable.
    Own,
    /// The shared frame, private copy-on-write.
    Shared,
    /// An anonymous copy the kernel made on write.
    Anon,
}

/// The kernel side of one guest page.
struct Pte {
    maps: Maps,
    write_protected: bool,
    own: u64,
    shared: u64,
    anon: u64,
}

struct Page {
    table: PageStateTable,
    pte: Mutex<Pte>,
}

impl Page {
    fn new() -> Self {
        Page {
            table: PageStateTable::new_private(FrameNumber(0), 1).unwrap(),
            pte: Mutex::new(Pte {
                maps: Maps::Own,
                write_protected: false,
                own: SHARED_CONTENT,
                shared: SHARED_CONTENT,
                anon: 0,
            }),
        }
    }

    /// A store through the host mapping: waits while write-protected (the
    /// userfaultfd fault), copies on write through a private mapping.
    fn raw_write(&self, v: u64) {
        loop {
            let mut p = self.pte.lock().unwrap();
            if p.write_protected {
                drop(p);
                thread::yield_now();
                continue;
            }
            match p.maps {
                Maps::Own => p.own = v,
                Maps::Anon => p.anon = v,
                Maps::Shared => {
                    p.maps = Maps::Anon;
                    p.anon = v;
                }
            }
            return;
        }
    }

    fn raw_read(&self) -> u64 {
        let p = self.pte.lock().unwrap();
        match p.maps {
            Maps::Own => p.own,
            Maps::Shared => p.shared,
            Maps::Anon => p.anon,
        }
    }

    /// The library's write path: wait out a locked word (as
    /// `GuestRegion::make_writable` does), then store through the mapping.
    fn library_write(&self, v: u64) {
        while self.table.load(0).is_locked() {
            thread::yield_now();
        }
        self.raw_write(v);
    }

    /// The merge protocol of `dedup::merge`: the scan's candidate check,
    /// lock, protect, compare, remap, unprotect, publish.
    fn merge(&self) {
        let s = self.table.load(0);
        if !mergeable(s) {
            return;
        }
        if !claim_candidate(&self.table, 0, s) {
            return;
        }
        self.pte.lock().unwrap().write_protected = true;
        let equal = self.raw_read() == SHARED_CONTENT;
        if equal {
            self.pte.lock().unwrap().maps = Maps::Shared;
        }
        self.pte.lock().unwrap().write_protected = false;
        let merged = equal.then(|| merged_state(Target::Shared(SHARED_FRAME), FrameNumber(0)));
        assert!(
            publish_merge(&self.table, 0, s, merged),
            "nobody else may change a locked word"
        );
    }

    /// Unmerge / resolve_write_fault: lock, protect, copy the page's bytes
    /// into its own frame, remap the own frame, unprotect, publish.
    fn unmerge(&self) {
        let RemappedClaim::Held(s) = claim_remapped(&self.table, 0) else {
            return;
        };
        self.pte.lock().unwrap().write_protected = true;
        let v = self.raw_read();
        {
            let mut p = self.pte.lock().unwrap();
            p.own = v; // pwrite into the own frame
            p.maps = Maps::Own;
            p.write_protected = false;
        }
        assert!(publish_unmerge(&self.table, 0, s, FrameNumber(0)));
    }

    /// Reconcile: a shared page the kernel copied becomes private-remapped.
    fn reconcile(&self) {
        let s = self.table.load(0);
        if !reconcilable(s) {
            return;
        }
        if self.pte.lock().unwrap().maps == Maps::Anon {
            let _ = mark_copied(&self.table, 0, s, FrameNumber(0));
        }
    }

    /// The end state: unlocked, consistent with the mapping, shared frame
    /// untouched.
    fn check(&self, last_written: u64) {
        assert_eq!(self.raw_read(), last_written, "a write was lost");
        let p = self.pte.lock().unwrap();
        assert_eq!(p.shared, SHARED_CONTENT, "a write reached the shared frame");
        assert!(!p.write_protected, "protection left armed");
        let s = self.table.load(0);
        assert!(!s.is_locked(), "state left locked");
        match (s.kind(), s.is_remapped()) {
            (PageKind::Private, false) => assert_eq!(p.maps, Maps::Own),
            (PageKind::Private, true) => assert_eq!(p.maps, Maps::Anon),
            (PageKind::Shared, true) => assert!(matches!(p.maps, Maps::Shared | Maps::Anon)),
            other => panic!("unexpected state {other:?}"),
        }
    }
}

fn bounded(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

#[test]
fn raw_writes_survive_merge_and_unmerge() {
    bounded(|| {
        let page = Arc::new(Page::new());
        let w = {
            let page = Arc::clone(&page);
            thread::spawn(move || {
                page.raw_write(1);
                page.raw_write(SHARED_CONTENT);
                page.raw_write(2);
            })
        };
        let m = {
            let page = Arc::clone(&page);
            thread::spawn(move || {
                page.merge();
                page.unmerge();
            })
        };
        page.merge();
        w.join().unwrap();
        m.join().unwrap();
        page.check(2);
    });
}

#[test]
fn library_writes_and_reconcile_against_merge() {
    bounded(|| {
        let page = Arc::new(Page::new());
        let w = {
            let page = Arc::clone(&page);
            thread::spawn(move || {
                page.library_write(SHARED_CONTENT);
                page.library_write(3);
            })
        };
        let r = {
            let page = Arc::clone(&page);
            thread::spawn(move || {
                page.reconcile();
                page.unmerge();
            })
        };
        page.merge();
        page.reconcile();
        w.join().unwrap();
        r.join().unwrap();
        page.check(3);
    });
}
