//! Program tests through BPF_PROG_TEST_RUN: the real object, loaded by aya,
//! run on crafted frames; verdicts, output bytes, counters, per-endpoint
//! evidence and events are asserted. Every guard case runs through both the
//! XDP program and the tc program. Needs root (CAP_BPF); without it each
//! test prints `skipped: needs root (BPF_PROG_TEST_RUN)` and returns.
//!
//! Run: `cargo test -p flowguard-tests --release --test programs -- --test-threads=1`

use std::cell::Cell;

use flowguard_common::{
    endpoint_flags, event_action, event_kind, hook, source, Counters, Endpoint, EndpointKey, Event,
};
use flowguard_tests::{
    frames::{self, Mac, Vlan, BROADCAST, DPORT, L2, PAYLOAD, PEER4, PEER6, ROUTER, SPORT},
    fuzz::{self, Scenario, GUARDS},
    progs::{
        self, config, endpoint, errno, kernel_may_refuse, v4_array_prefix, v4_prefix, v6_prefix,
        Guard, Prog,
    },
    require_root,
};

// The watched prefixes.
const PFX4: [u8; 4] = [192, 168, 1, 0];
const PFX4_LEN: u32 = 24;
const PFX6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const PFX6_LEN: u32 = 64;

// The endpoints, their current MACs, and the stale MACs frames carry.
const EP4: [u8; 4] = [192, 168, 1, 240];
const EP6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf0];
const CUR4: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0xf0];
const CUR6: Mac = [0x02, 0x42, 0xfd, 0x00, 0x00, 0xf0];
const STALE4: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0x99];
const STALE6: Mac = [0x02, 0x42, 0xfd, 0x00, 0x00, 0x99];

// A non-endpoint inside the prefixes, and addresses outside them.
const OTHER4: [u8; 4] = [192, 168, 1, 77];
const OTHER6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x77];
const OUT4: [u8; 4] = [192, 168, 2, 240];
const OUT6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf0];

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

fn key4(a: [u8; 4]) -> EndpointKey {
    EndpointKey::from_v4_bytes(a)
}

fn key6(a: [u8; 16]) -> EndpointKey {
    EndpointKey::from_v6_bytes(a)
}

fn hook_of(prog: Prog) -> u8 {
    if prog.is_xdp() {
        hook::XDP
    } else {
        hook::TC
    }
}

/// Where the IPv4 endpoints of PFX4 are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// The direct-indexed array (what flowguard does for a /24).
    Array,
    /// The hash map (what it does for prefixes larger than a /20).
    Hash,
}

thread_local! {
    /// The layout `setup` uses on this test's thread.
    static LAYOUT: Cell<Layout> = const { Cell::new(Layout::Array) };
}

/// Runs `body` with PFX4's endpoints in the hash map.
fn with_hash_layout(body: impl FnOnce()) {
    LAYOUT.with(|l| l.set(Layout::Hash));
    body();
    LAYOUT.with(|l| l.set(Layout::Array));
}

/// PFX4, in the current layout (array: from slot 0).
fn pfx4() -> flowguard_common::V4Prefix {
    match LAYOUT.with(Cell::get) {
        Layout::Array => v4_array_prefix(PFX4, PFX4_LEN, 0),
        Layout::Hash => v4_prefix(PFX4, PFX4_LEN),
    }
}

/// A fresh instance: prefixes 192.168.1.0/24 and fd00:0:0:1::/64, endpoints
/// EP4 → CUR4 and EP6 → CUR6, events not rate-limited.
fn setup(fix: bool) -> Guard {
    setup_with(fix, 0, &[])
}

fn setup_with(fix: bool, event_interval_jiffies: u64, own_macs: &[Mac]) -> Guard {
    let mut g = Guard::load().expect("loading the flowguard object");
    g.set_config(&config(
        fix,
        &[pfx4()],
        &[v6_prefix(PFX6, PFX6_LEN)],
        own_macs,
        event_interval_jiffies,
    ))
    .expect("writing CONFIG");
    g.insert_endpoint(key4(EP4), &endpoint(CUR4))
        .expect("inserting EP4");
    g.insert_endpoint(key6(EP6), &endpoint(CUR6))
        .expect("inserting EP6");
    g
}

/// The counters that record an action. `checked` is left out: it is meant
/// to count every in-prefix lookup, which is not an action on the frame.
fn actions(c: Counters) -> Counters {
    Counters { checked: 0, ..c }
}

fn counters(g: &Guard) -> Counters {
    actions(g.counters().expect("reading COUNTERS"))
}

/// Runs `prog` on `frame`; asserts the pass verdict, an unchanged frame and
/// no counter moved.
fn assert_untouched(g: &Guard, prog: Prog, frame: &[u8], what: &str) {
    let before = counters(g);
    let out = g
        .run(prog, frame)
        .unwrap_or_else(|e| panic!("{prog:?} {what}: test_run failed: {e:?}"));
    assert_eq!(out.ret, prog.pass_value(), "{prog:?} {what}: verdict");
    assert_eq!(
        out.data, frame,
        "{prog:?} {what}: frame must pass untouched"
    );
    assert_eq!(counters(g), before, "{prog:?} {what}: no counter may move");
}

/// Runs `prog` on `frame`, asserts the pass verdict and returns the output.
fn run_pass(g: &Guard, prog: Prog, frame: &[u8], what: &str) -> Vec<u8> {
    let out = g
        .run(prog, frame)
        .unwrap_or_else(|e| panic!("{prog:?} {what}: test_run failed: {e:?}"));
    assert_eq!(out.ret, prog.pass_value(), "{prog:?} {what}: verdict");
    assert_eq!(
        out.data.len(),
        frame.len(),
        "{prog:?} {what}: output length"
    );
    out.data
}

fn l2(dst: Mac) -> L2 {
    L2::new(dst, ROUTER)
}

fn udp4_to(dst_mac: Mac, dst: [u8; 4]) -> Vec<u8> {
    frames::udp4(l2(dst_mac), PEER4, dst, SPORT, DPORT, PAYLOAD)
}

fn udp6_to(dst_mac: Mac, dst: [u8; 16]) -> Vec<u8> {
    frames::udp6(l2(dst_mac), PEER6, dst, SPORT, DPORT, PAYLOAD)
}

/// A stale frame to an endpoint and what is expected of it.
struct StaleCase {
    name: &'static str,
    frame: Vec<u8>,
    key: EndpointKey,
    peer: EndpointKey,
    protocol: u8,
    stale: Mac,
    current: Mac,
}

