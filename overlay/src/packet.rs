//! Just enough IP parsing for routing decisions, and the ICMPv6 errors the
//! engine answers with.

use std::net::Ipv6Addr;

use etherparse::{icmpv6::DestUnreachableCode, Icmpv6Type, PacketBuilder};

/// Source and destination of an IPv6 packet, or `None` if it is not one.
pub fn ipv6_addresses(packet: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr)> {
    let header = etherparse::Ipv6HeaderSlice::from_slice(packet).ok()?;
    Some((header.source_addr(), header.destination_addr()))
}

/// The IP version nibble, if the packet has a first byte.
pub fn ip_version(packet: &[u8]) -> Option<u8> {
    packet.first().map(|b| b >> 4)
}

/// An ICMPv6 "destination unreachable: address unreachable" for `offending`,
/// sent from `from` (our own address, acting as the router for the mesh
/// prefix) back to the offending packet's source. RFC 4443 limits the whole
/// error to the minimum IPv6 MTU.
pub fn icmpv6_address_unreachable(from: Ipv6Addr, offending: &[u8]) -> Option<Vec<u8>> {
    let (source, _) = ipv6_addresses(offending)?;
    icmpv6_error(from, source, Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Address), offending)
}

/// The smallest MTU an IPv6 link may have (RFC 8200): a "packet too big"
/// cannot ask a sender for less.
pub const IPV6_MIN_MTU: usize = 1280;

/// An ICMPv6 "packet too big" (RFC 4443) telling the source of `offending`
/// that the path to its destination carries `mtu` bytes, sent from that
/// destination as the path's last router would. `None` if `offending` is
/// not IPv6, is itself an ICMPv6 error (errors are never answered with
/// errors), or `mtu` is below the IPv6 minimum.
pub fn icmpv6_packet_too_big(mtu: usize, offending: &[u8]) -> Option<Vec<u8>> {
    let (source, destination) = ipv6_addresses(offending)?;
    let mtu = u32::try_from(mtu).ok().filter(|&mtu| mtu as usize >= IPV6_MIN_MTU)?;
    if is_icmpv6_error(offending) {
        return None;
    }
    icmpv6_error(destination, source, Icmpv6Type::PacketTooBig { mtu }, offending)
}

/// An ICMPv6 error of `kind` from `from` to `to`, quoting as much of
/// `offending` as keeps the whole error within the minimum IPv6 MTU (RFC 4443).
fn icmpv6_error(from: Ipv6Addr, to: Ipv6Addr, kind: Icmpv6Type, offending: &[u8]) -> Option<Vec<u8>> {
    let quoted = &offending[..offending.len().min(IPV6_MIN_MTU - 40 - 8)];
    let builder = PacketBuilder::ipv6(from.octets(), to.octets(), 64).icmpv6(kind);
    let mut out = Vec::with_capacity(builder.size(quoted.len()));
    builder.write(&mut out, quoted).ok()?;
    Some(out)
}

/// Whether an IPv6 packet is an ICMPv6 error message (types below 128),
/// with ICMPv6 straight after the fixed header.
fn is_icmpv6_error(packet: &[u8]) -> bool {
    packet.get(6) == Some(&58) && packet.get(40).is_some_and(|&icmp_type| icmp_type < 128)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_request(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let builder = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).icmpv6_echo_request(1, 1);
        let mut out = Vec::new();
        builder.write(&mut out, b"ping").unwrap();
        out
    }

    #[test]
    fn ipv6_addresses_are_read_from_a_real_packet_and_garbage_is_none() {
        let (a, b) = ("fd4d:6573:6874::1".parse().unwrap(), "fd4d:6573:6874::2".parse().unwrap());
        assert_eq!(ipv6_addresses(&echo_request(a, b)), Some((a, b)));
        assert_eq!(ipv6_addresses(&[0x60, 0, 0]), None);
        assert_eq!(ipv6_addresses(&[0x45; 40]), None);
    }

    #[test]
    fn unreachable_error_quotes_the_packet_and_goes_back_to_its_source() {
        let (a, b): (Ipv6Addr, Ipv6Addr) =
            ("fd4d:6573:6874::1".parse().unwrap(), "fd4d:6573:6874::2".parse().unwrap());
        let request = echo_request(a, b);
        let error = icmpv6_address_unreachable(a, &request).unwrap();
        let parsed = etherparse::SlicedPacket::from_ip(&error).unwrap();
        match parsed.transport {
            Some(etherparse::TransportSlice::Icmpv6(icmp)) => {
                assert_eq!(
                    icmp.icmp_type(),
                    Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Address)
                );
                assert_eq!(icmp.payload(), &request[..]);
            }
            other => panic!("not icmpv6: {other:?}"),
        }
        assert_eq!(ipv6_addresses(&error), Some((a, a)));
    }

    #[test]
    fn packet_too_big_comes_from_the_destination_with_the_mtu_and_quotes_the_packet() {
        let (a, b): (Ipv6Addr, Ipv6Addr) =
            ("fd4d:6573:6874::1".parse().unwrap(), "fd4d:6573:6874::2".parse().unwrap());
        let mut request = echo_request(a, b);
        request.resize(1400, 7);
        let error = icmpv6_packet_too_big(1340, &request).unwrap();
        assert_eq!(ipv6_addresses(&error), Some((b, a)));
        assert_eq!(error.len(), 1280);
        let parsed = etherparse::SlicedPacket::from_ip(&error).unwrap();
        match parsed.transport {
            Some(etherparse::TransportSlice::Icmpv6(icmp)) => {
                assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1340 });
                assert_eq!(icmp.payload(), &request[..1280 - 48]);
                assert!(icmp.is_checksum_valid(b.octets(), a.octets()));
            }
            other => panic!("not icmpv6: {other:?}"),
        }
    }

    #[test]
    fn packet_too_big_is_never_sent_below_the_ipv6_minimum_nor_about_an_error_nor_for_ipv4() {
        let (a, b): (Ipv6Addr, Ipv6Addr) =
            ("fd4d:6573:6874::1".parse().unwrap(), "fd4d:6573:6874::2".parse().unwrap());
        let request = echo_request(a, b);
        assert!(icmpv6_packet_too_big(1279, &request).is_none());
        let error = icmpv6_address_unreachable(a, &request).unwrap();
        assert!(icmpv6_packet_too_big(1340, &error).is_none());
        assert!(icmpv6_packet_too_big(1340, &[0x45; 60]).is_none());
        assert!(icmpv6_packet_too_big(1340, &[0x60, 0, 0]).is_none());
    }

    #[test]
    fn unreachable_error_never_exceeds_the_minimum_mtu() {
        let mut big = echo_request("fd4d:6573:6874::1".parse().unwrap(), "fd4d:6573:6874::2".parse().unwrap());
        big.resize(9000, 0);
        let error = icmpv6_address_unreachable("fd4d:6573:6874::1".parse().unwrap(), &big).unwrap();
        assert_eq!(error.len(), 1280);
    }
}
