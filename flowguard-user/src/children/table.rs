//! The pure half of the children source: what one namespace's links and
//! addresses say (its facts), and what the children of every namespace
//! together say about each IP. No sockets here: everything runs on plain data.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use super::{decode::Link, decode::Message, ChildChange, ChildFact, ChildKind};
use crate::{
    endpoints::{Fact, Origin, Says},
    settings::{Mac, Prefix},
};

/// What flowguard knows of one namespace: its macvlan/ipvlan links and the
/// in-prefix addresses of all its links.
#[derive(Clone, Debug, Default)]
pub struct NsState {
    links: HashMap<u32, Link>,
    addrs: HashMap<u32, BTreeSet<IpAddr>>,
}

impl NsState {
    /// Applies a dump reply or an event. Addresses outside `prefixes` and
    /// links of other kinds are not kept.
    pub fn apply(&mut self, m: &Message, prefixes: &[Prefix]) {
        match m {
            Message::Link { link, .. } => {
                if link.kind.is_some() {
                    self.links.insert(link.ifindex, link.clone());
                } else {
                    // An index is reused only after its link is gone; stay safe anyway.
                    self.links.remove(&link.ifindex);
                }
            }
            Message::LinkGone { ifindex } => {
                self.links.remove(ifindex);
                self.addrs.remove(ifindex);
            }
            Message::Addr { ifindex, ip, .. } if prefixes.iter().any(|p| p.contains(*ip)) => {
                self.addrs.entry(*ifindex).or_default().insert(*ip);
            }
            Message::AddrGone { ifindex, ip } => {
                if let Some(set) = self.addrs.get_mut(ifindex) {
                    set.remove(ip);
                    if set.is_empty() {
                        self.addrs.remove(ifindex);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Where a namespace stands relative to flowguard's own.
#[derive(Clone, Copy, Debug)]
pub struct Relation {
    /// The namespace is flowguard's own.
    pub is_own: bool,
    /// The nsid this namespace has for flowguard's own, once known.
    pub own_nsid: Option<i32>,
}

/// The facts of one namespace: for every child of a guarded interface, one
/// per in-prefix address. Keyed by (ifindex, IP).
pub fn facts_of(
    state: &NsState,
    ns: u64,
    relation: Relation,
    label: &str,
    parents: &BTreeMap<u32, String>,
) -> BTreeMap<(u32, IpAddr), ChildFact> {
    let mut out = BTreeMap::new();
    for link in state.links.values() {
        let (Some(kind), Some(mac), Some(parent)) = (link.kind, link.mac, link.parent) else {
            continue;
        };
        // IFLA_LINK is an ifindex in the parent's namespace: it names a
        // guarded interface only if that namespace is flowguard's own. No
        // IFLA_LINK_NETNSID means "the same namespace as the child".
        let parent_is_ours = match link.parent_netnsid {
            None => relation.is_own,
            Some(id) => !relation.is_own && relation.own_nsid == Some(id),
        };
        let Some(parent_name) = parents.get(&parent).filter(|_| parent_is_ours) else {
            continue;
        };
        if !mac.is_unicast() {
            continue;
        }
        for ip in state.addrs.get(&link.ifindex).into_iter().flatten() {
            out.insert(
                (link.ifindex, *ip),
                ChildFact {
                    ip: *ip,
                    mac,
                    kind,
                    ifname: link.name.clone(),
                    netns: label.to_owned(),
                    parent: parent_name.clone(),
                    ns,
                    ifindex: link.ifindex,
                },
            );
        }
    }
    out
}

/// What changed between two fact sets of one namespace.
pub fn diff(
    old: &BTreeMap<(u32, IpAddr), ChildFact>,
    new: &BTreeMap<(u32, IpAddr), ChildFact>,
) -> Vec<ChildChange> {
    let mut out = Vec::new();
    for (k, f) in old {
        if new.get(k) != Some(f) {
            out.push(ChildChange::Removed(f.clone()));
        }
    }
    for (k, f) in new {
        if old.get(k) != Some(f) {
            out.push(ChildChange::Added(f.clone()));
        }
    }
    out
}

/// Every current fact, by IP: what the children say about each address,
/// as facts for the endpoint table (which decides against the other
/// sources: a static entry always wins; see [`crate::endpoints`]).
///
/// - one MAC among an IP's children: the IP is at that MAC;
/// - different MACs: the children are split (ambiguous: counted, never
///   rewritten);
/// - an IP's last child goes: the children withdraw their claim.
#[derive(Debug, Default)]
pub struct ChildTable {
    by_ip: BTreeMap<IpAddr, BTreeMap<(u64, u32), ChildFact>>,
}

impl ChildTable {
    /// The facts currently held for `ip`.
    pub fn facts(&self, ip: IpAddr) -> impl Iterator<Item = &ChildFact> {
        self.by_ip.get(&ip).into_iter().flat_map(|m| m.values())
    }

    /// Number of IPs with at least one fact.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// Records `changes`; returns what the children say now about every
    /// IP they touch.
    pub fn apply(&mut self, changes: &[ChildChange]) -> Vec<Fact> {
        let mut gone: BTreeMap<IpAddr, ChildKind> = BTreeMap::new();
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        for ch in changes {
            match ch {
                ChildChange::Added(f) => {
                    self.by_ip
                        .entry(f.ip)
                        .or_default()
                        .insert((f.ns, f.ifindex), f.clone());
                }
                ChildChange::Removed(f) => {
                    if let Some(m) = self.by_ip.get_mut(&f.ip) {
                        m.remove(&(f.ns, f.ifindex));
                        if m.is_empty() {
                            self.by_ip.remove(&f.ip);
                        }
                    }
                    gone.insert(f.ip, f.kind);
                }
            }
            let (ChildChange::Added(f) | ChildChange::Removed(f)) = ch;
            touched.insert(f.ip);
        }
        touched
            .into_iter()
            .map(|ip| self.fact(ip, gone.get(&ip).copied()))
            .collect()
    }

    /// What the children say about `ip`; `withdrawn` names the kind of a
    /// child that went, for the sentence.
    fn fact(&self, ip: IpAddr, withdrawn: Option<ChildKind>) -> Fact {
        let facts: Vec<&ChildFact> = self.facts(ip).collect();
        let mut macs: Vec<Mac> = Vec::new();
        for f in &facts {
            if !macs.contains(&f.mac) {
                macs.push(f.mac);
            }
        }
        let (what, says) = match macs.len() {
            0 => (
                withdrawn.map_or("macvlan".to_string(), |k| k.to_string()),
                Says::Gone,
            ),
            1 => {
                let f = facts[0];
                (
                    format!(
                        "{} {} in {}, child of {}",
                        f.kind, f.ifname, f.netns, f.parent
                    ),
                    Says::At(f.mac),
                )
            }
            _ => {
                let list: Vec<String> = facts
                    .iter()
                    .map(|f| format!("{} {} {} in {}", f.mac, f.kind, f.ifname, f.netns))
                    .collect();
                (list.join("; "), Says::Split(macs))
            }
        };
        Fact {
            ip,
            origin: Origin::Child { what },
            says,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap as StdMap;

    use aya::maps::MapError;
    use flowguard_common::{endpoint_flags, source, Endpoint, EndpointKey};

    use super::*;
    use crate::children::ChildKind;
    use crate::{
        endpoints::{Change, EndpointStore, EndpointTable},
        settings::endpoint_key,
    };

    const A: Mac = Mac([2, 0x42, 0, 0, 0, 0xa]);
    const B: Mac = Mac([2, 0x42, 0, 0, 0, 0xb]);
    const OWN_NS: u64 = 1;
    const CONTAINER_NS: u64 = 2;
    const PARENT: u32 = 3;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fact(ipv: &str, mac: Mac, ns: u64, ifindex: u32) -> ChildFact {
        ChildFact {
            ip: ip(ipv),
            mac,
            kind: ChildKind::Macvlan,
            ifname: "eth0".into(),
            netns: format!("netns n{ns}"),
            parent: "eth0".into(),
            ns,
            ifindex,
        }
    }

    fn entry(store: &StdMap<EndpointKey, Endpoint>, ipv: &str) -> Option<Endpoint> {
        store.get(&endpoint_key(ip(ipv))).copied()
    }

    fn parents() -> BTreeMap<u32, String> {
        BTreeMap::from([(PARENT, "eth0".to_owned())])
    }

    fn prefixes() -> Vec<Prefix> {
        vec![
            "192.168.1.0/24".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
        ]
    }

    fn link(ifindex: u32, parent: u32, netnsid: Option<i32>, mac: Mac) -> Message {
        Message::Link {
            seq: 0,
            intr: false,
            link: Link {
                ifindex,
                name: "eth0".into(),
                kind: Some(ChildKind::Macvlan),
                mac: Some(mac),
                parent: Some(parent),
                parent_netnsid: netnsid,
            },
        }
    }

    fn addr(ifindex: u32, ipv: &str) -> Message {
        Message::Addr {
            seq: 0,
            intr: false,
            ifindex,
            ip: ip(ipv),
        }
    }

    #[test]
    fn a_child_is_a_fact_only_when_its_parent_is_a_guarded_interface_of_flowguards_netns() {
        let mut st = NsState::default();
        for m in [
            link(7, PARENT, Some(5), A),
            addr(7, "192.168.1.240"),
            addr(7, "10.0.0.1"),
            addr(7, "fd00::240"),
            addr(7, "fe80::1"),
        ] {
            st.apply(&m, &prefixes());
        }
        let rel = |own_nsid| Relation {
            is_own: false,
            own_nsid,
        };
        let facts = facts_of(&st, CONTAINER_NS, rel(Some(5)), "netns c", &parents());
        let ips: Vec<IpAddr> = facts.values().map(|f| f.ip).collect();
        assert_eq!(
            ips,
            [ip("192.168.1.240"), ip("fd00::240")],
            "only in-prefix addresses"
        );
        // Unknown nsid, or an nsid naming another namespace: not our parent.
        assert!(facts_of(&st, CONTAINER_NS, rel(None), "c", &parents()).is_empty());
        assert!(facts_of(&st, CONTAINER_NS, rel(Some(6)), "c", &parents()).is_empty());
        // A parent in the same namespace is our parent only in our own namespace.
        let mut same = NsState::default();
        same.apply(&link(7, PARENT, None, A), &prefixes());
        same.apply(&addr(7, "192.168.1.240"), &prefixes());
        assert!(facts_of(&same, CONTAINER_NS, rel(Some(5)), "c", &parents()).is_empty());
        let own = Relation {
            is_own: true,
            own_nsid: None,
        };
        assert_eq!(facts_of(&same, OWN_NS, own, "own", &parents()).len(), 1);
        // Not a guarded ifindex.
        let mut other = NsState::default();
        other.apply(&link(7, PARENT + 1, None, A), &prefixes());
        other.apply(&addr(7, "192.168.1.240"), &prefixes());
        assert!(facts_of(&other, OWN_NS, own, "own", &parents()).is_empty());
        // The link goes: its addresses go with it.
        st.apply(&Message::LinkGone { ifindex: 7 }, &prefixes());
        assert!(facts_of(&st, CONTAINER_NS, rel(Some(5)), "c", &parents()).is_empty());
    }

    /// What the children's facts did to the map, through the endpoint table.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Applied {
        sentences: Vec<String>,
        added: u64,
        removed: u64,
    }

    fn run<S: EndpointStore>(
        t: &mut ChildTable,
        table: &mut EndpointTable,
        store: &mut S,
        changes: &[ChildChange],
    ) -> Applied {
        let mut out = Applied::default();
        for u in table.apply(store, t.apply(changes)) {
            match u.change {
                Change::Removed { .. } => out.removed += 1,
                _ => out.added += 1,
            }
            out.sentences.push(u.to_string());
        }
        out
    }

    #[test]
    fn a_child_fact_overwrites_learned_and_neighbour_entries_but_never_static() {
        let mut store = StdMap::new();
        let (mut t, mut table) = (ChildTable::default(), EndpointTable::new(16));
        let mut learned = Endpoint {
            mac: A.0,
            source: source::LEARNED,
            stale_packets: 9,
            ..Default::default()
        };
        store.insert(endpoint_key(ip("192.168.1.240")), learned);
        learned.source = source::STATIC;
        store.insert(endpoint_key(ip("192.168.1.9")), learned);
        let out = run(
            &mut t,
            &mut table,
            &mut store,
            &[
                ChildChange::Added(fact("192.168.1.240", B, CONTAINER_NS, 7)),
                ChildChange::Added(fact("192.168.1.9", B, CONTAINER_NS, 8)),
            ],
        );
        let e = entry(&store, "192.168.1.240").unwrap();
        assert_eq!((Mac(e.mac), e.source), (B, source::CHILD));
        assert_eq!(e.stale_packets, 9, "the kernel's evidence is kept");
        let s = entry(&store, "192.168.1.9").unwrap();
        assert_eq!((Mac(s.mac), s.source), (A, source::STATIC));
        assert_eq!(out.added, 1);
        assert_eq!(out.sentences.len(), 1, "{out:?}");
        assert!(out.sentences[0].contains("192.168.1.240 is at 02:42:00:00:00:0b"));
        assert!(out.sentences[0].contains("was 02:42:00:00:00:0a"));
        // The same facts again: nothing to do, nothing said.
        let again = run(
            &mut t,
            &mut table,
            &mut store,
            &[
                ChildChange::Removed(fact("192.168.1.240", B, CONTAINER_NS, 7)),
                ChildChange::Added(fact("192.168.1.240", B, CONTAINER_NS, 7)),
            ],
        );
        assert_eq!(again, Applied::default());
        // Withdrawal never removes the static entry either.
        run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Removed(fact(
                "192.168.1.9",
                B,
                CONTAINER_NS,
                8,
            ))],
        );
        assert!(entry(&store, "192.168.1.9").is_some());
    }

    #[test]
    fn withdrawal_removes_the_entry_only_while_it_holds_the_childs_mac() {
        let mut store = StdMap::new();
        let (mut t, mut table) = (ChildTable::default(), EndpointTable::new(16));
        let old = fact("192.168.1.240", A, CONTAINER_NS, 7);
        run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Added(old.clone())],
        );
        let out = run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Removed(old.clone())],
        );
        assert_eq!(out.removed, 1);
        assert!(entry(&store, "192.168.1.240").is_none());
        assert!(out.sentences[0].contains("left with its macvlan: no longer guarded"));

        // Re-added, then the learner saw real frames from another MAC.
        run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Added(old.clone())],
        );
        let key = endpoint_key(ip("192.168.1.240"));
        let mut e = store[&key];
        e.mac = B.0;
        e.source = source::LEARNED;
        store.insert(key, e);
        let out = run(&mut t, &mut table, &mut store, &[ChildChange::Removed(old)]);
        assert_eq!(out, Applied::default());
        assert_eq!(Mac(entry(&store, "192.168.1.240").unwrap().mac), B);
    }

    #[test]
    fn a_recreated_child_moves_the_endpoint_in_one_batch_or_two() {
        let mut store = StdMap::new();
        let (mut t, mut table) = (ChildTable::default(), EndpointTable::new(16));
        let old = fact("192.168.1.240", A, CONTAINER_NS, 7);
        let new = fact("192.168.1.240", B, CONTAINER_NS + 1, 7);
        run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Added(old.clone())],
        );
        let out = run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Removed(old), ChildChange::Added(new)],
        );
        let e = entry(&store, "192.168.1.240").unwrap();
        assert_eq!((Mac(e.mac), e.source, e.flags), (B, source::CHILD, 0));
        assert_eq!((out.added, out.removed), (1, 0), "{out:?}");
    }

    #[test]
    fn two_children_with_one_ip_and_different_macs_are_ambiguous_until_one_leaves() {
        let mut store = StdMap::new();
        let (mut t, mut table) = (ChildTable::default(), EndpointTable::new(16));
        let a = fact("192.168.1.240", A, CONTAINER_NS, 7);
        let b = fact("192.168.1.240", B, CONTAINER_NS + 1, 9);
        run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Added(a.clone())],
        );
        let out = run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Added(b.clone())],
        );
        let e = entry(&store, "192.168.1.240").unwrap();
        assert_eq!(
            e.flags & endpoint_flags::AMBIGUOUS,
            endpoint_flags::AMBIGUOUS
        );
        assert_eq!(
            Mac(e.mac),
            A,
            "the MAC already held stays while it is a candidate"
        );
        assert_eq!(out.sentences.len(), 1);
        assert!(out.sentences[0].contains("different MACs"), "{out:?}");
        // Said once.
        let c = fact("192.168.1.240", B, CONTAINER_NS + 2, 9);
        let out = run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Added(c.clone())],
        );
        assert!(out.sentences.is_empty(), "{out:?}");
        // The two B children leave... one at a time: still ambiguous, then resolved.
        run(&mut t, &mut table, &mut store, &[ChildChange::Removed(c)]);
        let out = run(&mut t, &mut table, &mut store, &[ChildChange::Removed(a)]);
        let e = entry(&store, "192.168.1.240").unwrap();
        assert_eq!((Mac(e.mac), e.flags), (B, 0));
        assert!(
            out.sentences[0].contains("is at 02:42:00:00:00:0b"),
            "{out:?}"
        );
        // Same MAC on two children (ipvlan children share their parent's): not ambiguous.
        let b2 = fact("192.168.1.240", B, CONTAINER_NS + 3, 4);
        let out = run(&mut t, &mut table, &mut store, &[ChildChange::Added(b2)]);
        assert_eq!(out, Applied::default());
        assert_eq!(entry(&store, "192.168.1.240").unwrap().flags, 0);
        let _ = b;
    }

    /// A store that refuses new keys, like a full BPF hash map.
    struct Full(StdMap<EndpointKey, Endpoint>);

    impl EndpointStore for Full {
        fn get(&self, key: &EndpointKey) -> Result<Option<Endpoint>, MapError> {
            Ok(self.0.get(key).copied())
        }
        fn insert(&mut self, key: EndpointKey, value: Endpoint) -> Result<(), MapError> {
            if self.0.contains_key(&key) || self.0.is_empty() {
                self.0.insert(key, value);
                Ok(())
            } else {
                Err(MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
                }))
            }
        }
        fn remove(&mut self, key: &EndpointKey) -> Result<(), MapError> {
            self.0.remove(key);
            Ok(())
        }
        fn entries(&self) -> Result<Vec<(EndpointKey, Endpoint)>, MapError> {
            Ok(self.0.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn hash_len(&self) -> usize {
            self.0.len()
        }
    }

    #[test]
    fn a_full_map_is_said_once_and_retried() {
        let mut store = Full(StdMap::new());
        let (mut t, mut table) = (ChildTable::default(), EndpointTable::new(1));
        let first = fact("192.168.1.1", A, CONTAINER_NS, 1);
        let out = run(
            &mut t,
            &mut table,
            &mut store,
            &[
                ChildChange::Added(first.clone()),
                ChildChange::Added(fact("192.168.1.2", A, CONTAINER_NS, 2)),
                ChildChange::Added(fact("192.168.1.3", A, CONTAINER_NS, 3)),
            ],
        );
        assert_eq!(out.added, 1);
        // One episode of a full map (one warning), the two left out counted once.
        assert_eq!(table.take_dropped(), 2, "{out:?}");
        assert!(table.in_memory() == 2, "waiting for a retry");
        // Room again: the retry writes one of the waiting IPs.
        run(
            &mut t,
            &mut table,
            &mut store,
            &[ChildChange::Removed(first)],
        );
        assert_eq!(store.0.len(), 1);
        assert!(store.0.contains_key(&endpoint_key(ip("192.168.1.2"))));
        let out = run(&mut t, &mut table, &mut store, &[]);
        assert!(out.sentences.is_empty(), "said once: {out:?}");
        assert_eq!(table.take_dropped(), 0, "counted once per episode");
    }
}
