//! Loads the flowguard eBPF object for `BPF_PROG_TEST_RUN` tests and
//! benchmarks: every program loaded (never attached), typed access to the
//! maps, and helpers to run a program on one frame.
//!
//! Each [`Guard`] is its own `aya::Ebpf` instance, so its maps start empty.

use std::{path::PathBuf, time::Duration};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, SchedClassifier, Xdp},
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
};
use flowguard_common::{
    map_names, mode, program_names, source, Config, Counters, Endpoint, EndpointKey, Event, OwnMac,
    Port, V4Prefix, V6Prefix, MAX_ARRAY_SLOTS, MAX_OWN_MACS, MAX_V4_PREFIXES, MAX_V6_PREFIXES,
};
use flowguard_user::endpoints::{EndpointMaps, EndpointStore as _};

/// `XDP_PASS` from `enum xdp_action`.
pub const XDP_PASS: u32 = 2;
/// `TC_ACT_OK` from `linux/pkt_cls.h`.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_REDIRECT` from `linux/pkt_cls.h` (what `bpf_redirect` returns).
pub const TC_ACT_REDIRECT: u32 = 7;

/// Baseline program names (empty programs, for the benchmark).
pub const BENCH_EMPTY_XDP: &str = "bench_empty_xdp";
pub const BENCH_EMPTY_TC: &str = "bench_empty_tc";
/// The guard in fix mode with the stale MAC put back after it, and the
/// putting back alone (for the benchmark's stale-fix rows).
pub const BENCH_FIX_XDP: &str = "bench_fix_xdp";
pub const BENCH_BACK_XDP: &str = "bench_back_xdp";
pub const BENCH_FIX_TC: &str = "bench_fix_tc";
pub const BENCH_BACK_TC: &str = "bench_back_tc";

/// Where the eBPF object is: `$FLOWGUARD_EBPF_OBJ`, else the path the
/// workspace's eBPF build writes it to.
pub fn object_path() -> PathBuf {
    match std::env::var_os("FLOWGUARD_EBPF_OBJ") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("target/bpf/bpfel-unknown-none/release/flowguard"),
    }
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    p.canonicalize().unwrap_or(p)
}

/// The programs of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prog {
    /// `flowguard_xdp`.
    Xdp,
    /// `flowguard_tc`.
    Tc,
    /// `flowguard_tc_learn`.
    TcLearn,
    /// `bench_empty_xdp`.
    EmptyXdp,
    /// `bench_empty_tc`.
    EmptyTc,
    /// `bench_fix_xdp`.
    FixXdp,
    /// `bench_back_xdp`.
    BackXdp,
    /// `bench_fix_tc`.
    FixTc,
    /// `bench_back_tc`.
    BackTc,
}

impl Prog {
    pub const ALL: [Prog; 9] = [
        Prog::Xdp,
        Prog::Tc,
        Prog::TcLearn,
        Prog::EmptyXdp,
        Prog::EmptyTc,
        Prog::FixXdp,
        Prog::BackXdp,
        Prog::FixTc,
        Prog::BackTc,
    ];

    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            Prog::Xdp => program_names::XDP_GUARD,
            Prog::Tc => program_names::TC_GUARD,
            Prog::TcLearn => program_names::TC_LEARN,
            Prog::EmptyXdp => BENCH_EMPTY_XDP,
            Prog::EmptyTc => BENCH_EMPTY_TC,
            Prog::FixXdp => BENCH_FIX_XDP,
            Prog::BackXdp => BENCH_BACK_XDP,
            Prog::FixTc => BENCH_FIX_TC,
            Prog::BackTc => BENCH_BACK_TC,
        }
    }

    pub fn is_xdp(self) -> bool {
        matches!(
            self,
            Prog::Xdp | Prog::EmptyXdp | Prog::FixXdp | Prog::BackXdp
        )
    }

    /// The return value that lets the frame go on (XDP_PASS or TC_ACT_OK).
    pub fn pass_value(self) -> u32 {
        if self.is_xdp() {
            XDP_PASS
        } else {
            TC_ACT_OK
        }
    }
}

/// A loaded program's size in the kernel (0 where the kernel does not say).
#[derive(Clone, Copy, Debug)]
pub struct Footprint {
    pub xlated: u32,
    pub jited: u32,
    pub verified_insns: u32,
}

