//! Builds the C stand-ins the end-to-end tests load: shared objects, so they are linked with
//! the C compiler the `cc` crate finds (gcc on the CI machines) rather than as static archives.
//! Each path reaches the tests as a compile-time env var (`DCMON_<NAME>_SO`).

use std::path::PathBuf;
use std::process::Command;

/// (source under csrc/, output file, env var name, extra linker args)
const LIBS: &[(&str, &str, &str, &[&str])] = &[
    ("nvme_shim.c", "libdcmon_nvme_shim.so", "DCMON_NVME_SHIM_SO", &["-ldl"]),
    ("fake_nvml.c", "libnvidia-ml.so.1", "DCMON_FAKE_NVML_SO", &[]),
];

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let compiler = cc::Build::new().get_compiler();
    for (src, out, var, extra) in LIBS {
        let src_path = PathBuf::from("csrc").join(src);
        println!("cargo:rerun-if-changed={}", src_path.display());
        let out_path = out_dir.join(out);
        let status = Command::new(compiler.path())
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&out_path)
            .arg(&src_path)
            .args(*extra)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", compiler.path().display()));
        assert!(status.success(), "compiling {} failed: {status}", src_path.display());
        println!("cargo:rustc-env={var}={}", out_path.display());
    }
}
