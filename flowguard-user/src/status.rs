//! `flowguard status`: reads a running instance's pinned maps and shows the
//! global counters and, per endpoint, its MAC, source, age and evidence.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use flowguard_common::{
    endpoint_flags, pin_names, source, Config, Counters, Endpoint, EndpointKey, UserCounters,
};
use serde::Serialize;

use crate::{
    endpoints::EndpointMaps,
    instances,
    settings::{key_ip, Mac, Mode},
    sys,
};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no flowguard is running with pin directory {0} (no pinned maps there)")]
    NotRunning(String),
    #[error("reading {path}: {source}")]
    Map {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The kernel side's counters summed over CPUs, and the ones user space
/// keeps; serialised as one flat object.
#[derive(Debug, Default, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct CounterTotals {
    #[serde(flatten)]
    pub kernel: Counters,
    #[serde(flatten)]
    pub user: UserCounters,
}

impl CounterTotals {
    pub fn new<'a>(per_cpu: impl IntoIterator<Item = &'a Counters>, user: UserCounters) -> Self {
        let mut kernel = Counters::default();
        for cpu in per_cpu {
            kernel.add(cpu);
        }
        Self { kernel, user }
    }
}

#[derive(Debug, Serialize, PartialEq, Clone)]
pub struct EndpointStatus {
    pub ip: String,
    pub mac: String,
    pub source: &'static str,
    /// Seconds since the MAC was last set, when known.
    pub age_secs: Option<f64>,
    pub stale_packets: u64,
    pub rewritten: u64,
    pub last_stale_mac: Option<String>,
    pub last_stale_secs_ago: Option<f64>,
    pub ambiguous: bool,
    /// The bridge port the bridge FDB places the endpoint's MAC behind
    /// (its name, or "ifindex N"), when followed.
    pub port: Option<String>,
    /// Frames to the endpoint with its MAC that left through another port.
    pub wrong_port: u32,
}

#[derive(Debug, Serialize, PartialEq, Clone)]
pub struct Status {
    pub pin_dir: String,
    pub mode: &'static str,
    pub counters: CounterTotals,
    pub endpoints: Vec<EndpointStatus>,
    /// Whether the instance that pinned the maps still holds the pin
    /// directory's lock; pins outlive an instance that was killed.
    pub running: bool,
    /// The instance's process id (0 when unknown).
    pub pid: u32,
    /// Evictions waiting for the rate limit now.
    pub eviction_queue: u64,
    /// Entries the endpoint map can hold (`--max-endpoints`).
    pub endpoint_capacity: u32,
    /// The endpoint map holds as many entries as it can: new endpoints are
    /// left out (counted in `endpoints_dropped`).
    pub endpoint_map_full: bool,
    /// The guarded interfaces, from the links pinned in the pin directory.
    pub interfaces: Vec<InterfaceStatus>,
    /// Why each IPv4 prefix whose endpoints are in the hash map rather
    /// than the direct-indexed array is there (empty when none is).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hashed_prefixes: Vec<String>,
}

/// One guarded interface: attached, or missing (deleted; it is attached
/// again when an interface of that name comes back).
#[derive(Debug, Serialize, PartialEq, Eq, Clone)]
pub struct InterfaceStatus {
    pub name: String,
    /// `tc` or `xdp`.
    pub hook: String,
    pub attached: bool,
}

