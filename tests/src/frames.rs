//! Ethernet frames for the program tests and the benchmark, built with
//! `etherparse`: optional 802.1Q or 802.1ad + 802.1Q tags, then IPv4/IPv6
//! with UDP or TCP, ARP, or any other ethertype. Nothing is padded unless
//! asked for ([`pad`]).

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header, IpFragOffset, IpHeaders,
    IpNumber, Ipv4Header, Ipv4Options, PacketBuilder, SingleVlanHeader, VlanId, VlanPcp,
};

pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];

/// The other end of the flows in program tests and the fuzz: the sender of
/// stale frames, the router's MAC, a WireGuard-like UDP flow.
pub const PEER4: [u8; 4] = [10, 0, 0, 7];
pub const PEER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
pub const ROUTER: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const SPORT: u16 = 51820;
pub const DPORT: u16 = 41641;
pub const PAYLOAD: &[u8] = b"wireguard keepalive";

/// Length of the Ethernet header without tags.
pub const ETH_HLEN: usize = 14;
/// Length of one VLAN tag.
pub const VLAN_HLEN: usize = 4;

/// VLAN tags between the MAC addresses and the ethertype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Vlan {
    /// No tag.
    #[default]
    None,
    /// One 802.1Q tag (0x8100) with this VLAN id.
    Single(u16),
    /// An 802.1ad outer tag (0x88a8) and an 802.1Q inner tag: (outer, inner).
    Double(u16, u16),
}

impl Vlan {
    /// Bytes the tags take.
    pub fn len(self) -> usize {
        match self {
            Vlan::None => 0,
            Vlan::Single(_) => VLAN_HLEN,
            Vlan::Double(..) => 2 * VLAN_HLEN,
        }
    }

    pub fn is_empty(self) -> bool {
        self == Vlan::None
    }

    /// Offset of the network header.
    pub fn l3_offset(self) -> usize {
        ETH_HLEN + self.len()
    }
}

/// The link layer of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2 {
    pub dst: Mac,
    pub src: Mac,
    pub vlan: Vlan,
}

impl L2 {
    pub fn new(dst: Mac, src: Mac) -> Self {
        Self {
            dst,
            src,
            vlan: Vlan::None,
        }
    }

    pub fn vlan(self, vlan: Vlan) -> Self {
        Self { vlan, ..self }
    }
}

fn vid(id: u16) -> VlanId {
    VlanId::try_new(id).expect("VLAN id below 4096")
}

/// Runs `$body` with `$b` bound to an etherparse builder that has written the
/// Ethernet header and the tags of `$l2` (each tag count is its own type).
macro_rules! with_l2 {
    ($l2:expr, |$b:ident| $body:expr) => {{
        let l2: L2 = $l2;
        match l2.vlan {
            Vlan::None => {
                let $b = PacketBuilder::ethernet2(l2.src, l2.dst);
                $body
            }
            Vlan::Single(id) => {
                let $b = PacketBuilder::ethernet2(l2.src, l2.dst).single_vlan(vid(id));
                $body
            }
            Vlan::Double(outer, inner) => {
                let $b =
                    PacketBuilder::ethernet2(l2.src, l2.dst).double_vlan(vid(outer), vid(inner));
                $body
            }
        }
    }};
}

/// IPv4/UDP.
pub fn udp4(l2: L2, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    with_l2!(l2, |b| b
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload))
    .expect("building an IPv4/UDP frame");
    out
}

/// IPv4/UDP with IP options (a multiple of 4 bytes, at most 40) and,
/// when `frag_offset` is not zero, as a non-first fragment at that offset
/// (in 8-byte units) whose payload is `payload` as is (no UDP header).
pub fn udp4_ext(
    l2: L2,
    src: [u8; 4],
    dst: [u8; 4],
    options: &[u8],
    frag_offset: u16,
    (sport, dport): (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, src, dst).expect("an IPv4 header");
    ip.options =
        Ipv4Options::try_from(options).expect("IPv4 options: a multiple of 4, at most 40 bytes");
    let mut out = Vec::new();
    if frag_offset == 0 {
        with_l2!(l2, |b| b
            .ip(IpHeaders::Ipv4(ip.clone(), Default::default()))
            .udp(sport, dport)
            .write(&mut out, payload))
        .expect("building an IPv4/UDP frame with options");
        return out;
    }
    // A non-first fragment: the IP header and a slice of the datagram.
    ip.fragment_offset = IpFragOffset::try_new(frag_offset).expect("fragment offset below 8192");
    ip.protocol = IpNumber::UDP;
    ip.total_len = (ip.header_len() + payload.len()) as u16;
    ip.header_checksum = ip.calc_header_checksum();
    let mut head = ethertype(l2, 0x0800, &[]);
    head.extend_from_slice(&ip.to_bytes());
    head.extend_from_slice(payload);
    head
}

/// IPv6/UDP.
pub fn udp6(
    l2: L2,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    with_l2!(l2, |b| b
        .ipv6(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload))
    .expect("building an IPv6/UDP frame");
    out
}

/// IPv4/TCP (an ACK segment).
pub fn tcp4(l2: L2, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    with_l2!(l2, |b| b
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 65535)
        .ack(1)
        .write(&mut out, payload))
    .expect("building an IPv4/TCP frame");
    out
}

/// IPv6/TCP (an ACK segment).
pub fn tcp6(
    l2: L2,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    with_l2!(l2, |b| b
        .ipv6(src, dst, 64)
        .tcp(sport, dport, 1, 65535)
        .ack(1)
        .write(&mut out, payload))
    .expect("building an IPv6/TCP frame");
    out
}

