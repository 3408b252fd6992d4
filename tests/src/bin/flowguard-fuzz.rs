//! The frame fuzz at scale: a million random and mutated frames (by
//! default) through each program (both guards and the learning tc
//! program), run by BPF_PROG_TEST_RUN on the loaded object with real maps,
//! each checked against the oracle (`flowguard_tests::fuzz`), and the
//! learned endpoints compared with the oracle's after the run. Reports
//! wrong rewrites, passes and learns per program and exits non-zero if
//! there is any.
//!
//! `cargo xtask fuzz [-- --seed N --frames N]` (needs root).

use std::{
    io::{Read as _, Write as _},
    process::ExitCode,
    time::Instant,
};

use clap::Parser;
use flowguard_tests::{
    fuzz::{self, FrameSource, Scenario, FUZZED},
    progs::{self, Prog},
};

/// Fuzzes flowguard's programs (XDP, tc, tc with learning) with random and
/// mutated frames against an independent oracle of the spec (needs root).
#[derive(Parser)]
struct Args {
    /// The seed: the same seed gives the same prefixes, endpoints and
    /// frames. Default: a random one (printed, to replay a failure).
    #[arg(long)]
    seed: Option<u64>,
    /// Frames per program.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// A progress line every this many frames (0: none).
    #[arg(long, default_value_t = 100_000)]
    progress: u64,
    /// Show frame number INDEX of the seed (the oracle's verdict and each
    /// program's output) instead of fuzzing.
    #[arg(long, value_name = "INDEX", requires = "seed")]
    show: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(reason) = flowguard_tests::netns::needs_root("BPF_PROG_TEST_RUN") {
        eprintln!("flowguard-fuzz: {reason}");
        return ExitCode::FAILURE;
    }
    let seed = args.seed.unwrap_or_else(random_seed);
    let scenario = Scenario::from_seed(seed);
    if let Some(index) = args.show {
        return show(&scenario, seed, index);
    }
    println!(
        "flowguard-fuzz: seed {seed} (replay: cargo xtask fuzz -- --seed {seed}), {} frames per \
         program",
        args.frames
    );
    println!("guarding {scenario}");
    let started = Instant::now();
    let mut clean = true;
    let mut reports = Vec::new();
    for prog in FUZZED {
        let report = fuzz::run(prog, &scenario, seed, args.frames, args.progress, |r| {
            println!(
                "  {prog:?}: {} frames, {:.0} frames/s, {} rewritten, {} wrong rewrites, {} \
                 wrong passes (learns: compared at the end)",
                r.frames,
                r.frames_per_second(),
                r.rewritten,
                r.wrong_rewrites,
                r.wrong_passes
            );
            let _ = std::io::stdout().flush();
        });
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                eprintln!("flowguard-fuzz: cannot load the guard: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("{report}");
        clean &= report.is_clean();
        reports.push(report);
    }
    let summary: Vec<String> = reports
        .iter()
        .map(|r| {
            format!(
                "{:?} {} wrong rewrites, {} wrong passes, {} wrong learns",
                r.prog, r.wrong_rewrites, r.wrong_passes, r.wrong_learns
            )
        })
        .collect();
    println!(
        "{} after {:.1} s, seed {seed}: {}",
        if clean { "clean" } else { "WRONG" },
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Frame `index` of `seed`: its bytes, what the oracle expects, and what
/// each program made of it. The learning program (and its oracle) first
/// runs the frames before it, which decide what it has learned.
fn show(scenario: &Scenario, seed: u64, index: u64) -> ExitCode {
    let mut source = FrameSource::new(scenario, seed);
    let before: Vec<Vec<u8>> = (0..index).map(|_| source.next_frame()).collect();
    let frame = source.next_frame();
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    println!("guarding {scenario}");
    println!("seed {seed} frame #{index} ({} bytes): {hex}", frame.len());
    for prog in FUZZED {
        let mut oracle = scenario.oracle();
        let outcome = scenario.load().and_then(|g| {
            if prog == Prog::TcLearn {
                for (i, f) in before.iter().enumerate() {
                    match g.run(prog, f) {
                        Ok(_) => {
                            oracle.learn(f, i as u64);
                        }
                        Err(e) if progs::errno(&e) == Some(libc::EINVAL) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            let out = g.run(prog, &frame)?;
            let learned = if prog == Prog::TcLearn {
                match oracle.learn(&frame, index) {
                    Some(place) => format!("learn at {place:?}, then "),
                    None => "learn nothing, then ".to_owned(),
                }
            } else {
                String::new()
            };
            let want = match oracle.expected_via(&frame) {
                Some((mac, lookup)) => {
                    format!("rewrite to {mac:02x?} (endpoint in the {lookup:?})")
                }
                None => "pass untouched".to_owned(),
            };
            Ok(format!(
                "oracle: {learned}{want}; program: verdict {} (pass {}), {} bytes, {}",
                out.ret,
                prog.pass_value(),
                out.data.len(),
                fuzz::changes(&frame, &out.data)
            ))
        });
        match outcome {
            Ok(text) => println!("{prog:?}: {text}"),
            Err(e) => println!("{prog:?}: test_run: {e}"),
        }
    }
    ExitCode::SUCCESS
}

/// A seed from the kernel's random pool.
fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    u64::from_ne_bytes(bytes)
}
