//! Relay framing: a WireGuard datagram wrapped with the mesh address of its
//! other end. Node -> relay: the destination; relay -> node: the source. The
//! relay never sees inside the WireGuard datagram.
//!
//! Wire form: `MR\x01` | network (2 bytes, big-endian) | node (6 bytes) | payload.
//! The header is the same size both ways, so a relay never sends more than
//! it received.

use meshtun_addr::{MeshAddr, NetworkId, NodeAddr};

pub const RELAY_MAGIC: [u8; 3] = *b"MR\x01";
pub const RELAY_HEADER_LEN: usize = 3 + 2 + 6;

/// Wraps `payload` for the relay, addressed to (or from) `peer`.
pub fn wrap(peer: MeshAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RELAY_HEADER_LEN + payload.len());
    out.extend_from_slice(&RELAY_MAGIC);
    out.extend_from_slice(&peer.network.0.to_be_bytes());
    out.extend_from_slice(&peer.node.to_bytes());
    out.extend_from_slice(payload);
    out
}

/// Splits a relay datagram into the peer address and the payload.
pub fn unwrap(datagram: &[u8]) -> Option<(MeshAddr, &[u8])> {
    let rest = datagram.strip_prefix(&RELAY_MAGIC[..])?;
    let (network, rest) = rest.split_first_chunk::<2>()?;
    let (node, payload) = rest.split_first_chunk::<6>()?;
    Some((MeshAddr::new(NetworkId(u16::from_be_bytes(*network)), NodeAddr::from_bytes(*node)), payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_datagrams_unwrap_to_the_same_address_and_payload() {
        let addr: MeshAddr = "7:A91F.0000.7C2E".parse().unwrap();
        let wire = wrap(addr, b"\x04\x00\x00\x00payload");
        assert_eq!(wire.len(), RELAY_HEADER_LEN + 11);
        assert_eq!(unwrap(&wire), Some((addr, &b"\x04\x00\x00\x00payload"[..])));
    }

    #[test]
    fn truncated_or_foreign_datagrams_do_not_unwrap() {
        assert_eq!(unwrap(b"MR\x01\x00"), None);
        assert_eq!(unwrap(b"MT\x01\x00\x00\x00\x00\x00\x00\x00\x00"), None);
        assert_eq!(unwrap(b""), None);
    }
}
