//! Embeds the eBPF object built by `cargo xtask build-ebpf`. The object's
//! path comes from FLOWGUARD_EBPF_OBJ (set by xtask), or the default place
//! xtask builds it. Without it the crate still builds (for `cargo check`,
//! clippy and unit tests) and `flowguard run` says how to get it.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=FLOWGUARD_EBPF_OBJ");
    println!("cargo::rustc-check-cfg=cfg(flowguard_ebpf_missing)");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let path = env::var_os("FLOWGUARD_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpf/bpfel-unknown-none/release/flowguard"));
    println!("cargo:rerun-if-changed={}", path.display());
    if path.is_file() {
        println!("cargo:rustc-env=FLOWGUARD_EBPF_OBJECT={}", path.display());
    } else {
        println!("cargo:rustc-cfg=flowguard_ebpf_missing");
        println!(
            "cargo:warning=no eBPF object at {}: run `cargo xtask build-ebpf` (the binary will refuse to run)",
            path.display()
        );
    }
}
