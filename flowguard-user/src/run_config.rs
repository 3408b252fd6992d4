//! `flowguard run`'s configuration. The command line is mapped onto a
//! [`RunRequest`] (library types, nothing checked yet), and
//! [`RunConfig::check`] turns it into a checked, complete configuration:
//! prefixes merged, static endpoints checked against them and against the
//! map they go to, interfaces looked up with their own MACs, eviction,
//! probing and the metrics address decided. Every refusal of an option is
//! raised here, with one sentence, before anything is loaded or attached.
//! The loader receives [`GuardConfig`], the agent [`AgentConfig`].

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use flowguard_common::{Config, MAX_OWN_MACS};

use crate::{
    conntrack::EvictScope,
    flowtable,
    settings::{self, Mac, Mode, Prefix, PrefixArg, SettingsError, StaticEndpoint},
    sys,
};

/// The pin directory `flowguard run` uses unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flowguard";

/// What the operator asked of `flowguard run`, option by option.
#[derive(Clone, Debug)]
pub struct RunRequest {
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
    /// As given: CIDRs, and `auto` for the guarded bridges' own.
    pub prefixes: Vec<PrefixArg>,
    pub statics: Vec<StaticEndpoint>,
    pub learn: bool,
    pub mode: Mode,
    pub pin_dir: PathBuf,
    pub event_interval: Duration,
    pub xdp: XdpAttach,
    pub auto: bool,
    pub neighbours: bool,
    pub reconcile: Duration,
    pub evict: EvictScope,
    pub dry_run: bool,
    pub evict_debounce: Duration,
    pub max_evictions_per_sec: u32,
    pub metrics: Option<SocketAddr>,
    pub metrics_allow_remote: bool,
    /// `None`: no probing.
    pub probe: Option<Selection>,
    pub probe_interval: Duration,
    pub max_probes_per_sec: u32,
    pub children: bool,
    pub max_endpoints: u32,
}

/// How XDP is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    /// Driver (native) mode, falling back to skb (generic) mode.
    Auto,
    /// Driver mode only.
    Driver,
    /// Generic (skb) mode only.
    Skb,
}

/// Which endpoints are worth probing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Endpoints of offloaded conntrack entries (`OFFLOAD`/`HW_OFFLOAD`):
    /// the only flows that keep using a cached MAC.
    Offloaded,
    /// Endpoints of any conntrack entry: every endpoint with recent traffic.
    Flows,
}

/// How the prober works.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Time between two probes of one endpoint.
    pub interval: Duration,
    /// How long to wait for an answer before asking by broadcast, and again
    /// before calling the endpoint silent.
    pub answer_wait: Duration,
    /// Most probes (unicast and broadcast) per second, overall.
    pub max_per_sec: u32,
    /// The longest time between two reads of which endpoints carry flows.
    /// They are read every round while reading is cheap; a read that takes
    /// `d` waits at least `d * REFRESH_COST_FACTOR` for the next, so that a
    /// large conntrack table costs at most about half a percent of a core.
    pub max_refresh: Duration,
    pub prefixes: Vec<Prefix>,
    pub selection: Selection,
}

/// What the loader loads, attaches, pins and writes.
#[derive(Clone, Debug)]
pub struct GuardConfig {
    /// Interfaces whose ingress gets the XDP guard.
    pub ingress: Vec<String>,
    /// Interfaces whose egress gets the tc guard.
    pub egress: Vec<String>,
    /// Learn endpoints from frames leaving the egress interfaces.
    pub learn: bool,
    pub xdp: XdpAttach,
    pub pin_dir: PathBuf,
    /// The kernel side's settings: mode, prefixes and, when learning, the
    /// interfaces' own MACs. The loader adds the event interval, in the
    /// kernel's jiffies.
    pub kernel: Config,
    /// Minimum time between two events about one endpoint.
    pub event_interval: Duration,
    /// Entries of the endpoint hash map (its size is fixed at load time).
    pub max_endpoints: u32,
    /// Endpoints whose MAC the operator gave, each once, all inside the
    /// prefixes, and not more than the hash map holds.
    pub statics: Vec<StaticEndpoint>,
}

