//! Per-packet cost of flowguard's programs through BPF_PROG_TEST_RUN.
//!
//! `flowguard-bench [--repeat N] [--rounds R] [--out PATH]`
//!
//! Each measurement is one test_run with `repeat` runs of the program on one
//! 64-byte frame; the number reported is the kernel's own per-repeat
//! duration. In `net/bpf/test_run.c`, `bpf_test_timer_continue()` divides
//! the time spent by the number of runs (`do_div(t->time_spent, t->i)`)
//! and stores that in `attr.test.duration`, for XDP and skb programs
//! alike; aya 0.14's `bpf_prog_test_run` returns it unchanged as
//! `TestRunResult::duration` (`Duration::from_nanos(test.duration)`). So
//! the duration is already per repeat, in whole nanoseconds, and excludes
//! the syscall and the buffer setup. Every round runs every case once,
//! round-robin, and the table shows the median over rounds.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use flowguard_common::{Counters, EndpointKey};
use flowguard_tests::{
    frames::{self, Mac, L2},
    progs::{self, config, endpoint, v4_prefix, Guard, Prog},
};

const PREFIX: [u8; 4] = [192, 168, 1, 0];
const ENDPOINT: [u8; 4] = [192, 168, 1, 240];
const NON_ENDPOINT: [u8; 4] = [192, 168, 1, 100];
const OUTSIDE: [u8; 4] = [172, 16, 0, 1];
const PEER: [u8; 4] = [10, 0, 0, 7];
const CURRENT: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0xf0];
const STALE: Mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, 0x99];
const ROUTER: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const OTHER_ENDPOINTS: u32 = 1000;
const FRAME_LEN: usize = 64;

struct Args {
    repeat: u32,
    rounds: usize,
    out: PathBuf,
}

fn usage() -> &'static str {
    "usage: flowguard-bench [--repeat N] [--rounds R] [--out PATH]\n\
     defaults: --repeat 1000000 --rounds 5 --out target/bench/programs.txt (workspace root)"
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        repeat: 1_000_000,
        rounds: 5,
        out: progs::workspace_root().join("target/bench/programs.txt"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--repeat" => {
                args.repeat = value("--repeat")?
                    .parse()
                    .map_err(|e| format!("--repeat: {e}"))?;
            }
            "--rounds" => {
                args.rounds = value("--rounds")?
                    .parse()
                    .map_err(|e| format!("--rounds: {e}"))?;
            }
            "--out" => args.out = PathBuf::from(value("--out")?),
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.repeat == 0 || args.rounds == 0 {
        return Err("--repeat and --rounds must be at least 1".into());
    }
    Ok(args)
}

/// One 64-byte IPv4/UDP frame (the UDP payload fills it: no padding after
/// the datagram).
fn udp4(dst_mac: Mac, dst: [u8; 4]) -> Vec<u8> {
    let payload = [0x5a; FRAME_LEN - 14 - 20 - 8];
    let f = frames::udp4(L2::new(dst_mac, ROUTER), PEER, dst, 51820, 41641, &payload);
    assert_eq!(f.len(), FRAME_LEN);
    f
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Empty,
    NonIp,
    Outside,
    InsideMiss,
    Current,
    StaleObserve,
}

impl Class {
    fn label(self) -> &'static str {
        match self {
            Class::Empty => "(empty program, 64-byte IPv4/UDP)",
            Class::NonIp => "non-IP (ethertype 0x88b5)",
            Class::Outside => "IPv4 outside the prefixes",
            Class::InsideMiss => "IPv4 inside, to a non-endpoint",
            Class::Current => "to an endpoint, current MAC",
            Class::StaleObserve => "stale (observe: stale path, no write)",
        }
    }

    fn frame(self) -> Vec<u8> {
        match self {
            Class::Empty | Class::Outside => udp4(STALE, OUTSIDE),
            Class::NonIp => frames::ethertype(
                L2::new(STALE, ROUTER),
                0x88b5,
                &[0x5a; FRAME_LEN - frames::ETH_HLEN],
            ),
            Class::InsideMiss => udp4(STALE, NON_ENDPOINT),
            Class::Current => udp4(CURRENT, ENDPOINT),
            Class::StaleObserve => udp4(STALE, ENDPOINT),
        }
    }

    /// Fix mode everywhere except the stale class (see the note printed).
    fn fix_mode(self) -> bool {
        self != Class::StaleObserve
    }
}

