//! The host role's own evidence: the macvlan/macvtap/ipvlan children of the
//! guarded (`--ingress`) interfaces, in every network namespace, with their
//! MACs and addresses, known before the endpoint sends a single frame.
//!
//! A recreated container that never announces itself (Podman/netavark,
//! Docker before 28, VMs with `arp_notify=0`) leaves learning stuck on its
//! old MAC; the host created the new child itself, so it can say at once
//! "192.168.1.240 is at 02:42:..:0b".
//!
//! How: one `NETLINK_ROUTE` socket per namespace, created inside it (a
//! listener in one namespace hears another only if it has an nsid for it,
//! which a netavark container's namespace lacks), subscribed to link and
//! address changes before dumping links and addresses. A child is a link of
//! kind macvlan/macvtap/ipvlan/ipvtap whose parent (`IFLA_LINK`, in the
//! namespace `IFLA_LINK_NETNSID` names, or the child's own when absent) is a
//! guarded interface of flowguard's namespace; the nsid a namespace uses for
//! flowguard's is asked with `RTM_GETNSID`. Each in-prefix address of a
//! child is a fact; see [`table::ChildTable`] for how facts become map
//! entries.
//!
//! Namespaces are found under `/run/netns`, `/var/run/docker/netns` and
//! `/run/user/*/netns` (inotify: at once) and through every process's
//! `/proc/PID/ns/net` (every [`PROC_SCAN`]). A socket keeps its namespace
//! alive (with its children, whose MACs stay taken on the parent), so a
//! namespace is let go as soon as no source names it any more: inotify for
//! the directories, a pidfd on one process for the others.

mod decode;
mod namespaces;
mod table;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    fs::File,
    io,
    net::IpAddr,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    time::{Duration, Instant},
};

use netlink_sys::Socket;
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::mpsc,
    task::JoinHandle,
};

pub use table::ChildTable;

use crate::{
    endpoints::{Batch, Fact, FactSender},
    netlink::{self, send, Received},
    settings::{Mac, Prefix},
};
use decode::Message;
use namespaces::{DirWatch, Found};
use table::{NsState, Relation};

/// How often the namespaces of running processes are looked for.
pub const PROC_SCAN: Duration = Duration::from_secs(2);
/// How long [`ChildrenSource::open`] waits for the first dumps.
const FIRST_DUMP_TIMEOUT: Duration = Duration::from_secs(3);
/// Retry delay for a named namespace whose bind mount is not in place yet.
const PENDING_RETRY: Duration = Duration::from_millis(50);

/// The kind of a child link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChildKind {
    Macvlan,
    Macvtap,
    Ipvlan,
    Ipvtap,
}

impl fmt::Display for ChildKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChildKind::Macvlan => "macvlan",
            ChildKind::Macvtap => "macvtap",
            ChildKind::Ipvlan => "ipvlan",
            ChildKind::Ipvtap => "ipvtap",
        })
    }
}

/// "`ip` is at `mac`": a child of a guarded interface holds that address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildFact {
    pub ip: IpAddr,
    pub mac: Mac,
    pub kind: ChildKind,
    /// The child's name inside its namespace.
    pub ifname: String,
    /// The namespace, as sentences name it ("netns container").
    pub netns: String,
    /// The guarded interface it is a child of.
    pub parent: String,
    /// The namespace's inode and the child's ifindex there: the fact's identity.
    pub ns: u64,
    pub ifindex: u32,
}

/// A fact that appeared or went away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChildChange {
    Added(ChildFact),
    Removed(ChildFact),
}

