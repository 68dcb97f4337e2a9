//! A deterministic in-process network for protocol tests: hosts running the
//! real overlay core, NAT boxes with RFC 4787 mapping and filtering
//! behaviours and mapping expiry, a backbone running the real directory,
//! latency and seeded loss. Time is simulated; no sockets, no root.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use etherparse::PacketBuilder;
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_nat::{FilteringBehavior, MappingBehavior};
use meshtun_overlay::{Node, NodeConfig, NodeStatus};
use meshtun_proto::Identity;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const BACKBONE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 7400);
pub const BACKBONE2: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 7400);

/// A second backbone (see [`Net::add_second_backbone`]).
pub struct ExtraBackbone {
    pub addr: SocketAddr,
    pub dir: Directory,
    pub up: bool,
}
pub const PORT: u16 = 51820;

/// A NAT type as the tests name it.
pub type NatType = Option<(MappingBehavior, FilteringBehavior)>;

/// Identities are expensive (proof of work): make a few once, share them.
pub fn identity(i: usize) -> Identity {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| (0..4u8).map(|n| Identity::generate([n + 40; 32])).collect())[i].clone()
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum MapKey {
    Any,
    Ip(IpAddr),
    Exact(SocketAddr),
}

struct Mapping {
    internal: SocketAddr,
    key: MapKey,
    external_port: u16,
    sent_to: HashSet<SocketAddr>,
    expires: Instant,
}

/// A NAT box (RFC 4787 behaviours); drops unsolicited input like a home router.
pub struct NatBox {
    pub public_ip: IpAddr,
    pub mapping: MappingBehavior,
    pub filtering: FilteringBehavior,
    pub timeout: Duration,
    next_port: u16,
    table: Vec<Mapping>,
}

impl NatBox {
    pub fn new(public_ip: IpAddr, mapping: MappingBehavior, filtering: FilteringBehavior) -> NatBox {
        NatBox { public_ip, mapping, filtering, timeout: Duration::from_secs(60), next_port: 40000, table: Vec::new() }
    }

    /// Forgets every mapping (a router reboot).
    pub fn flush(&mut self) {
        self.table.clear();
        self.next_port += 1000;
    }

    fn outbound(&mut self, src: SocketAddr, dst: SocketAddr, now: Instant) -> SocketAddr {
        self.table.retain(|m| m.expires > now);
        let key = match self.mapping {
            MappingBehavior::EndpointIndependent => MapKey::Any,
            MappingBehavior::AddressDependent => MapKey::Ip(dst.ip()),
            MappingBehavior::AddressAndPortDependent => MapKey::Exact(dst),
        };
        let timeout = self.timeout;
        let index = match self.table.iter().position(|m| m.internal == src && m.key == key) {
            Some(i) => i,
            None => {
                self.next_port += 1;
                self.table.push(Mapping {
                    internal: src,
                    key,
                    external_port: self.next_port,
                    sent_to: HashSet::new(),
                    expires: now,
                });
                self.table.len() - 1
            }
        };
        let m = &mut self.table[index];
        m.sent_to.insert(dst);
        m.expires = now + timeout;
        SocketAddr::new(self.public_ip, m.external_port)
    }

    fn inbound(&mut self, from: SocketAddr, port: u16, now: Instant) -> Option<SocketAddr> {
        self.table.retain(|m| m.expires > now);
        let m = self.table.iter().find(|m| m.external_port == port)?;
        let allowed = match self.filtering {
            FilteringBehavior::EndpointIndependent => true,
            FilteringBehavior::AddressDependent => m.sent_to.iter().any(|d| d.ip() == from.ip()),
            FilteringBehavior::AddressAndPortDependent => m.sent_to.contains(&from),
        };
        allowed.then_some(m.internal)
    }
}

