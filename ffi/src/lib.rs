//! C ABI of pagefold: `libpagefold.so` / `libpagefold.a` and the header
//! `include/pagefold.h` (generated from this crate by cbindgen; see
//! `cbindgen.toml` and `tests/header.rs`).
//!
//! Conventions every export follows (the header repeats them for C readers):
//!
//! - Every name starts with `pf_` (`PF_` for constants).
//! - Objects are opaque handles made by a `pf_<type>_new` function and
//!   released by `pf_<type>_free`, which accepts NULL.
//! - Every call returns a `pf_status`: `PF_OK` (0) or a negative error code.
//!   Results go to out-parameters, which are left untouched on error. The
//!   exceptions are `pf_abi_version` and `pf_status_name`, which cannot fail
//!   and return their result, and the `_free` functions, which return nothing.
//! - A call that fails stores a message in a thread-local slot that
//!   `pf_last_error_message` copies out; a call that succeeds clears it.
//! - Every export runs behind one panic boundary (`ffi_boundary!` in `boundary.rs`): a panic
//!   never unwinds into C; the call returns `PF_ERR_PANIC` instead.
//! - Every pointer argument is checked for NULL, and every length against what
//!   the host can address, before anything happens.
//! - Structs that may grow in later versions start with `size_t struct_size`,
//!   which the caller sets to `sizeof` the struct it was compiled against.
//!   A size below this version's first layout is refused with
//!   `PF_ERR_STRUCT_TOO_SMALL`; a larger one is accepted (the extra bytes are
//!   ignored on input and left alone on output).
//! - `pf_abi_version()` tells which version of these rules and layouts the
//!   library implements.

#[macro_use]
mod boundary;
mod args;
mod balloon;
mod dedup;
mod dirty;
mod memory;
mod migration;
mod paging;
mod service;
mod snapshot;
mod status;
mod store;

pub use balloon::*;
pub use boundary::pf_last_error_message;
pub use dedup::*;
pub use dirty::*;
pub use memory::*;
pub use migration::*;
pub use paging::*;
pub use service::*;
pub use snapshot::*;
pub use status::{pf_status, pf_status_name};
pub use store::*;

/// Major ABI version: changes when a layout, a signature or a meaning changes
/// incompatibly. A program built against major M runs only with major M.
pub const PF_ABI_VERSION_MAJOR: u32 = 0;
/// Minor ABI version: grows when functions, error codes, flags or struct
/// fields are added. A program built against minor m needs minor >= m.
pub const PF_ABI_VERSION_MINOR: u32 = 11;
/// `(PF_ABI_VERSION_MAJOR << 16) | PF_ABI_VERSION_MINOR`, the value of
/// `pf_abi_version()` for the header this constant comes from.
pub const PF_ABI_VERSION: u32 = (PF_ABI_VERSION_MAJOR << 16) | PF_ABI_VERSION_MINOR;

/// The ABI version the loaded library implements, encoded as
/// `(major << 16) | minor`; compare with `PF_ABI_VERSION` from the header a
/// program was compiled with: the majors must be equal and the library's
/// minor at least the header's.
#[no_mangle]
pub extern "C" fn pf_abi_version() -> u32 {
    ffi_boundary! { returns u32; PF_ABI_VERSION }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soname_follows_abi_major() {
        assert_eq!(
            env!("PAGEFOLD_SONAME_MAJOR").parse::<u32>().ok(),
            Some(PF_ABI_VERSION_MAJOR),
            "build.rs SONAME_MAJOR and PF_ABI_VERSION_MAJOR disagree"
        );
        assert_eq!(pf_abi_version() >> 16, PF_ABI_VERSION_MAJOR);
    }
}
