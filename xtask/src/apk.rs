//! OpenWrt 25.12 `.apk` packages (apk-tools 3, the ADB format), written here
//! without apk-tools, following what `apk mkpkg` and OpenWrt's
//! package-pack.mk produce: one ADB block of metadata (package info, the
//! file tree with each file's SHA-256, the maintainer scripts), one DATA
//! block per file, all raw-deflated behind `ADBd` (OpenWrt's apk has no zstd).

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use flate2::{write::DeflateEncoder, Compression};
use sha2::{Digest as _, Sha256};

use crate::package::{self, LICENSE, MAINTAINER, NAME, ORIGIN, RELEASE, URL};

/// OpenWrt's scripts for a package (package-pack.mk): after install, source
/// /lib/functions.sh and let `default_postinst` enable and start every init
/// script that `lib/apk/packages/<name>.list` names; before removal,
/// `default_prerm` stops and disables them. Scripts run chrooted into the
/// target root, so `IPKG_INSTROOT` is empty there.
const POST_INSTALL_BODY: &str = "[ \"${IPKG_NO_SCRIPT}\" = \"1\" ] && exit 0\n\
[ -s \"${IPKG_INSTROOT}/lib/functions.sh\" ] || exit 0\n\
. \"${IPKG_INSTROOT}/lib/functions.sh\"\n\
export root=\"${IPKG_INSTROOT}\"\n\
export pkgname=\"flowguard\"\n\
add_group_and_user\n\
default_postinst\n";
const PRE_DEINSTALL: &str = "#!/bin/sh\n\
[ -s \"${IPKG_INSTROOT}/lib/functions.sh\" ] || exit 0\n\
. \"${IPKG_INSTROOT}/lib/functions.sh\"\n\
export root=\"${IPKG_INSTROOT}\"\n\
export pkgname=\"flowguard\"\n\
default_prerm\n";

/// apk's version of the crate version: `<upstream>-r<release>`, with a Cargo
/// pre-release as apk's suffix (`0.2.0-rc.1` becomes `0.2.0_rc1-r1`; apk
/// rejects `0.2.0-rc.1`). For a release it is the .ipk's version.
pub fn version() -> Result<String> {
    apk_version(env!("CARGO_PKG_VERSION"))
}

fn apk_version(crate_version: &str) -> Result<String> {
    let upstream = match crate_version.split_once('-') {
        None => crate_version.to_owned(),
        Some((release, pre)) => {
            let suffix = pre.replace('.', "");
            let known = ["alpha", "beta", "pre", "rc"];
            let number = known.iter().find_map(|k| suffix.strip_prefix(k));
            if !number.is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                bail!(
                    "the pre-release {crate_version} has no apk form: apk takes \
                     _alpha, _beta, _pre or _rc followed by digits (e.g. 0.2.0-rc.1)"
                );
            }
            format!("{release}_{suffix}")
        }
    };
    Ok(format!("{upstream}-{RELEASE}"))
}

/// Builds `<out_dir>/flowguard-<version>.apk` (the name apk mkpkg and
/// OpenWrt give it; the arch is not in it, hence one directory per arch)
/// from `binary` and dist/openwrt's init script and UCI config, for
/// OpenWrt's package architecture `openwrt_arch`. Returns its path.
pub fn build(openwrt_arch: &str, binary: &Path, out_dir: &Path) -> Result<PathBuf> {
    let mut files = Vec::new();
    for file in package::payload(binary) {
        let contents = fs::read(&file.source)
            .with_context(|| format!("could not read {}", file.source.display()))?;
        files.push(File {
            path: file.path.trim_start_matches('/').to_owned(),
            mode: file.mode,
            contents,
        });
    }
    let epoch: u64 = package::source_date_epoch()
        .parse()
        .context("SOURCE_DATE_EPOCH is not a number of seconds")?;
    let bytes = write(openwrt_arch, &version()?, files, epoch)?;
    let path = out_dir.join(format!("{NAME}-{}.apk", version()?));
    fs::write(&path, bytes).with_context(|| format!("could not write {}", path.display()))?;
    println!("The OpenWrt 25.12 package is {}.", path.display());
    Ok(path)
}