fn stale_cases(vlan: Vlan) -> Vec<StaleCase> {
    vec![
        StaleCase {
            name: "IPv4/UDP",
            frame: frames::udp4(l2(STALE4).vlan(vlan), PEER4, EP4, SPORT, DPORT, PAYLOAD),
            key: key4(EP4),
            peer: key4(PEER4),
            protocol: IPPROTO_UDP,
            stale: STALE4,
            current: CUR4,
        },
        StaleCase {
            name: "IPv6/UDP",
            frame: frames::udp6(l2(STALE6).vlan(vlan), PEER6, EP6, SPORT, DPORT, PAYLOAD),
            key: key6(EP6),
            peer: key6(PEER6),
            protocol: IPPROTO_UDP,
            stale: STALE6,
            current: CUR6,
        },
        StaleCase {
            name: "IPv4/TCP",
            frame: frames::tcp4(l2(STALE4).vlan(vlan), PEER4, EP4, SPORT, DPORT, PAYLOAD),
            key: key4(EP4),
            peer: key4(PEER4),
            protocol: IPPROTO_TCP,
            stale: STALE4,
            current: CUR4,
        },
        StaleCase {
            name: "IPv6/TCP",
            frame: frames::tcp6(l2(STALE6).vlan(vlan), PEER6, EP6, SPORT, DPORT, PAYLOAD),
            key: key6(EP6),
            peer: key6(PEER6),
            protocol: IPPROTO_TCP,
            stale: STALE6,
            current: CUR6,
        },
    ]
}

fn assert_stale_event(ev: &Event, prog: Prog, c: &StaleCase, action: u8, count: u64, what: &str) {
    assert_eq!(ev.kind, event_kind::STALE, "{what}: event kind");
    assert_eq!(ev.action, action, "{what}: event action");
    assert_eq!(ev.hook, hook_of(prog), "{what}: event hook");
    assert_eq!(ev.endpoint, c.key, "{what}: event endpoint");
    assert_eq!(ev.peer, c.peer, "{what}: event peer (the source IP)");
    assert_eq!(ev.src_port, SPORT, "{what}: event source port");
    assert_eq!(ev.dst_port, DPORT, "{what}: event destination port");
    assert_eq!(ev.protocol, c.protocol, "{what}: event protocol");
    assert_eq!(ev.old_mac, c.stale, "{what}: event old_mac (the stale MAC)");
    assert_eq!(
        ev.new_mac, c.current,
        "{what}: event new_mac (the current MAC)"
    );
    assert_eq!(ev.count, count, "{what}: event count");
}

#[test]
fn unrelated_frames_pass_untouched() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        let mut g = setup(true);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "non-IP 0x88b5",
                frames::ethertype(l2(STALE4), 0x88b5, &[0x5a; 46]),
            ),
            (
                "non-IP 0x88b5 behind a VLAN tag",
                frames::ethertype(l2(STALE4).vlan(Vlan::Single(10)), 0x88b5, &[0x5a; 46]),
            ),
            (
                "ARP request for the endpoint, unicast to a stale MAC",
                frames::arp(l2(STALE4), 1, ROUTER, PEER4, [0; 6], EP4),
            ),
            (
                "ARP reply to the endpoint, unicast to a stale MAC",
                frames::arp(l2(STALE4), 2, ROUTER, [192, 168, 1, 1], STALE4, EP4),
            ),
            ("IPv4/UDP outside the prefixes", udp4_to(STALE4, OUT4)),
            ("IPv6/UDP outside the prefixes", udp6_to(STALE6, OUT6)),
            (
                "IPv4/TCP outside the prefixes",
                frames::tcp4(l2(STALE4), PEER4, OUT4, SPORT, DPORT, PAYLOAD),
            ),
            (
                "IPv4/UDP inside, to a non-endpoint",
                udp4_to(STALE4, OTHER4),
            ),
            (
                "IPv6/UDP inside, to a non-endpoint",
                udp6_to(STALE6, OTHER6),
            ),
            (
                "IPv6/TCP inside, to a non-endpoint",
                frames::tcp6(l2(STALE6), PEER6, OTHER6, SPORT, DPORT, PAYLOAD),
            ),
            (
                // The endpoint's IPv4 address in the low bits of an IPv6
                // address that is outside the v6 prefixes.
                "IPv6 to ::ffff:192.168.1.240 (v4-mapped, not a v4 frame)",
                udp6_to(STALE4, frames::v4_mapped(EP4)),
            ),
        ];
        for (what, frame) in &cases {
            assert_untouched(&g, prog, frame, what);
        }
        assert_eq!(
            counters(&g),
            Counters::default(),
            "{prog:?}: counters after all cases"
        );
        assert!(g.drain_events().is_empty(), "{prog:?}: no event expected");
    }
}

#[test]
fn current_mac_passes_untouched() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        let mut g = setup(true);
        for vlan in [Vlan::None, Vlan::Single(10), Vlan::Double(100, 10)] {
            let cases = [
                (
                    "IPv4/UDP",
                    frames::udp4(l2(CUR4).vlan(vlan), PEER4, EP4, SPORT, DPORT, PAYLOAD),
                ),
                (
                    "IPv6/UDP",
                    frames::udp6(l2(CUR6).vlan(vlan), PEER6, EP6, SPORT, DPORT, PAYLOAD),
                ),
                (
                    "IPv4/TCP",
                    frames::tcp4(l2(CUR4).vlan(vlan), PEER4, EP4, SPORT, DPORT, PAYLOAD),
                ),
                (
                    "IPv6/TCP",
                    frames::tcp6(l2(CUR6).vlan(vlan), PEER6, EP6, SPORT, DPORT, PAYLOAD),
                ),
            ];
            for (name, frame) in &cases {
                assert_untouched(
                    &g,
                    prog,
                    frame,
                    &format!("{name} {vlan:?} with the current MAC"),
                );
            }
        }
        assert!(g.drain_events().is_empty(), "{prog:?}: no event expected");
        let ep = g.endpoint(&key4(EP4)).expect("EP4 still in the map");
        assert_eq!(ep, endpoint(CUR4), "{prog:?}: EP4 evidence must stay empty");
    }
}

#[test]
fn stale_fix_mode_rewrites_destination_mac() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        for c in stale_cases(Vlan::None) {
            let what = format!("{prog:?} stale {} (fix)", c.name);
            let mut g = setup(true);
            let out = run_pass(&g, prog, &c.frame, &what);
            let mut expected = c.frame.clone();
            expected[..6].copy_from_slice(&c.current);
            assert_eq!(
                &out[..6],
                &c.current,
                "{what}: destination MAC must be the endpoint's"
            );
            assert_eq!(out, expected, "{what}: only bytes 0..6 may change");
            assert_eq!(
                counters(&g),
                Counters {
                    stale: 1,
                    rewritten: 1,
                    events: 1,
                    ..Counters::default()
                },
                "{what}: counters"
            );
            let ep = g.endpoint(&c.key).expect("endpoint still in the map");
            assert_eq!(
                ep.mac, c.current,
                "{what}: the endpoint's MAC must not change"
            );
            assert_eq!(ep.stale_packets, 1, "{what}: evidence stale_packets");
            assert_eq!(ep.rewritten, 1, "{what}: evidence rewritten");
            assert_eq!(
                ep.last_stale_mac, c.stale,
                "{what}: evidence last_stale_mac"
            );
            assert_ne!(ep.last_stale_ns, 0, "{what}: evidence last_stale_ns");
            assert_eq!(ep.source, source::STATIC, "{what}: source unchanged");
            let events = g.drain_events();
            assert_eq!(events.len(), 1, "{what}: exactly one event, got {events:?}");
            assert_stale_event(&events[0], prog, &c, event_action::REWRITTEN, 1, &what);
        }
    }
}