struct Case {
    prog: Prog,
    class: Class,
    frame: Vec<u8>,
    samples: Vec<u32>,
}

fn median(v: &[u32]) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    let n = s.len();
    if n % 2 == 1 {
        f64::from(s[n / 2])
    } else {
        (f64::from(s[n / 2 - 1]) + f64::from(s[n / 2])) / 2.0
    }
}

fn prog_label(p: Prog) -> &'static str {
    match p {
        Prog::Xdp => "flowguard_xdp",
        Prog::Tc => "flowguard_tc",
        Prog::TcLearn => "flowguard_tc_learn",
        Prog::EmptyXdp => "bench_empty_xdp",
        Prog::EmptyTc => "bench_empty_tc",
    }
}

fn setup() -> Result<Guard, progs::Error> {
    let mut g = Guard::load()?;
    // Events about one endpoint at most once a second (HZ jiffies): the
    // stale class takes the whole stale path on every repeat, and the ring
    // buffer is not flooded.
    let one_second = u64::from(g.hz()?);
    g.set_config(&config(
        true,
        &[v4_prefix(PREFIX, 24)],
        &[],
        &[],
        one_second,
    ))?;
    g.insert_endpoint(EndpointKey::from_v4_bytes(ENDPOINT), &endpoint(CURRENT))?;
    // Other endpoints so that the hash map is not trivially small: the
    // rest of 192.168.1.0/24 (but the non-endpoint target and the endpoint),
    // then addresses in 10.1.0.0/16.
    let mut added = 0;
    for host in 1..=254u8 {
        if added == OTHER_ENDPOINTS {
            break;
        }
        if host == ENDPOINT[3] || host == NON_ENDPOINT[3] {
            continue;
        }
        let mac = [0x02, 0x42, 0xc0, 0xa8, 0x01, host];
        g.insert_endpoint(
            EndpointKey::from_v4_bytes([192, 168, 1, host]),
            &endpoint(mac),
        )?;
        added += 1;
    }
    let mut i = 0u32;
    while added < OTHER_ENDPOINTS {
        let [_, _, hi, lo] = i.to_be_bytes();
        let mac = [0x02, 0x42, 0x0a, 0x01, hi, lo];
        g.insert_endpoint(EndpointKey::from_v4_bytes([10, 1, hi, lo]), &endpoint(mac))?;
        added += 1;
        i += 1;
    }
    let n = g.endpoints()?.len();
    if n != OTHER_ENDPOINTS as usize + 1 {
        return Err(format!(
            "endpoint map holds {n} entries, expected {}",
            OTHER_ENDPOINTS + 1
        )
        .into());
    }
    Ok(g)
}

