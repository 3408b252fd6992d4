//! flowguard in the router role, on this machine's kernel: a router forwards
//! a client's UDP flows to LAN endpoints behind bridge ports; flowguard
//! follows the router's real neighbour table (filled and changed by real
//! ARP), rewrites frames that leave a bridge port with a stale MAC (an
//! nftables netdev egress rule stands in for the flowtable's cached MAC),
//! and evicts the conntrack entries of an endpoint whose MAC changed.
//!
//! Each test builds its own namespaces and bpffs; the guards remove them,
//! also when a test fails. Needs root, `arping` and `conntrack`; otherwise
//! each test prints `skipped: <reason>` and returns. Waits are bounded polls;
//! nothing asserts on timing.
//!
//! Run: `cargo test -p flowguard-tests --release --test router_role -- --test-threads=1`

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use flowguard_tests::flowguard_proc::{require_flowguard_bin, Flowguard, Status};
use flowguard_tests::netns::BpffsMount;
use flowguard_tests::router::{
    CtEntry, NeighState, RouterTopology, BRIDGE, CLIENT_IP, ENDPOINT_A_IP, ENDPOINT_B_IP,
    ENDPOINT_IF, LAN_PREFIX, MAC_A1, MAC_A2, MAC_B, PORT_A,
};
use flowguard_tests::wait::Wait;
use flowguard_tests::{skip_unless_host_role_supported, skip_unless_router_role_supported};

/// Datagrams per burst.
const N: usize = 20;
/// Bound on how long the map, the counters and the output may take to follow
/// a change.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a neighbour entry turning FAILED (with the short timers of
/// `fast_neighbour_failure`, about a second).
const FAILED_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on how long flowguard may take to refuse to start.
const REJECT_TIMEOUT: Duration = Duration::from_secs(20);
/// The destination ports of the flows that conntrack tracks.
const PORTS: [u16; 5] = [5000, 5001, 5002, 51820, 60000];

fn a_ip() -> String {
    ENDPOINT_A_IP.to_string()
}

fn b_ip() -> String {
    ENDPOINT_B_IP.to_string()
}

fn start_router_role(topology: &RouterTopology, bpffs: &BpffsMount, extra: &[&str]) -> Flowguard {
    let mut args = vec!["--egress", PORT_A, "--prefix", LAN_PREFIX];
    args.extend_from_slice(extra);
    Flowguard::start(&topology.router, &bpffs.pin_dir(), &args)
}

/// Waits until flowguard tracks `ip` at `mac` from the neighbour table.
fn wait_neighbour_endpoint(flowguard: &Flowguard, ip: &str, mac: &str) -> Status {
    flowguard.wait_for_status(
        &format!("{ip} at {mac} from the neighbour table"),
        SETTLE_TIMEOUT,
        |status| {
            status.has_endpoint(ip, mac)
                && status
                    .endpoint(ip)
                    .is_some_and(|endpoint| endpoint.source == "neighbour")
        },
    )
}

/// The flows flowguard printed with `verb` (`evicted` or `would evict`), as
/// their original tuple (`udp 10.0.0.2:40000 -> 192.168.1.240:5000`).
fn flows_printed(flowguard: &Flowguard, verb: &str) -> Vec<String> {
    let marker = format!(": {verb} flow ");
    flowguard
        .stdout_lines()
        .iter()
        .filter_map(|line| {
            let (_, rest) = line.split_once(&marker)?;
            let orig = rest.split(" (reply ").next()?;
            Some(orig.to_owned())
        })
        .collect()
}

/// Waits up to [`SETTLE_TIMEOUT`] for at least `n` `verb` lines; returns
/// them all (maybe fewer).
fn wait_flows_printed(flowguard: &Flowguard, verb: &str, n: usize) -> Vec<String> {
    Wait::new(format!("{n} `{verb}` lines"), SETTLE_TIMEOUT)
        .poll(
            || flows_printed(flowguard, verb),
            |printed| printed.len() >= n,
        )
        .unwrap_or_else(|timed_out| timed_out.last)
}

fn orig_texts(entries: &[CtEntry]) -> BTreeSet<String> {
    entries.iter().map(CtEntry::orig_text).collect()
}

