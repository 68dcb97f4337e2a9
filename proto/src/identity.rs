//! Node identity: an Ed25519 key whose public half, with a proof-of-work
//! nonce, derives the node's permanent 48-bit address (see
//! [`meshtun_addr::derive_node_addr`]).

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use meshtun_addr::{derive_node_addr, find_nonce, MeshAddr, NetworkId, NodeAddr};

/// Errors loading or checking an identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("missing key `{0}`")]
    MissingKey(&'static str),
    #[error("proof-of-work nonce {nonce} does not derive an address from this key: the file was altered or truncated")]
    NonceMismatch { nonce: u64 },
    #[error("unsupported identity file version {0} (this build reads version 1)")]
    UnsupportedVersion(u32),
}

/// A node's identity key plus its proven address.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    nonce: u64,
    node: NodeAddr,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node)
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Creates an identity from 32 bytes of secret randomness, searching for
    /// the proof-of-work nonce (about 2^20 hashes).
    pub fn generate(secret: [u8; 32]) -> Identity {
        let signing = SigningKey::from_bytes(&secret);
        let (nonce, node) = find_nonce(signing.verifying_key().as_bytes(), 0);
        Identity { signing, nonce, node }
    }

    /// Rebuilds an identity from stored parts, checking the nonce.
    pub fn from_parts(secret: [u8; 32], nonce: u64) -> Result<Identity, IdentityError> {
        let signing = SigningKey::from_bytes(&secret);
        let node = derive_node_addr(signing.verifying_key().as_bytes(), nonce)
            .ok_or(IdentityError::NonceMismatch { nonce })?;
        Ok(Identity { signing, nonce, node })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    pub fn node_addr(&self) -> NodeAddr {
        self.node
    }

    pub fn mesh_addr(&self, network: NetworkId) -> MeshAddr {
        MeshAddr::new(network, self.node)
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The identity file: a small text format so an operator can see what
    /// it is, back it up and restore it.
    pub fn to_file_string(&self) -> String {
        format!(
            "# meshtun identity. Keep it secret and back it up: the mesh address\n\
             # {} belongs to this key and cannot be recovered without it.\n\
             version = 1\nsecret = {}\nnonce = {}\n",
            self.node,
            hex(&self.signing.to_bytes()),
            self.nonce
        )
    }

    /// Parses [`Identity::to_file_string`]'s format, naming the line of any error.
    pub fn from_file_str(text: &str) -> Result<Identity, IdentityError> {
        let mut secret = None;
        let mut nonce = None;
        let mut version = None;
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let syntax = |message: String| IdentityError::Syntax { line, message };
            let (key, value) = content
                .split_once('=')
                .ok_or_else(|| syntax(format!("expected `key = value`, found {content:?}")))?;
            let (key, value) = (key.trim(), value.trim());
            match key {
                "version" => {
                    version = Some(value.parse::<u32>().map_err(|_| {
                        syntax(format!("`version` must be a number, found {value:?}"))
                    })?)
                }
                "secret" => {
                    secret = Some(unhex32(value).ok_or_else(|| {
                        syntax("`secret` must be 64 hex digits".to_string())
                    })?)
                }
                "nonce" => {
                    nonce = Some(value.parse::<u64>().map_err(|_| {
                        syntax(format!("`nonce` must be an unsigned number, found {value:?}"))
                    })?)
                }
                other => return Err(syntax(format!("unknown key `{other}`"))),
            }
        }
        match version {
            Some(1) => {}
            Some(v) => return Err(IdentityError::UnsupportedVersion(v)),
            None => return Err(IdentityError::MissingKey("version")),
        }
        let secret = secret.ok_or(IdentityError::MissingKey("secret"))?;
        let nonce = nonce.ok_or(IdentityError::MissingKey("nonce"))?;
        Identity::from_parts(secret, nonce)
    }
}

/// Verifies an Ed25519 signature made by `public_key`, strictly (no
/// malleable or small-order keys).
pub fn verify_signature(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    // verify_strict performs the same equation check as verify plus the
    // small-order and canonical-R rejections, so it alone suffices (one
    // curve operation instead of two; the backbone does this per heartbeat).
    key.verify_strict(message, &signature).is_ok()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    // Hex digits only: from_str_radix alone would also take a leading '+'.
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn test_identity(seed: u8) -> Identity {
        Identity::generate([seed; 32])
    }

    #[test]
    fn generated_identity_address_is_derived_from_its_key() {
        let id = test_identity(1);
        assert_eq!(derive_node_addr(&id.public_key(), id.nonce()), Some(id.node_addr()));
    }

    #[test]
    fn identity_file_round_trips() {
        let id = test_identity(2);
        let back = Identity::from_file_str(&id.to_file_string()).unwrap();
        assert_eq!(back.public_key(), id.public_key());
        assert_eq!(back.node_addr(), id.node_addr());
    }

    #[test]
    fn identity_file_with_altered_nonce_is_refused_not_replaced() {
        let id = test_identity(3);
        let text = id
            .to_file_string()
            .replace(&format!("nonce = {}", id.nonce()), &format!("nonce = {}", id.nonce() + 1));
        assert!(matches!(
            Identity::from_file_str(&text),
            Err(IdentityError::NonceMismatch { .. })
        ));
    }

    #[test]
    fn identity_file_errors_name_the_line() {
        let err = Identity::from_file_str("version = 1\nsecret = zz\nnonce = 1\n").unwrap_err();
        assert_eq!(
            err,
            IdentityError::Syntax { line: 2, message: "`secret` must be 64 hex digits".into() }
        );
        let err = Identity::from_file_str("version = 1\nbogus\n").unwrap_err();
        assert!(matches!(err, IdentityError::Syntax { line: 2, .. }));
        assert_eq!(Identity::from_file_str("").unwrap_err(), IdentityError::MissingKey("version"));
    }

    #[test]
    fn signatures_verify_only_with_the_signing_key_and_message() {
        let a = test_identity(4);
        let b = test_identity(5);
        let sig = a.sign(b"hello");
        assert!(verify_signature(&a.public_key(), b"hello", &sig));
        assert!(!verify_signature(&a.public_key(), b"hellO", &sig));
        assert!(!verify_signature(&b.public_key(), b"hello", &sig));
        assert!(!verify_signature(&a.public_key(), b"hello", &sig[..63]));
    }
}
