//! Private networks, certificate expiry and revocation, the firewall (and
//! certified versus declared groups), key rotation and WireGuard key expiry,
//! and the hop limit of group broadcasts, in the simulator.

mod netsim;

use std::time::Duration;

use boringtun::x25519::StaticSecret;
use etherparse::PacketBuilder;
use meshtun_addr::{MeshAddr, NetworkId};
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_overlay::firewall::{FirewallConfig, Rule};
use meshtun_proto::cert::NetworkOwner;
use netsim::Net;

const NET: NetworkId = NetworkId(7);

fn owner() -> NetworkOwner {
    NetworkOwner::generate(NET, [77; 32])
}

/// A backbone serving network 7, and members 0 and 1 (member 1 in group
/// "ops"), certificates valid until unix `expires`.
fn private_net(expires: u64, firewall: FirewallConfig) -> (Net, usize, usize) {
    let mut net = Net::new(31);
    let owner = owner();
    let mut config = DirectoryConfig::default();
    config.network_owners.insert(NET, owner.public_key());
    net.backbone = Directory::new(config);
    let mut members = Vec::new();
    for (i, groups) in [(0usize, vec![]), (1usize, vec!["ops".to_string()])] {
        let node = netsim::identity(i).node_addr();
        let cert = owner.sign_membership(node, groups, expires, i as u64 + 1);
        let fw = firewall.clone();
        members.push(net.add_host_with(i, None, |c| {
            c.network = NET;
            c.network_owner = Some(owner.public_key());
            c.certificate = Some(cert);
            c.firewall = fw;
        }));
    }
    net.run_for(Duration::from_secs(1));
    (net, members[0], members[1])
}

fn udp6(net: &Net, from: usize, to: usize, port: u16) -> Vec<u8> {
    let b = PacketBuilder::ipv6(net.mesh_ip(from).octets(), net.mesh_ip(to).octets(), 64).udp(40000, port);
    let mut out = Vec::new();
    b.write(&mut out, b"payload").unwrap();
    out
}

fn allow_all() -> FirewallConfig {
    FirewallConfig { default_inbound: None, rules: vec!["allow any".parse().unwrap()] }
}

#[test]
fn members_of_a_private_network_reach_each_other() {
    let (mut net, a, b) = private_net(10_000, allow_all());
    assert_eq!(net.backbone.len(), 2);
    assert!(net.ping(a, b, Duration::from_secs(2)).is_some());
    assert!(net.ping(b, a, Duration::from_secs(2)).is_some());
}

#[test]
fn an_outsider_can_neither_register_look_up_nor_reach_members() {
    let (mut net, a, _b) = private_net(10_000, allow_all());
    // An outsider configured for network 7 without a certificate.
    let outsider = net.add_host_with(2, None, |c| c.network = NET);
    // And one on the public mesh who knows member a's address.
    let public = net.add_host(3, None);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.backbone.len(), 3, "two members and the public node; the outsider was refused");
    let status = net.status(outsider);
    assert_eq!(status.backbones[0].state, meshtun_overlay::BackboneState::Rejected);
    assert!(net.ping(outsider, a, Duration::from_secs(3)).is_none());
    let before = net.hosts[a].delivered.len();
    let packet = udp6(&net, public, a, 80);
    net.inject(public, &packet);
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.hosts[a].delivered.len(), before, "nothing from the public mesh gets in");
}

#[test]
fn a_member_whose_certificate_expires_is_cut_off() {
    let (mut net, a, b) = private_net(1_010, allow_all());
    assert!(net.ping(a, b, Duration::from_secs(2)).is_some());
    net.run_for(Duration::from_secs(12)); // unix time passes 1010
    assert!(net.ping(a, b, Duration::from_secs(2)).is_none());
    assert!(net.hosts[a].events.iter().any(|e| matches!(e, meshtun_overlay::Event::PeerRemoved { .. })));
    assert!(net.backbone.is_empty() || net.backbone.len() < 2, "the backbone drops them at their next heartbeat");
}

