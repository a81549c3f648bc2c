//! XBZRLE-style page deltas: what changed in a page since the version the
//! receiver holds, as runs of unchanged and changed bytes (the scheme of
//! QEMU's `xbzrle.c`; this is our own codec, not wire-compatible with it).
//!
//! Encoding: a sequence of `(unchanged: uleb128, changed: uleb128,
//! changed bytes)` triples walking the page from offset 0. A trailing
//! unchanged run is not written, so an empty delta means "no change".
//! Unchanged runs shorter than three bytes are folded into the
//! changed run around them: two length bytes would cost more than they save.
//!
//! The decoder is strict (lengths of at most two bytes, changed runs of at
//! least one byte, nothing past the page) and validates a whole delta before
//! a caller applies it, so a malformed delta never half-applies.

use crate::addr::PAGE_SIZE;

/// Unchanged runs shorter than this are sent as changed bytes.
const MIN_ZRUN: usize = 3;

/// Why a delta cannot be decoded; `at` is the byte offset in the delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A run length is cut off, longer than two bytes, or over a page.
    #[error("bad run length at delta byte {at}")]
    BadLength {
        /// Offset of the length in the delta.
        at: usize,
    },
    /// The delta ends inside a triple (after an unchanged run, or inside
    /// the changed bytes).
    #[error("delta ends inside a run at byte {at}")]
    Truncated {
        /// Offset where more bytes were needed.
        at: usize,
    },
    /// A changed run of length zero (never written by the encoder).
    #[error("empty changed run at delta byte {at}")]
    EmptyRun {
        /// Offset of the length in the delta.
        at: usize,
    },
    /// The runs reach past the end of the page.
    #[error("runs pass the end of the page at delta byte {at}")]
    PastPage {
        /// Offset of the run that does.
        at: usize,
    },
}

/// Appends the delta from `old` to `new` to `out` if it takes at most
/// `limit` bytes and returns its length; otherwise leaves `out` as it was
/// and returns `None` (send the page whole).
pub fn encode(
    old: &[u8; PAGE_SIZE],
    new: &[u8; PAGE_SIZE],
    out: &mut Vec<u8>,
    limit: usize,
) -> Option<usize> {
    let base = out.len();
    let mut i = 0;
    while i < PAGE_SIZE {
        let z = equal_run(old, new, i);
        i += z;
        if i == PAGE_SIZE {
            break;
        }
        let end = changed_end(old, new, i);
        let n = end - i;
        let cost = uleb_len(z) + uleb_len(n) + n;
        if out.len() - base + cost > limit {
            out.truncate(base);
            return None;
        }
        push_uleb(out, z);
        push_uleb(out, n);
        out.extend_from_slice(&new[i..end]);
        i = end;
    }
    Some(out.len() - base)
}

/// Checks that `delta` is a well-formed delta of one page.
pub fn validate(delta: &[u8]) -> Result<(), DeltaError> {
    walk(delta, |_, _| {})
}

/// Applies `delta` to `page` in place. The delta is validated first: on
/// error the page is unchanged.
pub fn apply(delta: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), DeltaError> {
    validate(delta)?;
    walk(delta, |pos, bytes| {
        page[pos..pos + bytes.len()].copy_from_slice(bytes)
    })
}

/// Walks the triples of `delta`, calling `f(page offset, changed bytes)`
/// for each; every run is checked to lie inside the page before `f` sees it.
fn walk(delta: &[u8], mut f: impl FnMut(usize, &[u8])) -> Result<(), DeltaError> {
    let mut at = 0;
    let mut pos = 0usize;
    while at < delta.len() {
        let (z, next) = read_uleb(delta, at)?;
        at = next;
        if at == delta.len() {
            return Err(DeltaError::Truncated { at });
        }
        let len_at = at;
        let (n, next) = read_uleb(delta, at)?;
        at = next;
        if n == 0 {
            return Err(DeltaError::EmptyRun { at: len_at });
        }
        // z, n <= PAGE_SIZE (checked by read_uleb), so no overflow.
        if pos + z + n > PAGE_SIZE {
            return Err(DeltaError::PastPage { at: len_at });
        }
        let bytes = delta
            .get(at..at + n)
            .ok_or(DeltaError::Truncated { at: delta.len() })?;
        f(pos + z, bytes);
        pos += z + n;
        at += n;
    }
    Ok(())
}

