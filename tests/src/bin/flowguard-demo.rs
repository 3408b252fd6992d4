//! flowguard-demo: shows, in network namespaces on this machine, the bug
//! flowguard exists for (a flow that keeps a container's old MAC after the
//! container is recreated) and flowguard fixing it in the host role.
//! Everything it creates is removed at the end, on failure and on Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use clap::Parser;
use flowguard_tests::flowguard_proc::{bpftool_dump, Flowguard, Status};
use flowguard_tests::netns::{self, BpffsMount};
use flowguard_tests::topology::{
    HostRoleTopology, CONTAINER_IP, HOST_PARENT, LAN_PREFIX, MAC_A, MAC_B,
};
use flowguard_tests::wait::Wait;

/// Demonstrates the stale-MAC bug and flowguard fixing it, in network
/// namespaces (needs root).
#[derive(Parser)]
struct Args {
    /// The flowguard binary to demonstrate.
    #[arg(long, default_value = "target/release/flowguard")]
    flowguard: PathBuf,
}

/// How long the container's endpoint may take to be learned.
const LEARN_TIMEOUT: Duration = Duration::from_secs(10);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (and SIGTERM) only set a flag: the demo stops at the next step and
/// its guards remove the namespaces and the mount on the way out.
fn install_interrupt_handler() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(signal, handler) };
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(reason) = netns::missing_prerequisite() {
        eprintln!("flowguard-demo cannot run: {reason}");
        return ExitCode::FAILURE;
    }
    if !args.flowguard.is_file() {
        eprintln!(
            "flowguard-demo: no flowguard binary at {}; build it first (cargo xtask demo does)",
            args.flowguard.display()
        );
        return ExitCode::FAILURE;
    }
    install_interrupt_handler();
    let result = demo(&args);
    println!("Cleaned up: the namespaces and the private bpffs are gone.");
    match result {
        Ok(()) => {
            println!("The demo passed: flowguard restored the flow.");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("The demo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo(args: &Args) -> Result<()> {
    let started = Instant::now();
    if let Some(reason) = netns::missing_nft_egress() {
        bail!("{reason}; the demo needs them to emulate a stale flowtable");
    }

    println!(
        "Building three network namespaces: a router (bridge br-lan, 192.168.1.1), a host \
         whose {HOST_PARENT} is a port of that bridge, and a container on a macvlan of the \
         host's {HOST_PARENT}, at {CONTAINER_IP} with MAC {MAC_A}."
    );
    let mut topology = HostRoleTopology::new(MAC_A);
    check_interrupted()?;

    let delivered = topology.deliver(10);
    check_interrupted()?;
    println!(
        "The router sends 10 datagrams of a WireGuard-like UDP flow (port 51820) to the \
         container: {delivered} of 10 arrive."
    );
    ensure!(
        delivered == 10,
        "expected all 10 datagrams to arrive before the MAC change"
    );
    check_interrupted()?;

    topology.recreate_container(MAC_B);
    topology.set_stale(MAC_A);
    println!(
        "The container is recreated with the same IP and a new MAC, {MAC_B}. The router's \
         neighbour table follows, but its offloaded flow keeps the cached MAC {MAC_A} \
         (emulated by an nftables egress rule on the bridge port)."
    );
    let delivered = topology.deliver(10);
    check_interrupted()?;
    println!(
        "The router sends 10 more datagrams: {delivered} of 10 arrive. This is the bug: the \
         host drops frames for a MAC that no longer exists."
    );
    ensure!(
        delivered == 0,
        "expected the stale flow to lose every datagram"
    );
    check_interrupted()?;

    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    println!(
        "Starting flowguard in the host role on the host's {HOST_PARENT}: XDP on ingress \
         rewrites stale destination MACs, tc egress learns each container's MAC from its own \
         frames. Its maps are pinned under {}.",
        pin_dir.display()
    );
    let mut flowguard = Flowguard::spawn(
        &args.flowguard,
        &topology.host,
        &pin_dir,
        &[
            "--ingress",
            HOST_PARENT,
            "--egress",
            HOST_PARENT,
            "--learn",
            "--prefix",
            LAN_PREFIX,
        ],
        true,
    );
    let ready = flowguard.try_wait_ready();
    // Ctrl-C reaches flowguard too, which may then exit before it is ready.
    check_interrupted()?;
    ready.map_err(anyhow::Error::msg)?;

    println!("The container sends its first frame (a datagram to the router).");
    topology.container_first_frame();
    let status = wait_until_learned(&flowguard)?;
    let endpoint = status
        .endpoint(&CONTAINER_IP.to_string())
        .expect("the learned endpoint is listed");
    println!(
        "flowguard learned {} at {} (source: {}).",
        endpoint.ip, endpoint.mac, endpoint.source
    );

    let delivered = topology.deliver(20);
    check_interrupted()?;
    println!("The router, still sending to {MAC_A}, sends 20 datagrams: {delivered} of 20 arrive.");
    ensure!(
        delivered == 20,
        "expected flowguard to deliver all 20 datagrams"
    );
    check_interrupted()?;

    println!("\n$ flowguard status\n{}", flowguard.status_table());
    let counters = pin_dir.join("counters");
    println!(
        "$ bpftool map dump pinned {}\n{}",
        counters.display(),
        bpftool_dump(&pin_dir, "counters")
    );
    // The /24's endpoints have a slot each in the direct-indexed array
    // (slot = the host part); the hash map holds larger prefixes' and IPv6.
    let slot = u32::from(CONTAINER_IP.octets()[3]).to_ne_bytes();
    let key: Vec<String> = slot.iter().map(u8::to_string).collect();
    let array = pin_dir.join("endpoints_v4");
    let mut args = vec![
        "map".to_string(),
        "lookup".into(),
        "pinned".into(),
        array.display().to_string(),
        "key".into(),
    ];
    args.extend(key);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    println!(
        "$ bpftool {}   # {CONTAINER_IP}'s slot in the {LAN_PREFIX} array\n{}",
        args.join(" "),
        netns::run("bpftool", &args)
    );

    println!("Stopping flowguard (SIGINT).");
    let exit = flowguard.stop();
    ensure!(exit.success(), "flowguard exited with {exit}");
    ensure!(
        !pin_dir.exists(),
        "flowguard left its pin directory {} behind",
        pin_dir.display()
    );
    println!(
        "flowguard detached and removed its pins. The demo took {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Polls `flowguard status` until the container is learned with its new MAC.
fn wait_until_learned(flowguard: &Flowguard) -> Result<Status> {
    let ip = CONTAINER_IP.to_string();
    let learned = Wait::new(format!("flowguard to learn {ip} at {MAC_B}"), LEARN_TIMEOUT)
        .every(Duration::from_millis(100))
        .poll(
            || flowguard.status(),
            |status| INTERRUPTED.load(Ordering::SeqCst) || status.has_endpoint(&ip, MAC_B),
        );
    check_interrupted()?;
    learned.map_err(|timed_out| anyhow!("{timed_out}; endpoints: {:?}", timed_out.last.endpoints))
}
