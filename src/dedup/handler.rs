//! The userfaultfd handler thread. Writers meet write protection only inside
//! a merge's or unmerge's write-protect window; that operation wakes them
//! itself when it closes the window. The handler is the safety net that makes
//! "a writer never waits forever" independent of every error path: between
//! windows (it takes the window lock), a fault on a page no operation holds
//! has its stale protection removed and its writer woken. It also counts
//! the faults, so their number is visible in the statistics.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Weak,
    },
    thread::JoinHandle,
};

use super::{lock, read, Inner};
use crate::{
    addr::{HostVirtAddr, PAGE_SIZE},
    memory::page_state::LOCKED,
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
            // With the window lock held no write-protect window is open, so
            // protection found on a page no operation holds is stale: drop
            // it. (Without the lock, this could disarm a window opened since
            // the fault and let a write slip between its compare and remap.)
            let _no_window = lock(&inner.windows);
            if !held_by_an_operation(&inner, page) {
                let _ = uffd.unprotect(page, PAGE_SIZE as u64, true);
                let _ = uffd.wake(page, PAGE_SIZE as u64);
            }
        }
    }
}

/// Whether the page at host address `addr` is locked by a merge or unmerge
/// (which will wake its writers when done).
fn held_by_an_operation(inner: &Inner, addr: HostVirtAddr) -> bool {
    for vm in read(&inner.vms).iter() {
        for r in vm.mem.regions() {
            let start = r.host_addr().0;
            if addr.0 >= start && addr.0 < start + r.size() {
                let page = crate::addr::usize_from((addr.0 - start) / PAGE_SIZE as u64);
                return r.page_states().load(page).flags() & LOCKED != 0;
            }
        }
    }
    false
}
