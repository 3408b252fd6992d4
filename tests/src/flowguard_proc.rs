//! Runs the real `flowguard` binary inside a test namespace: starts it, keeps
//! its output for assertions, reads `flowguard status --json`, and stops it.
//! The guard kills a flowguard that is still running when it is dropped.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde::Deserialize;

use crate::netns::{run, try_run, Netns};
use crate::wait::Wait;

/// How long flowguard may take to load, attach and pin before the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long flowguard may take to detach and exit after SIGINT.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// `flowguard status`'s exit code while it runs with a guarded interface
/// missing (1: not running).
pub const STATUS_INTERFACE_MISSING: i32 = 3;
/// The line flowguard prints once it is attached and pinned.
pub const READY_LINE: &str = "flowguard: ready";

/// The binary under test: `$FLOWGUARD_BIN`, or the workspace's release build.
pub fn flowguard_bin() -> PathBuf {
    match std::env::var_os("FLOWGUARD_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/release/flowguard")
            .components()
            .collect(),
    }
}

/// Panics with a useful message unless the binary under test exists.
pub fn require_flowguard_bin() -> PathBuf {
    let bin = flowguard_bin();
    assert!(
        bin.is_file(),
        "flowguard binary not found at {}; build it with `cargo build --release -p \
         flowguard-user` (or `cargo xtask test`), or point FLOWGUARD_BIN at it",
        bin.display()
    );
    bin
}

/// `flowguard status --json`, as the CLI contract defines it.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub pin_dir: String,
    pub mode: String,
    pub counters: StatusCounters,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StatusCounters {
    pub checked: u64,
    pub stale: u64,
    pub rewritten: u64,
    pub ambiguous: u64,
    pub events: u64,
    pub events_lost: u64,
    pub learned_new: u64,
    pub learned_moved: u64,
    pub learn_failed: u64,
    // Bridge ports: frames out of a port other than the FDB's.
    #[serde(default)]
    pub wrong_port: u64,
    #[serde(default)]
    pub redirected: u64,
    // Router role (kernel-side confirmation, neighbour sync, eviction):
    // absent from the JSON of older builds.
    #[serde(default)]
    pub unconfirmed: u64,
    #[serde(default)]
    pub neigh_added: u64,
    #[serde(default)]
    pub neigh_moved: u64,
    #[serde(default)]
    pub neigh_removed: u64,
    #[serde(default)]
    pub neigh_ambiguous: u64,
    #[serde(default)]
    pub neigh_overflows: u64,
    #[serde(default)]
    pub reconciles: u64,
    #[serde(default)]
    pub eviction_runs: u64,
    #[serde(default)]
    pub evicted: u64,
    #[serde(default)]
    pub dry_run_matches: u64,
    #[serde(default)]
    pub eviction_errors: u64,
    #[serde(default)]
    pub probes_sent: u64,
    #[serde(default)]
    pub probes_unanswered: u64,
    #[serde(default)]
    pub probe_moves: u64,
    #[serde(default)]
    pub probe_ambiguous: u64,
    // Host role, macvlan/ipvlan children.
    #[serde(default)]
    pub children_added: u64,
    #[serde(default)]
    pub children_removed: u64,
    // Bridge FDB: endpoints that moved to another port.
    #[serde(default)]
    pub port_moves: u64,
    #[serde(default)]
    pub port_flaps: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EndpointStatus {
    pub ip: String,
    pub mac: String,
    pub source: String,
    pub age_secs: Option<f64>,
    pub stale_packets: u64,
    pub rewritten: u64,
    pub last_stale_mac: Option<String>,
    pub ambiguous: bool,
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default)]
    pub wrong_port: u32,
}

impl Status {
    pub fn endpoint(&self, ip: &str) -> Option<&EndpointStatus> {
        self.endpoints.iter().find(|endpoint| endpoint.ip == ip)
    }

    /// Whether `ip` is tracked with `mac` (compared case-insensitively).
    pub fn has_endpoint(&self, ip: &str, mac: &str) -> bool {
        self.endpoint(ip)
            .is_some_and(|endpoint| endpoint.mac.eq_ignore_ascii_case(mac))
    }
}

/// Lines a reader thread collects, with a condition variable to wait on.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Lines {
    fn push(&self, line: String) {
        self.lines.lock().expect("lines lock").push(line);
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for another line.
    fn wait_changed(&self, timeout: Duration) {
        let lines = self.lines.lock().expect("lines lock");
        drop(self.changed.wait_timeout(lines, timeout));
    }

    fn snapshot(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }
}

/// A running (or exited) `flowguard run` inside a namespace.
pub struct Flowguard {
    child: Child,
    bin: PathBuf,
    pin_dir: PathBuf,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
    readers: Vec<JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

impl Flowguard {
    /// Starts the binary under test in `netns` with `run <args> --pin-dir
    /// <pin_dir>` and waits until it is ready.
    pub fn start(netns: &Netns, pin_dir: &Path, args: &[&str]) -> Self {
        let mut flowguard = Self::spawn(&require_flowguard_bin(), netns, pin_dir, args, false);
        flowguard.wait_ready();
        flowguard
    }

