//! The mini VMM on KVM over pagefold: its guest ([`guest`]: memory layout,
//! page tables, programs) and the VMM that runs and migrates such guests
//! ([`vmm`]), in one process or with one process per VM under the pagefold
//! service ([`processes`]). `examples/mini_vmm` and `pagefold demo` run it; the KVM
//! integration tests and examples drive its guest programs themselves.

pub mod guest;
pub mod processes;
pub mod vmm;
