//! The load run: simulated nodes registering, heartbeating and looking each
//! other up against one or more backbones on loopback.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshtun_addr::{MeshAddr, NetworkId};
use meshtun_proto::{Identity, Message, NodeRecord, Query, RejectCode, SignedRecord};

use crate::hist::Hist;
use crate::{net, procstat};

/// Where the backbones come from.
#[derive(Clone, Debug)]
pub enum Backbones {
    /// Start `count` `meshtun backbone` processes on loopback.
    Spawn { bin: PathBuf, count: usize, ttl_secs: u64, state_dir: Option<PathBuf>, extra_args: Vec<String> },
    /// Use running backbones (pids for CPU and RSS figures, if known).
    External { addrs: Vec<SocketAddr>, pids: Vec<u32> },
}

#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    /// Distinct identities (default: one per node). With fewer, node `k`
    /// uses identity `k % identities` in network `k / identities`: network
    /// 0 is the public mesh, the others private networks whose owner keys
    /// the loadgen makes and passes to started backbones (each such record
    /// carries a membership certificate). Proof of work makes identities
    /// the expensive part: this reaches a million records from a few
    /// hundred thousand identities.
    pub identities: Option<usize>,
    pub seed: u64,
    /// Identity cache file (None: generate every time).
    pub cache: Option<PathBuf>,
    pub threads: usize,
    pub heartbeat: Duration,
    pub duration: Duration,
    pub lookup_rate: f64,
    /// Share of lookups by address, hostname, capability.
    pub mix: [u32; 3],
    pub sockets: usize,
    /// Registrations in flight during the initial registration phase.
    pub window: usize,
    /// Verify the signature of one lookup answer in this many (1: all).
    pub verify_every: u64,
    /// Register everything, then only hold (no heartbeats, no lookups): for RSS per record.
    pub hold: bool,
    pub backbones: Backbones,
    /// With several backbones: how many each key lives on.
    pub replicas: usize,
    /// With several backbones: kill backbone 0 this long into the steady phase.
    pub kill_at: Option<Duration>,
    /// How long a node takes to give up on a dead backbone (its request timeout).
    pub failover_after: Duration,
    pub progress: bool,
    /// Nice value for started backbones and this process (negative needs
    /// root): keeps other work on a shared machine from starving them.
    pub priority: Option<i32>,
    /// Pin started backbones to the first CPUs and the load generator to
    /// the last one, so they do not compete for a core (with more
    /// backbones than CPUs - 1 they share).
    pub pin: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 20_000,
            identities: None,
            seed: 1,
            cache: None,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            heartbeat: Duration::from_secs(25),
            duration: Duration::from_secs(30),
            lookup_rate: 1000.0,
            mix: [1, 1, 1],
            sockets: 1024,
            window: 4096,
            verify_every: 100,
            hold: false,
            backbones: Backbones::External { addrs: vec![], pids: vec![] },
            replicas: 2,
            kill_at: None,
            failover_after: Duration::from_secs(1),
            progress: true,
            priority: None,
            pin: false,
        }
    }
}

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl From<&Hist> for Latency {
    fn from(h: &Hist) -> Self {
        Latency {
            count: h.count(),
            p50_us: h.quantile_us(0.5),
            p99_us: h.quantile_us(0.99),
            p999_us: h.quantile_us(0.999),
            max_us: h.max_us(),
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BackboneFigures {
    pub addr: String,
    pub pid: Option<u32>,
    /// Share of one core over the phase (1.0 = one core busy).
    pub cpu_cores_registration: Option<f64>,
    pub cpu_cores_steady: Option<f64>,
    pub rss_baseline_bytes: Option<u64>,
    pub rss_max_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// Records this backbone holds (by the loadgen's count of accepted registrations).
    pub records: u64,
    pub rss_per_record_bytes: Option<f64>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub nodes: usize,
    pub backbones: Vec<BackboneFigures>,
    pub sockets: usize,
    pub identities_secs: f64,
    // Initial registration (as fast as the backbone acknowledges, window-limited).
    pub registration_secs: f64,
    pub registrations_per_sec: f64,
    pub registration_latency: Latency,
    pub registrations_rejected: u64,
    /// Registrations lost in the burst and sent again.
    pub registrations_retried: u64,
    /// Registrations never acknowledged, even after retries.
    pub registrations_lost: u64,
    pub reject_codes: Vec<(String, u64)>,
    // Steady phase.
    pub steady_secs: f64,
    pub heartbeats_sent: u64,
    pub heartbeats_acked: u64,
    pub heartbeats_per_sec: f64,
    pub heartbeat_latency: Latency,
    pub lookups_sent: u64,
    pub lookups_answered: u64,
    pub lookups_per_sec: f64,
    pub lookups_correct: u64,
    pub lookups_wrong: u64,
    pub lookups_rejected: u64,
    pub lookups_lost: u64,
    pub lookup_latency: Latency,
    pub lookup_latency_by_kind: [Latency; 3],
    pub signatures_checked: u64,
    pub signatures_bad: u64,
    pub intents_received: u64,
    pub loadgen_cpu_cores: f64,
    /// With --kill-at: lookups lost after the kill, and after failover.
    pub lookups_lost_after_kill: Option<u64>,
    pub lookups_answered_after_failover: Option<u64>,
    /// Registrations a new home needed after the failover, how many
    /// happened, and the last one's delay after the failover (seconds).
    pub rehome_needed: Option<u64>,
    pub rehomed: Option<u64>,
    pub rehome_secs: Option<f64>,
}

impl Report {
    /// Wrong answers, bad signatures and unexpected rejections.
    pub fn errors(&self) -> u64 {
        self.lookups_wrong + self.signatures_bad + self.lookups_rejected + self.registrations_rejected
    }
}

const KIND_REGISTER: u64 = 1;
const KIND_LOOKUP: u64 = 2; // + 0 address, 1 hostname, 2 capability
const RING: usize = 1 << 20;

fn request_id(kind: u64, index: usize, serial: u32) -> u64 {
    (kind << 60) | ((index as u64 & 0x0FFF_FFFF) << 32) | serial as u64
}

fn split_id(id: u64) -> (u64, usize, u32) {
    (id >> 60, ((id >> 32) & 0x0FFF_FFFF) as usize, id as u32)
}

/// What every simulated node is (shared by sender and receiver).
pub struct Mesh {
    pub ids: Vec<Identity>,
    /// Nodes (at least `ids.len()`); node `k` is identity `k % ids.len()`
    /// in network `k / ids.len()`.
    pub nodes: usize,
    pub owners: Vec<meshtun_proto::cert::NetworkOwner>,
    /// Membership certificates, made on first use (private networks only).
    certs: Vec<std::sync::OnceLock<meshtun_proto::cert::SignedCert>>,
    pub addrs: Vec<MeshAddr>,
    pub caps: usize,
    /// Backbones each node registers with.
    pub homes: Vec<Vec<u8>>,
    /// Where each node registers once backbone 0 is known dead: the same
    /// rendezvous placement over the survivors (only keys that were on
    /// backbone 0 move).
    pub homes_without_0: Vec<Vec<u8>>,
    /// Nodes registered at each backbone (askers for lookups sent there).
    pub residents: Vec<Vec<u32>>,
    pub backbones: Vec<SocketAddr>,
    pub replicas: usize,
    pub seed: u64,
}

pub fn hostname(k: usize) -> String {
    format!("agent-{k:07}")
}

pub fn capability(c: usize) -> String {
    format!("cap-{c:05}")
}

/// Rendezvous (highest random weight) placement of `key` on `n` backbones.
pub fn placement(key: &[u8], n: usize, replicas: usize) -> Vec<u8> {
    let mut scored: Vec<(u64, u8)> = (0..n)
        .map(|b| {
            let mut h = blake3::Hasher::new();
            h.update(key);
            h.update(&[b as u8]);
            (u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap()), b as u8)
        })
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().take(replicas.min(n).max(1)).map(|(_, b)| b).collect()
}

impl Mesh {
    pub fn new(ids: Vec<Identity>, backbones: Vec<SocketAddr>, replicas: usize, seed: u64) -> Mesh {
        let n = ids.len();
        Mesh::with_nodes(ids, n, backbones, replicas, seed)
    }

    /// The owner of private network `w` (1, 2, ...), derived from the seed.
    pub fn owner(seed: u64, w: u16) -> meshtun_proto::cert::NetworkOwner {
        let mut h = blake3::Hasher::new();
        h.update(b"loadgen network owner");
        h.update(&seed.to_le_bytes());
        h.update(&w.to_le_bytes());
        meshtun_proto::cert::NetworkOwner::generate(NetworkId(w), *h.finalize().as_bytes())
    }

    /// `--network-owner` arguments for the private networks of `nodes` nodes over `identities`.
    pub fn owner_args(seed: u64, nodes: usize, identities: usize) -> Vec<String> {
        let networks = nodes.div_ceil(identities.max(1));
        (1..networks as u16)
            .flat_map(|w| {
                let key: String = Mesh::owner(seed, w).public_key().iter().map(|b| format!("{b:02x}")).collect();
                ["--network-owner".to_string(), format!("{w}:{key}")]
            })
            .collect()
    }

    pub fn with_nodes(ids: Vec<Identity>, n: usize, backbones: Vec<SocketAddr>, replicas: usize, seed: u64) -> Mesh {
        let i = ids.len().max(1);
        let networks = n.div_ceil(i);
        let owners = (1..networks as u16).map(|w| Mesh::owner(seed, w)).collect();
        let caps = (n / 10).max(1);
        let addrs: Vec<MeshAddr> = (0..n).map(|k| ids[k % i].mesh_addr(NetworkId((k / i) as u16))).collect();
        let k = backbones.len();
        let mut homes = Vec::with_capacity(n);
        let mut homes_without_0 = Vec::with_capacity(n);
        let mut residents = vec![Vec::new(); k];
        for (i, addr) in addrs.iter().enumerate() {
            let mut h = Vec::new();
            let mut h0 = Vec::new();
            if k > 1 {
                for key in [addr.to_string(), hostname(i), capability(i % caps)] {
                    for b in placement(key.as_bytes(), k, replicas) {
                        if !h.contains(&b) {
                            h.push(b);
                        }
                    }
                    // HRW over the survivors: drop 0 and take the next.
                    let survivors: Vec<u8> = placement(key.as_bytes(), k, replicas + 1).into_iter().filter(|&b| b != 0).take(replicas).collect();
                    for b in survivors {
                        if !h0.contains(&b) {
                            h0.push(b);
                        }
                    }
                }
            } else {
                h.push(0);
            }
            for &b in &h {
                residents[b as usize].push(i as u32);
            }
            homes.push(h);
            homes_without_0.push(h0);
        }
        let certs = (0..n).map(|_| std::sync::OnceLock::new()).collect();
        Mesh { ids, nodes: n, owners, certs, addrs, caps, homes, homes_without_0, residents, backbones, replicas, seed }
    }

    pub fn len(&self) -> usize {
        self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.nodes == 0
    }

    pub fn identity(&self, k: usize) -> &Identity {
        &self.ids[k % self.ids.len()]
    }

    pub fn network(&self, k: usize) -> NetworkId {
        NetworkId((k / self.ids.len()) as u16)
    }

    /// Nodes `[lo, hi)` of node `k`'s network.
    fn network_range(&self, k: usize) -> (usize, usize) {
        let i = self.ids.len();
        let lo = k / i * i;
        (lo, (lo + i).min(self.nodes))
    }

    /// Holders of capability `c` in network `w`: its nodes `k` with `k % caps == c`.
    pub fn holders_in(&self, c: usize, w: NetworkId) -> usize {
        let i = self.ids.len();
        let (lo, hi) = (w.0 as usize * i, ((w.0 as usize + 1) * i).min(self.nodes));
        let below = |x: usize| if x > c { (x - c).div_ceil(self.caps) } else { 0 };
        below(hi) - below(lo)
    }

    /// Holders of capability `c` (public network).
    pub fn holders(&self, c: usize) -> usize {
        self.holders_in(c, NetworkId::PUBLIC)
    }

    pub fn record(&self, k: usize, socket: SocketAddr, seq: u64) -> NodeRecord {
        let id = self.identity(k);
        let network = self.network(k);
        let cert = (network != NetworkId::PUBLIC).then(|| {
            self.certs[k]
                .get_or_init(|| self.owners[network.0 as usize - 1].sign_membership(id.node_addr(), vec![], u64::MAX, k as u64))
                .clone()
        });
        let lan = std::net::SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, (k >> 16) as u8, (k >> 8) as u8, k as u8)),
            51820,
        );
        let mut wg = blake3::Hasher::new();
        wg.update(b"loadgen wg");
        wg.update(&self.seed.to_le_bytes());
        wg.update(&(k as u64).to_le_bytes());
        NodeRecord {
            network,
            node: id.node_addr(),
            identity_key: id.public_key(),
            pow_nonce: id.nonce(),
            wg_key: *wg.finalize().as_bytes(),
            endpoints: vec![lan, socket],
            hostname: Some(hostname(k)),
            capabilities: vec![capability(k % self.caps)],
            groups: vec![],
            seq,
            wg_key_version: 1,
            wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
            cert,
        }
    }

    /// The backbones that hold `key` (first alive one answers).
    fn placement_of(&self, key: &[u8]) -> Vec<u8> {
        if self.backbones.len() == 1 {
            vec![0]
        } else {
            placement(key, self.backbones.len(), self.replicas)
        }
    }
}

