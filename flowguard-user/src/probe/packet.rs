//! The prober's sockets: an `AF_PACKET` one for ARP out of a given
//! interface to a given MAC and the ARP replies that reach this host on any
//! interface; a raw ICMPv6 one for neighbour solicitations and the
//! advertisements that answer them.

use std::{
    io,
    net::Ipv6Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use crate::settings::Mac;

const ETH_P_ARP: u16 = 0x0806;
/// Room for the answers of a few thousand endpoints asked at once.
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// One received packet: its payload length and Ethernet source.
pub struct Received {
    pub len: usize,
    pub from: Mac,
    /// `PACKET_HOST`, `PACKET_BROADCAST`, ... (`sll_pkttype`).
    pub pkttype: u8,
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value is valid for size_of::<T>() bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the receive buffer to [`RECEIVE_BUFFER`]. Best effort: without
/// CAP_NET_ADMIN the kernel caps the size, which only costs answers.
fn grow_receive_buffer(fd: RawFd) {
    let bytes: libc::c_int = RECEIVE_BUFFER;
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes).is_err() {
        let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes);
    }
}

/// A `SOCK_DGRAM` packet socket for ARP: the kernel builds and strips the
/// Ethernet header. Bound to no interface, so one socket serves them all.
pub struct ArpSocket {
    fd: OwnedFd,
}

impl ArpSocket {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket creation; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let socket = Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        // A round's answers arrive together (one per endpoint asked); the
        // default buffer holds a few hundred of them.
        grow_receive_buffer(socket.fd.as_raw_fd());
        Ok(socket)
    }

    /// Sends one ARP packet out of `ifindex` to the Ethernet address `to`.
    pub fn send(&self, ifindex: u32, to: Mac, payload: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain old data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = ETH_P_ARP.to_be();
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&to.0);
        // SAFETY: payload and sa are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// One waiting packet, if any (never blocks).
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        // SAFETY: sockaddr_ll is plain old data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut sa_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and sa are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut sa as *mut libc::sockaddr_ll).cast(),
                &mut sa_len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        let mut from = [0u8; 6];
        from.copy_from_slice(&sa.sll_addr[..6]);
        Ok(Some(Received {
            len: n as usize,
            from: Mac(from),
            pkttype: sa.sll_pkttype,
        }))
    }
}

/// Waits up to `timeout` until one of `fds` is readable; which ones are.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: pfds is a valid array of pollfd of the length given.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        return Ok(vec![false; fds.len()]);
    }
    Ok(pfds.iter().map(|p| p.revents & libc::POLLIN != 0).collect())
}

const ICMP6_FILTER: libc::c_int = 1;
const ND_NEIGHBOR_ADVERT: u32 = 136;

/// A raw ICMPv6 socket that sends neighbour solicitations (hop limit 255,
/// as RFC 4861 requires; the kernel fills in the checksum and picks the
/// source address) and receives only neighbour advertisements.
pub struct Icmp6Socket {
    fd: OwnedFd,
}

impl Icmp6Socket {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket creation; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET6,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMPV6,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let socket = Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        // struct icmp6_filter: a set bit blocks that type.
        let mut filter = [u32::MAX; 8];
        filter[(ND_NEIGHBOR_ADVERT >> 5) as usize] &= !(1 << (ND_NEIGHBOR_ADVERT & 31));
        socket.set(libc::IPPROTO_ICMPV6, ICMP6_FILTER, &filter)?;
        let hops: libc::c_int = 255;
        socket.set(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &hops)?;
        socket.set(libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, &hops)?;
        let off: libc::c_int = 0;
        socket.set(libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, &off)?;
        grow_receive_buffer(socket.fd.as_raw_fd());
        Ok(socket)
    }

    fn set<T>(&self, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
        setsockopt(self.fd.as_raw_fd(), level, name, value)
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends `payload` (an ICMPv6 message) to `to`; `ifindex` picks the
    /// interface of a link-local or multicast destination.
    pub fn send(&self, to: Ipv6Addr, ifindex: u32, payload: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_in6 is plain old data.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = to.octets();
        sa.sin6_scope_id = ifindex;
        // SAFETY: payload and sa are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&sa as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One waiting ICMPv6 message (from its header on), if any: its length.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for its length; no source address wanted.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }
}
