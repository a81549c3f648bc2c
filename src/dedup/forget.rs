//! Taking a VM out of a dedup host: its place in the scan's positions, its
//! hashes, and the shared-frame references only it held.

use super::{
    locks::write,
    reconcile,
    state::{Inner, ScanState},
    vm::VmEntry,
};

/// Takes `entry` out of the host (under the scan's lock, `scan`). The
/// caller has brought its pages home, or nothing maps them any more.
pub(super) fn remove_vm(inner: &Inner, scan: &mut ScanState, entry: &VmEntry) {
    let vm = entry.id;
    {
        let mut vms = write(&inner.vms);
        // The incremental scan's cursor names a VM by position: the VMs
        // after this one move down one, and a cursor inside this one
        // goes on at the start of the next (found by review: it skipped
        // pages and counted a short pass as a full scan).
        if let Some(gone) = vms.iter().position(|e| e.id == vm) {
            // The unstable index names VMs by position too.
            scan.unstable.forget_vm(gone);
            let cursor = &mut scan.cursor;
            if cursor.0 > gone {
                cursor.0 -= 1;
            } else if cursor.0 == gone {
                *cursor = (gone, 0, 0);
            }
        }
        vms.retain(|e| e.id != vm);
    }
    entry.mem.release_from_dedup();
    // Every page of the VM is back in its own frame, so the recount only
    // frees shared frames nobody maps any more; one whose punch fails
    // stays recorded and is freed by a later recount. The VM is gone
    // either way, so this is no reason to report a failure.
    let _ = reconcile::recount(inner);
    scan.old_hashes.remove(&vm);
}
