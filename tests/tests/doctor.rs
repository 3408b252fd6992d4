//! `flowguard doctor` on this machine's kernel, in a network namespace of its
//! own with a bridge, a bridge port and real conntrack entries: what it says
//! about the flowtable, conntrack and privileges, and its exit code.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Output};

use flowguard_tests::{
    flowguard_proc::require_flowguard_bin,
    netns::{self, Netns},
};
use serde_json::Value;

/// UDP datagrams sent inside the namespace, each to its own port: each one
/// is a conntrack entry.
const DATAGRAMS: u16 = 5;

fn skip() -> bool {
    if let Some(reason) = netns::missing_prerequisite() {
        netns::skip(&reason);
        return true;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        netns::skip("`setpriv` (util-linux) is not installed");
        return true;
    }
    false
}

/// A namespace with a bridge `br0` and its port `lan1` (a veth), conntrack
/// tracking locally generated traffic, and whether a flowtable on `lan1`
/// could be created (this machine's kernel has no nf_flow_table).
fn namespace() -> (Netns, Result<(), String>) {
    let ns = Netns::new("doctor");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&[
        "link", "add", "lan1", "type", "veth", "peer", "name", "peer1",
    ]);
    ns.ip(&["link", "set", "lan1", "master", "br0", "up"]);
    ns.ip(&["link", "set", "peer1", "up"]);
    ns.ip(&["addr", "add", "192.168.77.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    ns.exec(&[
        "nft",
        "add table inet fgdoctor; \
         add chain inet fgdoctor out { type filter hook output priority 0; }; \
         add rule inet fgdoctor out ct state new accept",
    ]);
    let flowtable = ns.try_exec(&[
        "nft",
        "add table inet fgft; \
         add flowtable inet fgft ft { hook ingress priority 0; devices = { lan1 }; }",
    ]);
    let flowtable = if flowtable.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&flowtable.stderr)
            .trim()
            .to_string())
    };
    (ns, flowtable)
}

/// Sends one UDP datagram to each of `DATAGRAMS` local ports from inside
/// `ns`: as many new conntrack entries (unreplied UDP lives 30 s).
fn send_datagrams(ns: &Netns) {
    ns.enter(|| {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
        for port in 40001..=40000 + DATAGRAMS {
            socket
                .send_to(b"doctor", ("127.0.0.1", port))
                .expect("send a datagram");
        }
    });
}

/// Runs `wrapper... flowguard doctor args...` in `ns` (host mount namespace).
fn doctor(ns: &Netns, wrapper: &[&str], args: &[&str]) -> Output {
    let bin = require_flowguard_bin();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()));
    cmd.args(wrapper).arg(&bin).arg("doctor").args(args);
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

fn json_of(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "`flowguard doctor --json` is not JSON ({e}):\n{text}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The checks named `name`.
fn checks<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    report["checks"]
        .as_array()
        .expect("checks is an array")
        .iter()
        .filter(|c| c["check"] == name)
        .collect()
}

fn the_check<'a>(report: &'a Value, name: &str) -> &'a Value {
    let found = checks(report, name);
    assert_eq!(found.len(), 1, "one {name} check in {report:#}");
    found[0]
}