/// The guarded interfaces that pinned links name under `dir`; `pid`, the
/// running instance whose network namespace holds its clsact ports.
fn interfaces(dir: &Path, pid: Option<u32>) -> Vec<InterfaceStatus> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut list: Vec<InterfaceStatus> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            if let Some((hook, name)) = file.strip_prefix("link_").and_then(|f| f.split_once('_')) {
                return Some(InterfaceStatus {
                    name: name.to_string(),
                    hook: hook.to_string(),
                    attached: sys::pinned_link_ifindex(&e.path()).is_ok_and(|i| i != 0),
                });
            }
            // Before TCX: the program pinned per port, attached while the
            // port's clsact egress hook runs it.
            let (hook, name) = file.strip_prefix("clsact_")?.split_once('_')?;
            let attached = aya::programs::ProgramInfo::from_pin(e.path()).is_ok_and(|p| {
                let runs_it = || {
                    instances::clsact_filters(name, aya::programs::TcAttachType::Egress)
                        .iter()
                        .any(|f| f.program.id == p.id())
                };
                // Port names are looked up where the daemon runs.
                match pid {
                    Some(pid) => sys::in_netns_of(pid, runs_it).unwrap_or_else(|_| runs_it()),
                    None => runs_it(),
                }
            });
            Some(InterfaceStatus {
                name: name.to_string(),
                hook: hook.to_string(),
                attached,
            })
        })
        .collect();
    list.sort_by(|a, b| (&a.name, &a.hook).cmp(&(&b.name, &b.hook)));
    list
}

impl Status {
    /// The guarded interfaces that are missing now, as `lan1 (tc)`.
    pub fn missing_interfaces(&self) -> Vec<String> {
        self.interfaces
            .iter()
            .filter(|i| !i.attached)
            .map(|i| format!("{} ({})", i.name, i.hook))
            .collect()
    }

    /// Why these pins answer for no running instance, or `None` if one runs.
    pub fn not_running(&self) -> Option<String> {
        if self.running {
            return None;
        }
        let who = match self.pid {
            0 => "an instance".to_string(),
            pid => format!("PID {pid}"),
        };
        Some(format!(
            "flowguard at {} is not running; pins left by {who}, which is gone \
             (the counters are its last; its programs keep guarding through pinned links \
             until `flowguard run` with this pin directory adopts them)",
            self.pin_dir
        ))
    }
}

/// Whether an instance holds the lock of `dir`, and its process id: the lock
/// holder's, else the one recorded with the pins.
fn liveness(dir: &Path, recorded: u64) -> (bool, u32) {
    let recorded = u32::try_from(recorded).unwrap_or(0);
    match sys::flock_holder(dir) {
        Ok(Some(pid)) => (true, pid),
        Ok(None) => (false, recorded),
        // Without /proc/locks, a live recorded process is the best evidence.
        Err(_) => (recorded != 0 && sys::process_exists(recorded), recorded),
    }
}

pub fn source_name(s: u8) -> &'static str {
    match s {
        source::STATIC => "static",
        source::NEIGHBOUR => "neighbour",
        source::LEARNED => "learned",
        source::CHILD => "child",
        _ => "unknown",
    }
}

fn secs_since(now_ns: u64, then_ns: u64) -> Option<f64> {
    (then_ns != 0 && now_ns >= then_ns).then(|| (now_ns - then_ns) as f64 / 1e9)
}

/// The status of one endpoint at monotonic time `now_ns`; `ports`, the
/// names of the bridge ports by ifindex, where the daemon runs.
pub fn endpoint_status(
    key: &EndpointKey,
    ep: &Endpoint,
    now_ns: u64,
    ports: &BTreeMap<u32, String>,
) -> EndpointStatus {
    EndpointStatus {
        ip: key_ip(key).to_string(),
        mac: Mac(ep.mac).to_string(),
        source: source_name(ep.source),
        age_secs: secs_since(now_ns, ep.updated_ns),
        stale_packets: ep.stale_packets,
        rewritten: ep.rewritten,
        last_stale_mac: (ep.stale_packets != 0).then(|| Mac(ep.last_stale_mac).to_string()),
        last_stale_secs_ago: secs_since(now_ns, ep.last_stale_ns),
        ambiguous: ep.flags & endpoint_flags::AMBIGUOUS != 0,
        port: (ep.port != 0).then(|| {
            ports
                .get(&ep.port)
                .cloned()
                .unwrap_or_else(|| format!("ifindex {}", ep.port))
        }),
        wrong_port: ep.wrong_port,
    }
}

