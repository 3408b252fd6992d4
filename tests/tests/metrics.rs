//! `flowguard run --metrics ADDR`: the real binary serves the Prometheus text
//! format on the loopback of its own network namespace, its counters follow
//! a stale burst, only `GET /metrics` is answered, a silent client holds up
//! nobody, and a non-loopback address or a port in use is refused in one line
//! before anything is attached.
//!
//! The listener lives on the namespace's loopback, so every request is made
//! from a socket created inside the namespace (`Netns::enter`). Tests that
//! need root print `skipped: <reason>` and return otherwise.
//!
//! Run: `cargo test -p flowguard-tests --release --test metrics -- --test-threads=1`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use flowguard_tests::flowguard_proc::{require_flowguard_bin, Flowguard};
use flowguard_tests::netns::{BpffsMount, Netns};
use flowguard_tests::topology::{
    HostRoleTopology, CONTAINER_IP, HOST_PARENT, LAN_PREFIX, MAC_A, MAC_B,
};
use flowguard_tests::wait::{Text, Wait};
use flowguard_tests::{require_root, skip_unless_host_role_supported, skip_unless_root};

/// Where flowguard serves; each test has a namespace of its own.
const ADDR: &str = "127.0.0.1:9737";
/// Datagrams per burst.
const N: usize = 20;
/// Bound on the counters following the traffic.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one HTTP exchange.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Every family `/metrics` must have, with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("flowguard_checked_total", "counter"),
    ("flowguard_stale_total", "counter"),
    ("flowguard_rewritten_total", "counter"),
    ("flowguard_ambiguous_total", "counter"),
    ("flowguard_unconfirmed_total", "counter"),
    ("flowguard_events_total", "counter"),
    ("flowguard_events_lost_total", "counter"),
    ("flowguard_learned_new_total", "counter"),
    ("flowguard_learned_moved_total", "counter"),
    ("flowguard_learn_failed_total", "counter"),
    ("flowguard_neigh_added_total", "counter"),
    ("flowguard_neigh_moved_total", "counter"),
    ("flowguard_neigh_removed_total", "counter"),
    ("flowguard_neigh_ambiguous_total", "counter"),
    ("flowguard_neigh_overflows_total", "counter"),
    ("flowguard_reconciles_total", "counter"),
    ("flowguard_eviction_runs_total", "counter"),
    ("flowguard_evicted_total", "counter"),
    ("flowguard_dry_run_matches_total", "counter"),
    ("flowguard_eviction_errors_total", "counter"),
    ("flowguard_endpoints", "gauge"),
    ("flowguard_endpoint_stale_packets_total", "counter"),
    ("flowguard_endpoint_rewritten_total", "counter"),
];

/// One HTTP response: status code, head, body.
struct Response {
    code: u16,
    head: String,
    body: String,
}

/// Opens a TCP connection to `addr` from inside `ns`.
fn connect(ns: &Netns, addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().expect("socket address");
    let stream = ns
        .enter(|| TcpStream::connect_timeout(&addr, HTTP_TIMEOUT))
        .unwrap_or_else(|error| panic!("cannot connect to {addr} in {}: {error}", ns.name()));
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(HTTP_TIMEOUT)).unwrap();
    stream
}

