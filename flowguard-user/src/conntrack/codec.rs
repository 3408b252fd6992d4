//! The ctnetlink messages flowguard sends (dumps, filtered dumps, deletes,
//! inserts) and the reading of the kernel's answers. Built on
//! netlink-packet-netfilter's conntrack types; what that crate lacks (zone,
//! id, the ICMP tuple fields, CTA_FILTER and its nesting flag) is in `gaps`.
//! Nothing here panics on what the kernel (or anyone) sends: bad framing is an
//! error, an undecodable entry is reported as such and can be skipped.

use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Status,
        Tuple as NfTuple,
    },
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner,
};

use super::{
    gaps::{self, IcmpField, TopLevel},
    ConntrackError, Direction, Field, Flow, Tuple, IPS_CONFIRMED,
};
use crate::netlink::{self, Control};

// include/uapi/linux/netfilter/nf_conntrack_common.h
const IPS_EXPECTED: u32 = 1 << 0;
const IPS_DYING: u32 = 1 << 9;

const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFNETLINK_V0: u8 = 0;

/// The netfilter family (`nfgen_family`) of an address.
pub(crate) fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => NFPROTO_IPV4,
        IpAddr::V6(_) => NFPROTO_IPV6,
    }
}

/// A kernel-side (CTA_FILTER) match on one address of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AddressFilter {
    pub direction: Direction,
    pub field: Field,
    pub ip: IpAddr,
}

impl AddressFilter {
    /// The four filters whose union is "every entry that involves `ip`".
    pub fn all_for(ip: IpAddr) -> [AddressFilter; 4] {
        [
            (Direction::Orig, Field::Src),
            (Direction::Orig, Field::Dst),
            (Direction::Reply, Field::Src),
            (Direction::Reply, Field::Dst),
        ]
        .map(|(direction, field)| AddressFilter {
            direction,
            field,
            ip,
        })
    }
}

fn build(seq: u32, flags: u16, family: u8, message: ConntrackMessage) -> Vec<u8> {
    let payload = NetfilterMessage::new(
        NetfilterHeader::new(family.into(), NFNETLINK_V0, 0),
        message,
    );
    let mut buf = netlink::request(flags, seq, payload);
    gaps::mark_filter_nested(&mut buf);
    buf
}

/// The nested CTA_TUPLE_IP and CTA_TUPLE_PROTO of a tuple, complete: both
/// addresses, the protocol, and its ports or ICMP id/type/code.
fn tuple_nlas(t: &Tuple) -> Vec<NfTuple> {
    let mut proto = vec![ProtoTuple::Protocol(Protocol::from(t.proto))];
    if t.is_icmp() {
        proto.extend(gaps::icmp_fields(
            t.proto,
            t.src_port,
            (t.dst_port >> 8) as u8,
            t.dst_port as u8,
        ));
    } else if t.has_ports() {
        proto.push(ProtoTuple::SourcePort(t.src_port));
        proto.push(ProtoTuple::DestinationPort(t.dst_port));
    }
    vec![
        NfTuple::Ip(vec![
            IPTuple::SourceAddress(t.src),
            IPTuple::DestinationAddress(t.dst),
        ]),
        NfTuple::Proto(proto),
    ]
}

fn check_tuple(t: &Tuple, what: &str) -> Result<(), String> {
    if t.src.is_ipv4() != t.dst.is_ipv4() {
        return Err(format!("{what} tuple mixes IPv4 and IPv6: {t}"));
    }
    if t.src.is_unspecified() || t.dst.is_unspecified() {
        return Err(format!("{what} tuple has an unspecified address: {t}"));
    }
    Ok(())
}

/// A dump of the whole table, or of one address family of it.
pub(crate) fn dump_request(seq: u32, family: Option<IpAddr>) -> Vec<u8> {
    let family = family.map_or(NFPROTO_UNSPEC, family_of);
    build(
        seq,
        NLM_F_REQUEST | NLM_F_DUMP,
        family,
        ConntrackMessage::Get(vec![]),
    )
}

