//! Router role: asks endpoints whether their cached MAC still answers,
//! instead of waiting for them to announce a new one.
//!
//! A recreated container or a moved VM often sends nothing (Podman's
//! macvlan, Docker before 28, `arp_notify=0`), and under a flowtable its
//! flows never pass the neighbour layer again: the neighbour table keeps the
//! old MAC forever and nothing would ever evict the flows. So, for each
//! endpoint that carries offloaded flows, the prober sends an ARP request
//! to the cached MAC once per interval; when that MAC stays silent for the
//! answer window, it asks by broadcast. The answer from the new MAC reaches
//! the router's own ARP, which updates the neighbour table; the neighbour
//! sync then sees the move and evicts the flows, exactly as for an endpoint
//! that announced itself. An IP answering from two MACs is reported as
//! ambiguous and left alone for a while, so that probing never drives an
//! eviction loop.
//!
//! The probes leave from the interface of the neighbour entry (the bridge,
//! or its VLAN device) with the router's own address on it as sender, so
//! that the answer is the router's to process. They run on a thread of their
//! own: blocking sockets, no work on the event loop.

mod packet;
pub mod wire;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    endpoints::{Batch, Count, Fact, FactSender, Origin},
    neigh::NeighCache,
    run_config::{ProbeOptions, Selection},
    settings::{Mac, Prefix},
    sys,
};
use packet::{ArpSocket, Icmp6Socket};

/// An endpoint as the neighbour table knows it: where its entry is and the
/// MAC it caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub ifindex: u32,
    pub mac: Mac,
}

/// The endpoints the prober may ask about: the agent's own neighbour cache,
/// shared (one copy of what the neighbour table says; a router with 16,000
/// endpoints must stay within 4 MB resident). IPs whose MAC is ambiguous
/// are not asked.
pub type Targets = Arc<Mutex<NeighCache>>;

/// The IPs that carry flows (see [`Selection`]), or why they could not be read.
pub type ActiveSet = Box<dyn FnMut() -> Result<HashSet<IpAddr>, String> + Send>;

/// What the prober tells the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeReport {
    /// One round: probes sent, endpoints that answered nobody, endpoints asked.
    Round {
        sent: u64,
        unanswered: u64,
        asked: usize,
    },
    /// The cached MAC did not answer; another one did.
    Moved {
        ip: IpAddr,
        ifindex: u32,
        old: Mac,
        new: Mac,
    },
    /// The cached MAC stopped answering and no other answered (yet).
    Silent { ip: IpAddr, ifindex: u32, mac: Mac },
    /// Several MACs answered for one IP: nothing is evicted for it.
    Ambiguous {
        ip: IpAddr,
        ifindex: u32,
        macs: Vec<Mac>,
    },
    /// Probing cannot work (no socket, no conntrack); said once.
    Failed(String),
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ifname = |i: &u32| sys::ifname(*i).unwrap_or_else(|| format!("ifindex {i}"));
        match self {
            ProbeReport::Round {
                sent,
                unanswered,
                asked,
            } => write!(
                f,
                "probe round: {asked} endpoints asked, {sent} probes, {unanswered} unanswered"
            ),
            ProbeReport::Moved {
                ip,
                ifindex,
                old,
                new,
            } => write!(
                f,
                "{ip}: {old} stopped answering on {}; now at {new} (it answered a broadcast probe): \
                 flows to {old} are stale",
                ifname(ifindex)
            ),
            ProbeReport::Silent { ip, ifindex, mac } => write!(
                f,
                "{ip}: {mac} stopped answering on {} and no other MAC answered yet; asking every round",
                ifname(ifindex)
            ),
            ProbeReport::Ambiguous { ip, ifindex, macs } => {
                let list: Vec<String> = macs.iter().map(Mac::to_string).collect();
                write!(
                    f,
                    "{ip} answered from {} MACs on {} ({}): ambiguous, nothing evicted for it; \
                     asking again in {} s",
                    macs.len(),
                    ifname(ifindex),
                    list.join(", "),
                    AMBIGUOUS_QUIET.as_secs()
                )
            }
            ProbeReport::Failed(why) => write!(f, "probing is off: {why}"),
        }
    }
}

