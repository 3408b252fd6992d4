//! Endpoints that come from the neighbour table are checked against the
//! kernel's neighbour table itself (bpf_fib_lookup) before a frame is
//! rewritten: the map follows the table a moment late, and during that
//! moment a frame to the endpoint's new MAC must not be "fixed" back to the
//! old one. BPF_PROG_TEST_RUN runs in the calling thread's network
//! namespace, so each case runs in a namespace with a real route and a real
//! neighbour entry.

use flowguard_common::{hook, source, Counters, Endpoint, EndpointKey};
use flowguard_tests::{
    frames::{self, L2},
    netns::Netns,
    progs::{config, v4_prefix, v6_prefix, Guard, Prog},
    require_root,
};

type Mac = [u8; 6];

const OLD: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0x0a];
const NEW: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0x0b];
const OTHER: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0x0c];
const SRC: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const EP4: [u8; 4] = [192, 168, 1, 240];
const PEER4: [u8; 4] = [10, 0, 0, 2];
const EP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x02, 0x40];
const PEER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0x02];

/// A namespace that forwards, with 192.168.1.0/24 and fd00:0:0:1::/64 on a
/// veth, and the endpoints' neighbour entries at `neigh` (or none).
fn router(neigh: Option<Mac>) -> Netns {
    let ns = Netns::new("fib");
    ns.ip(&[
        "link", "add", "fgv0", "type", "veth", "peer", "name", "fgv1",
    ]);
    ns.ip(&["link", "set", "fgv0", "up"]);
    ns.ip(&["link", "set", "fgv1", "up"]);
    ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    ns.ip(&["addr", "add", "192.168.1.1/24", "dev", "fgv0"]);
    ns.ip(&["addr", "add", "fd00:0:0:1::1/64", "dev", "fgv0", "nodad"]);
    ns.ip(&["route", "add", "fd00:0:0:2::/64", "dev", "fgv1"]);
    if let Some(mac) = neigh {
        let mac = mac_str(mac);
        for ip in ["192.168.1.240", "fd00:0:0:1::240"] {
            ns.ip(&[
                "neigh",
                "replace",
                ip,
                "lladdr",
                &mac,
                "dev",
                "fgv0",
                "nud",
                "permanent",
            ]);
        }
    }
    ns
}

fn key4(a: [u8; 4]) -> EndpointKey {
    EndpointKey::from_v4_bytes(a)
}

fn key6(a: [u8; 16]) -> EndpointKey {
    EndpointKey::from_v6_bytes(a)
}

fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What one frame did, run in `ns` through `prog`.
struct Outcome {
    out: Vec<u8>,
    counters: Counters,
    endpoint: Endpoint,
    events: usize,
    event_new_mac: Option<Mac>,
}

fn run_in(ns: &Netns, prog: Prog, v6: bool, map_mac: Mac, frame_dst: Mac) -> (Vec<u8>, Outcome) {
    let frame = if v6 {
        frames::udp6(L2::new(frame_dst, SRC), PEER6, EP6, 51820, 51820, b"wg")
    } else {
        frames::udp4(L2::new(frame_dst, SRC), PEER4, EP4, 51820, 51820, b"wg")
    };
    let input = frame.clone();
    let outcome = ns.enter(move || {
        let mut g = Guard::load().expect("loading the flowguard object");
        g.set_config(&config(
            true,
            &[v4_prefix([192, 168, 1, 0], 24)],
            &[v6_prefix(EP6, 64)],
            &[],
            0,
        ))
        .expect("writing CONFIG");
        let key = if v6 { key6(EP6) } else { key4(EP4) };
        let ep = Endpoint {
            mac: map_mac,
            source: source::NEIGHBOUR,
            ..Endpoint::default()
        };
        g.insert_endpoint(key, &ep).expect("inserting the endpoint");
        let out = g.run(prog, &frame).expect("test_run");
        assert_eq!(out.ret, prog.pass_value(), "{prog:?}: verdict");
        let events = g.drain_events();
        Outcome {
            out: out.data,
            counters: g.counters().expect("COUNTERS"),
            endpoint: g.endpoint(&key).expect("endpoint"),
            events: events.len(),
            event_new_mac: events.first().map(|e| {
                assert_eq!(e.hook, if prog.is_xdp() { hook::XDP } else { hook::TC });
                e.new_mac
            }),
        }
    });
    (input, outcome)
}