/// How the agent keeps endpoints and flows in order.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Follow the kernel neighbour table for endpoints inside `prefixes`.
    pub neighbours: bool,
    pub prefixes: Vec<Prefix>,
    /// Period of the full reconcile with the neighbour table.
    pub reconcile: Duration,
    pub evict: EvictScope,
    /// Say what would be evicted, delete nothing.
    pub dry_run: bool,
    /// Minimum time between two evictions of one endpoint.
    pub debounce: Duration,
    /// Most evictions (endpoints) per second, overall.
    pub max_evictions_per_sec: u32,
    /// Validate endpoints that carry flows by probing them (router role,
    /// with the neighbour table followed).
    pub probe: Option<ProbeOptions>,
    /// Guard the macvlan/ipvlan children of these interfaces (host role).
    pub children: Option<Vec<String>>,
    /// `--auto`: the flowtables' bridge ports found at start. The
    /// flowtables are read again when the ruleset or an interface changes,
    /// and on SIGHUP: a new bridge port is guarded, one that leaves is named.
    pub auto: Option<Vec<String>>,
}

/// `flowguard run`, checked and complete.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub guard: GuardConfig,
    pub agent: AgentConfig,
    /// Where to serve Prometheus metrics: loopback unless the operator
    /// allowed others.
    pub metrics: Option<SocketAddr>,
    /// Sentences for the operator about what was merged or chosen for them.
    pub notes: Vec<String>,
}

/// Why `flowguard run` refuses its options. Each is one sentence that
/// names the option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(
        "nothing to attach to: give at least one --ingress IFACE or --egress IFACE, or --auto"
    )]
    NothingToAttach,
    #[error("--reconcile-secs must be at least 1")]
    Reconcile,
    #[error("--probe-interval-ms must be between 100 and 3600000")]
    ProbeInterval,
    #[error(
        "--metrics {0} is not a loopback address: anyone who reaches it reads the \
         endpoints' IPs and MACs; use 127.0.0.1:PORT or [::1]:PORT, or add --metrics-allow-remote"
    )]
    MetricsNotLoopback(SocketAddr),
    #[error("--metrics-allow-remote needs --metrics ADDR")]
    RemoteWithoutMetrics,
    #[error("--auto: {0}")]
    Auto(#[from] flowtable::FlowtableError),
    #[error("{0}")]
    PrefixAuto(flowtable::FlowtableError),
    #[error("interface '{0}' does not exist in this network namespace: check `ip link`")]
    UnknownInterface(String),
    #[error("cannot read the MAC address of '{name}': {source}")]
    InterfaceMac {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--learn on interfaces with {0} distinct MACs: the kernel side tells at most \
         {MAX_OWN_MACS} of the router's own MACs from endpoints' (learn on fewer interfaces)"
    )]
    TooManyOwnMacs(usize),
    #[error(
        "--pin-dir {path} is {what}, not a directory: give a directory for flowguard's pins, \
         e.g. {DEFAULT_PIN_DIR}"
    )]
    PinDirNotDirectory { path: String, what: &'static str },
}

/// Whether `ip` is a loopback address (127.0.0.0/8, ::1, or ::ffff:127.x.y.z).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Refuses a metrics address outside loopback unless the operator allowed it.
pub fn check_metrics_address(addr: SocketAddr, allow_remote: bool) -> Result<(), ConfigError> {
    if allow_remote || is_loopback(addr.ip()) {
        Ok(())
    } else {
        Err(ConfigError::MetricsNotLoopback(addr))
    }
}

