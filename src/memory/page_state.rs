//! The page-state table: one atomic word per 4 KiB guest page saying what
//! backs it (a private frame, a shared frame, nothing because it is zero or
//! ballooned), which frame, and transient flags. Every layer that changes how
//! a page is backed (dedup, balloon, migration) does so by compare-and-swap on
//! this word; the access path reads it once per page touched.
//!
//! Layout of a word (bit 0 first):
//!
//! | bits   | meaning                                                   |
//! |--------|-----------------------------------------------------------|
//! | 0..2   | [`PageKind`]; bit 0 set means "no memory behind the page" |
//! | 2      | `LOCKED`: a layer is changing the page; writers wait      |
//! | 3      | `WRITE_PROTECTED`: writes must be resolved first          |
//! | 4      | `REMAPPED`: the host page maps something other than the    |
//! |        | page's own frame (a shared frame, anonymous memory)        |
//! | 5..12  | reserved, zero                                            |
//! | 12..64 | frame number in the frame store                           |

use crate::{
    addr::FrameNumber,
    sync::{AtomicU64, Ordering},
};

/// What backs a guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageKind {
    /// The page's own frame, writable.
    Private = 0,
    /// Released because it was all zeros: reads give zeros without touching
    /// host memory, the first write allocates again.
    Zero = 1,
    /// Mapped read-only onto a frame shared with other pages.
    Shared = 2,
    /// Given up by the guest's balloon; reads give zeros, a write deflates.
    Ballooned = 3,
}

const KIND_MASK: u64 = 0b11;
const NO_MEMORY_BIT: u64 = 0b01;
/// A layer holds the page while it changes its backing.
pub const LOCKED: u64 = 1 << 2;
/// The page's host mapping is write-protected: a raw write (a vCPU, a device
/// model's pointer) faults to pagefold's handler before it lands, and library
/// writes must go through the same resolution.
pub const WRITE_PROTECTED: u64 = 1 << 3;
/// The host page does not map the page's own frame: it is a private
/// copy-on-write view of a shared frame, or anonymous memory. A write through
/// it never reaches another page's frame (the kernel copies first), so it
/// needs no resolution; giving the page back needs the dedup layer.
pub const REMAPPED: u64 = 1 << 4;
const FLAG_MASK: u64 = LOCKED | WRITE_PROTECTED | REMAPPED;
const FRAME_SHIFT: u32 = 12;

/// Anything but a plain private page sends a write to the slow path.
const WRITE_SLOW_MASK: u64 = KIND_MASK | FLAG_MASK;

/// A decoded snapshot of one page-state word.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageState(u64);

impl PageState {
    /// A state from its parts. `flags` is a mix of [`LOCKED`],
    /// [`WRITE_PROTECTED`] and [`REMAPPED`]; other bits are dropped.
    #[inline]
    pub const fn new(kind: PageKind, frame: FrameNumber, flags: u64) -> Self {
        PageState((frame.0 << FRAME_SHIFT) | (flags & FLAG_MASK) | kind as u64)
    }

    /// The raw word.
    #[inline]
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// What backs the page.
    #[inline]
    pub const fn kind(self) -> PageKind {
        match self.0 & KIND_MASK {
            0 => PageKind::Private,
            1 => PageKind::Zero,
            2 => PageKind::Shared,
            _ => PageKind::Ballooned,
        }
    }

    /// The frame the page maps (for zero/ballooned pages: the frame it will
    /// get back on the next write).
    #[inline]
    pub const fn frame(self) -> FrameNumber {
        FrameNumber(self.0 >> FRAME_SHIFT)
    }

    /// The flag bits.
    #[inline]
    pub const fn flags(self) -> u64 {
        self.0 & FLAG_MASK
    }

    /// Whether no host memory stands behind the page (zero or ballooned).
    #[inline]
    pub const fn has_no_memory(self) -> bool {
        self.0 & NO_MEMORY_BIT != 0
    }

    /// Whether a read may answer zeros without touching the mapping: the
    /// page has no memory *and* raw writes are trapped, so nothing can have
    /// written it behind the state's back. (Reading a released shmem page
    /// through the mapping would allocate it again.)
    #[inline]
    pub const fn reads_zero(self) -> bool {
        self.0 & (NO_MEMORY_BIT | WRITE_PROTECTED) == NO_MEMORY_BIT | WRITE_PROTECTED
    }

    /// Whether a read must come from the page's frame in the store rather
    /// than through the mapping: the page has no memory by its state, its
    /// raw writes are not trapped (a vCPU may have written it since, and
    /// the frame then holds those bytes) and the host page maps its own
    /// frame. A file read of a hole gives zeros and leaves it a hole; a
    /// read through the mapping would make the kernel allocate it.
    #[inline]
    pub const fn reads_from_frame(self) -> bool {
        self.0 & (NO_MEMORY_BIT | WRITE_PROTECTED | REMAPPED) == NO_MEMORY_BIT
    }

