//! `flowguard doctor`: reads the nftables ruleset, the interfaces, the kernel
//! and conntrack, and says whether this machine's flowtable setup can cache
//! destination MACs, whether flowguard can run here, and how many flows are
//! offloaded now.
//!
//! [`gather`] collects the facts (commands, syscalls, ctnetlink, pinned
//! maps); [`diagnose`] turns them into verdicts without touching the system,
//! so that every decision is testable without root.

use std::{collections::BTreeMap, fmt::Write as _, io, path::Path, process::Command};

use aya::util::KernelVersion;
use serde::Serialize;
use serde_json::Value;

use crate::{
    conntrack::{Conntrack, Flow, IPS_HW_OFFLOAD},
    flowtable::{self, DeviceRole, Flowtable},
    status::{self, Status, StatusError},
    sys,
};

/// Where flowguard pins its maps by default; must be on a bpffs.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The kernel's own BTF, which bpftool and CO-RE loaders read.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The oldest kernel flowguard's programs load on: they call
/// `bpf_ktime_get_coarse_ns`.
const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 11, 0);
/// From this kernel on, tc programs attach with TCX instead of clsact.
const TCX_KERNEL: KernelVersion = KernelVersion::new(6, 6, 0);
/// From this kernel on, a flowtable whose devices are bridge ports caches
/// the destination MAC: Linux 5.13's commit 7a27f6ab4135 ("netfilter:
/// flowtable: use dev_fill_forward_path() to obtain egress device") added
/// the direct transmit path (`FLOW_OFFLOAD_XMIT_DIRECT`), which resolves the
/// path through the bridge once and keeps `h_dest` in the flow. Before it,
/// the flowtable transmits through the neighbour table for every packet
/// (the lab: Debian's 5.10 delivers to the new MAC, 6.1 does not). OpenWrt
/// backported the series to its 5.10 kernels (22.03:
/// `610-v5.13-19-netfilter-flowtable-use-dev_fill_forward_path-to-obt.patch`).
pub const MAC_CACHING_KERNEL: KernelVersion = KernelVersion::new(5, 13, 0);
/// What [`MAC_CACHING_KERNEL`] means, for messages.
const MAC_CACHING_WHY: &str = "flowtables cache destination MACs on bridge ports from Linux 5.13 \
     (commit 7a27f6ab4135, the direct transmit path)";

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Info,
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Info => "info",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

/// One line of the diagnosis: what was checked, how it came out, and a
/// sentence saying what that means and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `privileges`, `bpffs`, `kernel`, `btf`, `nftables`, `flowtable`,
    /// `conntrack` or `flowguard`.
    pub check: &'static str,
    pub verdict: Verdict,
    pub message: String,
    /// Further lines (a flowtable's devices).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl Check {
    fn new(check: &'static str, verdict: Verdict, message: impl Into<String>) -> Self {
        Self {
            check,
            verdict,
            message: one_line(&message.into()),
            details: Vec::new(),
        }
    }

    fn with_details(mut self, details: impl IntoIterator<Item = String>) -> Self {
        self.details.extend(details);
        self
    }
}

/// Tools' error messages may span lines (`nft` prints two): one line per
/// check keeps the output readable and greppable.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join("; ")
}

