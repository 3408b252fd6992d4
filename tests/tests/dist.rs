//! The service files in `dist/`: the OpenWrt init script is valid shell, reads
//! only UCI options that the sample config documents, and builds a command
//! line that `flowguard run` accepts; the systemd unit parses, and the
//! capabilities it grants are enough for flowguard to attach and stop
//! cleanly; the environment file's sample arguments parse.
//!
//! Checks that need a tool this machine lacks (`systemd-analyze`,
//! `shellcheck`, `busybox`, root) print `skipped: <reason>` instead.
//!
//! Run: `cargo test -p flowguard-tests --release --test dist`

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flowguard_tests::flowguard_proc::{flowguard_bin, Flowguard};
use flowguard_tests::netns::{BpffsMount, Netns};
use flowguard_tests::skip_unless_root;

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .components()
        .collect()
}

fn read(relative: &str) -> String {
    let path = dist().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

const INIT: &str = "openwrt/flowguard.init";
const UCI: &str = "openwrt/flowguard.config";
const UNIT: &str = "flowguard.service";
const ENV: &str = "flowguard.env";

/// Whether `program` can be started at all.
fn have(program: &str, probe: &str) -> bool {
    Command::new(program).arg(probe).output().is_ok()
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A scratch directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("flowguard-dist-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The binary under test, or `None` (and a printed reason) if it is not built.
fn binary_or_skip() -> Option<PathBuf> {
    let bin = flowguard_bin();
    if bin.is_file() {
        Some(bin)
    } else {
        println!(
            "skipped: {} is not built (cargo build --release -p flowguard-user)",
            bin.display()
        );
        None
    }
}

/// Whether `flowguard run ARGS` parses: `--help` after them makes clap stop
/// after checking every argument before it, without running anything.
fn run_args_parse(bin: &Path, args: &[String]) -> Result<(), String> {
    let out = Command::new(bin)
        .arg("run")
        .args(args)
        .arg("--help")
        .output()
        .expect("run flowguard");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("flowguard run {args:?}: {}", output_text(&out)))
    }
}

// ---------------------------------------------------------------------------
// OpenWrt

/// One `option` or `list` line of the sample UCI config; `commented` for
/// documented examples (`#list egress 'lan1'`).
#[derive(Debug)]
struct UciLine {
    list: bool,
    name: String,
    value: String,
    commented: bool,
}

fn uci_sample() -> Vec<UciLine> {
    let text = read(UCI);
    assert!(
        text.lines().any(|l| l.trim() == "config flowguard 'main'"),
        "the sample has the section the script reads"
    );
    let mut out = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        let (body, commented) = match trimmed.strip_prefix('#') {
            Some(rest) => (rest.trim_start(), true),
            None => (trimmed, false),
        };
        let mut words = body.splitn(3, char::is_whitespace);
        let (Some(kind), Some(name), Some(value)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        if kind != "option" && kind != "list" {
            continue;
        }
        let value = value.trim();
        let Some(value) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) else {
            if commented {
                continue; // prose that happens to start with "option"
            }
            panic!("unquoted value in the sample config: {line}");
        };
        out.push(UciLine {
            list: kind == "list",
            name: name.to_string(),
            value: value.to_string(),
            commented,
        });
    }
    out
}

/// The options the init script reads from section `main`: (name, is a list).
fn options_read_by_init() -> BTreeSet<(String, bool)> {
    let mut out = BTreeSet::new();
    for line in read(INIT).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["config_get" | "config_get_bool", _var, section, option, ..] => {
                assert_eq!(*section, "main", "{line}");
                out.insert((option.to_string(), false));
            }
            ["config_list_foreach", section, option, ..] => {
                assert_eq!(*section, "main", "{line}");
                out.insert((option.to_string(), true));
            }
            _ => {}
        }
    }
    out
}

