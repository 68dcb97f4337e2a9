//! DNS for agents: the daemon answers the mesh domain on its mesh address.
//!
//! * `NAME.mesh` → AAAA (and A: its IPv4 address on this host) of the
//!   node with that hostname;
//! * `CAP.cap.mesh` → AAAA of every node declaring capability CAP, best
//!   first (lowest measured RTT, then unmeasured);
//! * `GROUP.group.mesh` → AAAA of every member of GROUP.
//!
//! Unknown names get NXDOMAIN as soon as the backbone says so; names
//! outside the mesh domain get REFUSED at once (never a hang). The wire
//! format is hickory-proto's; everything here is pure so it is tested
//! without sockets.

use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

/// Answers are short-lived: the directory is eventually consistent.
pub const ANSWER_TTL: u32 = 5;

/// What a DNS question asks of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshQuestion {
    Hostname(String),
    Capability(String),
    Group(String),
}

/// What to do with a request.
#[derive(Debug)]
pub enum Parsed {
    /// A question about the mesh: look it up, then [`answer`].
    Mesh { request: Message, question: MeshQuestion, record_type: RecordType },
    /// Answer at once with these bytes (REFUSED, FORMERR, empty answer...).
    Immediate(Vec<u8>),
    /// Not even a DNS header: drop.
    Drop,
}

/// Parses a request for `domain` (e.g. "mesh").
pub fn parse(bytes: &[u8], domain: &str) -> Parsed {
    let Ok(request) = Message::from_vec(bytes) else {
        return match bytes.get(0..2) {
            Some(id) => Immediate(error_bytes(u16::from_be_bytes([id[0], id[1]]), ResponseCode::FormErr)),
            None => Parsed::Drop,
        };
    };
    use Parsed::Immediate;
    if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
        return Immediate(reply(&request, ResponseCode::NotImp, &[]));
    }
    let Some(query) = request.queries.first() else {
        return Immediate(reply(&request, ResponseCode::FormErr, &[]));
    };
    let name = query.name().to_lowercase().to_utf8();
    let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let domain_labels: Vec<&str> = domain.split('.').collect();
    if labels.len() <= domain_labels.len() || labels[labels.len() - domain_labels.len()..] != domain_labels[..] {
        return Immediate(reply(&request, ResponseCode::Refused, &[]));
    }
    let inner = &labels[..labels.len() - domain_labels.len()];
    let question = match inner {
        [name] => MeshQuestion::Hostname(name.to_string()),
        [cap, "cap"] => MeshQuestion::Capability(cap.to_string()),
        [group, "group"] => MeshQuestion::Group(group.to_string()),
        _ => return Immediate(reply(&request, ResponseCode::NXDomain, &[])),
    };
    let record_type = query.query_type();
    Parsed::Mesh { request, question, record_type }
}

/// The response to `request` once the mesh has answered: AAAA records for
/// `addresses` (already best first), NXDOMAIN when there are none, and an
/// empty NOERROR answer for other record types of names that exist.
pub fn answer(request: &Message, record_type: RecordType, v6: &[Ipv6Addr], v4: &[Ipv4Addr]) -> Vec<u8> {
    if v6.is_empty() && v4.is_empty() {
        return reply_with(request, ResponseCode::NXDomain, &[], &[]);
    }
    match record_type {
        RecordType::AAAA => reply_with(request, ResponseCode::NoError, v6, &[]),
        RecordType::A => reply_with(request, ResponseCode::NoError, &[], v4),
        RecordType::ANY => reply_with(request, ResponseCode::NoError, v6, v4),
        _ => reply_with(request, ResponseCode::NoError, &[], &[]),
    }
}

/// SERVFAIL, e.g. when no backbone answered.
pub fn server_failure(request: &Message) -> Vec<u8> {
    reply(request, ResponseCode::ServFail, &[])
}

fn reply(request: &Message, code: ResponseCode, addresses: &[Ipv6Addr]) -> Vec<u8> {
    reply_with(request, code, addresses, &[])
}

fn reply_with(request: &Message, code: ResponseCode, addresses: &[Ipv6Addr], v4: &[Ipv4Addr]) -> Vec<u8> {
    let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.metadata.authoritative = true;
    response.metadata.recursion_available = false;
    response.metadata.response_code = code;
    if let Some(q) = request.queries.first() {
        response.add_query(q.clone());
        for ip in addresses {
            response.add_answer(Record::from_rdata(q.name().clone(), ANSWER_TTL, RData::AAAA(AAAA(*ip))));
        }
        for ip in v4 {
            response.add_answer(Record::from_rdata(q.name().clone(), ANSWER_TTL, RData::A(A(*ip))));
        }
    }
    response.to_vec().unwrap_or_else(|_| error_bytes(request.metadata.id, ResponseCode::ServFail))
}

