//! Time from a neighbour MAC change to the end of eviction, with 100,000
//! unrelated conntrack entries in the table, side by side with
//! `conntrack -D -d IP` (conntrack-tools) on the same table in the same run.
//!
//! `flowguard-evict-bench [--flowguard PATH] [--entries N] [--flows K]
//! [--rounds R] [--out PATH]` (root).
//!
//! Everything happens in the router namespace of a [`RouterTopology`] of its
//! own (the conntrack table is per network namespace): `--entries` unrelated
//! entries are inserted over ctnetlink with flowguard's own client
//! (`Conntrack::insert`), then every round inserts `--flows` entries of
//! 192.168.1.240 again before each method and measures, interleaved:
//!
//! 1. **flowguard**: the real `flowguard run --egress lan1 --prefix
//!    192.168.1.0/24 --evict all` in the router namespace. The clock starts
//!    just before `ip -n <router> neigh replace 192.168.1.240 lladdr <new>
//!    dev br-lan` is spawned (a real neighbour change; the entry exists with
//!    the old MAC) and stops when the bench has read the K-th `evicted flow`
//!    line of this round from flowguard's stdout. Watching stdout rather than
//!    polling the table: flowguard prints these lines only after its last
//!    delete was acknowledged, and polling `flows_involving` in a tight loop
//!    would walk the 100,000-entry table four times per poll on the same two
//!    CPUs as the process under measurement. The table is checked afterwards
//!    (untimed) to hold no entry of the IP.
//! 2. **conntrack -D -d 192.168.1.240**: wall time of the process, spawned
//!    from a thread inside the router namespace (no `ip netns exec`).
//! 3. **Conntrack::evict in-process**: the library call flowguard makes,
//!    without a process, a neighbour event or output; and, separately,
//!    `flows_involving` alone (the finding part of it).
//!
//! Medians over rounds (min and max shown); results go to stdout and to
//! target/bench/eviction.txt.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Parser;
use flowguard_tests::flowguard_proc::{flowguard_bin, Flowguard};
use flowguard_tests::netns::BpffsMount;
use flowguard_tests::progs::workspace_root;
use flowguard_tests::router::{self, RouterTopology, BRIDGE, LAN_PREFIX, MAC_A1, MAC_A2, PORT_A};
use flowguard_user::conntrack::{Conntrack, EvictScope, Flow, Tuple};

const TARGET: Ipv4Addr = router::ENDPOINT_A_IP;
/// Bound on one eviction; far above anything plausible.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the bench looks at flowguard's stdout while it waits.
const POLL: Duration = Duration::from_micros(200);
/// Inserted entries live this long (the whole run, with margin).
const ENTRY_TIMEOUT_SECS: u32 = 3600;

