//! Turns the kernel side's events into one plain sentence each.

use std::net::IpAddr;

use flowguard_common::{event_action, event_kind, hook, Event};

use crate::settings::{key_ip, Mac};

/// Decodes a ring buffer record; `None` if it has the wrong size.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    bytemuck::try_pod_read_unaligned(bytes).ok()
}

fn endpoint_with_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The sentence an operator reads for an event. `ifname` resolves interface
/// indexes (the kernel side only knows numbers).
pub fn describe(ev: &Event, ifname: impl Fn(u32) -> Option<String>) -> String {
    let endpoint = key_ip(&ev.endpoint);
    let new_mac = Mac(ev.new_mac);
    let old_mac = Mac(ev.old_mac);
    match ev.kind {
        event_kind::STALE => {
            let peer = key_ip(&ev.peer);
            let flow = if ev.src_port != 0 || ev.dst_port != 0 {
                format!(
                    "{} -> {}",
                    endpoint_with_port(peer, ev.src_port),
                    endpoint_with_port(endpoint, ev.dst_port)
                )
            } else {
                format!("{peer} -> {endpoint}, protocol {}", ev.protocol)
            };
            let action = match ev.action {
                event_action::REWRITTEN => "rewritten".to_string(),
                event_action::AMBIGUOUS if !new_mac.is_unicast() => {
                    "left untouched: the endpoint's MAC cannot be an endpoint's (zero or group)"
                        .to_string()
                }
                event_action::AMBIGUOUS => {
                    "left untouched: the endpoint is ambiguous (seen with different MACs on different interfaces)".to_string()
                }
                _ => "left untouched (observe mode)".to_string(),
            };
            let hook = match ev.hook {
                hook::XDP => "XDP",
                hook::TC => "tc",
                _ => "?",
            };
            let iface = ifname(ev.ifindex).unwrap_or_else(|| format!("ifindex {}", ev.ifindex));
            format!(
                "{endpoint}: frames to stale MAC {old_mac}, current {new_mac} (flow {flow}), {action} [{hook} on {iface}, {} stale so far]",
                ev.count
            )
        }
        event_kind::LEARNED => {
            if ev.old_mac == [0; 6] {
                format!("{endpoint}: learned MAC {new_mac} (new endpoint)")
            } else {
                format!("{endpoint}: learned MAC {new_mac}, was {old_mac} (the endpoint moved)")
            }
        }
        other => format!("{endpoint}: unknown event kind {other}"),
    }
}

/// A few words on a stale event, for the reason of an eviction.
pub fn describe_short(ev: &Event) -> String {
    format!("sent to {} instead of {}", Mac(ev.old_mac), Mac(ev.new_mac))
}

#[cfg(test)]
mod tests {
    use flowguard_common::EndpointKey;

    use super::*;

    fn stale_event(action: u8) -> Event {
        Event {
            kind: event_kind::STALE,
            ifindex: 7,
            endpoint: EndpointKey::from_v4_bytes([192, 168, 1, 240]),
            peer: EndpointKey::from_v4_bytes([10, 0, 0, 2]),
            src_port: 51820,
            dst_port: 51820,
            protocol: 17,
            action,
            hook: hook::TC,
            old_mac: [0xb6, 0x01, 0x52, 0x44, 0x16, 0xfa],
            new_mac: [0x3a, 0xea, 0x10, 0xf9, 0xa1, 0x2e],
            count: 3,
            ..Event::default()
        }
    }

    #[test]
    fn stale_rewritten_sentence() {
        let s = describe(&stale_event(event_action::REWRITTEN), |_| {
            Some("lan1".into())
        });
        assert_eq!(
            s,
            "192.168.1.240: frames to stale MAC b6:01:52:44:16:fa, current 3a:ea:10:f9:a1:2e \
             (flow 10.0.0.2:51820 -> 192.168.1.240:51820), rewritten [tc on lan1, 3 stale so far]"
        );
    }

    #[test]
    fn observe_and_ambiguous_say_untouched() {
        let s = describe(&stale_event(event_action::OBSERVED), |_| None);
        assert!(s.contains("left untouched (observe mode)"), "{s}");
        assert!(s.contains("ifindex 7"), "{s}");
        let s = describe(&stale_event(event_action::AMBIGUOUS), |_| None);
        assert!(s.contains("ambiguous"), "{s}");
        let mut ev = stale_event(event_action::AMBIGUOUS);
        ev.new_mac = [0; 6];
        let s = describe(&ev, |_| None);
        assert!(
            s.contains("cannot be an endpoint's") && !s.contains("ambiguous"),
            "{s}"
        );
    }

    #[test]
    fn v6_flow_and_portless() {
        let mut ev = stale_event(event_action::REWRITTEN);
        ev.endpoint =
            EndpointKey::from_v6_bytes("fd00::240".parse::<std::net::Ipv6Addr>().unwrap().octets());
        ev.peer =
            EndpointKey::from_v6_bytes("fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        let s = describe(&ev, |_| None);
        assert!(
            s.contains("(flow [fd00::2]:51820 -> [fd00::240]:51820)"),
            "{s}"
        );
        ev.src_port = 0;
        ev.dst_port = 0;
        ev.protocol = 58;
        let s = describe(&ev, |_| None);
        assert!(
            s.contains("(flow fd00::2 -> fd00::240, protocol 58)"),
            "{s}"
        );
    }

    #[test]
    fn learned_sentences() {
        let mut ev = Event {
            kind: event_kind::LEARNED,
            endpoint: EndpointKey::from_v4_bytes([192, 168, 1, 240]),
            new_mac: [2, 0, 0, 0, 0, 2],
            ..Event::default()
        };
        assert_eq!(
            describe(&ev, |_| None),
            "192.168.1.240: learned MAC 02:00:00:00:00:02 (new endpoint)"
        );
        ev.old_mac = [2, 0, 0, 0, 0, 1];
        assert!(describe(&ev, |_| None).contains("was 02:00:00:00:00:01 (the endpoint moved)"));
    }

    #[test]
    fn decode_checks_size() {
        let ev = stale_event(event_action::REWRITTEN);
        let bytes = bytemuck::bytes_of(&ev);
        assert_eq!(decode(bytes), Some(ev));
        assert_eq!(decode(&bytes[..10]), None);
    }
}
