//! rtnetlink link, address and nsid messages as the children source needs
//! them, and the requests it sends. Formats come from netlink-packet-route;
//! this file only decides what each message means here.

use std::net::IpAddr;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
    RouteNetlinkMessage,
};

use super::ChildKind;
use crate::{
    netlink::{self, Control},
    settings::Mac,
};

/// One link as a namespace reports it; only what deciding "is this a child
/// of a guarded interface" needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// `None` for every kind that is not a macvlan/ipvlan child.
    pub kind: Option<ChildKind>,
    pub mac: Option<Mac>,
    /// `IFLA_LINK`: the parent's ifindex, in the parent's namespace.
    pub parent: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the parent's namespace, as an nsid of the
    /// reporting namespace; absent when the parent lives in the same one.
    pub parent_netnsid: Option<i32>,
}

/// What one netlink message means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Link {
        seq: u32,
        intr: bool,
        link: Link,
    },
    LinkGone {
        ifindex: u32,
    },
    Addr {
        seq: u32,
        intr: bool,
        ifindex: u32,
        ip: IpAddr,
    },
    AddrGone {
        ifindex: u32,
        ip: IpAddr,
    },
    /// Reply to [`nsid_request`]: the nsid, or -1 when none is assigned.
    Nsid {
        seq: u32,
        id: i32,
    },
    Done {
        seq: u32,
        intr: bool,
    },
    /// NLMSG_ERROR: the request `seq` failed with `errno` (acks are ignored).
    Error {
        seq: u32,
        errno: i32,
    },
    Ignored,
    Undecodable {
        reason: String,
    },
}

const RTM_DELLINK: u16 = 17;

/// Splits a datagram into its messages and decodes each; broken framing
/// ends the list with one `Undecodable`.
pub fn parse_datagram(buf: &[u8]) -> Vec<Message> {
    netlink::messages(buf)
        .map(|m| match m {
            Ok(m) => decode_one(&m),
            Err(e) => Message::Undecodable { reason: e.reason },
        })
        .collect()
}

fn decode_one(m: &netlink::Message) -> Message {
    let (seq, intr) = (m.seq, m.dump_interrupted());
    match m.control() {
        Some(Ok(Control::Done(_))) => return Message::Done { seq, intr },
        Some(Ok(Control::Error(errno))) => return Message::Error { seq, errno },
        Some(Ok(Control::Ack)) => return Message::Ignored,
        Some(Err(e)) => return Message::Undecodable { reason: e.reason },
        None => {}
    }
    let msg = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(m.bytes) {
        Ok(msg) => msg,
        Err(e) => {
            // A removal must never be missed because one attribute of an
            // exotic link did not parse: its index is at a fixed offset.
            let payload = m.payload();
            if m.kind == RTM_DELLINK && payload.len() >= 8 {
                let ifindex = u32::from_ne_bytes(payload[4..8].try_into().expect("4 bytes"));
                return Message::LinkGone { ifindex };
            }
            return Message::Undecodable {
                reason: e.to_string(),
            };
        }
    };
    match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => Message::Link {
            seq,
            intr,
            link: link_of(&m),
        },
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => Message::LinkGone {
            ifindex: m.header.index,
        },
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => match addr_of(&m) {
            Some(ip) => Message::Addr {
                seq,
                intr,
                ifindex: m.header.index,
                ip,
            },
            None => Message::Ignored,
        },
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(m)) => match addr_of(&m) {
            Some(ip) => Message::AddrGone {
                ifindex: m.header.index,
                ip,
            },
            None => Message::Ignored,
        },
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => Message::Nsid {
            seq,
            id: m
                .attributes
                .iter()
                .find_map(|a| match a {
                    NsidAttribute::Id(id) => Some(*id),
                    _ => None,
                })
                .unwrap_or(-1),
        },
        _ => Message::Ignored,
    }
}

fn link_of(m: &LinkMessage) -> Link {
    let mut link = Link {
        ifindex: m.header.index,
        name: String::new(),
        kind: None,
        mac: None,
        parent: None,
        parent_netnsid: None,
    };
    for attr in &m.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(Mac),
            LinkAttribute::Link(i) => link.parent = Some(*i),
            LinkAttribute::LinkNetNsId(n) => link.parent_netnsid = Some(*n),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(InfoKind::MacVlan) => Some(ChildKind::Macvlan),
                    LinkInfo::Kind(InfoKind::MacVtap) => Some(ChildKind::Macvtap),
                    LinkInfo::Kind(InfoKind::IpVlan) => Some(ChildKind::Ipvlan),
                    LinkInfo::Kind(InfoKind::IpVtap) => Some(ChildKind::Ipvtap),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    link
}

/// The interface's own address: `IFA_LOCAL` for IPv4 (`IFA_ADDRESS` is the
/// peer on point-to-point links), `IFA_ADDRESS` for IPv6.
fn addr_of(m: &AddressMessage) -> Option<IpAddr> {
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address).map(|ip| ip.to_canonical())
}

fn request(payload: RouteNetlinkMessage, seq: u32, dump: bool) -> Vec<u8> {
    let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    netlink::request(flags, seq, payload)
}

/// `RTM_GETLINK` dump of every link.
pub fn link_dump_request(seq: u32) -> Vec<u8> {
    request(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        seq,
        true,
    )
}

/// `RTM_GETADDR` dump of every IPv4 and IPv6 address.
pub fn addr_dump_request(seq: u32) -> Vec<u8> {
    request(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        seq,
        true,
    )
}

/// `RTM_GETNSID` for the namespace behind `fd` (a descriptor of this
/// process), answered with its nsid as the socket's namespace knows it.
pub fn nsid_request(fd: u32, seq: u32) -> Vec<u8> {
    let mut m = NsidMessage::default();
    m.attributes.push(NsidAttribute::Fd(fd));
    request(RouteNetlinkMessage::GetNsId(m), seq, false)
}
