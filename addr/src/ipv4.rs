//! IPv4 addresses for mesh nodes, for agents that do not speak IPv6.
//!
//! Every node has a *canonical* IPv4 address in the shared address space
//! `100.64.0.0/10` (RFC 6598): `100.64.0.0` plus 22 bits of BLAKE3
//! (derive_key context "meshtun 2026 ipv4 v1") over the network number and
//! node address. 22 bits cannot name 2^48 nodes uniquely, so the canonical
//! address is only the default: each host keeps its own alias table and
//! gives a peer whose canonical address is already in use there the next
//! free address instead. Inside the tunnel packets always carry canonical
//! addresses; each end rewrites to and from its local aliases.

use std::net::Ipv4Addr;

use crate::mesh::MeshAddr;

const IPV4_CONTEXT: &str = "meshtun 2026 ipv4 v1";

/// The IPv4 range mesh nodes live in: `100.64.0.0/10`.
pub const IPV4_PREFIX: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
/// Length of [`IPV4_PREFIX`].
pub const IPV4_PREFIX_LEN: u8 = 10;
const HOST_BITS: u32 = 32 - IPV4_PREFIX_LEN as u32;
const HOST_MASK: u32 = (1 << HOST_BITS) - 1;

/// The canonical IPv4 address of a node.
pub fn canonical_ipv4(addr: MeshAddr) -> Ipv4Addr {
    let mut input = [0u8; 8];
    input[0..2].copy_from_slice(&addr.network.0.to_be_bytes());
    input[2..8].copy_from_slice(&addr.node.to_bytes());
    let hash = blake3::derive_key(IPV4_CONTEXT, &input);
    let host = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]) & HOST_MASK;
    from_host(host)
}

/// Whether `ip` is inside the mesh IPv4 range.
pub fn is_mesh_ipv4(ip: Ipv4Addr) -> bool {
    u32::from(ip) & !HOST_MASK == u32::from(IPV4_PREFIX)
}

/// The address after `ip` in the mesh range (wrapping, skipping the range's
/// own network and broadcast addresses), for alias probing.
pub fn next_mesh_ipv4(ip: Ipv4Addr) -> Ipv4Addr {
    let next = (u32::from(ip) & HOST_MASK) + 1;
    from_host(if next >= HOST_MASK { 1 } else { next })
}

fn from_host(host: u32) -> Ipv4Addr {
    let host = host.clamp(1, HOST_MASK - 1);
    Ipv4Addr::from(u32::from(IPV4_PREFIX) | host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{NetworkId, NodeAddr};

    fn addr(n: u64) -> MeshAddr {
        MeshAddr::new(NetworkId(0), NodeAddr::new(n).unwrap())
    }

    #[test]
    fn canonical_addresses_are_stable_and_inside_the_range() {
        let a = canonical_ipv4(addr(0xA91F_0000_7C2E));
        assert_eq!(a, canonical_ipv4(addr(0xA91F_0000_7C2E)));
        assert!(is_mesh_ipv4(a));
        assert_ne!(a, canonical_ipv4(addr(0xA91F_0000_7C2F)));
        assert_ne!(a, canonical_ipv4(MeshAddr::new(NetworkId(1), NodeAddr::new(0xA91F_0000_7C2E).unwrap())));
    }

    #[test]
    fn the_range_edges_are_never_handed_out() {
        assert_eq!(next_mesh_ipv4(Ipv4Addr::new(100, 127, 255, 254)), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(next_mesh_ipv4(Ipv4Addr::new(100, 64, 0, 1)), Ipv4Addr::new(100, 64, 0, 2));
        assert!(!is_mesh_ipv4(Ipv4Addr::new(100, 128, 0, 1)));
        assert!(!is_mesh_ipv4(Ipv4Addr::new(10, 64, 0, 1)));
        for n in 0..2000u64 {
            let ip = canonical_ipv4(addr(n + 1));
            assert!(ip != Ipv4Addr::new(100, 64, 0, 0) && ip != Ipv4Addr::new(100, 127, 255, 255));
        }
    }
}
