//! Counters the engine keeps.

use serde::Serialize;

/// Why a packet or datagram was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Destination outside this node's mesh network (incl. multicast).
    NoRoute,
    /// IPv4 on an IPv6-only mesh.
    NotIpv6,
    /// Undecodable bytes.
    Malformed,
    /// Too many packets waiting for a lookup or handshake.
    QueueFull,
    /// The destination could not be found.
    LookupFailed,
    /// A WireGuard counter (or handshake timestamp) seen before: a replay.
    Replay,
    /// Refused by a packet filter rule.
    Firewall,
    /// Over a rate limit (group broadcasts).
    RateLimited,
    /// A peer sent a packet from a mesh address that is not its own.
    SpoofedSource,
    /// WireGuard refused it (bad MAC, no session, ...; replays count as `Replay`).
    WireGuard,
    /// A WireGuard message for a session we do not have.
    UnknownPeer,
    /// A backbone message from an address that is not one of our backbones,
    /// or a reply to a request we did not send.
    UnexpectedSource,
}

/// Engine counters (since start).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// WireGuard datagrams sent through a relay.
    pub relayed_tx_packets: u64,
    pub lookups_failed: u64,
    /// Lookup requests sent to backbones (retries included).
    pub lookups_sent: u64,
    /// WireGuard datagrams (UDP payload bytes, handshakes and keepalives
    /// included) by the path they took.
    pub wire: Wire,
    pub handshakes: Handshakes,
    /// Idle WireGuard sessions parked and recreated.
    pub sessions: Sessions,
    /// Time from the start of a lookup to the backbone's answer.
    #[serde(skip)]
    pub lookup_latency: LatencyHistogram,
    /// Group packets fanned out to members.
    pub broadcasts_sent: u64,
    /// ICMP "packet too big" (IPv6) and "fragmentation needed" (IPv4 with
    /// DF) answered into the TUN for packets larger than the narrow path to
    /// their peer (`Node::handle_tun_packet_beyond_path`).
    pub too_big_signals: u64,
    /// IPv4 packets without DF larger than the narrow path to their peer,
    /// cut into fragments that fit it (as a router would).
    pub fragmented_for_path: u64,
    /// Records from a backbone that failed verification or did not answer
    /// the query (a misbehaving backbone).
    pub bad_records: u64,
    /// Records older than one already seen for that node (a stale or
    /// rolled-back answer from a backbone).
    pub stale_records: u64,
    /// Nodes refused as peers (other network, no valid certificate,
    /// expired or superseded key).
    pub untrusted_peers: u64,
    /// Cookie replies sent to handshake initiations while under load.
    pub handshake_cookies_sent: u64,
    pub dropped: Dropped,
}

/// Parking: a peer without data traffic for `NodeConfig::park_idle_after`
/// drops its WireGuard session state and handshakes again on its next packet.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sessions {
    /// Sessions parked (since start).
    pub parks: u64,
    /// Parked sessions recreated (since start), by what woke them: a
    /// packet to send, or a datagram from the peer.
    pub unparks_outbound: u64,
    pub unparks_inbound: u64,
    /// Peers parked now (counted by `Node::status`).
    pub parked: u64,
}

/// Drops by reason.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Dropped {
    pub no_route: u64,
    pub not_ipv6: u64,
    pub malformed: u64,
    pub queue_full: u64,
    pub lookup_failed: u64,
    pub replay: u64,
    pub firewall: u64,
    pub spoofed_source: u64,
    pub wireguard: u64,
    pub unknown_peer: u64,
    pub unexpected_source: u64,
    pub rate_limited: u64,
}

/// Which way a WireGuard datagram went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    Direct,
    Relay,
}

/// Packets and bytes one way on one kind of path.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// WireGuard datagrams on the wire by path kind and direction.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Wire {
    pub direct_tx: Traffic,
    pub direct_rx: Traffic,
    pub relay_tx: Traffic,
    pub relay_rx: Traffic,
}

