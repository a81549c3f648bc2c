//! The stats queue: [`BalloonStats`], the guest's memory statistics as
//! virtio-balloon sends them (`le16 tag, le64 value` entries), parsed from
//! untrusted bytes into typed fields. Parsing only; the balloon records
//! the last set it was given.

use super::error::BalloonError;

/// The guest's memory statistics from the stats queue (virtio tags
/// 0..=10). A tag the guest did not send is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Tag 0: bytes swapped in.
    pub swap_in: Option<u64>,
    /// Tag 1: bytes swapped out.
    pub swap_out: Option<u64>,
    /// Tag 2: major page faults.
    pub major_faults: Option<u64>,
    /// Tag 3: minor page faults.
    pub minor_faults: Option<u64>,
    /// Tag 4: free memory in bytes.
    pub free_memory: Option<u64>,
    /// Tag 5: total memory in bytes.
    pub total_memory: Option<u64>,
    /// Tag 6: available memory in bytes.
    pub available_memory: Option<u64>,
    /// Tag 7: disk caches in bytes.
    pub disk_caches: Option<u64>,
    /// Tag 8: successful hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Tag 9: failed hugetlb page allocations.
    pub hugetlb_failures: Option<u64>,
    /// Tag 10: OOM kills.
    pub oom_kills: Option<u64>,
    /// Entries with a tag pagefold does not know (ignored).
    pub unknown_tags: u32,
}

/// Size of one stats entry: `le16 tag, le64 val`, packed.
pub const STAT_ENTRY_SIZE: usize = 10;

impl BalloonStats {
    /// Parses the stats queue's buffer. Unknown tags are counted and
    /// ignored; a later entry with the same tag wins.
    pub fn parse(bytes: &[u8]) -> Result<Self, BalloonError> {
        if bytes.len() % STAT_ENTRY_SIZE != 0 {
            return Err(BalloonError::Truncated {
                len: bytes.len(),
                entry: STAT_ENTRY_SIZE,
            });
        }
        let mut s = BalloonStats::default();
        for e in bytes.chunks_exact(STAT_ENTRY_SIZE) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            let val = Some(u64::from_le_bytes(v));
            match tag {
                0 => s.swap_in = val,
                1 => s.swap_out = val,
                2 => s.major_faults = val,
                3 => s.minor_faults = val,
                4 => s.free_memory = val,
                5 => s.total_memory = val,
                6 => s.available_memory = val,
                7 => s.disk_caches = val,
                8 => s.hugetlb_allocations = val,
                9 => s.hugetlb_failures = val,
                10 => s.oom_kills = val,
                _ => s.unknown_tags = s.unknown_tags.saturating_add(1),
            }
        }
        Ok(s)
    }
}
