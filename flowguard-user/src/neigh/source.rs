//! The neighbour table over rtnetlink: one socket subscribed to
//! `RTNLGRP_NEIGH` for events, one socket for dump requests.

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd, RawFd},
};

use netlink_packet_route::AddressFamily;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use tokio::io::{unix::AsyncFd, Interest};

use super::{
    decode::{dump_request, parse_datagram, Message},
    NeighEntry, NeighEvent,
};

#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("cannot open a netlink socket for the neighbour table: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot subscribe to neighbour table changes (RTNLGRP_NEIGH): {0}")]
    Subscribe(#[source] io::Error),
    #[error("reading neighbour table changes failed: {0}")]
    Receive(#[source] io::Error),
    #[error("dumping the neighbour table failed: {0}")]
    Dump(#[source] io::Error),
}

/// How the event socket is set up.
#[derive(Clone, Copy, Debug)]
pub struct SourceOptions {
    /// Receive buffer of the event socket in bytes (`SO_RCVBUFFORCE` when
    /// privileged, else `SO_RCVBUF`, capped by `net.core.rmem_max`). A
    /// bigger buffer means fewer overflows (and re-dumps) in bursts.
    pub receive_buffer: Option<usize>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            receive_buffer: Some(4 << 20),
        }
    }
}

/// Receive buffer for one datagram: the kernel sends at most 32 KiB of
/// dump replies at once and far less per event.
const DATAGRAM_BYTES: usize = 64 * 1024;
/// Attempts at a consistent dump (the kernel flags a dump that raced with a
/// table change with `NLM_F_DUMP_INTR`).
const DUMP_ATTEMPTS: usize = 4;

/// The kernel neighbour table: an initial dump, then its changes.
///
/// [`NeighbourSource::next_event`] is cancel-safe (it can sit in a
/// `tokio::select!`); a cancelled [`NeighbourSource::dump`] leaves the
/// source usable (the next dump uses a fresh request socket). The sockets
/// belong to the network namespace of the thread that called
/// [`NeighbourSource::open`]. Needs a tokio runtime with IO enabled.
pub struct NeighbourSource {
    options: SourceOptions,
    events: AsyncFd<Socket>,
    /// `None` until the first dump, or after a dump was cancelled midway.
    requests: Option<AsyncFd<Socket>>,
    dump_running: bool,
    seq: u32,
    pending: VecDeque<NeighEvent>,
    buf: Vec<u8>,
}

impl NeighbourSource {
    /// Subscribes to neighbour changes, then dumps the table.
    pub async fn open() -> Result<(Self, Vec<NeighEntry>), NeighError> {
        Self::open_with(SourceOptions::default()).await
    }

    /// [`NeighbourSource::open`] with explicit options.
    pub async fn open_with(options: SourceOptions) -> Result<(Self, Vec<NeighEntry>), NeighError> {
        let mut source = Self {
            options,
            events: subscribed_socket(&options)?,
            requests: None,
            dump_running: false,
            seq: 0,
            pending: VecDeque::new(),
            buf: Vec::with_capacity(DATAGRAM_BYTES),
        };
        let entries = source.dump().await?;
        Ok((source, entries))
    }

