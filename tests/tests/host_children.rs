//! flowguard in the host role reads the macvlan children of its --ingress
//! interface in every network namespace, so that a recreated container is
//! guarded at its new MAC before it sends a single frame. Each test builds
//! its own namespaces (the host-role topology plus containers of its own)
//! and bpffs; the guards remove them.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use flowguard_user::conntrack::{Conntrack, Flow, Tuple};

use flowguard_tests::flow::UdpFlow;
use flowguard_tests::flowguard_proc::{Flowguard, Status};
use flowguard_tests::netns::{BpffsMount, Netns};
use flowguard_tests::skip_unless_host_role_supported;
use flowguard_tests::stale;
use flowguard_tests::topology::{
    HostRoleTopology, CONTAINER_IP, HOST_PARENT, LAN_PREFIX, MAC_A, ROUTER_IP,
};

/// Bound on how long a child may take to show in the endpoint map.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams per burst.
const N: usize = 20;
/// The topology's router port toward the host (where the stale rule sits).
const ROUTER_PORT: &str = "lan1";

/// Containers of this test file: an IP of their own, so that the
/// topology's container (192.168.1.240) is a bystander.
const IP_1: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 241);
const MAC_1: &str = "02:42:c0:a8:01:f1";
const MAC_2: &str = "02:42:c0:a8:01:f2";
const MAC_3: &str = "02:42:c0:a8:01:f3";

fn start(topology: &HostRoleTopology, bpffs: &BpffsMount, extra: &[&str]) -> Flowguard {
    let mut args = vec![
        "--ingress",
        HOST_PARENT,
        "--egress",
        HOST_PARENT,
        "--learn",
        "--prefix",
        LAN_PREFIX,
    ];
    args.extend_from_slice(extra);
    Flowguard::start(&topology.host, &bpffs.pin_dir(), &args)
}

/// What Docker and the lab do: a macvlan created on the host's parent, then
/// moved into the container's namespace, given an address and brought up.
fn moved_child(topology: &HostRoleTopology, container: &Netns, mac: &str, cidr: &str) {
    topology.host.ip(&[
        "link",
        "add",
        "mvt",
        "link",
        HOST_PARENT,
        "address",
        mac,
        "type",
        "macvlan",
        "mode",
        "bridge",
    ]);
    topology
        .host
        .ip(&["link", "set", "mvt", "netns", container.name()]);
    container.ip(&["addr", "add", cidr, "dev", "mvt"]);
    container.ip(&["link", "set", "mvt", "up"]);
}

/// Waits until `ip` is in the map at `mac` with source "child".
fn wait_child(flowguard: &Flowguard, ip: Ipv4Addr, mac: &str) -> Status {
    let ip = ip.to_string();
    flowguard.wait_for_status(
        &format!("{ip} to be guarded at {mac} as a child"),
        SETTLE_TIMEOUT,
        |s| s.has_endpoint(&ip, mac) && s.endpoint(&ip).is_some_and(|e| e.source == "child"),
    )
}

fn assert_says(flowguard: &Flowguard, what: &[&str]) {
    let line = flowguard.wait_for_line(SETTLE_TIMEOUT, |l| {
        what.iter()
            .all(|w| l.to_ascii_lowercase().contains(&w.to_ascii_lowercase()))
    });
    assert!(
        line.is_some(),
        "flowguard must say a line with {what:?}; stdout: {:#?}",
        flowguard.stdout_lines()
    );
}

#[test]
fn a_child_moved_into_a_container_is_guarded_before_it_sends_anything() {
    skip_unless_host_role_supported!();
    let topology = HostRoleTopology::new(MAC_A);
    let bpffs = BpffsMount::new();
    let flowguard = start(&topology, &bpffs, &[]);

    // The topology's container existed before flowguard: the first dump.
    wait_child(&flowguard, CONTAINER_IP, MAC_A);

    // A new container while flowguard runs: the event path, in a
    // namespace flowguard has never seen.
    let container = Netns::new("c1");
    moved_child(&topology, &container, MAC_1, "192.168.1.241/24");
    let status = wait_child(&flowguard, IP_1, MAC_1);
    assert_eq!(
        status.counters.learned_new, 0,
        "nothing was learned from frames: the children sent none"
    );
    assert!(status.counters.children_added >= 2, "{:?}", status.counters);
    assert_says(
        &flowguard,
        &[
            "192.168.1.241 is at",
            MAC_1,
            container.name(),
            "guarded before it sends anything",
        ],
    );
    let table = flowguard.status_table();
    assert!(
        table.contains("child"),
        "the status table names the source:\n{table}"
    );

    // The child leaves with its namespace: the fact is withdrawn.
    drop(container);
    let ip = IP_1.to_string();
    let status =
        flowguard.wait_for_status("the departed child to be removed", SETTLE_TIMEOUT, |s| {
            s.endpoint(&ip).is_none()
        });
    assert!(
        status.counters.children_removed >= 1,
        "{:?}",
        status.counters
    );
    assert_says(
        &flowguard,
        &[
            "192.168.1.241",
            "left with its macvlan",
            "no longer guarded",
        ],
    );
}

