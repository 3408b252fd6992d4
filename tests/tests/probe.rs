//! flowguard's router role with a silent endpoint: the endpoint takes a new
//! MAC and announces nothing (no gratuitous ARP, no frame at all), as a
//! Podman macvlan container or a VM with `arp_notify=0` does. Only
//! flowguard's own probes can find the move; the router's real ARP then
//! learns the new MAC and flowguard evicts the endpoint's flows.
//!
//! The prober normally asks only endpoints with offloaded flows, which this
//! kernel cannot make (no flowtable): the tests use `--probe flows`, which
//! asks endpoints with any conntrack entry. The offloaded selection is
//! exercised by the VM lab's `silent` scenario.
//!
//! Each test builds its own namespaces and bpffs; the guards remove them,
//! also when a test fails. Needs root, `arping` and `conntrack`.
//!
//! Run: `cargo test -p flowguard-tests --release --test probe -- --test-threads=1`

use std::net::{Ipv4Addr, UdpSocket};
use std::thread;
use std::time::Duration;

use flowguard_tests::flowguard_proc::{require_flowguard_bin, Flowguard, Status};
use flowguard_tests::netns::BpffsMount;
use flowguard_tests::router::{
    RouterTopology, BRIDGE, ENDPOINT_A_IP, ENDPOINT_B_IP, ENDPOINT_IF, LAN_PREFIX, MAC_A1, MAC_A2,
    MAC_B, PORT_A, WAN_PORT,
};
use flowguard_tests::skip_unless_router_role_supported;
use flowguard_tests::wait::Wait;

/// Bound on how long flowguard may take to see and act on a change.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The flows that make .240 and .241 worth probing.
const PORTS: [u16; 2] = [5000, 51820];

/// A router with flowguard probing every 300 ms, two endpoints with flows,
/// both resolved by real ARP.
struct SilentCase {
    flowguard: Flowguard,
    topology: RouterTopology,
    _bpffs: BpffsMount,
}

impl SilentCase {
    fn new(probe: &str) -> Self {
        require_flowguard_bin();
        let bpffs = BpffsMount::new();
        let topology = RouterTopology::new();
        topology.keep_udp_entries();
        for ns in [
            &topology.endpoint(ENDPOINT_A_IP).ns,
            &topology.endpoint(ENDPOINT_B_IP).ns,
        ] {
            // Silent for real: no gratuitous ARP on a MAC change, no IPv6
            // chatter (DAD, router solicitations) from the endpoint.
            ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.arp_notify=0"]);
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        }
        topology.resolve(ENDPOINT_A_IP);
        topology.resolve(ENDPOINT_B_IP);
        let args = [
            "--egress",
            PORT_A,
            "--prefix",
            LAN_PREFIX,
            "--evict",
            "all",
            "--probe",
            probe,
            "--probe-interval-ms",
            "300",
        ];
        let mut flowguard = Flowguard::start(&topology.router, &bpffs.pin_dir(), &args);
        flowguard.wait_ready();
        topology.send_flows(ENDPOINT_A_IP, &PORTS);
        topology.send_flows(ENDPOINT_B_IP, &PORTS);
        for ip in [ENDPOINT_A_IP, ENDPOINT_B_IP] {
            let entries = topology.wait_conntrack_entries(ip, PORTS.len(), SETTLE_TIMEOUT);
            assert_eq!(
                entries.len(),
                PORTS.len(),
                "conntrack entries of {ip}: {entries:#?}"
            );
        }
        Self {
            flowguard,
            topology,
            _bpffs: bpffs,
        }
    }

    /// The endpoint at `ip` takes `mac` and says nothing.
    fn change_mac_silently(&self, ip: Ipv4Addr, mac: &str) {
        let ns = &self.topology.endpoint(ip).ns;
        ns.ip(&["link", "set", ENDPOINT_IF, "address", mac]);
    }

    fn router_mac(&self, ip: Ipv4Addr) -> Option<String> {
        self.topology
            .router_neigh(ip)
            .and_then(|n| n.mac)
            .map(|m| m.to_ascii_lowercase())
    }
}

/// The endpoints answer at their cached MAC: probes go out, none is
/// unanswered, nothing moves, nothing is evicted.
fn wait_answered_rounds(case: &SilentCase) -> Status {
    case.flowguard
        .wait_for_status("probes sent to both endpoints", SETTLE_TIMEOUT, |s| {
            s.counters.probes_sent >= 6
        })
}

