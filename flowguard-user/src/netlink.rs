//! The netlink plumbing every reader shares: one receive path (a whole
//! datagram, or a plain word that it was cut or that the kernel dropped
//! messages), one splitter of a datagram into its messages with NLMSG_DONE
//! and NLMSG_ERROR read once, and one attribute walk. What a message means
//! stays with its reader (neighbours, conntrack, links, children, tc).

use std::{
    fmt, io,
    os::fd::{AsRawFd as _, RawFd},
};

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NlasIterator, NLA_HEADER_SIZE, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP_INTR,
};
use netlink_sys::Socket;
use tokio::io::{unix::AsyncFd, Interest};

/// `struct nlmsghdr`.
const NETLINK_HEADER_LEN: usize = 16;

/// Room for one datagram. The kernel sends at most 32 KiB of dump replies
/// at once (`max_recvmsg_len`) and far less per event: twice that means a
/// datagram is never cut.
pub const DATAGRAM_BYTES: usize = 64 * 1024;

/// What one receive brought.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// The buffer holds one whole datagram.
    Whole,
    /// A datagram of this many bytes did not fit the buffer: its tail is lost.
    Truncated(usize),
    /// `ENOBUFS`: the kernel dropped messages it could not queue on this
    /// socket. What the socket still holds predates the loss.
    Overflow,
}

/// Receives one datagram into `buf` (replacing its contents). Truncation
/// and overflow are answers, not errors, so no reader can miss them; an
/// interrupted call is retried. Other errors (`WouldBlock` on a
/// non-blocking socket, a receive timeout) are returned as they are.
pub fn receive(socket: &Socket, buf: &mut Vec<u8>) -> io::Result<Received> {
    loop {
        buf.clear();
        buf.reserve(DATAGRAM_BYTES);
        // MSG_TRUNC: the datagram's real length even when it did not fit.
        match socket.recv(buf, libc::MSG_TRUNC) {
            Ok(n) if n > buf.len() => return Ok(Received::Truncated(n)),
            Ok(_) => return Ok(Received::Whole),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Received::Overflow),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// [`receive`] on a non-blocking socket registered with tokio: waits until
/// a datagram is there. Cancel-safe: nothing is read before it returns.
pub async fn receive_async(socket: &AsyncFd<Socket>, buf: &mut Vec<u8>) -> io::Result<Received> {
    loop {
        let mut guard = socket.readable().await?;
        if let Ok(received) = guard.try_io(|s| receive(s.get_ref(), buf)) {
            return received;
        }
    }
}

/// A non-blocking socket of `protocol` with a receive buffer of
/// `receive_buffer` bytes, subscribed to the multicast `groups`, in the
/// network namespace of the calling thread. Not registered with tokio yet.
pub fn subscribe(protocol: isize, groups: &[u32], receive_buffer: usize) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.set_non_blocking(true)?;
    set_socket_receive_buffer(&socket, receive_buffer)?;
    for group in groups {
        socket.add_membership(*group)?;
    }
    Ok(socket)
}

/// Registers a netlink socket with the current tokio runtime for reading
/// (panics outside one).
pub fn register(socket: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: `Socket` owns its descriptor, closes it only when dropped and
    // always returns the same one; the `AsyncFd` owns the `Socket`, which is
    // never swapped for another.
    unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }.map_err(io::Error::from)
}

