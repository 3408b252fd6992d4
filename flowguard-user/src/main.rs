//! The `flowguard` command: `run` guards interfaces until stopped, `status`
//! shows what a running instance has seen, `doctor` checks this machine.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use flowguard_user::{
    agent,
    conntrack::EvictScope,
    doctor,
    loader::Guard,
    metrics,
    run_config::{RunConfig, RunRequest, Selection, XdpAttach, DEFAULT_PIN_DIR},
    say, say_err,
    settings::{self, Mode, PrefixArg, StaticEndpoint},
    status, sys,
};

/// Where a bpffs is mounted by convention; flowguard mounts one there when
/// its pin directory is inside and none is.
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// How many entries a startup line lists before it says "…".
const LISTED: usize = 5;

/// Finds frames sent to a stale (cached) MAC address of a LAN endpoint and
/// fixes them in the kernel.
#[derive(Parser, Debug)]
#[command(name = "flowguard", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load, attach and guard until SIGINT, SIGTERM or SIGQUIT, then detach
    /// and unpin. SIGHUP re-reads the neighbour table and the flowtables.
    Run(RunArgs),
    /// Show a running instance's counters and endpoints. Exit status: 0
    /// when it runs with every guarded interface attached; 1 when no instance
    /// runs there (also when a killed one left its pins); 3 when it runs but
    /// a guarded interface is MISSING (deleted, not guarded until it comes
    /// back).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Where the running instance pinned its maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Check this machine: privileges, bpffs, kernel features, whether its
    /// flowtables cache MACs, conntrack and offloaded flows, a running flowguard.
    /// Exits 1 when a check fails.
    Doctor {
        /// Print JSON instead of one line per check.
        #[arg(long)]
        json: bool,
        /// Where a running instance would have pinned its maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Guard frames arriving on this interface with XDP (receiving-host role:
    /// the macvlan parent). Repeatable.
    #[arg(long, value_name = "IFACE")]
    ingress: Vec<String>,
    /// Guard frames leaving this interface with tc (router role: the
    /// flowtable's bridge ports). Repeatable.
    #[arg(long, value_name = "IFACE")]
    egress: Vec<String>,
    /// Watch endpoints inside this prefix (IPv4 or IPv6). Repeatable; at
    /// least one. `auto`: the prefixes of the addresses of the bridges
    /// whose ports are guarded (read at start), e.g. br-lan's.
    #[arg(long = "prefix", value_name = "CIDR|auto", required = true)]
    prefixes: Vec<PrefixArg>,
    /// An endpoint whose MAC you know. Repeatable.
    #[arg(long = "static", value_name = "IP=MAC")]
    statics: Vec<StaticEndpoint>,
    /// Learn endpoints from the frames they send out of the --egress
    /// interfaces (their source IP and MAC; ARP senders too).
    #[arg(long)]
    learn: bool,
    /// fix: rewrite stale destination MACs; observe: only count and report.
    #[arg(long, value_enum, default_value = "fix")]
    mode: ModeArg,
    /// Where to pin the maps (on a bpffs).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Report stale frames of one endpoint at most once per this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    event_interval_ms: u64,
    /// How to attach XDP: driver mode with a fallback to skb mode, or only one of them.
    #[arg(long, value_enum, default_value = "auto")]
    xdp_mode: XdpModeArg,
    /// Router role: attach tc egress to every flowtable device that is a
    /// bridge port (read from `nft -j list flowtables`), and keep doing so
    /// while running: the flowtables are read again when the ruleset or an
    /// interface changes, and on SIGHUP.
    #[arg(long)]
    auto: bool,
    /// Do not follow the kernel neighbour table (endpoints then come only
    /// from --static and --learn).
    #[arg(long)]
    no_neigh: bool,
    /// Reconcile the endpoint map with the whole neighbour table this often.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    reconcile_secs: u64,
    /// Which conntrack entries of an endpoint to delete when its MAC changes
    /// or frames to it carry a stale MAC: offloaded ones (OFFLOAD or
    /// HW_OFFLOAD), all, or none.
    #[arg(long, value_enum, default_value = "offloaded")]
    evict: EvictArg,
    /// Say which conntrack entries would be evicted; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Evict the flows of one endpoint at most once per this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    evict_debounce_ms: u64,
    /// Evict the flows of at most this many endpoints per second (0: no
    /// limit); the others wait their turn, none is dropped.
    #[arg(long, value_name = "N", default_value_t = 50)]
    max_evictions_per_sec: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9737
    /// (off by default; only loopback addresses unless --metrics-allow-remote).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Let --metrics listen on an address outside loopback.
    #[arg(long)]
    metrics_allow_remote: bool,
    /// Router role: ask endpoints whether their cached MAC still answers
    /// (ARP to the cached MAC, then broadcast), so that a recreated endpoint
    /// that announces nothing is found: those that carry offloaded flows
    /// (default), those with any conntrack entry, or none.
    #[arg(long, value_enum, default_value = "offloaded")]
    probe: ProbeArg,
    /// Probe each of those endpoints this often.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    probe_interval_ms: u64,
    /// Send at most this many probes per second, overall (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_probes_per_sec: u32,
    /// Do not read the macvlan/ipvlan children of the --ingress interfaces
    /// (in every network namespace) as endpoints; by default their MACs and
    /// addresses are guarded before the endpoint sends a frame.
    #[arg(long)]
    no_children: bool,
    /// Size of the endpoint hash map: the most IPv6 endpoints, and IPv4
    /// endpoints of prefixes larger than a /20, guarded at once (IPv4
    /// prefixes of a /20 or smaller have a slot for every address). When it
    /// is full, the endpoints that fit stay guarded and the rest are counted
    /// as dropped.
    #[arg(long, value_name = "N", default_value_t = flowguard_common::MAX_ENDPOINTS,
          value_parser = clap::value_parser!(u32).range(1..=MAX_ENDPOINTS_LIMIT))]
    max_endpoints: u32,
}

