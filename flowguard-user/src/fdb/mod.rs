//! The bridge FDB of the bridges that have a guarded port: where each MAC
//! is now ("MAC M is behind port P, VLAN V, of bridge B"), so that the
//! endpoint table knows each endpoint's port and an endpoint that moves to
//! another port keeping its IP and MAC (Wi-Fi roaming between two radios,
//! a moved cable, a migrated VM) is seen: the flowtable caches the port as
//! well as the MAC, and its offloaded flows must be evicted.
//!
//! The bridge announces its FDB as `RTM_NEWNEIGH`/`RTM_DELNEIGH` of family
//! `AF_BRIDGE` in `RTNLGRP_NEIGH`. Subscribe first, then dump; a dump
//! again after an overflow and on the reconcile timer. The bridge's own
//! (local, permanent) entries name the bridge of each guarded port; group
//! MACs and entries of other bridges are not followed.

mod decode;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    time::Duration,
};

use flowguard_common::Port;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use tokio::{io::unix::AsyncFd, sync::watch};

pub use decode::FdbEntry;
use decode::{dump_request, parse_datagram, Message};

use crate::{
    endpoints::{Batch, FactSender, PortFact},
    netlink::{self, Received},
    settings::Mac,
};

/// Receive buffer of the event socket: a roaming storm of a busy AP is a
/// few hundred messages; an overflow costs a dump.
const RECEIVE_BUFFER: usize = 1 << 20;

/// Where each followed MAC is, by (bridge, port, VLAN), from a dump.
type Fdb = BTreeMap<Mac, FdbEntry>;

/// The FDB of the bridges of `ports` (names in this namespace).
pub struct FdbSource {
    ports: Vec<String>,
    events: AsyncFd<Socket>,
    seq: u32,
    buf: Vec<u8>,
    /// The bridges of the guarded ports, by ifindex (from their local entries).
    bridges: BTreeSet<u32>,
    /// Every port of those bridges, with its bridge and the bridge's MAC.
    bridge_ports: Vec<(u32, Port)>,
    /// Whether the last facts came from a whole dump (after an overflow or
    /// a port's change, too): they are then all the FDB says.
    pub dumped: bool,
}

impl FdbSource {
    /// Subscribes, then dumps.
    pub async fn open(ports: Vec<String>) -> io::Result<(Self, Vec<PortFact>)> {
        let events = netlink::register(netlink::subscribe(
            NETLINK_ROUTE,
            &[libc::RTNLGRP_NEIGH],
            RECEIVE_BUFFER,
        )?)?;
        let mut src = Self {
            ports,
            events,
            seq: 0,
            buf: Vec::new(),
            bridges: BTreeSet::new(),
            bridge_ports: Vec::new(),
            dumped: false,
        };
        let facts = src.dump().await?;
        Ok((src, facts))
    }

    /// The bridges followed now (ifindexes).
    pub fn bridges(&self) -> &BTreeSet<u32> {
        &self.bridges
    }

    /// The ports of the followed bridges at the last dump (each has a local
    /// entry), with the bridge and its MAC: between them the kernel side
    /// may redirect a frame whose flowtable cached the wrong port.
    pub fn bridge_ports(&self) -> Vec<(u32, Port)> {
        self.bridge_ports.clone()
    }

    /// The next facts: changes of the followed bridges' FDB (after an
    /// overflow, a whole dump). Cancel-safe between datagrams.
    pub async fn next_facts(&mut self) -> io::Result<Vec<PortFact>> {
        loop {
            match netlink::receive_async(&self.events, &mut self.buf).await? {
                Received::Whole => {}
                Received::Truncated(_) | Received::Overflow => {
                    log::info!("missed bridge FDB changes: reading the FDB again");
                    return self.dump().await;
                }
            }
            let messages = parse_datagram(&self.buf);
            // A port joined or left a bridge, or was created again: its
            // local entry says so. Read it all again, for the bridges
            // followed and the ports redirected between.
            if messages.iter().any(|m| match m {
                Message::Entry { entry, gone, .. } => self.changes_ports(entry, *gone),
                _ => false,
            }) {
                log::info!("a bridge port came or went: reading the FDB again");
                return self.dump().await;
            }
            let facts: Vec<PortFact> = messages
                .into_iter()
                .filter_map(|m| match m {
                    Message::Entry { entry, gone, .. } => self.fact(&entry, gone),
                    _ => None,
                })
                .collect();
            if !facts.is_empty() {
                return Ok(facts);
            }
        }
    }

    /// Dumps the FDB: where every followed MAC is now.
    pub async fn dump(&mut self) -> io::Result<Vec<PortFact>> {
        let entries = self.dump_entries().await?;
        self.dumped = true;
        let guarded: BTreeSet<u32> = self
            .ports
            .iter()
            .filter_map(|p| crate::sys::ifindex(p))
            .collect();
        self.bridges = entries
            .iter()
            .filter(|e| guarded.contains(&e.port))
            .filter_map(|e| e.bridge)
            .collect();
        let macs: BTreeMap<u32, Option<Mac>> = self
            .bridges
            .iter()
            .map(|b| {
                let mac = crate::sys::ifname(*b).and_then(|n| crate::sys::if_mac(&n).ok());
                (*b, mac)
            })
            .collect();
        let ports: BTreeMap<u32, Port> = entries
            .iter()
            .filter(|e| e.local && e.port != 0)
            .filter_map(|e| {
                let bridge = e.bridge?;
                let mac = (*macs.get(&bridge)?)?;
                (e.port != bridge).then_some((
                    e.port,
                    Port {
                        bridge,
                        bridge_mac: mac.0,
                        _pad: [0; 2],
                    },
                ))
            })
            .collect();
        self.bridge_ports = ports.into_iter().collect();
        let mut fdb = Fdb::new();
        for e in entries {
            if self.followed(&e) {
                fdb.insert(e.mac, e);
            }
        }
        Ok(fdb
            .into_values()
            .map(|e| PortFact::behind(e.mac, e.bridge.unwrap_or(0), e.port, e.vlan))
            .collect())
    }

