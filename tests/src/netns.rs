//! Guards for the kernel state a namespace test creates: network namespaces,
//! private bpffs mounts, and the checks that decide whether a test can run
//! here at all. Every guard undoes its work in `Drop`, also when a test panics.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

/// Distinguishes the guards one process creates, so that tests (and a test
/// whose cleanup failed) never reuse a name.
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

fn unique_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its command line, status and stderr if it
/// cannot start or fails. Returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = try_run(program, args);
    if !output.status.success() {
        panic!(
            "`{} {}` failed ({}): {}",
            program,
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command and returns its output whatever its exit status; panics only
/// if it cannot be started at all.
pub fn try_run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run `{program}`: {error}"))
}

/// A network namespace named `fg<pid>-<n>-<role>`, deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace; `role` only makes the name readable.
    pub fn new(role: &str) -> Self {
        let name = format!("fg{}-{role}", unique_suffix());
        run("ip", &["netns", "add", &name]);
        let netns = Self { name };
        // Loopback up, so that sockets bound to local addresses behave normally.
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that `nsenter --net=` and `setns` take.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `args` inside the namespace with `ip netns exec` and returns its
    /// stdout; panics with stderr if the command fails. `ip netns exec` also
    /// remounts /sys, so never use it for anything that needs the host's bpffs.
    pub fn exec(&self, args: &[&str]) -> String {
        run("ip", &self.exec_args(args))
    }

    /// Like [`Netns::exec`], but returns the output whatever the exit status.
    pub fn try_exec(&self, args: &[&str]) -> Output {
        try_run("ip", &self.exec_args(args))
    }

    fn exec_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        full
    }

    /// Runs `ip -n <ns> args` (no /sys remount, cheaper than `exec`).
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `program args` in this network namespace but in the host's mount
    /// namespace (`nsenter --net`), so that bpffs paths stay the host's.
    pub fn nsenter(&self, program: &str, args: &[&str]) -> Output {
        let net = format!("--net={}", self.path().display());
        let mut full = vec![net.as_str(), program];
        full.extend_from_slice(args);
        try_run("nsenter", &full)
    }

    /// Runs `f` on a new thread that has entered this network namespace and
    /// returns its result. Sockets created inside `f` stay in this namespace
    /// for their whole life, wherever they are used afterwards.
    pub fn enter<T, F>(&self, f: F) -> T
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let path = self.path();
        let file = File::open(&path)
            .unwrap_or_else(|error| panic!("cannot open {}: {error}", path.display()));
        thread::scope(|scope| {
            let handle = scope.spawn(|| {
                // SAFETY: `file` is an open namespace file; setns only changes
                // this thread's network namespace, and the thread ends after `f`.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    panic!(
                        "setns into {} failed: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                }
                f()
            });
            match handle.join() {
                Ok(value) => value,
                Err(payload) => std::panic::resume_unwind(payload),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let output = try_run("ip", &["netns", "delete", &self.name]);
        if !output.status.success() {
            eprintln!(
                "warning: cannot delete network namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
}

/// A private bpffs mounted on a fresh temporary directory, so that a test
/// never touches /sys/fs/bpf; unmounting it drops every pin inside.
pub struct BpffsMount {
    root: PathBuf,
    mount_point: PathBuf,
}

impl BpffsMount {
    pub fn new() -> Self {
        let root = std::env::temp_dir().join(format!("flowguard-test-{}", unique_suffix()));
        let mount_point = root.join("bpffs");
        fs::create_dir_all(&mount_point)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", mount_point.display()));
        let guard = Self { root, mount_point };
        run(
            "mount",
            &["-t", "bpf", "bpf", &guard.mount_point.to_string_lossy()],
        );
        guard
    }

    /// The mounted bpffs.
    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    /// The pin directory flowguard is told to use: a directory flowguard
    /// creates itself, directly on the private bpffs.
    pub fn pin_dir(&self) -> PathBuf {
        self.mount_point.join("flowguard")
    }
}

impl Default for BpffsMount {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let mount_point = self.mount_point.to_string_lossy().into_owned();
        let output = try_run("umount", &[&mount_point]);
        if !output.status.success() {
            // Something still holds it (a process that will not die): detach
            // it lazily rather than leave a mount behind.
            let lazy = try_run("umount", &["-l", &mount_point]);
            if !lazy.status.success() {
                eprintln!(
                    "warning: cannot unmount {mount_point}: {}",
                    String::from_utf8_lossy(&lazy.stderr).trim()
                );
                return;
            }
        }
        if let Err(error) = fs::remove_dir_all(&self.root) {
            eprintln!("warning: cannot remove {}: {error}", self.root.display());
        }
    }
}

/// The crate's one check for root: `None` as root, else the reason a test
/// (or bench) skips, `needs root (<what>)`, where `what` says what root is
/// needed for. [`require_root!`](crate::require_root) skips with it.
pub fn needs_root(what: &str) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() == 0 };
    (!root).then(|| format!("needs root ({what})"))
}

/// Why the namespace tests cannot run here, or `None` if they can: they need
/// root and the tools that build and inspect the topology.
pub fn missing_prerequisite() -> Option<String> {
    if let Some(reason) = needs_root("network namespaces, bpffs, eBPF") {
        return Some(reason);
    }
    for tool in ["ip", "nsenter", "mount", "nft", "bpftool"] {
        // Only whether it can be started matters (`ip` has no `--version`).
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// Why nftables netdev-family egress hooks (Linux 5.16, CONFIG_NETFILTER_EGRESS)
/// are unusable here, or `None` if a scratch namespace accepts such a chain.
/// The namespace tests use one to emulate a sender with a stale MAC.
pub fn missing_nft_egress() -> Option<String> {
    let netns = Netns::new("probe");
    // veth, not dummy: this kernel has no dummy driver.
    netns.ip(&[
        "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
    ]);
    let output = netns.try_exec(&[
        "nft",
        "add table netdev probe; \
         add chain netdev probe egress { type filter hook egress device probe0 priority 0; }",
    ]);
    if output.status.success() {
        None
    } else {
        Some(format!(
            "nftables netdev egress hooks are unavailable: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Says why the calling test cannot run here; the caller then returns. Outside
/// CI the test passes with `skipped: <reason>`; under `CI=true` (CI runs as
/// root on a kernel that has everything) it fails naming what was missing,
/// because a skip there would hide a broken suite.
pub fn skip(reason: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    if ci {
        panic!("CI=true, and this test cannot run here: {reason}");
    }
    println!("skipped: {reason}");
}

/// Returns early from the calling test, printing `skipped: needs root
/// (<what>)`, unless it runs as root (under `CI=true`: fails instead).
/// [`skip_unless_root!`] checks the tools of the namespace tests too.
#[macro_export]
macro_rules! require_root {
    ($what:expr) => {
        if let Some(reason) = $crate::netns::needs_root($what) {
            $crate::netns::skip(&reason);
            return;
        }
    };
}

/// Returns early from the calling test, printing `skipped: <reason>`, unless
/// it runs as root with the needed tools (under `CI=true`: fails instead).
#[macro_export]
macro_rules! skip_unless_root {
    () => {
        if let Some(reason) = $crate::netns::missing_prerequisite() {
            $crate::netns::skip(&reason);
            return;
        }
    };
}

/// Like [`skip_unless_root!`], and also skips when nftables netdev egress hooks
/// (the stale-sender emulation) are unavailable.
#[macro_export]
macro_rules! skip_unless_host_role_supported {
    () => {
        $crate::skip_unless_root!();
        if let Some(reason) = $crate::netns::missing_nft_egress() {
            $crate::netns::skip(&reason);
            return;
        }
    };
}
