//! dcmon's BPF programs: per-disk and per-interface I/O counters, latency histograms, drops, TCP and OOM events.
//!
//! Built only for `bpfel-unknown-none` by `cargo xtask build-ebpf`; on the host this crate is an
//! empty binary so that `cargo check --workspace` keeps working on the stable toolchain.
//!
//! The programs are BTF-enabled tracepoints (`tp_btf`): the kernel hands them the tracepoint's
//! arguments directly, with no tracefs and no per-event argument copy. Struct field offsets
//! come from `.rodata` globals that the agent fills from the running kernel's BTF at load
//! time, so one object works across kernels whose `struct request` or `sk_buff` differ.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `atomic_xadd`: the BPF target has no `AtomicU64::fetch_add` (no compare-and-swap loop to fall
// back on), but the intrinsic lowers to BPF's own atomic add.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
