//! rtnetlink neighbour messages: decoding what the kernel sends, encoding
//! the dump request. The message formats come from netlink-packet-route;
//! this file only decides what each message means for flowguard.

use std::net::IpAddr;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
    AddressFamily, RouteNetlinkMessage,
};

use super::{NeighEntry, NeighEvent};
use crate::{
    netlink::{self, Control},
    settings::Mac,
};

/// What one netlink message means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Message {
    /// A neighbour entry (dump reply or `RTM_NEWNEIGH`) or its deletion.
    Neigh {
        seq: u32,
        intr: bool,
        event: NeighEvent,
    },
    /// The end of a dump.
    Done { seq: u32, intr: bool },
    /// The request `seq` failed with `errno` (acknowledgements are ignored).
    Error { seq: u32, errno: i32 },
    /// Nothing flowguard follows: another family (the bridge FDB), a proxy
    /// entry, an entry without an address, another message type.
    Ignored { seq: u32 },
    /// A message that cannot be decoded.
    Undecodable { seq: u32, reason: String },
}

/// Splits a datagram into its netlink messages and decodes each. Broken
/// framing (a truncated tail) ends the list with one `Undecodable`.
pub(super) fn parse_datagram(buf: &[u8]) -> Vec<Message> {
    netlink::messages(buf)
        .map(|m| match m {
            Ok(m) => decode_one(&m),
            Err(e) => Message::Undecodable {
                seq: e.seq,
                reason: e.reason,
            },
        })
        .collect()
}

const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;

fn decode_one(m: &netlink::Message) -> Message {
    let (seq, intr) = (m.seq, m.dump_interrupted());
    match m.control() {
        Some(Ok(Control::Done(_))) => return Message::Done { seq, intr },
        Some(Ok(Control::Error(errno))) => return Message::Error { seq, errno },
        Some(Ok(Control::Ack)) => return Message::Ignored { seq },
        Some(Err(e)) => {
            return Message::Undecodable {
                seq,
                reason: e.reason,
            }
        }
        None => {}
    }
    // Bridge FDB changes share the group and are frequent on a router:
    // skip them (and any other family) on the raw `ndm_family` byte, before
    // their attributes are parsed at all.
    if matches!(m.kind, RTM_NEWNEIGH | RTM_DELNEIGH)
        && m.payload()
            .first()
            .is_some_and(|f| !matches!(i32::from(*f), libc::AF_INET | libc::AF_INET6))
    {
        return Message::Ignored { seq };
    }
    let msg = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(m.bytes) {
        Ok(msg) => msg,
        Err(e) => {
            return Message::Undecodable {
                seq,
                reason: e.to_string(),
            }
        }
    };
    match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => match entry_of(&m) {
            Some(entry) => Message::Neigh {
                seq,
                intr,
                event: NeighEvent::Update(entry),
            },
            None => Message::Ignored { seq },
        },
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m)) => match entry_of(&m) {
            Some(e) => Message::Neigh {
                seq,
                intr,
                event: NeighEvent::Delete {
                    ip: e.ip,
                    ifindex: e.ifindex,
                },
            },
            None => Message::Ignored { seq },
        },
        _ => Message::Ignored { seq },
    }
}

/// The entry a neighbour message describes, unless flowguard ignores it.
fn entry_of(m: &NeighbourMessage) -> Option<NeighEntry> {
    if !matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6) {
        return None;
    }
    if m.header.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attr in &m.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(l) => {
                mac = <[u8; 6]>::try_from(l.as_slice()).ok().map(Mac);
            }
            _ => {}
        }
    }
    Some(NeighEntry {
        ip: ip?,
        ifindex: m.header.ifindex,
        mac,
        state: m.header.state.into(),
    })
}

/// An `RTM_GETNEIGH` dump request for one address family.
pub(super) fn dump_request(family: AddressFamily, seq: u32) -> Vec<u8> {
    let mut neigh = NeighbourMessage::default();
    neigh.header.family = family;
    netlink::request(
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        RouteNetlinkMessage::GetNeighbour(neigh),
    )
}

#[cfg(test)]
mod tests {
    use super::super::nud;
    use super::*;
    use crate::netlink::test_bytes::{message as header, nla};
    use netlink_packet_core::NLM_F_DUMP_INTR;

    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;
    const AF_BRIDGE: u8 = 7;
    const NTF_PROXY: u8 = 0x08;
    const NTF_ROUTER: u8 = 0x80;
    const NDA_DST: u16 = 1;
    const NDA_LLADDR: u16 = 2;
    const NDA_CACHEINFO: u16 = 3;
    const NDA_PROBES: u16 = 4;

