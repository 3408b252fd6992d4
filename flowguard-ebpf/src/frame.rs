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
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPV6_HLEN: usize = 40;
const IPV4_MIN_HLEN: usize = 20;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const MAX_VLAN_TAGS: usize = 2;

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
        proto = load_be16(f, off + 2)?;
        off += 4;
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
                    u16::from_be(h.add(2).cast::<u16>().read_unaligned()) as usize,
                    h.add(V4_DST).cast::<u32>().read_unaligned(),
                )
            };
            let ihl = (ver_ihl & 0x0f) as usize;
            if ver_ihl >> 4 != 4 || ihl < 5 {
                return None;
            }
            // The whole header must be readable (options: ptr_at on its last
            // byte), and the datagram must fit in the frame.
            if total < ihl * 4 || off + total > wire_len {
                return None;
            }
            if ihl > 5 {
                ptr_at::<u8>(f, off + ihl * 4 - 1)?;
            }
            Some(L3::V4 { off, ihl, dst })
        }
        ETH_P_IPV6 => {
            let h = ptr_at::<[u8; IPV6_HLEN]>(f, off)? as *const u8;
            // SAFETY: the IPV6_HLEN bytes at `h` are inside the frame.
            let (ver, payload) = unsafe {
                (
                    *h,
                    u16::from_be(h.add(4).cast::<u16>().read_unaligned()) as usize,
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
    Some([
        load::<u32>(f, offset)?,
        load::<u32>(f, offset + 4)?,
        load::<u32>(f, offset + 8)?,
        load::<u32>(f, offset + 12)?,
    ])
}

/// Protocol and ports of the transport header, for reports only: (0, 0) when
/// the datagram is not TCP/UDP, is a non-first fragment, or is cut short.
#[inline(always)]
pub fn transport(f: &impl Frame, l3: L3) -> (u8, u16, u16) {
    let (proto, l4) = match l3 {
        L3::V4 { off, ihl, .. } => {
            let Some(proto) = load::<u8>(f, off + 9) else {
                return (0, 0, 0);
            };
            let Some(frag) = load_be16(f, off + 6) else {
                return (proto, 0, 0);
            };
            if frag & 0x1fff != 0 {
                return (proto, 0, 0);
            }
            (proto, off + ihl * 4)
        }
        L3::V6 { off } => {
            let Some(proto) = load::<u8>(f, off + 6) else {
                return (0, 0, 0);
            };
            (proto, off + IPV6_HLEN)
        }
        L3::Arp { .. } => return (0, 0, 0),
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return (proto, 0, 0);
    }
    match (load_be16(f, l4), load_be16(f, l4 + 2)) {
        (Some(s), Some(d)) => (proto, s, d),
        _ => (proto, 0, 0),
    }
}

/// Sender protocol address of an Ethernet/IPv4 ARP packet whose sender
/// hardware address equals `src_mac`, as a raw network-order word.
#[inline(always)]
pub fn arp_sender(f: &impl Frame, off: usize, src_mac: &[u8; 6]) -> Option<u32> {
    // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4.
    let fixed: [u8; 6] = load(f, off)?;
    if fixed != [0, 1, 0x08, 0x00, 6, 4] {
        return None;
    }
    let sha: [u8; 6] = load(f, off + 8)?;
    if sha != *src_mac {
        return None;
    }
    let spa: u32 = load(f, off + 14)?;
    if spa == 0 {
        return None; // ARP probe: the sender has no address yet
    }
    Some(spa)
}