/// Length of the run of equal bytes starting at `i`.
fn equal_run(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE], i: usize) -> usize {
    let mut k = i;
    // Eight bytes at a time while whole words match.
    while k + 8 <= PAGE_SIZE && old[k..k + 8] == new[k..k + 8] {
        k += 8;
    }
    while k < PAGE_SIZE && old[k] == new[k] {
        k += 1;
    }
    k - i
}

/// End of the changed run starting at `i` (where `old[i] != new[i]`): the
/// start of the next run of at least `MIN_ZRUN` equal bytes, or the page end
/// less any shorter equal tail.
fn changed_end(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE], i: usize) -> usize {
    let mut eq = 0;
    for j in i..PAGE_SIZE {
        if old[j] == new[j] {
            eq += 1;
            if eq == MIN_ZRUN {
                return j + 1 - MIN_ZRUN;
            }
        } else {
            eq = 0;
        }
    }
    PAGE_SIZE - eq
}

fn uleb_len(x: usize) -> usize {
    if x < 0x80 {
        1
    } else {
        2
    }
}

/// Writes `x` (at most `PAGE_SIZE`) as one or two uleb128 bytes.
#[allow(clippy::cast_possible_truncation)] // masked to 7 bits
fn push_uleb(out: &mut Vec<u8>, x: usize) {
    debug_assert!(x <= PAGE_SIZE);
    if x < 0x80 {
        out.push(x as u8);
    } else {
        out.push((x & 0x7f) as u8 | 0x80);
        out.push((x >> 7) as u8);
    }
}

