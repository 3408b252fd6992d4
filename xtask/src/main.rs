//! `cargo xtask`: the project's build, run and test entry points. Each verb is
//! one function; setup and the eBPF build live in their own modules because
//! they need a toolchain of their own.

mod apk;
mod dist;
mod ebpf;
mod ipk;
mod lab;
mod package;
mod setup;
mod step;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use crate::ebpf::Profile;

#[derive(Parser)]
#[command(about = "Build, run and test flowguard")]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install the Debian packages and bpf-linker that the build needs (idempotent).
    Setup,
    /// Build the eBPF object (flowguard-ebpf) and print its path.
    BuildEbpf {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build the eBPF object, the `flowguard` binary and the test binaries (release).
    Build,
    /// Build, then run `flowguard` with the given arguments.
    Run {
        /// Arguments for flowguard, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then show flowguard finding and fixing a stale MAC in network
    /// namespaces of its own (needs root).
    Demo {
        /// Arguments for flowguard-demo, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then measure the eBPF programs with BPF_PROG_TEST_RUN, then the
    /// eviction after a neighbour MAC change against `conntrack -D` (needs root).
    Bench {
        /// Arguments for flowguard-bench, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then fuzz the programs (both guards and the learning tc
    /// program): random and mutated frames (a million per program by
    /// default) through BPF_PROG_TEST_RUN, each checked against the
    /// oracle, and the learned endpoints compared with the oracle's; fails
    /// on any wrong rewrite, pass or learn (needs root).
    Fuzz {
        /// Arguments for flowguard-fuzz (`--seed N`, `--frames N`), after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite: setup, eBPF build, fmt, clippy, build, tests,
    /// the user side's unit tests for aarch64 and mips under qemu-user, and
    /// the quick subset of the VM lab.
    Test {
        /// Skip rustfmt and clippy, for quick iteration.
        #[arg(long)]
        no_lint: bool,
    },
    /// Cross-build the user side's unit tests for aarch64 and mips and run
    /// them under qemu-user (a step of `test`).
    TestQemu,
    /// Build static, size-checked musl binaries and OpenWrt packages for
    /// routers under target/dist/<arch>/.
    Dist(dist::DistArgs),
    /// Reproduce the flowtable stale-MAC bug on a Debian kernel in qemu and
    /// check flowguard's roles against it (needs root; see lab/).
    Lab(lab::LabArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.verb {
        Verb::Setup => setup::setup().map(drop),
        Verb::BuildEbpf { debug } => build_ebpf(debug),
        Verb::Build => build().map(drop),
        Verb::Run { args } => run(&args),
        Verb::Demo { args } => demo(&args),
        Verb::Bench { args } => bench(&args),
        Verb::Fuzz { args } => fuzz(&args),
        Verb::Test { no_lint } => test(no_lint),
        Verb::TestQemu => test_qemu(),
        Verb::Dist(args) => dist::dist(&args),
        Verb::Lab(args) => lab::lab(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_ebpf(debug: bool) -> Result<()> {
    let tools = setup::setup()?;
    let profile = if debug {
        Profile::Debug
    } else {
        Profile::Release
    };
    ebpf::build_ebpf(&tools, profile).map(drop)
}

/// Builds everything the run, demo and bench verbs start; returns the path
/// of the eBPF object they use (and flowguard embeds): without DWARF.
fn build() -> Result<PathBuf> {
    let tools = setup::setup()?;
    let object = ebpf::strip_debug(&ebpf::build_ebpf(&tools, Profile::Release)?)?;
    build_user_and_test_binaries(&object)?;
    Ok(object)
}

fn run(args: &[String]) -> Result<()> {
    let object = build()?;
    let mut command = Command::new(release_binary("flowguard")?);
    command.args(args).env("FLOWGUARD_EBPF_OBJ", &object);
    exec(command)
}

fn demo(args: &[String]) -> Result<()> {
    let object = build()?;
    let mut command = Command::new(release_binary("flowguard-demo")?);
    command
        .arg("--flowguard")
        .arg(release_binary("flowguard")?)
        .args(args)
        .env("FLOWGUARD_EBPF_OBJ", &object);
    exec(command)
}

fn bench(args: &[String]) -> Result<()> {
    let object = build()?;
    step::run(
        "Measuring the eBPF programs (flowguard-bench)",
        Command::new(release_binary("flowguard-bench")?)
            .args(args)
            .env("FLOWGUARD_EBPF_OBJ", &object),
    )?;
    // The benches that run flowguard itself.
    for (title, bench) in [
        (
            "Measuring eviction after a neighbour MAC change (flowguard-evict-bench)",
            "flowguard-evict-bench",
        ),
        (
            "Measuring what probing 1,000 endpoints costs (flowguard-probe-bench)",
            "flowguard-probe-bench",
        ),
        (
            "Forwarding through a router namespace with and without flowguard (flowguard-fwd-bench)",
            "flowguard-fwd-bench",
        ),
        (
            "Following a bridge FDB of 4,096 MACs: memory, and the CPU of an FDB storm (flowguard-fdb-bench)",
            "flowguard-fdb-bench",
        ),
    ] {
        step::run(
            title,
            Command::new(release_binary(bench)?)
                .arg("--flowguard")
                .arg(release_binary("flowguard")?)
                .env("FLOWGUARD_EBPF_OBJ", &object),
        )?;
    }
    Ok(())
}

fn fuzz(args: &[String]) -> Result<()> {
    let object = build()?;
    let mut command = Command::new(release_binary("flowguard-fuzz")?);
    command.args(args).env("FLOWGUARD_EBPF_OBJ", &object);
    exec(command)
}

const LINT_HINT: &str =
    "fix the warnings above, or skip linting while iterating with `cargo xtask test --no-lint`";

fn test(no_lint: bool) -> Result<()> {
    let tools = setup::setup()?;
    // The tests load the object flowguard ships: without DWARF.
    let object = ebpf::strip_debug(&ebpf::build_ebpf(&tools, Profile::Release)?)?;

    if no_lint {
        println!("Skipping rustfmt and clippy (--no-lint).");
    } else {
        step::run_or_explain(
            "Checking formatting",
            host_cargo(&object).args(["fmt", "--all", "--", "--check"]),
            "run `cargo fmt --all` to apply the formatting shown above",
        )?;
        step::run_or_explain(
            "Linting the workspace except the eBPF crate (clippy)",
            host_cargo(&object).args([
                "clippy",
                "--workspace",
                "--exclude",
                "flowguard-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            LINT_HINT,
        )?;
        ebpf::clippy_ebpf(&tools, LINT_HINT)?;
    }

    build_user_and_test_binaries(&object)?;

    let flowguard = release_binary("flowguard")?;
    step::run_or_explain(
        "Running the tests (release, one thread)",
        host_cargo(&object)
            .args([
                "test",
                "--workspace",
                "--exclude",
                "flowguard-ebpf",
                "--release",
            ])
            .args(["--", "--test-threads=1"])
            .env("FLOWGUARD_BIN", &flowguard),
        "see the failing tests above",
    )?;
    qemu_unit_tests(&object)?;
    router_memory(&tools, &object)?;
    println!("==> The real-kernel lab, quick subset (the flowtable bug in a VM)");
    lab::lab(&lab::quick_args(flowguard))?;
    println!("==> The real-kernel lab on a big-endian kernel (s390x, the bpfeb object)");
    lab::lab(&lab::big_endian_args())?;
    println!("All test steps passed.");
    Ok(())
}

fn test_qemu() -> Result<()> {
    let tools = setup::setup()?;
    let object = ebpf::build_ebpf(&tools, Profile::Release)?;
    qemu_unit_tests(&object)
}

/// The memory budget of what routers run (static musl, idle and with
/// 16,000 endpoints), held on the x86_64 build: the same code and allocator
/// as the router builds, on this machine's kernel.
fn router_memory(tools: &setup::Tools, object: &Path) -> Result<()> {
    let (binary, _) = dist::build_binary(tools, dist::arch("x86_64"))?;
    step::run_or_explain(
        "Memory of the static musl build: idle and with 16,000 endpoints",
        host_cargo(object)
            .args([
                "test",
                "--release",
                "-p",
                "flowguard-tests",
                "--test",
                "routers",
                "memory",
                "--",
                "--test-threads=1",
                "--nocapture",
            ])
            .env("FLOWGUARD_BIN", &binary),
        "the router build is over its memory budget (see the figures above)",
    )
}

/// The user side on a 64-bit little-endian and a 32-bit big-endian CPU.
fn qemu_unit_tests(object: &Path) -> Result<()> {
    for name in dist::QEMU_TEST_ARCHES {
        dist::qemu_unit_tests(dist::arch(name), object)?;
    }
    Ok(())
}

fn build_user_and_test_binaries(object: &Path) -> Result<()> {
    step::run(
        "Building flowguard and the test binaries (release)",
        host_cargo(object).args([
            "build",
            "--release",
            "-p",
            "flowguard-user",
            "-p",
            "flowguard-tests",
            "--bins",
        ]),
    )
}

/// The cargo that runs xtask (rustup's stable), from the workspace root, with
/// the eBPF object that flowguard-user's build script embeds.
fn host_cargo(ebpf_object: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(step::workspace_root())
        .env("FLOWGUARD_EBPF_OBJ", ebpf_object);
    command
}

fn release_binary(name: &str) -> Result<PathBuf> {
    let path = step::workspace_root().join("target/release").join(name);
    if !path.is_file() {
        bail!(
            "{} does not exist after the build; is there a `{name}` binary in the workspace?",
            path.display()
        );
    }
    Ok(path)
}

/// Replaces xtask with `command`, so that its exit code and signals (Ctrl-C)
/// reach the caller unchanged. Returns only if it could not start.
fn exec(mut command: Command) -> Result<()> {
    let error = command.exec();
    bail!("could not start {}: {error}", step::display(&command))
}
