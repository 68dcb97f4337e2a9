//! Node scale (issue 9, item 3): one node (the real overlay core) with N
//! WireGuard sessions established to N simulated peers (boringtun
//! responders), then left idle. Prints the node's CPU while idle (its own
//! thread time; the simulated peers' work is excluded), how often it wakes,
//! and the cost of the per-packet paths (routing a packet to a peer, and
//! `poll_timeout`, which the daemon calls once per loop iteration), and the
//! node's heap per peer (allocations made inside the node's calls, net of
//! frees, counted by a tagging allocator). The simulated peers run their
//! own WireGuard timers like real ones (answering data with a keepalive),
//! so an idle session stays healthy instead of re-handshaking.
//!
//! Then, with parking on (the third argument, seconds without data before
//! a session is parked; 0 turns it off), it keeps idling until every
//! session is parked and measures CPU and heap again.
//!
//! `cargo run --release -p meshtun-loadgen --example idle_node -- 10000 [idle secs] [park after secs]`
//! (identities come from the loadgen cache; see docs/SCALING.md).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use meshtun_addr::NetworkId;
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_overlay::{Node, NodeConfig};
use meshtun_proto::{Message, NodeRecord, SignedRecord};

const BB: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 7400);
const HUB: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 51820);

/// Heap the node holds: bytes allocated while `IN_NODE` is set, minus those
/// of them freed since (each allocation carries a header saying whose it is).
static NODE_HEAP: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
thread_local! {
    static IN_NODE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct Tagging;

const HEADER: usize = 16;

// SAFETY: forwards to the system allocator with a 16-byte (or
// alignment-sized) header in front of every block; the header records the
// size and whether the block is counted.
unsafe impl std::alloc::GlobalAlloc for Tagging {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let pre = layout.align().max(HEADER);
        let Ok(full) = std::alloc::Layout::from_size_align(layout.size() + pre, layout.align().max(8)) else { return std::ptr::null_mut() };
        let base = std::alloc::System.alloc(full);
        if base.is_null() {
            return base;
        }
        let counted = IN_NODE.try_with(|c| c.get()).unwrap_or(false);
        if counted {
            NODE_HEAP.fetch_add(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        }
        let user = base.add(pre);
        (user.sub(HEADER) as *mut u64).write_unaligned(layout.size() as u64);
        (user.sub(8) as *mut u64).write_unaligned(counted as u64);
        user
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        let pre = layout.align().max(HEADER);
        if (ptr.sub(8) as *const u64).read_unaligned() == 1 {
            NODE_HEAP.fetch_sub(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        }
        let full = std::alloc::Layout::from_size_align_unchecked(layout.size() + pre, layout.align().max(8));
        std::alloc::System.dealloc(ptr.sub(pre), full)
    }
}

#[global_allocator]
static GLOBAL: Tagging = Tagging;

fn node_heap() -> i64 {
    NODE_HEAP.load(std::sync::atomic::Ordering::Relaxed)
}

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn endpoint(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)), 51820)
}

fn udp6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 48];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..42].copy_from_slice(&4000u16.to_be_bytes());
    p[42..44].copy_from_slice(&4001u16.to_be_bytes());
    p[44..46].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

struct Sim {
    hub: Node,
    dir: Directory,
    peers: Vec<Tunn>,
    /// Each peer's (static public key, probe key with the hub).
    keys: Vec<([u8; 32], [u8; 32])>,
    by_endpoint: HashMap<SocketAddr, usize>,
    buf: Vec<u8>,
    hub_cpu: f64,
    delivered: u64,
}

impl Sim {
    /// Runs `f` on the hub, counting its thread CPU and its allocations.
    fn hub<T>(&mut self, f: impl FnOnce(&mut Node) -> T) -> T {
        let c = thread_cpu();
        IN_NODE.with(|x| x.set(true));
        let out = f(&mut self.hub);
        IN_NODE.with(|x| x.set(false));
        self.hub_cpu += thread_cpu() - c;
        out
    }

