//! Reads the nftables flowtables and the interfaces behind them, to find the
//! devices where a flowtable caches destination MACs: the bridge ports.
//! Uses `nft -j` and `ip -j -d link`, which answer for the current network
//! namespace (sysfs might show another one's).

use std::process::Command;

use serde_json::Value;

use crate::settings::Prefix;

#[derive(Debug, thiserror::Error)]
pub enum FlowtableError {
    #[error("running `{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("cannot read the output of `{cmd}`: {detail}")]
    Parse { cmd: String, detail: String },
    #[error("the nftables ruleset has no flowtable: nothing caches MACs here, so there is nothing to guard")]
    NoFlowtable,
    #[error("no flowtable device is a bridge port ({0}): with bridge devices or plain ports the kernel resolves neighbours per packet and caches no MAC; attach with --egress if you know better")]
    NoBridgePort(String),
    #[error("--prefix auto takes the LAN prefixes from the bridges whose ports are guarded, and none of {0} is a bridge port: give --prefix CIDR")]
    AutoPrefixNoBridge(String),
    #[error("--prefix auto: {0} has no IPv4 or IPv6 address of global scope to take a prefix from: give --prefix CIDR")]
    AutoPrefixNoAddress(String),
}

/// One flowtable of the ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flowtable {
    pub family: String,
    pub table: String,
    pub name: String,
    pub devices: Vec<String>,
    /// `flags offload`: hardware offload, which the router's CPU never sees.
    pub hw_offload: bool,
}

/// A flowtable device and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRole {
    pub name: String,
    /// The bridge this device is a port of.
    pub bridge_port_of: Option<String>,
    pub is_bridge: bool,
}

