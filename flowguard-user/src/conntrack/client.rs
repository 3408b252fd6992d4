//! The ctnetlink socket: acknowledged requests, multipart dumps with their
//! retries, the CTA_FILTER probe, and the eviction of an endpoint's flows.

use std::{collections::HashSet, io, net::IpAddr, os::fd::AsRawFd, time::Duration};

use log::{debug, warn};
use netlink_packet_core::NLM_F_DUMP_INTR;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::{
    codec::{self, AddressFilter, Body, Received},
    policy::select_for_eviction,
    ConntrackError, EvictScope, Flow,
};
use crate::netlink;

/// How long one receive may wait for the kernel.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of one dump when the kernel reports it interrupted or overran.
const DUMP_ATTEMPTS: usize = 5;
/// The kernel's IPv6 address match in CTA_FILTER is inverted in every
/// version up to at least 6.18 (`!ipv6_addr_cmp(..)` in
/// ctnetlink_filter_match_tuple skips the *equal* entries), so IPv6 lookups
/// always dump the IPv6 table and filter here.
const KERNEL_FILTER_IPV6: bool = false;

/// A ctnetlink client. It owns its netlink socket, which lives in the network
/// namespace that was current when [`Conntrack::open`] ran.
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    kernel_filter: bool,
    userspace_filter_forced: bool,
    buf: Vec<u8>,
    undecodable: u64,
}

impl Conntrack {
    /// Opens the socket, checks that ctnetlink answers (and that we may use
    /// it), and probes once whether the kernel filters dumps (CTA_FILTER).
    pub fn open() -> Result<Self, ConntrackError> {
        let mut conntrack = Self {
            socket: open_socket()?,
            seq: 0,
            kernel_filter: false,
            userspace_filter_forced: false,
            buf: Vec::with_capacity(netlink::DATAGRAM_BYTES),
            undecodable: 0,
        };
        conntrack.check_available()?;
        conntrack.kernel_filter = conntrack.probe_kernel_filter()?;
        debug!(
            "ctnetlink is available; kernel-side dump filtering (CTA_FILTER): {}",
            conntrack.kernel_filter
        );
        Ok(conntrack)
    }

    /// Whether the kernel filters dumps by address itself (CTA_FILTER,
    /// Linux >= 5.8); probed once by [`Conntrack::open`].
    pub fn supports_kernel_filter(&self) -> bool {
        self.kernel_filter
    }

    /// Makes [`Conntrack::flows_involving`] dump the whole table and filter
    /// in user space even where the kernel could filter. For tests and
    /// benchmarks that compare both paths.
    pub fn force_userspace_filter(&mut self, force: bool) {
        self.userspace_filter_forced = force;
    }

    /// How many dumped entries did not decode and were skipped so far.
    pub fn undecodable_entries(&self) -> u64 {
        self.undecodable
    }

    /// Every entry whose original or reply tuple has `ip` as source or
    /// destination. Uses four kernel-filtered dumps (original source,
    /// original destination, reply source, reply destination) where the
    /// kernel can filter, else one dump of `ip`'s family; either way the
    /// result is checked again here.
    pub fn flows_involving(&mut self, ip: IpAddr) -> Result<Vec<Flow>, ConntrackError> {
        let ip = ip.to_canonical();
        let kernel_side = self.kernel_filter
            && !self.userspace_filter_forced
            && (ip.is_ipv4() || KERNEL_FILTER_IPV6);
        let mut flows = if kernel_side {
            let mut seen = HashSet::new();
            let mut flows = Vec::new();
            for filter in AddressFilter::all_for(ip) {
                let dumped = self.dump("dump the conntrack entries of an address", |seq| {
                    codec::filtered_dump_request(seq, filter)
                })?;
                flows.extend(dumped.into_iter().filter(|f| seen.insert(f.key())));
            }
            flows
        } else {
            self.dump("dump the conntrack table", |seq| {
                codec::dump_request(seq, Some(ip))
            })?
        };
        flows.retain(|f| f.involves(ip));
        Ok(flows)
    }

    /// Every entry of the table (both families).
    pub fn all_flows(&mut self) -> Result<Vec<Flow>, ConntrackError> {
        self.dump("dump the conntrack table", |seq| {
            codec::dump_request(seq, None)
        })
    }

