//! `flowguard run` refuses what it cannot do safely, in one line, and leaves
//! nothing behind: a second instance on the same pin directory, a pin
//! directory outside a bpffs, a process without the privileges.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use flowguard_tests::{
    flowguard_proc::{require_flowguard_bin, Flowguard},
    netns::{BpffsMount, Netns},
    require_root,
};

const PREFIX: &str = "192.168.1.0/24";

/// What the tests here need root for.
const ROOT_FOR: &str = "namespaces, bpffs, BPF";

/// A namespace with an interface `lan1` that is up.
fn namespace() -> Netns {
    let ns = Netns::new("refuse");
    ns.ip(&[
        "link", "add", "lan1", "type", "veth", "peer", "name", "peer1",
    ]);
    ns.ip(&["link", "set", "lan1", "up"]);
    ns
}

/// Runs `prefix... flowguard run args...` in `ns` to completion.
fn run_once(ns: &Netns, wrapper: &[&str], args: &[&str]) -> Output {
    let bin = require_flowguard_bin();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()));
    cmd.args(wrapper).arg(&bin).arg("run").args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    // A refusal comes at once; one that did not come would leave flowguard
    // running: stop it (SIGINT, so that it detaches) and say so.
    let pid = child.id();
    let (done, waited) = std::sync::mpsc::channel();
    let watchdog = std::thread::spawn(move || {
        if waited.recv_timeout(REFUSAL_TIMEOUT).is_err() {
            // SAFETY: kill has no memory-safety preconditions; the child is
            // not reaped until wait_with_output returns.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
            return true;
        }
        false
    });
    let out = child.wait_with_output().expect("wait for flowguard");
    let _ = done.send(());
    let timed_out = watchdog.join().expect("watchdog");
    assert!(
        !timed_out,
        "flowguard run {args:?} was not refused: it ran until stopped after \
         {REFUSAL_TIMEOUT:?}; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// How long a refusal may take (loading takes a few seconds on a busy
/// machine, so a refusal after it is seen too).
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(20);

/// The lines of stderr that are not the logger's.
fn one_error_line(out: &Output) -> String {
    assert!(!out.status.success(), "must fail, exited {}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one error line, got:\n{stderr}");
    lines[0].to_string()
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
fn a_second_instance_on_the_same_pin_dir_is_refused_and_the_first_keeps_running() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let mut first = Flowguard::start(&ns, &pin_dir, &["--egress", "lan1", "--prefix", PREFIX]);
    let pinned = pins_in(&pin_dir);
    let out = run_once(
        &ns,
        &[],
        &[
            "--egress",
            "lan1",
            "--prefix",
            PREFIX,
            "--pin-dir",
            pin_dir.to_str().unwrap(),
        ],
    );
    let line = one_error_line(&out);
    assert!(line.contains("already running"), "{line}");
    assert_eq!(
        pins_in(&pin_dir),
        pinned,
        "the first instance's pins are untouched"
    );
    assert_eq!(
        first.status().mode,
        "fix",
        "the first instance still answers"
    );
    assert!(first.stop().success());
    assert!(
        !pin_dir.exists(),
        "the first instance removed its pins on exit"
    );
}

#[test]
fn a_pin_dir_outside_a_bpffs_is_refused() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    let dir = std::env::temp_dir().join(format!("flowguard-not-bpffs-{}", std::process::id()));
    let pin_dir = dir.join("flowguard");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = run_once(
        &ns,
        &[],
        &[
            "--egress",
            "lan1",
            "--prefix",
            PREFIX,
            "--pin-dir",
            pin_dir.to_str().unwrap(),
        ],
    );
    let line = one_error_line(&out);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(line.contains("not on a bpf filesystem"), "{line}");
    assert!(line.contains("mount -t bpf"), "says what to do: {line}");
    assert!(!pin_dir.exists(), "nothing created");
    let shown = ns.exec(&["ip", "-d", "link", "show", "lan1"]);
    assert!(!shown.contains("prog/xdp"), "nothing attached: {shown}");
}

