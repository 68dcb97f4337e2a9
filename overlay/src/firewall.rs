//! The inbound firewall on the mesh interface: stateful, with rules that
//! trust only what is certified.
//!
//! Rules match by peer mesh address, certified group (from the peer's
//! membership certificate: self-declared capability or group tags never
//! grant anything), protocol and destination port. First match wins;
//! packets that match no rule get the default policy. Return traffic of
//! flows this node opened is always allowed, as are ICMP errors.
//!
//! Rule syntax (config file and command line):
//! `allow|deny [tcp|udp|icmp|any][/PORT[-PORT]] [from any|group:NAME|N:XXXX.XXXX.XXXX]`,
//! e.g. `allow tcp/22 from group:ops`, `deny udp/53`, `allow icmp`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use etherparse::{SlicedPacket, TransportSlice};
use meshtun_addr::MeshAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Any,
    Group(String),
    Node(MeshAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub proto: Proto,
    pub ports: Option<(u16, u16)>,
    pub from: Source,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("firewall rule {rule:?}: {message}")]
pub struct RuleError {
    pub rule: String,
    pub message: String,
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Rule, RuleError> {
        let err = |message: &str| RuleError { rule: text.to_string(), message: message.to_string() };
        let words: Vec<&str> = text.split_whitespace().collect();
        let (action, rest) = match words.split_first() {
            Some((&"allow", rest)) => (Action::Allow, rest),
            Some((&"deny", rest)) => (Action::Deny, rest),
            _ => return Err(err("must start with `allow` or `deny`")),
        };
        let (what, rest) = match rest.first() {
            Some(w) if *w != "from" => (Some(*w), &rest[1..]),
            _ => (None, rest),
        };
        let (proto, ports) = match what {
            None => (Proto::Any, None),
            Some(w) => {
                let (name, port) = match w.split_once('/') {
                    Some((n, p)) => (n, Some(p)),
                    None => (w, None),
                };
                let proto = match name {
                    "any" => Proto::Any,
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    "icmp" => Proto::Icmp,
                    _ => return Err(err("protocol must be tcp, udp, icmp or any")),
                };
                let ports = match port {
                    None => None,
                    Some(_) if !matches!(proto, Proto::Tcp | Proto::Udp) => {
                        return Err(err("ports only go with tcp or udp"))
                    }
                    Some(p) => {
                        let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                        let lo: u16 = lo.parse().map_err(|_| err("port must be a number 0-65535"))?;
                        let hi: u16 = hi.parse().map_err(|_| err("port must be a number 0-65535"))?;
                        if lo > hi {
                            return Err(err("port range must go low-high"));
                        }
                        Some((lo, hi))
                    }
                };
                (proto, ports)
            }
        };
        let from = match rest {
            [] => Source::Any,
            ["from", "any"] => Source::Any,
            ["from", who] => match who.strip_prefix("group:") {
                Some(group) if !group.is_empty() => Source::Group(group.to_string()),
                Some(_) => return Err(err("group name missing after `group:`")),
                None => Source::Node(who.parse().map_err(|e| err(&format!("`from` must be any, group:NAME or a mesh address ({e})")))?),
            },
            _ => return Err(err("expected `from any|group:NAME|MESH-ADDRESS` after the protocol")),
        };
        Ok(Rule { action, proto, ports, from })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = if self.action == Action::Allow { "allow" } else { "deny" };
        let proto = match self.proto {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        };
        write!(f, "{action} {proto}")?;
        if let Some((lo, hi)) = self.ports {
            if lo == hi {
                write!(f, "/{lo}")?;
            } else {
                write!(f, "/{lo}-{hi}")?;
            }
        }
        match &self.from {
            Source::Any => Ok(()),
            Source::Group(g) => write!(f, " from group:{g}"),
            Source::Node(a) => write!(f, " from {a}"),
        }
    }
}

/// The firewall's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallConfig {
    /// Policy for inbound packets no rule matches; `None` means the
    /// network's default: allow on the public mesh, deny in a private one.
    pub default_inbound: Option<Action>,
    pub rules: Vec<Rule>,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        FirewallConfig { default_inbound: None, rules: Vec::new() }
    }
}

/// What the firewall looks at in a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub proto: u8,
    /// Our port (or ICMP echo id).
    pub local: u16,
    pub remote: u16,
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const MAX_FLOWS: usize = 65_536;