/// Probes sent back to back before a pause of [`BURST_PAUSE`].
const BURST: u64 = 32;
const BURST_PAUSE: Duration = Duration::from_millis(2);

/// See [`ProbeOptions::max_refresh`].
const REFRESH_COST_FACTOR: u32 = 200;

/// How long an ambiguous IP is left alone.
const AMBIGUOUS_QUIET: Duration = Duration::from_secs(60);

/// What one probe of one endpoint found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The cached MAC answered, and no other.
    Current,
    /// The cached MAC did not answer; exactly one other did.
    Moved(Mac),
    /// Nobody answered.
    Silent,
    /// More than one MAC answered.
    Ambiguous(Vec<Mac>),
}

/// The verdict on an endpoint whose cached MAC is `cached`, from the MACs
/// that answered for its IP in one round.
pub fn verdict(cached: Mac, answers: &BTreeSet<Mac>) -> Verdict {
    match answers.len() {
        0 => Verdict::Silent,
        1 if answers.contains(&cached) => Verdict::Current,
        1 => Verdict::Moved(*answers.iter().next().expect("one answer")),
        _ => Verdict::Ambiguous(answers.iter().copied().collect()),
    }
}

/// One endpoint asked in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Candidate {
    ip: IpAddr,
    target: Target,
}

/// Which endpoints to ask this round: those that carry flows and that the
/// neighbour table knows, not in their quiet time, at most `budget`, taken
/// in turn from `offset` so that an over-budget set is covered round by round.
fn pick(
    active: &HashSet<IpAddr>,
    target: impl Fn(IpAddr) -> Option<Target>,
    quiet: &HashMap<IpAddr, Instant>,
    now: Instant,
    budget: usize,
    offset: &mut usize,
) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = active
        .iter()
        .filter(|ip| quiet.get(ip).is_none_or(|until| now >= *until))
        .filter_map(|ip| {
            let target = target(*ip)?;
            Some(Candidate {
                ip: ip.to_canonical(),
                target,
            })
        })
        .collect();
    all.sort_by_key(|c| c.ip);
    if all.len() <= budget {
        *offset = 0;
        return all;
    }
    let start = *offset % all.len();
    *offset = (start + budget) % all.len();
    all.into_iter().cycle().skip(start).take(budget).collect()
}

/// Endpoints per round that keep within `max_per_sec` probes (each
/// endpoint may need a unicast and a broadcast probe); 0 means no limit.
fn budget(max_per_sec: u32, interval: Duration) -> usize {
    if max_per_sec == 0 {
        return usize::MAX;
    }
    let per_round = f64::from(max_per_sec) * interval.as_secs_f64() / 2.0;
    (per_round as usize).max(1)
}

/// The IPv4 addresses (with prefix length) of each interface.
fn ipv4_addresses() -> HashMap<u32, Vec<(Ipv4Addr, u8)>> {
    let mut out: HashMap<u32, Vec<(Ipv4Addr, u8)>> = HashMap::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of at least its family's size.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address and netmask are sockaddr_in.
        let (addr, mask) = unsafe {
            (
                *(ifa.ifa_addr as *const libc::sockaddr_in),
                *(ifa.ifa_netmask as *const libc::sockaddr_in),
            )
        };
        // SAFETY: ifa_name is a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        let Some(index) = sys::ifindex(&name.to_string_lossy()) else {
            continue;
        };
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        let len = u32::from_be(mask.sin_addr.s_addr).count_ones() as u8;
        out.entry(index).or_default().push((ip, len));
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The router's address to send a probe for `target` from: one on the
/// interface whose subnet holds the target, else the interface's first.
fn sender_ip(addrs: &[(Ipv4Addr, u8)], target: Ipv4Addr) -> Option<Ipv4Addr> {
    let same_subnet = addrs.iter().find(|(a, len)| {
        let mask = if *len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(*len))
        };
        u32::from(*a) & mask == u32::from(target) & mask
    });
    same_subnet.or(addrs.first()).map(|(a, _)| *a)
}