#[derive(Parser)]
#[command(about = "Eviction after a neighbour MAC change vs conntrack -D, on a large table")]
struct Args {
    /// The flowguard binary (default: $FLOWGUARD_BIN or target/release/flowguard).
    #[arg(long)]
    flowguard: Option<PathBuf>,
    /// Unrelated conntrack entries in the table.
    #[arg(long, default_value_t = 100_000)]
    entries: u32,
    /// Entries of 192.168.1.240, inserted again before each measurement.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=250))]
    flows: u16,
    /// Measured rounds (each runs every method once, interleaved).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Where to write the table (default: target/bench/eviction.txt).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(reason) = router::missing_prerequisite() {
        eprintln!("flowguard-evict-bench: cannot run here: {reason}");
        return ExitCode::FAILURE;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flowguard-evict-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// One unrelated entry: UDP and TCP between 10.100.0.0/14 and a few servers,
/// never involving 192.168.1.0/24.
fn unrelated(i: u32) -> Flow {
    let client = IpAddr::V4(Ipv4Addr::new(
        10,
        100 + (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ));
    let server = IpAddr::V4(Ipv4Addr::new(172, 16, (i % 7) as u8, 1));
    let sport = 1024 + (i % 60_000) as u16;
    if i.is_multiple_of(2) {
        Flow::unnatted(Tuple::udp(client, sport, server, 53))
    } else {
        Flow::unnatted(Tuple::tcp(client, sport, server, 443))
    }
}

/// The `k` entries of the target for round tag `tag`: from 10.200.<tag>.<j>,
/// so that the lines flowguard prints for them name the round.
fn targets(tag: u8, k: u16) -> Vec<Flow> {
    (0..k)
        .map(|j| {
            let client = IpAddr::V4(Ipv4Addr::new(10, 200, tag, 1 + j as u8));
            Flow::unnatted(Tuple::udp(client, 40_000 + j, IpAddr::V4(TARGET), 51820))
        })
        .collect()
}

fn insert_targets(ct: &mut Conntrack, tag: u8, k: u16) -> Result<()> {
    for flow in targets(tag, k) {
        ct.insert(&flow, ENTRY_TIMEOUT_SECS)
            .with_context(|| format!("inserting {}", flow.describe()))?;
    }
    let found = ct.flows_involving(IpAddr::V4(TARGET))?.len();
    ensure!(
        found == usize::from(k),
        "{found} entries of {TARGET} before the measurement, expected {k}"
    );
    Ok(())
}

fn left_of_target(ct: &mut Conntrack) -> Result<usize> {
    Ok(ct.flows_involving(IpAddr::V4(TARGET))?.len())
}

#[derive(Default)]
struct Samples {
    flowguard: Vec<Duration>,
    flowguard_log: Vec<Duration>,
    ip_neigh: Vec<Duration>,
    conntrack_tool: Vec<Duration>,
    evict: Vec<Duration>,
    find: Vec<Duration>,
}

struct Bench<'a> {
    args: &'a Args,
    topology: &'a RouterTopology,
    flowguard: &'a Flowguard,
    ct: Conntrack,
    next_tag: u8,
    mac_is_a1: bool,
}

impl Bench<'_> {
    fn tag(&mut self) -> u8 {
        self.next_tag = self.next_tag.wrapping_add(1);
        self.next_tag
    }

