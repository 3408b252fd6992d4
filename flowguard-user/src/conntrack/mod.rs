//! flowguard's conntrack client and eviction policy: finds the conntrack
//! entries that involve an endpoint IP over ctnetlink, deletes the stale
//! (offloaded) ones so the flowtable re-learns the destination MAC, and
//! decides, without a clock of its own, when an endpoint may be evicted again.
//!
//! `codec` builds and reads the netlink messages, `client` owns the socket,
//! `policy` holds the pure decisions.

mod client;
mod codec;
mod gaps;
mod policy;

use std::{fmt, io, net::IpAddr};

/// Which direction of an entry a kernel-side (CTA_FILTER) filter looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Orig,
    Reply,
}

/// Which address of that direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    Src,
    Dst,
}

pub use client::Conntrack;
pub use policy::{select_for_eviction, Admission, DeferredEvictions, EvictionPolicy};

/// `IPS_SEEN_REPLY`: packets were seen in both directions.
pub const IPS_SEEN_REPLY: u32 = 1 << 1;
/// `IPS_ASSURED`: the entry is not dropped early under table pressure.
pub const IPS_ASSURED: u32 = 1 << 2;
/// `IPS_CONFIRMED`: the entry is in the table (always set on dumped entries).
pub const IPS_CONFIRMED: u32 = 1 << 3;
/// `IPS_OFFLOAD`: the flow is in a netfilter flowtable (software fast path).
pub const IPS_OFFLOAD: u32 = 1 << 14;
/// `IPS_HW_OFFLOAD`: the flow is offloaded to hardware as well.
pub const IPS_HW_OFFLOAD: u32 = 1 << 15;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_GRE: u8 = 47;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

/// One direction of a conntrack entry.
///
/// For ICMP and ICMPv6, which have no ports, `src_port` holds the echo
/// identifier and `dst_port` holds `type << 8 | code`, the way the kernel's
/// own tuple packs them; [`Tuple::icmp`], [`Tuple::icmp_type`] and
/// [`Tuple::icmp_code`] spell that out. Protocols without ports or ids (other
/// than those listed in `has_ports`) carry zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Tuple {
    pub fn tcp(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Self {
        Self {
            src,
            dst,
            proto: IPPROTO_TCP,
            src_port,
            dst_port,
        }
    }

    pub fn udp(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Self {
        Self {
            src,
            dst,
            proto: IPPROTO_UDP,
            src_port,
            dst_port,
        }
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6) tuple, chosen by the address family.
    pub fn icmp(src: IpAddr, dst: IpAddr, id: u16, icmp_type: u8, icmp_code: u8) -> Self {
        let proto = if src.is_ipv4() {
            IPPROTO_ICMP
        } else {
            IPPROTO_ICMPV6
        };
        Self {
            src,
            dst,
            proto,
            src_port: id,
            dst_port: u16::from(icmp_type) << 8 | u16::from(icmp_code),
        }
    }

    pub fn is_icmp(&self) -> bool {
        self.proto == IPPROTO_ICMP || self.proto == IPPROTO_ICMPV6
    }

    /// The ICMP type, for ICMP and ICMPv6 tuples.
    pub fn icmp_type(&self) -> Option<u8> {
        self.is_icmp().then_some((self.dst_port >> 8) as u8)
    }

    /// The ICMP code, for ICMP and ICMPv6 tuples.
    pub fn icmp_code(&self) -> Option<u8> {
        self.is_icmp().then_some(self.dst_port as u8)
    }

    /// The ICMP echo identifier, for ICMP and ICMPv6 tuples.
    pub fn icmp_id(&self) -> Option<u16> {
        self.is_icmp().then_some(self.src_port)
    }

    /// Whether the kernel identifies flows of this protocol by ports.
    fn has_ports(&self) -> bool {
        has_ports(self.proto)
    }

    fn involves(&self, ip: IpAddr) -> bool {
        self.src.to_canonical() == ip || self.dst.to_canonical() == ip
    }
}

fn has_ports(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP | IPPROTO_DCCP | IPPROTO_GRE
    )
}

fn proto_name(proto: u8) -> Option<&'static str> {
    Some(match proto {
        IPPROTO_ICMP => "icmp",
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_DCCP => "dccp",
        IPPROTO_GRE => "gre",
        IPPROTO_ICMPV6 => "icmpv6",
        IPPROTO_SCTP => "sctp",
        IPPROTO_UDPLITE => "udplite",
        _ => return None,
    })
}

