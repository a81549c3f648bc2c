//! The page-state table: one atomic word per 4 KiB guest page saying what
//! backs it (a private frame, a shared frame, nothing because it is zero or
//! ballooned), which frame, and transient flags ([`Flags`]), and the
//! protocol's operations on it (hold, let go with a new state, move an unheld
//! page). Every layer that changes how a page is backed (dedup, balloon,
//! migration) goes through those operations; the access path reads a word
//! once per page touched. Crate-private: outside the crate a state is a
//! read-only [`PageState`] snapshot. Must never hand out the raw word or a
//! compare-and-swap on it.
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
const FLAG_MASK: u64 = Flags::ALL.0;
const FRAME_SHIFT: u32 = 12;

/// Anything but a plain private page sends a write to the slow path.
const WRITE_SLOW_MASK: u64 = KIND_MASK | FLAG_MASK;

/// Pages of a region or a [`GuestMemory`](super::GuestMemory) by how they
/// are backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCensus {
    /// Pages with their own frame.
    pub private: u64,
    /// Pages released because they were zero.
    pub zero: u64,
    /// Pages mapped onto a shared frame.
    pub shared: u64,
    /// Pages given up through the balloon.
    pub ballooned: u64,
}

/// The transient flags of a page-state word, as one typed value: the only
/// way code outside this file names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Flags(u64);

impl Flags {
    /// No flag.
    pub(crate) const NONE: Flags = Flags(0);
    /// A layer holds the page while it changes its backing.
    pub(crate) const LOCKED: Flags = Flags(1 << 2);
    /// The page's host mapping is write-protected: a raw write (a vCPU, a
    /// device model's pointer) faults to pagefold's handler before it
    /// lands, and library writes must go through the same resolution.
    pub(crate) const WRITE_PROTECTED: Flags = Flags(1 << 3);
    /// The host page does not map the page's own frame: it is a private
    /// copy-on-write view of a shared frame, or anonymous memory. A write
    /// through it never reaches another page's frame (the kernel copies
    /// first), so it needs no resolution; giving the page back needs the
    /// dedup layer.
    pub(crate) const REMAPPED: Flags = Flags(1 << 4);
    const ALL: Flags = Flags(Self::LOCKED.0 | Self::WRITE_PROTECTED.0 | Self::REMAPPED.0);
}

/// A decoded snapshot of one page-state word. Outside the crate it is a
/// read-only view ([`GuestRegion::page_state`](super::GuestRegion::page_state));
/// inside it, states are built here and change only through
/// the page-state table's operations.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageState(u64);

impl PageState {
    /// A state from its parts.
    #[inline]
    pub(crate) const fn new(kind: PageKind, frame: FrameNumber, flags: Flags) -> Self {
        PageState((frame.0 << FRAME_SHIFT) | (flags.0 & FLAG_MASK) | kind as u64)
    }