pub struct Host {
    pub internal: SocketAddr,
    pub nat: Option<usize>,
    pub node: Node,
    pub delivered: Vec<Vec<u8>>,
    pub events: Vec<meshtun_overlay::Event>,
    pub answers: Vec<meshtun_overlay::Answer>,
    /// How often the node's own deadline woke it (its `handle_timeout`).
    pub timer_wakeups: u64,
    /// Datagrams handed to the node, by the address they came from.
    pub datagrams_from: std::collections::HashMap<SocketAddr, u64>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Instant,
    seq: u64,
    from: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
}

pub struct Net {
    pub start: Instant,
    pub now: Instant,
    pub backbone: Directory,
    pub backbone_up: bool,
    pub extra: Vec<ExtraBackbone>,
    /// Hosts answer ICMPv6 echo requests delivered to them, as a kernel would.
    pub auto_echo: bool,
    pub hosts: Vec<Host>,
    pub nats: Vec<NatBox>,
    wire: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    rng: ChaCha8Rng,
    pub loss: f64,
    pub latency: Duration,
    pub heartbeat: Duration,
    /// How late a node's timers run after their deadline, as a real
    /// driver's wake-up is: timers that reschedule from `now` drift by it.
    pub timer_latency: Duration,
    /// Datagrams from the first address to the second are dropped: a path
    /// broken in one direction only.
    pub blocked: Vec<(IpAddr, IpAddr)>,
}

impl Net {
    pub fn new(seed: u64) -> Net {
        let now = Instant::now();
        Net {
            start: now,
            now,
            backbone: Directory::new(DirectoryConfig::default()),
            backbone_up: true,
            extra: Vec::new(),
            auto_echo: true,
            hosts: Vec::new(),
            nats: Vec::new(),
            wire: BinaryHeap::new(),
            seq: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            loss: 0.0,
            latency: Duration::from_millis(10),
            heartbeat: Duration::from_secs(5),
            timer_latency: Duration::ZERO,
            blocked: Vec::new(),
        }
    }

    /// Adds a NAT with public address 198.18.(100+n).1 and returns its index.
    pub fn add_nat(&mut self, mapping: MappingBehavior, filtering: FilteringBehavior) -> usize {
        let n = self.nats.len();
        let ip = IpAddr::V4(Ipv4Addr::new(198, 18, 100 + n as u8, 1));
        self.nats.push(NatBox::new(ip, mapping, filtering));
        n
    }

    /// Adds a host behind `nat` (LAN 198.19.n.0/24) or public (198.18.1.x).
    pub fn add_host(&mut self, identity_index: usize, nat: Option<usize>) -> usize {
        self.add_host_with(identity_index, nat, |_| {})
    }

    /// Like [`Net::add_host`], letting the test adjust the node's config.
    pub fn add_host_with(&mut self, identity_index: usize, nat: Option<usize>, adjust: impl FnOnce(&mut NodeConfig)) -> usize {
        let i = self.hosts.len();
        let ip = match nat {
            Some(n) => Ipv4Addr::new(198, 19, n as u8, 10 + i as u8),
            None => Ipv4Addr::new(198, 18, 1, 10 + i as u8),
        };
        let internal = SocketAddr::new(IpAddr::V4(ip), PORT);
        let mut backbones = vec![BACKBONE];
        backbones.extend(self.extra.iter().map(|b| b.addr));
        let config = NodeConfig {
            backbones,
            local_endpoints: vec![internal],
            heartbeat_interval: self.heartbeat,
            rng_seed: i as u64 + 1,
            ..NodeConfig::default()
        };
        let mut config = config;
        adjust(&mut config);
        let node = Node::new(config, identity(identity_index), StaticSecret::from([i as u8 + 1; 32]), self.now);
        self.hosts.push(Host { internal, nat, node, delivered: Vec::new(), events: Vec::new(), answers: Vec::new(), timer_wakeups: 0, datagrams_from: Default::default() });
        i
    }

