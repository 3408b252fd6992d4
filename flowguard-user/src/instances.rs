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
