//! Path probes: small authenticated pings and pongs sent straight to a
//! peer's candidate endpoints to open NAT mappings, prove a path works in
//! both directions, and measure its round-trip time.
//!
//! A probe is authenticated with a key both ends derive from their
//! WireGuard static keys (X25519(mine, theirs), then BLAKE3 `derive_key`),
//! so nobody without one of the two private keys can forge a pong and steer
//! traffic to an address of their choosing.
//!
//! Wire form (83 bytes, pings and pongs the same size so answering a ping
//! never amplifies):
//! `MP\x01` | kind (1) | sender WireGuard public key (32) | transaction id (12)
//! | observed address (19: family, 16 address bytes, port; zero in pings) | MAC (16).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use boringtun::x25519::{PublicKey, StaticSecret};

pub const PROBE_MAGIC: [u8; 3] = *b"MP\x01";
pub const PROBE_LEN: usize = 3 + 1 + 32 + 12 + 19 + 16;
const MAC_LEN: usize = 16;
const KEY_CONTEXT: &str = "meshtun 2026 path probe key v1";

pub type TxId = [u8; 12];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Ping,
    /// Carries the address the ping came from.
    Pong(SocketAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub sender: [u8; 32],
    pub txid: TxId,
}

/// The key two peers share for probes.
pub fn probe_key(mine: &StaticSecret, theirs: &PublicKey) -> [u8; 32] {
    let shared = mine.diffie_hellman(theirs);
    blake3::derive_key(KEY_CONTEXT, shared.as_bytes())
}

pub fn encode(probe: &Probe, key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PROBE_LEN);
    out.extend_from_slice(&PROBE_MAGIC);
    let (kind, observed) = match probe.kind {
        ProbeKind::Ping => (1u8, None),
        ProbeKind::Pong(addr) => (2u8, Some(addr)),
    };
    out.push(kind);
    out.extend_from_slice(&probe.sender);
    out.extend_from_slice(&probe.txid);
    let mut addr = [0u8; 19];
    if let Some(observed) = observed {
        let (family, bytes) = match observed.ip() {
            IpAddr::V4(v4) => (4u8, v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => (6u8, v6.octets()),
        };
        addr[0] = family;
        addr[1..17].copy_from_slice(&bytes);
        addr[17..19].copy_from_slice(&observed.port().to_be_bytes());
    }
    out.extend_from_slice(&addr);
    let mac = blake3::keyed_hash(key, &out);
    out.extend_from_slice(&mac.as_bytes()[..MAC_LEN]);
    out
}

/// The claimed sender key, to find the peer (and so the MAC key).
pub fn peek_sender(datagram: &[u8]) -> Option<[u8; 32]> {
    if datagram.len() != PROBE_LEN || !datagram.starts_with(&PROBE_MAGIC) {
        return None;
    }
    datagram.get(4..36)?.try_into().ok()
}

/// Verifies and decodes a probe; `None` if anything is off.
pub fn decode(datagram: &[u8], key: &[u8; 32]) -> Option<Probe> {
    if datagram.len() != PROBE_LEN || !datagram.starts_with(&PROBE_MAGIC) {
        return None;
    }
    let (body, mac) = datagram.split_at(PROBE_LEN - MAC_LEN);
    let expected = blake3::keyed_hash(key, body);
    if !constant_time_eq(&expected.as_bytes()[..MAC_LEN], mac) {
        return None;
    }
    let sender: [u8; 32] = body.get(4..36)?.try_into().ok()?;
    let txid: TxId = body.get(36..48)?.try_into().ok()?;
    let addr = body.get(48..67)?;
    let kind = match body.get(3)? {
        1 => ProbeKind::Ping,
        2 => {
            let octets: [u8; 16] = addr.get(1..17)?.try_into().ok()?;
            let port = u16::from_be_bytes(addr.get(17..19)?.try_into().ok()?);
            let ip = match addr.first()? {
                4 => IpAddr::V4(Ipv6Addr::from(octets).to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                6 => IpAddr::V6(Ipv6Addr::from(octets)),
                _ => return None,
            };
            ProbeKind::Pong(SocketAddr::new(ip, port))
        }
        _ => return None,
    };
    Some(Probe { kind, sender, txid })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (StaticSecret, StaticSecret) {
        (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]))
    }

    #[test]
    fn both_peers_derive_the_same_probe_key_and_outsiders_do_not() {
        let (a, b) = keys();
        let c = StaticSecret::from([3; 32]);
        let ab = probe_key(&a, &PublicKey::from(&b));
        assert_eq!(ab, probe_key(&b, &PublicKey::from(&a)));
        assert_ne!(ab, probe_key(&c, &PublicKey::from(&b)));
    }

    #[test]
    fn pings_and_pongs_round_trip_and_have_the_same_size() {
        let key = [7; 32];
        let ping = Probe { kind: ProbeKind::Ping, sender: [1; 32], txid: [2; 12] };
        let pong = Probe { kind: ProbeKind::Pong("198.18.0.2:4242".parse().unwrap()), sender: [1; 32], txid: [2; 12] };
        let pong6 = Probe { kind: ProbeKind::Pong("[2001:db8::1]:9".parse().unwrap()), ..pong };
        for p in [ping, pong, pong6] {
            let wire = encode(&p, &key);
            assert_eq!(wire.len(), PROBE_LEN);
            assert_eq!(peek_sender(&wire), Some([1; 32]));
            assert_eq!(decode(&wire, &key), Some(p));
        }
    }

    #[test]
    fn a_probe_with_any_bit_flipped_or_the_wrong_key_is_refused() {
        let key = [7; 32];
        let wire = encode(&Probe { kind: ProbeKind::Ping, sender: [1; 32], txid: [2; 12] }, &key);
        assert_eq!(decode(&wire, &[8; 32]), None);
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x80;
            assert_eq!(decode(&bad, &key), None, "flip at {i}");
        }
        assert_eq!(decode(&wire[..PROBE_LEN - 1], &key), None);
    }
}
