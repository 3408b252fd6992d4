//! `cargo xtask dist`: static, stripped musl builds of `flowguard` for the
//! routers that have the flowtable bug (OpenWrt on aarch64, armv7, mipsel,
//! mips, x86_64), each carrying its eBPF object, checked against a size
//! budget and packed as an OpenWrt 24.10 `.ipk` under `target/dist/<arch>/`.
//!
//! No rustup target can be downloaded here, so std is built from Debian's
//! rust source (`-Z build-std`) with Debian's rustc, and clang/lld link it
//! against musl: Debian's musl-dev for x86_64, arm64 and armhf (fetched with a
//! private apt configuration, never added to the system's dpkg), and musl
//! built from Debian's source, soft-float, for mips and mipsel (Debian's
//! mipsel port is hard-float; no port has big-endian mips). All of it is
//! cached under the flowguard cache directory (see setup).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{ebpf, setup, step};

/// musl's version in Debian bookworm: the source the mips sysroots build from
/// and the musl-dev packages the others use.
const MUSL_VERSION: &str = "1.2.3";

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum ArchChoice {
    Aarch64,
    Armv7,
    Mipsel,
    Mips,
    #[value(name = "x86_64")]
    X86_64,
    /// A test build, not a router package: the big-endian kernel the lab
    /// can boot (`cargo xtask lab --arch s390x`). Not part of `all`.
    S390x,
    All,
}

#[derive(clap::Args, Debug)]
pub struct DistArgs {
    /// Which architecture to build (default: the five router architectures;
    /// s390x, a test build without a package, only when named).
    #[arg(long, value_enum, default_value = "all")]
    arch: ArchChoice,
}

impl DistArgs {
    /// One architecture, as `cargo xtask dist --arch` builds it.
    pub fn one(arch: ArchChoice) -> Self {
        Self { arch }
    }
}

