//! `--auto` while running: the flowtables' bridge ports read again, and
//! what is guarded against them.

use std::time::Duration;

use crate::loader::Guard;

/// What the flowtables say now about where MACs are cached, against what is
/// guarded: a bridge port added to a flowtable since the start is named.
pub fn flowtable_summary(guard: &Guard, read: Result<Vec<String>, String>, auto: bool) -> String {
    let ports = match read {
        Ok(ports) => ports,
        Err(e) => return format!("flowtables: {e}"),
    };
    let unguarded: Vec<&str> = ports
        .iter()
        .filter(|p| !guard.guards_egress(p))
        .map(String::as_str)
        .collect();
    if unguarded.is_empty() {
        format!("flowtables: bridge ports {}, all guarded", ports.join(", "))
    } else if auto {
        format!(
            "flowtables: bridge ports {}; not guarded: {} (see the lines above)",
            ports.join(", "),
            unguarded.join(", ")
        )
    } else {
        format!(
            "flowtables: bridge ports {}; not guarded: {} (restart with --auto or --egress to guard them)",
            ports.join(", "),
            unguarded.join(", ")
        )
    }
}

/// `--auto` while running: the flowtables' bridge ports as last read.
pub struct AutoPorts {
    ports: Vec<String>,
    /// The last failure (reading, or attaching to a port), said once.
    failures: std::collections::HashSet<String>,
}

impl AutoPorts {
    /// How long a burst of changes may last before the flowtables are read.
    pub const SETTLE: Duration = Duration::from_millis(500);

    pub fn new(ports: Vec<String>) -> Self {
        Self {
            ports,
            failures: Default::default(),
        }
    }

    /// Takes the flowtables' bridge ports as read again: guards a port
    /// that joined one, names one that left. One sentence per change.
    pub fn follow(&mut self, guard: &mut Guard, read: Result<Vec<String>, String>) -> Vec<String> {
        let mut said = Vec::new();
        let ports = match read {
            Ok(ports) => ports,
            Err(e) => {
                let why = format!(
                    "flowguard: reading the flowtables: {e}; the guarded ports stay guarded"
                );
                if self.failures.insert(why.clone()) {
                    said.push(why);
                }
                return said;
            }
        };
        self.failures
            .retain(|f| !f.starts_with("flowguard: reading the flowtables"));
        for port in &ports {
            if guard.guards_egress(port) {
                continue;
            }
            match guard.add_egress(port) {
                Ok(how) => said.push(format!(
                    "flowguard: {port} is a flowtable bridge port now: {how} attached"
                )),
                Err(e) => {
                    let why = format!(
                        "flowguard: {port} is a flowtable bridge port now, but cannot be guarded: {e}"
                    );
                    if self.failures.insert(why.clone()) {
                        said.push(why);
                    }
                }
            }
        }
        for old in &self.ports {
            // A deleted port is named by the interface follower.
            if !ports.contains(old) && crate::sys::ifindex(old).is_some() {
                said.push(format!(
                    "flowguard: {old} is no longer a flowtable bridge port: still guarded \
                     (harmless; restart flowguard to leave it)"
                ));
            }
        }
        self.ports = ports;
        said
    }
}
