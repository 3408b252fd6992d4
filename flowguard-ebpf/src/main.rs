//! flowguard's kernel side: for each frame to a known endpoint, compare the
//! destination MAC with the endpoint's current MAC; on a mismatch count it,
//! keep evidence, tell user space (rate-limited) and, in fix mode, rewrite it.
//! The tc learning variant also records endpoints from the frames they send.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod frame;
// The programs `cargo xtask bench` and the program tests measure against;
// routers' builds (`cargo xtask dist`) leave them out.
#[cfg(feature = "bench")]
mod bench;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    helpers::{bpf_fib_lookup, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use flowguard_common::{
    endpoint_flags, event_action, event_kind, hook, mode, source, Config, Counters, Endpoint,
    EndpointKey, Event, Port, UserCounters, V4Place, EVENT_RING_BYTES, MAX_ENDPOINTS, MAX_OWN_MACS,
    MAX_PORTS, MAX_V6_PREFIXES,
};

use frame::{Frame, L3};

const BPF_NOEXIST: u64 = 1;

#[btf_map]
static CONFIG: Array<Config, 1> = Array::new();

#[btf_map]
static ENDPOINTS: HashMap<EndpointKey, Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();

/// IPv4 endpoints of the prefixes small enough to index directly (see
/// `V4Prefix::slots`): a slot whose `source` is 0 holds no endpoint. Sized
/// at load time to the slots the prefixes use.
#[btf_map]
static ENDPOINTS_V4: Array<Endpoint, 1> = Array::new();

#[btf_map]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// Written by user space only; here so that it is pinned with the others.
#[btf_map]
static USER_COUNTERS: Array<UserCounters, 1> = Array::new();

#[btf_map]
static EVENTS: RingBuf<Event, { EVENT_RING_BYTES as usize }> = RingBuf::new();

/// The guarded bridge ports, by ifindex (written by user space): a frame
/// is only ever redirected between two ports of one bridge.
#[btf_map]
static PORTS: HashMap<u32, Port, { MAX_PORTS as usize }> = HashMap::new();

/// Per CPU, the jiffies of the last "could not learn" warning: a full map
/// fails every frame, and the log is rate-limited like events.
#[btf_map]
static LEARN_WARNED: PerCpuArray<u64, 1> = PerCpuArray::new();

/// What the guard decided about a frame.
enum Verdict {
    /// Leave the frame as it is.
    Pass,
    /// Write this MAC into the frame's destination address.
    Rewrite([u8; 6]),
    /// Send the frame out of this port (an ifindex) of the same bridge
    /// instead: its MAC is right, its port is not (tc only).
    Redirect(u32),
}

#[xdp]
pub fn flowguard_xdp(ctx: XdpContext) -> u32 {
    xdp_guard(&ctx);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn xdp_guard(ctx: &XdpContext) {
    // Only the tc hook redirects (a port's egress).
    if let Verdict::Rewrite(mac) = guard(ctx, hook::XDP, ctx.ingress_ifindex() as u32) {
        xdp_set_dst(ctx, mac);
    }
}

#[inline(always)]
fn xdp_set_dst(ctx: &XdpContext, mac: [u8; 6]) {
    if let Some(p) = frame::ptr_at::<[u8; 6]>(ctx, frame::ETH_DST) {
        // SAFETY: ptr_at checked that the six bytes are inside the frame.
        unsafe { (p as *mut [u8; 6]).write_unaligned(mac) };
    }
}

#[inline(always)]
fn tc_set_dst(ctx: &TcContext, mac: [u8; 6]) {
    // bpf_skb_store_bytes unclones a shared skb first; direct writes
    // would make the verifier add that work to every packet.
    let _ = ctx.store(frame::ETH_DST, &mac, 0);
}

#[classifier]
pub fn flowguard_tc(ctx: TcContext) -> i32 {
    tc_linear_headers(&ctx);
    tc_guard(&ctx)
}

#[classifier]
pub fn flowguard_tc_learn(ctx: TcContext) -> i32 {
    tc_linear_headers(&ctx);
    learn(&ctx);
    tc_guard(&ctx)
}

/// Makes the headers parsing reads part of the skb's linear data, which is
/// all a program can read directly: a driver or a GRO path may leave only
/// part of them there, and the frame would pass unchecked. Costs a
/// comparison for the usual skb, whose headers are linear already.
#[inline(always)]
fn tc_linear_headers(ctx: &TcContext) {
    let linear = ctx.data_end().saturating_sub(ctx.data());
    let len = ctx.len() as usize;
    if linear < len && linear < frame::MAX_HEADERS {
        // A failure leaves the skb as it was: parsing then lets it pass.
        let _ = ctx.pull_data(len.min(frame::MAX_HEADERS) as u32);
    }
}

/// Returns the low 32 bits of jiffies; user space runs it twice with
/// BPF_PROG_TEST_RUN to measure the kernel's HZ. Never attached.
#[xdp]
pub fn flowguard_jiffies(_ctx: XdpContext) -> u32 {
    jiffies() as u32
}

/// The guard on a tc hook; returns the tc action: TC_ACT_OK, or
/// TC_ACT_REDIRECT for a frame sent to its endpoint's port.
#[inline(always)]
fn tc_guard(ctx: &TcContext) -> i32 {
    // SAFETY: reading a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match guard(ctx, hook::TC, ifindex) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Rewrite(mac) => {
            tc_set_dst(ctx, mac);
            TC_ACT_OK
        }
        // SAFETY: a helper taking an ifindex and flags (0: that port's
        // egress); it returns TC_ACT_REDIRECT, or TC_ACT_SHOT for flags
        // it does not know, which 0 is not.
        Verdict::Redirect(port) => unsafe { bpf_redirect(port, 0) as i32 },
    }
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

#[inline(always)]
fn v6_watched(cfg: &Config, addr: &[u32; 4]) -> bool {
    let mut i = 0;
    while i < MAX_V6_PREFIXES {
        if i as u32 >= cfg.v6_count {
            return false;
        }
        let p = &cfg.v6[i];
        if addr[0] & p.mask[0] == p.addr[0]
            && addr[1] & p.mask[1] == p.addr[1]
            && addr[2] & p.mask[2] == p.addr[2]
            && addr[3] & p.mask[3] == p.addr[3]
        {
            return true;
        }
        i += 1;
    }
    false
}

/// Where the endpoint of a watched address is kept.
#[derive(Clone, Copy)]
enum Place {
    Hash,
    Slot(u32),
}

/// The endpoint key of the address at `v4_field`/`v6_field` of the IP
/// header, and where its endpoint is kept, if it lies in a watched prefix.
#[inline(always)]
fn watched_key(
    f: &impl Frame,
    cfg: &Config,
    l3: L3,
    v4_field: usize,
    v6_field: usize,
) -> Option<(EndpointKey, Place)> {
    match l3 {
        L3::V4 { off, dst, .. } => {
            let addr: u32 = if v4_field == frame::V4_DST {
                dst
            } else {
                frame::load(f, off + v4_field)?
            };
            v4_key(cfg, addr)
        }
        L3::V6 { off } => {
            let addr = frame::load_v6_addr(f, off + v6_field)?;
            v6_watched(cfg, &addr).then_some((EndpointKey { addr }, Place::Hash))
        }
        L3::Arp { .. } => None,
    }
}

#[inline(always)]
fn v4_key(cfg: &Config, addr: u32) -> Option<(EndpointKey, Place)> {
    let place = match cfg.v4_place(addr) {
        V4Place::Outside => return None,
        V4Place::Hash => Place::Hash,
        V4Place::Slot(i) => Place::Slot(i),
    };
    Some((EndpointKey::from_v4_raw(addr), place))
}

/// What a reader needs of an endpoint at once: its MAC, source and flags,
/// read with one 8-byte load so that a writer's single 8-byte store is
/// never seen half done (a MAC from one write, a source from another).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Head {
    mac: [u8; 6],
    source: u8,
    flags: u8,
}

