//! flowguard keeps protecting through ordinary faults, and never calls a dead
//! instance running: a closed stdout, signals, a killed daemon's leftovers, a
//! second instance on the same port, a full endpoint map. Each test runs the
//! real binary in a namespace of its own on a private bpffs.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use flowguard_tests::{
    flowguard_proc::{
        require_flowguard_bin, Flowguard, Status, READY_TIMEOUT, STATUS_INTERFACE_MISSING,
        STOP_TIMEOUT,
    },
    netns::{BpffsMount, Netns},
    skip_unless_root,
    wait::{Text, Wait},
};

const PREFIX: &str = "192.168.1.0/24";

/// A namespace with `lan1` (one end of a veth) up and addressed in [`PREFIX`],
/// so that neighbour entries can be added on it.
fn namespace() -> Netns {
    let ns = Netns::new("fault");
    ns.ip(&[
        "link", "add", "lan1", "type", "veth", "peer", "name", "peer1",
    ]);
    ns.ip(&["addr", "add", "192.168.1.1/24", "dev", "lan1"]);
    ns.ip(&["link", "set", "lan1", "up"]);
    ns.ip(&["link", "set", "peer1", "up"]);
    ns
}

/// Adds (or replaces) a permanent neighbour entry on `lan1`.
fn add_neighbour(ns: &Netns, ip: &str, mac: &str) {
    ns.ip(&[
        "neigh",
        "replace",
        ip,
        "lladdr",
        mac,
        "dev",
        "lan1",
        "nud",
        "permanent",
    ]);
}

/// A stdout whose reader is already gone: every write fails with EPIPE, as
/// after `flowguard run | head` once `head` has exited.
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Stdio::from(writer)
}

/// `flowguard <args>` in `ns` with stdout on a closed pipe, to completion.
fn run_with_closed_stdout(ns: &Netns, args: &[&str]) -> Output {
    let bin = require_flowguard_bin();
    Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

/// `flowguard status --json --pin-dir <pin_dir>` parsed, or `None` while no
/// instance answers there.
fn try_status(pin_dir: &Path) -> Option<Status> {
    let out = Command::new(require_flowguard_bin())
        .args(["status", "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .expect("run flowguard status");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// A `flowguard run` started by hand (stdout not collected), killed on drop.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn spawn(ns: &Netns, pin_dir: &Path, stdout: Stdio, args: &[&str]) -> Self {
        let bin = require_flowguard_bin();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg(&bin)
            .arg("run")
            .args(args)
            .arg("--pin-dir")
            .arg(pin_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Self { child }
    }

    fn pid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t")
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the child is not
        // reaped before `wait_exit`, so the pid is still ours.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Polls `status` for `pin_dir` until `wanted` holds; panics with the
    /// daemon's stderr if it exits first or after `timeout`.
    fn wait_status(
        &mut self,
        pin_dir: &Path,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&Status) -> bool,
    ) -> Status {
        let seen = Wait::new(what, timeout)
            .every(Duration::from_millis(100))
            .poll(
                || (try_status(pin_dir).filter(|s| wanted(s)), self.running()),
                |(status, running)| status.is_some() || !running,
            );
        if let Ok((Some(status), _)) = seen {
            return status;
        }
        let (status, stderr) = self.wait_exit(Duration::ZERO);
        panic!("waiting for {what}: flowguard is gone or stuck ({status}); stderr:\n{stderr}");
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("poll flowguard").is_none()
    }

    /// Waits for the exit; returns its status and everything on stderr.
    fn wait_exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let exited = Wait::new("flowguard to exit", timeout)
            .poll(|| self.running(), |running| !running)
            .is_ok();
        if !exited {
            let _ = self.child.kill();
        }
        let status = self.child.wait().expect("wait flowguard");
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        (status, stderr)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.running() {
            self.signal(libc::SIGINT);
            let _ = self.wait_exit(STOP_TIMEOUT);
        }
    }
}

/// A directory on an ordinary filesystem for the files a test writes (ip
/// batches, shims): the one that holds the private bpffs.
fn scratch_dir(bpffs: &BpffsMount) -> PathBuf {
    bpffs
        .path()
        .parent()
        .expect("the bpffs has a parent")
        .to_path_buf()
}

fn pins_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_closed_stdout_does_not_end_the_daemon() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let mut daemon = Daemon::spawn(
        &ns,
        &pin_dir,
        closed_pipe(),
        &["--egress", "lan1", "--prefix", PREFIX],
    );
    daemon.wait_status(&pin_dir, "start-up", READY_TIMEOUT, |_| true);
    // Each new neighbour is a sentence on stdout: the daemon must drop it and
    // keep following the table.
    add_neighbour(&ns, "192.168.1.50", "02:00:00:00:00:50");
    daemon.wait_status(
        &pin_dir,
        "the new neighbour",
        Duration::from_secs(10),
        |s| s.has_endpoint("192.168.1.50", "02:00:00:00:00:50"),
    );
    add_neighbour(&ns, "192.168.1.50", "02:00:00:00:00:51");
    daemon.wait_status(&pin_dir, "the MAC change", Duration::from_secs(10), |s| {
        s.has_endpoint("192.168.1.50", "02:00:00:00:00:51")
    });
    assert!(daemon.running(), "flowguard exited on a closed stdout");

    // `status` on a closed pipe (`status --json | head -c 200`) must not panic.
    let pin = pin_dir.to_string_lossy();
    for args in [
        &["status", "--json", "--pin-dir", &pin][..],
        &["status", "--pin-dir", &pin],
        &["doctor"],
    ] {
        let out = run_with_closed_stdout(&ns, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() != Some(101) && !stderr.contains("panicked"),
            "`flowguard {}` panicked on a closed stdout ({}): {stderr}",
            args.join(" "),
            out.status
        );
    }

    daemon.signal(libc::SIGINT);
    let (status, stderr) = daemon.wait_exit(STOP_TIMEOUT);
    assert!(
        status.success() && !stderr.contains("panicked"),
        "a clean stop even with a closed stdout ({status}); stderr:\n{stderr}"
    );
    assert!(pins_in(&pin_dir).is_empty(), "pins removed on exit");
}

