//! The user-space loop of `flowguard run`: says what the kernel side saw,
//! keeps the endpoint map equal to the neighbour table, and evicts the
//! conntrack entries of an endpoint whose MAC changed (or that the kernel
//! side caught with a stale MAC), so that the flowtable learns the path anew.

use std::{
    net::IpAddr,
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use aya::maps::{MapData, RingBuf};
use flowguard_common::{event_kind, UserCounters};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    children,
    conntrack::{Admission, Conntrack, DeferredEvictions, EvictScope, EvictionPolicy},
    endpoints, events,
    links::{LinkEvent, Notice, Subscription},
    loader::{Guard, KernelLogger},
    metrics,
    neigh::{self, MapChange, NeighCache, NeighEvent, NeighbourSource},
    probe::{self, ProbeReport, Targets},
    run_config::{AgentConfig, Selection},
    settings::{key_ip, Mac},
    sys,
};

/// Why an endpoint's flows are evicted.
#[derive(Clone, Debug)]
enum Trigger {
    NeighbourMoved(String),
    StaleFrames(String),
}

struct EvictRequest {
    ip: IpAddr,
    trigger: Trigger,
}

struct EvictOutcome {
    flows: u64,
    dry_run: bool,
    failed: bool,
}

/// Runs until SIGINT, SIGTERM or SIGQUIT.
pub async fn run(
    guard: &mut Guard,
    ring: RingBuf<MapData>,
    opts: &AgentConfig,
    metrics: Option<metrics::Server>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd and mmap, and both live exactly
    // as long as the AsyncFd that owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("watching the event ring buffer: {e}"))?;
    let mut kernel_log = match guard.take_logger() {
        // SAFETY: the logger owns its ring buffer's fd and mmap, which live
        // exactly as long as the AsyncFd that owns the logger.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| anyhow!("watching the kernel side's log: {e}"))?,
        ),
        None => None,
    };
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Their default action kills the process and leaves the pins behind:
    // SIGQUIT stops cleanly, SIGHUP re-reads, SIGUSR1/2 are ignored.
    let mut quit = signal(SignalKind::quit()).context("installing the SIGQUIT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    // A stop asked for during start-up was held until now: it is handled.
    sys::release_stop_signals();
    // Serves until this function returns (the task is aborted on drop).
    let _metrics = match &metrics {
        Some(server) => Some(server.spawn().context("serving metrics")?),
        None => None,
    };

    let (outcome_tx, mut outcomes) = mpsc::unbounded_channel();
    let evictor = (opts.evict != EvictScope::Off).then(|| start_evictor(opts, outcome_tx));
    let mut policy = EvictionGate::new(opts.debounce, opts.max_evictions_per_sec);
    let mut eviction_tick = tokio::time::interval(Duration::from_millis(100));
    eviction_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut departed = Departed::default();
    let mut full = FullMap::new(guard.endpoint_capacity);

    // Shared with the prober, which reads where to ask each endpoint.
    let shared = Targets::new(std::sync::Mutex::new(NeighCache::new(
        opts.prefixes.clone(),
    )));
    let neighbours = || shared.lock().expect("neighbour cache lock");
    let mut source = None;
    if opts.neighbours {
        let (src, entries) = NeighbourSource::open()
            .await
            .context("reading the neighbour table")?;
        let changes = refill(&shared, entries, guard, &mut full)?;
        report_changes(
            guard,
            &changes,
            &mut policy,
            &mut departed,
            evictor.as_ref(),
            false,
        )?;
        crate::say!(
            "flowguard: following the neighbour table ({} endpoints in the prefixes{})",
            neighbours().len(),
            full.describe()
        );
        source = Some(src);
    }
    let (probe_tx, mut probe_reports) = mpsc::unbounded_channel();
    match (&opts.probe, source.is_some()) {
        (Some(p), true) => {
            let active = probe::conntrack_active_set(p.selection, p.prefixes.clone());
            match probe::start(p.clone(), shared.clone(), active, probe_tx) {
                Ok(()) => crate::say!(
                    "flowguard: probing endpoints that carry {} every {} ms (ARP: the cached MAC, then broadcast)",
                    match p.selection {
                        Selection::Offloaded => "offloaded flows",
                        Selection::Flows => "flows",
                    },
                    p.interval.as_millis()
                ),
                // Guarding goes on; only silent endpoints stay unseen.
                Err(e) => crate::say_err!(
                    "flowguard: probing is off: no ARP packet socket ({e}; it needs CAP_NET_RAW): \
                     endpoints that announce nothing after a MAC change are not found"
                ),
            }
        }
        // Without the neighbour table there is no cached MAC to validate.
        _ => drop(probe_tx),
    }
    let mut children = match &opts.children {
        Some(parents) => children::start(guard, parents, &opts.prefixes).await?,
        None => None,
    };
    // Interfaces are followed through rtnetlink: a guarded port deleted and
    // created again gets its programs at once. The timer only retries an
    // attach that failed on an interface that came back (nothing else
    // announces when it would work), or polls by name if the kernel refused
    // the subscription.
    let mut links = match Subscription::links() {
        Ok(s) => Some(s),
        Err(e) => {
            crate::say_err!(
                "flowguard: cannot follow interface changes through netlink ({e}): \
                 looking the guarded interfaces up once a second instead"
            );
            None
        }
    };
    let mut link_timer = tokio::time::interval(Duration::from_secs(1));
    link_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // --auto: what the flowtables said last, and when to read them again
    // (a burst of ruleset or interface changes is read once, after it).
    let mut auto = opts.auto.clone().map(AutoPorts::new);
    let mut ruleset = match &auto {
        Some(_) => match Subscription::nftables() {
            Ok(s) => Some(s),
            Err(e) => {
                crate::say_err!(
                    "flowguard: cannot follow nftables ruleset changes ({e}): the flowtables are \
                     read again on interface changes and on SIGHUP only"
                );
                None
            }
        },
        None => None,
    };
    let mut flowtables_due: Option<tokio::time::Instant> = None;
    let read_soon = |due: &mut Option<tokio::time::Instant>| {
        due.get_or_insert_with(|| tokio::time::Instant::now() + AutoPorts::SETTLE);
    };
    let mut reconcile_timer = tokio::time::interval(opts.reconcile);
    reconcile_timer.tick().await;

    // Every change is followed from here on (interfaces, the neighbour
    // table, the ruleset, children) and the stop signals are handled: a
    // port deleted after this line is seen.
    crate::say!("flowguard: ready");
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = quit.recv() => return Ok(()),
            _ = usr1.recv() => log::info!("SIGUSR1 ignored (SIGINT, SIGTERM or SIGQUIT stop flowguard; SIGHUP re-reads the neighbour table and the flowtables)"),
            _ = usr2.recv() => log::info!("SIGUSR2 ignored (SIGINT, SIGTERM or SIGQUIT stop flowguard; SIGHUP re-reads the neighbour table and the flowtables)"),
            _ = hup.recv() => {
                let neighbours = match source.as_mut() {
                    Some(src) => {
                        let changes = reread(src, &shared, guard, &mut full).await?;
                        bump(guard, |c| c.reconciles += 1)?;
                        report_changes(guard, &changes, &mut policy, &mut departed, evictor.as_ref(), true)?;
                        format!(
                            "read the neighbour table again ({} endpoints in the prefixes, {} changed)",
                            neighbours().len(),
                            changes.len()
                        )
                    }
                    None => "not following the neighbour table (--no-neigh)".to_string(),
                };
                // One read of the flowtables serves --auto and the summary.
                let ports = crate::flowtable::auto_devices().map_err(|e| e.to_string());
                if let Some(auto) = auto.as_mut() {
                    flowtables_due = None;
                    say_all(auto.follow(guard, ports.clone()));
                }
                log::info!("SIGHUP: {neighbours}; {}", flowtable_summary(guard, ports, auto.is_some()));
            }
            notice = next_ruleset_change(&mut ruleset) => {
                match notice {
                    Ok(_) => read_soon(&mut flowtables_due),
                    Err(e) => {
                        crate::say_err!(
                            "flowguard: following nftables ruleset changes failed ({e}): the \
                             flowtables are read again on interface changes and on SIGHUP only"
                        );
                        ruleset = None;
                    }
                }
            }
            _ = sleep_until(flowtables_due) => {
                flowtables_due = None;
                if let Some(auto) = auto.as_mut() {
                    say_all(auto.follow(guard, crate::flowtable::auto_devices().map_err(|e| e.to_string())));
                }
            }
            ready = ring.readable_mut() => {
                let mut ready = ready.context("waiting for events")?;
                let mut stale = Vec::new();
                let ring = ready.get_inner_mut();
                while let Some(item) = ring.next() {
                    match events::decode(&item) {
                        Some(ev) => {
                            crate::say!("{}", events::describe(&ev, sys::ifname));
                            if ev.kind == event_kind::STALE {
                                stale.push((key_ip(&ev.endpoint), events::describe_short(&ev)));
                            }
                        }
                        None => log::warn!("ignoring an event of {} bytes", item.len()),
                    }
                }
                ready.clear_ready();
                for (ip, why) in stale {
                    request_eviction(&mut policy, evictor.as_ref(), ip, Trigger::StaleFrames(why));
                }
            }
            ready = kernel_log_ready(&mut kernel_log) => {
                let mut ready = ready.context("waiting for the kernel side's log")?;
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
            ev = next_neigh(&mut source) => {
                let ev = ev.context("following the neighbour table")?;
                let src = source.as_mut().expect("only polled with a source");
                let changes = if matches!(ev, NeighEvent::Overflow) {
                    log::warn!("missed neighbour events (the kernel's buffer overflowed): reading the whole table again");
                    bump(guard, |c| c.neigh_overflows += 1)?;
                    reread(src, &shared, guard, &mut full).await?
                } else {
                    let mut map = guard.endpoints()?;
                    let mut changes = Vec::new();
                    let mut dropped = 0;
                    let mut cache = neighbours();
                    let ips = cache.apply(&ev);
                    for ip in ips {
                        match neigh::sync_ip(&mut map, &cache, ip) {
                            Ok(Some(c)) => changes.push(c),
                            Ok(None) => {}
                            // A full map ends nothing: the endpoints in it stay guarded.
                            Err(e) if endpoints::is_full(&e) => dropped += u64::from(full.left_out(ip)),
                            Err(e) => return Err(e).with_context(|| format!("updating endpoint {ip}")),
                        }
                    }
                    if dropped > 0 {
                        bump(guard, |c| c.endpoints_dropped += dropped)?;
                    }
                    changes
                };
                report_changes(guard, &changes, &mut policy, &mut departed, evictor.as_ref(), true)?;
            }
            _ = reconcile_timer.tick(), if source.is_some() => {
                let src = source.as_mut().expect("guarded by the condition");
                let changes = reread(src, &shared, guard, &mut full).await?;
                bump(guard, |c| c.reconciles += 1)?;
                if !changes.is_empty() {
                    log::info!("periodic reconcile repaired {} endpoints", changes.len());
                }
                report_changes(guard, &changes, &mut policy, &mut departed, evictor.as_ref(), true)?;
            }
            Some(report) = probe_reports.recv() => {
                match &report {
                    ProbeReport::Round { .. } => log::debug!("{report}"),
                    _ => crate::say!("{report}"),
                }
                bump(guard, |c| match &report {
                    ProbeReport::Round { sent, unanswered, .. } => {
                        c.probes_sent += sent;
                        c.probes_unanswered += unanswered;
                    }
                    ProbeReport::Moved { .. } => c.probe_moves += 1,
                    ProbeReport::Ambiguous { .. } => c.probe_ambiguous += 1,
                    ProbeReport::Silent { .. } | ProbeReport::Failed(_) => {}
                })?;
            }
            changes = children::next(&mut children) => {
                let src = children.as_mut().expect("only polled with a source");
                let applied = src.apply(&mut guard.endpoints()?, &changes);
                for s in &applied.sentences {
                    crate::say!("{s}");
                }
                bump(guard, |c| {
                    c.children_added += applied.added;
                    c.children_removed += applied.removed;
                })?;
            }
            notice = next_links(&mut links) => {
                match notice.context("following interface changes")? {
                    Notice::Events(events) => {
                        for ev in &events {
                            if let LinkEvent::Gone { index, .. } = ev {
                                say_all(guard.interface_gone(*index));
                            }
                        }
                    }
                    Notice::Lost => log::debug!("missed interface changes: looking the guarded interfaces up"),
                }
                // A port may have joined or left a bridge (or a flowtable's
                // device come back): --auto reads the flowtables again.
                if auto.is_some() {
                    read_soon(&mut flowtables_due);
                }
                say_all(guard.follow_interfaces());
            }
            _ = link_timer.tick(), if links.is_none() || guard.retry_pending() => {
                say_all(guard.follow_interfaces());
            }
            _ = eviction_tick.tick(), if policy.needs_tick() => {
                policy.drain(evictor.as_ref());
                policy.show(guard)?;
            }
            Some(outcome) = outcomes.recv() => {
                bump(guard, |c| {
                    c.eviction_runs += 1;
                    if outcome.failed {
                        c.eviction_errors += 1;
                    } else if outcome.dry_run {
                        c.dry_run_matches += outcome.flows;
                    } else {
                        c.evicted += outcome.flows;
                    }
                })?;
            }
        }
    }
}

