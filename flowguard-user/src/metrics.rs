//! `flowguard run --metrics ADDR`: the counters and the per-endpoint evidence
//! of `flowguard status`, in the Prometheus text format (0.0.4), served by a
//! tiny HTTP/1.1 responder on an opt-in, normally loopback, address.
//!
//! Only `GET /metrics` (and `HEAD`) is answered; anything else gets 404 or
//! 405. Each connection is served by a task of its own, bounded in time and
//! request size, and at most [`MAX_CONNECTIONS`] are served at once: when
//! all are taken, the oldest one still waiting for its request is closed to
//! make room, so idle connections (however many are held open) never keep
//! a scrape out, and a slow or malformed client never holds up the agent.

use std::{
    fmt::Write as _,
    io,
    net::{SocketAddr, TcpListener as StdTcpListener},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};

use crate::status::{self, CounterTotals, Status};

/// The media type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The only path served.
pub const PATH: &str = "/metrics";
/// The longest request head (request line and headers) read from a client.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long one connection may take, from accept to the last byte written.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; past this, the oldest idle one is closed.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {error}")]
    Bind { addr: SocketAddr, error: io::Error },
}

// ---------------------------------------------------------------------------
// The exposition format

/// The global counters: name (without `flowguard_` and `_total`), help, value.
type CounterFamily = (&'static str, &'static str, fn(&CounterTotals) -> u64);

const COUNTERS: &[CounterFamily] = &[
    ("checked", "Unicast frames inside the watched prefixes that were looked up.", |c| c.kernel.checked),
    ("stale", "Frames to a known endpoint with a stale destination MAC.", |c| c.kernel.stale),
    ("rewritten", "Stale frames whose destination MAC was rewritten (fix mode).", |c| c.kernel.rewritten),
    (
        "ambiguous",
        "Stale frames left untouched because the endpoint is ambiguous or its MAC unusable.",
        |c| c.kernel.ambiguous,
    ),
    (
        "unconfirmed",
        "Frames to a neighbour-table endpoint with another MAC, left untouched because the kernel's neighbour table did not confirm them stale.",
        |c| c.kernel.unconfirmed,
    ),
    ("events", "Events sent by the kernel side to user space.", |c| c.kernel.events),
    ("events_lost", "Events lost because the ring buffer was full.", |c| c.kernel.events_lost),
    ("learned_new", "Endpoints learned for the first time.", |c| c.kernel.learned_new),
    ("learned_moved", "Learned endpoints whose MAC changed.", |c| c.kernel.learned_moved),
    ("learn_failed", "Learning attempts that failed (endpoint map full).", |c| c.kernel.learn_failed),
    (
        "wrong_port",
        "Frames to an endpoint with its current MAC that left through another port of its bridge than the bridge FDB's.",
        |c| c.kernel.wrong_port,
    ),
    ("redirected", "Of those, frames redirected to the endpoint's port (fix mode).", |c| c.kernel.redirected),
    ("neigh_added", "Neighbour entries that gave an endpoint a MAC for the first time.", |c| {
        c.user.neigh_added
    }),
    ("neigh_moved", "Neighbour entries that changed an endpoint's MAC.", |c| c.user.neigh_moved),
    (
        "neigh_removed",
        "Endpoints dropped because the kernel no longer believes in their MAC.",
        |c| c.user.neigh_removed,
    ),
    (
        "neigh_ambiguous",
        "Endpoints marked ambiguous (one IP, different MACs on different interfaces).",
        |c| c.user.neigh_ambiguous,
    ),
    (
        "neigh_overflows",
        "Neighbour event overflows answered with a fresh dump of the table.",
        |c| c.user.neigh_overflows,
    ),
    ("reconciles", "Full reconciles of the endpoint map with the neighbour table.", |c| {
        c.user.reconciles
    }),
    ("eviction_runs", "Eviction runs (one per endpoint trigger that passed debounce).", |c| {
        c.user.eviction_runs
    }),
    ("evicted", "Conntrack entries deleted.", |c| c.user.evicted),
    ("dry_run_matches", "Conntrack entries that a dry run would have deleted.", |c| {
        c.user.dry_run_matches
    }),
    ("eviction_errors", "Eviction runs that failed.", |c| c.user.eviction_errors),
    ("probes_sent", "ARP probes sent to endpoints that carry offloaded flows.", |c| {
        c.user.probes_sent
    }),
    (
        "probes_unanswered",
        "Probed endpoints that answered neither at their cached MAC nor by broadcast.",
        |c| c.user.probes_unanswered,
    ),
    ("probe_moves", "Moves found by probing (the cached MAC silent, another answering).", |c| {
        c.user.probe_moves
    }),
    ("probe_ambiguous", "Probed IPs that answered from more than one MAC.", |c| {
        c.user.probe_ambiguous
    }),
    (
        "children_added",
        "Endpoints written from a macvlan/ipvlan child of a guarded interface (new, or a new MAC).",
        |c| c.user.children_added,
    ),
    (
        "children_removed",
        "Endpoints removed because their macvlan/ipvlan child or its namespace went away.",
        |c| c.user.children_removed,
    ),
    (
        "evictions_deferred",
        "Evictions the rate limit deferred (each runs later; none is dropped).",
        |c| c.user.evictions_deferred,
    ),
    (
        "endpoints_dropped",
        "Endpoints left out because the endpoint map was full (see --max-endpoints).",
        |c| c.user.endpoints_dropped,
    ),
    (
        "port_moves",
        "Endpoints whose MAC the bridge FDB saw move to another port (their flows evicted).",
        |c| c.user.port_moves,
    ),
    (
        "port_flaps",
        "Episodes of a MAC flapping between bridge ports (not evicted while they last).",
        |c| c.user.port_flaps,
    ),
];