#[test]
fn stale_observe_mode_counts_but_keeps_frame() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        for c in stale_cases(Vlan::None) {
            let what = format!("{prog:?} stale {} (observe)", c.name);
            let mut g = setup(false);
            let out = run_pass(&g, prog, &c.frame, &what);
            assert_eq!(out, c.frame, "{what}: observe mode must not change a byte");
            assert_eq!(
                counters(&g),
                Counters {
                    stale: 1,
                    events: 1,
                    ..Counters::default()
                },
                "{what}: counters (stale=1, rewritten=0)"
            );
            let ep = g.endpoint(&c.key).expect("endpoint still in the map");
            assert_eq!(ep.stale_packets, 1, "{what}: evidence stale_packets");
            assert_eq!(ep.rewritten, 0, "{what}: evidence rewritten");
            assert_eq!(
                ep.last_stale_mac, c.stale,
                "{what}: evidence last_stale_mac"
            );
            let events = g.drain_events();
            assert_eq!(events.len(), 1, "{what}: exactly one event, got {events:?}");
            assert_stale_event(&events[0], prog, &c, event_action::OBSERVED, 1, &what);
        }
    }
}

#[test]
fn broadcast_and_multicast_destinations_pass_untouched() {
    require_root!("BPF_PROG_TEST_RUN");
    let group_macs: [(&str, Mac); 4] = [
        ("broadcast", BROADCAST),
        ("IPv4 multicast", [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb]),
        ("IPv6 multicast", [0x33, 0x33, 0x00, 0x00, 0x00, 0xfb]),
        ("link-local group", [0x01, 0x80, 0xc2, 0x00, 0x00, 0x00]),
    ];
    for prog in GUARDS {
        let g = setup(true);
        for (name, mac) in group_macs {
            for vlan in [Vlan::None, Vlan::Single(10)] {
                let v4 = frames::udp4(l2(mac).vlan(vlan), PEER4, EP4, SPORT, DPORT, PAYLOAD);
                let v6 = frames::udp6(l2(mac).vlan(vlan), PEER6, EP6, SPORT, DPORT, PAYLOAD);
                assert_untouched(
                    &g,
                    prog,
                    &v4,
                    &format!("IPv4 to the endpoint, {name} {vlan:?}"),
                );
                assert_untouched(
                    &g,
                    prog,
                    &v6,
                    &format!("IPv6 to the endpoint, {name} {vlan:?}"),
                );
            }
        }
        assert_eq!(
            g.endpoint(&key4(EP4)),
            Some(endpoint(CUR4)),
            "{prog:?}: no evidence"
        );
    }
}

#[test]
fn vlan_tagged_stale_frames_are_rewritten_at_bytes_0_to_6() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        for vlan in [Vlan::Single(10), Vlan::Double(100, 10)] {
            for c in stale_cases(vlan) {
                let what = format!("{prog:?} stale {} {vlan:?}", c.name);
                let g = setup(true);
                let out = run_pass(&g, prog, &c.frame, &what);
                assert_eq!(
                    &out[..6],
                    &c.current,
                    "{what}: bytes 0..6 must be the endpoint's MAC"
                );
                assert_eq!(
                    &out[6..],
                    &c.frame[6..],
                    "{what}: bytes 6.. must not change"
                );
                assert_eq!(
                    counters(&g),
                    Counters {
                        stale: 1,
                        rewritten: 1,
                        events: 1,
                        ..Counters::default()
                    },
                    "{what}: counters"
                );
            }
        }
    }
}

#[test]
fn ipv4_options_and_fragments_are_guarded_with_correct_ports() {
    require_root!("BPF_PROG_TEST_RUN");
    let ports = (SPORT, DPORT);
    for prog in GUARDS {
        for vlan in [Vlan::None, Vlan::Single(10)] {
            // (name, frame, ports the event must carry)
            let cases = [
                (
                    "IPv4 with 8 bytes of options (IHL 7)",
                    frames::udp4_ext(
                        l2(STALE4).vlan(vlan),
                        PEER4,
                        EP4,
                        &[1; 8],
                        0,
                        ports,
                        PAYLOAD,
                    ),
                    (SPORT, DPORT),
                ),
                (
                    "IPv4 with 40 bytes of options (IHL 15)",
                    frames::udp4_ext(
                        l2(STALE4).vlan(vlan),
                        PEER4,
                        EP4,
                        &[1; 40],
                        0,
                        ports,
                        PAYLOAD,
                    ),
                    (SPORT, DPORT),
                ),
                (
                    // A non-first fragment has no UDP header: no ports.
                    "IPv4 non-first fragment",
                    frames::udp4_ext(l2(STALE4).vlan(vlan), PEER4, EP4, &[], 185, ports, PAYLOAD),
                    (0, 0),
                ),
            ];
            for (name, frame, (sport, dport)) in &cases {
                let what = format!("{prog:?} stale {name} {vlan:?}");
                let mut g = setup(true);
                let out = run_pass(&g, prog, frame, &what);
                assert_eq!(&out[..6], &CUR4, "{what}: must be rewritten");
                assert_eq!(&out[6..], &frame[6..], "{what}: only bytes 0..6 change");
                let ev = g.drain_events();
                assert_eq!(ev.len(), 1, "{what}: one event, got {ev:?}");
                assert_eq!(ev[0].protocol, IPPROTO_UDP, "{what}: event protocol");
                assert_eq!(
                    (ev[0].src_port, ev[0].dst_port),
                    (*sport, *dport),
                    "{what}: event ports"
                );
            }
        }
    }
}

