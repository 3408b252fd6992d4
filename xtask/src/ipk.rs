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

use crate::{
    package::{self, LICENSE, MAINTAINER, NAME, ORIGIN, RELEASE, URL},
    step,
};

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
    let stage = out_dir.join("ipk");
    let _ = fs::remove_dir_all(&stage);
    let data = stage.join("data");
    let control = stage.join("control");
    for file in package::payload(binary) {
        let relative = file.path.trim_start_matches('/');
        install(&file.source, &data.join(relative), file.mode)?;
    }

    fs::create_dir_all(&control)?;
    let installed_size = tree_size(&data)?;
    write(
        &control.join("control"),
        &control_file(openwrt_arch, installed_size),
        0o644,
    )?;
    write(
        &control.join("conffiles"),
        &format!("{}\n", package::CONFFILE),
        0o644,
    )?;
    write(&control.join("postinst"), POSTINST, 0o755)?;
    write(&control.join("prerm"), PRERM, 0o755)?;
    write(&stage.join("debian-binary"), "2.0\n", 0o644)?;

    let epoch = package::source_date_epoch();
    tar_gz(&data, &["."], &stage.join("data.tar.gz"), &epoch)?;
    tar_gz(&control, &["."], &stage.join("control.tar.gz"), &epoch)?;
    let package = out_dir.join(format!("{NAME}_{}_{openwrt_arch}.ipk", version()));
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
    let mut control = format!(
        "Package: {NAME}\n\
         Version: {version}\n\
         Source: {ORIGIN}\n\
         SourceName: {NAME}\n\
         License: {LICENSE}\n\
         Section: net\n\
         URL: {URL}\n\
         Maintainer: {MAINTAINER}\n\
         Architecture: {arch}\n\
         Installed-Size: {installed_size}\n\
         Description: {summary}\n",
        version = version(),
        summary = package::SUMMARY,
    );
    for line in package::DESCRIPTION {
        control += &format!(" {line}\n");
    }
    control
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