#[test]
fn without_privileges_nothing_is_attached() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    // An unprivileged user with no capabilities at all.
    let out = run_once(
        &ns,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ],
        &[
            "--egress",
            "lan1",
            "--prefix",
            PREFIX,
            "--pin-dir",
            pin_dir.to_str().unwrap(),
        ],
    );
    let line = one_error_line(&out);
    assert!(
        line.contains("CAP_BPF") && line.contains("CAP_NET_ADMIN"),
        "names the missing capabilities: {line}"
    );
    assert!(!pin_dir.exists(), "nothing pinned");
    let links = ns.nsenter("bpftool", &["net", "show"]);
    let text = String::from_utf8_lossy(&links.stdout);
    assert!(!text.contains("flowguard"), "nothing attached: {text}");
}

// What a user typing the wrong thing reads (issue 11): one sentence that
// names the input, and nothing pinned or attached; or, where the intent is
// plain, it is done and said.

/// Whether anything of flowguard's is attached in `ns`.
fn attached_in(ns: &Netns) -> String {
    let out = ns.nsenter("bpftool", &["net", "show"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.contains("flowguard") || text.contains("fg_") {
        text
    } else {
        String::new()
    }
}

/// One wrong input and how flowguard refuses it.
struct Refusal<'a> {
    /// What is wrong, for the failure message.
    name: &'a str,
    /// The arguments of `flowguard run`, without `--pin-dir`.
    args: &'a [&'a str],
    /// The exit status.
    status: i32,
    /// Words the one error line contains, each.
    words: &'a [&'a str],
}

/// Runs `flowguard run <case.args> --pin-dir <fresh bpffs>` in a fresh
/// namespace (prepared by `setup`), which must refuse it with `case.status`
/// in one line containing each of `case.words`, leaving nothing pinned or
/// attached.
fn assert_refused(setup: impl Fn(&Netns), case: &Refusal) {
    let Refusal {
        name,
        args,
        status,
        words,
    } = case;
    let ns = namespace();
    setup(&ns);
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let mut full = args.to_vec();
    full.extend_from_slice(&["--pin-dir", pin_dir.to_str().unwrap()]);
    let out = run_once(&ns, &[], &full);
    let line = one_error_line(&out);
    assert_eq!(
        out.status.code(),
        Some(*status),
        "{name} ({args:?}): exit status, with: {line}"
    );
    for w in *words {
        assert!(
            line.contains(w),
            "{name} ({args:?}): wanted {w:?} in: {line}"
        );
    }
    assert!(!pin_dir.exists(), "{name} ({args:?}): nothing pinned");
    assert_eq!(attached_in(&ns), "", "{name} ({args:?}): nothing attached");
}

/// Wrong inputs refused in a namespace that has only `lan1`.
const REFUSALS: &[Refusal] = &[
    Refusal {
        name: "an egress interface given twice",
        args: &["--egress", "lan1", "--egress", "lan1", "--prefix", PREFIX],
        status: 1,
        words: &["--egress lan1 is given twice"],
    },
    Refusal {
        name: "an ingress interface given twice",
        args: &["--ingress", "lan1", "--ingress", "lan1", "--prefix", PREFIX],
        status: 1,
        words: &["--ingress lan1 is given twice"],
    },
    Refusal {
        name: "an IPv4 prefix of every address",
        args: &[
            "--egress",
            "lan1",
            "--prefix",
            PREFIX,
            "--prefix",
            "0.0.0.0/0",
        ],
        status: 1,
        words: &["--prefix 0.0.0.0/0 covers every address"],
    },
    Refusal {
        name: "an IPv6 prefix of every address",
        args: &["--egress", "lan1", "--prefix", PREFIX, "--prefix", "::/0"],
        status: 1,
        words: &["--prefix ::/0 covers every address"],
    },
    Refusal {
        name: "one static address with two MACs",
        args: &[
            "--egress",
            "lan1",
            "--prefix",
            PREFIX,
            "--static",
            "192.168.1.9=02:00:00:00:00:09",
            "--static",
            "192.168.1.9=02:00:00:00:00:0a",
        ],
        status: 1,
        words: &["--static gives 192.168.1.9 two MACs"],
    },
    Refusal {
        name: "more statics than the endpoint map holds",
        args: &[
            "--egress",
            "lan1",
            // A /16 keeps its endpoints in the hash map (a /24's go to the
            // direct-indexed array, which --max-endpoints does not size).
            "--prefix",
            "192.168.0.0/16",
            "--max-endpoints",
            "2",
            "--static",
            "192.168.1.1=02:00:00:00:00:01",
            "--static",
            "192.168.1.2=02:00:00:00:00:02",
            "--static",
            "192.168.1.3=02:00:00:00:00:03",
        ],
        status: 1,
        words: &["endpoint hash map", "holds 2", "--max-endpoints"],
    },
];