fn error_bytes(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Response, OpCode::Query);
    m.metadata.response_code = code;
    m.to_vec().unwrap_or_default()
}

/// A name for logs and tests.
pub fn question_name(q: &MeshQuestion) -> String {
    match q {
        MeshQuestion::Hostname(n) => n.clone(),
        MeshQuestion::Capability(c) => format!("{c}.cap"),
        MeshQuestion::Group(g) => format!("{g}.group"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn request(name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    fn response(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).unwrap()
    }

    #[test]
    fn names_capabilities_and_groups_under_the_mesh_domain_are_recognised() {
        for (name, expected) in [
            ("specialist-papers.mesh.", MeshQuestion::Hostname("specialist-papers".into())),
            ("Specialist-Papers.MESH", MeshQuestion::Hostname("specialist-papers".into())),
            ("citations.cap.mesh.", MeshQuestion::Capability("citations".into())),
            ("research.group.mesh.", MeshQuestion::Group("research".into())),
        ] {
            match parse(&request(name, RecordType::AAAA), "mesh") {
                Parsed::Mesh { question, record_type, .. } => {
                    assert_eq!(question, expected);
                    assert_eq!(record_type, RecordType::AAAA);
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_domains_are_refused_at_once_and_odd_mesh_names_are_nxdomain() {
        let Parsed::Immediate(bytes) = parse(&request("example.com.", RecordType::A), "mesh") else { panic!() };
        let r = response(&bytes);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert_eq!(r.metadata.id, 0x1234);
        let Parsed::Immediate(bytes) = parse(&request("a.b.c.mesh.", RecordType::AAAA), "mesh") else { panic!() };
        assert_eq!(response(&bytes).metadata.response_code, ResponseCode::NXDomain);
        let Parsed::Immediate(bytes) = parse(&request("mesh.", RecordType::AAAA), "mesh") else { panic!() };
        assert_eq!(response(&bytes).metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn answers_carry_every_address_in_order_with_a_short_ttl() {
        let Parsed::Mesh { request: req, record_type, .. } = parse(&request("summarise.cap.mesh.", RecordType::AAAA), "mesh") else { panic!() };
        let ips: Vec<Ipv6Addr> = vec!["fd4d:6573:6874::1".parse().unwrap(), "fd4d:6573:6874::2".parse().unwrap()];
        let r = response(&answer(&req, record_type, &ips, &[]));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        let got: Vec<Ipv6Addr> = r.answers.iter().filter_map(|a| match a.data { RData::AAAA(AAAA(ip)) => Some(ip), _ => None }).collect();
        assert_eq!(got, ips);
        assert!(r.answers.iter().all(|a| a.ttl == ANSWER_TTL));
    }

    #[test]
    fn unknown_names_get_nxdomain_and_a_queries_get_an_empty_answer() {
        let Parsed::Mesh { request: req, .. } = parse(&request("ghost.mesh.", RecordType::AAAA), "mesh") else { panic!() };
        assert_eq!(response(&answer(&req, RecordType::AAAA, &[], &[])).metadata.response_code, ResponseCode::NXDomain);
        let ip: Ipv6Addr = "fd4d:6573:6874::1".parse().unwrap();
        let v4: Ipv4Addr = "100.70.1.2".parse().unwrap();
        let r = response(&answer(&req, RecordType::A, &[ip], &[v4]));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        let got: Vec<Ipv4Addr> = r.answers.iter().filter_map(|a| match a.data { RData::A(A(ip)) => Some(ip), _ => None }).collect();
        assert_eq!(got, vec![v4]);
        let r = response(&answer(&req, RecordType::MX, &[ip], &[v4]));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn garbage_is_dropped_or_answered_with_formerr_never_a_panic() {
        assert!(matches!(parse(&[], "mesh"), Parsed::Drop));
        assert!(matches!(parse(&[0xab], "mesh"), Parsed::Drop));
        let Parsed::Immediate(bytes) = parse(&[0xab, 0xcd, 0xff, 0xff, 0xff], "mesh") else { panic!() };
        assert_eq!(response(&bytes).metadata.response_code, ResponseCode::FormErr);
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 53 + 7) as u8).collect();
            let _ = parse(&junk, "mesh");
        }
    }
}