struct Shared {
    started: Instant,
    send_ns: Vec<AtomicU64>,
    send_tag: Vec<AtomicU32>,
    reg_sent: AtomicU64,
    reg_acked: AtomicU64,
    reg_rejected: AtomicU64,
    reject_codes: Mutex<Vec<(String, u64)>>,
    hb_phase: AtomicBool,
    lookups_sent: AtomicU64,
    lookups_answered: AtomicU64,
    lookups_correct: AtomicU64,
    lookups_wrong: AtomicU64,
    lookups_rejected: AtomicU64,
    sig_checked: AtomicU64,
    sig_bad: AtomicU64,
    intents: AtomicU64,
    unknown: AtomicU64,
    /// Accepted registrations per backbone (first time per node).
    records: Vec<AtomicU64>,
    registered: Vec<AtomicBool>,
    hists: Mutex<Hists>,
    stop: AtomicBool,
    alive: Vec<AtomicBool>,
    /// Lookups sent to a dead backbone / answered after failover.
    lost_after_kill: AtomicU64,
    answered_after_failover: AtomicU64,
    failed_over: AtomicBool,
    /// When failover happened (ns since start), and the last first-time
    /// registration at a node's new home after it (ns since start).
    failover_ns: AtomicU64,
    last_rehome_ns: AtomicU64,
    rehomed: AtomicU64,
    wrong_samples: Mutex<Vec<String>>,
}

