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

/// What came back for one RFC 5780 filtering test (a Binding request with
/// CHANGE-REQUEST, answered from another address or port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeProbe {
    /// The answer from the other address or port got through the NAT.
    Answered,
    /// The server said it cannot answer from such an address (error 420,
    /// which comes from the address the request went to).
    Unavailable,
    /// Nothing came back in time: the NAT filtered the answer (given that
    /// the plain request to the same server was answered).
    NoAnswer,
}

/// RFC 5780 §4.4 filtering inference from test II (change IP and port)
/// and test III (change port only), both asked of a server that answered a
/// plain request. `Err` says why it cannot be told.
pub fn infer_filtering(change_ip_and_port: ChangeProbe, change_port: ChangeProbe) -> Result<FilteringBehavior, &'static str> {
    use ChangeProbe::*;
    match (change_ip_and_port, change_port) {
        (Answered, _) => Ok(FilteringBehavior::EndpointIndependent),
        (NoAnswer, Answered) => Ok(FilteringBehavior::AddressDependent),
        (NoAnswer, NoAnswer) | (Unavailable, NoAnswer) => Ok(FilteringBehavior::AddressAndPortDependent),
        (Unavailable, Answered) => Err("answers from another port get through, but telling endpoint-independent from address-dependent filtering needs a backbone --listen socket on a second IP address"),
        (NoAnswer, Unavailable) => Err("answers from another address are filtered, but telling address-dependent from address-and-port-dependent filtering needs a backbone --listen socket on a second port of the same IP"),
        (Unavailable, Unavailable) => Err("the backbone has a single --listen socket; give it a second port or address (RFC 5780 CHANGE-REQUEST) to learn the NAT's filtering"),
    }
}

fn canonical_ip(addr: &SocketAddr) -> IpAddr {
    addr.ip().to_canonical()
}

/// Pure oracle: can two hosts behind NATs with these behaviours open a
/// direct UDP path, with the probing meshtun does? `None` means no NAT (a
/// public host).
///
/// This is an abstract model of RFC 4787, independent of the engine: each
/// side knows the other's server-reflexive endpoint (what the backbone saw)
/// and learns every endpoint a packet from the other side arrived from
/// (peer-reflexive), and keeps sending pings to everything it knows, so any
/// permission an outbound packet opens eventually precedes the inbound
/// packet that needs it. A NAT picks the source endpoint of an outbound
/// packet by its mapping behaviour (one mapping for all destinations; one
/// per destination address; one per destination address and port) and lets
/// an inbound packet through a mapping by its filtering behaviour (anyone;
/// anyone at an address the mapping has sent to; exactly an endpoint the
/// mapping has sent to). A path is proven when a ping is answered from the
/// endpoint it was sent to (replies must be symmetric, as in ICE). The
/// model runs a few rounds of this exchange: past that, each round only
/// opens fresh mappings that can never match.
///
/// Outcomes for the classic names: anything with a public host or a full
/// cone works; cone with cone works; a symmetric NAT works against a
/// public host, a full cone and an address-restricted cone (the cone
/// learns the symmetric side's fresh port), and fails against a
/// port-restricted cone or another symmetric NAT.
pub fn direct_path_possible(
    a: Option<(MappingBehavior, FilteringBehavior)>,
    b: Option<(MappingBehavior, FilteringBehavior)>,
) -> bool {
    oracle::direct(a, b)
}

mod oracle {
    use super::{FilteringBehavior, MappingBehavior};
    use std::collections::HashSet;

    type Nat = Option<(MappingBehavior, FilteringBehavior)>;

    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    enum Owner {
        Backbone,
        Side(usize),
    }

    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    enum Ep {
        Backbone,
        Public(usize),
        Mapped(usize, Box<Key>),
    }

    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    enum Key {
        Any,
        Address(Owner),
        Exact(Ep),
    }

    fn owner(ep: &Ep) -> Owner {
        match ep {
            Ep::Backbone => Owner::Backbone,
            Ep::Public(s) | Ep::Mapped(s, _) => Owner::Side(*s),
        }
    }

    fn source(side: usize, nat: Nat, dst: &Ep) -> Ep {
        match nat {
            None => Ep::Public(side),
            Some((MappingBehavior::EndpointIndependent, _)) => Ep::Mapped(side, Box::new(Key::Any)),
            Some((MappingBehavior::AddressDependent, _)) => Ep::Mapped(side, Box::new(Key::Address(owner(dst)))),
            Some((MappingBehavior::AddressAndPortDependent, _)) => {
                Ep::Mapped(side, Box::new(Key::Exact(dst.clone())))
            }
        }
    }

