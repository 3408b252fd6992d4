//! The neighbour source against the real kernel: a router namespace with a
//! bridge `br-lan` (192.168.1.1/24, fd00:1::1/64) and endpoints behind veth
//! ports. The router's neighbour table is filled by real ARP and neighbour
//! discovery, or by `ip neigh`, and followed by `flowguard_user::neigh`
//! (NeighbourSource → NeighCache → facts → EndpointTable) into the ENDPOINTS map
//! of the real eBPF object, loaded but not attached.
//!
//! Needs root; without it each test prints `skipped: ...` and returns. The
//! object comes from `$FLOWGUARD_EBPF_OBJ` or the workspace's eBPF build.
//! Waits are bounded; nothing asserts on timing.
//!
//! Run: `cargo test -p flowguard-tests --release --test neigh -- --test-threads=1`

use std::{
    collections::BTreeMap,
    net::{IpAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    Ebpf,
};
use flowguard_common::{endpoint_flags, map_names, source, Endpoint, EndpointKey};
use flowguard_tests::{netns::Netns, progs::object_path, require_root, wait::Wait};
use flowguard_user::{
    endpoints::{Change as MapChange, EndpointTable, Origin},
    neigh::{all_facts, facts, Desired, NeighCache, NeighEvent, NeighbourSource, SourceOptions},
    settings::{endpoint_key, key_ip, Mac, Prefix},
};

const BRIDGE: &str = "br-lan";
const BRIDGE_MAC: &str = "02:00:00:00:00:01";
const LIMIT: Duration = Duration::from_secs(30);

const M1: Mac = Mac([0x02, 0x42, 0xc0, 0xa8, 0x01, 0xf0]);
const M2: Mac = Mac([0x02, 0x42, 0xc0, 0xa8, 0x01, 0xf1]);
const M3: Mac = Mac([0x02, 0x42, 0xc0, 0xa8, 0x01, 0xf2]);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn prefixes() -> Vec<Prefix> {
    vec![
        "192.168.0.0/16".parse().unwrap(),
        "fd00:1::/64".parse().unwrap(),
    ]
}

/// What the tests here need root for.
const ROOT_FOR: &str = "network namespaces, eBPF maps";

/// The router namespace: `br-lan` up with a fixed MAC and its addresses.
fn router() -> Netns {
    let r = Netns::new("router");
    r.ip(&[
        "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
    ]);
    r.ip(&["addr", "add", "192.168.1.1/24", "dev", BRIDGE]);
    r.ip(&["-6", "addr", "add", "fd00:1::1/64", "dev", BRIDGE, "nodad"]);
    r.ip(&["link", "set", BRIDGE, "up"]);
    // A port that stays, as a router's other LAN ports do: without one the
    // bridge loses its carrier whenever the test's last endpoint goes, and
    // the kernel flushes the neighbour entries of a device without carrier.
    r.ip(&[
        "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p",
    ]);
    r.ip(&["link", "set", "lan0", "master", BRIDGE, "up"]);
    r.ip(&["link", "set", "lan0p", "up"]);
    r
}

/// An endpoint namespace at 192.168.1.240 / fd00:1::f0 with `mac`, plugged
/// into `br-lan` through the router's port `port`.
fn endpoint(router: &Netns, port: &str, mac: Mac) -> Netns {
    let ep = Netns::new("ep");
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
        ep.name(),
    ]);
    router.ip(&["link", "set", port, "master", BRIDGE, "up"]);
    ep.ip(&["link", "set", "eth0", "address", &mac.to_string()]);
    ep.ip(&["addr", "add", "192.168.1.240/24", "dev", "eth0"]);
    ep.ip(&["-6", "addr", "add", "fd00:1::f0/64", "dev", "eth0", "nodad"]);
    ep.ip(&["link", "set", "eth0", "up"]);
    ep
}

