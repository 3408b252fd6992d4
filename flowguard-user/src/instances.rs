//! Other flowguard instances on this machine: which one holds a program
//! attached to an interface, so that a second instance refuses by name
//! instead of stacking a second guard on a port (TCX allows that silently)
//! or failing with a raw "File exists" (XDP).

use std::{fs, path::PathBuf, process::Command};

use aya::programs::{tc::SchedClassifier, TcAttachType};

/// A BPF program attached to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub id: u32,
    pub name: String,
}

impl Attached {
    /// Whether flowguard loaded it (its programs are all `flowguard_*`).
    pub fn is_flowguard(&self) -> bool {
        self.name.starts_with("flowguard_")
    }
}

/// The TCX programs on `iface` in `direction`; empty where TCX is not
/// available (kernels before 6.6 attach through clsact, not checked here).
pub fn tcx_programs(iface: &str, direction: TcAttachType) -> Vec<Attached> {
    match SchedClassifier::query_tcx(iface, direction) {
        Ok((_, programs)) => programs
            .iter()
            .map(|p| Attached {
                id: p.id(),
                name: p.name_as_str().unwrap_or("").to_string(),
            })
            .collect(),
        Err(e) => {
            log::debug!("querying the TCX programs of {iface}: {e}");
            Vec::new()
        }
    }
}

/// A BPF filter on an interface's clsact qdisc (kernels before 6.6): not
/// a link, so it outlives the process that attached it until someone
/// deletes it by its priority and handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClsactFilter {
    pub program: Attached,
    pub priority: u16,
    pub handle: u32,
}

/// The BPF filters on `iface`'s clsact `direction` hook (empty when it has
/// no clsact qdisc or the dump fails: the attach then says what failed).
pub fn clsact_filters(iface: &str, direction: TcAttachType) -> Vec<ClsactFilter> {
    let Some(index) = crate::sys::ifindex(iface) else {
        return Vec::new();
    };
    match dump_filters(index, direction) {
        Ok(f) => f,
        Err(e) => {
            log::debug!("listing the tc filters of {iface}: {e}");
            Vec::new()
        }
    }
}

