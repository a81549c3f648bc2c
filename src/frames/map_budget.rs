//! The process's budget of kernel mappings (VMAs) for remaps of guest pages.
//!
//! `vm.max_map_count` bounds the mappings of a whole process, and a page
//! remapped inside a region's mapping splits it: up to two more mappings per
//! remap. Past the limit every `mmap` fails, a thread's stack included
//! (Rust aborts the process when a thread cannot be spawned), so merges,
//! unmerges and discards spend from one budget that leaves a headroom to the
//! rest of the process. The budget is the kernel's count, read from
//! `/proc/self/maps`, minus what was spent since; it is read again at most
//! every [`MapBudget::REFRESH`], so mappings the rest of the process made or
//! freed are seen. It never decides whether a remap is *safe*, only whether
//! it may still be made; the kernel's `ENOMEM` stays the last word.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use crate::host::proc::{mapping_count, max_map_count};

/// The default `vm.max_map_count`, assumed where the sysctl cannot be read.
const DEFAULT_MAX_MAP_COUNT: u64 = 65530;

/// Mappings left for remaps, shared by every layer that remaps guest pages
/// of one frame store.
#[derive(Debug)]
pub struct MapBudget {
    /// Mappings that may still be created.
    left: AtomicU64,
    /// Mappings kept for the rest of the process.
    headroom: AtomicU64,
    /// Mappings set aside for remaps still to come (`set_aside`), kept out
    /// of `left` across readings of the kernel's count.
    aside: AtomicU64,
    /// When `left` was last read from the kernel.
    refreshed: Mutex<Option<Instant>>,
}

impl Default for MapBudget {
    fn default() -> Self {
        MapBudget {
            left: AtomicU64::new(0),
            headroom: AtomicU64::new(Self::DEFAULT_HEADROOM),
            aside: AtomicU64::new(0),
            refreshed: Mutex::new(None),
        }
    }
}

impl MapBudget {
    /// Mappings left to the rest of the process unless told otherwise.
    pub const DEFAULT_HEADROOM: u64 = 4096;
    /// How old the kernel's count may get before a spend reads it again.
    /// Reading `/proc/self/maps` takes the mmap lock that vCPU faults need,
    /// so it is not read per remap.
    pub const REFRESH: Duration = Duration::from_millis(100);

    /// Sets the mappings kept for the rest of the process and reads the
    /// kernel's count again.
    pub fn set_headroom(&self, headroom: u64) {
        self.headroom.store(headroom, Ordering::Relaxed);
        self.refresh();
    }

    /// Reads the kernel's count of this process's mappings now.
    pub fn refresh(&self) {
        let max = max_map_count().unwrap_or(DEFAULT_MAX_MAP_COUNT);
        // Unreadable: assume the worst (nothing left) rather than the best.
        let now = mapping_count().unwrap_or(max);
        // Under the lock that setting aside takes too, so a reading never
        // sees a reservation half made or half given back (found by review:
        // it overstated the budget by the whole reservation).
        let mut refreshed = self.lock_refreshed();
        let left = max
            .saturating_sub(now)
            .saturating_sub(self.headroom.load(Ordering::Relaxed))
            .saturating_sub(self.aside.load(Ordering::Relaxed));
        self.left.store(left, Ordering::Relaxed);
        *refreshed = Some(Instant::now());
    }

    fn lock_refreshed(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.refreshed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the kernel's count again if the last reading is older than
    /// [`REFRESH`](Self::REFRESH).
    pub fn refresh_if_stale(&self) {
        let stale = self
            .lock_refreshed()
            .is_none_or(|t| t.elapsed() >= Self::REFRESH);
        if stale {
            self.refresh();
        }
    }

    /// Mappings that may still be created.
    pub fn left(&self) -> u64 {
        self.left.load(Ordering::Relaxed)
    }

    /// Takes `n` mappings if that many are left; `false` (nothing taken)
    /// otherwise. A stale reading is refreshed first: the rest of the
    /// process may have made mappings since.
    pub fn try_spend(&self, n: u64) -> bool {
        self.refresh_if_stale();
        self.take(n)
    }

    fn take(&self, n: u64) -> bool {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(n))
            .is_ok()
    }

    /// Takes `n` mappings whether or not they are left (a remap that had to
    /// be made; the count only tracks it).
    pub fn spend(&self, n: u64) {
        let _ = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(l.saturating_sub(n))
            });
    }

    /// Mappings a remap gave back (it joined mappings together).
    pub fn give_back(&self, n: u64) {
        let _ = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(l.saturating_add(n))
            });
    }

    /// Sets up to `n` mappings aside for remaps a caller will make later:
    /// taken from what is left now (no more than is left), and kept out of
    /// it by later readings of the kernel's count until
    /// [`release_aside`](Self::release_aside). Returns how many.
    pub fn set_aside(&self, n: u64) -> u64 {
        let _refreshing = self.lock_refreshed();
        let before = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(l.saturating_sub(n))
            })
            .unwrap_or(0);
        let taken = before.min(n);
        self.aside.fetch_add(taken, Ordering::Relaxed);
        taken
    }

    /// Gives back `n` mappings [`set_aside`](Self::set_aside) took, just
    /// before the remaps they were kept for.
    pub fn release_aside(&self, n: u64) {
        let _refreshing = self.lock_refreshed();
        let _ = self
            .aside
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                Some(a.saturating_sub(n))
            });
        self.give_back(n);
    }

    /// The kernel refused a mapping (`ENOMEM`): nothing is left until the
    /// next reading says otherwise.
    pub fn exhausted(&self) {
        self.left.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spending_stops_at_zero_and_a_refresh_reads_the_kernel() {
        let b = MapBudget::default();
        b.set_headroom(0);
        let kernel = b.left();
        assert!(kernel > 0, "a test process has mappings to spare");
        assert!(b.take(kernel));
        assert!(!b.take(1));
        b.give_back(3);
        assert!(b.take(3));
        b.give_back(2);
        b.spend(5);
        assert_eq!(b.left(), 0);
        b.refresh();
        assert!(b.left() > 0, "the kernel's count is back");
        b.exhausted();
        assert_eq!(b.left(), 0);
        // Set aside survives a reading of the kernel's count.
        b.refresh();
        let before = b.left();
        assert_eq!(b.set_aside(10), 10);
        b.refresh();
        assert!(b.left() + 10 <= before + 2, "{} of {before}", b.left());
        b.release_aside(10);
        b.refresh();
        assert!(b.left() + 2 >= before, "{} of {before}", b.left());
        // No more is set aside than is left, and no more given back.
        b.spend(u64::MAX);
        b.give_back(10);
        assert_eq!(b.set_aside(100), 10);
        b.release_aside(10);
        assert_eq!(b.left(), 10);
        // A headroom past the limit leaves nothing, however fresh.
        b.set_headroom(u64::MAX);
        assert_eq!(b.left(), 0);
        assert!(!b.try_spend(1));
    }
}
