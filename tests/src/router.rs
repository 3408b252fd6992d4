//! The router-role topology: a router that forwards a client's UDP flows to
//! two LAN endpoints behind bridge ports, with conntrack tracking them, and
//! the means to change an endpoint's MAC by real ARP, to make the router send
//! to a stale MAC (as an offloaded flowtable flow would), and to read the
//! router's neighbour and conntrack tables.
//!
//! ```text
//!  client ns                  router ns (forwarding on, nft inet fgct: ct)
//!  eth0 10.0.0.2/24 ══ wan0 10.0.0.1/24
//!  default via 10.0.0.1       br-lan 192.168.1.1/24 ─┬─ lan1 ══ eth0 192.168.1.240/24  endpoint ns A
//!                                                     └─ lan2 ══ eth0 192.168.1.241/24  endpoint ns B
//! ```
//!
//! Everything that fills the router's neighbour table here is real ARP sent
//! by the endpoints (`arping`), which creates no conntrack entry: the only
//! entries are the flows a test sends on purpose.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

pub use crate::flow::UdpFlow;
use crate::netns::{self, Netns};
use crate::stale;
use crate::wait::{TimedOut, Wait};

pub const ROUTER_LAN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
pub const ROUTER_WAN_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const ENDPOINT_A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 240);
pub const ENDPOINT_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 241);
/// The prefix flowguard is told to track.
pub const LAN_PREFIX: &str = "192.168.1.0/24";
pub const BRIDGE: &str = "br-lan";
/// The bridge port toward endpoint A: where flowguard attaches tc egress.
pub const PORT_A: &str = "lan1";
pub const PORT_B: &str = "lan2";
pub const WAN_PORT: &str = "wan0";
/// The interface name inside every endpoint and the client.
pub const ENDPOINT_IF: &str = "eth0";

/// Endpoint A's MAC at first, and after it "was recreated".
pub const MAC_A1: &str = "02:42:c0:a8:01:f0";
pub const MAC_A2: &str = "02:42:c0:a8:01:f1";
/// Endpoint B's MAC (it never moves).
pub const MAC_B: &str = "02:42:c0:a8:01:f5";

/// The nftables table that tracks forwarded and local traffic in the router.
const CT_TABLE: &str = "fgct";
/// The netdev table of the stale-MAC emulation.
/// Marks a [`UdpFlow`]'s datagrams, so that nothing else is counted.
/// Bound on how long the router's neighbour table may take to show a change.
pub const NEIGH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the router-role tests cannot run here, or `None`: on top of the
/// namespace prerequisites they need `arping` (iputils) and `conntrack`
/// (conntrack-tools).
pub fn missing_prerequisite() -> Option<String> {
    if let Some(reason) = netns::missing_prerequisite() {
        return Some(reason);
    }
    for tool in ["arping", "conntrack"] {
        // Only whether it can be started matters.
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// Returns early from the calling test, printing `skipped: <reason>`, unless
/// the router-role topology can be built here.
#[macro_export]
macro_rules! skip_unless_router_role_supported {
    () => {
        if let Some(reason) = $crate::router::missing_prerequisite() {
            $crate::netns::skip(&reason);
            return;
        }
    };
}

/// A LAN endpoint: its own namespace behind one bridge port of the router.
pub struct Endpoint {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// The router's bridge port toward it.
    pub port: &'static str,
    mac: String,
}

impl Endpoint {
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// Sends one ARP request for the router's address: the router answers
    /// and records the endpoint's current MAC (state STALE), as it does for
    /// any host that talks to it. No IP packet, so no conntrack entry.
    pub fn arp_router(&self) {
        self.ns.exec(&[
            "arping",
            "-c1",
            "-w2",
            "-I",
            ENDPOINT_IF,
            &ROUTER_LAN_IP.to_string(),
        ]);
    }

    /// Announces the endpoint's current MAC with one gratuitous ARP request
    /// (`arping -U`), as a restarted host or a VRRP master does. A router
    /// that has an entry for the IP takes the new MAC at once.
    pub fn announce(&self) {
        // arping exits 1 when nothing answers, which is normal for -U.
        let output = self.ns.try_exec(&[
            "arping",
            "-U",
            "-c1",
            "-I",
            ENDPOINT_IF,
            &self.ip.to_string(),
        ]);
        assert!(
            output.status.code().is_some(),
            "arping -U was killed: {output:?}"
        );
    }
}

/// One entry of the router's neighbour table, as `ip -j neigh` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighState {
    pub mac: Option<String>,
    /// `REACHABLE`, `STALE`, `FAILED`, ...
    pub states: Vec<String>,
}

impl NeighState {
    /// Whether the entry holds `mac` (any case).
    pub fn has_mac(&self, mac: &str) -> bool {
        self.mac
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(mac))
    }
}

