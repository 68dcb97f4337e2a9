//! IPv4 agents over the mesh, in the simulator: literals and names, and
//! cryptokey routing for IPv4.

mod netsim;

use std::net::Ipv4Addr;
use std::time::Duration;

use etherparse::PacketBuilder;
use meshtun_addr::{canonical_ipv4, NetworkId};
use meshtun_overlay::Answer;
use meshtun_proto::Query;
use netsim::Net;

fn udp4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(40000, 8080);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn delivered_udp_payloads(net: &Net, host: usize) -> Vec<(Ipv4Addr, Ipv4Addr, Vec<u8>)> {
    net.hosts[host]
        .delivered
        .iter()
        .filter_map(|p| {
            let s = etherparse::SlicedPacket::from_ip(p).ok()?;
            let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else { return None };
            let Some(etherparse::TransportSlice::Udp(udp)) = &s.transport else { return None };
            Some((ip.header().source_addr(), ip.header().destination_addr(), udp.payload().to_vec()))
        })
        .collect()
}

#[test]
fn an_ipv4_literal_reaches_the_node_that_owns_it_with_valid_checksums() {
    let mut net = Net::new(21);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    net.run_for(Duration::from_secs(1));
    let (a4, b4) = (net.hosts[a].node.mesh_ipv4(), net.hosts[b].node.mesh_ipv4());
    assert_eq!(b4, canonical_ipv4(net.hosts[b].node.mesh_addr()));
    net.inject(a, &udp4(a4, b4, b"hello over ipv4"));
    net.run_for(Duration::from_secs(2));
    let got = delivered_udp_payloads(&net, b);
    assert_eq!(got, vec![(a4, b4, b"hello over ipv4".to_vec())]);
    // The reply finds its way back through the session.
    net.inject(b, &udp4(b4, a4, b"and back"));
    net.run_for(Duration::from_millis(200));
    assert_eq!(delivered_udp_payloads(&net, a), vec![(b4, a4, b"and back".to_vec())]);
}

#[test]
fn a_hostname_query_hands_out_the_ipv4_address_dns_answers_with() {
    let mut net = Net::new(22);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    net.set_tags(b, Some("specialist-fx"), &[], &[]);
    net.run_for(Duration::from_secs(1));
    let q = Query::Hostname { network: NetworkId::PUBLIC, name: "specialist-fx".into() };
    let Some(Answer::Query { found, .. }) = net.query(a, q, Duration::from_secs(2)) else { panic!() };
    assert_eq!(found[0].ipv4, net.hosts[b].node.mesh_ipv4());
    assert_eq!(net.hosts[a].node.node_for_ipv4(found[0].ipv4), Some(net.hosts[b].node.mesh_addr()));
}

#[test]
fn a_peer_cannot_send_ipv4_from_another_nodes_address() {
    let mut net = Net::new(23);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    let c = net.add_host(2, None);
    net.run_for(Duration::from_secs(1));
    let (a4, b4, c4) = (net.hosts[a].node.mesh_ipv4(), net.hosts[b].node.mesh_ipv4(), net.hosts[c].node.mesh_ipv4());
    net.inject(c, &udp4(c4, b4, b"legit"));
    net.run_for(Duration::from_secs(1));
    net.inject(c, &udp4(a4, b4, b"spoofed as a"));
    net.run_for(Duration::from_secs(1));
    let got = delivered_udp_payloads(&net, b);
    assert_eq!(got, vec![(c4, b4, b"legit".to_vec())]);
    assert_eq!(net.hosts[b].node.stats().dropped.spoofed_source, 1);
}

#[test]
fn an_ipv4_address_nobody_owns_is_dropped_and_counted() {
    let mut net = Net::new(24);
    let a = net.add_host(0, None);
    net.run_for(Duration::from_secs(1));
    let a4 = net.hosts[a].node.mesh_ipv4();
    net.inject(a, &udp4(a4, Ipv4Addr::new(100, 100, 100, 100), b"anyone?"));
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.hosts[a].node.stats().dropped.lookup_failed, 1);
}
