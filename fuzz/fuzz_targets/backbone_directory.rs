//! The backbone's directory as a state machine: a sequence of operations,
//! each one datagram into `Directory::handle_datagram_on` (raw bytes, or
//! registrations, lookups, deregistrations, relay frames and STUN requests
//! built and signed by the harness from fuzzer-chosen fields, so the input
//! gets past signature checks) or a clock step. After every step all
//! transmits are drained and checked: replies decode, STUN answers stay
//! small, relayed datagrams are never larger than what came in.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use meshtun_addr::{MeshAddr, NetworkId, NodeAddr};
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_fuzz::{identity, owner, wg_public, Addr, Label, RecordSpec, IDENTITY_PARTS, OWNER_NETWORK};
use meshtun_nat::{classify, DatagramKind};
use meshtun_proto::message::Deregistration;
use meshtun_proto::{relay, Message, Query, MAX_MESSAGE_LEN};

#[derive(Arbitrary, Debug)]
enum Op {
    Raw { local: u8, from: Addr, datagram: Vec<u8> },
    Register { local: u8, from: Addr, request_id: u64, record: RecordSpec },
    /// The same record fields registered for every fixed identity, each
    /// from its own pool address (fills the directory from little input).
    RegisterAll { record: RecordSpec },
    /// `from: None`: the asker's own pool address (where `RegisterAll`
    /// registered it).
    Lookup { local: u8, from: Option<Addr>, request_id: u64, asker: u8, network: u8, query: QuerySpec },
    Deregister { from: Addr, identity: u8, network: u8, seq: u64, signer: u8 },
    Relay { from: Addr, to: Peer, payload: Vec<u8> },
    Stun { local: u8, from: Addr, tid: [u8; 12] },
    Advance { millis: u32 },
    UnixTime(u64),
    Revocations { seq: u64, serials: Vec<u64> },
}

#[derive(Arbitrary, Debug)]
enum Peer {
    Known { identity: u8, network: u8 },
    Raw([u8; 2], [u8; 6]),
}

impl Peer {
    fn addr(&self) -> MeshAddr {
        match self {
            Peer::Known { identity: i, network } => identity(*i).mesh_addr(meshtun_fuzz::network(*network)),
            Peer::Raw(n, node) => MeshAddr::new(NetworkId(u16::from_be_bytes(*n)), NodeAddr::from_bytes(*node)),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum QuerySpec {
    Address(Peer),
    Hostname(Label),
    WgKey { identity: Option<u8>, raw: [u8; 32] },
    Capability(Label),
    Group(Label),
    Ipv4 { peer: Option<Peer>, raw: [u8; 4] },
}

impl QuerySpec {
    fn query(&self, network: NetworkId) -> Query {
        match self {
            QuerySpec::Address(p) => Query::Address(p.addr()),
            QuerySpec::Hostname(l) => Query::Hostname { network, name: l.get() },
            QuerySpec::WgKey { identity: i, raw } => {
                Query::WgKey { network, key: i.map(wg_public).unwrap_or(*raw) }
            }
            QuerySpec::Capability(l) => Query::Capability { network, name: l.get() },
            QuerySpec::Group(l) => Query::Group { network, name: l.get() },
            QuerySpec::Ipv4 { peer, raw } => Query::Ipv4 {
                network,
                addr: peer.as_ref().map(|p| meshtun_addr::canonical_ipv4(p.addr()).octets()).unwrap_or(*raw),
            },
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let start = Instant::now();
    let mut now = start;
    let config = DirectoryConfig {
        network_owners: [(OWNER_NETWORK, owner().public_key())].into_iter().collect(),
        ..DirectoryConfig::default()
    };
    let mut dir = Directory::new(config);
    for op in ops.into_iter().take(64) {
        let mut relayed_in = None;
        match op {
            Op::Raw { local, from, datagram } => {
                if classify(&datagram) == DatagramKind::Relay {
                    relayed_in = Some(datagram.len());
                }
                dir.handle_datagram_on(usize::from(local % 3), from.get(), &datagram, now);
            }
            Op::Register { local, from, request_id, record } => {
                let wire = Message::Register { request_id, record: record.signed() }.encode();
                dir.handle_datagram_on(usize::from(local % 3), from.get(), &wire, now);
            }
            Op::RegisterAll { mut record } => {
                for i in 0..IDENTITY_PARTS.len() as u8 {
                    record.identity = i;
                    let wire = Message::Register { request_id: 1, record: record.signed() }.encode();
                    dir.handle_datagram(Addr::Pool(i).get(), &wire, now);
                }
            }
            Op::Lookup { local, from, request_id, asker, network, query } => {
                let network = meshtun_fuzz::network(network);
                let from_addr = identity(asker).mesh_addr(network);
                let wire = Message::Lookup { request_id, from: from_addr, query: query.query(network) }.encode();
                let from = from.unwrap_or(Addr::Pool(asker % IDENTITY_PARTS.len() as u8));
                dir.handle_datagram_on(usize::from(local % 3), from.get(), &wire, now);
            }
            Op::Deregister { from, identity: i, network, seq, signer } => {
                let addr = identity(i).mesh_addr(meshtun_fuzz::network(network));
                let deregistration = Deregistration::sign(identity(signer), addr, seq);
                let wire = Message::Deregister { request_id: 1, deregistration }.encode();
                dir.handle_datagram(from.get(), &wire, now);
            }
            Op::Relay { from, to, payload } => {
                let wire = relay::wrap(to.addr(), &payload);
                relayed_in = Some(wire.len());
                dir.handle_datagram(from.get(), &wire, now);
            }
            Op::Stun { local, from, tid } => {
                dir.handle_datagram_on(usize::from(local % 3), from.get(), &meshtun_nat::binding_request(tid), now);
            }
            Op::Advance { millis } => {
                now += Duration::from_millis(u64::from(millis % 200_000));
                dir.handle_timeout(now);
            }
            Op::UnixTime(secs) => dir.set_unix_time(secs),
            Op::Revocations { seq, serials } => {
                let _ = dir.set_revocations(OWNER_NETWORK, owner().sign_revocations(seq, serials));
            }
        }
        if let Some(at) = dir.poll_timeout() {
            assert!(at >= start, "timeout in the past");
        }
        while let Some(t) = dir.poll_transmit() {
            check_transmit(&t.payload, t.dst, relayed_in);
        }
        assert_eq!(dir.len(), dir.records().count());
    }
});

fn check_transmit(payload: &[u8], dst: SocketAddr, relayed_in: Option<usize>) {
    match classify(payload) {
        DatagramKind::Backbone => {
            assert!(payload.len() <= MAX_MESSAGE_LEN, "{}-byte message to {dst} exceeds MAX_MESSAGE_LEN", payload.len());
            Message::decode(payload).expect("backbone sends decodable messages");
        }
        DatagramKind::Relay => {
            let came_in = relayed_in.expect("relay output only for relay input");
            assert!(payload.len() <= came_in, "relay amplified {came_in} to {} bytes", payload.len());
        }
        DatagramKind::Stun => assert!(payload.len() <= 88, "{}-byte STUN answer", payload.len()),
        other => panic!("backbone sent a {other:?} datagram"),
    }
}
