//! Small facts about the running system that flowguard checks before it
//! changes anything: interfaces, privileges, bpffs, the monotonic clock.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use crate::settings::{LinkKind, Mac};

/// The index of a network interface in the current network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// The name of an interface index in the current network namespace.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// What kind of link an interface is, read with ioctls in the current
/// network namespace (sysfs may show another namespace's devices): its
/// hardware type, and for Ethernet whether its driver is the bridge's.
pub fn link_kind(name: &str) -> io::Result<LinkKind> {
    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_LOOPBACK: u16 = 772;
    const SIOCETHTOOL: u64 = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    let (sock, mut req) = ifreq_for(name)?;
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled ifru_hwaddr.
    match unsafe { req.ifr_ifru.ifru_hwaddr.sa_family } {
        ARPHRD_LOOPBACK => return Ok(LinkKind::Loopback),
        ARPHRD_ETHER => {}
        _ => return Ok(LinkKind::NotEthernet),
    }
    // struct ethtool_drvinfo: cmd, then driver[32] and more we do not read.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    req.ifr_ifru.ifru_data = info.as_mut_ptr().cast();
    // SAFETY: ifru_data points at a buffer as large as struct ethtool_drvinfo.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    // A driver without ethtool support is no bridge.
    let driver = if rc < 0 { &[][..] } else { &info[4..36] };
    let driver = driver.split(|b| *b == 0).next().unwrap_or_default();
    Ok(if driver == b"bridge" {
        LinkKind::Bridge
    } else {
        LinkKind::Ethernet
    })
}

/// A socket to ask about interface `name` with, and an ifreq naming it.
fn ifreq_for(name: &str) -> io::Result<(OwnedFd, libc::ifreq)> {
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok((sock, req))
}

/// The hardware address of an interface, read with SIOCGIFHWADDR in the
/// current network namespace (sysfs may show another namespace's devices).
pub fn if_mac(name: &str) -> io::Result<Mac> {
    let (sock, mut req) = ifreq_for(name)?;
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass. `as _`: the request is
    // a c_ulong on glibc and a c_int on musl.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled ifru_hwaddr.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(Mac(mac))
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capabilities of this process.
fn effective_caps() -> io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no CapEff in /proc/self/status"))
}

/// The capabilities loading and attaching need that this process lacks.
pub fn missing_capabilities() -> Vec<&'static str> {
    let Ok(caps) = effective_caps() else {
        return Vec::new(); // cannot tell: let the kernel decide
    };
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Whether `path` lies on a bpf filesystem.
pub fn is_on_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Mounts a bpf filesystem at `path`, as `mount -t bpf bpf PATH` does.
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: NUL-terminated strings; no mount data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts what is mounted at `path`.
pub fn unmount(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated string.
    if unsafe { libc::umount(target.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_coarse_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Takes an exclusive, non-blocking flock on an open file or directory.
/// `Ok(false)` when another process holds it.
pub fn try_lock(fd: &impl AsRawFd) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The process holding a flock on `path` (the pin directory's lock), from
/// /proc/locks; `None` when nobody holds one. Reading it takes no lock, so
/// asking never gets in the way of an instance that is starting.
pub fn flock_holder(path: &Path) -> io::Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path)?;
    let dev = meta.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    Ok(flock_holder_in(&fs::read_to_string("/proc/locks")?, &id))
}

/// The holder of a FLOCK on `id` (`MAJOR:MINOR:INODE` as /proc/locks writes
/// it) in the text of /proc/locks; waiters (`->` lines) do not hold it.
fn flock_holder_in(locks: &str, id: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, file, ..] if *file == id => pid.parse().ok(),
            _ => None,
        }
    })
}

/// Runs `f` in the network namespace of process `pid` (see [`in_netns`]).
pub fn in_netns_of<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    in_netns(&fs::File::open(format!("/proc/{pid}/ns/net"))?, f)
}

