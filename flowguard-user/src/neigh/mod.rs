//! The router's truth about each endpoint's current MAC: the kernel
//! neighbour table, followed over rtnetlink, cached in user space and
//! mirrored into the kernel side's endpoint map.
//!
//! Three parts, each usable on its own:
//!
//! - [`NeighbourSource`] (root, real kernel): subscribes to `RTNLGRP_NEIGH`
//!   (IPv4 and IPv6) **first**, then dumps the table, so that no change made
//!   between the two is missed: every change after the subscription is in the
//!   event queue, and applying the queue after the dump converges on the
//!   kernel's state. A MAC change arrives as one `RTM_NEWNEIGH` (no
//!   `RTM_DELNEIGH` before it), which is why the cache keeps the MAC per
//!   `(ip, ifindex)`. When the kernel could not queue an event (`ENOBUFS`),
//!   [`NeighbourSource::next_event`] returns [`NeighEvent::Overflow`]: the
//!   caller dumps again and calls [`NeighCache::replace_all`].
//! - [`NeighCache`] (pure, no root): the policy below.
//! - [`fact`], [`facts`] and [`all_facts`]: what the cache says, as facts
//!   for the endpoint table ([`crate::endpoints`]), which merges them with
//!   the other sources and writes the endpoint map.
//!
//! # Policy
//!
//! A neighbour entry `(ip, ifindex)` is **usable** — the kernel believes in
//! its MAC — when its state is one of `NUD_REACHABLE`, `NUD_STALE`,
//! `NUD_DELAY`, `NUD_PROBE`, `NUD_PERMANENT` or `NUD_NOARP`, and it carries a
//! six-byte unicast link-layer address (not multicast, not broadcast, not
//! all-zero). `NUD_STALE` is usable on purpose: it is the normal resting
//! state of an entry whose MAC nobody contradicted, and the state an ARP
//! request or neighbour solicitation from a recreated endpoint leaves behind.
//!
//! `NUD_INCOMPLETE`, `NUD_FAILED`, `NUD_NONE`, an entry without a (unicast,
//! six-byte) link-layer address, and `RTM_DELNEIGH` all mean the kernel no
//! longer believes in any MAC for that `(ip, ifindex)`: the pair leaves the
//! cache. When no usable pair is left for the IP, its desired state is
//! [`Desired::Absent`]: the neighbour table withdraws its claim, and the
//! endpoint table deletes the entry unless another source holds it:
//! flowguard never rewrites frames toward a MAC the kernel gave up on.
//!
//! An IP with usable entries on two interfaces and **different** MACs is
//! [`Desired::Ambiguous`] (a split fact): it stays in the map with the
//! `AMBIGUOUS` flag, so the kernel side counts frames to it that carry
//! another MAC but never rewrites them. It is resolved as soon as only one
//! MAC is left. The same MAC on two interfaces is not ambiguous.
//!
//! Ignored altogether: IPs outside the configured prefixes, families other
//! than IPv4/IPv6 (the bridge FDB shares `RTNLGRP_NEIGH`), and proxy entries
//! (`NTF_PROXY`: `ip neigh add proxy ...`, including IPv6 router proxies),
//! which announce the router's own MAC for someone else's IP and whose
//! `RTM_DELNEIGH` must not remove a real entry of the same `(ip, ifindex)`.
//! IPv4-mapped IPv6 addresses are treated as the IPv4 address.
//!
//! How the neighbour table's claims meet the other sources' (a static
//! entry always wins, a learned MAC is never replaced by it, a child that
//! disagrees makes the endpoint ambiguous) is the endpoint table's rule.

mod cache;
mod decode;
mod facts;
mod follow;
mod source;

pub use cache::{Desired, NeighCache};
pub use facts::{all_facts, fact, facts};
pub use follow::{Heard, Neighbours, SharedCache};
pub use source::{NeighError, NeighbourSource, SourceOptions};

use std::net::IpAddr;

use crate::settings::Mac;

/// `NUD_*` neighbour states (`include/uapi/linux/neighbour.h`).
pub mod nud {
    pub const NONE: u16 = 0x00;
    pub const INCOMPLETE: u16 = 0x01;
    pub const REACHABLE: u16 = 0x02;
    pub const STALE: u16 = 0x04;
    pub const DELAY: u16 = 0x08;
    pub const PROBE: u16 = 0x10;
    pub const FAILED: u16 = 0x20;
    pub const NOARP: u16 = 0x40;
    pub const PERMANENT: u16 = 0x80;
    /// The states in which the kernel believes in the entry's MAC.
    pub const USABLE: u16 = REACHABLE | STALE | DELAY | PROBE | PERMANENT | NOARP;

    /// The state's name as `ip neigh` prints it (upper case).
    pub fn name(state: u16) -> &'static str {
        match state {
            NONE => "NONE",
            INCOMPLETE => "INCOMPLETE",
            REACHABLE => "REACHABLE",
            STALE => "STALE",
            DELAY => "DELAY",
            PROBE => "PROBE",
            FAILED => "FAILED",
            NOARP => "NOARP",
            PERMANENT => "PERMANENT",
            _ => "OTHER",
        }
    }
}

/// One neighbour table entry, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighEntry {
    pub ip: IpAddr,
    pub ifindex: u32,
    /// The link-layer address, when the kernel gave a six-byte one.
    pub mac: Option<Mac>,
    /// `NUD_*` bits, see [`nud`].
    pub state: u16,
}

impl NeighEntry {
    /// Whether the kernel believes in this entry's MAC (see the policy in
    /// the module documentation); the MAC if so.
    pub fn usable_mac(&self) -> Option<Mac> {
        let believed =
            self.state & nud::USABLE != 0 && self.state & (nud::INCOMPLETE | nud::FAILED) == 0;
        self.mac.filter(|m| believed && m.is_unicast())
    }
}

/// A change of the neighbour table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighEvent {
    /// `RTM_NEWNEIGH`: the entry as it is now (new, changed MAC or state).
    Update(NeighEntry),
    /// `RTM_DELNEIGH`.
    Delete { ip: IpAddr, ifindex: u32 },
    /// The kernel dropped events (`ENOBUFS`): dump again and
    /// [`NeighCache::replace_all`].
    Overflow,
}