#[test]
fn ethernet_padding_after_the_datagram_is_accepted() {
    require_root!("BPF_PROG_TEST_RUN");
    // A bare TCP ACK is 54 bytes; on the wire it is padded to the 60-byte
    // minimum. The datagram fits inside the frame, so it is guarded.
    for prog in GUARDS {
        for vlan in [Vlan::None, Vlan::Single(10)] {
            let bare = frames::tcp4(l2(STALE4).vlan(vlan), PEER4, EP4, SPORT, DPORT, &[]);
            let padded = frames::pad(bare.clone(), bare.len() + 6);
            let what = format!("{prog:?} padded stale IPv4/TCP ACK {vlan:?}");
            let g = setup(true);
            let out = run_pass(&g, prog, &padded, &what);
            assert_eq!(&out[..6], &CUR4, "{what}: must be rewritten");
            assert_eq!(&out[6..], &padded[6..], "{what}: padding untouched");
        }
    }
}

#[test]
fn three_vlan_tags_are_not_parsed() {
    require_root!("BPF_PROG_TEST_RUN");
    // The guard goes through at most two tags; a third one hides the IP
    // header, and a frame that is not exactly understood passes untouched.
    for prog in GUARDS {
        let g = setup(true);
        let two = frames::udp4(
            l2(STALE4).vlan(Vlan::Double(100, 10)),
            PEER4,
            EP4,
            SPORT,
            DPORT,
            PAYLOAD,
        );
        let mut three = two[..18].to_vec();
        three.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        three.extend_from_slice(&two[18..]);
        assert_untouched(&g, prog, &three, "IPv4 behind three VLAN tags");
    }
}

#[test]
fn events_are_rate_limited_per_endpoint() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        // 10,000 jiffies: at least 10 s, whatever the kernel's HZ.
        let what = format!("{prog:?} two stale frames, event interval 10,000 jiffies");
        let mut g = setup_with(true, 10_000, &[]);
        let frame = udp4_to(STALE4, EP4);
        for i in 0..2 {
            let out = run_pass(&g, prog, &frame, &what);
            assert_eq!(&out[..6], &CUR4, "{what}: frame {i} must be rewritten");
        }
        assert_eq!(
            counters(&g),
            Counters {
                stale: 2,
                rewritten: 2,
                events: 1,
                ..Counters::default()
            },
            "{what}: counters"
        );
        let events = g.drain_events();
        assert_eq!(events.len(), 1, "{what}: one event, got {events:?}");
        assert_eq!(
            events[0].count, 1,
            "{what}: the event is about the first frame"
        );
        let ep = g.endpoint(&key4(EP4)).expect("EP4");
        assert_eq!(ep.stale_packets, 2, "{what}: evidence counts both frames");
        assert_eq!(ep.rewritten, 2, "{what}: evidence rewritten");

        // Without a rate limit each stale frame is reported.
        let what = format!("{prog:?} two stale frames, no rate limit");
        let mut g = setup_with(true, 0, &[]);
        run_pass(&g, prog, &frame, &what);
        run_pass(&g, prog, &frame, &what);
        let events = g.drain_events();
        assert_eq!(events.len(), 2, "{what}: two events, got {events:?}");
        assert_eq!(
            (events[0].count, events[1].count),
            (1, 2),
            "{what}: event counts"
        );
        assert_eq!(counters(&g).events, 2, "{what}: events counter");
    }
}

#[test]
fn full_event_ring_counts_lost_events() {
    require_root!("BPF_PROG_TEST_RUN");
    // 5000 stale frames without rate limit: more events than the ring holds
    // (EVENT_RING_BYTES / (72-byte event + 8-byte header) = 3276).
    const N: u32 = 5000;
    for prog in GUARDS {
        let what = format!("{prog:?} {N} stale frames, no rate limit, ring never drained");
        let mut g = setup_with(false, 0, &[]);
        let frame = udp4_to(STALE4, EP4);
        let out = g.run_repeat(prog, &frame, N).expect("test_run");
        assert_eq!(out.data, frame, "{what}: observe mode keeps the frame");
        let c = counters(&g);
        assert_eq!(c.stale, u64::from(N), "{what}: stale");
        assert_eq!(
            c.events + c.events_lost,
            u64::from(N),
            "{what}: events + events_lost"
        );
        assert!(
            c.events_lost > 0,
            "{what}: the ring must have overflowed: {c:?}"
        );
        let drained = g.drain_events();
        assert_eq!(
            drained.len() as u64,
            c.events,
            "{what}: events in the ring vs counter"
        );
        assert!(
            drained
                .iter()
                .enumerate()
                .all(|(i, e)| e.count == i as u64 + 1),
            "{what}: the ring holds the first events in order"
        );
        // Room again: the next stale frame is reported.
        run_pass(&g, prog, &frame, &what);
        assert_eq!(g.drain_events().len(), 1, "{what}: event after draining");
        assert_eq!(
            counters(&g).events,
            c.events + 1,
            "{what}: events counter after draining"
        );
    }
}

#[test]
fn ambiguous_endpoint_is_counted_never_rewritten() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        for c in stale_cases(Vlan::None).into_iter().take(2) {
            let what = format!("{prog:?} stale {} to an ambiguous endpoint (fix)", c.name);
            let mut g = setup(true);
            let ep = Endpoint {
                flags: endpoint_flags::AMBIGUOUS,
                ..endpoint(c.current)
            };
            g.insert_endpoint(c.key, &ep)
                .expect("inserting the ambiguous endpoint");
            let out = run_pass(&g, prog, &c.frame, &what);
            assert_eq!(out, c.frame, "{what}: must not be rewritten");
            assert_eq!(
                counters(&g),
                Counters {
                    stale: 1,
                    ambiguous: 1,
                    events: 1,
                    ..Counters::default()
                },
                "{what}: counters (stale=1, ambiguous=1, rewritten=0)"
            );
            let ep = g.endpoint(&c.key).expect("endpoint");
            assert_eq!(ep.stale_packets, 1, "{what}: evidence stale_packets");
            assert_eq!(ep.rewritten, 0, "{what}: evidence rewritten");
            assert_eq!(ep.flags, endpoint_flags::AMBIGUOUS, "{what}: flags kept");
            let events = g.drain_events();
            assert_eq!(events.len(), 1, "{what}: one event, got {events:?}");
            assert_stale_event(&events[0], prog, &c, event_action::AMBIGUOUS, 1, &what);
        }
    }
}

#[test]
fn endpoint_with_an_unusable_mac_is_never_rewritten_toward() {
    require_root!("BPF_PROG_TEST_RUN");
    // Only user space and learning write endpoints, and both refuse such
    // MACs; the kernel side refuses them too, whoever wrote the map.
    for prog in GUARDS {
        for bad in [[0u8; 6], [0xff; 6], [0x01, 0x00, 0x5e, 0, 0, 1]] {
            let c = stale_cases(Vlan::None)
                .into_iter()
                .next()
                .expect("a stale case");
            let what = format!(
                "{prog:?} stale {} to an endpoint holding {bad:02x?}",
                c.name
            );
            let mut g = setup(true);
            g.insert_endpoint(c.key, &endpoint(bad))
                .expect("inserting the endpoint");
            let out = run_pass(&g, prog, &c.frame, &what);
            assert_eq!(out, c.frame, "{what}: must not be rewritten");
            let got = counters(&g);
            assert_eq!(
                (got.stale, got.rewritten, got.ambiguous),
                (1, 0, 1),
                "{what}: counted as stale and left untouched"
            );
        }
    }
}

