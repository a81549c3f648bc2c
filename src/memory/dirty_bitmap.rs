//! The two-level atomic dirty bitmap of one region: one bit per 4 KiB page
//! in `AtomicU64` words, and a summary with one bit per word, so a harvest
//! visits only the words that hold a set bit.
//!
//! # Why a write racing a harvest is never lost
//!
//! A writer first stores its bytes, then marks (`mark_*`): for each word it
//! loads the word and, only if the page's bit is clear, sets it with
//! `fetch_or`; then the same for the word's summary bit. A harvester swaps
//! a summary word to 0, then swaps each word its bits name to 0, reports
//! the bits it took, and (if it took any) runs a process-wide memory
//! barrier (`crate::dirty`'s process-wide barrier) before it returns; the caller copies
//! the reported pages after that. All bitmap operations are `SeqCst`.
//!
//! 1. No orphan bits: after a writer's word `fetch_or` (or its load that
//!    found the bit already set) a summary bit for that word is set — by
//!    this writer's own `fetch_or`, or it saw one set, which no harvester
//!    had yet swapped (SC order) — so a later summary swap leads a
//!    harvester to this word, and that harvester's word swap comes after the
//!    writer's mark: the bit is reported by this harvest or the next.
//! 2. The bytes are visible to the copy that follows the report: if the
//!    writer set the bit, its `fetch_or` is ordered after its store of the
//!    bytes (release) and the harvester's swap reads it (acquire). If the
//!    writer skipped the `fetch_or` because the bit was already set (the
//!    cheap path that keeps vCPUs from bouncing the line), the writer did
//!    "store bytes; load word" and the harvester "swap word; copy": the
//!    store-buffer pattern, which needs a full fence on both sides. The
//!    writer has only a compiler fence; the harvester's heavy barrier
//!    (`membarrier`) stands for the writer's half. So either the writer's
//!    load came after the barrier — it then sees the word cleared and sets
//!    the bit, reported next time — or its store was globally visible before
//!    the barrier returned, and the harvester's copy sees it.
//!
//! Clearing is per word, so a bit set after its word was swapped stays for
//! the next harvest; nothing is ever cleared that was not reported.

use std::{
    alloc::{alloc_zeroed, dealloc, Layout},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering::SeqCst},
};

/// A zero-initialised array of atomic words from `alloc_zeroed`: for large
/// sizes the allocator maps fresh memory and the kernel hands out zero pages
/// only as they are touched, so a 16 GiB region's 512 KiB bitmap costs
/// nothing until pages are dirtied.
struct ZeroedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the array is only ever accessed through `&[AtomicU64]`, which is
// `Send + Sync`; `ZeroedWords` owns the allocation exclusively.
unsafe impl Send for ZeroedWords {}
// SAFETY: as above.
unsafe impl Sync for ZeroedWords {}

impl ZeroedWords {
    fn new(len: usize) -> Option<Self> {
        let layout = Layout::array::<AtomicU64>(len.max(1)).ok()?;
        // SAFETY: `layout` has a non-zero size (at least one word).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw.cast::<AtomicU64>())?;
        Some(ZeroedWords { ptr, len })
    }

    #[inline(always)]
    fn words(&self) -> &[AtomicU64] {
        // 1. `ptr` is a live allocation of at least `len` `AtomicU64`s,
        //    aligned for them (`Layout::array`), owned by `self`;
        // 2. all-zero bytes are a valid `AtomicU64`;
        // 3. only shared references are ever made, and atomics allow
        //    concurrent access through them.
        // SAFETY: 1-3 above.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ZeroedWords {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::array::<AtomicU64>(self.len.max(1)) {
            // SAFETY: `ptr` came from `alloc_zeroed` with this same layout
            // (the computation succeeded then, so it succeeds now).
            unsafe { dealloc(self.ptr.as_ptr().cast(), layout) };
        }
    }
}

impl std::fmt::Debug for ZeroedWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} words]", self.len)
    }
}

/// Dirty bits of one region's pages.
#[derive(Debug)]
pub(crate) struct DirtyBitmap {
    /// Bit `p % 64` of word `p / 64` is page `p`.
    words: ZeroedWords,
    /// Bit `w % 64` of summary word `w / 64` says word `w` may be non-zero.
    summary: ZeroedWords,
    pages: usize,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `pages` pages; `None` if it cannot be
    /// allocated.
    pub(crate) fn new(pages: usize) -> Option<Self> {
        let words = pages.div_ceil(64);
        Some(DirtyBitmap {
            words: ZeroedWords::new(words)?,
            summary: ZeroedWords::new(words.div_ceil(64))?,
            pages,
        })
    }

    /// Pages covered.
    pub(crate) fn pages(&self) -> usize {
        self.pages
    }

