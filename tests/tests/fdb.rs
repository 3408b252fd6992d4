//! The bridge FDB as flowguard follows it: a real bridge with two ports,
//! each the veth of a host namespace; a MAC that moves from behind one
//! port to behind the other (Wi-Fi roaming, a moved cable), an entry that
//! is deleted and one that ages out. Then the whole path: flowguard in the
//! router role sees the endpoint's move and evicts its conntrack entries
//! (inserted over ctnetlink: this kernel has no nf_flow_table, so none can
//! be offloaded; the VM lab has the real `[OFFLOAD]` entries).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use flowguard_tests::flowguard_proc::Flowguard;
use flowguard_tests::netns::{BpffsMount, Netns};
use flowguard_tests::{require_root, skip_unless_root};
use flowguard_user::conntrack::{Conntrack, Flow, Tuple};
use flowguard_user::endpoints::PortFact;
use flowguard_user::fdb::FdbSource;
use flowguard_user::settings::Mac;

const LIMIT: Duration = Duration::from_secs(10);
const ENDPOINT: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 240);
const MAC: &str = "02:42:c0:a8:4d:f0";
const OTHER_MAC: &str = "02:42:c0:a8:4d:01";

/// br-lan with ports lan1 and lan2, each the veth of a host namespace
/// (`h1`, `h2`, interface `eth0`); the router has 192.168.77.1 on br-lan.
struct Roam {
    h1: Netns,
    h2: Netns,
    router: Netns,
}

impl Roam {
    fn new() -> Self {
        let router = Netns::new("roam-router");
        let h1 = Netns::new("roam-h1");
        let h2 = Netns::new("roam-h2");
        router.ip(&["link", "add", "br-lan", "type", "bridge"]);
        router.ip(&["addr", "add", "192.168.77.1/24", "dev", "br-lan"]);
        router.ip(&["link", "set", "br-lan", "up"]);
        for (port, h) in [("lan1", &h1), ("lan2", &h2)] {
            router.ip(&[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                h.name(),
            ]);
            router.ip(&["link", "set", port, "master", "br-lan"]);
            router.ip(&["link", "set", port, "up"]);
            h.ip(&["link", "set", "eth0", "up"]);
        }
        Self { h1, h2, router }
    }

    /// `h` takes the endpoint's IP and MAC and announces itself (a
    /// gratuitous ARP, as an association makes the bridge learn a station);
    /// the other host gives them up.
    fn endpoint_behind(&self, h: &Netns, other: &Netns) {
        other.ip(&["addr", "flush", "dev", "eth0"]);
        other.ip(&["link", "set", "eth0", "address", OTHER_MAC]);
        h.ip(&["link", "set", "eth0", "address", MAC]);
        h.ip(&["addr", "replace", &format!("{ENDPOINT}/24"), "dev", "eth0"]);
        let _ = h.try_exec(&["arping", "-U", "-c1", "-I", "eth0", &ENDPOINT.to_string()]);
    }

    fn port_index(&self, port: &str) -> u32 {
        self.router
            .enter(|| flowguard_user::sys::ifindex(port).expect(port))
    }
}

fn mac() -> Mac {
    MAC.parse().unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Follows the FDB until a fact about the endpoint's MAC satisfies `done`.
async fn until(src: &mut FdbSource, what: &str, done: impl Fn(&PortFact) -> bool) -> PortFact {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let facts = tokio::time::timeout_at(deadline, src.next_facts())
            .await
            .unwrap_or_else(|_| panic!("no bridge FDB fact: {what} within {LIMIT:?}"))
            .expect("reading the FDB");
        if let Some(f) = facts.into_iter().find(|f| f.mac == mac() && done(f)) {
            return f;
        }
    }
}

