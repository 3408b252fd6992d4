//! What a running process uses, read from /proc: for the benches and the
//! memory budget.

use std::io;

/// CPU time of a process in nanoseconds: the sum over its threads of the
/// scheduler's run time (`/proc/PID/task/TID/schedstat`, first field),
/// finer than the clock ticks of `/proc/PID/stat`.
pub fn cpu_ns(pid: u32) -> io::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        if let Ok(s) = std::fs::read_to_string(&path) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| io::Error::other(format!("bad {}: {s:?}", path.display())))?;
        }
    }
    Ok(total)
}

/// (VmRSS, VmHWM) of a process in kB.
pub fn memory_kb(pid: u32) -> io::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> io::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no {name} in /proc/{pid}/status")))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