/// Where a target's musl comes from.
#[derive(Clone, Copy)]
enum Musl {
    /// Debian's musl-dev for the build machine, installed by setup.
    Host { libdir: &'static str },
    /// Debian's musl-dev for a foreign architecture, unpacked from its .deb.
    Deb {
        deb_arch: &'static str,
        multiarch: &'static str,
    },
    /// Built from Debian's musl source with these extra compiler flags.
    Source { cflags: &'static str },
}

/// One target router architecture.
pub struct Arch {
    pub name: &'static str,
    pub rust_target: &'static str,
    clang_target: &'static str,
    /// bpfel or bpfeb: the eBPF object must have the kernel's byte order.
    bpf_target: &'static str,
    /// aya-ebpf's `bpf_target_arch` cfg for this kernel.
    bpf_arch: &'static str,
    /// OpenWrt's package architecture of a common device class.
    pub openwrt_arch: &'static str,
    musl: Musl,
    /// Stripped binary, bytes (decimal megabytes).
    budget: u64,
    /// The qemu-user binary that runs this architecture's programs.
    pub qemu: &'static str,
}

pub const ARCHES: &[Arch] = &[
    Arch {
        name: "aarch64",
        rust_target: "aarch64-unknown-linux-musl",
        clang_target: "aarch64-linux-musl",
        bpf_target: "bpfel-unknown-none",
        bpf_arch: "aarch64",
        openwrt_arch: "aarch64_cortex-a53",
        musl: Musl::Deb {
            deb_arch: "arm64",
            multiarch: "aarch64-linux-musl",
        },
        budget: 1_500_000,
        qemu: "qemu-aarch64-static",
    },
    // Thumb-2 rather than the ARM instruction set: 25% less code
    // (armv7-unknown-linux-musleabihf: 1.69 MB), and every OpenWrt armv7
    // device runs it; NEON as in OpenWrt's arm_cortex-a7_neon-vfpv4.
    Arch {
        name: "armv7",
        rust_target: "thumbv7neon-unknown-linux-musleabihf",
        clang_target: "armv7-linux-musleabihf",
        bpf_target: "bpfel-unknown-none",
        bpf_arch: "arm",
        openwrt_arch: "arm_cortex-a7_neon-vfpv4",
        musl: Musl::Deb {
            deb_arch: "armhf",
            multiarch: "arm-linux-musleabihf",
        },
        budget: 1_500_000,
        qemu: "qemu-arm-static",
    },
    Arch {
        name: "mipsel",
        rust_target: "mipsel-unknown-linux-musl",
        clang_target: "mipsel-linux-musl",
        bpf_target: "bpfel-unknown-none",
        bpf_arch: "mips",
        openwrt_arch: "mipsel_24kc",
        musl: Musl::Source {
            cflags: "-msoft-float",
        },
        budget: 2_200_000,
        qemu: "qemu-mipsel-static",
    },
    Arch {
        name: "mips",
        rust_target: "mips-unknown-linux-musl",
        clang_target: "mips-linux-musl",
        bpf_target: "bpfeb-unknown-none",
        bpf_arch: "mips",
        openwrt_arch: "mips_24kc",
        musl: Musl::Source {
            cflags: "-msoft-float",
        },
        budget: 2_200_000,
        qemu: "qemu-mips-static",
    },
    Arch {
        name: "x86_64",
        rust_target: "x86_64-unknown-linux-musl",
        clang_target: "x86_64-linux-musl",
        bpf_target: "bpfel-unknown-none",
        bpf_arch: "x86_64",
        openwrt_arch: "x86_64",
        musl: Musl::Host {
            libdir: "/usr/lib/x86_64-linux-musl",
        },
        budget: 2_200_000,
        qemu: "qemu-x86_64-static",
    },
];

/// Builds for testing only, without a package: s390x is the big-endian
/// kernel Debian ships and qemu-system-s390x boots, the lab's proof that the
/// bpfeb object loads, attaches and works on a big-endian kernel (no OpenWrt
/// router has a big-endian kernel that qemu and apt can give us here).
pub const TEST_ARCHES: &[Arch] = &[Arch {
    name: "s390x",
    rust_target: "s390x-unknown-linux-musl",
    clang_target: "s390x-linux-musl",
    bpf_target: "bpfeb-unknown-none",
    bpf_arch: "s390x",
    openwrt_arch: "",
    musl: Musl::Deb {
        deb_arch: "s390x",
        multiarch: "s390x-linux-musl",
    },
    budget: BUDGET_S390X,
    qemu: "qemu-s390x-static",
}];

/// s390x: 2.03 MB measured; a test build, so the budget only
/// catches a runaway.
const BUDGET_S390X: u64 = 2_500_000;

pub fn arch(name: &str) -> &'static Arch {
    ARCHES
        .iter()
        .chain(TEST_ARCHES)
        .find(|arch| arch.name == name)
        .expect("a known architecture name")
}

/// What one architecture's dist build produced.
struct Built {
    arch: &'static Arch,
    binary: PathBuf,
    size: u64,
    /// `xz -9e` of the binary: what it costs in a squashfs image.
    xz_size: u64,
    ebpf_size: u64,
    /// The .ipk and the .apk with their sizes; none for a test architecture.
    packages: Vec<(PathBuf, u64)>,
}

pub fn dist(args: &DistArgs) -> Result<()> {
    // Before the build: the sources it compiles are this commit's.
    let commit = measured_commit();
    let tools = setup::setup()?;
    let arches: Vec<&'static Arch> = match args.arch {
        ArchChoice::All => ARCHES.iter().collect(),
        ArchChoice::Aarch64 => vec![arch("aarch64")],
        ArchChoice::Armv7 => vec![arch("armv7")],
        ArchChoice::Mipsel => vec![arch("mipsel")],
        ArchChoice::Mips => vec![arch("mips")],
        ArchChoice::X86_64 => vec![arch("x86_64")],
        ArchChoice::S390x => vec![arch("s390x")],
    };
    let mut built = Vec::new();
    for arch in arches {
        let started = Instant::now();
        let (dest, object) = build_binary(&tools, arch)?;
        let out_dir = dest.parent().expect("under target/dist").to_path_buf();
        let mut packages = Vec::new();
        if !TEST_ARCHES.iter().any(|t| t.name == arch.name) {
            for package in [
                crate::ipk::build(arch.openwrt_arch, &dest, &out_dir)?,
                crate::apk::build(arch.openwrt_arch, &dest, &out_dir)?,
            ] {
                let size = file_size(&package)?;
                packages.push((package, size));
            }
        }
        println!(
            "{}: {} in {:.0} s",
            arch.name,
            dest.display(),
            started.elapsed().as_secs_f64()
        );
        built.push(Built {
            arch,
            size: file_size(&dest)?,
            xz_size: xz_size(&dest)?,
            ebpf_size: file_size(&object)?,
            binary: dest,
            packages,
        });
    }
    report_and_check_sizes(&built, &commit)
}

