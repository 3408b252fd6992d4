//! Bounds-checked access to a frame and the parsing of its Ethernet, VLAN,
//! IPv4/IPv6 and ARP headers. Every read goes through `ptr_at`, and a frame
//! that is not exactly understood yields `None`: the caller lets it pass.

use core::mem::size_of;

use aya_ebpf::{
    programs::{TcContext, XdpContext},
    EbpfContext,
};

pub const ETH_HLEN: usize = 14;
/// Offsets in the Ethernet header.
pub const ETH_DST: usize = 0;
pub const ETH_SRC: usize = 6;
const ETH_TYPE: usize = 12;
/// The I/G bit of a MAC's first byte: set for group (multicast, broadcast).
pub const ETH_GROUP_BIT: u8 = 0x01;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// A VLAN tag, and the offset of the ethertype it carries.
const VLAN_HLEN: usize = 4;
const VLAN_INNER_TYPE: usize = 2;
const MAX_VLAN_TAGS: usize = 2;
/// IPv4 header: fixed part, field offsets, and IHL's unit in bytes.
const IPV4_MIN_HLEN: usize = 20;
const IPV4_MIN_IHL: usize = IPV4_MIN_HLEN / IPV4_IHL_UNIT;
const IPV4_IHL_UNIT: usize = 4;
const V4_TOT_LEN: usize = 2;
const V4_FRAG_OFF: usize = 6;
const V4_PROTOCOL: usize = 9;
/// The fragment offset bits of `frag_off` (IP_OFFSET).
const V4_OFFSET_MASK: u16 = 0x1fff;
/// IPv6 header: its length and field offsets.
pub const IPV6_HLEN: usize = 40;
const V6_PAYLOAD_LEN: usize = 4;
const V6_NEXT_HEADER: usize = 6;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Ports at the start of a TCP or UDP header.
const L4_SRC_PORT: usize = 0;
const L4_DST_PORT: usize = 2;
/// Both ports, read at once from `L4_SRC_PORT`.
const L4_PORTS_LEN: usize = 4;
/// Ethernet/IPv4 ARP: the fixed part (htype 1, ptype 0x0800, hlen 6, plen
/// 4), and the offsets of the sender's hardware and protocol addresses.
const ARP_FIXED: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];
const ARP_SHA: usize = 8;
const ARP_SPA: usize = 14;
/// The most header bytes parsing reads: Ethernet, two VLAN tags and the
/// longest IPv4 header (60 bytes; IPv6's is 40).
pub const MAX_HEADERS: usize = ETH_HLEN + MAX_VLAN_TAGS * VLAN_HLEN + 60;