impl RunConfig {
    /// Checks everything that can be checked before loading: first what the
    /// options say together, then the interfaces they name (with `--auto`,
    /// the flowtables first). Touches nothing.
    pub fn check(req: RunRequest) -> Result<Self, ConfigError> {
        let RunRequest {
            ingress,
            egress,
            prefixes,
            statics,
            learn,
            mode,
            pin_dir,
            event_interval,
            xdp,
            auto,
            neighbours,
            reconcile,
            evict,
            dry_run,
            evict_debounce,
            max_evictions_per_sec,
            metrics,
            metrics_allow_remote,
            probe,
            probe_interval,
            max_probes_per_sec,
            children,
            max_endpoints,
        } = req;
        settings::check_no_repeats("ingress", &ingress)?;
        settings::check_no_repeats("egress", &egress)?;
        if !auto && ingress.is_empty() && egress.is_empty() {
            return Err(ConfigError::NothingToAttach);
        }
        if reconcile.is_zero() {
            return Err(ConfigError::Reconcile);
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&probe_interval) {
            return Err(ConfigError::ProbeInterval);
        }
        match metrics {
            Some(addr) => check_metrics_address(addr, metrics_allow_remote)?,
            None if metrics_allow_remote => return Err(ConfigError::RemoteWithoutMetrics),
            None => {}
        }
        let mut notes = Vec::new();
        let mut given: Vec<Prefix> = prefixes
            .iter()
            .filter_map(|p| match p {
                PrefixArg::Given(p) => Some(*p),
                PrefixArg::Auto => None,
            })
            .collect();
        let prefix_auto = prefixes.contains(&PrefixArg::Auto);
        if !prefix_auto {
            // What the options say together, before the interfaces.
            check_prefixes(mode, &given, &statics, max_endpoints)?;
        }
        check_pin_dir(&pin_dir)?;

        let Interfaces {
            egress,
            own_macs,
            auto_found,
            learn_on_ingress,
        } = Interfaces::resolve(&ingress, egress, auto, learn, &mut notes)?;
        if prefix_auto {
            let (bridges, found) =
                flowtable::bridge_prefixes(&egress).map_err(ConfigError::PrefixAuto)?;
            notes.push(format!(
                "--prefix auto: {} (the addresses of {}, read at start)",
                found
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                bridges.join(", ")
            ));
            given.extend(found);
        }
        let Watched {
            prefixes,
            merged,
            mut kernel,
            statics,
        } = check_prefixes(mode, &given, &statics, max_endpoints)?;
        notes.extend(merged);
        // Only learning reads the own MACs: a router guarding more ports
        // than that without learning is fine.
        if learn {
            settings::set_own_macs(&mut kernel, &own_macs);
        }

        // Probing is for the router role (tc egress on the flowtable's
        // ports): the host role has no offloaded flows to validate, and
        // without the neighbour table there is no cached MAC to validate.
        let probe = probe
            .filter(|_| !egress.is_empty() && neighbours && !learn_on_ingress)
            .map(|selection| ProbeOptions {
                interval: probe_interval,
                answer_wait: (probe_interval / 4).min(Duration::from_millis(200)),
                max_per_sec: max_probes_per_sec,
                max_refresh: Duration::from_secs(30),
                prefixes: prefixes.clone(),
                selection,
            });
        let agent = AgentConfig {
            neighbours,
            prefixes,
            reconcile,
            evict,
            dry_run,
            debounce: evict_debounce,
            max_evictions_per_sec,
            probe,
            children: (children && !ingress.is_empty()).then(|| ingress.clone()),
            auto: auto_found,
        };
        let guard = GuardConfig {
            ingress,
            egress,
            learn,
            xdp,
            pin_dir,
            kernel,
            event_interval,
            max_endpoints,
            statics,
        };
        Ok(RunConfig {
            guard,
            agent,
            metrics,
            notes,
        })
    }
}

/// What the prefixes make of the options: the prefixes merged, with the
/// notes that say so; the kernel side's settings for them; the static
/// endpoints checked against them.
struct Watched {
    prefixes: Vec<Prefix>,
    merged: Vec<String>,
    kernel: Config,
    statics: Vec<StaticEndpoint>,
}

fn check_prefixes(
    mode: Mode,
    given: &[Prefix],
    statics: &[StaticEndpoint],
    max_endpoints: u32,
) -> Result<Watched, ConfigError> {
    let (prefixes, merged) = settings::merge_prefixes(given)?;
    // The prefixes' placement (array slots or the hash map) is what the
    // static endpoints are counted against.
    let kernel = settings::build_config(mode, &prefixes)?;
    let statics = settings::check_statics(statics, &prefixes, &kernel, max_endpoints)?;
    Ok(Watched {
        prefixes,
        merged,
        kernel,
        statics,
    })
}