/// How a packet looks to the firewall: its flow as seen from this node,
/// and whether it is an ICMP error (always allowed: it belongs to a flow).
fn classify(packet: &[u8], outbound: bool) -> Option<(Flow, bool)> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let (proto, src, dst, icmp_error) = match sliced.transport? {
        TransportSlice::Tcp(t) => (TCP, t.source_port(), t.destination_port(), false),
        TransportSlice::Udp(u) => (UDP, u.source_port(), u.destination_port(), false),
        TransportSlice::Icmpv4(i) => {
            let b = i.bytes5to8();
            let id = u16::from_be_bytes([b[0], b[1]]);
            (ICMP, id, id, matches!(i.type_u8(), 3 | 11 | 12))
        }
        TransportSlice::Icmpv6(i) => {
            let b = i.bytes5to8();
            let id = u16::from_be_bytes([b[0], b[1]]);
            (ICMPV6, id, id, i.type_u8() < 128)
        }
        _ => return None,
    };
    let flow = if outbound { Flow { proto, local: src, remote: dst } } else { Flow { proto, local: dst, remote: src } };
    Some((flow, icmp_error))
}

/// The stateful inbound filter.
pub struct Firewall {
    config: FirewallConfig,
    default: Action,
    /// No rules and a default of allow: every packet passes, so there is
    /// nothing to parse or track (the public mesh's default, per packet).
    open: bool,
    flows: HashMap<(MeshAddr, Flow), Instant>,
}

impl Firewall {
    pub fn new(config: FirewallConfig, private_network: bool) -> Firewall {
        let default = config.default_inbound.unwrap_or(if private_network { Action::Deny } else { Action::Allow });
        let open = config.rules.is_empty() && default == Action::Allow;
        Firewall { config, default, open, flows: HashMap::new() }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.config.rules
    }

    pub fn default_inbound(&self) -> Action {
        self.default
    }

    /// A packet we send to `peer`: remember the flow so answers get in.
    pub fn outbound(&mut self, peer: MeshAddr, packet: &[u8], now: Instant) {
        if self.open {
            return;
        }
        let Some((flow, _)) = classify(packet, true) else { return };
        let ttl = match flow.proto {
            TCP => Duration::from_secs(3600),
            UDP => Duration::from_secs(300),
            _ => Duration::from_secs(30),
        };
        if self.flows.len() >= MAX_FLOWS {
            self.flows.retain(|_, until| *until > now);
            if self.flows.len() >= MAX_FLOWS {
                return;
            }
        }
        self.flows.insert((peer, flow), now + ttl);
    }

    /// Whether a packet from `peer` (certified for `groups`) may come in.
    pub fn inbound(&mut self, peer: MeshAddr, certified_groups: &[String], packet: &[u8], now: Instant) -> bool {
        if self.open {
            return true;
        }
        let Some((flow, icmp_error)) = classify(packet, false) else {
            // Not TCP, UDP or ICMP: only an explicit `any` rule or policy.
            return self.decide(peer, certified_groups, None) == Action::Allow;
        };
        if icmp_error {
            return true;
        }
        if self.flows.get(&(peer, flow)).is_some_and(|until| *until > now) {
            return true;
        }
        self.decide(peer, certified_groups, Some(flow)) == Action::Allow
    }

    fn decide(&self, peer: MeshAddr, groups: &[String], flow: Option<Flow>) -> Action {
        for rule in &self.config.rules {
            let proto_ok = match (rule.proto, flow.map(|f| f.proto)) {
                (Proto::Any, _) => true,
                (Proto::Tcp, Some(TCP)) | (Proto::Udp, Some(UDP)) => true,
                (Proto::Icmp, Some(ICMP | ICMPV6)) => true,
                _ => false,
            };
            let port_ok = match (rule.ports, flow) {
                (None, _) => true,
                (Some((lo, hi)), Some(f)) => (lo..=hi).contains(&f.local),
                (Some(_), None) => false,
            };
            let from_ok = match &rule.from {
                Source::Any => true,
                Source::Group(g) => groups.iter().any(|c| c == g),
                Source::Node(a) => *a == peer,
            };
            if proto_ok && port_ok && from_ok {
                return rule.action;
            }
        }
        self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn peer() -> MeshAddr {
        "7:A91F.0000.7C2E".parse().unwrap()
    }

    fn tcp(src_port: u16, dst_port: u16) -> Vec<u8> {
        let b = PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).tcp(src_port, dst_port, 1, 1000);
        let mut out = Vec::new();
        b.write(&mut out, b"x").unwrap();
        out
    }