/// Sends one UDP datagram from `from` to `to` (discard port): the sender
/// resolves `to` with ARP or neighbour discovery, and the receiver learns
/// the sender's MAC from that request.
fn send_udp(from: &Netns, to: &str) {
    let to = ip(to);
    from.enter(|| {
        let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let s = UdpSocket::bind(any).expect("bind a UDP socket");
        s.send_to(b"flowguard neigh test", (to, 9))
            .unwrap_or_else(|e| panic!("send to {to}: {e}"));
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The usable entries of `dev` in the router's table, as `ip -j neigh` shows
/// them, inside the prefixes: IP → MAC.
fn kernel_table(router: &Netns, dev: &str) -> BTreeMap<IpAddr, Mac> {
    let out = router.ip(&["-j", "neigh", "show", "dev", dev]);
    let entries: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j neigh: {e}: {out}"));
    let mut table = BTreeMap::new();
    for e in entries.as_array().expect("a JSON array") {
        let dst = ip(e["dst"].as_str().expect("dst"));
        let Some(lladdr) = e["lladdr"].as_str() else {
            continue;
        };
        let states: Vec<&str> = e["state"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        let believed = states
            .iter()
            .any(|s| ["REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"].contains(s))
            && !states.iter().any(|s| ["INCOMPLETE", "FAILED"].contains(s));
        let mac: Mac = lladdr.parse().expect("a MAC");
        if believed && mac.is_unicast() && prefixes().iter().any(|p| p.contains(dst)) {
            table.insert(dst, mac);
        }
    }
    table
}

fn endpoints(ebpf: &mut Ebpf) -> BpfHashMap<&mut MapData, EndpointKey, Endpoint> {
    BpfHashMap::try_from(ebpf.map_mut(map_names::ENDPOINTS).expect("ENDPOINTS"))
        .expect("ENDPOINTS is a hash map")
}

/// What the tests drive: the source, the cache, and the object's map.
struct Follower {
    source: NeighbourSource,
    cache: NeighCache,
    /// The endpoint table, the map's only writer, with the neighbour
    /// table as its one source here.
    table: EndpointTable,
    ebpf: Ebpf,
    changes: Vec<MapChange>,
    overflows: usize,
    events: usize,
}

impl Follower {
    /// Must run on a thread inside the router namespace.
    async fn open(options: SourceOptions) -> Self {
        let path = object_path();
        let object = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "reading the eBPF object {} (build it first, or set FLOWGUARD_EBPF_OBJ): {e}",
                path.display()
            )
        });
        let ebpf = Ebpf::load(&object).expect("loading the object's maps");
        let (source, initial) = NeighbourSource::open_with(options)
            .await
            .expect("opening the neighbour source");
        let mut f = Self {
            source,
            cache: NeighCache::new(prefixes()),
            table: EndpointTable::new(flowguard_common::MAX_ENDPOINTS),
            ebpf,
            changes: Vec::new(),
            overflows: 0,
            events: 0,
        };
        f.cache.replace_all(initial);
        f.reconcile();
        f
    }

    fn reconcile(&mut self) -> Vec<MapChange> {
        let changes: Vec<MapChange> = self
            .table
            .reconcile(
                &mut endpoints(&mut self.ebpf),
                Origin::Neighbour,
                all_facts(&self.cache),
            )
            .expect("reconcile")
            .into_iter()
            .map(|u| u.change)
            .collect();
        self.changes.extend(&changes);
        changes
    }

    /// Dump, replace the cache, reconcile: what follows an overflow.
    async fn resync(&mut self) -> Vec<MapChange> {
        let entries = self.source.dump().await.expect("dump");
        self.cache.replace_all(entries);
        self.reconcile()
    }

    async fn handle(&mut self, ev: NeighEvent) {
        self.events += 1;
        if ev == NeighEvent::Overflow {
            self.overflows += 1;
            self.resync().await;
            return;
        }
        let mut map = endpoints(&mut self.ebpf);
        let ips = self.cache.apply(&ev);
        for u in self.table.apply(&mut map, facts(&self.cache, ips)) {
            self.changes.push(u.change);
        }
    }

    /// Follows events until `done` holds; panics after `LIMIT`.
    async fn follow_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let followed = Wait::new(what, LIMIT)
            .poll_async(self, |f| done(f), async |f, left| f.next_event(left).await)
            .await;
        if let Err(timed_out) = followed {
            panic!("{timed_out}; changes so far: {:?}", self.changes);
        }
    }

    /// Follows events until the cache equals `table` (the kernel's, read
    /// once the changes were made); panics after `LIMIT` with how they differ.
    async fn follow_until_table(&mut self, what: &str, table: &BTreeMap<IpAddr, Mac>) {
        let followed = Wait::new(what, LIMIT)
            .poll_async(
                self,
                |f| f.cache.ips().count() == table.len() && f.cache_table() == *table,
                async |f, left| f.next_event(left).await,
            )
            .await;
        if let Err(timed_out) = followed {
            panic!(
                "{timed_out}; cache vs kernel: {}",
                diff(&self.cache_table(), table)
            );
        }
    }

    /// Handles the next event, if one comes within `left`.
    async fn next_event(&mut self, left: Duration) {
        if let Ok(ev) = tokio::time::timeout(left, self.source.next_event()).await {
            self.handle(ev.expect("next_event")).await;
        }
    }

    fn entry(&mut self, ip: IpAddr) -> Option<Endpoint> {
        endpoints(&mut self.ebpf).get(&endpoint_key(ip), 0).ok()
    }

    fn put(&mut self, ip: IpAddr, value: Endpoint) {
        endpoints(&mut self.ebpf)
            .insert(endpoint_key(ip), value, 0)
            .expect("insert");
    }

    /// The cache's view: IP → MAC (no IP may be ambiguous here).
    fn cache_table(&self) -> BTreeMap<IpAddr, Mac> {
        self.cache
            .ips()
            .map(|ip| match self.cache.desired(ip) {
                Desired::Mac(m) => (ip, m),
                other => panic!("{ip} is {other:?} in the cache"),
            })
            .collect()
    }

    /// The map's `NEIGHBOUR` entries: IP → MAC.
    fn map_table(&mut self) -> BTreeMap<IpAddr, Mac> {
        endpoints(&mut self.ebpf)
            .iter()
            .map(|r| r.expect("iterating ENDPOINTS"))
            .filter(|(_, v)| v.source == source::NEIGHBOUR)
            .map(|(k, v)| (key_ip(&k), Mac(v.mac)))
            .collect()
    }
}

