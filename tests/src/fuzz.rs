//! The frame fuzz: random and mutated frames run through a real guard
//! (BPF_PROG_TEST_RUN on the loaded object, real maps) and checked frame by
//! frame against an oracle, an independent reading of the spec. The
//! programs test runs a fixed-seed subset; `flowguard-fuzz` runs millions.
//!
//! A seed decides everything: the prefixes and endpoints of the run (IPv4
//! prefixes in the direct-indexed array and in the hash map, so both lookup
//! paths are fuzzed) and every frame, so a seed and an index replay a case.

use std::{collections::HashMap, fmt, time::Instant};

use flowguard_common::{
    endpoint_flags, event_kind, source, Config, Counters, Endpoint, EndpointKey, MAX_ARRAY_SLOTS,
};

use crate::frames::{self, Mac, Vlan, BROADCAST, DPORT, L2, PAYLOAD, PEER4, PEER6, ROUTER, SPORT};
use crate::progs::{
    self, config, endpoint, errno, kernel_may_refuse, v4_array_prefix, v4_prefix, v6_prefix, Guard,
    Prog,
};

/// The two guards: every program test case and the fuzz go through both.
pub const GUARDS: [Prog; 2] = [Prog::Xdp, Prog::Tc];

/// The programs the fuzz runs: both guards and the learning tc program
/// (whose oracle also learns, frame by frame, and whose maps are compared
/// with the oracle's table after the run).
pub const FUZZED: [Prog; 3] = [Prog::Xdp, Prog::Tc, Prog::TcLearn];

/// Entries the hash map holds beyond the scenario's own endpoints: small,
/// so that learning fills it within a few thousand frames and the fuzz
/// also covers learning into a full map (and moving endpoints in it).
pub const HASH_ROOM: u32 = 48;

/// A deterministic PRNG (splitmix64): the same seed, the same frames.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// A unicast MAC, locally administered.
    fn unicast_mac(&mut self) -> Mac {
        let mut mac: Mac = std::array::from_fn(|_| self.byte());
        mac[0] = (mac[0] & 0xfc) | 0x02;
        mac
    }
}

/// An IPv4 prefix of a run, and where its endpoints are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4Net {
    pub octets: [u8; 4],
    pub len: u32,
    /// In the direct-indexed array (else the hash map).
    pub in_array: bool,
}

impl V4Net {
    fn first(self) -> u32 {
        u32::from_be_bytes(self.octets) & mask32(self.len)
    }

    fn last(self) -> u32 {
        self.first() | !mask32(self.len)
    }

    fn contains(self, a: [u8; 4]) -> bool {
        u32::from_be_bytes(a) & mask32(self.len) == self.first()
    }
}

fn mask32(len: u32) -> u32 {
    u32::MAX.checked_shl(32 - len).unwrap_or(0)
}

fn mask128(len: u32) -> u128 {
    u128::MAX.checked_shl(128 - len).unwrap_or(0)
}

/// An IPv6 prefix of a run (its endpoints are in the hash map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V6Net {
    pub octets: [u8; 16],
    pub len: u32,
}

impl V6Net {
    fn first(self) -> u128 {
        u128::from_be_bytes(self.octets) & mask128(self.len)
    }

    fn contains(self, a: [u8; 16]) -> bool {
        u128::from_be_bytes(a) & mask128(self.len) == self.first()
    }
}

/// An endpoint of a run: its address (IPv4 mapped into IPv6), its MAC,
/// whether it is ambiguous, and its source: static (which learning never
/// overwrites), learned or a child (which it does). Never a neighbour-table
/// endpoint: the guard asks the kernel's neighbour table (bpf_fib_lookup)
/// about those, which depends on the host's routes and neighbours, so no
/// oracle could say what it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuzzEndpoint {
    pub addr: [u8; 16],
    pub mac: Mac,
    pub ambiguous: bool,
    pub source: u8,
}

/// What one run guards: prefixes, endpoints, and the addresses and MACs its
/// frames are made of.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub v4: Vec<V4Net>,
    pub v6: Vec<V6Net>,
    pub endpoints: Vec<FuzzEndpoint>,
    /// Destinations frames go to: endpoints, other addresses inside the
    /// prefixes (their first and last ones too), and just outside them.
    pub dsts4: Vec<[u8; 4]>,
    pub dsts6: Vec<[u8; 16]>,
    /// Destination MACs frames carry: the endpoints' and stale ones.
    pub macs: Vec<Mac>,
    /// The interface MACs learning ignores (config.own_macs).
    pub own_macs: Vec<Mac>,
    /// Source MACs frames carry: the endpoints', the own ones, new ones.
    pub src_macs: Vec<Mac>,
    /// Entries of the hash map: the scenario's endpoints in it and
    /// [`HASH_ROOM`] more.
    pub hash_capacity: u32,
}