    /// Moves host `i` to another network (behind NAT `nat`, or public) with
    /// a fresh underlay address, and tells its node, as the driver does
    /// when the interfaces change. Its node, identity and sessions stay.
    pub fn move_host(&mut self, i: usize, nat: Option<usize>) {
        let ip = match nat {
            Some(n) => Ipv4Addr::new(198, 19, n as u8, 100 + i as u8),
            None => Ipv4Addr::new(198, 18, 2, 10 + i as u8),
        };
        let internal = SocketAddr::new(IpAddr::V4(ip), PORT);
        let now = self.now;
        let host = &mut self.hosts[i];
        host.internal = internal;
        host.nat = nat;
        host.node.set_local_endpoints(vec![internal], now);
    }

    /// Adds a second backbone; hosts added afterwards register with both.
    pub fn add_second_backbone(&mut self) {
        self.extra.push(ExtraBackbone { addr: BACKBONE2, dir: Directory::new(DirectoryConfig::default()), up: true });
    }

    /// Changes a host's hostname, capabilities and groups at run time.
    pub fn set_tags(&mut self, host: usize, hostname: Option<&str>, caps: &[&str], groups: &[&str]) {
        let now = self.now;
        self.hosts[host].node.set_tags(
            hostname.map(str::to_string),
            caps.iter().map(|s| s.to_string()).collect(),
            groups.iter().map(|s| s.to_string()).collect(),
            now,
        );
    }

    /// Asks host `i` a discovery query and runs until it answers.
    pub fn query(&mut self, i: usize, query: meshtun_proto::Query, limit: Duration) -> Option<meshtun_overlay::Answer> {
        let now = self.now;
        let token = self.hosts[i].node.query(query, now);
        let mut answer = None;
        let deadline = self.now + limit;
        self.run_until(deadline, |net| {
            answer = net.hosts[i].answers.iter().find(|a| answer_token(a) == token).cloned();
            answer.is_some()
        });
        answer
    }

    /// Adds a host behind a NAT of the given type (or public for `None`).
    pub fn add_host_behind(&mut self, identity_index: usize, nat: NatType) -> usize {
        let n = nat.map(|(m, f)| self.add_nat(m, f));
        self.add_host(identity_index, n)
    }

    /// Simulated wall-clock time: unix 1000 at the start.
    pub fn unix_time(&self) -> u64 {
        1_000 + (self.now - self.start).as_secs()
    }

    pub fn mesh_ip(&self, host: usize) -> Ipv6Addr {
        self.hosts[host].node.mesh_ip()
    }

    pub fn status(&self, host: usize) -> NodeStatus {
        self.hosts[host].node.status(self.now)
    }

    /// Hands a packet to host `i`'s engine as if read from its TUN.
    pub fn inject(&mut self, i: usize, packet: &[u8]) {
        let now = self.now;
        // As the daemon does at each wake-up: the hint must change nothing,
        // whatever state the node is in.
        self.hosts[i].node.prefetch_packet_path();
        self.hosts[i].node.handle_tun_packet(packet, now);
    }

    fn send(&mut self, src: SocketAddr, nat: Option<usize>, dst: SocketAddr, payload: Vec<u8>) {
        let from = match nat {
            // Hosts on one LAN reach each other without the NAT.
            Some(n) if self.hosts.iter().any(|h| h.nat == Some(n) && h.internal == dst) => src,
            Some(n) => self.nats[n].outbound(src, dst, self.now),
            None => src,
        };
        if self.loss > 0.0 && self.rng.gen_bool(self.loss) {
            return;
        }
        if self.blocked.contains(&(from.ip(), dst.ip())) {
            return;
        }
        self.seq += 1;
        self.wire.push(Reverse(InFlight { at: self.now + self.latency, seq: self.seq, from, to: dst, payload }));
    }

