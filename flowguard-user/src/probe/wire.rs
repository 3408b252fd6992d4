//! ARP requests and replies as they travel in an `AF_PACKET`/`SOCK_DGRAM`
//! socket (the kernel adds and strips the Ethernet header).

use std::net::Ipv4Addr;

use crate::settings::Mac;

/// An Ethernet/IPv4 ARP packet is 28 bytes.
pub const ARP_LEN: usize = 28;
const HTYPE_ETHERNET: u16 = 1;
const PTYPE_IPV4: u16 = 0x0800;
const OP_REQUEST: u16 = 1;
const OP_REPLY: u16 = 2;

pub const BROADCAST: Mac = Mac([0xff; 6]);

/// An ARP request from `sender` (`sender_mac`, `sender_ip`) asking who has
/// `target`. `target_mac` is what the request carries in its target
/// hardware field: the cached MAC for a unicast probe (as the kernel's own
/// unicast probes do), all-zero for a broadcast one.
pub fn request(
    sender_mac: Mac,
    sender_ip: Ipv4Addr,
    target_mac: Mac,
    target: Ipv4Addr,
) -> [u8; ARP_LEN] {
    let mut p = [0u8; ARP_LEN];
    p[0..2].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
    p[2..4].copy_from_slice(&PTYPE_IPV4.to_be_bytes());
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&OP_REQUEST.to_be_bytes());
    p[8..14].copy_from_slice(&sender_mac.0);
    p[14..18].copy_from_slice(&sender_ip.octets());
    p[18..24].copy_from_slice(&target_mac.0);
    p[24..28].copy_from_slice(&target.octets());
    p
}

/// An ARP reply: who answered (`sender_ip` is at `sender_mac`) and to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

/// Decodes an Ethernet/IPv4 ARP reply; anything else (requests, other
/// hardware or protocol types, short packets) is `None`.
pub fn parse_reply(p: &[u8]) -> Option<Reply> {
    if p.len() < ARP_LEN
        || u16::from_be_bytes([p[0], p[1]]) != HTYPE_ETHERNET
        || u16::from_be_bytes([p[2], p[3]]) != PTYPE_IPV4
        || p[4] != 6
        || p[5] != 4
        || u16::from_be_bytes([p[6], p[7]]) != OP_REPLY
    {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&p[8..14]);
    Some(Reply {
        sender_mac: Mac(mac),
        sender_ip: Ipv4Addr::new(p[14], p[15], p[16], p[17]),
        target_ip: Ipv4Addr::new(p[24], p[25], p[26], p[27]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_has_the_layout_of_rfc_826() {
        let me = Mac([2, 0, 0, 0, 0, 1]);
        let cached = Mac([2, 0, 0, 0, 0, 0xf0]);
        let p = request(
            me,
            Ipv4Addr::new(192, 168, 1, 1),
            cached,
            Ipv4Addr::new(192, 168, 1, 240),
        );
        assert_eq!(
            p,
            [
                0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 192, 168, 1, 1, 2, 0, 0, 0, 0, 0xf0, 192,
                168, 1, 240
            ]
        );
        // A request is not a reply.
        assert_eq!(parse_reply(&p), None);
    }

    #[test]
    fn a_reply_is_decoded_and_anything_else_is_not() {
        let mut p = request(
            Mac([2, 0, 0, 0, 0, 0xb]),
            Ipv4Addr::new(192, 168, 1, 240),
            Mac([2, 0, 0, 0, 0, 1]),
            Ipv4Addr::new(192, 168, 1, 1),
        );
        p[7] = 2;
        assert_eq!(
            parse_reply(&p),
            Some(Reply {
                sender_mac: Mac([2, 0, 0, 0, 0, 0xb]),
                sender_ip: Ipv4Addr::new(192, 168, 1, 240),
                target_ip: Ipv4Addr::new(192, 168, 1, 1),
            })
        );
        // Padding after the 28 bytes (a minimum-size frame) is fine.
        let mut padded = p.to_vec();
        padded.extend([0; 18]);
        assert!(parse_reply(&padded).is_some());
        assert_eq!(parse_reply(&p[..27]), None, "short");
        for (i, v) in [(1, 6), (3, 0xdd), (4, 8), (5, 16), (7, 3)] {
            let mut q = p;
            q[i] = v;
            assert_eq!(parse_reply(&q), None, "byte {i} = {v}");
        }
    }
}