impl Scenario {
    /// The prefixes and endpoints the seed picks. Always a /24 in the array
    /// and a /16 in the hash map (too large for the array); a small prefix
    /// in either; two IPv6 prefixes.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x5ce0_a710_f10e_6a4d);
        let small = [172, 16, 5, (rng.below(16) * 16) as u8];
        let v4 = vec![
            V4Net {
                octets: [192, 168, 1, 0],
                len: 24,
                in_array: true,
            },
            V4Net {
                octets: [10, 20, 0, 0],
                len: 16,
                in_array: false,
            },
            V4Net {
                octets: small,
                len: 28,
                in_array: rng.chance(50),
            },
        ];
        let v6 = vec![
            V6Net {
                octets: [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                len: 64,
            },
            V6Net {
                octets: [
                    0x20, 0x01, 0x0d, 0xb8, 0, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
                len: 48,
            },
        ];
        let mut endpoints = Vec::new();
        let mut dsts4 = Vec::new();
        let mut dsts6 = Vec::new();
        for net in &v4 {
            let (first, last) = (net.first(), net.last());
            let size = (last - first) as usize + 1;
            let mut addrs: Vec<u32> = vec![first, last];
            for _ in 0..3 {
                addrs.push(first + rng.below(size) as u32);
            }
            for (i, &a) in addrs.iter().enumerate() {
                let a = a.to_be_bytes();
                dsts4.push(a);
                // Most of them are endpoints; the rest stay empty slots or
                // missing keys.
                if i < 4
                    && !endpoints
                        .iter()
                        .any(|e: &FuzzEndpoint| e.addr == frames::v4_mapped(a))
                {
                    endpoints.push(FuzzEndpoint {
                        addr: frames::v4_mapped(a),
                        mac: rng.unicast_mac(),
                        ambiguous: i == 3,
                        source: source::STATIC,
                    });
                }
            }
            // Just outside.
            dsts4.push(first.wrapping_sub(1).to_be_bytes());
            dsts4.push(last.wrapping_add(1).to_be_bytes());
        }
        dsts4.push([192, 168, 2, 240]);
        for net in &v6 {
            let first = net.first();
            let host = !mask128(net.len);
            for i in 0..4 {
                let a = (first | (u128::from(rng.next_u64()) & host)).to_be_bytes();
                dsts6.push(a);
                if i < 3 {
                    endpoints.push(FuzzEndpoint {
                        addr: a,
                        mac: rng.unicast_mac(),
                        ambiguous: i == 2,
                        source: source::STATIC,
                    });
                }
            }
            dsts6.push((first.wrapping_sub(1)).to_be_bytes());
            dsts6.push((first | host).wrapping_add(1).to_be_bytes());
        }
        let mut macs: Vec<Mac> = endpoints.iter().map(|e| e.mac).collect();
        macs.extend([ROUTER, rng.unicast_mac(), rng.unicast_mac()]);
        // Half static; the others learning may overwrite (keeping their
        // flags: some of them are ambiguous).
        for e in &mut endpoints {
            e.source = rng.pick(&[
                source::STATIC,
                source::STATIC,
                source::LEARNED,
                source::CHILD,
            ]);
        }
        let own_macs = vec![ROUTER, rng.unicast_mac()];
        let mut src_macs: Vec<Mac> = endpoints.iter().map(|e| e.mac).collect();
        src_macs.extend(&own_macs);
        for _ in 0..4 {
            src_macs.push(rng.unicast_mac());
        }
        let mut s = Self {
            v4,
            v6,
            endpoints,
            dsts4,
            dsts6,
            macs,
            own_macs,
            src_macs,
            hash_capacity: 0,
        };
        let in_hash = s
            .endpoints
            .iter()
            .filter(|e| matches!(s.place(e.addr), Some(Place::Hash(_))))
            .count() as u32;
        s.hash_capacity = in_hash + HASH_ROOM;
        s
    }

    /// Where the programs keep the endpoint of `addr` (IPv4 mapped into
    /// IPv6), if it lies in a prefix: the first IPv4 prefix that holds it
    /// decides, and the array's prefixes take their slots one after the
    /// other in the order of the prefixes.
    pub fn place(&self, addr: [u8; 16]) -> Option<Place> {
        if addr[..12] != frames::v4_mapped([0; 4])[..12] {
            return self
                .v6
                .iter()
                .any(|net| net.contains(addr))
                .then_some(Place::Hash(addr));
        }
        let a: [u8; 4] = addr[12..].try_into().expect("four bytes");
        let mut base = 0;
        for net in &self.v4 {
            if net.contains(a) {
                return Some(if net.in_array {
                    Place::Slot(base + (u32::from_be_bytes(a) - net.first()))
                } else {
                    Place::Hash(addr)
                });
            }
            if net.in_array {
                base += net.last() - net.first() + 1;
            }
        }
        None
    }

    /// The configuration, fix mode, events not rate-limited.
    pub fn config(&self) -> Config {
        let mut slot_base = 0;
        let v4: Vec<_> = self
            .v4
            .iter()
            .map(|net| {
                if net.in_array {
                    let p = v4_array_prefix(net.octets, net.len, slot_base);
                    slot_base += p.slots;
                    p
                } else {
                    v4_prefix(net.octets, net.len)
                }
            })
            .collect();
        let v6: Vec<_> = self
            .v6
            .iter()
            .map(|net| v6_prefix(net.octets, net.len))
            .collect();
        config(true, &v4, &v6, &self.own_macs, 0)
    }

    /// A fresh guard with this configuration and these endpoints, its hash
    /// map [`Self::hash_capacity`] entries large.
    pub fn load(&self) -> progs::Result<Guard> {
        let mut g = Guard::load_with_hash_capacity(self.hash_capacity)?;
        g.set_config(&self.config())?;
        for e in &self.endpoints {
            let ep = Endpoint {
                flags: if e.ambiguous {
                    endpoint_flags::AMBIGUOUS
                } else {
                    0
                },
                source: e.source,
                ..endpoint(e.mac)
            };
            g.insert_endpoint(EndpointKey::from_v6_bytes(e.addr), &ep)?;
        }
        Ok(g)
    }

    /// The oracle for this scenario, its table as the scenario loads the maps.
    pub fn oracle(&self) -> Oracle<'_> {
        let mut table = HashMap::new();
        for e in &self.endpoints {
            let place = self.place(e.addr).expect("an endpoint inside a prefix");
            let head = Head {
                mac: e.mac,
                source: e.source,
                flags: if e.ambiguous {
                    endpoint_flags::AMBIGUOUS
                } else {
                    0
                },
            };
            table.insert(
                place,
                Entry {
                    addr: e.addr,
                    head,
                    learned_at: None,
                },
            );
        }
        Oracle {
            scenario: self,
            table,
            learned_new: 0,
            learned_moved: 0,
            learn_failed: 0,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for net in &self.v4 {
            let [a, b, c, d] = net.octets;
            let place = if net.in_array { "array" } else { "hash" };
            write!(f, "{a}.{b}.{c}.{d}/{} ({place}), ", net.len)?;
        }
        for net in &self.v6 {
            write!(
                f,
                "{}/{} (hash), ",
                std::net::Ipv6Addr::from(net.octets),
                net.len
            )?;
        }
        let ambiguous = self.endpoints.iter().filter(|e| e.ambiguous).count();
        let fixed = self
            .endpoints
            .iter()
            .filter(|e| e.source == source::STATIC)
            .count();
        write!(
            f,
            "{} endpoints ({ambiguous} ambiguous, {fixed} static), hash map of {}",
            self.endpoints.len(),
            self.hash_capacity
        )
    }
}

/// What the design says the programs do with a frame (fix mode).
///
/// The guard: the MAC to write, or None to leave it untouched. Up to two
/// 802.1Q/802.1ad tags, IPv4 (version 4, IHL ≥ 5, total length ≥ header
/// and within the frame) or IPv6 (payload within the frame), destination
/// inside a prefix and an endpoint, unicast destination MAC that differs
/// from the endpoint's, endpoint not ambiguous and its MAC unicast and not
/// zero.
///
/// Learning (the tc learning program, before its guard, on the same frame):
/// a usable (unicast, non-zero) source MAC that is not one of the own MACs,
/// sent from a watched address (the IP source, or the sender of an
/// Ethernet/IPv4 ARP packet whose sender MAC is the frame's source MAC and
/// whose sender address is not 0.0.0.0), becomes that address's endpoint
/// with source LEARNED, keeping the flags of the endpoint it replaces;
/// except over a static endpoint, or one that already has that MAC. A new
/// endpoint goes into its array slot, or into the hash map if there is
/// room (else it is not learned: learn_failed). The table is kept place by
/// place, as the maps keep it.
pub struct Oracle<'a> {
    scenario: &'a Scenario,
    table: HashMap<Place, Entry>,
    /// Learning as the oracle counts it (the program's counters must agree).
    pub learned_new: u64,
    pub learned_moved: u64,
    pub learn_failed: u64,
}