    /// Runs every simulated peer's WireGuard timers (as its own device
    /// would) and delivers what they send to the hub.
    fn tick_peers(&mut self, now: Instant) -> u64 {
        let mut received = 0;
        for i in 0..self.peers.len() {
            let out = match self.peers[i].update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(b) => b.to_vec(),
                _ => continue,
            };
            received += 1;
            self.hub(|h| h.handle_udp(endpoint(i), &out, now));
        }
        received
    }

    /// Hands what the hub sends to the peers it is for, and their answers back.
    fn deliver(&mut self, now: Instant) -> (u64, u64, u64) {
        let (mut sent, mut probes, mut received) = (0, 0, 0);
        while let Some(t) = self.hub(|h| h.poll_transmit()) {
            sent += 1;
            if t.payload.starts_with(&meshtun_overlay::probe::PROBE_MAGIC) {
                probes += 1;
            }
            if let Some(&i) = self.by_endpoint.get(&t.dst) {
                for b in self.peer_answers(i, &t.payload) {
                    received += 1;
                    self.hub(|h| h.handle_udp(t.dst, &b, now));
                }
            }
        }
        while self.hub(|h| h.poll_tun()).is_some() {}
        while self.hub(|h| h.poll_event()).is_some() {}
        (sent, probes, received)
    }

    /// Peer `i` answers `datagram` (a probe or WireGuard); returns its replies.
    fn peer_answers(&mut self, i: usize, datagram: &[u8]) -> Vec<Vec<u8>> {
        use meshtun_overlay::probe;
        if datagram.starts_with(&probe::PROBE_MAGIC) {
            let (public, key) = self.keys[i];
            return match probe::decode(datagram, &key) {
                Some(p) if p.kind == probe::ProbeKind::Ping => {
                    vec![probe::encode(&probe::Probe { kind: probe::ProbeKind::Pong(HUB), sender: public, txid: p.txid }, &key)]
                }
                _ => vec![],
            };
        }
        let mut out = Vec::new();
        let mut res = self.peers[i].decapsulate(None, datagram, &mut self.buf);
        loop {
            match res {
                TunnResult::WriteToNetwork(b) => {
                    out.push(b.to_vec());
                    res = self.peers[i].decapsulate(None, &[], &mut self.buf);
                }
                TunnResult::WriteToTunnelV6(..) | TunnResult::WriteToTunnelV4(..) => {
                    self.delivered += 1;
                    break;
                }
                _ => break,
            }
        }
        out
    }

    /// Moves datagrams until nothing is in flight.
    fn pump(&mut self, now: Instant) {
        while let Some(t) = self.hub(|h| h.poll_transmit()) {
            if t.dst == BB {
                self.dir.handle_datagram(HUB, &t.payload, now);
                while let Some(r) = self.dir.poll_transmit() {
                    if r.dst == HUB {
                        self.hub(|h| h.handle_udp(BB, &r.payload, now));
                    } else if let (Some(&i), Some((_, inner))) = (self.by_endpoint.get(&r.dst), meshtun_proto::relay::unwrap(&r.payload)) {
                        // Relayed to a peer: its answers go back through the relay.
                        let hub_addr = self.hub.mesh_addr();
                        for b in self.peer_answers(i, inner) {
                            self.dir.handle_datagram(r.dst, &meshtun_proto::relay::wrap(hub_addr, &b), now);
                        }
                    }
                }
            } else if let Some(&i) = self.by_endpoint.get(&t.dst) {
                let out = self.peer_answers(i, &t.payload);
                for b in out {
                    self.hub(|h| h.handle_udp(t.dst, &b, now));
                }
            }
        }
        while self.hub.poll_tun().is_some() {}
        while self.hub.poll_event().is_some() {}
    }
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let idle_secs: f64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(30.0);
    // Long enough that the sessions are measured awake first (45 s settling
    // plus the idle measurement).
    let park_secs: f64 = std::env::args().nth(3).and_then(|s| s.parse().ok()).unwrap_or(60.0 + idle_secs);
    let park_idle_after = (park_secs > 0.0).then(|| Duration::from_secs_f64(park_secs));
    let ids = meshtun_loadgen::identities::load_or_generate(n + 1, 1, Some(&meshtun_loadgen::identities::default_cache(1)), 2).unwrap();
    let t0 = Instant::now();
    let config = NodeConfig { backbones: vec![BB], local_endpoints: vec![HUB], rng_seed: 1, park_idle_after, ..NodeConfig::default() };
    let hub_secret = StaticSecret::from([7u8; 32]);
    let hub_public = PublicKey::from(&hub_secret);
    let hub = Node::new(config, ids[0].clone(), hub_secret, t0);
    let dir_config = DirectoryConfig { registrations_per_source: 1e9, record_ttl: Duration::from_secs(86400), ..DirectoryConfig::default() };
    let mut sim = Sim { hub, dir: Directory::new(dir_config), peers: Vec::new(), keys: Vec::new(), by_endpoint: HashMap::new(), buf: vec![0; 65536], hub_cpu: 0.0, delivered: 0 };
    let now = Instant::now();
    sim.hub(|h| h.handle_timeout(now));
    sim.pump(now);
    // Peers: records at the backbone, boringtun responders here.
    let mut addrs = Vec::new();
    for i in 0..n {
        let id = &ids[i + 1];
        let secret = StaticSecret::from(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes());
        let public = PublicKey::from(&secret);
        let record = NodeRecord {
            network: NetworkId::PUBLIC,
            node: id.node_addr(),
            identity_key: id.public_key(),
            pow_nonce: id.nonce(),
            wg_key: public.to_bytes(),
            endpoints: vec![endpoint(i)],
            hostname: None,
            capabilities: vec![],
            groups: vec![],
            seq: 1,
            wg_key_version: 1,
            wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
            cert: None,
        };
        let signed = SignedRecord::sign(id, &record).unwrap();
        sim.dir.handle_datagram(endpoint(i), &Message::Register { request_id: 1, record: signed }.encode(), now);
        while sim.dir.poll_transmit().is_some() {}
        sim.keys.push((public.to_bytes(), meshtun_overlay::probe::probe_key(&secret, &hub_public)));
        sim.peers.push(Tunn::new(secret, hub_public, None, None, i as u32 + 1, None));
        sim.by_endpoint.insert(endpoint(i), i);
        addrs.push(id.mesh_addr(NetworkId::PUBLIC));
    }
    // The hub talks to every peer: lookup, handshake, first packet.
    let heap_before = node_heap();
    let rss_before = meshtun_loadgen::procstat::rss_bytes(std::process::id());
    let setup = Instant::now();
    let me = sim.hub.mesh_ip();
    for chunk in addrs.chunks(500) {
        let now = Instant::now();
        for a in chunk {
            let p = udp6(me, a.to_ipv6(), b"hello");
            sim.hub(|h| h.handle_tun_packet(&p, now));
        }
        sim.pump(now);
        sim.hub(|h| h.handle_timeout(now));
        sim.pump(now);
    }
    let now = Instant::now();
    sim.hub(|h| h.handle_timeout(now));
    sim.pump(now);
    let status = sim.hub.status(Instant::now());
    let up = serde_json::to_value(&status).ok().and_then(|v| v["peers"].as_array().map(|p| p.len())).unwrap_or(0);
    println!("{n} peers: {} first packets delivered, {up} peers in status, set up in {:.1} s", sim.delivered, setup.elapsed().as_secs_f64());

    // Per-packet paths.
    let reps = 20_000;
    let pkts: Vec<Vec<u8>> = (0..reps).map(|r| udp6(me, addrs[(r * 7919) % n].to_ipv6(), &[0u8; 64])).collect();
    let now = Instant::now();
    let c = thread_cpu();
    IN_NODE.with(|x| x.set(true));
    for batch in pkts.chunks(64) {
        for p in batch {
            sim.hub.handle_tun_packet(p, now);
            while sim.hub.poll_transmit().is_some() {}
        }
        // The daemon asks for the next deadline after every batch.
        let _ = sim.hub.poll_timeout();
    }
    IN_NODE.with(|x| x.set(false));
    let per_packet = (thread_cpu() - c) * 1e6 / reps as f64;
    let c = thread_cpu();
    let mut x = 0u64;
    for _ in 0..1000 {
        x = x.wrapping_add(sim.hub.poll_timeout().map_or(0, |t| t.elapsed().as_nanos() as u64));
    }
    let per_poll = (thread_cpu() - c) * 1e6 / 1000.0;
    println!("routing + encrypting one packet to a random peer (batches of 64, poll_timeout after each): {per_packet:.2} us cpu; poll_timeout: {per_poll:.3} us cpu ({x})");

    // The daemon's once-a-second watch (events: peer down, key rotated)
    // reads every peer on the engine thread: the cheap health snapshot
    // against the full status it used to build.
    let c = thread_cpu();
    for _ in 0..10 {
        x = x.wrapping_add(sim.hub.status(Instant::now()).peers.len() as u64);
    }
    let per_status = (thread_cpu() - c) * 1e3 / 10.0;
    let c = thread_cpu();
    for _ in 0..10 {
        x = x.wrapping_add(sim.hub.peer_health().filter(|p| p.handshake_age.is_some()).count() as u64);
    }
    let per_health = (thread_cpu() - c) * 1e3 / 10.0;
    println!("watch snapshot of {n} peers: full status {per_status:.2} ms cpu, health {per_health:.3} ms cpu ({:.0}x less) ({x})", per_status / per_health);

    // Idle: drive the node's timers in real time, as the daemon does (a
    // timer wake-up when its deadline passes, poll_timeout after every
    // wake-up), with the peers' own timers running once a second. The first
    // 45 s are not counted: the sessions' first persistent keepalives (25 s
    // after each was created), the handshakes boringtun redoes 15 s after
    // the unanswered packets above, and 16 s of quiet after them.
    let mut peers_next = Instant::now();
    let mut drive = |sim: &mut Sim, until: Instant| -> (u64, u64, u64, u64) {
        let (mut wakeups, mut sent, mut probes, mut received) = (0u64, 0u64, 0u64, 0u64);
        while Instant::now() < until {
            let deadline = sim.hub.poll_timeout().unwrap_or(until).min(until);
            let wake = deadline.min(peers_next);
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
            let now = Instant::now();
            if now >= deadline {
                sim.hub(|h| h.handle_timeout(now));
                wakeups += 1;
            }
            if now >= peers_next {
                received += sim.tick_peers(now);
                peers_next = now + Duration::from_secs(1);
            }
            let (s, p, r) = sim.deliver(now);
            sent += s;
            probes += p;
            received += r;
            // The daemon asks for the next deadline after every wake-up.
            let _ = sim.hub(|h| h.poll_timeout());
        }
        (wakeups, sent, probes, received)
    };
    drive(&mut sim, Instant::now() + Duration::from_secs(45));
    let measure = |sim: &mut Sim, drive: &mut dyn FnMut(&mut Sim, Instant) -> (u64, u64, u64, u64), what: &str| {
        sim.hub_cpu = 0.0;
        let start = Instant::now();
        let (wakeups, sent, probes, received) = drive(sim, start + Duration::from_secs_f64(idle_secs));
        let secs = start.elapsed().as_secs_f64();
        let s = sim.hub.status(Instant::now()).stats.sessions;
        println!(
            "idle {secs:.0} s with {n} peers, {what} ({} parked): node cpu {:.2}% of one core, {:.1} timer wake-ups/s, {:.0} datagrams/s sent ({:.0}/s path probes, the rest WireGuard keepalives and handshakes), {:.0}/s received",
            s.parked,
            sim.hub_cpu * 100.0 / secs,
            wakeups as f64 / secs,
            sent as f64 / secs,
            probes as f64 / secs,
            received as f64 / secs
        );
        let heap = node_heap() - heap_before;
        let rss = meshtun_loadgen::procstat::rss_bytes(std::process::id()).zip(rss_before).map(|(a, b)| a as i64 - b as i64);
        println!(
            "node heap for {n} peers, {what}: {:.1} MiB, {:.0} B per peer (boringtun Tunn alone: {} B inline); process RSS grew {} (hub and simulated peers together)",
            heap as f64 / 1048576.0,
            heap as f64 / n as f64,
            std::mem::size_of::<Tunn>(),
            rss.map_or("?".into(), |r| format!("{:.1} MiB", r as f64 / 1048576.0))
        );
    };
    measure(&mut sim, &mut drive, "sessions awake");
    let Some(park) = park_idle_after else { return };
    // The last data went out during set-up and the per-packet test above.
    let waited = Instant::now();
    while sim.hub.status(Instant::now()).stats.sessions.parked < n as u64 && waited.elapsed() < park + Duration::from_secs(60) {
        drive(&mut sim, Instant::now() + Duration::from_secs(5));
    }
    let s = sim.hub.status(Instant::now()).stats.sessions;
    println!("parking after {park:?} without data: {} of {n} parked ({} parks, {} woken) after {:.0} s more", s.parked, s.parks, s.unparks_inbound + s.unparks_outbound, waited.elapsed().as_secs_f64());
    // Let the parked state settle (the sessions' last timers are gone).
    drive(&mut sim, Instant::now() + Duration::from_secs(5));
    measure(&mut sim, &mut drive, "sessions parked");
    // glibc keeps the freed sessions' pages for reuse (they sit between
    // live blocks); malloc_trim hands them back, as a daemon could after
    // parking many at once.
    let rss = || meshtun_loadgen::procstat::rss_bytes(std::process::id()).map_or(0.0, |b| b as f64 / 1048576.0);
    let before_trim = rss();
    // SAFETY: no arguments beyond the pad size; safe to call at any time.
    unsafe { libc::malloc_trim(0) };
    println!("malloc_trim after parking: process RSS {before_trim:.1} -> {:.1} MiB", rss());
    // And the way back: a packet to every peer wakes its session.
    let now = Instant::now();
    let before = sim.delivered;
    let c = thread_cpu();
    for a in &addrs {
        let p = udp6(me, a.to_ipv6(), b"again");
        sim.hub(|h| h.handle_tun_packet(&p, now));
    }
    sim.pump(now);
    let secs = thread_cpu() - c;
    println!(
        "one packet to each parked peer: {} delivered after a new handshake ({} unparked), {:.1} us cpu per peer (hub and simulated peer)",
        sim.delivered - before,
        sim.hub.stats().sessions.unparks_outbound,
        secs * 1e6 / n as f64
    );
}
