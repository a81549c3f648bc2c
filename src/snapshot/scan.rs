//! Reading guest memory for a save, a batch of pages at a time: a released
//! page that holds no data is zero without being read (reading a hole
//! through the mapping would make the kernel allocate it); the rest is
//! read through the library (a released page by `pread` of its frame),
//! and each page's content address is computed in parallel.

use rayon::prelude::*;

use super::{
    error::SnapshotError,
    format::{content_hash, Hash},
};
use crate::{
    addr::{is_zero_page, GuestPhysAddr, PAGE_SIZE},
    memory::{GuestMemory, PageKind, ReleasedData},
};

/// Pages per batch.
pub(crate) const BATCH: usize = 256;

/// A batch's buffer and what it found.
pub(crate) struct Scanner<'m> {
    mem: &'m GuestMemory,
    holes: ReleasedData<'m>,
    read: Vec<bool>,
    /// The pages' bytes (meaningful where `hashes` has an address).
    pub(crate) buf: Vec<u8>,
    /// Per page of the batch: `None` for zero, else its content address.
    pub(crate) hashes: Vec<Option<Hash>>,
}

impl<'m> Scanner<'m> {
    pub(crate) fn new(mem: &'m GuestMemory) -> Self {
        Scanner {
            mem,
            holes: ReleasedData::new(mem),
            read: Vec::with_capacity(BATCH),
            buf: vec![0u8; BATCH * PAGE_SIZE],
            hashes: Vec::with_capacity(BATCH),
        }
    }

    /// Scans pages `first..first + count` (`count <= BATCH`, inside the
    /// region) of region `region`.
    pub(crate) fn scan(
        &mut self,
        region: usize,
        first: usize,
        count: usize,
    ) -> Result<(), SnapshotError> {
        let r = &self.mem.regions()[region];
        let states = r.page_states();
        self.read.clear();
        for i in first..first + count {
            let s = states.load(i);
            let hole = matches!(s.kind(), PageKind::Zero | PageKind::Ballooned)
                && !(s.is_released_untrapped() && self.holes.holds_data(r, i, s));
            self.read.push(!hole);
        }
        let mut k = 0;
        while k < count {
            if !self.read[k] {
                k += 1;
                continue;
            }
            let end = (k..count).find(|&e| !self.read[e]).unwrap_or(count);
            let gpa = GuestPhysAddr(r.start().0 + ((first + k) * PAGE_SIZE) as u64);
            self.mem
                .read(gpa, &mut self.buf[k * PAGE_SIZE..end * PAGE_SIZE])?;
            k = end;
        }
        self.buf[..count * PAGE_SIZE]
            .par_chunks(PAGE_SIZE)
            .zip(self.read.par_iter())
            .map(|(page, &read)| {
                let zero = <&[u8; PAGE_SIZE]>::try_from(page).is_ok_and(is_zero_page);
                (read && !zero).then(|| content_hash(page))
            })
            .collect_into_vec(&mut self.hashes);
        Ok(())
    }
}