impl fmt::Display for Tuple {
    /// `10.0.0.2:51820 -> 10.0.0.1:51820`, `[2001:db8::1]:443 -> ...`, or for
    /// ICMP `10.0.0.2 -> 10.0.0.1 id=7 type=8 code=0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoint = |f: &mut fmt::Formatter<'_>, ip: IpAddr, port: u16| match ip {
            IpAddr::V4(v4) => write!(f, "{v4}:{port}"),
            IpAddr::V6(v6) => write!(f, "[{v6}]:{port}"),
        };
        if self.is_icmp() {
            write!(
                f,
                "{} -> {} id={} type={} code={}",
                self.src,
                self.dst,
                self.src_port,
                self.dst_port >> 8,
                self.dst_port & 0xff
            )
        } else if self.has_ports() {
            endpoint(f, self.src, self.src_port)?;
            f.write_str(" -> ")?;
            endpoint(f, self.dst, self.dst_port)
        } else {
            write!(f, "{} -> {}", self.src, self.dst)
        }
    }
}

/// A conntrack entry, as dumped by the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub orig: Tuple,
    pub reply: Tuple,
    /// `IPS_*` status bits.
    pub status: u32,
    /// Conntrack zone (0 is the default zone).
    pub zone: u16,
    /// The kernel's id of the entry; a delete that carries it only removes
    /// this very entry, not a newer one with the same tuple.
    pub id: Option<u32>,
    pub mark: Option<u32>,
}

impl Flow {
    /// A flow without NAT: the reply tuple mirrors the original one.
    pub fn unnatted(orig: Tuple) -> Self {
        let reply = if orig.is_icmp() {
            // An echo request (8, or 128 for ICMPv6) is answered by its reply
            // type (0, or 129); the kernel insists on that pairing.
            let reply_type = match (orig.proto, orig.dst_port >> 8) {
                (IPPROTO_ICMP, 8) => 0,
                (IPPROTO_ICMPV6, 128) => 129,
                (_, t) => t,
            };
            Tuple::icmp(
                orig.dst,
                orig.src,
                orig.src_port,
                reply_type as u8,
                orig.dst_port as u8,
            )
        } else {
            Tuple {
                src: orig.dst,
                dst: orig.src,
                proto: orig.proto,
                src_port: orig.dst_port,
                dst_port: orig.src_port,
            }
        };
        Self {
            orig,
            reply,
            status: 0,
            zone: 0,
            id: None,
            mark: None,
        }
    }

    /// Whether `ip` is the source or destination of either direction (so NAT
    /// targets count too).
    pub fn involves(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.orig.involves(ip) || self.reply.involves(ip)
    }

    /// Whether a flowtable holds this flow (`OFFLOAD` or `HW_OFFLOAD`).
    pub fn is_offloaded(&self) -> bool {
        self.status & (IPS_OFFLOAD | IPS_HW_OFFLOAD) != 0
    }

    /// One line, e.g. `udp 10.0.0.2:51820 -> 10.0.0.1:51820 (reply
    /// 192.168.1.240:51820 -> 10.0.0.2:51820) [OFFLOAD]`.
    pub fn describe(&self) -> String {
        let mut line = match proto_name(self.orig.proto) {
            Some(name) => format!("{name} {} (reply {})", self.orig, self.reply),
            None => format!(
                "proto {} {} (reply {})",
                self.orig.proto, self.orig, self.reply
            ),
        };
        if self.status & IPS_HW_OFFLOAD != 0 {
            line.push_str(" [HW_OFFLOAD]");
        } else if self.status & IPS_OFFLOAD != 0 {
            line.push_str(" [OFFLOAD]");
        }
        if self.status & IPS_SEEN_REPLY == 0 {
            line.push_str(" [UNREPLIED]");
        }
        if self.status & IPS_ASSURED != 0 {
            line.push_str(" [ASSURED]");
        }
        if self.zone != 0 {
            line.push_str(&format!(" zone={}", self.zone));
        }
        if let Some(mark) = self.mark.filter(|&m| m != 0) {
            line.push_str(&format!(" mark={mark}"));
        }
        line
    }

    /// What identifies the entry in the table: zone and original tuple.
    fn key(&self) -> (u16, Tuple) {
        (self.zone, self.orig)
    }
}

