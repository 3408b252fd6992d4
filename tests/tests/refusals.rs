//! `flowguard run` refuses what it cannot do safely, in one line, and leaves
//! nothing behind: a second instance on the same pin directory, a pin
//! directory outside a bpffs, a process without the privileges.

use std::{
    path::Path,
    process::{Command, Output},
};

use flowguard_tests::{
    flowguard_proc::{require_flowguard_bin, Flowguard},
    netns::{is_root, BpffsMount, Netns},
};

const PREFIX: &str = "192.168.1.0/24";

fn skip() -> bool {
    if !is_root() {
        flowguard_tests::netns::skip("needs root (namespaces, bpffs, BPF)");
        return true;
    }
    false
}

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
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

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
    if skip() {
        return;
    }
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
    if skip() {
        return;
    }
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
    if skip() {
        return;
    }
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
