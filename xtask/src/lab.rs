//! `cargo xtask lab`: the real-kernel lab. Boots a Debian kernel (fetched with
//! `apt-get download`, never installed) in qemu with an initramfs that holds
//! flowguard, reproduces the nftables flowtable stale-MAC bug in network
//! namespaces and checks what flowguard does about it in each role.
//!
//! The scripts that run inside the VM live in `lab/` (see lab/cases.sh); each
//! case prints a `LABRESULT key=value ...` line on the serial console, which
//! this module turns into a table and checks against the expectations below.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};

use crate::step;

/// Debian packages the lab needs on the host (installed with apt if missing).
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "nftables",
    "conntrack",
    "tcpdump",
    "iproute2",
    "kmod",
    "cpio",
    "gcc",
    "libc6-dev",
];
/// The same for `--arch arm64` and `--arch s390x`, besides their emulator:
/// the VM's tools come from .debs of its architecture
/// (lab/fetch-userland.sh), so the host needs only busybox for its applet
/// list, depmod, cpio, readelf (the libraries the tools need) and clang/lld
/// (the static udpwg against the VM's musl).
const HOST_PACKAGES_FOREIGN: &[&str] = &[
    "busybox-static",
    "kmod",
    "cpio",
    "binutils",
    "clang-22",
    "lld-22",
];

/// Scenarios that reproduce the stale MAC (flowtable on a bridge port).
const REPRODUCING: &[&str] = &["blog", "routed", "vlan"];
/// Blog, but the recreated container announces nothing and no other flow
/// goes to its IP: only flowguard's probing (router) or its knowledge of the
/// host's macvlan children (host) can find the new MAC.
const SILENT: &str = "silent";
/// Flowtable on the bridge device only: no stale MAC expected.
const CONTROL: &str = "control";
/// The endpoint keeps its IP and MAC and moves from behind bridge port lan1
/// to behind lan2 (Wi-Fi roaming between two access points), then sends a
/// gratuitous ARP: the flowtable, which caches the egress port, keeps
/// sending out of lan1.
const ROAM: &str = "roam";
/// Roam, but the endpoint sends nothing after the move (it only answers
/// ARP): only flowguard's probing can make the bridge learn where it is.
const ROAM_SILENT: &str = "roam-silent";
const ROAM_ROLES: &[&str] = &["none", "router", "observe"];
const FULL_ROLES: &[&str] = &["none", "router", "host", "observe"];
/// The blog scenario also runs `ctdel`: the eviction done by hand with
/// conntrack(8), which shows what the router role's eviction evidence looks like.
///
/// And `restart`: the host role, killed with SIGKILL while it rewrites the
/// stale stream and started again on the same pin directory; the pinned
/// programs must keep guarding meanwhile (no packet lost to the restart).
const BLOG_ROLES: &[&str] = &["none", "ctdel", "router", "host", "observe", "restart"];
const CONTROL_ROLES: &[&str] = &["none", "router", "host"];
const DEFAULT_CACHE: &str = "/var/cache/flowguard/lab";
const QUICK_ROLES: &[&str] = &["none", "router", "observe", "host"];
const QUICK_CONTROL_ROLES: &[&str] = &["none", "router"];
/// The silent cases `--quick` adds to the blog boot.
const QUICK_SILENT_ROLES: &[&str] = &["router", "host"];
/// The roam case `--quick` adds to the blog boot.
const QUICK_ROAM: &str = "roam:router";

/// The VM's architecture.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum LabArch {
    /// qemu-system-x86_64 (KVM when the host has hardware KVM), the host's tools.
    Amd64,
    /// qemu-system-aarch64 -M virt (TCG), Debian's arm64 kernel and tools, and
    /// the static aarch64 musl flowguard of `cargo xtask dist --arch aarch64`.
    Arm64,
    /// qemu-system-s390x -M s390-ccw-virtio (TCG): Debian's s390x kernel, the
    /// big-endian one, and tools, and the static s390x musl flowguard with the
    /// bpfeb object (`cargo xtask dist --arch s390x`).
    S390x,
}

impl LabArch {
    fn debian(self) -> &'static str {
        match self {
            LabArch::Amd64 => "amd64",
            LabArch::Arm64 => "arm64",
            LabArch::S390x => "s390x",
        }
    }
}

/// What `--arch arm64` and `--arch s390x` run by default (one boot): the
/// bug, and the roles that fix it, on the blog scenario.
const FOREIGN_ROLES: &[&str] = &["none", "router", "host", "observe"];