/// Where the programs keep an endpoint: a slot of the direct-indexed
/// array, or the hash map under the address (IPv4 mapped into IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Place {
    Slot(u32),
    Hash([u8; 16]),
}

/// What the programs act on of an endpoint: its MAC, source and flags.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub mac: Mac,
    pub source: u8,
    pub flags: u8,
}

impl fmt::Debug for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mac {:02x?} source {} flags {}",
            self.mac, self.source, self.flags
        )
    }
}

impl Head {
    fn of(ep: &Endpoint) -> Self {
        Self {
            mac: ep.mac,
            source: ep.source,
            flags: ep.flags,
        }
    }
}

/// An endpoint of the oracle's table: its address, its head, and the index
/// of the frame that last changed it by learning (to replay a wrong learn).
#[derive(Clone, Copy, Debug)]
struct Entry {
    addr: [u8; 16],
    head: Head,
    learned_at: Option<u64>,
}

/// Where the guard finds an endpoint: the direct-indexed array or the hash
/// map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Array,
    Hash,
}

/// The network layer of a frame the programs accept, and its offset.
#[derive(Clone, Copy)]
enum Net {
    V4(usize),
    V6(usize),
    Arp(usize),
}

/// Whether a MAC can be an endpoint's: unicast and not all-zero.
fn usable(mac: &[u8]) -> bool {
    mac[0] & 1 == 0 && mac.iter().any(|&b| b != 0)
}

/// The network layer after up to two tags: a valid IPv4 or IPv6 header
/// whose datagram fits in the frame, or ARP (not checked further here).
fn net(f: &[u8]) -> Option<Net> {
    let be16 = |at: usize| -> Option<usize> {
        Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]) as usize)
    };
    let mut off = 14;
    let mut proto = be16(12)?;
    for _ in 0..2 {
        if proto != 0x8100 && proto != 0x88a8 {
            break;
        }
        proto = be16(off + 2)?;
        off += 4;
    }
    match proto {
        0x0800 => {
            let ver_ihl = *f.get(off)?;
            let ihl = (ver_ihl & 0x0f) as usize * 4;
            let total = be16(off + 2)?;
            if ver_ihl >> 4 != 4 || ihl < 20 || total < ihl || off + total > f.len() {
                return None;
            }
            Some(Net::V4(off))
        }
        0x86dd => {
            if *f.get(off)? >> 4 != 6 {
                return None;
            }
            let payload = be16(off + 4)?;
            if off + 40 + payload > f.len() {
                return None;
            }
            Some(Net::V6(off))
        }
        0x0806 => Some(Net::Arp(off)),
        _ => None,
    }
}

