//! First-fit allocator of frame ranges with coalescing free list. Kept by
//! hand because it is tiny and must answer "is this exact range allocated?"
//! for the store's checks, which general allocators do not.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub(super) struct RangeAllocator {
    /// Free runs below `len`: start -> count, never adjacent (coalesced).
    free: BTreeMap<u64, u64>,
    /// Frames in the file.
    len: u64,
    /// Frames handed out.
    allocated: u64,
}

impl RangeAllocator {
    /// Returns the start of a run of `count` frames and, if the file must
    /// grow, its new length in frames.
    pub(super) fn allocate(&mut self, count: u64) -> (u64, Option<u64>) {
        let hit = self
            .free
            .iter()
            .find(|(_, len)| **len >= count)
            .map(|(s, l)| (*s, *l));
        self.allocated += count;
        if let Some((start, len)) = hit {
            self.free.remove(&start);
            if len > count {
                self.free.insert(start + count, len - count);
            }
            return (start, None);
        }
        // Grow: reuse a free run that touches the end of the file.
        let start = match self.free.last_key_value() {
            Some((&s, &l)) if s + l == self.len => {
                self.free.remove(&s);
                s
            }
            _ => self.len,
        };
        self.len = start + count;
        (start, Some(self.len))
    }

    pub(super) fn free(&mut self, mut start: u64, mut count: u64) {
        self.allocated -= count;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                count += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + count)) {
            self.free.remove(&(start + count));
            count += nl;
        }
        self.free.insert(start, count);
    }

    /// Undoes a failed growth (after freeing what it allocated): the file
    /// is `len` frames again, and no free run reaches past it (a run that
    /// did is cut at `len`), so nothing past the file is handed out.
    pub(super) fn truncate_to(&mut self, len: u64) {
        while let Some((&s, &l)) = self.free.last_key_value() {
            if s + l <= len {
                break;
            }
            self.free.remove(&s);
            if s < len {
                self.free.insert(s, len - s);
                break;
            }
        }
        self.len = len;
    }

    /// Whether `[start, start+count)` is entirely handed out.
    pub(super) fn is_allocated(&self, start: u64, count: u64) -> bool {
        let Some(end) = start.checked_add(count) else {
            return false;
        };
        if end > self.len {
            return false;
        }
        // Any free run overlapping the range makes it not allocated.
        let before = self.free.range(..end).next_back();
        !matches!(before, Some((&s, &l)) if s + l > start)
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    pub(super) fn allocated(&self) -> u64 {
        self.allocated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_neighbours() {
        let mut a = RangeAllocator::default();
        let (x, _) = a.allocate(2);
        let (y, _) = a.allocate(2);
        let (z, _) = a.allocate(2);
        a.free(x, 2);
        a.free(z, 2);
        a.free(y, 2);
        assert_eq!(a.free.len(), 1);
        assert_eq!(a.allocated(), 0);
        assert!(!a.is_allocated(0, 1));
        let (w, grow) = a.allocate(6);
        assert_eq!((w, grow), (0, None));
        assert!(a.is_allocated(0, 6));
        assert!(!a.is_allocated(0, 7));
    }
}
