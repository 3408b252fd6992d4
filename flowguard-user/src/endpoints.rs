//! Writes endpoints into the kernel side's map without losing the evidence
//! the kernel has gathered for them.

use aya::maps::MapError;
use flowguard_common::EndpointKey;

use crate::{neigh::EndpointStore, settings::Mac, sys};

/// Sets the current MAC and source of an endpoint. Evidence (stale counts,
/// last stale MAC) already in the map is kept; the rate limit is reset when
/// the MAC changes so that the next stale frame is reported at once.
/// Returns the previous MAC, if the endpoint was known.
pub fn upsert<S: EndpointStore + ?Sized>(
    map: &mut S,
    key: EndpointKey,
    mac: Mac,
    source: u8,
) -> Result<Option<Mac>, MapError> {
    let existing = map.get(&key)?;
    let mut value = existing.unwrap_or_default();
    let previous = existing.map(|e| Mac(e.mac));
    if existing.is_some_and(|e| e.mac == mac.0 && e.source == source) {
        return Ok(previous);
    }
    if previous != Some(mac) {
        value.last_event_jiffies = 0;
        value.updated_ns = sys::monotonic_ns();
    }
    value.mac = mac.0;
    value.source = source;
    map.insert(key, value)?;
    Ok(previous)
}