fn v4_at(f: &[u8], at: usize) -> Option<[u8; 16]> {
    let a: [u8; 4] = f.get(at..at + 4)?.try_into().ok()?;
    Some(frames::v4_mapped(a))
}

fn v6_at(f: &[u8], at: usize) -> Option<[u8; 16]> {
    f.get(at..at + 16)?.try_into().ok()
}

impl Oracle<'_> {
    /// The MAC `f` must be rewritten to, if any.
    pub fn expected(&self, f: &[u8]) -> Option<Mac> {
        self.expected_via(f).map(|(mac, _)| mac)
    }

    /// The MAC `f` must be rewritten to, and where its endpoint is kept.
    pub fn expected_via(&self, f: &[u8]) -> Option<(Mac, Lookup)> {
        if f.len() < 14 || f[0] & 1 != 0 {
            return None;
        }
        let dst = match net(f)? {
            Net::V4(off) => v4_at(f, off + 16)?,
            Net::V6(off) => v6_at(f, off + 24)?,
            Net::Arp(_) => return None,
        };
        let place = self.scenario.place(dst)?;
        let head = self.table.get(&place)?.head;
        assert_ne!(
            head.source,
            source::NEIGHBOUR,
            "the fuzz has no neighbour-table endpoints (see FuzzEndpoint)"
        );
        if head.mac == f[..6] || head.flags & endpoint_flags::AMBIGUOUS != 0 || !usable(&head.mac) {
            return None;
        }
        let lookup = match place {
            Place::Slot(_) => Lookup::Array,
            Place::Hash(_) => Lookup::Hash,
        };
        Some((head.mac, lookup))
    }

    /// Learns from frame number `index` as the learning program does
    /// (which then guards the same frame: call this first). Returns where
    /// it learned, if it did.
    pub fn learn(&mut self, f: &[u8], index: u64) -> Option<Place> {
        let src: Mac = f.get(6..12)?.try_into().ok()?;
        if !usable(&src) {
            return None;
        }
        let addr = match net(f)? {
            Net::V4(off) => v4_at(f, off + 12)?,
            Net::V6(off) => v6_at(f, off + 8)?,
            Net::Arp(off) => {
                // Ethernet/IPv4, 6-byte MACs, 4-byte addresses; the sender
                // MAC is the frame's; the sender has an address.
                if f.get(off..off + 6)? != [0, 1, 0x08, 0x00, 6, 4]
                    || f.get(off + 8..off + 14)? != src
                {
                    return None;
                }
                let spa = v4_at(f, off + 14)?;
                if spa[12..] == [0; 4] {
                    return None;
                }
                spa
            }
        };
        let place = self.scenario.place(addr)?;
        if self.scenario.own_macs.contains(&src) {
            return None;
        }
        let learned = |flags| Head {
            mac: src,
            source: source::LEARNED,
            flags,
        };
        let old = match self.table.get(&place) {
            Some(e) if e.head.mac == src || e.head.source == source::STATIC => return None,
            Some(e) => {
                let old = e.head.mac;
                self.table.insert(
                    place,
                    Entry {
                        addr,
                        head: learned(e.head.flags),
                        learned_at: Some(index),
                    },
                );
                old
            }
            None => {
                // An empty slot, written in place with its flags (the
                // fuzz's empty slots are all zero), or a new key of the
                // hash map, if there is room.
                let in_hash = self
                    .table
                    .keys()
                    .filter(|p| matches!(p, Place::Hash(_)))
                    .count();
                if matches!(place, Place::Hash(_))
                    && in_hash >= self.scenario.hash_capacity as usize
                {
                    self.learn_failed += 1;
                    return None;
                }
                self.table.insert(
                    place,
                    Entry {
                        addr,
                        head: learned(0),
                        learned_at: Some(index),
                    },
                );
                [0; 6]
            }
        };
        if old == [0; 6] {
            self.learned_new += 1;
        } else {
            self.learned_moved += 1;
        }
        Some(place)
    }

    /// Compares the programs' maps with the table: every hash map entry
    /// and every array slot (an empty one all zero). One line per
    /// endpoint that differs.
    pub fn compare(&self, g: &Guard) -> progs::Result<Vec<String>> {
        let mut wrong = Vec::new();
        let show = |e: Option<&Entry>| match e {
            Some(e) => format!(
                "{:?} (oracle's last learn: {})",
                e.head,
                e.learned_at
                    .map_or("none".to_owned(), |i| format!("frame #{i}"))
            ),
            None => "nothing".to_owned(),
        };
        let hash = g.hash_entries()?;
        for (key, ep) in &hash {
            let place = Place::Hash(key.bytes());
            let want = self.table.get(&place);
            if want.map(|e| e.head) != Some(Head::of(ep))
                || want.is_some_and(|e| e.learned_at.is_some() && ep.updated_ns == 0)
            {
                wrong.push(format!(
                    "hash map {}: holds {:?} (updated_ns {}), oracle says {}",
                    std::net::Ipv6Addr::from(key.bytes()),
                    Head::of(ep),
                    ep.updated_ns,
                    show(want)
                ));
            }
        }
        let keys: std::collections::HashSet<[u8; 16]> =
            hash.iter().map(|(k, _)| k.bytes()).collect();
        for (place, e) in &self.table {
            if let Place::Hash(addr) = place {
                if !keys.contains(addr) {
                    wrong.push(format!(
                        "hash map {}: missing, oracle says {}",
                        std::net::Ipv6Addr::from(*addr),
                        show(Some(e))
                    ));
                }
            }
        }
        for i in 0..MAX_ARRAY_SLOTS {
            let ep = g.slot(i)?;
            let want = self.table.get(&Place::Slot(i));
            let ok = match want {
                Some(e) => {
                    Head::of(&ep) == e.head && (e.learned_at.is_none() || ep.updated_ns != 0)
                }
                None => {
                    Head::of(&ep)
                        == Head {
                            mac: [0; 6],
                            source: 0,
                            flags: 0,
                        }
                }
            };
            if !ok {
                let addr = want.map_or(String::new(), |e| {
                    format!(" ({})", std::net::Ipv6Addr::from(e.addr))
                });
                wrong.push(format!(
                    "array slot {i}{addr}: holds {:?} (updated_ns {}), oracle says {}",
                    Head::of(&ep),
                    ep.updated_ns,
                    show(want)
                ));
            }
        }
        Ok(wrong)
    }
}

