//! The eBPF object: embedded at build time, loaded without the kernel's BTF,
//! the kernel's HZ measured with it, and the verifier's verdict when the
//! kernel refuses a program.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{programs::Xdp, Ebpf, EbpfLoader};
use flowguard_common::{map_names, program_names};

use super::LoadError;

#[cfg(not(flowguard_ebpf_missing))]
pub(super) fn object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(env!("FLOWGUARD_EBPF_OBJECT")))
}

#[cfg(flowguard_ebpf_missing)]
pub(super) fn object() -> Option<&'static [u8]> {
    None
}

/// Loads the object without the kernel's BTF. These programs have no CO-RE
/// relocations, so /sys/kernel/btf/vmlinux is of no use to them, yet aya
/// 0.14 parses it in `EbpfLoader::new()` (and `Ebpf::load` a second time):
/// ~30 MB at peak, a lot on a router. `.btf(None)` only drops it after the
/// parse, so the file is hidden while the loader is made. The maps still get
/// the object's own BTF (named fields in `bpftool map dump`).
pub(super) fn load_without_kernel_btf(
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

pub(super) fn refused(
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
