//! Private networks: an owner key per network number, membership
//! certificates the owner signs offline, and signed revocation lists.
//!
//! A certificate names the member's node address, the groups the owner
//! certifies it for, an expiry and a serial number. Certified groups (not
//! self-declared tags) are what firewall rules may trust. Everything is
//! checked against an owner key the verifier was configured with; a
//! certificate's own claims about its owner are never trusted.

use ed25519_dalek::SigningKey;
use meshtun_addr::{NetworkId, NodeAddr};
use serde::{Deserialize, Serialize};

use crate::identity::{hex, unhex32, verify_signature};

const CERT_CONTEXT: &[u8] = b"meshtun membership v1\0";
const REVOCATION_CONTEXT: &[u8] = b"meshtun revocations v1\0";

/// Why a certificate or revocation list is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    #[error("certificate is malformed: {0}")]
    Malformed(String),
    #[error("signature does not verify against the network owner's key")]
    BadSignature,
    #[error("certificate is for network {got}, not {expected}")]
    WrongNetwork { expected: NetworkId, got: NetworkId },
    #[error("certificate names node {cert}, not {record}")]
    WrongMember { cert: NodeAddr, record: NodeAddr },
    #[error("certificate expired at unix time {0}")]
    Expired(u64),
    #[error("certificate serial {0} is revoked")]
    Revoked(u64),
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
}

/// What a membership certificate says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub network: NetworkId,
    pub member: NodeAddr,
    pub groups: Vec<String>,
    pub not_after_unix: u64,
    pub serial: u64,
}

