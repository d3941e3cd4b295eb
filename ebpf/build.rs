//! Compiles `bpf/redirect.c` into a BPF object with clang (the Rust toolchain has no BPF
//! target here). Needs `clang` and `libbpf-dev` (for `bpf/bpf_helpers.h`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/redirect.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("redirect.o");
    let clang = env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());
    // linux/bpf.h includes asm/types.h, which Debian keeps under the multiarch directory.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile {src} ({s}); is libbpf-dev installed?"),
        Err(e) => panic!(
            "cannot run {clang} to compile {src}: {e}; install clang and libbpf-dev \
             (scripts/test.sh does)"
        ),
    }
}
