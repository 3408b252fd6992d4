//! Makes the endpoint map agree with the neighbour cache, for the entries
//! whose source is `NEIGHBOUR` only.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use aya::maps::MapError;
use flowguard_common::{endpoint_flags, source, Endpoint};

use super::{Desired, NeighCache};
use crate::{
    endpoints::{is_full, upsert, EndpointStore},
    settings::{endpoint_key, key_ip, Mac},
};

/// What [`sync_ip`] or [`reconcile`] changed in the endpoint map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapChange {
    /// A new endpoint.
    Added { ip: IpAddr, mac: Mac },
    /// The endpoint's MAC changed (and, if it was ambiguous, it no longer
    /// is): flows offloaded toward `old` are stale, evict them.
    Moved { ip: IpAddr, old: Mac, new: Mac },
    /// The kernel no longer believes in any MAC for the endpoint.
    Removed { ip: IpAddr, old: Mac },
    /// The endpoint is now ambiguous (different MACs on different
    /// interfaces): its frames are counted, never rewritten.
    Ambiguous { ip: IpAddr },
    /// The endpoint was ambiguous and is not any more; the map already held
    /// `mac`. Flows may have been offloaded toward the other MAC meanwhile,
    /// so this warrants eviction like `Moved`.
    Resolved { ip: IpAddr, mac: Mac },
}

impl MapChange {
    pub fn ip(&self) -> IpAddr {
        match *self {
            MapChange::Added { ip, .. }
            | MapChange::Moved { ip, .. }
            | MapChange::Removed { ip, .. }
            | MapChange::Ambiguous { ip }
            | MapChange::Resolved { ip, .. } => ip,
        }
    }
}

impl fmt::Display for MapChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapChange::Added { ip, mac } => {
                write!(f, "{ip} is at {mac} (neighbour table)")
            }
            MapChange::Moved { ip, old, new } => write!(
                f,
                "{ip} moved from {old} to {new} (neighbour table): flows to {old} are stale"
            ),
            MapChange::Removed { ip, old } => write!(
                f,
                "{ip} (was {old}) left the neighbour table: no longer guarded"
            ),
            MapChange::Ambiguous { ip } => write!(
                f,
                "{ip} has different MACs on different interfaces: counting its stale frames, not rewriting them"
            ),
            MapChange::Resolved { ip, mac } => {
                write!(f, "{ip} is no longer ambiguous: it is at {mac}")
            }
        }
    }
}

/// Makes the map's entry for `ip` agree with the cache, if that entry is
/// (or would be) the neighbour table's: a `STATIC` or `LEARNED` entry (any
/// source other than `NEIGHBOUR`) is left alone. Returns what changed.
pub fn sync_ip<S: EndpointStore + ?Sized>(
    map: &mut S,
    cache: &NeighCache,
    ip: IpAddr,
) -> Result<Option<MapChange>, MapError> {
    sync_store(map, cache, ip)
}

/// Makes every `NEIGHBOUR` entry of the map agree with the cache: adds,
/// moves, flags and removes (also entries whose IP left the cache or the
/// prefixes). A failure to write one entry (say, a full map) is logged and
/// the others are still synced; only failing to read the map is an error.
pub fn reconcile<S: EndpointStore + ?Sized>(
    map: &mut S,
    cache: &NeighCache,
) -> Result<Vec<MapChange>, MapError> {
    reconcile_store(map, cache)
}

/// [`sync_ip`] on any [`EndpointStore`].
pub fn sync_store<S: EndpointStore + ?Sized>(
    map: &mut S,
    cache: &NeighCache,
    ip: IpAddr,
) -> Result<Option<MapChange>, MapError> {
    let ip = ip.to_canonical();
    let key = endpoint_key(ip);
    let existing = map.get(&key)?;
    if existing.is_some_and(|e| e.source != source::NEIGHBOUR) {
        return Ok(None);
    }
    let ambiguous = |e: &Endpoint| e.flags & endpoint_flags::AMBIGUOUS != 0;
    match (cache.desired(ip), existing) {
        (Desired::Absent, None) => Ok(None),
        (Desired::Absent, Some(old)) => {
            map.remove(&key)?;
            Ok(Some(MapChange::Removed {
                ip,
                old: Mac(old.mac),
            }))
        }
        (Desired::Mac(mac), None) => {
            upsert(map, key, mac, source::NEIGHBOUR, Some(false))?;
            Ok(Some(MapChange::Added { ip, mac }))
        }
        (Desired::Mac(mac), Some(old)) => {
            if old.mac == mac.0 && !ambiguous(&old) {
                return Ok(None);
            }
            upsert(map, key, mac, source::NEIGHBOUR, Some(false))?;
            Ok(Some(if old.mac != mac.0 {
                MapChange::Moved {
                    ip,
                    old: Mac(old.mac),
                    new: mac,
                }
            } else {
                MapChange::Resolved { ip, mac }
            }))
        }
        (Desired::Ambiguous(shown), old) => {
            // Keep the MAC the map holds while it is one of the candidates:
            // frames to it are not counted as stale for nothing.
            let keep = old
                .map(|o| Mac(o.mac))
                .filter(|m| cache.entries(ip).any(|(_, c, _)| c == *m));
            let mac = keep.unwrap_or(shown);
            let was_ambiguous = old.as_ref().is_some_and(ambiguous);
            if was_ambiguous && keep.is_some() {
                return Ok(None);
            }
            upsert(map, key, mac, source::NEIGHBOUR, Some(true))?;
            Ok((!was_ambiguous).then_some(MapChange::Ambiguous { ip }))
        }
    }
}

