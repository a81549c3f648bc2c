//! Benchmarks (filled in by the bench modules).
fn main() {}
