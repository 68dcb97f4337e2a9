//! Two overlay nodes and a backbone on an in-memory network: no root, no
//! sockets, simulated time. Drives the real cores end to end.

use std::collections::BinaryHeap;
use std::cmp::Reverse;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use etherparse::PacketBuilder;
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_overlay::{DropReason, Node, NodeConfig};
use meshtun_proto::Identity;

const BACKBONE: &str = "198.18.0.1:7400";
const A: &str = "198.18.0.2:51820";
const B: &str = "198.18.0.3:51820";
const LATENCY: Duration = Duration::from_millis(10);

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A datagram in flight, ordered by arrival time then sequence.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Instant,
    seq: u64,
    from: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
}

struct Sim {
    now: Instant,
    backbone: Directory,
    nodes: Vec<(SocketAddr, Node)>,
    wire: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    /// Packets each node wrote to its TUN.
    delivered: Vec<Vec<Vec<u8>>>,
    /// Every datagram that crossed the wire, for eavesdropping checks.
    seen_on_wire: Vec<Vec<u8>>,
}

impl Sim {
    fn new(hostnames: &[(&str, Option<&str>)]) -> Sim {
        let now = Instant::now();
        let nodes = hostnames
            .iter()
            .enumerate()
            .map(|(i, (addr, hostname))| {
                let identity = Identity::generate([i as u8 + 1; 32]);
                let config = NodeConfig {
                    hostname: hostname.map(str::to_string),
                    backbones: vec![sock(BACKBONE)],
                    local_endpoints: vec![sock(addr)],
                    heartbeat_interval: Duration::from_secs(5),
                    rng_seed: i as u64,
                    ..NodeConfig::default()
                };
                let wg = StaticSecret::from([i as u8 + 100; 32]);
                (sock(addr), Node::new(config, identity, wg, now))
            })
            .collect::<Vec<_>>();
        let n = nodes.len();
        Sim {
            now,
            backbone: Directory::new(DirectoryConfig::default()),
            nodes,
            wire: BinaryHeap::new(),
            seq: 0,
            delivered: vec![Vec::new(); n],
            seen_on_wire: Vec::new(),
        }
    }

    fn send(&mut self, from: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
        self.seq += 1;
        self.seen_on_wire.push(payload.clone());
        self.wire.push(Reverse(InFlight { at: self.now + LATENCY, seq: self.seq, from, to, payload }));
    }

    /// Moves everything the cores want to send onto the wire.
    fn collect(&mut self) {
        while let Some(t) = self.backbone.poll_transmit() {
            self.send(sock(BACKBONE), t.dst, t.payload);
        }
        for i in 0..self.nodes.len() {
            let from = self.nodes[i].0;
            while let Some(t) = self.nodes[i].1.poll_transmit() {
                self.send(from, t.dst, t.payload);
            }
            while let Some(packet) = self.nodes[i].1.poll_tun() {
                self.delivered[i].push(packet);
            }
            while self.nodes[i].1.poll_event().is_some() {}
        }
    }

    /// Runs the network until `until`, advancing time to each next event.
    fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        loop {
            self.collect();
            let next_wire = self.wire.peek().map(|Reverse(f)| f.at);
            let next_timer = self
                .nodes
                .iter()
                .filter_map(|(_, n)| n.poll_timeout())
                .chain(self.backbone.poll_timeout())
                .min();
            let Some(next) = [next_wire, next_timer].into_iter().flatten().min() else { break };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            while self.wire.peek().is_some_and(|Reverse(f)| f.at <= self.now) {
                let Reverse(f) = self.wire.pop().unwrap();
                if f.to == sock(BACKBONE) {
                    self.backbone.handle_datagram(f.from, &f.payload, self.now);
                } else if let Some((_, node)) = self.nodes.iter_mut().find(|(a, _)| *a == f.to) {
                    node.handle_udp(f.from, &f.payload, self.now);
                }
            }
            let now = self.now;
            self.backbone.handle_timeout(now);
            for (_, node) in &mut self.nodes {
                if node.poll_timeout().is_some_and(|t| t <= now) {
                    node.handle_timeout(now);
                }
            }
        }
        self.now = until;
    }

    fn node(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i].1
    }

    fn inject(&mut self, i: usize, packet: Vec<u8>) {
        let now = self.now;
        self.nodes[i].1.handle_tun_packet(&packet, now);
    }
}

fn echo_request(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).icmpv6_echo_request(7, 1);
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

#[test]
fn first_packet_to_an_unknown_peer_is_looked_up_encrypted_and_delivered() {
    let mut sim = Sim::new(&[(A, Some("alpha")), (B, Some("beta"))]);
    sim.run_for(Duration::from_secs(1)); // both register
    assert_eq!(sim.backbone.len(), 2);

    let (a_ip, b_ip) = (sim.node(0).mesh_ip(), sim.node(1).mesh_ip());
    let marker = b"SECRET-MARKER-0123456789";
    let packet = echo_request(a_ip, b_ip, marker);
    sim.inject(0, packet.clone());
    sim.run_for(Duration::from_secs(2));

    assert_eq!(sim.delivered[1], vec![packet], "B's TUN got exactly the packet A sent");
    assert!(
        !sim.seen_on_wire.iter().any(|d| d.windows(marker.len()).any(|w| w == marker)),
        "plaintext crossed the wire"
    );
    // And the way back uses the session without another lookup.
    let reply = echo_request(b_ip, a_ip, b"pong");
    sim.inject(1, reply.clone());
    sim.run_for(Duration::from_millis(100));
    assert_eq!(sim.delivered[0], vec![reply]);
    let now = sim.now;
    let status = sim.node(0).status(now);
    assert_eq!(status.peers.len(), 1);
    assert_eq!(status.peers[0].endpoint, Some(sock(B)));
}

