//! The merge: every source's claims about an endpoint, one precedence rule
//! (`flowguard_common::source::merge`, which the kernel's learning path
//! calls too), one writer of the endpoint maps, and what changed.
//!
//! | sources that name different MACs | the endpoint's MAC |
//! |---|---|
//! | static and any other | the static one, always |
//! | a child and a learned frame | the newer of the two |
//! | a learned frame and the neighbour table | the learned one |
//! | a child and the neighbour table | ambiguous: counted, never rewritten |
//! | one source with several MACs (two interfaces, two namespaces) | ambiguous |
//!
//! Memory: an endpoint with one claim (every endpoint of a plain router)
//! is held by its map entry alone, whose MAC, source and `AMBIGUOUS` flag
//! are that claim. The table keeps in memory only what the map cannot
//! hold: the claims of an endpoint that has two or more, and of one whose
//! write failed (a full map), which it retries.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use aya::maps::MapError;
use flowguard_common::{endpoint_flags, source, Endpoint, EndpointKey};

use super::store::{is_full, EndpointStore};
use crate::{
    settings::{endpoint_key, key_ip, Mac},
    sys,
};

/// Who says it, with what the sentences name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The operator (`--static`).
    Static,
    /// The kernel's neighbour table.
    Neighbour,
    /// A probe's answer: the cached MAC stayed silent, this one answered.
    /// An observation, not a claim: the neighbour table follows a moment
    /// later (the router's own ARP takes the answer) and the map with it;
    /// until then the move is reported, so that eviction need not wait.
    Probe,
    /// The kernel's learning path, which has already written the map;
    /// `was` is the MAC it replaced.
    Learned { was: Option<Mac> },
    /// A macvlan/ipvlan child of a guarded interface: `what` names it
    /// ("macvlan c1 in netns x, child of eth0"; for a withdrawal, its kind).
    Child { what: String },
    /// The bridge FDB: where an endpoint's MAC is (its port), not what it is.
    Fdb,
}

impl Origin {
    /// The source the map records for this origin's claims.
    pub fn source(&self) -> u8 {
        match self {
            Origin::Static => source::STATIC,
            Origin::Neighbour | Origin::Probe => source::NEIGHBOUR,
            Origin::Learned { .. } => source::LEARNED,
            Origin::Child { .. } => source::CHILD,
            // Port facts hold no claim to a MAC.
            Origin::Fdb => 0,
        }
    }
}

/// What a source says about an endpoint now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Says {
    At(Mac),
    /// The source's own entries disagree (two interfaces, two namespaces):
    /// its candidates, the one to show first.
    Split(Vec<Mac>),
    /// The source says nothing about it any more.
    Gone,
}

/// "IP X is at MAC M, per source S" or "X is gone".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    pub ip: IpAddr,
    pub origin: Origin,
    pub says: Says,
}

impl Fact {
    pub fn at(ip: IpAddr, origin: Origin, mac: Mac) -> Self {
        Self {
            ip,
            origin,
            says: Says::At(mac),
        }
    }

    pub fn gone(ip: IpAddr, origin: Origin) -> Self {
        Self {
            ip,
            origin,
            says: Says::Gone,
        }
    }
}

/// "MAC M is behind port P (VLAN V) of bridge B", or "M left port P"
/// (deleted, aged out): the bridge FDB's facts, which the table joins with
/// the endpoints' MACs to give each endpoint its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortFact {
    pub mac: Mac,
    pub port: u32,
    /// `None`: the MAC left `port`.
    pub place: Option<Place>,
}

/// Where a MAC is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub bridge: u32,
    pub port: u32,
    pub vlan: Option<u16>,
}

impl PortFact {
    pub fn behind(mac: Mac, bridge: u32, port: u32, vlan: Option<u16>) -> Self {
        Self {
            mac,
            port,
            place: Some(Place { bridge, port, vlan }),
        }
    }

