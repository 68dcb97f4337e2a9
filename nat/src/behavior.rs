//! RFC 4787 NAT behaviour vocabulary, inference and the hole-punching oracle.

use std::net::{IpAddr, SocketAddr};

/// How a NAT picks the external address for outbound flows (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MappingBehavior {
    /// One external address per internal socket, whatever the destination
    /// ("cone" NATs).
    EndpointIndependent,
    /// A new external address per destination IP.
    AddressDependent,
    /// A new external address per destination IP and port ("symmetric" NAT).
    AddressAndPortDependent,
}

/// Which inbound packets a NAT lets through an existing mapping (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilteringBehavior {
    /// Anyone may send to the mapping ("full cone").
    EndpointIndependent,
    /// Only IPs the inside host has sent to ("restricted cone").
    AddressDependent,
    /// Only IP:port pairs the inside host has sent to ("port-restricted cone").
    AddressAndPortDependent,
}

/// Infers the mapping behaviour of the NAT in front of ONE local socket from
/// `(STUN server address, mapped address it observed)` pairs.
///
/// * Every comparable observation maps to the same address →
///   [`MappingBehavior::EndpointIndependent`].
/// * Two servers on the same IP (differing only in port) saw different
///   mapped addresses → [`MappingBehavior::AddressAndPortDependent`].
/// * Servers on the same IP agree but servers on different IPs do not →
///   [`MappingBehavior::AddressDependent`].
/// * Mappings differ but no two servers share an IP: the data cannot tell
///   the two dependent kinds apart, so the stricter
///   [`MappingBehavior::AddressAndPortDependent`] is reported.
///
/// Only observations through servers of the same address family are
/// compared (a dual-stack socket naturally has different IPv4 and IPv6
/// mappings); IPv4-mapped IPv6 server addresses count as IPv4. Returns
/// `None` when fewer than two observations can be compared.
pub fn infer_mapping(observations: &[(SocketAddr, SocketAddr)]) -> Option<MappingBehavior> {
    let mut compared = false;
    let mut differs_across_ips = false;
    let mut differs_on_same_ip = false;
    let mut agrees_on_same_ip = false;
    for (i, (server_a, mapped_a)) in observations.iter().enumerate() {
        for (server_b, mapped_b) in observations.iter().skip(i + 1) {
            let (ip_a, ip_b) = (canonical_ip(server_a), canonical_ip(server_b));
            if ip_a.is_ipv4() != ip_b.is_ipv4() {
                continue;
            }
            compared = true;
            let same_mapping = mapped_a == mapped_b;
            match (ip_a == ip_b, same_mapping) {
                (true, true) => agrees_on_same_ip = true,
                (true, false) => differs_on_same_ip = true,
                (false, false) => differs_across_ips = true,
                (false, true) => {}
            }
        }
    }
    if !compared {
        None
    } else if differs_on_same_ip {
        Some(MappingBehavior::AddressAndPortDependent)
    } else if !differs_across_ips {
        Some(MappingBehavior::EndpointIndependent)
    } else if agrees_on_same_ip {
        Some(MappingBehavior::AddressDependent)
    } else {
        Some(MappingBehavior::AddressAndPortDependent)
    }
}

fn canonical_ip(addr: &SocketAddr) -> IpAddr {
    addr.ip().to_canonical()
}

