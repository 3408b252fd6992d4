//! What probing costs: with N endpoints that carry flows (default 1,000),
//! the probes per second flowguard sends and the CPU time it uses, beside
//! the same flowguard with `--probe off` on the same router in the same run.
//!
//! `flowguard-probe-bench [--flowguard PATH] [--endpoints N] [--secs S]
//! [--rounds R] [--out PATH]` (root).
//!
//! A [`RouterTopology`] of its own: endpoint A's namespace holds N extra
//! addresses in 192.168.100.0/22 (it answers ARP for all of them with one
//! MAC), the router's bridge has 192.168.103.254/22 (outside the endpoints'
//! 192.168.100.1 to .103.232: an endpoint holding the router's address would
//! make every request a martian to it), the router's neighbour
//! table gets an entry per address (STALE, the resting state), and conntrack
//! an entry per address (inserted over ctnetlink). flowguard runs with
//! `--egress lan1 --prefix 192.168.100.0/22 --probe flows` (this kernel has
//! no flowtable, so the offloaded selection would find nothing; `flows`
//! selects the same endpoints by their conntrack entries, at the same cost),
//! default interval. Each round measures, interleaved, flowguard probing and
//! flowguard with `--probe off`: the process's CPU time (utime + stime from
//! /proc, clock ticks) over `--secs`, after a warm-up, and the probes sent
//! (its own counter). One probe is a 42-byte ARP frame (60 on the wire).
//! Results go to stdout and target/bench/probe.txt.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use flowguard_tests::flowguard_proc::{flowguard_bin, Flowguard};
use flowguard_tests::netns::BpffsMount;
use flowguard_tests::process::cpu_ns;
use flowguard_tests::progs::workspace_root;
use flowguard_tests::router::{
    self, RouterTopology, BRIDGE, CLIENT_IP, ENDPOINT_A_IP, ENDPOINT_IF, MAC_A1, PORT_A,
};
use flowguard_user::conntrack::{Conntrack, Flow, Tuple};

const PREFIX: &str = "192.168.100.0/22";
const BASE: u32 = u32::from_be_bytes([192, 168, 100, 1]);

#[derive(Parser)]
#[command(about = "CPU and traffic of probing N endpoints, beside --probe off")]
struct Args {
    /// The flowguard binary (default: $FLOWGUARD_BIN or target/release/flowguard).
    #[arg(long)]
    flowguard: Option<PathBuf>,
    /// Endpoints that carry flows.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1000))]
    endpoints: u32,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Rounds (each runs both variants once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where to write the table (default: target/bench/probe.txt).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(reason) = router::missing_prerequisite() {
        eprintln!("flowguard-probe-bench: cannot run here: {reason}");
        return ExitCode::FAILURE;
    }
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowguard-probe-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn endpoint_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(BASE + i)
}

struct Run {
    cpu_percent: f64,
    probes_per_sec: f64,
    unanswered: u64,
}

fn measure(
    topology: &RouterTopology,
    bin: &std::path::Path,
    probe: &str,
    secs: u64,
) -> Result<Run> {
    let bpffs = BpffsMount::new();
    let mut fg = Flowguard::spawn(
        bin,
        &topology.router,
        &bpffs.pin_dir(),
        &["--egress", PORT_A, "--prefix", PREFIX, "--probe", probe],
        false,
    );
    fg.try_wait_ready().map_err(anyhow::Error::msg)?;
    // Warm-up: the first conntrack read and a few rounds.
    thread::sleep(Duration::from_secs(3));
    let (t0, c0, s0) = (Instant::now(), cpu_ns(fg.pid())?, fg.status().counters);
    thread::sleep(Duration::from_secs(secs));
    let (c1, s1) = (cpu_ns(fg.pid())?, fg.status().counters);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (c1 - c0) as f64 / 1e9;
    Ok(Run {
        cpu_percent: 100.0 * cpu / elapsed,
        probes_per_sec: (s1.probes_sent - s0.probes_sent) as f64 / elapsed,
        unanswered: s1.probes_unanswered - s0.probes_unanswered,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(args: &Args) -> Result<()> {
    let bin = args.flowguard.clone().unwrap_or_else(flowguard_bin);
    if !bin.is_file() {
        bail!("no flowguard binary at {}", bin.display());
    }
    let n = args.endpoints;
    let topology = RouterTopology::new();
    topology.keep_udp_entries();
    topology
        .router
        .ip(&["addr", "add", "192.168.103.254/22", "dev", BRIDGE]);
    let a = &topology.endpoint(ENDPOINT_A_IP).ns;
    let mut addrs = String::new();
    let mut neighs = String::new();
    for i in 0..n {
        let ip = endpoint_ip(i);
        writeln!(addrs, "addr add {ip}/32 dev {ENDPOINT_IF}")?;
        writeln!(
            neighs,
            "neigh replace {ip} lladdr {MAC_A1} dev {BRIDGE} nud stale"
        )?;
    }
    a.ip(&["route", "add", "192.168.100.0/22", "dev", ENDPOINT_IF]);
    batch(a.name(), &addrs)?;
    batch(topology.router.name(), &neighs)?;
    topology.router.enter(|| -> Result<()> {
        let mut ct = Conntrack::open()?;
        for i in 0..n {
            let flow = Flow::unnatted(Tuple::udp(
                IpAddr::V4(CLIENT_IP),
                40000,
                IpAddr::V4(endpoint_ip(i)),
                51820,
            ));
            ct.insert(&flow, 3600)?;
        }
        Ok(())
    })?;

    let mut on = Vec::new();
    let mut off = Vec::new();
    for round in 1..=args.rounds {
        let p = measure(&topology, &bin, "flows", args.secs)?;
        let q = measure(&topology, &bin, "off", args.secs)?;
        println!(
            "round {round}: probing {:.2} % CPU, {:.0} probes/s ({} unanswered); --probe off {:.2} % CPU",
            p.cpu_percent, p.probes_per_sec, p.unanswered, q.cpu_percent
        );
        if p.unanswered > 0 {
            bail!(
                "{} probed endpoints did not answer: the bench is not measuring answered probes",
                p.unanswered
            );
        }
        on.push(p);
        off.push(q);
    }
    let cpu_on = median(&mut on.iter().map(|r| r.cpu_percent).collect::<Vec<_>>());
    let cpu_off = median(&mut off.iter().map(|r| r.cpu_percent).collect::<Vec<_>>());
    let pps = median(&mut on.iter().map(|r| r.probes_per_sec).collect::<Vec<_>>());
    let mut out = String::new();
    writeln!(out, "Probing {n} endpoints that carry flows, default interval (1 s), {} s per run, medians of {} rounds:", args.secs, args.rounds)?;
    writeln!(out, "  flowguard probing:       {cpu_on:.2} % of one core, {pps:.0} probes/s ({:.1} KB/s of ARP on the wire)", pps * 60.0 / 1000.0)?;
    writeln!(out, "  flowguard --probe off:   {cpu_off:.2} % of one core")?;
    writeln!(
        out,
        "  probing's own cost:      {:.2} % of one core (target < 1 %)",
        cpu_on - cpu_off
    )?;
    print!("{out}");
    let path = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench/probe.txt"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, out)?;
    Ok(())
}

/// `ip -n NS -batch -` with `commands` on stdin.
fn batch(ns: &str, commands: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(commands.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("ip -n {ns} -batch failed: {status}");
    }
    Ok(())
}