    pub fn gone(mac: Mac, port: u32) -> Self {
        Self {
            mac,
            port,
            place: None,
        }
    }
}

/// A MAC that moves this often within [`FLAP_WINDOW`] is flapping.
const FLAP_MOVES: usize = 3;
const FLAP_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// The recent moves of one MAC.
#[derive(Debug, Default)]
struct Moves {
    at: std::collections::VecDeque<std::time::Instant>,
    flapping: bool,
}

/// What the table changed for an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new endpoint.
    Added { ip: IpAddr, mac: Mac },
    /// The endpoint's MAC changed (and, if it was ambiguous, it no longer
    /// is): flows offloaded toward `old` are stale.
    Moved { ip: IpAddr, old: Mac, new: Mac },
    /// No source names a MAC for the endpoint any more.
    Removed { ip: IpAddr, old: Mac },
    /// The endpoint is now ambiguous: its frames are counted, never rewritten.
    Ambiguous { ip: IpAddr },
    /// The endpoint was ambiguous and is not any more; the map already held
    /// `mac`. Flows may have been offloaded toward another MAC meanwhile.
    Resolved { ip: IpAddr, mac: Mac },
    /// Same MAC, now held by another source's claim.
    Adopted { ip: IpAddr, mac: Mac },
    /// The endpoint's MAC moved to another port of its bridge: flows
    /// offloaded through the old port are stale.
    PortMoved {
        ip: IpAddr,
        mac: Mac,
        from: u32,
        to: u32,
    },
    /// The endpoint's MAC flaps between two ports: said once per episode,
    /// not evicted while it lasts.
    PortFlapping {
        ip: IpAddr,
        mac: Mac,
        from: u32,
        to: u32,
    },
}

impl Change {
    pub fn ip(&self) -> IpAddr {
        match *self {
            Change::Added { ip, .. }
            | Change::Moved { ip, .. }
            | Change::Removed { ip, .. }
            | Change::Ambiguous { ip }
            | Change::Resolved { ip, .. }
            | Change::Adopted { ip, .. }
            | Change::PortMoved { ip, .. }
            | Change::PortFlapping { ip, .. } => ip,
        }
    }
}

/// A change, with the fact that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub change: Change,
    pub origin: Origin,
    /// The source whose claim holds the entry now (0: none).
    pub holder: u8,
    /// For an endpoint ambiguous across sources: each source and its MAC.
    pub disagree: Vec<(u8, Mac)>,
}

fn source_name(s: u8) -> &'static str {
    match s {
        source::STATIC => "the static entry",
        source::NEIGHBOUR => "the neighbour table",
        source::LEARNED => "a learned frame",
        source::CHILD => "a macvlan/ipvlan child",
        _ => "an unknown source",
    }
}

/// An interface's name, for sentences.
fn port_name(ifindex: u32) -> String {
    sys::ifname(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}"))
}