    /// The raw word.
    #[inline]
    const fn bits(self) -> u64 {
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

    /// The flags.
    #[inline]
    pub(crate) const fn flags(self) -> Flags {
        Flags(self.0 & FLAG_MASK)
    }

    /// Whether a layer holds the page while it changes its backing.
    #[inline]
    pub const fn is_locked(self) -> bool {
        self.0 & Flags::LOCKED.0 != 0
    }

    /// Whether the page's host mapping is write-protected.
    #[inline]
    pub const fn is_write_protected(self) -> bool {
        self.0 & Flags::WRITE_PROTECTED.0 != 0
    }

    /// Whether the host page maps something other than the page's own frame
    /// (a shared frame, anonymous memory).
    #[inline]
    pub const fn is_remapped(self) -> bool {
        self.0 & Flags::REMAPPED.0 != 0
    }

    /// Whether the page is remapped and no layer holds it: what an unmerge
    /// or a discard may take.
    #[inline]
    pub(crate) const fn is_remapped_unlocked(self) -> bool {
        self.0 & (Flags::REMAPPED.0 | Flags::LOCKED.0) == Flags::REMAPPED.0
    }

    /// Whether the page carries no flag at all (not held, not protected, on
    /// its own frame).
    #[inline]
    pub(crate) const fn is_unflagged(self) -> bool {
        self.0 & FLAG_MASK == 0
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
        self.0 & (NO_MEMORY_BIT | Flags::WRITE_PROTECTED.0)
            == NO_MEMORY_BIT | Flags::WRITE_PROTECTED.0
    }

    /// Whether a read must come from the page's frame in the store rather
    /// than through the mapping: the page has no memory by its state, its
    /// raw writes are not trapped (a vCPU may have written it since, and
    /// the frame then holds those bytes) and the host page maps its own
    /// frame. A file read of a hole gives zeros and leaves it a hole; a
    /// read through the mapping would make the kernel allocate it.
    #[inline]
    pub const fn reads_from_frame(self) -> bool {
        self.0 & (NO_MEMORY_BIT | Flags::WRITE_PROTECTED.0 | Flags::REMAPPED.0) == NO_MEMORY_BIT
    }

    /// Whether the page is released (zero or ballooned) with raw writes not
    /// trapped: its bytes are not given by the state alone, a vCPU may have
    /// written it since (memory's `ReleasedData` asks the kernel).
    #[inline]
    pub const fn is_released_untrapped(self) -> bool {
        self.has_no_memory() && !self.reads_zero()
    }

    /// Whether a write may land without any state change.
    #[inline]
    pub const fn is_plain_writable(self) -> bool {
        self.0 & WRITE_SLOW_MASK == 0
    }

    /// The same state with another kind.
    #[inline]
    pub(crate) const fn with_kind(self, kind: PageKind) -> Self {
        PageState((self.0 & !KIND_MASK) | kind as u64)
    }

    /// The same state with `flags` set.
    #[inline]
    pub(crate) const fn with_flags(self, flags: Flags) -> Self {
        PageState(self.0 | (flags.0 & FLAG_MASK))
    }

    /// The same state with `flags` cleared.
    #[inline]
    pub(crate) const fn without_flags(self, flags: Flags) -> Self {
        PageState(self.0 & !(flags.0 & FLAG_MASK))
    }

    /// The same state, held.
    #[inline]
    pub(crate) const fn locked(self) -> Self {
        self.with_flags(Flags::LOCKED)
    }
}

impl std::fmt::Debug for PageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageState")
            .field("kind", &self.kind())
            .field("frame", &self.frame().0)
            .field("locked", &self.is_locked())
            .field("write_protected", &self.is_write_protected())
            .field("remapped", &self.is_remapped())
            .finish()
    }
}

/// One atomic state word per page of a region, and the protocol's
/// operations on it. Every change is a compare-and-swap from a state the
/// caller saw; the operations name the protocol's steps (hold a page, let
/// it go with a new state, move an unheld page), so no caller writes a
/// flag test or a raw exchange.
#[derive(Debug)]
// `pub` for the loom door (`crate::__loom`) only; crate-private otherwise.
#[cfg_attr(not(loom), allow(unreachable_pub))]
pub struct PageStateTable {
    words: Box<[AtomicU64]>,
}

