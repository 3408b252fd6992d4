//! Attaching the programs: XDP on ingress, tc (TCX or clsact) on egress, at
//! start and while running (`--auto`'s new ports, interfaces that come
//! back), and the checks that no other flowguard guards a port already.

use std::{fs, io, os::fd::AsFd as _, path::Path};

use aya::{
    programs::{
        links::FdLink,
        tc::{self, SchedClassifierLink},
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    util::KernelVersion,
};
use flowguard_common::program_names;

use super::{
    object::refused,
    pins::{adopt_link, clsact_pin, keep_pinned, link_pin},
    Attachment, Guard, LoadError,
};
use crate::{
    instances,
    run_config::{GuardConfig, XdpAttach},
    sys,
};

impl Guard {
    pub(super) fn attach_xdp(
        &mut self,
        ifaces: &[String],
        mode: XdpAttach,
    ) -> Result<(), LoadError> {
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

    pub(super) fn attach_tc(
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

    /// The interfaces the tc egress guard is attached to (router role).
    pub fn egress_ports(&self) -> Vec<String> {
        self.attachments
            .iter()
            .filter(|a| a.xdp_mode.is_none())
            .map(|a| a.iface.clone())
            .collect()
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
}

/// Refuses ports that another flowguard guards already (checked after the
/// pin directory's lock, so that the same pin directory says "already
/// running"), and an XDP port taken by any other program.
pub(super) fn ports_free(opts: &GuardConfig) -> Result<(), LoadError> {
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
