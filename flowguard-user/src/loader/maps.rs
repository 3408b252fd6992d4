//! The endpoint maps and the user-space counters: the endpoints written at
//! start (the static ones, and those a killed instance left), and the maps
//! lent to the rest of user space.

use aya::maps::{Array, HashMap, MapData};
use flowguard_common::{map_names, source, UserCounters};

use super::{pins::KeptEndpoints, Guard, LoadError};
use crate::{
    endpoints::{self, EndpointMaps, EndpointStore as _},
    settings::{endpoint_key, StaticEndpoint},
};

impl Guard {
    // These write the endpoint maps at start and lend the maps to user space.
    /// Writes the operator's static endpoints (checked: inside the
    /// prefixes, each once, not more than the hash map holds).
    pub(super) fn add_statics(&mut self, statics: &[StaticEndpoint]) -> Result<(), LoadError> {
        let capacity = self.endpoint_capacity;
        let mut map = self.endpoints()?;
        for s in statics {
            endpoints::upsert(&mut map, endpoint_key(s.ip), s.mac, source::STATIC, None).map_err(
                |source| match &source {
                    aya::maps::MapError::SyscallError(e)
                        if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                    {
                        LoadError::StaticsFull { ip: s.ip, capacity }
                    }
                    _ => LoadError::Static { ip: s.ip, source },
                },
            )?;
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
        let mut restored = 0;
        for (k, v) in kept {
            if map.insert(k, v).is_ok() {
                restored += 1;
            }
        }
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

    /// The counters user space keeps.
    pub fn user_counters(&mut self) -> Result<Array<&mut MapData, UserCounters>, LoadError> {
        let map = self
            .ebpf
            .map_mut(map_names::USER_COUNTERS)
            .expect("the object defines its maps");
        Array::try_from(map).map_err(|e| LoadError::Map(map_names::USER_COUNTERS, e))
    }
}
