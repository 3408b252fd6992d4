//! The port check of the tc guard through BPF_PROG_TEST_RUN, with the
//! egress port's ifindex in the context: a frame to an endpoint with its
//! current MAC that leaves through another port than the one the bridge
//! FDB places that MAC behind is counted, and in fix mode redirected to
//! that port (TC_ACT_REDIRECT), but only when it was routed by the router
//! (the bridge's MAC as source), between two ports of one bridge, and not
//! for an endpoint in a VLAN. Bridged, flooded, unknown-port and VLAN
//! frames pass untouched. The ports are veths of a namespace the test
//! makes (the kernel checks that the context's ifindex exists).
//!
//! Needs root (CAP_BPF, namespaces); without it each test says why and
//! returns.

use std::{fs::File, os::fd::AsRawFd};

use flowguard_common::{endpoint_flags, Counters, Endpoint, EndpointKey, Port};
use flowguard_tests::{
    frames::{self, Mac, Vlan, L2, PAYLOAD, PEER4, PEER6, ROUTER, SPORT},
    netns::Netns,
    progs::{
        config, endpoint, v4_array_prefix, v4_prefix, v6_prefix, Guard, Prog, RunOutput, TC_ACT_OK,
        TC_ACT_REDIRECT,
    },
    require_root,
};

const PFX4: [u8; 4] = [192, 168, 1, 0];
const PFX6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const EP4: [u8; 4] = [192, 168, 1, 240];
const EP6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf0];
const CUR4: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0xf0];
const CUR6: Mac = [0x02, 0x42, 0xfd, 0x00, 0x00, 0xf0];
/// A LAN host's MAC: the source of a bridged (not routed) frame.
const LAN_HOST: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0x11];
const DPORT: u16 = 41641;

/// The bridge the test's ports belong to, and another one.
const BRIDGE: u32 = 1000;
const OTHER_BRIDGE: u32 = 2000;

const TC_GUARDS: [Prog; 2] = [Prog::Tc, Prog::TcLearn];

/// Three ports: the endpoint's old one (where the flowtable sends),
/// its new one (where the FDB places it), and a port of another bridge.
struct Ports {
    ns: Netns,
    old: u32,
    new: u32,
    other: u32,
}

impl Ports {
    fn new() -> Self {
        let ns = Netns::new("redirect");
        for (a, b) in [("lan1", "lan1p"), ("lan2", "lan2p"), ("lan9", "lan9p")] {
            ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        }
        let index = |name: &str| -> u32 {
            let out = ns.exec(&["cat", &format!("/sys/class/net/{name}/ifindex")]);
            out.trim().parse().expect("an ifindex")
        };
        let (old, new, other) = (index("lan1"), index("lan2"), index("lan9"));
        Self {
            ns,
            old,
            new,
            other,
        }
    }