/// A short description of how two tables differ, for assertion messages.
fn diff(a: &BTreeMap<IpAddr, Mac>, b: &BTreeMap<IpAddr, Mac>) -> String {
    let only_a: Vec<_> = a
        .iter()
        .filter(|(k, v)| b.get(k) != Some(v))
        .take(5)
        .collect();
    let only_b: Vec<_> = b
        .iter()
        .filter(|(k, v)| a.get(k) != Some(v))
        .take(5)
        .collect();
    format!(
        "{} vs {} entries; first differences: {only_a:?} / {only_b:?}",
        a.len(),
        b.len()
    )
}

#[test]
fn mac_change_learned_by_real_arp_and_neighbour_discovery() {
    require_root!(ROOT_FOR);
    let v4 = ip("192.168.1.240");
    let v6 = ip("fd00:1::f0");
    let router = router();
    let mut first = Some(endpoint(&router, "lan1", M1));
    router.enter(|| {
        runtime().block_on(async {
            let mut f = Follower::open(SourceOptions::default()).await;
            assert_eq!(f.cache.desired(v4), Desired::Absent);

            // The router talks to the endpoint: ARP and NDP resolve it.
            send_udp(&router, "192.168.1.240");
            send_udp(&router, "fd00:1::f0");
            f.follow_until("entries for the first endpoint", |f| {
                f.cache.desired(v4) == Desired::Mac(M1) && f.cache.desired(v6) == Desired::Mac(M1)
            })
            .await;
            for ip in [v4, v6] {
                assert!(
                    f.changes.contains(&MapChange::Added { ip, mac: M1 }),
                    "{:?}",
                    f.changes
                );
                let e = f.entry(ip).expect("in the map");
                assert_eq!((Mac(e.mac), e.source, e.flags), (M1, source::NEIGHBOUR, 0));
            }
            // Evidence, as the kernel side would have gathered it.
            let mut e = f.entry(v4).unwrap();
            e.stale_packets = 5;
            e.last_stale_mac = M3.0;
            f.put(v4, e);

            // The endpoint is recreated with a new MAC and the same IPs
            // (`docker rm` + `docker run`), and talks to the router: the
            // router's entries follow its ARP request and its neighbour
            // solicitation, one RTM_NEWNEIGH each.
            drop(first.take());
            let second = endpoint(&router, "lan2", M2);
            send_udp(&second, "192.168.1.1");
            send_udp(&second, "fd00:1::1");
            f.follow_until("entries for the recreated endpoint", |f| {
                f.cache.desired(v4) == Desired::Mac(M2) && f.cache.desired(v6) == Desired::Mac(M2)
            })
            .await;
            for ip in [v4, v6] {
                assert!(
                    f.changes.contains(&MapChange::Moved {
                        ip,
                        old: M1,
                        new: M2
                    }),
                    "{:?}",
                    f.changes
                );
                let e = f.entry(ip).expect("in the map");
                assert_eq!((Mac(e.mac), e.source, e.flags), (M2, source::NEIGHBOUR, 0));
            }
            let e = f.entry(v4).unwrap();
            assert_eq!(
                (e.stale_packets, Mac(e.last_stale_mac)),
                (5, M3),
                "evidence kept"
            );
            let table = kernel_table(&router, BRIDGE);
            assert_eq!((table.get(&v4), table.get(&v6)), (Some(&M2), Some(&M2)));
            assert!(f.reconcile().is_empty(), "already in sync");
        })
    });
}

