//! A reader of the .apk format, written from the format's description
//! (apk-tools 3.0.6: src/adb.h, src/apk_adb.h) and sharing no code
//! with the writer: it inflates the package, walks its blocks, decodes the
//! ADB and checks the fields and file contents the writer was given. Where
//! apk-tools 3 is on PATH, `apk` itself dumps, installs and removes it too.

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use flate2::read::DeflateDecoder;
use sha2::{Digest as _, Sha256};

use super::{write, File};
use crate::{dist, step};

const EPOCH: u64 = 1_764_000_000;

/// A decoded ADB value.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Int(u64),
    Blob(Vec<u8>),
    /// The slots after slot 0 (field 1 first), not yet decoded.
    Object(Vec<u32>),
    Array(Vec<u32>),
}

/// A package as the reader sees it.
struct Package {
    adb: Vec<u8>,
    /// (path index, file index, contents) of each DATA block.
    data: Vec<(u32, u32, Vec<u8>)>,
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let word = bytes
        .get(at..at + 4)
        .unwrap_or_else(|| panic!("a u32 at {at} is past the end ({} bytes)", bytes.len()));
    u32::from_le_bytes(word.try_into().unwrap())
}

/// `ADBd` + raw deflate of `ADB.` `pckg`, then one ADB block, no SIG
/// block, and DATA blocks, each padded with zeros to a multiple of 8.
fn parse(file: &[u8]) -> Package {
    assert_eq!(&file[..4], b"ADBd", "the wrapper is raw deflate");
    let mut container = Vec::new();
    DeflateDecoder::new(&file[4..])
        .read_to_end(&mut container)
        .expect("the body is a raw deflate stream");
    assert_eq!(&container[..4], b"ADB.", "the container magic");
    assert_eq!(le32(&container, 4), 0x676b_6370, "the schema is pckg");
    let mut at = 8;
    let mut adb = None;
    let mut data = Vec::new();
    while at < container.len() {
        assert_eq!(at % 8, 0, "blocks start on a multiple of 8");
        let header = le32(&container, at);
        let (kind, size) = (header >> 30, (header & 0x3fff_ffff) as usize);
        assert!(size >= 4, "block size {size} at {at}");
        let payload = &container[at + 4..at + size];
        let padded = size.next_multiple_of(8);
        assert!(
            container[at + size..at + padded].iter().all(|&b| b == 0),
            "the padding after the block at {at} is zeros"
        );
        match kind {
            0 => {
                assert!(adb.is_none() && data.is_empty(), "one ADB block, first");
                adb = Some(payload.to_vec());
            }
            2 => {
                assert!(adb.is_some(), "DATA blocks come after the ADB block");
                data.push((le32(payload, 0), le32(payload, 4), payload[8..].to_vec()));
            }
            other => panic!("unexpected block type {other} at {at} (no SIG, no extended)"),
        }
        at += padded;
    }
    assert_eq!(at, container.len(), "the last block ends the container");
    let adb = adb.expect("an ADB block");
    assert_eq!(
        &adb[..4],
        &[0, 0, 0, 0],
        "compat version, version, reserved"
    );
    Package { adb, data }
}

impl Package {
    /// Decodes `value`, checking bounds, alignment and slot counts.
    fn value(&self, value: u32) -> Value {
        let adb = &self.adb;
        let offset = (value & 0x0fff_ffff) as usize;
        let aligned = |align: usize| {
            assert_eq!(
                offset % align,
                0,
                "value {value:#010x} is not {align}-aligned"
            );
        };
        match value >> 28 {
            0x0 => {
                assert_eq!(value, 0, "only NULL among the specials here");
                Value::Null
            }
            0x1 => Value::Int(u64::from(offset as u32)),
            0x2 => {
                aligned(4);
                Value::Int(u64::from(le32(adb, offset)))
            }
            0x3 => {
                aligned(4);
                Value::Int(u64::from(le32(adb, offset)) | u64::from(le32(adb, offset + 4)) << 32)
            }
            kind @ 0x8..=0xa => {
                let (len, start) = match kind {
                    0x8 => (usize::from(adb[offset]), offset + 1),
                    0x9 => {
                        aligned(2);
                        (
                            usize::from(u16::from_le_bytes([adb[offset], adb[offset + 1]])),
                            offset + 2,
                        )
                    }
                    _ => {
                        aligned(4);
                        (le32(adb, offset) as usize, offset + 4)
                    }
                };
                let smallest = if len < 0x100 {
                    0x8
                } else if len < 0x1_0000 {
                    0x9
                } else {
                    0xa
                };
                assert_eq!(
                    kind, smallest,
                    "a blob of {len} bytes takes the smallest length"
                );
                assert!(len > 0, "an empty blob is written as NULL");
                Value::Blob(adb[start..start + len].to_vec())
            }
            kind @ (0xd | 0xe) => {
                aligned(4);
                let count = le32(adb, offset) as usize;
                assert!(count >= 2, "an object or array with no slots is NULL");
                let slots = (1..count).map(|i| le32(adb, offset + 4 * i)).collect();
                if kind == 0xd {
                    Value::Array(slots)
                } else {
                    Value::Object(slots)
                }
            }
            other => panic!("value type {other:#x} ({value:#010x})"),
        }
    }