#[derive(Default)]
struct Hists {
    reg: Hist,
    hb: Hist,
    lookup: Hist,
    by_kind: [Hist; 3],
    interval_lookup: Hist,
}

impl Shared {
    fn stamp(&self, serial: u32) {
        let slot = serial as usize % RING;
        self.send_ns[slot].store(self.started.elapsed().as_nanos() as u64, Relaxed);
        self.send_tag[slot].store(serial, Ordering::Release);
    }

    fn latency_us(&self, serial: u32) -> Option<u64> {
        let slot = serial as usize % RING;
        if self.send_tag[slot].load(Ordering::Acquire) != serial {
            return None;
        }
        let sent = self.send_ns[slot].load(Relaxed);
        Some((self.started.elapsed().as_nanos() as u64).saturating_sub(sent) / 1000)
    }
}

/// Starts backbones as asked; returns their addresses, pids and children.
fn start_backbones(b: &Backbones) -> anyhow::Result<(Vec<SocketAddr>, Vec<Option<u32>>, Vec<Child>, Option<PathBuf>)> {
    match b {
        Backbones::External { addrs, pids } => {
            let pids = (0..addrs.len()).map(|i| pids.get(i).copied()).collect();
            Ok((addrs.clone(), pids, Vec::new(), None))
        }
        Backbones::Spawn { bin, count, ttl_secs, state_dir, extra_args } => {
            anyhow::ensure!(bin.exists(), "backbone binary {} not found (build it: cargo build --release --bin meshtun)", bin.display());
            let dir = std::env::temp_dir().join(format!("meshtun-loadgen-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let mut addrs = Vec::new();
            let mut pids = Vec::new();
            let mut children = Vec::new();
            for i in 0..*count {
                let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
                let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
                let log = std::fs::File::create(dir.join(format!("backbone-{i}.log")))?;
                let mut cmd = Command::new(bin);
                cmd.args(["backbone", "--listen", &addr.to_string()])
                    .arg("--socket")
                    .arg(dir.join(format!("backbone-{i}.sock")))
                    .args(["--record-ttl", &ttl_secs.to_string()]);
                if let Some(state) = state_dir {
                    cmd.arg("--state-dir").arg(state.join(format!("backbone-{i}")));
                }
                cmd.args(extra_args)
                    .env("RUST_LOG", std::env::var("LOADGEN_BACKBONE_LOG").unwrap_or_else(|_| "warn".into()))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log);
                let child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))?;
                pids.push(Some(child.id()));
                children.push(child);
                addrs.push(addr);
            }
            Ok((addrs, pids, children, Some(dir)))
        }
    }
}