pub struct RouterTopology {
    // Fields drop in order: the router first (its veths take their peers
    // along), then the other namespaces.
    pub router: Netns,
    pub client: Netns,
    pub a: Endpoint,
    pub b: Endpoint,
}

impl RouterTopology {
    /// Builds the four namespaces, addresses and routes, turns forwarding on
    /// (flowguard's kernel side confirms staleness with bpf_fib_lookup, which
    /// needs it) and makes conntrack track forwarded and local traffic. The
    /// router's neighbour table is still empty: see
    /// [`RouterTopology::resolve`].
    pub fn new() -> Self {
        let router = Netns::new("router");
        let client = Netns::new("client");
        let a = Netns::new("epa");
        let b = Netns::new("epb");

        router.ip(&["link", "add", BRIDGE, "type", "bridge"]);
        router.ip(&["addr", "add", "192.168.1.1/24", "dev", BRIDGE]);
        router.ip(&["link", "set", BRIDGE, "up"]);
        router.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
        router.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);

        router.ip(&[
            "link",
            "add",
            WAN_PORT,
            "type",
            "veth",
            "peer",
            "name",
            ENDPOINT_IF,
            "netns",
            client.name(),
        ]);
        router.ip(&["addr", "add", "10.0.0.1/24", "dev", WAN_PORT]);
        router.ip(&["link", "set", WAN_PORT, "up"]);
        client.ip(&["addr", "add", "10.0.0.2/24", "dev", ENDPOINT_IF]);
        client.ip(&["link", "set", ENDPOINT_IF, "up"]);
        client.ip(&["route", "add", "default", "via", "10.0.0.1"]);

        let a = Self::add_endpoint(&router, a, ENDPOINT_A_IP, PORT_A, MAC_A1);
        let b = Self::add_endpoint(&router, b, ENDPOINT_B_IP, PORT_B, MAC_B);

        let script = format!(
            "table inet {CT_TABLE} {{\n\
             chain fwd_ct {{ type filter hook forward priority 0; ct state new,established accept; }}\n\
             chain out_ct {{ type filter hook output priority 0; ct state new,established accept; }}\n\
             }}\n"
        );
        router.exec(&["nft", &script]);