    /// Marks one page (the caller keeps `page < pages`).
    #[inline(always)]
    pub(crate) fn mark_page(&self, page: usize) {
        let w = page / 64;
        let bit = 1u64 << (page % 64);
        let words = self.words.words();
        let Some(word) = words.get(w) else { return };
        if word.load(SeqCst) & bit == 0 {
            word.fetch_or(bit, SeqCst);
        }
        self.mark_summary(w);
    }

    #[inline(always)]
    fn mark_summary(&self, w: usize) {
        let sbit = 1u64 << (w % 64);
        if let Some(s) = self.summary.words().get(w / 64) {
            if s.load(SeqCst) & sbit == 0 {
                s.fetch_or(sbit, SeqCst);
            }
        }
    }

    /// Marks pages `[first, first + count)`, clipped to the bitmap.
    pub(crate) fn mark_pages(&self, first: usize, count: usize) {
        let end = first.saturating_add(count).min(self.pages);
        if first >= end {
            return;
        }
        let words = self.words.words();
        let (w0, w1) = (first / 64, (end - 1) / 64);
        for (w, word) in words.iter().enumerate().take(w1 + 1).skip(w0) {
            let lo = if w == w0 { first % 64 } else { 0 };
            let hi = if w == w1 { (end - 1) % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if word.load(SeqCst) & mask != mask {
                word.fetch_or(mask, SeqCst);
            }
        }
        for w in w0..=w1 {
            self.mark_summary(w);
        }
    }

    /// ORs `bits` (bit `i` = page `i`) into the bitmap. The caller checked
    /// that no bit lies past the last page.
    pub(crate) fn merge(&self, bits: &[u64]) {
        let words = self.words.words();
        for (w, (&b, word)) in bits.iter().zip(words).enumerate() {
            if b != 0 {
                if word.load(SeqCst) & b != b {
                    word.fetch_or(b, SeqCst);
                }
                self.mark_summary(w);
            }
        }
    }

    /// Takes every set bit, clearing word by word, and calls `run(first
    /// page, count)` for each run of consecutive dirty pages, in order.
    /// Returns the number of pages reported. The caller must run the heavy
    /// barrier before it uses the pages if this returns non-zero (see the
    /// module comment); `crate::dirty`'s harvest does.
    pub(crate) fn take(&self, mut run: impl FnMut(usize, usize)) -> usize {
        let words = self.words.words();
        let mut pending: Option<(usize, usize)> = None;
        let mut total = 0usize;
        for (si, s) in self.summary.words().iter().enumerate() {
            if s.load(SeqCst) == 0 {
                continue;
            }
            let mut sbits = s.swap(0, SeqCst);
            while sbits != 0 {
                let w = si * 64 + sbits.trailing_zeros() as usize;
                sbits &= sbits - 1;
                let Some(word) = words.get(w) else { continue };
                let mut v = word.swap(0, SeqCst);
                total += v.count_ones() as usize;
                let base = w * 64;
                while v != 0 {
                    let lo = v.trailing_zeros() as usize;
                    let ones = (v >> lo).trailing_ones() as usize;
                    let end = lo + ones;
                    v = if end >= 64 { 0 } else { v & (u64::MAX << end) };
                    let (start, len) = (base + lo, ones);
                    pending = match pending {
                        Some((ps, pl)) if ps + pl == start => Some((ps, pl + len)),
                        Some((ps, pl)) => {
                            run(ps, pl);
                            Some((start, len))
                        }
                        None => Some((start, len)),
                    };
                }
            }
        }
        if let Some((ps, pl)) = pending {
            run(ps, pl);
        }
        total
    }

    /// Whether page `page` is marked (a snapshot; for tests and queries).
    pub(crate) fn is_marked(&self, page: usize) -> bool {
        self.words
            .words()
            .get(page / 64)
            .is_some_and(|w| w.load(SeqCst) & (1 << (page % 64)) != 0)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn runs(b: &DirtyBitmap) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        b.take(|s, n| v.push((s, n)));
        v
    }

    #[test]
    fn runs_join_across_words_and_clear() {
        let b = DirtyBitmap::new(64 * 130 + 3).expect("alloc");
        b.mark_pages(60, 10);
        b.mark_page(70);
        b.mark_page(64 * 64 + 5);
        b.mark_pages(64 * 130, 100);
        assert_eq!(
            runs(&b),
            vec![(60, 11), (64 * 64 + 5, 1), (64 * 130, 3)],
            "joined, clipped"
        );
        assert!(runs(&b).is_empty());
        b.merge(&[u64::MAX, u64::MAX, 1]);
        assert_eq!(runs(&b), vec![(0, 129)]);
    }
}