    /// Whether a write may land without any state change.
    #[inline]
    pub const fn is_plain_writable(self) -> bool {
        self.0 & WRITE_SLOW_MASK == 0
    }

    /// The same state with another kind.
    #[inline]
    pub const fn with_kind(self, kind: PageKind) -> Self {
        PageState((self.0 & !KIND_MASK) | kind as u64)
    }

    /// The same state with `flags` set.
    #[inline]
    pub const fn with_flags(self, flags: u64) -> Self {
        PageState(self.0 | (flags & FLAG_MASK))
    }

    /// The same state with `flags` cleared.
    #[inline]
    pub const fn without_flags(self, flags: u64) -> Self {
        PageState(self.0 & !(flags & FLAG_MASK))
    }
}

impl std::fmt::Debug for PageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageState")
            .field("kind", &self.kind())
            .field("frame", &self.frame().0)
            .field("locked", &(self.0 & LOCKED != 0))
            .field("write_protected", &(self.0 & WRITE_PROTECTED != 0))
            .field("remapped", &(self.0 & REMAPPED != 0))
            .finish()
    }
}

/// One atomic state word per page of a region.
#[derive(Debug)]
pub struct PageStateTable {
    words: Box<[AtomicU64]>,
}

impl PageStateTable {
    /// A table of `pages` private pages mapping `first_frame`, `first_frame +
    /// 1`, ...; `None` if the table's memory cannot be had (a layout of tens
    /// of TiB).
    pub fn new_private(first_frame: FrameNumber, pages: usize) -> Option<Self> {
        let mut words = Vec::new();
        words.try_reserve_exact(pages).ok()?;
        words.extend((0..pages as u64).map(|i| {
            AtomicU64::new(
                PageState::new(PageKind::Private, FrameNumber(first_frame.0 + i), 0).bits(),
            )
        }));
        Some(PageStateTable {
            words: words.into_boxed_slice(),
        })
    }

    /// Pages in the table.
    #[inline]
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the table is empty (never, for a live region).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Current state of page `index` (acquire: the backing it describes is
    /// visible). Panics if `index` is out of range: callers index with page
    /// numbers derived from a bounds-checked address.
    #[inline]
    pub fn load(&self, index: usize) -> PageState {
        PageState(self.words[index].load(Ordering::Acquire))
    }

    /// Moves page `index` from `current` to `new` if it is still `current`;
    /// on failure returns what it was.
    #[inline]
    pub fn compare_exchange(
        &self,
        index: usize,
        current: PageState,
        new: PageState,
    ) -> Result<PageState, PageState> {
        self.words[index]
            .compare_exchange(current.0, new.0, Ordering::AcqRel, Ordering::Acquire)
            .map(PageState)
            .map_err(PageState)
    }

    /// Counts pages per kind: `[private, zero, shared, ballooned]`.
    pub fn census(&self) -> [u64; 4] {
        let mut out = [0u64; 4];
        for w in self.words.iter() {
            out[(w.load(Ordering::Relaxed) & KIND_MASK) as usize] += 1;
        }
        out
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn word_round_trips_every_field() {
        for kind in [
            PageKind::Private,
            PageKind::Zero,
            PageKind::Shared,
            PageKind::Ballooned,
        ] {
            let s = PageState::new(kind, FrameNumber((1 << 40) - 1), LOCKED);
            assert_eq!(s.kind(), kind);
            assert_eq!(s.frame(), FrameNumber((1 << 40) - 1));
            assert_eq!(s.flags(), LOCKED);
            let no_memory = matches!(kind, PageKind::Zero | PageKind::Ballooned);
            assert_eq!(s.has_no_memory(), no_memory);
            assert!(
                !s.reads_zero(),
                "unprotected pages are always read from memory"
            );
            assert_eq!(s.with_flags(WRITE_PROTECTED).reads_zero(), no_memory);
            assert_eq!(s.reads_from_frame(), no_memory, "locked or not");
            assert!(!s.with_flags(WRITE_PROTECTED).reads_from_frame());
            assert!(!s.with_flags(REMAPPED).reads_from_frame());
            assert!(!s.is_plain_writable());
        }
        let p = PageState::new(PageKind::Private, FrameNumber(7), 0);
        assert!(p.is_plain_writable());
        assert!(!p.with_flags(WRITE_PROTECTED).is_plain_writable());
        assert_eq!(p.with_flags(LOCKED).without_flags(LOCKED), p);
    }

    #[test]
    fn cas_reports_the_current_value_on_failure() {
        let t = PageStateTable::new_private(FrameNumber(10), 4).unwrap();
        let s = t.load(2);
        assert_eq!(s.frame(), FrameNumber(12));
        let z = s.with_kind(PageKind::Zero);
        assert_eq!(t.compare_exchange(2, s, z), Ok(s));
        assert_eq!(t.compare_exchange(2, s, z), Err(z));
        assert_eq!(t.census(), [3, 1, 0, 0]);
    }
}