/// WireGuard handshakes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Handshakes {
    /// Initiations sent (first tries, retries and rekeys).
    pub initiated: u64,
    /// Sessions established: responses we sent, and responses to our
    /// initiations that were accepted.
    pub completed: u64,
    /// Handshake messages WireGuard refused (wrong key, bad MAC, replayed
    /// timestamp, ...).
    pub rejected: u64,
    /// Peers we gave up on after retrying for 90 s without a session.
    pub timed_out: u64,
}

/// Upper bounds (seconds) of the lookup latency buckets; the last bucket is +Inf.
pub const LOOKUP_LATENCY_BOUNDS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A fixed-bucket latency histogram (per-bucket counts, not cumulative).
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    /// One per bound in [`LOOKUP_LATENCY_BOUNDS`], then +Inf.
    pub buckets: [u64; 13],
    pub sum_secs: f64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn observe(&mut self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = LOOKUP_LATENCY_BOUNDS.iter().position(|b| secs <= *b).unwrap_or(LOOKUP_LATENCY_BOUNDS.len());
        self.buckets[i] += 1;
        self.sum_secs += secs;
        self.count += 1;
    }
}

/// The drop reason for a datagram boringtun refused.
pub fn wireguard_drop(error: &boringtun::noise::errors::WireGuardError) -> DropReason {
    use boringtun::noise::errors::WireGuardError as E;
    match error {
        E::DuplicateCounter | E::InvalidCounter | E::WrongTai64nTimestamp => DropReason::Replay,
        E::UnderLoad => DropReason::RateLimited,
        _ => DropReason::WireGuard,
    }
}

impl Stats {
    /// A WireGuard datagram sent on a path of `kind` (`payload` is what
    /// goes on the wire; `wg` the WireGuard message inside it).
    pub fn count_tx(&mut self, kind: PathKind, payload: usize, wg: &[u8]) {
        let t = match kind {
            PathKind::Direct => &mut self.wire.direct_tx,
            PathKind::Relay => &mut self.wire.relay_tx,
        };
        t.packets += 1;
        t.bytes += payload as u64;
        match wg.first() {
            Some(1) => self.handshakes.initiated += 1,
            Some(2) => self.handshakes.completed += 1,
            _ => {}
        }
    }

    /// A WireGuard datagram received on a path of `kind`.
    pub fn count_rx(&mut self, kind: PathKind, payload: usize) {
        let t = match kind {
            PathKind::Direct => &mut self.wire.direct_rx,
            PathKind::Relay => &mut self.wire.relay_rx,
        };
        t.packets += 1;
        t.bytes += payload as u64;
    }

    pub fn count_drop(&mut self, reason: DropReason) {
        let d = &mut self.dropped;
        let counter = match reason {
            DropReason::NoRoute => &mut d.no_route,
            DropReason::NotIpv6 => &mut d.not_ipv6,
            DropReason::Malformed => &mut d.malformed,
            DropReason::QueueFull => &mut d.queue_full,
            DropReason::LookupFailed => &mut d.lookup_failed,
            DropReason::Replay => &mut d.replay,
            DropReason::Firewall => &mut d.firewall,
            DropReason::SpoofedSource => &mut d.spoofed_source,
            DropReason::WireGuard => &mut d.wireguard,
            DropReason::UnknownPeer => &mut d.unknown_peer,
            DropReason::UnexpectedSource => &mut d.unexpected_source,
            DropReason::RateLimited => &mut d.rate_limited,
        };
        *counter += 1;
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        let d = &self.dropped;
        match reason {
            DropReason::NoRoute => d.no_route,
            DropReason::NotIpv6 => d.not_ipv6,
            DropReason::Malformed => d.malformed,
            DropReason::QueueFull => d.queue_full,
            DropReason::LookupFailed => d.lookup_failed,
            DropReason::Replay => d.replay,
            DropReason::Firewall => d.firewall,
            DropReason::SpoofedSource => d.spoofed_source,
            DropReason::WireGuard => d.wireguard,
            DropReason::UnknownPeer => d.unknown_peer,
            DropReason::UnexpectedSource => d.unexpected_source,
            DropReason::RateLimited => d.rate_limited,
        }
    }
}
