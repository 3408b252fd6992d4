//! Loads the kernel side, attaches it to interfaces and pins its maps and
//! links. `Guard::start` either succeeds whole or leaves nothing new
//! attached or pinned; dropping a `Guard` detaches every program and removes
//! the pins. Pinned links keep the kernel side guarding when the daemon is
//! killed; the next start on the same pin directory adopts them (replacing
//! each program in its link, atomically) and keeps the endpoints the dead
//! instance had.

use std::{
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use flowguard_common::{
    map_names, pin_names, program_names, Config, Endpoint, EndpointKey, UserCounters, MAX_OWN_MACS,
};

use crate::{
    endpoints::{self, EndpointMaps, EndpointTable, Fact, Origin},
    instances,
    run_config::{GuardConfig, XdpAttach},
    settings::{self, Mac, StaticEndpoint},
    sys,
};

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

#[cfg(not(flowguard_ebpf_missing))]
fn object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(env!("FLOWGUARD_EBPF_OBJECT")))
}

#[cfg(flowguard_ebpf_missing)]
fn object() -> Option<&'static [u8]> {
    None
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

    /// Writes the operator's static endpoints (checked: inside the
    /// prefixes, each once, not more than the hash map holds).
    fn add_statics(&mut self, statics: &[StaticEndpoint]) -> Result<(), LoadError> {
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

    fn attach_xdp(&mut self, ifaces: &[String], mode: XdpAttach) -> Result<(), LoadError> {
        let name = program_names::XDP_GUARD;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("the object defines the XDP guard");
        prog.load().map_err(|source| refused(name, "XDP", source))?;
        for iface in ifaces {
            let tries: &[(XdpMode, &str)] = match mode {
                XdpAttach::Auto => &[(XdpMode::Driver, "driver"), (XdpMode::Skb, "skb")],
                XdpAttach::Driver => &[(XdpMode::Driver, "driver")],
                XdpAttach::Skb => &[(XdpMode::Skb, "skb")],
            };
            let mut last = None;
            for (m, label) in tries {
                let pin = link_pin(&self.pin_dir, "xdp", iface);
                let attached = match adopt_link::<XdpLink>(&pin) {
                    Some(old) => prog.attach_to_link(old).or_else(|e| {
                        log::debug!("replacing the program of {}: {e}", pin.display());
                        let _ = fs::remove_file(&pin);
                        prog.attach(iface, *m)
                    }),
                    None => prog.attach(iface, *m),
                };
                match attached {
                    Ok(id) => {
                        let link = prog
                            .take_link(id)
                            .ok()
                            .and_then(|l| FdLink::try_from(l).ok());
                        if let Some(link) = link {
                            keep_pinned(&mut self.links, &mut self.pinned, link, &pin)?;
                        }
                        self.attachments.push(Attachment {
                            iface: iface.clone(),
                            how: format!("XDP ingress ({label} mode)"),
                            ifindex: sys::ifindex(iface).unwrap_or(0),
                            missing: false,
                            program: name,
                            xdp_mode: Some(*m),
                        });
                        last = None;
                        break;
                    }
                    Err(e) => {
                        log::debug!("XDP {label} mode on {iface}: {e}");
                        last = Some(e);
                    }
                }
            }
            if let Some(source) = last {
                return Err(LoadError::Attach {
                    what: "XDP",
                    iface: iface.clone(),
                    source,
                });
            }
        }
        Ok(())
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        ifaces: &[String],
        direction: TcAttachType,
    ) -> Result<(), LoadError> {
        let tcx = tcx_available();
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("the object defines the tc guards");
        prog.load()
            .map_err(|source| refused(name, "tc classifiers", source))?;
        let dir = match direction {
            TcAttachType::Ingress => "ingress",
            _ => "egress",
        };
        for iface in ifaces {
            let pin = link_pin(&self.pin_dir, "tc", iface);
            let link =
                attach_tc_to(prog, iface, direction, &pin).map_err(|source| LoadError::Attach {
                    what: "tc",
                    iface: iface.clone(),
                    source,
                })?;
            if let Some(link) = link {
                keep_pinned(&mut self.links, &mut self.pinned, link, &pin)?;
            }
            let learning = if name == program_names::TC_LEARN {
                ", learning"
            } else {
                ""
            };
            self.attachments.push(Attachment {
                iface: iface.clone(),
                how: format!(
                    "tc {dir} ({}{learning})",
                    if tcx { "tcx" } else { "clsact" }
                ),
                ifindex: sys::ifindex(iface).unwrap_or(0),
                missing: false,
                program: name,
                xdp_mode: None,
            });
        }
        Ok(())
    }

    fn pin_maps(&mut self) -> Result<(), LoadError> {
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

    /// Whether `iface` has the tc egress guard (attached or missing).
    pub fn guards_egress(&self, iface: &str) -> bool {
        self.attachments
            .iter()
            .any(|a| a.iface == iface && a.xdp_mode.is_none())
    }

    /// Attaches the tc egress guard to one more interface while running (a
    /// port that joined a flowtable, for `--auto`): refused, like at start,
    /// when another flowguard guards it. Says how it is attached.
    pub fn add_egress(&mut self, iface: &str) -> Result<String, LoadError> {
        let index = sys::ifindex(iface).ok_or_else(|| LoadError::UnknownInterface(iface.into()))?;
        egress_free(&self.pin_dir, iface)?;
        let name = self.egress_program;
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("the object defines the tc guards");
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| refused(name, "tc classifiers", source))?;
        }
        self.reattach(iface, name, None)
            .map_err(|source| LoadError::Attach {
                what: "tc",
                iface: iface.to_string(),
                source,
            })?;
        let how = format!(
            "tc egress ({}{})",
            if tcx_available() { "tcx" } else { "clsact" },
            if name == program_names::TC_LEARN {
                ", learning"
            } else {
                ""
            }
        );
        self.attachments.push(Attachment {
            iface: iface.to_string(),
            how: how.clone(),
            ifindex: index,
            missing: false,
            program: name,
            xdp_mode: None,
        });
        // Frames the router itself sends from that port are never learned.
        if self.egress_program == program_names::TC_LEARN {
            match sys::if_mac(iface) {
                Ok(mac) if mac.is_unicast() && !self.own_macs().any(|m| m == mac) => {
                    if let Err(e) = self.add_own_mac(iface, mac) {
                        crate::say_err!("flowguard: {e}");
                    }
                }
                _ => {}
            }
        }
        Ok(how)
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

    /// An interface was deleted (`RTM_DELLINK`): the attachments to that
    /// index are missing from now on, even if an interface of the same name
    /// (and index) is back by the time [`Guard::follow_interfaces`] looks.
    pub fn interface_gone(&mut self, index: u32) -> Vec<String> {
        let mut said = Vec::new();
        for a in &mut self.attachments {
            if a.ifindex == index && !a.missing {
                a.missing = true;
                let line = format!(
                    "flowguard: {} went away: it is not guarded until an interface of that name comes back",
                    a.iface
                );
                if !said.contains(&line) {
                    said.push(line);
                }
            }
        }
        said
    }

    /// Whether an interface that came back could not be attached to yet:
    /// [`Guard::follow_interfaces`] should try again in a while.
    pub fn retry_pending(&self) -> bool {
        self.attachments
            .iter()
            .any(|a| a.missing && a.ifindex != 0 && sys::ifindex(&a.iface) == Some(a.ifindex))
    }

    /// Follows the guarded interfaces by name: says when one goes away, and
    /// attaches again to an interface of that name that comes back (veth and
    /// tap ports are recreated, USB NICs replugged). Returns one sentence per
    /// change.
    pub fn follow_interfaces(&mut self) -> Vec<String> {
        let mut said = Vec::new();
        for i in 0..self.attachments.len() {
            let a = &self.attachments[i];
            let now = sys::ifindex(&a.iface);
            match now {
                None if !a.missing => {
                    said.push(format!(
                        "flowguard: {} went away: it is not guarded until an interface of that name comes back",
                        a.iface
                    ));
                    self.attachments[i].missing = true;
                }
                Some(index) if a.missing || index != a.ifindex => {
                    let (iface, program, mode) = (a.iface.clone(), a.program, a.xdp_mode);
                    match self.reattach(&iface, program, mode) {
                        Ok(()) => {
                            let a = &mut self.attachments[i];
                            a.ifindex = index;
                            a.missing = false;
                            said.push(format!(
                                "flowguard: {iface} is back (index {index}): {} attached again",
                                a.how
                            ));
                        }
                        Err(e) => {
                            // Tried again at the next look while the index stays new.
                            if !self.attachments[i].missing {
                                said.push(format!(
                                    "flowguard: {iface} was recreated and cannot be guarded again yet: {e}"
                                ));
                            }
                            self.attachments[i].missing = true;
                            self.attachments[i].ifindex = index;
                        }
                    }
                }
                _ => {}
            }
        }
        said
    }

    fn reattach(
        &mut self,
        iface: &str,
        program: &'static str,
        mode: Option<XdpMode>,
    ) -> Result<(), aya::programs::ProgramError> {
        let prog = self
            .ebpf
            .program_mut(program)
            .expect("the object defines the attached program");
        let (link, pin) = match mode {
            Some(mode) => {
                let xdp: &mut Xdp = prog.try_into()?;
                let id = xdp.attach(iface, mode)?;
                let link = xdp
                    .take_link(id)
                    .ok()
                    .and_then(|l| FdLink::try_from(l).ok());
                (link, link_pin(&self.pin_dir, "xdp", iface))
            }
            None => {
                let tc: &mut SchedClassifier = prog.try_into()?;
                let pin = link_pin(&self.pin_dir, "tc", iface);
                // The old pin held the dead interface's link: nothing to adopt.
                let _ = fs::remove_file(&pin);
                (attach_tc_to(tc, iface, TcAttachType::Egress, &pin)?, pin)
            }
        };
        if let Some(link) = link {
            // The old pin held the dead interface's link.
            if let Err(e) = keep_pinned(&mut self.links, &mut self.pinned, link, &pin) {
                log::warn!("{iface}: pinning its new link failed, so it is not guarded: {e}");
            }
        }
        Ok(())
    }

    /// Puts back the endpoints a killed instance left in its pinned map, so
    /// that a restart loses none of what it learned (the neighbour table's
    /// entries are checked again by the next reconcile).
    fn restore_endpoints(&mut self, kept: KeptEndpoints) {
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

/// Refuses ports that another flowguard guards already (checked after the
/// pin directory's lock, so that the same pin directory says "already
/// running"), and an XDP port taken by any other program.
fn ports_free(opts: &GuardConfig) -> Result<(), LoadError> {
    for iface in &opts.egress {
        egress_free(&opts.pin_dir, iface)?;
    }
    for iface in &opts.ingress {
        if link_pin(&opts.pin_dir, "xdp", iface).exists() {
            continue;
        }
        match instances::xdp_program(iface) {
            Some(p) if p.is_flowguard() => {
                return Err(LoadError::AlreadyGuarded {
                    iface: iface.clone(),
                    hook: "XDP",
                    by: instances::describe_holder(&p),
                })
            }
            Some(p) => {
                return Err(LoadError::XdpTaken {
                    iface: iface.clone(),
                    name: p.name,
                    id: p.id,
                })
            }
            None => {}
        }
    }
    Ok(())
}

/// Refuses `iface` when another flowguard's tc program is on its egress.
fn egress_free(pin_dir: &Path, iface: &str) -> Result<(), LoadError> {
    if !tcx_available() {
        // A clsact filter whose program no live process holds was left by
        // a killed instance: it is adopted (see `attach_tc_to`).
        let filters = instances::clsact_filters(iface, TcAttachType::Egress);
        for f in filters.iter().filter(|f| f.program.is_flowguard()) {
            if instances::holder_of(f.program.id).is_some() {
                return Err(LoadError::AlreadyGuarded {
                    iface: iface.to_string(),
                    hook: "tc egress, clsact",
                    by: instances::describe_holder(&f.program),
                });
            }
        }
        return Ok(());
    }
    // A link this pin directory pinned is ours to adopt.
    if link_pin(pin_dir, "tc", iface).exists() {
        return Ok(());
    }
    let mine = instances::tcx_programs(iface, TcAttachType::Egress);
    if let Some(p) = mine.iter().find(|p| p.is_flowguard()) {
        return Err(LoadError::AlreadyGuarded {
            iface: iface.to_string(),
            hook: "tc egress",
            by: instances::describe_holder(p),
        });
    }
    Ok(())
}

/// Set to `clsact` to attach tc programs as clsact filters even where TCX
/// exists: how kernels before 6.6 attach, tested on newer ones.
pub const TC_ATTACH_ENV: &str = "FLOWGUARD_TC_ATTACH";

/// Whether tc programs attach through TCX links (Linux 6.6+) rather than
/// clsact filters.
fn tcx_available() -> bool {
    if std::env::var_os(TC_ATTACH_ENV).is_some_and(|v| v == "clsact") {
        return false;
    }
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Attaches `prog` to `iface`, replacing the program of what a killed
/// instance left there: with TCX, the link pinned at `pin`, returned to be
/// pinned again; before TCX, a clsact filter of flowguard's that no live
/// process holds (filters are not links: one outlives its process until it
/// is deleted). Either way the replacement is atomic, so that the port is
/// never unguarded, nor guarded twice. A clsact filter stays owned by the
/// program, which deletes it when flowguard stops.
fn attach_tc_to(
    prog: &mut SchedClassifier,
    iface: &str,
    direction: TcAttachType,
    pin: &Path,
) -> Result<Option<FdLink>, aya::programs::ProgramError> {
    if !tcx_available() {
        // A clsact qdisc carries the filter; one may exist already.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            log::debug!("clsact on {iface}: {e} (may already exist)");
        }
        let mut left: Vec<_> = instances::clsact_filters(iface, direction)
            .into_iter()
            .filter(|f| f.program.is_flowguard() && instances::holder_of(f.program.id).is_none())
            .collect();
        let filter = |f: &instances::ClsactFilter| {
            SchedClassifierLink::attached(iface, direction, f.priority, f.handle.into(), None)
        };
        let mut adopted = false;
        if let Some(first) = left.first() {
            match filter(first).map(|old| prog.attach_to_link(old)) {
                Ok(Ok(_)) => {
                    log::info!(
                        "{iface}: took over the clsact filter (priority {}) that a stopped \
                         flowguard left, program {} (id {})",
                        first.priority,
                        first.program.name,
                        first.program.id
                    );
                    adopted = true;
                    left.remove(0);
                }
                Ok(Err(e)) => log::debug!("replacing the program of {iface}'s filter: {e}"),
                Err(e) => log::debug!("{iface}: {e}"),
            }
        }
        if !adopted {
            prog.attach_with_options(
                iface,
                direction,
                tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
            )?;
        }
        // More than one left behind: only one may guard.
        for f in &left {
            if let Ok(old) = filter(f) {
                if let Err(e) = aya::programs::links::Link::detach(old) {
                    log::warn!("{iface}: deleting a leftover flowguard filter failed: {e}");
                }
            }
        }
        // A filter is not a link to pin: the program is pinned per port
        // instead, so that status can tell whether the port still has it.
        let program_pin = clsact_pin(pin);
        let _ = fs::remove_file(&program_pin);
        if let Err(e) = prog
            .fd()
            .map_err(io::Error::other)
            .and_then(|fd| sys::pin_object(fd.as_fd(), &program_pin))
        {
            log::warn!(
                "{iface}: pinning the program at {} failed, so status cannot show this port: {e}",
                program_pin.display()
            );
        }
        return Ok(None);
    }
    let attached = match adopt_link::<SchedClassifierLink>(pin) {
        Some(old) => prog.attach_to_link(old).or_else(|e| {
            log::debug!("replacing the program of {}: {e}", pin.display());
            let _ = fs::remove_file(pin);
            prog.attach(iface, direction)
        }),
        None => prog.attach(iface, direction),
    }?;
    Ok(prog
        .take_link(attached)
        .ok()
        .and_then(|l| FdLink::try_from(l).ok()))
}

/// The kernel's HZ: jiffies read twice by the kernel side, 100 ms apart,
/// rounded to the nearest value Linux is built with.
pub fn kernel_hz(ebpf: &mut Ebpf) -> Result<u32, LoadError> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let name = program_names::JIFFIES;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .expect("the object defines the jiffies probe");
    prog.load().map_err(|source| refused(name, "XDP", source))?;
    let frame = [0u8; 64];
    let read = || -> Result<(u32, std::time::Instant), LoadError> {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ..Default::default()
            })
            .map_err(|e| LoadError::Hz(e.to_string()))?;
        Ok((r.return_value, std::time::Instant::now()))
    };
    let (j0, t0) = read()?;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (j1, t1) = read()?;
    let measured = j1.wrapping_sub(j0) as f64 / (t1 - t0).as_secs_f64();
    Ok(nearest_hz(measured))
}

