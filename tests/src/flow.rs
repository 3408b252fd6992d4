//! A WireGuard-like UDP flow between two namespaces: numbered datagrams from
//! a sender socket to a receiver socket, and which of them arrived. Both
//! sockets are created inside their namespaces and stay there.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use crate::netns::Netns;

/// Marks the flow's datagrams, so that nothing else is counted.
const FLOW_MAGIC: &[u8; 8] = b"fg-flow\0";
/// The receiver counts the flow as drained after this long without a datagram.
const DRAIN_QUIET: Duration = Duration::from_millis(300);

pub struct UdpFlow {
    sender: UdpSocket,
    receiver: UdpSocket,
    destination: SocketAddrV4,
    next_seq: u64,
}

impl UdpFlow {
    /// A flow from `from` (bound in `sender_ns`) to `destination`, received on
    /// any address of `receiver_ns` at the destination's port.
    pub fn new(
        sender_ns: &Netns,
        from: SocketAddrV4,
        receiver_ns: &Netns,
        destination: SocketAddrV4,
    ) -> Self {
        let sender = sender_ns
            .enter(|| UdpSocket::bind(from))
            .unwrap_or_else(|error| panic!("cannot bind {from}: {error}"));
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, destination.port());
        let receiver = receiver_ns
            .enter(|| UdpSocket::bind(any))
            .unwrap_or_else(|error| panic!("cannot bind {any} for {destination}: {error}"));
        receiver
            .set_read_timeout(Some(DRAIN_QUIET))
            .expect("set a read timeout on the receiver");
        Self {
            sender,
            receiver,
            destination,
            next_seq: 0,
        }
    }

    /// Sends `n` datagrams; returns their sequence numbers.
    pub fn send_burst(&mut self, n: usize) -> Vec<u64> {
        let mut sent = Vec::with_capacity(n);
        for _ in 0..n {
            let seq = self.next_seq;
            self.next_seq += 1;
            let mut payload = [0u8; 16];
            payload[..8].copy_from_slice(FLOW_MAGIC);
            payload[8..].copy_from_slice(&seq.to_be_bytes());
            self.sender
                .send_to(&payload, self.destination)
                .unwrap_or_else(|error| panic!("cannot send to {}: {error}", self.destination));
            sent.push(seq);
        }
        sent
    }

    /// Drains the receiver until it has been quiet for a moment; returns the
    /// sequence numbers of the flow's datagrams it received.
    pub fn received(&self) -> Vec<u64> {
        let mut received = Vec::new();
        let mut buffer = [0u8; 64];
        loop {
            match self.receiver.recv_from(&mut buffer) {
                Ok((16, _)) if &buffer[..8] == FLOW_MAGIC => {
                    let seq: [u8; 8] = buffer[8..16].try_into().expect("8 bytes");
                    received.push(u64::from_be_bytes(seq));
                }
                Ok(_) => {}
                // A signal (the demo's Ctrl-C) cuts a timed receive short.
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return received;
                }
                Err(error) => panic!("{} cannot receive: {error}", self.destination),
            }
        }
    }

    /// Sends `n` datagrams and returns how many distinct ones arrived.
    pub fn deliver(&mut self, n: usize) -> usize {
        // Leftovers of an earlier burst must not count for this one.
        self.received();
        let sent: HashSet<u64> = self.send_burst(n).into_iter().collect();
        self.received()
            .into_iter()
            .filter(|seq| sent.contains(seq))
            .collect::<HashSet<_>>()
            .len()
    }
}
