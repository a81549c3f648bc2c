//! Which merges the mapping budget buys, when it cannot buy them all.
//!
//! Every remapped run of pages costs the process up to two kernel mappings,
//! and the process has a fixed number of them (`vm.max_map_count`). Merging
//! in page order spends the budget on whatever comes first: the canonical
//! pages of new shared frames are remapped long before their duplicates in
//! later VMs, so a budget that runs out midway leaves frames that one page
//! maps, which save nothing (found from outside: four clones with a break
//! every 20 pages gave the whole budget to VM 0, 213 MiB saved of 2.9 GiB).
//!
//! So a pass whose runs cost more than the budget plans first. Runs that
//! map one of this pass's new shared frames, and the frames of one
//! template, are tied together into a *unit* (union-find over the new
//! frames): a unit is merged whole or not at all, since a new frame saves
//! only once at least two pages map it. A run onto an older shared frame,
//! or of zero pages, is a unit of its own. Units are taken by pages saved
//! per mapping spent (clones' long runs first), as long as they fit.

use super::merge::{Candidate, Target};
use crate::{addr::FrameNumber, frames::FrameRange};

/// Mappings one remapped run may add (its mapping splits the one it lands
/// in): the planning estimate.
const MAPPINGS_PER_RUN: u64 = 2;

/// One unit's worth, gathered from its runs.
#[derive(Clone, Copy, Debug, Default)]
struct Worth {
    pages: u64,
    runs: u64,
    new_frames: u64,
}

impl Worth {
    /// Pages of memory the unit gives back: each page merged, less each new
    /// frame it fills.
    fn saving(&self) -> u64 {
        self.pages.saturating_sub(self.new_frames)
    }

    fn cost(&self) -> u64 {
        self.runs * MAPPINGS_PER_RUN
    }
}

/// Union-find over this pass's new shared frames (by offset from the
/// first), path-halving, with the root's worth kept beside it.
struct Units {
    parent: Vec<u32>,
}

impl Units {
    fn new(frames: usize) -> Self {
        Units {
            parent: (0..frames)
                .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
                .collect(),
        }
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] as usize != x {
            let grand = self.parent[self.parent[x] as usize];
            self.parent[x] = grand;
            x = grand as usize;
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            // Both fit u32: they index `parent`, built from u32s.
            self.parent[rb] = u32::try_from(ra).unwrap_or(u32::MAX);
        }
    }
}

/// A run of candidates: `list[start..start + len]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub(super) start: usize,
    pub(super) len: usize,
}

/// Which runs of `runs` (over `list`) the budget of `budget` mappings
/// buys, as a flag per run. `fresh` is this pass's new shared frames and
/// `template_lens` the frames each of its groups got, in allocation order
/// (a template's frames are one unit). Returns `None` when everything fits.
pub(super) fn select(
    list: &[Candidate],
    runs: &[Run],
    fresh: Option<FrameRange>,
    template_lens: &[usize],
    budget: u64,
) -> Option<Vec<bool>> {
    let total = runs.len() as u64 * MAPPINGS_PER_RUN;
    if total <= budget {
        return None;
    }
    let fresh_offset = |f: FrameNumber| -> Option<usize> {
        let r = fresh?;
        let k = f.0.checked_sub(r.start.0)?;
        (k < r.count).then(|| usize::try_from(k).ok()).flatten()
    };
    let frames = fresh.map_or(0, |r| usize::try_from(r.count).unwrap_or(0));
    let mut units = Units::new(frames);
    // A template's frames belong together.
    let mut first = 0usize;
    for &n in template_lens {
        for k in 1..n {
            if first + k < frames {
                units.union(first, first + k);
            }
        }
        first += n;
    }
    // A run onto consecutive new frames ties them (clones: one run in
    // every VM over the same frames).
    // A run's first new frame stands for it (a run may begin on an older
    // frame that sits right before the new ones).
    let run_fresh = |r: &Run| {
        list[r.start..r.start + r.len]
            .iter()
            .find_map(|c| match c.target {
                Target::Shared(f) => fresh_offset(f),
                Target::Zero => None,
            })
    };
    for r in runs {
        let Some(k) = run_fresh(r) else {
            continue;
        };
        for c in &list[r.start + 1..r.start + r.len] {
            if let Some(k2) = match c.target {
                Target::Shared(f) => fresh_offset(f),
                Target::Zero => None,
            } {
                units.union(k, k2);
            }
        }
    }
    // Worth per unit: new-frame units by their root (0..frames), others
    // one per run after them.
    let mut worth: Vec<Worth> = vec![Worth::default(); frames + runs.len()];
    for k in 0..frames {
        let root = units.find(k);
        worth[root].new_frames += 1;
    }
    let unit_of: Vec<usize> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| match run_fresh(r) {
            Some(k) => units.find(k),
            None => frames + i,
        })
        .collect();
    for (r, &u) in runs.iter().zip(&unit_of) {
        worth[u].pages += r.len as u64;
        worth[u].runs += 1;
    }
    let taken = take_best(&worth, budget);
    Some(unit_of.iter().map(|&u| taken[u]).collect())
}

