//! A snapshot's id: the BLAKE3 hash of its header, page map and content
//! table, which name every stored page by its own BLAKE3 hash, so the id
//! stands for the whole memory image and (through the parent id in the
//! header) for its ancestors.

use std::fmt;

/// A snapshot's id. An incremental snapshot names its parent by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(pub [u8; 32]);

impl SnapshotId {
    /// The all-zero id: "no parent" in a full snapshot's header.
    pub const NONE: SnapshotId = SnapshotId([0; 32]);

    /// Whether this is [`SnapshotId::NONE`].
    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 16 bytes name a snapshot well enough for a person.
        for b in &self.0[..16] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