#[test]
fn a_silent_endpoint_with_a_new_mac_is_found_by_probing_and_its_flows_evicted() {
    skip_unless_router_role_supported!();
    let case = SilentCase::new("flows");
    let status = wait_answered_rounds(&case);
    assert_eq!(
        status.counters.probes_unanswered, 0,
        "{:#?}",
        status.counters
    );
    assert_eq!(status.counters.probe_moves, 0, "{:#?}", status.counters);
    assert_eq!(status.counters.eviction_runs, 0, "{:#?}", status.counters);

    case.change_mac_silently(ENDPOINT_A_IP, MAC_A2);
    let status = case.flowguard.wait_for_status(
        "the move of .240 found by probing, and its flows evicted",
        SETTLE_TIMEOUT,
        |s| s.counters.probe_moves >= 1 && s.counters.evicted >= PORTS.len() as u64,
    );
    assert_eq!(status.counters.probe_ambiguous, 0, "{:#?}", status.counters);
    // The probe's report evicts at once; the router's own ARP takes the
    // answer to the probe, and the endpoint map follows the neighbour table.
    let router_mac = Wait::new(
        "the router's own ARP took the answer to the probe",
        SETTLE_TIMEOUT,
    )
    .until(
        || case.router_mac(ENDPOINT_A_IP),
        |m| m.as_deref() == Some(MAC_A2),
    );
    assert_eq!(router_mac.as_deref(), Some(MAC_A2));
    let status = case.flowguard.wait_for_status(
        ".240 at its new MAC in the endpoint map",
        SETTLE_TIMEOUT,
        |s| s.has_endpoint(&ENDPOINT_A_IP.to_string(), MAC_A2),
    );
    assert!(
        status.has_endpoint(&ENDPOINT_A_IP.to_string(), MAC_A2),
        "{:#?}",
        status.endpoints
    );
    assert!(
        status.has_endpoint(&ENDPOINT_B_IP.to_string(), MAC_B),
        ".241 never moved: {:#?}",
        status.endpoints
    );
    let out = case.flowguard.stdout_lines();
    let said = out.iter().any(|l| {
        l.starts_with(&format!("{ENDPOINT_A_IP}: {MAC_A1} stopped answering on "))
            && l.contains(&format!("now at {MAC_A2}"))
    });
    assert!(
        said,
        "no sentence about the move; stdout:\n{}",
        out.join("\n")
    );
    assert!(
        case.topology.conntrack_entries_of(ENDPOINT_A_IP).is_empty(),
        ".240's entries must be evicted"
    );
    assert_eq!(
        case.topology.conntrack_entries_of(ENDPOINT_B_IP).len(),
        PORTS.len(),
        ".241's entries must stay"
    );
}

/// The same change without probing stays unseen: the router keeps the old
/// MAC and nothing is evicted. This is what makes the test above mean
/// something.
#[test]
fn without_probing_the_same_silent_change_stays_unseen() {
    skip_unless_router_role_supported!();
    let case = SilentCase::new("off");
    thread::sleep(Duration::from_secs(1));
    case.change_mac_silently(ENDPOINT_A_IP, MAC_A2);
    thread::sleep(Duration::from_secs(4));
    let status = case.flowguard.status();
    assert_eq!(status.counters.probes_sent, 0, "{:#?}", status.counters);
    assert_eq!(status.counters.eviction_runs, 0, "{:#?}", status.counters);
    assert_eq!(
        case.router_mac(ENDPOINT_A_IP).as_deref(),
        Some(MAC_A1),
        "nothing told the router"
    );
}

/// An IP that answers from two MACs is reported as ambiguous once, and is
/// then left alone: no probe-driven eviction loop.
#[test]
fn an_ip_answering_from_two_macs_is_ambiguous_and_left_alone() {
    skip_unless_router_role_supported!();
    let case = SilentCase::new("flows");
    wait_answered_rounds(&case);
    // .241 also claims .240 (answering ARP for it), then .240 changes its
    // MAC silently: the broadcast probe gets two answers.
    let b = &case.topology.endpoint(ENDPOINT_B_IP).ns;
    b.ip(&[
        "addr",
        "add",
        &format!("{ENDPOINT_A_IP}/32"),
        "dev",
        ENDPOINT_IF,
    ]);
    case.change_mac_silently(ENDPOINT_A_IP, MAC_A2);
    let status = case
        .flowguard
        .wait_for_status(".240 reported ambiguous", SETTLE_TIMEOUT, |s| {
            s.counters.probe_ambiguous >= 1
        });
    assert_eq!(status.counters.probe_moves, 0, "{:#?}", status.counters);
    // The router's ARP took one of the answers: that one move may evict once.
    thread::sleep(Duration::from_secs(1));
    let runs = case.flowguard.status().counters.eviction_runs;
    // Several probe rounds later: no new ambiguity report, no new eviction.
    thread::sleep(Duration::from_secs(3));
    let later = case.flowguard.status();
    assert_eq!(later.counters.probe_ambiguous, 1, "{:#?}", later.counters);
    assert_eq!(later.counters.eviction_runs, runs, "{:#?}", later.counters);
    let out = case.flowguard.stdout_lines();
    assert!(
        out.iter()
            .any(|l| l.starts_with(&format!("{ENDPOINT_A_IP} answered from 2 MACs"))),
        "stdout:\n{}",
        out.join("\n")
    );
}

