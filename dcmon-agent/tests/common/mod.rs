//! The names the device tests use, from the workspace's test support (dcmon-tests).
#![allow(unused_imports, reason = "each test file uses its own part")]

pub use dcmon_tests::{LoopDevice, is_root, require_root};
