//! The pure policy: which MAC the neighbour table says each watched IP has.

use std::{collections::BTreeMap, net::IpAddr, ops::RangeInclusive};

use super::{NeighEntry, NeighEvent};
use crate::settings::{Mac, Prefix};

/// What the endpoint map should hold for an IP, according to the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desired {
    /// Every usable entry of the IP agrees on this MAC.
    Mac(Mac),
    /// Usable entries on several interfaces disagree; one of their MACs (the
    /// one on the lowest ifindex), for display.
    Ambiguous(Mac),
    /// No usable entry: the kernel believes in no MAC for the IP.
    Absent,
}

/// Usable neighbour entries `(ip, ifindex) -> (mac, state)`, for IPs inside
/// the configured prefixes only.
///
/// One flat ordered map keyed by `(ip, ifindex)`: an IP's entries are
/// adjacent and ordered by ifindex (so the displayed MAC is stable), and an
/// entry costs about 50 bytes, where a hash map of per-IP maps cost about
/// 400 (a router with 16,000 endpoints must stay within 4 MB resident).
#[derive(Clone, Debug)]
pub struct NeighCache {
    prefixes: Vec<Prefix>,
    entries: BTreeMap<(IpAddr, u32), (Mac, u16)>,
    /// Distinct IPs in `entries`.
    ips: usize,
}

/// Every key of `ip`'s entries.
fn range_of(ip: IpAddr) -> RangeInclusive<(IpAddr, u32)> {
    (ip, 0)..=(ip, u32::MAX)
}

impl NeighCache {
    pub fn new(prefixes: Vec<Prefix>) -> Self {
        Self {
            prefixes,
            entries: BTreeMap::new(),
            ips: 0,
        }
    }

    fn has(&self, ip: IpAddr) -> bool {
        self.entries.range(range_of(ip)).next().is_some()
    }