#[derive(Debug, thiserror::Error)]
pub enum ChildrenError {
    #[error("cannot read flowguard's own network namespace: {0}")]
    OwnNamespace(#[source] io::Error),
    #[error("the guarded interface {0} does not exist")]
    NoParent(String),
}

/// What a namespace's reader task reports.
enum NsEvent {
    /// A (re-)dump begins: what follows until `DumpDone` replaces the state.
    DumpStart,
    DumpDone,
    Messages(Vec<Message>),
    OwnNsid(i32),
    /// The process that kept this namespace in our view exited.
    HolderExited,
    Failed(String),
}

/// One watched namespace.
struct Space {
    label: String,
    named: bool,
    in_proc: bool,
    holder: Option<(i32, JoinHandle<()>)>,
    reader: JoinHandle<()>,
    relation: Relation,
    live: NsState,
    building: Option<NsState>,
    dumped: bool,
    facts: BTreeMap<(u32, IpAddr), ChildFact>,
}

impl Drop for Space {
    fn drop(&mut self) {
        // The reader owns the socket: aborting it closes the socket and
        // lets the namespace go.
        self.reader.abort();
        if let Some((_, h)) = &self.holder {
            h.abort();
        }
    }
}

/// The children of the guarded interfaces, in every namespace: an initial
/// set of facts, then their changes. [`ChildrenSource::next_change`] is
/// cancel-safe. Needs a tokio runtime with IO and time enabled.
pub struct ChildrenSource {
    own_ino: u64,
    own_fd: OwnedFd,
    nsfs_dev: u64,
    parents: BTreeMap<u32, String>,
    prefixes: Vec<Prefix>,
    spaces: HashMap<u64, Space>,
    table: ChildTable,
    tx: mpsc::UnboundedSender<(u64, NsEvent)>,
    rx: mpsc::UnboundedReceiver<(u64, NsEvent)>,
    dirs: Option<AsyncFd<DirWatch>>,
    proc_scan: tokio::time::Interval,
    retry_named: Option<Instant>,
    /// The cost of the last scan of /proc, for the logs.
    pub last_proc_scan: Duration,
}

impl AsRawFd for DirWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl ChildrenSource {
    /// Starts watching every namespace for children of `parents` (interface
    /// names in this thread's namespace) with addresses in `prefixes`, and
    /// returns the facts found in the first dumps.
    pub async fn open(
        parents: &[String],
        prefixes: &[Prefix],
    ) -> Result<(Self, Vec<ChildChange>), ChildrenError> {
        let own = File::open("/proc/thread-self/ns/net").map_err(ChildrenError::OwnNamespace)?;
        let md = own.metadata().map_err(ChildrenError::OwnNamespace)?;
        let mut by_index = BTreeMap::new();
        for p in parents {
            let i = crate::sys::ifindex(p).ok_or_else(|| ChildrenError::NoParent(p.clone()))?;
            by_index.insert(i, p.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let dirs = match DirWatch::new() {
            // SAFETY: DirWatch owns its descriptor and closes it only when
            // dropped, together with the AsyncFd that owns it.
            Ok(w) => unsafe { AsyncFd::register_with_interest(w, Interest::READABLE) }.ok(),
            Err(e) => {
                log::warn!(
                    "no inotify for the namespace directories ({e}): looking every {PROC_SCAN:?}"
                );
                None
            }
        };
        let mut proc_scan = tokio::time::interval(PROC_SCAN);
        proc_scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut src = Self {
            own_ino: md.ino(),
            own_fd: own.into(),
            nsfs_dev: md.dev(),
            parents: by_index,
            prefixes: prefixes.to_vec(),
            spaces: HashMap::new(),
            table: ChildTable::default(),
            tx,
            rx,
            dirs,
            proc_scan,
            retry_named: None,
            last_proc_scan: Duration::ZERO,
        };
        src.proc_scan.tick().await;
        let mut changes = src.rescan(true, true);
        // Collect the first dumps, so that the caller starts with the facts.
        let deadline = tokio::time::Instant::now() + FIRST_DUMP_TIMEOUT;
        while src.spaces.values().any(|s| !s.dumped) {
            match tokio::time::timeout_at(deadline, src.rx.recv()).await {
                Ok(Some((ino, ev))) => changes.extend(src.on_event(ino, ev)),
                _ => break,
            }
        }
        Ok((src, changes))
    }

    /// Namespaces watched now.
    pub fn namespaces(&self) -> usize {
        self.spaces.len()
    }

    /// IPs that have at least one child fact.
    pub fn endpoints(&self) -> usize {
        self.table.len()
    }

    /// The next changes of the facts (never empty).
    pub async fn next_change(&mut self) -> Vec<ChildChange> {
        loop {
            let retry = self.retry_named;
            let changes = tokio::select! {
                Some((ino, ev)) = self.rx.recv() => self.on_event(ino, ev),
                ready = dirs_ready(&self.dirs) => {
                    if let Ok(mut g) = ready {
                        g.get_inner().drain();
                        g.clear_ready();
                    }
                    if let Some(d) = self.dirs.as_mut() {
                        d.get_mut().refresh();
                    }
                    self.rescan(true, false)
                }
                _ = sleep_until(retry) => {
                    self.retry_named = None;
                    self.rescan(true, false)
                }
                _ = self.proc_scan.tick() => {
                    if let Some(d) = self.dirs.as_mut() {
                        d.get_mut().refresh();
                    }
                    self.rescan(true, true)
                }
            };
            if !changes.is_empty() {
                return changes;
            }
        }
    }

    /// Records `changes`; returns what the children say now about every
    /// IP they touch (see [`ChildTable::apply`]).
    pub fn facts(&mut self, changes: &[ChildChange]) -> Vec<Fact> {
        self.table.apply(changes)
    }

    /// Looks for namespaces (named ones, and with `processes` those of
    /// running processes), starts watching new ones and lets go of those no
    /// source names any more. Returns the facts withdrawn with them.
    fn rescan(&mut self, named: bool, mut processes: bool) -> Vec<ChildChange> {
        let mut found: HashMap<u64, Found> = HashMap::new();
        if named {
            let (n, pending) = namespaces::scan_named(self.nsfs_dev);
            if pending && self.retry_named.is_none() {
                self.retry_named = Some(Instant::now() + PENDING_RETRY);
            }
            let was_named: Vec<u64> = self
                .spaces
                .iter()
                .filter(|(_, s)| s.named)
                .map(|(ino, _)| *ino)
                .collect();
            for s in self.spaces.values_mut() {
                s.named = false;
            }
            for (ino, f) in &n {
                if let Some(s) = self.spaces.get_mut(ino) {
                    s.named = true;
                    if s.label.starts_with("the netns of pid") {
                        s.label = f.label.clone();
                    }
                }
            }
            // A namespace that just lost its name (`ip netns del`, a
            // container removed) may still be in the last process scan's
            // list, up to PROC_SCAN old: look at the processes now, so that
            // its children are withdrawn at once rather than seconds later
            // (a recreated container with the same IP would meanwhile look
            // ambiguous).
            processes |= was_named
                .iter()
                .any(|ino| self.spaces.get(ino).is_some_and(|s| !s.named && s.in_proc));
            found.extend(n);
        }
        if processes {
            let started = Instant::now();
            let p = namespaces::scan_processes();
            self.last_proc_scan = started.elapsed();
            for (ino, s) in self.spaces.iter_mut() {
                s.in_proc = p.contains_key(ino);
            }
            for (ino, f) in p {
                if let (Some(s), Some(pid)) = (self.spaces.get_mut(&ino), f.pid) {
                    let holder_alive = s.holder.as_ref().is_some_and(|(h, j)| {
                        !j.is_finished() && std::path::Path::new(&format!("/proc/{h}")).exists()
                    });
                    if !s.named && !holder_alive {
                        s.holder = watch_holder(&self.tx, ino, pid);
                    }
                }
                found.entry(ino).or_insert(f);
            }
        }
        let mut changes = Vec::new();
        // Gone: no directory and no process names it (the own namespace stays).
        let gone: Vec<u64> = self
            .spaces
            .iter()
            .filter(|(ino, s)| **ino != self.own_ino && !s.named && !s.in_proc)
            .map(|(ino, _)| *ino)
            .collect();
        for ino in gone {
            if let Some(s) = self.spaces.remove(&ino) {
                log::debug!("no longer watching {}", s.label);
                changes.extend(s.facts.values().cloned().map(ChildChange::Removed));
            }
        }
        // New ones (and, on the first scan, our own).
        let mut new: Vec<(u64, File, Found)> = Vec::new();
        if !self.spaces.contains_key(&self.own_ino) {
            if let Ok(f) = self.own_fd.try_clone() {
                new.push((
                    self.own_ino,
                    File::from(f),
                    Found {
                        path: "/proc/thread-self/ns/net".into(),
                        label: "flowguard's own netns".into(),
                        pid: None,
                    },
                ));
            }
        }
        for (ino, f) in found {
            if self.spaces.contains_key(&ino) || ino == self.own_ino {
                continue;
            }
            match namespaces::open_namespace(&f.path, ino) {
                Ok(file) => new.push((ino, file, f)),
                Err(e) => log::debug!("cannot open {}: {e}", f.path.display()),
            }
        }
        if new.is_empty() {
            return changes;
        }
        let mut info = HashMap::new();
        let mut files = Vec::new();
        for (ino, file, f) in new {
            info.insert(ino, f);
            files.push((ino, file));
        }
        for (ino, socket) in namespaces::sockets_inside(files) {
            let f = info.remove(&ino).expect("one per namespace");
            let socket = match socket {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("cannot watch {} ({}): {e}", f.label, f.path.display());
                    continue;
                }
            };
            let reader = match netlink::register(socket) {
                Ok(fd) => tokio::spawn(follow(
                    ino,
                    fd,
                    self.own_fd.as_raw_fd() as u32,
                    self.tx.clone(),
                )),
                Err(e) => {
                    log::warn!("cannot watch {}: {e}", f.label);
                    continue;
                }
            };
            let named = f.pid.is_none() && ino != self.own_ino;
            let holder = match f.pid {
                Some(pid) if ino != self.own_ino => watch_holder(&self.tx, ino, pid),
                _ => None,
            };
            log::debug!("watching {}", f.label);
            self.spaces.insert(
                ino,
                Space {
                    label: f.label,
                    named,
                    in_proc: f.pid.is_some(),
                    holder,
                    reader,
                    relation: Relation {
                        is_own: ino == self.own_ino,
                        own_nsid: None,
                    },
                    live: NsState::default(),
                    building: None,
                    dumped: false,
                    facts: BTreeMap::new(),
                },
            );
        }
        changes
    }

    fn on_event(&mut self, ino: u64, ev: NsEvent) -> Vec<ChildChange> {
        if matches!(ev, NsEvent::HolderExited) {
            return self.rescan(false, true);
        }
        let Some(s) = self.spaces.get_mut(&ino) else {
            // From a namespace let go meanwhile.
            return Vec::new();
        };
        match ev {
            NsEvent::DumpStart => {
                s.building = Some(NsState::default());
                return Vec::new();
            }
            NsEvent::DumpDone => {
                if let Some(b) = s.building.take() {
                    s.live = b;
                }
                s.dumped = true;
            }
            NsEvent::Messages(ms) => {
                let st = s.building.as_mut().unwrap_or(&mut s.live);
                for m in &ms {
                    st.apply(m, &self.prefixes);
                }
                if s.building.is_some() {
                    return Vec::new();
                }
            }
            NsEvent::OwnNsid(id) => s.relation.own_nsid = Some(id),
            NsEvent::Failed(why) => {
                log::warn!("stopped watching {}: {why}", s.label);
                let s = self.spaces.remove(&ino).expect("present");
                return s
                    .facts
                    .values()
                    .cloned()
                    .map(ChildChange::Removed)
                    .collect();
            }
            NsEvent::HolderExited => unreachable!("handled above"),
        }
        let facts = table::facts_of(&s.live, ino, s.relation, &s.label, &self.parents);
        let changes = table::diff(&s.facts, &facts);
        s.facts = facts;
        changes
    }
}

/// Starts the source for the agent: says what is watched, sends the
/// first facts, and follows the children on a task of its own, which sends
/// every change's facts to `tx` (it ends when the loop drops the channel).
/// When the source cannot run, says why and sends nothing.
pub async fn start(parents: &[String], prefixes: &[Prefix], tx: FactSender) {
    let started = Instant::now();
    let (mut src, first) = match ChildrenSource::open(parents, prefixes).await {
        Ok(v) => v,
        Err(e) => {
            crate::say_err!("flowguard: not watching macvlan/ipvlan children: {e}");
            return;
        }
    };
    let _ = tx.send(Batch::facts(src.facts(&first)));
    crate::say!(
        "flowguard: guarding the macvlan/ipvlan children of {} in {} network namespaces \
         ({} endpoints, read in {:.0} ms)",
        parents.join(", "),
        src.namespaces(),
        src.endpoints(),
        started.elapsed().as_secs_f64() * 1e3
    );
    log::info!(
        "looking for the namespaces of running processes every {PROC_SCAN:?} (last scan: {:.1} ms)",
        src.last_proc_scan.as_secs_f64() * 1e3
    );
    tokio::spawn(async move {
        loop {
            let changes = src.next_change().await;
            if tx.send(Batch::facts(src.facts(&changes))).is_err() {
                return;
            }
        }
    });
}

/// Watches the process that keeps a namespace in view: its exit is a reason
/// to look at the processes again at once.
fn watch_holder(
    tx: &mpsc::UnboundedSender<(u64, NsEvent)>,
    ino: u64,
    pid: i32,
) -> Option<(i32, JoinHandle<()>)> {
    let fd = namespaces::pidfd(pid).ok()?;
    // SAFETY: the OwnedFd is owned by the AsyncFd for its whole life.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()?;
    let tx = tx.clone();
    Some((
        pid,
        tokio::spawn(async move {
            let _ = fd.readable().await;
            let _ = tx.send((ino, NsEvent::HolderExited));
        }),
    ))
}

async fn dirs_ready(
    dirs: &Option<AsyncFd<DirWatch>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, DirWatch>> {
    match dirs {
        Some(d) => d.readable().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Sequence numbers of one namespace's requests.
const SEQ_LINKS: u32 = 1;
const SEQ_ADDRS: u32 = 2;
const SEQ_NSID: u32 = 3;

/// Reads one namespace's socket: dumps links then addresses (again after an
/// overflow or a dump that raced with a change), asks the nsid of
/// flowguard's namespace when a child's parent lives elsewhere, and
/// forwards everything to the source.
async fn follow(
    ino: u64,
    socket: AsyncFd<Socket>,
    own_fd: u32,
    tx: mpsc::UnboundedSender<(u64, NsEvent)>,
) {
    let report = |ev| tx.send((ino, ev)).is_ok();
    let start_dump = |socket: &AsyncFd<Socket>| -> io::Result<()> {
        send(socket.get_ref(), &decode::link_dump_request(SEQ_LINKS))
    };
    let mut buf = Vec::new();
    let mut dumping: Option<u32> = Some(SEQ_LINKS);
    let mut redo = false;
    let mut nsid_asked = false;
    if !report(NsEvent::DumpStart) {
        return;
    }
    if let Err(e) = start_dump(&socket) {
        report(NsEvent::Failed(format!("dumping links: {e}")));
        return;
    }
    loop {
        let overflow = match netlink::receive_async(&socket, &mut buf).await {
            Ok(Received::Whole) => false,
            Ok(Received::Truncated(_) | Received::Overflow) => true,
            Err(e) => {
                report(NsEvent::Failed(format!("reading: {e}")));
                return;
            }
        };
        if overflow {
            // Events were lost: the state must come from a new dump, after
            // the running one if any (a second dump at once is refused).
            if dumping.is_some() {
                redo = true;
            } else {
                dumping = Some(SEQ_LINKS);
                if !report(NsEvent::DumpStart) || start_dump(&socket).is_err() {
                    report(NsEvent::Failed(
                        "re-dumping after an overflow failed".into(),
                    ));
                    return;
                }
            }
            continue;
        }
        let mut forward = Vec::new();
        let mut after = Vec::new();
        for m in decode::parse_datagram(&buf) {
            match m {
                Message::Done { seq, intr } if Some(seq) == dumping => {
                    redo |= intr;
                    if seq == SEQ_LINKS {
                        dumping = Some(SEQ_ADDRS);
                        if let Err(e) =
                            send(socket.get_ref(), &decode::addr_dump_request(SEQ_ADDRS))
                        {
                            report(NsEvent::Failed(format!("dumping addresses: {e}")));
                            return;
                        }
                    } else if redo {
                        redo = false;
                        dumping = Some(SEQ_LINKS);
                        after.push(NsEvent::DumpStart);
                        if start_dump(&socket).is_err() {
                            report(NsEvent::Failed("re-dumping failed".into()));
                            return;
                        }
                    } else {
                        dumping = None;
                        after.push(NsEvent::DumpDone);
                    }
                }
                Message::Error { seq, errno } if Some(seq) == dumping => {
                    report(NsEvent::Failed(format!(
                        "the dump failed: {}",
                        io::Error::from_raw_os_error(errno)
                    )));
                    return;
                }
                Message::Nsid { seq: SEQ_NSID, id } => {
                    if id >= 0 {
                        after.push(NsEvent::OwnNsid(id));
                    } else {
                        nsid_asked = false;
                    }
                }
                Message::Error { seq: SEQ_NSID, .. } => nsid_asked = false,
                Message::Link {
                    ref link,
                    intr,
                    seq,
                } => {
                    redo |= intr && Some(seq) == dumping;
                    if link.kind.is_some() && link.parent_netnsid.is_some() && !nsid_asked {
                        nsid_asked = true;
                        if let Err(e) =
                            send(socket.get_ref(), &decode::nsid_request(own_fd, SEQ_NSID))
                        {
                            log::debug!("asking a namespace's nsid for ours: {e}");
                            nsid_asked = false;
                        }
                    }
                    forward.push(m);
                }
                Message::Addr { intr, seq, .. } => {
                    redo |= intr && Some(seq) == dumping;
                    forward.push(m);
                }
                Message::LinkGone { .. } | Message::AddrGone { .. } => forward.push(m),
                Message::Undecodable { reason } => {
                    log::debug!("skipping an undecodable link or address message: {reason}")
                }
                _ => {}
            }
        }
        if !forward.is_empty() && !report(NsEvent::Messages(forward)) {
            return;
        }
        for ev in after {
            if !report(ev) {
                return;
            }
        }
    }
}