#[test]
fn ambiguity_across_two_interfaces_and_entries_left_alone() {
    require_root!(ROOT_FOR);
    let x = ip("192.168.1.240");
    let fixed = ip("192.168.1.241");
    let router = router();
    // A second interface, no bridge port.
    router.ip(&[
        "link", "add", "side0", "type", "veth", "peer", "name", "side1",
    ]);
    for dev in ["side0", "side1"] {
        router.ip(&["link", "set", dev, "up"]);
    }
    let neigh = |args: &[&str]| {
        let mut full = vec!["neigh"];
        full.extend_from_slice(args);
        router.ip(&full);
    };
    router.enter(|| {
        runtime().block_on(async {
            let mut f = Follower::open(SourceOptions::default()).await;
            // A static endpoint that the neighbour table disagrees with.
            let theirs = Endpoint {
                mac: M3.0,
                source: source::STATIC,
                ..Default::default()
            };
            f.put(fixed, theirs);

            let m1 = M1.to_string();
            let m2 = M2.to_string();
            neigh(&[
                "replace",
                "192.168.1.241",
                "lladdr",
                &m1,
                "dev",
                BRIDGE,
                "nud",
                "permanent",
            ]);
            // Ignored: outside the prefixes, and a multicast MAC.
            neigh(&[
                "replace",
                "198.51.100.7",
                "lladdr",
                &m1,
                "dev",
                BRIDGE,
                "nud",
                "permanent",
            ]);
            neigh(&[
                "replace",
                "192.168.1.242",
                "lladdr",
                "01:00:5e:00:00:01",
                "dev",
                BRIDGE,
                "nud",
                "noarp",
            ]);
            neigh(&[
                "replace",
                "192.168.1.240",
                "lladdr",
                &m1,
                "dev",
                BRIDGE,
                "nud",
                "permanent",
            ]);
            f.follow_until("the first entry", |f| {
                f.cache.desired(x) == Desired::Mac(M1)
            })
            .await;
            assert_eq!(
                f.entry(fixed),
                Some(theirs),
                "a STATIC entry is never touched"
            );
            assert_eq!(f.cache.desired(fixed), Desired::Mac(M1));
            assert_eq!(f.cache.desired(ip("198.51.100.7")), Desired::Absent);
            assert_eq!(f.cache.desired(ip("192.168.1.242")), Desired::Absent);
            assert!(f.entry(ip("192.168.1.242")).is_none());

            // The same IP with another MAC on another interface.
            neigh(&[
                "replace",
                "192.168.1.240",
                "lladdr",
                &m2,
                "dev",
                "side0",
                "nud",
                "permanent",
            ]);
            f.follow_until("ambiguity", |f| {
                matches!(f.cache.desired(x), Desired::Ambiguous(_))
            })
            .await;
            assert_eq!(f.changes.last(), Some(&MapChange::Ambiguous { ip: x }));
            let e = f.entry(x).unwrap();
            assert_eq!((Mac(e.mac), e.flags), (M1, endpoint_flags::AMBIGUOUS));

            // Both interfaces agree again: resolved, the flag cleared.
            neigh(&[
                "replace",
                "192.168.1.240",
                "lladdr",
                &m1,
                "dev",
                "side0",
                "nud",
                "permanent",
            ]);
            f.follow_until("resolution", |f| f.cache.desired(x) == Desired::Mac(M1))
                .await;
            assert_eq!(
                f.changes.last(),
                Some(&MapChange::Resolved { ip: x, mac: M1 })
            );
            assert_eq!(f.entry(x).unwrap().flags, 0);

            // Deleted on one interface: still believed; on both: removed.
            neigh(&["del", "192.168.1.240", "dev", BRIDGE]);
            neigh(&["del", "192.168.1.240", "dev", "side0"]);
            f.follow_until("removal", |f| f.cache.desired(x) == Desired::Absent)
                .await;
            assert_eq!(
                f.changes.last(),
                Some(&MapChange::Removed { ip: x, old: M1 })
            );
            assert!(f.entry(x).is_none());
            assert_eq!(f.entry(fixed), Some(theirs));
            assert!(f.reconcile().is_empty(), "already in sync");
        })
    });
}