    fn collect(&mut self) {
        while let Some(t) = self.backbone.poll_transmit() {
            if self.backbone_up {
                self.send(BACKBONE, None, t.dst, t.payload);
            }
        }
        for i in 0..self.extra.len() {
            while let Some(t) = self.extra[i].dir.poll_transmit() {
                if self.extra[i].up {
                    let addr = self.extra[i].addr;
                    self.send(addr, None, t.dst, t.payload);
                }
            }
        }
        for i in 0..self.hosts.len() {
            let (src, nat) = (self.hosts[i].internal, self.hosts[i].nat);
            while let Some(t) = self.hosts[i].node.poll_transmit() {
                self.send(src, nat, t.dst, t.payload);
            }
            while let Some(p) = self.hosts[i].node.poll_tun() {
                if self.auto_echo {
                    if let Some(reply) = echo_reply_for(&p, self.hosts[i].node.mesh_ip()) {
                        let now = self.now;
                        self.hosts[i].node.handle_tun_packet(&reply, now);
                    }
                }
                self.hosts[i].delivered.push(p);
            }
            while let Some(a) = self.hosts[i].node.poll_answer() {
                self.hosts[i].answers.push(a);
            }
            while let Some(e) = self.hosts[i].node.poll_event() {
                self.hosts[i].events.push(e);
            }
        }
    }

    fn deliver(&mut self, f: InFlight) {
        let now = self.now;
        if f.to == BACKBONE {
            if self.backbone_up {
                self.backbone.handle_datagram(f.from, &f.payload, now);
            }
            return;
        }
        if let Some(b) = self.extra.iter_mut().find(|b| b.addr == f.to) {
            if b.up {
                b.dir.handle_datagram(f.from, &f.payload, now);
            }
            return;
        }
        // To a NAT's public address: through its filter.
        if let Some(n) = self.nats.iter().position(|nat| nat.public_ip == f.to.ip()) {
            if let Some(internal) = self.nats[n].inbound(f.from, f.to.port(), now) {
                if let Some(h) = self.hosts.iter_mut().find(|h| h.nat == Some(n) && h.internal == internal) {
                    h.node.prefetch_packet_path();
                    *h.datagrams_from.entry(f.from).or_default() += 1;
                    h.node.handle_udp(f.from, &f.payload, now);
                    // As the daemon does: buffers go back for reuse, so the
                    // simulations also prove a reused buffer carries only
                    // its new bytes.
                    h.node.recycle(f.payload);
                }
            }
            return;
        }
        // To a host's own address: public hosts, or LAN neighbours (the
        // sender's LAN; another LAN's private address goes nowhere).
        let sender_lan = self.hosts.iter().find(|h| h.internal == f.from).and_then(|h| h.nat);
        if let Some(h) = self.hosts.iter_mut().find(|h| h.internal == f.to) {
            if h.nat.is_none() || h.nat == sender_lan {
                h.node.prefetch_packet_path();
                *h.datagrams_from.entry(f.from).or_default() += 1;
                h.node.handle_udp(f.from, &f.payload, now);
                h.node.recycle(f.payload);
            }
        }
    }

