//! The endpoint maps and the user-space counters: the endpoints written at
//! start (the static ones, and those a killed instance left), and the maps
//! lent to the rest of user space.

use aya::maps::{Array, HashMap, MapData};
use flowguard_common::{map_names, Port, UserCounters, MAX_PORTS};

use super::{pins::KeptEndpoints, Guard, LoadError};
use crate::{
    endpoints::{self, EndpointMaps, EndpointTable, Fact, Origin},
    settings::StaticEndpoint,
};

impl Guard {
    // These write the endpoint maps at start (through the endpoint table's
    // rule) and lend the maps to user space.
    /// Writes the operator's static endpoints (checked: inside the
    /// prefixes, each once, not more than the hash map holds).
    pub(super) fn add_statics(&mut self, statics: &[StaticEndpoint]) -> Result<(), LoadError> {
        let capacity = self.endpoint_capacity;
        let mut map = self.endpoints()?;
        // The table's rule, with the map as its record: the agent's table
        // finds each static entry there as the endpoint's one claim.
        let mut table = EndpointTable::new(capacity);
        for s in statics {
            table
                .set(&mut map, Fact::at(s.ip, Origin::Static, s.mac))
                .map_err(|source| {
                    if endpoints::is_full(&source) {
                        LoadError::StaticsFull { ip: s.ip, capacity }
                    } else {
                        LoadError::Static { ip: s.ip, source }
                    }
                })?;
        }
        Ok(())
    }

    /// Puts back the endpoints a killed instance left in its pinned map, so
    /// that a restart loses none of what it learned (the neighbour table's
    /// entries are checked again by the next reconcile).
    pub(super) fn restore_endpoints(&mut self, kept: KeptEndpoints) {
        if kept.is_empty() {
            return;
        }
        let Ok(mut map) = self.endpoints() else {
            return;
        };
        let restored = EndpointTable::restore(&mut map, kept);
        log::info!(
            "kept {restored} endpoints from the instance that was stopped without cleaning up"
        );
    }

    /// The endpoint maps, for user space to keep in sync.
    pub fn endpoints(&mut self) -> Result<EndpointMaps<&mut MapData, &mut MapData>, LoadError> {
        let (mut hash, mut v4) = (None, None);
        for (name, map) in self.ebpf.maps_mut() {
            match name {
                map_names::ENDPOINTS => hash = Some(map),
                map_names::ENDPOINTS_V4 => v4 = Some(map),
                _ => {}
            }
        }
        let hash = hash.expect("the object defines its maps");
        let v4 = v4.expect("the object defines its maps");
        Ok(EndpointMaps {
            hash: HashMap::try_from(hash).map_err(|e| LoadError::Map(map_names::ENDPOINTS, e))?,
            v4: Some(Array::try_from(v4).map_err(|e| LoadError::Map(map_names::ENDPOINTS_V4, e))?),
            config: self.config,
        })
    }

    /// Makes the PORTS map hold `ports` (ifindex, its bridge and the
    /// bridge's MAC) and nothing else: the ports between which the tc
    /// guard may redirect a frame. More than the map holds are left out,
    /// with a warning.
    pub fn set_ports(&mut self, ports: &[(u32, Port)]) -> Result<(), LoadError> {
        let map = self
            .ebpf
            .map_mut(map_names::PORTS)
            .expect("the object defines its maps");
        let err = |e| LoadError::Map(map_names::PORTS, e);
        let mut map: HashMap<_, u32, Port> = HashMap::try_from(map).map_err(err)?;
        let old: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for k in old {
            if !ports.iter().any(|(p, _)| *p == k) {
                let _ = map.remove(&k);
            }
        }
        if ports.len() > MAX_PORTS as usize {
            log::warn!(
                "{} bridge ports, more than the {MAX_PORTS} flowguard redirects between: the rest are not redirected to",
                ports.len()
            );
        }
        for (port, info) in ports.iter().take(MAX_PORTS as usize) {
            if map.get(port, 0).ok() != Some(*info) {
                map.insert(port, info, 0).map_err(err)?;
            }
        }
        Ok(())
    }

    /// The counters user space keeps.
    pub fn user_counters(&mut self) -> Result<Array<&mut MapData, UserCounters>, LoadError> {
        let map = self
            .ebpf
            .map_mut(map_names::USER_COUNTERS)
            .expect("the object defines its maps");
        Array::try_from(map).map_err(|e| LoadError::Map(map_names::USER_COUNTERS, e))
    }
}