/// What the flowtables say now about where MACs are cached, against what is
/// guarded: a bridge port added to a flowtable since the start is named.
fn flowtable_summary(guard: &Guard, read: Result<Vec<String>, String>, auto: bool) -> String {
    let ports = match read {
        Ok(ports) => ports,
        Err(e) => return format!("flowtables: {e}"),
    };
    let unguarded: Vec<&str> = ports
        .iter()
        .filter(|p| !guard.guards_egress(p))
        .map(String::as_str)
        .collect();
    if unguarded.is_empty() {
        format!("flowtables: bridge ports {}, all guarded", ports.join(", "))
    } else if auto {
        format!(
            "flowtables: bridge ports {}; not guarded: {} (see the lines above)",
            ports.join(", "),
            unguarded.join(", ")
        )
    } else {
        format!(
            "flowtables: bridge ports {}; not guarded: {} (restart with --auto or --egress to guard them)",
            ports.join(", "),
            unguarded.join(", ")
        )
    }
}

/// `--auto` while running: the flowtables' bridge ports as last read.
struct AutoPorts {
    ports: Vec<String>,
    /// The last failure (reading, or attaching to a port), said once.
    failures: std::collections::HashSet<String>,
}

impl AutoPorts {
    /// How long a burst of changes may last before the flowtables are read.
    const SETTLE: Duration = Duration::from_millis(500);