    fn rules(text: &[&str]) -> Vec<Rule> {
        text.iter().map(|r| r.parse().unwrap()).collect()
    }

    #[test]
    fn rules_parse_and_print_back() {
        for text in ["allow tcp/22 from group:ops", "deny udp/53", "allow icmp", "allow any from 7:A91F.0000.7C2E", "allow tcp/8000-8100"] {
            assert_eq!(text.parse::<Rule>().unwrap().to_string(), text);
        }
        assert_eq!("deny".parse::<Rule>().unwrap(), Rule { action: Action::Deny, proto: Proto::Any, ports: None, from: Source::Any });
    }

    #[test]
    fn malformed_rules_say_what_is_wrong() {
        let message = |t: &str| t.parse::<Rule>().unwrap_err().message;
        assert_eq!(message("permit tcp"), "must start with `allow` or `deny`");
        assert_eq!(message("allow sctp"), "protocol must be tcp, udp, icmp or any");
        assert_eq!(message("allow icmp/5"), "ports only go with tcp or udp");
        assert_eq!(message("allow tcp/99999"), "port must be a number 0-65535");
        assert_eq!(message("allow tcp/9-1"), "port range must go low-high");
        assert_eq!(message("allow tcp from group:"), "group name missing after `group:`");
        assert!(message("allow tcp from somebody").starts_with("`from` must be"));
    }

    #[test]
    fn first_matching_rule_wins_and_unmatched_packets_get_the_default() {
        let now = Instant::now();
        let config = FirewallConfig { default_inbound: Some(Action::Deny), rules: rules(&["deny tcp/23", "allow tcp/1-1024 from group:ops"]) };
        let mut fw = Firewall::new(config, true);
        let ops = vec!["ops".to_string()];
        assert!(fw.inbound(peer(), &ops, &tcp(40000, 22), now));
        assert!(!fw.inbound(peer(), &ops, &tcp(40000, 23), now), "the earlier deny wins");
        assert!(!fw.inbound(peer(), &[], &tcp(40000, 22), now), "not certified for ops");
        assert!(!fw.inbound(peer(), &ops, &tcp(40000, 8080), now), "default deny");
    }

    #[test]
    fn return_traffic_of_flows_we_opened_is_always_allowed() {
        let now = Instant::now();
        let mut fw = Firewall::new(FirewallConfig::default(), true); // private: default deny
        assert!(!fw.inbound(peer(), &[], &tcp(8080, 40000), now));
        fw.outbound(peer(), &tcp(40000, 8080), now);
        assert!(fw.inbound(peer(), &[], &tcp(8080, 40000), now), "the answer gets in");
        let other: MeshAddr = "7:0000.0000.0001".parse().unwrap();
        assert!(!fw.inbound(other, &[], &tcp(8080, 40000), now), "but not from another node");
        assert!(!fw.inbound(peer(), &[], &tcp(8080, 40000), now + Duration::from_secs(7200)), "flows expire");
    }

    #[test]
    fn an_open_firewall_passes_everything_and_tracks_no_flows() {
        let now = Instant::now();
        let mut fw = Firewall::new(FirewallConfig::default(), false);
        fw.outbound(peer(), &tcp(40000, 8080), now);
        assert!(fw.flows.is_empty());
        assert!(fw.inbound(peer(), &[], &tcp(8080, 40000), now));
        assert!(fw.inbound(peer(), &[], &[0x60, 0, 0], now), "even what it could not classify");
        // One rule, or a default of deny, and it tracks again.
        let mut ruled = Firewall::new(FirewallConfig { default_inbound: None, rules: rules(&["deny tcp/23"]) }, false);
        ruled.outbound(peer(), &tcp(40000, 8080), now);
        assert_eq!(ruled.flows.len(), 1);
    }

    #[test]
    fn the_public_mesh_allows_by_default_and_private_networks_deny() {
        let now = Instant::now();
        assert!(Firewall::new(FirewallConfig::default(), false).inbound(peer(), &[], &tcp(1, 2), now));
        assert!(!Firewall::new(FirewallConfig::default(), true).inbound(peer(), &[], &tcp(1, 2), now));
    }
}
