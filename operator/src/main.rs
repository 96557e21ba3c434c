//! The example-operator process.

fn main() {}