fn failed_checks(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .expect("checks is an array")
        .iter()
        .filter(|c| c["verdict"] == "fail")
        .map(|c| c["check"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn doctor_reports_the_flowtable_conntrack_and_no_offloaded_flows() {
    if skip() {
        return;
    }
    let (ns, flowtable) = namespace();
    send_datagrams(&ns);

    let out = doctor(&ns, &[], &["--json"]);
    let report = json_of(&out);
    println!("{report:#}");

    // The host's bpffs is what doctor checks (nsenter keeps the mount namespace).
    let bpffs = flowguard_user::sys::is_on_bpffs(Path::new("/sys/fs/bpf"));
    let expected_failures: Vec<String> = if bpffs {
        Vec::new()
    } else {
        println!("note: /sys/fs/bpf is not a bpffs here: doctor must say so");
        vec!["bpffs".to_string()]
    };
    assert_eq!(failed_checks(&report), expected_failures, "{report:#}");
    assert_eq!(
        out.status.code(),
        Some(if bpffs { 0 } else { 1 }),
        "exit code; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["failed"], !bpffs);
    assert_eq!(the_check(&report, "privileges")["verdict"], "ok");
    assert_eq!(the_check(&report, "nftables")["verdict"], "ok");
    assert_eq!(the_check(&report, "kernel")["verdict"], "ok");

    match &flowtable {
        Err(why) => {
            println!("this kernel refuses a flowtable ({why}): doctor must find none");
            let ft = the_check(&report, "flowtable");
            assert_eq!(ft["verdict"], "info", "{ft:#}");
            assert_eq!(ft["message"], "no flowtable: nothing caches MACs");
            assert_eq!(report["flowtables"], Value::Array(Vec::new()));
        }
        Ok(()) => {
            println!("this kernel has nf_flow_table: doctor must see the bridge port");
            let ft = the_check(&report, "flowtable");
            assert_eq!(ft["verdict"], "warn", "{ft:#}");
            let message = ft["message"].as_str().unwrap();
            assert!(
                message.starts_with("inet fgft ft: caches destination MACs")
                    && message.contains("--egress lan1"),
                "{message}"
            );
            let t = &report["flowtables"][0];
            assert_eq!(t["caches_macs"], true);
            assert_eq!(t["devices"][0]["role"], "bridge_port");
            assert_eq!(t["devices"][0]["bridge"], "br0");
        }
    }

    let ct = &report["conntrack"];
    assert_eq!(ct["reachable"], true, "{ct:#}");
    let entries = ct["entries"].as_u64().expect("entries");
    assert!(
        entries >= u64::from(DATAGRAMS),
        "at least {DATAGRAMS} entries, got {entries}: {ct:#}"
    );
    assert_eq!(ct["offloaded"], 0, "{ct:#}");
    assert_eq!(ct["hw_offloaded"], 0, "{ct:#}");
    let line = the_check(&report, "conntrack");
    assert_eq!(line["verdict"], "ok");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{entries} entries, 0 offloaded now")),
        "{line:#}"
    );
    assert_ne!(the_check(&report, "flowguard")["verdict"], "fail");

    // The text form says the same, one line per check, with the same exit code.
    let out = doctor(&ns, &[], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert_eq!(out.status.code(), Some(if bpffs { 0 } else { 1 }));
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok    privileges CAP_BPF and CAP_NET_ADMIN")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("ok    conntrack  reachable over ctnetlink")),
        "{text}"
    );
    if flowtable.is_err() {
        assert!(
            text.lines()
                .any(|l| l == "info  flowtable  no flowtable: nothing caches MACs"),
            "{text}"
        );
    }
}

#[test]
fn doctor_without_privileges_says_which_capabilities_are_missing_and_exits_1() {
    if skip() {
        return;
    }
    let (ns, _) = namespace();
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];

    let out = doctor(&ns, &nobody, &["--json"]);
    let report = json_of(&out);
    println!("{report:#}");
    assert_eq!(out.status.code(), Some(1), "exit code");
    assert_eq!(report["failed"], true);
    let privileges = the_check(&report, "privileges");
    assert_eq!(privileges["verdict"], "fail", "{privileges:#}");
    let message = privileges["message"].as_str().unwrap();
    assert!(
        message.contains("CAP_BPF") && message.contains("CAP_NET_ADMIN"),
        "names the missing capabilities: {message}"
    );
    assert!(
        message.contains("run as root"),
        "says what to do: {message}"
    );
    // What it cannot read is a warning, not a made-up answer.
    assert_eq!(report["conntrack"]["reachable"], false);
    assert_eq!(the_check(&report, "conntrack")["verdict"], "warn");
    assert_eq!(report["flowtables"], Value::Null);
    assert_eq!(the_check(&report, "flowtable")["verdict"], "warn");

    let out = doctor(&ns, &nobody, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.lines()
            .any(|l| l.starts_with("fail  privileges missing CAP_BPF and CAP_NET_ADMIN")),
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.contains("check(s) failed")),
        "ends with the summary: {text}"
    );
}
