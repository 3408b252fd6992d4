//! The user-space loop of `flowguard run`: selects its inputs and hands
//! each to the room that owns it. The sources (neighbour table, children,
//! probes, what the kernel learned) give facts, the endpoint table merges
//! them into the endpoint maps, and what it changed is said, counted
//! ([`counters`]) and evicted ([`eviction`]); `--auto` lives in [`auto`].

mod auto;
mod counters;
mod eviction;

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use aya::maps::{MapData, RingBuf};
use flowguard_common::event_kind;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use crate::{
    children,
    endpoints::{Batch, EndpointTable, Fact, FactSender, Origin, Update},
    events, fdb,
    links::{LinkEvent, Notice, Subscription},
    loader::{Guard, KernelLogger},
    metrics,
    neigh::{self, Heard, NeighEvent, Neighbours},
    probe,
    run_config::{AgentConfig, Selection},
    settings::{key_ip, Mac},
    sys,
};
use auto::AutoPorts;
use counters::bump;
use eviction::Evictions;

/// The endpoint table and the rooms that read its changes.
struct Endpoints {
    table: EndpointTable,
    evictions: Evictions,
}

impl Endpoints {
    /// Merges `facts` (all of what `everything_of` says now, when given),
    /// then says, counts and evicts what changed. `say_added`: new
    /// endpoints are said (at start they go to the debug log).
    fn take(
        &mut self,
        guard: &mut Guard,
        facts: Vec<Fact>,
        everything_of: Option<Origin>,
        say_added: bool,
    ) -> anyhow::Result<Vec<Update>> {
        let updates = match everything_of {
            Some(origin) => self
                .table
                .reconcile(&mut guard.endpoints()?, origin, facts)
                .context("reading the endpoint map")?,
            None => self.table.apply(&mut guard.endpoints()?, facts),
        };
        for u in &updates {
            let quiet = matches!(u.origin, Origin::Learned { .. })
                || (!say_added && matches!(u.change, crate::endpoints::Change::Added { .. }));
            if quiet {
                log::debug!("{u}");
            } else {
                crate::say!("{u}");
            }
        }
        let dropped = self.table.take_dropped();
        if !updates.is_empty() || dropped > 0 {
            bump(guard, |c| counters::count(c, &updates, dropped))?;
        }
        self.evictions.follow(&updates);
        Ok(updates)
    }

    /// The bridge FDB's facts: says, counts and evicts the port moves.
    fn take_ports(
        &mut self,
        guard: &mut Guard,
        ports: Vec<crate::endpoints::PortFact>,
        all: bool,
    ) -> anyhow::Result<()> {
        let updates = self
            .table
            .place(&mut guard.endpoints()?, ports, all)
            .context("reading the endpoint map")?;
        for u in &updates {
            crate::say!("{u}");
        }
        if !updates.is_empty() {
            bump(guard, |c| counters::count(c, &updates, 0))?;
        }
        self.evictions.follow(&updates);
        Ok(())
    }
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