impl Head {
    #[inline(always)]
    fn read(ep: *const Endpoint) -> Self {
        // SAFETY: `ep` is a live map value; the first 8 bytes are mac,
        // source and flags (checked in flowguard-common), 8-aligned.
        let b = unsafe { (ep as *const u64).read_volatile() }.to_ne_bytes();
        Head {
            mac: [b[0], b[1], b[2], b[3], b[4], b[5]],
            source: b[6],
            flags: b[7],
        }
    }

    #[inline(always)]
    fn write(self, ep: *mut Endpoint) {
        let [m0, m1, m2, m3, m4, m5] = self.mac;
        let word = u64::from_ne_bytes([m0, m1, m2, m3, m4, m5, self.source, self.flags]);
        // SAFETY: as in `read`.
        unsafe { (ep as *mut u64).write_volatile(word) };
    }
}

/// The endpoint kept for `key` at `place`, if there is one.
#[inline(always)]
fn endpoint(key: &EndpointKey, place: Place) -> Option<(*mut Endpoint, Head)> {
    let ep = match place {
        Place::Hash => ENDPOINTS.get_ptr_mut(key)?,
        Place::Slot(i) => ENDPOINTS_V4.get_ptr_mut(i)?,
    };
    let head = Head::read(ep);
    // An empty array slot (a hash entry always has a source).
    if head.source == 0 {
        return None;
    }
    Some((ep, head))
}