#[test]
fn a_revocation_cuts_the_member_off_everywhere_within_a_heartbeat() {
    let (mut net, a, b) = private_net(10_000, allow_all());
    assert!(net.ping(a, b, Duration::from_secs(2)).is_some());
    // Member b's certificate (serial 2) is revoked by the owner.
    net.backbone.set_revocations(NET, owner().sign_revocations(1, vec![2])).unwrap();
    net.run_for(net.heartbeat + Duration::from_secs(1));
    assert!(net.ping(a, b, Duration::from_secs(2)).is_none());
    assert!(net.hosts[a].events.iter().any(|e| matches!(e, meshtun_overlay::Event::RevocationsUpdated { .. })));
}

#[test]
fn firewall_rules_deny_one_port_and_allow_another_by_certified_group() {
    let rules: Vec<Rule> = vec!["allow udp/8080 from group:ops".parse().unwrap(), "allow icmp".parse().unwrap()];
    let (mut net, a, b) = private_net(10_000, FirewallConfig { default_inbound: None, rules });
    assert!(net.ping(b, a, Duration::from_secs(2)).is_some(), "icmp allowed");
    // b is certified for ops: its 8080 traffic gets in, its 9090 does not.
    let ok = udp6(&net, b, a, 8080);
    let denied = udp6(&net, b, a, 9090);
    net.inject(b, &ok);
    net.inject(b, &denied);
    net.run_for(Duration::from_secs(1));
    assert!(net.hosts[a].delivered.contains(&ok));
    assert!(!net.hosts[a].delivered.contains(&denied));
    // a is not in ops: its 8080 traffic to b is denied (default deny), but
    // b's answer to a flow b opened gets in.
    let from_a = udp6(&net, a, b, 8080);
    net.inject(a, &from_a);
    net.run_for(Duration::from_secs(1));
    assert!(!net.hosts[b].delivered.contains(&from_a));
    assert!(net.hosts[b].node.stats().dropped.firewall >= 1);
}

#[test]
fn a_key_rotation_keeps_traffic_flowing_and_the_address() {
    let mut net = Net::new(41);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    net.run_for(Duration::from_secs(1));
    assert!(net.ping(a, b, Duration::from_secs(2)).is_some());
    let addr: MeshAddr = net.hosts[a].node.mesh_addr();
    let now = net.now;
    net.hosts[a].node.rotate_wg_key(StaticSecret::from([99; 32]), 2, u64::MAX, now);
    let mut lost = 0;
    for _ in 0..10 {
        if net.ping(a, b, Duration::from_secs(1)).is_none() {
            lost += 1;
        }
        if net.ping(b, a, Duration::from_secs(1)).is_none() {
            lost += 1;
        }
    }
    assert!(lost <= 4, "{lost} of 20 pings lost around the rotation");
    for _ in 0..3 {
        assert!(net.ping(a, b, Duration::from_secs(1)).is_some());
    }
    assert_eq!(net.hosts[a].node.mesh_addr(), addr);
    assert_eq!(net.hosts[a].node.record().wg_key_version, 2);
    let b_view = net.status(b);
    assert!(b_view.peers.iter().any(|p| p.address == addr.to_string()));
}

#[test]
fn an_older_wireguard_key_version_is_refused_after_a_rotation() {
    let mut net = Net::new(42);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    net.run_for(Duration::from_secs(1));
    net.ping(a, b, Duration::from_secs(2)).unwrap();
    let now = net.now;
    net.hosts[a].node.rotate_wg_key(StaticSecret::from([98; 32]), 5, u64::MAX, now);
    for _ in 0..5 {
        net.ping(a, b, Duration::from_secs(1));
    }
    // A stale record with version 1 arrives (replayed by someone): refused.
    let refused_before = net.hosts[b].node.stats().untrusted_peers;
    let id = netsim::identity(0);
    let mut old = net.hosts[a].node.record().clone();
    old.wg_key_version = 1;
    old.wg_key = [1; 32];
    old.seq += 100;
    let signed = meshtun_proto::SignedRecord::sign(&id, &old).unwrap();
    let intent = meshtun_proto::Message::PeerIntent { record: signed };
    let now = net.now;
    net.hosts[b].node.handle_udp(netsim::BACKBONE, &intent.encode(), now);
    let stats = net.hosts[b].node.stats().clone();
    assert_eq!(stats.untrusted_peers + stats.stale_records, refused_before + 1);
    assert!(net.ping(a, b, Duration::from_secs(1)).is_some(), "the current key still works");
}

