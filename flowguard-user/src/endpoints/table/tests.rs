//! The table's rules on a plain map: every pair of sources, ambiguity
//! within and across sources, withdrawal, what the kernel learned, a full
//! map, restore.

use std::collections::HashMap as Store;

use super::*;

const A: Mac = Mac([0x02, 0, 0, 0, 0, 0xaa]);
const B: Mac = Mac([0x02, 0, 0, 0, 0, 0xbb]);
const C: Mac = Mac([0x02, 0, 0, 0, 0, 0xcc]);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn x() -> IpAddr {
    ip("192.168.1.240")
}

fn child(what: &str) -> Origin {
    Origin::Child {
        what: what.to_string(),
    }
}

fn origin_of(src: u8) -> Origin {
    match src {
        source::STATIC => Origin::Static,
        source::NEIGHBOUR => Origin::Neighbour,
        source::LEARNED => Origin::Learned { was: None },
        source::CHILD => child("macvlan c1 in netns c, child of eth0"),
        _ => unreachable!(),
    }
}

fn at(map: &Store<EndpointKey, Endpoint>, ip: IpAddr) -> Option<(Mac, u8, bool)> {
    map.get(&endpoint_key(ip))
        .map(|e| (Mac(e.mac), e.source, is_ambiguous(e)))
}

/// What the kernel's learning path does (flowguard-ebpf `learn`): writes
/// the map itself, by the shared precedence, then sends an event.
fn kernel_learns(map: &mut Store<EndpointKey, Endpoint>, ip: IpAddr, mac: Mac) -> Option<Fact> {
    let key = endpoint_key(ip);
    let head = map.get(&key).copied();
    if let Some(h) = head {
        if h.mac == mac.0 || source::merge(h.source, source::LEARNED) != source::REPLACE {
            return None;
        }
    }
    let mut v = head.unwrap_or_default();
    v.mac = mac.0;
    v.source = source::LEARNED;
    map.insert(key, v);
    Some(Fact::at(
        ip,
        Origin::Learned {
            was: head.map(|h| Mac(h.mac)),
        },
        mac,
    ))
}

#[test]
fn every_pair_of_sources_follows_the_shared_precedence() {
    let all = [
        source::STATIC,
        source::CHILD,
        source::LEARNED,
        source::NEIGHBOUR,
    ];
    for first in all {
        for second in all {
            if first == second {
                continue;
            }
            let (mut t, mut map) = (EndpointTable::new(16), Store::new());
            let say = |t: &mut EndpointTable, map: &mut Store<_, _>, src: u8, mac: Mac| {
                if src == source::LEARNED {
                    if let Some(f) = kernel_learns(map, x(), mac) {
                        t.apply(map, [f]);
                    }
                } else {
                    t.apply(map, [Fact::at(x(), origin_of(src), mac)]);
                }
            };
            say(&mut t, &mut map, first, A);
            say(&mut t, &mut map, second, B);
            let got = at(&map, x()).unwrap();
            let higher = if source::rank(first) > source::rank(second) {
                first
            } else {
                second
            };
            let want = match source::merge(first, second) {
                source::REPLACE => (B, second, false),
                source::KEEP => (A, first, false),
                // The MAC the map held stays while the two disagree.
                _ => (A, higher, true),
            };
            assert_eq!(
                got, want,
                "claim of source {first} at A, then {second} at B"
            );
            // The two agree again: never ambiguous, the higher rank holds it.
            if second != source::LEARNED {
                let updates = t.apply(&mut map, [Fact::at(x(), origin_of(second), A)]);
                let (mac, _, ambiguous) = at(&map, x()).unwrap();
                assert_eq!(
                    (mac, ambiguous),
                    (A, false),
                    "{first}/{second} agree: {updates:?}"
                );
            }
        }
    }
}

