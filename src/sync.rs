//! The one place atomics come from, so `cfg(loom)` builds swap std's atomics
//! for loom's and the page-state machine can be model-checked unchanged.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