#[inline(always)]
fn counters() -> Option<&'static mut Counters> {
    // SAFETY: the per-CPU slot is this CPU's own while the program runs.
    COUNTERS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn jiffies() -> u64 {
    // SAFETY: a helper without arguments (inlined by the verifier on x86-64).
    unsafe { bpf_jiffies64() }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The decision shared by every program: pass, or rewrite to the endpoint's MAC.
#[inline(always)]
fn guard(f: &impl Frame, hook: u8, ifindex: u32) -> Verdict {
    match try_guard(f, hook, ifindex) {
        Some(v) => v,
        None => Verdict::Pass,
    }
}

#[inline(always)]
fn try_guard(f: &impl Frame, hook: u8, ifindex: u32) -> Option<Verdict> {
    // Check the whole Ethernet header at once: a one-byte check compiles to
    // `data >= data_end`, which the verifier does not take as a bound.
    let eth = frame::ptr_at::<[u8; frame::ETH_HLEN]>(f, 0)?;
    // SAFETY: ptr_at checked that the header lies inside the frame.
    let first = unsafe { *(eth as *const u8) };
    if first & frame::ETH_GROUP_BIT != 0 {
        // Broadcast and multicast frames are never the flowtable's doing.
        return None;
    }
    let l3 = frame::parse_l3(f)?;
    let cfg = config()?;
    let (key, place) = watched_key(f, cfg, l3, frame::V4_DST, frame::V6_DST)?;
    // One per-CPU lookup serves every counter this frame touches.
    let c = counters()?;
    c.checked += 1;
    let (mut ep, head) = endpoint(&key, place)?;
    let dst_mac: [u8; 6] = frame::load(f, frame::ETH_DST)?;
    if head.mac == dst_mac {
        // The right MAC; on a port's egress, also the right port? The
        // bridge FDB's port for this MAC, when user space follows it.
        if hook == hook::TC {
            // SAFETY: a live map value; a u32 field, read once.
            let port = unsafe { core::ptr::addr_of!((*ep).port).read_volatile() };
            if port != 0 && port != ifindex {
                return wrong_port(f, cfg, c, &key, place, ep, head, ifindex);
            }
        }
        return None;
    }
    if let Place::Hash = place {
        // The hash map's elements are preallocated and recycled: when user
        // space updates an endpoint, its old element becomes the updating
        // CPU's spare, which its next update fills with another endpoint's
        // value, even while this program still holds a pointer to it. So,
        // before acting on `head` (evidence, a rewrite), look again: the
        // key must still lead to an element holding the same head, and that
        // element is the one acted on. A slot of the array is never anyone
        // else's.
        //
        // No pointer comparison (`again != ep`): LLVM may fold the null
        // check into it, and an older verifier does not learn from that
        // comparison that `again` is not null (Debian's 6.1 refused every
        // program: "R1 invalid mem access 'map_value_or_null'").
        let again = ENDPOINTS.get_ptr_mut(key)?;
        if Head::read(again) != head {
            return None;
        }
        ep = again;
    }
    // SAFETY: a live map value, this endpoint's when `head` was read (the
    // check above for the hash map). Concurrent writers can at worst lose
    // or misplace an increment of per-endpoint evidence; the frame is only
    // ever rewritten toward `head`'s MAC (or the neighbour table's), a
    // local copy taken in one 8-byte load: a misdirected rewrite would need
    // the element recycled again between the lookup and the load just above.
    let ep = unsafe { &mut *ep };
    let seen = Sighting {
        key,
        l3,
        dst_mac,
        hook,
        ifindex,
    };
    if head.source == source::NEIGHBOUR {
        // The map follows the neighbour table a moment late. Ask the
        // kernel's table itself: rewrite only toward the MAC it holds now,
        // and never when it holds none or agrees with the frame.
        return match neighbour_mac(f, l3, ifindex) {
            Some(mac) if mac != dst_mac => Some(stale(f, cfg, c, ep, head.flags, mac, &seen)),
            _ => {
                c.unconfirmed += 1;
                None
            }
        };
    }
    Some(stale(f, cfg, c, ep, head.flags, head.mac, &seen))
}

/// A frame to the endpoint with its current MAC leaves through a port
/// other than the one the bridge FDB places that MAC behind: a flowtable
/// that cached the port before the endpoint moved (Wi-Fi roaming, a moved
/// cable). Counted; in fix mode redirected to the endpoint's port, but only
/// a frame the router routed (its source is the bridge's MAC: bridged
/// LAN-to-LAN frames pass), between two ports of one bridge, and not for
/// an endpoint in a VLAN (evicted only). A frame the bridge floods has a
/// destination its FDB does not hold, so user space has cleared `port`:
/// it passes.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn wrong_port(
    f: &impl Frame,
    cfg: &Config,
    c: &mut Counters,
    key: &EndpointKey,
    place: Place,
    mut ep: *mut Endpoint,
    head: Head,
    ifindex: u32,
) -> Option<Verdict> {
    if let Place::Hash = place {
        // As in try_guard: the element may have been recycled.
        let again = ENDPOINTS.get_ptr_mut(key)?;
        if Head::read(again) != head {
            return None;
        }
        ep = again;
    }
    // SAFETY: a live map value, this endpoint's (checked above).
    let port = unsafe { core::ptr::addr_of!((*ep).port).read_volatile() };
    // The port must belong to the MAC read: user space writes both at
    // once, and learning another MAC clears the port first.
    if port == 0 || port == ifindex || Head::read(ep) != head {
        return None;
    }
    c.wrong_port += 1;
    // SAFETY: as above; concurrent increments may be lost (evidence only).
    unsafe { (*ep).wrong_port = (*ep).wrong_port.wrapping_add(1) };
    if cfg.mode != mode::FIX
        || head.flags & (endpoint_flags::AMBIGUOUS | endpoint_flags::PORT_VLAN) != 0
    {
        return None;
    }
    // SAFETY: map values read by value.
    let here = unsafe { *PORTS.get(ifindex)? };
    let there = unsafe { *PORTS.get(port)? };
    if here.bridge != there.bridge {
        return None;
    }
    let src_mac: [u8; 6] = frame::load(f, frame::ETH_SRC)?;
    if src_mac != here.bridge_mac {
        return None;
    }
    c.redirected += 1;
    Some(Verdict::Redirect(port))
}