#[test]
fn a_child_that_disagrees_with_the_neighbour_table_is_ambiguous_until_they_agree() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    let u = t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, A)]);
    assert_eq!(u[0].change, Change::Added { ip: x(), mac: A });
    let u = t.apply(&mut map, [Fact::at(x(), child("macvlan c1"), B)]);
    assert_eq!(u.len(), 1, "{u:?}");
    assert_eq!(u[0].change, Change::Ambiguous { ip: x() });
    assert_eq!(
        u[0].disagree,
        vec![(source::CHILD, B), (source::NEIGHBOUR, A)]
    );
    let said = u[0].to_string();
    assert!(
        said.contains("a macvlan/ipvlan child says 02:00:00:00:00:bb"),
        "{said}"
    );
    assert!(
        said.contains("the neighbour table says 02:00:00:00:00:aa"),
        "{said}"
    );
    // Counted, never rewritten; the map keeps the MAC it held.
    assert_eq!(at(&map, x()), Some((A, source::CHILD, true)));
    assert_eq!(t.in_memory(), 1);
    // The neighbour table follows: resolved toward the child's MAC.
    let u = t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, B)]);
    assert_eq!(
        u[0].change,
        Change::Moved {
            ip: x(),
            old: A,
            new: B
        }
    );
    assert_eq!(at(&map, x()), Some((B, source::CHILD, false)));
    // The child leaves: the neighbour table's claim holds the entry.
    let u = t.apply(&mut map, [Fact::gone(x(), child("macvlan"))]);
    assert_eq!(u[0].change, Change::Adopted { ip: x(), mac: B });
    assert_eq!(at(&map, x()), Some((B, source::NEIGHBOUR, false)));
    assert_eq!(t.in_memory(), 0, "one claim left: the map holds it");
}

#[test]
fn a_static_entry_settles_every_disagreement_and_stays() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    t.apply(&mut map, [Fact::at(x(), Origin::Static, C)]);
    for (o, m) in [
        (Origin::Neighbour, A),
        (child("macvlan c1"), B),
        (Origin::Neighbour, B),
    ] {
        assert!(t.apply(&mut map, [Fact::at(x(), o, m)]).is_empty());
        assert_eq!(at(&map, x()), Some((C, source::STATIC, false)));
    }
    assert_eq!(
        kernel_learns(&mut map, x(), A),
        None,
        "the kernel keeps it too"
    );
    for o in [Origin::Neighbour, child("macvlan")] {
        t.apply(&mut map, [Fact::gone(x(), o)]);
    }
    assert_eq!(at(&map, x()), Some((C, source::STATIC, false)));
}

#[test]
fn evidence_is_kept_and_the_rate_limit_reset_only_on_a_new_mac() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, A)]);
    let key = endpoint_key(x());
    let e = map.get_mut(&key).unwrap();
    e.stale_packets = 7;
    e.last_stale_mac = C.0;
    e.last_event_jiffies = 99;
    // The same fact again writes nothing.
    let before = map[&key];
    assert!(t
        .apply(&mut map, [Fact::at(x(), Origin::Neighbour, A)])
        .is_empty());
    assert_eq!(map[&key], before);
    t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, B)]);
    let e = map[&key];
    assert_eq!(
        (
            e.mac,
            e.stale_packets,
            e.last_stale_mac,
            e.last_event_jiffies
        ),
        (B.0, 7, C.0, 0)
    );
}

#[test]
fn a_source_split_across_interfaces_keeps_the_held_mac_and_resolves() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, A)]);
    let split = |m: Vec<Mac>| Fact {
        ip: x(),
        origin: Origin::Neighbour,
        says: Says::Split(m),
    };
    let u = t.apply(&mut map, [split(vec![B, A])]);
    assert_eq!(u[0].change, Change::Ambiguous { ip: x() });
    assert_eq!(at(&map, x()), Some((A, source::NEIGHBOUR, true)));
    assert!(
        t.apply(&mut map, [split(vec![B, A])]).is_empty(),
        "said once"
    );
    // The held candidate leaves: one of the others is shown.
    assert!(t.apply(&mut map, [split(vec![B, C])]).is_empty());
    assert_eq!(at(&map, x()), Some((B, source::NEIGHBOUR, true)));
    let u = t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, B)]);
    assert_eq!(u[0].change, Change::Resolved { ip: x(), mac: B });
    let u = t.apply(&mut map, [Fact::gone(x(), Origin::Neighbour)]);
    assert_eq!(u[0].change, Change::Removed { ip: x(), old: B });
    assert!(map.is_empty());
    // A new endpoint can start ambiguous.
    let u = t.apply(&mut map, [split(vec![A, B])]);
    assert_eq!(u[0].change, Change::Ambiguous { ip: x() });
}

