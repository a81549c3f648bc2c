//! What the library asks the host kernel about its own process, in one
//! place: the page map (`/proc/self/pagemap`: present, swapped, file-backed,
//! PFN), residency (`mincore`), where a file holds data (`lseek` with
//! `SEEK_DATA`), and the process's mappings and their limit (`/proc/self/maps`,
//! `vm.max_map_count`, `/proc/self/smaps_rollup`).
//!
//! The bottom layer: it imports nothing from the crate but `addr`, and knows
//! nothing of guest pages or their states; callers turn guest pages into
//! host addresses and file offsets. Must never change anything the library
//! or a guest can see: every function here only asks (the zero-page probe
//! maps and unmaps one private page of its own).

pub(crate) mod pagemap;
pub(crate) mod proc;
pub(crate) mod residency;