#[test]
fn init_script_is_valid_shell() {
    let path = dist().join(INIT);
    let first = read(INIT).lines().next().unwrap_or("").to_string();
    assert_eq!(first, "#!/bin/sh /etc/rc.common", "an rc.common script");
    let out = Command::new("sh")
        .arg("-n")
        .arg(&path)
        .output()
        .expect("sh");
    assert!(out.status.success(), "sh -n: {}", output_text(&out));
    // OpenWrt's shell is busybox ash.
    if have("busybox", "--help") {
        let out = Command::new("busybox")
            .args(["sh", "-n"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "busybox sh -n: {}", output_text(&out));
    } else {
        println!("skipped: busybox sh -n (busybox is not installed)");
    }
    if have("shellcheck", "--version") {
        let out = Command::new("shellcheck").arg(&path).output().unwrap();
        assert!(out.status.success(), "shellcheck:\n{}", output_text(&out));
    } else {
        println!("skipped: shellcheck (not installed: apt-get install shellcheck)");
    }
}

#[test]
fn every_uci_option_the_init_script_reads_is_in_the_sample_config() {
    let read_options = options_read_by_init();
    for wanted in ["enabled", "mode", "evict", "metrics", "learn"] {
        assert!(
            read_options.contains(&(wanted.to_string(), false)),
            "{wanted}"
        );
    }
    for wanted in ["egress", "ingress", "prefix", "static"] {
        assert!(
            read_options.contains(&(wanted.to_string(), true)),
            "{wanted}"
        );
    }
    let sample = uci_sample();
    for (name, list) in &read_options {
        assert!(
            sample.iter().any(|l| &l.name == name && l.list == *list),
            "the init script reads {} '{name}', which the sample config does not show",
            if *list { "list" } else { "option" }
        );
    }
    for line in &sample {
        assert!(
            read_options.contains(&(line.name.clone(), line.list)),
            "the sample config has {line:?}, which the init script never reads"
        );
    }
}

/// Shell stand-ins for OpenWrt's config_* (functions.sh) and procd_*
/// (procd.sh), which print what the script asks procd for.
const STUBS: &str = r#"
config_load() { [ "$1" = flowguard ] || { echo "config_load $1" >&2; exit 3; }; }
config_get() { eval "__v=\${CONFIG_$2_$3-\${4-}}"; eval "$1=\$__v"; }
config_get_bool() {
	config_get "$@"
	eval "__v=\$$1"
	case "$__v" in 1|on|true|yes|enabled) __v=1 ;; *) __v=0 ;; esac
	eval "$1=\$__v"
}
config_list_foreach() {
	__s=$1; __o=$2; __f=$3; shift 3
	eval "__n=\${CONFIG_${__s}_${__o}_LENGTH:-0}"
	__i=1
	while [ "$__i" -le "$__n" ]; do
		eval "__item=\$CONFIG_${__s}_${__o}_ITEM$__i"
		"$__f" "$__item" "$@"
		__i=$((__i + 1))
	done
}
procd_open_instance() { echo open; }
procd_close_instance() { echo close; }
procd_set_param() { __k=$1; shift; printf 'set\t%s' "$__k"; printf '\t%s' "$@"; printf '\n'; }
procd_append_param() { __k=$1; shift; printf 'append\t%s' "$__k"; printf '\t%s' "$@"; printf '\n'; }
"#;

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What start_service asked procd for.
#[derive(Debug, Default)]
struct Instance {
    opened: bool,
    closed: bool,
    command: Vec<String>,
    netdev: Vec<String>,
    params: Vec<(String, Vec<String>)>,
}

