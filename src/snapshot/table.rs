//! The content table: the BLAKE3 address of each page stored in this file
//! (in content-area order), then the contents an incremental snapshot
//! takes from its ancestors instead of storing them again: each names the
//! ancestor (1 is the parent), the slot in that ancestor's content area,
//! and the address, which must be the ancestor's own for that slot.
//!
//! Content `n` of the map is stored slot `n` while `n` is below the stored
//! count, else ancestor entry `n - stored`.

use super::{
    error::{Part, Problem, SnapshotError},
    format::{Hash, EXTERNAL_LEN, LOCAL_LEN},
};

/// Content an incremental snapshot takes from an ancestor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct External {
    pub(crate) hash: Hash,
    /// 1 is the parent.
    pub(crate) depth: u32,
    /// The slot in the ancestor's content area.
    pub(crate) slot: u64,
}

/// Where a content's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Stored in this file at this slot.
    Local(u64),
    /// Stored in an ancestor.
    Ancestor { depth: u32, slot: u64 },
}

/// A checked content table.
#[derive(Debug, Default)]
pub(crate) struct ContentTable {
    pub(crate) local: Vec<Hash>,
    pub(crate) external: Vec<External>,
}

impl ContentTable {
    /// Decodes the table's bytes (checksum already checked), which start at
    /// file offset `base`: `local` addresses, then `external` entries with
    /// a depth of at least 1 and zero padding.
    pub(crate) fn parse(bytes: &[u8], base: u64, local: u64) -> Result<Self, SnapshotError> {
        let split = usize::try_from(local)
            .ok()
            .and_then(|n| n.checked_mul(LOCAL_LEN))
            .filter(|&n| n <= bytes.len())
            .ok_or(SnapshotError::malformed(
                Part::Table,
                base,
                Problem::Overflow("the stored count"),
            ))?;
        let (l, e) = bytes.split_at(split);
        let local = l
            .chunks_exact(LOCAL_LEN)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        let mut external = Vec::with_capacity(e.len() / EXTERNAL_LEN);
        for (i, c) in e.chunks_exact(EXTERNAL_LEN).enumerate() {
            let at = base + (split + i * EXTERNAL_LEN) as u64;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&c[..32]);
            let mut d = [0u8; 4];
            d.copy_from_slice(&c[32..36]);
            let mut s = [0u8; 8];
            s.copy_from_slice(&c[40..]);
            if let Some(k) = (36..40).find(|&k| c[k] != 0) {
                return Err(SnapshotError::malformed(
                    Part::Table,
                    at + k as u64,
                    Problem::Reserved(c[k]),
                ));
            }
            let depth = u32::from_le_bytes(d);
            if depth == 0 {
                return Err(SnapshotError::malformed(
                    Part::Table,
                    at + 32,
                    Problem::Depth,
                ));
            }
            external.push(External {
                hash,
                depth,
                slot: u64::from_le_bytes(s),
            });
        }
        Ok(ContentTable { local, external })
    }

    /// Encodes the table.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.local.len() * LOCAL_LEN + self.external.len() * EXTERNAL_LEN);
        for h in &self.local {
            out.extend_from_slice(h);
        }
        for e in &self.external {
            out.extend_from_slice(&e.hash);
            out.extend_from_slice(&e.depth.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&e.slot.to_le_bytes());
        }
        out
    }

    /// Where content `n` is (`n` below [`len`](Self::len), as the map was
    /// checked).
    pub(crate) fn slot(&self, n: u64) -> Slot {
        let stored = self.local.len() as u64;
        if n < stored {
            return Slot::Local(n);
        }
        match usize::try_from(n - stored)
            .ok()
            .and_then(|i| self.external.get(i))
        {
            Some(e) => Slot::Ancestor {
                depth: e.depth,
                slot: e.slot,
            },
            // Unreachable for a checked map; no ancestor has depth 0.
            None => Slot::Ancestor { depth: 0, slot: 0 },
        }
    }
}