    /// Deletes one entry by its full original tuple, its zone and, when
    /// known, its id (so a newer entry with the same tuple survives).
    /// `Ok(false)` when the entry is already gone. Never sends a delete
    /// without a complete original tuple: that would flush the table.
    pub fn delete(&mut self, flow: &Flow) -> Result<bool, ConntrackError> {
        let seq = self.next_seq();
        let request = codec::delete_request(seq, flow)?;
        match self.request_ack(&request, seq, "delete a conntrack entry") {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes (or, with `dry_run`, only lists) the entries of `ip` that
    /// `scope` selects, and returns those deleted (or that would be). Entries
    /// already gone are left out. A failed delete does not stop the others;
    /// the error is returned only if nothing could be deleted.
    pub fn evict(
        &mut self,
        ip: IpAddr,
        scope: EvictScope,
        dry_run: bool,
    ) -> Result<Vec<Flow>, ConntrackError> {
        if scope == EvictScope::Off {
            return Ok(Vec::new());
        }
        let flows = self.flows_involving(ip)?;
        let selected: Vec<Flow> = select_for_eviction(&flows, ip, scope)
            .into_iter()
            .cloned()
            .collect();
        if dry_run {
            return Ok(selected);
        }
        let mut deleted = Vec::with_capacity(selected.len());
        let mut first_error = None;
        for flow in selected {
            match self.delete(&flow) {
                Ok(true) => deleted.push(flow),
                Ok(false) => debug!("already gone: {}", flow.describe()),
                Err(e @ (ConntrackError::NeedsCapNetAdmin | ConntrackError::NotAvailable)) => {
                    return Err(e);
                }
                Err(e) => {
                    warn!("could not delete {}: {e}", flow.describe());
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if deleted.is_empty() => Err(e),
            _ => Ok(deleted),
        }
    }

    /// Creates an entry that expires after `timeout_secs` (tests and
    /// benchmarks fill the table with it). Fails with EEXIST if it exists.
    /// The kernel ignores the status bits userspace may not set (OFFLOAD).
    pub fn insert(&mut self, flow: &Flow, timeout_secs: u32) -> Result<(), ConntrackError> {
        let seq = self.next_seq();
        let request = codec::new_request(seq, flow, timeout_secs)?;
        self.request_ack(&request, seq, "insert a conntrack entry")
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// A cheap request only ctnetlink answers: tells "no conntrack" and "no
    /// privilege" apart from everything else before the first real use.
    fn check_available(&mut self) -> Result<(), ConntrackError> {
        let seq = self.next_seq();
        match self.request_ack(&codec::stats_request(seq), seq, "read conntrack statistics") {
            // nfnetlink answers EINVAL for a subsystem that is not loaded.
            Err(e) if matches!(e.errno(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                Err(ConntrackError::NotAvailable)
            }
            other => other,
        }
    }

    /// A kernel that knows CTA_FILTER refuses the probe with EINVAL; an older
    /// one ignores the attribute and dumps.
    fn probe_kernel_filter(&mut self) -> Result<bool, ConntrackError> {
        match self.dump("probe CTA_FILTER", codec::filter_probe_request) {
            Ok(_) => Ok(false),
            Err(e) if e.errno() == Some(libc::EINVAL) => Ok(true),
            Err(e @ (ConntrackError::NeedsCapNetAdmin | ConntrackError::NotAvailable)) => Err(e),
            Err(e) => {
                debug!("CTA_FILTER probe failed ({e}); filtering in user space");
                Ok(false)
            }
        }
    }

    fn send(&self, request: &[u8], op: &'static str) -> Result<(), ConntrackError> {
        netlink::send(&self.socket, request).map_err(|source| socket_error(op, source))
    }

    /// One datagram from the kernel, split into its messages. An overflow
    /// is the ENOBUFS error that [`Conntrack::dump`] retries on.
    fn recv(&mut self, op: &'static str) -> Result<Vec<Received>, ConntrackError> {
        match netlink::receive(&self.socket, &mut self.buf) {
            Ok(netlink::Received::Whole) => codec::parse_datagram(&self.buf),
            Ok(netlink::Received::Truncated(n)) => Err(ConntrackError::Malformed(format!(
                "a {n}-byte datagram did not fit the {}-byte buffer",
                self.buf.len()
            ))),
            Ok(netlink::Received::Overflow) => Err(socket_error(
                op,
                io::Error::from_raw_os_error(libc::ENOBUFS),
            )),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(ConntrackError::Timeout {
                    op,
                    secs: RECV_TIMEOUT.as_secs(),
                })
            }
            Err(e) => Err(socket_error(op, e)),
        }
    }

    /// Sends a request with NLM_F_ACK and waits for its ack or error.
    fn request_ack(
        &mut self,
        request: &[u8],
        seq: u32,
        op: &'static str,
    ) -> Result<(), ConntrackError> {
        self.send(request, op)?;
        loop {
            for received in self.recv(op)? {
                if received.seq != seq {
                    continue; // left over from an earlier, abandoned request
                }
                match received.body {
                    Body::Ack => return Ok(()),
                    Body::Error(errno) => return Err(kernel_error(op, errno)),
                    _ => {}
                }
            }
        }
    }

    /// One multipart dump to its NLMSG_DONE. Returns the entries and whether
    /// the kernel flagged the dump as interrupted (NLM_F_DUMP_INTR).
    fn dump_once(
        &mut self,
        request: &[u8],
        seq: u32,
        op: &'static str,
    ) -> Result<(Vec<Flow>, bool), ConntrackError> {
        self.send(request, op)?;
        let mut flows = Vec::new();
        let mut interrupted = false;
        loop {
            for received in self.recv(op)? {
                if received.seq != seq {
                    continue;
                }
                interrupted |= received.flags & NLM_F_DUMP_INTR != 0;
                match received.body {
                    Body::Flow(flow) => flows.push(*flow),
                    Body::Undecodable(why) => {
                        self.undecodable += 1;
                        warn!("skipping a conntrack entry that does not decode: {why}");
                    }
                    Body::Done(0) => return Ok((flows, interrupted)),
                    Body::Done(code) => return Err(kernel_error(op, code.saturating_abs())),
                    Body::Error(errno) => return Err(kernel_error(op, errno)),
                    Body::Ack | Body::Other => {}
                }
            }
        }
    }

    /// A dump with retries: again when the kernel flags it interrupted, and
    /// on a fresh socket after ENOBUFS (a socket that overran has lost part
    /// of the dump). After the last interrupted attempt its entries are used.
    fn dump(
        &mut self,
        op: &'static str,
        request: impl Fn(u32) -> Vec<u8>,
    ) -> Result<Vec<Flow>, ConntrackError> {
        let mut interrupted = None;
        let mut overrun = None;
        for attempt in 1..=DUMP_ATTEMPTS {
            let seq = self.next_seq();
            match self.dump_once(&request(seq), seq, op) {
                Ok((flows, false)) => return Ok(flows),
                Ok((flows, true)) => {
                    debug!(
                        "conntrack dump interrupted by a table change (attempt {attempt}); again"
                    );
                    interrupted = Some(flows);
                }
                Err(e) if e.errno() == Some(libc::ENOBUFS) => {
                    warn!("conntrack dump overran the socket (attempt {attempt}); again on a fresh socket");
                    self.socket = open_socket()?;
                    overrun = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(flows) = interrupted {
            warn!("conntrack dump still interrupted after {DUMP_ATTEMPTS} attempts; using the last one");
            return Ok(flows);
        }
        Err(overrun.unwrap_or_else(|| ConntrackError::Malformed("no dump attempt was made".into())))
    }
}

fn kernel_error(op: &'static str, errno: i32) -> ConntrackError {
    match errno {
        libc::EPERM => ConntrackError::NeedsCapNetAdmin,
        _ => ConntrackError::Kernel {
            op,
            source: io::Error::from_raw_os_error(errno),
        },
    }
}

fn socket_error(op: &'static str, source: io::Error) -> ConntrackError {
    match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => ConntrackError::NeedsCapNetAdmin,
        _ => ConntrackError::Socket {
            context: op,
            source,
        },
    }
}

fn open_socket() -> Result<Socket, ConntrackError> {
    const OP: &str = "open a netfilter netlink socket";
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| match e.raw_os_error() {
        Some(libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT) => ConntrackError::NotAvailable,
        _ => socket_error(OP, e),
    })?;
    socket.bind_auto().map_err(|e| socket_error(OP, e))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| socket_error(OP, e))?;
    // Errors without the echoed request; best effort on old kernels.
    let _ = socket.set_cap_ack(true);
    let _ = socket.set_rx_buf_sz(1 << 20);
    set_recv_timeout(&socket, RECV_TIMEOUT).map_err(|e| socket_error(OP, e))?;
    Ok(socket)
}

fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    // `as _`: 32-bit musl deprecates the time_t/suseconds_t aliases.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as _,
        tv_usec: timeout.subsec_micros() as _,
    };
    // SAFETY: tv is a valid timeval and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
