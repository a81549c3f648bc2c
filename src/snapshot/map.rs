//! The page map: for every page of the layout, in address order, where its
//! bytes are: zero (nothing stored), as in the parent snapshot, or a
//! content of the table. Stored as runs, so a zero or unchanged stretch
//! costs one run, and so do pages whose contents were stored in page order
//! (a sequence of content indexes) or that all hold one content.
//!
//! Lookups binary-search the runs: the map in memory is the size of the
//! map in the file, never of the layout a header claims.

use super::{
    error::{Part, Problem, SnapshotError},
    format::RUN_LEN,
};

/// Where a page's bytes are, by the map of one snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSource {
    /// All zeros: nothing stored.
    Zero,
    /// As in the parent snapshot (incremental snapshots only).
    Parent,
    /// Content number `n` of the snapshot's table.
    Content(u64),
}

mod kind {
    pub(super) const ZERO: u8 = 0;
    pub(super) const PARENT: u8 = 1;
    /// Page `k` of the run holds content `value + k`.
    pub(super) const SEQUENCE: u8 = 2;
    /// Every page of the run holds content `value`.
    pub(super) const REPEAT: u8 = 3;
}

/// One run: `pages` pages of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    pages: u32,
    kind: u8,
    value: u64,
}

impl Run {
    fn source(&self, k: u64) -> PageSource {
        match self.kind {
            kind::ZERO => PageSource::Zero,
            kind::PARENT => PageSource::Parent,
            kind::SEQUENCE => PageSource::Content(self.value + k),
            _ => PageSource::Content(self.value),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.extend_from_slice(&[self.kind, 0, 0, 0]);
        out.extend_from_slice(&self.value.to_le_bytes());
    }
}

/// A checked page map.
#[derive(Debug)]
pub(crate) struct PageMap {
    runs: Vec<Run>,
    /// First page of each run.
    starts: Vec<u64>,
}

impl PageMap {
    /// Decodes and checks the map's bytes, which start at file offset
    /// `base`: known kinds, zero padding, no value on zero and parent runs,
    /// parent runs only in an incremental snapshot, content indexes below
    /// `contents`, and exactly `total_pages` pages.
    pub(crate) fn parse(
        bytes: &[u8],
        base: u64,
        incremental: bool,
        contents: u64,
        total_pages: u64,
    ) -> Result<Self, SnapshotError> {
        let mut runs = Vec::with_capacity(bytes.len() / RUN_LEN);
        let mut starts = Vec::with_capacity(bytes.len() / RUN_LEN);
        let mut next = 0u64;
        for (i, r) in bytes.chunks_exact(RUN_LEN).enumerate() {
            let at = base + (i * RUN_LEN) as u64;
            let bad = |off: u64, problem| SnapshotError::malformed(Part::Map, at + off, problem);
            let mut p = [0u8; 4];
            p.copy_from_slice(&r[..4]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&r[8..]);
            let run = Run {
                pages: u32::from_le_bytes(p),
                kind: r[4],
                value: u64::from_le_bytes(v),
            };
            if let Some(k) = (5..8).find(|&k| r[k] != 0) {
                return Err(bad(k as u64, Problem::Reserved(r[k])));
            }
            if run.pages == 0 {
                return Err(bad(0, Problem::EmptyRun));
            }
            let pages = u64::from(run.pages);
            match run.kind {
                kind::ZERO | kind::PARENT if run.value != 0 => {
                    return Err(bad(8, Problem::RunValue(run.value)))
                }
                kind::PARENT if !incremental => return Err(bad(4, Problem::ParentInFull)),
                kind::ZERO | kind::PARENT => {}
                kind::SEQUENCE | kind::REPEAT => {
                    let span = if run.kind == kind::SEQUENCE { pages } else { 1 };
                    if run.value.checked_add(span).is_none_or(|end| end > contents) {
                        return Err(bad(
                            8,
                            Problem::ContentIndex {
                                index: run.value,
                                pages,
                                count: contents,
                            },
                        ));
                    }
                }
                k => return Err(bad(4, Problem::RunKind(k))),
            }
            starts.push(next);
            runs.push(run);
            next = next.saturating_add(pages);
        }
        if next != total_pages {
            return Err(SnapshotError::malformed(
                Part::Map,
                base,
                Problem::MapPages {
                    runs: next,
                    layout: total_pages,
                },
            ));
        }
        Ok(PageMap { runs, starts })
    }

    /// Where each of pages `first..first + n` is, in order, told to `f`:
    /// one binary search, then the runs walked (a lookup per page costs a
    /// search of every run per page).
    pub(crate) fn sources(&self, first: u64, n: u64, mut f: impl FnMut(u64, PageSource)) {
        let mut i = self
            .starts
            .partition_point(|&s| s <= first)
            .saturating_sub(1);
        let mut page = first;
        let end = first.saturating_add(n);
        while page < end {
            let (Some(run), Some(&start)) = (self.runs.get(i), self.starts.get(i)) else {
                // Past the map (never for pages below its total): zeros.
                f(page, PageSource::Zero);
                page += 1;
                continue;
            };
            let run_end = start + u64::from(run.pages);
            if page >= run_end {
                i += 1;
                continue;
            }
            f(page, run.source(page - start));
            page += 1;
        }
    }