/// The line flowguard prints once its event loop handles signals.
const LOOP_LINE: &str = "flowguard: following the neighbour table";

fn start_and_wait_for_loop(ns: &Netns, pin_dir: &Path) -> Flowguard {
    let fg = Flowguard::start(ns, pin_dir, &["--egress", "lan1", "--prefix", PREFIX]);
    fg.wait_for_line(READY_TIMEOUT, |l| l.starts_with(LOOP_LINE))
        .unwrap_or_else(|| panic!("no `{LOOP_LINE}`; stderr:\n{}", fg.stderr_text()));
    fg
}

#[test]
fn sighup_rereads_and_sigusr_is_ignored() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let mut fg = start_and_wait_for_loop(&ns, &pin_dir);
    let pinned = pins_in(&pin_dir);
    let reconciles = fg.status().counters.reconciles;

    fg.signal(libc::SIGHUP);
    let (exit, _) = Wait::new("the SIGHUP line", Duration::from_secs(10))
        .every(Duration::from_millis(100))
        .until(
            || (fg.wait_exit(Duration::ZERO), Text(fg.stderr_text())),
            |(exit, Text(stderr))| {
                exit.is_some() || stderr.contains("SIGHUP: read the neighbour table again")
            },
        );
    assert!(
        exit.is_none(),
        "SIGHUP ended flowguard; pins left: {:?}",
        pins_in(&pin_dir)
    );
    assert!(
        fg.stderr_text().contains("flowtables"),
        "says what the flowtables hold: {}",
        fg.stderr_text()
    );
    assert_eq!(
        fg.status().counters.reconciles,
        reconciles + 1,
        "SIGHUP reconciled the endpoint map with the neighbour table"
    );

    for sig in [libc::SIGUSR1, libc::SIGUSR2] {
        fg.signal(sig);
        assert!(
            fg.wait_exit(Duration::from_secs(1)).is_none(),
            "signal {sig} ended flowguard; pins left: {:?}",
            pins_in(&pin_dir)
        );
    }
    assert_eq!(pins_in(&pin_dir), pinned, "still pinned and answering");
    assert_eq!(fg.status().mode, "fix");
    assert!(fg.stop().success());
    assert!(!pin_dir.exists(), "pins removed on exit");
}

#[test]
fn sigquit_stops_cleanly() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let mut fg = start_and_wait_for_loop(&ns, &pin_dir);
    let status = fg.stop_with(libc::SIGQUIT);
    assert!(
        status.success(),
        "SIGQUIT: {status}; stderr:\n{}",
        fg.stderr_text()
    );
    assert!(
        !pin_dir.exists(),
        "SIGQUIT left pins: {:?}",
        pins_in(&pin_dir)
    );
    let shown = ns.nsenter("bpftool", &["net", "show", "dev", "lan1"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(!text.contains("flowguard"), "still attached: {text}");
}

/// `flowguard <args>` in `ns`, to completion, whatever its exit status.
fn flowguard_in(ns: &Netns, args: &[&str]) -> Output {
    let bin = require_flowguard_bin();
    let mut full = vec![bin.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    ns.nsenter(full[0], &full[1..])
}

#[test]
fn status_and_doctor_call_a_killed_instance_gone() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let pin = pin_dir.to_string_lossy().into_owned();
    let mut fg = Flowguard::start(&ns, &pin_dir, &["--egress", "lan1", "--prefix", PREFIX]);
    let pid = fg.pid();
    assert_eq!(fg.status_json()["running"], true, "a live instance runs");
    let doctor = flowguard_in(&ns, &["doctor", "--json", "--pin-dir", &pin]);
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout)
        .unwrap_or_else(|e| panic!("doctor --json --pin-dir: {e}: {doctor:?}"));
    assert_eq!(report["flowguard"]["running"], true, "{report:#}");

    fg.signal(libc::SIGKILL);
    assert!(fg.wait_exit(STOP_TIMEOUT).is_some(), "SIGKILL");
    assert!(!pins_in(&pin_dir).is_empty(), "SIGKILL leaves the pins");

    let gone = format!("not running; pins left by PID {pid}, which is gone");
    for extra in [&[][..], &["--json"]] {
        let mut args = vec!["status", "--pin-dir", &pin];
        args.extend_from_slice(extra);
        let out = flowguard_in(&ns, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(&gone),
            "`flowguard {}` after SIGKILL ({}): stdout:\n{}\nstderr:\n{stderr}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let doctor = flowguard_in(&ns, &["doctor", "--json", "--pin-dir", &pin]);
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout)
        .unwrap_or_else(|e| panic!("doctor --json --pin-dir: {e}: {doctor:?}"));
    assert_eq!(report["flowguard"]["running"], false, "{report:#}");
    let check = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == "flowguard")
        .expect("a flowguard check");
    assert!(
        check["message"].as_str().unwrap_or("").contains(&gone) && check["verdict"] != "ok",
        "{check:#}"
    );

    // A new instance on the same pin directory takes the leftovers over.
    let mut again = Flowguard::start(&ns, &pin_dir, &["--egress", "lan1", "--prefix", PREFIX]);
    assert_eq!(again.status_json()["running"], true);
    assert!(again.stop().success());
}

/// The flowguard programs attached to `lan1` in `ns`: TCX egress (which this
/// Debian's bpftool does not list) and XDP.
fn flowguard_programs_on_lan1(ns: &Netns) -> usize {
    flowguard_programs_on(ns, "lan1")
}

