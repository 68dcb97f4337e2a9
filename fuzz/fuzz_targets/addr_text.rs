//! Address text and the IPv6 mapping: `MeshAddr` / `NodeAddr` parsing
//! (what is accepted must be the documented form and round-trip through
//! Display) and `MeshAddr::from_ipv6` (one-to-one with `to_ipv6`).
#![no_main]

use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use meshtun_addr::{canonical_ipv4, group_network, is_mesh_ipv4, MeshAddr, NodeAddr};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(addr) = text.parse::<MeshAddr>() {
            assert_eq!(addr.to_string().parse::<MeshAddr>(), Ok(addr));
            // `N:XXXX.XXXX.XXXX`: decimal network, hex digits in either case.
            let (net, node) = text.split_once(':').expect("accepted text has a colon");
            assert!(!net.is_empty() && net.bytes().all(|b| b.is_ascii_digit()), "network {net:?}");
            assert_eq!(net.parse::<u16>(), Ok(addr.network.0));
            assert!(node.eq_ignore_ascii_case(&addr.node.to_string()), "node {node:?}");
            assert_eq!(MeshAddr::from_ipv6(addr.to_ipv6()), Ok(addr));
            assert!(is_mesh_ipv4(canonical_ipv4(addr)));
        }
        if let Ok(node) = text.parse::<NodeAddr>() {
            assert!(text.eq_ignore_ascii_case(&node.to_string()), "node {text:?}");
        }
    }
    if let Some(octets) = data.first_chunk::<16>() {
        let ip = Ipv6Addr::from(*octets);
        if let Ok(addr) = MeshAddr::from_ipv6(ip) {
            assert_eq!(addr.to_ipv6(), ip, "from_ipv6 must be the inverse of to_ipv6");
        }
        if let Some(network) = group_network(ip) {
            assert_eq!(ip.segments()[2], network.0);
        }
    }
});
