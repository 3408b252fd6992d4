//! The kernel side's endpoint maps as one store: IPv4 endpoints of the small
//! prefixes in the direct-indexed array, every other in the hash map. Only
//! the endpoint table (and tests that set up a map) write through it.

use std::borrow::{Borrow, BorrowMut};

use aya::maps::{Array, HashMap, MapData, MapError};
use flowguard_common::{Config, Endpoint, EndpointKey, V4Place, MAX_V4_PREFIXES};

/// The operations on the endpoint map that syncing needs, so that the
/// policy runs against the real BPF map and, in tests, against a plain one.
pub trait EndpointStore {
    fn get(&self, key: &EndpointKey) -> Result<Option<Endpoint>, MapError>;
    fn insert(&mut self, key: EndpointKey, value: Endpoint) -> Result<(), MapError>;
    /// Removes `key`; a key that is already gone is not an error.
    fn remove(&mut self, key: &EndpointKey) -> Result<(), MapError>;
    /// Every entry (a snapshot; entries may come and go meanwhile).
    fn entries(&self) -> Result<Vec<(EndpointKey, Endpoint)>, MapError>;
    /// Entries of the part that can be full (the hash map).
    fn hash_len(&self) -> usize;
}

impl<T: BorrowMut<MapData>> EndpointStore for HashMap<T, EndpointKey, Endpoint> {
    fn get(&self, key: &EndpointKey) -> Result<Option<Endpoint>, MapError> {
        match HashMap::get(self, key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn insert(&mut self, key: EndpointKey, value: Endpoint) -> Result<(), MapError> {
        HashMap::insert(self, key, value, 0)
    }

    fn remove(&mut self, key: &EndpointKey) -> Result<(), MapError> {
        match HashMap::remove(self, key) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            r => r,
        }
    }

    fn entries(&self) -> Result<Vec<(EndpointKey, Endpoint)>, MapError> {
        self.iter().collect()
    }

    fn hash_len(&self) -> usize {
        self.keys().filter(Result::is_ok).count()
    }
}

impl EndpointStore for std::collections::HashMap<EndpointKey, Endpoint> {
    fn get(&self, key: &EndpointKey) -> Result<Option<Endpoint>, MapError> {
        Ok(std::collections::HashMap::get(self, key).copied())
    }

    fn insert(&mut self, key: EndpointKey, value: Endpoint) -> Result<(), MapError> {
        std::collections::HashMap::insert(self, key, value);
        Ok(())
    }

    fn remove(&mut self, key: &EndpointKey) -> Result<(), MapError> {
        std::collections::HashMap::remove(self, key);
        Ok(())
    }

    fn entries(&self) -> Result<Vec<(EndpointKey, Endpoint)>, MapError> {
        Ok(self.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn hash_len(&self) -> usize {
        self.len()
    }
}

/// Whether a map write failed because the map is full (E2BIG).
pub fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

/// ENDPOINTS and ENDPOINTS_V4 together. The same `Config` as the kernel
/// side's decides where an endpoint goes (`Config::v4_place`), so both sides
/// always look in the same place.
pub struct EndpointMaps<H, A> {
    pub hash: HashMap<H, EndpointKey, Endpoint>,
    /// Absent only when reading the pins of a build without the array.
    pub v4: Option<Array<A, Endpoint>>,
    pub config: Config,
}

impl<H: Borrow<MapData>, A: Borrow<MapData>> EndpointMaps<H, A> {
    /// The array slot of `key`, when its endpoint is kept there.
    fn slot(&self, key: &EndpointKey) -> Option<u32> {
        if !key.is_v4() || self.v4.is_none() {
            return None;
        }
        match self.config.v4_place(key.addr[3]) {
            V4Place::Slot(i) => Some(i),
            V4Place::Hash | V4Place::Outside => None,
        }
    }

    /// Entries in the hash map (the one that can be full).
    pub fn hash_len(&self) -> usize {
        self.hash.keys().filter(Result::is_ok).count()
    }

    /// Every endpoint's key (a snapshot, as `entries`).
    pub fn keys(&self) -> impl Iterator<Item = Result<EndpointKey, MapError>> {
        match self.entries() {
            Ok(all) => all.into_iter().map(|(k, _)| Ok(k)).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        }
        .into_iter()
    }

    fn read(&self, key: &EndpointKey) -> Result<Option<Endpoint>, MapError> {
        if let (Some(slot), Some(v4)) = (self.slot(key), &self.v4) {
            let v = v4.get(&slot, 0)?;
            return Ok((v.source != 0).then_some(v));
        }
        match self.hash.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every endpoint: the hash map's, then the array's occupied slots.
    fn all(&self) -> Result<Vec<(EndpointKey, Endpoint)>, MapError> {
        // An entry deleted while we iterate is simply skipped.
        let mut out: Vec<_> = self.hash.iter().flatten().collect();
        let Some(v4) = &self.v4 else {
            return Ok(out);
        };
        let count = (self.config.v4_count as usize).min(MAX_V4_PREFIXES);
        for p in &self.config.v4[..count] {
            for host in 0..p.slots {
                let v = v4.get(&(p.slot_base + host), 0)?;
                if v.source != 0 {
                    out.push((EndpointKey::from_v4_raw(p.addr | host.to_be()), v));
                }
            }
        }
        Ok(out)
    }
}

impl<H: BorrowMut<MapData>, A: BorrowMut<MapData>> EndpointStore for EndpointMaps<H, A> {
    fn get(&self, key: &EndpointKey) -> Result<Option<Endpoint>, MapError> {
        self.read(key)
    }

    fn insert(&mut self, key: EndpointKey, value: Endpoint) -> Result<(), MapError> {
        match (self.slot(&key), &mut self.v4) {
            (Some(slot), Some(v4)) => v4.set(slot, value, 0),
            _ => self.hash.insert(key, value, 0),
        }
    }

    fn remove(&mut self, key: &EndpointKey) -> Result<(), MapError> {
        match (self.slot(key), &mut self.v4) {
            // An all-zero slot holds no endpoint (source 0).
            (Some(slot), Some(v4)) => v4.set(slot, Endpoint::default(), 0),
            _ => EndpointStore::remove(&mut self.hash, key),
        }
    }

    fn entries(&self) -> Result<Vec<(EndpointKey, Endpoint)>, MapError> {
        self.all()
    }

    fn hash_len(&self) -> usize {
        EndpointMaps::hash_len(self)
    }
}

impl<H: Borrow<MapData>, A: Borrow<MapData>> EndpointMaps<H, A> {
    /// Every endpoint, for readers that cannot write (status, restarts).
    pub fn entries(&self) -> Result<Vec<(EndpointKey, Endpoint)>, MapError> {
        self.all()
    }
}