    /// Starts `bin run <args> --pin-dir <pin_dir>` in `netns` (network
    /// namespace only: bpffs paths stay the host's) without waiting for it.
    /// With `echo`, its stdout and stderr are also printed as they arrive.
    pub fn spawn(bin: &Path, netns: &Netns, pin_dir: &Path, args: &[&str], echo: bool) -> Self {
        Self::spawn_with_env(bin, netns, pin_dir, args, &[], echo)
    }

    /// [`Flowguard::start`] with extra environment variables.
    pub fn start_with_env(
        netns: &Netns,
        pin_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let bin = require_flowguard_bin();
        let mut flowguard = Self::spawn_with_env(&bin, netns, pin_dir, args, env, false);
        flowguard.wait_ready();
        flowguard
    }

    /// [`Flowguard::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        bin: &Path,
        netns: &Netns,
        pin_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        echo: bool,
    ) -> Self {
        Self::spawn_wrapped(&[], bin, netns, pin_dir, args, env, echo)
    }

    /// [`Flowguard::start`] with `wrapper` (a command that ends by running
    /// its arguments, such as `unshare -m ...`) in front of `nsenter`.
    pub fn start_wrapped(wrapper: &[&str], netns: &Netns, pin_dir: &Path, args: &[&str]) -> Self {
        let bin = require_flowguard_bin();
        let mut flowguard = Self::spawn_wrapped(wrapper, &bin, netns, pin_dir, args, &[], false);
        flowguard.wait_ready();
        flowguard
    }