/// (a) The endpoint map follows the router's neighbour table, which real
/// ARP changes: the endpoint takes a new MAC and announces it.
#[test]
fn the_map_follows_a_real_arp_change() {
    skip_unless_router_role_supported!();
    let bpffs = BpffsMount::new();
    let mut topology = RouterTopology::new();
    topology.resolve(ENDPOINT_A_IP);
    topology.resolve(ENDPOINT_B_IP);
    let flowguard = start_router_role(&topology, &bpffs, &[]);

    let before = wait_neighbour_endpoint(&flowguard, &a_ip(), MAC_A1);
    assert!(before.has_endpoint(&b_ip(), MAC_B), "{before:#?}");
    let endpoint = before.endpoint(&a_ip()).expect("tracked");
    assert!(!endpoint.ambiguous, "{endpoint:#?}");
    assert!(before.counters.neigh_added >= 2, "{:#?}", before.counters);

    topology.move_endpoint(ENDPOINT_A_IP, MAC_A2);

    let after = flowguard.wait_for_status(
        "the move of .240 to MAC A2 in the map",
        SETTLE_TIMEOUT,
        |status| status.has_endpoint(&a_ip(), MAC_A2) && status.counters.neigh_moved >= 1,
    );
    let endpoint = after.endpoint(&a_ip()).expect("tracked");
    assert_eq!(endpoint.source, "neighbour");
    assert!(!endpoint.ambiguous, "{endpoint:#?}");
    assert!(
        after.has_endpoint(&b_ip(), MAC_B),
        "the other endpoint must not change: {after:#?}"
    );
    // The kernel's table agrees with the map.
    assert!(
        topology.router_has_neigh(ENDPOINT_A_IP, MAC_A2),
        "ip neigh in the router: {:?}",
        topology.router_neigh(ENDPOINT_A_IP)
    );
    let moved = format!(
        "{} moved from {MAC_A1} to {MAC_A2} (neighbour table)",
        a_ip()
    );
    assert!(
        flowguard
            .wait_for_line(SETTLE_TIMEOUT, |line| line.contains(&moved))
            .is_some(),
        "no `{moved}` line; stdout:\n{}",
        flowguard.stdout_lines().join("\n")
    );
}

/// (b) The router keeps sending .240's flow to its old MAC after it moved
/// (the nft egress rule): without flowguard nothing arrives; with flowguard
/// on the bridge port every datagram does, and it says so in its counters.
#[test]
fn stale_frames_leaving_the_bridge_port_are_rewritten_to_the_neighbour_mac() {
    skip_unless_host_role_supported!();
    skip_unless_router_role_supported!();
    let bpffs = BpffsMount::new();
    let mut topology = RouterTopology::new();
    topology.resolve(ENDPOINT_A_IP);
    let mut flow = topology.udp_flow(ENDPOINT_A_IP, 51820);
    assert_eq!(flow.deliver(N), N, "the flow must work before the move");

    topology.move_endpoint(ENDPOINT_A_IP, MAC_A2);
    assert_eq!(flow.deliver(N), N, "the router follows the move by itself");
    topology.set_stale(ENDPOINT_A_IP, MAC_A1);
    assert_eq!(
        flow.deliver(N),
        0,
        "without flowguard no datagram sent to the old MAC may arrive"
    );

    let mut flowguard = start_router_role(&topology, &bpffs, &[]);
    wait_neighbour_endpoint(&flowguard, &a_ip(), MAC_A2);
    assert_eq!(
        flow.deliver(N),
        N,
        "with flowguard every datagram must arrive; stdout:\n{}",
        flowguard.stdout_lines().join("\n")
    );
    let status = flowguard.wait_for_status(
        "the stale and rewritten counters",
        SETTLE_TIMEOUT,
        |status| status.counters.stale >= N as u64 && status.counters.rewritten >= N as u64,
    );
    let endpoint = status.endpoint(&a_ip()).expect("tracked");
    assert!(endpoint.rewritten >= N as u64, "{endpoint:#?}");
    assert!(
        endpoint
            .last_stale_mac
            .as_deref()
            .is_some_and(|mac| mac.eq_ignore_ascii_case(MAC_A1)),
        "{endpoint:#?}"
    );
    assert!(status.has_endpoint(&a_ip(), MAC_A2), "{status:#?}");
    println!("counters: {:?}", status.counters);

    // Detached, the flow is broken again: the fix was flowguard's.
    assert!(flowguard.stop().success(), "{}", flowguard.stderr_text());
    assert_eq!(flow.deliver(N), 0, "after flowguard stopped");
}