#[test]
fn a_handshake_flood_is_answered_with_cookies_not_work() {
    let mut net = Net::new(43);
    let b = net.add_host(1, None);
    net.run_for(Duration::from_secs(1));
    let b_public = boringtun::x25519::PublicKey::from(net.hosts[b].node.wg_public_key());
    let target = net.hosts[b].internal;
    let attacker: std::net::SocketAddr = "203.0.113.66:4444".parse().unwrap();
    let now = net.now;
    let mut buf = vec![0u8; 256];
    let mut replies = 0usize;
    for i in 0..300u32 {
        // Fresh keys each time: valid MAC1 (the attacker knows B's public
        // key), unknown senders.
        let mut secret = [0u8; 32];
        secret[..4].copy_from_slice(&i.to_be_bytes());
        secret[31] = 7;
        let mut tunn = boringtun::noise::Tunn::new(StaticSecret::from(secret), b_public, None, None, i, None);
        if let boringtun::noise::TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, false) {
            let init = init.to_vec();
            net.hosts[b].node.handle_udp(attacker, &init, now);
        }
        while let Some(t) = net.hosts[b].node.poll_transmit() {
            if t.dst == attacker {
                replies += 1;
                assert!(t.payload.len() <= 148, "never more than the initiation");
            }
        }
    }
    let stats = net.hosts[b].node.stats().clone();
    assert!(stats.handshake_cookies_sent >= 150, "{stats:?}");
    assert!(replies >= 150);
    let _ = target;
}

#[test]
fn a_peer_whose_wireguard_key_certification_has_expired_is_refused() {
    let mut net = Net::new(44);
    let expires = net.unix_time() + 5;
    let a = net.add_host_with(0, None, |c| c.wg_key_expires_unix = expires);
    let b = net.add_host(1, None);
    net.run_for(Duration::from_secs(1));
    let a_addr = net.hosts[a].node.mesh_addr().to_string();
    assert!(net.ping(b, a, Duration::from_secs(2)).is_some(), "a's key is still certified");
    net.run_for(Duration::from_secs(6)); // unix time passes `expires`
    assert!(net.unix_time() > expires);
    assert!(net.ping(b, a, Duration::from_secs(2)).is_none(), "b still talks to a after a's key expired");
    assert!(!net.status(b).peers.iter().any(|p| p.address == a_addr), "b keeps a as a peer");
    assert!(
        net.hosts[b].events.iter().any(|e| matches!(e, meshtun_overlay::Event::PeerRemoved { peer, reason } if *peer == a_addr && reason.contains("expired"))),
        "b did not drop a for its expired key: {:?}",
        net.hosts[b].events
    );
    // A freshly signed record whose key expired a second ago, pushed
    // straight to b (as a replaying backbone would): refused, not admitted.
    let refused_before = net.hosts[b].node.stats().untrusted_peers;
    let mut stale = net.hosts[a].node.record().clone();
    stale.wg_key_expires_unix = net.unix_time() - 1;
    stale.seq += 100;
    let signed = meshtun_proto::SignedRecord::sign(&netsim::identity(0), &stale).unwrap();
    let now = net.now;
    net.hosts[b].node.handle_udp(netsim::BACKBONE, &meshtun_proto::Message::PeerIntent { record: signed }.encode(), now);
    assert_eq!(net.hosts[b].node.stats().untrusted_peers, refused_before + 1);
    assert!(!net.status(b).peers.iter().any(|p| p.address == a_addr));
}