// The command line's names for the library's choices: the library types
// know nothing of clap.

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ModeArg {
    /// Rewrite the destination MAC of stale frames.
    Fix,
    /// Count and report stale frames, change nothing.
    Observe,
}

impl From<ModeArg> for Mode {
    fn from(arg: ModeArg) -> Self {
        match arg {
            ModeArg::Fix => Mode::Fix,
            ModeArg::Observe => Mode::Observe,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum XdpModeArg {
    /// Driver (native) mode, falling back to skb (generic) mode.
    Auto,
    /// Driver mode only.
    Driver,
    /// Generic (skb) mode only.
    Skb,
}

impl From<XdpModeArg> for XdpAttach {
    fn from(arg: XdpModeArg) -> Self {
        match arg {
            XdpModeArg::Auto => XdpAttach::Auto,
            XdpModeArg::Driver => XdpAttach::Driver,
            XdpModeArg::Skb => XdpAttach::Skb,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum EvictArg {
    /// Only entries a flowtable holds (OFFLOAD or HW_OFFLOAD): the ones that
    /// can carry a stale MAC.
    Offloaded,
    /// Every entry that involves the endpoint.
    All,
    /// Never delete anything.
    Off,
}

impl From<EvictArg> for EvictScope {
    fn from(arg: EvictArg) -> Self {
        match arg {
            EvictArg::Offloaded => EvictScope::Offloaded,
            EvictArg::All => EvictScope::All,
            EvictArg::Off => EvictScope::Off,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeArg {
    Offloaded,
    Flows,
    Off,
}

/// The largest endpoint map `--max-endpoints` asks for (16,777,216 entries,
/// gigabytes of kernel memory: far past any LAN).
const MAX_ENDPOINTS_LIMIT: i64 = 1 << 24;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            // One line that names the bad input (clap puts the names of
            // missing arguments on the lines after its first); --help has
            // the rest.
            let text = e.to_string();
            let head: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let line = if head.is_empty() {
                "invalid arguments".to_string()
            } else {
                head.join(" ")
            };
            say_err!("{line} (see flowguard --help)");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Status { json, pin_dir } => match show_status(json, &pin_dir) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Doctor { json, pin_dir } => {
            return ExitCode::from(doctor::run(json, &pin_dir));
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say_err!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `flowguard status`'s exit status when the instance runs but a guarded
/// interface is missing (1 is "not running").
const STATUS_INTERFACE_MISSING: u8 = 3;

fn show_status(json: bool, pin_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let st = status::read(pin_dir)?;
    if json {
        say!("{}", serde_json::to_string_pretty(&st)?);
    } else if st.running {
        say!("{}", status::render(&st).trim_end_matches('\n'));
    }
    if let Some(why) = st.not_running() {
        bail!(why);
    }
    let missing = st.missing_interfaces();
    if missing.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        say_err!(
            "flowguard at {} runs, but {} {} not guarded now (deleted; attached again when \
             an interface of that name comes back)",
            st.pin_dir,
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" }
        );
        Ok(ExitCode::from(STATUS_INTERFACE_MISSING))
    }
}

impl From<RunArgs> for RunRequest {
    fn from(a: RunArgs) -> Self {
        RunRequest {
            ingress: a.ingress,
            egress: a.egress,
            prefixes: a.prefixes,
            statics: a.statics,
            learn: a.learn,
            mode: a.mode.into(),
            pin_dir: a.pin_dir,
            event_interval: Duration::from_millis(a.event_interval_ms),
            xdp: a.xdp_mode.into(),
            auto: a.auto,
            neighbours: !a.no_neigh,
            reconcile: Duration::from_secs(a.reconcile_secs),
            evict: a.evict.into(),
            dry_run: a.dry_run,
            evict_debounce: Duration::from_millis(a.evict_debounce_ms),
            max_evictions_per_sec: a.max_evictions_per_sec,
            metrics: a.metrics,
            metrics_allow_remote: a.metrics_allow_remote,
            probe: match a.probe {
                ProbeArg::Off => None,
                ProbeArg::Offloaded => Some(Selection::Offloaded),
                ProbeArg::Flows => Some(Selection::Flows),
            },
            probe_interval: Duration::from_millis(a.probe_interval_ms),
            max_probes_per_sec: a.max_probes_per_sec,
            children: !a.no_children,
            max_endpoints: a.max_endpoints,
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let RunConfig {
        guard: guard_config,
        agent: agent_config,
        metrics,
        mut notes,
    } = RunConfig::check(args.into())?;
    if let Some(found) = &agent_config.auto {
        say!(
            "flowguard: the flowtable caches MACs on bridge ports {}: attaching tc egress there",
            found.join(", ")
        );
    }
    let pin_dir = guard_config.pin_dir.clone();
    // Bound before anything is attached: a port in use fails here.
    let metrics = metrics
        .map(|addr| metrics::Server::bind(addr, &pin_dir))
        .transpose()?;
    let pin_dirs = PinDirSetup::prepare(&pin_dir, &mut notes)?;
    sys::hold_signals_until_handled();
    let mut guard = match Guard::start(&guard_config) {
        Ok(guard) => guard,
        Err(e) => {
            pin_dirs.undo();
            return Err(e.into());
        }
    };
    for note in &notes {
        say!("flowguard: {note}");
    }
    let ring = guard.take_events()?;

    let prefixes: Vec<String> = agent_config
        .prefixes
        .iter()
        .map(|p| p.to_string())
        .collect();
    let mode = if guard_config.kernel.mode == flowguard_common::mode::FIX {
        "fix mode: stale frames are rewritten"
    } else {
        "observe mode: stale frames are counted, not changed"
    };
    say!("flowguard: watching {} in {mode}", prefixes.join(", "));
    for note in settings::hash_path_notes(&guard_config.kernel) {
        say!("flowguard: {note}");
    }
    for a in &guard.attachments {
        say!("flowguard: {} on {}", a.how, a.iface);
    }
    if !guard_config.statics.is_empty() {
        let list: Vec<String> = guard_config
            .statics
            .iter()
            .map(|s| format!("{}={}", s.ip, s.mac))
            .collect();
        say!(
            "flowguard: static endpoints {}",
            settings::summarize(&list, LISTED)
        );
    }
    say!(
        "flowguard: maps pinned in {} (see `flowguard status --pin-dir {0}`)",
        guard.pin_dir().display()
    );
    if let Some(m) = &metrics {
        say!("flowguard: Prometheus metrics at {}", m.url());
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    match (agent_config.evict, agent_config.dry_run) {
        (EvictScope::Off, _) => say!("flowguard: eviction is off"),
        (scope, dry) => say!(
            "flowguard: evicting {} conntrack entries of an endpoint when its MAC changes or frames to it are stale{}",
            if scope == EvictScope::All { "all" } else { "the offloaded" },
            if dry { " (dry run: nothing is deleted)" } else { "" }
        ),
    }
    let outcome = rt.block_on(agent::run(&mut guard, ring, &agent_config, metrics));

    let summary = status::read(guard.pin_dir()).ok();
    drop(guard);
    pin_dirs.finish();
    if let Some(st) = summary {
        let c = st.counters.kernel;
        say!(
            "flowguard: stopped; {} frames to stale MACs seen, {} rewritten, {} endpoints learned; \
             programs detached, {} removed",
            c.stale,
            c.rewritten,
            c.learned_new,
            pin_dir.display()
        );
    }
    outcome
}

/// What `run` did to give the pin directory a home on a bpffs, to undo
/// when the start fails: a bpffs mounted at /sys/fs/bpf (it stays mounted
/// after a start, as systemd's would), the parent directories created.
struct PinDirSetup {
    mounted: Option<PathBuf>,
    created: Vec<PathBuf>,
}

impl PinDirSetup {
    /// Mounts a bpffs at /sys/fs/bpf when the pin directory is inside and
    /// none is there (root only, as `mount -t bpf` needs), and creates
    /// missing parents on a bpffs. Adds a note for each thing done.
    fn prepare(dir: &Path, notes: &mut Vec<String>) -> anyhow::Result<Self> {
        let mut setup = Self {
            mounted: None,
            created: Vec::new(),
        };
        let root = Path::new(BPFFS_ROOT);
        if dir.starts_with(root)
            && dir != root
            && root.is_dir()
            && !sys::is_on_bpffs(root)
            && sys::missing_capabilities().is_empty()
        {
            match sys::mount_bpffs(root) {
                Ok(()) => {
                    notes.push(format!(
                        "no bpf filesystem was mounted at {BPFFS_ROOT}: mounted one there \
                         (`mount -t bpf bpf {BPFFS_ROOT}`)"
                    ));
                    setup.mounted = Some(root.to_path_buf());
                }
                // The loader refuses the pin directory, saying what to do.
                Err(e) => log::debug!("mounting a bpffs at {BPFFS_ROOT}: {e}"),
            }
        }
        let mut missing: Vec<&Path> = dir
            .ancestors()
            .skip(1)
            .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
            .collect();
        let on_bpffs = missing
            .last()
            .and_then(|top| top.parent())
            .is_some_and(sys::is_on_bpffs);
        if on_bpffs {
            missing.reverse();
            for d in missing {
                if let Err(e) = std::fs::create_dir(d) {
                    let d = d.display().to_string();
                    setup.undo();
                    bail!("cannot create {d} for --pin-dir: {e}");
                }
                setup.created.push(d.to_path_buf());
            }
            if let Some(parent) = setup.created.last() {
                notes.push(format!(
                    "created {} for the pin directory (removed again when flowguard stops)",
                    parent.display()
                ));
            }
        }
        Ok(setup)
    }

    /// Removes the directories created, deepest first (each only if empty).
    fn finish(self) {
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Undoes everything: the start failed.
    fn undo(mut self) {
        let mounted = self.mounted.take();
        self.finish();
        if let Some(root) = mounted {
            if let Err(e) = sys::unmount(&root) {
                log::warn!("unmounting the bpffs mounted at {}: {e}", root.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn cli_parses_the_documented_forms() {
        let cli = Cli::try_parse_from([
            "flowguard",
            "run",
            "--ingress",
            "eth0",
            "--egress",
            "eth0",
            "--learn",
            "--prefix",
            "192.168.1.0/24",
            "--static",
            "192.168.1.9=02:00:00:00:00:09",
            "--mode",
            "observe",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.ingress, ["eth0"]);
        assert!(a.learn);
        assert_eq!(a.mode, ModeArg::Observe);
        assert_eq!(a.statics[0].ip, "192.168.1.9".parse::<IpAddr>().unwrap());
        assert_eq!(a.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    }

    #[test]
    fn cli_rejects_bad_values() {
        for args in [
            &[
                "flowguard",
                "run",
                "--egress",
                "x",
                "--prefix",
                "192.168.1.0/33",
            ][..],
            &[
                "flowguard",
                "run",
                "--egress",
                "x",
                "--prefix",
                "10.0.0.0/8",
                "--static",
                "10.0.0.1=zz",
            ],
            &["flowguard", "run", "--egress", "x"],
            &[
                "flowguard",
                "run",
                "--egress",
                "x",
                "--prefix",
                "10.0.0.0/8",
                "--mode",
                "maybe",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
