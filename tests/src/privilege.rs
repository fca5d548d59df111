//! The checks a test makes before it needs root or eBPF. The policy (README, Testing): a test
//! that needs root fails when not run as root, with what it needs root for; it never passes
//! without having run.

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the calling test unless it runs as root. `why` says what needs root (e.g. "mounting
/// a tmpfs"), so the failure tells whoever sees it what the test does and how to run it.
#[track_caller]
pub fn require_root(why: &str) {
    assert!(
        is_root(),
        "this test needs root ({why}) and does not run without it: run it as root, as CI does, \
         or leave it out with `--skip TEST_NAME`"
    );
}

/// `DCMON_REQUIRE_EBPF=1` (CI): a test whose eBPF programs cannot load on this kernel fails
/// instead of skipping, so a broken eBPF mode cannot pass unnoticed.
pub fn ebpf_required() -> bool {
    std::env::var("DCMON_REQUIRE_EBPF").is_ok_and(|v| v == "1")
}

/// `DCMON_REQUIRE_PACKAGING=1` (CI): the tests of what is shipped (the Debian package in a
/// systemd-nspawn container, the static binary in an empty chroot) fail instead of skipping when
/// they cannot run (not root, a tool missing, the package or static binary not built).
pub fn packaging_required() -> bool {
    std::env::var("DCMON_REQUIRE_PACKAGING").is_ok_and(|v| v == "1")
}
