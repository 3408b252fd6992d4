//! Types shared by the kernel side (flowguard-ebpf) and the user side
//! (flowguard-user): map keys and values, counters, events and settings.
//! Every type is `#[repr(C)]` with explicit padding so that `bytemuck`'s
//! derives prove at compile time that no byte is left undefined.
#![cfg_attr(not(test), no_std)]

use bytemuck::{Pod, Zeroable};

/// Capacity of the endpoint hash map (IPv6, and IPv4 outside the array).
pub const MAX_ENDPOINTS: u32 = 16_384;
/// Largest IPv4 prefix whose endpoints live in the direct-indexed array
/// (ENDPOINTS_V4), in addresses: a /20. A slot costs 64 bytes of kernel
/// memory whether it holds an endpoint or not, so a /20 is 256 KiB while a
/// /16 would be 4 MiB: too much of a 64 MB router for a prefix that is
/// mostly empty. Larger prefixes use the hash map.
pub const MAX_ARRAY_PREFIX_ADDRS: u32 = 4096;
/// Slots of the direct-indexed array, all prefixes together (1 MiB at
/// most, less than the hash map's 2.5 MiB preallocated at its default
/// size). Prefixes that no longer fit use the hash map.
pub const MAX_ARRAY_SLOTS: u32 = 16_384;
/// Most IPv4 prefixes one instance can watch.
pub const MAX_V4_PREFIXES: usize = 16;
/// Most IPv6 prefixes one instance can watch.
pub const MAX_V6_PREFIXES: usize = 8;
/// Most interface MAC addresses that learning ignores.
pub const MAX_OWN_MACS: usize = 8;
/// Capacity of the PORTS map: bridge ports flowguard may redirect between.
pub const MAX_PORTS: u32 = 64;
/// Size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 256 * 1024;

/// Names of the maps in the object file (at most 15 characters, the kernel's limit).
pub mod map_names {
    pub const CONFIG: &str = "CONFIG";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const ENDPOINTS_V4: &str = "ENDPOINTS_V4";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
    pub const USER_COUNTERS: &str = "USER_COUNTERS";
    pub const PORTS: &str = "PORTS";
}

/// File names the maps are pinned under, inside the pin directory.
pub mod pin_names {
    pub const CONFIG: &str = "config";
    pub const ENDPOINTS: &str = "endpoints";
    /// The direct-indexed IPv4 endpoints: slot `V4Prefix::slot_base + host
    /// part` of the prefix that holds the address.
    pub const ENDPOINTS_V4: &str = "endpoints_v4";
    pub const COUNTERS: &str = "counters";
    pub const USER_COUNTERS: &str = "user_counters";
    /// The guarded bridge ports, by ifindex: their bridge and its MAC.
    pub const PORTS: &str = "ports";
    /// Every pinned map, for pinning and cleanup.
    pub const ALL: [(&str, &str); 6] = [
        (super::map_names::CONFIG, CONFIG),
        (super::map_names::ENDPOINTS, ENDPOINTS),
        (super::map_names::ENDPOINTS_V4, ENDPOINTS_V4),
        (super::map_names::COUNTERS, COUNTERS),
        (super::map_names::USER_COUNTERS, USER_COUNTERS),
        (super::map_names::PORTS, PORTS),
    ];
}

/// Names of the programs in the object file.
pub mod program_names {
    /// XDP guard (receiving host role, ingress).
    pub const XDP_GUARD: &str = "flowguard_xdp";
    /// tc guard, usable on ingress and egress (router role: egress).
    pub const TC_GUARD: &str = "flowguard_tc";
    /// tc guard that also learns endpoints from the source of frames (host role, egress).
    pub const TC_LEARN: &str = "flowguard_tc_learn";
    /// Returns the kernel's jiffies through BPF_PROG_TEST_RUN, so that user
    /// space can measure HZ. Never attached.
    pub const JIFFIES: &str = "flowguard_jiffies";
}

/// Where an endpoint's current MAC came from.
pub mod source {
    pub const STATIC: u8 = 1;
    pub const NEIGHBOUR: u8 = 2;
    pub const LEARNED: u8 = 3;
    /// A macvlan/ipvlan child of a guarded interface, read from the host's
    /// own configuration (in any network namespace).
    pub const CHILD: u8 = 4;