/// The view of a frame that parsing needs: where its bytes are, and how long
/// it is on the wire (the linear part may be shorter for a non-linear skb).
pub trait Frame: EbpfContext {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    fn wire_len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn wire_len(&self) -> usize {
        self.data_end() - self.data()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn wire_len(&self) -> usize {
        self.len() as usize
    }
}

/// A pointer to a `T` at `offset` in the frame, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(f: &impl Frame, offset: usize) -> Option<*const T> {
    let start = f.start();
    if start + offset + size_of::<T>() > f.end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn load<T: Copy>(f: &impl Frame, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the value lies inside the frame.
    ptr_at::<T>(f, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn load_be16(f: &impl Frame, offset: usize) -> Option<u16> {
    load::<u16>(f, offset).map(u16::from_be)
}

/// Network layer of a frame, with the offset of its header.
#[derive(Clone, Copy)]
pub enum L3 {
    /// A complete IPv4 header at `off` with `ihl` 32-bit words, whose total
    /// length fits in the frame, and its destination (a native load of the
    /// address bytes).
    V4 { off: usize, ihl: usize, dst: u32 },
    /// A complete IPv6 header at `off` whose payload fits in the frame.
    V6 { off: usize },
    /// An Ethernet/IPv4 ARP packet at `off`.
    Arp { off: usize },
}

/// Skips up to two VLAN tags (802.1Q, 802.1ad) and validates the IP header.
/// `None` for anything else, for truncated frames and for inconsistent
/// lengths.
#[inline(always)]
pub fn parse_l3(f: &impl Frame) -> Option<L3> {
    let mut off = ETH_HLEN;
    let mut proto = load_be16(f, ETH_TYPE)?;
    let mut i = 0;
    while i < MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        proto = load_be16(f, off + VLAN_INNER_TYPE)?;
        off += VLAN_HLEN;
        i += 1;
    }
    let wire_len = f.wire_len();
    match proto {
        ETH_P_IP => {
            // One bounds check covers the fixed header: every field read
            // here, and the destination the caller needs next.
            let h = ptr_at::<[u8; IPV4_MIN_HLEN]>(f, off)? as *const u8;
            // SAFETY: the IPV4_MIN_HLEN bytes at `h` are inside the frame.
            let (ver_ihl, total, dst) = unsafe {
                (
                    *h,
                    u16::from_be(h.add(V4_TOT_LEN).cast::<u16>().read_unaligned()) as usize,
                    h.add(V4_DST).cast::<u32>().read_unaligned(),
                )
            };
            let ihl = (ver_ihl & 0x0f) as usize;
            if ver_ihl >> 4 != 4 || ihl < IPV4_MIN_IHL {
                return None;
            }
            // The whole header must be readable (options: ptr_at on its last
            // byte), and the datagram must fit in the frame.
            if total < ihl * IPV4_IHL_UNIT || off + total > wire_len {
                return None;
            }
            if ihl > IPV4_MIN_IHL {
                ptr_at::<u8>(f, off + ihl * IPV4_IHL_UNIT - 1)?;
            }
            Some(L3::V4 { off, ihl, dst })
        }
        ETH_P_IPV6 => {
            let h = ptr_at::<[u8; IPV6_HLEN]>(f, off)? as *const u8;
            // SAFETY: the IPV6_HLEN bytes at `h` are inside the frame.
            let (ver, payload) = unsafe {
                (
                    *h,
                    u16::from_be(h.add(V6_PAYLOAD_LEN).cast::<u16>().read_unaligned()) as usize,
                )
            };
            if ver >> 4 != 6 || off + IPV6_HLEN + payload > wire_len {
                return None;
            }
            Some(L3::V6 { off })
        }
        ETH_P_ARP => Some(L3::Arp { off }),
        _ => None,
    }
}

/// Offsets of the addresses inside the IP headers.
pub const V4_SRC: usize = 12;
pub const V4_DST: usize = 16;
pub const V6_SRC: usize = 8;
pub const V6_DST: usize = 24;

/// An IPv6 address as four network-order words.
#[inline(always)]
pub fn load_v6_addr(f: &impl Frame, offset: usize) -> Option<[u32; 4]> {
    const WORD: usize = size_of::<u32>();
    Some([
        load::<u32>(f, offset)?,
        load::<u32>(f, offset + WORD)?,
        load::<u32>(f, offset + 2 * WORD)?,
        load::<u32>(f, offset + 3 * WORD)?,
    ])
}

/// Protocol and ports of the transport header, for reports only: (0, 0) when
/// the datagram is not TCP/UDP, is a non-first fragment, or is cut short.
#[inline(always)]
pub fn transport(f: &impl Frame, l3: L3) -> (u8, u16, u16) {
    let (proto, l4) = match l3 {
        L3::V4 { off, ihl, .. } => {
            let Some(proto) = load::<u8>(f, off + V4_PROTOCOL) else {
                return (0, 0, 0);
            };
            let Some(frag) = load_be16(f, off + V4_FRAG_OFF) else {
                return (proto, 0, 0);
            };
            if frag & V4_OFFSET_MASK != 0 {
                return (proto, 0, 0);
            }
            (proto, off + ihl * IPV4_IHL_UNIT)
        }
        L3::V6 { off } => {
            let Some(proto) = load::<u8>(f, off + V6_NEXT_HEADER) else {
                return (0, 0, 0);
            };
            (proto, off + IPV6_HLEN)
        }
        L3::Arp { .. } => return (0, 0, 0),
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return (proto, 0, 0);
    }
    // Both ports through one bounds-checked load: with two, LLVM (bpfeb)
    // computed the second load's pointer apart from the checked one, and the
    // verifier refused the XDP program ("invalid access to packet", seen on
    // s390x: the same code is in the mips object).
    match load::<[u8; L4_PORTS_LEN]>(f, l4 + L4_SRC_PORT) {
        Some(p) => (
            proto,
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[L4_DST_PORT], p[L4_DST_PORT + 1]]),
        ),
        None => (proto, 0, 0),
    }
}

/// Sender protocol address of an Ethernet/IPv4 ARP packet whose sender
/// hardware address equals `src_mac`, as a raw network-order word.
#[inline(always)]
pub fn arp_sender(f: &impl Frame, off: usize, src_mac: &[u8; 6]) -> Option<u32> {
    let fixed: [u8; 6] = load(f, off)?;
    if fixed != ARP_FIXED {
        return None;
    }
    let sha: [u8; 6] = load(f, off + ARP_SHA)?;
    if sha != *src_mac {
        return None;
    }
    let spa: u32 = load(f, off + ARP_SPA)?;
    if spa == 0 {
        return None; // ARP probe: the sender has no address yet
    }
    Some(spa)
}
