//! The neighbour source as the agent runs it: the socket, the cache it
//! shares with the prober, and the facts each event or re-read gives.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{all_facts, facts, NeighCache, NeighError, NeighEvent, NeighbourSource};
use crate::{endpoints::Fact, settings::Prefix};

/// The neighbour cache, shared with the prober, which reads where to ask
/// each endpoint (one copy of what the neighbour table says: a router with
/// 16,000 endpoints must stay within 4 MB resident).
pub type SharedCache = Arc<Mutex<NeighCache>>;

/// What one event of the neighbour table gave.
pub enum Heard {
    /// The facts about the IPs it changed.
    Facts(Vec<Fact>),
    /// Events were lost: everything the table says now, read again.
    Overflow(Vec<Fact>),
}

/// The followed neighbour table.
pub struct Neighbours {
    source: NeighbourSource,
    cache: SharedCache,
}

impl Neighbours {
    /// Subscribes, then dumps the table; returns every fact of the dump.
    pub async fn open(prefixes: Vec<Prefix>) -> Result<(Self, Vec<Fact>), NeighError> {
        let (source, entries) = NeighbourSource::open().await?;
        let cache = Arc::new(Mutex::new(NeighCache::new(prefixes)));
        let n = Self { source, cache };
        let facts = {
            let mut c = n.cache();
            c.replace_all(entries);
            all_facts(&c)
        };
        Ok((n, facts))
    }

    /// The cache, for the prober.
    pub fn shared(&self) -> SharedCache {
        self.cache.clone()
    }

    /// IPs the neighbour table has a usable entry for.
    pub fn len(&self) -> usize {
        self.cache().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next event (cancel-safe).
    pub async fn next_event(&mut self) -> Result<NeighEvent, NeighError> {
        self.source.next_event().await
    }

    /// Takes one event into the cache.
    pub async fn heard(&mut self, ev: NeighEvent) -> Result<Heard, NeighError> {
        if matches!(ev, NeighEvent::Overflow) {
            log::warn!("missed neighbour events (the kernel's buffer overflowed): reading the whole table again");
            return Ok(Heard::Overflow(self.reread().await?));
        }
        let mut c = self.cache();
        let ips = c.apply(&ev);
        Ok(Heard::Facts(facts(&c, ips)))
    }

    /// Dumps the whole table again into the cache; returns every fact.
    pub async fn reread(&mut self) -> Result<Vec<Fact>, NeighError> {
        let entries = self.source.dump().await?;
        let mut c = self.cache();
        c.replace_all(entries);
        Ok(all_facts(&c))
    }

    fn cache(&self) -> MutexGuard<'_, NeighCache> {
        self.cache.lock().expect("neighbour cache lock")
    }
}
