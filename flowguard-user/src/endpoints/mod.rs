//! The endpoint table: what every source says about each endpoint, merged
//! by one rule into the kernel side's endpoint maps, of which it is the
//! only writer in user space (the kernel's learning path is the other).
//!
//! Sources (the neighbour table, static entries, macvlan children, probes,
//! what the kernel learned) hand it [`Fact`]s; it hands back the
//! [`Update`]s it made, which eviction, counters and the log read.

mod store;
mod table;

pub use store::{is_full, EndpointMaps, EndpointStore};
pub use table::{Change, EndpointTable, Fact, Origin, Says, Update};
