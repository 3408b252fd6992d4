//! Kernel notifications that change what flowguard must guard, followed
//! as they happen instead of polled: interfaces appearing and going away
//! (rtnetlink `RTNLGRP_LINK`), and nftables ruleset changes (nfnetlink
//! `NFNLGRP_NFTABLES`, what `nft monitor` hears), after which `--auto`
//! reads the flowtables again.
//!
//! An interface deleted and created again under the same name, even with
//! the same index (`ip link add ... index N`), is seen as the two events it
//! is. When the kernel drops notifications (`ENOBUFS`), the subscriber says
//! so ([`Notice::Lost`]) and the caller looks everything up again.

use std::io;

use netlink_sys::{
    protocols::{NETLINK_NETFILTER, NETLINK_ROUTE},
    Socket,
};
use tokio::io::unix::AsyncFd;

use crate::netlink::{self, Received};

/// One change of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// `RTM_NEWLINK`: created, or changed (state, name, bridge master...).
    New { index: u32, name: Option<String> },
    /// `RTM_DELLINK`: deleted (or moved to another network namespace).
    Gone { index: u32, name: Option<String> },
}

/// What a subscription delivered.
#[derive(Debug)]
pub enum Notice<T> {
    Events(Vec<T>),
    /// The kernel dropped notifications: look everything up again.
    Lost,
}

/// A netlink socket subscribed to one multicast group, in the network
/// namespace of the thread that opened it. `next` is cancel-safe.
pub struct Subscription {
    socket: AsyncFd<Socket>,
    buf: Vec<u8>,
}

impl Subscription {
    fn open(protocol: isize, group: u32, receive_buffer: usize) -> io::Result<Self> {
        let socket = netlink::subscribe(protocol, &[group], receive_buffer)?;
        Ok(Self {
            socket: netlink::register(socket)?,
            buf: Vec::new(),
        })
    }

    /// Interface changes (`RTNLGRP_LINK`).
    pub fn links() -> io::Result<Self> {
        Self::open(NETLINK_ROUTE, libc::RTNLGRP_LINK, 1 << 20)
    }

    /// nftables ruleset changes (`NFNLGRP_NFTABLES`; needs CAP_NET_ADMIN).
    pub fn nftables() -> io::Result<Self> {
        Self::open(NETLINK_NETFILTER, libc::NFNLGRP_NFTABLES as u32, 1 << 20)
    }

    /// The next datagram, decoded by `decode`, or `Lost` after an overflow.
    async fn next_with<T>(&mut self, decode: fn(&[u8]) -> Vec<T>) -> io::Result<Notice<T>> {
        Ok(
            match netlink::receive_async(&self.socket, &mut self.buf).await? {
                Received::Whole => Notice::Events(decode(&self.buf)),
                Received::Truncated(_) | Received::Overflow => Notice::Lost,
            },
        )
    }

    /// The next interface changes.
    pub async fn next_links(&mut self) -> io::Result<Notice<LinkEvent>> {
        self.next_with(parse_links).await
    }

    /// The next ruleset change (what changed does not matter: the caller
    /// reads the flowtables again).
    pub async fn next_change(&mut self) -> io::Result<Notice<()>> {
        self.next_with(|b| if b.is_empty() { vec![] } else { vec![()] })
            .await
    }
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
/// `struct ifinfomsg`: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;
const IFLA_IFNAME: u16 = 3;

/// The link events in one rtnetlink datagram. Only the index and the name
/// are read (the rest of `ifinfomsg` and its attributes change with every
/// kernel; nothing here needs them). Broken framing ends the list.
pub fn parse_links(buf: &[u8]) -> Vec<LinkEvent> {
    netlink::messages(buf)
        .map_while(Result::ok)
        .filter_map(|m| {
            let msg = m.payload();
            if !matches!(m.kind, RTM_NEWLINK | RTM_DELLINK) || msg.len() < IFINFOMSG_LEN {
                return None;
            }
            let index = u32::from_ne_bytes(msg[4..8].try_into().expect("four bytes"));
            let name = netlink::attributes(&msg[IFINFOMSG_LEN..])
                .find(|(kind, _)| *kind == IFLA_IFNAME)
                .map(|(_, value)| netlink::string(value));
            Some(if m.kind == RTM_NEWLINK {
                LinkEvent::New { index, name }
            } else {
                LinkEvent::Gone { index, name }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::test_bytes::{self, nla};

    fn message(kind: u16, index: u32, name: Option<&str>) -> Vec<u8> {
        let mut ifinfomsg = vec![0, 0, 1, 0]; // family, pad, type (ether)
        ifinfomsg.extend(index.to_ne_bytes());
        ifinfomsg.extend([0; 8]); // flags, change
                                  // An attribute before the name, as the kernel sends (IFLA_MTU).
        ifinfomsg.extend(nla(4, &1500u32.to_ne_bytes()));
        if let Some(n) = name {
            ifinfomsg.extend(nla(IFLA_IFNAME, format!("{n}\0").as_bytes()));
        }
        test_bytes::message(kind, 0, 0, &ifinfomsg)
    }

    #[test]
    fn link_events_carry_index_and_name() {
        let mut d = message(RTM_DELLINK, 7, Some("lan1"));
        d.extend(message(RTM_NEWLINK, 7, Some("lan1")));
        d.extend(message(RTM_NEWLINK, 9, None));
        d.extend(message(20, 9, Some("x"))); // RTM_NEWADDR: not a link event
        assert_eq!(
            parse_links(&d),
            [
                LinkEvent::Gone {
                    index: 7,
                    name: Some("lan1".into())
                },
                LinkEvent::New {
                    index: 7,
                    name: Some("lan1".into())
                },
                LinkEvent::New {
                    index: 9,
                    name: None
                },
            ]
        );
        // A truncated tail ends the list without panicking.
        assert_eq!(parse_links(&d[..20]), []);
    }
}