/// A per-endpoint counter: full name, help, value.
type EndpointFamily = (
    &'static str,
    &'static str,
    fn(&status::EndpointStatus) -> u64,
);

/// The endpoint sources that always have a `flowguard_endpoints` series.
const SOURCES: [&str; 4] = ["child", "learned", "neighbour", "static"];

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes HELP text: backslash and line feed.
pub fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `st` in the Prometheus text format 0.0.4: one counter family per global
/// counter, the endpoints by source, and two counters per endpoint.
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    for (name, help, value) in COUNTERS {
        let name = format!("flowguard_{name}_total");
        family(&mut out, &name, "counter", help);
        let _ = writeln!(out, "{name} {}", value(&st.counters));
    }

    family(
        &mut out,
        "flowguard_endpoints",
        "gauge",
        "Endpoints known, by where their current MAC comes from.",
    );
    let mut by_source: Vec<(&str, u64)> = SOURCES.iter().map(|s| (*s, 0)).collect();
    for e in &st.endpoints {
        match by_source.iter_mut().find(|(s, _)| *s == e.source) {
            Some((_, n)) => *n += 1,
            None => by_source.push((e.source, 1)),
        }
    }
    by_source.sort();
    for (source, n) in by_source {
        let _ = writeln!(
            out,
            "flowguard_endpoints{{source=\"{}\"}} {n}",
            escape_label_value(source)
        );
    }

    let per_endpoint: [EndpointFamily; 3] = [
        (
            "flowguard_endpoint_stale_packets_total",
            "Frames to this endpoint that carried a stale destination MAC.",
            |e| e.stale_packets,
        ),
        (
            "flowguard_endpoint_rewritten_total",
            "Frames to this endpoint whose stale destination MAC was rewritten.",
            |e| e.rewritten,
        ),
        (
            "flowguard_endpoint_wrong_port_total",
            "Frames to this endpoint with its MAC that left through another bridge port than the bridge FDB's.",
            |e| u64::from(e.wrong_port),
        ),
    ];
    for (name, help, value) in per_endpoint {
        family(&mut out, name, "counter", help);
        for e in &st.endpoints {
            let _ = writeln!(
                out,
                "{name}{{ip=\"{}\",mac=\"{}\"}} {}",
                escape_label_value(&e.ip),
                escape_label_value(&e.mac),
                value(e)
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The HTTP side

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Route {
    /// `GET /metrics` (with `head_only` for `HEAD`).
    Metrics {
        head_only: bool,
    },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes a request head (the bytes up to the blank line).
pub fn route(head: &[u8]) -> Route {
    let Ok(head) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if method.is_empty() || target.is_empty() || !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == PATH {
        Route::Metrics { head_only }
    } else {
        Route::NotFound
    }
}

/// Where the blank line that ends a request head is, if it has arrived.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn plain(status: &str, body: &str) -> Vec<u8> {
    response(status, "text/plain; charset=utf-8", body, false)
}

/// Reads one request head, at most [`MAX_REQUEST`] bytes. `Ok(None)`: the
/// client closed without sending anything.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Result<Vec<u8>, ()>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok((!buf.is_empty()).then_some(Err(())));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(Ok(buf)));
        }
        if buf.len() >= MAX_REQUEST {
            return Ok(Some(Err(())));
        }
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    pin_dir: Arc<Path>,
    idle: Arc<IdleConnections>,
    id: u64,
) -> io::Result<()> {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await;
    // From here on the connection is busy, not evictable.
    idle.forget(id);
    let head = head.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request head"))?;
    let reply = match head? {
        None => return Ok(()),
        Some(Err(())) => plain("400 Bad Request", "bad or oversized request\n"),
        Some(Ok(head)) => match route(&head) {
            Route::Metrics { head_only } => {
                let dir = pin_dir.clone();
                // Reading the maps is a few syscalls per endpoint: off the
                // agent's thread.
                match tokio::task::spawn_blocking(move || status::read(&dir)).await {
                    Ok(Ok(st)) => response("200 OK", CONTENT_TYPE, &render(&st), head_only),
                    Ok(Err(e)) => plain("503 Service Unavailable", &format!("{e}\n")),
                    Err(e) => plain("500 Internal Server Error", &format!("{e}\n")),
                }
            }
            Route::NotFound => plain("404 Not Found", "only /metrics is served here\n"),
            Route::MethodNotAllowed => plain("405 Method Not Allowed", "only GET /metrics\n"),
            Route::BadRequest => plain("400 Bad Request", "bad request\n"),
        },
    };
    stream.write_all(&reply).await?;
    // Our side is done (FIN after the response).
    stream.shutdown().await?;
    // Read what the client still sends until it closes (bounded), so that
    // closing with unread bytes does not reset the connection under the
    // response.
    let mut sink = [0u8; 1024];
    let drain = async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    Ok(())
}

/// The connections still waiting for their request head, oldest first:
/// those that can be closed to make room for a new one.
#[derive(Default)]
struct IdleConnections {
    waiting: std::sync::Mutex<std::collections::BTreeMap<u64, tokio::task::AbortHandle>>,
}

impl IdleConnections {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, tokio::task::AbortHandle>> {
        // A panic while holding it leaves the map usable: ignore the poison.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes the oldest idle connection; false when every one is busy.
    fn close_oldest(&self) -> bool {
        match self.lock().pop_first() {
            Some((_, task)) => {
                task.abort();
                true
            }
            None => false,
        }
    }
}

/// Takes a connection slot, closing the oldest idle connection if all are
/// taken; `None` when every connection is busy answering.
async fn take_slot(
    slots: &Arc<Semaphore>,
    idle: &IdleConnections,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    if !idle.close_oldest() {
        return None;
    }
    // The aborted task gives its slot back when the runtime drops it.
    tokio::time::timeout(Duration::from_secs(1), slots.clone().acquire_owned())
        .await
        .ok()?
        .ok()
}

async fn accept_loop(listener: TcpListener, pin_dir: Arc<Path>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let idle = Arc::new(IdleConnections::default());
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or a similar passing trouble.
                log::warn!("metrics: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Some(slot) = take_slot(&slots, &idle).await else {
            log::debug!("metrics: {peer}: every connection is busy answering, closed");
            continue;
        };
        let dir = pin_dir.clone();
        let id = next_id;
        next_id += 1;
        let mine = idle.clone();
        // Registered under a lock taken before the spawn, so that the task
        // cannot forget itself before it is known.
        let mut waiting = idle.lock();
        let task = tokio::spawn(async move {
            let served = serve_connection(stream, dir, mine.clone(), id);
            match tokio::time::timeout(CONNECTION_TIMEOUT, served).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("metrics: {peer}: {e}"),
                Err(_) => log::debug!("metrics: {peer}: timed out, closed"),
            }
            mine.forget(id);
            drop(slot);
        });
        waiting.insert(id, task.abort_handle());
        drop(waiting);
    }
}