#[test]
fn event_flood_with_overflow_ends_equal_to_the_kernel_table() {
    require_root!(ROOT_FOR);
    // A receive buffer far too small for a burst.
    flood(Some(16 * 1024));
}

#[test]
fn event_flood_with_the_default_buffer_ends_equal_to_the_kernel_table() {
    require_root!(ROOT_FOR);
    // Big enough for the bursts: mostly events, overflows unlikely.
    flood(SourceOptions::default().receive_buffer);
}

/// Two bursts of 3000 neighbour changes on `br-lan` (new entries; then new
/// MACs and some deletions); the cache and the map must end equal to
/// `ip -j neigh show dev br-lan`, and a final reconcile must find nothing
/// left to repair. `STATIC` entries stay untouched, stale `NEIGHBOUR`
/// entries go.
fn flood(receive_buffer: Option<usize>) {
    const N: u32 = 3000;
    let small_buffer = receive_buffer.is_some_and(|b| b < 64 * 1024);
    let router = router();
    router.ip(&["addr", "add", "192.168.16.1/20", "dev", BRIDGE]);
    let dir = std::env::temp_dir().join(format!("flowguard-neigh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _dir = RemoveDir(dir.clone());
    let addr = |i: u32| IpAddr::from((u32::from_be_bytes([192, 168, 16, 10]) + i).to_be_bytes());
    let mac = |tag: u8, i: u32| Mac([0x02, tag, 0, 0, (i >> 8) as u8, i as u8]);
    // `ip -batch` with one line per address.
    let batch = |name: &str, line: &dyn Fn(u32) -> String| {
        let path = dir.join(name);
        let text: String = (0..N).map(|i| line(i) + "\n").collect();
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["-n", router.name(), "-batch"]).arg(&path);
        cmd
    };
    let static_ip = addr(0);
    let gone_ip = ip("192.168.200.1");

    router.enter(|| {
        runtime().block_on(async {
            let mut f = Follower::open(SourceOptions { receive_buffer }).await;
            let theirs = Endpoint {
                mac: M3.0,
                source: source::STATIC,
                ..Default::default()
            };
            f.put(static_ip, theirs);
            // Left over from an earlier run (pinned map): no longer in the
            // table, so the reconcile that follows the start removes it.
            f.put(
                gone_ip,
                Endpoint {
                    mac: M1.0,
                    source: source::NEIGHBOUR,
                    ..Default::default()
                },
            );
            assert_eq!(
                f.reconcile(),
                vec![MapChange::Removed {
                    ip: gone_ip,
                    old: M1
                }]
            );

            // First burst: nothing is read while it runs, so with a small
            // receive buffer the kernel must drop events, and the source
            // must say so.
            let status = batch("first", &|i| {
                let nud = if i % 10 == 0 { "stale" } else { "permanent" };
                format!(
                    "neigh replace {} lladdr {} dev {BRIDGE} nud {nud}",
                    addr(i),
                    mac(0xaa, i)
                )
            })
            .status()
            .expect("ip -batch");
            assert!(status.success(), "first batch: {status}");
            // Its events, or the re-dump an overflow asks for, bring the
            // cache to the kernel's table.
            let kernel = kernel_table(&router, BRIDGE);
            assert_eq!(kernel.len(), N as usize, "the kernel's table itself");
            f.follow_until_table("the cache to hold the first burst", &kernel)
                .await;
            let first_overflows = f.overflows;
            if small_buffer {
                assert!(first_overflows > 0, "no overflow in {} events", f.events);
            }

            // Second burst: new MACs and some deletions, followed while it
            // runs (events, and an overflow whenever the reader falls behind).
            let mut child = batch("second", &|i| {
                if i % 7 == 3 {
                    format!("neigh del {} dev {BRIDGE}", addr(i))
                } else {
                    format!(
                        "neigh replace {} lladdr {} dev {BRIDGE}",
                        addr(i),
                        mac(0xbb, i)
                    )
                }
            })
            .spawn()
            .expect("ip -batch");
            let batch_ran = Wait::new("the second batch to end", LIMIT)
                .poll_async(
                    &mut f,
                    |_| child.try_wait().expect("waiting for ip -batch").is_some(),
                    async |f, left| f.next_event(left.min(Duration::from_millis(20))).await,
                )
                .await;
            if let Err(timed_out) = batch_ran {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{timed_out}");
            }
            let status = child.wait().expect("ip -batch's status");
            assert!(status.success(), "second batch: {status}");

            // Events (and the re-dumps their overflows ask for) bring the
            // cache to the kernel's table, with no extra reconcile.
            let kernel = kernel_table(&router, BRIDGE);
            f.follow_until_table("the cache to hold the second burst", &kernel)
                .await;
            println!(
                "{} events, {} overflows ({first_overflows} in the first burst)",
                f.events, f.overflows
            );
            let kept = (0..N).filter(|i| i % 7 != 3).count();
            assert_eq!(kernel.len(), kept, "the kernel's table itself");
            assert!(
                f.cache_table() == kernel,
                "cache vs kernel: {}",
                diff(&f.cache_table(), &kernel)
            );
            let mut expected = kernel.clone();
            expected.remove(&static_ip);
            let map = f.map_table();
            assert!(map == expected, "map vs kernel: {}", diff(&map, &expected));
            assert_eq!(
                f.entry(static_ip),
                Some(theirs),
                "a STATIC entry is never touched"
            );
            assert!(f.entry(gone_ip).is_none());
            for i in [1, 2, 5] {
                assert_eq!(map.get(&addr(i)), Some(&mac(0xbb, i)));
            }

            // A final dump and reconcile find nothing left to repair.
            let repaired = f.resync().await;
            assert!(repaired.is_empty(), "{repaired:?}");
            assert!(f.cache_table() == kernel);
            assert!(f.map_table() == expected);
        })
    });
}
