//! Helpers shared by the `memory_*` integration tests: the byte-array model
//! of guest memory and the proptest strategies that drive it.

pub(crate) mod dedup_model;
pub(crate) mod model;
pub(crate) mod strategies;