/// A dump the kernel filters itself (CTA_FILTER, Linux >= 5.8): only the
/// entries whose `direction` tuple has `ip` as its `field` address.
pub(crate) fn filtered_dump_request(seq: u32, filter: AddressFilter) -> Vec<u8> {
    let ip_nla = match filter.field {
        Field::Src => IPTuple::SourceAddress(filter.ip),
        Field::Dst => IPTuple::DestinationAddress(filter.ip),
    };
    let tuple = vec![NfTuple::Ip(vec![ip_nla])];
    let tuple = match filter.direction {
        Direction::Orig => ConntrackAttribute::CtaTupleOrig(tuple),
        Direction::Reply => ConntrackAttribute::CtaTupleReply(tuple),
    };
    build(
        seq,
        NLM_F_REQUEST | NLM_F_DUMP,
        family_of(filter.ip),
        ConntrackMessage::Get(vec![tuple, gaps::filter(filter.direction, filter.field)]),
    )
}

/// A dump that a kernel which knows CTA_FILTER refuses with EINVAL (a filter
/// on the original source without the tuple that holds it), and that an
/// older kernel, which ignores unknown attributes, answers as a plain dump.
pub(crate) fn filter_probe_request(seq: u32) -> Vec<u8> {
    build(
        seq,
        NLM_F_REQUEST | NLM_F_DUMP,
        NFPROTO_IPV4,
        ConntrackMessage::Get(vec![gaps::filter(Direction::Orig, Field::Src)]),
    )
}

/// IPCTNL_MSG_CT_GET_STATS: a cheap request that only a kernel with
/// ctnetlink answers, used to tell "no conntrack" from other refusals.
pub(crate) fn stats_request(seq: u32) -> Vec<u8> {
    build(
        seq,
        NLM_F_REQUEST | NLM_F_ACK,
        NFPROTO_UNSPEC,
        gaps::stats(),
    )
}

/// Deletes exactly one entry: by its full original tuple, its zone, and its
/// id when known. The encoded message is checked before it is returned: a
/// delete without CTA_TUPLE_ORIG (or with CTA_FILTER) flushes the table.
pub(crate) fn delete_request(seq: u32, flow: &Flow) -> Result<Vec<u8>, ConntrackError> {
    check_tuple(&flow.orig, "original").map_err(ConntrackError::IncompleteTuple)?;
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple_nlas(&flow.orig))];
    if flow.zone != 0 {
        attrs.push(gaps::zone(flow.zone));
    }
    if let Some(id) = flow.id {
        attrs.push(gaps::id(id));
    }
    let bytes = build(
        seq,
        NLM_F_REQUEST | NLM_F_ACK,
        family_of(flow.orig.src),
        ConntrackMessage::Delete(attrs),
    );
    ensure_targeted_delete(&bytes, &flow.orig)?;
    Ok(bytes)
}

/// The guard every delete goes through: decodes the encoded message again
/// and refuses it unless it is a conntrack delete for a single entry, with a
/// complete original tuple equal to `expected`, and no CTA_FILTER.
pub(crate) fn ensure_targeted_delete(bytes: &[u8], expected: &Tuple) -> Result<(), ConntrackError> {
    let refuse = |why: &str| Err(ConntrackError::IncompleteTuple(why.to_string()));
    let message = match NetlinkMessage::<NetfilterMessage>::deserialize(bytes) {
        Ok(m) => m,
        Err(e) => return refuse(&format!("the encoded delete does not decode: {e}")),
    };
    let NetlinkPayload::InnerMessage(nf) = message.payload else {
        return refuse("not a netfilter message");
    };
    if u8::from(nf.header.family) != family_of(expected.src) {
        return refuse("the message family does not match the tuple");
    }
    let NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attrs)) = nf.inner else {
        return refuse("not a conntrack delete");
    };
    let mut orig = None;
    for attr in &attrs {
        match attr {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
            ConntrackAttribute::CtaTupleReply(_) => return refuse("it carries a reply tuple"),
            ConntrackAttribute::Other(nla)
                if gaps::top_level(nla).is_ok_and(|a| a == TopLevel::Filter) =>
            {
                return refuse("it carries CTA_FILTER");
            }
            _ => {}
        }
    }
    let Some(orig) = orig else {
        return refuse("no CTA_TUPLE_ORIG");
    };
    let has_ip = |src: bool| {
        orig.iter().any(|t| match t {
            NfTuple::Ip(ips) => ips.iter().any(|ip| match ip {
                IPTuple::SourceAddress(_) => src,
                IPTuple::DestinationAddress(_) => !src,
                _ => false,
            }),
            _ => false,
        })
    };
    if !has_ip(true) || !has_ip(false) {
        return refuse("the original tuple lacks an address");
    }
    match decode_tuple(orig) {
        Ok(t) if t == *expected => Ok(()),
        Ok(t) => refuse(&format!("the encoded tuple {t} is not {expected}")),
        Err(e) => refuse(&e),
    }
}