/// The bound metrics listener, ready to serve once the agent runs. Binding
/// happens before anything is attached, so that a port in use fails early.
#[derive(Clone, Debug)]
pub struct Server {
    listener: Arc<StdTcpListener>,
    addr: SocketAddr,
    pin_dir: PathBuf,
}

impl Server {
    /// Binds `addr`; the scrapes read the maps pinned under `pin_dir`.
    pub fn bind(addr: SocketAddr, pin_dir: &Path) -> Result<Self, MetricsError> {
        let bind_err = |error| MetricsError::Bind { addr, error };
        let listener = StdTcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(Self {
            listener: Arc::new(listener),
            addr,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// The address bound (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where Prometheus scrapes.
    pub fn url(&self) -> String {
        format!("http://{}{PATH}", self.addr)
    }

    /// Starts serving on the current tokio runtime; serving stops when the
    /// returned task is dropped.
    pub fn spawn(&self) -> io::Result<ServerTask> {
        let listener = TcpListener::from_std(self.listener.try_clone()?)?;
        let pin_dir: Arc<Path> = Arc::from(self.pin_dir.as_path());
        Ok(ServerTask(tokio::spawn(accept_loop(listener, pin_dir))))
    }
}

/// The serving task; dropping it stops accepting connections.
#[derive(Debug)]
pub struct ServerTask(JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::status::EndpointStatus;
    use flowguard_common::{Counters, UserCounters};

    fn endpoint(ip: &str, mac: &str, source: &'static str, stale: u64) -> EndpointStatus {
        EndpointStatus {
            ip: ip.into(),
            mac: mac.into(),
            source,
            age_secs: None,
            stale_packets: stale,
            rewritten: stale / 2,
            last_stale_mac: None,
            last_stale_secs_ago: None,
            ambiguous: false,
            port: None,
            wrong_port: stale as u32 + 1,
        }
    }

    fn sample_status() -> Status {
        Status {
            pin_dir: "/sys/fs/bpf/flowguard".into(),
            mode: "fix",
            counters: CounterTotals {
                kernel: Counters {
                    checked: 100,
                    stale: 7,
                    rewritten: 6,
                    ..Counters::default()
                },
                user: UserCounters {
                    evicted: 3,
                    ..UserCounters::default()
                },
            },
            endpoints: vec![
                endpoint("192.168.1.240", "02:42:c0:a8:01:0b", "learned", 7),
                endpoint("192.168.1.250", "02:42:c0:a8:01:0c", "neighbour", 0),
                endpoint("fd00::1", "02:00:00:00:00:01", "neighbour", 0),
            ],
            running: true,
            pid: 1,
            eviction_queue: 0,
            endpoint_capacity: 16_384,
            endpoint_map_full: false,
            interfaces: Vec::new(),
            hashed_prefixes: Vec::new(),
        }
    }

    /// Every sample line as (series, value).
    fn samples(text: &str) -> HashMap<String, String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("series and value");
                (series.to_string(), value.to_string())
            })
            .collect()
    }

