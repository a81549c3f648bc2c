//! Guest page-table walkers for x86-64, AArch64 and RISC-V guests:
//! guest-virtual to guest-physical (x86 in every paging mode, AArch64
//! stage 1, RISC-V Sv39/48/57), guest-physical to the memory the walker
//! reads (Intel EPT, AMD NPT, AArch64 stage 2, the RISC-V G stage), both
//! together as hardware's two-dimensional walk, and a walk cache
//! (translations and upper-level entries) with explicit invalidation.
//!
//! The walk engine (`engine.rs`) knows nothing about any architecture: a
//! paging format (one implementation of the crate-private `Format` trait)
//! says how wide an entry is, which virtual-address bits index each level,
//! what an entry means (not present, reserved bits set, next table, leaf
//! page) and how permissions combine and are checked. x86 ([`x86`]), EPT
//! ([`ept`]), AArch64 stages 1 and 2 ([`aarch64`]) and RISC-V's two stages
//! ([`riscv`]) are the formats; one [`Walker`] runs any of them
//! ([`GuestPaging`], [`SecondLevel`]).
//!
//! Guest page tables are untrusted input. A walk touches at most one entry
//! per level (five levels at most, each through at most five second-level
//! references), so its work is bounded whatever the tables hold; a table
//! outside guest memory, reserved bits, a misconfigured EPT entry or a
//! non-canonical address is a typed [`WalkFault`], never a panic. Listing
//! every mapping of an address space ([`Walker::mappings`]) is bounded by
//! an entry budget, because tables may point at each other in cycles.
//!
//! Files, each importing only the ones before it: `types` (accesses,
//! permissions, attributes), `fault`, `format`, `memory`, `engine`, `ept`,
//! `lean`, `aarch64` (registers in `aarch64/regs`, stage 2 in
//! `aarch64/stage2`), `riscv` (registers in `riscv/regs`), `x86`
//! (registers in `x86/regs`), `first` (the first level per architecture),
//! `second` (the second level as a walk stage), `walker` (the walk's
//! stages), `watch`, `cache` (storage),
//! `cached` (the cache around the walk), then `mappings`, `range` and
//! `virt`. A walk never calls a cache: a cache runs the walk's stages with
//! its own start and second-level memo, and fills itself from what they
//! hand back.
//!
//! ```
//! use pagefold::{GuestMemory, GuestPhysAddr, GuestVirtAddr};
//! use pagefold::paging::{Access, Walker, X86Paging};
//!
//! // A 4-level table set mapping the 4 KiB page at 0x40_0000 to 0x5000.
//! let mem = GuestMemory::new(&[(GuestPhysAddr(0), 1 << 20)])?;
//! let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
//! mem.write_obj(GuestPhysAddr(pml4), pdpt | 0x3)?; // present, writable
//! mem.write_obj(GuestPhysAddr(pdpt), pd | 0x3)?;
//! mem.write_obj(GuestPhysAddr(pd + 2 * 8), pt | 0x3)?; // PD index 2 = 4 MiB
//! mem.write_obj(GuestPhysAddr(pt), 0x5000u64 | 0x3)?;
//!
//! let walker = Walker::new(X86Paging::long_mode(pml4))?;
//! let t = walker.translate(&mem, GuestVirtAddr(0x40_0123), Access::read())?;
//! assert_eq!(t.gpa, GuestPhysAddr(0x5123));
//! assert_eq!(t.memory_refs, 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod aarch64;
pub mod cache;
mod cached;
mod engine;
pub mod ept;
mod fault;
mod first;
mod format;
mod lean;
mod mappings;
mod memory;
mod range;
pub mod riscv;
mod second;
mod types;
mod virt;
mod walker;
mod watch;
pub mod x86;

pub use aarch64::{
    esr_el2, hpfar_el2, Aarch64Attributes, Aarch64Fault, Aarch64FaultKind, Aarch64Paging,
    Aarch64PagingError, Aarch64Stage2, Aarch64Stage2Attributes, Aarch64Stage2Fault,
    Aarch64Stage2Translation, Aarch64Stage2Walker, Aarch64Translation, Aarch64Walker, Granule,
    Stage2Access, Ttbr, Vtcr,
};
pub use cache::{CacheStats, WalkCache};
pub use cached::BoundCache;
pub use ept::{EptConfig, NptConfig};
pub use fault::{FaultCode, FaultReason, Stage, WalkFault};
pub use first::ArchAttributes;
pub use mappings::{Mapping, Mappings, DEFAULT_ENTRY_BUDGET};
pub use memory::{PhysImage, PhysMemory};
pub use range::{RangeSegments, Segment};
pub use riscv::{
    RiscvAttributes, RiscvGStage, RiscvMode, RiscvPaging, RiscvPagingError, RiscvTrap,
};
pub use second::SecondTranslation;
pub use types::{Access, AccessKind, Arch, LeafAttributes, Permissions, Privilege};
pub use virt::VirtError;
pub use walker::{GuestPaging, SecondLevel, Translation, WalkOptions, Walker, WalkerError};
pub use watch::TableWatch;
pub use x86::{X86Mode, X86Paging, X86PagingError, X86Register};
