//! The library half of xtask: what the `cargo xtask` commands and the end-to-end tests share.

pub mod harness;
pub mod prometheus;