/// What one test run gave back.
#[derive(Clone, Debug)]
pub struct RunOutput {
    /// The program's return value.
    pub ret: u32,
    /// The frame as the program left it.
    pub data: Vec<u8>,
    /// The kernel's duration (per repeat).
    pub duration: Duration,
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The errno of a failed test run (for example `EINVAL` for a frame the
/// kernel's test_run refuses), if the error came from the syscall.
pub fn errno(e: &Error) -> Option<i32> {
    match e.downcast_ref::<ProgramError>()? {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// One loaded instance of the object, with its maps.
pub struct Guard {
    ebpf: Ebpf,
    config: Array<MapData, Config>,
    /// The endpoint maps, written where the last configuration set puts
    /// each endpoint (as the daemon does).
    endpoints: EndpointMaps<MapData, MapData>,
    counters: PerCpuArray<MapData, Counters>,
    events: RingBuf<MapData>,
    ports: HashMap<MapData, u32, Port>,
}

impl Guard {
    /// Loads the object from [`object_path`] and every program in it.
    pub fn load() -> Result<Self> {
        let path = object_path();
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "reading the eBPF object {} (build it first, or set FLOWGUARD_EBPF_OBJ): {e}",
                path.display()
            )
        })?;
        Self::load_bytes(&bytes)
    }

    /// Loads the object from memory and every program in it. The
    /// direct-indexed array gets every slot it may have.
    pub fn load_bytes(bytes: &[u8]) -> Result<Self> {
        Self::load_bytes_with(bytes, None)
    }

    /// Loads the object from [`object_path`] with room for `max_endpoints`
    /// entries in the hash map (the daemon's `--max-endpoints`), so that a
    /// test can fill it quickly.
    pub fn load_with_hash_capacity(max_endpoints: u32) -> Result<Self> {
        let path = object_path();
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("reading the eBPF object {}: {e}", path.display()))?;
        Self::load_bytes_with(&bytes, Some(max_endpoints))
    }