/// Builds `arch`'s static binary into target/dist/<arch>/flowguard; returns
/// it and the eBPF object it carries.
pub fn build_binary(tools: &setup::Tools, arch: &'static Arch) -> Result<(PathBuf, PathBuf)> {
    let toolchain = CrossToolchain::prepare(arch)?;
    let object = build_stripped_ebpf(tools, arch)?;
    let binary = toolchain.build_flowguard(&object)?;
    let out_dir = step::workspace_root().join("target/dist").join(arch.name);
    fs::create_dir_all(&out_dir)
        .with_context(|| format!("could not create {}", out_dir.display()))?;
    let dest = out_dir.join("flowguard");
    fs::copy(&binary, &dest)
        .with_context(|| format!("could not copy {} to {}", binary.display(), dest.display()))?;
    Ok((dest, object))
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("could not read {}", path.display()))?
        .len())
}

/// Bytes of `xz -9e` of `path` (Debian's xz-utils, which OpenWrt's
/// squashfs compression resembles).
fn xz_size(path: &Path) -> Result<u64> {
    let mut xz = Command::new("xz");
    xz.args(["-9e", "--stdout"]).arg(path);
    let output = xz
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start {}", step::display(&xz)))?;
    if !output.status.success() {
        bail!("`{}` failed ({})", step::display(&xz), output.status);
    }
    Ok(output.stdout.len() as u64)
}

