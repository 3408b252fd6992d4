//! What the operator tells flowguard: prefixes, MAC addresses, static
//! endpoints and the mode, parsed with errors that name the bad input, and
//! turned into the kernel side's `Config`.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use flowguard_common::{
    mode, Config, EndpointKey, OwnMac, V4Place, V4Prefix, V6Prefix, MAX_ARRAY_PREFIX_ADDRS,
    MAX_ARRAY_SLOTS, MAX_V4_PREFIXES, MAX_V6_PREFIXES,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error(
        "bad prefix '{0}': expected ADDRESS/LENGTH, e.g. 192.168.1.0/24 or fd00::/64, or auto"
    )]
    PrefixSyntax(String),
    #[error("bad prefix '{input}': the length must be at most {max}")]
    PrefixLength { input: String, max: u8 },
    #[error("bad MAC address '{0}': expected six hex bytes, e.g. 3a:ea:10:f9:a1:2e")]
    Mac(String),
    #[error(
        "bad MAC address '{0}': a multicast, broadcast or all-zero MAC cannot be an endpoint's"
    )]
    MacNotUnicast(String),
    #[error("bad static entry '{0}': expected IP=MAC, e.g. 192.168.1.240=3a:ea:10:f9:a1:2e")]
    StaticSyntax(String),
    #[error("static entry {0} is outside every --prefix: add a prefix that covers it")]
    StaticOutsidePrefixes(IpAddr),
    #[error("too many {family} prefixes: {given} given, at most {max}")]
    TooManyPrefixes {
        family: &'static str,
        given: usize,
        max: usize,
    },
    #[error("at least one --prefix is needed: flowguard only watches endpoints inside them")]
    NoPrefix,
    #[error("--{option} {iface} is given twice: name each interface once")]
    RepeatedInterface { option: &'static str, iface: String },
    #[error("--prefix {0} covers every address: every destination, the internet's too, would be an endpoint candidate; give the LAN's prefixes instead")]
    EveryAddress(Prefix),
    #[error("--static gives {ip} two MACs, {first} and {second}: give each endpoint once")]
    StaticConflict { ip: IpAddr, first: Mac, second: Mac },
    #[error("{given} --static endpoints go to the endpoint hash map, which holds {size}: raise --max-endpoints")]
    TooManyStatics { given: usize, size: u32 },
    #[error("--{option} {iface}: {why}")]
    WrongInterfaceKind {
        option: &'static str,
        iface: String,
        why: &'static str,
    },
}

/// A network prefix, normalised so that the host bits are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Whether every address of `other` is in this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = v4_mask(self.len);
                u32::from(a) & mask == u32::from(p)
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = v6_mask(self.len);
                u128::from(a) & mask == u128::from(p)
            }
            _ => false,
        }
    }
}

fn v4_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

fn v6_mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len as u32)
    }
}

impl FromStr for Prefix {
    type Err = SettingsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || SettingsError::PrefixSyntax(s.to_string());
        let (addr, len) = s.split_once('/').ok_or_else(syntax)?;
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u16 = len.parse().map_err(|_| syntax())?;
        if len > max as u16 {
            return Err(SettingsError::PrefixLength {
                input: s.to_string(),
                max,
            });
        }
        let len = len as u8;
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & v4_mask(len)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & v6_mask(len)).into()),
        };
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A `--prefix` as given: a prefix, or `auto` (the prefixes of the bridges
/// whose ports are guarded, read at start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixArg {
    Auto,
    Given(Prefix),
}

impl FromStr for PrefixArg {
    type Err = SettingsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            _ => s.parse().map(Self::Given),
        }
    }
}

/// Prefixes without repeats: one inside another is dropped (a note says
/// so), as the outer one watches its addresses already. A `/0` is refused:
/// flowguard is for the LAN, and a `/0` makes every frame an endpoint
/// lookup and every neighbour (the upstream gateway too) an endpoint.
pub fn merge_prefixes(given: &[Prefix]) -> Result<(Vec<Prefix>, Vec<String>), SettingsError> {
    let mut kept: Vec<Prefix> = Vec::new();
    let mut notes = Vec::new();
    for p in given {
        if p.len == 0 {
            return Err(SettingsError::EveryAddress(*p));
        }
        if let Some(outer) = kept.iter().find(|q| q.covers(p)) {
            notes.push(if outer == p {
                format!("--prefix {p} is given twice: watching it once")
            } else {
                format!("--prefix {p} is inside {outer}: watching {outer} once")
            });
            continue;
        }
        for inner in kept.iter().filter(|q| p.covers(q)) {
            notes.push(format!("--prefix {inner} is inside {p}: watching {p} once"));
        }
        kept.retain(|q| !p.covers(q));
        kept.push(*p);
    }
    Ok((kept, notes))
}