/// Runs `f` in the network namespace `ns` (an open namespace file), on a
/// thread of its own which ends with it: the caller's namespace never
/// changes, and no thread is ever left in another namespace. What `f`
/// creates there (a socket) stays bound to that namespace.
pub fn in_netns<T: Send>(ns: &fs::File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: `ns` is an open namespace file; setns changes only
                // this thread's network namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// The bpf(2) system call with `attr` (a `union bpf_attr` prefix).
///
/// # Safety
/// Every pointer `attr` holds must be valid for the call (paths
/// NUL-terminated, buffers as long as `attr` states).
unsafe fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for the pointers in `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Pins the BPF object `fd` at `path` (BPF_OBJ_PIN), for objects aya pins
/// once at most (a program attached to several ports is pinned per port).
pub fn pin_object(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    const BPF_OBJ_PIN: libc::c_long = 6;
    let path = c_path(path)?;
    // union bpf_attr, BPF_OBJ_PIN: pathname, bpf_fd, file_flags.
    let mut attr = [path.as_ptr() as u64, fd.as_raw_fd() as u64];
    // SAFETY: the attr points at a NUL-terminated path that outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// The interface index a pinned TCX or XDP link is attached to; 0 when its
/// interface is gone (the kernel keeps the link, detached). Read with
/// BPF_OBJ_GET and BPF_OBJ_GET_INFO_BY_FD, as aya keeps a link's fd private.
pub fn pinned_link_ifindex(pin: &Path) -> io::Result<u32> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let path = c_path(pin)?;
    // union bpf_attr, BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    let mut get = [path.as_ptr() as u64, 0];
    // SAFETY: the attr points at a NUL-terminated path that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut get) }?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the union
    // whose tcx and xdp members both start with the ifindex.
    let mut info = [0u64; 8];
    // BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info.
    let mut attr = [
        fd.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32),
        info.as_mut_ptr() as u64,
    ];
    // SAFETY: the attr points at a buffer of the length it states.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info[2] as u32)
}

/// Whether process `pid` exists (in this PID namespace).
pub fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Keeps the signals whose default action would kill flowguard between
/// attaching and the moment the event loop handles them from ending it with
/// the pins left behind: SIGHUP, SIGQUIT and SIGUSR1/2 are ignored (the
/// loop replaces that); SIGINT and SIGTERM are held pending, so that a stop
/// asked for during start-up is a clean stop once
/// [`release_stop_signals`] lets them through. Threads started meanwhile
/// inherit the hold, so the loop's thread is the one that takes them.
pub fn hold_signals_until_handled() {
    for sig in [libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2] {
        // SAFETY: SIG_IGN installs no handler code; nothing else in the
        // process relies on these signals' previous dispositions.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    stop_signals_mask(libc::SIG_BLOCK);
}

/// Delivers the SIGINT or SIGTERM held since [`hold_signals_until_handled`]
/// (call once their handlers are installed).
pub fn release_stop_signals() {
    stop_signals_mask(libc::SIG_UNBLOCK);
}

fn stop_signals_mask(how: libc::c_int) {
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which
    // initialises it; pthread_sigmask changes only this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// The running kernel's release (`uname -r`), which names its module
/// directory under /lib/modules.
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_flock_holder_is_found_and_waiters_are_not_holders() {
        let locks = "1: POSIX  ADVISORY  WRITE 700 00:1a:99 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:2b:1234 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4243 00:2b:1234 0 EOF\n";
        assert_eq!(super::flock_holder_in(locks, "00:2b:1234"), Some(4242));
        assert_eq!(
            super::flock_holder_in(locks, "00:1a:99"),
            None,
            "not a flock"
        );
        assert_eq!(super::flock_holder_in(locks, "00:2b:12345"), None);
    }

    use super::*;

    #[test]
    fn in_netns_runs_on_a_thread_of_its_own_and_leaves_the_caller_where_it_was() {
        let here = || fs::read_link("/proc/thread-self/ns/net").unwrap();
        let before = here();
        let me = std::thread::current().id();
        let ns = fs::File::open("/proc/self/ns/net").unwrap();
        match in_netns(&ns, || (std::thread::current().id(), here())) {
            Ok((thread, inside)) => {
                assert_ne!(thread, me);
                assert_eq!(inside, before);
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: setns needs CAP_SYS_ADMIN");
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(here(), before);
        // A namespace file that is not one: the error, and nothing ran.
        let not_ns = fs::File::open("/proc/self/stat").unwrap();
        assert!(in_netns(&not_ns, || panic!("ran")).is_err());
    }

    #[test]
    fn loopback_exists_and_unknown_does_not() {
        assert_eq!(ifindex("lo"), Some(1));
        assert_eq!(ifname(1).as_deref(), Some("lo"));
        assert_eq!(ifindex("no-such-if0"), None);
        assert_eq!(if_mac("lo").unwrap(), Mac([0; 6]));
        assert!(if_mac("no-such-if0").is_err());
    }

    #[test]
    fn tmp_is_not_bpffs() {
        assert!(!is_on_bpffs(Path::new("/tmp")));
        assert!(!is_on_bpffs(Path::new("/nonexistent/x")));
    }

    #[test]
    fn monotonic_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
