//! flowguard's conntrack client against this machine's kernel: entries made
//! by real forwarded traffic through a router namespace, and a thousand
//! entries inserted over ctnetlink. Conntrack tables are per network
//! namespace, so all netlink work runs on a thread that entered the test's
//! namespace with setns(); every namespace is deleted by a guard, also when a
//! test panics. Needs root; skips with a printed reason otherwise.
//!
//! Run: cargo test -p flowguard-tests --release --test conntrack -- --test-threads=1

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use flowguard_tests::wait::Wait;
use flowguard_user::conntrack::{Conntrack, ConntrackError, EvictScope, Flow, Tuple, IPS_OFFLOAD};

fn skip_reason() -> Option<String> {
    if let Some(reason) = flowguard_tests::netns::needs_root("network namespaces and conntrack") {
        return Some(reason);
    }
    for tool in ["ip", "nft", "conntrack"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
            || Command::new(tool)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

macro_rules! skip_unless_able {
    () => {
        if let Some(why) = skip_reason() {
            flowguard_tests::netns::skip(&why);
            return;
        }
    };
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// `fg<pid>-ct<n><role>`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Self {
        let name = format!(
            "fg{}-ct{}{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a thread inside this namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: a valid namespace fd; only this thread moves.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn v4(s: &str) -> IpAddr {
    s.parse::<Ipv4Addr>().unwrap().into()
}

fn v6(s: &str) -> IpAddr {
    s.parse::<Ipv6Addr>().unwrap().into()
}

/// What identifies an entry, without the kernel-assigned parts.
fn keys(flows: &[Flow]) -> BTreeSet<(u16, Tuple, Tuple)> {
    flows.iter().map(|f| (f.zone, f.orig, f.reply)).collect()
}

/// The original tuples `conntrack -L` prints, as (proto, src, dst, sport, dport).
fn conntrack_tool_list(ns: &Netns) -> BTreeSet<(String, IpAddr, IpAddr, u16, u16)> {
    ns.exec(&["conntrack", "-L"])
        .lines()
        .filter_map(|line| {
            let proto = line.split_whitespace().next()?.to_string();
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map(str::to_string)
            };
            Some((
                proto,
                field("src=")?.parse().ok()?,
                field("dst=")?.parse().ok()?,
                field("sport=")?.parse().ok()?,
                field("dport=")?.parse().ok()?,
            ))
        })
        .collect()
}

fn tool_view(flows: &[Flow]) -> BTreeSet<(String, IpAddr, IpAddr, u16, u16)> {
    flows
        .iter()
        .map(|f| {
            let name = if f.orig.proto == 17 { "udp" } else { "other" };
            (
                name.to_string(),
                f.orig.src,
                f.orig.dst,
                f.orig.src_port,
                f.orig.dst_port,
            )
        })
        .collect()
}

/// client 10.0.0.2 -- 10.0.0.1 router 192.168.1.1 (br0) -- .240 / .241,
/// with nftables tracking forwarded traffic in the router.
struct Lab {
    router: Netns,
    client: Netns,
    _endpoints: [Netns; 2],
}

impl Lab {
    fn new() -> Self {
        let router = Netns::new("r");
        let client = Netns::new("c");
        let endpoints = [Netns::new("a"), Netns::new("b")];
        router.ip(&[
            "link",
            "add",
            "r0",
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            &client.name,
        ]);
        router.ip(&["addr", "add", "10.0.0.1/24", "dev", "r0"]);
        router.ip(&["link", "set", "r0", "up"]);
        client.ip(&["addr", "add", "10.0.0.2/24", "dev", "c0"]);
        client.ip(&["link", "set", "c0", "up"]);
        client.ip(&["route", "add", "default", "via", "10.0.0.1"]);
        router.ip(&["link", "add", "br0", "type", "bridge"]);
        router.ip(&["addr", "add", "192.168.1.1/24", "dev", "br0"]);
        router.ip(&["link", "set", "br0", "up"]);
        for (i, (ep, addr)) in endpoints
            .iter()
            .zip(["192.168.1.240/24", "192.168.1.241/24"])
            .enumerate()
        {
            let port = format!("p{i}");
            router.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "e0", "netns", &ep.name,
            ]);
            router.ip(&["link", "set", &port, "master", "br0", "up"]);
            ep.ip(&["addr", "add", addr, "dev", "e0"]);
            ep.ip(&["link", "set", "e0", "up"]);
            ep.ip(&["route", "add", "default", "via", "192.168.1.1"]);
        }
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        router.exec(&["nft", "add", "table", "inet", "t"]);
        router.exec(&[
            "nft",
            "add",
            "chain",
            "inet",
            "t",
            "f",
            "{ type filter hook forward priority 0; policy accept; }",
        ]);
        router.exec(&[
            "nft",
            "add",
            "rule",
            "inet",
            "t",
            "f",
            "ct",
            "state",
            "new,established",
            "accept",
        ]);
        Self {
            router,
            client,
            _endpoints: endpoints,
        }
    }
}