    /// flowguard: neighbour change → K-th `evicted` line. Returns the total,
    /// the `ip` command's own time, and flowguard's logged eviction time.
    fn flowguard_round(&mut self) -> Result<(Duration, Duration, Option<Duration>)> {
        let k = self.args.flows;
        let tag = self.tag();
        insert_targets(&mut self.ct, tag, k)?;
        let new_mac = if self.mac_is_a1 { MAC_A2 } else { MAC_A1 };
        let marker = format!(": evicted flow udp 10.200.{tag}.");
        let stdout_before = self.flowguard.stdout_lines().len();
        let stderr_before = self.flowguard.stderr_text().lines().count();
        let router = self.topology.router.name().to_owned();
        let target = TARGET.to_string();

        let started = Instant::now();
        let output = Command::new("ip")
            .args(["-n", &router, "neigh", "replace", &target])
            .args(["lladdr", new_mac, "dev", BRIDGE, "nud", "permanent"])
            .output()
            .context("running ip neigh replace")?;
        let ip_time = started.elapsed();
        ensure!(
            output.status.success(),
            "ip neigh replace failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        self.mac_is_a1 = !self.mac_is_a1;
        let total = loop {
            let printed = self.flowguard.stdout_lines()[stdout_before..]
                .iter()
                .filter(|line| line.contains(&marker))
                .count();
            if printed >= usize::from(k) {
                break started.elapsed();
            }
            if started.elapsed() > ROUND_TIMEOUT {
                bail!(
                    "flowguard printed {printed} of {k} evicted lines within {ROUND_TIMEOUT:?}; \
                     stderr:\n{}",
                    self.flowguard.stderr_text()
                );
            }
            thread::sleep(POLL);
        };
        let left = left_of_target(&mut self.ct)?;
        ensure!(
            left == 0,
            "{left} entries of {TARGET} left after flowguard's eviction"
        );
        // `192.168.1.240: evicted 16 flows in 12.3 ms` (its log, on stderr).
        let wanted = format!("{TARGET}: evicted {k} flows in ");
        let mut logged = None;
        for _ in 0..50 {
            logged = self
                .flowguard
                .stderr_text()
                .lines()
                .skip(stderr_before)
                .find_map(|line| {
                    let rest = line.split_once(&wanted)?.1;
                    let ms: f64 = rest.strip_suffix(" ms")?.parse().ok()?;
                    Some(Duration::from_secs_f64(ms / 1e3))
                });
            if logged.is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok((total, ip_time, logged))
    }

    /// conntrack-tools on the same table, spawned inside the namespace.
    fn conntrack_tool_round(&mut self) -> Result<Duration> {
        let k = self.args.flows;
        let tag = self.tag();
        insert_targets(&mut self.ct, tag, k)?;
        let target = TARGET.to_string();
        let (elapsed, output) = self.topology.router.enter(|| {
            let started = Instant::now();
            let output = Command::new("conntrack")
                .args(["-D", "-d", &target])
                .output();
            (started.elapsed(), output)
        });
        let output = output.context("running conntrack -D")?;
        let said = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.success(),
            "conntrack -D -d {target} failed: {}",
            said.trim()
        );
        ensure!(
            said.contains(&format!("{k} flow entries have been deleted")),
            "conntrack -D -d {target} said: {}",
            said.trim()
        );
        let left = left_of_target(&mut self.ct)?;
        ensure!(
            left == 0,
            "{left} entries of {TARGET} left after conntrack -D"
        );
        Ok(elapsed)
    }

    /// The library call alone: `flows_involving`, then `evict` (which finds
    /// the entries again and deletes them).
    fn in_process_round(&mut self) -> Result<(Duration, Duration)> {
        let k = self.args.flows;
        let tag = self.tag();
        insert_targets(&mut self.ct, tag, k)?;
        let ip = IpAddr::V4(TARGET);
        let started = Instant::now();
        let found = self.ct.flows_involving(ip)?;
        let find = started.elapsed();
        ensure!(
            found.len() == usize::from(k),
            "found {} entries",
            found.len()
        );
        let started = Instant::now();
        let evicted = self.ct.evict(ip, EvictScope::All, false)?;
        let evict = started.elapsed();
        ensure!(
            evicted.len() == usize::from(k),
            "evicted {} entries",
            evicted.len()
        );
        Ok((evict, find))
    }
}

fn run(args: &Args) -> Result<()> {
    let bin = args.flowguard.clone().unwrap_or_else(flowguard_bin);
    ensure!(
        bin.is_file(),
        "no flowguard binary at {} (build it, or give --flowguard)",
        bin.display()
    );
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(
        args.rounds * 3 + 3 < 256,
        "at most 84 rounds (each measurement uses a tag in 10.200.<tag>.0/24)"
    );
    let needed = u64::from(args.entries) + 4 * u64::from(args.flows);

    let bpffs = BpffsMount::new();
    let topology = RouterTopology::new();
    let max: u64 = topology
        .router
        .exec(&["sysctl", "-n", "net.netfilter.nf_conntrack_max"])
        .trim()
        .parse()
        .context("reading nf_conntrack_max")?;
    if max < needed {
        // Read-only in a namespace on many kernels; the global one applies.
        let output = topology.router.try_exec(&[
            "sysctl",
            "-qw",
            &format!("net.netfilter.nf_conntrack_max={}", needed * 2),
        ]);
        ensure!(
            output.status.success(),
            "nf_conntrack_max is {max}, below the {needed} entries needed, and cannot be \
             raised in the namespace: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let buckets = topology
        .router
        .exec(&["sysctl", "-n", "net.netfilter.nf_conntrack_buckets"]);

    // The neighbour entry exists with the old MAC before flowguard starts.
    let target = TARGET.to_string();
    topology.router.ip(&[
        "neigh",
        "replace",
        &target,
        "lladdr",
        MAC_A1,
        "dev",
        BRIDGE,
        "nud",
        "permanent",
    ]);

    let mut ct = topology
        .router
        .enter(Conntrack::open)
        .context("opening ctnetlink in the router namespace")?;
    println!(
        "Inserting {} unrelated conntrack entries over ctnetlink...",
        args.entries
    );
    let started = Instant::now();
    for i in 0..args.entries {
        let flow = unrelated(i);
        ct.insert(&flow, ENTRY_TIMEOUT_SECS)
            .with_context(|| format!("inserting {}", flow.describe()))?;
    }
    let insert_time = started.elapsed();
    let count: u64 = topology
        .router
        .exec(&["sysctl", "-n", "net.netfilter.nf_conntrack_count"])
        .trim()
        .parse()
        .context("reading nf_conntrack_count")?;
    ensure!(
        count >= u64::from(args.entries),
        "only {count} entries in the table after inserting {}",
        args.entries
    );
    println!(
        "  {count} entries in {:.1} s ({:.1} µs each)",
        insert_time.as_secs_f64(),
        insert_time.as_secs_f64() * 1e6 / f64::from(args.entries.max(1))
    );

    let mut flowguard = Flowguard::spawn(
        &bin,
        &topology.router,
        &bpffs.pin_dir(),
        &[
            "--egress",
            PORT_A,
            "--prefix",
            LAN_PREFIX,
            "--evict",
            "all",
            "--evict-debounce-ms",
            "0",
            "--reconcile-secs",
            "3600",
        ],
        false,
    );
    flowguard.try_wait_ready().map_err(anyhow::Error::msg)?;
    flowguard.wait_for_status(
        "flowguard to track 192.168.1.240",
        Duration::from_secs(10),
        |status| status.has_endpoint(&target, MAC_A1),
    );

    let mut bench = Bench {
        args,
        topology: &topology,
        flowguard: &flowguard,
        ct,
        next_tag: 0,
        mac_is_a1: true,
    };
    println!(
        "Measuring: {} rounds, {} entries of {TARGET} each time (one warm-up round first)",
        args.rounds, args.flows
    );
    bench.flowguard_round()?;
    bench.conntrack_tool_round()?;
    bench.in_process_round()?;
    let mut samples = Samples::default();
    for round in 0..args.rounds {
        // Interleaved, and the order rotates, so drift hits all methods alike.
        for method in 0..3 {
            match (round + method) % 3 {
                0 => {
                    let (total, ip, logged) = bench.flowguard_round()?;
                    samples.flowguard.push(total);
                    samples.ip_neigh.push(ip);
                    samples.flowguard_log.extend(logged);
                }
                1 => samples.conntrack_tool.push(bench.conntrack_tool_round()?),
                _ => {
                    let (evict, find) = bench.in_process_round()?;
                    samples.evict.push(evict);
                    samples.find.push(find);
                }
            }
        }
        println!(
            "  round {}: flowguard {:.2} ms, conntrack -D {:.2} ms, Conntrack::evict {:.2} ms",
            round + 1,
            ms(*samples.flowguard.last().expect("one sample")),
            ms(*samples.conntrack_tool.last().expect("one sample")),
            ms(*samples.evict.last().expect("one sample")),
        );
    }
    let kernel_filter = bench.ct.supports_kernel_filter();
    drop(bench);
    let stopped = flowguard.stop();
    ensure!(
        stopped.success(),
        "flowguard exited with {stopped}: {}",
        flowguard.stderr_text()
    );

    let report = render(args, &samples, buckets.trim(), kernel_filter, &versions())?;
    print!("\n{report}");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench/eviction.txt"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    println!("Written to {}", out.display());
    Ok(())
}

/// `kernel 6.x, conntrack v1.4.7 (conntrack-tools)`.
fn versions() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let tool = Command::new("conntrack")
        .arg("-V")
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).trim().to_owned()
        })
        .unwrap_or_else(|_| "conntrack: unknown version".into());
    format!("kernel {kernel}, {tool}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (median, min, max) in milliseconds.
fn stats(samples: &[Duration]) -> Option<(f64, f64, f64)> {
    let mut sorted: Vec<f64> = samples.iter().copied().map(ms).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some((median, sorted[0], sorted[n - 1]))
}

/// `- text`, wrapped at `width` columns with a two-space hanging indent.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::from("-");
    let mut column = 1;
    for word in text.split_whitespace() {
        if column + 1 + word.len() > width && column > 2 {
            out.push_str("\n ");
            column = 1;
        }
        out.push(' ');
        out.push_str(word);
        column += 1 + word.chars().count();
    }
    out
}

