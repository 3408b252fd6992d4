//! The endpoint table: what every source says about each endpoint, merged
//! by one rule into the kernel side's endpoint maps, of which it is the
//! only writer in user space (the kernel's learning path is the other).
//!
//! Sources (the neighbour table, static entries, macvlan children, probes,
//! what the kernel learned) hand it [`Fact`]s; it hands back the
//! [`Update`]s it made, which eviction, counters and the log read.

mod store;
mod table;

use flowguard_common::UserCounters;

pub use store::{is_full, EndpointMaps, EndpointStore};
pub use table::{Change, EndpointTable, Fact, Origin, Place, PortFact, Says, Update};

/// What a source counts, done by the loop (the counters' only writer).
pub type Count = Box<dyn FnOnce(&mut UserCounters) + Send>;

/// What a source that runs on its own (a task, a thread) sends the loop:
/// its facts, and what it counts (the loop is the only writer of the
/// counters).
pub struct Batch {
    pub facts: Vec<Fact>,
    /// The bridge FDB's facts, and whether they are all it says now.
    pub ports: Vec<PortFact>,
    pub all_ports: bool,
    /// With a whole dump: every port of the followed bridges (ifindex,
    /// bridge, the bridge's MAC), for the kernel side's PORTS map.
    pub bridge_ports: Option<Vec<(u32, flowguard_common::Port)>>,
    pub count: Option<Count>,
}

impl Batch {
    pub fn facts(facts: Vec<Fact>) -> Self {
        Self {
            facts,
            ports: Vec::new(),
            all_ports: false,
            bridge_ports: None,
            count: None,
        }
    }

    pub fn ports(ports: Vec<PortFact>, all_ports: bool) -> Self {
        Self {
            ports,
            all_ports,
            ..Self::facts(Vec::new())
        }
    }

    pub fn with_bridge_ports(self, bridge_ports: Vec<(u32, flowguard_common::Port)>) -> Self {
        Self {
            bridge_ports: Some(bridge_ports),
            ..self
        }
    }
}

/// Where such a source sends its batches.
pub type FactSender = tokio::sync::mpsc::UnboundedSender<Batch>;