        Self {
            router,
            client,
            a,
            b,
        }
    }

    fn add_endpoint(
        router: &Netns,
        ns: Netns,
        ip: Ipv4Addr,
        port: &'static str,
        mac: &str,
    ) -> Endpoint {
        router.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            ENDPOINT_IF,
            "netns",
            ns.name(),
        ]);
        router.ip(&["link", "set", port, "master", BRIDGE, "up"]);
        ns.ip(&["link", "set", ENDPOINT_IF, "address", mac]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", ENDPOINT_IF]);
        ns.ip(&["link", "set", ENDPOINT_IF, "up"]);
        ns.ip(&["route", "add", "default", "via", "192.168.1.1"]);
        Endpoint {
            ns,
            ip,
            port,
            mac: mac.to_owned(),
        }
    }

    pub fn endpoint(&self, ip: Ipv4Addr) -> &Endpoint {
        [&self.a, &self.b]
            .into_iter()
            .find(|endpoint| endpoint.ip == ip)
            .unwrap_or_else(|| panic!("{ip} is not an endpoint of the topology"))
    }

    fn endpoint_mut(&mut self, ip: Ipv4Addr) -> &mut Endpoint {
        [&mut self.a, &mut self.b]
            .into_iter()
            .find(|endpoint| endpoint.ip == ip)
            .unwrap_or_else(|| panic!("{ip} is not an endpoint of the topology"))
    }

    /// The router's neighbour entry for `ip` on the bridge, if any.
    pub fn router_neigh(&self, ip: Ipv4Addr) -> Option<NeighState> {
        let json = self
            .router
            .ip(&["-j", "neigh", "show", &ip.to_string(), "dev", BRIDGE]);
        let entries: Value = if json.trim().is_empty() {
            Value::Array(Vec::new())
        } else {
            serde_json::from_str(&json)
                .unwrap_or_else(|error| panic!("`ip -j neigh` is not JSON ({error}): {json}"))
        };
        let entry = entries.as_array()?.first()?;
        Some(NeighState {
            mac: entry["lladdr"].as_str().map(str::to_ascii_lowercase),
            states: entry["state"]
                .as_array()
                .map(|states| {
                    states
                        .iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Polls the router's neighbour entry for `ip` until `wanted` holds, for
    /// up to `timeout`; returns the entry, or the last one seen in the error.
    pub fn poll_router_neigh(
        &self,
        ip: Ipv4Addr,
        timeout: Duration,
        wanted: impl Fn(Option<&NeighState>) -> bool,
    ) -> Result<Option<NeighState>, TimedOut<Option<NeighState>>> {
        Wait::new(format!("the router's neighbour entry for {ip}"), timeout)
            .poll(|| self.router_neigh(ip), |n| wanted(n.as_ref()))
    }

    /// Does `nudge` (what makes the router's entry for `ip` change), then
    /// watches the entry for up to `each`, again and again until `wanted`
    /// holds; panics after `timeout`, naming `what`, with the last entry.
    pub fn nudge_router_neigh(
        &self,
        ip: Ipv4Addr,
        what: &str,
        (each, timeout): (Duration, Duration),
        mut nudge: impl FnMut(),
        wanted: impl Fn(Option<&NeighState>) -> bool,
    ) -> Option<NeighState> {
        Wait::new(what, timeout).every(Duration::ZERO).until(
            || {
                nudge();
                self.poll_router_neigh(ip, each, &wanted)
                    .unwrap_or_else(|timed_out| timed_out.last)
            },
            |n| wanted(n.as_ref()),
        )
    }

    /// Whether the router's neighbour table holds `ip` at `mac`.
    pub fn router_has_neigh(&self, ip: Ipv4Addr, mac: &str) -> bool {
        self.router_neigh(ip).is_some_and(|n| n.has_mac(mac))
    }

    /// Makes the router learn `ip`'s current MAC by real ARP (the endpoint
    /// asks for the router's address) and waits until its neighbour table
    /// shows it.
    pub fn resolve(&self, ip: Ipv4Addr) {
        let endpoint = self.endpoint(ip);
        let mac = endpoint.mac();
        self.nudge_router_neigh(
            ip,
            &format!("the router to learn {ip} at {mac} by ARP"),
            (Duration::from_secs(1), NEIGH_TIMEOUT),
            || endpoint.arp_router(),
            |n| n.is_some_and(|n| n.has_mac(mac)),
        );
    }

    /// What recreating a container or swapping a NIC does, by real ARP: the
    /// endpoint's interface takes `new_mac` (same IP), forgets its own
    /// neighbours, and announces itself with a gratuitous ARP (or, when the
    /// router has no entry for it, asks for the router's address); the
    /// router's neighbour entry really changes (no `ip neigh` on the router).
    /// Waits until the router's table shows `new_mac`.
    pub fn move_endpoint(&mut self, ip: Ipv4Addr, new_mac: &str) {
        {
            let endpoint = self.endpoint_mut(ip);
            endpoint
                .ns
                .ip(&["link", "set", ENDPOINT_IF, "address", new_mac]);
            endpoint.ns.ip(&["neigh", "flush", "dev", ENDPOINT_IF]);
            endpoint.mac = new_mac.to_owned();
        }
        let endpoint = self.endpoint(ip);
        self.nudge_router_neigh(
            ip,
            &format!("the router's neighbour entry for {ip} to change to {new_mac}"),
            (Duration::from_secs(1), NEIGH_TIMEOUT),
            || {
                if self.router_neigh(ip).is_none() {
                    // A router without an entry ignores gratuitous ARP
                    // (arp_accept=0): the endpoint asks for the router
                    // instead, which creates the entry.
                    endpoint.arp_router();
                } else {
                    endpoint.announce();
                }
            },
            |n| n.is_some_and(|n| n.has_mac(new_mac)),
        );
    }

    /// Makes every IPv4 frame to `ip` leave its bridge port with destination
    /// MAC `mac`, whatever the neighbour table says: an nftables netdev
    /// egress rule standing in for a flowtable's cached MAC. It runs before
    /// tc egress, where flowguard sits.
    pub fn set_stale(&self, ip: Ipv4Addr, mac: &str) {
        let port = self.endpoint(ip).port;
        stale::set_stale(&self.router, port, ip, mac);
    }

    /// Removes the stale-MAC rule, if any.
    pub fn clear_stale(&self) {
        stale::clear_stale(&self.router);
    }

    /// Sets a per-namespace sysctl of the router (`key=value`).
    pub fn router_sysctl(&self, setting: &str) {
        self.router.exec(&["sysctl", "-qw", setting]);
    }

    /// Unreplied UDP entries live 30 s by default: long enough for a test,
    /// but not with margin. Ten minutes, in the router's namespace only.
    pub fn keep_udp_entries(&self) {
        self.router_sysctl("net.netfilter.nf_conntrack_udp_timeout=600");
    }

    /// Neighbour timers of the router's bridge short enough that an entry
    /// whose endpoint went away turns FAILED in about a second, instead of
    /// five to ten.
    pub fn fast_neighbour_failure(&self) {
        for setting in [
            "delay_first_probe_time=1",
            "retrans_time_ms=100",
            "ucast_solicit=1",
            "mcast_solicit=1",
            "app_solicit=0",
        ] {
            self.router_sysctl(&format!("net.ipv4.neigh.{BRIDGE}.{setting}"));
        }
    }

    /// The client sends one datagram to each of `ports` at `to`, each from a
    /// socket of its own (its own source port): one forwarded flow, and one
    /// conntrack entry in the router, per port. Returns (source port,
    /// destination port) of each flow.
    pub fn send_flows(&self, to: Ipv4Addr, ports: &[u16]) -> Vec<(u16, u16)> {
        self.client.enter(|| {
            ports
                .iter()
                .map(|&port| {
                    let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT_IP, 0))
                        .expect("bind a UDP socket in the client");
                    let destination = SocketAddrV4::new(to, port);
                    socket
                        .send_to(b"flowguard router-role flow", destination)
                        .unwrap_or_else(|error| {
                            panic!("client cannot send to {destination}: {error}")
                        });
                    let source = socket.local_addr().expect("local address").port();
                    (source, port)
                })
                .collect()
        })
    }

    /// A long-lived UDP flow from the client to `to:port`, with its receiver
    /// bound in the endpoint.
    pub fn udp_flow(&self, to: Ipv4Addr, port: u16) -> UdpFlow {
        UdpFlow::new(
            &self.client,
            SocketAddrV4::new(CLIENT_IP, port),
            &self.endpoint(to).ns,
            SocketAddrV4::new(to, port),
        )
    }

    /// The router's conntrack table, as `conntrack -L` prints it.
    pub fn conntrack_entries(&self) -> Vec<CtEntry> {
        let output = self.router.try_exec(&["conntrack", "-L"]);
        assert!(
            output.status.success(),
            "`conntrack -L` failed in the router: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(CtEntry::parse)
            .collect()
    }

    /// The router's conntrack entries that involve `ip`.
    pub fn conntrack_entries_of(&self, ip: Ipv4Addr) -> Vec<CtEntry> {
        let ip = IpAddr::V4(ip);
        self.conntrack_entries()
            .into_iter()
            .filter(|entry| entry.involves(ip))
            .collect()
    }

    /// Polls the router's conntrack table until `ip` has at least `n`
    /// entries, for up to `timeout`; returns them (maybe fewer).
    pub fn wait_conntrack_entries(
        &self,
        ip: Ipv4Addr,
        n: usize,
        timeout: Duration,
    ) -> Vec<CtEntry> {
        Wait::new(format!("{n} conntrack entries of {ip}"), timeout)
            .poll(
                || self.conntrack_entries_of(ip),
                |entries| entries.len() >= n,
            )
            .unwrap_or_else(|timed_out| timed_out.last)
    }
}

impl Default for RouterTopology {
    fn default() -> Self {
        Self::new()
    }
}

/// One direction of a conntrack entry as `conntrack -L` prints it (no ports
/// for ICMP and other port-less protocols).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

/// One line of `conntrack -L`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtEntry {
    pub proto: String,
    pub orig: CtTuple,
    pub reply: CtTuple,
}

impl CtEntry {
    /// Parses `udp 17 29 src=.. dst=.. sport=.. dport=.. [UNREPLIED] src=..
    /// dst=.. sport=.. dport=.. mark=0 use=1`: the first `src=`..`dport=`
    /// group is the original direction, the second the reply.
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let proto = words.next()?.to_owned();
        let mut tuples: Vec<CtTuple> = Vec::new();
        let mut current: Option<CtTuple> = None;
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "src" => {
                    if let Some(done) = current.take() {
                        tuples.push(done);
                    }
                    current = Some(CtTuple {
                        src: value.parse().ok()?,
                        dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        sport: None,
                        dport: None,
                    });
                }
                "dst" => current.as_mut()?.dst = value.parse().ok()?,
                "sport" => current.as_mut()?.sport = Some(value.parse().ok()?),
                "dport" => current.as_mut()?.dport = Some(value.parse().ok()?),
                _ => {}
            }
        }
        tuples.extend(current);
        match tuples[..] {
            [orig, reply] => Some(Self { proto, orig, reply }),
            _ => None,
        }
    }

    pub fn involves(&self, ip: IpAddr) -> bool {
        [self.orig.src, self.orig.dst, self.reply.src, self.reply.dst].contains(&ip)
    }

    /// The original direction the way flowguard prints it:
    /// `udp 10.0.0.2:40000 -> 192.168.1.240:5000`.
    pub fn orig_text(&self) -> String {
        match (self.orig.sport, self.orig.dport) {
            (Some(sport), Some(dport)) => format!(
                "{} {}:{sport} -> {}:{dport}",
                self.proto, self.orig.src, self.orig.dst
            ),
            _ => format!("{} {} -> {}", self.proto, self.orig.src, self.orig.dst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_conntrack_list_lines() {
        let line = "udp      17 29 src=10.0.0.2 dst=192.168.1.240 sport=54807 dport=5001 \
                    [UNREPLIED] src=192.168.1.240 dst=10.0.0.2 sport=5001 dport=54807 mark=0 use=1";
        let entry = CtEntry::parse(line).expect("a udp line");
        assert_eq!(entry.proto, "udp");
        assert_eq!(entry.orig.sport, Some(54807));
        assert_eq!(entry.reply.src, IpAddr::V4(ENDPOINT_A_IP));
        assert!(entry.involves(IpAddr::V4(ENDPOINT_A_IP)));
        assert!(!entry.involves(IpAddr::V4(ENDPOINT_B_IP)));
        assert_eq!(
            entry.orig_text(),
            "udp 10.0.0.2:54807 -> 192.168.1.240:5001"
        );

        let icmp = "icmp     1 29 src=192.168.1.240 dst=192.168.1.1 type=8 code=0 id=7 \
                    src=192.168.1.1 dst=192.168.1.240 type=0 code=0 id=7 mark=0 use=1";
        let entry = CtEntry::parse(icmp).expect("an icmp line");
        assert_eq!(entry.orig.sport, None);
        assert_eq!(entry.orig_text(), "icmp 192.168.1.240 -> 192.168.1.1");

        assert_eq!(
            CtEntry::parse("conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown."),
            None
        );
    }
}