    fn spawn_wrapped(
        wrapper: &[&str],
        bin: &Path,
        netns: &Netns,
        pin_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        echo: bool,
    ) -> Self {
        let (program, wrapper_args) = match wrapper.split_first() {
            Some((first, rest)) => (*first, rest),
            None => ("nsenter", &[][..]),
        };
        let mut command = Command::new(program);
        command.args(wrapper_args);
        if !wrapper.is_empty() {
            command.arg("nsenter");
        }
        let mut child = command
            .envs(env.iter().copied())
            .arg(format!("--net={}", netns.path().display()))
            .arg(bin)
            .arg("run")
            .args(args)
            .arg("--pin-dir")
            .arg(pin_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", bin.display()));
        let stdout = Arc::new(Lines::default());
        let stderr = Arc::new(Lines::default());
        let readers = vec![
            read_lines::<ChildStdout>(child.stdout.take(), stdout.clone(), echo.then_some("")),
            read_lines::<ChildStderr>(child.stderr.take(), stderr.clone(), echo.then_some("log ")),
        ];
        Self {
            child,
            bin: bin.to_owned(),
            pin_dir: pin_dir.to_owned(),
            stdout,
            stderr,
            readers,
            exit: None,
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// flowguard's process id (`nsenter` execs it, so it keeps the pid).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for [`READY_LINE`]; panics with flowguard's stderr if it exits or
    /// takes longer than [`READY_TIMEOUT`].
    pub fn wait_ready(&mut self) {
        if let Err(error) = self.try_wait_ready() {
            panic!("{error}");
        }
    }

    /// Like [`Flowguard::wait_ready`], but returns what went wrong.
    pub fn try_wait_ready(&mut self) -> Result<(), String> {
        let stdout = Arc::clone(&self.stdout);
        // None while starting; then ready, or the exit status.
        let started = Wait::new(format!("`{READY_LINE}`"), READY_TIMEOUT)
            .every(Duration::from_millis(100))
            .poll_pausing(
                || {
                    let ready = self
                        .stdout_lines()
                        .iter()
                        .any(|line| line.starts_with(READY_LINE));
                    if ready {
                        Some(Ok(()))
                    } else {
                        self.try_exit().map(Err)
                    }
                },
                Option::is_some,
                |at_most| stdout.wait_changed(at_most),
            );
        match started {
            Ok(Some(Ok(()))) => Ok(()),
            Ok(Some(Err(status))) => Err(format!(
                "flowguard exited ({status}) before it was ready; stderr:\n{}",
                self.stderr_text()
            )),
            Ok(None) | Err(_) => Err(format!(
                "flowguard was not ready after {READY_TIMEOUT:?}; stdout:\n{}\nstderr:\n{}",
                self.stdout_lines().join("\n"),
                self.stderr_text()
            )),
        }
    }

    /// Every line flowguard printed on stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.snapshot()
    }

    /// Everything flowguard printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.snapshot().join("\n")
    }

    /// Waits up to `timeout` for a stdout line that satisfies `wanted`.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> Option<String> {
        Wait::new("a stdout line", timeout)
            .every(Duration::from_millis(100))
            .poll_pausing(
                || self.stdout_lines().into_iter().find(|line| wanted(line)),
                Option::is_some,
                |at_most| self.stdout.wait_changed(at_most),
            )
            .ok()
            .flatten()
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(status) = self.child.try_wait().expect("poll flowguard") {
                self.exit = Some(status);
                // The pipes are closed now: collect the last lines.
                self.join_readers();
            }
        }
        self.exit
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// Waits up to `timeout` for flowguard to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        Wait::new("flowguard to exit", timeout)
            .poll(|| self.try_exit(), Option::is_some)
            .ok()
            .flatten()
    }

    /// Sends SIGINT and waits for flowguard to exit; panics if it does not
    /// within [`STOP_TIMEOUT`] (and kills it).
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGINT)
    }

    /// Like [`Flowguard::stop`], with another signal (SIGTERM from systemd).
    pub fn stop_with(&mut self, signal: libc::c_int) -> ExitStatus {
        if let Some(status) = self.try_exit() {
            return status;
        }
        self.signal(signal);
        match self.wait_exit(STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                self.kill();
                panic!(
                    "flowguard did not exit within {STOP_TIMEOUT:?} of signal {signal}; \
                     stderr:\n{}",
                    self.stderr_text()
                );
            }
        }
    }

    /// Sends `signal` to flowguard without waiting for anything.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions; the child has not
        // been reaped (try_exit returned None), so the pid is still ours.
        unsafe { libc::kill(pid, signal) };
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exit = Some(status);
        }
        self.join_readers();
    }

    /// `flowguard status --json` for this pin directory, parsed.
    pub fn status(&self) -> Status {
        let json = self.status_command(&["--json"]);
        serde_json::from_str(&json).unwrap_or_else(|error| {
            panic!("`flowguard status --json` does not match the contract ({error}):\n{json}")
        })
    }

    /// `flowguard status --json` for this pin directory, as raw JSON.
    pub fn status_json(&self) -> serde_json::Value {
        let json = self.status_command(&["--json"]);
        serde_json::from_str(&json).unwrap_or_else(|error| {
            panic!("`flowguard status --json` is not JSON ({error}):\n{json}")
        })
    }

    /// `flowguard status` (the human table) for this pin directory.
    pub fn status_table(&self) -> String {
        self.status_command(&[])
    }

    fn status_command(&self, extra: &[&str]) -> String {
        let (code, stdout) = self.status_exit(extra);
        assert!(
            code == Some(0) || code == Some(STATUS_INTERFACE_MISSING),
            "`flowguard status {}` exited {code:?}: {stdout}",
            extra.join(" ")
        );
        stdout
    }

    /// `flowguard status <extra>` for this pin directory: its exit code and
    /// stdout, whatever the code.
    pub fn status_exit(&self, extra: &[&str]) -> (Option<i32>, String) {
        let pin_dir = self.pin_dir.to_string_lossy();
        let mut args = vec!["status"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--pin-dir", &pin_dir]);
        let out = try_run(&self.bin.to_string_lossy(), &args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Polls `flowguard status --json` until `wanted` holds, for up to
    /// `timeout`; returns the status that satisfied it, or panics with the
    /// last one and `what` was awaited.
    pub fn wait_for_status(
        &self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&Status) -> bool,
    ) -> Status {
        Wait::new(what, timeout)
            .every(Duration::from_millis(100))
            .until(|| self.status(), |status| wanted(status))
    }

    /// Like [`Flowguard::wait_for_status`], but returns the last status as the
    /// error instead of panicking.
    pub fn poll_status(
        &self,
        timeout: Duration,
        wanted: impl Fn(&Status) -> bool,
    ) -> Result<Status, Box<Status>> {
        Wait::new("a status", timeout)
            .every(Duration::from_millis(100))
            .poll(|| self.status(), |status| wanted(status))
            .map_err(|timed_out| Box::new(timed_out.last))
    }
}

impl Drop for Flowguard {
    fn drop(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        // Give it the chance to detach and unpin cleanly before killing it.
        self.signal(libc::SIGINT);
        if self.wait_exit(STOP_TIMEOUT).is_none() {
            self.kill();
        }
    }
}

/// Collects `source`'s lines into `lines` on a thread; with `echo`, also
/// prints each one, prefixed, as it arrives.
fn read_lines<R: Read + Send + 'static>(
    source: Option<R>,
    lines: Arc<Lines>,
    echo: Option<&'static str>,
) -> JoinHandle<()> {
    let source = source.expect("piped output");
    thread::spawn(move || {
        for line in BufReader::new(source).lines() {
            let Ok(line) = line else { break };
            if let Some(prefix) = echo {
                println!("    | flowguard {prefix}> {line}");
            }
            lines.push(line);
        }
    })
}

/// `bpftool map dump pinned <pin_dir>/<map>`: the pinned map as bpftool
/// prints it (named fields, thanks to BTF).
pub fn bpftool_dump(pin_dir: &Path, map: &str) -> String {
    let path = pin_dir.join(map);
    run(
        "bpftool",
        &["map", "dump", "pinned", &path.to_string_lossy()],
    )
}
