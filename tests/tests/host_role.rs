//! flowguard in the host role, on this machine's kernel: a router keeps
//! sending a container's flow to the container's old MAC (an nftables egress
//! rule stands in for the flowtable's cached MAC), and flowguard on the
//! macvlan parent learns the new MAC and rewrites the frames on ingress.
//! Each test builds its own namespaces and bpffs; the guards remove them.

use std::path::Path;
use std::time::Duration;

use flowguard_tests::flowguard_proc::{require_flowguard_bin, Flowguard, Status};
use flowguard_tests::netns::{BpffsMount, Netns};
use flowguard_tests::skip_unless_host_role_supported;
use flowguard_tests::topology::{
    HostRoleTopology, CONTAINER_IP, HOST_PARENT, LAN_PREFIX, MAC_A, MAC_B, MAC_C,
};

/// Datagrams per burst.
const N: usize = 20;
/// Bound on how long learning and event output may take to show.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on how long flowguard may take to reject bad input.
const REJECT_TIMEOUT: Duration = Duration::from_secs(20);

/// A topology whose flow worked with MAC A and is now broken: the container
/// was recreated with MAC B and the router keeps sending to A.
fn broken_flow() -> HostRoleTopology {
    let mut topology = HostRoleTopology::new(MAC_A);
    assert_eq!(
        topology.deliver(N),
        N,
        "the flow must work before the MAC change"
    );
    topology.recreate_container(MAC_B);
    topology.set_stale(MAC_A);
    topology
}

fn start_host_role(topology: &HostRoleTopology, bpffs: &BpffsMount, mode: &str) -> Flowguard {
    Flowguard::start(
        &topology.host,
        &bpffs.pin_dir(),
        &[
            "--ingress",
            HOST_PARENT,
            "--egress",
            HOST_PARENT,
            "--learn",
            "--prefix",
            LAN_PREFIX,
            "--mode",
            mode,
            // These tests are about learning from frames; the host's own
            // children would name the MAC first (tests/host_children.rs).
            "--no-children",
        ],
    )
}

/// Lets the container send its first frame and waits until flowguard has
/// learned it at `mac`.
fn learn_container(topology: &HostRoleTopology, flowguard: &Flowguard, mac: &str) -> Status {
    topology.container_first_frame();
    let ip = CONTAINER_IP.to_string();
    flowguard.wait_for_status(
        &format!("{ip} to be learned at {mac}"),
        SETTLE_TIMEOUT,
        |status| status.has_endpoint(&ip, mac),
    )
}

fn container_endpoint(status: &Status) -> &flowguard_tests::flowguard_proc::EndpointStatus {
    status
        .endpoint(&CONTAINER_IP.to_string())
        .unwrap_or_else(|| panic!("{CONTAINER_IP} is not tracked: {status:#?}"))
}

#[test]
fn without_flowguard_the_stale_flow_loses_every_datagram() {
    skip_unless_host_role_supported!();
    let mut topology = broken_flow();

    assert_eq!(
        topology.deliver(N),
        0,
        "the stale flow must lose everything"
    );

    // Control: the loss is the stale MAC's doing, not a broken topology.
    topology.clear_stale();
    assert_eq!(
        topology.deliver(N),
        N,
        "without the stale rule the flow works"
    );
}