    /// [`merge`]: the claim that holds the entry stays.
    pub const KEEP: u8 = 0;
    /// [`merge`]: the incoming claim replaces the one that holds the entry.
    pub const REPLACE: u8 = 1;
    /// [`merge`]: neither settles it: the endpoint is ambiguous (its frames
    /// are counted, never rewritten) while the two disagree.
    pub const CONFLICT: u8 = 2;

    /// The precedence of the sources, in one place for both sides: what a
    /// claim from `incoming` does to an endpoint whose entry a claim from
    /// `holder` wrote, when the two name different MACs. The kernel's
    /// learning path calls it for `LEARNED`; user space's endpoint table
    /// for every pair.
    ///
    /// | holder \ incoming | STATIC | CHILD | LEARNED | NEIGHBOUR |
    /// |---|---|---|---|---|
    /// | STATIC | replace | keep | keep | keep |
    /// | CHILD | replace | replace | replace | conflict |
    /// | LEARNED | replace | replace | replace | keep |
    /// | NEIGHBOUR | replace | conflict | replace | replace |
    ///
    /// In words: the operator's static entry settles every disagreement. A
    /// source's newer word replaces its older one. A child (the host's own
    /// configuration) and a learned frame (the endpoint's own source MAC)
    /// are both first-hand and present-tense: the newer wins, because the
    /// kernel learns at line rate and cannot wait for user space. A learned
    /// frame is newer evidence than the neighbour table, a cache that keeps
    /// an old MAC for minutes, so it settles against it. A child that
    /// disagrees with the neighbour table is the one pair neither side can
    /// settle by rule (an address conflict, or a neighbour entry the host
    /// never refreshed): the endpoint is ambiguous until they agree.
    /// Unknown sources are never replaced.
    #[inline(always)]
    pub const fn merge(holder: u8, incoming: u8) -> u8 {
        match (holder, incoming) {
            (STATIC, STATIC) => REPLACE,
            (STATIC, _) => KEEP,
            (CHILD | LEARNED | NEIGHBOUR, STATIC) => REPLACE,
            (CHILD, NEIGHBOUR) | (NEIGHBOUR, CHILD) => CONFLICT,
            (LEARNED, NEIGHBOUR) => KEEP,
            (CHILD | LEARNED | NEIGHBOUR, CHILD | LEARNED | NEIGHBOUR) => REPLACE,
            _ => KEEP,
        }
    }

    /// How strongly a source's claim holds an entry: the claim of the
    /// highest rank names the endpoint's MAC (the newest among equals), and
    /// [`merge`] says whether the others make it ambiguous. Consistent with
    /// [`merge`]: a claim replaces one of a higher rank never, of a lower
    /// rank always, except where the two conflict.
    #[inline(always)]
    pub const fn rank(s: u8) -> u8 {
        match s {
            STATIC => 3,
            CHILD | LEARNED => 2,
            NEIGHBOUR => 1,
            _ => 4,
        }
    }
}

/// Bits of [`Endpoint::flags`].
pub mod endpoint_flags {
    /// The IP was seen with different MACs on different interfaces: count, never rewrite.
    pub const AMBIGUOUS: u8 = 1;
    /// The bridge FDB places the endpoint's MAC behind `port` in a VLAN:
    /// frames leaving another port are counted and evicted, never
    /// redirected (the two ports may tag that VLAN differently).
    pub const PORT_VLAN: u8 = 2;
}

/// `Config::mode` values.
pub mod mode {
    /// Count and report stale frames, change no byte.
    pub const OBSERVE: u32 = 0;
    /// Also rewrite the destination MAC of stale frames.
    pub const FIX: u32 = 1;
}

/// Key of the endpoint map: an IPv6 address, or an IPv4 address mapped into
/// IPv6 (`::ffff:a.b.c.d`), as four words holding the address bytes in network
/// order (the words are what a native-endian load of the packet bytes gives).
/// Words rather than 16 bytes: the eBPF side copies it with four loads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct EndpointKey {
    pub addr: [u32; 4],
}

impl EndpointKey {
    /// The key of an IPv4 address given as its raw network-order word.
    #[inline(always)]
    pub const fn from_v4_raw(raw: u32) -> Self {
        Self {
            addr: [0, 0, V4_MAPPED_WORD, raw],
        }
    }

    /// The key of an IPv4 address given as its four bytes.
    pub const fn from_v4_bytes(b: [u8; 4]) -> Self {
        Self::from_v4_raw(u32::from_ne_bytes(b))
    }

