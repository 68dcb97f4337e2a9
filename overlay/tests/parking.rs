//! Parking idle WireGuard sessions, in the simulator: a peer without data
//! for `park_idle_after` drops its boringtun state (keeping its record,
//! path agent and keys) and handshakes again on the next packet either way.

mod netsim;

use std::cell::Cell;
use std::time::Duration;

use boringtun::x25519::StaticSecret;
use etherparse::PacketBuilder;
use meshtun_addr::NetworkId;
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_overlay::firewall::FirewallConfig;
use meshtun_proto::cert::NetworkOwner;
use netsim::Net;

/// Bytes allocated minus bytes freed by this thread (each test runs on its
/// own thread, so other tests do not disturb the count).
struct Counting;

thread_local! {
    static NET_HEAP: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    let _ = NET_HEAP.try_with(|c| c.set(c.get() + delta));
}

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count(layout.size() as i64);
        std::alloc::System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        count(-(layout.size() as i64));
        std::alloc::System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        count(new_size as i64 - layout.size() as i64);
        std::alloc::System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn heap() -> i64 {
    NET_HEAP.with(|c| c.get())
}

const IDLE: Duration = Duration::from_secs(30);

fn parking_net(seed: u64, hosts: usize) -> Net {
    let mut net = Net::new(seed);
    for i in 0..hosts {
        net.add_host_with(i, None, |c| c.park_idle_after = Some(IDLE));
    }
    net.run_for(Duration::from_secs(1));
    net
}

fn session(net: &Net, host: usize, peer: usize) -> String {
    let addr = net.hosts[peer].node.mesh_addr().to_string();
    net.status(host).peers.iter().find(|p| p.address == addr).map(|p| p.session.to_string()).unwrap_or_else(|| "no peer".into())
}

fn udp6(net: &Net, from: usize, to: usize, n: u16) -> Vec<u8> {
    let b = PacketBuilder::ipv6(net.mesh_ip(from).octets(), net.mesh_ip(to).octets(), 64).udp(40000, 5000);
    let mut out = Vec::new();
    b.write(&mut out, &n.to_be_bytes()).unwrap();
    out
}

#[test]
fn an_idle_peer_is_parked_after_the_idle_period_and_its_session_memory_is_freed() {
    let mut net = parking_net(61, 4);
    for b in 1..4 {
        net.ping(0, b, Duration::from_secs(2)).expect("first ping");
    }
    let last_data = net.now;
    net.run_until(last_data + IDLE - Duration::from_secs(1), |_| false);
    for b in 1..4 {
        assert_eq!(session(&net, 0, b), "up", "not parked before the idle period");
    }
    assert_eq!(net.hosts[0].node.stats().sessions.parks, 0);
    let before = heap();
    net.run_until(last_data + IDLE + Duration::from_secs(1), |_| false);
    let freed = before - heap();
    for b in 1..4 {
        assert_eq!(session(&net, 0, b), "parked");
        assert_eq!(session(&net, b, 0), "parked", "the other side parks too");
    }
    let s = net.hosts[0].node.status(net.now).stats.sessions;
    assert_eq!((s.parks, s.parked), (3, 3));
    // Host 0 parked three sessions, hosts 1-3 one each.
    let tunn = std::mem::size_of::<boringtun::noise::Tunn>() as i64;
    assert!(freed >= 6 * tunn, "freed {freed} B, expected at least 6 x {tunn} B");
    // Idle far longer: nothing wakes the parked sessions (path keepalives
    // and the peers' own parking keep them parked).
    net.run_for(Duration::from_secs(120));
    let s = net.hosts[0].node.status(net.now).stats.sessions;
    assert_eq!((s.parked, s.unparks_inbound + s.unparks_outbound), (3, 0));
}