/// Which units `budget` mappings buy: best pages saved per mapping first;
/// ties: the larger saving.
fn take_best(worth: &[Worth], budget: u64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..worth.len())
        .filter(|&u| worth[u].runs > 0 && worth[u].saving() > 0)
        .collect();
    order.sort_unstable_by(|&a, &b| {
        let (wa, wb) = (worth[a], worth[b]);
        (u128::from(wb.saving()) * u128::from(wa.cost()))
            .cmp(&(u128::from(wa.saving()) * u128::from(wb.cost())))
            .then(wb.saving().cmp(&wa.saving()))
    });
    let mut taken = vec![false; worth.len()];
    let mut left = budget;
    for u in order {
        if let Some(rest) = left.checked_sub(worth[u].cost()) {
            taken[u] = true;
            left = rest;
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Flags, PageKind, PageState};

    fn cand(page: usize, target: Target) -> Candidate {
        Candidate {
            page,
            expected: PageState::new(PageKind::Private, FrameNumber(page as u64), Flags::NONE),
            target,
        }
    }

    fn runs_of(starts: &[(usize, usize)]) -> Vec<Run> {
        starts
            .iter()
            .map(|&(start, len)| Run { start, len })
            .collect()
    }

    /// Two clones of three runs each (frames 100..130, one new frame per
    /// page); a budget for two runs buys one whole unit (both VMs' runs of
    /// one span), never a canonical run alone.
    #[test]
    fn a_short_budget_buys_whole_units_best_first() {
        let fresh = FrameRange {
            start: FrameNumber(100),
            count: 30,
        };
        // VM 0: pages 0..10, 20..30, 40..50 onto frames 100.., 110.., 120..
        // (lengths 10, 10, 10); VM 1 the same frames. As one list: VM 0's
        // runs, then VM 1's.
        let mut list = Vec::new();
        for _vm in 0..2 {
            for (k, base) in [(0usize, 100u64), (20, 110), (40, 120)] {
                for i in 0..10 {
                    list.push(cand(k + i, Target::Shared(FrameNumber(base + i as u64))));
                }
            }
        }
        let runs = runs_of(&[(0, 10), (10, 10), (20, 10), (30, 10), (40, 10), (50, 10)]);
        let lens = vec![1; 30];
        assert!(select(&list, &runs, Some(fresh), &lens, 12).is_none());
        let keep = select(&list, &runs, Some(fresh), &lens, 4).unwrap();
        assert_eq!(keep.iter().filter(|k| **k).count(), 2);
        // Whatever unit was taken, both VMs' runs of it were.
        for i in 0..3 {
            assert_eq!(keep[i], keep[i + 3], "run {i} and its clone");
        }
        // A budget below one unit buys nothing of new frames.
        let keep = select(&list, &runs, Some(fresh), &lens, 3).unwrap();
        assert!(keep.iter().all(|k| !k));
    }

    /// Zero runs and runs onto older frames are units of their own, taken
    /// by pages per mapping: the long zero run before the short one.
    #[test]
    fn standalone_runs_are_ordered_by_pages_per_mapping() {
        let mut list = Vec::new();
        for i in 0..3 {
            list.push(cand(i, Target::Zero));
        }
        for i in 10..60 {
            list.push(cand(i, Target::Zero));
        }
        list.push(cand(70, Target::Shared(FrameNumber(5))));
        let runs = runs_of(&[(0, 3), (3, 50), (53, 1)]);
        let keep = select(&list, &runs, None, &[], 2).unwrap();
        assert_eq!(keep, vec![false, true, false]);
        let keep = select(&list, &runs, None, &[], 4).unwrap();
        assert_eq!(keep, vec![true, true, false]);
    }

    /// A template's frames are one unit: its runs go together.
    #[test]
    fn a_templates_runs_are_one_unit() {
        let fresh = FrameRange {
            start: FrameNumber(0),
            count: 8,
        };
        let mut list = Vec::new();
        // Two runs of 8 pages over template frames 0..8, and an isolated
        // page pair on no template is absent: just the two runs.
        for i in 0..8 {
            list.push(cand(i, Target::Shared(FrameNumber(i as u64))));
        }
        for i in 100..108 {
            list.push(cand(i, Target::Shared(FrameNumber(i as u64 - 100))));
        }
        list.push(cand(200, Target::Zero));
        let runs = runs_of(&[(0, 8), (8, 8), (16, 1)]);
        let keep = select(&list, &runs, Some(fresh), &[8], 2).unwrap();
        // 16 pages on 8 frames save 8 for 4 mappings (2 per mapping); the
        // zero page saves 1 for 2: with 2 mappings only the zero page fits.
        assert_eq!(keep, vec![false, false, true]);
        let keep = select(&list, &runs, Some(fresh), &[8], 4).unwrap();
        assert_eq!(keep, vec![true, true, false]);
    }
}
