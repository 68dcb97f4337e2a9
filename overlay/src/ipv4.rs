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

/// An ICMP "fragmentation needed and DF set" (RFC 792, RFC 1191) telling
/// the source of `offending` that the path to its destination carries
/// `mtu` bytes, sent from that destination as the path's last router would.
/// `None` unless `offending` is a well-formed first (or only) fragment
/// with DF set that is not itself an ICMP error, or if `mtu` is below the
/// IPv4 minimum of 68.
pub fn icmp_fragmentation_needed(mtu: usize, offending: &[u8]) -> Option<Vec<u8>> {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};
    let (source, destination) = addresses(offending)?;
    let ihl = usize::from(offending[0] & 0x0f) * 4;
    let flags_and_offset = u16::from_be_bytes([offending[6], offending[7]]);
    let dont_fragment = flags_and_offset & 0x4000 != 0;
    let first_fragment = flags_and_offset & 0x1fff == 0;
    let icmp_error = offending[9] == 1 && offending.get(ihl).is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
    let next_hop_mtu = u16::try_from(mtu).ok().filter(|&mtu| mtu >= 68)?;
    if ihl < 20 || ihl > offending.len() || !dont_fragment || !first_fragment || icmp_error {
        return None;
    }
    // As much of the packet as fits a 576-byte error (RFC 1812, 4.3.2.3).
    let quoted = &offending[..offending.len().min(576 - 20 - 8)];
    let builder = PacketBuilder::ipv4(destination.octets(), source.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu }));
    let mut out = Vec::with_capacity(builder.size(quoted.len()));
    builder.write(&mut out, quoted).ok()?;
    Some(out)
}