    /// The key of an IPv6 address given as its sixteen bytes.
    pub const fn from_v6_bytes(b: [u8; 16]) -> Self {
        Self {
            addr: [
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            ],
        }
    }

    /// The address bytes in network order.
    pub const fn bytes(&self) -> [u8; 16] {
        let a = self.addr[0].to_ne_bytes();
        let b = self.addr[1].to_ne_bytes();
        let c = self.addr[2].to_ne_bytes();
        let d = self.addr[3].to_ne_bytes();
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// Whether this key holds an IPv4 address.
    pub const fn is_v4(&self) -> bool {
        self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == V4_MAPPED_WORD
    }
}

/// The third word of an IPv4-mapped IPv6 address (`0000:ffff`), as a native load sees it.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Value of the endpoint map: the endpoint's current MAC and the evidence
/// the kernel side gathered about frames sent to it with another MAC.
/// Evidence lives here so that the stale path needs no second lookup.
/// Times are `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC, coarse).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Endpoint {
    /// The MAC that frames to this endpoint must carry.
    pub mac: [u8; 6],
    /// One of [`source`].
    pub source: u8,
    /// Bits of [`endpoint_flags`].
    pub flags: u8,
    /// When `mac` was last set (CLOCK_MONOTONIC; 0: unknown).
    pub updated_ns: u64,
    /// Frames seen to this endpoint with another unicast destination MAC.
    pub stale_packets: u64,
    /// Of those, frames whose destination MAC was rewritten.
    pub rewritten: u64,
    /// When the last stale frame was reported to user space: the clock is
    /// read once per event interval, not per frame, so while stale frames
    /// keep coming this is at most one event interval old.
    pub last_stale_ns: u64,
    /// Jiffies when the last event was sent to user space (the rate limit;
    /// jiffies cost one load, the clock a helper call). 0: never.
    pub last_event_jiffies: u64,
    /// The destination MAC of the last stale frame.
    pub last_stale_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The ifindex of the bridge port the bridge FDB places `mac` behind
    /// (0: unknown, or not a followed bridge's). Set by user space with the
    /// MAC; cleared by the kernel side when it learns another MAC.
    pub port: u32,
    /// Frames to this endpoint with its current MAC that left through
    /// another port than `port` (a flowtable's cached port after a move).
    pub wrong_port: u32,
}

/// A guarded bridge port: element of the PORTS hash map, by the port's
/// ifindex. A frame to an endpoint behind another port of the same bridge
/// may be redirected there when it carries the bridge's MAC as its source
/// (the router routed it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Port {
    /// The bridge's ifindex.
    pub bridge: u32,
    /// The bridge's MAC: the source MAC of the frames the router routes
    /// out of its ports (the flowtable's cached source too).
    pub bridge_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// One watched IPv4 prefix; `addr` and `mask` in network order as loaded
/// from a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct V4Prefix {
    pub addr: u32,
    pub mask: u32,
    /// The first slot of this prefix in ENDPOINTS_V4.
    pub slot_base: u32,
    /// Slots of this prefix in ENDPOINTS_V4 (its number of addresses), or 0:
    /// its endpoints are in the hash map.
    pub slots: u32,
}

/// Where the endpoint of an IPv4 address is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4Place {
    /// In no watched prefix.
    Outside,
    /// In the hash map.
    Hash,
    /// In this slot of ENDPOINTS_V4.
    Slot(u32),
}

/// One watched IPv6 prefix; words in network order as loaded from a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct V6Prefix {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
}

/// A MAC address padded to eight bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct OwnMac {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Settings of a running instance: element 0 of the CONFIG array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// One of [`mode`].
    pub mode: u32,
    /// Number of valid entries in `v4`.
    pub v4_count: u32,
    /// Number of valid entries in `v6`.
    pub v6_count: u32,
    /// Number of valid entries in `own_macs`.
    pub own_mac_count: u32,
    /// Minimum time between two events about the same endpoint, in jiffies
    /// (user space converts with the kernel's HZ, which it measures).
    pub event_interval_jiffies: u64,
    pub v4: [V4Prefix; MAX_V4_PREFIXES],
    pub v6: [V6Prefix; MAX_V6_PREFIXES],
    /// MACs of the interfaces flowguard is attached to: never learned.
    pub own_macs: [OwnMac; MAX_OWN_MACS],
}

