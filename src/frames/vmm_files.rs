//! The VMM files this process has adopted ([`FrameStore::adopt_file`](super::FrameStore::adopt_file)),
//! by device and inode: one store per file, since each store hands out
//! frames past the file's end on its own and two would hand out the same.

use std::{collections::HashSet, sync::Mutex};

static ADOPTED: Mutex<Option<HashSet<(u64, u64)>>> = Mutex::new(None);

/// A file held by one store; dropping it lets the file be adopted again.
#[derive(Debug)]
pub(super) struct FileClaim {
    key: (u64, u64),
}

impl FileClaim {
    /// Claims the file `(dev, ino)`; `None` if a live store holds it.
    pub(super) fn take(dev: u64, ino: u64) -> Option<FileClaim> {
        let mut set = ADOPTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // `then`, not `then_some`: a claim built eagerly and dropped on
        // refusal would lock this mutex again and remove the holder's key.
        set.get_or_insert_with(HashSet::new)
            .insert((dev, ino))
            .then(|| FileClaim { key: (dev, ino) })
    }
}

impl Drop for FileClaim {
    fn drop(&mut self) {
        let mut set = ADOPTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = set.as_mut() {
            s.remove(&self.key);
        }
    }
}