    /// The ifindex → MAC view of one IP's entries, for change detection (a
    /// state change alone, e.g. REACHABLE → STALE, changes nothing desired).
    fn macs_of(&self, ip: IpAddr) -> impl Iterator<Item = (u32, Mac)> + '_ {
        self.entries
            .range(range_of(ip))
            .map(|((_, i), (mac, _))| (*i, *mac))
    }

    /// The configured prefixes.
    pub fn prefixes(&self) -> &[Prefix] {
        &self.prefixes
    }

    fn watched(&self, ip: IpAddr) -> bool {
        self.prefixes.iter().any(|p| p.contains(ip))
    }

    /// Applies one event; returns the IPs whose desired state may have
    /// changed (empty for an ignored event, a state-only change, and
    /// [`NeighEvent::Overflow`], after which the caller must dump and
    /// [`NeighCache::replace_all`]).
    pub fn apply(&mut self, ev: &NeighEvent) -> Vec<IpAddr> {
        let (ip, ifindex, usable) = match *ev {
            NeighEvent::Update(e) => (
                e.ip.to_canonical(),
                e.ifindex,
                e.usable_mac().map(|m| (m, e.state)),
            ),
            NeighEvent::Delete { ip, ifindex } => (ip.to_canonical(), ifindex, None),
            NeighEvent::Overflow => return Vec::new(),
        };
        if !self.watched(ip) {
            return Vec::new();
        }
        let changed = match usable {
            Some((mac, state)) => {
                let known = self.has(ip);
                let old = self.entries.insert((ip, ifindex), (mac, state));
                if !known {
                    self.ips += 1;
                }
                old.map(|(m, _)| m) != Some(mac)
            }
            None => {
                let removed = self.entries.remove(&(ip, ifindex)).is_some();
                if removed && !self.has(ip) {
                    self.ips -= 1;
                }
                removed
            }
        };
        if changed {
            vec![ip]
        } else {
            Vec::new()
        }
    }

    /// Replaces the whole cache with a dump; returns the IPs whose entries
    /// differ from before (sorted).
    pub fn replace_all(&mut self, entries: Vec<NeighEntry>) -> Vec<IpAddr> {
        let prefixes = std::mem::take(&mut self.prefixes);
        // Collected at once: the map is built from sorted entries with full
        // nodes (inserting one by one leaves them about two-thirds full).
        let entries = entries
            .into_iter()
            .filter_map(|e| {
                let ip = e.ip.to_canonical();
                let mac = e.usable_mac()?;
                prefixes
                    .iter()
                    .any(|p| p.contains(ip))
                    .then_some(((ip, e.ifindex), (mac, e.state)))
            })
            .collect();
        let mut fresh = Self {
            prefixes,
            entries,
            ips: 0,
        };
        fresh.ips = fresh.ips().count();
        let mut ips: Vec<IpAddr> = self.ips().chain(fresh.ips()).collect();
        ips.sort_unstable();
        ips.dedup();
        let changed = ips
            .into_iter()
            .filter(|ip| self.macs_of(*ip).ne(fresh.macs_of(*ip)))
            .collect();
        *self = fresh;
        changed
    }

    /// What the endpoint map should hold for `ip`.
    pub fn desired(&self, ip: IpAddr) -> Desired {
        let mut macs = self
            .entries
            .range(range_of(ip.to_canonical()))
            .map(|(_, (m, _))| *m);
        let Some(first) = macs.next() else {
            return Desired::Absent;
        };
        if macs.all(|m| m == first) {
            Desired::Mac(first)
        } else {
            Desired::Ambiguous(first)
        }
    }

    /// Where to ask `ip` about its MAC: `(ifindex, mac)` of its first entry,
    /// when its entries agree on the MAC.
    pub fn target(&self, ip: IpAddr) -> Option<(u32, Mac)> {
        match self.desired(ip) {
            Desired::Mac(mac) => self
                .entries(ip)
                .next()
                .map(|(ifindex, _, _)| (ifindex, mac)),
            Desired::Ambiguous(_) | Desired::Absent => None,
        }
    }

    /// The usable entries of `ip`: `(ifindex, mac, state)`, by ifindex.
    pub fn entries(&self, ip: IpAddr) -> impl Iterator<Item = (u32, Mac, u16)> + '_ {
        self.entries
            .range(range_of(ip.to_canonical()))
            .map(|((_, i), (mac, st))| (*i, *mac, *st))
    }

    /// Every IP with at least one usable entry.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let mut last = None;
        self.entries
            .keys()
            .map(|(ip, _)| *ip)
            .filter(move |ip| last.replace(*ip) != Some(*ip))
    }

    /// Number of IPs with at least one usable entry.
    pub fn len(&self) -> usize {
        self.ips
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::nud;
    use super::*;

    const A: Mac = Mac([0x02, 0, 0, 0, 0, 0xaa]);
    const B: Mac = Mac([0x02, 0, 0, 0, 0, 0xbb]);
    const BR: u32 = 5;
    const WG: u32 = 9;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cache() -> NeighCache {
        NeighCache::new(vec![
            "192.168.1.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ])
    }

    fn upd(ip_s: &str, ifindex: u32, mac: Option<Mac>, state: u16) -> NeighEvent {
        NeighEvent::Update(NeighEntry {
            ip: ip(ip_s),
            ifindex,
            mac,
            state,
        })
    }

    fn del(ip_s: &str, ifindex: u32) -> NeighEvent {
        NeighEvent::Delete {
            ip: ip(ip_s),
            ifindex,
        }
    }

    #[test]
    fn each_state() {
        let believed = [
            nud::REACHABLE,
            nud::STALE,
            nud::DELAY,
            nud::PROBE,
            nud::PERMANENT,
            nud::NOARP,
        ];
        let not_believed = [nud::NONE, nud::INCOMPLETE, nud::FAILED];
        for state in believed {
            let mut c = cache();
            assert_eq!(
                c.apply(&upd("192.168.1.240", BR, Some(A), state)),
                vec![ip("192.168.1.240")]
            );
            assert_eq!(
                c.desired(ip("192.168.1.240")),
                Desired::Mac(A),
                "{}",
                nud::name(state)
            );
            // Without a MAC the same state is not believed.
            assert_eq!(
                c.apply(&upd("192.168.1.240", BR, None, state)),
                vec![ip("192.168.1.240")]
            );
            assert_eq!(
                c.desired(ip("192.168.1.240")),
                Desired::Absent,
                "{}",
                nud::name(state)
            );
        }
        for state in not_believed {
            let mut c = cache();
            // Never enters the cache, even with a MAC...
            assert!(c
                .apply(&upd("192.168.1.240", BR, Some(A), state))
                .is_empty());
            assert_eq!(
                c.desired(ip("192.168.1.240")),
                Desired::Absent,
                "{}",
                nud::name(state)
            );
            // ...and removes a believed entry: the kernel gave up on its MAC.
            c.apply(&upd("192.168.1.240", BR, Some(A), nud::REACHABLE));
            assert_eq!(
                c.apply(&upd("192.168.1.240", BR, Some(A), state)),
                vec![ip("192.168.1.240")]
            );
            assert_eq!(
                c.desired(ip("192.168.1.240")),
                Desired::Absent,
                "{}",
                nud::name(state)
            );
            assert!(c.is_empty());
        }
        // A state with an invalid bit mixed in is not believed.
        let mut c = cache();
        c.apply(&upd("192.168.1.240", BR, Some(A), nud::STALE | nud::FAILED));
        assert_eq!(c.desired(ip("192.168.1.240")), Desired::Absent);
    }

    #[test]
    fn multicast_broadcast_and_zero_macs_are_not_believed() {
        let mut c = cache();
        for mac in [
            Mac([0x01, 0x00, 0x5e, 0, 0, 1]),
            Mac([0xff; 6]),
            Mac([0x33, 0x33, 0, 0, 0, 1]),
            Mac([0; 6]),
        ] {
            c.apply(&upd("192.168.1.240", BR, Some(mac), nud::NOARP));
            assert_eq!(c.desired(ip("192.168.1.240")), Desired::Absent, "{mac}");
        }
    }

    #[test]
    fn mac_change_is_a_single_update() {
        let mut c = cache();
        c.apply(&upd("192.168.1.240", BR, Some(A), nud::REACHABLE));
        // A state-only change changes nothing desired.
        assert!(c
            .apply(&upd("192.168.1.240", BR, Some(A), nud::STALE))
            .is_empty());
        assert_eq!(
            c.apply(&upd("192.168.1.240", BR, Some(B), nud::STALE)),
            vec![ip("192.168.1.240")]
        );
        assert_eq!(c.desired(ip("192.168.1.240")), Desired::Mac(B));
        assert_eq!(
            c.entries(ip("192.168.1.240")).collect::<Vec<_>>(),
            vec![(BR, B, nud::STALE)]
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn delete() {
        let mut c = cache();
        c.apply(&upd("fd00:1::f0", BR, Some(A), nud::REACHABLE));
        assert_eq!(c.desired(ip("fd00:1::f0")), Desired::Mac(A));
        // Deleting another interface's entry, or an unknown IP, changes nothing.
        assert!(c.apply(&del("fd00:1::f0", WG)).is_empty());
        assert!(c.apply(&del("fd00:1::f1", BR)).is_empty());
        assert_eq!(c.apply(&del("fd00:1::f0", BR)), vec![ip("fd00:1::f0")]);
        assert_eq!(c.desired(ip("fd00:1::f0")), Desired::Absent);
        assert_eq!(c.ips().count(), 0);
        assert!(c.apply(&NeighEvent::Overflow).is_empty());
    }

    #[test]
    fn ambiguity_across_interfaces_and_its_resolution() {
        let mut c = cache();
        let x = ip("192.168.1.240");
        c.apply(&upd("192.168.1.240", WG, Some(A), nud::REACHABLE));
        // The same MAC on a second interface is not ambiguous.
        c.apply(&upd("192.168.1.240", BR, Some(A), nud::STALE));
        assert_eq!(c.desired(x), Desired::Mac(A));
        assert_eq!(
            c.apply(&upd("192.168.1.240", BR, Some(B), nud::STALE)),
            vec![x]
        );
        // The displayed MAC is the lowest ifindex's.
        assert_eq!(c.desired(x), Desired::Ambiguous(B));
        assert_eq!(c.entries(x).count(), 2);
        // Resolved when one of them fails...
        assert_eq!(
            c.apply(&upd("192.168.1.240", WG, Some(A), nud::FAILED)),
            vec![x]
        );
        assert_eq!(c.desired(x), Desired::Mac(B));
        // ...or is deleted, or agrees again.
        c.apply(&upd("192.168.1.240", WG, Some(A), nud::REACHABLE));
        assert!(matches!(c.desired(x), Desired::Ambiguous(_)));
        c.apply(&del("192.168.1.240", BR));
        assert_eq!(c.desired(x), Desired::Mac(A));
        c.apply(&upd("192.168.1.240", BR, Some(B), nud::REACHABLE));
        c.apply(&upd("192.168.1.240", WG, Some(B), nud::REACHABLE));
        assert_eq!(c.desired(x), Desired::Mac(B));
    }

    #[test]
    fn prefix_filtering() {
        let mut c = cache();
        for outside in ["192.168.2.240", "10.0.0.1", "fd00:2::1", "fe80::1"] {
            assert!(c
                .apply(&upd(outside, BR, Some(A), nud::REACHABLE))
                .is_empty());
            assert_eq!(c.desired(ip(outside)), Desired::Absent);
            assert!(c.apply(&del(outside, BR)).is_empty());
        }
        assert!(c.is_empty());
        // An IPv4-mapped IPv6 address is the IPv4 endpoint.
        assert_eq!(
            c.apply(&upd("::ffff:192.168.1.240", BR, Some(A), nud::REACHABLE)),
            vec![ip("192.168.1.240")]
        );
        assert_eq!(c.desired(ip("192.168.1.240")), Desired::Mac(A));
        assert_eq!(c.desired(ip("::ffff:192.168.1.240")), Desired::Mac(A));
    }

    #[test]
    fn replace_all_after_overflow() {
        let mut c = cache();
        c.apply(&upd("192.168.1.10", BR, Some(A), nud::REACHABLE)); // unchanged
        c.apply(&upd("192.168.1.11", BR, Some(A), nud::REACHABLE)); // MAC changes
        c.apply(&upd("192.168.1.12", BR, Some(A), nud::REACHABLE)); // gone
        c.apply(&upd("192.168.1.13", BR, Some(A), nud::REACHABLE)); // state only
        let dump = vec![
            NeighEntry {
                ip: ip("192.168.1.10"),
                ifindex: BR,
                mac: Some(A),
                state: nud::REACHABLE,
            },
            NeighEntry {
                ip: ip("192.168.1.11"),
                ifindex: BR,
                mac: Some(B),
                state: nud::STALE,
            },
            NeighEntry {
                ip: ip("192.168.1.13"),
                ifindex: BR,
                mac: Some(A),
                state: nud::STALE,
            },
            NeighEntry {
                ip: ip("192.168.1.14"),
                ifindex: BR,
                mac: Some(B),
                state: nud::PERMANENT,
            }, // new
            NeighEntry {
                ip: ip("192.168.1.15"),
                ifindex: BR,
                mac: None,
                state: nud::INCOMPLETE,
            }, // unusable
            NeighEntry {
                ip: ip("192.168.9.1"),
                ifindex: BR,
                mac: Some(B),
                state: nud::STALE,
            }, // outside
        ];
        assert_eq!(
            c.replace_all(dump),
            vec![ip("192.168.1.11"), ip("192.168.1.12"), ip("192.168.1.14")]
        );
        assert_eq!(c.desired(ip("192.168.1.11")), Desired::Mac(B));
        assert_eq!(c.desired(ip("192.168.1.12")), Desired::Absent);
        assert_eq!(c.desired(ip("192.168.1.15")), Desired::Absent);
        assert_eq!(c.desired(ip("192.168.9.1")), Desired::Absent);
        let mut ips: Vec<_> = c.ips().collect();
        ips.sort();
        assert_eq!(
            ips,
            vec![
                ip("192.168.1.10"),
                ip("192.168.1.11"),
                ip("192.168.1.13"),
                ip("192.168.1.14")
            ]
        );
        // The prefixes survive the replacement.
        assert_eq!(c.prefixes().len(), 2);
        assert!(c.replace_all(Vec::new()).len() == 4 && c.is_empty());
    }
}
