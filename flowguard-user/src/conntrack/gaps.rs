//! What netlink-packet-netfilter 0.4.0 lacks for ctnetlink as flowguard uses
//! it, in one file, each piece to drop once the crate has it:
//!
//! - `CTA_ZONE` and `CTA_ID`: no `ConntrackAttribute` variant. Written with
//!   [`zone`] and [`id`], read with [`top_level`], as raw attributes.
//! - The ICMP and ICMPv6 tuple fields (`CTA_PROTO_ICMP_ID`, `_TYPE`, `_CODE`
//!   and their `ICMPV6` twins): no `ProtoTuple` variant. Written with
//!   [`icmp_fields`], read with [`icmp_field`].
//! - `CTA_FILTER` (Linux 5.8): no variant. Written with [`filter`].
//! - Nesting: `ConntrackAttribute::is_nested` is false for `Other`, so the
//!   `NLA_F_NESTED` a raw attribute carries is dropped when it is emitted,
//!   and the kernel parses CTA_FILTER strictly (it requires the flag):
//!   [`mark_filter_nested`] sets it again on the encoded message.
//! - `IPCTNL_MSG_CT_GET_STATS`: no `ConntrackMessage` variant. [`stats`].

use netlink_packet_core::{DefaultNla, Emitable, Nla, NLA_F_NESTED, NLA_TYPE_MASK};
use netlink_packet_netfilter::conntrack::{ConntrackAttribute, ConntrackMessage, ProtoTuple};

use super::{Direction, Field, IPPROTO_ICMP, IPPROTO_ICMPV6};

// include/uapi/linux/netfilter/nfnetlink_conntrack.h
const IPCTNL_MSG_CT_GET_STATS: u8 = 5;
pub(super) const CTA_ID: u16 = 12;
pub(super) const CTA_ZONE: u16 = 18;
pub(super) const CTA_FILTER: u16 = 25;
pub(super) const CTA_FILTER_ORIG_FLAGS: u16 = 1;
pub(super) const CTA_FILTER_REPLY_FLAGS: u16 = 2;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
// net/netfilter/nf_internals.h (kernel-internal, stable since 5.8)
pub(super) const CTA_FILTER_F_CTA_IP_SRC: u32 = 1 << 0;
pub(super) const CTA_FILTER_F_CTA_IP_DST: u32 = 1 << 1;
/// `struct nlmsghdr` and `struct nfgenmsg`: where the top-level attributes
/// of an encoded message start.
const ATTRIBUTES_OFFSET: usize = 16 + 4;

pub(super) fn raw(kind: u16, value: &[u8]) -> DefaultNla {
    DefaultNla::new(kind, value.to_vec())
}

pub(super) fn raw_value(nla: &DefaultNla) -> Vec<u8> {
    let mut value = vec![0; nla.value_len()];
    nla.emit_value(&mut value);
    value
}

pub(super) fn emit_nlas(nlas: &[DefaultNla]) -> Vec<u8> {
    let mut buf = vec![0; nlas.buffer_len()];
    nlas.emit(&mut buf);
    buf
}

/// `CTA_ZONE` (big-endian).
pub(super) fn zone(zone: u16) -> ConntrackAttribute {
    ConntrackAttribute::Other(raw(CTA_ZONE, &zone.to_be_bytes()))
}

/// `CTA_ID` (big-endian).
pub(super) fn id(id: u32) -> ConntrackAttribute {
    ConntrackAttribute::Other(raw(CTA_ID, &id.to_be_bytes()))
}

/// What a top-level attribute the crate leaves raw is to flowguard.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TopLevel {
    Zone(u16),
    Id(u32),
    Filter,
    Unknown,
}

pub(super) fn top_level(nla: &DefaultNla) -> Result<TopLevel, String> {
    Ok(match nla.kind() & NLA_TYPE_MASK {
        CTA_ZONE => TopLevel::Zone(be16(&raw_value(nla)).ok_or("CTA_ZONE is not 2 bytes")?),
        CTA_ID => TopLevel::Id(be32(&raw_value(nla)).ok_or("CTA_ID is not 4 bytes")?),
        CTA_FILTER => TopLevel::Filter,
        _ => TopLevel::Unknown,
    })
}

/// The ICMP (or ICMPv6, by `proto`) id, type and code of a tuple.
pub(super) fn icmp_fields(proto: u8, id: u16, icmp_type: u8, code: u8) -> [ProtoTuple; 3] {
    let (kind_id, kind_type, kind_code) = if proto == IPPROTO_ICMPV6 {
        (
            CTA_PROTO_ICMPV6_ID,
            CTA_PROTO_ICMPV6_TYPE,
            CTA_PROTO_ICMPV6_CODE,
        )
    } else {
        debug_assert_eq!(proto, IPPROTO_ICMP);
        (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)
    };
    [
        ProtoTuple::Other(raw(kind_id, &id.to_be_bytes())),
        ProtoTuple::Other(raw(kind_type, &[icmp_type])),
        ProtoTuple::Other(raw(kind_code, &[code])),
    ]
}

/// One ICMP or ICMPv6 field of a tuple.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum IcmpField {
    Id(u16),
    Type(u8),
    Code(u8),
}

/// The ICMP field a raw protocol attribute holds, if it is one.
pub(super) fn icmp_field(nla: &DefaultNla) -> Result<Option<IcmpField>, String> {
    let value = raw_value(nla);
    let bad = || format!("ICMP attribute {} of {} bytes", nla.kind(), value.len());
    Ok(Some(match nla.kind() & NLA_TYPE_MASK {
        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => IcmpField::Id(be16(&value).ok_or_else(bad)?),
        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
            IcmpField::Type(*value.first().ok_or_else(bad)?)
        }
        CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
            IcmpField::Code(*value.first().ok_or_else(bad)?)
        }
        _ => return Ok(None),
    }))
}

/// `CTA_FILTER` asking the kernel to compare one address of one direction.
pub(super) fn filter(direction: Direction, field: Field) -> ConntrackAttribute {
    let kind = match direction {
        Direction::Orig => CTA_FILTER_ORIG_FLAGS,
        Direction::Reply => CTA_FILTER_REPLY_FLAGS,
    };
    let flags = match field {
        Field::Src => CTA_FILTER_F_CTA_IP_SRC,
        Field::Dst => CTA_FILTER_F_CTA_IP_DST,
    };
    // The flags are host-endian (nla_get_u32), unlike every other value here,
    // and the kernel parses CTA_FILTER strictly: NLA_F_NESTED is required.
    let inner = emit_nlas(&[raw(kind, &flags.to_ne_bytes())]);
    ConntrackAttribute::Other(DefaultNla::new(CTA_FILTER | NLA_F_NESTED, inner))
}

/// Sets NLA_F_NESTED again on the top-level CTA_FILTER of an encoded
/// message (see the module comment).
pub(super) fn mark_filter_nested(buf: &mut [u8]) {
    let mut offset = ATTRIBUTES_OFFSET;
    while offset + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[offset], buf[offset + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[offset + 2], buf[offset + 3]]);
        if kind & NLA_TYPE_MASK == CTA_FILTER {
            buf[offset + 2..offset + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        }
        if len < 4 {
            break;
        }
        offset += (len + 3) & !3;
    }
}

/// `IPCTNL_MSG_CT_GET_STATS`, without attributes.
pub(super) fn stats() -> ConntrackMessage {
    ConntrackMessage::Other {
        message_type: IPCTNL_MSG_CT_GET_STATS,
        attributes: vec![],
    }
}

fn be16(value: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(value.try_into().ok()?))
}

fn be32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.try_into().ok()?))
}