fn open(dir: &Path, file: &str) -> Result<Map, StatusError> {
    let path = dir.join(file);
    if !path.exists() {
        return Err(StatusError::NotRunning(dir.display().to_string()));
    }
    let data = MapData::from_pin(&path).map_err(|source| StatusError::Map {
        path: path.display().to_string(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| StatusError::Map {
        path: path.display().to_string(),
        source,
    })
}

/// Reads the pinned maps under `dir`.
pub fn read(dir: &Path) -> Result<Status, StatusError> {
    let err = |file: &str| {
        let path = dir.join(file).display().to_string();
        move |source| StatusError::Map { path, source }
    };
    let config: Array<MapData, Config> =
        Array::try_from(open(dir, pin_names::CONFIG)?).map_err(err(pin_names::CONFIG))?;
    let config = config.get(&0, 0).map_err(err(pin_names::CONFIG))?;
    let counters: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(open(dir, pin_names::COUNTERS)?).map_err(err(pin_names::COUNTERS))?;
    let per_cpu = counters.get(&0, 0).map_err(err(pin_names::COUNTERS))?;
    let user: Array<MapData, UserCounters> = Array::try_from(open(dir, pin_names::USER_COUNTERS)?)
        .map_err(err(pin_names::USER_COUNTERS))?;
    let user = user.get(&0, 0).map_err(err(pin_names::USER_COUNTERS))?;
    let endpoints = open(dir, pin_names::ENDPOINTS)?;
    let capacity = match &endpoints {
        Map::HashMap(data) => data.info().map(|i| i.max_entries()).unwrap_or(0),
        _ => 0,
    };
    let hash: HashMap<MapData, EndpointKey, Endpoint> =
        HashMap::try_from(endpoints).map_err(err(pin_names::ENDPOINTS))?;
    // The direct-indexed IPv4 endpoints (pinned by every build that has them).
    let v4 = match dir.join(pin_names::ENDPOINTS_V4).exists() {
        true => Some(
            Array::try_from(open(dir, pin_names::ENDPOINTS_V4)?)
                .map_err(err(pin_names::ENDPOINTS_V4))?,
        ),
        false => None,
    };
    let maps = EndpointMaps { hash, v4, config };
    let now = sys::monotonic_ns();
    let entries = maps.entries().map_err(err(pin_names::ENDPOINTS_V4))?;
    let (running, pid) = liveness(dir, user.owner_pid);
    let ports = port_names(
        entries.iter().map(|(_, v)| v.port).filter(|&p| p != 0),
        running.then_some(pid),
    );
    let mut list = Vec::new();
    for (k, v) in &entries {
        list.push((key_ip(k), endpoint_status(k, v, now, &ports)));
    }
    list.sort_by_key(|e| e.0);
    let hash_len = maps.hash_len();
    Ok(Status {
        pin_dir: dir.display().to_string(),
        mode: Mode::from_config(maps.config.mode),
        counters: CounterTotals::new(per_cpu.iter(), user),
        endpoints: list.into_iter().map(|(_, s)| s).collect(),
        running,
        pid,
        eviction_queue: user.eviction_queue,
        endpoint_capacity: capacity,
        endpoint_map_full: capacity != 0 && hash_len >= capacity as usize,
        interfaces: interfaces(dir, running.then_some(pid)),
        hashed_prefixes: crate::settings::hash_path_notes(&maps.config),
    })
}

/// The names of these ifindexes, looked up where the daemon runs (`pid`):
/// its ports are in its network namespace, which need not be this one.
fn port_names(ifindexes: impl Iterator<Item = u32>, pid: Option<u32>) -> BTreeMap<u32, String> {
    let wanted: BTreeSet<u32> = ifindexes.collect();
    if wanted.is_empty() {
        return BTreeMap::new();
    }
    let names = || {
        wanted
            .iter()
            .filter_map(|&i| sys::ifname(i).map(|n| (i, n)))
            .collect()
    };
    match pid {
        Some(pid) => sys::in_netns_of(pid, names).unwrap_or_else(|_| names()),
        None => names(),
    }
}

fn fmt_secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.1}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

/// The human-readable form.
pub fn render(st: &Status) -> String {
    let (c, u) = (&st.counters.kernel, &st.counters.user);
    let mut out = String::new();
    let _ = writeln!(out, "flowguard at {} ({} mode)", st.pin_dir, st.mode);
    let _ = writeln!(
        out,
        "frames to stale MACs: {}, rewritten: {}, ambiguous (untouched): {}, \
         not confirmed by the neighbour table (untouched): {}",
        c.stale, c.rewritten, c.ambiguous, c.unconfirmed
    );
    let _ = writeln!(
        out,
        "events: {} sent, {} lost; learned: {} new, {} moved, {} failed",
        c.events, c.events_lost, c.learned_new, c.learned_moved, c.learn_failed
    );
    let _ = writeln!(
        out,
        "neighbour table: {} added, {} moved, {} removed, {} ambiguous, {} overflows, {} reconciles",
        u.neigh_added, u.neigh_moved, u.neigh_removed, u.neigh_ambiguous, u.neigh_overflows, u.reconciles
    );
    let _ = writeln!(
        out,
        "eviction: {} runs, {} conntrack entries deleted, {} matched in dry runs, {} errors",
        u.eviction_runs, u.evicted, u.dry_run_matches, u.eviction_errors
    );
    let _ = writeln!(
        out,
        "probing: {} probes sent, {} endpoints unanswered, {} moves found, {} ambiguous",
        u.probes_sent, u.probes_unanswered, u.probe_moves, u.probe_ambiguous
    );
    let _ = writeln!(
        out,
        "macvlan/ipvlan children: {} endpoints written, {} removed",
        u.children_added, u.children_removed
    );
    let _ = writeln!(
        out,
        "bridge ports: {} endpoint moves to another port, {} flapping episodes; \
         frames out of a wrong port: {}, redirected: {}",
        u.port_moves, u.port_flaps, c.wrong_port, c.redirected
    );
    if u.evictions_deferred > 0 || u.eviction_queue > 0 {
        let _ = writeln!(
            out,
            "eviction queue: {} waiting for the rate limit, {} deferred so far (none dropped)",
            u.eviction_queue, u.evictions_deferred
        );
    }
    if !st.interfaces.is_empty() {
        let each: Vec<String> = st
            .interfaces
            .iter()
            .map(|i| {
                let state = if i.attached { "attached" } else { "MISSING" };
                format!("{} ({}) {state}", i.name, i.hook)
            })
            .collect();
        let _ = writeln!(out, "interfaces: {}", each.join(", "));
    }
    if st.endpoint_map_full {
        let _ = writeln!(
            out,
            "endpoint map FULL: {} of {} entries; {} endpoints left out so far \
             (the rest stay guarded; raise --max-endpoints)",
            st.endpoint_capacity, st.endpoint_capacity, u.endpoints_dropped
        );
    }
    if st.endpoints.is_empty() {
        let _ = writeln!(out, "no endpoints known yet");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<39} {:<17} {:<9} {:>7} {:>10} {:>10} {:<17} {:>10} {:<15} {:>10}",
        "ENDPOINT",
        "MAC",
        "SOURCE",
        "AGE",
        "STALE",
        "REWRITTEN",
        "LAST STALE MAC",
        "LAST SEEN",
        "PORT",
        "WRONG PORT"
    );
    for e in &st.endpoints {
        let _ = writeln!(
            out,
            "{:<39} {:<17} {:<9} {:>7} {:>10} {:>10} {:<17} {:>10} {:<15} {:>10}{}",
            e.ip,
            e.mac,
            e.source,
            fmt_secs(e.age_secs),
            e.stale_packets,
            e.rewritten,
            e.last_stale_mac.as_deref().unwrap_or("-"),
            fmt_secs(e.last_stale_secs_ago),
            e.port.as_deref().unwrap_or("-"),
            e.wrong_port,
            if e.ambiguous { "  AMBIGUOUS" } else { "" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_over_cpus() {
        let a = Counters {
            stale: 2,
            rewritten: 1,
            ..Counters::default()
        };
        let b = Counters {
            stale: 3,
            learned_new: 1,
            ..Counters::default()
        };
        let user = UserCounters {
            evicted: 4,
            ..UserCounters::default()
        };
        let t = CounterTotals::new([&a, &b], user);
        assert_eq!(
            (
                t.kernel.stale,
                t.kernel.rewritten,
                t.kernel.learned_new,
                t.user.evicted
            ),
            (5, 1, 1, 4)
        );
    }

    #[test]
    fn endpoint_status_fields() {
        let key = EndpointKey::from_v4_bytes([192, 168, 1, 240]);
        let ep = Endpoint {
            mac: [2, 0, 0, 0, 0, 2],
            source: source::LEARNED,
            updated_ns: 1_000_000_000,
            stale_packets: 4,
            rewritten: 4,
            last_stale_ns: 2_000_000_000,
            last_stale_mac: [2, 0, 0, 0, 0, 1],
            port: 7,
            wrong_port: 3,
            ..Endpoint::default()
        };
        let names = BTreeMap::from([(7, "lan2".to_string())]);
        let s = endpoint_status(&key, &ep, 3_500_000_000, &names);
        assert_eq!(s.ip, "192.168.1.240");
        assert_eq!(s.mac, "02:00:00:00:00:02");
        assert_eq!(s.source, "learned");
        assert_eq!(s.age_secs, Some(2.5));
        assert_eq!(s.last_stale_secs_ago, Some(1.5));
        assert_eq!(s.last_stale_mac.as_deref(), Some("02:00:00:00:00:01"));
        assert_eq!((s.port.as_deref(), s.wrong_port), (Some("lan2"), 3));
        let gone = Endpoint { port: 9, ..ep };
        let s = endpoint_status(&key, &gone, 3_500_000_000, &names);
        assert_eq!(s.port.as_deref(), Some("ifindex 9"), "a port with no name");
        let fresh = endpoint_status(&key, &Endpoint::default(), 5, &names);
        assert_eq!((fresh.age_secs, fresh.last_stale_mac), (None, None));
        assert_eq!(fresh.port, None);
    }

    #[test]
    fn render_mentions_every_endpoint() {
        let st = Status {
            pin_dir: "/sys/fs/bpf/flowguard".into(),
            mode: "fix",
            counters: CounterTotals {
                kernel: Counters {
                    stale: 7,
                    rewritten: 7,
                    ..Counters::default()
                },
                ..Default::default()
            },
            endpoints: vec![endpoint_status(
                &EndpointKey::from_v4_bytes([192, 168, 1, 240]),
                &Endpoint {
                    mac: [2, 0, 0, 0, 0, 2],
                    source: source::STATIC,
                    ..Endpoint::default()
                },
                0,
                &BTreeMap::new(),
            )],
            running: true,
            pid: 42,
            eviction_queue: 0,
            endpoint_capacity: 16_384,
            endpoint_map_full: false,
            interfaces: vec![InterfaceStatus {
                name: "lan1".into(),
                hook: "tc".into(),
                attached: false,
            }],
            hashed_prefixes: Vec::new(),
        };
        let text = render(&st);
        assert!(
            text.contains("frames to stale MACs: 7, rewritten: 7"),
            "{text}"
        );
        assert!(text.contains("interfaces: lan1 (tc) MISSING"), "{text}");
        assert!(
            text.contains("192.168.1.240") && text.contains("static"),
            "{text}"
        );
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["endpoints"][0]["mac"], "02:00:00:00:00:02");
        assert_eq!(json["counters"]["stale"], 7);
        assert_eq!(json["running"], true);
        assert!(json["counters"].get("owner_pid").is_none(), "not a counter");
        assert_eq!(st.not_running(), None);
        let dead = Status {
            running: false,
            ..st
        };
        let why = dead.not_running().unwrap();
        assert!(
            why.contains("not running; pins left by PID 42, which is gone"),
            "{why}"
        );
    }

    #[test]
    fn missing_pin_dir_is_not_running() {
        let e = read(Path::new("/nonexistent/flowguard")).unwrap_err();
        assert!(matches!(e, StatusError::NotRunning(_)), "{e}");
    }
}
