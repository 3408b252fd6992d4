//! What following the bridge FDB costs: flowguard's resident memory with
//! the FDB of its bridge holding N MACs (default 4,096) beside the same
//! flowguard on the same bridge with only its few own entries, and the CPU
//! time it uses while every one of those MACs moves from one port to the
//! other and back (an FDB storm: a busy AP's stations roaming at once),
//! beside the same interval idle.
//!
//! `flowguard-fdb-bench [--flowguard PATH] [--macs N] [--storms R]
//! [--rounds K] [--out PATH]` (root).
//!
//! A [`RouterTopology`] of its own (br-lan with ports lan1 and lan2).
//! The N MACs are static FDB entries (`bridge fdb add MAC dev lan1 master
//! static`, in one `bridge -batch`); flowguard follows them like learned
//! ones. flowguard runs with `--egress lan1 --egress lan2 --prefix
//! 192.168.1.0/24 --probe off`: none of the MACs is an endpoint's, so what
//! is measured is the follower and the endpoint table's join, not
//! eviction. Memory: VmRSS and VmHWM from /proc/PID/status once flowguard
//! says how many MACs it follows. Storm: each of `--storms` moves replaces
//! all N entries onto the other port (`bridge fdb replace`, one batch), so
//! a storm is N × R FDB events; the CPU time is the scheduler's run time
//! of flowguard's threads over the storm, with the idle interval of the
//! same length measured right before it. Results go to stdout and
//! target/bench/fdb.txt.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use flowguard_tests::flowguard_proc::{flowguard_bin, Flowguard};
use flowguard_tests::netns::BpffsMount;
use flowguard_tests::process::{cpu_ns, memory_kb};
use flowguard_tests::progs::workspace_root;
use flowguard_tests::router::{self, RouterTopology, LAN_PREFIX, PORT_A, PORT_B};