/// The interfaces to guard, as found on this machine.
struct Interfaces {
    /// The --egress ones, with --auto's bridge ports, or the --ingress
    /// ones when only those are given with --learn.
    egress: Vec<String>,
    /// The distinct unicast MACs of all of them.
    own_macs: Vec<Mac>,
    /// --auto's bridge ports.
    auto_found: Option<Vec<String>>,
    /// Learning on the --ingress interfaces' egress.
    learn_on_ingress: bool,
}

impl Interfaces {
    /// Reads the flowtables' ports for --auto, then each interface's kind
    /// and MAC: refuses one that does not exist or cannot be guarded.
    fn resolve(
        ingress: &[String],
        mut egress: Vec<String>,
        auto: bool,
        learn: bool,
        notes: &mut Vec<String>,
    ) -> Result<Self, ConfigError> {
        let auto_found = if auto {
            let found = flowtable::auto_devices()?;
            for d in &found {
                if !egress.contains(d) {
                    egress.push(d.clone());
                }
            }
            Some(found)
        } else {
            None
        };
        if ingress.is_empty() && egress.is_empty() {
            return Err(ConfigError::NothingToAttach);
        }
        // Learning reads the frames endpoints send out of an egress: with
        // only --ingress given, that is the ingress interface's own egress.
        let learn_on_ingress = learn && egress.is_empty();
        if learn_on_ingress {
            egress = ingress.to_vec();
            notes.push(format!(
                "--learn without --egress: learning from the frames leaving {} (tc egress there)",
                ingress.join(", ")
            ));
        }
        for (option, ifaces) in [("ingress", ingress), ("egress", &egress)] {
            for iface in ifaces {
                // One that does not exist is named below.
                if let Ok(kind) = sys::link_kind(iface) {
                    settings::check_link_kind(option, iface, kind)?;
                }
            }
        }
        let mut own_macs: Vec<Mac> = Vec::new();
        for name in ingress.iter().chain(&egress) {
            if sys::ifindex(name).is_none() {
                return Err(ConfigError::UnknownInterface(name.clone()));
            }
            let mac = sys::if_mac(name).map_err(|source| ConfigError::InterfaceMac {
                name: name.clone(),
                source,
            })?;
            if mac.is_unicast() && !own_macs.contains(&mac) {
                own_macs.push(mac);
            }
        }
        if learn && own_macs.len() > MAX_OWN_MACS {
            return Err(ConfigError::TooManyOwnMacs(own_macs.len()));
        }
        Ok(Self {
            egress,
            own_macs,
            auto_found,
            learn_on_ingress,
        })
    }
}

