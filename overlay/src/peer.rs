//! One peer: its verified record and its WireGuard session.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Instant;

use boringtun::noise::Tunn;
use meshtun_addr::MeshAddr;
use meshtun_proto::NodeRecord;
use serde::Serialize;

use crate::Event;

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
    pub tunn: Tunn,
    /// The endpoint the peer last sent authenticated traffic from.
    pub endpoint: Option<SocketAddr>,
    pub added_at: Instant,
    pub up_since: Option<Instant>,
    pub tx_packets: u64,
    pub rx_packets: u64,
}

/// A peer as `meshtun status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub address: String,
    pub ipv6: Ipv6Addr,
    pub hostname: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub candidates: Vec<SocketAddr>,
    /// Seconds since the last completed WireGuard handshake.
    pub handshake_age_secs: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub up_for_secs: Option<f64>,
}

impl Peer {
    pub fn new(id: PeerId, record: NodeRecord, tunn: Tunn, now: Instant) -> Peer {
        let addr = record.mesh_addr();
        Peer {
            id,
            addr,
            ip: addr.to_ipv6(),
            record,
            tunn,
            endpoint: None,
            added_at: now,
            up_since: None,
            tx_packets: 0,
            rx_packets: 0,
        }
    }

    pub fn update_record(&mut self, record: NodeRecord) {
        self.record = record;
    }

    /// Where to send: the confirmed endpoint, or until one is confirmed,
    /// every candidate (the handshake that answers first wins).
    pub fn send_targets(&self) -> Vec<SocketAddr> {
        match self.endpoint {
            Some(endpoint) => vec![endpoint],
            None => self.record.endpoints.clone(),
        }
    }

    /// Authenticated traffic arrived from `from`: that is where the peer is.
    pub fn confirm_endpoint(&mut self, from: SocketAddr, now: Instant, events: &mut std::collections::VecDeque<Event>) {
        if self.endpoint != Some(from) {
            tracing::info!(peer = %self.addr, endpoint = %from, "peer endpoint confirmed");
            self.endpoint = Some(from);
            if self.up_since.is_none() {
                self.up_since = Some(now);
            }
            events.push_back(Event::PeerUp { peer: self.addr.to_string(), endpoint: from });
        }
    }

    pub fn status(&self, now: Instant) -> PeerStatus {
        let (handshake, tx_bytes, rx_bytes, _, _) = self.tunn.stats();
        PeerStatus {
            address: self.addr.to_string(),
            ipv6: self.ip,
            hostname: self.record.hostname.clone(),
            endpoint: self.endpoint,
            candidates: self.record.endpoints.clone(),
            handshake_age_secs: handshake.map(|d| d.as_secs_f64()),
            tx_bytes: tx_bytes as u64,
            rx_bytes: rx_bytes as u64,
            tx_packets: self.tx_packets,
            rx_packets: self.rx_packets,
            up_for_secs: self.up_since.map(|t| now.saturating_duration_since(t).as_secs_f64()),
        }
    }
}