    /// Runs the network for `duration` of simulated time.
    pub fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        self.run_until(until, |_| false);
    }

    /// Two public hosts (identities 0 and 1) on a direct path, past the
    /// quick probe rounds (the first 4 s), which probe every path.
    pub fn direct_pair(seed: u64) -> (Net, usize, usize) {
        let mut net = Net::new(seed);
        let a = net.add_host(0, None);
        let b = net.add_host(1, None);
        net.run_for(Duration::from_secs(1));
        net.ping(a, b, Duration::from_secs(2)).expect("first packet");
        net.run_for(Duration::from_secs(6));
        assert_eq!(net.path(a, b), "direct");
        (net, a, b)
    }

    /// Runs to the next multiple of `period` since the simulation's start:
    /// traffic sent at that pace keeps it whatever each step took.
    pub fn run_to_next(&mut self, period: Duration) {
        let spent = self.now - self.start;
        let next = period * (spent.as_nanos() / period.as_nanos() + 1) as u32;
        self.run_for(next - spent);
    }

    /// Runs until `done` says so or `limit` passes; returns the time taken.
    pub fn run_until(&mut self, limit: Instant, mut done: impl FnMut(&Net) -> bool) -> Option<Duration> {
        let started = self.now;
        loop {
            self.collect();
            if done(self) {
                return Some(self.now - started);
            }
            let next_wire = self.wire.peek().map(|Reverse(f)| f.at);
            let next_timer = self
                .hosts
                .iter()
                .filter_map(|h| h.node.poll_timeout().map(|t| t + self.timer_latency))
                .chain(self.backbone.poll_timeout())
                .chain(self.extra.iter().filter_map(|b| b.dir.poll_timeout()))
                .min();
            let Some(next) = [next_wire, next_timer].into_iter().flatten().min() else {
                self.now = limit;
                return None;
            };
            if next > limit {
                self.now = limit;
                return None;
            }
            self.now = self.now.max(next);
            while self.wire.peek().is_some_and(|Reverse(f)| f.at <= self.now) {
                let Reverse(f) = self.wire.pop().expect("peeked");
                self.deliver(f);
            }
            let now = self.now;
            let unix = self.unix_time();
            self.backbone.set_unix_time(unix);
            for h in &mut self.hosts {
                h.node.set_unix_time(unix);
            }
            self.backbone.handle_timeout(now);
            for b in &mut self.extra {
                b.dir.handle_timeout(now);
            }
            for h in &mut self.hosts {
                if h.node.poll_timeout().is_some_and(|t| t + self.timer_latency <= now) {
                    h.timer_wakeups += 1;
                    h.node.handle_timeout(now);
                }
            }
        }
    }

    /// Sends one ICMPv6 echo request from `a` to `b` and runs until `b`
    /// delivers it; returns how long that took.
    pub fn ping(&mut self, a: usize, b: usize, limit: Duration) -> Option<Duration> {
        let (src, dst) = (self.mesh_ip(a), self.mesh_ip(b));
        self.seq += 1;
        let packet = echo_request(src, dst, self.seq as u16, b"ping");
        let before = self.hosts[b].delivered.len();
        self.inject(a, &packet);
        let deadline = self.now + limit;
        self.run_until(deadline, |net| net.hosts[b].delivered[before..].contains(&packet))
    }

    /// Path kind ("direct"/"relay"/"none") host `a` uses towards host `b`.
    pub fn path(&self, a: usize, b: usize) -> String {
        let b_addr = self.hosts[b].node.mesh_addr().to_string();
        self.status(a)
            .peers
            .iter()
            .find(|p| p.address == b_addr)
            .map(|p| p.path.to_string())
            .unwrap_or_else(|| "none".into())
    }
}

pub fn answer_token(a: &meshtun_overlay::Answer) -> meshtun_overlay::Token {
    match a {
        meshtun_overlay::Answer::Query { token, .. } | meshtun_overlay::Answer::Pong { token, .. } => *token,
    }
}

/// What a kernel would answer to an ICMPv6 echo request addressed to `me`.
fn echo_reply_for(packet: &[u8], me: Ipv6Addr) -> Option<Vec<u8>> {
    let sliced = etherparse::SlicedPacket::from_ip(packet).ok()?;
    let (src, dst) = match &sliced.net {
        Some(etherparse::NetSlice::Ipv6(ip)) => (ip.header().source_addr(), ip.header().destination_addr()),
        _ => return None,
    };
    if dst != me {
        return None;
    }
    let Some(etherparse::TransportSlice::Icmpv6(icmp)) = &sliced.transport else { return None };
    let etherparse::Icmpv6Type::EchoRequest(echo) = icmp.icmp_type() else { return None };
    let builder = PacketBuilder::ipv6(me.octets(), src.octets(), 64).icmpv6_echo_reply(echo.id, echo.seq);
    let mut out = Vec::new();
    builder.write(&mut out, icmp.payload()).ok()?;
    Some(out)
}

pub fn echo_request(src: Ipv6Addr, dst: Ipv6Addr, seq: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).icmpv6_echo_request(7, seq);
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("writing to a Vec");
    out
}