/// IPv6: the same silent change, found by neighbour solicitations (to the
/// address, which the kernel sends to the cached MAC, then to the
/// solicited-node multicast address), and the flows evicted.
#[test]
fn a_silent_ipv6_endpoint_with_a_new_mac_is_found_by_neighbour_solicitation() {
    skip_unless_router_role_supported!();
    require_flowguard_bin();
    let bpffs = BpffsMount::new();
    let topology = RouterTopology::new();
    topology.keep_udp_entries();
    let a = &topology.endpoint(ENDPOINT_A_IP).ns;
    a.exec(&["sysctl", "-qw", "net.ipv6.conf.all.ndisc_notify=0"]);
    a.exec(&["sysctl", "-qw", "net.ipv4.conf.all.arp_notify=0"]);
    a.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:1::240/64",
        "dev",
        ENDPOINT_IF,
        "nodad",
    ]);
    topology
        .router
        .ip(&["-6", "addr", "add", "fd00:1::1/64", "dev", BRIDGE, "nodad"]);
    topology.router.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:2::1/64",
        "dev",
        WAN_PORT,
        "nodad",
    ]);
    topology.client.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:2::2/64",
        "dev",
        ENDPOINT_IF,
        "nodad",
    ]);
    topology
        .client
        .ip(&["-6", "route", "add", "fd00:1::/64", "via", "fd00:2::1"]);
    a.ip(&["-6", "route", "add", "fd00:2::/64", "via", "fd00:1::1"]);

    let args = [
        "--egress",
        PORT_A,
        "--prefix",
        "fd00:1::/64",
        "--evict",
        "all",
        "--probe",
        "flows",
        "--probe-interval-ms",
        "300",
    ];
    let mut flowguard = Flowguard::start(&topology.router, &bpffs.pin_dir(), &args);
    flowguard.wait_ready();
    // Two forwarded flows: conntrack entries, and the router resolves the
    // endpoint (neighbour solicitation, real answer).
    topology.client.enter(|| {
        for port in PORTS {
            let s = UdpSocket::bind("[fd00:2::2]:0").expect("bind in the client");
            s.send_to(b"flowguard ipv6 flow", format!("[fd00:1::240]:{port}"))
                .expect("send to fd00:1::240");
        }
    });
    flowguard.wait_for_status(
        "fd00:1::240 at its first MAC from the neighbour table",
        SETTLE_TIMEOUT,
        |s| s.has_endpoint("fd00:1::240", MAC_A1),
    );
    let status = flowguard.wait_for_status("probes to fd00:1::240", SETTLE_TIMEOUT, |s| {
        s.counters.probes_sent >= 3
    });
    assert_eq!(
        status.counters.probes_unanswered, 0,
        "{:#?}",
        status.counters
    );
    assert_eq!(status.counters.probe_moves, 0, "{:#?}", status.counters);

    a.ip(&["link", "set", ENDPOINT_IF, "address", MAC_A2]);
    let status = flowguard.wait_for_status(
        "the move of fd00:1::240 found by probing, and its flows evicted",
        SETTLE_TIMEOUT,
        |s| s.counters.probe_moves >= 1 && s.counters.evicted >= PORTS.len() as u64,
    );
    assert_eq!(status.counters.probe_ambiguous, 0, "{:#?}", status.counters);
    assert!(
        status.has_endpoint("fd00:1::240", MAC_A2),
        "the router's own neighbour discovery took the answer: {:#?}",
        status.endpoints
    );
    let out = flowguard.stdout_lines();
    assert!(
        out.iter().any(
            |l| l.starts_with(&format!("fd00:1::240: {MAC_A1} stopped answering on "))
                && l.contains(&format!("now at {MAC_A2}"))
        ),
        "stdout:\n{}",
        out.join("\n")
    );
}
