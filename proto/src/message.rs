//! Messages between nodes and backbones.
//!
//! Wire form: the 3-byte magic `MT\x01` (which no STUN or WireGuard datagram
//! starts with, so all three share one UDP port), then the postcard encoding
//! of [`Message`]. Decoding never panics, and what it allocates is bounded
//! by the datagram's length: a sequence is preallocated for at most as many
//! elements as bytes remain, so at worst about `size_of::<SignedRecord>()`
//! (48) bytes per datagram byte, 384 KiB for the largest datagram (checked
//! by the `proto_message` fuzz target).

use std::net::SocketAddr;

use meshtun_addr::{MeshAddr, NetworkId};
use serde::{Deserialize, Serialize};

use crate::identity::{verify_signature, Identity};
use crate::record::SignedRecord;

/// The first bytes of every backbone-protocol datagram.
pub const MAGIC: [u8; 3] = *b"MT\x01";
/// Largest datagram either side sends or accepts.
pub const MAX_MESSAGE_LEN: usize = 8192;

const DEREGISTER_SIGNING_CONTEXT: &[u8] = b"meshtun deregister v1\0";

/// What a lookup asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Query {
    Address(MeshAddr),
    Hostname { network: NetworkId, name: String },
    /// Which node holds this WireGuard key (used when an unknown peer's
    /// handshake arrives first).
    WgKey { network: NetworkId, key: [u8; 32] },
    /// Every node that declares this capability tag.
    Capability { network: NetworkId, name: String },
    /// Every member of this group.
    Group { network: NetworkId, name: String },
    /// Every node whose canonical IPv4 address (see
    /// `meshtun_addr::canonical_ipv4`) is this one: usually one, more on a
    /// hash collision.
    Ipv4 { network: NetworkId, addr: [u8; 4] },
}

impl Query {
    /// Whether the answer can hold several records.
    pub fn is_set(&self) -> bool {
        matches!(self, Query::Capability { .. } | Query::Group { .. } | Query::Ipv4 { .. })
    }
}

/// Why a backbone refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    Malformed,
    BadSignature,
    AddressNotDerived,
    StaleSequence,
    HostnameTaken,
    /// Lookups are answered only for registered nodes, at their registered
    /// source endpoint, so the backbone cannot be used to reflect traffic.
    NotRegistered,
    UnknownNode,
    /// Private network: no valid membership certificate (missing, expired,
    /// revoked, wrong owner) or a network this backbone does not serve.
    Unauthorized,
    /// The record's WireGuard key certification has expired.
    KeyExpired,
    /// Too many registrations from this source; try again later.
    RateLimited,
    /// A standalone relay answers only address lookups (they grant the
    /// pair's relay permission); ask a backbone for anything else.
    RelayOnly,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Malformed => "malformed",
            RejectCode::BadSignature => "bad_signature",
            RejectCode::AddressNotDerived => "address_not_derived",
            RejectCode::StaleSequence => "stale_sequence",
            RejectCode::HostnameTaken => "hostname_taken",
            RejectCode::NotRegistered => "not_registered",
            RejectCode::Unauthorized => "unauthorized",
            RejectCode::KeyExpired => "key_expired",
            RejectCode::RateLimited => "rate_limited",
            RejectCode::UnknownNode => "unknown_node",
            RejectCode::RelayOnly => "relay_only",
        }
    }
}

/// A node's signed request to be forgotten.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deregistration {
    pub addr: MeshAddr,
    /// Must exceed the stored record's sequence number.
    pub seq: u64,
    pub signature: Vec<u8>,
}

impl Deregistration {
    pub fn sign(identity: &Identity, addr: MeshAddr, seq: u64) -> Deregistration {
        let signature = identity.sign(&Self::signing_input(addr, seq)).to_vec();
        Deregistration { addr, seq, signature }
    }

    pub fn verify(&self, identity_key: &[u8; 32]) -> bool {
        verify_signature(identity_key, &Self::signing_input(self.addr, self.seq), &self.signature)
    }

    fn signing_input(addr: MeshAddr, seq: u64) -> Vec<u8> {
        let mut input = DEREGISTER_SIGNING_CONTEXT.to_vec();
        input.extend_from_slice(&addr.network.0.to_be_bytes());
        input.extend_from_slice(&addr.node.to_bytes());
        input.extend_from_slice(&seq.to_be_bytes());
        input
    }
}

