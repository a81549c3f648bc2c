//! Gives libpagefold.so the SONAME `libpagefold.so.<ABI major>`, so programs
//! linked against it record the ABI they need and installed copies can be
//! versioned (`install.sh` makes the links). The major must equal
//! `PF_ABI_VERSION_MAJOR` (a unit test checks).

/// Keep equal to `PF_ABI_VERSION_MAJOR` in src/lib.rs.
const SONAME_MAJOR: u32 = 0;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpagefold.so.{SONAME_MAJOR}");
    }
    println!("cargo:rustc-env=PAGEFOLD_SONAME_MAJOR={SONAME_MAJOR}");
}
