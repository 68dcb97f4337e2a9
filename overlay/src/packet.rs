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
    let quoted = &offending[..offending.len().min(1280 - 40 - 8)];
    let builder = PacketBuilder::ipv6(from.octets(), source.octets(), 64)
        .icmpv6(Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Address));
    let mut out = Vec::with_capacity(builder.size(quoted.len()));
    builder.write(&mut out, quoted).ok()?;
    Some(out)
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
    fn unreachable_error_never_exceeds_the_minimum_mtu() {
        let mut big = echo_request("fd4d:6573:6874::1".parse().unwrap(), "fd4d:6573:6874::2".parse().unwrap());
        big.resize(9000, 0);
        let error = icmpv6_address_unreachable("fd4d:6573:6874::1".parse().unwrap(), &big).unwrap();
        assert_eq!(error.len(), 1280);
    }
}
