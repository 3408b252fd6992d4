//! ARP requests and replies as they travel in an `AF_PACKET`/`SOCK_DGRAM`
//! socket (the kernel adds and strips the Ethernet header), and IPv6
//! neighbour solicitations and advertisements as they travel in a raw
//! ICMPv6 socket (the kernel adds the IPv6 header and the checksum).

use std::net::{Ipv4Addr, Ipv6Addr};

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

const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_OPT_SOURCE_LINKADDR: u8 = 1;
const ND_OPT_TARGET_LINKADDR: u8 = 2;
/// A neighbour solicitation with a source link-layer address option.
pub const NS_LEN: usize = 32;

/// A neighbour solicitation (RFC 4861 4.3) for `target`, from a host whose
/// MAC is `own_mac` (so that the answer needs no resolution of its own).
pub fn neighbour_solicitation(target: Ipv6Addr, own_mac: Mac) -> [u8; NS_LEN] {
    let mut p = [0u8; NS_LEN];
    p[0] = ND_NEIGHBOR_SOLICIT;
    p[8..24].copy_from_slice(&target.octets());
    p[24] = ND_OPT_SOURCE_LINKADDR;
    p[25] = 1; // in units of 8 bytes
    p[26..32].copy_from_slice(&own_mac.0);
    p
}

/// The solicited-node multicast address of `ip` (RFC 4291 2.7.1): where a
/// neighbour solicitation goes when the answering MAC is not known.
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// A neighbour advertisement: for which address, and the MAC it gives (an
/// answer to a unicast solicitation may carry none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advertisement {
    pub target: Ipv6Addr,
    pub mac: Option<Mac>,
}

/// Decodes a neighbour advertisement (ICMPv6 type 136, from the ICMPv6
/// header on); anything else, or malformed options, is `None`.
pub fn parse_advertisement(p: &[u8]) -> Option<Advertisement> {
    if p.len() < 24 || p[0] != ND_NEIGHBOR_ADVERT || p[1] != 0 {
        return None;
    }
    let mut target = [0u8; 16];
    target.copy_from_slice(&p[8..24]);
    let mut mac = None;
    let mut opts = &p[24..];
    while opts.len() >= 2 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        if opts[0] == ND_OPT_TARGET_LINKADDR && len == 8 {
            let mut m = [0u8; 6];
            m.copy_from_slice(&opts[2..8]);
            mac = Some(Mac(m));
        }
        opts = &opts[len..];
    }
    Some(Advertisement {
        target: Ipv6Addr::from(target),
        mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_solicitation_and_its_multicast_address_follow_rfc_4861() {
        let target: Ipv6Addr = "fd00:1::12:3456".parse().unwrap();
        let p = neighbour_solicitation(target, Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(p[0], 135);
        assert_eq!(&p[1..8], &[0; 7], "code, checksum (the kernel's), reserved");
        assert_eq!(&p[8..24], &target.octets());
        assert_eq!(&p[24..32], &[1, 1, 2, 0, 0, 0, 0, 1]);
        assert_eq!(
            solicited_node(target),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn an_advertisement_is_decoded_with_or_without_its_mac() {
        let target: Ipv6Addr = "fd00:1::240".parse().unwrap();
        let mut p = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        p.extend(target.octets());
        let bare = p.clone();
        assert_eq!(
            parse_advertisement(&bare),
            Some(Advertisement { target, mac: None })
        );
        p.extend([2, 1, 2, 0x42, 0, 0, 0, 0xb]);
        assert_eq!(
            parse_advertisement(&p),
            Some(Advertisement {
                target,
                mac: Some(Mac([2, 0x42, 0, 0, 0, 0xb]))
            })
        );
        let mut zero_len = bare.clone();
        zero_len.extend([2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            parse_advertisement(&zero_len),
            None,
            "an option of length 0"
        );
        let mut long = bare.clone();
        long.extend([2, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_advertisement(&long), None, "an option past the end");
        let mut ns = bare;
        ns[0] = 135;
        assert_eq!(parse_advertisement(&ns), None, "a solicitation");
        assert_eq!(parse_advertisement(&p[..23]), None, "short");
    }

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