/// A request to the kernel: `inner` under a header with `flags` and `seq`
/// (the kernel fills in the port).
pub fn request<I: NetlinkSerializable>(flags: u16, seq: u32, inner: I) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// Sends one request whole (a short send is an error).
pub fn send(socket: &Socket, request: &[u8]) -> io::Result<()> {
    loop {
        match socket.send(request, 0) {
            Ok(n) if n == request.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("sent {n} of {} bytes", request.len()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sets a socket's receive buffer to `bytes` (`SO_RCVBUFFORCE` when
/// privileged, else `SO_RCVBUF`, capped by `net.core.rmem_max`). A bigger
/// buffer means fewer overflows in bursts.
pub fn set_receive_buffer(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX / 2);
    let set = |opt| {
        // SAFETY: setsockopt reads one c_int from the pointer we pass.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // The kernel doubles the value it is given; FORCE needs CAP_NET_ADMIN.
    set(libc::SO_RCVBUFFORCE).or_else(|_| set(libc::SO_RCVBUF))
}

/// [`set_receive_buffer`] on a socket.
pub fn set_socket_receive_buffer(socket: &Socket, bytes: usize) -> io::Result<()> {
    set_receive_buffer(socket.as_raw_fd(), bytes)
}

/// One netlink message of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// The whole message, header included (what `NetlinkMessage::deserialize`
    /// reads).
    pub bytes: &'a [u8],
}

/// NLMSG_DONE and NLMSG_ERROR, read the same way for every reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// NLMSG_DONE with the dump's final status: 0, or a negative errno.
    Done(i32),
    /// NLMSG_ERROR with 0: a request acknowledged.
    Ack,
    /// NLMSG_ERROR with an error: the errno (positive).
    Error(i32),
}

impl<'a> Message<'a> {
    /// What follows the header.
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[NETLINK_HEADER_LEN..]
    }

    /// Whether the kernel flagged this dump message as racing with a change
    /// of what it dumps (`NLM_F_DUMP_INTR`).
    pub fn dump_interrupted(&self) -> bool {
        self.flags & NLM_F_DUMP_INTR != 0
    }

    /// The end of a dump or the answer to a request; `None` for every other
    /// message, an error when a DONE or ERROR is too short to hold its code.
    pub fn control(&self) -> Option<Result<Control, Malformed>> {
        let payload = self.payload();
        let malformed = |e: netlink_packet_core::DecodeError| Malformed {
            seq: self.seq,
            reason: e.to_string(),
        };
        match self.kind {
            // The kernel allows a DONE without its status.
            NLMSG_DONE if payload.is_empty() => Some(Ok(Control::Done(0))),
            NLMSG_DONE => Some(
                DoneBuffer::new_checked(payload)
                    .map(|d| Control::Done(d.code()))
                    .map_err(malformed),
            ),
            NLMSG_ERROR => Some(
                ErrorBuffer::new_checked(payload)
                    .map(|e| match e.code() {
                        None => Control::Ack,
                        Some(code) => Control::Error(code.get().saturating_abs()),
                    })
                    .map_err(malformed),
            ),
            _ => None,
        }
    }
}

/// A datagram whose framing does not add up: a header cut short, or a
/// length that is too small or runs past the datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    /// The sequence number of the broken message, when its header is whole.
    pub seq: u32,
    pub reason: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Malformed {}

impl From<Malformed> for io::Error {
    fn from(e: Malformed) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// The messages of one datagram, in order. Broken framing ends the walk
/// with one `Err` (nothing after it can be trusted); a message whose content
/// does not decode is its reader's business.
pub fn messages(datagram: &[u8]) -> Messages<'_> {
    Messages { rest: datagram }
}

/// See [`messages`].
#[derive(Clone, Debug)]
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.rest);
        let nl = match NetlinkBuffer::new_checked(rest) {
            Ok(nl) => nl,
            Err(e) => {
                let seq = if rest.len() >= NETLINK_HEADER_LEN {
                    NetlinkBuffer::new(rest).sequence_number()
                } else {
                    0
                };
                return Some(Err(Malformed {
                    seq,
                    reason: format!("{e} ({} bytes left in the datagram)", rest.len()),
                }));
            }
        };
        let len = nl.length() as usize;
        // Messages are aligned to four bytes; the last may end unaligned.
        self.rest = rest.get(align(len)..).unwrap_or_default();
        Some(Ok(Message {
            kind: nl.message_type(),
            flags: nl.flags(),
            seq: nl.sequence_number(),
            bytes: &rest[..len],
        }))
    }
}