impl Default for Config {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

impl Config {
    /// Where the endpoint of the IPv4 address `raw` (network order, as
    /// loaded from a packet) is kept: the first watched prefix that holds
    /// it decides. Both sides use this, so they always agree.
    #[inline(always)]
    pub fn v4_place(&self, raw: u32) -> V4Place {
        let mut i = 0;
        while i < MAX_V4_PREFIXES {
            if i as u32 >= self.v4_count {
                break;
            }
            let p = &self.v4[i];
            if raw & p.mask == p.addr {
                let host = u32::from_be(raw & !p.mask);
                return if host < p.slots {
                    V4Place::Slot(p.slot_base + host)
                } else {
                    V4Place::Hash
                };
            }
            i += 1;
        }
        V4Place::Outside
    }

    /// Slots of ENDPOINTS_V4 that the prefixes use.
    pub fn v4_slots(&self) -> u32 {
        self.v4[..(self.v4_count as usize).min(MAX_V4_PREFIXES)]
            .iter()
            .map(|p| p.slot_base.saturating_add(p.slots))
            .max()
            .unwrap_or(0)
    }
}

/// Global counters: element 0 of the COUNTERS per-CPU array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Counters {
    /// Unicast frames inside the watched prefixes that were looked up.
    pub checked: u64,
    /// Frames to a known endpoint with a stale destination MAC.
    pub stale: u64,
    /// Stale frames whose destination MAC was rewritten (fix mode).
    pub rewritten: u64,
    /// Stale frames left untouched because the endpoint is ambiguous (or
    /// holds a MAC no endpoint can have: zero, group).
    pub ambiguous: u64,
    /// Frames to a neighbour-table endpoint with another MAC than the map's,
    /// left untouched because the kernel's neighbour table did not confirm
    /// them stale (it already holds the frame's MAC and the map lags, or it
    /// holds no MAC at all).
    pub unconfirmed: u64,
    /// Events sent to user space.
    pub events: u64,
    /// Events lost because the ring buffer was full.
    pub events_lost: u64,
    /// Endpoints learned for the first time.
    pub learned_new: u64,
    /// Learned endpoints whose MAC changed.
    pub learned_moved: u64,
    /// Learning attempts that failed (map full).
    pub learn_failed: u64,
    /// Frames to an endpoint with its current MAC that left through
    /// another port of its bridge than the FDB's (tc only).
    pub wrong_port: u64,
    /// Of those, frames redirected to the endpoint's port (fix mode).
    pub redirected: u64,
}

impl Counters {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, o: &Counters) {
        self.checked += o.checked;
        self.stale += o.stale;
        self.rewritten += o.rewritten;
        self.ambiguous += o.ambiguous;
        self.unconfirmed += o.unconfirmed;
        self.events += o.events;
        self.events_lost += o.events_lost;
        self.learned_new += o.learned_new;
        self.learned_moved += o.learned_moved;
        self.learn_failed += o.learn_failed;
        self.wrong_port += o.wrong_port;
        self.redirected += o.redirected;
    }
}

/// Counters kept by user space (neighbour sync and eviction): element 0 of
/// the USER_COUNTERS array map, which no program touches. Pinned with the
/// others so that `bpftool` and `flowguard status` show them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct UserCounters {
    /// Neighbour entries that gave an endpoint a MAC for the first time.
    pub neigh_added: u64,
    /// Neighbour entries that changed an endpoint's MAC.
    pub neigh_moved: u64,
    /// Endpoints dropped because the kernel no longer believes in a MAC.
    pub neigh_removed: u64,
    /// Endpoints marked ambiguous (same IP, different MACs on different interfaces).
    pub neigh_ambiguous: u64,
    /// Neighbour event overflows (ENOBUFS) answered with a fresh dump.
    pub neigh_overflows: u64,
    /// Full reconciles of the endpoint map with the neighbour table.
    pub reconciles: u64,
    /// Eviction runs (one per endpoint trigger that passed debounce).
    pub eviction_runs: u64,
    /// Conntrack entries deleted.
    pub evicted: u64,
    /// Conntrack entries that a dry run would have deleted.
    pub dry_run_matches: u64,
    /// Eviction runs that failed.
    pub eviction_errors: u64,
    /// ARP probes sent to validate endpoints that carry offloaded flows.
    pub probes_sent: u64,
    /// Probed endpoints that answered neither at their cached MAC nor by broadcast.
    pub probes_unanswered: u64,
    /// Moves found by probing: the cached MAC stopped answering, another answered.
    pub probe_moves: u64,
    /// Probed IPs that answered from more than one MAC.
    pub probe_ambiguous: u64,
    /// Endpoints written from a macvlan/ipvlan child of a guarded interface
    /// (new, or a new MAC).
    pub children_added: u64,
    /// Endpoints removed because their macvlan/ipvlan child (or its
    /// namespace) went away.
    pub children_removed: u64,
    /// The process id of the instance that owns the pins (not a counter):
    /// lets `status` name an instance that died without removing them.
    #[cfg_attr(feature = "user", serde(skip))]
    pub owner_pid: u64,
    /// Evictions the rate limit deferred (each runs later, none is dropped).
    pub evictions_deferred: u64,
    /// Evictions waiting for the rate limit now (a gauge: `status` shows it
    /// apart from the counters).
    #[cfg_attr(feature = "user", serde(skip))]
    pub eviction_queue: u64,
    /// Endpoints left out of the map because it was full (each IP once per
    /// episode of a full map).
    pub endpoints_dropped: u64,
    /// Endpoints whose MAC the bridge FDB saw move to another port (each
    /// evicts the endpoint's offloaded flows).
    pub port_moves: u64,
    /// Episodes of a MAC flapping between bridge ports (said once, not
    /// evicted while it lasts).
    pub port_flaps: u64,
}