/// Sends `request` as is and reads the response until the server closes.
fn exchange(ns: &Netns, request: &[u8]) -> Response {
    let mut stream = connect(ns, ADDR);
    stream.write_all(request).expect("send the request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .expect("read the response (the server closes the connection)");
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    Response {
        code,
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn get(ns: &Netns, path: &str) -> Response {
    exchange(
        ns,
        format!("GET {path} HTTP/1.1\r\nHost: {ADDR}\r\nUser-Agent: flowguard-tests\r\n\r\n")
            .as_bytes(),
    )
}

/// `GET /metrics`, which must answer 200 in the Prometheus text format.
fn scrape(ns: &Netns) -> String {
    let r = get(ns, "/metrics");
    assert_eq!(r.code, 200, "{}\n\n{}", r.head, r.body);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        r.head
    );
    r.body
}

/// The value of the sample whose series (name and labels) is `series`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(s, _)| *s == series)
        .map(|(_, v)| {
            v.parse()
                .unwrap_or_else(|_| panic!("bad value in {series} {v}"))
        })
}

fn assert_families(text: &str) {
    for (name, kind) in FAMILIES {
        let help = format!("# HELP {name} ");
        let type_line = format!("# TYPE {name} {kind}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with(&help)).count(),
            1,
            "one HELP for {name}:\n{text}"
        );
        assert_eq!(
            text.lines().filter(|l| *l == type_line).count(),
            1,
            "one `{type_line}`:\n{text}"
        );
    }
}

/// Scrapes until `wanted` holds, for up to [`SETTLE_TIMEOUT`].
fn scrape_until(ns: &Netns, what: &str, wanted: impl Fn(&str) -> bool) -> String {
    let Text(text) = Wait::new(what, SETTLE_TIMEOUT)
        .every(Duration::from_millis(100))
        .until(|| Text(scrape(ns)), |Text(text)| wanted(text));
    text
}

#[test]
fn metrics_follow_a_stale_burst_in_the_host_role() {
    skip_unless_host_role_supported!();
    // The container was recreated with MAC B; the router keeps sending to A.
    let mut topology = HostRoleTopology::new(MAC_A);
    assert_eq!(topology.deliver(N), N, "the flow works before the change");
    topology.recreate_container(MAC_B);
    topology.set_stale(MAC_A);

    let bpffs = BpffsMount::new();
    let flowguard = Flowguard::start(
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
            "--metrics",
            ADDR,
            // Learning is under test: the host's own children would name the MAC first.
            "--no-children",
        ],
    );
    let url = format!("http://{ADDR}/metrics");
    assert!(
        flowguard.stdout_lines().iter().any(|l| l.contains(&url)),
        "the URL is logged at start: {:?}",
        flowguard.stdout_lines()
    );

    let before = scrape(&topology.host);
    assert_families(&before);
    let stale_before = value(&before, "flowguard_stale_total").expect("stale counter");
    assert_eq!(
        value(&before, "flowguard_endpoints{source=\"learned\"}"),
        Some(0.0),
        "{before}"
    );

    topology.container_first_frame();
    let ip = CONTAINER_IP.to_string();
    let series = |name: &str| format!("{name}{{ip=\"{ip}\",mac=\"{MAC_B}\"}}");
    scrape_until(&topology.host, "the container to be learned", |t| {
        value(t, &series("flowguard_endpoint_stale_packets_total")).is_some()
    });

    assert_eq!(topology.deliver(N), N, "flowguard delivers the stale burst");
    let after = scrape_until(&topology.host, "the stale burst to be counted", |t| {
        value(t, "flowguard_stale_total").is_some_and(|v| v >= stale_before + N as f64)
    });
    assert_families(&after);
    let at_least = |name: &str, min: f64| {
        let v = value(&after, name).unwrap_or_else(|| panic!("no {name}:\n{after}"));
        assert!(v >= min, "{name} = {v}, want at least {min}:\n{after}");
    };
    at_least("flowguard_rewritten_total", N as f64);
    at_least("flowguard_checked_total", N as f64);
    at_least("flowguard_learned_new_total", 1.0);
    at_least(&series("flowguard_endpoint_stale_packets_total"), N as f64);
    at_least(&series("flowguard_endpoint_rewritten_total"), N as f64);
    assert_eq!(
        value(&after, "flowguard_endpoints{source=\"learned\"}"),
        Some(1.0),
        "{after}"
    );

    // The same numbers as `flowguard status`, which reads the same maps.
    let status = flowguard.status();
    assert!(
        value(&after, "flowguard_stale_total").unwrap() <= status.counters.stale as f64,
        "metrics never run ahead of the maps: {:?}",
        status.counters
    );
}

/// A namespace with an interface `lan1` that is up, and flowguard guarding
/// it with metrics on [`ADDR`].
fn guarded_namespace(bpffs: &BpffsMount) -> (Netns, Flowguard) {
    let ns = Netns::new("metrics");
    ns.ip(&[
        "link", "add", "lan1", "type", "veth", "peer", "name", "peer1",
    ]);
    ns.ip(&["link", "set", "lan1", "up"]);
    let flowguard = Flowguard::start(
        &ns,
        &bpffs.pin_dir(),
        &[
            "--egress",
            "lan1",
            "--prefix",
            "192.168.1.0/24",
            "--static",
            "192.168.1.9=02:00:00:00:00:09",
            "--no-neigh",
            "--evict",
            "off",
            "--metrics",
            ADDR,
        ],
    );
    (ns, flowguard)
}