#[cfg_attr(not(loom), allow(unreachable_pub))]
impl PageStateTable {
    /// A table of `pages` private pages mapping `first_frame`, `first_frame +
    /// 1`, ...; `None` if the table's memory cannot be had (a layout of tens
    /// of TiB).
    pub fn new_private(first_frame: FrameNumber, pages: usize) -> Option<Self> {
        let mut words = Vec::new();
        words.try_reserve_exact(pages).ok()?;
        words.extend((0..pages as u64).map(|i| {
            AtomicU64::new(
                PageState::new(
                    PageKind::Private,
                    FrameNumber(first_frame.0 + i),
                    Flags::NONE,
                )
                .bits(),
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

    /// Current state of page `index` (acquire: the backing it describes is
    /// visible). Panics if `index` is out of range: callers index with page
    /// numbers derived from a bounds-checked address.
    #[inline]
    pub fn load(&self, index: usize) -> PageState {
        PageState(self.words[index].load(Ordering::Acquire))
    }

    /// The one compare-and-swap: `index` from `current` to `new`; on failure
    /// what it was.
    #[inline]
    fn exchange(
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

    /// Holds page `index`, which the caller saw unheld in state `seen`: from
    /// here only the holder changes its word, and writers wait. Fails with
    /// the state now if it moved.
    #[inline]
    pub(crate) fn try_lock(&self, index: usize, seen: PageState) -> Result<(), PageState> {
        self.try_lock_as(index, seen, seen)
    }

    /// [`PageStateTable::try_lock`] that also changes the held state to `to`
    /// (e.g. marks the page released while it is punched).
    #[inline]
    pub(crate) fn try_lock_as(
        &self,
        index: usize,
        seen: PageState,
        to: PageState,
    ) -> Result<(), PageState> {
        self.exchange(index, seen, to.locked()).map(drop)
    }

    /// Lets go of page `index`, held from state `held` (its state before
    /// the hold), publishing `to`. Only the holder calls it, so it fails
    /// only if the caller did not hold the page.
    #[inline]
    pub(crate) fn unlock_to(
        &self,
        index: usize,
        held: PageState,
        to: PageState,
    ) -> Result<(), PageState> {
        self.exchange(index, held.locked(), to).map(drop)
    }

    /// Changes held page `index` (held from state `held`) to `to`, still
    /// held: the holder marks what it did before a last step (a punch) and
    /// lets go after it ([`PageStateTable::unlock_as_is`]).
    #[inline]
    pub(crate) fn relock_as(
        &self,
        index: usize,
        held: PageState,
        to: PageState,
    ) -> Result<(), PageState> {
        self.exchange(index, held.locked(), to.locked()).map(drop)
    }

    /// Lets go of page `index` unchanged (held from state `held`).
    #[inline]
    pub(crate) fn unlock(&self, index: usize, held: PageState) {
        let _ = self.unlock_to(index, held, held);
    }

    /// Lets go of page `index` as it stands (the holder marked it while it
    /// held it, so it does not know the held state by heart).
    #[inline]
    pub(crate) fn unlock_as_is(&self, index: usize) {
        let s = self.load(index);
        let _ = self.exchange(index, s, s.without_flags(Flags::LOCKED));
    }

    /// Moves unheld page `index` from `seen` to `to` in one step (a write
    /// taking a released page back, a reconciled kernel copy). Fails with
    /// the state now if it moved.
    #[inline]
    pub(crate) fn transition(
        &self,
        index: usize,
        seen: PageState,
        to: PageState,
    ) -> Result<(), PageState> {
        debug_assert!(!seen.is_locked(), "a held page changes through unlock_to");
        self.exchange(index, seen, to).map(drop)
    }

    /// Counts pages per kind.
    pub(crate) fn census(&self) -> PageCensus {
        let mut out = [0u64; 4];
        for w in self.words.iter() {
            out[(w.load(Ordering::Relaxed) & KIND_MASK) as usize] += 1;
        }
        let [private, zero, shared, ballooned] = out;
        PageCensus {
            private,
            zero,
            shared,
            ballooned,
        }
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
            let s = PageState::new(kind, FrameNumber((1 << 40) - 1), Flags::LOCKED);
            assert_eq!(s.kind(), kind);
            assert_eq!(s.frame(), FrameNumber((1 << 40) - 1));
            assert_eq!(s.flags(), Flags::LOCKED);
            let no_memory = matches!(kind, PageKind::Zero | PageKind::Ballooned);
            assert_eq!(s.has_no_memory(), no_memory);
            assert!(
                !s.reads_zero(),
                "unprotected pages are always read from memory"
            );
            assert_eq!(s.with_flags(Flags::WRITE_PROTECTED).reads_zero(), no_memory);
            assert_eq!(s.reads_from_frame(), no_memory, "locked or not");
            assert!(!s.with_flags(Flags::WRITE_PROTECTED).reads_from_frame());
            assert!(!s.with_flags(Flags::REMAPPED).reads_from_frame());
            assert!(!s.is_plain_writable());
        }
        let p = PageState::new(PageKind::Private, FrameNumber(7), Flags::NONE);
        assert!(p.is_plain_writable());
        assert!(!p.with_flags(Flags::WRITE_PROTECTED).is_plain_writable());
        assert_eq!(p.with_flags(Flags::LOCKED).without_flags(Flags::LOCKED), p);
    }

    #[test]
    fn cas_reports_the_current_value_on_failure() {
        let t = PageStateTable::new_private(FrameNumber(10), 4).unwrap();
        let s = t.load(2);
        assert_eq!(s.frame(), FrameNumber(12));
        let z = s.with_kind(PageKind::Zero);
        assert_eq!(t.transition(2, s, z), Ok(()));
        assert_eq!(t.transition(2, s, z), Err(z));
        assert_eq!(
            t.census(),
            PageCensus {
                private: 3,
                zero: 1,
                ..PageCensus::default()
            }
        );
    }
}
