//! Paths narrower than the mesh MTU, in the deterministic simulator: what
//! the driver reports about a destination sizes the packets toward exactly
//! the peers whose path goes there, for as long as the kernel would believe it.

mod netsim;

use std::time::Duration;

use meshtun_nat::{FilteringBehavior as F, MappingBehavior as M};
use meshtun_overlay::path_mtu::PATH_MTU_TTL;
use netsim::{echo_request, Net, NatType};

const SYMMETRIC: NatType = Some((M::AddressAndPortDependent, F::AddressAndPortDependent));

/// A full-size packet from `a` to `b` as the TUN would hand it over.
fn packet_to(net: &Net, a: usize, b: usize) -> Vec<u8> {
    echo_request(net.mesh_ip(a), net.mesh_ip(b), 1, &[0; 1372])
}

#[test]
fn a_narrow_direct_path_limits_packets_to_that_peer_only_until_the_report_expires() {
    let mut net = Net::new(11);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    let c = net.add_host(2, None);
    net.run_for(Duration::from_millis(500));
    assert!(net.ping(a, b, Duration::from_secs(2)).is_some());
    assert!(net.ping(a, c, Duration::from_secs(2)).is_some());
    net.run_for(Duration::from_secs(3));
    let to_b = net.status(a).peers.iter().find(|p| p.ipv6 == net.mesh_ip(b)).unwrap().clone();
    assert_eq!(to_b.path, "direct");
    let (to_b_packet, to_c_packet) = (packet_to(&net, a, b), packet_to(&net, a, c));
    let now = net.now;
    assert_eq!(net.hosts[a].node.max_packet_toward(&to_b_packet, now), None, "nothing known yet");

    net.hosts[a].node.handle_path_mtu(to_b.endpoint.unwrap(), 1280, now);
    // IPv4 (20), UDP (8) and WireGuard (32) come off the path MTU.
    assert_eq!(net.hosts[a].node.max_packet_toward(&to_b_packet, now), Some(1220));
    assert_eq!(net.hosts[a].node.max_packet_toward(&to_c_packet, now), None, "c's path is not narrow");
    let status = net.status(a);
    let mtu_of = |ip| status.peers.iter().find(|p| p.ipv6 == ip).unwrap().inner_mtu;
    assert_eq!((mtu_of(net.mesh_ip(b)), mtu_of(net.mesh_ip(c))), (Some(1220), None));

    // Traffic goes on meanwhile; past the kernel's own expiry the report is
    // forgotten and full-size datagrams are tried again.
    net.run_for(PATH_MTU_TTL / 2);
    assert_eq!(net.hosts[a].node.max_packet_toward(&to_b_packet, net.now), Some(1220));
    net.run_for(PATH_MTU_TTL / 2 + Duration::from_secs(2));
    assert_eq!(net.hosts[a].node.max_packet_toward(&to_b_packet, net.now), None);
    assert_eq!(net.status(a).peers.iter().find(|p| p.ipv6 == net.mesh_ip(b)).unwrap().inner_mtu, None);
}

#[test]
fn a_narrow_path_to_the_relay_limits_relayed_peers_by_the_relay_header_too() {
    let mut net = Net::new(12);
    let a = net.add_host_behind(0, SYMMETRIC);
    let b = net.add_host_behind(1, SYMMETRIC);
    net.run_for(Duration::from_millis(500));
    assert!(net.ping(a, b, Duration::from_secs(2)).is_some());
    net.run_for(Duration::from_secs(10));
    let peer = net.status(a).peers[0].clone();
    assert_eq!(peer.path, "relay");
    let now = net.now;
    net.hosts[a].node.handle_path_mtu(peer.endpoint.unwrap(), 1280, now);
    let packet = packet_to(&net, a, b);
    let relay_header = meshtun_proto::relay::RELAY_HEADER_LEN;
    assert_eq!(net.hosts[a].node.max_packet_toward(&packet, now), Some(1220 - relay_header));
    // A relayed packet that size leaves as exactly a 1280-byte IP packet.
    let fitting = echo_request(net.mesh_ip(a), net.mesh_ip(b), 2, &vec![0; 1220 - relay_header - 48]);
    net.hosts[a].node.handle_tun_packet(&fitting, now);
    let sizes: Vec<usize> = std::iter::from_fn(|| net.hosts[a].node.poll_transmit()).map(|t| t.payload.len()).collect();
    assert!(sizes.contains(&(1280 - 20 - 8)), "UDP payloads sent: {sizes:?}");
}

