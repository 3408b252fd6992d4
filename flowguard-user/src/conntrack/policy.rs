//! The pure eviction decisions: which of an endpoint's flows to delete, and
//! whether an endpoint may be evicted now (debounce per endpoint, overall
//! rate limit). Time comes in as an argument, so tests need no clock.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{EvictScope, Flow};

/// The flows of `flows` that involve `ip` and that `scope` selects:
/// offloaded ones (`OFFLOAD` or `HW_OFFLOAD`), all, or none.
pub fn select_for_eviction(flows: &[Flow], ip: IpAddr, scope: EvictScope) -> Vec<&Flow> {
    flows
        .iter()
        .filter(|flow| flow.involves(ip))
        .filter(|flow| match scope {
            EvictScope::Offloaded => flow.is_offloaded(),
            EvictScope::All => true,
            EvictScope::Off => false,
        })
        .collect()
}

/// When to evict: at most once per `debounce` for one endpoint (a MAC change
/// and the stale events that follow it trigger one eviction, not many), and
/// at most `max_per_sec` evictions in any one-second window overall (a flood
/// of neighbour changes cannot turn into a flood of conntrack deletes).
/// `max_per_sec == 0` means no overall limit.
#[derive(Debug)]
pub struct EvictionPolicy {
    debounce: Duration,
    max_per_sec: u32,
    last_eviction: HashMap<IpAddr, Instant>,
    recent: VecDeque<Instant>,
}

/// Past this many remembered endpoints, those out of their debounce window
/// are forgotten.
const PRUNE_ABOVE: usize = 4096;
const WINDOW: Duration = Duration::from_secs(1);

impl EvictionPolicy {
    pub fn new(debounce: Duration, max_per_sec: u32) -> Self {
        Self {
            debounce,
            max_per_sec,
            last_eviction: HashMap::new(),
            recent: VecDeque::new(),
        }
    }

    /// Whether `ip` may be evicted at `now`; a `true` counts as an eviction
    /// (for the debounce and the rate limit), a `false` counts as nothing, so
    /// a rate-limited endpoint can be tried again soon.
    pub fn should_evict(&mut self, ip: IpAddr, now: Instant) -> bool {
        let ip = ip.to_canonical();
        if let Some(&last) = self.last_eviction.get(&ip) {
            if now.saturating_duration_since(last) < self.debounce {
                return false;
            }
        }
        self.admit(ip, now)
    }

    /// Like [`EvictionPolicy::should_evict`] but without the debounce: for
    /// a change that makes every earlier eviction moot (the endpoint's MAC
    /// changed again). Only the overall rate limit applies.
    pub fn should_evict_now(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.admit(ip.to_canonical(), now)
    }

    /// Like [`EvictionPolicy::should_evict`], telling a debounced request
    /// (moot: an eviction just ran) from a rate-limited one (to be deferred).
    pub fn admit_stale(&mut self, ip: IpAddr, now: Instant) -> Admission {
        if self.debounced(ip, now) {
            return Admission::Debounced;
        }
        self.admission(ip.to_canonical(), now)
    }

    /// Whether `ip` was evicted less than the debounce interval ago.
    pub fn debounced(&self, ip: IpAddr, now: Instant) -> bool {
        self.last_eviction
            .get(&ip.to_canonical())
            .is_some_and(|&last| now.saturating_duration_since(last) < self.debounce)
    }

    /// Like [`EvictionPolicy::should_evict_now`]: only the rate limit applies.
    pub fn admit_change(&mut self, ip: IpAddr, now: Instant) -> Admission {
        self.admission(ip.to_canonical(), now)
    }

    fn admission(&mut self, ip: IpAddr, now: Instant) -> Admission {
        if self.admit(ip, now) {
            Admission::Now
        } else {
            Admission::RateLimited
        }
    }

    fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.max_per_sec > 0 {
            while let Some(&oldest) = self.recent.front() {
                if now.saturating_duration_since(oldest) >= WINDOW {
                    self.recent.pop_front();
                } else {
                    break;
                }
            }
            if self.recent.len() >= self.max_per_sec as usize {
                return false;
            }
            self.recent.push_back(now);
        }
        self.last_eviction.insert(ip, now);
        if self.last_eviction.len() > PRUNE_ABOVE {
            let debounce = self.debounce;
            self.last_eviction
                .retain(|_, last| now.saturating_duration_since(*last) < debounce);
        }
        true
    }
}

/// What the policy says about one eviction request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Now,
    /// The endpoint was evicted moments ago: the request is moot.
    Debounced,
    /// Over the overall rate limit: the request must wait its turn.
    RateLimited,
}

