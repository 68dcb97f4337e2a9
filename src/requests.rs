//! Requests that wait for the mesh: DNS questions and control-socket
//! queries, pings and tag changes. The daemon's main loop owns a
//! [`Waiting`] table keyed by the core's answer tokens, so nothing here
//! needs a lock.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::Message as DnsMessage;
use hickory_proto::rr::RecordType;
use meshtun_addr::{MeshAddr, NetworkId};
use meshtun_overlay::{Answer, Node, Token};
use meshtun_proto::Query;

use crate::control::{self, Pending, QueryKind, Request};
use crate::dns;

/// Who is waiting for an answer.
pub enum Waiter {
    Control(Pending),
    /// `meshtun ping NAME`: resolving the name first.
    PingAfterResolve(Pending),
    Dns { from: SocketAddr, request: DnsMessage, record_type: RecordType },
}

#[derive(Default)]
pub struct Waiting {
    waiters: HashMap<Token, (Waiter, Instant)>,
}

/// What the driver must send on the DNS socket.
pub struct DnsReply {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Longest a request waits for the mesh before it is answered with an error.
const GIVE_UP: Duration = Duration::from_secs(10);

impl Waiting {
    /// A control request that needs the mesh. Returns it back if it is not
    /// one of those (status, down).
    pub fn control(&mut self, node: &mut Node, network: NetworkId, pending: Pending, now: Instant) -> Option<Pending> {
        match pending.request.clone() {
            Request::Query { kind, name } => {
                let query = match kind {
                    QueryKind::Hostname => Query::Hostname { network, name },
                    QueryKind::Capability => Query::Capability { network, name },
                    QueryKind::Group => Query::Group { network, name },
                };
                let token = node.query_fresh(query, now);
                self.waiters.insert(token, (Waiter::Control(pending), now));
                None
            }
            Request::Ping { target } => {
                let ipv4 = target.parse::<std::net::Ipv4Addr>().ok().filter(|ip| meshtun_addr::is_mesh_ipv4(*ip));
                if let Some(other) = parse_mesh_target(&target).filter(|a| a.network != network) {
                    let _ = pending.reply.send(control::error_envelope(
                        "unreachable",
                        &format!("{other} is in network {}, this node is in network {}", other.network.0, network.0),
                        Some("a node only reaches nodes of its own network"),
                    ));
                    return None;
                }
                if let Some(addr) = parse_mesh_target(&target).or_else(|| ipv4.and_then(|ip| node.node_for_ipv4(ip))) {
                    let token = node.ping(addr, now);
                    self.waiters.insert(token, (Waiter::Control(pending), now));
                } else if let Some(ip) = ipv4 {
                    let token = node.query(Query::Ipv4 { network, addr: ip.octets() }, now);
                    self.waiters.insert(token, (Waiter::PingAfterResolve(pending), now));
                } else {
                    let name = target.trim_end_matches('.').trim_end_matches(".mesh").to_ascii_lowercase();
                    let token = node.query(Query::Hostname { network, name }, now);
                    self.waiters.insert(token, (Waiter::PingAfterResolve(pending), now));
                }
                None
            }
            _ => Some(pending),
        }
    }

    pub fn dns(&mut self, node: &mut Node, network: NetworkId, from: SocketAddr, bytes: &[u8], domain: &str, now: Instant) -> Option<DnsReply> {
        match dns::parse(bytes, domain) {
            dns::Parsed::Drop => None,
            dns::Parsed::Immediate(bytes) => Some(DnsReply { to: from, bytes }),
            dns::Parsed::Mesh { request, question, record_type } => {
                tracing::debug!(%from, name = %dns::question_name(&question), ?record_type, "dns question");
                let query = match question {
                    dns::MeshQuestion::Hostname(name) => Query::Hostname { network, name },
                    dns::MeshQuestion::Capability(name) => Query::Capability { network, name },
                    dns::MeshQuestion::Group(name) => Query::Group { network, name },
                };
                let token = node.query(query, now);
                self.waiters.insert(token, (Waiter::Dns { from, request, record_type }, now));
                None
            }
        }
    }