const PORTS: [u16; 5] = [5000, 5001, 5002, 51820, 60000];

#[test]
fn evicts_exactly_the_entries_of_one_endpoint_made_by_real_traffic() {
    skip_unless_able!();
    let lab = Lab::new();
    let a = v4("192.168.1.240");
    let b = v4("192.168.1.241");

    // Real UDP through the router: one source port per flow.
    lab.client.enter(|| {
        for port in PORTS {
            for dst in [a, b] {
                let socket = UdpSocket::bind("10.0.0.2:0").unwrap();
                socket.send_to(b"flowguard", (dst, port)).unwrap();
            }
        }
    });

    lab.router.enter(|| {
        let mut ct = Conntrack::open().expect("open ctnetlink in the router namespace");
        assert_kernel_filter_where_the_kernel_has_it(&ct);

        // Conntrack confirms each flow as it leaves the router.
        let (of_a, of_b) = Wait::new("the flows of .240 and .241", Duration::from_secs(5))
            .poll(
                || {
                    let of_a = ct.flows_involving(a).unwrap();
                    let of_b = ct.flows_involving(b).unwrap();
                    (of_a, of_b)
                },
                |(of_a, of_b)| of_a.len() >= PORTS.len() && of_b.len() >= PORTS.len(),
            )
            .unwrap_or_else(|timed_out| timed_out.last);
        assert_eq!(of_a.len(), PORTS.len(), "entries of .240: {of_a:#?}");
        assert_eq!(of_b.len(), PORTS.len(), "entries of .241: {of_b:#?}");
        for f in &of_a {
            assert_eq!(
                (f.orig.src, f.orig.dst, f.orig.proto),
                (v4("10.0.0.2"), a, 17)
            );
            assert_eq!((f.reply.src, f.reply.dst), (a, v4("10.0.0.2")));
            assert!(PORTS.contains(&f.orig.dst_port));
            assert!(!f.is_offloaded(), "{}", f.describe());
            assert!(f.id.is_some());
            println!("  {}", f.describe());
        }
        // Our decoder and conntrack-tools see the same table.
        assert_eq!(
            conntrack_tool_list(&lab.router),
            tool_view(&[of_a.clone(), of_b.clone()].concat())
        );
        // The user-space path agrees with the kernel-side one.
        ct.force_userspace_filter(true);
        assert_eq!(keys(&ct.flows_involving(a).unwrap()), keys(&of_a));
        ct.force_userspace_filter(false);

        // This kernel has no flowtable: nothing is offloaded, nothing goes.
        assert!(ct
            .evict(a, EvictScope::Offloaded, false)
            .unwrap()
            .is_empty());
        assert!(ct.evict(a, EvictScope::Off, false).unwrap().is_empty());
        assert_eq!(ct.flows_involving(a).unwrap().len(), PORTS.len());

        // A dry run names them and deletes nothing.
        let would = ct.evict(a, EvictScope::All, true).unwrap();
        assert_eq!(keys(&would), keys(&of_a));
        assert_eq!(keys(&ct.flows_involving(a).unwrap()), keys(&of_a));

        let evicted = ct.evict(a, EvictScope::All, false).unwrap();
        assert_eq!(keys(&evicted), keys(&of_a));
        assert!(ct.flows_involving(a).unwrap().is_empty());
        assert_eq!(keys(&ct.flows_involving(b).unwrap()), keys(&of_b));
        assert_eq!(conntrack_tool_list(&lab.router), tool_view(&of_b));

        // Already gone: a second delete is not an error.
        assert!(!ct.delete(&evicted[0]).unwrap());
        assert!(ct.evict(a, EvictScope::All, false).unwrap().is_empty());
    });
}

