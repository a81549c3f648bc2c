//! Batches, as they arrive on the device's queues: inflate and deflate
//! lists of guest frame numbers (typed, or the inflate/deflate queues' raw
//! little-endian 32-bit PFNs), ranges of guest-physical addresses, and free
//! page reports. Each entry is screened (batch limit, repeats) and located
//! in guest memory here; what is wrong with one entry is an [`EntryError`]
//! and the rest of the batch is applied (`apply.rs`).

use std::collections::HashMap;

use super::{
    error::{BalloonError, BatchReport, EntryError},
    Balloon, Inner, Loc,
};
use crate::addr::{usize_from, GuestFrame, GuestPhysAddr, PAGE_SHIFT, PAGE_SIZE};

/// What applies located entries: [`Balloon::inflate_entries`] or
/// [`Balloon::deflate_entries`].
type Apply = fn(&Balloon, &mut Inner, &[(usize, Loc)], &mut BatchReport);

impl Balloon {
    /// Inflates the pages with these guest frame numbers (one virtio
    /// inflate request). A `u64` PFN array from the guest can be passed
    /// in place through [`GuestFrame::from_raw_slice`].
    pub fn inflate_pfns(&self, pfns: &[GuestFrame]) -> BatchReport {
        self.batch(pfns, Self::inflate_entries)
    }

    /// Inflates from the raw bytes of the virtio inflate queue: little-endian
    /// 32-bit guest frame numbers. A trailing partial entry is an error
    /// entry.
    pub fn inflate_pfns_le32(&self, bytes: &[u8]) -> BatchReport {
        self.batch_le32(bytes, Self::inflate_entries)
    }

    /// Deflates the pages with these guest frame numbers (one virtio
    /// deflate request). Their memory comes back on the next access.
    pub fn deflate_pfns(&self, pfns: &[GuestFrame]) -> BatchReport {
        self.batch(pfns, Self::deflate_entries)
    }

    /// Deflates from the raw bytes of the virtio deflate queue
    /// (little-endian 32-bit guest frame numbers).
    pub fn deflate_pfns_le32(&self, bytes: &[u8]) -> BatchReport {
        self.batch_le32(bytes, Self::deflate_entries)
    }

    /// Screens and locates a batch, then applies it under the balloon's
    /// lock.
    fn batch(&self, pfns: &[GuestFrame], apply: Apply) -> BatchReport {
        let mut report = BatchReport::default();
        let entries = self.screen(pfns, &mut report);
        let mut inner = self.lock();
        apply(self, &mut inner, &entries, &mut report);
        report.errors.sort_by_key(|e| e.index);
        report
    }

    /// As [`batch`](Self::batch) over a queue's le32 payload.
    fn batch_le32(&self, bytes: &[u8], apply: Apply) -> BatchReport {
        let (pfns, tail) = le32_pfns(bytes);
        let mut r = self.batch(&pfns, apply);
        if tail {
            r.errors.push(EntryError {
                index: pfns.len(),
                error: BalloonError::Truncated {
                    len: bytes.len(),
                    entry: 4,
                },
            });
        }
        r
    }

    /// Validates a batch: limit, range, repeats. Returns the located entries.
    fn screen(&self, pfns: &[GuestFrame], report: &mut BatchReport) -> Vec<(usize, Loc)> {
        let mut seen: HashMap<GuestFrame, usize> = HashMap::with_capacity(pfns.len().min(4096));
        let mut out = Vec::with_capacity(pfns.len().min(self.options.max_batch));
        for (index, &pfn) in pfns.iter().enumerate() {
            if index >= self.options.max_batch {
                report.errors.push(EntryError {
                    index,
                    error: BalloonError::OverLimit {
                        limit: self.options.max_batch,
                    },
                });
                continue;
            }
            if let Some(&first) = seen.get(&pfn) {
                report.errors.push(EntryError {
                    index,
                    error: BalloonError::Repeated { pfn, first },
                });
                continue;
            }
            seen.insert(pfn, index);
            match self.locate(pfn) {
                Ok(l) => out.push((index, l)),
                Err(error) => report.errors.push(EntryError { index, error }),
            }
        }
        out
    }