#[test]
fn a_child_created_straight_into_a_namespace_the_host_has_no_nsid_for_is_guarded() {
    skip_unless_host_role_supported!();
    let topology = HostRoleTopology::new(MAC_A);
    let bpffs = BpffsMount::new();
    let flowguard = start(&topology, &bpffs, &[]);

    let container = Netns::new("c2");
    topology.host.ip(&[
        "link",
        "add",
        "mvt",
        "netns",
        container.name(),
        "link",
        HOST_PARENT,
        "address",
        MAC_2,
        "type",
        "macvlan",
        "mode",
        "bridge",
    ]);
    container.ip(&["addr", "add", "192.168.1.241/24", "dev", "mvt"]);
    let ids = topology.host.ip(&["netns", "list-id"]);
    assert!(
        !ids.contains(container.name()),
        "the case under test: the host namespace has no nsid for the container's:\n{ids}"
    );
    wait_child(&flowguard, IP_1, MAC_2);
}

#[test]
fn a_recreated_silent_container_gets_the_stale_flow_delivered() {
    skip_unless_host_role_supported!();
    let topology = HostRoleTopology::new(MAC_A);
    let port = 51830;
    // The router sends to 192.168.1.241 at MAC_1, forever (a permanent
    // neighbour entry and the stale rule: the cached MAC of an offloaded flow).
    topology.router.ip(&[
        "neigh",
        "replace",
        &IP_1.to_string(),
        "lladdr",
        MAC_1,
        "dev",
        "br-lan",
        "nud",
        "permanent",
    ]);
    stale::set_stale(&topology.router, ROUTER_PORT, IP_1, MAC_1);

    let old = Netns::new("old");
    moved_child(&topology, &old, MAC_1, "192.168.1.241/24");
    let mut flow = UdpFlow::new(
        &topology.router,
        SocketAddrV4::new(ROUTER_IP, port),
        &old,
        SocketAddrV4::new(IP_1, port),
    );
    assert_eq!(flow.deliver(N), N, "the flow works before the recreation");
    drop(flow);

    // Control, without the children source: the recreated container sends
    // nothing, so nothing tells flowguard its new MAC and the flow stays dead.
    let bpffs = BpffsMount::new();
    let mut blind = start(&topology, &bpffs, &["--no-children"]);
    drop(old);
    let new = Netns::new("new");
    moved_child(&topology, &new, MAC_2, "192.168.1.241/24");
    let mut flow = UdpFlow::new(
        &topology.router,
        SocketAddrV4::new(ROUTER_IP, port),
        &new,
        SocketAddrV4::new(IP_1, port),
    );
    assert_eq!(
        flow.deliver(N),
        0,
        "without children the stale flow loses everything"
    );
    blind.stop();
    drop(flow);
    drop(new);
    drop(bpffs);

    // With children: recreated again (namespace deleted, a new one with a
    // new MAC and the same IP), still silent.
    let bpffs = BpffsMount::new();
    let flowguard = start(&topology, &bpffs, &[]);
    let new = Netns::new("newer");
    moved_child(&topology, &new, MAC_3, "192.168.1.241/24");
    wait_child(&flowguard, IP_1, MAC_3);
    let mut flow = UdpFlow::new(
        &topology.router,
        SocketAddrV4::new(ROUTER_IP, port),
        &new,
        SocketAddrV4::new(IP_1, port),
    );
    assert_eq!(
        flow.deliver(N),
        N,
        "flowguard must deliver every datagram to the new container"
    );
    let status = flowguard.status();
    let ep = status.endpoint(&IP_1.to_string()).expect("tracked");
    assert!(ep.rewritten >= N as u64, "{ep:?}");
    assert!(
        ep.last_stale_mac
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(MAC_1)),
        "the evidence names the stale MAC: {ep:?}"
    );
    assert_eq!(ep.source, "child", "{ep:?}");
    assert_eq!(status.counters.learned_new, 0, "{:?}", status.counters);
}

