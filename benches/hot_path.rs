//! Placeholder while the real file is written.
fn main() {}
