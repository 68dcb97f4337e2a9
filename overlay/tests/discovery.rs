//! Discovery in the simulator: capability and group queries, run-time tag
//! changes, group broadcast, mesh ping, stale and forged answers, and
//! losing one of two backbones.

mod netsim;

use std::time::{Duration, Instant};

use meshtun_addr::{group_multicast_addr, NetworkId};
use meshtun_overlay::{Answer, Found, Node, NodeConfig};
use meshtun_proto::{Message, NodeRecord, Query, SignedRecord};
use netsim::Net;

fn cap(name: &str) -> Query {
    Query::Capability { network: NetworkId::PUBLIC, name: name.into() }
}

fn found(answer: Option<Answer>) -> Vec<Found> {
    match answer {
        Some(Answer::Query { found, error: None, .. }) => found,
        other => panic!("expected a successful query answer, got {other:?}"),
    }
}

fn fleet(net: &mut Net) -> (usize, usize, usize, usize) {
    let coordinator = net.add_host(0, None);
    let papers = net.add_host(1, None);
    let fx = net.add_host(2, None);
    let news = net.add_host(3, None);
    net.set_tags(coordinator, Some("coordinator"), &[], &["research"]);
    net.set_tags(papers, Some("specialist-papers"), &["citations", "summarise"], &["research"]);
    net.set_tags(fx, Some("specialist-fx"), &["fx-rates"], &["trading"]);
    net.set_tags(news, Some("specialist-news"), &["summarise"], &["research"]);
    net.run_for(Duration::from_secs(1));
    (coordinator, papers, fx, news)
}

#[test]
fn capability_queries_find_every_holder_and_rank_measured_peers_first() {
    let mut net = Net::new(11);
    let (c, papers, _fx, news) = fleet(&mut net);
    let names = |f: &[Found]| f.iter().map(|f| f.hostname.clone().unwrap_or_default()).collect::<Vec<_>>();
    let all = found(net.query(c, cap("summarise"), Duration::from_secs(2)));
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|f| f.rtt_ms.is_none()));
    // Talk to news: it now has a measured path and ranks first.
    net.ping(c, news, Duration::from_secs(2)).expect("reached news");
    net.run_for(Duration::from_secs(11)); // past the answer cache
    let ranked = found(net.query(c, cap("summarise"), Duration::from_secs(2)));
    assert_eq!(names(&ranked), vec!["specialist-news".to_string(), "specialist-papers".to_string()]);
    assert!(ranked[0].rtt_ms.is_some());
    assert!(found(net.query(c, cap("nobody-has-this"), Duration::from_secs(2))).is_empty());
    let _ = papers;
}

#[test]
fn hostname_queries_resolve_names_and_the_own_name_locally() {
    let mut net = Net::new(12);
    let (c, papers, _, _) = fleet(&mut net);
    let q = Query::Hostname { network: NetworkId::PUBLIC, name: "specialist-papers".into() };
    let f = found(net.query(c, q, Duration::from_secs(2)));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].ipv6, net.mesh_ip(papers));
    let own = Query::Hostname { network: NetworkId::PUBLIC, name: "coordinator".into() };
    assert_eq!(found(net.query(c, own, Duration::ZERO))[0].ipv6, net.mesh_ip(c));
}

#[test]
fn tags_changed_at_run_time_reach_the_backbone_within_a_heartbeat() {
    let mut net = Net::new(13);
    let (c, _, fx, _) = fleet(&mut net);
    assert!(found(net.query(c, cap("weather"), Duration::from_secs(2))).is_empty());
    net.set_tags(fx, Some("specialist-fx"), &["fx-rates", "weather"], &["trading"]);
    net.run_for(net.heartbeat);
    net.run_for(Duration::from_secs(3)); // the negative answer's cache
    let f = found(net.query(c, cap("weather"), Duration::from_secs(2)));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].ipv6, net.mesh_ip(fx));
}

#[test]
fn a_group_broadcast_reaches_exactly_the_members() {
    let mut net = Net::new(14);
    let (c, papers, fx, news) = fleet(&mut net);
    let group = group_multicast_addr(NetworkId::PUBLIC, "research");
    let src = net.mesh_ip(c);
    let packet = {
        let builder = etherparse::PacketBuilder::ipv6(src.octets(), group.octets(), 1).udp(5000, 5000);
        let mut out = Vec::new();
        builder.write(&mut out, b"task: summarise arXiv 2411").unwrap();
        out
    };
    net.inject(c, &packet);
    net.run_for(Duration::from_secs(2));
    let got = |net: &Net, h: usize| net.hosts[h].delivered.iter().filter(|p| **p == packet).count();
    assert_eq!(got(&net, papers), 1);
    assert_eq!(got(&net, news), 1);
    assert_eq!(got(&net, fx), 0, "not a member");
    assert_eq!(got(&net, c), 0, "the sender does not hear itself");
}

#[test]
fn a_broadcast_storm_is_cut_by_the_rate_limit() {
    let mut net = Net::new(15);
    let (c, papers, _, _) = fleet(&mut net);
    let group = group_multicast_addr(NetworkId::PUBLIC, "research");
    let src = net.mesh_ip(c);
    let mut sent = 0;
    for i in 0..1000u16 {
        let builder = etherparse::PacketBuilder::ipv6(src.octets(), group.octets(), 1).udp(5000, 5000);
        let mut out = Vec::new();
        builder.write(&mut out, &i.to_be_bytes()).unwrap();
        net.inject(c, &out);
        sent += 1;
        if i % 100 == 0 {
            net.run_for(Duration::from_millis(100));
        }
    }
    net.run_for(Duration::from_secs(2));
    let delivered = net.hosts[papers].delivered.len();
    assert!(delivered < sent / 5, "{delivered} of {sent} broadcasts got through");
    assert!(net.hosts[c].node.stats().dropped.rate_limited > 0);
}