    /// Where page `page` (an index into the layout's pages, below the
    /// total the map was checked against) is.
    pub(crate) fn source(&self, page: u64) -> PageSource {
        let i = self
            .starts
            .partition_point(|&s| s <= page)
            .saturating_sub(1);
        match (self.runs.get(i), self.starts.get(i)) {
            (Some(run), Some(&start)) => run.source(page - start),
            // Unreachable for a page below the total: the map covers it.
            _ => PageSource::Zero,
        }
    }
}

/// Builds a map page by page, joining runs.
#[derive(Debug, Default)]
pub(crate) struct MapBuilder {
    runs: Vec<Run>,
    cur: Option<Run>,
}

impl MapBuilder {
    /// Appends `pages` pages of `source`; a content source means the same
    /// content for each.
    pub(crate) fn push(&mut self, source: PageSource, mut pages: u64) {
        while pages > 0 {
            let joined = match (&mut self.cur, source) {
                (Some(r), PageSource::Zero) if r.kind == kind::ZERO => Some(r),
                (Some(r), PageSource::Parent) if r.kind == kind::PARENT => Some(r),
                (Some(r), PageSource::Content(c)) if r.kind == kind::REPEAT && r.value == c => {
                    Some(r)
                }
                (Some(r), PageSource::Content(c))
                    if pages == 1
                        && r.kind == kind::SEQUENCE
                        && r.value.checked_add(u64::from(r.pages)) == Some(c) =>
                {
                    Some(r)
                }
                (Some(r), PageSource::Content(c))
                    if r.kind == kind::SEQUENCE && r.pages == 1 && r.value == c =>
                {
                    r.kind = kind::REPEAT;
                    Some(r)
                }
                _ => None,
            };
            let take = match joined {
                Some(r) if r.pages < u32::MAX => {
                    let n = pages.min(u64::from(u32::MAX - r.pages));
                    #[allow(clippy::cast_possible_truncation)] // <= u32::MAX - pages
                    {
                        r.pages += n as u32;
                    }
                    n
                }
                _ => {
                    self.flush();
                    let (kind, value) = match source {
                        PageSource::Zero => (kind::ZERO, 0),
                        PageSource::Parent => (kind::PARENT, 0),
                        PageSource::Content(c) if pages == 1 => (kind::SEQUENCE, c),
                        PageSource::Content(c) => (kind::REPEAT, c),
                    };
                    let n = pages.min(u64::from(u32::MAX));
                    #[allow(clippy::cast_possible_truncation)] // <= u32::MAX
                    let run_pages = n as u32;
                    self.cur = Some(Run {
                        pages: run_pages,
                        kind,
                        value,
                    });
                    n
                }
            };
            pages -= take;
        }
    }

    fn flush(&mut self) {
        if let Some(r) = self.cur.take() {
            self.runs.push(r);
        }
    }

    /// The encoded runs and their number, each content number `n` written
    /// as `renumber(n)` (which keeps consecutive numbers consecutive).
    pub(crate) fn finish(mut self, renumber: impl Fn(u64) -> u64) -> (Vec<u8>, u64) {
        self.flush();
        let mut out = Vec::with_capacity(self.runs.len() * RUN_LEN);
        for mut r in self.runs.iter().copied() {
            if matches!(r.kind, kind::SEQUENCE | kind::REPEAT) {
                r.value = renumber(r.value);
            }
            r.encode(&mut out);
        }
        (out, self.runs.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_joins_runs_and_map_reads_them_back() {
        let pages: Vec<PageSource> = [
            PageSource::Zero,
            PageSource::Zero,
            PageSource::Content(0),
            PageSource::Content(1),
            PageSource::Content(2),
            PageSource::Content(2),
            PageSource::Content(2),
            PageSource::Parent,
            PageSource::Content(1),
            PageSource::Content(1),
            PageSource::Content(3),
            PageSource::Zero,
        ]
        .to_vec();
        let mut b = MapBuilder::default();
        for &p in &pages {
            b.push(p, 1);
        }
        b.push(PageSource::Zero, 5);
        let (bytes, runs) = b.finish(|n| n);
        assert_eq!(runs, 7);
        let map = PageMap::parse(&bytes, 0, true, 4, pages.len() as u64 + 5)
            .unwrap_or_else(|e| panic!("{e}"));
        for (i, &p) in pages.iter().enumerate() {
            assert_eq!(map.source(i as u64), p, "page {i}");
        }
        assert_eq!(map.source(pages.len() as u64 + 4), PageSource::Zero);
        // Walking the runs says what a lookup per page says, from any
        // page and for any length, past the end too.
        let total = pages.len() as u64 + 5;
        for first in 0..total {
            for n in 0..=total + 2 - first {
                let mut seen = Vec::new();
                map.sources(first, n, |p, s| seen.push((p, s)));
                let want: Vec<(u64, PageSource)> =
                    (first..first + n).map(|p| (p, map.source(p))).collect();
                assert_eq!(seen, want, "from {first}, {n} pages");
            }
        }
        assert!(PageMap::parse(&bytes, 0, false, 4, 17).is_err());
        assert!(PageMap::parse(&bytes, 0, true, 3, 17).is_err());
        assert!(PageMap::parse(&bytes, 0, true, 4, 18).is_err());
    }

    #[test]
    fn long_runs_split_at_u32_max() {
        let mut b = MapBuilder::default();
        b.push(PageSource::Zero, u64::from(u32::MAX) + 3);
        let (bytes, runs) = b.finish(|n| n);
        assert_eq!(runs, 2);
        let map = PageMap::parse(&bytes, 0, false, 0, u64::from(u32::MAX) + 3)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(map.runs[0].pages, u32::MAX);
        assert_eq!(map.runs[1].pages, 3);
        assert_eq!(map.source(u64::from(u32::MAX) + 2), PageSource::Zero);
    }
}