#[test]
fn the_fdb_follower_sees_a_mac_move_between_ports_its_deletion_and_its_ageing() {
    require_root!("namespaces, a bridge, rtnetlink");
    let roam = Roam::new();
    let (lan1, lan2) = (roam.port_index("lan1"), roam.port_index("lan2"));
    roam.endpoint_behind(&roam.h1, &roam.h2);
    roam.router.enter(|| {
        runtime().block_on(async {
            let (mut src, first) = FdbSource::open(vec!["lan1".into(), "lan2".into()])
                .await
                .expect("following the FDB");
            let br = flowguard_user::sys::ifindex("br-lan").expect("br-lan");
            assert_eq!(src.bridges().iter().copied().collect::<Vec<_>>(), vec![br]);
            // The dump places the endpoint behind lan1; the bridge's own
            // (local) MACs are not followed.
            let at = first
                .iter()
                .find(|f| f.mac == mac())
                .expect("the endpoint in the dump");
            assert_eq!(at.place.map(|p| (p.bridge, p.port)), Some((br, lan1)));
            assert!(first
                .iter()
                .all(|f| f.place.is_some_and(|p| p.port == lan1 || p.port == lan2)));
            // It moves behind lan2, keeping its IP and MAC.
            roam.endpoint_behind(&roam.h2, &roam.h1);
            until(&mut src, "the MAC behind lan2", |f| {
                f.place.is_some_and(|p| p.port == lan2 && p.bridge == br)
            })
            .await;
            // Deleted by hand: it left lan2.
            roam.router
                .exec(&["bridge", "fdb", "del", MAC, "dev", "lan2", "master"]);
            let gone = until(&mut src, "the deletion", |f| f.place.is_none()).await;
            assert_eq!(gone.port, lan2);
            // Learned again, then aged out (ageing time 1 s).
            roam.router.ip(&[
                "link",
                "set",
                "br-lan",
                "type",
                "bridge",
                "ageing_time",
                "100",
            ]);
            let _ = roam
                .h2
                .try_exec(&["arping", "-U", "-c1", "-I", "eth0", &ENDPOINT.to_string()]);
            until(&mut src, "learned again behind lan2", |f| {
                f.place.is_some_and(|p| p.port == lan2)
            })
            .await;
            let aged = until(&mut src, "the entry aged out", |f| f.place.is_none()).await;
            assert_eq!(aged.port, lan2);
            // A whole dump agrees: it is nowhere now.
            let all = src.dump().await.expect("dump");
            assert!(all.iter().all(|f| f.mac != mac()), "{all:?}");
        })
    });
}

#[test]
fn the_fdb_follower_follows_ports_and_bridges_that_come_later() {
    require_root!("namespaces, a bridge, rtnetlink");
    let roam = Roam::new();
    roam.router.enter(|| {
        runtime().block_on(async {
            let (mut src, _) = FdbSource::open(vec!["lan1".into()])
                .await
                .expect("following the FDB");
            let ports = |src: &FdbSource| -> Vec<u32> {
                src.bridge_ports().iter().map(|(p, _)| *p).collect()
            };
            let (lan1, lan2) = (roam.port_index("lan1"), roam.port_index("lan2"));
            assert_eq!(ports(&src), vec![lan1, lan2]);
            // A third port joins br-lan: its local entry asks for a dump,
            // whose facts are all the FDB says, and which lists the port.
            roam.router.ip(&[
                "link", "add", "lan3", "type", "veth", "peer", "name", "peer3",
            ]);
            roam.router.ip(&["link", "set", "lan3", "master", "br-lan"]);
            let lan3 = roam.port_index("lan3");
            let deadline = tokio::time::Instant::now() + LIMIT;
            while !ports(&src).contains(&lan3) {
                tokio::time::timeout_at(deadline, src.next_facts())
                    .await
                    .expect("a dump for the new port within the limit")
                    .expect("reading the FDB");
            }
            assert!(src.dumped, "the new port came with a whole dump");
            // A port of another bridge, guarded later (--auto): that bridge
            // is followed from the next dump.
            roam.router
                .ip(&["link", "add", "br-guest", "type", "bridge"]);
            roam.router.ip(&[
                "link", "add", "guest1", "type", "veth", "peer", "name", "peerg",
            ]);
            roam.router
                .ip(&["link", "set", "guest1", "master", "br-guest"]);
            let guest = flowguard_user::sys::ifindex("br-guest").expect("br-guest");
            src.dump().await.expect("dump");
            assert!(!src.bridges().contains(&guest), "not guarded yet");
            src.set_ports(vec!["lan1".into(), "guest1".into()]);
            src.dump().await.expect("dump");
            assert!(src.bridges().contains(&guest), "{:?}", src.bridges());
            assert!(ports(&src).contains(&roam.port_index("guest1")));
        })
    });
}

