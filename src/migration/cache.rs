//! The sender's bounded cache of the last version of each page it sent, the
//! base for deltas (QEMU's XBZRLE cache). Least recently sent pages leave
//! first; a page not in the cache is sent whole.
//!
//! Every copy here equals what the receiver holds for that page: the writer
//! updates or removes a page's entry each time it sends that page.

use std::collections::HashMap;

use crate::addr::{GuestFrame, PAGE_SIZE};

const NONE: usize = usize::MAX;

#[derive(Debug)]
struct Slot {
    pfn: GuestFrame,
    data: Box<[u8; PAGE_SIZE]>,
    /// Towards the most recently used end.
    newer: usize,
    /// Towards the least recently used end.
    older: usize,
}

/// An LRU map from guest frame to a page copy, at most `capacity`
/// pages.
#[derive(Debug)]
pub(crate) struct PageCache {
    capacity: usize,
    map: HashMap<GuestFrame, usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    newest: usize,
    oldest: usize,
}

impl PageCache {
    pub(crate) fn new(capacity: usize) -> Self {
        PageCache {
            capacity,
            map: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            newest: NONE,
            oldest: NONE,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn contains(&self, pfn: GuestFrame) -> bool {
        self.map.contains_key(&pfn)
    }

    /// The cached copy of `pfn` (does not count as a use: the writer
    /// follows every `get` with a `put` or a `remove`).
    pub(crate) fn get(&self, pfn: GuestFrame) -> Option<&[u8; PAGE_SIZE]> {
        self.map.get(&pfn).map(|&s| &*self.slots[s].data)
    }

    /// Stores `data` as the copy of `pfn`, the most recently used; evicts
    /// the least recently used page when full.
    pub(crate) fn put(&mut self, pfn: GuestFrame, data: &[u8; PAGE_SIZE]) {
        if self.capacity == 0 {
            return;
        }
        if let Some(&s) = self.map.get(&pfn) {
            self.slots[s].data.copy_from_slice(data);
            self.detach(s);
            self.attach_newest(s);
            return;
        }
        let s = if self.map.len() >= self.capacity {
            // Reuse the oldest slot.
            let s = self.oldest;
            self.detach(s);
            self.map.remove(&self.slots[s].pfn);
            self.slots[s].pfn = pfn;
            self.slots[s].data.copy_from_slice(data);
            s
        } else if let Some(s) = self.free.pop() {
            self.slots[s].pfn = pfn;
            self.slots[s].data.copy_from_slice(data);
            s
        } else {
            self.slots.push(Slot {
                pfn,
                data: Box::new(*data),
                newer: NONE,
                older: NONE,
            });
            self.slots.len() - 1
        };
        self.map.insert(pfn, s);
        self.attach_newest(s);
    }

    /// Forgets `pfn`.
    pub(crate) fn remove(&mut self, pfn: GuestFrame) {
        if let Some(s) = self.map.remove(&pfn) {
            self.detach(s);
            self.free.push(s);
        }
    }

    fn detach(&mut self, s: usize) {
        let (newer, older) = (self.slots[s].newer, self.slots[s].older);
        if newer == NONE {
            self.newest = older;
        } else {
            self.slots[newer].older = older;
        }
        if older == NONE {
            self.oldest = newer;
        } else {
            self.slots[older].newer = newer;
        }
        self.slots[s].newer = NONE;
        self.slots[s].older = NONE;
    }

    fn attach_newest(&mut self, s: usize) {
        self.slots[s].older = self.newest;
        self.slots[s].newer = NONE;
        if self.newest != NONE {
            self.slots[self.newest].newer = s;
        } else {
            self.oldest = s;
        }
        self.newest = s;
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn page(b: u8) -> [u8; PAGE_SIZE] {
        [b; PAGE_SIZE]
    }

    #[test]
    fn evicts_least_recently_sent() {
        let mut c = PageCache::new(3);
        c.put(GuestFrame(1), &page(1));
        c.put(GuestFrame(2), &page(2));
        c.put(GuestFrame(3), &page(3));
        c.put(GuestFrame(1), &page(11)); // 1 is newest again
        c.put(GuestFrame(4), &page(4)); // evicts 2
        assert!(!c.contains(GuestFrame(2)));
        assert_eq!(c.get(GuestFrame(1)).map(|p| p[0]), Some(11));
        assert_eq!(c.len(), 3);
        c.remove(GuestFrame(3));
        c.put(GuestFrame(5), &page(5)); // free slot, no eviction
        assert!(
            c.contains(GuestFrame(1)) && c.contains(GuestFrame(4)) && c.contains(GuestFrame(5))
        );
        c.put(GuestFrame(6), &page(6)); // evicts 1 (oldest now)
        assert!(!c.contains(GuestFrame(1)));
        assert_eq!(c.get(GuestFrame(6)).map(|p| p[0]), Some(6));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut c = PageCache::new(0);
        c.put(GuestFrame(1), &page(1));
        assert_eq!(c.len(), 0);
        assert!(c.get(GuestFrame(1)).is_none());
    }

    #[test]
    fn matches_a_naive_lru() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut c = PageCache::new(8);
        let mut model: Vec<(GuestFrame, u8)> = Vec::new(); // oldest first
        for i in 0..20_000u32 {
            let pfn = GuestFrame(rng.gen_range(0..20));
            let b = (i % 251) as u8;
            if rng.gen_bool(0.2) {
                c.remove(pfn);
                model.retain(|&(p, _)| p != pfn);
            } else {
                c.put(pfn, &page(b));
                model.retain(|&(p, _)| p != pfn);
                if model.len() == 8 {
                    model.remove(0);
                }
                model.push((pfn, b));
            }
            assert_eq!(c.len(), model.len());
            for &(p, b) in &model {
                assert_eq!(c.get(p).map(|d| d[0]), Some(b));
            }
        }
    }
}