/// Pure oracle: can two hosts behind NATs with these behaviours open a direct
/// UDP path by simultaneous hole punching, where both sides send to each
/// other's server-reflexive (STUN-observed) address at the same time and no
/// port prediction is attempted? `None` means no NAT (a public host).
///
/// Reasoning, with A and B each sending to the other's advertised address:
///
/// * **A public host or endpoint-independent filtering ("full cone") on
///   one side**, say A: whatever source port B's NAT picks for its packet,
///   A's NAT lets it in. A then answers the source it actually heard from
///   (WireGuard roaming does exactly that) out of its advertised address,
///   which is the very destination B's new mapping was opened towards, so
///   B's filter passes the reply. Works against anything. (A full cone
///   also has endpoint-independent mapping; the rare NAT with open
///   filtering but dependent mapping is not told apart.)
/// * **Both mappings endpoint-independent**: each packet leaves from the
///   address its sender advertised, so each side's outbound packet opens
///   its own filter, whatever its kind, for exactly the address the peer
///   sends from. Works.
/// * **Otherwise** one side, say A, has an endpoint-dependent ("symmetric")
///   mapping and neither side filters openly: A's packet to B leaves from a
///   fresh port B never sent to, so B's filter drops it, and B's packet
///   reaches A's advertised port, whose mapping was opened towards the STUN
///   server only, so A's filter drops it. Fails. This is conservative for
///   an address-dependent filter on B, which a packet from A's IP passes;
///   with endpoint learning that pairing can sometimes still connect, but
///   it is not counted here.
pub fn direct_path_possible(
    a: Option<(MappingBehavior, FilteringBehavior)>,
    b: Option<(MappingBehavior, FilteringBehavior)>,
) -> bool {
    let (Some((mapping_a, filtering_a)), Some((mapping_b, filtering_b))) = (a, b) else {
        return true;
    };
    filtering_a == FilteringBehavior::EndpointIndependent
        || filtering_b == FilteringBehavior::EndpointIndependent
        || (mapping_a == MappingBehavior::EndpointIndependent
            && mapping_b == MappingBehavior::EndpointIndependent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use FilteringBehavior as F;
    use MappingBehavior as M;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const FULL_CONE: Option<(M, F)> = Some((M::EndpointIndependent, F::EndpointIndependent));
    const RESTRICTED_CONE: Option<(M, F)> = Some((M::EndpointIndependent, F::AddressDependent));
    const PORT_RESTRICTED_CONE: Option<(M, F)> =
        Some((M::EndpointIndependent, F::AddressAndPortDependent));
    const SYMMETRIC: Option<(M, F)> =
        Some((M::AddressAndPortDependent, F::AddressAndPortDependent));
    const ADDRESS_DEPENDENT_MAPPING: Option<(M, F)> =
        Some((M::AddressDependent, F::AddressDependent));
    const PUBLIC: Option<(M, F)> = None;

    #[test]
    fn fewer_than_two_observations_infer_nothing() {
        assert_eq!(infer_mapping(&[]), None);
        assert_eq!(
            infer_mapping(&[(addr("198.18.0.1:3478"), addr("203.0.113.5:4000"))]),
            None
        );
    }

    #[test]
    fn the_same_mapping_from_every_server_is_endpoint_independent() {
        let obs = [
            (addr("198.18.0.1:3478"), addr("203.0.113.5:4000")),
            (addr("198.18.0.1:3479"), addr("203.0.113.5:4000")),
            (addr("198.18.1.1:3478"), addr("203.0.113.5:4000")),
        ];
        assert_eq!(infer_mapping(&obs), Some(M::EndpointIndependent));
    }

    #[test]
    fn different_mappings_for_servers_differing_only_in_port_are_address_and_port_dependent() {
        let obs = [
            (addr("198.18.0.1:3478"), addr("203.0.113.5:4000")),
            (addr("198.18.0.1:3479"), addr("203.0.113.5:4001")),
        ];
        assert_eq!(infer_mapping(&obs), Some(M::AddressAndPortDependent));
    }

    #[test]
    fn mappings_stable_per_server_ip_but_changing_across_ips_are_address_dependent() {
        let obs = [
            (addr("198.18.0.1:3478"), addr("203.0.113.5:4000")),
            (addr("198.18.0.1:3479"), addr("203.0.113.5:4000")),
            (addr("198.18.1.1:3478"), addr("203.0.113.5:4001")),
        ];
        assert_eq!(infer_mapping(&obs), Some(M::AddressDependent));
    }

    #[test]
    fn changing_mappings_without_a_same_ip_pair_are_reported_as_the_stricter_kind() {
        let obs = [
            (addr("198.18.0.1:3478"), addr("203.0.113.5:4000")),
            (addr("198.18.1.1:3478"), addr("203.0.113.5:4001")),
        ];
        assert_eq!(infer_mapping(&obs), Some(M::AddressAndPortDependent));
    }

    #[test]
    fn observations_through_different_address_families_are_not_compared() {
        let obs = [
            (addr("198.18.0.1:3478"), addr("203.0.113.5:4000")),
            (addr("[2001:db8::1]:3478"), addr("[2001:db8::99]:5555")),
        ];
        assert_eq!(infer_mapping(&obs), None);
        let obs = [
            (addr("198.18.0.1:3478"), addr("203.0.113.5:4000")),
            (addr("[2001:db8::1]:3478"), addr("[2001:db8::99]:5555")),
            (addr("[::ffff:198.18.1.1]:3478"), addr("203.0.113.5:4000")),
        ];
        assert_eq!(infer_mapping(&obs), Some(M::EndpointIndependent));
    }

    #[test]
    fn symmetric_against_symmetric_cannot_punch() {
        assert!(!direct_path_possible(SYMMETRIC, SYMMETRIC));
    }

    #[test]
    fn port_restricted_cone_against_port_restricted_cone_can_punch() {
        assert!(direct_path_possible(
            PORT_RESTRICTED_CONE,
            PORT_RESTRICTED_CONE
        ));
    }

    #[test]
    fn symmetric_against_port_restricted_cone_cannot_punch() {
        assert!(!direct_path_possible(SYMMETRIC, PORT_RESTRICTED_CONE));
        assert!(!direct_path_possible(PORT_RESTRICTED_CONE, SYMMETRIC));
    }

    #[test]
    fn symmetric_against_restricted_cone_cannot_punch() {
        assert!(!direct_path_possible(SYMMETRIC, RESTRICTED_CONE));
        assert!(!direct_path_possible(
            ADDRESS_DEPENDENT_MAPPING,
            RESTRICTED_CONE
        ));
    }

    #[test]
    fn symmetric_against_full_cone_can_punch() {
        assert!(direct_path_possible(SYMMETRIC, FULL_CONE));
        assert!(direct_path_possible(FULL_CONE, SYMMETRIC));
    }

    #[test]
    fn a_public_host_can_reach_anything() {
        assert!(direct_path_possible(PUBLIC, SYMMETRIC));
        assert!(direct_path_possible(SYMMETRIC, PUBLIC));
        assert!(direct_path_possible(PUBLIC, PUBLIC));
    }

    #[test]
    fn cone_nats_can_punch_each_other_whatever_their_filtering() {
        for x in [FULL_CONE, RESTRICTED_CONE, PORT_RESTRICTED_CONE] {
            for y in [FULL_CONE, RESTRICTED_CONE, PORT_RESTRICTED_CONE] {
                assert!(direct_path_possible(x, y), "{x:?} vs {y:?}");
            }
        }
    }

    #[test]
    fn the_oracle_is_symmetric_in_its_arguments() {
        let all = [
            FULL_CONE,
            RESTRICTED_CONE,
            PORT_RESTRICTED_CONE,
            SYMMETRIC,
            ADDRESS_DEPENDENT_MAPPING,
            PUBLIC,
        ];
        for x in all {
            for y in all {
                assert_eq!(
                    direct_path_possible(x, y),
                    direct_path_possible(y, x),
                    "{x:?} vs {y:?}"
                );
            }
        }
    }
}
