//! Guest-physical address to region lookup. A bucket table over the span of
//! guest memory gives, for any address, the first region that could hold it;
//! the regions' (start, end) pairs sit side by side in one array, so a
//! lookup touches two or three cache lines and writes nothing.
//!
//! A "region hit last" hint was measured here and removed: with random
//! addresses over several regions it mispredicts on hits and writes a shared
//! cache line on misses (which bounces between vCPU threads), and the table
//! answers in about the time the hint takes to check. Work is O(1) for
//! layouts whose regions are not wildly uneven, and O(log n) at worst (a
//! binary search inside a crowded bucket).

/// Buckets per region, at least: enough that a bucket rarely spans two
/// region boundaries.
const BUCKETS_PER_REGION: usize = 8;

#[derive(Debug)]
pub(super) struct RegionIndex {
    /// `(start, end)` of each region, sorted, non-overlapping.
    bounds: Box<[(u64, u64)]>,
    /// Start of the first region.
    base: u64,
    /// log2 of the bytes one bucket covers.
    shift: u32,
    /// `buckets[b]`: index of the first region whose end is above the start
    /// of bucket `b`; one extra entry at the end holds `bounds.len()`.
    buckets: Box<[u32]>,
}

impl RegionIndex {
    /// Builds the index of sorted, non-overlapping, non-empty regions.
    pub(super) fn new(bounds: Vec<(u64, u64)>) -> Self {
        let n = bounds.len();
        let base = bounds.first().map_or(0, |b| b.0);
        let end = bounds.last().map_or(0, |b| b.1);
        let span = end - base;
        let want = (n * BUCKETS_PER_REGION).next_power_of_two().max(16);
        // Smallest shift with span >> shift <= want buckets.
        let mut shift = 12;
        while shift < 63 && (span >> shift) > want as u64 {
            shift += 1;
        }
        let count = usize::try_from(span >> shift).unwrap_or(usize::MAX) + 1;
        let mut buckets = Vec::with_capacity(count + 1);
        let mut r = 0usize;
        for b in 0..count as u64 {
            let at = base + (b << shift);
            while r < n && bounds[r].1 <= at {
                r += 1;
            }
            buckets.push(u32::try_from(r).unwrap_or(u32::MAX));
        }
        buckets.push(u32::try_from(n).unwrap_or(u32::MAX));
        RegionIndex {
            bounds: bounds.into_boxed_slice(),
            base,
            shift,
            buckets: buckets.into_boxed_slice(),
        }
    }

    /// Index of the region holding `addr`.
    #[inline(always)]
    pub(super) fn find(&self, addr: u64) -> Option<usize> {
        if let [(start, end)] = *self.bounds {
            return (addr.wrapping_sub(start) < end - start).then_some(0);
        }
        self.find_among(addr)
    }

    /// [`RegionIndex::find`] with more than one region.
    #[inline]
    fn find_among(&self, addr: u64) -> Option<usize> {
        let b = crate::addr::usize_from(addr.wrapping_sub(self.base) >> self.shift);
        let lo = *self.buckets.get(b)? as usize;
        let hi = (*self.buckets.get(b + 1)? as usize + 1).min(self.bounds.len());
        let mut i = lo;
        if hi - lo > 4 {
            i = lo + self.bounds[lo..hi].partition_point(|&(_, e)| e <= addr);
        } else {
            while i < hi && self.bounds[i].1 <= addr {
                i += 1;
            }
        }
        match self.bounds.get(i) {
            Some(&(s, e)) if s <= addr && addr < e => Some(i),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(bounds: &[(u64, u64)], addr: u64) -> Option<usize> {
        bounds.iter().position(|&(s, e)| s <= addr && addr < e)
    }

    #[test]
    fn agrees_with_a_linear_scan_on_odd_layouts() {
        let layouts: Vec<Vec<(u64, u64)>> = vec![
            vec![(0, 4096)],
            vec![(0x1000, 0x3000), (0x3000, 0x4000), (0x10000, 0x20000)],
            // Many tiny regions crowded at the bottom, one far away.
            (0..40u64)
                .map(|i| (i * 0x2000, i * 0x2000 + 0x1000))
                .chain([(1 << 40, (1 << 40) + 0x1000)])
                .collect(),
            // One region ending at the top of the address space.
            vec![(0, 0x1000), (u64::MAX - 0xfff - 0x1000, u64::MAX - 0xfff)],
        ];
        for l in layouts {
            let idx = RegionIndex::new(l.clone());
            let mut probes = vec![0, 1, u64::MAX, u64::MAX - 1];
            for &(s, e) in &l {
                probes.extend([
                    s.wrapping_sub(1),
                    s,
                    s + 1,
                    e - 1,
                    e,
                    e.wrapping_add(1),
                    s / 2 + e / 2,
                ]);
            }
            for a in probes {
                assert_eq!(idx.find(a), naive(&l, a), "layout {l:x?} addr {a:#x}");
            }
        }
    }
}