    fn load_bytes_with(bytes: &[u8], max_endpoints: Option<u32>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(map_names::ENDPOINTS_V4, MAX_ARRAY_SLOTS);
        if let Some(n) = max_endpoints {
            loader.map_max_entries(map_names::ENDPOINTS, n);
        }
        let mut ebpf = loader.load(bytes)?;
        for prog in Prog::ALL {
            let p = ebpf
                .program_mut(prog.name())
                .ok_or_else(|| format!("program {} not in the object", prog.name()))?;
            let res = if prog.is_xdp() {
                <&mut Xdp>::try_from(p)?.load()
            } else {
                <&mut SchedClassifier>::try_from(p)?.load()
            };
            res.map_err(|e| format!("loading {}: {e:?}", prog.name()))?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| format!("map {name} not in the object"))
        };
        let config = Array::try_from(take(map_names::CONFIG)?)?;
        let endpoints = EndpointMaps {
            hash: HashMap::try_from(take(map_names::ENDPOINTS)?)?,
            v4: Some(Array::try_from(take(map_names::ENDPOINTS_V4)?)?),
            config: Config::default(),
        };
        let counters = PerCpuArray::try_from(take(map_names::COUNTERS)?)?;
        let events = RingBuf::try_from(take(map_names::EVENTS)?)?;
        let ports = HashMap::try_from(take(map_names::PORTS)?)?;
        Ok(Self {
            ebpf,
            config,
            endpoints,
            counters,
            events,
            ports,
        })
    }

    /// What the kernel made of `prog`: its size translated (after the
    /// verifier's rewrites) and JITed, in bytes, and the instructions the
    /// verifier processed to accept it (bpf_prog_info).
    pub fn footprint(&self, prog: Prog) -> Result<Footprint> {
        let info = self
            .ebpf
            .program(prog.name())
            .ok_or_else(|| format!("program {} not in the object", prog.name()))?
            .info()?;
        Ok(Footprint {
            xlated: info.size_translated().unwrap_or(0),
            jited: info.size_jitted(),
            verified_insns: info.verified_instruction_count().unwrap_or(0),
        })
    }

    /// The kernel's HZ, measured with the object's jiffies probe.
    pub fn hz(&mut self) -> Result<u32> {
        Ok(flowguard_user::loader::kernel_hz(&mut self.ebpf)?)
    }

    /// Writes the configuration (element 0 of CONFIG). Endpoints written
    /// from now on go where it puts them; those already written stay.
    pub fn set_config(&mut self, cfg: &Config) -> Result<()> {
        self.config.set(0, cfg, 0)?;
        self.endpoints.config = *cfg;
        Ok(())
    }

    /// Reads the configuration back.
    pub fn config(&self) -> Result<Config> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Inserts or replaces an endpoint (in the array or the hash map, as
    /// the configuration says).
    pub fn insert_endpoint(&mut self, key: EndpointKey, ep: &Endpoint) -> Result<()> {
        self.endpoints.insert(key, *ep)?;
        Ok(())
    }

    /// Removes an endpoint.
    pub fn remove_endpoint(&mut self, key: &EndpointKey) -> Result<()> {
        self.endpoints.remove(key)?;
        Ok(())
    }

    /// The endpoint stored under `key`, if any.
    pub fn endpoint(&self, key: &EndpointKey) -> Option<Endpoint> {
        self.endpoints.get(key).ok().flatten()
    }

    /// Every endpoint in the maps.
    pub fn endpoints(&self) -> Result<Vec<(EndpointKey, Endpoint)>> {
        Ok(self.endpoints.entries()?)
    }

    /// The hash map's entries alone (the array's are not in it).
    pub fn hash_entries(&self) -> Result<Vec<(EndpointKey, Endpoint)>> {
        Ok(self
            .endpoints
            .hash
            .iter()
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Entries in the hash map alone.
    pub fn hash_len(&self) -> usize {
        self.endpoints.hash_len()
    }

    /// The raw value of slot `i` of the direct-indexed array.
    pub fn slot(&self, i: u32) -> Result<Endpoint> {
        let v4 = self.endpoints.v4.as_ref().expect("loaded with the array");
        Ok(v4.get(&i, 0)?)
    }

    /// The counters, summed over all CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let per_cpu = self.counters.get(&0, 0)?;
        let mut sum = Counters::default();
        for c in per_cpu.iter() {
            sum.add(c);
        }
        Ok(sum)
    }

    /// Takes every event waiting in the ring buffer. Panics on a record that
    /// is not exactly one `Event`: that is a layout mismatch between the sides.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            let bytes: &[u8] = &item;
            assert_eq!(
                bytes.len(),
                std::mem::size_of::<Event>(),
                "ring buffer record of {} bytes, expected one Event",
                bytes.len()
            );
            out.push(bytemuck::pod_read_unaligned::<Event>(bytes));
        }
        out
    }

    /// Puts a bridge port into the PORTS map (the daemon writes every port
    /// of the followed bridges there).
    pub fn set_port(&mut self, ifindex: u32, port: Port) -> Result<()> {
        self.ports.insert(ifindex, port, 0)?;
        Ok(())
    }

    /// Runs `prog` once on `frame`.
    pub fn run(&self, prog: Prog, frame: &[u8]) -> Result<RunOutput> {
        self.run_repeat(prog, frame, 1)
    }

    /// Runs the tc program `prog` once on `frame` as if on the egress of
    /// the interface `ifindex` (`__sk_buff.ifindex` in the context; the
    /// kernel requires that interface to exist in the calling thread's
    /// network namespace).
    pub fn run_tc_at(&self, prog: Prog, frame: &[u8], ifindex: u32) -> Result<RunOutput> {
        assert!(!prog.is_xdp(), "run_tc_at runs tc programs");
        // __sk_buff up to and including `ifindex` (offset 40); the kernel
        // requires every other field it reads from the context to be 0.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..Default::default()
        };
        let p = self
            .ebpf
            .program(prog.name())
            .ok_or_else(|| format!("program {} not in the object", prog.name()))?;
        let res = <&SchedClassifier>::try_from(p)?.test_run(opts)?;
        out.truncate(res.data_size_out as usize);
        Ok(RunOutput {
            ret: res.return_value,
            data: out,
            duration: res.duration,
        })
    }

    /// Runs `prog` on `frame`, `repeat` times in the kernel (on one buffer:
    /// the output is the frame after the last run).
    pub fn run_repeat(&self, prog: Prog, frame: &[u8], repeat: u32) -> Result<RunOutput> {
        // Room for programs that grow the frame; none of ours do.
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let p = self
            .ebpf
            .program(prog.name())
            .ok_or_else(|| format!("program {} not in the object", prog.name()))?;
        let res = if prog.is_xdp() {
            <&Xdp>::try_from(p)?.test_run(opts)
        } else {
            <&SchedClassifier>::try_from(p)?.test_run(opts)
        }?;
        out.truncate(res.data_size_out as usize);
        Ok(RunOutput {
            ret: res.return_value,
            data: out,
            duration: res.duration,
        })
    }
}