#[test]
fn what_the_kernel_learned_is_a_claim_and_a_move_it_made_is_reported() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    t.apply(&mut map, [Fact::at(x(), child("macvlan c1"), A)]);
    // A learned frame from another MAC: the kernel replaced the child's.
    let f = kernel_learns(&mut map, x(), B).unwrap();
    let u = t.apply(&mut map, [f]);
    assert_eq!(
        u[0].change,
        Change::Moved {
            ip: x(),
            old: A,
            new: B
        }
    );
    assert_eq!(at(&map, x()), Some((B, source::LEARNED, false)));
    // The child goes: what was learned after it stays.
    assert!(t
        .apply(&mut map, [Fact::gone(x(), child("macvlan"))])
        .is_empty());
    assert_eq!(at(&map, x()), Some((B, source::LEARNED, false)));
    // The neighbour table never replaces a learned MAC, however old.
    assert!(t
        .apply(&mut map, [Fact::at(x(), Origin::Neighbour, C)])
        .is_empty());
    assert_eq!(at(&map, x()), Some((B, source::LEARNED, false)));
    // A learned write the table missed (a lost event) is read back from the map.
    let y = ip("192.168.1.241");
    t.apply(&mut map, [Fact::at(y, Origin::Neighbour, A)]);
    t.apply(&mut map, [Fact::at(y, child("macvlan c2"), A)]);
    assert_eq!(t.in_memory(), 2);
    kernel_learns(&mut map, y, C).unwrap();
    // The next fact about y sees the learned claim as the newest.
    assert!(t
        .apply(&mut map, [Fact::at(y, Origin::Neighbour, A)])
        .is_empty());
    assert_eq!(at(&map, y), Some((C, source::LEARNED, false)));
}

#[test]
fn a_withdrawn_child_removes_the_endpoint_only_while_it_holds_the_childs_mac() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    t.apply(&mut map, [Fact::at(x(), child("macvlan c1"), A)]);
    let u = t.apply(&mut map, [Fact::gone(x(), child("macvlan"))]);
    assert_eq!(u[0].change, Change::Removed { ip: x(), old: A });
    assert!(u[0].to_string().contains("left with its macvlan"));
    assert!(map.is_empty());
}

#[test]
fn reconcile_withdraws_what_a_source_no_longer_names() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    for (i, m) in [(1, A), (2, A), (4, A)] {
        t.apply(
            &mut map,
            [Fact::at(
                ip(&format!("192.168.1.{i}")),
                Origin::Neighbour,
                m,
            )],
        );
    }
    t.apply(&mut map, [Fact::at(ip("192.168.1.9"), Origin::Static, C)]);
    let now = vec![
        Fact::at(ip("192.168.1.1"), Origin::Neighbour, A),
        Fact::at(ip("192.168.1.2"), Origin::Neighbour, B),
        Fact::at(ip("192.168.1.3"), Origin::Neighbour, C),
    ];
    let mut changes: Vec<Change> = t
        .reconcile(&mut map, Origin::Neighbour, now.clone())
        .unwrap()
        .into_iter()
        .map(|u| u.change)
        .collect();
    changes.sort_by_key(|c| c.ip());
    assert_eq!(
        changes,
        vec![
            Change::Moved {
                ip: ip("192.168.1.2"),
                old: A,
                new: B
            },
            Change::Added {
                ip: ip("192.168.1.3"),
                mac: C
            },
            Change::Removed {
                ip: ip("192.168.1.4"),
                old: A
            },
        ]
    );
    assert_eq!(
        map.len(),
        4,
        "the static entry is not the neighbour table's"
    );
    assert!(t
        .reconcile(&mut map, Origin::Neighbour, now)
        .unwrap()
        .is_empty());
}

/// A store whose hash map holds `room` entries.
struct Small {
    map: Store<EndpointKey, Endpoint>,
    room: usize,
}