/// Runs `prog` on `frame` like [`run_pass`], or returns None when the
/// kernel's test_run refused a frame it may refuse (see
/// [`progs::kernel_may_refuse`]).
fn try_run_pass(g: &Guard, prog: Prog, frame: &[u8], what: &str) -> Option<Vec<u8>> {
    match g.run(prog, frame) {
        Ok(out) => {
            assert_eq!(out.ret, prog.pass_value(), "{what}: verdict");
            assert_eq!(out.data.len(), frame.len(), "{what}: output length");
            Some(out.data)
        }
        Err(e) if kernel_may_refuse(prog, frame) && errno(&e) == Some(libc::EINVAL) => None,
        Err(e) => panic!("{what}: test_run failed: {e:?}"),
    }
}

#[test]
fn every_truncation_of_a_stale_frame_passes_untouched() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        for vlan in [Vlan::None, Vlan::Single(10), Vlan::Double(100, 10)] {
            for c in stale_cases(vlan).into_iter().take(2) {
                let g = setup(true);
                let frame = &c.frame;
                let mut rejected = Vec::new();
                for n in 0..frame.len() {
                    let what = format!(
                        "{prog:?} {} {vlan:?} cut to {n} of {} bytes",
                        c.name,
                        frame.len()
                    );
                    let part = &frame[..n];
                    match try_run_pass(&g, prog, part, &what) {
                        Some(out) => assert_eq!(out, part, "{what}: must pass untouched"),
                        None => rejected.push(n),
                    }
                    assert_eq!(
                        counters(&g),
                        Counters::default(),
                        "{what}: the IP length no longer fits, nothing may be counted"
                    );
                }
                // The whole frame really is stale: it is rewritten.
                let out = run_pass(
                    &g,
                    prog,
                    frame,
                    &format!("{prog:?} {} {vlan:?} whole", c.name),
                );
                assert_eq!(
                    &out[..6],
                    &c.current,
                    "{prog:?} {} {vlan:?}: whole frame rewritten",
                    c.name
                );
                let ran = frame.len() - rejected.len();
                println!(
                    "{prog:?} {} {vlan:?}: {ran} of {} cut lengths ran; test_run refused {:?} \
                     (EINVAL, before the program)",
                    c.name,
                    frame.len(),
                    rejected.first().zip(rejected.last()),
                );
            }
        }
    }
}

/// The frame fuzz's fast subset (`cargo xtask fuzz` runs a million frames
/// per program): random and mutated frames, each checked against the
/// oracle, on prefixes in the array and in the hash map; for the learning
/// program, the endpoints learned too (into a small hash map that fills).
#[test]
fn random_frames_are_passed_and_either_untouched_or_correctly_rewritten() {
    require_root!("BPF_PROG_TEST_RUN");
    const FRAMES: u64 = 4000;
    const SEED: u64 = 0x5eed_f10e_6a4d;
    let scenario = Scenario::from_seed(SEED);
    println!("{scenario}");
    for prog in fuzz::FUZZED {
        let report = fuzz::run(prog, &scenario, SEED, FRAMES, 0, |_| {})
            .expect("loading the guard for the fuzz");
        println!("{report}");
        assert!(report.is_clean(), "{report}");
        assert!(
            report.rewritten > 50,
            "{prog:?}: only {} rewrites: the generator misses the stale path",
            report.rewritten
        );
        if prog == Prog::TcLearn {
            let c = &report.counters;
            assert!(
                c.learned_new > 20 && c.learned_moved > 20 && c.learn_failed > 0,
                "{prog:?}: learned {} new, {} moved, {} failed: the generator misses a \
                 learning path",
                c.learned_new,
                c.learned_moved,
                c.learn_failed
            );
        }
    }
}

// ---- learning (flowguard_tc_learn) ----

const HOST4: [u8; 4] = [192, 168, 1, 50];
const HOST6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50];
const M1: Mac = [0x02, 0x42, 0xac, 0x11, 0x00, 0x01];
const M2: Mac = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
/// The MAC of the interface flowguard is attached to (config.own_macs).
const OWN: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0xee];

/// A frame sent by `src_ip` with source MAC `src_mac`, out to the peer.
fn from_host4(src_mac: Mac, src_ip: [u8; 4]) -> Vec<u8> {
    frames::udp4(
        L2::new(ROUTER, src_mac),
        src_ip,
        PEER4,
        DPORT,
        SPORT,
        PAYLOAD,
    )
}

fn learning_setup() -> Guard {
    setup_with(true, 0, &[OWN])
}

fn assert_learned(g: &Guard, key: EndpointKey, mac: Mac, what: &str) {
    let ep = g
        .endpoint(&key)
        .unwrap_or_else(|| panic!("{what}: endpoint not in the map"));
    assert_eq!(ep.mac, mac, "{what}: learned MAC");
    assert_eq!(ep.source, source::LEARNED, "{what}: source must be LEARNED");
    assert_ne!(ep.updated_ns, 0, "{what}: updated_ns");
}

#[test]
fn learning_new_and_moved_endpoint() {
    require_root!("BPF_PROG_TEST_RUN");
    let mut g = learning_setup();
    let key = key4(HOST4);
    let f1 = from_host4(M1, HOST4);
    let out = run_pass(&g, Prog::TcLearn, &f1, "learning M1");
    assert_eq!(out, f1, "learning never changes the frame");
    assert_learned(&g, key, M1, "first frame from 192.168.1.50");
    assert_eq!(
        counters(&g),
        Counters {
            learned_new: 1,
            events: 1,
            ..Counters::default()
        },
        "counters after learning a new endpoint"
    );
    let ev = g.drain_events();
    assert_eq!(ev.len(), 1, "one LEARNED event, got {ev:?}");
    assert_eq!(ev[0].kind, event_kind::LEARNED, "event kind");
    assert_eq!(ev[0].endpoint, key, "event endpoint");
    assert_eq!(ev[0].old_mac, [0; 6], "event old_mac (new endpoint)");
    assert_eq!(ev[0].new_mac, M1, "event new_mac");
    assert_eq!(ev[0].hook, hook::TC, "event hook");

    // The same MAC again: nothing new.
    run_pass(&g, Prog::TcLearn, &f1, "learning M1 again");
    assert_eq!(counters(&g).learned_new, 1, "same MAC again is not news");
    assert_eq!(counters(&g).learned_moved, 0, "same MAC again is no move");
    assert!(g.drain_events().is_empty(), "no event for the same MAC");

    // The container comes back with another MAC.
    run_pass(&g, Prog::TcLearn, &from_host4(M2, HOST4), "learning M2");
    assert_learned(&g, key, M2, "frame from 192.168.1.50 with a new MAC");
    assert_eq!(
        counters(&g),
        Counters {
            learned_new: 1,
            learned_moved: 1,
            events: 2,
            ..Counters::default()
        },
        "counters after the endpoint moved"
    );
    let ev = g.drain_events();
    assert_eq!(ev.len(), 1, "one LEARNED event for the move, got {ev:?}");
    assert_eq!(
        (ev[0].old_mac, ev[0].new_mac),
        (M1, M2),
        "event old/new MAC of the move"
    );

    // The guard half of the same program now fixes frames to the old MAC.
    let stale = udp4_to(M1, HOST4);
    let out = run_pass(
        &g,
        Prog::TcLearn,
        &stale,
        "frame to the learned endpoint's old MAC",
    );
    assert_eq!(&out[..6], &M2, "stale frame rewritten to the learned MAC");
    assert_eq!(&out[6..], &stale[6..], "only bytes 0..6 change");
    assert_eq!(counters(&g).rewritten, 1, "rewritten counter");
}