#[test]
fn a_packet_beyond_a_narrow_path_still_goes_and_its_sender_is_told_the_path_size_at_a_bounded_rate() {
    let mut net = Net::new(13);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    net.run_for(Duration::from_millis(500));
    assert!(net.ping(a, b, Duration::from_secs(2)).is_some());
    net.run_for(Duration::from_secs(3));
    let to_b = net.status(a).peers.iter().find(|p| p.ipv6 == net.mesh_ip(b)).unwrap().clone();
    assert_eq!(to_b.path, "direct");
    let now = net.now;
    // A 1400-byte link (a cloud overlay): 1340 bytes of inner packet fit.
    net.hosts[a].node.handle_path_mtu(to_b.endpoint.unwrap(), 1400, now);
    let packet = packet_to(&net, a, b);
    assert_eq!(net.hosts[a].node.max_packet_toward(&packet, now), Some(1340));
    let node = &mut net.hosts[a].node;
    while node.poll_tun().is_some() {}
    while node.poll_transmit().is_some() {}

    node.handle_tun_packet_beyond_path(&packet, 1340, now);
    let answer = node.poll_tun().expect("an answer into the TUN");
    let parsed = etherparse::SlicedPacket::from_ip(&answer).unwrap();
    match parsed.transport {
        Some(etherparse::TransportSlice::Icmpv6(icmp)) => {
            assert_eq!(icmp.icmp_type(), etherparse::Icmpv6Type::PacketTooBig { mtu: 1340 })
        }
        other => panic!("not ICMPv6: {other:?}"),
    }
    assert_eq!(meshtun_overlay::packet::ipv6_addresses(&answer), Some((net.mesh_ip(b), net.mesh_ip(a))));
    let node = &mut net.hosts[a].node;
    let sent: Vec<usize> = std::iter::from_fn(|| node.poll_transmit()).map(|t| t.payload.len()).collect();
    // Whole, in one WireGuard message (32 bytes of framing), for the UDP
    // layer to fragment.
    assert_eq!(sent, vec![packet.len() + 32], "the packet itself still goes");
    assert_eq!(node.stats().too_big_signals, 1);

    // A burst at one instant: every packet goes, the answers are bounded.
    for _ in 0..50 {
        node.handle_tun_packet_beyond_path(&packet, 1340, now);
    }
    let answers = std::iter::from_fn(|| node.poll_tun()).count();
    let sent = std::iter::from_fn(|| node.poll_transmit()).count();
    assert_eq!(sent, 50);
    assert!((5..=10).contains(&answers), "{answers} answers to a burst of 50");
    // A second later the sender may be told again.
    let later = now + Duration::from_secs(1);
    node.handle_tun_packet_beyond_path(&packet, 1340, later);
    assert_eq!(std::iter::from_fn(|| node.poll_tun()).count(), 1);
    while node.poll_transmit().is_some() {}

    // IPv6 cannot be told less than 1280 bytes: the packet goes, untold.
    node.handle_tun_packet_beyond_path(&packet, 1220, later + Duration::from_secs(1));
    assert_eq!(std::iter::from_fn(|| node.poll_tun()).count(), 0);
    let full_size = std::iter::from_fn(|| node.poll_transmit()).filter(|t| t.payload.len() == packet.len() + 32).count();
    assert_eq!(full_size, 1);
}

fn udp4(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, len: usize, dont_fragment: bool) -> Vec<u8> {
    let mut header = etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, src.octets(), dst.octets()).unwrap();
    header.dont_fragment = dont_fragment;
    let builder = etherparse::PacketBuilder::ip(etherparse::IpHeaders::Ipv4(header, Default::default())).udp(40000, 8080);
    let mut out = Vec::new();
    builder.write(&mut out, &vec![5u8; len - 28]).unwrap();
    out
}

#[test]
fn ipv4_beyond_a_narrow_path_is_fragmented_to_fit_without_df_and_its_sender_told_with_df() {
    let mut net = Net::new(14);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    net.run_for(Duration::from_secs(1));
    let (a4, b4) = (net.hosts[a].node.mesh_ipv4(), net.hosts[b].node.mesh_ipv4());
    net.inject(a, &udp4(a4, b4, 100, false));
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.hosts[b].delivered.len(), 1, "the first datagram arrives whole");
    let to_b = net.status(a).peers[0].clone();
    let now = net.now;
    net.hosts[a].node.handle_path_mtu(to_b.endpoint.unwrap(), 1400, now);
    let big = udp4(a4, b4, 1400, false);
    assert_eq!(net.hosts[a].node.max_packet_toward(&big, now), Some(1340));

    // Without DF: cut into fragments that fit, which b's kernel reassembles.
    net.hosts[a].node.handle_tun_packet_beyond_path(&big, 1340, now);
    net.run_for(Duration::from_millis(200));
    let fragments: Vec<Vec<u8>> = net.hosts[b].delivered[1..].to_vec();
    assert_eq!(fragments.len(), 2, "two fragments delivered");
    let mut data = vec![0u8; 1380];
    for f in &fragments {
        assert!(f.len() <= 1340);
        assert_eq!(meshtun_overlay::ipv4::addresses(f), Some((a4, b4)));
        let offset = usize::from(u16::from_be_bytes([f[6], f[7]]) & 0x1fff) * 8;
        data[offset..offset + f.len() - 20].copy_from_slice(&f[20..]);
    }
    assert_eq!(data, big[20..]);
    assert_eq!(net.hosts[a].node.stats().fragmented_for_path, 1);
    assert!(net.hosts[a].delivered.is_empty(), "a sender without DF is not told");

    // With DF: it goes whole (the UDP layer fragments it) and the sender is told.
    net.hosts[a].node.handle_tun_packet_beyond_path(&udp4(a4, b4, 1400, true), 1340, net.now);
    net.run_for(Duration::from_millis(200));
    assert_eq!(net.hosts[b].delivered.last().map(Vec::len), Some(1400));
    let answer = net.hosts[a].delivered.last().expect("an answer into a's TUN").clone();
    let parsed = etherparse::SlicedPacket::from_ip(&answer).unwrap();
    match parsed.transport {
        Some(etherparse::TransportSlice::Icmpv4(icmp)) => assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1340
            })
        ),
        other => panic!("not ICMP: {other:?}"),
    }
    assert_eq!(meshtun_overlay::ipv4::addresses(&answer), Some((b4, a4)));
}