/// The prober's state between rounds.
struct Prober {
    opts: ProbeOptions,
    targets: Targets,
    active: ActiveSet,
    reports: FactSender,
    socket: ArpSocket,
    /// `None` where IPv6 raw sockets cannot be had: IPv6 endpoints are then
    /// not probed (said once at start).
    icmp6: Option<Icmp6Socket>,
    quiet: HashMap<IpAddr, Instant>,
    /// Endpoints reported silent, so that it is said once per episode.
    silent: HashSet<IpAddr>,
    offset: usize,
    buf: Vec<u8>,
    /// Probes sent so far, for pacing.
    burst: u64,
}

/// Says a report, and sends the loop what it counts and, for a move, the
/// fact (an observation the endpoint table turns into an eviction).
fn send(tx: &FactSender, report: ProbeReport) {
    match report {
        ProbeReport::Round { .. } => log::debug!("{report}"),
        _ => crate::say!("{report}"),
    }
    let facts = match &report {
        ProbeReport::Moved { ip, new, .. } => vec![Fact::at(*ip, Origin::Probe, *new)],
        _ => Vec::new(),
    };
    let count: Count = Box::new(move |c| match report {
        ProbeReport::Round {
            sent, unanswered, ..
        } => {
            c.probes_sent += sent;
            c.probes_unanswered += unanswered;
        }
        ProbeReport::Moved { .. } => c.probe_moves += 1,
        ProbeReport::Ambiguous { .. } => c.probe_ambiguous += 1,
        ProbeReport::Silent { .. } | ProbeReport::Failed(_) => {}
    });
    let _ = tx.send(Batch {
        count: Some(count),
        ..Batch::facts(facts)
    });
}

/// Starts the prober on a thread of its own (in this thread's network
/// namespace). It says what it finds and sends the loop its batches; it
/// stops when the loop drops the channel.
pub fn start(
    opts: ProbeOptions,
    targets: Targets,
    active: ActiveSet,
    reports: FactSender,
) -> std::io::Result<()> {
    let socket = ArpSocket::open()?;
    let icmp6 = match Icmp6Socket::open() {
        Ok(s) => Some(s),
        Err(e) => {
            send(
                &reports,
                ProbeReport::Failed(format!(
                    "no ICMPv6 socket ({e}): IPv6 endpoints are not probed"
                )),
            );
            None
        }
    };
    let prober = Prober {
        opts,
        targets,
        active,
        reports,
        socket,
        icmp6,
        quiet: HashMap::new(),
        silent: HashSet::new(),
        offset: 0,
        buf: vec![0; 2048],
        burst: 0,
    };
    std::thread::Builder::new()
        .name("flowguard-probe".into())
        .spawn(move || prober.run())?;
    Ok(())
}

