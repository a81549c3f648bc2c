//! A snapshot's region layout as page indexes: the map numbers the pages
//! of all regions in address order, holes between regions left out.

use crate::{
    addr::{GuestPhysAddr, PAGE_SHIFT},
    memory::GuestMemory,
};

/// Sorted regions and the index of each one's first page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PageLayout {
    regions: Vec<(GuestPhysAddr, u64)>,
    first: Vec<u64>,
    total: u64,
}

impl PageLayout {
    /// The layout of checked, sorted regions.
    pub(crate) fn new(regions: Vec<(GuestPhysAddr, u64)>) -> Self {
        let mut first = Vec::with_capacity(regions.len());
        let mut total = 0u64;
        for &(_, size) in &regions {
            first.push(total);
            total = total.saturating_add(size >> PAGE_SHIFT);
        }
        PageLayout {
            regions,
            first,
            total,
        }
    }

    /// The layout of a memory (its regions are sorted).
    pub(crate) fn of(mem: &GuestMemory) -> Self {
        Self::new(
            mem.regions()
                .iter()
                .map(|r| (r.start(), r.size()))
                .collect(),
        )
    }

    /// `(start, size)` per region, in address order.
    pub(crate) fn regions(&self) -> &[(GuestPhysAddr, u64)] {
        &self.regions
    }

    /// Pages of all regions.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Index of region `i`'s first page.
    pub(crate) fn first_page(&self, i: usize) -> u64 {
        self.first.get(i).copied().unwrap_or(self.total)
    }

    /// The page index of the page holding `gpa`, if a region holds it.
    pub(crate) fn page_of(&self, gpa: GuestPhysAddr) -> Option<u64> {
        let i = self
            .regions
            .partition_point(|&(s, _)| s <= gpa)
            .checked_sub(1)?;
        let (start, size) = self.regions[i];
        let off = gpa.0 - start.0;
        (off < size).then(|| self.first[i] + (off >> PAGE_SHIFT))
    }

    /// The address of page index `page`.
    pub(crate) fn addr_of(&self, page: u64) -> Option<GuestPhysAddr> {
        let i = self.first.partition_point(|&f| f <= page).checked_sub(1)?;
        let (start, size) = self.regions[i];
        let k = page - self.first[i];
        (k < size >> PAGE_SHIFT).then(|| GuestPhysAddr(start.0 + (k << PAGE_SHIFT)))
    }

    /// Describes two layouts that differ, for an error.
    pub(crate) fn differs(&self, other: &Self) -> Option<String> {
        (self.regions != other.regions).then(|| {
            let show = |r: &[(GuestPhysAddr, u64)]| {
                r.iter()
                    .map(|&(s, n)| format!("[{s}, +{n:#x})"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            format!("{} against {}", show(&self.regions), show(&other.regions))
        })
    }
}