#[test]
fn a_packet_to_a_parked_peer_is_delivered_after_one_handshake() {
    let mut net = parking_net(62, 2);
    net.ping(0, 1, Duration::from_secs(2)).expect("first ping");
    net.run_for(IDLE + Duration::from_secs(5));
    assert_eq!(session(&net, 0, 1), "parked");
    let (a0, b0) = (net.hosts[0].node.stats().handshakes.clone(), net.hosts[1].node.stats().handshakes.clone());
    let took = net.ping(0, 1, Duration::from_secs(2)).expect("delivered");
    // Initiation, response, then the queued packet: three one-way trips.
    assert!(took <= net.latency * 3 + Duration::from_millis(5), "{took:?}");
    let (a1, b1) = (net.hosts[0].node.stats().handshakes.clone(), net.hosts[1].node.stats().handshakes.clone());
    assert_eq!(a1.initiated - a0.initiated, 1, "one handshake");
    assert_eq!(b1.initiated, b0.initiated);
    assert_eq!(net.hosts[0].node.stats().sessions.unparks_outbound, 1);
    assert_eq!(net.hosts[1].node.stats().sessions.unparks_inbound, 1);
    assert_eq!(session(&net, 0, 1), "up");
    assert_eq!(session(&net, 1, 0), "up");
    // And back, on the same session.
    assert!(net.ping(1, 0, Duration::from_millis(100)).is_some());
    assert_eq!(net.hosts[1].node.stats().handshakes.initiated, b0.initiated);
}

#[test]
fn data_from_a_peer_that_kept_its_session_restores_the_parked_one_within_a_round_trip_and_a_packet() {
    let mut net = Net::new(63);
    let a = net.add_host_with(0, None, |c| c.park_idle_after = Some(IDLE));
    let b = net.add_host_with(1, None, |c| c.park_idle_after = None);
    net.run_for(Duration::from_secs(1));
    net.ping(a, b, Duration::from_secs(2)).expect("first ping");
    // Past a's idle period, and past b's persistent keepalives (25 s):
    // keepalives for the parked session wake nothing.
    net.run_for(IDLE + Duration::from_secs(30));
    assert_eq!(session(&net, a, b), "parked");
    assert_eq!(session(&net, b, a), "up");
    assert_eq!(net.hosts[a].node.stats().sessions.unparks_inbound, 0);
    // b streams a packet every 20 ms on its old session.
    let every = Duration::from_millis(20);
    let mut sent = Vec::new();
    for n in 0..50u16 {
        let p = udp6(&net, b, a, n);
        net.inject(b, &p);
        sent.push(p);
        net.run_for(every);
    }
    net.run_for(Duration::from_millis(100));
    let first = sent.iter().position(|p| net.hosts[a].delivered.contains(p)).expect("the stream resumed");
    let stall = every * first as u32 + net.latency;
    // The first packet reaches a after one latency; a initiates, b answers,
    // a's keepalive switches b over: three more trips, then b's next packet.
    let bound = net.latency * 5 + every;
    println!("stall {stall:?} (bound {bound:?}); first delivered packet #{first}");
    assert!(stall <= bound, "stall {stall:?} > {bound:?}");
    assert!(sent[first..].iter().all(|p| net.hosts[a].delivered.contains(p)), "every packet after the switch arrives");
    assert_eq!(net.hosts[a].node.stats().sessions.unparks_inbound, 1);
    assert_eq!(session(&net, a, b), "up");
}

#[test]
fn an_active_flow_is_never_parked_in_either_direction() {
    let mut net = parking_net(64, 3);
    // A request/response flow 0 <-> 1 and a one-way stream 0 -> 2, for
    // three idle periods.
    let end = net.now + IDLE * 3;
    let mut n = 0u16;
    while net.now < end {
        net.ping(0, 1, Duration::from_secs(1)).expect("flow 0 <-> 1");
        let p = udp6(&net, 0, 2, n);
        n += 1;
        net.inject(0, &p);
        net.run_for(Duration::from_secs(2));
        assert!(net.hosts[2].delivered.contains(&p));
        for (host, peer) in [(0, 1), (1, 0), (0, 2), (2, 0)] {
            assert_eq!(session(&net, host, peer), "up", "host {host}'s session to {peer} at {:?}", net.now - net.start);
        }
    }
    for host in 0..3 {
        assert_eq!(net.hosts[host].node.stats().sessions.parks, 0);
    }
    // Once the flows stop, both sessions park.
    net.run_for(IDLE + Duration::from_secs(2));
    assert_eq!(net.hosts[0].node.status(net.now).stats.sessions.parked, 2);
}

