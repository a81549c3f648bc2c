//! The committed C header matches what cbindgen generates from the source,
//! byte for byte. `PAGEFOLD_BLESS=1` rewrites the file instead.

use std::{fs, path::Path};

#[test]
fn header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header_path = dir.join("include/pagefold.h");
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("reading cbindgen.toml: {e}"));
    // `with_src` parses the crate from its root file (following `mod`s)
    // without running `cargo metadata`.
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen: {e}"));
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("cbindgen writes UTF-8");

    // cbindgen copies doc comments verbatim into `/** ... */` blocks: a `*/`
    // in a Rust doc comment would end the C comment early.
    for (i, line) in generated.lines().enumerate() {
        if let Some(at) = line.find("*/") {
            assert!(
                line[at + 2..].trim().is_empty(),
                "header line {}: `*/` inside a comment (from a doc comment?): {line}",
                i + 1
            );
        }
    }

    if std::env::var_os("PAGEFOLD_BLESS").is_some_and(|v| v == "1") {
        fs::create_dir_all(dir.join("include")).expect("create include/");
        fs::write(&header_path, &generated).expect("write the header");
        return;
    }
    let committed = fs::read_to_string(&header_path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || committed.lines().count().min(generated.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "{} is stale (first difference at line {line}); regenerate it with\n  \
             PAGEFOLD_BLESS=1 cargo test -p pagefold-ffi --test header",
            header_path.display()
        );
    }
}