/// The HZ Linux can be built with that is nearest to a measurement.
pub fn nearest_hz(measured: f64) -> u32 {
    [100u32, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| {
            let da = (*a as f64 - measured).abs();
            let db = (*b as f64 - measured).abs();
            da.total_cmp(&db)
        })
        .expect("a non-empty list")
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
fn keep_pinned(
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
fn adopt_link<T: TryFrom<FdLink>>(pin: &Path) -> Option<T> {
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
type KeptEndpoints = Vec<(EndpointKey, Endpoint)>;

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
fn lock_pin_dir(dir: &Path) -> Result<(fs::File, bool, KeptEndpoints), LoadError> {
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

#[cfg(test)]
mod tests {
    use super::nearest_hz;

    #[test]
    fn hz_measurements_round_to_a_linux_hz() {
        assert_eq!(nearest_hz(247.0), 250);
        assert_eq!(nearest_hz(292.0), 300);
        assert_eq!(nearest_hz(96.0), 100);
        assert_eq!(nearest_hz(1010.0), 1000);
    }
}

/// Loads the object without the kernel's BTF. These programs have no CO-RE
/// relocations, so /sys/kernel/btf/vmlinux is of no use to them, yet aya
/// 0.14 parses it in `EbpfLoader::new()` (and `Ebpf::load` a second time):
/// ~30 MB at peak, a lot on a router. `.btf(None)` only drops it after the
/// parse, so the file is hidden while the loader is made. The maps still get
/// the object's own BTF (named fields in `bpftool map dump`).
fn load_without_kernel_btf(
    object: &[u8],
    max_endpoints: u32,
    v4_slots: u32,
) -> Result<Ebpf, aya::EbpfError> {
    let mut loader = match KernelBtfHidden::new() {
        Ok(hidden) => {
            let loader = EbpfLoader::new();
            drop(hidden);
            loader
        }
        Err(e) => {
            log::debug!("the kernel's BTF is parsed at load ({e}): loading takes more memory");
            EbpfLoader::new()
        }
    };
    loader
        .btf(None)
        .map_max_entries(map_names::ENDPOINTS, max_endpoints)
        // An array map needs at least one entry.
        .map_max_entries(map_names::ENDPOINTS_V4, v4_slots.max(1))
        .load(object)
}

/// While it lives, this process sees /dev/null at /sys/kernel/btf/vmlinux,
/// in a mount namespace of its own; dropping it returns to the original
/// namespace (and working directory), which nothing else ever left.
struct KernelBtfHidden {
    original: fs::File,
    cwd: PathBuf,
}

impl KernelBtfHidden {
    fn new() -> std::io::Result<Self> {
        use std::io::{Error, ErrorKind};
        let vmlinux = c"/sys/kernel/btf/vmlinux";
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(Error::new(ErrorKind::NotFound, "no kernel BTF to hide"));
        }
        let original = fs::File::open("/proc/self/ns/mnt")?;
        let cwd = std::env::current_dir()?;
        // Fails (EINVAL) once other threads share our filesystem context, and
        // (EPERM) without CAP_SYS_ADMIN: then the BTF is simply parsed.
        // SAFETY: plain syscalls on constant, NUL-terminated paths.
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            return Err(Error::last_os_error());
        }
        let hidden = Self { original, cwd };
        // Slave first, so that the bind mount below never reaches the host.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(Error::last_os_error());
        }
        let rc = unsafe {
            libc::mount(
                c"/dev/null".as_ptr(),
                vmlinux.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(Error::last_os_error());
        }
        Ok(hidden)
    }
}

impl Drop for KernelBtfHidden {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on a namespace fd we opened.
        if unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
            log::warn!(
                "could not return to the original mount namespace: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        // setns moved us to the namespace's root directory.
        if let Err(e) = std::env::set_current_dir(&self.cwd) {
            log::warn!("could not return to {}: {e}", self.cwd.display());
        }
    }
}

fn refused(
    program: &'static str,
    feature: &'static str,
    error: aya::programs::ProgramError,
) -> LoadError {
    let reason = match &error {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            log::debug!("the verifier's log for {program}:\n{log}");
            refusal_reason(&log).unwrap_or_else(|| io_error.to_string())
        }
        other => other.to_string(),
    };
    LoadError::Program {
        program,
        feature,
        reason,
    }
}

/// Helpers flowguard's programs call that older kernels lack: (id, name,
/// first kernel with it).
const NEWER_HELPERS: &[(u32, &str, &str)] = &[
    (118, "bpf_jiffies64", "5.5"),
    (130, "bpf_ringbuf_output", "5.8"),
    (131, "bpf_ringbuf_reserve", "5.8"),
    (132, "bpf_ringbuf_submit", "5.8"),
    (133, "bpf_ringbuf_discard", "5.8"),
    (160, "bpf_ktime_get_coarse_ns", "5.11"),
];

/// Why an old kernel refusing the programs is no loss (see
/// `doctor::MAC_CACHING_KERNEL`).
const NOT_NEEDED_BEFORE_5_13: &str = "mainline kernels before 5.13 do not cache MACs in the \
     flowtable and do not need flowguard (`flowguard doctor` tells)";

/// The verifier's reason for refusing a program. Its log starts with the
/// instructions it walked (source lines, register states) and ends with the
/// verdict, then statistics: the verdict is the last lines before the
/// statistics. An unknown helper gets the kernel version that has it.
pub fn refusal_reason(log: &str) -> Option<String> {
    let is_statistics = |line: &str| {
        line.starts_with("processed ")
            || line.starts_with("verification time")
            || line.starts_with("stack depth")
            || line.starts_with("max_states_per_insn")
            || line.starts_with("peak_states")
            || line.starts_with("mark_read")
    };
    let meaningful: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_statistics(l))
        .collect();
    // Source lines (`; ...`) and instructions (`12: (85) call ...`) are
    // context, not the verdict.
    let is_context = |l: &str| {
        l.starts_with(';')
            || l.split_once(':')
                .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    };
    let verdict_end = meaningful.iter().rposition(|l| !is_context(l))?;
    let start = meaningful[..=verdict_end]
        .iter()
        .rposition(|l| is_context(l))
        .map_or(0, |i| i + 1)
        .max(verdict_end.saturating_sub(1));
    let mut reason = meaningful[start..=verdict_end].join("; ");
    if let Some(id) = unknown_helper(&reason) {
        match NEWER_HELPERS.iter().find(|(known, _, _)| *known == id) {
            Some((_, name, version)) => reason.push_str(&format!(
                " (helper {id} is {name}, in Linux {version} and later: flowguard needs Linux 5.11+; \
                 {NOT_NEEDED_BEFORE_5_13})"
            )),
            None => reason.push_str(&format!(
                " (helper {id} is missing from this kernel: flowguard needs Linux 5.11+; \
                 {NOT_NEEDED_BEFORE_5_13})"
            )),
        }
    }
    Some(reason)
}