/// 1000 entries: IPv4 and IPv6, the target address in each of the four
/// positions (original source or destination, NAT-style reply source or
/// destination), neighbours that differ by a digit, TCP, UDP and ICMP.
fn table() -> Vec<Flow> {
    let t4 = v4("172.16.0.9");
    let t6 = v6("fd00::9");
    (0..1000u16)
        .map(|i| {
            let port = 10_000 + i;
            let c4 = IpAddr::V4(Ipv4Addr::new(10, 9, (i >> 8) as u8, i as u8));
            let c6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, i));
            let nat = |orig: Tuple, reply: Tuple| Flow {
                reply,
                ..Flow::unnatted(orig)
            };
            match i % 10 {
                0 => Flow::unnatted(Tuple::tcp(t4, port, v4("198.51.100.7"), 443)),
                1 => Flow::unnatted(Tuple::udp(c4, port, t4, 53)),
                // DNAT to the target: it only shows up as the reply source.
                2 => nat(
                    Tuple::udp(c4, port, v4("203.0.113.1"), 51820),
                    Tuple::udp(t4, 51820, c4, port),
                ),
                // SNAT of the target: it only shows up as the reply destination.
                3 => nat(
                    Tuple::tcp(v4("10.8.0.1"), port, v4("198.51.100.7"), 443),
                    Tuple::tcp(v4("198.51.100.7"), 443, t4, port),
                ),
                4 => Flow::unnatted(Tuple::udp(t6, port, c6, 4500)),
                5 => nat(
                    Tuple::tcp(c6, port, v6("2001:db8::1"), 443),
                    Tuple::tcp(t6, 443, c6, port),
                ),
                6 => Flow::unnatted(Tuple::udp(c4, port, v4("172.16.0.90"), 53)),
                7 => Flow::unnatted(Tuple::udp(c6, port, v6("fd00::90"), 53)),
                8 => Flow::unnatted(Tuple::icmp(c4, t4, port, 8, 0)),
                _ => Flow::unnatted(Tuple::tcp(c4, port, v4("198.51.100.9"), 80)),
            }
        })
        .map(|mut f| {
            // Asking for OFFLOAD must not make it so: the kernel keeps that
            // bit to itself.
            f.status = IPS_OFFLOAD;
            f
        })
        .collect()
}

/// The running kernel's (major, minor), from its release string.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("reading /proc/sys/kernel/osrelease");
    parse_kernel_release(&release)
        .unwrap_or_else(|| panic!("cannot read a version from the kernel release {release:?}"))
}

/// `6.18.44-fc-v669` → (6, 18).
fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
}

/// CTA_FILTER arrived in Linux 5.8: from there on the probe must find it,
/// or the kernel-filter path would silently fall back to the user-space
/// filter (and comparing both paths would compare the fallback with itself).
fn assert_kernel_filter_where_the_kernel_has_it(ct: &Conntrack) {
    let (major, minor) = kernel_version();
    let has_it = (major, minor) >= (5, 8);
    println!(
        "kernel {major}.{minor}; kernel-side dump filtering (CTA_FILTER): {}",
        ct.supports_kernel_filter()
    );
    if has_it {
        assert!(
            ct.supports_kernel_filter(),
            "kernel {major}.{minor} has CTA_FILTER (5.8+), but the probe did not find it: \
             flows_involving would filter in user space"
        );
    }
}

#[test]
fn kernel_releases_parse() {
    assert_eq!(parse_kernel_release("6.18.44-fc-v669\n"), Some((6, 18)));
    assert_eq!(parse_kernel_release("5.8.0"), Some((5, 8)));
    assert_eq!(parse_kernel_release("6.1.0-31-amd64"), Some((6, 1)));
    assert_eq!(parse_kernel_release("7.2"), Some((7, 2)));
    assert_eq!(parse_kernel_release("garbage"), None);
}