fn rewritten(input: &[u8], mac: Mac) -> Vec<u8> {
    let mut v = input.to_vec();
    v[..6].copy_from_slice(&mac);
    v
}

/// What the tests here need root for.
const ROOT_FOR: &str = "namespaces and BPF_PROG_TEST_RUN";

#[test]
fn confirmed_stale_frames_are_rewritten_to_the_kernels_mac() {
    require_root!(ROOT_FOR);
    let ns = router(Some(NEW));
    for prog in [Prog::Xdp, Prog::Tc] {
        for v6 in [false, true] {
            let what = format!("{prog:?} v6={v6}");
            // The map and the kernel agree (NEW); the frame carries OLD.
            let (input, o) = run_in(&ns, prog, v6, NEW, OLD);
            assert_eq!(o.out, rewritten(&input, NEW), "{what}: rewritten to NEW");
            assert_eq!(
                (
                    o.counters.stale,
                    o.counters.rewritten,
                    o.counters.unconfirmed
                ),
                (1, 1, 0),
                "{what}: counters"
            );
            assert_eq!(o.endpoint.last_stale_mac, OLD, "{what}: evidence");
            assert_eq!((o.events, o.event_new_mac), (1, Some(NEW)), "{what}: event");

            // The map lags (OLD) while the kernel already holds NEW, and the
            // frame carries a third, stale MAC: the kernel's MAC wins.
            let (input, o) = run_in(&ns, prog, v6, OLD, OTHER);
            assert_eq!(
                o.out,
                rewritten(&input, NEW),
                "{what}: rewritten to the kernel's NEW"
            );
            assert_eq!(
                o.event_new_mac,
                Some(NEW),
                "{what}: event names the kernel's MAC"
            );
        }
    }
}

#[test]
fn a_frame_the_kernel_agrees_with_is_never_rewritten_back() {
    require_root!(ROOT_FOR);
    // The endpoint moved to NEW; the kernel's table knows, the map does not
    // yet: a frame to NEW is right and must pass as it is.
    let ns = router(Some(NEW));
    for prog in [Prog::Xdp, Prog::Tc] {
        for v6 in [false, true] {
            let what = format!("{prog:?} v6={v6}");
            let (input, o) = run_in(&ns, prog, v6, OLD, NEW);
            assert_eq!(o.out, input, "{what}: untouched");
            assert_eq!(
                (
                    o.counters.stale,
                    o.counters.rewritten,
                    o.counters.unconfirmed
                ),
                (0, 0, 1),
                "{what}: counted as unconfirmed only"
            );
            assert_eq!(o.endpoint.stale_packets, 0, "{what}: no evidence");
            assert_eq!(o.events, 0, "{what}: no event");
        }
    }
}

#[test]
fn without_a_neighbour_entry_nothing_is_rewritten() {
    require_root!(ROOT_FOR);
    let ns = router(None);
    for prog in [Prog::Xdp, Prog::Tc] {
        for v6 in [false, true] {
            let what = format!("{prog:?} v6={v6}");
            let (input, o) = run_in(&ns, prog, v6, NEW, OLD);
            assert_eq!(o.out, input, "{what}: untouched");
            assert_eq!(
                (
                    o.counters.stale,
                    o.counters.rewritten,
                    o.counters.unconfirmed
                ),
                (0, 0, 1),
                "{what}: unconfirmed"
            );
        }
    }
}
