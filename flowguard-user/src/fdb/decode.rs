//! Bridge FDB messages (`AF_BRIDGE` neighbour messages): what the kernel
//! sends (`br_fdb_fill_info`), and the dump request.

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::{
    neighbour::{NeighbourAttribute, NeighbourMessage, NeighbourState},
    AddressFamily, RouteNetlinkMessage,
};

use crate::{
    netlink::{self, Control},
    settings::Mac,
};

/// One FDB entry: a MAC behind a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: Mac,
    /// The port (`ndm_ifindex`).
    pub port: u32,
    /// The bridge (`NDA_MASTER`); `None` for a port's own hardware table.
    pub bridge: Option<u32>,
    pub vlan: Option<u16>,
    /// One of the bridge's own MACs (permanent): never an endpoint's.
    pub local: bool,
}

/// What one netlink message means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Message {
    Entry {
        seq: u32,
        entry: FdbEntry,
        /// `RTM_DELNEIGH`: deleted, or aged out.
        gone: bool,
    },
    Done {
        seq: u32,
    },
    Error {
        seq: u32,
        errno: i32,
    },
    /// Another family (the neighbour table shares the group), another
    /// message, or one that cannot be decoded.
    Other,
}

const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;

pub(super) fn parse_datagram(buf: &[u8]) -> Vec<Message> {
    netlink::messages(buf)
        .map(|m| match m {
            Ok(m) => decode_one(&m),
            Err(_) => Message::Other,
        })
        .collect()
}

fn decode_one(m: &netlink::Message) -> Message {
    let seq = m.seq;
    match m.control() {
        Some(Ok(Control::Done(_))) => return Message::Done { seq },
        Some(Ok(Control::Error(errno))) => return Message::Error { seq, errno },
        Some(_) => return Message::Other,
        None => {}
    }
    // Only the bridge's family, decided on the raw `ndm_family` byte.
    if !matches!(m.kind, RTM_NEWNEIGH | RTM_DELNEIGH)
        || m.payload().first().map(|f| i32::from(*f)) != Some(libc::AF_BRIDGE)
    {
        return Message::Other;
    }
    let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(m.bytes) else {
        return Message::Other;
    };
    let (n, gone) = match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => (n, false),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => (n, true),
        _ => return Message::Other,
    };
    match entry_of(&n) {
        Some(entry) => Message::Entry { seq, entry, gone },
        None => Message::Other,
    }
}

fn entry_of(n: &NeighbourMessage) -> Option<FdbEntry> {
    let mut mac = None;
    let mut bridge = None;
    let mut vlan = None;
    for attr in &n.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(l) => {
                mac = <[u8; 6]>::try_from(l.as_slice()).ok().map(Mac)
            }
            NeighbourAttribute::Controller(b) => bridge = Some(*b),
            NeighbourAttribute::Vlan(v) => vlan = Some(*v),
            _ => {}
        }
    }
    Some(FdbEntry {
        mac: mac?,
        port: n.header.ifindex,
        bridge,
        vlan,
        local: n.header.state == NeighbourState::Permanent,
    })
}

/// An `RTM_GETNEIGH` dump request of the bridge family.
pub(super) fn dump_request(seq: u32) -> Vec<u8> {
    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Bridge;
    netlink::request(
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        RouteNetlinkMessage::GetNeighbour(n),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::test_bytes::{message, nla};

    const NDA_LLADDR: u16 = 2;
    const NDA_MASTER: u16 = 9;
    const NDA_VLAN: u16 = 5;
    const NUD_REACHABLE: u16 = 0x02;
    const NUD_PERMANENT: u16 = 0x80;
    const NTF_MASTER: u8 = 0x04;

    /// An FDB message as `br_fdb_fill_info` builds it.
    fn fdb(kind: u16, family: u8, port: u32, state: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![family, 0, 0, 0];
        p.extend_from_slice(&port.to_ne_bytes());
        p.extend_from_slice(&state.to_ne_bytes());
        p.push(NTF_MASTER);
        p.push(0);
        for a in attrs {
            p.extend_from_slice(a);
        }
        message(kind, 0, 7, &p)
    }

    const M: [u8; 6] = [0x02, 0, 0, 0, 0, 0x50];

    #[test]
    fn an_entry_a_local_one_a_deletion_and_the_neighbour_table_s_family() {
        let learned = fdb(
            RTM_NEWNEIGH,
            libc::AF_BRIDGE as u8,
            5,
            NUD_REACHABLE,
            &[
                nla(NDA_LLADDR, &M),
                nla(NDA_MASTER, &3u32.to_ne_bytes()),
                nla(NDA_VLAN, &10u16.to_ne_bytes()),
            ],
        );
        let want = FdbEntry {
            mac: Mac(M),
            port: 5,
            bridge: Some(3),
            vlan: Some(10),
            local: false,
        };
        assert_eq!(
            parse_datagram(&learned),
            vec![Message::Entry {
                seq: 7,
                entry: want,
                gone: false
            }]
        );
        let local = fdb(
            RTM_NEWNEIGH,
            libc::AF_BRIDGE as u8,
            5,
            NUD_PERMANENT,
            &[nla(NDA_LLADDR, &M), nla(NDA_MASTER, &3u32.to_ne_bytes())],
        );
        assert!(matches!(
            parse_datagram(&local)[0],
            Message::Entry {
                entry: FdbEntry {
                    local: true,
                    vlan: None,
                    ..
                },
                ..
            }
        ));
        let del = fdb(
            RTM_DELNEIGH,
            libc::AF_BRIDGE as u8,
            5,
            NUD_REACHABLE,
            &[nla(NDA_LLADDR, &M), nla(NDA_MASTER, &3u32.to_ne_bytes())],
        );
        assert!(matches!(
            parse_datagram(&del)[0],
            Message::Entry { gone: true, .. }
        ));
        let inet = fdb(
            RTM_NEWNEIGH,
            libc::AF_INET as u8,
            5,
            NUD_REACHABLE,
            &[nla(NDA_LLADDR, &M)],
        );
        assert_eq!(parse_datagram(&inet), vec![Message::Other]);
        // No MAC: not an entry.
        let bare = fdb(RTM_NEWNEIGH, libc::AF_BRIDGE as u8, 5, NUD_REACHABLE, &[]);
        assert_eq!(parse_datagram(&bare), vec![Message::Other]);
    }
}