    fn new(ports: Vec<String>) -> Self {
        Self {
            ports,
            failures: Default::default(),
        }
    }

    /// Takes the flowtables' bridge ports as read again: guards a port
    /// that joined one, names one that left. One sentence per change.
    fn follow(&mut self, guard: &mut Guard, read: Result<Vec<String>, String>) -> Vec<String> {
        let mut said = Vec::new();
        let ports = match read {
            Ok(ports) => ports,
            Err(e) => {
                let why = format!(
                    "flowguard: reading the flowtables: {e}; the guarded ports stay guarded"
                );
                if self.failures.insert(why.clone()) {
                    said.push(why);
                }
                return said;
            }
        };
        self.failures
            .retain(|f| !f.starts_with("flowguard: reading the flowtables"));
        for port in &ports {
            if guard.guards_egress(port) {
                continue;
            }
            match guard.add_egress(port) {
                Ok(how) => said.push(format!(
                    "flowguard: {port} is a flowtable bridge port now: {how} attached"
                )),
                Err(e) => {
                    let why = format!(
                        "flowguard: {port} is a flowtable bridge port now, but cannot be guarded: {e}"
                    );
                    if self.failures.insert(why.clone()) {
                        said.push(why);
                    }
                }
            }
        }
        for old in &self.ports {
            // A deleted port is named by the interface follower.
            if !ports.contains(old) && crate::sys::ifindex(old).is_some() {
                said.push(format!(
                    "flowguard: {old} is no longer a flowtable bridge port: still guarded \
                     (harmless; restart flowguard to leave it)"
                ));
            }
        }
        self.ports = ports;
        said
    }
}