/// The frames of a run: a quarter random bytes, the rest IPv4/IPv6
/// UDP/TCP and ARP toward the scenario's addresses, mostly mutated.
pub struct FrameSource<'a> {
    scenario: &'a Scenario,
    rng: Rng,
}

impl<'a> FrameSource<'a> {
    pub fn new(scenario: &'a Scenario, seed: u64) -> Self {
        Self {
            scenario,
            rng: Rng::new(seed),
        }
    }

    pub fn next_frame(&mut self) -> Vec<u8> {
        let s = self.scenario;
        let rng = &mut self.rng;
        if rng.chance(25) {
            // Random bytes, sometimes with a plausible ethertype.
            let len = 15 + rng.below(140);
            let mut f: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            if rng.chance(60) {
                f[0] &= 0xfe;
                let et: u16 = rng.pick(&[0x0800, 0x86dd, 0x8100, 0x88a8, 0x0806]);
                f[12..14].copy_from_slice(&et.to_be_bytes());
            }
            return f;
        }
        let vlan = rng.pick(&[Vlan::None, Vlan::Single(10), Vlan::Double(100, 10)]);
        // Sources for learning: the scenario's addresses (endpoints or
        // not, inside the prefixes or just outside) or the peer; the
        // endpoints' MACs, the own ones, new ones, now and then a group
        // or zero MAC.
        let src_mac = if rng.chance(4) {
            rng.pick(&[BROADCAST, [0; 6], [0x01, 0x00, 0x5e, 0, 0, 1]])
        } else {
            rng.pick(&s.src_macs)
        };
        let l2 = L2::new(rng.pick(&s.macs), src_mac).vlan(vlan);
        let src4 = if rng.chance(40) {
            PEER4
        } else {
            rng.pick(&s.dsts4)
        };
        let src6 = if rng.chance(40) {
            PEER6
        } else {
            rng.pick(&s.dsts6)
        };
        let mut f = match rng.below(5) {
            0 => frames::udp4(l2, src4, rng.pick(&s.dsts4), SPORT, DPORT, PAYLOAD),
            1 => frames::tcp4(l2, src4, rng.pick(&s.dsts4), SPORT, DPORT, PAYLOAD),
            2 => frames::udp6(l2, src6, rng.pick(&s.dsts6), SPORT, DPORT, PAYLOAD),
            3 => frames::tcp6(l2, src6, rng.pick(&s.dsts6), SPORT, DPORT, PAYLOAD),
            _ => {
                let sha = if rng.chance(85) {
                    src_mac
                } else {
                    rng.pick(&s.src_macs)
                };
                let spa = if rng.chance(10) { [0; 4] } else { src4 };
                frames::arp(l2, 1, sha, spa, [0; 6], rng.pick(&s.dsts4))
            }
        };
        if rng.chance(85) {
            mutate(rng, &mut f, s);
        }
        f
    }
}