    let mut endpoints = Endpoints {
        table: EndpointTable::new(guard.endpoint_capacity),
        evictions: Evictions::start(opts),
    };
    // The sources, each started by one line. The neighbour table is
    // followed here (SIGHUP and the reconcile timer re-read it); the others
    // run on their own and send their facts to `facts`.
    let (sources, mut facts) = mpsc::unbounded_channel::<Batch>();
    let mut neighbours = start_neighbours(guard, &mut endpoints, opts).await?;
    start_probing(opts, neighbours.as_ref(), sources.clone());
    if let Some(parents) = &opts.children {
        children::start(parents, &opts.prefixes, sources.clone()).await;
    }
    let (egress_ports, egress_rx) = watch::channel(guard.egress_ports());
    fdb::start(egress_rx, opts.reconcile, sources.clone()).await;

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
    let mut eviction_tick = tokio::time::interval(Duration::from_millis(100));
    eviction_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                flowtables_due = None;
                reread_on_hup(guard, &mut endpoints, neighbours.as_mut(), auto.as_mut()).await?;
            }
            notice = next_ruleset_change(&mut ruleset) => match notice {
                Ok(_) => read_soon(&mut flowtables_due),
                Err(e) => {
                    crate::say_err!(
                        "flowguard: following nftables ruleset changes failed ({e}): the \
                         flowtables are read again on interface changes and on SIGHUP only"
                    );
                    ruleset = None;
                }
            },
            _ = sleep_until(flowtables_due) => {
                flowtables_due = None;
                if let Some(auto) = auto.as_mut() {
                    say_all(auto.follow(guard, crate::flowtable::auto_devices().map_err(|e| e.to_string())));
                    egress_ports.send_if_modified(|ports| {
                        let now = guard.egress_ports();
                        let changed = *ports != now;
                        *ports = now;
                        changed
                    });
                }
            }
            ready = ring.readable_mut() => {
                let mut ready = ready.context("waiting for events")?;
                let learned = kernel_events(ready.get_inner_mut(), &mut endpoints.evictions);
                ready.clear_ready();
                endpoints.take(guard, learned, None, true)?;
            }
            ready = kernel_log_ready(&mut kernel_log) => {
                let mut ready = ready.context("waiting for the kernel side's log")?;
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
            ev = next_neigh(&mut neighbours) => {
                let ev = ev.context("following the neighbour table")?;
                let n = neighbours.as_mut().expect("only polled with a source");
                match n.heard(ev).await.context("following the neighbour table")? {
                    Heard::Facts(facts) => endpoints.take(guard, facts, None, true)?,
                    Heard::Overflow(all) => {
                        bump(guard, |c| c.neigh_overflows += 1)?;
                        endpoints.take(guard, all, Some(Origin::Neighbour), true)?
                    }
                };
            }
            _ = reconcile_timer.tick() => {
                // Without the neighbour table, the tick only retries what a
                // full map left out.
                let Some(n) = neighbours.as_mut() else {
                    endpoints.take(guard, Vec::new(), None, true)?;
                    continue;
                };
                let all = n.reread().await.context("dumping the neighbour table")?;
                bump(guard, |c| c.reconciles += 1)?;
                let changes = endpoints.take(guard, all, Some(Origin::Neighbour), true)?;
                if !changes.is_empty() {
                    log::info!("periodic reconcile repaired {} endpoints", changes.len());
                }
            }
            Some(batch) = facts.recv() => {
                if let Some(count) = batch.count {
                    bump(guard, count)?;
                }
                endpoints.take(guard, batch.facts, None, true)?;
                if let Some(ports) = &batch.bridge_ports {
                    guard.set_ports(ports).context("writing the bridge ports")?;
                }
                if !batch.ports.is_empty() || batch.all_ports {
                    endpoints.take_ports(guard, batch.ports, batch.all_ports)?;
                }
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
            _ = eviction_tick.tick(), if endpoints.evictions.needs_tick() => {
                if let Some((deferred, depth)) = endpoints.evictions.tick() {
                    bump(guard, |c| {
                        c.evictions_deferred += deferred;
                        c.eviction_queue = depth;
                    })?;
                }
            }
            Some(outcome) = endpoints.evictions.next_outcome() => {
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

/// The neighbour source: its first dump merged, what it follows said.
async fn start_neighbours(
    guard: &mut Guard,
    endpoints: &mut Endpoints,
    opts: &AgentConfig,
) -> anyhow::Result<Option<Neighbours>> {
    if !opts.neighbours {
        return Ok(None);
    }
    let (n, facts) = Neighbours::open(opts.prefixes.clone())
        .await
        .context("reading the neighbour table")?;
    endpoints.take(guard, facts, Some(Origin::Neighbour), false)?;
    crate::say!(
        "flowguard: following the neighbour table ({} endpoints in the prefixes{})",
        n.len(),
        endpoints.table.describe_full()
    );
    Ok(Some(n))
}

/// The prober (router role, with the neighbour table followed).
fn start_probing(opts: &AgentConfig, neighbours: Option<&Neighbours>, tx: FactSender) {
    // Without the neighbour table there is no cached MAC to validate.
    let (Some(p), Some(n)) = (&opts.probe, neighbours) else {
        return;
    };
    let active = probe::conntrack_active_set(p.selection, p.prefixes.clone());
    match probe::start(p.clone(), n.shared(), active, tx) {
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

/// Says each event of the kernel side; asks eviction for the endpoints of
/// stale frames; returns what the kernel learned, as facts.
fn kernel_events(ring: &mut RingBuf<MapData>, evictions: &mut Evictions) -> Vec<Fact> {
    let mut learned = Vec::new();
    let mut stale = Vec::new();
    while let Some(item) = ring.next() {
        let Some(ev) = events::decode(&item) else {
            log::warn!("ignoring an event of {} bytes", item.len());
            continue;
        };
        crate::say!("{}", events::describe(&ev, sys::ifname));
        let ip = key_ip(&ev.endpoint);
        match ev.kind {
            event_kind::STALE => stale.push((ip, events::describe_short(&ev))),
            event_kind::LEARNED if Mac(ev.new_mac).is_unicast() => {
                let was = Some(Mac(ev.old_mac)).filter(|m| m.0 != [0; 6]);
                learned.push(Fact::at(ip, Origin::Learned { was }, Mac(ev.new_mac)));
            }
            _ => {}
        }
    }
    for (ip, why) in stale {
        evictions.stale_frames(ip, why);
    }
    learned
}

/// SIGHUP: the neighbour table and the flowtables read again, and a summary.
async fn reread_on_hup(
    guard: &mut Guard,
    endpoints: &mut Endpoints,
    neighbours: Option<&mut Neighbours>,
    auto: Option<&mut AutoPorts>,
) -> anyhow::Result<()> {
    let said = match neighbours {
        Some(n) => {
            let all = n.reread().await.context("dumping the neighbour table")?;
            bump(guard, |c| c.reconciles += 1)?;
            let changes = endpoints.take(guard, all, Some(Origin::Neighbour), true)?;
            format!(
                "read the neighbour table again ({} endpoints in the prefixes, {} changed)",
                n.len(),
                changes.len()
            )
        }
        None => "not following the neighbour table (--no-neigh)".to_string(),
    };
    // One read of the flowtables serves --auto and the summary.
    let ports = crate::flowtable::auto_devices().map_err(|e| e.to_string());
    let is_auto = auto.is_some();
    if let Some(auto) = auto {
        say_all(auto.follow(guard, ports.clone()));
    }
    log::info!(
        "SIGHUP: {said}; {}",
        auto::flowtable_summary(guard, ports, is_auto)
    );
    Ok(())
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

async fn next_neigh(source: &mut Option<Neighbours>) -> Result<NeighEvent, neigh::NeighError> {
    match source {
        Some(s) => s.next_event().await,
        None => std::future::pending().await,
    }
}

/// Says each line on stdout.
fn say_all(lines: Vec<String>) {
    for line in lines {
        crate::say!("{line}");
    }
}
