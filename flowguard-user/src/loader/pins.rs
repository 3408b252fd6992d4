//! The pin directory: its lock, the maps and links pinned in it (so that
//! the kernel side outlives a killed daemon), and what a start takes over
//! from an instance that did not stop cleanly.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use flowguard_common::{pin_names, Config, Endpoint, EndpointKey};

use super::{Guard, LoadError};
use crate::{endpoints::EndpointMaps, sys};

impl Guard {
    pub(super) fn pin_maps(&mut self) -> Result<(), LoadError> {
        // Mark pinned first so that a partial pin is cleaned up on drop.
        self.pinned = true;
        for (map, file) in pin_names::ALL {
            let path = self.pin_dir.join(file);
            let m = self.ebpf.map(map).expect("the object defines its maps");
            m.pin(&path).map_err(|source| LoadError::Pin {
                name: map,
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Where the link of `hook` (`tc` or `xdp`) on `iface` is pinned.
pub fn link_pin(dir: &Path, hook: &str, iface: &str) -> PathBuf {
    dir.join(format!("link_{hook}_{iface}"))
}

/// Where the program of a clsact filter is pinned, beside where its link
/// would be (`link_tc_lan1` → `clsact_tc_lan1`).
pub fn clsact_pin(link_pin: &Path) -> PathBuf {
    let name = link_pin.file_name().unwrap_or_default().to_string_lossy();
    link_pin.with_file_name(format!(
        "clsact_{}",
        name.strip_prefix("link_").unwrap_or(&name)
    ))
}

/// Pins `link` at `pin` (replacing a pin of the same name, whose link is
/// this one adopted, or a dead one), so that it outlives this process.
pub(super) fn keep_pinned(
    links: &mut Vec<(PathBuf, PinnedLink)>,
    pinned: &mut bool,
    link: FdLink,
    pin: &Path,
) -> Result<(), LoadError> {
    links.retain(|(p, _)| p != pin);
    let _ = fs::remove_file(pin);
    // Marked pinned first so that a failure below is cleaned up on drop.
    *pinned = true;
    let link = link.pin(pin).map_err(|source| LoadError::Pin {
        name: "link",
        path: pin.to_path_buf(),
        source,
    })?;
    links.push((pin.to_path_buf(), link));
    Ok(())
}

/// The link a killed instance pinned at `pin`, to put a new program in.
pub(super) fn adopt_link<T: TryFrom<FdLink>>(pin: &Path) -> Option<T> {
    if !pin.exists() {
        return None;
    }
    let link = PinnedLink::from_pin(pin)
        .map_err(|e| log::debug!("{}: {e}", pin.display()))
        .ok()?;
    let link = T::try_from(FdLink::from(link)).ok();
    if link.is_none() {
        let _ = fs::remove_file(pin);
    }
    link
}

/// Endpoints read from a killed instance's pinned map.
pub(super) type KeptEndpoints = Vec<(EndpointKey, Endpoint)>;

/// The endpoints in the pinned endpoint maps under `dir`, if their layout
/// is this build's (the array's slots are read with the pinned settings).
fn pinned_endpoints(dir: &Path) -> KeptEndpoints {
    let path = dir.join(pin_names::ENDPOINTS);
    let Ok(data) = MapData::from_pin(&path) else {
        return Vec::new();
    };
    let hash = match HashMap::<MapData, EndpointKey, Endpoint>::try_from(Map::HashMap(data)) {
        Ok(map) => map,
        Err(e) => {
            log::info!("not keeping the endpoints in {}: {e}", path.display());
            return Vec::new();
        }
    };
    let config = MapData::from_pin(dir.join(pin_names::CONFIG))
        .ok()
        .and_then(|d| Array::<MapData, Config>::try_from(Map::Array(d)).ok())
        .and_then(|a| a.get(&0, 0).ok());
    let v4 = MapData::from_pin(dir.join(pin_names::ENDPOINTS_V4))
        .ok()
        .and_then(|d| Array::<MapData, Endpoint>::try_from(Map::Array(d)).ok());
    let maps = EndpointMaps {
        hash,
        v4: v4.filter(|_| config.is_some()),
        config: config.unwrap_or_default(),
    };
    maps.entries().unwrap_or_else(|e| {
        log::info!("not keeping the endpoints of the array: {e}");
        maps.hash.iter().flatten().collect()
    })
}

/// Creates (if needed) and locks the pin directory. Leftover map pins of an
/// instance that died are removed (the lock proves nobody uses them), after
/// reading the endpoints they held; its pinned links stay, to be adopted.
pub(super) fn lock_pin_dir(dir: &Path) -> Result<(fs::File, bool, KeptEndpoints), LoadError> {
    let pin_err = |source| LoadError::PinDir {
        path: dir.to_path_buf(),
        source,
    };
    let created = match fs::create_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(pin_err(e)),
    };
    let lock = fs::File::open(dir).map_err(pin_err)?;
    match sys::try_lock(&lock) {
        Ok(true) => {}
        Ok(false) => return Err(LoadError::AlreadyRunning(dir.to_path_buf())),
        Err(e) => {
            if created {
                let _ = fs::remove_dir(dir);
            }
            return Err(pin_err(e));
        }
    }
    let mut kept = Vec::new();
    if !created {
        kept = pinned_endpoints(dir);
        for (_, file) in pin_names::ALL {
            let path = dir.join(file);
            if path.exists() {
                log::warn!(
                    "removing {} left by an instance that did not stop cleanly",
                    path.display()
                );
                let _ = fs::remove_file(path);
            }
        }
    }
    Ok((lock, created, kept))
}