impl EndpointStore for Small {
    fn get(&self, key: &EndpointKey) -> Result<Option<Endpoint>, MapError> {
        Ok(self.map.get(key).copied())
    }
    fn insert(&mut self, key: EndpointKey, value: Endpoint) -> Result<(), MapError> {
        if !self.map.contains_key(&key) && self.map.len() >= self.room {
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
            }));
        }
        self.map.insert(key, value);
        Ok(())
    }
    fn remove(&mut self, key: &EndpointKey) -> Result<(), MapError> {
        EndpointStore::remove(&mut self.map, key)
    }
    fn entries(&self) -> Result<Vec<(EndpointKey, Endpoint)>, MapError> {
        EndpointStore::entries(&self.map)
    }
    fn hash_len(&self) -> usize {
        self.map.len()
    }
}

#[test]
fn a_full_map_is_one_episode_and_what_did_not_fit_is_written_when_there_is_room() {
    let mut store = Small {
        map: Store::new(),
        room: 2,
    };
    let mut t = EndpointTable::new(2);
    let facts = |n: u8| -> Vec<Fact> {
        (1..=n)
            .map(|i| Fact::at(ip(&format!("192.168.1.{i}")), Origin::Neighbour, A))
            .collect()
    };
    let u = t.apply(&mut store, facts(4));
    assert_eq!(u.len(), 2, "the endpoints that fit are guarded");
    assert_eq!(t.take_dropped(), 2);
    assert!(
        t.describe_full().contains("2 left out"),
        "{}",
        t.describe_full()
    );
    // Retried at every call, counted once per episode.
    t.apply(&mut store, facts(4));
    assert_eq!(t.take_dropped(), 0);
    assert_eq!(t.in_memory(), 2);
    // Two leave: the retries write the two that waited (the map is full again).
    let gone = |i: u8| Fact::gone(ip(&format!("192.168.1.{i}")), Origin::Neighbour);
    t.apply(&mut store, [gone(1), gone(2)]);
    assert_eq!(store.map.len(), 2);
    assert!(store.map.contains_key(&endpoint_key(ip("192.168.1.4"))));
    assert_eq!(t.in_memory(), 0);
    assert!(t.describe_full().contains("2 left out"), "still full");
    // One more leaves: room again, the episode ends.
    t.apply(&mut store, [gone(3)]);
    assert_eq!(t.describe_full(), "");
    assert_eq!(t.take_dropped(), 0);
}

#[test]
fn restore_writes_the_values_it_reads_and_they_are_claims_of_their_source() {
    let mut map = Store::new();
    let kept = vec![(
        endpoint_key(x()),
        Endpoint {
            mac: A.0,
            source: source::CHILD,
            stale_packets: 5,
            ..Default::default()
        },
    )];
    assert_eq!(EndpointTable::restore(&mut map, kept.clone()), 1);
    assert_eq!(map[&kept[0].0], kept[0].1);
    let mut t = EndpointTable::new(16);
    // The neighbour table disagrees with the restored child: ambiguous.
    let u = t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, B)]);
    assert_eq!(u[0].change, Change::Ambiguous { ip: x() });
    assert_eq!(map[&kept[0].0].stale_packets, 5);
}

#[test]
fn an_ipv4_mapped_address_is_the_ipv4_endpoint() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    t.apply(
        &mut map,
        [Fact::at(ip("::ffff:192.168.1.240"), Origin::Neighbour, A)],
    );
    assert_eq!(at(&map, x()), Some((A, source::NEIGHBOUR, false)));
}