/// The `--static` endpoints, each once: refused when one lies outside every
/// prefix, when one address is given two MACs, or when they cannot all fit
/// in an endpoint map of `capacity` entries.
pub fn check_statics(
    given: &[StaticEndpoint],
    prefixes: &[Prefix],
    placement: &Config,
    capacity: u32,
) -> Result<Vec<StaticEndpoint>, SettingsError> {
    let mut seen: std::collections::HashMap<EndpointKey, Mac> = Default::default();
    let mut kept = Vec::with_capacity(given.len());
    for s in given {
        if !prefixes.iter().any(|p| p.contains(s.ip)) {
            return Err(SettingsError::StaticOutsidePrefixes(s.ip));
        }
        match seen.insert(endpoint_key(s.ip), s.mac) {
            Some(first) if first != s.mac => {
                return Err(SettingsError::StaticConflict {
                    ip: s.ip,
                    first,
                    second: s.mac,
                })
            }
            Some(_) => {}
            None => kept.push(*s),
        }
    }
    // Only the hash map can be full: IPv4 endpoints of the array's
    // prefixes have a slot each.
    let hashed = kept
        .iter()
        .filter(|s| !has_array_slot(placement, s.ip))
        .count();
    if hashed > capacity as usize {
        return Err(SettingsError::TooManyStatics {
            given: hashed,
            size: capacity,
        });
    }
    Ok(kept)
}

/// Whether `ip`'s endpoint has a slot in the direct-indexed array under
/// the prefixes of `cfg` (else it goes to the hash map).
pub fn has_array_slot(cfg: &Config, ip: IpAddr) -> bool {
    let key = endpoint_key(ip);
    key.is_v4() && matches!(cfg.v4_place(key.addr[3]), V4Place::Slot(_))
}

/// Refuses an interface named twice for the same hook: it would be attached
/// twice, which the kernel refuses half-way through.
pub fn check_no_repeats(option: &'static str, ifaces: &[String]) -> Result<(), SettingsError> {
    for (i, iface) in ifaces.iter().enumerate() {
        if ifaces[..i].contains(iface) {
            return Err(SettingsError::RepeatedInterface {
                option,
                iface: iface.clone(),
            });
        }
    }
    Ok(())
}

/// What an interface is, as far as guarding it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// Carries Ethernet frames and is not a bridge device: can be guarded.
    Ethernet,
    /// A loopback device.
    Loopback,
    /// Carries no Ethernet header (tun, WireGuard, ...).
    NotEthernet,
    /// A bridge device (its ports are where frames leave).
    Bridge,
}

/// Refuses an interface the guard cannot work on, saying why.
pub fn check_link_kind(
    option: &'static str,
    iface: &str,
    kind: LinkKind,
) -> Result<(), SettingsError> {
    let why = match (kind, option) {
        (LinkKind::Ethernet, _) => return Ok(()),
        (LinkKind::Loopback, _) => {
            "a loopback device carries no Ethernet frames, so no MAC can be stale there"
        }
        (LinkKind::NotEthernet, _) => {
            "it carries no Ethernet frames, so no MAC can be stale there"
        }
        (LinkKind::Bridge, "ingress") => {
            "a bridge device sees only the frames its bridge delivers to this host: guard the port the frames arrive on"
        }
        (LinkKind::Bridge, _) => {
            "a bridge device is not where the flowtable transmits: guard its ports (--egress PORT), or say --auto"
        }
    };
    Err(SettingsError::WrongInterfaceKind {
        option,
        iface: iface.to_string(),
        why,
    })
}

