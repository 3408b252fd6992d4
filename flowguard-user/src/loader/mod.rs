//! Loads the kernel side, attaches it to interfaces and pins its maps and
//! links. `Guard::start` either succeeds whole or leaves nothing new
//! attached or pinned; dropping a `Guard` detaches every program and removes
//! the pins. Pinned links keep the kernel side guarding when the daemon is
//! killed; the next start on the same pin directory adopts them (replacing
//! each program in its link, atomically) and keeps the endpoints the dead
//! instance had.
//!
//! This file owns the `Guard`'s lifecycle (start, the settings it writes,
//! drop); `object` loads the object, `attach` attaches the programs, `pins`
//! owns the pin directory and `maps` the endpoint and counter maps.

mod attach;
mod maps;
mod object;
mod pins;

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, Map, MapData, RingBuf},
    programs::{links::PinnedLink, TcAttachType, XdpMode},
    Ebpf,
};
use flowguard_common::{map_names, pin_names, program_names, Config, MAX_OWN_MACS};

use crate::{
    run_config::GuardConfig,
    settings::{self, Mac},
    sys,
};

pub use attach::TC_ATTACH_ENV;
pub use object::{kernel_hz, nearest_hz, refusal_reason};
pub use pins::{clsact_pin, link_pin};

use attach::ports_free;
use object::{load_without_kernel_btf, object};
use pins::{lock_pin_dir, KeptEndpoints};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("interface '{0}' does not exist in this network namespace: check `ip link`")]
    UnknownInterface(String),
    #[error("adding static endpoint {ip}: the endpoint map is full ({capacity} entries): raise --max-endpoints")]
    StaticsFull { ip: std::net::IpAddr, capacity: u32 },
    #[error("adding static endpoint {ip}: {source}")]
    Static {
        ip: std::net::IpAddr,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the MAC {mac} of {iface} is one more than the {MAX_OWN_MACS} own MACs the kernel side holds: frames the router sends from {iface} may be learned as an endpoint's")]
    TooManyOwnMacs { iface: String, mac: Mac },
    #[error("missing privileges: flowguard needs {0} (run it as root)")]
    Privileges(String),
    #[error("{0} is not on a bpf filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf`, or pass --pin-dir on a bpffs")]
    NoBpffs(PathBuf),
    #[error("another flowguard is already running with pin directory {0}: stop it first, or use another --pin-dir")]
    AlreadyRunning(PathBuf),
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this flowguard binary was built without its eBPF object: build it with `cargo xtask build`")]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Object(#[from] aya::EbpfError),
    /// `reason` is the verifier's verdict (see `refusal_reason`); the whole
    /// log goes to the debug log, as it is long.
    #[error("the kernel refused program {program}: {reason} (needs a kernel with BPF, BTF and {feature})")]
    Program {
        program: &'static str,
        feature: &'static str,
        reason: String,
    },
    #[error("attaching {what} to {iface} failed: {source}")]
    Attach {
        what: &'static str,
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{iface} is already guarded ({hook}) by another flowguard, {by}: stop that one first, or leave {iface} out of this one")]
    AlreadyGuarded {
        iface: String,
        hook: &'static str,
        by: String,
    },
    #[error("{iface} already has XDP program {name} (id {id}) attached: detach it first (`ip link set dev {iface} xdp off`), or leave {iface} out of --ingress")]
    XdpTaken {
        iface: String,
        name: String,
        id: u32,
    },
    #[error("cannot measure the kernel's HZ with BPF_PROG_TEST_RUN: {0}")]
    Hz(String),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("pinning map {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

/// One attachment, described for the operator.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub iface: String,
    pub how: String,
    /// The interface index attached to: a new index under the same name is
    /// a recreated interface, which has none of our programs.
    pub ifindex: u32,
    /// The interface is gone; it is attached again when one of that name
    /// comes back.
    pub missing: bool,
    /// The program and, for XDP, the mode that worked.
    program: &'static str,
    xdp_mode: Option<XdpMode>,
}

/// Forwards the kernel side's aya-log records to the `log` crate.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The loaded, attached and pinned kernel side.
pub struct Guard {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pinned: bool,
    /// The attachments' links, pinned as `link_<hook>_<iface>`.
    links: Vec<(PathBuf, PinnedLink)>,
    /// Held for the lifetime of the guard: the pin directory's flock.
    _lock: fs::File,
    logger: Option<KernelLogger>,
    pub attachments: Vec<Attachment>,
    /// Entries the endpoint map can hold.
    pub endpoint_capacity: u32,
    /// The tc program the egress ports get (guarding, or learning too).
    egress_program: &'static str,
    /// The kernel side's settings, as written to CONFIG.
    config: Config,
}

impl Guard {
    /// Checks everything, loads, attaches, pins. On error nothing stays
    /// attached or pinned.
    pub fn start(opts: &GuardConfig) -> Result<Self, LoadError> {
        let mut ifaces: Vec<&String> = opts.ingress.iter().chain(&opts.egress).collect();
        ifaces.sort();
        ifaces.dedup();
        for name in &ifaces {
            if sys::ifindex(name).is_none() {
                return Err(LoadError::UnknownInterface(name.to_string()));
            }
        }
        let missing = sys::missing_capabilities();
        if !missing.is_empty() {
            return Err(LoadError::Privileges(missing.join(" and ")));
        }
        let parent = opts
            .pin_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !sys::is_on_bpffs(parent) {
            return Err(LoadError::NoBpffs(parent.to_path_buf()));
        }
        let object = object().ok_or(LoadError::NoObject)?;
        let (lock, created, kept) = lock_pin_dir(&opts.pin_dir)?;
        let result =
            ports_free(opts).and_then(|()| Self::load_and_attach(opts, object, lock, kept));
        if result.is_err() && created {
            let _ = fs::remove_dir(&opts.pin_dir);
        }
        result
    }

    fn load_and_attach(
        opts: &GuardConfig,
        object: &[u8],
        lock: fs::File,
        kept: KeptEndpoints,
    ) -> Result<Self, LoadError> {
        let mut ebpf = load_without_kernel_btf(object, opts.max_endpoints, opts.kernel.v4_slots())?;
        // The kernel side logs only on rare paths; forward those lines to `log`.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("the kernel side's log is not forwarded: {e}");
                None
            }
        };
        let mut config = opts.kernel;
        let hz = kernel_hz(&mut ebpf)?;
        log::debug!("the kernel ticks at {hz} Hz");
        config.event_interval_jiffies = settings::interval_jiffies(opts.event_interval, hz);
        {
            let map = ebpf.map_mut(map_names::CONFIG).ok_or(LoadError::Map(
                map_names::CONFIG,
                aya::maps::MapError::InvalidName {
                    name: map_names::CONFIG.into(),
                },
            ))?;
            let mut cfg: Array<&mut MapData, Config> =
                Array::try_from(map).map_err(|e| LoadError::Map(map_names::CONFIG, e))?;
            cfg.set(0, config, 0)
                .map_err(|e| LoadError::Map(map_names::CONFIG, e))?;
        }
        let mut guard = Guard {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            pinned: false,
            links: Vec::new(),
            _lock: lock,
            logger,
            attachments: Vec::new(),
            endpoint_capacity: opts.max_endpoints,
            egress_program: if opts.learn {
                program_names::TC_LEARN
            } else {
                program_names::TC_GUARD
            },
            config,
        };
        // Before any program is attached: an adopted link switches to the new
        // program at once, which must find the endpoints the killed
        // instance guarded (an empty map would let stale frames through),
        // and the static ones (which win over what it had).
        guard.restore_endpoints(kept);
        guard.add_statics(&opts.statics)?;
        if !opts.ingress.is_empty() {
            guard.attach_xdp(&opts.ingress, opts.xdp)?;
        }
        if !opts.egress.is_empty() {
            guard.attach_tc(guard.egress_program, &opts.egress, TcAttachType::Egress)?;
        }
        guard.pin_maps()?;
        guard.record_owner()?;
        Ok(guard)
    }

    /// The router's own MACs the kernel side knows (set when learning).
    fn own_macs(&self) -> impl Iterator<Item = Mac> + '_ {
        let n = (self.config.own_mac_count as usize).min(MAX_OWN_MACS);
        self.config.own_macs[..n].iter().map(|o| Mac(o.mac))
    }

    fn add_own_mac(&mut self, iface: &str, mac: Mac) -> Result<(), LoadError> {
        let mut own: Vec<Mac> = self.own_macs().collect();
        if own.len() >= MAX_OWN_MACS {
            return Err(LoadError::TooManyOwnMacs {
                iface: iface.to_string(),
                mac,
            });
        }
        own.push(mac);
        let mut config = self.config;
        settings::set_own_macs(&mut config, &own);
        let map = self
            .ebpf
            .map_mut(map_names::CONFIG)
            .expect("the object defines its maps");
        let mut cfg: Array<&mut MapData, Config> =
            Array::try_from(map).map_err(|e| LoadError::Map(map_names::CONFIG, e))?;
        cfg.set(0, config, 0)
            .map_err(|e| LoadError::Map(map_names::CONFIG, e))?;
        self.config = config;
        Ok(())
    }

    /// Writes this process's id next to the counters, so that pins left
    /// behind by a crash name the instance that left them.
    fn record_owner(&mut self) -> Result<(), LoadError> {
        let mut arr = self.user_counters()?;
        let mut c = arr
            .get(&0, 0)
            .map_err(|e| LoadError::Map(map_names::USER_COUNTERS, e))?;
        c.owner_pid = u64::from(std::process::id());
        arr.set(0, c, 0)
            .map_err(|e| LoadError::Map(map_names::USER_COUNTERS, e))
    }

    /// The forwarder of the kernel side's log (can be taken once).
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// The event ring buffer (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map: Map = self.ebpf.take_map(map_names::EVENTS).ok_or(LoadError::Map(
            map_names::EVENTS,
            aya::maps::MapError::InvalidName {
                name: map_names::EVENTS.into(),
            },
        ))?;
        RingBuf::try_from(map).map_err(|e| LoadError::Map(map_names::EVENTS, e))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Programs detach when `ebpf` drops (after this); the pins and the
        // directory go now, so that a stopped instance leaves nothing behind.
        if self.pinned {
            for (_, file) in pin_names::ALL {
                let _ = fs::remove_file(self.pin_dir.join(file));
            }
            // Unpinned and closed, each link detaches its program.
            for (_, link) in self.links.drain(..) {
                let _ = link.unpin();
            }
        }
        // The programs pinned per clsact port (their filters go with `ebpf`).
        for entry in fs::read_dir(&self.pin_dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("clsact_") {
                let _ = fs::remove_file(entry.path());
            }
        }
        let _ = fs::remove_dir(&self.pin_dir);
    }
}
