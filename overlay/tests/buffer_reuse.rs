//! The node seals and opens packets straight into buffers the driver gave
//! back ([`Node::recycle`]): whatever those held before must never leak into
//! a datagram or a delivered packet.

mod netsim;

use std::time::Duration;

use netsim::{echo_request, Net};

#[test]
fn packets_sealed_and_opened_in_recycled_buffers_carry_only_their_own_bytes() {
    let mut net = Net::new(11);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    net.ping(a, b, Duration::from_secs(10)).expect("the nodes reach each other");
    let (ip_a, ip_b) = (net.mesh_ip(a), net.mesh_ip(b));
    // Long, short, then long again: a reused buffer is longer or shorter
    // than what goes in it next.
    for (seq, size) in [1200usize, 40, 700, 0, 1300, 90].into_iter().enumerate() {
        for host in [a, b] {
            for stale in [0xAA, 0x55, 0xFF] {
                net.hosts[host].node.recycle(vec![stale; 3000]);
            }
            net.hosts[host].node.recycle(vec![0x11; 16]);
        }
        let packet = echo_request(ip_a, ip_b, seq as u16 + 100, &vec![seq as u8; size]);
        let (before_a, before_b) = (net.hosts[a].delivered.len(), net.hosts[b].delivered.len());
        net.inject(a, &packet);
        net.run_for(Duration::from_millis(200));
        let at_b = &net.hosts[b].delivered[before_b..];
        assert!(at_b.contains(&packet), "b delivers the {size}-byte echo request exactly as sent");
        // The simulated kernel at b answered; a gets the reply, same length.
        let at_a = &net.hosts[a].delivered[before_a..];
        assert!(at_a.iter().any(|reply| reply.len() == packet.len() && reply[8..24] == packet[24..40]), "a delivers b's reply");
        assert!(at_a.iter().chain(at_b).all(|p| !p.windows(8).any(|w| w == [0xAA; 8] || w == [0x55; 8])), "no stale bytes");
    }
}