/// Every message of the backbone protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Node -> backbone: store my record. Also the heartbeat: each one
    /// carries a freshly signed record with a higher sequence number, so a
    /// replayed old registration can neither refresh nor roll back a record.
    Register { request_id: u64, record: SignedRecord },
    /// Backbone -> node: stored. `observed` is the source address the
    /// backbone saw (the node's server-reflexive endpoint).
    RegisterAck { request_id: u64, observed: SocketAddr, ttl_secs: u32 },
    /// Node -> backbone: forget me now (on shutdown).
    Deregister { request_id: u64, deregistration: Deregistration },
    DeregisterAck { request_id: u64 },
    /// Node -> backbone. `from` is the asking node, which must be registered
    /// from the datagram's source address.
    Lookup { request_id: u64, from: MeshAddr, query: Query },
    /// Backbone -> node: the matching records (empty: none). The node
    /// verifies each one; the backbone is not trusted.
    LookupReply { request_id: u64, records: Vec<SignedRecord> },
    /// Backbone -> node: the request with this id was refused.
    Reject { request_id: u64, code: RejectCode, detail: String },
    /// Backbone -> node, pushed over the path the node registers on: the
    /// node whose record this is just looked you up and is about to probe
    /// you. Probe it back now, so both NATs open at the same moment.
    PeerIntent { record: SignedRecord },
    /// Backbone -> node of a private network, with each registration
    /// answer: the owner's current revocation list, so a revoked member is
    /// cut off by every peer within one heartbeat.
    Revocations { list: crate::cert::SignedRevocations },
}

/// Why a datagram is not a valid message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("datagram does not start with the backbone protocol magic")]
    BadMagic,
    #[error("datagram of {0} bytes exceeds the {MAX_MESSAGE_LEN}-byte limit")]
    TooLong(usize),
    #[error("undecodable message: {0}")]
    Decode(String),
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        // Encoding into a Vec cannot fail for these types.
        if let Ok(bytes) = postcard::to_extend(self, Vec::new()) {
            out.extend_from_slice(&bytes);
        }
        out
    }

    pub fn decode(datagram: &[u8]) -> Result<Message, MessageError> {
        if datagram.len() > MAX_MESSAGE_LEN {
            return Err(MessageError::TooLong(datagram.len()));
        }
        let payload = datagram.strip_prefix(&MAGIC[..]).ok_or(MessageError::BadMagic)?;
        let (message, rest) = postcard::take_from_bytes::<Message>(payload)
            .map_err(|e| MessageError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(MessageError::Decode(format!("{} trailing bytes", rest.len())));
        }
        Ok(message)
    }

    pub fn request_id(&self) -> u64 {
        match self {
            Message::Register { request_id, .. }
            | Message::RegisterAck { request_id, .. }
            | Message::Deregister { request_id, .. }
            | Message::DeregisterAck { request_id }
            | Message::Lookup { request_id, .. }
            | Message::LookupReply { request_id, .. }
            | Message::Reject { request_id, .. } => *request_id,
            Message::PeerIntent { .. } | Message::Revocations { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtun_addr::NodeAddr;
    use proptest::prelude::*;

    fn addr() -> MeshAddr {
        MeshAddr::new(NetworkId(0), NodeAddr::new(0xA91F_0000_7C2E).unwrap())
    }

    #[test]
    fn messages_round_trip_through_the_wire_form() {
        let messages = vec![
            Message::Register {
                request_id: 7,
                record: SignedRecord { body: vec![1, 2, 3], signature: vec![4; 64] },
            },
            Message::RegisterAck {
                request_id: 7,
                observed: "198.18.0.2:51820".parse().unwrap(),
                ttl_secs: 60,
            },
            Message::Lookup { request_id: 9, from: addr(), query: Query::Address(addr()) },
            Message::Lookup {
                request_id: 9,
                from: addr(),
                query: Query::Hostname { network: NetworkId(0), name: "b".into() },
            },
            Message::LookupReply { request_id: 9, records: vec![] },
            Message::Reject { request_id: 1, code: RejectCode::HostnameTaken, detail: "x".into() },
        ];
        for message in messages {
            let wire = message.encode();
            assert_eq!(&wire[..3], b"MT\x01");
            assert_eq!(Message::decode(&wire).unwrap(), message);
        }
    }

    #[test]
    fn trailing_bytes_and_missing_magic_are_refused() {
        let mut wire = Message::DeregisterAck { request_id: 1 }.encode();
        wire.push(0);
        assert!(matches!(Message::decode(&wire), Err(MessageError::Decode(_))));
        assert_eq!(Message::decode(b"XX\x01\x00"), Err(MessageError::BadMagic));
        assert_eq!(Message::decode(&[]), Err(MessageError::BadMagic));
    }

    #[test]
    fn deregistration_verifies_only_for_its_signer_and_fields() {
        let id = Identity::generate([21; 32]);
        let other = Identity::generate([22; 32]);
        let d = Deregistration::sign(&id, id.mesh_addr(NetworkId(0)), 5);
        assert!(d.verify(&id.public_key()));
        assert!(!d.verify(&other.public_key()));
        let mut bumped = d.clone();
        bumped.seq = 6;
        assert!(!bumped.verify(&id.public_key()));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut wire = MAGIC.to_vec();
            wire.extend_from_slice(&tail);
            let _ = Message::decode(&wire);
            let _ = Message::decode(&tail);
        }
    }
}