#[test]
fn learning_a_move_restarts_the_event_rate_limit() {
    require_root!("BPF_PROG_TEST_RUN");
    let mut g = setup_with(true, 10_000_000_000, &[OWN]);
    let stale_to_m1 = udp4_to([0x02, 0, 0, 0, 0, 0x99], HOST4);
    run_pass(&g, Prog::TcLearn, &from_host4(M1, HOST4), "learning M1");
    run_pass(&g, Prog::TcLearn, &stale_to_m1, "stale frame 1");
    run_pass(
        &g,
        Prog::TcLearn,
        &stale_to_m1,
        "stale frame 2 (rate-limited)",
    );
    let stale_events = |ev: &[Event]| ev.iter().filter(|e| e.kind == event_kind::STALE).count();
    assert_eq!(
        stale_events(&g.drain_events()),
        1,
        "one STALE event within the interval"
    );
    // A new MAC is a new story: the next stale frame is reported at once.
    run_pass(&g, Prog::TcLearn, &from_host4(M2, HOST4), "learning M2");
    let out = run_pass(
        &g,
        Prog::TcLearn,
        &udp4_to(M1, HOST4),
        "frame to the old MAC",
    );
    assert_eq!(&out[..6], &M2, "rewritten to the new MAC");
    let ev = g.drain_events();
    assert_eq!(
        stale_events(&ev),
        1,
        "STALE event right after the move, got {ev:?}"
    );
    let ep = g.endpoint(&key4(HOST4)).expect("endpoint");
    assert_eq!(
        ep.last_stale_mac, M1,
        "evidence: the old MAC was the stale one"
    );
}

#[test]
fn learning_counts_failure_when_the_map_is_full() {
    require_root!("BPF_PROG_TEST_RUN");
    with_hash_layout(learning_into_a_full_hash_map);
}

/// Inserts `n` endpoints in 10.0.0.0/8, each with a MAC of its own: no
/// array prefix covers them, so they go to the hash map.
fn fill_hash_map(g: &mut Guard, n: u32) {
    for i in 0..n {
        let [_, b, c, d] = i.to_be_bytes();
        g.insert_endpoint(key4([10, b, c, d]), &endpoint([0x02, 0x10, 0, b, c, d]))
            .expect("filling ENDPOINTS");
    }
}

fn learning_into_a_full_hash_map() {
    let mut g = learning_setup();
    // Fill the map (two endpoints are already in it).
    let cap = flowguard_common::MAX_ENDPOINTS;
    fill_hash_map(&mut g, cap - 2);
    assert_eq!(
        g.endpoints().expect("ENDPOINTS").len(),
        cap as usize,
        "map full"
    );
    run_pass(
        &g,
        Prog::TcLearn,
        &from_host4(M1, HOST4),
        "learning into a full map",
    );
    assert!(g.endpoint(&key4(HOST4)).is_none(), "nothing learned");
    assert_eq!(
        counters(&g),
        Counters {
            learn_failed: 1,
            ..Counters::default()
        },
        "learn_failed counted, nothing else"
    );
    assert!(g.drain_events().is_empty(), "no LEARNED event");
    // An existing endpoint can still move when the map is full (a learned
    // one: learning never overrides the operator's static endpoints).
    g.insert_endpoint(
        key4(EP4),
        &Endpoint {
            source: source::LEARNED,
            ..endpoint(CUR4)
        },
    )
    .expect("making EP4 a learned endpoint");
    run_pass(
        &g,
        Prog::TcLearn,
        &from_host4(M1, EP4),
        "moving EP4 in a full map",
    );
    assert_learned(&g, key4(EP4), M1, "EP4 moved");
    assert_eq!(counters(&g).learned_moved, 1, "learned_moved");
}

#[test]
fn learning_into_the_array_needs_no_room_in_the_hash_map() {
    require_root!("BPF_PROG_TEST_RUN");
    let mut g = learning_setup();
    let cap = flowguard_common::MAX_ENDPOINTS;
    // EP6 is in the hash map already.
    fill_hash_map(&mut g, cap - 1);
    assert_eq!(g.hash_len(), cap as usize, "hash map full");
    run_pass(
        &g,
        Prog::TcLearn,
        &from_host4(M1, HOST4),
        "learning into the array",
    );
    assert_learned(&g, key4(HOST4), M1, "HOST4 learned into its slot");
    assert_eq!(
        g.slot(u32::from(HOST4[3])).expect("reading the slot").mac,
        M1,
        "slot = host part"
    );
    assert_eq!(counters(&g).learned_new, 1, "learned_new");
    assert_eq!(counters(&g).learn_failed, 0, "learn_failed");
}

#[test]
fn learning_ipv6_source() {
    require_root!("BPF_PROG_TEST_RUN");
    let g = learning_setup();
    let f = frames::udp6(L2::new(ROUTER, M1), HOST6, PEER6, DPORT, SPORT, PAYLOAD);
    run_pass(&g, Prog::TcLearn, &f, "IPv6 frame from fd00:0:0:1::50");
    assert_learned(&g, key6(HOST6), M1, "IPv6 source");
    assert_eq!(counters(&g).learned_new, 1, "learned_new");
}

