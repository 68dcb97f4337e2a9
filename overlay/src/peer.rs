//! One peer: its verified record and its WireGuard session, which is
//! parked (dropped, 11 KB of boringtun state) while the peer is idle and
//! recreated on the next packet either way.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;
use meshtun_addr::MeshAddr;
use meshtun_proto::NodeRecord;
use serde::Serialize;

use crate::path::{CandidateStatus, Path, PathAgent};

/// Index of a peer; also the upper 24 bits of its WireGuard session index,
/// so incoming data finds its peer without a search.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerId(pub u32);

impl PeerId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

pub struct Peer {
    pub id: PeerId,
    pub addr: MeshAddr,
    pub ip: Ipv6Addr,
    pub record: NodeRecord,
    /// The WireGuard session state; `None` while parked. A new one is
    /// always created with this peer's slot as its index.
    pub tunn: Option<Box<Tunn>>,
    /// When to park the session if no data passes before then (`None`:
    /// parking is off, or the session is parked).
    pub park_at: Option<Instant>,
    /// Bytes carried by the sessions parked so far (boringtun's own
    /// counters go with its `Tunn`).
    pub parked_bytes: (u64, u64),
    pub path: PathAgent,
    /// Key for authenticating path probes with this peer.
    pub probe_key: [u8; 32],
    pub added_at: Instant,
    pub up_since: Option<Instant>,
    /// Our own handshake retries while no session exists. boringtun retries
    /// on its own clock too; these follow the node's clock so the core
    /// behaves the same in simulated time.
    pub handshake: Option<HandshakeRetry>,
    /// When to refresh the peer's record (and our relay permission) while
    /// relayed.
    pub next_relay_refresh: Option<Instant>,
    /// Groups the network owner certified this peer for (firewall input).
    pub certified_groups: Vec<String>,
    /// The expiry and serial of this record's membership certificate once
    /// its signature was checked, so the once-a-second trust check only
    /// compares numbers (cleared when the record changes).
    pub cert_checked: Option<(u64, u64)>,
    pub tx_packets: u64,
    pub rx_packets: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct HandshakeRetry {
    pub started: Instant,
    pub next: Instant,
    pub attempts: u32,
}

/// The session's state as `meshtun status` and the daemon's watch see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// A WireGuard session exists (a handshake completed).
    Up,
    /// A session state exists but no handshake has completed yet.
    Handshaking,
    /// Idle: no session state held; the next packet either way handshakes again.
    Parked,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Up => "up",
            SessionState::Handshaking => "handshaking",
            SessionState::Parked => "parked",
        }
    }
}

/// What the daemon's once-a-second watch needs of a peer (peer down and up
/// again, key rotation, punching results). Unlike [`PeerStatus`] it holds
/// no strings and costs no allocation, so a snapshot of 10,000 peers is
/// cheap enough for the engine thread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeerHealth {
    pub addr: MeshAddr,
    pub session: SessionState,
    /// Since the last completed WireGuard handshake.
    pub handshake_age: Option<Duration>,
    /// Whether a session was ever established with the peer.
    pub established: bool,
    pub path: Option<Path>,
}

/// A peer as `meshtun status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub address: String,
    pub ipv6: Ipv6Addr,
    /// The peer's IPv4 address on this host (once one was handed out).
    pub ipv4: Option<std::net::Ipv4Addr>,
    pub hostname: Option<String>,
    /// "direct", "relay" or "none".
    pub path: &'static str,
    /// Where datagrams go now: the peer's endpoint, or the relay.
    pub endpoint: Option<SocketAddr>,
    pub rtt_ms: Option<f64>,
    /// Why the peer is relayed, when it is.
    pub relay_reason: Option<&'static str>,
    pub candidates: Vec<CandidateStatus>,
    /// Seconds since the last completed WireGuard handshake.
    pub handshake_age_secs: Option<f64>,
    /// "up" (a WireGuard session exists), "handshaking", or "parked" (idle:
    /// no session state held; the next packet either way handshakes again).
    pub session: &'static str,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub up_for_secs: Option<f64>,
    /// The largest inner packet the path carries unfragmented, when it is
    /// known to be narrower than the mesh MTU.
    pub inner_mtu: Option<usize>,
}

