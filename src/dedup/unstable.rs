//! KSM's unstable tree, as an index: pages seen once this full scan with no
//! match yet, so that a later batch finds their duplicates. One 12-byte
//! entry a page (the top 32 bits of its hash, its VM's position, region and
//! page) in an open-addressing table, hashed by those 32 bits: a page that
//! matches is read and hashed again before it joins a group, which also
//! catches a 32-bit collision and a page that changed since. A `HashMap`
//! keyed by (domain, hash) took about 50 bytes an entry, one entry for every
//! page without a twin (found from outside: a tenth of a merge's peak).
//! Entries name VMs by position in the host's list, so a VM leaving it
//! takes its entries along and moves the later VMs' down.

use std::sync::Arc;

use hashbrown::HashTable;

use super::{options::DomainId, scan::visit_hash, vm::VmEntry};

/// Where an unstable page is: VM position, region, page.
pub(super) type Place = (usize, u32, u32);

#[derive(Debug, Default)]
pub(super) struct Unstable {
    /// `[top 32 bits of the hash, VM position << 16 | region, page]`.
    table: HashTable<[u32; 3]>,
}

fn key(short: u32) -> u64 {
    // Keyed xxh3 bits, spread already; the table wants 64.
    u64::from(short).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl Unstable {
    /// Takes out the page of `domain` recorded under `hash`, if any.
    pub(super) fn take(
        &mut self,
        vms: &[Arc<VmEntry>],
        domain: DomainId,
        hash: u64,
    ) -> Option<Place> {
        let short = visit_hash(hash);
        let entry = self
            .table
            .find_entry(key(short), |e| {
                e[0] == short
                    && vms
                        .get((e[1] >> 16) as usize)
                        .is_some_and(|v| v.domain == domain)
            })
            .ok()?;
        let ([_, at, page], _) = entry.remove();
        Some(((at >> 16) as usize, at & 0xffff, page))
    }

    /// Records a page; one past 65,535 VMs or regions is not recorded (its
    /// duplicates are found on a later full scan, or not at all).
    pub(super) fn insert(&mut self, (vm, region, page): Place, hash: u64) {
        let (Ok(vm), true) = (u32::try_from(vm), region <= 0xffff) else {
            return;
        };
        if vm > 0xffff {
            return;
        }
        let short = visit_hash(hash);
        self.table
            .insert_unique(key(short), [short, vm << 16 | region, page], |e| key(e[0]));
    }

    /// Forgets the pages of the VM at position `gone`, which leaves the
    /// host's list: the VMs after it move down one.
    pub(super) fn forget_vm(&mut self, gone: usize) {
        let Ok(gone) = u32::try_from(gone) else {
            return;
        };
        // The table hashes the first word only: the place can change in
        // place.
        self.table.retain(|e| {
            let v = e[1] >> 16;
            if v > gone {
                e[1] -= 1 << 16;
            }
            v != gone
        });
    }

    /// Pages recorded (KSM's `pages_unshared`).
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// Forgets every page and gives the table's memory back.
    pub(super) fn clear(&mut self) {
        self.table = HashTable::new();
    }

    /// Bytes allocated.
    pub(super) fn allocated_bytes(&self) -> usize {
        self.table.allocation_size()
    }
}