/// Runs the init script's start_service under `shell` with the sample
/// config, every commented example included, and `overrides` (option, value).
fn start_service(shell: &[&str], overrides: &[(&str, &str)]) -> Instance {
    let mut vars = String::new();
    let mut lengths: Vec<(String, usize)> = Vec::new();
    for line in uci_sample() {
        if line.list {
            let n = match lengths.iter_mut().find(|(name, _)| *name == line.name) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    lengths.push((line.name.clone(), 1));
                    1
                }
            };
            vars += &format!(
                "CONFIG_main_{}_ITEM{n}={}\n",
                line.name,
                shell_quote(&line.value)
            );
        } else if !line.commented {
            vars += &format!("CONFIG_main_{}={}\n", line.name, shell_quote(&line.value));
        }
    }
    for (name, n) in lengths {
        vars += &format!("CONFIG_main_{name}_LENGTH={n}\n");
    }
    for (name, value) in overrides {
        vars += &format!("CONFIG_main_{name}={}\n", shell_quote(value));
    }
    let script = format!(
        "{STUBS}\n{vars}\n. {}\nensure_bpffs() {{ echo ensure_bpffs >&2; }}\nstart_service\n",
        shell_quote(&dist().join(INIT).to_string_lossy())
    );
    let out = Command::new(shell[0])
        .args(&shell[1..])
        .arg("-c")
        .arg(&script)
        .output()
        .expect("run the shell");
    assert!(
        out.status.success(),
        "start_service under {shell:?} failed: {}",
        output_text(&out)
    );
    let mut instance = Instance::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let fields: Vec<String> = line.split('\t').map(str::to_string).collect();
        match (fields[0].as_str(), fields.get(1).map(String::as_str)) {
            ("open", _) => instance.opened = true,
            ("close", _) => instance.closed = true,
            ("set", Some("command")) => instance.command = fields[2..].to_vec(),
            ("append", Some("command")) => instance.command.extend_from_slice(&fields[2..]),
            ("set" | "append", Some("netdev")) => instance.netdev.extend_from_slice(&fields[2..]),
            ("set", Some(key)) => instance
                .params
                .push((key.to_string(), fields[2..].to_vec())),
            _ => panic!("unexpected output from start_service: {line}"),
        }
    }
    instance
}

fn shells() -> Vec<Vec<&'static str>> {
    let mut out = vec![vec!["sh"]];
    if have("busybox", "--help") {
        out.push(vec!["busybox", "sh"]);
    } else {
        println!("skipped: the init script under busybox sh (busybox is not installed)");
    }
    out
}

fn has_pair(command: &[String], flag: &str, value: &str) -> bool {
    command.windows(2).any(|w| w[0] == flag && w[1] == value)
}

