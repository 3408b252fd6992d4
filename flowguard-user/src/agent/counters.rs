//! The user-space counters (USER_COUNTERS, which no program touches): the
//! loop is their only writer, and this room knows what each change counts.

use anyhow::Context as _;
use flowguard_common::UserCounters;

use crate::{
    endpoints::{Change, Origin, Update},
    loader::Guard,
};

/// Read-modify-write of the user-space counters.
pub fn bump(guard: &mut Guard, f: impl FnOnce(&mut UserCounters)) -> anyhow::Result<()> {
    let mut arr = guard.user_counters()?;
    let mut c = arr.get(&0, 0).context("reading user counters")?;
    f(&mut c);
    arr.set(0, c, 0).context("writing user counters")?;
    Ok(())
}

/// Counts the endpoint table's changes by the source that made them, and
/// the endpoints a full map left out.
pub fn count(c: &mut UserCounters, updates: &[Update], dropped: u64) {
    c.endpoints_dropped += dropped;
    for u in updates {
        match (&u.origin, u.change) {
            (_, Change::PortMoved { .. }) => c.port_moves += 1,
            (_, Change::PortFlapping { .. }) => c.port_flaps += 1,
            (Origin::Neighbour, ch) => match ch {
                Change::Added { .. } => c.neigh_added += 1,
                Change::Moved { .. } | Change::Resolved { .. } => c.neigh_moved += 1,
                Change::Removed { .. } => c.neigh_removed += 1,
                Change::Ambiguous { .. } => c.neigh_ambiguous += 1,
                Change::Adopted { .. } | Change::PortMoved { .. } | Change::PortFlapping { .. } => {
                }
            },
            (Origin::Child { .. }, Change::Removed { .. }) => c.children_removed += 1,
            (Origin::Child { .. }, _) => c.children_added += 1,
            // Probes count their own moves (probe_moves), the kernel its
            // learning (learned_new/learned_moved), and static entries are
            // the operator's.
            (Origin::Probe | Origin::Learned { .. } | Origin::Static | Origin::Fdb, _) => {}
        }
    }
}