/// Creates an entry (IPCTNL_MSG_CT_NEW with NLM_F_CREATE | NLM_F_EXCL).
pub(crate) fn new_request(
    seq: u32,
    flow: &Flow,
    timeout_secs: u32,
) -> Result<Vec<u8>, ConntrackError> {
    let invalid = |reason: String| ConntrackError::InvalidFlow {
        op: "insert",
        reason,
    };
    check_tuple(&flow.orig, "original").map_err(invalid)?;
    check_tuple(&flow.reply, "reply").map_err(invalid)?;
    if flow.orig.src.is_ipv4() != flow.reply.src.is_ipv4() {
        return Err(invalid(
            "original and reply tuples are of different families".into(),
        ));
    }
    // The kernel marks a new entry CONFIRMED before it applies CTA_STATUS and
    // refuses (EBUSY) a status that would clear CONFIRMED or set EXPECTED or
    // DYING; the other unchangeable bits (OFFLOAD among them) it ignores.
    let status = (flow.status | IPS_CONFIRMED) & !(IPS_EXPECTED | IPS_DYING);
    let mut attrs = vec![
        ConntrackAttribute::CtaTupleOrig(tuple_nlas(&flow.orig)),
        ConntrackAttribute::CtaTupleReply(tuple_nlas(&flow.reply)),
        ConntrackAttribute::CtaTimeout(timeout_secs),
        ConntrackAttribute::CtaStatus(Status::from_bits_retain(status)),
    ];
    if flow.zone != 0 {
        attrs.push(gaps::zone(flow.zone));
    }
    if let Some(mark) = flow.mark {
        attrs.push(ConntrackAttribute::CtaMark(mark));
    }
    Ok(build(
        seq,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        family_of(flow.orig.src),
        ConntrackMessage::New(attrs),
    ))
}

/// One netlink message of an answer, reduced to what the client needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Received {
    pub seq: u32,
    pub flags: u16,
    pub body: Body,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// A conntrack entry (dump answers and events).
    Flow(Box<Flow>),
    /// A conntrack message that is not a usable entry; the reason says why.
    Undecodable(String),
    /// NLMSG_ERROR with code 0.
    Ack,
    /// NLMSG_ERROR with a negative errno (stored positive).
    Error(i32),
    /// NLMSG_DONE, with the dump's final status (0, or a negative errno).
    Done(i32),
    /// Anything else (stats answers, NOOP, other subsystems).
    Other,
}

/// Splits one datagram into its netlink messages and reads each. Broken
/// framing (a length that is too short, or runs past the datagram) is an
/// error for the whole datagram; a message whose content does not decode is
/// returned as [`Body::Undecodable`] (or an error, for acks and dones).
pub(crate) fn parse_datagram(buf: &[u8]) -> Result<Vec<Received>, ConntrackError> {
    netlink::messages(buf)
        .map(|m| {
            let m = m.map_err(|e| ConntrackError::Malformed(e.reason))?;
            Ok(Received {
                seq: m.seq,
                flags: m.flags,
                body: parse_message(&m)?,
            })
        })
        .collect()
}