/// Which conntrack entries of an endpoint flowguard deletes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EvictScope {
    /// Only entries a flowtable holds (`OFFLOAD` or `HW_OFFLOAD`): the ones
    /// that can carry a stale MAC.
    #[default]
    Offloaded,
    /// Every entry that involves the endpoint.
    All,
    /// Never delete anything.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack is not available: load nf_conntrack (modprobe nf_conntrack_netlink)")]
    NotAvailable,
    #[error("conntrack over netlink needs CAP_NET_ADMIN: run flowguard as root or grant it the capability")]
    NeedsCapNetAdmin,
    #[error("netlink socket error while trying to {context}: {source}")]
    Socket {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused to {op}: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no answer from the kernel within {secs} s while trying to {op}")]
    Timeout { op: &'static str, secs: u64 },
    #[error("malformed netlink data from the kernel: {0}")]
    Malformed(String),
    #[error("refusing to send a conntrack delete without a complete original tuple ({0}): it would flush the whole table")]
    IncompleteTuple(String),
    #[error("invalid flow for {op}: {reason}")]
    InvalidFlow { op: &'static str, reason: String },
}

impl ConntrackError {
    /// The errno the kernel answered with, if this is a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ConntrackError::Kernel { source, .. } | ConntrackError::Socket { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(s: &str) -> IpAddr {
        s.parse::<Ipv4Addr>().unwrap().into()
    }

    #[test]
    fn describe_is_one_line_like_conntrack() {
        let mut flow = Flow {
            orig: Tuple::udp(v4("10.0.0.2"), 51820, v4("10.0.0.1"), 51820),
            reply: Tuple::udp(v4("192.168.1.240"), 51820, v4("10.0.0.2"), 51820),
            status: IPS_OFFLOAD | IPS_SEEN_REPLY | IPS_CONFIRMED,
            zone: 0,
            id: Some(7),
            mark: Some(0),
        };
        assert_eq!(
            flow.describe(),
            "udp 10.0.0.2:51820 -> 10.0.0.1:51820 (reply 192.168.1.240:51820 -> 10.0.0.2:51820) [OFFLOAD]"
        );
        flow.status = IPS_HW_OFFLOAD | IPS_OFFLOAD | IPS_SEEN_REPLY | IPS_ASSURED;
        flow.zone = 3;
        assert!(flow.describe().ends_with("[HW_OFFLOAD] [ASSURED] zone=3"));

        let six = Flow::unnatted(Tuple::tcp(
            "2001:db8::2".parse::<Ipv6Addr>().unwrap().into(),
            40000,
            "2001:db8::1".parse::<Ipv6Addr>().unwrap().into(),
            443,
        ));
        assert_eq!(
            six.describe(),
            "tcp [2001:db8::2]:40000 -> [2001:db8::1]:443 (reply [2001:db8::1]:443 -> [2001:db8::2]:40000) [UNREPLIED]"
        );
        let ping = Flow::unnatted(Tuple::icmp(v4("10.0.0.2"), v4("10.0.0.1"), 9, 8, 0));
        assert_eq!(
            ping.describe(),
            "icmp 10.0.0.2 -> 10.0.0.1 id=9 type=8 code=0 (reply 10.0.0.1 -> 10.0.0.2 id=9 type=0 code=0) [UNREPLIED]"
        );
    }

    #[test]
    fn icmp_fields_are_packed_like_the_kernel_tuple() {
        let t = Tuple::icmp(v4("10.0.0.2"), v4("10.0.0.1"), 0x1234, 8, 3);
        assert_eq!(t.proto, IPPROTO_ICMP);
        assert_eq!(
            (t.icmp_id(), t.icmp_type(), t.icmp_code()),
            (Some(0x1234), Some(8), Some(3))
        );
        let u = Tuple::udp(v4("10.0.0.2"), 1, v4("10.0.0.1"), 2);
        assert_eq!(u.icmp_type(), None);
    }

    #[test]
    fn involves_matches_any_address_of_either_direction() {
        let flow = Flow {
            orig: Tuple::udp(v4("10.0.0.2"), 1000, v4("203.0.113.1"), 53),
            reply: Tuple::udp(v4("192.168.1.240"), 53, v4("10.0.0.2"), 1000),
            status: 0,
            zone: 0,
            id: None,
            mark: None,
        };
        for ip in ["10.0.0.2", "203.0.113.1", "192.168.1.240"] {
            assert!(flow.involves(v4(ip)), "{ip}");
        }
        assert!(!flow.involves(v4("192.168.1.241")));
        // An IPv4-mapped IPv6 address is the same endpoint.
        assert!(flow.involves("::ffff:192.168.1.240".parse::<Ipv6Addr>().unwrap().into()));
    }
}
