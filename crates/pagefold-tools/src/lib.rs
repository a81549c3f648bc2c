//! What pagefold's command line, examples, benches and KVM integration
//! tests share, in one internal crate (not published): the mini VMM
//! ([`mini_vmm`], KVM guests over pagefold), Linux KSM's settings guard
//! ([`ksm`]) and an in-memory pipe for migration streams ([`pipe`]).

pub mod ksm;
#[cfg(feature = "kvm")]
pub mod mini_vmm;
pub mod pipe;