impl Peer {
    pub fn new(id: PeerId, record: NodeRecord, tunn: Box<Tunn>, path: PathAgent, probe_key: [u8; 32], now: Instant) -> Peer {
        let addr = record.mesh_addr();
        Peer {
            id,
            addr,
            ip: addr.to_ipv6(),
            record,
            tunn: Some(tunn),
            park_at: None,
            parked_bytes: (0, 0),
            path,
            probe_key,
            added_at: now,
            up_since: None,
            handshake: None,
            next_relay_refresh: None,
            certified_groups: Vec::new(),
            cert_checked: None,
            tx_packets: 0,
            rx_packets: 0,
        }
    }

    pub fn update_record(&mut self, record: NodeRecord, own_endpoints: &[SocketAddr]) {
        let candidates: Vec<SocketAddr> =
            record.endpoints.iter().copied().filter(|e| !own_endpoints.contains(e)).collect();
        self.path.set_candidates(&candidates);
        self.record = record;
        self.cert_checked = None;
    }

    pub fn has_session(&self) -> bool {
        self.tunn.as_ref().is_some_and(|t| t.stats().0.is_some())
    }

    pub fn is_parked(&self) -> bool {
        self.tunn.is_none()
    }

    /// Data (not a keepalive) went to or came from the peer: the session
    /// stays for another `idle` at least.
    pub fn on_data(&mut self, now: Instant, idle: Option<std::time::Duration>) {
        self.park_at = idle.map(|d| now + d);
    }

    /// The next time this peer's own timers need the node.
    pub fn poll_timeout(&self) -> Instant {
        let mut next = self.path.poll_timeout();
        if let Some(h) = self.handshake {
            next = next.min(h.next);
        }
        if let Some(r) = self.next_relay_refresh {
            next = next.min(r);
        }
        if let Some(p) = self.park_at {
            next = next.min(p);
        }
        next
    }

    pub fn health(&self) -> PeerHealth {
        let handshake_age = self.tunn.as_ref().and_then(|t| t.time_since_last_handshake());
        PeerHealth {
            addr: self.addr,
            session: match &self.tunn {
                None => SessionState::Parked,
                Some(_) if handshake_age.is_some() => SessionState::Up,
                Some(_) => SessionState::Handshaking,
            },
            handshake_age,
            established: self.up_since.is_some(),
            path: self.path.current(),
        }
    }

    pub fn status(&self, now: Instant) -> PeerStatus {
        let health = self.health();
        let (tx_bytes, rx_bytes) = self.tunn.as_ref().map_or((0, 0), |t| {
            let (_, tx, rx, _, _) = t.stats();
            (tx as u64, rx as u64)
        });
        PeerStatus {
            address: self.addr.to_string(),
            ipv6: self.ip,
            ipv4: None,
            hostname: self.record.hostname.clone(),
            path: match health.path {
                Some(Path::Direct(_)) => "direct",
                Some(Path::Relay(_)) => "relay",
                None => "none",
            },
            endpoint: health.path.map(|p| match p {
                Path::Direct(a) | Path::Relay(a) => a,
            }),
            rtt_ms: self.path.rtt().map(|r| r.as_secs_f64() * 1000.0),
            relay_reason: self.path.relay_reason(),
            candidates: self.path.candidates(),
            handshake_age_secs: health.handshake_age.map(|d| d.as_secs_f64()),
            session: health.session.as_str(),
            tx_bytes: self.parked_bytes.0 + tx_bytes,
            rx_bytes: self.parked_bytes.1 + rx_bytes,
            tx_packets: self.tx_packets,
            rx_packets: self.rx_packets,
            up_for_secs: self.up_since.map(|t| now.saturating_duration_since(t).as_secs_f64()),
            inner_mtu: None,
        }
    }
}