/// 1234567 as "1,234,567", as the README writes sizes.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The commit the tree was built from, and whether it had changes on top.
fn measured_commit() -> String {
    let git = |args: &[&str]| {
        step::probe(
            Command::new("git")
                .args(args)
                .current_dir(step::workspace_root()),
        )
        .map(|out| out.trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "an unknown commit (no git)".into();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{commit} with uncommitted changes"),
        _ => commit,
    }
}

fn report_and_check_sizes(built: &[Built], commit: &str) -> Result<()> {
    println!();
    println!(
        "{:<8} {:>10} {:>10} {:>10}  files",
        "arch", "binary", "budget", "eBPF obj"
    );
    let mut over = Vec::new();
    for b in built {
        let packages: Vec<String> = b
            .packages
            .iter()
            .map(|(path, size)| format!("{} ({size})", path.display()))
            .collect();
        println!(
            "{:<8} {:>10} {:>10} {:>10}  {}, {}",
            b.arch.name,
            b.size,
            b.arch.budget,
            b.ebpf_size,
            b.binary.display(),
            if packages.is_empty() {
                "no package (test build)".into()
            } else {
                packages.join(", ")
            }
        );
        if b.size > b.arch.budget {
            over.push(format!(
                "{} is {} bytes, over its budget of {} by {}",
                b.arch.name,
                b.size,
                b.arch.budget,
                b.size - b.arch.budget
            ));
        }
    }
    // The README's size table, to paste as it is.
    println!();
    println!("For README.md (measured at commit {commit}):");
    println!();
    println!("| arch | binary | xz | .ipk | .apk |");
    println!("|---|---|---|---|---|");
    for b in built {
        let package = |ext: &str| {
            b.packages
                .iter()
                .find(|(path, _)| path.extension().is_some_and(|e| e == ext))
                .map_or("-".into(), |(_, size)| thousands(*size))
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            b.arch.name,
            thousands(b.size),
            thousands(b.xz_size),
            package("ipk"),
            package("apk")
        );
    }
    println!();
    if !over.is_empty() {
        bail!(
            "{}; find what grew (`cargo bloat`, or `llvm-nm-22 -C --size-sort` on an unstripped build)",
            over.join("; ")
        );
    }
    println!("All sizes are within budget.");
    Ok(())
}

/// The eBPF object for `arch`'s kernel (byte order and `bpf_target_arch`),
/// without DWARF (see `ebpf::strip_debug`).
fn build_stripped_ebpf(tools: &setup::Tools, arch: &Arch) -> Result<PathBuf> {
    let object = ebpf::build_ebpf_for(tools, arch.bpf_target, arch.bpf_arch)?;
    ebpf::strip_debug(&object)
}

/// clang/lld and a musl sysroot for one target, with a linker script that
/// supplies what rustup's self-contained crt objects would.
pub struct CrossToolchain {
    arch: &'static Arch,
    linker: PathBuf,
}

impl CrossToolchain {
    /// Fetches or builds the sysroot and the no-op unwinder if they are not
    /// cached yet, and writes the linker wrapper.
    pub fn prepare(arch: &'static Arch) -> Result<Self> {
        let dir = cross_dir()?.join(arch.name);
        fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
        let libdir = match arch.musl {
            Musl::Host { libdir } => PathBuf::from(libdir),
            Musl::Deb {
                deb_arch,
                multiarch,
            } => unpack_musl_deb(deb_arch)?.join("usr/lib").join(multiarch),
            Musl::Source { cflags } => build_musl(arch, cflags)?,
        };
        for crt in ["crt1.o", "crti.o", "crtn.o", "libc.a"] {
            if !libdir.join(crt).is_file() {
                bail!(
                    "the musl sysroot for {} has no {crt} in {}; remove {} and run again",
                    arch.name,
                    libdir.display(),
                    dir.display()
                );
            }
        }
        let unwind_dir = build_noop_unwinder(arch, &dir)?;
        let linker = dir.join("cc");
        write_linker_wrapper(arch, &linker, &libdir, &unwind_dir)?;
        Ok(Self { arch, linker })
    }

    /// A cargo for this target: Debian's cargo and rustc 1.96 (whose rust
    /// source builds std), in an environment cleaned of the host build's.
    pub fn cargo(&self, subcommand: &str, profile: &str, object: &Path) -> Command {
        let triple_env = self.arch.rust_target.to_uppercase().replace('-', "_");
        let mut command = Command::new("/usr/bin/cargo");
        ebpf::clean_env(&mut command);
        command
            .current_dir(step::workspace_root())
            .env("RUSTC", "/usr/bin/rustc")
            .env("RUSTC_BOOTSTRAP", "1")
            .env("FLOWGUARD_EBPF_OBJ", object)
            .env(format!("CARGO_TARGET_{triple_env}_LINKER"), &self.linker)
            .env("CARGO_ENCODED_RUSTFLAGS", cross_rustflags(self.arch))
            .arg(subcommand)
            .args(["--profile", profile, "--target", self.arch.rust_target])
            .args(["-Z", "build-std=std,panic_abort"])
            // std without its backtrace support (gimli, addr2line, object,
            // rustc-demangle: ~80 KB on aarch64, useless in a stripped
            // binary: nothing to symbolize), and its size-first algorithms.
            .args(["-Z", "build-std-features=optimize_for_size"])
            // Apart from target/: Debian's 1.96 and rustup's 1.95 would
            // otherwise rebuild each other's host artifacts.
            .args(["--target-dir", "target/cross"]);
        command
    }

    fn build_flowguard(&self, object: &Path) -> Result<PathBuf> {
        step::run(
            &format!(
                "Building flowguard for {} (profile dist, static musl)",
                self.arch.rust_target
            ),
            self.cargo("build", "dist", object).args([
                "-p",
                "flowguard-user",
                "--bin",
                "flowguard",
            ]),
        )?;
        let binary = step::workspace_root()
            .join("target/cross")
            .join(self.arch.rust_target)
            .join("dist/flowguard");
        // lld's --strip-all keeps MIPS's .pdr (procedure descriptors, ~170 KB,
        // read by no one at run time) and .comment.
        step::run(
            "Removing what the linker's strip keeps (.pdr, .comment)",
            Command::new("llvm-strip-22")
                .args([
                    "--strip-all",
                    "--remove-section=.pdr",
                    "--remove-section=.comment",
                ])
                .arg(&binary),
        )?;
        Ok(binary)
    }
}

/// Static musl; the crt objects and libc come from our sysroot, not from
/// rustup's self-contained set (which Debian's rustc does not have). No
/// unwind tables: panics abort and the unwinder is a no-op, so `.eh_frame`
/// (~280 KB on aarch64) would only be dead weight.
///
/// `-Zlocation-detail=none`: panic messages keep their text but not the
/// source file and line (no path strings in the binary).
///
/// mips: code for a fixed address (`relocation-model=static`) instead of
/// position-independent code, which on MIPS calls and loads everything
/// through the GOT: a static executable is never relocated anyway.
fn cross_rustflags(arch: &Arch) -> String {
    let mut flags = vec![
        "-Clink-self-contained=no",
        "-Ctarget-feature=+crt-static",
        "-Cforce-unwind-tables=no",
        "-Zlocation-detail=none",
    ];
    if matches!(arch.musl, Musl::Source { .. }) {
        flags.push("-Crelocation-model=static");
    }
    flags.join("\x1f")
}

pub fn cross_dir() -> Result<PathBuf> {
    Ok(setup::cache_dir()?.join("cross"))
}

/// A private apt configuration for foreign-architecture .debs and Debian's
/// source packages: its own lists, cache and (empty) dpkg status, so the
/// system's apt and dpkg never learn about arm64, armhf or s390x. Written
/// again (and updated) when an architecture is added.
fn private_apt() -> Result<PathBuf> {
    let dir = cross_dir()?.join("apt");
    let conf = dir.join("apt.conf");
    let lists = dir.join("lists");
    let keyring = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
    let sources = format!(
        "deb [arch=arm64,armhf,s390x {keyring}] http://deb.debian.org/debian bookworm main\n\
         deb-src [{keyring}] http://deb.debian.org/debian bookworm main\n"
    );
    let d = dir.display();
    let conf_text = format!(
        "Dir::Etc::SourceList \"{d}/sources.list\";\n\
         Dir::Etc::SourceParts \"{d}/sources.list.d\";\n\
         Dir::State::Lists \"{d}/lists\";\n\
         Dir::State::status \"{d}/status\";\n\
         Dir::Cache \"{d}/cache\";\n\
         APT::Architecture \"arm64\";\n\
         APT::Architectures {{ \"arm64\"; \"armhf\"; \"s390x\"; }};\n\
         Acquire::Languages \"none\";\n"
    );
    let same = |path: PathBuf, text: &str| fs::read_to_string(path).is_ok_and(|t| t == text);
    let fresh = same(conf.clone(), &conf_text)
        && same(dir.join("sources.list"), &sources)
        && fs::read_dir(&lists).is_ok_and(|mut entries| {
            entries.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with("Sources")))
        });
    if fresh {
        return Ok(conf);
    }
    for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::write(dir.join("status"), "")?;
    fs::write(dir.join("sources.list"), sources)?;
    fs::write(&conf, conf_text)?;
    step::run(
        "apt-get update (private configuration for the musl sysroots)",
        Command::new("apt-get")
            .args(["-q", "update"])
            .env("APT_CONFIG", &conf)
            .stdin(Stdio::null()),
    )?;
    Ok(conf)
}

