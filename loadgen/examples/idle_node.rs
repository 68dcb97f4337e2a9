//! Node scale (issue 9, item 3): one node (the real overlay core) with N
//! WireGuard sessions established to N simulated peers (boringtun
//! responders), then left idle. Prints the node's CPU while idle (its own
//! thread time; the simulated peers' work is excluded), how often it wakes,
//! and the cost of the per-packet paths (routing a packet to a peer, and
//! `poll_timeout`, which the daemon calls once per loop iteration).
//!
//! `cargo run --release -p meshtun-loadgen --example idle_node -- 10000 [idle secs]`
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
    /// Runs `f` on the hub, counting its thread CPU.
    fn hub<T>(&mut self, f: impl FnOnce(&mut Node) -> T) -> T {
        let c = thread_cpu();
        let out = f(&mut self.hub);
        self.hub_cpu += thread_cpu() - c;
        out
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
        loop {
            let Some(t) = self.hub(|h| h.poll_transmit()) else { break };
            if t.dst == BB {
                self.dir.handle_datagram(HUB, &t.payload, now);
                while let Some(r) = self.dir.poll_transmit() {
                    if r.dst == HUB {
                        self.hub(|h| h.handle_udp(BB, &r.payload, now));
                    } else if let (Some(&i), Some((_, inner))) = (self.by_endpoint.get(&r.dst), meshtun_proto::relay::unwrap(&r.payload)) {
                        // Relayed to a peer: its answers go back through the relay.
                        let hub_addr = self.hub.mesh_addr();
                        for b in self.peer_answers(i, &inner.to_vec()) {
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
    let ids = meshtun_loadgen::identities::load_or_generate(n + 1, 1, Some(&meshtun_loadgen::identities::default_cache(1)), 2).unwrap();
    let t0 = Instant::now();
    let config = NodeConfig { backbones: vec![BB], local_endpoints: vec![HUB], rng_seed: 1, ..NodeConfig::default() };
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
    for p in &pkts {
        sim.hub.handle_tun_packet(p, now);
        while sim.hub.poll_transmit().is_some() {}
    }
    let per_packet = (thread_cpu() - c) * 1e6 / reps as f64;
    let c = thread_cpu();
    let mut x = 0u64;
    for _ in 0..1000 {
        x = x.wrapping_add(sim.hub.poll_timeout().map_or(0, |t| t.elapsed().as_nanos() as u64));
    }
    let per_poll = (thread_cpu() - c) * 1e6 / 1000.0;
    println!("routing + encrypting one packet to a random peer: {per_packet:.2} us cpu; poll_timeout: {per_poll:.2} us cpu ({x})");

    // Idle: drive the node's timers in real time, as the daemon does. The
    // first 10 s (peers just active: fast path keepalives) are not counted.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(10) {
        let deadline = sim.hub.poll_timeout().unwrap_or(settle + Duration::from_secs(1));
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(1)));
        let now = Instant::now();
        sim.hub(|h| h.handle_timeout(now));
        while let Some(t) = sim.hub(|h| h.poll_transmit()) {
            if let Some(&i) = sim.by_endpoint.get(&t.dst) {
                for b in sim.peer_answers(i, &t.payload) {
                    sim.hub(|h| h.handle_udp(t.dst, &b, now));
                }
            }
        }
    }
    sim.hub_cpu = 0.0;
    let start = Instant::now();
    let mut wakeups = 0u64;
    let mut sent = 0u64;
    let mut probes = 0u64;
    while start.elapsed().as_secs_f64() < idle_secs {
        let deadline = sim.hub.poll_timeout().unwrap_or(start + Duration::from_secs(1));
        let wait = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(wait.min(Duration::from_secs(1)));
        let now = Instant::now();
        sim.hub(|h| h.handle_timeout(now));
        wakeups += 1;
        let before = sim.delivered;
        while let Some(t) = sim.hub(|h| h.poll_transmit()) {
            sent += 1;
            if t.payload.starts_with(&meshtun_overlay::probe::PROBE_MAGIC) {
                probes += 1;
            }
            if let Some(&i) = sim.by_endpoint.get(&t.dst) {
                for b in sim.peer_answers(i, &t.payload) {
                    sim.hub(|h| h.handle_udp(t.dst, &b, now));
                }
            }
        }
        let _ = before;
        // The daemon asks for the next deadline after every wake-up.
        let _ = sim.hub(|h| h.poll_timeout());
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "idle {secs:.0} s with {n} sessions: node cpu {:.2}% of one core, {:.1} wake-ups/s, {:.0} datagrams/s sent ({:.0}/s path probes, the rest WireGuard keepalives and timers)",
        sim.hub_cpu * 100.0 / secs,
        wakeups as f64 / secs,
        sent as f64 / secs,
        probes as f64 / secs
    );
}