/// Evictions the rate limit held back, oldest first, at most one per
/// endpoint (a newer request for a waiting endpoint replaces its reason
/// and keeps its place): they are deferred, never dropped.
#[derive(Debug)]
pub struct DeferredEvictions<T> {
    order: VecDeque<IpAddr>,
    waiting: HashMap<IpAddr, T>,
}

impl<T> Default for DeferredEvictions<T> {
    fn default() -> Self {
        Self {
            order: VecDeque::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<T> DeferredEvictions<T> {
    pub fn push(&mut self, ip: IpAddr, why: T) {
        let ip = ip.to_canonical();
        if self.waiting.insert(ip, why).is_none() {
            self.order.push_back(ip);
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Takes the oldest waiting request while `admit` lets it through.
    pub fn drain_while(&mut self, mut admit: impl FnMut(IpAddr) -> bool) -> Vec<(IpAddr, T)> {
        let mut out = Vec::new();
        while let Some(&ip) = self.order.front() {
            if !admit(ip) {
                break;
            }
            self.order.pop_front();
            if let Some(why) = self.waiting.remove(&ip) {
                out.push((ip, why));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_change_skips_the_debounce_but_not_the_rate_limit() {
        let t0 = Instant::now();
        let a: IpAddr = Ipv4Addr::new(192, 168, 1, 240).into();
        let mut p = EvictionPolicy::new(Duration::from_secs(5), 2);
        assert!(p.should_evict(a, t0));
        assert!(
            !p.should_evict(a, t0 + Duration::from_millis(100)),
            "debounced"
        );
        assert!(
            p.should_evict_now(a, t0 + Duration::from_millis(200)),
            "a change is not debounced"
        );
        assert!(
            !p.should_evict_now(a, t0 + Duration::from_millis(300)),
            "2 per second at most"
        );
        assert!(
            !p.should_evict(a, t0 + Duration::from_millis(1300)),
            "the change restarted the debounce"
        );
        assert!(
            p.should_evict_now(a, t0 + Duration::from_millis(1300)),
            "the window moved on"
        );
    }
    use crate::conntrack::{Tuple, IPS_ASSURED, IPS_HW_OFFLOAD, IPS_OFFLOAD, IPS_SEEN_REPLY};
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> IpAddr {
        Ipv4Addr::new(192, 168, 1, last).into()
    }

    fn flow(to: u8, port: u16, status: u32) -> Flow {
        let mut f = Flow::unnatted(Tuple::udp(
            Ipv4Addr::new(10, 0, 0, 2).into(),
            port,
            ip(to),
            51820,
        ));
        f.status = status;
        f
    }

    #[test]
    fn offloaded_scope_takes_offload_and_hw_offload_only() {
        let flows = vec![
            flow(240, 1, IPS_OFFLOAD | IPS_SEEN_REPLY),
            flow(240, 2, IPS_HW_OFFLOAD | IPS_OFFLOAD),
            flow(240, 3, IPS_HW_OFFLOAD),
            flow(240, 4, IPS_SEEN_REPLY | IPS_ASSURED),
            flow(241, 5, IPS_OFFLOAD),
        ];
        let picked: Vec<u16> = select_for_eviction(&flows, ip(240), EvictScope::Offloaded)
            .iter()
            .map(|f| f.orig.src_port)
            .collect();
        assert_eq!(picked, [1, 2, 3]);
    }

    #[test]
    fn all_scope_takes_every_flow_of_the_ip_and_off_takes_none() {
        let flows = vec![
            flow(240, 1, IPS_OFFLOAD),
            flow(240, 2, 0),
            flow(241, 3, 0),
            flow(241, 4, IPS_OFFLOAD),
        ];
        let all: Vec<u16> = select_for_eviction(&flows, ip(240), EvictScope::All)
            .iter()
            .map(|f| f.orig.src_port)
            .collect();
        assert_eq!(all, [1, 2]);
        assert!(select_for_eviction(&flows, ip(240), EvictScope::Off).is_empty());
        assert!(select_for_eviction(&flows, ip(242), EvictScope::All).is_empty());
    }

    #[test]
    fn a_nat_target_in_the_reply_tuple_counts() {
        // DNAT: the client talks to the router; the endpoint only shows up as
        // the reply's source.
        let mut dnat = flow(1, 9, IPS_OFFLOAD);
        dnat.reply.src = ip(240);
        let flows = [dnat];
        assert_eq!(
            select_for_eviction(&flows, ip(240), EvictScope::Offloaded).len(),
            1
        );
        assert!(select_for_eviction(&flows, ip(241), EvictScope::All).is_empty());
    }

    #[test]
    fn deferred_evictions_are_kept_once_per_endpoint_and_drained_at_the_limit() {
        let t0 = Instant::now();
        let mut policy = EvictionPolicy::new(Duration::from_secs(2), 2);
        let mut deferred = DeferredEvictions::default();
        for i in 1..=5 {
            match policy.admit_change(ip(i), t0) {
                Admission::Now => {}
                Admission::RateLimited => deferred.push(ip(i), format!("moved {i}")),
                Admission::Debounced => unreachable!("changes are not debounced"),
            }
        }
        assert_eq!(deferred.len(), 3, "2 now, 3 deferred");
        deferred.push(ip(4), "moved again".to_string());
        assert_eq!(deferred.len(), 3, "one entry per endpoint");
        assert!(deferred
            .drain_while(
                |ip| policy.admit_change(ip, t0 + Duration::from_millis(500)) == Admission::Now
            )
            .is_empty());
        let later = t0 + Duration::from_secs(1);
        let first = deferred.drain_while(|ip| policy.admit_change(ip, later) == Admission::Now);
        assert_eq!(
            first,
            [
                (ip(3), "moved 3".to_string()),
                (ip(4), "moved again".to_string())
            ]
        );
        let last = deferred.drain_while(|ip| {
            policy.admit_change(ip, later + Duration::from_secs(1)) == Admission::Now
        });
        assert_eq!(last, [(ip(5), "moved 5".to_string())]);
        assert!(deferred.is_empty());
        assert_eq!(
            policy.admit_stale(ip(5), later + Duration::from_secs(1)),
            Admission::Debounced
        );
    }

    #[test]
    fn debounce_is_per_endpoint() {
        let t0 = Instant::now();
        let mut policy = EvictionPolicy::new(Duration::from_secs(5), 0);
        assert!(policy.should_evict(ip(240), t0));
        assert!(!policy.should_evict(ip(240), t0 + Duration::from_secs(1)));
        assert!(policy.should_evict(ip(241), t0 + Duration::from_secs(1)));
        assert!(!policy.should_evict(ip(240), t0 + Duration::from_millis(4999)));
        assert!(policy.should_evict(ip(240), t0 + Duration::from_secs(5)));
        assert!(!policy.should_evict(ip(240), t0 + Duration::from_secs(6)));
        // A clock that goes backwards never opens the gate early.
        assert!(!policy.should_evict(ip(241), t0));
    }

    #[test]
    fn rate_limit_caps_evictions_per_second_overall() {
        let t0 = Instant::now();
        let mut policy = EvictionPolicy::new(Duration::ZERO, 3);
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(policy.should_evict(ip(1), ms(0)));
        assert!(policy.should_evict(ip(2), ms(100)));
        assert!(policy.should_evict(ip(3), ms(200)));
        assert!(
            !policy.should_evict(ip(4), ms(300)),
            "fourth within one second"
        );
        assert!(!policy.should_evict(ip(4), ms(999)));
        // The first slot frees at 1000 ms, the second at 1100 ms.
        assert!(policy.should_evict(ip(4), ms(1000)));
        assert!(!policy.should_evict(ip(5), ms(1050)));
        assert!(policy.should_evict(ip(5), ms(1100)));
    }

    #[test]
    fn a_rate_limited_endpoint_is_not_debounced() {
        let t0 = Instant::now();
        let mut policy = EvictionPolicy::new(Duration::from_secs(10), 1);
        assert!(policy.should_evict(ip(1), t0));
        assert!(!policy.should_evict(ip(2), t0 + Duration::from_millis(10)));
        // ip(2) was refused by the rate limit, so its debounce did not start.
        assert!(policy.should_evict(ip(2), t0 + Duration::from_secs(1)));
    }

    #[test]
    fn many_endpoints_are_pruned_but_debounce_holds() {
        let t0 = Instant::now();
        let mut policy = EvictionPolicy::new(Duration::from_secs(1), 0);
        for i in 0..(PRUNE_ABOVE as u32 + 10) {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            assert!(policy.should_evict(addr, t0 + Duration::from_millis(u64::from(i))));
        }
        assert!(policy.last_eviction.len() <= PRUNE_ABOVE + 1);
        let latest = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + PRUNE_ABOVE as u32 + 9));
        let at = t0 + Duration::from_millis(PRUNE_ABOVE as u64 + 9);
        assert!(!policy.should_evict(latest, at));
    }
}
