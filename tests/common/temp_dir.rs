//! A directory of a test's own under the system's temporary directory,
//! removed when dropped: the snapshot tests' files live there.
#![allow(dead_code)] // each test binary uses a subset

use std::path::PathBuf;

/// A fresh directory (named by the test's `name`, the process and a
/// counter, so tests running at once never share one), removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// Creates it; a failure is a failed test.
    pub(crate) fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "pagefold-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(e) = std::fs::create_dir_all(&d) {
            panic!("creating {}: {e}", d.display());
        }
        TempDir(d)
    }

    /// The path of file `f` in it.
    pub(crate) fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