impl fmt::Display for Update {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.change {
            Change::PortMoved { ip, mac, from, to } => {
                return write!(
                    f,
                    "{ip} ({mac}) moved from {} to {} (bridge FDB): flows offloaded through {} are stale",
                    port_name(from),
                    port_name(to),
                    port_name(from)
                )
            }
            Change::PortFlapping { ip, mac, from, to } => {
                return write!(
                    f,
                    "{ip} ({mac}) flaps between {} and {} (bridge FDB): counted, not evicted \
                     while it lasts",
                    port_name(from),
                    port_name(to)
                )
            }
            _ => {}
        }
        if !self.disagree.is_empty() {
            let list: Vec<String> = self
                .disagree
                .iter()
                .map(|(s, m)| format!("{} says {m}", source_name(*s)))
                .collect();
            return write!(
                f,
                "{} is ambiguous: {}; counting its stale frames, not rewriting them",
                self.change.ip(),
                list.join(", ")
            );
        }
        // A withdrawal that another source's claim takes over.
        if self.holder != 0 && self.holder != self.origin.source() {
            return match self.change {
                Change::Moved { ip, old, new } => write!(
                    f,
                    "{ip} moved from {old} to {new} (now per {}): flows to {old} are stale",
                    source_name(self.holder)
                ),
                c => write!(
                    f,
                    "{} is at {} (now per {})",
                    c.ip(),
                    self.mac().unwrap_or(Mac([0; 6])),
                    source_name(self.holder)
                ),
            };
        }
        match (&self.origin, self.change) {
            (Origin::Child { what }, c) => match c {
                Change::Added { ip, mac } | Change::Adopted { ip, mac } => {
                    write!(
                        f,
                        "{ip} is at {mac} ({what}): guarded before it sends anything"
                    )
                }
                Change::Moved { ip, old, new } => write!(
                    f,
                    "{ip} is at {new} ({what}, was {old}): guarded before it sends anything"
                ),
                Change::Removed { ip, old } => {
                    write!(f, "{ip} ({old}) left with its {what}: no longer guarded")
                }
                Change::Ambiguous { ip } => write!(
                    f,
                    "{ip} belongs to children with different MACs ({what}): counting its stale \
                     frames, not rewriting them"
                ),
                Change::Resolved { ip, mac } => {
                    write!(f, "{ip} is no longer ambiguous: it is at {mac} ({what})")
                }
                Change::PortMoved { .. } | Change::PortFlapping { .. } => {
                    unreachable!("worded above")
                }
            },
            (origin, c) => {
                let by = match origin {
                    Origin::Static => "static",
                    Origin::Neighbour => "neighbour table",
                    Origin::Probe => "probe",
                    Origin::Learned { .. } => "learned",
                    Origin::Fdb => "bridge FDB",
                    Origin::Child { .. } => unreachable!("worded above"),
                };
                match c {
                    Change::Added { ip, mac } | Change::Adopted { ip, mac } => {
                        write!(f, "{ip} is at {mac} ({by})")
                    }
                    Change::Moved { ip, old, new } => write!(
                        f,
                        "{ip} moved from {old} to {new} ({by}): flows to {old} are stale"
                    ),
                    Change::Removed { ip, old } if matches!(origin, Origin::Neighbour) => write!(
                        f,
                        "{ip} (was {old}) left the neighbour table: no longer guarded"
                    ),
                    Change::Removed { ip, old } => {
                        write!(f, "{ip} (was {old}) is gone ({by}): no longer guarded")
                    }
                    Change::Ambiguous { ip } => write!(
                        f,
                        "{ip} has different MACs on different interfaces: counting its stale \
                         frames, not rewriting them"
                    ),
                    Change::Resolved { ip, mac } => {
                        write!(f, "{ip} is no longer ambiguous: it is at {mac}")
                    }
                    Change::PortMoved { .. } | Change::PortFlapping { .. } => {
                        unreachable!("worded above")
                    }
                }
            }
        }
    }
}

impl Update {
    /// The MAC the change leaves the endpoint at, if any.
    pub fn mac(&self) -> Option<Mac> {
        match self.change {
            Change::Added { mac, .. }
            | Change::Resolved { mac, .. }
            | Change::Adopted { mac, .. } => Some(mac),
            Change::Moved { new, .. } => Some(new),
            Change::PortMoved { mac, .. } | Change::PortFlapping { mac, .. } => Some(mac),
            Change::Removed { .. } | Change::Ambiguous { .. } => None,
        }
    }
}

/// One source's claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Claim {
    source: u8,
    mac: Mac,
    /// The source's own entries disagree.
    split: bool,
}

/// What the map should hold for an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Decision {
    mac: Mac,
    source: u8,
    ambiguous: bool,
    disagree: Vec<(u8, Mac)>,
}