fn run() -> Result<String, progs::Error> {
    let args = parse_args().map_err(|e| format!("{e}\n{}", usage()))?;
    let mut g = setup()?;
    let classes = [
        Class::Empty,
        Class::NonIp,
        Class::Outside,
        Class::InsideMiss,
        Class::Current,
        Class::StaleObserve,
    ];
    let mut cases = Vec::new();
    for (guard, empty) in [(Prog::Xdp, Prog::EmptyXdp), (Prog::Tc, Prog::EmptyTc)] {
        for class in classes {
            let prog = if class == Class::Empty { empty } else { guard };
            cases.push(Case {
                prog,
                class,
                frame: class.frame(),
                samples: Vec::with_capacity(args.rounds),
            });
        }
    }
    let base_cfg = g.config()?;
    let mut fix = true;
    for round in 0..args.rounds {
        for case in cases.iter_mut() {
            if case.class.fix_mode() != fix {
                fix = case.class.fix_mode();
                g.set_config(&config(
                    fix,
                    &base_cfg.v4[..1],
                    &[],
                    &[],
                    base_cfg.event_interval_jiffies,
                ))?;
            }
            let before = g.counters()?;
            let out = g.run_repeat(case.prog, &case.frame, args.repeat)?;
            let after = g.counters()?;
            check(case, &out.data, before, after, args.repeat, out.ret)?;
            let ns = u32::try_from(out.duration.as_nanos()).unwrap_or(u32::MAX);
            case.samples.push(ns);
        }
        g.drain_events();
        eprintln!("round {}/{} done", round + 1, args.rounds);
    }

    let mut report = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    writeln!(
        report,
        "flowguard BPF_PROG_TEST_RUN benchmark: kernel {}, repeat {}, {} rounds (round-robin), \
         {}-byte frames, kernel per-repeat duration, median over rounds",
        kernel.trim(),
        args.repeat,
        args.rounds,
        FRAME_LEN
    )?;
    writeln!(
        report,
        "config: prefix 192.168.1.0/24; endpoint 192.168.1.240 plus {OTHER_ENDPOINTS} other \
         endpoints in the map; fix mode unless noted; event interval 1 s"
    )?;
    writeln!(report)?;
    writeln!(
        report,
        "{:<16} {:<40} {:>12} {:>12} {:>8}",
        "program", "class", "ns/packet", "min-max", "x empty"
    )?;
    for chunk in cases.chunks(classes.len()) {
        let empty = median(&chunk[0].samples);
        for case in chunk {
            let med = median(&case.samples);
            let min = case.samples.iter().min().copied().unwrap_or(0);
            let max = case.samples.iter().max().copied().unwrap_or(0);
            writeln!(
                report,
                "{:<16} {:<40} {:>12.1} {:>12} {:>8.2}",
                prog_label(case.prog),
                case.class.label(),
                med,
                format!("{min}-{max}"),
                if empty > 0.0 { med / empty } else { f64::NAN }
            )?;
        }
    }
    writeln!(report)?;
    writeln!(
        report,
        "stale -> rewrite: test_run reuses one buffer for all repeats, so in fix mode only the \
         first repeat sees the stale MAC and the rest take the current-MAC path. The stale row \
         is therefore measured in observe mode, where the frame stays stale on every repeat \
         (verified: the stale counter grows by exactly `repeat` per run): it is the whole stale \
         path (lookup, compare, jiffies, per-endpoint evidence, rate-limit check, per-CPU \
         counters) WITHOUT the fix-mode extras, i.e. the 6-byte destination MAC write (XDP: one \
         direct store; tc: bpf_skb_store_bytes) and the two `rewritten` increments. Those are \
         not measured here: the object has no benchmark-only program for them, and fix mode \
         with repeat 1 would measure test_run's per-call overhead, not the write."
    )?;
    writeln!(
        report,
        "The 'x empty' column divides by the empty program of the same hook (bench_empty_xdp / \
         bench_empty_tc), whose cost is mostly test_run's own per-repeat loop."
    )?;
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &report)?;
    Ok(format!("{report}\nwritten to {}", args.out.display()))
}

/// Checks that a case took the path it is named after, on every repeat.
fn check(
    case: &Case,
    out: &[u8],
    before: Counters,
    after: Counters,
    repeat: u32,
    ret: u32,
) -> Result<(), progs::Error> {
    let what = format!("{} / {}", prog_label(case.prog), case.class.label());
    if ret != case.prog.pass_value() {
        return Err(format!("{what}: returned {ret}").into());
    }
    if out != case.frame.as_slice() {
        return Err(format!("{what}: the frame was changed").into());
    }
    let stale = after.stale - before.stale;
    let expected = if case.class == Class::StaleObserve {
        u64::from(repeat)
    } else {
        0
    };
    if stale != expected || after.rewritten != before.rewritten {
        return Err(format!(
            "{what}: stale counter grew by {stale} (expected {expected}), rewritten by {}",
            after.rewritten - before.rewritten
        )
        .into());
    }
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "flowguard-bench: needs root (CAP_BPF) to load programs and run BPF_PROG_TEST_RUN"
        );
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flowguard-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