    #[test]
    fn counters_endpoints_and_evidence_are_exposed() {
        let text = render(&sample_status());
        let s = samples(&text);
        assert_eq!(s["flowguard_checked_total"], "100");
        assert_eq!(s["flowguard_stale_total"], "7");
        assert_eq!(s["flowguard_rewritten_total"], "6");
        assert_eq!(s["flowguard_evicted_total"], "3");
        assert_eq!(s["flowguard_eviction_errors_total"], "0");
        assert_eq!(s["flowguard_endpoints{source=\"learned\"}"], "1");
        assert_eq!(s["flowguard_endpoints{source=\"neighbour\"}"], "2");
        assert_eq!(s["flowguard_endpoints{source=\"static\"}"], "0");
        assert_eq!(s["flowguard_endpoints{source=\"child\"}"], "0");
        assert_eq!(
            s["flowguard_endpoint_stale_packets_total{ip=\"192.168.1.240\",mac=\"02:42:c0:a8:01:0b\"}"],
            "7"
        );
        assert_eq!(
            s["flowguard_endpoint_rewritten_total{ip=\"192.168.1.240\",mac=\"02:42:c0:a8:01:0b\"}"],
            "3"
        );
        assert!(s.contains_key(
            "flowguard_endpoint_stale_packets_total{ip=\"fd00::1\",mac=\"02:00:00:00:00:01\"}"
        ));
        assert_eq!(
            s["flowguard_endpoint_wrong_port_total{ip=\"192.168.1.240\",mac=\"02:42:c0:a8:01:0b\"}"],
            "8"
        );
        assert!(text.ends_with('\n'), "the last line ends with a line feed");
        // One sample per counter, one per source, three per endpoint.
        assert_eq!(s.len(), COUNTERS.len() + SOURCES.len() + 3 * 3);
    }

    #[test]
    fn every_status_counter_is_a_family() {
        let json = serde_json::to_value(CounterTotals::default()).unwrap();
        let text = render(&sample_status());
        for name in json.as_object().unwrap().keys() {
            let family = format!("flowguard_{name}_total");
            assert!(
                text.contains(&format!("\n{family} "))
                    || text.starts_with(&format!("# HELP {family} ")),
                "{family} missing"
            );
        }
    }