    fn root(&self) -> Vec<u32> {
        self.object(le32(&self.adb, 4))
    }

    fn object(&self, value: u32) -> Vec<u32> {
        match self.value(value) {
            Value::Object(slots) => {
                assert_ne!(slots.last(), Some(&0), "trailing NULL slots are left off");
                slots
            }
            other => panic!("expected an object, got {other:?}"),
        }
    }

    fn array(&self, value: u32) -> Vec<u32> {
        match self.value(value) {
            Value::Array(slots) => slots,
            Value::Null => Vec::new(),
            other => panic!("expected an array, got {other:?}"),
        }
    }

    /// Field `n` (1-based) of an object's slots, decoded.
    fn field(&self, object: &[u32], n: usize) -> Value {
        object.get(n - 1).map_or(Value::Null, |&v| self.value(v))
    }

    fn text(&self, object: &[u32], n: usize) -> String {
        match self.field(object, n) {
            Value::Blob(bytes) => String::from_utf8(bytes).expect("UTF-8"),
            Value::Null => String::new(),
            other => panic!("field {n}: expected a blob, got {other:?}"),
        }
    }

    fn int(&self, object: &[u32], n: usize) -> u64 {
        match self.field(object, n) {
            Value::Int(i) => i,
            other => panic!("field {n}: expected an int, got {other:?}"),
        }
    }

    fn bytes(&self, object: &[u32], n: usize) -> Vec<u8> {
        match self.field(object, n) {
            Value::Blob(bytes) => bytes,
            other => panic!("field {n}: expected a blob, got {other:?}"),
        }
    }
}

/// A regular file of the package as the reader decoded it.
#[derive(Debug)]
struct Entry {
    mode: u64,
    mtime: u64,
    contents: Vec<u8>,
}

/// What the package says, decoded and cross-checked.
struct Decoded {
    info: BTreeMap<&'static str, String>,
    installed_size: u64,
    depends: Value,
    unique_id: Vec<u8>,
    dirs: Vec<String>,
    files: BTreeMap<String, Entry>,
    scripts: BTreeMap<&'static str, String>,
}

