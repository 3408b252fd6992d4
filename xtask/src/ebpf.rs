//! Building and linting the eBPF crate for `bpfel-unknown-none`. It needs a
//! different toolchain from the rest of the workspace (see setup), so its cargo
//! runs in an environment cleaned of everything the host cargo injected.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::{
    setup::{EbpfToolchain, Tools},
    step,
};

const TARGET: &str = "bpfel-unknown-none";
/// Separate from `target/` so the two toolchains never share artifacts.
const TARGET_DIR: &str = "target/bpf";
/// The eBPF crate's binary target; the object the loader embeds.
const OBJECT_NAME: &str = "flowguard";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// Absolute path of the eBPF object that `build_ebpf` produces.
pub fn ebpf_object_path(profile: Profile) -> PathBuf {
    step::workspace_root()
        .join(TARGET_DIR)
        .join(TARGET)
        .join(profile.dir())
        .join(OBJECT_NAME)
}

pub fn build_ebpf(tools: &Tools, profile: Profile) -> Result<PathBuf> {
    let mut command = ebpf_cargo(tools, "build", TARGET, std::env::consts::ARCH, TARGET_DIR);
    if profile == Profile::Release {
        command.arg("--release");
    }
    step::run("Building the eBPF programs (flowguard-ebpf)", &mut command)?;
    let object = ebpf_object_path(profile);
    println!("The eBPF object is {}.", object.display());
    Ok(object)
}

/// `object` without DWARF, next to it as `flowguard.stripped`:
/// `--strip-debug` keeps `.BTF` and `.BTF.ext`, so maps keep their named
/// fields in `bpftool map dump`, and drops ~540 KB of the ~650 KB. This is
/// the object flowguard embeds.
pub fn strip_debug(object: &Path) -> Result<PathBuf> {
    let stripped = object.with_file_name("flowguard.stripped");
    step::run(
        "Stripping DWARF from the eBPF object (BTF stays)",
        Command::new("llvm-strip-22")
            .arg("--strip-debug")
            .arg(object)
            .arg("-o")
            .arg(&stripped),
    )?;
    Ok(stripped)
}

/// Lints the eBPF crate with the toolchain that builds it: the host's clippy
/// cannot check it (no `core` for the BPF target, duplicate `panic_impl`).
pub fn clippy_ebpf(tools: &Tools, hint: &str) -> Result<()> {
    let mut command = ebpf_cargo(tools, "clippy", TARGET, std::env::consts::ARCH, TARGET_DIR);
    command.args(["--release", "--", "-D", "warnings"]);
    step::run_or_explain("Linting the eBPF crate (clippy)", &mut command, hint)
}

/// The release eBPF object for a router's kernel: `target` is
/// `bpfel-unknown-none` or `bpfeb-unknown-none` (its byte order), `arch` its
/// `bpf_target_arch`. Without the bench programs (the `bench` feature),
/// which only `cargo xtask bench` runs. Each pair has its own target
/// directory so that switching between them rebuilds nothing.
pub fn build_ebpf_for(tools: &Tools, target: &str, arch: &str) -> Result<PathBuf> {
    let target_dir = format!("target/cross/bpf-{arch}");
    let mut command = ebpf_cargo(tools, "build", target, arch, &target_dir);
    command.args(["--release", "--no-default-features"]);
    step::run(
        &format!("Building the eBPF programs for {target}, bpf_target_arch {arch}"),
        &mut command,
    )?;
    Ok(step::workspace_root()
        .join(target_dir)
        .join(target)
        .join("release")
        .join(OBJECT_NAME))
}

/// `cargo <subcommand> -p flowguard-ebpf --target <target> -Z build-std=core`
/// with the eBPF toolchain, in a clean environment, from the workspace root.
fn ebpf_cargo(
    tools: &Tools,
    subcommand: &str,
    target: &str,
    arch: &str,
    target_dir: &str,
) -> Command {
    let mut command = match &tools.ebpf_toolchain {
        EbpfToolchain::Nightly { rustc } => {
            let mut command = Command::new("rustup");
            command.args(["run", "nightly", "cargo"]);
            clean_env(&mut command);
            command.env("RUSTC", rustc);
            command
        }
        EbpfToolchain::Debian => {
            let mut command = Command::new("/usr/bin/cargo");
            clean_env(&mut command);
            // Without RUSTC, Debian's cargo would pick rustup's 1.95 `rustc`
            // proxy from PATH, which cannot build Debian's 1.96 `core`.
            command
                .env("RUSTC", "/usr/bin/rustc")
                .env("RUSTC_BOOTSTRAP", "1");
            command
        }
    };
    command
        .current_dir(step::workspace_root())
        .env("PATH", path_with(&tools.bin_dir, &tools.ebpf_toolchain))
        .env("CARGO_ENCODED_RUSTFLAGS", ebpf_rustflags(arch))
        .arg(subcommand)
        .args(["-p", "flowguard-ebpf", "--target", target])
        .args(["-Z", "build-std=core", "--target-dir", target_dir]);
    command
}

/// `bpf_target_arch` tells aya-ebpf the layout of the kernel's structures
/// (the machine the object is for); BTF (`-Cdebuginfo=2 -Clink-arg=--btf`)
/// gives maps named fields.
fn ebpf_rustflags(arch: &str) -> String {
    [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f")
}

/// Removes what would make the eBPF cargo use the host toolchain or the host
/// build's settings: rustup's toolchain choice, flags and wrappers, and every
/// `CARGO*` variable that cargo set for xtask (manifest, package, target dir).
/// Kept: the user's cargo home, network and terminal settings.
pub fn clean_env(command: &mut Command) {
    const REMOVE: &[&str] = &[
        "RUSTUP_TOOLCHAIN",
        "RUSTUP_TOOLCHAIN_SOURCE",
        "RUSTC",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ];
    const KEEP_PREFIXES: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    for (key, _) in std::env::vars_os() {
        let Some(name) = key.to_str() else { continue };
        let cargo_injected = (name == "CARGO" || name.starts_with("CARGO_"))
            && !KEEP_PREFIXES.iter().any(|keep| name.starts_with(keep));
        if cargo_injected || REMOVE.contains(&name) {
            command.env_remove(&key);
        }
    }
}

/// PATH with bpf-linker's directory first. For Debian's toolchain, /usr/bin
/// comes next so that `cargo clippy` finds Debian's `cargo-clippy` before
/// rustup's proxy in ~/.cargo/bin.
fn path_with(bin_dir: &Path, toolchain: &EbpfToolchain) -> OsString {
    let mut dirs = vec![bin_dir.to_path_buf()];
    if let EbpfToolchain::Debian = toolchain {
        dirs.push(PathBuf::from("/usr/bin"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).expect("PATH entries contain no separator")
}