    /// Inflates every page of `[gpa, gpa+len)` (4 KiB aligned). Pages
    /// already in the balloon are skipped silently; per-page errors carry the
    /// page's index in the range.
    pub fn inflate_range(&self, gpa: GuestPhysAddr, len: u64) -> Result<BatchReport, BalloonError> {
        let mut report = self.for_range(gpa, len, Self::inflate_entries)?;
        report
            .errors
            .retain(|e| !matches!(e.error, BalloonError::AlreadyBallooned { .. }));
        Ok(report)
    }

    /// Deflates every page of `[gpa, gpa+len)`; pages not in the balloon are
    /// skipped silently.
    pub fn deflate_range(&self, gpa: GuestPhysAddr, len: u64) -> Result<BatchReport, BalloonError> {
        let mut report = self.for_range(gpa, len, Self::deflate_entries)?;
        report
            .errors
            .retain(|e| !matches!(e.error, BalloonError::NotBallooned { .. }));
        Ok(report)
    }

    /// Checks a range: 4 KiB aligned and wholly inside guest memory.
    /// Returns `(region, first page, count)` per region touched.
    fn range_pages(
        &self,
        gpa: GuestPhysAddr,
        len: u64,
    ) -> Result<Vec<(usize, usize, usize)>, BalloonError> {
        let mis = BalloonError::Misaligned {
            addr: gpa,
            len,
            align: PAGE_SIZE as u64,
        };
        if gpa.0 % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE as u64 != 0 {
            return Err(mis);
        }
        let end = gpa
            .0
            .checked_add(len)
            .ok_or(BalloonError::OutOfRange { pfn: gpa.frame() })?;
        let mut out = Vec::new();
        let mut at = gpa.0;
        while at < end {
            let l = self.locate(GuestPhysAddr(at).frame())?;
            let r = &self.mem.regions()[l.region];
            let stop = r.end().min(end);
            out.push((l.region, l.page, usize_from((stop - at) >> PAGE_SHIFT)));
            at = stop;
        }
        Ok(out)
    }

    /// Runs `apply` (inflate or deflate) over every page of `[gpa, gpa+len)`,
    /// one region's run at a time, under the balloon's lock; entry indices
    /// count pages from the start of the range.
    fn for_range(
        &self,
        gpa: GuestPhysAddr,
        len: u64,
        apply: Apply,
    ) -> Result<BatchReport, BalloonError> {
        let runs = self.range_pages(gpa, len)?;
        let mut report = BatchReport::default();
        let mut inner = self.lock();
        let mut index = 0usize;
        for (region, first, count) in runs {
            let entries: Vec<(usize, Loc)> = (0..count)
                .map(|i| {
                    (
                        index + i,
                        Loc {
                            region,
                            page: first + i,
                        },
                    )
                })
                .collect();
            index += count;
            apply(self, &mut inner, &entries, &mut report);
        }
        Ok(report)
    }

    /// Free page reporting: the guest reports `2^order` free 4 KiB pages at
    /// `gpa`. Their memory is released; they stay the guest's (zero pages,
    /// not counted in [`actual`](Self::actual)). On a hugetlb store a report
    /// smaller than a huge page releases nothing. Returns the pages released.
    pub fn report_free(&self, gpa: GuestPhysAddr, order: u32) -> Result<u64, BalloonError> {
        if order > 40 {
            return Err(BalloonError::Order { order });
        }
        self.check_file(gpa.frame())?;
        let len = (PAGE_SIZE as u64) << order;
        let granule = self.mem.frame_store().granule().bytes();
        if len < granule {
            return Ok(0);
        }
        if gpa.0 % len != 0 && gpa.0 % granule != 0 {
            return Err(BalloonError::Misaligned {
                addr: gpa,
                len,
                align: granule,
            });
        }
        // Checks the span first, so a report into a hole changes nothing.
        self.range_pages(gpa, len)?;
        let n = self.mem.discard(gpa, len)?;
        self.lock().reported += n;
        Ok(n)
    }
}

/// The guest frame numbers of a le32 queue payload, and whether it ends
/// in a partial entry.
fn le32_pfns(bytes: &[u8]) -> (Vec<GuestFrame>, bool) {
    let pfns = bytes
        .chunks_exact(4)
        .map(|c| GuestFrame(u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))))
        .collect();
    (pfns, bytes.len() % 4 != 0)
}
