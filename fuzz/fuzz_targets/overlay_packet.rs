//! IP packets from the TUN: `packet::ipv6_addresses`,
//! `packet::icmpv6_address_unreachable` and `ipv4::addresses` /
//! `ipv4::rewrite` (in place, on a mutable copy). Checked: ICMPv6 errors
//! stay within the minimum MTU and go back to the source; a refused rewrite
//! leaves the packet alone; an accepted one sets the addresses and keeps
//! header and TCP/UDP checksums that were valid valid (RFC 1624).
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use meshtun_overlay::{ipv4, packet};

fuzz_target!(|data: &[u8]| {
    // 1 mode byte, 4 + 4 new address bytes, then the packet.
    let Some((head, pkt)) = data.split_first_chunk::<9>() else { return };
    let mode = head[0];
    let new_src = (mode & 1 == 1).then(|| Ipv4Addr::new(head[1], head[2], head[3], head[4]));
    let new_dst = (mode & 2 == 2).then(|| Ipv4Addr::new(head[5], head[6], head[7], head[8]));

    let _ = packet::ip_version(pkt);
    if let Some((src, _dst)) = packet::ipv6_addresses(pkt) {
        let from: Ipv6Addr = "fd4d:6573:6874::a91f:0:7c2e".parse().expect("literal");
        let error = packet::icmpv6_address_unreachable(from, pkt).expect("error for a parsed IPv6 packet");
        assert!(error.len() <= 1280, "{}-byte ICMPv6 error", error.len());
        assert_eq!(packet::ipv6_addresses(&error), Some((from, src)));
    } else {
        assert_eq!(packet::icmpv6_address_unreachable(Ipv6Addr::LOCALHOST, pkt), None);
    }

    let _ = ipv4::addresses(pkt);
    let mut rewritten = pkt.to_vec();
    let header_ok = header_checksum_valid(pkt);
    let l4_ok = l4_checksum_valid(pkt);
    if ipv4::rewrite(&mut rewritten, new_src, new_dst) {
        let (src, dst) = ipv4::addresses(&rewritten).expect("rewritten packet is IPv4");
        let (old_src, old_dst) = ipv4::addresses(pkt).expect("accepted packet is IPv4");
        assert_eq!(src, new_src.unwrap_or(old_src));
        assert_eq!(dst, new_dst.unwrap_or(old_dst));
        if header_ok == Some(true) {
            assert_eq!(header_checksum_valid(&rewritten), Some(true), "header checksum broken");
        }
        if l4_ok == Some(true) {
            assert_eq!(l4_checksum_valid(&rewritten), Some(true), "TCP/UDP checksum broken");
        }
    } else {
        assert_eq!(rewritten, pkt, "a refused rewrite must leave the packet alone");
    }
});

fn ones_complement_sum(words: impl IntoIterator<Item = u16>) -> u16 {
    let mut acc: u32 = 0;
    for w in words {
        acc += u32::from(w);
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn be_words(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
}

fn ihl(p: &[u8]) -> Option<usize> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    (ihl >= 20 && ihl <= p.len()).then_some(ihl)
}

fn header_checksum_valid(p: &[u8]) -> Option<bool> {
    let ihl = ihl(p)?;
    Some(ones_complement_sum(be_words(&p[..ihl])) == 0xffff)
}

/// The TCP or UDP checksum over everything after the header (the segment as
/// present), for first fragments where `rewrite` maintains it.
fn l4_checksum_valid(p: &[u8]) -> Option<bool> {
    let ihl = ihl(p)?;
    let first_fragment = u16::from_be_bytes([p[6], p[7]]) & 0x1fff == 0;
    let protocol = p[9];
    let at = match protocol {
        6 if first_fragment && p.len() >= ihl + 18 => ihl + 16,
        17 if first_fragment && p.len() >= ihl + 8 => ihl + 6,
        _ => return None,
    };
    if protocol == 17 && p[at..at + 2] == [0, 0] {
        return None;
    }
    let segment = &p[ihl..];
    let len = u16::try_from(segment.len()).ok()?;
    let pseudo = be_words(&p[12..20]).chain([u16::from(protocol), len]);
    Some(ones_complement_sum(pseudo.chain(be_words(segment))) == 0xffff)
}