fn render(
    args: &Args,
    s: &Samples,
    buckets: &str,
    kernel_filter: bool,
    versions: &str,
) -> Result<String> {
    let mut r = String::new();
    writeln!(
        r,
        "Eviction of {k} conntrack entries of {TARGET} among {n} unrelated ones \
         (nf_conntrack_buckets {buckets}; kernel-side dump filter CTA_FILTER: {kernel_filter})",
        k = args.flows,
        n = args.entries,
    )?;
    writeln!(r, "{versions}")?;
    writeln!(
        r,
        "{} rounds, interleaved, after one warm-up round; milliseconds\n",
        args.rounds
    )?;
    writeln!(r, "{:<58} {:>8} {:>8} {:>8}", "", "median", "min", "max")?;
    let rows: [(&str, &[Duration]); 6] = [
        (
            "flowguard: neighbour change -> all entries evicted",
            &s.flowguard,
        ),
        (
            "  `ip neigh replace` alone (overlaps the row above)",
            &s.ip_neigh,
        ),
        (
            "  flowguard's own log: Conntrack::evict in its thread",
            &s.flowguard_log,
        ),
        (
            "conntrack -D -d 192.168.1.240 (process wall time)",
            &s.conntrack_tool,
        ),
        ("Conntrack::evict in-process (find + deletes)", &s.evict),
        ("  Conntrack::flows_involving alone (find)", &s.find),
    ];
    for (name, samples) in rows {
        match stats(samples) {
            Some((median, min, max)) => {
                writeln!(r, "{name:<58} {median:>8.2} {min:>8.2} {max:>8.2}")?
            }
            None => writeln!(r, "{name:<58} {:>8}", "n/a")?,
        }
    }
    let ratio = |a: &[Duration], b: &[Duration]| -> Option<f64> { Some(stats(a)?.0 / stats(b)?.0) };
    writeln!(r)?;
    if let Some(x) = ratio(&s.flowguard, &s.conntrack_tool) {
        let verdict = if x <= 0.5 { "met" } else { "not met" };
        writeln!(
            r,
            "ratio flowguard / conntrack -D: {x:.2}x (aim <= 0.5x: {verdict})"
        )?;
    }
    if let Some(x) = ratio(&s.evict, &s.conntrack_tool) {
        writeln!(
            r,
            "ratio Conntrack::evict in-process / conntrack -D: {x:.2}x"
        )?;
    }
    let k = args.flows;
    let poll = POLL.as_micros();
    let notes = [
        format!(
            "flowguard: from just before spawning `ip -n <router> neigh replace {TARGET} lladdr \
             <new> dev br-lan` to the moment this bench read the {k}th `evicted flow` line of the \
             round from flowguard's stdout (polled every {poll} µs). Includes the ip process, \
             the kernel's RTM_NEWNEIGH, flowguard's neighbour cache and map update, the hand-off \
             to its eviction thread, finding the entries over ctnetlink, {k} deletes, printing \
             and the pipe. flowguard prints only after its last delete was acknowledged; the \
             table was checked afterwards (untimed) to hold no entry of {TARGET}."
        ),
        "`ip neigh replace` alone: that process from spawn to exit. flowguard starts as soon \
         as the kernel announces the change, so the two overlap (and ip's exit competes with \
         flowguard's dumps for the CPUs): it is part of the row above, not to be subtracted."
            .to_owned(),
        "flowguard's own log: the time flowguard measures around Conntrack::evict in its \
         eviction thread (its `evicted N flows in X ms` log line)."
            .to_owned(),
        format!(
            "conntrack -D: spawn to exit of conntrack-tools, started from a thread inside the \
             router namespace: its startup, its dump and {k} deletes. conntrack-tools (1.4.7 \
             here, seen with strace) asks for an unfiltered dump of the family's whole table and matches -d in user \
             space; flowguard asks the kernel to filter (CTA_FILTER), with one dump per address \
             position (original/reply source/destination), so four walks of the hash table."
        ),
        format!(
            "Conntrack::evict: flowguard's library call in this process (find + {k} deletes), \
             no process, no neighbour event, no output; flows_involving: the find alone."
        ),
    ];
    writeln!(r, "\nWhat each number includes:")?;
    for note in notes {
        writeln!(r, "{}", wrap(&note, 100))?;
    }
    Ok(r)
}