#[test]
fn fix_mode_with_learning_restores_the_flow() {
    skip_unless_host_role_supported!();
    let mut topology = broken_flow();
    let bpffs = BpffsMount::new();
    let flowguard = start_host_role(&topology, &bpffs, "fix");

    let learned = learn_container(&topology, &flowguard, MAC_B);
    assert_eq!(container_endpoint(&learned).source, "learned");

    assert_eq!(
        topology.deliver(N),
        N,
        "flowguard must deliver every datagram"
    );

    let status = flowguard.status();
    assert_eq!(status.mode, "fix");
    assert!(
        status.counters.stale >= N as u64,
        "stale: {:?}",
        status.counters
    );
    assert!(
        status.counters.rewritten >= N as u64,
        "rewritten: {:?}",
        status.counters
    );
    assert!(
        status.counters.learned_new >= 1,
        "learned_new: {:?}",
        status.counters
    );
    let endpoint = container_endpoint(&status);
    assert!(endpoint.mac.eq_ignore_ascii_case(MAC_B), "{endpoint:?}");
    assert_eq!(endpoint.source, "learned");
    assert!(endpoint.stale_packets >= N as u64, "{endpoint:?}");
    assert!(endpoint.rewritten >= N as u64, "{endpoint:?}");
    assert!(
        endpoint
            .last_stale_mac
            .as_deref()
            .is_some_and(|mac| mac.eq_ignore_ascii_case(MAC_A)),
        "the evidence must name the stale MAC {MAC_A}: {endpoint:?}"
    );

    // Each event is a sentence on stdout: the learning (naming the new MAC)
    // and the first stale frame (naming the stale one).
    assert_says(&flowguard, MAC_B);
    assert_says(&flowguard, MAC_A);

    // Once the sender is right again, flowguard must leave the flow alone.
    topology.clear_stale();
    assert_eq!(topology.deliver(N), N, "the healthy flow must still arrive");
    let healthy = flowguard.status();
    assert_eq!(
        healthy.counters.stale, status.counters.stale,
        "frames to the current MAC must not count as stale"
    );
    assert!(
        healthy.counters.checked >= healthy.counters.stale + N as u64,
        "checked counts every in-prefix frame looked up, stale or not: {:?}",
        healthy.counters
    );
}

/// Asserts that flowguard printed a line about the container naming `mac`.
fn assert_says(flowguard: &Flowguard, mac: &str) {
    let ip = CONTAINER_IP.to_string();
    let line = flowguard.wait_for_line(SETTLE_TIMEOUT, |line| {
        line.contains(&ip) && line.to_ascii_lowercase().contains(mac)
    });
    assert!(
        line.is_some(),
        "flowguard must report {ip} with {mac} on stdout; stdout: {:#?}",
        flowguard.stdout_lines()
    );
}

#[test]
fn observe_mode_counts_but_does_not_fix() {
    skip_unless_host_role_supported!();
    let mut topology = broken_flow();
    let bpffs = BpffsMount::new();
    let flowguard = start_host_role(&topology, &bpffs, "observe");
    learn_container(&topology, &flowguard, MAC_B);

    assert_eq!(topology.deliver(N), 0, "observe mode must not rewrite");

    let status = flowguard.status();
    assert_eq!(status.mode, "observe");
    assert!(
        status.counters.stale >= N as u64,
        "stale: {:?}",
        status.counters
    );
    assert_eq!(status.counters.rewritten, 0, "{:?}", status.counters);
    let endpoint = container_endpoint(&status);
    assert!(endpoint.stale_packets >= N as u64, "{endpoint:?}");
    assert_eq!(endpoint.rewritten, 0, "{endpoint:?}");
}

#[test]
fn learning_follows_a_second_mac_change() {
    skip_unless_host_role_supported!();
    let mut topology = broken_flow();
    let bpffs = BpffsMount::new();
    let flowguard = start_host_role(&topology, &bpffs, "fix");
    learn_container(&topology, &flowguard, MAC_B);
    assert_eq!(topology.deliver(N), N, "fixed after the first change");

    // Recreated again; now the router's flow has cached B.
    topology.recreate_container(MAC_C);
    topology.set_stale(MAC_B);
    let status = learn_container(&topology, &flowguard, MAC_C);
    assert!(
        status.counters.learned_moved >= 1,
        "a MAC change must count as a move: {:?}",
        status.counters
    );
    assert_says(&flowguard, MAC_C);

    assert_eq!(topology.deliver(N), N, "fixed after the second change");
    let status = flowguard.status();
    let endpoint = container_endpoint(&status);
    assert!(endpoint.mac.eq_ignore_ascii_case(MAC_C), "{endpoint:?}");
    assert_eq!(endpoint.source, "learned");
}

/// `ip -d link show` and `bpftool net show` for the host's parent, as seen
/// from inside the host namespace.
fn attachments(host: &Netns) -> (String, String) {
    let link = host.ip(&["-d", "link", "show", HOST_PARENT]);
    let net = host.nsenter("bpftool", &["net", "show"]);
    assert!(
        net.status.success(),
        "bpftool net show failed: {}",
        String::from_utf8_lossy(&net.stderr)
    );
    (link, String::from_utf8_lossy(&net.stdout).into_owned())
}