#[test]
fn a_key_rotation_reaches_parked_peers_and_traffic_flows_both_ways() {
    let mut net = parking_net(65, 2);
    net.ping(0, 1, Duration::from_secs(2)).expect("first ping");
    net.run_for(IDLE + Duration::from_secs(5));
    assert_eq!(session(&net, 0, 1), "parked");
    let now = net.now;
    net.hosts[0].node.rotate_wg_key(StaticSecret::from([97; 32]), 2, u64::MAX, now);
    net.run_for(Duration::from_secs(2));
    // The peer that did not rotate sends first: it must already have the new key.
    assert!(net.ping(1, 0, Duration::from_secs(1)).is_some(), "b -> a after the rotation");
    assert!(net.ping(0, 1, Duration::from_secs(1)).is_some(), "a -> b after the rotation");
    let b_view = net.hosts[1].node.status(net.now);
    assert_eq!(b_view.peers.len(), 1, "the peer was replaced, not duplicated");
    assert_eq!(net.hosts[1].node.status(net.now).stats.sessions.parked, 0);
    // Parked again later, and woken again with the new key.
    net.run_for(IDLE + Duration::from_secs(5));
    assert_eq!(session(&net, 1, 0), "parked");
    assert!(net.ping(1, 0, Duration::from_secs(1)).is_some());
}

#[test]
fn a_revoked_member_is_dropped_while_parked() {
    const NET: NetworkId = NetworkId(7);
    let owner = NetworkOwner::generate(NET, [77; 32]);
    let mut net = Net::new(66);
    let mut config = DirectoryConfig::default();
    config.network_owners.insert(NET, owner.public_key());
    net.backbone = Directory::new(config);
    for i in 0..2usize {
        let cert = owner.sign_membership(netsim::identity(i).node_addr(), vec![], 100_000, i as u64 + 1);
        net.add_host_with(i, None, |c| {
            c.network = NET;
            c.network_owner = Some(owner.public_key());
            c.certificate = Some(cert);
            c.firewall = FirewallConfig { default_inbound: None, rules: vec!["allow any".parse().unwrap()] };
            c.park_idle_after = Some(IDLE);
        });
    }
    net.run_for(Duration::from_secs(1));
    net.ping(0, 1, Duration::from_secs(2)).expect("members reach each other");
    net.run_for(IDLE + Duration::from_secs(5));
    assert_eq!(session(&net, 0, 1), "parked");
    // The trust check still runs over parked peers.
    net.backbone.set_revocations(NET, owner.sign_revocations(1, vec![2])).unwrap();
    net.run_for(net.heartbeat + Duration::from_secs(1));
    assert!(net.hosts[0].events.iter().any(|e| matches!(e, meshtun_overlay::Event::PeerRemoved { .. })));
    assert_eq!(net.status(0).peers.len(), 0);
    assert_eq!(net.hosts[0].node.status(net.now).stats.sessions.parked, 0, "the removed peer is no longer counted as parked");
    assert!(net.ping(0, 1, Duration::from_secs(2)).is_none());
}

#[test]
fn nat_mappings_stay_open_for_parked_peers_through_path_keepalives() {
    use meshtun_nat::{FilteringBehavior as F, MappingBehavior as M};
    let mut net = Net::new(67);
    // A mapping per destination address: the heartbeats to the backbone do
    // not keep the one towards the peer open, only traffic to the peer does.
    let nat = net.add_nat(M::AddressDependent, F::AddressAndPortDependent);
    net.nats[nat].timeout = Duration::from_secs(30);
    net.add_host_with(0, Some(nat), |c| c.park_idle_after = Some(IDLE));
    net.add_host_with(1, None, |c| c.park_idle_after = Some(IDLE));
    net.run_for(Duration::from_secs(1));
    net.ping(0, 1, Duration::from_secs(2)).expect("first ping");
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.path(0, 1), "direct");
    let changes = |net: &Net| {
        net.hosts.iter().map(|h| h.events.iter().filter(|e| matches!(e, meshtun_overlay::Event::PathChanged { .. })).count()).sum::<usize>()
    };
    let before = changes(&net);
    // Parked for ten NAT timeouts: no WireGuard keepalives any more.
    net.run_for(IDLE + Duration::from_secs(300));
    assert_eq!(session(&net, 0, 1), "parked");
    assert_eq!(session(&net, 1, 0), "parked");
    assert_eq!(changes(&net), before, "the direct path never stopped answering");
    let took = net.ping(1, 0, Duration::from_secs(1)).expect("delivered");
    assert_eq!(net.path(1, 0), "direct", "still direct: the mappings stayed open");
    assert!(took <= net.latency * 3 + Duration::from_millis(5), "one handshake on the direct path, not a detour: {took:?}");
}