fn parse_message(m: &netlink::Message) -> Result<Body, ConntrackError> {
    match m.control() {
        Some(Ok(Control::Ack)) => return Ok(Body::Ack),
        Some(Ok(Control::Error(errno))) => return Ok(Body::Error(errno)),
        Some(Ok(Control::Done(status))) => return Ok(Body::Done(status)),
        Some(Err(e)) => {
            return Err(ConntrackError::Malformed(format!(
                "netlink control message: {e}"
            )))
        }
        None => {}
    }
    let message = match NetlinkMessage::<NetfilterMessage>::deserialize(m.bytes) {
        Ok(message) => message,
        // Control messages must decode; an entry that does not is skipped.
        Err(e) if m.kind < 0x10 => {
            return Err(ConntrackError::Malformed(format!(
                "netlink control message: {e}"
            )));
        }
        Err(e) => return Ok(Body::Undecodable(e.to_string())),
    };
    Ok(match message.payload {
        NetlinkPayload::InnerMessage(nf) => match nf.inner {
            NetfilterMessageInner::Conntrack(
                ConntrackMessage::New(attrs)
                | ConntrackMessage::Get(attrs)
                | ConntrackMessage::Delete(attrs),
            ) => match decode_flow(&attrs) {
                Ok(flow) => Body::Flow(Box::new(flow)),
                Err(reason) => Body::Undecodable(reason),
            },
            _ => Body::Other,
        },
        _ => Body::Other,
    })
}

/// An entry from its top-level attributes. Both tuples are required; zone,
/// id, mark and status are optional (status defaults to 0).
pub(crate) fn decode_flow(attrs: &[ConntrackAttribute]) -> Result<Flow, String> {
    let (mut orig, mut reply) = (None, None);
    let mut flow_status = 0;
    let (mut zone, mut id, mut mark) = (0, None, None);
    for attr in attrs {
        match attr {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(decode_tuple(t)?),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(decode_tuple(t)?),
            ConntrackAttribute::CtaStatus(s) => flow_status = s.bits(),
            ConntrackAttribute::CtaMark(m) => mark = Some(*m),
            ConntrackAttribute::Other(nla) => match gaps::top_level(nla)? {
                TopLevel::Zone(z) => zone = z,
                TopLevel::Id(i) => id = Some(i),
                TopLevel::Filter | TopLevel::Unknown => {}
            },
            _ => {}
        }
    }
    Ok(Flow {
        orig: orig.ok_or("no CTA_TUPLE_ORIG")?,
        reply: reply.ok_or("no CTA_TUPLE_REPLY")?,
        status: flow_status,
        zone,
        id,
        mark,
    })
}

