//! IPv4 for agents that do not speak IPv6: per-host alias table and
//! address rewriting.
//!
//! Inside the tunnel an IPv4 packet always carries canonical addresses
//! (`meshtun_addr::canonical_ipv4`). Each host may show a peer under a
//! local alias instead (when the peer's canonical address collides with
//! another peer's on this host); the engine rewrites the peer's address on
//! the way in and out, fixing checksums incrementally (RFC 1624).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use meshtun_addr::{canonical_ipv4, next_mesh_ipv4, MeshAddr};

/// This host's view: which IPv4 address stands for which node.
#[derive(Default)]
pub struct AliasTable {
    by_addr: HashMap<MeshAddr, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, MeshAddr>,
}

impl AliasTable {
    /// The local address of `addr`, assigning one (its canonical address if
    /// free, else the next free one) on first use. `own` is never handed out.
    pub fn alias_for(&mut self, addr: MeshAddr, own: Ipv4Addr) -> Ipv4Addr {
        if let Some(ip) = self.by_addr.get(&addr) {
            return *ip;
        }
        let mut ip = canonical_ipv4(addr);
        while ip == own || self.by_ip.contains_key(&ip) {
            ip = next_mesh_ipv4(ip);
        }
        self.by_addr.insert(addr, ip);
        self.by_ip.insert(ip, addr);
        ip
    }

    pub fn node_for(&self, ip: Ipv4Addr) -> Option<MeshAddr> {
        self.by_ip.get(&ip).copied()
    }

    pub fn get(&self, addr: MeshAddr) -> Option<Ipv4Addr> {
        self.by_addr.get(&addr).copied()
    }

    /// Aliases that differ from the canonical address: what must be kept
    /// across restarts for the mapping to stay stable.
    pub fn non_canonical(&self) -> Vec<(MeshAddr, Ipv4Addr)> {
        let mut v: Vec<_> =
            self.by_addr.iter().filter(|(a, ip)| canonical_ipv4(**a) != **ip).map(|(a, ip)| (*a, *ip)).collect();
        v.sort();
        v
    }

    /// Restores saved aliases (before any traffic).
    pub fn restore(&mut self, saved: &[(MeshAddr, Ipv4Addr)], own: Ipv4Addr) {
        for (addr, ip) in saved {
            if *ip != own && !self.by_ip.contains_key(ip) && !self.by_addr.contains_key(addr) {
                self.by_addr.insert(*addr, *ip);
                self.by_ip.insert(*ip, *addr);
            }
        }
    }
}

/// Source and destination of an IPv4 packet.
pub fn addresses(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
    let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
    Some((src.into(), dst.into()))
}

/// Rewrites the source and/or destination address, keeping the IPv4
/// header checksum and any TCP or UDP checksum valid. Returns false (and
/// leaves the packet alone) if it is not a well-formed IPv4 packet.
pub fn rewrite(packet: &mut [u8], new_src: Option<Ipv4Addr>, new_dst: Option<Ipv4Addr>) -> bool {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < 20 || ihl > packet.len() {
        return false;
    }
    let protocol = packet[9];
    let first_fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff == 0;
    let l4_checksum_at = match protocol {
        6 if first_fragment && packet.len() >= ihl + 18 => Some(ihl + 16),
        17 if first_fragment && packet.len() >= ihl + 8 => Some(ihl + 6),
        _ => None,
    };
    for (offset, new) in [(12usize, new_src), (16usize, new_dst)] {
        let Some(new) = new else { continue };
        let old: [u8; 4] = [packet[offset], packet[offset + 1], packet[offset + 2], packet[offset + 3]];
        let new = new.octets();
        if old == new {
            continue;
        }
        packet[offset..offset + 4].copy_from_slice(&new);
        let header = u16::from_be_bytes([packet[10], packet[11]]);
        packet[10..12].copy_from_slice(&adjust(header, old, new).to_be_bytes());
        if let Some(at) = l4_checksum_at {
            let sum = u16::from_be_bytes([packet[at], packet[at + 1]]);
            if protocol == 17 && sum == 0 {
                continue; // UDP without a checksum stays without one
            }
            let mut updated = adjust(sum, old, new);
            if protocol == 17 && updated == 0 {
                updated = 0xffff;
            }
            packet[at..at + 2].copy_from_slice(&updated.to_be_bytes());
        }
    }
    true
}

/// RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'), over the two 16-bit words of
/// an address.
fn adjust(checksum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let mut acc = u32::from(!checksum);
    for i in [0, 2] {
        acc += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        acc += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn checksums_valid(packet: &[u8]) -> bool {
        let sliced = SlicedPacket::from_ip(packet).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else { return false };
        let header = ip.header().to_header();
        if header.calc_header_checksum() != header.header_checksum {
            return false;
        }
        match &sliced.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                tcp.to_header().calc_checksum_ipv4(&header, tcp.payload()).unwrap() == tcp.checksum()
            }
            Some(TransportSlice::Udp(udp)) => {
                udp.checksum() == 0 || udp.to_header().calc_checksum_ipv4(&header, udp.payload()).unwrap() == udp.checksum()
            }
            _ => true,
        }
    }

    fn tcp_packet() -> Vec<u8> {
        let b = PacketBuilder::ipv4([100, 64, 1, 2], [100, 70, 3, 4], 64).tcp(40000, 8080, 1234, 65535);
        let mut out = Vec::new();
        b.write(&mut out, b"GET / HTTP/1.0\r\n\r\n").unwrap();
        out
    }

    #[test]
    fn rewriting_addresses_keeps_ip_and_tcp_checksums_valid() {
        let mut p = tcp_packet();
        assert!(checksums_valid(&p));
        assert!(rewrite(&mut p, Some(Ipv4Addr::new(100, 99, 0, 7)), Some(Ipv4Addr::new(100, 100, 200, 1))));
        assert_eq!(addresses(&p), Some((Ipv4Addr::new(100, 99, 0, 7), Ipv4Addr::new(100, 100, 200, 1))));
        assert!(checksums_valid(&p));
    }

    #[test]
    fn rewriting_keeps_udp_checksums_valid_and_zero_checksums_zero() {
        let b = PacketBuilder::ipv4([100, 64, 1, 2], [100, 70, 3, 4], 64).udp(5000, 53);
        let mut p = Vec::new();
        b.write(&mut p, b"hello").unwrap();
        assert!(rewrite(&mut p, None, Some(Ipv4Addr::new(100, 65, 0, 9))));
        assert!(checksums_valid(&p));
        let at = 20 + 6;
        p[at] = 0;
        p[at + 1] = 0;
        assert!(rewrite(&mut p, Some(Ipv4Addr::new(100, 65, 0, 10)), None));
        assert_eq!(&p[at..at + 2], &[0, 0]);
    }

    #[test]
    fn malformed_packets_are_left_alone() {
        let mut short = vec![0x45, 0, 0];
        assert!(!rewrite(&mut short, Some(Ipv4Addr::new(1, 1, 1, 1)), None));
        let mut v6 = vec![0x60; 40];
        assert!(!rewrite(&mut v6, Some(Ipv4Addr::new(1, 1, 1, 1)), None));
        let mut bad_ihl = tcp_packet();
        bad_ihl[0] = 0x4f;
        bad_ihl.truncate(40);
        assert!(!rewrite(&mut bad_ihl, Some(Ipv4Addr::new(1, 1, 1, 1)), None));
    }

    #[test]
    fn aliases_prefer_the_canonical_address_and_never_collide() {
        let mut t = AliasTable::default();
        let a: MeshAddr = "0:0000.0000.0001".parse().unwrap();
        let b: MeshAddr = "0:0000.0000.0002".parse().unwrap();
        let own = canonical_ipv4(b); // pretend b's canonical address is ours
        assert_eq!(t.alias_for(a, own), canonical_ipv4(a));
        let alias_b = t.alias_for(b, own);
        assert_ne!(alias_b, own);
        assert_eq!(t.node_for(alias_b), Some(b));
        assert_eq!(t.non_canonical(), vec![(b, alias_b)]);
        let mut restored = AliasTable::default();
        restored.restore(&t.non_canonical(), own);
        assert_eq!(restored.alias_for(b, own), alias_b, "stable across restarts");
    }
}