#[test]
fn kernel_filter_and_fallback_agree_on_a_thousand_inserted_entries() {
    skip_unless_able!();
    let ns = Netns::new("i");
    let flows = table();
    ns.enter(|| {
        let mut ct = Conntrack::open().expect("open ctnetlink");
        assert_kernel_filter_where_the_kernel_has_it(&ct);
        let started = Instant::now();
        for f in &flows {
            ct.insert(f, 300).unwrap_or_else(|e| panic!("insert {}: {e}", f.describe()));
        }
        println!("inserted {} entries in {:?}", flows.len(), started.elapsed());
        match ct.insert(&flows[0], 300) {
            Err(ConntrackError::Kernel { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EEXIST))
            }
            other => panic!("a duplicate insert must fail with EEXIST: {other:?}"),
        }
        let all = ct.all_flows().unwrap();
        assert_eq!(all.len(), flows.len());
        assert_eq!(keys(&all), keys(&flows));
        assert!(all.iter().all(|f| !f.is_offloaded()), "userspace cannot set OFFLOAD");

        for target in ["172.16.0.9", "fd00::9", "172.16.0.90", "fd00::90", "192.0.2.1"] {
            let ip: IpAddr = target.parse().unwrap();
            let expected: Vec<Flow> = flows.iter().filter(|f| f.involves(ip)).cloned().collect();
            ct.force_userspace_filter(false);
            let started = Instant::now();
            let kernel = ct.flows_involving(ip).unwrap();
            let kernel_time = started.elapsed();
            ct.force_userspace_filter(true);
            let started = Instant::now();
            let fallback = ct.flows_involving(ip).unwrap();
            let fallback_time = started.elapsed();
            println!(
                "{target}: {} entries; default path {kernel_time:?}, user-space filter {fallback_time:?}",
                kernel.len()
            );
            assert_eq!(keys(&kernel), keys(&fallback), "{target}");
            assert_eq!(keys(&kernel), keys(&expected), "{target}");
        }
        ct.force_userspace_filter(false);
        assert_eq!(ct.flows_involving(v4("172.16.0.9")).unwrap().len(), 500);

        // A delete whose id no longer matches leaves the entry alone.
        let victim = ct.flows_involving(v4("10.9.0.1")).unwrap();
        assert_eq!(victim.len(), 1);
        let mut stale = victim[0].clone();
        stale.id = stale.id.map(|id| id.wrapping_add(1));
        assert!(!ct.delete(&stale).unwrap());
        assert_eq!(ct.flows_involving(v4("10.9.0.1")).unwrap().len(), 1);

        // Evicting one endpoint removes its entries and nothing else.
        let t6 = v6("fd00::9");
        let of_t6 = ct.flows_involving(t6).unwrap();
        assert_eq!(of_t6.len(), 200);
        assert!(ct.evict(t6, EvictScope::Offloaded, false).unwrap().is_empty());
        assert_eq!(keys(&ct.evict(t6, EvictScope::All, true).unwrap()), keys(&of_t6));
        assert_eq!(keys(&ct.evict(t6, EvictScope::All, false).unwrap()), keys(&of_t6));
        assert!(ct.flows_involving(t6).unwrap().is_empty());
        let left = ct.all_flows().unwrap();
        assert_eq!(left.len(), flows.len() - of_t6.len());
        assert!(left.iter().all(|f| !f.involves(t6)));
    });
}

#[test]
fn open_outside_root_fails_with_a_clear_error() {
    // Runs as anyone: either conntrack opens, or the error says why not.
    match Conntrack::open() {
        Ok(ct) => println!(
            "ctnetlink usable here; CTA_FILTER: {}",
            ct.supports_kernel_filter()
        ),
        Err(e) => {
            let text = e.to_string();
            println!("{text}");
            assert!(
                text.contains("CAP_NET_ADMIN") || text.contains("not available"),
                "{text}"
            );
        }
    }
}