#[test]
fn learning_from_arp() {
    require_root!("BPF_PROG_TEST_RUN");
    let g = learning_setup();
    let req = frames::arp_request(M1, [192, 168, 1, 51], [192, 168, 1, 1]);
    run_pass(&g, Prog::TcLearn, &req, "ARP request");
    assert_learned(&g, key4([192, 168, 1, 51]), M1, "ARP request sender");

    let garp = frames::arp_gratuitous_reply(M2, [192, 168, 1, 52]);
    run_pass(&g, Prog::TcLearn, &garp, "gratuitous ARP reply");
    assert_learned(&g, key4([192, 168, 1, 52]), M2, "gratuitous ARP sender");
    assert_eq!(
        counters(&g).learned_new,
        2,
        "two endpoints learned from ARP"
    );

    // Not learned: an ARP probe (sender address 0.0.0.0), a sender hardware
    // address that is not the frame's source, a sender outside the prefixes.
    let probe = frames::arp_request(M1, [0, 0, 0, 0], [192, 168, 1, 53]);
    let forged = frames::arp(
        L2::new(BROADCAST, M1),
        1,
        M2,
        [192, 168, 1, 54],
        [0; 6],
        [192, 168, 1, 1],
    );
    let outside = frames::arp_request(M1, [192, 168, 2, 55], [192, 168, 2, 1]);
    for (what, f) in [
        ("ARP probe", probe),
        ("ARP with sha != source MAC", forged),
        ("ARP from outside", outside),
    ] {
        let before = g.endpoints().expect("ENDPOINTS").len();
        assert_untouched(&g, Prog::TcLearn, &f, what);
        assert_eq!(
            g.endpoints().expect("ENDPOINTS").len(),
            before,
            "{what}: nothing learned"
        );
    }
}

#[test]
fn learning_skips_own_multicast_static_and_outside() {
    require_root!("BPF_PROG_TEST_RUN");
    let mut g = learning_setup();
    let static_ip = [192, 168, 1, 60];
    let static_mac: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x60];
    let static_ep = Endpoint {
        source: source::STATIC,
        ..endpoint(static_mac)
    };
    g.insert_endpoint(key4(static_ip), &static_ep)
        .expect("static endpoint");
    let before = g.endpoints().expect("ENDPOINTS");

    let cases: [(&str, Vec<u8>); 6] = [
        (
            "source MAC is one of config.own_macs",
            from_host4(OWN, HOST4),
        ),
        (
            "multicast source MAC",
            from_host4([0x01, 0x00, 0x5e, 0, 0, 1], HOST4),
        ),
        ("broadcast source MAC", from_host4(BROADCAST, HOST4)),
        ("all-zero source MAC", from_host4([0; 6], HOST4)),
        (
            "source IP outside the prefixes",
            from_host4(M1, [192, 168, 2, 50]),
        ),
        ("new MAC for a STATIC endpoint", from_host4(M1, static_ip)),
    ];
    for (what, f) in &cases {
        assert_untouched(&g, Prog::TcLearn, f, what);
        let mut now = g.endpoints().expect("ENDPOINTS");
        let mut was = before.clone();
        now.sort_by_key(|e| e.0.addr);
        was.sort_by_key(|e| e.0.addr);
        assert_eq!(now, was, "{what}: the endpoint map must not change");
    }
    let ep = g.endpoint(&key4(static_ip)).expect("static endpoint");
    assert_eq!(
        (ep.mac, ep.source),
        (static_mac, source::STATIC),
        "STATIC entry kept"
    );
}

#[test]
fn guards_without_learning_never_learn() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        let g = learning_setup();
        assert_untouched(
            &g,
            prog,
            &from_host4(M1, HOST4),
            "frame from a watched source",
        );
        assert!(
            g.endpoint(&key4(HOST4)).is_none(),
            "{prog:?} must not learn"
        );
    }
}

/// `Counters::checked`: unicast frames inside the watched prefixes that
/// were looked up, whatever the lookup found. Nothing else counts.
#[test]
fn checked_counts_in_prefix_lookups() {
    require_root!("BPF_PROG_TEST_RUN");
    for prog in GUARDS {
        let g = setup(true);
        let looked_up = [
            ("IPv4 in-prefix non-endpoint", udp4_to(STALE4, OTHER4)),
            ("IPv6 in-prefix non-endpoint", udp6_to(STALE6, OTHER6)),
            ("IPv4 endpoint, current MAC", udp4_to(CUR4, EP4)),
            ("IPv6 endpoint, stale MAC", udp6_to(STALE6, EP6)),
        ];
        let not_looked_up = [
            ("IPv4 outside the prefixes", udp4_to(STALE4, OUT4)),
            ("IPv6 outside the prefixes", udp6_to(STALE6, OUT6)),
            ("broadcast to the endpoint", udp4_to(BROADCAST, EP4)),
            ("non-IP", frames::ethertype(l2(STALE4), 0x88b5, &[0; 46])),
            ("truncated IPv4 to the endpoint", {
                let mut f = udp4_to(STALE4, EP4);
                f.pop();
                f
            }),
        ];
        for (i, (what, f)) in looked_up.iter().enumerate() {
            run_pass(&g, prog, f, what);
            let c = g.counters().expect("COUNTERS");
            assert_eq!(c.checked, i as u64 + 1, "{prog:?} {what}: checked");
        }
        for (what, f) in &not_looked_up {
            run_pass(&g, prog, f, what);
            let c = g.counters().expect("COUNTERS");
            assert_eq!(
                c.checked,
                looked_up.len() as u64,
                "{prog:?} {what}: must not be counted as checked"
            );
        }
    }
}

#[test]
fn prefix_helpers_match_the_program_encoding() {
    // No root needed: the encoding the tests configure with.
    let p = v4_prefix([192, 168, 1, 99], 24);
    assert_eq!(p.addr.to_ne_bytes(), [192, 168, 1, 0]);
    assert_eq!(p.mask.to_ne_bytes(), [255, 255, 255, 0]);
    let p = v6_prefix(PFX6, 64);
    let m: Vec<u8> = p.mask.iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(&m[..8], &[0xff; 8]);
    assert_eq!(&m[8..], &[0; 8]);
    assert_eq!(EndpointKey { addr: p.addr }.bytes(), PFX6);
    let _ = progs::object_path();
}

// ---- the direct-indexed array against the hash map ----

/// The guard and learning tests again with PFX4's endpoints in the hash map
/// (every other test runs them in the array): both layouts must behave
/// alike frame for frame.
#[test]
fn the_hash_layout_passes_the_same_tests() {
    require_root!("BPF_PROG_TEST_RUN");
    with_hash_layout(|| {
        unrelated_frames_pass_untouched();
        current_mac_passes_untouched();
        stale_fix_mode_rewrites_destination_mac();
        stale_observe_mode_counts_but_keeps_frame();
        vlan_tagged_stale_frames_are_rewritten_at_bytes_0_to_6();
        ipv4_options_and_fragments_are_guarded_with_correct_ports();
        events_are_rate_limited_per_endpoint();
        ambiguous_endpoint_is_counted_never_rewritten();
        endpoint_with_an_unusable_mac_is_never_rewritten_toward();
        every_truncation_of_a_stale_frame_passes_untouched();
        random_frames_are_passed_and_either_untouched_or_correctly_rewritten();
        learning_new_and_moved_endpoint();
        learning_a_move_restarts_the_event_rate_limit();
        learning_from_arp();
        learning_skips_own_multicast_static_and_outside();
        checked_counts_in_prefix_lookups();
    });
}