/// The claim of the highest rank names the MAC (the newest among equals:
/// `claims` run oldest first); a claim that conflicts with it makes the
/// endpoint ambiguous, and then the MAC the map holds stays while it is
/// one of the candidates, so that frames to it are not counted for nothing.
fn decide(claims: &[Claim], held: Option<Mac>) -> Option<Decision> {
    let (wi, w) = claims
        .iter()
        .enumerate()
        .max_by_key(|(i, c)| (source::rank(c.source), *i))?;
    let against: Vec<&Claim> = claims
        .iter()
        .enumerate()
        .filter(|(i, c)| {
            *i != wi && c.mac != w.mac && source::merge(c.source, w.source) == source::CONFLICT
        })
        .map(|(_, c)| c)
        .collect();
    let mac = held
        .filter(|m| !against.is_empty() && against.iter().any(|c| c.mac == *m))
        .unwrap_or(w.mac);
    let disagree = if against.is_empty() {
        Vec::new()
    } else {
        std::iter::once(w)
            .chain(against)
            .map(|c| (c.source, c.mac))
            .collect()
    };
    Some(Decision {
        mac,
        source: w.source,
        ambiguous: w.split || !disagree.is_empty(),
        disagree,
    })
}

/// A probe found the neighbour table's MAC silent and another answering:
/// a move of the endpoint the neighbour table holds, before the table says so.
fn probed(ip: IpAddr, current: Option<Endpoint>, says: &Says) -> Option<Update> {
    let (Says::At(new), Some(e)) = (says, current) else {
        return None;
    };
    (e.source == source::NEIGHBOUR && e.mac != new.0 && !is_ambiguous(&e)).then(|| Update {
        change: Change::Moved {
            ip,
            old: Mac(e.mac),
            new: *new,
        },
        origin: Origin::Probe,
        holder: source::NEIGHBOUR,
        disagree: Vec::new(),
    })
}

fn is_ambiguous(e: &Endpoint) -> bool {
    e.flags & endpoint_flags::AMBIGUOUS != 0
}

/// What changed between the entry before (MAC, ambiguous, source) and the decision.
fn change_of(ip: IpAddr, before: Option<(Mac, bool, u8)>, d: Option<&Decision>) -> Option<Change> {
    match (before, d) {
        (None, None) => None,
        (Some((old, _, _)), None) => Some(Change::Removed { ip, old }),
        (None, Some(d)) if d.ambiguous => Some(Change::Ambiguous { ip }),
        (None, Some(d)) => Some(Change::Added { ip, mac: d.mac }),
        (Some((_, was_ambiguous, _)), Some(d)) if d.ambiguous => {
            (!was_ambiguous).then_some(Change::Ambiguous { ip })
        }
        (Some((old, _, _)), Some(d)) if old != d.mac => Some(Change::Moved {
            ip,
            old,
            new: d.mac,
        }),
        (Some((_, true, _)), Some(d)) => Some(Change::Resolved { ip, mac: d.mac }),
        (Some((_, false, held)), Some(d)) if held != d.source && held != 0 => {
            Some(Change::Adopted { ip, mac: d.mac })
        }
        _ => None,
    }
}

/// Writes the decision, keeping the evidence the kernel gathered (stale
/// counts, last stale MAC); a new MAC resets the event rate limit, so the
/// next stale frame is reported at once. Nothing is written when nothing
/// changes.
fn write<S: EndpointStore + ?Sized>(
    store: &mut S,
    key: EndpointKey,
    current: Option<Endpoint>,
    d: Option<&Decision>,
    place: Option<Place>,
) -> Result<(), MapError> {
    let Some(d) = d else {
        return match current {
            Some(_) => store.remove(&key),
            None => Ok(()),
        };
    };
    if current.is_some_and(|e| {
        e.mac == d.mac.0
            && e.source == d.source
            && is_ambiguous(&e) == d.ambiguous
            && port_fields(&e) == port_of_place(place)
    }) {
        return Ok(());
    }
    let mut value = current.unwrap_or_default();
    if current.map(|e| e.mac) != Some(d.mac.0) {
        value.last_event_jiffies = 0;
        value.updated_ns = sys::monotonic_ns();
    }
    value.mac = d.mac.0;
    value.source = d.source;
    value.flags = if d.ambiguous {
        value.flags | endpoint_flags::AMBIGUOUS
    } else {
        value.flags & !endpoint_flags::AMBIGUOUS
    };
    set_port(&mut value, place);
    store.insert(key, value)
}

