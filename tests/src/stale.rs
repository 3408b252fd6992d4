//! The stand-in for a flowtable's cached MAC on this machine's kernel (which
//! has no flowtable): an nftables netdev-family egress rule that sets the
//! destination MAC of every IPv4 frame to one address. It runs before tc
//! egress, where flowguard sits, like the flowtable's direct transmit.

use std::net::Ipv4Addr;

use crate::netns::Netns;

const STALE_TABLE: &str = "flowguard_stale";

/// Makes every IPv4 frame to `ip` leave `port` in `ns` with destination MAC
/// `mac`, whatever the neighbour table says (replacing an earlier rule).
pub fn set_stale(ns: &Netns, port: &str, ip: Ipv4Addr, mac: &str) {
    clear_stale(ns);
    let script = format!(
        "add table netdev {STALE_TABLE}; \
         add chain netdev {STALE_TABLE} egress \
         {{ type filter hook egress device {port} priority 0; }}; \
         add rule netdev {STALE_TABLE} egress ip daddr {ip} ether daddr set {mac}"
    );
    ns.exec(&["nft", &script]);
}

/// Removes the rule, if any.
pub fn clear_stale(ns: &Netns) {
    // `add` first makes the delete succeed whether or not the table exists.
    let script = format!("add table netdev {STALE_TABLE}; delete table netdev {STALE_TABLE}");
    ns.exec(&["nft", &script]);
}