/// [`reconcile`] on any [`EndpointStore`].
pub fn reconcile_store<S: EndpointStore + ?Sized>(
    map: &mut S,
    cache: &NeighCache,
) -> Result<Vec<MapChange>, MapError> {
    let mut ips: BTreeSet<IpAddr> = cache.ips().collect();
    for (key, value) in map.entries()? {
        if value.source == source::NEIGHBOUR {
            ips.insert(key_ip(&key));
        }
    }
    let mut changes = Vec::new();
    for ip in ips {
        match sync_store(map, cache, ip) {
            Ok(Some(c)) => changes.push(c),
            Ok(None) => {}
            // The caller says once that the map is full, not once per IP.
            Err(e) if is_full(&e) => {
                log::debug!("endpoint {ip} left out: the endpoint map is full")
            }
            Err(e) => log::warn!("cannot update endpoint {ip} in the endpoint map: {e}"),
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap as Store;

    use flowguard_common::EndpointKey;

    use super::super::{nud, NeighEntry, NeighEvent};
    use super::*;

    const A: Mac = Mac([0x02, 0, 0, 0, 0, 0xaa]);
    const B: Mac = Mac([0x02, 0, 0, 0, 0, 0xbb]);
    const C: Mac = Mac([0x02, 0, 0, 0, 0, 0xcc]);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cache() -> NeighCache {
        NeighCache::new(vec!["192.168.1.0/24".parse().unwrap()])
    }

    fn set(c: &mut NeighCache, ip_s: &str, ifindex: u32, mac: Mac) {
        c.apply(&NeighEvent::Update(NeighEntry {
            ip: ip(ip_s),
            ifindex,
            mac: Some(mac),
            state: nud::REACHABLE,
        }));
    }

    fn gone(c: &mut NeighCache, ip_s: &str, ifindex: u32) {
        c.apply(&NeighEvent::Delete {
            ip: ip(ip_s),
            ifindex,
        });
    }

    fn at(map: &Store<EndpointKey, Endpoint>, ip_s: &str) -> Option<Endpoint> {
        map.get(&endpoint_key(ip(ip_s))).copied()
    }

    #[test]
    fn add_move_with_evidence_and_remove() {
        let (mut c, mut map) = (cache(), Store::new());
        let x = ip("192.168.1.240");
        assert_eq!(sync_store(&mut map, &c, x).unwrap(), None);
        set(&mut c, "192.168.1.240", 5, A);
        assert_eq!(
            sync_store(&mut map, &c, x).unwrap(),
            Some(MapChange::Added { ip: x, mac: A })
        );
        let e = at(&map, "192.168.1.240").unwrap();
        assert_eq!((e.mac, e.source, e.flags), (A.0, source::NEIGHBOUR, 0));
        assert_eq!(sync_store(&mut map, &c, x).unwrap(), None);
        // The kernel side gathers evidence...
        let key = endpoint_key(x);
        let ev = map.get_mut(&key).unwrap();
        ev.stale_packets = 7;
        ev.last_stale_mac = C.0;
        ev.last_event_jiffies = 99;
        // ...then the MAC changes with a single update.
        set(&mut c, "192.168.1.240", 5, B);
        assert_eq!(
            sync_store(&mut map, &c, x).unwrap(),
            Some(MapChange::Moved {
                ip: x,
                old: A,
                new: B
            })
        );
        let e = at(&map, "192.168.1.240").unwrap();
        assert_eq!(
            (
                e.mac,
                e.stale_packets,
                e.last_stale_mac,
                e.last_event_jiffies
            ),
            (B.0, 7, C.0, 0)
        );
        gone(&mut c, "192.168.1.240", 5);
        assert_eq!(
            sync_store(&mut map, &c, x).unwrap(),
            Some(MapChange::Removed { ip: x, old: B })
        );
        assert!(map.is_empty());
    }

    #[test]
    fn static_and_learned_entries_are_never_touched() {
        let (mut c, mut map) = (cache(), Store::new());
        for (i, src) in [source::STATIC, source::LEARNED, 0].into_iter().enumerate() {
            let s = format!("192.168.1.{}", 10 + i);
            let theirs = Endpoint {
                mac: C.0,
                source: src,
                ..Default::default()
            };
            map.insert(endpoint_key(ip(&s)), theirs);
            set(&mut c, &s, 5, A);
            assert_eq!(sync_store(&mut map, &c, ip(&s)).unwrap(), None);
            gone(&mut c, &s, 5);
            assert_eq!(sync_store(&mut map, &c, ip(&s)).unwrap(), None);
            assert_eq!(at(&map, &s), Some(theirs));
        }
        assert!(reconcile_store(&mut map, &c).unwrap().is_empty());
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn ambiguity_is_flagged_and_cleared() {
        let (mut c, mut map) = (cache(), Store::new());
        let x = ip("192.168.1.240");
        set(&mut c, "192.168.1.240", 5, A);
        sync_store(&mut map, &c, x).unwrap();
        map.get_mut(&endpoint_key(x)).unwrap().stale_packets = 3;
        set(&mut c, "192.168.1.240", 2, B);
        assert_eq!(
            sync_store(&mut map, &c, x).unwrap(),
            Some(MapChange::Ambiguous { ip: x })
        );
        let e = at(&map, "192.168.1.240").unwrap();
        // The MAC the map held is one of the candidates: kept, with the evidence.
        assert_eq!(
            (e.mac, e.flags, e.stale_packets),
            (A.0, endpoint_flags::AMBIGUOUS, 3)
        );
        assert_eq!(sync_store(&mut map, &c, x).unwrap(), None);
        // The candidate the map held leaves; still ambiguous between B and C.
        set(&mut c, "192.168.1.240", 5, C);
        assert_eq!(sync_store(&mut map, &c, x).unwrap(), None);
        let e = at(&map, "192.168.1.240").unwrap();
        assert_eq!((e.mac, e.flags), (B.0, endpoint_flags::AMBIGUOUS));
        // Resolved toward the MAC the map holds...
        gone(&mut c, "192.168.1.240", 5);
        assert_eq!(
            sync_store(&mut map, &c, x).unwrap(),
            Some(MapChange::Resolved { ip: x, mac: B })
        );
        assert_eq!(at(&map, "192.168.1.240").unwrap().flags, 0);
        // ...or toward another one.
        set(&mut c, "192.168.1.240", 5, A);
        sync_store(&mut map, &c, x).unwrap();
        gone(&mut c, "192.168.1.240", 2);
        assert_eq!(
            sync_store(&mut map, &c, x).unwrap(),
            Some(MapChange::Moved {
                ip: x,
                old: B,
                new: A
            })
        );
        let e = at(&map, "192.168.1.240").unwrap();
        assert_eq!((e.mac, e.flags, e.stale_packets), (A.0, 0, 3));
        // A new endpoint can start ambiguous.
        set(&mut c, "192.168.1.241", 5, A);
        set(&mut c, "192.168.1.241", 2, B);
        assert_eq!(
            sync_store(&mut map, &c, ip("192.168.1.241")).unwrap(),
            Some(MapChange::Ambiguous {
                ip: ip("192.168.1.241")
            })
        );
        assert_eq!(
            at(&map, "192.168.1.241").unwrap().flags,
            endpoint_flags::AMBIGUOUS
        );
        // Removal of an ambiguous endpoint.
        gone(&mut c, "192.168.1.241", 5);
        gone(&mut c, "192.168.1.241", 2);
        assert!(matches!(
            sync_store(&mut map, &c, ip("192.168.1.241")).unwrap(),
            Some(MapChange::Removed { .. })
        ));
    }

    #[test]
    fn reconcile_adds_fixes_and_removes_what_the_cache_lacks() {
        let (mut c, mut map) = (cache(), Store::new());
        set(&mut c, "192.168.1.1", 5, A); // missing from the map
        set(&mut c, "192.168.1.2", 5, B); // wrong MAC in the map
        set(&mut c, "192.168.1.3", 5, C); // right already
        let ours = |mac: Mac| Endpoint {
            mac: mac.0,
            source: source::NEIGHBOUR,
            ..Default::default()
        };
        map.insert(endpoint_key(ip("192.168.1.2")), ours(A));
        map.insert(endpoint_key(ip("192.168.1.3")), ours(C));
        map.insert(endpoint_key(ip("192.168.1.4")), ours(A)); // no longer in the table
        map.insert(endpoint_key(ip("10.9.9.9")), ours(A)); // outside the prefixes now
        let mut changes = reconcile_store(&mut map, &c).unwrap();
        changes.sort_by_key(|c| c.ip());
        assert_eq!(
            changes,
            vec![
                MapChange::Removed {
                    ip: ip("10.9.9.9"),
                    old: A
                },
                MapChange::Added {
                    ip: ip("192.168.1.1"),
                    mac: A
                },
                MapChange::Moved {
                    ip: ip("192.168.1.2"),
                    old: A,
                    new: B
                },
                MapChange::Removed {
                    ip: ip("192.168.1.4"),
                    old: A
                },
            ]
        );
        assert_eq!(map.len(), 3);
        assert!(reconcile_store(&mut map, &c).unwrap().is_empty());
        for ch in &changes {
            assert!(ch.to_string().contains(&ch.ip().to_string()));
        }
    }
}