fn run_json(program: &str, args: &[&str]) -> Result<Value, FlowtableError> {
    let cmd = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| FlowtableError::Command {
            cmd: cmd.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(FlowtableError::Command {
            cmd,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).map_err(|e| FlowtableError::Parse {
        cmd,
        detail: e.to_string(),
    })
}

/// Parses `nft -j list flowtables`.
pub fn parse_flowtables(v: &Value) -> Vec<Flowtable> {
    let Some(items) = v.get("nftables").and_then(Value::as_array) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| item.get("flowtable"))
        .map(|ft| {
            let s = |k: &str| ft.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let devices = match ft.get("dev") {
                Some(Value::String(d)) => vec![d.clone()],
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
                _ => Vec::new(),
            };
            let hw_offload = match ft.get("flags") {
                Some(Value::String(f)) => f == "offload",
                Some(Value::Array(a)) => a.iter().any(|f| f.as_str() == Some("offload")),
                _ => false,
            };
            Flowtable {
                family: s("family"),
                table: s("table"),
                name: s("name"),
                devices,
                hw_offload,
            }
        })
        .collect()
}

/// Parses one element of `ip -j -d link show DEV`.
pub fn parse_device(name: &str, v: &Value) -> DeviceRole {
    let link = v.as_array().and_then(|a| a.first()).unwrap_or(v);
    let info = link.get("linkinfo");
    let slave_kind = info
        .and_then(|i| i.get("info_slave_kind"))
        .and_then(Value::as_str);
    let kind = info
        .and_then(|i| i.get("info_kind"))
        .and_then(Value::as_str);
    let master = link.get("master").and_then(Value::as_str);
    DeviceRole {
        name: name.to_string(),
        bridge_port_of: (slave_kind == Some("bridge")).then(|| master.unwrap_or("?").to_string()),
        is_bridge: kind == Some("bridge"),
    }
}

/// The flowtables of the current network namespace.
pub fn flowtables() -> Result<Vec<Flowtable>, FlowtableError> {
    Ok(parse_flowtables(&run_json(
        "nft",
        &["-j", "list", "flowtables"],
    )?))
}

/// What a flowtable device is.
pub fn device_role(name: &str) -> Result<DeviceRole, FlowtableError> {
    Ok(parse_device(
        name,
        &run_json("ip", &["-j", "-d", "link", "show", "dev", name])?,
    ))
}

/// The devices `--auto` attaches to: every flowtable device that is a bridge port.
pub fn bridge_port_devices(
    tables: &[Flowtable],
    roles: &[DeviceRole],
) -> Result<Vec<String>, FlowtableError> {
    if tables.is_empty() {
        return Err(FlowtableError::NoFlowtable);
    }
    let mut ports: Vec<String> = roles
        .iter()
        .filter(|r| r.bridge_port_of.is_some())
        .map(|r| r.name.clone())
        .collect();
    ports.sort();
    ports.dedup();
    if ports.is_empty() {
        let all: Vec<String> = roles
            .iter()
            .map(|r| {
                if r.is_bridge {
                    format!("{} is a bridge", r.name)
                } else {
                    format!("{} is not a bridge port", r.name)
                }
            })
            .collect();
        return Err(FlowtableError::NoBridgePort(all.join(", ")));
    }
    Ok(ports)
}

/// The networks of the addresses in `ip -j addr show dev DEV`: each IPv4
/// and IPv6 address of global scope (a ULA too) with its prefix length.
/// Link- and host-scope addresses and single-address prefixes (/32, /128)
/// name no LAN.
pub fn parse_prefixes(v: &Value) -> Vec<Prefix> {
    let Some(links) = v.as_array() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for info in links
        .iter()
        .filter_map(|l| l.get("addr_info").and_then(Value::as_array))
        .flatten()
    {
        if info.get("scope").and_then(Value::as_str) != Some("global") {
            continue;
        }
        let (Some(local), Some(len)) = (
            info.get("local").and_then(Value::as_str),
            info.get("prefixlen").and_then(Value::as_u64),
        ) else {
            continue;
        };
        let Ok(prefix) = format!("{local}/{len}").parse::<Prefix>() else {
            continue;
        };
        let host = if prefix.addr.is_ipv4() { 32 } else { 128 };
        if prefix.len < host && !found.contains(&prefix) {
            found.push(prefix);
        }
    }
    found
}

/// `--prefix auto`: the bridges that `ports` belong to, and the prefixes of
/// their addresses (read once, at start).
pub fn bridge_prefixes(ports: &[String]) -> Result<(Vec<String>, Vec<Prefix>), FlowtableError> {
    let mut bridges: Vec<String> = Vec::new();
    for port in ports {
        if let Some(bridge) = device_role(port)?.bridge_port_of {
            if !bridges.contains(&bridge) {
                bridges.push(bridge);
            }
        }
    }
    if bridges.is_empty() {
        return Err(FlowtableError::AutoPrefixNoBridge(ports.join(", ")));
    }
    let mut prefixes = Vec::new();
    for bridge in &bridges {
        for p in parse_prefixes(&run_json("ip", &["-j", "addr", "show", "dev", bridge])?) {
            if !prefixes.contains(&p) {
                prefixes.push(p);
            }
        }
    }
    if prefixes.is_empty() {
        return Err(FlowtableError::AutoPrefixNoAddress(bridges.join(", ")));
    }
    Ok((bridges, prefixes))
}

/// Reads the ruleset and the interfaces: the devices to attach tc egress to.
pub fn auto_devices() -> Result<Vec<String>, FlowtableError> {
    let tables = flowtables()?;
    let mut names: Vec<&String> = tables.iter().flat_map(|t| &t.devices).collect();
    names.sort();
    names.dedup();
    let roles = names
        .into_iter()
        .map(|n| device_role(n))
        .collect::<Result<Vec<_>, _>>()?;
    bridge_port_devices(&tables, &roles)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parses_flowtables_with_one_or_many_devices() {
        let v = json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"flowtable": {"family": "inet", "name": "ft", "table": "fw4", "handle": 3,
                           "hook": "ingress", "prio": 0, "dev": ["wan", "lan1"]}},
            {"flowtable": {"family": "ip", "name": "hw", "table": "t", "dev": "lan2",
                           "flags": ["offload"]}}
        ]});
        let t = parse_flowtables(&v);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].devices, ["wan", "lan1"]);
        assert!(!t[0].hw_offload);
        assert_eq!(t[1].devices, ["lan2"]);
        assert!(t[1].hw_offload);
        assert!(parse_flowtables(&Value::Null).is_empty());
    }

    #[test]
    fn recognises_bridge_ports_and_bridges() {
        let port = json!([{"ifname": "lan1", "master": "br-lan",
                           "linkinfo": {"info_kind": "veth", "info_slave_kind": "bridge"}}]);
        let r = parse_device("lan1", &port);
        assert_eq!(r.bridge_port_of.as_deref(), Some("br-lan"));
        let br = json!([{"ifname": "br-lan", "linkinfo": {"info_kind": "bridge"}}]);
        let r = parse_device("br-lan", &br);
        assert!(r.is_bridge && r.bridge_port_of.is_none());
        let plain = json!([{"ifname": "wan"}]);
        assert_eq!(parse_device("wan", &plain).bridge_port_of, None);
    }

    #[test]
    fn auto_picks_bridge_ports_or_says_why_not() {
        let tables = vec![Flowtable {
            family: "inet".into(),
            table: "t".into(),
            name: "ft".into(),
            devices: vec!["wan".into(), "lan1".into()],
            hw_offload: false,
        }];
        let roles = vec![
            DeviceRole {
                name: "wan".into(),
                bridge_port_of: None,
                is_bridge: false,
            },
            DeviceRole {
                name: "lan1".into(),
                bridge_port_of: Some("br-lan".into()),
                is_bridge: false,
            },
        ];
        assert_eq!(bridge_port_devices(&tables, &roles).unwrap(), ["lan1"]);
        let e = bridge_port_devices(&tables, &roles[..1]).unwrap_err();
        assert!(e.to_string().contains("wan is not a bridge port"), "{e}");
        assert!(matches!(
            bridge_port_devices(&[], &roles),
            Err(FlowtableError::NoFlowtable)
        ));
    }

    #[test]
    fn a_bridges_global_addresses_give_its_prefixes() {
        let v = json!([{"ifindex": 5, "ifname": "br-lan", "addr_info": [
            {"family": "inet", "local": "192.168.1.1", "prefixlen": 24, "scope": "global"},
            {"family": "inet", "local": "192.168.1.254", "prefixlen": 24, "scope": "global"},
            {"family": "inet", "local": "10.9.9.9", "prefixlen": 32, "scope": "global"},
            {"family": "inet6", "local": "fd12:3456:789a::1", "prefixlen": 60, "scope": "global"},
            {"family": "inet6", "local": "2001:db8:1:2::1", "prefixlen": 64, "scope": "global"},
            {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
            {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"},
            {"family": "inet", "prefixlen": 24, "scope": "global"}
        ]}]);
        let got: Vec<String> = parse_prefixes(&v).iter().map(|p| p.to_string()).collect();
        assert_eq!(
            got,
            ["192.168.1.0/24", "fd12:3456:789a::/60", "2001:db8:1:2::/64"]
        );
        assert!(parse_prefixes(&json!([{"ifname": "br-lan", "addr_info": []}])).is_empty());
        assert!(parse_prefixes(&Value::Null).is_empty());
    }
}
