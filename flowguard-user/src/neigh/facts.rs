//! What the neighbour cache says, as facts for the endpoint table.

use std::net::IpAddr;

use super::{Desired, NeighCache};
use crate::endpoints::{Fact, Origin, Says};

/// The neighbour table's fact about `ip` now.
pub fn fact(cache: &NeighCache, ip: IpAddr) -> Fact {
    let ip = ip.to_canonical();
    let says = match cache.desired(ip) {
        Desired::Mac(mac) => Says::At(mac),
        Desired::Ambiguous(shown) => {
            let mut candidates = vec![shown];
            for (_, mac, _) in cache.entries(ip) {
                if !candidates.contains(&mac) {
                    candidates.push(mac);
                }
            }
            Says::Split(candidates)
        }
        Desired::Absent => Says::Gone,
    };
    Fact {
        ip,
        origin: Origin::Neighbour,
        says,
    }
}

/// The facts about `ips` (those an event touched).
pub fn facts(cache: &NeighCache, ips: impl IntoIterator<Item = IpAddr>) -> Vec<Fact> {
    ips.into_iter().map(|ip| fact(cache, ip)).collect()
}

/// Every fact of the cache, for [`crate::endpoints::EndpointTable::reconcile`].
pub fn all_facts(cache: &NeighCache) -> Vec<Fact> {
    facts(cache, cache.ips())
}

#[cfg(test)]
mod tests {
    use super::super::{nud, NeighEntry, NeighEvent};
    use super::*;
    use crate::settings::Mac;

    const A: Mac = Mac([0x02, 0, 0, 0, 0, 0xaa]);
    const B: Mac = Mac([0x02, 0, 0, 0, 0, 0xbb]);

    fn set(c: &mut NeighCache, ip: &str, ifindex: u32, mac: Mac) {
        c.apply(&NeighEvent::Update(NeighEntry {
            ip: ip.parse().unwrap(),
            ifindex,
            mac: Some(mac),
            state: nud::REACHABLE,
        }));
    }

    #[test]
    fn one_mac_two_macs_and_none() {
        let mut c = NeighCache::new(vec!["192.168.1.0/24".parse().unwrap()]);
        let x: IpAddr = "192.168.1.240".parse().unwrap();
        assert_eq!(fact(&c, x).says, Says::Gone);
        set(&mut c, "192.168.1.240", 9, A);
        assert_eq!(fact(&c, x).says, Says::At(A));
        // The lowest ifindex's MAC is shown first.
        set(&mut c, "192.168.1.240", 5, B);
        assert_eq!(fact(&c, x).says, Says::Split(vec![B, A]));
        assert_eq!(all_facts(&c).len(), 1);
        assert_eq!(fact(&c, x).origin, Origin::Neighbour);
    }
}