/// Reads a uleb128 of at most two bytes and at most `PAGE_SIZE`.
fn read_uleb(delta: &[u8], at: usize) -> Result<(usize, usize), DeltaError> {
    let bad = DeltaError::BadLength { at };
    let b0 = *delta.get(at).ok_or(bad)?;
    if b0 & 0x80 == 0 {
        return Ok((usize::from(b0), at + 1));
    }
    let b1 = *delta.get(at + 1).ok_or(bad)?;
    if b1 & 0x80 != 0 {
        return Err(bad);
    }
    let x = usize::from(b0 & 0x7f) | usize::from(b1) << 7;
    if x > PAGE_SIZE {
        return Err(bad);
    }
    Ok((x, at + 2))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn page(mut f: impl FnMut(usize) -> u8) -> Box<[u8; PAGE_SIZE]> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = f(i);
        }
        p
    }

    fn round_trip(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE], limit: usize) -> Option<usize> {
        let mut out = vec![0xee];
        let n = encode(old, new, &mut out, limit);
        match n {
            Some(n) => {
                assert_eq!(out.len(), n + 1);
                let mut p = Box::new(*old);
                apply(&out[1..], &mut p).expect("own encoding decodes");
                assert_eq!(&p[..], &new[..]);
            }
            None => assert_eq!(out, vec![0xee], "failed encode leaves out unchanged"),
        }
        n
    }

    #[test]
    fn unchanged_page_is_empty_delta() {
        let p = page(|i| (i * 7) as u8);
        assert_eq!(round_trip(&p, &p, PAGE_SIZE), Some(0));
    }

    #[test]
    fn one_byte_changes() {
        let old = page(|i| (i * 13) as u8);
        for at in [0, 1, 127, 128, 2047, 4094, 4095] {
            let mut new = Box::new(*old);
            new[at] ^= 0x5a;
            let n = round_trip(&old, &new, PAGE_SIZE).expect("fits");
            assert!(n <= 4, "one changed byte at {at} took {n} bytes");
        }
    }

    #[test]
    fn short_equal_gaps_fold_into_changed_run() {
        let old = page(|_| 0);
        // Changed, equal, changed, equal, equal, changed: one run of 6.
        let mut new = Box::new(*old);
        for at in [10, 12, 15] {
            new[at] = 1;
        }
        let mut out = Vec::new();
        assert_eq!(encode(&old, &new, &mut out, PAGE_SIZE), Some(2 + 6));
        assert_eq!(&out[..2], &[10, 6]);
    }

    #[test]
    fn worst_cases_fall_back() {
        let old = page(|_| 0);
        // Every byte changed: the delta is bigger than the page.
        let all = page(|_| 1);
        assert_eq!(round_trip(&old, &all, PAGE_SIZE - 1), None);
        // Every other byte changed: gaps of one fold, still one full run.
        let alt = page(|i| (i % 2) as u8);
        assert_eq!(round_trip(&old, &alt, PAGE_SIZE - 1), None);
        // One changed byte in every four: the costliest pattern that still
        // splits into runs (3 bytes per 4), smaller than a page.
        let quarter = page(|i| u8::from(i % 4 == 0));
        let n = round_trip(&old, &quarter, PAGE_SIZE).expect("fits a page");
        assert!(n <= PAGE_SIZE * 3 / 4 + 2, "{n}");
        // ...but not a tight limit.
        assert_eq!(round_trip(&old, &quarter, 1024), None);
    }

    #[test]
    fn long_runs_use_two_byte_lengths() {
        let old = page(|_| 0);
        let new = page(|i| u8::from((200..3000).contains(&i)));
        let mut out = Vec::new();
        let n = encode(&old, &new, &mut out, PAGE_SIZE).expect("fits");
        assert_eq!(n, 2 + 2 + 2800);
        round_trip(&old, &new, PAGE_SIZE);
    }

    #[test]
    fn decoder_rejects_malformed() {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        let cases: &[(&[u8], DeltaError)] = &[
            (&[0], DeltaError::Truncated { at: 1 }),
            (&[0, 0], DeltaError::EmptyRun { at: 1 }),
            (&[0, 2, 1], DeltaError::Truncated { at: 3 }),
            (&[0x80], DeltaError::BadLength { at: 0 }),
            (&[0x80, 0x80, 0x01], DeltaError::BadLength { at: 0 }),
            // 4097 unchanged bytes.
            (&[0x81, 0x20, 1, 0], DeltaError::BadLength { at: 0 }),
            // 4095 unchanged, 2 changed.
            (&[0xff, 0x1f, 2, 1, 1], DeltaError::PastPage { at: 2 }),
            (&[0, 1, 9, 0x80], DeltaError::BadLength { at: 3 }),
        ];
        for (delta, want) in cases {
            assert_eq!(apply(delta, &mut p), Err(*want), "{delta:?}");
            assert!(p.iter().all(|&b| b == 0), "{delta:?} half-applied");
        }
        // A valid prefix followed by a bad triple writes nothing.
        assert_eq!(
            apply(&[0, 1, 9, 0, 0], &mut p),
            Err(DeltaError::EmptyRun { at: 4 })
        );
        assert!(p.iter().all(|&b| b == 0));
        // The exact end of the page is fine.
        apply(&[0xff, 0x1f, 1, 7], &mut p).expect("last byte");
        assert_eq!(p[PAGE_SIZE - 1], 7);
    }

    #[test]
    fn random_pages_round_trip() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        for _ in 0..2000 {
            let old = page(|_| rng.gen());
            let mut new = Box::new(*old);
            let edits = rng.gen_range(0..64);
            for _ in 0..edits {
                let at = rng.gen_range(0..PAGE_SIZE);
                let len = rng.gen_range(1..64).min(PAGE_SIZE - at);
                for b in &mut new[at..at + len] {
                    *b = rng.gen();
                }
            }
            round_trip(&old, &new, PAGE_SIZE);
            round_trip(&old, &new, rng.gen_range(0..PAGE_SIZE));
        }
    }
}
