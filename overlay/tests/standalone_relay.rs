//! A standalone relay (`meshtun relay`, the directory's relay-only role) in
//! the simulator: nodes given `relays` register with it, relay through it
//! instead of the backbone, never ask it discovery questions, and fall
//! back to the backbone's relay when it dies.

mod netsim;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use meshtun_addr::NetworkId;
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_nat::{FilteringBehavior as F, MappingBehavior as M};
use meshtun_overlay::{Answer, BackboneState};
use meshtun_proto::Query;
use netsim::{ExtraBackbone, Net, NatType, BACKBONE};

const RELAY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)), 7400);
const SYMMETRIC: NatType = Some((M::AddressAndPortDependent, F::AddressAndPortDependent));

/// Two hosts behind symmetric NATs, both configured with the relay.
fn relayed_pair(seed: u64) -> (Net, usize, usize) {
    let mut net = Net::new(seed);
    net.extra.push(ExtraBackbone { addr: RELAY, dir: Directory::new(DirectoryConfig { relay_only: true, ..DirectoryConfig::default() }), up: true });
    let with_relay = |config: &mut meshtun_overlay::NodeConfig| {
        config.backbones = vec![BACKBONE];
        config.relays = vec![RELAY];
    };
    let na = net.add_nat(M::AddressAndPortDependent, F::AddressAndPortDependent);
    let nb = net.add_nat(M::AddressAndPortDependent, F::AddressAndPortDependent);
    let a = net.add_host_with(0, Some(na), with_relay);
    let b = net.add_host_with(1, Some(nb), with_relay);
    net.set_tags(b, Some("papers"), &["citations"], &[]);
    net.run_for(Duration::from_millis(500));
    (net, a, b)
}

fn peer_endpoint(net: &Net, a: usize, b: usize) -> Option<SocketAddr> {
    let b_addr = net.hosts[b].node.mesh_addr().to_string();
    net.status(a).peers.iter().find(|p| p.address == b_addr).and_then(|p| p.endpoint)
}

#[test]
fn nodes_with_a_relay_register_with_it_and_relay_through_it_not_the_backbone() {
    let (mut net, a, b) = relayed_pair(51);
    let status = net.status(a);
    assert_eq!(status.relays.len(), 1);
    assert_eq!(status.relays[0].address, RELAY);
    assert_eq!(status.relays[0].state, BackboneState::Registered);
    assert!(status.backbones.iter().all(|s| s.address != RELAY), "a relay is not listed as a backbone");
    net.ping(a, b, Duration::from_secs(2)).expect("first packet");
    for _ in 0..5 {
        assert!(net.ping(a, b, Duration::from_secs(1)).is_some());
        assert!(net.ping(b, a, Duration::from_secs(1)).is_some());
    }
    assert_eq!((net.path(a, b).as_str(), net.path(b, a).as_str()), ("relay", "relay"));
    assert_eq!(peer_endpoint(&net, a, b), Some(RELAY));
    assert_eq!(peer_endpoint(&net, b, a), Some(RELAY));
    assert!(net.extra[0].dir.stats().relayed_packets >= 20, "{:?}", net.extra[0].dir.stats());
    assert_eq!(net.backbone.stats().relayed_packets, 0, "the backbone relayed nothing");
}

#[test]
fn discovery_lookups_never_go_to_a_relay() {
    let (mut net, a, b) = relayed_pair(52);
    let hostname = Query::Hostname { network: NetworkId::PUBLIC, name: "papers".into() };
    let cap = Query::Capability { network: NetworkId::PUBLIC, name: "citations".into() };
    for query in [hostname, cap] {
        match net.query(a, query, Duration::from_secs(2)) {
            Some(Answer::Query { found, error: None, .. }) => assert_eq!(found.first().map(|f| f.ipv6), Some(net.mesh_ip(b))),
            other => panic!("{other:?}"),
        }
    }
    net.ping(a, b, Duration::from_secs(2)).expect("relayed");
    let relay = net.extra[0].dir.stats();
    assert_eq!(relay.lookups_rejected, 0, "no query the relay refuses was sent to it");
    assert_eq!(relay.lookups_by_kind.hostname + relay.lookups_by_kind.capability + relay.lookups_by_kind.wg_key, 0);
    assert!(relay.lookups_by_kind.address >= 1, "the pair permission was asked for");
}

#[test]
fn a_lost_relay_gives_way_to_the_backbones_relay() {
    let (mut net, a, b) = relayed_pair(53);
    net.ping(a, b, Duration::from_secs(2)).expect("first packet");
    assert_eq!(peer_endpoint(&net, a, b), Some(RELAY));
    net.extra[0].up = false; // the relay dies
    let mut ok = 0;
    for _ in 0..40 {
        if net.ping(a, b, Duration::from_millis(500)).is_some() {
            ok += 1;
        }
        net.run_for(Duration::from_millis(500));
    }
    assert!(ok >= 10, "{ok} of 40 pings");
    assert_eq!(peer_endpoint(&net, a, b), Some(BACKBONE));
    assert!(net.ping(a, b, Duration::from_secs(1)).is_some() && net.ping(b, a, Duration::from_secs(1)).is_some());
    assert!(net.backbone.stats().relayed_packets > 0);
}

#[test]
fn without_a_relay_configured_the_backbone_relays_as_before() {
    let mut net = Net::new(54);
    let a = net.add_host_behind(0, SYMMETRIC);
    let b = net.add_host_behind(1, SYMMETRIC);
    net.run_for(Duration::from_millis(500));
    net.ping(a, b, Duration::from_secs(2)).expect("first packet");
    assert!(net.status(a).relays.is_empty());
    assert_eq!(peer_endpoint(&net, a, b), Some(BACKBONE));
}