const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)`.
fn clsact_parent(direction: TcAttachType) -> u32 {
    match direction {
        TcAttachType::Ingress => 0xffff_fff2,
        _ => 0xffff_fff3,
    }
}

fn dump_filters(index: u32, direction: TcAttachType) -> std::io::Result<Vec<ClsactFilter>> {
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    let mut req = Vec::with_capacity(36);
    req.extend_from_slice(&36u32.to_ne_bytes());
    req.extend_from_slice(&RTM_GETTFILTER.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.extend_from_slice(&[0, 0, 0, 0]); // family, pads
    req.extend_from_slice(&(index as i32).to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // handle
    req.extend_from_slice(&clsact_parent(direction).to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes()); // info
    socket.send(&req, 0)?;
    let mut filters = Vec::new();
    let mut buf = Vec::new();
    loop {
        crate::neigh::source::recv(std::os::fd::AsRawFd::as_raw_fd(&socket), &mut buf)?;
        let (done, more) = parse_filters(&buf)?;
        filters.extend(more);
        if done {
            return Ok(filters);
        }
    }
}

/// The BPF filters in one dump datagram, and whether the dump is done.
fn parse_filters(mut buf: &[u8]) -> std::io::Result<(bool, Vec<ClsactFilter>)> {
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32_at(buf, 0) as usize;
        let kind = u16_at(buf, 4);
        if len < 16 || len > buf.len() {
            break;
        }
        let msg = &buf[16..len];
        match kind {
            NLMSG_DONE => return Ok((true, out)),
            NLMSG_ERROR if msg.len() >= 4 => {
                let code = i32::from_ne_bytes(msg[..4].try_into().expect("4 bytes"));
                return Err(std::io::Error::from_raw_os_error(-code));
            }
            RTM_NEWTFILTER if msg.len() >= 20 => {
                let handle = u32_at(msg, 8);
                let priority = (u32_at(msg, 16) >> 16) as u16;
                let (mut bpf, mut id, mut name) = (false, None, String::new());
                for (t, v) in attributes(&msg[20..]) {
                    match t {
                        TCA_KIND => bpf = v.starts_with(b"bpf\0") || v == b"bpf",
                        TCA_OPTIONS => {
                            for (t, v) in attributes(v) {
                                match t {
                                    TCA_BPF_ID if v.len() >= 4 => id = Some(u32_at(v, 0)),
                                    TCA_BPF_NAME => {
                                        let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
                                        name = String::from_utf8_lossy(&v[..end]).into_owned();
                                    }
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
                if let (true, Some(id)) = (bpf, id) {
                    // aya names the filter after the program (`tc` after
                    // the object file and section).
                    out.push(ClsactFilter {
                        program: Attached { id, name },
                        priority,
                        handle,
                    });
                }
            }
            _ => {}
        }
        buf = buf.get((len + 3) & !3..).unwrap_or_default();
    }
    Ok((false, out))
}

/// Netlink attributes: (type without flags, value).
fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = b.get((len + 3) & !3..).unwrap_or_default();
    }
    out
}

/// The XDP program on `iface`, as `ip -j -d link show` reports it (`None`
/// when there is none or `ip` cannot tell: the attach then says what failed).
pub fn xdp_program(iface: &str) -> Option<Attached> {
    let out = Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", iface])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    xdp_program_in(&v)
}

fn xdp_program_in(v: &serde_json::Value) -> Option<Attached> {
    let prog = v.get(0)?.get("xdp")?.get("prog")?;
    Some(Attached {
        id: u32::try_from(prog.get("id")?.as_u64()?).ok()?,
        name: prog.get("name")?.as_str()?.to_string(),
    })
}

/// The process (other than this one) that holds program `id`, and the pin
/// directory on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub pin_dir: Option<PathBuf>,
}

/// Finds the process holding program `id` through /proc/PID/fdinfo, where a
/// program fd or a link fd shows `prog_id:`.
pub fn holder_of(id: u32) -> Option<Holder> {
    let me = std::process::id();
    let wanted = format!("prog_id:\t{id}");
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| fs::read_to_string(fd.path()).is_ok_and(|t| t.lines().any(|l| l == wanted)));
        if holds {
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            return Some(Holder {
                pid,
                pin_dir: pin_dir_in_cmdline(&cmdline),
            });
        }
    }
    None
}

/// The value of `--pin-dir` in a NUL-separated command line.
fn pin_dir_in_cmdline(cmdline: &[u8]) -> Option<PathBuf> {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.iter().enumerate().find_map(|(i, a)| {
        if a == "--pin-dir" {
            args.get(i + 1).map(PathBuf::from)
        } else {
            a.strip_prefix("--pin-dir=").map(PathBuf::from)
        }
    })
}

/// Who holds program `p`, in words: "PID 1234 with pin directory /x".
pub fn describe_holder(p: &Attached) -> String {
    match holder_of(p.id) {
        Some(Holder {
            pid,
            pin_dir: Some(dir),
        }) => format!("PID {pid} with pin directory {}", dir.display()),
        Some(Holder { pid, pin_dir: None }) => {
            format!("PID {pid} with the default pin directory")
        }
        None => format!(
            "program {} (id {}) held by no process (the pinned link of a killed instance: \
             start flowguard with that instance's --pin-dir to take it over)",
            p.name, p.id
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_dir_comes_from_either_spelling() {
        let c = b"flowguard\0run\0--egress\0lan1\0--pin-dir\0/sys/fs/bpf/a\0";
        assert_eq!(pin_dir_in_cmdline(c), Some(PathBuf::from("/sys/fs/bpf/a")));
        let c = b"flowguard\0run\0--pin-dir=/x/b\0";
        assert_eq!(pin_dir_in_cmdline(c), Some(PathBuf::from("/x/b")));
        assert_eq!(pin_dir_in_cmdline(b"flowguard\0run\0"), None);
    }

    #[test]
    fn the_xdp_program_is_read_from_ip_json() {
        let v = serde_json::json!([{"ifname": "lan1", "xdp": {"mode": 1,
            "prog": {"id": 297, "name": "flowguard_xdp", "tag": "46234a8a422607df"}}}]);
        let p = xdp_program_in(&v).unwrap();
        assert_eq!((p.id, p.name.as_str()), (297, "flowguard_xdp"));
        assert!(p.is_flowguard());
        assert_eq!(
            xdp_program_in(&serde_json::json!([{"ifname": "lan1"}])),
            None
        );
    }
}