    /// Routes an answer from the core to whoever waits for it.
    pub fn answer(&mut self, node: &mut Node, answer: Answer, now: Instant) -> Option<DnsReply> {
        let token = match &answer {
            Answer::Query { token, .. } | Answer::Pong { token, .. } => *token,
        };
        let (waiter, _) = self.waiters.remove(&token)?;
        match (waiter, answer) {
            (Waiter::Dns { from, request, record_type }, Answer::Query { found, error, .. }) => {
                let bytes = match error {
                    Some(e) if !e.starts_with("not registered") => dns::server_failure(&request),
                    _ => {
                        let v6: Vec<Ipv6Addr> = found.iter().map(|f| f.ipv6).collect();
                        let v4: Vec<std::net::Ipv4Addr> = found.iter().map(|f| f.ipv4).collect();
                        dns::answer(&request, record_type, &v6, &v4)
                    }
                };
                Some(DnsReply { to: from, bytes })
            }
            (Waiter::Control(pending), Answer::Query { found, error, .. }) => {
                let reply = match error {
                    Some(e) if !e.starts_with("not registered") => {
                        control::error_envelope("lookup_failed", &e, Some("check `meshtun status`: is a backbone registered?"))
                    }
                    _ => control::ok_envelope(serde_json::json!({ "found": found })),
                };
                let _ = pending.reply.send(reply);
                None
            }
            (Waiter::PingAfterResolve(pending), Answer::Query { found, .. }) => {
                match found.first() {
                    Some(f) => {
                        let token = node.ping(f.mesh_addr, now);
                        self.waiters.insert(token, (Waiter::Control(pending), now));
                    }
                    None => {
                        let Request::Ping { target } = &pending.request else { return None };
                        let reply = control::error_envelope(
                            "not_found",
                            &format!("no node named {target:?} is registered"),
                            Some("check the name with `meshtun resolve`, or ping a mesh address"),
                        );
                        let _ = pending.reply.send(reply);
                    }
                }
                None
            }
            (Waiter::Control(pending), Answer::Pong { from, hostname, rtt, path, .. }) => {
                let data = serde_json::json!({
                    "address": from.to_string(),
                    "ipv6": from.to_ipv6(),
                    "ipv4": node.node_ipv4(from),
                    "hostname": hostname,
                    "rtt_ms": rtt.as_secs_f64() * 1000.0,
                    "path": path,
                });
                let _ = pending.reply.send(control::ok_envelope(data));
                None
            }
            _ => None,
        }
    }

    /// Answers whatever waited too long (a ping to a silent node, a
    /// lookup nobody answered).
    pub fn expire(&mut self, now: Instant) -> Vec<DnsReply> {
        let expired: Vec<Token> = self
            .waiters
            .iter()
            .filter(|(_, (_, since))| now.saturating_duration_since(*since) >= GIVE_UP)
            .map(|(t, _)| *t)
            .collect();
        let mut replies = Vec::new();
        for token in expired {
            let Some((waiter, _)) = self.waiters.remove(&token) else { continue };
            match waiter {
                Waiter::Control(p) | Waiter::PingAfterResolve(p) => {
                    let _ = p.reply.send(control::error_envelope(
                        "timeout",
                        "no answer from the mesh within 10 s",
                        Some("the peer may be down or unreachable; see `meshtun status`"),
                    ));
                }
                Waiter::Dns { from, request, .. } => replies.push(DnsReply { to: from, bytes: dns::server_failure(&request) }),
            }
        }
        replies
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        if self.waiters.is_empty() {
            return None;
        }
        self.waiters.values().map(|(_, since)| *since + GIVE_UP).min()
    }
}

/// A ping target given as a mesh address (`0:A91F.0000.7C2E`) or a mesh
/// IPv6 address.
pub fn parse_mesh_target(target: &str) -> Option<MeshAddr> {
    if let Ok(addr) = target.parse::<MeshAddr>() {
        return addr.is_unicast().then_some(addr);
    }
    let ip: Ipv6Addr = target.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    MeshAddr::from_ipv6(ip).ok().filter(|a| a.is_unicast())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_targets_are_mesh_addresses_or_mesh_ipv6_and_anything_else_is_a_name() {
        let a = parse_mesh_target("0:A91F.0000.7C2E").unwrap();
        assert_eq!(parse_mesh_target("fd4d:6573:6874::a91f:0:7c2e"), Some(a));
        assert_eq!(parse_mesh_target("[fd4d:6573:6874::a91f:0:7c2e]"), Some(a));
        assert_eq!(parse_mesh_target("specialist-papers"), None);
        assert_eq!(parse_mesh_target("2001:db8::1"), None);
        assert_eq!(parse_mesh_target("0:0000.0000.0000"), None);
    }
}