#[test]
fn mesh_ping_measures_the_path_and_names_the_peer() {
    let mut net = Net::new(16);
    let (c, papers, _, _) = fleet(&mut net);
    let target = net.hosts[papers].node.mesh_addr();
    let now = net.now;
    let token = net.hosts[c].node.ping(target, now);
    let deadline = net.now + Duration::from_secs(2);
    net.run_until(deadline, |n| n.hosts[c].answers.iter().any(|a| netsim::answer_token(a) == token));
    let pong = net.hosts[c].answers.iter().find(|a| netsim::answer_token(a) == token).cloned();
    match pong {
        Some(Answer::Pong { from, hostname, rtt, path, .. }) => {
            assert_eq!(from, target);
            assert_eq!(hostname.as_deref(), Some("specialist-papers"));
            assert!(rtt >= Duration::from_millis(20), "{rtt:?}");
            assert!(path.starts_with("relay") || path.starts_with("direct"), "{path}");
        }
        other => panic!("no pong: {other:?}"),
    }
    // The echo reply was answered to the driver, not written to the TUN.
    assert!(net.hosts[c].delivered.is_empty());
}

#[test]
fn losing_one_of_two_backbones_changes_nothing_a_user_notices() {
    let mut net = Net::new(17);
    net.add_second_backbone();
    let (c, papers, fx, _) = fleet(&mut net);
    net.ping(c, papers, Duration::from_secs(2)).expect("session up");
    net.backbone_up = false; // the first backbone dies
    for _ in 0..20 {
        assert!(net.ping(c, papers, Duration::from_millis(500)).is_some(), "existing session");
        net.run_for(Duration::from_millis(500));
    }
    let started = Instant::now();
    let f = found(net.query(c, cap("fx-rates"), Duration::from_secs(2)));
    assert_eq!(f[0].ipv6, net.mesh_ip(fx));
    assert!(net.ping(c, fx, Duration::from_secs(2)).is_some(), "new session through the other backbone");
    let _ = started;
}

/// A node wired to a hand-driven fake backbone.
fn node_with_fake_backbone() -> (Node, Instant, std::net::SocketAddr) {
    let backbone: std::net::SocketAddr = "198.18.0.1:7400".parse().unwrap();
    let now = Instant::now();
    let config = NodeConfig { backbones: vec![backbone], ..NodeConfig::default() };
    let mut node = Node::new(config, netsim::identity(0), boringtun::x25519::StaticSecret::from([1; 32]), now);
    node.handle_timeout(now);
    let register = node.poll_transmit().expect("registration");
    let Ok(Message::Register { request_id, .. }) = Message::decode(&register.payload) else { panic!() };
    let ack = Message::RegisterAck { request_id, observed: "198.18.0.9:51820".parse().unwrap(), ttl_secs: 60 };
    node.handle_udp(backbone, &ack.encode(), now);
    while node.poll_transmit().is_some() {}
    (node, now, backbone)
}

fn answer_query(node: &mut Node, backbone: std::net::SocketAddr, records: Vec<SignedRecord>, now: Instant) {
    let lookup = std::iter::from_fn(|| node.poll_transmit())
        .find_map(|t| match Message::decode(&t.payload) {
            Ok(Message::Lookup { request_id, .. }) => Some(request_id),
            _ => None,
        })
        .expect("a lookup");
    node.handle_udp(backbone, &Message::LookupReply { request_id: lookup, records }.encode(), now);
}

fn tagged(identity_index: usize, seq: u64, caps: &[&str]) -> SignedRecord {
    let id = netsim::identity(identity_index);
    let record = NodeRecord {
        network: NetworkId::PUBLIC,
        node: id.node_addr(),
        identity_key: id.public_key(),
        pow_nonce: id.nonce(),
        wg_key: [identity_index as u8; 32],
        endpoints: vec![],
        hostname: None,
        capabilities: caps.iter().map(|s| s.to_string()).collect(),
        groups: vec![],
        seq,
        wg_key_version: 1,
        wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
        cert: None,
    };
    SignedRecord::sign(&id, &record).unwrap()
}

#[test]
fn a_backbone_serving_a_forged_or_stale_record_is_caught() {
    let (mut node, now, backbone) = node_with_fake_backbone();
    // A current record for node 1 with "citations".
    node.query(cap("citations"), now);
    answer_query(&mut node, backbone, vec![tagged(1, 10, &["citations"])], now);
    assert_eq!(found(node.poll_answer()).len(), 1);
    // Later the backbone rolls node 1 back to an older record and forges a
    // third one (its signature broken).
    let later = now + Duration::from_secs(11);
    node.query(cap("citations"), later);
    let mut forged = tagged(2, 1, &["citations"]);
    forged.signature[0] ^= 1;
    answer_query(&mut node, backbone, vec![tagged(1, 3, &["citations", "stale"]), forged], later);
    let f = found(node.poll_answer());
    assert_eq!(f.len(), 1, "the forged record is dropped");
    assert_eq!(f[0].capabilities, vec!["citations".to_string()], "the newer record wins over the stale one");
    assert_eq!(node.stats().stale_records, 1);
    assert_eq!(node.stats().bad_records, 1);
}