/// What a flowtable device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A port of a bridge: the flowtable resolves the path through the
    /// bridge once and caches the destination MAC.
    BridgePort,
    /// A bridge device itself: neighbours are resolved per packet.
    Bridge,
    /// Neither: neighbours are resolved per packet.
    Plain,
    /// `ip link` could not tell (the device does not exist here, ...).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceReport {
    pub name: String,
    pub role: Role,
    /// The bridge a bridge port belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Why the role is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DeviceReport {
    fn describe(&self) -> String {
        match self.role {
            Role::BridgePort => format!(
                "{}: port of bridge {} (caches destination MACs)",
                self.name,
                self.bridge.as_deref().unwrap_or("?")
            ),
            Role::Bridge => format!("{}: a bridge (no MAC caching)", self.name),
            Role::Plain => format!("{}: a plain device (no MAC caching)", self.name),
            Role::Unknown => format!(
                "{}: unknown ({})",
                self.name,
                self.error.as_deref().unwrap_or("no answer")
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowtableReport {
    pub family: String,
    pub table: String,
    pub name: String,
    /// `flags offload`: hardware offload.
    pub hw_offload: bool,
    pub devices: Vec<DeviceReport>,
    /// Whether this flowtable can send to a stale MAC: a device is a bridge
    /// port, or the flows go to hardware.
    pub caches_macs: bool,
}

/// Conntrack entries counted by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConntrackCounts {
    pub entries: u64,
    /// In a flowtable now (`OFFLOAD` or `HW_OFFLOAD`): the entries that can
    /// carry a stale MAC.
    pub offloaded: u64,
    /// Offloaded to hardware (`HW_OFFLOAD`).
    pub hw_offloaded: u64,
}

impl ConntrackCounts {
    pub fn of(flows: &[Flow]) -> Self {
        let mut c = Self::default();
        for f in flows {
            c.entries += 1;
            c.offloaded += u64::from(f.is_offloaded());
            c.hw_offloaded += u64::from(f.status & IPS_HW_OFFLOAD != 0);
        }
        c
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConntrackReport {
    pub reachable: bool,
    #[serde(flatten)]
    pub counts: Option<ConntrackCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelReport {
    /// `major.minor.patch`, when it could be read.
    pub version: Option<String>,
    /// tc programs attach with TCX (6.6+); else through a clsact qdisc.
    pub tcx: bool,
    /// `bpf_ktime_get_coarse_ns` (5.11+), which flowguard's programs need.
    pub coarse_clock: bool,
    /// The kernel's BTF at /sys/kernel/btf/vmlinux.
    pub btf: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowguardReport {
    pub pin_dir: String,
    pub running: bool,
    /// `fix` or `observe`, when running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// The whole diagnosis, as `flowguard doctor --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub kernel: KernelReport,
    /// `nft --version`, when nft runs.
    pub nft: Option<String>,
    /// `None` when the ruleset could not be read.
    pub flowtables: Option<Vec<FlowtableReport>>,
    pub conntrack: ConntrackReport,
    pub flowguard: FlowguardReport,
    /// Whether a check failed (the exit code is 1 then).
    pub failed: bool,
}

impl Report {
    /// 1 when a check failed, else 0.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.failed)
    }
}

/// Whether a flowguard runs at the pin directory.
#[derive(Debug, Clone)]
pub enum Running {
    Yes(Box<Status>),
    No,
    /// Pins left by an instance that is gone.
    Dead(Box<Status>),
    /// Cannot tell; the sentence says why.
    Unknown(String),
}

/// Everything the doctor reads from the system, before any judgement.
#[derive(Debug, Clone)]
pub struct Facts {
    /// From [`sys::missing_capabilities`].
    pub missing_caps: Vec<String>,
    /// Whether /sys/fs/bpf is a bpffs.
    pub bpffs: bool,
    pub kernel: Result<KernelVersion, String>,
    pub btf: bool,
    /// `nft --version`, or why nft does not run.
    pub nft: Result<String, String>,
    /// `nft -j list flowtables`, parsed, or why it could not be read.
    pub flowtables: Result<Vec<Flowtable>, String>,
    /// What each flowtable device is, or why `ip link` could not tell.
    pub devices: BTreeMap<String, Result<DeviceRole, String>>,
    pub conntrack: Result<ConntrackCounts, String>,
    pub pin_dir: String,
    pub flowguard: Running,
    /// Whether the router role's probe sockets (ARP, ICMPv6) can be opened,
    /// or why not.
    pub probing: Result<(), String>,
    /// Whether cls_bpf (tc's BPF classifier) is there: tc needs it below 6.6.
    pub cls_bpf: ModuleState,
    /// Which package manager installs kernel modules here (OpenWrt).
    pub packages: PackageManager,
    /// fw4's offload settings from `uci`, when uci answers.
    pub fw4: Option<Fw4Offload>,
}

/// Whether a kernel module is loaded, built in or installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleState {
    Present,
    Missing,
    /// No module directory for the running kernel to look in.
    Unknown,
}

/// The package manager that installs OpenWrt's kmods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageManager {
    /// OpenWrt up to 24.10.
    Opkg,
    /// OpenWrt 25.12 on.
    Apk,
    Other,
}

/// fw4's `firewall.@defaults[0].flow_offloading` and `flow_offloading_hw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fw4Offload {
    pub software: bool,
    pub hardware: bool,
}

/// cls_bpf is loaded (/sys/module), built in (modules.builtin) or
/// installed (a cls_bpf.ko under /lib/modules/<release>, where OpenWrt's
/// kmod-sched-bpf puts it flat and Debian under kernel/net/sched).
fn cls_bpf_state() -> ModuleState {
    if Path::new("/sys/module/cls_bpf").exists() {
        return ModuleState::Present;
    }
    let Some(release) = sys::kernel_release() else {
        return ModuleState::Unknown;
    };
    let dir = Path::new("/lib/modules").join(release);
    if !dir.is_dir() {
        return ModuleState::Unknown;
    }
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    if builtin.lines().any(|l| l.ends_with("/cls_bpf.ko")) {
        return ModuleState::Present;
    }
    let installed = [
        dir.join("cls_bpf.ko"),
        dir.join("kernel/net/sched/cls_bpf.ko"),
    ]
    .iter()
    .any(|p| {
        p.exists() || p.with_extension("ko.xz").exists() || p.with_extension("ko.zst").exists()
    });
    if installed {
        ModuleState::Present
    } else {
        ModuleState::Missing
    }
}

fn package_manager() -> PackageManager {
    if Path::new("/bin/opkg").exists() || Path::new("/usr/bin/opkg").exists() {
        PackageManager::Opkg
    } else if Path::new("/etc/openwrt_release").exists() && Path::new("/usr/bin/apk").exists() {
        PackageManager::Apk
    } else {
        PackageManager::Other
    }
}

/// fw4's offload options, or `None` where uci does not run (not OpenWrt).
fn fw4_offload() -> Option<Fw4Offload> {
    let get = |option: &str| -> Option<Option<String>> {
        let out = Command::new("uci")
            .args(["-q", "get", &format!("firewall.@defaults[0].{option}")])
            .output()
            .ok()?;
        // uci exits 1 for an unset option: that is "off", not "no uci".
        Some(
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned()),
        )
    };
    let software = get("flow_offloading")?;
    let hardware = get("flow_offloading_hw")?;
    Some(Fw4Offload {
        software: software.as_deref().is_some_and(uci_bool),
        hardware: hardware.as_deref().is_some_and(uci_bool),
    })
}

/// UCI's booleans: 1, on, true, yes, enabled.
pub fn uci_bool(value: &str) -> bool {
    matches!(value.trim(), "1" | "on" | "true" | "yes" | "enabled")
}

/// Reads the facts of the current network namespace (and the host's mount
/// namespace): privileges, bpffs, kernel, nftables, the flowtables' devices,
/// conntrack, and a flowguard pinned at `pin_dir`.
pub fn gather(pin_dir: &Path) -> Facts {
    let nft = nft_version();
    let flowtables = match &nft {
        Ok(_) => flowtable::flowtables().map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    let mut devices = BTreeMap::new();
    for t in flowtables.iter().flatten() {
        for d in &t.devices {
            devices
                .entry(d.clone())
                .or_insert_with(|| flowtable::device_role(d).map_err(|e| e.to_string()));
        }
    }
    let conntrack = Conntrack::open()
        .and_then(|mut ct| ct.all_flows())
        .map(|flows| ConntrackCounts::of(&flows))
        .map_err(|e| e.to_string());
    Facts {
        missing_caps: sys::missing_capabilities()
            .into_iter()
            .map(str::to_string)
            .collect(),
        bpffs: sys::is_on_bpffs(Path::new(BPFFS)),
        kernel: KernelVersion::current().map_err(|e| e.to_string()),
        btf: Path::new(VMLINUX_BTF).exists(),
        nft,
        flowtables,
        devices,
        conntrack,
        probing: crate::probe::sockets_available(),
        pin_dir: pin_dir.display().to_string(),
        flowguard: running(pin_dir),
        cls_bpf: cls_bpf_state(),
        packages: package_manager(),
        fw4: fw4_offload(),
    }
}

fn nft_version() -> Result<String, String> {
    match Command::new("nft").arg("--version").output() {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Ok(out) => Err(format!(
            "`nft --version` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err("nft is not installed (Debian: apt install nftables)".to_string())
        }
        Err(e) => Err(format!("cannot run nft: {e}")),
    }
}

fn running(pin_dir: &Path) -> Running {
    // A directory we may not search looks absent to `status::read`: ask first.
    if let Err(e) = std::fs::metadata(pin_dir) {
        if e.kind() == io::ErrorKind::PermissionDenied {
            return Running::Unknown(format!(
                "cannot look into {} ({e}): run doctor as root to see whether flowguard runs",
                pin_dir.display()
            ));
        }
    }
    match status::read(pin_dir) {
        Ok(st) if !st.running => Running::Dead(Box::new(st)),
        Ok(st) => Running::Yes(Box::new(st)),
        Err(StatusError::NotRunning(_)) => Running::No,
        Err(e) => Running::Unknown(e.to_string()),
    }
}

/// Parses `nft -j list flowtables` and the `ip -j -d link show dev D` answer
/// of each device (missing answers mean the device is unknown). For tests and
/// for diagnosing saved output.
pub fn facts_from_json(
    flowtables: &Value,
    links: &[(&str, Value)],
) -> (Vec<Flowtable>, BTreeMap<String, Result<DeviceRole, String>>) {
    let tables = flowtable::parse_flowtables(flowtables);
    let mut devices = BTreeMap::new();
    for t in &tables {
        for d in &t.devices {
            let role = links
                .iter()
                .find(|(name, _)| name == d)
                .map(|(name, v)| flowtable::parse_device(name, v))
                .ok_or_else(|| format!("Device \"{d}\" does not exist."));
            devices.insert(d.clone(), role);
        }
    }
    (tables, devices)
}

/// Turns the facts into verdicts. Touches nothing.
pub fn diagnose(f: &Facts) -> Report {
    let mut checks = vec![privileges(&f.missing_caps), bpffs(f.bpffs)];
    checks.push(kernel(&f.kernel, f.packages));
    checks.extend(tc_module(&f.kernel, f.cls_bpf, f.packages));
    checks.push(btf(f.btf));
    checks.extend(f.fw4.map(fw4_check));
    checks.push(nftables(&f.nft));
    let kernel_caches = kernel_caches_macs(&f.kernel, f.packages);
    let flowtables = match &f.flowtables {
        Ok(tables) => {
            let reports: Vec<FlowtableReport> = tables
                .iter()
                .map(|t| flowtable_report(t, &f.devices, kernel_caches))
                .collect();
            let guarded = match &f.flowguard {
                Running::Yes(st) => Some(
                    st.interfaces
                        .iter()
                        .filter(|i| i.attached && i.hook == "tc")
                        .map(|i| i.name.clone())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            };
            checks.extend(flowtable_checks(&reports, kernel_caches));
            checks.extend(
                reports
                    .iter()
                    .filter_map(|t| roaming_check(t, kernel_caches, guarded.as_deref())),
            );
            Some(reports)
        }
        Err(e) => {
            checks.push(Check::new(
                "flowtable",
                Verdict::Warn,
                format!(
                    "cannot read the nftables flowtables ({e}): doctor cannot tell whether \
                     a flowtable caches MACs here"
                ),
            ));
            None
        }
    };
    checks.push(conntrack_check(&f.conntrack));
    checks.push(probing_check(&f.probing));
    checks.push(flowguard_check(&f.pin_dir, &f.flowguard));
    if let Running::Yes(st) = &f.flowguard {
        if !st.hashed_prefixes.is_empty() {
            checks.push(
                Check::new(
                    "endpoint lookup",
                    Verdict::Info,
                    "some IPv4 prefixes keep their endpoints in the hash map, not the \
                     direct-indexed array: frames to them cost more",
                )
                .with_details(st.hashed_prefixes.iter().cloned()),
            );
        }
    }
    let kernel = KernelReport {
        version: f.kernel.as_ref().ok().map(ToString::to_string),
        tcx: f.kernel.as_ref().is_ok_and(|v| *v >= TCX_KERNEL),
        coarse_clock: f.kernel.as_ref().is_ok_and(|v| *v >= MIN_KERNEL),
        btf: f.btf,
    };
    let conntrack = match &f.conntrack {
        Ok(c) => ConntrackReport {
            reachable: true,
            counts: Some(*c),
            error: None,
        },
        Err(e) => ConntrackReport {
            reachable: false,
            counts: None,
            error: Some(e.clone()),
        },
    };
    let flowguard = FlowguardReport {
        pin_dir: f.pin_dir.clone(),
        running: matches!(f.flowguard, Running::Yes(_)),
        mode: match &f.flowguard {
            Running::Yes(st) => Some(st.mode.to_string()),
            _ => None,
        },
    };
    let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    Report {
        checks,
        kernel,
        nft: f.nft.as_ref().ok().cloned(),
        flowtables,
        conntrack,
        flowguard,
        failed,
    }
}

fn privileges(missing: &[String]) -> Check {
    if missing.is_empty() {
        return Check::new(
            "privileges",
            Verdict::Ok,
            "CAP_BPF and CAP_NET_ADMIN are effective: flowguard can load and attach its \
             programs, and doctor can read conntrack and the pinned maps",
        );
    }
    Check::new(
        "privileges",
        Verdict::Fail,
        format!(
            "missing {}: flowguard cannot load or attach its programs, and doctor cannot \
             read everything; run as root (sudo flowguard doctor) or grant the capabilities",
            missing.join(" and ")
        ),
    )
}

fn bpffs(mounted: bool) -> Check {
    if mounted {
        Check::new(
            "bpffs",
            Verdict::Ok,
            format!("{BPFFS} is a bpf filesystem: flowguard can pin its maps there"),
        )
    } else {
        Check::new(
            "bpffs",
            Verdict::Fail,
            format!(
                "{BPFFS} is not a bpf filesystem: flowguard cannot pin its maps; mount it \
                 with `mount -t bpf bpf {BPFFS}` (or pass --pin-dir on another bpffs)"
            ),
        )
    }
}

/// Whether this kernel's flowtable caches MACs on bridge ports: from 5.13,
/// and on OpenWrt's 5.10 too, which carries the backport.
fn kernel_caches_macs(kernel: &Result<KernelVersion, String>, packages: PackageManager) -> bool {
    match kernel {
        Ok(v) => {
            *v >= MAC_CACHING_KERNEL
                || (packages != PackageManager::Other && *v >= KernelVersion::new(5, 10, 0))
        }
        // Unknown: assume the worst.
        Err(_) => true,
    }
}

fn kernel(read: &Result<KernelVersion, String>, packages: PackageManager) -> Check {
    let v = match read {
        Ok(v) => *v,
        Err(why) => {
            return Check::new(
                "kernel",
                Verdict::Warn,
                format!(
                    "cannot read the kernel version ({why}): flowguard needs Linux 5.11 or newer, \
                 and attaches tc programs with TCX from 6.6 on"
                ),
            )
        }
    };
    let caches = kernel_caches_macs(read, packages);
    if v < MIN_KERNEL {
        let need = if caches {
            "upgrade the kernel (this one carries the flowtable's MAC caching, \
             OpenWrt's 5.10 backport)"
        } else {
            "but this kernel does not need it: its flowtable resolves the neighbour for every \
             packet, so a changed MAC is used at once"
        };
        return Check::new(
            "kernel",
            Verdict::Fail,
            format!(
                "Linux {v} is too old for flowguard's programs: they call \
                 bpf_ktime_get_coarse_ns, which needs Linux 5.11; {need} ({MAC_CACHING_WHY})"
            ),
        );
    }
    if !caches {
        return Check::new(
            "kernel",
            Verdict::Info,
            format!(
                "Linux {v} does not need flowguard: its flowtable resolves the neighbour for \
                 every packet, so a changed MAC is used at once ({MAC_CACHING_WHY})"
            ),
        );
    }
    let tc = if v >= TCX_KERNEL {
        "tc programs attach with TCX (6.6+)"
    } else {
        "tc programs attach through a clsact qdisc (TCX needs 6.6)"
    };
    Check::new(
        "kernel",
        Verdict::Ok,
        format!("Linux {v}: {tc}; bpf_ktime_get_coarse_ns (5.11+) is there"),
    )
}

/// Below 6.6, tc programs attach through cls_bpf, a module OpenWrt does not
/// install by default (kmod-sched-bpf); from 6.6 TCX needs no module.
fn tc_module(
    kernel: &Result<KernelVersion, String>,
    cls_bpf: ModuleState,
    packages: PackageManager,
) -> Option<Check> {
    let v = kernel.as_ref().ok()?;
    if *v >= TCX_KERNEL || *v < MIN_KERNEL {
        return None;
    }
    let install = match packages {
        PackageManager::Opkg => "`opkg update && opkg install kmod-sched-bpf`",
        PackageManager::Apk => "`apk update && apk add kmod-sched-bpf`",
        PackageManager::Other => {
            "your distribution's kernel modules (CONFIG_NET_CLS_BPF; OpenWrt: kmod-sched-bpf)"
        }
    };
    Some(match cls_bpf {
        ModuleState::Present => Check::new(
            "tc-module",
            Verdict::Ok,
            "cls_bpf is there: flowguard's tc programs attach through a clsact qdisc",
        ),
        ModuleState::Missing => Check::new(
            "tc-module",
            Verdict::Fail,
            format!(
                "cls_bpf is missing: below Linux 6.6 flowguard's tc programs (the router role)                  need it; install it with {install}"
            ),
        ),
        ModuleState::Unknown => Check::new(
            "tc-module",
            Verdict::Warn,
            format!(
                "cannot tell whether cls_bpf is installed (no /lib/modules for this kernel):                  below Linux 6.6 the router role needs it; it comes with {install}"
            ),
        ),
    })
}

/// What fw4's offload settings mean for MAC caching.
fn fw4_check(fw4: Fw4Offload) -> Check {
    if fw4.hardware {
        Check::new(
            "fw4",
            Verdict::Info,
            "fw4 flow_offloading_hw is on: fw4 lists the bridge ports (lan1…) in its flowtable              with `flags offload`, so offloaded flows cache the destination MAC: the case              flowguard's router role is for",
        )
    } else if fw4.software {
        Check::new(
            "fw4",
            Verdict::Info,
            "fw4 flow_offloading is on, hardware offload off: current fw4 lists br-lan (the              bridge) in its flowtable, which does not cache MACs (fw4 before 2024-03 listed              the bridge ports: see the flowtable check)",
        )
    } else {
        Check::new(
            "fw4",
            Verdict::Info,
            "fw4 flow offloading is off: no flowtable, no cached MACs",
        )
    }
}

fn btf(present: bool) -> Check {
    if present {
        Check::new(
            "btf",
            Verdict::Ok,
            format!("{VMLINUX_BTF} is there: the kernel has BTF"),
        )
    } else {
        Check::new(
            "btf",
            Verdict::Warn,
            format!(
                "no {VMLINUX_BTF}: the kernel was built without CONFIG_DEBUG_INFO_BTF; \
                 flowguard's maps carry their own BTF, but if loading fails, this is why"
            ),
        )
    }
}

fn nftables(nft: &Result<String, String>) -> Check {
    match nft {
        Ok(version) => Check::new(
            "nftables",
            Verdict::Ok,
            format!(
                "{version} is installed: doctor and `flowguard run --auto` read the \
                 flowtables with it"
            ),
        ),
        Err(e) => Check::new(
            "nftables",
            Verdict::Warn,
            format!(
                "{e}: the flowtables cannot be read, so neither doctor nor \
                 `flowguard run --auto` can find the devices that cache MACs"
            ),
        ),
    }
}

fn flowtable_report(
    t: &Flowtable,
    roles: &BTreeMap<String, Result<DeviceRole, String>>,
    kernel_caches: bool,
) -> FlowtableReport {
    let devices: Vec<DeviceReport> = t
        .devices
        .iter()
        .map(|d| match roles.get(d) {
            Some(Ok(r)) => DeviceReport {
                name: d.clone(),
                role: if r.bridge_port_of.is_some() {
                    Role::BridgePort
                } else if r.is_bridge {
                    Role::Bridge
                } else {
                    Role::Plain
                },
                bridge: r.bridge_port_of.clone(),
                error: None,
            },
            Some(Err(e)) => DeviceReport {
                name: d.clone(),
                role: Role::Unknown,
                bridge: None,
                error: Some(e.clone()),
            },
            None => DeviceReport {
                name: d.clone(),
                role: Role::Unknown,
                bridge: None,
                error: Some("not looked up".to_string()),
            },
        })
        .collect();
    let caches_macs =
        t.hw_offload || (kernel_caches && devices.iter().any(|d| d.role == Role::BridgePort));
    FlowtableReport {
        family: t.family.clone(),
        table: t.table.clone(),
        name: t.name.clone(),
        hw_offload: t.hw_offload,
        devices,
        caches_macs,
    }
}

/// One check per flowtable, or one saying there is none.
pub fn flowtable_checks(tables: &[FlowtableReport], caches: bool) -> Vec<Check> {
    if tables.is_empty() {
        return vec![Check::new(
            "flowtable",
            Verdict::Info,
            "no flowtable: nothing caches MACs",
        )];
    }
    tables.iter().map(|t| flowtable_check(t, caches)).collect()
}

fn flowtable_check(t: &FlowtableReport, caches: bool) -> Check {
    let what = format!("{} {} {}", t.family, t.table, t.name);
    let ports: Vec<&str> = t
        .devices
        .iter()
        .filter(|d| d.role == Role::BridgePort)
        .map(|d| d.name.as_str())
        .collect();
    let unknown: Vec<&str> = t
        .devices
        .iter()
        .filter(|d| d.role == Role::Unknown)
        .map(|d| d.name.as_str())
        .collect();
    let mut sentences = Vec::new();
    if !ports.is_empty() && !caches {
        sentences.push(format!(
            "bridge ports ({}), but no MAC caching on this kernel: {MAC_CACHING_WHY}",
            ports.join(", ")
        ));
    } else if !ports.is_empty() {
        let egress: Vec<String> = ports.iter().map(|p| format!("--egress {p}")).collect();
        sentences.push(format!(
            "caches destination MACs: flowguard's router role is needed here (attach with {} \
             or --auto)",
            egress.join(" ")
        ));
    }
    if t.hw_offload {
        sentences.push(
            "hardware offload (flags offload): the CPU never sees these packets; only \
             eviction on a neighbour change helps (flowguard's router role evicts when a \
             neighbour's MAC changes; its host role fixes delivery on the receiving host)"
                .to_string(),
        );
    }
    let verdict = if (caches && !ports.is_empty()) || t.hw_offload {
        Verdict::Warn
    } else if !sentences.is_empty() {
        Verdict::Info
    } else if !unknown.is_empty() {
        sentences.push(format!(
            "cannot tell whether it caches MACs: {} could not be looked up; a bridge port \
             among them would cache destination MACs",
            unknown.join(", ")
        ));
        Verdict::Warn
    } else if t.devices.is_empty() {
        sentences.push("no devices: no MAC caching".to_string());
        Verdict::Ok
    } else {
        sentences.push(
            "no MAC caching: its devices are bridges or plain ports, where the kernel \
             resolves the neighbour for every packet"
                .to_string(),
        );
        Verdict::Ok
    };
    Check {
        check: "flowtable",
        verdict,
        message: one_line(&format!("{what}: {}", sentences.join("; "))),
        details: t.devices.iter().map(|d| one_line(&d.describe())).collect(),
    }
}

/// A flowtable that lists two or more ports of one bridge (Wi-Fi radios,
/// DSA ports) caches the port as well as the MAC: an endpoint that moves
/// between them keeping its IP and MAC stalls its offloaded flows.
/// `guarded`: the tc ports of the running instance, if one runs.
pub fn roaming_check(
    t: &FlowtableReport,
    caches: bool,
    guarded: Option<&[String]>,
) -> Option<Check> {
    if !caches && !t.hw_offload {
        return None;
    }
    let mut by_bridge: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for d in &t.devices {
        if let (Role::BridgePort, Some(b)) = (d.role, &d.bridge) {
            by_bridge
                .entry(b.as_str())
                .or_default()
                .push(d.name.as_str());
        }
    }
    let shared: Vec<(&str, Vec<&str>)> = by_bridge
        .into_iter()
        .filter(|(_, p)| p.len() >= 2)
        .collect();
    if shared.is_empty() {
        return None;
    }
    let mut sentences = Vec::new();
    for (bridge, ports) in &shared {
        let guard = match guarded {
            None => "no flowguard runs to guard them".to_string(),
            Some(g) => {
                let not: Vec<&str> = ports
                    .iter()
                    .copied()
                    .filter(|p| !g.iter().any(|x| x == p))
                    .collect();
                if not.is_empty() {
                    "all guarded by the running flowguard".to_string()
                } else {
                    format!("not guarded: {}", not.join(", "))
                }
            }
        };
        sentences.push(format!(
            "lists {} ports of bridge {bridge} ({}; {guard})",
            ports.len(),
            ports.join(", ")
        ));
    }
    Some(Check {
        check: "roaming",
        verdict: Verdict::Warn,
        message: one_line(&format!(
            "{} {} {} {}: an endpoint that moves between them keeping its IP and MAC (Wi-Fi \
             roaming or band steering between two radios, a moved cable, a migrated VM) \
             stalls its offloaded flows, because the flowtable caches the port as well as the \
             MAC; flowguard's router role follows the bridge FDB of its guarded ports, \
             redirects the frames in flight to the endpoint's new port (fix mode, outside \
             VLANs) and evicts the flows of an endpoint that moved",
            t.family,
            t.table,
            t.name,
            sentences.join("; ")
        )),
        details: Vec::new(),
    })
}

fn conntrack_check(ct: &Result<ConntrackCounts, String>) -> Check {
    match ct {
        Ok(c) => {
            let mut message = format!(
                "reachable over ctnetlink: {} entries, {} offloaded now (OFFLOAD), {} of them \
                 in hardware (HW_OFFLOAD)",
                c.entries, c.offloaded, c.hw_offloaded
            );
            if c.offloaded > 0 {
                message.push_str(
                    "; offloaded flows are the ones that can carry a stale MAC, and flowguard \
                     evicts them when their endpoint's MAC changes",
                );
            }
            Check::new("conntrack", Verdict::Ok, message)
        }
        Err(e) => Check::new(
            "conntrack",
            Verdict::Warn,
            format!(
                "not reachable over ctnetlink ({e}): flowguard cannot evict stale flows, and \
                 doctor cannot count the offloaded ones"
            ),
        ),
    }
}

fn probing_check(probing: &Result<(), String>) -> Check {
    match probing {
        Ok(()) => Check::new(
            "probing",
            Verdict::Ok,
            "ARP and ICMPv6 probe sockets can be opened: the router role asks each endpoint \
             that carries offloaded flows whether its cached MAC still answers (`--probe`, on \
             by default), so a move is found even when the endpoint announces nothing and \
             under hardware offload",
        ),
        Err(e) => Check::new(
            "probing",
            Verdict::Warn,
            format!(
                "cannot open the probe sockets ({e}): run flowguard with CAP_NET_RAW, or \
                 endpoints that change MAC without announcing it go unseen in the router role"
            ),
        ),
    }
}

fn flowguard_check(pin_dir: &str, running: &Running) -> Check {
    match running {
        Running::Yes(st) => {
            let c = &st.counters;
            let missing = st.missing_interfaces();
            let (verdict, warning) = if missing.is_empty() {
                (Verdict::Ok, String::new())
            } else {
                (
                    Verdict::Warn,
                    format!(
                        "; NOT guarded now: {} (deleted; attached again when an interface of \
                         that name comes back)",
                        missing.join(", ")
                    ),
                )
            };
            Check::new(
                "flowguard",
                verdict,
                format!(
                    "running at {pin_dir} in {} mode: {} endpoints, {} frames to stale MACs \
                     seen, {} rewritten, {} conntrack entries evicted, {} probes sent, {} \
                     moves found by probing (`flowguard status` for more){warning}",
                    st.mode,
                    st.endpoints.len(),
                    c.kernel.stale,
                    c.kernel.rewritten,
                    c.user.evicted,
                    c.user.probes_sent,
                    c.user.probe_moves
                ),
            )
            .with_details(st.interfaces.iter().map(|i| {
                let state = if i.attached {
                    "attached"
                } else {
                    "MISSING: deleted; attached again when it comes back"
                };
                format!("{} ({}): {state}", i.name, i.hook)
            }))
        }
        Running::No => Check::new(
            "flowguard",
            Verdict::Info,
            format!("not running at {pin_dir} (no pinned maps there)"),
        ),
        Running::Dead(st) => Check::new(
            "flowguard",
            Verdict::Warn,
            st.not_running()
                .unwrap_or_else(|| format!("not running at {pin_dir}")),
        ),
        Running::Unknown(e) => Check::new(
            "flowguard",
            Verdict::Warn,
            format!("cannot tell whether flowguard runs at {pin_dir}: {e}"),
        ),
    }
}

/// The human-readable form: one line per check, verdict first.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    for c in &r.checks {
        let _ = writeln!(
            out,
            "{:<5} {:<10} {}",
            c.verdict.as_str(),
            c.check,
            c.message
        );
        for d in &c.details {
            let _ = writeln!(out, "{:<16} {d}", "");
        }
    }
    let count = |v: Verdict| r.checks.iter().filter(|c| c.verdict == v).count();
    let (fails, warns) = (count(Verdict::Fail), count(Verdict::Warn));
    let _ = writeln!(
        out,
        "{}",
        match (fails, warns) {
            (0, 0) => "all checks passed".to_string(),
            (0, w) => format!("no check failed, {w} warning(s)"),
            (f, w) => format!("{f} check(s) failed, {w} warning(s)"),
        }
    );
    out
}

/// `flowguard doctor [--json]`: prints the diagnosis of this machine and
/// returns the exit code (1 when a check failed).
pub fn run(json: bool, pin_dir: &Path) -> u8 {
    let report = diagnose(&gather(pin_dir));
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => crate::say!("{text}"),
            Err(e) => {
                crate::say_err!("error: cannot print the report as JSON: {e}");
                return 1;
            }
        }
    } else {
        crate::say!("{}", render(&report).trim_end_matches('\n'));
    }
    report.exit_code()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::conntrack::{Tuple, IPS_OFFLOAD};

    /// A healthy root on a recent kernel, with no flowtable.
    fn facts() -> Facts {
        Facts {
            missing_caps: Vec::new(),
            bpffs: true,
            kernel: Ok(KernelVersion::new(6, 12, 0)),
            btf: true,
            nft: Ok("nftables v1.0.6 (Lester Gooch #5)".into()),
            flowtables: Ok(Vec::new()),
            devices: BTreeMap::new(),
            conntrack: Ok(ConntrackCounts::default()),
            pin_dir: "/sys/fs/bpf/flowguard".into(),
            flowguard: Running::No,
            probing: Ok(()),
            cls_bpf: ModuleState::Present,
            packages: PackageManager::Other,
            fw4: None,
        }
    }

    #[test]
    fn a_missing_cls_bpf_names_the_kmod_and_how_to_install_it() {
        let tc = |kernel: KernelVersion, cls_bpf, packages| {
            let r = diagnose(&Facts {
                kernel: Ok(kernel),
                cls_bpf,
                packages,
                ..facts()
            });
            the(&r, "tc-module").first().map(|c| (*c).clone())
        };
        let openwrt_23 = KernelVersion::new(5, 15, 150);
        let c = tc(openwrt_23, ModuleState::Missing, PackageManager::Opkg).unwrap();
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.message
                .contains("opkg update && opkg install kmod-sched-bpf"),
            "{c:?}"
        );
        let c = tc(openwrt_23, ModuleState::Missing, PackageManager::Apk).unwrap();
        assert!(c.message.contains("apk add kmod-sched-bpf"), "{c:?}");
        let c = tc(openwrt_23, ModuleState::Present, PackageManager::Opkg).unwrap();
        assert_eq!(c.verdict, Verdict::Ok);
        let c = tc(openwrt_23, ModuleState::Unknown, PackageManager::Other).unwrap();
        assert_eq!(c.verdict, Verdict::Warn);
        // TCX from 6.6 needs no module; below 5.11 the kernel check fails instead.
        assert!(tc(
            KernelVersion::new(6, 6, 0),
            ModuleState::Missing,
            PackageManager::Opkg
        )
        .is_none());
        assert!(tc(
            KernelVersion::new(5, 10, 0),
            ModuleState::Missing,
            PackageManager::Opkg
        )
        .is_none());
    }

    #[test]
    fn fw4_offload_settings_say_whether_macs_are_cached() {
        let fw4 = |software, hardware| {
            let r = diagnose(&Facts {
                fw4: Some(Fw4Offload { software, hardware }),
                ..facts()
            });
            the(&r, "fw4")[0].message.clone()
        };
        assert!(
            fw4(true, true).contains("bridge ports"),
            "{}",
            fw4(true, true)
        );
        assert!(fw4(true, true).contains("cache the destination MAC"));
        assert!(fw4(true, false).contains("br-lan"), "{}", fw4(true, false));
        assert!(fw4(true, false).contains("does not cache"));
        assert!(fw4(false, false).contains("off"));
        assert!(
            the(&diagnose(&facts()), "fw4").is_empty(),
            "no uci, no fw4 check"
        );
        for on in ["1", "on", "true", "yes", "enabled", "1\n"] {
            assert!(uci_bool(on), "{on}");
        }
        for off in ["0", "off", "", "no"] {
            assert!(!uci_bool(off), "{off}");
        }
    }

    fn with_ruleset(flowtables: Value, links: &[(&str, Value)]) -> Facts {
        let (tables, devices) = facts_from_json(&flowtables, links);
        Facts {
            flowtables: Ok(tables),
            devices,
            ..facts()
        }
    }

    fn the<'a>(r: &'a Report, check: &str) -> Vec<&'a Check> {
        r.checks.iter().filter(|c| c.check == check).collect()
    }

    fn metainfo() -> Value {
        json!({"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5",
                            "json_schema_version": 1}})
    }

    fn link_port(name: &str, bridge: &str) -> Value {
        json!([{"ifindex": 4, "ifname": name, "master": bridge, "mtu": 1500,
                "linkinfo": {"info_kind": "veth", "info_slave_kind": "bridge",
                             "info_slave_data": {"state": "forwarding"}}}])
    }

    fn link_bridge(name: &str) -> Value {
        json!([{"ifindex": 3, "ifname": name, "mtu": 1500,
                "linkinfo": {"info_kind": "bridge", "info_data": {"stp_state": 0}}}])
    }

    fn link_plain(name: &str) -> Value {
        json!([{"ifindex": 2, "ifname": name, "mtu": 1500, "linkinfo": {"info_kind": "veth"}}])
    }

    #[test]
    fn no_flowtable_is_info_and_nothing_fails() {
        let f = with_ruleset(json!({"nftables": [metainfo()]}), &[]);
        let r = diagnose(&f);
        let ft = the(&r, "flowtable");
        assert_eq!(ft.len(), 1);
        assert_eq!(ft[0].verdict, Verdict::Info);
        assert_eq!(ft[0].message, "no flowtable: nothing caches MACs");
        assert_eq!(r.flowtables.as_deref(), Some(&[][..]));
        assert!(!r.failed);
        assert_eq!(r.exit_code(), 0);
        // An empty ruleset prints nothing at all: the same answer.
        let r = diagnose(&with_ruleset(Value::Null, &[]));
        assert_eq!(the(&r, "flowtable")[0].verdict, Verdict::Info);
    }

    #[test]
    fn a_bridge_port_among_the_devices_caches_macs() {
        let f = with_ruleset(
            json!({"nftables": [metainfo(),
                {"flowtable": {"family": "inet", "name": "ft", "table": "fw4", "handle": 3,
                               "hook": "ingress", "prio": 0, "dev": ["wan", "lan1", "lan2"]}}]}),
            &[
                ("wan", link_plain("wan")),
                ("lan1", link_port("lan1", "br-lan")),
                ("lan2", link_port("lan2", "br-lan")),
            ],
        );
        let r = diagnose(&f);
        let c = the(&r, "flowtable")[0];
        assert_eq!(c.verdict, Verdict::Warn);
        assert_eq!(
            c.message,
            "inet fw4 ft: caches destination MACs: flowguard's router role is needed here \
             (attach with --egress lan1 --egress lan2 or --auto)"
        );
        assert_eq!(
            c.details,
            [
                "wan: a plain device (no MAC caching)",
                "lan1: port of bridge br-lan (caches destination MACs)",
                "lan2: port of bridge br-lan (caches destination MACs)",
            ]
        );
        let t = &r.flowtables.as_ref().unwrap()[0];
        assert!(t.caches_macs && !t.hw_offload);
        assert_eq!(t.devices[1].role, Role::BridgePort);
        assert_eq!(t.devices[1].bridge.as_deref(), Some("br-lan"));
        assert!(!r.failed, "a flowtable that caches MACs is a warning");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["flowtables"][0]["devices"][1]["role"], "bridge_port");
        assert_eq!(json["flowtables"][0]["devices"][0]["role"], "plain");
    }

    #[test]
    fn kernels_before_5_13_cache_no_macs_except_openwrts_5_10() {
        let ruleset = |kernel: KernelVersion, packages| {
            diagnose(&Facts {
                kernel: Ok(kernel),
                packages,
                ..with_ruleset(
                    json!({"nftables": [metainfo(),
                        {"flowtable": {"family": "inet", "name": "ft", "table": "fw4",
                                       "handle": 3, "hook": "ingress", "prio": 0,
                                       "dev": ["wan", "lan1"]}}]}),
                    &[
                        ("wan", link_plain("wan")),
                        ("lan1", link_port("lan1", "br-lan")),
                    ],
                )
            })
        };
        // Mainline 5.12: no direct transmit path yet; the programs would load
        // (5.11+) but are not needed.
        let r = ruleset(KernelVersion::new(5, 12, 19), PackageManager::Other);
        let k = the(&r, "kernel")[0];
        assert_eq!(k.verdict, Verdict::Info, "{k:?}");
        assert!(
            k.message.contains("does not need flowguard") && k.message.contains("7a27f6ab4135"),
            "{k:?}"
        );
        let f = the(&r, "flowtable")[0];
        assert_eq!(f.verdict, Verdict::Info, "{f:?}");
        assert!(f.message.contains("no MAC caching on this kernel"), "{f:?}");
        assert!(!r.flowtables.as_ref().unwrap()[0].caches_macs);
        // Debian bullseye's 5.10: too old for the programs, and not needed.
        let r = ruleset(KernelVersion::new(5, 10, 0), PackageManager::Other);
        let k = the(&r, "kernel")[0];
        assert_eq!(k.verdict, Verdict::Fail);
        assert!(
            k.message.contains("does not need it") && k.message.contains("5.11"),
            "{k:?}"
        );
        // OpenWrt 22.03's 5.10 carries the 5.13 backport: it caches.
        let r = ruleset(KernelVersion::new(5, 10, 176), PackageManager::Opkg);
        assert!(the(&r, "kernel")[0].message.contains("upgrade the kernel"));
        assert_eq!(the(&r, "flowtable")[0].verdict, Verdict::Warn);
        // 5.13 on: caches.
        for v in [KernelVersion::new(5, 13, 0), KernelVersion::new(6, 1, 0)] {
            let r = ruleset(v, PackageManager::Other);
            assert_eq!(the(&r, "kernel")[0].verdict, Verdict::Ok, "{v}");
            let f = the(&r, "flowtable")[0];
            assert_eq!(f.verdict, Verdict::Warn, "{v}");
            assert!(f.message.contains("caches destination MACs"), "{f:?}");
            assert!(r.flowtables.as_ref().unwrap()[0].caches_macs);
        }
    }

    #[test]
    fn the_bridge_device_or_plain_ports_cache_no_macs() {
        for (devs, links) in [
            (
                json!(["wan", "br-lan"]),
                vec![
                    ("wan", link_plain("wan")),
                    ("br-lan", link_bridge("br-lan")),
                ],
            ),
            (
                json!(["wan", "eth1"]),
                vec![("wan", link_plain("wan")), ("eth1", link_plain("eth1"))],
            ),
        ] {
            let f = with_ruleset(
                json!({"nftables": [metainfo(),
                    {"flowtable": {"family": "ip", "name": "f", "table": "filter",
                                   "hook": "ingress", "prio": 0, "dev": devs}}]}),
                &links,
            );
            let r = diagnose(&f);
            let c = the(&r, "flowtable")[0];
            assert_eq!(c.verdict, Verdict::Ok, "{c:?}");
            assert!(
                c.message.starts_with("ip filter f: no MAC caching"),
                "{c:?}"
            );
            assert!(!r.flowtables.as_ref().unwrap()[0].caches_macs);
        }
    }

    #[test]
    fn hardware_offload_is_only_helped_by_eviction() {
        let f = with_ruleset(
            json!({"nftables": [metainfo(),
                {"flowtable": {"family": "inet", "name": "ft", "table": "fw4", "hook": "ingress",
                               "prio": 0, "dev": ["wan", "lan1"], "flags": ["offload"]}}]}),
            &[("wan", link_plain("wan")), ("lan1", link_plain("lan1"))],
        );
        let r = diagnose(&f);
        let c = the(&r, "flowtable")[0];
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(
            c.message.starts_with(
                "inet fw4 ft: hardware offload (flags offload): the CPU never sees these \
                 packets; only eviction on a neighbour change helps"
            ),
            "{c:?}"
        );
        assert!(!c.message.contains("--egress"), "{c:?}");
        assert!(r.flowtables.as_ref().unwrap()[0].caches_macs);

        // Hardware offload on a bridge port: both sentences.
        let f = with_ruleset(
            json!({"nftables": [metainfo(),
                {"flowtable": {"family": "inet", "name": "ft", "table": "fw4",
                               "dev": "lan1", "flags": "offload"}}]}),
            &[("lan1", link_port("lan1", "br-lan"))],
        );
        let c = diagnose(&f)
            .checks
            .into_iter()
            .find(|c| c.check == "flowtable");
        let m = c.unwrap().message;
        assert!(
            m.contains("--egress lan1") && m.contains("hardware offload"),
            "{m}"
        );
    }

    #[test]
    fn a_device_that_cannot_be_looked_up_is_a_warning() {
        let f = with_ruleset(
            json!({"nftables": [
                {"flowtable": {"family": "inet", "name": "ft", "table": "t", "dev": ["lan9"]}}]}),
            &[],
        );
        let r = diagnose(&f);
        let c = the(&r, "flowtable")[0];
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.message.contains("cannot tell"), "{c:?}");
        assert!(c.details[0].starts_with("lan9: unknown"), "{c:?}");
    }

    #[test]
    fn probing_says_whether_its_sockets_can_be_opened() {
        let ok = diagnose(&facts());
        assert_eq!(the(&ok, "probing")[0].verdict, Verdict::Ok);
        let r = diagnose(&Facts {
            probing: Err("ARP packet socket: Operation not permitted".into()),
            ..facts()
        });
        let c = the(&r, "probing")[0];
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(c.message.contains("CAP_NET_RAW"), "{c:?}");
        assert!(c.message.contains("Operation not permitted"), "{c:?}");
    }

    #[test]
    fn several_flowtables_get_one_line_each() {
        let f = with_ruleset(
            json!({"nftables": [
                {"flowtable": {"family": "inet", "name": "a", "table": "t", "dev": ["lan1"]}},
                {"flowtable": {"family": "inet", "name": "b", "table": "t", "dev": ["br0"]}}]}),
            &[
                ("lan1", link_port("lan1", "br0")),
                ("br0", link_bridge("br0")),
            ],
        );
        let r = diagnose(&f);
        let v: Vec<Verdict> = the(&r, "flowtable").iter().map(|c| c.verdict).collect();
        assert_eq!(v, [Verdict::Warn, Verdict::Ok]);
    }

    #[test]
    fn missing_privileges_fail_and_set_the_exit_code() {
        let f = Facts {
            missing_caps: vec!["CAP_BPF".into(), "CAP_NET_ADMIN".into()],
            flowtables: Err(
                "running `nft -j list flowtables` failed: Operation not permitted".into(),
            ),
            conntrack: Err("conntrack over netlink needs CAP_NET_ADMIN".into()),
            ..facts()
        };
        let r = diagnose(&f);
        let p = the(&r, "privileges")[0];
        assert_eq!(p.verdict, Verdict::Fail);
        assert!(
            p.message.contains("missing CAP_BPF and CAP_NET_ADMIN"),
            "{p:?}"
        );
        assert!(r.failed);
        assert_eq!(r.exit_code(), 1);
        assert_eq!(the(&r, "flowtable")[0].verdict, Verdict::Warn);
        assert_eq!(r.flowtables, None);
        assert_eq!(the(&r, "conntrack")[0].verdict, Verdict::Warn);
        assert!(!r.conntrack.reachable);
        assert!(render(&r).contains("fail  privileges missing CAP_BPF"));
        // nft's two-line error stays on the check's one line.
        let r = diagnose(&Facts {
            flowtables: Err("Operation not permitted (you must be root)\n\
                             netlink: Error: cache initialization failed"
                .into()),
            ..facts()
        });
        let c = the(&r, "flowtable")[0];
        assert!(
            c.message
                .contains("(you must be root); netlink: Error: cache initialization failed)"),
            "{c:?}"
        );
    }

    #[test]
    fn bpffs_kernel_btf_and_nft() {
        let r = diagnose(&Facts {
            bpffs: false,
            ..facts()
        });
        let b = the(&r, "bpffs")[0];
        assert_eq!(b.verdict, Verdict::Fail);
        assert!(b.message.contains("mount -t bpf bpf /sys/fs/bpf"), "{b:?}");

        let kernel = |v: KernelVersion| {
            let r = diagnose(&Facts {
                kernel: Ok(v),
                ..facts()
            });
            (the(&r, "kernel")[0].clone(), r.kernel)
        };
        let (c, k) = kernel(KernelVersion::new(5, 10, 200));
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.message.contains("5.11"), "{c:?}");
        assert!(!k.coarse_clock && !k.tcx);
        let (c, k) = kernel(KernelVersion::new(6, 1, 0));
        assert_eq!(c.verdict, Verdict::Ok);
        assert!(c.message.contains("clsact"), "{c:?}");
        assert!(k.coarse_clock && !k.tcx);
        let (c, k) = kernel(KernelVersion::new(6, 6, 0));
        assert!(c.message.contains("TCX (6.6+)"), "{c:?}");
        assert!(k.tcx);
        assert_eq!(k.version.as_deref(), Some("6.6.0"));
        let r = diagnose(&Facts {
            kernel: Err("failed to read kernel version".into()),
            ..facts()
        });
        assert_eq!(the(&r, "kernel")[0].verdict, Verdict::Warn);

        let r = diagnose(&Facts {
            btf: false,
            nft: Err("nft is not installed (Debian: apt install nftables)".into()),
            flowtables: Err("nft is not installed (Debian: apt install nftables)".into()),
            ..facts()
        });
        assert_eq!(the(&r, "btf")[0].verdict, Verdict::Warn);
        assert_eq!(the(&r, "nftables")[0].verdict, Verdict::Warn);
        assert!(!r.failed);
    }

    #[test]
    fn conntrack_counts_offloaded_and_hardware_entries() {
        let ip = |s: &str| s.parse().unwrap();
        let mut flows: Vec<Flow> = (0..4)
            .map(|i| Flow::unnatted(Tuple::udp(ip("10.0.0.2"), 1000 + i, ip("10.0.0.1"), 53)))
            .collect();
        flows[1].status = IPS_OFFLOAD;
        flows[2].status = IPS_OFFLOAD | IPS_HW_OFFLOAD;
        let c = ConntrackCounts::of(&flows);
        assert_eq!(
            c,
            ConntrackCounts {
                entries: 4,
                offloaded: 2,
                hw_offloaded: 1
            }
        );
        let r = diagnose(&Facts {
            conntrack: Ok(c),
            ..facts()
        });
        let ct = the(&r, "conntrack")[0];
        assert_eq!(ct.verdict, Verdict::Ok);
        assert!(
            ct.message.starts_with(
                "reachable over ctnetlink: 4 entries, 2 offloaded now (OFFLOAD), 1 of them in \
                 hardware (HW_OFFLOAD)"
            ),
            "{ct:?}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["conntrack"],
            json!({"reachable": true, "entries": 4, "offloaded": 2, "hw_offloaded": 1})
        );
    }

    #[test]
    fn two_ports_of_one_bridge_in_a_flowtable_stall_roaming_and_their_guard_is_named() {
        let ruleset = json!({"nftables": [metainfo(),
            {"flowtable": {"family": "inet", "name": "ft", "table": "fw4", "hook": "ingress",
                           "prio": 0, "dev": ["wan", "lan1", "phy0-ap0"]}}]});
        let links = [
            ("wan", link_plain("wan")),
            ("lan1", link_port("lan1", "br-lan")),
            ("phy0-ap0", link_port("phy0-ap0", "br-lan")),
        ];
        let r = diagnose(&with_ruleset(ruleset.clone(), &links));
        let c = the(&r, "roaming");
        assert_eq!(c.len(), 1, "{:?}", r.checks);
        assert_eq!(c[0].verdict, Verdict::Warn);
        assert!(
            c[0].message.starts_with(
                "inet fw4 ft lists 2 ports of bridge br-lan (lan1, phy0-ap0; no flowguard runs to guard them)"
            ),
            "{c:?}"
        );
        assert!(c[0].message.contains("stalls its offloaded flows"), "{c:?}");
        // With an instance running: which of them it guards.
        let iface = |name: &str, attached| crate::status::InterfaceStatus {
            name: name.into(),
            hook: "tc".into(),
            attached,
        };
        let st = |interfaces| Status {
            pin_dir: "/sys/fs/bpf/flowguard".into(),
            mode: "fix",
            counters: Default::default(),
            endpoints: Vec::new(),
            running: true,
            pid: 7,
            eviction_queue: 0,
            endpoint_capacity: 16_384,
            endpoint_map_full: false,
            interfaces,
            hashed_prefixes: Vec::new(),
        };
        for (interfaces, want) in [
            (
                vec![iface("lan1", true), iface("phy0-ap0", true)],
                "all guarded by the running flowguard",
            ),
            (
                vec![iface("lan1", true), iface("phy0-ap0", false)],
                "not guarded: phy0-ap0",
            ),
        ] {
            let r = diagnose(&Facts {
                flowguard: Running::Yes(Box::new(st(interfaces))),
                ..with_ruleset(ruleset.clone(), &links)
            });
            let c = the(&r, "roaming");
            assert!(c[0].message.contains(want), "{want}: {c:?}");
        }
        // One port of the bridge (the other is the WAN): no roaming between ports.
        let one = json!({"nftables": [metainfo(),
            {"flowtable": {"family": "inet", "name": "ft", "table": "fw4", "hook": "ingress",
                           "prio": 0, "dev": ["wan", "lan1"]}}]});
        let r = diagnose(&with_ruleset(one, &links));
        assert!(the(&r, "roaming").is_empty(), "{:?}", r.checks);
    }

    #[test]
    fn flowguard_running_or_not() {
        let r = diagnose(&facts());
        let c = the(&r, "flowguard")[0];
        assert_eq!(c.verdict, Verdict::Info);
        assert!(c.message.contains("not running at /sys/fs/bpf/flowguard"));
        assert!(!r.flowguard.running);

        let st = Status {
            pin_dir: "/sys/fs/bpf/flowguard".into(),
            mode: "fix",
            counters: Default::default(),
            endpoints: Vec::new(),
            running: true,
            pid: 7,
            eviction_queue: 0,
            endpoint_capacity: 16_384,
            endpoint_map_full: false,
            interfaces: Vec::new(),
            hashed_prefixes: Vec::new(),
        };
        let r = diagnose(&Facts {
            flowguard: Running::Yes(Box::new(st.clone())),
            ..facts()
        });
        assert_eq!(the(&r, "flowguard")[0].verdict, Verdict::Ok);
        assert!(r.flowguard.running);
        assert_eq!(r.flowguard.mode.as_deref(), Some("fix"));
        assert!(
            the(&r, "endpoint lookup").is_empty(),
            "every prefix indexed"
        );
        let note = "prefix 10.0.0.0/16: its endpoints are kept in the hash map, because ...";
        let r = diagnose(&Facts {
            flowguard: Running::Yes(Box::new(Status {
                hashed_prefixes: vec![note.into()],
                ..st.clone()
            })),
            ..facts()
        });
        let c = the(&r, "endpoint lookup")[0];
        assert_eq!(c.verdict, Verdict::Info);
        assert!(render(&r).contains("prefix 10.0.0.0/16"), "{}", render(&r));

        let r = diagnose(&Facts {
            flowguard: Running::Dead(Box::new(Status {
                running: false,
                ..st
            })),
            ..facts()
        });
        let c = the(&r, "flowguard")[0];
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(
            c.message
                .contains("not running; pins left by PID 7, which is gone"),
            "{}",
            c.message
        );
        assert!(!r.flowguard.running);

        let r = diagnose(&Facts {
            flowguard: Running::Unknown("permission denied".into()),
            ..facts()
        });
        assert_eq!(the(&r, "flowguard")[0].verdict, Verdict::Warn);
    }

    #[test]
    fn the_text_form_has_one_line_per_check_and_a_summary() {
        let f = with_ruleset(
            json!({"nftables": [
                {"flowtable": {"family": "inet", "name": "ft", "table": "t", "dev": ["lan1"]}}]}),
            &[("lan1", link_port("lan1", "br0"))],
        );
        let r = diagnose(&f);
        let text = render(&r);
        assert!(
            text.contains("\nwarn  flowtable  inet t ft: caches destination MACs"),
            "{text}"
        );
        assert!(
            text.contains("\n                 lan1: port of bridge br0"),
            "{text}"
        );
        assert!(text.ends_with("no check failed, 1 warning(s)\n"), "{text}");
        assert!(text.starts_with("ok    privileges CAP_BPF"), "{text}");
    }
}