/// Downloads into `dir` (if no file there starts with `prefix`) what `args`
/// name, with the private apt configuration.
fn apt_fetch(dir: &Path, prefix: &str, args: &[&str]) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let find = || -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .find_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(prefix).then(|| e.path())
            })
    };
    if let Some(found) = find() {
        return Ok(found);
    }
    let conf = private_apt()?;
    step::run(
        &format!("apt-get {}", args.join(" ")),
        Command::new("apt-get")
            .arg("-q")
            .args(args)
            .current_dir(dir)
            .env("APT_CONFIG", &conf)
            .stdin(Stdio::null()),
    )?;
    find().with_context(|| {
        format!(
            "apt-get {} left no {prefix}* in {}",
            args.join(" "),
            dir.display()
        )
    })
}

/// Debian's musl-dev for `deb_arch`, unpacked; returns the unpacked root.
fn unpack_musl_deb(deb_arch: &str) -> Result<PathBuf> {
    let root = cross_dir()?.join(format!("musl-{deb_arch}"));
    if root.join(".complete").is_file() {
        return Ok(root);
    }
    let deb = apt_fetch(
        &cross_dir()?.join("deb"),
        &format!("musl-dev_{MUSL_VERSION}-1_{deb_arch}.deb"),
        &["download", &format!("musl-dev:{deb_arch}")],
    )?;
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    step::run(
        &format!("Unpacking {}", deb.display()),
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
    )?;
    fs::write(root.join(".complete"), "")?;
    Ok(root)
}