    #[test]
    fn help_and_type_appear_once_per_family_before_its_samples() {
        let text = render(&sample_status());
        let mut seen: Vec<String> = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(!seen.contains(&name), "HELP twice for {name}");
                seen.push(name.clone());
                current = name;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name, current, "TYPE right after its HELP");
                assert!(kind == "counter" || kind == "gauge", "{line}");
                if name.ends_with("_total") {
                    assert_eq!(kind, "counter", "{line}");
                }
            } else {
                let series = line.split(['{', ' ']).next().unwrap();
                assert_eq!(series, current, "sample {line} outside its family");
            }
        }
        assert_eq!(seen.len(), COUNTERS.len() + 4);
        assert_eq!(text.matches("# TYPE ").count(), seen.len());
    }

    #[test]
    fn families_are_complete_without_endpoints() {
        let st = Status {
            endpoints: vec![],
            ..sample_status()
        };
        let text = render(&st);
        assert!(text.contains("# TYPE flowguard_endpoint_stale_packets_total counter"));
        assert!(text.contains("flowguard_endpoints{source=\"static\"} 0"));
        assert!(!text.contains("{ip="));
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("x\ny"), "x\\ny");
        assert_eq!(escape_label_value("fe80::1%eth0"), "fe80::1%eth0");
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
        let st = Status {
            endpoints: vec![endpoint("odd\"ip\\\n", "m", "weird\"source", 1)],
            ..sample_status()
        };
        let text = render(&st);
        assert!(
            text.contains(
                "flowguard_endpoint_stale_packets_total{ip=\"odd\\\"ip\\\\\\n\",mac=\"m\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("flowguard_endpoints{source=\"weird\\\"source\"} 1"));
        assert_eq!(text.lines().count(), text.matches('\n').count());
    }

    #[test]
    fn routes() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            r("GET /metrics?name[]=x HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            r("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metricsx HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(r("DELETE / HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        for bad in [
            "",
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\n\r\n",
            "GET /metrics SPDY/3\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(r(bad), Route::BadRequest, "{bad:?}");
        }
        assert_eq!(route(b"GET /\xff HTTP/1.1\r\n\r\n"), Route::BadRequest);
    }

    #[test]
    fn head_ends_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn responses_have_a_length_and_close() {
        let r = String::from_utf8(response("200 OK", CONTENT_TYPE, "abc\n", false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(r.contains("Content-Length: 4\r\n") && r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\nabc\n"));
        let head = String::from_utf8(response("200 OK", CONTENT_TYPE, "abc\n", true)).unwrap();
        assert!(head.contains("Content-Length: 4\r\n") && head.ends_with("\r\n\r\n"));
        let r = String::from_utf8(plain("405 Method Not Allowed", "x")).unwrap();
        assert!(r.contains("Allow: GET, HEAD\r\n"));
    }

    /// The whole responder on a real loopback socket (no root: the maps are
    /// missing, so /metrics answers 503 with the reason).
    #[test]
    fn serves_over_tcp_and_a_silent_client_blocks_nobody() {
        use std::io::{Read, Write};
        let server =
            Server::bind("127.0.0.1:0".parse().unwrap(), Path::new("/nonexistent/fg")).unwrap();
        assert!(
            server.url().starts_with("http://127.0.0.1:") && server.url().ends_with("/metrics")
        );
        let addr = server.local_addr();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fetch = move |request: &'static str| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(request.as_bytes()).unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            })
        };
        rt.block_on(async {
            let _task = server.spawn().unwrap();
            // Holds a slot and says nothing.
            let silent = std::net::TcpStream::connect(addr).unwrap();
            let wait = |h: std::thread::JoinHandle<String>| async move {
                tokio::task::spawn_blocking(move || h.join().unwrap())
                    .await
                    .unwrap()
            };
            let not_found = wait(fetch("GET / HTTP/1.1\r\n\r\n")).await;
            assert!(not_found.starts_with("HTTP/1.1 404 "), "{not_found}");
            let post = wait(fetch("POST /metrics HTTP/1.1\r\n\r\n")).await;
            assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
            let unavailable = wait(fetch("GET /metrics HTTP/1.1\r\n\r\n")).await;
            assert!(unavailable.starts_with("HTTP/1.1 503 "), "{unavailable}");
            assert!(
                unavailable.contains("no flowguard is running"),
                "{unavailable}"
            );
            let huge: &'static str = Box::leak(
                format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST)).into_boxed_str(),
            );
            let too_big = wait(fetch(huge)).await;
            assert!(too_big.starts_with("HTTP/1.1 400 "), "{too_big}");
            drop(silent);
        });
    }
}