impl Prober {
    fn run(mut self) {
        let mut active = HashSet::new();
        let mut next_refresh = Instant::now();
        let mut active_failed = false;
        loop {
            let started = Instant::now();
            if self.reports.is_closed() {
                return;
            }
            if started >= next_refresh {
                let read = (self.active)();
                let cost = started.elapsed() * REFRESH_COST_FACTOR;
                next_refresh = started + cost.clamp(Duration::ZERO, self.opts.max_refresh);
                match read {
                    Ok(a) => {
                        active = a;
                        active_failed = false;
                    }
                    Err(e) if !active_failed => {
                        active_failed = true;
                        send(
                            &self.reports,
                            ProbeReport::Failed(format!(
                                "reading which endpoints carry flows failed: {e}"
                            )),
                        );
                    }
                    Err(_) => {}
                }
            }
            self.round(&active, started);
            let next = started + self.opts.interval;
            if let Some(left) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(left);
            }
        }
    }

    fn round(&mut self, active: &HashSet<IpAddr>, now: Instant) {
        let candidates = {
            let cache = self.targets.lock().expect("neighbour cache lock");
            let budget = budget(self.opts.max_per_sec, self.opts.interval);
            let target = |ip| {
                let (ifindex, mac) = cache.target(ip)?;
                Some(Target { ifindex, mac })
            };
            pick(active, target, &self.quiet, now, budget, &mut self.offset)
        };
        self.quiet.retain(|_, until| *until > now);
        self.silent.retain(|ip| active.contains(ip));
        if candidates.is_empty() {
            return;
        }
        // Answers to earlier rounds are old news.
        self.drain();

        let addrs = ipv4_addresses();
        let mut own_macs: HashMap<u32, Option<Mac>> = HashMap::new();
        let mut asked: HashMap<IpAddr, Asked> = HashMap::new();
        for c in candidates {
            let mac = *own_macs.entry(c.target.ifindex).or_insert_with(|| {
                sys::ifname(c.target.ifindex).and_then(|n| sys::if_mac(&n).ok())
            });
            let Some(mac) = mac else {
                log::debug!("{}: not probed: its interface has no MAC", c.ip);
                continue;
            };
            let src = match c.ip {
                IpAddr::V4(v4) => {
                    let Some(src) = addrs.get(&c.target.ifindex).and_then(|a| sender_ip(a, v4))
                    else {
                        log::debug!("{}: not probed: its interface has no IPv4 address", c.ip);
                        continue;
                    };
                    Some(src)
                }
                IpAddr::V6(_) if self.icmp6.is_none() => continue,
                IpAddr::V6(_) => None,
            };
            asked.insert(
                c.ip,
                Asked {
                    candidate: c,
                    src,
                    own_mac: mac,
                },
            );
        }
        let mut sent = 0u64;
        let mut answers: HashMap<IpAddr, BTreeSet<Mac>> = HashMap::new();
        for a in asked.values() {
            sent += u64::from(self.ask(a, false));
        }
        self.collect(&asked, &mut answers, true);
        let mut broadcast = 0;
        for a in asked.values() {
            if !answers.contains_key(&a.candidate.ip) {
                broadcast += u64::from(self.ask(a, true));
            }
        }
        sent += broadcast;
        if broadcast > 0 {
            self.collect(&asked, &mut answers, false);
        }

        let mut unanswered = 0;
        let empty = BTreeSet::new();
        for a in asked.values() {
            let (c, ip) = (&a.candidate, a.candidate.ip);
            let report = match verdict(c.target.mac, answers.get(&c.ip).unwrap_or(&empty)) {
                Verdict::Current => {
                    self.silent.remove(&ip);
                    None
                }
                Verdict::Silent => {
                    unanswered += 1;
                    self.silent.insert(ip).then_some(ProbeReport::Silent {
                        ip,
                        ifindex: c.target.ifindex,
                        mac: c.target.mac,
                    })
                }
                Verdict::Moved(new) => {
                    self.silent.remove(&ip);
                    Some(ProbeReport::Moved {
                        ip,
                        ifindex: c.target.ifindex,
                        old: c.target.mac,
                        new,
                    })
                }
                Verdict::Ambiguous(macs) => {
                    self.quiet.insert(ip, now + AMBIGUOUS_QUIET);
                    Some(ProbeReport::Ambiguous {
                        ip,
                        ifindex: c.target.ifindex,
                        macs,
                    })
                }
            };
            if let Some(r) = report {
                send(&self.reports, r);
            }
        }
        send(
            &self.reports,
            ProbeReport::Round {
                sent,
                unanswered,
                asked: asked.len(),
            },
        );
    }

    /// Sends one probe: to the cached MAC (`broadcast` false: ARP to that
    /// MAC, or a neighbour solicitation to the address, which the kernel
    /// sends to the MAC its neighbour entry caches), or to everyone
    /// (broadcast ARP, or the solicited-node multicast address). True if sent.
    fn ask(&mut self, a: &Asked, broadcast: bool) -> bool {
        // A burst of hundreds of frames overruns small queues (a veth's
        // ring, a switch chip's): a short pause every few.
        self.burst += 1;
        if self.burst.is_multiple_of(BURST) {
            std::thread::sleep(BURST_PAUSE);
        }
        let c = &a.candidate;
        let sent = match (c.ip, a.src, &self.icmp6) {
            (IpAddr::V4(ip), Some(src), _) => {
                let (to, tha) = if broadcast {
                    (wire::BROADCAST, Mac([0; 6]))
                } else {
                    (c.target.mac, c.target.mac)
                };
                let probe = wire::request(a.own_mac, src, tha, ip);
                self.socket.send(c.target.ifindex, to, &probe)
            }
            (IpAddr::V6(ip), _, Some(icmp6)) => {
                let to = if broadcast {
                    wire::solicited_node(ip)
                } else {
                    ip
                };
                let probe = wire::neighbour_solicitation(ip, a.own_mac);
                icmp6.send(to, c.target.ifindex, &probe)
            }
            _ => return false,
        };
        match sent {
            Ok(()) => true,
            Err(e) => {
                log::debug!("{}: sending a probe failed: {e}", c.ip);
                false
            }
        }
    }

    /// Throws away what the sockets hold.
    fn drain(&mut self) {
        while let Ok(Some(_)) = self.socket.try_recv(&mut self.buf) {}
        if let Some(icmp6) = &self.icmp6 {
            while let Ok(Some(_)) = icmp6.try_recv(&mut self.buf) {}
        }
    }

    /// Gathers the answers to the probes just sent, for one answer window.
    /// An ARP answer counts when it comes from an asked IP, is addressed to
    /// the address that asked and comes from the MAC it states. A neighbour
    /// advertisement counts for its target; one without a MAC (the answer
    /// to a unicast solicitation) is the cached MAC's, and only in the
    /// `unicast` window.
    fn collect(
        &mut self,
        asked: &HashMap<IpAddr, Asked>,
        answers: &mut HashMap<IpAddr, BTreeSet<Mac>>,
        unicast: bool,
    ) {
        let mut fds = vec![self.socket.fd()];
        if let Some(icmp6) = &self.icmp6 {
            fds.push(icmp6.fd());
        }
        let deadline = Instant::now() + self.opts.answer_wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let ready = match packet::wait_readable(&fds, left) {
                Ok(r) => r,
                Err(e) => {
                    log::debug!("waiting for probe answers failed: {e}");
                    return;
                }
            };
            if ready[0] {
                while let Ok(Some(got)) = self.socket.try_recv(&mut self.buf) {
                    let Some(reply) = wire::parse_reply(&self.buf[..got.len.min(self.buf.len())])
                    else {
                        continue;
                    };
                    // A reply to us, from the host whose MAC it states.
                    if got.pkttype != libc::PACKET_HOST || got.from != reply.sender_mac {
                        continue;
                    }
                    let ip = IpAddr::V4(reply.sender_ip);
                    let Some(a) = asked.get(&ip) else { continue };
                    if a.src != Some(reply.target_ip) || !reply.sender_mac.is_unicast() {
                        continue;
                    }
                    answers.entry(ip).or_default().insert(reply.sender_mac);
                }
            }
            if ready.get(1).copied().unwrap_or(false) {
                let Some(icmp6) = &self.icmp6 else { continue };
                while let Ok(Some(n)) = icmp6.try_recv(&mut self.buf) {
                    let Some(na) = wire::parse_advertisement(&self.buf[..n.min(self.buf.len())])
                    else {
                        continue;
                    };
                    let ip = IpAddr::V6(na.target).to_canonical();
                    let Some(a) = asked.get(&ip) else { continue };
                    let mac = match na.mac {
                        Some(m) if m.is_unicast() => m,
                        Some(_) => continue,
                        None if unicast => a.candidate.target.mac,
                        None => continue,
                    };
                    answers.entry(ip).or_default().insert(mac);
                }
            }
        }
    }
}