#[test]
fn wrong_inputs_are_refused_in_one_sentence() {
    require_root!(ROOT_FOR);
    for case in REFUSALS {
        assert_refused(|_| {}, case);
    }
}

#[test]
fn a_missing_prefix_is_named() {
    let bin = require_flowguard_bin();
    let out = Command::new(&bin)
        .args(["run", "--egress", "lan1"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let line = one_error_line(&out);
    assert!(line.contains("--prefix <CIDR|auto>"), "{line}");
}

#[test]
fn repeated_and_overlapping_prefixes_are_merged_with_a_note() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let mut fg = Flowguard::start(
        &ns,
        &bpffs.pin_dir(),
        &[
            "--egress",
            "lan1",
            "--prefix",
            "192.168.1.128/25",
            "--prefix",
            PREFIX,
            "--prefix",
            PREFIX,
        ],
    );
    let lines = fg.stdout_lines();
    let text = lines.join("\n");
    let watching = lines
        .iter()
        .find(|l| l.starts_with("flowguard: watching "))
        .expect("a watching line");
    assert!(
        watching.starts_with("flowguard: watching 192.168.1.0/24 in "),
        "each prefix once: {watching}"
    );
    assert!(
        text.contains("--prefix 192.168.1.128/25 is inside 192.168.1.0/24"),
        "{text}"
    );
    assert!(
        text.contains("--prefix 192.168.1.0/24 is given twice"),
        "{text}"
    );
    assert!(fg.stop().success());
}

/// `lan1` made a port of a bridge `br0` that is up, with `addresses`.
fn lan1_in_bridge(ns: &Netns, addresses: &[&str]) {
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "lan1", "master", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    for a in addresses {
        ns.ip(&["addr", "add", a, "dev", "br0", "nodad"]);
    }
}

#[test]
fn prefix_auto_watches_the_guarded_ports_bridges_prefixes() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    lan1_in_bridge(&ns, &["192.168.77.1/24", "fd77::1/64", "10.1.2.3/32"]);
    let bpffs = BpffsMount::new();
    let mut fg = Flowguard::start(
        &ns,
        &bpffs.pin_dir(),
        &[
            "--egress",
            "lan1",
            "--prefix",
            "auto",
            "--prefix",
            "192.168.77.128/25",
        ],
    );
    let lines = fg.stdout_lines();
    let text = lines.join("\n");
    let watching = lines
        .iter()
        .find(|l| l.starts_with("flowguard: watching "))
        .expect("a watching line");
    // The /32 names no LAN; br0's link-local address is not a prefix; the
    // given /25 is inside br0's /24.
    assert!(
        watching.starts_with("flowguard: watching 192.168.77.0/24, fd77::/64 in "),
        "{watching}"
    );
    assert!(
        text.contains("--prefix auto: 192.168.77.0/24, fd77::/64 (the addresses of br0"),
        "{text}"
    );
    assert!(
        text.contains("--prefix 192.168.77.128/25 is inside 192.168.77.0/24"),
        "{text}"
    );
    assert!(fg.stop().success());
}