const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The attributes in `bytes`: (type without the NESTED and BYTEORDER flags,
/// value). The walk stops at the first attribute whose length does not add
/// up.
pub fn attributes(bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    NlasIterator::new(bytes).map_while(Result::ok).map(|nla| {
        let kind = nla.kind();
        let len = usize::from(nla.length());
        // `new_checked` made sure that the header fits and `len` does too.
        (kind, &nla.into_inner()[NLA_HEADER_SIZE..len])
    })
}

/// A NUL-terminated string attribute (`IFLA_IFNAME`, `TCA_BPF_NAME`), up to
/// its first NUL, or all of it if it has none.
pub fn string(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

/// Raw netlink bytes as the kernel lays them out, for the readers' tests.
#[cfg(test)]
pub(crate) mod test_bytes {
    /// A message: header (port 4242), then `payload` as it is.
    pub fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&4242u32.to_ne_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// An attribute, padded to four bytes.
    pub fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::test_bytes::{message as header, nla};
    use super::*;

    const RTM_NEWLINK: u16 = 16;

    #[test]
    fn a_request_has_its_flags_seq_and_length() {
        use netlink_packet_route::{link::LinkMessage, RouteNetlinkMessage};
        let r = request(
            0x301,
            77,
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
        );
        let m: Vec<_> = messages(&r).map(Result::unwrap).collect();
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].kind, m[0].flags, m[0].seq), (18, 0x301, 77)); // RTM_GETLINK
        assert_eq!(m[0].bytes.len(), r.len());
    }

    fn all(d: &[u8]) -> Vec<Result<Message<'_>, Malformed>> {
        messages(d).collect()
    }

    #[test]
    fn a_multi_message_datagram_is_split_in_order_with_unaligned_payloads() {
        // Five payload bytes: the next message starts after three of padding.
        let mut d = header(RTM_NEWLINK, 2, 7, &[1, 2, 3, 4, 5]);
        d.extend([0; 3]);
        d.extend(header(RTM_NEWLINK, 2 | NLM_F_DUMP_INTR, 7, &[9; 4]));
        // The last message may end unaligned.
        d.extend(header(RTM_NEWLINK, 0, 8, &[6]));
        let v = all(&d);
        assert_eq!(v.len(), 3, "{v:?}");
        let m: Vec<Message> = v.into_iter().map(Result::unwrap).collect();
        assert_eq!(m[0].payload(), [1, 2, 3, 4, 5]);
        assert_eq!((m[0].seq, m[0].dump_interrupted()), (7, false));
        assert_eq!(m[1].payload(), [9; 4]);
        assert!(m[1].dump_interrupted());
        assert_eq!(
            (m[2].kind, m[2].seq, m[2].payload()),
            (RTM_NEWLINK, 8, &[6][..])
        );
        assert!(m.iter().all(|m| m.control().is_none()));
        assert!(all(&[]).is_empty());
    }

    #[test]
    fn done_ends_a_dump_with_its_status() {
        let mut d = header(NLMSG_DONE, 2, 3, &0i32.to_ne_bytes());
        d.extend(header(NLMSG_DONE, 2, 4, &(-libc::EINTR).to_ne_bytes()));
        d.extend(header(NLMSG_DONE, 2, 5, &[]));
        let controls: Vec<_> = messages(&d)
            .map(|m| m.unwrap().control().unwrap().unwrap())
            .collect();
        assert_eq!(
            controls,
            [
                Control::Done(0),
                Control::Done(-libc::EINTR),
                Control::Done(0)
            ]
        );
    }

    #[test]
    fn an_error_carries_its_errno_and_zero_is_an_ack() {
        // The code, then the request's header (or its start, with CAP_ACK).
        let mut nack = (-libc::EBUSY).to_ne_bytes().to_vec();
        nack.extend(header(RTM_NEWLINK, 0x301, 9, &[]));
        let mut d = header(NLMSG_ERROR, 0, 9, &nack);
        let mut ack = 0i32.to_ne_bytes().to_vec();
        ack.extend(header(RTM_NEWLINK, 0x5, 10, &[]));
        d.extend(header(NLMSG_ERROR, 0, 10, &ack));
        let v: Vec<_> = messages(&d).map(Result::unwrap).collect();
        assert_eq!(v[0].seq, 9);
        assert_eq!(v[0].control(), Some(Ok(Control::Error(libc::EBUSY))));
        assert_eq!(v[1].control(), Some(Ok(Control::Ack)));
        // An ERROR too short for its code is malformed, not an ack.
        let short = header(NLMSG_ERROR, 0, 11, &[0, 0]);
        let m = messages(&short).next().unwrap().unwrap();
        assert!(matches!(m.control(), Some(Err(Malformed { seq: 11, .. }))));
    }

    #[test]
    fn truncation_ends_the_walk_with_one_error() {
        let mut d = header(RTM_NEWLINK, 0, 1, &[0; 8]);
        d.extend(header(RTM_NEWLINK, 0, 2, &[0; 8]));
        // The second message cut short: the first is whole, then one error
        // that still names the broken message's sequence number.
        let v = all(&d[..d.len() - 4]);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].as_ref().unwrap().seq, 1);
        assert!(matches!(&v[1], Err(Malformed { seq: 2, .. })));
        // A header cut short.
        let v = all(&d[..24 + 10]);
        assert!(
            matches!(v.as_slice(), [Ok(_), Err(Malformed { seq: 0, .. })]),
            "{v:?}"
        );
        // A length smaller than a header, and stray bytes.
        let mut bad = header(RTM_NEWLINK, 0, 5, &[0; 8]);
        bad[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(matches!(
            all(&bad).as_slice(),
            [Err(Malformed { seq: 5, .. })]
        ));
        assert!(matches!(all(&[1, 2, 3]).as_slice(), [Err(_)]));
        let e: io::Error = all(&[1, 2, 3]).remove(0).unwrap_err().into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn attributes_are_walked_without_flags_and_stop_at_a_bad_length() {
        let mut b = nla(3, b"lan1\0");
        b.extend(nla(2 | 0x8000, &nla(11, &7u32.to_ne_bytes())));
        b.extend(nla(4, &[]));
        let v: Vec<_> = attributes(&b).collect();
        assert_eq!(v.len(), 3);
        assert_eq!((v[0].0, string(v[0].1).as_str()), (3, "lan1"));
        assert_eq!(v[1].0, 2, "NLA_F_NESTED is not part of the type");
        assert_eq!(
            attributes(v[1].1).collect::<Vec<_>>(),
            [(11, &7u32.to_ne_bytes()[..])]
        );
        assert_eq!(v[2], (4, &[][..]));
        // A length past the end stops the walk; what came before stays.
        let mut cut = nla(3, b"lan1\0");
        cut.extend(nla(5, &[1; 8]));
        cut.truncate(cut.len() - 4);
        assert_eq!(attributes(&cut).count(), 1);
        let mut short = nla(3, b"x\0");
        short[..2].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(attributes(&short).count(), 0);
        assert_eq!(string(b"no nul"), "no nul");
    }

    fn pair(protocol: isize) -> Option<(Socket, Socket, netlink_sys::SocketAddr)> {
        let mut rx = Socket::new(protocol).ok()?;
        let addr = rx.bind_auto().ok()?;
        rx.set_non_blocking(true).ok()?;
        let mut tx = Socket::new(protocol).ok()?;
        tx.bind_auto().ok()?;
        Some((rx, tx, addr))
    }

    #[test]
    fn receive_says_truncated_with_the_real_length() {
        // Two netlink sockets of this process talking to each other.
        let Some((rx, tx, to)) = pair(netlink_sys::protocols::NETLINK_USERSOCK) else {
            eprintln!("skipped: no netlink sockets here");
            return;
        };
        let big = header(RTM_NEWLINK, 0, 1, &vec![0; DATAGRAM_BYTES * 2]);
        let small = header(RTM_NEWLINK, 0, 2, &[1; 4]);
        for d in [&big, &small] {
            tx.send_to(d, &to, 0).unwrap();
        }
        let mut buf = Vec::new();
        assert_eq!(
            receive(&rx, &mut buf).unwrap(),
            Received::Truncated(big.len())
        );
        assert_eq!(receive(&rx, &mut buf).unwrap(), Received::Whole);
        assert_eq!(buf, small);
        let e = receive(&rx, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn receive_says_overflow_when_the_kernel_dropped_messages() {
        // NETLINK_USERSOCK lets anyone send to and join its groups: flood a
        // group past the subscriber's (smallest) receive buffer.
        const GROUP: u32 = 23;
        let Some((rx, tx, _)) = pair(netlink_sys::protocols::NETLINK_USERSOCK) else {
            eprintln!("skipped: no netlink sockets here");
            return;
        };
        if let Err(e) = rx.add_membership(GROUP) {
            eprintln!("skipped: cannot join a NETLINK_USERSOCK group: {e}");
            return;
        }
        set_socket_receive_buffer(&rx, 0).unwrap();
        let to = netlink_sys::SocketAddr::new(0, 1 << (GROUP - 1));
        let message = header(RTM_NEWLINK, 0, 3, &[7; 1000]);
        for _ in 0..64 {
            // Delivered to the group, then refused as a unicast to port 0
            // (no kernel socket listens on NETLINK_USERSOCK): ECONNREFUSED.
            let _ = tx.send_to(&message, &to, 0);
        }
        let mut buf = Vec::new();
        assert_eq!(receive(&rx, &mut buf).unwrap(), Received::Overflow);
        // What was queued before the loss is still there, whole.
        assert_eq!(receive(&rx, &mut buf).unwrap(), Received::Whole);
        assert_eq!(buf, message);
    }
}