/// `Event::kind` values.
pub mod event_kind {
    /// A frame to a known endpoint carried a stale destination MAC.
    pub const STALE: u32 = 1;
    /// Learning recorded a new endpoint or a new MAC for one.
    pub const LEARNED: u32 = 2;
}

/// `Event::action` values.
pub mod event_action {
    /// Observe mode: the frame was left as it was.
    pub const OBSERVED: u8 = 0;
    /// Fix mode: the destination MAC was rewritten.
    pub const REWRITTEN: u8 = 1;
    /// The endpoint is ambiguous: the frame was left as it was.
    pub const AMBIGUOUS: u8 = 2;
}

/// `Event::hook` values.
pub mod hook {
    pub const XDP: u8 = 1;
    pub const TC: u8 = 2;
}

/// A record sent to user space over the EVENTS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    /// One of [`event_kind`].
    pub kind: u32,
    /// Interface the frame was seen on (for tc: skb->ifindex).
    pub ifindex: u32,
    /// The endpoint (destination of a stale frame, source of a learned one).
    pub endpoint: EndpointKey,
    /// The other end of the flow (source of a stale frame).
    pub peer: EndpointKey,
    /// Source port, or 0 when not TCP/UDP (host order).
    pub src_port: u16,
    /// Destination port, or 0 when not TCP/UDP (host order).
    pub dst_port: u16,
    /// IP protocol number of the frame.
    pub protocol: u8,
    /// One of [`event_action`].
    pub action: u8,
    /// One of [`hook`].
    pub hook: u8,
    pub _pad0: u8,
    /// STALE: the frame's destination MAC. LEARNED: the previous MAC (zero if new).
    pub old_mac: [u8; 6],
    /// The endpoint's current MAC.
    pub new_mac: [u8; 6],
    pub _pad1: [u8; 4],
    /// STALE: the endpoint's stale frame count so far.
    pub count: u64,
}