    /// Whether `e`, a change, is a bridge port's own (local) entry that
    /// says a port came or went: a new port of a followed bridge, a
    /// guarded port (created again, as another ifindex) joining a bridge,
    /// or the loss of a known port's entry.
    fn changes_ports(&self, e: &FdbEntry, gone: bool) -> bool {
        if !e.local || e.port == 0 || e.bridge.is_some_and(|b| b == e.port) {
            return false;
        }
        let known = self.bridge_ports.iter().any(|(p, _)| *p == e.port);
        if gone {
            return known;
        }
        !known
            && (e.bridge.is_some_and(|b| self.bridges.contains(&b))
                || crate::sys::ifname(e.port).is_some_and(|n| self.ports.contains(&n)))
    }

    /// Follows the bridges of these guarded ports from now on (`--auto`
    /// guards more as the flowtables change).
    pub fn set_ports(&mut self, ports: Vec<String>) {
        self.ports = ports;
    }

    fn followed(&self, e: &FdbEntry) -> bool {
        !e.local && e.mac.is_unicast() && e.bridge.is_some_and(|b| self.bridges.contains(&b))
    }

    fn fact(&self, e: &FdbEntry, gone: bool) -> Option<PortFact> {
        if !self.followed(e) {
            return None;
        }
        Some(if gone {
            PortFact::gone(e.mac, e.port)
        } else {
            PortFact::behind(e.mac, e.bridge.unwrap_or(0), e.port, e.vlan)
        })
    }

    async fn dump_entries(&mut self) -> io::Result<Vec<FdbEntry>> {
        let requests = netlink::register(netlink::subscribe(NETLINK_ROUTE, &[], 1 << 20)?)?;
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        netlink::send(requests.get_ref(), &dump_request(seq))?;
        let mut buf = Vec::new();
        let mut entries = Vec::new();
        loop {
            match netlink::receive_async(&requests, &mut buf).await? {
                Received::Whole => {}
                Received::Truncated(len) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a bridge FDB dump reply of {len} bytes was truncated"),
                    ))
                }
                Received::Overflow => return Err(io::Error::from_raw_os_error(libc::ENOBUFS)),
            }
            for m in parse_datagram(&buf) {
                match m {
                    Message::Entry { seq: s, entry, .. } if s == seq => entries.push(entry),
                    Message::Done { seq: s } if s == seq => return Ok(entries),
                    Message::Error { seq: s, errno } if s == seq => {
                        return Err(io::Error::from_raw_os_error(errno))
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Starts the source for the agent: the FDB of the bridges of the guarded
/// egress `ports` (as they change), followed on a task of its own that
/// sends its facts to `tx`, with a whole dump every `reconcile` and when
/// the guarded ports change. Says why when it cannot run.
pub async fn start(mut ports: watch::Receiver<Vec<String>>, reconcile: Duration, tx: FactSender) {
    let first_ports = ports.borrow_and_update().clone();
    if first_ports.is_empty() {
        return;
    }
    let (mut src, first) = match FdbSource::open(first_ports).await {
        Ok(v) => v,
        Err(e) => {
            crate::say_err!(
                "flowguard: not following the bridge FDB ({e}): endpoints that move to \
                 another bridge port are not seen"
            );
            return;
        }
    };
    if src.bridges().is_empty() {
        log::info!("no guarded port is a bridge port: the bridge FDB is not followed");
        return;
    }
    let names: Vec<String> = src
        .bridges()
        .iter()
        .map(|b| crate::sys::ifname(*b).unwrap_or_else(|| format!("ifindex {b}")))
        .collect();
    crate::say!(
        "flowguard: following the bridge FDB of {} ({} MACs): an endpoint that moves to \
         another port is evicted",
        names.join(", "),
        first.len()
    );
    let _ = tx.send(Batch::ports(first, true).with_bridge_ports(src.bridge_ports()));
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(reconcile);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer.tick().await;
        loop {
            src.dumped = false;
            let whole = tokio::select! {
                facts = src.next_facts() => match facts {
                    // After an overflow or a port's change, all of it.
                    Ok(f) if src.dumped => Ok((f, true)),
                    other => other.map(|f| (f, false)),
                },
                _ = timer.tick() => src.dump().await.map(|f| (f, true)),
                changed = ports.changed() => {
                    if changed.is_err() {
                        return; // the agent is gone
                    }
                    src.set_ports(ports.borrow_and_update().clone());
                    src.dump().await.map(|f| (f, true))
                }
            };
            let batch = whole.map(|(facts, whole)| match whole {
                true => Batch::ports(facts, true).with_bridge_ports(src.bridge_ports()),
                false => Batch::ports(facts, false),
            });
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    crate::say_err!("flowguard: following the bridge FDB failed: {e}");
                    return;
                }
            };
            if tx.send(batch).is_err() {
                return;
            }
        }
    });
}