/// A regular file of the package: its path without the leading slash.
pub struct File {
    pub path: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// The .apk holding `files` plus OpenWrt's `lib/apk/packages` files, every
/// mtime `epoch`, everything owned by root.
pub fn write(
    openwrt_arch: &str,
    version: &str,
    mut files: Vec<File>,
    epoch: u64,
) -> Result<Vec<u8>> {
    files.extend(openwrt_package_files(&files)?);

    // Directory -> its files, every ancestor included (the root is ""),
    // both sorted bytewise as apk requires.
    let mut tree: BTreeMap<String, BTreeMap<String, &File>> = BTreeMap::new();
    for file in &files {
        let (dir, name) = file.path.rsplit_once('/').unwrap_or(("", &file.path));
        let mut ancestor = dir;
        loop {
            tree.entry(ancestor.to_owned()).or_default();
            match ancestor.rsplit_once('/') {
                Some((parent, _)) => ancestor = parent,
                None if !ancestor.is_empty() => ancestor = "",
                None => break,
            }
        }
        tree.get_mut(dir)
            .expect("just inserted")
            .insert(name.to_owned(), file);
    }

    let description = std::iter::once(package::SUMMARY)
        .chain(package::DESCRIPTION.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    // apk keeps at most 512 bytes of it in its installed database.
    if description.len() >= 512 {
        bail!(
            "the package description is {} bytes; apk keeps 512",
            description.len()
        );
    }
    let installed_size: u64 = files.iter().map(|f| f.contents.len() as u64).sum();

    let mut adb = Adb::new();
    let root_name = adb.blob(b"root");
    let mut acls = BTreeMap::new();
    let mut acl_of = |adb: &mut Adb, mode: u32| {
        *acls.entry(mode).or_insert_with(|| {
            let mode = adb.int(u64::from(mode));
            adb.object(&[mode, root_name, root_name])
        })
    };
    let mtime = adb.int(epoch);
    let mut dirs = Vec::new();
    // (path index, file index, contents) of each non-empty file, in the
    // order the DATA blocks must follow.
    let mut data = Vec::new();
    for (dir_index, (dir, entries)) in tree.iter().enumerate() {
        let mut file_values = Vec::new();
        for (file_index, (name, file)) in entries.iter().enumerate() {
            let name = adb.blob(name.as_bytes());
            let acl = acl_of(&mut adb, file.mode);
            let size = adb.int(file.contents.len() as u64);
            let hash = adb.blob(&Sha256::digest(&file.contents));
            file_values.push(adb.object(&[name, acl, size, mtime, hash]));
            if !file.contents.is_empty() {
                data.push((dir_index + 1, file_index + 1, &file.contents));
            }
        }
        let name = adb.blob(dir.as_bytes());
        let acl = acl_of(&mut adb, 0o755);
        let files = adb.array(&file_values);
        dirs.push(adb.object(&[name, acl, files]));
    }
    let paths = adb.array(&dirs);

    let (unique_id, unique_id_at) = adb.zeroed_blob(20);
    let info = [
        adb.blob(NAME.as_bytes()),
        adb.blob(version.as_bytes()),
        unique_id,
        adb.blob(description.as_bytes()),
        adb.blob(openwrt_arch.as_bytes()),
        adb.blob(LICENSE.as_bytes()),
        adb.blob(ORIGIN.as_bytes()),
        adb.blob(MAINTAINER.as_bytes()),
        adb.blob(URL.as_bytes()),
        NULL, // repo-commit
        NULL, // build-time: OpenWrt's build sets none
        adb.int(installed_size.max(1)),
        // No depends (slot 15): the binary is static, and 25.12's kernel
        // (6.12) attaches tc with TCX, which needs no kmod; the .ipk has
        // none either (see ipk.rs for kmod-sched-bpf below 6.6).
    ];
    let info = adb.object(&info);

    let post_install = format!("#!/bin/sh\n{POST_INSTALL_BODY}");
    let post_upgrade = format!("#!/bin/sh\nexport PKG_UPGRADE=1\n{POST_INSTALL_BODY}");
    let scripts = [
        NULL, // trigger
        NULL, // pre-install
        adb.blob(post_install.as_bytes()),
        adb.blob(PRE_DEINSTALL.as_bytes()),
        NULL, // post-deinstall
        NULL, // pre-upgrade
        adb.blob(post_upgrade.as_bytes()),
    ];
    let scripts = adb.object(&scripts);
    let root = adb.object(&[info, paths, scripts]);
    let mut adb = adb.finish(root)?;
    // The package's unique id: the first 20 bytes of the SHA-256 of the
    // ADB with the id still zero (what mkpkg does).
    let digest = Sha256::digest(&adb);
    adb[unique_id_at..unique_id_at + 20].copy_from_slice(&digest[..20]);

    let mut container = Vec::new();
    container.extend_from_slice(b"ADB.pckg");
    push_block(&mut container, BLOCK_ADB, &[&adb])?;
    for (dir_index, file_index, contents) in data {
        let dir_index = u32::try_from(dir_index)?.to_le_bytes();
        let file_index = u32::try_from(file_index)?.to_le_bytes();
        push_block(
            &mut container,
            BLOCK_DATA,
            &[&dir_index, &file_index, contents],
        )?;
    }

    // `ADBd`: raw deflate (no zlib header) at mkpkg's level 9.
    let mut out = b"ADBd".to_vec();
    let mut deflate = DeflateEncoder::new(&mut out, Compression::best());
    deflate.write_all(&container)?;
    deflate.finish()?;
    Ok(out)
}

/// OpenWrt's per-package files under /lib/apk/packages: the `.list` of the
/// package's files, which `default_postinst` reads to find and enable the
/// init script, and the conffile with its shipped SHA-256 (`.conffiles_static`,
/// which sysupgrade compares to keep an edited config).
fn openwrt_package_files(files: &[File]) -> Result<Vec<File>> {
    let mut list: Vec<String> = files.iter().map(|f| format!("/{}\n", f.path)).collect();
    list.sort();
    let conffile = package::CONFFILE;
    let config = files
        .iter()
        .find(|f| format!("/{}", f.path) == conffile)
        .with_context(|| format!("the package has no {conffile}"))?;
    let checksum: String = Sha256::digest(&config.contents)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = |suffix: &str, contents: String| File {
        path: format!("lib/apk/packages/{NAME}.{suffix}"),
        mode: 0o644,
        contents: contents.into_bytes(),
    };
    Ok(vec![
        file("list", list.concat()),
        file("conffiles", format!("{conffile}\n")),
        file("conffiles_static", format!("{conffile} {checksum}\n")),
    ])
}

const BLOCK_ADB: u32 = 0;
const BLOCK_DATA: u32 = 2;

/// A block: a u32 of type (bits 31..30) and size with this header (bits
/// 29..0), the payload, then zeros up to a multiple of 8.
fn push_block(out: &mut Vec<u8>, kind: u32, parts: &[&[u8]]) -> Result<()> {
    let size = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    if size >= 1 << 30 {
        bail!("a block of {size} bytes needs apk's extended header, which this writer lacks");
    }
    out.extend_from_slice(&((kind << 30) | size as u32).to_le_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    out.resize(out.len().next_multiple_of(8), 0);
    Ok(())
}

/// An ADB value: 4 bits of type, 28 of immediate or offset.
type Value = u32;
const NULL: Value = 0;
const TYPE_INT: u32 = 0x1000_0000;
const TYPE_INT32: u32 = 0x2000_0000;
const TYPE_INT64: u32 = 0x3000_0000;
const TYPE_BLOB8: u32 = 0x8000_0000;
const TYPE_BLOB16: u32 = 0x9000_0000;
const TYPE_BLOB32: u32 = 0xa000_0000;
const TYPE_ARRAY: u32 = 0xd000_0000;
const TYPE_OBJECT: u32 = 0xe000_0000;

/// The ADB block's payload under construction: an 8-byte header (version 0,
/// the root value) and then values, children before their parents, each
/// referenced by its offset from the start of the header.
struct Adb {
    buf: Vec<u8>,
}

impl Adb {
    fn new() -> Self {
        Self { buf: vec![0; 8] }
    }

    /// Appends `bytes` at the next multiple of `align`; returns the offset.
    fn append(&mut self, align: usize, bytes: &[u8]) -> u32 {
        self.buf.resize(self.buf.len().next_multiple_of(align), 0);
        let offset = self.buf.len() as u32;
        self.buf.extend_from_slice(bytes);
        offset
    }

    fn int(&mut self, value: u64) -> Value {
        if value < 0x1000_0000 {
            TYPE_INT | value as u32
        } else if let Ok(value) = u32::try_from(value) {
            TYPE_INT32 | self.append(4, &value.to_le_bytes())
        } else {
            TYPE_INT64 | self.append(4, &value.to_le_bytes())
        }
    }

    /// A length (the smallest that fits, aligned to its size), then the
    /// bytes; an empty blob is NULL.
    fn blob(&mut self, bytes: &[u8]) -> Value {
        let len = bytes.len();
        let (kind, offset) = if len == 0 {
            return NULL;
        } else if let Ok(len) = u8::try_from(len) {
            (TYPE_BLOB8, self.append(1, &[len]))
        } else if let Ok(len) = u16::try_from(len) {
            (TYPE_BLOB16, self.append(2, &len.to_le_bytes()))
        } else {
            (TYPE_BLOB32, self.append(4, &(len as u32).to_le_bytes()))
        };
        self.buf.extend_from_slice(bytes);
        kind | offset
    }

    /// A blob of `len` zero bytes (`len` < 256), and where its bytes are.
    fn zeroed_blob(&mut self, len: usize) -> (Value, usize) {
        let value = self.blob(&vec![0; len]);
        (value, (value & 0x0fff_ffff) as usize + 1)
    }

    /// Slot 0 counts the slots including itself; trailing NULLs are left
    /// off, and an object with nothing in it is NULL.
    fn slots(&mut self, kind: u32, values: &[Value]) -> Value {
        let used = values.iter().rposition(|&v| v != NULL).map_or(0, |i| i + 1);
        if used == 0 {
            return NULL;
        }
        let mut bytes = Vec::with_capacity(4 * (used + 1));
        bytes.extend_from_slice(&(used as u32 + 1).to_le_bytes());
        for value in &values[..used] {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        kind | self.append(4, &bytes)
    }

    /// Fields by number: `fields[0]` is field 1.
    fn object(&mut self, fields: &[Value]) -> Value {
        self.slots(TYPE_OBJECT, fields)
    }

    fn array(&mut self, items: &[Value]) -> Value {
        self.slots(TYPE_ARRAY, items)
    }

    /// The payload with `root` in its header (compat version 0, version 0).
    fn finish(mut self, root: Value) -> Result<Vec<u8>> {
        if self.buf.len() >= 0x1000_0000 {
            bail!("the ADB is {} bytes; offsets reach 256 MiB", self.buf.len());
        }
        self.buf[4..8].copy_from_slice(&root.to_le_bytes());
        Ok(self.buf)
    }
}

#[cfg(test)]
mod tests;