    /// Does a packet from `from` get in through `mapping` on `side`?
    fn admits(nat: Nat, mapping: &Ep, from: &Ep, sent: &HashSet<(Ep, Ep)>) -> bool {
        let Some((_, filtering)) = nat else { return true };
        if !sent.iter().any(|(src, _)| src == mapping) {
            return false;
        }
        match filtering {
            FilteringBehavior::EndpointIndependent => true,
            FilteringBehavior::AddressDependent => {
                sent.iter().any(|(src, dst)| src == mapping && owner(dst) == owner(from))
            }
            FilteringBehavior::AddressAndPortDependent => {
                sent.iter().any(|(src, dst)| src == mapping && dst == from)
            }
        }
    }

    pub(super) fn direct(a: Nat, b: Nat) -> bool {
        let nats = [a, b];
        let mut sent: [HashSet<(Ep, Ep)>; 2] = [HashSet::new(), HashSet::new()];
        let mut known: [Vec<Ep>; 2] = [Vec::new(), Vec::new()];
        for side in 0..2 {
            let reflexive = source(side, nats[side], &Ep::Backbone);
            sent[side].insert((reflexive.clone(), Ep::Backbone));
            known[1 - side].push(reflexive);
        }
        for _round in 0..6 {
            for side in 0..2 {
                let other = 1 - side;
                for dst in known[side].clone() {
                    let src = source(side, nats[side], &dst);
                    sent[side].insert((src.clone(), dst.clone()));
                    if !admits(nats[other], &dst, &src, &sent[other]) {
                        continue;
                    }
                    if !known[other].contains(&src) {
                        known[other].push(src.clone());
                    }
                    // The answer leaves `other` towards `src`; it proves the
                    // path if it comes from the endpoint that was pinged and
                    // gets back in.
                    let reply = source(other, nats[other], &src);
                    sent[other].insert((reply.clone(), src.clone()));
                    if reply == dst && admits(nats[side], &src, &reply, &sent[side]) {
                        return true;
                    }
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn filtering_is_inferred_from_which_changed_answers_get_through() {
        use super::ChangeProbe::*;
        assert_eq!(infer_filtering(Answered, Answered), Ok(FilteringBehavior::EndpointIndependent));
        assert_eq!(infer_filtering(Answered, Unavailable), Ok(FilteringBehavior::EndpointIndependent));
        assert_eq!(infer_filtering(NoAnswer, Answered), Ok(FilteringBehavior::AddressDependent));
        assert_eq!(infer_filtering(NoAnswer, NoAnswer), Ok(FilteringBehavior::AddressAndPortDependent));
        assert_eq!(infer_filtering(Unavailable, NoAnswer), Ok(FilteringBehavior::AddressAndPortDependent));
        for (ii, iii) in [(Unavailable, Answered), (NoAnswer, Unavailable), (Unavailable, Unavailable)] {
            assert!(infer_filtering(ii, iii).unwrap_err().contains("--listen"), "{ii:?} {iii:?}");
        }
    }

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
    fn symmetric_against_restricted_cone_connects_by_learning_the_fresh_port() {
        // The cone admits anything from the symmetric side's address once it
        // has pinged that address, learns the fresh port from the ping, and
        // its answer leaves from its one mapping, which is what was pinged.
        assert!(direct_path_possible(SYMMETRIC, RESTRICTED_CONE));
        assert!(direct_path_possible(RESTRICTED_CONE, SYMMETRIC));
        assert!(direct_path_possible(ADDRESS_DEPENDENT_MAPPING, RESTRICTED_CONE));
    }

    #[test]
    fn oracle_is_symmetric_in_its_arguments() {
        let mut all = vec![None];
        for m in [M::EndpointIndependent, M::AddressDependent, M::AddressAndPortDependent] {
            for f in [F::EndpointIndependent, F::AddressDependent, F::AddressAndPortDependent] {
                all.push(Some((m, f)));
            }
        }
        for a in &all {
            for b in &all {
                assert_eq!(direct_path_possible(*a, *b), direct_path_possible(*b, *a), "{a:?} {b:?}");
            }
        }
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