/// What the eviction tests share: flows to both endpoints tracked by the
/// router's conntrack, flowguard running with `extra`, and .240 moved by
/// real ARP afterwards.
struct EvictionCase {
    // Fields drop in order: flowguard before the namespaces and the bpffs.
    flowguard: Flowguard,
    topology: RouterTopology,
    _bpffs: BpffsMount,
    /// The router's entries of .240 and .241 just before the move.
    of_a: Vec<CtEntry>,
    of_b: Vec<CtEntry>,
}

impl EvictionCase {
    fn run(extra: &[&str]) -> Self {
        Self::run_with(extra, false)
    }

    /// With `leave_first`, .240's neighbour entry is deleted (and has left
    /// the map) before the endpoint comes back at its new MAC.
    fn run_with(extra: &[&str], leave_first: bool) -> Self {
        let bpffs = BpffsMount::new();
        let mut topology = RouterTopology::new();
        topology.keep_udp_entries();
        topology.resolve(ENDPOINT_A_IP);
        topology.resolve(ENDPOINT_B_IP);
        let flowguard = start_router_role(&topology, &bpffs, extra);
        wait_neighbour_endpoint(&flowguard, &a_ip(), MAC_A1);

        topology.send_flows(ENDPOINT_A_IP, &PORTS);
        topology.send_flows(ENDPOINT_B_IP, &PORTS);
        let of_a = topology.wait_conntrack_entries(ENDPOINT_A_IP, PORTS.len(), SETTLE_TIMEOUT);
        let of_b = topology.wait_conntrack_entries(ENDPOINT_B_IP, PORTS.len(), SETTLE_TIMEOUT);
        for (ip, entries) in [(ENDPOINT_A_IP, &of_a), (ENDPOINT_B_IP, &of_b)] {
            assert_eq!(
                entries.len(),
                PORTS.len(),
                "conntrack entries of {ip} before the move: {entries:#?}"
            );
            assert!(
                entries
                    .iter()
                    .all(|e| e.proto == "udp" && e.orig.src == IpAddr::V4(CLIENT_IP)),
                "{entries:#?}"
            );
        }
        let status = flowguard.status();
        assert_eq!(
            status.counters.eviction_runs, 0,
            "nothing may be evicted before the move: {:#?}",
            status.counters
        );

        if leave_first {
            topology
                .router
                .ip(&["neigh", "del", &a_ip(), "dev", BRIDGE]);
            flowguard.wait_for_status(".240 to leave the map", SETTLE_TIMEOUT, |status| {
                status.endpoint(&a_ip()).is_none()
            });
        }
        topology.move_endpoint(ENDPOINT_A_IP, MAC_A2);
        Self {
            flowguard,
            topology,
            _bpffs: bpffs,
            of_a,
            of_b,
        }
    }

    /// Waits for the eviction run the move triggered.
    fn wait_eviction_run(&self) -> Status {
        self.flowguard.wait_for_status(
            "the eviction run after the move",
            SETTLE_TIMEOUT,
            |status| status.counters.eviction_runs >= 1,
        )
    }
}

/// (c) `--evict all`: the move of .240 deletes exactly .240's entries.
#[test]
fn evict_all_deletes_exactly_the_entries_of_the_endpoint_that_moved() {
    skip_unless_router_role_supported!();
    let case = EvictionCase::run(&["--evict", "all"]);
    let status =
        case.flowguard
            .wait_for_status("the eviction of .240's flows", SETTLE_TIMEOUT, |status| {
                status.counters.evicted >= PORTS.len() as u64
            });
    assert_eq!(status.counters.eviction_errors, 0, "{:#?}", status.counters);
    assert_eq!(status.counters.dry_run_matches, 0, "{:#?}", status.counters);

    let printed = wait_flows_printed(&case.flowguard, "evicted", case.of_a.len());
    let printed: BTreeSet<String> = printed.into_iter().collect();
    assert_eq!(
        printed,
        orig_texts(&case.of_a),
        "the `evicted flow` lines must name exactly .240's entries; stdout:\n{}",
        case.flowguard.stdout_lines().join("\n")
    );
    let evicted_lines: Vec<String> = case
        .flowguard
        .stdout_lines()
        .into_iter()
        .filter(|line| line.contains(": evicted flow "))
        .collect();
    assert!(
        evicted_lines
            .iter()
            .all(|line| line.starts_with(&format!("{}: ", a_ip())) && line.contains(" because ")),
        "{evicted_lines:#?}"
    );
    for line in &evicted_lines {
        println!("{line}");
    }

    let left_a = case.topology.conntrack_entries_of(ENDPOINT_A_IP);
    assert!(
        left_a.is_empty(),
        ".240's entries must be gone: {left_a:#?}"
    );
    let left_b = case.topology.conntrack_entries_of(ENDPOINT_B_IP);
    assert_eq!(
        orig_texts(&left_b),
        orig_texts(&case.of_b),
        ".241's entries must all be left"
    );
    assert!(
        status.counters.evicted >= case.of_a.len() as u64,
        "{:#?}",
        status.counters
    );
}

