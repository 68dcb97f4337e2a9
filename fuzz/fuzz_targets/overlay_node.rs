//! The node engine as a state machine: a sequence of operations on one
//! `meshtun_overlay::Node`, each one input from the network or the TUN
//! (raw bytes, or backbone replies, probes and WireGuard traffic that the
//! harness builds from fuzzer-chosen fields, signs and MACs as the real
//! senders would, with real boringtun peers on the other end), an API call
//! or a clock step. After every step all outputs (transmits, TUN packets,
//! events, answers) are drained, checked and fed to the harness peers.
#![no_main]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use meshtun_addr::{MeshAddr, NetworkId, NodeAddr};
use meshtun_fuzz::{identity, owner, wg_public, wg_secret, Addr, Label, RecordSpec, IDENTITY_PARTS, OWNER_NETWORK};
use meshtun_nat::{classify, DatagramKind};
use meshtun_overlay::probe::{self, Probe, ProbeKind};
use meshtun_overlay::{Node, NodeConfig, MAX_PACKET};
use meshtun_proto::{relay, Message, Query, RejectCode, MAX_MESSAGE_LEN};

fn backbone() -> SocketAddr {
    "198.18.0.100:7000".parse().expect("literal")
}

#[derive(Arbitrary, Debug)]
enum Op {
    Udp { from: Addr, datagram: Vec<u8> },
    UdpFromBackbone { datagram: Vec<u8> },
    Tun { packet: Vec<u8> },
    TunTo { to: Peer, v4: bool, payload: Vec<u8> },
    TunToGroup { name: Label, payload: Vec<u8> },
    Backbone(Reply),
    Probe { peer: u8, from: Addr, kind: ProbeSpec },
    PeerWg { peer: u8, from: Addr, via_relay: bool, action: WgAction },
    Query(QuerySpec),
    Ping(Peer),
    LearnGroup(Label),
    SetEndpoints(Vec<Addr>),
    SetTags { hostname: Option<Label>, capabilities: Vec<Label>, groups: Vec<Label> },
    Advance { millis: u32 },
    UnixTime(u64),
    RotateWgKey { secret: [u8; 32], version: u32, expires_unix: u64 },
    Shutdown,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Run the node in the owner's private network, with a certificate.
    private: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Peer {
    Known(u8),
    Raw([u8; 6]),
}

impl Peer {
    fn addr(&self, network: NetworkId) -> MeshAddr {
        match self {
            Peer::Known(i) => identity(*i).mesh_addr(network),
            Peer::Raw(node) => MeshAddr::new(network, NodeAddr::from_bytes(*node)),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum QuerySpec {
    Address(Peer),
    Hostname(Label),
    WgKey(u8),
    Capability(Label),
    Group(Label),
    Ipv4(Peer),
}

impl QuerySpec {
    fn query(&self, network: NetworkId) -> Query {
        match self {
            QuerySpec::Address(p) => Query::Address(p.addr(network)),
            QuerySpec::Hostname(l) => Query::Hostname { network, name: l.get() },
            QuerySpec::WgKey(i) => Query::WgKey { network, key: wg_public(*i) },
            QuerySpec::Capability(l) => Query::Capability { network, name: l.get() },
            QuerySpec::Group(l) => Query::Group { network, name: l.get() },
            QuerySpec::Ipv4(p) => Query::Ipv4 { network, addr: meshtun_addr::canonical_ipv4(p.addr(network)).octets() },
        }
    }
}

/// A request id: one the node sent (most recent first), or any.
#[derive(Arbitrary, Debug)]
enum Rid {
    Seen(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Reply {
    RegisterAck { id: Rid, observed: Addr, ttl_secs: u32 },
    DeregisterAck { id: Rid },
    LookupReply { id: Rid, records: Vec<RecordSpec> },
    Reject { id: Rid, code: u8, detail: String },
    PeerIntent { record: RecordSpec },
    Revocations { seq: u64, serials: Vec<u64> },
}

#[derive(Arbitrary, Debug)]
enum ProbeSpec {
    Ping { txid: [u8; 12] },
    /// Answers one of the pings the node sent (most recent first).
    Pong { seen: u8, observed: Addr },
    PongRaw { txid: [u8; 12], observed: Addr },
}

#[derive(Arbitrary, Debug)]
enum WgAction {
    Initiate,
    /// Hands the peer the next WireGuard datagram the node sent.
    Deliver,
    /// The peer sends an IP packet (from its mesh address to ours).
    Send { payload: Vec<u8>, v4: bool },
    Tick,
}

struct Harness {
    node: Node,
    network: NetworkId,
    now: Instant,
    request_ids: Vec<u64>,
    /// (peer index, txid) of pings the node sent.
    pings: Vec<(u8, [u8; 12])>,
    /// WireGuard datagrams the node sent, direct or unwrapped from relay frames.
    wire: VecDeque<Vec<u8>>,
    tunns: Vec<Option<Tunn>>,
    buf: Vec<u8>,
}

impl Harness {
    fn new(private: bool) -> Harness {
        let now = Instant::now();
        let mut config = NodeConfig {
            backbones: vec![backbone()],
            local_endpoints: vec!["198.18.0.50:51820".parse().expect("literal")],
            groups: vec!["ops".into()],
            ..NodeConfig::default()
        };
        if private {
            let owner = owner();
            config.network = OWNER_NETWORK;
            config.network_owner = Some(owner.public_key());
            config.certificate = Some(owner.sign_membership(identity(0).node_addr(), vec!["ops".into()], u64::MAX, 1));
        }
        let network = config.network;
        let node = Node::new(config, identity(0).clone(), StaticSecret::from(wg_secret(0)), now);
        Harness {
            node,
            network,
            now,
            request_ids: Vec::new(),
            pings: Vec::new(),
            wire: VecDeque::new(),
            tunns: (0..IDENTITY_PARTS.len()).map(|_| None).collect(),
            buf: vec![0; MAX_PACKET + 256],
        }
    }

    fn rid(&self, rid: &Rid) -> u64 {
        match rid {
            Rid::Seen(i) if !self.request_ids.is_empty() => {
                self.request_ids[self.request_ids.len() - 1 - usize::from(*i) % self.request_ids.len()]
            }
            Rid::Seen(_) => 0,
            Rid::Raw(id) => *id,
        }
    }

    fn peer_index(i: u8) -> u8 {
        // Peer 0 is the node itself.
        1 + i % (IDENTITY_PARTS.len() as u8 - 1)
    }

    fn probe_key(&self, peer: u8) -> [u8; 32] {
        probe::probe_key(&StaticSecret::from(wg_secret(peer)), &PublicKey::from(self.node.wg_public_key()))
    }

    fn tunn(&mut self, peer: u8) -> &mut Tunn {
        let node_key = PublicKey::from(self.node.wg_public_key());
        self.tunns[usize::from(peer)].get_or_insert_with(|| {
            Tunn::new(StaticSecret::from(wg_secret(peer)), node_key, None, None, u32::from(peer), None)
        })
    }

    /// Sends what a harness peer produced, directly or through the relay.
    fn peer_send(&mut self, peer: u8, from: SocketAddr, via_relay: bool, datagram: Vec<u8>) {
        if via_relay {
            let framed = relay::wrap(identity(peer).mesh_addr(self.network), &datagram);
            self.node.handle_udp(backbone(), &framed, self.now);
        } else {
            self.node.handle_udp(from, &datagram, self.now);
        }
    }

    fn step(&mut self, op: Op) {
        let now = self.now;
        match op {
            Op::Udp { from, datagram } => self.node.handle_udp(from.get(), &datagram, now),
            Op::UdpFromBackbone { datagram } => self.node.handle_udp(backbone(), &datagram, now),
            Op::Tun { packet } => self.node.handle_tun_packet(&packet, now),
            Op::TunTo { to, v4, payload } => {
                let packet = ip_packet(self.node.mesh_addr(), to.addr(self.network), v4, &payload);
                self.node.handle_tun_packet(&packet, now);
            }
            Op::TunToGroup { name, payload } => {
                let group = meshtun_addr::group_multicast_addr(self.network, &name.get());
                let builder = etherparse::PacketBuilder::ipv6(self.node.mesh_ip().octets(), group.octets(), 1).udp(5, 5);
                let mut packet = Vec::new();
                if builder.write(&mut packet, &payload).is_ok() {
                    self.node.handle_tun_packet(&packet, now);
                }
            }
            Op::Backbone(reply) => {
                let message = match reply {
                    Reply::RegisterAck { id, observed, ttl_secs } => {
                        Message::RegisterAck { request_id: self.rid(&id), observed: observed.get(), ttl_secs }
                    }
                    Reply::DeregisterAck { id } => Message::DeregisterAck { request_id: self.rid(&id) },
                    Reply::LookupReply { id, records } => Message::LookupReply {
                        request_id: self.rid(&id),
                        records: records.iter().take(8).map(RecordSpec::signed).collect(),
                    },
                    Reply::Reject { id, code, detail } => {
                        const CODES: [RejectCode; 7] = [
                            RejectCode::Malformed,
                            RejectCode::BadSignature,
                            RejectCode::AddressNotDerived,
                            RejectCode::StaleSequence,
                            RejectCode::HostnameTaken,
                            RejectCode::NotRegistered,
                            RejectCode::UnknownNode,
                        ];
                        let code = CODES[usize::from(code) % CODES.len()];
                        Message::Reject { request_id: self.rid(&id), code, detail }
                    }
                    Reply::PeerIntent { record } => Message::PeerIntent { record: record.signed() },
                    Reply::Revocations { seq, serials } => {
                        Message::Revocations { list: owner().sign_revocations(seq, serials) }
                    }
                };
                self.node.handle_udp(backbone(), &message.encode(), now);
            }
            Op::Probe { peer, from, kind } => {
                let peer = Self::peer_index(peer);
                let (kind, txid) = match kind {
                    ProbeSpec::Ping { txid } => (ProbeKind::Ping, txid),
                    ProbeSpec::Pong { seen, observed } => {
                        let mine: Vec<[u8; 12]> =
                            self.pings.iter().filter(|(p, _)| *p == peer).map(|(_, t)| *t).collect();
                        let txid = if mine.is_empty() { [0; 12] } else { mine[mine.len() - 1 - usize::from(seen) % mine.len()] };
                        (ProbeKind::Pong(observed.get()), txid)
                    }
                    ProbeSpec::PongRaw { txid, observed } => (ProbeKind::Pong(observed.get()), txid),
                };
                let probe = Probe { kind, sender: wg_public(peer), txid };
                let wire = probe::encode(&probe, &self.probe_key(peer));
                self.node.handle_udp(from.get(), &wire, now);
            }
            Op::PeerWg { peer, from, via_relay, action } => {
                let peer = Self::peer_index(peer);
                let from = from.get();
                let mut out = Vec::new();
                let mut buf = std::mem::take(&mut self.buf);
                match action {
                    WgAction::Initiate => {
                        if let TunnResult::WriteToNetwork(d) = self.tunn(peer).format_handshake_initiation(&mut buf, true) {
                            out.push(d.to_vec());
                        }
                    }
                    WgAction::Deliver => {
                        if let Some(datagram) = self.wire.pop_front() {
                            let tunn = self.tunn(peer);
                            let mut input: &[u8] = &datagram;
                            loop {
                                match tunn.decapsulate(Some(from.ip()), input, &mut buf) {
                                    TunnResult::WriteToNetwork(d) => out.push(d.to_vec()),
                                    _ => break,
                                }
                                input = &[];
                            }
                        }
                    }
                    WgAction::Send { payload, v4 } => {
                        let me = self.node.mesh_addr();
                        let packet = ip_packet(identity(peer).mesh_addr(self.network), me, v4, &payload);
                        if let TunnResult::WriteToNetwork(d) = self.tunn(peer).encapsulate(&packet, &mut buf) {
                            out.push(d.to_vec());
                        }
                    }
                    WgAction::Tick => {
                        if let TunnResult::WriteToNetwork(d) = self.tunn(peer).update_timers(&mut buf) {
                            out.push(d.to_vec());
                        }
                    }
                }
                self.buf = buf;
                for datagram in out {
                    self.peer_send(peer, from, via_relay, datagram);
                }
            }
            Op::Query(q) => {
                self.node.query(q.query(self.network), now);
            }
            Op::Ping(p) => {
                self.node.ping(p.addr(self.network), now);
            }
            Op::LearnGroup(name) => self.node.learn_group_name(name.get()),
            Op::SetEndpoints(endpoints) => {
                self.node.set_local_endpoints(endpoints.iter().take(20).map(|a| a.get()).collect(), now)
            }
            Op::SetTags { hostname, capabilities, groups } => self.node.set_tags(
                hostname.map(|h| h.get()),
                capabilities.iter().take(40).map(Label::get).collect(),
                groups.iter().take(40).map(Label::get).collect(),
                now,
            ),
            Op::Advance { millis } => {
                self.now += Duration::from_millis(u64::from(millis % 120_000));
                self.node.handle_timeout(self.now);
            }
            Op::UnixTime(secs) => self.node.set_unix_time(secs),
            Op::RotateWgKey { secret, version, expires_unix } => {
                self.node.rotate_wg_key(StaticSecret::from(secret), version, expires_unix, now);
                // The harness peers knew the old key: they start over.
                self.tunns.iter_mut().for_each(|t| *t = None);
            }
            Op::Shutdown => self.node.shutdown(now),
        }
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(t) = self.node.poll_transmit() {
            match classify(&t.payload) {
                DatagramKind::Backbone => {
                    assert_eq!(t.dst, backbone(), "backbone message to a non-backbone");
                    assert!(t.payload.len() <= MAX_MESSAGE_LEN);
                    match Message::decode(&t.payload).expect("node sends decodable messages") {
                        Message::Register { request_id, .. }
                        | Message::Deregister { request_id, .. }
                        | Message::Lookup { request_id, .. } => self.request_ids.push(request_id),
                        other => panic!("node sent {other:?}"),
                    }
                }
                DatagramKind::Probe => {
                    assert_eq!(probe::peek_sender(&t.payload), Some(self.node.wg_public_key()));
                    for peer in 1..IDENTITY_PARTS.len() as u8 {
                        if let Some(p) = probe::decode(&t.payload, &self.probe_key(peer)) {
                            if p.kind == ProbeKind::Ping {
                                self.pings.push((peer, p.txid));
                            }
                        }
                    }
                }
                DatagramKind::WireGuard => self.wire.push_back(t.payload),
                DatagramKind::Relay => {
                    assert_eq!(t.dst, backbone(), "relay frame to a non-backbone");
                    let (_, inner) = relay::unwrap(&t.payload).expect("relay frame unwraps");
                    assert_eq!(classify(inner), DatagramKind::WireGuard);
                    self.wire.push_back(inner.to_vec());
                }
                other => panic!("node sent a {other:?} datagram to {}", t.dst),
            }
        }
        while self.wire.len() > 32 {
            self.wire.pop_front();
        }
        self.request_ids.drain(..self.request_ids.len().saturating_sub(32));
        self.pings.drain(..self.pings.len().saturating_sub(32));
        while let Some(packet) = self.node.poll_tun() {
            assert!(packet.len() <= MAX_PACKET);
            assert!(matches!(packet.first().map(|b| b >> 4), Some(4 | 6)), "non-IP packet to the TUN");
        }
        while self.node.poll_event().is_some() {}
        while self.node.poll_answer().is_some() {}
        let _ = self.node.poll_timeout();
        let _ = self.node.status(self.now);
    }
}

fn ip_packet(src: MeshAddr, dst: MeshAddr, v4: bool, payload: &[u8]) -> Vec<u8> {
    let builder = if v4 {
        let (s, d) = (meshtun_addr::canonical_ipv4(src).octets(), meshtun_addr::canonical_ipv4(dst).octets());
        etherparse::PacketBuilder::ipv4(s, d, 64).udp(4000, 5000)
    } else {
        etherparse::PacketBuilder::ipv6(src.to_ipv6().octets(), dst.to_ipv6().octets(), 64).udp(4000, 5000)
    };
    let mut packet = Vec::new();
    let _ = builder.write(&mut packet, payload);
    packet
}

fuzz_target!(|input: Input| {
    let mut h = Harness::new(input.private);
    h.drain();
    for op in input.ops.into_iter().take(64) {
        h.step(op);
    }
});