/// Recovery time limits (ms, measured from the recreated container's start).
const FIX_RECOVERY_MS: i64 = 2000;
const OBSERVE_RECOVERY_MS: i64 = 1500;
/// A silent endpoint, found by probing with the default settings.
const SILENT_RECOVERY_MS: i64 = 1500;
/// A silent endpoint in the host role: packets lost after its address is up.
const SILENT_HOST_MAX_LOST: i64 = 1;
/// A roaming endpoint that announces itself, router role (fix mode: the
/// frames that leave through the old port are redirected): packets lost
/// after the move.
const ROAM_FIX_MAX_LOST: i64 = 1;

#[derive(clap::Args, Debug)]
pub struct LabArgs {
    /// The VM's architecture. arm64 and s390x (big-endian) run the blog
    /// scenario without flowguard and in the router, host and observe roles
    /// (one boot; --only picks another scenario, with all its roles).
    #[arg(long, value_enum, default_value = "amd64")]
    arch: LabArch,
    /// Use this linux-image .deb (of --arch's architecture) instead of
    /// downloading one.
    #[arg(long, value_name = "PATH", conflicts_with = "suite")]
    kernel_deb: Option<PathBuf>,
    /// The Debian suite whose linux-image-amd64 (or -arm64, -s390x) to boot
    /// (bookworm amd64 uses the host's apt lists; the others a private apt
    /// directory in the cache).
    #[arg(long, default_value = "bookworm")]
    suite: String,
    /// Run only this scenario: blog, routed, vlan, silent, control, roam or
    /// roam-silent.
    #[arg(long, value_name = "SCENARIO")]
    only: Option<String>,
    /// A subset that fits CI: the blog scenario without flowguard and with
    /// flowguard in the router, observe and host roles, the silent one in
    /// the router and host roles, roam in the router role, and the control
    /// without flowguard and with the router role (two VM boots).
    #[arg(long)]
    quick: bool,
    /// Put this flowguard binary into the VM instead of building one (for
    /// arm64 and s390x: a static binary of that architecture).
    #[arg(long, value_name = "PATH")]
    flowguard: Option<PathBuf>,
    /// Where the kernel, the initramfs and the logs go.
    #[arg(long, default_value = DEFAULT_CACHE)]
    cache: PathBuf,
    /// Seconds to watch after the MAC change (or the move), in each case.
    #[arg(long, default_value_t = 8)]
    window: u32,
    /// The main flow's send interval (ms): shorter makes the frames sent
    /// between a change and flowguard's eviction (those the kernel side
    /// rewrites or redirects) more numerous; the loss limits stay the same.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=1000))]
    interval_ms: u32,
}

/// The subset `cargo xtask test` runs, with an already built flowguard.
pub fn quick_args(flowguard: PathBuf) -> LabArgs {
    LabArgs {
        arch: LabArch::Amd64,
        kernel_deb: None,
        suite: "bookworm".into(),
        only: None,
        quick: true,
        flowguard: Some(flowguard),
        cache: PathBuf::from(DEFAULT_CACHE),
        window: 8,
        interval_ms: 200,
    }
}

/// The big-endian run `cargo xtask test` adds: the blog scenario's roles on
/// Debian's s390x kernel with the bpfeb object, the one place where the
/// kernel's verifier sees the programs built for big-endian routers (mips).
pub fn big_endian_args() -> LabArgs {
    LabArgs {
        arch: LabArch::S390x,
        quick: false,
        flowguard: None,
        ..quick_args(PathBuf::new())
    }
}

