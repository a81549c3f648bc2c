//! pagefold's benchmarks, one module per area. Every group measures pagefold
//! beside its peer on identical input, as functions `pagefold` and the peer's
//! crate name, so `benches/*_ratios.sh` can print the ratios of one run.

use criterion::criterion_main;

mod dirty;
mod memory;
mod paging;
mod rust_vmm;

/// The groups `criterion_main!` runs; the macro's `pub fn`s take no doc
/// comment, hence the `allow`.
#[allow(missing_docs)]
mod groups {
    use criterion::criterion_group;

    use super::{dirty, memory, paging, rust_vmm};

    criterion_group! {
        name = memory_benches;
        config = memory::config();
        targets = memory::benches
    }

    criterion_group! {
        name = rust_vmm_benches;
        config = memory::config();
        targets = rust_vmm::benches
    }

    criterion_group! {
        name = dirty_benches;
        config = dirty::config();
        targets = dirty::benches
    }

    criterion_group! {
        name = paging_benches;
        config = paging::config();
        targets = paging::benches
    }

    criterion_group! {
        name = paging_arch_benches;
        config = paging::config();
        targets = paging::arch::benches
    }
}

criterion_main!(
    groups::memory_benches,
    groups::rust_vmm_benches,
    groups::dirty_benches,
    groups::paging_benches,
    groups::paging_arch_benches
);
