//! The kernel side logs through aya-log on its rare paths; `flowguard run`
//! forwards those records to its own log (stderr).

use std::time::Duration;

use flowguard_tests::{
    flowguard_proc::Flowguard,
    netns::{run, BpffsMount, Netns},
    require_root,
    wait::{Text, Wait},
};

#[test]
fn kernel_side_warnings_reach_the_log() {
    require_root!("namespaces, bpffs, BPF");
    let router = Netns::new("klog-r");
    let endpoint = Netns::new("klog-e");
    router.ip(&[
        "link", "add", "lan1", "type", "veth", "peer", "name", "eth0",
    ]);
    router.ip(&["link", "set", "eth0", "netns", endpoint.name()]);
    router.ip(&["addr", "add", "192.168.1.1/24", "dev", "lan1"]);
    router.ip(&["link", "set", "lan1", "up"]);
    endpoint.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:0a", "up"]);
    endpoint.ip(&["addr", "add", "192.168.1.240/24", "dev", "eth0"]);
    let bpffs = BpffsMount::new();
    let mut fg = Flowguard::start(
        &router,
        &bpffs.pin_dir(),
        &[
            "--egress",
            "lan1",
            "--prefix",
            "192.168.1.0/24",
            "--no-neigh",
            "--evict",
            "off",
        ],
    );
    // Nothing in flowguard writes an all-zero MAC; an operator with bpftool
    // can. The kernel side refuses to rewrite toward it, and says so. A /24
    // is direct-indexed: 192.168.1.240 is slot 240 of endpoints_v4.
    let endpoints = bpffs.pin_dir().join("endpoints_v4");
    let key = "f0 00 00 00";
    let mut value = vec!["00"; std::mem::size_of::<flowguard_common::Endpoint>()];
    value[std::mem::offset_of!(flowguard_common::Endpoint, source)] = "01"; // source: static
    let mut args = vec![
        "map",
        "update",
        "pinned",
        endpoints.to_str().unwrap(),
        "key",
        "hex",
    ];
    args.extend(key.split(' '));
    args.extend(["value", "hex"]);
    args.extend(value);
    run("bpftool", &args);
    router.exec(&["ping", "-c", "1", "-W", "1", "192.168.1.240"]);
    let Text(stderr) = Wait::new(
        "the kernel side's warning about a zero or group MAC, forwarded",
        Duration::from_secs(10),
    )
    .until(
        || Text(fg.stderr_text()),
        |Text(stderr)| stderr.contains("zero or group MAC"),
    );
    assert!(
        stderr.contains("WARN") && stderr.contains("an endpoint holds a zero or group MAC"),
        "the kernel side's warning is not a warning; stderr:\n{stderr}"
    );
    assert_eq!(fg.status().counters.rewritten, 0, "nothing rewritten");
    assert!(fg.stop().success(), "flowguard exits cleanly");
}