/// (d) `--dry-run --evict all`: the same entries are named, none deleted.
#[test]
fn dry_run_names_the_entries_and_deletes_nothing() {
    skip_unless_router_role_supported!();
    let case = EvictionCase::run(&["--evict", "all", "--dry-run"]);
    let status =
        case.flowguard
            .wait_for_status("the dry run after the move", SETTLE_TIMEOUT, |status| {
                status.counters.eviction_runs >= 1 && status.counters.dry_run_matches >= 1
            });
    assert_eq!(status.counters.evicted, 0, "{:#?}", status.counters);
    assert_eq!(
        status.counters.dry_run_matches,
        case.of_a.len() as u64,
        "{:#?}",
        status.counters
    );

    let printed: BTreeSet<String> =
        wait_flows_printed(&case.flowguard, "would evict", case.of_a.len())
            .into_iter()
            .collect();
    assert_eq!(
        printed,
        orig_texts(&case.of_a),
        "stdout:\n{}",
        case.flowguard.stdout_lines().join("\n")
    );
    assert!(
        flows_printed(&case.flowguard, "evicted").is_empty(),
        "a dry run must not say `evicted`"
    );
    assert_eq!(
        orig_texts(&case.topology.conntrack_entries_of(ENDPOINT_A_IP)),
        orig_texts(&case.of_a),
        "a dry run must delete nothing"
    );
    assert_eq!(
        orig_texts(&case.topology.conntrack_entries_of(ENDPOINT_B_IP)),
        orig_texts(&case.of_b)
    );
}

/// (e) The default scope, `offloaded`: this kernel has no flowtable, so no
/// entry can be OFFLOAD and the move deletes nothing, though it does run.
#[test]
fn default_scope_deletes_nothing_without_offloaded_entries() {
    skip_unless_router_role_supported!();
    let case = EvictionCase::run(&[]);
    let status = case.wait_eviction_run();
    println!("counters: {:?}", status.counters);
    assert_eq!(status.counters.evicted, 0, "{:#?}", status.counters);
    assert_eq!(status.counters.eviction_errors, 0, "{:#?}", status.counters);
    assert!(
        flows_printed(&case.flowguard, "evicted").is_empty(),
        "stdout:\n{}",
        case.flowguard.stdout_lines().join("\n")
    );
    assert_eq!(
        orig_texts(&case.topology.conntrack_entries_of(ENDPOINT_A_IP)),
        orig_texts(&case.of_a),
        "no entry is offloaded, so none may be deleted"
    );
    assert_eq!(
        orig_texts(&case.topology.conntrack_entries_of(ENDPOINT_B_IP)),
        orig_texts(&case.of_b)
    );
}

/// A MAC change across a gap: .240's neighbour entry leaves the table
/// (deleted here; an entry that turns FAILED, or a neighbour flush when the
/// bridge loses carrier, does the same) and comes back at another MAC. Flows
/// offloaded toward the old MAC are as stale as after a direct move, so
/// they must be evicted.
#[test]
fn a_return_at_another_mac_after_leaving_the_table_evicts_the_old_entries() {
    skip_unless_router_role_supported!();
    let case = EvictionCase::run_with(&["--evict", "all"], true);
    let status = case.flowguard.poll_status(SETTLE_TIMEOUT, |status| {
        status.counters.evicted >= PORTS.len() as u64
    });
    let left_a = case.topology.conntrack_entries_of(ENDPOINT_A_IP);
    assert!(
        status.is_ok() && left_a.is_empty(),
        ".240 came back at {MAC_A2} after leaving the table at {MAC_A1}, but its entries \
         were not evicted; left: {left_a:#?}\nstdout:\n{}",
        case.flowguard.stdout_lines().join("\n")
    );
}