pub fn lab(args: &LabArgs) -> Result<()> {
    let started = Instant::now();
    let boots = plan(args)?;
    ensure_host_packages(args.arch)?;
    let flowguard = match (&args.flowguard, args.arch) {
        (Some(path), _) => path.clone(),
        (None, LabArch::Amd64) => {
            crate::build()?;
            crate::release_binary("flowguard")?
        }
        (None, LabArch::Arm64) => {
            crate::dist::dist(&crate::dist::DistArgs::one(
                crate::dist::ArchChoice::Aarch64,
            ))?;
            step::workspace_root().join("target/dist/aarch64/flowguard")
        }
        (None, LabArch::S390x) => {
            crate::dist::dist(&crate::dist::DistArgs::one(crate::dist::ArchChoice::S390x))?;
            step::workspace_root().join("target/dist/s390x/flowguard")
        }
    };

    fs::create_dir_all(&args.cache)
        .with_context(|| format!("could not create {}", args.cache.display()))?;
    let kroot = fetch_kernel(args)?;
    let (kver, kernel) = kernel_image(&kroot)?;
    let caches = caches_macs(&kver);
    let boots = if caches {
        boots
    } else {
        before_mac_caching(&kver, boots)
    };
    let initramfs = args.cache.join(format!("initramfs-{kver}.cpio.gz"));
    let mut build = Command::new(lab_dir().join("build-initramfs.sh"));
    if args.arch != LabArch::Amd64 {
        build.arg("--userland").arg(fetch_userland(args)?);
    }
    step::run(
        "Building the lab initramfs",
        build.arg(&kroot).arg(&flowguard).arg(&initramfs),
    )?;

    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let log_dir = args.cache.join(format!("logs/{stamp}"));
    fs::create_dir_all(&log_dir)?;

    let mut results = Vec::new();
    let mut boot_times = Vec::new();
    for (name, cases) in &boots {
        let log = log_dir.join(format!("{name}.log"));
        let t = Instant::now();
        let mut got = boot(args, &kernel, &initramfs, cases, &log)?;
        boot_times.push((name.clone(), t.elapsed().as_secs()));
        for case in cases {
            let (scenario, role) = case.split_once(':').expect("cases are SCENARIO:ROLE");
            if !got
                .iter()
                .any(|r| r.get("scenario") == Some(scenario) && r.get("role") == Some(role))
            {
                let mut missing = CaseResult::default();
                missing.insert("scenario", scenario);
                missing.insert("role", role);
                missing.insert("setup", "no-result-from-vm");
                got.push(missing);
            }
        }
        results.extend(got);
    }

    let failures = report(&results, caches);
    println!();
    for (name, secs) in &boot_times {
        println!("VM boot {name}: {secs} s");
    }
    println!(
        "kernel {kver}; logs in {}; total {} s",
        log_dir.display(),
        started.elapsed().as_secs()
    );
    if failures > 0 {
        bail!(
            "{failures} of {} lab cases did not meet their expectations (see the table and {})",
            results.len(),
            log_dir.display()
        );
    }
    println!("All {} lab cases met their expectations.", results.len());
    Ok(())
}

/// Whether kernel `kver` ("5.10.0-35-amd64") caches MACs in the flowtable:
/// from Linux 5.13 (commit 7a27f6ab4135, the direct transmit path; see
/// flowguard's doctor). An unreadable version counts as caching.
fn caches_macs(kver: &str) -> bool {
    let mut parts = kver.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(u32::MAX);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (5, 13)
}

/// On a kernel before 5.13 the lab proves the other side of the boundary:
/// the scenarios that reproduce the bug from 5.13 on deliver to the new MAC
/// without flowguard (only their `none` roles run; flowguard's programs
/// need 5.11 and are not needed here).
fn before_mac_caching(kver: &str, boots: Vec<(String, Vec<String>)>) -> Vec<(String, Vec<String>)> {
    println!(
        "Linux {kver} predates 5.13, whose flowtable caches the destination MAC on bridge \
         ports: the lab checks that the bug is absent here (the `none` roles of the \
         announcing scenarios must recover by themselves) and runs no flowguard role."
    );
    boots
        .into_iter()
        .filter(|(name, _)| REPRODUCING.contains(&name.as_str()))
        .map(|(name, _)| {
            let case = format!("{name}:none");
            (name, vec![case])
        })
        .collect()
}

/// The VM boots to run: (name, ["scenario:role", ...]), one scenario per boot.
fn plan(args: &LabArgs) -> Result<Vec<(String, Vec<String>)>> {
    if args.arch != LabArch::Amd64 && args.only.is_none() {
        let cases = FOREIGN_ROLES.iter().map(|r| format!("blog:{r}")).collect();
        return Ok(vec![("blog".to_string(), cases)]);
    }
    let mut scenarios: Vec<&str> = if args.quick {
        vec!["blog", CONTROL]
    } else {
        REPRODUCING
            .iter()
            .copied()
            .chain([SILENT, CONTROL, ROAM, ROAM_SILENT])
            .collect()
    };
    if let Some(only) = &args.only {
        if !REPRODUCING.contains(&only.as_str())
            && ![CONTROL, SILENT, ROAM, ROAM_SILENT].contains(&only.as_str())
        {
            bail!(
                "unknown scenario {only:?}: choose blog, routed, vlan, silent, control, roam \
                 or roam-silent"
            );
        }
        scenarios = vec![only.as_str()];
    }
    Ok(scenarios
        .into_iter()
        .map(|s| {
            let roles = if s == CONTROL && args.quick {
                QUICK_CONTROL_ROLES
            } else if s == CONTROL {
                CONTROL_ROLES
            } else if s == SILENT && args.quick {
                QUICK_SILENT_ROLES
            } else if s == ROAM || s == ROAM_SILENT {
                ROAM_ROLES
            } else if args.quick {
                QUICK_ROLES
            } else if s == "blog" {
                BLOG_ROLES
            } else {
                FULL_ROLES
            };
            let mut cases: Vec<String> = roles.iter().map(|r| format!("{s}:{r}")).collect();
            // One boot fewer in CI: the quick silent and roam cases ride with blog.
            if s == "blog" && args.quick && args.only.is_none() {
                cases.extend(QUICK_SILENT_ROLES.iter().map(|r| format!("{SILENT}:{r}")));
                cases.push(QUICK_ROAM.to_string());
            }
            (s.to_string(), cases)
        })
        .collect())
}

