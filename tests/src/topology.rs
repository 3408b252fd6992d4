//! The host-role topology: a router sending a long-lived UDP flow to a
//! container behind a macvlan on another host, and the means to make that
//! router send to a stale MAC, as an offloaded flowtable flow would.
//!
//! ```text
//!  router ns                      host ns                 container ns
//!  br-lan 192.168.1.1/24 ── lan1 ══ eth0 (no IP) ── macvlan ── mv0 192.168.1.240/24
//!  (nft netdev egress on lan1                 ^ flowguard: XDP ingress,
//!   rewrites ether daddr)                       tc egress (learning)
//! ```

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use crate::flow::UdpFlow;
use crate::netns::Netns;
use crate::stale;

pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
pub const CONTAINER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 240);
/// The prefix flowguard is told to track.
pub const LAN_PREFIX: &str = "192.168.1.0/24";
/// The host's interface under the macvlan: where flowguard attaches.
pub const HOST_PARENT: &str = "eth0";
/// WireGuard's port, for a flow that looks like the one that breaks.
pub const FLOW_PORT: u16 = 51820;

/// Docker-like container MACs: the first, and the ones after a recreation.
pub const MAC_A: &str = "02:42:c0:a8:01:0a";
pub const MAC_B: &str = "02:42:c0:a8:01:0b";
pub const MAC_C: &str = "02:42:c0:a8:01:0c";

const BRIDGE: &str = "br-lan";
const BRIDGE_PORT: &str = "lan1";
const CONTAINER_IF: &str = "mv0";

pub struct HostRoleTopology {
    // Fields drop in order: the sockets first, then the namespaces.
    flow: UdpFlow,
    container_mac: String,
    pub container: Netns,
    pub host: Netns,
    pub router: Netns,
}

impl HostRoleTopology {
    /// Builds the three namespaces with the container on `container_mac`, the
    /// router's neighbour entry pointing at it, and the flow's two sockets.
    pub fn new(container_mac: &str) -> Self {
        let router = Netns::new("router");
        let host = Netns::new("host");
        let container = Netns::new("container");

        router.ip(&["link", "add", BRIDGE, "type", "bridge"]);
        router.ip(&["addr", "add", "192.168.1.1/24", "dev", BRIDGE]);
        router.ip(&["link", "set", BRIDGE, "up"]);
        router.ip(&[
            "link",
            "add",
            BRIDGE_PORT,
            "type",
            "veth",
            "peer",
            "name",
            HOST_PARENT,
            "netns",
            host.name(),
        ]);
        router.ip(&["link", "set", BRIDGE_PORT, "master", BRIDGE, "up"]);
        host.ip(&["link", "set", HOST_PARENT, "up"]);

        let flow = UdpFlow::new(
            &router,
            SocketAddrV4::new(ROUTER_IP, FLOW_PORT),
            &container,
            SocketAddrV4::new(CONTAINER_IP, FLOW_PORT),
        );

        let topology = Self {
            flow,
            container_mac: container_mac.to_owned(),
            container,
            host,
            router,
        };
        topology.create_container_interface(container_mac);
        topology
    }

    pub fn container_mac(&self) -> &str {
        &self.container_mac
    }

    /// What `docker rm` + `docker run` with a fixed IP does: the macvlan is
    /// deleted and created again with `new_mac`, same IP. The router's
    /// neighbour entry learns the new MAC, as a real neighbour table would;
    /// only [`HostRoleTopology::set_stale`] keeps the old one alive.
    pub fn recreate_container(&mut self, new_mac: &str) {
        self.container.ip(&["link", "del", CONTAINER_IF]);
        self.create_container_interface(new_mac);
        self.container_mac = new_mac.to_owned();
    }

    fn create_container_interface(&self, mac: &str) {
        // Created on the host's parent, then moved, as Docker does.
        self.host.ip(&[
            "link",
            "add",
            CONTAINER_IF,
            "link",
            HOST_PARENT,
            "address",
            mac,
            "type",
            "macvlan",
            "mode",
            "bridge",
        ]);
        self.host
            .ip(&["link", "set", CONTAINER_IF, "netns", self.container.name()]);
        self.container
            .ip(&["addr", "add", "192.168.1.240/24", "dev", CONTAINER_IF]);
        self.container.ip(&["link", "set", CONTAINER_IF, "up"]);
        // Permanent, so the router never needs ARP to send the flow.
        self.router.ip(&[
            "neigh",
            "replace",
            &CONTAINER_IP.to_string(),
            "lladdr",
            mac,
            "dev",
            BRIDGE,
            "nud",
            "permanent",
        ]);
    }

    /// Makes every IPv4 frame the router sends to the container leave `lan1`
    /// with destination MAC `mac`, whatever the neighbour table says: an
    /// nftables netdev egress rule standing in for a flowtable's cached MAC.
    pub fn set_stale(&self, mac: &str) {
        stale::set_stale(&self.router, BRIDGE_PORT, CONTAINER_IP, mac);
    }

    /// Removes the stale-MAC rule, if any.
    pub fn clear_stale(&self) {
        stale::clear_stale(&self.router);
    }

    /// The container sends one datagram to the router: an ARP request and an
    /// IPv4 frame from its current MAC leave through the host's parent, where
    /// flowguard's tc egress program learns the endpoint.
    pub fn container_first_frame(&self) {
        let discard = SocketAddrV4::new(ROUTER_IP, 9);
        self.container.enter(|| {
            let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
                .expect("bind a UDP socket in the container");
            socket
                .send_to(b"hello from the container", discard)
                .unwrap_or_else(|error| panic!("cannot send to {discard}: {error}"));
        });
    }

    /// The router sends `n` datagrams of its flow; returns their sequence
    /// numbers.
    pub fn send_burst(&mut self, n: usize) -> Vec<u64> {
        self.flow.send_burst(n)
    }

    /// Drains the container's socket until it has been quiet for a moment;
    /// returns the sequence numbers of the flow's datagrams it received.
    pub fn received(&self) -> Vec<u64> {
        self.flow.received()
    }

    /// Sends `n` datagrams and returns how many of them arrived.
    pub fn deliver(&mut self, n: usize) -> usize {
        self.flow.deliver(n)
    }
}
