//! Signed node records.
//!
//! A record is the postcard encoding of [`NodeRecord`] (the *body*) plus an
//! Ed25519 signature by the node's identity key over
//! `RECORD_SIGNING_CONTEXT || body`. Receivers verify the signature over the
//! bytes they received (never a re-encoding), then check that the record's
//! address is derived from its identity key. A backbone can therefore store
//! and serve records but cannot forge or alter one.

use std::net::SocketAddr;

use meshtun_addr::{derive_node_addr, MeshAddr, NetworkId, NodeAddr};
use serde::{Deserialize, Serialize};

use crate::identity::{verify_signature, Identity};

/// Default lifetime of a WireGuard key certification when none is given.
pub const NO_EXPIRY: u64 = u64::MAX;

const RECORD_SIGNING_CONTEXT: &[u8] = b"meshtun record v1\0";

/// Limits that keep a record within one unfragmented datagram.
pub const MAX_ENDPOINTS: usize = 16;
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_LEN: usize = 63;
pub const MAX_RECORD_BODY_LEN: usize = 1024;

/// What a node tells the mesh about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub network: NetworkId,
    pub node: NodeAddr,
    /// Ed25519 identity public key; `node` is derived from it.
    pub identity_key: [u8; 32],
    pub pow_nonce: u64,
    /// Current WireGuard (X25519) static public key.
    pub wg_key: [u8; 32],
    /// UDP endpoints where the node's WireGuard socket may be reached.
    pub endpoints: Vec<SocketAddr>,
    pub hostname: Option<String>,
    pub capabilities: Vec<String>,
    pub groups: Vec<String>,
    /// Strictly increasing per identity: a record with a lower or equal
    /// sequence number than one already seen loses.
    pub seq: u64,
    /// Version of `wg_key`: each rotation increases it; peers refuse a key
    /// older than one they have seen for this node.
    pub wg_key_version: u32,
    /// After this unix time `wg_key` is no longer valid.
    pub wg_key_expires_unix: u64,
    /// Membership certificate (private networks only).
    pub cert: Option<crate::cert::SignedCert>,
}

impl NodeRecord {
    pub fn mesh_addr(&self) -> MeshAddr {
        MeshAddr::new(self.network, self.node)
    }
}

/// Why a record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record is malformed: {0}")]
    Malformed(String),
    #[error("record signature does not verify against its identity key")]
    BadSignature,
    #[error("address {claimed} is not derived from the record's identity key")]
    AddressNotDerived { claimed: MeshAddr },
    #[error("address {0} is reserved and cannot belong to a node")]
    ReservedAddress(MeshAddr),
    #[error("record signed by another identity than this node's")]
    WrongIdentity,
}

/// A record as it travels: body bytes plus signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A record whose signature and address derivation have been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedRecord {
    pub record: NodeRecord,
    pub signed: SignedRecord,
}

impl SignedRecord {
    /// Signs `record` with `identity`. The record's key fields must be the
    /// identity's own (checked, so a caller cannot sign a lie by mistake).
    pub fn sign(identity: &Identity, record: &NodeRecord) -> Result<SignedRecord, RecordError> {
        if record.identity_key != identity.public_key()
            || record.node != identity.node_addr()
            || record.pow_nonce != identity.nonce()
        {
            return Err(RecordError::WrongIdentity);
        }
        validate_fields(record)?;
        let body = postcard::to_allocvec(record)
            .map_err(|e| RecordError::Malformed(e.to_string()))?;
        if body.len() > MAX_RECORD_BODY_LEN {
            return Err(RecordError::Malformed(format!(
                "record is {} bytes, more than {MAX_RECORD_BODY_LEN}",
                body.len()
            )));
        }
        let signature = identity.sign(&signing_input(&body)).to_vec();
        Ok(SignedRecord { body, signature })
    }

    /// Checks everything a receiver must check before believing a record.
    pub fn verify(&self) -> Result<VerifiedRecord, RecordError> {
        if self.body.len() > MAX_RECORD_BODY_LEN {
            return Err(RecordError::Malformed("record body too long".into()));
        }
        let record: NodeRecord = postcard::from_bytes(&self.body)
            .map_err(|e| RecordError::Malformed(e.to_string()))?;
        validate_fields(&record)?;
        let addr = record.mesh_addr();
        if !addr.is_unicast() {
            return Err(RecordError::ReservedAddress(addr));
        }
        if derive_node_addr(&record.identity_key, record.pow_nonce) != Some(record.node) {
            return Err(RecordError::AddressNotDerived { claimed: addr });
        }
        if !verify_signature(&record.identity_key, &signing_input(&self.body), &self.signature) {
            return Err(RecordError::BadSignature);
        }
        Ok(VerifiedRecord { record, signed: self.clone() })
    }
}

/// The exact bytes a record body is encoded as (exposed for tests of
/// forged records elsewhere).
pub fn encode_body(record: &NodeRecord) -> Vec<u8> {
    postcard::to_allocvec(record).unwrap_or_default()
}