/// What the guard saw of a frame to a known endpoint with another MAC.
#[derive(Clone, Copy)]
struct Sighting {
    key: EndpointKey,
    l3: L3,
    dst_mac: [u8; 6],
    hook: u8,
    ifindex: u32,
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The MAC the kernel's neighbour table holds now for the frame's
/// destination, found the way the kernel forwards (bpf_fib_lookup from the
/// interface the frame is on). `None` when there is no route or no valid
/// neighbour, or forwarding is off on that interface.
#[inline(always)]
fn neighbour_mac(f: &impl Frame, l3: L3, ifindex: u32) -> Option<[u8; 6]> {
    // SAFETY: a plain C struct for which all-zero is a valid value.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.ifindex = ifindex;
    match l3 {
        L3::V4 { off, .. } => {
            p.family = AF_INET;
            p.__bindgen_anon_3.ipv4_src = frame::load(f, off + frame::V4_SRC)?;
            p.__bindgen_anon_4.ipv4_dst = frame::load(f, off + frame::V4_DST)?;
        }
        L3::V6 { off } => {
            p.family = AF_INET6;
            p.__bindgen_anon_3.ipv6_src = frame::load_v6_addr(f, off + frame::V6_SRC)?;
            p.__bindgen_anon_4.ipv6_dst = frame::load_v6_addr(f, off + frame::V6_DST)?;
        }
        L3::Arp { .. } => return None,
    }
    // SAFETY: the helper reads and writes `p`, whose size we pass.
    let rc = unsafe {
        bpf_fib_lookup(
            f.as_ptr(),
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    (rc == BPF_FIB_LKUP_RET_SUCCESS as i64).then_some(p.dmac)
}

/// A frame to the endpoint carries another MAC than `current`.
#[inline(always)]
fn stale(
    f: &impl Frame,
    cfg: &Config,
    c: &mut Counters,
    ep: &mut Endpoint,
    flags: u8,
    current: [u8; 6],
    seen: &Sighting,
) -> Verdict {
    let Sighting {
        key,
        l3,
        dst_mac,
        hook,
        ifindex,
    } = *seen;
    ep.stale_packets += 1;
    ep.last_stale_mac = dst_mac;
    let now = jiffies();
    let send = ep.last_event_jiffies == 0
        || now.wrapping_sub(ep.last_event_jiffies) >= cfg.event_interval_jiffies;
    // Never rewrite toward a MAC that cannot be an endpoint's, whoever wrote it.
    let unusable = !usable_mac(&current);
    if unusable && send {
        // With the event: once per event interval and endpoint.
        aya_log_ebpf::warn!(
            f,
            "an endpoint holds a zero or group MAC: its frames are left untouched"
        );
    }
    let (action, verdict) = if flags & endpoint_flags::AMBIGUOUS != 0 || unusable {
        (event_action::AMBIGUOUS, Verdict::Pass)
    } else if cfg.mode == mode::FIX {
        ep.rewritten += 1;
        (event_action::REWRITTEN, Verdict::Rewrite(current))
    } else {
        (event_action::OBSERVED, Verdict::Pass)
    };
    if send {
        ep.last_event_jiffies = now;
        ep.last_stale_ns = now_ns();
    }
    let count = ep.stale_packets;
    let mut sent = None;
    if send {
        let (protocol, src_port, dst_port) = frame::transport(f, l3);
        let peer = watched_peer(f, l3).unwrap_or_default();
        let ev = Event {
            kind: event_kind::STALE,
            ifindex,
            endpoint: key,
            peer,
            src_port,
            dst_port,
            protocol,
            action,
            hook,
            old_mac: dst_mac,
            new_mac: current,
            count,
            ..Event::default()
        };
        sent = Some(EVENTS.output(ev, 0).is_ok());
    }
    c.stale += 1;
    match action {
        event_action::REWRITTEN => c.rewritten += 1,
        event_action::AMBIGUOUS => c.ambiguous += 1,
        _ => {}
    }
    match sent {
        Some(true) => c.events += 1,
        Some(false) => c.events_lost += 1,
        None => {}
    }
    verdict
}

/// Whether a MAC can be an endpoint's: unicast and not all-zero.
#[inline(always)]
fn usable_mac(mac: &[u8; 6]) -> bool {
    mac[0] & frame::ETH_GROUP_BIT == 0 && *mac != [0; 6]
}

/// Whether this CPU may log another learning failure: at most once per
/// event interval, like events.
#[inline(always)]
fn learn_warning_due(cfg: &Config) -> bool {
    let Some(last) = LEARN_WARNED.get_ptr_mut(0) else {
        return false;
    };
    let now = jiffies();
    // SAFETY: the per-CPU slot is this CPU's own while the program runs.
    let last = unsafe { &mut *last };
    if *last != 0 && now.wrapping_sub(*last) < cfg.event_interval_jiffies {
        return false;
    }
    *last = now;
    true
}

/// The source address of an IP frame as an endpoint key (any address).
#[inline(always)]
fn watched_peer(f: &impl Frame, l3: L3) -> Option<EndpointKey> {
    match l3 {
        L3::V4 { off, .. } => Some(EndpointKey::from_v4_raw(frame::load(
            f,
            off + frame::V4_SRC,
        )?)),
        L3::V6 { off } => Some(EndpointKey {
            addr: frame::load_v6_addr(f, off + frame::V6_SRC)?,
        }),
        L3::Arp { .. } => None,
    }
}

/// Records the source MAC of a frame sent from a watched address (IP source
/// or ARP sender), so that the endpoint map follows a recreated container.
#[inline(always)]
fn learn(f: &impl Frame) -> Option<()> {
    let src_mac: [u8; 6] = frame::load(f, frame::ETH_SRC)?;
    if !usable_mac(&src_mac) {
        return None;
    }
    let l3 = frame::parse_l3(f)?;
    let cfg = config()?;
    let (key, place) = match l3 {
        L3::Arp { off } => {
            let spa = frame::arp_sender(f, off, &src_mac)?;
            v4_key(cfg, spa)?
        }
        _ => watched_key(f, cfg, l3, frame::V4_SRC, frame::V6_SRC)?,
    };
    let mut i = 0;
    while i < MAX_OWN_MACS {
        if i as u32 >= cfg.own_mac_count {
            break;
        }
        if cfg.own_macs[i].mac == src_mac {
            return None;
        }
        i += 1;
    }
    let now = now_ns();
    let learned = Head {
        mac: src_mac,
        source: source::LEARNED,
        flags: 0,
    };
    let found = match place {
        Place::Hash => ENDPOINTS.get_ptr_mut(key),
        // Always found: an empty slot is a new endpoint, written in place.
        Place::Slot(i) => Some(ENDPOINTS_V4.get_ptr_mut(i)?),
    };
    let old_mac = match found {
        Some(ep) => {
            let head = Head::read(ep);
            // The precedence both sides share: a learned frame replaces a
            // child's or the neighbour table's entry, never a static one.
            if head.source != 0
                && (head.mac == src_mac
                    || source::merge(head.source, source::LEARNED) != source::REPLACE)
            {
                return None;
            }
            // SAFETY: a live map value (see try_guard).
            let value = unsafe { &mut *ep };
            if head.source == 0 {
                // An empty slot: whatever evidence it holds belongs to
                // no one.
                *value = Endpoint::default();
            }
            value.updated_ns = now;
            // A new MAC starts a new story: the next stale frame is reported at once.
            value.last_event_jiffies = 0;
            // The port was the old MAC's: before the new MAC is seen,
            // so that no frame is redirected to it (user space sets the
            // new MAC's port).
            value.port = 0;
            // Last, in one store: readers never see the new MAC without
            // its source.
            Head {
                flags: head.flags & !endpoint_flags::PORT_VLAN,
                ..learned
            }
            .write(ep);
            if head.source == 0 {
                [0; 6]
            } else {
                head.mac
            }
        }
        None => {
            let ep = Endpoint {
                mac: src_mac,
                source: source::LEARNED,
                updated_ns: now,
                ..Endpoint::default()
            };
            if ENDPOINTS.insert(key, ep, BPF_NOEXIST).is_err() {
                // Full, or another CPU learned it first.
                if let Some(c) = counters() {
                    c.learn_failed += 1;
                }
                // The map's size is set at load time (--max-endpoints).
                if learn_warning_due(cfg) {
                    aya_log_ebpf::warn!(
                        f,
                        "could not learn an endpoint: the endpoint map is full or busy"
                    );
                }
                return None;
            }
            [0; 6]
        }
    };
    let sent = EVENTS
        .output(
            Event {
                kind: event_kind::LEARNED,
                endpoint: key,
                hook: hook::TC,
                old_mac,
                new_mac: src_mac,
                ..Event::default()
            },
            0,
        )
        .is_ok();
    if let Some(c) = counters() {
        if old_mac == [0; 6] {
            c.learned_new += 1;
        } else {
            c.learned_moved += 1;
        }
        if sent {
            c.events += 1;
        } else {
            c.events_lost += 1;
        }
    }
    Some(())
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