/// musl from Debian's source, for targets whose Debian musl-dev does not fit
/// (soft-float mips/mipsel: lld refuses to mix float ABIs). About 25 s.
fn build_musl(arch: &Arch, cflags: &str) -> Result<PathBuf> {
    let prefix = cross_dir()?.join(format!("musl-{}", arch.name));
    let libdir = prefix.join("lib");
    if prefix.join(".complete").is_file() {
        return Ok(libdir);
    }
    let src_dir = cross_dir()?.join("src");
    let tarball = apt_fetch(
        &src_dir,
        &format!("musl_{MUSL_VERSION}.orig.tar.gz"),
        &["source", "--download-only", "musl"],
    )?;
    let build = cross_dir()?.join(format!("build-musl-{}", arch.name));
    let _ = fs::remove_dir_all(&build);
    fs::create_dir_all(&build)?;
    step::run(
        "Unpacking musl's source",
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&build)
            .arg("--strip-components=1"),
    )?;
    let cc = format!("clang-22 --target={} {cflags}", arch.clang_target);
    step::run(
        &format!("Configuring musl for {} ({cflags})", arch.name),
        Command::new("./configure")
            .arg(format!("--target={}", arch.clang_target))
            .arg(format!("--prefix={}", prefix.display()))
            .arg("--disable-shared")
            .current_dir(&build)
            .env("CC", &cc)
            .env("AR", "llvm-ar-22")
            .env("RANLIB", "llvm-ranlib-22"),
    )?;
    step::run(
        &format!("Building musl for {}", arch.name),
        Command::new("make")
            .args(["-j2", "install"])
            .current_dir(&build),
    )?;
    let _ = fs::remove_dir_all(&build);
    fs::write(prefix.join(".complete"), "")?;
    Ok(libdir)
}

/// With `panic = "abort"`, std still calls the unwinder for backtraces. gcc's
/// libgcc_eh needs glibc; these no-op definitions give empty backtraces.
const NOOP_UNWINDER: &str = r#"
typedef unsigned long uptr;
struct _Unwind_Context;
typedef int (*trace_fn)(struct _Unwind_Context *, void *);
/* _URC_END_OF_STACK: the walk ends at once. */
int _Unwind_Backtrace(trace_fn f, void *arg) { (void)f; (void)arg; return 5; }
uptr _Unwind_GetIP(struct _Unwind_Context *c) { (void)c; return 0; }
uptr _Unwind_GetIPInfo(struct _Unwind_Context *c, int *before) { (void)c; *before = 0; return 0; }
uptr _Unwind_GetCFA(struct _Unwind_Context *c) { (void)c; return 0; }
void *_Unwind_FindEnclosingFunction(void *pc) { (void)pc; return 0; }
/* s390x: std reads the stack pointer register (r15) instead of the CFA. */
uptr _Unwind_GetGR(struct _Unwind_Context *c, int reg) { (void)c; (void)reg; return 0; }
/* ARM EHABI: _Unwind_GetIP is built on _Unwind_VRS_Get there. */
int _Unwind_VRS_Get(struct _Unwind_Context *c, int cls, uptr reg, int rep, void *out)
{ (void)c; (void)cls; (void)reg; (void)rep; *(uptr *)out = 0; return 0; }
"#;

/// Compiles the no-op unwinder into `<dir>/unwind/libunwind.a`, the name
/// std's musl build links.
fn build_noop_unwinder(arch: &Arch, dir: &Path) -> Result<PathBuf> {
    let out = dir.join("unwind");
    let lib = out.join("libunwind.a");
    let source = out.join("unwind_noop.c");
    if lib.is_file() && fs::read_to_string(&source).is_ok_and(|s| s == NOOP_UNWINDER) {
        return Ok(out);
    }
    fs::create_dir_all(&out)?;
    fs::write(&source, NOOP_UNWINDER)?;
    let object = out.join("unwind_noop.o");
    let mut compile = Command::new("clang-22");
    compile.arg(format!("--target={}", arch.clang_target));
    if let Musl::Source { cflags } = arch.musl {
        compile.args(cflags.split_whitespace());
    }
    step::run(
        &format!("Compiling the no-op unwinder for {}", arch.name),
        compile
            .args(["-O2", "-fPIC", "-c"])
            .arg(&source)
            .arg("-o")
            .arg(&object),
    )?;
    let _ = fs::remove_file(&lib);
    step::run(
        "Archiving the no-op unwinder",
        Command::new("llvm-ar-22").arg("rcs").arg(&lib).arg(&object),
    )?;
    Ok(out)
}

