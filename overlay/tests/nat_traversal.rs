//! NAT traversal in the deterministic simulator: every pair of RFC 4787
//! NAT behaviours, checked against the pure oracle in `meshtun-nat`.

mod netsim;

use std::time::Duration;

use meshtun_nat::{direct_path_possible, FilteringBehavior as F, MappingBehavior as M};
use netsim::{Net, NatType};

fn nat_types() -> Vec<(&'static str, NatType)> {
    let mut all = vec![("public", None)];
    for (mn, m) in [("EIM", M::EndpointIndependent), ("ADM", M::AddressDependent), ("APDM", M::AddressAndPortDependent)] {
        for (fname, f) in [("EIF", F::EndpointIndependent), ("ADF", F::AddressDependent), ("APDF", F::AddressAndPortDependent)] {
            let name: &'static str = Box::leak(format!("{mn}/{fname}").into_boxed_str());
            all.push((name, Some((m, f))));
        }
    }
    all
}

/// Time allowed for the first packet whatever the NATs (relay first).
const FIRST_PACKET_LIMIT: Duration = Duration::from_secs(2);
/// Time after the first packet by which a possible direct path must be in use.
const DIRECT_LIMIT: Duration = Duration::from_secs(8);

#[test]
fn every_pair_of_nat_behaviours_connects_and_goes_direct_exactly_when_the_oracle_says() {
    let types = nat_types();
    let mut failures = Vec::new();
    println!("{:<10} {:<10} {:>8} {:>9} {:>9} {:>7}", "A", "B", "oracle", "first ms", "path A", "path B");
    for (an, a) in &types {
        for (bn, b) in &types {
            let mut net = Net::new(7);
            let ha = net.add_host_behind(0, *a);
            let hb = net.add_host_behind(1, *b);
            net.run_for(Duration::from_millis(500));
            let first = net.ping(ha, hb, FIRST_PACKET_LIMIT);
            // Keep traffic flowing both ways while paths settle.
            for _ in 0..8 {
                net.ping(ha, hb, Duration::from_secs(1));
                net.ping(hb, ha, Duration::from_secs(1));
            }
            net.run_for(DIRECT_LIMIT.saturating_sub(Duration::from_secs(8)));
            let back = net.ping(hb, ha, Duration::from_secs(2));
            let (pa, pb) = (net.path(ha, hb), net.path(hb, ha));
            let oracle = direct_path_possible(*a, *b);
            println!(
                "{an:<10} {bn:<10} {:>8} {:>9} {pa:>9} {pb:>7}",
                if oracle { "direct" } else { "relay" },
                first.map(|d| d.as_millis().to_string()).unwrap_or_else(|| "LOST".into()),
            );
            let expected = if oracle { "direct" } else { "relay" };
            if first.is_none() || back.is_none() {
                failures.push(format!("{an} <-> {bn}: no connectivity (first {first:?}, back {back:?})"));
            } else if pa != expected || pb != expected {
                failures.push(format!("{an} <-> {bn}: expected {expected}, got A {pa} / B {pb}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} pairs failed:\n{}", failures.len(), failures.join("\n"));
}

const PORT_RESTRICTED: NatType = Some((M::EndpointIndependent, F::AddressAndPortDependent));
const SYMMETRIC: NatType = Some((M::AddressAndPortDependent, F::AddressAndPortDependent));

#[test]
fn two_hosts_behind_one_nat_use_their_lan_path_not_a_hairpin() {
    let mut net = Net::new(1);
    let nat = net.add_nat(M::EndpointIndependent, F::AddressAndPortDependent);
    let a = net.add_host(0, Some(nat));
    let b = net.add_host(1, Some(nat));
    net.run_for(Duration::from_millis(500));
    assert!(net.ping(a, b, FIRST_PACKET_LIMIT).is_some());
    net.run_for(Duration::from_secs(3));
    let status = net.status(a);
    assert_eq!(status.peers[0].path, "direct");
    assert_eq!(status.peers[0].endpoint, Some(net.hosts[b].internal), "LAN address, not the NAT's");
}

#[test]
fn symmetric_nats_on_both_sides_are_relayed_with_a_reason() {
    let mut net = Net::new(2);
    let a = net.add_host_behind(0, SYMMETRIC);
    let b = net.add_host_behind(1, SYMMETRIC);
    net.run_for(Duration::from_millis(500));
    assert!(net.ping(a, b, FIRST_PACKET_LIMIT).is_some());
    net.run_for(Duration::from_secs(10));
    assert!(net.ping(b, a, FIRST_PACKET_LIMIT).is_some());
    let peer = &net.status(a).peers[0];
    assert_eq!(peer.path, "relay");
    assert!(peer.relay_reason.is_some());
}

#[test]
fn a_router_reboot_falls_back_to_the_relay_and_traffic_keeps_flowing() {
    let mut net = Net::new(3);
    let a = net.add_host_behind(0, PORT_RESTRICTED);
    let b = net.add_host_behind(1, PORT_RESTRICTED);
    net.run_for(Duration::from_millis(500));
    net.ping(a, b, FIRST_PACKET_LIMIT).expect("first packet");
    for _ in 0..4 {
        net.ping(a, b, Duration::from_secs(1));
    }
    assert_eq!(net.path(a, b), "direct");
    // A's router forgets its mappings: the direct path dies.
    let nat = net.hosts[a].nat.unwrap();
    net.nats[nat].flush();
    let mut lost = 0;
    let mut fell_back = None;
    let started = net.now;
    for _ in 0..20 {
        if net.ping(a, b, Duration::from_millis(500)).is_none() {
            lost += 1;
        }
        if fell_back.is_none() && net.path(a, b) == "relay" {
            fell_back = Some(net.now - started);
        }
    }
    let fell_back = fell_back.expect("fell back to the relay");
    println!("fell back after {fell_back:?}, {lost} of 20 pings lost");
    assert!(fell_back <= Duration::from_secs(5), "{fell_back:?}");
    // Afterwards everything gets through again (relayed or re-punched).
    for _ in 0..5 {
        assert!(net.ping(a, b, Duration::from_secs(1)).is_some());
        assert!(net.ping(b, a, Duration::from_secs(1)).is_some());
    }
}

#[test]
fn nat_mapping_expiry_during_idle_is_prevented_by_keepalives() {
    let mut net = Net::new(4);
    let a = net.add_host_behind(0, PORT_RESTRICTED);
    let b = net.add_host_behind(1, PORT_RESTRICTED);
    for nat in &mut net.nats {
        nat.timeout = Duration::from_secs(30);
    }
    net.run_for(Duration::from_millis(500));
    net.ping(a, b, FIRST_PACKET_LIMIT).expect("first packet");
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.path(a, b), "direct");
    net.run_for(Duration::from_secs(120)); // idle far past the NAT timeout
    assert!(net.ping(a, b, Duration::from_millis(200)).is_some(), "direct path still open after idling");
    assert_eq!(net.path(a, b), "direct");
}

#[test]
fn the_direct_path_survives_the_backbone_going_away() {
    let mut net = Net::new(5);
    let a = net.add_host_behind(0, PORT_RESTRICTED);
    let b = net.add_host_behind(1, None);
    net.run_for(Duration::from_millis(500));
    net.ping(a, b, FIRST_PACKET_LIMIT).expect("first packet");
    net.run_for(Duration::from_secs(3));
    net.backbone_up = false;
    for _ in 0..30 {
        assert!(net.ping(a, b, Duration::from_millis(500)).is_some());
        assert!(net.ping(b, a, Duration::from_millis(500)).is_some());
        net.run_for(Duration::from_secs(3));
    }
    assert_eq!(net.path(a, b), "direct");
}

#[test]
fn a_restarted_relay_carries_symmetric_pairs_again() {
    let mut net = Net::new(6);
    let a = net.add_host_behind(0, SYMMETRIC);
    let b = net.add_host_behind(1, SYMMETRIC);
    net.run_for(Duration::from_millis(500));
    net.ping(a, b, FIRST_PACKET_LIMIT).expect("first packet");
    // The backbone restarts with an empty directory.
    net.backbone = meshtun_backbone::Directory::new(meshtun_backbone::DirectoryConfig::default());
    let recovered = net.run_until(net.now + Duration::from_secs(30), |_| false);
    assert!(recovered.is_none());
    let mut ok = 0;
    for _ in 0..10 {
        if net.ping(a, b, Duration::from_secs(1)).is_some() {
            ok += 1;
        }
    }
    assert_eq!(ok, 10, "relayed traffic flows after the relay restarted");
}

#[test]
fn lossy_links_still_connect_every_kind_of_pair() {
    for (seed, (a_type, b_type)) in [(PORT_RESTRICTED, PORT_RESTRICTED), (SYMMETRIC, PORT_RESTRICTED), (None, SYMMETRIC)].into_iter().enumerate() {
        let mut net = Net::new(100 + seed as u64);
        net.loss = 0.1;
        let a = net.add_host_behind(0, a_type);
        let b = net.add_host_behind(1, b_type);
        net.run_for(Duration::from_secs(2));
        let mut delivered = 0;
        for _ in 0..20 {
            if net.ping(a, b, Duration::from_secs(2)).is_some() {
                delivered += 1;
            }
        }
        // Each ping is one unretransmitted packet crossing two lossy links
        // when relayed (0.9^2 = 81% expected, 16 of 20): 11 is 3 sigma below.
        assert!(delivered >= 11, "{a_type:?} -> {b_type:?}: {delivered}/20");
    }
}


/// How long traffic may stall after the underlay changes under a session:
/// the fallback to the relay (within 5 s) plus one heartbeat (5 s in the
/// simulator) for the backbone to learn the new source address, which the
/// relay only forwards from.
const ROAM_LIMIT: Duration = Duration::from_secs(10);

/// B's view of its peer A: (up since how long, packets received).
fn session_seen_by(net: &Net, b: usize, a: usize) -> (f64, u64) {
    let a_addr = net.hosts[a].node.mesh_addr().to_string();
    let status = net.status(b);
    let peers: Vec<_> = status.peers.iter().filter(|p| p.address == a_addr).collect();
    assert_eq!(peers.len(), 1, "B has exactly one peer entry for A");
    (peers[0].up_for_secs.expect("session up"), peers[0].rx_packets)
}

/// Pings both ways until a round gets through both ways; how long it took.
fn resumes_both_ways(net: &mut Net, a: usize, b: usize, limit: Duration) -> Option<Duration> {
    let started = net.now;
    while net.now - started < limit {
        let ab = net.ping(a, b, Duration::from_millis(500)).is_some();
        let ba = net.ping(b, a, Duration::from_millis(500)).is_some();
        if ab && ba {
            return Some(net.now - started);
        }
    }
    None
}

/// After roaming: the session B holds for A is the one from before, the
/// backbone holds A's record with the new source address as an endpoint,
/// and the pair punches a direct path again through the new mapping.
fn check_roamed(net: &mut Net, a: usize, b: usize, old_observed: std::net::SocketAddr, before: (f64, u64), roamed_at: std::time::Instant) {
    let a_addr = net.hosts[a].node.mesh_addr();
    let (up_for, rx) = session_seen_by(net, b, a);
    let since_roam = (net.now - roamed_at).as_secs_f64();
    assert!(up_for >= before.0 + since_roam - 1e-6, "B's session with A restarted: up {up_for:.1}s, was {:.1}s {since_roam:.1}s ago", before.0);
    assert!(rx > before.1, "B received nothing from A after roaming");
    let limit = net.now + Duration::from_secs(10);
    net.run_until(limit, |net| net.backbone.get(&a_addr).is_some_and(|e| e.observed != old_observed && e.record.record.endpoints.contains(&e.observed)));
    let entry = net.backbone.get(&a_addr).expect("A is still registered");
    assert_ne!(entry.observed, old_observed, "the backbone never saw A's new source address");
    assert!(entry.record.record.endpoints.contains(&entry.observed), "A's record does not carry its new reflexive endpoint {}: {:?}", entry.observed, entry.record.record.endpoints);
    let new_observed = entry.observed;
    let started = net.now;
    let mut direct = false;
    while net.now - started < DIRECT_LIMIT + Duration::from_secs(10) {
        net.ping(a, b, Duration::from_millis(500));
        net.ping(b, a, Duration::from_millis(500));
        if net.path(a, b) == "direct" && net.path(b, a) == "direct" {
            direct = true;
            break;
        }
    }
    assert!(direct, "no direct path again after roaming: A->B {}, B->A {}", net.path(a, b), net.path(b, a));
    let a_str = a_addr.to_string();
    let endpoint = net.status(b).peers.iter().find(|p| p.address == a_str).and_then(|p| p.endpoint);
    assert_eq!(endpoint, Some(new_observed), "B reaches A at its new mapping");
    println!("direct again {:?} after the record update", net.now - started);
}

#[test]
fn a_nat_reboot_onto_new_ports_mid_session_resumes_traffic_in_the_same_session_and_updates_the_record() {
    let mut net = Net::new(21);
    let a = net.add_host_behind(0, PORT_RESTRICTED);
    let b = net.add_host_behind(1, PORT_RESTRICTED);
    net.run_for(Duration::from_millis(500));
    net.ping(a, b, FIRST_PACKET_LIMIT).expect("first packet");
    for _ in 0..4 {
        net.ping(a, b, Duration::from_secs(1));
    }
    assert_eq!(net.path(a, b), "direct");
    let a_addr = net.hosts[a].node.mesh_addr();
    let old_observed = net.backbone.get(&a_addr).expect("A registered").observed;
    let before = session_seen_by(&net, b, a);
    // The router reboots: every mapping is gone and new ones get new ports.
    let nat = net.hosts[a].nat.expect("behind a NAT");
    net.nats[nat].flush();
    let roamed_at = net.now;
    let resumed = resumes_both_ways(&mut net, a, b, ROAM_LIMIT).expect("traffic resumed after the NAT reboot");
    println!("traffic resumed {resumed:?} after the NAT reboot");
    check_roamed(&mut net, a, b, old_observed, before, roamed_at);
}

#[test]
fn a_host_moving_behind_another_nat_mid_session_resumes_traffic_in_the_same_session_and_updates_the_record() {
    let mut net = Net::new(22);
    let a = net.add_host_behind(0, PORT_RESTRICTED);
    let b = net.add_host_behind(1, PORT_RESTRICTED);
    net.run_for(Duration::from_millis(500));
    net.ping(a, b, FIRST_PACKET_LIMIT).expect("first packet");
    for _ in 0..4 {
        net.ping(a, b, Duration::from_secs(1));
    }
    assert_eq!(net.path(a, b), "direct");
    let a_addr = net.hosts[a].node.mesh_addr();
    let old_observed = net.backbone.get(&a_addr).expect("A registered").observed;
    let before = session_seen_by(&net, b, a);
    // A's laptop goes from one home network to another: new LAN address,
    // another router with another public address.
    let (m, f) = PORT_RESTRICTED.expect("a NAT type");
    let other = net.add_nat(m, f);
    net.move_host(a, Some(other));
    let roamed_at = net.now;
    let resumed = resumes_both_ways(&mut net, a, b, ROAM_LIMIT).expect("traffic resumed after the move");
    println!("traffic resumed {resumed:?} after the move");
    check_roamed(&mut net, a, b, old_observed, before, roamed_at);
    assert_eq!(net.backbone.get(&a_addr).map(|e| e.observed.ip()), Some(net.nats[other].public_ip));
    let old_lan = net.backbone.get(&a_addr).map(|e| e.record.record.endpoints.clone()).unwrap_or_default();
    assert!(!old_lan.iter().any(|e| e.ip() == old_observed.ip()), "the old network's endpoints are gone from the record: {old_lan:?}");
}

#[test]
fn a_path_broken_one_way_is_given_up_at_both_ends_within_four_seconds() {
    let (mut net, a, b) = Net::direct_pair(81);
    for _ in 0..100 {
        net.ping(a, b, Duration::from_millis(200)).expect("echo on the direct path");
        net.run_to_next(Duration::from_millis(20));
    }
    // a's datagrams stop reaching b; b's still reach a. b hears nothing
    // and gives the path up; its probe rounds still reach a on it, which
    // must not keep a on the path (they prove only the way to a).
    let (ip_a, ip_b) = (net.hosts[a].internal.ip(), net.hosts[b].internal.ip());
    net.blocked.push((ip_a, ip_b));
    let broken = net.now;
    let (mut a_gave_up, mut b_gave_up, mut resumed) = (None, None, None);
    while net.now - broken < Duration::from_secs(15) && resumed.is_none() {
        let answered = net.ping(a, b, Duration::from_millis(200)).is_some();
        net.run_to_next(Duration::from_millis(20));
        let since = net.now - broken;
        if a_gave_up.is_none() && net.path(a, b) == "relay" {
            a_gave_up = Some(since);
        }
        if b_gave_up.is_none() && net.path(b, a) == "relay" {
            b_gave_up = Some(since);
        }
        if answered && a_gave_up.is_some() {
            resumed = Some(since);
        }
    }
    println!("one-way break: b gave the path up after {b_gave_up:?}, a after {a_gave_up:?}, echoes again after {resumed:?}");
    let limit = Duration::from_secs(4);
    assert!(b_gave_up.is_some_and(|t| t <= limit), "b: {b_gave_up:?}");
    // With the peer's probe rounds counted as proof, a held on for 11.4 s.
    assert!(a_gave_up.is_some_and(|t| t <= limit), "a: {a_gave_up:?}");
    assert!(resumed.is_some_and(|t| t <= limit + Duration::from_millis(500)), "echoes resumed after {resumed:?}");
}

#[test]
fn a_one_way_stream_over_a_lossy_path_keeps_its_direct_path() {
    // Only answers to its keepalives prove the path to the sending end
    // (its peer sends no data): 5% loss must not make it give up.
    let (mut net, a, b) = Net::direct_pair(91);
    net.auto_echo = false;
    net.loss = 0.05;
    let (src, dst) = (net.mesh_ip(a), net.mesh_ip(b));
    for seq in 0..12_000u32 {
        let packet = netsim::echo_request(src, dst, seq as u16, b"stream");
        net.inject(a, &packet);
        net.run_to_next(Duration::from_millis(20));
        assert_eq!(net.path(a, b), "direct", "gave the direct path up after {:?} of 5% loss", Duration::from_millis(20) * seq);
    }
}