    /// Runs `f` with this thread in the ports' namespace, then back.
    fn within<T>(&self, f: impl FnOnce() -> T) -> T {
        let home = File::open("/proc/thread-self/ns/net").expect("this thread's netns");
        let there = File::open(self.ns.path()).expect("the test's netns");
        // SAFETY: setns on this thread with open namespace files; the
        // thread goes back to its own namespace before returning.
        assert_eq!(
            unsafe { libc::setns(there.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        struct Back(File);
        impl Drop for Back {
            fn drop(&mut self) {
                // SAFETY: as above.
                unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
            }
        }
        let _back = Back(home);
        f()
    }
}

fn port(bridge: u32) -> Port {
    Port {
        bridge,
        bridge_mac: ROUTER,
        _pad: [0; 2],
    }
}

fn key4(a: [u8; 4]) -> EndpointKey {
    EndpointKey::from_v4_bytes(a)
}

fn key6(a: [u8; 16]) -> EndpointKey {
    EndpointKey::from_v6_bytes(a)
}

/// An endpoint the FDB places behind `port` (`vlan`: in a VLAN).
fn placed(mac: Mac, port: u32, vlan: bool) -> Endpoint {
    let mut e = endpoint(mac);
    e.port = port;
    if vlan {
        e.flags |= endpoint_flags::PORT_VLAN;
    }
    e
}

/// A guard in `fix` or observe mode with EP4 and EP6 behind `ports.new`
/// and the three ports in PORTS (the third on another bridge).
fn setup(ports: &Ports, fix: bool, hash: bool) -> Guard {
    let mut g = Guard::load().expect("loading the flowguard object");
    let p4 = if hash {
        v4_prefix(PFX4, 24)
    } else {
        v4_array_prefix(PFX4, 24, 0)
    };
    g.set_config(&config(fix, &[p4], &[v6_prefix(PFX6, 64)], &[], 0))
        .expect("writing CONFIG");
    g.insert_endpoint(key4(EP4), &placed(CUR4, ports.new, false))
        .expect("EP4");
    g.insert_endpoint(key6(EP6), &placed(CUR6, ports.new, false))
        .expect("EP6");
    g.set_port(ports.old, port(BRIDGE)).expect("old port");
    g.set_port(ports.new, port(BRIDGE)).expect("new port");
    g.set_port(ports.other, port(OTHER_BRIDGE))
        .expect("other port");
    g
}

fn to4(src: Mac, dst: Mac) -> Vec<u8> {
    frames::udp4(L2::new(dst, src), PEER4, EP4, SPORT, DPORT, PAYLOAD)
}

fn to6(src: Mac, dst: Mac) -> Vec<u8> {
    frames::udp6(L2::new(dst, src), PEER6, EP6, SPORT, DPORT, PAYLOAD)
}

fn counters(g: &Guard) -> Counters {
    Counters {
        checked: 0,
        ..g.counters().expect("COUNTERS")
    }
}

fn run(g: &Guard, ports: &Ports, prog: Prog, frame: &[u8], at: u32) -> RunOutput {
    ports
        .within(|| g.run_tc_at(prog, frame, at))
        .unwrap_or_else(|e| panic!("{prog:?}: test_run failed: {e:?}"))
}

/// What one frame is expected to do.
struct Expect {
    verdict: u32,
    wrong_port: u64,
    redirected: u64,
}

const REDIRECTED: Expect = Expect {
    verdict: TC_ACT_REDIRECT,
    wrong_port: 1,
    redirected: 1,
};
/// Seen leaving the wrong port, left as it is.
const COUNTED: Expect = Expect {
    verdict: TC_ACT_OK,
    wrong_port: 1,
    redirected: 0,
};
const UNTOUCHED: Expect = Expect {
    verdict: TC_ACT_OK,
    wrong_port: 0,
    redirected: 0,
};

fn check(g: &Guard, ports: &Ports, prog: Prog, frame: &[u8], at: u32, want: Expect, what: &str) {
    let before = counters(g);
    let out = run(g, ports, prog, frame, at);
    assert_eq!(out.ret, want.verdict, "{prog:?} {what}: verdict");
    assert_eq!(
        out.data, frame,
        "{prog:?} {what}: no byte of the frame changes"
    );
    let after = counters(g);
    assert_eq!(
        after,
        Counters {
            wrong_port: before.wrong_port + want.wrong_port,
            redirected: before.redirected + want.redirected,
            ..before
        },
        "{prog:?} {what}: counters"
    );
}

#[test]
fn a_routed_frame_out_of_the_old_port_is_redirected_to_the_fdbs_port() {
    require_root!("BPF_PROG_TEST_RUN and namespaces");
    let ports = Ports::new();
    for hash in [false, true] {
        for prog in TC_GUARDS {
            let mut g = setup(&ports, true, hash);
            let what = |f: &str| format!("{f} (hash layout: {hash})");
            check(
                &g,
                &ports,
                prog,
                &to4(ROUTER, CUR4),
                ports.old,
                REDIRECTED,
                &what("IPv4 out of the old port"),
            );
            check(
                &g,
                &ports,
                prog,
                &to6(ROUTER, CUR6),
                ports.old,
                REDIRECTED,
                &what("IPv6 out of the old port"),
            );
            check(
                &g,
                &ports,
                prog,
                &to4(ROUTER, CUR4),
                ports.new,
                UNTOUCHED,
                &what("IPv4 out of the right port"),
            );
            check(
                &g,
                &ports,
                prog,
                &to6(ROUTER, CUR6),
                ports.new,
                UNTOUCHED,
                &what("IPv6 out of the right port"),
            );
            let ep = g.endpoint(&key4(EP4)).expect("EP4");
            assert_eq!(ep.wrong_port, 1, "{prog:?}: EP4's evidence");
            assert_eq!(
                (ep.stale_packets, ep.rewritten),
                (0, 0),
                "{prog:?}: not a stale MAC"
            );
            assert!(g.drain_events().is_empty() || prog == Prog::TcLearn);
        }
    }
}

#[test]
fn bridged_flooded_unknown_port_vlan_and_cross_bridge_frames_are_not_redirected() {
    require_root!("BPF_PROG_TEST_RUN and namespaces");
    let ports = Ports::new();
    for prog in TC_GUARDS {
        let mut g = setup(&ports, true, false);
        // Bridged LAN to LAN: another host's source MAC, not the bridge's.
        check(
            &g,
            &ports,
            prog,
            &to4(LAN_HOST, CUR4),
            ports.old,
            COUNTED,
            "bridged frame",
        );
        // The bridge floods what its FDB does not hold: a group MAC, or a
        // MAC the FDB forgot (aged out, deleted), whose port user space
        // then clears.
        check(
            &g,
            &ports,
            prog,
            &to4(ROUTER, frames::BROADCAST),
            ports.old,
            UNTOUCHED,
            "broadcast (flooded)",
        );
        g.insert_endpoint(key4(EP4), &placed(CUR4, 0, false))
            .expect("EP4");
        check(
            &g,
            &ports,
            prog,
            &to4(ROUTER, CUR4),
            ports.old,
            UNTOUCHED,
            "flooded: FDB holds no port",
        );
        // In a VLAN: the two ports may tag it differently; eviction only.
        g.insert_endpoint(key4(EP4), &placed(CUR4, ports.new, true))
            .expect("EP4");
        check(
            &g,
            &ports,
            prog,
            &to4(ROUTER, CUR4),
            ports.old,
            COUNTED,
            "endpoint in a VLAN",
        );
        let tagged = frames::udp4(
            L2::new(CUR4, ROUTER).vlan(Vlan::Single(10)),
            PEER4,
            EP4,
            SPORT,
            DPORT,
            PAYLOAD,
        );
        check(
            &g,
            &ports,
            prog,
            &tagged,
            ports.old,
            COUNTED,
            "tagged frame, endpoint in a VLAN",
        );
        // Across bridges: the FDB's port is of another bridge.
        g.insert_endpoint(key4(EP4), &placed(CUR4, ports.other, false))
            .expect("EP4");
        check(
            &g,
            &ports,
            prog,
            &to4(ROUTER, CUR4),
            ports.old,
            COUNTED,
            "port of another bridge",
        );
        // Leaving a port flowguard does not know (not in PORTS).
        g.insert_endpoint(key4(EP4), &placed(CUR4, ports.new, false))
            .expect("EP4");
        ports.ns.ip(&[
            "link", "add", "lan8", "type", "veth", "peer", "name", "lan8p",
        ]);
        let lan8: u32 = ports
            .ns
            .exec(&["cat", "/sys/class/net/lan8/ifindex"])
            .trim()
            .parse()
            .expect("lan8's ifindex");
        check(
            &g,
            &ports,
            prog,
            &to4(ROUTER, CUR4),
            lan8,
            COUNTED,
            "out of a port not in PORTS",
        );
        ports.ns.ip(&["link", "del", "lan8"]);
        // An ambiguous endpoint is never acted on.
        let mut amb = placed(CUR4, ports.new, false);
        amb.flags |= endpoint_flags::AMBIGUOUS;
        g.insert_endpoint(key4(EP4), &amb).expect("EP4");
        check(
            &g,
            &ports,
            prog,
            &to4(ROUTER, CUR4),
            ports.old,
            COUNTED,
            "ambiguous endpoint",
        );
    }
}

#[test]
fn observe_mode_counts_a_wrong_port_and_never_redirects() {
    require_root!("BPF_PROG_TEST_RUN and namespaces");
    let ports = Ports::new();
    for prog in TC_GUARDS {
        let g = setup(&ports, false, false);
        check(
            &g,
            &ports,
            prog,
            &to4(ROUTER, CUR4),
            ports.old,
            COUNTED,
            "observe, IPv4",
        );
        check(
            &g,
            &ports,
            prog,
            &to6(ROUTER, CUR6),
            ports.old,
            COUNTED,
            "observe, IPv6",
        );
        assert_eq!(g.endpoint(&key6(EP6)).expect("EP6").wrong_port, 1);
    }
}

#[test]
fn the_xdp_guard_never_checks_the_port() {
    require_root!("BPF_PROG_TEST_RUN and namespaces");
    let ports = Ports::new();
    let g = setup(&ports, true, false);
    let frame = to4(ROUTER, CUR4);
    let before = counters(&g);
    let out = g.run(Prog::Xdp, &frame).expect("test_run");
    assert_eq!(out.ret, Prog::Xdp.pass_value());
    assert_eq!(out.data, frame);
    assert_eq!(counters(&g), before);
}

#[test]
fn learning_another_mac_clears_the_old_macs_port() {
    require_root!("BPF_PROG_TEST_RUN and namespaces");
    let ports = Ports::new();
    let mut g = setup(&ports, true, false);
    g.insert_endpoint(key4(EP4), &{
        let mut e = placed(CUR4, ports.new, true);
        e.source = flowguard_common::source::LEARNED;
        e
    })
    .expect("EP4");
    // EP4 sends from a new MAC (a recreated container): learned.
    const NEW: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0x42];
    let from = frames::udp4(L2::new(ROUTER, NEW), EP4, PEER4, DPORT, SPORT, PAYLOAD);
    let out = run(&g, &ports, Prog::TcLearn, &from, ports.old);
    assert_eq!(out.ret, TC_ACT_OK);
    let ep = g.endpoint(&key4(EP4)).expect("EP4");
    assert_eq!(ep.mac, NEW, "learned");
    assert_eq!(ep.port, 0, "the port was the old MAC's");
    assert_eq!(ep.flags & endpoint_flags::PORT_VLAN, 0);
    // So a frame to the new MAC out of any port is not redirected.
    check(
        &g,
        &ports,
        Prog::Tc,
        &to4(ROUTER, NEW),
        ports.old,
        UNTOUCHED,
        "new MAC, port unknown",
    );
}