    /// A neighbour message as the kernel builds it (`neigh_fill_info`).
    #[expect(
        clippy::too_many_arguments,
        reason = "one field per argument reads best in the tests"
    )]
    fn raw_neigh(
        kind: u16,
        seq: u32,
        family: u8,
        ifindex: u32,
        state: u16,
        flags: u8,
        dst: &[u8],
        lladdr: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut payload = vec![family, 0, 0, 0];
        payload.extend_from_slice(&ifindex.to_ne_bytes());
        payload.extend_from_slice(&state.to_ne_bytes());
        payload.push(flags);
        payload.push(1); // ndm_type RTN_UNICAST
        payload.extend(nla(NDA_DST, dst));
        if let Some(l) = lladdr {
            payload.extend(nla(NDA_LLADDR, l));
        }
        payload.extend(nla(NDA_PROBES, &0u32.to_ne_bytes()));
        payload.extend(nla(NDA_CACHEINFO, &[0; 16]));
        header(kind, 2, seq, &payload)
    }

    const MAC: [u8; 6] = [0x3a, 0xea, 0x10, 0xf9, 0xa1, 0x2e];

    fn one(bytes: &[u8]) -> Message {
        let mut v = parse_datagram(bytes);
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    #[test]
    fn ipv4_update() {
        let m = raw_neigh(
            RTM_NEWNEIGH,
            7,
            AF_INET,
            5,
            nud::REACHABLE,
            0,
            &[192, 168, 1, 240],
            Some(&MAC),
        );
        assert_eq!(
            one(&m),
            Message::Neigh {
                seq: 7,
                intr: false,
                event: NeighEvent::Update(NeighEntry {
                    ip: "192.168.1.240".parse().unwrap(),
                    ifindex: 5,
                    mac: Some(Mac(MAC)),
                    state: nud::REACHABLE,
                }),
            }
        );
    }

    #[test]
    fn ipv6_update_without_lladdr_and_with_odd_lladdr() {
        let dst: std::net::Ipv6Addr = "fd00:1::f0".parse().unwrap();
        let m = raw_neigh(
            RTM_NEWNEIGH,
            0,
            AF_INET6,
            3,
            nud::FAILED,
            NTF_ROUTER,
            &dst.octets(),
            None,
        );
        let Message::Neigh {
            event: NeighEvent::Update(e),
            ..
        } = one(&m)
        else {
            panic!()
        };
        assert_eq!(
            (e.ip, e.ifindex, e.mac, e.state),
            (IpAddr::V6(dst), 3, None, nud::FAILED)
        );
        // An InfiniBand-sized address is no Ethernet MAC.
        let m = raw_neigh(
            RTM_NEWNEIGH,
            0,
            AF_INET6,
            3,
            nud::STALE,
            0,
            &dst.octets(),
            Some(&[1; 20]),
        );
        let Message::Neigh {
            event: NeighEvent::Update(e),
            ..
        } = one(&m)
        else {
            panic!()
        };
        assert_eq!(e.mac, None);
    }

    #[test]
    fn delete() {
        let m = raw_neigh(
            RTM_DELNEIGH,
            0,
            AF_INET,
            5,
            nud::STALE,
            0,
            &[192, 168, 1, 240],
            Some(&MAC),
        );
        assert_eq!(
            one(&m),
            Message::Neigh {
                seq: 0,
                intr: false,
                event: NeighEvent::Delete {
                    ip: "192.168.1.240".parse().unwrap(),
                    ifindex: 5
                },
            }
        );
    }

    #[test]
    fn fdb_and_proxy_entries_are_ignored() {
        // A bridge FDB entry has no IP; its NDA_DST (a VXLAN remote) must not be taken for one.
        let fdb = raw_neigh(
            RTM_NEWNEIGH,
            0,
            AF_BRIDGE,
            5,
            nud::REACHABLE,
            0x02,
            &[10, 0, 0, 1],
            Some(&MAC),
        );
        assert_eq!(one(&fdb), Message::Ignored { seq: 0 });
        // Even one whose attributes would not parse.
        let mut bad = fdb.clone();
        let at = bad.len() - 20; // NDA_CACHEINFO's header
        bad[at..at + 2].copy_from_slice(&5u16.to_ne_bytes());
        assert_eq!(one(&bad), Message::Ignored { seq: 0 });
        let mut bad_inet = raw_neigh(
            RTM_NEWNEIGH,
            0,
            AF_INET,
            5,
            nud::REACHABLE,
            0,
            &[192, 168, 1, 240],
            Some(&MAC),
        );
        let at = bad_inet.len() - 20;
        bad_inet[at..at + 2].copy_from_slice(&5u16.to_ne_bytes());
        assert!(matches!(one(&bad_inet), Message::Undecodable { .. }));
        for kind in [RTM_NEWNEIGH, RTM_DELNEIGH] {
            let proxy = raw_neigh(
                kind,
                0,
                AF_INET,
                5,
                nud::NONE,
                NTF_PROXY,
                &[192, 168, 1, 240],
                None,
            );
            assert_eq!(one(&proxy), Message::Ignored { seq: 0 });
            let router_proxy = raw_neigh(
                kind,
                0,
                AF_INET6,
                5,
                nud::NONE,
                NTF_PROXY | NTF_ROUTER,
                &[0xfd; 16],
                None,
            );
            assert_eq!(one(&router_proxy), Message::Ignored { seq: 0 });
        }
    }

    #[test]
    fn several_messages_done_error_and_dump_interrupted() {
        let mut dgram = raw_neigh(
            RTM_NEWNEIGH,
            9,
            AF_INET,
            5,
            nud::STALE,
            0,
            &[192, 168, 1, 1],
            Some(&MAC),
        );
        let mut second = raw_neigh(
            RTM_NEWNEIGH,
            9,
            AF_INET,
            5,
            nud::STALE,
            0,
            &[192, 168, 1, 2],
            Some(&MAC),
        );
        second[6..8].copy_from_slice(&(2u16 | NLM_F_DUMP_INTR).to_ne_bytes());
        dgram.extend(second);
        dgram.extend(header(NLMSG_DONE, 2, 9, &0i32.to_ne_bytes()));
        let mut err = (-16i32).to_ne_bytes().to_vec(); // EBUSY, then the request's header
        err.extend(header(RTM_NEWNEIGH, 0x301, 9, &[]));
        dgram.extend(header(NLMSG_ERROR, 0, 9, &err));
        let v = parse_datagram(&dgram);
        assert_eq!(v.len(), 4, "{v:?}");
        assert!(matches!(
            v[0],
            Message::Neigh {
                seq: 9,
                intr: false,
                ..
            }
        ));
        assert!(matches!(
            v[1],
            Message::Neigh {
                seq: 9,
                intr: true,
                ..
            }
        ));
        assert_eq!(
            v[2],
            Message::Done {
                seq: 9,
                intr: false
            }
        );
        assert_eq!(v[3], Message::Error { seq: 9, errno: 16 });
    }

    #[test]
    fn truncated_and_garbage() {
        let m = raw_neigh(
            RTM_NEWNEIGH,
            1,
            AF_INET,
            5,
            nud::STALE,
            0,
            &[192, 168, 1, 1],
            Some(&MAC),
        );
        let v = parse_datagram(&m[..m.len() - 4]);
        assert!(
            matches!(v.as_slice(), [Message::Undecodable { .. }]),
            "{v:?}"
        );
        // A bad address length inside an otherwise well-framed message.
        let bad = raw_neigh(
            RTM_NEWNEIGH,
            1,
            AF_INET,
            5,
            nud::STALE,
            0,
            &[192, 168, 1],
            Some(&MAC),
        );
        let v = parse_datagram(&bad);
        assert!(
            matches!(v.as_slice(), [Message::Undecodable { seq: 1, .. }]),
            "{v:?}"
        );
        assert!(parse_datagram(&[]).is_empty());
        assert!(matches!(
            parse_datagram(&[1, 2, 3]).as_slice(),
            [Message::Undecodable { .. }]
        ));
    }

    #[test]
    fn dump_request_bytes() {
        let req = dump_request(AddressFamily::Inet6, 0x01020304);
        let mut expected = Vec::new();
        expected.extend_from_slice(&28u32.to_ne_bytes());
        expected.extend_from_slice(&30u16.to_ne_bytes()); // RTM_GETNEIGH
        expected.extend_from_slice(&0x301u16.to_ne_bytes()); // NLM_F_REQUEST | NLM_F_DUMP
        expected.extend_from_slice(&0x01020304u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[AF_INET6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(req, expected);
    }
}
