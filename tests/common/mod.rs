//! Helpers shared by the integration tests (each test binary uses a
//! subset): the proptest strategies that drive the guest-memory model of
//! `pagefold_models::model`, small VMs for the dedup tests, and x86 page
//! tables built by hand for the paging tests, and the VMM, backend and
//! service processes of the host service's tests, temporary directories for the snapshot tests and the folded-restore fixtures. The reference models that
//! the fuzz targets share live in the `pagefold-models` crate.

// The lints the paging tests that use it allow: a failed unwrap in a helper
// is a failed test; table indexes and entry offsets are small.
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
pub(crate) mod page_tables;
// Each test binary uses a subset; a failed unwrap in a child process is a
// failed test; page counts and addresses are small.
#[allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]
pub(crate) mod processes;
#[allow(dead_code)] // each test binary uses a subset
pub(crate) mod small_vms;
// Each test binary uses a subset; a failed unwrap is a failed test; page
// indexes are small.
#[allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]
pub(crate) mod folded;
// Each test binary uses a subset; a failed unwrap is a failed test.
#[allow(dead_code, clippy::unwrap_used)]
pub(crate) mod lazy;
pub(crate) mod strategies;
pub(crate) mod temp_dir;