/// An Ethernet/IPv4 ARP packet (`op`: 1 request, 2 reply).
pub fn arp(l2: L2, op: u16, sha: Mac, spa: [u8; 4], tha: Mac, tpa: [u8; 4]) -> Vec<u8> {
    let pkt = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation(op),
        &sha,
        &spa,
        &tha,
        &tpa,
    )
    .expect("an Ethernet/IPv4 ARP packet");
    let mut out = Vec::new();
    with_l2!(l2, |b| b.arp(pkt).write(&mut out)).expect("building an ARP frame");
    out
}

/// An ARP request from `sha`/`spa` for `tpa`, broadcast.
pub fn arp_request(src: Mac, spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    arp(L2::new(BROADCAST, src), 1, src, spa, [0; 6], tpa)
}

/// A gratuitous ARP reply announcing `spa` at `src`, broadcast.
pub fn arp_gratuitous_reply(src: Mac, spa: [u8; 4]) -> Vec<u8> {
    arp(L2::new(BROADCAST, src), 2, src, spa, BROADCAST, spa)
}

/// Any other ethertype with this payload (tags first, if any).
pub fn ethertype(l2: L2, ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let tag = |tpid: EtherType, id: u16| SingleVlanHeader {
        pcp: VlanPcp::ZERO,
        drop_eligible_indicator: false,
        vlan_id: vid(id),
        ether_type: tpid,
    };
    // Each header names the type of what follows it.
    let (first, tags): (EtherType, Vec<SingleVlanHeader>) = match l2.vlan {
        Vlan::None => (EtherType(ether_type), vec![]),
        Vlan::Single(id) => (
            EtherType::VLAN_TAGGED_FRAME,
            vec![tag(EtherType(ether_type), id)],
        ),
        Vlan::Double(outer, inner) => (
            EtherType::PROVIDER_BRIDGING,
            vec![
                tag(EtherType::VLAN_TAGGED_FRAME, outer),
                tag(EtherType(ether_type), inner),
            ],
        ),
    };
    let mut out = Ethernet2Header {
        source: l2.src,
        destination: l2.dst,
        ether_type: first,
    }
    .to_bytes()
    .to_vec();
    for t in tags {
        out.extend_from_slice(&t.to_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// The frame padded with zero bytes to at least `len` bytes.
pub fn pad(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    if frame.len() < len {
        frame.resize(len, 0);
    }
    frame
}

/// The frame with its destination MAC replaced.
pub fn with_dst(mut frame: Vec<u8>, dst: Mac) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame
}

/// The IPv4-mapped IPv6 address `::ffff:a.b.c.d` (how the endpoint map keys IPv4).
pub fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[10] = 0xff;
    b[11] = 0xff;
    b[12..].copy_from_slice(&a);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Mac = [2, 0, 0, 0, 0, 1];
    const S: Mac = [2, 0, 0, 0, 0, 2];

    #[test]
    fn udp4_layout() {
        let f = udp4(
            L2::new(D, S),
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            1000,
            2000,
            &[1, 2, 3, 4],
        );
        assert_eq!(f.len(), 14 + 20 + 8 + 4);
        assert_eq!(&f[..6], &D);
        assert_eq!(&f[6..12], &S);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(&f[14 + 12..14 + 20], &[10, 0, 0, 1, 10, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 32, "IPv4 total length");
    }

    #[test]
    fn double_tag_layout() {
        let f = udp6(
            L2::new(D, S).vlan(Vlan::Double(100, 200)),
            [0xfd; 16],
            [0xfe; 16],
            1,
            2,
            &[],
        );
        assert_eq!(&f[12..14], &[0x88, 0xa8]);
        assert_eq!(&f[14..16], &100u16.to_be_bytes());
        assert_eq!(&f[16..18], &[0x81, 0x00]);
        assert_eq!(&f[18..20], &200u16.to_be_bytes());
        assert_eq!(&f[20..22], &[0x86, 0xdd]);
        assert_eq!(f.len(), 22 + 40 + 8);
    }

    #[test]
    fn ipv4_options_and_fragment_layout() {
        let f = udp4_ext(
            L2::new(D, S),
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            &[1; 8],
            0,
            (7, 9),
            &[0; 4],
        );
        assert_eq!(f[14], 0x47, "version 4, IHL 7");
        assert_eq!(
            u16::from_be_bytes([f[16], f[17]]),
            28 + 8 + 4,
            "total length"
        );
        assert_eq!(
            &f[14 + 28..14 + 32],
            &[0, 7, 0, 9],
            "UDP ports after the options"
        );
        let f = udp4_ext(
            L2::new(D, S),
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            &[],
            185,
            (7, 9),
            &[0; 4],
        );
        assert_eq!(f.len(), 14 + 20 + 4);
        assert_eq!(
            u16::from_be_bytes([f[20], f[21]]) & 0x1fff,
            185,
            "fragment offset"
        );
        assert_eq!(f[23], 17, "protocol UDP");
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 24, "total length");
    }

    #[test]
    fn arp_layout() {
        let f = arp_request(S, [192, 168, 1, 5], [192, 168, 1, 1]);
        assert_eq!(f.len(), 14 + 28);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..20], &[0, 1, 8, 0, 6, 4]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &S);
        assert_eq!(&f[28..32], &[192, 168, 1, 5]);
    }

    #[test]
    fn ethertype_layout() {
        let f = ethertype(L2::new(D, S).vlan(Vlan::Single(7)), 0x88b5, &[9; 4]);
        assert_eq!(&f[12..18], &[0x81, 0x00, 0, 7, 0x88, 0xb5]);
        assert_eq!(f.len(), 22);
    }
}