/// One to three mutations, mostly in the headers the guards parse.
fn mutate(rng: &mut Rng, f: &mut Vec<u8>, s: &Scenario) {
    let l3 = |f: &Vec<u8>| match u16::from_be_bytes([f[12], f[13]]) {
        0x8100 => 18,
        0x88a8 => 22,
        _ => 14,
    };
    for _ in 0..1 + rng.below(3) {
        match rng.below(11) {
            0 => {
                // Flip a bit, mostly in the headers.
                let span = if rng.chance(80) {
                    f.len().min(70)
                } else {
                    f.len()
                };
                let at = rng.below(span);
                f[at] ^= 1 << rng.below(8);
            }
            1 => {
                let at = rng.below(f.len());
                f[at] = rng.byte();
            }
            2 => {
                let n = 15 + rng.below(f.len().saturating_sub(14).max(1));
                f.truncate(n);
            }
            3 => {
                for _ in 0..1 + rng.below(40) {
                    f.push(rng.byte());
                }
            }
            4 => {
                let mac = match rng.below(4) {
                    0 => BROADCAST,
                    1 => [0x01, 0x00, 0x5e, 0, 0, rng.byte()],
                    2 => std::array::from_fn(|_| rng.byte()),
                    _ => rng.pick(&s.macs),
                };
                f[..6].copy_from_slice(&mac);
            }
            5 => {
                let any = rng.next_u64() as u16;
                let et: u16 = rng.pick(&[0x0800, 0x86dd, 0x8100, 0x88a8, 0x0806, any]);
                let at = if rng.chance(50) {
                    12
                } else {
                    (l3(f) - 2).min(f.len() - 2)
                };
                f[at..at + 2].copy_from_slice(&et.to_be_bytes());
            }
            6 => {
                // IPv4 total length or IPv6 payload length: off by a little, or anything.
                let at = l3(f)
                    + if f.get(l3(f)).is_some_and(|b| b >> 4 == 6) {
                        4
                    } else {
                        2
                    };
                if at + 2 <= f.len() {
                    let old = u16::from_be_bytes([f[at], f[at + 1]]);
                    let new = match rng.below(3) {
                        0 => old.wrapping_add(1),
                        1 => old.wrapping_sub(1 + rng.below(4) as u16),
                        _ => rng.next_u64() as u16,
                    };
                    f[at..at + 2].copy_from_slice(&new.to_be_bytes());
                }
            }
            7 => {
                // Version / IHL byte.
                let at = l3(f);
                if at < f.len() {
                    let any = rng.byte();
                    f[at] = rng.pick(&[0x45, 0x46, 0x44, 0x4f, 0x60, 0x65, 0x55, any]);
                }
            }
            8 => {
                // The source MAC: another of the pool, a group MAC, or any.
                let mac = match rng.below(4) {
                    0 => [0x01, 0x00, 0x5e, 0, 0, rng.byte()],
                    1 => std::array::from_fn(|_| rng.byte()),
                    _ => rng.pick(&s.src_macs),
                };
                f[6..12].copy_from_slice(&mac);
            }
            9 => {
                // A source address byte (IPv4 at +12..16, IPv6 at +8..24,
                // an ARP sender at +14..18), as for destinations below.
                let (at, known) = match rng.below(3) {
                    0 => {
                        let i = rng.below(4);
                        (12 + i, rng.pick(&s.dsts4)[i])
                    }
                    1 => {
                        let i = rng.below(16);
                        (8 + i, rng.pick(&s.dsts6)[i])
                    }
                    _ => {
                        let i = rng.below(4);
                        (14 + i, rng.pick(&s.dsts4)[i])
                    }
                };
                let at = l3(f) + at;
                if at < f.len() {
                    f[at] = if rng.chance(75) { known } else { rng.byte() };
                }
            }
            _ => {
                // A destination address byte (IPv4 at +16..20, IPv6 at
                // +24..40): the same byte of another known destination
                // (which may move it to another endpoint or prefix), or any.
                let (at, known) = if rng.chance(50) {
                    let i = rng.below(4);
                    (16 + i, rng.pick(&s.dsts4)[i])
                } else {
                    let i = rng.below(16);
                    (24 + i, rng.pick(&s.dsts6)[i])
                };
                let at = l3(f) + at;
                if at < f.len() {
                    f[at] = if rng.chance(75) { known } else { rng.byte() };
                }
            }
        }
    }
    while f.len() < 15 {
        f.push(rng.byte());
    }
}

/// What went wrong with one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wrong {
    /// Changed when it had to pass untouched, changed to another MAC than
    /// the endpoint's, or changed beyond bytes 0..6.
    Rewrite,
    /// Untouched when it had to be rewritten.
    Pass,
    /// Another verdict than pass, another output length, or a test run the
    /// kernel had no reason to refuse.
    Run,
    /// After the run, an endpoint in the maps (hash map entry or array
    /// slot) that differs from the oracle's table, or is missing there.
    Learn,
}

/// A wrong frame, to replay: the seed, its index and its bytes.
#[derive(Clone, Debug)]
pub struct Example {
    pub prog: Prog,
    pub seed: u64,
    pub index: u64,
    pub wrong: Wrong,
    pub frame: Vec<u8>,
    pub detail: String,
}

impl fmt::Display for Example {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wrong == Wrong::Learn {
            return write!(
                f,
                "{:?} seed {} after {} frames: wrong learn: {}",
                self.prog, self.seed, self.index, self.detail
            );
        }
        let hex: String = self.frame.iter().map(|b| format!("{b:02x}")).collect();
        write!(
            f,
            "{:?} seed {} frame #{}: wrong {:?}: {}\n    {hex}",
            self.prog, self.seed, self.index, self.wrong, self.detail
        )
    }
}

/// How many wrong frames a report keeps as examples.
pub const EXAMPLES_KEPT: usize = 5;

/// The tally of a run on one program.
#[derive(Clone, Debug)]
pub struct Report {
    pub prog: Prog,
    pub seed: u64,
    pub frames: u64,
    /// Frames the kernel's test_run refused before the program ran (EINVAL
    /// on a frame it may refuse, see [`kernel_may_refuse`]).
    pub refused: u64,
    /// Frames the program changed.
    pub rewritten: u64,
    /// Frames the oracle says must be rewritten.
    pub expected_rewrites: u64,
    /// Of those, the ones whose endpoint is in the direct-indexed array.
    pub expected_via_array: u64,
    pub wrong_rewrites: u64,
    pub wrong_passes: u64,
    pub wrong_runs: u64,
    /// Endpoints the maps hold otherwise than the oracle after the run.
    pub wrong_learns: u64,
    /// Learning as the oracle counts it: new endpoints, moved ones, and
    /// failures (hash map full).
    pub expected_learned_new: u64,
    pub expected_learned_moved: u64,
    pub expected_learn_failed: u64,
    /// The program's counters after the run (summed over CPUs).
    pub counters: Counters,
    /// STALE events read from the ring buffer.
    pub events: u64,
    /// LEARNED events read from the ring buffer.
    pub learn_events: u64,
    pub examples: Vec<Example>,
    pub seconds: f64,
}

