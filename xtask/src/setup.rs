//! `cargo xtask setup`: installs what building and testing need (Debian
//! packages, bpf-linker in a cache directory) and picks the toolchain for the
//! eBPF crate. Idempotent: a machine that has everything costs a few probes.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::step;

/// Debian packages: Rust 1.96 with its `core` source and clippy (the eBPF
/// crate's compiler), LLVM 22 for bpf-linker, and the tools the tests drive.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "rust-web-clippy",
    "llvm-22-dev",
    "libzstd-dev",
    "bpftool",
    "nftables",
    "conntrack",
    "iproute2",
    "tcpdump",
    "iputils-ping",
    "iputils-arping",
    // flowguard-fwd-bench's traffic.
    "iperf3",
    "shellcheck",
    // `cargo xtask dist` and the qemu-user tests: clang/lld link the static
    // musl builds, llvm-22 strips the eBPF object, musl-dev is the x86_64
    // sysroot, make builds musl for mips.
    "clang-22",
    "lld-22",
    "llvm-22",
    "musl-dev",
    "make",
    "qemu-user-static",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// What setup found or installed, for the verbs that build.
pub struct Tools {
    /// Directory holding `bpf-linker`; goes first on the eBPF build's PATH.
    pub bin_dir: PathBuf,
    pub ebpf_toolchain: EbpfToolchain,
}

/// The Rust toolchain that builds the eBPF crate. Its `rustc` must match its
/// `rust-src` exactly, which rules out rustup's stable.
pub enum EbpfToolchain {
    /// rustup's nightly, when it has `rust-src`.
    Nightly { rustc: PathBuf },
    /// Debian's `rustc-web` 1.96 with `rust-web-src`, unstable flags enabled
    /// through `RUSTC_BOOTSTRAP=1`.
    Debian,
}

pub fn setup() -> Result<Tools> {
    println!("==> Checking system packages");
    install_apt_packages()?;

    println!("==> Checking bpf-linker {BPF_LINKER_VERSION}");
    let bin_dir = cache_dir()?.join("tools").join("bin");
    install_bpf_linker(&bin_dir)?;

    let ebpf_toolchain = choose_ebpf_toolchain();
    match &ebpf_toolchain {
        EbpfToolchain::Nightly { rustc } => println!(
            "The eBPF crate builds with rustup's nightly ({}).",
            rustc.display()
        ),
        EbpfToolchain::Debian => println!(
            "The eBPF crate builds with Debian's Rust (/usr/bin/cargo, /usr/bin/rustc), \
             because rustup's nightly has no rust-src."
        ),
    }
    Ok(Tools {
        bin_dir,
        ebpf_toolchain,
    })
}

fn install_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if missing.is_empty() {
        println!("All {} system packages are installed.", APT_PACKAGES.len());
        return Ok(());
    }

    let list = missing.join(" ");
    if !is_root() || !step::on_path("apt-get") {
        bail!(
            "these Debian packages are missing: {list}. Install them as root with \
             `apt-get update && apt-get install -y --no-install-recommends {list}`, \
             then run this command again."
        );
    }
    println!("Installing the missing Debian packages: {list}.");
    step::run(
        "apt-get update",
        Command::new("apt-get").arg("update").stdin(Stdio::null()),
    )?;
    step::run(
        &format!("apt-get install {list}"),
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
}

/// dpkg's status ends in "installed" only for a fully installed package
/// ("install ok installed"; not "half-installed" or "config-files").
fn is_installed(package: &str) -> bool {
    step::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}\n", package])).is_some_and(
        |status| {
            status
                .lines()
                .any(|line| line.split_whitespace().nth(2) == Some("installed"))
        },
    )
}

/// The owner of /proc/self is this process's effective user.
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// Where downloaded and built tools live, outside the repository so that
/// clones and `cargo clean` share them.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FLOWGUARD_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if is_root() {
        return Ok(PathBuf::from("/var/cache/flowguard"));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("flowguard"));
    }
    let home = std::env::var_os("HOME")
        .context("neither FLOWGUARD_CACHE, XDG_CACHE_HOME nor HOME is set; set FLOWGUARD_CACHE to a writable directory")?;
    Ok(PathBuf::from(home).join(".cache").join("flowguard"))
}

fn install_bpf_linker(bin_dir: &Path) -> Result<()> {
    let linker = bin_dir.join("bpf-linker");
    if has_bpf_linker_version(&linker) {
        println!(
            "bpf-linker {BPF_LINKER_VERSION} is in {}.",
            bin_dir.display()
        );
        return Ok(());
    }

    let root = bin_dir
        .parent()
        .expect("the bin directory has a parent")
        .to_path_buf();
    std::fs::create_dir_all(&root)
        .with_context(|| format!("could not create the tools directory {}", root.display()))?;
    // The cargo that runs xtask: rustup's stable, which builds bpf-linker fine.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    step::run(
        &format!(
            "Building bpf-linker {BPF_LINKER_VERSION} into {} (about a minute)",
            root.display()
        ),
        Command::new(cargo)
            .arg("install")
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            // --force: a binary cargo thinks is current but that does not run
            // (half-deleted cache) must be replaced, not skipped.
            .args(["--locked", "--force", "--no-default-features"])
            .args(["--features", "llvm-22,llvm-link-static"])
            .arg("--root")
            .arg(&root)
            // Without it, bpf-linker's build finds LLVM 14's llvm-config.
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    if !has_bpf_linker_version(&linker) {
        bail!(
            "{} does not report version {BPF_LINKER_VERSION} after installing it.",
            linker.display()
        );
    }
    Ok(())
}

fn has_bpf_linker_version(linker: &Path) -> bool {
    step::probe(Command::new(linker).arg("--version")).is_some_and(|out| {
        out.split_whitespace()
            .any(|word| word == BPF_LINKER_VERSION)
    })
}

fn choose_ebpf_toolchain() -> EbpfToolchain {
    let nightly_has_rust_src =
        step::probe(Command::new("rustup").args(["+nightly", "component", "list", "--installed"]))
            .is_some_and(|components| components.lines().any(|line| line.starts_with("rust-src")));
    if nightly_has_rust_src {
        let rustc =
            step::probe(Command::new("rustup").args(["which", "--toolchain", "nightly", "rustc"]));
        if let Some(rustc) = rustc {
            return EbpfToolchain::Nightly {
                rustc: PathBuf::from(rustc.trim()),
            };
        }
    }
    EbpfToolchain::Debian
}
