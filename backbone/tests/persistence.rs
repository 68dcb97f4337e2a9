//! What a backbone keeps across a restart: records that hold a hostname,
//! reported as they change (not on every heartbeat), restored with a fresh
//! TTL so a name cannot be taken while its node re-registers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshtun_addr::NetworkId;
use meshtun_backbone::{Directory, DirectoryConfig, PersistOp, PersistedRecord};
use meshtun_proto::{Identity, Message, NodeRecord, Query, RejectCode, SignedRecord};

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn record(id: &Identity, seq: u64, hostname: Option<&str>, endpoint: &str) -> SignedRecord {
    let record = NodeRecord {
        network: NetworkId::PUBLIC,
        node: id.node_addr(),
        identity_key: id.public_key(),
        pow_nonce: id.nonce(),
        wg_key: [id.public_key()[0]; 32],
        endpoints: vec![sock(endpoint)],
        hostname: hostname.map(str::to_string),
        capabilities: vec![],
        groups: vec![],
        seq,
        wg_key_version: 1,
        wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
        cert: None,
    };
    SignedRecord::sign(id, &record).unwrap()
}

fn exchange(dir: &mut Directory, from: &str, message: Message, now: Instant) -> Message {
    dir.handle_datagram(sock(from), &message.encode(), now);
    let mut reply = None;
    while let Some(t) = dir.poll_transmit() {
        if t.dst == sock(from) && reply.is_none() {
            reply = Some(Message::decode(&t.payload).unwrap());
        }
    }
    reply.expect("a reply")
}

fn register(dir: &mut Directory, from: &str, signed: SignedRecord, now: Instant) -> Message {
    exchange(dir, from, Message::Register { request_id: 1, record: signed }, now)
}

fn ops(dir: &mut Directory) -> Vec<PersistOp> {
    std::iter::from_fn(|| dir.poll_persist()).collect()
}

const A: &str = "198.18.0.2:51820";
const B: &str = "198.18.0.3:51820";

#[test]
fn hostname_holders_are_persisted_on_change_not_on_every_heartbeat() {
    let (a, b) = (Identity::generate([61; 32]), Identity::generate([62; 32]));
    let mut dir = Directory::new(DirectoryConfig::default());
    dir.enable_persistence();
    let t0 = Instant::now();
    let a1 = record(&a, 1, Some("alpha"), A);
    register(&mut dir, A, a1.clone(), t0);
    register(&mut dir, B, record(&b, 1, None, B), t0); // no hostname: nothing to keep
    let addr = a.mesh_addr(NetworkId::PUBLIC);
    assert_eq!(
        ops(&mut dir),
        vec![PersistOp::Store { addr, record: PersistedRecord { signed: a1, observed: sock(A), local: 0 } }]
    );
    // Heartbeats that change nothing but the sequence: nothing to write.
    for seq in 2..10 {
        assert!(matches!(register(&mut dir, A, record(&a, seq, Some("alpha"), A), t0), Message::RegisterAck { .. }));
    }
    assert!(ops(&mut dir).is_empty());
    // The node moved (another source address): written again.
    let moved = "203.0.113.5:40000";
    register(&mut dir, moved, record(&a, 10, Some("alpha"), A), t0);
    assert!(matches!(&ops(&mut dir)[..], [PersistOp::Store { record, .. }] if record.observed == sock(moved)));
    // It drops its hostname: forgotten.
    register(&mut dir, moved, record(&a, 11, None, A), t0);
    assert_eq!(ops(&mut dir), vec![PersistOp::Forget { addr }]);
    // Takes one again, then expires: stored, then forgotten.
    register(&mut dir, moved, record(&a, 12, Some("alpha2"), A), t0);
    assert_eq!(ops(&mut dir).len(), 1);
    dir.handle_timeout(t0 + DirectoryConfig::default().record_ttl + Duration::from_secs(1));
    assert_eq!(ops(&mut dir), vec![PersistOp::Forget { addr }]);
}

#[test]
fn restored_records_hold_their_names_answer_lookups_and_yield_to_newer_heartbeats() {
    let (a, thief) = (Identity::generate([63; 32]), Identity::generate([64; 32]));
    let ttl = DirectoryConfig::default().record_ttl;
    let t0 = Instant::now();
    let mut before = Directory::new(DirectoryConfig::default());
    before.enable_persistence();
    register(&mut before, A, record(&a, 5, Some("papers"), A), t0);
    let kept: Vec<PersistedRecord> = ops(&mut before)
        .into_iter()
        .filter_map(|op| match op {
            PersistOp::Store { record, .. } => Some(record),
            PersistOp::Forget { .. } => None,
        })
        .collect();
    drop(before);

    // The backbone comes back much later than the TTL: the record gets a fresh one.
    let t1 = t0 + 10 * ttl;
    let mut after = Directory::new(DirectoryConfig::default());
    assert_eq!(after.restore(kept.clone(), t1), 1);
    assert_eq!(after.len(), 1);
    let addr = a.mesh_addr(NetworkId::PUBLIC);
    assert_eq!(after.get(&addr).unwrap().expires_at, t1 + ttl);
    // Nobody can take the name during the window.
    let reply = register(&mut after, B, record(&thief, 1, Some("papers"), B), t1);
    assert!(matches!(reply, Message::Reject { code: RejectCode::HostnameTaken, .. }), "{reply:?}");
    // The node may look up before its next heartbeat (same source address).
    let lookup = Message::Lookup { request_id: 7, from: addr, query: Query::Hostname { network: NetworkId::PUBLIC, name: "papers".into() } };
    assert!(matches!(exchange(&mut after, A, lookup, t1), Message::LookupReply { records, .. } if records.len() == 1));
    // Its next heartbeat (higher sequence) replaces the restored record.
    assert!(matches!(register(&mut after, A, record(&a, 6, Some("papers"), A), t1), Message::RegisterAck { .. }));
    assert_eq!(after.get(&addr).unwrap().record.record.seq, 6);
    // Restoring again never rolls a record back.
    assert_eq!(after.restore(kept, t1), 0);
    assert_eq!(after.get(&addr).unwrap().record.record.seq, 6);
    // A node that never comes back frees its name one TTL after the restart.
    let mut gone = Directory::new(DirectoryConfig::default());
    gone.restore(vec![PersistedRecord { signed: record(&a, 5, Some("papers"), A), observed: sock(A), local: 0 }], t1);
    gone.handle_timeout(t1 + ttl + Duration::from_secs(1));
    assert!(gone.is_empty());
    assert!(matches!(register(&mut gone, B, record(&thief, 2, Some("papers"), B), t1 + ttl + Duration::from_secs(1)), Message::RegisterAck { .. }));
}

#[test]
fn tampered_persisted_records_are_not_restored() {
    let a = Identity::generate([65; 32]);
    let mut signed = record(&a, 1, Some("alpha"), A);
    let last = signed.body.len() - 1;
    signed.body[last] ^= 1;
    let mut dir = Directory::new(DirectoryConfig::default());
    assert_eq!(dir.restore(vec![PersistedRecord { signed, observed: sock(A), local: 0 }], Instant::now()), 0);
    assert!(dir.is_empty());
}