/// An endpoint's port as the kernel side reads it: the port's ifindex (0:
/// unknown) and whether the FDB places it in a VLAN.
fn port_fields(e: &Endpoint) -> (u32, bool) {
    (e.port, e.flags & endpoint_flags::PORT_VLAN != 0)
}

/// The port fields for a MAC at `place` (the bridge FDB's, if followed).
fn port_of_place(place: Option<Place>) -> (u32, bool) {
    place.map_or((0, false), |p| (p.port, p.vlan.is_some()))
}

/// Puts `place` into the endpoint's port fields.
fn set_port(e: &mut Endpoint, place: Option<Place>) {
    let (port, vlan) = port_of_place(place);
    e.port = port;
    e.flags = if vlan {
        e.flags | endpoint_flags::PORT_VLAN
    } else {
        e.flags & !endpoint_flags::PORT_VLAN
    };
}

/// An episode of a full endpoint map: said once when it starts and once
/// when there is room again, with the endpoints it left out counted once
/// each (not at every retry).
#[derive(Debug)]
struct FullMap {
    capacity: usize,
    left_out: BTreeSet<IpAddr>,
}

impl FullMap {
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

    /// The hash map holds `len` entries, below its capacity: the episode is over.
    fn room(&mut self, len: usize) {
        if !self.left_out.is_empty() && len < self.capacity {
            log::info!(
                "the endpoint map has room again ({len} of {} entries): {} endpoints were left out while it was full",
                self.capacity,
                self.left_out.len()
            );
            self.left_out.clear();
        }
    }
}

/// Every source's claims, merged into the endpoint maps. See the module
/// documentation for the rule and for what is kept in memory.
#[derive(Debug)]
pub struct EndpointTable {
    /// Claims the map alone does not hold, oldest first.
    extra: BTreeMap<IpAddr, Vec<Claim>>,
    /// Endpoints whose last write failed: retried before the next facts.
    unwritten: BTreeSet<IpAddr>,
    full: FullMap,
    /// Endpoints left out since [`EndpointTable::take_dropped`] was last called.
    dropped: u64,
    /// Where each MAC of the followed bridges is (the bridge FDB).
    ports: BTreeMap<Mac, Place>,
    /// Recent port moves, by MAC (flapping), and when those older than
    /// the window were last forgotten.
    moves: BTreeMap<Mac, Moves>,
    moves_pruned: Option<std::time::Instant>,
    /// The MACs of the endpoints, as of the last read of the map and the
    /// decisions since: a port change of another MAC (most of a busy
    /// bridge's FDB) needs no read of the map.
    endpoint_macs: BTreeSet<Mac>,
}

impl EndpointTable {
    /// A table for maps whose hash map holds `capacity` entries.
    pub fn new(capacity: u32) -> Self {
        Self {
            extra: BTreeMap::new(),
            unwritten: BTreeSet::new(),
            full: FullMap {
                capacity: capacity as usize,
                left_out: BTreeSet::new(),
            },
            dropped: 0,
            ports: BTreeMap::new(),
            moves: BTreeMap::new(),
            moves_pruned: None,
            endpoint_macs: BTreeSet::new(),
        }
    }

