//! OpenWrt 24.10 `.ipk` packages, written without the OpenWrt SDK. An ipk is
//! a gzip'd tar holding `debian-binary`, `control.tar.gz` and `data.tar.gz`
//! (what OpenWrt's ipkg-build makes); GNU tar and gzip from Debian pack them,
//! with fixed owners, times and order so that a rebuild gives the same bytes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::step;

const PACKAGE: &str = "flowguard";
/// OpenWrt's package release, appended to the crate version.
const RELEASE: &str = "r1";
const MAINTAINER: &str = "flowguard developers <dev@flowguard.invalid>";
const URL: &str = "https://github.com/flowguard/flowguard";

/// The standard OpenWrt maintainer scripts (as ipkg-build writes them for a
/// package with an init script): enable the service on install, stop and
/// disable it on removal. Nothing runs when installing into an image
/// (`IPKG_INSTROOT` set) beyond enabling.
const POSTINST: &str = "#!/bin/sh\n\
[ \"${IPKG_NO_SCRIPT}\" = \"1\" ] && exit 0\n\
[ -s \"${IPKG_INSTROOT}/lib/functions.sh\" ] || exit 0\n\
. \"${IPKG_INSTROOT}/lib/functions.sh\"\n\
default_postinst \"$0\" \"$@\"\n";
const PRERM: &str = "#!/bin/sh\n\
[ -s \"${IPKG_INSTROOT}/lib/functions.sh\" ] || exit 0\n\
. \"${IPKG_INSTROOT}/lib/functions.sh\"\n\
default_prerm \"$0\" \"$@\"\n";

/// Version as OpenWrt writes it: `<crate version>-r<release>`.
pub fn version() -> String {
    format!("{}-{RELEASE}", env!("CARGO_PKG_VERSION"))
}

/// Builds `<out_dir>/flowguard_<version>_<openwrt arch>.ipk` holding `binary`
/// as /usr/sbin/flowguard and the procd init script and UCI config from
/// dist/openwrt, for OpenWrt's package architecture `openwrt_arch`
/// (`aarch64_cortex-a53`, ...). Returns the package's path.
pub fn build(openwrt_arch: &str, binary: &Path, out_dir: &Path) -> Result<PathBuf> {
    let root = step::workspace_root();
    let stage = out_dir.join("ipk");
    let _ = fs::remove_dir_all(&stage);
    let data = stage.join("data");
    let control = stage.join("control");
    install(binary, &data.join("usr/sbin/flowguard"), 0o755)?;
    install(
        &root.join("dist/openwrt/flowguard.init"),
        &data.join("etc/init.d/flowguard"),
        0o755,
    )?;
    install(
        &root.join("dist/openwrt/flowguard.config"),
        &data.join("etc/config/flowguard"),
        0o644,
    )?;

    fs::create_dir_all(&control)?;
    let installed_size = tree_size(&data)?;
    write(
        &control.join("control"),
        &control_file(openwrt_arch, installed_size),
        0o644,
    )?;
    write(&control.join("conffiles"), "/etc/config/flowguard\n", 0o644)?;
    write(&control.join("postinst"), POSTINST, 0o755)?;
    write(&control.join("prerm"), PRERM, 0o755)?;
    write(&stage.join("debian-binary"), "2.0\n", 0o644)?;

    let epoch = source_date_epoch();
    tar_gz(&data, &["."], &stage.join("data.tar.gz"), &epoch)?;
    tar_gz(&control, &["."], &stage.join("control.tar.gz"), &epoch)?;
    let package = out_dir.join(format!("{PACKAGE}_{}_{openwrt_arch}.ipk", version()));
    tar_gz(
        &stage,
        &["./debian-binary", "./data.tar.gz", "./control.tar.gz"],
        &package,
        &epoch,
    )?;
    fs::remove_dir_all(&stage)?;
    println!("The OpenWrt package is {}.", package.display());
    Ok(package)
}

/// The control file. No `Depends`: the binary is static (no libc), and on
/// 24.10's kernel 6.6 the tc program attaches with TCX, which needs no kmod;
/// kmod-sched-bpf (cls_bpf) is only needed below 6.6, which opkg cannot
/// express for a prebuilt package, so `flowguard doctor` names it there (the
/// feed Makefile adds it for 5.15 builds).
fn control_file(arch: &str, installed_size: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Source: feeds/packages/net/{PACKAGE}\n\
         SourceName: {PACKAGE}\n\
         License: MIT OR Apache-2.0\n\
         Section: net\n\
         URL: {URL}\n\
         Maintainer: {MAINTAINER}\n\
         Architecture: {arch}\n\
         Installed-Size: {installed_size}\n\
         Description: Fixes offloaded flows sent to a LAN endpoint's stale MAC address.\n \
         With flow offloading on bridge ports (fw4 flow_offloading_hw), the\n \
         flowtable caches each flow's destination MAC; when an endpoint keeps\n \
         its IP but changes MAC, its flows die. flowguard's eBPF programs\n \
         rewrite those frames and evict the stale flows. Configure in\n \
         /etc/config/flowguard; check the router with `flowguard doctor`.\n",
        version = version(),
    )
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(to.parent().expect("a path inside the stage"))?;
    fs::copy(from, to)
        .with_context(|| format!("could not copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, contents).with_context(|| format!("could not write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Bytes of the regular files under `dir`: what opkg reports as installed.
fn tree_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            tree_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// The last commit's time, so that packages of one commit are identical.
fn source_date_epoch() -> String {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| {
            step::probe(
                Command::new("git")
                    .args(["log", "-1", "--format=%ct"])
                    .current_dir(step::workspace_root()),
            )
            .map(|out| out.trim().to_owned())
        })
        .filter(|epoch| !epoch.is_empty())
        .unwrap_or_else(|| "0".to_owned())
}

/// `tar -C dir -cf - members | gzip -9n > out`, root-owned, sorted, with a
/// fixed time (`-n`: gzip stores no name or time of its own).
fn tar_gz(dir: &Path, members: &[&str], out: &Path, epoch: &str) -> Result<()> {
    let mut tar = Command::new("tar");
    tar.args([
        "--format=gnu",
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        "--sort=name",
    ])
    .arg(format!("--mtime=@{epoch}"))
    .arg("-C")
    .arg(dir)
    .arg("-cf")
    .arg("-")
    .args(members)
    .stdout(Stdio::piped());
    let mut tar_child = tar
        .spawn()
        .with_context(|| format!("could not start {}", step::display(&tar)))?;
    let file =
        fs::File::create(out).with_context(|| format!("could not create {}", out.display()))?;
    let gzip_status = Command::new("gzip")
        .arg("-9n")
        .stdin(tar_child.stdout.take().expect("tar's stdout is piped"))
        .stdout(file)
        .status()
        .context("could not start gzip")?;
    let tar_status = tar_child.wait()?;
    if !tar_status.success() || !gzip_status.success() {
        bail!(
            "packing {} failed (tar: {tar_status}, gzip: {gzip_status})",
            out.display()
        );
    }
    Ok(())
}