/// The flowguard programs attached to `iface` in `ns` (TCX egress and XDP).
fn flowguard_programs_on(ns: &Netns, iface: &str) -> usize {
    use aya::programs::{tc::SchedClassifier, TcAttachType};
    let tcx = ns.enter(|| {
        let (_, programs) =
            SchedClassifier::query_tcx(iface, TcAttachType::Egress).expect("query TCX");
        programs
            .iter()
            .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("flowguard_")))
            .count()
    });
    let link: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "-d", "link", "show", "dev", iface])).expect("ip -j");
    let xdp = link[0]["xdp"]["attached"].as_array().map_or(0, |a| {
        a.iter()
            .filter(|p| {
                p["prog"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("flowguard_"))
            })
            .count()
    });
    tcx + xdp
}

fn second_instance_on_the_same_port_is_refused(hook: &str) {
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let first_dir = bpffs.pin_dir();
    let second_dir = bpffs.path().join("second");
    let args = [hook, "lan1", "--prefix", PREFIX];
    let mut first = Flowguard::start(&ns, &first_dir, &args);
    let attached = flowguard_programs_on_lan1(&ns);
    assert_eq!(attached, 1, "one guard on lan1");

    let mut second = Flowguard::spawn(&require_flowguard_bin(), &ns, &second_dir, &args, false);
    let exit = second.wait_exit(READY_TIMEOUT);
    let stderr = second.stderr_text();
    assert!(
        exit.is_some_and(|e| !e.success()),
        "the second instance on lan1 must be refused; it {}: {stderr}",
        match exit {
            Some(e) => format!("exited {e}"),
            None => format!(
                "runs, with {} flowguard programs on lan1",
                flowguard_programs_on_lan1(&ns)
            ),
        }
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "refused in one line: {stderr}");
    let pid = first.pid().to_string();
    let line = lines[0];
    println!("refused: {line}");
    assert!(
        line.contains("lan1")
            && (line.contains(&pid) || line.contains(&first_dir.to_string_lossy().into_owned())),
        "names the port and the other instance: {line}"
    );
    assert!(!second_dir.exists(), "the refused instance pinned nothing");
    assert_eq!(
        flowguard_programs_on_lan1(&ns),
        attached,
        "the refused instance attached nothing"
    );
    assert_eq!(first.status().mode, "fix", "the first keeps running");
    assert!(first.stop().success());
}

#[test]
fn a_second_instance_on_the_same_tc_port_is_refused() {
    skip_unless_root!();
    second_instance_on_the_same_port_is_refused("--egress");
}

#[test]
fn a_second_instance_on_the_same_xdp_port_is_refused() {
    skip_unless_root!();
    second_instance_on_the_same_port_is_refused("--ingress");
}

/// While frames to an endpoint stay stale and it has no offloaded conntrack
/// entry (none exists on this kernel), the log says so once, not at every
/// debounce, and gives the count when the requests stop.
#[test]
fn a_stale_endpoint_without_offloaded_entries_is_one_line_per_episode() {
    use flowguard_tests::router::{
        RouterTopology, ENDPOINT_A_IP, LAN_PREFIX, MAC_A1, MAC_A2, PORT_A,
    };
    if let Some(reason) = flowguard_tests::router::missing_prerequisite()
        .or_else(flowguard_tests::netns::missing_nft_egress)
    {
        flowguard_tests::netns::skip(&reason);
        return;
    }
    let bpffs = BpffsMount::new();
    let mut topology = RouterTopology::new();
    topology.resolve(ENDPOINT_A_IP);
    let mut flow = topology.udp_flow(ENDPOINT_A_IP, 51820);
    topology.move_endpoint(ENDPOINT_A_IP, MAC_A2);
    topology.set_stale(ENDPOINT_A_IP, MAC_A1);
    let fg = Flowguard::start(
        &topology.router,
        &bpffs.pin_dir(),
        &[
            "--egress",
            PORT_A,
            "--prefix",
            LAN_PREFIX,
            "--evict-debounce-ms",
            "500",
        ],
    );
    let a = ENDPOINT_A_IP.to_string();
    fg.wait_for_status("endpoint A at its new MAC", Duration::from_secs(10), |s| {
        s.has_endpoint(&a, MAC_A2)
    });
    // Stale frames for 6 s: a stale event per second, each asking for an
    // eviction that finds no offloaded entry.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        flow.send_burst(5);
        thread::sleep(Duration::from_millis(200));
    }
    let runs = fg.status().counters.eviction_runs;
    assert!(runs >= 3, "the stale frames asked for evictions: {runs}");
    let said = |text: &str| {
        text.lines()
            .filter(|l| l.contains("no offloaded conntrack entry to evict"))
            .count()
    };
    assert_eq!(
        said(&fg.stderr_text()),
        1,
        "one line for {runs} evictions that found nothing:\n{}",
        fg.stderr_text()
    );
    // The episode ends once the requests stop.
    Wait::new("a line ending the episode", Duration::from_secs(15))
        .every(Duration::from_millis(200))
        .until(
            || Text(fg.stderr_text()),
            |Text(stderr)| stderr.contains("evictions over"),
        );
    println!("{}", fg.stderr_text());
}

/// Writes `ip -batch` lines that set `n` neighbours on `lan1` (from
/// 192.168.1.2 up), each at a MAC ending in `last`.
fn neighbour_batch_of(dir: &Path, n: u32, last: u8) -> PathBuf {
    let path = dir.join(format!("neigh-{n}-{last}.batch"));
    let text: String = (0..n)
        .map(|i| {
            let ip = 2 + i;
            format!(
                "neigh replace 192.168.1.{ip} lladdr 02:00:00:00:{ip:02x}:{last:02x} dev lan1 nud permanent\n"
            )
        })
        .collect();
    std::fs::write(&path, text).expect("write the batch");
    path
}