    /// Takes the bridge FDB's facts (`whole`: everything it says now, so a
    /// MAC it no longer names has left). A MAC that moved to another port
    /// of its bridge is a move of every endpoint at that MAC (its IPv4 and
    /// IPv6 addresses alike); a MAC that keeps moving is one flapping
    /// episode, said once and not evicted while it lasts.
    pub fn place<S: EndpointStore + ?Sized>(
        &mut self,
        store: &mut S,
        facts: Vec<PortFact>,
        whole: bool,
    ) -> Result<Vec<Update>, MapError> {
        let now = std::time::Instant::now();
        // The MACs whose place changed: their endpoints' port fields are
        // written, so that the kernel side checks each frame's port.
        let mut changed: BTreeSet<Mac> = BTreeSet::new();
        if whole {
            let named: BTreeSet<Mac> = facts.iter().map(|f| f.mac).collect();
            self.ports.retain(|m, _| {
                let keep = named.contains(m);
                if !keep {
                    changed.insert(*m);
                }
                keep
            });
        }
        // (MAC, from, to, the move starts a flapping episode)
        let mut moved: Vec<(Mac, u32, u32, bool)> = Vec::new();
        for f in facts {
            let Some(place) = f.place else {
                if self.ports.get(&f.mac).is_some_and(|p| p.port == f.port) {
                    self.ports.remove(&f.mac);
                    changed.insert(f.mac);
                }
                continue;
            };
            let Some(old) = self.ports.insert(f.mac, place) else {
                changed.insert(f.mac);
                continue;
            };
            if old != place {
                changed.insert(f.mac);
            }
            if old.port == place.port || old.bridge != place.bridge {
                continue;
            }
            let m = self.moves.entry(f.mac).or_default();
            while m
                .at
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= FLAP_WINDOW)
            {
                m.at.pop_front();
            }
            if m.at.is_empty() {
                m.flapping = false;
            }
            m.at.push_back(now);
            if m.flapping {
                continue;
            }
            let flaps = m.at.len() >= FLAP_MOVES;
            m.flapping = flaps;
            moved.push((f.mac, old.port, place.port, flaps));
        }
        // Forgets the moves older than the window: a walk over every MAC
        // that moved, so once per window, not at every change of a storm.
        if self
            .moves_pruned
            .is_none_or(|t| now.saturating_duration_since(t) >= FLAP_WINDOW)
        {
            self.moves.retain(|_, m| {
                m.at.back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < FLAP_WINDOW)
            });
            self.moves_pruned = Some(now);
        }
        // A whole dump checks every endpoint's port (and learns the MACs
        // of endpoints written without the table: restored, learned by
        // the kernel side); a change reads the map only when it is of an
        // endpoint's MAC.
        if !whole && !changed.iter().any(|m| self.endpoint_macs.contains(m)) {
            return Ok(Vec::new());
        }
        let entries = store.entries()?;
        self.endpoint_macs = entries.iter().map(|(_, e)| Mac(e.mac)).collect();
        for (key, e) in &entries {
            if !whole && !changed.contains(&Mac(e.mac)) {
                continue;
            }
            let place = self.ports.get(&Mac(e.mac)).copied();
            if port_fields(e) != port_of_place(place) {
                let mut value = *e;
                set_port(&mut value, place);
                store.insert(*key, value)?;
            }
        }
        let mut updates = Vec::new();
        for (key, e) in entries {
            let Some((mac, from, to, flaps)) = moved.iter().find(|m| m.0 .0 == e.mac) else {
                continue;
            };
            let (ip, mac, from, to) = (key_ip(&key), *mac, *from, *to);
            updates.push(Update {
                change: if *flaps {
                    Change::PortFlapping { ip, mac, from, to }
                } else {
                    Change::PortMoved { ip, mac, from, to }
                },
                origin: Origin::Fdb,
                holder: e.source,
                disagree: Vec::new(),
            });
        }
        updates.sort_by_key(|u| u.change.ip());
        Ok(updates)
    }

    /// The port the bridge FDB places `mac` behind, if it is followed.
    pub fn port_of(&self, mac: Mac) -> Option<Place> {
        self.ports.get(&mac).copied()
    }

    /// Puts back, value for value (evidence included), the endpoints a
    /// killed instance left in its pinned maps: each is the one claim of
    /// its source, as if that source had just said it. Returns how many
    /// were written.
    pub fn restore<S: EndpointStore + ?Sized>(
        store: &mut S,
        kept: Vec<(EndpointKey, Endpoint)>,
    ) -> usize {
        kept.into_iter()
            .filter(|(k, v)| store.insert(*k, *v).is_ok())
            .count()
    }

    /// Takes one fact: merges it with what the other sources say and writes
    /// the endpoint map. An error leaves the claims in memory, to be
    /// retried by the next call of [`EndpointTable::apply`].
    pub fn set<S: EndpointStore + ?Sized>(
        &mut self,
        store: &mut S,
        fact: Fact,
    ) -> Result<Option<Update>, MapError> {
        let ip = fact.ip.to_canonical();
        let key = endpoint_key(ip);
        let current = store.get(&key)?;
        if fact.origin == Origin::Probe {
            return Ok(probed(ip, current, &fact.says));
        }
        let mut claims = self.claims_of(ip, current);
        let incoming = fact.origin.source();
        claims.retain(|c| c.source != incoming);
        match &fact.says {
            Says::At(mac) => claims.push(Claim {
                source: incoming,
                mac: *mac,
                split: false,
            }),
            Says::Split(candidates) => {
                let held = current.map(|e| Mac(e.mac));
                let Some(first) = candidates.first() else {
                    return Ok(None);
                };
                claims.push(Claim {
                    source: incoming,
                    mac: held.filter(|m| candidates.contains(m)).unwrap_or(*first),
                    split: true,
                });
            }
            Says::Gone => {}
        }
        // The kernel's learning wrote the map before telling us: what it
        // replaced is what the endpoint was.
        let before = match (&fact.origin, current) {
            (Origin::Learned { was }, cur) => {
                was.map(|m| (m, cur.is_some_and(|e| is_ambiguous(&e)), 0))
            }
            (_, cur) => cur.map(|e| (Mac(e.mac), is_ambiguous(&e), e.source)),
        };
        let decision = self.settle(store, ip, key, current, claims)?;
        Ok(
            change_of(ip, before, decision.as_ref()).map(|change| Update {
                change,
                origin: fact.origin,
                holder: decision.as_ref().map_or(0, |d| d.source),
                disagree: decision.map(|d| d.disagree).unwrap_or_default(),
            }),
        )
    }

    /// Takes facts, each in turn, then retries the endpoints whose last
    /// write failed (the facts may have made room). A full map is one
    /// episode (see the log), never an error; other write errors are logged
    /// and retried.
    pub fn apply<S: EndpointStore + ?Sized>(
        &mut self,
        store: &mut S,
        facts: impl IntoIterator<Item = Fact>,
    ) -> Vec<Update> {
        let retry: Vec<IpAddr> = self.unwritten.iter().copied().collect();
        let mut updates = Vec::new();
        for fact in facts {
            let ip = fact.ip.to_canonical();
            match self.set(store, fact) {
                Ok(Some(u)) => updates.push(u),
                Ok(None) => {}
                Err(e) => self.failed(ip, &e),
            }
        }
        self.retry(store, retry);
        if !self.full.left_out.is_empty() {
            self.full.room(store.hash_len());
        }
        updates
    }

    /// Takes everything one source says now: its facts, and "gone" for
    /// every endpoint it claimed before and does not name in them (also
    /// those outside the prefixes now).
    pub fn reconcile<S: EndpointStore + ?Sized>(
        &mut self,
        store: &mut S,
        origin: Origin,
        facts: Vec<Fact>,
    ) -> Result<Vec<Update>, MapError> {
        let src = origin.source();
        let named: BTreeSet<IpAddr> = facts.iter().map(|f| f.ip.to_canonical()).collect();
        let mut silent: BTreeSet<IpAddr> = self
            .extra
            .iter()
            .filter(|(_, claims)| claims.iter().any(|c| c.source == src))
            .map(|(ip, _)| *ip)
            .collect();
        for (k, v) in store.entries()? {
            if v.source == src {
                silent.insert(key_ip(&k));
            }
        }
        let gone = silent
            .into_iter()
            .filter(|ip| !named.contains(ip))
            .map(|ip| Fact::gone(ip, origin.clone()));
        Ok(self.apply(store, facts.into_iter().chain(gone.collect::<Vec<_>>())))
    }

    /// Endpoints left out of a full map since the last call (for the counters).
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// "; the endpoint map is full at N entries: M left out" while it is.
    pub fn describe_full(&self) -> String {
        if self.full.left_out.is_empty() {
            String::new()
        } else {
            format!(
                "; the endpoint map is full at {} entries: {} left out",
                self.full.capacity,
                self.full.left_out.len()
            )
        }
    }

    /// Endpoints whose claims are held in memory (two or more claims, or
    /// not written).
    pub fn in_memory(&self) -> usize {
        self.extra.len()
    }

    /// The claims of `ip`: the record in memory (with what the kernel
    /// learned since, which it wrote into the map itself), or else the map
    /// entry as the one claim.
    fn claims_of(&self, ip: IpAddr, current: Option<Endpoint>) -> Vec<Claim> {
        let as_claim = |e: Endpoint| Claim {
            source: e.source,
            mac: Mac(e.mac),
            split: is_ambiguous(&e),
        };
        let Some(record) = self.extra.get(&ip) else {
            return current.map(as_claim).into_iter().collect();
        };
        let mut claims = record.clone();
        if let Some(e) = current.filter(|e| e.source == source::LEARNED) {
            if !claims
                .iter()
                .any(|c| c.source == source::LEARNED && c.mac.0 == e.mac)
            {
                claims.retain(|c| c.source != source::LEARNED);
                claims.push(Claim {
                    split: false,
                    ..as_claim(e)
                });
            }
        }
        claims
    }

    /// Decides and writes; keeps the claims in memory when the map alone
    /// cannot hold them.
    fn settle<S: EndpointStore + ?Sized>(
        &mut self,
        store: &mut S,
        ip: IpAddr,
        key: EndpointKey,
        current: Option<Endpoint>,
        claims: Vec<Claim>,
    ) -> Result<Option<Decision>, MapError> {
        let decision = decide(&claims, current.map(|e| Mac(e.mac)));
        if let Some(d) = &decision {
            self.endpoint_macs.insert(d.mac);
        }
        let place = decision
            .as_ref()
            .and_then(|d| self.ports.get(&d.mac).copied());
        match write(store, key, current, decision.as_ref(), place) {
            Ok(()) => {
                self.unwritten.remove(&ip);
                if claims.len() >= 2 {
                    self.extra.insert(ip, claims);
                } else {
                    self.extra.remove(&ip);
                }
                Ok(decision)
            }
            Err(e) => {
                self.extra.insert(ip, claims);
                self.unwritten.insert(ip);
                Err(e)
            }
        }
    }

    fn failed(&mut self, ip: IpAddr, e: &MapError) {
        if is_full(e) {
            if self.full.left_out(ip) {
                self.dropped += 1;
            }
        } else {
            log::warn!("cannot write endpoint {ip} into the endpoint map ({e}): retrying");
        }
    }

    /// Writes again what could not be written before (and still waits).
    fn retry<S: EndpointStore + ?Sized>(&mut self, store: &mut S, ips: Vec<IpAddr>) {
        for ip in ips {
            if !self.unwritten.remove(&ip) {
                continue;
            }
            let key = endpoint_key(ip);
            let claims = self.extra.get(&ip).cloned().unwrap_or_default();
            let result = store
                .get(&key)
                .and_then(|current| self.settle(store, ip, key, current, claims));
            if let Err(e) = result {
                self.unwritten.insert(ip);
                self.failed(ip, &e);
            }
        }
    }
}

#[cfg(test)]
mod tests;