/// Cuts an IPv4 packet without DF into fragments of at most `max` bytes, as
/// a router on a narrower link would (RFC 791), and calls `each` with every
/// one, in order; the receiver's kernel reassembles them. A fragment is
/// cut again the same way (offsets add up; the last piece keeps its MF).
/// Returns false, calling nothing, for a packet that must stay whole or
/// cannot be cut: DF set, IP options (they would need sorting by their
/// copy flag), malformed, or `max` too small for 8 bytes of data.
pub fn fragment(packet: &[u8], max: usize, mut each: impl FnMut(&[u8])) -> bool {
    const HEADER: usize = 20;
    const DONT_FRAGMENT: u16 = 0x4000;
    const MORE_FRAGMENTS: u16 = 0x2000;
    if packet.len() < HEADER || packet[0] != 0x45 {
        return false;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let flags_and_offset = u16::from_be_bytes([packet[6], packet[7]]);
    let piece = max.saturating_sub(HEADER) & !7;
    if total < HEADER || total > packet.len() || flags_and_offset & DONT_FRAGMENT != 0 || piece == 0 || total <= max {
        return false;
    }
    let (header, data) = (&packet[..HEADER], &packet[HEADER..total]);
    let first_offset = flags_and_offset & 0x1fff;
    let last_more = flags_and_offset & MORE_FRAGMENTS;
    let Some(last_unit) = u16::try_from((data.len() - 1) / 8).ok().and_then(|units| first_offset.checked_add(units)) else {
        return false;
    };
    if last_unit > 0x1fff {
        return false;
    }
    let mut out = Vec::with_capacity(HEADER + piece);
    for (i, chunk) in data.chunks(piece).enumerate() {
        let last = (i + 1) * piece >= data.len();
        let offset = first_offset + (i * piece / 8) as u16;
        let flags = if last { last_more } else { MORE_FRAGMENTS };
        out.clear();
        out.extend_from_slice(header);
        out.extend_from_slice(chunk);
        out[2..4].copy_from_slice(&((HEADER + chunk.len()) as u16).to_be_bytes());
        out[6..8].copy_from_slice(&(flags | offset).to_be_bytes());
        crate::offload::ipv4_header_checksum(&mut out[..HEADER]);
        each(&out);
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

    fn udp_packet(len: usize, dont_fragment: bool) -> Vec<u8> {
        let mut header = etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, [100, 64, 1, 2], [100, 70, 3, 4]).unwrap();
        header.dont_fragment = dont_fragment;
        let b = PacketBuilder::ip(etherparse::IpHeaders::Ipv4(header, Default::default())).udp(5000, 9999);
        let mut out = Vec::new();
        b.write(&mut out, &vec![9u8; len - 28]).unwrap();
        out
    }

    #[test]
    fn fragmentation_needed_comes_from_the_destination_with_the_mtu_and_quotes_the_packet() {
        let big = udp_packet(1400, true);
        let error = icmp_fragmentation_needed(1340, &big).unwrap();
        assert_eq!(error.len(), 576);
        assert_eq!(addresses(&error), Some((Ipv4Addr::new(100, 70, 3, 4), Ipv4Addr::new(100, 64, 1, 2))));
        let sliced = SlicedPacket::from_ip(&error).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else { panic!("not IPv4") };
        let header = ip.header().to_header();
        assert_eq!(header.calc_header_checksum(), header.header_checksum);
        match sliced.transport {
            Some(TransportSlice::Icmpv4(icmp)) => {
                assert_eq!(
                    icmp.icmp_type(),
                    etherparse::Icmpv4Type::DestinationUnreachable(
                        etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1340 }
                    )
                );
                // The ones'-complement sum over a message with a valid checksum is all ones.
                let sum = icmp.slice().chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum::<u32>();
                let folded = (sum & 0xffff) + (sum >> 16);
                assert_eq!((folded & 0xffff) + (folded >> 16), 0xffff);
                assert_eq!(icmp.payload(), &big[..548]);
            }
            other => panic!("not ICMP: {other:?}"),
        }
    }

    #[test]
    fn fragmentation_needed_is_only_for_whole_df_packets_that_are_not_errors() {
        assert!(icmp_fragmentation_needed(1340, &udp_packet(1400, false)).is_none());
        let mut later_fragment = udp_packet(1400, true);
        later_fragment[7] = 0x10;
        assert!(icmp_fragmentation_needed(1340, &later_fragment).is_none());
        let error = icmp_fragmentation_needed(1340, &udp_packet(1400, true)).unwrap();
        assert!(icmp_fragmentation_needed(1340, &error).is_none());
        assert!(icmp_fragmentation_needed(67, &udp_packet(1400, true)).is_none());
        assert!(icmp_fragmentation_needed(1340, &[0x45, 0, 0]).is_none());
        assert!(icmp_fragmentation_needed(1340, &[0x60; 60]).is_none());
    }

    /// (offset in bytes, more fragments, header checksum valid, data) of a fragment.
    fn fragment_parts(f: &[u8]) -> (usize, bool, bool, Vec<u8>) {
        let flags_and_offset = u16::from_be_bytes([f[6], f[7]]);
        let header = etherparse::Ipv4HeaderSlice::from_slice(f).unwrap().to_header();
        let valid = header.calc_header_checksum() == header.header_checksum;
        assert_eq!(usize::from(u16::from_be_bytes([f[2], f[3]])), f.len());
        (usize::from(flags_and_offset & 0x1fff) * 8, flags_and_offset & 0x2000 != 0, valid, f[20..].to_vec())
    }

    #[test]
    fn a_packet_without_df_is_cut_into_fragments_that_fit_and_reassemble_to_it() {
        let mut packet = udp_packet(1400, false);
        for (i, byte) in packet[28..].iter_mut().enumerate() {
            *byte = i as u8;
        }
        let mut fragments = Vec::new();
        assert!(fragment(&packet, 1340, |f| fragments.push(f.to_vec())));
        assert_eq!(fragments.len(), 2);
        let mut reassembled = vec![0u8; 1380];
        for (i, f) in fragments.iter().enumerate() {
            assert!(f.len() <= 1340);
            assert_eq!(f[..2], packet[..2]);
            assert_eq!(f[4..6], packet[4..6], "one identification for all");
            assert_eq!(f[12..20], packet[12..20]);
            let (offset, more, valid, data) = fragment_parts(f);
            assert!(valid, "header checksum of fragment {i}");
            assert_eq!(more, i == 0);
            assert_eq!(offset % 8, 0);
            reassembled[offset..offset + data.len()].copy_from_slice(&data);
        }
        assert_eq!(reassembled, packet[20..]);
        assert_eq!(fragment_parts(&fragments[1]).0, 1320);
    }

    #[test]
    fn a_fragment_cut_again_keeps_its_place_and_its_more_fragments_flag() {
        let mut packet = udp_packet(1400, false);
        // The second of several: 800 bytes in, more to come.
        packet[6..8].copy_from_slice(&(0x2000u16 | 100).to_be_bytes());
        let mut parts = Vec::new();
        assert!(fragment(&packet, 1000, |f| parts.push(fragment_parts(f))));
        let places: Vec<(usize, bool)> = parts.iter().map(|p| (p.0, p.1)).collect();
        assert_eq!(places, vec![(800, true), (1776, true)]);
        assert!(parts.iter().all(|p| p.2));
    }

    #[test]
    fn packets_that_must_stay_whole_are_not_fragmented() {
        let mut calls = 0;
        assert!(!fragment(&udp_packet(1400, true), 1340, |_| calls += 1), "DF");
        let mut with_options = udp_packet(1400, false);
        with_options[0] = 0x46;
        assert!(!fragment(&with_options, 1340, |_| calls += 1), "options");
        assert!(!fragment(&udp_packet(1400, false), 1400, |_| calls += 1), "already fits");
        assert!(!fragment(&udp_packet(1400, false), 27, |_| calls += 1), "no room for 8 bytes");
        let mut short = udp_packet(1400, false);
        short.truncate(1000);
        assert!(!fragment(&short, 600, |_| calls += 1), "shorter than its total length");
        assert!(!fragment(&[0x45, 0, 0], 600, |_| calls += 1));
        assert_eq!(calls, 0);
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
