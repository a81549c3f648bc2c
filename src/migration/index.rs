//! The content index both ends of a stream keep in step: which content
//! (by 128-bit keyed hash) the receiver holds, and at which page.
//!
//! The sender sends a reference only for content this index says the
//! receiver holds right now, and both ends update it with the same calls in
//! the same order (one per page record), so a reference always names a page
//! that the receiver has and that was written by this stream. When the last
//! page holding some content is overwritten, the content leaves the index.
//!
//! Memory: one entry per page that holds non-zero content sent by the
//! stream (about 60 bytes each, roughly 1.5% of the guest memory sent).

use std::collections::HashMap;

use crate::addr::GuestFrame;

/// No page: ends a holder list.
const NONE: GuestFrame = GuestFrame(u64::MAX);

/// A page's place in the list of pages holding the same content.
#[derive(Clone, Copy, Debug)]
struct Link {
    hash: u128,
    prev: GuestFrame,
    next: GuestFrame,
}

/// Content hash -> pages holding it, and page -> its content hash.
#[derive(Debug, Default)]
pub(crate) struct ContentIndex {
    /// First page of each content's holder list.
    by_hash: HashMap<u128, GuestFrame>,
    /// Guest frame -> its content and holder-list neighbours.
    by_page: HashMap<GuestFrame, Link>,
}

impl ContentIndex {
    /// A page that holds content `hash`, if any does.
    pub(crate) fn holder(&self, hash: u128) -> Option<GuestFrame> {
        self.by_hash.get(&hash).copied()
    }

    /// The content hash page `pfn` holds, if it holds indexed content.
    pub(crate) fn content_of(&self, pfn: GuestFrame) -> Option<u128> {
        self.by_page.get(&pfn).map(|l| l.hash)
    }

    /// Page `pfn` now holds content `hash` (`None`: zero or unknown).
    pub(crate) fn set(&mut self, pfn: GuestFrame, hash: Option<u128>) {
        if self.content_of(pfn) == hash {
            return;
        }
        self.unlink(pfn);
        if let Some(hash) = hash {
            let next = self.by_hash.insert(hash, pfn).unwrap_or(NONE);
            if next != NONE {
                if let Some(n) = self.by_page.get_mut(&next) {
                    n.prev = pfn;
                }
            }
            self.by_page.insert(
                pfn,
                Link {
                    hash,
                    prev: NONE,
                    next,
                },
            );
        }
    }

    /// Pages `first..first + count` now hold zeros (or nothing known): as
    /// `set(pfn, None)` for each, in time proportional to the smaller of
    /// `count` and the pages indexed, so a record that covers a huge range
    /// of pages the index does not hold costs next to nothing.
    pub(crate) fn clear_range(&mut self, first: GuestFrame, count: u64) {
        let end = first.0.saturating_add(count);
        if count <= self.by_page.len() as u64 {
            for pfn in first.0..end {
                self.unlink(GuestFrame(pfn));
            }
        } else {
            let held: Vec<GuestFrame> = self
                .by_page
                .keys()
                .copied()
                .filter(|pfn| (first.0..end).contains(&pfn.0))
                .collect();
            for pfn in held {
                self.unlink(pfn);
            }
        }
    }

    /// Number of distinct contents indexed.
    pub(crate) fn contents(&self) -> usize {
        self.by_hash.len()
    }

    fn unlink(&mut self, pfn: GuestFrame) {
        let Some(link) = self.by_page.remove(&pfn) else {
            return;
        };
        if link.next != NONE {
            if let Some(n) = self.by_page.get_mut(&link.next) {
                n.prev = link.prev;
            }
        }
        if link.prev != NONE {
            if let Some(p) = self.by_page.get_mut(&link.prev) {
                p.next = link.next;
            }
        } else if link.next != NONE {
            self.by_hash.insert(link.hash, link.next);
        } else {
            self.by_hash.remove(&link.hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: fn(u64) -> GuestFrame = GuestFrame;

    #[test]
    fn clearing_a_range_equals_clearing_each_page() {
        for (first, count) in [(0, 3), (2, 1), (1, 100), (5, 0), (0, u64::MAX)] {
            let mut a = ContentIndex::default();
            let mut b = ContentIndex::default();
            for (pfn, h) in [(1, 7), (2, 7), (3, 8), (9, 7), (4, 9)] {
                a.set(F(pfn), Some(h));
                b.set(F(pfn), Some(h));
            }
            a.clear_range(F(first), count);
            for pfn in first..first.saturating_add(count).min(20) {
                b.set(F(pfn), None);
            }
            for pfn in 0..20 {
                assert_eq!(
                    a.content_of(F(pfn)),
                    b.content_of(F(pfn)),
                    "{first}+{count}: {pfn}"
                );
            }
            for h in [7, 8, 9] {
                assert_eq!(a.holder(h).is_some(), b.holder(h).is_some());
                if let Some(p) = a.holder(h) {
                    assert_eq!(a.content_of(p), Some(h));
                }
            }
            assert_eq!(a.contents(), b.contents());
        }
    }

    #[test]
    fn holders_follow_overwrites() {
        let mut ix = ContentIndex::default();
        ix.set(F(1), Some(7));
        ix.set(F(2), Some(7));
        ix.set(F(3), Some(7));
        ix.set(F(4), Some(8));
        assert_eq!(ix.contents(), 2);
        // Overwrite holders one by one; the content stays while any holds it.
        ix.set(F(3), Some(8));
        assert!(matches!(ix.holder(7), Some(GuestFrame(1 | 2))));
        ix.set(F(1), None);
        assert_eq!(ix.holder(7), Some(F(2)));
        ix.set(F(2), Some(9));
        assert_eq!(ix.holder(7), None);
        assert_eq!(ix.content_of(F(2)), Some(9));
        ix.set(F(4), None);
        ix.set(F(3), None);
        assert_eq!(ix.holder(8), None);
        assert_eq!(ix.contents(), 1);
    }

    #[test]
    fn matches_a_naive_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
        let mut ix = ContentIndex::default();
        let mut model: HashMap<GuestFrame, u128> = HashMap::new();
        for _ in 0..20_000 {
            let pfn = F(rng.gen_range(0..64));
            let h = if rng.gen_bool(0.2) {
                None
            } else {
                Some(rng.gen_range(0..8u128))
            };
            ix.set(pfn, h);
            match h {
                Some(h) => model.insert(pfn, h),
                None => model.remove(&pfn),
            };
            for c in 0..8u128 {
                match ix.holder(c) {
                    Some(p) => assert_eq!(model.get(&p), Some(&c)),
                    None => assert!(!model.values().any(|&v| v == c)),
                }
            }
        }
    }
}