fn neighbour_batch(dir: &Path, last: u8) -> PathBuf {
    neighbour_batch_of(dir, 200, last)
}

/// 200 endpoints move at once with the default limit of 50 evictions per
/// second: the 150 over the limit wait their turn (the queue shows in
/// status) and every one of them runs.
#[test]
fn rate_limited_evictions_are_deferred_not_dropped() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let scratch = scratch_dir(&bpffs);
    let fg = Flowguard::start(
        &ns,
        &bpffs.pin_dir(),
        &["--egress", "lan1", "--prefix", PREFIX],
    );
    let first = neighbour_batch(&scratch, 1);
    ns.ip(&["-batch", &first.to_string_lossy()]);
    fg.wait_for_status("200 endpoints", Duration::from_secs(20), |s| {
        s.endpoints.len() == 200
    });
    let runs = fg.status().counters.eviction_runs;
    let moved = neighbour_batch(&scratch, 2);
    ns.ip(&["-batch", &moved.to_string_lossy()]);
    let mut deepest = 0;
    // Evictions run, the queue's depth, the counters.
    let (_, queue, user) = Wait::new("200 evictions to run", Duration::from_secs(20))
        .every(Duration::from_millis(100))
        .until(
            || {
                let json = fg.status_json();
                let queue = json["eviction_queue"]
                    .as_u64()
                    .expect("eviction_queue in status");
                deepest = deepest.max(queue);
                let done = fg.status().counters.eviction_runs - runs;
                (done, queue, Text(format!("{:#}", json["counters"])))
            },
            |&(done, _, _)| done >= 200,
        );
    let user: serde_json::Value = serde_json::from_str(&user.0).expect("the counters");
    assert_eq!(queue, 0, "the queue drained: {user:#}");
    assert!(
        user["evictions_deferred"].as_u64().unwrap_or(0) >= 100,
        "most of them were deferred: {user:#}"
    );
    assert!(deepest > 0, "the queue showed in status while it waited");
    assert!(
        fg.stderr_text()
            .contains("further evictions wait their turn"),
        "{}",
        fg.stderr_text()
    );
    println!("deepest queue seen: {deepest}");
}

/// One `GET /metrics` from inside `ns`; `Err` says what went wrong.
fn try_scrape(ns: &Netns, addr: std::net::SocketAddr) -> Result<(), String> {
    use std::io::Write as _;
    let timeout = Duration::from_secs(3);
    let mut stream = ns
        .enter(|| std::net::TcpStream::connect_timeout(&addr, timeout))
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    if raw.starts_with("HTTP/1.1 200") && raw.contains("flowguard_checked_total") {
        Ok(())
    } else {
        Err(format!("answer: {:?}", raw.lines().next()))
    }
}

/// Raises this process's soft limit of open files to the hard one: the test
/// itself holds a thousand sockets.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A thousand idle connections held open (and more opened all along) never
/// keep a scrape out, and the daemon's memory stays flat.
#[test]
fn metrics_are_served_while_a_thousand_idle_connections_are_held() {
    skip_unless_root!();
    raise_nofile();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let addr: std::net::SocketAddr = "127.0.0.1:9737".parse().unwrap();
    let fg = Flowguard::start(
        &ns,
        &bpffs.pin_dir(),
        &[
            "--egress",
            "lan1",
            "--prefix",
            PREFIX,
            "--metrics",
            "127.0.0.1:9737",
        ],
    );
    try_scrape(&ns, addr).expect("a scrape without idle connections");
    let rss_before = rss_kib(fg.pid());
    let mut idle = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) =
            ns.enter(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
        {
            idle.push(s);
        }
    }
    assert!(
        idle.len() >= 900,
        "only {} idle connections opened",
        idle.len()
    );
    let mut served = 0;
    let mut failures = Vec::new();
    for _ in 0..20 {
        for _ in 0..50 {
            if let Ok(s) =
                ns.enter(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            {
                idle.push(s);
            }
        }
        match try_scrape(&ns, addr) {
            Ok(()) => served += 1,
            Err(e) => failures.push(e),
        }
        thread::sleep(Duration::from_millis(100));
    }
    let rss_after = rss_kib(fg.pid());
    println!(
        "{served} of 20 scrapes served with {} idle connections opened; RSS {rss_before} -> {rss_after} KiB",
        idle.len()
    );
    assert_eq!(served, 20, "scrapes failed: {failures:?}");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
}