#[test]
fn a_move_to_another_bridge_port_evicts_the_endpoints_conntrack_entries() {
    skip_unless_root!();
    let roam = Roam::new();
    roam.endpoint_behind(&roam.h1, &roam.h2);
    // The router knows the endpoint (a neighbour entry), and has entries of
    // its flows and of a bystander's.
    let _ = roam
        .router
        .try_exec(&["ping", "-c1", "-W1", &ENDPOINT.to_string()]);
    let (moved, bystander) = (
        IpAddr::V4(ENDPOINT),
        IpAddr::V4(Ipv4Addr::new(192, 168, 77, 9)),
    );
    let wan = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    let flows = [
        Flow::unnatted(Tuple::udp(wan, 51820, moved, 51820)),
        Flow::unnatted(Tuple::tcp(moved, 40000, wan, 443)),
        Flow::unnatted(Tuple::udp(wan, 51821, bystander, 51821)),
    ];
    roam.router.enter(|| {
        let mut ct = Conntrack::open().expect("ctnetlink in the router namespace");
        for f in &flows {
            ct.insert(f, 300)
                .unwrap_or_else(|e| panic!("inserting {}: {e}", f.describe()));
        }
    });
    let bpffs = BpffsMount::new();
    let flowguard = Flowguard::start(
        &roam.router,
        &bpffs.pin_dir(),
        &[
            "--egress",
            "lan1",
            "--egress",
            "lan2",
            "--prefix",
            "192.168.77.0/24",
            "--evict",
            "all",
            "--probe",
            "off",
        ],
    );
    flowguard.wait_for_status("the endpoint from the neighbour table", LIMIT, |s| {
        s.has_endpoint(&ENDPOINT.to_string(), MAC)
    });
    flowguard
        .wait_for_line(LIMIT, |l| l.contains("following the bridge FDB of br-lan"))
        .unwrap_or_else(|| panic!("no FDB line: {:#?}", flowguard.stdout_lines()));
    let before = flowguard.status();
    assert_eq!(before.counters.evicted, 0, "{:?}", before.counters);

    // The endpoint moves behind lan2, keeping its IP and MAC.
    roam.endpoint_behind(&roam.h2, &roam.h1);
    let status = flowguard.wait_for_status("the move evicted", LIMIT, |s| {
        s.counters.port_moves >= 1 && s.counters.evicted >= 2
    });
    assert_eq!(status.counters.evicted, 2, "{:?}", status.counters);
    assert_eq!(status.counters.port_flaps, 0, "{:?}", status.counters);
    let said = flowguard.wait_for_line(LIMIT, |l| {
        l.starts_with(&format!("{ENDPOINT} ({MAC}) moved from lan1 to lan2"))
    });
    assert!(said.is_some(), "{:#?}", flowguard.stdout_lines());
    let evicted = flowguard.wait_for_line(LIMIT, |l| {
        l.contains(": evicted flow") && l.contains("because it moved from port lan1 to lan2")
    });
    assert!(evicted.is_some(), "{:#?}", flowguard.stdout_lines());
    let left = roam.router.enter(|| {
        let mut ct = Conntrack::open().expect("ctnetlink");
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
    // The endpoint's MAC did not change: nothing else moved.
    let s = flowguard.status();
    assert!(
        s.has_endpoint(&ENDPOINT.to_string(), MAC),
        "{:#?}",
        s.endpoints
    );
    assert_eq!(s.counters.neigh_moved, 0, "{:?}", s.counters);
}

const ENDPOINT6: &str = "fd77::f0";
const UDP_PORT: u16 = 41641;

/// Sends `frame` out of `port` of the router as it is (an AF_PACKET raw
/// socket): the way a flowtable's direct transmit sends an offloaded flow
/// out of the port it cached, bypassing the bridge.
fn send_out_of(router: &Netns, port: &str, frame: &[u8]) {
    router.enter(|| {
        let index = flowguard_user::sys::ifindex(port).expect(port);
        // SAFETY: plain socket calls on a socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = index as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(n, frame.len() as isize, "sending on {port}: {err}");
        }
    });
}

/// UDP sockets of the endpoint on `h` (IPv4 and IPv6), to see what reaches it.
fn endpoint_sockets(h: &Netns) -> (std::net::UdpSocket, std::net::UdpSocket) {
    h.enter(|| {
        let v4 = std::net::UdpSocket::bind((ENDPOINT, UDP_PORT)).expect("binding IPv4");
        let v6 =
            std::net::UdpSocket::bind((ENDPOINT6.parse::<std::net::Ipv6Addr>().unwrap(), UDP_PORT))
                .expect("binding IPv6");
        for s in [&v4, &v6] {
            s.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
        }
        (v4, v6)
    })
}

/// What the socket received, if anything, within its timeout.
fn received(s: &std::net::UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

#[test]
fn a_routed_frame_out_of_the_endpoints_old_port_is_redirected_to_its_new_one() {
    skip_unless_root!();
    use flowguard_tests::frames::{udp4, udp6, L2};
    let roam = Roam::new();
    roam.endpoint_behind(&roam.h1, &roam.h2);
    roam.router
        .ip(&["addr", "add", "fd77::1/64", "dev", "br-lan", "nodad"]);
    let bridge_mac: Mac = roam
        .router
        .enter(|| flowguard_user::sys::if_mac("br-lan"))
        .expect("br-lan's MAC");
    let mac = mac();
    let ep6: std::net::Ipv6Addr = ENDPOINT6.parse().unwrap();
    // What a flowtable that cached lan1 sends after the move: routed (the
    // bridge's MAC as source), to the endpoint's MAC, out of lan1.
    let stale4 = udp4(
        L2::new(mac.0, bridge_mac.0),
        [10, 0, 0, 7],
        ENDPOINT.octets(),
        51820,
        UDP_PORT,
        b"offloaded v4",
    );
    let stale6 = udp6(
        L2::new(mac.0, bridge_mac.0),
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
        ep6.octets(),
        51820,
        UDP_PORT,
        b"offloaded v6",
    );
    // A LAN host's frame to the endpoint, bridged out of lan1: never redirected.
    let bridged = udp4(
        L2::new(mac.0, [0x02, 0x42, 0xc0, 0xa8, 0x4d, 0x33]),
        [192, 168, 77, 33],
        ENDPOINT.octets(),
        40000,
        UDP_PORT,
        b"bridged",
    );

    let bpffs = BpffsMount::new();
    let flowguard = Flowguard::start(
        &roam.router,
        &bpffs.pin_dir(),
        &[
            "--egress",
            "lan1",
            "--egress",
            "lan2",
            "--prefix",
            "192.168.77.0/24",
            "--prefix",
            "fd77::/64",
            "--static",
            &format!("{ENDPOINT6}={MAC}"),
            "--evict",
            "all",
            "--probe",
            "off",
        ],
    );
    let _ = roam
        .router
        .try_exec(&["ping", "-c1", "-W1", &ENDPOINT.to_string()]);
    flowguard.wait_for_status("the endpoint behind lan1", LIMIT, |s| {
        s.has_endpoint(&ENDPOINT.to_string(), MAC)
            && s.endpoint(&ENDPOINT.to_string())
                .is_some_and(|e| e.port.as_deref() == Some("lan1"))
    });

    // The endpoint moves behind lan2, keeping its IP and MAC; both of its
    // addresses follow the MAC's port.
    roam.endpoint_behind(&roam.h2, &roam.h1);
    roam.h2.ip(&[
        "addr",
        "replace",
        &format!("{ENDPOINT6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let (v4, v6) = endpoint_sockets(&roam.h2);
    flowguard.wait_for_status("both addresses behind lan2", LIMIT, |s| {
        [ENDPOINT.to_string(), ENDPOINT6.to_string()]
            .iter()
            .all(|ip| {
                s.endpoint(ip)
                    .is_some_and(|e| e.port.as_deref() == Some("lan2"))
            })
    });
    let before = flowguard.status().counters;
    send_out_of(&roam.router, "lan1", &bridged);
    assert_eq!(
        received(&v4),
        None,
        "a bridged frame must not be redirected"
    );
    send_out_of(&roam.router, "lan1", &stale4);
    assert_eq!(
        received(&v4).as_deref(),
        Some(&b"offloaded v4"[..]),
        "IPv4 redirected to lan2"
    );
    send_out_of(&roam.router, "lan1", &stale6);
    assert_eq!(
        received(&v6).as_deref(),
        Some(&b"offloaded v6"[..]),
        "IPv6 redirected to lan2"
    );
    let s = flowguard.status();
    assert_eq!(
        s.counters.redirected - before.redirected,
        2,
        "{:?}",
        s.counters
    );
    assert_eq!(
        s.counters.wrong_port - before.wrong_port,
        3,
        "{:?}",
        s.counters
    );
    let e = s.endpoint(&ENDPOINT.to_string()).expect("the endpoint");
    assert!(e.wrong_port >= 2, "{e:?}");

    // Observe mode is the control: the same frame out of lan1 stays there.
    drop(flowguard);
    let bpffs = BpffsMount::new();
    let observer = Flowguard::start(
        &roam.router,
        &bpffs.pin_dir(),
        &[
            "--mode",
            "observe",
            "--egress",
            "lan1",
            "--egress",
            "lan2",
            "--prefix",
            "192.168.77.0/24",
            "--evict",
            "off",
            "--probe",
            "off",
        ],
    );
    let _ = roam
        .router
        .try_exec(&["ping", "-c1", "-W1", &ENDPOINT.to_string()]);
    observer.wait_for_status("the endpoint behind lan2", LIMIT, |s| {
        s.endpoint(&ENDPOINT.to_string())
            .is_some_and(|e| e.port.as_deref() == Some("lan2"))
    });
    send_out_of(&roam.router, "lan1", &stale4);
    assert_eq!(received(&v4), None, "observe mode never redirects");
    let c = observer.status().counters;
    assert_eq!((c.wrong_port, c.redirected), (1, 0), "{c:?}");
}