#[test]
fn a_probe_reports_a_move_of_the_neighbour_tables_endpoint_and_writes_nothing() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, A)]);
    let before = map.clone();
    let u = t.apply(&mut map, [Fact::at(x(), Origin::Probe, B)]);
    assert_eq!(
        u[0].change,
        Change::Moved {
            ip: x(),
            old: A,
            new: B
        }
    );
    assert_eq!(
        map, before,
        "the map follows the neighbour table, not the probe"
    );
    // The same answer as the map, or an endpoint another source holds: nothing.
    assert!(t
        .apply(&mut map, [Fact::at(x(), Origin::Probe, A)])
        .is_empty());
    t.apply(&mut map, [Fact::at(x(), Origin::Static, C)]);
    assert!(t
        .apply(&mut map, [Fact::at(x(), Origin::Probe, B)])
        .is_empty());
    // Then the neighbour table follows the answer: the move, by its source.
    let y = ip("192.168.1.241");
    t.apply(&mut map, [Fact::at(y, Origin::Neighbour, A)]);
    t.apply(&mut map, [Fact::at(y, Origin::Probe, B)]);
    let u = t.apply(&mut map, [Fact::at(y, Origin::Neighbour, B)]);
    assert_eq!(
        u[0].change,
        Change::Moved {
            ip: y,
            old: A,
            new: B
        }
    );
}

#[test]
fn a_mac_behind_another_port_moves_every_endpoint_at_that_mac_and_flapping_is_one_episode() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    let v6 = ip("fd00:1::240");
    t.apply(
        &mut map,
        [
            Fact::at(x(), Origin::Neighbour, A),
            Fact::at(v6, Origin::Neighbour, A),
            Fact::at(ip("192.168.1.9"), Origin::Neighbour, B),
        ],
    );
    let (br, lan1, lan2) = (3, 5, 6);
    // The first dump places A behind lan1: nothing moved.
    let u = t
        .place(
            &mut map,
            vec![
                PortFact::behind(A, br, lan1, None),
                PortFact::behind(B, br, lan1, None),
            ],
            true,
        )
        .unwrap();
    assert!(u.is_empty(), "{u:?}");
    assert_eq!(t.port_of(A).map(|p| p.port), Some(lan1));
    // A again behind lan1 (refreshed): nothing.
    assert!(t
        .place(&mut map, vec![PortFact::behind(A, br, lan1, None)], false)
        .unwrap()
        .is_empty());
    // A behind lan2: both of its addresses moved, B's did not.
    let u = t
        .place(&mut map, vec![PortFact::behind(A, br, lan2, None)], false)
        .unwrap();
    let changes: Vec<Change> = u.iter().map(|u| u.change).collect();
    assert_eq!(
        changes,
        vec![
            Change::PortMoved {
                ip: x(),
                mac: A,
                from: lan1,
                to: lan2
            },
            Change::PortMoved {
                ip: v6,
                mac: A,
                from: lan1,
                to: lan2
            },
        ]
    );
    assert!(u[0].to_string().contains("moved from"), "{}", u[0]);
    // Another bridge's port is not a move between this one's ports.
    t.apply(
        &mut map,
        [Fact::at(ip("192.168.1.10"), Origin::Neighbour, C)],
    );
    t.place(&mut map, vec![PortFact::behind(C, br, lan1, None)], false)
        .unwrap();
    assert!(t
        .place(&mut map, vec![PortFact::behind(C, 4, 7, None)], false)
        .unwrap()
        .is_empty());
    // Back and forth: the third move in the window starts an episode, said once.
    let u = t
        .place(&mut map, vec![PortFact::behind(A, br, lan1, None)], false)
        .unwrap();
    assert!(matches!(u[0].change, Change::PortMoved { .. }), "{u:?}");
    let u = t
        .place(&mut map, vec![PortFact::behind(A, br, lan2, None)], false)
        .unwrap();
    assert!(matches!(u[0].change, Change::PortFlapping { .. }), "{u:?}");
    assert_eq!(u.len(), 2, "each address of the MAC");
    assert!(u[0].to_string().contains("flaps between"), "{}", u[0]);
    for port in [lan1, lan2, lan1] {
        assert!(t
            .place(&mut map, vec![PortFact::behind(A, br, port, None)], false)
            .unwrap()
            .is_empty());
    }
    // Aged out (or deleted) behind its port: its port is unknown.
    t.place(&mut map, vec![PortFact::gone(A, lan2)], false)
        .unwrap();
    assert!(t.port_of(A).is_some(), "it left another port than its own");
    t.place(&mut map, vec![PortFact::gone(A, lan1)], false)
        .unwrap();
    assert_eq!(t.port_of(A), None);
    // A whole dump that no longer names B forgets it.
    t.place(&mut map, vec![], true).unwrap();
    assert_eq!(t.port_of(B), None);
}