#[test]
fn only_get_metrics_is_served_and_a_silent_client_holds_up_nobody() {
    skip_unless_root!();
    let bpffs = BpffsMount::new();
    let (ns, mut flowguard) = guarded_namespace(&bpffs);

    // Connected, and says nothing: its own task times out, nobody waits.
    let silent = connect(&ns, ADDR);
    let half = connect(&ns, ADDR);
    (&half).write_all(b"GET /metr").unwrap();

    let started = Instant::now();
    let text = scrape(&ns);
    assert!(
        started.elapsed() < HTTP_TIMEOUT,
        "a scrape beside silent clients took {:?}",
        started.elapsed()
    );
    assert_families(&text);
    assert_eq!(
        value(&text, "flowguard_endpoints{source=\"static\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "flowguard_endpoint_stale_packets_total{ip=\"192.168.1.9\",mac=\"02:00:00:00:00:09\"}"
        ),
        Some(0.0),
        "{text}"
    );

    let not_found = get(&ns, "/");
    assert_eq!(not_found.code, 404, "{}", not_found.head);
    assert_eq!(get(&ns, "/metrics/extra").code, 404);
    let post = exchange(&ns, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(post.code, 405, "{}", post.head);
    assert!(post.head.contains("Allow: GET"), "{}", post.head);
    assert_eq!(exchange(&ns, b"\x16\x03\x01garbage\r\n\r\n").code, 400);
    let huge = format!("GET /{} HTTP/1.1\r\n", "a".repeat(64 * 1024));
    assert_eq!(
        exchange(&ns, huge.as_bytes()).code,
        400,
        "an oversized head"
    );
    let head = exchange(&ns, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!((head.code, head.body.as_str()), (200, ""));

    // The agent kept running throughout: it still answers and stops cleanly.
    assert_eq!(flowguard.status().mode, "fix");
    drop((silent, half));
    assert!(flowguard.stop().success());
    assert!(!is_listening(&ns), "the listener is gone with flowguard");
}

/// Whether something still listens on [`ADDR`] inside `ns`.
fn is_listening(ns: &Netns) -> bool {
    let addr: SocketAddr = ADDR.parse().unwrap();
    ns.enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
}

/// The lines of stderr, which must be exactly one.
fn one_error_line(out: &Output) -> String {
    assert!(!out.status.success(), "must fail, exited {}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one error line, got:\n{stderr}");
    lines[0].to_string()
}

#[test]
fn a_non_loopback_address_is_refused_in_one_line() {
    // Refused before anything else is looked at: no root needed. The pin
    // directory is a fresh path, so nothing would be touched anyway.
    let bin = require_flowguard_bin();
    let pin_dir = std::env::temp_dir().join(format!("flowguard-metrics-{}", std::process::id()));
    for addr in ["0.0.0.0:9737", "[::]:9737", "192.0.2.1:9737"] {
        let out = Command::new(&bin)
            .args([
                "run",
                "--egress",
                "fg-missing0",
                "--prefix",
                "192.168.1.0/24",
            ])
            .args(["--metrics", addr, "--pin-dir"])
            .arg(&pin_dir)
            .output()
            .expect("run flowguard");
        let line = one_error_line(&out);
        assert!(
            line.contains("not a loopback address") && line.contains("--metrics-allow-remote"),
            "{line}"
        );
        assert!(!pin_dir.exists());
    }
    let out = Command::new(&bin)
        .args([
            "run",
            "--egress",
            "fg-missing0",
            "--prefix",
            "192.168.1.0/24",
        ])
        .args(["--metrics-allow-remote", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .expect("run flowguard");
    let line = one_error_line(&out);
    assert!(line.contains("needs --metrics"), "{line}");
}

#[test]
fn a_port_in_use_is_refused_before_anything_is_attached() {
    require_root!("namespaces, bpffs, BPF");
    let ns = Netns::new("metrics-busy");
    ns.ip(&[
        "link", "add", "lan1", "type", "veth", "peer", "name", "peer1",
    ]);
    ns.ip(&["link", "set", "lan1", "up"]);
    let busy = ns
        .enter(|| TcpListener::bind(ADDR))
        .unwrap_or_else(|e| panic!("bind {ADDR} in the namespace: {e}"));
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();

    let out = ns.nsenter(
        &require_flowguard_bin().to_string_lossy(),
        &[
            "run",
            "--egress",
            "lan1",
            "--prefix",
            "192.168.1.0/24",
            "--metrics",
            ADDR,
            "--pin-dir",
            &pin_dir.to_string_lossy(),
        ],
    );
    let line = one_error_line(&out);
    assert!(
        line.contains(&format!("cannot serve metrics on {ADDR}")) && line.contains("in use"),
        "{line}"
    );
    assert!(!Path::new(&pin_dir).exists(), "nothing pinned");
    let links = ns.nsenter("bpftool", &["net", "show"]);
    let text = String::from_utf8_lossy(&links.stdout);
    assert!(!text.contains("flowguard"), "nothing attached: {text}");
    drop(busy);
}