impl Report {
    fn new(prog: Prog, seed: u64) -> Self {
        Self {
            prog,
            seed,
            frames: 0,
            refused: 0,
            rewritten: 0,
            expected_rewrites: 0,
            expected_via_array: 0,
            wrong_rewrites: 0,
            wrong_passes: 0,
            wrong_runs: 0,
            wrong_learns: 0,
            expected_learned_new: 0,
            expected_learned_moved: 0,
            expected_learn_failed: 0,
            counters: Counters::default(),
            events: 0,
            learn_events: 0,
            examples: Vec::new(),
            seconds: 0.0,
        }
    }

    /// Whether the program's counters agree with what the frames show:
    /// one `rewritten` per changed frame, at least one `stale` per
    /// rewrite, at most one event per stale frame; learning counted as
    /// the oracle counts it, at most one LEARNED event per endpoint learned.
    pub fn counters_consistent(&self) -> bool {
        let c = &self.counters;
        c.rewritten == self.rewritten
            && c.stale >= c.rewritten
            && self.events <= c.stale
            && c.learned_new == self.expected_learned_new
            && c.learned_moved == self.expected_learned_moved
            && c.learn_failed == self.expected_learn_failed
            && self.learn_events <= c.learned_new + c.learned_moved
    }

    /// Nothing wrong: every frame as the oracle says, counters consistent.
    pub fn is_clean(&self) -> bool {
        self.wrong_rewrites == 0
            && self.wrong_passes == 0
            && self.wrong_runs == 0
            && self.wrong_learns == 0
            && self.counters_consistent()
    }

    fn wrong(&mut self, wrong: Wrong, index: u64, frame: &[u8], detail: String) {
        match wrong {
            Wrong::Rewrite => self.wrong_rewrites += 1,
            Wrong::Pass => self.wrong_passes += 1,
            Wrong::Run => self.wrong_runs += 1,
            Wrong::Learn => self.wrong_learns += 1,
        }
        if self.examples.len() < EXAMPLES_KEPT {
            self.examples.push(Example {
                prog: self.prog,
                seed: self.seed,
                index,
                wrong,
                frame: frame.to_vec(),
                detail,
            });
        }
    }

    pub fn frames_per_second(&self) -> f64 {
        self.frames as f64 / self.seconds.max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counters;
        writeln!(
            f,
            "{:?}: {} frames in {:.1} s ({:.0} frames/s), {} refused by test_run",
            self.prog,
            self.frames,
            self.seconds,
            self.frames_per_second(),
            self.refused
        )?;
        writeln!(
            f,
            "  rewritten {} of {} expected ({} via the array, {} via the hash map); \
             wrong rewrites {}, wrong passes {}, wrong runs {}, wrong learns {}",
            self.rewritten,
            self.expected_rewrites,
            self.expected_via_array,
            self.expected_rewrites - self.expected_via_array,
            self.wrong_rewrites,
            self.wrong_passes,
            self.wrong_runs,
            self.wrong_learns
        )?;
        if self.prog == Prog::TcLearn {
            writeln!(
                f,
                "  learned {} new, {} moved, {} failed (hash map full) of {} new, {} moved, {} \
                 failed expected; {} LEARNED events read",
                c.learned_new,
                c.learned_moved,
                c.learn_failed,
                self.expected_learned_new,
                self.expected_learned_moved,
                self.expected_learn_failed,
                self.learn_events
            )?;
        }
        write!(
            f,
            "  counters: rewritten {} (changed frames {}), stale {}, ambiguous {}, events {} \
             read, {} lost: {}",
            c.rewritten,
            self.rewritten,
            c.stale,
            c.ambiguous,
            self.events,
            c.events_lost,
            if self.counters_consistent() {
                "consistent"
            } else {
                "INCONSISTENT"
            }
        )?;
        for example in &self.examples {
            write!(f, "\n  {example}")?;
        }
        Ok(())
    }
}

