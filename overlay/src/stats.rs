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
    /// Over a rate limit (group broadcasts).
    RateLimited,
    /// A peer sent a packet from a mesh address that is not its own.
    SpoofedSource,
    /// WireGuard refused it (bad MAC, replay, no session, ...).
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
    /// Group packets fanned out to members.
    pub broadcasts_sent: u64,
    /// Records from a backbone that failed verification or did not answer
    /// the query (a misbehaving backbone).
    pub bad_records: u64,
    /// Records older than one already seen for that node (a stale or
    /// rolled-back answer from a backbone).
    pub stale_records: u64,
    pub dropped: Dropped,
}

/// Drops by reason.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Dropped {
    pub no_route: u64,
    pub not_ipv6: u64,
    pub malformed: u64,
    pub queue_full: u64,
    pub lookup_failed: u64,
    pub spoofed_source: u64,
    pub wireguard: u64,
    pub unknown_peer: u64,
    pub unexpected_source: u64,
    pub rate_limited: u64,
}

impl Stats {
    pub fn count_drop(&mut self, reason: DropReason) {
        let d = &mut self.dropped;
        let counter = match reason {
            DropReason::NoRoute => &mut d.no_route,
            DropReason::NotIpv6 => &mut d.not_ipv6,
            DropReason::Malformed => &mut d.malformed,
            DropReason::QueueFull => &mut d.queue_full,
            DropReason::LookupFailed => &mut d.lookup_failed,
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
            DropReason::SpoofedSource => d.spoofed_source,
            DropReason::WireGuard => d.wireguard,
            DropReason::UnknownPeer => d.unknown_peer,
            DropReason::UnexpectedSource => d.unexpected_source,
            DropReason::RateLimited => d.rate_limited,
        }
    }
}
