//! The `Format` trait: everything the walk engine needs to know about one
//! paging format (entry width, index bits per level, what an entry means,
//! how permissions combine and are checked, how hardware sets the accessed
//! and dirty flags). x86, EPT, AArch64's two stages and RISC-V's two
//! stages implement it; the engine is the same for all.

use super::{
    fault::FaultReason,
    types::{Access, Permissions},
};

/// What one entry means at its level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Not present: the walk stops with a not-present fault.
    NotPresent,
    /// Present, with bits set that must be zero.
    Reserved(u64),
    /// A combination the hardware refuses (EPT misconfiguration).
    Misconfigured,
    /// Points at the next level's table, at this physical address.
    Table(u64),
    /// Maps a page of `1 << shift` bytes at physical `base`.
    Leaf {
        /// Output address of the page (aligned to its size).
        base: u64,
        /// log2 of the page size.
        shift: u8,
    },
}

/// Why a permission check refused an access, and at which level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Denied {
    pub(crate) level: u8,
    pub(crate) reason: FaultReason,
}

/// A paging format. Levels count from 1 (the last-level table) up to
/// `top_level()` (the root). Accumulated permissions are a format-defined
/// bit set in a `u64`, so walk caches can store them without knowing the
/// format.
pub(crate) trait Format {
    /// The root table's level.
    fn top_level(&self) -> u8;
    /// The root table's physical address.
    fn root(&self) -> u64;
    /// `true` for 8-byte entries, `false` for 4-byte ones.
    fn wide(&self) -> bool;
    /// Checks the input address before any table is read (canonical form,
    /// width).
    fn check_input(&self, va: u64) -> Result<(), FaultReason>;
    /// The lowest address bit that indexes the level-`level` table: the
    /// table used at level `l` is decided by the bits from
    /// `index_shift(l + 1)` up.
    fn index_shift(&self, level: u8) -> u32;
    /// Entries in a level-`level` table.
    fn entries(&self, level: u8) -> u64;
    /// The physical address of the entry for `va` in the level-`level`
    /// table at `table`.
    fn entry_addr(&self, table: u64, level: u8, va: u64) -> u64;
    /// What `raw` means at `level`.
    fn decode(&self, level: u8, raw: u64) -> Decoded;
    /// Accumulated permissions before the root.
    fn acc_start(&self) -> u64;
    /// Folds the entry `raw` at `level` into `acc`.
    fn accumulate(&self, acc: u64, level: u8, raw: u64) -> u64;
    /// As [`Format::accumulate`], for a walk that will not fault: the
    /// allowed bits only, without the bookkeeping a fault report needs (the
    /// first level that denied each right, the leaf's level).
    #[inline(always)]
    fn accumulate_fast(&self, acc: u64, level: u8, raw: u64) -> u64 {
        self.accumulate(acc, level, raw)
    }
    /// Checks `access` against the accumulated permissions and the leaf
    /// entry. `user_linear` says whether the first-level page is a user page
    /// (used by EPT's mode-based execute control; ignored otherwise).
    fn check(&self, acc: u64, leaf: u64, access: Access, user_linear: bool) -> Result<(), Denied>;
    /// The entry as hardware leaves it after using it: accessed set, and
    /// dirty too for a write through a leaf. Equal to `raw` when the format
    /// has no such flags at this level (or they are disabled).
    fn with_accessed(&self, level: u8, raw: u64, leaf: bool, write: bool) -> u64;
    /// The permissions a translation grants, for reporting.
    fn permissions(&self, acc: u64, leaf: u64) -> Permissions;
}

/// A mask of bits `lo..=hi` (empty when `lo > hi`).
#[inline]
pub(crate) const fn bits(lo: u32, hi: u32) -> u64 {
    if lo > hi || lo > 63 {
        0
    } else {
        let top = if hi >= 63 {
            u64::MAX
        } else {
            (1u64 << (hi + 1)) - 1
        };
        top & !((1u64 << lo) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::bits;

    #[test]
    fn bit_masks() {
        assert_eq!(bits(0, 0), 1);
        assert_eq!(bits(12, 51), 0x000f_ffff_ffff_f000);
        assert_eq!(bits(52, 63), 0xfff0_0000_0000_0000);
        assert_eq!(bits(40, 39), 0);
        assert_eq!(bits(0, 63), u64::MAX);
    }
}