/// A signed membership certificate as it travels (inside node records).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCert {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A network owner's list of revoked certificate serials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub network: NetworkId,
    /// Newer lists replace older ones.
    pub seq: u64,
    pub serials: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRevocations {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

/// The owner of a private network (kept offline by its operator).
pub struct NetworkOwner {
    network: NetworkId,
    signing: SigningKey,
}

impl NetworkOwner {
    pub fn generate(network: NetworkId, secret: [u8; 32]) -> NetworkOwner {
        NetworkOwner { network, signing: SigningKey::from_bytes(&secret) }
    }

    pub fn network(&self) -> NetworkId {
        self.network
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn sign_membership(&self, member: NodeAddr, groups: Vec<String>, not_after_unix: u64, serial: u64) -> SignedCert {
        let body = postcard::to_allocvec(&Membership { network: self.network, member, groups, not_after_unix, serial })
            .unwrap_or_default();
        let signature = self.sign(CERT_CONTEXT, &body);
        SignedCert { body, signature }
    }

    pub fn sign_revocations(&self, seq: u64, serials: Vec<u64>) -> SignedRevocations {
        let body = postcard::to_allocvec(&Revocations { network: self.network, seq, serials }).unwrap_or_default();
        let signature = self.sign(REVOCATION_CONTEXT, &body);
        SignedRevocations { body, signature }
    }

    fn sign(&self, context: &[u8], body: &[u8]) -> Vec<u8> {
        use ed25519_dalek::Signer;
        self.signing.sign(&[context, body].concat()).to_bytes().to_vec()
    }

    /// The owner's secret file.
    pub fn to_file_string(&self) -> String {
        format!(
            "# meshtun network owner key: KEEP OFFLINE. Whoever holds it admits members.\n\
             network = {}\nowner = {}\nsecret = {}\n",
            self.network.0,
            hex(&self.public_key()),
            hex(&self.signing.to_bytes())
        )
    }

    pub fn from_file_str(text: &str) -> Result<NetworkOwner, CertError> {
        let fields = key_values(text)?;
        let network = NetworkId(parse_field(&fields, "network")?);
        let secret = unhex32(field(&fields, "secret")?).ok_or_else(|| syntax(&fields, "secret", "must be 64 hex digits"))?;
        Ok(NetworkOwner::generate(network, secret))
    }
}

impl SignedCert {
    /// Checks the certificate against the configured owner key, for
    /// `network`, naming `member`, valid at `now_unix`, not revoked.
    pub fn verify(
        &self,
        owner_key: &[u8; 32],
        network: NetworkId,
        member: NodeAddr,
        now_unix: u64,
        revoked: Option<&Revocations>,
    ) -> Result<Membership, CertError> {
        let m = self.verify_signature(owner_key)?;
        if m.network != network {
            return Err(CertError::WrongNetwork { expected: network, got: m.network });
        }
        if m.member != member {
            return Err(CertError::WrongMember { cert: m.member, record: member });
        }
        if now_unix > m.not_after_unix {
            return Err(CertError::Expired(m.not_after_unix));
        }
        if revoked.is_some_and(|r| r.network == network && r.serials.contains(&m.serial)) {
            return Err(CertError::Revoked(m.serial));
        }
        Ok(m)
    }

    /// Only the signature (for showing a certificate's contents).
    pub fn verify_signature(&self, owner_key: &[u8; 32]) -> Result<Membership, CertError> {
        if self.body.len() > 2048 {
            return Err(CertError::Malformed("too long".into()));
        }
        if !verify_signature(owner_key, &[CERT_CONTEXT, &self.body].concat(), &self.signature) {
            return Err(CertError::BadSignature);
        }
        postcard::from_bytes(&self.body).map_err(|e| CertError::Malformed(e.to_string()))
    }

    /// The certificate file a member keeps (contents as comments, for people).
    pub fn to_file_string(&self, owner_key: &[u8; 32]) -> String {
        let mut out = String::from("# meshtun membership certificate\n");
        if let Ok(m) = self.verify_signature(owner_key) {
            out += &format!(
                "# network {}, member {}, groups [{}], expires at unix {}, serial {}\n",
                m.network.0,
                m.member,
                m.groups.join(", "),
                m.not_after_unix,
                m.serial
            );
        }
        let wire = postcard::to_allocvec(self).unwrap_or_default();
        out += &format!("owner = {}\ncert = {}\n", hex(owner_key), hex(&wire));
        out
    }

    /// Parses a certificate file: (owner key it names, certificate).
    pub fn from_file_str(text: &str) -> Result<([u8; 32], SignedCert), CertError> {
        let fields = key_values(text)?;
        let owner = unhex32(field(&fields, "owner")?).ok_or_else(|| syntax(&fields, "owner", "must be 64 hex digits"))?;
        let bytes = unhex(field(&fields, "cert")?).ok_or_else(|| syntax(&fields, "cert", "must be hex"))?;
        let cert = postcard::from_bytes(&bytes).map_err(|e| CertError::Malformed(e.to_string()))?;
        Ok((owner, cert))
    }
}

impl SignedRevocations {
    pub fn verify(&self, owner_key: &[u8; 32], network: NetworkId) -> Result<Revocations, CertError> {
        if !verify_signature(owner_key, &[REVOCATION_CONTEXT, &self.body].concat(), &self.signature) {
            return Err(CertError::BadSignature);
        }
        let r: Revocations = postcard::from_bytes(&self.body).map_err(|e| CertError::Malformed(e.to_string()))?;
        if r.network != network {
            return Err(CertError::WrongNetwork { expected: network, got: r.network });
        }
        Ok(r)
    }

    pub fn to_file_string(&self) -> String {
        format!("# meshtun revocation list\nrevocations = {}\n", hex(&postcard::to_allocvec(self).unwrap_or_default()))
    }

    pub fn from_file_str(text: &str) -> Result<SignedRevocations, CertError> {
        let fields = key_values(text)?;
        let bytes = unhex(field(&fields, "revocations")?).ok_or_else(|| syntax(&fields, "revocations", "must be hex"))?;
        postcard::from_bytes(&bytes).map_err(|e| CertError::Malformed(e.to_string()))
    }
}

type Fields = Vec<(usize, String, String)>;

fn key_values(text: &str) -> Result<Fields, CertError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| CertError::Syntax { line: i + 1, message: format!("expected `key = value`, found {line:?}") })?;
        out.push((i + 1, k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

fn field<'a>(fields: &'a Fields, key: &str) -> Result<&'a str, CertError> {
    fields
        .iter()
        .find(|(_, k, _)| k == key)
        .map(|(_, _, v)| v.as_str())
        .ok_or_else(|| CertError::Syntax { line: 0, message: format!("missing key `{key}`") })
}

fn parse_field<T: std::str::FromStr>(fields: &Fields, key: &str) -> Result<T, CertError> {
    field(fields, key)?.parse().map_err(|_| syntax(fields, key, "is not a valid number"))
}

fn syntax(fields: &Fields, key: &str, what: &str) -> CertError {
    let line = fields.iter().find(|(_, k, _)| k == key).map(|(l, _, _)| *l).unwrap_or(0);
    CertError::Syntax { line, message: format!("`{key}` {what}") }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: NetworkId = NetworkId(7);

    fn member() -> NodeAddr {
        NodeAddr::new(0xA91F_0000_7C2E).unwrap()
    }

    fn owner() -> NetworkOwner {
        NetworkOwner::generate(NET, [5; 32])
    }

    #[test]
    fn a_valid_certificate_verifies_with_its_groups() {
        let o = owner();
        let cert = o.sign_membership(member(), vec!["research".into()], 2_000, 1);
        let m = cert.verify(&o.public_key(), NET, member(), 1_000, None).unwrap();
        assert_eq!(m.groups, vec!["research".to_string()]);
    }

    #[test]
    fn expired_certificates_are_refused() {
        let o = owner();
        let cert = o.sign_membership(member(), vec![], 2_000, 1);
        assert_eq!(cert.verify(&o.public_key(), NET, member(), 2_001, None), Err(CertError::Expired(2_000)));
    }

    #[test]
    fn certificates_from_another_owner_are_refused() {
        let o = owner();
        let other = NetworkOwner::generate(NET, [6; 32]);
        let cert = other.sign_membership(member(), vec![], 2_000, 1);
        assert_eq!(cert.verify(&o.public_key(), NET, member(), 1_000, None), Err(CertError::BadSignature));
    }

    #[test]
    fn revoked_serials_are_refused() {
        let o = owner();
        let cert = o.sign_membership(member(), vec![], 2_000, 42);
        let crl = o.sign_revocations(1, vec![42]).verify(&o.public_key(), NET).unwrap();
        assert_eq!(cert.verify(&o.public_key(), NET, member(), 1_000, Some(&crl)), Err(CertError::Revoked(42)));
    }

    #[test]
    fn tampered_certificates_and_wrong_members_or_networks_are_refused() {
        let o = owner();
        let mut cert = o.sign_membership(member(), vec!["ops".into()], 2_000, 1);
        let other = NodeAddr::new(1).unwrap();
        assert!(matches!(cert.verify(&o.public_key(), NET, other, 1_000, None), Err(CertError::WrongMember { .. })));
        assert!(matches!(cert.verify(&o.public_key(), NetworkId(8), member(), 1_000, None), Err(CertError::WrongNetwork { .. })));
        let last = cert.body.len() - 1;
        cert.body[last] ^= 1;
        assert_eq!(cert.verify(&o.public_key(), NET, member(), 1_000, None), Err(CertError::BadSignature));
    }

    #[test]
    fn certificate_owner_and_revocation_files_round_trip() {
        let o = owner();
        let cert = o.sign_membership(member(), vec!["research".into()], 2_000, 3);
        let (key, back) = SignedCert::from_file_str(&cert.to_file_string(&o.public_key())).unwrap();
        assert_eq!((key, back.clone()), (o.public_key(), cert));
        let o2 = NetworkOwner::from_file_str(&o.to_file_string()).unwrap();
        assert_eq!(o2.public_key(), o.public_key());
        assert_eq!(o2.network(), NET);
        let crl = o.sign_revocations(2, vec![3]);
        assert_eq!(SignedRevocations::from_file_str(&crl.to_file_string()).unwrap(), crl);
        assert!(matches!(SignedCert::from_file_str("owner = zz\ncert = 00\n"), Err(CertError::Syntax { line: 1, .. })));
    }
}