/// rustc calls the linker like a gcc driver; this wrapper adds the musl crt
/// objects around its arguments: `rcrt1.o` for `-static-pie` (x86_64),
/// `crt1.o` otherwise (a static-pie with crt1.o segfaults at start).
fn write_linker_wrapper(arch: &Arch, path: &Path, libdir: &Path, unwind: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let l = libdir.display();
    let script = format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask dist`: links {name} against musl in {l}.\n\
         crt1=crt1.o\n\
         for arg in \"$@\"; do [ \"$arg\" = -static-pie ] && crt1=rcrt1.o; done\n\
         exec clang-22 --target={target} -fuse-ld=lld -nostdlib \\\n  \
         \"{l}/$crt1\" \"{l}/crti.o\" \"$@\" -L\"{l}\" -L\"{u}\" -lc \"{l}/crtn.o\"\n",
        name = arch.name,
        target = arch.clang_target,
        u = unwind.display(),
    );
    if fs::read_to_string(path).ok().as_deref() != Some(script.as_str()) {
        fs::write(path, script).with_context(|| format!("could not write {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// The architectures whose user-side unit tests run under qemu-user in
/// `cargo xtask test`: one 64-bit little-endian, one 32-bit big-endian.
pub const QEMU_TEST_ARCHES: &[&str] = &["aarch64", "mips"];

/// Cross-builds flowguard-user's unit tests for `arch` and runs them under
/// qemu-user. panic=abort (our std has no unwinder), so libtest runs the
/// tests in its own process (`--force-run-in-process`) and the first failure
/// ends the run with the failing test's message. qemu-user 7.2 emulates
/// neither the bpf syscall nor netfilter netlink sockets; the unit tests use
/// neither (those live in the namespace tests, which need a real kernel).
pub fn qemu_unit_tests(arch: &'static Arch, object: &Path) -> Result<()> {
    let started = Instant::now();
    let toolchain = CrossToolchain::prepare(arch)?;
    let mut build = toolchain.cargo("test", "cross-test", object);
    build
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                cross_rustflags(arch),
                "-Cpanic=abort".into(),
                "-Zpanic-abort-tests".into(),
            ]
            .join("\x1f"),
        )
        .args(["-p", "flowguard-user", "--lib", "--no-run"])
        .args(["--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped());
    println!(
        "==> Building flowguard-user's unit tests for {}",
        arch.rust_target
    );
    let output = build
        .spawn()
        .and_then(|child| child.wait_with_output())
        .with_context(|| format!("could not start {}", step::display(&build)))?;
    if !output.status.success() {
        bail!(
            "building the unit tests for {} failed; see above",
            arch.name
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let executable = stdout
        .lines()
        .filter(|line| {
            line.contains("\"reason\":\"compiler-artifact\"") && line.contains("\"test\":true")
        })
        .find_map(|line| {
            let start = line.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + line[start..].find('"')?;
            Some(PathBuf::from(&line[start..end]))
        })
        .context("cargo printed no test executable")?;
    let built = started.elapsed();
    step::run(
        &format!(
            "Running flowguard-user's unit tests for {} under {}",
            arch.name, arch.qemu
        ),
        Command::new(arch.qemu)
            .arg(&executable)
            .args([
                "-Z",
                "unstable-options",
                "--force-run-in-process",
                "--test-threads=1",
                // An abort would lose a captured panic message.
                "--nocapture",
            ])
            // libtest takes -Z options only from a "nightly": Debian's
            // 1.96 is one with RUSTC_BOOTSTRAP, read at run time.
            .env("RUSTC_BOOTSTRAP", "1"),
    )?;
    println!(
        "{}: unit tests under qemu-user: built in {:.0} s, ran in {:.0} s",
        arch.name,
        built.as_secs_f64(),
        (started.elapsed() - built).as_secs_f64()
    );
    Ok(())
}