#[test]
fn a_group_rule_admits_a_certified_member_but_not_one_that_only_declares_the_group() {
    let mut net = Net::new(45);
    let owner = owner();
    let mut config = DirectoryConfig::default();
    config.network_owners.insert(NET, owner.public_key());
    net.backbone = Directory::new(config);
    let rules: Vec<Rule> = vec!["allow udp/8080 from group:ops".parse().unwrap(), "allow icmp".parse().unwrap()];
    // Host 0 is the server; host 1 is certified for ops; host 2's
    // certificate names no group, but its record declares ops.
    let mut hosts = Vec::new();
    for (i, certified) in [(0usize, vec![]), (1, vec!["ops".to_string()]), (2, vec![])] {
        let cert = owner.sign_membership(netsim::identity(i).node_addr(), certified, 10_000, i as u64 + 1);
        let fw = FirewallConfig { default_inbound: None, rules: rules.clone() };
        hosts.push(net.add_host_with(i, None, |c| {
            c.network = NET;
            c.network_owner = Some(owner.public_key());
            c.certificate = Some(cert);
            c.firewall = fw;
        }));
    }
    let (server, member, pretender) = (hosts[0], hosts[1], hosts[2]);
    net.set_tags(member, None, &[], &["ops"]);
    net.set_tags(pretender, None, &[], &["ops"]);
    net.run_for(Duration::from_secs(1));
    assert!(net.ping(member, server, Duration::from_secs(2)).is_some());
    assert!(net.ping(pretender, server, Duration::from_secs(2)).is_some(), "icmp is allowed for everyone");
    let pretender_addr = net.hosts[pretender].node.mesh_addr().to_string();
    assert!(
        net.status(server).peers.iter().any(|p| p.address == pretender_addr),
        "the pretender is a member of the network, only not of ops"
    );
    let dropped_before = net.hosts[server].node.stats().dropped.firewall;
    let from_member = udp6(&net, member, server, 8080);
    let from_pretender = udp6(&net, pretender, server, 8080);
    net.inject(member, &from_member);
    net.inject(pretender, &from_pretender);
    net.run_for(Duration::from_secs(1));
    assert!(net.hosts[server].delivered.contains(&from_member), "the certified ops member is allowed");
    assert!(!net.hosts[server].delivered.contains(&from_pretender), "a group declared in the record but not certified passed the rule");
    assert!(net.hosts[server].node.stats().dropped.firewall > dropped_before);
}

#[test]
fn a_group_broadcast_with_hop_limit_zero_is_not_fanned_out_and_is_counted() {
    let mut net = Net::new(46);
    let sender = net.add_host(0, None);
    let members = [net.add_host(1, None), net.add_host(2, None)];
    net.set_tags(sender, None, &[], &["research"]);
    for &m in &members {
        net.set_tags(m, None, &[], &["research"]);
    }
    net.run_for(Duration::from_secs(1));
    let group = meshtun_addr::group_multicast_addr(NetworkId::PUBLIC, "research");
    let src = net.mesh_ip(sender);
    let packet = |hop_limit: u8, body: &[u8]| {
        let mut out = Vec::new();
        PacketBuilder::ipv6(src.octets(), group.octets(), hop_limit).udp(5000, 5000).write(&mut out, body).unwrap();
        out
    };
    // Hop limit 1 (link-local scope, what the kernel sends) goes out...
    let live = packet(1, b"hop limit one");
    net.inject(sender, &live);
    net.run_for(Duration::from_secs(2));
    for &m in &members {
        assert!(net.hosts[m].delivered.contains(&live), "the control broadcast did not reach member {m}");
    }
    // ...hop limit 0 may not be forwarded anywhere.
    let before = net.hosts[sender].node.stats().clone();
    let dead = packet(0, b"hop limit zero");
    net.inject(sender, &dead);
    net.run_for(Duration::from_secs(2));
    let after = net.hosts[sender].node.stats().clone();
    for &m in &members {
        assert!(!net.hosts[m].delivered.contains(&dead), "member {m} got a hop-limit-0 broadcast");
    }
    assert_eq!(after.broadcasts_sent, before.broadcasts_sent, "a hop-limit-0 packet counted as fanned out");
    assert_eq!(after.dropped.no_route, before.dropped.no_route + 1, "the drop is not counted");
}