/// Whether the kernel's test_run itself may refuse this frame (EINVAL)
/// before the program sees it. XDP and skb: fewer than ETH_HLEN (14)
/// bytes (`bpf_test_init`). skb (tc) on this machine's kernel (6.18), as
/// observed: also an untagged frame whose ethertype is IPv4 with fewer than
/// 20 bytes after the Ethernet header, or IPv6 with fewer than 40 (test_run
/// builds a socket from the IP header). Tagged frames, ARP and others are
/// accepted from 14 bytes on. Every other length must run.
pub fn kernel_may_refuse(prog: Prog, frame: &[u8]) -> bool {
    if frame.len() < crate::frames::ETH_HLEN {
        return true;
    }
    if prog.is_xdp() {
        return false;
    }
    let l3 = frame.len() - crate::frames::ETH_HLEN;
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => l3 < 20,
        0x86dd => l3 < 40,
        _ => false,
    }
}

/// An IPv4 prefix as the program compares it: `addr & mask == prefix`, both
/// words as a native load of the network-order bytes gives them. Its
/// endpoints are in the hash map.
pub fn v4_prefix(octets: [u8; 4], len: u32) -> V4Prefix {
    assert!(len <= 32, "IPv4 prefix length {len}");
    let mask_be: u32 = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let mask = u32::from_ne_bytes(mask_be.to_be_bytes());
    V4Prefix {
        addr: u32::from_ne_bytes(octets) & mask,
        mask,
        slot_base: 0,
        slots: 0,
    }
}

/// An IPv4 prefix whose endpoints are in the direct-indexed array, from
/// slot `slot_base` on (one slot per address).
pub fn v4_array_prefix(octets: [u8; 4], len: u32, slot_base: u32) -> V4Prefix {
    let slots = 1u32 << (32 - len);
    assert!(slot_base + slots <= MAX_ARRAY_SLOTS, "array prefix /{len}");
    V4Prefix {
        slot_base,
        slots,
        ..v4_prefix(octets, len)
    }
}

/// An IPv6 prefix as the program compares it, word by word.
pub fn v6_prefix(octets: [u8; 16], len: u32) -> V6Prefix {
    assert!(len <= 128, "IPv6 prefix length {len}");
    let mask_be: u128 = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    let mask_key = EndpointKey::from_v6_bytes(mask_be.to_be_bytes());
    let addr_key = EndpointKey::from_v6_bytes(octets);
    let mut p = V6Prefix {
        addr: [0; 4],
        mask: mask_key.addr,
    };
    for i in 0..4 {
        p.addr[i] = addr_key.addr[i] & p.mask[i];
    }
    p
}

/// A configuration with these prefixes and own MACs, observe or fix mode.
pub fn config(
    fix: bool,
    v4: &[V4Prefix],
    v6: &[V6Prefix],
    own_macs: &[[u8; 6]],
    event_interval_jiffies: u64,
) -> Config {
    assert!(v4.len() <= MAX_V4_PREFIXES && v6.len() <= MAX_V6_PREFIXES);
    assert!(own_macs.len() <= MAX_OWN_MACS);
    let mut cfg = Config {
        mode: if fix { mode::FIX } else { mode::OBSERVE },
        v4_count: v4.len() as u32,
        v6_count: v6.len() as u32,
        own_mac_count: own_macs.len() as u32,
        event_interval_jiffies,
        ..Config::default()
    };
    cfg.v4[..v4.len()].copy_from_slice(v4);
    cfg.v6[..v6.len()].copy_from_slice(v6);
    for (slot, mac) in cfg.own_macs.iter_mut().zip(own_macs) {
        *slot = OwnMac {
            mac: *mac,
            _pad: [0; 2],
        };
    }
    cfg
}

/// An endpoint with this MAC, given by the operator (a static endpoint:
/// neighbour-table endpoints are checked against the kernel's neighbour
/// table, which tests of their own set up).
pub fn endpoint(mac: [u8; 6]) -> Endpoint {
    Endpoint {
        mac,
        source: source::STATIC,
        ..Endpoint::default()
    }
}
