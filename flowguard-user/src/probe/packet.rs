//! The prober's `AF_PACKET` socket: ARP out of a given interface to a given
//! MAC, and the ARP replies that reach this host on any interface.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
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
        // default buffer holds a few hundred of them. Best effort: without
        // CAP_NET_ADMIN the kernel caps the size, which only costs answers.
        let bytes: libc::c_int = RECEIVE_BUFFER;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt reads one c_int.
            let rc = unsafe {
                libc::setsockopt(
                    socket.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&bytes as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
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

    /// Waits up to `timeout` for one packet; `Ok(None)` when none came.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<Received>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if rc == 0 {
            return Ok(None);
        }
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