#[test]
fn prefix_auto_without_a_bridge_or_its_address_is_refused() {
    require_root!(ROOT_FOR);
    assert_refused(
        |_| {},
        &Refusal {
            name: "--prefix auto on a port of no bridge",
            args: &["--egress", "lan1", "--prefix", "auto"],
            status: 1,
            words: &[
                "--prefix auto",
                "none of lan1 is a bridge port",
                "--prefix CIDR",
            ],
        },
    );
    assert_refused(
        |ns| lan1_in_bridge(ns, &["10.1.2.3/32"]),
        &Refusal {
            name: "--prefix auto on a bridge without a LAN address",
            args: &["--egress", "lan1", "--prefix", "auto"],
            status: 1,
            words: &[
                "--prefix auto",
                "br0 has no IPv4 or IPv6 address",
                "--prefix CIDR",
            ],
        },
    );
}

#[test]
fn a_pin_dir_that_is_a_pinned_object_is_refused() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let mut first = Flowguard::start(&ns, &pin_dir, &["--egress", "lan1", "--prefix", PREFIX]);
    let pinned = pins_in(&pin_dir);
    let object = pin_dir.join(pinned.first().expect("something pinned"));
    let out = run_once(
        &ns,
        &[],
        &[
            "--ingress",
            "peer1",
            "--prefix",
            PREFIX,
            "--pin-dir",
            object.to_str().unwrap(),
        ],
    );
    let line = one_error_line(&out);
    assert!(
        line.contains("is a pinned object, not a directory"),
        "{line}"
    );
    assert_eq!(pins_in(&pin_dir), pinned, "the first instance's pins stay");
    let shown = ns.exec(&["ip", "-d", "link", "show", "peer1"]);
    assert!(!shown.contains("prog/xdp"), "nothing attached: {shown}");
    assert!(first.stop().success());
}

#[test]
fn a_pin_dir_whose_parents_are_missing_gets_them_for_its_life() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let parent = bpffs.path().join("a");
    let pin_dir = parent.join("b").join("flowguard");
    let mut fg = Flowguard::start(&ns, &pin_dir, &["--egress", "lan1", "--prefix", PREFIX]);
    let text = fg.stdout_lines().join("\n");
    assert!(
        text.contains(&format!("created {}", parent.join("b").display())),
        "says so: {text}"
    );
    assert!(!pins_in(&pin_dir).is_empty());
    assert!(fg.stop().success());
    assert!(!parent.exists(), "the directories it created are gone");
}

#[test]
fn loopback_and_bridge_devices_are_refused_with_why() {
    require_root!(ROOT_FOR);
    let bridge = |ns: &Netns| {
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
    };
    for case in NOT_ETHERNET_PORTS {
        assert_refused(bridge, case);
    }
}

/// Devices that are no Ethernet port to guard, in a namespace with a bridge
/// `br0`.
const NOT_ETHERNET_PORTS: &[Refusal] = &[
    Refusal {
        name: "loopback on egress",
        args: &["--egress", "lo", "--prefix", PREFIX],
        status: 1,
        words: &["--egress lo", "loopback", "no Ethernet"],
    },
    Refusal {
        name: "loopback on ingress",
        args: &["--ingress", "lo", "--prefix", PREFIX],
        status: 1,
        words: &["--ingress lo", "loopback", "no Ethernet"],
    },
    Refusal {
        name: "a bridge device on ingress",
        args: &["--ingress", "br0", "--prefix", PREFIX],
        status: 1,
        words: &["--ingress br0", "bridge device"],
    },
    Refusal {
        name: "a bridge device on egress",
        args: &["--egress", "br0", "--prefix", PREFIX],
        status: 1,
        words: &["--egress br0", "bridge device", "--auto"],
    },
];

#[test]
fn ten_thousand_statics_are_counted_not_listed() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let statics: Vec<String> = (0..10_000u32)
        .map(|i| {
            let [_, _, hi, lo] = i.to_be_bytes();
            format!("10.1.{hi}.{lo}=02:00:00:00:{hi:02x}:{lo:02x}")
        })
        .collect();
    let mut args = vec!["--egress", "lan1", "--prefix", "10.1.0.0/16"];
    for s in &statics {
        args.extend_from_slice(&["--static", s]);
    }
    let mut fg = Flowguard::start(&ns, &bpffs.pin_dir(), &args);
    let lines = fg.stdout_lines();
    let line = lines
        .iter()
        .find(|l| l.starts_with("flowguard: static endpoints"))
        .expect("a line about the static endpoints");
    assert!(line.len() < 300, "{} bytes: {line:.300}", line.len());
    assert!(
        line.contains("10000") && line.contains(&statics[0]),
        "{line}"
    );
    assert!(line.ends_with('…'), "{line}");
    assert_eq!(fg.status().endpoints.len(), 10_000);
    assert!(fg.stop().success());
}