#[test]
fn the_init_script_builds_a_command_line_flowguard_accepts() {
    for shell in shells() {
        let disabled = start_service(&shell, &[]);
        assert!(!disabled.opened, "the sample is disabled: {disabled:?}");

        let i = start_service(&shell, &[("enabled", "1")]);
        assert!(i.opened && i.closed, "{i:?}");
        assert_eq!(&i.command[..2], ["/usr/sbin/flowguard", "run"], "{i:?}");
        let c = &i.command;
        assert!(has_pair(c, "--prefix", "auto"), "the default: {c:?}");
        assert!(has_pair(c, "--prefix", "192.168.1.0/24"), "{c:?}");
        assert!(
            has_pair(c, "--egress", "lan1") && has_pair(c, "--egress", "lan2"),
            "{c:?}"
        );
        assert!(has_pair(c, "--ingress", "eth0"), "{c:?}");
        assert!(has_pair(c, "--mode", "fix") && has_pair(c, "--evict", "offloaded"));
        assert!(c.iter().any(|a| a.starts_with("192.168.1.240=")), "{c:?}");
        assert!(c.contains(&"--auto".to_string()), "{c:?}");
        assert!(!c.contains(&"--learn".to_string()), "learn '0': {c:?}");
        assert!(!c.contains(&"--metrics".to_string()), "metrics '': {c:?}");
        assert_eq!(
            i.netdev,
            ["lan1", "lan2", "eth0"],
            "procd watches the interfaces"
        );
        let param = |k: &str| {
            i.params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert!(param("respawn").is_some(), "{i:?}");
        assert_eq!(param("stdout"), Some(vec!["1".to_string()]));
        assert_eq!(param("stderr"), Some(vec!["1".to_string()]));

        let m = start_service(
            &shell,
            &[
                ("enabled", "1"),
                ("learn", "1"),
                ("dry_run", "1"),
                ("metrics", "127.0.0.1:9737"),
                ("mode", "observe"),
            ],
        );
        let c = &m.command;
        assert!(has_pair(c, "--metrics", "127.0.0.1:9737"), "{c:?}");
        assert!(!c.contains(&"--metrics-allow-remote".to_string()), "{c:?}");
        assert!(c.contains(&"--learn".to_string()) && c.contains(&"--dry-run".to_string()));
        assert!(has_pair(c, "--mode", "observe"), "{c:?}");
        let r = start_service(
            &shell,
            &[
                ("enabled", "1"),
                ("metrics", "[::]:9737"),
                ("metrics_allow_remote", "1"),
            ],
        );
        assert!(r.command.contains(&"--metrics-allow-remote".to_string()));

        let Some(bin) = binary_or_skip() else {
            continue;
        };
        for instance in [&i, &m, &r] {
            run_args_parse(&bin, &instance.command[2..]).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// systemd

fn unit_value(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

#[test]
fn the_systemd_unit_runs_flowguard_with_its_arguments_and_stops_it_with_sigterm() {
    let unit = read(UNIT);
    assert_eq!(
        unit_value(&unit, "ExecStart").as_deref(),
        Some("/usr/local/bin/flowguard run $FLOWGUARD_ARGS")
    );
    assert_eq!(
        unit_value(&unit, "EnvironmentFile").as_deref(),
        Some("/etc/default/flowguard")
    );
    assert_eq!(unit_value(&unit, "KillSignal").as_deref(), Some("SIGTERM"));
    assert_eq!(unit_value(&unit, "Restart").as_deref(), Some("on-failure"));
    let caps = unit_value(&unit, "CapabilityBoundingSet").expect("a capability bounding set");
    for cap in ["CAP_BPF", "CAP_NET_ADMIN"] {
        assert!(caps.split(' ').any(|c| c == cap), "{caps}");
    }
    assert_eq!(unit_value(&unit, "AmbientCapabilities"), Some(caps));
}

#[test]
fn the_systemd_unit_parses() {
    if !have("systemd-analyze", "--version") {
        println!("skipped: systemd-analyze is not installed");
        return;
    }
    // verify also checks that ExecStart's program exists: point it at one
    // that does; everything else is the file as shipped.
    let dir = TempDir::new("unit");
    let exe = std::env::current_exe().expect("this test's path");
    let unit = read(UNIT).replace("/usr/local/bin/flowguard", &exe.to_string_lossy());
    let path = dir.0.join("flowguard.service");
    fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = output_text(&out);
    // Unknown keys and bad values are only warnings: any output is a failure.
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify ({}):\n{text}",
        out.status
    );
}

/// Every FLOWGUARD_ARGS in the environment file, commented examples included.
fn env_samples() -> Vec<Vec<String>> {
    read(ENV)
        .lines()
        .filter_map(|l| l.trim_start_matches('#').strip_prefix("FLOWGUARD_ARGS="))
        .map(|v| {
            v.trim_matches('"')
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .collect()
}

#[test]
fn the_environment_file_samples_parse() {
    let samples = env_samples();
    assert!(samples.len() >= 2, "{samples:?}");
    let active = read(ENV)
        .lines()
        .filter(|l| l.starts_with("FLOWGUARD_ARGS="))
        .count();
    assert_eq!(active, 1, "one active FLOWGUARD_ARGS");
    let Some(bin) = binary_or_skip() else { return };
    for args in samples {
        run_args_parse(&bin, &args).unwrap();
    }
}

/// flowguard with exactly the unit's capabilities (as root, bounding set
/// reduced, no new privileges): attaches, serves, and detaches on SIGTERM.
#[test]
fn the_units_capabilities_are_enough() {
    skip_unless_root!();
    if !have("setpriv", "--version") {
        println!("skipped: setpriv is not installed");
        return;
    }
    let Some(bin) = binary_or_skip() else { return };
    let unit = read(UNIT);
    let caps = unit_value(&unit, "CapabilityBoundingSet").unwrap();
    let bounding: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    let dir = TempDir::new("caps");
    let wrapper = dir.0.join("flowguard-with-unit-caps");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set=-all,{} --no-new-privs {} \"$@\"\n",
            bounding.join(","),
            shell_quote(&bin.to_string_lossy())
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&wrapper)
        .status()
        .unwrap();

    let ns = Netns::new("unitcaps");
    ns.ip(&[
        "link", "add", "lan1", "type", "veth", "peer", "name", "peer1",
    ]);
    ns.ip(&["link", "set", "lan1", "up"]);
    let bpffs = BpffsMount::new();
    let pin_dir = bpffs.pin_dir();
    let mut flowguard = Flowguard::spawn(
        &wrapper,
        &ns,
        &pin_dir,
        &[
            "--egress",
            "lan1",
            "--ingress",
            "lan1",
            "--prefix",
            "192.168.1.0/24",
            "--static",
            "192.168.1.9=02:00:00:00:00:09",
            "--metrics",
            "127.0.0.1:9737",
        ],
        false,
    );
    if let Err(e) = flowguard.try_wait_ready() {
        panic!("with the unit's capabilities ({caps}): {e}");
    }
    let status = flowguard.status();
    assert!(
        status.has_endpoint("192.168.1.9", "02:00:00:00:00:09"),
        "{status:?}"
    );
    let exit = flowguard.stop_with(libc::SIGTERM);
    assert!(exit.success(), "exit on SIGTERM: {exit}");
    assert!(!pin_dir.exists(), "unpinned on SIGTERM");
}

/// OpenWrt architecture of each `cargo xtask dist` build, and its ELF machine
/// (e_machine) and byte order: what opkg checks, and what the binary must be.
const PACKAGES: &[(&str, &str, u16, bool)] = &[
    ("aarch64", "aarch64_cortex-a53", 183, false),
    ("armv7", "arm_cortex-a7_neon-vfpv4", 40, false),
    ("mipsel", "mipsel_24kc", 8, false),
    ("mips", "mips_24kc", 8, true),
    ("x86_64", "x86_64", 62, false),
];

fn target_dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/dist")
        .components()
        .collect()
}

/// `tar -xzf archive -C dir`, panicking with tar's words on failure.
fn untar(archive: &Path, dir: &Path) {
    fs::create_dir_all(dir).expect("create extraction dir");
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(dir)
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "{} is not a gzip'd tar: {}",
        archive.display(),
        output_text(&out)
    );
}

/// `tar -tzvf`: (mode string, owner/group, path) of each member.
fn listing(archive: &Path) -> Vec<(String, String, String)> {
    let out = Command::new("tar")
        .args(["--numeric-owner", "-tvzf"])
        .arg(archive)
        .output()
        .expect("run tar");
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (
                fields[0].to_owned(),
                fields[1].to_owned(),
                fields.last().unwrap().to_owned().to_owned(),
            )
        })
        .collect()
}

/// Each `.ipk` that `cargo xtask dist` built: an outer gzip'd tar holding
/// exactly debian-binary, data.tar.gz and control.tar.gz (as opkg reads it),
/// the binary and service files at their OpenWrt paths, root-owned with the
/// right modes, a control file with the fields opkg and the feed tools use,
/// conffiles naming the UCI config, and maintainer scripts that `sh -n`
/// accepts. Architectures not built are skipped with the reason.
#[test]
fn openwrt_packages_have_the_layout_and_control_fields_opkg_needs() {
    let mut checked = 0;
    for &(arch, openwrt_arch, machine, big_endian) in PACKAGES {
        let dir = target_dist().join(arch);
        let ipk = fs::read_dir(&dir).ok().and_then(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "ipk"))
        });
        let Some(ipk) = ipk else {
            println!(
                "skipped {arch}: no .ipk in {} (run `cargo xtask dist --arch {arch}`)",
                dir.display()
            );
            continue;
        };
        let name = ipk.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("flowguard_") && name.ends_with(&format!("_{openwrt_arch}.ipk")),
            "{name}: expected flowguard_<version>_{openwrt_arch}.ipk"
        );

        let outer: Vec<String> = listing(&ipk).into_iter().map(|(_, _, p)| p).collect();
        assert_eq!(
            outer,
            ["./debian-binary", "./data.tar.gz", "./control.tar.gz"],
            "{name}: outer members"
        );
        let tmp = TempDir::new(&format!("ipk-{arch}"));
        untar(&ipk, &tmp.0);
        assert_eq!(read_path(&tmp.0.join("debian-binary")), "2.0\n");

        let data = tmp.0.join("data.tar.gz");
        let files: Vec<(String, String, String)> = listing(&data)
            .into_iter()
            .filter(|(mode, _, _)| !mode.starts_with('d'))
            .collect();
        let expect = [
            ("-rw-r--r--", "./etc/config/flowguard"),
            ("-rwxr-xr-x", "./etc/init.d/flowguard"),
            ("-rwxr-xr-x", "./usr/sbin/flowguard"),
        ];
        assert_eq!(files.len(), expect.len(), "{name}: data files {files:?}");
        for ((mode, owner, path), (want_mode, want_path)) in files.iter().zip(expect) {
            assert_eq!(
                (mode.as_str(), path.as_str()),
                (want_mode, want_path),
                "{name}"
            );
            assert_eq!(owner, "0/0", "{name}: {path} must be owned by root");
        }
        let root = tmp.0.join("data");
        untar(&data, &root);
        assert_eq!(
            read_path(&root.join("etc/init.d/flowguard")),
            read(INIT),
            "{name}: the init script is dist/openwrt's"
        );
        assert_eq!(read_path(&root.join("etc/config/flowguard")), read(UCI));
        let elf = fs::read(root.join("usr/sbin/flowguard")).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF", "{name}: the binary is not ELF");
        assert_eq!(elf[5] == 2, big_endian, "{name}: byte order");
        let e_machine = if big_endian {
            u16::from_be_bytes([elf[18], elf[19]])
        } else {
            u16::from_le_bytes([elf[18], elf[19]])
        };
        assert_eq!(e_machine, machine, "{name}: ELF machine");
        let installed: u64 = [
            "usr/sbin/flowguard",
            "etc/init.d/flowguard",
            "etc/config/flowguard",
        ]
        .iter()
        .map(|p| fs::metadata(root.join(p)).unwrap().len())
        .sum();

        let control_dir = tmp.0.join("control");
        untar(&tmp.0.join("control.tar.gz"), &control_dir);
        let control = read_path(&control_dir.join("control"));
        let field = |key: &str| -> String {
            control
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key}: ")))
                .unwrap_or_else(|| panic!("{name}: no {key} field in\n{control}"))
                .to_owned()
        };
        assert_eq!(field("Package"), "flowguard");
        assert_eq!(field("Architecture"), openwrt_arch);
        assert!(
            field("Version").starts_with(&format!("{}-r", env!("CARGO_PKG_VERSION"))),
            "{name}: Version {}",
            field("Version")
        );
        assert_eq!(field("Installed-Size"), installed.to_string());
        // The 25.12 package of the same build sits beside it, with the same
        // version (xtask's apk tests read its contents back).
        let apk = dir.join(format!("flowguard-{}.apk", field("Version")));
        assert!(
            apk.is_file(),
            "{name}: no {} beside the .ipk",
            apk.display()
        );
        assert_eq!(field("License"), "MIT OR Apache-2.0");
        assert!(!field("Maintainer").is_empty() && !field("Description").is_empty());
        assert!(
            control.lines().all(|l| !l.starts_with("Depends:")),
            "{name}: a 24.10 (kernel 6.6, TCX) package needs no dependency: {control}"
        );
        assert_eq!(
            read_path(&control_dir.join("conffiles")),
            "/etc/config/flowguard\n"
        );
        for script in ["postinst", "prerm"] {
            let path = control_dir.join(script);
            let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{name}: {script}: {}",
                output_text(&out)
            );
        }
        checked += 1;
    }
    println!("checked {checked} package(s)");
}

fn read_path(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}