/// Walks the tree: sorted directories, each root:root 0755, sorted files
/// with a SHA-256 each, and the DATA blocks carrying exactly the non-empty
/// files in tree order, each matching its size and hash.
fn decode(package: &Package) -> Decoded {
    let root = package.root();
    let info = package.object(root[0]);
    let mut fields = BTreeMap::new();
    for (n, name) in [
        (1, "name"),
        (2, "version"),
        (4, "description"),
        (5, "arch"),
        (6, "license"),
        (7, "origin"),
        (8, "maintainer"),
        (9, "url"),
    ] {
        fields.insert(name, package.text(&info, n));
    }
    let installed_size = package.int(&info, 12);
    let depends = package.field(&info, 15);
    let unique_id = package.bytes(&info, 3);

    let mut dirs = Vec::new();
    let mut files = BTreeMap::new();
    let mut blocks = package.data.iter();
    for (dir_index, &dir) in package.array(root[1]).iter().enumerate() {
        let dir = package.object(dir);
        let name = package.text(&dir, 1);
        let acl = package.object(dir[1]);
        assert_eq!(
            (
                package.int(&acl, 1),
                package.text(&acl, 2),
                package.text(&acl, 3)
            ),
            (0o755, "root".into(), "root".into()),
            "directory {name:?}"
        );
        assert!(!name.starts_with('/') && !name.ends_with('/'), "{name:?}");
        let mut names = Vec::new();
        for (file_index, &file) in package.array(*dir.get(2).unwrap_or(&0)).iter().enumerate() {
            let file = package.object(file);
            let base = package.text(&file, 1);
            let acl = package.object(file[1]);
            assert_eq!(
                (package.text(&acl, 2), package.text(&acl, 3)),
                ("root".into(), "root".into())
            );
            let size = package.int(&file, 3) as usize;
            let hash = package.bytes(&file, 5);
            assert_eq!(
                package.field(&file, 6),
                Value::Null,
                "{base}: no target, a regular file"
            );
            let contents = if size == 0 {
                Vec::new()
            } else {
                let (p, f, contents) = blocks
                    .next()
                    .unwrap_or_else(|| panic!("no DATA block for {base}"));
                assert_eq!(
                    (*p as usize, *f as usize),
                    (dir_index + 1, file_index + 1),
                    "the DATA block for {name}/{base} names it"
                );
                assert_eq!(
                    contents.len(),
                    size,
                    "{base}: the DATA block has the file's size"
                );
                contents.clone()
            };
            assert_eq!(
                hash,
                Sha256::digest(&contents).to_vec(),
                "{base}: SHA-256 of the contents"
            );
            let path = if name.is_empty() {
                base.clone()
            } else {
                format!("{name}/{base}")
            };
            files.insert(
                path,
                Entry {
                    mode: package.int(&acl, 1),
                    mtime: package.int(&file, 4),
                    contents,
                },
            );
            names.push(base);
        }
        assert!(
            names.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes()),
            "files sorted: {names:?}"
        );
        dirs.push(name);
    }
    assert!(blocks.next().is_none(), "a DATA block past the last file");
    assert!(
        dirs.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes()),
        "directories sorted: {dirs:?}"
    );

    let scripts_object = package.object(root[2]);
    let mut scripts = BTreeMap::new();
    for (n, name) in [
        (1, "trigger"),
        (2, "pre-install"),
        (3, "post-install"),
        (4, "pre-deinstall"),
        (5, "post-deinstall"),
        (6, "pre-upgrade"),
        (7, "post-upgrade"),
    ] {
        let text = package.text(&scripts_object, n);
        if !text.is_empty() {
            scripts.insert(name, text);
        }
    }
    Decoded {
        info: fields,
        installed_size,
        depends,
        unique_id,
        dirs,
        files,
        scripts,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn dist_file(name: &str) -> Vec<u8> {
    let path = step::workspace_root().join("dist/openwrt").join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Everything the package must say about itself, given the binary it
/// carries and its arch; panics with the first difference.
fn check(apk: &[u8], arch: &str, binary: &[u8]) -> Decoded {
    let package = parse(apk);
    let decoded = decode(&package);
    let info = &decoded.info;
    assert_eq!(info["name"], "flowguard");
    assert_eq!(
        info["version"],
        crate::ipk::version(),
        "the .ipk's version and release"
    );
    assert!(
        info["version"].starts_with(env!("CARGO_PKG_VERSION")) && info["version"].contains("-r"),
        "{}",
        info["version"]
    );
    assert_eq!(info["arch"], arch);
    assert_eq!(info["license"], "MIT OR Apache-2.0");
    assert_eq!(info["origin"], "feeds/packages/net/flowguard");
    assert!(info["url"].starts_with("https://") && info["maintainer"].contains('@'));
    let description = &info["description"];
    assert!(
        description.starts_with("Fixes offloaded flows")
            && description.contains("flowguard doctor"),
        "{description}"
    );
    assert!(
        !description.contains('\n') && description.len() < 512,
        "one line under 512 bytes"
    );
    assert_eq!(
        decoded.depends,
        Value::Null,
        "a static binary on 25.12 (6.12, TCX) depends on nothing"
    );

    // The unique id: SHA-256 of the ADB with the id zeroed, first 20 bytes.
    assert_eq!(decoded.unique_id.len(), 20);
    let mut zeroed = package.adb.clone();
    let at = zeroed
        .windows(20)
        .position(|w| w == decoded.unique_id.as_slice())
        .expect("the id is in the ADB");
    zeroed[at..at + 20].fill(0);
    assert_eq!(
        decoded.unique_id,
        Sha256::digest(&zeroed)[..20].to_vec(),
        "unique id"
    );

    assert_eq!(
        decoded.dirs,
        [
            "",
            "etc",
            "etc/config",
            "etc/init.d",
            "lib",
            "lib/apk",
            "lib/apk/packages",
            "usr",
            "usr/sbin"
        ],
        "every directory, the root first"
    );
    let config = dist_file("flowguard.config");
    let list = "/etc/config/flowguard\n/etc/init.d/flowguard\n/usr/sbin/flowguard\n";
    let expected: [(&str, u64, Vec<u8>); 6] = [
        ("etc/config/flowguard", 0o644, config.clone()),
        ("etc/init.d/flowguard", 0o755, dist_file("flowguard.init")),
        (
            "lib/apk/packages/flowguard.conffiles",
            0o644,
            b"/etc/config/flowguard\n".to_vec(),
        ),
        (
            "lib/apk/packages/flowguard.conffiles_static",
            0o644,
            format!("/etc/config/flowguard {}\n", sha256_hex(&config)).into_bytes(),
        ),
        (
            "lib/apk/packages/flowguard.list",
            0o644,
            list.as_bytes().to_vec(),
        ),
        ("usr/sbin/flowguard", 0o755, binary.to_vec()),
    ];
    let paths: Vec<&String> = decoded.files.keys().collect();
    assert_eq!(
        paths,
        expected.iter().map(|(p, _, _)| p).collect::<Vec<_>>()
    );
    let mtime = decoded.files["usr/sbin/flowguard"].mtime;
    for (path, mode, contents) in &expected {
        let entry = &decoded.files[*path];
        assert_eq!(entry.mode, *mode, "{path}: mode");
        assert_eq!(
            entry.mtime, mtime,
            "{path}: every mtime is SOURCE_DATE_EPOCH"
        );
        assert!(entry.contents == *contents, "{path}: contents differ");
    }
    let sizes: u64 = expected.iter().map(|(_, _, c)| c.len() as u64).sum();
    assert_eq!(
        decoded.installed_size, sizes,
        "installed-size is the files' sum"
    );

    assert_eq!(
        decoded.scripts.keys().copied().collect::<Vec<_>>(),
        ["post-install", "post-upgrade", "pre-deinstall"],
        "OpenWrt's three scripts"
    );
    let install = &decoded.scripts["post-install"];
    for line in [
        "export pkgname=\"flowguard\"",
        "add_group_and_user",
        "default_postinst",
    ] {
        assert!(
            install.lines().any(|l| l == line),
            "post-install lacks {line}:\n{install}"
        );
    }
    let upgrade = &decoded.scripts["post-upgrade"];
    assert!(
        upgrade.lines().nth(1) == Some("export PKG_UPGRADE=1")
            && upgrade.ends_with("default_postinst\n")
    );
    assert!(decoded.scripts["pre-deinstall"]
        .lines()
        .any(|l| l == "default_prerm"));
    for (name, script) in &decoded.scripts {
        assert!(script.starts_with("#!/bin/sh\n"), "{name}");
        let out = Command::new("sh")
            .args(["-n", "-c", script])
            .output()
            .expect("sh");
        assert!(out.status.success(), "{name}: sh -n: {}", text(&out));
    }
    decoded
}

/// A stand-in for the binary: what the package carries does not depend on
/// it being a real one (the real ones are checked below when built).
fn stand_in_binary() -> Vec<u8> {
    (0..70_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

fn stand_in_package(arch: &str) -> Vec<u8> {
    let file = |path: &str, mode, contents| File {
        path: path.into(),
        mode,
        contents,
    };
    let files = vec![
        file("etc/config/flowguard", 0o644, dist_file("flowguard.config")),
        file("etc/init.d/flowguard", 0o755, dist_file("flowguard.init")),
        file("usr/sbin/flowguard", 0o755, stand_in_binary()),
    ];
    write(arch, &crate::ipk::version(), files, EPOCH).expect("write the package")
}

#[test]
fn the_package_carries_the_fields_files_and_scripts_of_an_openwrt_package() {
    let apk = stand_in_package("mipsel_24kc");
    let decoded = check(&apk, "mipsel_24kc", &stand_in_binary());
    assert_eq!(decoded.files["usr/sbin/flowguard"].mtime, EPOCH);
    assert_eq!(
        apk,
        stand_in_package("mipsel_24kc"),
        "the same input gives the same bytes"
    );
}

/// The reader is not a rubber stamp: one flipped byte of file content, or
/// a wrong arch, is caught.
#[test]
fn the_reader_catches_a_corrupted_file_and_a_wrong_arch() {
    let apk = stand_in_package("x86_64");
    let mut container = Vec::new();
    DeflateDecoder::new(&apk[4..])
        .read_to_end(&mut container)
        .unwrap();
    let last = container.len() - 1 - container.iter().rev().position(|&b| b != 0).unwrap();
    container[last] ^= 1;
    let mut corrupted = b"ADBd".to_vec();
    let mut deflate =
        flate2::write::DeflateEncoder::new(&mut corrupted, flate2::Compression::fast());
    std::io::Write::write_all(&mut deflate, &container).unwrap();
    deflate.finish().unwrap();

    let binary = stand_in_binary();
    for (what, apk, arch) in [
        ("a flipped byte", &corrupted, "x86_64"),
        ("a wrong arch", &apk, "aarch64_cortex-a53"),
    ] {
        let caught = std::panic::catch_unwind(|| check(apk, arch, &binary));
        assert!(caught.is_err(), "the reader missed {what}");
    }
}

#[test]
fn apk_versions_follow_apks_grammar() {
    assert_eq!(super::apk_version("0.1.0").unwrap(), "0.1.0-r1");
    assert_eq!(super::apk_version("0.2.0-rc.1").unwrap(), "0.2.0_rc1-r1");
    assert_eq!(
        super::apk_version("1.0.0-beta.12").unwrap(),
        "1.0.0_beta12-r1"
    );
    assert!(super::apk_version("0.2.0-dev").is_err());
}

/// The packages `cargo xtask dist` wrote under target/dist, with the real
/// binaries; architectures not built are skipped with the reason.
#[test]
fn the_dist_packages_carry_their_binary_and_arch() {
    for arch in dist::ARCHES {
        let dir = step::workspace_root().join("target/dist").join(arch.name);
        let path = dir.join(format!("flowguard-{}.apk", crate::ipk::version()));
        let (Ok(apk), Ok(binary)) = (fs::read(&path), fs::read(dir.join("flowguard"))) else {
            println!(
                "skipped {}: no {} (run `cargo xtask dist --arch {}`)",
                arch.name,
                path.display(),
                arch.name
            );
            continue;
        };
        assert_eq!(&binary[..4], b"\x7fELF", "{}", path.display());
        check(&apk, arch.openwrt_arch, &binary);
        println!("checked {}", path.display());
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("flowguard-apk-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A stand-in for OpenWrt's /lib/functions.sh that logs what its
/// default_postinst and default_prerm would run for the init scripts in
/// the package's .list (their logic, not their code).
const FUNCTIONS_SH: &str = r#"
log() { echo "$*" >> /tmp/openwrt.log; }
add_group_and_user() { log "add_group_and_user $pkgname"; }
default_postinst() {
	while read -r file; do
		case "$file" in /etc/init.d/*)
			[ "$PKG_UPGRADE" = 1 ] || log "$file enable"
			log "$file start" ;;
		esac
	done < "$root/lib/apk/packages/$pkgname.list"
}
default_prerm() {
	while read -r file; do
		case "$file" in /etc/init.d/*)
			log "$file stop"
			[ "$PKG_UPGRADE" = 1 ] || log "$file disable" ;;
		esac
	done < "$root/lib/apk/packages/$pkgname.list"
}
"#;

/// The scripts run chrooted into the scratch root: give it this machine's
/// /bin/sh and the libraries `ldd` names for it.
fn install_shell(root: &Path) -> Result<(), String> {
    let sh = fs::canonicalize("/bin/sh").map_err(|e| format!("/bin/sh: {e}"))?;
    let ldd = Command::new("ldd")
        .arg(&sh)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    let mut copies = vec![(sh, root.join("bin/sh"))];
    for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
        if word.starts_with('/') {
            copies.push((PathBuf::from(word), root.join(word.trim_start_matches('/'))));
        }
    }
    for (from, to) in copies {
        fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
        fs::copy(&from, &to).map_err(|e| format!("{}: {e}", from.display()))?;
    }
    Ok(())
}

/// apk-tools 3 itself: adbdump, install into a scratch root, info, del.
/// Skipped, with the reason, without an `apk` 3 on PATH or without root
/// (the scripts run chrooted).
#[test]
fn apk_tools_installs_and_removes_the_package() {
    let version = Command::new("apk").arg("--version").output();
    let Some(version) = version
        .ok()
        .map(|out| text(&out))
        .filter(|v| v.starts_with("apk-tools 3."))
    else {
        println!("skipped: no apk-tools 3 `apk` on PATH (it is built from alpinelinux/apk-tools; see dist/README.md)");
        return;
    };
    if !crate::setup::is_root() {
        println!("skipped: apk-tools runs the scripts chrooted, which needs root");
        return;
    }
    println!("using {}", version.trim());
    let apk = |args: &[&str]| {
        let out = Command::new("apk").args(args).output().expect("run apk");
        let shown = text(&out);
        assert!(out.status.success(), "apk {}: {shown}", args.join(" "));
        println!("$ apk {}\n{shown}", args.join(" "));
        shown
    };
    let arch = apk(&["--print-arch"]).trim().to_owned();
    let scratch = Scratch::new("tools");
    let package = scratch
        .0
        .join(format!("flowguard-{}.apk", crate::ipk::version()));
    fs::write(&package, stand_in_package(&arch)).unwrap();
    let package = package.to_str().unwrap();

    let dump = apk(&["adbdump", package]);
    for wanted in [
        "name: flowguard".to_owned(),
        format!("version: {}", crate::ipk::version()),
        format!("arch: {arch}"),
        "license: MIT OR Apache-2.0".to_owned(),
        "post-install: |".to_owned(),
    ] {
        assert!(
            dump.lines().any(|l| l.trim() == wanted),
            "adbdump shows no {wanted:?}"
        );
    }

    // Unsigned: only the file hashes are checked, and they must hold.
    apk(&["verify", "--allow-untrusted", package]);

    let root = scratch.0.join("root");
    fs::create_dir_all(root.join("lib")).unwrap();
    fs::create_dir_all(root.join("tmp")).unwrap();
    fs::write(root.join("lib/functions.sh"), FUNCTIONS_SH).unwrap();
    if let Err(why) = install_shell(&root) {
        panic!("cannot give the scratch root a shell for the scripts: {why}");
    }
    let r = root.to_str().unwrap();
    apk(&[
        "--root",
        r,
        "--initdb",
        "--no-network",
        "add",
        "--allow-untrusted",
        package,
    ]);
    let installed = fs::read(root.join("usr/sbin/flowguard")).expect("installed");
    assert!(
        installed == stand_in_binary(),
        "the installed binary is the packaged one"
    );
    use std::os::unix::fs::PermissionsExt as _;
    for (path, mode) in [
        ("usr/sbin/flowguard", 0o755),
        ("etc/init.d/flowguard", 0o755),
        ("etc/config/flowguard", 0o644),
    ] {
        let meta = fs::metadata(root.join(path)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}");
    }
    let log = fs::read_to_string(root.join("tmp/openwrt.log")).unwrap_or_default();
    assert_eq!(
        log,
        "add_group_and_user flowguard\n/etc/init.d/flowguard enable\n/etc/init.d/flowguard start\n",
        "post-install enables and starts the service"
    );
    let info = apk(&["--root", r, "--no-network", "info", "-a", "flowguard"]);
    assert!(
        info.contains("Fixes offloaded flows") && info.contains("usr/sbin/flowguard"),
        "{info}"
    );
    apk(&["--root", r, "--no-network", "del", "flowguard"]);
    assert!(
        !root.join("usr/sbin/flowguard").exists(),
        "del removes the binary"
    );
    let log = fs::read_to_string(root.join("tmp/openwrt.log")).unwrap();
    assert!(
        log.ends_with("/etc/init.d/flowguard stop\n/etc/init.d/flowguard disable\n"),
        "pre-deinstall stops and disables the service:\n{log}"
    );
}