/// A MAC that names the address it belongs to, so a frame rewritten toward
/// the wrong slot's endpoint shows.
fn mac_of(a: [u8; 4]) -> Mac {
    [0x02, 0x4e, a[0], a[1], a[2], a[3]]
}

fn offset4(a: [u8; 4], by: i64) -> [u8; 4] {
    ((i64::from(u32::from_be_bytes(a)) + by) as u32).to_be_bytes()
}

#[test]
fn array_slots_cover_every_prefix_boundary_exactly() {
    require_root!("BPF_PROG_TEST_RUN");
    // (prefix, length, first slot): bases that are not multiples of the
    // prefix size, a host part that spans two bytes (the /20), a /31 and a
    // /32, and a hash-map /16 after them for the addresses beyond.
    let prefixes: [([u8; 4], u32, u32); 5] = [
        ([192, 168, 1, 0], 24, 0),
        ([10, 9, 8, 4], 30, 256),
        ([172, 16, 0, 0], 20, 260),
        ([100, 64, 0, 6], 31, 4356),
        ([100, 64, 0, 9], 32, 4358),
    ];
    for prog in [Prog::Xdp, Prog::Tc] {
        let mut g = Guard::load().expect("loading the flowguard object");
        let v4: Vec<_> = prefixes
            .iter()
            .map(|&(a, len, base)| v4_array_prefix(a, len, base))
            .collect();
        g.set_config(&config(true, &v4, &[], &[], 0))
            .expect("writing CONFIG");
        for &(net, len, base) in &prefixes {
            let size = 1i64 << (32 - len);
            let last = size - 1;
            // Network, first host, a host across a byte boundary, last host,
            // broadcast (deduplicated for the small prefixes).
            let mut inside: Vec<i64> = vec![0, 1, 255, 256, last - 1, last];
            inside.retain(|&h| h >= 0 && h < size);
            inside.sort_unstable();
            inside.dedup();
            for &h in &inside {
                let a = offset4(net, h);
                g.insert_endpoint(key4(a), &endpoint(mac_of(a)))
                    .expect("inserting an endpoint");
                let slot = g.slot(base + h as u32).expect("reading the slot");
                assert_eq!(slot.mac, mac_of(a), "{a:?} must be in slot {base} + {h}");
            }
            for &h in &inside {
                let a = offset4(net, h);
                let what = format!("{prog:?} stale frame to {a:?} (/{len}, host {h})");
                let before = g.counters().expect("COUNTERS");
                let out = run_pass(&g, prog, &udp4_to(STALE4, a), &what);
                assert_eq!(out[..6], mac_of(a), "{what}: rewritten to its own MAC");
                let after = g.counters().expect("COUNTERS");
                assert_eq!(after.checked - before.checked, 1, "{what}: checked");
                assert_eq!(after.rewritten - before.rewritten, 1, "{what}: rewritten");
                let current = udp4_to(mac_of(a), a);
                let out = run_pass(&g, prog, &current, &what);
                assert_eq!(out, current, "{what}: current MAC untouched");
            }
            // Just outside: not looked up, so not even counted as checked
            // (unless another prefix holds it: none of these do).
            for a in [offset4(net, -1), offset4(net, size)] {
                let what = format!("{prog:?} frame to {a:?}, just outside /{len}");
                if prefixes
                    .iter()
                    .any(|&(n, l, _)| v4_prefix(n, l).addr == v4_prefix(a, l).addr)
                {
                    continue;
                }
                let before = g.counters().expect("COUNTERS");
                let f = udp4_to(STALE4, a);
                let out = run_pass(&g, prog, &f, &what);
                assert_eq!(out, f, "{what}: untouched");
                let after = g.counters().expect("COUNTERS");
                assert_eq!(after.checked, before.checked, "{what}: not looked up");
            }
        }
        // An empty slot inside a prefix: looked up, no endpoint, untouched.
        let a = offset4([172, 16, 0, 0], 2);
        let f = udp4_to(STALE4, a);
        let before = g.counters().expect("COUNTERS");
        assert_eq!(
            run_pass(&g, prog, &f, "empty slot"),
            f,
            "empty slot untouched"
        );
        let after = g.counters().expect("COUNTERS");
        assert_eq!(after.checked - before.checked, 1, "empty slot checked");
        assert_eq!(actions(after), actions(before), "empty slot: no action");
        // A removed endpoint's slot is empty again.
        let a = offset4([192, 168, 1, 0], 255);
        g.remove_endpoint(&key4(a)).expect("removing");
        assert!(g.endpoint(&key4(a)).is_none(), "removed");
        let f = udp4_to(STALE4, a);
        assert_eq!(run_pass(&g, prog, &f, "removed"), f, "removed: untouched");
        // Every endpoint reads back under its own address.
        let all = g.endpoints().expect("reading the endpoints");
        assert!(!all.is_empty());
        for (k, v) in all {
            let b = k.bytes();
            assert_eq!(v.mac, mac_of([b[12], b[13], b[14], b[15]]), "{k:?}");
        }
    }
}

#[test]
fn the_first_prefix_that_holds_an_address_decides_its_place() {
    require_root!("BPF_PROG_TEST_RUN");
    // 192.168.1.0/24 in the array, and 192.168.0.0/16 in the hash map after
    // it: 192.168.1.x is in the array, 192.168.2.x in the hash map.
    let mut g = Guard::load().expect("loading the flowguard object");
    g.set_config(&config(
        true,
        &[
            v4_array_prefix([192, 168, 1, 0], 24, 0),
            v4_prefix([192, 168, 0, 0], 16),
        ],
        &[],
        &[],
        0,
    ))
    .expect("writing CONFIG");
    let (a, b) = ([192, 168, 1, 9], [192, 168, 2, 9]);
    g.insert_endpoint(key4(a), &endpoint(mac_of(a))).unwrap();
    g.insert_endpoint(key4(b), &endpoint(mac_of(b))).unwrap();
    assert_eq!(g.hash_len(), 1, "only 192.168.2.9 is in the hash map");
    assert_eq!(g.slot(9).unwrap().mac, mac_of(a), "192.168.1.9 in slot 9");
    for prog in GUARDS {
        for x in [a, b] {
            let out = run_pass(&g, prog, &udp4_to(STALE4, x), "stale");
            assert_eq!(out[..6], mac_of(x), "{prog:?} {x:?} rewritten to its MAC");
        }
    }
}