/// More neighbours than the endpoint map holds: the daemon keeps running
/// and guarding the endpoints that fit, warns once (not at every
/// reconcile), counts the ones left out once each, and says the map is full;
/// when room frees up, the left-out ones get in.
#[test]
fn a_full_endpoint_map_never_stops_the_daemon() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let scratch = scratch_dir(&bpffs);
    let mut fg = Flowguard::start(
        &ns,
        &bpffs.pin_dir(),
        &[
            "--egress",
            "lan1",
            // Larger than a /20: its endpoints are in the hash map, the
            // one --max-endpoints sizes (a /24 has a slot for each address).
            "--prefix",
            "192.168.0.0/16",
            "--max-endpoints",
            "100",
            "--reconcile-secs",
            "1",
        ],
    );
    let batch = neighbour_batch_of(&scratch, 150, 1);
    ns.ip(&["-batch", &batch.to_string_lossy()]);
    let json = |fg: &Flowguard| fg.status_json();
    let (exit, _) = Wait::new(
        "100 endpoints in the map and 50 dropped",
        Duration::from_secs(20),
    )
    .every(Duration::from_millis(200))
    .poll(
        || (fg.wait_exit(Duration::ZERO), json(&fg)),
        |(exit, st)| {
            exit.is_some()
                || (st["endpoints"].as_array().map_or(0, Vec::len) == 100
                    && st["counters"]["endpoints_dropped"] == 50)
        },
    )
    .unwrap_or_else(|timed_out| panic!("{timed_out}; status: {:#}", timed_out.last.1));
    assert!(
        exit.is_none(),
        "a full endpoint map ended flowguard:\n{}",
        fg.stderr_text()
    );
    // Several reconciles later: still running, still 50, one warning.
    thread::sleep(Duration::from_secs(3));
    assert!(
        fg.wait_exit(Duration::ZERO).is_none(),
        "{}",
        fg.stderr_text()
    );
    let st = json(&fg);
    assert_eq!(st["counters"]["endpoints_dropped"], 50, "{st:#}");
    assert_eq!(st["endpoint_map_full"], true, "{st:#}");
    assert_eq!(st["endpoint_capacity"], 100, "{st:#}");
    let warnings = fg
        .stderr_text()
        .lines()
        .filter(|l| l.contains("the endpoint map is full"))
        .count();
    assert_eq!(
        warnings,
        1,
        "one warning per episode:\n{}",
        fg.stderr_text()
    );
    let table = fg.status_table();
    assert!(table.contains("endpoint map FULL: 100 of 100"), "{table}");
    let metrics_line = "endpoints_dropped";
    assert!(st["counters"].get(metrics_line).is_some());

    // Room again: 60 leave, and the 50 left out get in.
    for i in 0..60u32 {
        ns.ip(&[
            "neigh",
            "del",
            &format!("192.168.1.{}", 2 + i),
            "dev",
            "lan1",
        ]);
    }
    Wait::new("90 endpoints and a map with room", Duration::from_secs(20))
        .every(Duration::from_millis(200))
        .poll(
            || json(&fg),
            |st| {
                st["endpoints"].as_array().map_or(0, Vec::len) == 90
                    && st["endpoint_map_full"] == false
            },
        )
        .unwrap_or_else(|timed_out| panic!("{timed_out}; status: {:#}", timed_out.last));
    Wait::new("the line saying the map has room", Duration::from_secs(10))
        .every(Duration::from_millis(200))
        .until(
            || Text(fg.stderr_text()),
            |Text(stderr)| stderr.contains("the endpoint map has room again"),
        );
    assert!(fg.stop().success());
}

/// Under `CI=true`, a privileged test that cannot run (here: as an
/// unprivileged user) fails and names what was missing; elsewhere it says
/// `skipped` and passes.
#[test]
fn under_ci_a_privileged_test_that_cannot_run_fails() {
    skip_unless_root!();
    let me = std::env::current_exe().expect("this test binary");
    for ci in [Some("true"), None] {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&me)
        .args(["--exact", "sigquit_stops_cleanly", "--nocapture"]);
        match ci {
            Some(v) => cmd.env("CI", v),
            None => cmd.env_remove("CI"),
        };
        let out = cmd.output().expect("run this test binary as nobody");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if ci.is_some() {
            assert!(
                !out.status.success() && text.contains("CI=true") && text.contains("needs root"),
                "under CI=true the test must fail naming what is missing ({}):\n{text}",
                out.status
            );
        } else {
            assert!(
                out.status.success() && text.contains("skipped: needs root"),
                "outside CI it is skipped ({}):\n{text}",
                out.status
            );
        }
    }
}

/// A generous bound for what follows an interface event at once (a
/// functional outcome, not a measure of speed).
const PROMPTLY: Duration = Duration::from_secs(5);

/// lan1's interface index in `ns`.
fn lan1_index(ns: &Netns) -> u32 {
    let link: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "link", "show", "dev", "lan1"])).expect("ip -j");
    let index = link[0]["ifindex"].as_u64().expect("ifindex");
    u32::try_from(index).expect("ifindex fits u32")
}

/// A guarded port deleted and created again at once with the same index
/// (`ip link add ... index N`, as scripts that pin indexes do): looking the
/// name up finds the same name and index, so only the link events tell that
/// the new interface has none of the programs.
#[test]
fn a_port_recreated_at_the_same_index_is_guarded_again() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let scratch = scratch_dir(&bpffs);
    let fg = Flowguard::start(
        &ns,
        &bpffs.pin_dir(),
        &["--egress", "lan1", "--ingress", "lan1", "--prefix", PREFIX],
    );
    assert_eq!(flowguard_programs_on_lan1(&ns), 2, "tc and XDP on lan1");
    let index = lan1_index(&ns);
    let batch = scratch.join(format!("recreate-{}", std::process::id()));
    std::fs::write(
        &batch,
        format!(
            "link del lan1\n\
             link add lan1 index {index} type veth peer name peer1\n\
             link set lan1 up\n\
             link set peer1 up\n"
        ),
    )
    .expect("write the ip batch");
    ns.ip(&["-batch", &batch.to_string_lossy()]);
    let _ = std::fs::remove_file(&batch);
    assert_eq!(lan1_index(&ns), index, "recreated with the same index");
    wait_until(
        &fg,
        "two flowguard programs on the recreated lan1",
        || flowguard_programs_on_lan1(&ns),
        |&programs| programs >= 2,
    );
    let lines = fg.stdout_lines();
    assert!(
        lines.iter().any(|l| l.contains("lan1 went away"))
            && lines.iter().any(|l| l.contains("lan1 is back")),
        "says it went away and came back:\n{}",
        lines.join("\n")
    );
}

