//! The neighbour table over rtnetlink: one socket subscribed to
//! `RTNLGRP_NEIGH` for events, one socket for dump requests.

use std::{collections::VecDeque, io};

use netlink_packet_route::AddressFamily;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use tokio::io::unix::AsyncFd;

use super::{
    decode::{dump_request, parse_datagram, Message},
    NeighEntry, NeighEvent,
};
use crate::netlink::{self, Received, DATAGRAM_BYTES};

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
            let received = netlink::receive_async(&self.events, &mut self.buf)
                .await
                .map_err(NeighError::Receive)?;
            match received {
                Received::Whole => {
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
                Received::Truncated(len) => {
                    log::warn!("neighbour event of {len} bytes truncated: re-dumping the table");
                    return self.overflow();
                }
                Received::Overflow => return self.overflow(),
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
        netlink::send(requests.get_ref(), &request).map_err(NeighError::Dump)?;
        let mut interrupted = false;
        loop {
            match netlink::receive_async(requests, buf)
                .await
                .map_err(NeighError::Dump)?
            {
                Received::Whole => {}
                Received::Truncated(len) => {
                    return Err(NeighError::Dump(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a dump reply of {len} bytes was truncated"),
                    )))
                }
                Received::Overflow => {
                    return Err(NeighError::Dump(io::Error::from_raw_os_error(
                        libc::ENOBUFS,
                    )))
                }
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
                    Message::Error { seq: s, errno } if s == seq => {
                        *dump_running = false;
                        return Err(NeighError::Dump(io::Error::from_raw_os_error(errno)));
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
        netlink::set_socket_receive_buffer(&s, bytes).map_err(NeighError::Socket)?;
    }
    s.add_membership(libc::RTNLGRP_NEIGH)
        .map_err(NeighError::Subscribe)?;
    netlink::register(s).map_err(NeighError::Socket)
}

fn request_socket() -> Result<AsyncFd<Socket>, NeighError> {
    netlink::register(open_socket()?).map_err(NeighError::Socket)
}
