//! The page-state steps of merge, unmerge and reconciliation: which state a
//! page must be in to enter each protocol, holding it, and publishing what
//! it became. Functions over the page-state table alone (its atomics come
//! from `crate::sync`), so `tests/loom_page_state.rs` model-checks exactly
//! these against a model of the kernel side; the syscalls between the steps
//! (protect, compare, remap, punch) stay in `merge.rs` and `reconcile.rs`.
//! Must never make a syscall or touch guest memory.
//!
//! `pub` items so the loom door (`crate::__loom`) can re-export them; the
//! module is crate-private otherwise.

use crate::{
    addr::FrameNumber,
    memory::{page_state::PageStateTable, Flags, PageKind, PageState},
};

/// What a merged page becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A copy-on-write view of this shared frame.
    Shared(FrameNumber),
    /// Anonymous zeros.
    Zero,
}

/// Whether a page in state `s` may be hashed as a merge candidate: private
/// (on its own frame or a kernel copy) and not held by another operation.
#[inline]
pub fn mergeable(s: PageState) -> bool {
    s.kind() == PageKind::Private && !s.is_locked()
}

/// Merge step "lock": holds candidate `page`, hashed in state `expected`.
/// `false` if its state moved since (it is then left alone).
#[inline]
pub fn claim_candidate(states: &PageStateTable, page: usize, expected: PageState) -> bool {
    states.try_lock(page, expected).is_ok()
}

/// Lets go of a held candidate unchanged (a window that failed before its
/// remap).
#[inline]
pub fn release_candidate(states: &PageStateTable, page: usize, expected: PageState) {
    states.unlock(page, expected);
}

/// The state a page merged onto `target` gets (`own` is its own frame).
#[inline]
pub fn merged_state(target: Target, own: FrameNumber) -> PageState {
    match target {
        Target::Zero => PageState::new(PageKind::Zero, own, Flags::REMAPPED),
        Target::Shared(s) => PageState::new(PageKind::Shared, s, Flags::REMAPPED),
    }
}

/// Merge step "publish": lets go of held candidate `page` (hashed in state
/// `expected`) as `merged` where its remap happened, as it was otherwise.
/// `false` if the page was not held from `expected` (nobody else may change
/// a held word, so never in a correct protocol).
#[inline]
pub fn publish_merge(
    states: &PageStateTable,
    page: usize,
    expected: PageState,
    merged: Option<PageState>,
) -> bool {
    states
        .unlock_to(page, expected, merged.unwrap_or(expected))
        .is_ok()
}

/// What [`claim_remapped`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemappedClaim {
    /// Held now; the state it was held from.
    Held(PageState),
    /// Not remapped, or already held by another operation: nothing to take.
    Skip,
    /// It moved between the look and the hold: another operation has it.
    Busy,
}

/// Unmerge step "lock": holds `page` if it is remapped and unheld.
#[inline]
pub fn claim_remapped(states: &PageStateTable, page: usize) -> RemappedClaim {
    let s = states.load(page);
    if !s.is_remapped_unlocked() {
        return RemappedClaim::Skip;
    }
    match states.try_lock(page, s) {
        Ok(()) => RemappedClaim::Held(s),
        Err(_) => RemappedClaim::Busy,
    }
}

/// Lets go of a page [`claim_remapped`] held, unchanged.
#[inline]
pub fn release_remapped(states: &PageStateTable, page: usize, held: PageState) {
    states.unlock(page, held);
}

/// Unmerge step "publish": held `page` (held from `held`) is private on its
/// own frame `own` again. `false` if the page was not held from `held`.
#[inline]
pub fn publish_unmerge(
    states: &PageStateTable,
    page: usize,
    held: PageState,
    own: FrameNumber,
) -> bool {
    states
        .unlock_to(
            page,
            held,
            PageState::new(PageKind::Private, own, Flags::NONE),
        )
        .is_ok()
}

/// Whether reconciliation asks the kernel about a page in state `s`: a
/// merged page (shared or zero, remapped) no operation holds.
#[inline]
pub fn reconcilable(s: PageState) -> bool {
    s.is_remapped_unlocked() && s.kind() != PageKind::Private
}

/// Reconciliation's step: merged `page`, seen in state `seen`, which the
/// kernel copied on a write, becomes private-remapped (its own frame `own`
/// is where it goes back to). `false` if its state moved since.
#[inline]
pub fn mark_copied(
    states: &PageStateTable,
    page: usize,
    seen: PageState,
    own: FrameNumber,
) -> bool {
    states
        .transition(
            page,
            seen,
            PageState::new(PageKind::Private, own, Flags::REMAPPED),
        )
        .is_ok()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Each step run in the order of the race the loom model does not
    /// reach (reconciliation meeting a page an unmerge holds): a held page
    /// is its holder's, so no other step may take or move it, and the
    /// holder's publish succeeds.
    #[test]
    fn a_held_page_is_left_to_its_holder() {
        let t = PageStateTable::new_private(FrameNumber(0), 1).unwrap();
        let s = t.load(0);
        assert!(mergeable(s));
        assert!(claim_candidate(&t, 0, s));
        let held = t.load(0);
        assert!(!mergeable(held), "a held page is no merge candidate");
        assert!(!claim_candidate(&t, 0, s), "held twice");
        assert!(!reconcilable(held));
        let merged = merged_state(Target::Shared(FrameNumber(100)), FrameNumber(0));
        assert!(publish_merge(&t, 0, s, Some(merged)));
        assert_eq!(t.load(0), merged);

        // An unmerge holds the merged page; reconciliation (the kernel
        // copied it meanwhile) must leave it to the unmerge.
        assert!(reconcilable(t.load(0)));
        let RemappedClaim::Held(h) = claim_remapped(&t, 0) else {
            panic!("a merged, unheld page is claimed");
        };
        assert_eq!(h, merged);
        let now = t.load(0);
        assert!(now.is_locked());
        assert!(!reconcilable(now), "reconciliation takes a held page");
        assert!(!mark_copied(&t, 0, h, FrameNumber(0)), "moved a held page");
        assert_eq!(claim_remapped(&t, 0), RemappedClaim::Skip);
        assert!(publish_unmerge(&t, 0, h, FrameNumber(0)));
        assert_eq!(
            t.load(0),
            PageState::new(PageKind::Private, FrameNumber(0), Flags::NONE)
        );
    }

    /// A candidate released unchanged, and a remapped page let go
    /// unchanged, are as they were seen.
    #[test]
    fn release_restores_the_seen_state() {
        let t = PageStateTable::new_private(FrameNumber(0), 1).unwrap();
        let s = t.load(0);
        assert!(claim_candidate(&t, 0, s));
        release_candidate(&t, 0, s);
        assert_eq!(t.load(0), s);
        let merged = merged_state(Target::Zero, FrameNumber(0));
        assert!(claim_candidate(&t, 0, s));
        assert!(publish_merge(&t, 0, s, Some(merged)));
        let RemappedClaim::Held(h) = claim_remapped(&t, 0) else {
            panic!("a merged, unheld page is claimed");
        };
        release_remapped(&t, 0, h);
        assert_eq!(t.load(0), merged);
        assert!(mark_copied(&t, 0, merged, FrameNumber(0)));
        assert_eq!(
            t.load(0),
            PageState::new(PageKind::Private, FrameNumber(0), Flags::REMAPPED)
        );
    }
}