/// A list for one log line: all of it when short, else its length, the
/// first few and "…".
pub fn summarize(items: &[String], shown: usize) -> String {
    if items.len() <= shown {
        return items.join(", ");
    }
    format!("{} in all: {}, …", items.len(), items[..shown].join(", "))
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl FromStr for Mac {
    type Err = SettingsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SettingsError::Mac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || p.len() > 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An endpoint whose MAC the operator states: `IP=MAC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticEndpoint {
    pub ip: IpAddr,
    pub mac: Mac,
}

impl FromStr for StaticEndpoint {
    type Err = SettingsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, mac) = s
            .split_once('=')
            .ok_or_else(|| SettingsError::StaticSyntax(s.to_string()))?;
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| SettingsError::StaticSyntax(s.to_string()))?;
        let mac: Mac = mac.trim().parse()?;
        if !mac.is_unicast() {
            return Err(SettingsError::MacNotUnicast(mac.to_string()));
        }
        Ok(Self { ip, mac })
    }
}

/// The endpoint map key of an address.
pub fn endpoint_key(ip: IpAddr) -> EndpointKey {
    match ip {
        IpAddr::V4(a) => EndpointKey::from_v4_bytes(a.octets()),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            // An IPv4-mapped IPv6 address is the same endpoint as the IPv4 one.
            Some(v4) => EndpointKey::from_v4_bytes(v4.octets()),
            None => EndpointKey::from_v6_bytes(a.octets()),
        },
    }
}

/// The address an endpoint map key stands for.
pub fn key_ip(key: &EndpointKey) -> IpAddr {
    let b = key.bytes();
    if key.is_v4() {
        IpAddr::from([b[12], b[13], b[14], b[15]])
    } else {
        IpAddr::from(b)
    }
}

/// Guard mode, as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Rewrite the destination MAC of stale frames.
    Fix,
    /// Count and report stale frames, change nothing.
    Observe,
}

impl Mode {
    pub fn as_config(self) -> u32 {
        match self {
            Mode::Fix => mode::FIX,
            Mode::Observe => mode::OBSERVE,
        }
    }

    pub fn from_config(value: u32) -> &'static str {
        if value == mode::FIX {
            "fix"
        } else {
            "observe"
        }
    }
}

/// `d` in jiffies of a kernel ticking `hz` times a second, rounded up (a
/// non-zero interval never becomes zero, which would mean "no limit").
pub fn interval_jiffies(d: Duration, hz: u32) -> u64 {
    let j = (d.as_nanos() * hz as u128).div_ceil(1_000_000_000);
    j.min(u64::MAX as u128) as u64
}

/// Slots a direct-indexed IPv4 prefix of this length needs, if it is small
/// enough for the array.
fn array_slots(len: u8) -> Option<u32> {
    let addrs = 1u64 << (32 - u32::from(len.min(32)));
    (addrs <= u64::from(MAX_ARRAY_PREFIX_ADDRS)).then_some(addrs as u32)
}

/// Sentences for the operator about IPv4 prefixes whose endpoints are kept
/// in the hash map rather than the direct-indexed array (each frame to them
/// costs a hash lookup): one per such prefix of `cfg`.
pub fn hash_path_notes(cfg: &Config) -> Vec<String> {
    let mut notes = Vec::new();
    let mut used = 0u64;
    for p in &cfg.v4[..(cfg.v4_count as usize).min(MAX_V4_PREFIXES)] {
        let len = u32::from_be(p.mask).count_ones();
        let prefix = format!("{}/{len}", std::net::Ipv4Addr::from(p.addr.to_ne_bytes()));
        if p.slots != 0 {
            used += u64::from(p.slots);
            continue;
        }
        let why = if array_slots(len as u8).is_none() {
            format!(
                "it is larger than {MAX_ARRAY_PREFIX_ADDRS} addresses (a /20), the largest \
                 prefix kept in the direct-indexed array"
            )
        } else {
            format!(
                "the direct-indexed array has room for {MAX_ARRAY_SLOTS} addresses in all, \
                 {used} of them taken by the prefixes before it"
            )
        };
        notes.push(format!(
            "prefix {prefix}: its endpoints are kept in the hash map, because {why}; frames to \
             it cost a hash lookup (split it into /20s or smaller to index them directly)"
        ));
    }
    notes
}

/// Builds the kernel side's settings (the event interval is set by the
/// loader, which knows the kernel's HZ).
pub fn build_config(mode: Mode, prefixes: &[Prefix]) -> Result<Config, SettingsError> {
    if prefixes.is_empty() {
        return Err(SettingsError::NoPrefix);
    }
    let mut cfg = Config {
        mode: mode.as_config(),
        ..Config::default()
    };
    let v4: Vec<_> = prefixes.iter().filter(|p| p.addr.is_ipv4()).collect();
    let v6: Vec<_> = prefixes.iter().filter(|p| p.addr.is_ipv6()).collect();
    if v4.len() > MAX_V4_PREFIXES {
        return Err(SettingsError::TooManyPrefixes {
            family: "IPv4",
            given: v4.len(),
            max: MAX_V4_PREFIXES,
        });
    }
    if v6.len() > MAX_V6_PREFIXES {
        return Err(SettingsError::TooManyPrefixes {
            family: "IPv6",
            given: v6.len(),
            max: MAX_V6_PREFIXES,
        });
    }
    let mut used = 0;
    for (slot, p) in cfg.v4.iter_mut().zip(&v4) {
        let IpAddr::V4(a) = p.addr else {
            unreachable!()
        };
        let slots = match array_slots(p.len) {
            Some(n) if used + n <= MAX_ARRAY_SLOTS => n,
            _ => 0,
        };
        *slot = V4Prefix {
            addr: u32::from_ne_bytes(a.octets()),
            mask: u32::from_ne_bytes(v4_mask(p.len).to_be_bytes()),
            slot_base: if slots == 0 { 0 } else { used },
            slots,
        };
        used += slots;
    }
    for (slot, p) in cfg.v6.iter_mut().zip(&v6) {
        let IpAddr::V6(a) = p.addr else {
            unreachable!()
        };
        let mask = EndpointKey::from_v6_bytes(v6_mask(p.len).to_be_bytes());
        *slot = V6Prefix {
            addr: EndpointKey::from_v6_bytes(a.octets()).addr,
            mask: mask.addr,
        };
    }
    cfg.v4_count = v4.len() as u32;
    cfg.v6_count = v6.len() as u32;
    Ok(cfg)
}

/// Writes the router's own MACs into the kernel side's settings (frames
/// from them are never learned). The caller refuses more than
/// [`flowguard_common::MAX_OWN_MACS`]: the ones past it are not written.
pub fn set_own_macs(cfg: &mut Config, own: &[Mac]) {
    cfg.own_mac_count = 0;
    for (slot, m) in cfg.own_macs.iter_mut().zip(own) {
        *slot = OwnMac {
            mac: m.0,
            _pad: [0; 2],
        };
        cfg.own_mac_count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_normalise() {
        let p: Prefix = "192.168.1.77/24".parse().unwrap();
        assert_eq!(p.to_string(), "192.168.1.0/24");
        assert!(p.contains("192.168.1.240".parse().unwrap()));
        assert!(!p.contains("192.168.2.1".parse().unwrap()));
        assert!(!p.contains("fd00::1".parse().unwrap()));
        let p: Prefix = "fd00:1::5/64".parse().unwrap();
        assert_eq!(p.to_string(), "fd00:1::/64");
        assert!(p.contains("fd00:1::abcd".parse().unwrap()));
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn bad_prefixes_are_rejected_with_the_input_named() {
        for bad in [
            "192.168.1.0",
            "192.168.1.0/",
            "192.168.1.0/+4",
            "192.168.1/24",
            "x/24",
            "fd00::/abc",
        ] {
            let e = bad.parse::<Prefix>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert_eq!(
            "192.168.1.0/33".parse::<Prefix>().unwrap_err(),
            SettingsError::PrefixLength {
                input: "192.168.1.0/33".into(),
                max: 32
            }
        );
        assert!("fd00::/129".parse::<Prefix>().is_err());
    }

    #[test]
    fn macs_parse_and_print() {
        let m: Mac = "3A:ea:10:f9:a1:2e".parse().unwrap();
        assert_eq!(m.0, [0x3a, 0xea, 0x10, 0xf9, 0xa1, 0x2e]);
        assert_eq!(m.to_string(), "3a:ea:10:f9:a1:2e");
        assert_eq!("3a-ea-10-f9-a1-2e".parse::<Mac>().unwrap(), m);
        for bad in [
            "",
            "3a:ea:10:f9:a1",
            "3a:ea:10:f9:a1:2e:00",
            "3a:ea:10:f9:a1:zz",
            "3a:ea:10:f9:a1:123",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn static_entries() {
        let s: StaticEndpoint = "192.168.1.240=3a:ea:10:f9:a1:2e".parse().unwrap();
        assert_eq!(s.ip, "192.168.1.240".parse::<IpAddr>().unwrap());
        assert!(matches!(
            "192.168.1.240".parse::<StaticEndpoint>(),
            Err(SettingsError::StaticSyntax(_))
        ));
        assert!(matches!(
            "192.168.1.240=ff:ff:ff:ff:ff:ff".parse::<StaticEndpoint>(),
            Err(SettingsError::MacNotUnicast(_))
        ));
        assert!(matches!(
            "192.168.1.240=3a:ea".parse::<StaticEndpoint>(),
            Err(SettingsError::Mac(_))
        ));
    }

    #[test]
    fn keys_roundtrip_and_v4_mapped_is_v4() {
        for ip in ["192.168.1.240", "fd00::1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(key_ip(&endpoint_key(ip)), ip);
        }
        assert_eq!(
            endpoint_key("::ffff:192.168.1.240".parse().unwrap()),
            endpoint_key("192.168.1.240".parse().unwrap())
        );
    }

    #[test]
    fn config_words_match_packet_bytes() {
        let prefixes: Vec<Prefix> = vec![
            "192.168.1.0/24".parse().unwrap(),
            "fd00::/16".parse().unwrap(),
        ];
        let own = [Mac([2, 0, 0, 0, 0, 1])];
        let mut cfg = build_config(Mode::Fix, &prefixes).unwrap();
        set_own_macs(&mut cfg, &own);
        assert_eq!(cfg.mode, mode::FIX);
        assert_eq!((cfg.v4_count, cfg.v6_count, cfg.own_mac_count), (1, 1, 1));
        // The kernel side compares native loads of packet bytes.
        let dst = u32::from_ne_bytes([192, 168, 1, 240]);
        assert_eq!(dst & cfg.v4[0].mask, cfg.v4[0].addr);
        let other = u32::from_ne_bytes([192, 168, 2, 240]);
        assert_ne!(other & cfg.v4[0].mask, cfg.v4[0].addr);
        let v6 =
            EndpointKey::from_v6_bytes("fd00:1::9".parse::<std::net::Ipv6Addr>().unwrap().octets());
        for i in 0..4 {
            assert_eq!(v6.addr[i] & cfg.v6[0].mask[i], cfg.v6[0].addr[i]);
        }
    }

    #[test]
    fn small_ipv4_prefixes_are_indexed_and_large_ones_hashed() {
        let prefixes: Vec<Prefix> = [
            "192.168.1.0/24",
            "10.0.0.0/16",
            "172.16.0.0/20",
            "172.17.0.0/20",
            "172.18.0.0/20",
            "172.19.0.0/20",
            "172.20.0.0/30",
        ]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
        let cfg = build_config(Mode::Fix, &prefixes).unwrap();
        let placed: Vec<(u32, u32)> = cfg.v4[..7].iter().map(|p| (p.slot_base, p.slots)).collect();
        // The fourth /20 would pass the 16,384 slots: hashed, and the /30
        // after it still fits.
        assert_eq!(
            placed,
            [
                (0, 256),
                (0, 0),
                (256, 4096),
                (4352, 4096),
                (8448, 4096),
                (0, 0),
                (12544, 4)
            ]
        );
        assert_eq!(cfg.v4_slots(), 12548);
        let notes = hash_path_notes(&cfg);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("prefix 10.0.0.0/16:"), "{}", notes[0]);
        assert!(notes[0].contains("larger than 4096"), "{}", notes[0]);
        assert!(
            notes[1].starts_with("prefix 172.19.0.0/20:"),
            "{}",
            notes[1]
        );
        assert!(notes[1].contains("12544 of them taken"), "{}", notes[1]);
    }

    #[test]
    fn intervals_in_jiffies_round_up() {
        assert_eq!(interval_jiffies(Duration::from_secs(1), 250), 250);
        assert_eq!(interval_jiffies(Duration::from_millis(1500), 1000), 1500);
        assert_eq!(
            interval_jiffies(Duration::from_millis(1), 100),
            1,
            "never rounds to 0"
        );
        assert_eq!(interval_jiffies(Duration::ZERO, 250), 0);
    }

    #[test]
    fn repeated_and_nested_prefixes_merge_with_a_note() {
        let given: Vec<Prefix> = ["10.0.1.0/24", "10.0.0.0/16", "10.0.0.0/16", "fd00::/64"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let (kept, notes) = merge_prefixes(&given).unwrap();
        let kept: Vec<String> = kept.iter().map(Prefix::to_string).collect();
        assert_eq!(kept, ["10.0.0.0/16", "fd00::/64"]);
        assert_eq!(
            notes,
            [
                "--prefix 10.0.1.0/24 is inside 10.0.0.0/16: watching 10.0.0.0/16 once",
                "--prefix 10.0.0.0/16 is given twice: watching it once",
            ]
        );
        for every in ["0.0.0.0/0", "::/0"] {
            let e = merge_prefixes(&[every.parse().unwrap()]).unwrap_err();
            assert_eq!(e, SettingsError::EveryAddress(every.parse().unwrap()));
        }
    }

    #[test]
    fn statics_are_kept_once_and_conflicts_refused() {
        let prefixes = ["10.0.0.0/8".parse().unwrap()];
        let placed = build_config(Mode::Fix, &prefixes).unwrap();
        let s = |t: &str| t.parse::<StaticEndpoint>().unwrap();
        let kept = check_statics(
            &[
                s("10.0.0.1=02:00:00:00:00:01"),
                s("10.0.0.1=02:00:00:00:00:01"),
            ],
            &prefixes,
            &placed,
            1,
        )
        .unwrap();
        assert_eq!(kept.len(), 1, "the same entry twice is one endpoint");
        assert!(matches!(
            check_statics(
                &[
                    s("10.0.0.1=02:00:00:00:00:01"),
                    s("10.0.0.1=02:00:00:00:00:02")
                ],
                &prefixes,
                &placed,
                9,
            ),
            Err(SettingsError::StaticConflict { .. })
        ));
        assert_eq!(
            check_statics(&[s("192.168.0.1=02:00:00:00:00:01")], &prefixes, &placed, 9)
                .unwrap_err(),
            SettingsError::StaticOutsidePrefixes("192.168.0.1".parse().unwrap())
        );
    }

    #[test]
    fn only_statics_bound_for_the_hash_map_count_against_its_size() {
        let s = |t: &str| t.parse::<StaticEndpoint>().unwrap();
        let three = [
            s("192.168.1.1=02:00:00:00:00:01"),
            s("192.168.1.2=02:00:00:00:00:02"),
            s("192.168.1.3=02:00:00:00:00:03"),
        ];
        // A /24 is direct-indexed: a slot each, whatever the hash map holds.
        let small = ["192.168.1.0/24".parse().unwrap()];
        let placed = build_config(Mode::Fix, &small).unwrap();
        assert_eq!(check_statics(&three, &small, &placed, 2).unwrap().len(), 3);
        // A /16 keeps its endpoints in the hash map.
        let large = ["192.168.0.0/16".parse().unwrap()];
        assert_eq!(
            check_statics(&three, &large, &build_config(Mode::Fix, &large).unwrap(), 2)
                .unwrap_err(),
            SettingsError::TooManyStatics { given: 3, size: 2 }
        );
    }

    #[test]
    fn long_lists_are_summarized() {
        let items: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
        assert_eq!(summarize(&items, 3), "10000 in all: 0, 1, 2, …");
        assert_eq!(summarize(&items[..3], 3), "0, 1, 2");
    }

    #[test]
    fn config_limits() {
        assert_eq!(
            build_config(Mode::Fix, &[]).unwrap_err(),
            SettingsError::NoPrefix
        );
        let many: Vec<Prefix> = (0..=MAX_V4_PREFIXES)
            .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
            .collect();
        assert!(matches!(
            build_config(Mode::Fix, &many),
            Err(SettingsError::TooManyPrefixes { .. })
        ));
    }
}