#[test]
fn without_a_bpffs_at_sys_fs_bpf_root_mounts_one_and_says_so() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    let root = Path::new("/sys/fs/bpf");
    let host_before = flowguard_tests::netns::run("stat", &["-f", "-c", "%T", "/sys/fs/bpf"]);
    // A private mount namespace whose /sys/fs/bpf has no bpffs: the host's
    // mounts are never touched.
    let wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        "while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf || exit 97; done; exec \"$@\"",
        "sh",
    ];
    let mut fg = Flowguard::start_wrapped(
        &wrapper,
        &ns,
        &root.join("flowguard"),
        &["--egress", "lan1", "--prefix", PREFIX],
    );
    let text = fg.stdout_lines().join("\n");
    assert!(
        text.contains("no bpf filesystem was mounted at /sys/fs/bpf: mounted one there"),
        "says so: {text}"
    );
    let stopped = fg.stop();
    assert!(
        stopped.success(),
        "{stopped}: {}\n{}",
        fg.stdout_lines().join("\n"),
        fg.stderr_text()
    );
    let host_after = flowguard_tests::netns::run("stat", &["-f", "-c", "%T", "/sys/fs/bpf"]);
    assert_eq!(
        host_before, host_after,
        "the host's /sys/fs/bpf is untouched"
    );
}

#[test]
fn learn_with_only_ingress_learns_on_its_egress_and_says_so() {
    require_root!(ROOT_FOR);
    let ns = namespace();
    let bpffs = BpffsMount::new();
    let mut fg = Flowguard::start(
        &ns,
        &bpffs.pin_dir(),
        &["--ingress", "lan1", "--learn", "--prefix", PREFIX],
    );
    let lines = fg.stdout_lines();
    let text = lines.join("\n");
    assert!(
        text.contains("--learn without --egress: learning from the frames leaving lan1"),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.contains("learning")
            && l.starts_with("flowguard: tc egress")
            && l.ends_with(" on lan1")),
        "learns on lan1's egress: {text}"
    );
    assert!(fg.stop().success());
}

#[test]
fn learning_on_more_interfaces_than_own_macs_fit_is_refused() {
    require_root!(ROOT_FOR);
    // lan1 and eight more ports, each with a MAC of its own: the kernel
    // side tells at most 8 of the router's MACs from endpoints'.
    let ports: Vec<String> = (2..=9).map(|i| format!("lan{i}")).collect();
    let setup = |ns: &Netns| {
        for (i, p) in ports.iter().enumerate() {
            ns.ip(&[
                "link",
                "add",
                p,
                "address",
                &format!("02:00:00:00:0f:{:02x}", i + 2),
                "type",
                "veth",
                "peer",
                "name",
                &format!("peer{}", i + 2),
            ]);
        }
    };
    let mut args = vec!["--learn", "--prefix", PREFIX, "--egress", "lan1"];
    for p in &ports {
        args.extend_from_slice(&["--egress", p]);
    }
    assert_refused(
        setup,
        &Refusal {
            name: "learning on nine ports with distinct MACs",
            args: &args,
            status: 1,
            words: &["--learn on interfaces with 9 distinct MACs", "at most 8"],
        },
    );
    // Without learning the same ports are guarded: the MACs are not needed.
    let ns = namespace();
    setup(&ns);
    let bpffs = BpffsMount::new();
    let mut fg = Flowguard::start(&ns, &bpffs.pin_dir(), &args[1..]);
    let text = fg.stdout_lines().join("\n");
    assert!(text.contains(" on lan9"), "{text}");
    assert!(fg.stop().success());
}