#[derive(Parser)]
#[command(about = "Memory and CPU of following a bridge FDB of N MACs")]
struct Args {
    /// The flowguard binary (default: $FLOWGUARD_BIN or target/release/flowguard).
    #[arg(long)]
    flowguard: Option<PathBuf>,
    /// MACs in the bridge FDB (besides the bridge's own entries).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    macs: u32,
    /// Moves of every MAC in one storm.
    #[arg(long, default_value_t = 10)]
    storms: u32,
    /// Rounds (each measures both variants once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where to write the table (default: target/bench/fdb.txt).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(reason) = router::missing_prerequisite() {
        eprintln!("flowguard-fdb-bench: cannot run here: {reason}");
        return ExitCode::FAILURE;
    }
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowguard-fdb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The i-th MAC: locally administered, unicast.
fn mac(i: u32) -> String {
    let b = i.to_be_bytes();
    format!("02:fd:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// `bridge -n NS -batch -` with `commands` on stdin.
fn bridge_batch(ns: &str, commands: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("bridge")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running bridge (iproute2)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(commands.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("bridge -n {ns} -batch failed: {status}");
    }
    Ok(())
}

/// All N MACs onto `port` (`add` the first time, then `replace`).
fn place_all(topology: &RouterTopology, verb: &str, port: &str, n: u32) -> Result<()> {
    let mut commands = String::new();
    for i in 0..n {
        writeln!(commands, "fdb {verb} {} dev {port} master static", mac(i))?;
    }
    bridge_batch(topology.router.name(), &commands)
}

/// The number of MACs flowguard says it follows at start.
fn followed_macs(fg: &Flowguard) -> Result<u64> {
    let line = fg
        .wait_for_line(Duration::from_secs(30), |l| {
            l.contains("following the bridge FDB of")
        })
        .context("flowguard did not say it follows the bridge FDB")?;
    let count = line
        .split('(')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .context(format!("no MAC count in: {line}"))?;
    count
        .parse()
        .with_context(|| format!("bad MAC count in: {line}"))
}

fn start(topology: &RouterTopology, bin: &Path, bpffs: &BpffsMount) -> Result<Flowguard> {
    let mut fg = Flowguard::spawn(
        bin,
        &topology.router,
        &bpffs.pin_dir(),
        &[
            "--egress", PORT_A, "--egress", PORT_B, "--prefix", LAN_PREFIX, "--probe", "off",
        ],
        false,
    );
    fg.try_wait_ready().map_err(anyhow::Error::msg)?;
    Ok(fg)
}

struct Round {
    /// (VmRSS, VmHWM) kB without and with the N MACs.
    without: (u64, u64),
    with: (u64, u64),
    idle_cpu_ms: f64,
    storm_cpu_ms: f64,
    storm_secs: f64,
    /// How long the storm's commands took to send.
    sent_secs: f64,
}

fn round(topology: &RouterTopology, bin: &Path, args: &Args) -> Result<Round> {
    let n = args.macs;
    // Without: the bridge has only its own entries and the hosts'.
    let bpffs = BpffsMount::new();
    let fg = start(topology, bin, &bpffs)?;
    let few = followed_macs(&fg)?;
    thread::sleep(Duration::from_secs(2));
    let without = memory_kb(fg.pid())?;
    drop(fg);

    place_all(topology, "add", PORT_A, n)?;
    let bpffs = BpffsMount::new();
    let fg = start(topology, bin, &bpffs)?;
    let many = followed_macs(&fg)?;
    if many < few + u64::from(n) {
        bail!("flowguard follows {many} MACs, not the {few} + {n} in the FDB");
    }
    thread::sleep(Duration::from_secs(2));
    let with = memory_kb(fg.pid())?;

    // The storm, timed, then as long again idle.
    let c0 = cpu_ns(fg.pid())?;
    let t0 = Instant::now();
    for s in 0..args.storms {
        let port = if s % 2 == 0 { PORT_B } else { PORT_A };
        place_all(topology, "replace", port, n)?;
    }
    let sent = t0.elapsed();
    // What the storm left queued is handled before the clock stops: until
    // flowguard uses less than 2 % of a core over 500 ms (60 s at most).
    let mut c1 = cpu_ns(fg.pid())?;
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = cpu_ns(fg.pid())?;
        let settled = now - c1 < 10_000_000;
        c1 = now;
        if settled {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("flowguard was still busy 60 s after the storm began");
        }
    }
    let storm = t0.elapsed();
    thread::sleep(storm);
    let c2 = cpu_ns(fg.pid())?;
    // Its status still answers: it ran through the storm.
    let _ = fg.status();
    drop(fg);
    // The next round starts from an FDB without the N MACs.
    // After an odd number of storms the MACs are behind lan2.
    let last = if args.storms % 2 == 1 { PORT_B } else { PORT_A };
    let mut commands = String::new();
    for i in 0..n {
        writeln!(commands, "fdb del {} dev {last} master", mac(i))?;
    }
    bridge_batch(topology.router.name(), &commands)?;
    Ok(Round {
        without,
        with,
        idle_cpu_ms: (c2 - c1) as f64 / 1e6,
        storm_cpu_ms: (c1 - c0) as f64 / 1e6,
        storm_secs: storm.as_secs_f64(),
        sent_secs: sent.as_secs_f64(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(args: &Args) -> Result<()> {
    let bin = args.flowguard.clone().unwrap_or_else(flowguard_bin);
    if !bin.is_file() {
        bail!("no flowguard binary at {}", bin.display());
    }
    let topology = RouterTopology::new();
    let mut rounds = Vec::new();
    for r in 1..=args.rounds {
        let x = round(&topology, &bin, args)?;
        println!(
            "round {r}: VmRSS/VmHWM {}/{} kB without, {}/{} kB with {} MACs; storm of {} events: \
             sent in {:.2} s, handled after {:.2} s, {:.1} ms CPU (idle the same time: {:.1} ms)",
            x.without.0,
            x.without.1,
            x.with.0,
            x.with.1,
            args.macs,
            u64::from(args.macs) * u64::from(args.storms),
            x.sent_secs,
            x.storm_secs,
            x.storm_cpu_ms,
            x.idle_cpu_ms
        );
        rounds.push(x);
    }
    let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let events = f64::from(args.macs) * f64::from(args.storms);
    let storm_ms = m(|r| r.storm_cpu_ms - r.idle_cpu_ms);
    let mut out = String::new();
    writeln!(
        out,
        "Following the FDB of br-lan with {} MACs (flowguard --egress lan1 --egress lan2, {}), medians of {} rounds:",
        args.macs,
        bin.display(),
        args.rounds
    )?;
    writeln!(
        out,
        "  resident memory: VmRSS {:.0} kB without the MACs, {:.0} kB with them: +{:.0} kB (target: +1,024 kB at most); VmHWM {:.0} -> {:.0} kB",
        m(|r| r.without.0 as f64),
        m(|r| r.with.0 as f64),
        m(|r| r.with.0 as f64 - r.without.0 as f64),
        m(|r| r.without.1 as f64),
        m(|r| r.with.1 as f64),
    )?;
    writeln!(
        out,
        "  FDB storm: {} moves of all {} MACs ({events:.0} events) sent in {:.2} s, handled after {:.2} s: {storm_ms:.1} ms of CPU above idle, {:.2} us per event",
        args.storms,
        args.macs,
        m(|r| r.sent_secs),
        m(|r| r.storm_secs),
        storm_ms * 1000.0 / events
    )?;
    print!("{out}");
    let path = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench/fdb.txt"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, out)?;
    Ok(())
}