#[test]
fn sigint_detaches_everything_and_removes_the_pins() {
    skip_unless_host_role_supported!();
    assert_clean_exit_on(libc::SIGINT);
}

#[test]
fn sigterm_detaches_everything_and_removes_the_pins() {
    skip_unless_host_role_supported!();
    assert_clean_exit_on(libc::SIGTERM);
}

fn assert_clean_exit_on(signal: libc::c_int) {
    let topology = HostRoleTopology::new(MAC_A);
    let bpffs = BpffsMount::new();
    let mut flowguard = start_host_role(&topology, &bpffs, "fix");

    // Control: while running, both checks see the programs.
    let device = format!("{HOST_PARENT}(");
    let (link, net) = attachments(&topology.host);
    assert!(
        link.contains("xdp"),
        "XDP must be attached while running:\n{link}"
    );
    assert!(
        net.contains(&device),
        "bpftool must list {HOST_PARENT} while running:\n{net}"
    );
    assert!(
        bpffs.pin_dir().is_dir(),
        "the pin directory must exist while running"
    );

    let exit = flowguard.stop_with(signal);
    assert!(
        exit.success(),
        "flowguard must exit 0 on signal {signal}, got {exit}"
    );

    let (link, net) = attachments(&topology.host);
    assert!(
        !link.contains("xdp") && !link.contains("prog/"),
        "XDP still attached after exit:\n{link}"
    );
    assert!(
        !net.contains(&device),
        "programs still attached after exit:\n{net}"
    );
    assert!(
        !bpffs.pin_dir().exists(),
        "pin directory {} still exists after exit",
        bpffs.pin_dir().display()
    );
}

/// The meaningful lines of an error report: clap's "For more information"
/// hint is boilerplate, not part of the error.
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
        .collect()
}

/// Runs flowguard with `args` in a namespace with an eth0 (a veth) and asserts
/// it refuses: non-zero exit, one line on stderr naming `culprit`, and no
/// pin directory.
fn assert_rejected(args: &[&str], culprit: &str) {
    let host = Netns::new("host");
    host.ip(&[
        "link",
        "add",
        HOST_PARENT,
        "type",
        "veth",
        "peer",
        "name",
        "peer0",
    ]);
    host.ip(&["link", "set", HOST_PARENT, "up"]);
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let mut flowguard = Flowguard::spawn(&require_flowguard_bin(), &host, &pin_dir, args, false);

    let Some(exit) = flowguard.wait_exit(REJECT_TIMEOUT) else {
        panic!(
            "flowguard {args:?} kept running instead of refusing; stdout: {:?}",
            flowguard.stdout_lines()
        );
    };
    let stderr = flowguard.stderr_text();
    assert!(
        !exit.success(),
        "flowguard {args:?} must fail, exited with {exit}"
    );
    let lines = error_lines(&stderr);
    assert_eq!(
        lines.len(),
        1,
        "flowguard {args:?}: want one error line, got:\n{stderr}"
    );
    assert!(
        lines[0].contains(culprit),
        "flowguard {args:?}: the error must name {culprit:?}: {}",
        lines[0]
    );
    assert_pin_dir_absent(&pin_dir);
}

fn assert_pin_dir_absent(pin_dir: &Path) {
    assert!(
        !pin_dir.exists(),
        "a refused run must not create {}",
        pin_dir.display()
    );
}

#[test]
fn bad_input_is_refused_with_one_line() {
    skip_unless_host_role_supported!();
    assert_rejected(&["--ingress", "nosuch0", "--prefix", LAN_PREFIX], "nosuch0");
    assert_rejected(
        &["--ingress", HOST_PARENT, "--prefix", "192.168.1.0/33"],
        "192.168.1.0/33",
    );
    assert_rejected(
        &[
            "--ingress",
            HOST_PARENT,
            "--prefix",
            LAN_PREFIX,
            "--static",
            "192.168.1.240=02:42:c0:a8:01:zz",
        ],
        "02:42:c0:a8:01:zz",
    );
}