/// Waits until a backbone answers (a lookup from an unregistered source gets a reject).
fn wait_ready(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let probe = Message::Lookup {
        request_id: 1,
        from: MeshAddr::new(NetworkId::PUBLIC, meshtun_addr::NodeAddr::UNSPECIFIED),
        query: Query::Address(MeshAddr::new(NetworkId::PUBLIC, meshtun_addr::NodeAddr::UNSPECIFIED)),
    }
    .encode();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let _ = s.send_to(&probe, addr);
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            if Message::decode(&buf[..n]).is_ok() {
                return Ok(());
            }
        }
    }
    anyhow::bail!("backbone {addr} did not answer within {timeout:?}")
}

struct Sampler {
    pids: Vec<Option<u32>>,
    max_rss: Vec<Option<u64>>,
}

impl Sampler {
    fn sample(&mut self) -> Vec<(Option<f64>, Option<u64>)> {
        self.pids
            .iter()
            .enumerate()
            .map(|(i, pid)| {
                let cpu = pid.and_then(procstat::cpu_secs);
                let rss = pid.and_then(procstat::rss_bytes);
                if let Some(r) = rss {
                    self.max_rss[i] = Some(self.max_rss[i].map_or(r, |m| m.max(r)));
                }
                (cpu, rss)
            })
            .collect()
    }
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let t_ids = Instant::now();
    let distinct = opts.identities.unwrap_or(opts.nodes).min(opts.nodes).max(1);
    let ids = crate::identities::load_or_generate(distinct, opts.seed, opts.cache.as_deref(), opts.threads)?;
    let identities_secs = t_ids.elapsed().as_secs_f64();
    let mut backbones = opts.backbones.clone();
    if let Backbones::Spawn { extra_args, .. } = &mut backbones {
        extra_args.extend(Mesh::owner_args(opts.seed, opts.nodes, distinct));
    }
    let (addrs, pids, mut children, tmpdir) = start_backbones(&backbones)?;
    if let Some(nice) = opts.priority {
        // With autogroup scheduling, nice only orders processes within one
        // session; the session's own weight is set here.
        let _ = std::fs::write("/proc/self/autogroup", nice.to_string());
        for pid in pids.iter().flatten().chain([&0u32]) {
            // SAFETY: setpriority on our own process or our children.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, *pid, nice) } != 0 {
                eprintln!("  cannot set priority {nice} for pid {pid}: {}", std::io::Error::last_os_error());
            }
        }
    }
    if opts.pin {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (i, pid) in pids.iter().enumerate() {
            if let Some(pid) = pid {
                pin_to(*pid as i32, i % cpus.saturating_sub(1).max(1));
            }
        }
        // This thread, and so the receiver thread it starts later.
        pin_to(0, cpus - 1);
    }
    let result = (|| {
        for a in &addrs {
            wait_ready(*a, Duration::from_secs(20))?;
        }
        let mesh = Arc::new(Mesh::with_nodes(ids, opts.nodes, addrs.clone(), opts.replicas, opts.seed));
        drive(opts, mesh, &pids, &mut children, identities_secs)
    })();
    for mut c in children {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some(dir) = tmpdir {
        if result.is_ok() {
            let _ = std::fs::remove_dir_all(dir);
        } else {
            eprintln!("backbone logs kept in {}", dir.display());
        }
    }
    result
}