// The eBPF side and user space must agree byte for byte; a layout change
// fails the build of both sides here rather than a map update at run time
// ("invalid value size").
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<EndpointKey>() == 16);
    assert!(size_of::<Endpoint>() == 64);
    assert!(size_of::<Port>() == 12);
    assert!(size_of::<V4Prefix>() == 16);
    assert!(size_of::<V6Prefix>() == 32);
    assert!(size_of::<OwnMac>() == 8);
    assert!(size_of::<Event>() == 72);
    assert!(size_of::<Counters>() == 96);
    assert!(size_of::<UserCounters>() == 8 * 22);
    assert!(
        size_of::<Config>()
            == 24
                + size_of::<V4Prefix>() * MAX_V4_PREFIXES
                + size_of::<V6Prefix>() * MAX_V6_PREFIXES
                + size_of::<OwnMac>() * MAX_OWN_MACS
    );
    // The kernel side reads an endpoint's MAC, source and flags with one
    // 8-byte load: they must be the value's first 8 bytes.
    assert!(core::mem::offset_of!(Endpoint, source) == 6);
    assert!(core::mem::offset_of!(Endpoint, flags) == 7);
    assert!(core::mem::offset_of!(Endpoint, updated_ns) == 8);
    assert!(core::mem::align_of::<Endpoint>() == 8);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are `Pod` (checked by the derives above).
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for Port {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for UserCounters {}
    unsafe impl aya::Pod for Event {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_one_table_and_agrees_with_the_ranks() {
        use source::*;
        let all = [STATIC, CHILD, LEARNED, NEIGHBOUR];
        let want = [
            // holder STATIC, CHILD, LEARNED, NEIGHBOUR; incoming in `all` order.
            [REPLACE, KEEP, KEEP, KEEP],
            [REPLACE, REPLACE, REPLACE, CONFLICT],
            [REPLACE, REPLACE, REPLACE, KEEP],
            [REPLACE, CONFLICT, REPLACE, REPLACE],
        ];
        for (h, row) in all.iter().zip(want) {
            for (i, w) in all.iter().zip(row) {
                assert_eq!(merge(*h, *i), w, "holder {h}, incoming {i}");
                // A conflict is mutual; otherwise the higher rank holds.
                match w {
                    CONFLICT => assert_eq!(merge(*i, *h), CONFLICT),
                    REPLACE if h != i => assert!(rank(*i) >= rank(*h)),
                    KEEP => assert!(rank(*h) >= rank(*i)),
                    _ => {}
                }
            }
        }
        // An entry of a source this build does not know is never replaced.
        assert_eq!(merge(9, STATIC), KEEP);
        assert!(rank(9) > rank(STATIC));
    }

    #[test]
    fn v4_key_roundtrip() {
        let k = EndpointKey::from_v4_bytes([192, 168, 1, 240]);
        assert!(k.is_v4());
        assert_eq!(
            k.bytes(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 240]
        );
        assert_eq!(EndpointKey::from_v6_bytes(k.bytes()), k);
    }

    #[test]
    fn v6_key_is_not_v4() {
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        b[15] = 1;
        let k = EndpointKey::from_v6_bytes(b);
        assert!(!k.is_v4());
        assert_eq!(k.bytes(), b);
    }

    #[test]
    fn sizes_are_stable() {
        // The eBPF side and user space must agree byte for byte.
        assert_eq!(core::mem::size_of::<EndpointKey>(), 16);
        assert_eq!(core::mem::size_of::<Endpoint>(), 64);
        assert_eq!(core::mem::size_of::<Event>(), 72);
        assert_eq!(core::mem::size_of::<Counters>(), 96);
        assert_eq!(
            core::mem::size_of::<Config>(),
            24 + 16 * MAX_V4_PREFIXES + 32 * MAX_V6_PREFIXES + 8 * MAX_OWN_MACS
        );
    }

    fn prefix(octets: [u8; 4], len: u32, slot_base: u32, slots: u32) -> V4Prefix {
        let mask = u32::from_ne_bytes((u32::MAX << (32 - len)).to_be_bytes());
        V4Prefix {
            addr: u32::from_ne_bytes(octets) & mask,
            mask,
            slot_base,
            slots,
        }
    }

    #[test]
    fn v4_place_follows_the_first_prefix_that_holds_the_address() {
        let mut cfg = Config {
            v4_count: 3,
            ..Config::default()
        };
        cfg.v4[0] = prefix([192, 168, 1, 0], 24, 0, 256);
        cfg.v4[1] = prefix([192, 168, 0, 0], 16, 0, 0);
        cfg.v4[2] = prefix([10, 0, 0, 0], 30, 256, 4);
        let raw = |o: [u8; 4]| u32::from_ne_bytes(o);
        assert_eq!(cfg.v4_place(raw([192, 168, 1, 0])), V4Place::Slot(0));
        assert_eq!(cfg.v4_place(raw([192, 168, 1, 255])), V4Place::Slot(255));
        assert_eq!(cfg.v4_place(raw([192, 168, 2, 1])), V4Place::Hash);
        assert_eq!(cfg.v4_place(raw([10, 0, 0, 3])), V4Place::Slot(259));
        assert_eq!(cfg.v4_place(raw([10, 0, 0, 4])), V4Place::Outside);
        assert_eq!(cfg.v4_slots(), 260);
        // A prefix given fewer slots than addresses never indexes past them.
        cfg.v4[2].slots = 2;
        assert_eq!(cfg.v4_place(raw([10, 0, 0, 3])), V4Place::Hash);
    }
}