/// One endpoint asked this round, with what its probes are sent from.
struct Asked {
    candidate: Candidate,
    /// The router's IPv4 address the ARP request comes from (`None` for IPv6:
    /// the kernel picks the source).
    src: Option<Ipv4Addr>,
    own_mac: Mac,
}

/// Whether the probe sockets can be opened here (CAP_NET_RAW), or why not.
pub fn sockets_available() -> Result<(), String> {
    ArpSocket::open().map_err(|e| format!("ARP packet socket: {e}"))?;
    Icmp6Socket::open().map_err(|e| format!("ICMPv6 raw socket: {e}"))?;
    Ok(())
}

/// The active set read from conntrack: the IPs inside `prefixes` that
/// appear in any tuple of the entries `selection` names.
pub fn conntrack_active_set(selection: Selection, prefixes: Vec<Prefix>) -> ActiveSet {
    let mut ct: Option<crate::conntrack::Conntrack> = None;
    Box::new(move || {
        if ct.is_none() {
            ct = Some(crate::conntrack::Conntrack::open().map_err(|e| e.to_string())?);
        }
        let flows = ct
            .as_mut()
            .expect("just opened")
            .all_flows()
            .map_err(|e| e.to_string())?;
        let mut ips = HashSet::new();
        for f in flows {
            if selection == Selection::Offloaded && !f.is_offloaded() {
                continue;
            }
            for ip in [f.orig.src, f.orig.dst, f.reply.src, f.reply.dst] {
                let ip = ip.to_canonical();
                if prefixes.iter().any(|p| p.contains(ip)) {
                    ips.insert(ip);
                }
            }
        }
        Ok(ips)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: Mac = Mac([2, 0, 0, 0, 0, 0xa]);
    const NEW: Mac = Mac([2, 0, 0, 0, 0, 0xb]);

    #[test]
    fn the_verdict_follows_who_answered() {
        let set = |m: &[Mac]| m.iter().copied().collect::<BTreeSet<_>>();
        assert_eq!(verdict(OLD, &set(&[])), Verdict::Silent);
        assert_eq!(verdict(OLD, &set(&[OLD])), Verdict::Current);
        assert_eq!(verdict(OLD, &set(&[NEW])), Verdict::Moved(NEW));
        assert_eq!(
            verdict(OLD, &set(&[OLD, NEW])),
            Verdict::Ambiguous(vec![OLD, NEW])
        );
        let third = Mac([2, 0, 0, 0, 0, 0xc]);
        assert_eq!(
            verdict(OLD, &set(&[NEW, third])),
            Verdict::Ambiguous(vec![NEW, third])
        );
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 168, 1, last))
    }

    #[test]
    fn only_known_active_quiet_free_ipv4_endpoints_are_picked_within_the_budget() {
        let now = Instant::now();
        let t = Target {
            ifindex: 3,
            mac: OLD,
        };
        let targets: std::collections::BTreeMap<IpAddr, Target> = [
            (ip(1), t),
            (ip(2), t),
            (ip(3), t),
            (ip(4), t),
            ("fd00::5".parse().unwrap(), t),
        ]
        .into_iter()
        .collect();
        let active: HashSet<IpAddr> = [ip(1), ip(2), ip(3), ip(9), "fd00::5".parse().unwrap()]
            .into_iter()
            .collect();
        let quiet: HashMap<IpAddr, Instant> = [(ip(3), now + Duration::from_secs(1))].into();
        let mut offset = 0;
        let got: Vec<IpAddr> = pick(
            &active,
            |ip| targets.get(&ip).copied(),
            &quiet,
            now,
            10,
            &mut offset,
        )
        .into_iter()
        .map(|c| c.ip)
        .collect();
        // 4 is not active, 9 has no neighbour entry, 3 is quiet.
        assert_eq!(got, [ip(1), ip(2), "fd00::5".parse::<IpAddr>().unwrap()]);
        // Once the quiet time is over, 3 is asked again.
        let later = now + Duration::from_secs(2);
        assert_eq!(
            pick(
                &active,
                |ip| targets.get(&ip).copied(),
                &quiet,
                later,
                10,
                &mut offset
            )
            .len(),
            4
        );
        // Over budget: rounds take turns and cover everyone.
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            let round = pick(
                &active,
                |ip| targets.get(&ip).copied(),
                &quiet,
                later,
                1,
                &mut offset,
            );
            assert_eq!(round.len(), 1);
            seen.insert(round[0].ip);
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn the_sender_address_is_the_one_in_the_targets_subnet() {
        let addrs = [
            (Ipv4Addr::new(10, 9, 0, 1), 16),
            (Ipv4Addr::new(192, 168, 1, 1), 24),
        ];
        assert_eq!(
            sender_ip(&addrs, Ipv4Addr::new(192, 168, 1, 240)),
            Some(Ipv4Addr::new(192, 168, 1, 1))
        );
        assert_eq!(
            sender_ip(&addrs, Ipv4Addr::new(172, 16, 0, 9)),
            Some(Ipv4Addr::new(10, 9, 0, 1)),
            "no subnet holds it: the interface's first address"
        );
        assert_eq!(sender_ip(&[], Ipv4Addr::new(192, 168, 1, 240)), None);
    }

    #[test]
    fn the_budget_counts_two_probes_per_endpoint() {
        assert_eq!(budget(1000, Duration::from_secs(1)), 500);
        assert_eq!(budget(1, Duration::from_millis(100)), 1, "at least one");
        assert_eq!(budget(0, Duration::from_secs(1)), usize::MAX, "0: no limit");
    }
}
