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