/// Runs `frames` frames of `seed` through `prog` on a fresh guard loaded
/// with `scenario`, checking each against the oracle; calls `progress`
/// every `progress_every` frames with the report so far (counters not yet
/// read). Keeps going after a wrong frame.
pub fn run(
    prog: Prog,
    scenario: &Scenario,
    seed: u64,
    frames: u64,
    progress_every: u64,
    mut progress: impl FnMut(&Report),
) -> progs::Result<Report> {
    let mut g = scenario.load()?;
    let mut oracle = scenario.oracle();
    let mut source = FrameSource::new(scenario, seed);
    let mut report = Report::new(prog, seed);
    let started = Instant::now();
    for index in 0..frames {
        let frame = source.next_frame();
        check(&g, prog, &mut oracle, index, &frame, &mut report);
        report.frames += 1;
        if progress_every > 0
            && report.frames.is_multiple_of(progress_every)
            && report.frames < frames
        {
            // Keeps the ring buffer moving: events full and not.
            drain(&mut g, &mut report);
            report.seconds = started.elapsed().as_secs_f64();
            progress(&report);
        }
    }
    drain(&mut g, &mut report);
    report.counters = g.counters()?;
    report.expected_learned_new = oracle.learned_new;
    report.expected_learned_moved = oracle.learned_moved;
    report.expected_learn_failed = oracle.learn_failed;
    for detail in oracle.compare(&g)? {
        report.wrong(Wrong::Learn, frames, &[], detail);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Counts the events waiting, by kind.
fn drain(g: &mut Guard, report: &mut Report) {
    for ev in g.drain_events() {
        if ev.kind == event_kind::LEARNED {
            report.learn_events += 1;
        } else {
            report.events += 1;
        }
    }
}

/// Runs one frame and records what the oracle says of the outcome.
fn check(
    g: &Guard,
    prog: Prog,
    oracle: &mut Oracle,
    index: u64,
    frame: &[u8],
    report: &mut Report,
) {
    let out = match g.run(prog, frame) {
        Ok(out) => out,
        Err(e) if kernel_may_refuse(prog, frame) && errno(&e) == Some(libc::EINVAL) => {
            report.refused += 1;
            return;
        }
        Err(e) => {
            report.wrong(Wrong::Run, index, frame, format!("test_run failed: {e}"));
            return;
        }
    };
    // The program ran: the learning one learns before it guards.
    if prog == Prog::TcLearn {
        oracle.learn(frame, index);
    }
    if out.ret != prog.pass_value() || out.data.len() != frame.len() {
        let detail = format!(
            "verdict {} (pass is {}), {} bytes out of {}",
            out.ret,
            prog.pass_value(),
            out.data.len(),
            frame.len()
        );
        report.wrong(Wrong::Run, index, frame, detail);
        return;
    }
    let changed = out.data != frame;
    if changed {
        report.rewritten += 1;
    }
    let expected = oracle.expected_via(frame).map(|(mac, lookup)| {
        report.expected_rewrites += 1;
        if lookup == Lookup::Array {
            report.expected_via_array += 1;
        }
        mac
    });
    let written = &out.data[..6];
    match expected {
        None if changed => {
            let detail = format!("must pass untouched; {}", changes(frame, &out.data));
            report.wrong(Wrong::Rewrite, index, frame, detail);
        }
        None => {}
        Some(mac) if !changed => {
            let detail = format!("must be rewritten to {mac:02x?}");
            report.wrong(Wrong::Pass, index, frame, detail);
        }
        Some(mac) if written != mac || out.data[6..] != frame[6..] => {
            let detail = format!(
                "must be rewritten to {mac:02x?} only; {}",
                changes(frame, &out.data)
            );
            report.wrong(Wrong::Rewrite, index, frame, detail);
        }
        Some(_) => {}
    }
}

/// What a program changed in a frame of the same length: the destination
/// it left and the offsets of the bytes that differ.
pub fn changes(frame: &[u8], out: &[u8]) -> String {
    let changed: Vec<usize> = (0..frame.len().min(out.len()))
        .filter(|&i| out[i] != frame[i])
        .collect();
    format!(
        "out destination {:02x?}, bytes changed at {changed:?}",
        &out[..out.len().min(6)]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4_to(dst_mac: Mac, dst: [u8; 4]) -> Vec<u8> {
        frames::udp4(L2::new(dst_mac, ROUTER), PEER4, dst, SPORT, DPORT, PAYLOAD)
    }

    #[test]
    fn the_same_seed_gives_the_same_scenario_and_frames() {
        let (a, b) = (Scenario::from_seed(7), Scenario::from_seed(7));
        assert_eq!(a.to_string(), b.to_string());
        assert_eq!(a.endpoints, b.endpoints);
        let (mut fa, mut fb) = (FrameSource::new(&a, 7), FrameSource::new(&b, 7));
        for _ in 0..1000 {
            assert_eq!(fa.next_frame(), fb.next_frame());
        }
        let other = FrameSource::new(&a, 8).next_frame();
        assert_ne!(FrameSource::new(&a, 7).next_frame(), other);
    }

    #[test]
    fn seeds_fuzz_both_places_of_the_small_prefix() {
        let places: std::collections::HashSet<bool> = (0..64)
            .map(|seed| Scenario::from_seed(seed).v4[2].in_array)
            .collect();
        assert_eq!(places.len(), 2, "array and hash map");
    }

    #[test]
    fn the_oracle_reads_the_spec() {
        let s = Scenario::from_seed(1);
        let oracle = s.oracle();
        let stale = [0x02, 0, 0, 0, 0, 0x99];
        for e in &s.endpoints {
            let v4: Option<[u8; 4]> = (e.addr[..12] == frames::v4_mapped([0; 4])[..12])
                .then(|| e.addr[12..].try_into().unwrap());
            let frame = match v4 {
                Some(a) => udp4_to(stale, a),
                None => frames::udp6(L2::new(stale, ROUTER), PEER6, e.addr, SPORT, DPORT, PAYLOAD),
            };
            let want = (!e.ambiguous).then_some(e.mac);
            assert_eq!(oracle.expected(&frame), want, "{e:?}");
            // Already at the endpoint's MAC, or to a group MAC: untouched.
            assert_eq!(
                oracle.expected(&frames::with_dst(frame.clone(), e.mac)),
                None
            );
            assert_eq!(
                oracle.expected(&frames::with_dst(frame.clone(), BROADCAST)),
                None
            );
            // A datagram longer than the frame: untouched.
            assert_eq!(oracle.expected(&frame[..frame.len() - 1]), None, "{e:?}");
        }
        // The /24's edges are inside; its neighbours outside.
        assert!(s.v4[0].contains([192, 168, 1, 0]) && s.v4[0].contains([192, 168, 1, 255]));
        assert!(!s.v4[0].contains([192, 168, 0, 255]) && !s.v4[0].contains([192, 168, 2, 0]));
        // An address outside every prefix: untouched.
        assert_eq!(oracle.expected(&udp4_to(stale, [192, 168, 2, 240])), None);
    }
}
