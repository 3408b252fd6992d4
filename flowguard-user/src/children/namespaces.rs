//! Finding network namespaces and opening a netlink socket inside each:
//! the named ones (`/run/netns`, `/var/run/docker/netns`,
//! `/run/user/*/netns`), those of running processes (`/proc/*/ns/net`), and
//! the inotify and pidfd watches that say when to look again.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

use crate::{netlink, sys};

/// Directories whose entries are namespace bind mounts, with how a
/// namespace found there is named in sentences.
pub const NAMED_DIRS: [(&str, &str); 2] = [
    ("/run/netns", "netns"),
    ("/var/run/docker/netns", "docker netns"),
];

/// Receive buffer of each namespace's socket: links and addresses change
/// rarely; an overflow costs a re-dump of one namespace.
const RECEIVE_BUFFER: usize = 512 * 1024;

/// A namespace found by a scan: how to open it and what to call it.
#[derive(Clone, Debug)]
pub struct Found {
    pub path: PathBuf,
    pub label: String,
    /// For namespaces found through a process: its pid.
    pub pid: Option<i32>,
}

/// The namespace inode of an nsfs file, if `path` is one (a bind mount not
/// yet in place is a plain file).
fn nsfs_inode(path: &Path, nsfs_dev: u64) -> Option<u64> {
    let md = fs::metadata(path).ok()?;
    (md.dev() == nsfs_dev).then_some(md.ino())
}

/// The named namespaces by inode, and whether some entry was not yet a
/// namespace (`ip netns add` creates the file before it mounts onto it).
pub fn scan_named(nsfs_dev: u64) -> (HashMap<u64, Found>, bool) {
    let mut dirs: Vec<(PathBuf, String)> = NAMED_DIRS
        .iter()
        .map(|(d, l)| (PathBuf::from(d), (*l).to_owned()))
        .collect();
    // Rootless Podman keeps each user's namespaces under /run/user/UID/netns.
    if let Ok(users) = fs::read_dir("/run/user") {
        for u in users.flatten() {
            let uid = u.file_name().to_string_lossy().into_owned();
            dirs.push((u.path().join("netns"), format!("netns of uid {uid}")));
        }
    }
    let mut found = HashMap::new();
    let mut pending = false;
    for (dir, label) in dirs {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            match nsfs_inode(&path, nsfs_dev) {
                Some(ino) => {
                    let name = e.file_name().to_string_lossy().into_owned();
                    found.entry(ino).or_insert(Found {
                        path,
                        label: format!("{label} {name}"),
                        pid: None,
                    });
                }
                None => pending = true,
            }
        }
    }
    (found, pending)
}

/// The namespaces of running processes by inode (the first pid found for
/// each), read from the `/proc/PID/ns/net` links without opening them.
pub fn scan_processes() -> HashMap<u64, Found> {
    let mut found = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let path = e.path().join("ns/net");
        let Ok(target) = fs::read_link(&path) else {
            continue;
        };
        let Some(ino) = target
            .to_str()
            .and_then(|t| t.strip_prefix("net:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        found.entry(ino).or_insert_with(|| {
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            Found {
                path,
                label: format!("the netns of pid {pid} ({})", comm.trim()),
                pid: Some(pid),
            }
        });
    }
    found
}

/// Opens `path` (a namespace file) and checks that it is still the
/// namespace `ino` (a process may have exited and its pid been reused).
pub fn open_namespace(path: &Path, ino: u64) -> io::Result<File> {
    let f = File::open(path)?;
    if f.metadata()?.ino() != ino {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "another namespace now",
        ));
    }
    Ok(f)
}

/// Creates, for each namespace file, a netlink socket inside that
/// namespace subscribed to link and address changes. A socket stays bound
/// to the namespace it was created in.
pub fn sockets_inside(namespaces: Vec<(u64, File)>) -> Vec<(u64, io::Result<Socket>)> {
    namespaces
        .into_iter()
        .map(|(ino, ns)| {
            (
                ino,
                sys::in_netns(&ns, subscribed_socket).and_then(|made| made),
            )
        })
        .collect()
}

fn subscribed_socket() -> io::Result<Socket> {
    netlink::subscribe(
        NETLINK_ROUTE,
        &[
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV6_IFADDR,
        ],
        RECEIVE_BUFFER,
    )
}

/// A pidfd: readable once the process has exited.
pub fn pidfd(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An inotify instance watching the named directories (those that exist)
/// and, for those that do not, their parent, so that their creation is seen.
pub struct DirWatch {
    pub fd: OwnedFd,
    watched: Vec<PathBuf>,
}

impl DirWatch {
    pub fn new() -> io::Result<Self> {
        // SAFETY: inotify_init1 takes flags and returns a new descriptor.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor is new and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut w = Self {
            fd,
            watched: Vec::new(),
        };
        w.refresh();
        Ok(w)
    }

    /// Adds watches for directories that appeared since the last call.
    pub fn refresh(&mut self) {
        // A removed directory dropped its watch.
        self.watched.retain(|w| w.is_dir());
        for (dir, _) in NAMED_DIRS {
            let dir = Path::new(dir);
            let target = if dir.is_dir() {
                dir
            } else {
                match dir.parent() {
                    Some(p) if p.is_dir() => p,
                    _ => continue,
                }
            };
            if self.watched.iter().any(|w| w == target) {
                continue;
            }
            let Ok(c) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            let mask = libc::IN_CREATE
                | libc::IN_DELETE
                | libc::IN_MOVED_TO
                | libc::IN_MOVED_FROM
                | libc::IN_DELETE_SELF
                | libc::IN_ONLYDIR;
            // SAFETY: a valid inotify descriptor and a NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
            if wd >= 0 {
                self.watched.push(target.to_owned());
            }
        }
    }

    /// Reads and discards pending events; true if there were any.
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: reads at most buf.len() bytes into buf.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            any = true;
        }
        any
    }
}