/// A guarded port deleted and created again (veth and tap ports are
/// recreated routinely, USB NICs replugged): flowguard says it went away and
/// attaches again, tc and XDP, to the interface of that name.
#[test]
fn a_recreated_port_is_guarded_again() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let fg = Flowguard::start(
        &ns,
        &bpffs.pin_dir(),
        &["--egress", "lan1", "--ingress", "lan1", "--prefix", PREFIX],
    );
    assert_eq!(flowguard_programs_on_lan1(&ns), 2, "tc and XDP on lan1");
    ns.ip(&["link", "del", "lan1"]);
    fg.wait_for_line(PROMPTLY, |l| l.contains("lan1 went away"))
        .unwrap_or_else(|| {
            panic!(
                "no word about lan1 going away:\n{}",
                fg.stdout_lines().join("\n")
            )
        });
    let states = interface_states;
    let missing = vec![
        ("lan1".to_string(), "tc".to_string(), false),
        ("lan1".to_string(), "xdp".to_string(), false),
    ];
    assert_eq!(states(&fg), missing, "status shows lan1 missing");
    let table = fg.status_table();
    assert!(table.contains("lan1 (tc) MISSING"), "{table}");
    for extra in [&[][..], &["--json"]] {
        let (code, _) = fg.status_exit(extra);
        assert_eq!(
            code,
            Some(STATUS_INTERFACE_MISSING),
            "`status {extra:?}` with lan1 missing"
        );
    }
    let doctor = flowguard_in(
        &ns,
        &["doctor", "--pin-dir", &bpffs.pin_dir().to_string_lossy()],
    );
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(text.contains("lan1 (xdp): MISSING"), "doctor:\n{text}");
    let doctor = doctor_check(&ns, &bpffs.pin_dir());
    assert!(
        doctor["verdict"] == "warn"
            && doctor["message"]
                .as_str()
                .unwrap_or("")
                .contains("NOT guarded now: lan1 (tc), lan1 (xdp)"),
        "doctor warns while lan1 is missing: {doctor:#}"
    );

    ns.ip(&[
        "link", "add", "lan1", "type", "veth", "peer", "name", "peer1",
    ]);
    ns.ip(&["link", "set", "lan1", "up"]);
    wait_until(
        &fg,
        "two `lan1 is back` lines",
        || {
            fg.stdout_lines()
                .iter()
                .filter(|l| l.contains("lan1 is back"))
                .count()
        },
        |&lines| lines >= 2,
    );
    assert_eq!(
        flowguard_programs_on_lan1(&ns),
        2,
        "tc and XDP on the recreated lan1"
    );
    let attached: Vec<_> = missing.into_iter().map(|(n, h, _)| (n, h, true)).collect();
    assert_eq!(states(&fg), attached, "status shows lan1 attached again");
    assert_eq!(fg.status_exit(&[]).0, Some(0), "status exits 0 again");
    assert_eq!(doctor_check(&ns, &bpffs.pin_dir())["verdict"], "ok");
}

/// `(name, hook, attached)` of each interface `status --json` lists.
fn interface_states(fg: &Flowguard) -> Vec<(String, String, bool)> {
    fg.status_json()["interfaces"]
        .as_array()
        .expect("interfaces in status")
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or("").to_string(),
                i["hook"].as_str().unwrap_or("").to_string(),
                i["attached"] == true,
            )
        })
        .collect()
}

/// The `flowguard` check of `doctor --json --pin-dir <pin_dir>` in `ns`.
fn doctor_check(ns: &Netns, pin_dir: &Path) -> serde_json::Value {
    let out = flowguard_in(
        ns,
        &["doctor", "--json", "--pin-dir", &pin_dir.to_string_lossy()],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {out:?}"));
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == "flowguard")
        .expect("a flowguard check")
        .clone()
}

/// After SIGKILL the kernel side keeps guarding (pinned links) with the map
/// it had; a restart on the same pin directory adopts the links (one guard
/// per hook, no second attachment) and keeps the endpoints the killed
/// instance had learned; a clean stop then detaches everything.
#[test]
fn a_killed_instance_keeps_guarding_and_a_restart_adopts_it() {
    use aya::maps::{Array, Map, MapData};
    use flowguard_common::{source, Endpoint};
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let args = ["--egress", "lan1", "--ingress", "lan1", "--prefix", PREFIX];
    let mut fg = Flowguard::start(&ns, &pin_dir, &args);
    // An endpoint only the map knows (as learning leaves it): PREFIX is a
    // /24, direct-indexed, so 192.168.1.77 is slot 77 of endpoints_v4.
    {
        let data = MapData::from_pin(pin_dir.join("endpoints_v4")).expect("pinned endpoints_v4");
        let mut map: Array<MapData, Endpoint> =
            Array::try_from(Map::Array(data)).expect("endpoint array");
        let ep = Endpoint {
            mac: [2, 0, 0, 0, 0, 0x77],
            source: source::LEARNED,
            ..Endpoint::default()
        };
        map.set(77, ep, 0).expect("write a learned endpoint");
    }
    fg.signal(libc::SIGKILL);
    assert!(fg.wait_exit(STOP_TIMEOUT).is_some());
    assert_eq!(
        flowguard_programs_on_lan1(&ns),
        2,
        "the kernel side keeps guarding after SIGKILL"
    );

    let mut again = Flowguard::start(&ns, &pin_dir, &args);
    assert_eq!(
        flowguard_programs_on_lan1(&ns),
        2,
        "the restart adopted the links: no second attachment"
    );
    let st = again.status();
    assert!(
        st.has_endpoint("192.168.1.77", "02:00:00:00:00:77"),
        "the learned endpoint was kept: {st:#?}\n{}",
        again.stderr_text()
    );
    assert!(again.stop().success());
    assert_eq!(flowguard_programs_on_lan1(&ns), 0, "a clean stop detaches");
    assert!(
        !pin_dir.exists(),
        "and leaves no pins: {:?}",
        pins_in(&pin_dir)
    );
}