fn pin_to(pid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_setaffinity reads it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        eprintln!("  cannot pin pid {pid} to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
}

fn drive(
    opts: &Options,
    mesh: Arc<Mesh>,
    pids: &[Option<u32>],
    children: &mut [Child],
    identities_secs: f64,
) -> anyhow::Result<Report> {
    let n = mesh.len();
    let k = mesh.backbones.len();
    let sockets = Arc::new(net::bind_sockets(opts.sockets.max(1))?);
    let socket_addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr()).collect::<Result<_, _>>()?;
    let shared = Arc::new(Shared {
        started: Instant::now(),
        send_ns: (0..RING).map(|_| AtomicU64::new(0)).collect(),
        send_tag: (0..RING).map(|_| AtomicU32::new(u32::MAX)).collect(),
        reg_sent: AtomicU64::new(0),
        reg_acked: AtomicU64::new(0),
        reg_rejected: AtomicU64::new(0),
        reject_codes: Mutex::new(Vec::new()),
        hb_phase: AtomicBool::new(false),
        lookups_sent: AtomicU64::new(0),
        lookups_answered: AtomicU64::new(0),
        lookups_correct: AtomicU64::new(0),
        lookups_wrong: AtomicU64::new(0),
        lookups_rejected: AtomicU64::new(0),
        sig_checked: AtomicU64::new(0),
        sig_bad: AtomicU64::new(0),
        intents: AtomicU64::new(0),
        unknown: AtomicU64::new(0),
        records: (0..k).map(|_| AtomicU64::new(0)).collect(),
        registered: (0..n * k).map(|_| AtomicBool::new(false)).collect(),
        hists: Mutex::new(Hists::default()),
        stop: AtomicBool::new(false),
        alive: (0..k).map(|_| AtomicBool::new(true)).collect(),
        lost_after_kill: AtomicU64::new(0),
        answered_after_failover: AtomicU64::new(0),
        failed_over: AtomicBool::new(false),
        failover_ns: AtomicU64::new(0),
        last_rehome_ns: AtomicU64::new(0),
        rehomed: AtomicU64::new(0),
        wrong_samples: Mutex::new(Vec::new()),
    });
    let receiver = {
        let (shared, mesh, sockets) = (shared.clone(), mesh.clone(), sockets.clone());
        let verify_every = opts.verify_every.max(1);
        let max_results = 20usize;
        std::thread::Builder::new().name("receiver".into()).spawn(move || -> anyhow::Result<()> {
            let mut rx = net::Receiver::new(&sockets)?;
            let mut answered = 0u64;
            while !shared.stop.load(Relaxed) {
                rx.poll(20, |_sock, data| {
                    handle_reply(&shared, &mesh, data, &mut answered, verify_every, max_results);
                });
            }
            Ok(())
        })?
    };
    let mut sampler = Sampler { pids: pids.to_vec(), max_rss: vec![None; k] };
    let baseline = sampler.sample();
    let cpu_self0 = procstat::self_cpu_secs();

    // Phase 1: everyone registers, as fast as the backbones acknowledge.
    let seq0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64 * 1000;
    let mut serial: u32 = 0;
    let t_reg = Instant::now();
    let cpu_reg0 = sampler.sample();
    let mut last_progress = Instant::now();
    let mut lost_allowance = 0u64;
    let mut last_answered = (0u64, Instant::now());
    for i in 0..n {
        let sock = i % sockets.len();
        let signed = SignedRecord::sign(mesh.identity(i), &mesh.record(i, socket_addrs[sock], seq0))?;
        for &b in &mesh.homes[i] {
            loop {
                let answered = shared.reg_acked.load(Relaxed) + shared.reg_rejected.load(Relaxed);
                let in_flight = shared.reg_sent.load(Relaxed).saturating_sub(answered + lost_allowance);
                if in_flight < opts.window as u64 {
                    break;
                }
                if answered != last_answered.0 {
                    last_answered = (answered, Instant::now());
                } else if last_answered.1.elapsed() > Duration::from_millis(500) {
                    lost_allowance += in_flight; // give up on those
                    last_answered.1 = Instant::now();
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            serial = serial.wrapping_add(1);
            let payload = Message::Register { request_id: request_id(KIND_REGISTER, i * k + b as usize, serial), record: signed.clone() }.encode();
            shared.stamp(serial);
            shared.reg_sent.fetch_add(1, Relaxed);
            net::send(&sockets[sock], &payload, mesh.backbones[b as usize]);
        }
        if opts.progress && last_progress.elapsed() > Duration::from_secs(2) {
            last_progress = Instant::now();
            let acked = shared.reg_acked.load(Relaxed);
            let s = sampler.sample();
            eprintln!(
                "  registering: {}/{} acked ({:.0}/s), backbone rss {}",
                acked,
                shared.reg_sent.load(Relaxed),
                acked as f64 / t_reg.elapsed().as_secs_f64(),
                s.iter().map(|(_, r)| r.map_or("?".into(), |r| format!("{} MiB", r >> 20))).collect::<Vec<_>>().join(", ")
            );
        }
    }
    // Wait for the last answers; then, like real nodes, retry what was
    // lost in the burst (up to three rounds).
    let mut retried = 0u64;
    for round in 0..4 {
        let total = shared.reg_sent.load(Relaxed);
        let wait_until = Instant::now() + Duration::from_secs(3);
        while shared.reg_acked.load(Relaxed) + shared.reg_rejected.load(Relaxed) < total && Instant::now() < wait_until {
            std::thread::sleep(Duration::from_millis(2));
        }
        let missing: Vec<(usize, u8)> = (0..n)
            .flat_map(|i| mesh.homes[i].iter().map(move |&b| (i, b)))
            .filter(|&(i, b)| !shared.registered[i * k + b as usize].load(Relaxed))
            .collect();
        if missing.is_empty() || round == 3 {
            break;
        }
        if opts.progress {
            eprintln!("  retrying {} registrations lost in the burst", missing.len());
        }
        retried += missing.len() as u64;
        for (i, b) in missing {
            let sock = i % sockets.len();
            let signed = SignedRecord::sign(mesh.identity(i), &mesh.record(i, socket_addrs[sock], seq0 + 1 + round))?;
            serial = serial.wrapping_add(1);
            let payload = Message::Register { request_id: request_id(KIND_REGISTER, i * k + b as usize, serial), record: signed }.encode();
            shared.stamp(serial);
            shared.reg_sent.fetch_add(1, Relaxed);
            net::send(&sockets[sock], &payload, mesh.backbones[b as usize]);
            if serial % 256 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let total_reg = shared.reg_sent.load(Relaxed);
    let registration_secs = t_reg.elapsed().as_secs_f64();
    let cpu_reg1 = sampler.sample();
    let reg_acked = shared.reg_acked.load(Relaxed);
    let reg_hist = shared.hists.lock().unwrap().reg.clone();
    let _ = total_reg;
    let registrations_lost = (0..n * k).filter(|&x| mesh.homes[x / k].contains(&((x % k) as u8)) && !shared.registered[x].load(Relaxed)).count() as u64;
    if opts.progress {
        eprintln!(
            "registered {reg_acked} of {total_reg} in {registration_secs:.1} s ({:.0}/s), p50 {} us, p99 {} us",
            reg_acked as f64 / registration_secs,
            reg_hist.quantile_us(0.5),
            reg_hist.quantile_us(0.99)
        );
    }

    // Phase 2: heartbeats at the real interval, lookups at the set rate.
    shared.hb_phase.store(true, Relaxed);
    let hb_sent0 = shared.reg_sent.load(Relaxed);
    let hb_acked0 = shared.reg_acked.load(Relaxed);
    let t0 = Instant::now();
    let cpu_st0 = sampler.sample();
    let mut seqs: Vec<u64> = vec![seq0 + 10; n];
    let mut rng = Xorshift(opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mix_total: u32 = opts.mix.iter().sum::<u32>().max(1);
    let hb = opts.heartbeat.as_secs_f64();
    let (mut hb_round, mut hb_next) = (1u64, 0usize);
    let mut lookups_issued = 0u64;
    let mut killed_at: Option<Instant> = None;
    let mut last_tick = Instant::now();
    let mut tick_lookups = (0u64, 0u64);
    let duration = if opts.hold { Duration::ZERO } else { opts.duration };
    loop {
        let now = Instant::now();
        let el = now.duration_since(t0).as_secs_f64();
        if el >= duration.as_secs_f64() {
            break;
        }
        if let (Some(at), None) = (opts.kill_at, killed_at) {
            if el >= at.as_secs_f64() && !children.is_empty() {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(children[0].id() as i32, libc::SIGKILL) };
                killed_at = Some(now);
                if opts.progress {
                    eprintln!("  killed backbone 0 ({}) at {el:.1} s", mesh.backbones[0]);
                }
            }
        }
        if let Some(at) = killed_at {
            if shared.alive[0].load(Relaxed) && now.duration_since(at) >= opts.failover_after {
                shared.failover_ns.store(shared.started.elapsed().as_nanos() as u64, Relaxed);
                shared.alive[0].store(false, Relaxed);
                shared.failed_over.store(true, Relaxed);
            }
        }
        // Heartbeats due: node i beats at (round + i/n) * interval.
        let mut budget = 2000;
        while budget > 0 && (hb_round as f64 - 1.0 + hb_next as f64 / n as f64) * hb <= el {
            let i = hb_next;
            seqs[i] += 1;
            let sock = i % sockets.len();
            let signed = SignedRecord::sign(mesh.identity(i), &mesh.record(i, socket_addrs[sock], seqs[i]))?;
            let failed_over = !shared.alive[0].load(Relaxed);
            let homes = if failed_over { &mesh.homes_without_0[i] } else { &mesh.homes[i] };
            for &b in homes {
                if !shared.alive[b as usize].load(Relaxed) {
                    continue;
                }
                serial = serial.wrapping_add(1);
                let payload = Message::Register { request_id: request_id(KIND_REGISTER, i * k + b as usize, serial), record: signed.clone() }.encode();
                shared.stamp(serial);
                shared.reg_sent.fetch_add(1, Relaxed);
                net::send(&sockets[sock], &payload, mesh.backbones[b as usize]);
            }
            hb_next += 1;
            if hb_next == n {
                hb_next = 0;
                hb_round += 1;
            }
            budget -= 1;
        }
        // Lookups due.
        let mut budget = 2000;
        while budget > 0 && (lookups_issued as f64) < el * opts.lookup_rate {
            lookups_issued += 1;
            budget -= 1;
            let pick = (rng.next() % mix_total as u64) as u32;
            let kind = if pick < opts.mix[0] { 0 } else if pick < opts.mix[0] + opts.mix[1] { 1 } else { 2 };
            let target = (rng.next() % n as u64) as usize;
            let network = mesh.network(target);
            let (query, key) = match kind {
                0 => (Query::Address(mesh.addrs[target]), mesh.addrs[target].to_string()),
                1 => (Query::Hostname { network, name: hostname(target) }, hostname(target)),
                _ => {
                    let c = capability(target % mesh.caps);
                    (Query::Capability { network, name: c.clone() }, c)
                }
            };
            let owners = mesh.placement_of(key.as_bytes());
            let Some(&b) = owners.iter().find(|b| shared.alive[**b as usize].load(Relaxed)) else { continue };
            let asker = if k > 1 {
                // Sharded: a node registered at that backbone asks.
                let residents = &mesh.residents[b as usize];
                if residents.is_empty() {
                    continue;
                }
                residents[(rng.next() % residents.len() as u64) as usize] as usize
            } else {
                // A node of the target's network asks (private networks
                // see only themselves).
                let (lo, hi) = mesh.network_range(target);
                lo + (rng.next() % (hi - lo) as u64) as usize
            };
            let index = target;
            serial = serial.wrapping_add(1);
            let payload = Message::Lookup {
                request_id: request_id(KIND_LOOKUP + kind, index, serial),
                from: mesh.addrs[asker],
                query,
            }
            .encode();
            shared.stamp(serial);
            shared.lookups_sent.fetch_add(1, Relaxed);
            if killed_at.is_some() && b == 0 {
                shared.lost_after_kill.fetch_add(1, Relaxed);
            }
            net::send(&sockets[asker % sockets.len()], &payload, mesh.backbones[b as usize]);
        }
        if opts.progress && last_tick.elapsed() >= Duration::from_secs(1) {
            let dt = last_tick.elapsed().as_secs_f64();
            last_tick = Instant::now();
            let interval = std::mem::take(&mut shared.hists.lock().unwrap().interval_lookup);
            let sent = shared.lookups_sent.load(Relaxed);
            let answered = shared.lookups_answered.load(Relaxed);
            let s = sampler.sample();
            eprintln!(
                "  t={el:5.1}s heartbeats {:6} acked, lookups {:6.0}/s sent {:6.0}/s answered, p50 {} us p99 {} us, backbone rss {}",
                shared.reg_acked.load(Relaxed) - hb_acked0,
                (sent - tick_lookups.0) as f64 / dt,
                (answered - tick_lookups.1) as f64 / dt,
                interval.quantile_us(0.5),
                interval.quantile_us(0.99),
                s.iter().map(|(_, r)| r.map_or("?".into(), |r| format!("{} MiB", r >> 20))).collect::<Vec<_>>().join(", ")
            );
            tick_lookups = (sent, answered);
        }
        // Sleep until the next event.
        let next_hb = (hb_round as f64 - 1.0 + hb_next as f64 / n as f64) * hb;
        let next_lookup = if opts.lookup_rate > 0.0 { (lookups_issued + 1) as f64 / opts.lookup_rate } else { f64::MAX };
        let wait = next_hb.min(next_lookup) - t0.elapsed().as_secs_f64();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait.min(0.01)));
        }
    }
    let steady_secs = t0.elapsed().as_secs_f64();
    let cpu_st1 = sampler.sample();
    // Hold: sample RSS for a while (records settle) without traffic.
    if opts.hold {
        let until = Instant::now() + opts.duration;
        while Instant::now() < until {
            sampler.sample();
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    std::thread::sleep(Duration::from_millis(500)); // last answers
    let end = sampler.sample();
    shared.stop.store(true, Relaxed);
    receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let loadgen_cpu = procstat::self_cpu_secs() - cpu_self0;

    let hists = std::mem::take(&mut *shared.hists.lock().unwrap());
    let lookups_sent = shared.lookups_sent.load(Relaxed);
    let lookups_answered = shared.lookups_answered.load(Relaxed);
    let lookups_rejected = shared.lookups_rejected.load(Relaxed);
    let hb_sent = shared.reg_sent.load(Relaxed) - hb_sent0;
    let hb_acked = shared.reg_acked.load(Relaxed) - hb_acked0;
    let cores = |a: Option<f64>, b: Option<f64>, secs: f64| match (a, b) {
        (Some(a), Some(b)) if secs > 0.0 => Some((b - a) / secs),
        _ => None,
    };
    let backbones = (0..k)
        .map(|b| {
            let records = shared.records[b].load(Relaxed);
            let rss_end = end[b].1;
            BackboneFigures {
                addr: mesh.backbones[b].to_string(),
                pid: pids[b],
                cpu_cores_registration: cores(cpu_reg0[b].0, cpu_reg1[b].0, registration_secs),
                cpu_cores_steady: cores(cpu_st0[b].0, cpu_st1[b].0, steady_secs),
                rss_baseline_bytes: baseline[b].1,
                rss_max_bytes: sampler.max_rss[b],
                rss_end_bytes: rss_end,
                records,
                rss_per_record_bytes: match (baseline[b].1, sampler.max_rss[b]) {
                    (Some(base), Some(max)) if records > 0 => Some((max.saturating_sub(base)) as f64 / records as f64),
                    _ => None,
                },
            }
        })
        .collect();
    let wrong = shared.wrong_samples.lock().unwrap().clone();
    if !wrong.is_empty() {
        eprintln!("first wrong answers:\n  {}", wrong.join("\n  "));
    }
    let reject_codes = shared.reject_codes.lock().unwrap().clone();
    Ok(Report {
        nodes: n,
        backbones,
        sockets: sockets.len(),
        identities_secs,
        registration_secs,
        registrations_per_sec: reg_acked as f64 / registration_secs,
        registration_latency: Latency::from(&reg_hist),
        registrations_rejected: shared.reg_rejected.load(Relaxed),
        registrations_lost,
        registrations_retried: retried,
        reject_codes,
        steady_secs,
        heartbeats_sent: hb_sent,
        heartbeats_acked: hb_acked,
        heartbeats_per_sec: hb_acked as f64 / steady_secs.max(1e-9),
        heartbeat_latency: Latency::from(&hists.hb),
        lookups_sent,
        lookups_answered,
        lookups_per_sec: lookups_answered as f64 / steady_secs.max(1e-9),
        lookups_correct: shared.lookups_correct.load(Relaxed),
        lookups_wrong: shared.lookups_wrong.load(Relaxed),
        lookups_rejected,
        lookups_lost: lookups_sent.saturating_sub(lookups_answered + lookups_rejected),
        lookup_latency: Latency::from(&hists.lookup),
        lookup_latency_by_kind: [
            Latency::from(&hists.by_kind[0]),
            Latency::from(&hists.by_kind[1]),
            Latency::from(&hists.by_kind[2]),
        ],
        signatures_checked: shared.sig_checked.load(Relaxed),
        signatures_bad: shared.sig_bad.load(Relaxed),
        intents_received: shared.intents.load(Relaxed),
        loadgen_cpu_cores: loadgen_cpu / (registration_secs + steady_secs),
        lookups_lost_after_kill: opts.kill_at.map(|_| shared.lost_after_kill.load(Relaxed)),
        lookups_answered_after_failover: opts.kill_at.map(|_| shared.answered_after_failover.load(Relaxed)),
        rehome_needed: opts.kill_at.map(|_| (0..n).map(|i| mesh.homes_without_0[i].iter().filter(|b| !mesh.homes[i].contains(b)).count() as u64).sum()),
        rehomed: opts.kill_at.map(|_| shared.rehomed.load(Relaxed)),
        rehome_secs: opts.kill_at.map(|_| {
            let (f, l) = (shared.failover_ns.load(Relaxed), shared.last_rehome_ns.load(Relaxed));
            l.saturating_sub(f) as f64 / 1e9
        }),
    })
}

fn handle_reply(shared: &Shared, mesh: &Mesh, data: &[u8], answered: &mut u64, verify_every: u64, max_results: usize) {
    let message = match Message::decode(data) {
        Ok(m) => m,
        Err(e) => {
            if shared.unknown.fetch_add(1, Relaxed) == 0 {
                eprintln!("  undecodable reply ({} bytes): {e}", data.len());
            }
            return;
        }
    };
    match message {
        Message::RegisterAck { request_id, .. } => {
            let (kind, index, serial) = split_id(request_id);
            if kind != KIND_REGISTER {
                shared.unknown.fetch_add(1, Relaxed);
                return;
            }
            if let Some(flag) = shared.registered.get(index) {
                if !flag.swap(true, Relaxed) {
                    let k = mesh.backbones.len();
                    shared.records[index % k].fetch_add(1, Relaxed);
                    if shared.failed_over.load(Relaxed) && !mesh.homes[index / k].contains(&((index % k) as u8)) {
                        shared.rehomed.fetch_add(1, Relaxed);
                        shared.last_rehome_ns.store(shared.started.elapsed().as_nanos() as u64, Relaxed);
                    }
                }
            }
            shared.reg_acked.fetch_add(1, Relaxed);
            if let Some(us) = shared.latency_us(serial) {
                let mut h = shared.hists.lock().unwrap();
                if shared.hb_phase.load(Relaxed) { h.hb.record(us) } else { h.reg.record(us) }
            }
        }
        Message::Reject { request_id, code, detail } => {
            let (kind, _, _) = split_id(request_id);
            if kind == KIND_REGISTER {
                shared.reg_rejected.fetch_add(1, Relaxed);
            } else {
                shared.lookups_rejected.fetch_add(1, Relaxed);
            }
            let mut codes = shared.reject_codes.lock().unwrap();
            let name = code_name(code);
            match codes.iter_mut().find(|(c, _)| *c == name) {
                Some((_, n)) => *n += 1,
                None => {
                    codes.push((name, 1));
                    eprintln!("  first {} reject: {detail}", code_name(code));
                }
            }
        }
        Message::LookupReply { request_id, records } => {
            let (kind, index, serial) = split_id(request_id);
            if !(KIND_LOOKUP..KIND_LOOKUP + 3).contains(&kind) {
                shared.unknown.fetch_add(1, Relaxed);
                return;
            }
            *answered += 1;
            shared.lookups_answered.fetch_add(1, Relaxed);
            if shared.failed_over.load(Relaxed) {
                shared.answered_after_failover.fetch_add(1, Relaxed);
            }
            let lk = (kind - KIND_LOOKUP) as usize;
            let check_sig = *answered % verify_every == 0;
            let verdict = check_lookup(mesh, lk, index, &records, check_sig, max_results);
            if check_sig {
                shared.sig_checked.fetch_add(1, Relaxed);
            }
            match verdict {
                Ok(()) => {
                    shared.lookups_correct.fetch_add(1, Relaxed);
                }
                Err(Wrong::Signature) => {
                    shared.sig_bad.fetch_add(1, Relaxed);
                }
                Err(Wrong::Answer(why)) => {
                    shared.lookups_wrong.fetch_add(1, Relaxed);
                    let mut w = shared.wrong_samples.lock().unwrap();
                    if w.len() < 5 {
                        w.push(why);
                    }
                }
            }
            if let Some(us) = shared.latency_us(serial) {
                let mut h = shared.hists.lock().unwrap();
                h.lookup.record(us);
                h.by_kind[lk].record(us);
                h.interval_lookup.record(us);
            }
        }
        Message::PeerIntent { .. } => {
            shared.intents.fetch_add(1, Relaxed);
        }
        _ => {
            shared.unknown.fetch_add(1, Relaxed);
        }
    }
}

fn code_name(code: RejectCode) -> String {
    code.as_str().to_string()
}

enum Wrong {
    Signature,
    Answer(String),
}

/// Checks an answer against what the loadgen registered: the right node
/// (address, hostname) or every holder of the capability (up to the
/// backbone's result limit), decoded without trusting the backbone.
fn check_lookup(mesh: &Mesh, kind: usize, index: usize, records: &[SignedRecord], check_sig: bool, max_results: usize) -> Result<(), Wrong> {
    let decode = |r: &SignedRecord| -> Result<NodeRecord, Wrong> {
        if check_sig {
            r.verify().map(|v| v.record).map_err(|_| Wrong::Signature)
        } else {
            postcard::from_bytes::<NodeRecord>(&r.body).map_err(|e| Wrong::Answer(format!("undecodable record: {e}")))
        }
    };
    match kind {
        0 | 1 => {
            if records.len() != 1 {
                return Err(Wrong::Answer(format!("kind {kind} for node {index}: {} records", records.len())));
            }
            let r = decode(&records[0])?;
            if r.mesh_addr() != mesh.addrs[index] || r.hostname.as_deref() != Some(hostname(index).as_str()) {
                return Err(Wrong::Answer(format!("kind {kind} for node {index}: got {} {:?}", r.mesh_addr(), r.hostname)));
            }
            Ok(())
        }
        _ => {
            let c = index % mesh.caps;
            let want = mesh.holders_in(c, mesh.network(index)).min(max_results);
            if records.len() != want {
                return Err(Wrong::Answer(format!("capability {c}: {} records, expected {want}", records.len())));
            }
            let name = capability(c);
            for r in records {
                let r = decode(r)?;
                if !r.capabilities.contains(&name) {
                    return Err(Wrong::Answer(format!("capability {index}: record without it")));
                }
            }
            Ok(())
        }
    }
}

struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}