async fn next_ruleset_change(sub: &mut Option<Subscription>) -> std::io::Result<Notice<()>> {
    match sub {
        Some(s) => s.next_change().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn kernel_log_ready(
    log: &mut Option<AsyncFd<KernelLogger>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, KernelLogger>> {
    match log {
        Some(l) => l.readable_mut().await,
        None => std::future::pending().await,
    }
}

async fn next_links(links: &mut Option<Subscription>) -> std::io::Result<Notice<LinkEvent>> {
    match links {
        Some(s) => s.next_links().await,
        None => std::future::pending().await,
    }
}

async fn next_neigh(source: &mut Option<NeighbourSource>) -> Result<NeighEvent, neigh::NeighError> {
    match source {
        Some(s) => s.next_event().await,
        None => std::future::pending().await,
    }
}

fn reconcile(
    guard: &mut Guard,
    cache: &NeighCache,
    full: &mut FullMap,
) -> anyhow::Result<Vec<MapChange>> {
    let mut map = guard.endpoints()?;
    let changes = neigh::reconcile(&mut map, cache)
        .context("reconciling the endpoint map with the neighbour table")?;
    let in_map: std::collections::HashSet<IpAddr> = map
        .keys()
        .filter_map(Result::ok)
        .map(|k| key_ip(&k))
        .collect();
    // Only the hash map can be full: the array has a slot for every address.
    let hash_len = map.hash_len();
    let mut dropped = 0;
    if hash_len >= full.capacity {
        for ip in cache.ips() {
            if !in_map.contains(&ip) && !matches!(cache.desired(ip), neigh::Desired::Absent) {
                dropped += u64::from(full.left_out(ip));
            }
        }
    } else {
        full.room(hash_len);
    }
    if dropped > 0 {
        bump(guard, |c| c.endpoints_dropped += dropped)?;
    }
    Ok(changes)
}

/// An episode of a full endpoint map: said once when it starts and once
/// when there is room again, with the endpoints it left out counted once
/// each (not at every reconcile).
struct FullMap {
    capacity: usize,
    left_out: std::collections::HashSet<IpAddr>,
}

impl FullMap {
    fn new(capacity: u32) -> Self {
        Self {
            capacity: capacity as usize,
            left_out: Default::default(),
        }
    }

    /// Records that `ip` did not fit; true the first time in this episode.
    fn left_out(&mut self, ip: IpAddr) -> bool {
        if self.left_out.is_empty() {
            log::warn!(
                "the endpoint map is full ({} entries): {ip} and further endpoints are not guarded \
                 until entries leave (the endpoints in it stay guarded; raise --max-endpoints)",
                self.capacity
            );
        }
        self.left_out.insert(ip)
    }

    /// The map holds `len` entries, below its capacity: the episode is over.
    fn room(&mut self, len: usize) {
        if !self.left_out.is_empty() {
            log::info!(
                "the endpoint map has room again ({len} of {} entries): {} endpoints were left out while it was full",
                self.capacity,
                self.left_out.len()
            );
            self.left_out.clear();
        }
    }

    /// ", the endpoint map is full: N left out" while it is.
    fn describe(&self) -> String {
        if self.left_out.is_empty() {
            String::new()
        } else {
            format!(
                "; the endpoint map is full at {} entries: {} left out",
                self.capacity,
                self.left_out.len()
            )
        }
    }
}

/// Read-modify-write of the user-space counters (this loop is their only writer).
/// Reads the whole neighbour table again into the shared cache and
/// reconciles the endpoint map with it.
async fn reread(
    src: &mut NeighbourSource,
    shared: &Targets,
    guard: &mut Guard,
    full: &mut FullMap,
) -> anyhow::Result<Vec<MapChange>> {
    let entries = src.dump().await.context("dumping the neighbour table")?;
    refill(shared, entries, guard, full)
}

/// Replaces the shared cache with a whole table and reconciles the
/// endpoint map with it.
fn refill(
    shared: &Targets,
    entries: Vec<neigh::NeighEntry>,
    guard: &mut Guard,
    full: &mut FullMap,
) -> anyhow::Result<Vec<MapChange>> {
    let mut cache = shared.lock().expect("neighbour cache lock");
    cache.replace_all(entries);
    reconcile(guard, &cache, full)
}

/// Says each line on stdout.
fn say_all(lines: Vec<String>) {
    for line in lines {
        crate::say!("{line}");
    }
}

fn bump(guard: &mut Guard, f: impl FnOnce(&mut UserCounters)) -> anyhow::Result<()> {
    let mut arr = guard.user_counters()?;
    let mut c = arr.get(&0, 0).context("reading user counters")?;
    f(&mut c);
    arr.set(0, c, 0).context("writing user counters")?;
    Ok(())
}

/// The last MAC of endpoints that left the neighbour table (deleted,
/// FAILED, flushed with their bridge), so that a return at another MAC is
/// seen for the move it is: flows offloaded toward the old MAC are stale.
#[derive(Default)]
struct Departed {
    macs: std::collections::HashMap<IpAddr, (Mac, Instant)>,
}

impl Departed {
    /// Forget departures after this long; a flowtable entry that old has
    /// timed out by itself unless traffic kept it alive, and then stale
    /// frames trigger the eviction anyway.
    const MEMORY: Duration = Duration::from_secs(600);
    const MAX: usize = 16_384;

    fn left(&mut self, ip: IpAddr, mac: Mac, now: Instant) {
        if self.macs.len() >= Self::MAX {
            self.macs
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < Self::MEMORY);
        }
        if self.macs.len() < Self::MAX {
            self.macs.insert(ip, (mac, now));
        }
    }

    /// The MAC `ip` had when it left, if it returns at another one.
    fn returned(&mut self, ip: IpAddr, mac: Mac, now: Instant) -> Option<Mac> {
        let (old, at) = self.macs.remove(&ip)?;
        (old != mac && now.saturating_duration_since(at) < Self::MEMORY).then_some(old)
    }
}

fn report_changes(
    guard: &mut Guard,
    changes: &[MapChange],
    policy: &mut EvictionGate,
    departed: &mut Departed,
    evictor: Option<&std_mpsc::Sender<EvictRequest>>,
    say_added: bool,
) -> anyhow::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    bump(guard, |c| {
        for ch in changes {
            match ch {
                MapChange::Added { .. } => c.neigh_added += 1,
                MapChange::Moved { .. } | MapChange::Resolved { .. } => c.neigh_moved += 1,
                MapChange::Removed { .. } => c.neigh_removed += 1,
                MapChange::Ambiguous { .. } => c.neigh_ambiguous += 1,
            }
        }
    })?;
    for ch in changes {
        match ch {
            MapChange::Added { .. } if !say_added => log::debug!("{ch}"),
            _ => crate::say!("{ch}"),
        }
        let now = Instant::now();
        match ch {
            MapChange::Removed { ip, old } => departed.left(*ip, *old, now),
            MapChange::Added { ip, mac } => {
                if let Some(old) = departed.returned(*ip, *mac, now) {
                    request_eviction(
                        policy,
                        evictor,
                        *ip,
                        Trigger::NeighbourMoved(format!(
                            "it left the neighbour table at {old} and came back at {mac}"
                        )),
                    );
                }
            }
            MapChange::Moved { ip, old, new } => request_eviction(
                policy,
                evictor,
                *ip,
                Trigger::NeighbourMoved(format!("its MAC changed from {old} to {new}")),
            ),
            MapChange::Resolved { ip, mac } => request_eviction(
                policy,
                evictor,
                *ip,
                Trigger::NeighbourMoved(format!("it is no longer ambiguous, at {mac}")),
            ),
            _ => {}
        }
    }
    Ok(())
}

/// The eviction policy and the requests its rate limit held back.
struct EvictionGate {
    policy: EvictionPolicy,
    max_per_sec: u32,
    deferred: DeferredEvictions<Trigger>,
    /// Deferred since the counters were last written.
    newly_deferred: u64,
    /// The queue depth the counters show.
    shown: u64,
}

impl EvictionGate {
    fn new(debounce: Duration, max_per_sec: u32) -> Self {
        Self {
            policy: EvictionPolicy::new(debounce, max_per_sec),
            max_per_sec,
            deferred: DeferredEvictions::default(),
            newly_deferred: 0,
            shown: 0,
        }
    }

    fn needs_tick(&self) -> bool {
        !self.deferred.is_empty() || self.newly_deferred > 0 || self.shown != 0
    }

    fn defer(&mut self, ip: IpAddr, trigger: Trigger) {
        if self.deferred.is_empty() {
            log::info!(
                "eviction rate limit reached ({} endpoints per second): further evictions wait their turn",
                self.max_per_sec
            );
        }
        self.deferred.push(ip, trigger);
        self.newly_deferred += 1;
    }

    /// Sends the deferred evictions the rate limit admits now, oldest first.
    fn drain(&mut self, evictor: Option<&std_mpsc::Sender<EvictRequest>>) {
        let Some(tx) = evictor else { return };
        if self.deferred.is_empty() {
            return;
        }
        let now = Instant::now();
        let policy = &mut self.policy;
        let admitted = self
            .deferred
            .drain_while(|ip| policy.admit_change(ip, now) == Admission::Now);
        for (ip, trigger) in admitted {
            let _ = tx.send(EvictRequest { ip, trigger });
        }
        if self.deferred.is_empty() {
            log::info!("every deferred eviction has been sent");
        }
    }

    /// Writes the deferred count and the queue depth to the user counters.
    fn show(&mut self, guard: &mut Guard) -> anyhow::Result<()> {
        let depth = self.deferred.len() as u64;
        if self.newly_deferred == 0 && depth == self.shown {
            return Ok(());
        }
        let deferred = std::mem::take(&mut self.newly_deferred);
        bump(guard, |c| {
            c.evictions_deferred += deferred;
            c.eviction_queue = depth;
        })?;
        self.shown = depth;
        Ok(())
    }
}

fn request_eviction(
    gate: &mut EvictionGate,
    evictor: Option<&std_mpsc::Sender<EvictRequest>>,
    ip: IpAddr,
    trigger: Trigger,
) {
    let Some(tx) = evictor else { return };
    let now = Instant::now();
    // A MAC change is news even right after another eviction; stale frames
    // keep coming until the flow is gone, so those are debounced. While
    // evictions wait, a new one queues behind them (deferred, never dropped).
    let stale = matches!(trigger, Trigger::StaleFrames(_));
    let admitted = if !gate.deferred.is_empty() {
        if stale && gate.policy.debounced(ip, now) {
            Admission::Debounced
        } else {
            Admission::RateLimited
        }
    } else if stale {
        gate.policy.admit_stale(ip, now)
    } else {
        gate.policy.admit_change(ip, now)
    };
    match admitted {
        Admission::Now => {
            let _ = tx.send(EvictRequest { ip, trigger });
        }
        Admission::Debounced => log::debug!("{ip}: eviction debounced ({trigger:?})"),
        Admission::RateLimited => {
            log::debug!("{ip}: eviction deferred by the rate limit ({trigger:?})");
            gate.defer(ip, trigger);
            gate.drain(evictor);
        }
    }
}

/// Endpoints whose stale frames keep triggering evictions that find
/// nothing to delete: said once when it starts, and with a count when the
/// requests stop (or an eviction finds entries), not at every debounce.
#[derive(Default)]
struct QuietEpisodes {
    /// First and last attempt, and how many.
    episodes: std::collections::HashMap<IpAddr, (Instant, Instant, u64)>,
}

impl QuietEpisodes {
    /// An episode ends when no request came for this long: several
    /// debounce intervals, as stale frames ask once per interval.
    fn idle_after(debounce: Duration) -> Duration {
        (debounce * 3).max(Duration::from_secs(5))
    }

    /// Records an attempt that found nothing; true when it starts an episode.
    fn attempt(&mut self, ip: IpAddr, now: Instant) -> bool {
        let e = self.episodes.entry(ip).or_insert((now, now, 0));
        e.1 = now;
        e.2 += 1;
        e.2 == 1
    }

    /// Ends `ip`'s episode, saying how long it lasted.
    fn end(&mut self, ip: IpAddr) -> Option<u64> {
        let (first, last, n) = self.episodes.remove(&ip)?;
        if n > 1 {
            log::info!(
                "{ip}: {n} evictions over {:.0} s found nothing to evict (stale frames asked for them)",
                last.saturating_duration_since(first).as_secs_f64()
            );
        }
        Some(n)
    }

    /// Ends the episodes without an attempt for `idle`.
    fn end_idle(&mut self, now: Instant, idle: Duration) {
        let done: Vec<IpAddr> = self
            .episodes
            .iter()
            .filter(|(_, (_, last, _))| now.saturating_duration_since(*last) >= idle)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in done {
            self.end(ip);
        }
    }
}

/// Conntrack work is synchronous netlink and may dump large tables: it runs
/// on a thread of its own (in this thread's network namespace).
fn start_evictor(
    opts: &AgentConfig,
    outcomes: mpsc::UnboundedSender<EvictOutcome>,
) -> std_mpsc::Sender<EvictRequest> {
    let (tx, rx) = std_mpsc::channel::<EvictRequest>();
    let scope = opts.evict;
    let dry_run = opts.dry_run;
    let quiet_after = QuietEpisodes::idle_after(opts.debounce);
    std::thread::Builder::new()
        .name("flowguard-evict".into())
        .spawn(move || {
            let mut ct = match Conntrack::open() {
                Ok(ct) => ct,
                Err(e) => {
                    crate::say_err!("flowguard: eviction is off: {e}");
                    // Drain requests so that senders never block or fail loudly.
                    for _ in rx {
                        let _ = outcomes.send(EvictOutcome {
                            flows: 0,
                            dry_run,
                            failed: true,
                        });
                    }
                    return;
                }
            };
            let mut quiet = QuietEpisodes::default();
            loop {
                let req = match rx.recv_timeout(quiet_after / 2) {
                    Ok(req) => req,
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        quiet.end_idle(Instant::now(), quiet_after);
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                };
                quiet.end_idle(Instant::now(), quiet_after);
                let why = match &req.trigger {
                    Trigger::NeighbourMoved(w) => w.clone(),
                    Trigger::StaleFrames(w) => format!("frames to it carried a stale MAC ({w})"),
                };
                let started = Instant::now();
                let outcome = match ct.evict(req.ip, scope, dry_run) {
                    Ok(flows) => {
                        let verb = if dry_run { "would evict" } else { "evicted" };
                        for f in &flows {
                            crate::say!("{}: {verb} flow {} because {why}", req.ip, f.describe());
                        }
                        if flows.is_empty() {
                            let which = match scope {
                                EvictScope::All => "conntrack entry",
                                _ => "offloaded conntrack entry",
                            };
                            // Stale frames keep asking while the episode lasts:
                            // one line when it starts, the count when it ends.
                            let first = match req.trigger {
                                Trigger::StaleFrames(_) => quiet.attempt(req.ip, started),
                                Trigger::NeighbourMoved(_) => true,
                            };
                            if first {
                                log::info!("{}: no {which} to evict ({why})", req.ip);
                            } else {
                                log::debug!("{}: no {which} to evict ({why})", req.ip);
                            }
                        } else {
                            quiet.end(req.ip);
                            log::info!(
                                "{}: {} {} flow{} in {:.1} ms",
                                req.ip,
                                verb,
                                flows.len(),
                                if flows.len() == 1 { "" } else { "s" },
                                started.elapsed().as_secs_f64() * 1e3
                            );
                        }
                        EvictOutcome {
                            flows: flows.len() as u64,
                            dry_run,
                            failed: false,
                        }
                    }
                    Err(e) => {
                        crate::say_err!("flowguard: evicting the flows of {} failed: {e}", req.ip);
                        EvictOutcome {
                            flows: 0,
                            dry_run,
                            failed: true,
                        }
                    }
                };
                if outcomes.send(outcome).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the eviction thread");
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_without_entries_is_said_once_and_counted_at_its_end() {
        let t0 = Instant::now();
        let ip: IpAddr = "192.168.1.240".parse().unwrap();
        let idle = QuietEpisodes::idle_after(Duration::from_secs(2));
        assert_eq!(idle, Duration::from_secs(6));
        let mut q = QuietEpisodes::default();
        assert!(q.attempt(ip, t0), "the first attempt starts the episode");
        for i in 1..5 {
            assert!(!q.attempt(ip, t0 + Duration::from_secs(2 * i)));
        }
        q.end_idle(t0 + Duration::from_secs(10), idle);
        assert!(q.episodes.contains_key(&ip), "still asking");
        q.end_idle(t0 + Duration::from_secs(14), idle);
        assert!(q.episodes.is_empty(), "ended when the requests stopped");
        assert!(q.attempt(ip, t0 + Duration::from_secs(20)), "a new episode");
        assert_eq!(q.end(ip), Some(1));
    }

    #[test]
    fn a_return_at_another_mac_is_a_move_and_at_the_same_mac_is_not() {
        let t0 = Instant::now();
        let ip: IpAddr = "192.168.1.240".parse().unwrap();
        let (a, b) = (Mac([2, 0, 0, 0, 0, 0xa]), Mac([2, 0, 0, 0, 0, 0xb]));
        let mut d = Departed::default();
        assert_eq!(d.returned(ip, b, t0), None, "never left: a new endpoint");
        d.left(ip, a, t0);
        assert_eq!(d.returned(ip, b, t0 + Duration::from_secs(1)), Some(a));
        assert_eq!(
            d.returned(ip, b, t0 + Duration::from_secs(2)),
            None,
            "remembered once"
        );
        d.left(ip, a, t0);
        assert_eq!(
            d.returned(ip, a, t0 + Duration::from_secs(1)),
            None,
            "same MAC"
        );
        d.left(ip, a, t0);
        assert_eq!(d.returned(ip, b, t0 + Departed::MEMORY), None, "forgotten");
    }
}