/// `--auto` follows the flowtables while it runs: a bridge port added to a
/// flowtable is guarded once the ruleset changes, a port that becomes a
/// bridge port of a flowtable device is guarded once the link changes, and
/// one that leaves is named (SIGHUP reads them too). This kernel has no
/// nf_flow_table, so `nft -j list flowtables` is answered by a shim (in
/// PATH, for the daemon only) from a file the test writes, in the format
/// nft 1.0.6 prints; every other `nft` command, and the ruleset changes that
/// announce a new flowtable, are the real nftables of the namespace.
#[test]
fn auto_follows_the_flowtables_while_it_runs() {
    skip_unless_root!();
    let ns = Netns::new("auto");
    ns.ip(&["link", "add", "br-lan", "type", "bridge"]);
    ns.ip(&["link", "set", "br-lan", "up"]);
    for (port, peer) in [
        ("wan", "peerw"),
        ("lan1", "peer1"),
        ("lan2", "peer2"),
        ("lan3", "peer3"),
    ] {
        ns.ip(&["link", "add", port, "type", "veth", "peer", "name", peer]);
        ns.ip(&["link", "set", port, "up"]);
    }
    for port in ["lan1", "lan2"] {
        ns.ip(&["link", "set", port, "master", "br-lan"]);
    }
    let bpffs = BpffsMount::new();
    let scratch = scratch_dir(&bpffs).join(format!("nft-shim-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("shim directory");
    let answer = scratch.join("flowtables.json");
    let set_devices = |devices: &[&str]| {
        let json = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
            {"flowtable": {"family": "inet", "name": "ft", "table": "fw4", "handle": 1,
                           "hook": "ingress", "prio": 0, "dev": devices}}
        ]});
        let tmp = scratch.join("flowtables.tmp");
        std::fs::write(&tmp, json.to_string()).expect("write the flowtables");
        std::fs::rename(&tmp, &answer).expect("replace the flowtables");
    };
    let nft = scratch.join("nft");
    std::fs::write(
        &nft,
        format!(
            "#!/bin/sh\n\
             if [ \"$*\" = \"-j list flowtables\" ]; then exec cat {}; fi\n\
             exec /usr/sbin/nft \"$@\"\n",
            answer.display()
        ),
    )
    .expect("write the nft shim");
    std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the shim");
    set_devices(&["wan", "lan1"]);
    let path = format!(
        "{}:{}",
        scratch.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let fg = Flowguard::start_with_env(
        &ns,
        &bpffs.pin_dir(),
        &["--auto", "--prefix", PREFIX],
        &[("PATH", &path)],
    );
    let guarded = |port: &str| flowguard_programs_on(&ns, port);
    assert_eq!((guarded("lan1"), guarded("lan2")), (1, 0), "lan1 only");

    // A ruleset change that puts lan2 in the flowtable.
    set_devices(&["wan", "lan1", "lan2"]);
    ns.nsenter("/usr/sbin/nft", &["add", "table", "inet", "fgtrigger"]);
    wait_until(
        &fg,
        "lan2 guarded after the ruleset changed",
        || guarded("lan2"),
        |&programs| programs == 1,
    );
    assert!(
        fg.stdout_lines()
            .iter()
            .any(|l| l.contains("lan2 is a flowtable bridge port now")),
        "{}",
        fg.stdout_lines().join("\n")
    );

    // lan3 is a flowtable device, not yet a bridge port: joining br-lan is
    // a link change, with no ruleset change.
    set_devices(&["wan", "lan1", "lan2", "lan3"]);
    ns.ip(&["link", "set", "lan3", "master", "br-lan"]);
    wait_until(
        &fg,
        "lan3 guarded once it joined the bridge",
        || guarded("lan3"),
        |&programs| programs == 1,
    );

    // lan1 leaves the flowtable: named on SIGHUP, still guarded.
    set_devices(&["wan", "lan2", "lan3"]);
    fg.signal(libc::SIGHUP);
    fg.wait_for_line(PROMPTLY, |l| {
        l.contains("lan1 is no longer a flowtable bridge port")
    })
    .unwrap_or_else(|| {
        panic!(
            "lan1 leaving is not named:\n{}\nstderr:\n{}",
            fg.stdout_lines().join("\n"),
            fg.stderr_text()
        )
    });
    assert_eq!(guarded("lan1"), 1, "lan1 stays guarded");
    assert_eq!(guarded("wan"), 0, "wan is no bridge port");
    let st = fg.status_json();
    let names: Vec<&str> = st["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["lan1", "lan2", "lan3"], "{st:#}");
    drop(fg);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Observes until `done` holds, for up to [`PROMPTLY`]; panics with the last
/// observation and flowguard's output.
fn wait_until<V: std::fmt::Debug>(
    fg: &Flowguard,
    what: &str,
    observe: impl FnMut() -> V,
    done: impl FnMut(&V) -> bool,
) -> V {
    Wait::new(what, PROMPTLY)
        .every(Duration::from_millis(100))
        .poll(observe, done)
        .unwrap_or_else(|timed_out| {
            panic!(
                "{}\nstdout:\n{}\nstderr:\n{}",
                timed_out.report(),
                fg.stdout_lines().join("\n"),
                fg.stderr_text()
            )
        })
}

/// The flowguard clsact filters on lan1's egress in `ns`.
fn flowguard_clsact_filters_on_lan1(ns: &Netns) -> usize {
    use aya::programs::TcAttachType;
    ns.enter(|| {
        flowguard_user::instances::clsact_filters("lan1", TcAttachType::Egress)
            .iter()
            .filter(|f| f.program.is_flowguard())
            .count()
    })
}

/// Before Linux 6.6 (no TCX) tc programs are clsact filters, not links
/// (forced here with FLOWGUARD_TC_ATTACH=clsact): a filter outlives a
/// killed daemon and keeps guarding; a second instance on the port is
/// refused by name; a restart takes the filter over (one filter, not two);
/// a clean stop deletes it.
#[test]
fn clsact_filters_are_kept_taken_over_and_removed() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let env = [("FLOWGUARD_TC_ATTACH", "clsact")];
    let args = ["--egress", "lan1", "--prefix", PREFIX];
    let mut fg = Flowguard::start_with_env(&ns, &pin_dir, &args, &env);
    assert!(
        fg.stdout_lines()
            .iter()
            .any(|l| l.contains("tc egress (clsact)")),
        "{}",
        fg.stdout_lines().join("\n")
    );
    assert_eq!(flowguard_clsact_filters_on_lan1(&ns), 1, "one filter");
    assert_eq!(flowguard_programs_on_lan1(&ns), 0, "and no TCX program");

    let second_dir = bpffs.path().join("second");
    let mut second = Flowguard::spawn_with_env(
        &require_flowguard_bin(),
        &ns,
        &second_dir,
        &args,
        &env,
        false,
    );
    let exit = second.wait_exit(READY_TIMEOUT);
    let stderr = second.stderr_text();
    assert!(
        exit.is_some_and(|e| !e.success())
            && stderr.contains("lan1 is already guarded")
            && stderr.contains(&format!("PID {}", fg.pid()))
            && stderr.contains(&pin_dir.display().to_string()),
        "a second instance on lan1 is refused naming the first ({exit:?}): {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    assert_eq!(flowguard_clsact_filters_on_lan1(&ns), 1, "still one filter");

    fg.signal(libc::SIGKILL);
    assert!(fg.wait_exit(STOP_TIMEOUT).is_some(), "SIGKILL");
    assert_eq!(
        flowguard_clsact_filters_on_lan1(&ns),
        1,
        "the filter keeps guarding after SIGKILL"
    );

    let mut again = Flowguard::start_with_env(&ns, &pin_dir, &args, &env);
    assert_eq!(
        flowguard_clsact_filters_on_lan1(&ns),
        1,
        "the restart took the filter over: not a second one"
    );
    assert!(
        again.stderr_text().contains("took over the clsact filter"),
        "{}",
        again.stderr_text()
    );
    assert!(again.stop().success());
    assert_eq!(
        flowguard_clsact_filters_on_lan1(&ns),
        0,
        "a clean stop deletes the filter"
    );
}

/// Before TCX a port's filter is not a link that can be pinned: status still
/// shows the port attached or MISSING (its program is pinned per port and
/// looked up among the port's clsact filters), and exits 3 while it is gone.
#[test]
fn clsact_ports_show_in_status_attached_or_missing() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let env = [("FLOWGUARD_TC_ATTACH", "clsact")];
    let fg = Flowguard::start_with_env(
        &ns,
        &bpffs.pin_dir(),
        &["--egress", "lan1", "--prefix", PREFIX],
        &env,
    );
    assert_eq!(flowguard_clsact_filters_on_lan1(&ns), 1, "one filter");
    let lan1 = |attached| vec![("lan1".to_string(), "tc".to_string(), attached)];
    assert_eq!(interface_states(&fg), lan1(true), "status shows lan1");
    assert_eq!(fg.status_exit(&[]).0, Some(0));

    ns.ip(&["link", "del", "lan1"]);
    fg.wait_for_line(PROMPTLY, |l| l.contains("lan1 went away"))
        .unwrap_or_else(|| panic!("no word about lan1:\n{}", fg.stdout_lines().join("\n")));
    assert_eq!(
        interface_states(&fg),
        lan1(false),
        "status shows lan1 missing"
    );
    assert_eq!(fg.status_exit(&[]).0, Some(STATUS_INTERFACE_MISSING));

    ns.ip(&[
        "link", "add", "lan1", "type", "veth", "peer", "name", "peer1",
    ]);
    ns.ip(&["link", "set", "lan1", "up"]);
    fg.wait_for_line(PROMPTLY, |l| l.contains("lan1 is back"))
        .unwrap_or_else(|| {
            panic!(
                "lan1 was not guarded again:\n{}\nstderr:\n{}",
                fg.stdout_lines().join("\n"),
                fg.stderr_text()
            )
        });
    assert_eq!(flowguard_clsact_filters_on_lan1(&ns), 1, "one filter again");
    assert_eq!(interface_states(&fg), lan1(true), "status shows lan1 again");
    assert_eq!(fg.status_exit(&[]).0, Some(0), "status exits 0 again");
}

/// SIGINT or SIGTERM while flowguard is still starting (attached, pinned,
/// not yet in its event loop) is held until the loop handles it: a clean
/// stop, nothing left pinned (before: the default action killed it and left
/// the pins behind). Sent at the first line it prints, a note printed right
/// after attaching, many times over.
#[test]
fn a_stop_signal_during_startup_stops_it_cleanly() {
    skip_unless_root!();
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let bin = require_flowguard_bin();
    // A repeated --prefix makes a note, printed as soon as it has attached.
    let args = ["--egress", "lan1", "--prefix", PREFIX, "--prefix", PREFIX];
    for (round, sig) in [libc::SIGINT, libc::SIGTERM]
        .into_iter()
        .cycle()
        .take(6)
        .enumerate()
    {
        let pin_dir = bpffs.path().join(format!("startup{round}"));
        let mut fg = Flowguard::spawn(&bin, &ns, &pin_dir, &args, false);
        fg.wait_for_line(READY_TIMEOUT, |l| l.contains("given twice"))
            .unwrap_or_else(|| panic!("no note:\n{}", fg.stderr_text()));
        fg.signal(sig);
        let exit = fg.wait_exit(STOP_TIMEOUT).expect("it stops");
        assert!(
            exit.success(),
            "round {round}: signal {sig} during startup: {exit:?}\n{}",
            fg.stderr_text()
        );
        assert!(
            !pin_dir.exists(),
            "round {round}: signal {sig} during startup left {} behind",
            pin_dir.display()
        );
    }
}