#[test]
fn children_outside_the_prefixes_are_ignored_and_static_entries_stay() {
    skip_unless_host_role_supported!();
    let topology = HostRoleTopology::new(MAC_A);
    let bpffs = BpffsMount::new();
    let static_mac = "02:00:00:00:00:99";
    let flowguard = start(
        &topology,
        &bpffs,
        &["--static", &format!("192.168.1.242={static_mac}")],
    );
    let container = Netns::new("c4");
    moved_child(&topology, &container, MAC_1, "192.168.1.242/24");
    container.ip(&["addr", "add", "10.9.9.9/24", "dev", "mvt"]);
    // The control: a second address of the same child, inside the prefix,
    // shows that flowguard has read this namespace.
    container.ip(&["addr", "add", "192.168.1.243/24", "dev", "mvt"]);
    let status = wait_child(&flowguard, Ipv4Addr::new(192, 168, 1, 243), MAC_1);
    let s = status.endpoint("192.168.1.242").expect("the static entry");
    assert_eq!(s.source, "static", "{s:?}");
    assert!(s.mac.eq_ignore_ascii_case(static_mac), "{s:?}");
    assert!(status.endpoint("10.9.9.9").is_none(), "{status:#?}");
}

/// A child's new MAC is a move of the endpoint table, and evicts like a
/// neighbour change: the endpoint's entries in flowguard's own conntrack
/// table go, a bystander's stay. The entries are inserted over ctnetlink
/// (this kernel has no nf_flow_table, so none can be offloaded: hence
/// `--evict all`; the VM lab evicts real `[OFFLOAD]` entries).
#[test]
fn a_childs_new_mac_evicts_the_endpoints_conntrack_entries() {
    skip_unless_host_role_supported!();
    let topology = HostRoleTopology::new(MAC_A);
    let bpffs = BpffsMount::new();
    let flowguard = start(&topology, &bpffs, &["--evict", "all"]);
    let container = Netns::new("c5");
    moved_child(&topology, &container, MAC_1, "192.168.1.241/24");
    wait_child(&flowguard, IP_1, MAC_1);

    let (moved, bystander) = (IpAddr::V4(IP_1), IpAddr::V4(CONTAINER_IP));
    let router = IpAddr::V4(ROUTER_IP);
    let flows = [
        Flow::unnatted(Tuple::udp(router, 51820, moved, 51820)),
        Flow::unnatted(Tuple::tcp(moved, 40000, router, 443)),
        Flow::unnatted(Tuple::udp(router, 51821, bystander, 51821)),
    ];
    topology.host.enter(|| {
        let mut ct = Conntrack::open().expect("ctnetlink in the host namespace");
        for f in &flows {
            ct.insert(f, 300)
                .unwrap_or_else(|e| panic!("inserting {}: {e}", f.describe()));
        }
    });
    let before = flowguard.status();
    assert_eq!(before.counters.evicted, 0, "{:?}", before.counters);

    // The container's own configuration changes: the child's MAC.
    container.ip(&["link", "set", "mvt", "address", MAC_2]);
    wait_child(&flowguard, IP_1, MAC_2);
    let status = flowguard.wait_for_status(
        "the entries of .241 evicted after its child's MAC changed",
        SETTLE_TIMEOUT,
        |s| s.counters.evicted >= 2,
    );
    assert_eq!(status.counters.evicted, 2, "{:?}", status.counters);
    assert_says(
        &flowguard,
        &[
            "192.168.1.241: evicted flow",
            &format!("because its MAC changed from {MAC_1} to {MAC_2}"),
        ],
    );
    let left = topology.host.enter(|| {
        let mut ct = Conntrack::open().expect("ctnetlink in the host namespace");
        (
            ct.flows_involving(moved).expect("listing"),
            ct.flows_involving(bystander).expect("listing"),
        )
    });
    assert!(
        left.0.is_empty(),
        "the moved endpoint's entries: {:?}",
        left.0
    );
    assert_eq!(left.1.len(), 1, "the bystander's entry stays: {:?}", left.1);
}