#[test]
fn each_endpoint_carries_its_macs_port_for_the_kernel_side() {
    let (mut t, mut map) = (EndpointTable::new(16), Store::new());
    let v6 = ip("fd00:1::240");
    let port = |map: &Store<EndpointKey, Endpoint>, ip: IpAddr| {
        map.get(&endpoint_key(ip)).map(port_fields)
    };
    let (br, lan1, lan2) = (3, 5, 6);
    // An endpoint written before the FDB names its MAC: no port.
    t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, A)]);
    assert_eq!(port(&map, x()), Some((0, false)));
    // The FDB's dump places A behind lan1: the endpoint gets the port.
    t.place(&mut map, vec![PortFact::behind(A, br, lan1, None)], true)
        .unwrap();
    assert_eq!(port(&map, x()), Some((lan1, false)));
    // A new endpoint at a placed MAC is written with its port.
    t.apply(&mut map, [Fact::at(v6, Origin::Neighbour, A)]);
    assert_eq!(port(&map, v6), Some((lan1, false)));
    // A moves: both addresses follow, evidence kept.
    map.get_mut(&endpoint_key(x())).unwrap().stale_packets = 7;
    t.place(&mut map, vec![PortFact::behind(A, br, lan2, None)], false)
        .unwrap();
    assert_eq!(port(&map, x()), Some((lan2, false)));
    assert_eq!(port(&map, v6), Some((lan2, false)));
    assert_eq!(map[&endpoint_key(x())].stale_packets, 7);
    // In a VLAN: the port and the flag the kernel side never redirects for.
    t.place(
        &mut map,
        vec![PortFact::behind(A, br, lan2, Some(10))],
        false,
    )
    .unwrap();
    assert_eq!(port(&map, x()), Some((lan2, true)));
    // The endpoint's MAC changes to one the FDB does not hold: no port.
    t.apply(&mut map, [Fact::at(x(), Origin::Neighbour, B)]);
    assert_eq!(port(&map, x()), Some((0, false)));
    // The kernel learned a MAC and cleared the port: the learned fact
    // writes the new MAC's port back.
    t.place(&mut map, vec![PortFact::behind(B, br, lan1, None)], false)
        .unwrap();
    assert_eq!(port(&map, x()), Some((lan1, false)));
    let mut e = map[&endpoint_key(x())];
    e.port = 0;
    map.insert(endpoint_key(x()), e);
    let fact = Fact::at(x(), Origin::Learned { was: Some(A) }, B);
    t.apply(&mut map, [fact]);
    assert_eq!(port(&map, x()), Some((lan1, false)));
    // The FDB forgets A (aged out, deleted): its endpoint has no port.
    t.place(&mut map, vec![PortFact::gone(A, lan2)], false)
        .unwrap();
    assert_eq!(port(&map, v6), Some((0, false)));
    // A whole dump that no longer names B clears B's endpoint's port.
    t.place(&mut map, vec![], true).unwrap();
    assert_eq!(port(&map, x()), Some((0, false)));
    // An endpoint the table did not write (learned by the kernel side, its
    // event not read yet) at C: a change of C alone does not read the map
    // (most of a busy bridge's FDB is no endpoint's); the next whole dump
    // checks every endpoint and gives it its port.
    let y = ip("192.168.1.77");
    let learned = Endpoint {
        mac: C.0,
        source: source::LEARNED,
        ..Endpoint::default()
    };
    map.insert(endpoint_key(y), learned);
    t.place(&mut map, vec![PortFact::behind(C, br, lan2, None)], false)
        .unwrap();
    assert_eq!(port(&map, y), Some((0, false)));
    t.place(&mut map, vec![PortFact::behind(C, br, lan2, None)], true)
        .unwrap();
    assert_eq!(port(&map, y), Some((lan2, false)));
    // Now C is known as an endpoint's: its next move is written at once.
    t.place(&mut map, vec![PortFact::behind(C, br, lan1, None)], false)
        .unwrap();
    assert_eq!(port(&map, y), Some((lan1, false)));
}