#[test]
fn packets_to_an_unregistered_address_get_icmpv6_unreachable() {
    let mut sim = Sim::new(&[(A, None), (B, None)]);
    sim.run_for(Duration::from_secs(1));
    let a_ip = sim.node(0).mesh_ip();
    let nobody: Ipv6Addr = "fd4d:6573:6874::1234:5678:9abc".parse().unwrap();
    sim.inject(0, echo_request(a_ip, nobody, b"hello?"));
    sim.run_for(Duration::from_secs(2));
    assert_eq!(sim.delivered[0].len(), 1, "one ICMPv6 error came back");
    let delivered = sim.delivered[0][0].clone();
    let error = etherparse::SlicedPacket::from_ip(&delivered).unwrap();
    assert!(matches!(
        error.transport,
        Some(etherparse::TransportSlice::Icmpv6(ref icmp))
            if matches!(icmp.icmp_type(), etherparse::Icmpv6Type::DestinationUnreachable(_))
    ));
    assert_eq!(sim.node(0).stats().dropped(DropReason::LookupFailed), 1);
}

#[test]
fn a_peer_cannot_send_from_another_nodes_mesh_address() {
    let mut sim = Sim::new(&[(A, None), (B, None), ("198.18.0.4:51820", None)]);
    sim.run_for(Duration::from_secs(1));
    let (a_ip, b_ip, c_ip) = (sim.node(0).mesh_ip(), sim.node(1).mesh_ip(), sim.node(2).mesh_ip());
    // C establishes a session with B legitimately...
    sim.inject(2, echo_request(c_ip, b_ip, b"hi"));
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.delivered[1].len(), 1);
    // ...then sends, inside that session, a packet claiming to be from A. C's
    // kernel would not do that, so hand it to the core as if it had.
    sim.inject(2, echo_request(a_ip, b_ip, b"spoof"));
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.delivered[1].len(), 1, "spoofed packet was not delivered");
    assert_eq!(sim.node(1).stats().dropped(DropReason::SpoofedSource), 1);
}

#[test]
fn non_mesh_and_malformed_input_is_dropped_and_counted() {
    let mut sim = Sim::new(&[(A, None)]);
    sim.run_for(Duration::from_millis(100));
    let a_ip = sim.node(0).mesh_ip();
    // A router solicitation to ff02::2, IPv4, and garbage.
    sim.inject(0, echo_request(a_ip, "ff02::2".parse().unwrap(), b""));
    sim.inject(0, vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
    sim.inject(0, vec![0x60, 1, 2]);
    let now = sim.now;
    for junk in [&b""[..], b"\x04\x00\x00\x00short", b"MT\x01\xff", b"random junk"] {
        sim.node(0).handle_udp(sock(B), junk, now);
    }
    let stats = sim.node(0).stats().clone();
    // The RS and the IPv4 packet to an address outside 100.64.0.0/10.
    assert_eq!(stats.dropped.no_route, 2);
    assert!(stats.dropped.malformed >= 4, "{stats:?}");
    assert!(sim.delivered[0].is_empty());
}

#[test]
fn a_node_backs_off_while_its_backbone_is_unreachable() {
    let now = Instant::now();
    let config = NodeConfig {
        backbones: vec![sock(BACKBONE)],
        local_endpoints: vec![sock(A)],
        ..NodeConfig::default()
    };
    let mut node = Node::new(config, Identity::generate([9; 32]), StaticSecret::from([3; 32]), now);
    let mut t = now;
    let mut sent_at = Vec::new();
    // Nobody answers for two minutes.
    while t < now + Duration::from_secs(120) {
        node.handle_timeout(t);
        while node.poll_transmit().is_some() {
            sent_at.push(t - now);
        }
        t = node.poll_timeout().unwrap().max(t + Duration::from_millis(1));
    }
    let status = node.status(t);
    assert_eq!(status.backbones[0].state, meshtun_overlay::BackboneState::Unreachable);
    // Backoff: gaps grow, capped at the configured maximum (30 s).
    let gaps: Vec<_> = sent_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
    assert!(gaps.iter().all(|g| *g <= Duration::from_secs(30)));
    assert!(sent_at.len() < 15, "retries back off: {sent_at:?}");
}

#[test]
fn the_backlog_counts_datagrams_and_tun_packets_until_the_driver_takes_them() {
    let mut sim = Sim::new(&[(A, None), (B, None)]);
    sim.run_for(Duration::from_secs(1));
    let (a_ip, b_ip) = (sim.node(0).mesh_ip(), sim.node(1).mesh_ip());
    sim.inject(0, echo_request(a_ip, b_ip, b"first"));
    sim.run_for(Duration::from_secs(2)); // lookup, handshake, delivery
    assert_eq!(sim.delivered[1].len(), 1);
    assert_eq!((sim.node(0).backlog(), sim.node(1).backlog()), (0, 0));

    for i in 0..3u8 {
        sim.inject(0, echo_request(a_ip, b_ip, &[i; 100]));
    }
    assert_eq!(sim.node(0).backlog(), 3, "three datagrams wait to be sent");
    let now = sim.now;
    while let Some(t) = sim.node(0).poll_transmit() {
        assert_eq!(t.dst, sock(B));
        sim.node(1).handle_udp(sock(A), &t.payload, now);
    }
    assert_eq!(sim.node(0).backlog(), 0);
    assert_eq!(sim.node(1).backlog(), 3, "three packets wait for B's TUN");
    while sim.node(1).poll_tun().is_some() {}
    assert_eq!(sim.node(1).backlog(), 0);
}