fn signing_input(body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(RECORD_SIGNING_CONTEXT.len() + body.len());
    input.extend_from_slice(RECORD_SIGNING_CONTEXT);
    input.extend_from_slice(body);
    input
}

fn validate_fields(record: &NodeRecord) -> Result<(), RecordError> {
    if record.endpoints.len() > MAX_ENDPOINTS {
        return Err(RecordError::Malformed(format!(
            "{} endpoints, at most {MAX_ENDPOINTS}",
            record.endpoints.len()
        )));
    }
    if let Some(name) = &record.hostname {
        validate_hostname(name).map_err(RecordError::Malformed)?;
    }
    for (kind, tags) in [("capability", &record.capabilities), ("group", &record.groups)] {
        if tags.len() > MAX_TAGS {
            return Err(RecordError::Malformed(format!("more than {MAX_TAGS} {kind} tags")));
        }
        for tag in tags {
            validate_label(tag).map_err(|e| RecordError::Malformed(format!("{kind} {e}")))?;
        }
    }
    Ok(())
}

/// A hostname is one DNS label: 1..=63 of `a-z`, `0-9`, `-`, not starting or
/// ending with `-`. Lowercase only, so names compare byte for byte.
pub fn validate_hostname(name: &str) -> Result<(), String> {
    validate_label(name).map_err(|e| format!("hostname {e}"))
}

fn validate_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > MAX_TAG_LEN {
        return Err(format!("{label:?} must be 1 to {MAX_TAG_LEN} characters"));
    }
    if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(format!("{label:?} may contain only a-z, 0-9 and '-'"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("{label:?} must not start or end with '-'"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record_for(identity: &Identity, seq: u64, hostname: Option<&str>) -> NodeRecord {
        NodeRecord {
            network: NetworkId::PUBLIC,
            node: identity.node_addr(),
            identity_key: identity.public_key(),
            pow_nonce: identity.nonce(),
            wg_key: [9; 32],
            endpoints: vec!["198.18.0.2:51820".parse().unwrap()],
            hostname: hostname.map(str::to_string),
            capabilities: vec![],
            groups: vec![],
            seq,
            wg_key_version: 1,
            wg_key_expires_unix: NO_EXPIRY,
            cert: None,
        }
    }

    #[test]
    fn signed_record_verifies() {
        let id = Identity::generate([11; 32]);
        let record = record_for(&id, 1, Some("alpha"));
        let verified = SignedRecord::sign(&id, &record).unwrap().verify().unwrap();
        assert_eq!(verified.record, record);
    }

    #[test]
    fn any_flipped_body_bit_breaks_verification() {
        let id = Identity::generate([12; 32]);
        let signed = SignedRecord::sign(&id, &record_for(&id, 1, Some("alpha"))).unwrap();
        for i in 0..signed.body.len() {
            let mut tampered = signed.clone();
            tampered.body[i] ^= 0x01;
            assert!(tampered.verify().is_err(), "flip at byte {i} still verified");
        }
    }

    #[test]
    fn record_claiming_an_address_not_derived_from_its_key_is_refused() {
        let id = Identity::generate([13; 32]);
        let other = Identity::generate([14; 32]);
        let mut record = record_for(&id, 1, None);
        record.node = other.node_addr();
        // Sign by hand to get past `sign`'s own identity check.
        let body = postcard::to_allocvec(&record).unwrap();
        let signature = id.sign(&signing_input(&body)).to_vec();
        let err = SignedRecord { body, signature }.verify().unwrap_err();
        assert!(matches!(err, RecordError::AddressNotDerived { .. }));
    }

    #[test]
    fn record_signed_by_another_key_is_refused() {
        let id = Identity::generate([15; 32]);
        let thief = Identity::generate([16; 32]);
        let body = postcard::to_allocvec(&record_for(&id, 1, None)).unwrap();
        let signature = thief.sign(&signing_input(&body)).to_vec();
        assert_eq!(SignedRecord { body, signature }.verify().unwrap_err(), RecordError::BadSignature);
    }

    #[test]
    fn signing_someone_elses_record_is_refused() {
        let id = Identity::generate([17; 32]);
        let other = Identity::generate([18; 32]);
        assert_eq!(
            SignedRecord::sign(&id, &record_for(&other, 1, None)).unwrap_err(),
            RecordError::WrongIdentity
        );
    }

    #[test]
    fn hostnames_must_be_single_lowercase_dns_labels() {
        assert!(validate_hostname("specialist-papers").is_ok());
        assert!(validate_hostname("a1").is_ok());
        assert!(validate_hostname("").is_err());
        assert!(validate_hostname("Upper").is_err());
        assert!(validate_hostname("dot.ted").is_err());
        assert!(validate_hostname("-lead").is_err());
        assert!(validate_hostname(&"x".repeat(64)).is_err());
    }

    #[test]
    fn garbage_bodies_are_malformed_not_panics() {
        for len in 0..64 {
            let body: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let signed = SignedRecord { body, signature: vec![0; 64] };
            assert!(signed.verify().is_err());
        }
    }
}
