//! Helpers shared by several test binaries.
#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod fuse;
pub mod gpu;
