//! What the OpenWrt packages carry, whatever their format: the name,
//! version, feed metadata and the three payload files. ipk.rs (24.10, opkg)
//! and apk.rs (25.12, apk-tools 3) each write them in their own format.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::step;

pub const NAME: &str = "flowguard";
/// OpenWrt's package release, appended to the crate version.
pub const RELEASE: &str = "r1";
pub const LICENSE: &str = "MIT OR Apache-2.0";
/// OpenWrt's `$(SOURCE)`: where the package lives in its feed.
pub const ORIGIN: &str = "feeds/packages/net/flowguard";
pub const MAINTAINER: &str = "flowguard developers <dev@flowguard.invalid>";
pub const URL: &str = "https://github.com/flowguard/flowguard";
/// The UCI config: a conffile, kept when the user edited it.
pub const CONFFILE: &str = "/etc/config/flowguard";

/// The description's first line, then its body: the .ipk wraps the body
/// over several lines, the .apk joins it all into one (as OpenWrt's build
/// strips it).
pub const SUMMARY: &str = "Fixes offloaded flows sent to a LAN endpoint's stale MAC address.";
pub const DESCRIPTION: &[&str] = &[
    "With flow offloading on bridge ports (fw4 flow_offloading_hw), the",
    "flowtable caches each flow's destination MAC; when an endpoint keeps",
    "its IP but changes MAC, its flows die. flowguard's eBPF programs",
    "rewrite those frames and evict the stale flows. Configure in",
    "/etc/config/flowguard; check the router with `flowguard doctor`.",
];

/// One file the package installs.
pub struct PayloadFile {
    pub source: PathBuf,
    /// Absolute path on the router.
    pub path: &'static str,
    pub mode: u32,
}

/// The binary, the procd init script and the UCI config, in path order.
pub fn payload(binary: &Path) -> [PayloadFile; 3] {
    let openwrt = step::workspace_root().join("dist/openwrt");
    [
        PayloadFile {
            source: openwrt.join("flowguard.config"),
            path: CONFFILE,
            mode: 0o644,
        },
        PayloadFile {
            source: openwrt.join("flowguard.init"),
            path: "/etc/init.d/flowguard",
            mode: 0o755,
        },
        PayloadFile {
            source: binary.to_path_buf(),
            path: "/usr/sbin/flowguard",
            mode: 0o755,
        },
    ]
}

/// The last commit's time, so that packages of one commit are identical.
pub fn source_date_epoch() -> String {
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
