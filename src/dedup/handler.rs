//! The userfaultfd handler thread. Writers meet write protection only inside
//! a merge's or unmerge's write-protect window; that operation wakes them
//! itself when it closes the window. The handler is the safety net that makes
//! "a writer never waits forever" independent of every error path: between
//! windows (it takes the region's protection lock), a fault finds only
//! stale protection, which it removes before waking the writer. It also counts
//! the faults, so their number is visible in the statistics.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Weak,
    },
    thread::JoinHandle,
};

use super::{locks::read, state::Inner};
use crate::{
    addr::{HostVirtAddr, PAGE_SIZE},
    userfault::Userfault,
};

pub(super) fn spawn(
    inner: Weak<Inner>,
    uffd: Arc<Userfault>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pagefold-uffd".into())
        .spawn(move || run(&inner, &uffd, &stop))
}

fn run(inner: &Weak<Inner>, uffd: &Userfault, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match uffd.wait(50) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        }
        while let Ok(Some(fault)) = uffd.read_fault() {
            let Some(inner) = inner.upgrade() else { return };
            inner.faults_seen.fetch_add(1, Ordering::Relaxed);
            let page = HostVirtAddr(fault.addr.0 & !(PAGE_SIZE as u64 - 1));
            // With the region's protection lock held no write-protect window
            // is open over it, so any protection found is stale: drop it and
            // wake the writer, even on a page an operation still holds (one
            // whose window has closed, its publication pending, already woke
            // its writers; a failed unregister can leave the protection on,
            // and a writer arriving after that wake would wait forever).
            // (Without the lock, this could disarm a window opened since the
            // fault and let a write slip between its compare and remap.)
            for_page(&inner, page, || {
                let _ = uffd.unprotect(page, PAGE_SIZE as u64, true);
                let _ = uffd.wake(page, PAGE_SIZE as u64);
            });
        }
    }
}

/// Runs `f` for the page at host address `addr` with its region's
/// protection lock held (no write-protect window is open over it).
fn for_page(inner: &Inner, addr: HostVirtAddr, f: impl FnOnce()) {
    for vm in read(&inner.vms).iter() {
        for r in vm.mem.regions() {
            let start = r.host_addr().0;
            if addr.0 >= start && addr.0 < start + r.size() {
                let _no_window = r.lock_protection();
                f();
                return;
            }
        }
    }
    // Not guest memory of any registered VM (unregistered since): wake.
    f();
}