/// A tuple from its CTA_TUPLE_IP and CTA_TUPLE_PROTO. Addresses and protocol
/// are required; ports and ICMP fields default to 0 when absent (protocols
/// without them).
pub(crate) fn decode_tuple(nlas: &[NfTuple]) -> Result<Tuple, String> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut src_port, mut dst_port) = (0u16, 0u16);
    let (mut icmp_id, mut icmp_type, mut icmp_code) = (0u16, 0u8, 0u8);
    for nla in nlas {
        match nla {
            NfTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            NfTuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => src_port = *p,
                        ProtoTuple::DestinationPort(p) => dst_port = *p,
                        ProtoTuple::Other(raw) => match gaps::icmp_field(raw)? {
                            Some(IcmpField::Id(v)) => icmp_id = v,
                            Some(IcmpField::Type(v)) => icmp_type = v,
                            Some(IcmpField::Code(v)) => icmp_code = v,
                            None => {}
                        },
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (src, dst) = (
        src.ok_or("tuple without source address")?,
        dst.ok_or("tuple without destination address")?,
    );
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(format!("tuple mixes families: {src} -> {dst}"));
    }
    let proto = proto.ok_or("tuple without protocol")?;
    let mut tuple = Tuple {
        src,
        dst,
        proto,
        src_port,
        dst_port,
    };
    if tuple.is_icmp() {
        tuple.src_port = icmp_id;
        tuple.dst_port = u16::from(icmp_type) << 8 | u16::from(icmp_code);
    }
    Ok(tuple)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::conntrack::{
        gaps::{
            emit_nlas, raw, raw_value, CTA_FILTER, CTA_FILTER_F_CTA_IP_DST,
            CTA_FILTER_F_CTA_IP_SRC, CTA_FILTER_ORIG_FLAGS, CTA_FILTER_REPLY_FLAGS, CTA_ID,
            CTA_ZONE,
        },
        IPS_ASSURED, IPS_HW_OFFLOAD, IPS_OFFLOAD, IPS_SEEN_REPLY,
    };
    use netlink_packet_core::{
        DefaultNla, DoneMessage, Emitable, ErrorMessage, NetlinkHeader, Nla, NLA_F_NESTED,
        NLA_TYPE_MASK, NLM_F_MULTIPART,
    };
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub fn v4(s: &str) -> IpAddr {
        s.parse::<Ipv4Addr>().unwrap().into()
    }

    pub fn v6(s: &str) -> IpAddr {
        s.parse::<Ipv6Addr>().unwrap().into()
    }

    fn sample_tuples() -> Vec<Tuple> {
        vec![
            Tuple::udp(v4("10.0.0.2"), 51820, v4("192.168.1.240"), 51820),
            Tuple::tcp(v4("10.0.0.2"), 40000, v4("192.168.1.241"), 443),
            Tuple::icmp(v4("10.0.0.2"), v4("192.168.1.240"), 0xbeef, 8, 0),
            Tuple::udp(v6("2001:db8::2"), 5353, v6("2001:db8:1::240"), 53),
            Tuple::tcp(v6("fd00::1"), 1, v6("fd00::2"), 65535),
            Tuple::icmp(v6("fd00::1"), v6("fd00::2"), 7, 128, 0),
        ]
    }

    /// What the kernel's ctnetlink_fill_info sends for an entry: both tuples,
    /// zone, id, status, timeout, protoinfo-like and counter-like attributes.
    pub fn kernel_like_entry(flow: &Flow, seq: u32) -> Vec<u8> {
        let mut attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tuple_nlas(&flow.orig)),
            ConntrackAttribute::CtaTupleReply(tuple_nlas(&flow.reply)),
        ];
        if flow.zone != 0 {
            attrs.push(gaps::zone(flow.zone));
        }
        if let Some(id) = flow.id {
            attrs.push(gaps::id(id));
        }
        attrs.push(ConntrackAttribute::CtaStatus(Status::from_bits_retain(
            flow.status,
        )));
        attrs.push(ConntrackAttribute::CtaTimeout(117));
        // CTA_COUNTERS_ORIG, nested, unknown to us: must be skipped.
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(
            9 | NLA_F_NESTED,
            emit_nlas(&[raw(1, &5u64.to_be_bytes()), raw(2, &640u64.to_be_bytes())]),
        )));
        // CTA_USE
        attrs.push(ConntrackAttribute::Other(raw(11, &1u32.to_be_bytes())));
        if let Some(mark) = flow.mark {
            attrs.push(ConntrackAttribute::CtaMark(mark));
        }
        build(
            seq,
            NLM_F_MULTIPART,
            family_of(flow.orig.src),
            ConntrackMessage::New(attrs),
        )
    }

    fn done(seq: u32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_MULTIPART;
        header.sequence_number = seq;
        let mut m = NetlinkMessage::<NetfilterMessage>::new(
            header,
            NetlinkPayload::Done(DoneMessage::default()),
        );
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn error(seq: u32, errno: i32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(-errno);
        e.header = vec![0; 16];
        let mut m = NetlinkMessage::<NetfilterMessage>::new(header, NetlinkPayload::Error(e));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn entry(orig: Tuple, status: u32, zone: u16, id: u32) -> Flow {
        let mut flow = Flow::unnatted(orig);
        flow.status = status;
        flow.zone = zone;
        flow.id = Some(id);
        flow.mark = Some(0);
        flow
    }

    #[test]
    fn tuples_roundtrip_v4_v6_tcp_udp_icmp() {
        for t in sample_tuples() {
            let nlas = tuple_nlas(&t);
            // Through bytes, as the kernel would see them.
            let attr = ConntrackAttribute::CtaTupleOrig(nlas);
            let mut buf = vec![0; attr.buffer_len()];
            attr.emit(&mut buf);
            let parsed = netlink_packet_core::NlaBuffer::new_checked(&buf[..]).unwrap();
            assert!(parsed.nested_flag(), "tuples are NLA_F_NESTED");
            let back =
                <ConntrackAttribute as netlink_packet_core::Parseable<_>>::parse(&parsed).unwrap();
            let ConntrackAttribute::CtaTupleOrig(nlas) = back else {
                panic!("{back:?}")
            };
            assert_eq!(decode_tuple(&nlas).unwrap(), t);
        }
    }

    #[test]
    fn ports_and_ids_are_big_endian_on_the_wire() {
        let t = Tuple::udp(v4("10.0.0.2"), 0x1234, v4("10.0.0.1"), 0xabcd);
        let attr = ConntrackAttribute::CtaTupleOrig(tuple_nlas(&t));
        let mut buf = vec![0; attr.buffer_len()];
        attr.emit(&mut buf);
        // The attribute header (length, type) is host-endian, the value not.
        let find = |len: u16, kind: u16, value: &[u8]| {
            let mut needle = len.to_ne_bytes().to_vec();
            needle.extend(kind.to_ne_bytes());
            needle.extend(value);
            buf.windows(needle.len()).any(|w| w == needle)
        };
        // CTA_PROTO_SRC_PORT: len 6, type 2, 0x12 0x34
        assert!(find(6, 2, &[0x12, 0x34]));
        assert!(find(6, 3, &[0xab, 0xcd]));
        // CTA_IP_V4_SRC: len 8, type 1, 10.0.0.2
        assert!(find(8, 1, &[10, 0, 0, 2]));
    }

    #[test]
    fn dump_messages_decode_with_status_zone_id_and_end() {
        let flows = vec![
            entry(
                sample_tuples()[0],
                IPS_OFFLOAD | IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED,
                0,
                0xdeadbeef,
            ),
            entry(sample_tuples()[2], IPS_CONFIRMED, 7, 1),
            entry(
                sample_tuples()[3],
                IPS_HW_OFFLOAD | IPS_OFFLOAD | IPS_CONFIRMED,
                65535,
                42,
            ),
            entry(sample_tuples()[5], IPS_CONFIRMED | IPS_SEEN_REPLY, 0, 3),
        ];
        let mut datagram = Vec::new();
        for f in &flows {
            datagram.extend(kernel_like_entry(f, 9));
        }
        datagram.extend(done(9));
        let received = parse_datagram(&datagram).unwrap();
        assert_eq!(received.len(), flows.len() + 1);
        for (r, f) in received.iter().zip(&flows) {
            assert_eq!(r.seq, 9);
            assert_ne!(r.flags & NLM_F_MULTIPART, 0);
            assert_eq!(r.body, Body::Flow(Box::new(f.clone())));
        }
        assert_eq!(received.last().unwrap().body, Body::Done(0));
    }

    #[test]
    fn acks_and_errors_decode() {
        let mut datagram = error(3, 0);
        datagram.extend(error(4, libc::ENOENT));
        let r = parse_datagram(&datagram).unwrap();
        assert_eq!(r[0].body, Body::Ack);
        assert_eq!(r[1].body, Body::Error(libc::ENOENT));
        assert_eq!(r[1].seq, 4);
    }

    #[test]
    fn an_entry_without_a_reply_tuple_is_undecodable_not_fatal() {
        let attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple_nlas(
            &sample_tuples()[0],
        ))];
        let mut datagram = build(
            1,
            NLM_F_MULTIPART,
            NFPROTO_IPV4,
            ConntrackMessage::New(attrs),
        );
        datagram.extend(done(1));
        let r = parse_datagram(&datagram).unwrap();
        assert!(matches!(&r[0].body, Body::Undecodable(why) if why.contains("REPLY")));
        assert_eq!(r[1].body, Body::Done(0));
    }

    #[test]
    fn delete_always_carries_the_full_original_tuple() {
        for (i, t) in sample_tuples().into_iter().enumerate() {
            let mut flow = entry(t, IPS_OFFLOAD, i as u16, 1000 + i as u32);
            if i % 2 == 0 {
                flow.id = None;
            }
            let bytes = delete_request(77, &flow).unwrap();
            ensure_targeted_delete(&bytes, &flow.orig).unwrap();
            // Decode it as the kernel would and look at every part.
            let m = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes).unwrap();
            assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_ACK);
            assert_eq!(
                m.header.message_type,
                1 << 8 | 2,
                "CTNETLINK / IPCTNL_MSG_CT_DELETE"
            );
            let NetlinkPayload::InnerMessage(nf) = m.payload else {
                panic!()
            };
            assert_eq!(u8::from(nf.header.family), family_of(t.src));
            let NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attrs)) = nf.inner else {
                panic!()
            };
            let orig = attrs
                .iter()
                .find_map(|a| match a {
                    ConntrackAttribute::CtaTupleOrig(o) => Some(o),
                    _ => None,
                })
                .expect("CTA_TUPLE_ORIG");
            assert_eq!(decode_tuple(orig).unwrap(), t);
            let raw_kinds: Vec<u16> = attrs
                .iter()
                .filter_map(|a| match a {
                    ConntrackAttribute::Other(n) => Some(n.kind() & NLA_TYPE_MASK),
                    _ => None,
                })
                .collect();
            assert!(!raw_kinds.contains(&CTA_FILTER));
            assert_eq!(raw_kinds.contains(&CTA_ZONE), flow.zone != 0);
            assert_eq!(raw_kinds.contains(&CTA_ID), flow.id.is_some());
            let decoded = decode_flow(&[
                ConntrackAttribute::CtaTupleOrig(orig.clone()),
                ConntrackAttribute::CtaTupleReply(tuple_nlas(&flow.reply)),
            ]);
            assert_eq!(decoded.unwrap().orig, t);
        }
    }

    #[test]
    fn the_delete_guard_refuses_anything_but_a_single_entry_delete() {
        let flow = entry(sample_tuples()[0], IPS_OFFLOAD, 0, 5);
        // A dump, a delete without tuple (a flush), a delete with CTA_FILTER.
        let flush = build(
            1,
            NLM_F_REQUEST | NLM_F_ACK,
            NFPROTO_IPV4,
            ConntrackMessage::Delete(vec![]),
        );
        let filtered = build(
            1,
            NLM_F_REQUEST | NLM_F_ACK,
            NFPROTO_IPV4,
            ConntrackMessage::Delete(vec![
                ConntrackAttribute::CtaTupleOrig(tuple_nlas(&flow.orig)),
                gaps::filter(Direction::Orig, Field::Src),
            ]),
        );
        let partial = build(
            1,
            NLM_F_REQUEST | NLM_F_ACK,
            NFPROTO_IPV4,
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(vec![NfTuple::Ip(
                vec![IPTuple::SourceAddress(flow.orig.src)],
            )])]),
        );
        for bad in [
            dump_request(1, None),
            flush,
            filtered,
            partial,
            vec![1, 2, 3],
        ] {
            assert!(
                matches!(
                    ensure_targeted_delete(&bad, &flow.orig),
                    Err(ConntrackError::IncompleteTuple(_))
                ),
                "{bad:?}"
            );
        }
        // Another entry's tuple is refused too.
        let other = delete_request(1, &entry(sample_tuples()[1], 0, 0, 1)).unwrap();
        assert!(ensure_targeted_delete(&other, &flow.orig).is_err());
        // Tuples that cannot be complete are refused before encoding.
        let mut mixed = flow.clone();
        mixed.orig.dst = v6("fd00::1");
        assert!(matches!(
            delete_request(1, &mixed),
            Err(ConntrackError::IncompleteTuple(_))
        ));
        let mut unspecified = flow;
        unspecified.orig.src = v4("0.0.0.0");
        assert!(delete_request(1, &unspecified).is_err());
    }

    #[test]
    fn filtered_dump_carries_a_nested_host_endian_filter_and_the_tuple() {
        for filter in AddressFilter::all_for(v4("192.168.1.240")) {
            let bytes = filtered_dump_request(5, filter);
            let m = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes).unwrap();
            assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_DUMP);
            let NetlinkPayload::InnerMessage(nf) = m.payload else {
                panic!()
            };
            assert_eq!(u8::from(nf.header.family), NFPROTO_IPV4);
            let NetfilterMessageInner::Conntrack(ConntrackMessage::Get(attrs)) = nf.inner else {
                panic!()
            };
            let mut saw_filter = false;
            let mut saw_tuple = false;
            for a in &attrs {
                match (a, filter.direction) {
                    (ConntrackAttribute::CtaTupleOrig(t), Direction::Orig)
                    | (ConntrackAttribute::CtaTupleReply(t), Direction::Reply) => {
                        let NfTuple::Ip(ips) = &t[0] else { panic!() };
                        assert_eq!(ips.len(), 1);
                        match (&ips[0], filter.field) {
                            (IPTuple::SourceAddress(ip), Field::Src)
                            | (IPTuple::DestinationAddress(ip), Field::Dst) => {
                                assert_eq!(*ip, filter.ip)
                            }
                            other => panic!("{other:?}"),
                        }
                        saw_tuple = true;
                    }
                    (ConntrackAttribute::Other(n), _) => {
                        assert_eq!(n.kind(), CTA_FILTER | NLA_F_NESTED);
                        let value = raw_value(n);
                        let kind = match filter.direction {
                            Direction::Orig => CTA_FILTER_ORIG_FLAGS,
                            Direction::Reply => CTA_FILTER_REPLY_FLAGS,
                        };
                        let flag = match filter.field {
                            Field::Src => CTA_FILTER_F_CTA_IP_SRC,
                            Field::Dst => CTA_FILTER_F_CTA_IP_DST,
                        };
                        // nla_len is host-endian too (found on big-endian mips).
                        let mut expected = 8u16.to_ne_bytes().to_vec();
                        expected.extend(kind.to_ne_bytes());
                        expected.extend(flag.to_ne_bytes());
                        assert_eq!(value, expected);
                        saw_filter = true;
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert!(saw_filter && saw_tuple);
        }
    }

    #[test]
    fn insert_sets_create_excl_and_keeps_confirmed() {
        let mut flow = entry(
            sample_tuples()[1],
            IPS_OFFLOAD | IPS_ASSURED | IPS_SEEN_REPLY,
            0,
            1,
        );
        flow.mark = Some(0x42);
        let bytes = new_request(3, &flow, 300).unwrap();
        let m = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes).unwrap();
        assert_eq!(
            m.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        let NetlinkPayload::InnerMessage(nf) = m.payload else {
            panic!()
        };
        let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = nf.inner else {
            panic!()
        };
        let decoded = decode_flow(&attrs).unwrap();
        assert_eq!(decoded.orig, flow.orig);
        assert_eq!(decoded.reply, flow.reply);
        assert_eq!(decoded.mark, Some(0x42));
        assert_ne!(decoded.status & IPS_CONFIRMED, 0);
        assert!(attrs.contains(&ConntrackAttribute::CtaTimeout(300)));
    }

    /// A valid two-entry dump datagram, for the robustness tests.
    fn valid_datagram() -> Vec<u8> {
        let mut d = kernel_like_entry(&entry(sample_tuples()[0], IPS_OFFLOAD, 3, 9), 1);
        d.extend(kernel_like_entry(
            &entry(sample_tuples()[5], IPS_CONFIRMED, 0, 10),
            1,
        ));
        d.extend(done(1));
        d
    }

    #[test]
    fn every_truncation_is_an_error_or_a_skip_never_a_panic() {
        let valid = valid_datagram();
        for len in 0..valid.len() {
            // Cut off: framing no longer adds up (or a message is whole).
            let _ = parse_datagram(&valid[..len]);
            // Cut off with the first message's length patched to match, so
            // the attribute decoders meet the truncation themselves.
            let mut patched = valid[..len].to_vec();
            if patched.len() >= 4 {
                patched[..4].copy_from_slice(&(len as u32).to_ne_bytes());
                if let Ok(received) = parse_datagram(&patched) {
                    if let Some(Body::Flow(flow)) = received.first().map(|r| &r.body) {
                        // Only a cut that loses nothing we read may decode.
                        assert_eq!(flow.orig, sample_tuples()[0], "len {len}");
                    }
                }
            }
        }
    }

    /// xorshift64*: deterministic random bytes without a dependency.
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    #[test]
    fn random_bytes_and_random_corruption_never_panic() {
        let mut rng = Rng::new(0x5eed);
        for _ in 0..20_000 {
            let len = rng.below(300) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Half the time give it a plausible header so parsing goes deeper.
            if len >= 20 && rng.below(2) == 0 {
                bytes[..4].copy_from_slice(&(len as u32).to_ne_bytes());
                bytes[4] = rng.below(3) as u8;
                bytes[5] = 1;
            }
            let _ = parse_datagram(&bytes);
        }
        let valid = valid_datagram();
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..=rng.below(4) {
                let i = rng.below(bytes.len() as u64) as usize;
                bytes[i] = rng.next() as u8;
            }
            let _ = parse_datagram(&bytes);
        }
    }
}