/// Refuses a pin directory that exists as something else than a directory.
fn check_pin_dir(dir: &std::path::Path) -> Result<(), ConfigError> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(ConfigError::PinDirNotDirectory {
            path: dir.display().to_string(),
            what: if sys::is_on_bpffs(dir) {
                "a pinned object"
            } else {
                "a file"
            },
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(args: &[&str]) -> RunRequest {
        let mut req = RunRequest {
            ingress: Vec::new(),
            egress: Vec::new(),
            prefixes: vec!["10.0.0.0/8".parse().unwrap()],
            statics: Vec::new(),
            learn: false,
            mode: Mode::Fix,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            event_interval: Duration::from_secs(1),
            xdp: XdpAttach::Auto,
            auto: false,
            neighbours: true,
            reconcile: Duration::from_secs(30),
            evict: EvictScope::Offloaded,
            dry_run: false,
            evict_debounce: Duration::from_secs(2),
            max_evictions_per_sec: 50,
            metrics: None,
            metrics_allow_remote: false,
            probe: Some(Selection::Offloaded),
            probe_interval: Duration::from_secs(1),
            max_probes_per_sec: 1000,
            children: true,
            max_endpoints: 1000,
        };
        let mut it = args.iter();
        while let Some(&a) = it.next() {
            let mut value = || *it.next().expect("a value");
            match a {
                "--ingress" => req.ingress.push(value().into()),
                "--egress" => req.egress.push(value().into()),
                "--prefix" => req.prefixes.push(value().parse().unwrap()),
                "--static" => req.statics.push(value().parse().unwrap()),
                "--max-endpoints" => req.max_endpoints = value().parse().unwrap(),
                "--metrics" => req.metrics = Some(value().parse().unwrap()),
                "--metrics-allow-remote" => req.metrics_allow_remote = true,
                "--learn" => req.learn = true,
                "--reconcile-secs" => req.reconcile = Duration::from_secs(value().parse().unwrap()),
                "--probe-interval-ms" => {
                    req.probe_interval = Duration::from_millis(value().parse().unwrap())
                }
                "--pin-dir" => req.pin_dir = value().into(),
                other => panic!("unknown option {other}"),
            }
        }
        req
    }

    fn refusal(args: &[&str]) -> String {
        match RunConfig::check(request(args)) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn incoherent_options_are_refused_before_any_interface_is_looked_up() {
        // fgabsent0 does not exist: each refusal below comes first.
        for (args, wanted) in [
            (&[][..], "nothing to attach"),
            (
                &["--ingress", "lo", "--learn"],
                "--ingress lo: a loopback device carries no Ethernet frames",
            ),
            (
                &["--egress", "fgabsent0", "--egress", "fgabsent0"],
                "--egress fgabsent0 is given twice",
            ),
            (
                &["--egress", "fgabsent0", "--prefix", "::/0"],
                "--prefix ::/0 covers every address",
            ),
            (
                &[
                    "--egress",
                    "fgabsent0",
                    "--static",
                    "10.0.0.1=02:00:00:00:00:01",
                    "--static",
                    "10.0.0.1=02:00:00:00:00:02",
                ],
                "--static gives 10.0.0.1 two MACs",
            ),
            (
                &[
                    "--egress",
                    "fgabsent0",
                    "--max-endpoints",
                    "1",
                    "--static",
                    "10.0.0.1=02:00:00:00:00:01",
                    "--static",
                    "10.0.0.2=02:00:00:00:00:02",
                ],
                "2 --static endpoints go to the endpoint hash map, which holds 1",
            ),
            (
                &[
                    "--egress",
                    "fgabsent0",
                    "--static",
                    "192.168.1.1=02:00:00:00:00:01",
                ],
                "outside every --prefix",
            ),
            (
                &["--egress", "fgabsent0", "--metrics", "0.0.0.0:9737"],
                "not a loopback address",
            ),
            (
                &["--egress", "fgabsent0", "--metrics-allow-remote"],
                "needs --metrics",
            ),
            (
                &["--egress", "fgabsent0", "--reconcile-secs", "0"],
                "--reconcile-secs must be at least 1",
            ),
            (
                &["--egress", "fgabsent0", "--probe-interval-ms", "99"],
                "--probe-interval-ms must be between",
            ),
            (
                &["--egress", "fgabsent0", "--pin-dir", "/proc/self/stat"],
                "--pin-dir /proc/self/stat is a file, not a directory",
            ),
            (
                &["--egress", "fgabsent0"],
                "interface 'fgabsent0' does not exist",
            ),
        ] {
            let e = refusal(args);
            assert!(e.contains(wanted), "{args:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{args:?}: one sentence: {e}");
        }
    }

    #[test]
    fn statics_in_the_array_do_not_count_against_the_hash_map() {
        // A /24 has a slot for each address: only the /8's static needs
        // the hash map, which holds 1.
        let e = refusal(&[
            "--prefix",
            "192.168.1.0/24",
            "--egress",
            "fgabsent0",
            "--max-endpoints",
            "1",
            "--static",
            "192.168.1.1=02:00:00:00:00:01",
            "--static",
            "192.168.1.2=02:00:00:00:00:02",
            "--static",
            "10.0.0.1=02:00:00:00:00:03",
        ]);
        assert!(e.contains("interface 'fgabsent0' does not exist"), "{e}");
    }

    #[test]
    fn loopback_addresses() {
        for ok in [
            "127.0.0.1:1",
            "127.8.9.10:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(
                check_metrics_address(ok.parse().unwrap(), false).is_ok(),
                "{ok}"
            );
        }
        for remote in ["0.0.0.0:1", "192.168.1.1:1", "[::]:1", "[fd00::1]:1"] {
            let a: SocketAddr = remote.parse().unwrap();
            let e = check_metrics_address(a, false).unwrap_err().to_string();
            assert!(e.contains("not a loopback address") && e.contains("--metrics-allow-remote"));
            assert!(!e.contains('\n'));
            assert!(check_metrics_address(a, true).is_ok());
        }
    }
}