/// The helper id in "invalid func unknown#160" or "unknown func bpf_x#160".
fn unknown_helper(text: &str) -> Option<u32> {
    if !text.contains("invalid func") && !text.contains("unknown func") {
        return None;
    }
    let after = &text[text.find('#')? + 1..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod refusal_tests {
    use super::refusal_reason;

    #[test]
    fn an_unknown_helper_names_the_kernel_it_needs() {
        // The shape of a 5.10 kernel's log for flowguard's tc program.
        let log = "; unsafe { (*self.skb).data_end as usize }\n\
                   0: (61) r2 = *(u32 *)(r1 +80)\n\
                   ; let now = bpf_ktime_get_coarse_ns();\n\
                   57: (85) call unknown#160\n\
                   invalid func unknown#160\n\
                   processed 58 insns (limit 1000000) max_states_per_insn 0 total_states 3 peak_states 3 mark_read 2\n";
        let reason = refusal_reason(log).unwrap();
        assert!(reason.starts_with("invalid func unknown#160"), "{reason}");
        assert!(reason.contains("bpf_ktime_get_coarse_ns"), "{reason}");
        assert!(reason.contains("5.11"), "{reason}");
        assert!(!reason.contains("data_end"), "{reason}");
    }

    #[test]
    fn the_verdict_is_the_last_lines_before_the_statistics() {
        let log = "0: (b7) r0 = 0\n\
                   1: (61) r2 = *(u32 *)(r1 +76)\n\
                   R1 offset is outside of the packet\n\
                   invalid access to packet, off=14 size=2, R1(id=0,off=14,r=0)\n\
                   R1 offset is outside of the packet\n\
                   processed 12 insns (limit 1000000)\n\
                   verification time 20 usec\n";
        let reason = refusal_reason(log).unwrap();
        assert_eq!(
            reason,
            "invalid access to packet, off=14 size=2, R1(id=0,off=14,r=0); R1 offset is outside of the packet"
        );
    }

    #[test]
    fn an_empty_log_gives_no_reason() {
        assert_eq!(refusal_reason(""), None);
        assert_eq!(refusal_reason("processed 3 insns\n"), None);
    }
}