fn lab_dir() -> PathBuf {
    step::workspace_root().join("lab")
}

fn ensure_host_packages(arch: LabArch) -> Result<()> {
    let packages: Vec<&str> = match arch {
        LabArch::Amd64 => HOST_PACKAGES.to_vec(),
        LabArch::Arm64 => [&["qemu-system-arm"][..], HOST_PACKAGES_FOREIGN].concat(),
        LabArch::S390x => [&["qemu-system-misc"][..], HOST_PACKAGES_FOREIGN].concat(),
    };
    let missing: Vec<&str> = packages
        .into_iter()
        .filter(|p| {
            step::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)
}

/// apt-get, retried while another apt holds the lock (up to ~5 minutes).
fn apt(args: &[&str]) -> Result<()> {
    for attempt in 1..=30 {
        println!("==> apt-get {}", args.join(" "));
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("could not start apt-get")?;
        if status.success() {
            return Ok(());
        }
        eprintln!("apt-get failed (attempt {attempt}); retrying in 10 s");
        std::thread::sleep(std::time::Duration::from_secs(10));
    }
    bail!("apt-get {} kept failing", args.join(" "))
}

/// Downloads and unpacks the kernel (or unpacks --kernel-deb); returns its root.
fn fetch_kernel(args: &LabArgs) -> Result<PathBuf> {
    let mut command = Command::new(lab_dir().join("fetch-kernel.sh"));
    match &args.kernel_deb {
        Some(deb) => command.arg("--deb").arg(deb),
        None if args.arch != LabArch::Amd64 => command
            .args(["--arch", args.arch.debian()])
            .arg(&args.suite),
        None => command.arg(&args.suite),
    };
    command.arg(&args.cache);
    println!("==> Fetching the kernel ({})", step::display(&command));
    let mut out = stdout_of(&mut command);
    if out.is_none()
        && args.kernel_deb.is_none()
        && args.suite == "bookworm"
        && args.arch == LabArch::Amd64
    {
        // The host's apt lists may be missing or out of date.
        apt(&["update", "-q"])?;
        out = stdout_of(&mut command);
    }
    let out = out.context("fetching the kernel failed; see the messages above")?;
    let root = out
        .lines()
        .last()
        .map(PathBuf::from)
        .context("fetch-kernel.sh printed no path")?;
    Ok(root)
}

/// Downloads and unpacks the foreign architecture's tools for the VM (see
/// lab/fetch-userland.sh); returns their directory.
fn fetch_userland(args: &LabArgs) -> Result<PathBuf> {
    let mut command = Command::new(lab_dir().join("fetch-userland.sh"));
    command
        .arg(args.arch.debian())
        .arg(&args.suite)
        .arg(&args.cache);
    println!(
        "==> Fetching the VM's {} tools ({})",
        args.arch.debian(),
        step::display(&command)
    );
    let out =
        stdout_of(&mut command).context("fetching the tools failed; see the messages above")?;
    out.lines()
        .last()
        .map(PathBuf::from)
        .context("fetch-userland.sh printed no path")
}

/// The kernel version and the path of its image inside an unpacked package.
fn kernel_image(kroot: &Path) -> Result<(String, PathBuf)> {
    let modroot = [kroot.join("lib/modules"), kroot.join("usr/lib/modules")]
        .into_iter()
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules in {}", kroot.display()))?;
    let kver = fs::read_dir(&modroot)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{} is empty", modroot.display()))?;
    let image = [
        kroot.join(format!("boot/vmlinuz-{kver}")),
        modroot.join(&kver).join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz for {kver} in {}", kroot.display()))?;
    Ok((kver, image))
}

/// KVM only with a hardware KVM module: some sandboxes expose a /dev/kvm
/// (kvm_pvm) that cannot run stock kernels.
fn use_kvm() -> bool {
    let hardware =
        Path::new("/sys/module/kvm_intel").is_dir() || Path::new("/sys/module/kvm_amd").is_dir();
    hardware
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// One LABRESULT line: its key=value pairs.
#[derive(Default, Debug)]
struct CaseResult(BTreeMap<String, String>);

impl CaseResult {
    fn parse(line: &str) -> Self {
        Self(
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn insert(&mut self, key: &str, value: &str) {
        self.0.insert(key.to_string(), value.to_string());
    }
    fn num(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(|v| v.parse().ok())
    }
}

/// Runs `command` with stderr shown, returns its stdout if it succeeded.
fn stdout_of(command: &mut Command) -> Option<String> {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Boots the VM for `cases`, copies its console to `log`, echoes the
/// progress lines and returns the parsed LABRESULT lines.
fn boot(
    args: &LabArgs,
    kernel: &Path,
    initramfs: &Path,
    cases: &[String],
    log: &Path,
) -> Result<Vec<CaseResult>> {
    let (arch, window, interval) = (args.arch, args.window, args.interval_ms);
    let kvm = arch == LabArch::Amd64 && use_kvm();
    let timeout = 90 + 150 * cases.len();
    let mut command = Command::new("timeout");
    command.arg(timeout.to_string());
    let console = match arch {
        LabArch::Amd64 => {
            command
                .arg("qemu-system-x86_64")
                .args([
                    "-machine",
                    if kvm {
                        "q35,accel=kvm"
                    } else {
                        "q35,accel=tcg"
                    },
                ])
                .args(["-cpu", if kvm { "host" } else { "max" }]);
            "ttyS0"
        }
        // cortex-a72 rather than max: TCG emulates max's pointer
        // authentication at a cost on every call and return.
        LabArch::Arm64 => {
            command.arg("qemu-system-aarch64").args([
                "-machine",
                "virt,accel=tcg",
                "-cpu",
                "cortex-a72",
            ]);
            "ttyAMA0"
        }
        // -serial is the SCLP VT220 console on this machine.
        LabArch::S390x => {
            command
                .arg("qemu-system-s390x")
                .args(["-machine", "s390-ccw-virtio,accel=tcg"]);
            "ttysclp0"
        }
    };
    command
        .args(["-smp", "2", "-m", "1024"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!(
            "console={console} quiet loglevel=4 panic=-1 lab.cases={} lab.window={window} \
             lab.interval_ms={interval}",
            cases.join(",")
        ))
        .args(["-nic", "none", "-display", "none", "-serial", "stdio"])
        .args(["-monitor", "none", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    println!(
        "==> Booting the VM ({}) for {}; console in {}",
        if kvm { "KVM" } else { "TCG" },
        cases.join(" "),
        log.display()
    );
    let mut child = command
        .spawn()
        .with_context(|| format!("could not start {}", step::display(&command)))?;
    let mut file = fs::File::create(log)?;
    let mut reader = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut results: Vec<CaseResult> = Vec::new();
    let mut notes: Vec<(String, String)> = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        file.write_all(&buf)?;
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(rest) = line.strip_prefix("LABRESULT ") {
            let mut result = CaseResult::parse(rest);
            let case = format!(
                "scenario={} role={} ",
                result.get("scenario").unwrap_or("?"),
                result.get("role").unwrap_or("?")
            );
            let note: Vec<&str> = notes
                .iter()
                .filter_map(|(c, n)| (*c == case).then_some(n.as_str()))
                .collect();
            if !note.is_empty() {
                result.insert("note", &note.join("; "));
            }
            println!("    {}", one_line(&result));
            results.push(result);
        } else if line.starts_with("===== LABCASE") {
            println!("  {}", line.trim_start_matches("===== "));
        } else if let Some(rest) = line.strip_prefix("LABNOTE ") {
            println!("    {line}");
            // "scenario=S role=R free text"
            let mut parts = rest.splitn(3, ' ');
            if let (Some(s), Some(r), Some(text)) = (parts.next(), parts.next(), parts.next()) {
                notes.push((format!("{s} {r} "), text.to_string()));
            }
        } else if line.starts_with("LABINIT") || line.contains("Kernel panic") {
            println!("    {line}");
        }
    }
    let status = child.wait()?;
    if status.code() == Some(124) {
        println!("    the VM timed out after {timeout} s");
    }
    Ok(results)
}

fn one_line(r: &CaseResult) -> String {
    format!(
        "{}/{}: received {} of {} after the change, recovery {} ms, stale {}, rewritten {}, evicted {}, \
         wrong port {}, redirected {}, port moves {}",
        r.get("scenario").unwrap_or("?"),
        r.get("role").unwrap_or("?"),
        r.get("received_after").unwrap_or("?"),
        r.get("sent_after").unwrap_or("?"),
        r.get("recovery_ms").unwrap_or("?"),
        r.get("stale").unwrap_or("?"),
        r.get("rewritten").unwrap_or("?"),
        r.get("evicted").unwrap_or("?"),
        r.get("wrong_port").unwrap_or("?"),
        r.get("redirected").unwrap_or("?"),
        r.get("port_moves").unwrap_or("?"),
    )
}

/// What a case must show; the reasons it does not.
fn check(r: &CaseResult, caches: bool) -> Vec<String> {
    let mut why = Vec::new();
    let scenario = r.get("scenario").unwrap_or("?");
    let role = r.get("role").unwrap_or("?");
    if r.get("setup") != Some("ok") {
        why.push(format!("setup: {}", r.get("setup").unwrap_or("?")));
        return why;
    }
    if scenario == ROAM || scenario == ROAM_SILENT {
        return check_roam(r, scenario == ROAM_SILENT);
    }
    let control = scenario == CONTROL;
    let silent = scenario == SILENT;
    let num = |k: &str| r.num(k);
    let mut expect = |ok: bool, what: &str| {
        if !ok {
            why.push(what.to_string());
        }
    };
    // The premise of every case: the flow was offloaded, the router learned the new MAC.
    if !control {
        expect(
            num("offload_before") == Some(1),
            "flow not [OFFLOAD] before the change",
        );
    }
    // A silent container tells the router nothing: without flowguard's
    // router role nothing makes the router learn its new MAC.
    if !silent || matches!(role, "router" | "observe") {
        expect(
            num("neigh_new") == Some(1),
            "router's neighbour table did not learn the new MAC",
        );
    }
    expect(
        num("sent_after").unwrap_or(0) >= 10,
        "too few packets sent after the change",
    );
    if !matches!(role, "none" | "ctdel") {
        if r.get("fg") != Some("ready") {
            why.push(format!(
                "flowguard did not start ({})",
                r.get("note").unwrap_or("see the log")
            ));
            return why;
        }
        expect(
            num("fg_rc") == Some(0),
            "flowguard did not exit 0 on SIGTERM",
        );
    }
    let received = num("received_after").unwrap_or(0);
    let recovery = num("recovery_ms").unwrap_or(-1);
    let stale = num("stale");
    let evicted = num("evicted").unwrap_or(0); // a missing counter counts as 0
    let recovered_within = |limit: i64| received > 0 && (0..=limit).contains(&recovery);
    match (control, role) {
        (false, "host") if silent => {
            expect(
                received > 0 && num("lost").is_some_and(|l| l <= SILENT_HOST_MAX_LOST),
                &format!(
                    "more than {SILENT_HOST_MAX_LOST} packet lost after the silent container's address was up"
                ),
            );
            expect(stale.unwrap_or(0) > 0, "no stale frames counted");
            expect(num("rewritten").unwrap_or(0) > 0, "nothing rewritten");
            expect(evicted == 0, "the host role evicted something");
        }
        (false, "restart") => {
            expect(
                recovered_within(FIX_RECOVERY_MS),
                &format!("no recovery within {FIX_RECOVERY_MS} ms"),
            );
            expect(num("rewritten").unwrap_or(0) > 0, "nothing rewritten");
            expect(evicted == 0, "the host role evicted something");
            expect(
                num("lost_restart") == Some(0),
                "packets lost while flowguard was killed and started again",
            );
        }
        (false, "none") if !caches => expect(
            recovered_within(FIX_RECOVERY_MS),
            &format!(
                "the bug reproduced on a kernel before 5.13: no delivery to the recreated \
                 container within {FIX_RECOVERY_MS} ms"
            ),
        ),
        (false, "none") => expect(
            received == 0,
            "the bug did not reproduce: the recreated container received packets",
        ),
        (true, "none") => expect(
            recovered_within(FIX_RECOVERY_MS),
            "no delivery to the recreated container",
        ),
        (true, _) => {
            expect(
                recovered_within(FIX_RECOVERY_MS),
                "no delivery to the recreated container",
            );
            if role == "host" {
                // The host knows the new MAC at once (its macvlan child); a
                // frame or two the router sends before its own neighbour
                // entry catches up is ordinary neighbour lag, and rewriting
                // it is right. What must not happen in the control is a
                // stale stream: none in the last 3 s.
                expect(
                    num("stale_late") == Some(0),
                    "stale frames still counted at the end of the control",
                );
            } else {
                expect(stale == Some(0), "stale frames counted in the control");
            }
        }
        (false, "host") => {
            expect(
                recovered_within(FIX_RECOVERY_MS),
                &format!("no recovery within {FIX_RECOVERY_MS} ms"),
            );
            expect(stale.unwrap_or(0) > 0, "no stale frames counted");
            expect(num("rewritten").unwrap_or(0) > 0, "nothing rewritten");
            expect(evicted == 0, "the host role evicted something");
            expect(
                num("main_replaced") == Some(0),
                "the router's conntrack entry changed although the router was untouched",
            );
        }
        (false, "router" | "observe" | "ctdel") => {
            let limit = if silent {
                SILENT_RECOVERY_MS
            } else if role == "observe" {
                OBSERVE_RECOVERY_MS
            } else {
                FIX_RECOVERY_MS
            };
            expect(
                recovered_within(limit),
                &format!("no recovery within {limit} ms"),
            );
            if role != "ctdel" {
                expect(evicted >= 1, "nothing evicted");
                expect(
                    num("stale_late") == Some(0),
                    "stale frames still counted at the end (flowtable still uses the old MAC)",
                );
            }
            expect(
                num("main_replaced") == Some(1),
                "the stale [OFFLOAD] conntrack entry was not deleted",
            );
            expect(
                num("reoffloaded") == Some(1),
                "the new conntrack entry was not offloaded again",
            );
            // The silent scenario has no second flow to the container's IP.
            if !silent {
                expect(
                    num("nonoff_kept") == Some(1),
                    "a non-offloaded entry of the same IP was deleted (OFFLOAD filter)",
                );
            }
            expect(
                num("other_kept") == Some(1),
                "another endpoint's offloaded entry was deleted",
            );
            if role == "observe" {
                expect(
                    num("rewritten").unwrap_or(0) == 0,
                    "observe mode rewrote frames",
                );
            }
        }
        _ => expect(false, "unknown role"),
    }
    why
}

/// What a roam case must show (the endpoint kept its IP and MAC and moved
/// from behind lan1 to behind lan2); the reasons it does not.
fn check_roam(r: &CaseResult, silent: bool) -> Vec<String> {
    let mut why = Vec::new();
    let role = r.get("role").unwrap_or("?");
    let num = |k: &str| r.num(k);
    let mut expect = |ok: bool, what: &str| {
        if !ok {
            why.push(what.to_string());
        }
    };
    // The premise: the flow was offloaded while the bridge had the endpoint
    // behind lan1.
    expect(
        num("offload_before") == Some(1),
        "flow not [OFFLOAD] before the move",
    );
    expect(
        r.get("fdb_before") == Some("lan1"),
        "br-lan's FDB did not have the endpoint behind lan1 before the move",
    );
    expect(
        num("sent_after").unwrap_or(0) >= 10,
        "too few packets sent after the move",
    );
    // The announcing endpoint tells the bridge where it is now; the silent
    // one only through flowguard's probes (the none role has none).
    if !silent || role != "none" {
        expect(
            num("fdb_moved") == Some(1),
            "br-lan's FDB did not learn that the endpoint is behind lan2",
        );
    }
    if role != "none" {
        if r.get("fg") != Some("ready") {
            why.push(format!(
                "flowguard did not start ({})",
                r.get("note").unwrap_or("see the log")
            ));
            return why;
        }
        expect(
            num("fg_rc") == Some(0),
            "flowguard did not exit 0 on SIGTERM",
        );
    }
    let received = num("received_after").unwrap_or(0);
    let recovery = num("recovery_ms").unwrap_or(-1);
    let recovered_within = |limit: i64| received > 0 && (0..=limit).contains(&recovery);
    match role {
        "none" => {
            expect(
                received == 0,
                "the bug did not reproduce: the moved endpoint received packets",
            );
            expect(
                num("offload_after") == Some(1) && num("main_replaced") == Some(0),
                "the stale entry did not stay [OFFLOAD]",
            );
        }
        "router" | "observe" => {
            if silent {
                expect(
                    recovered_within(SILENT_RECOVERY_MS),
                    &format!("no recovery within {SILENT_RECOVERY_MS} ms"),
                );
            } else if role == "router" {
                expect(
                    received > 0 && num("lost").is_some_and(|l| l <= ROAM_FIX_MAX_LOST),
                    &format!("more than {ROAM_FIX_MAX_LOST} packet lost after the move"),
                );
            } else {
                expect(
                    recovered_within(OBSERVE_RECOVERY_MS),
                    &format!("no recovery within {OBSERVE_RECOVERY_MS} ms"),
                );
            }
            expect(num("port_moves").unwrap_or(0) >= 1, "no port move seen");
            expect(num("evicted").unwrap_or(0) >= 1, "nothing evicted");
            expect(
                num("wrong_port_late") == Some(0),
                "frames still left through the old port at the end (flowtable still uses lan1)",
            );
            expect(
                num("main_replaced") == Some(1),
                "the stale [OFFLOAD] conntrack entry was not deleted",
            );
            expect(
                num("reoffloaded") == Some(1),
                "the new conntrack entry was not offloaded again",
            );
            if !silent {
                expect(
                    num("nonoff_kept") == Some(1),
                    "a non-offloaded entry of the same IP was deleted (OFFLOAD filter)",
                );
            }
            expect(
                num("other_kept") == Some(1),
                "another endpoint's offloaded entry was deleted",
            );
            if role == "observe" {
                expect(
                    num("redirected").unwrap_or(0) == 0 && num("rewritten").unwrap_or(0) == 0,
                    "observe mode redirected or rewrote frames",
                );
            }
        }
        _ => expect(false, "unknown role"),
    }
    why
}

/// Prints the table and the reasons for failures; returns how many failed.
fn report(results: &[CaseResult], caches: bool) -> usize {
    let dash = |v: Option<&str>| v.unwrap_or("-").to_string();
    println!();
    println!(
        "{:<11} {:<8} {:>13} {:>9} {:>6} {:>9} {:>7} {:>14} {:>6} {:>13}  result",
        "scenario",
        "role",
        "lost after",
        "recovery",
        "stale",
        "rewritten",
        "evicted",
        "wrong/redir/mv",
        "case",
        "fg rss/peak"
    );
    let mut failures = 0;
    let mut reasons = Vec::new();
    for r in results {
        let why = check(r, caches);
        let lost = match (r.num("lost"), r.num("sent_after")) {
            (Some(l), Some(s)) => format!("{l} of {s}"),
            _ => "-".into(),
        };
        let recovery = match r.num("recovery_ms") {
            Some(ms) if ms >= 0 => format!("{ms} ms"),
            Some(_) => "never".into(),
            None => "-".into(),
        };
        let evicted = match (r.get("role"), r.get("evicted")) {
            (Some("none"), _) => "-".into(),
            (_, Some(v)) => v.to_string(),
            _ => "-".into(),
        };
        // flowguard's VmRSS / VmHWM at the end of the case
        let memory = match (r.num("rss_kb"), r.num("hwm_kb")) {
            (Some(rss), Some(hwm)) => {
                format!("{:.1}/{:.1} MB", rss as f64 / 1024.0, hwm as f64 / 1024.0)
            }
            _ => "-".into(),
        };
        // frames out of a wrong port, of those redirected; port moves seen
        let ports = match (
            r.num("wrong_port"),
            r.num("redirected"),
            r.num("port_moves"),
        ) {
            (Some(w), Some(d), Some(m)) => format!("{w}/{d}/{m}"),
            _ => "-".into(),
        };
        let scenario = dash(r.get("scenario"));
        let role = dash(r.get("role"));
        println!(
            "{:<11} {:<8} {:>13} {:>9} {:>6} {:>9} {:>7} {:>14} {:>6} {:>13}  {}",
            scenario,
            role,
            lost,
            recovery,
            dash(r.get("stale")),
            dash(r.get("rewritten")),
            evicted,
            ports,
            r.get("secs").map_or("-".into(), |s| format!("{s} s")),
            memory,
            if why.is_empty() { "ok" } else { "FAIL" }
        );
        if !why.is_empty() {
            failures += 1;
            reasons.push(format!("{scenario}/{role}: {}", why.join("; ")));
        }
    }
    if !reasons.is_empty() {
        println!();
        for reason in reasons {
            println!("FAIL {reason}");
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{caches_macs, plan, quick_args};

    #[test]
    fn quick_runs_roam_in_the_router_role_with_blog() {
        let boots = plan(&quick_args(PathBuf::new())).unwrap();
        let names: Vec<&str> = boots.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["blog", "control"]);
        assert!(boots[0].1.iter().any(|c| c == "roam:router"));
        assert!(!boots[0].1.iter().any(|c| c == "roam:none"));
    }

    #[test]
    fn only_roam_runs_its_roles_in_one_boot() {
        for scenario in ["roam", "roam-silent"] {
            let mut args = quick_args(PathBuf::new());
            args.quick = false;
            args.only = Some(scenario.into());
            let boots = plan(&args).unwrap();
            let cases: Vec<String> = ["none", "router", "observe"]
                .iter()
                .map(|r| format!("{scenario}:{r}"))
                .collect();
            assert_eq!(boots, [(scenario.to_string(), cases)]);
        }
    }

    #[test]
    fn the_flowtable_caches_macs_from_5_13() {
        for (kver, caches) in [
            ("5.10.0-35-amd64", false),
            ("5.12.19", false),
            ("5.13.0", true),
            ("6.1.0-57-arm64", true),
            ("6.12.117+deb13-amd64", true),
            ("7.2.0-1-amd64", true),
            ("unreadable", true),
        ] {
            assert_eq!(caches_macs(kver), caches, "{kver}");
        }
    }
}