/// (f) `--auto` on a router without any flowtable: refuses to start, says
/// why in one line, and pins nothing.
#[test]
fn auto_without_a_flowtable_refuses_in_one_line_and_pins_nothing() {
    skip_unless_router_role_supported!();
    let bpffs = BpffsMount::new();
    let topology = RouterTopology::new();
    let pin_dir = bpffs.pin_dir();
    // A fresh bpffs is not empty (maps.debug, progs.debug): compare.
    let before = bpffs_entries(&bpffs);
    let mut flowguard = Flowguard::spawn(
        &require_flowguard_bin(),
        &topology.router,
        &pin_dir,
        &["--auto", "--prefix", LAN_PREFIX],
        false,
    );
    let status = flowguard
        .wait_exit(REJECT_TIMEOUT)
        .expect("flowguard --auto without a flowtable must exit by itself");
    assert!(!status.success(), "it must fail: {status}");
    let stderr = flowguard.stderr_text();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of error, got:\n{stderr}");
    println!("flowguard --auto said: {}", lines[0]);
    assert!(
        lines[0].contains("no flowtable"),
        "the error must say there is no flowtable: {}",
        lines[0]
    );
    assert!(
        !flowguard
            .stdout_lines()
            .iter()
            .any(|line| line.starts_with("flowguard: ready")),
        "{:?}",
        flowguard.stdout_lines()
    );
    let pinned = std::fs::read_dir(&pin_dir)
        .map(|dir| dir.count())
        .unwrap_or(0);
    assert_eq!(pinned, 0, "nothing may be pinned in {}", pin_dir.display());
    assert_eq!(
        bpffs_entries(&bpffs),
        before,
        "nothing may be created on the bpffs"
    );
}

fn bpffs_entries(bpffs: &BpffsMount) -> BTreeSet<String> {
    std::fs::read_dir(bpffs.path())
        .expect("read the bpffs")
        .map(|entry| {
            entry
                .expect("a bpffs entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// (g) When the kernel stops believing in an endpoint's MAC, the endpoint
/// leaves the map: an entry deleted with `ip neigh del` (.240), and an entry
/// that turns FAILED because its endpoint went away (.241).
#[test]
fn a_deleted_or_failed_neighbour_leaves_the_map() {
    skip_unless_router_role_supported!();
    let bpffs = BpffsMount::new();
    let topology = RouterTopology::new();
    topology.fast_neighbour_failure();
    topology.resolve(ENDPOINT_A_IP);
    topology.resolve(ENDPOINT_B_IP);
    let flowguard = start_router_role(&topology, &bpffs, &[]);
    wait_neighbour_endpoint(&flowguard, &a_ip(), MAC_A1);
    wait_neighbour_endpoint(&flowguard, &b_ip(), MAC_B);

    topology
        .router
        .ip(&["neigh", "del", &a_ip(), "dev", BRIDGE]);
    let status = flowguard.wait_for_status(
        ".240 to leave the map after `ip neigh del`",
        SETTLE_TIMEOUT,
        |status| status.endpoint(&a_ip()).is_none() && status.counters.neigh_removed >= 1,
    );
    assert!(status.has_endpoint(&b_ip(), MAC_B), "{status:#?}");
    assert!(topology.router_neigh(ENDPOINT_A_IP).is_none());
    let removed = format!("{} (was {MAC_A1}) left the neighbour table", a_ip());
    assert!(
        flowguard
            .wait_for_line(SETTLE_TIMEOUT, |line| line.contains(&removed))
            .is_some(),
        "no `{removed}` line; stdout:\n{}",
        flowguard.stdout_lines().join("\n")
    );

    // .241 goes away; the router's next datagram to it finds no answer and
    // the kernel gives its entry up (FAILED, no MAC).
    topology.b.ns.ip(&["link", "set", ENDPOINT_IF, "down"]);
    let failed = |n: Option<&NeighState>| n.is_some_and(|n| n.states.iter().any(|s| s == "FAILED"));
    topology.nudge_router_neigh(
        ENDPOINT_B_IP,
        "the router's entry for .241 to turn FAILED",
        (Duration::from_secs(5), FAILED_TIMEOUT),
        || drop(topology.send_flows(ENDPOINT_B_IP, &[9])),
        failed,
    );
    let status = flowguard.wait_for_status(
        ".241 to leave the map once its neighbour entry FAILED",
        SETTLE_TIMEOUT,
        |status| status.endpoint(&b_ip()).is_none() && status.counters.neigh_removed >= 2,
    );
    assert!(status.endpoints.is_empty(), "{status:#?}");
}
