//! Group multicast addresses.
//!
//! A group named `name` in network `N` is the IPv6 multicast address
//! `ff15:4d54:NNNN:0:HHHH:HHHH:HHHH:HHHH`: flags 1 (transient), scope 5
//! (site), then "MT", the network number, and the first 64 bits of
//! BLAKE3 (derive_key context "meshtun 2026 group address v1") of the
//! group name. Every node computes the same address from the name alone.

use std::net::Ipv6Addr;

use crate::node::NetworkId;

const GROUP_CONTEXT: &str = "meshtun 2026 group address v1";

/// The prefix all group addresses share: `ff15:4d54::/32`.
pub const GROUP_PREFIX: Ipv6Addr = Ipv6Addr::new(0xff15, 0x4d54, 0, 0, 0, 0, 0, 0);
/// Length of [`GROUP_PREFIX`].
pub const GROUP_PREFIX_LEN: u8 = 32;

/// The multicast address of group `name` in `network`.
pub fn group_multicast_addr(network: NetworkId, name: &str) -> Ipv6Addr {
    let hash = blake3::derive_key(GROUP_CONTEXT, name.as_bytes());
    let mut octets = [0u8; 16];
    octets[0..4].copy_from_slice(&[0xff, 0x15, 0x4d, 0x54]);
    octets[4..6].copy_from_slice(&network.0.to_be_bytes());
    octets[8..16].copy_from_slice(&hash[0..8]);
    Ipv6Addr::from(octets)
}

/// The network of a group multicast address, if `ip` is one.
pub fn group_network(ip: Ipv6Addr) -> Option<NetworkId> {
    let o = ip.octets();
    (o[0..4] == [0xff, 0x15, 0x4d, 0x54] && o[6..8] == [0, 0]).then(|| NetworkId(u16::from_be_bytes([o[4], o[5]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_addresses_are_stable_distinct_and_recognised() {
        let research = group_multicast_addr(NetworkId(0), "research");
        assert_eq!(research, group_multicast_addr(NetworkId(0), "research"));
        assert_ne!(research, group_multicast_addr(NetworkId(0), "trading"));
        assert_ne!(research, group_multicast_addr(NetworkId(1), "research"));
        assert!(research.is_multicast());
        assert_eq!(research.segments()[0], 0xff15);
        assert_eq!(group_network(research), Some(NetworkId(0)));
        assert_eq!(group_network(group_multicast_addr(NetworkId(7), "x")), Some(NetworkId(7)));
        assert_eq!(group_network("ff02::1".parse().unwrap()), None);
    }
}