    /// The next change of the neighbour table. Entries of every IP and
    /// interface are reported (the cache filters); bridge FDB and proxy
    /// entries are not.
    ///
    /// `Ok(NeighEvent::Overflow)` when the kernel dropped events (`ENOBUFS`)
    /// or sent one that cannot be decoded: the caller must [`dump`] and
    /// [`replace_all`]. The events still queued at that moment are older
    /// than that dump and are discarded with the old subscription; a new
    /// subscription, made before this returns, delivers every later change.
    ///
    /// [`dump`]: NeighbourSource::dump
    /// [`replace_all`]: super::NeighCache::replace_all
    pub async fn next_event(&mut self) -> Result<NeighEvent, NeighError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            let received = {
                let mut guard = self.events.readable().await.map_err(NeighError::Receive)?;
                match guard.try_io(|s| recv(s.get_ref().as_raw_fd(), &mut self.buf)) {
                    Ok(r) => r,
                    Err(_would_block) => continue,
                }
            };
            match received {
                Ok(Received::Whole) => {
                    let mut lost = false;
                    for m in parse_datagram(&self.buf) {
                        match m {
                            Message::Neigh { event, .. } => self.pending.push_back(event),
                            Message::Undecodable { reason, .. } => {
                                log::warn!(
                                    "undecodable neighbour event ({reason}): re-dumping the table"
                                );
                                lost = true;
                            }
                            _ => {}
                        }
                    }
                    if lost {
                        return self.overflow();
                    }
                }
                Ok(Received::Truncated(len)) => {
                    log::warn!("neighbour event of {len} bytes truncated: re-dumping the table");
                    return self.overflow();
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return self.overflow(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NeighError::Receive(e)),
            }
        }
    }

    /// Starts over with a fresh subscription: what the old socket still
    /// holds predates the dump the caller is about to make.
    fn overflow(&mut self) -> Result<NeighEvent, NeighError> {
        self.pending.clear();
        self.events = subscribed_socket(&self.options)?;
        Ok(NeighEvent::Overflow)
    }

    /// The whole neighbour table (IPv4 and IPv6), on a socket of its own so
    /// that events keep queuing meanwhile. Retried a few times when the
    /// kernel says the dump raced with a change; the last attempt is
    /// returned even then (the events queued meanwhile repair it).
    pub async fn dump(&mut self) -> Result<Vec<NeighEntry>, NeighError> {
        let mut entries = Vec::new();
        for attempt in 1..=DUMP_ATTEMPTS {
            entries.clear();
            let mut interrupted = false;
            for family in [AddressFamily::Inet, AddressFamily::Inet6] {
                interrupted |= self.dump_family(family, &mut entries).await?;
            }
            if !interrupted {
                break;
            }
            log::debug!("neighbour dump {attempt}/{DUMP_ATTEMPTS} raced with a change");
        }
        Ok(entries)
    }

    /// Dumps one family into `entries`; true if the kernel flagged the dump
    /// as interrupted.
    async fn dump_family(
        &mut self,
        family: AddressFamily,
        entries: &mut Vec<NeighEntry>,
    ) -> Result<bool, NeighError> {
        if self.dump_running || self.requests.is_none() {
            // First dump, or the last one was cancelled with replies (or the
            // kernel's dump state) left on its socket.
            self.requests = Some(request_socket()?);
        }
        let Self {
            requests,
            buf,
            seq,
            dump_running,
            ..
        } = self;
        let requests = requests.as_ref().expect("just set");
        *seq = seq.wrapping_add(1);
        let seq = *seq;
        let request = dump_request(family, seq);
        *dump_running = true;
        send(requests.get_ref(), &request).map_err(NeighError::Dump)?;
        let mut interrupted = false;
        loop {
            let received = {
                let mut guard = requests.readable().await.map_err(NeighError::Dump)?;
                match guard.try_io(|s| recv(s.get_ref().as_raw_fd(), buf)) {
                    Ok(r) => r,
                    Err(_would_block) => continue,
                }
            };
            match received {
                Ok(Received::Whole) => {}
                Ok(Received::Truncated(len)) => {
                    return Err(NeighError::Dump(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a dump reply of {len} bytes was truncated"),
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NeighError::Dump(e)),
            }
            for m in parse_datagram(buf) {
                match m {
                    Message::Neigh {
                        seq: s,
                        intr,
                        event: NeighEvent::Update(e),
                    } if s == seq => {
                        interrupted |= intr;
                        entries.push(e);
                    }
                    Message::Done { seq: s, intr } if s == seq => {
                        *dump_running = false;
                        return Ok(interrupted || intr);
                    }
                    Message::Error { seq: s, code } if s == seq && code != 0 => {
                        *dump_running = false;
                        return Err(NeighError::Dump(io::Error::from_raw_os_error(-code)));
                    }
                    Message::Undecodable { seq: s, reason } if s == seq => {
                        log::warn!("skipping an undecodable neighbour entry in a dump: {reason}");
                    }
                    Message::Ignored { seq: s } if s == seq => {}
                    // Replies to an older request.
                    _ => {}
                }
            }
        }
    }
}

fn open_socket() -> Result<Socket, NeighError> {
    let mut s = Socket::new(NETLINK_ROUTE).map_err(NeighError::Socket)?;
    s.bind_auto().map_err(NeighError::Socket)?;
    s.set_non_blocking(true).map_err(NeighError::Socket)?;
    Ok(s)
}

fn subscribed_socket(options: &SourceOptions) -> Result<AsyncFd<Socket>, NeighError> {
    let s = open_socket()?;
    if let Some(bytes) = options.receive_buffer {
        set_receive_buffer(s.as_raw_fd(), bytes).map_err(NeighError::Socket)?;
    }
    s.add_membership(libc::RTNLGRP_NEIGH)
        .map_err(NeighError::Subscribe)?;
    register(s)
}

fn request_socket() -> Result<AsyncFd<Socket>, NeighError> {
    register(open_socket()?)
}

/// Registers a socket with the current tokio runtime (panics outside one).
fn register(s: Socket) -> Result<AsyncFd<Socket>, NeighError> {
    // SAFETY: `Socket` owns its descriptor, closes it only when dropped and
    // always returns the same one; the `AsyncFd` owns the `Socket`, which is
    // never swapped for another.
    unsafe { AsyncFd::register_with_interest(s, Interest::READABLE) }
        .map_err(|e| NeighError::Socket(e.into()))
}

pub(crate) fn set_receive_buffer(fd: RawFd, bytes: usize) -> io::Result<()> {
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

pub(crate) fn send(s: &Socket, request: &[u8]) -> io::Result<()> {
    loop {
        match s.send(request, 0) {
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

pub(crate) enum Received {
    /// `buf` holds the whole datagram.
    Whole,
    /// The datagram had this many bytes, more than the buffer.
    Truncated(usize),
}

/// Receives one datagram into `buf` (replacing its contents).
pub(crate) fn recv(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<Received> {
    buf.clear();
    buf.reserve(DATAGRAM_BYTES);
    let cap = buf.capacity();
    // SAFETY: recv writes at most `cap` bytes into the vector's allocation;
    // MSG_TRUNC makes it return the datagram's real length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), cap, libc::MSG_TRUNC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised min(n, cap) bytes.
    unsafe { buf.set_len(n.min(cap)) };
    Ok(if n > cap {
        Received::Truncated(n)
    } else {
        Received::Whole
    })
}
