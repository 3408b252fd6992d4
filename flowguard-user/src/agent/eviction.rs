//! Eviction: which conntrack entries to delete and when. Reads the endpoint
//! table's changes (a move of any source evicts) and the kernel's stale
//! frames, rate-limits and debounces them, and runs the deletions on a
//! thread of its own.

use std::{
    net::IpAddr,
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    conntrack::{Admission, Conntrack, DeferredEvictions, EvictScope, EvictionPolicy},
    endpoints::{Change, Update},
    run_config::AgentConfig,
    settings::Mac,
};

/// The eviction room: its policy, its memory of departures, its thread.
pub struct Evictions {
    gate: EvictionGate,
    departed: Departed,
    evictor: Option<std_mpsc::Sender<EvictRequest>>,
    outcomes: mpsc::UnboundedReceiver<EvictOutcome>,
}

impl Evictions {
    /// Starts the eviction thread, unless eviction is off.
    pub fn start(opts: &AgentConfig) -> Self {
        let (outcome_tx, outcomes) = mpsc::unbounded_channel();
        Self {
            gate: EvictionGate::new(opts.debounce, opts.max_evictions_per_sec),
            departed: Departed::default(),
            evictor: (opts.evict != EvictScope::Off).then(|| start_evictor(opts, outcome_tx)),
            outcomes,
        }
    }

    /// The endpoint table's changes: a new MAC (or the end of an
    /// ambiguity, or a return at another MAC) means the flows offloaded
    /// toward the old one are stale.
    pub fn follow(&mut self, updates: &[Update]) {
        let now = Instant::now();
        for u in updates {
            let trigger = match u.change {
                Change::Removed { ip, old } => {
                    self.departed.left(ip, old, now);
                    None
                }
                Change::Added { ip, mac } => self.departed.returned(ip, mac, now).map(|old| {
                    format!("it left the endpoint table at {old} and came back at {mac}")
                }),
                Change::Moved { old, new, .. } => {
                    Some(format!("its MAC changed from {old} to {new}"))
                }
                Change::Resolved { mac, .. } => {
                    Some(format!("it is no longer ambiguous, at {mac}"))
                }
                Change::PortMoved { from, to, .. } => Some(format!(
                    "it moved from port {} to {}",
                    crate::sys::ifname(from).unwrap_or_else(|| from.to_string()),
                    crate::sys::ifname(to).unwrap_or_else(|| to.to_string())
                )),
                Change::Ambiguous { .. } | Change::Adopted { .. } | Change::PortFlapping { .. } => {
                    None
                }
            };
            if let Some(why) = trigger {
                self.request(u.change.ip(), Trigger::Moved(why));
            }
        }
    }

    /// The kernel side saw frames to `ip` with a stale MAC.
    pub fn stale_frames(&mut self, ip: IpAddr, why: String) {
        self.request(ip, Trigger::StaleFrames(why));
    }

    /// Whether deferred evictions or counters wait for [`Evictions::tick`].
    pub fn needs_tick(&self) -> bool {
        self.gate.needs_tick()
    }

    /// Sends what the rate limit admits now; returns the deferred count and
    /// the queue depth for the counters, when they changed.
    pub fn tick(&mut self) -> Option<(u64, u64)> {
        self.gate.drain(self.evictor.as_ref());
        self.gate.show()
    }

    /// The next finished eviction run (pending forever when eviction is off).
    pub async fn next_outcome(&mut self) -> Option<EvictOutcome> {
        self.outcomes.recv().await
    }

    fn request(&mut self, ip: IpAddr, trigger: Trigger) {
        request_eviction(&mut self.gate, self.evictor.as_ref(), ip, trigger);
    }
}

/// Why an endpoint's flows are evicted.
#[derive(Clone, Debug)]
enum Trigger {
    /// The endpoint table changed its MAC (any source: the neighbour
    /// table, a child, a learned frame, a probe).
    Moved(String),
    StaleFrames(String),
}

struct EvictRequest {
    ip: IpAddr,
    trigger: Trigger,
}

/// What one eviction run did, for the counters.
pub struct EvictOutcome {
    pub flows: u64,
    pub dry_run: bool,
    pub failed: bool,
}

/// The last MAC of endpoints that left the endpoint table (a neighbour
/// entry deleted, FAILED, flushed with its bridge; a child gone), so that a return at another MAC is
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

    /// The deferred count since the last call and the queue depth, for
    /// the user counters, when either changed.
    fn show(&mut self) -> Option<(u64, u64)> {
        let depth = self.deferred.len() as u64;
        if self.newly_deferred == 0 && depth == self.shown {
            return None;
        }
        self.shown = depth;
        Some((std::mem::take(&mut self.newly_deferred), depth))
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
                    Trigger::Moved(w) => w.clone(),
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
                                Trigger::Moved(_) => true,
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
